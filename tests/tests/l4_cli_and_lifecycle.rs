//! What the README promises about running `lb` that no other test checks: the `lb stats`
//! table, `lb dump`, `--max-flows` eviction, `--xdp-mode auto` falling back to skb mode,
//! shutdown on SIGINT (programs detached, pins, socket and neighbour entries removed) and the
//! demo removing everything on Ctrl-C. Needs root and the `lb` binary.
use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lb_tests::client::{self, LineClient};
use lb_tests::netns::{self, run_in};
use lb_tests::{Topology, VipSpec, stats};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 7);
const PORT: u16 = 80;

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, PORT)
}

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn lb_stats_prints_the_table_and_lb_dump_prints_every_map() {
    let mut topo = Topology::builder()
        .backends(2)
        .vip(VipSpec::tcp("web", VIP, PORT))
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    let ports: Vec<u16> = (43_000..43_010).collect();
    let answers: Vec<String> = topo
        .in_client(|| {
            ports
                .iter()
                .map(|&p| client::ask_tcp(p, vip()).expect("connection"))
                .collect()
        })
        .expect("client namespace");
    let pin = topo.lb(0).pin_path.to_string_lossy().into_owned();

    // The table: one VIP line with its new flows, one line per backend, the outcome section.
    let table = topo
        .lb_cli(["stats", "--pin-path", &pin])
        .expect("lb stats");
    let doc = topo.stats_json(0).expect("lb stats --json");
    assert!(table.starts_with("VIP / BACKEND"), "{table}");
    let vip_line = table
        .lines()
        .find(|l| l.starts_with(&format!("{VIP}:{PORT}")))
        .unwrap_or_else(|| panic!("no line for the VIP:\n{table}"));
    let columns: Vec<&str> = vip_line.split_whitespace().collect();
    assert_eq!(
        columns.last().copied(),
        Some("10"),
        "ten new flows: {vip_line}"
    );
    for be in topo.backends() {
        let line = table
            .lines()
            .find(|l| l.trim_start().starts_with(&be.addr.to_string()))
            .unwrap_or_else(|| panic!("no line for {}:\n{table}", be.addr));
        let new_flows: u64 = line
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .expect("a number");
        let served = answers.iter().filter(|a| **a == be.name).count() as u64;
        assert_eq!(new_flows, served, "{line}\n{table}");
    }
    assert!(table.contains("PACKET OUTCOME"), "{table}");
    let forwarded = stats::sum(&doc, "tx", "reasons") + stats::sum(&doc, "redirect", "reasons");
    assert!(forwarded > 0, "{doc:#}");

    // lb dump: the VIP, both backends, one flow per connection, the ring.
    let dump = |what: &[&str]| {
        let mut args = vec!["dump"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["--pin-path", &pin]);
        topo.lb_cli(args).expect("lb dump")
    };
    let vips = dump(&["vips"]);
    assert_eq!(vips.lines().count(), 1, "{vips}");
    assert!(vips.contains(&format!("\"{VIP}:{PORT}/tcp\"")), "{vips}");
    let backends = dump(&["backends"]);
    for be in topo.backends() {
        assert!(backends.contains(&be.addr.to_string()), "{backends}");
    }
    let flows = dump(&["flows"]);
    for p in &ports {
        assert!(
            flows.contains(&format!("\"{}:{p}\"", topo.client().addr)),
            "the flow from port {p}:\n{flows}"
        );
    }
    let ring = dump(&["ring", &format!("{VIP}:{PORT}/tcp")]);
    let slots: u64 = ring
        .lines()
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("slots=")))
        .map(|n| n.parse::<u64>().expect("slot count"))
        .sum();
    assert_eq!(slots, u64::from(lb_common::DEFAULT_RING_SIZE), "{ring}");
    assert!(
        ring.contains("slots=0") || ring.contains("(empty)"),
        "{ring}"
    );
    let every_slot = dump(&["ring", &format!("{VIP}:{PORT}/tcp"), "--slots"]);
    assert_eq!(
        every_slot.lines().count() as u64,
        u64::from(lb_common::DEFAULT_RING_SIZE)
    );
    let json = topo
        .lb_cli(["dump", "flows", "--pin-path", &pin, "--json"])
        .expect("lb dump flows --json");
    let rows: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(rows.as_array().map(Vec::len), Some(ports.len()), "{json}");

    // The next-hop cache: a resolved next hop for every backend that served a connection,
    // and its counters in the table and the JSON.
    assert!(table.contains("NEXT-HOP CACHE"), "{table}");
    assert!(
        doc["nexthop_cache"]["nexthop_lookups"].as_u64() > Some(0),
        "{doc:#}"
    );
    let json = topo
        .lb_cli(["dump", "nexthops", "--pin-path", &pin, "--json"])
        .expect("lb dump nexthops --json");
    let rows: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    for be in topo.backends() {
        if !answers.contains(&be.name) {
            continue;
        }
        let addr = be.addr.to_string();
        let row = rows
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["backend"] == addr.as_str())
            .unwrap_or_else(|| panic!("no next hop cached for {addr}: {json}"));
        assert_ne!(row["dmac"], "00:00:00:00:00:00", "{json}");
        assert!(
            row["iface"].as_str().is_some_and(|i| !i.is_empty()),
            "{json}"
        );
    }
}

#[test]
fn a_small_flow_table_evicts_old_flows_and_keeps_serving() {
    const MAX_FLOWS: usize = 256;
    let mut topo = Topology::builder()
        .backends(2)
        .vip(VipSpec::tcp("web", VIP, PORT))
        .lb_args([
            "--max-flows",
            &MAX_FLOWS.to_string(),
            "--flow-sweep-interval",
            "0.2",
        ])
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    let pin = topo.lb(0).pin_path.to_string_lossy().into_owned();
    // Positive control: a sweep before any churn finds nothing evicted.
    let quiet = wait_for_sweep(&topo);
    assert_eq!(quiet["evicted_live"].as_u64(), Some(0), "{quiet:#}");
    let (mut kept, first) = topo
        .in_client(|| {
            let mut c = LineClient::connect(44_000, vip()).expect("long-lived connection");
            let who = c.ask().expect("first answer");
            (c, who)
        })
        .expect("client namespace");
    // Three times the table's size of new flows, the long-lived one used all along. The LRU
    // lists are per CPU (README, "Flow idle timeouts and the flow table"): which flow is least
    // recently used is decided within the share of the CPU that inserted it. A veth delivers
    // to the balancer's XDP on the sending CPU, so the client sends from one CPU and every
    // flow lands in that CPU's share (a smaller one than MAX_FLOWS: more evictions, which the
    // assertions below allow).
    let churn = 3 * MAX_FLOWS;
    let failures: Vec<String> = topo
        .in_client(|| {
            pin_to_current_cpu();
            let mut failures = Vec::new();
            for i in 0..churn {
                let port = 44_001 + u16::try_from(i).expect("small");
                if let Err(e) = client::ask_tcp(port, vip()) {
                    failures.push(format!("port {port}: {e:#}"));
                }
                if i % 32 == 0 {
                    match kept.ask() {
                        Ok(who) if who == first => {}
                        other => failures.push(format!("long-lived connection: {other:?}")),
                    }
                }
            }
            failures
        })
        .expect("client namespace");
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(kept.ask().expect("still served"), first);

    let flows = topo
        .lb_cli(["dump", "flows", "--pin-path", &pin, "--json"])
        .expect("lb dump flows");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&flows).expect("JSON");
    assert!(
        rows.len() <= MAX_FLOWS,
        "the flow table holds at most {MAX_FLOWS}: {}",
        rows.len()
    );
    let client_port = |row: &serde_json::Value| {
        row["client"]
            .as_str()
            .and_then(|c| c.rsplit(':').next())
            .and_then(|p| p.parse::<u16>().ok())
    };
    assert!(
        rows.iter().any(|r| client_port(r) == Some(44_000)),
        "the recently used long-lived flow was kept"
    );
    assert!(
        !rows.iter().any(|r| client_port(r) == Some(44_001)),
        "the oldest short flow was evicted"
    );
    let doc = topo.stats_json(0).expect("lb stats --json");
    assert_eq!(
        stats::sum(&doc, "new_flows", "backend") as usize,
        churn + 1,
        "every connection was a new flow: {doc:#}"
    );
    assert_eq!(stats::nonzero_drops(&doc), vec![], "{doc:#}");
    // The evictions are visible: every flow inserted and no longer in the table was evicted
    // while live (350 s idle timeout), and the table shows its size.
    let table = wait_for_sweep(&topo);
    let n = |k: &str| {
        table[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {table:#}"))
    };
    assert_eq!(n("capacity"), MAX_FLOWS as u64, "{table:#}");
    assert_eq!(n("inserted"), (churn + 1) as u64, "{table:#}");
    assert!(n("entries") <= MAX_FLOWS as u64, "{table:#}");
    assert_eq!(n("expired"), 0, "{table:#}");
    assert_eq!(
        n("evicted_live"),
        n("inserted") - n("entries"),
        "lost live flows are counted: {table:#}"
    );
    assert!(
        n("evicted_live") >= (churn + 1 - MAX_FLOWS) as u64,
        "{table:#}"
    );
}

/// Pins the calling thread to the CPU it runs on.
fn pin_to_current_cpu() {
    // SAFETY: no preconditions; a zeroed cpu_set_t is empty and CPU_SET stays within it.
    let ok = unsafe {
        let cpu = libc::sched_getcpu();
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        cpu >= 0 && {
            libc::CPU_SET(cpu as usize, &mut set);
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0
        }
    };
    assert!(
        ok,
        "pinning the client: {}",
        std::io::Error::last_os_error()
    );
}

/// The `flow_table` of `lb stats --json` once a sweep has run after this call.
fn wait_for_sweep(topo: &Topology) -> serde_json::Value {
    let asked = Instant::now();
    lb_tests::wait::wait_until(Duration::from_secs(10), "a flow-table sweep", || {
        let doc = topo.stats_json(0)?;
        let table = doc["flow_table"].clone();
        Ok(match table["swept_s_ago"].as_f64() {
            Some(ago) if ago < asked.elapsed().as_secs_f64() => std::ops::ControlFlow::Break(table),
            _ => std::ops::ControlFlow::Continue(table.to_string()),
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// A namespace of its own (named as the harness names things, so leftovers of a crashed run
/// are recognised) with a bridge as the only device: bridges have no native XDP.
struct BridgeNs {
    ns: String,
    pin: PathBuf,
    dir: PathBuf,
}

impl BridgeNs {
    fn new() -> Self {
        netns::require_root().expect("root");
        netns::ensure_bpffs().expect("bpffs");
        let name = format!("{}{}-9-auto", netns::NAME_PREFIX, std::process::id());
        netns::create_netns(&name).expect("namespace");
        let me = Self {
            pin: PathBuf::from(netns::BPFFS).join(&name),
            dir: PathBuf::from(netns::TMP_DIR).join(&name),
            ns: name,
        };
        std::fs::create_dir_all(&me.dir).expect("temp dir");
        for args in [
            &["link", "add", "br0", "type", "bridge"][..],
            &["addr", "add", "10.0.0.2/24", "dev", "br0"],
            &["link", "set", "br0", "up"],
        ] {
            run_in(&me.ns, "ip", args).expect("ip");
        }
        me
    }

    fn lb_run(&self, mode: &str) -> Command {
        let pin = self.pin.to_string_lossy();
        let socket = self.dir.join("admin.sock");
        let socket = socket.to_string_lossy();
        let bin = lb_tests::process::lb_bin().expect("lb binary");
        netns::nsenter(
            &self.ns,
            &bin.to_string_lossy(),
            [
                "run",
                "--iface",
                "br0",
                "--xdp-mode",
                mode,
                "--vip",
                &format!("web={VIP}:{PORT}/tcp"),
                "--target",
                "web=10.0.0.11",
                "--pin-path",
                &pin,
                "--admin-socket",
                &socket,
            ],
        )
    }
}

impl Drop for BridgeNs {
    fn drop(&mut self) {
        let _ = netns::delete_netns(&self.ns);
        let _ = std::fs::remove_dir_all(&self.pin);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn xdp_mode_auto_falls_back_to_skb_where_native_xdp_is_missing() {
    let ns = BridgeNs::new();
    // Native mode is refused, and the error names the interface.
    let out = ns.lb_run("native").output().expect("lb run");
    assert!(!out.status.success(), "native XDP on a bridge: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("br0"), "{err}");

    let log = ns.dir.join("auto.log");
    let mut lb = lb_tests::process::LbProcess::spawn("lb run (auto)", ns.lb_run("auto"), &log)
        .expect("auto mode starts");
    let logged = lb.log_text();
    assert!(
        logged.contains("falling back to skb mode"),
        "the fallback is reported: {logged}"
    );
    let link = run_in(&ns.ns, "ip", ["-d", "link", "show", "dev", "br0"]).expect("ip link");
    assert!(
        text(&link).contains("xdpgeneric"),
        "attached in skb (generic) mode: {}",
        text(&link)
    );
    assert!(lb.stop().is_some_and(|s| s.success()));
    let link = run_in(&ns.ns, "ip", ["-d", "link", "show", "dev", "br0"]).expect("ip link");
    assert!(!text(&link).contains("xdp"), "detached: {}", text(&link));
}

/// The managed neighbour entries `lb run` made, by address.
fn managed_neighbours(ns: &str) -> BTreeMap<String, String> {
    let out = run_in(ns, "ip", ["-4", "neigh", "show", "dev", "eth0"]).expect("ip neigh");
    text(&out)
        .lines()
        .filter(|l| l.contains("managed"))
        .filter_map(|l| {
            l.split_whitespace()
                .next()
                .map(|a| (a.to_owned(), l.to_owned()))
        })
        .collect()
}

#[test]
fn sigint_detaches_and_removes_pins_socket_and_neighbour_entries() {
    let mut topo = Topology::builder()
        .backends(2)
        .vip(VipSpec::tcp("web", VIP, PORT))
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    topo.in_client(|| client::ask_tcp(45_000, vip()).expect("served"))
        .expect("client namespace");
    let lb = topo.lb(0);
    let (ns, pin, socket) = (
        lb.node.ns.clone(),
        lb.pin_path.clone(),
        lb.admin_socket.clone(),
    );
    let before = managed_neighbours(&ns);
    for be in topo.backends() {
        assert!(
            before.contains_key(&be.addr.to_string()),
            "lb run made a managed entry for {}: {before:?}",
            be.addr
        );
    }
    assert!(pin.exists() && socket.exists());
    let link = run_in(&ns, "ip", ["-d", "link", "show", "dev", "eth0"]).expect("ip link");
    assert!(text(&link).contains("xdp"), "attached: {}", text(&link));

    let status = topo.stop_lb_with(0, libc::SIGINT).expect("lb run stopped");
    assert!(status.success(), "a clean exit on SIGINT: {status}");
    let after = managed_neighbours(&ns);
    assert!(after.is_empty(), "neighbour entries left behind: {after:?}");
    assert!(!pin.exists(), "pins left behind in {}", pin.display());
    assert!(!socket.exists(), "admin socket left behind");
    let link = run_in(&ns, "ip", ["-d", "link", "show", "dev", "eth0"]).expect("ip link");
    assert!(!text(&link).contains("xdp"), "detached: {}", text(&link));
}

#[test]
fn the_demo_removes_everything_on_ctrl_c() {
    netns::require_root().expect("root");
    let lb = lb_tests::process::lb_bin().expect("lb binary");
    let mut demo = Command::new(env!("CARGO_BIN_EXE_lb-demo"))
        .arg(&lb)
        .arg("--keep")
        .env("LB_BIN", &lb)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lb-demo");
    /// Kills the demo if the test fails before it ends.
    struct Reap(Option<std::process::Child>);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let stdout = demo.stdout.take().expect("stdout");
    let stderr = demo.stderr.take().expect("stderr");
    let pid = i32::try_from(demo.id()).expect("pid");
    let mut reap = Reap(Some(demo));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Drained so that a chatty demo never blocks on a full pipe; shown if the test fails.
    let errors = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut all);
        all
    });
    // Until the demo waits for Ctrl-C, collecting the namespaces it says it made.
    let mut namespaces = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the demo reached `Press Ctrl-C`");
        if let Some(ns) = line.split("namespace ").nth(1) {
            namespaces.push(ns.trim().to_owned());
        }
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    assert_eq!(namespaces.len(), 5, "client, balancer, three backends");
    for ns in &namespaces {
        assert!(netns::netns_path(ns).exists(), "{ns} exists while it runs");
    }
    let prefix = format!("{}{pid}-", netns::NAME_PREFIX);
    let pins = || {
        std::fs::read_dir(netns::BPFFS)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                    .count()
            })
            .unwrap_or(0)
    };
    assert!(pins() > 0, "the demo pinned its maps under {prefix}");

    // SAFETY: kill(2) on our own child; SIGINT is what Ctrl-C sends.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let mut rest = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            rest.push(line);
        }
        let demo = reap.0.as_mut().expect("child");
        if let Some(status) = demo.try_wait().expect("demo status") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not exit after Ctrl-C: {rest:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    reap.0 = None;
    // The stdout reader ends with the demo; take what it still holds.
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        rest.push(line);
    }
    let errors = errors.join().unwrap_or_default();
    assert!(status.success(), "{status}: {rest:?}\n{errors}");
    assert!(
        rest.iter().any(|l| l.starts_with("Done: every namespace")),
        "{rest:?}"
    );
    for ns in &namespaces {
        assert!(!netns::netns_path(ns).exists(), "{ns} left behind");
    }
    assert_eq!(pins(), 0, "pins left behind under {prefix}");
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    assert!(
        !text(&links).contains(&prefix),
        "no interface of the demo is left: {}",
        text(&links)
    );
}
