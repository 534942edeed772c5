//! Per-VIP guards, checked right after the VIP lookup and before any state is created:
//! source allow and deny lists (LPM tries keyed by VIP id, family and address), and a
//! new-flow rate limit per source (a GCRA token bucket, see [`lb_common::RateState`]).
//!
//! A VIP without guards pays one flag test; the tries are only looked up when the VIP's flags
//! say it has a list, and the rate state only for a packet that would create a flow.

use core::mem::MaybeUninit;

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use lb_common::{
    FlowKey, GUARD_PREFIX_FULL, GuardKey, RateKey, RateState, Reason, VIP_F_ALLOW_LIST,
    VIP_F_DENY_LIST, VipMeta,
};

use crate::{
    lookup::Done,
    maps::{LB_GUARD_ALLOW, LB_GUARD_DENY, LB_GUARD_STATS, LB_RATE},
    pkt::zero,
};

/// Counts one guard drop in the VIP's counters and returns it.
#[inline(always)]
fn dropped(vip_id: u32, reason: Reason) -> Done {
    if let Some(c) = LB_GUARD_STATS.get_ptr_mut(vip_id) {
        // SAFETY: per-CPU slot; no other program instance runs on this CPU concurrently.
        unsafe {
            match reason {
                Reason::DropNotAllowed => (*c).not_allowed += 1,
                Reason::DropDenied => (*c).denied += 1,
                _ => (*c).rate_limited += 1,
            }
        }
    }
    reason
}

/// Drops a packet whose source the VIP's lists refuse: in the deny list, or outside the allow
/// list (a deny entry wins over an allow entry that also matches).
#[inline(always)]
pub fn source(key: &FlowKey, vip: &VipMeta) -> Result<(), Done> {
    if vip.flags & (VIP_F_ALLOW_LIST | VIP_F_DENY_LIST) == 0 {
        return Ok(());
    }
    let mut slot = MaybeUninit::<GuardKey>::uninit();
    // SAFETY: GuardKey is plain integers.
    let gkey = unsafe { zero(&mut slot) };
    gkey.vip_id = vip.vip_id;
    gkey.family = key.family;
    gkey.addr = key.src_addr;
    let lkey = Key::new(GUARD_PREFIX_FULL, *gkey);
    if vip.flags & VIP_F_DENY_LIST != 0 && LB_GUARD_DENY.get(&lkey).is_some() {
        return Err(dropped(vip.vip_id, Reason::DropDenied));
    }
    if vip.flags & VIP_F_ALLOW_LIST != 0 && LB_GUARD_ALLOW.get(&lkey).is_none() {
        return Err(dropped(vip.vip_id, Reason::DropNotAllowed));
    }
    Ok(())
}

/// Takes one new flow from the source's bucket, or drops the packet if the source is over the
/// VIP's new-flow rate. Only called for packets that would create a flow.
///
/// The bucket reads the precise clock (`bpf_ktime_get_ns`), not the flows' coarse one
/// ([`crate::lookup::coarse_now`]): at a rate above one flow per tick, a clock that stands
/// still for a tick would let a source through only once per tick. Only rate-limited VIPs'
/// new flows pay for it.
#[inline(always)]
pub fn new_flow(key: &FlowKey, vip: &VipMeta) -> Result<(), Done> {
    let interval = vip.rate_interval_ns;
    if interval == 0 {
        return Ok(());
    }
    // SAFETY: `ktime` has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut slot = MaybeUninit::<RateKey>::uninit();
    // SAFETY: RateKey is plain integers.
    let rkey = unsafe { zero(&mut slot) };
    rkey.vip_id = vip.vip_id;
    rkey.family = key.family;
    rkey.addr = key.src_addr;
    let Some(s) = LB_RATE.get_ptr_mut(*rkey) else {
        // First new flow of this source (or it was forgotten by the LRU): a full bucket.
        let mut fresh = MaybeUninit::<RateState>::uninit();
        // SAFETY: RateState is plain integers.
        let fresh = unsafe { zero(&mut fresh) };
        fresh.tat_ns = now + interval;
        // By reference: a copy of the zeroed value is what LLVM turned into a memset call.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let _ = LB_RATE.insert(*rkey, &*fresh, 0);
        return Ok(());
    };
    // SAFETY: pointer into the map value, valid for this program run; concurrent updates
    // from other CPUs may race (see RateState: the limit is off by a flow at worst).
    unsafe {
        let tat = if (*s).tat_ns > now { (*s).tat_ns } else { now };
        if tat - now > vip.rate_tolerance_ns {
            (*s).dropped += 1;
            (*s).last_drop_ns = now;
            return Err(dropped(vip.vip_id, Reason::DropRateLimited));
        }
        (*s).tat_ns = tat + interval;
    }
    Ok(())
}
