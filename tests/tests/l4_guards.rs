//! Per-VIP guards end to end: source allow/deny lists and the new-flow rate limit, applied by
//! `lb_xdp` to real traffic from two client addresses, with the per-VIP counters of
//! `lb stats --json` matching what the test sent. Needs root and the `lb` binary.
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use lb_tests::servers::Server;
use lb_tests::topology::{CLIENT_ADDR, SECOND_CLIENT_ADDR};
use lb_tests::wait::wait_until;
use lb_tests::{Topology, VipSpec, stats};
use serde_json::Value;

/// Deadline of every wait: a safety net, not an expectation.
const WAIT: Duration = Duration::from_secs(20);
/// How long a datagram that should be answered may take (generous); datagrams that must not
/// be answered are checked by the counters, not by waiting.
const ANSWER: Duration = Duration::from_secs(5);

/// A UDP flow from `src` to `vip`.
fn flow(src: SocketAddr, vip: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind(src).unwrap_or_else(|e| panic!("binding {src}: {e}"));
    s.connect(vip).expect("connect");
    s
}

/// Sends `payload` and waits up to `within` for an answer; the answer's text.
fn answer(s: &UdpSocket, payload: &str, within: Duration) -> Option<String> {
    s.send(payload.as_bytes()).expect("send");
    s.set_read_timeout(Some(within)).expect("timeout");
    let mut buf = [0u8; 2048];
    s.recv(&mut buf)
        .ok()
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The VIP's guard counters from `lb stats --json`.
fn guard_counter(topo: &Topology, vip: &str, key: &str) -> u64 {
    let doc = topo.stats_json(0).expect("lb stats --json");
    let v: &Value = doc["vips"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["vip"].as_str() == Some(vip)))
        .unwrap_or_else(|| panic!("VIP {vip} in {doc:#}"));
    v["guards"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {v:#}"))
}

fn wait_counter(topo: &Topology, vip: &str, key: &str, want: u64) {
    wait_until(WAIT, &format!("{vip} {key} = {want}"), || {
        let n = guard_counter(topo, vip, key);
        Ok(if n >= want {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(format!("{key} = {n}"))
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        guard_counter(topo, vip, key),
        want,
        "{vip} {key}: exactly what was sent"
    );
}

fn topology(vip: VipSpec) -> Topology {
    // The NAT topology has two client addresses; the guards do not depend on the mode.
    let mut topo = Topology::builder()
        .backends(2)
        .nat(true)
        .vip(vip)
        .build()
        .expect("building the topology");
    for be in topo.backends().to_vec() {
        let s = Server::udp_echo(
            &be.ns,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 53)),
            &be.name,
        )
        .expect("udp server");
        topo.keep(s);
    }
    topo
}

#[test]
fn denied_source_gets_nothing_while_an_allowed_one_is_served_and_drops_are_counted() {
    let vip = SocketAddr::from((Ipv4Addr::new(10, 100, 0, 5), 53));
    let label = "10.100.0.5:53/udp";
    let topo = topology(
        VipSpec::udp("dns", vip.ip(), vip.port())
            .option("mode=nat")
            .option(&format!("allow=10.0.0.0/24,deny={SECOND_CLIENT_ADDR}/32")),
    );
    let sent = 4u16;
    topo.in_client(|| {
        // Positive control: the allowed source, several flows, every one answered.
        for i in 0..sent {
            let s = flow(SocketAddr::from((CLIENT_ADDR, 43_000 + i)), vip);
            let a = answer(&s, "allowed", ANSWER);
            assert!(
                a.is_some_and(|a| a.ends_with("allowed")),
                "flow {i} of {CLIENT_ADDR}"
            );
        }
        // The denied source: one datagram per flow, none answered (checked by the counter
        // below, then by the sockets, which would hold any answer).
        let denied: Vec<UdpSocket> = (0..sent)
            .map(|i| {
                let s = flow(SocketAddr::from((SECOND_CLIENT_ADDR, 43_000 + i)), vip);
                s.send(b"denied").expect("send");
                s
            })
            .collect();
        denied
    })
    .map(|denied| {
        wait_counter(&topo, label, "drop_denied", u64::from(sent));
        for s in &denied {
            s.set_nonblocking(true).expect("nonblocking");
            let mut buf = [0u8; 64];
            assert!(s.recv(&mut buf).is_err(), "a denied source got an answer");
        }
    })
    .expect("client namespace");
    assert_eq!(guard_counter(&topo, label, "drop_not_allowed"), 0);
    let doc = topo.stats_json(0).expect("stats");
    assert_eq!(
        stats::sum(&doc, "new_flows", "backend"),
        u64::from(sent),
        "only the allowed flows created state: {doc:#}"
    );
}

#[test]
fn source_outside_the_allow_list_is_dropped_and_counted() {
    let vip = SocketAddr::from((Ipv4Addr::new(10, 100, 0, 6), 53));
    let label = "10.100.0.6:53/udp";
    let topo = topology(
        VipSpec::udp("dns", vip.ip(), vip.port())
            .option("mode=nat")
            .option(&format!("allow={CLIENT_ADDR}/32")),
    );
    topo.in_client(|| {
        let ok = flow(SocketAddr::from((CLIENT_ADDR, 44_000)), vip);
        assert!(
            answer(&ok, "in", ANSWER).is_some(),
            "the listed source is served"
        );
        let out = flow(SocketAddr::from((SECOND_CLIENT_ADDR, 44_000)), vip);
        for _ in 0..3 {
            out.send(b"out").expect("send");
        }
    })
    .expect("client namespace");
    wait_counter(&topo, label, "drop_not_allowed", 3);
    assert_eq!(guard_counter(&topo, label, "drop_denied"), 0);
}

#[test]
fn source_over_its_new_flow_rate_is_limited_while_others_and_its_established_flow_are_not() {
    let vip = SocketAddr::from((Ipv4Addr::new(10, 100, 0, 7), 53));
    let label = "10.100.0.7:53/udp";
    // One new flow per second, five at once: a burst of 40 new flows sent back to back is
    // mostly over it, however slow the machine (each second adds one flow at most).
    let topo = topology(
        VipSpec::udp("dns", vip.ip(), vip.port())
            .option("mode=nat")
            .option("new-flow-rate=1,new-flow-burst=5"),
    );
    let burst = 40u16;
    let (answered, limited_other, took) = topo
        .in_client(|| {
            // The busy source's established flow (its first new flow: one token).
            let established = flow(SocketAddr::from((SECOND_CLIENT_ADDR, 45_000)), vip);
            assert!(
                answer(&established, "first", ANSWER).is_some(),
                "established flow"
            );
            let started = Instant::now();
            let socks: Vec<UdpSocket> = (1..=burst)
                .map(|i| {
                    let s = flow(SocketAddr::from((SECOND_CLIENT_ADDR, 45_000 + i)), vip);
                    s.send(b"burst").expect("send");
                    s
                })
                .collect();
            let took = started.elapsed();
            // The established flow keeps working while its source is limited.
            let still = answer(&established, "still here", ANSWER);
            assert!(
                still.is_some_and(|a| a.ends_with("still here")),
                "the limited source's established flow is answered"
            );
            // Another source at a normal rate: every new flow served.
            let mut limited_other = 0;
            for i in 0..3u16 {
                let s = flow(SocketAddr::from((CLIENT_ADDR, 45_000 + i)), vip);
                if answer(&s, "calm", ANSWER).is_none() {
                    limited_other += 1;
                }
            }
            // The burst's answers, if any, have long arrived by now (same path as above).
            let answered = socks
                .iter()
                .filter(|s| {
                    s.set_nonblocking(true).expect("nonblocking");
                    let mut buf = [0u8; 64];
                    s.recv(&mut buf).is_ok()
                })
                .count() as u64;
            (answered, limited_other, took)
        })
        .expect("client namespace");
    println!("burst of {burst} new flows sent in {took:?}; {answered} answered");
    assert_eq!(limited_other, 0, "the calm source was not limited");
    assert!(
        answered >= 4,
        "the bucket's remaining burst went through: {answered}"
    );
    assert!(
        answered < u64::from(burst),
        "the burst was limited: {answered} of {burst} answered"
    );
    // Every datagram of the burst is either answered or counted as limited; nothing else.
    wait_counter(
        &topo,
        label,
        "drop_rate_limited",
        u64::from(burst) - answered,
    );
    assert_eq!(guard_counter(&topo, label, "drop_denied"), 0);

    // `lb dump limited` names the busy source, with the same count, and not the calm one.
    let pin = topo.lb(0).pin_path.to_string_lossy().into_owned();
    let dump = topo
        .lb_cli(["dump", "limited", "--pin-path", &pin, "--json"])
        .expect("lb dump limited");
    let rows: Value = serde_json::from_str(&dump).expect("JSON");
    let rows = rows.as_array().expect("an array");
    assert_eq!(rows.len(), 1, "one limited source: {dump}");
    assert_eq!(rows[0]["source"], SECOND_CLIENT_ADDR.to_string(), "{dump}");
    assert_eq!(rows[0]["vip"], label, "{dump}");
    assert_eq!(
        rows[0]["new_flows_dropped"].as_u64(),
        Some(u64::from(burst) - answered),
        "{dump}"
    );
}

#[test]
fn guards_change_at_run_time_through_the_admin_cli() {
    let vip = SocketAddr::from((Ipv4Addr::new(10, 100, 0, 8), 53));
    let label = "10.100.0.8:53/udp";
    let topo = topology(VipSpec::udp("dns", vip.ip(), vip.port()).option("mode=nat"));
    let ask = |src: Ipv4Addr, port: u16| {
        topo.in_client(move || {
            let s = flow(SocketAddr::from((src, port)), vip);
            answer(&s, "hello", ANSWER).is_some()
        })
        .expect("client namespace")
    };
    // No guards: both sources served.
    assert!(ask(CLIENT_ADDR, 46_000) && ask(SECOND_CLIENT_ADDR, 46_000));

    let out = topo
        .admin_cli(
            0,
            &[
                "vips",
                "set-guards",
                "dns",
                &format!("deny={SECOND_CLIENT_ADDR}/32"),
            ],
        )
        .expect("lb vips set-guards");
    assert!(out.contains("deny=10.0.0.254/32"), "{out}");
    // A new flow and the established one of the denied source are dropped; the other
    // source (positive control) is served.
    topo.in_client(|| {
        for port in [46_000, 46_001] {
            flow(SocketAddr::from((SECOND_CLIENT_ADDR, port)), vip)
                .send(b"denied")
                .expect("send");
        }
    })
    .expect("client namespace");
    assert!(ask(CLIENT_ADDR, 46_001), "the other source is still served");
    wait_counter(&topo, label, "drop_denied", 2);

    // Bad input is refused with the option named, and changes nothing.
    let err = topo
        .admin_cli(0, &["vips", "set-guards", "dns", "deny=10.0.0.0/33"])
        .expect_err("a bad CIDR is refused");
    assert!(format!("{err:#}").contains("10.0.0.0/33"), "{err:#}");
    let shown = topo
        .admin_cli(0, &["vips", "guards", "dns"])
        .expect("lb vips guards");
    assert!(shown.contains("deny=10.0.0.254/32"), "{shown}");

    // Lifted: served again.
    topo.admin_cli(0, &["vips", "set-guards", "dns", "deny="])
        .expect("lb vips set-guards");
    assert!(
        ask(SECOND_CLIENT_ADDR, 46_002),
        "served once the deny list is gone"
    );
    assert_eq!(guard_counter(&topo, label, "drop_denied"), 2);
}
