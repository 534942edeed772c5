//! Parsing: Ethernet, then IPv4 or IPv6 (with a bounded walk over IPv6 extension headers),
//! then the TCP/UDP ports, into one [`Packet`] that the rest of the program handles the same
//! way whatever the family. ICMP destination-unreachable and ICMPv6 destination-unreachable /
//! packet-too-big messages are parsed too: their [`Packet::key`] is the flow of the packet they
//! quote, turned around (the quote is the backend's reply, from the VIP to the client).
//!
//! Everything that is not for the balancer comes back as the [`Reason`] it is passed with.

use core::mem::MaybeUninit;

use lb_common::{
    FAMILY_V4, FAMILY_V6, FlowKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Reason,
    VipKey,
};
use network_types::eth::EthHdr;

use aya_ebpf::programs::XdpContext;

use crate::pkt::{
    ETH_LEN, ETH_P_IP_BE, ETH_P_IPV6_BE, IP_DF_BE, IP_MF_OFFSET_MASK_BE, IPV4_LEN, IPV6_LEN,
    bytes_to_words, frame_len, opaque, pair, ptr_at, store_addr, store_addr4,
};

/// IPv6 extension headers (IANA "IPv6 Extension Header Types"; RFC 8200 §4).
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_ESP: u8 = 50;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_MOBILITY: u8 = 135;
const NEXTHDR_HIP: u8 = 139;
const NEXTHDR_SHIM6: u8 = 140;
const NEXTHDR_EXP1: u8 = 253;
const NEXTHDR_EXP2: u8 = 254;

/// Most extension headers skipped before the upper-layer header. RFC 8200 §4.1's order allows
/// hop-by-hop, destination options, routing, and destination options again before a
/// transport header: four. Also a constant trip count for the verifier.
const MAX_EXT_HEADERS: usize = 4;
/// Upper bound of the offset of the upper-layer header. A variable packet offset needs a
/// known bound before the verifier accepts an access at it; chains longer than this are
/// passed (`pass_ipv6_ext_header`).
pub const MAX_L4_OFF: usize = 1024;

/// ICMP type destination unreachable (RFC 792; code 4 is "fragmentation needed", RFC 1191).
const ICMP_DEST_UNREACH: u8 = 3;
/// ICMPv6 types destination unreachable and packet too big (RFC 4443 §3.1, §3.2).
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
/// ICMP and ICMPv6 headers are both 8 bytes before the quoted packet.
const ICMP_HDR_LEN: usize = 8;

/// A packet for the balancer, whatever its family.
pub struct Packet {
    /// The flow: client → VIP (for an ICMP error, the flow its quote belongs to).
    pub key: FlowKey,
    /// The key of `key`'s VIP (its destination address, port, protocol and family), stored
    /// by the parser with `key`: built from `key` by `lookup::vip`, the copy cost every hit
    /// about ten instructions. `lookup::vip` changes it (port 0, the address marker) when the
    /// exact lookup misses.
    pub vip_key: VipKey,
    /// Length of the IP packet: IPv4 total length, or 40 + IPv6 payload length. Excludes
    /// Ethernet padding behind it.
    pub ip_len: usize,
    /// IPv4 TOS or IPv6 traffic class.
    pub tos: u8,
    /// An IPv4 or IPv6 fragment (its ports, if any, are zero in `key`).
    pub fragment: bool,
    /// IPv4: DF set. IPv6: always (routers never fragment IPv6).
    pub dont_fragment: bool,
    /// IPv4 header with options (longer than 20 bytes).
    pub ip_options: bool,
    /// The IPv4 identification field (zero for IPv6).
    pub ip_id: [u8; 2],
    /// An ICMP error quoting a VIP flow's packet, to forward to that flow's backend.
    pub icmp_error: bool,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// Offset of the TCP/UDP header in the frame (NAT rewrites its ports and checksum); at
    /// most [`MAX_L4_OFF`]. Meaningless for fragments and ICMP errors.
    pub l4_off: usize,
    /// The TCP header's flags byte (RFC 9293 §3.1), as received; 0 for UDP, fragments and
    /// ICMP errors. See [`Packet::opens`].
    pub tcp_flags: u8,
}

// `pkt::store_addr4` stores an IPv4 address's last two (zero) words as one 64-bit word: the
// three addresses it writes must have them 8-aligned (the verifier rejects a misaligned
// stack access). `Packet` is not `repr(C)`: these hold for the layout the compiler chose.
const _: () = {
    use core::mem::{align_of, offset_of};
    // An address at `at` has its last two words at `at + 8`.
    const fn ok(at: usize) -> bool {
        (at + 8).is_multiple_of(8)
    }
    assert!(align_of::<Packet>().is_multiple_of(8));
    assert!(ok(offset_of!(Packet, key) + offset_of!(FlowKey, src_addr)));
    assert!(ok(offset_of!(Packet, key) + offset_of!(FlowKey, dst_addr)));
    assert!(ok(offset_of!(Packet, vip_key) + offset_of!(VipKey, addr)));
};

/// Parses the frame into `out`; `Err` is the reason to pass it with.
///
/// Written in place, not returned by value: every path stores its fields straight into the
/// caller's slot, where the flow key must be anyway (the map lookups read it from the stack).
/// A returned `Packet` was assembled from the six return paths' registers and stored there
/// afterwards, about 40 instructions of every hit (BENCHMARKS.md, "XDP hit (stop 23)").
#[inline(always)]
pub fn packet<'a>(
    ctx: &XdpContext,
    out: &'a mut MaybeUninit<Packet>,
) -> Result<&'a mut Packet, Reason> {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Err(Reason::PassMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == ETH_P_IP_BE {
        ipv4(ctx, out)
    } else if ether_type == ETH_P_IPV6_BE {
        ipv6(ctx, out)
    } else {
        Err(Reason::PassNotIp)
    }
}

/// TCP flags (RFC 9293 §3.1).
const TCP_FIN_SYN_RST_ACK: u8 = 0x17;
const TCP_SYN: u8 = 0x02;

impl Packet {
    /// A TCP segment opening a connection: SYN set, ACK, RST and FIN clear. Such a packet is
    /// steered by the ring first and looked up in the flow table only when its key is
    /// already there (`lookup::backend`).
    #[inline(always)]
    pub fn opens(&self) -> bool {
        self.tcp_flags & TCP_FIN_SYN_RST_ACK == TCP_SYN
    }
}

/// Source and destination ports at `off`, after checking that an L4 header of `proto` fits
/// both the frame and `end` (the end of the IP packet, as an offset into the frame), and the
/// TCP flags byte (0 for UDP). One bounds check of the whole minimal header per protocol (not one for the ports and one for the
/// header's last byte).
#[inline(always)]
fn ports(ctx: &XdpContext, off: usize, proto: u8, end: usize) -> Result<(u16, u16, u8), Reason> {
    if proto == IPPROTO_TCP {
        if off + 20 > end {
            return Err(Reason::PassMalformed);
        }
        let Some(p) = ptr_at::<[u16; 10]>(ctx, off) else {
            return Err(Reason::PassMalformed);
        };
        // SAFETY: bounds checked by ptr_at; the same 20 bytes as bytes.
        let (p, b) = unsafe { (&*p, &*p.cast::<[u8; 20]>()) };
        return Ok((p[0], p[1], b[13]));
    }
    if off + 8 > end {
        return Err(Reason::PassMalformed);
    }
    let Some(p) = ptr_at::<[u16; 4]>(ctx, off) else {
        return Err(Reason::PassMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let p = unsafe { &*p };
    Ok((p[0], p[1], 0))
}

#[inline(always)]
fn ipv4<'a>(ctx: &XdpContext, out: &'a mut MaybeUninit<Packet>) -> Result<&'a mut Packet, Reason> {
    let Some(ip) = ptr_at::<[u8; IPV4_LEN]>(ctx, ETH_LEN) else {
        return Err(Reason::PassMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let (ip, w) = unsafe { (&*ip, &*ip.cast::<[u16; IPV4_LEN / 2]>()) };
    // `w`: the same header as 16-bit words (the frame starts 2-aligned, see
    // `pkt::store_words`); the multi-byte fields are read from it, two loads per address
    // instead of four byte loads and their shifts.
    let addr = |i: usize| pair(w[i], w[i + 1]);
    let vihl = ip[0];
    // `ihl` is at most 60 (4-bit field times 4): offsets derived from it stay bounded.
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < IPV4_LEN {
        return Err(Reason::PassMalformed);
    }
    let proto = ip[9];
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP {
        return Err(Reason::PassNotTcpUdp);
    }
    let tot_len = u16::from_be(w[1]) as usize;
    if tot_len < ihl || ETH_LEN + tot_len > frame_len(ctx) {
        return Err(Reason::PassMalformed);
    }
    let frags = w[3];
    // A non-first fragment has no ports; it cannot be matched to its VIP port, so it is
    // looked up by its address only and dropped if it belongs to a VIP.
    let fragment = frags & IP_MF_OFFSET_MASK_BE != 0;
    let end = opaque(ETH_LEN + tot_len);
    let l4 = ETH_LEN + (ihl & 0x3c);
    // Every field is stored as soon as it is known, the key's words with volatile stores (as
    // in `ipv6`): a whole `Packet` value was composed in registers and spilled before any of
    // it was stored, ~40 instructions of every IPv4 hit (BENCHMARKS.md, "XDP hit: the path
    // below Katran's again (stop 37)"), and plain zero words become a call to `memset` (see
    // `pkt::zero`).
    let slot = out.as_mut_ptr();
    // SAFETY: `slot` is valid for writes; raw places, no reference to uninitialised memory.
    unsafe {
        store_addr4(&raw mut (*slot).key.src_addr, addr(6));
        store_addr4(&raw mut (*slot).key.dst_addr, addr(8));
        store_addr4(&raw mut (*slot).vip_key.addr, addr(8));
        (&raw mut (*slot).key.proto).write(proto);
        (&raw mut (*slot).key.family).write(FAMILY_V4);
        (&raw mut (*slot).vip_key.proto).write(proto);
        (&raw mut (*slot).vip_key.family).write(FAMILY_V4);
        (&raw mut (*slot).key._pad).write([0; 2]);
        (&raw mut (*slot).ip_len).write(tot_len);
        (&raw mut (*slot).tos).write(ip[1]);
        (&raw mut (*slot).fragment).write(fragment);
        (&raw mut (*slot).dont_fragment).write(frags & IP_DF_BE != 0);
        (&raw mut (*slot).ip_options).write(ihl != IPV4_LEN);
        (&raw mut (*slot).ip_id).write(w[2].to_ne_bytes());
        (&raw mut (*slot).icmp_error).write(false);
        (&raw mut (*slot).ttl).write(ip[8]);
        (&raw mut (*slot).l4_off).write(l4);
    }
    let (s, d, flags) = if proto == IPPROTO_ICMP {
        if fragment {
            return Err(Reason::PassNotTcpUdp);
        }
        // The quote's ports are stored by `icmp4_error`.
        (0, 0, 0)
    } else if fragment {
        (0, 0, 0)
    } else {
        ports(ctx, l4, proto, end)?
    };
    // SAFETY: as above.
    let p = unsafe {
        (&raw mut (*slot).key.src_port).write(s);
        (&raw mut (*slot).key.dst_port).write(d);
        (&raw mut (*slot).vip_key.port).write(d);
        (&raw mut (*slot).tcp_flags).write(flags);
        // Every field written above.
        out.assume_init_mut()
    };
    if proto == IPPROTO_ICMP {
        return icmp4_error(ctx, l4, end, p);
    }
    Ok(p)
}

/// An ICMP destination unreachable (any code; "fragmentation needed" is the one path-MTU
/// discovery needs) whose quote (RFC 792: the IP header and at least 8 bytes after it) is a
/// TCP or UDP packet: the key is the quoted flow turned around. Anything else is host ICMP.
#[inline(always)]
fn icmp4_error<'a>(
    ctx: &XdpContext,
    l4: usize,
    end: usize,
    p: &'a mut Packet,
) -> Result<&'a mut Packet, Reason> {
    let Some(icmp) = ptr_at::<[u8; ICMP_HDR_LEN]>(ctx, l4) else {
        return Err(Reason::PassMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*icmp)[0] } != ICMP_DEST_UNREACH {
        return Err(Reason::PassNotTcpUdp);
    }
    let q = l4 + ICMP_HDR_LEN;
    if q + IPV4_LEN > end {
        return Err(Reason::PassNotTcpUdp);
    }
    let Some(inner) = ptr_at::<[u8; IPV4_LEN]>(ctx, q) else {
        return Err(Reason::PassNotTcpUdp);
    };
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { &*inner };
    let inner_ihl = ((inner[0] & 0x0f) as usize) * 4;
    let inner_proto = inner[9];
    if inner[0] >> 4 != 4
        || inner_ihl < IPV4_LEN
        || (inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP)
    {
        return Err(Reason::PassNotTcpUdp);
    }
    // The quote carries the 8 bytes after the inner header: its ports come first.
    let at = q + (inner_ihl & 0x3c);
    if at + 4 > end {
        return Err(Reason::PassNotTcpUdp);
    }
    let Some(ports) = ptr_at::<[u16; 2]>(ctx, at) else {
        return Err(Reason::PassNotTcpUdp);
    };
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { &*ports };
    p.key.src_addr = [
        u32::from_ne_bytes([inner[16], inner[17], inner[18], inner[19]]),
        0,
        0,
        0,
    ];
    p.key.dst_addr = [
        u32::from_ne_bytes([inner[12], inner[13], inner[14], inner[15]]),
        0,
        0,
        0,
    ];
    p.key.src_port = ports[1];
    p.key.dst_port = ports[0];
    p.key.proto = inner_proto;
    p.vip_key.addr = p.key.dst_addr;
    p.vip_key.port = p.key.dst_port;
    p.vip_key.proto = inner_proto;
    p.icmp_error = true;
    Ok(p)
}

/// Whether `n` is an IPv6 extension header (IANA registry; ESP counts: what follows it is
/// encrypted).
#[inline(always)]
fn is_extension_header(n: u8) -> bool {
    matches!(
        n,
        NEXTHDR_HOP
            | NEXTHDR_ROUTING
            | NEXTHDR_FRAGMENT
            | NEXTHDR_ESP
            | NEXTHDR_AUTH
            | NEXTHDR_DEST
            | NEXTHDR_MOBILITY
            | NEXTHDR_HIP
            | NEXTHDR_SHIM6
            | NEXTHDR_EXP1
            | NEXTHDR_EXP2
    )
}

#[inline(always)]
fn ipv6<'a>(ctx: &XdpContext, out: &'a mut MaybeUninit<Packet>) -> Result<&'a mut Packet, Reason> {
    let Some(ip) = ptr_at::<[u8; IPV6_LEN]>(ctx, ETH_LEN) else {
        return Err(Reason::PassMalformed);
    };
    // SAFETY: bounds checked by ptr_at. `w`: the same header as 16-bit words, as in `ipv4`.
    let (ip, w) = unsafe { (&*ip, &*ip.cast::<[u16; IPV6_LEN / 2]>()) };
    if ip[0] >> 4 != 6 {
        return Err(Reason::PassMalformed);
    }
    let ip_len = IPV6_LEN + u16::from_be(w[2]) as usize;
    if ETH_LEN + ip_len > frame_len(ctx) {
        return Err(Reason::PassMalformed);
    }
    let end = opaque(ETH_LEN + ip_len);
    // The addresses are stored word by word as they are composed, the rest as one value (a
    // whole `Packet` value kept the eight words in registers, spilled, until all were known).
    let slot = out.as_mut_ptr();
    // SAFETY: `slot` is valid for writes; raw places, no reference to uninitialised memory.
    unsafe {
        store_addr([&raw mut (*slot).key.src_addr], w, 4);
        store_addr(
            [&raw mut (*slot).key.dst_addr, &raw mut (*slot).vip_key.addr],
            w,
            12,
        );
        (&raw mut (*slot).key.family).write(FAMILY_V6);
        (&raw mut (*slot).vip_key.family).write(FAMILY_V6);
        (&raw mut (*slot).key._pad).write([0; 2]);
        (&raw mut (*slot).ip_len).write(ip_len);
        (&raw mut (*slot).tos).write((ip[0] << 4) | (ip[1] >> 4));
        (&raw mut (*slot).fragment).write(false);
        (&raw mut (*slot).dont_fragment).write(true);
        (&raw mut (*slot).ip_options).write(false);
        (&raw mut (*slot).ip_id).write([0; 2]);
        (&raw mut (*slot).icmp_error).write(false);
        (&raw mut (*slot).ttl).write(ip[7]);
    }
    // The ports, protocol, L4 offset and flags are stored once, on each way out below (they
    // are known only there).
    let rest = |proto: u8, s: u16, d: u16, l4_off: usize, flags: u8| {
        // SAFETY: as above; after it, every field of `slot` is written.
        unsafe {
            (&raw mut (*slot).key.src_port).write(s);
            (&raw mut (*slot).key.dst_port).write(d);
            (&raw mut (*slot).key.proto).write(proto);
            (&raw mut (*slot).vip_key.port).write(d);
            (&raw mut (*slot).vip_key.proto).write(proto);
            (&raw mut (*slot).l4_off).write(l4_off);
            (&raw mut (*slot).tcp_flags).write(flags);
        }
    };

    // Bounded walk over the extension headers (RFC 8200 §4): hop-by-hop and destination
    // options are skipped; a routing header only when no segments are left (§4.4: the packet
    // has reached its final destination, this address); a fragment header ends the walk.
    let mut next = ip[6];
    let mut off = ETH_LEN + IPV6_LEN;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        i += 1;
        if next == IPPROTO_TCP || next == IPPROTO_UDP || next == IPPROTO_ICMPV6 {
            break;
        }
        if !is_extension_header(next) {
            return Err(Reason::PassNotTcpUdp);
        }
        if next != NEXTHDR_HOP
            && next != NEXTHDR_DEST
            && next != NEXTHDR_ROUTING
            && next != NEXTHDR_FRAGMENT
        {
            return Err(Reason::PassIpv6ExtHeader);
        }
        if off + 8 > end {
            return Err(Reason::PassMalformed);
        }
        let Some(h) = ptr_at::<[u8; 8]>(ctx, off) else {
            return Err(Reason::PassMalformed);
        };
        // SAFETY: bounds checked by ptr_at.
        let h = unsafe { &*h };
        if next == NEXTHDR_FRAGMENT {
            // RFC 8200 §4.5: every fragment's header names the first header of the
            // fragmentable part; only TCP or UDP can belong to a VIP.
            next = h[0];
            if next != IPPROTO_TCP && next != IPPROTO_UDP {
                return Err(if is_extension_header(next) {
                    Reason::PassIpv6ExtHeader
                } else {
                    Reason::PassNotTcpUdp
                });
            }
            rest(next, 0, 0, 0, 0);
            // SAFETY: every field written above and by `rest`.
            let p = unsafe { out.assume_init_mut() };
            p.fragment = true;
            return Ok(p);
        }
        if next == NEXTHDR_ROUTING && h[3] != 0 {
            return Err(Reason::PassIpv6ExtHeader);
        }
        next = h[0];
        off += (h[1] as usize + 1) * 8;
        if off > MAX_L4_OFF {
            return Err(Reason::PassIpv6ExtHeader);
        }
    }
    if next == IPPROTO_ICMPV6 {
        // The quote's ports and protocol are stored by `icmp6_error`.
        rest(0, 0, 0, 0, 0);
        // SAFETY: every field written above and by `rest`.
        return icmp6_error(ctx, off, end, unsafe { out.assume_init_mut() });
    }
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return Err(if is_extension_header(next) {
            Reason::PassIpv6ExtHeader
        } else {
            Reason::PassNotTcpUdp
        });
    }
    let (s, d, flags) = ports(ctx, off, next, end)?;
    rest(next, s, d, off, flags);
    // SAFETY: every field written above and by `rest`.
    Ok(unsafe { out.assume_init_mut() })
}

/// An ICMPv6 destination unreachable or packet too big whose quote (RFC 4443 §3: as much of
/// the invoking packet as fits) is an IPv6 TCP or UDP packet without extension headers: the
/// key is the quoted flow turned around. Anything else is host ICMPv6 (neighbour discovery,
/// echo, …).
#[inline(always)]
fn icmp6_error<'a>(
    ctx: &XdpContext,
    l4: usize,
    end: usize,
    p: &'a mut Packet,
) -> Result<&'a mut Packet, Reason> {
    if l4 > MAX_L4_OFF {
        return Err(Reason::PassIpv6ExtHeader);
    }
    let Some(icmp) = ptr_at::<[u8; ICMP_HDR_LEN]>(ctx, l4) else {
        return Err(Reason::PassMalformed);
    };
    // SAFETY: bounds checked by ptr_at.
    let t = unsafe { (*icmp)[0] };
    if t != ICMPV6_DEST_UNREACH && t != ICMPV6_PKT_TOOBIG {
        return Err(Reason::PassNotTcpUdp);
    }
    let q = l4 + ICMP_HDR_LEN;
    if q + IPV6_LEN + 4 > end {
        return Err(Reason::PassNotTcpUdp);
    }
    let Some(inner) = ptr_at::<[u8; IPV6_LEN]>(ctx, q) else {
        return Err(Reason::PassNotTcpUdp);
    };
    // SAFETY: bounds checked by ptr_at.
    let inner = unsafe { &*inner };
    let inner_proto = inner[6];
    if inner[0] >> 4 != 6 || (inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP) {
        return Err(Reason::PassNotTcpUdp);
    }
    let Some(ports) = ptr_at::<[u16; 2]>(ctx, q + IPV6_LEN) else {
        return Err(Reason::PassNotTcpUdp);
    };
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { &*ports };
    p.key.src_addr = bytes_to_words(inner, 24);
    p.key.dst_addr = bytes_to_words(inner, 8);
    p.key.src_port = ports[1];
    p.key.dst_port = ports[0];
    p.key.proto = inner_proto;
    p.vip_key.addr = p.key.dst_addr;
    p.vip_key.port = p.key.dst_port;
    p.vip_key.proto = inner_proto;
    p.icmp_error = true;
    Ok(p)
}
