//! An idle timer whose deadline moves later with every bit of activity, kept without a
//! timer-wheel update per activity.
//!
//! Resetting a tokio [`Sleep`] each time a request or a read moves the deadline costs a
//! timer-wheel removal and insertion every time. Instead the timer stays armed at some instant
//! at or before the real deadline; when it fires, the real deadline is worked out, and the
//! timer is set to it if that is still ahead. So it expires exactly when the deadline passes,
//! and is touched about once per idle period. Used by the sniffer (client connections) and the
//! client to targets (pooled connections).
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// Polls `timer` for an idle deadline that is never earlier than the instant `timer` is armed
/// for. `deadline` is asked only when the timer fires: `Ready` when that deadline has passed,
/// else the timer is set to it and `Pending` (with the waker registered).
pub(crate) fn poll_idle_deadline(
    mut timer: Pin<&mut Sleep>,
    cx: &mut Context<'_>,
    deadline: impl Fn() -> Instant,
) -> Poll<()> {
    while timer.as_mut().poll(cx).is_ready() {
        let deadline = deadline();
        if timer.deadline() >= deadline {
            return Poll::Ready(());
        }
        timer.as_mut().reset(deadline);
    }
    Poll::Pending
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;
    use std::time::Duration;

    fn poll(timer: Pin<&mut Sleep>, deadline: Instant) -> Poll<()> {
        poll_idle_deadline(timer, &mut Context::from_waker(Waker::noop()), || deadline)
    }

    /// A timer armed early is moved on to the real deadline, and expires there, not before
    /// (tokio's clock paused and advanced by hand).
    #[tokio::test(start_paused = true)]
    async fn an_early_timer_is_moved_on_and_expires_at_the_real_deadline() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let timer = tokio::time::sleep_until(at(1_000));
        tokio::pin!(timer);
        // The timer fires at 1 s; the deadline is 10 s: not expired, the timer moved there.
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert!(
            poll(timer.as_mut(), at(10_000)).is_pending(),
            "expired at 1.5 s of 10"
        );
        assert_eq!(timer.deadline(), at(10_000));
        // Activity moves the deadline to 12 s; the timer stays at 10 s until it fires.
        tokio::time::advance(Duration::from_millis(8_000)).await;
        assert!(
            poll(timer.as_mut(), at(12_000)).is_pending(),
            "expired at 9.5 s"
        );
        assert_eq!(timer.deadline(), at(10_000), "moved before it fired");
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert!(
            poll(timer.as_mut(), at(12_000)).is_pending(),
            "expired at 11 s of 12"
        );
        assert_eq!(timer.deadline(), at(12_000));
        tokio::time::advance(Duration::from_millis(900)).await;
        assert!(
            poll(timer.as_mut(), at(12_000)).is_pending(),
            "expired at 11.9 s of 12"
        );
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(
            poll(timer.as_mut(), at(12_000)).is_ready(),
            "not expired at 12.5 s of 12"
        );
    }

    /// The positive control of the test above: a timer armed for the deadline expires when it
    /// fires.
    #[tokio::test(start_paused = true)]
    async fn a_timer_armed_for_the_deadline_expires_when_it_fires() {
        let deadline = Instant::now() + Duration::from_secs(1);
        let timer = tokio::time::sleep_until(deadline);
        tokio::pin!(timer);
        assert!(poll(timer.as_mut(), deadline).is_pending());
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert!(poll(timer.as_mut(), deadline).is_ready());
    }
}
