//! Restarts of `lb run` that keep every flow: a TCP connection streaming through the VIP goes
//! on, on its backend, while `lb run` is killed with SIGKILL and started again, and while it
//! is restarted with one more target; a clean stop with `--keep-dataplane` leaves the data
//! plane to the next run; a clean stop without it takes everything down (the positive
//! control that the stream can break); pinned maps of another layout are refused and left
//! alone. Needs root and the `lb` binary.
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use lb_tests::client::{self, LineClient};
use lb_tests::wait::wait_until;
use lb_tests::{Topology, VipSpec, bpf, netns, tally};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const PORT: u16 = 80;
const WAIT: Duration = Duration::from_secs(20);

fn vip() -> SocketAddr {
    SocketAddr::from((VIP, PORT))
}

/// What a [`Streamer`] has seen.
#[derive(Debug, Default)]
struct Seen {
    /// When each answer came, and from whom.
    answers: Vec<(Instant, String)>,
    /// The first failure (then the stream stopped).
    error: Option<String>,
}

/// One TCP connection through the VIP, asking who answers every 10 ms from a thread in the
/// client namespace, until told to stop or until an exchange fails.
struct Streamer {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Streamer {
    fn start(topo: &Topology, src_port: u16) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let thread = netns::spawn_in_netns(&topo.client().ns, "streamer", move || {
            let mut c = match LineClient::connect(src_port, vip()) {
                Ok(c) => c,
                Err(e) => {
                    lock(&s).error = Some(format!("connecting: {e:#}"));
                    return Ok(());
                }
            };
            while !st.load(Ordering::Relaxed) {
                match c.ask() {
                    Ok(who) => lock(&s).answers.push((Instant::now(), who)),
                    Err(e) => {
                        lock(&s).error = Some(format!("{e:#}"));
                        return Ok(());
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        })
        .expect("starting the streamer");
        Self {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> MutexGuard<'_, Seen> {
        lock(&self.seen)
    }

    /// Waits until `more` answers arrived after the current count; fails on a stream error.
    fn wait_for_more(&self, more: usize, what: &str) {
        let from = self.seen().answers.len();
        wait_until(WAIT, what, || {
            let s = self.seen();
            if let Some(e) = &s.error {
                anyhow::bail!("the stream broke: {e}");
            }
            Ok(if s.answers.len() >= from + more {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(format!("{} answers", s.answers.len() - from))
            })
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// The longest time between two answers, and who answered (all of them).
    fn summary(&self) -> (Duration, Vec<String>) {
        let s = self.seen();
        let gap = s
            .answers
            .windows(2)
            .map(|w| w[1].0 - w[0].0)
            .max()
            .unwrap_or_default();
        let who = s.answers.iter().map(|(_, w)| w.clone()).collect();
        (gap, who)
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn pinned(topo: &Topology, name: &str) -> bool {
    topo.lb(0).pin_path.join(name).exists()
}

#[test]
fn a_streaming_connection_survives_sigkill_and_restarts_with_a_target_added() {
    let web = VipSpec::tcp("web", VIP, PORT).target(0).target(1);
    let mut topo = Topology::builder()
        .backends(3)
        .vip(web.clone())
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    let stream = Streamer::start(&topo, 30_000);
    stream.wait_for_more(20, "answers before anything happens");
    let serving = stream.seen().answers[0].1.clone();

    // A crash: nothing is cleaned up, and the data plane goes on without any lb run.
    topo.kill_lb(0).expect("SIGKILL");
    assert!(pinned(&topo, "LB_FLOWS") && pinned(&topo, "xdp_link@eth0"));
    stream.wait_for_more(20, "answers while no lb run runs");

    // The same flags again: the new run adopts the maps and swaps its program in.
    topo.restart_lb(0, std::slice::from_ref(&web), &[])
        .expect("restarting lb run");
    assert!(
        topo.lb(0).log_text().contains("adopted the data plane"),
        "{}",
        topo.lb(0).log_text()
    );
    stream.wait_for_more(20, "answers after the restart");

    // Killed again, and started with one more target.
    topo.kill_lb(0).expect("SIGKILL");
    stream.wait_for_more(10, "answers while no lb run runs");
    let with_more = web.clone().target(2);
    topo.restart_lb(0, std::slice::from_ref(&with_more), &[])
        .expect("restarting lb run with a target added");
    stream.wait_for_more(20, "answers after the restart with a target added");

    // New connections reach the added target: the restart did change the ring.
    let added = topo.backend(2).name.clone();
    let answers = topo
        .in_client(|| {
            (0..60u16)
                .map(|i| client::ask_tcp(31_000 + i, vip()).expect("new connection"))
                .collect::<Vec<_>>()
        })
        .expect("client namespace");
    let counts = tally(answers);
    assert!(
        counts.contains_key(&added),
        "{added} takes new flows: {counts:?}"
    );

    stream.wait_for_more(10, "answers at the end");
    let (gap, who) = stream.summary();
    assert!(
        who.iter().all(|w| *w == serving),
        "the connection stayed on {serving}: {:?}",
        tally(who.clone())
    );
    println!("{} answers, longest gap {gap:?}", who.len());
    assert!(
        gap < Duration::from_secs(1),
        "no gap beyond the restart itself: the longest was {gap:?}"
    );
    // The counters went on across the restarts (the maps were adopted, not recreated).
    let doc = topo.stats_json(0).expect("lb stats");
    assert!(
        doc["vips"][0]["packets"].as_u64() >= Some(who.len() as u64),
        "VIP packets counted across restarts: {doc:#}"
    );
    topo.processes_alive().expect("lb running");

    // Positive control: a clean stop without --keep-dataplane takes the data plane down,
    // and the stream breaks.
    topo.stop_lb(0).expect("SIGTERM");
    assert!(!pinned(&topo, "LB_FLOWS"), "pins removed");
    wait_until(WAIT, "the stream to break without a data plane", || {
        Ok(match &stream.seen().error {
            Some(_) => ControlFlow::Break(()),
            None => ControlFlow::Continue("still answered".into()),
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn a_clean_stop_with_keep_dataplane_leaves_the_flows_to_the_next_run() {
    let web = VipSpec::tcp("web", VIP, PORT);
    let mut topo = Topology::builder()
        .backends(2)
        .vip(web.clone())
        .lb_args(["--keep-dataplane"])
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    let stream = Streamer::start(&topo, 30_100);
    stream.wait_for_more(20, "answers");
    let status = topo.stop_lb(0).expect("SIGTERM");
    assert!(status.success(), "lb run exits 0: {status:?}");
    assert!(pinned(&topo, "LB_FLOWS") && pinned(&topo, "xdp_link@eth0"));
    stream.wait_for_more(20, "answers after a clean stop that keeps the data plane");
    // The next run (this one without --keep-dataplane) adopts it.
    topo.restart_lb(0, std::slice::from_ref(&web), &[])
        .expect("restarting");
    stream.wait_for_more(20, "answers after the next run started");
    let (gap, who) = stream.summary();
    assert_eq!(tally(who).len(), 1, "one backend all along");
    assert!(gap < Duration::from_secs(1), "longest gap {gap:?}");
}

/// Makes `dir` look like the pins an lb of another map layout left: an `LB_CONFIG` with
/// `value_size`-byte values (16 for layout 1) and an `LB_FLOWS`.
fn plant_foreign_pins(dir: &Path, value_size: u32) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let config = bpf::create_array("LB_CONFIG", value_size, 1)?;
    bpf::pin(&config, &dir.join("LB_CONFIG"))?;
    let flows = bpf::create_array("LB_FLOWS", 16, 4)?;
    bpf::pin(&flows, &dir.join("LB_FLOWS"))?;
    Ok(())
}

#[test]
fn pinned_maps_of_another_layout_or_size_are_refused_and_left_alone() {
    let web = VipSpec::tcp("web", VIP, PORT);
    let mut topo = Topology::builder()
        .backends(1)
        .vip(web.clone())
        .start_lb(false)
        .build()
        .expect("building the topology");
    let dir = topo.lb(0).pin_path.clone();

    // An older layout: LB_CONFIG of 16-byte values, no version in it.
    plant_foreign_pins(&dir, 16).expect("planting old pins");
    let err = topo
        .restart_lb(0, std::slice::from_ref(&web), &[])
        .expect_err("lb run must refuse maps of another layout");
    let text = format!("{err:#}");
    assert!(
        text.contains("another map layout") && text.contains("16-byte"),
        "a clear message: {text}"
    );
    assert!(
        dir.join("LB_CONFIG").exists() && dir.join("LB_FLOWS").exists(),
        "left alone"
    );
    std::fs::remove_dir_all(&dir).expect("removing the planted pins");

    // Positive control: the same command on a clean directory runs; then a crash leaves its
    // maps, and a changed layout number in them is refused too.
    topo.restart_lb(0, std::slice::from_ref(&web), &[])
        .expect("lb run on a clean directory");
    topo.kill_lb(0).expect("SIGKILL");
    let config = bpf::get(&dir.join("LB_CONFIG")).expect("opening LB_CONFIG");
    let mut value =
        bpf::lookup(&config, 0, size_of::<lb_common::LbConfig>()).expect("reading LB_CONFIG");
    assert_eq!(&value[0..4], b"LBMP", "the layout's magic");
    value[4..8].copy_from_slice(&1u32.to_ne_bytes());
    bpf::update(&config, 0, &value).expect("writing LB_CONFIG");
    let err = topo
        .restart_lb(0, std::slice::from_ref(&web), &[])
        .expect_err("lb run must refuse layout 1");
    let text = format!("{err:#}");
    assert!(text.contains("map layout 1"), "{text}");
    // Back to this binary's layout: other sizes are refused with the flag to change.
    value[4..8].copy_from_slice(&lb_common::LB_LAYOUT_VERSION.to_ne_bytes());
    bpf::update(&config, 0, &value).expect("writing LB_CONFIG");
    let err = topo
        .restart_lb(0, std::slice::from_ref(&web), &["--max-flows", "1000"])
        .expect_err("lb run must refuse other sizes");
    let text = format!("{err:#}");
    assert!(text.contains("--max-flows"), "{text}");
    // And with the sizes it was made with, it adopts them.
    topo.restart_lb(0, std::slice::from_ref(&web), &[])
        .expect("lb run adopting its own layout");
}

#[test]
fn a_restart_that_fails_after_adopting_leaves_the_data_plane_running() {
    let web = VipSpec::tcp("web", VIP, PORT);
    let mut topo = Topology::builder()
        .backends(2)
        .vip(web.clone())
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(PORT).expect("servers");
    let stream = Streamer::start(&topo, 30_200);
    stream.wait_for_more(20, "answers");
    topo.kill_lb(0).expect("SIGKILL");
    // Something else listens on the admin socket: the next run adopts the maps, then fails.
    let socket = topo.lb(0).admin_socket.clone();
    let _ = std::fs::remove_file(&socket);
    let squatter = std::os::unix::net::UnixListener::bind(&socket).expect("binding the socket");
    let err = topo
        .restart_lb(0, std::slice::from_ref(&web), &[])
        .expect_err("lb run cannot serve its admin API");
    assert!(
        format!("{err:#}").contains("another lb is listening"),
        "{err:#}"
    );
    assert!(pinned(&topo, "LB_FLOWS") && pinned(&topo, "xdp_link@eth0"));
    stream.wait_for_more(20, "answers after the failed restart");
    drop(squatter);
    topo.restart_lb(0, std::slice::from_ref(&web), &[])
        .expect("restarting");
    stream.wait_for_more(20, "answers after the next restart");
    assert_eq!(tally(stream.summary().1).len(), 1, "one backend all along");
}
