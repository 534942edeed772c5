//! The L7 tier's counters: plain atomics owned by the listener, the target group and the
//! target they count, so recording a request takes no lock and no lookup (`Relaxed` adds on
//! cells the request already holds). Each is fed only from a request's [`Record`], once.
//!
//! The counters every forwarded request adds to are kept once per recording thread
//! ([`PerThread`]) and summed when read: a thread that records (an L7 worker) owns a copy
//! while it lives, and only it writes that copy, with a plain load and store, where a shared
//! atomic add is a `lock`-prefixed instruction on a line both workers write (12 of them a
//! request).
use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::accesslog::{ActionKind, LbError, Record};
use crate::proxy::desync::Tier;

/// Upper bounds (seconds) of TargetResponseTime's buckets; a last one is +Inf.
pub const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0,
];

/// Rules evaluated per request that LCUs do not charge (ALB: the first 10).
pub const FREE_RULE_EVALUATIONS: u32 = 10;

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Copies of a [`PerThread`] cell: a thread that records owns one of copies 1.. while it
/// lives (the L7 workers, which live as long as the tier); a thread that finds them all owned
/// shares copy 0 (with atomic adds, as before). Eight covers the L7 workers of the machines
/// this runs on; more workers than that share copy 0 and count correctly.
const THREADS: usize = 8;

/// The copies 1.. that have an owner now: bit `i` for copy `i`.
static OWNED: AtomicU32 = AtomicU32::new(0);
/// Bits of the copies a thread may own.
const OWNABLE: u32 = ((1 << THREADS) - 1) & !1;

thread_local! {
    /// This thread's copy: 1.. its own, 0 the shared one; `usize::MAX` until it first records.
    /// No destructor: it stays readable while other thread-locals are destroyed, and a
    /// thread-local without one is read with no state check on the request path (`OWNER`
    /// alone would hold the same index; stop 40's review tried that: +17 instructions per
    /// HTTP/1.1 request in one callgrind run each, inside the count's run-to-run spread).
    static MINE: Cell<usize> = const { Cell::new(usize::MAX) };
    /// Gives this thread's copy back when the thread ends.
    static OWNER: Owner = const { Owner(Cell::new(0)) };
}

/// The owned copy of a thread, given back when the thread ends (so a process whose threads
/// come and go, a test binary for one, keeps owned copies for the threads alive now). The
/// copy keeps its counts; its next owner adds to them.
struct Owner(Cell<usize>);

impl Drop for Owner {
    fn drop(&mut self) {
        let i = self.0.get();
        if i != 0 {
            // Anything this thread records from here on (another thread-local's destructor)
            // goes to the shared copy, before the copy can have another owner.
            let _ = MINE.try_with(|m| m.set(0));
            OWNED.fetch_and(!(1 << i), Ordering::AcqRel);
        }
    }
}

/// This thread's copy of every [`PerThread`] cell (1..THREADS: only this thread writes it).
fn my_copy() -> usize {
    MINE.try_with(|m| {
        let i = m.get();
        if i != usize::MAX {
            return i;
        }
        let i = claim();
        m.set(i);
        i
    })
    .unwrap_or(0)
}

/// Takes a free copy for this thread (0, the shared one, when none is free or the thread is
/// ending). Acquire: the previous owner's counts are seen before this thread adds to them.
fn claim() -> usize {
    let Ok(before) = OWNED.fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| {
        let free = !m & OWNABLE;
        (free != 0).then(|| m | (free & free.wrapping_neg()))
    }) else {
        return 0;
    };
    let i = (!before & OWNABLE).trailing_zeros() as usize;
    if OWNER.try_with(|o| o.0.set(i)).is_err() {
        OWNED.fetch_and(!(1 << i), Ordering::AcqRel);
        return 0;
    }
    i
}

/// Where a request's counts go: this thread's own copy, or the shared one.
#[derive(Clone, Copy)]
struct Adder(bool);

impl Adder {
    /// Adds `n` to `c`. On an owned copy a plain load and store (no other thread writes it,
    /// readers only load): no `lock` prefix. On the shared copy an atomic add.
    fn add(self, c: &AtomicU64, n: u64) {
        if self.0 {
            c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
        } else {
            add(c, n);
        }
    }
}

/// One copy, on cache lines of its own (no two threads' copies share a line).
#[derive(Debug, Default)]
#[repr(C, align(64))]
struct Line<T>(T);

/// A cell kept once per recording thread (see [`THREADS`]); read by summing the copies.
#[derive(Debug, Default)]
pub struct PerThread<T> {
    copies: [Line<T>; THREADS],
}

impl<T> PerThread<T> {
    /// This thread's copy and how to add to it.
    fn mine(&self) -> (&T, Adder) {
        let i = my_copy();
        (&self.copies[i].0, Adder(i != 0))
    }

    /// Every copy, to sum.
    fn all(&self) -> impl Iterator<Item = &T> {
        self.copies.iter().map(|c| &c.0)
    }

    /// The sum over every copy of the counter `f` picks.
    fn sum(&self, f: impl Fn(&T) -> &AtomicU64) -> u64 {
        self.all().map(|c| get(f(c))).fold(0, u64::wrapping_add)
    }
}

/// One counter that many requests add to, kept per recording thread like the cells below
/// (each copy on its own line, a thread's own copy written without a `lock` prefix) and read
/// by summing the copies: [`Counter::get`] returns what one shared atomic would hold.
#[derive(Debug, Default)]
pub struct Counter(PerThread<AtomicU64>);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        let (c, a) = self.0.mine();
        a.add(c, n);
    }

    /// The total over every thread's copy.
    pub fn get(&self) -> u64 {
        self.0.sum(|c| c)
    }
}

/// A fixed-bucket histogram of durations (Prometheus-style: cumulative on export).
/// `repr(C)`: the count and the sum, which every observation adds to, come first, next to
/// the first buckets and to what the cell holding the histogram puts before it (see
/// [`TargetCells`]).
#[derive(Debug, Default)]
#[repr(C)]
pub struct Histogram {
    count: AtomicU64,
    sum_micros: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len() + 1],
}

impl Histogram {
    /// Counts one observation.
    pub fn observe(&self, d: Duration) {
        self.observe_with(Adder(false), d);
    }

    fn observe_with(&self, a: Adder, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        a.add(&self.buckets[i], 1);
        a.add(
            &self.sum_micros,
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
        );
        a.add(&self.count, 1);
    }

    /// The counts now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut s = HistogramSnapshot::empty();
        self.add_to(&mut s);
        s
    }

    /// Adds the counts now to `s` (whose `buckets` has one entry per bucket).
    fn add_to(&self, s: &mut HistogramSnapshot) {
        for (sum, b) in s.buckets.iter_mut().zip(&self.buckets) {
            *sum = sum.wrapping_add(get(b));
        }
        s.sum_micros = s.sum_micros.wrapping_add(get(&self.sum_micros));
        s.count = s.count.wrapping_add(get(&self.count));
    }
}

/// A histogram's counts at one time: per bucket (not cumulative; the last is +Inf), the sum
/// of the observations and their number.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistogramSnapshot {
    /// Observations per bucket of [`BUCKETS`], then over the last bound.
    pub buckets: Vec<u64>,
    /// Sum of the observations, in microseconds.
    pub sum_micros: u64,
    /// Number of observations.
    pub count: u64,
}

impl HistogramSnapshot {
    /// No observation, one zero per bucket.
    fn empty() -> Self {
        Self {
            buckets: vec![0; BUCKETS.len() + 1],
            ..Self::default()
        }
    }

    /// What was observed between `earlier` and `self` (counter resets read as a restart).
    pub fn since(&self, earlier: &Self) -> Self {
        if earlier.count > self.count || earlier.buckets.len() != self.buckets.len() {
            return self.clone();
        }
        Self {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            sum_micros: self.sum_micros.saturating_sub(earlier.sum_micros),
            count: self.count - earlier.count,
        }
    }

    /// Mean in seconds (None without observations).
    pub fn average(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_micros as f64 / 1e6 / self.count as f64)
    }

    /// The `q` quantile (0–1) in seconds, interpolated linearly inside its bucket as
    /// Prometheus's `histogram_quantile` does (so it is as precise as the buckets); an
    /// observation beyond the last bound reads as that bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (seen + n) as f64 >= rank {
                let Some(&upper) = BUCKETS.get(i) else {
                    return BUCKETS.last().copied();
                };
                let lower = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
                let within = (rank - seen as f64) / n as f64;
                return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
            }
            seen += n;
        }
        BUCKETS.last().copied()
    }
}

/// The per-listener counters a forwarded request adds to, kept per thread.
#[derive(Debug, Default)]
struct ListenerHot {
    processed_bytes: AtomicU64,
    requests: AtomicU64,
    rule_evaluations: AtomicU64,
    lcu_rule_evaluations: AtomicU64,
}

/// Per-listener counters (CloudWatch's load-balancer dimension). What a forwarded request adds
/// to (bytes, requests, rule evaluations) is kept per thread, in one line of each copy.
#[derive(Debug, Default)]
pub struct ListenerCells {
    hot: PerThread<ListenerHot>,
    /// NewConnectionCount.
    pub new_connections: AtomicU64,
    /// RejectedConnectionCount.
    pub rejected_connections: AtomicU64,
    /// ClientTLSNegotiationErrorCount.
    pub client_tls_errors: AtomicU64,
    /// HTTP2AbusiveConnectionCount.
    pub http2_abusive_connections: AtomicU64,
    elb_3xx: AtomicU64,
    elb_4xx: AtomicU64,
    elb_5xx: AtomicU64,
    elb_500: AtomicU64,
    elb_502: AtomicU64,
    elb_503: AtomicU64,
    elb_504: AtomicU64,
    fixed_responses: AtomicU64,
    redirects: AtomicU64,
    desync_non_compliant: AtomicU64,
    header_timeouts: AtomicU64,
}

/// The counts of a [`ListenerCells`] now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs, reason = "each field is the metric of the same name")]
pub struct ListenerCounts {
    pub new_connections: u64,
    pub rejected_connections: u64,
    pub client_tls_errors: u64,
    pub http2_abusive_connections: u64,
    pub processed_bytes: u64,
    pub requests: u64,
    pub elb_3xx: u64,
    pub elb_4xx: u64,
    pub elb_5xx: u64,
    pub elb_500: u64,
    pub elb_502: u64,
    pub elb_503: u64,
    pub elb_504: u64,
    pub rule_evaluations: u64,
    pub lcu_rule_evaluations: u64,
    pub fixed_responses: u64,
    pub redirects: u64,
    pub desync_non_compliant: u64,
    pub header_timeouts: u64,
}

/// What the pipeline tells apart that the record alone does not: a 408 from the header
/// deadline (its `lb_error_detail`).
pub const HEADER_TIMEOUT_DETAIL: &str = crate::proxy::server::HEADER_TIMEOUT_REASON;

impl ListenerCells {
    /// Counts one request.
    pub fn record(&self, r: &Record) {
        let (hot, a) = self.hot.mine();
        a.add(&hot.processed_bytes, r.received_bytes + r.sent_bytes);
        if r.target.is_some() {
            a.add(&hot.requests, 1);
        }
        if r.generated_by_lb()
            && let Some(status) = r.elb_status
        {
            match status / 100 {
                3 => add(&self.elb_3xx, 1),
                4 => add(&self.elb_4xx, 1),
                5 => add(&self.elb_5xx, 1),
                _ => {}
            }
            match status {
                500 => add(&self.elb_500, 1),
                502 => add(&self.elb_502, 1),
                503 => add(&self.elb_503, 1),
                504 => add(&self.elb_504, 1),
                _ => {}
            }
        }
        // Adding 0 would still write the line (an atomic add is a write): most requests
        // evaluate no more rules than are free, many (the default rule alone) none.
        if r.rules_evaluated > 0 {
            a.add(&hot.rule_evaluations, u64::from(r.rules_evaluated));
        }
        if r.rules_evaluated > FREE_RULE_EVALUATIONS {
            a.add(
                &hot.lcu_rule_evaluations,
                u64::from(r.rules_evaluated - FREE_RULE_EVALUATIONS),
            );
        }
        match r.action {
            Some(ActionKind::FixedResponse) => add(&self.fixed_responses, 1),
            Some(ActionKind::Redirect) => add(&self.redirects, 1),
            _ => {}
        }
        if r.classification.tier > Tier::Compliant {
            add(&self.desync_non_compliant, 1);
        }
        if r.lb_error_detail.as_deref() == Some(HEADER_TIMEOUT_DETAIL) {
            add(&self.header_timeouts, 1);
        }
    }

    /// The counts now.
    pub fn counts(&self) -> ListenerCounts {
        let sum = |f: fn(&ListenerHot) -> &AtomicU64| self.hot.sum(f);
        ListenerCounts {
            new_connections: get(&self.new_connections),
            rejected_connections: get(&self.rejected_connections),
            client_tls_errors: get(&self.client_tls_errors),
            http2_abusive_connections: get(&self.http2_abusive_connections),
            processed_bytes: sum(|h| &h.processed_bytes),
            requests: sum(|h| &h.requests),
            elb_3xx: get(&self.elb_3xx),
            elb_4xx: get(&self.elb_4xx),
            elb_5xx: get(&self.elb_5xx),
            elb_500: get(&self.elb_500),
            elb_502: get(&self.elb_502),
            elb_503: get(&self.elb_503),
            elb_504: get(&self.elb_504),
            rule_evaluations: sum(|h| &h.rule_evaluations),
            lcu_rule_evaluations: sum(|h| &h.lcu_rule_evaluations),
            fixed_responses: get(&self.fixed_responses),
            redirects: get(&self.redirects),
            desync_non_compliant: get(&self.desync_non_compliant),
            header_timeouts: get(&self.header_timeouts),
        }
    }
}

/// What a request answered 2xx adds to in a [`TargetCells`], kept per thread. `repr(C)`:
/// requests, 2xx, the histogram's count, sum and first buckets in the copy's first 80 bytes.
#[derive(Debug, Default)]
#[repr(C)]
struct TargetHot {
    requests: AtomicU64,
    target_2xx: AtomicU64,
    response_time: Histogram,
}

/// Counters of requests sent to one target (and, inside [`GroupCells`], to a group). What
/// every forwarded request adds to is kept per thread; the rare counters are shared.
#[derive(Debug, Default)]
pub struct TargetCells {
    hot: PerThread<TargetHot>,
    target_3xx: AtomicU64,
    target_4xx: AtomicU64,
    target_5xx: AtomicU64,
    connection_errors: AtomicU64,
    tls_errors: AtomicU64,
}

/// The counts of a [`TargetCells`] now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs, reason = "each field is the metric of the same name")]
pub struct TargetCounts {
    pub requests: u64,
    pub target_2xx: u64,
    pub target_3xx: u64,
    pub target_4xx: u64,
    pub target_5xx: u64,
    pub connection_errors: u64,
    pub tls_errors: u64,
}

impl TargetCells {
    /// Counts one request sent (or being sent) to the target.
    pub fn record(&self, r: &Record) {
        let (hot, a) = self.hot.mine();
        a.add(&hot.requests, 1);
        if let Some(s) = r.target_status {
            match s / 100 {
                2 => a.add(&hot.target_2xx, 1),
                3 => add(&self.target_3xx, 1),
                4 => add(&self.target_4xx, 1),
                5 => add(&self.target_5xx, 1),
                _ => {}
            }
        }
        if let Some(t) = r.target_processing {
            hot.response_time.observe_with(a, t);
        }
        if let Some(e) = r.lb_error {
            if e.is_target_connection_error() {
                add(&self.connection_errors, 1);
            }
            if e == LbError::TargetTlsNegotiation {
                add(&self.tls_errors, 1);
            }
        }
    }

    /// The counts now.
    pub fn counts(&self) -> TargetCounts {
        let sum = |f: fn(&TargetHot) -> &AtomicU64| self.hot.sum(f);
        TargetCounts {
            requests: sum(|h| &h.requests),
            target_2xx: sum(|h| &h.target_2xx),
            target_3xx: get(&self.target_3xx),
            target_4xx: get(&self.target_4xx),
            target_5xx: get(&self.target_5xx),
            connection_errors: get(&self.connection_errors),
            tls_errors: get(&self.tls_errors),
        }
    }

    /// TargetResponseTime's counts now.
    pub fn response_time(&self) -> HistogramSnapshot {
        let mut s = HistogramSnapshot::empty();
        for h in self.hot.all() {
            h.response_time.add_to(&mut s);
        }
        s
    }
}

/// Per-target-group counters.
#[derive(Debug, Default)]
pub struct GroupCells {
    /// What every target counts, for the whole group (kept here: a deregistered target's
    /// counts stay in its group's).
    pub all: TargetCells,
    non_sticky: AtomicU64,
    unhealthy_routing: AtomicU64,
}

impl GroupCells {
    /// Counts one request sent (or being sent) to a target of the group.
    pub fn record(&self, r: &Record) {
        self.all.record(r);
        if r.non_sticky {
            add(&self.non_sticky, 1);
        }
        if r.unhealthy_routing {
            add(&self.unhealthy_routing, 1);
        }
    }

    /// NonStickyRequestCount, UnhealthyRoutingRequestCount.
    pub fn routing_counts(&self) -> (u64, u64) {
        (get(&self.non_sticky), get(&self.unhealthy_routing))
    }
}

/// Held by the tests whose threads claim copies many at a time (here and the target group's
/// concurrent picks): run side by side, two of them take every copy, and a test whose
/// positive control is "more than one copy was written" finds them all taken.
#[cfg(test)]
pub(crate) fn many_threads() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accesslog::RequestType;

    fn record() -> Record {
        Record::new(RequestType::Http, "127.0.0.1:1".parse().unwrap(), 1, None)
    }

    /// The counters a forwarded 2xx request adds to share the first bytes of their thread's
    /// copy (one or two cache lines), and no two copies share a line.
    #[test]
    fn the_counters_a_request_adds_to_come_first() {
        use std::mem::{align_of, offset_of, size_of};
        assert_eq!(size_of::<ListenerHot>(), 32);
        assert_eq!(offset_of!(TargetHot, target_2xx), 8);
        let histogram = offset_of!(TargetHot, response_time);
        assert_eq!(histogram + offset_of!(Histogram, count), 16);
        assert_eq!(histogram + offset_of!(Histogram, sum_micros), 24);
        assert_eq!(histogram + offset_of!(Histogram, buckets), 32);
        assert_eq!(align_of::<Line<ListenerHot>>(), 64);
        assert_eq!(size_of::<Line<TargetHot>>() % 64, 0);
    }

    /// Each thread's requests land in its own copy, the counts read are the sum of all
    /// (threads beyond the owned copies share copy 0), none lost or double-counted.
    #[test]
    fn counts_from_many_threads_sum_across_their_copies() {
        let _copies = many_threads();
        let listener = ListenerCells::default();
        let target = TargetCells::default();
        let mut r = record();
        r.target = Some("127.0.0.1:9".parse().unwrap());
        r.target_status = Some(200);
        r.target_processing = Some(Duration::from_millis(3));
        r.received_bytes = 7;
        on_many_threads(|_| {
            listener.record(&r);
            target.record(&r);
        });
        let n = (1000 * MANY) as u64;
        let c = listener.counts();
        assert_eq!((c.requests, c.processed_bytes), (n, 7 * n));
        let t = target.counts();
        assert_eq!((t.requests, t.target_2xx), (n, n));
        let h = target.response_time();
        assert_eq!((h.count, h.sum_micros, h.buckets[3]), (n, 3000 * n, n));
        let owned = listener.hot.all().filter(|h| get(&h.requests) > 0).count();
        assert!(owned > 1, "the threads' counts went to {owned} copy");
    }

    /// Threads the copy tests record from: twice as many as there are copies.
    const MANY: usize = 2 * THREADS;

    /// Runs `add(t)` 1,000 times on each of [`MANY`] threads (`t` the thread's number), all
    /// alive at once: each waits after its first add until every one has claimed its copy,
    /// since a thread that ended first would give its copy back to the next, and all would
    /// write one copy.
    fn on_many_threads(add: impl Fn(usize) + Sync) {
        let all_claimed = std::sync::Barrier::new(MANY);
        std::thread::scope(|s| {
            for t in 0..MANY {
                let (add, all_claimed) = (&add, &all_claimed);
                s.spawn(move || {
                    add(t);
                    all_claimed.wait();
                    for _ in 1..1000 {
                        add(t);
                    }
                });
            }
        });
    }

    /// A [`Counter`] reads what one shared atomic would: the adds of every thread, each
    /// thread's to its own copy (more than one copy written).
    #[test]
    fn a_counter_added_to_from_many_threads_reads_their_total() {
        let _copies = many_threads();
        let counter = Counter::default();
        on_many_threads(|t| counter.add(1 + t as u64));
        let n: u64 = (1..=MANY as u64).map(|k| 1000 * k).sum();
        assert_eq!(counter.get(), n);
        let written = counter.0.all().filter(|c| get(c) > 0).count();
        assert!(written > 1, "the threads' adds went to {written} copy");
    }

    /// A thread's copy is given back when the thread ends: threads that come and go one after
    /// another (three times as many as there are copies) each own one. Kept for life, the
    /// copies would run out after the seventh and every later thread would share copy 0.
    /// (Threads of tests running beside this one may hold a few copies meanwhile.)
    #[test]
    fn a_thread_that_ends_gives_its_copy_back() {
        let _copies = many_threads();
        let cells = ListenerCells::default();
        let copies: Vec<usize> = (0..3 * THREADS)
            .map(|_| {
                std::thread::scope(|s| {
                    s.spawn(|| {
                        let mut r = record();
                        r.received_bytes = 1;
                        cells.record(&r);
                        my_copy()
                    })
                    .join()
                    .expect("the recording thread")
                })
            })
            .collect();
        assert!(
            copies.iter().all(|&i| i != 0),
            "threads one after another got copies {copies:?}"
        );
        assert_eq!(
            cells.counts().processed_bytes,
            copies.len() as u64,
            "a copy given back keeps its counts, and its next owner adds to them"
        );
    }

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let h = Histogram::default();
        for ms in [1, 1, 1, 1, 1, 1, 1, 1, 1, 100] {
            h.observe(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 10);
        assert!((s.average().unwrap() - 0.0109).abs() < 1e-9);
        let p50 = s.quantile(0.5).unwrap();
        assert!((0.0005..=0.001).contains(&p50), "{p50}");
        let p99 = s.quantile(0.99).unwrap();
        assert!((0.05..=0.1).contains(&p99), "{p99}");
        assert_eq!(HistogramSnapshot::default().quantile(0.5), None);
    }

    #[test]
    fn a_histogram_since_an_earlier_snapshot_holds_only_the_new_observations() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        let before = h.snapshot();
        h.observe(Duration::from_secs(90));
        let d = h.snapshot().since(&before);
        assert_eq!(d.count, 1);
        assert_eq!(d.buckets.last(), Some(&1));
        assert_eq!(
            d.quantile(0.5),
            Some(60.0),
            "beyond the last bound reads as it"
        );
    }

    #[test]
    fn a_load_balancer_generated_status_counts_once_in_its_class_and_split() {
        let cells = ListenerCells::default();
        let mut r = record();
        r.elb_status = Some(502);
        r.target = Some("127.0.0.1:9".parse().unwrap());
        r.rules_evaluated = 12;
        r.received_bytes = 10;
        r.sent_bytes = 5;
        cells.record(&r);
        let mut forwarded = record();
        forwarded.elb_status = Some(503);
        forwarded.target_status = Some(503);
        cells.record(&forwarded);
        let c = cells.counts();
        assert_eq!((c.elb_5xx, c.elb_502, c.elb_503), (1, 1, 0));
        assert_eq!(c.requests, 1);
        assert_eq!((c.rule_evaluations, c.lcu_rule_evaluations), (12, 2));
        assert_eq!(c.processed_bytes, 15);
    }
}
