//! The L4 collect step: NLB's metrics summed by userspace from `lb_xdp`'s per-CPU maps (the
//! daemon's own or the pinned ones `lb stats` opens from another process).
use std::collections::HashMap;
use std::time::Duration;

use lb_common::{Backend, addr_from_map};

use super::{Metric, Series};
use crate::dataplane::Maps;
use crate::l4::VipAddr;

/// Whether a flow last seen at `last_seen_ns` is still active at `now_ns` under its VIP's
/// idle timeout (`lb_xdp` steers a packet after it as a new flow).
pub fn flow_active(idle_timeout: Duration, last_seen_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns)
        <= u64::try_from(idle_timeout.as_nanos()).unwrap_or(u64::MAX)
}

/// `ADDR:PORT` (IPv6 in brackets) of an address and a network-order port of the maps.
fn socket_label(family: u8, words: [u32; 4], port_be: u16) -> String {
    addr_from_map(family, words).map_or_else(
        || format!("?:{}", u16::from_be(port_be)),
        |a| std::net::SocketAddr::new(a, u16::from_be(port_be)).to_string(),
    )
}

fn backend_label(b: &Backend) -> String {
    socket_label(b.family, b.addr, b.port)
}

/// Every L4 series from the maps: per VIP and backend packets, bytes, new flows, unhealthy
/// routing flows, active flows (a walk of the flow table: O(flows)), and every packet-outcome
/// and health-check-probe counter. Map read errors end the step with what was read so far.
pub fn collect(maps: &Maps, out: &mut Vec<Series>) -> anyhow::Result<()> {
    let mut vips: Vec<(u32, String)> = Vec::new();
    let mut timeouts: HashMap<u32, Duration> = HashMap::new();
    for entry in maps.vips.iter() {
        let (k, v) = entry?;
        if k.proto == lb_common::VIP_MARKER_PROTO {
            continue;
        }
        let label = VipAddr::from_map_key(&k)
            .map_or_else(|| socket_label(k.family, k.addr, k.port), |a| a.to_string());
        vips.push((v.vip_id, label));
        timeouts.insert(v.vip_id, Duration::from_nanos(v.idle_timeout_ns));
    }
    vips.sort();
    // Every backend's entry and record, read once for the VIP figures, the backend series
    // and the derived reasons alike.
    let records = maps.backend_records()?;
    // Active flows: seen within their VIP's idle timeout (expired entries linger until the
    // sweep or the LRU removes them).
    let now = crate::l4::flows::monotonic_ns();
    let mut active_per_backend: HashMap<u32, u64> = HashMap::new();
    for entry in maps.flows.iter() {
        let Ok((_, v)) = entry else { continue };
        let Some(&timeout) = timeouts.get(&v.vip_id) else {
            continue;
        };
        if flow_active(timeout, v.last_seen_ns, now) {
            *active_per_backend.entry(v.backend_id).or_default() += 1;
        }
    }
    for (id, label) in &vips {
        let c = crate::dataplane::vip_figures(*id, &records, maps.retired_counters(Some(*id))?);
        let l = || vec![label.clone()];
        out.push(Series::count(Metric::ProcessedPackets, l(), c.packets));
        out.push(Series::count(Metric::VipProcessedBytes, l(), c.bytes));
        out.push(Series::count(Metric::NewFlowCount, l(), c.new_flows));
        out.push(Series::count(
            Metric::UnhealthyRoutingFlowCount,
            l(),
            c.unhealthy_routing_flows,
        ));
        let mut active = 0;
        for r in records.iter().filter(|r| r.backend.vip_id == *id) {
            let bc = &r.counters;
            let flows = active_per_backend.get(&r.id).copied().unwrap_or(0);
            active += flows;
            let bl = || vec![label.clone(), backend_label(&r.backend)];
            out.push(Series::count(
                Metric::VipTargetProcessedPackets,
                bl(),
                bc.packets,
            ));
            out.push(Series::count(
                Metric::VipTargetProcessedBytes,
                bl(),
                bc.bytes,
            ));
            out.push(Series::count(
                Metric::VipTargetNewFlowCount,
                bl(),
                bc.new_flows,
            ));
            out.push(Series::gauge(
                Metric::VipTargetActiveFlowCount,
                bl(),
                flows as f64,
            ));
        }
        out.push(Series::gauge(Metric::ActiveFlowCount, l(), active as f64));
    }
    for (r, n) in maps.reason_totals_of(&records)? {
        out.push(Series::count(
            Metric::PacketOutcomeCount,
            vec![r.label().to_owned()],
            n,
        ));
    }
    for (r, n) in maps.hc_totals()? {
        out.push(Series::count(
            Metric::HealthCheckProbePacketCount,
            vec![r.label().to_owned()],
            n,
        ));
    }
    for (c, n) in maps.nexthop_totals()? {
        out.push(Series::count(
            Metric::NextHopCacheCount,
            vec![c.label().to_owned()],
            n,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_is_active_within_its_vips_idle_timeout_only() {
        let now = 1_000 * 1_000_000_000;
        let ago = |s: u64| now - s * 1_000_000_000;
        let tcp = Duration::from_secs(350);
        let udp = Duration::from_secs(120);
        assert!(flow_active(tcp, ago(349), now));
        assert!(!flow_active(tcp, ago(351), now));
        assert!(flow_active(udp, ago(119), now));
        assert!(!flow_active(udp, ago(121), now));
        assert!(
            flow_active(tcp, now + 5, now),
            "a stamp from another CPU slightly ahead"
        );
    }
}
