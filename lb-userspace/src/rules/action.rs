//! Rule actions: forward (weighted target groups), redirect, fixed-response, each validated as
//! ALB validates it.

use std::fmt::Write as _;
use std::time::Duration;

use http::StatusCode;

use super::RequestView;
use super::condition::strip_port;
use super::error::RuleError;

/// At most this many target groups in one forward action (ALB quota).
pub const MAX_TARGET_GROUPS_PER_FORWARD: usize = 5;
/// Highest weight of a target group in a forward action (ALB: 0–999).
pub const MAX_WEIGHT: u32 = 999;
/// Weight of a group given without one (`forward=web` or `forward=a|b`).
pub const DEFAULT_WEIGHT: u32 = 1;
/// Shortest group stickiness (ALB: 1 second).
pub const MIN_GROUP_STICKINESS: Duration = Duration::from_secs(1);
/// Longest group stickiness (ALB: 7 days).
pub const MAX_GROUP_STICKINESS: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest fixed-response body, in characters (ALB: 1024).
pub const MAX_BODY_CHARS: usize = 1024;
/// The content types ALB allows in a fixed response.
pub const CONTENT_TYPES: [&str; 5] = [
    "text/plain",
    "text/css",
    "text/html",
    "application/javascript",
    "application/json",
];
/// Longest redirect host, path or query template (ALB: 128 characters).
const MAX_REDIRECT_COMPONENT_CHARS: usize = 128;

/// What a rule does with a matching request: exactly one action per rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the request to a target group (or one of several, by weight).
    Forward(ForwardAction),
    /// Answer with a 301/302 to a URL built from the request.
    Redirect(RedirectAction),
    /// Answer with a fixed status, content type and body.
    FixedResponse(FixedResponseAction),
}

impl Action {
    /// Names of every target group this action refers to (config checks that they exist).
    pub fn target_groups(&self) -> impl Iterator<Item = &str> {
        let groups: &[WeightedGroup] = match self {
            Self::Forward(f) => &f.groups,
            Self::Redirect(_) | Self::FixedResponse(_) => &[],
        };
        groups.iter().map(|g| g.name.as_str())
    }

    /// The access log's `actions_executed` word: `forward`, `redirect` or `fixed-response`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Forward(_) => "forward",
            Self::Redirect(_) => "redirect",
            Self::FixedResponse(_) => "fixed-response",
        }
    }

    /// Checks the action against ALB's limits (needed because the action types have public
    /// fields; [`super::RuleSet::new`] calls it for every action).
    pub fn validate(&self) -> Result<(), Vec<RuleError>> {
        match self {
            Self::Forward(f) => f.validate(),
            // A RedirectAction can only be built through its validating constructors.
            Self::Redirect(_) => Ok(()),
            Self::FixedResponse(f) => f.validate().map_err(|e| vec![e]),
        }
    }
}

/// One target group of a forward action and its share of the traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedGroup {
    /// Target group name.
    pub name: String,
    /// Relative weight, 0–999 (0 = receives nothing).
    pub weight: u32,
}

/// Forward to one target group, or split between up to 5 in proportion to their weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardAction {
    /// The groups (1–5, distinct names, at least one weight above 0).
    pub groups: Vec<WeightedGroup>,
    /// Group stickiness: the `AWSALBTG` cookie pins a client to the chosen group for this long
    /// (1 s – 7 days). `None`: off (the ALB default).
    pub group_stickiness: Option<Duration>,
}

impl ForwardAction {
    /// A validated forward action.
    pub fn new(
        groups: Vec<WeightedGroup>,
        group_stickiness: Option<Duration>,
    ) -> Result<Self, Vec<RuleError>> {
        let action = Self {
            groups,
            group_stickiness,
        };
        action.validate()?;
        Ok(action)
    }

    /// Checks ALB's limits: 1–5 distinct non-empty groups, weights 0–999 with at least one
    /// above 0, stickiness 1 s – 7 days.
    pub fn validate(&self) -> Result<(), Vec<RuleError>> {
        let mut errors = Vec::new();
        if self.groups.is_empty() {
            errors.push(RuleError::NoTargetGroups);
        }
        if self.groups.len() > MAX_TARGET_GROUPS_PER_FORWARD {
            errors.push(RuleError::TooManyTargetGroups {
                count: self.groups.len(),
                max: MAX_TARGET_GROUPS_PER_FORWARD,
            });
        }
        for (i, g) in self.groups.iter().enumerate() {
            if g.name.is_empty() {
                errors.push(RuleError::EmptyTargetGroup);
            } else if self.groups[..i].iter().any(|o| o.name == g.name) {
                errors.push(RuleError::DuplicateTargetGroup {
                    name: g.name.clone(),
                });
            }
            if g.weight > MAX_WEIGHT {
                errors.push(RuleError::WeightOutOfRange {
                    group: g.name.clone(),
                    weight: u64::from(g.weight),
                });
            }
        }
        if !self.groups.is_empty() && self.groups.iter().all(|g| g.weight == 0) {
            errors.push(RuleError::AllWeightsZero);
        }
        if let Some(d) = self.group_stickiness
            && !(MIN_GROUP_STICKINESS..=MAX_GROUP_STICKINESS).contains(&d)
        {
            errors.push(RuleError::StickinessOutOfRange {
                seconds: d.as_secs(),
            });
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// [`choose`](Self::choose) with the random number drawn only when there is a choice: an
    /// action with one group (the usual forward) answers it whatever the number is, and a
    /// draw from the thread's generator costs more than the rest of the pick.
    pub fn choose_with(&self, random: impl FnOnce() -> u32) -> &str {
        self.choose_index_with(random)
            .map_or("", |i| self.groups[i].name.as_str())
    }

    /// [`choose_with`](Self::choose_with)'s group as its index in `groups` (`None`: the
    /// action has no group).
    pub fn choose_index_with(&self, random: impl FnOnce() -> u32) -> Option<usize> {
        if self.groups.len() == 1 {
            return Some(0);
        }
        self.choose_index(random())
    }

    /// Picks a group in proportion to the weights, from a uniformly random `random` (the
    /// caller owns the random source, so tests are deterministic). Groups of weight 0 are never
    /// chosen. For a validated action the answer is always one of its groups; an action with no
    /// weight at all (unvalidated) answers its first group, or `""` if it has none.
    pub fn choose(&self, random: u32) -> &str {
        self.choose_index(random)
            .map_or("", |i| self.groups[i].name.as_str())
    }

    /// [`choose`](Self::choose)'s group as its index in `groups`.
    fn choose_index(&self, random: u32) -> Option<usize> {
        let total: u64 = self.groups.iter().map(|g| u64::from(g.weight)).sum();
        if total == 0 {
            return (!self.groups.is_empty()).then_some(0);
        }
        // Multiply-shift maps 0..2^32 onto 0..total without modulo bias worth speaking of.
        let mut pick = (u64::from(random) * total) >> 32;
        for (i, g) in self.groups.iter().enumerate() {
            let w = u64::from(g.weight);
            if pick < w {
                return Some(i);
            }
            pick -= w;
        }
        // Unreachable: pick < total. Answer the last weighted group rather than panic.
        self.groups.iter().rposition(|g| g.weight > 0)
    }
}

/// The two redirect statuses ALB offers (there is no default: the rule must choose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectStatus {
    /// `HTTP_301` Moved Permanently.
    Permanent,
    /// `HTTP_302` Found.
    Found,
}

impl RedirectStatus {
    /// Parses `301`, `302`, `HTTP_301` or `HTTP_302`.
    pub fn parse(s: &str) -> Result<Self, RuleError> {
        match s {
            "301" | "HTTP_301" => Ok(Self::Permanent),
            "302" | "HTTP_302" => Ok(Self::Found),
            _ => Err(RuleError::InvalidRedirectStatus {
                value: s.to_owned(),
            }),
        }
    }

    /// The HTTP status code.
    pub fn code(self) -> StatusCode {
        match self {
            Self::Permanent => StatusCode::MOVED_PERMANENTLY,
            Self::Found => StatusCode::FOUND,
        }
    }
}

/// Redirect components as written; `None` keeps the component's default, which reuses the
/// request's own value: `#{protocol}`, `#{host}`, `#{port}`, `/#{path}`, `#{query}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedirectParts {
    /// `HTTP`, `HTTPS` or `#{protocol}` (case-insensitive).
    pub protocol: Option<String>,
    /// Host name, may use placeholders (e.g. `#{host}` or `www.#{host}`).
    pub host: Option<String>,
    /// 1–65535 or `#{port}`.
    pub port: Option<String>,
    /// Absolute path starting with `/`, may use placeholders (`#{path}` has no leading `/`).
    pub path: Option<String>,
    /// Query without the leading `?` (one is stripped if given), may use placeholders.
    pub query: Option<String>,
}

/// Default protocol template: the listener's own protocol.
const DEFAULT_PROTOCOL: &str = "#{protocol}";
/// Default host template: the request's host (port stripped).
const DEFAULT_HOST: &str = "#{host}";
/// Default port template: the listener's port.
const DEFAULT_PORT: &str = "#{port}";
/// Default path template: the request's path (`#{path}` expands without its leading `/`).
const DEFAULT_PATH: &str = "/#{path}";
/// Default query template: the request's query.
const DEFAULT_QUERY: &str = "#{query}";

/// One piece of a redirect template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Protocol,
    Host,
    Port,
    Path,
    Query,
}

/// A parsed redirect component.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template {
    /// As written (protocol normalised to upper case), for display and the self-redirect check.
    source: String,
    pieces: Box<[Piece]>,
}

impl Template {
    /// Parses placeholders; the error is the reason the text is invalid.
    fn parse(src: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = src;
        while let Some(start) = rest.find("#{") {
            if start > 0 {
                pieces.push(Piece::Literal(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| "a \"#{\" is not closed by \"}\"".to_owned())?;
            pieces.push(match &after[..end] {
                "protocol" => Piece::Protocol,
                "host" => Piece::Host,
                "port" => Piece::Port,
                "path" => Piece::Path,
                "query" => Piece::Query,
                other => {
                    return Err(format!(
                        "unknown placeholder #{{{other}}} (use #{{protocol}}, #{{host}}, #{{port}}, #{{path}} or #{{query}})"
                    ));
                }
            });
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest.to_owned()));
        }
        Ok(Self {
            source: src.to_owned(),
            pieces: pieces.into_boxed_slice(),
        })
    }

    fn literal_text(&self) -> impl Iterator<Item = char> + '_ {
        self.pieces.iter().flat_map(|p| match p {
            Piece::Literal(s) => s.chars(),
            _ => "".chars(),
        })
    }

    fn expand(&self, out: &mut String, ctx: &Expansion<'_>) {
        for p in &self.pieces {
            match p {
                Piece::Literal(s) => out.push_str(s),
                Piece::Protocol => out.push_str(ctx.protocol),
                Piece::Host => out.push_str(ctx.host),
                Piece::Port => {
                    // Writing to a String cannot fail.
                    let _ = write!(out, "{}", ctx.port);
                }
                Piece::Path => out.push_str(ctx.path.strip_prefix('/').unwrap_or(ctx.path)),
                Piece::Query => out.push_str(ctx.query),
            }
        }
    }
}

/// The request values placeholders expand to.
struct Expansion<'a> {
    protocol: &'a str,
    host: &'a str,
    port: u16,
    path: &'a str,
    query: &'a str,
}

/// Redirect to a URL built from `protocol://host:port/path?query`, each component a template
/// over the request (`#{protocol}`, `#{host}`, `#{port}`, `#{path}`, `#{query}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectAction {
    status: RedirectStatus,
    protocol: Template,
    host: Template,
    port: Template,
    path: Template,
    query: Template,
}

impl RedirectAction {
    /// A validated redirect. Refuses what ALB refuses: a protocol other than HTTP, HTTPS or
    /// `#{protocol}`, a port outside 1–65535, a path not starting with `/`, components over
    /// 128 characters, unknown placeholders, and a redirect that changes nothing.
    pub fn new(status: RedirectStatus, parts: RedirectParts) -> Result<Self, Vec<RuleError>> {
        let RedirectParts {
            protocol,
            host,
            port,
            path,
            query,
        } = parts;
        let mut errors = Vec::new();
        let mut component =
            |name: &'static str,
             value: Option<String>,
             default: &str,
             check: fn(&str, &Template) -> Result<String, String>| {
                let value = value.unwrap_or_else(|| default.to_owned());
                let checked = Template::parse(&value)
                    .and_then(|t| check(&value, &t))
                    .and_then(|normalised| Template::parse(&normalised));
                match checked {
                    Ok(t) => Some(t),
                    Err(reason) => {
                        errors.push(RuleError::InvalidRedirectComponent {
                            component: name,
                            value,
                            reason,
                        });
                        None
                    }
                }
            };
        let protocol = component("protocol", protocol, DEFAULT_PROTOCOL, check_protocol);
        let host = component("host", host, DEFAULT_HOST, check_host);
        let port = component("port", port, DEFAULT_PORT, check_port);
        let path = component("path", path, DEFAULT_PATH, check_path);
        let query = component("query", query, DEFAULT_QUERY, check_query);
        let (Some(protocol), Some(host), Some(port), Some(path), Some(query)) =
            (protocol, host, port, path, query)
        else {
            return Err(errors);
        };
        let action = Self {
            status,
            protocol,
            host,
            port,
            path,
            query,
        };
        if action.protocol.source == DEFAULT_PROTOCOL
            && action.host.source == DEFAULT_HOST
            && action.port.source == DEFAULT_PORT
            && action.path.source == DEFAULT_PATH
            && action.query.source == DEFAULT_QUERY
        {
            return Err(vec![RuleError::SelfRedirect]);
        }
        Ok(action)
    }

    /// A redirect written as one URL template, e.g. `https://#{host}:443/#{path}?#{query}`.
    /// Components the URL leaves out keep their defaults (so `https://example.com` keeps the
    /// request's port, path and query).
    pub fn from_url(status: RedirectStatus, url: &str) -> Result<Self, Vec<RuleError>> {
        Self::new(status, parse_url(url).map_err(|e| vec![e])?)
    }

    /// 301 or 302.
    pub fn status(&self) -> StatusCode {
        self.status.code()
    }

    /// The redirect status as configured.
    pub fn redirect_status(&self) -> RedirectStatus {
        self.status
    }

    /// Whether the configured protocol is plain HTTP (refused on HTTPS listeners).
    pub fn targets_plain_http(&self) -> bool {
        self.protocol.source == "HTTP"
    }

    /// Whether, on a listener with this protocol and port, the redirect would send the client
    /// to the URL it asked for (protocol and port resolve to the listener's own, host, path and
    /// query are left at their defaults).
    pub fn loops_on(&self, listener_protocol: &str, listener_port: u16) -> bool {
        let same_protocol = self.protocol.source == DEFAULT_PROTOCOL
            || self.protocol.source.eq_ignore_ascii_case(listener_protocol);
        let same_port =
            self.port.source == DEFAULT_PORT || self.port.source.parse() == Ok(listener_port);
        same_protocol
            && same_port
            && self.host.source == DEFAULT_HOST
            && self.path.source == DEFAULT_PATH
            && self.query.source == DEFAULT_QUERY
    }

    /// Builds the `Location` URL for `req` arriving on a listener with `listener_protocol`
    /// (`http`/`https`, any case) and `listener_port`.
    ///
    /// Never downgrades: ALB refuses HTTPS→HTTP redirects, and config validation should reject
    /// them up front ([`super::RuleSet::validate_for_listener`]); should one reach this point
    /// anyway, a request that arrived over HTTPS is sent to `https`. The port is always written
    /// explicitly (`https://example.com:443/`), as ALB does; the `?` only when the query is not
    /// empty; a missing `Host` expands `#{host}` to the empty string.
    pub fn location(
        &self,
        req: &RequestView<'_>,
        listener_protocol: &str,
        listener_port: u16,
    ) -> String {
        let https = listener_protocol.eq_ignore_ascii_case("https");
        let ctx = Expansion {
            protocol: if https { "https" } else { "http" },
            host: req.host.map_or("", strip_port),
            port: listener_port,
            path: req.path,
            query: req.query.unwrap_or(""),
        };
        let mut protocol = String::new();
        self.protocol.expand(&mut protocol, &ctx);
        protocol.make_ascii_lowercase();
        if https {
            protocol = "https".into();
        }
        let mut url = protocol;
        url.push_str("://");
        self.host.expand(&mut url, &ctx);
        url.push(':');
        self.port.expand(&mut url, &ctx);
        self.path.expand(&mut url, &ctx);
        let mut query = String::new();
        self.query.expand(&mut query, &ctx);
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query);
        }
        url
    }

    /// The components as written, in `protocol://host:port/path?query` form.
    pub fn url_template(&self) -> String {
        format!(
            "{}://{}:{}{}?{}",
            self.protocol.source,
            self.host.source,
            self.port.source,
            self.path.source,
            self.query.source
        )
    }
}

fn check_protocol(v: &str, _: &Template) -> Result<String, String> {
    if v.eq_ignore_ascii_case("http") || v.eq_ignore_ascii_case("https") {
        Ok(v.to_ascii_uppercase())
    } else if v == DEFAULT_PROTOCOL {
        Ok(v.to_owned())
    } else {
        Err("use HTTP, HTTPS or #{protocol}".into())
    }
}

fn check_len(v: &str) -> Result<(), String> {
    let n = v.chars().count();
    if n > MAX_REDIRECT_COMPONENT_CHARS {
        Err(format!(
            "it has {n} characters; at most {MAX_REDIRECT_COMPONENT_CHARS} are allowed"
        ))
    } else {
        Ok(())
    }
}

fn check_host(v: &str, t: &Template) -> Result<String, String> {
    check_len(v)?;
    if v.is_empty() {
        return Err("it is empty".into());
    }
    if let Some(c) = t
        .literal_text()
        .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
    {
        return Err(format!("{c:?} is not allowed in a host name"));
    }
    Ok(v.to_owned())
}

fn check_port(v: &str, _: &Template) -> Result<String, String> {
    if v == DEFAULT_PORT || v.parse::<u16>().is_ok_and(|p| p >= 1) {
        Ok(v.to_owned())
    } else {
        Err("use 1-65535 or #{port}".into())
    }
}

fn check_path(v: &str, t: &Template) -> Result<String, String> {
    check_len(v)?;
    if !v.starts_with('/') {
        return Err("it must start with \"/\"".into());
    }
    if t.literal_text()
        .any(|c| c.is_control() || matches!(c, ' ' | '?' | '#'))
    {
        return Err("spaces, control characters, \"?\" and \"#\" are not allowed".into());
    }
    Ok(v.to_owned())
}

fn check_query(v: &str, t: &Template) -> Result<String, String> {
    let v = v.strip_prefix('?').unwrap_or(v);
    check_len(v)?;
    if t.literal_text()
        .any(|c| c.is_control() || matches!(c, ' ' | '#'))
    {
        return Err("spaces, control characters and \"#\" are not allowed".into());
    }
    Ok(v.to_owned())
}

/// Splits `protocol://host:port/path?query` into components; any may be left out except the
/// `protocol://` (so that `host:port` is never mistaken for a path).
fn parse_url(url: &str) -> Result<RedirectParts, RuleError> {
    let bad = |reason: &str| RuleError::InvalidRedirectComponent {
        component: "URL",
        value: url.to_owned(),
        reason: reason.to_owned(),
    };
    let (protocol, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("write it as protocol://host:port/path?query, e.g. https://#{host}:443/#{path}?#{query}"))?;
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], Some(&before_query[i..])),
        None => (before_query, None),
    };
    // The port follows the last ':' that is not inside a placeholder (placeholders hold no ':').
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    Ok(RedirectParts {
        protocol: some(protocol),
        host: some(host),
        port: port.map(str::to_owned),
        path: path.map(str::to_owned),
        query: query.map(str::to_owned),
    })
}

/// Answer directly with a fixed status, optional content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedResponseAction {
    /// 2XX, 4XX or 5XX.
    pub status: StatusCode,
    /// One of [`CONTENT_TYPES`]; `None` sends no `Content-Type`.
    pub content_type: Option<String>,
    /// At most 1024 characters.
    pub body: String,
}

impl FixedResponseAction {
    /// A validated fixed response; `status` as written (`404`), `content_type` one of
    /// [`CONTENT_TYPES`] (case-insensitive, stored lower-case).
    pub fn new(
        status: &str,
        content_type: Option<&str>,
        body: impl Into<String>,
    ) -> Result<Self, Vec<RuleError>> {
        let mut errors = Vec::new();
        let code = parse_fixed_status(status).map_err(|e| errors.push(e)).ok();
        let content_type = content_type.map(str::to_ascii_lowercase);
        let action = code.map(|status| Self {
            status,
            content_type,
            body: body.into(),
        });
        match action {
            Some(a) => match a.validate() {
                Ok(()) if errors.is_empty() => Ok(a),
                Ok(()) => Err(errors),
                Err(e) => {
                    errors.push(e);
                    Err(errors)
                }
            },
            None => Err(errors),
        }
    }

    /// Checks status class, content type and body length.
    pub fn validate(&self) -> Result<(), RuleError> {
        if !matches!(self.status.as_u16() / 100, 2 | 4 | 5) {
            return Err(RuleError::InvalidFixedResponseStatus {
                value: self.status.as_str().to_owned(),
            });
        }
        if let Some(ct) = &self.content_type
            && !CONTENT_TYPES.contains(&ct.as_str())
        {
            return Err(RuleError::InvalidContentType { value: ct.clone() });
        }
        let chars = self.body.chars().count();
        if chars > MAX_BODY_CHARS {
            return Err(RuleError::BodyTooLong {
                chars,
                max: MAX_BODY_CHARS,
            });
        }
        Ok(())
    }
}

/// `^(2|4|5)\d\d$`.
fn parse_fixed_status(s: &str) -> Result<StatusCode, RuleError> {
    let bad = || RuleError::InvalidFixedResponseStatus {
        value: s.to_owned(),
    };
    let b = s.as_bytes();
    if b.len() != 3 || !matches!(b[0], b'2' | b'4' | b'5') || !b.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    StatusCode::from_bytes(b).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use std::net::{IpAddr, Ipv4Addr};

    fn req<'a>(
        headers: &'a HeaderMap,
        host: Option<&'a str>,
        path: &'a str,
        query: Option<&'a str>,
    ) -> RequestView<'a> {
        RequestView {
            method: "GET",
            host,
            path,
            query,
            headers,
            source_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    fn groups(spec: &[(&str, u32)]) -> Vec<WeightedGroup> {
        spec.iter()
            .map(|(n, w)| WeightedGroup {
                name: (*n).into(),
                weight: *w,
            })
            .collect()
    }

    fn parts(f: impl FnOnce(&mut RedirectParts)) -> RedirectParts {
        let mut p = RedirectParts::default();
        f(&mut p);
        p
    }

    #[test]
    fn choose_splits_in_proportion_to_weights() {
        let f = ForwardAction::new(groups(&[("api", 3), ("web", 1)]), None).unwrap();
        let mut counts = [0u32; 2];
        // Walk the whole random range evenly.
        for i in 0..4000u32 {
            let r = u32::try_from((u64::from(i) << 32) / 4000).unwrap();
            match f.choose(r) {
                "api" => counts[0] += 1,
                "web" => counts[1] += 1,
                other => panic!("unexpected group {other}"),
            }
        }
        assert_eq!(counts, [3000, 1000]);
        assert_eq!(f.choose(0), "api");
        assert_eq!(f.choose(u32::MAX), "web");
    }

    /// One group: `choose_with` answers what `choose` answers for every number, without
    /// drawing one; several: it draws and answers what `choose` does with that number.
    #[test]
    fn choose_with_draws_only_when_there_is_a_choice() {
        for weights in [&[("only", 1)][..], &[("only", 0)], &[("a", 1), ("b", 2)]] {
            let f = ForwardAction {
                groups: groups(weights),
                group_stickiness: None,
            };
            for r in [0, 1, u32::MAX / 3, u32::MAX / 2, u32::MAX] {
                let mut drawn = false;
                let chosen = f.choose_with(|| {
                    drawn = true;
                    r
                });
                assert_eq!(chosen, f.choose(r), "{weights:?} {r}");
                assert_eq!(drawn, weights.len() > 1, "{weights:?}");
            }
        }
    }

    #[test]
    fn a_zero_weight_group_is_never_chosen() {
        let f = ForwardAction::new(groups(&[("off", 0), ("on", 5)]), None).unwrap();
        for r in [0, 1, u32::MAX / 2, u32::MAX] {
            assert_eq!(f.choose(r), "on");
        }
    }

    #[test]
    fn forward_rejects_six_groups_weight_1000_all_zero_and_duplicates() {
        let six: Vec<_> = (0..6)
            .map(|i| WeightedGroup {
                name: format!("g{i}"),
                weight: 1,
            })
            .collect();
        assert_eq!(
            ForwardAction::new(six, None).unwrap_err(),
            vec![RuleError::TooManyTargetGroups { count: 6, max: 5 }]
        );
        assert_eq!(
            ForwardAction::new(groups(&[("a", 1000)]), None).unwrap_err(),
            vec![RuleError::WeightOutOfRange {
                group: "a".into(),
                weight: 1000
            }]
        );
        assert!(ForwardAction::new(groups(&[("a", 999)]), None).is_ok());
        assert_eq!(
            ForwardAction::new(groups(&[("a", 0), ("b", 0)]), None).unwrap_err(),
            vec![RuleError::AllWeightsZero]
        );
        assert_eq!(
            ForwardAction::new(groups(&[("a", 1), ("a", 2)]), None).unwrap_err(),
            vec![RuleError::DuplicateTargetGroup { name: "a".into() }]
        );
        assert_eq!(
            ForwardAction::new(vec![], None).unwrap_err(),
            vec![RuleError::NoTargetGroups]
        );
    }

    #[test]
    fn group_stickiness_is_one_second_to_seven_days() {
        let g = || groups(&[("a", 1)]);
        assert!(ForwardAction::new(g(), Some(Duration::from_secs(1))).is_ok());
        assert!(ForwardAction::new(g(), Some(Duration::from_secs(604_800))).is_ok());
        assert_eq!(
            ForwardAction::new(g(), Some(Duration::from_secs(604_801))).unwrap_err(),
            vec![RuleError::StickinessOutOfRange { seconds: 604_801 }]
        );
        assert!(ForwardAction::new(g(), Some(Duration::ZERO)).is_err());
    }

    #[test]
    fn target_groups_lists_forward_groups_only() {
        let f = Action::Forward(ForwardAction::new(groups(&[("a", 1), ("b", 2)]), None).unwrap());
        assert_eq!(f.target_groups().collect::<Vec<_>>(), ["a", "b"]);
        let fixed = Action::FixedResponse(FixedResponseAction::new("200", None, "").unwrap());
        assert_eq!(fixed.target_groups().count(), 0);
    }

    #[test]
    fn http_to_https_redirect_keeps_host_path_and_query() {
        let r = RedirectAction::new(
            RedirectStatus::Permanent,
            parts(|p| {
                p.protocol = Some("HTTPS".into());
                p.port = Some("443".into());
            }),
        )
        .unwrap();
        let h = HeaderMap::new();
        let req = req(&h, Some("Example.com:80"), "/a/b", Some("x=1&y=%20"));
        assert_eq!(
            r.location(&req, "http", 80),
            "https://Example.com:443/a/b?x=1&y=%20"
        );
        assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY);
    }

    #[test]
    fn path_placeholder_expands_without_its_leading_slash() {
        let r = RedirectAction::new(
            RedirectStatus::Found,
            parts(|p| p.path = Some("/v2/#{path}".into())),
        )
        .unwrap();
        let h = HeaderMap::new();
        let req = req(&h, Some("example.com"), "/users/7", None);
        assert_eq!(
            r.location(&req, "http", 8080),
            "http://example.com:8080/v2/users/7"
        );
        assert_eq!(r.status(), StatusCode::FOUND);
    }

    #[test]
    fn query_can_be_replaced_or_extended_and_empty_query_drops_the_question_mark() {
        let h = HeaderMap::new();
        let replaced = RedirectAction::new(
            RedirectStatus::Found,
            parts(|p| p.query = Some("?lang=en".into())),
        )
        .unwrap();
        let request = req(&h, Some("example.com"), "/", Some("a=1"));
        assert_eq!(
            replaced.location(&request, "http", 80),
            "http://example.com:80/?lang=en"
        );
        let extended = RedirectAction::new(
            RedirectStatus::Found,
            parts(|p| p.query = Some("#{query}&from=old".into())),
        )
        .unwrap();
        assert_eq!(
            extended.location(&request, "http", 80),
            "http://example.com:80/?a=1&from=old"
        );
        let moved = RedirectAction::new(
            RedirectStatus::Found,
            parts(|p| p.host = Some("new.#{host}".into())),
        )
        .unwrap();
        let no_query = req(&h, Some("example.com"), "/x", None);
        assert_eq!(
            moved.location(&no_query, "https", 443),
            "https://new.example.com:443/x"
        );
    }

    #[test]
    fn url_form_fills_components_and_keeps_defaults_for_missing_ones() {
        let h = HeaderMap::new();
        let request = req(&h, Some("example.com"), "/p", Some("q=1"));
        let full = RedirectAction::from_url(
            RedirectStatus::Permanent,
            "https://#{host}:443/#{path}?#{query}",
        )
        .unwrap();
        assert_eq!(
            full.location(&request, "http", 80),
            "https://example.com:443/p?q=1"
        );
        let host_only =
            RedirectAction::from_url(RedirectStatus::Permanent, "#{protocol}://other.example.org")
                .unwrap();
        assert_eq!(
            host_only.location(&request, "https", 8443),
            "https://other.example.org:8443/p?q=1"
        );
        assert!(RedirectAction::from_url(RedirectStatus::Found, "example.com/x").is_err());
    }

    #[test]
    fn location_never_downgrades_https_to_http() {
        let r = RedirectAction::new(
            RedirectStatus::Found,
            parts(|p| p.protocol = Some("HTTP".into())),
        )
        .unwrap();
        assert!(r.targets_plain_http());
        let h = HeaderMap::new();
        let request = req(&h, Some("example.com"), "/", None);
        assert_eq!(
            r.location(&request, "HTTPS", 443),
            "https://example.com:443/"
        );
        assert_eq!(r.location(&request, "http", 80), "http://example.com:80/");
    }

    #[test]
    fn redirect_that_changes_nothing_is_refused() {
        assert_eq!(
            RedirectAction::new(RedirectStatus::Found, RedirectParts::default()).unwrap_err(),
            vec![RuleError::SelfRedirect]
        );
        assert_eq!(
            RedirectAction::from_url(
                RedirectStatus::Found,
                "#{protocol}://#{host}:#{port}/#{path}?#{query}"
            )
            .unwrap_err(),
            vec![RuleError::SelfRedirect]
        );
    }

    #[test]
    fn redirect_to_the_listeners_own_protocol_and_port_loops() {
        let https_443 = RedirectAction::new(
            RedirectStatus::Permanent,
            parts(|p| {
                p.protocol = Some("HTTPS".into());
                p.port = Some("443".into());
            }),
        )
        .unwrap();
        assert!(https_443.loops_on("https", 443));
        assert!(!https_443.loops_on("http", 80));
        assert!(!https_443.loops_on("https", 8443));
        let to_http = RedirectAction::new(
            RedirectStatus::Found,
            parts(|p| p.protocol = Some("HTTP".into())),
        )
        .unwrap();
        assert!(to_http.loops_on("HTTP", 8080));
        let moved = RedirectAction::new(
            RedirectStatus::Found,
            parts(|p| {
                p.protocol = Some("HTTPS".into());
                p.path = Some("/new/#{path}".into());
            }),
        )
        .unwrap();
        assert!(!moved.loops_on("https", 443));
    }

    #[test]
    fn redirect_components_are_validated() {
        let bad = |f: fn(&mut RedirectParts)| {
            RedirectAction::new(RedirectStatus::Found, parts(f)).unwrap_err()
        };
        let component = |e: &[RuleError]| match e {
            [RuleError::InvalidRedirectComponent { component, .. }] => *component,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            component(&bad(|p| p.protocol = Some("ftp".into()))),
            "protocol"
        );
        assert_eq!(component(&bad(|p| p.port = Some("0".into()))), "port");
        assert_eq!(component(&bad(|p| p.port = Some("65536".into()))), "port");
        assert_eq!(
            component(&bad(|p| p.path = Some("no-slash".into()))),
            "path"
        );
        assert_eq!(component(&bad(|p| p.host = Some("#{hots}".into()))), "host");
        assert_eq!(component(&bad(|p| p.host = Some("a b".into()))), "host");
        assert!(RedirectStatus::parse("303").is_err());
        assert_eq!(
            RedirectStatus::parse("HTTP_301"),
            Ok(RedirectStatus::Permanent)
        );
    }

    #[test]
    fn fixed_response_status_must_be_2xx_4xx_or_5xx() {
        for ok in ["200", "204", "404", "503", "599"] {
            assert!(FixedResponseAction::new(ok, None, "").is_ok(), "{ok}");
        }
        for bad in ["302", "100", "600", "20", "2000", "abc"] {
            assert_eq!(
                FixedResponseAction::new(bad, None, "").unwrap_err(),
                vec![RuleError::InvalidFixedResponseStatus { value: bad.into() }]
            );
        }
    }

    #[test]
    fn fixed_response_content_type_must_be_one_of_five() {
        for ct in CONTENT_TYPES {
            assert!(FixedResponseAction::new("200", Some(ct), "x").is_ok());
        }
        assert_eq!(
            FixedResponseAction::new("200", Some("image/png"), "").unwrap_err(),
            vec![RuleError::InvalidContentType {
                value: "image/png".into()
            }]
        );
    }

    #[test]
    fn fixed_response_body_is_at_most_1024_characters() {
        assert!(FixedResponseAction::new("200", None, "é".repeat(1024)).is_ok());
        assert_eq!(
            FixedResponseAction::new("200", None, "x".repeat(1025)).unwrap_err(),
            vec![RuleError::BodyTooLong {
                chars: 1025,
                max: 1024
            }]
        );
    }
}
