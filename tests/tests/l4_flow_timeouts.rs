//! Flow idle timeouts, end to end: with a short, test-set timeout on a UDP VIP, flows kept
//! busy stay on their backend while the ring changes under them, and flows idle beyond the
//! timeout are steered as new ones (so they follow the new ring). Needs root and the `lb`
//! binary.
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::ControlFlow;
use std::time::Duration;

use anyhow::bail;
use lb_tests::client;
use lb_tests::wait::wait_until;
use lb_tests::{Topology, VipSpec, stats, tally};

#[test]
fn a_flow_idle_beyond_the_vips_timeout_is_resteered_and_one_kept_busy_is_not() {
    let vip = SocketAddr::from((Ipv4Addr::new(10, 100, 0, 2), 5353));
    let mut topo = Topology::builder()
        .backends(3)
        .vip(
            VipSpec::udp("dns", vip.ip(), vip.port())
                .target(0)
                .option("idle-timeout=2"),
        )
        .build()
        .expect("building the topology");
    topo.serve_udp_echo(vip).expect("udp servers");
    let first = topo.backend(0).name.clone();
    let busy: Vec<u16> = (46_000..46_015).collect();
    let idle: Vec<u16> = (46_015..46_030).collect();
    let ask = |p: u16| client::ask_udp(p, vip, "x").map(|(who, _)| who);
    let all: Vec<String> = topo
        .in_client(|| {
            busy.iter()
                .chain(&idle)
                .map(|&p| ask(p).expect("udp"))
                .collect()
        })
        .expect("client namespace");
    assert!(all.iter().all(|w| *w == first), "{all:?}");

    // The ring changes: from now on only the flow table keeps these flows on backend-1.
    topo.register(0, "dns", 1, None).expect("register");
    topo.register(0, "dns", 2, None).expect("register");

    // Keep the busy flows going until every idle one has expired (or been swept away).
    let pin = topo.lb(0).pin_path.to_string_lossy().into_owned();
    let idle_set: BTreeSet<u16> = idle.iter().copied().collect();
    wait_until(Duration::from_secs(20), "the idle flows to expire", || {
        let answers: Vec<String> = topo.in_client(|| {
            busy.iter()
                .map(|&p| ask(p))
                .collect::<anyhow::Result<Vec<_>>>()
        })??;
        if let Some(w) = answers.iter().find(|w| **w != first) {
            bail!("a busy flow moved to {w}");
        }
        let flows = topo.lb_cli(["dump", "flows", "--pin-path", &pin, "--json"])?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&flows)?;
        let live: Vec<u16> = rows
            .iter()
            .filter(|r| r["expired"] == false)
            .filter_map(|r| r["client"].as_str()?.rsplit(':').next()?.parse().ok())
            .filter(|p| idle_set.contains(p))
            .collect();
        Ok(if live.is_empty() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(format!("idle flows not expired yet: {live:?}"))
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}"));

    let (busy_now, idle_now): (Vec<String>, Vec<String>) = topo
        .in_client(|| {
            (
                busy.iter().map(|&p| ask(p).expect("udp")).collect(),
                idle.iter().map(|&p| ask(p).expect("udp")).collect(),
            )
        })
        .expect("client namespace");
    assert!(
        busy_now.iter().all(|w| *w == first),
        "flows within the timeout stayed: {:?}",
        tally(busy_now)
    );
    let moved = idle_now.iter().filter(|w| **w != first).count();
    assert!(
        moved > 0,
        "expired flows follow the new ring: {:?}",
        tally(idle_now)
    );
    let doc = topo.stats_json(0).expect("lb stats");
    assert_eq!(
        stats::sum(&doc, "new_flows", "backend"),
        (busy.len() + 2 * idle.len()) as u64,
        "each expired flow was steered once more, no busy one was: {doc:#}"
    );
}
