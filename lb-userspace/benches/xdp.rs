//! `cargo bench -p lb-userspace --bench xdp` (what `cargo xtask bench xdp [--quick]` runs):
//! nanoseconds per frame of `lb_xdp` and `lb_decap`, measured with `BPF_PROG_TEST_RUN` in
//! live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`), above an `XDP_TX` floor measured in the
//! same run.
//!
//! Method. A live-frames test run feeds `repeat` frames to the program as if received on a
//! real interface (here the veth `d0` of a private network namespace) and really carries out
//! what it returns: `XDP_TX`/`XDP_REDIRECT` transmit (to the veth peer `d1`, whose XDP sink
//! counts and drops them), `XDP_PASS` builds an skb and hands it to the stack. The kernel
//! reports the average time per frame. Its page pool recycles frames without restoring their
//! contents, so the benchmark-only front program `lb_bench_front` writes the intended frame
//! from a template before every repeat (with a fresh client address/port per repeat for the
//! new-flow rows) and tail-calls the program measured. Every row, both floors included, runs
//! behind that front program, so its cost (and the transmit or stack cost of the action) is
//! the same in the row and its floor and cancels in the difference.
//!
//! Rows (one live run of `REPEAT` frames each, every round; rounds alternate the row order):
//! - floor XDP_TX: `lb_bench_tx`, swaps the MAC addresses and returns `XDP_TX`.
//! - floor XDP_PASS: `lb_pass`, returns `XDP_PASS`.
//! - hit IPv4 / hit IPv6: a known flow's TCP ACK: flow-table hit, backend lookup, next hop
//!   (from the per-backend next-hop cache after the first frame), encapsulation, `XDP_TX` (the
//!   backends are behind the receiving interface `d0`, as in a one-armed deployment),
//!   transmitted to `d1`.
//! - hit IPv4, no next-hop cache: the same with the cache off (`--nexthop-max-age 0`), so
//!   `bpf_fib_lookup` runs for every frame, as before the cache.
//! - NAT hit IPv4: a known flow of a NAT VIP (a third balancer, so the NAT reply lookup does
//!   not slow the other balancers' non-VIP rows): flow-table hit, reverse-entry refresh, next
//!   hop, address and port rewrite with checksums, `XDP_TX`.
//! - new flow, empty table: a fresh client's SYN every frame into a flow table emptied before
//!   each round (no eviction): Maglev ring, insert (an opening SYN is not looked up first),
//!   then as a hit.
//! - new flow, full table: the same into a second balancer whose (smaller) flow table was
//!   filled beforehand, so every insert evicts the least recently used flow; and the same
//!   with the next-hop cache off.
//! - non-VIP pass: TCP to an address that is no VIP (host traffic): `XDP_PASS`.
//! - lb_decap: `lb_xdp`'s own IPv4-in-IPv4 output, decapsulated and passed up.
//! - with `--katran-obj PATH` (`cargo xtask bench xdp --katran DIR`): Katran's
//!   `balancer_ingress`, configured alike, as "katran hit IPv4/IPv6" and "katran new flow,
//!   full" (see `katran/mod.rs`); and, always with it, a copy of lb's embedded object loaded
//!   as a variant (below) labelled "lb copy": the headline `lb - Katran` pairs Katran with
//!   that copy, loaded the same way as Katran, and `embedded lb - Katran` with the embedded
//!   object's rows (which measured 5-23 ns cheaper than any copy of themselves at stop 38).
//! - with `--lb-obj LABEL=PATH` (repeatable): another build of the eBPF object (same map
//!   layouts), e.g. a variant with one piece of the hit path removed or the base of an A/B,
//!   loaded as balancers of its own and measured in the same rounds as "hit IPv4 [LABEL]",
//!   "hit IPv6 [LABEL]" and "new flow, full [LABEL]". A variant may have lost its counters, so
//!   these rows are checked by the sink only (every frame transmitted; the counters, where
//!   the variant still keeps them, must agree).
//!
//! Katran's and the variants' rows run next to the embedded build's rows they compare with
//! (right after them in half the rounds, right before in the other half), and a paired table
//! gives, per round, the difference of the two rows: the machine's drift from round to round
//! (large on a shared VM) cancels in it, where it does not in the rows' medians. `--raw`
//! also prints every row's figure in every round. A decoy balancer is loaded before all the
//! measured ones and never run: the first balancer a run loads measured ~12 ns slower on the
//! IPv4 hit than later loads of the same object (`--no-decoy` shows it).
//!
//! After every run the program's own counters must show that every frame took the intended
//! path (e.g. `tx` grew by exactly `REPEAT`, no new flow on a hit row, exactly `REPEAT`
//! new flows on a new-flow row, the sink got `REPEAT` frames), else the benchmark fails.
//! A cross-check row repeats the old method (per-call runs with repeat = 1, `lb_xdp` minus
//! `lb_pass`) for the IPv4 hit.
//!
//! The process moves itself into a new network namespace (`unshare`); it holds no other
//! reference, so the namespace and its veth pair disappear when the process exits, however
//! it exits (panic included). Needs root.
use std::{
    collections::BTreeSet,
    io,
    net::{Ipv4Addr, Ipv6Addr},
    process::ExitCode,
    time::Instant,
};

use anyhow::{Context as _, bail, ensure};
use lb::{
    dataplane::{
        Balancer, Decap, LbAddrs, Maps, PassGuard, Sizes,
        bench::{BenchFront, BenchTarget},
    },
    l4::{L4Member, Proto, RingWriter, VipAddr, VipSpec},
    packet::{ETH_LEN, Frame, Frame6},
};
mod common;
mod katran;
use common::{cmd_output, ifindex, median, pin, reason, run_cmd};
use lb_common::{BENCH_FRAME_MAX, BenchCounter, BenchTemplate, DecapReason, Reason};

/// Frames per live run.
const REPEAT: u32 = 100_000;
/// Frames per batch of the live run (the kernel's default).
const BATCH: u32 = 64;
/// Rounds (each runs every row once).
const ROUNDS: usize = 21;
/// Rounds with `--quick`.
const QUICK_ROUNDS: usize = 5;
/// Per-call runs of the cross-check (each program).
const PER_CALL: usize = 20_000;
/// Backends of each VIP: 10.0.0.11 .. 10.0.0.18 (fd00::11 .. for IPv6).
const BACKENDS: u8 = 8;
/// Flow table of the main balancer (hit and new-flow-empty rows): emptied every round.
const MAX_FLOWS: u32 = 1 << 19;
/// Flow table of the full-table balancer: filled before the rounds, then every insert evicts.
const FULL_FLOWS: u32 = 1 << 16;

/// Frames of the host's own the sink may count during one run besides the benchmark's.
const STRAY_FRAMES: u64 = 8;

const XDP_PASS: u32 = 2;
/// What `lb_xdp` returns for a VIP packet run without an ingress interface (`lo`).
const XDP_REDIRECT: u32 = 4;

const LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const LB_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
const NOT_A_VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
/// The NAT VIP (of the third balancer).
const NAT_VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

/// Backend `n` of the IPv6 VIP: fd00::`n`, the same host (and MAC) as 10.0.0.`n`.
fn backend6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(n))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xdp bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Moves this (single-threaded) process into a new network namespace with the veth pair
/// `d0`–`d1` and permanent neighbours for the backends behind `d0`.
fn private_netns() -> anyhow::Result<()> {
    // SAFETY: plain syscall; affects the calling thread, the only one so far.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
    }
    run_cmd(&["ip", "link", "set", "lo", "up"])?;
    run_cmd(&[
        "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ])?;
    run_cmd(&["ip", "link", "set", "d1", "up"])?;
    run_cmd(&["ip", "addr", "add", "10.0.0.2/24", "dev", "d0"])?;
    run_cmd(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00::2/64",
        "dev",
        "d0",
        "nodad",
    ])?;
    run_cmd(&["ip", "link", "set", "d0", "up"])?;
    for n in 11..11 + BACKENDS {
        for addr in [format!("10.0.0.{n}"), backend6(n).to_string()] {
            run_cmd(&[
                "ip",
                "neigh",
                "add",
                &addr,
                "lladdr",
                &format!("02:00:00:00:00:{n:02x}"),
                "dev",
                "d0",
                "nud",
                "permanent",
            ])?;
        }
    }
    run_cmd(&["sysctl", "-q", "-w", "net.ipv4.conf.all.forwarding=1"])?;
    run_cmd(&["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])
}

/// Pins the process to the CPU it runs on, so every run uses the same per-CPU map slots,
/// caches and page pool. Returns that CPU.
fn pin_to_current_cpu() -> anyhow::Result<usize> {
    // SAFETY: no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    ensure!(cpu >= 0, "sched_getcpu: {}", io::Error::last_os_error());
    pin(0, cpu as usize)?;
    Ok(cpu as usize)
}

fn decapsulated(decap: &Decap) -> anyhow::Result<u64> {
    Ok(decap
        .counters()?
        .into_iter()
        .find(|(x, _)| *x == DecapReason::Decapsulated)
        .map_or(0, |(_, n)| n))
}

/// A balancer with one IPv4 and one IPv6 VIP of `BACKENDS` backends each.
struct Lb {
    lb: Balancer,
    registry: RingWriter<Maps>,
    vip_id: u32,
    vip6_id: u32,
}

impl Lb {
    /// A balancer with only a NAT VIP (`NAT_VIP`:80, targets on port 8080).
    fn load_nat() -> anyhow::Result<Self> {
        let sizes = Sizes {
            max_flows: 4096,
            ring_size: lb_common::DEFAULT_RING_SIZE,
            max_vips: 4,
            max_backends: 64,
        };
        let (lb, maps) = Balancer::load(sizes, LbAddrs::one(LB_ADDR.into()), None)
            .context("loading lb_xdp (NAT)")?;
        let mut registry =
            RingWriter::new(maps, sizes.ring_size, sizes.max_vips, sizes.max_backends);
        let vip = VipAddr {
            addr: NAT_VIP.into(),
            port: 80,
            proto: Proto::Tcp,
        };
        registry.add_vip(VipSpec::new(None, vip).nat())?;
        let targets: Vec<L4Member> = (11..11 + BACKENDS)
            .map(|n| L4Member::in_service(Ipv4Addr::new(10, 0, 0, n).into(), 8080, 1))
            .collect();
        registry.apply(&vip, &targets, false)?;
        let vip_id = registry
            .describe()
            .into_iter()
            .find(|(spec, _, _)| spec.vip == vip)
            .map(|(_, id, _)| id)
            .context("the NAT VIP")?;
        Ok(Self {
            lb,
            registry,
            vip_id,
            vip6_id: vip_id,
        })
    }

    /// Turns the next-hop cache on (the default maximum age) or off.
    fn nexthop_cache(&mut self, on: bool) -> anyhow::Result<()> {
        let age = if on {
            lb::dataplane::DEFAULT_NEXTHOP_MAX_AGE
        } else {
            std::time::Duration::ZERO
        };
        self.lb.set_nexthop_max_age(self.registry.maps_mut(), age)?;
        Ok(())
    }

    fn load(max_flows: u32) -> anyhow::Result<Self> {
        Self::load_from(None, max_flows)
    }

    /// [`Self::load`] from another build of the object (`--lb-obj`).
    fn load_from(object: Option<&[u8]>, max_flows: u32) -> anyhow::Result<Self> {
        let sizes = Sizes {
            max_flows,
            ring_size: lb_common::DEFAULT_RING_SIZE,
            max_vips: 4,
            max_backends: 64,
        };
        let addrs = LbAddrs {
            v4: Some(LB_ADDR),
            v6: Some(LB_ADDR6),
        };
        let (lb, maps) = match object {
            Some(obj) => Balancer::load_from(obj, sizes, addrs, None),
            None => Balancer::load(sizes, addrs, None),
        }
        .context("loading lb_xdp")?;
        let mut registry =
            RingWriter::new(maps, sizes.ring_size, sizes.max_vips, sizes.max_backends);
        let vip = VipAddr {
            addr: VIP.into(),
            port: 80,
            proto: Proto::Tcp,
        };
        registry.add_vip(VipSpec::new(None, vip))?;
        let targets: Vec<L4Member> = (11..11 + BACKENDS)
            .map(|n| L4Member::in_service(Ipv4Addr::new(10, 0, 0, n).into(), 80, 1))
            .collect();
        registry.apply(&vip, &targets, false)?;
        let vip6 = VipAddr {
            addr: VIP6.into(),
            port: 80,
            proto: Proto::Tcp,
        };
        registry.add_vip(VipSpec::new(None, vip6))?;
        let targets6: Vec<L4Member> = (11..11 + BACKENDS)
            .map(|n| L4Member::in_service(backend6(n).into(), 80, 1))
            .collect();
        registry.apply(&vip6, &targets6, false)?;
        let id_of = |v: &VipAddr| {
            registry
                .describe()
                .into_iter()
                .find(|(spec, _, _)| spec.vip == *v)
                .map(|(_, id, _)| id)
        };
        let vip_id = id_of(&vip).context("the IPv4 VIP")?;
        let vip6_id = id_of(&vip6).context("the IPv6 VIP")?;
        Ok(Self {
            lb,
            registry,
            vip_id,
            vip6_id,
        })
    }

    fn maps(&self) -> &Maps {
        self.registry.maps()
    }

    /// New flows of both VIPs so far (of the one VIP for the NAT balancer).
    fn new_flows(&self) -> anyhow::Result<u64> {
        let v4 = self.maps().vip_counters(self.vip_id)?.new_flows;
        if self.vip6_id == self.vip_id {
            return Ok(v4);
        }
        Ok(v4 + self.maps().vip_counters(self.vip6_id)?.new_flows)
    }
}

/// What a row runs and what its counters must show afterwards.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    TxFloor,
    PassFloor,
    Hit4,
    Hit4NoCache,
    Hit6,
    NatHit4,
    NewEmpty,
    NewFull,
    NewFullNoCache,
    NonVip,
    Decap,
    /// Katran's `balancer_ingress` (`--katran-obj`).
    Katran(katran::Row),
    /// A flow-table hit of `--lb-obj` variant `n`.
    VariantHit(usize),
    /// A new flow into the full table of `--lb-obj` variant `n`.
    VariantNewFull(usize),
}

/// An `--lb-obj` build: a main balancer (hit rows) and a full-table one.
struct Variant {
    main: Lb,
    full: Lb,
}

/// Label of the copy of the embedded object that is loaded as a variant whenever Katran is
/// (Katran's object, like a variant's, is loaded from bytes after the embedded build's
/// balancers): its rows are "hit IPv4 [lb copy]" and so on.
const COPY: &str = "lb copy";

/// lb's rows and the Katran rows they are compared with, in the paired table, under their
/// label: first the headline, Katran against the copy of lb's object loaded as Katran is;
/// then the old pairing, against the embedded object's rows, which measured 5-23 ns cheaper
/// than any copy of themselves loaded as a variant (BENCHMARKS.md, stop 38 and 39).
const PAIRS: [(&str, &str, &str); 6] = [
    ("lb - Katran", "hit IPv4 [lb copy]", "katran hit IPv4"),
    ("lb - Katran", "hit IPv6 [lb copy]", "katran hit IPv6"),
    (
        "lb - Katran",
        "new flow, full [lb copy]",
        "katran new flow, full",
    ),
    ("embedded lb - Katran", "hit IPv4", "katran hit IPv4"),
    ("embedded lb - Katran", "hit IPv6", "katran hit IPv6"),
    (
        "embedded lb - Katran",
        "new flow, full table",
        "katran new flow, full",
    ),
];

/// Differences of two rows measured in the same rounds (`a[i] - b[i]`): their median and
/// quartiles, and in how many rounds `a` was the lower.
pub struct Paired {
    pub median: f64,
    pub q1: f64,
    pub q3: f64,
    pub a_lower: usize,
    pub n: usize,
}

impl Paired {
    pub fn of(a: &[f64], b: &[f64]) -> Self {
        let d: Vec<f64> = a.iter().zip(b).map(|(a, b)| a - b).collect();
        let mut s = d.clone();
        s.sort_by(f64::total_cmp);
        // Quartiles as the medians of the lower and upper halves (the middle value, for an
        // odd count, in neither).
        let half = s.len() / 2;
        Paired {
            median: median(&s),
            q1: median(&s[..half]),
            q3: median(&s[s.len() - half..]),
            a_lower: d.iter().filter(|x| **x < 0.0).count(),
            n: d.len(),
        }
    }
}

/// Puts `row` right after the row named `after`, so the two run next to each other in every
/// round (the paired table).
fn insert_after(rows: &mut Vec<Row>, after: &str, row: Row) -> anyhow::Result<()> {
    let at = rows
        .iter()
        .position(|r| r.name == after)
        .with_context(|| format!("no row {after:?} to put {:?} after", row.name))?;
    rows.insert(at + 1, row);
    Ok(())
}

struct Row {
    name: &'static str,
    kind: Kind,
    frame: Vec<u8>,
    /// Vary the client (IPv4 source address word and port) on every repeat.
    vary: bool,
    ns: Vec<f64>,
}

struct Bench {
    front: BenchFront,
    main: Lb,
    full: Lb,
    nat: Lb,
    decap: Decap,
    d0: u32,
    /// Katran's balancer, with `--katran-obj`.
    katran: Option<katran::Katrans>,
    /// `--lb-obj` builds.
    variants: Vec<Variant>,
}

/// Counter values a row's check compares.
#[derive(Clone, Copy, Default)]
struct Snapshot {
    runs: u64,
    failed: u64,
    sink: u64,
    tx: u64,
    new_flows: u64,
    not_vip: u64,
    decapsulated: u64,
}

impl Bench {
    fn lb_of(&self, kind: Kind) -> &Lb {
        match kind {
            Kind::VariantHit(n) => &self.variants[n].main,
            Kind::VariantNewFull(n) => &self.variants[n].full,
            Kind::NewFull | Kind::NewFullNoCache => &self.full,
            Kind::NatHit4 => &self.nat,
            _ => &self.main,
        }
    }

    /// The balancer of `kind`, mutable.
    fn lb_of_mut(&mut self, kind: Kind) -> &mut Lb {
        match kind {
            Kind::VariantHit(n) => &mut self.variants[n].main,
            Kind::VariantNewFull(n) => &mut self.variants[n].full,
            Kind::NewFull | Kind::NewFullNoCache => &mut self.full,
            Kind::NatHit4 => &mut self.nat,
            _ => &mut self.main,
        }
    }

    fn snapshot(&self, kind: Kind) -> anyhow::Result<Snapshot> {
        let lb = self.lb_of(kind);
        Ok(Snapshot {
            runs: self.front.counter(BenchCounter::Runs)?,
            failed: self.front.counter(BenchCounter::TailCallFailed)?
                + self.front.counter(BenchCounter::TemplateFailed)?,
            sink: self.front.counter(BenchCounter::SinkReceived)?,
            // Backends behind the receiving interface: lb_xdp transmits with XDP_TX.
            tx: reason(lb.maps(), Reason::Tx)?,
            new_flows: lb.new_flows()?,
            not_vip: reason(lb.maps(), Reason::PassNotVip)?,
            decapsulated: decapsulated(&self.decap)?,
        })
    }

    /// One live run of `row` with `repeat` frames; checks the counters. Returns ns per frame.
    fn run_row(&mut self, row: &Row, repeat: u32) -> anyhow::Result<f64> {
        let no_cache = matches!(row.kind, Kind::Hit4NoCache | Kind::NewFullNoCache);
        if no_cache {
            self.lb_of_mut(row.kind).nexthop_cache(false)?;
        }
        let result = self.run_row_as_set(row, repeat);
        if no_cache {
            self.lb_of_mut(row.kind).nexthop_cache(true)?;
        }
        result
    }

    /// [`Self::run_row`] with the next-hop cache as it is.
    fn run_row_as_set(&mut self, row: &Row, repeat: u32) -> anyhow::Result<f64> {
        let target = match row.kind {
            Kind::TxFloor => BenchTarget::TxFloor,
            Kind::PassFloor => BenchTarget::PassFloor,
            Kind::Decap => BenchTarget::Decap(&self.decap),
            Kind::NewFull | Kind::NewFullNoCache => BenchTarget::Balancer(&self.full.lb),
            Kind::NatHit4 => BenchTarget::Balancer(&self.nat.lb),
            Kind::VariantHit(v) => BenchTarget::Balancer(&self.variants[v].main.lb),
            Kind::VariantNewFull(v) => BenchTarget::Balancer(&self.variants[v].full.lb),
            Kind::Katran(k) => {
                let katrans = self.katran.as_mut().context("no Katran loaded")?;
                katrans.of_mut(k).reset_conn_rate()?;
                BenchTarget::Katran(katrans.of(k))
            }
            _ => BenchTarget::Balancer(&self.main.lb),
        };
        self.front.set_target(target)?;
        let mut t = BenchTemplate {
            len: row.frame.len() as u32,
            vary: u32::from(row.vary),
            vary_addr_off: (ETH_LEN + 12) as u32,
            vary_port_off: (ETH_LEN + 20) as u32,
            ..BenchTemplate::default()
        };
        t.frame[..row.frame.len()].copy_from_slice(&row.frame);
        self.front.set_template(&t)?;
        let katran_snapshot = |bench: &Self| -> anyhow::Result<Option<katran::Snapshot>> {
            match (row.kind, &bench.katran) {
                (Kind::Katran(k), Some(katrans)) => {
                    Ok(Some(katran::Snapshot::take(katrans.of(k), k)?))
                }
                _ => Ok(None),
            }
        };
        let katran_before = katran_snapshot(self)?;
        let before = self.snapshot(row.kind)?;
        let d = self.front.run_live(&row.frame, self.d0, repeat, BATCH)?;
        let after = self.snapshot(row.kind)?;
        let katran_after = katran_snapshot(self)?;
        let n = u64::from(repeat);
        let name = row.name;
        ensure!(
            after.runs - before.runs == n,
            "{name}: front ran {} times for {n}",
            after.runs - before.runs
        );
        ensure!(
            after.failed == before.failed,
            "{name}: template or tail call failed"
        );
        let sent = after.sink - before.sink;
        let transmitted = after.tx - before.tx;
        let created = after.new_flows - before.new_flows;
        match row.kind {
            Kind::TxFloor => ensure!(sent_ok(sent, n), "{name}: sink got {sent} of {n}"),
            Kind::Hit4 | Kind::Hit4NoCache | Kind::Hit6 | Kind::NatHit4 => {
                ensure!(transmitted == n, "{name}: {transmitted} XDP_TX of {n}");
                ensure!(created == 0, "{name}: {created} new flows");
                ensure!(sent_ok(sent, n), "{name}: sink got {sent} of {n}");
            }
            Kind::NewEmpty | Kind::NewFull | Kind::NewFullNoCache => {
                ensure!(transmitted == n, "{name}: {transmitted} XDP_TX of {n}");
                ensure!(created == n, "{name}: {created} new flows of {n}");
                ensure!(sent_ok(sent, n), "{name}: sink got {sent} of {n}");
            }
            Kind::NonVip => {
                let p = after.not_vip - before.not_vip;
                ensure!(p == n, "{name}: pass_not_vip {p} of {n}");
            }
            Kind::Decap => {
                let p = after.decapsulated - before.decapsulated;
                ensure!(p == n, "{name}: decapsulated {p} of {n}");
            }
            Kind::PassFloor => {}
            Kind::VariantHit(_) | Kind::VariantNewFull(_) => {
                ensure!(sent_ok(sent, n), "{name}: sink got {sent} of {n}");
                ensure!(
                    transmitted == n || transmitted == 0,
                    "{name}: {transmitted} XDP_TX of {n}"
                );
                let want = if matches!(row.kind, Kind::VariantHit(_)) {
                    0
                } else {
                    n
                };
                ensure!(
                    created == want || created == 0,
                    "{name}: {created} new flows"
                );
            }
            Kind::Katran(k) => {
                let (Some(b), Some(a)) = (&katran_before, &katran_after) else {
                    bail!("{name}: no Katran counters");
                };
                katran::check(name, k, b, a, n)?;
                ensure!(sent_ok(sent, n), "{name}: sink got {sent} of {n}");
            }
        }
        Ok(d.as_nanos() as f64)
    }

    /// Empties the main balancer's flow table and re-creates the two hit flows (and the NAT
    /// balancer's hit flow).
    fn reset_main(&mut self, hit4: &[u8], hit6: &[u8], nat4: &[u8]) -> anyhow::Result<()> {
        let all: BTreeSet<u32> = (0..64).collect();
        self.main.registry.maps_mut().remove_flows_of(&all)?;
        for f in [hit4, hit6] {
            let (action, _) = self.main.lb.test_run(f)?;
            ensure!(
                action == XDP_REDIRECT,
                "priming a hit flow returned {action}"
            );
        }
        let (action, _) = self.nat.lb.test_run(nat4)?;
        ensure!(
            action == XDP_REDIRECT,
            "priming the NAT hit flow returned {action}"
        );
        for v in &mut self.variants {
            v.main.registry.maps_mut().remove_flows_of(&all)?;
            for f in [hit4, hit6] {
                let (action, _) = v.main.lb.test_run(f)?;
                ensure!(
                    action == XDP_REDIRECT,
                    "priming a variant's hit flow returned {action}"
                );
            }
        }
        Ok(())
    }
}

/// Whether the sink received the `n` frames a run transmitted. The host's own stack may send
/// a few frames of its own out of `d0` meanwhile (IPv6 MLD reports and router solicitations
/// after the link came up), which the sink counts too.
fn sent_ok(sent: u64, n: u64) -> bool {
    (n..=n + STRAY_FRAMES).contains(&sent)
}

/// Per-call cross-check (the previous method): `PER_CALL` runs with repeat = 1 of `lb_xdp`
/// and of `lb_pass`, alternating; medians of the kernel's per-run durations.
fn per_call(lb: &Balancer, pass: &PassGuard, frame: &[u8]) -> anyhow::Result<(f64, f64)> {
    let mut x = Vec::with_capacity(PER_CALL);
    let mut p = Vec::with_capacity(PER_CALL);
    for i in 0..PER_CALL {
        let mut one_x = || -> anyhow::Result<()> {
            let r = lb.test_run_raw(frame, None, 1)?;
            ensure!(
                r.return_value == XDP_REDIRECT,
                "lb_xdp returned {}",
                r.return_value
            );
            x.push(r.duration.as_nanos() as f64);
            Ok(())
        };
        let mut one_p = || -> anyhow::Result<()> {
            let r = pass.test_run_raw(frame, None, 1)?;
            ensure!(
                r.return_value == XDP_PASS,
                "lb_pass returned {}",
                r.return_value
            );
            p.push(r.duration.as_nanos() as f64);
            Ok(())
        };
        if i % 2 == 0 {
            one_x()?;
            one_p()?;
        } else {
            one_p()?;
            one_x()?;
        }
    }
    Ok((median(&x), median(&p)))
}

fn run() -> anyhow::Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "needs root (loads XDP programs, creates a network namespace): sudo -E cargo xtask bench xdp"
        );
    }
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only TEXT[|TEXT…]`: the floors and the rows whose name contains one of the TEXTs
    // (`|`-separated: row names contain commas; `=NAME` is one row by its whole name), for
    // profiling one path with `perf record`, or for finding which rows move another row's
    // figure.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    // `--katran-obj PATH`: also measure Katran's balancer_ingress from this object (built by
    // `cargo xtask bench xdp --katran DIR`).
    let katran_obj = args
        .iter()
        .position(|a| a == "--katran-obj")
        .and_then(|i| args.get(i + 1).map(std::path::PathBuf::from));
    // `--lb-obj LABEL=PATH` (repeatable): another build of the eBPF object, measured beside
    // the built-in one.
    let mut lb_objs: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if a != "--lb-obj" {
            continue;
        }
        let spec = args.get(i + 1).context("--lb-obj needs LABEL=PATH")?;
        let (label, path) = spec.split_once('=').context("--lb-obj needs LABEL=PATH")?;
        let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        lb_objs.push((label.to_string(), bytes));
    }
    // With Katran, always a copy of the embedded object loaded as a variant, as Katran's
    // object is: the headline `lb - Katran` pairs Katran with it (see `PAIRS`).
    if katran_obj.is_some() {
        ensure!(
            lb_objs.iter().all(|(label, _)| label != COPY),
            "--lb-obj {COPY}=...: the label is the built-in copy's"
        );
        lb_objs.push((COPY.to_string(), Balancer::object().to_vec()));
    }
    // `--no-decoy`: no throw-away balancer loaded first (see `_decoy` below).
    let no_decoy = args.iter().any(|a| a == "--no-decoy");
    // `--raw`: also print every row's figure in every round (and the round's direction).
    let raw = args.iter().any(|a| a == "--raw");
    let rounds = if quick { QUICK_ROUNDS } else { ROUNDS };
    let started = Instant::now();
    private_netns()?;
    let cpu = pin_to_current_cpu()?;
    let d0 = ifindex("d0")?;

    // A balancer loaded before every measured one and never run: the first balancer a run
    // loads measured ~12 ns slower on the IPv4 hit than a second load of the same object
    // (median of 16 runs, stop 34; not traced further), and that first one used to be the
    // embedded build's main balancer, the one Katran and the variants are paired with.
    // With this one loaded first, a copy of the same object measured +14, +4, -3 ns against
    // the main one in three quiet runs. `--no-decoy` leaves it out (to see the bias).
    let _decoy = if no_decoy {
        None
    } else {
        Some(Lb::load(MAX_FLOWS).context("loading the decoy balancer")?)
    };
    let main = Lb::load(MAX_FLOWS)?;
    let full = Lb::load(FULL_FLOWS)?;
    let nat = Lb::load_nat()?;
    let mut front = BenchFront::load().context("loading the benchmark programs")?;
    front.attach_sink("d1")?;

    // The hit rows send what an established connection sends, TCP ACKs, to `lb` and Katran
    // alike: both steer an opening SYN by the ring first (the new-flow rows send SYNs).
    let hit4 = katran::as_ack(
        &Frame {
            dst: VIP,
            sport: 40_000,
            ..Frame::default()
        }
        .build(),
    );
    let hit6 = katran::as_ack(
        &Frame6 {
            dst: VIP6,
            sport: 40_000,
            ..Frame6::default()
        }
        .build(),
    );
    // New-flow clients: 10.128.0.0 + (sequence >> 16), port = sequence & 0xffff.
    let new4 = Frame {
        src: Ipv4Addr::new(10, 128, 0, 0),
        dst: VIP,
        ..Frame::default()
    }
    .build();
    let non_vip = Frame {
        dst: NOT_A_VIP,
        ..Frame::default()
    }
    .build();
    let nat4 = Frame {
        dst: NAT_VIP,
        sport: 40_000,
        ..Frame::default()
    }
    .build();
    // lb_xdp's own output for the IPv4 hit: IPv4-in-IPv4 to a backend.
    let (action, encapsulated) = main.lb.test_run(&hit4)?;
    ensure!(
        action == XDP_REDIRECT,
        "encapsulating the decap frame: {action}"
    );
    let outer_dst = Ipv4Addr::new(
        encapsulated[ETH_LEN + 16],
        encapsulated[ETH_LEN + 17],
        encapsulated[ETH_LEN + 18],
        encapsulated[ETH_LEN + 19],
    );
    let decap = Decap::load(&[outer_dst.into()]).context("loading lb_decap")?;
    for f in [&hit4, &hit6, &new4, &non_vip, &encapsulated, &nat4] {
        ensure!(
            f.len() <= BENCH_FRAME_MAX,
            "frame too long for the template"
        );
    }

    let katran = katran_obj
        .as_deref()
        .map(|obj| {
            katran::Katrans::load(
                obj,
                (MAX_FLOWS, FULL_FLOWS),
                (VIP, VIP6),
                &(11..11 + BACKENDS).collect::<Vec<u8>>(),
                backend6,
                &[&hit4, &hit6],
            )
        })
        .transpose()?;
    let variants = lb_objs
        .iter()
        .map(|(label, obj)| -> anyhow::Result<Variant> {
            Ok(Variant {
                main: Lb::load_from(Some(obj), MAX_FLOWS)
                    .with_context(|| format!("--lb-obj {label}"))?,
                full: Lb::load_from(Some(obj), FULL_FLOWS)
                    .with_context(|| format!("--lb-obj {label}"))?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut bench = Bench {
        front,
        main,
        full,
        nat,
        decap,
        d0,
        katran,
        variants,
    };
    let row = |name, kind, frame: &Vec<u8>, vary| Row {
        name,
        kind,
        frame: frame.clone(),
        vary,
        ns: Vec::new(),
    };
    let mut rows = vec![
        row("floor XDP_TX (lb_bench_tx)", Kind::TxFloor, &hit4, false),
        row("floor XDP_PASS (lb_pass)", Kind::PassFloor, &non_vip, false),
        row("hit IPv4", Kind::Hit4, &hit4, false),
        row(
            "hit IPv4, no nexthop cache",
            Kind::Hit4NoCache,
            &hit4,
            false,
        ),
        row("hit IPv6", Kind::Hit6, &hit6, false),
        row("NAT hit IPv4", Kind::NatHit4, &nat4, false),
        row("new flow, empty table", Kind::NewEmpty, &new4, true),
        row("new flow, full table", Kind::NewFull, &new4, true),
        row(
            "new flow, full, no cache",
            Kind::NewFullNoCache,
            &new4,
            true,
        ),
        row("non-VIP pass", Kind::NonVip, &non_vip, false),
        row("lb_decap (IPIP)", Kind::Decap, &encapsulated, false),
    ];
    if bench.katran.is_some() {
        // Each of Katran's rows runs right after lb's row it is compared with, so the pair
        // sees the same moment of the machine in every round (the paired table below).
        for (after, katran_row) in [
            (
                "hit IPv4",
                row(
                    "katran hit IPv4",
                    Kind::Katran(katran::Row::Hit4),
                    &hit4,
                    false,
                ),
            ),
            (
                "hit IPv6",
                row(
                    "katran hit IPv6",
                    Kind::Katran(katran::Row::Hit6),
                    &hit6,
                    false,
                ),
            ),
            (
                "new flow, full table",
                row(
                    "katran new flow, full",
                    Kind::Katran(katran::Row::NewFull),
                    &new4,
                    true,
                ),
            ),
        ] {
            insert_after(&mut rows, after, katran_row)?;
        }
    }
    // Row names live as long as the process (a few per --lb-obj).
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    for (n, (label, _)) in lb_objs.iter().enumerate() {
        // Next to the embedded build's rows, as Katran's are (the paired table).
        for (after, variant_row) in [
            (
                "hit IPv4",
                row(
                    leak(format!("hit IPv4 [{label}]")),
                    Kind::VariantHit(n),
                    &hit4,
                    false,
                ),
            ),
            (
                "hit IPv6",
                row(
                    leak(format!("hit IPv6 [{label}]")),
                    Kind::VariantHit(n),
                    &hit6,
                    false,
                ),
            ),
            (
                "new flow, full table",
                row(
                    leak(format!("new flow, full [{label}]")),
                    Kind::VariantNewFull(n),
                    &new4,
                    true,
                ),
            ),
        ] {
            insert_after(&mut rows, after, variant_row)?;
        }
    }
    if let Some(only) = &only {
        rows.retain(|r| {
            matches!(r.kind, Kind::TxFloor | Kind::PassFloor)
                || only.split('|').any(|t| match t.strip_prefix('=') {
                    Some(name) => r.name == name,
                    None => r.name.contains(t),
                })
        });
    }

    // Fill the full-table balancer: twice its capacity of fresh clients.
    let fill = Row {
        name: "filling the full table",
        ..row("", Kind::NewFull, &new4, true)
    };
    bench.run_row(&fill, 2 * FULL_FLOWS)?;
    let stats_full = bench.full.maps().flow_capacity()?;
    for n in 0..bench.variants.len() {
        let fill = Row {
            name: "filling a variant's full table",
            ..row("", Kind::VariantNewFull(n), &new4, true)
        };
        bench.run_row(&fill, 2 * FULL_FLOWS)?;
    }
    // The same for Katran's full-table instance, in runs of its LRU size (each below Katran's
    // new-connection rate limit, so every flow is inserted).
    let katran_full_len = if bench.katran.is_some() {
        let fill = Row {
            name: "filling Katran's full table",
            ..row("", Kind::Katran(katran::Row::NewFull), &new4, true)
        };
        for _ in 0..2 {
            bench.run_row(&fill, FULL_FLOWS)?;
        }
        let k = bench.katran.as_ref().context("Katran")?;
        Some(k.full.lru_len(cpu)?)
    } else {
        None
    };
    // Warm-up: every row once with a tenth of the frames.
    bench.reset_main(&hit4, &hit6, &nat4)?;
    for r in &rows {
        bench.run_row(r, REPEAT / 10)?;
    }
    // Rows that are compared (an `lb` row, then Katran's and the variants' rows paired with
    // it) form a group. Order A runs each group as listed, order B each group reversed; rounds
    // go A forward, A reversed, B forward, B reversed, and so on, so neither row of a pair
    // always runs first, and the paired table shows each order's median apart: a gap between
    // the two would be the rows' position. (Stop 34 suspected position for a copy of the
    // embedded object measuring ~12 ns cheaper than it; both orders showed the gap, and its
    // cause was the first load: see `_decoy`.)
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let partner = matches!(
            r.kind,
            Kind::Katran(_) | Kind::VariantHit(_) | Kind::VariantNewFull(_)
        );
        match groups.last_mut() {
            Some(g) if partner => g.push(i),
            _ => groups.push(vec![i]),
        }
    }
    let order_a: Vec<usize> = groups.iter().flatten().copied().collect();
    let order_b: Vec<usize> = groups
        .iter()
        .flat_map(|g| g.iter().rev())
        .copied()
        .collect();
    let mut in_order_b: Vec<bool> = Vec::with_capacity(rounds);
    let measure_start = Instant::now();
    for round in 0..rounds {
        bench.reset_main(&hit4, &hit6, &nat4)?;
        let b = (round / 2) % 2 == 1;
        in_order_b.push(b);
        let mut order = if b { order_b.clone() } else { order_a.clone() };
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let ns = bench.run_row(&rows[i], REPEAT)?;
            rows[i].ns.push(ns);
        }
    }
    let measured = measure_start.elapsed();

    // Cross-check with the previous method (per-call runs, repeat = 1).
    bench.reset_main(&hit4, &hit6, &nat4)?;
    let pass = PassGuard::load_unattached().context("loading lb_pass")?;
    let (pc_x, pc_p) = per_call(&bench.main.lb, &pass, &hit4)?;

    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    // Not available_parallelism(): that honours the affinity set above (1).
    // SAFETY: no preconditions.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    println!("lb XDP benchmark (BPF_PROG_TEST_RUN, live frames)");
    println!(
        "command:  cargo xtask bench xdp{}{} = cargo bench -p lb-userspace --bench xdp",
        if quick { " --quick" } else { "" },
        if katran_obj.is_some() {
            " --katran DIR"
        } else {
            ""
        }
    );
    println!(
        "date:     {}",
        cmd_output(&["date", "-u", "+%Y-%m-%d %H:%M:%S UTC"])
    );
    println!("kernel:   {}", cmd_output(&["uname", "-sr"]));
    println!("cpu:      {cpu_model} ({cores} cores online; pinned to cpu {cpu})");
    println!(
        "setup:    private netns, veth d0 (ingress, egress) - d1 (XDP sink); per VIP {BACKENDS} backends, Maglev ring {}; flow table {MAX_FLOWS} (emptied every round), full-table balancer {stats_full}; {}",
        lb_common::DEFAULT_RING_SIZE,
        if no_decoy {
            "no decoy (--no-decoy): the main balancer is the first loaded"
        } else {
            "a decoy balancer loaded first, never run"
        }
    );
    println!(
        "runs:     {rounds} rounds x {} rows, each one live run of {REPEAT} frames (batch {BATCH}), row order reversed every other round, each pair's rows swapped every other pair of rounds; {:.1} s measuring, {:.1} s in all",
        rows.len(),
        measured.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if let (Some(obj), Some(k)) = (&katran_obj, &bench.katran) {
        println!(
            "katran:   {} (balancer_ingress; RING_SIZE {}), same VIPs and backends, IPIP/IP6IP6 to the reals, gateway MAC from ctl_array (no route lookup), one LRU per CPU: {MAX_FLOWS} entries (hit rows), {FULL_FLOWS} (full-table row: {} entries after filling); hit rows send TCP ACKs to both (both steer an opening SYN by the ring), the new-flow rows SYNs",
            obj.display(),
            k.main.ring_size(),
            katran_full_len.unwrap_or(0)
        );
        println!(
            "pairing:  'lb - Katran' (the headline) pairs Katran with [{COPY}], a copy of lb's embedded object loaded as a variant, from bytes, as Katran's is; 'embedded lb - Katran' (the headline before stop 39) pairs it with the embedded object's own rows, which measured 5-23 ns cheaper than any copy of themselves; 'control: copy - embedded' is that gap in this run"
        );
    }
    println!(
        "verified: after every run, from the programs' counters: every frame ran the front and its target, tx/new-flow/pass_not_vip/decapsulated grew by exactly the frame count, the sink received every transmitted frame"
    );
    println!();
    let floor = median(&rows[0].ns);
    let pass_floor = median(&rows[1].ns);
    println!(
        "{:<34} {:>8} {:>7} {:>7} {:>12} {:>12}",
        "row (ns/frame)", "median", "min", "max", "above TX", "above PASS"
    );
    for r in &rows {
        let m = median(&r.ns);
        let min = r.ns.iter().copied().fold(f64::INFINITY, f64::min);
        let max = r.ns.iter().copied().fold(0.0, f64::max);
        println!(
            "{:<34} {:>8.0} {:>7.0} {:>7.0} {:>12.0} {:>12.0}",
            r.name,
            m,
            min,
            max,
            m - floor,
            m - pass_floor
        );
    }
    if raw {
        println!();
        println!("per round (ns/frame; A/B = the pairs' order, f = forward, r = reversed):");
        print!("{:<34}", "row");
        for (round, b) in in_order_b.iter().enumerate() {
            let order = if *b { "B" } else { "A" };
            let dir = if round % 2 == 0 { "f" } else { "r" };
            print!(" {:>6}", format!("{round}{order}{dir}"));
        }
        println!();
        for r in &rows {
            print!("{:<34}", r.name);
            for ns in &r.ns {
                print!(" {ns:>6.0}");
            }
            println!();
        }
        println!();
    }
    let pairs: Vec<(&str, &Row, &Row)> = PAIRS
        .iter()
        .filter_map(|(label, a, b)| {
            let a = rows.iter().find(|r| r.name == *a)?;
            let b = rows.iter().find(|r| r.name == *b)?;
            Some((*label, a, b))
        })
        .chain(rows.iter().filter_map(|r| {
            // A variant's rows against the embedded build's: "hit IPv4 [x]" - "hit IPv4".
            let base = r.name.split_once(" [")?.0;
            let base = if base == "new flow, full" {
                "new flow, full table"
            } else {
                base
            };
            let label = if r.name.ends_with(&format!(" [{COPY}]")) {
                "control: copy - embedded"
            } else {
                "variant - embedded"
            };
            Some((label, r, rows.iter().find(|b| b.name == base)?))
        }))
        .collect();
    if !pairs.is_empty() {
        println!();
        println!(
            "paired, per round (A - B, ns/frame; one difference per round, so drift of the machine between rounds cancels):"
        );
        println!(
            "{:<26} {:<58} {:>7} {:>7} {:>7} {:>11} {:>9} {:>9}",
            "pairing", "A - B", "median", "q1", "q3", "A cheaper", "order A", "order B"
        );
        let in_order = |ns: &[f64], b: bool| -> Vec<f64> {
            ns.iter()
                .zip(&in_order_b)
                .filter(|(_, o)| **o == b)
                .map(|(x, _)| *x)
                .collect()
        };
        for (label, a, b) in pairs {
            let d = Paired::of(&a.ns, &b.ns);
            let of_order = |o: bool| Paired::of(&in_order(&a.ns, o), &in_order(&b.ns, o)).median;
            println!(
                "{:<26} {:<58} {:>7.0} {:>7.0} {:>7.0} {:>5} of {:<2} {:>9.0} {:>9.0}",
                label,
                format!("{} - {}", a.name, b.name),
                d.median,
                d.q1,
                d.q3,
                d.a_lower,
                d.n,
                of_order(false),
                of_order(true)
            );
        }
    }
    println!();
    println!(
        "cross-check, per-call method (repeat=1, {PER_CALL} calls each, alternating), hit IPv4: lb_xdp {pc_x:.0} ns, lb_pass {pc_p:.0} ns, diff {:.0} ns",
        pc_x - pc_p
    );
    println!();
    print!(
        "\
notes:
- ns/frame is the kernel's average over one live run; median/min/max are over the rounds.
- 'above TX' = row median - XDP_TX floor median: what the program costs beyond the least a
  transmitting XDP program does (read the frame, transmit it). Rows that transmit (hits, new
  flows) compare with it; pass rows (non-VIP, lb_decap) compare with the XDP_PASS floor, whose
  cost is mostly the skb the kernel builds for a passed frame.
- every row includes lb_bench_front (template write + tail call) and, for transmitting rows,
  the veth transmit and the sink on d1: the same in the floor, so cancelled in the differences.
- 'paired': for each round, row A's ns/frame minus row B's in that round; the median and
  quartiles of those differences, and in how many rounds A was the cheaper. Katran's rows run
  next to the lb rows they are paired with: 'lb - Katran' with [lb copy], a copy of lb's own
  object loaded from bytes as Katran's is (loaded whenever Katran is), 'embedded lb - Katran'
  with the embedded object's rows. A --lb-obj variant's rows (and [lb copy]'s) pair with the
  embedded build's and run next to them too (a variant of the same object is the method's
  control: its differences centre on 0). Each pair swaps places every other pair of rounds
  (order A: the lb row first, order B: last); 'order A' and 'order B' are the paired medians
  of those rounds apart, so a gap between them is the rows' position, not the programs.
- the per-call cross-check measures single runs (each with the test-run loop's fixed cost,
  ~10 ns clock granularity, no transmit); it agrees with 'above TX' only roughly.
"
    );
    Ok(())
}
