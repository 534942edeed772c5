//! `lb run` and the balancer's neighbour table: it adds a managed entry for a backend's next
//! hop only where none exists, and never replaces or removes an entry it did not create (an
//! operator's permanent entry for a next hop that does not answer ARP must keep working).
//! Needs root and the `lb` binary.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_tests::netns::run_in;
use lb_tests::topology::mac_of;
use lb_tests::{Topology, VipSpec, client, stats, tally};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);

fn neigh(ns: &str, addr: Ipv4Addr) -> String {
    let out = run_in(
        ns,
        "ip",
        ["-4", "neigh", "show", &addr.to_string(), "dev", "eth0"],
    )
    .expect("ip neigh show");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn an_operators_permanent_neighbour_entry_is_kept_and_used_and_lb_only_removes_its_own() {
    // The operator wrote permanent entries for every backend (the harness's static
    // neighbours). backend-1 answers no ARP at all, so only that entry reaches it. backend-3
    // joins at run time after its entry is deleted, so lb must add a managed one of its own.
    let mut topo = Topology::builder()
        .backends(3)
        .static_neighbours(true)
        .vip(VipSpec::tcp("web", VIP, 80).target(0).target(1))
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(80).expect("servers");
    let lb_ns = topo.lb(0).node.ns.clone();
    let (be1, be2, be3) = (
        topo.backend(0).clone(),
        topo.backend(1).clone(),
        topo.backend(2).clone(),
    );
    let client_addr = topo.client().addr;
    run_in(&be1.ns, "ip", ["link", "set", "eth0", "arp", "off"]).expect("arp off");
    // With ARP off, backend-1 needs a static entry for the client to answer it (DSR).
    run_in(
        &be1.ns,
        "ip",
        [
            "neigh",
            "replace",
            &client_addr.to_string(),
            "lladdr",
            &mac_of(client_addr),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )
    .expect("backend-1's entry for the client");
    let operators = [neigh(&lb_ns, be1.addr), neigh(&lb_ns, be2.addr)];
    for e in &operators {
        assert!(e.contains("PERMANENT") && !e.contains("managed"), "{e}");
    }

    run_in(
        &lb_ns,
        "ip",
        ["neigh", "del", &be3.addr.to_string(), "dev", "eth0"],
    )
    .expect("removing backend-3's entry");
    topo.register(0, "web", 2, None)
        .expect("registering backend-3");
    let ours = neigh(&lb_ns, be3.addr);
    assert!(ours.contains("managed"), "lb added a managed entry: {ours}");

    // Every backend serves through the VIP; nothing was dropped for want of a neighbour.
    let vip = SocketAddrV4::new(VIP, 80);
    let answers = topo
        .in_client(|| {
            (0..60u16)
                .map(|i| client::ask_tcp(41_000 + i, vip).expect("connection through the VIP"))
                .collect::<Vec<_>>()
        })
        .expect("client namespace");
    let counts = tally(answers);
    for be in [&be1, &be2, &be3] {
        assert!(counts.get(&be.name).copied().unwrap_or(0) > 0, "{counts:?}");
    }
    let doc = topo.stats_json(0).expect("lb stats");
    assert_eq!(stats::sum(&doc, "drop_no_route", "reasons"), 0, "{doc:#}");
    assert_eq!(
        [neigh(&lb_ns, be1.addr), neigh(&lb_ns, be2.addr)],
        operators,
        "the operator's entries are untouched while lb runs"
    );

    let status = topo.stop_lb(0).expect("stopping lb run");
    assert!(status.success(), "lb run exited with {status}");
    assert_eq!(
        [neigh(&lb_ns, be1.addr), neigh(&lb_ns, be2.addr)],
        operators,
        "the operator's entries survive lb's shutdown"
    );
    assert_eq!(
        neigh(&lb_ns, be3.addr),
        "",
        "lb removed the entry it created"
    );
}

#[test]
fn managed_entries_a_crashed_run_created_are_removed_by_the_next_clean_shutdown() {
    // No static entries: lb run adds a managed one for each backend.
    let mut topo = Topology::builder()
        .backends(2)
        .vip(VipSpec::tcp("web", VIP, 80))
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(80).expect("servers");
    let lb_ns = topo.lb(0).node.ns.clone();
    let (be1, be2) = (topo.backend(0).clone(), topo.backend(1).clone());
    for be in [&be1, &be2] {
        let e = neigh(&lb_ns, be.addr);
        assert!(e.contains("managed"), "lb run added a managed entry: {e}");
    }

    // A crash leaves them (nothing runs at SIGKILL).
    topo.kill_lb(0).expect("SIGKILL");
    for be in [&be1, &be2] {
        assert!(neigh(&lb_ns, be.addr).contains("managed"));
    }
    // Meanwhile the operator replaces backend-2's with a permanent entry of their own.
    run_in(
        &lb_ns,
        "ip",
        [
            "neigh",
            "replace",
            &be2.addr.to_string(),
            "lladdr",
            &mac_of(be2.addr),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )
    .expect("the operator's entry");
    let operators = neigh(&lb_ns, be2.addr);
    assert!(!operators.contains("managed"), "{operators}");

    let vips = topo.vips().to_vec();
    topo.restart_lb(0, &vips, &[]).expect("restarting lb run");
    let vip = SocketAddrV4::new(VIP, 80);
    topo.in_client(|| client::ask_tcp(41_500, vip).expect("a connection through the VIP"))
        .expect("client namespace");
    let status = topo.stop_lb(0).expect("stopping lb run");
    assert!(status.success(), "lb run exited with {status}");
    assert_eq!(
        neigh(&lb_ns, be1.addr),
        "",
        "the entry the crashed run created is removed by the next clean shutdown"
    );
    assert_eq!(
        neigh(&lb_ns, be2.addr),
        operators,
        "the entry the operator wrote meanwhile is untouched"
    );
}
