//! The per-backend next-hop cache: `bpf_fib_lookup` costs 140–155 ns per packet on a small
//! machine, about as much as the rest of a flow-table hit, and its answer for a backend
//! changes only when routes, neighbours, links or addresses do. So the answer is kept per CPU
//! at the backend's id ([`LB_NEXTHOPS`], a [`NextHop`]) and used while it is still valid
//! (see [`NextHop`] for every condition). Userspace bumps [`LbConfig::nexthop_generation`] on
//! every change the kernel announces on its route netlink groups and after every write of a
//! backend slot, which invalidates every entry at once; entries also expire after [`LbConfig::nexthop_max_age_ns`], so a change nobody saw (no
//! `lb run` alive to watch) is picked up anyway. Only successful lookups are stored: an
//! unresolved neighbour, a missing route or a packet too big are decided by the helper on
//! every packet, exactly as without the cache.
//!
//! Both settings live in `LB_CONFIG`, whose entry the program has looked up before it steers,
//! so a hit costs no map lookup besides the entry's own.

use aya_ebpf::programs::XdpContext;
use lb_common::{Backend, LbConfig, NextHop, NextHopCounter};

use crate::{
    encap::{Macs, Route},
    lookup::Steer,
    maps::{LB_NEXTHOP_STATS, LB_NEXTHOPS},
    pkt::load_addr,
};

/// What the cache said about a backend's next hop.
pub enum Lookup {
    /// A valid entry: use it, no lookup.
    Hit(Route<'static>),
    /// Look it up; store a success under this generation (`None`: the cache is off).
    Miss(Option<u32>),
}

/// [`LbConfig::nexthop_generation`], read once for the packet before its backend's entry is
/// ([`lookup::backend`](crate::lookup::backend) calls this first and keeps the value in
/// [`Steer::generation`]). That order is what lets a cached entry be used
/// without checking it against the backend's address:
///
/// - userspace moves the generation on after every write of a backend slot (`set_backend`
///   in `l4::writer`), as after every route, neighbour, link or address change;
/// - an entry stored under generation `g` was resolved by a packet that read `g` first and
///   the backend's entry after, so after every slot write that preceded the bump to `g`;
/// - a packet that reads `g` and then the backend's entry sees those writes too, and no later
///   one unless the bump after it is also still to come: a packet whose two reads straddle a
///   slot write (in flight while it happens) may use the old address's next hop once, as it
///   may read a half-written entry: userspace's write is a plain copy, not atomic with
///   the packet's reads. Every packet that starts after the bump uses a next hop resolved for
///   the entry as written.
///
/// Read with a volatile load: through a `&LbConfig` the compiler may assume the value cannot
/// change and load it again where it is used, after the backend's lookup. Comparing the
/// address instead cost a hit 14 BPF instructions (BENCHMARKS.md, "XDP hit: the next hop by
/// generation, and Katran paired with a loaded copy (stop 39)").
#[inline(always)]
pub fn generation(cfg: &LbConfig) -> u32 {
    // SAFETY: a valid, aligned reference.
    unsafe { core::ptr::read_volatile(&cfg.nexthop_generation) }
}

/// The cached next hop of the backend `steer` names for a packet of IP length `len` (the
/// length handed to `bpf_fib_lookup`) that arrived on `ctx`'s interface, if still valid at
/// `now`. `cfg` is the `LB_CONFIG` entry; [`Steer::generation`] its [`generation`], read
/// before the backend's entry and so before a miss's `bpf_fib_lookup` too: a change announced
/// while that lookup runs moves the generation past the one its answer is stored under.
///
/// The cache-off test (`nexthop_max_age_ns` 0) comes before the entry's lookup, so a packet
/// with the cache off does not pay it (7 and 8 BPF instructions and one map lookup fewer on
/// a cache-off hit, IPv4 and IPv6), and a cache-on hit counts the same (389 / 397): the
/// maximum age is loaded again for the age compare rather than kept across the helper call
/// (BENCHMARKS.md, "XDP and rules: review leftovers mended (stop 41)"). The ingress interface
/// is read after the lookup: read before, it was kept across the call on the stack
/// (BENCHMARKS.md, "XDP hit: counted down further (stop 38)").
#[inline(always)]
pub fn get(steer: &Steer, ctx: &XdpContext, len: usize, cfg: &LbConfig, now: u64) -> Lookup {
    let generation = steer.generation;
    let max_age_ns = cfg.nexthop_max_age_ns;
    if max_age_ns == 0 {
        return Lookup::Miss(None);
    }
    let e = LB_NEXTHOPS.get_ptr(steer.id);
    let Some(e) = e else {
        return Lookup::Miss(Some(generation));
    };
    // SAFETY: this CPU's slot; only this CPU's program runs write it, never concurrently.
    let e = unsafe { &*e };
    // No address compare: the generation covers a rewritten backend slot ([`generation`]).
    if e.generation == generation
        && e.ingress_ifindex == ctx.ingress_ifindex() as u32
        && len <= e.max_len as usize
        // Clock skew between CPUs cannot arise (per-CPU slot); `now < resolved` cannot either.
        && now.wrapping_sub(e.resolved_ns) <= max_age_ns
    {
        return Lookup::Hit(Route {
            ifindex: e.ifindex,
            // SAFETY: the entry is a map value, valid for this program run.
            macs: unsafe { Macs::of_entry(e) },
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
    let (smac, dmac) = route.macs.bytes();
    let entry = NextHop {
        addr: load_addr(&backend.addr),
        generation,
        ingress_ifindex: ingress,
        ifindex: route.ifindex,
        // The caller checked that `len` fits a u16 (the lookup's tot_len).
        max_len: len as u16,
        family: backend.family,
        _pad: 0,
        smac,
        dmac,
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
