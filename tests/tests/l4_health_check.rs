//! Health-check probes through the DSR data path (`lb_hc_encap`), end to end.
//!
//! ```text
//!   [client ns 10.0.0.1]  ── the LB's default gateway (no forwarding, no VIP) ──┐
//!   [lb ns 10.0.0.2]      lb_xdp (ingress) + lb_hc_encap (tcx egress) on eth0  ├ one bridge
//!   [backend-1 10.0.0.11] VIP on lo, lb_decap, line server on VIP:PORT         │
//!   [backend-2 10.0.0.12] VIP on lo, NO lb_decap, line server on VIP:PORT ─────┘
//! ```
//!
//! The LB namespace loads the balancer through the `lb` library (as `lb run` does), writes
//! backend entries, and opens probe sockets with `SO_MARK = hc_mark(id)` to `VIP:PORT`. The
//! kernel routes them to the default gateway; `lb_hc_encap` must turn them into IP-in-IP to
//! the backend the mark names. Its tx checksum offload is left on (unlike the other
//! topologies), so probes leave with partial TCP checksums, as on a real host.
//!
//! Needs root; everything (namespaces, veths, attachments) goes away on drop, also on panic.
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb::{
    cli::XdpMode,
    dataplane::{Balancer, Decap, LbAddrs, Maps, Sizes},
    l4::L4Maps,
};
use lb_common::{Backend, DecapReason, HcReason, Reason, addr_to_map, hc_mark};
use lb_tests::{
    Topology, VipSpec, client,
    netns::{self, run_in},
    servers::Server,
};

/// The VIP (in the harness's VIP range) and its port.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const PORT: u16 = 8080;
/// Backend ids the test gives the two backends (not 0 and 1, so an id mix-up shows).
const BE1_ID: u32 = 3;
const BE2_ID: u32 = 6;
/// An id within the table whose entry stays empty.
const EMPTY_ID: u32 = 5;
/// Size of the backend table.
const MAX_BACKENDS: u32 = 16;
/// How long a probe that must fail is given.
const SHORT: Duration = Duration::from_secs(2);

/// The topology above with the balancer loaded; fields drop in order (programs first).
struct HcBed {
    balancer: Balancer,
    maps: Maps,
    decap: Decap,
    _servers: Vec<Server>,
    topo: Topology,
}

impl HcBed {
    fn build() -> Result<Self> {
        let topo = Topology::builder()
            .backends(2)
            .vip(VipSpec::tcp("web", VIP, PORT))
            .start_lb(false)
            .start_decap(false)
            .static_neighbours(true)
            .build()?;
        // The topology gives the balancer a default route via the client (its upstream
        // router), the way out for probes to the VIP.
        let lb = topo.lb(0).node.clone();
        run_in(&lb.ns, "ethtool", ["-K", "eth0", "tx", "on"])?;

        let (be1, be2) = (topo.backend(0).clone(), topo.backend(1).clone());
        let servers = vec![
            Server::tcp_lines(&be1.ns, SocketAddr::from((VIP, PORT)), &be1.name)?,
            Server::tcp_lines(&be2.ns, SocketAddr::from((VIP, PORT)), &be2.name)?,
        ];
        let decap = netns::in_netns(&be1.ns, || -> Result<Decap> {
            let mut d = Decap::load(&[be1.addr.into()])?;
            d.attach("eth0", XdpMode::Native)?;
            Ok(d)
        })??;

        let sizes = Sizes {
            max_flows: 1024,
            ring_size: 13,
            max_vips: 4,
            max_backends: MAX_BACKENDS,
        };
        let (balancer, mut maps) = netns::in_netns(&lb.ns, || -> Result<(Balancer, Maps)> {
            let (mut b, maps) = Balancer::load(sizes, LbAddrs::one(lb.addr.into()), None)?;
            b.attach("eth0", XdpMode::Native)
                .context("attaching lb_xdp")?;
            b.attach_hc_encap("eth0").context("attaching lb_hc_encap")?;
            Ok((b, maps))
        })??;
        // backend-1 is out of service (flags 0), as an unhealthy target is: it must still be
        // probed, or it could never be found healthy again.
        maps.set_backend(BE1_ID, backend_entry(be1.addr, 0))?;
        maps.set_backend(BE2_ID, backend_entry(be2.addr, lb_common::BACKEND_F_ACTIVE))?;
        Ok(Self {
            balancer,
            maps,
            decap,
            _servers: servers,
            topo,
        })
    }

    fn lb_ns(&self) -> &str {
        &self.topo.lb(0).node.ns
    }

    fn hc(&self) -> Vec<(HcReason, u64)> {
        self.maps.hc_totals().expect("reading LB_HC_STATS")
    }

    fn hc_count(&self, reason: HcReason) -> u64 {
        count_of(&self.hc(), reason)
    }

    fn decapsulated(&self) -> u64 {
        count_of(
            &self.decap.counters().expect("reading LB_DECAP_STATS"),
            DecapReason::Decapsulated,
        )
    }

    /// A probe with `mark` (or none) from the LB namespace: connect, send a line, read the
    /// answer line.
    fn probe(&self, mark: Option<u32>, timeout: Duration) -> Result<String> {
        let dst = SocketAddrV4::new(VIP, PORT);
        netns::in_netns(self.lb_ns(), || -> Result<String> {
            let stream = match mark {
                Some(m) => client::tcp_connect_marked(m, dst, timeout)?,
                None => client::tcp_connect_from(0, dst, timeout)?,
            };
            stream.set_read_timeout(Some(timeout))?;
            let mut reader = BufReader::new(stream);
            reader.get_mut().write_all(b"are you there?\n")?;
            let mut answer = String::new();
            if reader.read_line(&mut answer)? == 0 {
                bail!("closed without an answer");
            }
            Ok(answer.trim_end().to_owned())
        })?
    }
}

fn backend_entry(addr: Ipv4Addr, flags: u8) -> Backend {
    let (family, addr) = addr_to_map(addr.into());
    Backend {
        addr,
        port: PORT.to_be(),
        flags,
        family,
        vip_id: 0,
        weight: 1,
    }
}

fn count_of<R: PartialEq + Copy>(totals: &[(R, u64)], reason: R) -> u64 {
    totals
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |&(_, n)| n)
}

fn mark_of(id: u32) -> u32 {
    hc_mark(id).expect("id within the mark block")
}

/// A counter of `/proc/net/snmp` (e.g. `Tcp`, `InCsumErrors`) in namespace `ns`.
fn snmp(ns: &str, group: &str, field: &str) -> u64 {
    let text = netns::in_netns(ns, || std::fs::read_to_string("/proc/thread-self/net/snmp"))
        .and_then(|r| r.context("reading /proc/thread-self/net/snmp"))
        .unwrap_or_else(|e| panic!("snmp of {ns}: {e:#}"));
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (lines.next(), lines.next());
    let (Some(names), Some(values)) = (names, values) else {
        panic!("no {group} lines in the snmp of {ns}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == field)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {group} {field} in the snmp of {ns}"))
}

#[test]
fn health_check_probe_marked_for_a_backend_reaches_its_vip_server_and_the_reply_returns() {
    let bed = HcBed::build().expect("building the topology");
    let be1 = bed.topo.backend(0).clone();
    let csum_errors = snmp(&be1.ns, "Tcp", "InCsumErrors");
    let (decapsulated, passed_replies) = (bed.decapsulated(), {
        let r = bed.maps.reason_totals().expect("reading LB_REASONS");
        count_of(&r, Reason::PassNotVip)
    });

    // Frames on the segment, captured at backend-1's bridge port (no XDP there).
    let tap = netns::in_netns(bed.topo.bridge_ns(), || PacketTap::open(&be1.bridge_port))
        .and_then(|r| r)
        .expect("packet socket in the bridge namespace");

    let answer = bed
        .probe(Some(mark_of(BE1_ID)), client::TIMEOUT)
        .expect("the probe through the tunnel to backend-1");
    assert_eq!(
        answer, be1.name,
        "answered by the backend the mark names (out of service, but probed)"
    );

    // SYN, the line, ACKs and FIN: every segment of the probe went through the tunnel…
    let encapsulated = bed.hc_count(HcReason::Encapsulated);
    assert!(encapsulated >= 3, "encapsulated only {encapsulated}");
    assert!(
        bed.decapsulated() - decapsulated >= 3,
        "backend-1's lb_decap did not decapsulate the probe's segments"
    );
    // … no probe was dropped, and the replies (from the VIP to the LB host, not a VIP
    // destination) were passed to the LB's stack by lb_xdp.
    let drops: Vec<_> = bed
        .hc()
        .into_iter()
        .filter(|&(r, n)| r.label().starts_with("drop") && n != 0)
        .collect();
    assert!(drops.is_empty(), "probe drops: {drops:?}");
    let r = bed.maps.reason_totals().expect("reading LB_REASONS");
    assert!(count_of(&r, Reason::PassNotVip) > passed_replies);
    // The probe left with tx checksum offload on: its segments crossed the wire IP-in-IP
    // with the inner TCP checksum still partial (only the pseudo-header sum)…
    let probes: Vec<bool> = tap
        .frames()
        .iter()
        .filter_map(|f| inner_tcp_checksum_ok(f, be1.addr))
        .collect();
    assert!(!probes.is_empty(), "no IP-in-IP probe seen on the wire");
    assert!(
        probes.iter().any(|ok| !ok),
        "precondition: no probe segment left with a partial checksum, so this test no longer \
         covers CHECKSUM_PARTIAL (complete: {probes:?})"
    );
    // … and the backend's TCP found nothing wrong with them (CHECKSUM_PARTIAL survives
    // veth, lb_decap's XDP_PASS, and counts as verified).
    assert_eq!(
        snmp(&be1.ns, "Tcp", "InCsumErrors"),
        csum_errors,
        "the backend saw TCP checksum errors"
    );
    assert_eq!(bed.balancer.hc_attached(), ["eth0"]);
}

#[test]
fn health_check_without_a_mark_goes_to_the_default_gateway_not_to_a_backend() {
    let bed = HcBed::build().expect("building the topology");
    let gateway = bed.topo.client().ns.clone();
    let backends: Vec<String> = bed.topo.backends().iter().map(|b| b.ns.clone()).collect();
    let in_segs: Vec<u64> = backends
        .iter()
        .map(|ns| snmp(ns, "Tcp", "InSegs"))
        .collect();
    let gw_addr_errors = snmp(&gateway, "Ip", "InAddrErrors");
    let (unmarked, encapsulated) = (
        bed.hc_count(HcReason::PassUnmarked),
        bed.hc_count(HcReason::Encapsulated),
    );

    let res = bed.probe(None, SHORT);
    assert!(res.is_err(), "an unmarked connection was answered: {res:?}");

    assert!(bed.hc_count(HcReason::PassUnmarked) > unmarked);
    assert_eq!(bed.hc_count(HcReason::Encapsulated), encapsulated);
    for (ns, before) in backends.iter().zip(in_segs) {
        assert_eq!(snmp(ns, "Tcp", "InSegs"), before, "{ns} received TCP");
    }
    // The gateway got the SYN: addressed to its MAC, for an address it neither owns nor
    // forwards (ip_forward=0), so its IP layer counted an address error.
    assert!(
        snmp(&gateway, "Ip", "InAddrErrors") > gw_addr_errors,
        "the SYN did not reach the default gateway"
    );
}

#[test]
fn health_check_probe_marked_for_an_empty_or_out_of_range_backend_is_dropped_and_counted() {
    let bed = HcBed::build().expect("building the topology");
    for id in [EMPTY_ID, MAX_BACKENDS] {
        let dropped = bed.hc_count(HcReason::DropUnknownBackend);
        let res = bed.probe(Some(mark_of(id)), SHORT);
        assert!(res.is_err(), "probe for backend id {id} answered: {res:?}");
        assert!(
            bed.hc_count(HcReason::DropUnknownBackend) > dropped,
            "id {id}: drop_unknown_backend did not move"
        );
    }
    assert_eq!(bed.hc_count(HcReason::Encapsulated), 0);
    assert_eq!(bed.decapsulated(), 0);
}

#[test]
fn health_check_probe_to_a_backend_without_lb_decap_arrives_but_is_never_answered() {
    let bed = HcBed::build().expect("building the topology");
    let lb = bed.topo.lb(0).node.clone();
    let be2 = bed.topo.backend(1).clone();
    let unknown_protos = snmp(&be2.ns, "Ip", "InUnknownProtos");
    let in_segs = snmp(&be2.ns, "Tcp", "InSegs");
    // Whatever ICMP reaches the LB host while the probe runs.
    let icmp = netns::in_netns(&lb.ns, IcmpTap::open)
        .and_then(|r| r)
        .expect("raw ICMP socket in the LB namespace");

    let res = bed.probe(Some(mark_of(BE2_ID)), SHORT);
    assert!(res.is_err(), "backend-2 answered without lb_decap: {res:?}");

    assert!(bed.hc_count(HcReason::Encapsulated) >= 1);
    // It arrived: IP-in-IP for its own address, which a kernel without an ipip driver
    // cannot deliver (ip_protocol_deliver_rcu: no handler for protocol 4)…
    assert!(
        snmp(&be2.ns, "Ip", "InUnknownProtos") > unknown_protos,
        "backend-2 did not receive the encapsulated probe"
    );
    // … so its TCP never saw the SYN.
    assert_eq!(snmp(&be2.ns, "Tcp", "InSegs"), in_segs);
    // And it answered the outer source with ICMP protocol unreachable (RFC 1122 §3.2.2.1),
    // which the LB host cannot relate to the probe socket (it quotes the outer header).
    let seen = icmp.collect(Duration::from_millis(200));
    assert!(
        seen.contains(&IcmpSeen {
            from: be2.addr,
            to: lb.addr,
            kind: (3, 2),
            quoted_proto: 4,
            quoted_dst: be2.addr,
        }),
        "no ICMP protocol unreachable from {} for the IP-in-IP probe: {seen:?}",
        be2.addr
    );
}

/// One ICMP message received by [`IcmpTap`].
#[derive(Clone, Debug, PartialEq, Eq)]
struct IcmpSeen {
    from: Ipv4Addr,
    to: Ipv4Addr,
    /// (type, code).
    kind: (u8, u8),
    /// Protocol and destination of the IP header the message quotes.
    quoted_proto: u8,
    quoted_dst: Ipv4Addr,
}

/// A raw `IPPROTO_ICMP` socket: receives a copy of every ICMP message for the namespace.
struct IcmpTap {
    sock: std::os::fd::OwnedFd,
}

impl IcmpTap {
    fn open() -> Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the fd is owned from here on.
        let raw = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::IPPROTO_ICMP,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(SOCK_RAW, ICMP)");
        }
        // SAFETY: `raw` is a fresh, valid fd.
        Ok(Self {
            sock: unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) },
        })
    }

    /// Everything queued now, then whatever arrives within `linger`.
    fn collect(&self, linger: Duration) -> Vec<IcmpSeen> {
        use std::os::fd::AsRawFd;
        let mut seen = Vec::new();
        let deadline = Instant::now() + linger;
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: valid fd and buffer.
            let n =
                unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                if Instant::now() >= deadline {
                    return seen;
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let p = &buf[..n as usize];
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let (Some(icmp), true) = (p.get(ihl..), p.len() >= 20) else {
                continue;
            };
            let quoted = icmp.get(8..).unwrap_or_default();
            if icmp.len() < 2 || quoted.len() < 20 {
                continue;
            }
            seen.push(IcmpSeen {
                from: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
                to: Ipv4Addr::new(p[16], p[17], p[18], p[19]),
                kind: (icmp[0], icmp[1]),
                quoted_proto: quoted[9],
                quoted_dst: Ipv4Addr::new(quoted[16], quoted[17], quoted[18], quoted[19]),
            });
        }
    }
}

/// A packet socket on one interface: a copy of every frame it sends or receives.
struct PacketTap {
    sock: std::os::fd::OwnedFd,
}

impl PacketTap {
    fn open(iface: &str) -> Result<Self> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let name = std::ffi::CString::new(iface).context("interface name")?;
        // SAFETY: valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {iface}");
        }
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the fd is owned from here on.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                i32::from(all),
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
        }
        // SAFETY: `raw` is a fresh, valid fd.
        let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = all;
        sll.sll_ifindex = ifindex as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: valid fd and a sockaddr_ll of the given length.
        if unsafe { libc::bind(sock.as_raw_fd(), (&raw const sll).cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error()).context("binding the packet socket");
        }
        Ok(Self { sock })
    }

    /// Every frame queued so far.
    fn frames(&self) -> Vec<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let mut frames = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: valid fd and buffer.
            let n =
                unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                return frames;
            }
            frames.push(buf[..n as usize].to_vec());
        }
    }
}

/// For an IP-in-IP frame to `outer_dst` carrying TCP to the VIP's port: whether the inner
/// TCP checksum verifies (`None` for any other frame).
fn inner_tcp_checksum_ok(frame: &[u8], outer_dst: Ipv4Addr) -> Option<bool> {
    let outer = frame.get(14..34)?;
    if frame[12..14] != [0x08, 0x00] || outer[9] != 4 || outer[16..20] != outer_dst.octets() {
        return None;
    }
    let inner = frame.get(34..)?;
    let ihl = usize::from(inner.first()? & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes([*inner.get(2)?, *inner.get(3)?]));
    if inner[9] != 6 || tot_len > inner.len() || tot_len < ihl + 20 {
        return None;
    }
    let tcp = &inner[ihl..tot_len];
    if u16::from_be_bytes([tcp[2], tcp[3]]) != PORT {
        return None;
    }
    let mut pseudo = Vec::with_capacity(12 + tcp.len());
    pseudo.extend_from_slice(&inner[12..20]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(tcp);
    Some(lb::packet::checksum(&pseudo) == 0)
}
