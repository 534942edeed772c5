//! CloudWatch-named metrics of both planes: one table of descriptors ([`DESCRIPTORS`]), a
//! collect step per source, a short history for CloudWatch's 1- and 5-minute periods, and the
//! Prometheus text format.
//!
//! - Sources: the L7 tier's lock-free cells ([`cells`], fed from each request's record), the
//!   XDP per-CPU maps ([`l4`]), the registry (HealthyHostCount/UnHealthyHostCount), the
//!   connection pool and the log writers. Each collect step turns its source into [`Series`].
//! - [`history::Hub`] samples every source every [`history::SAMPLE_INTERVAL`] and answers
//!   with totals, sums over the last 1 and 5 minutes, rates, percentiles, PeakPacketsPerSecond
//!   and ConsumedLCUs ([`history::Report`]): what `lb stats` and the admin API show.
//! - [`prometheus`] renders the same numbers for a scraper (`GET /metrics`).
//!
//! Every descriptor carries its CloudWatch name and its Prometheus name; the mapping is the
//! table itself (listed in the README). A metric CloudWatch reports at several levels exists
//! once per level here, each with its own Prometheus family, so summing a family never counts
//! a request twice.
use serde::{Deserialize, Serialize};

pub mod cells;
pub mod history;
pub mod l4;
pub mod l7;
pub mod prometheus;

pub use cells::{Counter, GroupCells, Histogram, HistogramSnapshot, ListenerCells, TargetCells};

/// How a metric behaves over time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Only grows (until the process restarts).
    Counter,
    /// A value now.
    Gauge,
    /// A distribution (TargetResponseTime).
    Histogram,
}

/// CloudWatch's unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// `Count`.
    Count,
    /// `Bytes`.
    Bytes,
    /// `Seconds`.
    Seconds,
    /// `None` (a ratio).
    None,
}

impl Unit {
    /// CloudWatch's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Count => "Count",
            Self::Bytes => "Bytes",
            Self::Seconds => "Seconds",
            Self::None => "None",
        }
    }
}

/// The statistic CloudWatch recommends for the metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Statistic {
    /// `Sum`.
    Sum,
    /// `Average` (and percentiles for TargetResponseTime).
    Average,
    /// `Maximum`.
    Maximum,
}

impl Statistic {
    /// CloudWatch's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sum => "Sum",
            Self::Average => "Average",
            Self::Maximum => "Maximum",
        }
    }
}

/// What a series is about: its dimensions, as Prometheus label names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One L7 listener (CloudWatch: the load balancer; sum over listeners for it).
    Listener,
    /// One target group (L7 or L4).
    TargetGroup,
    /// One target of a target group.
    Target,
    /// One L4 VIP.
    Vip,
    /// One backend of an L4 VIP.
    VipTarget,
    /// One packet outcome (`reason`).
    Reason,
    /// One target endpoint of the connection pool.
    PoolTarget,
    /// One log (`access`, `health_check`).
    Log,
    /// One L7 worker (`--l7-runtime per-worker`), by index from 0.
    Worker,
    /// One target endpoint of one L7 worker's shard of the connection pool.
    WorkerPoolTarget,
}

impl Scope {
    /// Label names, in order.
    pub fn labels(self) -> &'static [&'static str] {
        match self {
            Self::Listener => &["listener"],
            Self::TargetGroup => &["target_group"],
            Self::Target => &["target_group", "target"],
            Self::Vip => &["vip"],
            Self::VipTarget => &["vip", "target"],
            Self::Reason => &["reason"],
            Self::PoolTarget => &["target"],
            Self::Log => &["log"],
            Self::Worker => &["worker"],
            Self::WorkerPoolTarget => &["worker", "target"],
        }
    }
}

/// One metric: how CloudWatch and Prometheus call it and what it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Its id.
    pub id: Metric,
    /// CloudWatch's name (AWS's where AWS has the metric; `lb`'s own in the same style).
    pub name: &'static str,
    /// Prometheus family name (`_total` on counters, `_seconds` on the histogram).
    pub prometheus: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// CloudWatch unit.
    pub unit: Unit,
    /// The statistic to read it with.
    pub statistic: Statistic,
    /// Its dimensions.
    pub scope: Scope,
    /// One line of meaning (the Prometheus HELP text).
    pub help: &'static str,
}

macro_rules! metrics {
    ($($id:ident: $name:literal, $prom:literal, $kind:ident, $unit:ident, $stat:ident, $scope:ident, $help:literal;)*) => {
        /// Every metric, in [`DESCRIPTORS`] order.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[allow(non_camel_case_types, reason = "CloudWatch's names, with their underscores")]
        pub enum Metric {
            $(#[doc = $help] $id,)*
        }

        /// The descriptor table: every metric `lb` reports, once.
        pub const DESCRIPTORS: &[Descriptor] = &[
            $(Descriptor {
                id: Metric::$id,
                name: $name,
                prometheus: $prom,
                kind: Kind::$kind,
                unit: Unit::$unit,
                statistic: Statistic::$stat,
                scope: Scope::$scope,
                help: $help,
            },)*
        ];
    };
}

metrics! {
    // L7, per listener (CloudWatch: per load balancer).
    ActiveConnectionCount: "ActiveConnectionCount", "lb_active_connections", Gauge, Count, Sum, Listener,
        "Client connections open now.";
    NewConnectionCount: "NewConnectionCount", "lb_new_connection_count_total", Counter, Count, Sum, Listener,
        "Client connections accepted (rejected ones included).";
    RejectedConnectionCount: "RejectedConnectionCount", "lb_rejected_connection_count_total", Counter, Count, Sum, Listener,
        "Client connections closed at once because max-connections or max-connections-per-source was reached.";
    ClientTLSNegotiationErrorCount: "ClientTLSNegotiationErrorCount", "lb_client_tls_negotiation_error_count_total", Counter, Count, Sum, Listener,
        "TLS handshakes with clients that failed or timed out.";
    ProcessedBytes: "ProcessedBytes", "lb_processed_bytes_total", Counter, Bytes, Sum, Listener,
        "Request and response bytes (heads and bodies) exchanged with clients.";
    RequestCount: "RequestCount", "lb_request_count_total", Counter, Count, Sum, Listener,
        "Requests for which a target was chosen.";
    HTTPCode_ELB_3XX_Count: "HTTPCode_ELB_3XX_Count", "lb_http_code_elb_3xx_count_total", Counter, Count, Sum, Listener,
        "3XX responses generated by the load balancer (redirects).";
    HTTPCode_ELB_4XX_Count: "HTTPCode_ELB_4XX_Count", "lb_http_code_elb_4xx_count_total", Counter, Count, Sum, Listener,
        "4XX responses generated by the load balancer (460 included).";
    HTTPCode_ELB_5XX_Count: "HTTPCode_ELB_5XX_Count", "lb_http_code_elb_5xx_count_total", Counter, Count, Sum, Listener,
        "5XX responses generated by the load balancer.";
    HTTPCode_ELB_500_Count: "HTTPCode_ELB_500_Count", "lb_http_code_elb_500_count_total", Counter, Count, Sum, Listener,
        "500 responses generated by the load balancer.";
    HTTPCode_ELB_502_Count: "HTTPCode_ELB_502_Count", "lb_http_code_elb_502_count_total", Counter, Count, Sum, Listener,
        "502 responses generated by the load balancer.";
    HTTPCode_ELB_503_Count: "HTTPCode_ELB_503_Count", "lb_http_code_elb_503_count_total", Counter, Count, Sum, Listener,
        "503 responses generated by the load balancer.";
    HTTPCode_ELB_504_Count: "HTTPCode_ELB_504_Count", "lb_http_code_elb_504_count_total", Counter, Count, Sum, Listener,
        "504 responses generated by the load balancer.";
    RuleEvaluations: "RuleEvaluations", "lb_rule_evaluations_total", Counter, Count, Sum, Listener,
        "Listener rules evaluated.";
    LCURuleEvaluations: "LCURuleEvaluations", "lb_lcu_rule_evaluations_total", Counter, Count, Sum, Listener,
        "Rule evaluations beyond the first 10 of each request (the LCU rule dimension).";
    HTTP_Fixed_Response_Count: "HTTP_Fixed_Response_Count", "lb_http_fixed_response_count_total", Counter, Count, Sum, Listener,
        "Fixed-response actions executed.";
    HTTP_Redirect_Count: "HTTP_Redirect_Count", "lb_http_redirect_count_total", Counter, Count, Sum, Listener,
        "Redirect actions executed.";
    DesyncMitigationMode_NonCompliant_Request_Count: "DesyncMitigationMode_NonCompliant_Request_Count", "lb_desync_mitigation_mode_non_compliant_request_count_total", Counter, Count, Sum, Listener,
        "Requests classified other than compliant (whatever the mode did with them).";
    ConsumedLCUs: "ConsumedLCUs", "lb_consumed_lcus", Gauge, Count, Sum, Listener,
        "Load balancer capacity units used over the last minute (max of the four LCU dimensions).";
    HeaderTimeoutCount: "HeaderTimeoutCount", "lb_header_timeout_count_total", Counter, Count, Sum, Listener,
        "HTTP/1 request heads not complete within header-timeout (answered 408).";
    HTTP2AbusiveConnectionCount: "HTTP2AbusiveConnectionCount", "lb_http2_abusive_connection_count_total", Counter, Count, Sum, Listener,
        "HTTP/2 connections closed for cancelling their streams (rapid reset).";
    // L7, per target group.
    TargetGroupRequestCount: "RequestCount", "lb_target_group_request_count_total", Counter, Count, Sum, TargetGroup,
        "Requests sent to a target of the group.";
    TargetGroupHTTPCode_Target_2XX_Count: "HTTPCode_Target_2XX_Count", "lb_target_group_http_code_target_2xx_count_total", Counter, Count, Sum, TargetGroup,
        "2XX responses from the group's targets.";
    TargetGroupHTTPCode_Target_3XX_Count: "HTTPCode_Target_3XX_Count", "lb_target_group_http_code_target_3xx_count_total", Counter, Count, Sum, TargetGroup,
        "3XX responses from the group's targets.";
    TargetGroupHTTPCode_Target_4XX_Count: "HTTPCode_Target_4XX_Count", "lb_target_group_http_code_target_4xx_count_total", Counter, Count, Sum, TargetGroup,
        "4XX responses from the group's targets.";
    TargetGroupHTTPCode_Target_5XX_Count: "HTTPCode_Target_5XX_Count", "lb_target_group_http_code_target_5xx_count_total", Counter, Count, Sum, TargetGroup,
        "5XX responses from the group's targets.";
    TargetGroupTargetResponseTime: "TargetResponseTime", "lb_target_group_target_response_time_seconds", Histogram, Seconds, Average, TargetGroup,
        "From sending the request to the target until its response head arrived.";
    TargetGroupTargetConnectionErrorCount: "TargetConnectionErrorCount", "lb_target_group_target_connection_error_count_total", Counter, Count, Sum, TargetGroup,
        "Connections to the group's targets that could not be established.";
    TargetGroupTargetTLSNegotiationErrorCount: "TargetTLSNegotiationErrorCount", "lb_target_group_target_tls_negotiation_error_count_total", Counter, Count, Sum, TargetGroup,
        "TLS handshakes with the group's targets that failed.";
    NonStickyRequestCount: "NonStickyRequestCount", "lb_target_group_non_sticky_request_count_total", Counter, Count, Sum, TargetGroup,
        "Requests of a sticky group that no valid stickiness cookie pinned.";
    UnhealthyRoutingRequestCount: "UnhealthyRoutingRequestCount", "lb_target_group_unhealthy_routing_request_count_total", Counter, Count, Sum, TargetGroup,
        "Requests routed while the group failed open.";
    HealthyHostCount: "HealthyHostCount", "lb_target_group_healthy_hosts", Gauge, Count, Maximum, TargetGroup,
        "Targets in service (healthy, or unavailable with checks off).";
    UnHealthyHostCount: "UnHealthyHostCount", "lb_target_group_unhealthy_hosts", Gauge, Count, Maximum, TargetGroup,
        "Registered targets not in service (initial, unhealthy); draining and unused ones are not counted.";
    // L7, per target.
    RequestCountPerTarget: "RequestCountPerTarget", "lb_target_request_count_total", Counter, Count, Sum, Target,
        "Requests sent to the target.";
    TargetHTTPCode_Target_2XX_Count: "HTTPCode_Target_2XX_Count", "lb_target_http_code_target_2xx_count_total", Counter, Count, Sum, Target,
        "2XX responses from the target.";
    TargetHTTPCode_Target_3XX_Count: "HTTPCode_Target_3XX_Count", "lb_target_http_code_target_3xx_count_total", Counter, Count, Sum, Target,
        "3XX responses from the target.";
    TargetHTTPCode_Target_4XX_Count: "HTTPCode_Target_4XX_Count", "lb_target_http_code_target_4xx_count_total", Counter, Count, Sum, Target,
        "4XX responses from the target.";
    TargetHTTPCode_Target_5XX_Count: "HTTPCode_Target_5XX_Count", "lb_target_http_code_target_5xx_count_total", Counter, Count, Sum, Target,
        "5XX responses from the target.";
    TargetTargetResponseTime: "TargetResponseTime", "lb_target_response_time_seconds", Histogram, Seconds, Average, Target,
        "From sending the request to the target until its response head arrived.";
    TargetTargetConnectionErrorCount: "TargetConnectionErrorCount", "lb_target_connection_error_count_total", Counter, Count, Sum, Target,
        "Connections to the target that could not be established.";
    // L7 connection pool (lb's own), per target endpoint.
    PooledConnectionReuseCount: "PooledConnectionReuseCount", "lb_pool_reused_connection_count_total", Counter, Count, Sum, PoolTarget,
        "Requests sent over a pooled keep-alive connection.";
    NewTargetConnectionCount: "NewTargetConnectionCount", "lb_pool_new_connection_count_total", Counter, Count, Sum, PoolTarget,
        "Connections made to the target.";
    PooledConnectionReuseRatio: "PooledConnectionReuseRatio", "lb_pool_reuse_ratio", Gauge, None, Average, PoolTarget,
        "Share of requests that reused a pooled connection (since start).";
    StaleConnectionRetryCount: "StaleConnectionRetryCount", "lb_pool_stale_connection_retry_count_total", Counter, Count, Sum, PoolTarget,
        "Requests sent again on a new connection after a pooled one turned out closed by the target.";
    ConnectionRetiredEarlyCount: "ConnectionRetiredEarlyCount", "lb_pool_retired_early_count_total", Counter, Count, Sum, PoolTarget,
        "Idle connections retired before the target's learned or announced idle timeout.";
    UnprovenReuseAvoidedCount: "UnprovenReuseAvoidedCount", "lb_pool_unproven_reuse_avoided_count_total", Counter, Count, Sum, PoolTarget,
        "Requests that could not be retried and took a new connection rather than an idle one of unproven age.";
    IdleTargetConnectionCount: "IdleTargetConnectionCount", "lb_pool_idle_connections", Gauge, Count, Sum, PoolTarget,
        "Idle pooled connections now.";
    // L7 workers (lb's own; `--l7-runtime per-worker` only), per worker.
    WorkerNewConnectionCount: "WorkerNewConnectionCount", "lb_worker_new_connection_count_total", Counter, Count, Sum, Worker,
        "Client connections the L7 worker accepted, over all listeners (rejected ones included; a connection handed over by balanced accept counts where it was accepted).";
    WorkerActiveConnectionCount: "WorkerActiveConnectionCount", "lb_worker_active_connections", Gauge, Count, Sum, Worker,
        "Client connections the L7 worker serves now, wherever they were accepted.";
    // L7 connection pool (lb's own; `--l7-runtime per-worker` only), per worker and target.
    ForeignWorkerReuseCount: "ForeignWorkerReuseCount", "lb_pool_foreign_worker_reuse_count_total", Counter, Count, Sum, WorkerPoolTarget,
        "Pooled target connections (HTTP/1.1 ones, the HTTP/2 connection) of the worker's pool shard taken for a request by another worker (0 while each worker keeps to its own shard).";
    // L4, per VIP.
    ProcessedPackets: "ProcessedPackets", "lb_vip_processed_packets_total", Counter, Count, Sum, Vip,
        "Packets of the VIP's flows steered to a backend.";
    VipProcessedBytes: "ProcessedBytes", "lb_vip_processed_bytes_total", Counter, Bytes, Sum, Vip,
        "Bytes of those packets (client to target: with direct server return, replies bypass the balancer).";
    NewFlowCount: "NewFlowCount", "lb_vip_new_flow_count_total", Counter, Count, Sum, Vip,
        "Flows created.";
    ActiveFlowCount: "ActiveFlowCount", "lb_vip_active_flows", Gauge, Count, Sum, Vip,
        "Flows seen within the idle timeout (TCP 350 s, UDP 120 s).";
    UnhealthyRoutingFlowCount: "UnhealthyRoutingFlowCount", "lb_vip_unhealthy_routing_flow_count_total", Counter, Count, Sum, Vip,
        "Flows created while the VIP's group failed open.";
    PeakPacketsPerSecond: "PeakPacketsPerSecond", "lb_vip_peak_packets_per_second", Gauge, Count, Maximum, Vip,
        "Highest 10-second average packet rate over the last minute.";
    // L4, per VIP backend.
    VipTargetProcessedPackets: "ProcessedPackets", "lb_vip_target_processed_packets_total", Counter, Count, Sum, VipTarget,
        "Packets steered to the backend.";
    VipTargetProcessedBytes: "ProcessedBytes", "lb_vip_target_processed_bytes_total", Counter, Bytes, Sum, VipTarget,
        "Bytes steered to the backend.";
    VipTargetNewFlowCount: "NewFlowCount", "lb_vip_target_new_flow_count_total", Counter, Count, Sum, VipTarget,
        "Flows created to the backend.";
    VipTargetActiveFlowCount: "ActiveFlowCount", "lb_vip_target_active_flows", Gauge, Count, Sum, VipTarget,
        "Flows to the backend seen within the idle timeout.";
    // L4, per packet outcome.
    PacketOutcomeCount: "PacketOutcomeCount", "lb_xdp_packets_total", Counter, Count, Sum, Reason,
        "Packets lb_xdp handled, by outcome (every packet counted under exactly one).";
    HealthCheckProbePacketCount: "HealthCheckProbePacketCount", "lb_hc_encap_packets_total", Counter, Count, Sum, Reason,
        "Packets lb_hc_encap handled on egress, by outcome.";
    NextHopCacheCount: "NextHopCacheCount", "lb_xdp_nexthop_total", Counter, Count, Sum, Reason,
        "lb_xdp's next-hop cache: route lookups for a backend (nexthop_lookups: misses and packets longer than the cached entry allows) and lookups cached (nexthop_cached).";
    // Logs.
    LogLinesWritten: "LogLinesWritten", "lb_log_lines_written_total", Counter, Count, Sum, Log,
        "Log lines written.";
    LogLinesDropped: "LogLinesDropped", "lb_log_lines_dropped_total", Counter, Count, Sum, Log,
        "Log lines dropped because the writer could not keep up.";
}

impl Metric {
    /// Its descriptor.
    pub fn descriptor(self) -> &'static Descriptor {
        &DESCRIPTORS[self as usize]
    }
}

/// A value now.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A counter's total.
    Count(u64),
    /// A gauge.
    Gauge(f64),
    /// A histogram's buckets.
    Histogram(HistogramSnapshot),
}

/// One series of one metric: its labels (in [`Scope::labels`] order) and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Which metric.
    pub metric: Metric,
    /// Label values.
    pub labels: Vec<String>,
    /// The value now.
    pub value: Value,
}

impl Series {
    /// A counter series.
    pub fn count(metric: Metric, labels: Vec<String>, n: u64) -> Self {
        Self {
            metric,
            labels,
            value: Value::Count(n),
        }
    }

    /// A gauge series.
    pub fn gauge(metric: Metric, labels: Vec<String>, v: f64) -> Self {
        Self {
            metric,
            labels,
            value: Value::Gauge(v),
        }
    }

    /// A key unique to the metric and labels.
    pub fn key(&self) -> (Metric, Vec<String>) {
        (self.metric, self.labels.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn the_table_is_indexed_by_metric_and_names_are_unique_and_valid() {
        let mut proms = HashSet::new();
        for (i, d) in DESCRIPTORS.iter().enumerate() {
            assert_eq!(d.id as usize, i, "{d:?}");
            assert!(proms.insert(d.prometheus), "duplicate {}", d.prometheus);
            assert!(
                d.prometheus
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    && d.prometheus.starts_with("lb_"),
                "{}",
                d.prometheus
            );
            match d.kind {
                Kind::Counter => assert!(d.prometheus.ends_with("_total"), "{}", d.prometheus),
                Kind::Histogram => assert!(d.prometheus.ends_with("_seconds"), "{}", d.prometheus),
                // promtool's lint: only counters end in _total, only histograms in _count.
                Kind::Gauge => assert!(
                    !d.prometheus.ends_with("_total") && !d.prometheus.ends_with("_count"),
                    "{}",
                    d.prometheus
                ),
            }
            assert!(!d.help.is_empty());
        }
    }
}
