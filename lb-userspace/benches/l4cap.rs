//! `cargo bench -p lb-userspace --bench l4cap` (the second part of `cargo xtask bench l4
//! [--quick]`): how many small UDP packets per second one CPU balances, `lb_xdp` in DSR mode
//! beside the kernel's nftables DNAT, fed by a generator that outruns both.
//!
//! Why a second L4 benchmark: in the namespace benchmark (`xtask/src/bench_l4.rs`) the rate is
//! the socket sender's, not the balancer's (the LB's thread is three quarters idle), and every
//! packet reaches the LB as an skb built by the sender's stack and a bridge, so `lb_xdp` works
//! on a copy of an skb rather than on a raw frame as behind a NIC. Here nothing is an skb before
//! the LB:
//!
//! - **Generator:** `BPF_PROG_TEST_RUN` in live-frames mode of `lb_bench_front` tail-calling
//!   `lb_bench_tx` on the veth `capgen`, from a thread pinned to CPU [`GEN_CPU`] at
//!   `SCHED_FIFO` 40 (a generator that other work can stop leaves the LB idle meanwhile). Every repeat is a 60-byte UDP frame from
//!   10.0.0.1:(10000 + i), i = 0..32 in turn (32 flows), to the VIP 10.100.0.10:9000, sent with
//!   `XDP_TX`: veth puts the frame straight into the peer's XDP ring.
//! - **LB:** the peer `caplb` (10.0.0.2/24), receiving in a threaded NAPI kthread pinned to
//!   CPU [`LB_CPU`] at `SCHED_FIFO` 50, so nothing else on the machine delays it. Everything the
//!   LB does to a packet runs in that thread.
//!   - **lb:** `lb_xdp` attached natively, the VIP forwarding to 10.0.0.11–13 (DSR):
//!     flow-table hit, encapsulation, `XDP_TX` back out of `caplb`.
//!   - **nft:** `lb_pass` attached natively (returns `XDP_PASS`: the kernel builds an skb from
//!     the frame; without an XDP program on `caplb` veth would drop the generator's frames),
//!     then conntrack, DNAT to a backend drawn at random per new flow (`numgen random mod 3`,
//!     the same rule as the namespace benchmark), routing, forwarding back out of `caplb`.
//!
//!   The backends are permanent neighbours on `caplb` with `capgen`'s MAC, so both modes send
//!   their output back to `capgen`.
//! - **Sink:** `lb_bench_sink` on `capgen` counts and drops what the LB sent. `capgen`'s own
//!   NAPI thread runs at `SCHED_FIFO` 49, unpinned.
//!
//! Figures per mode and round: packets/s delivered to the sink, packets/s generated, packets/s
//! the LB received (the rest found its receive ring full), how busy the LB's thread was
//! (`/proc/TID/schedstat`), and its run time per delivered packet. When the thread is close to
//! 100 % busy, delivered/s is the LB's capacity on one CPU. Ratios lb/nft are taken per round
//! (the two modes of one round run back to back).
//!
//! Verified every run: lb mode: `lb_xdp`'s `tx` counter grew by what the sink received and the
//! kernel forwarded nothing (`Ip: ForwDatagrams`); nft mode: the kernel forwarded what the
//! sink received. The process unshares its own network and mount
//! namespaces (the latter for a `/sys` showing this namespace's interfaces), so everything it
//! made disappears when it exits, however it exits. Needs root.
use std::{
    fs, io,
    net::Ipv4Addr,
    process::{Command, ExitCode},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use lb::{
    dataplane::{
        Balancer, LbAddrs, Maps, PassGuard, Sizes, attach_pass,
        bench::{BenchFront, BenchTarget},
    },
    l4::{L4Member, Proto, RingWriter, VipAddr, VipSpec},
    packet::Frame,
};
mod common;
use common::{cmd_output, ifindex, median, pin, reason, run_cmd};
use lb_common::{BENCH_VARY_FLOWS, BenchCounter, BenchTemplate, Reason};

/// CPU of the LB's receive thread.
const LB_CPU: usize = 1;
/// CPU of the generator.
const GEN_CPU: usize = 0;
/// Frames per live run of the generator.
const REPEAT: u32 = 1 << 16;
/// Frames per batch of a live run.
const BATCH: u32 = 64;
/// Flows the generator cycles through (a power of two).
const FLOWS: u32 = 32;
/// First client port.
const PORT_BASE: u32 = 10_000;
/// Frames of the LB's own the sink may count in a run besides the balanced ones.
const STRAY: u64 = 16;
/// Largest share of the LB's output allowed to miss the sink (the sink's receive ring was
/// full): beyond it the sink, not the LB, would be what the run measures.
const MAX_LOST_AFTER: f64 = 0.01;

/// Share of `sent` that did not arrive.
fn lost_after(sent: u64, arrived: u64) -> f64 {
    sent.saturating_sub(arrived) as f64 / sent.max(1) as f64
}

const GEN_IF: &str = "capgen";
const LB_IF: &str = "caplb";
/// The source and destination MACs `lb::packet::Frame` writes: the generator's frames need
/// no rewriting beyond the swap `lb_bench_tx` undoes.
const GEN_MAC: &str = "02:00:00:00:00:01";
const LB_MAC: &str = "02:00:00:00:00:02";
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 10);
const VIP_PORT: u16 = 9000;
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 0, 0, 11),
    Ipv4Addr::new(10, 0, 0, 12),
    Ipv4Addr::new(10, 0, 0, 13),
];

const NFT_RULES: &str = "table ip l4cap {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr 10.100.0.10 udp dport 9000 dnat to numgen random mod 3 map { 0 : 10.0.0.11, 1 : 10.0.0.12, 2 : 10.0.0.13 }
    }
}
";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("l4cap bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_stdin(args: &[&str], input: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {args:?}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn sysctl(name: &str, value: &str) -> anyhow::Result<()> {
    run_cmd(&["sysctl", "-q", "-w", &format!("{name}={value}")])
}

/// Moves this (still single-threaded) process into new network and mount namespaces, mounts a
/// `/sys` of the new network namespace, and builds the veth pair.
fn private_netns() -> anyhow::Result<()> {
    // SAFETY: plain syscalls on the calling thread, the only one so far; the C strings are
    // NUL-terminated literals.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) != 0 {
            return Err(io::Error::last_os_error()).context("unshare(CLONE_NEWNET|CLONE_NEWNS)");
        }
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error()).context("making mounts private");
        }
        // /sys shows the interfaces of the namespace that mounted it: mount our own.
        libc::umount2(c"/sys".as_ptr(), libc::MNT_DETACH);
        if libc::mount(
            c"sysfs".as_ptr(),
            c"/sys".as_ptr(),
            c"sysfs".as_ptr(),
            0,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error()).context("mounting /sys");
        }
    }
    run_cmd(&["ip", "link", "set", "lo", "up"])?;
    // No IPv6: nothing but the benchmark's frames reaches the sink (no router/neighbour
    // solicitations, no MLD reports).
    sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
    sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
    sysctl("net.ipv4.ip_forward", "1")?;
    sysctl("net.ipv4.conf.all.send_redirects", "0")?;
    sysctl("net.ipv4.conf.default.send_redirects", "0")?;
    sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    sysctl("net.ipv4.conf.default.rp_filter", "0")?;
    run_cmd(&[
        "ip", "link", "add", GEN_IF, "address", GEN_MAC, "type", "veth", "peer", "name", LB_IF,
        "address", LB_MAC,
    ])?;
    run_cmd(&["ip", "addr", "add", &format!("{LB_ADDR}/24"), "dev", LB_IF])?;
    for dev in [GEN_IF, LB_IF] {
        run_cmd(&["ip", "link", "set", dev, "up"])?;
    }
    for b in BACKENDS {
        run_cmd(&[
            "ip",
            "neigh",
            "add",
            &b.to_string(),
            "lladdr",
            GEN_MAC,
            "dev",
            LB_IF,
            "nud",
            "permanent",
        ])?;
    }
    Ok(())
}

fn fifo(tid: i32, prio: i32) -> anyhow::Result<()> {
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: `param` is a valid sched_param.
    let rc = unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param) };
    ensure!(
        rc == 0,
        "sched_setscheduler({tid}, FIFO {prio}): {}",
        io::Error::last_os_error()
    );
    Ok(())
}

/// Turns on threaded NAPI for `dev` and returns its NAPI kthread (veth has one NAPI instance
/// per queue, and these have one queue). The thread exists only while the device has an XDP
/// program (or GRO); it is made again when the program changes, so look it up every time.
fn napi_thread(dev: &str) -> anyhow::Result<i32> {
    let path = format!("/sys/class/net/{dev}/threaded");
    fs::write(&path, "1").with_context(|| format!("writing {path}"))?;
    let prefix = format!("napi/{dev}-");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut found = Vec::new();
        for entry in fs::read_dir("/proc")? {
            let entry = entry?;
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm"))
                && comm.trim_end().starts_with(&prefix)
            {
                found.push(pid);
            }
        }
        match found.as_slice() {
            [one] => return Ok(*one),
            [] if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            [] => bail!("no NAPI thread {prefix}* after enabling threaded NAPI on {dev}"),
            many => bail!("{} NAPI threads {prefix}*: {many:?}", many.len()),
        }
    }
}

/// Run time of a thread so far (`/proc/TID/schedstat`, first field).
fn run_ns(tid: i32) -> anyhow::Result<u64> {
    let s = fs::read_to_string(format!("/proc/{tid}/schedstat"))
        .with_context(|| format!("reading /proc/{tid}/schedstat"))?;
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("parsing schedstat")
}

/// A field of the `Ip:` lines of this namespace's `/proc/net/snmp`.
fn ip_mib(field: &str) -> anyhow::Result<u64> {
    let s = fs::read_to_string("/proc/net/snmp")?;
    let mut ip = s.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().context("Ip header")?, ip.next().context("Ip")?);
    let i = names
        .split_whitespace()
        .position(|n| n == field)
        .with_context(|| format!("no Ip field {field}"))?;
    values
        .split_whitespace()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("parsing Ip {field}"))
}

/// Frames `lb_xdp` saw, whatever it did with them.
fn lb_seen(maps: &Maps) -> anyhow::Result<u64> {
    Ok(maps.reason_totals()?.into_iter().map(|(_, n)| n).sum())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Lb,
    Nft,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Lb => "lb",
            Mode::Nft => "nft",
        }
    }
}

/// What is attached to the LB's interface in one mode; detached on drop.
enum Attached {
    Lb {
        _prog: Balancer,
        ring: Box<RingWriter<Maps>>,
    },
    Nft {
        _prog: PassGuard,
    },
}

impl Drop for Attached {
    fn drop(&mut self) {
        if matches!(self, Attached::Nft { .. }) {
            let _ = run_cmd(&["nft", "delete", "table", "ip", "l4cap"]);
        }
    }
}

fn attach(mode: Mode) -> anyhow::Result<Attached> {
    Ok(match mode {
        Mode::Lb => {
            let sizes = Sizes {
                max_flows: 1 << 16,
                ring_size: lb_common::DEFAULT_RING_SIZE,
                max_vips: 4,
                max_backends: 16,
            };
            let (mut lb, maps) = Balancer::load(sizes, LbAddrs::one(LB_ADDR.into()), None)
                .context("loading lb_xdp")?;
            let mut ring =
                RingWriter::new(maps, sizes.ring_size, sizes.max_vips, sizes.max_backends);
            let vip = VipAddr {
                addr: VIP.into(),
                port: VIP_PORT,
                proto: Proto::Udp,
            };
            ring.add_vip(VipSpec::new(None, vip))?;
            let targets: Vec<L4Member> = BACKENDS
                .iter()
                .map(|b| L4Member::in_service((*b).into(), VIP_PORT, 1))
                .collect();
            ring.apply(&vip, &targets, false)?;
            lb.attach(LB_IF, lb::cli::XdpMode::Native)?;
            Attached::Lb {
                _prog: lb,
                ring: Box::new(ring),
            }
        }
        Mode::Nft => {
            let pass = attach_pass(LB_IF).context("attaching lb_pass")?;
            run_stdin(&["nft", "-f", "-"], NFT_RULES)?;
            Attached::Nft { _prog: pass }
        }
    })
}

/// Counters one measured run compares.
#[derive(Clone, Copy, Default)]
struct Snap {
    at: Option<Instant>,
    generated: u64,
    failed: u64,
    sink: u64,
    lb_thread_ns: u64,
    lb_tx: u64,
    lb_seen: u64,
    forwarded: u64,
    ip_in: u64,
}

struct Sample {
    mode: Mode,
    secs: f64,
    generated: u64,
    received: u64,
    delivered: u64,
    busy: f64,
    ns_per_pkt: f64,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.delivered as f64 / self.secs
    }
}

struct Bench {
    front: BenchFront,
    frame: Vec<u8>,
    gen_if: u32,
}

impl Bench {
    fn snap(&self, attached: &Attached, lb_thread: i32) -> anyhow::Result<Snap> {
        let (lb_tx, seen) = match attached {
            Attached::Lb { ring, .. } => (reason(ring.maps(), Reason::Tx)?, lb_seen(ring.maps())?),
            Attached::Nft { .. } => (0, 0),
        };
        Ok(Snap {
            at: Some(Instant::now()),
            generated: self.front.counter(BenchCounter::Runs)?,
            failed: self.front.counter(BenchCounter::TailCallFailed)?
                + self.front.counter(BenchCounter::TemplateFailed)?,
            sink: self.front.counter(BenchCounter::SinkReceived)?,
            lb_thread_ns: run_ns(lb_thread)?,
            lb_tx,
            lb_seen: seen,
            forwarded: ip_mib("ForwDatagrams")?,
            ip_in: ip_mib("InReceives")?,
        })
    }

    fn generate(&self, secs: f64) -> anyhow::Result<()> {
        let until = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < until {
            self.front
                .run_live(&self.frame, self.gen_if, REPEAT, BATCH)?;
        }
        Ok(())
    }

    /// One mode: attach, warm up, measure, detach.
    fn run(&self, mode: Mode, warm: f64, secs: f64) -> anyhow::Result<Sample> {
        let attached = attach(mode)?;
        let lb_thread = napi_thread(LB_IF)?;
        pin(lb_thread, LB_CPU)?;
        fifo(lb_thread, 50)?;
        self.generate(warm)?;
        // Let the rings drain before the first reading.
        thread::sleep(Duration::from_millis(50));
        let before = self.snap(&attached, lb_thread)?;
        self.generate(secs)?;
        thread::sleep(Duration::from_millis(50));
        let after = self.snap(&attached, lb_thread)?;
        drop(attached);
        let elapsed = after
            .at
            .zip(before.at)
            .map(|(a, b)| a - b)
            .unwrap_or_default();
        let d = |f: fn(&Snap) -> u64| f(&after) - f(&before);
        let name = mode.name();
        ensure!(d(|s| s.failed) == 0, "{name}: template or tail call failed");
        let delivered = d(|s| s.sink);
        let generated = d(|s| s.generated);
        ensure!(delivered > 0, "{name}: nothing reached the sink");
        ensure!(
            delivered <= generated + STRAY,
            "{name}: sink got {delivered}, more than the {generated} generated"
        );
        let forwarded = d(|s| s.forwarded);
        let received = match mode {
            Mode::Lb => {
                let tx = d(|s| s.lb_tx);
                ensure!(
                    delivered <= tx + STRAY && lost_after(tx, delivered) <= MAX_LOST_AFTER,
                    "lb: lb_xdp transmitted {tx}, the sink got {delivered}"
                );
                ensure!(
                    forwarded <= STRAY,
                    "lb: the kernel forwarded {forwarded} packets: not lb_xdp's path"
                );
                d(|s| s.lb_seen)
            }
            Mode::Nft => {
                ensure!(
                    delivered <= forwarded + STRAY
                        && lost_after(forwarded, delivered) <= MAX_LOST_AFTER,
                    "nft: the kernel forwarded {forwarded}, the sink got {delivered}"
                );
                d(|s| s.ip_in)
            }
        };
        let secs = elapsed.as_secs_f64();
        let thread_ns = d(|s| s.lb_thread_ns) as f64;
        Ok(Sample {
            mode,
            secs,
            generated,
            received,
            delivered,
            busy: thread_ns / (secs * 1e9),
            ns_per_pkt: thread_ns / delivered as f64,
        })
    }
}

fn range(v: &[f64], fmt: impl Fn(f64) -> String) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(0.0, f64::max);
    format!("{}–{}", fmt(min), fmt(max))
}

fn k(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else {
        format!("{:.0}k", x / 1e3)
    }
}

fn run() -> anyhow::Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "needs root (loads XDP programs, creates network namespaces): sudo -E cargo xtask bench l4"
        );
    }
    // SAFETY: no preconditions.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    ensure!(
        cores > LB_CPU as i64,
        "needs at least {} CPUs (the LB's thread runs on cpu {LB_CPU})",
        LB_CPU + 1
    );
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, warm, secs) = if quick { (2, 0.5, 3.0) } else { (5, 1.0, 8.0) };
    let load = cmd_output(&["cat", "/proc/loadavg"]);
    let started = Instant::now();
    private_netns()?;
    // The generator must outrun the LB without pause: pinned, and at real-time priority
    // (below both NAPI threads) so that other work on its CPU cannot stop it for a while and
    // let the LB's ring run dry.
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    pin(me, GEN_CPU)?;
    fifo(me, 40)?;

    let mut front = BenchFront::load().context("loading the benchmark programs")?;
    front.attach_sink(GEN_IF)?;
    let sink_thread = napi_thread(GEN_IF)?;
    fifo(sink_thread, 49)?;
    front.set_target(BenchTarget::TxFloor)?;
    let mut frame = Frame {
        src: CLIENT,
        dst: VIP,
        sport: PORT_BASE as u16,
        dport: VIP_PORT,
        proto: 17,
        payload: vec![0x5a; 18],
        ..Frame::default()
    }
    .build();
    // `Frame` addresses it from GEN_MAC to LB_MAC; lb_bench_tx swaps the Ethernet addresses
    // before sending, so the template holds them swapped.
    let (dst, src) = frame.split_at_mut(6);
    dst.swap_with_slice(&mut src[..6]);
    // No UDP checksum (allowed for IPv4), so varying the port keeps the frame valid.
    frame[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    let mut t = BenchTemplate {
        len: frame.len() as u32,
        vary: BENCH_VARY_FLOWS,
        vary_port_off: (14 + 20) as u32,
        vary_port_base: PORT_BASE,
        vary_port_mask: FLOWS - 1,
        ..BenchTemplate::default()
    };
    t.frame[..frame.len()].copy_from_slice(&frame);
    front.set_template(&t)?;
    let bench = Bench {
        front,
        frame,
        gen_if: ifindex(GEN_IF)?,
    };

    println!("lb L4 capacity benchmark: lb_xdp (DSR) beside nftables DNAT, live-frames generator");
    println!(
        "command:  cargo xtask bench l4{} (part 2) = cargo bench -p lb-userspace --bench l4cap{}",
        if quick { " --quick" } else { "" },
        if quick { " -- --quick" } else { "" }
    );
    println!(
        "kernel:   {}; {cores} cpus; load average at start {load}",
        cmd_output(&["uname", "-sr"])
    );
    println!(
        "runs:     {rounds} round(s), modes alternating; per mode {warm} s warm-up + {secs} s measured"
    );
    println!(
        "setup:    generator (BPF_PROG_TEST_RUN live frames, XDP_TX) on {GEN_IF}, cpu {GEN_CPU} -> veth -> {LB_IF}: LB in a threaded NAPI kthread, cpu {LB_CPU}, SCHED_FIFO 50 -> XDP_TX / forward back to {GEN_IF}: XDP sink"
    );
    println!(
        "traffic:  60-byte UDP frames, {FLOWS} flows 10.0.0.1:{PORT_BASE}+i -> {VIP}:{VIP_PORT}, 3 backends"
    );
    println!();

    let mut samples: Vec<Sample> = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Mode::Lb, Mode::Nft]
        } else {
            [Mode::Nft, Mode::Lb]
        };
        for mode in order {
            let s = bench.run(mode, warm, secs)?;
            println!(
                "  round {} {:<3} {:>8}/s delivered {:>8}/s generated {:>8}/s into the LB  LB thread {:>4.0}% busy {:>6.0} ns/pkt",
                round + 1,
                mode.name(),
                k(s.rate()),
                k(s.generated as f64 / s.secs),
                k(s.received as f64 / s.secs),
                s.busy * 100.0,
                s.ns_per_pkt
            );
            samples.push(s);
        }
    }
    println!();
    println!(
        "  {:<5} {:>22} {:>16} {:>12} {:>24}",
        "mode", "delivered/s (range)", "into the LB/s", "LB busy", "LB ns/pkt (range)"
    );
    for mode in [Mode::Lb, Mode::Nft] {
        let of: Vec<&Sample> = samples.iter().filter(|s| s.mode == mode).collect();
        let rates: Vec<f64> = of.iter().map(|s| s.rate()).collect();
        let ns: Vec<f64> = of.iter().map(|s| s.ns_per_pkt).collect();
        let into: Vec<f64> = of.iter().map(|s| s.received as f64 / s.secs).collect();
        let busy: Vec<f64> = of.iter().map(|s| s.busy * 100.0).collect();
        println!(
            "  {:<5} {:>22} {:>16} {:>11.0}% {:>24}",
            mode.name(),
            format!("{} ({})", k(median(&rates)), range(&rates, k)),
            k(median(&into)),
            median(&busy),
            format!("{:.0} ({})", median(&ns), range(&ns, |x| format!("{x:.0}")))
        );
    }
    let per_round = |f: fn(&Sample, &Sample) -> f64| -> Vec<f64> {
        samples
            .chunks(2)
            .map(|pair| {
                let (lb, nft) = if pair[0].mode == Mode::Lb {
                    (&pair[0], &pair[1])
                } else {
                    (&pair[1], &pair[0])
                };
                f(lb, nft)
            })
            .collect()
    };
    let rate = per_round(|lb, nft| lb.rate() / nft.rate());
    let cpu = per_round(|lb, nft| nft.ns_per_pkt / lb.ns_per_pkt);
    let x = |v: f64| format!("{v:.2}x");
    println!(
        "  ratio lb/nft, per round: delivered/s {} ({}); LB CPU per packet nft/lb {} ({})",
        x(median(&rate)),
        range(&rate, x),
        x(median(&cpu)),
        range(&cpu, x)
    );
    println!();
    println!(
        "verified: every run, lb: lb_xdp's tx = what the sink got and the kernel forwarded nothing; nft: the kernel forwarded what the sink got; {:.0} s in all",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
