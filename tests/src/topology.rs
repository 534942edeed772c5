//! [`Topology`]: a client, one or more balancers and N backends in their own network
//! namespaces, joined to one L2 segment by a bridge that lives in a namespace of its own, with
//! `lb run` on the balancers and `lb decap` on the backends. Everything is removed on drop,
//! including during a panic.
//!
//! ```text
//!                  [bridge ns: br0]
//!     cl ─────────── lb0 … lbK ─────────── be0 … beN          (bridge-side veth ends)
//!     │              │                     │
//!  [client ns]    [lb ns i]             [backend ns j]        (each side: eth0)
//!  10.0.0.1       10.0.0.2+i            10.0.0.11+j, VIPs on lo
//!  10.100.0.0/24 via an LB
//! ```
//!
//! With IPv6 (on as soon as a VIP or a VIP's targets are IPv6, or asked for), every node also
//! has `fd00::N` where `N` is the last octet of its IPv4 address written as hex digits
//! (`10.0.0.11` → `fd00::11`), and the client routes [`VIP6_NET`] through a balancer.
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result, bail};

use crate::netns::{self, run, run_in};
use crate::process::{LbProcess, lb_bin};
use crate::servers::Server;

/// The shared L2 segment every node is on.
pub const SEGMENT_PREFIX_LEN: u8 = 24;
/// Address of the client on the segment.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// A second address of the client in a NAT topology ([`TopologyBuilder::nat`]): a second
/// client, as far as the balancer and the backends can tell.
pub const SECOND_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
/// Address of balancer 0; balancer `i` has `.2 + i`.
pub const FIRST_LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// Address of backend 0; backend `j` has `.11 + j`.
pub const FIRST_BACKEND_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
/// Most balancers a topology can have (their addresses must stay below the backends').
pub const MAX_LBS: usize = 9;
/// Most backends a topology can have.
pub const MAX_BACKENDS: usize = 200;
/// The VIP range, routed by the client through a balancer.
pub const VIP_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 100, 0, 0), 24);
/// The IPv6 VIP range, routed by the client through a balancer.
pub const VIP6_NET: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0), 64);
/// The prefix length of the segment's IPv6 addresses (`fd00::/64`).
pub const SEGMENT6_PREFIX_LEN: u8 = 64;

/// The IPv6 address of the node whose IPv4 address is `v4`: `fd00::` followed by the last
/// octet's decimal digits read as hex (`10.0.0.11` → `fd00::11`), so the two read alike.
pub fn v6_of(v4: Ipv4Addr) -> Ipv6Addr {
    let last = u16::from_str_radix(&v4.octets()[3].to_string(), 16).unwrap_or(0);
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last)
}
/// MTU of every link except the client's: 20 bytes more than the client's 1500, so a
/// full-size client packet still fits once the balancer adds its outer IPv4 header (as an
/// underlay network with a larger MTU would do).
pub const UNDERLAY_MTU: u32 = 1520;

/// Kernel tests of one process run one at a time: two topologies and two `lb run`s at once
/// would compete for the two shared cores and make timings flaky. Held by every [`Topology`].
static KERNEL_LOCK: Mutex<()> = Mutex::new(());
/// Number of topologies made by this process: part of every name, so names never repeat.
static TOPOLOGY_SEQ: AtomicU32 = AtomicU32::new(0);

/// Transport protocol of a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// The spelling `lb run --vip` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One target of a VIP: a backend of the topology, with an optional port and weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    /// Index of the backend (0-based).
    pub backend: usize,
    /// Port on the backend (`ADDR:PORT`); `None` leaves it out of the flag.
    pub port: Option<u16>,
    /// Maglev weight; `None` leaves it out of the flag (lb's default applies).
    pub weight: Option<u32>,
}

/// An L4 VIP given to `lb run` (`--vip NAME=ADDR:PORT/PROTO`) with its targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSpec {
    /// VIP name (the OWNER of its `--target` flags).
    pub name: String,
    /// VIP address; put it in [`VIP_NET`] (or [`VIP6_NET`]) so the client routes it through
    /// the balancer.
    pub addr: IpAddr,
    /// VIP port; 0 = every port.
    pub port: u16,
    /// Protocol.
    pub proto: Proto,
    /// Targets given at start; empty = every backend of the topology.
    pub targets: Vec<TargetSpec>,
    /// Options of the VIP's target group (`--target-group NAME,protocol=…,OPTIONS`). By
    /// default health checks are off and deregistration is immediate, so the tests about
    /// distribution and ring changes see every target in service from the first packet;
    /// tests of health and draining set their own ([`VipSpec::group_options`]).
    pub group_options: String,
    /// More `--vip` options (`idle-timeout=2`), appended to the flag.
    pub options: Vec<String>,
    /// Targets by their IPv6 addresses (`fd00::…`) rather than IPv4 ones.
    pub ipv6_targets: bool,
    /// The port of targets that give none (NAT: the port the target listens on).
    pub target_port: Option<u16>,
}

/// [`VipSpec::group_options`] unless a test sets its own.
pub const DEFAULT_GROUP_OPTIONS: &str = "health-check=off,deregistration-delay=0";

impl VipSpec {
    /// A TCP VIP.
    pub fn tcp(name: &str, addr: impl Into<IpAddr>, port: u16) -> Self {
        Self::new(name, addr.into(), port, Proto::Tcp)
    }

    /// A UDP VIP.
    pub fn udp(name: &str, addr: impl Into<IpAddr>, port: u16) -> Self {
        Self::new(name, addr.into(), port, Proto::Udp)
    }

    fn new(name: &str, addr: IpAddr, port: u16, proto: Proto) -> Self {
        Self {
            name: name.to_owned(),
            addr,
            port,
            proto,
            targets: Vec::new(),
            group_options: DEFAULT_GROUP_OPTIONS.to_owned(),
            options: Vec::new(),
            ipv6_targets: false,
            target_port: None,
        }
    }

    /// A NAT VIP (`mode=nat`) whose targets listen on `target_port` (`ADDR:PORT`).
    pub fn nat_to_port(mut self, target_port: u16) -> Self {
        self.options.push("mode=nat".to_owned());
        self.target_port = Some(target_port);
        self
    }

    /// Adds a `--vip` option, e.g. `idle-timeout=2`.
    pub fn option(mut self, option: &str) -> Self {
        self.options.push(option.to_owned());
        self
    }

    /// Registers the targets by their IPv6 addresses (an IPv6 underlay).
    pub fn ipv6_targets(mut self) -> Self {
        self.ipv6_targets = true;
        self
    }

    /// Sets the options of the VIP's target group, e.g.
    /// `health-check-interval=0.5,healthy-threshold=2`.
    pub fn group_options(mut self, options: &str) -> Self {
        self.group_options = options.to_owned();
        self
    }

    /// Adds backend `backend` as a target (no port, default weight).
    pub fn target(mut self, backend: usize) -> Self {
        self.targets.push(TargetSpec {
            backend,
            port: None,
            weight: None,
        });
        self
    }

    /// Adds backend `backend` as a target with weight `weight`.
    pub fn weighted_target(mut self, backend: usize, weight: u32) -> Self {
        self.targets.push(TargetSpec {
            backend,
            port: None,
            weight: Some(weight),
        });
        self
    }

    /// The VIP's address and port.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }

    /// The `--vip` value: `NAME=ADDR:PORT/PROTO[,OPTION…]` (IPv6 in brackets).
    pub fn flag_value(&self) -> String {
        let mut s = format!(
            "{}={}/{}",
            self.name,
            self.socket_addr(),
            self.proto.as_str()
        );
        for o in &self.options {
            let _ = write!(s, ",{o}");
        }
        s
    }

    /// Whether the VIP needs IPv6 in the topology.
    fn needs_ipv6(&self) -> bool {
        self.addr.is_ipv6() || self.ipv6_targets
    }
}

/// The `--target` value for `target` of VIP `owner`: `OWNER=ADDR[:PORT][,weight=W]` (an IPv6
/// address in brackets when a port follows).
pub fn target_flag_value(
    owner: &str,
    addr: impl Into<IpAddr>,
    port: Option<u16>,
    weight: Option<u32>,
) -> String {
    let addr = addr.into();
    let mut s = match port {
        Some(p) => format!("{owner}={}", SocketAddr::new(addr, p)),
        None => format!("{owner}={addr}"),
    };
    if let Some(w) = weight {
        let _ = write!(s, ",weight={w}");
    }
    s
}

/// A namespace on the segment: the client, a balancer or a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Human name: `client`, `lb-1`…, `backend-1`… (1-based, as an operator counts).
    pub name: String,
    /// Namespace name (`lbt-<pid>-<n>-…`).
    pub ns: String,
    /// Address of its `eth0` on the segment.
    pub addr: Ipv4Addr,
    /// Its IPv6 address on the segment ([`v6_of`] its IPv4 one; configured only when the
    /// topology has IPv6).
    pub addr6: Ipv6Addr,
    /// Name of its veth end inside the bridge namespace.
    pub bridge_port: String,
}

/// A balancer node and its `lb run`.
#[derive(Debug)]
pub struct Lb {
    /// The node.
    pub node: Node,
    /// bpffs directory of its pinned maps.
    pub pin_path: PathBuf,
    /// Its admin socket.
    pub admin_socket: PathBuf,
    process: Option<LbProcess>,
}

impl Lb {
    /// The `lb run` command line (empty if the balancer was not started).
    pub fn command_line(&self) -> &str {
        self.process.as_ref().map_or("", LbProcess::command_line)
    }

    /// What `lb run` printed so far.
    pub fn log_text(&self) -> String {
        self.process
            .as_ref()
            .map(LbProcess::log_text)
            .unwrap_or_default()
    }
}

/// Builder of a [`Topology`]; see [`Topology::builder`].
#[derive(Clone, Debug)]
pub struct TopologyBuilder {
    backends: usize,
    lbs: usize,
    vips: Vec<VipSpec>,
    extra_lb_args: Vec<String>,
    xdp_mode: String,
    start_lb: bool,
    start_decap: bool,
    static_neighbours: bool,
    lb_bin: Option<PathBuf>,
    ipv6: bool,
    nat: bool,
}

impl Default for TopologyBuilder {
    fn default() -> Self {
        Self {
            backends: 3,
            lbs: 1,
            vips: Vec::new(),
            extra_lb_args: Vec::new(),
            xdp_mode: "native".to_owned(),
            start_lb: true,
            start_decap: true,
            static_neighbours: false,
            lb_bin: None,
            ipv6: false,
            nat: false,
        }
    }
}

impl TopologyBuilder {
    /// Number of backend namespaces (default 3).
    pub fn backends(mut self, n: usize) -> Self {
        self.backends = n;
        self
    }

    /// Number of balancer namespaces (default 1). The client routes the VIPs via the first.
    pub fn lbs(mut self, n: usize) -> Self {
        self.lbs = n;
        self
    }

    /// Adds a VIP (and its targets) to every `lb run`, and its address to every backend's `lo`.
    pub fn vip(mut self, vip: VipSpec) -> Self {
        self.vips.push(vip);
        self
    }

    /// Extra flags for `lb run` (e.g. `["--ring-size", "1021"]`).
    pub fn lb_args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.extra_lb_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// `--xdp-mode` of `lb run` and `lb decap` (default `native`, which works on veth).
    pub fn xdp_mode(mut self, mode: &str) -> Self {
        self.xdp_mode = mode.to_owned();
        self
    }

    /// Whether to start `lb run` on the balancers (default true). Without it the balancer
    /// namespaces are plain routers (ip_forward=1), useful to test the topology itself.
    pub fn start_lb(mut self, yes: bool) -> Self {
        self.start_lb = yes;
        self
    }

    /// Whether to start `lb decap` on the backends (default true).
    pub fn start_decap(mut self, yes: bool) -> Self {
        self.start_decap = yes;
        self
    }

    /// Whether balancers get permanent neighbour entries for every backend (default false).
    /// `bpf_fib_lookup` only finds neighbours the kernel already resolved; `lb run` makes
    /// managed neighbour entries for its backends itself, which is what the tests exercise by
    /// default. Static entries take ARP timing out of the picture when a test needs that.
    pub fn static_neighbours(mut self, yes: bool) -> Self {
        self.static_neighbours = yes;
        self
    }

    /// The `lb` binary to run (default: [`crate::process::lb_bin`]'s search: `$LB_BIN`, then the target dir).
    pub fn lb_bin(mut self, path: PathBuf) -> Self {
        self.lb_bin = Some(path);
        self
    }

    /// Gives every node an IPv6 address too (default: only when a VIP or its targets are
    /// IPv6; otherwise IPv6 is disabled in the namespaces, to keep router solicitations and
    /// duplicate address detection out of the tests).
    pub fn ipv6(mut self, yes: bool) -> Self {
        self.ipv6 = yes;
        self
    }

    /// Backends for NAT VIPs (default false): plain hosts with no VIP address, no `lb decap`
    /// and a strict reverse-path filter (`rp_filter=1`), whose route to the client's
    /// addresses goes through balancer 0 (their gateway, as NAT needs). The client also gets
    /// [`SECOND_CLIENT_ADDR`] (and its IPv6 twin).
    pub fn nat(mut self, yes: bool) -> Self {
        self.nat = yes;
        if yes {
            self.start_decap = false;
        }
        self
    }

    /// Creates everything. Fails (never skips) without root or without the `lb` binary when
    /// a balancer or decapsulator is to be started. On error, what was created is removed.
    pub fn build(self) -> Result<Topology> {
        netns::require_root()?;
        if self.lbs > MAX_LBS || self.backends > MAX_BACKENDS {
            bail!("at most {MAX_LBS} balancers and {MAX_BACKENDS} backends");
        }
        let lb_bin = if let Some(path) = &self.lb_bin {
            Some(path.clone())
        } else if self.start_lb || self.start_decap {
            Some(lb_bin()?)
        } else {
            None
        };
        for vip in &self.vips {
            for t in &vip.targets {
                if t.backend >= self.backends {
                    bail!(
                        "VIP {} targets backend {} of {}",
                        vip.name,
                        t.backend,
                        self.backends
                    );
                }
            }
        }
        let mut this = self;
        this.ipv6 |= this.vips.iter().any(VipSpec::needs_ipv6);
        let serial = KERNEL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        netns::remove_leftovers();
        netns::ensure_bpffs()?;
        let seq = TOPOLOGY_SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{}{}-{seq}-", netns::NAME_PREFIX, std::process::id());
        let tmp_dir = Path::new(netns::TMP_DIR).join(prefix.trim_end_matches('-'));
        let pin_root = Path::new(netns::BPFFS).join(prefix.trim_end_matches('-'));
        let mut topo = Topology {
            bridge_ns: format!("{prefix}br"),
            client: Node {
                name: "client".to_owned(),
                ns: format!("{prefix}cl"),
                addr: CLIENT_ADDR,
                addr6: v6_of(CLIENT_ADDR),
                bridge_port: "cl".to_owned(),
            },
            lbs: Vec::new(),
            backends: Vec::new(),
            vips: this.vips.clone(),
            lb_bin,
            tmp_dir,
            pin_root,
            servers: Vec::new(),
            decaps: Vec::new(),
            pass_keeper: None,
            lb_starts: 0,
            created_ns: Vec::new(),
            builder: this.clone(),
            _serial: serial,
        };
        topo.create(&this, &prefix)?;
        Ok(topo)
    }
}

/// A running topology; removes everything on drop. See the module docs for its shape.
#[derive(Debug)]
pub struct Topology {
    bridge_ns: String,
    client: Node,
    lbs: Vec<Lb>,
    backends: Vec<Node>,
    vips: Vec<VipSpec>,
    lb_bin: Option<PathBuf>,
    tmp_dir: PathBuf,
    pin_root: PathBuf,
    servers: Vec<Server>,
    /// `lb decap` of backend `j` at index `j` (`None` once stopped).
    decaps: Vec<Option<LbProcess>>,
    pass_keeper: Option<PassKeeper>,
    /// `lb run`s started so far (each logs to a file of its own).
    lb_starts: usize,
    /// Namespaces created so far, in creation order (removed in reverse).
    created_ns: Vec<String>,
    /// What the topology was built from (restarts reuse its `lb run` flags).
    builder: TopologyBuilder,
    _serial: MutexGuard<'static, ()>,
}

impl Topology {
    /// A builder: 3 backends, 1 balancer, no VIPs until [`TopologyBuilder::vip`].
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    fn create(&mut self, b: &TopologyBuilder, prefix: &str) -> Result<()> {
        std::fs::create_dir_all(&self.tmp_dir)
            .with_context(|| format!("creating {}", self.tmp_dir.display()))?;
        std::fs::create_dir_all(&self.pin_root)
            .with_context(|| format!("creating {}", self.pin_root.display()))?;

        // The segment (a bridge: IPv6 frames cross it without it having IPv6 itself).
        self.add_ns(&self.bridge_ns.clone(), false)?;
        let br = self.bridge_ns.clone();
        run_in(&br, "ip", ["link", "add", "br0", "type", "bridge"])?;
        run_in(&br, "ip", ["link", "set", "br0", "up"])?;

        // The client.
        let client = self.client.clone();
        self.add_node(&client, 1500, b.ipv6)?;
        netns::sysctl(&client.ns, "net.ipv4.conf.all.rp_filter", "0")?;
        netns::sysctl(&client.ns, "net.ipv4.conf.eth0.rp_filter", "0")?;

        // The backends: VIPs on lo, no reverse-path filter (the inner packet arrives on eth0
        // addressed to an address of lo), no ARP answers for the VIPs.
        for j in 0..b.backends {
            let addr = nth_addr(FIRST_BACKEND_ADDR, j);
            let node = Node {
                name: format!("backend-{}", j + 1),
                ns: format!("{prefix}be{j}"),
                addr,
                addr6: v6_of(addr),
                bridge_port: format!("be{j}"),
            };
            self.add_node(&node, UNDERLAY_MTU, b.ipv6)?;
            if b.nat {
                for (key, value) in [
                    ("net.ipv4.conf.all.rp_filter", "1"),
                    ("net.ipv4.conf.eth0.rp_filter", "1"),
                ] {
                    netns::sysctl(&node.ns, key, value)?;
                }
                self.backends.push(node);
                continue;
            }
            let mut vip_addrs: Vec<IpAddr> = self.vips.iter().map(|v| v.addr).collect();
            vip_addrs.sort_unstable();
            vip_addrs.dedup();
            for vip in vip_addrs {
                let cidr = match vip {
                    IpAddr::V4(v) => format!("{v}/32"),
                    // nodad: answered at once, without duplicate address detection.
                    IpAddr::V6(v) => format!("{v}/128"),
                };
                let mut args = vec!["addr", "add", &cidr, "dev", "lo"];
                if vip.is_ipv6() {
                    args.push("nodad");
                }
                run_in(&node.ns, "ip", args)?;
            }
            for (key, value) in [
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.eth0.rp_filter", "0"),
                ("net.ipv4.conf.all.arp_ignore", "1"),
                ("net.ipv4.conf.all.arp_announce", "2"),
            ] {
                netns::sysctl(&node.ns, key, value)?;
            }
            self.backends.push(node);
        }

        // The balancers.
        for i in 0..b.lbs {
            let addr = nth_addr(FIRST_LB_ADDR, i);
            let node = Node {
                name: format!("lb-{}", i + 1),
                ns: format!("{prefix}lb{i}"),
                addr,
                addr6: v6_of(addr),
                bridge_port: format!("lb{i}"),
            };
            self.add_node(&node, UNDERLAY_MTU, b.ipv6)?;
            netns::sysctl(&node.ns, "net.ipv4.ip_forward", "1")?;
            // The balancer's upstream router (as on a real host: a default route). Health
            // checks through the data path leave by the route to the VIP.
            run_in(
                &node.ns,
                "ip",
                ["route", "add", "default", "via", &CLIENT_ADDR.to_string()],
            )?;
            if b.ipv6 {
                // bpf_fib_lookup answers FWD_DISABLED for IPv6 without forwarding.
                netns::sysctl(&node.ns, "net.ipv6.conf.all.forwarding", "1")?;
                let via = self.client.addr6.to_string();
                run_in(
                    &node.ns,
                    "ip",
                    ["-6", "route", "add", "default", "via", &via],
                )?;
            }
            if b.static_neighbours {
                for be in &self.backends {
                    let mut hops = vec![be.addr.to_string()];
                    if b.ipv6 {
                        hops.push(be.addr6.to_string());
                    }
                    for hop in hops {
                        run_in(
                            &node.ns,
                            "ip",
                            [
                                "neigh",
                                "replace",
                                &hop,
                                "lladdr",
                                &mac_of(be.addr),
                                "dev",
                                "eth0",
                                "nud",
                                "permanent",
                            ],
                        )?;
                    }
                }
            }
            self.lbs.push(Lb {
                pin_path: self.pin_root.join(format!("lb{i}")),
                admin_socket: self.tmp_dir.join(format!("lb{i}.sock")),
                node,
                process: None,
            });
        }
        if !self.lbs.is_empty() {
            self.route_vips_via(0)?;
        }
        if b.nat {
            self.route_clients_via_lb(b.ipv6)?;
        }

        // XDP_TX'd frames on a veth are delivered promptly only if the peer runs an XDP
        // program: lb_pass on the bridge end of every balancer.
        if b.start_lb && !self.lbs.is_empty() {
            let ports = self
                .lbs
                .iter()
                .map(|l| l.node.bridge_port.clone())
                .collect();
            self.pass_keeper = Some(PassKeeper::start(&self.bridge_ns, ports)?);
        }

        if b.start_decap {
            for j in 0..self.backends.len() {
                let be = self.backends[j].clone();
                let cmd = self.lb_command(
                    &be.ns,
                    ["decap", "--iface", "eth0", "--xdp-mode", &b.xdp_mode],
                )?;
                let log = self.tmp_dir.join(format!("decap-be{j}.log"));
                let p = LbProcess::spawn(&format!("lb decap on {}", be.name), cmd, &log)?;
                self.decaps.push(Some(p));
            }
        }

        if b.start_lb {
            for i in 0..self.lbs.len() {
                let vips = self.vips.clone();
                self.spawn_lb(i, &vips, &[])?;
            }
        }
        Ok(())
    }

    /// Starts `lb run` on balancer `i` serving `vips`, with `extra` flags after the builder's.
    fn spawn_lb(&mut self, i: usize, vips: &[VipSpec], extra: &[&str]) -> Result<()> {
        let mut args = self.run_args(i, &self.builder, vips);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let ns = self.lbs[i].node.ns.clone();
        let cmd = self.lb_command(&ns, &args)?;
        let n = self.lb_starts;
        self.lb_starts += 1;
        let log = self.tmp_dir.join(format!("lb{i}-{n}.log"));
        let label = format!("lb run on {}", self.lbs[i].node.name);
        self.lbs[i].process = Some(LbProcess::spawn(&label, cmd, &log)?);
        Ok(())
    }

    /// Kills `lb run` on balancer `i` with SIGKILL (a crash: no cleanup runs) and waits for
    /// it to be gone. Fails if it was not running.
    pub fn kill_lb(&mut self, i: usize) -> Result<()> {
        self.stop_lb_with(i, libc::SIGKILL).map(|_| ())
    }

    /// Starts `lb run` on balancer `i` again (after [`Self::kill_lb`] or a stop), serving
    /// `vips` (the topology's VIPs are updated to them) with `extra` flags; returns when it is
    /// ready. Fails if one is running there.
    pub fn restart_lb(&mut self, i: usize, vips: &[VipSpec], extra: &[&str]) -> Result<()> {
        let lb = self.lbs.get(i).context("no such balancer")?;
        if lb.process.is_some() {
            bail!("lb run is still running on {}", lb.node.name);
        }
        self.vips = vips.to_vec();
        self.spawn_lb(i, vips, extra)
    }

    /// The address backend `j` is registered by as a target of `vip`.
    fn target_addr(&self, vip: &VipSpec, j: usize) -> IpAddr {
        let be = &self.backends[j];
        if vip.ipv6_targets {
            be.addr6.into()
        } else {
            be.addr.into()
        }
    }

    /// The `lb run` arguments of balancer `i` serving `vips`.
    fn run_args(&self, i: usize, b: &TopologyBuilder, vips: &[VipSpec]) -> Vec<String> {
        let lb = &self.lbs[i];
        let mut args: Vec<String> = [
            "run",
            "--iface",
            "eth0",
            "--xdp-mode",
            &b.xdp_mode,
            "--pin-path",
            &lb.pin_path.to_string_lossy(),
            "--admin-socket",
            &lb.admin_socket.to_string_lossy(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        for vip in vips {
            args.push("--target-group".to_owned());
            args.push(format!(
                "{},protocol={},{}",
                vip.name,
                vip.proto.as_str(),
                vip.group_options
            ));
            args.push("--vip".to_owned());
            args.push(vip.flag_value());
            let targets: Vec<TargetSpec> = if vip.targets.is_empty() {
                (0..self.backends.len())
                    .map(|backend| TargetSpec {
                        backend,
                        port: None,
                        weight: None,
                    })
                    .collect()
            } else {
                vip.targets.clone()
            };
            for t in targets {
                args.push("--target".to_owned());
                args.push(target_flag_value(
                    &vip.name,
                    self.target_addr(vip, t.backend),
                    t.port.or(vip.target_port),
                    t.weight,
                ));
            }
        }
        args.extend(b.extra_lb_args.iter().cloned());
        args
    }

    /// `nsenter --net=NS -- lb ARGS…`.
    fn lb_command<I, S>(&self, ns: &str, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let bin = self
            .lb_bin
            .as_ref()
            .context("no lb binary (the topology runs no lb)")?;
        Ok(netns::nsenter(ns, &bin.to_string_lossy(), args))
    }

    fn add_ns(&mut self, ns: &str, ipv6: bool) -> Result<()> {
        netns::create_netns(ns)?;
        self.created_ns.push(ns.to_owned());
        if ipv6 {
            // Static addresses only: no router advertisements, no duplicate address
            // detection delaying the addresses.
            for key in [
                "net.ipv6.conf.all.accept_ra",
                "net.ipv6.conf.default.accept_ra",
                "net.ipv6.conf.all.accept_dad",
                "net.ipv6.conf.default.accept_dad",
            ] {
                netns::sysctl(ns, key, "0")?;
            }
        } else {
            // IPv6 would only add router solicitations and DAD noise to every interface.
            netns::sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")?;
            netns::sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        Ok(())
    }

    /// Creates `node`'s namespace and its veth to the bridge, addressed and up.
    fn add_node(&mut self, node: &Node, mtu: u32, ipv6: bool) -> Result<()> {
        self.add_ns(&node.ns, ipv6)?;
        let br = &self.bridge_ns;
        let mtu = mtu.to_string();
        run(
            "ip",
            [
                "-n",
                br,
                "link",
                "add",
                &node.bridge_port,
                "mtu",
                &mtu,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "address",
                &mac_of(node.addr),
                "mtu",
                &mtu,
                "netns",
                &node.ns,
            ],
        )?;
        run_in(
            br,
            "ip",
            ["link", "set", &node.bridge_port, "master", "br0", "up"],
        )?;
        let cidr = format!("{}/{SEGMENT_PREFIX_LEN}", node.addr);
        run_in(&node.ns, "ip", ["addr", "add", &cidr, "dev", "eth0"])?;
        if ipv6 {
            let cidr6 = format!("{}/{SEGMENT6_PREFIX_LEN}", node.addr6);
            run_in(
                &node.ns,
                "ip",
                ["-6", "addr", "add", &cidr6, "dev", "eth0", "nodad"],
            )?;
        }
        run_in(&node.ns, "ip", ["link", "set", "eth0", "up"])?;
        // veth may leave L4 checksums to "offload" that never happens once XDP touches the
        // packet: compute them in software.
        run_in(&node.ns, "ethtool", ["-K", "eth0", "tx", "off"])?;
        Ok(())
    }

    /// Points the client's route for [`VIP_NET`] at balancer `i` (the two-balancer test
    /// switches between them, as an ECMP router would after a change).
    pub fn route_vips_via(&self, i: usize) -> Result<()> {
        let lb = self
            .lbs
            .get(i)
            .with_context(|| format!("no balancer {i}"))?;
        let net = format!("{}/{}", VIP_NET.0, VIP_NET.1);
        run_in(
            &self.client.ns,
            "ip",
            [
                "route",
                "replace",
                &net,
                "via",
                &lb.node.addr.to_string(),
                "dev",
                "eth0",
            ],
        )?;
        if self.builder.ipv6 {
            let net6 = format!("{}/{}", VIP6_NET.0, VIP6_NET.1);
            run_in(
                &self.client.ns,
                "ip",
                [
                    "-6",
                    "route",
                    "replace",
                    &net6,
                    "via",
                    &lb.node.addr6.to_string(),
                    "dev",
                    "eth0",
                ],
            )?;
        }
        Ok(())
    }

    /// NAT: the client's second address, and the backends' routes to both client addresses
    /// through balancer 0.
    fn route_clients_via_lb(&self, ipv6: bool) -> Result<()> {
        let cl = &self.client.ns;
        let second = format!("{SECOND_CLIENT_ADDR}/{SEGMENT_PREFIX_LEN}");
        run_in(cl, "ip", ["addr", "add", &second, "dev", "eth0"])?;
        let second6 = v6_of(SECOND_CLIENT_ADDR);
        if ipv6 {
            let cidr6 = format!("{second6}/{SEGMENT6_PREFIX_LEN}");
            run_in(
                cl,
                "ip",
                ["-6", "addr", "add", &cidr6, "dev", "eth0", "nodad"],
            )?;
        }
        let Some(lb) = self.lbs.first() else {
            return Ok(());
        };
        for be in &self.backends {
            for client in [CLIENT_ADDR, SECOND_CLIENT_ADDR] {
                let host = format!("{client}/32");
                let via = lb.node.addr.to_string();
                run_in(&be.ns, "ip", ["route", "add", &host, "via", &via])?;
                if ipv6 {
                    let host6 = format!("{}/128", v6_of(client));
                    let via6 = lb.node.addr6.to_string();
                    run_in(&be.ns, "ip", ["-6", "route", "add", &host6, "via", &via6])?;
                }
            }
        }
        Ok(())
    }

    /// The `lb decap` command line of backend `j` (`None` if it runs none).
    pub fn decap_command_line(&self, j: usize) -> Option<&str> {
        self.decaps
            .get(j)
            .and_then(Option::as_ref)
            .map(LbProcess::command_line)
    }

    /// The client node.
    pub fn client(&self) -> &Node {
        &self.client
    }

    /// Backend `j` (0-based). Panics if there is no such backend (a bug in the test).
    pub fn backend(&self, j: usize) -> &Node {
        &self.backends[j]
    }

    /// Every backend.
    pub fn backends(&self) -> &[Node] {
        &self.backends
    }

    /// Balancer `i` (0-based). Panics if there is no such balancer (a bug in the test).
    pub fn lb(&self, i: usize) -> &Lb {
        &self.lbs[i]
    }

    /// The VIPs given to the builder.
    pub fn vips(&self) -> &[VipSpec] {
        &self.vips
    }

    /// Name of the bridge namespace.
    pub fn bridge_ns(&self) -> &str {
        &self.bridge_ns
    }

    /// Runs `f` in the client namespace.
    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        netns::in_netns(&self.client.ns, f)
    }

    /// Where servers listen on `port`: `0.0.0.0`, or `[::]` (IPv4 too) with IPv6.
    fn any(&self, port: u16) -> SocketAddr {
        if self.builder.ipv6 {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
        } else {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
        }
    }

    /// Starts a line server ([`Server::tcp_lines`]) on `0.0.0.0:port` (`[::]:port` with IPv6)
    /// of every backend, answering with the backend's name; they stop when the topology drops.
    pub fn serve_tcp_lines(&mut self, port: u16) -> Result<()> {
        for be in self.backends.clone() {
            let addr = self.any(port);
            self.servers
                .push(Server::tcp_lines(&be.ns, addr, &be.name)?);
        }
        Ok(())
    }

    /// Starts a peer-reporting server ([`Server::tcp_peer`]) on `0.0.0.0:port` (or `[::]`) of
    /// every backend.
    pub fn serve_tcp_peer(&mut self, port: u16) -> Result<()> {
        for be in self.backends.clone() {
            let addr = self.any(port);
            self.servers.push(Server::tcp_peer(&be.ns, addr, &be.name)?);
        }
        Ok(())
    }

    /// Starts an HTTP/1.0 server ([`Server::http`]) on `0.0.0.0:port` of every backend.
    pub fn serve_http(&mut self, port: u16) -> Result<()> {
        for be in self.backends.clone() {
            let addr = self.any(port);
            self.servers.push(Server::http(&be.ns, addr, &be.name)?);
        }
        Ok(())
    }

    /// Starts a UDP echo server ([`Server::udp_echo`]) bound to `vip` on every backend.
    pub fn serve_udp_echo(&mut self, vip: impl Into<SocketAddr>) -> Result<()> {
        let vip = vip.into();
        for be in self.backends.clone() {
            self.servers.push(Server::udp_echo(&be.ns, vip, &be.name)?);
        }
        Ok(())
    }

    /// Keeps `server` running until the topology drops (for servers started elsewhere, e.g.
    /// in a balancer namespace).
    pub fn keep(&mut self, server: Server) {
        self.servers.push(server);
    }

    /// Runs the `lb` binary with `args` (in the test's own namespace: the pinned maps and the
    /// admin socket are reachable from anywhere) and returns its stdout. Fails with its stderr
    /// when it exits non-zero.
    pub fn lb_cli<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let bin = self
            .lb_bin
            .as_ref()
            .context("no lb binary (the topology runs no lb)")?;
        let mut cmd = Command::new(bin);
        cmd.args(args);
        let out = netns::run_command(&mut cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `lb targets register --target OWNER=ADDR…` against balancer `lb` for backend `backend`.
    pub fn register(
        &self,
        lb: usize,
        owner: &str,
        backend: usize,
        weight: Option<u32>,
    ) -> Result<()> {
        self.change_target(lb, "register", owner, backend, weight)
    }

    /// `lb targets deregister --target OWNER=ADDR` against balancer `lb` for backend `backend`.
    pub fn deregister(&self, lb: usize, owner: &str, backend: usize) -> Result<()> {
        self.change_target(lb, "deregister", owner, backend, None)
    }

    fn change_target(
        &self,
        lb: usize,
        action: &str,
        owner: &str,
        backend: usize,
        weight: Option<u32>,
    ) -> Result<()> {
        let socket = self
            .lbs
            .get(lb)
            .context("no such balancer")?
            .admin_socket
            .clone();
        if backend >= self.backends.len() {
            bail!("no such backend");
        }
        let addr = match self.vips.iter().find(|v| v.name == owner) {
            Some(v) => self.target_addr(v, backend),
            None => self.backends[backend].addr.into(),
        };
        let target = target_flag_value(owner, addr, None, weight);
        self.lb_cli([
            "targets".as_ref(),
            action.as_ref(),
            "--admin-socket".as_ref(),
            socket.as_os_str(),
            "--target".as_ref(),
            target.as_ref(),
        ] as [&std::ffi::OsStr; 6])?;
        Ok(())
    }

    /// `lb stats --pin-path … --json` of balancer `lb`, parsed.
    pub fn stats_json(&self, lb: usize) -> Result<serde_json::Value> {
        let pin = self
            .lbs
            .get(lb)
            .context("no such balancer")?
            .pin_path
            .clone();
        let out = self.lb_cli([
            "stats".as_ref(),
            "--pin-path".as_ref(),
            pin.as_os_str(),
            "--json".as_ref(),
        ] as [&std::ffi::OsStr; 4])?;
        serde_json::from_str(&out).with_context(|| format!("parsing `lb stats --json`: {out}"))
    }

    /// Stops `lb run` on balancer `i` (SIGTERM) and returns how it exited; fails if it was
    /// not running. The namespace, its address and the servers stay.
    pub fn stop_lb(&mut self, i: usize) -> Result<std::process::ExitStatus> {
        self.stop_lb_with(i, libc::SIGTERM)
    }

    /// [`Self::stop_lb`] with `signal` (e.g. SIGINT, as Ctrl-C sends) instead of SIGTERM.
    pub fn stop_lb_with(
        &mut self,
        i: usize,
        signal: libc::c_int,
    ) -> Result<std::process::ExitStatus> {
        let lb = self.lbs.get_mut(i).context("no such balancer")?;
        let mut process = lb.process.take().context("lb run is not running there")?;
        process
            .stop_with(signal)
            .context("reading the exit status of lb run")
    }

    /// Stops the servers of backend `j` listening on `port` (they close their listener and
    /// their connections, as an application that exits does). Fails if none ran there.
    pub fn stop_server(&mut self, j: usize, port: u16) -> Result<()> {
        let ns = self.backends.get(j).context("no such backend")?.ns.clone();
        let before = self.servers.len();
        self.servers
            .retain(|s| s.ns() != ns || s.addr().port() != port);
        if self.servers.len() == before {
            bail!("no server listens on port {port} of backend {j}");
        }
        Ok(())
    }

    /// Starts a line server ([`Server::tcp_lines`]) on `0.0.0.0:port` of backend `j` only.
    pub fn serve_tcp_lines_on(&mut self, j: usize, port: u16) -> Result<()> {
        let be = self.backends.get(j).context("no such backend")?.clone();
        let addr = self.any(port);
        self.servers
            .push(Server::tcp_lines(&be.ns, addr, &be.name)?);
        Ok(())
    }

    /// Stops `lb decap` on backend `j` (SIGTERM: it detaches `lb_decap`), so IP-in-IP for the
    /// backend reaches its kernel undecapsulated. Fails if it was not running.
    pub fn stop_decap(&mut self, j: usize) -> Result<()> {
        let mut p = self
            .decaps
            .get_mut(j)
            .and_then(Option::take)
            .with_context(|| format!("lb decap is not running on backend {j}"))?;
        p.stop();
        Ok(())
    }

    /// Removes `vip` from backend `j`'s `lo`: decapsulated packets for it are then not for
    /// this host.
    pub fn remove_vip_from_lo(&self, j: usize, vip: impl Into<IpAddr>) -> Result<()> {
        let be = self.backends.get(j).context("no such backend")?;
        let cidr = match vip.into() {
            IpAddr::V4(v) => format!("{v}/32"),
            IpAddr::V6(v) => format!("{v}/128"),
        };
        run_in(&be.ns, "ip", ["addr", "del", &cidr, "dev", "lo"])?;
        Ok(())
    }

    /// Runs `lb ARGS… --admin-socket <balancer lb's socket>` and returns its stdout.
    pub fn admin_cli(&self, lb: usize, args: &[&str]) -> Result<String> {
        let socket = self
            .lbs
            .get(lb)
            .context("no such balancer")?
            .admin_socket
            .clone();
        let mut all: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        all.push("--admin-socket".into());
        all.push(socket.into_os_string());
        self.lb_cli(all)
    }

    /// `lb targets health [--group GROUP] --json` of balancer `lb`, parsed.
    pub fn target_health(
        &self,
        lb: usize,
        group: Option<&str>,
    ) -> Result<Vec<crate::health::TargetHealth>> {
        let mut args = vec!["targets", "health", "--json"];
        if let Some(g) = group {
            args.extend(["--group", g]);
        }
        crate::health::parse(&self.admin_cli(lb, &args)?)
    }

    /// `lb groups modify GROUP OPTIONS` against balancer `lb`.
    pub fn modify_group(&self, lb: usize, group: &str, options: &str) -> Result<()> {
        self.admin_cli(lb, &["groups", "modify", group, options])
            .map(|_| ())
    }

    /// Whether every `lb run` and `lb decap` is still running (a crash mid-test is a failure
    /// the test should name, not a timeout).
    pub fn processes_alive(&mut self) -> Result<()> {
        for lb in &mut self.lbs {
            if let Some(p) = &mut lb.process
                && !p.is_running()
            {
                bail!("lb run on {} exited:\n{}", lb.node.name, p.log_text());
            }
        }
        for p in self.decaps.iter_mut().flatten() {
            if !p.is_running() {
                bail!("an lb decap exited:\n{}", p.log_text());
            }
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for lb in &self.lbs {
                eprintln!(
                    "--- {} ({}): `{}`\n{}",
                    lb.node.name,
                    lb.node.ns,
                    lb.command_line(),
                    lb.log_text()
                );
            }
        }
        self.servers.clear();
        for lb in &mut self.lbs {
            lb.process = None; // SIGTERM: detaches lb_xdp and removes its pins
        }
        self.decaps.clear();
        self.pass_keeper = None;
        for ns in self.created_ns.drain(..).rev() {
            if let Err(e) = netns::delete_netns(&ns) {
                eprintln!("lb-tests: {e:#}");
            }
        }
        for dir in [&self.pin_root, &self.tmp_dir] {
            if dir.exists()
                && let Err(e) = std::fs::remove_dir_all(dir)
            {
                eprintln!("lb-tests: removing {}: {e}", dir.display());
            }
        }
    }
}

/// `base + n` within the segment.
fn nth_addr(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    Ipv4Addr::from(u32::from(base).saturating_add(n))
}

/// The MAC address the harness gives the node with address `addr`: locally administered,
/// ending with the address, so `ip neigh` output reads at a glance.
pub fn mac_of(addr: Ipv4Addr) -> String {
    let [a, b, c, d] = addr.octets();
    format!("02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// A thread living in the bridge namespace that holds the `lb_pass` attachments of the
/// balancers' bridge-side veth ends, and drops them (detaching) there when told to.
#[derive(Debug)]
struct PassKeeper {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl PassKeeper {
    fn start(bridge_ns: &str, ifaces: Vec<String>) -> Result<Self> {
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let thread = netns::spawn_in_netns(bridge_ns, "lb_pass keeper", move || {
            let mut guards = Vec::new();
            for iface in &ifaces {
                match crate::pass::attach_pass(iface) {
                    Ok(g) => guards.push(g),
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("attaching lb_pass to {iface}: {e:#}")));
                        return Ok(());
                    }
                }
            }
            let _ = ready_tx.send(Ok(()));
            let _ = stop_rx.recv(); // until the sender drops
            drop(guards);
            Ok(())
        })?;
        let mut me = Self {
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(me),
            Ok(Err(e)) => bail!("{e}"),
            Err(_) => {
                let why = match me.thread.take().map(std::thread::JoinHandle::join) {
                    Some(Ok(Err(e))) => format!("{e:#}"),
                    _ => "the lb_pass thread ended".to_owned(),
                };
                bail!("attaching lb_pass in {bridge_ns}: {why}")
            }
        }
    }
}

impl Drop for PassKeeper {
    fn drop(&mut self) {
        self.stop = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
