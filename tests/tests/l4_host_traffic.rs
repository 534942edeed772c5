//! With lb_xdp attached, traffic that is not for a VIP still reaches the balancer host.
//! Needs root and the `lb` binary.
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use lb_tests::servers::Server;
use lb_tests::{Topology, VipSpec, client};

#[test]
fn ping_and_tcp_to_the_balancer_itself_pass_through_lb_xdp() {
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 100, 0, 1), 80);
    let mut topo = Topology::builder()
        .backends(1)
        .vip(VipSpec::tcp("web", *vip.ip(), vip.port()))
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(80).expect("servers");
    let lb = topo.lb(0).node.clone();
    // A server on the balancer's own address, port 80 too: same port as the VIP, different
    // address, so only the address tells lb_xdp it is not VIP traffic.
    let host_server = Server::tcp_lines(&lb.ns, SocketAddr::from((lb.addr, 80)), "lb-host")
        .expect("server in the balancer namespace");
    topo.keep(host_server);
    let backend = topo.backend(0).name.clone();

    topo.in_client(|| {
        for _ in 0..3 {
            client::ping(lb.addr, Duration::from_secs(5)).expect("ping the balancer");
        }
        for i in 0..5u16 {
            let answer = client::ask_tcp(43_000 + i, SocketAddrV4::new(lb.addr, 80))
                .expect("TCP to the balancer's own address");
            assert_eq!(answer, "lb-host");
        }
        // And the VIP still works alongside.
        assert_eq!(client::ask_tcp(43_100, vip).expect("VIP"), backend);
    })
    .expect("client namespace");
    topo.processes_alive().expect("lb still running");
}
