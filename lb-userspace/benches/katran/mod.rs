//! The Katran rows of the XDP benchmark (`cargo xtask bench xdp --katran DIR`, which builds
//! Katran's `balancer.bpf.o` from DIR and passes it as `--katran-obj PATH`).
//!
//! Katran's `balancer_ingress` is configured like the benchmark's `lb_xdp`: the same IPv4 VIP
//! (198.51.100.1:80/tcp) and IPv6 VIP, the same 8 backends each (IPv4 reals for the IPv4 VIP,
//! IPv6 reals for the IPv6 one, so both encapsulate in their own family), a consistent-hash
//! ring of Katran's `RING_SIZE` per VIP, a gateway MAC, and one LRU flow table per CPU (the
//! benchmark is pinned to one CPU, so one of them is used). It runs behind the same front
//! program as every other row (tail call from `LB_BENCH_PROGS`), so the floors are the same.
//!
//! Rows and what their counters (Katran's own `stats` map) must show after every run:
//! - katran hit IPv4 / IPv6: a known flow (TCP ACK: Katran skips its LRU for a SYN and routes
//!   it by the ring every time): `XDP_TX` and the VIP's packets grew by the frame count, no
//!   LRU miss, no ring lookup, no fallback-LRU use.
//! - katran new flow, full table: a fresh client per frame (TCP SYN, as lb's new-flow rows)
//!   into a second Katran whose LRU was filled with twice its size first: every frame misses,
//!   goes through the ring and is inserted (evicting). Katran skips the insert above
//!   `MAX_CONN_RATE` (125,000) new connections a second; the window is restarted before every
//!   run, and a run has fewer frames than that, so every frame is inserted.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, ensure};
use lb::{
    dataplane::bench::katran::{Katran, KatranCounter, LbStats},
    packet::ETH_LEN,
};

/// Katran's default `MAX_CONN_RATE` (new connections a second before it stops inserting into
/// the LRU); `cargo xtask bench xdp --katran` does not override it.
pub const MAX_CONN_RATE: u64 = 125_000;
/// The gateway MAC in `ctl_array` (every encapsulated frame goes there; the sink drops it).
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const XDP_TX: u32 = 3;
/// TCP flags byte: ACK.
const TCP_ACK: u8 = 0x10;

/// The Katran rows.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Row {
    Hit4,
    Hit6,
    NewFull,
}

/// The two Katran instances: `main` (hit rows) and `full` (new-flow row, LRU filled first).
pub struct Katrans {
    pub main: Katran,
    pub full: Katran,
}

/// `frame` (an IPv4 or IPv6 TCP frame without options or extension headers) with the TCP
/// flags set to ACK only.
pub fn as_ack(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    let ip_len = if f[ETH_LEN] >> 4 == 6 { 40 } else { 20 };
    f[ETH_LEN + ip_len + 13] = TCP_ACK;
    f
}

/// Loads one Katran with the benchmark's two VIPs.
fn load_one(
    obj: &std::path::Path,
    lru_size: u32,
    vip: Ipv4Addr,
    vip6: Ipv6Addr,
    backends: &[u8],
    backend6: fn(u8) -> Ipv6Addr,
) -> anyhow::Result<Katran> {
    let mut k = Katran::load(obj, lru_size)
        .with_context(|| format!("loading Katran's balancer_ingress from {}", obj.display()))?;
    let reals4: Vec<IpAddr> = backends
        .iter()
        .map(|&n| Ipv4Addr::new(10, 0, 0, n).into())
        .collect();
    let reals6: Vec<IpAddr> = backends.iter().map(|&n| backend6(n).into()).collect();
    k.add_vip(0, (vip.into(), 80, 6), &reals4, 1)?;
    k.add_vip(1, (vip6.into(), 80, 6), &reals6, 1 + reals4.len() as u32)?;
    k.set_gateway_mac(GATEWAY_MAC)?;
    Ok(k)
}

impl Katrans {
    /// Loads both instances; primes the hit flows of `main` (one non-live run each, on this
    /// CPU, so they land in the LRU the live runs use).
    pub fn load(
        obj: &std::path::Path,
        (main_lru, full_lru): (u32, u32),
        (vip, vip6): (Ipv4Addr, Ipv6Addr),
        backends: &[u8],
        backend6: fn(u8) -> Ipv6Addr,
        hits: &[&[u8]],
    ) -> anyhow::Result<Self> {
        let main = load_one(obj, main_lru, vip, vip6, backends, backend6)?;
        let full = load_one(obj, full_lru, vip, vip6, backends, backend6)?;
        for f in hits {
            let (action, _) = main.test_run(f)?;
            ensure!(
                action == XDP_TX,
                "priming a Katran hit flow returned {action}"
            );
        }
        Ok(Self { main, full })
    }

    pub fn of(&self, row: Row) -> &Katran {
        match row {
            Row::NewFull => &self.full,
            Row::Hit4 | Row::Hit6 => &self.main,
        }
    }

    pub fn of_mut(&mut self, row: Row) -> &mut Katran {
        match row {
            Row::NewFull => &mut self.full,
            Row::Hit4 | Row::Hit6 => &mut self.main,
        }
    }
}

/// Katran's counters a row's check compares.
#[derive(Clone, Copy, Default)]
pub struct Snapshot {
    tx: LbStats,
    drop: LbStats,
    pass: LbStats,
    lru: LbStats,
    miss: LbStats,
    fallback: LbStats,
    conn_rate: LbStats,
    vip: LbStats,
}

impl Snapshot {
    pub fn take(k: &Katran, row: Row) -> anyhow::Result<Self> {
        let vip_num = if row == Row::Hit6 { 1 } else { 0 };
        Ok(Self {
            tx: k.counter(KatranCounter::XdpTx)?,
            drop: k.counter(KatranCounter::XdpDrop)?,
            pass: k.counter(KatranCounter::XdpPass)?,
            lru: k.counter(KatranCounter::Lru)?,
            miss: k.counter(KatranCounter::LruMiss)?,
            fallback: k.counter(KatranCounter::FallbackLru)?,
            conn_rate: k.counter(KatranCounter::NewConnRate)?,
            vip: k.vip_stats(vip_num)?,
        })
    }
}

/// Whether every one of the `n` frames of a run of `row` took the intended path.
pub fn check(name: &str, row: Row, b: &Snapshot, a: &Snapshot, n: u64) -> anyhow::Result<()> {
    let d = |x: fn(&Snapshot) -> u64| x(a) - x(b);
    let tx = d(|s| s.tx.v1);
    ensure!(tx == n, "{name}: Katran XDP_TX {tx} of {n}");
    let dropped = d(|s| s.drop.v1);
    let passed = d(|s| s.pass.v1);
    ensure!(
        dropped == 0 && passed == 0,
        "{name}: Katran dropped {dropped}, passed {passed}"
    );
    let vip = d(|s| s.vip.v1);
    ensure!(vip == n, "{name}: Katran's VIP counted {vip} of {n}");
    let fallback = d(|s| s.fallback.v1);
    ensure!(
        fallback == 0,
        "{name}: {fallback} frames without a per-CPU LRU (fallback_cache)"
    );
    let seen = d(|s| s.lru.v1);
    ensure!(seen == n, "{name}: Katran's LRU stage saw {seen} of {n}");
    let by_ring = d(|s| s.lru.v2);
    let miss_syn = d(|s| s.miss.v1);
    let miss_other = d(|s| s.miss.v2);
    match row {
        Row::Hit4 | Row::Hit6 => ensure!(
            by_ring == 0 && miss_syn == 0 && miss_other == 0,
            "{name}: {by_ring} ring lookups, {miss_syn} SYN and {miss_other} other LRU misses on a hit row"
        ),
        Row::NewFull => {
            ensure!(by_ring == n, "{name}: {by_ring} ring lookups of {n}");
            ensure!(miss_syn == n, "{name}: {miss_syn} SYN LRU misses of {n}");
            ensure!(
                a.conn_rate.v1 <= MAX_CONN_RATE,
                "{name}: Katran's new-connection rate reached {} (above {MAX_CONN_RATE} it skips the LRU insert)",
                a.conn_rate.v1
            );
        }
    }
    Ok(())
}
