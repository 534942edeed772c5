//! `lb run` and `lb decap`: the process's life. Bring the configured planes up, run the
//! control plane, serve the admin API, and take everything down again on SIGINT/SIGTERM
//! (programs detached, pins and socket removed, neighbour entries we created deleted).
//!
//! - [`host`]: the host's networking (addresses, routes, neighbour entries);
//! - [`control`]: the registry's subscribers and the admin API handler.
use std::{
    collections::HashMap,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub mod control;
pub mod host;
pub mod observe;

use crate::{
    admin::AdminServer,
    cli::{DecapArgs, RunArgs},
    config::{Config, L4Config},
    dataplane::{Balancer, Decap, LbAddrs, Maps},
    health::{self, DataPath},
    l4::{Adoption, RingWriter, VipSpec, flows},
    proxy::{
        client::ClientConfig,
        server::{self, L7Config},
    },
    registry::{ControlPlane, Registry},
};
use control::{Control, L4Sync, L7Sync};
use host::{Neighbours, iface_addrs};

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (CAP_BPF and CAP_NET_ADMIN) to load and attach XDP programs");
    }
    Ok(())
}

/// The outer source addresses: those given, and for a family without one the first address
/// of that family of the first `--iface`. Fails when a family the targets need has none.
fn lb_addrs(l4: &L4Config, registry: &Registry) -> anyhow::Result<LbAddrs> {
    let first = &l4.ifaces[0];
    let found = iface_addrs(first).with_context(|| format!("listing addresses of {first}"))?;
    let pick = |v6: bool| {
        l4.lb_addrs
            .iter()
            .chain(&found)
            .copied()
            .find(|a| a.is_ipv6() == v6)
    };
    let addrs = LbAddrs {
        v4: pick(false).and_then(|a| match a {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }),
        v6: pick(true).and_then(|a| match a {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        }),
    };
    for (v6, have, family) in [
        (false, addrs.v4.is_some(), "IPv4"),
        (true, addrs.v6.is_some(), "IPv6"),
    ] {
        let needed = registry.vips().iter().any(|b| {
            registry
                .target_addrs(&b.group)
                .iter()
                .any(|a| a.is_ipv6() == v6)
        });
        if needed && !have {
            bail!(
                "L4 targets are {family} but --iface {first} has no {family} address for the \
                 outer header: give --lb-addr"
            );
        }
    }
    if addrs == LbAddrs::default() {
        bail!("--iface {first} has no address: give --lb-addr explicitly");
    }
    Ok(addrs)
}

/// The L4 data plane once up: the balancer, the ring writer, and what it adopted.
struct L4Up {
    balancer: Balancer,
    writer: RingWriter<Maps>,
    adoption: Option<Adoption>,
}

/// Loads lb_xdp (and the health-check encapsulator), attaches them and adds the VIPs. A
/// previous run's pinned maps and links are adopted (see [`crate::dataplane`]).
fn bring_up_l4(l4: &L4Config, pin_path: &Path, registry: &Registry) -> anyhow::Result<L4Up> {
    require_root("lb run with --vip")?;
    let addrs = lb_addrs(l4, registry)?;
    let (mut balancer, mut maps) =
        Balancer::load(l4.sizes, addrs, Some(pin_path)).context("loading lb_xdp")?;
    balancer
        .set_nexthop_max_age(&mut maps, l4.nexthop_max_age)
        .context("configuring the next-hop cache")?;
    let adopted = balancer.adopted();
    let up = (|| {
        // The writer first when adopting: the maps must carry this run's VIPs before the new
        // program meets any packet of a VIP that is gone.
        let (writer, adoption) = RingWriter::adopt(
            maps,
            l4.sizes.ring_size,
            l4.sizes.max_vips,
            l4.sizes.max_backends,
            &l4.vips,
        )
        .context("writing the VIPs to the maps")?;
        for iface in &l4.ifaces {
            balancer
                .attach(iface, l4.xdp_mode)
                .with_context(|| format!("--iface {iface}"))?;
            balancer
                .attach_hc_encap(iface)
                .with_context(|| format!("--iface {iface}: attaching lb_hc_encap (TC egress)"))?;
        }
        anyhow::Ok((writer, adoption))
    })();
    let (writer, adoption) = match up {
        Ok(up) => up,
        Err(e) => {
            // An adopted data plane is left as it was found: its flows keep going.
            balancer.keep_dataplane(adopted);
            return Err(e);
        }
    };
    // From here until a clean shutdown decides, a failure leaves an adopted data plane in
    // place (it carried flows before this run started); a fresh one is removed.
    balancer.keep_dataplane(adopted);
    for gone in balancer.detach_others() {
        tracing::info!(iface = %gone, "lb_xdp detached from an interface the previous run used and this one does not");
    }
    if adopted {
        let backends: usize = adoption.vips.iter().map(|v| v.backends.len()).sum();
        tracing::info!(
            vips = adoption.vips.len(),
            backends,
            removed_vips = ?adoption.removed_vips.iter().map(ToString::to_string).collect::<Vec<_>>(),
            backends_cleared = adoption.backends_cleared,
            flows_removed = adoption.flows_removed,
            "adopted the data plane a previous lb run left: its flows continue"
        );
    }
    tracing::info!(lb_addrs = ?addrs, ifaces = ?l4.ifaces, pin_path = %pin_path.display(), "lb_xdp attached");
    Ok(L4Up {
        balancer,
        writer,
        adoption: adopted.then_some(adoption),
    })
}

/// Rebuilds the registry's view of the targets from the maps a previous run left: a target
/// that was taking new flows (and not only because its group failed open) starts healthy, so
/// the ring stays as it is while its checks start over; a target in the maps that the flags
/// no longer name drains for its group's deregistration delay (its flows go on), as if
/// deregistered.
fn seed_registry(registry: &mut Registry, vip_groups: &[(VipSpec, String)], adoption: &Adoption) {
    let now = Instant::now();
    for v in &adoption.vips {
        let Some((_, group)) = vip_groups.iter().find(|(s, _)| s.vip == v.vip) else {
            continue;
        };
        for b in &v.backends {
            let addr = SocketAddr::new(b.member.addr, b.member.port);
            if registry.has_target(group, addr) {
                if b.member.takes_new && !v.fail_open {
                    registry.assume_healthy(group, addr);
                }
            } else if b.member.keeps_existing {
                let drained = registry
                    .register(group, &[(addr, b.member.weight)])
                    .and_then(|()| registry.deregister(group, &[addr], now));
                match drained {
                    Ok(()) => tracing::info!(
                        group,
                        target = %addr,
                        "target in the pinned maps but not in the flags: draining it"
                    ),
                    Err(e) => {
                        tracing::warn!(group, target = %addr, error = %e, "cannot drain a target the pinned maps hold; its flows are re-steered")
                    }
                }
            }
        }
    }
}

/// Sweeps the flow table every `interval` (see [`flows`]): deletes expired entries and
/// records the table's size and the live flows the LRU evicted in `LB_FLOW_STATS`.
async fn sweep_flows(
    pin_path: PathBuf,
    sync: Arc<L4Sync>,
    timeouts: HashMap<u32, u64>,
    interval: Option<Duration>,
) {
    let shortest = timeouts
        .values()
        .copied()
        .filter(|t| *t > 0)
        .min()
        .map_or(flows::MAX_SWEEP_INTERVAL, Duration::from_nanos);
    let interval = interval.unwrap_or_else(|| flows::sweep_interval(shortest));
    let maps = match tokio::task::spawn_blocking({
        let p = pin_path.clone();
        move || Maps::open_pinned(&p)
    })
    .await
    {
        Ok(Ok(m)) => Arc::new(Mutex::new(m)),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "flow sweeper: cannot open the maps; no flow-table accounting");
            return;
        }
        Err(_) => return,
    };
    let timeouts = Arc::new(timeouts);
    loop {
        tokio::time::sleep(interval).await;
        let (maps, sync, timeouts) = (maps.clone(), sync.clone(), timeouts.clone());
        let swept =
            tokio::task::spawn_blocking(move || -> anyhow::Result<lb_common::FlowTableStats> {
                let mut maps = lock(&maps);
                let inserts = maps.flow_inserts()?;
                let now_ns = flows::monotonic_ns();
                let (entries, expired) = maps.sweep_flows(now_ns, &timeouts)?;
                // After the flows: a reverse entry whose flow just expired goes with it.
                let nat_entries = maps.sweep_nat_reverse()?;
                let prev = maps.flow_table_stats()?;
                let stats = flows::account(
                    prev,
                    flows::SweepResult {
                        inserts,
                        deleted_by_writer: sync.take_flows_removed(),
                        expired,
                        entries,
                        now_ns,
                        nat_entries,
                    },
                );
                maps.set_flow_table_stats(stats)?;
                Ok(stats)
            })
            .await;
        match swept {
            Ok(Ok(s)) => {
                tracing::debug!(
                    entries = s.entries,
                    expired = s.expired,
                    evicted_live = s.evicted_live,
                    "flow table swept"
                );
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "flow sweep failed"),
            Err(_) => return,
        }
    }
}

/// Warns when data-path health checks of a VIP would not leave through an interface that
/// runs `lb_hc_encap` (they would reach the wrong backend, or none).
fn check_probe_routes(vips: &[VipSpec], ifaces: &[String]) {
    // NAT VIPs' targets are checked directly, not through the data path.
    for v in vips.iter().filter(|v| v.mode == crate::l4::VipMode::Dsr) {
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
        mut registry,
        pin_path,
        admin_socket,
        admin_tcp,
    } = cfg;
    let vip_groups: Vec<(VipSpec, String)> = registry
        .vips()
        .iter()
        .map(|b| (b.spec.clone(), b.group.clone()))
        .collect();
    let logs = Arc::new(observe::Logs::open(&args)?);
    let neighbours = Arc::new(Mutex::new(Neighbours::with_record(host::neighbour_record(
        &admin_socket,
    ))));
    let mut tasks = tokio::task::JoinSet::new();

    // L4: the maps first (adopting a previous run's), then the ring writer follows the
    // registry, which starts from the flags and what the maps held.
    let mut l4_up = None;
    if let Some(l4) = &l4_cfg {
        let up = bring_up_l4(l4, &pin_path, &registry)?;
        if let Some(adoption) = &up.adoption {
            seed_registry(&mut registry, &vip_groups, adoption);
        }
        l4_up = Some(up);
    }
    let plane = ControlPlane::new(registry);
    let mut balancer = None;
    let mut l4_sync = None;
    if let (Some(l4), Some(up)) = (&l4_cfg, l4_up) {
        let L4Up {
            balancer: b,
            writer,
            adoption,
        } = up;
        balancer = Some(b);
        let timeouts: HashMap<u32, u64> = writer
            .describe()
            .into_iter()
            .map(|(spec, id, _)| {
                (
                    id,
                    u64::try_from(spec.idle_timeout.as_nanos()).unwrap_or(u64::MAX),
                )
            })
            .collect();
        let sync = Arc::new(L4Sync::new(writer, vip_groups.clone(), neighbours.clone()));
        if let Some(a) = &adoption {
            sync.add_flows_removed(a.flows_removed as u64);
        }
        sync.apply(&plane.current());
        tasks.spawn(sync.clone().run(plane.clone()));
        tasks.spawn(sweep_flows(
            pin_path.clone(),
            sync.clone(),
            timeouts,
            l4.sweep_interval,
        ));
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
            workers: args.l7_layout(),
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
    let keep = l4_cfg.as_ref().is_some_and(|l| l.keep_dataplane);
    if let Some(mut b) = balancer {
        b.keep_dataplane(keep);
        if keep {
            tracing::info!(pin_path = %pin_path.display(), "leaving lb_xdp attached and its maps pinned (--keep-dataplane): the next lb run with this --pin-path adopts them");
        }
        drop(b);
    }
    if !keep {
        // With the data plane left in place, its next hops must stay resolved.
        lock(&neighbours).remove_all();
    }
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
            let guards = if b.spec.guards.is_empty() {
                "no guards".to_owned()
            } else {
                b.spec.guards.to_options()
            };
            println!(
                "  VIP {} ({name}) → target group {}, {}, idle timeout {} s, {guards}",
                b.spec.vip,
                b.group,
                b.spec.mode,
                b.spec.idle_timeout.as_secs()
            );
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
            addrs.extend(iface_addrs(i).with_context(|| format!("--iface {i}"))?);
        }
    }
    if addrs.is_empty() {
        bail!("--iface {:?} has no address: give --addr", args.ifaces);
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
