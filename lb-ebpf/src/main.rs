//! The eBPF programs of lb.
//!
//! - `lb_xdp`: the Layer 4 balancer. Steers packets for configured VIPs to a backend (flow
//!   table, then Maglev ring), encapsulates them IPv4-in-IPv4 for direct server return and
//!   sends them out with `XDP_TX` or `bpf_redirect`. Everything else passes untouched.
//! - `lb_decap`: runs on backends; strips the outer header of IP-in-IP packets addressed to the
//!   host so that backends need no tunnel driver.
//! - `lb_pass`: passes everything (benchmark baseline; veth peers in the test topology).
//! - `lb_hc_encap` ([`hc_encap`], TC egress): sends marked health-check probes to their backend
//!   through the same IP-in-IP data path, so a probe tests what client traffic needs.
//!
//! Every packet increments exactly one reason counter, so nothing is dropped silently.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
        xdp_action,
    },
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    helpers::{
        bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{
    BACKEND_F_ACTIVE, Backend, Counters, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_FLOWS, DEFAULT_MAX_VIPS,
    DEFAULT_RING_SIZE, DecapReason, FlowKey, FlowValue, IPPROTO_IPIP, IPPROTO_TCP, IPPROTO_UDP,
    LbConfig, RING_EMPTY, Reason, VIP_F_FAIL_OPEN, VIP_F_HAS_TCP, VIP_F_HAS_UDP, VIP_MARKER_PROTO,
    VipKey, VipMeta,
};
use network_types::eth::EthHdr;

mod hc_encap;

/// Sizes here are the compiled-in defaults; the loader overrides them from the flags
/// (`--max-flows`, `--max-vips`, `--max-backends`, `--ring-size`) before the maps are created.
const MAX_VIPS: usize = DEFAULT_MAX_VIPS as usize;
/// VIPs plus one address marker per VIP address (see `lb_common::VIP_MARKER_PROTO`).
const VIP_ENTRIES: usize = 2 * MAX_VIPS;
const MAX_BACKENDS: usize = DEFAULT_MAX_BACKENDS as usize;
const MAX_FLOWS: usize = DEFAULT_MAX_FLOWS as usize;
const RING_SLOTS: usize = DEFAULT_MAX_VIPS as usize * DEFAULT_RING_SIZE as usize;
const REASONS: usize = Reason::COUNT as usize;
const DECAP_REASONS: usize = DecapReason::COUNT as usize;

#[btf_map]
static LB_CONFIG: Array<LbConfig, 1> = Array::new();
#[btf_map]
static LB_VIPS: HashMap<VipKey, VipMeta, VIP_ENTRIES> = HashMap::new();
#[btf_map]
static LB_BACKENDS: Array<Backend, MAX_BACKENDS> = Array::new();
#[btf_map]
static LB_RINGS: Array<u32, RING_SLOTS> = Array::new();
#[btf_map]
static LB_FLOWS: LruHashMap<FlowKey, FlowValue, MAX_FLOWS> = LruHashMap::new();
#[btf_map]
static LB_VIP_STATS: PerCpuArray<Counters, MAX_VIPS> = PerCpuArray::new();
#[btf_map]
static LB_BACKEND_STATS: PerCpuArray<Counters, MAX_BACKENDS> = PerCpuArray::new();
#[btf_map]
static LB_REASONS: PerCpuArray<u64, REASONS> = PerCpuArray::new();
#[btf_map]
static LB_DECAP_STATS: PerCpuArray<u64, DECAP_REASONS> = PerCpuArray::new();
/// Addresses `lb_decap` accepts as outer destination (the backend's own addresses).
#[btf_map]
static LB_DECAP_ADDRS: HashMap<u32, u8, 64> = HashMap::new();

const ETH_LEN: usize = size_of::<EthHdr>();
const IPV4_MIN_LEN: usize = 20;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const AF_INET: u8 = 2;
/// More-fragments flag and fragment offset, in network order within the 16-bit field.
const IP_MF_OFFSET_MASK_BE: u16 = 0x3fffu16.to_be();
const IP_DF_BE: u16 = 0x4000u16.to_be();
const OUTER_TTL: u8 = 64;

/// Returns a pointer to a `T` at `offset` bytes into the packet, if the packet is long enough.
///
/// The explicit comparison against `data_end` is what the verifier needs to accept the
/// subsequent access.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
fn count(reason: Reason) {
    if let Some(c) = LB_REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot; no other program instance runs on this CPU concurrently.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn add<const N: usize>(
    map: &PerCpuArray<Counters, N>,
    idx: u32,
    bytes: u64,
    new_flow: bool,
    fail_open: bool,
) {
    if let Some(c) = map.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, as in `count`.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            if new_flow {
                (*c).new_flows += 1;
                if fail_open {
                    (*c).unhealthy_routing_flows += 1;
                }
            }
        }
    }
}

/// Mixes the 5-tuple into 64 bits (splitmix64 finaliser). No per-node seed: every LB node
/// must pick the same slot for the same flow.
#[inline(always)]
fn flow_hash(k: &FlowKey) -> u64 {
    let mut h = (k.src_addr as u64) << 32 | k.dst_addr as u64;
    h ^= ((k.src_port as u64) << 24 | (k.dst_port as u64) << 8 | k.proto as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let (action, reason) = balance(&ctx);
    count(reason);
    action
}

/// The balancer proper: returns the XDP action and the reason to count.
#[inline(always)]
fn balance(ctx: &XdpContext) -> (u32, Reason) {
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;

    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (PASS, Reason::PassMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return (PASS, Reason::PassNotIpv4);
    }
    let Some(ip) = ptr_at::<[u8; IPV4_MIN_LEN]>(ctx, ETH_LEN) else {
        return (PASS, Reason::PassMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let vihl = ip[0];
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < IPV4_MIN_LEN {
        return (PASS, Reason::PassMalformed);
    }
    let proto = ip[9];
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return (PASS, Reason::PassNotTcpUdp);
    }
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let frags = u16::from_ne_bytes([ip[6], ip[7]]);
    let src_addr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let dst_addr = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    if tot_len < ihl || ETH_LEN + tot_len > ctx.data_end() - ctx.data() {
        return (PASS, Reason::PassMalformed);
    }

    // Ports sit right after the IP header (and options) for both TCP and UDP. A non-first
    // fragment has no ports; it cannot be matched to its VIP port, so it is looked up by the
    // port-0 entry only and then dropped below if it belongs to a VIP.
    let is_fragment = frags & IP_MF_OFFSET_MASK_BE != 0;
    let l4_min = if proto == IPPROTO_TCP { 20 } else { 8 };
    let (src_port, dst_port) = if is_fragment {
        (0u16, 0u16)
    } else {
        if tot_len < ihl + l4_min {
            return (PASS, Reason::PassMalformed);
        }
        // `ihl` is at most 60 (4-bit field times 4): the verifier sees a bounded offset.
        let Some(ports) = ptr_at::<[u16; 2]>(ctx, ETH_LEN + (ihl & 0x3c)) else {
            return (PASS, Reason::PassMalformed);
        };
        if ptr_at::<u8>(ctx, ETH_LEN + (ihl & 0x3c) + l4_min - 1).is_none() {
            return (PASS, Reason::PassMalformed);
        }
        // SAFETY: bounds checked by ptr_at.
        let ports = unsafe { &*ports };
        (ports[0], ports[1])
    };

    let mut vkey = VipKey {
        addr: dst_addr,
        port: dst_port,
        proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; no insert/remove happens in between.
    let vip = match unsafe { LB_VIPS.get(vkey) } {
        Some(v) => *v,
        None => {
            vkey.port = 0;
            // SAFETY: as above.
            match unsafe { LB_VIPS.get(vkey) } {
                Some(v) => *v,
                None if is_fragment => {
                    // No ports to match: drop it if any VIP of this protocol lives at the
                    // address (its address marker says so), else it is not ours.
                    vkey.proto = VIP_MARKER_PROTO;
                    let want = if proto == IPPROTO_TCP {
                        VIP_F_HAS_TCP
                    } else {
                        VIP_F_HAS_UDP
                    };
                    // SAFETY: as above.
                    return match unsafe { LB_VIPS.get(vkey) } {
                        Some(m) if m.flags & want != 0 => (DROP, Reason::DropFragment),
                        _ => (PASS, Reason::PassNotVip),
                    };
                }
                None => return (PASS, Reason::PassNotVip),
            }
        }
    };
    if is_fragment {
        return (DROP, Reason::DropFragment);
    }

    let Some(cfg) = LB_CONFIG.get(0) else {
        return (DROP, Reason::DropInternal);
    };
    let cfg = *cfg;

    let fkey = FlowKey {
        src_addr,
        dst_addr,
        src_port,
        dst_port,
        proto,
        _pad: [0; 3],
    };
    // SAFETY: `ktime` has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };

    // Flow table first: an established flow stays on its backend across ring changes, unless
    // that backend no longer keeps its flows (its drain time is up, or it turned unhealthy
    // without an unhealthy draining interval) or its id now belongs to another VIP; then it
    // is re-steered.
    let mut backend_id = RING_EMPTY;
    let mut backend = Backend::default();
    if let Some(flow) = LB_FLOWS.get_ptr_mut(fkey) {
        // SAFETY: pointer into the map value, valid for this program run.
        let id = unsafe { (*flow).backend_id };
        if let Some(b) = LB_BACKENDS.get(id)
            && b.flags & BACKEND_F_ACTIVE != 0
            && b.vip_id == vip.vip_id
        {
            backend_id = id;
            backend = *b;
            // SAFETY: as above.
            unsafe { (*flow).last_seen_ns = now };
        }
    }
    let new_flow = backend_id == RING_EMPTY;
    if new_flow {
        let slot = (flow_hash(&fkey) % cfg.ring_size as u64) as u32;
        let idx = vip.vip_id.wrapping_mul(cfg.ring_size).wrapping_add(slot);
        let Some(id) = LB_RINGS.get(idx) else {
            return (DROP, Reason::DropInternal);
        };
        let id = *id;
        if id == RING_EMPTY {
            return (DROP, Reason::DropNoBackend);
        }
        let Some(b) = LB_BACKENDS.get(id) else {
            return (DROP, Reason::DropInternal);
        };
        backend_id = id;
        backend = *b;
    }

    // Resolve the next hop before touching the packet, so a drop leaves it unmodified.
    let outer_len = tot_len + IPV4_MIN_LEN;
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of integers).
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_IPIP;
    fib.__bindgen_anon_1.tot_len = outer_len as u16;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_3.ipv4_src = cfg.lb_addr;
    fib.__bindgen_anon_4.ipv4_dst = backend.addr;
    // SAFETY: `fib` is a valid, fully initialised parameter block of the size passed.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), &mut fib, size_of::<FibParams>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // SAFETY: on FRAG_NEEDED the helper stores the egress MTU in this union member.
        let mtu = unsafe { fib.__bindgen_anon_1.mtu_result } as usize;
        // RFC 1191: only packets that forbid fragmentation get "fragmentation needed". The
        // quoted header is copied whole, so only option-less headers are answered.
        if frags & IP_DF_BE != 0 && ihl == IPV4_MIN_LEN && mtu >= 68 + IPV4_MIN_LEN {
            return icmp_too_big(ctx, (mtu - IPV4_MIN_LEN) as u16);
        }
        return (DROP, Reason::DropMtu);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return (DROP, Reason::DropNoRoute);
    }

    if new_flow {
        let value = FlowValue {
            backend_id,
            vip_id: vip.vip_id,
            last_seen_ns: now,
        };
        // A full LRU map evicts its least recently used entry; insert cannot fail for space.
        let _ = LB_FLOWS.insert(fkey, value, 0);
    }

    // Grow the packet at the front by one IPv4 header.
    // SAFETY: the context pointer is the one the kernel passed in.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV4_MIN_LEN as i32)) } != 0 {
        return (DROP, Reason::DropAdjustHead);
    }
    // Data pointers changed: every access below re-derives and re-checks them.
    let Some(new_eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (DROP, Reason::DropAdjustHead);
    };
    let Some(outer) = ptr_at::<[u8; IPV4_MIN_LEN]>(ctx, ETH_LEN) else {
        return (DROP, Reason::DropAdjustHead);
    };
    let Some(inner) = ptr_at::<[u8; 2]>(ctx, ETH_LEN + IPV4_MIN_LEN) else {
        return (DROP, Reason::DropAdjustHead);
    };
    // SAFETY: bounds checked above; the three regions do not overlap.
    unsafe {
        let tos = (*inner)[1];
        (*new_eth).dst_addr = fib.dmac;
        (*new_eth).src_addr = fib.smac;
        (*new_eth).ether_type = ETH_P_IP_BE;
        // RFC 2003 §3.1: copy TOS, and DF from the inner header. Addresses are stored in
        // header byte order already.
        let mut hdr = [0u8; IPV4_MIN_LEN];
        hdr[0] = 0x45;
        hdr[1] = tos;
        hdr[2..4].copy_from_slice(&(outer_len as u16).to_be_bytes());
        hdr[6] = frags.to_ne_bytes()[0] & 0x40;
        hdr[8] = OUTER_TTL;
        hdr[9] = IPPROTO_IPIP;
        hdr[12..16].copy_from_slice(&cfg.lb_addr.to_ne_bytes());
        hdr[16..20].copy_from_slice(&backend.addr.to_ne_bytes());
        let c = checksum_bytes(&hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        *outer = hdr;
    }

    let bytes = tot_len as u64;
    let fail_open = vip.flags & VIP_F_FAIL_OPEN != 0;
    add(&LB_VIP_STATS, vip.vip_id, bytes, new_flow, fail_open);
    add(&LB_BACKEND_STATS, backend_id, bytes, new_flow, fail_open);

    if fib.ifindex == ctx.ingress_ifindex() as u32 {
        (xdp_action::XDP_TX, Reason::Tx)
    } else {
        // SAFETY: plain helper call; returns XDP_REDIRECT or XDP_ABORTED.
        let action = unsafe { bpf_redirect(fib.ifindex, 0) } as u32;
        (action, Reason::Redirect)
    }
}

/// One's-complement checksum (RFC 1071) of `N` bytes, `N` even.
#[inline(always)]
fn checksum_bytes<const N: usize>(b: &[u8; N]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    // Bounded loop: N is a constant.
    while i + 1 < N {
        sum += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Turns the packet into ICMP "fragmentation needed" (type 3, code 4; RFC 792, RFC 1191) with
/// `mtu` as the next-hop MTU, from the VIP to the client, and sends it back out of the
/// receiving interface. The VIP as source lets the client's connection tracking relate the
/// ICMP to its connection. Called only for option-less IPv4 headers (checked by the caller).
#[inline(always)]
fn icmp_too_big(ctx: &XdpContext, mtu: u16) -> (u32, Reason) {
    const ICMP_LEN: usize = 8;
    /// The offending packet's IP header and the first 8 bytes of its payload (RFC 792).
    const QUOTE: usize = IPV4_MIN_LEN + 8;
    const IP_TOT: usize = IPV4_MIN_LEN + ICMP_LEN + QUOTE;
    const FRAME: usize = ETH_LEN + IP_TOT;
    const DROP: (u32, Reason) = (xdp_action::XDP_DROP, Reason::DropMtu);

    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return DROP;
    };
    let Some(quote) = ptr_at::<[u8; QUOTE]>(ctx, ETH_LEN) else {
        return DROP;
    };
    // SAFETY: bounds checked by ptr_at; copied out before the packet is rewritten.
    let (eth, quote) = unsafe { (*eth, *quote) };
    let old_len = ctx.data_end() - ctx.data();
    if old_len < FRAME {
        return DROP;
    }
    // SAFETY: the context pointer is the one the kernel passed in; shrinking only.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, FRAME as i32 - old_len as i32) } != 0 {
        return DROP;
    }
    let Some(out) = ptr_at::<[u8; FRAME]>(ctx, 0) else {
        return DROP;
    };
    // SAFETY: bounds checked by ptr_at.
    let out = unsafe { &mut *out };

    let mut ip = [0u8; IPV4_MIN_LEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(IP_TOT as u16).to_be_bytes());
    ip[8] = OUTER_TTL;
    ip[9] = 1; // ICMP
    ip[12..16].copy_from_slice(&quote[16..20]); // from the VIP …
    ip[16..20].copy_from_slice(&quote[12..16]); // … to the client
    let c = checksum_bytes(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());

    let mut icmp = [0u8; ICMP_LEN + QUOTE];
    icmp[0] = 3; // destination unreachable
    icmp[1] = 4; // fragmentation needed and DF set
    icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
    icmp[ICMP_LEN..].copy_from_slice(&quote);
    let c = checksum_bytes(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());

    out[0..6].copy_from_slice(&eth.src_addr);
    out[6..12].copy_from_slice(&eth.dst_addr);
    out[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    out[ETH_LEN..ETH_LEN + IPV4_MIN_LEN].copy_from_slice(&ip);
    out[ETH_LEN + IPV4_MIN_LEN..].copy_from_slice(&icmp);
    (xdp_action::XDP_TX, Reason::TxIcmpTooBig)
}

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let reason = decap(&ctx);
    if let Some(c) = LB_DECAP_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    xdp_action::XDP_PASS
}

/// Strips the outer header of IP-in-IP packets for this host; everything else is untouched.
#[inline(always)]
fn decap(ctx: &XdpContext) -> DecapReason {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return DecapReason::Passed;
    };
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return DecapReason::Passed;
    }
    let Some(outer) = ptr_at::<[u8; IPV4_MIN_LEN]>(ctx, ETH_LEN) else {
        return DecapReason::Passed;
    };
    // SAFETY: bounds checked by ptr_at.
    let outer = unsafe { &*outer };
    // Only option-less outer headers (as lb_xdp writes them); anything else is not ours.
    if outer[0] != 0x45 || outer[9] != IPPROTO_IPIP {
        return DecapReason::Passed;
    }
    let dst = u32::from_ne_bytes([outer[16], outer[17], outer[18], outer[19]]);
    // SAFETY: value only tested for presence.
    if unsafe { LB_DECAP_ADDRS.get(dst) }.is_none() {
        return DecapReason::Passed;
    }
    let Some(inner) = ptr_at::<[u8; IPV4_MIN_LEN]>(ctx, ETH_LEN + IPV4_MIN_LEN) else {
        return DecapReason::PassMalformed;
    };
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*inner)[0] } >> 4 != 4 {
        return DecapReason::PassMalformed;
    }
    // SAFETY: bounds checked by ptr_at.
    let saved = unsafe { *eth };
    // SAFETY: the context pointer is the one the kernel passed in.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, IPV4_MIN_LEN as i32) } != 0 {
        return DecapReason::PassMalformed;
    }
    let Some(new_eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return DecapReason::PassMalformed;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe { *new_eth = saved };
    DecapReason::Decapsulated
}

#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
