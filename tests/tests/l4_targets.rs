//! Changing targets of a running `lb run` (`lb targets register|deregister`) with real
//! connections open. Needs root and the `lb` binary.
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_tests::client::{self, LineClient};
use lb_tests::{Topology, VipSpec, tally};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const PORT: u16 = 80;

#[test]
fn long_lived_connection_stays_on_its_backend_while_targets_change() {
    // Backends 0..=2 are targets at start; backend 3 joins later.
    let mut topo = Topology::builder()
        .backends(4)
        .vip(VipSpec::tcp("web", VIP, PORT).target(0).target(1).target(2))
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    let vip = SocketAddrV4::new(VIP, PORT);
    let names: Vec<String> = topo.backends().iter().map(|b| b.name.clone()).collect();

    let mut conn = topo
        .in_client(|| LineClient::connect(30_000, vip))
        .expect("client namespace")
        .expect("long-lived connection");
    let serving = conn.ask().expect("first answer");
    let serving_idx = names
        .iter()
        .position(|n| *n == serving)
        .expect("a known backend");
    assert_ne!(serving_idx, 3, "backend-4 is not a target yet");
    // Companions: adding a backend moves about a quarter of the ring's slots, so with twenty
    // more connections some surely sit on moved slots and only the flow table keeps them.
    let mut companions: Vec<(LineClient, String)> = topo
        .in_client(|| {
            (1..=20u16)
                .map(|i| {
                    let mut c = LineClient::connect(30_000 + i, vip).expect("connect");
                    let who = c.ask().expect("first answer");
                    (c, who)
                })
                .collect()
        })
        .expect("client namespace");

    topo.register(0, "web", 3, None)
        .expect("lb targets register");
    assert_eq!(conn.ask().expect("answer after register"), serving);
    for (c, who) in &mut companions {
        assert_eq!(&c.ask().expect("companion after register"), who);
    }

    let removed = (0..3).find(|&j| j != serving_idx).expect("another backend");
    topo.deregister(0, "web", removed)
        .expect("lb targets deregister");
    for _ in 0..5 {
        assert_eq!(conn.ask().expect("answer after deregister"), serving);
    }
    for (c, who) in companions.iter_mut().filter(|(_, w)| *w != names[removed]) {
        assert_eq!(&c.ask().expect("companion after deregister"), who);
    }

    // The changes took effect for new connections: the added backend serves some, the
    // removed one none.
    let answers = topo
        .in_client(|| {
            (0..90u16)
                .map(|i| client::ask_tcp(31_000 + i, vip).expect("new connection"))
                .collect::<Vec<_>>()
        })
        .expect("client namespace");
    let counts = tally(answers);
    assert!(
        counts.contains_key(&names[3]),
        "the registered backend serves: {counts:?}"
    );
    assert!(
        !counts.contains_key(&names[removed]),
        "the deregistered one does not: {counts:?}"
    );
    assert_eq!(conn.ask().expect("answer at the end"), serving);
    topo.processes_alive().expect("lb still running");
}

#[test]
fn removed_backend_gets_no_new_connections_and_others_keep_theirs() {
    let mut topo = Topology::builder()
        .backends(3)
        .vip(VipSpec::tcp("web", VIP, PORT))
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    let vip = SocketAddrV4::new(VIP, PORT);
    let removed = topo.backend(0).name.clone();

    let mut conns: Vec<(LineClient, String)> = topo
        .in_client(|| {
            (0..30u16)
                .map(|i| {
                    let mut c = LineClient::connect(32_000 + i, vip).expect("connect");
                    let who = c.ask().expect("first answer");
                    (c, who)
                })
                .collect()
        })
        .expect("client namespace");
    let served: BTreeSet<&str> = conns.iter().map(|(_, w)| w.as_str()).collect();
    assert_eq!(
        served.len(),
        3,
        "30 connections reached all three backends: {served:?}"
    );

    topo.deregister(0, "web", 0).expect("lb targets deregister");

    let mut kept = 0;
    for (conn, who) in conns.iter_mut().filter(|(_, w)| *w != removed) {
        assert_eq!(
            &conn.ask().expect("established connection still answers"),
            who
        );
        kept += 1;
    }
    assert!(kept > 0);

    let answers = topo
        .in_client(|| {
            (0..60u16)
                .map(|i| client::ask_tcp(33_000 + i, vip).expect("new connection"))
                .collect::<Vec<_>>()
        })
        .expect("client namespace");
    let counts = tally(answers);
    assert!(
        !counts.contains_key(&removed),
        "{removed} got new connections: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), 60);
    topo.processes_alive().expect("lb still running");
}
