//! Encapsulation for direct server return: the next hop of the backend (cached per backend,
//! else `bpf_fib_lookup`, which also checks the egress MTU), then one outer header of the backend's family in front
//! of the client's packet: IPv4-in-IPv4 (RFC 2003), IPv6-in-IPv6 or IPv4-in-IPv6 (RFC 2473),
//! IPv6-in-IPv4 (RFC 4213). One code path for all four; only the outer header differs.

use core::mem::{MaybeUninit, offset_of, size_of};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
        xdp_action,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{
    Backend, FAMILY_V6, IPPROTO_IPIP, IPPROTO_IPV6, LbConfig, NextHop, NextHopCounter, Reason,
};

use crate::{
    icmp,
    lookup::{Done, Steer},
    nexthop::{self, Lookup},
    parse::Packet,
    pkt::{
        AF_INET, AF_INET6, ETH_LEN, ETH_P_IP_BE, ETH_P_IPV6_BE, IP_DF_BE, IPV4_LEN, IPV6_LEN,
        OUTER_TTL, csum_fold, csum_words, eth_words, halves, load_addr, ptr_at, store_addr_halves,
        store_words, zero,
    },
};

/// IPv6's minimum link MTU (RFC 8200 §5): a packet-too-big must not ask for less.
const IPV6_MIN_MTU: usize = 1280;
/// The smallest MTU an IPv4 "fragmentation needed" may report (RFC 791: every host accepts
/// 68-byte datagrams).
const IPV4_MIN_MTU: usize = 68;

/// Our MAC on the egress interface and the next hop's, as memory-order 16-bit words, in the
/// order and at the 2-aligned place both `bpf_fib_lookup`'s block and a [`NextHop`] entry keep
/// them (`smac` then `dmac`; asserted below), so a [`Route`] points at them where they are.
#[repr(C)]
pub struct Macs {
    /// Our MAC.
    pub smac: [u16; 3],
    /// The next hop's MAC.
    pub dmac: [u16; 3],
}

const _: () = {
    assert!(offset_of!(FibParams, dmac) == offset_of!(FibParams, smac) + 6);
    assert!(offset_of!(FibParams, smac) % 2 == 0);
    assert!(offset_of!(NextHop, dmac) == offset_of!(NextHop, smac) + 6);
    assert!(offset_of!(NextHop, smac) % 2 == 0);
};

impl Macs {
    /// The MACs of a `bpf_fib_lookup` answer.
    #[inline(always)]
    pub fn of_fib(fib: &FibParams) -> &Macs {
        // SAFETY: 12 bytes at `smac` (then `dmac`, asserted above) inside `fib`, 2-aligned
        // (`fib` is 4-aligned, the offset even); any bytes are valid `u16`s.
        unsafe {
            &*core::ptr::from_ref(fib)
                .byte_add(offset_of!(FibParams, smac))
                .cast::<Macs>()
        }
    }

    /// The MACs of a next-hop cache entry.
    ///
    /// # Safety
    /// `e` must point to a valid entry that outlives `'a`.
    #[inline(always)]
    pub unsafe fn of_entry<'a>(e: *const NextHop) -> &'a Macs {
        // SAFETY: as in `of_fib`, inside the entry the caller vouches for.
        unsafe { &*e.byte_add(offset_of!(NextHop, smac)).cast::<Macs>() }
    }

    /// Both MACs as bytes (for a cache entry).
    #[inline(always)]
    pub fn bytes(&self) -> ([u8; 6], [u8; 6]) {
        let b = |m: &[u16; 3]| {
            let [a, b] = m[0].to_ne_bytes();
            let [c, d] = m[1].to_ne_bytes();
            let [e, f] = m[2].to_ne_bytes();
            [a, b, c, d, e, f]
        };
        (b(&self.smac), b(&self.dmac))
    }
}

/// The resolved next hop of a backend.
#[derive(Clone, Copy)]
pub struct Route<'a> {
    /// Egress interface.
    pub ifindex: u32,
    /// The MACs, read where the frame is addressed: in the next-hop entry on a cache hit (a
    /// copy made the hit compose them into registers and take them apart again, about 30
    /// instructions), else in the lookup's block.
    pub macs: &'a Macs,
}

/// Length of the outer header for a backend of this family.
#[inline(always)]
fn outer_len(backend: &Backend) -> usize {
    if backend.family == FAMILY_V6 {
        IPV6_LEN
    } else {
        IPV4_LEN
    }
}

/// The IP protocol / next header that announces the inner packet's family.
#[inline(always)]
fn inner_proto(pkt: &Packet) -> u8 {
    if pkt.key.family == FAMILY_V6 {
        IPPROTO_IPV6
    } else {
        IPPROTO_IPIP
    }
}

/// Room for `bpf_fib_lookup`'s parameter block on the stack.
pub struct FibBlock(MaybeUninit<FibParams>);

impl FibBlock {
    pub const fn uninit() -> Self {
        FibBlock(MaybeUninit::uninit())
    }

    /// The block, all zero: the verifier requires the whole block to be initialised before
    /// the helper reads it ([`zero`] says why not `core::mem::zeroed()`).
    #[inline(always)]
    pub fn zeroed_params(&mut self) -> &mut FibParams {
        // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of integers).
        unsafe { zero(&mut self.0) }
    }
}

/// Resolves the next hop of the backend `steer` names before the packet is touched, so a drop
/// leaves it unmodified: from the next-hop cache when it holds a valid entry ([`nexthop`]), else
/// with `bpf_fib_lookup`, whose success is cached. A packet that would not fit the egress MTU once
/// encapsulated is answered with an ICMP "too big" where that helps the sender, and dropped (a
/// packet longer than any the cached entry has passed is always looked up, so this answer comes
/// from the helper's MTU check, cache or not). A looked-up answer lives in `block`. The cache is
/// asked under [`Steer::generation`].
#[inline(always)]
pub fn route<'a>(
    ctx: &XdpContext,
    pkt: &Packet,
    steer: &Steer,
    cfg: &LbConfig,
    now: u64,
    block: &'a mut FibBlock,
) -> Result<Route<'a>, Done> {
    let backend = steer.backend;
    let overhead = outer_len(backend);
    let total = pkt.ip_len + overhead;
    if total > u16::MAX as usize {
        return Err(Reason::DropMtu);
    }
    let generation = match nexthop::get(steer, ctx, total, cfg, now) {
        Lookup::Hit(route) => return Ok(route),
        Lookup::Miss(g) => g,
    };
    // Without a source address of the backend's family there is no outer header. Tested on a
    // miss only: an entry is stored only after this test passed, under the generation read
    // before it, and userspace moves the generation on after it writes the addresses (`lb
    // run`'s start), so no valid entry outlives an address taken away (the test cost an IPv6
    // hit eight BPF instructions, an IPv4 hit two; BENCHMARKS.md, "XDP hit: counted down
    // further (stop 38)").
    let v6 = backend.family == FAMILY_V6;
    if (v6 && cfg.lb_addr6 == [0; 4]) || (!v6 && cfg.lb_addr4 == 0) {
        return Err(Reason::DropNoRoute);
    }
    let ingress = ctx.ingress_ifindex() as u32;
    nexthop::count(NextHopCounter::Lookups);
    let fib = block.zeroed_params();
    if v6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = load_addr(&cfg.lb_addr6);
        fib.__bindgen_anon_4.ipv6_dst = load_addr(&backend.addr);
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = cfg.lb_addr4;
        fib.__bindgen_anon_4.ipv4_dst = backend.addr[0];
    }
    fib.l4_protocol = inner_proto(pkt);
    fib.__bindgen_anon_1.tot_len = total as u16;
    fib.ifindex = ingress;
    // SAFETY: `fib` is a valid, fully initialised parameter block of the size passed.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), fib, size_of::<FibParams>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // SAFETY: on FRAG_NEEDED the helper stores the egress MTU in this union member.
        let mtu = unsafe { fib.__bindgen_anon_1.mtu_result } as usize;
        return Err(too_big(ctx, pkt, mtu.saturating_sub(overhead)));
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Err(Reason::DropNoRoute);
    }
    let route = Route {
        ifindex: fib.ifindex,
        macs: Macs::of_fib(fib),
    };
    if let Some(g) = generation {
        nexthop::put(steer.id, backend, ingress, total, now, g, &route);
    }
    Ok(route)
}

/// The packet needs `room` bytes or fewer to fit once encapsulated: tell the sender where
/// that helps (RFC 1191 for IPv4 with DF set and no options, whose header the quote copies
/// whole; RFC 8201 for IPv6 unless the room is below IPv6's minimum MTU), else drop. An ICMP
/// error being forwarded never gets an ICMP answer (RFC 1122 §3.2.2, RFC 4443 §2.4 e.1).
#[inline(always)]
pub fn too_big(ctx: &XdpContext, pkt: &Packet, room: usize) -> Done {
    if pkt.icmp_error {
        return Reason::DropMtu;
    }
    if pkt.key.family == FAMILY_V6 {
        if room >= IPV6_MIN_MTU {
            return icmp::too_big_v6(ctx, room as u32);
        }
    } else if pkt.dont_fragment && !pkt.ip_options && room >= IPV4_MIN_MTU {
        return icmp::too_big_v4(ctx, room as u16);
    }
    Reason::DropMtu
}

/// The Ethernet header and the `O`-word outer IP header behind it at the start of the frame
/// (`T` = 7 + `O` words), after one bounds check of both.
#[inline(always)]
fn headers<const T: usize, const O: usize>(
    ctx: &XdpContext,
) -> Option<(*mut [u16; ETH_LEN / 2], *mut [u16; O])> {
    const { assert!(T == ETH_LEN / 2 + O) };
    let p = ptr_at::<[u16; T]>(ctx, 0)?.cast::<u16>();
    // SAFETY: both within the `T` words checked.
    Some((p.cast(), unsafe { p.add(ETH_LEN / 2) }.cast()))
}

/// Puts the outer header in front of the packet and addresses the frame to the next hop.
/// `flow_label` (20 bits) goes into an IPv6 outer header, so ECMP and LAG hashing along the
/// underlay keep a flow's packets together without looking inside the tunnel (RFC 6438).
#[inline(always)]
pub fn push(
    ctx: &XdpContext,
    pkt: &Packet,
    route: &Route,
    backend: &Backend,
    cfg: &LbConfig,
    flow_label: u32,
) -> Result<u32, Done> {
    let outer_v6 = backend.family == FAMILY_V6;
    let overhead = outer_len(backend);
    // SAFETY: the context pointer is the one the kernel passed in.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return Err(Reason::DropAdjustHead);
    }
    // Data pointers changed: every access below re-derives and re-checks them, one check for
    // both headers. Each header is composed as memory-order 16-bit words and written with
    // 16-bit stores ([`store_words`]): about half the instructions of byte-wise composing and
    // storing.
    let tos = pkt.tos;
    let proto = inner_proto(pkt);
    if outer_v6 {
        let Some((eth, outer)) = headers::<{ (ETH_LEN + IPV6_LEN) / 2 }, { IPV6_LEN / 2 }>(ctx)
        else {
            return Err(Reason::DropAdjustHead);
        };
        // RFC 2473 §6.5: the traffic class comes from the inner header (TOS for IPv4).
        let first = 0x6000_0000 | (tos as u32) << 20 | (flow_label & 0x000f_ffff);
        let h: [u16; 4] = [
            ((first >> 16) as u16).to_be(),
            (first as u16).to_be(),
            (pkt.ip_len as u16).to_be(),
            u16::from_ne_bytes([proto, OUTER_TTL]),
        ];
        // SAFETY: bounds checked by ptr_at; the frame starts 2-aligned (see store_words);
        // no other reference into the packet is live.
        unsafe {
            let outer = outer.cast::<u16>();
            store_words(outer.cast::<[u16; 4]>(), &h);
            // The addresses word by word, each stored as it is loaded: composed as one header
            // value, three of the eight words were spilled to the stack and loaded back
            // (five BPF instructions of an IPv6 hit; BENCHMARKS.md, "XDP hit: counted down
            // further (stop 38)").
            store_addr_halves(outer.add(4), &cfg.lb_addr6);
            store_addr_halves(outer.add(12), &backend.addr);
            store_words(
                eth,
                &eth_words(&route.macs.dmac, &route.macs.smac, ETH_P_IPV6_BE),
            );
        }
    } else {
        let Some((eth, outer)) = headers::<{ (ETH_LEN + IPV4_LEN) / 2 }, { IPV4_LEN / 2 }>(ctx)
        else {
            return Err(Reason::DropAdjustHead);
        };
        // RFC 2003 §3.1: TOS and DF from the inner header; the identification too, unique
        // per source as RFC 6864 asks should the outer header ever be fragmented. An IPv6
        // inner packet is never fragmented on its path (RFC 8200 §5), so DF is set and path
        // MTU discovery works through packet-too-big (RFC 4213 §3.2).
        let [s0, s1] = halves(cfg.lb_addr4);
        let [d0, d1] = halves(backend.addr[0]);
        let mut h: [u16; IPV4_LEN / 2] = [
            u16::from_ne_bytes([0x45, tos]),
            ((pkt.ip_len + IPV4_LEN) as u16).to_be(),
            u16::from_ne_bytes(pkt.ip_id),
            if pkt.dont_fragment { IP_DF_BE } else { 0 },
            u16::from_ne_bytes([OUTER_TTL, proto]),
            0,
            s0,
            s1,
            d0,
            d1,
        ];
        // Memory-order words, so the checksum is stored as computed (RFC 1071 §2(B)).
        h[5] = csum_fold(csum_words(0, &h));
        // SAFETY: as above.
        unsafe {
            store_words(outer, &h);
            store_words(
                eth,
                &eth_words(&route.macs.dmac, &route.macs.smac, ETH_P_IP_BE),
            );
        }
    }
    if route.ifindex == ctx.ingress_ifindex() as u32 {
        Ok(xdp_action::XDP_TX)
    } else {
        // SAFETY: plain helper call; returns XDP_REDIRECT or XDP_ABORTED.
        Ok(unsafe { bpf_redirect(route.ifindex, 0) } as u32)
    }
}
