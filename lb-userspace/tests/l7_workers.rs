//! The per-worker L7 layout (`--l7-runtime per-worker`): connections spread over the workers
//! (`--l7-accept balanced`: evenly, by handing them over), each worker reuses only the target connections it made, a drain waits for the open
//! connections of every worker, shutdown leaves no worker thread, `--l7-cpu-affinity` binds each
//! worker's thread to its CPU, and bad flag values are refused naming the flag.
mod support;

use std::num::NonZeroUsize;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser as _;
use http_body_util::{BodyExt, Full};
use lb::proxy::server::affinity::{CpuAffinity, CpuSet};
use lb::proxy::server::{AcceptMode, L7Handle, L7Runtime, WorkerLayout};
use support::target::{self, Reply};
use support::{ProxyBuilder, SAFETY, get, get_many, get_many_h2, wait_until, within};
use tokio::net::TcpStream;

fn per_worker(workers: usize, accept: AcceptMode) -> WorkerLayout {
    WorkerLayout {
        runtime: L7Runtime::PerWorker,
        workers: NonZeroUsize::new(workers),
        accept,
        affinity: CpuAffinity::Unbound,
    }
}

/// Client connections accepted so far by each worker.
fn accepted(handle: &L7Handle) -> Vec<u64> {
    handle.worker_counts().iter().map(|w| w.accepted).collect()
}

/// Client connections each worker is serving now.
fn open(handle: &L7Handle) -> Vec<u64> {
    handle.worker_counts().iter().map(|w| w.open).collect()
}

/// Threads of this process named as the workers of the tier whose first listener has `port`.
fn worker_threads(port: u16) -> usize {
    worker_cpus(port).len()
}

/// The name of each thread of this process named as a worker of the tier whose first listener
/// has `port`, with the CPUs it may run on (`Cpus_allowed_list` in its status), by name.
fn worker_cpus(port: u16) -> Vec<(String, String)> {
    let suffix = format!(":{port}");
    let mut found: Vec<(String, String)> = std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|e| {
            let dir = e.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
            Some((comm.trim().to_owned(), cpus.trim().to_owned()))
        })
        .filter(|(comm, _)| comm.starts_with("l7w") && comm.ends_with(&suffix))
        .collect();
    found.sort();
    found
}

#[tokio::test]
async fn connections_spread_over_both_workers_with_reuseport() {
    let proxy = ProxyBuilder::new()
        .rules(&["web,default,fixed-response=200"])
        .workers(per_worker(2, AcceptMode::ReusePort))
        .start()
        .await;
    let handle = proxy.running.as_ref().expect("running").handle();
    for _ in 0..64 {
        assert_eq!(get(proxy.addr, "/").await.status, 200);
    }
    let per_worker = accepted(&handle);
    assert_eq!(per_worker.len(), 2, "{per_worker:?}");
    assert_eq!(
        per_worker.iter().sum::<u64>(),
        64,
        "every connection counted once: {per_worker:?}"
    );
    // The kernel's hash spreads 64 source ports over both sockets (all on one: 2 in 2^64).
    assert!(
        per_worker.iter().all(|n| *n > 0),
        "both workers accepted: {per_worker:?}"
    );
}

#[tokio::test]
async fn a_shared_socket_serves_every_connection_on_some_worker() {
    let proxy = ProxyBuilder::new()
        .rules(&["web,default,fixed-response=200"])
        .workers(per_worker(2, AcceptMode::SharedSocket))
        .start()
        .await;
    let handle = proxy.running.as_ref().expect("running").handle();
    for _ in 0..32 {
        assert_eq!(get(proxy.addr, "/").await.status, 200);
    }
    let per_worker = accepted(&handle);
    assert_eq!(per_worker.len(), 2, "{per_worker:?}");
    assert_eq!(per_worker.iter().sum::<u64>(), 32, "{per_worker:?}");
}

#[tokio::test]
async fn the_shared_runtime_counts_one_worker() {
    let proxy = ProxyBuilder::new()
        .rules(&["web,default,fixed-response=200"])
        .workers(WorkerLayout {
            runtime: L7Runtime::Shared,
            ..WorkerLayout::default()
        })
        .start()
        .await;
    assert_eq!(get(proxy.addr, "/").await.status, 200);
    let handle = proxy.running.as_ref().expect("running").handle();
    assert_eq!(accepted(&handle), vec![1]);
    assert_eq!(worker_threads(proxy.addr.port()), 0, "no worker threads");
}

#[tokio::test]
async fn a_pooled_target_connection_is_reused_only_by_the_worker_that_made_it() {
    let target = target::http1().route("/", Reply::text("ok")).run().await;
    reused_only_by_the_worker_that_made_it(target.addr, "tg", false).await;
}

/// The same for a TLS target's connections (`protocol=https`: the hyper HTTP/1.1 client and
/// its pool's `checkout_h1`, which counts a foreign checkout on its own line; its positive
/// control, a checkout forced across workers, is the pool's unit test
/// `checkout_h1_counts_a_checkout_by_another_worker_only`: the layout cannot force one).
#[tokio::test]
async fn a_tls_targets_pooled_connection_is_reused_only_by_the_worker_that_made_it() {
    let target = target::https1().route("/", Reply::text("ok")).run().await;
    reused_only_by_the_worker_that_made_it(target.addr, "tg,protocol=https", false).await;
    assert!(
        target.hits() >= 16 * 25,
        "every request reached the TLS target"
    );
}

/// The same for the target's HTTP/2 connection (hyper's client; one per worker's shard), with
/// HTTP/2 clients (ALB answers an HTTP/1 client of an HTTP/2 group 464).
#[tokio::test]
async fn a_targets_http2_connection_is_used_only_by_the_worker_that_made_it() {
    let target = target::http2().route("/", Reply::text("ok")).run().await;
    reused_only_by_the_worker_that_made_it(target.addr, "tg,protocol-version=http2", true).await;
}

async fn reused_only_by_the_worker_that_made_it(
    target: std::net::SocketAddr,
    group: &str,
    http2: bool,
) {
    let proxy = ProxyBuilder::new()
        .group_spec(group, &[target])
        .rules(&["web,default,forward=tg"])
        .workers(per_worker(2, AcceptMode::ReusePort))
        .start()
        .await;
    let handle = proxy.running.as_ref().expect("running").handle();
    // 16 client connections at once, 25 requests each: both workers serve some, and each pools
    // target connections and takes them again.
    let clients: Vec<_> = (0..16)
        .map(|_| {
            if http2 {
                tokio::spawn(get_many_h2(proxy.addr, "/", 25))
            } else {
                tokio::spawn(get_many(proxy.addr, "/", 25))
            }
        })
        .collect();
    for client in clients {
        let bodies = client.await.expect("client task");
        assert!(bodies.iter().all(|b| b == "ok"), "{bodies:?}");
    }
    let shards = handle.pool_stats_per_worker();
    let foreign: u64 = shards.iter().map(|(_, s)| s.foreign_worker_reuse).sum();
    assert_eq!(
        foreign, 0,
        "a worker took another worker's connection: {shards:?}"
    );
    // Positive control: both workers reused pooled connections (so both had the chance to take
    // a foreign one), and the merged stats add the shards up.
    for worker in 0..2 {
        let reused: u64 = shards
            .iter()
            .filter(|(w, _)| *w == worker)
            .map(|(_, s)| s.reused)
            .sum();
        assert!(reused > 0, "worker {worker} reused nothing: {shards:?}");
    }
    let merged: u64 = handle.pool_stats().iter().map(|s| s.reused + s.fresh).sum();
    assert_eq!(merged, 16 * 25, "every request counted once");
}

/// Balanced accept: every connection is served by the worker with the fewest open ones, so
/// after each new connection the two workers' counts differ by at most one, whatever the
/// kernel's hash picked; and a worker's count falls again as its connections close.
#[tokio::test]
async fn balanced_accept_serves_each_connection_on_the_least_loaded_worker() {
    let proxy = ProxyBuilder::new()
        .rules(&["web,default,fixed-response=200"])
        .workers(per_worker(2, AcceptMode::Balanced))
        .start()
        .await;
    let handle = proxy.running.as_ref().expect("running").handle();
    let mut held = Vec::new();
    let mut handed_over = false;
    for n in 1..=32u64 {
        held.push(
            within(TcpStream::connect(proxy.addr))
                .await
                .expect("connect"),
        );
        wait_until("the connection to be counted", || {
            open(&handle).iter().sum::<u64>() == n
        })
        .await;
        let now = open(&handle);
        assert!(
            now[0].abs_diff(now[1]) <= 1,
            "after {n} connections: {now:?} (accepted {:?})",
            accepted(&handle)
        );
        handed_over |= accepted(&handle) != now;
    }
    assert_eq!(open(&handle), vec![16, 16]);
    // Positive control: some connection was served by a worker other than the one that
    // accepted it (the hash alone keeps the two within one at all 32 steps 1 time in 65,536).
    assert!(
        handed_over,
        "no connection was handed over: accepted {:?}",
        accepted(&handle)
    );
    drop(held);
    wait_until("every connection to be uncounted", || {
        open(&handle) == vec![0, 0]
    })
    .await;
}

#[tokio::test]
async fn drain_waits_for_open_connections_on_every_worker_and_joins_the_threads() {
    drain_waits_and_joins(AcceptMode::ReusePort).await;
}

/// The same with connections handed between workers: a handed connection's response in flight
/// also holds the drain, and its worker's thread.
#[tokio::test]
async fn drain_waits_for_handed_over_connections_too() {
    drain_waits_and_joins(AcceptMode::Balanced).await;
}

async fn drain_waits_and_joins(accept: AcceptMode) {
    let (reply, gate) = Reply::gated("first,", "second");
    let target = target::http1().route("/", reply).run().await;
    let mut proxy = ProxyBuilder::forward_to(&[target.addr])
        .workers(per_worker(2, accept))
        .start()
        .await;
    let port = proxy.addr.port();
    let running = proxy.running.take().expect("running");
    let handle = running.handle();
    // A thread names itself as it starts.
    wait_until("two named worker threads", || worker_threads(port) == 2).await;
    // Open connections with a response in flight until both workers hold some.
    let mut bodies = Vec::new();
    while open(&handle).contains(&0) {
        assert!(bodies.len() < 64, "64 connections all on one worker");
        let mut sender = within(support::h1_client(proxy.addr)).await;
        let req = http::Request::get("/")
            .header("host", "app.test")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = within(sender.send_request(req))
            .await
            .expect("response head");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = within(body.frame())
            .await
            .expect("first chunk")
            .expect("chunk");
        assert_eq!(first.into_data().expect("data"), "first,");
        bodies.push(body);
    }
    let shutdown = tokio::spawn(running.shutdown(SAFETY));
    // The workers stop accepting: new connections are refused once every socket is closed.
    wait_until("the listening sockets to close", || {
        std::net::TcpStream::connect(proxy.addr).is_err()
    })
    .await;
    assert!(
        !shutdown.is_finished(),
        "the drain must wait for the responses in flight"
    );
    assert_eq!(
        worker_threads(port),
        2,
        "both workers still serve their connections"
    );
    // Release the responses (the gate stays open for waiters that register late).
    gate.release();
    for body in bodies {
        let rest = within(body.collect())
            .await
            .expect("rest of the body")
            .to_bytes();
        assert_eq!(rest, "second", "the response finished during the drain");
    }
    within(shutdown)
        .await
        .expect("shutdown task")
        .expect("shutdown");
    assert_eq!(
        worker_threads(port),
        0,
        "shutdown joined every worker thread"
    );
}

#[tokio::test]
async fn shutdown_leaves_no_worker_thread() {
    let mut proxy = ProxyBuilder::new()
        .rules(&["web,default,fixed-response=200"])
        .workers(per_worker(3, AcceptMode::ReusePort))
        .start()
        .await;
    let port = proxy.addr.port();
    assert_eq!(get(proxy.addr, "/").await.status, 200);
    // Positive control: the workers are seen (a thread names itself as it starts).
    wait_until("three named worker threads", || worker_threads(port) == 3).await;
    let running = proxy.running.take().expect("running");
    within(running.shutdown(Duration::from_secs(5)))
        .await
        .expect("shutdown");
    assert_eq!(worker_threads(port), 0, "no worker thread left");
}

#[test]
fn bad_worker_flags_are_refused_naming_the_flag() {
    let parse = |args: &[&str]| {
        let mut argv = vec!["lb".to_owned(), "run".to_owned()];
        argv.extend(args.chunks(2).map(|kv| kv.join("=")));
        lb::cli::Cli::try_parse_from(argv).map(|_| ())
    };
    for bad in ["0", "-1", "two", "1025", ""] {
        let err = parse(&["--l7-workers", bad]).expect_err(bad).to_string();
        assert!(err.contains("--l7-workers"), "{bad:?}: {err}");
    }
    let err = parse(&["--l7-runtime", "threads"])
        .expect_err("bad runtime")
        .to_string();
    assert!(err.contains("--l7-runtime"), "{err}");
    let err = parse(&["--l7-accept", "steal"])
        .expect_err("bad accept")
        .to_string();
    assert!(err.contains("--l7-accept"), "{err}");
    // Positive control: good values parse, and the layout follows them.
    for good in [
        &["--l7-workers", "auto"][..],
        &["--l7-workers", "1"],
        &["--l7-workers", "1024"],
        &["--l7-runtime", "shared"],
        &["--l7-accept", "shared-socket"],
        &["--l7-accept", "balanced"],
        &["--l7-cpu-affinity", "none"],
        &["--l7-cpu-affinity", "auto"],
        &["--l7-cpu-affinity", "0-3,8"],
    ] {
        parse(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
    }
    for bad in ["x", "3-1", "1024", ""] {
        let err = parse(&["--l7-cpu-affinity", bad])
            .expect_err(bad)
            .to_string();
        assert!(err.contains("--l7-cpu-affinity"), "{bad:?}: {err}");
    }
    let layout = |argv: &[&str]| {
        let cli = lb::cli::Cli::try_parse_from(argv).expect("parses");
        let lb::cli::Command::Run(args) = cli.command else {
            panic!("not run")
        };
        args.l7_layout()
    };
    assert_eq!(
        layout(&[
            "lb",
            "run",
            "--l7-runtime",
            "per-worker",
            "--l7-workers",
            "3"
        ]),
        per_worker(3, AcceptMode::ReusePort)
    );
    // In-process tests get `lb run`'s default layout.
    assert_eq!(layout(&["lb", "run"]), WorkerLayout::default());
}

/// `--l7-cpu-affinity auto`: worker i runs only on the i-th CPU this process may use.
/// Control: the same layout unbound leaves every worker the whole set.
#[tokio::test]
async fn auto_affinity_binds_each_worker_to_its_own_cpu() {
    let allowed = CpuSet::of_this_thread().expect("sched_getaffinity");
    let cpus: Vec<usize> = allowed.iter().collect();
    let start = |affinity| {
        ProxyBuilder::new()
            .rules(&["web,default,fixed-response=200"])
            .workers(WorkerLayout {
                affinity,
                ..per_worker(3, AcceptMode::ReusePort)
            })
            .start()
    };
    let bound = start(CpuAffinity::Auto).await;
    assert_eq!(get(bound.addr, "/").await.status, 200);
    let port = bound.addr.port();
    let want: Vec<(String, String)> = (0..3)
        .map(|w| (format!("l7w{w}:{port}"), cpus[w % cpus.len()].to_string()))
        .collect();
    // Each worker binds itself first thing: wait until all three have.
    wait_until("every worker bound", || worker_cpus(port) == want).await;

    let unbound = start(CpuAffinity::Unbound).await;
    let port = unbound.addr.port();
    let everywhere = allowed.to_string();
    // A thread takes its name when it starts.
    wait_until("three named workers", || worker_cpus(port).len() == 3).await;
    let got = worker_cpus(port);
    assert!(got.iter().all(|(_, c)| *c == everywhere), "{got:?}");
}

/// A listed CPU this process may not run on fails the start; the shared runtime refuses any
/// affinity. Control: a list of allowed CPUs starts, and binds the workers round it.
#[tokio::test]
async fn an_affinity_the_tier_cannot_honour_fails_the_start() {
    let allowed = CpuSet::of_this_thread().expect("sched_getaffinity");
    let first = allowed.iter().next().expect("a CPU");
    let outside = (0..lb::proxy::server::affinity::MAX_CPUS)
        .find(|c| !allowed.contains(*c))
        .expect("a CPU outside the set");
    let with = |affinity, runtime| {
        ProxyBuilder::new()
            .rules(&["web,default,fixed-response=200"])
            .workers(WorkerLayout {
                runtime,
                affinity,
                ..per_worker(2, AcceptMode::ReusePort)
            })
            .try_start()
    };
    let set = |cpus: &[usize]| {
        let mut s = CpuSet::empty();
        cpus.iter().for_each(|c| assert!(s.insert(*c)));
        s
    };
    let err = with(
        CpuAffinity::Cpus(set(&[first, outside])),
        L7Runtime::PerWorker,
    )
    .await
    .err()
    .expect("a CPU outside the set");
    assert!(
        err.to_string()
            .contains(&format!("CPUs {outside} are not among")),
        "{err:#}"
    );
    let err = with(CpuAffinity::Auto, L7Runtime::Shared)
        .await
        .err()
        .expect("shared runtime");
    assert!(err.to_string().contains("per-worker"), "{err:#}");
    let ok = with(CpuAffinity::Cpus(set(&[first])), L7Runtime::PerWorker)
        .await
        .expect("an allowed CPU");
    let port = ok.addr.port();
    let want: Vec<(String, String)> = (0..2)
        .map(|w| (format!("l7w{w}:{port}"), first.to_string()))
        .collect();
    wait_until("every worker bound", || worker_cpus(port) == want).await;
}
