//! `lb_hc_encap`: health-check probes that travel the real DSR data path (TC egress).
//!
//! The health checker opens its probe socket with `SO_MARK = LB_HC_MARK_BASE + backend id`
//! and connects to `VIP:port`; the kernel routes the probe out of an interface where this
//! program runs on egress. Here a marked packet is encapsulated IPv4-in-IPv4 to the backend
//! named by the mark, exactly as `lb_xdp` encapsulates client packets (outer source
//! `LB_CONFIG.lb_addr`, TTL 64, TOS and DF copied from the inner header), and sent to the
//! backend's next hop. The backend decapsulates it, answers the LB host directly from the VIP
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
//! - With `BPF_F_ADJ_ROOM_ENCAP_L3_IPV4` the helper also sets `skb->encapsulation` and the
//!   inner network/transport header offsets (`bpf_skb_net_grow`), so the transmit path checks
//!   the device's `hw_enc_features`: a NIC that cannot checksum inside a tunnel gets the sum
//!   computed in software by `validate_xmit_skb` → `skb_csum_hwoffload_help` →
//!   `skb_checksum_help`, and one with `NETIF_F_HW_CSUM` fills it in from `csum_start`.
//! - On veth nothing computes it: the skb crosses to the peer still CHECKSUM_PARTIAL. There,
//!   `lb_decap` (native XDP, `XDP_PASS`) keeps the skb and its metadata (only `XDP_TX` turns it
//!   into a bare frame and loses the state), and TCP accepts a CHECKSUM_PARTIAL segment as
//!   verified (`skb_csum_unnecessary`: `csum_start` at or after the TCP header). The namespace
//!   test runs with veth tx checksum offload on and checks the backend's `InCsumErrors`.
//!
//! GSO. Without `BPF_F_ADJ_ROOM_FIXED_GSO` the helper lowers `gso_size` by the 20 bytes it
//! adds, so every segment of a large probe still fits the MTU after encapsulation; the GSO type
//! gains `SKB_GSO_IPXIP4`, which segmentation (in software or the NIC) understands.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_SUCCESS,
        TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        bpf_fib_lookup as FibParams,
    },
    btf_maps::PerCpuArray,
    helpers::{bpf_fib_lookup, bpf_redirect},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use lb_common::{HcReason, IPPROTO_IPIP, hc_backend_id};

use crate::{
    AF_INET, ETH_LEN, ETH_P_IP_BE, IP_DF_BE, IPV4_MIN_LEN, LB_BACKENDS, LB_CONFIG, OUTER_TTL,
    checksum_bytes,
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

/// Encapsulates a probe for backend `backend_id` and sends it; returns the TC action and the
/// reason to count. A probe that cannot be sent through the data path is dropped, never sent
/// on unencapsulated (it would test the wrong thing).
#[inline(always)]
fn encapsulate(ctx: &TcContext, backend_id: u32) -> (i32, HcReason) {
    const FRAME_HDRS: usize = ETH_LEN + IPV4_MIN_LEN;

    // The lookup fails for ids beyond the table (whose size the loader sets from
    // --max-backends): that is the upper end of the mark range.
    let Some(backend) = LB_BACKENDS.get(backend_id) else {
        return (SHOT, HcReason::DropUnknownBackend);
    };
    let backend_addr = backend.addr;
    if backend_addr == 0 {
        return (SHOT, HcReason::DropUnknownBackend);
    }

    let skb = ctx.skb.skb;
    // SAFETY: context fields of the kernel's skb; `protocol` holds the __be16 EtherType.
    let (protocol, ifindex, gso_size) =
        unsafe { ((*skb).protocol, (*skb).ifindex, (*skb).gso_size) };
    if protocol != ETH_P_IP_BE as u32 {
        return (SHOT, HcReason::DropNotIpv4);
    }
    // Ethernet and inner IPv4 headers, read with bpf_skb_load_bytes: unlike direct packet
    // access it needs no data/data_end bounds proof and works on non-linear skbs too. The
    // EtherType check also refuses interfaces without an Ethernet header (tun, wireguard),
    // where writing MAC addresses would corrupt the packet.
    let Ok(hdrs) = ctx.load::<[u8; FRAME_HDRS]>(0) else {
        return (SHOT, HcReason::DropNotIpv4);
    };
    if u16::from_ne_bytes([hdrs[12], hdrs[13]]) != ETH_P_IP_BE || hdrs[ETH_LEN] >> 4 != 4 {
        return (SHOT, HcReason::DropNotIpv4);
    }
    let inner = &hdrs[ETH_LEN..];
    let tos = inner[1];
    let inner_len = u16::from_be_bytes([inner[2], inner[3]]) as usize;
    let outer_len = inner_len + IPV4_MIN_LEN;
    if outer_len > u16::MAX as usize {
        return (SHOT, HcReason::DropMtu);
    }
    let df = u16::from_ne_bytes([inner[6], inner[7]]) & IP_DF_BE;

    let lb_addr = LB_CONFIG.get(0).map_or(0, |c| c.lb_addr);

    // Next hop of the backend, before touching the packet. The lookup is made as if the
    // packet arrived on the interface it is leaving by (input-style, so any interface may
    // be chosen; BPF_FIB_LOOKUP_OUTPUT would restrict it to this one), which is why the host
    // needs forwarding enabled (the helper answers FWD_DISABLED otherwise), as lb_xdp does.
    // SAFETY: all-zero is a valid bpf_fib_lookup (integers and unions of integers); the
    // verifier requires the whole block to be initialised before the helper reads it.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_IPIP;
    // With tot_len the helper checks it against the route's MTU. A GSO probe is segmented
    // later (into segments that fit, see the module docs): pass 0 and the helper checks
    // the skb itself, which for GSO always fits.
    fib.__bindgen_anon_1.tot_len = if gso_size == 0 { outer_len as u16 } else { 0 };
    fib.ifindex = ifindex;
    fib.__bindgen_anon_3.ipv4_src = lb_addr;
    fib.__bindgen_anon_4.ipv4_dst = backend_addr;
    // SAFETY: `fib` is a valid, fully initialised parameter block of the size passed.
    let rc = unsafe { bpf_fib_lookup(skb.cast(), &mut fib, size_of::<FibParams>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        return (SHOT, HcReason::DropMtu);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return (SHOT, HcReason::DropNoRoute);
    }

    // Room for the outer header between the Ethernet header and the inner IPv4 header.
    if ctx
        .adjust_room(
            IPV4_MIN_LEN as i32,
            BPF_ADJ_ROOM_MAC,
            BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64,
        )
        .is_err()
    {
        return (SHOT, HcReason::DropAdjustRoom);
    }

    // New Ethernet header and outer IPv4 header, written with one bpf_skb_store_bytes (the
    // helper revalidates offsets after the resize; no packet pointer is held across it).
    let mut out = [0u8; FRAME_HDRS];
    out[0..6].copy_from_slice(&fib.dmac);
    out[6..12].copy_from_slice(&fib.smac);
    out[12..14].copy_from_slice(&ETH_P_IP_BE.to_ne_bytes());
    let mut hdr = [0u8; IPV4_MIN_LEN];
    hdr[0] = 0x45;
    // RFC 2003 §3.1: TOS copied from the inner header; DF copied too, so path-MTU discovery
    // of the probe works as for client traffic. The identification is the inner one: unique
    // per source as RFC 791 wants should the outer header ever be fragmented.
    hdr[1] = tos;
    hdr[2..4].copy_from_slice(&(outer_len as u16).to_be_bytes());
    hdr[4..6].copy_from_slice(&inner[4..6]);
    hdr[6..8].copy_from_slice(&df.to_ne_bytes());
    hdr[8] = OUTER_TTL;
    hdr[9] = IPPROTO_IPIP;
    hdr[12..16].copy_from_slice(&lb_addr.to_ne_bytes());
    hdr[16..20].copy_from_slice(&backend_addr.to_ne_bytes());
    let c = checksum_bytes(&hdr);
    hdr[10..12].copy_from_slice(&c.to_be_bytes());
    out[ETH_LEN..].copy_from_slice(&hdr);
    if ctx.store(0, &out, 0).is_err() {
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
