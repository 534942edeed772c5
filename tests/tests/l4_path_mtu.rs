//! Path-MTU discovery through the tunnel: when full-size client segments no longer fit after
//! the 20-byte outer header, lb_xdp answers them with ICMP "fragmentation needed" and the
//! client's TCP shrinks its segments instead of stalling (the classic IPIP black hole).
//! Needs root and the `lb` binary.
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use lb_tests::{Topology, VipSpec, client, netns};

#[test]
fn oversized_segments_are_answered_with_icmp_and_the_transfer_completes() {
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 100, 0, 1), 80);
    let mut topo = Topology::builder()
        .backends(1)
        .vip(VipSpec::tcp("web", *vip.ip(), vip.port()))
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(80).expect("servers");
    // The harness gives the underlay 20 bytes of headroom; take it away on the balancer's
    // link, so a 1500-byte client packet becomes 1520 bytes that do not fit.
    let lb_ns = topo.lb(0).node.ns.clone();
    let out = netns::run_in(&lb_ns, "ip", ["link", "set", "dev", "eth0", "mtu", "1500"])
        .expect("ip link set mtu");
    assert!(out.status.success(), "{out:?}");
    let backend = topo.backend(0).name.clone();

    let answer = topo
        .in_client(|| -> anyhow::Result<String> {
            let stream = client::tcp_connect_from(46_000, vip, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut line = vec![b'x'; 64 * 1024];
            line.push(b'\n');
            (&stream).write_all(&line)?;
            let mut answer = String::new();
            BufReader::new(&stream).read_line(&mut answer)?;
            Ok(answer.trim().to_string())
        })
        .expect("client namespace")
        .expect("64 KiB through a path whose MTU shrank (a stall here means no ICMP)");
    assert_eq!(answer, backend);

    let stats = topo.stats_json(0).expect("lb stats");
    let icmp = stats["reasons"]["tx_icmp_too_big"]
        .as_u64()
        .expect("counter");
    assert!(
        icmp >= 1,
        "no ICMP fragmentation-needed was sent: {stats:#}"
    );
    assert_eq!(
        stats["reasons"]["drop_mtu"].as_u64(),
        Some(0),
        "DF-set segments are answered, not silently dropped"
    );
}
