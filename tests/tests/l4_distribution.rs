//! L4 balancing of real TCP connections through lb_xdp: spread over backends, weights, and
//! counters that agree with the traffic. Needs root and the `lb` binary.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_tests::{Topology, VipSpec, client, stats, tally};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const PORT: u16 = 80;

#[test]
fn three_hundred_connections_spread_over_three_backends_and_are_counted() {
    let mut topo = Topology::builder()
        .backends(3)
        .vip(VipSpec::tcp("web", VIP, PORT))
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    let vip = SocketAddrV4::new(VIP, PORT);
    let answers = topo
        .in_client(|| {
            (0..300u16)
                .map(|i| client::ask_tcp(20_000 + i, vip).expect("connection through the VIP"))
                .collect::<Vec<_>>()
        })
        .expect("client namespace");
    let counts = tally(answers);
    assert_eq!(
        counts.len(),
        3,
        "every backend served some connections: {counts:?}"
    );
    for be in topo.backends() {
        let n = counts.get(&be.name).copied().unwrap_or(0);
        assert!(
            (60..=141).contains(&n),
            "{} served {n} of 300 connections, outside 20%..47%: {counts:?}",
            be.name
        );
    }

    let doc = topo.stats_json(0).expect("lb stats --json");
    assert_eq!(
        stats::sum(&doc, "new_flows", "backend"),
        300,
        "per-backend new_flows add up to the connections made: {doc:#}"
    );
    for be in topo.backends() {
        let n = counts[&be.name] as u64;
        assert_eq!(
            stats::sum_for(&doc, "new_flows", "backend", &be.addr.to_string()),
            n,
            "{} ({}) new_flows = connections it answered: {doc:#}",
            be.name,
            be.addr
        );
    }
    assert_eq!(
        stats::nonzero_drops(&doc),
        vec![],
        "no drop counter moved: {doc:#}"
    );
    topo.processes_alive().expect("lb still running");
}

#[test]
fn weights_one_to_three_split_connections_one_to_three() {
    let mut topo = Topology::builder()
        .backends(2)
        .vip(
            VipSpec::tcp("web", VIP, PORT)
                .weighted_target(0, 1)
                .weighted_target(1, 3),
        )
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    let vip = SocketAddrV4::new(VIP, PORT);
    let total = 400u16;
    let answers = topo
        .in_client(|| {
            (0..total)
                .map(|i| client::ask_tcp(21_000 + i, vip).expect("connection through the VIP"))
                .collect::<Vec<_>>()
        })
        .expect("client namespace");
    let counts = tally(answers);
    let light = counts.get(&topo.backend(0).name).copied().unwrap_or(0);
    let heavy = counts.get(&topo.backend(1).name).copied().unwrap_or(0);
    assert_eq!(light + heavy, usize::from(total), "{counts:?}");
    let light_pct = light * 100 / usize::from(total);
    assert!(
        (15..=35).contains(&light_pct),
        "weight 1 of 4 got {light_pct}% (want 25% ± 10 points): {counts:?}"
    );
    let doc = topo.stats_json(0).expect("lb stats --json");
    assert_eq!(
        stats::sum(&doc, "new_flows", "backend"),
        u64::from(total),
        "{doc:#}"
    );
    assert_eq!(
        stats::nonzero_drops(&doc),
        vec![],
        "no drop counter moved: {doc:#}"
    );
    topo.processes_alive().expect("lb still running");
}
