//! `lb-demo`: a load balancer on one machine, in network namespaces, for people who want to see
//! `lb` work before pointing it at real interfaces. `cargo xtask run` runs it.
//!
//! It builds a client, a balancer and three backends, starts small HTTP servers on the
//! backends, `lb decap` on the backends and `lb run` on the balancer, sends a dozen HTTP
//! requests to the virtual IP, shows who answered and what the balancer counted, and removes
//! everything on exit, also on Ctrl-C.
//!
//! Usage: `lb-demo [PATH-TO-LB] [--keep] [--verbose]` (the path defaults to `$LB_BIN`, then
//! the cargo target directory). `--keep` leaves the demo running until Ctrl-C so you can try
//! commands; `--verbose` prints every `ip`/`sysctl`/`ethtool` command of the setup.
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_tests::{Topology, VipSpec, client, netns, tally};

/// The virtual IP the demo balances.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
/// Its port.
const PORT: u16 = 80;
/// How many requests the client sends.
const REQUESTS: u16 = 12;
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
    let mut topo = Topology::builder()
        .backends(3)
        .lbs(1)
        .vip(VipSpec::tcp("web", VIP, PORT))
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
    println!("On the balancer, `lb run` attached the XDP program to eth0 and wrote the maps:");
    println!("  {}", topo.lb(0).command_line());
    println!();

    topo.serve_http(PORT).context("starting the web servers")?;
    println!("Each backend runs a small web server on port {PORT} that answers with its name.");
    println!();
    check_stop()?;

    println!(
        "Sending {REQUESTS} HTTP requests from the client to http://{VIP}:{PORT}/, each on a new"
    );
    println!("connection from a different source port:");
    let vip = SocketAddrV4::new(VIP, PORT);
    let mut answers = Vec::new();
    for i in 0..REQUESTS {
        check_stop()?;
        let src_port = 50_000 + i;
        let (status, body) = topo
            .in_client(move || client::http_get(src_port, vip))?
            .with_context(|| format!("request {} from port {src_port}", i + 1))?;
        let who = body.trim().to_owned();
        println!(
            "  request {:>2}  {}:{src_port} -> {vip}   HTTP {status}, answered by {who}",
            i + 1,
            client.addr
        );
        answers.push(who);
    }
    println!();
    println!("Connections per backend:");
    for (who, n) in tally(answers) {
        println!("  {who:<10} {n}");
    }
    println!();

    let pin = topo.lb(0).pin_path.to_string_lossy().into_owned();
    println!(
        "What the balancer counted (`{} stats --pin-path {pin}`):",
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
