//! ICMP the balancer sends itself: "fragmentation needed" (IPv4) and "packet too big"
//! (ICMPv6) for packets that no longer fit once encapsulated, from the VIP to the client, out
//! of the receiving interface. The VIP as source lets the client's connection tracking relate
//! the error to its connection. (ICMP errors *about* VIP flows are parsed in [`crate::parse`]
//! and forwarded to the flow's backend like any VIP packet.)
//!
//! Both are built in place, as Katran does: the frame is cut to the Ethernet header plus the
//! quote, then grown at the front by the new IP and ICMP headers, which puts the quote exactly
//! where the message carries it. Nothing large is copied to the stack (512 bytes in all for
//! the whole program, a verifier limit).

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, Reason};

use crate::{
    lookup::Done,
    pkt::{ETH_LEN, IPV4_LEN, IPV6_LEN, OUTER_TTL, csum_add, csum_fold, frame_len, ptr_at},
};

/// The end of a packet whose ICMP "too big" answer cannot be built: dropped as too big.
const CANNOT_ANSWER: Done = Reason::DropMtu;
const ICMP_LEN: usize = 8;

/// Cuts the frame to its first `keep` bytes, then grows it by `grow` bytes at the front.
#[inline(always)]
fn reshape(ctx: &XdpContext, keep: usize, grow: usize) -> bool {
    let old = frame_len(ctx);
    // SAFETY: the context pointer is the one the kernel passed in; the tail only shrinks.
    old >= keep
        && unsafe { bpf_xdp_adjust_tail(ctx.ctx, keep as i32 - old as i32) } == 0
        && unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } == 0
}

/// Turns the packet into ICMP "fragmentation needed" (type 3, code 4; RFC 792, RFC 1191) with
/// `mtu` as the next-hop MTU, quoting the offending IP header and the first 8 bytes of its
/// payload (RFC 792). Only for option-less IPv4 headers (checked by the caller).
#[inline(always)]
pub fn too_big_v4(ctx: &XdpContext, mtu: u16) -> Done {
    const QUOTE: usize = IPV4_LEN + 8;
    const HDRS: usize = IPV4_LEN + ICMP_LEN;
    const FRAME: usize = ETH_LEN + HDRS + QUOTE;

    if !reshape(ctx, ETH_LEN + QUOTE, HDRS) {
        return CANNOT_ANSWER;
    }
    let Some(f) = ptr_at::<[u8; FRAME]>(ctx, 0) else {
        return CANNOT_ANSWER;
    };
    // SAFETY: bounds checked by ptr_at; the only reference into the packet.
    let f = unsafe { &mut *f };
    // The old Ethernet header now sits right before the quote.
    let old_eth = HDRS;
    let q = ETH_LEN + HDRS;
    for i in 0..6 {
        f[i] = f[old_eth + 6 + i];
        f[6 + i] = f[old_eth + i];
    }
    f[12] = 0x08;
    f[13] = 0x00;

    let ip = ETH_LEN;
    f[ip] = 0x45;
    f[ip + 1] = 0;
    f[ip + 2..ip + 4].copy_from_slice(&(HDRS as u16 + QUOTE as u16).to_be_bytes());
    f[ip + 4..ip + 10].copy_from_slice(&[0, 0, 0, 0, OUTER_TTL, IPPROTO_ICMP]);
    f[ip + 10] = 0;
    f[ip + 11] = 0;
    for i in 0..4 {
        f[ip + 12 + i] = f[q + 16 + i]; // from the VIP …
        f[ip + 16 + i] = f[q + 12 + i]; // … to the client
    }
    let mut hdr = [0u8; IPV4_LEN];
    hdr.copy_from_slice(&f[ip..ip + IPV4_LEN]);
    let c = csum_fold(csum_add(0, &hdr));
    f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());

    let icmp = ETH_LEN + IPV4_LEN;
    f[icmp] = 3; // destination unreachable
    f[icmp + 1] = 4; // fragmentation needed and DF set
    f[icmp + 2..icmp + 6].copy_from_slice(&[0; 4]);
    f[icmp + 6..icmp + 8].copy_from_slice(&mtu.to_be_bytes());
    let mut msg = [0u8; ICMP_LEN + QUOTE];
    msg.copy_from_slice(&f[icmp..]);
    let c = csum_fold(csum_add(0, &msg));
    f[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
    Reason::TxIcmpTooBig
}

/// How much of the offending IPv6 packet a packet-too-big quotes: its header, and room for
/// extension headers and the transport header's ports and sequence number, which is what the
/// sender's stack needs to find the connection (Linux reads the header chain and 8 bytes of
/// the transport header). RFC 4443 §2.4 c asks for as much as fits in 1280 bytes; a fixed
/// size keeps the checksum loop constant for the verifier.
const QUOTE6: usize = 128;

/// Turns the packet into ICMPv6 "packet too big" (type 2; RFC 4443 §3.2) with `mtu`, from the
/// VIP to the client. The packet is longer than any MTU, so it holds the whole quote.
#[inline(always)]
pub fn too_big_v6(ctx: &XdpContext, mtu: u32) -> Done {
    const HDRS: usize = IPV6_LEN + ICMP_LEN;
    const MSG: usize = ICMP_LEN + QUOTE6;
    const FRAME: usize = ETH_LEN + HDRS + QUOTE6;

    if !reshape(ctx, ETH_LEN + QUOTE6, HDRS) {
        return CANNOT_ANSWER;
    }
    let Some(f) = ptr_at::<[u8; FRAME]>(ctx, 0) else {
        return CANNOT_ANSWER;
    };
    // SAFETY: bounds checked by ptr_at; the only reference into the packet.
    let f = unsafe { &mut *f };
    let old_eth = HDRS;
    let q = ETH_LEN + HDRS;
    for i in 0..6 {
        f[i] = f[old_eth + 6 + i];
        f[6 + i] = f[old_eth + i];
    }
    f[12] = 0x86;
    f[13] = 0xdd;

    let ip = ETH_LEN;
    f[ip..ip + 4].copy_from_slice(&[0x60, 0, 0, 0]);
    f[ip + 4..ip + 6].copy_from_slice(&(MSG as u16).to_be_bytes());
    f[ip + 6] = IPPROTO_ICMPV6;
    f[ip + 7] = OUTER_TTL;
    for i in 0..16 {
        f[ip + 8 + i] = f[q + 24 + i]; // from the VIP …
        f[ip + 24 + i] = f[q + 8 + i]; // … to the client
    }

    let icmp = ETH_LEN + IPV6_LEN;
    f[icmp] = 2; // packet too big
    f[icmp + 1] = 0;
    f[icmp + 2] = 0;
    f[icmp + 3] = 0;
    f[icmp + 4..icmp + 8].copy_from_slice(&mtu.to_be_bytes());
    // RFC 4443 §2.3: the checksum covers an IPv6 pseudo-header (RFC 8200 §8.1): source,
    // destination, upper-layer length, next header; then the message.
    let mut pseudo = [0u8; 40];
    pseudo[0..32].copy_from_slice(&f[ip + 8..ip + 40]);
    pseudo[34..36].copy_from_slice(&(MSG as u16).to_be_bytes());
    pseudo[39] = IPPROTO_ICMPV6;
    let mut sum = csum_add(0, &pseudo);
    let mut i = icmp;
    // Bounded loop: constant trip count over a range proven in bounds above.
    while i + 1 < FRAME {
        sum += u16::from_be_bytes([f[i], f[i + 1]]) as u32;
        i += 2;
    }
    let c = csum_fold(sum);
    f[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
    Reason::TxIcmpTooBig
}
