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
//! Connections of our own HTTP/1.1 client (plain-TCP targets, `client::h1`) have no driver
//! task. While they are idle, one sweeper task per pool watches them all: each idle socket has
//! the sweeper's waker registered for readability, so the sweeper runs only when the target
//! closes one (the same observation as above) or at the next idle deadline, where it applies
//! the same retirement, probe and idle-timeout rules. Taking one from the pool checks it for a
//! pending close, without a syscall unless its socket was reported readable.
//!
//! All state sits behind one short-lived `std::sync::Mutex` per target; nothing awaits under it.
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use hyper::client::conn::{http1, http2};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::client::ProxyBody;

std::thread_local! {
    /// The L7 worker this thread is (see `proxy::server`'s worker layout); 0 on every other
    /// thread (the main runtime, tests).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The L7 worker the calling thread runs: its index among the per-worker runtimes, 0 on any
/// other thread. Picks the shard of each target's pool ([`crate::proxy::client::Forwarder`]).
pub fn current_worker() -> usize {
    WORKER.with(std::cell::Cell::get)
}

/// Marks the calling thread as L7 worker `index` (called once, as the worker thread starts).
pub(crate) fn set_current_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

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
    /// Pooled connections (our own HTTP/1.1 client's, hyper's HTTP/1.1 ones, the HTTP/2
    /// connection) taken for a request by another L7 worker than the one whose shard of the
    /// pool holds them (the worker that connected them: its
    /// socket's readiness is delivered to that worker's thread). Per-worker pools keep this
    /// at 0.
    pub foreign_worker_reuse: u64,
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
            foreign_worker_reuse,
            ..
        } = other;
        self.reused += reused;
        self.fresh += fresh;
        self.retried += retried;
        self.retired_early += retired_early;
        self.closed_by_target_while_idle += closed_by_target_while_idle;
        self.unproven_reuse_avoided += unproven_reuse_avoided;
        self.foreign_worker_reuse += foreign_worker_reuse;
    }

    /// Merges `other`, the same target's pool on another L7 worker, into these: counters and
    /// idle connections add up; the estimates take the most cautious value (the shortest
    /// learned idle-close time and reuse limit, the longest survival seen); the hint is the
    /// first shard's that has one (every shard hears the same target).
    pub fn merge_shard(&mut self, other: &TargetPoolStats) {
        self.add_counters(other);
        self.idle_connections += other.idle_connections;
        self.keep_alive_hint = self.keep_alive_hint.or(other.keep_alive_hint);
        self.learned_idle_close = match (self.learned_idle_close, other.learned_idle_close) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.reuse_limit = self.reuse_limit.min(other.reuse_limit);
        self.longest_survived_idle = self.longest_survived_idle.max(other.longest_survived_idle);
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

/// An idle HTTP/1.1 connection: run by hyper (TLS targets, upgrades) or by our own client
/// (plain-TCP targets, see `client::h1`).
enum Pooled {
    Hyper(H1Conn),
    Raw(Box<RawConn>),
}

impl Pooled {
    fn id(&self) -> ConnId {
        match self {
            Pooled::Hyper(conn) => conn.id,
            Pooled::Raw(conn) => conn.id,
        }
    }

    /// Tells a hyper connection's driver to look at its idle deadline again (raw connections
    /// are watched by the pool's sweeper instead).
    fn wake_driver(&self) {
        if let Pooled::Hyper(conn) = self {
            conn.shared.wake.notify_one();
        }
    }
}

struct Idle {
    conn: Pooled,
    since: Instant,
}

/// A plain-TCP HTTP/1.1 connection run by our own client (`client::h1`), between requests.
///
/// Boxed once when connected (`Box<RawConn>`) and handed around as the box for its whole life:
/// it goes from the idle list to the forward, the send, the response body and back on every
/// request, and by value its 120-odd bytes were copied into each of those places (the idle
/// list's slot, the send's future, the body) per request.
#[derive(Debug)]
pub struct RawConn {
    /// The connection's id in its pool.
    pub id: ConnId,
    /// The socket.
    pub stream: TcpStream,
    /// Bytes read from the target and not consumed yet (empty between requests).
    pub buf: BytesMut,
    /// The idle timer of its requests (see `client::h1::send`), made on the first one and
    /// kept. While the connection sits idle it may still fire once, at a past request's
    /// deadline, and wake that request's task for nothing (at most one stale wake-up per idle
    /// connection).
    pub timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// The header names of the target's previous response head, used again
    /// (`proxy::names`).
    pub names: crate::proxy::names::HeaderNames,
}

/// What a look at an idle raw connection found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Liveness {
    /// Nothing to read: usable as far as we can tell.
    Open,
    /// The target closed or reset it, or sent something unasked (it is closing it).
    Closed,
}

/// Whether an idle raw connection is still open, without a syscall unless the socket has been
/// reported readable. `cx`'s waker is registered for the next readability event (the sweeper's
/// while the connection sits in the pool).
fn liveness(stream: &TcpStream, cx: &mut Context<'_>) -> Liveness {
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    match stream.poll_peek(cx, &mut buf) {
        Poll::Pending => Liveness::Open,
        // EOF, bytes nobody asked for (typically a 408 before the close), or an error.
        Poll::Ready(_) => Liveness::Closed,
    }
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
    foreign_worker_reuse: u64,
}

#[derive(Default)]
struct PoolState {
    /// Reusable idle connections, oldest first (pushed at the back, each `since` the time of
    /// its push): a full pool drops its oldest from the front without moving the rest.
    idle: VecDeque<Idle>,
    /// A retired connection kept open, unused, to observe when the target closes it.
    probe: Option<Idle>,
    h2: Option<H2Conn>,
    estimator: IdleCloseEstimator,
    /// The longest idle time a connection was seen to survive (see the module docs).
    survived: Option<Duration>,
    counters: Counters,
    /// The waker of the task that watches idle raw connections (see [`sweep`]), once it runs.
    sweeper: Option<Waker>,
    sweeper_started: bool,
}

impl PoolState {
    fn survived(&mut self, idle_for: Duration) {
        self.survived = Some(self.survived.map_or(idle_for, |s| s.max(idle_for)));
    }

    /// The idle connection a request should take (the most recently used of those `kind`
    /// accepts), by the reuse rules: under the estimated reuse limit when the request can be
    /// retried, under the proven-safe limit when it cannot (counting a connection avoided for
    /// that reason). The caller removes it from `idle`. With the position, how long it has
    /// been idle (the one clock subtraction: the caller reports it too).
    fn pick(
        &mut self,
        now: Instant,
        retryable: bool,
        idle_timeout: Duration,
        kind: impl Fn(&Pooled) -> bool,
    ) -> Option<(usize, Duration)> {
        let limit = self.estimator.reuse_limit(idle_timeout);
        // The newest connection `kind` accepts is the youngest: if it is idle too long, so is
        // every older one, and the walk stops there instead of ageing the whole pool (up to
        // `max_idle` clock subtractions per request when nothing may be reused).
        let (pos, newest) = self
            .idle
            .iter()
            .enumerate()
            .rev()
            .find(|(_, idle)| kind(&idle.conn))?;
        let idle_for = now.saturating_duration_since(newest.since);
        if idle_for >= limit {
            return None;
        }
        if retryable || idle_for < self.unretryable_reuse_limit(idle_timeout) {
            return Some((pos, idle_for));
        }
        self.counters.unproven_reuse_avoided += 1;
        None
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
            idle.conn.wake_driver();
        }
        if let Some(sweeper) = &self.sweeper {
            sweeper.wake_by_ref();
        }
    }

    /// An idle or probe connection the target closed: record for how long it had been idle.
    fn closed_by_target(&mut self, id: ConnId, now: Instant) {
        let idle = if let Some(pos) = self.idle.iter().position(|idle| idle.conn.id() == id) {
            Some(
                self.idle
                    .remove(pos)
                    .expect("a position found in `idle` under the same lock"),
            )
        } else if self
            .probe
            .as_ref()
            .is_some_and(|probe| probe.conn.id() == id)
        {
            self.probe.take()
        } else {
            None
        };
        if let Some(idle) = idle {
            self.counters.closed_by_target_while_idle += 1;
            self.estimator
                .observe_idle_close(now.saturating_duration_since(idle.since));
            self.wake_idle_drivers();
        }
    }

    /// The idle deadline of connection `id` passed (see [`TargetPool::on_idle_deadline`]).
    fn idle_deadline_passed(
        &mut self,
        id: ConnId,
        now: Instant,
        idle_timeout: Duration,
    ) -> DriverAction {
        let limit = self.estimator.reuse_limit(idle_timeout);
        if let Some(pos) = self.idle.iter().position(|idle| idle.conn.id() == id) {
            if now.saturating_duration_since(self.idle[pos].since) < limit {
                return DriverAction::Keep;
            }
            let idle = self
                .idle
                .remove(pos)
                .expect("a position found in `idle` under the same lock");
            // Still open after this long: the target keeps idle connections at least this long.
            self.survived(now.saturating_duration_since(idle.since));
            if limit >= idle_timeout {
                // Our own idle timeout, not an early retirement.
                return DriverAction::Close;
            }
            self.counters.retired_early += 1;
            if self.probe.is_none() {
                self.probe = Some(idle);
                return DriverAction::Keep;
            }
            return DriverAction::Close;
        }
        let Some(probe) = self.probe.as_ref().filter(|probe| probe.conn.id() == id) else {
            return DriverAction::Keep;
        };
        let idle_for = now.saturating_duration_since(probe.since);
        if idle_for < idle_timeout {
            return DriverAction::Keep;
        }
        self.probe = None;
        self.survived(idle_for);
        self.estimator.observe_survival(idle_for, idle_timeout);
        self.wake_idle_drivers();
        DriverAction::Close
    }
}

/// The pool of one target.
pub struct TargetPool {
    target: SocketAddr,
    tls: bool,
    http2: bool,
    idle_timeout: Duration,
    max_idle: usize,
    /// The L7 worker whose shard this is ([`current_worker`]): connections in it were connected
    /// by that worker, their sockets registered with its reactor. `None` for a target's only
    /// pool (the shared runtime), which every thread uses: nothing to count, and no
    /// thread-local read per checkout.
    worker: Option<usize>,
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
            worker: None,
            next_id: AtomicU64::new(1),
            state: Mutex::new(PoolState::default()),
        }
    }

    /// The pool as worker `worker`'s shard of a target's pool (one of several).
    pub fn for_worker(mut self, worker: usize) -> Self {
        self.worker = Some(worker);
        self
    }

    /// Counts a checkout by another worker than the one whose shard this is
    /// ([`TargetPoolStats::foreign_worker_reuse`]).
    fn note_checkout(&self, st: &mut PoolState) {
        if self.worker.is_some_and(|worker| worker != current_worker()) {
            st.counters.foreign_worker_reuse += 1;
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
        let (pos, idle_for) = st.pick(now, retryable, self.idle_timeout, |conn| {
            matches!(conn, Pooled::Hyper(conn) if !conn.sender.is_closed() && conn.sender.is_ready())
        })?;
        let idle = st
            .idle
            .remove(pos)
            .expect("a position found in `idle` under the same lock");
        // Its driver must stop watching the idle deadline.
        idle.conn.wake_driver();
        let Pooled::Hyper(conn) = idle.conn else {
            unreachable!("`pick` only accepts hyper connections here")
        };
        self.note_checkout(&mut st);
        Some(Reused { idle_for, conn })
    }

    /// [`Self::checkout_h1`] for raw connections (plain-TCP targets, our own HTTP/1.1 client).
    /// A candidate the target has closed meanwhile (EOF or bytes waiting on the socket) is
    /// discarded and recorded as closed by the target, and the next one is tried.
    pub fn checkout_raw(&self, retryable: bool) -> Option<(Box<RawConn>, Duration)> {
        let now = Instant::now();
        let mut st = self.lock();
        loop {
            let (pos, idle_for) = st.pick(now, retryable, self.idle_timeout, |conn| {
                matches!(conn, Pooled::Raw(_))
            })?;
            let Pooled::Raw(conn) = &st.idle[pos].conn else {
                unreachable!("`pick` only accepts raw connections here")
            };
            let mut cx = Context::from_waker(Waker::noop());
            if liveness(&conn.stream, &mut cx) == Liveness::Closed {
                let id = conn.id;
                st.closed_by_target(id, now);
                continue;
            }
            let idle = st
                .idle
                .remove(pos)
                .expect("a position found in `idle` under the same lock");
            let Pooled::Raw(conn) = idle.conn else {
                unreachable!("checked above")
            };
            self.note_checkout(&mut st);
            return Some((conn, idle_for));
        }
    }

    /// Puts a raw connection back after its response was read completely. Starts its idle
    /// clock; from now on the pool's sweeper task is woken if the target closes it.
    pub fn checkin_raw(self: &Arc<Self>, conn: Box<RawConn>) {
        let mut st = self.lock();
        if self.max_idle == 0 || !conn.buf.is_empty() {
            return;
        }
        let waker = st.sweeper.clone().unwrap_or_else(|| Waker::noop().clone());
        if liveness(&conn.stream, &mut Context::from_waker(&waker)) == Liveness::Closed {
            return;
        }
        if st.idle.len() >= self.max_idle {
            // Dropping the oldest closes it.
            st.idle.pop_front();
        }
        st.idle.push_back(Idle {
            conn: Pooled::Raw(conn),
            since: Instant::now(),
        });
        if !st.sweeper_started
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            st.sweeper_started = true;
            runtime.spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// One pass of the sweeper over the idle raw connections: drops those the target closed
    /// (an estimator observation each), applies the idle deadlines (retirement, probe, our
    /// idle timeout) and returns when to look again.
    fn sweep_once(&self, cx: &mut Context<'_>) -> Instant {
        let now = Instant::now();
        let mut st = self.lock();
        if !st.sweeper.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.sweeper = Some(cx.waker().clone());
        }
        let closed: Vec<ConnId> = st
            .idle
            .iter()
            .chain(st.probe.as_ref())
            .filter_map(|idle| match &idle.conn {
                Pooled::Raw(conn) if liveness(&conn.stream, cx) == Liveness::Closed => {
                    Some(conn.id)
                }
                _ => None,
            })
            .collect();
        for id in closed {
            st.closed_by_target(id, now);
        }
        let limit = st.estimator.reuse_limit(self.idle_timeout);
        let due: Vec<ConnId> =
            st.idle
                .iter()
                .filter(|idle| now.saturating_duration_since(idle.since) >= limit)
                .chain(st.probe.as_ref().filter(|probe| {
                    now.saturating_duration_since(probe.since) >= self.idle_timeout
                }))
                .filter(|idle| matches!(idle.conn, Pooled::Raw(_)))
                .map(|idle| idle.conn.id())
                .collect();
        for id in due {
            // `Close`: the connection was removed and is dropped (closed) here; `Keep`: it
            // became the probe.
            st.idle_deadline_passed(id, now, self.idle_timeout);
        }
        let limit = st.estimator.reuse_limit(self.idle_timeout);
        let mut next = now + limit.max(Duration::from_secs(1));
        for idle in &st.idle {
            if matches!(idle.conn, Pooled::Raw(_)) {
                next = next.min(idle.since + limit);
                break;
            }
        }
        if let Some(probe) = &st.probe
            && matches!(probe.conn, Pooled::Raw(_))
        {
            next = next.min(probe.since + self.idle_timeout);
        }
        next
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
            st.idle.pop_front();
        }
        conn.shared.wake.notify_one();
        st.idle.push_back(Idle {
            conn: Pooled::Hyper(conn),
            since: Instant::now(),
        });
    }

    /// The target's HTTP/2 connection, if it is open and accepts requests.
    pub fn checkout_h2(&self) -> Option<H2Conn> {
        let mut st = self.lock();
        match &st.h2 {
            Some(h2) if h2.sender.is_ready() => {
                let conn = H2Conn {
                    id: h2.id,
                    sender: h2.sender.clone(),
                };
                self.note_checkout(&mut st);
                Some(conn)
            }
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
        if let Some(idle) = st.idle.iter().find(|idle| idle.conn.id() == id) {
            return Some(idle.since + st.estimator.reuse_limit(self.idle_timeout));
        }
        st.probe
            .as_ref()
            .filter(|probe| probe.conn.id() == id)
            .map(|probe| probe.since + self.idle_timeout)
    }

    /// The driver of connection `id` saw its idle deadline pass.
    pub fn on_idle_deadline(&self, id: ConnId) -> DriverAction {
        let now = Instant::now();
        self.lock().idle_deadline_passed(id, now, self.idle_timeout)
    }

    /// The driver of connection `id` saw the connection end. If it was idle in the pool, the
    /// target closed it: record for how long it had been idle.
    pub fn on_connection_ended(&self, id: ConnId, shared: &ConnShared) {
        let now = Instant::now();
        let mut st = self.lock();
        shared.ended.store(true, Ordering::Release);
        st.closed_by_target(id, now);
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
            foreign_worker_reuse,
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
            foreign_worker_reuse,
        }
    }
}

/// The task that watches a pool's idle raw connections: woken when one of them becomes
/// readable (the target closed it) and at the next idle deadline. It ends with the pool.
async fn sweep(pool: std::sync::Weak<TargetPool>) {
    let mut sleep = Box::pin(tokio::time::sleep(Duration::ZERO));
    std::future::poll_fn(|cx| {
        loop {
            let Some(pool) = pool.upgrade() else {
                return Poll::Ready(());
            };
            let next = pool.sweep_once(cx);
            sleep.as_mut().reset(next);
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain-TCP HTTP/1.1 target's pool (60 s idle timeout) holding at most `max_idle`.
    fn plain_pool(max_idle: usize) -> Arc<TargetPool> {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        Arc::new(TargetPool::new(
            addr,
            false,
            false,
            Duration::from_secs(60),
            max_idle,
        ))
    }

    /// `n` raw connections to a local listener (kept open by the returned peers).
    async fn raw_conns(pool: &TargetPool, n: usize) -> (Vec<Box<RawConn>>, Vec<TcpStream>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mut conns, mut peers) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let stream = TcpStream::connect(addr).await.unwrap();
            peers.push(listener.accept().await.unwrap().0);
            conns.push(Box::new(RawConn {
                id: pool.next_id(),
                stream,
                buf: BytesMut::new(),
                timer: None,
                names: crate::proxy::names::HeaderNames::new(),
            }));
        }
        (conns, peers)
    }

    /// A full pool drops its oldest connection for a new one, and requests take the newest
    /// first: checked through the ids that come back out.
    #[tokio::test]
    async fn a_full_pool_drops_its_oldest_and_hands_out_the_newest_first() {
        let pool = plain_pool(3);
        let (conns, _peers) = raw_conns(&pool, 4).await;
        let ids: Vec<ConnId> = conns.iter().map(|c| c.id).collect();
        for conn in conns {
            pool.checkin_raw(conn);
        }
        assert_eq!(pool.stats().idle_connections, 3, "max_idle holds");
        let out: Vec<ConnId> =
            std::iter::from_fn(|| pool.checkout_raw(true).map(|(c, _)| c.id)).collect();
        assert_eq!(
            out,
            vec![ids[3], ids[2], ids[1]],
            "newest first, the oldest dropped"
        );
    }

    /// A request that cannot be retried takes no connection before the pool has proof that
    /// the target keeps idle connections (and counts the connection it avoided); a retryable
    /// one takes the newest. The control for the early stop in `pick`.
    #[tokio::test]
    async fn an_unretryable_request_avoids_unproven_connections_and_counts_it() {
        let pool = plain_pool(8);
        let (conns, _peers) = raw_conns(&pool, 2).await;
        let newest = conns[1].id;
        for conn in conns {
            pool.checkin_raw(conn);
        }
        assert!(pool.checkout_raw(false).is_none(), "nothing proven yet");
        assert_eq!(pool.stats().unproven_reuse_avoided, 1);
        let (conn, _) = pool.checkout_raw(true).expect("a retryable request reuses");
        assert_eq!(conn.id, newest);
        // Proof that the target keeps connections idle for a minute: now it may reuse.
        pool.lock().survived(Duration::from_secs(60));
        assert!(pool.checkout_raw(false).is_some(), "proven safe");
    }

    /// A hyper HTTP/1.1 connection (as a TLS target's, `checkout_h1`'s kind) over an in-memory
    /// pipe, ready for a request; the pipe's other end is returned to keep it open.
    async fn hyper_conn(pool: &TargetPool) -> (H1Conn, tokio::io::DuplexStream) {
        let (client, server) = tokio::io::duplex(1024);
        let (mut sender, conn) =
            http1::handshake::<_, ProxyBody>(hyper_util::rt::TokioIo::new(client))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender.ready().await.unwrap();
        let shared = Arc::new(ConnShared::default());
        let id = pool.next_id();
        (H1Conn { id, sender, shared }, server)
    }

    /// `checkout_h1` counts a checkout of a worker's shard by another worker (the positive
    /// control: worker 0 takes shard 1's connection) and none by the shard's own worker, nor
    /// any by a pool that is no worker's shard.
    #[tokio::test]
    async fn checkout_h1_counts_a_checkout_by_another_worker_only() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let shard = TargetPool::new(addr, true, false, Duration::from_secs(60), 8).for_worker(1);
        let whole = TargetPool::new(addr, true, false, Duration::from_secs(60), 8);
        let mut peers = Vec::new();
        for (pool, worker, want) in [
            (&shard, 0, 1),
            (&shard, 1, 1),
            (&shard, 0, 2),
            (&shard, 1, 2),
            (&whole, 1, 0),
        ] {
            set_current_worker(worker);
            let (conn, peer) = hyper_conn(pool).await;
            peers.push(peer);
            let id = conn.id;
            pool.checkin_h1(conn);
            let reused = pool.checkout_h1(true).expect("the idle connection");
            assert_eq!(reused.conn.id, id);
            assert_eq!(
                pool.stats().foreign_worker_reuse,
                want,
                "after a checkout by worker {worker}"
            );
        }
        set_current_worker(0);
    }
}
