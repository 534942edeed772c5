//! The admin API's requests and answers, named after the AWS Elastic Load Balancing API
//! (`RegisterTargets`, `DescribeTargetHealth`, `ModifyTargetGroup`, `CreateRule`, …) with
//! AWS's PascalCase field names, so they read like the AWS CLI's JSON. Where AWS identifies
//! things by ARN we use names: a target group's name (or, for our VIP shorthand, the VIP's
//! name or `ADDR:PORT/PROTO`), a listener's name, a rule's priority.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::registry::{TargetHealth, TargetHealthDescription};

/// A target in a request: address, optional port (a VIP's targets take the VIP's port) and
/// optional weight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TargetRef {
    /// IP address.
    pub id: String,
    /// Port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Weight (register only; default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// AWS `Matcher`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Matcher {
    /// Codes and ranges, e.g. `200,202` or `200-299`.
    pub http_code: String,
}

/// AWS `TargetGroupAttribute`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Attribute {
    /// E.g. `deregistration_delay.timeout_seconds`.
    pub key: String,
    /// Its value, as text.
    pub value: String,
}

/// One listener rule priority move (AWS `RulePriorityPair`, by priority instead of ARN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PriorityMove {
    /// The rule's current priority.
    pub priority: u32,
    /// Its new priority.
    pub new_priority: u32,
}

/// A request to the running daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "Action")]
pub enum Request {
    /// AWS register-targets. A registered target takes the new weight.
    RegisterTargets {
        /// The group (or a VIP forwarding to it).
        #[serde(rename = "TargetGroupName")]
        target_group_name: String,
        /// The targets.
        #[serde(rename = "Targets")]
        targets: Vec<TargetRef>,
    },
    /// AWS deregister-targets: the targets drain for the deregistration delay.
    DeregisterTargets {
        /// The group (or a VIP forwarding to it).
        #[serde(rename = "TargetGroupName")]
        target_group_name: String,
        /// The targets.
        #[serde(rename = "Targets")]
        targets: Vec<TargetRef>,
    },
    /// Ours: the operator switch (false: no new traffic, open connections continue).
    SetTargetsEnabled {
        /// The group (or a VIP forwarding to it).
        #[serde(rename = "TargetGroupName")]
        target_group_name: String,
        /// The targets.
        #[serde(rename = "Targets")]
        targets: Vec<TargetRef>,
        /// In service or not.
        #[serde(rename = "Enabled")]
        enabled: bool,
    },
    /// AWS describe-target-health (every group when no name is given).
    DescribeTargetHealth {
        /// The group (or a VIP forwarding to it).
        #[serde(rename = "TargetGroupName", default)]
        target_group_name: Option<String>,
        /// Only these targets (unregistered ones are reported `unused`).
        #[serde(rename = "Targets", default)]
        targets: Option<Vec<TargetRef>>,
    },
    /// AWS describe-target-groups (every group when no names are given).
    DescribeTargetGroups {
        /// Only these.
        #[serde(rename = "Names", default)]
        names: Option<Vec<String>>,
    },
    /// AWS create-target-group; the settings use `lb run --target-group`'s option syntax.
    CreateTargetGroup {
        /// Its name.
        #[serde(rename = "Name")]
        name: String,
        /// `OPTION=VALUE[,…]`, as after the name in `--target-group`.
        #[serde(rename = "Options", default)]
        options: String,
    },
    /// AWS delete-target-group (refused while a rule or VIP uses it).
    DeleteTargetGroup {
        /// The group.
        #[serde(rename = "TargetGroupName")]
        target_group_name: String,
    },
    /// AWS modify-target-group and modify-target-group-attributes.
    ModifyTargetGroup(Box<ModifyTargetGroup>),
    /// AWS describe-listeners: the L7 listeners and the L4 VIPs (NLB listeners).
    DescribeListeners,
    /// AWS describe-rules.
    DescribeRules {
        /// The listener.
        #[serde(rename = "ListenerName")]
        listener_name: String,
    },
    /// AWS create-rule.
    CreateRule {
        /// The listener.
        #[serde(rename = "ListenerName")]
        listener_name: String,
        /// 1–50000, free on the listener.
        #[serde(rename = "Priority")]
        priority: u32,
        /// Conditions and action in `--rule` syntax, e.g. `path=/api/*,forward=api`.
        #[serde(rename = "Rule")]
        rule: String,
    },
    /// AWS modify-rule: new conditions and action for the rule of this priority (`default`
    /// or `0`: the default rule).
    ModifyRule {
        /// The listener.
        #[serde(rename = "ListenerName")]
        listener_name: String,
        /// The rule's priority, or `default`.
        #[serde(rename = "Priority")]
        priority: String,
        /// Conditions and action.
        #[serde(rename = "Rule")]
        rule: String,
    },
    /// AWS delete-rule.
    DeleteRule {
        /// The listener.
        #[serde(rename = "ListenerName")]
        listener_name: String,
        /// The rule's priority.
        #[serde(rename = "Priority")]
        priority: u32,
    },
    /// CloudWatch get-metric-data, roughly: every metric of both planes with its total, its
    /// sums over the last 1 and 5 minutes and its rate (what `lb stats` shows).
    DescribeMetrics,
    /// Ours: a VIP's guards (every VIP's when no name is given).
    DescribeVipGuards {
        /// The VIP: its name or `ADDR:PORT/PROTO`.
        #[serde(rename = "VipName", default)]
        vip_name: Option<String>,
    },
    /// Ours: change a VIP's guards at run time. The options are `--vip`'s guard options;
    /// each one given replaces that part (`allow=` empty: no allow list), the rest stays.
    ModifyVipGuards {
        /// The VIP: its name or `ADDR:PORT/PROTO`.
        #[serde(rename = "VipName")]
        vip_name: String,
        /// `allow=CIDR|…`, `deny=CIDR|…`, `new-flow-rate=N|off`, `new-flow-burst=M`.
        #[serde(rename = "Options")]
        options: String,
    },
    /// AWS set-rule-priorities: every move at once.
    SetRulePriorities {
        /// The listener.
        #[serde(rename = "ListenerName")]
        listener_name: String,
        /// The moves.
        #[serde(rename = "RulePriorities")]
        rule_priorities: Vec<PriorityMove>,
    },
}

/// A target group's health-check settings with AWS's field names: what
/// modify-target-group sets (unset fields stay as they are) and what describe-target-groups
/// reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheckFields {
    /// Checks on or off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_enabled: Option<bool>,
    /// `HTTP`, `HTTPS` or `TCP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_protocol: Option<String>,
    /// `traffic-port` or a port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_port: Option<String>,
    /// Path of HTTP/HTTPS checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_path: Option<String>,
    /// Seconds between checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_interval_seconds: Option<f64>,
    /// Seconds one check may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_timeout_seconds: Option<f64>,
    /// Passes to become healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold_count: Option<u32>,
    /// Failures to become unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold_count: Option<u32>,
    /// Passing status codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matcher: Option<Matcher>,
    /// Ours: `auto`, `datapath` or `direct` (the path of L4 checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_mode: Option<String>,
}

/// AWS modify-target-group (health checks) with modify-target-group-attributes'
/// `Attributes`. Unset fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ModifyTargetGroup {
    /// The group (or a VIP forwarding to it).
    pub target_group_name: String,
    /// Health-check settings to change.
    #[serde(flatten)]
    pub health_check: HealthCheckFields,
    /// AWS attribute keys (see [`ATTRIBUTE_OPTIONS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<Attribute>,
}

/// AWS target group attribute keys and the `--target-group` options they set.
pub const ATTRIBUTE_OPTIONS: &[(&str, &str)] = &[
    (
        "deregistration_delay.timeout_seconds",
        "deregistration-delay",
    ),
    ("slow_start.duration_seconds", "slow-start"),
    (
        "target_group_health.unhealthy_state_routing.minimum_healthy_targets.count",
        "min-healthy-targets",
    ),
    (
        "target_group_health.unhealthy_state_routing.minimum_healthy_targets.percentage",
        "min-healthy-percent",
    ),
    (
        "target_health_state.unhealthy.draining_interval_seconds",
        "unhealthy-draining",
    ),
];

impl ModifyTargetGroup {
    /// The request for `OPTION=VALUE[,…]` in `--target-group` syntax (what `lb groups modify`
    /// takes). The inverse of [`to_options`](Self::to_options): the two directions of the one
    /// mapping live here, side by side.
    pub fn from_options(name: &str, options: &str) -> Result<Self, String> {
        let mut m = Self {
            target_group_name: name.to_owned(),
            ..Self::default()
        };
        let h = &mut m.health_check;
        for part in options.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected OPTION=VALUE"))?;
            let num = |v: &str| -> Result<f64, String> {
                v.parse().map_err(|_| format!("{k}={v}: not a number"))
            };
            let count = |v: &str| -> Result<u32, String> {
                v.parse().map_err(|_| format!("{k}={v}: not a count"))
            };
            match k {
                "health-check" if v == "off" => h.health_check_enabled = Some(false),
                "health-check" if v == "on" => h.health_check_enabled = Some(true),
                "health-check" => h.health_check_protocol = Some(v.to_ascii_uppercase()),
                "health-check-port" => h.health_check_port = Some(v.to_owned()),
                "health-check-path" => h.health_check_path = Some(v.to_owned()),
                "health-check-interval" => h.health_check_interval_seconds = Some(num(v)?),
                "health-check-timeout" => h.health_check_timeout_seconds = Some(num(v)?),
                "healthy-threshold" => h.healthy_threshold_count = Some(count(v)?),
                "unhealthy-threshold" => h.unhealthy_threshold_count = Some(count(v)?),
                "matcher" => {
                    h.matcher = Some(Matcher {
                        http_code: v.to_owned(),
                    })
                }
                "health-check-mode" => h.health_check_mode = Some(v.to_owned()),
                _ => match ATTRIBUTE_OPTIONS.iter().find(|(_, o)| *o == k) {
                    Some((key, _)) => m.attributes.push(Attribute {
                        key: (*key).to_owned(),
                        value: v.to_owned(),
                    }),
                    None => {
                        return Err(format!(
                            "{k:?} cannot change on a running group (changeable: {})",
                            crate::targets::RUNTIME_OPTIONS.join(", ")
                        ));
                    }
                },
            }
        }
        Ok(m)
    }

    /// The changes as `--target-group` options (the one validation path).
    pub fn to_options(&self) -> Result<Vec<(String, String)>, String> {
        let h = &self.health_check;
        let mut out: Vec<(String, String)> = Vec::new();
        let mut push = |k: &str, v: String| out.push((k.to_owned(), v));
        if let Some(false) = h.health_check_enabled {
            push("health-check", "off".into());
        }
        if let Some(p) = &h.health_check_protocol {
            push("health-check", p.clone());
        } else if h.health_check_enabled == Some(true) {
            push("health-check", "on".into());
        }
        let fields: [(&str, Option<String>); 8] = [
            ("health-check-port", h.health_check_port.clone()),
            ("health-check-path", h.health_check_path.clone()),
            (
                "health-check-interval",
                h.health_check_interval_seconds.map(|s| s.to_string()),
            ),
            (
                "health-check-timeout",
                h.health_check_timeout_seconds.map(|s| s.to_string()),
            ),
            (
                "healthy-threshold",
                h.healthy_threshold_count.map(|n| n.to_string()),
            ),
            (
                "unhealthy-threshold",
                h.unhealthy_threshold_count.map(|n| n.to_string()),
            ),
            ("matcher", h.matcher.as_ref().map(|m| m.http_code.clone())),
            ("health-check-mode", h.health_check_mode.clone()),
        ];
        for (k, v) in fields {
            if let Some(v) = v {
                push(k, v);
            }
        }
        for a in &self.attributes {
            let Some((_, option)) = ATTRIBUTE_OPTIONS.iter().find(|(k, _)| *k == a.key) else {
                let known: Vec<&str> = ATTRIBUTE_OPTIONS.iter().map(|(k, _)| *k).collect();
                return Err(format!(
                    "unknown attribute {:?} (known: {})",
                    a.key,
                    known.join(", ")
                ));
            };
            push(option, a.value.clone());
        }
        if out.is_empty() {
            return Err("nothing to change".into());
        }
        Ok(out)
    }
}

/// A target group as describe-target-groups reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TargetGroupDescription {
    /// Its name.
    pub target_group_name: String,
    /// `HTTP`, `HTTPS`, `TCP` or `UDP`.
    pub protocol: String,
    /// Its health checks (only `HealthCheckEnabled: false` when off).
    #[serde(flatten)]
    pub health_check: HealthCheckFields,
    /// The listeners and VIPs that use it.
    pub used_by: Vec<String>,
    /// HealthyHostCount.
    pub healthy_host_count: usize,
    /// UnHealthyHostCount.
    pub un_healthy_host_count: usize,
    /// Too few healthy targets: routing to all of them.
    pub failing_open: bool,
    /// Its attributes, with AWS keys.
    pub attributes: Vec<Attribute>,
}

/// A listener (L7) or VIP (L4, an NLB listener) as describe-listeners reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ListenerDescription {
    /// Its name (a VIP without one: its address).
    pub listener_name: String,
    /// `HTTP`, `HTTPS`, `TCP` or `UDP`.
    pub protocol: String,
    /// Where it listens: `ADDR:PORT`.
    pub address: String,
    /// The default action (`--rule` syntax; VIPs: `forward=GROUP`).
    pub default_actions: String,
    /// Non-default rules.
    pub rule_count: usize,
}

/// A listener rule as describe-rules reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RuleDescription {
    /// `1`–`50000`, or `default`.
    pub priority: String,
    /// Whether it is the default rule.
    pub is_default: bool,
    /// Conditions and action in `--rule` syntax.
    pub rule: String,
}

/// The answer to a request. Each request fills the fields AWS's answer has.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Response {
    /// describe-target-health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_health_descriptions: Option<Vec<GroupTargetHealth>>,
    /// describe-target-groups, create-target-group, modify-target-group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_groups: Option<Vec<TargetGroupDescription>>,
    /// describe-listeners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listeners: Option<Vec<ListenerDescription>>,
    /// describe-rules and the rule changes (the listener's rules afterwards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<RuleDescription>>,
    /// DescribeMetrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<crate::metrics::history::Report>,
    /// DescribeVipGuards, ModifyVipGuards (the guards afterwards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip_guards: Option<Vec<VipGuardsDescription>>,
}

/// A VIP's guards as DescribeVipGuards reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct VipGuardsDescription {
    /// The VIP's name (or its address).
    pub vip_name: String,
    /// `ADDR:PORT/PROTO`.
    pub vip: String,
    /// `dsr` or `nat`.
    pub mode: String,
    /// The guards in `--vip` option syntax.
    pub guards: String,
}

/// A target's health with its group (we describe several groups in one answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GroupTargetHealth {
    /// The group.
    pub target_group_name: String,
    /// The target's AWS description.
    #[serde(flatten)]
    pub description: TargetHealthDescription,
}

/// An error answer (AWS error codes where AWS has one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "PascalCase")]
#[error("{code}: {message}")]
pub struct ApiError {
    /// E.g. `TargetGroupNotFound`, `InvalidTarget`, `ResourceInUse`, `PriorityInUse`,
    /// `RuleNotFound`, `ListenerNotFound`, `ValidationError`, `AccessDenied`.
    pub code: String,
    /// What went wrong.
    pub message: String,
}

impl ApiError {
    /// An error of `code`.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// The HTTP status it is served with.
    pub fn status(&self) -> u16 {
        match self.code.as_str() {
            "AccessDenied" => 401,
            "TargetGroupNotFound" | "RuleNotFound" | "ListenerNotFound" => 404,
            "ResourceInUse" | "PriorityInUse" | "DuplicateTargetGroupName" => 409,
            "InternalError" => 500,
            _ => 400,
        }
    }
}

/// The error envelope: `{"Error": {"Code": …, "Message": …}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ErrorEnvelope {
    /// The error.
    pub error: ApiError,
}

/// Attributes of a group, with AWS keys, for describe-target-groups.
pub fn attributes_of(cfg: &crate::targets::TargetGroupConfig) -> Vec<Attribute> {
    let a = &cfg.attributes;
    let secs = |d: std::time::Duration| d.as_secs_f64().to_string();
    let mut m: BTreeMap<&str, String> = BTreeMap::new();
    m.insert(ATTRIBUTE_OPTIONS[0].0, secs(a.deregistration_delay));
    m.insert(
        ATTRIBUTE_OPTIONS[1].0,
        a.slow_start.map_or("0".to_owned(), secs),
    );
    m.insert(ATTRIBUTE_OPTIONS[2].0, a.min_healthy.count.to_string());
    m.insert(
        ATTRIBUTE_OPTIONS[3].0,
        a.min_healthy
            .percent
            .map_or("off".to_owned(), |p| p.to_string()),
    );
    m.insert(
        ATTRIBUTE_OPTIONS[4].0,
        a.unhealthy_draining.map_or("0".to_owned(), secs),
    );
    m.insert(
        "load_balancing.algorithm.type",
        cfg.algorithm.as_str().to_owned(),
    );
    m.insert("stickiness.enabled", cfg.stickiness.enabled().to_string());
    m.into_iter()
        .map(|(k, v)| Attribute {
            key: k.to_owned(),
            value: v,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_like_the_aws_api() {
        let req = Request::RegisterTargets {
            target_group_name: "web".into(),
            targets: vec![TargetRef {
                id: "10.0.0.11".into(),
                port: Some(80),
                weight: None,
            }],
        };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(
            json,
            r#"{"Action":"RegisterTargets","TargetGroupName":"web","Targets":[{"Id":"10.0.0.11","Port":80}]}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), req);
        let modify: Request = serde_json::from_str(
            r#"{"Action":"ModifyTargetGroup","TargetGroupName":"web","HealthCheckPath":"/h","HealthCheckIntervalSeconds":5,"Attributes":[{"Key":"deregistration_delay.timeout_seconds","Value":"10"}]}"#,
        )
        .unwrap();
        let Request::ModifyTargetGroup(m) = modify else {
            panic!("{modify:?}")
        };
        assert_eq!(
            m.to_options().unwrap(),
            [
                ("health-check-path".to_owned(), "/h".to_owned()),
                ("health-check-interval".to_owned(), "5".to_owned()),
                ("deregistration-delay".to_owned(), "10".to_owned()),
            ]
        );
    }

    #[test]
    fn unknown_attributes_and_empty_changes_are_refused() {
        let mut m = ModifyTargetGroup::from_options("web", "").unwrap();
        assert!(m.to_options().unwrap_err().contains("nothing"));
        m.attributes.push(Attribute {
            key: "stickiness.enabled".into(),
            value: "true".into(),
        });
        assert!(m.to_options().unwrap_err().contains("unknown attribute"));
        assert!(
            ModifyTargetGroup::from_options("web", "algorithm=weighted_random")
                .unwrap_err()
                .contains("cannot change")
        );
    }

    #[test]
    fn cli_options_and_aws_fields_map_both_ways() {
        let opts = "health-check=http,health-check-port=8080,health-check-path=/h,\
                    health-check-interval=5,health-check-timeout=2,healthy-threshold=3,\
                    unhealthy-threshold=4,matcher=200-299,health-check-mode=direct,\
                    deregistration-delay=10,slow-start=60,min-healthy-targets=2,\
                    min-healthy-percent=50,unhealthy-draining=30";
        let m = ModifyTargetGroup::from_options("web", opts).unwrap();
        let back: Vec<String> = m
            .to_options()
            .unwrap()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut want: Vec<&str> = opts.split(',').map(str::trim).collect();
        want[0] = "health-check=HTTP";
        assert_eq!(back, want);
    }
}
