//! The L4 collect step: NLB's metrics summed by userspace from `lb_xdp`'s per-CPU maps (the
//! daemon's own or the pinned ones `lb stats` opens from another process).
use std::collections::HashMap;
use std::time::Duration;

use lb_common::{Backend, IPPROTO_UDP, ipv4_from_map};

use super::{Metric, Series};
use crate::dataplane::Maps;
use crate::l4::VipAddr;

/// How long a TCP flow counts as active after its last packet: NLB's TCP idle timeout.
/// The per-VIP idle timeout of the L4 issue (configurable 60–6000 s) replaces this constant.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(350);
/// How long a UDP flow counts as active after its last packet: NLB's fixed UDP idle timeout
/// (see [`TCP_IDLE_TIMEOUT`] for when this becomes per VIP).
pub const UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// `CLOCK_MONOTONIC` in nanoseconds: what `bpf_ktime_get_ns` stamps flows with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Whether a flow last seen at `last_seen_ns` is still active at `now_ns`.
pub fn flow_active(proto: u8, last_seen_ns: u64, now_ns: u64) -> bool {
    let timeout = if proto == IPPROTO_UDP {
        UDP_IDLE_TIMEOUT
    } else {
        TCP_IDLE_TIMEOUT
    };
    now_ns.saturating_sub(last_seen_ns) <= u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX)
}

fn backend_label(b: &Backend) -> String {
    format!("{}:{}", ipv4_from_map(b.addr), u16::from_be(b.port))
}

/// Every L4 series from the maps: per VIP and backend packets, bytes, new flows, unhealthy
/// routing flows, active flows (a walk of the flow table: O(flows)), and every packet-outcome
/// and health-check-probe counter. Map read errors end the step with what was read so far.
pub fn collect(maps: &Maps, out: &mut Vec<Series>) -> anyhow::Result<()> {
    let mut vips: Vec<(u32, String)> = Vec::new();
    for entry in maps.vips.iter() {
        let (k, v) = entry?;
        if k.proto == lb_common::VIP_MARKER_PROTO {
            continue;
        }
        let label = VipAddr::from_map_key(&k).map_or_else(
            || format!("{}:{}", ipv4_from_map(k.addr), u16::from_be(k.port)),
            |a| a.to_string(),
        );
        vips.push((v.vip_id, label));
    }
    vips.sort();
    let vip_label: HashMap<u32, &str> = vips.iter().map(|(id, l)| (*id, l.as_str())).collect();
    let mut backends: Vec<(u32, Backend)> = Vec::new();
    for (id, b) in maps.backends.iter().enumerate() {
        let b = b?;
        if b != Backend::default() && vip_label.contains_key(&b.vip_id) {
            backends.push((u32::try_from(id).unwrap_or(u32::MAX), b));
        }
    }
    // Active flows: seen within the idle timeout (the LRU keeps idle ones until evicted).
    let now = monotonic_ns();
    let mut active_per_backend: HashMap<u32, u64> = HashMap::new();
    for entry in maps.flows.iter() {
        let Ok((k, v)) = entry else { continue };
        if flow_active(k.proto, v.last_seen_ns, now) {
            *active_per_backend.entry(v.backend_id).or_default() += 1;
        }
    }
    for (id, label) in &vips {
        let c = maps.vip_counters(*id)?;
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
        for (bid, b) in backends.iter().filter(|(_, b)| b.vip_id == *id) {
            let bc = maps.backend_counters(*bid)?;
            let flows = active_per_backend.get(bid).copied().unwrap_or(0);
            active += flows;
            let bl = || vec![label.clone(), backend_label(b)];
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
    for (r, n) in maps.reason_totals()? {
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_is_active_within_its_protocols_idle_timeout_only() {
        let now = 1_000 * 1_000_000_000;
        let ago = |s: u64| now - s * 1_000_000_000;
        assert!(flow_active(6, ago(349), now));
        assert!(!flow_active(6, ago(351), now));
        assert!(flow_active(17, ago(119), now));
        assert!(!flow_active(17, ago(121), now));
        assert!(
            flow_active(6, now + 5, now),
            "a stamp from another CPU slightly ahead"
        );
    }
}
