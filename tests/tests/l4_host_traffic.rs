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

#[test]
fn stopped_lb_run_detaches_lb_xdp_and_removes_its_pins() {
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 100, 0, 1), 80);
    let mut topo = Topology::builder()
        .backends(1)
        .vip(VipSpec::tcp("web", *vip.ip(), vip.port()))
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(80).expect("servers");
    let lb = topo.lb(0).node.clone();
    let pin = topo.lb(0).pin_path.clone();
    let xdp_on_eth0 = |ns: &str| {
        let out = lb_tests::netns::run_in(ns, "ip", ["-d", "link", "show", "dev", "eth0"])
            .expect("ip link show");
        String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
    };
    assert!(xdp_on_eth0(&lb.ns), "lb_xdp is attached while lb run runs");
    assert!(
        pin.join("LB_VIPS").exists(),
        "maps are pinned at {}",
        pin.display()
    );
    let backend = topo.backend(0).name.clone();
    let answer = topo
        .in_client(|| client::ask_tcp(45_000, vip))
        .expect("client namespace");
    assert_eq!(answer.expect("VIP before stopping"), backend);

    let status = topo.stop_lb(0).expect("stopping lb run");
    assert!(
        status.success(),
        "lb run exits cleanly on SIGTERM: {status}"
    );
    assert!(!xdp_on_eth0(&lb.ns), "lb_xdp is detached");
    let left: Vec<_> = std::fs::read_dir(&pin)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "pins removed, found {left:?}");
    // The balancer host itself is still reachable: nothing was left half-attached.
    topo.in_client(|| client::ping(lb.addr, Duration::from_secs(5)))
        .expect("client namespace")
        .expect("ping after stop");
}
