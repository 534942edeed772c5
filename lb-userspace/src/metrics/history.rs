//! The daemon's metrics hub: its sources, a 5-minute history sampled every 10 s, and the
//! report `lb stats` and the admin API show: totals, sums over the last 1 and 5 minutes
//! (CloudWatch's periods), rates, TargetResponseTime percentiles, PeakPacketsPerSecond (the
//! highest 10-second average of the last minute) and ConsumedLCUs.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::cells::HistogramSnapshot;
use super::{DESCRIPTORS, Kind, Metric, Series, Value};

/// How often the hub samples its sources (PeakPacketsPerSecond is the highest average over
/// one such interval, as NLB's is over 10 s).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(10);
/// CloudWatch's standard period.
pub const ONE_MINUTE: Duration = Duration::from_secs(60);
/// The longer period `lb stats` shows.
pub const FIVE_MINUTES: Duration = Duration::from_secs(300);

/// LCU dimensions (ALB): new connections per second, active connections, processed GB per
/// hour, rule evaluations per second (beyond 10 per request), each per LCU.
pub const LCU_NEW_CONNECTIONS_PER_SECOND: f64 = 25.0;
/// Active connections per LCU.
pub const LCU_ACTIVE_CONNECTIONS: f64 = 3000.0;
/// Processed gigabytes per hour per LCU.
pub const LCU_GB_PER_HOUR: f64 = 1.0;
/// Rule evaluations per second per LCU.
pub const LCU_RULE_EVALUATIONS_PER_SECOND: f64 = 1000.0;

/// A metric source: appends its series now.
pub type Source = Box<dyn Fn(&mut Vec<Series>) + Send + Sync>;

type Key = (Metric, Vec<String>);

struct Sample {
    at: Instant,
    values: HashMap<Key, Value>,
}

/// The metrics of a running daemon.
pub struct Hub {
    sources: Vec<Source>,
    history: Mutex<VecDeque<Sample>>,
    started: Instant,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("sources", &self.sources.len())
            .finish()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// A hub without sources.
    pub fn new() -> Self {
        Self {
            sources: Vec::new(),
            history: Mutex::new(VecDeque::new()),
            started: Instant::now(),
        }
    }

    /// Adds a source (before the hub is shared).
    pub fn add_source(&mut self, source: Source) {
        self.sources.push(source);
    }

    /// Every source's series now.
    pub fn collect(&self) -> Vec<Series> {
        let mut out = Vec::new();
        for s in &self.sources {
            s(&mut out);
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a sample into the history (every [`SAMPLE_INTERVAL`]; also once at start, as
    /// the baseline of the first windows).
    pub fn sample(&self) {
        let series = self.collect();
        self.push(Instant::now(), series);
    }

    fn push(&self, at: Instant, series: Vec<Series>) {
        let values = series
            .into_iter()
            .filter(|s| s.metric.descriptor().kind != Kind::Gauge)
            .map(|s| (s.key(), s.value))
            .collect();
        let mut h = self.lock();
        h.push_back(Sample { at, values });
        // Keep one sample older than five minutes: the baseline of the 5-minute window.
        while h.len() > 2 && h[1].at + FIVE_MINUTES <= at {
            h.pop_front();
        }
    }

    /// Samples every [`SAMPLE_INTERVAL`] until the task is dropped (collecting in a blocking
    /// thread: the L4 step makes system calls).
    pub async fn run(self: std::sync::Arc<Self>) {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let hub = self.clone();
            let _ = tokio::task::spawn_blocking(move || hub.sample()).await;
        }
    }

    /// The series now, with the gauges derived from the history (PeakPacketsPerSecond,
    /// ConsumedLCUs): what Prometheus scrapes.
    pub fn current(&self) -> Vec<Series> {
        let now = Instant::now();
        let mut series = self.collect();
        let derived = {
            let h = self.lock();
            derived(&series, &h, now)
        };
        series.extend(derived);
        series
    }

    /// The report of everything now: totals, windows, rates, percentiles, derived gauges.
    pub fn report(&self) -> Report {
        let now = Instant::now();
        let series = self.current();
        let h = self.lock();
        report(&series, &h, now, now.duration_since(self.started))
    }
}

/// The newest sample at least `window` old, else the oldest one: the baseline of a window.
fn baseline(h: &VecDeque<Sample>, now: Instant, window: Duration) -> Option<&Sample> {
    h.iter()
        .rev()
        .find(|s| s.at + window <= now)
        .or_else(|| h.front())
}

fn count_of(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::Count(n)) => *n,
        _ => 0,
    }
}

/// `now - then`, a counter reset (a target re-registered) read as counting from zero.
fn delta(now: u64, then: u64) -> u64 {
    if now >= then { now - then } else { now }
}

fn derived(series: &[Series], h: &VecDeque<Sample>, now: Instant) -> Vec<Series> {
    let mut out = Vec::new();
    let base = baseline(h, now, ONE_MINUTE);
    let elapsed = base.map(|b| now.duration_since(b.at).as_secs_f64());
    let value = |m: Metric, labels: &[String]| {
        series
            .iter()
            .find(|s| s.metric == m && s.labels == labels)
            .map(|s| &s.value)
    };
    let rate = |m: Metric, labels: &[String]| -> f64 {
        let (Some(b), Some(e)) = (base, elapsed) else {
            return 0.0;
        };
        if e < 1.0 {
            return 0.0;
        }
        let d = delta(
            count_of(value(m, labels)),
            count_of(b.values.get(&(m, labels.to_vec()))),
        );
        d as f64 / e
    };
    for s in series {
        match s.metric {
            Metric::ProcessedPackets => {
                // Consecutive points within the last minute, the newest being now.
                let mut points: Vec<(Instant, u64)> = Vec::new();
                if let Some(b) = base {
                    points.push((b.at, count_of(b.values.get(&s.key()))));
                }
                for smp in h.iter().filter(|x| x.at + ONE_MINUTE > now) {
                    if base.is_some_and(|b| b.at == smp.at) {
                        continue;
                    }
                    points.push((smp.at, count_of(smp.values.get(&s.key()))));
                }
                points.push((now, count_of(Some(&s.value))));
                let peak = points
                    .windows(2)
                    .filter_map(|w| {
                        let dt = w[1].0.duration_since(w[0].0).as_secs_f64();
                        (dt >= 1.0).then(|| delta(w[1].1, w[0].1) as f64 / dt)
                    })
                    .fold(0.0, f64::max);
                out.push(Series::gauge(
                    Metric::PeakPacketsPerSecond,
                    s.labels.clone(),
                    peak,
                ));
            }
            Metric::NewConnectionCount => {
                let l = &s.labels;
                let active = match value(Metric::ActiveConnectionCount, l) {
                    Some(Value::Gauge(v)) => *v,
                    _ => 0.0,
                };
                let new_per_s = rate(Metric::NewConnectionCount, l);
                let gb_per_hour = rate(Metric::ProcessedBytes, l) * 3600.0 / 1e9;
                let rules_per_s = rate(Metric::LCURuleEvaluations, l);
                let lcu = (new_per_s / LCU_NEW_CONNECTIONS_PER_SECOND)
                    .max(active / LCU_ACTIVE_CONNECTIONS)
                    .max(gb_per_hour / LCU_GB_PER_HOUR)
                    .max(rules_per_s / LCU_RULE_EVALUATIONS_PER_SECOND);
                out.push(Series::gauge(Metric::ConsumedLCUs, l.clone(), lcu));
            }
            _ => {}
        }
    }
    out
}

/// Count, mean and percentiles of a histogram (seconds).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HistogramStats {
    /// Observations.
    pub count: u64,
    /// Mean (absent without observations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub average: Option<f64>,
    /// Median.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50: Option<f64>,
    /// 90th percentile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p90: Option<f64>,
    /// 99th percentile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99: Option<f64>,
}

impl HistogramStats {
    fn of(h: &HistogramSnapshot) -> Self {
        Self {
            count: h.count,
            average: h.average(),
            p50: h.quantile(0.5),
            p90: h.quantile(0.9),
            p99: h.quantile(0.99),
        }
    }
}

/// One series of the report, dimensions flattened in (`"listener": "web"`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SeriesReport {
    /// CloudWatch name.
    pub metric: String,
    /// Prometheus family.
    pub prometheus: String,
    /// CloudWatch unit.
    pub unit: String,
    /// CloudWatch statistic.
    pub statistic: String,
    /// Label name → value.
    #[serde(flatten)]
    pub dimensions: BTreeMap<String, String>,
    /// Gauges: the value now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Counters: since the daemon started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Counters: over the last minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sum_1m: Option<u64>,
    /// Counters: over the last 5 minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sum_5m: Option<u64>,
    /// Counters: per second over the last minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_second: Option<f64>,
    /// Histograms: since the daemon started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<HistogramStats>,
    /// Histograms: over the last minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_1m: Option<HistogramStats>,
    /// Histograms: over the last 5 minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_5m: Option<HistogramStats>,
}

/// Everything the daemon measures, now.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// When (ISO 8601).
    pub time: String,
    /// How long the daemon has run (windows shorter than their period cover this much).
    pub uptime_seconds: f64,
    /// Every series, in descriptor order.
    pub series: Vec<SeriesReport>,
}

impl SeriesReport {
    /// A report line for `s` with no window (what `lb stats` builds from the pinned maps).
    pub fn plain(s: &Series) -> Self {
        let d = s.metric.descriptor();
        let mut r = Self {
            metric: d.name.to_owned(),
            prometheus: d.prometheus.to_owned(),
            unit: d.unit.as_str().to_owned(),
            statistic: d.statistic.as_str().to_owned(),
            dimensions: d
                .scope
                .labels()
                .iter()
                .map(|l| (*l).to_owned())
                .zip(s.labels.iter().cloned())
                .collect(),
            ..Self::default()
        };
        match &s.value {
            Value::Count(n) => r.total = Some(*n),
            Value::Gauge(v) => r.value = Some(*v),
            Value::Histogram(h) => r.all = Some(HistogramStats::of(h)),
        }
        r
    }
}

fn report(series: &[Series], h: &VecDeque<Sample>, now: Instant, uptime: Duration) -> Report {
    let b1 = baseline(h, now, ONE_MINUTE);
    let b5 = baseline(h, now, FIVE_MINUTES);
    let mut out: Vec<SeriesReport> = series
        .iter()
        .map(|s| {
            let mut r = SeriesReport::plain(s);
            let key = s.key();
            match &s.value {
                Value::Count(n) => {
                    let since = |b: Option<&Sample>| {
                        delta(*n, count_of(b.and_then(|b| b.values.get(&key))))
                    };
                    r.sum_1m = Some(since(b1));
                    r.sum_5m = Some(since(b5));
                    let secs = b1.map_or(0.0, |b| now.duration_since(b.at).as_secs_f64());
                    r.per_second = Some(if secs >= 1.0 {
                        since(b1) as f64 / secs
                    } else {
                        0.0
                    });
                }
                Value::Histogram(hs) => {
                    let since = |b: Option<&Sample>| match b.and_then(|b| b.values.get(&key)) {
                        Some(Value::Histogram(old)) => hs.since(old),
                        _ => hs.clone(),
                    };
                    r.last_1m = Some(HistogramStats::of(&since(b1)));
                    r.last_5m = Some(HistogramStats::of(&since(b5)));
                }
                Value::Gauge(_) => {}
            }
            r
        })
        .collect();
    // Descriptor order, then labels: stable output.
    let order: HashMap<&str, usize> = DESCRIPTORS
        .iter()
        .enumerate()
        .map(|(i, d)| (d.prometheus, i))
        .collect();
    out.sort_by(|a, b| {
        order
            .get(a.prometheus.as_str())
            .cmp(&order.get(b.prometheus.as_str()))
            .then_with(|| a.dimensions.cmp(&b.dimensions))
    });
    let mut time = String::new();
    crate::accesslog::iso8601(SystemTime::now(), &mut time);
    Report {
        time,
        uptime_seconds: uptime.as_secs_f64(),
        series: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(h: &Hub, secs_ago: u64, series: Vec<Series>, now: Instant) {
        h.push(now - Duration::from_secs(secs_ago), series);
    }

    #[test]
    fn windows_subtract_the_newest_sample_old_enough() {
        let hub = Hub::new();
        let now = Instant::now() + Duration::from_secs(600);
        let vip = || vec!["10.0.0.1:80/tcp".to_owned()];
        at(
            &hub,
            400,
            vec![Series::count(Metric::NewFlowCount, vip(), 1)],
            now,
        );
        at(
            &hub,
            290,
            vec![Series::count(Metric::NewFlowCount, vip(), 10)],
            now,
        );
        at(
            &hub,
            70,
            vec![Series::count(Metric::NewFlowCount, vip(), 40)],
            now,
        );
        at(
            &hub,
            30,
            vec![Series::count(Metric::NewFlowCount, vip(), 50)],
            now,
        );
        let h = hub.lock();
        let r = report(
            &[Series::count(Metric::NewFlowCount, vip(), 100)],
            &h,
            now,
            Duration::from_secs(600),
        );
        let s = &r.series[0];
        assert_eq!(s.total, Some(100));
        assert_eq!(s.sum_1m, Some(60), "since the sample 70 s ago");
        assert_eq!(s.sum_5m, Some(99), "since the sample 400 s ago");
        assert!((s.per_second.unwrap() - 60.0 / 70.0).abs() < 1e-9);
        assert_eq!(s.dimensions["vip"], "10.0.0.1:80/tcp");
    }

    #[test]
    fn peak_packets_per_second_is_the_busiest_interval_of_the_last_minute() {
        let hub = Hub::new();
        let now = Instant::now() + Duration::from_secs(600);
        let vip = || vec!["v".to_owned()];
        for (ago, n) in [(90, 0), (60, 100), (50, 200), (40, 1200), (30, 1300)] {
            at(
                &hub,
                ago,
                vec![Series::count(Metric::ProcessedPackets, vip(), n)],
                now,
            );
        }
        let h = hub.lock();
        let d = derived(
            &[Series::count(Metric::ProcessedPackets, vip(), 1310)],
            &h,
            now,
        );
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].value,
            Value::Gauge(100.0),
            "1000 packets in the 10 s from 50 s ago"
        );
    }

    #[test]
    fn lcus_are_the_largest_dimension() {
        let hub = Hub::new();
        let now = Instant::now() + Duration::from_secs(600);
        let l = || vec!["web".to_owned()];
        at(
            &hub,
            60,
            vec![Series::count(Metric::NewConnectionCount, l(), 0)],
            now,
        );
        let h = hub.lock();
        let d = derived(
            &[
                Series::count(Metric::NewConnectionCount, l(), 3000),
                Series::gauge(Metric::ActiveConnectionCount, l(), 300.0),
            ],
            &h,
            now,
        );
        // 50 new connections per second = 2 LCU; 300 active = 0.1 LCU.
        assert_eq!(d[0].metric, Metric::ConsumedLCUs);
        assert_eq!(d[0].value, Value::Gauge(2.0));
    }
}
