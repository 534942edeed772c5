//! [`ControlPlane`]: the registry behind a lock, with the channel that publishes its
//! snapshots and the timer that ends drains.
//!
//! Every write runs under the lock, then publishes a new snapshot if anything visible
//! changed. Subscribers hold a `watch` receiver: they always see the latest snapshot, never a
//! backlog, so a flapping check cannot queue up work (level-triggered, as a reconciler).
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
}

impl ControlPlane {
    /// Takes over `registry` and publishes its first snapshot.
    pub fn new(mut registry: Registry) -> Arc<Self> {
        let first = registry
            .publish(Instant::now())
            .unwrap_or_else(|| Arc::new(Snapshot::default()));
        let (tx, _) = watch::channel(first);
        Arc::new(Self {
            registry: Mutex::new(registry),
            tx,
            wake: Notify::new(),
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
        f(&self.lock(), Instant::now())
    }

    /// Changes the registry, then publishes what changed.
    pub fn write<T>(&self, f: impl FnOnce(&mut Registry, Instant) -> T) -> T {
        let now = Instant::now();
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
                let now = Instant::now();
                let mut reg = self.lock();
                reg.tick(now);
                if let Some(snapshot) = reg.publish(now) {
                    self.tx.send_replace(snapshot);
                }
                reg.next_deadline(now)
            };
            match next {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at.into()) => {}
                        () = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }
}
