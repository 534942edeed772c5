//! When does a target close idle keep-alive connections, and so how long may we keep reusing one?
//!
//! A target that closes an idle connection at the moment we reuse it loses our request: the
//! classic ALB 502 (the target's keep-alive timeout is shorter than the load balancer's idle
//! timeout). We stop reusing a pooled connection safely before the target would close it. The
//! close time comes from two sources, per target:
//!
//! - the `Keep-Alive: timeout=N` response header, when the target sends one (Apache, Node.js,
//!   nginx with `keepalive_timeout … header_timeout`), and
//! - learning: each time the target closes one of our idle pooled connections we record how long
//!   it had been idle. The estimate follows a lower observation at once (a lower one is proof
//!   that reuse at that age can fail) and rises only slowly (a quarter of the gap per higher
//!   observation), so one fluke (a restart closing everything) costs some reuse for a while but
//!   never a failed request. Higher observations come from the one retired connection per target
//!   the pool keeps open, unused, to see when the target really closes it (see `pool`).
//!
//! The hint is trusted as an upper bound: when the target closed idle connections earlier than it
//! advertised, the earlier (learned) time wins, because a hint can be wrong (a proxy in front of
//! the target, a misconfigured server) and being wrong that way costs failed requests.
use std::time::Duration;

/// The smallest safety margin kept below an idle-close time.
///
/// Covers what separates our idle clock from the target's: the one-way delay of the last
/// response byte (our clock starts later) and of our next request (it arrives later), the
/// target's timer granularity (often 1 ms, sometimes coarser) and scheduling delay on either
/// host. 50 ms is far above all of these on a LAN or loopback and small next to real keep-alive
/// timeouts (seconds).
pub const MIN_REUSE_MARGIN: Duration = Duration::from_millis(50);

/// How long an idle connection may still be reused when the target closes idle connections
/// after `close_after`: `close_after - max(close_after / 5, 50 ms)`, i.e.
/// `min(0.8 × N, N − 50 ms)`, never negative.
///
/// Why 20 %: targets' timers are not exact (Node.js checks its keep-alive timeout on a coarse
/// timer, servers started by humans use second granularity, the hint itself is usually rounded
/// down to whole seconds), and a connection given up early only costs one new connection,
/// whereas one kept too long can cost a failed request. Why the 50 ms floor: see
/// [`MIN_REUSE_MARGIN`]. A target that closes idle connections within 50 ms gets no reuse at all.
pub fn reuse_limit_for(close_after: Duration) -> Duration {
    let margin = (close_after / 5).max(MIN_REUSE_MARGIN);
    close_after.saturating_sub(margin)
}

/// Per-target knowledge of when the target closes idle connections.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdleCloseEstimator {
    hint: Option<Duration>,
    learned: Option<Duration>,
}

impl IdleCloseEstimator {
    /// Records the `Keep-Alive: timeout` the target advertised on its latest response. Responses
    /// without the header leave the previous hint in place: targets send it on every response or
    /// never.
    pub fn set_hint(&mut self, hint: Duration) {
        self.hint = Some(hint);
    }

    /// The target closed one of our pooled connections after it had been idle for `idle_for`.
    pub fn observe_idle_close(&mut self, idle_for: Duration) {
        self.learned = Some(match self.learned {
            Some(estimate) if idle_for > estimate => estimate + (idle_for - estimate) / 4,
            _ => idle_for,
        });
    }

    /// A pooled connection was still open after `idle_for`: the target closes later than that.
    ///
    /// `idle_timeout` is our own longest idle time. Once connections keep surviving all of it
    /// and the estimate has climbed to 90 % of it, the target evidently does not close idle
    /// connections before we do: the estimate is forgotten (from a fluke of 0.3 × the idle
    /// timeout that takes seven survivals).
    pub fn observe_survival(&mut self, idle_for: Duration, idle_timeout: Duration) {
        if let Some(estimate) = self.learned
            && idle_for > estimate
        {
            let raised = estimate + (idle_for - estimate) / 4;
            let survived_our_timeout =
                idle_for >= idle_timeout && raised >= idle_timeout.mul_f64(0.9);
            self.learned = (!survived_our_timeout).then_some(raised);
        }
    }

    /// The advertised `Keep-Alive: timeout`, if any.
    pub fn hint(&self) -> Option<Duration> {
        self.hint
    }

    /// The learned idle-close time, if the target has closed an idle connection of ours.
    pub fn learned(&self) -> Option<Duration> {
        self.learned
    }

    /// Our best knowledge of when the target closes idle connections: the hint, or the learned
    /// time when the target was seen closing earlier than it advertised.
    pub fn close_after(&self) -> Option<Duration> {
        match (self.hint, self.learned) {
            (Some(hint), Some(learned)) => Some(hint.min(learned)),
            (hint, learned) => hint.or(learned),
        }
    }

    /// How long an idle pooled connection may still be reused: safely below the target's
    /// idle-close time, and never beyond our own `idle_timeout`.
    pub fn reuse_limit(&self, idle_timeout: Duration) -> Duration {
        self.close_after().map_or(idle_timeout, |close_after| {
            reuse_limit_for(close_after).min(idle_timeout)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn without_knowledge_connections_are_reused_up_to_our_idle_timeout() {
        let e = IdleCloseEstimator::default();
        assert_eq!(e.close_after(), None);
        assert_eq!(e.reuse_limit(IDLE_TIMEOUT), IDLE_TIMEOUT);
    }

    #[test]
    fn margin_is_a_fifth_of_the_close_time_but_at_least_50_ms() {
        assert_eq!(
            reuse_limit_for(Duration::from_secs(5)),
            Duration::from_secs(4)
        );
        assert_eq!(
            reuse_limit_for(Duration::from_secs(60)),
            Duration::from_secs(48)
        );
        assert_eq!(reuse_limit_for(ms(200)), ms(150));
        assert_eq!(reuse_limit_for(ms(250)), ms(200));
        assert_eq!(reuse_limit_for(ms(40)), Duration::ZERO);
        assert_eq!(reuse_limit_for(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn the_hint_sets_the_reuse_limit() {
        let mut e = IdleCloseEstimator::default();
        e.set_hint(Duration::from_secs(5));
        assert_eq!(e.reuse_limit(IDLE_TIMEOUT), Duration::from_secs(4));
    }

    #[test]
    fn the_reuse_limit_never_exceeds_our_idle_timeout() {
        let mut e = IdleCloseEstimator::default();
        e.set_hint(Duration::from_secs(600));
        assert_eq!(e.reuse_limit(IDLE_TIMEOUT), IDLE_TIMEOUT);
    }

    #[test]
    fn the_first_observed_idle_close_becomes_the_estimate() {
        let mut e = IdleCloseEstimator::default();
        e.observe_idle_close(ms(200));
        assert_eq!(e.learned(), Some(ms(200)));
        assert_eq!(e.reuse_limit(IDLE_TIMEOUT), ms(150));
    }

    #[test]
    fn an_earlier_close_lowers_the_estimate_at_once() {
        let mut e = IdleCloseEstimator::default();
        e.observe_idle_close(Duration::from_secs(20));
        e.observe_idle_close(Duration::from_secs(4));
        assert_eq!(e.learned(), Some(Duration::from_secs(4)));
    }

    #[test]
    fn a_later_close_raises_the_estimate_by_a_quarter_of_the_gap() {
        let mut e = IdleCloseEstimator::default();
        e.observe_idle_close(Duration::from_secs(4));
        e.observe_idle_close(Duration::from_secs(20));
        assert_eq!(e.learned(), Some(Duration::from_secs(8)));
    }

    #[test]
    fn survival_past_the_estimate_raises_it_slowly_and_finally_forgets_it() {
        let mut e = IdleCloseEstimator::default();
        e.observe_idle_close(Duration::from_secs(1));
        e.observe_survival(Duration::from_secs(60), IDLE_TIMEOUT);
        let raised = e.learned().expect("still an estimate after one survival");
        assert!(
            raised > Duration::from_secs(1) && raised < Duration::from_secs(60),
            "{raised:?}"
        );
        let mut survivals = 1;
        while e.learned().is_some() {
            survivals += 1;
            assert!(
                survivals <= 20,
                "the estimate is forgotten after enough survivals"
            );
            e.observe_survival(Duration::from_secs(60), IDLE_TIMEOUT);
        }
        assert!(
            survivals > 3,
            "one fluke is not forgotten at once: {survivals}"
        );
        assert_eq!(e.reuse_limit(IDLE_TIMEOUT), IDLE_TIMEOUT);
    }

    #[test]
    fn survival_shorter_than_the_estimate_changes_nothing() {
        let mut e = IdleCloseEstimator::default();
        e.observe_idle_close(Duration::from_secs(10));
        e.observe_survival(Duration::from_secs(3), IDLE_TIMEOUT);
        assert_eq!(e.learned(), Some(Duration::from_secs(10)));
    }

    #[test]
    fn the_hint_takes_precedence_over_a_later_learned_close() {
        let mut e = IdleCloseEstimator::default();
        e.observe_idle_close(Duration::from_secs(10));
        e.set_hint(Duration::from_secs(5));
        assert_eq!(e.close_after(), Some(Duration::from_secs(5)));
        assert_eq!(e.reuse_limit(IDLE_TIMEOUT), Duration::from_secs(4));
    }

    #[test]
    fn an_observed_close_earlier_than_the_hint_wins_over_the_hint() {
        let mut e = IdleCloseEstimator::default();
        e.set_hint(Duration::from_secs(5));
        e.observe_idle_close(Duration::from_secs(2));
        assert_eq!(e.close_after(), Some(Duration::from_secs(2)));
        assert_eq!(e.reuse_limit(IDLE_TIMEOUT), ms(1600));
    }
}
