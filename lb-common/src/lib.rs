//! Map keys and values shared by the XDP programs (`lb-ebpf`) and userspace (`lb-userspace`).
//!
//! Every type is `#[repr(C)]` with explicit padding fields, so the layout the kernel sees is the
//! layout userspace writes, byte for byte, and BTF describes no hidden holes. Addresses and ports
//! are stored in **network byte order** exactly as they appear in packet headers, so the XDP
//! program compares raw header fields without swapping; userspace converts at the edges.
#![no_std]

/// Names of the maps and programs, used by the loader, the pin directory and `lb dump`.
pub mod names {
    /// The balancer program, attached to the interfaces that receive VIP traffic.
    pub const PROG_XDP: &str = "lb_xdp";
    /// The backend-side decapsulator.
    pub const PROG_DECAP: &str = "lb_decap";
    /// A program that passes every packet: the benchmark baseline, and the program the test
    /// topology attaches to veth peers so that XDP_TX'd frames are delivered promptly.
    pub const PROG_PASS: &str = "lb_pass";
    /// Reads the kernel's clocks for the loader (run with `BPF_PROG_TEST_RUN`, never
    /// attached): writes `bpf_ktime_get_coarse_ns()`, `bpf_jiffies64()` and the coarse clock
    /// again as three native `u64` at the start of the packet, from which the loader measures
    /// [`super::LbConfig::tick_ns`] and [`super::LbConfig::clock_offset_ns`].
    pub const PROG_CLOCK: &str = "lb_clock";
    /// The TC egress program that sends health-check probes through the DSR data path
    /// (see [`super::LB_HC_MARK_BASE`]).
    pub const PROG_HC_ENCAP: &str = "lb_hc_encap";

    /// [`super::LbConfig`] at index 0.
    pub const MAP_CONFIG: &str = "LB_CONFIG";
    /// [`super::VipKey`] → [`super::VipMeta`].
    pub const MAP_VIPS: &str = "LB_VIPS";
    /// [`super::BackendId`] index → [`super::Backend`].
    pub const MAP_BACKENDS: &str = "LB_BACKENDS";
    /// `vip_id * ring_size + slot` → backend id ([`super::RING_EMPTY`] for none).
    pub const MAP_RINGS: &str = "LB_RINGS";
    /// LRU: [`super::FlowKey`] → [`super::FlowValue`].
    pub const MAP_FLOWS: &str = "LB_FLOWS";
    /// Per-CPU [`super::Counters`] per backend id: the only counters `lb_xdp` updates for a
    /// forwarded packet or a translated NAT reply (a VIP's figures and the reasons `tx`,
    /// `redirect` and `nat_reply` are derived from them, see [`super::Counters`]).
    pub const MAP_BACKEND_STATS: &str = "LB_BACKEND_STATS";
    /// [`super::Counters`] (not per CPU), written by userspace only: index 0 holds what every
    /// backend that left had counted, index `1 + vip_id` what the departed backends of that
    /// VIP had counted (see [`super::Counters`]). `max_entries` is `--max-vips` + 1.
    pub const MAP_RETIRED_STATS: &str = "LB_RETIRED_STATS";
    /// Per-CPU `u64` per [`super::Reason`].
    pub const MAP_REASONS: &str = "LB_REASONS";
    /// Per-CPU `u64` per [`super::DecapReason`].
    pub const MAP_DECAP_STATS: &str = "LB_DECAP_STATS";
    /// Per-CPU `u64` per [`super::HcReason`].
    pub const MAP_HC_STATS: &str = "LB_HC_STATS";
    /// Per-CPU `u64`, index 0: flow-table entries `lb_xdp` created under a key that was not in
    /// the table (the eviction estimate of [`super::FlowTableStats`] needs it).
    pub const MAP_FLOW_INSERTS: &str = "LB_FLOW_INSERTS";
    /// [`super::FlowTableStats`] at index 0, written by `lb run`'s flow sweeper.
    pub const MAP_FLOW_STATS: &str = "LB_FLOW_STATS";
    /// [`super::AddrKey`] → `u8`: the outer destinations `lb_decap` accepts.
    pub const MAP_DECAP_ADDRS: &str = "LB_DECAP_ADDRS";
    /// LRU: [`super::FlowKey`] of a NAT target's reply (target → client) →
    /// [`super::NatReverse`]: how `lb_xdp` finds the flow a reply belongs to.
    pub const MAP_NAT_REVERSE: &str = "LB_NAT_REVERSE";
    /// LPM trie: [`super::GuardKey`] → `u8`: the sources a VIP with an allow list accepts.
    pub const MAP_GUARD_ALLOW: &str = "LB_GUARD_ALLOW";
    /// LPM trie: [`super::GuardKey`] → `u8`: the sources a VIP with a deny list drops.
    pub const MAP_GUARD_DENY: &str = "LB_GUARD_DENY";
    /// LRU: [`super::RateKey`] → [`super::RateState`]: the new-flow token bucket of each
    /// source of each rate-limited VIP.
    pub const MAP_RATE: &str = "LB_RATE";
    /// Per-CPU [`super::GuardCounters`] per VIP id.
    pub const MAP_GUARD_STATS: &str = "LB_GUARD_STATS";
    /// Per-CPU [`super::NextHop`] per backend id: the next hop `lb_xdp` last resolved for the
    /// backend on that CPU.
    pub const MAP_NEXTHOPS: &str = "LB_NEXTHOPS";
    /// Per-CPU `u64` per [`super::NextHopCounter`].
    pub const MAP_NEXTHOP_STATS: &str = "LB_NEXTHOP_STATS";
    /// Prefix of the pinned XDP links (`xdp_link@IFACE`), which keep `lb_xdp` attached when
    /// `lb run` dies, until a new one adopts them.
    pub const PIN_XDP_LINK_PREFIX: &str = "xdp_link@";

    /// Benchmark only (`cargo xtask bench xdp`; never loaded or attached by `lb run`): the
    /// front program that rewrites the intended frame on every repeat of a live-frames test
    /// run and tail-calls the program measured (see [`super::BenchTemplate`]).
    pub const PROG_BENCH_FRONT: &str = "lb_bench_front";
    /// Benchmark only: the `XDP_TX` floor (swaps the Ethernet addresses, returns `XDP_TX`).
    pub const PROG_BENCH_TX: &str = "lb_bench_tx";
    /// Benchmark only: drops every frame; on the veth peer that receives the benchmark's
    /// transmitted frames.
    pub const PROG_BENCH_SINK: &str = "lb_bench_sink";
    /// Benchmark only: [`super::BenchTemplate`] at index 0.
    pub const MAP_BENCH_TEMPLATE: &str = "LB_BENCH_TEMPLATE";
    /// Benchmark only: program array; index 0 is the program the front tail-calls.
    pub const MAP_BENCH_PROGS: &str = "LB_BENCH_PROGS";
    /// Benchmark only: per-CPU `u64` per [`super::BenchCounter`].
    pub const MAP_BENCH_STATS: &str = "LB_BENCH_STATS";
}

/// Version of the map layout (the types below, the map names and what their entries mean).
/// Stored in [`LbConfig::layout`]: a binary that finds pinned maps of another layout refuses to
/// adopt them instead of misreading them. Bump it with every change to a map type, a map's
/// meaning, the reason enums (their counters are indexed by them) or the map names.
///
/// History: 1 = IPv4 only, no version field (`LB_CONFIG` had 16-byte values); 2 = both
/// address families, flow ages and idle timeouts, flow-table accounting; 3 = NAT mode (the
/// reverse map, reply counters), per-VIP guards (allow/deny tries, new-flow rate state, guard
/// counters), `VipMeta` with the mode and the rate limit; 4 = the per-backend next-hop cache
/// (`LB_NEXTHOPS`, `LB_NEXTHOP_CTL`, `LB_NEXTHOP_STATS`); 5 = `LB_FLOWS` with per-CPU LRU
/// lists (`BPF_F_NO_COMMON_LRU`; its capacity is split evenly between the possible CPUs);
/// 6 = the flow clock from jiffies (`LbConfig::tick_ns`, `LbConfig::clock_offset_ns`);
/// 7 = the next-hop cache's generation and maximum age moved from `LB_NEXTHOP_CTL` (removed)
/// into `LB_CONFIG` (`LbConfig::nexthop_generation`, `LbConfig::nexthop_max_age_ns`), so a
/// flow-table hit makes one map lookup fewer; 8 = one counter record per forwarded packet:
/// `LB_VIP_STATS` replaced by `LB_RETIRED_STATS` (VIP figures derived from the backends'
/// records), [`Counters`] with `redirected`, `counted_apart` and `replies_via_kernel`, and the
/// reasons `tx`, `redirect` and `nat_reply` no longer counted in `LB_REASONS`.
pub const LB_LAYOUT_VERSION: u32 = 8;
/// [`LbConfig::magic`]: marks an `LB_CONFIG` written by a versioned layout ("LBMP").
pub const LB_CONFIG_MAGIC: u32 = u32::from_le_bytes(*b"LBMP");

/// [`VipKey::family`], [`FlowKey::family`], [`Backend::family`]: IPv4.
pub const FAMILY_V4: u8 = 4;
/// The same for IPv6.
pub const FAMILY_V6: u8 = 6;

/// An IPv4 address as the maps store it: the header's bytes (network order) read as a native
/// `u32`, so the XDP program compares raw header fields without swapping.
pub fn ipv4_to_map(addr: core::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// The inverse of [`ipv4_to_map`].
pub fn ipv4_from_map(value: u32) -> core::net::Ipv4Addr {
    core::net::Ipv4Addr::from(value.to_ne_bytes())
}

/// An address of either family as the maps store it, with its family: 16 bytes in header
/// order, as four native `u32` words (so the XDP program copies and compares header words
/// without swapping). IPv4 sits in word 0 and the other words are zero (the shape of Katran's
/// address union); the family byte beside every address says which it is, so IPv4 `1.2.3.4`
/// and IPv6 `102:304::` never meet.
pub fn addr_to_map(addr: core::net::IpAddr) -> (u8, [u32; 4]) {
    match addr {
        core::net::IpAddr::V4(a) => (FAMILY_V4, [ipv4_to_map(a), 0, 0, 0]),
        core::net::IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (FAMILY_V6, [w(0), w(4), w(8), w(12)])
        }
    }
}

/// The inverse of [`addr_to_map`]; `None` for a family byte that is neither.
pub fn addr_from_map(family: u8, words: [u32; 4]) -> Option<core::net::IpAddr> {
    match family {
        FAMILY_V4 => Some(core::net::IpAddr::V4(ipv4_from_map(words[0]))),
        FAMILY_V6 => {
            let mut o = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(core::net::IpAddr::V6(core::net::Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

/// IANA protocol numbers the balancer understands.
pub const IPPROTO_TCP: u8 = 6;
/// IANA protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IANA protocol number of IPv4-in-IPv4 (RFC 2003) and of IPv4 inside IPv6 (RFC 2473).
pub const IPPROTO_IPIP: u8 = 4;
/// IANA protocol number of IPv6 encapsulated in IPv6 (RFC 2473) or in IPv4 (RFC 4213).
pub const IPPROTO_IPV6: u8 = 41;
/// IANA protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IANA protocol number of ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;

/// Ring slot value meaning "no backend" (the VIP has no backend in service).
pub const RING_EMPTY: u32 = u32::MAX;

/// Default Maglev table size: prime, as Maglev requires (Eisenbud et al., NSDI 2016, §3.4).
pub const DEFAULT_RING_SIZE: u32 = 65_537;

/// Default number of VIPs the maps are sized for.
pub const DEFAULT_MAX_VIPS: u32 = 64;
/// Default number of backends (over all VIPs) the maps are sized for.
pub const DEFAULT_MAX_BACKENDS: u32 = 4_096;
/// Default flow-table capacity (LRU: the least recently seen flow is evicted when full).
/// The NAT reverse map has the same capacity.
pub const DEFAULT_MAX_FLOWS: u32 = 1_048_576;
/// Capacity of each guard trie (allow, deny): CIDRs over all VIPs.
pub const MAX_GUARD_CIDRS: u32 = 16_384;
/// Capacity of the new-flow rate state (LRU: sources over all rate-limited VIPs; the least
/// recently seen source is forgotten first, and comes back with a full bucket).
pub const MAX_RATE_SOURCES: u32 = 65_536;

/// First socket mark (`SO_MARK`) of the block reserved for health-check probes: a packet
/// leaving an interface where `lb_hc_encap` runs with mark `LB_HC_MARK_BASE + id` is
/// encapsulated to backend `id` (IP-in-IP of the families of the probe and of its
/// [`Backend::addr`] in
/// [`names::MAP_BACKENDS`]), exactly as `lb_xdp` forwards client packets, and sent to it.
///
/// The block is the 65536 marks `0x4c42_0000..=0x4c42_ffff` ("LB" in the high half): the
/// program recognises a probe by the high 16 bits alone and takes the backend id from the low
/// 16, so the ids that can be probed are `0..65536` ([`LB_HC_MAX_BACKENDS`]); `--max-backends`
/// must stay at or below that for every backend to be reachable. A mark in the block whose id
/// is not below the backend table's size, or names an empty entry, is dropped (never sent on
/// unencapsulated). Firewall marks rarely use this range (they tend to be small integers or
/// single high bits); a host that does must change this constant and rebuild.
pub const LB_HC_MARK_BASE: u32 = 0x4c42_0000;
/// Bits of a socket mark that identify a health-check probe (see [`LB_HC_MARK_BASE`]).
pub const LB_HC_MARK_MASK: u32 = 0xffff_0000;
/// Number of backend ids the health-check mark block can address.
pub const LB_HC_MAX_BACKENDS: u32 = !LB_HC_MARK_MASK + 1;

const _: () = assert!(LB_HC_MARK_BASE & !LB_HC_MARK_MASK == 0);
const _: () = assert!(DEFAULT_MAX_BACKENDS <= LB_HC_MAX_BACKENDS);

/// The socket mark that sends a probe to backend `backend_id`, or `None` if the id is beyond
/// what the mark block can address ([`LB_HC_MAX_BACKENDS`]).
pub const fn hc_mark(backend_id: u32) -> Option<u32> {
    if backend_id < LB_HC_MAX_BACKENDS {
        Some(LB_HC_MARK_BASE | backend_id)
    } else {
        None
    }
}

/// The backend id a socket mark names, or `None` if the mark is not a health-check mark.
/// The inverse of [`hc_mark`]; the id still has to be below the backend table's size.
#[inline(always)]
pub const fn hc_backend_id(mark: u32) -> Option<u32> {
    if mark & LB_HC_MARK_MASK == LB_HC_MARK_BASE {
        Some(mark & !LB_HC_MARK_MASK)
    } else {
        None
    }
}

/// Global settings of the balancer program: one entry, index 0 of [`names::MAP_CONFIG`].
///
/// `magic` and `layout` come first and keep their place in every future layout, so a binary
/// can always tell what wrote a pinned `LB_CONFIG` (see [`LB_LAYOUT_VERSION`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// [`LB_CONFIG_MAGIC`].
    pub magic: u32,
    /// [`LB_LAYOUT_VERSION`] of the binary that created the maps.
    pub layout: u32,
    /// Maglev table size M; every VIP's ring holds M slots.
    pub ring_size: u32,
    /// Bit set of `CONFIG_F_*`.
    pub flags: u32,
    /// Source address of outer IPv4 headers (network order); 0 = none configured.
    pub lb_addr4: u32,
    /// Source address of outer IPv6 headers (as [`addr_to_map`] words); zero = none.
    pub lb_addr6: [u32; 4],
    /// The next-hop cache's generation: moved on by userspace on every change that may move
    /// a next hop (route, neighbour, link, address, rule; every backend write); a cached
    /// [`NextHop`] of another generation is stale. Every writer of `LB_CONFIG` in `lb run`
    /// reads, modifies and writes the entry under one lock (the route watch is a thread of
    /// its own), and the pin directory's lock keeps a second `lb run` out, so no write can
    /// put back a generation stale entries were stored under.
    pub nexthop_generation: u32,
    /// The flow clock's unit: nanoseconds per jiffy, the kernel's `TICK_NSEC`
    /// (`(10^9 + CONFIG_HZ / 2) / CONFIG_HZ`), measured by the loader. `lb_xdp` reads time as
    /// `bpf_jiffies64() * tick_ns + clock_offset_ns` (see [`FlowValue::created_ns`]).
    pub tick_ns: u64,
    /// CLOCK_MONOTONIC at jiffy 0 in that reading, modulo 2^64 (jiffies start near 2^32, so
    /// this is usually "negative"): measured by the loader at every start, against
    /// `bpf_ktime_get_coarse_ns`.
    pub clock_offset_ns: u64,
    /// A cached [`NextHop`] older than this is resolved again (bounds staleness should a
    /// change go unnoticed, e.g. while no `lb run` watches); 0 = no cache, every packet is
    /// looked up.
    pub nexthop_max_age_ns: u64,
}

/// [`LbConfig::flags`]: some VIP is in NAT mode, so a packet that is for no VIP may be a NAT
/// target's reply: `lb_xdp` looks it up in [`names::MAP_NAT_REVERSE`] (without the bit, host
/// traffic costs no lookup).
pub const CONFIG_F_NAT: u32 = 1 << 0;

/// Flow table key: the 5-tuple of the client's packet, as it appears in the headers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client address ([`addr_to_map`] words).
    pub src_addr: [u32; 4],
    /// VIP address ([`addr_to_map`] words).
    pub dst_addr: [u32; 4],
    /// Client port (network order); 0 for protocols without ports.
    pub src_port: u16,
    /// VIP port (network order).
    pub dst_port: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 2],
}

/// Flow table value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Backend the flow is pinned to.
    pub backend_id: u32,
    /// VIP the flow belongs to (lets `lb dump flows` and the sweeper find its idle timeout).
    pub vip_id: u32,
    /// When the flow was steered, in CLOCK_MONOTONIC nanoseconds as of the last timer tick
    /// (CLOCK_MONOTONIC_COARSE, behind the precise clock by less than one tick): `lb_xdp` reads
    /// it as `bpf_jiffies64() * LbConfig::tick_ns + LbConfig::clock_offset_ns`.
    pub created_ns: u64,
    /// The same clock at the last packet seen; `lb_xdp` rewrites it only when the clock has
    /// moved on (at most once a tick per flow).
    pub last_seen_ns: u64,
}

/// VIP table key. `port == 0` matches every port of the address (a port-0 VIP); the program
/// looks up the exact port first and falls back to port 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// VIP address ([`addr_to_map`] words).
    pub addr: [u32; 4],
    /// VIP port (network order); 0 = all ports.
    pub port: u16,
    /// IANA protocol number ([`IPPROTO_TCP`] or [`IPPROTO_UDP`]), or [`VIP_MARKER_PROTO`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}

/// [`VipKey::proto`] of an *address marker*: one entry per VIP address (port 0, proto 0)
/// whose [`VipMeta::flags`] say which protocols have VIPs there. Fragments carry no ports, so
/// `lb_xdp` uses the marker to recognise a fragment for any VIP of the address and drop it
/// (passing it would let the LB host route it onwards). Normal lookups never match it (their
/// proto is TCP or UDP).
pub const VIP_MARKER_PROTO: u8 = 0;
/// [`VipMeta::flags`] of an address marker: the address has a TCP VIP.
pub const VIP_F_HAS_TCP: u32 = 1 << 0;
/// [`VipMeta::flags`] of an address marker: the address has a UDP VIP.
pub const VIP_F_HAS_UDP: u32 = 1 << 1;
/// [`VipMeta::vip_id`] of an address marker (it has no ring).
pub const VIP_MARKER_ID: u32 = u32::MAX;
/// [`VipMeta::flags`] of a VIP: its target group fails open (too few healthy targets, so the
/// ring holds unhealthy ones too); new flows count as `unhealthy_routing_flows`.
pub const VIP_F_FAIL_OPEN: u32 = 1 << 2;
/// [`VipMeta::flags`] of a VIP in NAT mode: packets are rewritten to the target's address and
/// port (not encapsulated), and the targets' replies are translated back.
pub const VIP_F_NAT: u32 = 1 << 3;
/// [`VipMeta::flags`]: the VIP has an allow list; a source outside it is dropped.
pub const VIP_F_ALLOW_LIST: u32 = 1 << 4;
/// [`VipMeta::flags`]: the VIP has a deny list; a source inside it is dropped.
pub const VIP_F_DENY_LIST: u32 = 1 << 5;

/// VIP table value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// Index of this VIP's ring in [`names::MAP_RINGS`] and of its counters.
    pub vip_id: u32,
    /// Bit set of `VIP_F_*`.
    pub flags: u32,
    /// A flow-table entry of this VIP is valid this long after its last packet; a packet on
    /// an older entry is steered as a new flow. 0 = never expires (address markers).
    pub idle_timeout_ns: u64,
    /// New-flow rate limit per source: nanoseconds between two new flows at the sustained
    /// rate (10^9 / rate); 0 = no limit. See [`RateState`].
    pub rate_interval_ns: u64,
    /// How far ahead of the sustained rate a source may run: `(burst - 1) * rate_interval_ns`.
    pub rate_tolerance_ns: u64,
}

/// Backend table value, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend address ([`addr_to_map`] words): the outer destination of encapsulated packets.
    pub addr: [u32; 4],
    /// Backend port (network order), as registered.
    pub port: u16,
    /// Bit set of `BACKEND_F_*`.
    pub flags: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`]: the outer header's family; 0 for an empty entry.
    pub family: u8,
    /// VIP this backend serves.
    pub vip_id: u32,
    /// Maglev weight as registered.
    pub weight: u32,
}

/// What a NAT target's reply needs to be translated back: value of
/// [`names::MAP_NAT_REVERSE`], whose key is the reply's 5-tuple as it arrives (target address
/// and port → client address and port). The flow's own entry is the client's key with the
/// VIP as destination: the reply is translated only while that entry exists, names
/// `backend_id` and is within its idle timeout, and the reply keeps it alive.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatReverse {
    /// The VIP address the client sent to ([`addr_to_map`] words).
    pub vip_addr: [u32; 4],
    /// The VIP port the client sent to (network order; the flow's own port for a port-0 VIP).
    pub vip_port: u16,
    /// Explicit padding; always zero.
    pub _pad: [u8; 2],
    /// Backend the flow was steered to.
    pub backend_id: u32,
    /// The VIP's idle timeout when the flow was created (see [`VipMeta::idle_timeout_ns`]).
    pub idle_timeout_ns: u64,
}

/// The data of a guard trie key ([`names::MAP_GUARD_ALLOW`], [`names::MAP_GUARD_DENY`]),
/// behind the LPM prefix length: VIP id, family, source address. A CIDR `a/n` of VIP `v` is
/// stored with prefix length [`GUARD_PREFIX_BASE`]` + n`; lookups use the whole key
/// ([`GUARD_PREFIX_FULL`]). IPv4 sits in word 0 as everywhere, so an IPv4 `/n` matches on the
/// first `n` bits of the address and IPv4 and IPv6 entries never meet (the family byte is part
/// of the prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GuardKey {
    /// VIP id.
    pub vip_id: u32,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding; always zero (part of the matched prefix).
    pub _pad: [u8; 3],
    /// The source address ([`addr_to_map`] words).
    pub addr: [u32; 4],
}

/// Bits of a [`GuardKey`] before the address: VIP id, family and padding.
pub const GUARD_PREFIX_BASE: u32 = 64;
/// Prefix length of a lookup: the whole key.
pub const GUARD_PREFIX_FULL: u32 = GUARD_PREFIX_BASE + 128;

/// Key of [`names::MAP_RATE`]: one source of one rate-limited VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RateKey {
    /// VIP id.
    pub vip_id: u32,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 3],
    /// The source address ([`addr_to_map`] words).
    pub addr: [u32; 4],
}

/// One source's new-flow token bucket, kept as a generic cell rate algorithm (GCRA, the
/// ATM Forum's virtual scheduling form; equivalent to a token bucket of rate `r` and depth
/// `b`): `tat_ns` is the theoretical arrival time of the next new flow. A new flow at `now`
/// is allowed when `max(tat, now) - now <= tolerance`, and then moves `tat` on by one
/// interval; otherwise it is dropped and `tat` stays. One word of state, no division in the
/// program. Updates from two CPUs may race; the limit is then off by a flow, never wrong for
/// long.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    /// Theoretical arrival time (`bpf_ktime_get_ns`) of the next conforming new flow.
    pub tat_ns: u64,
    /// New flows of this source dropped by the limit, in total.
    pub dropped: u64,
    /// When the last one was dropped (`bpf_ktime_get_ns`; 0 = never).
    pub last_drop_ns: u64,
}

/// Per-VIP guard counters (per CPU; readers sum over CPUs), in [`names::MAP_GUARD_STATS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardCounters {
    /// Packets from a source outside the VIP's allow list (`drop_not_allowed`).
    pub not_allowed: u64,
    /// Packets from a source in the VIP's deny list (`drop_denied`).
    pub denied: u64,
    /// New flows (their packets) dropped by the new-flow rate limit (`drop_rate_limited`).
    pub rate_limited: u64,
}

/// Key of [`names::MAP_DECAP_ADDRS`]: an address of the backend host.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    /// The address ([`addr_to_map`] words).
    pub addr: [u32; 4],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 3],
}

/// What `lb run`'s flow sweeper last found in the flow table (index 0 of
/// [`names::MAP_FLOW_STATS`]), so `lb stats` shows the table's size and the flows it lost.
///
/// The LRU hash map does not report evictions, so they are derived: every key `lb_xdp`
/// inserts ([`names::MAP_FLOW_INSERTS`]) is either still in the table, was deleted by `lb run`
/// (expired entries the sweeper removes, flows of departed backends), or was evicted. The
/// sweeper deletes expired entries, so what the LRU evicts between two sweeps was younger than
/// its timeout at the last sweep: `evicted_live = inserts - deleted - entries`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTableStats {
    /// Entries in the table after the last sweep (all within their idle timeout).
    pub entries: u64,
    /// Entries `lb run` deleted, in total: expired ones and those of departed backends.
    pub deleted: u64,
    /// Of `deleted`, the expired entries the sweeper removed.
    pub expired: u64,
    /// Entries the LRU evicted while younger than their idle timeout (see above), in total.
    pub evicted_live: u64,
    /// CLOCK_MONOTONIC nanoseconds (the clock of `bpf_ktime_get_ns`) of the last sweep;
    /// 0 = none yet.
    pub swept_ns: u64,
    /// Entries of the NAT reverse map after the last sweep (whose flows are all still there).
    pub nat_entries: u64,
}

/// [`Backend::flags`]: flows pinned to the backend keep being forwarded to it. A flow whose
/// backend lacks this bit is re-steered through the ring on its next packet. Set for targets
/// in the ring, and for draining (or unhealthy-draining) targets that left the ring but keep
/// their established flows until their time is up.
pub const BACKEND_F_ACTIVE: u8 = 1 << 0;
/// [`Backend::flags`]: the backend takes new flows (some ring slots name it). Informational,
/// for `lb dump backends`; the ring itself decides where new flows go.
pub const BACKEND_F_IN_RING: u8 = 1 << 1;

/// The next hop `lb_xdp` resolved for a backend (`bpf_fib_lookup`), cached per CPU in
/// [`names::MAP_NEXTHOPS`] at the backend's id so the packets after it skip the lookup.
///
/// An entry is used only while everything it was resolved for still holds: the current
/// [`LbConfig::nexthop_generation`] (userspace bumps it on every route, neighbour, link or
/// address change and after every backend write; `lb_xdp` reads it before the backend's
/// entry, so a slot rewritten with another address, ids being reused, needs no address
/// compare: `lb-ebpf/src/nexthop.rs`), the same ingress interface, an age within [`LbConfig::nexthop_max_age_ns`],
/// and a packet no longer than `max_len` (the largest IP length the lookup's MTU check
/// passed: the helper reports the MTU only when a packet does not fit, so anything longer is
/// looked up again and gets the "too big" answer from the lookup itself). Only successful lookups are cached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// The backend address it was resolved for ([`addr_to_map`] words): for `lb dump` and
    /// tests; `lb_xdp` does not compare it.
    pub addr: [u32; 4],
    /// [`LbConfig::nexthop_generation`] read before the backend's entry and the lookup.
    pub generation: u32,
    /// The interface the packet that resolved it arrived on.
    pub ingress_ifindex: u32,
    /// Egress interface.
    pub ifindex: u32,
    /// Largest IP length (outer header included for DSR) known to fit the egress MTU.
    pub max_len: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`] of `addr`; 0 for an entry never filled.
    pub family: u8,
    /// Explicit padding; always zero.
    pub _pad: u8,
    /// Our MAC on the egress interface.
    pub smac: [u8; 6],
    /// The next hop's MAC.
    pub dmac: [u8; 6],
    /// Explicit padding; always zero.
    pub _pad2: [u8; 4],
    /// `bpf_ktime_get_ns()` when it was resolved.
    pub resolved_ns: u64,
}

/// What the next-hop cache counts, per CPU, in [`names::MAP_NEXTHOP_STATS`] (only on the
/// path that calls `bpf_fib_lookup` anyway, so a cache hit costs no counter).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextHopCounter {
    /// `bpf_fib_lookup` calls for a backend's next hop (DSR and NAT forward): cache misses,
    /// and packets longer than the cached entry's `max_len`.
    Lookups = 0,
    /// Of those, lookups whose answer was cached (success).
    Cached = 1,
}

impl NextHopCounter {
    /// Every counter, in index order.
    pub const ALL: [NextHopCounter; 2] = [NextHopCounter::Lookups, NextHopCounter::Cached];
    /// Number of counters: the size of the map.
    pub const COUNT: u32 = 2;

    /// The name shown by `lb stats`.
    pub const fn label(self) -> &'static str {
        match self {
            NextHopCounter::Lookups => "nexthop_lookups",
            NextHopCounter::Cached => "nexthop_cached",
        }
    }
}

/// One backend's counters, per CPU in [`names::MAP_BACKEND_STATS`] (readers sum over CPUs):
/// the one record `lb_xdp` updates for a forwarded packet or a translated NAT reply.
///
/// Everything else is derived by userspace, which relies on a backend id serving one VIP for
/// as long as its entry is in [`names::MAP_BACKENDS`]:
/// - a VIP's figures = the sum of the records of the backends whose entry names the VIP, plus
///   [`names::MAP_RETIRED_STATS`]`[1 + vip_id]` (what its departed backends had counted, folded
///   in once, when the backend's entry is cleared; zeroed when the VIP id is given out again);
/// - the reason counters `tx`, `redirect` and `nat_reply` = `LB_REASONS`' own slot (zero from
///   this layout on) plus, over every backend entry in use and `LB_RETIRED_STATS[0]`,
///   `packets - redirected - counted_apart`, `redirected` and
///   `reply_packets - replies_via_kernel`.
///
/// The same type holds the sums and the retired records.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets forwarded (client to target).
    pub packets: u64,
    /// Bytes forwarded (of the client's packet, before encapsulation).
    pub bytes: u64,
    /// Flows created (flow-table misses that picked a backend).
    pub new_flows: u64,
    /// Flows created while the VIP's group failed open (UnhealthyRoutingFlowCount).
    pub unhealthy_routing_flows: u64,
    /// NAT: target replies translated back and sent to the client (DSR: always 0, replies
    /// bypass the balancer).
    pub reply_packets: u64,
    /// NAT: bytes of those replies (their IP packets).
    pub reply_bytes: u64,
    /// Of `packets`, those sent with `bpf_redirect` (reason `redirect`).
    pub redirected: u64,
    /// Of `packets`, those whose reason `LB_REASONS` counts itself (`icmp_to_backend`,
    /// `nat_via_kernel`); the rest of `packets` not `redirected` are reason `tx`.
    pub counted_apart: u64,
    /// Of `reply_packets`, those passed to the kernel (reason `nat_via_kernel`, counted in
    /// `LB_REASONS`); the rest are reason `nat_reply`.
    pub replies_via_kernel: u64,
}

impl Counters {
    /// The sum of two records, field by field (wrapping, as the kernel's counters do).
    pub fn plus(self, o: Counters) -> Counters {
        Counters {
            packets: self.packets.wrapping_add(o.packets),
            bytes: self.bytes.wrapping_add(o.bytes),
            new_flows: self.new_flows.wrapping_add(o.new_flows),
            unhealthy_routing_flows: self
                .unhealthy_routing_flows
                .wrapping_add(o.unhealthy_routing_flows),
            reply_packets: self.reply_packets.wrapping_add(o.reply_packets),
            reply_bytes: self.reply_bytes.wrapping_add(o.reply_bytes),
            redirected: self.redirected.wrapping_add(o.redirected),
            counted_apart: self.counted_apart.wrapping_add(o.counted_apart),
            replies_via_kernel: self.replies_via_kernel.wrapping_add(o.replies_via_kernel),
        }
    }

    /// Packets of the record counted under reason `tx`.
    pub fn tx(&self) -> u64 {
        self.packets
            .wrapping_sub(self.redirected)
            .wrapping_sub(self.counted_apart)
    }

    /// Replies of the record counted under reason `nat_reply`.
    pub fn nat_replies(&self) -> u64 {
        self.reply_packets.wrapping_sub(self.replies_via_kernel)
    }
}

macro_rules! reasons {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal => $label:literal,)* }) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $name {
            $($(#[$vmeta])* $variant = $value,)*
        }

        impl $name {
            /// Every variant, in index order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];
            /// Number of variants: the size of the counter map.
            pub const COUNT: u32 = $name::ALL.len() as u32;

            /// The name shown by `lb stats`.
            pub const fn label(self) -> &'static str {
                match self { $($name::$variant => $label,)* }
            }
        }
    };
}

reasons! {
    /// What `lb_xdp` did with a packet, counted per CPU in [`names::MAP_REASONS`]. Every packet
    /// the program sees increments exactly one of these, but `tx`, `redirect` and `nat_reply`
    /// are counted in the packet's backend record instead (one counter update per forwarded
    /// packet), from which userspace derives them (see [`Counters`]).
    pub enum Reason {
        /// Neither IPv4 nor IPv6 (ARP, VLAN-tagged, …): passed untouched.
        PassNotIp = 0 => "pass_not_ip",
        /// IP but neither TCP nor UDP, nor an ICMP error about a VIP flow (ICMP echo, other
        /// protocols): passed untouched.
        PassNotTcpUdp = 1 => "pass_not_tcp_udp",
        /// TCP/UDP to an address:port that is no VIP (host traffic, L7 listeners): passed.
        PassNotVip = 2 => "pass_not_vip",
        /// Shorter than its Ethernet, IP, extension or L4 headers claim, IHL < 5, a version
        /// that does not match the EtherType: passed to the kernel, whose own checks drop it and
        /// count it in its SNMP counters.
        PassMalformed = 3 => "pass_malformed",
        /// Encapsulated and sent back out of the receiving interface.
        Tx = 4 => "tx",
        /// Encapsulated and redirected to another interface.
        Redirect = 5 => "redirect",
        /// An IPv4 or IPv6 fragment addressed to a VIP: without ports it cannot be steered
        /// consistently with the rest of its flow, so it is dropped.
        DropFragment = 6 => "drop_fragment",
        /// The VIP has no backend in service (empty ring).
        DropNoBackend = 7 => "drop_no_backend",
        /// The encapsulated packet would exceed the egress MTU and no ICMP could tell the
        /// sender (IPv4 with DF clear or with options; room below IPv6's minimum MTU; an ICMP
        /// error being forwarded); see [`Reason::TxIcmpTooBig`].
        DropMtu = 8 => "drop_mtu",
        /// `bpf_fib_lookup` found no route or no neighbour for the backend, or no source
        /// address of the backend's family is configured for the outer header.
        DropNoRoute = 9 => "drop_no_route",
        /// Growing the packet for the outer header failed.
        DropAdjustHead = 10 => "drop_adjust_head",
        /// The ring or backend table held an id the program could not resolve: a
        /// userspace/kernel inconsistency, counted so it is never silent.
        DropInternal = 11 => "drop_internal",
        /// The encapsulated packet would exceed the egress MTU: dropped, and answered with
        /// ICMP "fragmentation needed" (IPv4 with DF set, RFC 1191) or ICMPv6 "packet too big"
        /// (RFC 8201) carrying the MTU that fits after encapsulation, so the sender's path-MTU
        /// discovery adapts instead of stalling.
        TxIcmpTooBig = 12 => "tx_icmp_too_big",
        /// IPv6 whose upper-layer header is not found within the extension headers skipped
        /// (at most 4 hop-by-hop, routing with no segments left, and destination options
        /// headers, 1 KiB in all), or behind one that is not skipped (AH, ESP, mobility, a
        /// routing header with segments left, …): passed untouched.
        PassIpv6ExtHeader = 13 => "pass_ipv6_ext_header",
        /// An ICMP destination-unreachable (fragmentation needed, …) or ICMPv6
        /// destination-unreachable / packet-too-big quoting a packet of a VIP flow (from the
        /// VIP to a client): encapsulated to the backend that owns the flow, whose TCP needs
        /// it (path-MTU discovery), and sent out.
        IcmpToBackend = 14 => "icmp_to_backend",
        /// A NAT target's reply of a live flow: source translated back to the VIP address and
        /// port, checksums updated, and sent to the client (`XDP_TX` or redirect).
        NatReply = 15 => "nat_reply",
        /// A NAT packet (either way) translated, but `bpf_fib_lookup` found the next hop's
        /// MAC unresolved: passed to the kernel, which forwards it and resolves the neighbour
        /// (the packets after it take the XDP path).
        NatViaKernel = 16 => "nat_via_kernel",
        /// A NAT packet (either way) whose TTL / hop limit would expire here: passed untouched,
        /// so the kernel answers with ICMP time exceeded (RFC 1812 §5.3.1) as a router does.
        PassTtlExceeded = 17 => "pass_ttl_exceeded",
        /// An ICMP error about a NAT flow: its quote is not translated, so it is dropped
        /// rather than sent to the target encapsulated.
        DropNatIcmp = 18 => "drop_nat_icmp",
        /// The source is outside the VIP's allow list: dropped before any state is created.
        DropNotAllowed = 19 => "drop_not_allowed",
        /// The source is in the VIP's deny list: dropped before any state is created.
        DropDenied = 20 => "drop_denied",
        /// A new flow from a source over the VIP's new-flow rate: dropped, no flow created
        /// (established flows of the source are not affected).
        DropRateLimited = 21 => "drop_rate_limited",
    }
}

/// How `lb_xdp` lets go of a packet that ended early with a [`Reason`] (see
/// [`Reason::early_end`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EarlyEnd {
    /// `XDP_PASS`: to the kernel, untouched.
    Pass,
    /// `XDP_DROP`.
    Drop,
    /// `XDP_TX`: an answer sent back out of the receiving interface.
    Tx,
}

impl Reason {
    /// How a packet that ends early with this reason leaves `lb_xdp`: every such reason has
    /// one action, so the program's error paths carry only the reason (BENCHMARKS.md, "XDP
    /// hit: an early end carries only its reason (stop 37, ...)"). Exhaustive, without a
    /// wildcard: a new reason must say. The pass reasons hand the packet to the kernel
    /// untouched (not ours, malformed, a NAT packet the kernel must route, a TTL the kernel
    /// must answer), the ICMP "too big" goes back out, everything else is dropped.
    pub const fn early_end(self) -> EarlyEnd {
        match self {
            Reason::PassNotIp
            | Reason::PassNotTcpUdp
            | Reason::PassNotVip
            | Reason::PassMalformed
            | Reason::PassIpv6ExtHeader
            | Reason::NatViaKernel
            | Reason::PassTtlExceeded => EarlyEnd::Pass,
            Reason::TxIcmpTooBig => EarlyEnd::Tx,
            Reason::DropFragment
            | Reason::DropNoBackend
            | Reason::DropMtu
            | Reason::DropNoRoute
            | Reason::DropAdjustHead
            | Reason::DropInternal
            | Reason::DropNatIcmp
            | Reason::DropNotAllowed
            | Reason::DropDenied
            | Reason::DropRateLimited => EarlyEnd::Drop,
            // Sent packets, whose action is the send's: never an early end.
            Reason::Tx | Reason::Redirect | Reason::IcmpToBackend | Reason::NatReply => {
                EarlyEnd::Drop
            }
        }
    }

    /// The reasons whose [`early_end`](Reason::early_end) is [`EarlyEnd::Pass`], one bit
    /// each (bit `r as u32`): what `lb_xdp` tests, one shift and an and (a `match` compiled to
    /// compares that cost the hit 14 (IPv4) and 11 (IPv6) BPF instructions more, stop 37).
    pub const PASS_ON_EARLY_END: u32 = Reason::early_ends(EarlyEnd::Pass);

    /// The reasons whose [`early_end`](Reason::early_end) is [`EarlyEnd::Tx`], one bit each,
    /// as [`PASS_ON_EARLY_END`](Reason::PASS_ON_EARLY_END): `lb_xdp` tests this set, not a
    /// reason by name, so a new reason sent back out needs no change there.
    pub const TX_ON_EARLY_END: u32 = Reason::early_ends(EarlyEnd::Tx);

    /// The set of reasons whose early end is `end`, bit `r as u32` for reason `r`.
    const fn early_ends(end: EarlyEnd) -> u32 {
        const { assert!(Reason::COUNT <= 32, "a reason's bit must fit in a u32") };
        let mut set = 0;
        let mut i = 0;
        while i < Reason::ALL.len() {
            let r = Reason::ALL[i];
            // `==` is not const for enums: compare the discriminants.
            if r.early_end() as u8 == end as u8 {
                set |= 1 << r as u32;
            }
            i += 1;
        }
        set
    }
}

reasons! {
    /// What `lb_decap` did with a packet, per CPU in [`names::MAP_DECAP_STATS`].
    pub enum DecapReason {
        /// IPv4 or IPv6 carrying IPv4 or IPv6 (protocol 4 or 41), addressed to this host:
        /// outer header removed, inner packet passed up.
        Decapsulated = 0 => "decapsulated",
        /// Anything else: passed untouched.
        Passed = 1 => "passed",
        /// IP-in-IP whose inner header is truncated: passed untouched for the kernel to drop.
        PassMalformed = 2 => "pass_malformed",
    }
}

reasons! {
    /// What `lb_hc_encap` (TC egress) did with a packet, per CPU in [`names::MAP_HC_STATS`].
    /// Every packet the program sees increments exactly one of these.
    pub enum HcReason {
        /// No health-check mark (all ordinary egress traffic): passed on untouched.
        PassUnmarked = 0 => "pass_unmarked",
        /// Encapsulated to its backend and sent (out of this interface, or redirected to the
        /// interface the route to the backend uses).
        Encapsulated = 1 => "encapsulated",
        /// The mark names an id beyond the backend table, or an entry with no address.
        DropUnknownBackend = 2 => "drop_unknown_backend",
        /// Marked, but not an IPv4 or IPv6 packet behind an Ethernet header.
        DropNotIp = 3 => "drop_not_ip",
        /// `bpf_fib_lookup` found no route or no neighbour for the backend, or forwarding is
        /// disabled on the interface (the LB host needs `net.ipv4.ip_forward=1`, and
        /// `net.ipv6.conf.all.forwarding=1` for IPv6 backends), or no source address of the
        /// backend's family is configured.
        DropNoRoute = 4 => "drop_no_route",
        /// Growing the packet for the outer header failed (e.g. it was already encapsulated).
        DropAdjustRoom = 5 => "drop_adjust_room",
        /// The encapsulated probe would exceed the egress MTU (a probe larger than a full
        /// segment minus the outer header; the client data path has the same limit).
        DropMtu = 6 => "drop_mtu",
    }
}

/// Largest frame [`BenchTemplate`] holds.
pub const BENCH_FRAME_MAX: usize = 128;
/// [`BenchTemplate::vary`]: every repeat the same frame.
pub const BENCH_VARY_NONE: u32 = 0;
/// [`BenchTemplate::vary`]: a fresh client (address and port) every repeat.
pub const BENCH_VARY_FRESH: u32 = 1;
/// [`BenchTemplate::vary`]: a fixed set of flows, by source port.
pub const BENCH_VARY_FLOWS: u32 = 2;

/// Benchmark only: the frame `lb_bench_front` writes into the packet before every repeat of a
/// live-frames test run (the kernel recycles those pages without restoring their contents),
/// index 0 of [`names::MAP_BENCH_TEMPLATE`]. Not part of the pinned map layout: `lb run` never
/// uses it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchTemplate {
    /// Bytes of `frame` to write (1..=[`BENCH_FRAME_MAX`]); the test run's frame has this
    /// length.
    pub len: u32,
    /// How repeats differ, from the repeat's sequence number `seq` (`LB_BENCH_STATS[Runs]`
    /// before it):
    /// - [`BENCH_VARY_NONE`]: not at all;
    /// - [`BENCH_VARY_FRESH`]: a fresh client every repeat: `seq / 65536` is added to the
    ///   big-endian 32-bit word at `vary_addr_off` (the last word of the source address) and
    ///   `seq`'s low 16 bits are written (big-endian) at `vary_port_off` (the source port);
    /// - [`BENCH_VARY_FLOWS`]: a fixed set of flows: the source port becomes
    ///   `vary_port_base + (seq & vary_port_mask)`; the address stays.
    pub vary: u32,
    /// Offset in the frame of the source-address word to vary.
    pub vary_addr_off: u32,
    /// Offset in the frame of the source port to vary.
    pub vary_port_off: u32,
    /// [`BENCH_VARY_FLOWS`]: the first source port.
    pub vary_port_base: u32,
    /// [`BENCH_VARY_FLOWS`]: flows - 1, flows a power of two.
    pub vary_port_mask: u32,
    /// The frame (only the first `len` bytes are used).
    pub frame: [u8; BENCH_FRAME_MAX],
}

impl Default for BenchTemplate {
    fn default() -> Self {
        Self {
            len: 0,
            vary: 0,
            vary_addr_off: 0,
            vary_port_off: 0,
            vary_port_base: 0,
            vary_port_mask: 0,
            frame: [0; BENCH_FRAME_MAX],
        }
    }
}

/// Benchmark only: what `lb_bench_front` and `lb_bench_sink` count, per CPU, in
/// [`names::MAP_BENCH_STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchCounter {
    /// Repeats the front program ran (also the sequence number of fresh clients).
    Runs = 0,
    /// Tail calls that failed (empty program slot): the repeat measured nothing.
    TailCallFailed = 1,
    /// Frames the sink on the veth peer received (frames really transmitted).
    SinkReceived = 2,
    /// The template could not be written into the frame (length mismatch).
    TemplateFailed = 3,
}

impl BenchCounter {
    /// Number of counters: the size of the map.
    pub const COUNT: u32 = 4;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is `repr(C)`, `Copy`, made only of integers, and has no implicit
    // padding (explicit `_pad` fields fill every hole), so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::LbConfig {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipMeta {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::FlowTableStats {}
    unsafe impl aya::Pod for super::BenchTemplate {}
    unsafe impl aya::Pod for super::NatReverse {}
    unsafe impl aya::Pod for super::GuardKey {}
    unsafe impl aya::Pod for super::RateKey {}
    unsafe impl aya::Pod for super::RateState {}
    unsafe impl aya::Pod for super::GuardCounters {}
    unsafe impl aya::Pod for super::NextHop {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    #[test]
    fn an_early_end_passes_only_the_packets_the_kernel_must_see() {
        let pass = [
            Reason::PassNotIp,
            Reason::PassNotTcpUdp,
            Reason::PassNotVip,
            Reason::PassMalformed,
            Reason::PassIpv6ExtHeader,
            Reason::NatViaKernel,
            Reason::PassTtlExceeded,
        ];
        for &r in Reason::ALL {
            let want = if pass.contains(&r) {
                EarlyEnd::Pass
            } else if r == Reason::TxIcmpTooBig {
                EarlyEnd::Tx
            } else {
                EarlyEnd::Drop
            };
            assert_eq!(r.early_end(), want, "{r:?}");
            assert_eq!(
                Reason::PASS_ON_EARLY_END >> r as u32 & 1 == 1,
                want == EarlyEnd::Pass,
                "{r:?} in PASS_ON_EARLY_END"
            );
            assert_eq!(
                Reason::TX_ON_EARLY_END >> r as u32 & 1 == 1,
                want == EarlyEnd::Tx,
                "{r:?} in TX_ON_EARLY_END"
            );
        }
    }

    #[test]
    fn map_types_have_no_implicit_padding() {
        // Sum of field sizes equals the struct size: no hole the compiler filled.
        assert_eq!(size_of::<LbConfig>(), 4 * 4 + 4 + 16 + 4 + 8 + 8 + 8);
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<FlowValue>(), 4 + 4 + 8 + 8);
        assert_eq!(size_of::<VipKey>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<VipMeta>(), 4 + 4 + 8 + 8 + 8);
        assert_eq!(size_of::<Backend>(), 16 + 2 + 1 + 1 + 4 + 4);
        assert_eq!(size_of::<AddrKey>(), 16 + 1 + 3);
        assert_eq!(size_of::<BenchTemplate>(), 6 * 4 + BENCH_FRAME_MAX);
        assert_eq!(size_of::<Counters>(), 9 * 8);
        assert_eq!(size_of::<NatReverse>(), 16 + 2 + 2 + 4 + 8);
        assert_eq!(size_of::<GuardKey>(), 4 + 1 + 3 + 16);
        assert_eq!(size_of::<RateKey>(), 4 + 1 + 3 + 16);
        assert_eq!(size_of::<RateState>(), 3 * 8);
        assert_eq!(size_of::<GuardCounters>(), 3 * 8);
        // The guard prefix counts every bit before the address.
        assert_eq!(
            GUARD_PREFIX_BASE as usize,
            8 * core::mem::offset_of!(GuardKey, addr)
        );
        assert_eq!(size_of::<FlowTableStats>(), 6 * 8);
        assert_eq!(
            size_of::<NextHop>(),
            16 + 4 + 4 + 4 + 2 + 1 + 1 + 6 + 6 + 4 + 8
        );
        // The fields that identify a layout keep their place in every layout.
        assert_eq!(core::mem::offset_of!(LbConfig, magic), 0);
        assert_eq!(core::mem::offset_of!(LbConfig, layout), 4);
    }

    #[test]
    fn addresses_of_both_families_round_trip_and_never_meet() {
        use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let v4 = IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4));
        let v6 = IpAddr::V6(Ipv6Addr::new(0x102, 0x304, 0, 0, 0, 0, 0, 0));
        let (f4, w4) = addr_to_map(v4);
        let (f6, w6) = addr_to_map(v6);
        assert_eq!(
            (f4, w4),
            (FAMILY_V4, [u32::from_ne_bytes([1, 2, 3, 4]), 0, 0, 0])
        );
        assert_eq!(w6, w4, "same words: only the family tells them apart");
        assert_ne!(f4, f6);
        assert_eq!(addr_from_map(f4, w4), Some(v4));
        assert_eq!(addr_from_map(f6, w6), Some(v6));
        assert_eq!(addr_from_map(0, w4), None);
        let fd = IpAddr::V6("fd00::11".parse().unwrap());
        let (_, w) = addr_to_map(fd);
        // Header order: the first word holds the first four bytes as they are on the wire.
        assert_eq!(w[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(w[3].to_ne_bytes(), [0, 0, 0, 0x11]);
    }

    #[test]
    fn reason_indices_are_dense_and_labels_unique() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?} is out of order");
        }
        for (i, r) in DecapReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?} is out of order");
        }
        for (i, r) in HcReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?} is out of order");
        }
        let labels: std::vec::Vec<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        let mut dedup = labels.clone();
        dedup.sort_unstable();
        dedup.dedup();
        assert_eq!(labels.len(), dedup.len());
        let labels: std::vec::Vec<_> = HcReason::ALL.iter().map(|r| r.label()).collect();
        let mut dedup = labels.clone();
        dedup.sort_unstable();
        dedup.dedup();
        assert_eq!(labels.len(), dedup.len());
    }

    #[test]
    fn health_check_marks_round_trip_and_nothing_else_is_one() {
        assert_eq!(hc_mark(0), Some(0x4c42_0000));
        assert_eq!(hc_mark(7), Some(0x4c42_0007));
        assert_eq!(hc_mark(LB_HC_MAX_BACKENDS - 1), Some(0x4c42_ffff));
        assert_eq!(
            hc_mark(LB_HC_MAX_BACKENDS),
            None,
            "would spill into another mark"
        );
        for id in [0, 1, 4095, 65_535] {
            assert_eq!(hc_mark(id).and_then(hc_backend_id), Some(id));
        }
        for mark in [0, 1, 0x4c41_ffff, 0x4c43_0000, 0x0000_4c42, u32::MAX] {
            assert_eq!(hc_backend_id(mark), None, "{mark:#x} is no probe mark");
        }
    }
}
