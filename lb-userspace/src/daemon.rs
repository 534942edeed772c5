//! `lb run` and `lb decap`: bring the configured planes up, serve the admin socket, and take
//! everything down again on SIGINT/SIGTERM (programs detached, pins and socket removed,
//! neighbour entries we created deleted).
use std::{
    collections::HashMap,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    admin::{self, AdminServer, Handler, Request, Response, TargetDescription},
    cli::{DecapArgs, RunArgs},
    config::{self, Config, L4Config},
    dataplane::{Balancer, Decap, Maps},
    l4::L4Registry,
    proxy::{
        client::ClientConfig,
        server::{self, L7Config},
    },
    targets::{TargetAddr, TargetGroup},
};

/// IPv4 addresses of `iface`, in the order the kernel lists them.
pub fn iface_ipv4_addrs(iface: &str) -> std::io::Result<Vec<Ipv4Addr>> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if name.to_bytes() == iface.as_bytes() && !ifa.ifa_addr.is_null() {
            // SAFETY: non-null sockaddr from the list.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: AF_INET means the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (CAP_BPF and CAP_NET_ADMIN) to load and attach XDP programs");
    }
    Ok(())
}

/// Kernel neighbour entries of kind `managed` for backends (and their gateways), so that
/// `bpf_fib_lookup` in lb_xdp finds a MAC address before the first packet of a flow instead of
/// dropping it as `drop_no_route`. The kernel keeps managed entries resolved by itself.
#[derive(Default)]
struct Neighbours {
    /// (address, device) entries we created, deleted again at shutdown.
    created: Vec<(Ipv4Addr, String)>,
}

impl Neighbours {
    /// Makes sure the next hop towards `addr` has a managed neighbour entry.
    fn ensure(&mut self, addr: Ipv4Addr) {
        let Ok(out) = Command::new("ip")
            .args(["-4", "-o", "route", "get", &addr.to_string()])
            .output()
        else {
            tracing::warn!(%addr, "cannot run `ip route get`: next-hop MAC resolution is left to traffic");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        let after = |k: &str| {
            words
                .iter()
                .position(|w| *w == k)
                .and_then(|i| words.get(i + 1))
                .map(|s| s.to_string())
        };
        let Some(dev) = after("dev") else {
            tracing::warn!(%addr, route = %text.trim(), "no route to backend");
            return;
        };
        if dev == "lo" {
            return;
        }
        let hop: Ipv4Addr = after("via").and_then(|v| v.parse().ok()).unwrap_or(addr);
        if self.created.iter().any(|(a, d)| *a == hop && *d == dev) {
            return;
        }
        let existing = Command::new("ip")
            .args(["-4", "neigh", "show", &hop.to_string(), "dev", &dev])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        let ok = Command::new("ip")
            .args([
                "-4",
                "neigh",
                "replace",
                &hop.to_string(),
                "dev",
                &dev,
                "managed",
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            tracing::warn!(%hop, %dev, "could not add a managed neighbour entry");
        } else if !existing {
            self.created.push((hop, dev));
        }
    }

    fn remove_all(&mut self) {
        for (hop, dev) in self.created.drain(..) {
            let _ = Command::new("ip")
                .args(["-4", "neigh", "del", &hop.to_string(), "dev", &dev])
                .status();
        }
    }
}

/// The running daemon's state, shared with the admin socket.
pub struct Daemon {
    l4: Option<Mutex<L4Registry<Maps>>>,
    groups: HashMap<String, Arc<TargetGroup>>,
    neighbours: Mutex<Neighbours>,
}

/// What an admin request does to its targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Register,
    Deregister,
}

impl Daemon {
    /// Applies `change` to each `--target` spec in order (a target group's or a VIP's); stops
    /// at the first problem, reporting it with its spec (earlier ones stay applied).
    fn change(&self, specs: &[String], change: Change) -> Result<(), String> {
        let parsed = specs
            .iter()
            .map(|s| config::parse_target(s).map_err(|e| format!("--target {s:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        for (spec, raw) in parsed.iter().zip(specs) {
            let fail = |e: String| format!("--target {raw:?}: {e}");
            if let Some(g) = self.groups.get(&spec.owner) {
                let addr = spec
                    .port
                    .map(|p| SocketAddr::new(spec.addr, p))
                    .ok_or_else(|| fail("targets of an L7 target group need a port".into()))?;
                match change {
                    Change::Register => g.register(TargetAddr::with_weight(addr, spec.weight)),
                    Change::Deregister if !g.deregister(addr) => {
                        return Err(fail(format!(
                            "{addr} is not registered with {}",
                            spec.owner
                        )));
                    }
                    Change::Deregister => {}
                }
                tracing::info!(group = %spec.owner, target = %addr, ?change, "targets changed");
                continue;
            }
            let no_owner = || fail(format!("no VIP or target group is named {:?}", spec.owner));
            let l4 = self.l4.as_ref().ok_or_else(no_owner)?;
            let mut reg = l4.lock().map_err(|_| "registry lock poisoned")?;
            let vip = reg.resolve(&spec.owner).ok_or_else(no_owner)?;
            let t = config::l4_target(reg.vip_spec(&vip).expect("resolved"), spec).map_err(fail)?;
            match change {
                Change::Register => {
                    self.neighbours
                        .lock()
                        .map_err(|_| "neighbour lock poisoned")?
                        .ensure(t.addr);
                    reg.register(&vip, &[t])
                }
                Change::Deregister => reg.deregister(&vip, &[(t.addr, t.port)]),
            }
            .map_err(|e| fail(e.to_string()))?;
            tracing::info!(%vip, target = %t.addr, weight = t.weight, ?change, "targets changed");
        }
        Ok(())
    }

    fn describe(&self) -> Vec<TargetDescription> {
        let mut out = Vec::new();
        let mut names: Vec<&String> = self.groups.keys().collect();
        names.sort();
        for name in names {
            for t in self.groups[name].describe() {
                out.push(TargetDescription {
                    owner: name.clone(),
                    target: t.addr.to_string(),
                    weight: t.weight,
                    state: t.state.to_string(),
                });
            }
        }
        if let Some(l4) = &self.l4
            && let Ok(reg) = l4.lock()
        {
            for (spec, _, backends) in reg.describe() {
                for b in backends {
                    out.push(TargetDescription {
                        owner: spec.vip.to_string(),
                        target: format!("{}:{}", b.target.addr, b.target.port),
                        weight: b.target.weight,
                        state: "healthy".into(),
                    });
                }
            }
        }
        out
    }
}

impl Handler for Daemon {
    fn handle(&self, req: Request) -> Response {
        match req {
            Request::RegisterTargets { targets } => self
                .change(&targets, Change::Register)
                .map_or_else(Response::error, |()| Response::ok()),
            Request::DeregisterTargets { targets } => self
                .change(&targets, Change::Deregister)
                .map_or_else(Response::error, |()| Response::ok()),
            Request::DescribeTargets => Response {
                ok: true,
                error: None,
                targets: self.describe(),
            },
        }
    }
}

fn bring_up_l4(
    l4: &L4Config,
    pin_path: &std::path::Path,
    neighbours: &mut Neighbours,
) -> anyhow::Result<(Balancer, L4Registry<Maps>)> {
    require_root("lb run with --vip")?;
    let lb_addr = match l4.lb_addr {
        Some(a) => a,
        None => {
            let first = &l4.ifaces[0];
            *iface_ipv4_addrs(first)
                .with_context(|| format!("listing addresses of {first}"))?
                .first()
                .with_context(|| {
                    format!("--iface {first} has no IPv4 address: give --lb-addr explicitly")
                })?
        }
    };
    let (mut balancer, maps) =
        Balancer::load(l4.sizes, lb_addr, Some(pin_path)).context("loading lb_xdp")?;
    for iface in &l4.ifaces {
        balancer
            .attach(iface, l4.xdp_mode)
            .with_context(|| format!("--iface {iface}"))?;
    }
    let mut reg = L4Registry::new(
        maps,
        l4.sizes.ring_size,
        l4.sizes.max_vips,
        l4.sizes.max_backends,
    );
    for v in &l4.vips {
        reg.add_vip(v.spec.clone())
            .with_context(|| format!("adding VIP {}", v.spec.vip))?;
        for t in &v.targets {
            neighbours.ensure(t.addr);
        }
        reg.register(&v.spec.vip, &v.targets)
            .with_context(|| format!("registering targets of {}", v.spec.vip))?;
        tracing::info!(vip = %v.spec.vip, targets = v.targets.len(), "VIP up");
    }
    tracing::info!(%lb_addr, ifaces = ?l4.ifaces, pin_path = %pin_path.display(), "lb_xdp attached");
    Ok((balancer, reg))
}

/// `lb run`: returns when a signal asked us to stop.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = Config::from_run_args(&args)?;
    if args.check {
        print_check(&cfg);
        return Ok(());
    }
    let Config {
        l4: l4_cfg,
        l7: l7_cfg,
        pin_path,
        admin_socket,
    } = cfg;

    let mut neighbours = Neighbours::default();
    let mut balancer = None;
    let mut l4 = None;
    if let Some(l4cfg) = &l4_cfg {
        match bring_up_l4(l4cfg, &pin_path, &mut neighbours) {
            Ok((b, r)) => {
                balancer = Some(b);
                l4 = Some(Mutex::new(r));
            }
            Err(e) => {
                neighbours.remove_all();
                return Err(e);
            }
        }
    }
    let mut groups = HashMap::new();
    let mut l7 = None;
    if let Some(spec) = l7_cfg {
        for (gcfg, targets) in spec.groups {
            let g = Arc::new(TargetGroup::new(gcfg));
            g.set_targets(targets);
            groups.insert(g.name().to_string(), g);
        }
        let cfg = L7Config {
            listeners: spec.listeners,
            groups: groups.clone(),
            client: ClientConfig::default(),
        };
        match server::start(cfg).await {
            Ok(running) => {
                for (name, addr) in &running.addrs {
                    tracing::info!(listener = %name, %addr, "listening");
                }
                l7 = Some(running);
            }
            Err(e) => {
                neighbours.remove_all();
                return Err(e);
            }
        }
    }
    let daemon = Arc::new(Daemon {
        l4,
        groups,
        neighbours: Mutex::new(neighbours),
    });

    let admin = AdminServer::bind(&admin_socket)?;
    let admin_task = tokio::spawn(admin.serve(daemon.clone() as Arc<dyn Handler>));

    let l4_summary = match (&l4_cfg, &balancer) {
        (Some(c), Some(b)) => format!(
            "{} VIP(s) on {:?}, maps pinned at {}",
            c.vips.len(),
            b.attached(),
            pin_path.display()
        ),
        _ => "no L4 VIPs".into(),
    };
    let l7_summary = match &l7 {
        Some(r) => {
            let addrs: Vec<String> = r.addrs.iter().map(|(n, a)| format!("{n}={a}")).collect();
            format!("listeners {}", addrs.join(" "))
        }
        None => "no L7 listeners".into(),
    };
    println!(
        "ready: {l4_summary}; {l7_summary}; admin socket {}",
        admin_socket.display()
    );
    let _ = std::io::stdout().flush();

    wait_for_signal().await?;
    tracing::info!("shutting down");
    if let Some(running) = l7 {
        let drain = Duration::from_secs(args.drain_timeout);
        if let Err(e) = running.shutdown(drain).await {
            tracing::warn!(error = %e, "L7 shutdown");
        }
    }
    admin_task.abort();
    let _ = admin_task.await;
    drop(balancer);
    if let Ok(mut n) = daemon.neighbours.lock() {
        n.remove_all();
    }
    Ok(())
}

fn print_check(cfg: &Config) {
    println!("configuration is valid");
    if let Some(l7) = &cfg.l7 {
        for (l, rules) in &l7.listeners {
            println!(
                "L7 listener {} {}://{}: {} rule(s) + default",
                l.name,
                l.protocol.as_str(),
                l.bind,
                rules.len()
            );
        }
        for (g, targets) in &l7.groups {
            println!("  target group {}: {} target(s)", g.name, targets.len());
        }
    }
    if let Some(l4) = &cfg.l4 {
        println!(
            "L4: lb_xdp on {:?} ({:?} mode), ring size {}, flow table {}",
            l4.ifaces, l4.xdp_mode, l4.sizes.ring_size, l4.sizes.max_flows
        );
        for v in &l4.vips {
            let name = v.spec.name.as_deref().unwrap_or("-");
            println!(
                "  VIP {} ({name}): {} target(s)",
                v.spec.vip,
                v.targets.len()
            );
            for t in &v.targets {
                println!("    {}:{} weight {}", t.addr, t.port, t.weight);
            }
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

/// `lb decap`: attach lb_decap until a signal.
pub async fn decap(args: DecapArgs) -> anyhow::Result<()> {
    require_root("lb decap")?;
    let mut addrs = args.addrs.clone();
    if addrs.is_empty() {
        for i in &args.ifaces {
            addrs.extend(iface_ipv4_addrs(i).with_context(|| format!("--iface {i}"))?);
        }
    }
    if addrs.is_empty() {
        bail!("--iface {:?} has no IPv4 address: give --addr", args.ifaces);
    }
    let mut d = Decap::load(&addrs).context("loading lb_decap")?;
    for i in &args.ifaces {
        d.attach(i, args.xdp_mode)
            .with_context(|| format!("--iface {i}"))?;
    }
    println!(
        "ready: lb_decap on {:?}, decapsulating IP-in-IP to {:?}",
        args.ifaces, addrs
    );
    let _ = std::io::stdout().flush();
    wait_for_signal().await?;
    let counts = d.counters().unwrap_or_default();
    for (r, n) in counts {
        tracing::info!(reason = r.label(), packets = n, "lb_decap counter");
    }
    Ok(())
}

/// `lb targets …`: one admin request, printed.
pub fn targets(args: crate::cli::TargetsArgs) -> anyhow::Result<()> {
    use crate::cli::TargetsAction;
    let req = match args.action {
        TargetsAction::Register { targets } => Request::RegisterTargets { targets },
        TargetsAction::Deregister { targets } => Request::DeregisterTargets { targets },
        TargetsAction::Describe => Request::DescribeTargets,
    };
    let resp = admin::call(&args.admin_socket, &req)?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_else(|| "request failed".into()));
    }
    if matches!(req, Request::DescribeTargets) {
        println!("{:<24} {:<24} {:>6}  STATE", "OWNER", "TARGET", "WEIGHT");
        for t in resp.targets {
            println!(
                "{:<24} {:<24} {:>6}  {}",
                t.owner, t.target, t.weight, t.state
            );
        }
    }
    Ok(())
}
