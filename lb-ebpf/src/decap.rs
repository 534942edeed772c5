//! `lb_decap`, on backends: strips the outer header of every encapsulation `lb_xdp` emits
//! (IPv4 or IPv6 outside, protocol 4 or 41 inside, no outer options or extension headers)
//! when it is addressed to this host, so backends need no tunnel driver. Everything else is
//! left alone.

use core::mem::MaybeUninit;

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{AddrKey, DecapReason, FAMILY_V4, FAMILY_V6, IPPROTO_IPIP, IPPROTO_IPV6};
use network_types::eth::EthHdr;

use crate::{
    maps::LB_DECAP_ADDRS,
    pkt::{ETH_LEN, ETH_P_IP_BE, ETH_P_IPV6_BE, IPV4_LEN, IPV6_LEN, bytes_to_words, ptr_at, zero},
};

/// Strips the outer header of IP-in-IP packets for this host; everything else is untouched.
#[inline(always)]
pub fn decap(ctx: &XdpContext) -> DecapReason {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return DecapReason::Passed;
    };
    // SAFETY: bounds checked by ptr_at.
    let saved = unsafe { *eth };
    let mut key = MaybeUninit::<AddrKey>::uninit();
    let (outer_len, proto, dst) = if saved.ether_type == ETH_P_IP_BE {
        let Some(outer) = ptr_at::<[u8; IPV4_LEN]>(ctx, ETH_LEN) else {
            return DecapReason::Passed;
        };
        // SAFETY: bounds checked by ptr_at.
        let outer = unsafe { &*outer };
        // Only option-less outer headers (as lb_xdp writes them); anything else is not ours.
        if outer[0] != 0x45 {
            return DecapReason::Passed;
        }
        // SAFETY: AddrKey is plain integers.
        let dst = unsafe { zero(&mut key) };
        dst.addr[0] = u32::from_ne_bytes([outer[16], outer[17], outer[18], outer[19]]);
        dst.family = FAMILY_V4;
        (IPV4_LEN, outer[9], dst)
    } else if saved.ether_type == ETH_P_IPV6_BE {
        let Some(outer) = ptr_at::<[u8; IPV6_LEN]>(ctx, ETH_LEN) else {
            return DecapReason::Passed;
        };
        // SAFETY: bounds checked by ptr_at.
        let outer = unsafe { &*outer };
        if outer[0] >> 4 != 6 {
            return DecapReason::Passed;
        }
        // SAFETY: AddrKey is plain integers.
        let dst = unsafe { zero(&mut key) };
        dst.addr = bytes_to_words(outer, 24);
        dst.family = FAMILY_V6;
        // The next header directly: lb_xdp writes no extension headers.
        (IPV6_LEN, outer[6], dst)
    } else {
        return DecapReason::Passed;
    };
    let (inner_version, inner_min, inner_type) = match proto {
        IPPROTO_IPIP => (4, IPV4_LEN, ETH_P_IP_BE),
        IPPROTO_IPV6 => (6, IPV6_LEN, ETH_P_IPV6_BE),
        _ => return DecapReason::Passed,
    };
    // SAFETY: value only tested for presence.
    if unsafe { LB_DECAP_ADDRS.get(dst) }.is_none() {
        return DecapReason::Passed;
    }
    // The inner header must be there whole, of the family the outer header announces.
    let Some(inner) = ptr_at::<u8>(ctx, ETH_LEN + outer_len) else {
        return DecapReason::PassMalformed;
    };
    if ptr_at::<u8>(ctx, ETH_LEN + outer_len + inner_min - 1).is_none() {
        return DecapReason::PassMalformed;
    }
    // SAFETY: bounds checked by ptr_at.
    if unsafe { *inner } >> 4 != inner_version {
        return DecapReason::PassMalformed;
    }
    // SAFETY: the context pointer is the one the kernel passed in.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return DecapReason::PassMalformed;
    }
    let Some(new_eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return DecapReason::PassMalformed;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        *new_eth = saved;
        (*new_eth).ether_type = inner_type;
    }
    DecapReason::Decapsulated
}
