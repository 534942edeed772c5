//! Flow-table accounting: how full the table is and how many live flows the LRU evicted.
//!
//! The kernel's LRU hash map evicts silently when it is full, so `lb run` derives evictions
//! (the method is in [`lb_common::FlowTableStats`]'s docs): `lb_xdp` counts the keys it
//! inserts, `lb run` counts what it deletes, and a periodic sweep deletes the entries idle
//! beyond their VIP's timeout and counts the rest. Between two sweeps every key inserted is
//! still there, was deleted by `lb run`, or was evicted; and since the sweep removed the expired
//! entries, what was evicted had been idle for less than its timeout plus one sweep interval:
//! a live flow that lost its entry and, on its next packet, is steered as a new one.
//!
//! The estimate is exact up to the entries inserted while a sweep walks the table (counted in
//! the next sweep), and is kept monotonic. A sweep walks the whole table (two system calls per
//! entry; about a second per million entries), so it runs every half of the shortest idle
//! timeout, at least every second and at most every 30 s.
use std::time::Duration;

use lb_common::FlowTableStats;

/// Longest interval between two sweeps.
pub const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// Shortest interval between two sweeps.
pub const MIN_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// CLOCK_MONOTONIC in nanoseconds. Flows are stamped with it as of the last timer tick
/// (jiffies times the measured tick, see `dataplane::clock`), behind it by less than one tick:
/// an idle age computed against this clock is at most one tick too long.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How often to sweep for VIPs whose shortest idle timeout is `shortest`.
pub fn sweep_interval(shortest: Duration) -> Duration {
    (shortest / 2).clamp(MIN_SWEEP_INTERVAL, MAX_SWEEP_INTERVAL)
}

/// What one sweep adds up to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepResult {
    /// Keys `lb_xdp` has inserted in all (read before the walk).
    pub inserts: u64,
    /// Entries the ring writer deleted (departed backends) since the previous sweep.
    pub deleted_by_writer: u64,
    /// Expired entries this sweep deleted.
    pub expired: u64,
    /// Entries left after this sweep.
    pub entries: u64,
    /// When (CLOCK_MONOTONIC nanoseconds).
    pub now_ns: u64,
    /// NAT reverse entries left after this sweep.
    pub nat_entries: u64,
}

/// The table's accounting after a sweep: `prev` plus what the sweep found. Evictions are
/// `inserts - deleted - entries` (never less than before: the walk is not atomic, so a sweep
/// may see an entry inserted after the insert counter was read).
pub fn account(prev: FlowTableStats, sweep: SweepResult) -> FlowTableStats {
    let deleted = prev.deleted + sweep.deleted_by_writer + sweep.expired;
    let evicted = sweep
        .inserts
        .saturating_sub(deleted)
        .saturating_sub(sweep.entries);
    FlowTableStats {
        entries: sweep.entries,
        deleted,
        expired: prev.expired + sweep.expired,
        evicted_live: prev.evicted_live.max(evicted),
        swept_ns: sweep.now_ns,
        nat_entries: sweep.nat_entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evictions_are_what_was_inserted_and_neither_deleted_nor_still_there() {
        // 100 inserted, 10 expired and swept, 5 deleted with a backend, 60 left: 25 evicted.
        let s = account(
            FlowTableStats::default(),
            SweepResult {
                inserts: 100,
                deleted_by_writer: 5,
                expired: 10,
                entries: 60,
                now_ns: 7,
                nat_entries: 0,
            },
        );
        assert_eq!(
            s,
            FlowTableStats {
                entries: 60,
                deleted: 15,
                expired: 10,
                evicted_live: 25,
                swept_ns: 7,
                nat_entries: 0,
            }
        );
        // Nothing new evicted: 20 more inserted, all still there.
        let s2 = account(
            s,
            SweepResult {
                inserts: 120,
                entries: 80,
                now_ns: 8,
                ..SweepResult::default()
            },
        );
        assert_eq!(s2.evicted_live, 25);
        assert_eq!(s2.deleted, 15);
        // A racing walk that sees more entries than the counter explains never lowers it.
        let s3 = account(
            s2,
            SweepResult {
                inserts: 120,
                entries: 90,
                now_ns: 9,
                ..SweepResult::default()
            },
        );
        assert_eq!(s3.evicted_live, 25);
    }

    #[test]
    fn a_table_that_never_filled_reports_no_evictions() {
        let s = account(
            FlowTableStats::default(),
            SweepResult {
                inserts: 50,
                expired: 20,
                entries: 30,
                ..SweepResult::default()
            },
        );
        assert_eq!(s.evicted_live, 0);
    }

    #[test]
    fn sweeps_run_at_half_the_shortest_timeout_within_bounds() {
        assert_eq!(sweep_interval(Duration::from_secs(350)), MAX_SWEEP_INTERVAL);
        assert_eq!(
            sweep_interval(Duration::from_secs(20)),
            Duration::from_secs(10)
        );
        assert_eq!(sweep_interval(Duration::from_secs(1)), MIN_SWEEP_INTERVAL);
    }
}
