//! The L7 collect steps: the listeners', target groups' and targets' cells, the connection
//! pool, the per-worker counts, and the registry's host counts (both tiers' groups).
use super::{Metric, Series, Value};
use crate::proxy::server::L7Handle;
use crate::registry::Snapshot;
use crate::targets::TargetState;

/// Every L7 series of a running tier.
pub fn collect(l7: &L7Handle, out: &mut Vec<Series>) {
    for l in l7.listener_metrics() {
        let c = l.cells.counts();
        let name = l.name.to_string();
        let mut count = |m: Metric, n: u64| out.push(Series::count(m, vec![name.clone()], n));
        count(Metric::NewConnectionCount, c.new_connections);
        count(Metric::RejectedConnectionCount, c.rejected_connections);
        count(Metric::ClientTLSNegotiationErrorCount, c.client_tls_errors);
        count(Metric::ProcessedBytes, c.processed_bytes);
        count(Metric::RequestCount, c.requests);
        count(Metric::HTTPCode_ELB_3XX_Count, c.elb_3xx);
        count(Metric::HTTPCode_ELB_4XX_Count, c.elb_4xx);
        count(Metric::HTTPCode_ELB_5XX_Count, c.elb_5xx);
        count(Metric::HTTPCode_ELB_500_Count, c.elb_500);
        count(Metric::HTTPCode_ELB_502_Count, c.elb_502);
        count(Metric::HTTPCode_ELB_503_Count, c.elb_503);
        count(Metric::HTTPCode_ELB_504_Count, c.elb_504);
        count(Metric::RuleEvaluations, c.rule_evaluations);
        count(Metric::LCURuleEvaluations, c.lcu_rule_evaluations);
        count(Metric::HTTP_Fixed_Response_Count, c.fixed_responses);
        count(Metric::HTTP_Redirect_Count, c.redirects);
        count(
            Metric::DesyncMitigationMode_NonCompliant_Request_Count,
            c.desync_non_compliant,
        );
        count(Metric::HeaderTimeoutCount, c.header_timeouts);
        count(
            Metric::HTTP2AbusiveConnectionCount,
            c.http2_abusive_connections,
        );
        out.push(Series::gauge(
            Metric::ActiveConnectionCount,
            vec![name],
            l.open_connections as f64,
        ));
    }
    let groups = l7.groups();
    let mut names: Vec<&String> = groups.keys().collect();
    names.sort();
    for name in names {
        let g = &groups[name];
        let cells = g.metrics();
        let c = cells.all.counts();
        let (non_sticky, unhealthy) = cells.routing_counts();
        let l = || vec![name.clone()];
        out.push(Series::count(
            Metric::TargetGroupRequestCount,
            l(),
            c.requests,
        ));
        for (m, n) in [
            (Metric::TargetGroupHTTPCode_Target_2XX_Count, c.target_2xx),
            (Metric::TargetGroupHTTPCode_Target_3XX_Count, c.target_3xx),
            (Metric::TargetGroupHTTPCode_Target_4XX_Count, c.target_4xx),
            (Metric::TargetGroupHTTPCode_Target_5XX_Count, c.target_5xx),
            (
                Metric::TargetGroupTargetConnectionErrorCount,
                c.connection_errors,
            ),
            (
                Metric::TargetGroupTargetTLSNegotiationErrorCount,
                c.tls_errors,
            ),
            (Metric::NonStickyRequestCount, non_sticky),
            (Metric::UnhealthyRoutingRequestCount, unhealthy),
        ] {
            out.push(Series::count(m, l(), n));
        }
        out.push(Series {
            metric: Metric::TargetGroupTargetResponseTime,
            labels: l(),
            value: Value::Histogram(cells.all.response_time()),
        });
        for (addr, t) in g.target_metrics() {
            let tc = t.counts();
            let tl = || vec![name.clone(), addr.to_string()];
            for (m, n) in [
                (Metric::RequestCountPerTarget, tc.requests),
                (Metric::TargetHTTPCode_Target_2XX_Count, tc.target_2xx),
                (Metric::TargetHTTPCode_Target_3XX_Count, tc.target_3xx),
                (Metric::TargetHTTPCode_Target_4XX_Count, tc.target_4xx),
                (Metric::TargetHTTPCode_Target_5XX_Count, tc.target_5xx),
                (
                    Metric::TargetTargetConnectionErrorCount,
                    tc.connection_errors,
                ),
            ] {
                out.push(Series::count(m, tl(), n));
            }
            out.push(Series {
                metric: Metric::TargetTargetResponseTime,
                labels: tl(),
                value: Value::Histogram(t.response_time()),
            });
        }
    }
    for p in l7.pool_stats() {
        let l = || vec![p.target.to_string()];
        out.push(Series::count(
            Metric::PooledConnectionReuseCount,
            l(),
            p.reused,
        ));
        out.push(Series::count(
            Metric::NewTargetConnectionCount,
            l(),
            p.fresh,
        ));
        out.push(Series::count(
            Metric::StaleConnectionRetryCount,
            l(),
            p.retried,
        ));
        out.push(Series::count(
            Metric::ConnectionRetiredEarlyCount,
            l(),
            p.retired_early,
        ));
        out.push(Series::count(
            Metric::UnprovenReuseAvoidedCount,
            l(),
            p.unproven_reuse_avoided,
        ));
        let total = p.reused + p.fresh;
        out.push(Series::gauge(
            Metric::PooledConnectionReuseRatio,
            l(),
            if total == 0 {
                0.0
            } else {
                p.reused as f64 / total as f64
            },
        ));
        out.push(Series::gauge(
            Metric::IdleTargetConnectionCount,
            l(),
            p.idle_connections as f64,
        ));
    }
    collect_workers(l7, out);
}

/// The per-worker series of a tier with one runtime per worker: each worker's accepted and
/// open client connections, and each worker's pool shard's connections other workers took.
/// None with the shared runtime (its one "worker" is the whole tier: the listener series say
/// it).
fn collect_workers(l7: &L7Handle, out: &mut Vec<Series>) {
    if !l7.per_worker() {
        return;
    }
    for (worker, counts) in l7.worker_counts().into_iter().enumerate() {
        let l = || vec![worker.to_string()];
        out.push(Series::count(
            Metric::WorkerNewConnectionCount,
            l(),
            counts.accepted,
        ));
        out.push(Series::gauge(
            Metric::WorkerActiveConnectionCount,
            l(),
            counts.open as f64,
        ));
    }
    for (worker, p) in l7.pool_stats_per_worker() {
        out.push(Series::count(
            Metric::ForeignWorkerReuseCount,
            vec![worker.to_string(), p.target.to_string()],
            p.foreign_worker_reuse,
        ));
    }
}

/// HealthyHostCount and UnHealthyHostCount of every group (L7 and L4), from the registry:
/// healthy = in service; unhealthy = registered, not in service, and neither draining nor
/// unused (as `lb groups` counts them).
pub fn collect_hosts(snapshot: &Snapshot, out: &mut Vec<Series>) {
    for (name, view) in &snapshot.groups {
        let healthy = view
            .targets
            .iter()
            .filter(|t| t.member.state.in_service())
            .count();
        let unhealthy = view
            .targets
            .iter()
            .filter(|t| {
                !t.member.state.in_service()
                    && !matches!(t.member.state, TargetState::Draining | TargetState::Unused)
            })
            .count();
        out.push(Series::gauge(
            Metric::HealthyHostCount,
            vec![name.clone()],
            healthy as f64,
        ));
        out.push(Series::gauge(
            Metric::UnHealthyHostCount,
            vec![name.clone()],
            unhealthy as f64,
        ));
    }
}
