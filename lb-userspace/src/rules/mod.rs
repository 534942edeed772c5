//! ALB listener rules: conditions, actions, priority order, and the `--rule` flag grammar.
//!
//! Pure logic, no I/O. The HTTP server builds a [`RequestView`] per request and asks the
//! listener's [`RuleSet`] which [`Action`] applies; everything is validated and compiled when
//! the configuration is loaded, so [`RuleSet::evaluate`] allocates nothing.
//!
//! # API
//!
//! ```text
//! RequestView<'a> { method, host, path, query, headers, source_ip }   borrowed request facts
//! parse_rule(spec) -> Result<ParsedRule { listener, rule: RuleOrDefault }, RuleError>
//! Rule::new(priority, Vec<Condition>, Action) -> Result<Rule, Vec<RuleError>>
//! RuleSet::new(Vec<Rule>, default: Action) -> Result<RuleSet, Vec<RuleError>>
//! RuleSet::validate_for_listener(&self, "http" | "https", port) -> Result<(), Vec<RuleError>>
//! RuleSet::evaluate(&self, &RequestView) -> Matched<&Action> { priority (0 = default), action, rules_evaluated, index }
//! ResolvedRuleSet::new(RuleSet, lookup) / ::evaluate(&RequestView) -> Matched<ResolvedAction>   what a listener stores
//! ResolvedAction::{Forward(ResolvedForward { action, .. }), Redirect, FixedResponse};  ResolvedForward::group(i) -> Option<(&group, cookie)>
//! Action::{Forward(ForwardAction), Redirect(RedirectAction), FixedResponse(FixedResponseAction)}
//! Action::target_groups() / Action::kind()            config checks, access-log actions_executed
//! ForwardAction::choose(random: u32) -> &str          weighted pick; caller supplies randomness
//! RedirectAction::location(&req, listener_protocol, listener_port) -> String;  ::status()
//! FixedResponseAction { status, content_type, body }
//! ```
//!
//! # Matching (as AWS ALB)
//!
//! Rules are tried by ascending priority (1–50,000, unique per listener); the first whose
//! conditions all hold wins; otherwise the default action applies, reported as priority 0.
//! Conditions are ANDed, the values of one condition ORed. Per rule: at most 3 values per
//! condition, 5 values and 5 wildcards in total; `host-header`, `path-pattern`,
//! `http-request-method` and `source-ip` at most once, `http-header` and `query-string` repeatable.
//!
//! | condition | compared with | case | wildcards |
//! |---|---|---|---|
//! | host-header | `Host`/`:authority`, port stripped | insensitive | `*` `?` |
//! | path-pattern | the path as received (never the query) | **sensitive** | `*` `?` |
//! | http-header | every value of the named header (any may match) | insensitive | values only |
//! | http-request-method | the method | **sensitive**, exact | none |
//! | query-string | each `&`-separated pair, percent-decoded | insensitive | `*` `?` (`\*` `\?` literal) |
//! | source-ip | the TCP peer (never X-Forwarded-For) | – | none (CIDR) |
//!
//! `*` matches zero or more characters, `?` exactly one, so `*.example.com` does not match
//! `example.com`. Case folding is ASCII. Decisions where AWS documents nothing:
//! - A query part without `=` (`?debug`) is a value with no key: only key-less conditions
//!   match it. `+` is not decoded to a space (RFC 3986); malformed `%` escapes are literal.
//! - An IPv4-mapped IPv6 peer (`::ffff:10.1.2.3`, what a dual-stack socket reports for an IPv4
//!   client) is matched as its IPv4 address; an IPv4 block never matches a genuine IPv6 peer.
//! - A CIDR with host bits set (`10.0.0.1/8`) is refused rather than silently masked.
//! - The path is matched as received (percent-encoded, not normalised); ALB's path-pattern
//!   alphabet has no `%`, so encoded characters can only be matched by wildcards.
//! - Header values are matched one header line at a time (a comma-separated list in one line is
//!   one value).
//!
//! # Actions
//!
//! - forward: 1–5 target groups, weights 0–999 (at least one above 0; default 1), optional
//!   group stickiness 1 s – 7 days.
//! - redirect: status 301/302 (required: ALB has no default), components default to
//!   `#{protocol}`, `#{host}`, `#{port}`, `/#{path}`, `#{query}`; `#{path}` expands without its
//!   leading `/`. A redirect leaving every component at its default is refused.
//!   [`RuleSet::validate_for_listener`] refuses HTTPS→HTTP and redirects that resolve to the
//!   requested URL on that listener (HTTPS:443 redirecting to `HTTPS` port `443`); config must
//!   call it. [`RedirectAction::location`] never downgrades a request that arrived over HTTPS
//!   whatever the configuration says.
//! - fixed-response: status `^(2|4|5)\d\d$`, content type one of text/plain, text/css,
//!   text/html, application/javascript, application/json, body at most 1024 characters.
//!
//! # The `--rule` flag
//!
//! ```text
//! --rule LISTENER,priority=N,CONDITION...,ACTION[,ACTION-OPTION...]
//! --rule LISTENER,default,ACTION[,ACTION-OPTION...]
//! ```
//!
//! Parts are separated by `,`, values within a part by `|`. Conditions (long ALB names accepted
//! too: `host-header=`, `path-pattern=`, `http-header=`, `http-request-method=`, `query-string=`):
//!
//! ```text
//! host=a.example.com|*.example.org
//! path=/api/*|/v?/x
//! header=User-Agent:*Chrome*|*Safari*        NAME:VALUE|VALUE...   (repeatable)
//! method=GET|HEAD
//! query=version:v1|:debug|debug              KEY:VALUE, or :VALUE / VALUE for any key (repeatable)
//! source-ip=10.0.0.0/8|2001:db8::/32
//! ```
//!
//! Actions (exactly one):
//!
//! ```text
//! forward=web                      forward=api:3|web:1       [group-stickiness=SECONDS]
//! redirect=https://#{host}:443/#{path}?#{query},status=301
//! redirect-protocol=HTTPS,redirect-port=443,status=301       (also redirect-host/-path/-query)
//! fixed-response=404[,content-type=text/plain][,body=Not here]
//! ```
//!
//! `status` is `301`, `302`, `HTTP_301` or `HTTP_302`. A URL-form redirect may leave out
//! components (`https://example.com` keeps the request's port, path and query); it cannot be
//! mixed with `redirect-*` components.
//!
//! Escapes: `\,` `\|` `\:` `\\` stand for `,` `|` `:` `\`; any other backslash is kept as
//! written, so a query-string condition's own `\*` (literal star) passes through unchanged.
//! Example: `body=a\, b \| c` is the body `a, b | c`. Whitespace before a key is ignored;
//! values are taken exactly. Every error names the part of the spec it comes from.
//!
//! ```text
//! --rule 'web,priority=10,host=api.example.com,path=/v1/*,forward=v1:9|v2:1,group-stickiness=3600'
//! --rule 'web,priority=20,header=X-Canary:yes,method=GET|HEAD,forward=canary'
//! --rule 'web,default,fixed-response=404,content-type=text/plain,body=no route\, sorry'
//! --rule 'plain,default,redirect-protocol=HTTPS,redirect-port=443,status=301'
//! ```

mod action;
mod book;
mod condition;
mod error;
mod parse;
mod pattern;
mod resolved;

use std::net::IpAddr;

pub use action::{
    Action, CONTENT_TYPES, DEFAULT_WEIGHT, FixedResponseAction, ForwardAction, MAX_BODY_CHARS,
    MAX_GROUP_STICKINESS, MAX_TARGET_GROUPS_PER_FORWARD, MAX_WEIGHT, MIN_GROUP_STICKINESS,
    RedirectAction, RedirectParts, RedirectStatus, WeightedGroup,
};
pub use book::RuleBook;
pub use condition::{
    Condition, MAX_VALUES_PER_CONDITION, MAX_VALUES_PER_RULE, MAX_WILDCARDS_PER_RULE, QueryValue,
};
pub use error::RuleError;
pub use parse::{ParsedRule, RuleOrDefault, parse_rule, rule_body};
pub use resolved::{GROUP_COOKIE, ResolvedAction, ResolvedForward, ResolvedGroup, ResolvedRuleSet};

/// Lowest rule priority (evaluated first).
pub const MIN_PRIORITY: u32 = 1;
/// Highest rule priority (ALB: 50,000).
pub const MAX_PRIORITY: u32 = 50_000;
/// The priority the default rule is reported with (access log `matched_rule_priority`).
pub const DEFAULT_RULE_PRIORITY: u32 = 0;

/// What the engine needs to know about a request; borrowed, so evaluation allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Request method, e.g. `GET` (matched case-sensitively).
    pub method: &'a str,
    /// `Host` header or `:authority`, possibly with `:port` (stripped before matching).
    pub host: Option<&'a str>,
    /// Path only, no query, as received (percent-encoded).
    pub path: &'a str,
    /// Raw query string without `?`, percent-encoded as received.
    pub query: Option<&'a str>,
    /// Request headers.
    pub headers: &'a http::HeaderMap,
    /// TCP peer address, never X-Forwarded-For.
    pub source_ip: IpAddr,
}

/// One listener rule: a priority, conditions (all must hold) and an action.
#[derive(Debug, Clone)]
pub struct Rule {
    /// 1–50,000, unique per listener; lower is evaluated first.
    pub priority: u32,
    /// The conditions as configured (for display and the admin API).
    conditions: Vec<Condition>,
    /// The same conditions validated and compiled, cheapest first.
    compiled: Box<[condition::Compiled]>,
    /// What to do with a matching request.
    pub action: Action,
}

impl Rule {
    /// A validated rule: priority in range, at least one condition, ALB's per-condition and
    /// per-rule limits, valid values, valid action. Returns every problem found.
    pub fn new(
        priority: u32,
        conditions: Vec<Condition>,
        action: Action,
    ) -> Result<Self, Vec<RuleError>> {
        let mut errors = Vec::new();
        if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&priority) {
            errors.push(RuleError::PriorityOutOfRange {
                priority: u64::from(priority),
            });
        }
        let compiled = condition::compile(&conditions).map_err(|mut e| errors.append(&mut e));
        if let Err(mut e) = action.validate() {
            errors.append(&mut e);
        }
        match compiled {
            Ok(compiled) if errors.is_empty() => Ok(Self {
                priority,
                conditions,
                compiled,
                action,
            }),
            _ => Err(errors),
        }
    }

    /// The conditions as configured.
    pub fn conditions(&self) -> &[Condition] {
        &self.conditions
    }

    /// Whether every condition holds for `req`.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.compiled.iter().all(|c| c.matches(req))
    }
}

/// All rules of one listener plus its default action, sorted, validated, patterns compiled.
#[derive(Debug, Clone)]
pub struct RuleSet {
    /// Sorted by ascending priority.
    rules: Vec<Rule>,
    default: Action,
}

// Rule sets are shared across connection tasks (behind an `Arc`, swapped on reload).
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<RuleSet>();
};

/// The outcome of evaluating a request: which rule matched, and its action as `A`: the
/// configured `&Action` from [`RuleSet::evaluate`], a [`ResolvedAction`] (a forward with its
/// resolved groups) from [`ResolvedRuleSet::evaluate`]. One type for both, so the two
/// evaluations cannot disagree on what else a match says.
#[derive(Debug, Clone, Copy)]
pub struct Matched<A> {
    /// The matching rule's priority, or 0 for the default rule.
    pub priority: u32,
    /// The action to perform.
    pub action: A,
    /// How many non-default rules were tried, the matching one included (for RuleEvaluations).
    pub rules_evaluated: u32,
    /// The action's position: the matching rule's index in [`RuleSet::rules`], or
    /// [`RuleSet::len`] for the default.
    pub index: usize,
}

impl RuleSet {
    /// Validates (priorities 1–50,000 and unique, every action valid) and sorts the rules.
    /// Returns every problem found.
    pub fn new(mut rules: Vec<Rule>, default: Action) -> Result<Self, Vec<RuleError>> {
        let mut errors = Vec::new();
        rules.sort_by_key(|r| r.priority);
        for (i, rule) in rules.iter().enumerate() {
            if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&rule.priority) {
                errors.push(RuleError::PriorityOutOfRange {
                    priority: u64::from(rule.priority),
                });
            }
            if i > 0
                && rules[i - 1].priority == rule.priority
                && (i < 2 || rules[i - 2].priority != rule.priority)
            {
                errors.push(RuleError::DuplicatePriority {
                    priority: rule.priority,
                });
            }
            if let Err(mut e) = rule.action.validate() {
                errors.append(&mut e);
            }
        }
        if let Err(mut e) = default.validate() {
            errors.append(&mut e);
        }
        if errors.is_empty() {
            Ok(Self { rules, default })
        } else {
            Err(errors)
        }
    }

    /// Checks the redirects against the listener they are attached to, as ALB does: an HTTPS
    /// listener cannot redirect to HTTP, and no redirect may resolve to the requested URL
    /// itself (e.g. `redirect-protocol=HTTPS,redirect-port=443` on the HTTPS:443 listener).
    pub fn validate_for_listener(
        &self,
        listener_protocol: &str,
        listener_port: u16,
    ) -> Result<(), Vec<RuleError>> {
        let https = listener_protocol.eq_ignore_ascii_case("https");
        let mut errors = Vec::new();
        let actions = self
            .rules
            .iter()
            .map(|r| (r.priority, &r.action))
            .chain([(DEFAULT_RULE_PRIORITY, &self.default)]);
        for (priority, action) in actions {
            let Action::Redirect(r) = action else {
                continue;
            };
            if https && r.targets_plain_http() {
                errors.push(RuleError::RedirectDowngrade { priority });
            } else if r.loops_on(listener_protocol, listener_port) {
                errors.push(RuleError::RedirectLoop { priority });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// First matching rule by ascending priority, else the default (priority 0).
    pub fn evaluate(&self, req: &RequestView<'_>) -> Matched<&Action> {
        let mut evaluated = 0;
        for (index, rule) in self.rules.iter().enumerate() {
            evaluated += 1;
            if rule.matches(req) {
                return Matched {
                    priority: rule.priority,
                    action: &rule.action,
                    rules_evaluated: evaluated,
                    index,
                };
            }
        }
        Matched {
            priority: DEFAULT_RULE_PRIORITY,
            action: &self.default,
            rules_evaluated: evaluated,
            index: self.rules.len(),
        }
    }

    /// Number of non-default rules (for RuleEvaluations metrics).
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether the listener has only its default rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The non-default rules, by ascending priority.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The default action.
    pub fn default_action(&self) -> &Action {
        &self.default
    }

    /// Every action of the listener, default included (config checks target groups exist), in
    /// the order [`Matched::index`] counts: the rules by ascending priority, then the default.
    pub fn actions(&self) -> impl Iterator<Item = &Action> {
        self.rules
            .iter()
            .map(|r| &r.action)
            .chain(std::iter::once(&self.default))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use http::HeaderMap;
    use std::net::Ipv4Addr;

    fn forward(group: &str) -> Action {
        Action::Forward(
            ForwardAction::new(
                vec![WeightedGroup {
                    name: group.into(),
                    weight: 1,
                }],
                None,
            )
            .unwrap(),
        )
    }

    fn path_rule(priority: u32, pattern: &str, group: &str) -> Rule {
        Rule::new(
            priority,
            vec![Condition::PathPattern(vec![pattern.into()])],
            forward(group),
        )
        .unwrap()
    }

    fn request<'a>(headers: &'a HeaderMap, path: &'a str) -> RequestView<'a> {
        RequestView {
            method: "GET",
            host: Some("example.com"),
            path,
            query: None,
            headers,
            source_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    fn group_of<'a>(m: &Matched<&'a Action>) -> Vec<&'a str> {
        m.action.target_groups().collect()
    }

    #[test]
    fn lowest_priority_wins_whatever_the_insertion_order() {
        let set = RuleSet::new(
            vec![
                path_rule(20, "/api/*", "broad"),
                path_rule(10, "/api/v2/*", "narrow"),
            ],
            forward("fallback"),
        )
        .unwrap();
        let h = HeaderMap::new();
        let m = set.evaluate(&request(&h, "/api/v2/x"));
        assert_eq!((m.priority, group_of(&m)), (10, vec!["narrow"]));
        assert_eq!(m.rules_evaluated, 1);
        let m = set.evaluate(&request(&h, "/api/v1/x"));
        assert_eq!((m.priority, group_of(&m)), (20, vec!["broad"]));
        assert_eq!(m.rules_evaluated, 2);
    }

    #[test]
    fn default_applies_last_with_priority_zero() {
        let set = RuleSet::new(vec![path_rule(1, "/a", "a")], forward("fallback")).unwrap();
        let h = HeaderMap::new();
        let m = set.evaluate(&request(&h, "/b"));
        assert_eq!(m.priority, 0);
        assert_eq!(group_of(&m), ["fallback"]);
        assert_eq!(m.rules_evaluated, 1);
        assert_eq!(set.len(), 1);
        let empty = RuleSet::new(vec![], forward("only")).unwrap();
        let m = empty.evaluate(&request(&h, "/"));
        assert_eq!((m.priority, m.rules_evaluated), (0, 0));
        assert!(empty.is_empty());
    }

    #[test]
    fn all_conditions_of_a_rule_must_hold() {
        let rule = Rule::new(
            5,
            vec![
                Condition::PathPattern(vec!["/admin*".into()]),
                Condition::HttpRequestMethod(vec!["POST".into()]),
            ],
            forward("admin"),
        )
        .unwrap();
        let set = RuleSet::new(vec![rule], forward("fallback")).unwrap();
        let h = HeaderMap::new();
        assert_eq!(set.evaluate(&request(&h, "/admin/x")).priority, 0);
        let post = RequestView {
            method: "POST",
            ..request(&h, "/admin/x")
        };
        assert_eq!(set.evaluate(&post).priority, 5);
    }

    #[test]
    fn priority_outside_1_to_50000_is_rejected() {
        for p in [0, 50_001, 70_000] {
            let e = Rule::new(
                p,
                vec![Condition::PathPattern(vec!["/".into()])],
                forward("a"),
            )
            .unwrap_err();
            assert_eq!(
                e,
                vec![RuleError::PriorityOutOfRange {
                    priority: u64::from(p)
                }]
            );
        }
        assert_eq!(
            RuleError::PriorityOutOfRange { priority: 70_000 }.to_string(),
            "priority 70000 is outside 1-50000"
        );
        assert!(path_rule(50_000, "/", "a").priority == 50_000);
    }

    #[test]
    fn duplicate_priority_is_rejected_once() {
        let e = RuleSet::new(
            vec![
                path_rule(7, "/a", "a"),
                path_rule(7, "/b", "b"),
                path_rule(7, "/c", "c"),
                path_rule(8, "/d", "d"),
            ],
            forward("f"),
        )
        .unwrap_err();
        assert_eq!(e, vec![RuleError::DuplicatePriority { priority: 7 }]);
    }

    #[test]
    fn ruleset_validates_public_action_fields() {
        let mut bad = forward("x");
        if let Action::Forward(f) = &mut bad {
            f.groups[0].weight = 1000;
        }
        assert!(RuleSet::new(vec![], bad).is_err());
    }

    #[test]
    fn https_listener_refuses_redirects_to_http_and_http_listener_sees_a_loop() {
        let to_http = Action::Redirect(
            RedirectAction::new(
                RedirectStatus::Found,
                RedirectParts {
                    protocol: Some("HTTP".into()),
                    ..RedirectParts::default()
                },
            )
            .unwrap(),
        );
        let rule = Rule::new(
            3,
            vec![Condition::PathPattern(vec!["/old".into()])],
            to_http.clone(),
        )
        .unwrap();
        let set = RuleSet::new(vec![rule], to_http).unwrap();
        assert_eq!(
            set.validate_for_listener("HTTPS", 443).unwrap_err(),
            vec![
                RuleError::RedirectDowngrade { priority: 3 },
                RuleError::RedirectDowngrade { priority: 0 }
            ]
        );
        // On an HTTP listener the same redirect changes nothing at all.
        assert_eq!(
            set.validate_for_listener("http", 8080).unwrap_err(),
            vec![
                RuleError::RedirectLoop { priority: 3 },
                RuleError::RedirectLoop { priority: 0 }
            ]
        );
    }

    #[test]
    fn https_redirect_is_fine_on_port_80_but_loops_on_the_https_443_listener() {
        let upgrade = Action::Redirect(
            RedirectAction::from_url(RedirectStatus::Permanent, "HTTPS://#{host}:443").unwrap(),
        );
        let set = RuleSet::new(vec![], upgrade).unwrap();
        assert!(set.validate_for_listener("http", 80).is_ok());
        assert_eq!(
            set.validate_for_listener("https", 443).unwrap_err(),
            vec![RuleError::RedirectLoop { priority: 0 }]
        );
        assert!(set.validate_for_listener("https", 8443).is_ok());
    }

    /// Counts heap allocations made by the current thread (a pass-through to the system
    /// allocator, so other tests in this binary are unaffected). The library's other
    /// allocation tests use it too.
    pub(crate) mod allocations {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            static COUNT: Cell<u64> = const { Cell::new(0) };
        }

        struct Counting;

        fn bump() {
            // `try_with`: the thread-local may already be gone while a thread shuts down.
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        }

        // SAFETY: every method forwards its arguments unchanged to `System`, which upholds
        // the GlobalAlloc contract; counting touches only a const-initialised thread-local.
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                bump();
                // SAFETY: same contract as our caller's.
                unsafe { System.alloc(layout) }
            }
            unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
                bump();
                // SAFETY: same contract as our caller's.
                unsafe { System.alloc_zeroed(layout) }
            }
            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                bump();
                // SAFETY: same contract as our caller's.
                unsafe { System.realloc(ptr, layout, new_size) }
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                // SAFETY: same contract as our caller's.
                unsafe { System.dealloc(ptr, layout) }
            }
        }

        #[global_allocator]
        static COUNTING: Counting = Counting;

        /// Allocations made so far by this thread.
        pub(crate) fn so_far() -> u64 {
            COUNT.with(Cell::get)
        }
    }

    #[test]
    fn evaluate_does_not_allocate() {
        let mut specs: Vec<Rule> = [
            "web,priority=1,host=*.example.org|api.example.com,path=/v?/*,forward=a",
            "web,priority=2,header=User-Agent:*bot*,header=X-Env:canary,forward=a",
            "web,priority=3,query=version:v*|:debug,method=POST,forward=a",
            "web,priority=4,source-ip=10.0.0.0/8|2001:db8::/32,forward=a",
        ]
        .iter()
        .map(|s| match parse_rule(s).unwrap().rule {
            RuleOrDefault::Rule(r) => r,
            RuleOrDefault::Default(_) => unreachable!("specs are rules"),
        })
        .collect();
        specs.push(path_rule(5, "/static/*", "static"));
        let set = RuleSet::new(specs, forward("fallback")).unwrap();
        let mut h = HeaderMap::new();
        h.append("user-agent", "Mozilla/5.0".parse().unwrap());
        h.append("x-env", "prod".parse().unwrap());
        let req = RequestView {
            method: "GET",
            host: Some("WWW.Example.COM:8080"),
            path: "/v1/users",
            query: Some("version=%76%32&debug"),
            headers: &h,
            source_ip: "192.0.2.1".parse().unwrap(),
        };
        let before = allocations::so_far();
        let m = std::hint::black_box(&set).evaluate(std::hint::black_box(&req));
        let after = allocations::so_far();
        // Every rule was tried (rule 3's query matches, its method does not) and none matched.
        assert_eq!((m.priority, m.rules_evaluated), (0, 5));
        assert_eq!(after - before, 0, "evaluate allocated");
        // The counter does see allocations (so the assertion above can fail).
        let v = std::hint::black_box(vec![1u8; 16]);
        assert!(allocations::so_far() > after);
        drop(v);
    }

    #[test]
    fn actions_lists_every_rule_action_and_the_default() {
        let set = RuleSet::new(vec![path_rule(2, "/a", "a")], forward("f")).unwrap();
        let groups: Vec<_> = set.actions().flat_map(Action::target_groups).collect();
        assert_eq!(groups, ["a", "f"]);
    }
}
