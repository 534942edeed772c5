//! The maps of `lb_xdp`, `lb_decap` and `lb_hc_encap`, and the counter helpers.
//!
//! Sizes here are the compiled-in defaults; the loader overrides them from the flags
//! (`--max-flows`, `--max-vips`, `--max-backends`, `--ring-size`) before the maps are created.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    AddrKey, Backend, Counters, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_FLOWS, DEFAULT_MAX_VIPS,
    DEFAULT_RING_SIZE, DecapReason, FlowKey, FlowTableStats, FlowValue, GuardCounters, GuardKey,
    LbConfig, MAX_GUARD_CIDRS, MAX_RATE_SOURCES, NatReverse, NextHop, NextHopCounter, RateKey,
    RateState, Reason, VipKey, VipMeta,
};

const MAX_VIPS: usize = DEFAULT_MAX_VIPS as usize;
/// VIPs plus one address marker per VIP address (see `lb_common::VIP_MARKER_PROTO`).
const VIP_ENTRIES: usize = 2 * MAX_VIPS;
const MAX_BACKENDS: usize = DEFAULT_MAX_BACKENDS as usize;
const MAX_FLOWS: usize = DEFAULT_MAX_FLOWS as usize;
const RING_SLOTS: usize = DEFAULT_MAX_VIPS as usize * DEFAULT_RING_SIZE as usize;
const REASONS: usize = Reason::COUNT as usize;
const DECAP_REASONS: usize = DecapReason::COUNT as usize;

#[btf_map]
pub static LB_CONFIG: Array<LbConfig, 1> = Array::new();
#[btf_map]
pub static LB_VIPS: HashMap<VipKey, VipMeta, VIP_ENTRIES> = HashMap::new();
#[btf_map]
pub static LB_BACKENDS: Array<Backend, MAX_BACKENDS> = Array::new();
#[btf_map]
pub static LB_RINGS: Array<u32, RING_SLOTS> = Array::new();
/// The flow table. Its LRU lists are per CPU (`BPF_F_NO_COMMON_LRU`): the table is one hash
/// every CPU looks flows up in, but a CPU inserting into a full table evicts from its own
/// share of the entries (`max_entries` / possible CPUs) under its own lock, not from one list
/// shared (and locked) by all CPUs. Katran keeps one LRU table per CPU for the same reason.
/// The price: the kernel rotates a CPU's lists on every insert (`bpf_percpu_lru_pop_free`),
/// the common lists only once per batch of frees, so an insert costs ~100 ns more than with
/// the common lists, and about 40 of the ~85 ns a new flow into a full table costs beyond
/// Katran's (BENCHMARKS.md, "XDP new flow into a full table (stop 35)").
#[btf_map]
pub static LB_FLOWS: LruHashMap<FlowKey, FlowValue, MAX_FLOWS, FLOWS_FLAGS> = LruHashMap::new();
/// [`LB_FLOWS`]'s flags: per-CPU LRU lists.
const FLOWS_FLAGS: usize = aya_ebpf::bindings::BPF_F_NO_COMMON_LRU as usize;
/// Written by userspace only (the departed backends' counts, see `lb_common::Counters`);
/// here so it is created, pinned and versioned with the other maps.
#[btf_map]
pub static LB_RETIRED_STATS: Array<Counters, { MAX_VIPS + 1 }> = Array::new();
/// The one counter record a forwarded packet or a translated NAT reply updates.
#[btf_map]
pub static LB_BACKEND_STATS: PerCpuArray<Counters, MAX_BACKENDS> = PerCpuArray::new();
#[btf_map]
pub static LB_REASONS: PerCpuArray<u64, REASONS> = PerCpuArray::new();
/// Flow-table keys inserted (index 0): the eviction estimate's numerator.
#[btf_map]
pub static LB_FLOW_INSERTS: PerCpuArray<u64, 1> = PerCpuArray::new();
/// Written by userspace only (the flow sweeper); here so it is created, pinned and versioned
/// with the other maps.
#[btf_map]
pub static LB_FLOW_STATS: Array<FlowTableStats, 1> = Array::new();
#[btf_map]
pub static LB_DECAP_STATS: PerCpuArray<u64, DECAP_REASONS> = PerCpuArray::new();
/// NAT: a target's reply 5-tuple → the flow it belongs to (see `nat`). As large as the flow
/// table (the loader sizes both from `--max-flows`).
#[btf_map]
pub static LB_NAT_REVERSE: LruHashMap<FlowKey, NatReverse, MAX_FLOWS> = LruHashMap::new();
/// Sources each VIP with an allow list accepts.
#[btf_map]
pub static LB_GUARD_ALLOW: LpmTrie<GuardKey, u8, { MAX_GUARD_CIDRS as usize }> = LpmTrie::new();
/// Sources each VIP with a deny list drops.
#[btf_map]
pub static LB_GUARD_DENY: LpmTrie<GuardKey, u8, { MAX_GUARD_CIDRS as usize }> = LpmTrie::new();
/// New-flow token buckets per (VIP, source).
#[btf_map]
pub static LB_RATE: LruHashMap<RateKey, RateState, { MAX_RATE_SOURCES as usize }> =
    LruHashMap::new();
/// Guard drops per VIP.
#[btf_map]
pub static LB_GUARD_STATS: PerCpuArray<GuardCounters, MAX_VIPS> = PerCpuArray::new();
/// Addresses `lb_decap` accepts as outer destination (the backend's own addresses).
#[btf_map]
pub static LB_DECAP_ADDRS: HashMap<AddrKey, u8, 64> = HashMap::new();

/// The next hop last resolved for each backend, per CPU (see `nexthop`).
#[btf_map]
pub static LB_NEXTHOPS: PerCpuArray<NextHop, MAX_BACKENDS> = PerCpuArray::new();
/// The cache's counters.
#[btf_map]
pub static LB_NEXTHOP_STATS: PerCpuArray<u64, { NextHopCounter::COUNT as usize }> =
    PerCpuArray::new();

/// Counts one packet under `reason`.
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = LB_REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot; no other program instance runs on this CPU concurrently.
        unsafe { *c += 1 };
    }
}

/// Counts one new flow-table key.
#[inline(always)]
pub fn count_flow_insert() {
    if let Some(c) = LB_FLOW_INSERTS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, as in `count`.
        unsafe { *c += 1 };
    }
}

/// Counts one forwarded packet, sent under `reason`, in its backend's record: the only
/// counter update it gets (`lb_xdp` leaves `tx` and `redirect` out of `LB_REASONS`).
#[inline(always)]
pub fn add(backend_id: u32, bytes: u64, new_flow: bool, fail_open: bool, reason: Reason) {
    if let Some(c) = LB_BACKEND_STATS.get_ptr_mut(backend_id) {
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
            if reason == Reason::Redirect {
                (*c).redirected += 1;
            } else if reason != Reason::Tx {
                (*c).counted_apart += 1;
            }
        }
    }
}

/// Counts one translated NAT reply in its backend's record (`lb_xdp` leaves `nat_reply` out
/// of `LB_REASONS`; a reply passed to the kernel is also counted there, as `nat_via_kernel`).
#[inline(always)]
pub fn add_reply(backend_id: u32, bytes: u64, via_kernel: bool) {
    if let Some(c) = LB_BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot, as in `count`.
        unsafe {
            (*c).reply_packets += 1;
            (*c).reply_bytes += bytes;
            if via_kernel {
                (*c).replies_via_kernel += 1;
            }
        }
    }
}

/// Whether `lb_xdp` counts `reason` in `LB_REASONS`: all but the three a backend record holds
/// (see [`add`], [`add_reply`]).
#[inline(always)]
pub fn counted_in_reasons(reason: Reason) -> bool {
    !matches!(reason, Reason::Tx | Reason::Redirect | Reason::NatReply)
}
