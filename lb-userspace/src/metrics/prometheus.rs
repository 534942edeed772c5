//! The Prometheus text exposition format (version 0.0.4) of the metrics: one family per
//! descriptor, named by its `prometheus` field, labels from its scope, `# HELP` with the
//! CloudWatch name, TargetResponseTime as a histogram with cumulative `le` buckets.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::cells::BUCKETS;
use super::{DESCRIPTORS, Kind, Metric, Series, Value};

/// `Content-Type` of the format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders every series, grouped by family in descriptor order.
pub fn render(series: &[Series]) -> String {
    let mut by_metric: BTreeMap<Metric, Vec<&Series>> = BTreeMap::new();
    for s in series {
        by_metric.entry(s.metric).or_default().push(s);
    }
    let mut out = String::new();
    for d in DESCRIPTORS {
        let Some(list) = by_metric.get_mut(&d.id) else {
            continue;
        };
        list.sort_by(|a, b| a.labels.cmp(&b.labels));
        list.dedup_by(|a, b| a.labels == b.labels);
        let _ = writeln!(
            out,
            "# HELP {} {} (CloudWatch {}, {}).",
            d.prometheus,
            escape_help(d.help.trim_end_matches('.')),
            d.name,
            d.unit.as_str()
        );
        let kind = match d.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(out, "# TYPE {} {kind}", d.prometheus);
        let names = d.scope.labels();
        for s in list.iter() {
            let labels = |extra: Option<(&str, &str)>| {
                let mut l = String::new();
                let pairs = names
                    .iter()
                    .copied()
                    .zip(s.labels.iter().map(String::as_str))
                    .chain(extra);
                for (i, (k, v)) in pairs.enumerate() {
                    if i > 0 {
                        l.push(',');
                    }
                    let _ = write!(l, "{k}=\"{}\"", escape_label(v));
                }
                if l.is_empty() { l } else { format!("{{{l}}}") }
            };
            match &s.value {
                Value::Count(n) => {
                    let _ = writeln!(out, "{}{} {n}", d.prometheus, labels(None));
                }
                Value::Gauge(v) => {
                    let _ = writeln!(out, "{}{} {}", d.prometheus, labels(None), number(*v));
                }
                Value::Histogram(h) => {
                    let mut cumulative = 0u64;
                    for (i, n) in h.buckets.iter().enumerate() {
                        cumulative += n;
                        let le = BUCKETS
                            .get(i)
                            .map_or_else(|| "+Inf".to_owned(), |b| number(*b));
                        let _ = writeln!(
                            out,
                            "{}_bucket{} {cumulative}",
                            d.prometheus,
                            labels(Some(("le", &le)))
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{}_sum{} {}",
                        d.prometheus,
                        labels(None),
                        number(h.sum_micros as f64 / 1e6)
                    );
                    let _ = writeln!(out, "{}_count{} {}", d.prometheus, labels(None), h.count);
                }
            }
        }
    }
    out
}

/// A float as Prometheus writes it (`NaN`, `+Inf`, shortest round-trip otherwise).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::Histogram;

    #[test]
    fn families_have_help_type_and_escaped_labels() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(100));
        let text = render(&[
            Series::count(Metric::RequestCount, vec!["we\"b\\".into()], 3),
            Series::gauge(Metric::ActiveConnectionCount, vec!["web".into()], 2.0),
            Series {
                metric: Metric::TargetTargetResponseTime,
                labels: vec!["app".into(), "10.0.0.1:80".into()],
                value: Value::Histogram(h.snapshot()),
            },
        ]);
        assert!(
            text.contains("# TYPE lb_request_count_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("lb_request_count_total{listener=\"we\\\"b\\\\\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("lb_active_connections{listener=\"web\"} 2\n"));
        assert!(text.contains(
            "lb_target_response_time_seconds_bucket{target_group=\"app\",target=\"10.0.0.1:80\",le=\"0.005\"} 1\n"
        ));
        assert!(text.contains(
            "lb_target_response_time_seconds_bucket{target_group=\"app\",target=\"10.0.0.1:80\",le=\"+Inf\"} 2\n"
        ));
        assert!(text.contains(
            "lb_target_response_time_seconds_sum{target_group=\"app\",target=\"10.0.0.1:80\"} 100.003\n"
        ));
        assert!(text.contains("# HELP lb_request_count_total Requests for which a target was chosen (CloudWatch RequestCount, Count).\n"));
    }
}
