//! `cargo bench -p lb-userspace --bench control` (what `cargo xtask bench control` runs): the
//! control plane's costs, each beside a baseline measured in the same run.
//!
//! 1. Maglev table build (M = 65,537) for 10, 100 and 1,000 backends — beside the time to
//!    write every slot of one ring to the BPF map, the cost the delta writes avoid.
//! 2. Change latency: an admin API `RegisterTargets` / `DeregisterTargets` through the real
//!    handler (registry write, snapshot, then both planes applied: the L7 picker and the XDP
//!    maps) for a group of 10, 100 and 1,000 targets behind an L4 VIP and an L7 rule. The
//!    handler returns once both planes carry the change, so its duration is the time from
//!    the request to the updated ring in the map. Beside it: the same change written to the
//!    maps alone (`RingWriter::apply`), the floor the control plane adds to.
//! 3. Memory per flow-table entry, from the kernel's own accounting (`memlock` in
//!    /proc/self/fdinfo) of LB_FLOWS at two sizes.
//!
//! Needs root (BPF maps). Nothing is attached to any interface. About 30 s on 2 cores.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use lb::admin::api::TargetRef;
use lb::admin::{Handler as _, Request};
use lb::daemon::control::{Control, L4Sync, L7Sync};
use lb::daemon::host::Neighbours;
use lb::dataplane::{Balancer, LbAddrs, Maps, Sizes};
use lb::health::BackendIds as _;
use lb::l4::{L4Maps as _, L4Member, Proto, RingWriter, VipAddr, VipSpec};
use lb::maglev;
use lb::proxy::client::ClientConfig;
use lb::proxy::server::{self, L7Config, ListenerConfig, ListenerProtocol};
use lb::registry::{ControlPlane, Registry};
use lb::rules::RuleBook;
use lb::targets::parse_target_group;

const RING: u32 = 65_537;
const SIZES: [usize; 3] = [10, 100, 1000];
const LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench control: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Median, p90 and max of `samples`.
fn stats(mut samples: Vec<Duration>) -> (Duration, Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9), at(1.0))
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn backend(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + i as u32)
}

fn run() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(unsafe { libc::geteuid() } == 0, "needs root (BPF maps)");
    println!("lb control-plane benchmark");
    println!("command:  cargo xtask bench control = cargo bench -p lb-userspace --bench control");
    println!("kernel:   {}", uname());
    println!(
        "cpus:     {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    maglev_build()?;
    change_latency()?;
    flow_memory()?;
    Ok(())
}

fn uname() -> String {
    std::process::Command::new("uname")
        .arg("-sr")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn load(max_backends: u32, max_flows: u32) -> anyhow::Result<(Balancer, Maps)> {
    let sizes = Sizes {
        max_flows,
        ring_size: RING,
        max_vips: 4,
        max_backends,
    };
    Balancer::load(sizes, LbAddrs::one(LB_ADDR.into()), None).context("loading lb_xdp (root, BPF)")
}

fn maglev_build() -> anyhow::Result<()> {
    println!("1. Maglev table build, M = {RING} (median of 21 builds), beside one full ring write");
    let (_b, mut maps) = load(2048, 1024)?;
    // Baseline: every slot of one ring written to LB_RINGS (what a writer without deltas does
    // on every change).
    let full: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            for s in 0..RING {
                maps.set_ring_slot(s, 0).expect("ring write");
            }
            t.elapsed()
        })
        .collect();
    let (full_med, _, _) = stats(full);
    println!("   {:>9}  {:>10}  {:>10}", "backends", "build ms", "p90 ms");
    for n in SIZES {
        let members: Vec<maglev::Member> = (0..n)
            .map(|i| maglev::Member {
                addr: backend(i).into(),
                port: 80,
                weight: 1,
            })
            .collect();
        let samples: Vec<Duration> = (0..21)
            .map(|_| {
                let t = Instant::now();
                let table = maglev::build(&members, RING);
                let d = t.elapsed();
                std::hint::black_box(table);
                d
            })
            .collect();
        let (med, p90, _) = stats(samples);
        println!("   {n:>9}  {:>10}  {:>10}", ms(med), ms(p90));
    }
    println!(
        "   baseline: writing all {RING} slots of one ring to the map: {} ms",
        ms(full_med)
    );
    println!();
    Ok(())
}

/// A running control plane over real maps and a running L7 tier, with `n` targets.
struct Bed {
    control: Control,
    l4: Arc<L4Sync>,
    l7: Arc<L7Sync>,
    _running: server::RunningL7,
    _balancer: Balancer,
}

const VIP: VipAddr = VipAddr {
    addr: std::net::IpAddr::V4(Ipv4Addr::new(10, 100, 0, 1)),
    port: 80,
    proto: Proto::Tcp,
};

async fn bed(n: usize) -> anyhow::Result<Bed> {
    let (balancer, maps) = load(4096, 1024)?;
    let mut writer = RingWriter::new(maps, RING, 4, 4096);
    let spec = VipSpec::new(Some("web".into()), VIP);
    writer.add_vip(spec.clone())?;
    let mut reg = Registry::new();
    reg.create_group(parse_target_group(
        "web,health-check=off,deregistration-delay=0",
    )?)?;
    reg.add_vip(spec.clone(), "web")?;
    let targets: Vec<(SocketAddr, u32)> = (0..n)
        .map(|i| (SocketAddr::new(backend(i).into(), 80), 1))
        .collect();
    reg.register("web", &targets)?;
    let listener = ListenerConfig::new(
        "l",
        ListenerProtocol::Http,
        "127.0.0.1:0".parse().expect("address"),
    );
    let book = RuleBook::from_specs("l", "http", 0, &["l,default,forward=web"])
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    reg.set_rule_users(&book.group_users());
    let plane = ControlPlane::new(reg);
    let vips = vec![(spec, "web".to_owned())];
    let l4 = Arc::new(L4Sync::new(
        writer,
        vips.clone(),
        Arc::new(Mutex::new(Neighbours::default())),
    ));
    l4.apply(&plane.current());
    let running = server::start(L7Config {
        listeners: vec![(listener.clone(), (*book.compiled()).clone())],
        groups: L7Sync::groups_for(&plane.current(), &Default::default()),
        client: ClientConfig::default(),
        access_log: None,
        workers: Default::default(),
    })
    .await?;
    let l7 = Arc::new(L7Sync::new(running.handle()));
    l7.apply(&plane.current());
    let control = Control::new(
        plane,
        Some((l7.clone(), running.handle())),
        Some(l4.clone()),
        vec![(listener, book)],
        vips,
        4096,
    );
    Ok(Bed {
        control,
        l4,
        l7,
        _running: running,
        _balancer: balancer,
    })
}

fn change(target: Ipv4Addr, register: bool) -> Request {
    let targets = vec![TargetRef {
        id: target.to_string(),
        port: Some(80),
        weight: None,
    }];
    if register {
        Request::RegisterTargets {
            target_group_name: "web".into(),
            targets,
        }
    } else {
        Request::DeregisterTargets {
            target_group_name: "web".into(),
            targets,
        }
    }
}

fn change_latency() -> anyhow::Result<()> {
    println!(
        "2. A target change through the admin API until both planes carry it (51 changes each)"
    );
    println!(
        "   {:>7}  {:>13}  {:>9}  {:>9}  {:>17}  {:>16}",
        "targets", "change", "median ms", "max ms", "maps alone med ms", "slots rewritten"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    for n in SIZES {
        let bed = rt.block_on(bed(n))?;
        let newcomer = backend(n);
        let mut reg_times = Vec::new();
        let mut dereg_times = Vec::new();
        for i in 0..51 {
            let register = i % 2 == 0;
            let t = Instant::now();
            bed.control
                .handle(change(newcomer, register))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let d = t.elapsed();
            if register {
                reg_times.push(d);
            } else {
                dereg_times.push(d);
            }
            if i < 2 {
                verify(&bed, newcomer, register)?;
            }
        }
        // The floor: the same change written straight to the maps.
        let (floor, slots) = maps_alone(&bed, n, newcomer)?;
        for (label, samples) in [("register", reg_times), ("deregister", dereg_times)] {
            let (med, _, max) = stats(samples);
            println!(
                "   {n:>7}  {label:>13}  {:>9}  {:>9}  {:>17}  {:>16}",
                ms(med),
                ms(max),
                ms(floor),
                slots
            );
        }
        drop(bed);
    }
    println!(
        "   (\"maps alone\": the same register/deregister pair applied by RingWriter::apply directly)"
    );
    println!();
    Ok(())
}

/// Checks that the change is in both planes when the handler returned.
fn verify(bed: &Bed, addr: Ipv4Addr, registered: bool) -> anyhow::Result<()> {
    let id = bed.l4.backend_id(&VIP, addr.into(), 80);
    ensure!(
        id.is_some() == registered,
        "ring writer: {addr} registered={registered}, id {id:?}"
    );
    let in_l7 = bed.l7_groups().get("web").is_some_and(|g| {
        g.describe()
            .iter()
            .any(|t| t.addr.ip() == std::net::IpAddr::V4(addr))
    });
    ensure!(
        in_l7 == registered,
        "L7 picker: {addr} registered={registered}"
    );
    Ok(())
}

impl Bed {
    fn l7_groups(&self) -> Arc<lb::proxy::server::Groups> {
        self.l7.groups()
    }
}

/// The register/deregister pair applied to the maps directly: (median of the pair's halves,
/// slots rewritten by a register).
fn maps_alone(bed: &Bed, n: usize, newcomer: Ipv4Addr) -> anyhow::Result<(Duration, usize)> {
    let base: Vec<L4Member> = (0..n)
        .map(|i| L4Member::in_service(backend(i).into(), 80, 1))
        .collect();
    let mut with = base.clone();
    with.push(L4Member::in_service(newcomer.into(), 80, 1));
    let mut samples = Vec::new();
    let mut slots = 0;
    // Starts without the newcomer (the API loop may have left it registered).
    bed.l4.with_writer_mut(|w| w.apply(&VIP, &base, false))?;
    for i in 0..20 {
        let members = if i % 2 == 0 { &with } else { &base };
        let t = Instant::now();
        let applied = bed.l4.with_writer_mut(|w| w.apply(&VIP, members, false))?;
        samples.push(t.elapsed());
        if i == 0 {
            slots = applied.slots;
        }
    }
    Ok((stats(samples).0, slots))
}

fn flow_memory() -> anyhow::Result<()> {
    println!("3. Flow-table memory (kernel accounting, memlock of LB_FLOWS)");
    let mut rows = BTreeMap::new();
    for entries in [65_536u32, 1_048_576] {
        let (b, _maps) = load(64, entries)?;
        let memlock = lru_memlock(entries)?;
        rows.insert(entries, memlock);
        drop(b);
    }
    for (entries, memlock) in &rows {
        println!(
            "   {entries:>9} entries: {:>10} bytes = {:.1} bytes per entry (key {} + value {})",
            memlock,
            *memlock as f64 / f64::from(*entries),
            size_of::<lb_common::FlowKey>(),
            size_of::<lb_common::FlowValue>()
        );
    }
    Ok(())
}

/// `memlock` of this process's LRU hash map with `entries` entries.
fn lru_memlock(entries: u32) -> anyhow::Result<u64> {
    for fd in std::fs::read_dir("/proc/self/fdinfo")? {
        let text = std::fs::read_to_string(fd?.path()).unwrap_or_default();
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_owned())
        };
        // BPF_MAP_TYPE_LRU_HASH = 9
        if field("map_type:").as_deref() == Some("9")
            && field("max_entries:").as_deref() == Some(&entries.to_string())
            && let Some(m) = field("memlock:").and_then(|m| m.parse().ok())
        {
            return Ok(m);
        }
    }
    anyhow::bail!("no LRU map with {entries} entries among this process's descriptors")
}
