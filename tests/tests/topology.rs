//! The harness itself, without the balancer: namespaces, the bridged segment, servers and
//! clients work, and everything is removed on drop. (Needs root; no `lb` binary.)
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use lb_tests::Topology;
use lb_tests::client::{self, LineClient};
use lb_tests::netns;
use lb_tests::servers::Server;

fn plain_topology(backends: usize) -> Topology {
    Topology::builder()
        .backends(backends)
        .lbs(1)
        .start_lb(false)
        .start_decap(false)
        .build()
        .expect("building the topology")
}

#[test]
fn client_reaches_every_node_on_the_segment() {
    let mut topo = plain_topology(2);
    topo.serve_tcp_lines(7000).expect("servers");
    let targets: Vec<(Ipv4Addr, String)> = topo
        .backends()
        .iter()
        .map(|b| (b.addr, b.name.clone()))
        .collect();
    let lb_addr = topo.lb(0).node.addr;
    topo.in_client(|| {
        client::ping(lb_addr, Duration::from_secs(5)).expect("ping the balancer");
        for (addr, name) in &targets {
            client::ping(*addr, Duration::from_secs(5)).expect("ping a backend");
            let answer = client::ask_tcp(0, SocketAddrV4::new(*addr, 7000)).expect("ask");
            assert_eq!(&answer, name, "the server on {addr} names its backend");
        }
    })
    .expect("running in the client namespace");
}

#[test]
fn a_connection_keeps_its_source_port_and_its_server() {
    let mut topo = plain_topology(1);
    topo.serve_tcp_lines(7000).expect("servers");
    let be = topo.backend(0).clone();
    topo.in_client(|| {
        let mut conn =
            LineClient::connect(40_001, SocketAddrV4::new(be.addr, 7000)).expect("connect");
        assert_eq!(conn.local_addr().port(), 40_001);
        for _ in 0..3 {
            assert_eq!(conn.ask().expect("ask"), be.name);
        }
    })
    .expect("running in the client namespace");
}

#[test]
fn udp_and_http_servers_answer_with_their_name() {
    let mut topo = plain_topology(1);
    let be = topo.backend(0).clone();
    topo.serve_http(8080).expect("http server");
    topo.serve_udp_echo(SocketAddrV4::new(be.addr, 5353))
        .expect("udp server");
    topo.in_client(|| {
        let (status, body) = client::http_get(0, SocketAddrV4::new(be.addr, 8080)).expect("get");
        assert_eq!((status, body.trim()), (200, be.name.as_str()));
        let (name, echo) =
            client::ask_udp(41_000, SocketAddrV4::new(be.addr, 5353), "hello").expect("udp");
        assert_eq!((name.as_str(), echo.as_str()), (be.name.as_str(), "hello"));
    })
    .expect("running in the client namespace");
}

#[test]
fn a_server_in_a_balancer_namespace_is_reachable_at_the_balancer_address() {
    let mut topo = plain_topology(1);
    let lb = topo.lb(0).node.clone();
    let server = Server::tcp_lines(&lb.ns, SocketAddr::from((lb.addr, 7100)), "on-the-lb")
        .expect("server in the lb namespace");
    topo.keep(server);
    let answer = topo
        .in_client(|| client::ask_tcp(0, SocketAddrV4::new(lb.addr, 7100)))
        .expect("running in the client namespace")
        .expect("ask");
    assert_eq!(answer, "on-the-lb");
}

#[test]
fn dropping_the_topology_removes_its_namespaces() {
    let topo = plain_topology(2);
    let names: Vec<String> = [topo.bridge_ns(), &topo.client().ns, &topo.lb(0).node.ns]
        .into_iter()
        .map(str::to_owned)
        .chain(topo.backends().iter().map(|b| b.ns.clone()))
        .collect();
    for ns in &names {
        assert!(
            netns::netns_path(ns).exists(),
            "{ns} exists while the topology lives"
        );
    }
    drop(topo);
    for ns in &names {
        assert!(!netns::netns_path(ns).exists(), "{ns} is gone after drop");
    }
}

#[test]
fn a_panicking_test_still_removes_its_namespaces() {
    let (tx, rx) = std::sync::mpsc::channel();
    let joined = std::thread::spawn(move || {
        let topo = plain_topology(1);
        tx.send(topo.client().ns.clone()).expect("send");
        panic!("deliberate panic with a live topology");
    })
    .join();
    assert!(joined.is_err(), "the thread panicked");
    let ns = rx.recv().expect("namespace name");
    assert!(
        !netns::netns_path(&ns).exists(),
        "{ns} removed during unwinding"
    );
}

#[test]
fn leftovers_of_dead_runs_are_removed_and_nothing_else() {
    netns::require_root().expect("root");
    // A pid that cannot exist (above pid_max's hard limit of 2^22).
    let dead = "lbt-4194305-0-cl";
    let foreign = format!("lbx-{}-0-cl", std::process::id());
    netns::create_netns(dead).expect("create dead leftover");
    netns::create_netns(&foreign).expect("create foreign namespace");
    // Building a topology runs the cleanup.
    let _topo = plain_topology(1);
    let dead_gone = !Path::new(&netns::netns_path(dead)).exists();
    let foreign_kept = netns::netns_path(&foreign).exists();
    netns::delete_netns(&foreign).expect("delete foreign");
    netns::delete_netns(dead).expect("delete dead");
    assert!(dead_gone, "namespace of a dead run removed");
    assert!(
        foreign_kept,
        "a namespace not named by this harness is left alone"
    );
}
