//! Per-VIP guards, checked right after the VIP lookup and before any state is created:
//! source allow and deny lists (LPM tries keyed by VIP id, family and address), and a
//! new-flow rate limit per source (a GCRA token bucket, see [`lb_common::RateState`]).
//!
//! A VIP without guards pays one flag test; the tries are only looked up when the VIP's flags
//! say it has a list, and the rate state only for a packet that would create a flow.

use core::{mem::MaybeUninit, ptr::write_volatile};

use aya_ebpf::{bindings::xdp_action, maps::lpm_trie::Key};
use lb_common::{
    FlowKey, GUARD_PREFIX_FULL, GuardKey, RateKey, RateState, Reason, VIP_F_ALLOW_LIST,
    VIP_F_DENY_LIST, VipMeta,
};

use crate::{
    lookup::Done,
    maps::{LB_GUARD_ALLOW, LB_GUARD_DENY, LB_GUARD_STATS, LB_RATE},
    pkt::zeroed,
};

const DROP: u32 = xdp_action::XDP_DROP;

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
    (DROP, reason)
}

/// Drops a packet whose source the VIP's lists refuse: in the deny list, or outside the allow
/// list (a deny entry wins over an allow entry that also matches).
#[inline(always)]
pub fn source(key: &FlowKey, vip: &VipMeta) -> Result<(), Done> {
    if vip.flags & (VIP_F_ALLOW_LIST | VIP_F_DENY_LIST) == 0 {
        return Ok(());
    }
    // SAFETY: GuardKey is plain integers.
    let mut gkey: GuardKey = unsafe { zeroed() };
    gkey.vip_id = vip.vip_id;
    gkey.family = key.family;
    gkey.addr = key.src_addr;
    let lkey = Key::new(GUARD_PREFIX_FULL, gkey);
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
#[inline(always)]
pub fn new_flow(key: &FlowKey, vip: &VipMeta, now: u64) -> Result<(), Done> {
    let interval = vip.rate_interval_ns;
    if interval == 0 {
        return Ok(());
    }
    // SAFETY: RateKey is plain integers.
    let mut rkey: RateKey = unsafe { zeroed() };
    rkey.vip_id = vip.vip_id;
    rkey.family = key.family;
    rkey.addr = key.src_addr;
    let Some(s) = LB_RATE.get_ptr_mut(rkey) else {
        // First new flow of this source (or it was forgotten by the LRU): a full bucket.
        // Written in place, word by word: built as a value (a literal, or `zeroed()`), its
        // two zero words became a `memset` call when LLVM copied it.
        let mut fresh = MaybeUninit::<RateState>::uninit();
        let f = fresh.as_mut_ptr();
        // SAFETY: field pointers into `fresh`, each written once; after the three writes the
        // value is fully initialised.
        let fresh = unsafe {
            write_volatile(&raw mut (*f).tat_ns, now + interval);
            write_volatile(&raw mut (*f).dropped, 0);
            write_volatile(&raw mut (*f).last_drop_ns, 0);
            fresh.assume_init_ref()
        };
        let _ = LB_RATE.insert(rkey, fresh, 0);
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
