//! [`RuleBook`]: one listener's rules as the operator wrote them, with their compiled
//! [`RuleSet`]. Every change (create, modify, delete, reprioritise) builds a new book from the
//! texts and compiles it whole, so a book is always valid and the running listener swaps one
//! compiled set for another atomically.
use std::collections::BTreeMap;
use std::sync::Arc;

use super::{RuleOrDefault, RuleSet, parse_rule, rule_body};

/// The rules of one listener (see the module docs).
#[derive(Debug, Clone)]
pub struct RuleBook {
    listener: String,
    protocol: &'static str,
    port: u16,
    /// Priority → what the rule says (conditions and action, as written).
    rules: BTreeMap<u32, String>,
    /// What the default rule says.
    default: String,
    compiled: Arc<RuleSet>,
}

impl RuleBook {
    /// Compiles the rules of listener `listener` (`protocol` `http`/`https`, `port`):
    /// `rules` maps priorities to rule bodies, `default` is the default rule's body (bodies
    /// are specs without the listener name and the `priority=`/`default` part). Every
    /// problem is reported.
    pub fn new(
        listener: &str,
        protocol: &'static str,
        port: u16,
        rules: BTreeMap<u32, String>,
        default: String,
    ) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let mut compiled_rules = Vec::new();
        for (priority, body) in &rules {
            let spec = format!("{listener},priority={priority},{body}");
            match parse_rule(&spec) {
                Ok(p) => match p.rule {
                    RuleOrDefault::Rule(r) => compiled_rules.push(r),
                    RuleOrDefault::Default(_) => {
                        errors.push(format!(
                            "rule {priority}: only the default rule says `default`"
                        ));
                    }
                },
                Err(e) => errors.push(format!("rule {priority}: {e}")),
            }
        }
        let default_action = match parse_rule(&format!("{listener},default,{default}")) {
            Ok(p) => match p.rule {
                RuleOrDefault::Default(a) => Some(a),
                RuleOrDefault::Rule(_) => {
                    errors.push("default rule: a default rule has no priority".into());
                    None
                }
            },
            Err(e) => {
                errors.push(format!("default rule: {e}"));
                None
            }
        };
        let Some(default_action) = default_action else {
            return Err(errors);
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let set = RuleSet::new(compiled_rules, default_action)
            .map_err(|es| es.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        set.validate_for_listener(protocol, port)
            .map_err(|es| es.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        Ok(Self {
            listener: listener.to_owned(),
            protocol,
            port,
            rules,
            default,
            compiled: Arc::new(set),
        })
    }

    /// A book from `--rule` flag values of this listener (full specs with the listener name).
    pub fn from_specs(
        listener: &str,
        protocol: &'static str,
        port: u16,
        specs: &[&str],
    ) -> Result<Self, Vec<String>> {
        let mut rules = BTreeMap::new();
        let mut default = None;
        let mut errors = Vec::new();
        for spec in specs {
            match parse_rule(spec) {
                Ok(p) => match p.rule {
                    RuleOrDefault::Rule(r) => {
                        if rules.insert(r.priority, rule_body(spec)).is_some() {
                            errors.push(format!(
                                "priority {} is used by more than one rule of this listener",
                                r.priority
                            ));
                        }
                    }
                    RuleOrDefault::Default(_) if default.is_some() => {
                        errors.push("this listener already has a default rule".into());
                    }
                    RuleOrDefault::Default(_) => default = Some(rule_body(spec)),
                },
                Err(e) => errors.push(e.to_string()),
            }
        }
        let Some(default) = default else {
            errors.push(format!(
                "has no default action: add --rule '{listener},default,forward=GROUP' (or a \
                 fixed-response/redirect default)"
            ));
            return Err(errors);
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Self::new(listener, protocol, port, rules, default)
    }

    fn rebuild(&self, rules: BTreeMap<u32, String>, default: String) -> Result<Self, String> {
        Self::new(&self.listener, self.protocol, self.port, rules, default)
            .map_err(|es| es.join("; "))
    }

    /// The compiled rules the listener evaluates.
    pub fn compiled(&self) -> Arc<RuleSet> {
        self.compiled.clone()
    }

    /// The listener's name.
    pub fn listener(&self) -> &str {
        &self.listener
    }

    /// A book with one more rule (AWS create-rule). The priority must be free.
    pub fn with_rule(&self, priority: u32, body: &str) -> Result<Self, String> {
        if self.rules.contains_key(&priority) {
            return Err(format!(
                "priority {priority} is taken on listener {} (AWS: PriorityInUse)",
                self.listener
            ));
        }
        let mut rules = self.rules.clone();
        rules.insert(priority, body.to_owned());
        self.rebuild(rules, self.default.clone())
    }

    /// A book where rule `priority` (0: the default rule) says `body` instead (AWS
    /// modify-rule: conditions and actions change, the priority stays).
    pub fn with_modified(&self, priority: u32, body: &str) -> Result<Self, String> {
        if priority == 0 {
            return self.rebuild(self.rules.clone(), body.to_owned());
        }
        if !self.rules.contains_key(&priority) {
            return Err(self.no_rule(priority));
        }
        let mut rules = self.rules.clone();
        rules.insert(priority, body.to_owned());
        self.rebuild(rules, self.default.clone())
    }

    /// A book without rule `priority` (AWS delete-rule; the default rule cannot be deleted).
    pub fn without(&self, priority: u32) -> Result<Self, String> {
        if priority == 0 {
            return Err("the default rule cannot be deleted (modify it instead)".into());
        }
        let mut rules = self.rules.clone();
        if rules.remove(&priority).is_none() {
            return Err(self.no_rule(priority));
        }
        self.rebuild(rules, self.default.clone())
    }

    /// A book with rules moved to new priorities, all at once (AWS set-rule-priorities): each
    /// pair is (current priority, new priority). Swapping two rules is one call.
    pub fn with_priorities(&self, moves: &[(u32, u32)]) -> Result<Self, String> {
        let mut moved = BTreeMap::new();
        let mut rules = self.rules.clone();
        for &(from, to) in moves {
            let body = rules.remove(&from).ok_or_else(|| self.no_rule(from))?;
            if moved.insert(to, body).is_some() {
                return Err(format!("priority {to} is given to more than one rule"));
            }
        }
        for (to, body) in moved {
            if rules.insert(to, body).is_some() {
                return Err(format!(
                    "priority {to} is taken by a rule that does not move (AWS: PriorityInUse)"
                ));
            }
        }
        self.rebuild(rules, self.default.clone())
    }

    fn no_rule(&self, priority: u32) -> String {
        format!(
            "listener {} has no rule with priority {priority} (AWS: RuleNotFound)",
            self.listener
        )
    }

    /// The rules as written: (priority, body), by priority, then the default rule as
    /// (0, body).
    pub fn describe(&self) -> Vec<(u32, String)> {
        self.rules
            .iter()
            .map(|(p, b)| (*p, b.clone()))
            .chain([(0, self.default.clone())])
            .collect()
    }

    /// How many rules (the default included) forward to each target group.
    pub fn group_users(&self) -> BTreeMap<String, usize> {
        let mut users = BTreeMap::new();
        let actions = self
            .compiled
            .rules()
            .iter()
            .map(|r| &r.action)
            .chain([self.compiled.default_action()]);
        for action in actions {
            for g in action.target_groups() {
                *users.entry(g.to_owned()).or_default() += 1;
            }
        }
        users
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book() -> RuleBook {
        RuleBook::from_specs(
            "web",
            "http",
            80,
            &[
                "web,priority=10,path=/api/*,forward=api",
                "web,priority=20,host=a.example.com,forward=app",
                "web,default,forward=app",
            ],
        )
        .unwrap()
    }

    #[test]
    fn a_book_keeps_what_was_written_and_counts_group_users() {
        let b = book();
        assert_eq!(
            b.describe(),
            [
                (10, "path=/api/*,forward=api".to_owned()),
                (20, "host=a.example.com,forward=app".to_owned()),
                (0, "forward=app".to_owned()),
            ]
        );
        assert_eq!(b.compiled().len(), 2);
        assert_eq!(
            b.group_users(),
            BTreeMap::from([("api".to_owned(), 1), ("app".to_owned(), 2)])
        );
    }

    #[test]
    fn create_modify_delete_and_reprioritise() {
        let b = book()
            .with_rule(5, "method=POST,fixed-response=403")
            .unwrap();
        assert_eq!(b.compiled().rules()[0].priority, 5);
        assert!(
            b.with_rule(10, "path=/x,forward=api")
                .unwrap_err()
                .contains("taken")
        );
        let b = b.with_modified(10, "path=/v2/*,forward=api").unwrap();
        assert!(
            b.describe()
                .contains(&(10, "path=/v2/*,forward=api".to_owned()))
        );
        let b = b.without(20).unwrap();
        assert!(
            b.without(20)
                .unwrap_err()
                .contains("no rule with priority 20")
        );
        // Swap 5 and 10 in one call.
        let b = b.with_priorities(&[(5, 10), (10, 5)]).unwrap();
        assert_eq!(b.describe()[0], (5, "path=/v2/*,forward=api".to_owned()));
        assert!(b.with_priorities(&[(5, 10)]).unwrap_err().contains("taken"));
        let b = b.with_modified(0, "fixed-response=404").unwrap();
        assert_eq!(b.group_users(), BTreeMap::from([("api".to_owned(), 1)]));
        assert!(b.without(0).is_err());
    }

    #[test]
    fn an_invalid_change_leaves_no_trace() {
        let b = book();
        assert!(b.with_rule(30, "path=/x").is_err(), "no action");
        assert!(b.with_rule(60_000, "path=/x,forward=a").is_err());
        assert!(
            b.with_modified(0, "path=/x,forward=a").is_err(),
            "default with conditions"
        );
        assert_eq!(b.describe().len(), 3);
    }

    #[test]
    fn listener_checks_apply_to_changes_too() {
        let https =
            RuleBook::from_specs("tls", "https", 443, &["tls,default,forward=app"]).unwrap();
        let err = https
            .with_rule(
                1,
                "path=/x,redirect-protocol=HTTP,redirect-port=80,status=301",
            )
            .unwrap_err();
        assert!(!err.is_empty());
    }
}
