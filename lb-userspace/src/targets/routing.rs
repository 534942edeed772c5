//! Which targets of a group take new requests and flows: the one rule both tiers follow.
//!
//! A target is *in service* when it is `healthy` or `unavailable` (health checks disabled, or
//! the balancer could not check it). The group *fails open* (AWS: "when every registered
//! target is unhealthy, route to all of them") when fewer targets are in service than its
//! threshold asks for ([`MinHealthy`]: a count, default 1, and an optional percentage of the
//! targets that could serve). Failing open, every target that is merely `initial`,
//! `unhealthy` or `unhealthy.draining` takes new traffic too, and each pick or new flow counts
//! as unhealthy routing. `draining` and `unused` targets never take new traffic.

use super::config::MinHealthy;
use super::state::TargetState;

/// Whether a group whose targets are in `states` fails open under `min`.
pub fn failing_open<I>(states: I, min: MinHealthy) -> bool
where
    I: IntoIterator<Item = TargetState>,
{
    let (mut healthy, mut candidates) = (0u64, 0u64);
    for s in states {
        if s.in_service() {
            healthy += 1;
        }
        if s.routable_when_failing_open() {
            candidates += 1;
        }
    }
    if candidates == 0 {
        return false;
    }
    healthy < u64::from(min.count)
        || min
            .percent
            .is_some_and(|p| healthy * 100 < u64::from(p) * candidates)
}

/// Whether a target in `state` takes new requests/flows.
pub fn takes_new(state: TargetState, failing_open: bool) -> bool {
    if failing_open {
        state.routable_when_failing_open()
    } else {
        state.in_service()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TargetState::*;

    fn min(count: u32, percent: Option<u8>) -> MinHealthy {
        MinHealthy { count, percent }
    }

    #[test]
    fn one_healthy_target_is_enough_by_default() {
        assert!(!failing_open([Healthy, Unhealthy, Unhealthy], min(1, None)));
        assert!(failing_open([Unhealthy, Initial], min(1, None)));
        assert!(!failing_open([Unavailable, Unhealthy], min(1, None)));
    }

    #[test]
    fn draining_and_unused_targets_neither_count_nor_fail_open() {
        // Nothing could serve: no fail-open (the caller answers 503 / drops).
        assert!(!failing_open([Draining, Unused], min(1, None)));
        assert!(!takes_new(Draining, true) && !takes_new(Unused, true));
    }

    #[test]
    fn thresholds_by_count_and_percentage() {
        let states = [Healthy, Healthy, Unhealthy, Unhealthy];
        assert!(!failing_open(states, min(2, None)));
        assert!(failing_open(states, min(3, None)));
        assert!(!failing_open(states, min(1, Some(50))));
        assert!(failing_open(states, min(1, Some(51))));
        // Draining targets are not candidates: 2 of 3 candidates healthy = 66%.
        assert!(!failing_open(
            [Healthy, Healthy, Unhealthy, Draining],
            min(1, Some(60))
        ));
    }

    #[test]
    fn failing_open_lets_unhealthy_and_initial_targets_take_traffic() {
        for s in [Initial, Unhealthy, UnhealthyDraining] {
            assert!(!takes_new(s, false), "{s:?}");
            assert!(takes_new(s, true), "{s:?}");
        }
        for s in [Healthy, Unavailable] {
            assert!(takes_new(s, false) && takes_new(s, true), "{s:?}");
        }
    }
}
