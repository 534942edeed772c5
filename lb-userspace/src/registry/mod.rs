//! The registry: the one source of truth for target groups and their targets, serving both
//! planes.
//!
//! A target's AWS state is derived from three independent facts:
//! - its **lifecycle**: in use, or draining until a deadline (then it is removed);
//! - its **health** ([`health::Health`]): unknown, healthy, or unhealthy with a reason;
//! - an **operator switch**: in service, or taken out of service by hand.
//!
//! Writers (the flags at start, the admin API, health checkers, lifecycle timers) change the
//! registry; [`Registry::publish`] turns every visible change into a new [`Snapshot`], which
//! the L7 picker, the L4 ring writer and the health checkers consume ([`ControlPlane`] wraps
//! the registry with the publishing channel and the timers). Everything here is pure: time
//! comes in as an argument, so the whole lifecycle is tested without waiting.
//!
//! Which targets take new traffic is decided here, once, for both tiers ([`routing`]).
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod health;
mod plane;
pub mod spec;
pub mod view;

pub use health::{CheckResult, Flip, Health, Status};
pub use plane::ControlPlane;
pub use spec::{MAX_WEIGHT, TargetSpec, parse_target};
pub use view::{
    GroupView, Snapshot, TargetDescription, TargetHealth, TargetHealthDescription, TargetView,
};

use crate::l4::{VipAddr, VipMode, VipSpec};
use crate::targets::{
    Member, SlowStart, TargetGroupConfig, TargetGroupError, TargetProtocol, TargetReason,
    TargetState, modify_target_group, routing,
};

/// Why a registry change was refused. Each message names the group and target at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// No such group.
    #[error("no target group is named {0:?}")]
    NoSuchGroup(String),
    /// A group of this name exists.
    #[error("a target group named {0:?} exists")]
    GroupExists(String),
    /// The group is used and cannot be deleted.
    #[error("target group {group:?} is in use by {users}")]
    GroupInUse {
        /// The group.
        group: String,
        /// Who uses it.
        users: String,
    },
    /// The target is not registered with the group.
    #[error("{target} is not registered with target group {group:?}")]
    NotRegistered {
        /// The group.
        group: String,
        /// The target.
        target: SocketAddr,
    },
    /// The target cannot be registered with the group.
    #[error("{target} cannot be registered with target group {group:?}: {problem}")]
    InvalidTarget {
        /// The group.
        group: String,
        /// The target.
        target: SocketAddr,
        /// Why.
        problem: String,
    },
    /// A VIP cannot use the group.
    #[error("VIP {vip} cannot forward to target group {group:?}: {problem}")]
    InvalidVip {
        /// The VIP.
        vip: VipAddr,
        /// The group.
        group: String,
        /// Why.
        problem: String,
    },
    /// A group option was refused.
    #[error(transparent)]
    Config(#[from] TargetGroupError),
}

/// Where a target is in its registration's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    /// Registered.
    InUse,
    /// Deregistered: no new traffic, what is open finishes until the deadline.
    Draining { until: Instant },
}

#[derive(Debug, Clone)]
struct Target {
    weight: u32,
    generation: u64,
    lifecycle: Lifecycle,
    /// The operator switch: false = taken out of service by hand.
    enabled: bool,
    health: Health,
    /// When its slow-start ramp began.
    slow_start_since: Option<Instant>,
}

#[derive(Debug)]
struct Group {
    config: Arc<TargetGroupConfig>,
    /// Listener rules forwarding to it.
    rule_users: usize,
    targets: BTreeMap<SocketAddr, Target>,
}

/// An L4 VIP and the target group it forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipBinding {
    /// The VIP.
    pub spec: VipSpec,
    /// Its target group.
    pub group: String,
}

/// The registry (see the module docs).
#[derive(Debug, Default)]
pub struct Registry {
    groups: BTreeMap<String, Group>,
    vips: Vec<VipBinding>,
    next_generation: u64,
    version: u64,
    published: BTreeMap<String, Arc<GroupView>>,
    /// Groups whose view may have changed since the last publish.
    dirty: BTreeSet<String>,
}

/// What a target's facts add up to.
struct Derived {
    state: TargetState,
    reason: Option<TargetReason>,
    description: String,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn group(&self, name: &str) -> Result<&Group, RegistryError> {
        self.groups
            .get(name)
            .ok_or_else(|| RegistryError::NoSuchGroup(name.to_owned()))
    }

    fn group_mut(&mut self, name: &str) -> Result<&mut Group, RegistryError> {
        self.dirty.insert(name.to_owned());
        self.groups
            .get_mut(name)
            .ok_or_else(|| RegistryError::NoSuchGroup(name.to_owned()))
    }

    /// Adds an empty target group.
    pub fn create_group(&mut self, config: TargetGroupConfig) -> Result<(), RegistryError> {
        if self.groups.contains_key(&config.name) {
            return Err(RegistryError::GroupExists(config.name));
        }
        self.dirty.insert(config.name.clone());
        self.groups.insert(
            config.name.clone(),
            Group {
                config: Arc::new(config),
                rule_users: 0,
                targets: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Removes a group no rule or VIP uses (its targets go with it, without draining).
    pub fn delete_group(&mut self, name: &str) -> Result<(), RegistryError> {
        let g = self.group(name)?;
        let vips: Vec<String> = self
            .vips
            .iter()
            .filter(|v| v.group == name)
            .map(|v| v.spec.label())
            .collect();
        if g.rule_users > 0 || !vips.is_empty() {
            let mut users = Vec::new();
            if g.rule_users > 0 {
                users.push(format!("{} listener rule(s)", g.rule_users));
            }
            if !vips.is_empty() {
                users.push(format!("VIP(s) {}", vips.join(", ")));
            }
            return Err(RegistryError::GroupInUse {
                group: name.to_owned(),
                users: users.join(" and "),
            });
        }
        self.groups.remove(name);
        self.dirty.insert(name.to_owned());
        Ok(())
    }

    /// The group's configuration.
    pub fn group_config(&self, name: &str) -> Result<Arc<TargetGroupConfig>, RegistryError> {
        Ok(self.group(name)?.config.clone())
    }

    /// The addresses of `group`'s targets (none for an unknown group).
    pub fn target_addrs(&self, group: &str) -> Vec<IpAddr> {
        self.groups
            .get(group)
            .map(|g| g.targets.keys().map(SocketAddr::ip).collect())
            .unwrap_or_default()
    }

    /// How many targets `group` has (0 for an unknown group).
    pub fn target_count(&self, group: &str) -> usize {
        self.groups.get(group).map_or(0, |g| g.targets.len())
    }

    /// Every group name.
    pub fn group_names(&self) -> Vec<String> {
        self.groups.keys().cloned().collect()
    }

    /// The VIPs and their groups.
    pub fn vips(&self) -> &[VipBinding] {
        &self.vips
    }

    /// Makes `spec` forward to `group`. The group must suit L4 (TCP VIPs take TCP or HTTP(S)
    /// groups, UDP VIPs UDP groups), every VIP of a group must share the port (direct server
    /// return cannot translate ports), and registered targets must fit.
    pub fn add_vip(&mut self, spec: VipSpec, group: &str) -> Result<(), RegistryError> {
        let invalid = |problem: String| RegistryError::InvalidVip {
            vip: spec.vip,
            group: group.to_owned(),
            problem,
        };
        let g = self.group(group)?;
        let protocol = g.config.protocol;
        let fits = match spec.vip.proto {
            crate::l4::Proto::Tcp => protocol != TargetProtocol::Udp,
            crate::l4::Proto::Udp => protocol == TargetProtocol::Udp,
        };
        if !fits {
            return Err(invalid(format!(
                "a {} VIP needs a {} target group, and this one is {protocol}",
                spec.vip.proto,
                match spec.vip.proto {
                    crate::l4::Proto::Tcp => "tcp, http or https",
                    crate::l4::Proto::Udp => "udp",
                }
            )));
        }
        if let Some(other) = self
            .vips
            .iter()
            .find(|v| v.group == group && v.spec.vip.port != spec.vip.port)
        {
            return Err(invalid(format!(
                "VIP {} uses it with port {}: with direct server return every VIP of a group \
                 must share the port",
                other.spec.vip, other.spec.vip.port
            )));
        }
        for addr in g.targets.keys() {
            check_l4_target(&spec, *addr).map_err(invalid)?;
        }
        self.vips.push(VipBinding {
            spec,
            group: group.to_owned(),
        });
        self.dirty.insert(group.to_owned());
        Ok(())
    }

    /// Sets how many listener rules forward to each group (from the listeners' current rule
    /// sets; groups not named have none).
    pub fn set_rule_users(&mut self, users: &BTreeMap<String, usize>) {
        for (name, g) in &mut self.groups {
            let n = users.get(name).copied().unwrap_or(0);
            if g.rule_users != n {
                g.rule_users = n;
                self.dirty.insert(name.clone());
            }
        }
    }

    /// Turns a target spec into its group and address, once, for flags and admin requests
    /// alike: the owner is a VIP (its group) or a group; a missing port is the VIP's port.
    pub fn resolve(&self, spec: &TargetSpec) -> Result<(String, SocketAddr), String> {
        let (group, vip) = match self.vips.iter().find(|v| v.spec.answers_to(&spec.owner)) {
            Some(v) => (v.group.clone(), Some(&v.spec)),
            None if self.groups.contains_key(&spec.owner) => {
                let vip = self
                    .vips
                    .iter()
                    .find(|v| v.group == spec.owner)
                    .map(|v| &v.spec);
                (spec.owner.clone(), vip)
            }
            None => {
                return Err(format!("no VIP or target group is named {:?}", spec.owner));
            }
        };
        let port = match (vip, spec.port) {
            (Some(vip), given) => vip.target_port(given)?,
            (None, Some(p)) => p,
            (None, None) => {
                return Err(format!(
                    "targets of target group {group:?} need a port: ADDR:PORT"
                ));
            }
        };
        Ok((group, SocketAddr::new(spec.addr, port)))
    }

    /// Why `addr` cannot be a target of `group`, if it cannot.
    fn check_target(&self, group: &str, g: &Group, addr: SocketAddr) -> Result<(), String> {
        for v in self.vips.iter().filter(|v| v.group == group) {
            check_l4_target(&v.spec, addr)?;
        }
        if g.config.protocol.is_http() && addr.port() == 0 {
            return Err("targets of an HTTP/HTTPS target group need a port".into());
        }
        Ok(())
    }

    /// Registers targets (AWS register-targets), all or none. A new target starts `initial`
    /// and takes traffic once a check passes; registering a registered target changes its
    /// weight, and brings it back if it was draining.
    pub fn register(
        &mut self,
        group: &str,
        targets: &[(SocketAddr, u32)],
    ) -> Result<(), RegistryError> {
        let g = self.group(group)?;
        for &(addr, weight) in targets {
            let invalid = |problem: String| RegistryError::InvalidTarget {
                group: group.to_owned(),
                target: addr,
                problem,
            };
            if !(1..=MAX_WEIGHT).contains(&weight) {
                return Err(invalid(format!("weight {weight} is not 1 to {MAX_WEIGHT}")));
            }
            self.check_target(group, g, addr).map_err(invalid)?;
        }
        let mut generation = self.next_generation;
        let g = self.group_mut(group)?;
        for &(addr, weight) in targets {
            match g.targets.get_mut(&addr) {
                Some(t) => {
                    t.weight = weight;
                    t.lifecycle = Lifecycle::InUse;
                }
                None => {
                    generation += 1;
                    g.targets.insert(
                        addr,
                        Target {
                            weight,
                            generation,
                            lifecycle: Lifecycle::InUse,
                            enabled: true,
                            health: Health::default(),
                            slow_start_since: None,
                        },
                    );
                }
            }
        }
        self.next_generation = generation;
        Ok(())
    }

    /// Deregisters targets (AWS deregister-targets), all or none: they drain for the group's
    /// deregistration delay (no new traffic; open requests and flows continue), then leave.
    pub fn deregister(
        &mut self,
        group: &str,
        addrs: &[SocketAddr],
        now: Instant,
    ) -> Result<(), RegistryError> {
        let g = self.registered(group, addrs)?;
        let delay = g.config.attributes.deregistration_delay;
        for addr in addrs {
            if delay.is_zero() {
                g.targets.remove(addr);
                continue;
            }
            if let Some(t) = g.targets.get_mut(addr)
                && t.lifecycle == Lifecycle::InUse
            {
                t.lifecycle = Lifecycle::Draining { until: now + delay };
            }
        }
        Ok(())
    }

    /// The operator switch: `false` takes targets out of service (no new traffic, open
    /// connections continue, checks go on); `true` puts them back.
    pub fn set_enabled(
        &mut self,
        group: &str,
        addrs: &[SocketAddr],
        enabled: bool,
    ) -> Result<(), RegistryError> {
        let g = self.registered(group, addrs)?;
        for addr in addrs {
            if let Some(t) = g.targets.get_mut(addr) {
                t.enabled = enabled;
            }
        }
        Ok(())
    }

    /// `group`, to change, if every one of `addrs` is registered with it (else nothing
    /// changes and the first missing one is named).
    fn registered(
        &mut self,
        group: &str,
        addrs: &[SocketAddr],
    ) -> Result<&mut Group, RegistryError> {
        let g = self.group(group)?;
        if let Some(missing) = addrs.iter().find(|a| !g.targets.contains_key(a)) {
            return Err(RegistryError::NotRegistered {
                group: group.to_owned(),
                target: *missing,
            });
        }
        self.group_mut(group)
    }

    /// A target a previous `lb run` had in service (the pinned maps say so) starts healthy
    /// rather than initial, so adopting the maps changes no ring slot while its checks start
    /// over; the checks demote it as usual if it fails them. Returns whether it was found.
    pub fn assume_healthy(&mut self, group: &str, addr: SocketAddr) -> bool {
        let Some(t) = self
            .groups
            .get_mut(group)
            .and_then(|g| g.targets.get_mut(&addr))
        else {
            return false;
        };
        t.health.status = Status::Healthy;
        t.health.checks_started = true;
        self.dirty.insert(group.to_owned());
        true
    }

    /// Whether `addr` is registered with `group`.
    pub fn has_target(&self, group: &str, addr: SocketAddr) -> bool {
        self.groups
            .get(group)
            .is_some_and(|g| g.targets.contains_key(&addr))
    }

    /// A check of registration `generation` started (initial targets then show
    /// Elb.InitialHealthChecking).
    pub fn checking(&mut self, group: &str, addr: SocketAddr, generation: u64) {
        let Some(t) = self.target_mut(group, addr, generation) else {
            return;
        };
        if !t.health.checks_started {
            t.health.checks_started = true;
            self.dirty.insert(group.to_owned());
        }
    }

    fn target_mut(
        &mut self,
        group: &str,
        addr: SocketAddr,
        generation: u64,
    ) -> Option<&mut Target> {
        self.groups
            .get_mut(group)?
            .targets
            .get_mut(&addr)
            .filter(|t| t.generation == generation)
    }

    /// Takes a check result for registration `generation` of `addr` (results for an earlier
    /// registration are ignored). Returns the flip it caused.
    pub fn report(
        &mut self,
        group: &str,
        addr: SocketAddr,
        generation: u64,
        result: CheckResult,
        now: Instant,
    ) -> Option<Flip> {
        let g = self.groups.get(group)?;
        let check = g.config.check()?;
        let slow_start = g.config.attributes.slow_start;
        // Slow start applies only while another healthy target is not ramping itself.
        let others_serving = g.targets.iter().any(|(a, t)| {
            *a != addr
                && t.health.status == Status::Healthy
                && t.lifecycle == Lifecycle::InUse
                && t.slow_start_since
                    .zip(slow_start)
                    .is_none_or(|(since, d)| now >= since + d)
        });
        let t = self.target_mut(group, addr, generation)?;
        let before = t.health.clone();
        let flip = t.health.observe(
            result,
            check.healthy_threshold,
            check.unhealthy_threshold,
            now,
        );
        match flip {
            Some(Flip::Healthy) if slow_start.is_some() && others_serving => {
                t.slow_start_since = Some(now);
            }
            Some(_) => t.slow_start_since = None,
            None => {}
        }
        // Counters alone change nothing anyone sees; the rest may.
        let visible = flip.is_some()
            || before.error != t.health.error
            || before.checks_started != t.health.checks_started
            || (before.last_failure != t.health.last_failure
                && !matches!(t.health.status, Status::Healthy));
        if visible {
            self.dirty.insert(group.to_owned());
        }
        flip
    }

    /// Changes a group's health checks and attributes (AWS modify-target-group and
    /// modify-target-group-attributes). Turning checks off or on resets what the checks
    /// said: the targets become `unavailable`, or `initial` until checked again.
    pub fn modify_group(
        &mut self,
        name: &str,
        changes: &[(String, String)],
    ) -> Result<(), RegistryError> {
        let g = self.group_mut(name)?;
        let new = modify_target_group(&g.config, changes)?;
        if new.health_check.enabled != g.config.health_check.enabled
            || new
                .check()
                .map(|c| (c.protocol, c.port, c.path, c.matcher, c.mode))
                != g.config
                    .check()
                    .map(|c| (c.protocol, c.port, c.path, c.matcher, c.mode))
        {
            for t in g.targets.values_mut() {
                t.health = Health::default();
                t.slow_start_since = None;
            }
        }
        g.config = Arc::new(new);
        Ok(())
    }

    /// Ends what is due at `now`: drained targets leave; everything time-dependent (unhealthy
    /// draining, slow start, remaining drain time) is re-derived at the next publish.
    pub fn tick(&mut self, now: Instant) {
        for (name, g) in &mut self.groups {
            let attrs = &g.config.attributes;
            // Only a group with something that changes by itself (a drain, an unhealthy-draining
            // interval, a slow-start ramp) can look different now: the timer task ticks on
            // every wake-up, so the others are not re-derived each time.
            let timed = g.targets.values().any(|t| {
                matches!(t.lifecycle, Lifecycle::Draining { .. })
                    || (matches!(t.health.status, Status::Unhealthy { .. })
                        && attrs.unhealthy_draining.is_some())
                    || (t.slow_start_since.is_some() && attrs.slow_start.is_some())
            });
            if !timed {
                continue;
            }
            g.targets.retain(|_, t| match t.lifecycle {
                Lifecycle::Draining { until } => now < until,
                Lifecycle::InUse => true,
            });
            self.dirty.insert(name.clone());
        }
    }

    /// The next moment something changes by itself (a drain ends, an unhealthy-draining
    /// interval or a slow-start ramp runs out).
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| {
            if t > now {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        for g in self.groups.values() {
            let attrs = &g.config.attributes;
            for t in g.targets.values() {
                if let Lifecycle::Draining { until } = t.lifecycle {
                    consider(until);
                }
                if let (Status::Unhealthy { since }, Some(d)) =
                    (t.health.status, attrs.unhealthy_draining)
                {
                    consider(since + d);
                }
                if let (Some(since), Some(d)) = (t.slow_start_since, attrs.slow_start) {
                    consider(since + d);
                }
            }
        }
        next
    }

    /// A group is in use when a listener rule or a VIP forwards to it.
    fn in_use(&self, name: &str, g: &Group) -> bool {
        g.rule_users > 0 || self.vips.iter().any(|v| v.group == name)
    }

    /// A target's AWS state, reason and description.
    fn derive(&self, name: &str, g: &Group, t: &Target, now: Instant) -> Derived {
        let d = |state, reason: Option<TargetReason>, description: &str| Derived {
            state,
            reason,
            description: description.to_owned(),
        };
        if let Lifecycle::Draining { .. } = t.lifecycle {
            return d(
                TargetState::Draining,
                Some(TargetReason::DeregistrationInProgress),
                "Target deregistration is in progress",
            );
        }
        if !t.enabled {
            return d(
                TargetState::Unused,
                Some(TargetReason::NotInUse),
                "Taken out of service by an operator (lb targets enable puts it back)",
            );
        }
        if !self.in_use(name, g) {
            return d(
                TargetState::Unused,
                Some(TargetReason::NotInUse),
                "Target group is not used by any listener rule or VIP",
            );
        }
        if g.config.check().is_none() {
            return d(
                TargetState::Unavailable,
                Some(TargetReason::HealthCheckDisabled),
                "Health checks are disabled",
            );
        }
        if let Some(e) = &t.health.error {
            return Derived {
                state: TargetState::Unavailable,
                reason: Some(TargetReason::InternalError),
                description: format!("The load balancer could not check the target: {e}"),
            };
        }
        match t.health.status {
            Status::Unknown if !t.health.checks_started => d(
                TargetState::Initial,
                Some(TargetReason::RegistrationInProgress),
                "Target registration is in progress",
            ),
            Status::Unknown => Derived {
                state: TargetState::Initial,
                reason: Some(TargetReason::InitialHealthChecking),
                description: match &t.health.last_failure {
                    Some((_, why)) => {
                        format!("Initial health checking in progress; last check: {why}")
                    }
                    None => "Initial health checking in progress".to_owned(),
                },
            },
            Status::Healthy => d(TargetState::Healthy, None, ""),
            Status::Unhealthy { since } => {
                let (reason, why) = t.health.last_failure.clone().unwrap_or((
                    TargetReason::FailedHealthChecks,
                    "Health checks failed".into(),
                ));
                let draining = g
                    .config
                    .attributes
                    .unhealthy_draining
                    .is_some_and(|dur| now < since + dur);
                Derived {
                    state: if draining {
                        TargetState::UnhealthyDraining
                    } else {
                        TargetState::Unhealthy
                    },
                    reason: Some(reason),
                    description: why,
                }
            }
        }
    }

    /// Builds one group's view at `now`.
    fn view(&self, name: &str, g: &Group, now: Instant) -> GroupView {
        let derived: Vec<(&SocketAddr, &Target, Derived)> = g
            .targets
            .iter()
            .map(|(a, t)| (a, t, self.derive(name, g, t, now)))
            .collect();
        let failing_open = routing::failing_open(
            derived.iter().map(|(_, _, d)| d.state),
            g.config.attributes.min_healthy,
        );
        let in_use = self.in_use(name, g);
        let check = g.config.check();
        let slow_start = g.config.attributes.slow_start;
        let targets = derived
            .into_iter()
            .map(|(addr, t, d)| {
                let takes_new = routing::takes_new(d.state, failing_open);
                // `initial` is no verdict: a new target has no flows yet, and one whose
                // checks were just changed or turned on keeps the flows it had while the
                // checks start over.
                let keeps_existing = takes_new
                    || matches!(
                        d.state,
                        TargetState::Draining
                            | TargetState::UnhealthyDraining
                            | TargetState::Initial
                    )
                    || (!t.enabled && t.lifecycle == Lifecycle::InUse);
                let ramp = t
                    .slow_start_since
                    .zip(slow_start)
                    .filter(|(since, dur)| now < *since + *dur)
                    .map(|(since, duration)| SlowStart { since, duration });
                TargetView {
                    member: Member {
                        addr: *addr,
                        weight: t.weight,
                        state: d.state,
                        reason: d.reason,
                        takes_new,
                        slow_start: ramp.filter(|_| d.state == TargetState::Healthy),
                    },
                    keeps_existing,
                    description: d.description,
                    generation: t.generation,
                    checked: in_use && check.is_some() && t.lifecycle == Lifecycle::InUse,
                    draining_until: match t.lifecycle {
                        Lifecycle::Draining { until } => Some(until),
                        Lifecycle::InUse => None,
                    },
                }
            })
            .collect();
        GroupView {
            config: g.config.clone(),
            check,
            in_use,
            dsr_vips: self
                .vips
                .iter()
                .filter(|v| v.group == name && v.spec.mode == VipMode::Dsr)
                .map(|v| v.spec.vip)
                .collect(),
            failing_open,
            targets,
        }
    }

    /// Rebuilds the views of the groups that may have changed; returns the new snapshot if
    /// any view did change. State changes are logged here, once, whoever caused them.
    pub fn publish(&mut self, now: Instant) -> Option<Arc<Snapshot>> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut changed = false;
        for name in dirty {
            let Some(g) = self.groups.get(&name) else {
                changed |= self.published.remove(&name).is_some();
                continue;
            };
            let view = self.view(&name, g, now);
            if self.published.get(&name).is_some_and(|old| **old == view) {
                continue;
            }
            log_transitions(&name, self.published.get(&name).map(|v| &**v), &view);
            self.published.insert(name, Arc::new(view));
            changed = true;
        }
        if !changed && self.version > 0 {
            return None;
        }
        self.version += 1;
        Some(Arc::new(Snapshot {
            version: self.version,
            groups: self.published.clone(),
        }))
    }

    /// AWS describe-target-health: every registered target of `group`, or the ones asked
    /// for (an unregistered one is `unused`, Target.NotRegistered, as AWS reports it).
    pub fn describe_target_health(
        &self,
        group: &str,
        only: Option<&[SocketAddr]>,
        now: Instant,
    ) -> Result<Vec<TargetHealthDescription>, RegistryError> {
        let g = self.group(group)?;
        let check = g.config.check();
        let hc_port = |addr: &SocketAddr| match &check {
            Some(c) => c
                .port
                .resolve(addr.port())
                .map_or_else(|| "-".to_owned(), |p| p.to_string()),
            None => "-".to_owned(),
        };
        let describe = |addr: &SocketAddr, t: &Target| {
            let d = self.derive(group, g, t, now);
            let mut description = d.description;
            if let Lifecycle::Draining { until } = t.lifecycle {
                let left = until.saturating_duration_since(now);
                description = format!("{description} ({} s left)", round_up_secs(left));
            }
            TargetHealthDescription {
                target: TargetDescription {
                    id: addr.ip().to_string(),
                    port: addr.port(),
                    weight: Some(t.weight),
                },
                health_check_port: hc_port(addr),
                target_health: TargetHealth {
                    state: d.state.as_str().to_owned(),
                    reason: d.reason.map(|r| r.code().to_owned()),
                    description: (!description.is_empty()).then_some(description),
                },
            }
        };
        Ok(match only {
            None => g.targets.iter().map(|(a, t)| describe(a, t)).collect(),
            Some(addrs) => addrs
                .iter()
                .map(|a| match g.targets.get(a) {
                    Some(t) => describe(a, t),
                    None => TargetHealthDescription {
                        target: TargetDescription {
                            id: a.ip().to_string(),
                            port: a.port(),
                            weight: None,
                        },
                        health_check_port: hc_port(a),
                        target_health: TargetHealth {
                            state: TargetState::Unused.as_str().to_owned(),
                            reason: Some(TargetReason::NotRegistered.code().to_owned()),
                            description: Some(
                                "Target is not registered to the target group".to_owned(),
                            ),
                        },
                    },
                })
                .collect(),
        })
    }
}

/// Whole seconds, rounded up (a drain with 0.3 s left shows "1 s left").
fn round_up_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Why `addr` cannot be a target of `spec`, if it cannot.
/// Under DSR, targets of either family serve VIPs of either family: the outer header takes the
/// target's family (IPv4-in-IPv6 for an IPv4 VIP on an IPv6-only underlay, and so on). Under
/// NAT the packet itself is readdressed, so the target must be of the VIP's family.
fn check_l4_target(spec: &VipSpec, addr: SocketAddr) -> Result<(), String> {
    let vip = &spec.vip;
    if spec.mode == VipMode::Nat && addr.is_ipv4() != vip.addr.is_ipv4() {
        return Err(format!(
            "{} cannot serve NAT VIP {vip}: NAT rewrites the packet's own addresses, so the \
             target must be of the VIP's address family",
            addr.ip()
        ));
    }
    let unroutable = match addr.ip() {
        IpAddr::V4(a) => {
            a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback()
        }
        IpAddr::V6(a) => {
            a.is_unspecified()
                || a.is_multicast()
                || a.is_loopback()
                || a.is_unicast_link_local()
                || a.to_ipv4_mapped().is_some()
        }
    };
    if unroutable {
        return Err(format!(
            "{} cannot be the outer destination of encapsulated packets (an L4 target needs a \
             routable unicast address; for IPv4 use the address itself, not ::ffff:…)",
            addr.ip()
        ));
    }
    let given = (addr.port() != 0).then_some(addr.port());
    spec.target_port(given).map(|_| ())
}

/// Logs every target whose state or reason changed between two views of a group.
fn log_transitions(group: &str, old: Option<&GroupView>, new: &GroupView) {
    let before_by_addr: std::collections::HashMap<SocketAddr, &TargetView> = old
        .map(|o| o.targets.iter().map(|t| (t.addr(), t)).collect())
        .unwrap_or_default();
    for t in &new.targets {
        let before = before_by_addr.get(&t.addr()).copied();
        let (state, reason) = (t.member.state, t.member.reason);
        match before {
            Some(b) if b.member.state == state && b.member.reason == reason => {}
            _ => tracing::info!(
                group,
                target = %t.addr(),
                from = before.map_or("-", |b| b.member.state.as_str()),
                to = state.as_str(),
                reason = reason.map_or("-", TargetReason::code),
                description = %t.description,
                "target state changed"
            ),
        }
    }
    if let Some(old) = old {
        let now: std::collections::HashSet<SocketAddr> =
            new.targets.iter().map(TargetView::addr).collect();
        for gone in old.targets.iter().filter(|o| !now.contains(&o.addr())) {
            tracing::info!(group, target = %gone.addr(), from = gone.member.state.as_str(), to = "unused", reason = "Target.NotRegistered", "target left the group");
        }
        if old.failing_open != new.failing_open {
            tracing::warn!(
                group,
                failing_open = new.failing_open,
                "group fail-open changed"
            );
        }
    }
}

#[cfg(test)]
mod tests;
