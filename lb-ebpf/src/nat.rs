//! NAT mode: a VIP's packets are rewritten to their target's address and port instead of
//! being encapsulated, and the targets' replies (the balancer is their gateway) are rewritten
//! back to the VIP's address and port on their way to the client.
//!
//! - Steering is DSR's: the same flow table (keyed by the client's 5-tuple) and Maglev ring.
//! - A new flow also writes its reverse entry ([`LB_NAT_REVERSE`]), keyed by the reply's
//!   5-tuple (target → client). A reply is translated only while the flow's own entry exists,
//!   names the same backend and is within its idle timeout; the reply keeps the flow alive, as
//!   client packets do. Replies of unknown (or expired, or re-steered) flows pass untouched.
//! - The client's address is kept (no source NAT): the target sees who connected.
//! - Checksums are updated incrementally (RFC 1624 eqn. 3): the IPv4 header checksum for the
//!   address and TTL, the TCP/UDP checksum for the address (it is in the pseudo-header, RFC 793
//!   §3.1, RFC 768, RFC 8200 §8.1) and the port. A UDP checksum of zero means none was sent
//!   (RFC 768) and stays zero; an update that comes out as zero is sent as 0xffff.
//! - The balancer is a router hop: TTL / hop limit go down by one (RFC 1812 §5.3.1, RFC 8200
//!   §3), which also ends any routing loop; a packet that would expire is left to the kernel,
//!   which answers with ICMP time exceeded.
//! - The next hop comes from `bpf_fib_lookup`, as for DSR. When it names a neighbour whose MAC
//!   is not resolved (the client's router before the balancer ever sent to it), the packet is
//!   translated and passed to the kernel, which forwards it and resolves the neighbour.
//!   Towards a target the answer is cached per backend ([`to_target`], [`crate::nexthop`]);
//!   a reply's next hop (towards the client) is looked up on every reply: a cache per client
//!   would have to live in the reverse entry, written from several CPUs at once.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{
    Backend, CONFIG_F_NAT, FAMILY_V6, FlowKey, IPPROTO_TCP, LbConfig, NatReverse, NextHopCounter,
    Reason,
};

use crate::{
    encap::{FibBlock, Macs, Route, too_big},
    lookup::{Done, Out, Steer, action_of},
    maps::{LB_CONFIG, LB_FLOWS, LB_NAT_REVERSE, add_reply},
    nexthop::{self, Lookup},
    parse::{MAX_L4_OFF, Packet},
    pkt::{
        AF_INET, AF_INET6, ETH_LEN, IPV4_LEN, IPV6_LEN, csum_diff, csum_replace, load_addr, ptr_at,
        store_words, words_to_bytes,
    },
};

const PASS: u32 = xdp_action::XDP_PASS;
const DROP: u32 = xdp_action::XDP_DROP;

/// Where a translated packet goes.
pub enum Next<'a> {
    /// Out through XDP to this next hop.
    Hop(Route<'a>),
    /// To the kernel's forwarding path (the next hop's MAC is not resolved yet).
    Kernel,
}

/// Which end of the packet is rewritten.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The destination: a client's packet, to the target.
    Dst,
    /// The source: a target's reply, from the VIP.
    Src,
}

/// The next hop of the packet once its destination is `dst` (and its source `src`), looked up
/// before the packet is touched so a drop leaves it unmodified. A packet too big for the
/// egress MTU is answered with ICMP "too big" where that helps (as for DSR, with no overhead).
/// The answer lives in `block`.
#[inline(always)]
pub fn next_hop<'a>(
    ctx: &XdpContext,
    pkt: &Packet,
    src: &[u32; 4],
    dst: &[u32; 4],
    sport: u16,
    dport: u16,
    block: &'a mut FibBlock,
) -> Result<Next<'a>, Done> {
    let fib = block.zeroed_params();
    if pkt.key.family == FAMILY_V6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = load_addr(src);
        fib.__bindgen_anon_4.ipv6_dst = load_addr(dst);
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = src[0];
        fib.__bindgen_anon_4.ipv4_dst = dst[0];
    }
    fib.l4_protocol = pkt.key.proto;
    fib.sport = sport;
    fib.dport = dport;
    fib.__bindgen_anon_1.tot_len = pkt.ip_len as u16;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: `fib` is a valid, fully initialised parameter block of the size passed.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), fib, size_of::<FibParams>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Ok(Next::Hop(Route {
            ifindex: fib.ifindex,
            macs: Macs::of_fib(fib),
        }));
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Ok(Next::Kernel);
    }
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // SAFETY: on FRAG_NEEDED the helper stores the egress MTU in this union member.
        let mtu = unsafe { fib.__bindgen_anon_1.mtu_result } as usize;
        return Err(too_big(ctx, pkt, mtu));
    }
    Err(Reason::DropNoRoute)
}

/// The next hop towards the target (the backend `steer` names) of a client's packet: from the
/// next-hop cache when it holds a valid entry, else [`next_hop`], whose success is cached. The
/// cache is per backend, not per client: with policy routing by source address, or several
/// equal-cost next hops towards one target, every flow to the target takes the next hop the first
/// lookup found. An unresolved neighbour (`Next::Kernel`) is never cached.
#[inline(always)]
pub fn to_target<'a>(
    ctx: &XdpContext,
    pkt: &Packet,
    steer: &Steer,
    port: u16,
    cfg: &LbConfig,
    now: u64,
    block: &'a mut FibBlock,
) -> Result<Next<'a>, Done> {
    let backend = steer.backend;
    let len = pkt.ip_len;
    let generation = match nexthop::get(steer, ctx, len, cfg, now) {
        Lookup::Hit(route) => return Ok(Next::Hop(route)),
        Lookup::Miss(g) => g,
    };
    let ingress = ctx.ingress_ifindex() as u32;
    nexthop::count(NextHopCounter::Lookups);
    let next = next_hop(
        ctx,
        pkt,
        &pkt.key.src_addr,
        &backend.addr,
        pkt.key.src_port,
        port,
        block,
    )?;
    if let (Next::Hop(route), Some(g)) = (&next, generation)
        && len <= u16::MAX as usize
    {
        nexthop::put(steer.id, backend, ingress, len, now, g, route);
    }
    Ok(next)
}

/// The port the target listens on: its registered port, or for a target of a port-0 VIP
/// (registered without one) the port the client used. Network order.
#[inline(always)]
pub fn target_port(backend: &Backend, key: &FlowKey) -> u16 {
    if backend.port == 0 {
        key.dst_port
    } else {
        backend.port
    }
}

/// The reverse-map key of a flow to `backend`: the reply's 5-tuple as it will arrive.
#[inline(always)]
pub fn reverse_key(key: &FlowKey, backend: &Backend, port: u16) -> FlowKey {
    FlowKey {
        src_addr: load_addr(&backend.addr),
        dst_addr: key.src_addr,
        src_port: port,
        dst_port: key.src_port,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    }
}

/// Makes sure the flow's reverse entry exists: written for a new flow; for an established one
/// looked up (which also keeps it recently used in the LRU, in step with the flow's own entry)
/// and written again if the LRU evicted it, once a clock tick (`ticked`: the packet that moved
/// the flow's `last_seen_ns` on), not on every packet: most NAT hits save a hash lookup of a
/// 40-byte key. Replies keep the entry recently used too (they look it up). A reverse entry
/// the LRU evicted (a full table) comes back with the client's first packet of a later tick
/// (1–10 ms) instead of with its next packet; replies in between pass untranslated, as they
/// did before the client's packet.
#[inline(always)]
pub fn remember(
    key: &FlowKey,
    backend: &Backend,
    backend_id: u32,
    port: u16,
    idle_timeout_ns: u64,
    new_flow: bool,
    ticked: bool,
) {
    if !new_flow && !ticked {
        return;
    }
    let rkey = reverse_key(key, backend, port);
    if !new_flow && LB_NAT_REVERSE.get_ptr(rkey).is_some() {
        return;
    }
    let value = NatReverse {
        vip_addr: key.dst_addr,
        vip_port: key.dst_port,
        _pad: [0; 2],
        backend_id,
        idle_timeout_ns,
    };
    // A full LRU map evicts its least recently used entry; insert cannot fail for space.
    let _ = LB_NAT_REVERSE.insert(rkey, value, 0);
}

/// Rewrites one end of the packet to `addr`:`port` (both in header order), with the TTL /
/// hop limit lowered when `hop` (not when the kernel forwards it: it lowers it itself), and
/// every checksum updated. False if the headers are not where the parser found them (which
/// the verifier needs to be told again after the helper calls).
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    side: Side,
    addr: &[u32; 4],
    port: u16,
    hop: bool,
) -> bool {
    // Verifier constraint: a variable packet offset needs a known bound before the access.
    let l4 = pkt.l4_off;
    if l4 > MAX_L4_OFF {
        return false;
    }
    let tcp = pkt.key.proto == IPPROTO_TCP;
    // The L4 checksum's offset in its header: TCP 16 (RFC 793), UDP 6 (RFC 768).
    let Some(ports) = ptr_at::<[u8; 4]>(ctx, l4) else {
        return false;
    };
    let check_at = if tcp { l4 + 16 } else { l4 + 6 };
    let Some(check) = ptr_at::<[u8; 2]>(ctx, check_at) else {
        return false;
    };
    let port_at = if side == Side::Src { 0 } else { 2 };
    let new_port = port.to_ne_bytes();
    let mut l4_diff;
    if pkt.key.family == FAMILY_V6 {
        let Some(ip) = ptr_at::<[u8; IPV6_LEN]>(ctx, ETH_LEN) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at; the only reference to these bytes.
        let ip = unsafe { &mut *ip };
        let at = if side == Side::Src { 8 } else { 24 };
        let new = words_to_bytes(addr);
        let mut old = [0u8; 16];
        old.copy_from_slice(&ip[at..at + 16]);
        l4_diff = csum_diff(0, &old, &new);
        ip[at..at + 16].copy_from_slice(&new);
        if hop {
            ip[7] -= 1;
        }
    } else {
        let Some(ip) = ptr_at::<[u8; IPV4_LEN]>(ctx, ETH_LEN) else {
            return false;
        };
        // SAFETY: as above.
        let ip = unsafe { &mut *ip };
        let at = if side == Side::Src { 12 } else { 16 };
        let new = addr[0].to_ne_bytes();
        let old = [ip[at], ip[at + 1], ip[at + 2], ip[at + 3]];
        l4_diff = csum_diff(0, &old, &new);
        let mut ip_diff = l4_diff;
        ip[at..at + 4].copy_from_slice(&new);
        if hop {
            // TTL shares its 16-bit word with the protocol (RFC 791).
            let old_word = [ip[8], ip[9]];
            ip[8] -= 1;
            ip_diff = csum_diff(ip_diff, &old_word, &[ip[8], ip[9]]);
        }
        let c = csum_replace(u16::from_be_bytes([ip[10], ip[11]]), ip_diff);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
    // SAFETY: bounds checked by ptr_at; distinct bytes from the IP header's.
    let (ports, check) = unsafe { (&mut *ports, &mut *check) };
    let old_port = [ports[port_at], ports[port_at + 1]];
    l4_diff = csum_diff(l4_diff, &old_port, &new_port);
    ports[port_at] = new_port[0];
    ports[port_at + 1] = new_port[1];
    let old_check = u16::from_be_bytes(*check);
    if !tcp && old_check == 0 {
        // RFC 768: no checksum was sent; none is made up (RFC 6936 for IPv6 receivers).
        return true;
    }
    let mut c = csum_replace(old_check, l4_diff);
    if !tcp && c == 0 {
        // RFC 768: a computed zero is sent as all ones.
        c = 0xffff;
    }
    *check = c.to_be_bytes();
    true
}

/// Addresses the frame to `next` and returns the action and reason: `XDP_TX` (`tx`) or a
/// redirect (`redirect`) to a hop, or for a reply `nat_reply` either way; `XDP_PASS` for the
/// kernel (`nat_via_kernel`).
#[inline(always)]
fn send(ctx: &XdpContext, next: &Next, is_reply: bool) -> Out {
    let route = match next {
        Next::Kernel => return (PASS, Reason::NatViaKernel),
        Next::Hop(r) => r,
    };
    let Some(eth) = ptr_at::<[u16; 6]>(ctx, 0) else {
        return (DROP, Reason::DropInternal);
    };
    let (d, s) = (&route.macs.dmac, &route.macs.smac);
    // SAFETY: bounds checked by ptr_at; the frame starts 2-aligned (see store_words); no other
    // reference into the packet is live.
    unsafe { store_words(eth, &[d[0], d[1], d[2], s[0], s[1], s[2]]) };
    let (action, reason) = if route.ifindex == ctx.ingress_ifindex() as u32 {
        (xdp_action::XDP_TX, Reason::Tx)
    } else {
        // SAFETY: plain helper call; returns XDP_REDIRECT or XDP_ABORTED.
        (
            unsafe { bpf_redirect(route.ifindex, 0) } as u32,
            Reason::Redirect,
        )
    };
    (action, if is_reply { Reason::NatReply } else { reason })
}

/// Rewrites a client's packet to the target (`addr`:`port`) and sends it to `next`.
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, addr: &[u32; 4], port: u16, next: &Next) -> Out {
    if !rewrite(
        ctx,
        pkt,
        Side::Dst,
        addr,
        port,
        matches!(next, Next::Hop(_)),
    ) {
        return (DROP, Reason::DropInternal);
    }
    send(ctx, next, false)
}

/// A packet that is for no VIP: if it is a NAT target's reply of a live flow, translate it
/// back and send it to the client; otherwise pass it untouched (`pass_not_vip`).
#[inline(always)]
pub fn reply(ctx: &XdpContext, pkt: &Packet) -> (u32, Reason) {
    const NOT_MINE: Out = (PASS, Reason::PassNotVip);
    let cfg = match LB_CONFIG.get(0) {
        Some(cfg) if cfg.flags & CONFIG_F_NAT != 0 => cfg,
        _ => return NOT_MINE,
    };
    // SAFETY: copied out at once.
    let Some(rev) = (unsafe { LB_NAT_REVERSE.get(pkt.key) }).copied() else {
        return NOT_MINE;
    };
    let fkey = FlowKey {
        src_addr: pkt.key.dst_addr,
        dst_addr: rev.vip_addr,
        src_port: pkt.key.dst_port,
        dst_port: rev.vip_port,
        proto: pkt.key.proto,
        family: pkt.key.family,
        _pad: [0; 2],
    };
    let Some(flow) = LB_FLOWS.get_ptr_mut(fkey) else {
        return NOT_MINE;
    };
    // SAFETY: pointer into the map value, valid for this program run.
    let (backend_id, last) = unsafe { ((*flow).backend_id, (*flow).last_seen_ns) };
    // Read only here: host traffic (most packets that reach this function) pays no clock read.
    let now = crate::lookup::coarse_now(cfg);
    let t = rev.idle_timeout_ns;
    let fresh = t == 0 || now <= last || now - last <= t;
    if backend_id != rev.backend_id || !fresh {
        // Re-steered or expired: the reply belongs to no live flow.
        return NOT_MINE;
    }
    if pkt.ttl <= 1 {
        return (PASS, Reason::PassTtlExceeded);
    }
    let mut block = FibBlock::uninit();
    let next = match next_hop(
        ctx,
        pkt,
        &rev.vip_addr,
        &pkt.key.dst_addr,
        rev.vip_port,
        pkt.key.dst_port,
        &mut block,
    ) {
        Ok(n) => n,
        Err(done) => return (action_of(done), done),
    };
    if now > last {
        // SAFETY: as above.
        unsafe { (*flow).last_seen_ns = now };
    }
    let hop = matches!(next, Next::Hop(_));
    if !rewrite(ctx, pkt, Side::Src, &rev.vip_addr, rev.vip_port, hop) {
        return (DROP, Reason::DropInternal);
    }
    let bytes = pkt.ip_len as u64;
    add_reply(backend_id, bytes, !hop);
    send(ctx, &next, true)
}
