//! Rule conditions: as written ([`Condition`]), validated against ALB's limits, and compiled
//! into matchers that inspect a [`RequestView`] without allocating.

use std::net::IpAddr;

use http::HeaderName;

use super::RequestView;
use super::error::RuleError;
use super::pattern::Pattern;

/// At most this many values in one condition (ALB quota).
pub const MAX_VALUES_PER_CONDITION: usize = 3;
/// At most this many condition values in one rule, all conditions together (ALB quota).
pub const MAX_VALUES_PER_RULE: usize = 5;
/// At most this many `*`/`?` wildcards in one rule (ALB quota).
pub const MAX_WILDCARDS_PER_RULE: usize = 5;
/// Longest host-header, path-pattern, header value or query key/value (ALB: 128 characters).
const MAX_PATTERN_CHARS: usize = 128;
/// Longest header name and request method (ALB: 40 characters).
const MAX_NAME_CHARS: usize = 40;

/// One condition of a rule, as configured (uncompiled). Values within a condition are ORed;
/// the conditions of a rule are ANDed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// `host-header`: the request's host (port stripped), case-insensitive, `*` and `?`.
    /// `*.example.com` does not match `example.com`.
    HostHeader(Vec<String>),
    /// `path-pattern`: the request path (never the query), case-SENSITIVE, `*` and `?`.
    PathPattern(Vec<String>),
    /// `http-header`: a header whose name matches case-insensitively and any of whose values
    /// matches one of these, case-insensitively, with `*` and `?`. Repeatable per rule.
    HttpHeader {
        /// Header name (no wildcards).
        name: String,
        /// Value patterns.
        values: Vec<String>,
    },
    /// `http-request-method`: exact and case-sensitive, no wildcards (`A-Z`, `-`, `_`).
    HttpRequestMethod(Vec<String>),
    /// `query-string`: key/value pairs or bare values, case-insensitive, `*` and `?`
    /// (`\*`, `\?` for the literal characters), compared with percent-decoded query pairs.
    /// Repeatable per rule.
    QueryString(Vec<QueryValue>),
    /// `source-ip`: CIDR blocks (IPv4 or IPv6) matched against the TCP peer address.
    SourceIp(Vec<String>),
}

/// One value of a query-string condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryValue {
    /// Key pattern; `None` matches any key (and also a query part with no `=` at all).
    pub key: Option<String>,
    /// Value pattern (never empty).
    pub value: String,
}

impl Condition {
    /// The ALB condition type name (`host-header`, `path-pattern`, …).
    pub fn field(&self) -> &'static str {
        match self {
            Self::HostHeader(_) => "host-header",
            Self::PathPattern(_) => "path-pattern",
            Self::HttpHeader { .. } => "http-header",
            Self::HttpRequestMethod(_) => "http-request-method",
            Self::QueryString(_) => "query-string",
            Self::SourceIp(_) => "source-ip",
        }
    }

    fn value_count(&self) -> usize {
        match self {
            Self::HostHeader(v)
            | Self::PathPattern(v)
            | Self::HttpRequestMethod(v)
            | Self::SourceIp(v) => v.len(),
            Self::HttpHeader { values, .. } => values.len(),
            Self::QueryString(v) => v.len(),
        }
    }

    /// Whether ALB allows this condition type only once per rule.
    fn once_per_rule(&self) -> bool {
        !matches!(self, Self::HttpHeader { .. } | Self::QueryString(_))
    }
}

/// A validated condition ready to match requests.
#[derive(Debug, Clone)]
pub(crate) enum Compiled {
    Method(Box<[String]>),
    SourceIp(Box<[Cidr]>),
    Host(Box<[Pattern]>),
    Path(Box<[Pattern]>),
    Header {
        name: HeaderName,
        values: Box<[Pattern]>,
    },
    Query(Box<[(Option<Pattern>, Pattern)]>),
}

impl Compiled {
    /// Cheapest checks first, so a failing rule is usually rejected early.
    fn cost(&self) -> u8 {
        match self {
            Self::Method(_) => 0,
            Self::SourceIp(_) => 1,
            Self::Host(_) => 2,
            Self::Path(_) => 3,
            Self::Header { .. } => 4,
            Self::Query(_) => 5,
        }
    }

    /// Does the request satisfy this condition (any one of its values)?
    pub(crate) fn matches(&self, req: &RequestView<'_>) -> bool {
        match self {
            Self::Method(methods) => methods.iter().any(|m| m == req.method),
            Self::SourceIp(blocks) => blocks.iter().any(|c| c.contains(req.source_ip)),
            Self::Host(patterns) => req.host.is_some_and(|host| {
                let host = strip_port(host).as_bytes();
                patterns.iter().any(|p| p.matches(host))
            }),
            Self::Path(patterns) => patterns.iter().any(|p| p.matches(req.path.as_bytes())),
            Self::Header { name, values } => req
                .headers
                .get_all(name)
                .iter()
                .any(|v| values.iter().any(|p| p.matches(v.as_bytes()))),
            Self::Query(pairs) => req.query.is_some_and(|query| {
                query
                    .split('&')
                    .filter(|part| !part.is_empty())
                    .any(|part| {
                        let (key, value) = match part.split_once('=') {
                            Some((k, v)) => (Some(k), v),
                            None => (None, part),
                        };
                        pairs.iter().any(|(kp, vp)| {
                            let key_ok = match (kp, key) {
                                (None, _) => true,
                                (Some(kp), Some(key)) => kp.matches_decoded(key.as_bytes()),
                                (Some(_), None) => false,
                            };
                            key_ok && vp.matches_decoded(value.as_bytes())
                        })
                    })
            }),
        }
    }
}

/// The host without a trailing `:port` (`[v6]:port` keeps its brackets).
pub(crate) fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.split_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Validates one rule's conditions against ALB's rules and compiles them, cheapest first.
/// Returns every problem found, not just the first.
pub(crate) fn compile(conditions: &[Condition]) -> Result<Box<[Compiled]>, Vec<RuleError>> {
    let mut errors = Vec::new();
    if conditions.is_empty() {
        errors.push(RuleError::NoConditions);
    }
    let mut compiled = Vec::with_capacity(conditions.len());
    let (mut values, mut wildcards) = (0, 0);
    for (i, cond) in conditions.iter().enumerate() {
        let field = cond.field();
        if cond.once_per_rule()
            && conditions[..i].iter().any(|c| c.field() == field)
            && !errors.contains(&RuleError::RepeatedCondition { condition: field })
        {
            errors.push(RuleError::RepeatedCondition { condition: field });
        }
        let count = cond.value_count();
        values += count;
        if count == 0 {
            errors.push(RuleError::NoValues { condition: field });
        } else if count > MAX_VALUES_PER_CONDITION {
            errors.push(RuleError::TooManyValuesInCondition {
                condition: field,
                count,
                max: MAX_VALUES_PER_CONDITION,
            });
        }
        match compile_one(cond) {
            Ok(c) => {
                wildcards += wildcards_of(&c);
                compiled.push(c);
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if values > MAX_VALUES_PER_RULE {
        errors.push(RuleError::TooManyValuesInRule {
            count: values,
            max: MAX_VALUES_PER_RULE,
        });
    }
    if wildcards > MAX_WILDCARDS_PER_RULE {
        errors.push(RuleError::TooManyWildcards {
            count: wildcards,
            max: MAX_WILDCARDS_PER_RULE,
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    compiled.sort_by_key(Compiled::cost);
    Ok(compiled.into_boxed_slice())
}

fn wildcards_of(c: &Compiled) -> usize {
    let sum = |ps: &[Pattern]| ps.iter().map(Pattern::wildcards).sum::<usize>();
    match c {
        Compiled::Method(_) | Compiled::SourceIp(_) => 0,
        Compiled::Host(ps) | Compiled::Path(ps) => sum(ps),
        Compiled::Header { values, .. } => sum(values),
        Compiled::Query(pairs) => pairs
            .iter()
            .map(|(k, v)| k.as_ref().map_or(0, Pattern::wildcards) + v.wildcards())
            .sum(),
    }
}

/// Collects every error of `items` (each checked by `check`) or all the successes.
fn all<T, U>(
    items: &[T],
    mut check: impl FnMut(&T) -> Result<U, RuleError>,
) -> Result<Box<[U]>, Vec<RuleError>> {
    let mut ok = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for item in items {
        match check(item) {
            Ok(u) => ok.push(u),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(ok.into_boxed_slice())
    } else {
        Err(errors)
    }
}

/// Checks one condition on its own (values and per-condition count), ignoring per-rule limits;
/// lets the flag parser blame the exact part of a spec.
pub(crate) fn check_one(cond: &Condition) -> Result<(), Vec<RuleError>> {
    let field = cond.field();
    let count = cond.value_count();
    let mut errors = match compile_one(cond) {
        Ok(_) => Vec::new(),
        Err(e) => e,
    };
    if count == 0 {
        errors.push(RuleError::NoValues { condition: field });
    } else if count > MAX_VALUES_PER_CONDITION {
        errors.push(RuleError::TooManyValuesInCondition {
            condition: field,
            count,
            max: MAX_VALUES_PER_CONDITION,
        });
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn compile_one(cond: &Condition) -> Result<Compiled, Vec<RuleError>> {
    let field = cond.field();
    match cond {
        Condition::HostHeader(values) => all(values, |v| {
            check_host(v)?;
            Ok(Pattern::compile(v, true, false))
        })
        .map(Compiled::Host),
        Condition::PathPattern(values) => all(values, |v| {
            check_len(field, v, MAX_PATTERN_CHARS)?;
            if let Some(c) = v.chars().find(|&c| !is_path_char(c)) {
                return Err(RuleError::invalid_value(
                    field,
                    v,
                    format!("{c:?} is not allowed (use A-Z a-z 0-9 _ - . $ / ~ \" ' @ : + & * ?)"),
                ));
            }
            Ok(Pattern::compile(v, false, false))
        })
        .map(Compiled::Path),
        Condition::HttpHeader { name, values } => {
            let header = check_len(field, name, MAX_NAME_CHARS).and_then(|()| {
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    RuleError::invalid_value(field, name, "not a valid HTTP header name")
                })
            });
            let patterns = all(values, |v| {
                check_len(field, v, MAX_PATTERN_CHARS)?;
                if v.chars().any(char::is_control) {
                    return Err(RuleError::invalid_value(
                        field,
                        v,
                        "control characters are not allowed",
                    ));
                }
                Ok(Pattern::compile(v, true, false))
            });
            match (header, patterns) {
                (Ok(name), Ok(values)) => Ok(Compiled::Header { name, values }),
                (Err(e), Ok(_)) => Err(vec![e]),
                (Ok(_), Err(es)) => Err(es),
                (Err(e), Err(mut es)) => {
                    es.insert(0, e);
                    Err(es)
                }
            }
        }
        Condition::HttpRequestMethod(values) => all(values, |v| {
            check_len(field, v, MAX_NAME_CHARS)?;
            if !v
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
            {
                return Err(RuleError::invalid_value(
                    field,
                    v,
                    "only A-Z, - and _ are allowed (methods are case-sensitive: GET, not get)",
                ));
            }
            Ok(v.clone())
        })
        .map(Compiled::Method),
        Condition::QueryString(values) => all(values, |q| {
            let key = match &q.key {
                Some(k) => {
                    check_len(field, k, MAX_PATTERN_CHARS)?;
                    Some(Pattern::compile(k, true, true))
                }
                None => None,
            };
            check_len(field, &q.value, MAX_PATTERN_CHARS)?;
            Ok((key, Pattern::compile(&q.value, true, true)))
        })
        .map(Compiled::Query),
        Condition::SourceIp(values) => all(values, |v| Cidr::parse(v)).map(Compiled::SourceIp),
    }
}

fn check_len(field: &'static str, v: &str, max: usize) -> Result<(), RuleError> {
    let chars = v.chars().count();
    if chars == 0 {
        Err(RuleError::invalid_value(field, v, "it is empty"))
    } else if chars > max {
        Err(RuleError::invalid_value(
            field,
            v,
            format!("it has {chars} characters; at most {max} are allowed"),
        ))
    } else {
        Ok(())
    }
}

fn check_host(v: &str) -> Result<(), RuleError> {
    const FIELD: &str = "host-header";
    check_len(FIELD, v, MAX_PATTERN_CHARS)?;
    if let Some(c) = v
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '*' | '?')))
    {
        return Err(RuleError::invalid_value(
            FIELD,
            v,
            format!("{c:?} is not allowed (use A-Z a-z 0-9 - . * ?)"),
        ));
    }
    let Some((_, last)) = v.rsplit_once('.') else {
        return Err(RuleError::invalid_value(
            FIELD,
            v,
            "it must contain at least one \".\"",
        ));
    };
    if last.is_empty() || !last.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(RuleError::invalid_value(
            FIELD,
            v,
            "only letters may follow the final \".\"",
        ));
    }
    Ok(())
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '_' | '-' | '.' | '$' | '/' | '~' | '"' | '\'' | '@' | ':' | '+' | '&' | '*' | '?'
        )
}

/// An address block; IPv4 blocks also match IPv4-mapped IPv6 peers (`::ffff:a.b.c.d`), which is
/// how a dual-stack socket reports an IPv4 client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    /// Network address as an IPv6 value (IPv4 blocks stored as mapped addresses).
    net: u128,
    /// Prefix length in the IPv6 space (an IPv4 /n is stored as /96+n).
    prefix: u32,
}

impl Cidr {
    fn parse(v: &str) -> Result<Self, RuleError> {
        const FIELD: &str = "source-ip";
        let bad = |reason: &str| RuleError::invalid_value(FIELD, v, reason);
        let (addr, prefix) = v
            .split_once('/')
            .ok_or_else(|| bad("use CIDR notation, e.g. 10.0.0.0/8 or 2001:db8::/32"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| bad("the address is not an IPv4 or IPv6 address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u32 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| bad(&format!("the prefix length must be 0-{max}")))?;
        let (bits, prefix) = match addr {
            IpAddr::V4(a) => (u128::from(a.to_ipv6_mapped()), prefix + 96),
            IpAddr::V6(a) => (u128::from(a), prefix),
        };
        let cidr = Self {
            net: bits & mask(prefix),
            prefix,
        };
        if cidr.net != bits {
            return Err(bad("host bits are set after the prefix length"));
        }
        Ok(cidr)
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let bits = match ip {
            IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
            IpAddr::V6(a) => u128::from(a),
        };
        bits & mask(self.prefix) == self.net
    }
}

fn mask(prefix: u32) -> u128 {
    u128::MAX.checked_shl(128 - prefix).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn req<'a>(headers: &'a HeaderMap) -> RequestView<'a> {
        RequestView {
            method: "GET",
            host: Some("www.example.com"),
            path: "/",
            query: None,
            headers,
            source_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
        }
    }

    fn one(c: Condition) -> Compiled {
        let mut v = compile(&[c]).expect("valid condition").into_vec();
        v.remove(0)
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn host(patterns: &[&str], host: Option<&str>) -> bool {
        let h = HeaderMap::new();
        one(Condition::HostHeader(strs(patterns))).matches(&RequestView { host, ..req(&h) })
    }

    fn path(patterns: &[&str], path: &str) -> bool {
        let h = HeaderMap::new();
        one(Condition::PathPattern(strs(patterns))).matches(&RequestView { path, ..req(&h) })
    }

    fn query(values: &[(Option<&str>, &str)], query: Option<&str>) -> bool {
        let h = HeaderMap::new();
        let values = values
            .iter()
            .map(|(k, v)| QueryValue {
                key: k.map(str::to_owned),
                value: (*v).to_owned(),
            })
            .collect();
        one(Condition::QueryString(values)).matches(&RequestView { query, ..req(&h) })
    }

    fn source(blocks: &[&str], ip: IpAddr) -> bool {
        let h = HeaderMap::new();
        one(Condition::SourceIp(strs(blocks))).matches(&RequestView {
            source_ip: ip,
            ..req(&h)
        })
    }

    fn errors(conds: &[Condition]) -> Vec<RuleError> {
        compile(conds).expect_err("should be rejected")
    }

    #[test]
    fn subdomain_wildcard_does_not_match_the_bare_domain() {
        assert!(host(&["*.example.com"], Some("www.example.com")));
        assert!(host(&["*.example.com"], Some("a.b.example.com")));
        assert!(!host(&["*.example.com"], Some("example.com")));
    }

    #[test]
    fn host_match_is_case_insensitive_both_ways() {
        assert!(host(&["example.com"], Some("EXAMPLE.com")));
        assert!(host(&["EXAMPLE.COM"], Some("example.com")));
    }

    #[test]
    fn host_port_is_stripped_before_matching() {
        assert!(host(&["example.com"], Some("example.com:8080")));
        assert!(host(&["*.example.com"], Some("api.example.com:443")));
        assert!(!host(&["example.com"], Some("example.com.evil:80")));
    }

    #[test]
    fn missing_host_matches_no_host_condition() {
        assert!(!host(&["*.com"], None));
    }

    #[test]
    fn host_values_are_ored() {
        assert!(host(
            &["a.example.com", "*.example.org"],
            Some("x.example.org")
        ));
        assert!(!host(
            &["a.example.com", "*.example.org"],
            Some("b.example.com")
        ));
    }

    #[test]
    fn host_question_mark_needs_exactly_one_character() {
        assert!(host(&["api?.example.com"], Some("api1.example.com")));
        assert!(!host(&["api?.example.com"], Some("api.example.com")));
        assert!(!host(&["api?.example.com"], Some("api12.example.com")));
    }

    #[test]
    fn path_match_is_case_sensitive() {
        assert!(path(&["/api*"], "/api/users"));
        assert!(!path(&["/api*"], "/API/users"));
        assert!(!path(&["/api*"], "/API"));
    }

    #[test]
    fn path_question_mark_needs_exactly_one_character() {
        assert!(path(&["/v?/x"], "/v1/x"));
        assert!(!path(&["/v?/x"], "/v/x"));
        assert!(!path(&["/v?/x"], "/v10/x"));
    }

    #[test]
    fn path_pattern_never_sees_the_query_string() {
        let h = HeaderMap::new();
        let c = one(Condition::PathPattern(strs(&["/search"])));
        let r = RequestView {
            path: "/search",
            query: Some("q=1"),
            ..req(&h)
        };
        assert!(c.matches(&r));
        let c = one(Condition::PathPattern(strs(&["*1"])));
        assert!(!c.matches(&r));
    }

    #[test]
    fn header_name_and_value_are_case_insensitive() {
        let mut h = HeaderMap::new();
        h.insert("user-agent", "Mozilla/5.0 CHROME/120".parse().unwrap());
        let c = one(Condition::HttpHeader {
            name: "User-Agent".into(),
            values: strs(&["*Chrome*"]),
        });
        assert!(c.matches(&req(&h)));
        let c = one(Condition::HttpHeader {
            name: "USER-AGENT".into(),
            values: strs(&["*safari*"]),
        });
        assert!(!c.matches(&req(&h)));
    }

    #[test]
    fn header_with_several_values_matches_if_any_value_does() {
        let mut h = HeaderMap::new();
        h.append("x-env", "prod".parse().unwrap());
        h.append("x-env", "canary".parse().unwrap());
        let c = one(Condition::HttpHeader {
            name: "x-env".into(),
            values: strs(&["canary"]),
        });
        assert!(c.matches(&req(&h)));
    }

    #[test]
    fn absent_header_does_not_match_even_a_star() {
        let h = HeaderMap::new();
        let c = one(Condition::HttpHeader {
            name: "x-env".into(),
            values: strs(&["*"]),
        });
        assert!(!c.matches(&req(&h)));
    }

    #[test]
    fn method_is_exact_and_case_sensitive() {
        let h = HeaderMap::new();
        let c = one(Condition::HttpRequestMethod(strs(&["GET", "HEAD"])));
        assert!(c.matches(&RequestView {
            method: "HEAD",
            ..req(&h)
        }));
        assert!(!c.matches(&RequestView {
            method: "POST",
            ..req(&h)
        }));
        let e = errors(&[Condition::HttpRequestMethod(strs(&["get"]))]);
        assert!(
            matches!(&e[..], [RuleError::InvalidConditionValue { value, .. }] if value == "get")
        );
        let e = errors(&[Condition::HttpRequestMethod(strs(&["G*"]))]);
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn query_pairs_match_case_insensitively_with_wildcards() {
        assert!(query(&[(Some("version"), "v1")], Some("a=b&VERSION=V1")));
        assert!(query(&[(Some("ver*"), "v?")], Some("version=v2")));
        assert!(!query(&[(Some("version"), "v1")], Some("version=v2")));
        assert!(!query(&[(Some("version"), "v1")], None));
    }

    #[test]
    fn query_value_without_key_matches_any_key() {
        assert!(query(&[(None, "debug")], Some("mode=debug")));
        assert!(query(&[(None, "debug")], Some("x=1&debug")));
        assert!(!query(&[(None, "debug")], Some("debug=1")));
        // A keyed condition needs a key.
        assert!(!query(&[(Some("debug"), "*")], Some("debug")));
    }

    #[test]
    fn query_is_compared_percent_decoded() {
        assert!(query(
            &[(Some("name"), "john doe")],
            Some("na%6De=John%20Doe")
        ));
        assert!(query(&[(Some("q"), "a&b")], Some("q=a%26b")));
        assert!(!query(&[(Some("q"), "a")], Some("q=a%26b")));
    }

    #[test]
    fn query_escaped_star_is_literal() {
        assert!(query(&[(Some("q"), r"a\*")], Some("q=a*")));
        assert!(!query(&[(Some("q"), r"a\*")], Some("q=abc")));
    }

    #[test]
    fn source_ip_matches_v4_and_v6_blocks() {
        let blocks = ["10.0.0.0/8", "2001:db8::/32"];
        assert!(source(&blocks, "10.1.2.3".parse().unwrap()));
        assert!(!source(&blocks, "11.0.0.1".parse().unwrap()));
        assert!(source(&blocks, "2001:db8:1::5".parse().unwrap()));
        assert!(!source(&blocks, "2001:db9::5".parse().unwrap()));
        assert!(source(&["0.0.0.0/0"], "203.0.113.9".parse().unwrap()));
        assert!(source(&["192.0.2.7/32"], "192.0.2.7".parse().unwrap()));
    }

    #[test]
    fn v4_mapped_v6_peer_is_treated_as_its_v4_address() {
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 9, 8, 7).to_ipv6_mapped());
        assert!(source(&["10.0.0.0/8"], mapped));
        assert!(!source(&["192.168.0.0/16"], mapped));
        // But a v4 block never matches a genuine IPv6 peer.
        assert!(!source(&["0.0.0.0/0"], IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }

    #[test]
    fn source_ip_rejects_non_cidr_values() {
        for bad in [
            "10.0.0.1",
            "10.0.0.0/33",
            "10.0.0.1/8",
            "nope/8",
            "10.0.0.*/24",
        ] {
            let e = errors(&[Condition::SourceIp(strs(&[bad]))]);
            assert!(
                matches!(&e[..], [RuleError::InvalidConditionValue { value, .. }] if value == bad),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn host_values_are_validated_like_alb() {
        for bad in [
            "example",
            "example.c0m",
            "exa_mple.com",
            "example.com:80",
            "",
        ] {
            assert!(
                compile(&[Condition::HostHeader(strs(&[bad]))]).is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(compile(&[Condition::HostHeader(strs(&["*.example.com"]))]).is_ok());
    }

    #[test]
    fn too_many_values_in_one_condition_is_rejected() {
        let e = errors(&[Condition::PathPattern(strs(&["/a", "/b", "/c", "/d"]))]);
        assert!(e.contains(&RuleError::TooManyValuesInCondition {
            condition: "path-pattern",
            count: 4,
            max: 3
        }));
    }

    #[test]
    fn more_than_five_values_per_rule_is_rejected() {
        let e = errors(&[
            Condition::PathPattern(strs(&["/a", "/b", "/c"])),
            Condition::HostHeader(strs(&["a.example.com", "b.example.com", "c.example.com"])),
        ]);
        assert_eq!(e, vec![RuleError::TooManyValuesInRule { count: 6, max: 5 }]);
    }

    #[test]
    fn more_than_five_wildcards_per_rule_is_rejected() {
        let e = errors(&[
            Condition::PathPattern(strs(&["/*/*/*"])),
            Condition::HostHeader(strs(&["*.ex?mple.com", "*.example.org"])),
        ]);
        assert_eq!(e, vec![RuleError::TooManyWildcards { count: 6, max: 5 }]);
        assert!(
            compile(&[
                Condition::PathPattern(strs(&["/*/*/*"])),
                Condition::HostHeader(strs(&["*.ex?mple.com"])),
            ])
            .is_ok()
        );
    }

    #[test]
    fn single_use_conditions_cannot_repeat_but_headers_and_queries_can() {
        let e = errors(&[
            Condition::PathPattern(strs(&["/a"])),
            Condition::PathPattern(strs(&["/b"])),
        ]);
        assert_eq!(
            e,
            vec![RuleError::RepeatedCondition {
                condition: "path-pattern"
            }]
        );
        let header = |n: &str| Condition::HttpHeader {
            name: n.into(),
            values: strs(&["x"]),
        };
        assert!(compile(&[header("a"), header("b")]).is_ok());
    }

    #[test]
    fn multiple_header_conditions_are_all_required() {
        let mut h = HeaderMap::new();
        h.insert("x-a", "1".parse().unwrap());
        let conds = compile(&[
            Condition::HttpHeader {
                name: "x-a".into(),
                values: strs(&["1"]),
            },
            Condition::HttpHeader {
                name: "x-b".into(),
                values: strs(&["2"]),
            },
        ])
        .unwrap();
        assert!(!conds.iter().all(|c| c.matches(&req(&h))));
        h.insert("x-b", "2".parse().unwrap());
        assert!(conds.iter().all(|c| c.matches(&req(&h))));
    }

    #[test]
    fn empty_conditions_and_bad_header_names_are_rejected() {
        assert_eq!(errors(&[]), vec![RuleError::NoConditions]);
        assert_eq!(
            errors(&[Condition::HostHeader(vec![])]),
            vec![RuleError::NoValues {
                condition: "host-header"
            }]
        );
        let e = errors(&[Condition::HttpHeader {
            name: "bad name".into(),
            values: strs(&["x"]),
        }]);
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn path_rejects_characters_alb_rejects_and_overlong_values() {
        assert!(compile(&[Condition::PathPattern(strs(&["/a b"]))]).is_err());
        let long = format!("/{}", "a".repeat(128));
        assert!(compile(&[Condition::PathPattern(vec![long])]).is_err());
        let max = format!("/{}", "a".repeat(127));
        assert!(compile(&[Condition::PathPattern(vec![max])]).is_ok());
    }
}
