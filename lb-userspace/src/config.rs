//! Flags → one validated model. [`Config::from_run_args`] collects every problem, each with the
//! flag and value that caused it, so an operator fixes a command line in one go.
//!
//! The model's targets live in a [`Registry`], built through the same calls the admin API
//! makes at run time ([`Registry::resolve`], [`Registry::register`], …), so a target spec
//! means the same on the command line and in `lb targets register`.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crate::{
    cli::{RunArgs, XdpMode},
    dataplane::Sizes,
    l4::{
        GuardChange, VipMode, VipSpec, validate_name,
        vip::{MAX_IDLE_TIMEOUT, MIN_IDLE_TIMEOUT},
    },
    proxy::server::{ListenerConfig, parse_listener},
    registry::{Registry, parse_target},
    rules::{RuleBook, parse_rule},
    targets::{TargetGroupConfig, TargetProtocol, parse_target_group},
};

/// One problem with the flags.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {value:?}: {problem}")]
pub struct ConfigError {
    /// The flag, e.g. `--vip`.
    pub flag: &'static str,
    /// The value given (empty for problems of the whole command line).
    pub value: String,
    /// What is wrong and, where it helps, what would be right.
    pub problem: String,
}

impl ConfigError {
    /// A problem with one flag value.
    pub fn new(flag: &'static str, value: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            flag,
            value: value.into(),
            problem: problem.into(),
        }
    }
}

/// Every problem found; printed one per line.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// A parsed `--vip` value: `[NAME=]ADDR:PORT/PROTO[,forward=GROUP][,idle-timeout=SECS][,mode=dsr|nat][,GUARD…]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipFlag {
    /// The VIP.
    pub spec: VipSpec,
    /// The target group named by `forward=`, if any.
    pub forward: Option<String>,
}

/// Parses `[NAME=]ADDR:PORT/PROTO[,forward=GROUP][,idle-timeout=SECS][,mode=dsr|nat][,GUARD…]`.
pub fn parse_vip(s: &str) -> Result<VipFlag, String> {
    let mut parts = s.split(',');
    let head = parts.next().unwrap_or_default();
    let (name, rest) = match head.split_once('=') {
        Some((n, r)) => (Some(n), r),
        None => (None, head),
    };
    if let Some(n) = name {
        validate_name(n)?;
    }
    let mut forward = None;
    let mut idle_timeout = None;
    let mut mode = None;
    let mut guards = GuardChange::default();
    for opt in parts {
        if let Some((k, v)) = opt.split_once('=')
            && guards.take_option(k, v)?
        {
            continue;
        }
        match opt.split_once('=') {
            Some(("mode", m)) if mode.is_none() => {
                mode = Some(VipMode::parse(m).ok_or_else(|| {
                    format!("mode={m:?}: must be dsr (direct server return) or nat")
                })?);
            }
            Some(("mode", _)) => return Err("mode= is given once".into()),
            Some(("forward", g)) if forward.is_none() && !g.is_empty() => {
                forward = Some(g.to_owned());
            }
            Some(("forward", _)) => return Err("forward= names one target group, once".into()),
            Some(("idle-timeout", t)) if idle_timeout.is_none() => {
                let secs = t
                    .parse::<u64>()
                    .ok()
                    .map(Duration::from_secs)
                    .filter(|d| (MIN_IDLE_TIMEOUT..=MAX_IDLE_TIMEOUT).contains(d))
                    .ok_or_else(|| {
                        format!(
                            "idle-timeout {t:?} must be whole seconds from {} to {} (AWS \
                             allows 60 to 6000 for TCP; UDP is fixed at 120 there)",
                            MIN_IDLE_TIMEOUT.as_secs(),
                            MAX_IDLE_TIMEOUT.as_secs()
                        )
                    })?;
                idle_timeout = Some(secs);
            }
            Some(("idle-timeout", _)) => return Err("idle-timeout= is given once".into()),
            _ => {
                return Err(format!(
                    "unknown option {opt:?} (known: forward=GROUP, idle-timeout=SECS, \
                     mode=dsr|nat, allow=CIDR|…, deny=CIDR|…, new-flow-rate=N|off, \
                     new-flow-burst=M)"
                ));
            }
        }
    }
    let mut spec = VipSpec::new(name.map(str::to_string), rest.parse()?);
    if let Some(t) = idle_timeout {
        spec.idle_timeout = t;
    }
    if let Some(m) = mode {
        spec.mode = m;
    }
    spec.guards = guards.apply(&spec.guards)?;
    spec.guards.validate(spec.vip.addr.is_ipv6())?;
    Ok(VipFlag { spec, forward })
}

/// The validated L4 part of `lb run` (the VIPs' targets are in the registry).
#[derive(Clone, Debug)]
pub struct L4Config {
    /// Interfaces lb_xdp attaches to.
    pub ifaces: Vec<String>,
    /// Attach mode.
    pub xdp_mode: XdpMode,
    /// Outer source addresses given (at most one per family); the others default to the
    /// first interface's.
    pub lb_addrs: Vec<IpAddr>,
    /// Leave the data plane in place at a clean shutdown.
    pub keep_dataplane: bool,
    /// `--flow-sweep-interval`, if given.
    pub sweep_interval: Option<Duration>,
    /// `--nexthop-max-age` (zero: no next-hop cache).
    pub nexthop_max_age: Duration,
    /// Map sizes.
    pub sizes: Sizes,
    /// The VIPs, in flag order.
    pub vips: Vec<VipSpec>,
}

/// The validated L7 part of `lb run`.
pub struct L7Spec {
    /// Listeners with their rules.
    pub listeners: Vec<(ListenerConfig, RuleBook)>,
}

/// Where the admin API listens besides its Unix socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminTcp {
    /// A loopback address.
    pub addr: SocketAddr,
    /// The bearer token every request must carry.
    pub token: String,
}

/// The validated `lb run` configuration.
pub struct Config {
    /// L4 VIPs (None when no `--vip` was given).
    pub l4: Option<L4Config>,
    /// L7 listeners (None when no `--listener` was given).
    pub l7: Option<L7Spec>,
    /// Target groups, their targets, the VIPs' groups and the rules' group users.
    pub registry: Registry,
    /// Pin directory.
    pub pin_path: PathBuf,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// The optional loopback TCP admin listener.
    pub admin_tcp: Option<AdminTcp>,
}

/// Flag-level checks of the L4 sizes and interfaces.
fn check_sizes(a: &RunArgs, errs: &mut Vec<ConfigError>) {
    if !crate::maglev::is_prime(a.ring_size) {
        errs.push(ConfigError::new(
            "--ring-size",
            a.ring_size.to_string(),
            "must be prime (Maglev needs it; the default 65537 is)",
        ));
    }
    if a.max_flows == 0 {
        errs.push(ConfigError::new("--max-flows", "0", "must be at least 1"));
    }
    if a.max_vips == 0 || a.max_backends == 0 {
        errs.push(ConfigError::new(
            "--max-vips/--max-backends",
            format!("{}/{}", a.max_vips, a.max_backends),
            "must be at least 1",
        ));
    }
    if a.max_backends > lb_common::LB_HC_MAX_BACKENDS {
        errs.push(ConfigError::new(
            "--max-backends",
            a.max_backends.to_string(),
            format!(
                "at most {} (health-check probes carry the backend id in their mark)",
                lb_common::LB_HC_MAX_BACKENDS
            ),
        ));
    }
    if u64::from(a.ring_size) * u64::from(a.max_vips) > u64::from(u32::MAX / 4) {
        errs.push(ConfigError::new(
            "--ring-size",
            a.ring_size.to_string(),
            format!(
                "times --max-vips {} exceeds what one ring array can hold",
                a.max_vips
            ),
        ));
    }
    for i in &a.ifaces {
        if i.is_empty() || i.len() > 15 || i.contains('/') {
            errs.push(ConfigError::new("--iface", i, "not a valid interface name"));
        }
    }
    for addr in &a.lb_addrs {
        let bad = match addr {
            IpAddr::V4(v) => v.is_unspecified() || v.is_multicast() || v.is_broadcast(),
            IpAddr::V6(v) => v.is_unspecified() || v.is_multicast() || v.is_loopback(),
        };
        if bad {
            errs.push(ConfigError::new(
                "--lb-addr",
                addr.to_string(),
                "must be a unicast address of this host",
            ));
        }
    }
    if let Some(i) = a.flow_sweep_interval
        && !(0.1..=3600.0).contains(&i)
    {
        errs.push(ConfigError::new(
            "--flow-sweep-interval",
            i.to_string(),
            "must be 0.1 to 3600 seconds",
        ));
    }
    if !(0.0..=3600.0).contains(&a.nexthop_max_age) {
        errs.push(ConfigError::new(
            "--nexthop-max-age",
            a.nexthop_max_age.to_string(),
            "must be 0 (no cache) to 3600 seconds",
        ));
    }
    for v6 in [false, true] {
        let of_family: Vec<String> = a
            .lb_addrs
            .iter()
            .filter(|x| x.is_ipv6() == v6)
            .map(ToString::to_string)
            .collect();
        if of_family.len() > 1 {
            errs.push(ConfigError::new(
                "--lb-addr",
                of_family.join(","),
                "give at most one address per family",
            ));
        }
    }
}

/// `--target-group` flags → groups in the registry.
fn add_groups(a: &RunArgs, reg: &mut Registry, errs: &mut Vec<ConfigError>) {
    for g in &a.target_groups {
        match parse_target_group(g) {
            Ok(cfg) => {
                if let Err(e) = reg.create_group(cfg) {
                    errs.push(ConfigError::new("--target-group", g, e.to_string()));
                }
            }
            Err(e) => errs.push(ConfigError::new("--target-group", g, e.to_string())),
        }
    }
}

/// `--vip` flags → VIPs bound to their groups (an implicit group per VIP without one).
fn add_vips(a: &RunArgs, reg: &mut Registry, errs: &mut Vec<ConfigError>) -> Vec<VipSpec> {
    let mut vips: Vec<VipSpec> = Vec::new();
    let mut names = BTreeSet::new();
    for v in &a.vips {
        let flag = match parse_vip(v) {
            Ok(f) => f,
            Err(p) => {
                errs.push(ConfigError::new("--vip", v, p));
                continue;
            }
        };
        let spec = flag.spec;
        if vips.iter().any(|x| x.vip == spec.vip) {
            errs.push(ConfigError::new("--vip", v, "the same VIP is given twice"));
            continue;
        }
        if let Some(n) = &spec.name
            && !names.insert(n.clone())
        {
            errs.push(ConfigError::new("--vip", v, format!("name {n:?} is taken")));
            continue;
        }
        // The group: forward=, else a --target-group named like the VIP, else an implicit
        // group of the VIP's own (NLB defaults: TCP checks, 300 s deregistration delay).
        let label = spec.label();
        let group = match flag.forward {
            Some(g) => g,
            None => {
                if reg.group_config(&label).is_err() {
                    let mut cfg = TargetGroupConfig::new(label.clone());
                    cfg.protocol = match spec.vip.proto {
                        crate::l4::Proto::Tcp => TargetProtocol::Tcp,
                        crate::l4::Proto::Udp => TargetProtocol::Udp,
                    };
                    if let Err(e) = reg.create_group(cfg) {
                        errs.push(ConfigError::new("--vip", v, e.to_string()));
                        continue;
                    }
                }
                label.clone()
            }
        };
        if let Some(n) = &spec.name
            && *n != group
            && reg.group_config(n).is_ok()
        {
            errs.push(ConfigError::new(
                "--vip",
                v,
                format!(
                    "a target group is named {n:?} but the VIP forwards to {group:?}: --target \
                     {n}=… could not tell them apart"
                ),
            ));
            continue;
        }
        match reg.add_vip(spec.clone(), &group) {
            Ok(()) => vips.push(spec),
            Err(e) => errs.push(ConfigError::new("--vip", v, e.to_string())),
        }
    }
    if vips.len() > a.max_vips as usize {
        errs.push(ConfigError::new(
            "--vip",
            format!("{} VIPs", vips.len()),
            format!("more than --max-vips {}", a.max_vips),
        ));
    }
    vips
}

/// `--listener` and `--rule` flags → listeners with their rule books; the rules' group users
/// go to the registry.
fn add_listeners(a: &RunArgs, reg: &mut Registry, errs: &mut Vec<ConfigError>) -> Option<L7Spec> {
    let errors_before = errs.len();
    let mut listeners: Vec<ListenerConfig> = Vec::new();
    for l in &a.listeners {
        match parse_listener(l) {
            Ok(cfg) if listeners.iter().any(|x| x.name == cfg.name) => {
                errs.push(ConfigError::new(
                    "--listener",
                    l,
                    "a listener of this name exists",
                ));
            }
            Ok(cfg) if listeners.iter().any(|x| x.bind == cfg.bind) => {
                errs.push(ConfigError::new(
                    "--listener",
                    l,
                    "another listener binds this address",
                ));
            }
            Ok(cfg) if cfg.http1_lean && a.l7_runtime != crate::cli::L7RuntimeArg::PerWorker => {
                errs.push(ConfigError::new(
                    "--listener",
                    l,
                    "http1=lean needs --l7-runtime per-worker (the lean loop runs one per \
                     worker thread)",
                ));
                // Kept, so its rules do not also fail as naming no listener.
                listeners.push(cfg);
            }
            Ok(cfg) => listeners.push(cfg),
            Err(e) => errs.push(ConfigError::new("--listener", l, e.to_string())),
        }
    }

    let mut specs: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for r in &a.rules {
        let p = match parse_rule(r) {
            Ok(p) => p,
            Err(e) => {
                errs.push(ConfigError::new("--rule", r, e.to_string()));
                continue;
            }
        };
        if !listeners.iter().any(|l| l.name == p.listener) {
            errs.push(ConfigError::new(
                "--rule",
                r,
                format!("no --listener is named {:?}", p.listener),
            ));
            continue;
        }
        let action = match &p.rule {
            crate::rules::RuleOrDefault::Rule(rule) => &rule.action,
            crate::rules::RuleOrDefault::Default(act) => act,
        };
        let mut bad_group = false;
        for g in action.target_groups() {
            if let Some(problem) = l7_group_problem(reg, g) {
                errs.push(ConfigError::new("--rule", r, problem));
                bad_group = true;
            }
        }
        if !bad_group {
            specs.entry(p.listener).or_default().push(r);
        }
    }

    if listeners.is_empty() {
        if !a.target_groups.is_empty() && a.vips.is_empty() || !a.rules.is_empty() {
            errs.push(ConfigError::new(
                "--listener",
                "",
                "--rule (and --target-group without --vip) need at least one --listener",
            ));
        }
        return None;
    }
    let mut out = Vec::new();
    let mut users: BTreeMap<String, usize> = BTreeMap::new();
    for l in listeners {
        let list = specs.remove(&l.name).unwrap_or_default();
        match RuleBook::from_specs(&l.name, l.protocol.as_str(), l.bind.port(), &list) {
            Ok(book) => {
                for (g, n) in book.group_users() {
                    *users.entry(g).or_default() += n;
                }
                out.push((l, book));
            }
            Err(es) => {
                for e in es {
                    let flag = if e.starts_with("has no default action") {
                        "--listener"
                    } else {
                        "--rule"
                    };
                    errs.push(ConfigError::new(flag, l.name.clone(), e));
                }
            }
        }
    }
    reg.set_rule_users(&users);
    if errs.len() > errors_before {
        return None;
    }
    Some(L7Spec { listeners: out })
}

/// Why a listener rule cannot forward to group `name`, if it cannot.
pub fn l7_group_problem(reg: &Registry, name: &str) -> Option<String> {
    match reg.group_config(name) {
        Err(_) => Some(format!(
            "forwards to {name:?}, which no --target-group defines"
        )),
        Ok(cfg) if !cfg.protocol.is_http() => Some(format!(
            "forwards to {name:?}, a {} target group: listener rules forward to http or https \
             groups",
            cfg.protocol
        )),
        Ok(_) => None,
    }
}

/// `--target` flags → registered targets.
fn add_targets(a: &RunArgs, reg: &mut Registry, errs: &mut Vec<ConfigError>) {
    let mut seen: BTreeSet<(String, SocketAddr)> = BTreeSet::new();
    for t in &a.targets {
        let spec = match parse_target(t) {
            Ok(s) => s,
            Err(p) => {
                errs.push(ConfigError::new("--target", t, p));
                continue;
            }
        };
        let (group, addr) = match reg.resolve(&spec) {
            Ok(r) => r,
            Err(p) => {
                errs.push(ConfigError::new("--target", t, p));
                continue;
            }
        };
        if !seen.insert((group.clone(), addr)) {
            errs.push(ConfigError::new(
                "--target",
                t,
                format!("{addr} is already registered with target group {group:?}"),
            ));
            continue;
        }
        if let Err(e) = reg.register(&group, &[(addr, spec.weight)]) {
            errs.push(ConfigError::new("--target", t, e.to_string()));
        }
    }
}

/// `--admin-listen` and `--admin-token-file`.
fn admin_tcp(a: &RunArgs, errs: &mut Vec<ConfigError>) -> Option<AdminTcp> {
    let Some(addr) = a.admin_listen else {
        if let Some(f) = &a.admin_token_file {
            errs.push(ConfigError::new(
                "--admin-token-file",
                f.display().to_string(),
                "only applies with --admin-listen",
            ));
        }
        return None;
    };
    if !addr.ip().is_loopback() {
        errs.push(ConfigError::new(
            "--admin-listen",
            addr.to_string(),
            "must be a loopback address (127.0.0.0/8 or ::1): the admin API changes targets \
             and rules",
        ));
        return None;
    }
    let Some(file) = &a.admin_token_file else {
        errs.push(ConfigError::new(
            "--admin-listen",
            addr.to_string(),
            "needs --admin-token-file: every request must carry its bearer token",
        ));
        return None;
    };
    match std::fs::read_to_string(file) {
        Ok(t) if t.trim().len() >= 16 && !t.trim().contains(char::is_whitespace) => {
            Some(AdminTcp {
                addr,
                token: t.trim().to_owned(),
            })
        }
        Ok(_) => {
            errs.push(ConfigError::new(
                "--admin-token-file",
                file.display().to_string(),
                "the token must be one word of at least 16 characters",
            ));
            None
        }
        Err(e) => {
            errs.push(ConfigError::new(
                "--admin-token-file",
                file.display().to_string(),
                format!("cannot read it: {e}"),
            ));
            None
        }
    }
}

/// `--l7-cpu-affinity`: only with the per-worker runtime, and a list only of CPUs this process
/// may run on.
fn check_l7_affinity(a: &RunArgs, errs: &mut Vec<ConfigError>) {
    use crate::proxy::server::affinity::{CpuAffinity, CpuSet};
    const FLAG: &str = "--l7-cpu-affinity";
    let affinity = a.l7_cpu_affinity;
    if affinity == CpuAffinity::Unbound {
        return;
    }
    if a.l7_runtime != crate::cli::L7RuntimeArg::PerWorker {
        errs.push(ConfigError::new(
            FLAG,
            affinity.to_string(),
            "only applies with --l7-runtime per-worker (the shared runtime's threads are \
             not bound)",
        ));
        return;
    }
    match CpuSet::of_this_thread() {
        Ok(allowed) => {
            if let Err(problem) = affinity.plan(1, &allowed) {
                errs.push(ConfigError::new(FLAG, affinity.to_string(), problem));
            }
        }
        Err(e) => errs.push(ConfigError::new(
            FLAG,
            affinity.to_string(),
            format!("cannot read the CPUs this process may run on: {e}"),
        )),
    }
}

impl Config {
    /// Validates `lb run` flags. Returns every problem found.
    pub fn from_run_args(a: &RunArgs) -> Result<Config, ConfigErrors> {
        let mut errs = Vec::new();
        let mut reg = Registry::new();
        check_sizes(a, &mut errs);
        add_groups(a, &mut reg, &mut errs);
        let vips = add_vips(a, &mut reg, &mut errs);
        let l7 = add_listeners(a, &mut reg, &mut errs);
        add_targets(a, &mut reg, &mut errs);
        let admin_tcp = admin_tcp(a, &mut errs);
        check_l7_affinity(a, &mut errs);

        let backends: usize = reg.vips().iter().map(|v| reg.target_count(&v.group)).sum();
        if backends > a.max_backends as usize {
            errs.push(ConfigError::new(
                "--target",
                format!("{backends} L4 targets"),
                format!("more than --max-backends {}", a.max_backends),
            ));
        }
        if !vips.is_empty() && a.ifaces.is_empty() {
            errs.push(ConfigError::new(
                "--iface",
                "",
                "L4 VIPs need at least one --iface to attach lb_xdp to",
            ));
        }
        if vips.is_empty() && !a.ifaces.is_empty() {
            errs.push(ConfigError::new(
                "--iface",
                a.ifaces.join(","),
                "no --vip is configured: nothing to balance on this interface",
            ));
        }
        if vips.is_empty() && l7.is_none() && errs.is_empty() {
            errs.push(ConfigError::new(
                "--vip/--listener",
                "",
                "nothing to serve: give at least one --vip (L4) or --listener (L7)",
            ));
        }
        if !errs.is_empty() {
            return Err(ConfigErrors(errs));
        }
        let l4 = (!vips.is_empty()).then(|| L4Config {
            ifaces: a.ifaces.clone(),
            xdp_mode: a.xdp_mode,
            lb_addrs: a.lb_addrs.clone(),
            keep_dataplane: a.keep_dataplane,
            sweep_interval: a.flow_sweep_interval.map(Duration::from_secs_f64),
            // Validated above: finite, 0 to 3600.
            nexthop_max_age: Duration::try_from_secs_f64(a.nexthop_max_age).unwrap_or_default(),
            sizes: Sizes {
                max_flows: a.max_flows,
                ring_size: a.ring_size,
                max_vips: a.max_vips,
                max_backends: a.max_backends,
            },
            vips,
        });
        Ok(Config {
            l4,
            l7,
            registry: reg,
            pin_path: a.pin_path.clone(),
            admin_socket: a.admin_socket.clone(),
            admin_tcp,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};
    use crate::l4::Proto;

    fn run_args(flags: &[&str]) -> RunArgs {
        let mut argv = vec!["lb", "run"];
        argv.extend_from_slice(flags);
        match Cli::try_parse_from(argv).expect("clap parses").command {
            Command::Run(a) => a,
            other => panic!("not run: {other:?}"),
        }
    }

    fn errors(flags: &[&str]) -> Vec<ConfigError> {
        match Config::from_run_args(&run_args(flags)) {
            Ok(_) => panic!("{flags:?} should be rejected"),
            Err(e) => e.0,
        }
    }

    fn targets(c: &Config, group: &str) -> Vec<String> {
        c.registry
            .describe_target_health(group, None, std::time::Instant::now())
            .unwrap()
            .into_iter()
            .map(|d| {
                format!(
                    "{}:{} w{}",
                    d.target.id,
                    d.target.port,
                    d.target.weight.unwrap()
                )
            })
            .collect()
    }

    #[test]
    fn nexthop_max_age_is_0_to_3600_seconds_and_reaches_the_l4_model() {
        let base = ["--iface", "eth0", "--vip", "10.100.0.1:80/tcp", "--target"];
        let with = |age: &str| {
            let mut f = base.to_vec();
            f.push("10.100.0.1:80/tcp=10.0.0.11");
            let mut f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
            // `=`: a negative value is not taken for a flag.
            f.push(format!("--nexthop-max-age={age}"));
            f
        };
        for (age, want) in [("0", 0.0), ("2.5", 2.5), ("3600", 3600.0)] {
            let f = with(age);
            let f: Vec<&str> = f.iter().map(String::as_str).collect();
            let c = Config::from_run_args(&run_args(&f)).expect("valid");
            let got = c.l4.expect("L4").nexthop_max_age.as_secs_f64();
            assert_eq!(got, want, "--nexthop-max-age {age}");
        }
        for bad in ["-1", "3601", "NaN", "inf"] {
            let f = with(bad);
            let f: Vec<&str> = f.iter().map(String::as_str).collect();
            let errs = errors(&f);
            assert!(
                errs.iter().any(|e| e.flag == "--nexthop-max-age"),
                "{bad}: {errs:?}"
            );
        }
        let f = with("1");
        let mut f: Vec<&str> = f.iter().map(String::as_str).collect();
        f.pop();
        let c = Config::from_run_args(&run_args(&f)).expect("valid");
        assert_eq!(
            c.l4.expect("L4").nexthop_max_age,
            crate::dataplane::DEFAULT_NEXTHOP_MAX_AGE,
            "the default is the dataplane's"
        );
    }

    #[test]
    fn vip_specs_parse_with_and_without_names_and_groups() {
        let v = parse_vip("web=10.100.0.1:80/tcp").unwrap();
        assert_eq!(v.spec.name.as_deref(), Some("web"));
        assert_eq!(v.spec.vip.to_string(), "10.100.0.1:80/tcp");
        assert_eq!(v.forward, None);
        let v = parse_vip("10.100.0.2:0/UDP,forward=dns").unwrap();
        assert_eq!(v.spec.name, None);
        assert_eq!((v.spec.vip.port, v.spec.vip.proto), (0, Proto::Udp));
        assert_eq!(v.forward.as_deref(), Some("dns"));
        for bad in [
            "10.100.0.1:80",
            "10.100.0.1/tcp",
            "10.100.0.1:80/sctp",
            "10.100.0.1:70000/tcp",
            "web site=10.0.0.1:80/tcp",
            "0.0.0.0:80/tcp",
            "[::1]:80/tcp",
            "web=10.100.0.1:80/tcp,forward=",
            "web=10.100.0.1:80/tcp,mode=tunnel",
            "web=10.100.0.1:80/tcp,mode=nat,mode=dsr",
            "web=10.100.0.1:80/tcp,deny=2001:db8::/32",
            "web=10.100.0.1:80/tcp,allow=10.0.0.1/8",
            "web=10.100.0.1:80/tcp,new-flow-burst=5",
            "web=10.100.0.1:80/tcp,idle-timeout=0",
            "web=10.100.0.1:80/tcp,idle-timeout=6001",
            "web=10.100.0.1:80/tcp,idle-timeout=1.5",
            "web=10.100.0.1:80/tcp,idle-timeout=60,idle-timeout=70",
        ] {
            assert!(parse_vip(bad).is_err(), "{bad} accepted");
        }
        let v = parse_vip("web6=[fd00:100::1]:443/tcp,idle-timeout=60,forward=g").unwrap();
        assert_eq!(v.spec.vip.to_string(), "[fd00:100::1]:443/tcp");
        assert_eq!(v.spec.idle_timeout, Duration::from_secs(60));
        assert_eq!(v.forward.as_deref(), Some("g"));
        let nat = parse_vip(
            "web=10.100.0.1:80/tcp,mode=nat,allow=10.0.0.0/8|192.0.2.7,deny=10.9.0.0/16,\
             new-flow-rate=20,new-flow-burst=5",
        )
        .unwrap();
        assert_eq!(nat.spec.mode, VipMode::Nat);
        assert_eq!(nat.spec.guards.allow.len(), 2);
        assert_eq!(nat.spec.guards.deny.len(), 1);
        assert_eq!(
            nat.spec.guards.rate.map(|r| (r.per_second, r.burst)),
            Some((20, 5))
        );
        assert_eq!(
            parse_vip("10.100.0.1:80/tcp").unwrap().spec.mode,
            VipMode::Dsr,
            "DSR by default"
        );
        let udp = parse_vip("10.100.0.2:53/udp").unwrap();
        assert_eq!(
            udp.spec.idle_timeout,
            Duration::from_secs(120),
            "NLB's UDP default"
        );
    }

    #[test]
    fn ipv6_vips_take_targets_of_either_family() {
        let c = Config::from_run_args(&run_args(&[
            "--iface",
            "eth0",
            "--vip",
            "web6=[fd00:100::1]:80/tcp",
            "--vip",
            "web4=10.100.0.1:80/tcp",
            "--target",
            "web6=fd00::11",
            "--target",
            "web6=10.0.0.12",
            "--target",
            "web4=[fd00::13]:80",
            "--lb-addr",
            "10.0.0.2",
            "--lb-addr",
            "fd00::2",
        ]))
        .unwrap();
        assert_eq!(targets(&c, "web6"), ["10.0.0.12:80 w1", "fd00::11:80 w1"]);
        assert_eq!(targets(&c, "web4"), ["fd00::13:80 w1"]);
        assert_eq!(c.l4.unwrap().lb_addrs.len(), 2);
        let errs = errors(&[
            "--iface",
            "eth0",
            "--vip",
            "10.100.0.1:80/tcp",
            "--lb-addr",
            "10.0.0.2",
            "--lb-addr",
            "10.0.0.3",
        ]);
        assert!(
            errs.iter()
                .any(|e| e.problem.contains("one address per family")),
            "{errs:?}"
        );
    }

    #[test]
    fn a_valid_l4_command_line_builds_the_model() {
        let c = Config::from_run_args(&run_args(&[
            "--iface",
            "eth0",
            "--vip",
            "web=10.100.0.1:80/tcp",
            "--vip",
            "10.100.0.2:0/udp",
            "--target",
            "web=10.0.0.11",
            "--target",
            "web=10.0.0.12:80,weight=3",
            "--target",
            "10.100.0.2:0/udp=10.0.0.13",
        ]))
        .unwrap();
        let l4 = c.l4.as_ref().unwrap();
        assert_eq!(l4.vips.len(), 2);
        // Each VIP without forward= gets a group of its own, named after it.
        assert_eq!(targets(&c, "web"), ["10.0.0.11:80 w1", "10.0.0.12:80 w3"]);
        assert_eq!(targets(&c, "10.100.0.2:0/udp"), ["10.0.0.13:0 w1"]);
        let web = c.registry.group_config("web").unwrap();
        assert_eq!(web.protocol, TargetProtocol::Tcp);
        assert_eq!(
            web.check().unwrap().protocol,
            crate::targets::health_check::CheckProtocol::Tcp,
            "NLB's default check"
        );
    }

    #[test]
    fn vips_forward_to_target_groups_usable_by_rules_too() {
        let c = Config::from_run_args(&run_args(&[
            "--iface",
            "eth0",
            "--target-group",
            "web,health-check-path=/healthz",
            "--vip",
            "front=10.100.0.1:80/tcp,forward=web",
            "--listener",
            "l=http://127.0.0.1:8080",
            "--rule",
            "l,default,forward=web",
            "--target",
            "front=10.0.0.11",
            "--target",
            "web=10.0.0.12:80",
        ]))
        .unwrap();
        assert_eq!(targets(&c, "web"), ["10.0.0.11:80 w1", "10.0.0.12:80 w1"]);
        assert_eq!(c.registry.vips()[0].group, "web");
        assert!(
            c.registry.group_config("front").is_err(),
            "no implicit group"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_flag() {
        let errs = errors(&[
            "--ring-size",
            "65536",
            "--vip",
            "web=10.100.0.1:80/tcp",
            "--vip",
            "web=10.100.0.9:80/tcp",
            "--target",
            "web=10.0.0.11:8080",
            "--target",
            "web=10.0.0.12,weight=0",
        ]);
        let flags: Vec<_> = errs.iter().map(|e| e.flag).collect();
        assert!(flags.contains(&"--ring-size"), "{errs:?}");
        assert!(flags.contains(&"--iface"), "{errs:?}");
        assert_eq!(
            flags.iter().filter(|f| **f == "--target").count(),
            2,
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.flag == "--vip" && e.problem.contains("taken")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.problem.contains("VIP port")),
            "{errs:?}"
        );
    }

    #[test]
    fn duplicate_targets_and_port_on_port0_vip_are_rejected() {
        let errs = errors(&[
            "--iface",
            "eth0",
            "--vip",
            "any=10.100.0.1:0/tcp",
            "--target",
            "any=10.0.0.11",
            "--target",
            "any=10.0.0.11",
            "--target",
            "any=10.0.0.12:80",
        ]);
        assert_eq!(errs.len(), 2, "{errs:?}");
    }

    #[test]
    fn targets_of_unknown_owners_are_rejected() {
        let errs = errors(&[
            "--vip",
            "10.100.0.1:80/tcp",
            "--iface",
            "eth0",
            "--target",
            "api=127.0.0.1:8080",
        ]);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].problem.contains("no VIP or target group"),
            "{errs:?}"
        );
    }

    #[test]
    fn l7_cpu_affinity_needs_the_per_worker_runtime_and_cpus_this_process_may_use() {
        let with = |extra: &[&str]| {
            let mut f = vec![
                "--listener",
                "web=http://127.0.0.1:8080",
                "--rule",
                "web,default,fixed-response=200",
            ];
            f.extend_from_slice(extra);
            Config::from_run_args(&run_args(&f))
        };
        let flag_errors = |extra: &[&str]| match with(extra) {
            Ok(_) => panic!("{extra:?} should be rejected"),
            Err(e) => {
                e.0.into_iter()
                    .filter(|e| e.flag == "--l7-cpu-affinity")
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
            }
        };
        let shared = flag_errors(&["--l7-cpu-affinity", "auto"]);
        assert!(
            shared.len() == 1 && shared[0].contains("--l7-runtime per-worker"),
            "{shared:?}"
        );
        let allowed = crate::proxy::server::affinity::CpuSet::of_this_thread().unwrap();
        let outside = (0..1024).find(|c| !allowed.contains(*c)).unwrap();
        let cpu = outside.to_string();
        let bad = flag_errors(&["--l7-runtime", "per-worker", "--l7-cpu-affinity", &cpu]);
        assert!(
            bad.len() == 1 && bad[0].contains(&format!("CPUs {outside} are not among")),
            "{bad:?}"
        );
        // Positive control: auto, and a list of allowed CPUs, with the per-worker runtime.
        let first = allowed.iter().next().unwrap().to_string();
        for ok in ["auto", first.as_str(), "none"] {
            let c = with(&["--l7-runtime", "per-worker", "--l7-cpu-affinity", ok]);
            assert!(c.is_ok(), "{ok}: {:?}", c.err());
        }
        assert!(with(&["--l7-cpu-affinity", "none"]).is_ok());
    }

    #[test]
    fn a_lean_listener_needs_the_per_worker_runtime() {
        let with = |listener: &str, extra: &[&str]| {
            let mut f = vec![
                "--listener",
                listener,
                "--rule",
                "web,default,fixed-response=200",
            ];
            f.extend_from_slice(extra);
            Config::from_run_args(&run_args(&f))
        };
        let lean = "web=http://127.0.0.1:8080,http1=lean";
        let errs = match with(lean, &[]) {
            Ok(_) => panic!("a lean listener on the shared runtime should be rejected"),
            Err(e) => e.0,
        };
        assert!(
            errs.len() == 1
                && errs[0].flag == "--listener"
                && errs[0]
                    .to_string()
                    .contains("http1=lean needs --l7-runtime per-worker"),
            "{errs:?}"
        );
        // Positive control: the same listener with the per-worker runtime.
        let c = with(lean, &["--l7-runtime", "per-worker"]);
        assert!(c.is_ok(), "{:?}", c.err());
    }

    #[test]
    fn an_l7_command_line_builds_listeners_rules_and_groups() {
        let c = Config::from_run_args(&run_args(&[
            "--listener",
            "web=http://127.0.0.1:8080",
            "--target-group",
            "api,algorithm=least_outstanding_requests",
            "--target-group",
            "app",
            "--target",
            "api=127.0.0.1:9001",
            "--target",
            "app=127.0.0.1:9002,weight=2",
            "--rule",
            "web,priority=10,path=/api/*,forward=api",
            "--rule",
            "web,default,forward=app",
        ]))
        .unwrap();
        assert!(c.l4.is_none());
        let l7 = c.l7.as_ref().unwrap();
        assert_eq!(l7.listeners.len(), 1);
        assert_eq!(l7.listeners[0].1.compiled().len(), 1);
        assert_eq!(targets(&c, "app"), ["127.0.0.1:9002 w2"]);
    }

    #[test]
    fn l7_wiring_mistakes_are_each_reported() {
        let errs = errors(&[
            "--listener",
            "web=http://127.0.0.1:8080",
            "--listener",
            "api=http://127.0.0.1:8081",
            "--target-group",
            "app",
            "--target-group",
            "raw,protocol=tcp",
            "--target",
            "app=127.0.0.1",
            "--rule",
            "web,priority=10,path=/x,forward=nope",
            "--rule",
            "web,priority=11,path=/y,forward=raw",
            "--rule",
            "other,default,forward=app",
            "--rule",
            "api,default,forward=app",
        ]);
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        let has = |needle: &str| text.iter().any(|t| t.contains(needle));
        assert!(has("need a port"), "{text:#?}");
        assert!(has("which no --target-group defines"), "{text:#?}");
        assert!(
            has("listener rules forward to http or https groups"),
            "{text:#?}"
        );
        assert!(has("no --listener is named"), "{text:#?}");
        assert!(has("has no default action"), "{text:#?}");
        assert_eq!(errs.len(), 5, "{text:#?}");
    }

    #[test]
    fn the_admin_tcp_listener_is_loopback_only_and_needs_a_token() {
        let dir = std::env::temp_dir().join(format!("lb-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("token");
        std::fs::write(&good, "0123456789abcdef0123\n").unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "abc").unwrap();
        let base = [
            "--listener",
            "web=http://127.0.0.1:8080",
            "--rule",
            "web,default,fixed-response=200",
        ];
        let with = |extra: &[&str]| {
            let mut f: Vec<&str> = base.to_vec();
            f.extend_from_slice(extra);
            Config::from_run_args(&run_args(&f))
        };
        let ok = with(&[
            "--admin-listen",
            "127.0.0.1:9900",
            "--admin-token-file",
            good.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(ok.admin_tcp.unwrap().token, "0123456789abcdef0123");
        for (extra, needle) in [
            (
                vec![
                    "--admin-listen",
                    "0.0.0.0:9900",
                    "--admin-token-file",
                    good.to_str().unwrap(),
                ],
                "loopback",
            ),
            (
                vec!["--admin-listen", "127.0.0.1:9900"],
                "needs --admin-token-file",
            ),
            (
                vec![
                    "--admin-listen",
                    "127.0.0.1:9900",
                    "--admin-token-file",
                    short.to_str().unwrap(),
                ],
                "16 characters",
            ),
            (
                vec!["--admin-token-file", good.to_str().unwrap()],
                "only applies",
            ),
        ] {
            let errs = match with(&extra) {
                Ok(_) => panic!("{extra:?} accepted"),
                Err(e) => e.0,
            };
            assert!(
                errs.iter().any(|e| e.problem.contains(needle)),
                "{extra:?}: {errs:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
