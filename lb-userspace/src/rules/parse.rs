//! The `--rule` flag grammar (documented in the module doc of [`super`]).

use std::time::Duration;

use super::action::{
    Action, DEFAULT_WEIGHT, FixedResponseAction, ForwardAction, RedirectAction, RedirectParts,
    RedirectStatus, WeightedGroup,
};
use super::condition::{Condition, QueryValue, check_one};
use super::error::RuleError;
use super::{MAX_PRIORITY, MIN_PRIORITY, Rule};

/// One parsed `--rule` flag: which listener it belongs to, and the rule or default action.
#[derive(Debug, Clone)]
pub struct ParsedRule {
    /// Listener name (the first part of the spec).
    pub listener: String,
    /// The rule, or the listener's default action.
    pub rule: RuleOrDefault,
}

/// A listener rule or a listener's default action.
#[derive(Debug, Clone)]
pub enum RuleOrDefault {
    /// `LISTENER,priority=N,…`.
    Rule(Rule),
    /// `LISTENER,default,…`.
    Default(Action),
}

/// Parses one `--rule` flag value: `LISTENER,priority=N,CONDITION…,ACTION…` or
/// `LISTENER,default,ACTION…`. Errors name the offending part of the spec.
pub fn parse_rule(spec: &str) -> Result<ParsedRule, RuleError> {
    let parts = split_unescaped(spec, ',');
    let (listener_part, parts) = parts
        .split_first()
        .ok_or_else(|| RuleError::Syntax("the rule spec is empty".into()))?;
    let listener = unescape(listener_part.trim());
    if listener.is_empty() || listener_part.contains('=') {
        return Err(RuleError::Syntax(format!(
            "the spec must start with the listener name, e.g. `web,priority=10,path=/api/*,forward=api` (got `{listener_part}`)"
        )));
    }
    let mut errors = Vec::new();
    let mut b = Builder::default();
    for &part in parts {
        if let Err(e) = b.item(part) {
            errors.push(e.in_part(part));
        }
    }
    if !errors.is_empty() {
        return Err(RuleError::from_vec(errors));
    }
    let rule = b.finish()?;
    Ok(ParsedRule { listener, rule })
}

/// The parts of a `--rule` spec after the listener name, without its `priority=N` or
/// `default` part, as written (escapes kept): what a rule says, apart from which rule it is.
pub fn rule_body(spec: &str) -> String {
    let parts = split_unescaped(spec, ',');
    parts
        .iter()
        .skip(1)
        .filter(|p| {
            let p = p.trim_start();
            p != "default" && !p.starts_with("priority=")
        })
        .copied()
        .collect::<Vec<_>>()
        .join(",")
}

/// Accumulates the parts of one spec.
#[derive(Default)]
struct Builder<'a> {
    priority: Option<u32>,
    default: bool,
    conditions: Vec<Condition>,
    forward: Option<(&'a str, Vec<WeightedGroup>)>,
    stickiness: Option<(&'a str, Duration)>,
    /// `redirect=URL`: the part as written and the URL.
    redirect_url: Option<(&'a str, &'a str)>,
    redirect: RedirectParts,
    redirect_parts: Vec<&'a str>,
    status: Option<(&'a str, RedirectStatus)>,
    /// `fixed-response=STATUS`: the part as written and the status.
    fixed: Option<(&'a str, &'a str)>,
    content_type: Option<(&'a str, String)>,
    body: Option<(&'a str, String)>,
}

/// Sets `slot` once; a second time is an error naming the key.
fn once<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<(), RuleError> {
    if slot.is_some() {
        return Err(RuleError::Syntax(format!(
            "`{key}` is given more than once"
        )));
    }
    *slot = Some(value);
    Ok(())
}

impl<'a> Builder<'a> {
    fn item(&mut self, part: &'a str) -> Result<(), RuleError> {
        let part_trimmed = part.trim_start();
        let Some((key, raw)) = part_trimmed.split_once('=') else {
            return match part_trimmed.trim_end() {
                "default" if !self.default => {
                    self.default = true;
                    Ok(())
                }
                "default" => Err(RuleError::Syntax(
                    "`default` is given more than once".into(),
                )),
                _ => Err(RuleError::Syntax(
                    "expected KEY=VALUE (or `default`)".into(),
                )),
            };
        };
        let key = key.trim_end();
        match key {
            "priority" => {
                let n: u64 = raw
                    .trim()
                    .parse()
                    .map_err(|_| RuleError::Syntax(format!("priority {raw:?} is not a number")))?;
                let p = u32::try_from(n)
                    .ok()
                    .filter(|p| (MIN_PRIORITY..=MAX_PRIORITY).contains(p))
                    .ok_or(RuleError::PriorityOutOfRange { priority: n })?;
                once(&mut self.priority, key, p)
            }
            "host" | "host-header" => self.condition(Condition::HostHeader(values(raw))),
            "path" | "path-pattern" => self.condition(Condition::PathPattern(values(raw))),
            "method" | "http-request-method" => {
                self.condition(Condition::HttpRequestMethod(values(raw)))
            }
            "source-ip" => self.condition(Condition::SourceIp(values(raw))),
            "header" | "http-header" => {
                let Some((name, vals)) = split_once_unescaped(raw, ':') else {
                    return Err(RuleError::Syntax(
                        "write the header as NAME:VALUE|VALUE…, e.g. header=User-Agent:*Chrome*"
                            .into(),
                    ));
                };
                self.condition(Condition::HttpHeader {
                    name: unescape(name),
                    values: values(vals),
                })
            }
            "query" | "query-string" => {
                let items = split_unescaped(raw, '|')
                    .into_iter()
                    .map(|item| match split_once_unescaped(item, ':') {
                        Some((k, v)) => QueryValue {
                            key: (!k.is_empty()).then(|| unescape(k)),
                            value: unescape(v),
                        },
                        None => QueryValue {
                            key: None,
                            value: unescape(item),
                        },
                    })
                    .collect();
                self.condition(Condition::QueryString(items))
            }
            "forward" => {
                let groups = split_unescaped(raw, '|')
                    .into_iter()
                    .map(|item| match split_once_unescaped(item, ':') {
                        Some((name, w)) => {
                            let name = unescape(name);
                            let weight: u64 = w.trim().parse().map_err(|_| {
                                RuleError::Syntax(format!(
                                    "weight {w:?} of target group {name:?} is not a number"
                                ))
                            })?;
                            let weight =
                                u32::try_from(weight).map_err(|_| RuleError::WeightOutOfRange {
                                    group: name.clone(),
                                    weight,
                                })?;
                            Ok(WeightedGroup { name, weight })
                        }
                        None => Ok(WeightedGroup {
                            name: unescape(item),
                            weight: DEFAULT_WEIGHT,
                        }),
                    })
                    .collect::<Result<Vec<_>, RuleError>>()?;
                ForwardAction::new(groups.clone(), None).map_err(RuleError::from_vec)?;
                once(&mut self.forward, key, (part, groups))
            }
            "group-stickiness" => {
                let secs: u64 = raw.trim().parse().map_err(|_| {
                    RuleError::Syntax(format!(
                        "group-stickiness {raw:?} is not a number of seconds"
                    ))
                })?;
                let d = Duration::from_secs(secs);
                if !(super::MIN_GROUP_STICKINESS..=super::MAX_GROUP_STICKINESS).contains(&d) {
                    return Err(RuleError::StickinessOutOfRange { seconds: secs });
                }
                once(&mut self.stickiness, key, (part, d))
            }
            "redirect" => once(&mut self.redirect_url, key, (part, raw)),
            "redirect-protocol" => self.redirect_component(part, key, raw, |r| &mut r.protocol),
            "redirect-host" => self.redirect_component(part, key, raw, |r| &mut r.host),
            "redirect-port" => self.redirect_component(part, key, raw, |r| &mut r.port),
            "redirect-path" => self.redirect_component(part, key, raw, |r| &mut r.path),
            "redirect-query" => self.redirect_component(part, key, raw, |r| &mut r.query),
            "status" => {
                let s = RedirectStatus::parse(unescape(raw).trim())?;
                once(&mut self.status, key, (part, s))
            }
            "fixed-response" => {
                FixedResponseAction::new(raw.trim(), None, "").map_err(RuleError::from_vec)?;
                once(&mut self.fixed, key, (part, raw.trim()))
            }
            "content-type" => once(&mut self.content_type, key, (part, unescape(raw))),
            "body" => once(&mut self.body, key, (part, unescape(raw))),
            _ => Err(RuleError::Syntax(format!(
                "unknown key `{key}` (conditions: host, path, header, method, query, source-ip; actions: forward, redirect, fixed-response)"
            ))),
        }
    }

    fn condition(&mut self, c: Condition) -> Result<(), RuleError> {
        check_one(&c).map_err(RuleError::from_vec)?;
        self.conditions.push(c);
        Ok(())
    }

    fn redirect_component(
        &mut self,
        part: &'a str,
        key: &str,
        raw: &str,
        slot: fn(&mut RedirectParts) -> &mut Option<String>,
    ) -> Result<(), RuleError> {
        once(slot(&mut self.redirect), key, unescape(raw))?;
        self.redirect_parts.push(part);
        Ok(())
    }

    fn finish(self) -> Result<RuleOrDefault, RuleError> {
        let Self {
            priority,
            default,
            conditions,
            forward,
            stickiness,
            redirect_url,
            redirect,
            redirect_parts,
            status,
            fixed,
            content_type,
            body,
        } = self;
        let is_redirect = redirect_url.is_some() || !redirect_parts.is_empty();
        let chosen = usize::from(forward.is_some())
            + usize::from(is_redirect)
            + usize::from(fixed.is_some());
        if chosen == 0 {
            return Err(RuleError::Syntax(
                "the rule has no action: add forward=GROUP, redirect=URL or fixed-response=STATUS"
                    .into(),
            ));
        }
        if chosen > 1 {
            return Err(RuleError::Syntax(
                "a rule has exactly one action: choose one of forward, redirect and fixed-response"
                    .into(),
            ));
        }
        let stray = |part: Option<&str>, needs: &str| match part {
            Some(p) => Err(RuleError::Syntax(format!("`{p}` only applies to {needs}"))),
            None => Ok(()),
        };
        if forward.is_none() {
            stray(stickiness.map(|s| s.0), "forward")?;
        }
        if !is_redirect {
            stray(status.map(|s| s.0), "redirect")?;
        }
        if fixed.is_none() {
            stray(content_type.as_ref().map(|c| c.0), "fixed-response")?;
            stray(body.as_ref().map(|b| b.0), "fixed-response")?;
        }

        let action = if let Some((_, groups)) = forward {
            Action::Forward(
                ForwardAction::new(groups, stickiness.map(|s| s.1)).map_err(RuleError::from_vec)?,
            )
        } else if let Some((_, status)) = fixed {
            Action::FixedResponse(
                FixedResponseAction::new(
                    status,
                    content_type.as_ref().map(|c| c.1.as_str()),
                    body.map(|b| b.1).unwrap_or_default(),
                )
                .map_err(|e| {
                    // Status was checked with its part; what is left is content type or body.
                    let part = match e.first() {
                        Some(RuleError::InvalidContentType { .. }) => {
                            content_type.as_ref().map(|c| c.0)
                        }
                        _ => None,
                    };
                    let e = RuleError::from_vec(e);
                    match part {
                        Some(p) => e.in_part(p),
                        None => e,
                    }
                })?,
            )
        } else {
            let Some((_, status)) = status else {
                return Err(RuleError::Syntax(
                    "a redirect needs status=301 or status=302".into(),
                ));
            };
            let built = match redirect_url {
                Some((url_part, _)) if !redirect_parts.is_empty() => {
                    return Err(RuleError::Syntax(format!(
                        "use either `{url_part}` or redirect-* components, not both"
                    )));
                }
                Some((url_part, url)) => RedirectAction::from_url(status, &unescape(url))
                    .map_err(|e| RuleError::from_vec(e).in_part(url_part)),
                None => RedirectAction::new(status, redirect).map_err(RuleError::from_vec),
            };
            Action::Redirect(built?)
        };

        match (priority, default) {
            (Some(_), true) => Err(RuleError::Syntax(
                "a rule is either `priority=N` or `default`, not both".into(),
            )),
            (None, false) => Err(RuleError::Syntax(
                "say which rule this is: priority=N (1-50000) or default".into(),
            )),
            (None, true) if !conditions.is_empty() => Err(RuleError::Syntax(
                "the default rule cannot have conditions".into(),
            )),
            (None, true) => Ok(RuleOrDefault::Default(action)),
            (Some(p), false) => Rule::new(p, conditions, action)
                .map(RuleOrDefault::Rule)
                .map_err(RuleError::from_vec),
        }
    }
}

/// The `|`-separated values of a part, unescaped.
fn values(raw: &str) -> Vec<String> {
    split_unescaped(raw, '|')
        .into_iter()
        .map(unescape)
        .collect()
}

/// Splits on `sep` where it is not escaped by a backslash; pieces keep their escapes.
fn split_unescaped(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            out.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    out.push(&s[start..]);
    out
}

/// Splits at the first unescaped `sep`.
fn split_once_unescaped(s: &str, sep: char) -> Option<(&str, &str)> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            return Some((&s[..i], &s[i + c.len_utf8()..]));
        }
    }
    None
}

/// Resolves the flag-level escapes `\,` `\|` `\:` `\\`; other backslashes stay as written.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\'
            && let Some(&next) = chars.peek()
            && matches!(next, ',' | '|' | ':' | '\\')
        {
            out.push(next);
            chars.next();
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{RequestView, RuleSet};
    use http::{HeaderMap, StatusCode};
    use std::net::{IpAddr, Ipv4Addr};

    fn rule(spec: &str) -> Rule {
        match parse_rule(spec)
            .unwrap_or_else(|e| panic!("{spec}: {e}"))
            .rule
        {
            RuleOrDefault::Rule(r) => r,
            RuleOrDefault::Default(_) => panic!("{spec}: parsed as default"),
        }
    }

    fn default_action(spec: &str) -> Action {
        match parse_rule(spec)
            .unwrap_or_else(|e| panic!("{spec}: {e}"))
            .rule
        {
            RuleOrDefault::Default(a) => a,
            RuleOrDefault::Rule(_) => panic!("{spec}: parsed as rule"),
        }
    }

    fn error(spec: &str) -> String {
        match parse_rule(spec) {
            Ok(p) => panic!("{spec} accepted: {:?}", p.rule),
            Err(e) => e.to_string(),
        }
    }

    fn req<'a>(h: &'a HeaderMap, path: &'a str, query: Option<&'a str>) -> RequestView<'a> {
        RequestView {
            method: "GET",
            host: Some("api.example.org"),
            path,
            query,
            headers: h,
            source_ip: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
        }
    }

    #[test]
    fn full_rule_parses_into_the_listener_conditions_and_action() {
        let parsed = parse_rule(
            "web,priority=10,host=*.example.org,path=/api/*,\
             header=User-Agent:*Chrome*,method=GET,source-ip=10.0.0.0/8,\
             forward=api:3|web:1,group-stickiness=3600",
        )
        .unwrap();
        assert_eq!(parsed.listener, "web");
        let RuleOrDefault::Rule(r) = parsed.rule else {
            panic!("not a rule")
        };
        assert_eq!(r.priority, 10);
        assert_eq!(r.conditions().len(), 5);
        assert_eq!(
            r.conditions()[2],
            Condition::HttpHeader {
                name: "User-Agent".into(),
                values: vec!["*Chrome*".into()]
            }
        );
        let Action::Forward(f) = &r.action else {
            panic!("not forward")
        };
        assert_eq!(
            f.groups,
            [
                WeightedGroup {
                    name: "api".into(),
                    weight: 3
                },
                WeightedGroup {
                    name: "web".into(),
                    weight: 1
                }
            ]
        );
        assert_eq!(f.group_stickiness, Some(Duration::from_secs(3600)));

        let mut h = HeaderMap::new();
        h.insert("user-agent", "x Chrome y".parse().unwrap());
        assert!(r.matches(&req(&h, "/api/users", None)));
        assert!(!r.matches(&req(&h, "/other", None)));
    }

    #[test]
    fn default_rule_has_an_action_and_no_conditions() {
        let a = default_action("web,default,fixed-response=404,content-type=text/plain,body=nope");
        let Action::FixedResponse(f) = a else {
            panic!("not fixed")
        };
        assert_eq!(f.status, StatusCode::NOT_FOUND);
        assert_eq!(f.content_type.as_deref(), Some("text/plain"));
        assert_eq!(f.body, "nope");
        assert!(error("web,default,path=/x,forward=a").contains("cannot have conditions"));
        assert!(error("web,default,priority=3,forward=a").contains("not both"));
    }

    #[test]
    fn escapes_let_values_hold_commas_pipes_colons_and_backslashes() {
        let a = default_action(r"web,default,fixed-response=200,body=a\, b \| c \\ d\: e");
        let Action::FixedResponse(f) = a else {
            panic!("not fixed")
        };
        assert_eq!(f.body, r"a, b | c \ d: e");
        // An escaped pipe inside a path value is not a value separator.
        let r = rule(r"web,priority=1,header=X-Tag:a\|b|c,forward=x");
        assert_eq!(
            r.conditions()[0],
            Condition::HttpHeader {
                name: "X-Tag".into(),
                values: vec!["a|b".into(), "c".into()]
            }
        );
    }

    #[test]
    fn path_with_a_pipe_is_still_rejected_by_alb_character_rules() {
        // `|` is escaped correctly for the flag, but ALB does not allow it in a path pattern.
        let e = error(r"web,priority=1,path=/a\|b,forward=x");
        assert!(e.contains("path-pattern"), "{e}");
    }

    #[test]
    fn query_condition_forms_with_key_without_key_and_escaped_star() {
        let r = rule(r"web,priority=1,query=version:v1|:debug|trace,query=q:a\*,forward=x");
        assert_eq!(
            r.conditions()[0],
            Condition::QueryString(vec![
                QueryValue {
                    key: Some("version".into()),
                    value: "v1".into()
                },
                QueryValue {
                    key: None,
                    value: "debug".into()
                },
                QueryValue {
                    key: None,
                    value: "trace".into()
                },
            ])
        );
        let h = HeaderMap::new();
        assert!(r.matches(&req(&h, "/", Some("mode=debug&q=a*"))));
        assert!(!r.matches(&req(&h, "/", Some("mode=debug&q=ab"))));
    }

    #[test]
    fn redirect_url_form_and_component_form_agree() {
        let h = HeaderMap::new();
        let request = req(&h, "/p", Some("q=1"));
        let url =
            rule("web,priority=1,path=/p,redirect=https://#{host}:443/#{path}?#{query},status=301");
        let parts = rule(
            "web,priority=2,path=/p,redirect-protocol=HTTPS,redirect-port=443,status=HTTP_301",
        );
        for r in [&url, &parts] {
            let Action::Redirect(a) = &r.action else {
                panic!("not redirect")
            };
            assert_eq!(
                a.location(&request, "http", 80),
                "https://api.example.org:443/p?q=1"
            );
            assert_eq!(a.status(), StatusCode::MOVED_PERMANENTLY);
        }
    }

    #[test]
    fn redirect_needs_a_status_and_must_change_something() {
        assert!(error("web,priority=1,path=/x,redirect-port=443").contains("status=301"));
        let e =
            error("web,default,redirect=#{protocol}://#{host}:#{port}/#{path}?#{query},status=302");
        assert!(e.contains("redirect to itself"), "{e}");
        assert!(
            error("web,default,redirect=https://x.example.com,redirect-port=1,status=302")
                .contains("not both")
        );
    }

    #[test]
    fn errors_name_the_offending_part() {
        let e = error("web,priority=70000,path=/x,forward=a");
        assert_eq!(e, "in `priority=70000`: priority 70000 is outside 1-50000");
        let e = error("web,priority=1,host=example,forward=a");
        assert!(
            e.starts_with("in `host=example`: host-header value \"example\""),
            "{e}"
        );
        let e = error("web,priority=1,path=/x,forward=a:1000");
        assert!(e.starts_with("in `forward=a:1000`: weight 1000"), "{e}");
        let e = error("web,priority=1,path=/x,fixed-response=302");
        assert!(e.starts_with("in `fixed-response=302`"), "{e}");
        let e = error("web,default,fixed-response=200,content-type=image/png");
        assert!(e.starts_with("in `content-type=image/png`"), "{e}");
        let e = error("web,priority=1,colour=red,forward=a");
        assert!(e.contains("unknown key `colour`"), "{e}");
        let e = error("web,priority=1,path=/x,forward=a,status=301");
        assert!(e.contains("`status=301` only applies to redirect"), "{e}");
    }

    #[test]
    fn rule_level_limits_are_enforced_after_parsing() {
        let e = error(
            "web,priority=1,path=/a|/b|/c,host=a.example.com|b.example.com|c.example.com,forward=x",
        );
        assert!(e.contains("6 condition values"), "{e}");
        let e = error("web,priority=1,path=/a|/b|/c|/d,forward=x");
        assert!(e.contains("4 values"), "{e}");
        let e = error("web,priority=1,path=/*/*/*,host=*.ex?m*le.com,forward=x");
        assert!(e.contains("6 wildcards"), "{e}");
        let e = error("web,priority=1,path=/a,path=/b,forward=x");
        assert!(e.contains("only once"), "{e}");
        assert!(error("web,priority=1,forward=x").contains("at least one condition"));
    }

    #[test]
    fn action_count_and_shape_are_checked() {
        assert!(error("web,priority=1,path=/x").contains("no action"));
        assert!(
            error("web,priority=1,path=/x,forward=a,fixed-response=200").contains("exactly one")
        );
        assert!(error("web,priority=1,path=/x,forward=a|b|c|d|e|f").contains("6 target groups"));
        assert!(error("web,path=/x,forward=a").contains("priority=N"));
        assert!(error("priority=1,path=/x,forward=a").contains("listener name"));
        let long = format!("web,default,fixed-response=200,body={}", "x".repeat(1025));
        let e = error(&long);
        assert!(e.contains("1025 characters"), "{e}");
    }

    #[test]
    fn module_doc_examples_parse() {
        for spec in [
            "web,priority=10,host=api.example.com,path=/v1/*,forward=v1:9|v2:1,group-stickiness=3600",
            "web,priority=20,header=X-Canary:yes,method=GET|HEAD,forward=canary",
            r"web,default,fixed-response=404,content-type=text/plain,body=no route\, sorry",
            "plain,default,redirect-protocol=HTTPS,redirect-port=443,status=301",
        ] {
            parse_rule(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
        }
    }

    #[test]
    fn parsed_rules_build_a_rule_set() {
        let specs = [
            "web,priority=20,path=/api/*,forward=broad",
            "web,priority=10,path=/api/v2/*,forward=narrow",
            "web,default,fixed-response=404",
        ];
        let mut rules = Vec::new();
        let mut default = None;
        for s in specs {
            match parse_rule(s).unwrap().rule {
                RuleOrDefault::Rule(r) => rules.push(r),
                RuleOrDefault::Default(a) => default = Some(a),
            }
        }
        let set = RuleSet::new(rules, default.unwrap()).unwrap();
        let h = HeaderMap::new();
        assert_eq!(set.evaluate(&req(&h, "/api/v2/x", None)).priority, 10);
        assert_eq!(set.evaluate(&req(&h, "/api/v1", None)).priority, 20);
        let m = set.evaluate(&req(&h, "/", None));
        assert_eq!(m.priority, 0);
        assert_eq!(m.action.kind(), "fixed-response");
    }
}
