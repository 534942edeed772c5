//! Pooled connections to one target, and the bookkeeping that keeps stale ones from being used.
//!
//! Per target the pool holds:
//! - idle HTTP/1.1 connections (reused newest first: the newest is the least likely to be
//!   closed by the target, and the older ones age out instead of being kept warm for nothing),
//! - at most one *probe*: a connection retired from reuse that is kept open, unused, to see when
//!   the target really closes idle connections, so a too-low estimate can rise again,
//! - one multiplexed HTTP/2 connection,
//! - the [`IdleCloseEstimator`] (Keep-Alive hint and learned idle-close time) and counters.
//!
//! A request that cannot be sent twice (a POST, or a body too large to keep for a retry) must
//! not race the target's idle close, because if it loses, nothing can be done but a 502. It only
//! reuses a connection whose idle time is proven safe: below the reuse limit when the target's
//! idle-close time is known (hint or learned), otherwise below [`reuse_limit_for`] of the longest
//! idle time a connection to this target was seen to survive (a reused connection that was
//! answered, one closed by our own idle timeout, a retired one still open). Before anything is
//! known it goes out on a new connection; retryable requests meanwhile reuse connections and so
//! teach the pool. This is what makes the first contact with a target that advertises nothing
//! free of 502s.
//!
//! Each connection has a driver task (see `client`) that runs hyper's connection future. The
//! driver asks the pool when the connection's idle deadline is ([`TargetPool::idle_deadline`]),
//! reports the deadline passing ([`TargetPool::on_idle_deadline`]) and the connection ending
//! ([`TargetPool::on_connection_ended`]). An idle connection that ends was closed by the target:
//! its idle time is an observation for the estimator.
//!
//! All state sits behind one short-lived `std::sync::Mutex` per target; nothing awaits under it.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::client::ProxyBody;

pub mod estimator;

pub use estimator::{IdleCloseEstimator, reuse_limit_for};

/// A snapshot of one target's pool, for tests, metrics and the admin API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetPoolStats {
    /// The target's address.
    pub target: SocketAddr,
    /// Whether connections to the target use TLS.
    pub tls: bool,
    /// Whether connections to the target use HTTP/2.
    pub http2: bool,
    /// The latest `Keep-Alive: timeout` the target advertised.
    pub keep_alive_hint: Option<Duration>,
    /// The idle-close time learned from idle connections the target closed.
    pub learned_idle_close: Option<Duration>,
    /// How long an idle connection to this target may currently be reused.
    pub reuse_limit: Duration,
    /// Idle HTTP/1.1 connections available for reuse now.
    pub idle_connections: usize,
    /// Requests sent on a pooled (reused) connection.
    pub reused: u64,
    /// Requests sent on a new connection (retries included).
    pub fresh: u64,
    /// Requests retried on a new connection after a pooled one failed (stale: the target had
    /// closed it, or reset it before answering).
    pub retried: u64,
    /// Idle connections we retired before the target's idle-close time.
    pub retired_early: u64,
    /// Idle pooled connections the target closed (each one an estimator observation).
    pub closed_by_target_while_idle: u64,
    /// Requests that could not be retried safely and went out on a new connection although an
    /// idle pooled one was there, because its idle time was not proven safe (see the module
    /// docs).
    pub unproven_reuse_avoided: u64,
    /// The longest idle time a connection to this target was seen to survive.
    pub longest_survived_idle: Option<Duration>,
}

impl TargetPoolStats {
    /// Adds `other`'s counters to these (the per-target values of the first are kept): totals
    /// over all targets for metrics.
    pub fn add_counters(&mut self, other: &TargetPoolStats) {
        let TargetPoolStats {
            reused,
            fresh,
            retried,
            retired_early,
            closed_by_target_while_idle,
            unproven_reuse_avoided,
            ..
        } = other;
        self.reused += reused;
        self.fresh += fresh;
        self.retried += retried;
        self.retired_early += retired_early;
        self.closed_by_target_while_idle += closed_by_target_while_idle;
        self.unproven_reuse_avoided += unproven_reuse_avoided;
    }
}

/// Identifies a connection within its pool.
pub type ConnId = u64;

/// State shared between a connection's driver task and the pool.
#[derive(Debug, Default)]
pub struct ConnShared {
    /// Wakes the driver when the connection's idle deadline may have changed.
    pub wake: Notify,
    /// Set (under the pool lock) once the driver has seen the connection end.
    ended: AtomicBool,
}

/// An HTTP/1.1 connection taken out of the pool (or new), ready for one request.
#[derive(Debug)]
pub struct H1Conn {
    /// The connection's id in its pool.
    pub id: ConnId,
    /// hyper's handle to send the request.
    pub sender: http1::SendRequest<ProxyBody>,
    /// Shared with the driver task.
    pub shared: Arc<ConnShared>,
}

/// A handle on a target's multiplexed HTTP/2 connection.
#[derive(Debug)]
pub struct H2Conn {
    /// The connection's id in its pool.
    pub id: ConnId,
    /// hyper's handle; clones share the connection.
    pub sender: http2::SendRequest<ProxyBody>,
}

/// What the driver should do after reporting a passed idle deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverAction {
    /// Keep driving the connection (ask for the next deadline).
    Keep,
    /// Close the connection: drop it.
    Close,
}

struct Idle {
    conn: H1Conn,
    since: Instant,
}

/// An HTTP/1.1 connection taken from the pool, with how long it had been idle.
#[derive(Debug)]
pub struct Reused {
    /// The connection.
    pub conn: H1Conn,
    /// How long it was idle before it was taken.
    pub idle_for: Duration,
}

#[derive(Default)]
struct Counters {
    reused: u64,
    fresh: u64,
    retried: u64,
    retired_early: u64,
    closed_by_target_while_idle: u64,
    unproven_reuse_avoided: u64,
}

#[derive(Default)]
struct PoolState {
    /// Reusable idle connections, oldest first.
    idle: Vec<Idle>,
    /// A retired connection kept open, unused, to observe when the target closes it.
    probe: Option<Idle>,
    h2: Option<H2Conn>,
    estimator: IdleCloseEstimator,
    /// The longest idle time a connection was seen to survive (see the module docs).
    survived: Option<Duration>,
    counters: Counters,
}

impl PoolState {
    fn survived(&mut self, idle_for: Duration) {
        self.survived = Some(self.survived.map_or(idle_for, |s| s.max(idle_for)));
    }

    /// How long an idle connection may be reused for a request that cannot be retried.
    fn unretryable_reuse_limit(&self, idle_timeout: Duration) -> Duration {
        let limit = self.estimator.reuse_limit(idle_timeout);
        if self.estimator.close_after().is_some() {
            return limit;
        }
        self.survived
            .map_or(Duration::ZERO, reuse_limit_for)
            .min(limit)
    }

    fn wake_idle_drivers(&self) {
        for idle in &self.idle {
            idle.conn.shared.wake.notify_one();
        }
    }
}

/// The pool of one target.
pub struct TargetPool {
    target: SocketAddr,
    tls: bool,
    http2: bool,
    idle_timeout: Duration,
    max_idle: usize,
    next_id: AtomicU64,
    state: Mutex<PoolState>,
}

impl std::fmt::Debug for TargetPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetPool")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl TargetPool {
    /// An empty pool. `idle_timeout` is the longest any connection sits idle; at most `max_idle`
    /// idle HTTP/1.1 connections are kept.
    pub fn new(
        target: SocketAddr,
        tls: bool,
        http2: bool,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Self {
        Self {
            target,
            tls,
            http2,
            idle_timeout,
            max_idle,
            next_id: AtomicU64::new(1),
            state: Mutex::new(PoolState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves plain data that is still consistent enough to
        // go on with (at worst a counter is off); never propagate the poison.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new id for a connection about to be made.
    pub fn next_id(&self) -> ConnId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes the newest idle HTTP/1.1 connection that is open, ready and younger than the reuse
    /// limit. Older or closed ones are left for their drivers, which retire them or report them
    /// closed (recording the observation). `retryable`: whether the request can be sent again
    /// if the connection turns out stale; if not, only a connection whose idle time is proven
    /// safe is taken (see the module docs).
    pub fn checkout_h1(&self, retryable: bool) -> Option<Reused> {
        let now = Instant::now();
        let mut st = self.lock();
        let limit = st.estimator.reuse_limit(self.idle_timeout);
        let usable = |idle: &Idle, limit: Duration| {
            now.saturating_duration_since(idle.since) < limit
                && !idle.conn.sender.is_closed()
                && idle.conn.sender.is_ready()
        };
        let pos = if retryable {
            st.idle.iter().rposition(|idle| usable(idle, limit))?
        } else {
            let safe = st.unretryable_reuse_limit(self.idle_timeout);
            match st.idle.iter().rposition(|idle| usable(idle, safe)) {
                Some(pos) => pos,
                None => {
                    if st.idle.iter().any(|idle| usable(idle, limit)) {
                        st.counters.unproven_reuse_avoided += 1;
                    }
                    return None;
                }
            }
        };
        let idle = st.idle.remove(pos);
        // Its driver must stop watching the idle deadline.
        idle.conn.shared.wake.notify_one();
        Some(Reused {
            idle_for: now.saturating_duration_since(idle.since),
            conn: idle.conn,
        })
    }

    /// A request on a connection reused after `idle_for` was answered: the target keeps idle
    /// connections open at least that long.
    pub fn observe_reuse_answered(&self, idle_for: Duration) {
        self.lock().survived(idle_for);
    }

    /// Puts an HTTP/1.1 connection back after its response completed (hyper says it is ready
    /// for another request). Starts its idle clock.
    pub fn checkin_h1(&self, conn: H1Conn) {
        let mut st = self.lock();
        if self.max_idle == 0
            || conn.shared.ended.load(Ordering::Acquire)
            || conn.sender.is_closed()
        {
            return;
        }
        if st.idle.len() >= self.max_idle {
            // Dropping the oldest closes it; its driver then finds it in no list.
            st.idle.remove(0);
        }
        conn.shared.wake.notify_one();
        st.idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// The target's HTTP/2 connection, if it is open and accepts requests.
    pub fn checkout_h2(&self) -> Option<H2Conn> {
        let mut st = self.lock();
        match &st.h2 {
            Some(h2) if h2.sender.is_ready() => Some(H2Conn {
                id: h2.id,
                sender: h2.sender.clone(),
            }),
            Some(_) => {
                st.h2 = None;
                None
            }
            None => None,
        }
    }

    /// Makes `conn` the target's HTTP/2 connection (replacing a dead or concurrent one).
    pub fn set_h2(&self, conn: &H2Conn) {
        self.lock().h2 = Some(H2Conn {
            id: conn.id,
            sender: conn.sender.clone(),
        });
    }

    /// When the driver of connection `id` should next report an idle deadline: the end of its
    /// reuse time while it is idle, the end of our idle timeout while it is the probe, never
    /// while it is in use.
    pub fn idle_deadline(&self, id: ConnId) -> Option<Instant> {
        let st = self.lock();
        if let Some(idle) = st.idle.iter().find(|idle| idle.conn.id == id) {
            return Some(idle.since + st.estimator.reuse_limit(self.idle_timeout));
        }
        st.probe
            .as_ref()
            .filter(|probe| probe.conn.id == id)
            .map(|probe| probe.since + self.idle_timeout)
    }

    /// The driver of connection `id` saw its idle deadline pass.
    pub fn on_idle_deadline(&self, id: ConnId) -> DriverAction {
        let now = Instant::now();
        let mut st = self.lock();
        let limit = st.estimator.reuse_limit(self.idle_timeout);
        if let Some(pos) = st.idle.iter().position(|idle| idle.conn.id == id) {
            if now.saturating_duration_since(st.idle[pos].since) < limit {
                return DriverAction::Keep;
            }
            let idle = st.idle.remove(pos);
            // Still open after this long: the target keeps idle connections at least this long.
            st.survived(now.saturating_duration_since(idle.since));
            if limit >= self.idle_timeout {
                // Our own idle timeout, not an early retirement.
                return DriverAction::Close;
            }
            st.counters.retired_early += 1;
            if st.probe.is_none() {
                st.probe = Some(idle);
                return DriverAction::Keep;
            }
            return DriverAction::Close;
        }
        let Some(probe) = st.probe.as_ref().filter(|probe| probe.conn.id == id) else {
            return DriverAction::Keep;
        };
        let idle_for = now.saturating_duration_since(probe.since);
        if idle_for < self.idle_timeout {
            return DriverAction::Keep;
        }
        st.probe = None;
        st.survived(idle_for);
        st.estimator.observe_survival(idle_for, self.idle_timeout);
        st.wake_idle_drivers();
        DriverAction::Close
    }

    /// The driver of connection `id` saw the connection end. If it was idle in the pool, the
    /// target closed it: record for how long it had been idle.
    pub fn on_connection_ended(&self, id: ConnId, shared: &ConnShared) {
        let now = Instant::now();
        let mut st = self.lock();
        shared.ended.store(true, Ordering::Release);
        let idle = if let Some(pos) = st.idle.iter().position(|idle| idle.conn.id == id) {
            Some(st.idle.remove(pos))
        } else if st.probe.as_ref().is_some_and(|probe| probe.conn.id == id) {
            st.probe.take()
        } else {
            None
        };
        if let Some(idle) = idle {
            st.counters.closed_by_target_while_idle += 1;
            st.estimator
                .observe_idle_close(now.saturating_duration_since(idle.since));
            st.wake_idle_drivers();
        }
        if st.h2.as_ref().is_some_and(|h2| h2.id == id) {
            st.h2 = None;
        }
    }

    /// Records the target's `Keep-Alive: timeout` from a response.
    pub fn set_keep_alive_hint(&self, hint: Duration) {
        let mut st = self.lock();
        if st.estimator.hint() != Some(hint) {
            st.estimator.set_hint(hint);
            st.wake_idle_drivers();
        }
    }

    /// Counts a request sent on a reused connection.
    pub fn count_reused(&self) {
        self.lock().counters.reused += 1;
    }

    /// Counts a request sent on a new connection.
    pub fn count_fresh(&self) {
        self.lock().counters.fresh += 1;
    }

    /// Counts a retry on a new connection.
    pub fn count_retried(&self) {
        self.lock().counters.retried += 1;
    }

    /// A snapshot of this pool.
    pub fn stats(&self) -> TargetPoolStats {
        let st = self.lock();
        let Counters {
            reused,
            fresh,
            retried,
            retired_early,
            closed_by_target_while_idle,
            unproven_reuse_avoided,
        } = st.counters;
        TargetPoolStats {
            target: self.target,
            tls: self.tls,
            http2: self.http2,
            keep_alive_hint: st.estimator.hint(),
            learned_idle_close: st.estimator.learned(),
            reuse_limit: st.estimator.reuse_limit(self.idle_timeout),
            idle_connections: st.idle.len(),
            reused,
            fresh,
            retried,
            retired_early,
            closed_by_target_while_idle,
            unproven_reuse_avoided,
            longest_survived_idle: st.survived,
        }
    }
}
