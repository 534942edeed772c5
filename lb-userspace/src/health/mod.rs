//! Health checks: one task per checked target, following the registry.
//!
//! The supervisor watches the registry's snapshots and keeps exactly one check task per
//! target that needs checking (registered, its group in use, checks enabled), restarting it
//! when the group's check changes. Each task checks its target every interval, spread out:
//! the first check comes within the first second (a new target takes traffic only after one
//! passes), later ones every interval ± 5 %, so a group's checks never fire as one burst. A
//! task only reports to the registry; the registry decides what the results mean.
//!
//! For a group that serves L4 VIPs the checks go through the data path by default
//! ([`CheckMode::Auto`]): [`probe`] explains how. When such a probe times out, a direct probe
//! and the ICMP the target sent ([`icmp`]) tell whether the application is down or the
//! target cannot take VIP traffic (no `lb decap`, no VIP on `lo`, rp_filter), and the
//! description says which.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng as _;

pub mod icmp;
pub mod probe;

use crate::accesslog::LogWriter;
use crate::accesslog::health::{ProbeRecord, ProbeStatus};
use crate::l4::VipAddr;
use crate::registry::{CheckResult, ControlPlane, Snapshot};
use crate::targets::TargetReason;
use crate::targets::health_check::{CheckMode, CheckProtocol, HealthCheck};

/// Where data-path probes get the backend id their mark carries.
pub trait BackendIds: Send + Sync + 'static {
    /// The id of `addr:port` under `vip`, once the ring writer has it.
    fn backend_id(&self, vip: &VipAddr, addr: IpAddr, port: u16) -> Option<u32>;
}

/// What the checks of the data path need from the L4 tier.
#[derive(Clone)]
pub struct DataPath {
    /// Backend ids.
    pub ids: Arc<dyn BackendIds>,
    /// Protocol-unreachable answers (None when no raw socket could be opened).
    pub icmp: Option<Arc<icmp::IcmpWatch>>,
}

/// How one target is checked.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    check: HealthCheck,
    /// The VIPs to probe through; empty: direct.
    vips: Vec<VipAddr>,
}

type Key = (String, SocketAddr, u64);

/// Where each probe's result is logged (`--health-check-log`).
pub type ProbeLog = Arc<LogWriter<ProbeRecord>>;

/// Runs the checks the registry asks for, until the task is dropped; each probe's result goes
/// to `log` too, if given.
pub async fn supervise(
    plane: Arc<ControlPlane>,
    data_path: Option<DataPath>,
    log: Option<ProbeLog>,
) {
    let mut rx = plane.subscribe();
    let mut tasks: HashMap<Key, (Plan, tokio::task::JoinHandle<()>)> = HashMap::new();
    loop {
        let snapshot = rx.borrow_and_update().clone();
        let wanted = plans(&snapshot, data_path.is_some());
        tasks.retain(|key, (plan, task)| {
            let keep = wanted.get(key) == Some(plan);
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, plan) in wanted {
            if tasks.contains_key(&key) {
                continue;
            }
            let task = tokio::spawn(check_loop(
                plane.clone(),
                key.clone(),
                plan.clone(),
                data_path.clone(),
                log.clone(),
            ));
            tasks.insert(key, (plan, task));
        }
        if rx.changed().await.is_err() {
            break;
        }
    }
    for (_, (_, task)) in tasks {
        task.abort();
    }
}

/// The checks a snapshot asks for.
fn plans(snapshot: &Snapshot, have_data_path: bool) -> HashMap<Key, Plan> {
    let mut out = HashMap::new();
    for (name, g) in &snapshot.groups {
        let Some(check) = &g.check else { continue };
        let through_vips = match check.mode {
            CheckMode::Direct => false,
            CheckMode::DataPath => true,
            CheckMode::Auto => !g.dsr_vips.is_empty() && have_data_path,
        };
        for t in g.targets.iter().filter(|t| t.checked) {
            out.insert(
                (name.clone(), t.addr(), t.generation),
                Plan {
                    check: check.clone(),
                    vips: if through_vips {
                        g.dsr_vips.clone()
                    } else {
                        Vec::new()
                    },
                },
            );
        }
    }
    out
}

/// A random delay in `0..max`.
fn jitter(max: Duration) -> Duration {
    let max = max.as_micros().max(1) as u64;
    Duration::from_micros(rand::rng().random_range(0..max))
}

async fn check_loop(
    plane: Arc<ControlPlane>,
    (group, target, generation): Key,
    plan: Plan,
    data_path: Option<DataPath>,
    log: Option<ProbeLog>,
) {
    let interval = plan.check.interval;
    let group_name: Arc<str> = Arc::from(group.as_str());
    tokio::time::sleep(jitter(interval.min(Duration::from_secs(1)))).await;
    plane.write(|r, _| r.checking(&group, target, generation));
    loop {
        let started = Instant::now();
        let code = probe::StatusSeen::default();
        let result = probe::STATUS
            .scope(code.clone(), check_once(&plan, target, data_path.as_ref()))
            .await;
        if let Some(result) = result {
            if let Some(log) = &log {
                log.log(probe_record(
                    &plan,
                    &group_name,
                    target,
                    started,
                    &result,
                    code.get(),
                ));
            }
            plane.write(|r, now| r.report(&group, target, generation, result, now));
        }
        // Every interval ± 5 %, from the start of this check.
        let spread = interval / 10;
        let next = started + interval - spread / 2 + jitter(spread);
        tokio::time::sleep_until(next.into()).await;
    }
}

/// The health-check log's line for one result.
fn probe_record(
    plan: &Plan,
    group: &Arc<str>,
    target: SocketAddr,
    started: Instant,
    result: &CheckResult,
    status_code: Option<u16>,
) -> ProbeRecord {
    let port = plan.check.port.resolve(target.port()).unwrap_or(0);
    let (status, reason_code, description) = match result {
        CheckResult::Pass => (ProbeStatus::Pass, None, None),
        CheckResult::Fail {
            reason,
            description,
        } => (
            ProbeStatus::Fail,
            Some(reason.code()),
            Some(description.clone()),
        ),
        CheckResult::Error { description } => (
            ProbeStatus::Error,
            Some("Elb.InternalError"),
            Some(description.clone()),
        ),
    };
    ProbeRecord {
        time: std::time::SystemTime::now(),
        protocol: match plan.check.protocol {
            CheckProtocol::Http => "http",
            CheckProtocol::Https => "https",
            CheckProtocol::Tcp => "tcp",
        },
        target_group: group.clone(),
        target: SocketAddr::new(target.ip(), port),
        latency: started.elapsed(),
        status,
        status_code,
        reason_code,
        description,
    }
}

/// One round of checks of `target`; None when it cannot be checked yet (the ring writer
/// has not placed it in the data path).
async fn check_once(
    plan: &Plan,
    target: SocketAddr,
    data_path: Option<&DataPath>,
) -> Option<CheckResult> {
    let Some(port) = plan.check.port.resolve(target.port()) else {
        return Some(CheckResult::Error {
            description: "the target takes every port, so there is no traffic port to check: \
                          set health-check-port"
                .into(),
        });
    };
    let direct = probe::Probe {
        check: plan.check.clone(),
        connect_to: SocketAddr::new(target.ip(), port),
        host: format!("{}:{port}", target.ip()),
        mark: None,
    };
    let (Some(dp), false) = (data_path, plan.vips.is_empty()) else {
        return Some(probe::run(&direct).await);
    };
    let addr = target.ip();
    for vip in &plan.vips {
        let id = dp.ids.backend_id(vip, addr, target.port())?;
        let Some(mark) = lb_common::hc_mark(id) else {
            return Some(CheckResult::Error {
                description: format!("backend id {id} is beyond what a probe mark can carry"),
            });
        };
        let started = Instant::now();
        let through = probe::Probe {
            connect_to: SocketAddr::new(vip.addr, port),
            mark: Some(mark),
            ..direct.clone()
        };
        match probe::run(&through).await {
            CheckResult::Pass => continue,
            CheckResult::Fail {
                reason: TargetReason::Timeout,
                ..
            } => return Some(diagnose(&direct, addr, vip, dp, started).await),
            other => return Some(other),
        }
    }
    Some(CheckResult::Pass)
}

/// A data-path probe timed out: tell a target that cannot take VIP traffic from an
/// application that is down.
async fn diagnose(
    direct: &probe::Probe,
    addr: IpAddr,
    vip: &VipAddr,
    dp: &DataPath,
    since: Instant,
) -> CheckResult {
    let refused = dp
        .icmp
        .as_ref()
        .is_some_and(|w| w.refused_tunnel_since(addr, since));
    if refused {
        let (what, answer) = match addr {
            IpAddr::V4(_) => ("IP-in-IP", "ICMP protocol unreachable"),
            IpAddr::V6(_) => ("IP-in-IPv6", "ICMPv6 unrecognised next header"),
        };
        return CheckResult::Fail {
            reason: TargetReason::FailedHealthChecks,
            description: format!(
                "The target does not decapsulate {what} (it answered {answer}): run `lb \
                 decap` on it (VIP {})",
                vip.addr
            ),
        };
    }
    match probe::run(direct).await {
        CheckResult::Pass => CheckResult::Fail {
            reason: TargetReason::FailedHealthChecks,
            description: format!(
                "The target answers on its own address but not through the VIP {}: is the \
                 VIP on its loopback interface, is `lb decap` attached, and does rp_filter \
                 accept decapsulated packets?",
                vip.addr
            ),
        },
        direct_failure => direct_failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_below_its_bound_and_varies() {
        let max = Duration::from_millis(10);
        let samples: Vec<Duration> = (0..100).map(|_| jitter(max)).collect();
        assert!(samples.iter().all(|d| *d < max));
        assert!(samples.iter().any(|d| *d != samples[0]));
    }
}
