//! HTTP/2 rapid reset (CVE-2023-44487): a client opens streams and cancels them at once, in a
//! loop. Cancelled streams do not count against `SETTINGS_MAX_CONCURRENT_STREAMS`, so the
//! stream limit alone does not bound the work: every stream that reached the request handler
//! may already have started a request to a target.
//!
//! Two layers bound it:
//! - h2 itself answers GOAWAY `ENHANCE_YOUR_CALM` when more than
//!   `max_pending_accept_reset_streams` streams were reset before the server even accepted them
//!   (the usual shape of the attack: HEADERS and RST_STREAM in one burst), see `http_builder`.
//! - [`StreamCancellations`] counts, per connection, the streams the client cancelled after the
//!   handler started (the handler future was dropped before it produced a response) against
//!   those that got a response. When cancellations pass [`CANCELLATION_ALLOWANCE`] and
//!   outnumber the answered streams, the connection is told to go away (GOAWAY, then closed
//!   after [`ABUSE_CLOSE_GRACE`]). Browsers cancel streams when a page is left, but not more
//!   of them than they had answered, and not hundreds.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// Cancelled streams a connection may have before the ratio to answered ones is looked at:
/// twice the concurrent stream limit, so a client that opened a full window of streams and
/// dropped them all (a page navigation) is not punished.
pub(super) const CANCELLATION_ALLOWANCE: u64 = 2 * super::HTTP2_MAX_CONCURRENT_STREAMS as u64;

/// After GOAWAY, how long an abusive connection may take to finish before it is closed.
pub(super) const ABUSE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Per-connection tally of cancelled and answered HTTP/2 streams.
#[derive(Debug, Default)]
pub(super) struct StreamCancellations {
    cancelled: AtomicU64,
    answered: AtomicU64,
    tripped: AtomicBool,
    notify: Notify,
}

impl StreamCancellations {
    /// The client cancelled a stream whose handler had started.
    pub(super) fn cancelled(&self) {
        let cancelled = self.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
        let answered = self.answered.load(Ordering::Relaxed);
        if cancelled > CANCELLATION_ALLOWANCE
            && cancelled > answered
            && !self.tripped.swap(true, Ordering::Relaxed)
        {
            self.notify.notify_one();
        }
    }

    /// A stream got its response head.
    pub(super) fn answered(&self) {
        self.answered.fetch_add(1, Ordering::Relaxed);
    }

    /// Resolves once the connection has been judged abusive.
    pub(super) async fn tripped(&self) {
        // notify_one stores a permit, so a trip before this is awaited is not lost.
        self.notify.notified().await;
    }

    /// Whether the connection has been judged abusive (its new streams are refused).
    pub(super) fn is_tripped(&self) -> bool {
        self.tripped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_cancellations_are_normal() {
        let t = StreamCancellations::default();
        for _ in 0..CANCELLATION_ALLOWANCE {
            t.cancelled();
        }
        assert!(!t.is_tripped());
    }

    #[test]
    fn cancelling_more_than_the_allowance_and_more_than_answered_trips() {
        let t = StreamCancellations::default();
        for _ in 0..=CANCELLATION_ALLOWANCE {
            t.cancelled();
        }
        assert!(t.is_tripped());
    }

    #[test]
    fn a_busy_connection_that_cancels_a_minority_is_fine() {
        let t = StreamCancellations::default();
        for _ in 0..10 * CANCELLATION_ALLOWANCE {
            t.answered();
        }
        for _ in 0..5 * CANCELLATION_ALLOWANCE {
            t.cancelled();
        }
        assert!(!t.is_tripped());
    }

    #[tokio::test]
    async fn the_trip_is_not_lost_when_nobody_waits_yet() {
        let t = StreamCancellations::default();
        for _ in 0..=CANCELLATION_ALLOWANCE {
            t.cancelled();
        }
        tokio::time::timeout(Duration::from_secs(5), t.tripped())
            .await
            .expect("the stored notification is seen");
    }
}
