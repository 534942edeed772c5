//! ICMP errors about VIP flows reach the backend that owns the flow: a router's "fragmentation
//! needed" (IPv4) or "packet too big" (ICMPv6) quoting a backend's reply (from the VIP to the
//! client) arrives at the balancer, which encapsulates it to that flow's backend, whose kernel
//! receives it byte for byte and lowers its path MTU to the client: path-MTU discovery works
//! for DSR connections. Needs root and the `lb` binary.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::ControlFlow;
use std::time::Duration;

use lb_tests::client::{LineClient, RawCapture, send_icmpv6, send_raw_ipv4};
use lb_tests::netns::{self, run_in};
use lb_tests::wait::wait_until;
use lb_tests::{Topology, VipSpec};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
const PORT: u16 = 80;

/// RFC 1071 checksum.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header (no options) with its checksum.
fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, tot_len: u16) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&tot_len.to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// The sequence number after the data the server sent last on the connection to
/// `client_port` (its `snd_nxt` once the client acknowledged it), from TCP segments seen by
/// `cap` (`v6`: segments without the IPv6 header).
fn server_next_seq(cap: &RawCapture, v6: bool, client_port: u16) -> u32 {
    let seg = cap
        .wait_for(Duration::from_secs(5), |p| {
            let tcp = if v6 {
                p
            } else {
                &p[usize::from(p[0] & 0x0f) * 4..]
            };
            let data_off = usize::from(tcp[12] >> 4) * 4;
            let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
            u16::from_be_bytes([tcp[0], tcp[1]]) == PORT
                && dport == client_port
                && tcp.len() > data_off
        })
        .expect("the server's answer was seen");
    let tcp = if v6 {
        &seg[..]
    } else {
        &seg[usize::from(seg[0] & 0x0f) * 4..]
    };
    let len = tcp.len() - usize::from(tcp[12] >> 4) * 4;
    u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]).wrapping_add(len as u32)
}

/// Waits until backend `ns` routes `client` with path MTU `mtu` (`ip route get` shows it).
fn wait_for_pmtu(ns: &str, client: IpAddr, mtu: u32) {
    let family = if client.is_ipv6() { "-6" } else { "-4" };
    let want = format!("mtu {mtu}");
    wait_until(
        Duration::from_secs(10),
        &format!("{want} towards {client}"),
        || {
            let out = run_in(ns, "ip", [family, "route", "get", &client.to_string()])?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            Ok(if text.contains(&want) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(text)
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
}

fn has_pmtu(ns: &str, client: IpAddr, mtu: u32) -> bool {
    let family = if client.is_ipv6() { "-6" } else { "-4" };
    run_in(ns, "ip", [family, "route", "get", &client.to_string()])
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("mtu {mtu}")))
        .unwrap_or(false)
}

#[test]
fn a_frag_needed_quoting_a_vip_flow_reaches_that_flows_backend_intact() {
    let mut topo = Topology::builder()
        .backends(3)
        .vip(VipSpec::tcp("web", VIP, PORT))
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    let client = topo.client().clone();
    let client_port = 45_000;
    let (cap, mut conn, who) = topo
        .in_client(|| {
            let cap = RawCapture::tcp(false).expect("raw TCP socket");
            let mut c = LineClient::connect(client_port, SocketAddr::from((VIP, PORT)))
                .expect("connection through the VIP");
            let who = c.ask().expect("answer");
            (cap, c, who)
        })
        .expect("client namespace");
    let seq = server_next_seq(&cap, false, client_port);
    let owner = topo
        .backends()
        .iter()
        .position(|b| b.name == who)
        .expect("a backend answered");
    let captures: Vec<RawCapture> = topo
        .backends()
        .iter()
        .map(|b| {
            netns::in_netns(&b.ns, || RawCapture::icmp(false))
                .expect("ns")
                .expect("raw ICMP")
        })
        .collect();
    assert!(!has_pmtu(&topo.backend(owner).ns, client.addr.into(), 1300));

    // From a router on the path: the backend's reply (VIP:80 → client) did not fit.
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&1300u16.to_be_bytes());
    icmp.extend_from_slice(&ipv4_header(VIP, client.addr, 6, 1500));
    icmp.extend_from_slice(&PORT.to_be_bytes());
    icmp.extend_from_slice(&client_port.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut packet = ipv4_header(client.addr, VIP, 1, (20 + icmp.len()) as u16);
    packet.extend_from_slice(&icmp);
    topo.in_client(|| send_raw_ipv4(&packet))
        .expect("client namespace")
        .expect("sending the ICMP error");

    let got = captures[owner]
        .wait_for(Duration::from_secs(5), |p| {
            p.len() > 20 && p[20..] == icmp[..]
        })
        .unwrap_or_else(|| panic!("{who} did not receive the ICMP error"));
    assert_eq!(&got[12..20], &packet[12..20], "addresses as sent");
    for (j, cap) in captures.iter().enumerate().filter(|(j, _)| *j != owner) {
        assert!(
            cap.wait_for(Duration::from_millis(300), |p| p.len() > 20
                && p[20..] == icmp[..])
                .is_none(),
            "backend {j} got an ICMP error about another backend's flow"
        );
    }
    // The owner's TCP took it: its path MTU to the client is now 1300.
    wait_for_pmtu(&topo.backend(owner).ns, client.addr.into(), 1300);
    let doc = topo.stats_json(0).expect("lb stats");
    assert_eq!(
        doc["reasons"]["icmp_to_backend"].as_u64(),
        Some(1),
        "{doc:#}"
    );
    assert_eq!(conn.ask().expect("the connection still works"), who);
}

#[test]
fn a_packet_too_big_quoting_an_ipv6_vip_flow_reaches_that_flows_backend_intact() {
    let mut topo = Topology::builder()
        .backends(3)
        .vip(VipSpec::tcp("web6", VIP6, PORT).ipv6_targets())
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    let client = topo.client().clone();
    let client_port = 45_001;
    let (cap, mut conn, who) = topo
        .in_client(|| {
            let cap = RawCapture::tcp(true).expect("raw TCP socket");
            let mut c = LineClient::connect(client_port, SocketAddr::from((VIP6, PORT)))
                .expect("connection through the VIP");
            let who = c.ask().expect("answer");
            (cap, c, who)
        })
        .expect("client namespace");
    let seq = server_next_seq(&cap, true, client_port);
    let owner = topo
        .backends()
        .iter()
        .position(|b| b.name == who)
        .expect("a backend answered");
    let captures: Vec<RawCapture> = topo
        .backends()
        .iter()
        .map(|b| {
            netns::in_netns(&b.ns, || RawCapture::icmp(true))
                .expect("ns")
                .expect("raw")
        })
        .collect();
    assert!(!has_pmtu(
        &topo.backend(owner).ns,
        client.addr6.into(),
        1400
    ));

    let mut msg = vec![2, 0, 0, 0];
    msg.extend_from_slice(&1400u32.to_be_bytes());
    let mut quoted = vec![0x60, 0, 0, 0];
    quoted.extend_from_slice(&1460u16.to_be_bytes());
    quoted.extend_from_slice(&[6, 64]);
    quoted.extend_from_slice(&VIP6.octets());
    quoted.extend_from_slice(&client.addr6.octets());
    msg.extend_from_slice(&quoted);
    msg.extend_from_slice(&PORT.to_be_bytes());
    msg.extend_from_slice(&client_port.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    topo.in_client(|| send_icmpv6(VIP6, &msg))
        .expect("client namespace")
        .expect("sending the packet too big");
    // The kernel wrote the checksum; everything else arrives as sent.
    let same = |p: &[u8]| p.len() == msg.len() && p[..2] == msg[..2] && p[4..] == msg[4..];
    captures[owner]
        .wait_for(Duration::from_secs(5), same)
        .unwrap_or_else(|| panic!("{who} did not receive the packet too big"));
    for (j, cap) in captures.iter().enumerate().filter(|(j, _)| *j != owner) {
        assert!(
            cap.wait_for(Duration::from_millis(300), same).is_none(),
            "backend {j} got a packet too big about another backend's flow"
        );
    }
    wait_for_pmtu(&topo.backend(owner).ns, client.addr6.into(), 1400);
    let doc = topo.stats_json(0).expect("lb stats");
    assert_eq!(
        doc["reasons"]["icmp_to_backend"].as_u64(),
        Some(1),
        "{doc:#}"
    );
    assert_eq!(conn.ask().expect("the connection still works"), who);
}
