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

use super::{
    Action, FixedResponseAction, ForwardAction, Matched, RedirectAction, RequestView, RuleSet,
};
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
    /// The default action's groups in its `groups`' order (empty unless it forwards): a
    /// request that matches no rule reads them one pointer from here (stop 38; through a
    /// table of every action's groups it read one 64-byte line more).
    default: Box<[ResolvedGroup]>,
    /// By rule position ([`RuleSet::rules`]' order, which [`Matched::index`] counts): a
    /// forward action's groups in its `groups`' order; empty for other actions.
    by_rule: Box<[Box<[ResolvedGroup]>]>,
    /// Some rule has an `http-header` condition (the lean HTTP/1.1 path builds a header map
    /// only then).
    reads_headers: bool,
}

/// A matched [`Action`]; a forward action comes with its groups as the rule set resolved them.
#[derive(Clone, Copy)]
pub enum ResolvedAction<'a> {
    /// Forward, with the action's resolved groups.
    Forward(ResolvedForward<'a>),
    /// Redirect.
    Redirect(&'a RedirectAction),
    /// Fixed response.
    FixedResponse(&'a FixedResponseAction),
}

/// A matched forward action and its resolved groups, borrowed together: the groups are
/// always those of this action (one value, so that no caller can pair them otherwise).
#[derive(Clone, Copy)]
pub struct ResolvedForward<'a> {
    /// The action as configured.
    pub action: &'a ForwardAction,
    /// Its groups, in `action.groups`' order.
    groups: &'a [ResolvedGroup],
}

impl<'a> ResolvedForward<'a> {
    /// The group at `index` in `action.groups`' order, with its stickiness cookie; `None` for
    /// an unknown group: no position `index`, or no group has its name.
    pub fn group(&self, index: usize) -> Option<(&'a Arc<TargetGroup>, Option<&'a HeaderValue>)> {
        let resolved = self.groups.get(index)?;
        Some((resolved.group.as_ref()?, resolved.cookie.as_ref()))
    }
}

impl ResolvedRuleSet {
    /// `rules` with each forward action's groups looked up with `lookup` (by name).
    pub fn new(rules: RuleSet, lookup: impl Fn(&str) -> Option<Arc<TargetGroup>>) -> Self {
        let resolve = |action: &Action| -> Box<[ResolvedGroup]> {
            match action {
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
            }
        };
        let (by_rule, default) = {
            let mut actions = rules.actions();
            let by_rule = actions.by_ref().take(rules.len()).map(&resolve).collect();
            (by_rule, actions.next().map_or_else(Box::default, &resolve))
        };
        let reads_headers = rules.rules().iter().any(|r| {
            r.conditions
                .iter()
                .any(|c| matches!(c, super::Condition::HttpHeader { .. }))
        });
        Self {
            rules,
            default,
            by_rule,
            reads_headers,
        }
    }

    /// Whether some rule has an `http-header` condition: without one, evaluating reads no
    /// request header (the view's map may be empty).
    pub fn reads_headers(&self) -> bool {
        self.reads_headers
    }

    /// The rules as configured.
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// [`RuleSet::evaluate`], a forward action with its resolved groups.
    pub fn evaluate(&self, req: &RequestView<'_>) -> Matched<ResolvedAction<'_>> {
        let Matched {
            priority,
            action,
            rules_evaluated,
            index,
        } = self.rules.evaluate(req);
        let action = match action {
            Action::Forward(action) => ResolvedAction::Forward(ResolvedForward {
                action,
                // The default's position is one past the rules.
                groups: self.by_rule.get(index).unwrap_or(&self.default),
            }),
            Action::Redirect(redirect) => ResolvedAction::Redirect(redirect),
            Action::FixedResponse(fixed) => ResolvedAction::FixedResponse(fixed),
        };
        Matched {
            priority,
            action,
            rules_evaluated,
            index,
        }
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

        let forwarded = |path| match resolved.evaluate(&view(path)) {
            Matched {
                priority,
                action: ResolvedAction::Forward(f),
                ..
            } => (priority, f),
            _ => panic!("{path} forwards"),
        };

        let (priority, f) = forwarded("/api/x");
        assert_eq!(priority, 10);
        let groups = f.groups;
        assert_eq!(groups.len(), 2);
        assert!(same(&groups[0], &api));
        assert!(groups[1].group.is_none(), "a name no group has");
        assert!(f.group(1).is_none(), "an unknown group");
        assert!(f.group(2).is_none(), "no such position");
        assert_eq!(
            f.group(0)
                .map(|(g, c)| (Arc::ptr_eq(g, &api), c.map(|c| c.to_str().expect("ascii")))),
            Some((true, Some("AWSALBTG=api; Max-Age=60; Path=/")))
        );
        assert_eq!(
            groups[1]
                .cookie
                .as_ref()
                .map(|c| c.to_str().expect("ascii")),
            Some("AWSALBTG=missing; Max-Age=60; Path=/")
        );

        let m = resolved.evaluate(&view("/old/x"));
        assert_eq!(m.priority, 20);
        assert!(
            matches!(m.action, ResolvedAction::FixedResponse(_)),
            "a fixed response has no groups"
        );

        let (priority, f) = forwarded("/");
        assert_eq!(priority, 0);
        let groups = f.groups;
        assert_eq!(groups.len(), 2);
        assert!(same(&groups[0], &web) && same(&groups[1], &canary));
        assert!(groups.iter().all(|g| g.cookie.is_none()), "no stickiness");
    }
}
