//! `lb-demo`: a load balancer on one machine, in network namespaces, for people who want to see
//! `lb` work before pointing it at real interfaces. `cargo xtask run` runs it.
//!
//! It builds a client, a balancer and three backends, starts small HTTP servers on the
//! backends, `lb decap` on the backends and `lb run` on the balancer with an L4 VIP and an L7
//! listener in front of the same backends, both health-checked. A steady stream of requests
//! runs while one backend's server is stopped and started again: the demo prints the backend
//! turning `unhealthy` with its reason, traffic moving to the others, and its return to
//! `healthy`, with the request outcomes counted throughout. Everything is removed on exit,
//! also on Ctrl-C.
//!
//! Usage: `lb-demo [PATH-TO-LB] [--keep] [--verbose]` (the path defaults to `$LB_BIN`, then
//! the cargo target directory). `--keep` leaves the demo running until Ctrl-C so you can try
//! commands; `--verbose` prints every `ip`/`sysctl`/`ethtool` command of the setup.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_tests::servers::Server;
use lb_tests::topology::{FIRST_BACKEND_ADDR, FIRST_LB_ADDR};
use lb_tests::{Topology, VipSpec, client, netns};

/// The virtual IP the demo balances.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
/// Its port.
const PORT: u16 = 80;
/// The layer-7 listener's address (the balancer's own) and port.
const L7: Ipv4Addr = FIRST_LB_ADDR;
/// Its port.
const L7_PORT: u16 = 8080;
/// Health checks fast enough for a demo (AWS's defaults are 30 s and 5 passes).
const CHECKS: &str = "health-check-interval=1,health-check-timeout=0.5,healthy-threshold=2,\
                      unhealthy-threshold=2,deregistration-delay=5";
/// One request to each tier this often.
const PACE: Duration = Duration::from_millis(100);
/// With `--keep`, how long the demo waits for Ctrl-C at most (everything stops by itself).
const KEEP_AT_MOST: Duration = Duration::from_secs(3600);

/// Set by SIGINT/SIGTERM; the main flow checks it between steps.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

/// Installs [`on_signal`] for SIGINT and SIGTERM, so Ctrl-C unwinds through the normal exit
/// path and the topology's destructor removes everything.
fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler
        // only stores to an atomic.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&raw mut sa.sa_mask);
            libc::sigaction(sig, &raw const sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing a signal handler");
        }
    }
    Ok(())
}

/// Fails with "interrupted" once Ctrl-C was pressed.
fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted; removing the demo network");
    }
    Ok(())
}

fn main() {
    if let Err(e) = demo() {
        eprintln!("lb-demo: {e:#}");
        std::process::exit(1);
    }
    println!("Done: every namespace, process and pinned map of the demo was removed.");
}

fn demo() -> Result<()> {
    install_signal_handlers()?;
    let mut lb_bin = None;
    let mut keep = false;
    let mut verbose = false;
    for arg in std::env::args_os().skip(1) {
        if arg == "--keep" {
            keep = true;
        } else if arg == "--verbose" {
            verbose = true;
        } else if arg == "--help" || arg == "-h" {
            println!("usage: lb-demo [PATH-TO-LB] [--keep] [--verbose]");
            return Ok(());
        } else {
            lb_bin = Some(PathBuf::from(arg));
        }
    }
    netns::require_root()?;
    let lb_bin = match lb_bin {
        Some(p) => p,
        None => lb_tests::process::lb_bin()?,
    };

    println!("lb demo: a client, one load balancer and three web servers, on one machine.");
    println!();
    println!("Building the network (each machine is a Linux network namespace, all joined by a");
    println!("bridge, as if plugged into one switch). The virtual IP {VIP}:{PORT} is routed by");
    println!("the client through the balancer; each backend also holds {VIP} on its loopback so");
    println!("it can answer the client directly (direct server return).");
    if verbose {
        netns::set_echo(true);
    } else {
        println!("(Run with --verbose to see every ip/sysctl/ethtool command.)");
    }
    println!();
    let mut l7_flags = vec![
        "--listener".to_owned(),
        format!("site=http://{L7}:{L7_PORT}"),
        "--target-group".to_owned(),
        format!("site,{CHECKS}"),
        "--rule".to_owned(),
        "site,default,forward=site".to_owned(),
    ];
    for j in 0..3 {
        l7_flags.push("--target".to_owned());
        l7_flags.push(format!("site={}:{PORT}", backend_addr(j)));
    }
    let mut topo = Topology::builder()
        .backends(3)
        .lbs(1)
        .vip(VipSpec::tcp("web", VIP, PORT).group_options(CHECKS))
        .lb_args(l7_flags)
        .lb_bin(lb_bin.clone())
        .build()
        .context("building the demo network")?;
    netns::set_echo(false);
    check_stop()?;

    let client = topo.client().clone();
    let lb = topo.lb(0).node.clone();
    println!();
    println!(
        "  {:<10} {:<15} namespace {}",
        "client", client.addr, client.ns
    );
    println!("  {:<10} {:<15} namespace {}", lb.name, lb.addr, lb.ns);
    for be in topo.backends() {
        println!("  {:<10} {:<15} namespace {}", be.name, be.addr, be.ns);
    }
    println!();
    println!("On each backend, `lb decap` removes the outer IP header the balancer adds:");
    for (j, be) in topo.backends().iter().enumerate() {
        println!(
            "  [{}] {}",
            be.name,
            topo.decap_command_line(j).unwrap_or("(not running)")
        );
    }
    println!();
    println!("On the balancer, `lb run` attached the XDP program to eth0 for the VIP, and");
    println!(
        "listens on {L7}:{L7_PORT} for the layer-7 listener; both use the same three backends:"
    );
    println!("  {}", topo.lb(0).command_line());
    println!();

    let mut servers = start_servers(&topo)?;
    println!("Each backend runs a small web server on port {PORT} that answers with its name.");
    println!();
    check_stop()?;

    println!("Health checks: the balancer checks every backend once a second, through the same");
    println!("path client traffic takes (for the VIP: encapsulated, to the VIP on the backend).");
    println!("A backend takes traffic once a check passes; two failures take it out.");
    wait_all_healthy(&topo, &lb_bin)?;
    print_health(&topo, &lb_bin)?;
    println!();

    println!("Now a steady stream of requests: one to the VIP http://{VIP}:{PORT}/ (layer 4,");
    println!("in the kernel) and one to the listener http://{L7}:{L7_PORT}/ (layer 7) every");
    println!(
        "{} ms, each on a new connection. Every second: who answered, and what failed.",
        PACE.as_millis()
    );
    println!();
    let stream = Stream::start(&topo)?;
    let mut clock = Clock::new();
    clock.run(&topo, &lb_bin, &stream, Duration::from_secs(3))?;

    let victim = 1;
    let victim_name = topo.backend(victim).name.clone();
    println!();
    println!(">>> Stopping the web server on {victim_name} (its machine stays up).");
    println!();
    servers[victim] = None;
    clock.run_until(&topo, &lb_bin, &stream, Duration::from_secs(15), |h| {
        h.iter()
            .filter(|t| t.target == topo.backend(victim).addr.to_string())
            .all(|t| t.state == "unhealthy")
    })?;
    println!();
    print_health(&topo, &lb_bin)?;
    println!();
    println!("{victim_name} is out of both tiers: new requests go to the others only.");
    clock.run(&topo, &lb_bin, &stream, Duration::from_secs(3))?;

    println!();
    println!(">>> Starting the web server on {victim_name} again.");
    println!();
    let be = topo.backend(victim).clone();
    servers[victim] = Some(
        Server::http(
            &be.ns,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)),
            &be.name,
        )
        .context("restarting the web server")?,
    );
    clock.run_until(&topo, &lb_bin, &stream, Duration::from_secs(15), |h| {
        h.iter().all(|t| t.state == "healthy")
    })?;
    clock.run(&topo, &lb_bin, &stream, Duration::from_secs(2))?;
    let totals = stream.stop();
    println!();
    print_health(&topo, &lb_bin)?;
    println!();
    println!("Request outcomes over the whole run:");
    for (tier, t) in [
        ("layer 4 (VIP)", &totals.l4),
        ("layer 7 (listener)", &totals.l7),
    ] {
        let answered: Vec<String> = t
            .by_backend
            .iter()
            .map(|(b, n)| format!("{b} {n}"))
            .collect();
        println!(
            "  {tier:<20} {} requests: {}; failed {}",
            t.total(),
            answered.join(", "),
            t.failed
        );
    }
    println!();
    println!("The failures happened between the server stopping and the checks noticing it");
    println!("(about two check intervals); none after, and none while it came back.");
    println!();

    let pin = topo.lb(0).pin_path.to_string_lossy().into_owned();
    println!(
        "What the balancer counted in the kernel (`{} stats --pin-path {pin}`):",
        lb_bin.display()
    );
    let table = topo
        .lb_cli(["stats", "--pin-path", &pin])
        .context("running lb stats")?;
    for line in table.lines() {
        if line.trim().is_empty() {
            println!();
        } else {
            println!("  {line}");
        }
    }
    println!();
    drop(servers);

    if keep {
        println!("The demo keeps running; try, for example:");
        println!("  {} dump flows --pin-path {pin}", lb_bin.display());
        println!(
            "  nsenter --net={} -- curl -s http://{VIP}:{PORT}/",
            netns::netns_path(&client.ns).display()
        );
        println!("Press Ctrl-C to remove everything.");
        let started = Instant::now();
        while !STOP.load(Ordering::SeqCst) && started.elapsed() < KEEP_AT_MOST {
            std::thread::sleep(Duration::from_millis(100));
            topo.processes_alive()?;
        }
    }
    println!("Removing the demo network (stopping lb, deleting the namespaces)...");
    drop(topo);
    Ok(())
}

/// Backend `j`'s address.
fn backend_addr(j: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(FIRST_BACKEND_ADDR) + j as u32)
}

/// A web server on port 80 of every backend; dropping one stops it.
fn start_servers(topo: &Topology) -> Result<Vec<Option<Server>>> {
    topo.backends()
        .iter()
        .map(|be| {
            Server::http(
                &be.ns,
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)),
                &be.name,
            )
            .map(Some)
            .with_context(|| format!("starting the web server on {}", be.name))
        })
        .collect()
}

/// One target's row of `lb targets health`.
#[derive(Debug, Clone)]
struct Row {
    group: String,
    target: String,
    state: String,
    reason: String,
    description: String,
}

fn health(topo: &Topology, lb_bin: &Path) -> Result<Vec<Row>> {
    let socket = topo.lb(0).admin_socket.to_string_lossy().into_owned();
    let out = topo
        .lb_cli(["targets", "health", "--json", "--admin-socket", &socket])
        .with_context(|| format!("{} targets health", lb_bin.display()))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing the health JSON")?;
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_owned();
    Ok(v["TargetHealthDescriptions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| Row {
            group: s(&d["TargetGroupName"]),
            target: s(&d["Target"]["Id"]),
            state: s(&d["TargetHealth"]["State"]),
            reason: s(&d["TargetHealth"]["Reason"]),
            description: s(&d["TargetHealth"]["Description"]),
        })
        .collect())
}

fn print_health(topo: &Topology, lb_bin: &Path) -> Result<()> {
    println!("Target health (`{} targets health`):", lb_bin.display());
    println!(
        "  {:<6} {:<12} {:<10} {:<27} DESCRIPTION",
        "GROUP", "TARGET", "STATE", "REASON"
    );
    for r in health(topo, lb_bin)? {
        println!(
            "  {:<6} {:<12} {:<10} {:<27} {}",
            r.group,
            r.target,
            r.state,
            if r.reason.is_empty() { "-" } else { &r.reason },
            r.description
        );
    }
    Ok(())
}

fn wait_all_healthy(topo: &Topology, lb_bin: &Path) -> Result<()> {
    let started = Instant::now();
    loop {
        check_stop()?;
        let rows = health(topo, lb_bin)?;
        if !rows.is_empty() && rows.iter().all(|r| r.state == "healthy") {
            println!(
                "All six targets (3 backends x 2 groups) healthy after {:.1} s.",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            print_health(topo, lb_bin)?;
            bail!("the targets did not become healthy within 30 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What one tier's requests got.
#[derive(Debug, Clone, Default)]
struct Tally {
    by_backend: BTreeMap<String, u64>,
    failed: u64,
}

impl Tally {
    fn total(&self) -> u64 {
        self.by_backend.values().sum::<u64>() + self.failed
    }

    fn since(&self, earlier: &Tally) -> Tally {
        Tally {
            by_backend: self
                .by_backend
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v - earlier.by_backend.get(k).copied().unwrap_or(0),
                    )
                })
                .collect(),
            failed: self.failed - earlier.failed,
        }
    }

    fn line(&self) -> String {
        let mut parts: Vec<String> = self
            .by_backend
            .iter()
            .map(|(b, n)| format!("{b} {n:>2}"))
            .collect();
        parts.push(format!("failed {:>2}", self.failed));
        parts.join("  ")
    }
}

#[derive(Debug, Clone, Default)]
struct Totals {
    l4: Tally,
    l7: Tally,
}

/// The client's request loop, in its namespace.
struct Stream {
    totals: Arc<Mutex<Totals>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Stream {
    fn start(topo: &Topology) -> Result<Self> {
        let totals = Arc::new(Mutex::new(Totals::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let names: Vec<String> = topo.backends().iter().map(|b| b.name.clone()).collect();
        let thread = {
            let (totals, stop) = (totals.clone(), stop.clone());
            netns::spawn_in_netns(&topo.client().ns, "demo client", move || {
                let vip = SocketAddrV4::new(VIP, PORT);
                let listener = SocketAddrV4::new(L7, L7_PORT);
                let mut port = 40_000u16;
                while !stop.load(Ordering::SeqCst) {
                    for (dst, l4) in [(vip, true), (listener, false)] {
                        port = if port >= 60_000 { 40_000 } else { port + 1 };
                        let got = client::http_get(port, dst);
                        let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
                        let tally = if l4 { &mut t.l4 } else { &mut t.l7 };
                        match got {
                            Ok((200, body)) if names.contains(&body.trim().to_owned()) => {
                                *tally.by_backend.entry(body.trim().to_owned()).or_default() += 1;
                            }
                            _ => tally.failed += 1,
                        }
                    }
                    std::thread::sleep(PACE);
                }
                Ok(())
            })?
        };
        Ok(Self {
            totals,
            stop,
            thread: Some(thread),
        })
    }

    fn snapshot(&self) -> Totals {
        self.totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn stop(mut self) -> Totals {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.snapshot()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Prints one line per second: the requests of that second per tier, and any state change.
struct Clock {
    started: Instant,
    last: Totals,
    states: BTreeMap<(String, String), String>,
}

impl Clock {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            last: Totals::default(),
            states: BTreeMap::new(),
        }
    }

    fn tick(&mut self, topo: &Topology, lb_bin: &Path, stream: &Stream) -> Result<Vec<Row>> {
        std::thread::sleep(Duration::from_secs(1));
        check_stop()?;
        let now = stream.snapshot();
        println!(
            "  t={:>3}s  L4 {}   |   L7 {}",
            self.started.elapsed().as_secs(),
            now.l4.since(&self.last.l4).line(),
            now.l7.since(&self.last.l7).line()
        );
        self.last = now;
        let rows = health(topo, lb_bin)?;
        for r in &rows {
            let key = (r.group.clone(), r.target.clone());
            let before = self.states.insert(key, r.state.clone());
            if before.as_deref().is_some_and(|b| b != r.state) {
                let name = topo
                    .backends()
                    .iter()
                    .find(|b| b.addr.to_string() == r.target)
                    .map_or(r.target.as_str(), |b| b.name.as_str());
                let why = if r.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({}: {})", r.reason, r.description)
                };
                println!(
                    "          target group {}: {name} {} -> {}{why}",
                    r.group,
                    before.unwrap_or_default(),
                    r.state
                );
            }
        }
        Ok(rows)
    }

    fn run(&mut self, topo: &Topology, lb_bin: &Path, stream: &Stream, d: Duration) -> Result<()> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.tick(topo, lb_bin, stream)?;
        }
        Ok(())
    }

    fn run_until(
        &mut self,
        topo: &Topology,
        lb_bin: &Path,
        stream: &Stream,
        at_most: Duration,
        done: impl Fn(&[Row]) -> bool,
    ) -> Result<()> {
        let until = Instant::now() + at_most;
        loop {
            let rows = self.tick(topo, lb_bin, stream)?;
            if done(&rows) {
                return Ok(());
            }
            if Instant::now() > until {
                bail!("the change did not show within {at_most:?}");
            }
        }
    }
}
