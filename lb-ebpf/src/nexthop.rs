//! The per-backend next-hop cache: `bpf_fib_lookup` costs 140–155 ns per packet on a small
//! machine, about as much as the rest of a flow-table hit, and its answer for a backend
//! changes only when routes, neighbours, links or addresses do. So the answer is kept per CPU
//! at the backend's id ([`LB_NEXTHOPS`], a [`NextHop`]) and used while it is still valid
//! (see [`NextHop`] for every condition). Userspace bumps [`NextHopCtl::generation`] on every
//! change the kernel announces on its route netlink groups, which invalidates every entry at
//! once; entries also expire after [`NextHopCtl::max_age_ns`], so a change nobody saw (no
//! `lb run` alive to watch) is picked up anyway. Only successful lookups are stored: an
//! unresolved neighbour, a missing route or a packet too big are decided by the helper on
//! every packet, exactly as without the cache.

use lb_common::{Backend, NextHop, NextHopCounter, NextHopCtl};

use crate::{
    encap::Route,
    maps::{LB_NEXTHOP_CTL, LB_NEXTHOP_STATS, LB_NEXTHOPS},
};

/// What the cache said about a backend's next hop.
pub enum Lookup {
    /// A valid entry: use it, no lookup.
    Hit(Route),
    /// Look it up; store a success under this generation (`None`: the cache is off).
    Miss(Option<u32>),
}

/// The cached next hop of backend `id` for a packet of IP length `len` (the length handed to
/// `bpf_fib_lookup`) that arrived on `ingress`, if still valid at `now`.
#[inline(always)]
pub fn get(id: u32, backend: &Backend, ingress: u32, len: usize, now: u64) -> Lookup {
    // Read before the lookup a miss leads to: a change announced while the lookup runs bumps
    // the generation past the one the answer is stored under.
    let Some(ctl) = LB_NEXTHOP_CTL.get(0) else {
        return Lookup::Miss(None);
    };
    let NextHopCtl {
        max_age_ns,
        generation,
        _pad,
    } = *ctl;
    if max_age_ns == 0 {
        return Lookup::Miss(None);
    }
    let Some(e) = LB_NEXTHOPS.get_ptr(id) else {
        return Lookup::Miss(Some(generation));
    };
    // SAFETY: this CPU's slot; only this CPU's program runs write it, never concurrently.
    let e = unsafe { &*e };
    if e.generation == generation
        && e.family == backend.family
        && e.addr == backend.addr
        && e.ingress_ifindex == ingress
        && len <= e.max_len as usize
        // Clock skew between CPUs cannot arise (per-CPU slot); `now < resolved` cannot either.
        && now.wrapping_sub(e.resolved_ns) <= max_age_ns
    {
        return Lookup::Hit(Route {
            ifindex: e.ifindex,
            smac: e.smac,
            dmac: e.dmac,
        });
    }
    Lookup::Miss(Some(generation))
}

/// Stores a successful lookup for a packet of IP length `len` (so at least that length fits
/// the egress MTU), under the generation [`get`] returned.
#[inline(always)]
pub fn put(
    id: u32,
    backend: &Backend,
    ingress: u32,
    len: usize,
    now: u64,
    generation: u32,
    route: &Route,
) {
    count(NextHopCounter::Cached);
    let Some(e) = LB_NEXTHOPS.get_ptr_mut(id) else {
        return;
    };
    let entry = NextHop {
        addr: backend.addr,
        generation,
        ingress_ifindex: ingress,
        ifindex: route.ifindex,
        // The caller checked that `len` fits a u16 (the lookup's tot_len).
        max_len: len as u16,
        family: backend.family,
        _pad: 0,
        smac: route.smac,
        dmac: route.dmac,
        _pad2: [0; 4],
        resolved_ns: now,
    };
    // SAFETY: this CPU's slot, as in `get`.
    unsafe { *e = entry };
}

/// Counts one event of the cache.
#[inline(always)]
pub fn count(c: NextHopCounter) {
    if let Some(v) = LB_NEXTHOP_STATS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot.
        unsafe { *v += 1 };
    }
}
