//! `cargo xtask bench l4 [--quick]`: `lb_xdp` in DSR mode beside the kernel's own nftables
//! DNAT load balancing, on one namespace topology, in one run, rounds alternating lb nft.
//!
//! ```text
//!                       [bridge ns: br0]
//!      cl ──────────────── lb0 ───────────────── be0  be1  be2     (bridge-side veth ends)
//!      │                   │                     │
//!  [client ns]          [LB ns]               [backend nss]        (each side: eth0)
//!  10.0.0.1             10.0.0.2              10.0.0.11–13, VIP 10.100.0.10 on lo
//!  10.100.0.0/24 via 10.0.0.2
//! ```
//!
//! The same shape as `tests/src/topology.rs` (which xtask cannot use: it needs the BPF
//! build), built here with `ip`. Native XDP on every veth that runs a program. Two modes on
//! the same namespaces, switched between rounds:
//!
//! - **lb**: `lb run` on the LB's eth0 (`--xdp-mode native`), one UDP and one TCP VIP, the
//!   three backends as targets; `lb decap` on every backend; backends answer the client
//!   directly (DSR).
//! - **nft**: no `lb run`; in the LB namespace the nftables ruleset of [`NFT_RULESET`]
//!   (conntrack + DNAT with `numgen random mod 3`); the backends route the client through the
//!   LB so replies are translated back. `lb decap` stays attached on the backends (it passes
//!   packets that are not encapsulated), so the backends' receive path is the same.
//!
//! Figures, each per round and mode:
//!
//! - **UDP packets/s**: one sender thread (pinned to CPU 0) blasts 18-byte UDP payloads
//!   (60-byte frames) with `sendmmsg` from 32 sockets (32 flows) to the VIP. Packets are
//!   counted **at the backends**: a `netdev` ingress nftables counter on each backend's eth0
//!   (after `lb decap`'s XDP, before the IP stack) that drops them, so the backends' cost per
//!   packet is small and the same in both modes.
//! - **TCP connections/s**: 16 client threads (pinned to CPU 0) each connect, wait for the
//!   server's reset and start over; the backends accept and close with `SO_LINGER` 0 (so no
//!   TIME_WAIT anywhere). Counted at the backends (accepts).
//! - **LB CPU per packet / per connection**: the LB's eth0 receives through a threaded NAPI
//!   kthread (`/sys/class/net/eth0/threaded` = 1; GRO on, and TSO off on the sending peer,
//!   so veth uses NAPI without XDP too), pinned to CPU 1 at `SCHED_FIFO` priority 50 (so the
//!   other users of the shared CPU do not delay it), with `napi_defer_hard_irqs` and
//!   `gro_flush_timeout` ([`NAPI_HOLD_NS`]) so it polls batches as behind a NIC with
//!   interrupt coalescing instead of waking for every packet. Everything the LB does to a
//!   packet (lb: `lb_xdp` and `XDP_TX`; nft: skb, conntrack, DNAT, routing, forwarding,
//!   transmit) runs in that thread. The bridge-side peer of the LB's veth runs an XDP
//!   program that passes everything (`lb decap` for an address nobody has: XDP_TX'd frames
//!   reach a veth peer only if it runs XDP) and a threaded NAPI thread of its own (unpinned,
//!   `SCHED_FIFO` 49), so the work after the LB (bridge, backends) is neither charged to the
//!   LB's thread nor left waiting. The thread's runtime (`/proc/PID/schedstat`) divided by
//!   the frames the LB received (`lb0`'s tx_packets; TCP: by connections delivered) is the
//!   LB's CPU per packet; it includes the thread's wake-ups and, as this kernel has no IRQ
//!   time accounting, the interrupts that hit it. `lb0`'s `tx_dropped` counts frames the
//!   LB's receive ring had no room for.
//!   For lb, `kernel.bpf_stats_enabled=1` during its rounds adds `lb_xdp`'s own run time per
//!   packet (`bpftool prog show`: run_time_ns / run_cnt); the sysctl is restored afterwards.
//!
//! Ratios lb ÷ nft are computed per round (the same minute's machine for both) and their
//! median printed; rounds give the spread.
use crate::median;
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd as _, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const LB: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 0, 0, 11),
    Ipv4Addr::new(10, 0, 0, 12),
    Ipv4Addr::new(10, 0, 0, 13),
];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 10);
const UDP_PORT: u16 = 9000;
const TCP_PORT: u16 = 8080;
/// 18 bytes of UDP payload: with UDP, IPv4 and Ethernet headers a minimum-size 60-byte frame.
const PAYLOAD: usize = 18;
/// UDP flows (sockets with distinct source ports) of the sender.
const UDP_FLOWS: usize = 32;
/// Messages per `sendmmsg` call.
const BATCH: usize = 32;
/// TCP client threads.
const TCP_CLIENTS: usize = 16;
/// MTU of every link but the client's: room for the LB's 20-byte outer header.
const UNDERLAY_MTU: &str = "1520";
/// CPU the generators (and every other thread of this process) run on.
const GEN_CPU: usize = 0;
/// How long the LB's NAPI instance holds off new wake-ups after a poll (ns): a batch
/// gathers in the meantime (the ring holds 256 frames: 2.5 ms at 100k packets/s).
const NAPI_HOLD_NS: u32 = 200_000;
/// CPU the LB's receive thread runs on.
const LB_CPU: usize = 1;

/// The nft mode's ruleset in the LB namespace: the kernel's own L4 load balancing, DNAT to
/// a backend drawn at random for each new conntrack entry (later packets of the flow follow
/// the conntrack entry, as `lb_xdp`'s follow its flow table).
pub const NFT_RULESET: &str = "table ip l4bench {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr 10.100.0.10 udp dport 9000 dnat to numgen random mod 3 map { 0 : 10.0.0.11, 1 : 10.0.0.12, 2 : 10.0.0.13 }
        ip daddr 10.100.0.10 tcp dport 8080 dnat to numgen random mod 3 map { 0 : 10.0.0.11, 1 : 10.0.0.12, 2 : 10.0.0.13 }
    }
}
";

/// The backends' packet counter: UDP to the bench port counted and dropped at ingress.
const COUNTER_RULESET: &str = "table netdev l4bench {
    counter rx { }
    chain ingress {
        type filter hook ingress device \"eth0\" priority 0; policy accept;
        udp dport 9000 counter name \"rx\" drop
    }
}
";

/// Set by SIGINT/SIGTERM: every loop checks it and unwinds, so the guards tear down.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> anyhow::Result<()> {
    ensure!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
    Ok(())
}

/// Sleeps `d`, waking early (with an error) on Ctrl-C.
fn sleep(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run_cmd(Command::new("ip").args(args))
}

/// `ip netns exec NS CMD ARGS…`.
fn in_ns(ns: &str, cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    run_cmd(
        Command::new("ip")
            .args(["netns", "exec", ns, cmd])
            .args(args),
    )
}

fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    in_ns(ns, "sysctl", &["-qw", &format!("{key}={value}")]).map(drop)
}

/// `nft -f -` in `ns` with `ruleset` on stdin.
fn nft_load(ns: &str, ruleset: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    child
        .stdin
        .take()
        .context("nft's stdin")?
        .write_all(ruleset.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nft -f in {ns} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Moves the calling thread into network namespace `ns` (sockets it opens afterwards live
/// there).
fn enter_ns(ns: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening /run/netns/{ns}"))?;
    // SAFETY: setns(2) on a namespace file we hold open; affects this thread only.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    ensure!(
        rc == 0,
        "setns into {ns}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Pins thread `tid` (0: the calling thread) to `cpu`.
fn pin(tid: libc::pid_t, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    ensure!(
        rc == 0,
        "pinning {tid} to cpu {cpu}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Gives thread `tid` real-time priority `prio`, so the shared CPUs' other work does not
/// delay it (the kernel's RT throttling still leaves others 5 %).
fn fifo(tid: u32, prio: i32) -> anyhow::Result<()> {
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: sched_setscheduler on a thread id with a valid sched_param.
    let rc = unsafe { libc::sched_setscheduler(tid as libc::pid_t, libc::SCHED_FIFO, &param) };
    ensure!(
        rc == 0,
        "making thread {tid} SCHED_FIFO: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Nanoseconds thread `tid` has run (first field of /proc/TID/schedstat).
fn runtime_ns(tid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/schedstat"))
        .with_context(|| format!("reading /proc/{tid}/schedstat"))?;
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("parsing schedstat")
}

/// Every kernel thread whose name starts with `napi/`.
fn napi_threads() -> Vec<u32> {
    let mut v = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("napi/"))
            {
                v.push(pid);
            }
        }
    }
    v
}

/// Turns on threaded NAPI for `dev` in `ns` and returns its kernel thread: the `napi/`
/// thread that appeared. veth has NAPI only with XDP attached or GRO on: `gro` turns GRO on.
fn threaded_napi(ns: &str, dev: &str, gro: bool) -> anyhow::Result<u32> {
    if gro {
        in_ns(ns, "ethtool", &["-K", dev, "gro", "on"])?;
    }
    let before = napi_threads();
    in_ns(
        ns,
        "sh",
        &["-c", &format!("echo 1 > /sys/class/net/{dev}/threaded")],
    )?;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let new: Vec<u32> = napi_threads()
            .into_iter()
            .filter(|t| !before.contains(t))
            .collect();
        match new.as_slice() {
            [t] => return Ok(*t),
            [] if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => bail!("expected one new napi thread for {dev} in {ns}, found {new:?}"),
        }
    }
}

/// A child process (`lb run`, `lb decap`), stopped with SIGTERM on drop.
struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    /// Starts `lb ARGS` in `ns` and waits for its `ready` line.
    fn lb(lb: &Path, ns: &str, args: &[&str], log: &Path) -> anyhow::Result<Self> {
        let what = format!("lb {} in {ns}", args.first().copied().unwrap_or(""));
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(lb)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("ready")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        let mut me = Self { child, what };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            check_interrupted()?;
            if rx.try_recv().is_ok() {
                return Ok(me);
            }
            if let Some(st) = me.child.try_wait()? {
                bail!(
                    "{} exited ({st}): {}",
                    me.what,
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "{} not ready after 30 s: {}",
                me.what,
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child (nsenter execs lb: same pid).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("xtask: {} did not stop on SIGTERM; killing it", self.what);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Restores a global sysctl on drop.
struct SysctlGuard {
    path: &'static str,
    old: String,
}

impl SysctlGuard {
    fn set(path: &'static str, value: &str) -> anyhow::Result<Self> {
        let old = std::fs::read_to_string(path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .to_owned();
        std::fs::write(path, value).with_context(|| format!("writing {path}"))?;
        Ok(Self { path, old })
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(self.path, &self.old) {
            eprintln!("xtask: restoring {} to {}: {e}", self.path, self.old);
        }
    }
}

/// The namespaces, their links and the backends' servers; everything removed on drop
/// (deleting a namespace removes its veths, XDP attachments and nftables tables).
struct Topology {
    prefix: String,
    created: Vec<String>,
    decaps: Vec<Proc>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    accepted: Arc<AtomicU64>,
    dir: PathBuf,
}

impl Topology {
    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn build(lb: &Path, dir: &Path) -> anyhow::Result<Self> {
        let mut t = Self {
            prefix: format!("l4b{}-", std::process::id()),
            created: Vec::new(),
            decaps: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            accepted: Arc::new(AtomicU64::new(0)),
            dir: dir.to_owned(),
        };
        let br = t.ns("br");
        t.add_ns(&br)?;
        in_ns(&br, "ip", &["link", "add", "br0", "type", "bridge"])?;
        in_ns(&br, "ip", &["link", "set", "br0", "up"])?;

        let cl = t.ns("cl");
        t.add_node(&cl, "cl", CLIENT, "1500")?;
        sysctl(&cl, "net.ipv4.conf.all.rp_filter", "0")?;
        sysctl(&cl, "net.ipv4.conf.eth0.rp_filter", "0")?;
        sysctl(&cl, "net.ipv4.conf.all.accept_redirects", "0")?;
        ip(&[
            "-n",
            &cl,
            "route",
            "add",
            "10.100.0.0/24",
            "via",
            &LB.to_string(),
        ])?;

        for (j, addr) in BACKENDS.iter().enumerate() {
            let ns = t.ns(&format!("be{j}"));
            t.add_node(&ns, &format!("be{j}"), *addr, UNDERLAY_MTU)?;
            ip(&["-n", &ns, "addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            for (k, v) in [
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.eth0.rp_filter", "0"),
                ("net.ipv4.conf.all.arp_ignore", "1"),
                ("net.ipv4.conf.all.arp_announce", "2"),
                ("net.ipv4.conf.all.accept_redirects", "0"),
            ] {
                sysctl(&ns, k, v)?;
            }
            nft_load(&ns, COUNTER_RULESET)?;
        }

        let lbns = t.ns("lb");
        t.add_node(&lbns, "lb0", LB, UNDERLAY_MTU)?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.eth0.rp_filter", "0"),
            // nft mode forwards out of the interface packets came in by: no ICMP redirects.
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.eth0.send_redirects", "0"),
        ] {
            sysctl(&lbns, k, v)?;
        }
        ip(&[
            "-n",
            &lbns,
            "route",
            "add",
            "default",
            "via",
            &CLIENT.to_string(),
        ])?;

        // XDP_TX'd frames reach a veth's peer only if the peer runs XDP (with only GRO
        // they are dropped as xdp_tx_errors): as the tests attach lb_pass, attach lb_decap
        // for an address nobody has, which passes every packet, to the bridge-side end.
        t.decaps.push(Proc::lb(
            lb,
            &br,
            &[
                "decap",
                "--iface",
                "lb0",
                "--addr",
                "10.255.255.254",
                "--xdp-mode",
                "native",
            ],
            &dir.join("pass-lb0.log"),
        )?);
        // The LB's receive work in a thread of its own, on a CPU of its own (GRO on: veth
        // uses NAPI in nft mode too, when no XDP program is attached); the work after it
        // (the bridge-side peer: bridge, backends) in another thread, so it is not charged
        // to the LB's.
        in_ns(&lbns, "ethtool", &["-K", "eth0", "gro", "on"])?;
        // veth hands an skb to the peer's NAPI only if the sender does no TSO (else it takes
        // the backlog of the sending CPU, and nft's work would not run in the LB's thread).
        in_ns(&br, "ethtool", &["-K", "lb0", "tso", "off"])?;
        let after = threaded_napi(&br, "lb0", false)?;
        fifo(after, 49)?;

        for j in 0..BACKENDS.len() {
            let ns = t.ns(&format!("be{j}"));
            let log = dir.join(format!("decap-be{j}.log"));
            t.decaps.push(Proc::lb(
                lb,
                &ns,
                &["decap", "--iface", "eth0", "--xdp-mode", "native"],
                &log,
            )?);
            t.serve_tcp(&ns)?;
        }
        Ok(t)
    }

    fn add_ns(&mut self, ns: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", ns])?;
        self.created.push(ns.to_owned());
        sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")?;
        sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")?;
        ip(&["-n", ns, "link", "set", "lo", "up"]).map(drop)
    }

    /// Namespace `ns` with `eth0` (address `addr`/24) joined to the bridge as `port`.
    fn add_node(&mut self, ns: &str, port: &str, addr: Ipv4Addr, mtu: &str) -> anyhow::Result<()> {
        self.add_ns(ns)?;
        let br = self.ns("br");
        ip(&[
            "-n", &br, "link", "add", port, "mtu", mtu, "type", "veth", "peer", "name", "eth0",
            "mtu", mtu, "netns", ns,
        ])?;
        ip(&["-n", &br, "link", "set", port, "master", "br0", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        // veth leaves L4 checksums partial; after XDP_TX nobody completes them.
        in_ns(ns, "ethtool", &["-K", "eth0", "tx", "off"]).map(drop)
    }

    /// A TCP server in `ns` on 0.0.0.0:TCP_PORT that accepts and resets every connection.
    fn serve_tcp(&mut self, ns: &str) -> anyhow::Result<()> {
        let (ns, stop, accepted) = (ns.to_owned(), self.stop.clone(), self.accepted.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        self.servers.push(std::thread::spawn(move || {
            let l = (|| {
                enter_ns(&ns)?;
                pin(0, GEN_CPU)?;
                let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, TCP_PORT))?;
                l.set_nonblocking(true)?;
                anyhow::Ok(l)
            })();
            let l = match l {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        linger_zero(s.as_raw_fd());
                    }
                    Err(_) => wait_readable(l.as_raw_fd(), 100),
                }
            }
        }));
        rx.recv().context("server thread")?
    }

    /// (Re)starts the LB eth0's NAPI thread and pins it to [`LB_CPU`]: attaching and
    /// detaching XDP may replace the NAPI instance (and its thread), so every mode switch
    /// asks for a fresh one.
    fn lb_thread(&self) -> anyhow::Result<u32> {
        let lbns = self.ns("lb");
        in_ns(
            &lbns,
            "sh",
            &["-c", "echo 0 > /sys/class/net/eth0/threaded"],
        )?;
        // Batches rather than a wake-up per packet: after a poll the NAPI instance stays
        // scheduled for up to NAPI_HOLD_NS (no new wake-up from the sender's side) and then
        // polls whatever the ring holds, as a NIC with interrupt coalescing would.
        in_ns(
            &lbns,
            "sh",
            &[
                "-c",
                &format!(
                    "echo 1000 > /sys/class/net/eth0/napi_defer_hard_irqs && \
                     echo {NAPI_HOLD_NS} > /sys/class/net/eth0/gro_flush_timeout"
                ),
            ],
        )?;
        let tid = threaded_napi(&lbns, "eth0", false)?;
        pin(tid as libc::pid_t, LB_CPU)?;
        fifo(tid, 50)?;
        Ok(tid)
    }

    /// Frames the bridge handed to the LB's eth0, and frames it could not (the LB's receive
    /// ring was full: the LB fell behind): `lb0`'s tx_packets and tx_dropped.
    fn lb_ring(&self) -> anyhow::Result<(u64, u64)> {
        let out = in_ns(
            &self.ns("br"),
            "cat",
            &[
                "/sys/class/net/lb0/statistics/tx_packets",
                "/sys/class/net/lb0/statistics/tx_dropped",
            ],
        )?;
        let v: Vec<u64> = out
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("parsing lb0's statistics")?;
        ensure!(v.len() == 2, "lb0's statistics: {out:?}");
        Ok((v[0], v[1]))
    }

    /// UDP packets counted by the backends' ingress counters, summed.
    fn backend_packets(&self) -> anyhow::Result<u64> {
        let mut sum = 0;
        for j in 0..BACKENDS.len() {
            let out = in_ns(
                &self.ns(&format!("be{j}")),
                "nft",
                &["list", "counter", "netdev", "l4bench", "rx"],
            )?;
            let n = out
                .split_whitespace()
                .skip_while(|w| *w != "packets")
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .context("parsing the backend counter")?;
            sum += n;
        }
        Ok(sum)
    }

    /// Backends route the client directly (DSR) or through the LB (nft: replies must be
    /// translated back).
    fn backend_return_via_lb(&self, via_lb: bool) -> anyhow::Result<()> {
        for j in 0..BACKENDS.len() {
            let ns = self.ns(&format!("be{j}"));
            let host = format!("{CLIENT}/32");
            if via_lb {
                ip(&["-n", &ns, "route", "replace", &host, "via", &LB.to_string()])?;
            } else {
                let _ = ip(&["-n", &ns, "route", "del", &host]);
            }
        }
        Ok(())
    }

    fn lb_args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "run",
            "--iface",
            "eth0",
            "--xdp-mode",
            "native",
            "--pin-path",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        a.push(format!("/sys/fs/bpf/{}lb", self.prefix));
        a.push("--admin-socket".to_owned());
        a.push(self.dir.join("admin.sock").display().to_string());
        for (name, port, proto) in [("u", UDP_PORT, "udp"), ("t", TCP_PORT, "tcp")] {
            a.push("--target-group".to_owned());
            a.push(format!(
                "{name},protocol={proto},health-check=off,deregistration-delay=0"
            ));
            a.push("--vip".to_owned());
            a.push(format!("{name}={VIP}:{port}/{proto}"));
            for b in BACKENDS {
                a.push("--target".to_owned());
                a.push(format!("{name}={b}"));
            }
        }
        a
    }

    /// The id of the XDP program on the LB's eth0.
    fn lb_prog_id(&self) -> anyhow::Result<u32> {
        let out = ip(&["-n", &self.ns("lb"), "link", "show", "eth0"])?;
        out.split("prog/xdp id ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no XDP program on the LB's eth0")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
        self.decaps.clear();
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("xtask: removing namespace {ns}: {e:#}");
            }
        }
    }
}

fn linger_zero(fd: RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid linger struct on an open socket.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

fn wait_readable(fd: RawFd, ms: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// Generator threads in the client namespace, stopped and joined on drop.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    threads: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Load {
    /// One thread: `sendmmsg` batches round-robin over [`UDP_FLOWS`] connected sockets.
    fn udp(ns: &str) -> anyhow::Result<Self> {
        let mut me = Self::new();
        let (ns, stop, done) = (ns.to_owned(), me.stop.clone(), me.done.clone());
        me.threads.push(std::thread::spawn(move || {
            enter_ns(&ns)?;
            pin(0, GEN_CPU)?;
            let socks = (0..UDP_FLOWS)
                .map(|_| {
                    let s = UdpSocket::bind((CLIENT, 0))?;
                    s.connect(SocketAddrV4::new(VIP, UDP_PORT))?;
                    Ok(s)
                })
                .collect::<std::io::Result<Vec<_>>>()?;
            let payload = [0x5au8; PAYLOAD];
            let mut iov = libc::iovec {
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: PAYLOAD,
            };
            // SAFETY: mmsghdr is plain data; zeroed is valid (no name, no control).
            let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
                .map(|_| {
                    let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    m.msg_hdr.msg_iov = &mut iov;
                    m.msg_hdr.msg_iovlen = 1;
                    m
                })
                .collect();
            while !stop.load(Ordering::Relaxed) {
                for s in &socks {
                    // SAFETY: msgs points at BATCH valid headers whose iovec outlives the call.
                    let n = unsafe {
                        libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0)
                    };
                    if n > 0 {
                        done.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
            Ok(())
        }));
        Ok(me)
    }

    /// [`TCP_CLIENTS`] threads: connect, wait for the server's reset, again.
    fn tcp(ns: &str) -> anyhow::Result<Self> {
        let mut me = Self::new();
        for _ in 0..TCP_CLIENTS {
            let (ns, stop, done) = (ns.to_owned(), me.stop.clone(), me.done.clone());
            me.threads.push(std::thread::spawn(move || {
                enter_ns(&ns)?;
                pin(0, GEN_CPU)?;
                let vip = SocketAddrV4::new(VIP, TCP_PORT).into();
                let mut buf = [0u8; 1];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect_timeout(&vip, Duration::from_secs(1)) else {
                        continue;
                    };
                    s.set_read_timeout(Some(Duration::from_secs(1)))?;
                    // The server resets at once: read ends with ECONNRESET (or 0).
                    let reset = match std::io::Read::read(&mut s, &mut buf) {
                        Ok(n) => n == 0,
                        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                    };
                    if reset {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    linger_zero(s.as_raw_fd());
                }
                Ok(())
            }));
        }
        Ok(me)
    }

    fn new() -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            done: Arc::new(AtomicU64::new(0)),
            threads: Vec::new(),
        }
    }

    fn finish(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join()
                .map_err(|_| anyhow::anyhow!("a generator thread panicked"))??;
        }
        Ok(())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Figure {
    Udp,
    Tcp,
}

/// One measured window.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// Delivered per second (UDP packets at the backends; TCP connections accepted).
    rate: f64,
    /// Generated per second (UDP packets sent; TCP connections completed at the client).
    offered: f64,
    /// The LB's NAPI thread: share of one CPU it was running.
    lb_busy: f64,
    /// Per second: frames that entered the LB's receive ring.
    lb_in: f64,
    /// Per second: frames dropped because the LB's receive ring was full.
    ring_drops: f64,
    /// The LB's NAPI thread: ns per unit (UDP: per frame it received; TCP: per connection
    /// delivered).
    lb_ns_per: f64,
    /// `lb_xdp`'s own ns per run (lb only; NaN for nft).
    xdp_ns_per_run: f64,
    /// `lb_xdp` runs per unit as `lb_ns_per` counts them (lb only).
    xdp_runs_per: f64,
}

/// (run_time_ns, run_cnt) of BPF program `id`.
fn bpf_stats(id: u32) -> anyhow::Result<(u64, u64)> {
    let out = run_cmd(Command::new("bpftool").args(["prog", "show", "id", &id.to_string()]))?;
    let field = |name: &str| -> u64 {
        out.split_whitespace()
            .skip_while(|w| *w != name)
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("run_time_ns"), field("run_cnt")))
}

fn measure(
    t: &Topology,
    lb_thread: u32,
    mode: Mode,
    fig: Figure,
    prog: Option<u32>,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<Sample> {
    let cl = t.ns("cl");
    let load = match fig {
        Figure::Udp => Load::udp(&cl)?,
        Figure::Tcp => Load::tcp(&cl)?,
    };
    sleep(warmup)?;
    let delivered = || -> anyhow::Result<u64> {
        match fig {
            Figure::Udp => t.backend_packets(),
            Figure::Tcp => Ok(t.accepted.load(Ordering::Relaxed)),
        }
    };
    let stats = || prog.map(bpf_stats).transpose();
    let (d0, o0, c0, r0, b0, w0) = (
        delivered()?,
        load.done.load(Ordering::Relaxed),
        runtime_ns(lb_thread)?,
        t.lb_ring()?,
        stats()?,
        Instant::now(),
    );
    sleep(window)?;
    let (d1, o1, c1, r1, b1, w1) = (
        delivered()?,
        load.done.load(Ordering::Relaxed),
        runtime_ns(lb_thread)?,
        t.lb_ring()?,
        stats()?,
        Instant::now(),
    );
    load.finish()?;
    let secs = (w1 - w0).as_secs_f64();
    let n = (d1 - d0) as f64;
    ensure!(
        n > 0.0,
        "{} {fig:?}: nothing reached the backends",
        mode.name()
    );
    let cpu = (c1 - c0) as f64;
    let lb_in = (r1.0 - r0.0) as f64;
    // UDP: per frame the LB received (what is lost after it is not its cost); TCP: per
    // connection (nft also sees the replies: that is its cost).
    let per = match fig {
        Figure::Udp => lb_in.max(1.0),
        Figure::Tcp => n,
    };
    let (xdp_ns_per_run, xdp_runs_per) = match (b0, b1) {
        (Some((t0, r0)), Some((t1, r1))) if r1 > r0 => {
            ((t1 - t0) as f64 / (r1 - r0) as f64, (r1 - r0) as f64 / per)
        }
        _ => (f64::NAN, f64::NAN),
    };
    Ok(Sample {
        rate: n / secs,
        offered: (o1 - o0) as f64 / secs,
        lb_busy: cpu / (secs * 1e9),
        lb_in: lb_in / secs,
        lb_ns_per: cpu / per,
        ring_drops: (r1.1 - r0.1) as f64 / secs,
        xdp_ns_per_run,
        xdp_runs_per,
    })
}

fn spread(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

fn k(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1000.0 {
        format!("{:.1}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `cargo xtask bench l4`.
pub fn run(lb: &Path, quick: bool) -> anyhow::Result<()> {
    for (cmd, pkg) in [("nft", "nftables"), ("bpftool", "bpftool")] {
        if !have(cmd) {
            eprintln!("xtask: installing {pkg} (apt-get)");
            run_cmd(Command::new("sh").args([
                "-c",
                &format!(
                    "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends {pkg}"
                ),
            ]))?;
        }
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    ensure!(
        cpus > LB_CPU,
        "needs at least 2 CPUs (generators on cpu {GEN_CPU}, the LB on cpu {LB_CPU})"
    );
    // Put back when this returns: `bench all` runs the other suites in this process and its
    // children after this one, and they must get both CPUs and the default signal handling.
    let _restore = Restore::take()?;
    // SAFETY: installing an async-signal-safe handler (it only stores an atomic).
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let (rounds, warmup, window) = if quick {
        (2, Duration::from_millis(500), Duration::from_secs(3))
    } else {
        (5, Duration::from_secs(1), Duration::from_secs(8))
    };
    let dir = std::env::temp_dir().join(format!("lb-bench-l4-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());
    pin(0, GEN_CPU)?;

    println!("lb L4 benchmark: lb_xdp (DSR, lb decap on the backends) beside nftables DNAT");
    println!(
        "command:  cargo xtask bench l4{}",
        if quick { " --quick" } else { "" }
    );
    println!(
        "machine:  {cpus} cpus, {}; load average at start {}",
        uname(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "runs:     {rounds} round(s), modes alternating lb nft; per mode and figure {:.1} s warm-up + {} s measured",
        warmup.as_secs_f64(),
        window.as_secs()
    );
    println!(
        "topology: client → bridge → LB (veth, native XDP) → bridge → 3 backends; LB rx in a threaded NAPI kthread on cpu {LB_CPU}, generators on cpu {GEN_CPU}"
    );
    println!(
        "udp:      1 sender, {UDP_FLOWS} flows, sendmmsg x{BATCH}, {PAYLOAD}-byte payload (60-byte frames), counted at the backends' ingress"
    );
    println!(
        "tcp:      {TCP_CLIENTS} clients: connect, server accepts and resets (SO_LINGER 0); counted as accepts at the backends"
    );
    println!();

    let topo = Topology::build(lb, &dir)?;
    let mut results: Vec<(Mode, Figure, Sample)> = Vec::new();
    for round in 1..=rounds {
        for mode in [Mode::Lb, Mode::Nft] {
            check_interrupted()?;
            let (_lb, prog, _stats) = match mode {
                Mode::Lb => {
                    topo.backend_return_via_lb(false)?;
                    let args = topo.lb_args();
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let p = Proc::lb(lb, &topo.ns("lb"), &args, &dir.join("lb-run.log"))?;
                    let id = topo.lb_prog_id()?;
                    let stats = SysctlGuard::set("/proc/sys/kernel/bpf_stats_enabled", "1")?;
                    (Some(p), Some(id), Some(stats))
                }
                Mode::Nft => {
                    topo.backend_return_via_lb(true)?;
                    nft_load(&topo.ns("lb"), NFT_RULESET)?;
                    (None, None, None)
                }
            };
            let lb_thread = topo.lb_thread()?;
            for fig in [Figure::Udp, Figure::Tcp] {
                let s = measure(&topo, lb_thread, mode, fig, prog, warmup, window)
                    .with_context(|| format!("round {round} {} {fig:?}", mode.name()))?;
                eprintln!(
                    "  round {round} {:<3} {:?}: {:>9}/s delivered, {:>9}/s offered, {:>9}/s into the LB, {:>7}/s LB ring drops, LB thread {:>3.0}% busy, {:>6.0} ns/unit, lb_xdp {:.0} ns/run x {:.2} runs/unit",
                    mode.name(),
                    fig,
                    k(s.rate),
                    k(s.offered),
                    k(s.lb_in),
                    k(s.ring_drops),
                    s.lb_busy * 100.0,
                    s.lb_ns_per,
                    s.xdp_ns_per_run,
                    s.xdp_runs_per
                );
                results.push((mode, fig, s));
            }
            if mode == Mode::Nft {
                ip(&[
                    "netns",
                    "exec",
                    &topo.ns("lb"),
                    "nft",
                    "delete",
                    "table",
                    "ip",
                    "l4bench",
                ])?;
            }
        }
    }
    drop(topo);
    println!("{}", table(&results));
    Ok(())
}

fn table(results: &[(Mode, Figure, Sample)]) -> String {
    let mut out = String::new();
    for (fig, unit, per, label) in [
        (
            Figure::Udp,
            "pkt",
            "pkt in",
            "UDP, 60-byte frames: packets/s delivered to the backends",
        ),
        (
            Figure::Tcp,
            "conn",
            "conn",
            "TCP: new connections/s accepted by the backends",
        ),
    ] {
        let get = |m: Mode| -> Vec<Sample> {
            results
                .iter()
                .filter(|(mm, ff, _)| *mm == m && *ff == fig)
                .map(|(_, _, s)| *s)
                .collect()
        };
        let (lb, nft) = (get(Mode::Lb), get(Mode::Nft));
        let _ = writeln!(out, "{label}");
        let _ = writeln!(
            out,
            "  {:<5} {:>22} {:>10} {:>10} {:>13} {:>14} {:>22} {:>16}",
            "mode",
            format!("{unit}/s median (range)"),
            "offered/s",
            "LB in/s",
            "ring drops/s",
            "LB thread busy",
            format!("LB ns/{per} (range)"),
            format!("lb_xdp ns/{per}")
        );
        for (m, v) in [(Mode::Lb, &lb), (Mode::Nft, &nft)] {
            let col = |f: fn(&Sample) -> f64| v.iter().map(f).collect::<Vec<f64>>();
            let (rate, ns) = (col(|s| s.rate), col(|s| s.lb_ns_per));
            let ((rlo, rhi), (nlo, nhi)) = (spread(&rate), spread(&ns));
            let xdp = median(col(|s| s.xdp_ns_per_run * s.xdp_runs_per));
            let _ = writeln!(
                out,
                "  {:<5} {:>22} {:>10} {:>10} {:>13} {:>13.0}% {:>22} {:>16}",
                m.name(),
                format!("{} ({}–{})", k(median(rate)), k(rlo), k(rhi)),
                k(median(col(|s| s.offered))),
                k(median(col(|s| s.lb_in))),
                k(median(col(|s| s.ring_drops))),
                median(col(|s| s.lb_busy)) * 100.0,
                format!("{:.0} ({:.0}–{:.0})", median(ns), nlo, nhi),
                if xdp.is_nan() {
                    "-".to_owned()
                } else {
                    format!("{xdp:.0}")
                }
            );
        }
        let per_round = |f: fn(&Sample, &Sample) -> f64| -> String {
            let r: Vec<f64> = lb.iter().zip(&nft).map(|(a, b)| f(a, b)).collect();
            let (lo, hi) = spread(&r);
            format!("{:.2}x ({:.2}–{:.2})", median(r), lo, hi)
        };
        let _ = writeln!(
            out,
            "  ratio lb/nft, per round: rate {}; LB CPU per {per} nft/lb {}",
            per_round(|a, b| a.rate / b.rate),
            per_round(|a, b| b.lb_ns_per / a.lb_ns_per)
        );
        let _ = writeln!(out);
    }
    out
}

/// Removes the bench's scratch directory, also when a step fails.
struct RemoveDir(PathBuf);

/// The calling thread's CPU affinity and the SIGINT/SIGTERM handlers as they were before
/// [`run`] pinned the thread to the generators' CPU and installed its own handlers; restored on
/// drop. (Without it, every suite `bench all` ran after this one inherited a one-CPU mask.)
struct Restore {
    cpus: libc::cpu_set_t,
    int: libc::sighandler_t,
    term: libc::sighandler_t,
}

impl Restore {
    fn take() -> anyhow::Result<Self> {
        // SAFETY: a zeroed cpu_set_t is a valid empty set for sched_getaffinity to fill;
        // signal(2) with SIG_DFL only reads back (and then reinstates) the current handler.
        unsafe {
            let mut cpus: libc::cpu_set_t = std::mem::zeroed();
            let rc = libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut cpus);
            ensure!(
                rc == 0,
                "reading this thread's CPU affinity: {}",
                std::io::Error::last_os_error()
            );
            let int = libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGINT, int);
            let term = libc::signal(libc::SIGTERM, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, term);
            Ok(Self { cpus, int, term })
        }
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        // SAFETY: reinstating a mask and handlers this process had before.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.cpus);
            libc::signal(libc::SIGINT, self.int);
            libc::signal(libc::SIGTERM, self.term);
        }
    }
}

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn uname() -> String {
    Command::new("uname")
        .arg("-sr")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask() -> Vec<usize> {
        // SAFETY: as in `Restore::take`.
        let set = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
                0
            );
            set
        };
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `cpu` is below CPU_SETSIZE.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .collect()
    }

    fn sigterm_handler() -> libc::sighandler_t {
        // SAFETY: reads the handler back by swapping SIG_DFL in and out.
        unsafe {
            let h = libc::signal(libc::SIGTERM, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, h);
            h
        }
    }

    /// `bench all` runs the L7 and control suites after this one in the same process: they
    /// must not inherit the generators' one-CPU mask or the interrupt flag's handlers.
    #[test]
    fn restore_gives_back_the_cpu_mask_and_signal_handlers_after_pinning() {
        // A thread of its own: the mask is per thread, and other tests run beside this one.
        std::thread::spawn(|| {
            let before = mask();
            let handler = sigterm_handler();
            assert!(
                before.len() >= 2,
                "the bench needs two CPUs, this thread may use {before:?}"
            );
            {
                let _restore = Restore::take().expect("saving");
                pin(0, GEN_CPU).expect("pinning");
                // SAFETY: as in `run`.
                unsafe {
                    libc::signal(
                        libc::SIGTERM,
                        on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
                    );
                }
                // Positive control: the pinning and the handler took effect.
                assert_eq!(mask(), vec![GEN_CPU]);
                assert_ne!(sigterm_handler(), handler);
            }
            assert_eq!(mask(), before);
            assert_eq!(sigterm_handler(), handler);
        })
        .join()
        .expect("the test thread");
    }
}
