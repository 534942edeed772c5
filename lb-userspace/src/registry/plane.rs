//! [`ControlPlane`]: the registry behind a lock, with the channel that publishes its
//! snapshots and the timer that ends drains.
//!
//! Every write runs under the lock, then publishes a new snapshot if anything visible
//! changed. Subscribers hold a `watch` receiver: they always see the latest snapshot, never a
//! backlog, so a flapping check cannot queue up work (level-triggered, as a reconciler).
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tokio::sync::{Notify, watch};

use super::{Registry, Snapshot};

/// The registry and its publisher (see the module docs).
#[derive(Debug)]
pub struct ControlPlane {
    registry: Mutex<Registry>,
    tx: watch::Sender<Arc<Snapshot>>,
    /// Woken on every write, so the timer recomputes its next deadline.
    wake: Notify,
    /// Timer turns begun because a deadline passed / because a write woke the timer.
    woken_by_deadline: AtomicU64,
    woken_by_write: AtomicU64,
}

/// The registry's clock. tokio's: the same as `Instant::now()` in a running `lb`, and driven
/// by the test when a test pauses time, so the timer's races can be played out exactly.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl ControlPlane {
    /// Takes over `registry` and publishes its first snapshot.
    pub fn new(mut registry: Registry) -> Arc<Self> {
        let first = registry
            .publish(now())
            .unwrap_or_else(|| Arc::new(Snapshot::default()));
        let (tx, _) = watch::channel(first);
        Arc::new(Self {
            registry: Mutex::new(registry),
            tx,
            wake: Notify::new(),
            woken_by_deadline: AtomicU64::new(0),
            woken_by_write: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // Registry methods do not panic midway; the data stays consistent.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A receiver of every snapshot from now on (it holds the current one).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Reads the registry.
    pub fn read<T>(&self, f: impl FnOnce(&Registry, Instant) -> T) -> T {
        f(&self.lock(), now())
    }

    /// Changes the registry, then publishes what changed.
    pub fn write<T>(&self, f: impl FnOnce(&mut Registry, Instant) -> T) -> T {
        let now = now();
        let mut reg = self.lock();
        let out = f(&mut reg, now);
        if let Some(snapshot) = reg.publish(now) {
            self.tx.send_replace(snapshot);
        }
        drop(reg);
        self.wake.notify_one();
        out
    }

    /// Ends drains, unhealthy-draining intervals and slow-start ramps when they are due.
    /// Runs until the task is dropped.
    pub async fn run_timers(self: Arc<Self>) {
        loop {
            // Whatever is due is ended on every turn, however the task was woken: a write's
            // wake-up can win the race against a deadline that has just passed, and
            // `next_deadline` no longer names a deadline in the past, so a tick only on the
            // sleep's branch could be skipped until some unrelated change (an
            // unhealthy-draining target kept its flows long after its interval).
            let next = {
                let now = now();
                let mut reg = self.lock();
                reg.tick(now);
                if let Some(snapshot) = reg.publish(now) {
                    self.tx.send_replace(snapshot);
                }
                reg.next_deadline(now)
            };
            // A write first when both are ready: that is the order the race above needs, so
            // every run takes it and the tests can play it out.
            let by_write = match next {
                Some(at) => {
                    tokio::select! {
                        biased;
                        () = self.wake.notified() => true,
                        () = tokio::time::sleep_until(at.into()) => false,
                    }
                }
                None => {
                    self.wake.notified().await;
                    true
                }
            };
            let counter = if by_write {
                &self.woken_by_write
            } else {
                &self.woken_by_deadline
            };
            counter.fetch_add(1, Relaxed);
        }
    }

    /// How often the timer task was woken by a passed deadline and by a write, so far.
    pub fn timer_wakes(&self) -> (u64, u64) {
        (
            self.woken_by_deadline.load(Relaxed),
            self.woken_by_write.load(Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::future::Future;
    use std::net::SocketAddr;
    use std::pin::{Pin, pin};
    use std::task::{Context, Waker};
    use std::time::Duration;

    use super::*;
    use crate::targets::parse_target_group;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 80))
    }

    /// Polls the timer task's future once, by hand.
    fn turn(timer: Pin<&mut impl Future<Output = ()>>) {
        let mut cx = Context::from_waker(Waker::noop());
        assert!(timer.poll(&mut cx).is_pending(), "the timer never ends");
    }

    fn targets(plane: &ControlPlane) -> Vec<SocketAddr> {
        plane.current().groups["web"]
            .targets
            .iter()
            .map(|t| t.addr())
            .collect()
    }

    /// Group `web` (10 s deregistration delay, used by a rule) with targets 1 and 2.
    fn web_with_two_targets() -> Arc<ControlPlane> {
        let mut r = Registry::new();
        r.create_group(parse_target_group("web,deregistration-delay=10").unwrap())
            .unwrap();
        r.set_rule_users(&BTreeMap::from([("web".to_owned(), 1)]));
        r.register("web", &[(addr(1), 1), (addr(2), 1)]).unwrap();
        ControlPlane::new(r)
    }

    /// A write that wakes the timer after a drain's deadline has passed, but before the
    /// timer's own sleep fired, must still end the drain. (It once did not: the turn after a
    /// write only looked for deadlines still ahead, so the drain lasted until some unrelated
    /// change.) The timer future is polled by hand, so the interleaving is exact.
    #[tokio::test(start_paused = true)]
    async fn a_drain_ends_when_a_write_wakes_the_timer_after_the_deadline() {
        let plane = web_with_two_targets();
        let mut timer = pin!(plane.clone().run_timers());
        turn(timer.as_mut());
        assert_eq!(
            plane.timer_wakes(),
            (0, 0),
            "nothing timed yet: waiting for a write"
        );

        plane
            .write(|r, now| r.deregister("web", &[addr(2)], now))
            .unwrap();
        turn(timer.as_mut());
        assert_eq!(plane.timer_wakes(), (0, 1));
        assert_eq!(targets(&plane), [addr(1), addr(2)], "draining for 10 s");

        // The deadline passes; the timer's sleep is due, but the timer is not polled yet.
        tokio::time::advance(Duration::from_secs(11)).await;
        // An unrelated write lands now: it wakes the timer too.
        plane
            .write(|r, _| r.register("web", &[(addr(3), 1)]))
            .unwrap();
        turn(timer.as_mut());

        // The race happened as described: the write's wake-up, not the deadline, began the turn.
        assert_eq!(plane.timer_wakes(), (0, 2));
        assert_eq!(
            targets(&plane),
            [addr(1), addr(3)],
            "the drain ended in the turn the write began"
        );
    }

    /// The same drain with no write in between ends by the deadline: the positive control
    /// for the counters and the snapshot the test above reads.
    #[tokio::test(start_paused = true)]
    async fn a_drain_ends_at_its_deadline_without_any_write() {
        let plane = web_with_two_targets();
        let timer = tokio::spawn(plane.clone().run_timers());
        let mut rx = plane.subscribe();
        plane
            .write(|r, now| r.deregister("web", &[addr(2)], now))
            .unwrap();
        rx.borrow_and_update();
        // Paused time advances by itself to the timer's deadline once every task waits.
        tokio::time::timeout(Duration::from_secs(60), rx.changed())
            .await
            .expect("the drain ended within 60 s")
            .unwrap();
        assert_eq!(targets(&plane), [addr(1)]);
        assert_eq!(plane.timer_wakes().0, 1, "one turn began at the deadline");
        timer.abort();
    }
}
