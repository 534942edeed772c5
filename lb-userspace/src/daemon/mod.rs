//! `lb run` and `lb decap`: the process's life. Bring the configured planes up, run the
//! control plane, serve the admin API, and take everything down again on SIGINT/SIGTERM
//! (programs detached, pins and socket removed, neighbour entries we created deleted).
//!
//! - [`host`]: the host's networking (addresses, routes, neighbour entries);
//! - [`control`]: the registry's subscribers and the admin API handler.
use std::{
    io::Write as _,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};

pub mod control;
pub mod host;
pub mod observe;

use crate::{
    admin::AdminServer,
    cli::{DecapArgs, RunArgs},
    config::{Config, L4Config},
    dataplane::{Balancer, Decap},
    health::{self, DataPath},
    l4::{RingWriter, VipSpec},
    proxy::{
        client::ClientConfig,
        server::{self, L7Config},
    },
    registry::ControlPlane,
};
use control::{Control, L4Sync, L7Sync};
use host::{Neighbours, iface_ipv4_addrs};

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (CAP_BPF and CAP_NET_ADMIN) to load and attach XDP programs");
    }
    Ok(())
}

/// Loads lb_xdp (and the health-check encapsulator), attaches them and adds the VIPs.
fn bring_up_l4(
    l4: &L4Config,
    pin_path: &std::path::Path,
) -> anyhow::Result<(Balancer, RingWriter<crate::dataplane::Maps>, Ipv4Addr)> {
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
        balancer
            .attach_hc_encap(iface)
            .with_context(|| format!("--iface {iface}: attaching lb_hc_encap (TC egress)"))?;
    }
    let mut writer = RingWriter::new(
        maps,
        l4.sizes.ring_size,
        l4.sizes.max_vips,
        l4.sizes.max_backends,
    );
    for v in &l4.vips {
        writer
            .add_vip(v.clone())
            .with_context(|| format!("adding VIP {}", v.vip))?;
    }
    tracing::info!(%lb_addr, ifaces = ?l4.ifaces, pin_path = %pin_path.display(), "lb_xdp attached");
    Ok((balancer, writer, lb_addr))
}

/// Warns when data-path health checks of a VIP would not leave through an interface that
/// runs `lb_hc_encap` (they would reach the wrong backend, or none).
fn check_probe_routes(vips: &[VipSpec], ifaces: &[String]) {
    for v in vips {
        match host::route_to(v.vip.addr, Some(lb_common::LB_HC_MARK_BASE)) {
            Some((dev, _)) if ifaces.contains(&dev) => {}
            Some((dev, _)) => tracing::warn!(
                vip = %v.vip,
                %dev,
                "the route to this VIP leaves through {dev}, which is not an --iface: \
                 data-path health checks need it to leave through one (or use \
                 health-check-mode=direct)"
            ),
            None => tracing::warn!(
                vip = %v.vip,
                "no route from this host to the VIP: data-path health checks will report \
                 Elb.InternalError (add a route, e.g. a default route, or use \
                 health-check-mode=direct)"
            ),
        }
    }
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
        registry,
        pin_path,
        admin_socket,
        admin_tcp,
    } = cfg;
    let vip_groups: Vec<(VipSpec, String)> = registry
        .vips()
        .iter()
        .map(|b| (b.spec.clone(), b.group.clone()))
        .collect();
    let plane = ControlPlane::new(registry);
    let logs = Arc::new(observe::Logs::open(&args)?);
    let neighbours = Arc::new(Mutex::new(Neighbours::default()));
    let mut tasks = tokio::task::JoinSet::new();

    // L4: the maps first, then the ring writer follows the registry.
    let mut balancer = None;
    let mut l4_sync = None;
    if let Some(l4) = &l4_cfg {
        let (b, writer, _) = match bring_up_l4(l4, &pin_path) {
            Ok(up) => up,
            Err(e) => {
                lock(&neighbours).remove_all();
                return Err(e);
            }
        };
        balancer = Some(b);
        let sync = Arc::new(L4Sync::new(writer, vip_groups.clone(), neighbours.clone()));
        sync.apply(&plane.current());
        tasks.spawn(sync.clone().run(plane.clone()));
        check_probe_routes(&l4.vips, &l4.ifaces);
        l4_sync = Some(sync);
    }

    // L7: the groups from the registry, the listeners with their rule books.
    let mut l7 = None;
    let mut l7_parts = None;
    let mut listener_books = Vec::new();
    if let Some(spec) = l7_cfg {
        let groups = L7Sync::groups_for(&plane.current(), &Default::default());
        let cfg = L7Config {
            listeners: spec
                .listeners
                .iter()
                .map(|(l, book)| (l.clone(), (*book.compiled()).clone()))
                .collect(),
            groups,
            client: ClientConfig::default(),
            access_log: logs.access.clone(),
        };
        listener_books = spec.listeners;
        match server::start(cfg).await {
            Ok(running) => {
                for (name, addr) in &running.addrs {
                    tracing::info!(listener = %name, %addr, "listening");
                }
                let sync = Arc::new(L7Sync::new(running.handle()));
                sync.apply(&plane.current());
                tasks.spawn(sync.clone().run(plane.clone()));
                l7_parts = Some((sync, running.handle()));
                l7 = Some(running);
            }
            Err(e) => {
                lock(&neighbours).remove_all();
                return Err(e);
            }
        }
    }

    // Health checks and lifecycle timers.
    let data_path = l4_sync.as_ref().map(|sync| {
        let icmp = Arc::new(health::icmp::IcmpWatch::default());
        let icmp = match icmp.start() {
            Ok(task) => {
                tasks.spawn(async move {
                    let _ = task.await;
                });
                Some(icmp)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no raw ICMP socket: data-path checks cannot tell a missing `lb decap` apart");
                None
            }
        };
        DataPath {
            ids: sync.clone(),
            icmp,
        }
    });
    tasks.spawn(health::supervise(
        plane.clone(),
        data_path,
        logs.health.clone(),
    ));
    tasks.spawn(plane.clone().run_timers());

    let max_backends = l4_cfg.as_ref().map_or(0, |l| l.sizes.max_backends as usize);
    let hub = observe::hub(
        l7_parts.as_ref().map(|(_, h)| h.clone()),
        plane.clone(),
        l4_cfg.as_ref().map(|_| pin_path.as_path()),
        logs.clone(),
    )?;
    tasks.spawn(hub.clone().run());
    tasks.spawn(logs.clone().reopen_on_sighup());
    let control = Arc::new(
        Control::new(
            plane.clone(),
            l7_parts,
            l4_sync.clone(),
            listener_books,
            vip_groups,
            max_backends,
        )
        .with_metrics(hub),
    );
    let admin = AdminServer::bind(&admin_socket, admin_tcp.as_ref())?;
    let admin_tcp_addr = admin.tcp_addr();
    tasks.spawn(admin.serve(control));

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
    let tcp_summary = admin_tcp_addr.map_or_else(String::new, |a| format!(" and {a}"));
    // Handlers first: a signal right after `ready` must still take everything down.
    let signals = Signals::install()?;
    println!(
        "ready: {l4_summary}; {l7_summary}; admin socket {}{tcp_summary}",
        admin_socket.display()
    );
    let _ = std::io::stdout().flush();

    signals.wait().await;
    tracing::info!("shutting down");
    if let Some(running) = l7 {
        let drain = Duration::from_secs(args.drain_timeout);
        if let Err(e) = running.shutdown(drain).await {
            tracing::warn!(error = %e, "L7 shutdown");
        }
    }
    tasks.shutdown().await;
    logs.close(Duration::from_secs(2));
    drop(l4_sync);
    drop(balancer);
    lock(&neighbours).remove_all();
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn print_check(cfg: &Config) {
    println!("configuration is valid");
    if let Some(l7) = &cfg.l7 {
        for (l, book) in &l7.listeners {
            println!(
                "L7 listener {} {}://{}: {} rule(s) + default",
                l.name,
                l.protocol.as_str(),
                l.bind,
                book.compiled().len()
            );
        }
    }
    if let Some(l4) = &cfg.l4 {
        println!(
            "L4: lb_xdp on {:?} ({:?} mode), ring size {}, flow table {}",
            l4.ifaces, l4.xdp_mode, l4.sizes.ring_size, l4.sizes.max_flows
        );
        for b in cfg.registry.vips() {
            let name = b.spec.name.as_deref().unwrap_or("-");
            println!("  VIP {} ({name}) → target group {}", b.spec.vip, b.group);
        }
    }
    let now = std::time::Instant::now();
    for g in cfg.registry.group_names() {
        let Ok(c) = cfg.registry.group_config(&g) else {
            continue;
        };
        let check = c.check().map_or_else(
            || "health checks off".to_owned(),
            |h| format!("{} check every {} s", h.protocol, h.interval.as_secs_f64()),
        );
        println!("  target group {g} ({}, {check})", c.protocol);
        if let Ok(ts) = cfg.registry.describe_target_health(&g, None, now) {
            for t in ts {
                println!(
                    "    {}:{} weight {}",
                    t.target.id,
                    t.target.port,
                    t.target.weight.unwrap_or(1)
                );
            }
        }
    }
}

/// SIGTERM and SIGINT, caught from the moment they are installed.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
        })
    }

    /// Returns at the first of them.
    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
    }
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
    let signals = Signals::install()?;
    println!(
        "ready: lb_decap on {:?}, decapsulating IP-in-IP to {:?}",
        args.ifaces, addrs
    );
    let _ = std::io::stdout().flush();
    signals.wait().await;
    let counts = d.counters().unwrap_or_default();
    for (r, n) in counts {
        tracing::info!(reason = r.label(), packets = n, "lb_decap counter");
    }
    Ok(())
}
