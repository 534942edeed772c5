//! `lb targets`, `lb groups`, `lb listeners`, `lb rules`: one admin API request each, printed
//! as a readable table (or the API's JSON with `--json`).
use anyhow::{Context as _, bail};

use crate::admin::api::{PriorityMove, TargetRef};
use crate::admin::{Endpoint, Request, Response, call};
use crate::cli::{
    AdminArgs, GroupsAction, GroupsArgs, ListenersArgs, RulesAction, RulesArgs, TargetsAction,
    TargetsArgs, VipsAction, VipsArgs,
};
use crate::registry::parse_target;

fn endpoint(a: &AdminArgs) -> Endpoint {
    match a.admin_url {
        Some(addr) => Endpoint::Tcp {
            addr,
            token: a.admin_token.clone(),
        },
        None => Endpoint::Unix(a.admin_socket.clone()),
    }
}

fn send(a: &AdminArgs, req: &Request) -> anyhow::Result<Response> {
    Ok(call(&endpoint(a), req)?)
}

fn print_json(r: &Response) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(r)?);
    Ok(())
}

/// `OWNER=ADDR[:PORT][,weight=W]` specs grouped by owner, in the order given.
fn by_owner(specs: &[String], weights: bool) -> anyhow::Result<Vec<(String, Vec<TargetRef>)>> {
    let mut out: Vec<(String, Vec<TargetRef>)> = Vec::new();
    for s in specs {
        let t = parse_target(s).map_err(|e| anyhow::anyhow!("--target {s:?}: {e}"))?;
        if !weights && s.contains("weight=") {
            bail!("--target {s:?}: a weight only applies to register");
        }
        let r = TargetRef {
            id: t.addr.to_string(),
            port: t.port,
            weight: weights.then_some(t.weight),
        };
        match out.iter_mut().find(|(o, _)| *o == t.owner) {
            Some((_, list)) => list.push(r),
            None => out.push((t.owner, vec![r])),
        }
    }
    Ok(out)
}

/// `lb targets …`.
pub fn targets(args: TargetsArgs) -> anyhow::Result<()> {
    let a = &args.admin;
    type Make = fn(String, Vec<TargetRef>) -> Request;
    let (specs, make): (&[String], Make) = match &args.action {
        TargetsAction::Register { targets } => (targets, |g, t| Request::RegisterTargets {
            target_group_name: g,
            targets: t,
        }),
        TargetsAction::Deregister { targets } => (targets, |g, t| Request::DeregisterTargets {
            target_group_name: g,
            targets: t,
        }),
        TargetsAction::Disable { targets } => (targets, |g, t| Request::SetTargetsEnabled {
            target_group_name: g,
            targets: t,
            enabled: false,
        }),
        TargetsAction::Enable { targets } => (targets, |g, t| Request::SetTargetsEnabled {
            target_group_name: g,
            targets: t,
            enabled: true,
        }),
        TargetsAction::Health { group } => {
            let r = send(
                a,
                &Request::DescribeTargetHealth {
                    target_group_name: group.clone(),
                    targets: None,
                },
            )?;
            return if a.json {
                print_json(&r)
            } else {
                print_health(&r);
                Ok(())
            };
        }
    };
    let weights = matches!(args.action, TargetsAction::Register { .. });
    for (owner, targets) in by_owner(specs, weights)? {
        send(a, &make(owner.clone(), targets)).with_context(|| format!("targets of {owner:?}"))?;
    }
    Ok(())
}

fn print_health(r: &Response) {
    let rows = r.target_health_descriptions.as_deref().unwrap_or_default();
    println!(
        "{:<20} {:<26} {:>5} {:>6}  {:<18} {:<30} DESCRIPTION",
        "GROUP", "TARGET", "PORT", "WEIGHT", "STATE", "REASON"
    );
    for d in rows {
        let t = &d.description;
        println!(
            "{:<20} {:<26} {:>5} {:>6}  {:<18} {:<30} {}",
            d.target_group_name,
            t.target.id,
            t.target.port,
            t.target.weight.map_or("-".to_owned(), |w| w.to_string()),
            t.target_health.state,
            t.target_health.reason.as_deref().unwrap_or("-"),
            t.target_health.description.as_deref().unwrap_or("")
        );
    }
}

/// `lb groups …`.
pub fn groups(args: GroupsArgs) -> anyhow::Result<()> {
    let a = &args.admin;
    let req = match args.action.unwrap_or(GroupsAction::Describe) {
        GroupsAction::Describe => Request::DescribeTargetGroups { names: None },
        GroupsAction::Create { spec } => {
            let (name, options) = spec.split_once(',').unwrap_or((spec.as_str(), ""));
            Request::CreateTargetGroup {
                name: name.to_owned(),
                options: options.to_owned(),
            }
        }
        GroupsAction::Modify { name, options } => Request::ModifyTargetGroup(Box::new(
            crate::admin::api::ModifyTargetGroup::from_options(&name, &options)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        )),
        GroupsAction::Delete { name } => Request::DeleteTargetGroup {
            target_group_name: name,
        },
    };
    let r = send(a, &req)?;
    if a.json {
        return print_json(&r);
    }
    let Some(groups) = &r.target_groups else {
        return Ok(());
    };
    println!(
        "{:<20} {:<6} {:>7} {:>9} {:<9}  {:<34} USED BY",
        "GROUP", "PROTO", "HEALTHY", "UNHEALTHY", "FAILOPEN", "HEALTH CHECK"
    );
    for g in groups {
        let h = &g.health_check;
        let check = match (&h.health_check_protocol, h.health_check_enabled) {
            (Some(p), Some(true)) => format!(
                "{p} {}{} every {}s",
                h.health_check_port.as_deref().unwrap_or("-"),
                h.health_check_path.as_deref().unwrap_or(""),
                h.health_check_interval_seconds.unwrap_or_default()
            ),
            _ => "off".to_owned(),
        };
        println!(
            "{:<20} {:<6} {:>7} {:>9} {:<9}  {:<34} {}",
            g.target_group_name,
            g.protocol,
            g.healthy_host_count,
            g.un_healthy_host_count,
            if g.failing_open { "yes" } else { "no" },
            check,
            g.used_by.join(", ")
        );
    }
    Ok(())
}

/// `lb listeners`.
pub fn listeners(args: ListenersArgs) -> anyhow::Result<()> {
    let r = send(&args.admin, &Request::DescribeListeners)?;
    if args.admin.json {
        return print_json(&r);
    }
    println!(
        "{:<20} {:<6} {:<24} {:>5}  DEFAULT ACTION",
        "LISTENER", "PROTO", "ADDRESS", "RULES"
    );
    for l in r.listeners.unwrap_or_default() {
        println!(
            "{:<20} {:<6} {:<24} {:>5}  {}",
            l.listener_name, l.protocol, l.address, l.rule_count, l.default_actions
        );
    }
    Ok(())
}

/// `lb vips …`.
pub fn vips(args: VipsArgs) -> anyhow::Result<()> {
    let req = match args.action {
        None | Some(VipsAction::Guards { vip: None }) => {
            Request::DescribeVipGuards { vip_name: None }
        }
        Some(VipsAction::Guards { vip }) => Request::DescribeVipGuards { vip_name: vip },
        Some(VipsAction::SetGuards { vip, options }) => Request::ModifyVipGuards {
            vip_name: vip,
            options,
        },
    };
    let r = send(&args.admin, &req)?;
    if args.admin.json {
        return print_json(&r);
    }
    println!("{:<20} {:<28} {:<5} GUARDS", "VIP", "ADDRESS", "MODE");
    for v in r.vip_guards.unwrap_or_default() {
        println!(
            "{:<20} {:<28} {:<5} {}",
            v.vip_name, v.vip, v.mode, v.guards
        );
    }
    Ok(())
}

/// `lb rules …`.
pub fn rules(args: RulesArgs) -> anyhow::Result<()> {
    let req = match args.action {
        RulesAction::Describe { listener } => Request::DescribeRules {
            listener_name: listener,
        },
        RulesAction::Create {
            listener,
            priority,
            rule,
        } => Request::CreateRule {
            listener_name: listener,
            priority,
            rule,
        },
        RulesAction::Modify {
            listener,
            priority,
            rule,
        } => Request::ModifyRule {
            listener_name: listener,
            priority,
            rule,
        },
        RulesAction::Delete { listener, priority } => Request::DeleteRule {
            listener_name: listener,
            priority,
        },
        RulesAction::SetPriorities { listener, moves } => {
            let mut pairs = Vec::new();
            for m in &moves {
                let (from, to) = m
                    .split_once(':')
                    .and_then(|(f, t)| Some((f.parse().ok()?, t.parse().ok()?)))
                    .with_context(|| format!("{m:?}: expected FROM:TO, e.g. 10:20"))?;
                pairs.push(PriorityMove {
                    priority: from,
                    new_priority: to,
                });
            }
            Request::SetRulePriorities {
                listener_name: listener,
                rule_priorities: pairs,
            }
        }
    };
    let r = send(&args.admin, &req)?;
    if args.admin.json {
        return print_json(&r);
    }
    println!("{:<9} RULE", "PRIORITY");
    for rule in r.rules.unwrap_or_default() {
        println!("{:<9} {}", rule.priority, rule.rule);
    }
    Ok(())
}
