//! The runtime target group: registered targets, their states and counters, and the pick.
//!
//! The control plane's registry decides who the targets are and which take new requests; it
//! hands each change to [`TargetGroup::apply`]. The group keeps what only the data path
//! needs: outstanding counts, round-robin positions, stickiness ids and slow-start ramps.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio_util::sync::{
    CancellationToken, WaitForCancellationFuture, WaitForCancellationFutureOwned,
};

use super::config::{Algorithm, Stickiness, TargetGroupConfig};
use super::routing;
use super::state::{TargetAddr, TargetReason, TargetState};
use super::sticky::{self, APP_COOKIE, CookieKey, CookieKind, LB_COOKIE, LB_CORS_COOKIE};
use crate::metrics::{Counter, GroupCells, TargetCells};
use crate::proxy::client::TargetHandle;

/// What a [`Picked`] guard shares with its group: the counters that outlive a deregistration
/// (an in-flight request still finishes and releases its count), and the signal that the
/// target is gone for good (its deregistration delay ended: what is still open is closed).
#[derive(Debug)]
struct TargetEntry {
    addr: SocketAddr,
    /// Requests picked for this target and not yet finished (their [`Picked`] is alive).
    outstanding: AtomicU64,
    /// Requests ever picked for this target (RequestCountPerTarget), per picking thread:
    /// every pick adds to it, and a shared atomic is a `lock`-prefixed add on a line both
    /// workers write.
    requests: Counter,
    /// Cancelled when the target leaves the group.
    gone: CancellationToken,
    /// Set when the target leaves the group, before `gone` is cancelled: read with one load,
    /// where the token's `is_cancelled` takes its lock ([`Picked::left`]).
    left: AtomicBool,
    /// Its request metrics (fed from each request's record).
    metrics: Arc<TargetCells>,
    /// Its group's request metrics: a request's record reaches both through the pick's
    /// entry ([`Picked::cells`]), whose count the pick writes anyway.
    group_metrics: Arc<GroupCells>,
    /// The forwarder's handle on the target's connection pool, set by the first request
    /// forwarded to this registration ([`Picked::target_handle`]): later requests reach the
    /// pool through the pick, without the forwarder's lock and lookup. A new registration of
    /// the address (after it left the group) is a new entry and asks the forwarder again.
    handle: OnceLock<TargetHandle>,
}

impl TargetEntry {
    fn new(addr: SocketAddr, group_metrics: Arc<GroupCells>) -> Self {
        Self {
            addr,
            outstanding: AtomicU64::new(0),
            requests: Counter::default(),
            gone: CancellationToken::new(),
            left: AtomicBool::new(false),
            metrics: Arc::default(),
            group_metrics,
            handle: OnceLock::new(),
        }
    }

    /// The target left its group: `left` first, so whoever is woken by `gone` sees it.
    fn leave(&self) {
        self.left.store(true, Ordering::Release);
        self.gone.cancel();
    }
}

/// A linear ramp of a newly healthy target's share (ALB slow start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowStart {
    /// When the target became healthy.
    pub since: Instant,
    /// How long the ramp lasts.
    pub duration: Duration,
}

/// Shares are weights times this, so a slow-start ramp can hand out fractions of a weight.
const SHARE_SCALE: u64 = 1000;

impl SlowStart {
    /// The share (out of [`SHARE_SCALE`]) a weight-1 target gets at `now`: at least 1, so a
    /// target in slow start is never starved completely.
    fn ramp(self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.since).as_millis();
        let total = self.duration.as_millis().max(1);
        let r = elapsed.saturating_mul(u128::from(SHARE_SCALE)) / total;
        u64::try_from(r)
            .unwrap_or(SHARE_SCALE)
            .clamp(1, SHARE_SCALE)
    }
}

/// One target as the control plane describes it to the picker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Where requests go.
    pub addr: SocketAddr,
    /// Relative share (see [`TargetAddr::weight`]).
    pub weight: u32,
    /// AWS state.
    pub state: TargetState,
    /// Why, when known.
    pub reason: Option<TargetReason>,
    /// Whether it takes new requests (decided by the registry, fail-open included).
    pub takes_new: bool,
    /// Its slow-start ramp, if it is in one.
    pub slow_start: Option<SlowStart>,
}

/// A registered target as the group sees it (only touched under the group lock).
#[derive(Debug)]
struct Slot {
    entry: Arc<TargetEntry>,
    /// Identifies the registration in stickiness cookies (never reused within a group, so a
    /// cookie of a deregistered target never names a newcomer).
    id: u64,
    weight: u32,
    state: TargetState,
    reason: Option<TargetReason>,
    takes_new: bool,
    slow_start: Option<SlowStart>,
    /// Smooth weighted round robin's running weight.
    current: i64,
}

#[derive(Debug)]
struct Inner {
    slots: Vec<Slot>,
    next_id: u64,
    /// Where the next tie-break scan of least outstanding requests starts.
    cursor: usize,
    rng: StdRng,
    /// No target is in service: picks count as unhealthy routing.
    failing_open: bool,
    /// The latest end of a slow-start ramp; None when no target ramps (picks then never read
    /// the clock).
    slow_start_until: Option<Instant>,
}

/// Group-wide counters (CloudWatch names), for the metrics module.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetGroupCounters {
    /// Picks that returned a target (RequestCount for the group).
    pub requests: u64,
    /// Picks made while failing open, no target being in service (UnhealthyRoutingRequestCount).
    pub unhealthy_routing_requests: u64,
    /// Picks not pinned by a valid stickiness cookie while stickiness is on
    /// (NonStickyRequestCount).
    pub non_sticky_requests: u64,
}

/// One registered target, as [`TargetGroup::describe`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetStatus {
    /// Target address.
    pub addr: SocketAddr,
    /// Its weight.
    pub weight: u32,
    /// Its state.
    pub state: TargetState,
    /// Why it is in that state, when known.
    pub reason: Option<TargetReason>,
    /// Requests in flight on it now.
    pub outstanding: u64,
    /// Requests picked for it since it was registered (RequestCountPerTarget).
    pub requests: u64,
}

/// A runtime target group, shared by every connection (wrap it in an `Arc`).
///
/// One short mutex section per pick (no I/O, no allocation; cookies are checked before it
/// and sealed after it). The outstanding count of a pick is released without the lock when
/// its [`Picked`] drops.
#[derive(Debug)]
pub struct TargetGroup {
    config: TargetGroupConfig,
    /// The name again, shared: every request's record names its group.
    shared_name: Arc<str>,
    key: CookieKey,
    inner: Mutex<Inner>,
    /// Picks that returned a target, per picking thread (see [`TargetEntry::requests`]).
    requests: Counter,
    unhealthy_routing_requests: AtomicU64,
    non_sticky_requests: AtomicU64,
    /// Shared with every target entry of the group (see [`TargetEntry::group_metrics`]).
    metrics: Arc<GroupCells>,
}

impl TargetGroup {
    /// An empty group (every pick is `None` until targets are registered).
    pub fn new(config: TargetGroupConfig) -> Self {
        Self::with_rng(config, StdRng::from_os_rng())
    }

    /// An empty group whose `weighted_random` draws come from `seed`: reproducible picks for
    /// tests and simulations. Cookie keys stay random.
    pub fn with_seed(config: TargetGroupConfig, seed: u64) -> Self {
        Self::with_rng(config, StdRng::seed_from_u64(seed))
    }

    fn with_rng(config: TargetGroupConfig, rng: StdRng) -> Self {
        Self {
            shared_name: Arc::from(config.name.as_str()),
            config,
            key: CookieKey::random(),
            inner: Mutex::new(Inner {
                slots: Vec::new(),
                next_id: 1,
                cursor: 0,
                rng,
                failing_open: false,
                slow_start_until: None,
            }),
            requests: Counter::default(),
            unhealthy_routing_requests: AtomicU64::new(0),
            non_sticky_requests: AtomicU64::new(0),
            metrics: Arc::default(),
        }
    }

    /// The group's request metrics (CloudWatch's target-group dimension).
    pub fn metrics(&self) -> &GroupCells {
        &self.metrics
    }

    /// Every registered target's request metrics.
    pub fn target_metrics(&self) -> Vec<(SocketAddr, Arc<TargetCells>)> {
        self.lock()
            .slots
            .iter()
            .map(|s| (s.entry.addr, s.entry.metrics.clone()))
            .collect()
    }

    /// The group's configuration.
    pub fn config(&self) -> &TargetGroupConfig {
        &self.config
    }

    /// The group name (shortcut for `config().name`).
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The group name as a shared string (a reference count, not a copy).
    pub fn shared_name(&self) -> Arc<str> {
        self.shared_name.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // No code under the lock panics; if some did, the data is still consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the control plane's view of the group: who the targets are, their states,
    /// weights and slow-start ramps, which take new requests, and whether the group fails
    /// open. Targets that stay (same address) keep their counters, round-robin position and
    /// stickiness id; targets that are gone have their in-flight requests closed (their
    /// deregistration delay is over).
    pub fn apply(&self, members: &[Member], failing_open: bool) {
        let mut inner = self.lock();
        let mut old: std::collections::HashMap<SocketAddr, Slot> = std::mem::take(&mut inner.slots)
            .into_iter()
            .map(|s| (s.entry.addr, s))
            .collect();
        let mut placed = std::collections::HashSet::with_capacity(members.len());
        for m in members {
            if !placed.insert(m.addr) {
                continue; // duplicate address: the first wins
            }
            let mut slot = match old.remove(&m.addr) {
                Some(s) => s,
                None => inner.new_slot(m.addr, &self.metrics),
            };
            if slot.takes_new != m.takes_new {
                // A target (re)joining the rotation starts from a neutral round-robin position.
                slot.current = 0;
            }
            slot.weight = m.weight;
            slot.state = m.state;
            slot.reason = m.reason;
            slot.takes_new = m.takes_new;
            slot.slow_start = m.slow_start;
            inner.slots.push(slot);
        }
        for gone in old.into_values() {
            gone.entry.leave();
        }
        inner.failing_open = failing_open;
        inner.slow_start_until = inner
            .slots
            .iter()
            .filter_map(|s| s.slow_start.map(|r| r.since + r.duration))
            .max();
    }

    /// Replaces the registered targets, every one `Healthy` unless it was registered already
    /// (then it keeps its state). A convenience for tests and tools without a control plane;
    /// routing follows [`routing`] with the default threshold.
    pub fn set_targets(&self, targets: Vec<TargetAddr>) {
        let states = self.states();
        let members: Vec<(SocketAddr, u32, TargetState, Option<TargetReason>)> = targets
            .iter()
            .map(|t| {
                let (state, reason) = states
                    .iter()
                    .find(|(a, _, _)| *a == t.addr)
                    .map_or((TargetState::Healthy, None), |(_, s, r)| (*s, *r));
                (t.addr, t.weight, state, reason)
            })
            .collect();
        self.apply_states(&members);
    }

    /// Registers one target (`Healthy`). Registering an address again only updates its
    /// weight. A convenience like [`set_targets`](Self::set_targets).
    pub fn register(&self, target: TargetAddr) {
        let mut all: Vec<TargetAddr> = self
            .describe()
            .iter()
            .map(|s| TargetAddr::with_weight(s.addr, s.weight))
            .filter(|t| t.addr != target.addr)
            .collect();
        all.push(target);
        self.set_targets(all);
    }

    /// Removes a target at once (in-flight requests on it are closed). Returns whether it
    /// was registered. A convenience like [`set_targets`](Self::set_targets).
    pub fn deregister(&self, addr: SocketAddr) -> bool {
        let before = self.describe();
        let rest: Vec<TargetAddr> = before
            .iter()
            .filter(|s| s.addr != addr)
            .map(|s| TargetAddr::with_weight(s.addr, s.weight))
            .collect();
        let found = rest.len() != before.len();
        self.set_targets(rest);
        found
    }

    /// Sets a target's state (its reason is cleared). Returns whether it is registered.
    pub fn set_state(&self, addr: SocketAddr, state: TargetState) -> bool {
        self.update(addr, state, None)
    }

    /// Sets a target's state from an AWS reason code (the reason implies the state).
    /// Returns whether it is registered.
    pub fn set_reason(&self, addr: SocketAddr, reason: TargetReason) -> bool {
        self.update(addr, reason.state(), Some(reason))
    }

    fn update(&self, addr: SocketAddr, state: TargetState, reason: Option<TargetReason>) -> bool {
        let mut members = self.states_weighted();
        let Some(m) = members.iter_mut().find(|m| m.0 == addr) else {
            return false;
        };
        m.2 = state;
        m.3 = reason;
        self.apply_states(&members);
        true
    }

    fn states(&self) -> Vec<(SocketAddr, TargetState, Option<TargetReason>)> {
        let inner = self.lock();
        inner
            .slots
            .iter()
            .map(|s| (s.entry.addr, s.state, s.reason))
            .collect()
    }

    fn states_weighted(&self) -> Vec<(SocketAddr, u32, TargetState, Option<TargetReason>)> {
        let inner = self.lock();
        inner
            .slots
            .iter()
            .map(|s| (s.entry.addr, s.weight, s.state, s.reason))
            .collect()
    }

    /// [`apply`](Self::apply) with routing derived from the states, as the registry derives it.
    fn apply_states(&self, members: &[(SocketAddr, u32, TargetState, Option<TargetReason>)]) {
        let failing_open = routing::failing_open(
            members.iter().map(|m| m.2),
            self.config.attributes.min_healthy,
        );
        let members: Vec<Member> = members
            .iter()
            .map(|&(addr, weight, state, reason)| Member {
                addr,
                weight,
                state,
                reason,
                takes_new: routing::takes_new(state, failing_open),
                slow_start: None,
            })
            .collect();
        self.apply(&members, failing_open);
    }

    /// Every registered target, in registration order.
    pub fn describe(&self) -> Vec<TargetStatus> {
        let inner = self.lock();
        inner
            .slots
            .iter()
            .map(|s| TargetStatus {
                addr: s.entry.addr,
                weight: s.weight,
                state: s.state,
                reason: s.reason,
                outstanding: s.entry.outstanding.load(Ordering::Relaxed),
                requests: s.entry.requests.get(),
            })
            .collect()
    }

    /// Number of targets in service (HealthyHostCount) and registered but not in service
    /// (UnHealthyHostCount), as CloudWatch counts them.
    pub fn host_counts(&self) -> (usize, usize) {
        let inner = self.lock();
        let healthy = inner.slots.iter().filter(|s| s.state.in_service()).count();
        (healthy, inner.slots.len() - healthy)
    }

    /// The group-wide counters.
    pub fn counters(&self) -> TargetGroupCounters {
        TargetGroupCounters {
            requests: self.requests.get(),
            unhealthy_routing_requests: self.unhealthy_routing_requests.load(Ordering::Relaxed),
            non_sticky_requests: self.non_sticky_requests.load(Ordering::Relaxed),
        }
    }

    /// Picks a target for a request. `request_cookies` is the request's `Cookie` value (several
    /// `Cookie` lines joined with `"; "`), read only for stickiness.
    ///
    /// `None` when no registered target can take requests (none registered, or all
    /// draining/unused): the caller answers 503. When the group fails open, targets that are
    /// not in service take requests too, and the pick counts as UnhealthyRoutingRequestCount.
    pub fn pick(&self, request_cookies: Option<&str>) -> Option<Picked> {
        self.pick_at(request_cookies, SystemTime::now())
    }

    /// [`pick`](Self::pick) at a given time (cookie expiry is checked and set against `now`).
    pub fn pick_at(&self, request_cookies: Option<&str>, now: SystemTime) -> Option<Picked> {
        // Cookie checks (HMAC) need no lock: done before taking it.
        let sticky_id = request_cookies.and_then(|cookies| self.sticky_target(cookies, now));
        let mut inner = self.lock();
        let ramp_now = match inner.slow_start_until {
            Some(until) => {
                let t = Instant::now();
                if t >= until {
                    inner.slow_start_until = None;
                    None
                } else {
                    Some(t)
                }
            }
            None => None,
        };
        let shares = Shares::of(&inner.slots, ramp_now);
        if inner.slots.iter().all(|s| shares.share(s) == 0) {
            return None;
        }
        let sticky_index = sticky_id.and_then(|id| {
            inner
                .slots
                .iter()
                .position(|s| s.id == id && shares.share(s) > 0)
        });
        let index = match sticky_index {
            Some(i) => i,
            None => match self.config.algorithm {
                Algorithm::RoundRobin => inner.smooth_weighted_round_robin(shares),
                Algorithm::LeastOutstandingRequests => inner.least_outstanding(shares),
                Algorithm::WeightedRandom => inner.weighted_random(shares),
            },
        };
        let failing_open = inner.failing_open;

        let slot = &inner.slots[index];
        let entry = Arc::clone(&slot.entry);
        // Counted under the lock, so the next least-outstanding pick already sees it.
        entry.outstanding.fetch_add(1, Ordering::Relaxed);
        let target_id = slot.id;
        drop(inner);

        entry.requests.add(1);
        self.requests.add(1);
        if failing_open {
            self.unhealthy_routing_requests
                .fetch_add(1, Ordering::Relaxed);
        }
        let sticky = sticky_index.is_some();
        if self.config.stickiness.enabled() && !sticky {
            self.non_sticky_requests.fetch_add(1, Ordering::Relaxed);
        }
        let cookie = self.issue(target_id, now);
        Some(Picked {
            addr: entry.addr,
            entry,
            sticky,
            non_sticky: self.config.stickiness.enabled() && !sticky,
            unhealthy_routing: failing_open,
            cookie,
        })
    }

    /// The target id a request's stickiness cookies pin it to, if they are valid.
    fn sticky_target(&self, cookies: &str, now: SystemTime) -> Option<u64> {
        match &self.config.stickiness {
            Stickiness::None => None,
            Stickiness::LbCookie { .. } => crate::headers::cookie_values(cookies, LB_COOKIE)
                .find_map(|v| self.key.open(CookieKind::Lb, v, now)),
            Stickiness::AppCookie { cookie_name, .. } => {
                // Sticky only while the application's own cookie is present.
                crate::headers::cookie_values(cookies, cookie_name).next()?;
                crate::headers::cookie_values(cookies, APP_COOKIE)
                    .find_map(|v| self.key.open(CookieKind::App, v, now))
            }
        }
    }

    /// The cookie to hand the client for this pick, if stickiness is on.
    fn issue(&self, target_id: u64, now: SystemTime) -> Option<IssuedCookie> {
        let (kind, duration, app_cookie) = match &self.config.stickiness {
            Stickiness::None => return None,
            Stickiness::LbCookie { duration } => (CookieKind::Lb, *duration, None),
            Stickiness::AppCookie {
                cookie_name,
                duration,
            } => (CookieKind::App, *duration, Some(cookie_name.clone())),
        };
        let expires = sticky::expiry(now, duration);
        Some(IssuedCookie {
            value: self.key.seal(kind, target_id, expires),
            expires,
            app_cookie,
        })
    }
}

/// Which targets may take a new request now, and their share of requests.
#[derive(Debug, Clone, Copy)]
struct Shares {
    /// Every target taking new requests has weight 0: they share equally instead of
    /// refusing traffic.
    all_weightless: bool,
    /// `Some(now)` while some target ramps up (slow start).
    ramp_now: Option<Instant>,
}

impl Shares {
    fn of(slots: &[Slot], ramp_now: Option<Instant>) -> Self {
        Self {
            all_weightless: slots.iter().filter(|s| s.takes_new).all(|s| s.weight == 0),
            ramp_now,
        }
    }

    /// The target's share of new requests: 0 for none.
    fn share(self, slot: &Slot) -> u64 {
        if !slot.takes_new {
            return 0;
        }
        let weight = if self.all_weightless {
            1
        } else {
            u64::from(slot.weight)
        };
        match (self.ramp_now, slot.slow_start) {
            (Some(now), Some(ramp)) => weight * ramp.ramp(now),
            _ => weight * SHARE_SCALE,
        }
    }
}

impl Inner {
    fn new_slot(&mut self, addr: SocketAddr, group_metrics: &Arc<GroupCells>) -> Slot {
        let id = self.next_id;
        self.next_id += 1;
        Slot {
            entry: Arc::new(TargetEntry::new(addr, group_metrics.clone())),
            id,
            weight: 1,
            state: TargetState::Initial,
            reason: None,
            takes_new: false,
            slow_start: None,
            current: 0,
        }
    }

    /// nginx's smooth weighted round robin: every candidate gains its weight, the richest is
    /// chosen and pays the total. Exact over a cycle of sum(weights) picks, and spread out
    /// (weights 5,1,1 give a a b a c a a, not a a a a a b c).
    fn smooth_weighted_round_robin(&mut self, shares: Shares) -> usize {
        let mut total: i64 = 0;
        let mut best: Option<(usize, i64)> = None;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let share = shares.share(slot);
            if share == 0 {
                continue;
            }
            // Shares are u32 weights times 1000, far from i64's range.
            let share = i64::try_from(share).unwrap_or(i64::MAX / 1024);
            slot.current += share;
            total += share;
            if best.is_none_or(|(_, richest)| slot.current > richest) {
                best = Some((i, slot.current));
            }
        }
        // The caller checked that some share is positive, so `best` is set.
        let best = best.map_or(0, |(i, _)| i);
        self.slots[best].current -= total;
        best
    }

    /// Fewest outstanding requests among candidates; ties broken round robin.
    fn least_outstanding(&mut self, shares: Shares) -> usize {
        let n = self.slots.len();
        let start = self.cursor % n;
        let mut best: Option<(usize, u64)> = None;
        for offset in 0..n {
            let i = (start + offset) % n;
            if shares.share(&self.slots[i]) == 0 {
                continue;
            }
            let outstanding = self.slots[i].entry.outstanding.load(Ordering::Relaxed);
            if best.is_none_or(|(_, fewest)| outstanding < fewest) {
                best = Some((i, outstanding));
            }
        }
        let best = best.map_or(0, |(i, _)| i);
        self.cursor = best + 1;
        best
    }

    /// A candidate with probability share / sum(shares).
    fn weighted_random(&mut self, shares: Shares) -> usize {
        let total: u64 = self.slots.iter().map(|s| shares.share(s)).sum();
        let mut ticket = self.rng.random_range(0..total.max(1));
        for (i, slot) in self.slots.iter().enumerate() {
            let share = shares.share(slot);
            if ticket < share {
                return i;
            }
            ticket -= share;
        }
        // Unreachable: the tickets cover exactly the shares.
        0
    }
}

/// The pending cookie of a pick.
#[derive(Debug)]
struct IssuedCookie {
    value: String,
    expires: SystemTime,
    /// For application-based stickiness, the application's cookie name.
    app_cookie: Option<String>,
}

/// A target's registration, as [`Picked::registration`] hands it out: identity only.
#[derive(Debug, Clone)]
pub struct Registration(Weak<TargetEntry>);

impl Registration {
    /// Whether nothing holds the registration any more: it left its group (or its group is
    /// gone) and every pick of it is over.
    pub fn is_over(&self) -> bool {
        self.0.strong_count() == 0
    }
}

/// A target registration outside any group (tests of what holds a pick): its picks, and its
/// leaving.
#[cfg(test)]
pub(crate) struct Detached(Arc<TargetEntry>);

#[cfg(test)]
impl Detached {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self(Arc::new(TargetEntry::new(addr, Arc::default())))
    }

    /// A pick of the target, counted as a group's pick is.
    pub(crate) fn pick(&self) -> Picked {
        self.0.outstanding.fetch_add(1, Ordering::Relaxed);
        self.0.requests.add(1);
        Picked {
            addr: self.0.addr,
            entry: self.0.clone(),
            sticky: false,
            non_sticky: false,
            unhealthy_routing: false,
            cookie: None,
        }
    }

    /// The target leaves, as [`TargetGroup::apply`] makes it leave.
    pub(crate) fn leave(&self) {
        self.0.leave();
    }
}

/// The request metrics of a picked target and of its group ([`Picked::cells`]).
#[derive(Debug)]
pub struct PickedCells(Arc<TargetEntry>);

impl PickedCells {
    /// The target's request metrics.
    pub fn target(&self) -> &TargetCells {
        &self.0.metrics
    }

    /// The target group's request metrics.
    pub fn group(&self) -> &GroupCells {
        &self.0.group_metrics
    }
}

/// A chosen target. While it lives it counts one outstanding request on its target (least
/// outstanding requests reads that count); dropping it releases the count. Keep it until the
/// response body is done.
#[derive(Debug)]
pub struct Picked {
    /// Where to send the request.
    pub addr: SocketAddr,
    entry: Arc<TargetEntry>,
    sticky: bool,
    non_sticky: bool,
    unhealthy_routing: bool,
    cookie: Option<IssuedCookie>,
}

impl Picked {
    /// Whether a valid stickiness cookie chose this target (otherwise the algorithm did, and
    /// with stickiness on the request counted as NonStickyRequestCount).
    pub fn sticky(&self) -> bool {
        self.sticky
    }

    /// The group has stickiness and no valid cookie chose this target
    /// (NonStickyRequestCount).
    pub fn non_sticky(&self) -> bool {
        self.non_sticky
    }

    /// The pick happened while the group failed open (UnhealthyRoutingRequestCount).
    pub fn unhealthy_routing(&self) -> bool {
        self.unhealthy_routing
    }

    /// The request metrics of the target and of its group, for a record that outlives the
    /// pick's borrow: a clone of the entry the pick already holds (its count line is written
    /// by every pick anyway), where clones of the group and of the target's cells wrote two
    /// more lines that every worker's requests share.
    pub fn cells(&self) -> PickedCells {
        PickedCells(self.entry.clone())
    }

    /// Ready when the target leaves its group (its deregistration delay ended): the request
    /// still open on it must be closed (ALB answers 502 if no response started). Borrows the
    /// pick: no clone of the signal (a clone takes the token tree's lock twice, on clone and
    /// on drop), which the per-request path does not need. Only a wait is handed out, never
    /// the token: a holder could cancel it and bypass [`Picked::left`].
    pub fn gone(&self) -> WaitForCancellationFuture<'_> {
        self.entry.gone.cancelled()
    }

    /// [`Picked::gone`] owning a clone of the signal, for a wait kept apart from the pick
    /// (a boxed or spawned one).
    pub fn gone_owned(&self) -> WaitForCancellationFutureOwned {
        self.entry.gone.clone().cancelled_owned()
    }

    /// Whether the target left its group: one load, where polling [`Picked::gone`] takes the
    /// token's lock. Set before `gone` is cancelled, so a task woken by `gone`
    /// sees it.
    pub fn left(&self) -> bool {
        self.entry.left.load(Ordering::Acquire)
    }

    /// The registration of the target this pick is of, for a watch kept across requests
    /// (the native HTTP/1 loop's, `pipeline::TargetWatches`). It keeps neither the target's
    /// counters nor its pool handle alive, only the memory their entry lives in, so a later
    /// pick's [`Picked::is_of`] compares against an address no new registration can reuse.
    pub fn registration(&self) -> Registration {
        Registration(Arc::downgrade(&self.entry))
    }

    /// Whether this pick is of the registration `r` (the same entry: a target that left and
    /// registered again is a new one).
    pub fn is_of(&self, r: &Registration) -> bool {
        std::ptr::eq(r.0.as_ptr(), Arc::as_ptr(&self.entry))
    }

    /// The forwarder's handle on the target's connection pool: the one this registration of
    /// the target was given by the first request forwarded to it, else `init`'s (called once
    /// per registration, however many requests race for it). Every later pick of the target
    /// hands the same handle out without calling `init`: no lock, no lookup of the endpoint.
    /// `init` must give the handle of the endpoint the pick's group sends this address to
    /// (fixed by the group's configuration, which never changes).
    pub fn target_handle(&self, init: impl FnOnce() -> TargetHandle) -> &TargetHandle {
        self.entry.handle.get_or_init(init)
    }

    /// `Set-Cookie` values to append to the response (one header line each), given the
    /// target's response headers:
    ///
    /// - `lb_cookie`: always `AWSALB` and `AWSALBCORS` (`SameSite=None; Secure`), refreshed
    ///   on every response as AWS does;
    /// - `app_cookie`: `AWSALBAPP-0` only when the response sets the application cookie
    ///   (AWS inserts a new stickiness cookie only then);
    /// - no stickiness: nothing.
    pub fn set_cookies(&self, response_headers: &HeaderMap) -> Vec<HeaderValue> {
        let Some(cookie) = &self.cookie else {
            return Vec::new();
        };
        match &cookie.app_cookie {
            None => vec![
                sticky::set_cookie(LB_COOKIE, &cookie.value, cookie.expires, ""),
                sticky::set_cookie(
                    LB_CORS_COOKIE,
                    &cookie.value,
                    cookie.expires,
                    "; SameSite=None; Secure",
                ),
            ],
            Some(name) if sticky::response_sets_cookie(response_headers, name) => {
                vec![sticky::set_cookie(
                    APP_COOKIE,
                    &cookie.value,
                    cookie.expires,
                    "",
                )]
            }
            Some(_) => Vec::new(),
        }
    }

    /// When the issued stickiness cookie expires (None without stickiness).
    pub fn cookie_expires(&self) -> Option<SystemTime> {
        self.cookie.as_ref().map(|c| c.expires)
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.entry.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::future::Future as _;
    use std::time::Duration;

    use super::*;
    use crate::targets::parse_target_group;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 8080))
    }

    fn group(spec: &str, weights: &[u32]) -> TargetGroup {
        let group = TargetGroup::with_seed(parse_target_group(spec).unwrap(), 7);
        group.set_targets(
            (1..)
                .zip(weights)
                .map(|(n, &w)| TargetAddr::with_weight(addr(n), w))
                .collect(),
        );
        group
    }

    fn pick_addr(group: &TargetGroup) -> SocketAddr {
        group.pick(None).expect("a target").addr
    }

    fn counts(group: &TargetGroup, picks: usize) -> HashMap<SocketAddr, usize> {
        let mut counts = HashMap::new();
        for _ in 0..picks {
            *counts.entry(pick_addr(group)).or_default() += 1;
        }
        counts
    }

    /// The value of the first `Set-Cookie` line called `name`.
    fn issued(cookies: &[HeaderValue], name: &str) -> Option<String> {
        cookies.iter().find_map(|line| {
            let line = line.to_str().ok()?;
            let (n, rest) = line.split_once('=')?;
            (n == name).then(|| rest.split(';').next().unwrap_or_default().to_owned())
        })
    }

    fn lb_cookie_of(picked: &Picked) -> String {
        issued(&picked.set_cookies(&HeaderMap::new()), "AWSALB").expect("an AWSALB cookie")
    }

    #[test]
    fn group_and_guard_can_cross_threads_and_awaits() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<TargetGroup>();
        send_sync::<Picked>();
    }

    #[test]
    fn no_registered_target_picks_nothing() {
        let group = group("web", &[]);
        assert!(group.pick(None).is_none());
        assert_eq!(group.counters().requests, 0);
    }

    #[test]
    fn round_robin_gives_each_target_exactly_one_request_per_cycle() {
        let group = group("web", &[1, 1, 1]);
        let picks: Vec<_> = (0..30).map(|_| pick_addr(&group)).collect();
        for cycle in picks.chunks(3) {
            let mut cycle = cycle.to_vec();
            cycle.sort();
            assert_eq!(cycle, [addr(1), addr(2), addr(3)]);
        }
    }

    #[test]
    fn smooth_weighted_round_robin_is_exact_and_spread_out() {
        let group = group("web", &[5, 1, 1]);
        let first: Vec<_> = (0..7).map(|_| pick_addr(&group)).collect();
        // nginx's documented sequence for weights 5, 1, 1: a a b a c a a.
        let (a, b, c) = (addr(1), addr(2), addr(3));
        assert_eq!(first, [a, a, b, a, c, a, a]);
        let counts = counts(&group, 70);
        assert_eq!((counts[&a], counts[&b], counts[&c]), (50, 10, 10));
    }

    #[test]
    fn zero_weight_target_gets_no_requests_unless_all_are_zero() {
        let group = group("web", &[0, 2]);
        assert_eq!(counts(&group, 10).get(&addr(1)), None);
        let all_zero = self::group("web", &[0, 0]);
        let counts = counts(&all_zero, 10);
        assert_eq!((counts[&addr(1)], counts[&addr(2)]), (5, 5));
    }

    #[test]
    fn least_outstanding_avoids_targets_holding_requests() {
        let group = group("web,algorithm=least_outstanding_requests", &[1, 1, 1]);
        let busy = group.pick(None).unwrap();
        let also_busy = group.pick(None).unwrap();
        assert_ne!(busy.addr, also_busy.addr);
        let idle = [addr(1), addr(2), addr(3)]
            .into_iter()
            .find(|a| *a != busy.addr && *a != also_busy.addr)
            .unwrap();
        for _ in 0..10 {
            // Dropped at once, so the idle target stays the least loaded.
            assert_eq!(pick_addr(&group), idle);
        }
        drop(also_busy);
        let freed = group.pick(None).unwrap();
        assert_ne!(freed.addr, busy.addr);
    }

    #[test]
    fn least_outstanding_breaks_ties_round_robin() {
        let group = group("web,algorithm=least_outstanding_requests", &[1, 1, 1]);
        let picks: Vec<_> = (0..9).map(|_| pick_addr(&group)).collect();
        for cycle in picks.chunks(3) {
            let mut cycle = cycle.to_vec();
            cycle.sort();
            assert_eq!(cycle, [addr(1), addr(2), addr(3)]);
        }
    }

    #[test]
    fn weighted_random_follows_weights_within_five_points() {
        let group = group("web,algorithm=weighted_random", &[1, 3]);
        let counts = counts(&group, 2000);
        let share = |a| counts.get(&a).copied().unwrap_or(0) as f64 / 20.0;
        assert!((share(addr(1)) - 25.0).abs() <= 5.0, "{counts:?}");
        assert!((share(addr(2)) - 75.0).abs() <= 5.0, "{counts:?}");
    }

    #[test]
    fn weighted_random_with_the_same_seed_repeats_itself() {
        let a = group("web,algorithm=weighted_random", &[1, 1, 1]);
        let b = group("web,algorithm=weighted_random", &[1, 1, 1]);
        let picks = |g: &TargetGroup| (0..50).map(|_| pick_addr(g)).collect::<Vec<_>>();
        let first = picks(&a);
        assert_eq!(first, picks(&b));
        assert!(first.iter().any(|p| *p != first[0]), "not random at all");
    }

    #[test]
    fn lb_cookie_pins_every_later_request_to_the_first_target() {
        let group = group("web,stickiness=lb_cookie", &[1, 1, 1]);
        let first = group.pick(None).unwrap();
        assert!(!first.sticky());
        let cookie = format!("other=1; AWSALB={}", lb_cookie_of(&first));
        for _ in 0..50 {
            let picked = group.pick(Some(&cookie)).unwrap();
            assert_eq!(picked.addr, first.addr);
            assert!(picked.sticky());
        }
        assert_eq!(group.counters().non_sticky_requests, 1);
        assert_eq!(group.counters().requests, 51);
    }

    #[test]
    fn lb_cookie_comes_with_a_cors_copy_and_an_expiry() {
        let group = group("web,stickiness=lb_cookie:60", &[1]);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_717);
        let picked = group.pick_at(None, now).unwrap();
        let lines: Vec<String> = picked
            .set_cookies(&HeaderMap::new())
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("AWSALB="));
        assert!(lines[0].ends_with("; Expires=Sun, 06 Nov 1994 08:49:37 GMT; Path=/"));
        assert!(lines[1].starts_with("AWSALBCORS="));
        assert!(lines[1].ends_with("; Path=/; SameSite=None; Secure"));
        assert_eq!(
            lines[0].split(';').next().unwrap()["AWSALB=".len()..],
            lines[1].split(';').next().unwrap()["AWSALBCORS=".len()..]
        );
        // The address is not readable in the value, neither as text nor as hex bytes.
        assert!(!lines[0].contains("127.0.0.1"));
        assert!(!lines[0].contains("7f000001"));
    }

    #[test]
    fn tampered_lb_cookie_is_ignored_and_replaced() {
        let group = group("web,stickiness=lb_cookie", &[1, 1]);
        let first = group.pick(None).unwrap();
        let mut value = lb_cookie_of(&first).into_bytes();
        let last = value.len() - 1;
        value[last] = if value[last] == b'0' { b'1' } else { b'0' };
        let tampered = format!("AWSALB={}", String::from_utf8(value).unwrap());
        let picks: Vec<_> = (0..4)
            .map(|_| group.pick(Some(&tampered)).unwrap())
            .collect();
        assert!(picks.iter().all(|p| !p.sticky()));
        // Balanced by the algorithm again, not pinned.
        assert!(picks.iter().any(|p| p.addr != first.addr));
        assert_ne!(format!("AWSALB={}", lb_cookie_of(&picks[0])), tampered);
        assert_eq!(group.counters().non_sticky_requests, 5);
    }

    #[test]
    fn expired_lb_cookie_is_ignored() {
        let group = group("web,stickiness=lb_cookie:60", &[1, 1]);
        let start = SystemTime::now();
        let first = group.pick_at(None, start).unwrap();
        let cookie = format!("AWSALB={}", lb_cookie_of(&first));
        let within = group
            .pick_at(Some(&cookie), start + Duration::from_secs(59))
            .unwrap();
        assert!(within.sticky());
        let after = group
            .pick_at(Some(&cookie), start + Duration::from_secs(61))
            .unwrap();
        assert!(!after.sticky());
    }

    #[test]
    fn cookie_of_another_group_is_ignored() {
        let one = group("one,stickiness=lb_cookie", &[1, 1]);
        let two = group("two,stickiness=lb_cookie", &[1, 1]);
        let cookie = format!("AWSALB={}", lb_cookie_of(&one.pick(None).unwrap()));
        assert!(!two.pick(Some(&cookie)).unwrap().sticky());
    }

    #[test]
    fn deregistered_sticky_target_is_replaced_by_a_new_pick() {
        let group = group("web,stickiness=lb_cookie", &[1, 1]);
        let first = group.pick(None).unwrap();
        let cookie = format!("AWSALB={}", lb_cookie_of(&first));
        assert!(group.deregister(first.addr));
        let picked = group.pick(Some(&cookie)).unwrap();
        assert_ne!(picked.addr, first.addr);
        assert!(!picked.sticky());
        // Registering the address again is a new registration: the old cookie stays invalid.
        group.register(TargetAddr::new(first.addr));
        for _ in 0..4 {
            assert!(!group.pick(Some(&cookie)).unwrap().sticky());
        }
    }

    #[test]
    fn sticky_target_out_of_service_is_replaced_while_others_are_healthy() {
        let group = group("web,stickiness=lb_cookie", &[1, 1]);
        let first = group.pick(None).unwrap();
        let cookie = format!("AWSALB={}", lb_cookie_of(&first));
        assert!(group.set_reason(first.addr, TargetReason::Timeout));
        for _ in 0..4 {
            let picked = group.pick(Some(&cookie)).unwrap();
            assert_ne!(picked.addr, first.addr);
            assert!(!picked.sticky());
        }
        assert!(group.set_state(first.addr, TargetState::Healthy));
        assert!(group.pick(Some(&cookie)).unwrap().sticky());
    }

    #[test]
    fn app_cookie_sticks_only_while_the_application_cookie_is_present() {
        let group = group("web,stickiness=app_cookie:SESSION:600", &[1, 1, 1]);
        let first = group.pick(None).unwrap();
        // The application did not set its cookie: nothing to add.
        assert!(first.set_cookies(&HeaderMap::new()).is_empty());
        let mut response = HeaderMap::new();
        response.append(
            http::header::SET_COOKIE,
            HeaderValue::from_static("SESSION=s1; HttpOnly"),
        );
        let lines = first.set_cookies(&response);
        assert_eq!(lines.len(), 1);
        let value = issued(&lines, "AWSALBAPP-0").expect("AWSALBAPP-0");

        let with_session = format!("SESSION=s1; AWSALBAPP-0={value}");
        for _ in 0..10 {
            let picked = group.pick(Some(&with_session)).unwrap();
            assert_eq!(picked.addr, first.addr);
            assert!(picked.sticky());
        }
        let without_session = format!("AWSALBAPP-0={value}");
        let picks: Vec<_> = (0..3)
            .map(|_| group.pick(Some(&without_session)).unwrap())
            .collect();
        assert!(picks.iter().all(|p| !p.sticky()));
        assert!(picks.iter().any(|p| p.addr != first.addr));
        // An lb_cookie value is not an app cookie value.
        let lb = self::group("web,stickiness=lb_cookie", &[1]);
        let foreign = format!(
            "SESSION=s1; AWSALBAPP-0={}",
            lb_cookie_of(&lb.pick(None).unwrap())
        );
        assert!(!group.pick(Some(&foreign)).unwrap().sticky());
    }

    #[test]
    fn without_stickiness_no_cookie_and_no_non_sticky_count() {
        let group = group("web", &[1]);
        let picked = group.pick(Some("AWSALB=whatever")).unwrap();
        assert!(picked.set_cookies(&HeaderMap::new()).is_empty());
        assert!(!picked.sticky());
        assert_eq!(group.counters().non_sticky_requests, 0);
    }

    #[test]
    fn all_unhealthy_fails_open_and_counts_it() {
        let group = group("web", &[1, 1]);
        group.set_reason(addr(1), TargetReason::FailedHealthChecks);
        group.set_state(addr(2), TargetState::Unhealthy);
        let spread = counts(&group, 4);
        assert_eq!((spread[&addr(1)], spread[&addr(2)]), (2, 2));
        assert_eq!(group.counters().unhealthy_routing_requests, 4);
        // One healthy target again: it takes everything, nothing counts as unhealthy routing.
        group.set_state(addr(2), TargetState::Healthy);
        assert_eq!(counts(&group, 4)[&addr(2)], 4);
        assert_eq!(group.counters().unhealthy_routing_requests, 4);
    }

    #[test]
    fn draining_and_unused_targets_never_get_new_requests() {
        let group = group("web", &[1, 1]);
        group.set_reason(addr(1), TargetReason::DeregistrationInProgress);
        assert_eq!(counts(&group, 4)[&addr(2)], 4);
        group.set_state(addr(2), TargetState::Unused);
        assert!(group.pick(None).is_none());
    }

    #[test]
    fn describe_reports_state_reason_and_outstanding() {
        let group = group("web", &[3]);
        group.set_reason(addr(1), TargetReason::ResponseCodeMismatch);
        let picked = group.pick(None).unwrap();
        let status = group.describe();
        assert_eq!(
            status,
            [TargetStatus {
                addr: addr(1),
                weight: 3,
                state: TargetState::Unhealthy,
                reason: Some(TargetReason::ResponseCodeMismatch),
                outstanding: 1,
                requests: 1,
            }]
        );
        drop(picked);
        assert_eq!(group.describe()[0].outstanding, 0);
        assert_eq!(group.host_counts(), (0, 1));
    }

    #[test]
    fn set_targets_keeps_the_state_of_targets_that_stay() {
        let group = group("web", &[1, 1]);
        group.set_state(addr(2), TargetState::Unhealthy);
        let held = group.pick(None).unwrap();
        assert_eq!(held.addr, addr(1));
        group.set_targets(vec![
            TargetAddr::with_weight(addr(2), 4),
            TargetAddr::new(addr(3)),
            TargetAddr::with_weight(addr(1), 2),
        ]);
        let status = group.describe();
        let by_addr: HashMap<_, _> = status.iter().map(|s| (s.addr, s)).collect();
        assert_eq!(by_addr.len(), 3);
        assert_eq!(by_addr[&addr(2)].state, TargetState::Unhealthy);
        assert_eq!(by_addr[&addr(2)].weight, 4);
        assert_eq!(by_addr[&addr(1)].outstanding, 1);
        assert_eq!(by_addr[&addr(1)].weight, 2);
        assert_eq!(by_addr[&addr(3)].state, TargetState::Healthy);
        group.set_targets(vec![TargetAddr::new(addr(3))]);
        assert_eq!(group.describe().len(), 1);
        // The request in flight on a removed target still finishes and releases cleanly.
        drop(held);
        assert!(!group.deregister(addr(1)));
        assert!(!group.set_state(addr(1), TargetState::Healthy));
    }

    #[test]
    fn concurrent_picks_keep_counters_consistent() {
        const THREADS: usize = 4;
        const PICKS: usize = 2000;
        // The picking threads claim copies of the per-thread request counts.
        let _copies = crate::metrics::cells::many_threads();
        for algorithm in [
            "round_robin",
            "least_outstanding_requests",
            "weighted_random",
        ] {
            let group = Arc::new(group(&format!("web,algorithm={algorithm}"), &[1, 2, 3]));
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    let group = Arc::clone(&group);
                    std::thread::spawn(move || {
                        let mut held = Vec::new();
                        for i in 0..PICKS {
                            held.push(group.pick(None).expect("a target"));
                            if i % 3 == 0 {
                                held.clear();
                            }
                        }
                    })
                })
                .collect();
            for handle in handles {
                handle.join().expect("picking thread");
            }
            let status = group.describe();
            assert!(
                status.iter().all(|s| s.outstanding == 0),
                "{algorithm}: {status:?}"
            );
            let total: u64 = status.iter().map(|s| s.requests).sum();
            assert_eq!(total, (THREADS * PICKS) as u64, "{algorithm}");
            assert_eq!(group.counters().requests, total, "{algorithm}");
        }
    }

    #[test]
    fn round_robin_stays_exact_under_concurrency() {
        let _copies = crate::metrics::cells::many_threads();
        let group = Arc::new(group("web", &[1, 1, 1, 1]));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let group = Arc::clone(&group);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        drop(group.pick(None));
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("picking thread");
        }
        assert!(group.describe().iter().all(|s| s.requests == 1000));
    }

    fn member(n: u8, state: TargetState, takes_new: bool) -> Member {
        Member {
            addr: addr(n),
            weight: 1,
            state,
            reason: None,
            takes_new,
            slow_start: None,
        }
    }

    #[test]
    fn apply_routes_only_to_members_that_take_new_requests() {
        let group = group("web", &[]);
        group.apply(
            &[
                member(1, TargetState::Healthy, true),
                member(2, TargetState::Draining, false),
                member(3, TargetState::Initial, false),
            ],
            false,
        );
        assert_eq!(counts(&group, 6)[&addr(1)], 6);
        assert_eq!(group.counters().unhealthy_routing_requests, 0);
        // Failing open as the registry decided: picks count as unhealthy routing.
        group.apply(
            &[
                member(1, TargetState::Unhealthy, true),
                member(3, TargetState::Initial, true),
            ],
            true,
        );
        let spread = counts(&group, 4);
        assert_eq!((spread[&addr(1)], spread[&addr(3)]), (2, 2));
        assert_eq!(group.counters().unhealthy_routing_requests, 4);
        assert_eq!(group.describe().len(), 2);
    }

    #[test]
    fn a_target_leaving_the_group_closes_what_is_still_open_on_it() {
        let group = group("web", &[1, 1]);
        let held: Vec<Picked> = (0..2).map(|_| group.pick(None).unwrap()).collect();
        let (stays, leaves) = if held[0].addr == addr(1) {
            (&held[0], &held[1])
        } else {
            (&held[1], &held[0])
        };
        // Made before the departure (as a request's watch is), ready after it.
        let mut owned = Box::pin(leaves.gone_owned());
        group.apply(&[member(1, TargetState::Healthy, true)], false);
        assert!(gone_now(leaves));
        assert!(owned.as_mut().poll(&mut noop_cx()).is_ready());
        assert!(leaves.left());
        assert!(!gone_now(stays));
        assert!(!stays.left());
        // A weight or state change is no departure.
        group.apply(&[member(1, TargetState::Draining, false)], false);
        assert!(!gone_now(stays));
        assert!(
            Box::pin(stays.gone_owned())
                .as_mut()
                .poll(&mut noop_cx())
                .is_pending()
        );
    }

    fn noop_cx() -> std::task::Context<'static> {
        std::task::Context::from_waker(std::task::Waker::noop())
    }

    /// Whether `p`'s [`Picked::gone`] is ready now.
    fn gone_now(p: &Picked) -> bool {
        std::pin::pin!(p.gone()).poll(&mut noop_cx()).is_ready()
    }

    #[test]
    fn slow_start_ramps_a_new_targets_share_linearly() {
        let group = group("web", &[]);
        let now = Instant::now();
        // Halfway through a 100 s ramp: one third of the requests (share 0.5 against 1).
        let ramping = Member {
            slow_start: Some(SlowStart {
                since: now - Duration::from_secs(50),
                duration: Duration::from_secs(100),
            }),
            ..member(2, TargetState::Healthy, true)
        };
        group.apply(&[member(1, TargetState::Healthy, true), ramping], false);
        let c = counts(&group, 300);
        assert_eq!((c[&addr(1)], c[&addr(2)]), (200, 100), "{c:?}");
        // The ramp's share follows the clock.
        let early = SlowStart {
            since: now,
            duration: Duration::from_secs(100),
        };
        assert_eq!(early.ramp(now), 1, "never starved completely");
        assert_eq!(early.ramp(now + Duration::from_secs(10)), 100);
        assert_eq!(early.ramp(now + Duration::from_secs(200)), SHARE_SCALE);
    }

    /// The forwarder (no connections) whose handles the picks keep, and how often a pick had
    /// to ask it.
    struct Handles {
        forwarder: crate::proxy::client::Forwarder,
        asked: std::cell::Cell<usize>,
    }

    impl Handles {
        fn new() -> Self {
            Self {
                forwarder: crate::proxy::client::Forwarder::new(Default::default()),
                asked: std::cell::Cell::new(0),
            }
        }

        /// The pick's handle, asking the forwarder (and counting it) only if the pick has none.
        fn of(&self, picked: &Picked) -> TargetHandle {
            picked
                .target_handle(|| {
                    self.asked.set(self.asked.get() + 1);
                    self.forwarder
                        .target(&crate::proxy::client::TargetEndpoint {
                            addr: picked.addr,
                            tls: None,
                            http2: false,
                        })
                })
                .clone()
        }
    }

    #[test]
    fn every_pick_of_a_target_hands_out_the_pool_handle_its_first_request_was_given() {
        let group = group("web", &[1, 1]);
        let handles = Handles::new();
        let first = group.pick(None).expect("a target");
        let a = handles.of(&first);
        assert_eq!(handles.asked.get(), 1);
        assert_eq!(a.endpoint().addr, first.addr);
        let mut seen = HashMap::new();
        for _ in 0..10 {
            let picked = group.pick(None).expect("a target");
            let handle = handles.of(&picked);
            assert_eq!(handle.endpoint().addr, picked.addr, "another target's pool");
            seen.entry(picked.addr).or_insert(handle);
        }
        // One request to the forwarder per target, none for the picks after it.
        assert_eq!(handles.asked.get(), 2);
        assert!(seen[&first.addr].same_pool(&a));
        // Control: the two targets' handles are different pools.
        assert!(!seen[&addr(1)].same_pool(&seen[&addr(2)]));
    }

    #[test]
    fn a_target_that_left_and_came_back_is_given_a_new_pool_handle() {
        let group = group("web", &[1]);
        let handles = Handles::new();
        let before = handles.of(&group.pick(None).expect("a target"));
        // Still registered (a state or weight change): the same handle, not asked again.
        group.set_state(addr(1), TargetState::Healthy);
        assert!(
            handles
                .of(&group.pick(None).expect("a target"))
                .same_pool(&before)
        );
        assert_eq!(handles.asked.get(), 1);
        // Gone, and the forwarder forgets its pool as the L7 sync has it do; then back.
        assert!(group.deregister(addr(1)));
        assert_eq!(handles.forwarder.retain_targets(|a| a != addr(1)), 1);
        group.register(TargetAddr::new(addr(1)));
        let after = handles.of(&group.pick(None).expect("a target"));
        assert_eq!(
            handles.asked.get(),
            2,
            "the old registration's handle was reused"
        );
        assert!(!after.same_pool(&before));
        // The new handle is the pool the forwarder lists (its `pool_` series).
        let listed = handles.forwarder.stats();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].target, addr(1));
        assert!(handles.forwarder.target(after.endpoint()).same_pool(&after));
    }

    #[test]
    fn two_groups_sending_to_the_same_endpoint_share_its_pool() {
        let (one, two) = (group("one", &[1]), group("two", &[1]));
        let handles = Handles::new();
        let a = handles.of(&one.pick(None).expect("a target"));
        let b = handles.of(&two.pick(None).expect("a target"));
        assert!(a.same_pool(&b));
        assert_eq!(
            (handles.asked.get(), handles.forwarder.stats().len()),
            (2, 1)
        );
    }
}
