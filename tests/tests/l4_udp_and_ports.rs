//! UDP VIPs and port-0 (all ports) VIPs through lb_xdp. Needs root and the `lb` binary.
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use lb_tests::servers::Server;
use lb_tests::{Topology, VipSpec, client, stats, tally};

#[test]
fn udp_vip_echoes_from_several_source_ports_spread_over_backends() {
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 100, 0, 2), 5353);
    let mut topo = Topology::builder()
        .backends(3)
        .vip(VipSpec::udp("dns", *vip.ip(), vip.port()))
        .build()
        .expect("building the topology");
    topo.serve_udp_echo(vip).expect("udp servers");
    let flows = 60u16;
    let answers = topo
        .in_client(|| {
            (0..flows)
                .map(|i| {
                    let payload = format!("flow-{i}");
                    let (who, echo) = client::ask_udp(40_000 + i, vip, &payload).expect("udp");
                    assert_eq!(echo, payload, "the payload comes back");
                    // The same 5-tuple again: the same backend.
                    let (again, _) = client::ask_udp(40_000 + i, vip, &payload).expect("udp");
                    assert_eq!(again, who, "flow {i} stays on its backend");
                    who
                })
                .collect::<Vec<_>>()
        })
        .expect("client namespace");
    let counts = tally(answers);
    assert_eq!(
        counts.len(),
        3,
        "all three backends answered some flows: {counts:?}"
    );

    let doc = topo.stats_json(0).expect("lb stats --json");
    assert_eq!(
        stats::sum(&doc, "new_flows", "backend"),
        u64::from(flows),
        "one new flow per source port: {doc:#}"
    );
    assert_eq!(
        stats::nonzero_drops(&doc),
        vec![],
        "no drop counter moved: {doc:#}"
    );
    topo.processes_alive().expect("lb still running");
}

#[test]
fn port_zero_vip_forwards_every_destination_port() {
    let vip_addr = Ipv4Addr::new(10, 100, 0, 3);
    let ports = [7001u16, 7002, 8443];
    let mut topo = Topology::builder()
        .backends(3)
        .vip(VipSpec::tcp("any", vip_addr, 0))
        .build()
        .expect("building the topology");
    for port in ports {
        topo.serve_tcp_lines(port).expect("servers");
    }
    let names: Vec<String> = topo.backends().iter().map(|b| b.name.clone()).collect();
    let answers = topo
        .in_client(|| {
            let mut answers = Vec::new();
            for (p, port) in ports.iter().enumerate() {
                for i in 0..10u16 {
                    let src = 41_000 + 100 * p as u16 + i;
                    let dst = SocketAddrV4::new(vip_addr, *port);
                    answers.push(client::ask_tcp(src, dst).expect("connection to a port-0 VIP"));
                }
            }
            answers
        })
        .expect("client namespace");
    assert_eq!(answers.len(), 30);
    assert!(answers.iter().all(|a| names.contains(a)), "{answers:?}");
    let doc = topo.stats_json(0).expect("lb stats --json");
    assert_eq!(stats::sum(&doc, "new_flows", "backend"), 30, "{doc:#}");
    assert_eq!(
        stats::nonzero_drops(&doc),
        vec![],
        "no drop counter moved: {doc:#}"
    );
}

#[test]
fn port_zero_tcp_vip_does_not_balance_udp() {
    // The VIP is only TCP: UDP to the same address must not be balanced. The client has a
    // route via the balancer, which is a router: the datagram reaches no backend (no route),
    // and nothing answers. Checked through the counters: no new flow for UDP.
    let vip_addr = Ipv4Addr::new(10, 100, 0, 3);
    let mut topo = Topology::builder()
        .backends(1)
        .vip(VipSpec::tcp("any", vip_addr, 0))
        .build()
        .expect("building the topology");
    let be = topo.backend(0).clone();
    let server = Server::udp_echo(&be.ns, SocketAddr::from((vip_addr, 9000)), &be.name)
        .expect("udp server on the backend");
    let passed_before = stats::sum(
        &topo.stats_json(0).expect("lb stats --json"),
        "pass_not_vip",
        "",
    );
    let got = topo
        .in_client(|| client::ask_udp_tries(42_000, SocketAddrV4::new(vip_addr, 9000), "x", 2))
        .expect("client namespace");
    drop(server);
    assert!(
        got.is_err(),
        "UDP to a TCP-only VIP was not balanced: {got:?}"
    );
    let doc = topo.stats_json(0).expect("lb stats --json");
    assert_eq!(stats::sum(&doc, "new_flows", "backend"), 0, "{doc:#}");
    // Positive control: the datagrams did reach lb_xdp, which passed them as "not a VIP"
    // (without this, the checks above would also pass if they never got to the balancer).
    assert!(
        stats::sum(&doc, "pass_not_vip", "") > passed_before,
        "lb_xdp saw the UDP datagrams and passed them: {doc:#}"
    );
    // And TCP to the same address and any port is balanced, on this very topology.
    topo.serve_tcp_lines(9000).expect("tcp server");
    let answer = topo
        .in_client(|| client::ask_tcp(42_001, SocketAddrV4::new(vip_addr, 9000)))
        .expect("client namespace")
        .expect("TCP to the port-0 VIP is balanced");
    assert_eq!(answer, be.name);
}
