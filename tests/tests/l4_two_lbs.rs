//! Two balancers with the same targets agree on every flow (Maglev is a pure function of the
//! target set), so a flow moved between them by the network stays on its backend. Needs root
//! and the `lb` binary.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_tests::{Topology, VipSpec, client, stats};

#[test]
fn two_balancers_send_each_flow_to_the_same_backend() {
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 100, 0, 2), 5353);
    let mut topo = Topology::builder()
        .backends(3)
        .lbs(2)
        .vip(VipSpec::udp("dns", *vip.ip(), vip.port()))
        .build()
        .expect("building the topology");
    topo.serve_udp_echo(vip).expect("udp servers");
    let flows = 40u16;
    let ask_all = || {
        (0..flows)
            .map(|i| client::ask_udp(44_000 + i, vip, "x").expect("udp").0)
            .collect::<Vec<_>>()
    };

    let via_first = topo.in_client(ask_all).expect("client namespace");
    topo.route_vips_via(1)
        .expect("switching the client's route");
    let via_second = topo.in_client(ask_all).expect("client namespace");

    // The second pass really went through the second balancer.
    let second = topo.stats_json(1).expect("lb stats of the second balancer");
    assert_eq!(
        stats::sum(&second, "new_flows", "backend"),
        u64::from(flows),
        "{second:#}"
    );
    let distinct: std::collections::BTreeSet<&String> = via_first.iter().collect();
    assert!(
        distinct.len() > 1,
        "the flows use several backends: {distinct:?}"
    );
    for (i, (a, b)) in via_first.iter().zip(&via_second).enumerate() {
        assert_eq!(a, b, "flow from port {} moved from {a} to {b}", 44_000 + i);
    }
    topo.processes_alive().expect("both lbs still running");
}
