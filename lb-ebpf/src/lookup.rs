//! Lookups: which VIP a packet is for, and which backend its flow goes to (flow table first,
//! with the VIP's idle timeout, then the VIP's Maglev ring).

use lb_common::{
    BACKEND_F_ACTIVE, Backend, FlowKey, FlowValue, IPPROTO_TCP, LbConfig, RING_EMPTY, Reason,
    VIP_F_HAS_TCP, VIP_F_HAS_UDP, VIP_MARKER_PROTO, VipKey, VipMeta,
};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::bpf_jiffies64,
};

use crate::maps::{LB_BACKENDS, LB_FLOWS, LB_RINGS, LB_VIPS, count_flow_insert};

/// An outcome that ends the packet's processing early: the reason to count. Its XDP action
/// follows from the reason ([`action_of`]): carrying only the reason on the error paths
/// saves the action's constant and spill before every branch that can take them (about 20
/// BPF instructions of a hit; BENCHMARKS.md, "XDP hit: the path below Katran's again (stop
/// 37)").
pub type Done = Reason;
/// An XDP action and the reason to count (NAT's sends, whose action is the redirect's).
pub type Out = (u32, Reason);

/// The XDP action of a packet that ended early with reason `r`: every such reason has one,
/// [`Reason::early_end`] (lb-common, beside the reasons, so that a new one cannot be left
/// out), tested here through its bit sets.
#[inline(always)]
pub fn action_of(r: Reason) -> u32 {
    if (Reason::TX_ON_EARLY_END >> (r as u32)) & 1 != 0 {
        xdp_action::XDP_TX
    } else if (Reason::PASS_ON_EARLY_END >> (r as u32)) & 1 != 0 {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// The VIP of a packet whose VIP key the parser stored in `vkey` (exact port first, then the
/// port-0 VIP of the address; `vkey` is changed for those). A fragment is dropped when a VIP
/// of its protocol (`proto`) lives at its address (its address marker says so), and passed
/// otherwise.
///
/// The key goes to `LB_VIPS.get` by reference although it is `Copy`: passed by value it was
/// copied once more on the stack before every lookup (ten instructions of a hit).
#[inline(always)]
#[allow(clippy::needless_borrows_for_generic_args)]
pub fn vip(vkey: &mut VipKey, proto: u8, fragment: bool) -> Result<VipMeta, Done> {
    // SAFETY: the values are copied out at once; no insert/remove happens in between.
    if let Some(v) = unsafe { LB_VIPS.get(&*vkey) } {
        let v = *v;
        return if fragment {
            Err(Reason::DropFragment)
        } else {
            Ok(v)
        };
    }
    vkey.port = 0;
    // SAFETY: as above.
    if let Some(v) = unsafe { LB_VIPS.get(&*vkey) } {
        let v = *v;
        return if fragment {
            Err(Reason::DropFragment)
        } else {
            Ok(v)
        };
    }
    if !fragment {
        return Err(Reason::PassNotVip);
    }
    // No ports to match: drop it if any VIP of this protocol lives at the address.
    vkey.proto = VIP_MARKER_PROTO;
    let want = if proto == IPPROTO_TCP {
        VIP_F_HAS_TCP
    } else {
        VIP_F_HAS_UDP
    };
    // SAFETY: as above.
    match unsafe { LB_VIPS.get(&*vkey) } {
        Some(m) if m.flags & want != 0 => Err(Reason::DropFragment),
        _ => Err(Reason::PassNotVip),
    }
}

/// The clock of the flow table (`created_ns`, `last_seen_ns`) and of the next-hop cache:
/// `bpf_jiffies64()` in nanoseconds, `jiffies * tick_ns + clock_offset_ns` with the factor and
/// offset the loader measured (see [`LbConfig::tick_ns`]). It reads like
/// CLOCK_MONOTONIC_COARSE: CLOCK_MONOTONIC as of the last timer tick, behind the precise clock
/// userspace compares with by less than one tick (1/CONFIG_HZ: 1–10 ms, 4 ms on a HZ=250
/// kernel). `bpf_jiffies64` is inlined by the verifier (a load of `jiffies_64`): no helper
/// call, unlike `bpf_ktime_get_coarse_ns`, which cost 19 ns of an IPv6 hit and 83 ns of a new
/// flow into a full table in the ablation (BENCHMARKS.md). A flow's idle age therefore reads
/// up to one tick too long, and an idle timeout (whole seconds) ends up to one tick early.
#[inline(always)]
pub fn coarse_now(cfg: &LbConfig) -> u64 {
    // SAFETY: no preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    jiffies
        .wrapping_mul(cfg.tick_ns)
        .wrapping_add(cfg.clock_offset_ns)
}

/// splitmix64's finaliser: a cheap, well-mixing, seedless 64-bit permutation.
#[inline(always)]
fn mix(mut h: u64) -> u64 {
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Mixes the 5-tuple into 64 bits. No per-node seed: every LB node must pick the same slot
/// for the same flow. IPv4 keys have zeros in the upper words, which costs nothing.
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u64 {
    let w = |a: &[u32; 4], i: usize| (a[i] as u64) << 32 | a[i + 1] as u64;
    let ports = ((k.src_port as u64) << 24 | (k.dst_port as u64) << 8 | k.proto as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut h = mix(w(&k.src_addr, 0) ^ ports);
    h = mix(h ^ w(&k.src_addr, 2));
    h = mix(h ^ w(&k.dst_addr, 0));
    mix(h ^ w(&k.dst_addr, 2) ^ k.family as u64)
}

/// The 20-bit IPv6 flow label of `k`'s outer header (RFC 6438: the same for every packet of
/// a flow, different between flows, so ECMP and LAG hashing on the underlay spread flows
/// without looking inside the tunnel). One multiply (Fibonacci hashing: the product's top
/// bits depend on every bit of the folded 5-tuple) instead of [`flow_hash`]'s four mixing
/// rounds, which cost about 70 instructions of an IPv6 hit (BENCHMARKS.md, "XDP IPv6 hit
/// (stop 22)"); the label only spreads flows over paths, it picks no backend.
#[inline(always)]
pub fn flow_label(k: &FlowKey) -> u32 {
    let s = &k.src_addr;
    let addrs = s[0] ^ s[1] ^ s[2] ^ s[3] ^ k.dst_addr[3];
    let x = addrs as u64 ^ ((k.src_port as u64) << 32 | (k.dst_port as u64) << 48);
    (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 44) as u32
}

/// Where a packet goes.
pub struct Steer {
    /// Backend id.
    pub id: u32,
    /// Its entry, in `LB_BACKENDS` (read where used, not copied: a copy cost the hit a load
    /// and a spill per field).
    pub backend: &'static Backend,
    /// Chosen from the ring (no valid flow entry): a new flow to count and record.
    pub new_flow: bool,
    /// The flow table had no entry under the key at all (a new key, not a refresh).
    pub new_key: bool,
    /// An established flow whose `last_seen_ns` this packet moved on (the clock ticked since
    /// its last packet): the once-a-tick moment for upkeep that need not run on every packet.
    pub ticked: bool,
    /// The new flow's entry is already in the table (an opening SYN inserted it while it was
    /// steered): nothing to record, and a packet dropped after all must take it out again
    /// ([`unrecord`]).
    pub recorded: bool,
    /// The next-hop cache's generation, read before `backend`'s entry was
    /// ([`nexthop::generation`](crate::nexthop::generation) says why that order matters): the
    /// generation a cached next hop of `id` must carry, and the one a looked-up one is stored
    /// under.
    pub generation: u32,
}

/// The backend of `key`'s flow. An entry is used while its backend still keeps flows (its
/// drain time is not up, it did not turn unhealthy without an unhealthy-draining interval),
/// the id still belongs to this VIP, and the flow has not been idle longer than the VIP's
/// idle timeout; otherwise the flow is steered through the ring as a new one. ICMP errors
/// (`refresh` false) use the flow but do not keep it alive.
///
/// An opening TCP segment (`open`: a SYN of a DSR VIP) goes the other way round: ring first,
/// and its entry inserted only if the key has none (`BPF_NOEXIST`). A new connection (nearly
/// every SYN) so pays one hash-table operation instead of a lookup that misses and an insert:
/// the miss cost ~70 ns per new flow (BENCHMARKS.md, "XDP new flow into a full table (stop
/// 35)"). A key that is already there (a retransmitted SYN, a reused 5-tuple) fails the
/// insert and is looked up as any packet, so an existing flow keeps its backend even when the
/// ring changed since (Katran steers every SYN by its ring and overwrites the entry). The
/// price of that failed insert: the kernel takes a free node before it looks for the key, so
/// when the CPU's share of a full table has none, it evicts a batch of that share's least
/// recently used flows first (4 with per-CPU lists); the failed insert gives its node back,
/// so a burst of retransmitted SYNs evicts about one batch.
#[inline(always)]
pub fn backend(
    key: &FlowKey,
    vip: &VipMeta,
    cfg: &LbConfig,
    now: u64,
    refresh: bool,
    open: bool,
) -> Result<Steer, Done> {
    // Before any read of `LB_BACKENDS` (the ring's or the flow's backend).
    let generation = crate::nexthop::generation(cfg);
    if open {
        let (id, b) = ring(key, vip, cfg)?;
        let value = FlowValue {
            backend_id: id,
            vip_id: vip.vip_id,
            created_ns: now,
            last_seen_ns: now,
        };
        if LB_FLOWS.insert(key, value, u64::from(BPF_NOEXIST)).is_ok() {
            return Ok(Steer {
                id,
                backend: b,
                new_flow: true,
                new_key: true,
                ticked: false,
                recorded: true,
                generation,
            });
        }
    }
    let mut new_key = true;
    if let Some(flow) = LB_FLOWS.get_ptr_mut(key) {
        new_key = false;
        // SAFETY: pointer into the map value, valid for this program run.
        let (id, last) = unsafe { ((*flow).backend_id, (*flow).last_seen_ns) };
        // `last` may be a hair ahead of `now` when another CPU refreshed it meanwhile.
        let fresh = vip.idle_timeout_ns == 0 || now <= last || now - last <= vip.idle_timeout_ns;
        // `fresh` first: tested after the backend's lookup, it was computed before that call
        // and kept across it (four BPF instructions of a hit).
        if fresh
            && let Some(b) = LB_BACKENDS.get(id)
            && b.flags & BACKEND_F_ACTIVE != 0
            && b.vip_id == vip.vip_id
        {
            // Written only when the coarse clock moved on since (once a tick at most): a flow's
            // cache line stays clean between ticks, and so on other CPUs.
            let ticked = refresh && now > last;
            if ticked {
                // SAFETY: as above.
                unsafe { (*flow).last_seen_ns = now };
            }
            return Ok(Steer {
                id,
                backend: b,
                new_flow: false,
                new_key: false,
                ticked,
                recorded: false,
                generation,
            });
        }
    }
    let (id, b) = ring(key, vip, cfg)?;
    Ok(Steer {
        id,
        backend: b,
        new_flow: true,
        new_key,
        ticked: false,
        recorded: false,
        generation,
    })
}

/// The backend the VIP's Maglev ring gives `key`.
#[inline(always)]
fn ring(key: &FlowKey, vip: &VipMeta, cfg: &LbConfig) -> Result<(u32, &'static Backend), Done> {
    let slot = (flow_hash(key) % cfg.ring_size as u64) as u32;
    let idx = vip.vip_id.wrapping_mul(cfg.ring_size).wrapping_add(slot);
    let Some(id) = LB_RINGS.get(idx) else {
        return Err(Reason::DropInternal);
    };
    let id = *id;
    if id == RING_EMPTY {
        return Err(Reason::DropNoBackend);
    }
    let Some(b) = LB_BACKENDS.get(id) else {
        return Err(Reason::DropInternal);
    };
    Ok((id, b))
}

/// Takes out the entry an opening SYN inserted while it was steered ([`Steer::recorded`]),
/// when the packet is dropped after all (a guard, no route): a dropped packet leaves no entry.
#[inline(always)]
pub fn unrecord(key: &FlowKey, steer: &Steer) {
    if steer.recorded {
        let _ = LB_FLOWS.remove(key);
    }
}

/// Records a new flow (after its next hop resolved, so a dropped packet leaves no entry), or
/// counts the one an opening SYN already inserted.
#[inline(always)]
pub fn record(key: &FlowKey, steer: &Steer, vip: &VipMeta, now: u64) {
    if steer.recorded {
        count_flow_insert();
        return;
    }
    let value = FlowValue {
        backend_id: steer.id,
        vip_id: vip.vip_id,
        created_ns: now,
        last_seen_ns: now,
    };
    // A full LRU map evicts its least recently used entries; insert cannot fail for space.
    if LB_FLOWS.insert(key, value, 0).is_ok() && steer.new_key {
        count_flow_insert();
    }
}
