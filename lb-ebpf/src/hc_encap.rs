//! `lb_hc_encap`: health-check probes that travel the real DSR data path (TC egress).
//!
//! The health checker opens its probe socket with `SO_MARK = LB_HC_MARK_BASE + backend id`
//! and connects to `VIP:port`; the kernel routes the probe out of an interface where this
//! program runs on egress. Here a marked packet (IPv4 or IPv6) is encapsulated to the backend
//! named by the mark, exactly as `lb_xdp` encapsulates client packets (an outer header of the
//! backend's family, source `LB_CONFIG.lb_addr4`/`lb_addr6`, TTL 64, TOS/traffic class and DF
//! copied from the inner header), and sent to the backend's next hop. The backend decapsulates it, answers the LB host directly from the VIP
//! (DSR), and that reply is ordinary host traffic for `lb_xdp` (not addressed to a VIP), so it
//! reaches the probe socket. A probe that succeeds thus proves what client traffic needs: the
//! backend decapsulates, owns the VIP and serves the port. Katran's
//! `healthchecking_ipip.c`/`healthchecking.bpf.c` is the model.
//!
//! Every packet increments exactly one [`HcReason`] counter in `LB_HC_STATS`.
//!
//! Checksums. The probe's TCP checksum is normally still CHECKSUM_PARTIAL here (the stack
//! leaves it to the device), and it stays correct through encapsulation without any fix-up:
//! - `skb->csum_start` is an offset from `skb->head`, and `bpf_skb_adjust_room` inserts the
//!   outer header by pushing the Ethernet header forwards (`bpf_skb_generic_push`: `skb_push`,
//!   then `memmove` of the MAC header), so the inner TCP header, and `csum_start` with it, do
//!   not move.
//! - With `BPF_F_ADJ_ROOM_ENCAP_L3_IPV4` (or `_IPV6`) the helper also sets `skb->encapsulation`,
//!   the inner network/transport header offsets and, when the families differ,
//!   `skb->protocol` to the outer one (`bpf_skb_net_grow`), so the transmit path checks
//!   the device's `hw_enc_features`: a NIC that cannot checksum inside a tunnel gets the sum
//!   computed in software by `validate_xmit_skb` → `skb_csum_hwoffload_help` →
//!   `skb_checksum_help`, and one with `NETIF_F_HW_CSUM` fills it in from `csum_start`.
//! - On veth nothing computes it: the skb crosses to the peer still CHECKSUM_PARTIAL. There,
//!   `lb_decap` (native XDP, `XDP_PASS`) keeps the skb and its metadata (only `XDP_TX` turns it
//!   into a bare frame and loses the state), and TCP accepts a CHECKSUM_PARTIAL segment as
//!   verified (`skb_csum_unnecessary`: `csum_start` at or after the TCP header). The namespace
//!   test runs with veth tx checksum offload on and checks the backend's `InCsumErrors`.
//!
//! GSO. Without `BPF_F_ADJ_ROOM_FIXED_GSO` the helper lowers `gso_size` by the bytes it adds,
//! so every segment of a large probe still fits the MTU after encapsulation; the GSO type
//! gains `SKB_GSO_IPXIP4` or `SKB_GSO_IPXIP6`, which segmentation (in software or the NIC)
//! understands.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup as FibParams,
    },
    btf_maps::PerCpuArray,
    helpers::{bpf_fib_lookup, bpf_redirect},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use lb_common::{FAMILY_V6, HcReason, IPPROTO_IPIP, IPPROTO_IPV6, hc_backend_id};

use crate::{
    encap::FibBlock,
    maps::{LB_BACKENDS, LB_CONFIG},
    pkt::{
        AF_INET, AF_INET6, ETH_LEN, ETH_P_IP_BE, ETH_P_IPV6_BE, IP_DF_BE, IPV4_LEN, IPV6_LEN,
        OUTER_TTL, checksum_bytes, words_to_bytes,
    },
};

const HC_REASONS: usize = HcReason::COUNT as usize;

/// Per-CPU packet counters of `lb_hc_encap`, one per [`HcReason`].
#[btf_map]
static LB_HC_STATS: PerCpuArray<u64, HC_REASONS> = PerCpuArray::new();

/// What the program returns for a packet that is none of its business: `TC_ACT_UNSPEC` is
/// `TCX_NEXT`, so programs attached after this one on the same tcx hook, and any legacy tc
/// filters, still see the packet; at the end of the chain it is sent as usual. (`TC_ACT_OK`
/// would be `TCX_PASS`, which skips every program after this one.)
const NOT_MINE: i32 = TC_ACT_UNSPEC;
const SHOT: i32 = TC_ACT_SHOT;

#[inline(always)]
fn count(reason: HcReason) {
    if let Some(c) = LB_HC_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot; no other program instance runs on this CPU concurrently.
        unsafe { *c += 1 };
    }
}

#[classifier]
pub fn lb_hc_encap(ctx: TcContext) -> i32 {
    // The common case (every other packet the host sends) costs one context load, a compare
    // and a counter increment: no packet bytes are read.
    // SAFETY: `skb` is the context pointer the kernel passed in; `mark` is readable.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let Some(backend_id) = hc_backend_id(mark) else {
        count(HcReason::PassUnmarked);
        return NOT_MINE;
    };
    let (action, reason) = encapsulate(&ctx, backend_id);
    count(reason);
    action
}

/// What the outer header needs from the probe.
struct Inner {
    /// IPv4 TOS or IPv6 traffic class.
    tos: u8,
    /// Length of the IP packet.
    len: usize,
    /// IPv4 identification (zero for IPv6).
    id: [u8; 2],
    /// IPv4 DF; IPv6 always (never fragmented on its path).
    df: bool,
    /// The protocol number announcing it in the outer header (4 or 41).
    proto: u8,
}

/// The probe's IP header, read with bpf_skb_load_bytes: unlike direct packet access it needs
/// no data/data_end bounds proof and works on non-linear skbs too. The EtherType check also
/// refuses interfaces without an Ethernet header (tun, wireguard), where writing MAC
/// addresses would corrupt the packet.
#[inline(always)]
fn inner(ctx: &TcContext, protocol: u32) -> Option<Inner> {
    if protocol == ETH_P_IP_BE as u32 {
        let h = ctx.load::<[u8; ETH_LEN + IPV4_LEN]>(0).ok()?;
        if u16::from_ne_bytes([h[12], h[13]]) != ETH_P_IP_BE || h[ETH_LEN] >> 4 != 4 {
            return None;
        }
        let ip = &h[ETH_LEN..];
        Some(Inner {
            tos: ip[1],
            len: u16::from_be_bytes([ip[2], ip[3]]) as usize,
            id: [ip[4], ip[5]],
            df: u16::from_ne_bytes([ip[6], ip[7]]) & IP_DF_BE != 0,
            proto: IPPROTO_IPIP,
        })
    } else if protocol == ETH_P_IPV6_BE as u32 {
        let h = ctx.load::<[u8; ETH_LEN + IPV6_LEN]>(0).ok()?;
        if u16::from_ne_bytes([h[12], h[13]]) != ETH_P_IPV6_BE || h[ETH_LEN] >> 4 != 6 {
            return None;
        }
        let ip = &h[ETH_LEN..];
        Some(Inner {
            tos: (ip[0] << 4) | (ip[1] >> 4),
            len: IPV6_LEN + u16::from_be_bytes([ip[4], ip[5]]) as usize,
            id: [0; 2],
            df: true,
            proto: IPPROTO_IPV6,
        })
    } else {
        None
    }
}

/// Encapsulates a probe for backend `backend_id` and sends it; returns the TC action and the
/// reason to count. A probe that cannot be sent through the data path is dropped, never sent
/// on unencapsulated (it would test the wrong thing).
#[inline(always)]
fn encapsulate(ctx: &TcContext, backend_id: u32) -> (i32, HcReason) {
    // The lookup fails for ids beyond the table (whose size the loader sets from
    // --max-backends): that is the upper end of the mark range.
    let Some(backend) = LB_BACKENDS.get(backend_id) else {
        return (SHOT, HcReason::DropUnknownBackend);
    };
    let backend = *backend;
    if backend.family == 0 {
        return (SHOT, HcReason::DropUnknownBackend);
    }
    let outer_v6 = backend.family == FAMILY_V6;

    let skb = ctx.skb.skb;
    // SAFETY: context fields of the kernel's skb; `protocol` holds the __be16 EtherType.
    let (protocol, ifindex, gso_size) =
        unsafe { ((*skb).protocol, (*skb).ifindex, (*skb).gso_size) };
    let Some(inner) = inner(ctx, protocol) else {
        return (SHOT, HcReason::DropNotIp);
    };
    let overhead = if outer_v6 { IPV6_LEN } else { IPV4_LEN };
    let outer_len = inner.len + overhead;
    if outer_len > u16::MAX as usize {
        return (SHOT, HcReason::DropMtu);
    }
    let Some(cfg) = LB_CONFIG.get(0) else {
        return (SHOT, HcReason::DropNoRoute);
    };
    let cfg = *cfg;

    // Next hop of the backend, before touching the packet. The lookup is made as if the
    // packet arrived on the interface it is leaving by (input-style, so any interface may
    // be chosen; BPF_FIB_LOOKUP_OUTPUT would restrict it to this one), which is why the host
    // needs forwarding enabled (the helper answers FWD_DISABLED otherwise), as lb_xdp does.
    // The verifier requires the whole block to be initialised before the helper reads it.
    let mut block = FibBlock::uninit();
    let fib = block.zeroed_params();
    if outer_v6 {
        if cfg.lb_addr6 == [0; 4] {
            return (SHOT, HcReason::DropNoRoute);
        }
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = cfg.lb_addr6;
        fib.__bindgen_anon_4.ipv6_dst = backend.addr;
    } else {
        if cfg.lb_addr4 == 0 {
            return (SHOT, HcReason::DropNoRoute);
        }
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = cfg.lb_addr4;
        fib.__bindgen_anon_4.ipv4_dst = backend.addr[0];
    }
    fib.l4_protocol = inner.proto;
    // With tot_len the helper checks it against the route's MTU. A GSO probe is segmented
    // later (into segments that fit, see the module docs): pass 0 and the helper checks
    // the skb itself, which for GSO always fits.
    fib.__bindgen_anon_1.tot_len = if gso_size == 0 { outer_len as u16 } else { 0 };
    fib.ifindex = ifindex;
    // SAFETY: `fib` is a valid, fully initialised parameter block of the size passed.
    let rc = unsafe { bpf_fib_lookup(skb.cast(), fib, size_of::<FibParams>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        return (SHOT, HcReason::DropMtu);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return (SHOT, HcReason::DropNoRoute);
    }

    // Room for the outer header between the Ethernet header and the inner IP header.
    let flags = if outer_v6 {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
    } else {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    };
    if ctx
        .adjust_room(overhead as i32, BPF_ADJ_ROOM_MAC, flags as u64)
        .is_err()
    {
        return (SHOT, HcReason::DropAdjustRoom);
    }

    // New Ethernet header and outer header, written with one bpf_skb_store_bytes each (the
    // helper revalidates offsets after the resize; no packet pointer is held across it).
    let mut eth = [0u8; ETH_LEN];
    eth[0..6].copy_from_slice(&fib.dmac);
    eth[6..12].copy_from_slice(&fib.smac);
    let stored = if outer_v6 {
        eth[12..14].copy_from_slice(&ETH_P_IPV6_BE.to_ne_bytes());
        // RFC 2473 §6.5: traffic class from the inner header; no flow label (one probe).
        let mut h = [0u8; IPV6_LEN];
        h[0] = 0x60 | (inner.tos >> 4);
        h[1] = inner.tos << 4;
        h[4..6].copy_from_slice(&(inner.len as u16).to_be_bytes());
        h[6] = inner.proto;
        h[7] = OUTER_TTL;
        h[8..24].copy_from_slice(&words_to_bytes(&cfg.lb_addr6));
        h[24..40].copy_from_slice(&words_to_bytes(&backend.addr));
        ctx.store(ETH_LEN, &h, 0)
    } else {
        eth[12..14].copy_from_slice(&ETH_P_IP_BE.to_ne_bytes());
        let mut h = [0u8; IPV4_LEN];
        h[0] = 0x45;
        // RFC 2003 §3.1: TOS copied from the inner header; DF copied too, so path-MTU
        // discovery of the probe works as for client traffic. The identification is the
        // inner one: unique per source as RFC 791 wants should the outer header ever be
        // fragmented.
        h[1] = inner.tos;
        h[2..4].copy_from_slice(&(outer_len as u16).to_be_bytes());
        h[4..6].copy_from_slice(&inner.id);
        h[6] = if inner.df { 0x40 } else { 0 };
        h[8] = OUTER_TTL;
        h[9] = inner.proto;
        h[12..16].copy_from_slice(&cfg.lb_addr4.to_ne_bytes());
        h[16..20].copy_from_slice(&backend.addr[0].to_ne_bytes());
        let c = checksum_bytes(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        ctx.store(ETH_LEN, &h, 0)
    };
    if stored.is_err() || ctx.store(0, &eth, 0).is_err() {
        return (SHOT, HcReason::DropAdjustRoom);
    }

    // A redirect re-enters the egress path of the target interface (`__bpf_tx_skb` →
    // `dev_queue_xmit`), where this program may run again: without the mark it passes.
    ctx.set_mark(0);

    if fib.ifindex == ifindex {
        // Leaving by this interface anyway: go on without re-entering the egress path.
        (TC_ACT_OK, HcReason::Encapsulated)
    } else {
        // SAFETY: plain helper call; returns TC_ACT_REDIRECT (or TC_ACT_SHOT on bad flags).
        let action = unsafe { bpf_redirect(fib.ifindex, 0) } as i32;
        (action, HcReason::Encapsulated)
    }
}
