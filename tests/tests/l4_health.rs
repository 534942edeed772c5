//! Health checks and target lifecycle of the L4 tier, end to end: a real `lb run` checking
//! real servers on backends in namespaces, through the DSR data path (`lb_hc_encap`), while a
//! client makes real connections through the VIP.
//!
//! Timers are short (checks every 0.5 s, thresholds 2); every wait has a generous deadline and
//! no test asserts how long anything took (the measured times are printed). Needs root and
//! the `lb` binary.
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use lb_tests::client::{self, LineClient};
use lb_tests::health::{self, TargetHealth};
use lb_tests::stats::{self, BackendEntry};
use lb_tests::wait::wait_until;
use lb_tests::{Topology, VipSpec, netns, tally};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const PORT: u16 = 80;
/// The VIP's target group (named after the VIP by the harness).
const GROUP: &str = "web";
/// Fast checks: a dead target is unhealthy after two failed checks, back after two passes.
const CHECKS: &str = "health-check-interval=0.5,health-check-timeout=0.3,healthy-threshold=2,\
                      unhealthy-threshold=2";
/// Deadline of every wait: a safety net, not an expectation.
const WAIT: Duration = Duration::from_secs(20);

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, PORT)
}

fn topology(backends: usize, vip: VipSpec) -> Topology {
    Topology::builder()
        .backends(backends)
        .vip(vip)
        .build()
        .expect("building the topology")
}

fn web(options: &str) -> VipSpec {
    VipSpec::tcp(GROUP, VIP, PORT).group_options(&format!("{CHECKS},{options}"))
}

fn health_rows(topo: &Topology) -> Vec<TargetHealth> {
    topo.target_health(0, Some(GROUP))
        .expect("lb targets health --json")
}

fn summary(rows: &[TargetHealth]) -> String {
    rows.iter()
        .map(TargetHealth::summary)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Waits until each listed backend (by index) is in the given state; returns the rows.
fn wait_states(topo: &Topology, want: &[(usize, &str)]) -> Vec<TargetHealth> {
    let what = format!("targets in states {want:?}");
    wait_until(WAIT, &what, || {
        let rows = topo.target_health(0, Some(GROUP))?;
        let done = want.iter().all(|&(j, state)| {
            health::of(&rows, topo.backend(j).addr).is_some_and(|r| r.state == state)
        });
        Ok(if done {
            ControlFlow::Break(rows)
        } else {
            ControlFlow::Continue(summary(&rows))
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}"))
}

fn backends_in_maps(topo: &Topology) -> Vec<BackendEntry> {
    stats::backends(&topo.stats_json(0).expect("lb stats --json"))
}

/// Waits until backend `j`'s entry in the maps has the flags (`None`: no entry at all).
fn wait_flags(topo: &Topology, j: usize, want: Option<(bool, bool)>) {
    let addr = topo.backend(j).addr.to_string();
    let what = format!("{addr} in the maps as (in_ring, active) = {want:?}");
    wait_until(WAIT, &what, || {
        let entries = backends_in_maps(topo);
        let got = entries
            .iter()
            .find(|b| b.addr == addr)
            .map(|b| (b.in_ring, b.active));
        Ok(if got == want {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(format!("{got:?}"))
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
}

fn unhealthy_routing_flows(topo: &Topology) -> u64 {
    stats::sum(
        &topo.stats_json(0).expect("lb stats --json"),
        "unhealthy_routing_flows",
        "vips",
    )
}

/// One new connection from each port, one question each: who answered, or why not.
fn ask_new(topo: &Topology, ports: std::ops::Range<u16>) -> Vec<Result<String>> {
    topo.in_client(|| ports.map(|p| client::ask_tcp(p, vip())).collect())
        .expect("client namespace")
}

/// The answers of [`ask_new`], failing the test on any failed connection.
fn served(topo: &Topology, ports: std::ops::Range<u16>) -> Vec<String> {
    ask_new(topo, ports)
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("a new connection failed: {e:#}")))
        .collect()
}

/// Long-lived connections from each port, with the backend that answered first.
fn open(topo: &Topology, ports: std::ops::Range<u16>) -> Vec<(LineClient, String)> {
    topo.in_client(|| {
        ports
            .map(|p| {
                let mut c = LineClient::connect(p, vip()).expect("connect");
                let who = c.ask().expect("first answer");
                (c, who)
            })
            .collect()
    })
    .expect("client namespace")
}

/// Whether the error chain holds a connection reset (the peer answered with RST).
fn is_reset(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == ErrorKind::ConnectionReset)
    })
}

/// One new connection through the VIP.
struct Attempt {
    started: Instant,
    answer: Result<String, String>,
}

/// New connections through the VIP, one after another from fresh source ports, until
/// stopped: what a steady stream of clients sees while targets change.
struct NewConnections {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Vec<Attempt>>>>,
}

impl NewConnections {
    fn start(topo: &Topology, first_port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = netns::spawn_in_netns(&topo.client().ns, "new connections", move || {
            let mut attempts = Vec::new();
            let mut port = first_port;
            while !flag.load(Ordering::Relaxed) {
                let started = Instant::now();
                let answer = client::ask_tcp(port, vip()).map_err(|e| format!("{e:#}"));
                attempts.push(Attempt { started, answer });
                port = port.checked_add(1).expect("source ports left");
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(attempts)
        })
        .expect("client thread");
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().expect("running");
        t.join()
            .expect("client thread panicked")
            .expect("client thread")
    }
}

impl Drop for NewConnections {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Established connections asked again and again, until stopped; counts every answer that is
/// an error or comes from another backend than the first one did.
struct Chatter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(usize, Vec<String>)>>,
}

impl Chatter {
    fn start(mut conns: Vec<(LineClient, String)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut rounds, mut broken) = (0, Vec::new());
            while !flag.load(Ordering::Relaxed) {
                for (c, who) in &mut conns {
                    match c.ask() {
                        Ok(a) if a == *who => {}
                        Ok(a) => broken.push(format!("{}: {who} became {a}", c.local_addr())),
                        Err(e) => broken.push(format!("{e:#}")),
                    }
                }
                rounds += 1;
                if !broken.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (rounds, broken)
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// (rounds over every connection, what went wrong).
    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("chatter panicked")
    }
}

impl Drop for Chatter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn stopped_server_turns_unhealthy_is_avoided_and_returns_after_restart() {
    let mut topo = topology(3, web("deregistration-delay=0"));
    topo.serve_tcp_lines(PORT).expect("servers");
    let stopped = topo.backend(1).clone();
    wait_states(&topo, &[(0, "healthy"), (1, "healthy"), (2, "healthy")]);

    // Control: every backend serves new connections.
    let counts = tally(served(&topo, 20_000..20_060));
    assert_eq!(counts.len(), 3, "all three serve at first: {counts:?}");

    let stream = NewConnections::start(&topo, 40_000);
    std::thread::sleep(Duration::from_millis(300));
    let t_stop = Instant::now();
    topo.stop_server(1, PORT)
        .expect("stopping backend-2's server");

    let rows = wait_states(&topo, &[(1, "unhealthy")]);
    let t_detected = Instant::now();
    let row = health::of(&rows, stopped.addr).expect("listed");
    assert_eq!(row.reason.as_deref(), Some("Target.FailedHealthChecks"));
    assert_eq!(row.description.as_deref(), Some("Connection refused"));
    wait_flags(&topo, 1, Some((false, false)));
    let t_out_of_ring = Instant::now();

    std::thread::sleep(Duration::from_secs(1));
    let counts = tally(served(&topo, 21_000..21_060));
    assert!(
        !counts.contains_key(&stopped.name),
        "new connections avoid the unhealthy target: {counts:?}"
    );
    assert_eq!(counts.len(), 2, "the others keep serving: {counts:?}");

    let t_restart = Instant::now();
    topo.serve_tcp_lines_on(1, PORT)
        .expect("restarting the server");
    wait_states(&topo, &[(1, "healthy")]);
    let t_healthy = Instant::now();
    wait_flags(&topo, 1, Some((true, true)));
    std::thread::sleep(Duration::from_millis(300));
    let attempts = stream.finish();

    let counts = tally(served(&topo, 22_000..22_060));
    assert!(
        counts.contains_key(&stopped.name),
        "new connections reach it again: {counts:?}"
    );

    // The steady stream: nothing failed once the target was out of the ring.
    let failed_before: usize = attempts
        .iter()
        .filter(|a| a.started < t_out_of_ring && a.answer.is_err())
        .count();
    let after: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.started >= t_out_of_ring)
        .collect();
    let failed_after: Vec<&String> = after
        .iter()
        .filter_map(|a| a.answer.as_ref().err())
        .collect();
    assert!(
        failed_after.is_empty(),
        "{} of {} new connections after detection failed: {failed_after:?}",
        failed_after.len(),
        after.len()
    );
    let to_stopped_while_down = after
        .iter()
        .filter(|a| a.started < t_restart && a.answer.as_deref() == Ok(stopped.name.as_str()))
        .count();
    assert_eq!(to_stopped_while_down, 0);
    assert!(
        after.len() >= 20,
        "the stream ran: {} connections",
        after.len()
    );
    // Two healthy targets remained: the group never failed open.
    assert_eq!(unhealthy_routing_flows(&topo), 0);
    println!(
        "detection {:?} (out of the ring {:?}), recovery {:?}; stream: {} connections, {} \
         failed before detection, 0 of {} after",
        t_detected - t_stop,
        t_out_of_ring - t_stop,
        t_healthy - t_restart,
        attempts.len(),
        failed_before,
        after.len()
    );
    topo.processes_alive().expect("lb still running");
}

#[test]
fn data_path_checks_name_a_missing_vip_a_missing_decap_and_a_dead_application_apart() {
    // backend-1 healthy; backend-2 without the VIP on lo; backend-3 without `lb decap`;
    // backend-4 without its server. Every server listens on 0.0.0.0, so a direct check of
    // backend-2 and backend-3 passes.
    let mut topo = topology(4, web("deregistration-delay=0"));
    topo.serve_tcp_lines(PORT).expect("servers");
    topo.remove_vip_from_lo(1, VIP).expect("removing the VIP");
    topo.stop_decap(2).expect("stopping lb decap");
    topo.stop_server(3, PORT)
        .expect("stopping backend-4's server");

    let rows = wait_states(
        &topo,
        &[
            (0, "healthy"),
            (1, "unhealthy"),
            (2, "unhealthy"),
            (3, "unhealthy"),
        ],
    );
    let describe = |j: usize| {
        let r = health::of(&rows, topo.backend(j).addr).expect("listed");
        assert_eq!(
            r.reason.as_deref(),
            Some("Target.FailedHealthChecks"),
            "{r:?}"
        );
        r.description.clone().unwrap_or_default()
    };
    let (no_vip, no_decap, dead) = (describe(1), describe(2), describe(3));
    assert!(
        no_vip.contains("answers on its own address but not through the VIP"),
        "{no_vip}"
    );
    assert!(
        no_decap.contains("does not decapsulate IP-in-IP") && no_decap.contains("lb decap"),
        "{no_decap}"
    );
    assert_eq!(dead, "Connection refused");
    assert!(no_vip != no_decap && no_vip != dead && no_decap != dead);
    println!("no VIP on lo: {no_vip}\nno lb decap: {no_decap}\ndead application: {dead}");

    // New connections go to the one target that can serve them.
    let counts = tally(served(&topo, 20_000..20_030));
    assert_eq!(counts.keys().collect::<Vec<_>>(), [&topo.backend(0).name]);

    // Control: checked directly, the two that cannot take VIP traffic look healthy, and the
    // dead application still does not.
    topo.modify_group(0, GROUP, "health-check-mode=direct")
        .expect("lb groups modify");
    let rows = wait_states(&topo, &[(0, "healthy"), (1, "healthy"), (2, "healthy")]);
    let dead = health::of(&rows, topo.backend(3).addr).expect("listed");
    assert_ne!(dead.state, "healthy", "{dead:?}");
    wait_states(&topo, &[(3, "unhealthy")]);
    topo.processes_alive().expect("lb still running");
}

#[test]
fn when_every_check_fails_the_vip_fails_open_to_all_targets_and_counts_it() {
    // Nothing listens on port 9: every check is refused while port 80 serves.
    let mut topo = topology(3, web("health-check-port=9,deregistration-delay=0"));
    topo.serve_tcp_lines(PORT).expect("servers");
    let rows = wait_states(
        &topo,
        &[(0, "unhealthy"), (1, "unhealthy"), (2, "unhealthy")],
    );
    for r in &rows {
        assert_eq!(r.health_check_port, "9");
        assert_eq!(r.reason.as_deref(), Some("Target.FailedHealthChecks"));
        assert_eq!(r.description.as_deref(), Some("Connection refused"));
    }
    let entries = backends_in_maps(&topo);
    assert!(
        entries.len() == 3 && entries.iter().all(|b| b.in_ring && b.active),
        "failing open, every unhealthy target is in the ring: {entries:?}"
    );
    let groups: serde_json::Value =
        serde_json::from_str(&topo.admin_cli(0, &["groups", "--json"]).expect("lb groups"))
            .expect("JSON");
    assert_eq!(groups["TargetGroups"][0]["FailingOpen"], true, "{groups}");

    let before = unhealthy_routing_flows(&topo);
    const N: u16 = 45;
    let counts = tally(served(&topo, 20_000..20_000 + N));
    assert_eq!(counts.len(), 3, "every backend serves: {counts:?}");
    assert_eq!(
        unhealthy_routing_flows(&topo) - before,
        u64::from(N),
        "every new connection counted as unhealthy routing"
    );
    topo.processes_alive().expect("lb still running");
}

#[test]
fn draining_target_keeps_its_established_flow_until_the_delay_ends_then_loses_it() {
    const DELAY: u64 = 4;
    let mut topo = topology(3, web(&format!("deregistration-delay={DELAY}")));
    topo.serve_tcp_lines(PORT).expect("servers");
    wait_states(&topo, &[(0, "healthy"), (1, "healthy"), (2, "healthy")]);
    let drained = topo.backend(0).clone();

    let mut conns = open(&topo, 30_000..30_024);
    let on_drained = conns.iter().filter(|(_, w)| *w == drained.name).count();
    assert!(on_drained > 0, "precondition: a connection to backend-1");

    let t_dereg = Instant::now();
    topo.deregister(0, GROUP, 0).expect("lb targets deregister");
    let rows = health_rows(&topo);
    let row = health::of(&rows, drained.addr).expect("listed while draining");
    assert_eq!(row.state, "draining");
    assert_eq!(
        row.reason.as_deref(),
        Some("Target.DeregistrationInProgress")
    );
    let left: u64 = row
        .description
        .as_deref()
        .and_then(|d| d.split_once('(')?.1.split_once(" s left)"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no time left in {row:?}"));
    assert!((1..=DELAY).contains(&left), "{left} s left");
    let entry = backends_in_maps(&topo)
        .into_iter()
        .find(|b| b.addr == drained.addr.to_string())
        .expect("still in the maps");
    assert!(!entry.in_ring && entry.active, "{entry:?}");

    // During the delay: established connections, to it and to the others, keep answering…
    for (c, who) in &mut conns {
        assert_eq!(&c.ask().expect("established connection"), who);
    }
    // … and new connections avoid it.
    let counts = tally(served(&topo, 31_000..31_045));
    assert!(!counts.contains_key(&drained.name), "{counts:?}");
    assert!(
        t_dereg.elapsed() < Duration::from_secs(DELAY),
        "precondition: the checks above ran within the delay"
    );

    // After the delay: gone from the listing and from the maps.
    wait_until(WAIT, "the drained target leaves the listing", || {
        let rows = topo.target_health(0, Some(GROUP))?;
        Ok(match health::of(&rows, drained.addr) {
            None => ControlFlow::Break(()),
            Some(r) => ControlFlow::Continue(r.summary()),
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let drained_for = t_dereg.elapsed();
    wait_flags(&topo, 0, None);

    // Its established connection no longer reaches it: the flow entry is gone, so the next
    // segment is a new flow steered by the ring to another backend, which has no such
    // connection and answers with a reset.
    let flows_before: u64 = backends_in_maps(&topo).iter().map(|b| b.new_flows).sum();
    let segs_before = netns::snmp(&drained.ns, "Tcp", "InSegs").expect("snmp");
    let (c, _) = conns
        .iter_mut()
        .find(|(_, w)| *w == drained.name)
        .expect("a connection to it");
    let err = c
        .ask()
        .expect_err("the drained target's connection answered after the delay");
    assert!(is_reset(&err), "expected a reset, got: {err:#}");
    assert_eq!(
        netns::snmp(&drained.ns, "Tcp", "InSegs").expect("snmp"),
        segs_before,
        "a segment reached the drained backend"
    );
    let flows_after: u64 = backends_in_maps(&topo).iter().map(|b| b.new_flows).sum();
    assert!(
        flows_after > flows_before,
        "the segment was steered as a new flow"
    );
    // The others' connections are untouched.
    for (c, who) in conns.iter_mut().filter(|(_, w)| *w != drained.name) {
        assert_eq!(&c.ask().expect("established connection"), who);
    }
    println!(
        "drained for {drained_for:?} (delay {DELAY} s); the late segment was re-steered as \
         {} new flow(s) and reset",
        flows_after - flows_before
    );
    topo.processes_alive().expect("lb still running");
}

#[test]
fn cli_changes_leave_established_flows_to_other_targets_answering() {
    // Backends 1–3 are targets at start; backend-4 joins, backend-2 leaves.
    let vip = web("deregistration-delay=0").target(0).target(1).target(2);
    let mut topo = topology(4, vip);
    topo.serve_tcp_lines(PORT).expect("servers");
    wait_states(&topo, &[(0, "healthy"), (1, "healthy"), (2, "healthy")]);
    let (leaving, joining) = (topo.backend(1).clone(), topo.backend(3).clone());

    let conns = open(&topo, 30_000..30_030);
    let (mut to_leaving, others): (Vec<_>, Vec<_>) =
        conns.into_iter().partition(|(_, w)| *w == leaving.name);
    assert!(
        !to_leaving.is_empty() && others.len() >= 10,
        "precondition: connections to every target"
    );
    let kept = others.len();
    let chatter = Chatter::start(others);

    topo.register(0, GROUP, 3, None)
        .expect("lb targets register");
    wait_states(&topo, &[(3, "healthy")]);

    topo.register(0, GROUP, 0, Some(3))
        .expect("lb targets register with a weight");
    let rows = health_rows(&topo);
    assert_eq!(
        health::of(&rows, topo.backend(0).addr).and_then(|r| r.weight),
        Some(3)
    );
    let be1 = topo.backend(0).addr.to_string();
    let entry = backends_in_maps(&topo)
        .into_iter()
        .find(|b| b.addr == be1)
        .expect("in the maps");
    assert_eq!(entry.weight, 3);

    topo.modify_group(0, GROUP, "health-check-interval=0.7,healthy-threshold=3")
        .expect("lb groups modify");
    let groups: serde_json::Value =
        serde_json::from_str(&topo.admin_cli(0, &["groups", "--json"]).expect("lb groups"))
            .expect("JSON");
    assert_eq!(
        groups["TargetGroups"][0]["HealthCheckIntervalSeconds"].as_f64(),
        Some(0.7),
        "{groups}"
    );
    // A change of what is checked starts the checks over.
    topo.modify_group(0, GROUP, "health-check-mode=direct")
        .expect("lb groups modify");
    wait_states(
        &topo,
        &[
            (0, "healthy"),
            (1, "healthy"),
            (2, "healthy"),
            (3, "healthy"),
        ],
    );

    topo.deregister(0, GROUP, 1).expect("lb targets deregister");
    let rows = health_rows(&topo);
    assert!(health::of(&rows, leaving.addr).is_none(), "{rows:?}");
    std::thread::sleep(Duration::from_millis(500));

    let (rounds, broken) = chatter.finish();
    assert!(
        broken.is_empty(),
        "established connections to other targets broke: {broken:?}"
    );
    assert!(rounds >= 10, "the connections were asked {rounds} times");
    println!("{kept} established connections asked {rounds} times through every change");

    // The changes took effect: the deregistered target's connections are re-steered (reset),
    // new connections reach the new target and not the removed one.
    let err = to_leaving[0]
        .0
        .ask()
        .expect_err("the deregistered target's connection answered");
    assert!(is_reset(&err), "expected a reset, got: {err:#}");
    let counts = tally(served(&topo, 31_000..31_060));
    assert!(counts.contains_key(&joining.name), "{counts:?}");
    assert!(!counts.contains_key(&leaving.name), "{counts:?}");
    topo.processes_alive().expect("lb still running");
}

/// Opens connections until `n` of them are served by backend `j`; the others are closed.
fn open_to(topo: &Topology, j: usize, n: usize, ports: std::ops::Range<u16>) -> Vec<LineClient> {
    let name = topo.backend(j).name.clone();
    let mut out = Vec::new();
    for (c, who) in open(topo, ports) {
        if who == name && out.len() < n {
            out.push(c);
        }
    }
    assert_eq!(out.len(), n, "precondition: {n} connections to {name}");
    out
}

#[test]
fn unhealthy_draining_keeps_an_unhealthy_targets_flows_for_the_interval_only() {
    // Checks on port 8080, traffic on port 80: stopping the check server makes a target
    // unhealthy while its established connections could still be served.
    const CHECK_PORT: u16 = 8080;
    let options = format!("health-check-port={CHECK_PORT},unhealthy-draining=3");
    let mut topo = topology(3, web(&options));
    topo.serve_tcp_lines(PORT).expect("servers");
    topo.serve_tcp_lines(CHECK_PORT).expect("check servers");
    wait_states(&topo, &[(0, "healthy"), (1, "healthy"), (2, "healthy")]);
    let sick = topo.backend(0).clone();

    let mut conn = open_to(&topo, 0, 1, 30_000..30_030).remove(0);
    topo.stop_server(0, CHECK_PORT)
        .expect("stopping the check server");
    wait_states(&topo, &[(0, "unhealthy.draining")]);
    let t_unhealthy = Instant::now();
    wait_flags(&topo, 0, Some((false, true)));
    // During the interval: its connection is still served by it; new ones avoid it.
    assert_eq!(conn.ask().expect("kept during the interval"), sick.name);
    let counts = tally(served(&topo, 31_000..31_030));
    assert!(!counts.contains_key(&sick.name), "{counts:?}");
    assert_eq!(conn.ask().expect("kept during the interval"), sick.name);
    // After it: re-steered, reset.
    wait_states(&topo, &[(0, "unhealthy")]);
    let kept_for = t_unhealthy.elapsed();
    wait_flags(&topo, 0, Some((false, false)));
    let err = conn.ask().expect_err("answered after the interval");
    assert!(is_reset(&err), "expected a reset, got: {err:#}");

    // Without the option: re-steered as soon as it turns unhealthy.
    topo.serve_tcp_lines_on(0, CHECK_PORT)
        .expect("restarting the check server");
    wait_states(&topo, &[(0, "healthy")]);
    topo.modify_group(0, GROUP, "unhealthy-draining=0")
        .expect("lb groups modify");
    let mut conn = open_to(&topo, 0, 1, 32_000..32_030).remove(0);
    topo.stop_server(0, CHECK_PORT)
        .expect("stopping the check server");
    let mut seen = Vec::new();
    wait_until(WAIT, "unhealthy without draining", || {
        let rows = topo.target_health(0, Some(GROUP))?;
        let state = health::of(&rows, sick.addr).map(|r| r.state.clone());
        seen.extend(state.clone());
        Ok(match state.as_deref() {
            Some("unhealthy") => ControlFlow::Break(()),
            _ => ControlFlow::Continue(summary(&rows)),
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!seen.iter().any(|s| s == "unhealthy.draining"), "{seen:?}");
    wait_flags(&topo, 0, Some((false, false)));
    let err = conn.ask().expect_err("answered while unhealthy");
    assert!(is_reset(&err), "expected a reset, got: {err:#}");
    println!("unhealthy.draining kept the flow for {kept_for:?} (interval 3 s)");
    topo.processes_alive().expect("lb still running");
}
