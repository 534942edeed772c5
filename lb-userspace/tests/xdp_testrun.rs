//! `lb_xdp`, `lb_decap` and `lb_hc_encap` run with `BPF_PROG_TEST_RUN` on crafted packets
//! (`lb_hc_encap`, a TC program, with a `struct __sk_buff` context carrying the mark).
//!
//! Every case states the XDP action it expects and the ONE reason counter that must go up by
//! exactly one (all others unchanged), and checks the bytes the program left: packets that are
//! passed or dropped come out byte-identical, encapsulated ones carry the input IP packet
//! intact behind a correct outer header.
//!
//! `lb_xdp` only encapsulates once `bpf_fib_lookup` has resolved the backend, so every test
//! that loads it runs in a thread of its own that first moves into a private network
//! namespace ([`netns_test`]) with an interface `d0` (10.0.0.2/24, one end of a veth pair), permanent
//! neighbours for the backends 10.0.0.11–19 and forwarding on. The test run's ingress
//! device is that namespace's `lo`, so a resolved backend gives `XDP_REDIRECT` to `d0`. The
//! namespace disappears with the thread, so tests run in parallel and leave nothing behind.
//!
//! Needs root (BPF, namespaces): without it every test fails with a message saying so.
use std::{
    fmt::Debug,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::mpsc,
    thread,
    time::Duration,
};

use lb::{
    cli::XdpMode,
    dataplane::{Balancer, Decap, LbAddrs, Maps, Sizes, TcTestRun},
    l4::{L4Member, Proto, RingWriter, VipAddr, VipSpec},
    packet::{self, ETH_LEN, Frame, Frame6, IPV4_LEN, IPV6_LEN},
};
use lb_common::{Counters, DecapReason, FlowKey, HcReason, NextHop, NextHopCounter, Reason};

/// XDP actions (include/uapi/linux/bpf.h `enum xdp_action`).
const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// The balancer's own address (on `d0`): source of every outer IPv4 header.
const LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// The balancer's IPv6 address (on `d0`): source of every outer IPv6 header.
const LB_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// MAC address given to `d0`: source MAC of every encapsulated frame.
const D0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// Client address of the crafted packets (`Frame::default()`).
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// An address that is no VIP.
const NOT_A_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
/// On `d0`'s subnet but without a neighbour entry: `bpf_fib_lookup` says NO_NEIGH.
const NO_NEIGH_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 99);
/// No route at all in the namespace: `bpf_fib_lookup` says NOT_FWDED.
const UNROUTED_BACKEND: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// On `d0`'s IPv6 subnet but without a neighbour entry.
const NO_NEIGH_BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x99);
/// No IPv6 route.
const UNROUTED_BACKEND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 7);
/// IPv6 client address of the crafted packets (`Frame6::default()`).
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// Maglev table size of the tests (prime, small so adding a VIP is quick).
const RING: u32 = 251;

/// Backend 10.0.0.`n`, which has a permanent neighbour entry for `n` in 11..=19.
fn backend(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, n)
}

/// Backend fd00::`n` (its last byte is `n`), with a permanent neighbour entry for `n` in
/// 11..=19: the same host, and MAC, as `backend(n)`.
fn backend6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(n))
}

/// The neighbour MAC the namespace holds for a backend: 02:00:00:00:00:`last byte`.
fn backend_mac(addr: impl Into<IpAddr>) -> [u8; 6] {
    let last = match addr.into() {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    };
    [0x02, 0, 0, 0, 0, last]
}

fn action_name(a: u32) -> &'static str {
    match a {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "unknown action",
    }
}

// ---------------------------------------------------------------------------------------------
// Environment: root, private network namespace.
// ---------------------------------------------------------------------------------------------

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load XDP programs and create network namespaces: run them as root \
         (e.g. `sudo -E cargo test -p lb-userspace --test xdp_testrun` or `cargo xtask test`)"
    );
}

fn run_cmd(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Moves the calling thread into a new network namespace and sets it up for `lb_xdp`.
/// Commands spawned from this thread inherit its namespace.
fn enter_private_netns() {
    // SAFETY: plain syscall; CLONE_NEWNET affects only the calling thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        io::Error::last_os_error()
    );
    run_cmd(&["ip", "link", "set", "lo", "up"]);
    // A veth pair, not a dummy: this kernel may be built without the dummy driver. The peer
    // `d1` only gives `d0` a carrier.
    run_cmd(&[
        "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ]);
    run_cmd(&["ip", "link", "set", "d1", "up"]);
    run_cmd(&["ip", "link", "set", "d0", "address", "02:00:00:00:00:02"]);
    run_cmd(&["ip", "addr", "add", "10.0.0.2/24", "dev", "d0"]);
    // nodad: usable at once, not after duplicate address detection.
    run_cmd(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00::2/64",
        "dev",
        "d0",
        "nodad",
    ]);
    run_cmd(&["ip", "link", "set", "d0", "up"]);
    for n in 11..=19u8 {
        let mac = format!("02:00:00:00:00:{n:02x}");
        for addr in [backend(n).to_string(), backend6(n).to_string()] {
            run_cmd(&[
                "ip",
                "neigh",
                "add",
                &addr,
                "lladdr",
                &mac,
                "dev",
                "d0",
                "nud",
                "permanent",
            ]);
        }
    }
    // bpf_fib_lookup refuses to resolve unless forwarding is on for the ingress device.
    run_cmd(&["sysctl", "-q", "-w", "net.ipv4.conf.all.forwarding=1"]);
    run_cmd(&["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"]);
}

/// Runs `f` in a fresh thread inside a private network namespace; panics propagate.
fn netns_test(f: impl FnOnce() + Send + 'static) {
    require_root();
    let (done_tx, done_rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        enter_private_netns();
        f();
        let _ = done_tx.send(());
    });
    // Safety net only: a test run takes microseconds; two minutes means a hang.
    if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(Duration::from_secs(120)) {
        panic!("the namespaced test thread did not finish within 120 s");
    }
    // Finished or panicked (the sender was dropped): join returns at once.
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("no NUL");
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(idx, 0, "no interface {name} in this namespace");
    idx
}

// ---------------------------------------------------------------------------------------------
// The balancer under test.
// ---------------------------------------------------------------------------------------------

/// `lb_xdp` loaded (in the current thread's namespace) with a ring writer for its maps and
/// the members of each VIP, as the registry would hand them over.
struct Lb {
    balancer: Balancer,
    registry: RingWriter<Maps>,
    members: std::collections::BTreeMap<VipAddr, Vec<L4Member>>,
}

impl Lb {
    fn load() -> Self {
        Self::with_flows(4096)
    }

    /// Like [`Self::load`] with a flow table of `max_flows` entries.
    fn with_flows(max_flows: u32) -> Self {
        Self::with(
            max_flows,
            LbAddrs {
                v4: Some(LB_ADDR),
                v6: Some(LB_ADDR6),
            },
        )
    }

    /// Like [`Self::load`] with a flow table of `share` entries per possible CPU (each CPU's
    /// LRU lists hold its share), and the VIP 198.51.100.1:80/TCP to `backends`.
    fn with_flow_share(share: u32, backends: &[Ipv4Addr]) -> (Self, VipAddr) {
        let cpus = aya::util::nr_cpus().expect("possible CPUs") as u32;
        let mut lb = Self::with_flows(share * cpus);
        assert_eq!(lb.maps().flow_capacity().unwrap(), share * cpus);
        let web = lb.add_vip(Ipv4Addr::new(198, 51, 100, 1), 80, Proto::Tcp, backends);
        (lb, web)
    }

    /// Entries in the flow table now.
    fn flow_entries(&self) -> u32 {
        self.maps().flows.keys().count() as u32
    }

    /// Like [`Self::load`] with an IPv4 outer source address only: an IPv6 backend has no
    /// route.
    fn v4_only() -> Self {
        Self::with(
            4096,
            LbAddrs {
                v4: Some(LB_ADDR),
                v6: None,
            },
        )
    }

    /// The tests' map sizes, with a flow table of `max_flows` entries.
    fn sizes(max_flows: u32) -> Sizes {
        Sizes {
            max_flows,
            ring_size: RING,
            max_vips: 16,
            max_backends: 32,
        }
    }

    /// Like [`Self::load`] with a flow table of `max_flows` entries and these outer source
    /// addresses.
    fn with(max_flows: u32, addrs: LbAddrs) -> Self {
        let sizes = Self::sizes(max_flows);
        let (balancer, maps) =
            Balancer::load(sizes, addrs, None).expect("loading lb_xdp (verifier, privileges)");
        Self {
            balancer,
            registry: RingWriter::new(maps, RING, sizes.max_vips, sizes.max_backends),
            members: std::collections::BTreeMap::new(),
        }
    }

    fn add_vip<A: Into<IpAddr> + Copy>(
        &mut self,
        addr: impl Into<IpAddr>,
        port: u16,
        proto: Proto,
        backends: &[A],
    ) -> VipAddr {
        let vip = VipAddr {
            addr: addr.into(),
            port,
            proto,
        };
        self.add_vip_spec(VipSpec::new(None, vip), backends)
    }

    /// Adds a VIP as `spec` says (e.g. with its own idle timeout) with `backends`.
    fn add_vip_spec<A: Into<IpAddr> + Copy>(&mut self, spec: VipSpec, backends: &[A]) -> VipAddr {
        let vip = spec.vip;
        self.registry.add_vip(spec).expect("add_vip");
        if !backends.is_empty() {
            self.register(&vip, backends);
        }
        vip
    }

    fn register<A: Into<IpAddr> + Copy>(&mut self, vip: &VipAddr, backends: &[A]) {
        let list = self.members.entry(*vip).or_default();
        list.extend(
            backends
                .iter()
                .map(|&addr| L4Member::in_service(addr.into(), vip.port, 1)),
        );
        self.registry.apply(vip, list, false).expect("register");
    }

    fn deregister(&mut self, vip: &VipAddr, backend: impl Into<IpAddr>) {
        let backend = backend.into();
        let list = self.members.entry(*vip).or_default();
        list.retain(|m| m.addr != backend);
        self.registry.apply(vip, list, false).expect("deregister");
    }

    fn maps(&self) -> &Maps {
        self.registry.maps()
    }

    fn reasons(&self) -> Vec<(Reason, u64)> {
        self.maps().reason_totals().expect("reading LB_REASONS")
    }

    fn vip_id(&self, vip: &VipAddr) -> u32 {
        self.registry
            .describe()
            .into_iter()
            .find(|(spec, _, _)| spec.vip == *vip)
            .map(|(_, id, _)| id)
            .expect("VIP registered")
    }

    fn backend_id(&self, vip: &VipAddr, addr: impl Into<IpAddr>) -> u32 {
        let addr = addr.into();
        self.registry
            .describe()
            .into_iter()
            .find(|(spec, _, _)| spec.vip == *vip)
            .and_then(|(_, _, backends)| backends.into_iter().find(|b| b.member.addr == addr))
            .map(|b| b.id)
            .expect("backend registered")
    }

    fn vip_counters(&self, vip: &VipAddr) -> Counters {
        self.maps()
            .vip_counters(self.vip_id(vip))
            .expect("reading LB_VIP_STATS")
    }

    fn backend_counters(&self, vip: &VipAddr, addr: impl Into<IpAddr>) -> Counters {
        self.maps()
            .backend_counters(self.backend_id(vip, addr))
            .expect("reading LB_BACKEND_STATS")
    }

    /// Runs `lb_xdp` on `packet`; checks the action and that exactly `reason` went up by one.
    /// Returns the packet as the program left it.
    fn run(&self, packet: &[u8], action: u32, reason: Reason) -> Vec<u8> {
        let before = self.reasons();
        let (got, out) = self.balancer.test_run(packet).expect("BPF_PROG_TEST_RUN");
        let moved = counter_deltas(&before, &self.reasons());
        assert_eq!(
            (action_name(got), &moved[..]),
            (action_name(action), &[(reason, 1)][..]),
            "action and counters that moved"
        );
        out
    }

    /// Runs `lb_xdp` on a packet expected to pass or drop: the output must equal the input.
    fn run_untouched(&self, packet: &[u8], action: u32, reason: Reason) {
        let out = self.run(packet, action, reason);
        assert_eq!(out, packet, "{reason:?}: the packet was modified");
    }

    /// Runs `lb_xdp` on a packet for a VIP, expects it encapsulated to `backend` and
    /// redirected to `d0`; returns the output.
    fn run_encap(&self, packet: &[u8], backend: impl Into<IpAddr>) -> Vec<u8> {
        let out = self.run(packet, XDP_REDIRECT, Reason::Redirect);
        assert_encapsulated(packet, &out, backend);
        out
    }

    /// Runs a packet for a VIP and returns the backend it was encapsulated to.
    fn backend_of(&self, packet: &[u8]) -> IpAddr {
        let out = self.run(packet, XDP_REDIRECT, Reason::Redirect);
        let dst = packet::parse_outer(&out).expect("encapsulated").dst;
        assert_encapsulated(packet, &out, dst);
        dst
    }
}

/// The counters that changed between two readings, with their increase.
fn counter_deltas<R: Copy + PartialEq + Debug>(
    before: &[(R, u64)],
    after: &[(R, u64)],
) -> Vec<(R, u64)> {
    assert_eq!(before.len(), after.len());
    before
        .iter()
        .zip(after)
        .filter_map(|(&(r, b), &(r2, a))| {
            assert_eq!(r, r2);
            (a != b).then(|| (r, a.wrapping_sub(b)))
        })
        .collect()
}

/// Checks a frame `lb_xdp` (or `lb_hc_encap`) encapsulated from `input` for `backend`: one
/// outer header of the backend's family (RFC 2003, RFC 2473, RFC 4213), the input's IP packet
/// intact behind it.
fn assert_encapsulated(input: &[u8], out: &[u8], backend: impl Into<IpAddr>) {
    let backend = backend.into();
    let lb: IpAddr = if backend.is_ipv6() {
        LB_ADDR6.into()
    } else {
        LB_ADDR.into()
    };
    assert_encapsulated_from(input, out, backend, lb);
}

/// [`assert_encapsulated`] with the outer source `lb` (the balancer's address of the
/// backend's family).
fn assert_encapsulated_from(input: &[u8], out: &[u8], backend: IpAddr, lb: IpAddr) {
    let (inner_len, inner_tos) = packet::ip_len_and_tos(input).expect("input is IP");
    let inner_v6 = input[12..14] == [0x86, 0xdd];
    let outer_len = if backend.is_ipv6() {
        IPV6_LEN
    } else {
        IPV4_LEN
    };
    assert_eq!(out.len(), input.len() + outer_len, "one outer header added");
    let outer = packet::parse_outer(out).unwrap_or_else(|| panic!("not IP-in-IP: {out:02x?}"));
    assert_eq!(outer.len, outer_len, "outer family: the backend's");
    assert_eq!(
        outer.proto,
        if inner_v6 { 41 } else { 4 },
        "protocol / next header announces the inner family"
    );
    assert_eq!(outer.src, lb, "outer source");
    assert_eq!(outer.dst, backend, "outer destination");
    assert_eq!(outer.ttl, 64, "outer TTL / hop limit");
    assert!(outer.checksum_ok, "outer checksum: {out:02x?}");
    assert_eq!(
        usize::from(outer.tot_len),
        inner_len + outer_len,
        "outer length"
    );
    assert_eq!(
        outer.tos, inner_tos,
        "TOS / traffic class copied (RFC 2003 §3.1, RFC 2473 §6.5)"
    );
    if !backend.is_ipv6() {
        let o = &out[ETH_LEN..ETH_LEN + IPV4_LEN];
        let inner_df = !inner_v6 && input[ETH_LEN + 6] & 0x40 != 0;
        assert_eq!(
            outer.dont_fragment,
            inner_df || inner_v6,
            "DF copied (RFC 2003 §3.1), always set over IPv6 (RFC 4213 §3.2)"
        );
        assert_eq!(o[6] & 0x3f, 0, "outer MF/offset clear");
        assert_eq!(o[7], 0, "outer offset clear");
    }
    assert_eq!(
        &out[0..6],
        &backend_mac(backend),
        "Ethernet dst = neighbour MAC"
    );
    assert_eq!(&out[6..12], &D0_MAC, "Ethernet src = egress MAC");
    let ethertype: [u8; 2] = if backend.is_ipv6() {
        [0x86, 0xdd]
    } else {
        [0x08, 0x00]
    };
    assert_eq!(
        &out[12..14],
        &ethertype,
        "Ethernet type of the outer family"
    );
    assert_eq!(
        &out[ETH_LEN + outer_len..],
        &input[ETH_LEN..],
        "inner packet (and anything after it) unchanged"
    );
}

// ---------------------------------------------------------------------------------------------
// Packet builders.
// ---------------------------------------------------------------------------------------------

/// The IPv4 address in `a` (the crafted IPv4 packets' VIPs are IPv4).
fn v4(a: impl Into<IpAddr>) -> Ipv4Addr {
    match a.into() {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => panic!("{a} is not IPv4"),
    }
}

/// The IPv6 address in `a`.
fn v6(a: impl Into<IpAddr>) -> Ipv6Addr {
    match a.into() {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => panic!("{a} is not IPv6"),
    }
}

fn tcp(dst: impl Into<IpAddr>, dport: u16) -> Frame {
    Frame {
        dst: v4(dst),
        dport,
        ..Frame::default()
    }
}

fn udp(dst: impl Into<IpAddr>, dport: u16) -> Frame {
    Frame {
        dst: v4(dst),
        dport,
        proto: 17,
        ..Frame::default()
    }
}

fn tcp6(dst: impl Into<IpAddr>, dport: u16) -> Frame6 {
    Frame6 {
        dst: v6(dst),
        dport,
        ..Frame6::default()
    }
}

fn udp6(dst: impl Into<IpAddr>, dport: u16) -> Frame6 {
    Frame6 {
        dst: v6(dst),
        dport,
        proto: 17,
        ..Frame6::default()
    }
}

/// Sets the IPv4 total length field (checksum left stale: `lb_xdp` does not verify it).
fn with_tot_len(mut f: Vec<u8>, tot_len: u16) -> Vec<u8> {
    f[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&tot_len.to_be_bytes());
    f
}

fn truncated(mut f: Vec<u8>, len: usize) -> Vec<u8> {
    f.truncate(len);
    f
}

fn with_byte(mut f: Vec<u8>, at: usize, value: u8) -> Vec<u8> {
    f[at] = value;
    f
}

/// An Ethernet frame of `ethertype` with `body`.
fn ether(ethertype: u16, body: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// An IPv6 frame from `LB_ADDR6` to `outer_dst` carrying `inner_ip` (IPv4 or IPv6) behind
/// next header `next` (4 or 41).
fn ip6ip(outer_dst: Ipv6Addr, next: u8, inner_ip: &[u8]) -> Vec<u8> {
    let mut h = [0u8; IPV6_LEN];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(inner_ip.len() as u16).to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&LB_ADDR6.octets());
    h[24..40].copy_from_slice(&outer_dst.octets());
    let mut body = h.to_vec();
    body.extend_from_slice(inner_ip);
    let mut f = ether(0x86dd, &body);
    f[0..6].copy_from_slice(&backend_mac(outer_dst));
    f
}

/// An IP-in-IP frame from `LB_ADDR` to `outer_dst` carrying `inner_ip`.
fn ipip(outer_dst: Ipv4Addr, inner_ip: &[u8]) -> Vec<u8> {
    let mut h = [0u8; IPV4_LEN];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((IPV4_LEN + inner_ip.len()) as u16).to_be_bytes());
    h[8] = 64;
    h[9] = 4;
    h[12..16].copy_from_slice(&LB_ADDR.octets());
    h[16..20].copy_from_slice(&outer_dst.octets());
    let c = packet::checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let mut body = h.to_vec();
    body.extend_from_slice(inner_ip);
    let mut f = ether(0x0800, &body);
    f[0..6].copy_from_slice(&backend_mac(outer_dst));
    f
}

// ---------------------------------------------------------------------------------------------
// lb_xdp: what it refuses to touch.
// ---------------------------------------------------------------------------------------------

/// A VIP for every situation the table needs.
struct TableVips {
    lb: Lb,
    web: Ipv4Addr,
    any_port: Ipv4Addr,
    empty: Ipv4Addr,
    no_neigh: Ipv4Addr,
    unrouted: Ipv4Addr,
}

fn table_vips() -> TableVips {
    let mut lb = Lb::load();
    let web = Ipv4Addr::new(198, 51, 100, 1);
    let any_port = Ipv4Addr::new(198, 51, 100, 2);
    let empty = Ipv4Addr::new(198, 51, 100, 3);
    let no_neigh = Ipv4Addr::new(198, 51, 100, 4);
    let unrouted = Ipv4Addr::new(198, 51, 100, 5);
    lb.add_vip(web, 80, Proto::Tcp, &[backend(11)]);
    lb.add_vip(web, 53, Proto::Udp, &[backend(11)]);
    lb.add_vip(any_port, 0, Proto::Tcp, &[backend(11)]);
    lb.add_vip::<Ipv4Addr>(empty, 80, Proto::Tcp, &[]);
    lb.add_vip(no_neigh, 80, Proto::Tcp, &[NO_NEIGH_BACKEND]);
    lb.add_vip(unrouted, 80, Proto::Tcp, &[UNROUTED_BACKEND]);
    TableVips {
        lb,
        web,
        any_port,
        empty,
        no_neigh,
        unrouted,
    }
}

#[test]
fn malformed_foreign_and_undeliverable_packets_pass_or_drop_unmodified_with_one_counter() {
    netns_test(|| {
        let TableVips {
            lb,
            web,
            any_port,
            empty,
            no_neigh,
            unrouted,
        } = table_vips();
        let web_syn = tcp(web, 80).build();
        let ip = ETH_LEN; // offset of the IPv4 header
        let full = ETH_LEN + IPV4_LEN + 20; // length of a TCP SYN frame without options

        let cases: Vec<(&str, Vec<u8>, u32, Reason)> = vec![
            (
                "Ethernet header only (ethertype IPv4, no IP header)",
                ether(0x0800, &[]),
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "ARP",
                ether(0x0806, &[0u8; 28]),
                XDP_PASS,
                Reason::PassNotIp,
            ),
            (
                "IPv6 ethertype, payload length beyond the frame",
                ether(0x86dd, &[0x60; 60]),
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "VLAN-tagged IPv4 to a VIP (802.1Q is not parsed)",
                {
                    let mut body = vec![0x00, 0x05, 0x08, 0x00];
                    body.extend_from_slice(&web_syn[ETH_LEN..]);
                    ether(0x8100, &body)
                },
                XDP_PASS,
                Reason::PassNotIp,
            ),
            (
                "IPv4 header truncated (19 of 20 bytes)",
                truncated(web_syn.clone(), ETH_LEN + 19),
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "IHL 4 (< 5) to a VIP",
                with_byte(web_syn.clone(), ip, 0x44),
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "IHL 0 to a VIP",
                with_byte(web_syn.clone(), ip, 0x40),
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "IP version 6 behind ethertype IPv4, to a VIP",
                with_byte(web_syn.clone(), ip, 0x65),
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "IHL 15 (60-byte header) beyond total length 40",
                with_byte(web_syn.clone(), ip, 0x4f),
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "total length one byte larger than the frame, to a VIP",
                with_tot_len(web_syn.clone(), 41),
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "total length 10 (< IHL), to a VIP",
                with_tot_len(web_syn.clone(), 10),
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "TCP header truncated (10 of 20 bytes), to a VIP",
                with_tot_len(truncated(web_syn.clone(), full - 10), 30),
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "TCP header truncated by total length, frame padded to full size, to a VIP",
                with_tot_len(web_syn.clone(), 30),
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "TCP header truncated, not a VIP",
                with_tot_len(truncated(tcp(NOT_A_VIP, 80).build(), full - 10), 30),
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "UDP header truncated (6 of 8 bytes), to a VIP",
                with_tot_len(truncated(udp(web, 53).build(), ETH_LEN + IPV4_LEN + 6), 26),
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "IP options claimed but cut off by the frame (IHL 15, 40 bytes present)",
                with_tot_len(with_byte(web_syn.clone(), ip, 0x4f), 80),
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "ICMP echo to a VIP address",
                Frame {
                    dst: web,
                    proto: 1,
                    payload: vec![8, 0, 0, 0, 0, 1, 0, 1],
                    ..Frame::default()
                }
                .build(),
                XDP_PASS,
                Reason::PassNotTcpUdp,
            ),
            (
                "TCP to an address that is no VIP",
                tcp(NOT_A_VIP, 80).build(),
                XDP_PASS,
                Reason::PassNotVip,
            ),
            (
                "TCP to a VIP address on another port",
                tcp(web, 8080).build(),
                XDP_PASS,
                Reason::PassNotVip,
            ),
            (
                "UDP to a TCP VIP's address and port",
                udp(web, 80).build(),
                XDP_PASS,
                Reason::PassNotVip,
            ),
            (
                "first fragment (MF) to a port-0 VIP",
                Frame {
                    frag: 0x2000,
                    ..tcp(any_port, 80)
                }
                .build(),
                XDP_DROP,
                Reason::DropFragment,
            ),
            (
                "non-first fragment (offset 1480) to a port-0 VIP",
                Frame {
                    frag: 1480 / 8,
                    ..tcp(any_port, 80)
                }
                .build(),
                XDP_DROP,
                Reason::DropFragment,
            ),
            (
                "fragment (MF) to an address that is no VIP",
                Frame {
                    frag: 0x2000,
                    ..tcp(NOT_A_VIP, 80)
                }
                .build(),
                XDP_PASS,
                Reason::PassNotVip,
            ),
            (
                "VIP without backends",
                tcp(empty, 80).build(),
                XDP_DROP,
                Reason::DropNoBackend,
            ),
            (
                "backend on the subnet without a neighbour entry",
                tcp(no_neigh, 80).build(),
                XDP_DROP,
                Reason::DropNoRoute,
            ),
            (
                "backend without any route",
                tcp(unrouted, 80).build(),
                XDP_DROP,
                Reason::DropNoRoute,
            ),
        ];

        let mut failures = Vec::new();
        for (name, input, action, reason) in &cases {
            let before = lb.reasons();
            let (got, out) = match lb.balancer.test_run(input) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{name}: test run failed: {e}"));
                    continue;
                }
            };
            let moved = counter_deltas(&before, &lb.reasons());
            if got != *action {
                failures.push(format!(
                    "{name}: {} instead of {}",
                    action_name(got),
                    action_name(*action)
                ));
            }
            if moved != [(*reason, 1)] {
                failures.push(format!(
                    "{name}: counters moved {moved:?}, expected {reason:?} +1"
                ));
            }
            if out != *input {
                failures.push(format!("{name}: packet modified"));
            }
        }
        assert!(
            failures.is_empty(),
            "{} case(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
        // The table covered every outcome it claims to, and nothing was encapsulated.
        let totals = lb.reasons();
        let total = |r: Reason| totals.iter().find(|(x, _)| *x == r).map_or(0, |(_, n)| *n);
        assert_eq!(total(Reason::Redirect) + total(Reason::Tx), 0);
        assert_eq!(
            totals.iter().map(|(_, n)| n).sum::<u64>(),
            cases.len() as u64
        );
    });
}

/// Walks an error's source chain to the OS error code of the failed syscall.
fn os_error(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(code) = err
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return Some(code);
        }
        cur = err.source();
    }
    None
}

/// The kernel's `BPF_PROG_TEST_RUN` for XDP refuses input shorter than an Ethernet header
/// (ETH_HLEN, 14 bytes) with EINVAL (net/bpf/test_run.c, `bpf_test_init`), so `lb_xdp`
/// never sees such a frame here. On a real interface the driver does not deliver them
/// either; the program's own "shorter than Ethernet" branch counts pass_malformed.
#[test]
fn frames_shorter_than_ethernet_and_empty_ones_are_refused_by_the_kernel_with_einval() {
    netns_test(|| {
        let lb = Lb::load();
        let before = lb.reasons();
        for len in [0usize, 1, 13] {
            let input = vec![0u8; len];
            let err = lb
                .balancer
                .test_run(&input)
                .expect_err("the kernel should refuse a frame shorter than 14 bytes");
            assert_eq!(os_error(&err), Some(libc::EINVAL), "{len} bytes: {err}");
        }
        assert_eq!(
            counter_deltas(&before, &lb.reasons()),
            [],
            "the program never ran"
        );
        // 14 bytes is accepted and reaches the program.
        lb.run_untouched(&ether(0x0800, &[]), XDP_PASS, Reason::PassMalformed);
    });
}

#[test]
fn fragments_to_a_vip_address_are_dropped_whatever_the_vip_port() {
    // A fragment's ports are not looked at (a non-first fragment has none): a fragment to an
    // address with a VIP of its protocol, exact-port or port-0, is dropped (passing it would
    // let the LB host route it onwards); one of a protocol with no VIP there is not ours.
    netns_test(|| {
        let mut lb = Lb::load();
        let exact = Ipv4Addr::new(198, 51, 100, 10);
        let any = Ipv4Addr::new(198, 51, 100, 11);
        lb.add_vip(exact, 80, Proto::Tcp, &[backend(11)]);
        lb.add_vip(any, 0, Proto::Tcp, &[backend(11)]);
        for frag in [0x2000u16, 0x2000 | 1, 1] {
            let to_exact = Frame {
                frag,
                ..tcp(exact, 80)
            }
            .build();
            lb.run_untouched(&to_exact, XDP_DROP, Reason::DropFragment);
            let udp_to_exact = Frame {
                frag,
                ..udp(exact, 80)
            }
            .build();
            lb.run_untouched(&udp_to_exact, XDP_PASS, Reason::PassNotVip);
            let to_any = Frame {
                frag,
                ..tcp(any, 80)
            }
            .build();
            lb.run_untouched(&to_any, XDP_DROP, Reason::DropFragment);
            let udp_to_any = Frame {
                frag,
                ..udp(any, 80)
            }
            .build();
            lb.run_untouched(&udp_to_any, XDP_PASS, Reason::PassNotVip);
        }
        // The same packets without fragmentation are balanced.
        lb.run_encap(&tcp(exact, 80).build(), backend(11));
        lb.run_encap(&tcp(any, 80).build(), backend(11));
    });
}

// ---------------------------------------------------------------------------------------------
// lb_xdp: encapsulation.
// ---------------------------------------------------------------------------------------------

#[test]
fn vip_packet_is_encapsulated_to_its_backend_and_redirected_to_the_egress_interface() {
    netns_test(|| {
        let mut lb = Lb::load();
        let web = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            80,
            Proto::Tcp,
            &[backend(12)],
        );
        let input = Frame {
            payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            ..tcp(web.addr, 80)
        }
        .build();
        lb.run_encap(&input, backend(12));
        let inner_len = (input.len() - ETH_LEN) as u64;
        let expected = Counters {
            packets: 1,
            bytes: inner_len,
            new_flows: 1,
            unhealthy_routing_flows: 0,
            // Test runs send to another interface: reason `redirect`, counted here.
            redirected: 1,
            ..Counters::default()
        };
        assert_eq!(lb.vip_counters(&web), expected, "VIP counters");
        assert_eq!(
            lb.backend_counters(&web, backend(12)),
            expected,
            "backend counters"
        );

        let dns = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            53,
            Proto::Udp,
            &[backend(13)],
        );
        lb.run_encap(
            &Frame {
                payload: vec![0xab; 33],
                ..udp(dns.addr, 53)
            }
            .build(),
            backend(13),
        );
    });
}

#[test]
fn encapsulation_copies_tos_and_df_from_the_inner_header() {
    netns_test(|| {
        let mut lb = Lb::load();
        let web = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            80,
            Proto::Tcp,
            &[backend(11)],
        );
        for (tos, frag) in [
            (0xb8u8, 0x4000u16),
            (0x00, 0x0000),
            (0x03, 0x0000),
            (0xfc, 0x4000),
        ] {
            let input = Frame {
                tos,
                frag,
                sport: 1000 + u16::from(tos),
                ..tcp(web.addr, 80)
            }
            .build();
            // assert_encapsulated compares outer TOS and DF with the input's.
            let out = lb.run_encap(&input, backend(11));
            assert_eq!(out[ETH_LEN + 1], tos);
            assert_eq!(out[ETH_LEN + 6] & 0x40 != 0, frag == 0x4000);
        }
    });
}

#[test]
fn ip_options_are_carried_intact_inside_the_tunnel() {
    netns_test(|| {
        let mut lb = Lb::load();
        let web = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            80,
            Proto::Tcp,
            &[backend(11)],
        );
        // NOP NOP NOP EOL; a record-route option filling the 40-byte maximum.
        let mut record_route = vec![7u8, 39, 4];
        record_route.resize(39, 0);
        record_route.push(0);
        for options in [vec![1u8, 1, 1, 0], record_route] {
            let input = Frame {
                ip_options: options.clone(),
                payload: b"hello".to_vec(),
                sport: 50_000 + options.len() as u16,
                ..tcp(web.addr, 80)
            }
            .build();
            let out = lb.run_encap(&input, backend(11));
            let inner = &out[ETH_LEN + IPV4_LEN..];
            assert_eq!(
                usize::from(inner[0] & 0x0f) * 4,
                IPV4_LEN + options.len(),
                "inner IHL"
            );
            assert_eq!(&inner[IPV4_LEN..IPV4_LEN + options.len()], &options[..]);
            assert_eq!(
                packet::checksum(&inner[..IPV4_LEN + options.len()]),
                0,
                "inner checksum"
            );
        }
    });
}

#[test]
fn ethernet_padding_stays_behind_the_inner_packet_and_is_not_counted() {
    netns_test(|| {
        let mut lb = Lb::load();
        let web = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            80,
            Proto::Tcp,
            &[backend(11)],
        );
        // A 54-byte SYN padded to the 60-byte Ethernet minimum.
        let mut input = tcp(web.addr, 80).build();
        input.resize(60, 0);
        let out = lb.run_encap(&input, backend(11));
        assert_eq!(packet::parse_outer(&out).map(|o| o.tot_len), Some(60));
        assert_eq!(
            lb.vip_counters(&web).bytes,
            40,
            "bytes counted from the IP total length"
        );
    });
}

#[test]
fn backend_reached_through_the_receiving_interface_is_sent_back_with_xdp_tx() {
    netns_test(|| {
        let mut lb = Lb::load();
        let web = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            80,
            Proto::Tcp,
            &[backend(14)],
        );
        let input = tcp(web.addr, 80).build();
        let before = lb.reasons();
        let (action, out) = lb
            .balancer
            .test_run_ingress(&input, ifindex("d0"))
            .expect("BPF_PROG_TEST_RUN with ingress d0");
        assert_eq!(action_name(action), action_name(XDP_TX));
        assert_eq!(counter_deltas(&before, &lb.reasons()), [(Reason::Tx, 1)]);
        assert_encapsulated(&input, &out, backend(14));
    });
}

#[test]
fn encapsulation_that_would_exceed_the_egress_mtu_is_answered_with_icmp_or_dropped() {
    netns_test(|| {
        run_cmd(&["ip", "link", "set", "d0", "mtu", "1000"]);
        let mut lb = Lb::load();
        let web = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            80,
            Proto::Tcp,
            &[backend(11)],
        );
        let of_ip_len = |ip_len: usize, frag: u16, ip_options: Vec<u8>| Frame {
            payload: vec![0x5a; ip_len - IPV4_LEN - ip_options.len() - 20],
            frag,
            ip_options,
            ..tcp(web.addr, 80)
        };
        // 990 bytes fit the MTU but not with the 20-byte outer header.
        // DF clear: the sender allows fragmentation, which we do not do: dropped, unmodified.
        lb.run_untouched(
            &of_ip_len(990, 0, vec![]).build(),
            XDP_DROP,
            Reason::DropMtu,
        );
        // DF set but IP options: the quote would be cut; dropped, unmodified.
        let with_options = of_ip_len(990, 0x4000, vec![1, 1, 1, 0]).build();
        lb.run_untouched(&with_options, XDP_DROP, Reason::DropMtu);

        // DF set: answered with ICMP "fragmentation needed" back out of the receiving
        // interface, so the sender's path-MTU discovery adapts (RFC 1191).
        let big = of_ip_len(990, 0x4000, vec![]).build();
        let out = lb.run(&big, XDP_TX, Reason::TxIcmpTooBig);
        assert_eq!(
            out.len(),
            ETH_LEN + IPV4_LEN + 8 + IPV4_LEN + 8,
            "{out:02x?}"
        );
        assert_eq!(&out[0..6], &big[6..12], "Ethernet destination: the sender");
        assert_eq!(&out[6..12], &big[0..6], "Ethernet source: us");
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        let ip = &out[ETH_LEN..ETH_LEN + IPV4_LEN];
        assert_eq!((ip[0], ip[9]), (0x45, 1), "IPv4 without options, ICMP");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 56, "total length");
        assert_eq!(&ip[12..16], &v4(web.addr).octets(), "from the VIP");
        assert_eq!(
            &ip[16..20],
            &big[ETH_LEN + 12..ETH_LEN + 16],
            "to the client"
        );
        assert_eq!(packet::checksum(ip), 0, "IP header checksum");
        let icmp = &out[ETH_LEN + IPV4_LEN..];
        assert_eq!(
            (icmp[0], icmp[1]),
            (3, 4),
            "destination unreachable, fragmentation needed"
        );
        assert_eq!(
            u16::from_be_bytes([icmp[6], icmp[7]]),
            1000 - 20,
            "next-hop MTU: what fits after encapsulation"
        );
        assert_eq!(
            &icmp[8..],
            &big[ETH_LEN..ETH_LEN + IPV4_LEN + 8],
            "quotes the IP header and the first 8 payload bytes"
        );
        assert_eq!(packet::checksum(icmp), 0, "ICMP checksum");

        // 980 + 20 = 1000: exactly the MTU.
        let fits = of_ip_len(980, 0x4000, vec![]).build();
        lb.run_encap(&fits, backend(11));
        // Neither the drops nor the ICMP answer created a flow or counted for the VIP.
        assert_eq!(
            lb.vip_counters(&web),
            Counters {
                packets: 1,
                bytes: 980,
                new_flows: 1,
                unhealthy_routing_flows: 0,
                // Test runs send to another interface: reason `redirect`, counted here.
                redirected: 1,
                ..Counters::default()
            }
        );
    });
}

#[test]
fn port_zero_vip_matches_every_port_of_its_address_and_protocol() {
    netns_test(|| {
        let mut lb = Lb::load();
        let any = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 2),
            0,
            Proto::Tcp,
            &[backend(15)],
        );
        for port in [1u16, 22, 80, 443, 65_535] {
            lb.run_encap(&tcp(any.addr, port).build(), backend(15));
        }
        lb.run_untouched(&udp(any.addr, 80).build(), XDP_PASS, Reason::PassNotVip);
        assert_eq!(lb.vip_counters(&any).packets, 5);
    });
}

#[test]
fn exact_port_vip_wins_over_port_zero_vip_of_the_same_address() {
    netns_test(|| {
        let mut lb = Lb::load();
        let addr = Ipv4Addr::new(198, 51, 100, 3);
        let any = lb.add_vip(addr, 0, Proto::Tcp, &[backend(12)]);
        let https = lb.add_vip(addr, 443, Proto::Tcp, &[backend(13)]);
        lb.run_encap(&tcp(addr, 443).build(), backend(13));
        lb.run_encap(&tcp(addr, 80).build(), backend(12));
        lb.run_encap(&tcp(addr, 444).build(), backend(12));
        assert_eq!(lb.vip_counters(&https).packets, 1);
        assert_eq!(lb.vip_counters(&any).packets, 2);
    });
}

// ---------------------------------------------------------------------------------------------
// lb_xdp: flows.
// ---------------------------------------------------------------------------------------------

fn flow_key(
    src: impl Into<IpAddr>,
    sport: u16,
    dst: impl Into<IpAddr>,
    dport: u16,
    proto: u8,
) -> FlowKey {
    let (family, src_addr) = lb_common::addr_to_map(src.into());
    let (_, dst_addr) = lb_common::addr_to_map(dst.into());
    FlowKey {
        src_addr,
        dst_addr,
        src_port: sport.to_be(),
        dst_port: dport.to_be(),
        proto,
        family,
        _pad: [0; 2],
    }
}

fn client_syn(vip: &VipAddr, sport: u16) -> Vec<u8> {
    Frame {
        sport,
        ..tcp(vip.addr, vip.port)
    }
    .build()
}

#[test]
fn same_five_tuple_goes_to_the_same_backend_and_counts_one_new_flow() {
    netns_test(|| {
        let mut lb = Lb::load();
        let backends = [backend(11), backend(12), backend(13)];
        let web = lb.add_vip(Ipv4Addr::new(198, 51, 100, 1), 80, Proto::Tcp, &backends);
        let syn = client_syn(&web, 40_000);
        let first = lb.backend_of(&syn);
        let second = lb.backend_of(&syn);
        assert_eq!(first, second);
        let len = (syn.len() - ETH_LEN) as u64;
        let two_packets_one_flow = Counters {
            packets: 2,
            bytes: 2 * len,
            new_flows: 1,
            unhealthy_routing_flows: 0,
            // Test runs send to another interface: reason `redirect`, counted here.
            redirected: 2,
            ..Counters::default()
        };
        assert_eq!(lb.vip_counters(&web), two_packets_one_flow);
        assert_eq!(lb.backend_counters(&web, first), two_packets_one_flow);
        let flow = lb
            .maps()
            .flows
            .get(&flow_key(CLIENT, 40_000, web.addr, 80, 6), 0)
            .expect("the flow is in LB_FLOWS under its 5-tuple");
        assert_eq!(flow.backend_id, lb.backend_id(&web, first));
        assert_eq!(flow.vip_id, lb.vip_id(&web));
        // Different flows are spread: the choice is not a constant.
        let chosen: std::collections::BTreeSet<IpAddr> = (0..32)
            .map(|i| lb.backend_of(&client_syn(&web, 41_000 + i)))
            .collect();
        assert!(chosen.len() >= 2, "32 flows all went to {chosen:?}");
    });
}

#[test]
fn established_flows_stay_on_their_backend_when_backends_are_added() {
    netns_test(|| {
        let mut lb = Lb::load();
        let web = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            80,
            Proto::Tcp,
            &[backend(11)],
        );
        let ports: Vec<u16> = (0..32).map(|i| 42_000 + i).collect();
        for &p in &ports {
            assert_eq!(lb.backend_of(&client_syn(&web, p)), backend(11));
        }
        lb.register(&web, &[backend(12), backend(13)]);
        // The same SYNs again (retransmissions, as far as the balancer can tell): an opening
        // SYN is steered by the ring first, but its insert fails on the existing key and the
        // lookup keeps the flow's backend, although the ring now sends some of them elsewhere.
        for &p in &ports {
            assert_eq!(
                lb.backend_of(&client_syn(&web, p)),
                backend(11),
                "established flow from port {p} moved"
            );
        }
        assert_eq!(
            lb.vip_counters(&web).new_flows,
            32,
            "no flow was re-created"
        );
        // The ring did change: new flows now reach the new backends too.
        let fresh: Vec<IpAddr> = (0..32)
            .map(|i| lb.backend_of(&client_syn(&web, 43_000 + i)))
            .collect();
        assert!(
            fresh.iter().any(|b| *b != backend(11)),
            "no new flow reached the added backends: {fresh:?}"
        );
    });
}

#[test]
fn flows_of_a_deregistered_backend_are_re_steered_to_the_remaining_ones() {
    netns_test(|| {
        let mut lb = Lb::load();
        let backends = [backend(11), backend(12), backend(13)];
        let web = lb.add_vip(Ipv4Addr::new(198, 51, 100, 1), 80, Proto::Tcp, &backends);
        let ports: Vec<u16> = (0..48).map(|i| 44_000 + i).collect();
        let before: Vec<IpAddr> = ports
            .iter()
            .map(|&p| lb.backend_of(&client_syn(&web, p)))
            .collect();
        let gone = backend(12);
        let on_gone = before.iter().filter(|b| **b == gone).count();
        assert!(on_gone > 0, "no flow landed on {gone}: {before:?}");
        let new_flows = lb.vip_counters(&web).new_flows;

        lb.deregister(&web, gone);
        for (&p, &was) in ports.iter().zip(&before) {
            let now = lb.backend_of(&client_syn(&web, p));
            if was == gone {
                assert_ne!(
                    now, gone,
                    "flow from port {p} still sent to the removed backend"
                );
            } else {
                assert_eq!(now, was, "flow from port {p} on a remaining backend moved");
            }
        }
        assert_eq!(
            lb.vip_counters(&web).new_flows,
            new_flows + on_gone as u64,
            "exactly the removed backend's flows were re-created"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// lb_decap.
// ---------------------------------------------------------------------------------------------

/// Runs `lb_decap` on `packet`; checks XDP_PASS and that exactly `reason` went up by one.
fn decap_run(decap: &Decap, packet: &[u8], reason: DecapReason) -> Vec<u8> {
    let before = decap.counters().expect("reading LB_DECAP_STATS");
    let (action, out) = decap
        .test_run(packet)
        .expect("BPF_PROG_TEST_RUN of lb_decap");
    let moved = counter_deltas(&before, &decap.counters().expect("reading LB_DECAP_STATS"));
    assert_eq!(
        action_name(action),
        action_name(XDP_PASS),
        "lb_decap always passes"
    );
    assert_eq!(moved, [(reason, 1)], "decap counters that moved");
    out
}

fn load_decap<A: Into<IpAddr> + Copy>(addrs: &[A]) -> Decap {
    require_root();
    let addrs: Vec<IpAddr> = addrs.iter().map(|&a| a.into()).collect();
    Decap::load(&addrs).expect("loading lb_decap")
}

#[test]
fn decap_strips_the_outer_header_of_ipip_addressed_to_a_local_address() {
    let decap = load_decap(&[backend(11), backend(12)]);
    let inner = Frame {
        payload: b"payload".to_vec(),
        ..Frame::default()
    }
    .build();
    let encapsulated = ipip(backend(12), &inner[ETH_LEN..]);
    let out = decap_run(&decap, &encapsulated, DecapReason::Decapsulated);
    assert_eq!(
        &out[..ETH_LEN],
        &encapsulated[..ETH_LEN],
        "Ethernet header kept"
    );
    assert_eq!(
        &out[ETH_LEN..],
        &inner[ETH_LEN..],
        "exactly the inner packet"
    );
}

#[test]
fn decap_leaves_everything_else_untouched() {
    let decap = load_decap(&[backend(11)]);
    let inner = Frame::default().build();
    let mut with_outer_options = ipip(backend(11), &inner[ETH_LEN..]);
    with_outer_options[ETH_LEN] = 0x46; // lb_xdp never writes outer options
    let cases: Vec<(&str, Vec<u8>, DecapReason)> = vec![
        (
            "IPIP for another address",
            ipip(backend(12), &inner[ETH_LEN..]),
            DecapReason::Passed,
        ),
        ("plain TCP", inner.clone(), DecapReason::Passed),
        ("ARP", ether(0x0806, &[0u8; 28]), DecapReason::Passed),
        ("Ethernet only", ether(0x0800, &[]), DecapReason::Passed),
        (
            "outer header with options",
            with_outer_options,
            DecapReason::Passed,
        ),
        (
            "IPIP with a truncated inner header (10 bytes)",
            ipip(backend(11), &inner[ETH_LEN..ETH_LEN + 10]),
            DecapReason::PassMalformed,
        ),
        (
            "IPIP whose inner packet is not IPv4",
            ipip(backend(11), &[0x60; 40]),
            DecapReason::PassMalformed,
        ),
    ];
    for (name, input, reason) in cases {
        let out = decap_run(&decap, &input, reason);
        assert_eq!(out, input, "{name}: modified");
    }
}

#[test]
fn lb_xdp_output_through_lb_decap_gives_back_the_original_ip_packet() {
    netns_test(|| {
        let mut lb = Lb::load();
        let web = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            80,
            Proto::Tcp,
            &[backend(16)],
        );
        let decap = Decap::load(&[backend(16).into()]).expect("loading lb_decap");
        for options in [vec![], vec![1u8, 1, 1, 0]] {
            let original = Frame {
                ip_options: options,
                tos: 0x10,
                payload: (0..=255u8).collect(),
                ..tcp(web.addr, 80)
            }
            .build();
            let encapsulated = lb.run_encap(&original, backend(16));
            let out = decap_run(&decap, &encapsulated, DecapReason::Decapsulated);
            assert_eq!(
                &out[ETH_LEN..],
                &original[ETH_LEN..],
                "the client's IP packet"
            );
            assert_eq!(
                &out[..ETH_LEN],
                &encapsulated[..ETH_LEN],
                "the LB's Ethernet header"
            );
        }
    });
}

// ---------------------------------------------------------------------------------------------
// lb_hc_encap (TC egress): health-check probes through the data path.
// ---------------------------------------------------------------------------------------------

/// TC actions (include/uapi/linux/pkt_cls.h).
const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

fn tc_action_name(a: i32) -> &'static str {
    match a {
        TC_ACT_UNSPEC => "TC_ACT_UNSPEC",
        TC_ACT_OK => "TC_ACT_OK",
        TC_ACT_SHOT => "TC_ACT_SHOT",
        TC_ACT_REDIRECT => "TC_ACT_REDIRECT",
        _ => "unknown TC action",
    }
}

/// A probe as the LB host's stack hands it to TC egress: from the host's own address to the
/// VIP, addressed to the default gateway's MAC (which the program must replace).
fn probe(vip: &VipAddr) -> Vec<u8> {
    Frame {
        src: LB_ADDR,
        tos: 0x10,
        payload: b"GET /health HTTP/1.0\r\n\r\n".to_vec(),
        ..tcp(vip.addr, vip.port)
    }
    .build()
}

impl Lb {
    fn hc_reasons(&self) -> Vec<(HcReason, u64)> {
        self.maps().hc_totals().expect("reading LB_HC_STATS")
    }

    /// Runs `lb_hc_encap` on `frame` with `mark` leaving by `ifindex`; checks the action, that
    /// exactly `reason` went up by one, and returns what the program left.
    fn run_hc(
        &self,
        frame: &[u8],
        mark: u32,
        ifindex: Option<u32>,
        action: i32,
        reason: HcReason,
    ) -> TcTestRun {
        let before = self.hc_reasons();
        let run = self
            .balancer
            .test_run_hc_encap(frame, mark, ifindex)
            .expect("BPF_PROG_TEST_RUN of lb_hc_encap");
        let moved = counter_deltas(&before, &self.hc_reasons());
        assert_eq!(
            (tc_action_name(run.action), &moved[..]),
            (tc_action_name(action), &[(reason, 1)][..]),
            "mark {mark:#x}: action and counters that moved"
        );
        run
    }

    /// Runs a marked probe expected to be dropped: the mark must not matter afterwards, but
    /// nothing may leave, and `lb_xdp`'s counters must not move.
    fn run_hc_dropped(&self, frame: &[u8], mark: u32, reason: HcReason) {
        let xdp_before = self.reasons();
        self.run_hc(frame, mark, Some(ifindex("d0")), TC_ACT_SHOT, reason);
        assert_eq!(self.reasons(), xdp_before, "lb_xdp counters moved");
    }
}

fn mark_of(id: u32) -> u32 {
    lb_common::hc_mark(id).expect("id within the mark block")
}

#[test]
fn health_check_probe_is_encapsulated_to_the_backend_its_mark_names() {
    netns_test(|| {
        let mut lb = Lb::load();
        let web = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            80,
            Proto::Tcp,
            &[backend(11), backend(12), backend(13)],
        );
        let input = probe(&web);
        for b in [backend(11), backend(12), backend(13)] {
            let id = lb.backend_id(&web, b);
            // Leaving by d0, where the backend is: sent on from here (no redirect).
            let run = lb.run_hc(
                &input,
                mark_of(id),
                Some(ifindex("d0")),
                TC_ACT_OK,
                HcReason::Encapsulated,
            );
            assert_encapsulated(&input, &run.frame, b);
            let (outer, inner) = (ETH_LEN, ETH_LEN + IPV4_LEN);
            assert_eq!(
                run.frame[outer + 4..outer + 6],
                run.frame[inner + 4..inner + 6],
                "outer identification copied from the inner header"
            );
            assert_eq!(
                run.mark, 0,
                "mark cleared, so a redirected copy is not encapsulated twice"
            );
        }
        // The balancer's own counters are untouched: probes are not client traffic.
        assert!(lb.reasons().iter().all(|&(_, n)| n == 0));
        assert_eq!(lb.vip_counters(&web), Counters::default());
    });
}

#[test]
fn health_check_probe_leaving_by_another_interface_is_redirected_to_the_backends_interface() {
    netns_test(|| {
        let mut lb = Lb::load();
        let web = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            80,
            Proto::Tcp,
            &[backend(14)],
        );
        let input = probe(&web);
        // Leaving by lo (the test run's default device): the backend is behind d0.
        let run = lb.run_hc(
            &input,
            mark_of(lb.backend_id(&web, backend(14))),
            None,
            TC_ACT_REDIRECT,
            HcReason::Encapsulated,
        );
        assert_encapsulated(&input, &run.frame, backend(14));
        assert_eq!(run.mark, 0);
    });
}

#[test]
fn packets_without_a_health_check_mark_pass_untouched_to_the_next_program() {
    netns_test(|| {
        let mut lb = Lb::load();
        let web = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            80,
            Proto::Tcp,
            &[backend(11)],
        );
        let input = probe(&web);
        let id = lb.backend_id(&web, backend(11));
        // Marks outside the block, including ones that share its low or high half.
        for mark in [
            0,
            1,
            id,
            0x4c41_0000 | id,
            0x4c43_0000 | id,
            0x0000_4c42,
            u32::MAX,
        ] {
            let run = lb.run_hc(
                &input,
                mark,
                Some(ifindex("d0")),
                TC_ACT_UNSPEC,
                HcReason::PassUnmarked,
            );
            assert_eq!(run.frame, input, "mark {mark:#x}: modified");
            assert_eq!(run.mark, mark, "mark {mark:#x}: changed");
        }
        // An ARP frame without a mark: not even looked at.
        let arp = ether(0x0806, &[0u8; 28]);
        let run = lb.run_hc(&arp, 0, None, TC_ACT_UNSPEC, HcReason::PassUnmarked);
        assert_eq!(run.frame, arp);
    });
}

#[test]
fn health_check_probe_that_cannot_take_the_data_path_is_dropped_with_its_reason() {
    netns_test(|| {
        let mut lb = Lb::load();
        let web = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            80,
            Proto::Tcp,
            &[backend(11)],
        );
        let unreachable = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 4),
            80,
            Proto::Tcp,
            &[NO_NEIGH_BACKEND, UNROUTED_BACKEND],
        );
        let input = probe(&web);
        let used: Vec<u32> = lb
            .registry
            .describe()
            .into_iter()
            .flat_map(|(_, _, bs)| bs.into_iter().map(|b| b.id))
            .collect();
        let empty_id = (0..32).find(|id| !used.contains(id)).expect("a free id");
        // `Lb::load` sizes LB_BACKENDS for 32 backends: ids 32 and up are beyond the table.
        for id in [empty_id, 32, 4096, 65_535] {
            lb.run_hc_dropped(&input, mark_of(id), HcReason::DropUnknownBackend);
        }
        for b in [NO_NEIGH_BACKEND, UNROUTED_BACKEND] {
            let mark = mark_of(lb.backend_id(&unreachable, b));
            lb.run_hc_dropped(&input, mark, HcReason::DropNoRoute);
        }

        let mark = mark_of(lb.backend_id(&web, backend(11)));
        let arp = ether(0x0806, &[0u8; 28]);
        lb.run_hc_dropped(&arp, mark, HcReason::DropNotIp);
        // EtherType IPv6 but a version-4 header, and the other way round: not what the
        // outer header would describe.
        let mut v4_in_v6 = input.clone();
        v4_in_v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        lb.run_hc_dropped(&v4_in_v6, mark, HcReason::DropNotIp);
        lb.run_hc_dropped(
            &with_byte(input.clone(), ETH_LEN, 0x60),
            mark,
            HcReason::DropNotIp,
        );
    });
}

#[test]
fn health_check_probe_that_would_exceed_the_egress_mtu_once_encapsulated_is_dropped() {
    netns_test(|| {
        run_cmd(&["ip", "link", "set", "d0", "mtu", "1000"]);
        let mut lb = Lb::load();
        let web = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            80,
            Proto::Tcp,
            &[backend(11)],
        );
        let mark = mark_of(lb.backend_id(&web, backend(11)));
        let of_ip_len = |ip_len: usize| Frame {
            src: LB_ADDR,
            payload: vec![0x5a; ip_len - IPV4_LEN - 20],
            ..tcp(web.addr, 80)
        };
        lb.run_hc_dropped(&of_ip_len(990).build(), mark, HcReason::DropMtu);
        // 980 + 20 = 1000: exactly the MTU.
        let fits = of_ip_len(980).build();
        let run = lb.run_hc(
            &fits,
            mark,
            Some(ifindex("d0")),
            TC_ACT_OK,
            HcReason::Encapsulated,
        );
        assert_encapsulated(&fits, &run.frame, backend(11));
    });
}

#[test]
fn health_check_probe_through_lb_decap_gives_back_the_original_packet() {
    netns_test(|| {
        let mut lb = Lb::load();
        let web = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            80,
            Proto::Tcp,
            &[backend(16)],
        );
        let decap = Decap::load(&[backend(16).into()]).expect("loading lb_decap");
        let input = probe(&web);
        let run = lb.run_hc(
            &input,
            mark_of(lb.backend_id(&web, backend(16))),
            Some(ifindex("d0")),
            TC_ACT_OK,
            HcReason::Encapsulated,
        );
        let out = decap_run(&decap, &run.frame, DecapReason::Decapsulated);
        assert_eq!(&out[ETH_LEN..], &input[ETH_LEN..], "the probe's IP packet");
    });
}

/// Names of the programs on `iface`'s tcx egress hook.
fn tcx_egress_programs(iface: &str) -> Vec<String> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let (_, progs) = SchedClassifier::query_tcx(iface, TcAttachType::Egress)
        .unwrap_or_else(|e| panic!("querying the tcx egress of {iface}: {e}"));
    progs
        .iter()
        .map(|p| p.name_as_str().unwrap_or("?").to_owned())
        .collect()
}

#[test]
fn health_check_encap_is_attached_to_egress_with_tcx_and_detached_when_the_balancer_drops() {
    netns_test(|| {
        let mut lb = Lb::load();
        assert!(tcx_egress_programs("d0").is_empty());
        lb.balancer
            .attach_hc_encap("d0")
            .expect("attaching lb_hc_encap to d0");
        assert_eq!(lb.balancer.hc_attached(), ["d0"]);
        assert_eq!(tcx_egress_programs("d0"), ["lb_hc_encap"]);
        drop(lb);
        assert!(
            tcx_egress_programs("d0").is_empty(),
            "lb_hc_encap outlived its Balancer"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Both address families: IPv6 VIPs, IPv6 backends, every combination of the two.
// ---------------------------------------------------------------------------------------------

/// An IPv4 frame carrying `inner_ip` behind protocol `proto` (4 or 41), to `outer_dst`.
fn ip4ip(outer_dst: Ipv4Addr, proto: u8, inner_ip: &[u8]) -> Vec<u8> {
    let mut f = ipip(outer_dst, inner_ip);
    f[ETH_LEN + 9] = proto;
    f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&[0, 0]);
    let c = packet::checksum(&f[ETH_LEN..ETH_LEN + IPV4_LEN]);
    f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
    f
}

const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);

#[test]
fn every_family_combination_is_encapsulated_in_the_backends_family() {
    netns_test(|| {
        let mut lb = Lb::load();
        let v4_vip = Ipv4Addr::new(198, 51, 100, 1);
        let six_in_six = lb.add_vip(VIP6, 80, Proto::Tcp, &[backend6(12)]);
        let six_in_four = lb.add_vip(VIP6, 53, Proto::Udp, &[backend(13)]);
        let four_in_six = lb.add_vip(v4_vip, 80, Proto::Tcp, &[backend6(14)]);
        let four_in_four = lb.add_vip(v4_vip, 53, Proto::Udp, &[backend(15)]);
        let cases: Vec<(&str, Vec<u8>, IpAddr, &VipAddr)> = vec![
            (
                "IPv6 VIP, IPv6 backend",
                Frame6 {
                    tclass: 0xb8,
                    payload: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
                    ..tcp6(VIP6, 80)
                }
                .build(),
                backend6(12).into(),
                &six_in_six,
            ),
            (
                "IPv6 VIP, IPv4 backend",
                Frame6 {
                    tclass: 0x10,
                    payload: vec![0xab; 33],
                    ..udp6(VIP6, 53)
                }
                .build(),
                backend(13).into(),
                &six_in_four,
            ),
            (
                "IPv4 VIP, IPv6 backend",
                Frame {
                    tos: 0x28,
                    payload: b"hello".to_vec(),
                    ..tcp(v4_vip, 80)
                }
                .build(),
                backend6(14).into(),
                &four_in_six,
            ),
            (
                "IPv4 VIP, IPv4 backend",
                udp(v4_vip, 53).build(),
                backend(15).into(),
                &four_in_four,
            ),
        ];
        for (name, input, backend, vip) in cases {
            let out = lb.run_encap(&input, backend);
            let (inner_len, _) = packet::ip_len_and_tos(&input).unwrap();
            assert_eq!(
                lb.vip_counters(vip),
                Counters {
                    packets: 1,
                    bytes: inner_len as u64,
                    new_flows: 1,
                    unhealthy_routing_flows: 0,
                    // Test runs send to another interface: reason `redirect`, counted here.
                    redirected: 1,
                    ..Counters::default()
                },
                "{name}: VIP counters"
            );
            if backend.is_ipv6() {
                // RFC 6438: the outer flow label is the flow's, the same for every packet.
                let label = packet::parse_outer(&out).unwrap().flow_label;
                assert_ne!(label, 0, "{name}: a flow label");
                let again = lb.run_encap(&input, backend);
                assert_eq!(packet::parse_outer(&again).unwrap().flow_label, label);
            }
        }
    });
}

/// RFC 6438 through a flow-table hit: the outer IPv6 header's flow label is the same for
/// every packet of a flow (the second packet of each flow below is a hit) and differs between
/// flows, whether they differ in the client's port or its address, IPv6 or IPv4 inside.
#[test]
fn outer_flow_labels_are_one_per_flow_and_differ_between_flows() {
    netns_test(|| {
        let mut lb = Lb::load();
        let v4_vip = Ipv4Addr::new(198, 51, 100, 1);
        let _six = lb.add_vip(VIP6, 80, Proto::Tcp, &[backend6(12)]);
        let _four = lb.add_vip(v4_vip, 80, Proto::Tcp, &[backend6(14)]);
        let label = |input: &[u8], backend: Ipv6Addr| {
            let first = packet::parse_outer(&lb.run_encap(input, backend))
                .unwrap()
                .flow_label;
            let hit = packet::parse_outer(&lb.run_encap(input, backend))
                .unwrap()
                .flow_label;
            assert_eq!(hit, first, "a flow's packets carry one label");
            first
        };
        const FLOWS: u16 = 64;
        let by_port: Vec<u32> = (0..FLOWS)
            .map(|i| {
                let f = Frame6 {
                    sport: 40_000 + i,
                    ..tcp6(VIP6, 80)
                };
                label(&f.build(), backend6(12))
            })
            .collect();
        let by_addr: Vec<u32> = (0..FLOWS)
            .map(|i| {
                let f = Frame6 {
                    src: Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0, 0, 0, 1 + i),
                    ..tcp6(VIP6, 80)
                };
                label(&f.build(), backend6(12))
            })
            .collect();
        let by_v4_port: Vec<u32> = (0..FLOWS)
            .map(|i| {
                let f = Frame {
                    sport: 40_000 + i,
                    ..tcp(v4_vip, 80)
                };
                label(&f.build(), backend6(14))
            })
            .collect();
        for (what, labels) in [
            ("client ports (IPv6)", &by_port),
            ("client addresses (IPv6)", &by_addr),
            ("client ports (IPv4 in IPv6)", &by_v4_port),
        ] {
            let distinct: std::collections::BTreeSet<u32> = labels.iter().copied().collect();
            // A well-spread 20-bit label gives 64 flows a colliding pair with probability
            // 0.2 %: two collisions are allowed (the frames are fixed, so is the outcome).
            assert!(
                distinct.len() >= usize::from(FLOWS) - 2,
                "{FLOWS} flows of different {what} got {} labels: {labels:x?}",
                distinct.len()
            );
            assert!(!distinct.contains(&0), "{what}: a flow without a label");
        }
    });
}

#[test]
fn ipv6_flows_stay_on_their_backend_and_are_keyed_by_their_five_tuple() {
    netns_test(|| {
        let mut lb = Lb::load();
        let web = lb.add_vip(VIP6, 80, Proto::Tcp, &[backend6(11), backend6(12)]);
        let syn = |sport: u16| {
            Frame6 {
                sport,
                ..tcp6(VIP6, 80)
            }
            .build()
        };
        let first = lb.backend_of(&syn(40_000));
        assert_eq!(lb.backend_of(&syn(40_000)), first);
        let flow = lb
            .maps()
            .flows
            .get(&flow_key(CLIENT6, 40_000, VIP6, 80, 6), 0)
            .expect("the flow is in LB_FLOWS under its IPv6 5-tuple");
        assert_eq!(flow.backend_id, lb.backend_id(&web, first));
        assert!(flow.created_ns > 0 && flow.last_seen_ns >= flow.created_ns);
        let chosen: std::collections::BTreeSet<IpAddr> =
            (0..32).map(|i| lb.backend_of(&syn(41_000 + i))).collect();
        assert_eq!(chosen.len(), 2, "32 IPv6 flows all went to {chosen:?}");
        // Adding backends keeps established flows.
        let before: Vec<IpAddr> = (0..32).map(|i| lb.backend_of(&syn(41_000 + i))).collect();
        lb.register(&web, &[backend6(13), backend6(14)]);
        let after: Vec<IpAddr> = (0..32).map(|i| lb.backend_of(&syn(41_000 + i))).collect();
        assert_eq!(before, after);
        assert_eq!(lb.vip_counters(&web).new_flows, 33);
    });
}

/// An IPv6 extension header of `len8` 8-octet units (`len8 - 1` in its length byte), the
/// next-header byte left for `Frame6::build`; `fill` for its option bytes (PadN-like zeros
/// are fine: lb_xdp does not read options).
fn ext(len8: usize) -> Vec<u8> {
    let mut h = vec![0u8; len8 * 8];
    h[1] = (len8 - 1) as u8;
    h
}

/// A routing header (type 4, segment routing) with `segments_left`.
fn routing(segments_left: u8) -> Vec<u8> {
    let mut h = ext(3); // two segments
    h[2] = 4;
    h[3] = segments_left;
    h
}

/// A fragment header: `offset` in 8-octet units, more-fragments flag `more`.
fn fragment(offset: u16, more: bool) -> Vec<u8> {
    let mut h = vec![0u8; 8];
    h[2..4].copy_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
    h[4..8].copy_from_slice(&0xabcd_0123u32.to_be_bytes());
    h
}

/// Runs a table of `(name, frame, action, reason)` through `lb_xdp`: each case must take
/// exactly its action and move exactly its one counter; passed and dropped frames must come
/// out byte-identical, encapsulated ones carry the input intact (checked against `backend`).
fn run_table(lb: &Lb, cases: &[(&str, Vec<u8>, u32, Reason)], backend: IpAddr) {
    let mut failures = Vec::new();
    for (name, input, action, reason) in cases {
        let before = lb.reasons();
        let (got, out) = match lb.balancer.test_run(input) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{name}: test run failed: {e}"));
                continue;
            }
        };
        let moved = counter_deltas(&before, &lb.reasons());
        if got != *action {
            failures.push(format!(
                "{name}: {} instead of {}",
                action_name(got),
                action_name(*action)
            ));
        }
        if moved != [(*reason, 1)] {
            failures.push(format!(
                "{name}: counters moved {moved:?}, expected {reason:?} +1"
            ));
        }
        if *action == XDP_REDIRECT {
            let ok = std::panic::catch_unwind(|| assert_encapsulated(input, &out, backend));
            if ok.is_err() {
                failures.push(format!("{name}: not encapsulated as expected"));
            }
        } else if out != *input {
            failures.push(format!("{name}: packet modified"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn ipv6_extension_headers_are_skipped_within_bounds_and_anything_else_is_passed_counted() {
    netns_test(|| {
        let mut lb = Lb::load();
        lb.add_vip(VIP6, 80, Proto::Tcp, &[backend6(11)]);
        lb.add_vip(VIP6, 53, Proto::Udp, &[backend6(11)]);
        let with_ext = |proto: u8, ext: Vec<(u8, Vec<u8>)>| {
            Frame6 {
                proto,
                ext,
                dport: if proto == 17 { 53 } else { 80 },
                ..tcp6(VIP6, 80)
            }
            .build()
        };
        let plain = tcp6(VIP6, 80).build();
        let ip = ETH_LEN;
        let cases: Vec<(&str, Vec<u8>, u32, Reason)> = vec![
            (
                "hop-by-hop, then TCP to a VIP",
                with_ext(6, vec![(0, ext(1))]),
                XDP_REDIRECT,
                Reason::Redirect,
            ),
            (
                "destination options (24 bytes), then UDP",
                with_ext(17, vec![(60, ext(3))]),
                XDP_REDIRECT,
                Reason::Redirect,
            ),
            (
                "routing header with no segments left (final destination), then TCP",
                with_ext(6, vec![(43, routing(0))]),
                XDP_REDIRECT,
                Reason::Redirect,
            ),
            (
                "four skippable headers (RFC 8200 §4.1 order), then TCP",
                with_ext(
                    6,
                    vec![(0, ext(1)), (60, ext(1)), (43, routing(0)), (60, ext(2))],
                ),
                XDP_REDIRECT,
                Reason::Redirect,
            ),
            (
                "five skippable headers: beyond the bound",
                with_ext(
                    6,
                    vec![
                        (0, ext(1)),
                        (60, ext(1)),
                        (60, ext(1)),
                        (60, ext(1)),
                        (60, ext(1)),
                    ],
                ),
                XDP_PASS,
                Reason::PassIpv6ExtHeader,
            ),
            (
                "a 2 KiB hop-by-hop header: beyond the 1 KiB bound",
                with_ext(6, vec![(0, ext(256))]),
                XDP_PASS,
                Reason::PassIpv6ExtHeader,
            ),
            (
                "routing header with segments left (this is not the destination)",
                with_ext(6, vec![(43, routing(1))]),
                XDP_PASS,
                Reason::PassIpv6ExtHeader,
            ),
            (
                "authentication header",
                with_ext(6, vec![(51, ext(2))]),
                XDP_PASS,
                Reason::PassIpv6ExtHeader,
            ),
            (
                "ESP",
                with_ext(6, vec![(50, ext(2))]),
                XDP_PASS,
                Reason::PassIpv6ExtHeader,
            ),
            (
                "mobility header",
                with_ext(6, vec![(135, ext(1))]),
                XDP_PASS,
                Reason::PassIpv6ExtHeader,
            ),
            (
                "hop-by-hop, then AH",
                with_ext(6, vec![(0, ext(1)), (51, ext(2))]),
                XDP_PASS,
                Reason::PassIpv6ExtHeader,
            ),
            (
                "no next header (59)",
                with_ext(59, vec![]),
                XDP_PASS,
                Reason::PassNotTcpUdp,
            ),
            (
                "SCTP to a VIP address",
                with_ext(132, vec![]),
                XDP_PASS,
                Reason::PassNotTcpUdp,
            ),
            (
                "ICMPv6 echo request to a VIP",
                Frame6 {
                    proto: 58,
                    payload: vec![128, 0, 0, 0, 0, 1, 0, 1],
                    ..tcp6(VIP6, 80)
                }
                .build(),
                XDP_PASS,
                Reason::PassNotTcpUdp,
            ),
            (
                "hop-by-hop, then TCP to an address that is no VIP",
                Frame6 {
                    ext: vec![(0, ext(1))],
                    ..tcp6(Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 9), 80)
                }
                .build(),
                XDP_PASS,
                Reason::PassNotVip,
            ),
            (
                "TCP to the VIP address on another port",
                tcp6(VIP6, 8080).build(),
                XDP_PASS,
                Reason::PassNotVip,
            ),
            (
                "extension header cut off by the frame",
                truncated(with_ext(6, vec![(60, ext(2))]), ETH_LEN + IPV6_LEN + 10),
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "extension header beyond the payload length (frame padded)",
                {
                    let mut f = with_ext(6, vec![(60, ext(1))]);
                    f[ip + 4..ip + 6].copy_from_slice(&4u16.to_be_bytes());
                    f
                },
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "TCP header truncated by the payload length",
                {
                    let mut f = plain.clone();
                    f[ip + 4..ip + 6].copy_from_slice(&10u16.to_be_bytes());
                    f
                },
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "payload length beyond the frame",
                {
                    let mut f = plain.clone();
                    f[ip + 4..ip + 6].copy_from_slice(&1000u16.to_be_bytes());
                    f
                },
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "IPv6 header truncated (39 of 40 bytes)",
                truncated(plain.clone(), ETH_LEN + 39),
                XDP_PASS,
                Reason::PassMalformed,
            ),
            (
                "version 4 behind EtherType IPv6",
                with_byte(plain.clone(), ip, 0x45),
                XDP_PASS,
                Reason::PassMalformed,
            ),
        ];
        run_table(&lb, &cases, backend6(11).into());
    });
}

#[test]
fn ipv6_fragments_to_a_vip_are_dropped_and_counted_once() {
    netns_test(|| {
        let mut lb = Lb::load();
        let exact = VIP6;
        let any = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 2);
        lb.add_vip(exact, 80, Proto::Tcp, &[backend6(11)]);
        lb.add_vip(any, 0, Proto::Tcp, &[backend6(11)]);
        let frag = |dst: Ipv6Addr, proto: u8, headers: Vec<(u8, Vec<u8>)>| {
            Frame6 {
                proto,
                ext: headers,
                ..tcp6(dst, 80)
            }
            .build()
        };
        let cases: Vec<(&str, Vec<u8>, u32, Reason)> = vec![
            (
                "first fragment (M) of TCP to a VIP",
                frag(exact, 6, vec![(44, fragment(0, true))]),
                XDP_DROP,
                Reason::DropFragment,
            ),
            (
                "last fragment (offset 1480) of TCP to a VIP",
                frag(exact, 6, vec![(44, fragment(185, false))]),
                XDP_DROP,
                Reason::DropFragment,
            ),
            (
                "atomic fragment (offset 0, no M; RFC 8021) to a VIP",
                frag(exact, 6, vec![(44, fragment(0, false))]),
                XDP_DROP,
                Reason::DropFragment,
            ),
            (
                "hop-by-hop, then a fragment header, to a VIP",
                frag(exact, 6, vec![(0, ext(1)), (44, fragment(0, true))]),
                XDP_DROP,
                Reason::DropFragment,
            ),
            (
                "fragment to a port-0 VIP",
                frag(any, 6, vec![(44, fragment(10, true))]),
                XDP_DROP,
                Reason::DropFragment,
            ),
            (
                "UDP fragment to an address with only TCP VIPs",
                frag(exact, 17, vec![(44, fragment(10, true))]),
                XDP_PASS,
                Reason::PassNotVip,
            ),
            (
                "TCP fragment to an address that is no VIP",
                frag(
                    Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 9),
                    6,
                    vec![(44, fragment(0, true))],
                ),
                XDP_PASS,
                Reason::PassNotVip,
            ),
            (
                "ICMPv6 in a fragment to a VIP address",
                frag(exact, 58, vec![(44, fragment(0, true))]),
                XDP_PASS,
                Reason::PassNotTcpUdp,
            ),
            (
                "destination options inside a fragment to a VIP address",
                frag(exact, 6, vec![(44, fragment(0, true)), (60, ext(1))]),
                XDP_PASS,
                Reason::PassIpv6ExtHeader,
            ),
        ];
        run_table(&lb, &cases, backend6(11).into());
        // Positive control: the same packet without a fragment header is balanced.
        lb.run_encap(&tcp6(exact, 80).build(), backend6(11));
        lb.run_encap(&tcp6(any, 443).build(), backend6(11));
    });
}

/// The ICMPv6 checksum of `msg` (RFC 4443 §2.3) between `src` and `dst`: 0 if it verifies.
fn icmpv6_checksum(src: &[u8], dst: &[u8], msg: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    pseudo.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(msg);
    packet::checksum(&pseudo)
}

#[test]
fn ipv6_packets_that_no_longer_fit_are_answered_with_packet_too_big() {
    netns_test(|| {
        run_cmd(&["ip", "link", "set", "d0", "mtu", "1400"]);
        let mut lb = Lb::load();
        let over_v6 = lb.add_vip(VIP6, 80, Proto::Tcp, &[backend6(11)]);
        let over_v4 = lb.add_vip(VIP6, 443, Proto::Tcp, &[backend(12)]);
        let of_len = |dport: u16, ip_len: usize| {
            Frame6 {
                payload: vec![0x5a; ip_len - IPV6_LEN - 20],
                ..tcp6(VIP6, dport)
            }
            .build()
        };
        for (vip, overhead) in [(&over_v6, IPV6_LEN), (&over_v4, IPV4_LEN)] {
            let room = 1400 - overhead;
            let big = of_len(vip.port, room + 1);
            let out = lb.run(&big, XDP_TX, Reason::TxIcmpTooBig);
            assert_eq!(out.len(), ETH_LEN + IPV6_LEN + 8 + 128, "{out:02x?}");
            assert_eq!(&out[0..6], &big[6..12], "Ethernet destination: the sender");
            assert_eq!(&out[6..12], &big[0..6], "Ethernet source: us");
            assert_eq!(&out[12..14], &[0x86, 0xdd]);
            let ip = &out[ETH_LEN..ETH_LEN + IPV6_LEN];
            assert_eq!(ip[0] >> 4, 6);
            assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 136, "payload length");
            assert_eq!((ip[6], ip[7]), (58, 64), "ICMPv6, hop limit 64");
            assert_eq!(&ip[8..24], &VIP6.octets(), "from the VIP");
            assert_eq!(&ip[24..40], &CLIENT6.octets(), "to the client");
            let icmp = &out[ETH_LEN + IPV6_LEN..];
            assert_eq!((icmp[0], icmp[1]), (2, 0), "packet too big");
            assert_eq!(
                u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]) as usize,
                room,
                "MTU: what fits after encapsulation"
            );
            assert_eq!(
                &icmp[8..],
                &big[ETH_LEN..ETH_LEN + 128],
                "quotes the first 128 bytes of the offending packet"
            );
            assert_eq!(icmpv6_checksum(&ip[8..24], &ip[24..40], icmp), 0);
            // Exactly the room: encapsulated.
            lb.run_encap(
                &of_len(vip.port, room),
                if overhead == IPV6_LEN {
                    IpAddr::from(backend6(11))
                } else {
                    backend(12).into()
                },
            );
        }
        // IPv4 VIP over IPv6: fragmentation needed with the room an IPv6 outer header leaves.
        let v4_vip = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            80,
            Proto::Tcp,
            &[backend6(13)],
        );
        let big4 = Frame {
            payload: vec![0x5a; 1400 - IPV6_LEN + 1 - IPV4_LEN - 20],
            ..tcp(v4_vip.addr, 80)
        }
        .build();
        let out = lb.run(&big4, XDP_TX, Reason::TxIcmpTooBig);
        let icmp = &out[ETH_LEN + IPV4_LEN..];
        assert_eq!((icmp[0], icmp[1]), (3, 4));
        assert_eq!(
            usize::from(u16::from_be_bytes([icmp[6], icmp[7]])),
            1400 - IPV6_LEN
        );
    });
}

#[test]
fn ipv6_packet_too_big_is_not_sent_below_the_ipv6_minimum_mtu() {
    netns_test(|| {
        // 1300 - 40 = 1260 < 1280: no sender may be told to go below 1280 (RFC 8201 §4).
        run_cmd(&["ip", "link", "set", "d0", "mtu", "1300"]);
        let mut lb = Lb::load();
        lb.add_vip(VIP6, 80, Proto::Tcp, &[backend6(11)]);
        let big = Frame6 {
            payload: vec![0x5a; 1261 - IPV6_LEN - 20],
            ..tcp6(VIP6, 80)
        }
        .build();
        lb.run_untouched(&big, XDP_DROP, Reason::DropMtu);
        // Positive control: what fits is encapsulated.
        let fits = Frame6 {
            payload: vec![0x5a; 1260 - IPV6_LEN - 20],
            ..tcp6(VIP6, 80)
        }
        .build();
        lb.run_encap(&fits, backend6(11));
    });
}

// ---------------------------------------------------------------------------------------------
// ICMP errors about VIP flows go to the flow's backend.
// ---------------------------------------------------------------------------------------------

/// ICMP destination unreachable / fragmentation needed (RFC 1191) from a router to the VIP,
/// quoting the backend's reply `quoted` (its IP header and the first 8 bytes after it).
fn icmp_frag_needed(vip: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let mut msg = vec![3, 4, 0, 0, 0, 0, 0x05, 0x00]; // next-hop MTU 1280
    msg.extend_from_slice(&quoted[ETH_LEN..ETH_LEN + IPV4_LEN + 8]);
    let c = packet::checksum(&msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    Frame {
        src: Ipv4Addr::new(203, 0, 113, 1),
        dst: vip,
        proto: 1,
        payload: msg,
        ..Frame::default()
    }
    .build()
}

/// ICMPv6 packet too big from a router to the VIP, quoting `quoted` whole.
fn icmp6_too_big(vip: Ipv6Addr, quoted: &[u8]) -> Vec<u8> {
    let mut msg = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00];
    msg.extend_from_slice(&quoted[ETH_LEN..]);
    Frame6 {
        src: Ipv6Addr::new(0x2001, 0xdb8, 0xfe, 0, 0, 0, 0, 1),
        dst: vip,
        proto: 58,
        payload: msg,
        ..Frame6::default()
    }
    .build()
}

#[test]
fn icmp_errors_quoting_a_vip_flow_reach_the_backend_of_that_flow_intact() {
    netns_test(|| {
        let mut lb = Lb::load();
        let vip4 = Ipv4Addr::new(198, 51, 100, 1);
        let web4 = lb.add_vip(vip4, 80, Proto::Tcp, &[backend(11), backend(12)]);
        let web6 = lb.add_vip(VIP6, 80, Proto::Tcp, &[backend6(11), backend6(12)]);
        // Flows pinned before the rings change: their ICMP must follow the flow table, not
        // the new ring.
        let ports: Vec<u16> = (0..24).map(|i| 47_000 + i).collect();
        let owners4: Vec<IpAddr> = ports
            .iter()
            .map(|&p| lb.backend_of(&client_syn(&web4, p)))
            .collect();
        let owners6: Vec<IpAddr> = ports
            .iter()
            .map(|&p| {
                lb.backend_of(
                    &Frame6 {
                        sport: p,
                        ..tcp6(VIP6, 80)
                    }
                    .build(),
                )
            })
            .collect();
        lb.register(&web4, &[backend(13), backend(14), backend(15)]);
        lb.register(&web6, &[backend6(13), backend6(14), backend6(15)]);
        let flows_before = (
            lb.vip_counters(&web4).new_flows,
            lb.vip_counters(&web6).new_flows,
        );
        for (i, &p) in ports.iter().enumerate() {
            // The backend's reply (VIP → client), as a router quotes it.
            let reply4 = Frame {
                src: vip4,
                dst: CLIENT,
                sport: 80,
                dport: p,
                ..Frame::default()
            }
            .build();
            let icmp = icmp_frag_needed(vip4, &reply4);
            let key = flow_key(CLIENT, p, vip4, 80, 6);
            let seen = lb.maps().flows.get(&key, 0).unwrap().last_seen_ns;
            let out = lb.run(&icmp, XDP_REDIRECT, Reason::IcmpToBackend);
            assert_encapsulated(&icmp, &out, owners4[i]);
            assert_eq!(
                lb.maps().flows.get(&key, 0).unwrap().last_seen_ns,
                seen,
                "an ICMP error does not keep its flow alive"
            );

            let reply6 = Frame6 {
                src: VIP6,
                dst: CLIENT6,
                sport: 80,
                dport: p,
                ..Frame6::default()
            }
            .build();
            let icmp6 = icmp6_too_big(VIP6, &reply6);
            let out = lb.run(&icmp6, XDP_REDIRECT, Reason::IcmpToBackend);
            assert_encapsulated(&icmp6, &out, owners6[i]);
        }
        assert_eq!(
            (
                lb.vip_counters(&web4).new_flows,
                lb.vip_counters(&web6).new_flows
            ),
            flows_before,
            "ICMP errors create no flows"
        );
    });
}

#[test]
fn icmp_that_is_no_error_about_a_vip_flow_is_passed_with_one_counter() {
    netns_test(|| {
        let mut lb = Lb::load();
        let vip4 = Ipv4Addr::new(198, 51, 100, 1);
        lb.add_vip(vip4, 80, Proto::Tcp, &[backend(11)]);
        lb.add_vip(VIP6, 80, Proto::Tcp, &[backend6(11)]);
        let reply4 = |src: Ipv4Addr, sport: u16| {
            Frame {
                src,
                dst: CLIENT,
                sport,
                dport: 40_000,
                ..Frame::default()
            }
            .build()
        };
        let reply6 = |src: Ipv6Addr, sport: u16| {
            Frame6 {
                src,
                dst: CLIENT6,
                sport,
                dport: 40_000,
                ..Frame6::default()
            }
            .build()
        };
        let mut short_quote = icmp_frag_needed(vip4, &reply4(vip4, 80));
        let cut = short_quote.len() - 8;
        short_quote.truncate(cut);
        let len = (short_quote.len() - ETH_LEN) as u16;
        short_quote = with_tot_len(short_quote, len);
        let cases: Vec<(&str, Vec<u8>, u32, Reason)> = vec![
            (
                "frag-needed quoting a packet from an address that is no VIP",
                icmp_frag_needed(vip4, &reply4(NOT_A_VIP, 80)),
                XDP_PASS,
                Reason::PassNotVip,
            ),
            (
                "frag-needed quoting the VIP address from another port",
                icmp_frag_needed(vip4, &reply4(vip4, 8080)),
                XDP_PASS,
                Reason::PassNotVip,
            ),
            (
                "frag-needed whose quote stops before the ports",
                short_quote,
                XDP_PASS,
                Reason::PassNotTcpUdp,
            ),
            (
                "ICMP echo request to the VIP",
                Frame {
                    dst: vip4,
                    proto: 1,
                    payload: vec![8, 0, 0, 0, 0, 1, 0, 1],
                    ..Frame::default()
                }
                .build(),
                XDP_PASS,
                Reason::PassNotTcpUdp,
            ),
            (
                "ICMP time exceeded quoting a VIP flow (not forwarded)",
                {
                    let mut f = icmp_frag_needed(vip4, &reply4(vip4, 80));
                    f[ETH_LEN + IPV4_LEN] = 11;
                    f
                },
                XDP_PASS,
                Reason::PassNotTcpUdp,
            ),
            (
                "packet too big quoting a packet from an address that is no VIP",
                icmp6_too_big(
                    VIP6,
                    &reply6(Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 9), 80),
                ),
                XDP_PASS,
                Reason::PassNotVip,
            ),
            (
                "ICMPv6 neighbour solicitation",
                Frame6 {
                    proto: 58,
                    payload: vec![135, 0, 0, 0, 0, 0, 0, 0],
                    ..tcp6(VIP6, 80)
                }
                .build(),
                XDP_PASS,
                Reason::PassNotTcpUdp,
            ),
        ];
        run_table(&lb, &cases, backend(11).into());
    });
}

// ---------------------------------------------------------------------------------------------
// Flow idle timeouts and flow-table accounting.
// ---------------------------------------------------------------------------------------------

/// Pretends `key`'s flow was last seen `ago` before now (as if it had been idle that long).
fn age_flow(lb: &mut Lb, key: &FlowKey, ago: Duration) {
    set_last_seen(
        lb,
        key,
        lb::l4::flows::monotonic_ns() - ago.as_nanos() as u64,
    );
}

/// A UDP VIP 198.51.100.1:53 with a 30 s idle timeout and one backend.
fn dns_vip_idle_30s(lb: &mut Lb) -> VipAddr {
    let mut spec = VipSpec::new(
        None,
        VipAddr {
            addr: Ipv4Addr::new(198, 51, 100, 1).into(),
            port: 53,
            proto: Proto::Udp,
        },
    );
    spec.idle_timeout = Duration::from_secs(30);
    lb.add_vip_spec(spec, &[backend(11)])
}

#[test]
fn a_flow_idle_beyond_its_vips_timeout_is_steered_as_new_and_one_within_it_is_not() {
    netns_test(|| {
        let mut lb = Lb::load();
        let dns = dns_vip_idle_30s(&mut lb);
        let ports: Vec<u16> = (0..40).map(|i| 48_000 + i).collect();
        let dgram = |p: u16| {
            Frame {
                sport: p,
                ..udp(dns.addr, 53)
            }
            .build()
        };
        for &p in &ports {
            assert_eq!(lb.backend_of(&dgram(p)), IpAddr::from(backend(11)));
        }
        // The ring changes: only the flow table keeps flows on backend 11 now.
        lb.register(&dns, &[backend(12), backend(13)]);
        let (stale, fresh) = ports.split_at(20);
        for &p in stale {
            age_flow(
                &mut lb,
                &flow_key(CLIENT, p, dns.addr, 53, 17),
                Duration::from_secs(31),
            );
        }
        for &p in fresh {
            age_flow(
                &mut lb,
                &flow_key(CLIENT, p, dns.addr, 53, 17),
                Duration::from_secs(29),
            );
        }
        let flows_before = lb.vip_counters(&dns).new_flows;
        for &p in fresh {
            assert_eq!(
                lb.backend_of(&dgram(p)),
                IpAddr::from(backend(11)),
                "flow from port {p}, idle 29 s of 30, stays"
            );
        }
        assert_eq!(lb.vip_counters(&dns).new_flows, flows_before);
        let moved = stale
            .iter()
            .filter(|&&p| lb.backend_of(&dgram(p)) != IpAddr::from(backend(11)))
            .count();
        assert_eq!(
            lb.vip_counters(&dns).new_flows,
            flows_before + stale.len() as u64,
            "every expired flow was steered as a new one"
        );
        assert!(moved > 0, "some expired flows went where the new ring says");
        // Re-steered flows start over: created now, not 31 s ago.
        let v = lb
            .maps()
            .flows
            .get(&flow_key(CLIENT, stale[0], dns.addr, 53, 17), 0)
            .unwrap();
        assert!(lb::l4::flows::monotonic_ns() - v.created_ns < 5_000_000_000);
        assert_eq!(
            lb.maps().flow_inserts().unwrap(),
            ports.len() as u64,
            "re-steering rewrites an entry, it inserts no new key"
        );
    });
}

#[test]
fn the_flow_sweeper_counts_live_flows_the_lru_evicted_and_deletes_expired_ones() {
    netns_test(|| {
        use lb::l4::flows::{SweepResult, account, monotonic_ns};
        // One CPU inserts every flow, so the LRU at work is that CPU's share of the table:
        // 256 entries (see a_cpu_inserting_into_a_full_flow_table_evicts_only_from_its_own_share).
        pin_thread_to(online_cpus()[0]);
        let cpus = aya::util::nr_cpus().expect("possible CPUs") as u32;
        let mut lb = Lb::with_flows(256 * cpus);
        let web = lb.add_vip(
            Ipv4Addr::new(198, 51, 100, 1),
            80,
            Proto::Tcp,
            &[backend(11)],
        );
        let vip_id = lb.vip_id(&web);
        let timeouts: std::collections::HashMap<u32, u64> = [(vip_id, 350_000_000_000)].into();
        let sweep = |lb: &mut Lb, now_ns: u64, prev| {
            let maps = lb.registry.maps_mut();
            let inserts = maps.flow_inserts().unwrap();
            let (entries, expired) = maps.sweep_flows(now_ns, &timeouts).unwrap();
            account(
                prev,
                SweepResult {
                    inserts,
                    deleted_by_writer: 0,
                    expired,
                    entries,
                    now_ns,
                    nat_entries: 0,
                },
            )
        };
        // Positive control: fewer flows than the table holds, nothing evicted.
        for i in 0..100u16 {
            lb.backend_of(&client_syn(&web, 10_000 + i));
        }
        let s = sweep(&mut lb, monotonic_ns(), Default::default());
        assert_eq!((s.entries, s.evicted_live, s.expired), (100, 0, 0), "{s:?}");
        // 900 more: the LRU must evict at least 744 live ones.
        for i in 0..900u16 {
            lb.backend_of(&client_syn(&web, 20_000 + i));
        }
        let s = sweep(&mut lb, monotonic_ns(), s);
        assert!(s.entries <= 256, "{s:?}");
        assert_eq!(
            s.evicted_live,
            1000 - s.entries,
            "every key inserted and not in the table was evicted: {s:?}"
        );
        assert!(s.evicted_live >= 744, "{s:?}");
        // 400 s later every flow is expired: the sweep deletes them, evictions stay.
        let later = sweep(&mut lb, monotonic_ns() + 400_000_000_000, s);
        assert_eq!(later.entries, 0, "{later:?}");
        assert_eq!(later.expired, s.entries);
        assert_eq!(later.evicted_live, s.evicted_live);
        assert_eq!(lb.maps().flows.keys().count(), 0);
    });
}

/// Pins the calling thread to `cpu`: `BPF_PROG_TEST_RUN` runs the program on the caller's CPU,
/// so every flow it inserts then lands in that CPU's share of the flow table.
fn pin_thread_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it for cpu < CPU_SETSIZE.
    let ok = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0
    };
    assert!(
        ok,
        "pinning to cpu {cpu}: {}",
        std::io::Error::last_os_error()
    );
}

/// The online CPUs (the ones a thread can be pinned to).
fn online_cpus() -> Vec<usize> {
    aya::util::online_cpus()
        .expect("reading the online CPUs")
        .into_iter()
        .map(|c| c as usize)
        .collect()
}

#[test]
fn a_cpu_inserting_into_a_full_flow_table_evicts_only_from_its_own_share() {
    netns_test(|| {
        const SHARE: u32 = 256;
        let (lb, web) = Lb::with_flow_share(SHARE, &[backend(11)]);
        let cpus = aya::util::nr_cpus().expect("possible CPUs") as u32;
        let online = online_cpus();
        pin_thread_to(online[0]);
        let entries = Lb::flow_entries;
        // Positive control: below the CPU's share nothing is evicted.
        for i in 0..200u16 {
            lb.backend_of(&client_syn(&web, 10_000 + i));
        }
        assert_eq!(entries(&lb), 200);
        // Four shares' worth from the same CPU: only its share is used. (One LRU list for all
        // CPUs would let this CPU fill the whole table, SHARE * cpus entries.) The kernel
        // frees a few entries ahead when it evicts, so the share may be a little short.
        for i in 0..(4 * SHARE) as u16 {
            lb.backend_of(&client_syn(&web, 20_000 + i));
        }
        let one_cpu = entries(&lb);
        assert!(
            (SHARE - 8..=SHARE).contains(&one_cpu),
            "one CPU's inserts hold {one_cpu} entries of a {} table ({cpus} CPUs)",
            SHARE * cpus
        );
        // Another CPU's inserts take its own share and evict nothing of the first CPU's.
        let Some(&other) = online.get(1) else {
            eprintln!("one online CPU: the second half of this test needs two");
            return;
        };
        pin_thread_to(other);
        for i in 0..100u16 {
            lb.backend_of(&client_syn(&web, 40_000 + i));
        }
        assert_eq!(entries(&lb), one_cpu + 100);
    });
}

/// An opening SYN is inserted before it is looked up (`BPF_NOEXIST`), and the kernel takes a
/// free entry before it finds the key there: in a full share a retransmitted SYN may make the
/// kernel evict a batch of the CPU's least recently used flows (4 with per-CPU lists), but
/// the failed insert gives its entry back, so a burst of retransmitted SYNs evicts about one
/// batch, not a flow per SYN, and every flow keeps its backend. (Measured: 4 evicted, 1–2 of
/// them flows re-sent later in the burst; with `BPF_ANY` every re-sent SYN re-creates its
/// flow and the test fails.)
#[test]
fn retransmitted_syns_into_a_full_flow_table_keep_their_flows_and_evict_at_most_a_batch() {
    netns_test(|| {
        const SHARE: u32 = 256;
        let (lb, web) = Lb::with_flow_share(SHARE, &[backend(11), backend(12), backend(13)]);
        pin_thread_to(online_cpus()[0]);
        let entries = Lb::flow_entries;
        // Two shares' worth from one CPU: its share is full and evicting.
        for i in 0..(2 * SHARE) as u16 {
            lb.backend_of(&client_syn(&web, 20_000 + i));
        }
        let live: Vec<(u16, u32)> = lb
            .maps()
            .flows
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| {
                let v = lb.maps().flows.get(&k, 0).ok()?;
                Some((u16::from_be(k.src_port), v.backend_id))
            })
            .take(100)
            .collect();
        assert_eq!(live.len(), 100, "a full share holds 100 flows to re-send");
        let before = entries(&lb);
        let new_flows = lb.vip_counters(&web).new_flows;
        for &(port, id) in &live {
            let to = lb.backend_of(&client_syn(&web, port));
            assert_eq!(
                lb.backend_id(&web, to),
                id,
                "the flow from port {port} moved"
            );
        }
        let after = entries(&lb);
        let recreated = (lb.vip_counters(&web).new_flows - new_flows) as u32;
        // Evicted: what left the table, plus the re-sent flows that had been evicted before
        // their SYN came (re-created from the ring, on the same backend: the ring is
        // unchanged).
        let evicted = before + recreated - after;
        assert!(
            evicted <= 8,
            "100 retransmitted SYNs evicted {evicted} flows ({before} -> {after} entries, \
             {recreated} re-created)"
        );
    });
}

/// Sets `key`'s `last_seen_ns` to `value` (as the program's clock would have).
fn set_last_seen(lb: &mut Lb, key: &FlowKey, value: u64) {
    let maps = lb.registry.maps_mut();
    let mut v = maps.flows.get(key, 0).expect("the flow exists");
    v.last_seen_ns = value;
    v.created_ns = v.created_ns.min(value);
    maps.flows.insert(key, v, 0).expect("rewriting the flow");
}

#[test]
fn flow_times_come_from_the_tick_clock_and_a_hit_rewrites_last_seen_only_when_it_moved_on() {
    netns_test(|| {
        use lb::l4::flows::monotonic_ns;
        let mut lb = Lb::load();
        let dns = dns_vip_idle_30s(&mut lb);
        let dgram = Frame {
            sport: 47_000,
            ..udp(dns.addr, 53)
        }
        .build();
        let key = flow_key(CLIENT, 47_000, dns.addr, 53, 17);
        // The README's accuracy: never ahead of CLOCK_MONOTONIC, behind it by less than a
        // tick (1–10 ms). The lower bound here is generous (a loaded VM delays ticks); what
        // the whole-second idle timeouts need is far below it.
        let slack = Duration::from_secs(1).as_nanos() as u64;

        let before = monotonic_ns();
        assert_eq!(lb.backend_of(&dgram), IpAddr::from(backend(11)));
        let after = monotonic_ns();
        let v = lb.maps().flows.get(&key, 0).unwrap();
        assert!(
            v.created_ns <= after && v.created_ns + slack >= before,
            "created {} within [{before} - 1 s, {after}]",
            v.created_ns
        );
        assert_eq!(v.last_seen_ns, v.created_ns);

        // A flow last seen 29 s ago (of 30): the hit keeps it and moves last_seen to now.
        age_flow(&mut lb, &key, Duration::from_secs(29));
        let before = monotonic_ns();
        assert_eq!(lb.backend_of(&dgram), IpAddr::from(backend(11)));
        let after = monotonic_ns();
        let seen = lb.maps().flows.get(&key, 0).unwrap().last_seen_ns;
        assert!(
            seen <= after && seen + slack >= before,
            "refreshed to {seen}, within [{before} - 1 s, {after}]"
        );

        // A stored time the clock has not passed yet (as after a packet earlier in the same
        // tick; here set ahead, so that the clock cannot move past it during the test): the
        // hit uses the flow and leaves the entry unwritten.
        let ahead = monotonic_ns() + 60_000_000_000;
        set_last_seen(&mut lb, &key, ahead);
        let flows_before = lb.vip_counters(&dns).new_flows;
        assert_eq!(lb.backend_of(&dgram), IpAddr::from(backend(11)));
        assert_eq!(lb.vip_counters(&dns).new_flows, flows_before, "still a hit");
        assert_eq!(
            lb.maps().flows.get(&key, 0).unwrap().last_seen_ns,
            ahead,
            "not rewritten while the clock has not moved past it"
        );
    });
}

#[test]
fn the_flow_clock_runs_at_the_rate_of_clock_monotonic() {
    // lb_xdp's clock is jiffies times the tick the loader measured: a wrong unit (another
    // CONFIG_HZ's tick) makes it run fast or slow, which the absolute check above does not
    // see right after the offset was measured. Two new flows 1.5 s apart: their creation
    // times are as far apart as CLOCK_MONOTONIC's readings around them, within a few ticks.
    netns_test(|| {
        use lb::l4::flows::monotonic_ns;
        let mut lb = Lb::load();
        let dns = dns_vip_idle_30s(&mut lb);
        let created = |lb: &mut Lb, sport: u16| {
            let dgram = Frame {
                sport,
                ..udp(dns.addr, 53)
            }
            .build();
            let before = monotonic_ns();
            assert_eq!(lb.backend_of(&dgram), IpAddr::from(backend(11)));
            let after = monotonic_ns();
            let key = flow_key(CLIENT, sport, dns.addr, 53, 17);
            (
                before,
                lb.maps().flows.get(&key, 0).unwrap().created_ns,
                after,
            )
        };
        let (b1, c1, a1) = created(&mut lb, 47_100);
        std::thread::sleep(Duration::from_millis(1_500));
        let (b2, c2, a2) = created(&mut lb, 47_101);
        let flow = c2.wrapping_sub(c1) as i64;
        // Three ticks at HZ=100 of slack on each side, beside the readings' own spread.
        let slack = 30_000_000i64;
        let (least, most) = ((b2 - a1) as i64, (a2 - b1) as i64);
        assert!(
            flow >= least - slack && flow <= most + slack,
            "the flow clock advanced {flow} ns while CLOCK_MONOTONIC advanced {least}..{most} ns"
        );
        // Positive control: the same readings with a clock 4/10 of a tick too fast or too
        // slow per tick would be far outside the window (≥ 0.6 s over 1.5 s).
        assert!(flow * 6 / 10 < least - slack && flow * 14 / 10 > most + slack);
    });
}

// ---------------------------------------------------------------------------------------------
// lb_decap: every encapsulation lb_xdp emits.
// ---------------------------------------------------------------------------------------------

#[test]
fn decap_strips_every_outer_family_from_every_inner_family() {
    let decap = load_decap(&[IpAddr::from(backend(11)), IpAddr::from(backend6(11))]);
    let inner4 = Frame {
        payload: b"four".to_vec(),
        ..Frame::default()
    }
    .build();
    let inner6 = Frame6 {
        payload: b"six".to_vec(),
        ..Frame6::default()
    }
    .build();
    let cases = [
        ("4in4", ip4ip(backend(11), 4, &inner4[ETH_LEN..]), &inner4),
        ("6in4", ip4ip(backend(11), 41, &inner6[ETH_LEN..]), &inner6),
        ("4in6", ip6ip(backend6(11), 4, &inner4[ETH_LEN..]), &inner4),
        ("6in6", ip6ip(backend6(11), 41, &inner6[ETH_LEN..]), &inner6),
    ];
    for (name, encapsulated, inner) in cases {
        let out = decap_run(&decap, &encapsulated, DecapReason::Decapsulated);
        assert_eq!(
            &out[..12],
            &encapsulated[..12],
            "{name}: MAC addresses kept"
        );
        assert_eq!(
            &out[12..14],
            &inner[12..14],
            "{name}: EtherType of the inner family"
        );
        assert_eq!(
            &out[ETH_LEN..],
            &inner[ETH_LEN..],
            "{name}: exactly the inner packet"
        );
    }
    let not_ours: Vec<(&str, Vec<u8>, DecapReason)> = vec![
        (
            "IPv6 outer for another address",
            ip6ip(backend6(12), 41, &inner6[ETH_LEN..]),
            DecapReason::Passed,
        ),
        (
            "IPv6 outer carrying UDP",
            ip6ip(backend6(11), 17, &inner4[ETH_LEN..]),
            DecapReason::Passed,
        ),
        (
            "IPv4 outer to the IPv6 address's words (family differs)",
            ip4ip(Ipv4Addr::new(0xfd, 0, 0, 0), 41, &inner6[ETH_LEN..]),
            DecapReason::Passed,
        ),
        (
            "6in6 with a truncated inner header",
            ip6ip(backend6(11), 41, &inner6[ETH_LEN..ETH_LEN + 30]),
            DecapReason::PassMalformed,
        ),
        (
            "protocol 41 carrying IPv4",
            ip4ip(backend(11), 41, &inner4[ETH_LEN..]),
            DecapReason::PassMalformed,
        ),
        (
            "next header 4 carrying IPv6",
            ip6ip(backend6(11), 4, &inner6[ETH_LEN..]),
            DecapReason::PassMalformed,
        ),
        ("plain IPv6 TCP", inner6.clone(), DecapReason::Passed),
    ];
    for (name, input, reason) in not_ours {
        let out = decap_run(&decap, &input, reason);
        assert_eq!(out, input, "{name}: modified");
    }
}

#[test]
fn every_combination_lb_xdp_emits_goes_through_lb_decap_back_to_the_original_packet() {
    netns_test(|| {
        let mut lb = Lb::load();
        let v4_vip = Ipv4Addr::new(198, 51, 100, 1);
        lb.add_vip(VIP6, 80, Proto::Tcp, &[backend6(16)]);
        lb.add_vip(VIP6, 53, Proto::Udp, &[backend(16)]);
        lb.add_vip(v4_vip, 80, Proto::Tcp, &[backend6(16)]);
        lb.add_vip(v4_vip, 53, Proto::Udp, &[backend(16)]);
        let decap =
            Decap::load(&[backend(16).into(), backend6(16).into()]).expect("loading lb_decap");
        let cases: Vec<(Vec<u8>, IpAddr)> = vec![
            (
                Frame6 {
                    ext: vec![(0, ext(1))],
                    payload: (0..=255u8).collect(),
                    ..tcp6(VIP6, 80)
                }
                .build(),
                backend6(16).into(),
            ),
            (udp6(VIP6, 53).build(), backend(16).into()),
            (
                Frame {
                    ip_options: vec![1, 1, 1, 0],
                    ..tcp(v4_vip, 80)
                }
                .build(),
                backend6(16).into(),
            ),
            (udp(v4_vip, 53).build(), backend(16).into()),
        ];
        for (original, backend) in cases {
            let encapsulated = lb.run_encap(&original, backend);
            let out = decap_run(&decap, &encapsulated, DecapReason::Decapsulated);
            assert_eq!(
                &out[ETH_LEN..],
                &original[ETH_LEN..],
                "the client's IP packet"
            );
            assert_eq!(&out[12..14], &original[12..14], "its EtherType");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// lb_hc_encap: IPv6 probes and IPv6 backends.
// ---------------------------------------------------------------------------------------------

#[test]
fn health_check_probes_of_either_family_are_encapsulated_in_the_backends_family() {
    netns_test(|| {
        let mut lb = Lb::load();
        let v4_vip = Ipv4Addr::new(198, 51, 100, 1);
        let six = lb.add_vip(
            VIP6,
            80,
            Proto::Tcp,
            &[IpAddr::from(backend6(11)), IpAddr::from(backend(12))],
        );
        let four = lb.add_vip(v4_vip, 80, Proto::Tcp, &[backend6(13)]);
        let decap = Decap::load(&[backend(12).into(), backend6(11).into(), backend6(13).into()])
            .expect("loading lb_decap");
        let probe6 = Frame6 {
            src: LB_ADDR6,
            tclass: 0x10,
            payload: b"GET /health HTTP/1.0\r\n\r\n".to_vec(),
            ..tcp6(VIP6, 80)
        }
        .build();
        let cases: Vec<(Vec<u8>, &VipAddr, IpAddr)> = vec![
            (probe6.clone(), &six, backend6(11).into()),
            (probe6, &six, backend(12).into()),
            (probe(&four), &four, backend6(13).into()),
        ];
        for (input, vip, b) in cases {
            let run = lb.run_hc(
                &input,
                mark_of(lb.backend_id(vip, b)),
                Some(ifindex("d0")),
                TC_ACT_OK,
                HcReason::Encapsulated,
            );
            assert_encapsulated(&input, &run.frame, b);
            assert_eq!(run.mark, 0);
            let out = decap_run(&decap, &run.frame, DecapReason::Decapsulated);
            assert_eq!(&out[ETH_LEN..], &input[ETH_LEN..], "the probe's IP packet");
        }
        // An IPv6 backend without a route: dropped with its reason.
        let unreachable = lb.add_vip(
            Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 4),
            80,
            Proto::Tcp,
            &[NO_NEIGH_BACKEND6, UNROUTED_BACKEND6],
        );
        for b in [NO_NEIGH_BACKEND6, UNROUTED_BACKEND6] {
            let mark = mark_of(lb.backend_id(&unreachable, b));
            lb.run_hc_dropped(&tcp6(VIP6, 80).build(), mark, HcReason::DropNoRoute);
        }
    });
}

#[test]
fn ipv6_backends_without_a_route_or_neighbour_are_dropped_unmodified() {
    netns_test(|| {
        let mut lb = Lb::load();
        let a = lb.add_vip(VIP6, 80, Proto::Tcp, &[NO_NEIGH_BACKEND6]);
        let b = lb.add_vip(VIP6, 81, Proto::Tcp, &[UNROUTED_BACKEND6]);
        for vip in [a, b] {
            lb.run_untouched(&tcp6(VIP6, vip.port).build(), XDP_DROP, Reason::DropNoRoute);
        }
    });
}

#[test]
fn a_backend_of_a_family_without_an_outer_source_address_is_dropped_as_no_route() {
    netns_test(|| {
        let mut lb = Lb::v4_only();
        let v4_vip = Ipv4Addr::new(198, 51, 100, 1);
        lb.add_vip(v4_vip, 80, Proto::Tcp, &[backend6(11)]);
        lb.add_vip(v4_vip, 81, Proto::Tcp, &[backend(11)]);
        lb.run_untouched(&tcp(v4_vip, 80).build(), XDP_DROP, Reason::DropNoRoute);
        // Positive control: the IPv4 backend, which has its source address, is reached.
        lb.run_encap(&tcp(v4_vip, 81).build(), backend(11));
    });
}

/// An opening SYN is inserted into the flow table while it is steered, before its guards and
/// route are checked (`lookup::backend`): one that is dropped after all must leave no entry and
/// count no insert, as a packet recorded only after its route resolved never did.
#[test]
fn an_opening_syn_dropped_after_it_was_steered_leaves_no_flow_entry() {
    netns_test(|| {
        let mut lb = Lb::v4_only();
        let vip4 = Ipv4Addr::new(198, 51, 100, 1);
        // No route: an IPv6 backend, and no outer IPv6 source address.
        lb.add_vip(vip4, 80, Proto::Tcp, &[backend6(11)]);
        // One new flow per source at once, then none for a second.
        let mut spec = VipSpec::new(
            None,
            VipAddr {
                addr: vip4.into(),
                port: 81,
                proto: Proto::Tcp,
            },
        );
        spec.guards = lb::l4::GuardChange::from_options("new-flow-rate=1,new-flow-burst=1")
            .unwrap()
            .apply(&lb::l4::Guards::default())
            .unwrap();
        lb.add_vip_spec(spec, &[backend(12)]);
        let syn = |dport: u16, sport: u16| {
            Frame {
                sport,
                ..tcp(vip4, dport)
            }
            .build()
        };
        let has_entry = |lb: &Lb, dport: u16, sport: u16| {
            lb.maps()
                .flows
                .get(&flow_key(CLIENT, sport, vip4, dport, 6), 0)
                .is_ok()
        };
        let inserts = lb.maps().flow_inserts().unwrap();

        lb.run_untouched(&syn(80, 40_000), XDP_DROP, Reason::DropNoRoute);
        assert!(
            !has_entry(&lb, 80, 40_000),
            "an unroutable SYN left its entry"
        );
        // Positive control: the source's first SYN to the rate-limited VIP is forwarded and
        // its entry stays.
        lb.run_encap(&syn(81, 40_001), backend(12));
        assert!(has_entry(&lb, 81, 40_001), "a forwarded SYN left no entry");
        lb.run_untouched(&syn(81, 40_002), XDP_DROP, Reason::DropRateLimited);
        assert!(
            !has_entry(&lb, 81, 40_002),
            "a rate-limited SYN left its entry"
        );
        assert_eq!(
            lb.maps().flow_inserts().unwrap(),
            inserts + 1,
            "only the forwarded SYN counts an insert"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// NAT mode: rewrite to the target, replies back, every checksum verified from scratch.
// ---------------------------------------------------------------------------------------------

/// One's-complement sum of `data` as 16-bit big-endian words (odd length padded with zero),
/// folded to 16 bits: written here from RFC 1071 for the tests, independent of both the
/// program's incremental update and `lb::packet::checksum`.
fn ones_sum(parts: &[&[u8]]) -> u16 {
    // Every part but the last is whole words here (headers, pseudo-headers).
    let mut bytes: Vec<u8> = Vec::new();
    for p in parts {
        bytes.extend_from_slice(p);
    }
    if bytes.len() % 2 == 1 {
        bytes.push(0);
    }
    let mut sum: u64 = 0;
    for w in bytes.chunks(2) {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Where a frame's parts are: (IPv6?, L4 offset, L4 protocol).
fn nat_layout(frame: &[u8]) -> (bool, usize, u8) {
    if frame[12..14] == [0x86, 0xdd] {
        (true, ETH_LEN + IPV6_LEN, frame[ETH_LEN + 6])
    } else {
        let ihl = usize::from(frame[ETH_LEN] & 0x0f) * 4;
        (false, ETH_LEN + ihl, frame[ETH_LEN + 9])
    }
}

/// The pseudo-header of the frame's TCP/UDP segment (RFC 793 §3.1, RFC 768, RFC 8200 §8.1).
fn pseudo_header(frame: &[u8]) -> Vec<u8> {
    let (v6, l4, proto) = nat_layout(frame);
    let seg_len = frame.len() - l4;
    let mut p = Vec::new();
    if v6 {
        p.extend_from_slice(&frame[ETH_LEN + 8..ETH_LEN + 40]);
        p.extend_from_slice(&(seg_len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, proto]);
    } else {
        p.extend_from_slice(&frame[ETH_LEN + 12..ETH_LEN + 20]);
        p.extend_from_slice(&[0, proto]);
        p.extend_from_slice(&(seg_len as u16).to_be_bytes());
    }
    p
}

/// Offset of the frame's L4 checksum field.
fn l4_check_at(frame: &[u8]) -> usize {
    let (_, l4, proto) = nat_layout(frame);
    if proto == 6 { l4 + 16 } else { l4 + 6 }
}

/// Fills in a correct TCP/UDP checksum (a computed zero is sent as all ones, RFC 768).
fn with_l4_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let at = l4_check_at(&frame);
    frame[at..at + 2].copy_from_slice(&[0, 0]);
    let (_, l4, _) = nat_layout(&frame);
    let mut c = !ones_sum(&[&pseudo_header(&frame), &frame[l4..]]);
    if c == 0 {
        c = 0xffff;
    }
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    frame
}

/// Whether the frame's IPv4 header checksum and TCP/UDP checksum verify (a sum over the
/// covered bytes, the checksum field included, of all ones).
fn checksums_verify(frame: &[u8]) -> (bool, bool) {
    let (v6, l4, _) = nat_layout(frame);
    let ip_ok = v6 || ones_sum(&[&frame[ETH_LEN..l4]]) == 0xffff;
    let l4_ok = ones_sum(&[&pseudo_header(frame), &frame[l4..]]) == 0xffff;
    (ip_ok, l4_ok)
}

fn frame_addr(frame: &[u8], src: bool) -> IpAddr {
    let (v6, _, _) = nat_layout(frame);
    if v6 {
        let at = ETH_LEN + if src { 8 } else { 24 };
        let b: [u8; 16] = frame[at..at + 16].try_into().unwrap();
        Ipv6Addr::from(b).into()
    } else {
        let at = ETH_LEN + if src { 12 } else { 16 };
        let b: [u8; 4] = frame[at..at + 4].try_into().unwrap();
        Ipv4Addr::from(b).into()
    }
}

fn frame_port(frame: &[u8], src: bool) -> u16 {
    let (_, l4, _) = nat_layout(frame);
    let at = l4 + if src { 0 } else { 2 };
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

fn frame_ttl(frame: &[u8]) -> u8 {
    let (v6, _, _) = nat_layout(frame);
    frame[ETH_LEN + if v6 { 7 } else { 8 }]
}

/// A frame the target sends back for `request`: addresses and ports swapped, `payload`.
fn reply_to(request_out: &[u8], payload: &[u8]) -> Vec<u8> {
    let (src, dst) = (
        frame_addr(request_out, false),
        frame_addr(request_out, true),
    );
    let (sport, dport) = (
        frame_port(request_out, false),
        frame_port(request_out, true),
    );
    let (_, _, proto) = nat_layout(request_out);
    let f = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Frame {
            src: s,
            dst: d,
            sport,
            dport,
            proto,
            payload: payload.to_vec(),
            ..Frame::default()
        }
        .build(),
        (IpAddr::V6(s), IpAddr::V6(d)) => Frame6 {
            src: s,
            dst: d,
            sport,
            dport,
            proto,
            payload: payload.to_vec(),
            ..Frame6::default()
        }
        .build(),
        _ => unreachable!("one family"),
    };
    with_l4_checksum(f)
}

/// A UDP payload whose last two bytes make the rewritten datagram's checksum compute to zero
/// (so it must be sent as 0xffff): `template` is the frame with those bytes zero, `rewrite`
/// turns it into what the target receives.
fn payload_for_zero_checksum(template: &[u8], rewrite: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = template.to_vec();
    rewrite(&mut out);
    let at = l4_check_at(&out);
    out[at..at + 2].copy_from_slice(&[0, 0]);
    let (_, l4, _) = nat_layout(&out);
    let s = ones_sum(&[&pseudo_header(&out), &out[l4..]]);
    // The one word that brings the sum to 0xffff (one's-complement arithmetic).
    let word = !s;
    let (_, l4t, _) = nat_layout(template);
    let mut payload = template[l4t + 8..].to_vec();
    let n = payload.len();
    payload[n - 2..].copy_from_slice(&word.to_be_bytes());
    payload
}

#[test]
fn nat_rewrites_to_the_target_and_back_with_every_checksum_correct() {
    netns_test(|| {
        // Replies go to the IPv4 clients through a router on d0 (backend 19's host). The IPv6
        // client is that host itself (fd00::19, on d0's link): on this kernel
        // bpf_fib_lookup answers NO_NEIGH for an IPv6 route via a gateway even with a
        // permanent neighbour entry for it (DSR to an IPv6 backend behind a gateway is
        // dropped as drop_no_route the same way); a NAT reply there goes to the kernel.
        run_cmd(&["ip", "route", "add", "192.0.2.0/24", "via", "10.0.0.19"]);
        let client6 = backend6(19);
        let router_mac = backend_mac(backend(19));
        let mut lb = Lb::load();
        let vip4 = Ipv4Addr::new(198, 51, 100, 1);
        let vip6 = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
        // (VIP address, port, protocol, target, target port)
        let vips: [(IpAddr, u16, Proto, IpAddr, u16); 5] = [
            (vip4.into(), 80, Proto::Tcp, backend(11).into(), 8080),
            (vip4.into(), 443, Proto::Tcp, backend(12).into(), 443),
            (vip4.into(), 53, Proto::Udp, backend(13).into(), 5353),
            (vip6.into(), 80, Proto::Tcp, backend6(14).into(), 8080),
            (vip6.into(), 53, Proto::Udp, backend6(15).into(), 5353),
        ];
        for (addr, port, proto, target, tport) in vips {
            let vip = VipAddr { addr, port, proto };
            lb.registry
                .add_vip(VipSpec::new(None, vip).nat())
                .expect("add_vip");
            let members = vec![L4Member::in_service(target, tport, 1)];
            lb.registry.apply(&vip, &members, false).expect("register");
        }
        let zero_template = Frame {
            sport: 40_001,
            // The last word is what payload_for_zero_checksum sets.
            payload: [vec![7u8; 62], vec![0, 0]].concat(),
            ..udp(vip4, 53)
        }
        .build();
        let zero_payload = payload_for_zero_checksum(&zero_template, |f| {
            f[ETH_LEN + 16..ETH_LEN + 20].copy_from_slice(&backend(13).octets());
            let (_, l4, _) = nat_layout(f);
            f[l4 + 2..l4 + 4].copy_from_slice(&5353u16.to_be_bytes());
        });

        // (case, client frame (with a correct checksum unless it has none), target, port)
        let cases: Vec<(&str, Vec<u8>, IpAddr, u16)> = vec![
            (
                "IPv4 TCP SYN, port 80 to 8080",
                with_l4_checksum(tcp(vip4, 80).build()),
                backend(11).into(),
                8080,
            ),
            (
                "IPv4 TCP, odd payload, same port",
                with_l4_checksum(
                    Frame {
                        payload: vec![0xab; 33],
                        ..tcp(vip4, 443)
                    }
                    .build(),
                ),
                backend(12).into(),
                443,
            ),
            (
                "IPv4 UDP, port 53 to 5353",
                with_l4_checksum(
                    Frame {
                        payload: b"question".to_vec(),
                        ..udp(vip4, 53)
                    }
                    .build(),
                ),
                backend(13).into(),
                5353,
            ),
            (
                "IPv4 UDP whose rewritten checksum computes to zero: sent as 0xffff",
                with_l4_checksum({
                    let mut f = udp(vip4, 53);
                    f.sport = 40_001;
                    f.payload = zero_payload.clone();
                    f.build()
                }),
                backend(13).into(),
                5353,
            ),
            (
                "IPv4 UDP without a checksum: stays without",
                {
                    let mut f = udp(vip4, 53);
                    f.sport = 40_002;
                    f.payload = b"no checksum".to_vec();
                    f.build()
                },
                backend(13).into(),
                5353,
            ),
            (
                "IPv6 TCP SYN, port 80 to 8080",
                with_l4_checksum(
                    Frame6 {
                        src: client6,
                        ..tcp6(vip6, 80)
                    }
                    .build(),
                ),
                backend6(14).into(),
                8080,
            ),
            (
                "IPv6 UDP, odd payload, port 53 to 5353",
                with_l4_checksum(
                    Frame6 {
                        src: client6,
                        payload: vec![0x5a; 101],
                        ..udp6(vip6, 53)
                    }
                    .build(),
                ),
                backend6(15).into(),
                5353,
            ),
        ];
        for (name, input, target, tport) in cases {
            let no_checksum = {
                let at = l4_check_at(&input);
                input[at..at + 2] == [0, 0]
            };
            assert!(checksums_verify(&input).0, "{name}: input IP checksum");
            if !no_checksum {
                assert!(checksums_verify(&input).1, "{name}: input L4 checksum");
            }
            let vip_addr = frame_addr(&input, false);
            let vip_port = frame_port(&input, false);
            let client = frame_addr(&input, true);
            let cport = frame_port(&input, true);

            // Client → target.
            let out = lb.run(&input, XDP_REDIRECT, Reason::Redirect);
            assert_eq!(
                out.len(),
                input.len(),
                "{name}: same length (no header added)"
            );
            assert_eq!(
                frame_addr(&out, false),
                target,
                "{name}: destination = target"
            );
            assert_eq!(frame_port(&out, false), tport, "{name}: destination port");
            assert_eq!(
                frame_addr(&out, true),
                client,
                "{name}: client address kept"
            );
            assert_eq!(frame_port(&out, true), cport, "{name}: client port kept");
            assert_eq!(
                frame_ttl(&out),
                63,
                "{name}: TTL / hop limit lowered by one"
            );
            let (ip_ok, l4_ok) = checksums_verify(&out);
            assert!(ip_ok, "{name}: IPv4 header checksum of {out:02x?}");
            let at = l4_check_at(&out);
            if no_checksum {
                assert_eq!(&out[at..at + 2], &[0, 0], "{name}: no checksum made up");
            } else {
                assert!(l4_ok, "{name}: L4 checksum of {out:02x?}");
                assert_ne!(&out[at..at + 2], &[0, 0], "{name}: UDP zero means none");
            }
            let (_, l4, _) = nat_layout(&out);
            assert_eq!(
                &out[l4 + 4..at],
                &input[l4 + 4..at],
                "{name}: the rest of the L4 header unchanged"
            );
            assert_eq!(
                &out[at + 2..],
                &input[at + 2..],
                "{name}: payload unchanged"
            );
            assert_eq!(&out[0..6], &backend_mac(target), "{name}: Ethernet dst");
            assert_eq!(&out[6..12], &D0_MAC, "{name}: Ethernet src");

            // Target → client, translated back.
            let reply = reply_to(&out, b"answer!");
            let back = lb.run(&reply, XDP_REDIRECT, Reason::NatReply);
            assert_eq!(
                frame_addr(&back, true),
                vip_addr,
                "{name}: reply source = VIP"
            );
            assert_eq!(
                frame_port(&back, true),
                vip_port,
                "{name}: reply source port"
            );
            assert_eq!(
                frame_addr(&back, false),
                client,
                "{name}: reply to the client"
            );
            assert_eq!(frame_port(&back, false), cport, "{name}: client port");
            assert_eq!(frame_ttl(&back), 63, "{name}: reply TTL lowered");
            let (ip_ok, l4_ok) = checksums_verify(&back);
            assert!(ip_ok && l4_ok, "{name}: reply checksums of {back:02x?}");
            assert_eq!(
                &back[0..6],
                &router_mac,
                "{name}: reply to the client's router"
            );

            // A reply of no flow (another client port) passes untouched.
            let mut stranger = reply.clone();
            let (_, l4, _) = nat_layout(&stranger);
            stranger[l4 + 2..l4 + 4].copy_from_slice(&(cport + 1000).to_be_bytes());
            let stranger = with_l4_checksum(stranger);
            lb.run_untouched(&stranger, XDP_PASS, Reason::PassNotVip);
        }
        // The zero case came out as 0xffff.
        let mut f = udp(vip4, 53);
        f.sport = 40_001;
        f.payload = zero_payload;
        let again = lb.run(&with_l4_checksum(f.build()), XDP_REDIRECT, Reason::Redirect);
        let at = l4_check_at(&again);
        assert_eq!(
            &again[at..at + 2],
            &[0xff, 0xff],
            "RFC 768: zero sent as all ones"
        );

        let web = VipAddr {
            addr: vip4.into(),
            port: 80,
            proto: Proto::Tcp,
        };
        let c = lb.vip_counters(&web);
        assert_eq!(
            (c.packets, c.new_flows, c.reply_packets),
            (1, 1, 1),
            "{c:?}"
        );
    });
}

#[test]
fn nat_reverse_entry_lost_to_the_lru_comes_back_on_the_flows_next_clock_tick() {
    netns_test(|| {
        use lb::l4::flows::monotonic_ns;
        // Replies to the client go through a router on d0 (as in the test above).
        run_cmd(&["ip", "route", "add", "192.0.2.0/24", "via", "10.0.0.19"]);
        let mut lb = Lb::load();
        let vip = VipAddr {
            addr: Ipv4Addr::new(198, 51, 100, 1).into(),
            port: 53,
            proto: Proto::Udp,
        };
        lb.registry
            .add_vip(VipSpec::new(None, vip).nat())
            .expect("add_vip");
        let members = vec![L4Member::in_service(backend(13).into(), 5353, 1)];
        lb.registry.apply(&vip, &members, false).expect("register");
        let request = with_l4_checksum(
            Frame {
                sport: 41_000,
                payload: b"question".to_vec(),
                ..udp(vip.addr, 53)
            }
            .build(),
        );
        let key = flow_key(CLIENT, 41_000, vip.addr, 53, 17);
        let out = lb.run(&request, XDP_REDIRECT, Reason::Redirect);
        let reply = reply_to(&out, b"answer!");
        let reverse_keys = |lb: &Lb| lb.maps().nat_reverse.keys().count();
        assert_eq!(reverse_keys(&lb), 1, "a new flow writes its reverse entry");
        lb.run(&reply, XDP_REDIRECT, Reason::NatReply);

        // The LRU evicts the reverse entry (removed here by hand).
        let drop_reverse = |lb: &mut Lb| {
            let maps = lb.registry.maps_mut();
            let keys: Vec<FlowKey> = maps.nat_reverse.keys().map(|k| k.unwrap()).collect();
            for k in keys {
                maps.nat_reverse.remove(&k).unwrap();
            }
        };
        drop_reverse(&mut lb);
        assert_eq!(reverse_keys(&lb), 0);
        // Client packets within the tick of the flow's last one (its last_seen set ahead of
        // the clock, so that no tick can pass during the test): forwarded, no reverse entry
        // written, and the reply passes untranslated, as it would before the client's packet.
        set_last_seen(&mut lb, &key, monotonic_ns() + 60_000_000_000);
        lb.run(&request, XDP_REDIRECT, Reason::Redirect);
        assert_eq!(reverse_keys(&lb), 0, "no upkeep within a tick");
        lb.run_untouched(&reply, XDP_PASS, Reason::PassNotVip);
        // The flow's first packet of a later tick (its last_seen 1 s back) writes it again.
        age_flow(&mut lb, &key, Duration::from_secs(1));
        lb.run(&request, XDP_REDIRECT, Reason::Redirect);
        assert_eq!(reverse_keys(&lb), 1, "rewritten on the tick");
        lb.run(&reply, XDP_REDIRECT, Reason::NatReply);
        let c = lb.vip_counters(&vip);
        assert_eq!(
            (c.packets, c.new_flows, c.reply_packets),
            (3, 1, 2),
            "one flow throughout: {c:?}"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Guards: source lists, before any state.
// ---------------------------------------------------------------------------------------------

#[test]
fn guard_lists_drop_refused_sources_of_both_families_before_any_state_and_count_them() {
    netns_test(|| {
        let mut lb = Lb::load();
        let vip4 = Ipv4Addr::new(198, 51, 100, 1);
        let vip6 = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
        let guards = |opts: &str| {
            lb::l4::GuardChange::from_options(opts)
                .unwrap()
                .apply(&lb::l4::Guards::default())
                .unwrap()
        };
        let mut spec4 = VipSpec::new(
            None,
            VipAddr {
                addr: vip4.into(),
                port: 80,
                proto: Proto::Tcp,
            },
        );
        spec4.guards = guards("allow=192.0.2.0/24,deny=192.0.2.128/25");
        let web4 = lb.add_vip_spec(spec4, &[backend(11)]);
        let mut spec6 = VipSpec::new(
            None,
            VipAddr {
                addr: vip6.into(),
                port: 80,
                proto: Proto::Tcp,
            },
        );
        spec6.guards = guards("deny=2001:db8:bad::/48");
        let web6 = lb.add_vip_spec(spec6, &[backend6(12)]);
        // A VIP without guards next to them: unaffected.
        let open = lb.add_vip(vip4, 81, Proto::Tcp, &[backend(13)]);

        let from4 = |src: Ipv4Addr, port: u16| {
            Frame {
                src,
                ..tcp(vip4, port)
            }
            .build()
        };
        let from6 = |src: Ipv6Addr| {
            Frame6 {
                src,
                ..tcp6(vip6, 80)
            }
            .build()
        };
        // Positive controls: listed, not denied.
        lb.run_encap(&from4(Ipv4Addr::new(192, 0, 2, 1), 80), backend(11));
        lb.run_encap(&from6(CLIENT6), backend6(12));
        // Refused: each dropped unmodified with its reason, no flow created.
        let flows_before = lb.maps().flows.keys().count();
        lb.run_untouched(
            &from4(Ipv4Addr::new(192, 0, 2, 200), 80),
            XDP_DROP,
            Reason::DropDenied,
        );
        lb.run_untouched(
            &from4(Ipv4Addr::new(203, 0, 113, 9), 80),
            XDP_DROP,
            Reason::DropNotAllowed,
        );
        lb.run_untouched(
            &from4(Ipv4Addr::new(203, 0, 113, 9), 80),
            XDP_DROP,
            Reason::DropNotAllowed,
        );
        let bad6 = Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 1, 0, 0, 0, 7);
        lb.run_untouched(&from6(bad6), XDP_DROP, Reason::DropDenied);
        assert_eq!(lb.maps().flows.keys().count(), flows_before, "no state");
        // The same sources to the VIP without guards pass.
        lb.run_encap(&from4(Ipv4Addr::new(203, 0, 113, 9), 81), backend(13));

        let g4 = lb.maps().guard_counters(lb.vip_id(&web4)).unwrap();
        assert_eq!((g4.denied, g4.not_allowed, g4.rate_limited), (1, 2, 0));
        let g6 = lb.maps().guard_counters(lb.vip_id(&web6)).unwrap();
        assert_eq!((g6.denied, g6.not_allowed, g6.rate_limited), (1, 0, 0));
        let go = lb.maps().guard_counters(lb.vip_id(&open)).unwrap();
        assert_eq!((go.denied, go.not_allowed), (0, 0));

        // Lifting the deny list at run time lets the source in.
        lb.registry
            .set_guards(&web6, lb::l4::Guards::default())
            .expect("set_guards");
        lb.run_encap(&from6(bad6), backend6(12));
    });
}

// ---------------------------------------------------------------------------------------------
// The next-hop cache.
// ---------------------------------------------------------------------------------------------

/// How long a test waits for the route watch to see a change it made (generous: the watch
/// reacts within milliseconds; a loaded machine may delay it).
const WATCH_DEADLINE: Duration = Duration::from_secs(20);

impl Lb {
    /// Loaded with a next-hop cache that only an invalidation ends ([`Self::long_cache`]) and
    /// the VIP 198.51.100.1:80/TCP to one backend: where the next-hop cache's tests start.
    fn cached_web(backend: impl Into<IpAddr> + Copy) -> (Self, VipAddr) {
        let mut lb = Self::load();
        lb.long_cache();
        let web = lb.add_vip(Ipv4Addr::new(198, 51, 100, 1), 80, Proto::Tcp, &[backend]);
        (lb, web)
    }

    /// A cache entry that only an invalidation can end within a test.
    fn long_cache(&mut self) {
        self.balancer
            .set_nexthop_max_age(self.registry.maps_mut(), Duration::from_secs(3600))
            .expect("writing LB_CONFIG");
    }

    fn cache_off(&mut self) {
        self.balancer
            .set_nexthop_max_age(self.registry.maps_mut(), Duration::ZERO)
            .expect("writing LB_CONFIG");
    }

    fn generation(&self) -> u32 {
        self.maps()
            .lb_config()
            .expect("reading LB_CONFIG")
            .nexthop_generation
    }

    /// (lookups, cached) of the next-hop cache so far.
    fn nexthop_counts(&self) -> (u64, u64) {
        let t = self
            .maps()
            .nexthop_totals()
            .expect("reading LB_NEXTHOP_STATS");
        let get = |c| t.iter().find(|(x, _)| *x == c).map_or(0, |(_, n)| *n);
        (get(NextHopCounter::Lookups), get(NextHopCounter::Cached))
    }

    /// The valid cached entries of backend `id` (any CPU).
    fn valid_nexthops(&self, id: u32) -> Vec<NextHop> {
        let g = self.generation();
        self.maps()
            .nexthops_of(id)
            .expect("reading LB_NEXTHOPS")
            .into_iter()
            .filter(|e| e.family != 0 && e.generation == g)
            .collect()
    }

    /// Waits until the route watch has moved the generation past `before`.
    fn wait_for_generation_past(&self, before: u32) {
        let start = std::time::Instant::now();
        while self.generation() == before {
            assert!(
                start.elapsed() < WATCH_DEADLINE,
                "the route watch did not bump the next-hop generation within {WATCH_DEADLINE:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `f` until no generation bump (some unrelated change in the namespace, e.g. an
    /// IPv6 link-local address finishing duplicate address detection) happened during it, so
    /// `f` may assert what a stable cache does. Bounded: 50 attempts.
    fn with_stable_generation<T>(&mut self, mut f: impl FnMut(&mut Self) -> T) -> T {
        for _ in 0..50 {
            let g = self.generation();
            let out = f(self);
            if self.generation() == g {
                return out;
            }
        }
        panic!("the next-hop generation kept moving: something changes routes in a loop");
    }
}

#[test]
fn a_backends_next_hop_is_resolved_once_then_taken_from_the_cache() {
    netns_test(|| {
        let (mut lb, web) = Lb::cached_web(backend(12));
        let nat_vip = VipAddr {
            addr: Ipv4Addr::new(198, 51, 100, 2).into(),
            port: 80,
            proto: Proto::Tcp,
        };
        lb.registry
            .add_vip(VipSpec::new(None, nat_vip).nat())
            .expect("add_vip");
        lb.registry
            .apply(
                &nat_vip,
                &[L4Member::in_service(backend(13).into(), 8080, 1)],
                false,
            )
            .expect("register");
        let flow = |dst: Ipv4Addr, sport: u16| {
            Frame {
                sport,
                ..tcp(dst, 80)
            }
            .build()
        };
        let web_addr = v4(web.addr);
        let nat_addr = v4(nat_vip.addr);
        let mut sport = 1000;
        let (first, later) = lb.with_stable_generation(|lb| {
            sport += 3;
            let (l0, _) = lb.nexthop_counts();
            // A new flow, another new flow, then the first again (a flow-table hit).
            lb.run_encap(&flow(web_addr, sport), backend(12));
            let (l1, _) = lb.nexthop_counts();
            lb.run_encap(&flow(web_addr, sport + 1), backend(12));
            lb.run_encap(&flow(web_addr, sport), backend(12));
            let nat_first = lb.run(&flow(nat_addr, sport), XDP_REDIRECT, Reason::Redirect);
            assert_eq!(
                &nat_first[0..6],
                &backend_mac(backend(13)),
                "NAT: to the target"
            );
            let (l2, _) = lb.nexthop_counts();
            lb.run(&flow(nat_addr, sport + 1), XDP_REDIRECT, Reason::Redirect);
            let nat_hit = lb.run(&flow(nat_addr, sport), XDP_REDIRECT, Reason::Redirect);
            assert_eq!(
                nat_hit, nat_first,
                "NAT: the cached next hop gives the same frame"
            );
            let (l3, _) = lb.nexthop_counts();
            (l1 - l0, (l2 - l1, l3 - l2))
        });
        assert!(first <= 1, "one lookup at most for the first packet");
        assert_eq!(
            later,
            (1, 0),
            "DSR: the second and third packets were not looked up (the NAT target's first \
             was); NAT: neither were its second and third"
        );
        let (_, cached) = lb.nexthop_counts();
        assert!(cached >= 2, "both backends' lookups were cached");
        let entries = lb.valid_nexthops(lb.backend_id(&web, backend(12)));
        assert_eq!(entries.len(), 1, "one CPU ran the tests: one entry");
        assert_eq!(entries[0].dmac, backend_mac(backend(12)));
        assert_eq!(entries[0].smac, D0_MAC);
        assert_eq!(entries[0].ifindex, ifindex("d0"));

        // Positive control: without the cache every packet is looked up.
        lb.cache_off();
        let (l0, c0) = lb.nexthop_counts();
        for _ in 0..3 {
            lb.run_encap(&flow(web_addr, sport), backend(12));
        }
        assert_eq!(
            lb.nexthop_counts(),
            (l0 + 3, c0),
            "cache off: 3 lookups, none cached"
        );
    });
}

#[test]
fn after_the_backends_neighbour_mac_changes_packets_go_to_the_new_mac() {
    netns_test(|| {
        let (lb, web) = Lb::cached_web(backend(12));
        let input = tcp(web.addr, 80).build();
        lb.run_encap(&input, backend(12));
        let id = lb.backend_id(&web, backend(12));
        // The old MAC is cached, valid for an hour: only an invalidation can end it.
        let cached = lb.valid_nexthops(id);
        assert!(
            cached.iter().any(|e| e.dmac == backend_mac(backend(12))),
            "the old MAC is cached: {cached:?}"
        );
        let new_mac = [0x02, 0, 0, 0, 0, 0xaa];
        let g = lb.generation();
        run_cmd(&[
            "ip",
            "neigh",
            "replace",
            &backend(12).to_string(),
            "lladdr",
            "02:00:00:00:00:aa",
            "dev",
            "d0",
            "nud",
            "permanent",
        ]);
        lb.wait_for_generation_past(g);
        let out = lb.run(&input, XDP_REDIRECT, Reason::Redirect);
        assert_eq!(&out[0..6], &new_mac, "Ethernet destination: the new MAC");
        assert_eq!(&out[6..12], &D0_MAC);
        assert_eq!(
            packet::parse_outer(&out).expect("encapsulated").dst,
            IpAddr::from(backend(12))
        );
    });
}

/// `lb_xdp` uses a cached next hop without comparing the backend's address with the one it
/// was resolved for: the generation, read before the backend's entry and moved on after every
/// write of a backend slot, stands for it (`lb-ebpf/src/nexthop.rs`). Here a slot (ids are
/// reused) is rewritten in place with another address while a flow and a valid cache entry
/// still name it: the flow's next packet must go to the new address's next hop.
#[test]
fn a_backend_slot_rewritten_with_another_address_does_not_keep_the_old_next_hop() {
    use lb::l4::L4Maps as _;

    netns_test(|| {
        let (mut lb, web) = Lb::cached_web(backend(12));
        let input = tcp(web.addr, 80).build();
        let id = lb.backend_id(&web, backend(12));
        // Positive control: the first packet resolves and caches backend 12's next hop, the
        // second (a flow-table hit) takes it from the cache, no lookup.
        let (lookups, after_hit) = lb.with_stable_generation(|lb| {
            let out = lb.run_encap(&input, backend(12));
            assert_eq!(&out[0..6], &backend_mac(backend(12)));
            let (lookups, _) = lb.nexthop_counts();
            let out = lb.run_encap(&input, backend(12));
            assert_eq!(&out[0..6], &backend_mac(backend(12)), "from the cache");
            (lookups, lb.nexthop_counts().0)
        });
        assert_eq!(after_hit, lookups, "the hit was not looked up");
        assert_eq!(lb.valid_nexthops(id).len(), 1, "a valid entry for the slot");

        // The slot rewritten with backend 14's address; the flow still names the id.
        let mut entry = lb.maps().backends.get(&id, 0).expect("reading LB_BACKENDS");
        let (family, words) = lb_common::addr_to_map(backend(14).into());
        entry.family = family;
        entry.addr = words;
        lb.registry
            .maps_mut()
            .set_backend(id, entry)
            .expect("writing LB_BACKENDS");
        let out = lb.run_encap(&input, backend(14));
        assert_eq!(
            &out[0..6],
            &backend_mac(backend(14)),
            "Ethernet destination: the new address's neighbour, not the cached one"
        );
        assert_eq!(lb.nexthop_counts().0, lookups + 1, "looked up once more");
    });
}

/// The route watch's thread moves the generation on while the thread owning the maps writes
/// other fields of `LB_CONFIG` (flags, the cache's maximum age): a read-modify-write of one
/// that falls between the other's read and write would put back an old generation (stale
/// next hops valid again) or an old setting. Here a second handle bumps as fast as it can
/// while the owner rewrites the maximum age: every bump and the last age must stay.
#[test]
fn concurrent_writers_of_lb_config_lose_no_generation_bump_and_no_setting() {
    use std::os::fd::AsFd as _;

    use aya::maps::{Array, IterableMap as _, Map, MapData};
    use lb::dataplane::route_watch;
    use lb_common::LbConfig;

    const BUMPS: u32 = 3000;
    netns_test(|| {
        let mut lb = Lb::load();
        let fd = lb
            .maps()
            .config
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .expect("duplicating LB_CONFIG's descriptor");
        let mut other: Array<MapData, LbConfig> =
            Map::Array(MapData::from_fd(fd).expect("a second handle on LB_CONFIG"))
                .try_into()
                .expect("LB_CONFIG is an array");
        let before = lb.generation();
        let bumper = thread::spawn(move || {
            for _ in 0..BUMPS {
                route_watch::bump_generation(&mut other).expect("bumping the generation");
            }
        });
        let mut last = Duration::ZERO;
        let mut writes = 0u32;
        while !bumper.is_finished() || writes < BUMPS {
            // Every write differs from the one before (a write of the same value is skipped).
            last = Duration::from_millis(u64::from(writes % 7) + 1);
            lb.balancer
                .set_nexthop_max_age(lb.registry.maps_mut(), last)
                .expect("writing LB_CONFIG");
            writes += 1;
        }
        bumper.join().expect("the bumping thread");
        let cfg = lb.maps().lb_config().expect("reading LB_CONFIG");
        // The route watch may have bumped too (the namespace's own changes): at least BUMPS.
        let moved = cfg.nexthop_generation.wrapping_sub(before);
        assert!(
            moved >= BUMPS,
            "{BUMPS} bumps moved the generation by {moved} only: a write of the maximum age \
             put an older generation back"
        );
        assert_eq!(
            cfg.nexthop_max_age_ns,
            u64::try_from(last.as_nanos()).expect("small"),
            "the last maximum age written ({last:?}) was lost to a bump"
        );
    });
}

#[test]
fn after_a_route_change_packets_follow_the_new_route() {
    netns_test(|| {
        // A second link, e0 (10.1.0.2/24), with a router 10.1.0.1 on it.
        run_cmd(&[
            "ip", "link", "add", "e0", "type", "veth", "peer", "name", "e1",
        ]);
        run_cmd(&["ip", "link", "set", "e1", "up"]);
        run_cmd(&["ip", "link", "set", "e0", "address", "02:00:00:00:01:02"]);
        run_cmd(&["ip", "addr", "add", "10.1.0.2/24", "dev", "e0"]);
        run_cmd(&["ip", "link", "set", "e0", "up"]);
        run_cmd(&[
            "ip",
            "neigh",
            "add",
            "10.1.0.1",
            "lladdr",
            "02:00:00:00:01:01",
            "dev",
            "e0",
            "nud",
            "permanent",
        ]);
        // The backend is routed via 10.0.0.11 on d0 first.
        let far = Ipv4Addr::new(203, 0, 113, 50);
        run_cmd(&[
            "ip",
            "route",
            "add",
            "203.0.113.50/32",
            "via",
            "10.0.0.11",
            "dev",
            "d0",
        ]);
        let (lb, web) = Lb::cached_web(far);
        let input = tcp(web.addr, 80).build();
        let out = lb.run(&input, XDP_REDIRECT, Reason::Redirect);
        assert_eq!(&out[0..6], &backend_mac(backend(11)), "via 10.0.0.11");
        assert_eq!(&out[6..12], &D0_MAC, "out of d0");
        let id = lb.backend_id(&web, far);
        assert!(
            lb.valid_nexthops(id)
                .iter()
                .any(|e| e.ifindex == ifindex("d0")),
            "the route via d0 is cached"
        );

        let g = lb.generation();
        run_cmd(&[
            "ip",
            "route",
            "replace",
            "203.0.113.50/32",
            "via",
            "10.1.0.1",
            "dev",
            "e0",
        ]);
        lb.wait_for_generation_past(g);
        let out = lb.run(&input, XDP_REDIRECT, Reason::Redirect);
        assert_eq!(&out[0..6], &[2, 0, 0, 0, 1, 1], "via 10.1.0.1");
        assert_eq!(&out[6..12], &[2, 0, 0, 0, 1, 2], "out of e0");
        assert_eq!(
            packet::parse_outer(&out).expect("encapsulated").dst,
            IpAddr::from(far)
        );
        assert!(
            lb.valid_nexthops(id)
                .iter()
                .any(|e| e.ifindex == ifindex("e0")),
            "the new route is cached"
        );
    });
}

#[test]
fn an_unresolved_neighbour_is_looked_up_again_for_every_packet_never_cached() {
    netns_test(|| {
        let (mut lb, web) = Lb::cached_web(NO_NEIGH_BACKEND);
        let nat_vip = VipAddr {
            addr: Ipv4Addr::new(198, 51, 100, 2).into(),
            port: 80,
            proto: Proto::Tcp,
        };
        let nat_target = Ipv4Addr::new(10, 0, 0, 98);
        lb.registry
            .add_vip(VipSpec::new(None, nat_vip).nat())
            .expect("add_vip");
        lb.registry
            .apply(
                &nat_vip,
                &[L4Member::in_service(nat_target.into(), 8080, 1)],
                false,
            )
            .expect("register");
        let input = tcp(web.addr, 80).build();
        let nat_input = tcp(nat_vip.addr, 80).build();
        for round in 0..3 {
            let (l0, c0) = lb.nexthop_counts();
            lb.run_untouched(&input, XDP_DROP, Reason::DropNoRoute);
            // NAT: translated and handed to the kernel, which resolves the neighbour.
            lb.run(&nat_input, XDP_PASS, Reason::NatViaKernel);
            assert_eq!(
                lb.nexthop_counts(),
                (l0 + 2, c0),
                "round {round}: both looked up, nothing cached"
            );
        }
        assert!(
            lb.valid_nexthops(lb.backend_id(&web, NO_NEIGH_BACKEND))
                .is_empty()
        );

        // Positive control: once the neighbour is known, the next packet goes out to it.
        for addr in [NO_NEIGH_BACKEND, nat_target] {
            run_cmd(&[
                "ip",
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                &format!("02:00:00:00:00:{:02x}", addr.octets()[3]),
                "dev",
                "d0",
                "nud",
                "permanent",
            ]);
        }
        lb.run_encap(&input, NO_NEIGH_BACKEND);
        let out = lb.run(&nat_input, XDP_REDIRECT, Reason::Redirect);
        assert_eq!(&out[0..6], &backend_mac(nat_target));
    });
}

#[test]
fn too_big_is_still_answered_with_a_warm_cache_and_after_the_mtu_shrinks() {
    netns_test(|| {
        run_cmd(&["ip", "link", "set", "d0", "mtu", "1000"]);
        let (mut lb, web) = Lb::cached_web(backend(11));
        let of_ip_len = |ip_len: usize| {
            Frame {
                payload: vec![0x5a; ip_len - IPV4_LEN - 20],
                frag: 0x4000,
                ..tcp(web.addr, 80)
            }
            .build()
        };
        let mtu_in = |out: &[u8]| {
            let icmp = &out[ETH_LEN + IPV4_LEN..];
            assert_eq!((icmp[0], icmp[1]), (3, 4), "fragmentation needed");
            u16::from_be_bytes([icmp[6], icmp[7]])
        };
        // Warm: a small packet caches the next hop.
        lb.run_encap(&of_ip_len(60), backend(11));
        // 990 + 20 > 1000: answered as without a cache.
        let out = lb.run(&of_ip_len(990), XDP_TX, Reason::TxIcmpTooBig);
        assert_eq!(mtu_in(&out), 980);
        // Exactly the MTU fits; then the cache knows 1000 bytes fit, and 1010 still do not.
        lb.run_encap(&of_ip_len(980), backend(11));
        let out = lb.run(&of_ip_len(990), XDP_TX, Reason::TxIcmpTooBig);
        assert_eq!(mtu_in(&out), 980);
        let looked_up = lb.with_stable_generation(|lb| {
            lb.run_encap(&of_ip_len(980), backend(11));
            let (l0, _) = lb.nexthop_counts();
            lb.run_encap(&of_ip_len(980), backend(11));
            lb.nexthop_counts().0 - l0
        });
        assert_eq!(
            looked_up, 0,
            "a packet that fits the cached length is not looked up"
        );

        // The link's MTU shrinks: the cached length no longer holds.
        let g = lb.generation();
        run_cmd(&["ip", "link", "set", "d0", "mtu", "900"]);
        lb.wait_for_generation_past(g);
        let out = lb.run(&of_ip_len(980), XDP_TX, Reason::TxIcmpTooBig);
        assert_eq!(mtu_in(&out), 880);
    });
}

// ---------------------------------------------------------------------------------------------
// Pinned maps adopted by the next run.
// ---------------------------------------------------------------------------------------------

/// A pin directory on the bpffs, removed with everything in it when dropped (also on panic).
struct PinDir(std::path::PathBuf);

impl PinDir {
    fn new(what: &str) -> Self {
        Self(std::path::PathBuf::from(format!(
            "/sys/fs/bpf/lb-xdp-testrun-{what}-{}",
            std::process::id()
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Lb {
    /// `lb_xdp` loaded with its maps pinned in `dir` (adopting a previous load's maps there,
    /// as `lb run` does) and serving `vips`.
    fn pinned(dir: &std::path::Path, addrs: LbAddrs, vips: &[VipSpec]) -> Self {
        let sizes = Self::sizes(4096);
        let (balancer, maps) = Balancer::load(sizes, addrs, Some(dir))
            .expect("loading lb_xdp with pinned maps (verifier, privileges, bpffs)");
        let (registry, _) = RingWriter::adopt(maps, RING, sizes.max_vips, sizes.max_backends, vips)
            .expect("writing the VIPs");
        Self {
            balancer,
            registry,
            members: std::collections::BTreeMap::new(),
        }
    }
}

/// A run started with other outer source addresses (`--lb-addr`) adopts the pinned maps and
/// sends the flows it inherits from its own addresses: the next packet of a flow the previous
/// run steered (and whose next hop it cached) leaves from the new address, to the same
/// backend. The loader writes the addresses into the adopted `LB_CONFIG` before it moves the
/// next-hop generation; one that wrote them only into fresh maps fails here. Positive
/// controls: before the restart the flow left from the old address through the cache, and the
/// second load did adopt (the flow went on without a new-flow count, the counters kept).
#[test]
fn a_run_with_other_outer_addresses_sends_the_flows_it_adopts_from_the_new_ones() {
    netns_test(|| {
        const NEW_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
        const NEW_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3);
        run_cmd(&["ip", "addr", "add", "10.0.0.3/24", "dev", "d0"]);
        run_cmd(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fd00::3/64",
            "dev",
            "d0",
            "nodad",
        ]);
        let pins = PinDir::new("readdress");
        let web = VipAddr {
            addr: Ipv4Addr::new(198, 51, 100, 1).into(),
            port: 80,
            proto: Proto::Tcp,
        };
        let web6 = VipAddr {
            addr: Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1).into(),
            port: 80,
            proto: Proto::Tcp,
        };
        let specs = [VipSpec::new(None, web), VipSpec::new(None, web6)];
        let old = LbAddrs {
            v4: Some(LB_ADDR),
            v6: Some(LB_ADDR6),
        };
        let flow = client_syn(&web, 40_000);
        let flow6 = Frame6 {
            sport: 40_000,
            ..tcp6(web6.addr, 80)
        }
        .build();
        let before = {
            let mut first = Lb::pinned(&pins.0, old, &specs);
            assert!(!first.balancer.adopted(), "a fresh pin directory");
            first.long_cache();
            first.register(&web, &[backend(11)]);
            first.register(&web6, &[backend6(11)]);
            for (packet, to) in [
                (&flow, IpAddr::from(backend(11))),
                (&flow6, backend6(11).into()),
            ] {
                first.run_encap(packet, to);
                let lookups = first.nexthop_counts().0;
                let out = first.run(packet, XDP_REDIRECT, Reason::Redirect);
                assert_encapsulated(packet, &out, to);
                assert_eq!(
                    first.nexthop_counts().0,
                    lookups,
                    "the flow's second packet used the cached next hop (no lookup)"
                );
            }
            first.balancer.keep_dataplane(true);
            (first.vip_counters(&web), first.vip_counters(&web6))
        };
        assert!(
            pins.0.join("LB_FLOWS").exists(),
            "the first load left its maps pinned"
        );
        let new = LbAddrs {
            v4: Some(NEW_ADDR),
            v6: Some(NEW_ADDR6),
        };
        let mut second = Lb::pinned(&pins.0, new, &specs);
        assert!(
            second.balancer.adopted(),
            "the second load adopted the pins"
        );
        second.long_cache();
        for (packet, to, from) in [
            (&flow, IpAddr::from(backend(11)), IpAddr::from(NEW_ADDR)),
            (&flow6, backend6(11).into(), NEW_ADDR6.into()),
        ] {
            let lookups = second.nexthop_counts().0;
            let out = second.run(packet, XDP_REDIRECT, Reason::Redirect);
            assert_encapsulated_from(packet, &out, to, from);
            assert_eq!(
                second.nexthop_counts().0,
                lookups + 1,
                "the previous run's cached next hop was invalid after the load: one lookup"
            );
        }
        for (vip, before) in [(&web, before.0), (&web6, before.1)] {
            let after = second.vip_counters(vip);
            assert_eq!(
                (after.packets, after.new_flows),
                (before.packets + 1, before.new_flows),
                "{vip}: one more packet of the adopted flow, no new flow"
            );
        }
        drop(second);
        assert!(
            !pins.0.join("LB_FLOWS").exists(),
            "a load that does not keep its data plane removes the pins"
        );
    });
}

/// Whether an XDP program is attached to `iface` (in this thread's namespace).
fn xdp_attached(iface: &str) -> bool {
    let out = Command::new("ip")
        .args(["-d", "link", "show", "dev", iface])
        .output()
        .expect("ip link show");
    assert!(out.status.success(), "ip link show {iface}");
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

/// `lb_xdp` attached through a pinned link (as `lb run` attaches it) is detached, and its
/// pins are gone, by the time its balancer has dropped without keeping its data plane (a
/// clean shutdown): nothing is left for the operator or the next command to find. Five rounds
/// on one pin directory (each load starts afresh). Positive control: attached before each
/// drop. (`l4_host_traffic` checks the same after a whole `lb run`; it failed once under load
/// at stop 39, on this check or the exit status, not reproduced here: 100
/// rounds of this test beside six busy loops passed.)
#[test]
fn a_pinned_lb_xdp_is_detached_when_its_balancer_drops() {
    netns_test(|| {
        let pins = PinDir::new("detach");
        for round in 0..5 {
            let mut lb = Lb::pinned(&pins.0, LbAddrs::one(LB_ADDR.into()), &[]);
            lb.balancer
                .attach("d0", XdpMode::Native)
                .expect("attaching lb_xdp to d0");
            assert!(
                xdp_attached("d0"),
                "round {round}: attached before the drop"
            );
            drop(lb);
            assert!(
                !xdp_attached("d0"),
                "round {round}: lb_xdp still attached to d0 after its balancer dropped"
            );
            assert!(!pins.0.exists(), "round {round}: the pin directory removed");
        }
    });
}
