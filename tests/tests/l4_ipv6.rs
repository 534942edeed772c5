//! The L4 scenarios with IPv6: IPv6 VIPs with IPv6 backends (IPv6-in-IPv6), and an IPv4 VIP
//! whose targets are IPv6 (IPv4-in-IPv6, an IPv6-only underlay): spread over backends, a
//! connection kept across ring changes, removal moving only the removed backend's flows, UDP,
//! port-0 VIPs, two balancers agreeing, and health checks through the data path. Real
//! traffic through real `lb run` and `lb decap` in namespaces. Needs root and the `lb` binary.
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::ControlFlow;
use std::time::Duration;

use lb_tests::client::{self, LineClient};
use lb_tests::health;
use lb_tests::wait::wait_until;
use lb_tests::{Topology, VipSpec, stats, tally};

/// IPv6 VIPs live in `fd00:100::/64`, which the client routes through the balancer.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
const PORT: u16 = 80;

fn vip6() -> SocketAddr {
    SocketAddr::from((VIP6, PORT))
}

#[test]
fn three_hundred_ipv6_connections_spread_over_three_ipv6_backends_and_are_counted() {
    let mut topo = Topology::builder()
        .backends(3)
        .vip(VipSpec::tcp("web6", VIP6, PORT).ipv6_targets())
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    let answers = topo
        .in_client(|| {
            (0..300u16)
                .map(|i| client::ask_tcp(20_000 + i, vip6()).expect("connection through the VIP"))
                .collect::<Vec<_>>()
        })
        .expect("client namespace");
    let counts = tally(answers);
    assert_eq!(counts.len(), 3, "every backend served some: {counts:?}");
    for be in topo.backends() {
        let n = counts.get(&be.name).copied().unwrap_or(0);
        assert!(
            (60..=141).contains(&n),
            "{} served {n} of 300 connections: {counts:?}",
            be.name
        );
    }
    let doc = topo.stats_json(0).expect("lb stats --json");
    assert_eq!(stats::sum(&doc, "new_flows", "backend"), 300, "{doc:#}");
    for be in topo.backends() {
        assert_eq!(
            stats::sum_for(&doc, "new_flows", "backend", &be.addr6.to_string()),
            counts[&be.name] as u64,
            "{} ({}) new_flows = connections it answered: {doc:#}",
            be.name,
            be.addr6
        );
    }
    assert_eq!(stats::nonzero_drops(&doc), vec![], "{doc:#}");
    topo.processes_alive().expect("lb still running");
}

#[test]
fn an_ipv6_connection_stays_on_its_backend_while_targets_change() {
    let mut topo = Topology::builder()
        .backends(4)
        .vip(
            VipSpec::tcp("web6", VIP6, PORT)
                .ipv6_targets()
                .target(0)
                .target(1)
                .target(2),
        )
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    let names: Vec<String> = topo.backends().iter().map(|b| b.name.clone()).collect();
    let mut conns: Vec<(LineClient, String)> = topo
        .in_client(|| {
            (0..21u16)
                .map(|i| {
                    let mut c = LineClient::connect(30_000 + i, vip6()).expect("connect");
                    let who = c.ask().expect("first answer");
                    (c, who)
                })
                .collect()
        })
        .expect("client namespace");
    assert!(conns.iter().all(|(_, w)| *w != names[3]));

    topo.register(0, "web6", 3, None).expect("register");
    for (c, who) in &mut conns {
        assert_eq!(&c.ask().expect("answer after register"), who);
    }
    let serving: BTreeSet<String> = conns.iter().map(|(_, w)| w.clone()).collect();
    let removed = (0..3)
        .find(|&j| serving.contains(&names[j]))
        .expect("a serving backend");
    topo.deregister(0, "web6", removed).expect("deregister");
    for (c, who) in conns.iter_mut().filter(|(_, w)| *w != names[removed]) {
        assert_eq!(&c.ask().expect("answer after deregister"), who);
    }
    let answers = topo
        .in_client(|| {
            (0..90u16)
                .map(|i| client::ask_tcp(31_000 + i, vip6()).expect("new connection"))
                .collect::<Vec<_>>()
        })
        .expect("client namespace");
    let counts = tally(answers);
    assert!(
        counts.contains_key(&names[3]),
        "registered serves: {counts:?}"
    );
    assert!(
        !counts.contains_key(&names[removed]),
        "deregistered does not: {counts:?}"
    );
    topo.processes_alive().expect("lb still running");
}

#[test]
fn ipv6_udp_flows_stay_on_their_backend_and_two_balancers_agree() {
    let vip = SocketAddr::from((Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2), 5353));
    let mut topo = Topology::builder()
        .backends(3)
        .lbs(2)
        .vip(VipSpec::udp("dns6", vip.ip(), vip.port()).ipv6_targets())
        .build()
        .expect("building the topology");
    topo.serve_udp_echo(vip).expect("udp servers");
    let flows = 40u16;
    let ask_all = || {
        (0..flows)
            .map(|i| {
                let payload = format!("flow-{i}");
                let (who, echo) = client::ask_udp(44_000 + i, vip, &payload).expect("udp");
                assert_eq!(echo, payload);
                who
            })
            .collect::<Vec<_>>()
    };
    let first = topo.in_client(ask_all).expect("client namespace");
    let again = topo.in_client(ask_all).expect("client namespace");
    assert_eq!(first, again, "each flow stays on its backend");
    assert!(tally(first.clone()).len() > 1, "{first:?}");
    topo.route_vips_via(1).expect("switching the route");
    let via_second = topo.in_client(ask_all).expect("client namespace");
    let second = topo.stats_json(1).expect("lb stats of the second balancer");
    assert_eq!(
        stats::sum(&second, "new_flows", "backend"),
        u64::from(flows),
        "the second pass went through the second balancer: {second:#}"
    );
    assert_eq!(
        first, via_second,
        "both balancers send each flow to one backend"
    );
    topo.processes_alive().expect("lbs still running");
}

#[test]
fn an_ipv6_port_zero_vip_forwards_every_port() {
    let vip = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 3);
    let mut topo = Topology::builder()
        .backends(3)
        .vip(VipSpec::tcp("any6", vip, 0).ipv6_targets())
        .build()
        .expect("building the topology");
    for port in [7001u16, 7002, 8443] {
        topo.serve_tcp_lines(port).expect("servers");
    }
    let names: Vec<String> = topo.backends().iter().map(|b| b.name.clone()).collect();
    let answers = topo
        .in_client(|| {
            let mut out = Vec::new();
            for (p, port) in [7001u16, 7002, 8443].iter().enumerate() {
                for i in 0..10u16 {
                    let dst = SocketAddr::from((vip, *port));
                    out.push(client::ask_tcp(41_000 + 100 * p as u16 + i, dst).expect("connect"));
                }
            }
            out
        })
        .expect("client namespace");
    assert!(answers.iter().all(|a| names.contains(a)), "{answers:?}");
    let doc = topo.stats_json(0).expect("lb stats");
    assert_eq!(stats::sum(&doc, "new_flows", "backend"), 30, "{doc:#}");
    assert_eq!(stats::nonzero_drops(&doc), vec![], "{doc:#}");
}

#[test]
fn an_ipv4_vip_with_ipv6_backends_serves_tcp_and_udp_over_an_ipv6_underlay() {
    let vip4 = Ipv4Addr::new(10, 100, 0, 1);
    let udp = SocketAddr::from((vip4, 5353));
    let mut topo = Topology::builder()
        .backends(3)
        .vip(VipSpec::tcp("web", vip4, PORT).ipv6_targets())
        .vip(VipSpec::udp("dns", vip4, 5353).ipv6_targets())
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    topo.serve_udp_echo(udp).expect("udp servers");
    let (tcp_answers, udp_answers) = topo
        .in_client(|| {
            let tcp: Vec<String> = (0..60u16)
                .map(|i| client::ask_tcp(25_000 + i, SocketAddr::from((vip4, PORT))).expect("tcp"))
                .collect();
            let udp: Vec<String> = (0..30u16)
                .map(|i| client::ask_udp(26_000 + i, udp, "x").expect("udp").0)
                .collect();
            (tcp, udp)
        })
        .expect("client namespace");
    assert_eq!(tally(tcp_answers).len(), 3);
    assert!(tally(udp_answers).len() > 1);
    let doc = topo.stats_json(0).expect("lb stats");
    // Every backend is known to the maps by its IPv6 address.
    for be in topo.backends() {
        assert!(
            stats::sum_for(&doc, "new_flows", "backend", &be.addr6.to_string()) > 0,
            "{} reached by its IPv6 address: {doc:#}",
            be.addr6
        );
    }
    assert_eq!(stats::sum(&doc, "new_flows", "backend"), 90, "{doc:#}");
    assert_eq!(stats::nonzero_drops(&doc), vec![], "{doc:#}");
}

/// Fast checks: two passes make a target healthy, two failures unhealthy.
const CHECKS: &str = "health-check-interval=0.5,health-check-timeout=0.3,\
                      healthy-threshold=2,unhealthy-threshold=2,deregistration-delay=0";

fn wait_states(topo: &Topology, group: &str, want: &[(IpAddr, &str)]) {
    let what = format!("targets of {group} in states {want:?}");
    wait_until(Duration::from_secs(20), &what, || {
        let rows = topo.target_health(0, Some(group))?;
        let done = want
            .iter()
            .all(|&(a, st)| health::of(&rows, a).is_some_and(|r| r.state == st));
        Ok(if done {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(
                rows.iter()
                    .map(|r| r.summary())
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn health_checks_through_the_data_path_work_over_ipv6_encapsulation() {
    let vip4 = Ipv4Addr::new(10, 100, 0, 1);
    let mut topo = Topology::builder()
        .backends(2)
        .vip(
            VipSpec::tcp("web6", VIP6, PORT)
                .ipv6_targets()
                .group_options(CHECKS),
        )
        .vip(
            VipSpec::tcp("web4", vip4, 81)
                .ipv6_targets()
                .group_options(CHECKS),
        )
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    topo.serve_tcp_lines(81).expect("servers");
    let (b0, b1) = (
        IpAddr::from(topo.backend(0).addr6),
        IpAddr::from(topo.backend(1).addr6),
    );
    // IPv6 probes in IPv6 and IPv4 probes in IPv6 reach the servers through the VIP.
    wait_states(&topo, "web6", &[(b0, "healthy"), (b1, "healthy")]);
    wait_states(&topo, "web4", &[(b0, "healthy"), (b1, "healthy")]);
    let doc = topo.stats_json(0).expect("lb stats");
    assert!(
        doc["health_check_probes"]["encapsulated"].as_u64() > Some(0),
        "{doc:#}"
    );
    // Positive control: a backend whose application stops is found unhealthy through the
    // same path, and client connections then avoid it.
    topo.stop_server(1, PORT).expect("stopping a server");
    wait_states(&topo, "web6", &[(b0, "healthy"), (b1, "unhealthy")]);
    // The maps follow the registry a few milliseconds later.
    wait_until(
        Duration::from_secs(20),
        "backend-2 out of web6's ring",
        || {
            let doc = topo.stats_json(0)?;
            // web6 is the IPv6 VIP: its address is written in brackets.
            let web6 = doc["vips"]
                .as_array()
                .and_then(|v| {
                    v.iter()
                        .find(|v| v["vip"].as_str().is_some_and(|a| a.starts_with('[')))
                })
                .cloned()
                .unwrap_or_default();
            let entries = stats::backends(&web6);
            let b1 = b1.to_string();
            let mine: Vec<_> = entries.iter().filter(|b| b.addr == b1).collect();
            Ok(if !mine.is_empty() && mine.iter().all(|b| !b.in_ring) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(format!("{entries:?}"))
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let answers = topo
        .in_client(|| {
            (0..20u16)
                .map(|i| client::ask_tcp(27_000 + i, vip6()).expect("connection"))
                .collect::<Vec<_>>()
        })
        .expect("client namespace");
    assert_eq!(
        tally(answers).keys().cloned().collect::<Vec<_>>(),
        vec![topo.backend(0).name.clone()]
    );
}

#[test]
fn a_backend_without_lb_decap_is_named_as_such_over_ipv6_encapsulation() {
    let vip4 = Ipv4Addr::new(10, 100, 0, 1);
    let mut topo = Topology::builder()
        .backends(2)
        .vip(
            VipSpec::tcp("web6", VIP6, PORT)
                .ipv6_targets()
                .group_options(CHECKS),
        )
        .vip(
            VipSpec::tcp("web4", vip4, 81)
                .ipv6_targets()
                .group_options(CHECKS),
        )
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    topo.serve_tcp_lines(81).expect("servers");
    topo.stop_decap(1).expect("stopping backend-2's lb decap");
    let (b0, b1) = (
        IpAddr::from(topo.backend(0).addr6),
        IpAddr::from(topo.backend(1).addr6),
    );
    // IPv6-in-IPv6 and IPv4-in-IPv6 probes: backend-2's kernel answers both with ICMPv6
    // parameter problem (unrecognised next header). Backend-1, with lb decap, is the control.
    for group in ["web6", "web4"] {
        wait_states(&topo, group, &[(b0, "healthy"), (b1, "unhealthy")]);
        let rows = topo
            .target_health(0, Some(group))
            .expect("lb targets health");
        let r = health::of(&rows, b1).expect("listed");
        let description = r.description.clone().unwrap_or_default();
        assert!(
            description.contains("does not decapsulate IP-in-IPv6")
                && description.contains("lb decap"),
            "{group}: {r:?}"
        );
        println!("{group}: {description}");
    }
}
