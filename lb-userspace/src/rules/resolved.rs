//! A rule set as a running listener stores it: every forward action's target groups looked up
//! by name once, with each group's stickiness cookie made, so that a request finds its group
//! (and its cookie) by position instead of loading the group map, hashing the name and
//! comparing it, and never formats a cookie.
//!
//! The only way to a [`ResolvedRuleSet`] is [`ResolvedRuleSet::new`], which resolves every
//! action: a listener cannot store a rule set whose groups were never looked up. A group the
//! lookup did not find (its name is not configured, or it was removed at run time) is a
//! state of its own ([`ResolvedGroup::group`] is `None`), answered as an unknown group.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use super::{Action, Matched, RequestView, RuleSet};
use crate::targets::TargetGroup;

/// ALB's group-stickiness cookie.
pub const GROUP_COOKIE: &str = "AWSALBTG";

/// One group of a forward action, as the running tier found it when it stored the rule set.
#[derive(Clone)]
pub struct ResolvedGroup {
    /// The group's handle; `None`: no group has the name.
    pub group: Option<Arc<TargetGroup>>,
    /// With group stickiness: the `AWSALBTG` cookie that pins a client to this group (made
    /// once here, not per request); `None` without stickiness.
    pub cookie: Option<HeaderValue>,
}

/// A [`RuleSet`] with every forward action's groups resolved (see the module doc).
pub struct ResolvedRuleSet {
    rules: RuleSet,
    /// By action position ([`RuleSet::actions`]' order, which [`Matched::index`] counts): a
    /// forward action's groups in its `groups`' order; empty for other actions.
    groups: Box<[Box<[ResolvedGroup]>]>,
}

impl ResolvedRuleSet {
    /// `rules` with each forward action's groups looked up with `lookup` (by name).
    pub fn new(rules: RuleSet, lookup: impl Fn(&str) -> Option<Arc<TargetGroup>>) -> Self {
        let groups = rules
            .actions()
            .map(|action| match action {
                Action::Forward(f) => f
                    .groups
                    .iter()
                    .map(|g| ResolvedGroup {
                        group: lookup(&g.name),
                        cookie: f
                            .group_stickiness
                            .and_then(|duration| group_cookie(&g.name, duration)),
                    })
                    .collect(),
                Action::Redirect(_) | Action::FixedResponse(_) => Box::default(),
            })
            .collect();
        Self { rules, groups }
    }

    /// The rules as configured.
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// [`RuleSet::evaluate`], with the matched action's resolved groups (empty unless it
    /// forwards).
    pub fn evaluate(&self, req: &RequestView<'_>) -> (Matched<'_>, &[ResolvedGroup]) {
        let matched = self.rules.evaluate(req);
        let groups = self.groups.get(matched.index).map_or(&[][..], |g| &g[..]);
        (matched, groups)
    }
}

/// The group stickiness cookie for `group_name` (`None` if the name cannot be a header value;
/// configured names always can).
fn group_cookie(group_name: &str, duration: Duration) -> Option<HeaderValue> {
    HeaderValue::try_from(format!(
        "{GROUP_COOKIE}={group_name}; Max-Age={}; Path=/",
        duration.as_secs()
    ))
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Condition, ForwardAction, Rule, WeightedGroup};

    fn forward(names: &[&str], stickiness: Option<Duration>) -> Action {
        let groups = names
            .iter()
            .map(|n| WeightedGroup {
                name: (*n).to_owned(),
                weight: 1,
            })
            .collect();
        Action::Forward(ForwardAction::new(groups, stickiness).expect("valid forward"))
    }

    /// Every action is resolved by its position, the default included, and an action that
    /// does not forward has no groups: a request matching rule 2 gets rule 2's groups, not
    /// its neighbours'.
    #[test]
    fn each_matched_action_gets_its_own_groups_and_cookies() {
        let g = |name: &str| {
            Arc::new(TargetGroup::new(
                crate::targets::parse_target_group(name).expect("group"),
            ))
        };
        let (api, web, canary) = (g("api"), g("web"), g("canary"));
        let rules = RuleSet::new(
            vec![
                Rule::new(
                    10,
                    vec![Condition::PathPattern(vec!["/api/*".into()])],
                    forward(&["api", "missing"], Some(Duration::from_secs(60))),
                )
                .expect("rule"),
                Rule::new(
                    20,
                    vec![Condition::PathPattern(vec!["/old/*".into()])],
                    Action::FixedResponse(
                        crate::rules::FixedResponseAction::new("404", None, "").expect("fixed"),
                    ),
                )
                .expect("rule"),
            ],
            forward(&["web", "canary"], None),
        )
        .expect("rules");
        let by_name = [("api", &api), ("web", &web), ("canary", &canary)];
        let resolved = ResolvedRuleSet::new(rules, |name| {
            by_name
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, g)| Arc::clone(g))
        });
        let headers = http::HeaderMap::new();
        let view = |path| RequestView {
            method: "GET",
            host: None,
            path,
            query: None,
            headers: &headers,
            source_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        };
        let same = |r: &ResolvedGroup, g: &Arc<TargetGroup>| {
            r.group.as_ref().is_some_and(|r| Arc::ptr_eq(r, g))
        };

        let (m, groups) = resolved.evaluate(&view("/api/x"));
        assert_eq!(m.priority, 10);
        assert_eq!(groups.len(), 2);
        assert!(same(&groups[0], &api));
        assert!(groups[1].group.is_none(), "a name no group has");
        assert_eq!(
            groups[0]
                .cookie
                .as_ref()
                .map(|c| c.to_str().expect("ascii")),
            Some("AWSALBTG=api; Max-Age=60; Path=/")
        );
        assert_eq!(
            groups[1]
                .cookie
                .as_ref()
                .map(|c| c.to_str().expect("ascii")),
            Some("AWSALBTG=missing; Max-Age=60; Path=/")
        );

        let (m, groups) = resolved.evaluate(&view("/old/x"));
        assert_eq!(m.priority, 20);
        assert!(groups.is_empty(), "a fixed response has no groups");

        let (m, groups) = resolved.evaluate(&view("/"));
        assert_eq!(m.priority, 0);
        assert_eq!(groups.len(), 2);
        assert!(same(&groups[0], &web) && same(&groups[1], &canary));
        assert!(groups.iter().all(|g| g.cookie.is_none()), "no stickiness");
    }
}
