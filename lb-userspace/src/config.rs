//! Flags → one validated model. [`Config::from_run_args`] collects every problem, each with the
//! flag and value that caused it, so an operator fixes a command line in one go.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    str::FromStr,
};

use crate::{
    cli::{RunArgs, XdpMode},
    dataplane::Sizes,
    proxy::server::{ListenerConfig, parse_listener},
    rules::{Action, Rule, RuleOrDefault, RuleSet, parse_rule},
    targets::{TargetAddr, TargetGroupConfig, parse_target_group},
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

/// L4 protocol of a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::IPPROTO_TCP,
            Proto::Udp => lb_common::IPPROTO_UDP,
        }
    }

    /// From an IANA protocol number.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::IPPROTO_TCP => Some(Proto::Tcp),
            lb_common::IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// The identity of an L4 VIP: address, port (0 = every port) and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipAddr {
    /// Address.
    pub addr: Ipv4Addr,
    /// Port; 0 = every port.
    pub port: u16,
    /// Protocol.
    pub proto: Proto,
}

impl VipAddr {
    /// The key of this VIP in the `LB_VIPS` map.
    pub fn map_key(&self) -> lb_common::VipKey {
        lb_common::VipKey {
            addr: lb_common::ipv4_to_map(self.addr),
            port: self.port.to_be(),
            proto: self.proto.number(),
            _pad: 0,
        }
    }

    /// The VIP a `LB_VIPS` key stands for; None for address markers and unknown protocols.
    pub fn from_map_key(key: &lb_common::VipKey) -> Option<Self> {
        Some(Self {
            addr: lb_common::ipv4_from_map(key.addr),
            port: u16::from_be(key.port),
            proto: Proto::from_number(key.proto)?,
        })
    }
}

impl fmt::Display for VipAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

impl FromStr for VipAddr {
    type Err = String;

    /// `ADDR:PORT/PROTO`, e.g. `10.100.0.1:80/tcp`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (hostport, proto) = s
            .rsplit_once('/')
            .ok_or("expected ADDR:PORT/PROTO, e.g. 10.100.0.1:80/tcp")?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            other => return Err(format!("protocol {other:?} is not tcp or udp")),
        };
        let (addr, port) = hostport
            .rsplit_once(':')
            .ok_or("expected ADDR:PORT/PROTO (port missing; use port 0 for every port)")?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let IpAddr::V4(addr) = addr else {
            return Err("IPv6 VIPs are not supported yet".into());
        };
        if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
            return Err(format!("{addr} cannot be a VIP"));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
        Ok(VipAddr { addr, port, proto })
    }
}

/// A parsed `--vip` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSpec {
    /// Optional name (targets may refer to it).
    pub name: Option<String>,
    /// Address, port, protocol.
    pub vip: VipAddr,
}

impl VipSpec {
    /// Whether `owner` (the part before `=` of a `--target`) names this VIP: by its name or
    /// by its `ADDR:PORT/PROTO`.
    pub fn answers_to(&self, owner: &str) -> bool {
        self.name.as_deref() == Some(owner) || owner.parse::<VipAddr>().is_ok_and(|a| a == self.vip)
    }
}

/// Parses `[NAME=]ADDR:PORT/PROTO`.
pub fn parse_vip(s: &str) -> Result<VipSpec, String> {
    let (name, rest) = match s.split_once('=') {
        Some((n, r)) => (Some(n), r),
        None => (None, s),
    };
    if let Some(n) = name {
        validate_name(n)?;
    }
    Ok(VipSpec {
        name: name.map(str::to_string),
        vip: rest.parse()?,
    })
}

/// Names of VIPs, listeners and target groups: letters, digits, `-` and `_`, 1 to 32 chars,
/// as AWS names allow (minus the length: AWS allows 32 for target groups).
pub fn validate_name(n: &str) -> Result<(), String> {
    if n.is_empty() || n.len() > 32 {
        return Err(format!("name {n:?} must be 1 to 32 characters"));
    }
    if !n
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "name {n:?} may only hold letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

/// A parsed `--target` value: `OWNER=ADDR[:PORT][,weight=W]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    /// VIP name, VIP `ADDR:PORT/PROTO`, or target-group name.
    pub owner: String,
    /// Target address.
    pub addr: IpAddr,
    /// Target port, if given.
    pub port: Option<u16>,
    /// Weight (default 1).
    pub weight: u32,
}

/// Largest target weight accepted.
pub const MAX_WEIGHT: u32 = 65_535;

/// Parses `OWNER=ADDR[:PORT][,weight=W]`. With `need_weight = false` (deregistration) a
/// weight is refused.
pub fn parse_target(s: &str) -> Result<TargetSpec, String> {
    let (owner, rest) = s
        .split_once('=')
        .ok_or("expected OWNER=ADDR[:PORT][,weight=W], e.g. web=10.0.0.11:80,weight=2")?;
    if owner.is_empty() {
        return Err("the owner (VIP or target group) before '=' is empty".into());
    }
    let mut parts = rest.split(',');
    let hostport = parts.next().unwrap_or_default();
    let (addr, port) = parse_hostport(hostport)?;
    let mut weight = 1;
    for opt in parts {
        match opt.split_once('=') {
            Some(("weight", w)) => {
                weight = w
                    .parse::<u32>()
                    .ok()
                    .filter(|w| (1..=MAX_WEIGHT).contains(w))
                    .ok_or_else(|| {
                        format!("weight {w:?} must be a number from 1 to {MAX_WEIGHT}")
                    })?;
            }
            _ => return Err(format!("unknown option {opt:?} (known: weight=W)")),
        }
    }
    Ok(TargetSpec {
        owner: owner.to_string(),
        addr,
        port,
        weight,
    })
}

/// `ADDR`, `ADDR:PORT`, `[V6]` or `[V6]:PORT`.
fn parse_hostport(s: &str) -> Result<(IpAddr, Option<u16>), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {p:?} must be a number from 1 to 65535"))
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (a, tail) = rest
            .split_once(']')
            .ok_or("missing ']' after IPv6 address")?;
        let addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv6 address"))?;
        return match tail.strip_prefix(':') {
            Some(p) => Ok((addr, Some(port(p)?))),
            None if tail.is_empty() => Ok((addr, None)),
            None => Err(format!("unexpected {tail:?} after the address")),
        };
    }
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok((addr, None));
    }
    let (a, p) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not an address or ADDR:PORT"))?;
    let addr = a
        .parse()
        .map_err(|_| format!("{a:?} is not an IP address"))?;
    Ok((addr, Some(port(p)?)))
}

/// A target of an L4 VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct L4Target {
    /// Backend address (outer destination of encapsulated packets).
    pub addr: Ipv4Addr,
    /// Backend port (equals the VIP port under DSR; 0 for port-0 VIPs).
    pub port: u16,
    /// Maglev weight.
    pub weight: u32,
}

/// A VIP with its targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L4Vip {
    /// The VIP.
    pub spec: VipSpec,
    /// Its targets, in flag order.
    pub targets: Vec<L4Target>,
}

/// The validated L4 part of `lb run`.
#[derive(Clone, Debug)]
pub struct L4Config {
    /// Interfaces lb_xdp attaches to.
    pub ifaces: Vec<String>,
    /// Attach mode.
    pub xdp_mode: XdpMode,
    /// Outer source address; None = first IPv4 address of the first interface.
    pub lb_addr: Option<Ipv4Addr>,
    /// Map sizes.
    pub sizes: Sizes,
    /// VIPs and their targets.
    pub vips: Vec<L4Vip>,
}

/// The validated L7 part of `lb run`.
pub struct L7Spec {
    /// Listeners with their compiled rules.
    pub listeners: Vec<(ListenerConfig, RuleSet)>,
    /// Target groups with their initial targets.
    pub groups: Vec<(TargetGroupConfig, Vec<TargetAddr>)>,
}

/// The validated `lb run` configuration.
pub struct Config {
    /// L4 VIPs (None when no `--vip` was given).
    pub l4: Option<L4Config>,
    /// L7 listeners and target groups (None when no `--listener` was given).
    pub l7: Option<L7Spec>,
    /// Pin directory.
    pub pin_path: PathBuf,
    /// Admin socket path.
    pub admin_socket: PathBuf,
}

/// Validates the L7 flags: listeners, target groups, their targets and the rules tying them
/// together. Problems go to `errs`; returns None when there are no listeners (or errors).
fn l7_from_args(
    a: &RunArgs,
    vips: &[L4Vip],
    targets: Vec<(String, TargetSpec)>,
    errs: &mut Vec<ConfigError>,
) -> Option<L7Spec> {
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
            Ok(cfg) => listeners.push(cfg),
            Err(e) => errs.push(ConfigError::new("--listener", l, e.to_string())),
        }
    }

    let mut groups: Vec<(TargetGroupConfig, Vec<TargetAddr>)> = Vec::new();
    for g in &a.target_groups {
        match parse_target_group(g) {
            Ok(cfg) if groups.iter().any(|(x, _)| x.name == cfg.name) => {
                errs.push(ConfigError::new(
                    "--target-group",
                    g,
                    "a target group of this name exists",
                ));
            }
            Ok(cfg)
                if vips
                    .iter()
                    .any(|v| v.spec.name.as_deref() == Some(cfg.name.as_str())) =>
            {
                errs.push(ConfigError::new(
                    "--target-group",
                    g,
                    "a VIP has this name; --target could not tell them apart",
                ));
            }
            Ok(cfg) => groups.push((cfg, Vec::new())),
            Err(e) => errs.push(ConfigError::new("--target-group", g, e.to_string())),
        }
    }

    for (raw, t) in targets {
        let Some((_, list)) = groups.iter_mut().find(|(g, _)| g.name == t.owner) else {
            errs.push(ConfigError::new(
                "--target",
                raw,
                format!("no VIP or target group is named {:?}", t.owner),
            ));
            continue;
        };
        let Some(port) = t.port else {
            errs.push(ConfigError::new(
                "--target",
                raw,
                "targets of an L7 target group need a port: ADDR:PORT",
            ));
            continue;
        };
        let addr = std::net::SocketAddr::new(t.addr, port);
        if list.iter().any(|x| x.addr == addr) {
            errs.push(ConfigError::new(
                "--target",
                raw,
                "already registered with this group",
            ));
            continue;
        }
        list.push(TargetAddr::with_weight(addr, t.weight));
    }

    let mut rules: BTreeMap<String, (Vec<Rule>, Option<Action>)> = BTreeMap::new();
    for r in &a.rules {
        match parse_rule(r) {
            Ok(p) => {
                if !listeners.iter().any(|l| l.name == p.listener) {
                    errs.push(ConfigError::new(
                        "--rule",
                        r,
                        format!("no --listener is named {:?}", p.listener),
                    ));
                    continue;
                }
                let action_groups: Vec<String> = match &p.rule {
                    RuleOrDefault::Rule(rule) => {
                        rule.action.target_groups().map(String::from).collect()
                    }
                    RuleOrDefault::Default(act) => act.target_groups().map(String::from).collect(),
                };
                if let Some(missing) = action_groups
                    .iter()
                    .find(|n| !groups.iter().any(|(g, _)| &g.name == *n))
                {
                    errs.push(ConfigError::new(
                        "--rule",
                        r,
                        format!("forwards to {missing:?}, which no --target-group defines"),
                    ));
                    continue;
                }
                let entry = rules.entry(p.listener).or_default();
                match p.rule {
                    RuleOrDefault::Rule(rule) => entry.0.push(rule),
                    RuleOrDefault::Default(_) if entry.1.is_some() => {
                        errs.push(ConfigError::new(
                            "--rule",
                            r,
                            "this listener already has a default rule",
                        ));
                    }
                    RuleOrDefault::Default(act) => entry.1 = Some(act),
                }
            }
            Err(e) => errs.push(ConfigError::new("--rule", r, e.to_string())),
        }
    }

    if listeners.is_empty() {
        if !groups.is_empty() || !a.rules.is_empty() {
            errs.push(ConfigError::new(
                "--listener",
                "",
                "--target-group and --rule need at least one --listener",
            ));
        }
        return None;
    }
    let mut out = Vec::new();
    for l in listeners {
        let (list, default) = rules.remove(&l.name).unwrap_or_default();
        let Some(default) = default else {
            errs.push(ConfigError::new(
                "--listener",
                l.name.clone(),
                format!(
                    "has no default action: add --rule '{},default,forward=GROUP' (or a \
                     fixed-response/redirect default)",
                    l.name
                ),
            ));
            continue;
        };
        match RuleSet::new(list, default) {
            Ok(set) => {
                if let Err(es) = set.validate_for_listener(l.protocol.as_str(), l.bind.port()) {
                    for e in es {
                        errs.push(ConfigError::new("--rule", l.name.clone(), e.to_string()));
                    }
                    continue;
                }
                out.push((l, set));
            }
            Err(es) => {
                for e in es {
                    errs.push(ConfigError::new("--rule", l.name.clone(), e.to_string()));
                }
            }
        }
    }
    if errs.len() > errors_before {
        return None;
    }
    Some(L7Spec {
        listeners: out,
        groups,
    })
}

/// Checks a target against its VIP and turns it into an [`L4Target`].
pub fn l4_target(vip: &VipSpec, t: &TargetSpec) -> Result<L4Target, String> {
    let IpAddr::V4(addr) = t.addr else {
        return Err("IPv6 targets are not supported by the L4 tier yet".into());
    };
    let port = match (vip.vip.port, t.port) {
        (0, None) => 0,
        (0, Some(p)) => {
            return Err(format!(
                "VIP {} takes every port, so a target port ({p}) cannot apply: DSR delivers \
                 packets unchanged",
                vip.vip
            ));
        }
        (vp, None) => vp,
        (vp, Some(p)) if p == vp => p,
        (vp, Some(p)) => {
            return Err(format!(
                "port {p} differs from the VIP port {vp}: with direct server return the \
                 backend receives the packet unchanged, so it must listen on the VIP port"
            ));
        }
    };
    Ok(L4Target {
        addr,
        port,
        weight: t.weight,
    })
}

impl Config {
    /// Validates `lb run` flags. Returns every problem found.
    pub fn from_run_args(a: &RunArgs) -> Result<Config, ConfigErrors> {
        let mut errs = Vec::new();

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

        let mut vips: Vec<L4Vip> = Vec::new();
        let mut names = BTreeSet::new();
        for v in &a.vips {
            match parse_vip(v) {
                Ok(spec) => {
                    if vips.iter().any(|x| x.spec.vip == spec.vip) {
                        errs.push(ConfigError::new("--vip", v, "the same VIP is given twice"));
                        continue;
                    }
                    if let Some(n) = &spec.name
                        && !names.insert(n.clone())
                    {
                        errs.push(ConfigError::new("--vip", v, format!("name {n:?} is taken")));
                        continue;
                    }
                    vips.push(L4Vip {
                        spec,
                        targets: Vec::new(),
                    });
                }
                Err(p) => errs.push(ConfigError::new("--vip", v, p)),
            }
        }
        if vips.len() > a.max_vips as usize {
            errs.push(ConfigError::new(
                "--vip",
                format!("{} VIPs", vips.len()),
                format!("more than --max-vips {}", a.max_vips),
            ));
        }

        let mut l7_targets: Vec<(String, TargetSpec)> = Vec::new();
        let mut backends = 0usize;
        let mut seen: BTreeMap<VipAddr, BTreeSet<(Ipv4Addr, u16)>> = BTreeMap::new();
        for t in &a.targets {
            let spec = match parse_target(t) {
                Ok(s) => s,
                Err(p) => {
                    errs.push(ConfigError::new("--target", t, p));
                    continue;
                }
            };
            let Some(idx) = vips.iter().position(|v| v.spec.answers_to(&spec.owner)) else {
                // Not a VIP: an L7 target group must claim it (checked with the L7 config).
                l7_targets.push((t.clone(), spec));
                continue;
            };
            match l4_target(&vips[idx].spec, &spec) {
                Ok(lt) => {
                    if !seen
                        .entry(vips[idx].spec.vip)
                        .or_default()
                        .insert((lt.addr, lt.port))
                    {
                        errs.push(ConfigError::new(
                            "--target",
                            t,
                            "this target is already registered with this VIP",
                        ));
                        continue;
                    }
                    backends += 1;
                    vips[idx].targets.push(lt);
                }
                Err(p) => errs.push(ConfigError::new("--target", t, p)),
            }
        }
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
        for i in &a.ifaces {
            if i.is_empty() || i.len() > 15 || i.contains('/') {
                errs.push(ConfigError::new("--iface", i, "not a valid interface name"));
            }
        }
        if let Some(addr) = a.lb_addr
            && (addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast())
        {
            errs.push(ConfigError::new(
                "--lb-addr",
                addr.to_string(),
                "must be a unicast address of this host",
            ));
        }

        let l7 = l7_from_args(a, &vips, l7_targets, &mut errs);

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
            lb_addr: a.lb_addr,
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
            pin_path: a.pin_path.clone(),
            admin_socket: a.admin_socket.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

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

    #[test]
    fn vip_specs_parse_with_and_without_names() {
        let v = parse_vip("web=10.100.0.1:80/tcp").unwrap();
        assert_eq!(v.name.as_deref(), Some("web"));
        assert_eq!(v.vip.to_string(), "10.100.0.1:80/tcp");
        let v = parse_vip("10.100.0.2:0/UDP").unwrap();
        assert_eq!(v.name, None);
        assert_eq!((v.vip.port, v.vip.proto), (0, Proto::Udp));
        for bad in [
            "10.100.0.1:80",
            "10.100.0.1/tcp",
            "10.100.0.1:80/sctp",
            "10.100.0.1:70000/tcp",
            "web site=10.0.0.1:80/tcp",
            "0.0.0.0:80/tcp",
            "[::1]:80/tcp",
        ] {
            assert!(parse_vip(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn vip_map_keys_round_trip_in_network_order_and_markers_are_no_vips() {
        let v: VipAddr = "10.100.0.1:8080/udp".parse().unwrap();
        let k = v.map_key();
        // As in the packet header: address bytes and port bytes in wire order.
        assert_eq!(k.addr.to_ne_bytes(), [10, 100, 0, 1]);
        assert_eq!(k.port.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(k.proto, 17);
        assert_eq!(VipAddr::from_map_key(&k), Some(v));
        let marker = lb_common::VipKey {
            proto: lb_common::VIP_MARKER_PROTO,
            ..k
        };
        assert_eq!(VipAddr::from_map_key(&marker), None);
    }

    #[test]
    fn a_vip_answers_to_its_name_and_its_address_spec_only() {
        let v = parse_vip("web=10.100.0.1:80/tcp").unwrap();
        assert!(v.answers_to("web"));
        assert!(v.answers_to("10.100.0.1:80/tcp"));
        assert!(v.answers_to("10.100.0.1:80/TCP"));
        for other in ["api", "10.100.0.1:81/tcp", "10.100.0.1:80/udp", "WEB"] {
            assert!(!v.answers_to(other), "{other}");
        }
    }

    #[test]
    fn target_specs_parse_ports_weights_and_v6() {
        let t = parse_target("web=10.0.0.11:80,weight=3").unwrap();
        assert_eq!(t.owner, "web");
        assert_eq!(t.port, Some(80));
        assert_eq!(t.weight, 3);
        let t = parse_target("10.100.0.1:80/tcp=10.0.0.12").unwrap();
        assert_eq!(t.owner, "10.100.0.1:80/tcp");
        assert_eq!((t.port, t.weight), (None, 1));
        let t = parse_target("api=[2001:db8::1]:8080").unwrap();
        assert_eq!(t.port, Some(8080));
        for bad in [
            "10.0.0.11",
            "=10.0.0.11",
            "web=10.0.0.11,weight=0",
            "web=10.0.0.11,weight=x",
            "web=10.0.0.11,colour=red",
            "web=host:80",
            "web=10.0.0.11:0",
        ] {
            assert!(parse_target(bad).is_err(), "{bad} accepted");
        }
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
        let l4 = c.l4.unwrap();
        assert_eq!(l4.vips.len(), 2);
        assert_eq!(
            l4.vips[0].targets,
            vec![
                L4Target {
                    addr: Ipv4Addr::new(10, 0, 0, 11),
                    port: 80,
                    weight: 1
                },
                L4Target {
                    addr: Ipv4Addr::new(10, 0, 0, 12),
                    port: 80,
                    weight: 3
                }
            ]
        );
        assert_eq!(l4.vips[1].targets[0].port, 0);
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
        let l7 = c.l7.unwrap();
        assert_eq!(l7.listeners.len(), 1);
        assert_eq!(l7.listeners[0].1.len(), 1);
        assert_eq!(l7.groups.len(), 2);
        assert_eq!(l7.groups[1].1[0].weight, 2);
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
            "--target",
            "app=127.0.0.1",
            "--rule",
            "web,priority=10,path=/x,forward=nope",
            "--rule",
            "other,default,forward=app",
            "--rule",
            "api,default,forward=app",
        ]);
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        let has = |needle: &str| text.iter().any(|t| t.contains(needle));
        assert!(has("need a port"), "{text:#?}");
        assert!(has("which no --target-group defines"), "{text:#?}");
        assert!(has("no --listener is named"), "{text:#?}");
        assert!(has("has no default action"), "{text:#?}");
        assert_eq!(errs.len(), 4, "{text:#?}");
    }
}
