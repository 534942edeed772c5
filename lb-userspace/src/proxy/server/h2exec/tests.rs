//! The per-connection executor under a real hyper HTTP/2 server connection (the listeners'
//! settings, `http_builder`) and a hyper HTTP/2 client, over an in-memory pipe.
use std::convert::Infallible;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

use super::*;
use crate::proxy::server::http_builder;

/// Generous bound for conditions that hold within milliseconds.
const DEADLINE: Duration = Duration::from_secs(20);

type Reply = Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>;
type Handler = Arc<dyn Fn(Request<Incoming>) -> Reply + Send + Sync>;

/// How the test ends the server's connection.
enum Stop {
    /// GOAWAY, then wait for the open streams (as keep-alive expiry and drain do).
    Graceful,
    /// Drop the connection (as the tier's stop and the abuse cut-off do).
    Now,
}

/// What the server's connection task reports when it ends.
struct Ended {
    /// The connection task's id.
    task: tokio::task::Id,
    stats: Stats,
}

struct Server {
    stop: Option<oneshot::Sender<Stop>>,
    done: JoinHandle<Ended>,
}

impl Server {
    async fn stop(mut self, how: Stop) -> Ended {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(how);
        }
        tokio::time::timeout(DEADLINE, &mut self.done)
            .await
            .expect("server connection ends")
            .expect("server task does not panic")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.done.abort();
    }
}

/// Serves one HTTP/2 connection with `handler` as the listeners do (`Streams` driving the
/// connection in its task), and returns a client for it. `spawned` serves it with
/// `TokioExecutor` instead (the behaviour before: one task per stream).
async fn connect(
    handler: Handler,
    spawned: bool,
) -> (hyper::client::conn::http2::SendRequest<Full<Bytes>>, Server) {
    let (client_io, server_io) = tokio::io::duplex(256 * 1024);
    let (stop_tx, mut stop_rx) = oneshot::channel::<Stop>();
    let service = hyper::service::service_fn(move |req| {
        let reply = handler(req);
        async move { Ok::<_, Infallible>(reply.await) }
    });
    let done = tokio::spawn(async move {
        let task = tokio::task::id();
        let mut streams = Streams::new();
        let mut graceful = false;
        if spawned {
            let http = http_builder(TokioExecutor::new());
            let conn = http.serve_connection(TokioIo::new(server_io), service);
            tokio::pin!(conn);
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    s = &mut stop_rx, if !graceful => match s {
                        Ok(Stop::Graceful) => {
                            graceful = true;
                            conn.as_mut().graceful_shutdown();
                        }
                        _ => break,
                    },
                }
            }
        } else {
            let http = http_builder(streams.executor());
            let conn = http.serve_connection(TokioIo::new(server_io), service);
            tokio::pin!(conn);
            loop {
                tokio::select! {
                    _ = streams.drive(conn.as_mut()) => break,
                    s = &mut stop_rx, if !graceful => match s {
                        Ok(Stop::Graceful) => {
                            graceful = true;
                            conn.as_mut().graceful_shutdown();
                        }
                        _ => break,
                    },
                }
            }
        }
        let stats = streams.stats();
        drop(streams);
        Ended { task, stats }
    });
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io))
            .await
            .expect("client handshake");
    tokio::spawn(conn);
    (
        send,
        Server {
            stop: Some(stop_tx),
            done,
        },
    )
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://test{path}"))
        .body(Full::new(Bytes::new()))
        .expect("request")
}

fn ok(body: &'static str) -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from_static(body.as_bytes())))
}

/// Sends `req` and returns the status and body (`Err` if the stream was reset).
async fn fetch(
    send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<(u16, Bytes), hyper::Error> {
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Sets its flag when dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let until = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Records the task each request's handler ran in.
fn recording_handler(ids: Arc<Mutex<Vec<tokio::task::Id>>>) -> Handler {
    Arc::new(move |_req| {
        let ids = ids.clone();
        Box::pin(async move {
            // Answer later, so that many streams are open at once.
            tokio::task::yield_now().await;
            ids.lock().expect("ids").push(tokio::task::id());
            ok("hi")
        })
    })
}

async fn burst(send: &hyper::client::conn::http2::SendRequest<Full<Bytes>>, n: usize) {
    let mut all = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut send = send.clone();
        all.spawn(async move { fetch(&mut send, get(&format!("/{i}"))).await });
    }
    while let Some(r) = all.join_next().await {
        let (status, body) = r.expect("join").expect("response");
        assert_eq!((status, &body[..]), (200, &b"hi"[..]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_run_in_the_connection_task_not_in_tasks_of_their_own() {
    let ids = Arc::new(Mutex::new(Vec::new()));
    let (send, server) = connect(recording_handler(ids.clone()), false).await;
    burst(&send, 50).await;
    let ended = server.stop(Stop::Graceful).await;
    let ids = ids.lock().expect("ids").clone();
    assert_eq!(ids.len(), 50);
    assert!(
        ids.iter().all(|id| *id == ended.task),
        "every handler ran in the connection's task"
    );
    assert_eq!(
        ended.stats.started, 50,
        "every stream went through the executor"
    );

    // Control: with tokio's executor (before), the same test sees other tasks, one each.
    let spawned_ids = Arc::new(Mutex::new(Vec::new()));
    let (send, server) = connect(recording_handler(spawned_ids.clone()), true).await;
    burst(&send, 50).await;
    let ended = server.stop(Stop::Graceful).await;
    let spawned_ids = spawned_ids.lock().expect("ids").clone();
    assert_eq!(spawned_ids.len(), 50);
    assert!(spawned_ids.iter().all(|id| *id != ended.task));
    assert_eq!(ended.stats.started, 0);
}

/// A stream costs no slot of its own: one request after the other, every stream runs in the
/// slot the previous one left (its future is dropped before its response is flushed); a burst
/// needs no more slots than streams.
#[tokio::test]
async fn stream_slots_are_reused() {
    let ids = Arc::new(Mutex::new(Vec::new()));
    let (mut send, server) = connect(recording_handler(ids.clone()), false).await;
    for i in 0..20 {
        let (status, body) = fetch(&mut send, get(&format!("/{i}")))
            .await
            .expect("response");
        assert_eq!((status, &body[..]), (200, &b"hi"[..]));
    }
    burst(&send, 30).await;
    let ended = server.stop(Stop::Graceful).await;
    assert_eq!(
        ended.stats.started, 50,
        "every stream went through the executor"
    );
    assert!(
        (1..=30).contains(&ended.stats.slots),
        "the sequential streams share one slot, the burst needs at most one per stream: {:?}",
        ended.stats
    );
}

/// A handler for `/hang` that runs until dropped (flags: started, dropped); anything else
/// answers at once.
fn hanging_handler(started: Arc<Notify>, dropped: Arc<AtomicBool>) -> Handler {
    Arc::new(move |req| {
        let hang = req.uri().path() == "/hang";
        let started = started.clone();
        let guard = DropFlag(dropped.clone());
        Box::pin(async move {
            if hang {
                let _guard = guard;
                started.notify_one();
                std::future::pending::<()>().await;
            }
            ok("hi")
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_client_resets_is_dropped_and_the_connection_goes_on() {
    let started = Arc::new(Notify::new());
    let dropped = Arc::new(AtomicBool::new(false));
    let (mut send, server) =
        connect(hanging_handler(started.clone(), dropped.clone()), false).await;
    let pending = send.send_request(get("/hang"));
    let hang = tokio::spawn(pending);
    tokio::time::timeout(DEADLINE, started.notified())
        .await
        .expect("handler started");
    assert!(!dropped.load(Ordering::SeqCst), "running, not dropped yet");
    // Dropping the response future resets the stream (RST_STREAM CANCEL).
    hang.abort();
    wait_for("the reset stream's future to be dropped", || {
        dropped.load(Ordering::SeqCst)
    })
    .await;
    let (status, _) = fetch(&mut send, get("/fast")).await.expect("response");
    assert_eq!(status, 200);
    let ended = server.stop(Stop::Graceful).await;
    assert_eq!(ended.stats.started, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_ends_does_not_hold_up_the_others() {
    let started = Arc::new(Notify::new());
    let dropped = Arc::new(AtomicBool::new(false));
    let (mut send, server) =
        connect(hanging_handler(started.clone(), dropped.clone()), false).await;
    let hang = tokio::spawn(send.send_request(get("/hang")));
    tokio::time::timeout(DEADLINE, started.notified())
        .await
        .expect("handler started");
    for _ in 0..20 {
        let (status, body) = fetch(&mut send, get("/fast")).await.expect("response");
        assert_eq!((status, &body[..]), (200, &b"hi"[..]));
    }
    assert!(!hang.is_finished(), "the hanging stream is still open");
    // Stopping the connection for good drops the stream still running.
    let ended = server.stop(Stop::Now).await;
    assert!(
        dropped.load(Ordering::SeqCst),
        "dropped with its connection"
    );
    assert_eq!(ended.stats.started, 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_waits_for_the_running_stream_then_ends() {
    let started = Arc::new(Notify::new());
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let release_rx = Arc::new(Mutex::new(Some(release_rx)));
    let handler: Handler = {
        let started = started.clone();
        Arc::new(move |_req| {
            let started = started.clone();
            let release = release_rx.lock().expect("release").take();
            Box::pin(async move {
                started.notify_one();
                if let Some(release) = release {
                    let _ = release.await;
                }
                ok("finished")
            })
        })
    };
    let (mut send, server) = connect(handler, false).await;
    let in_flight = tokio::spawn(async move { fetch(&mut send, get("/slow")).await });
    tokio::time::timeout(DEADLINE, started.notified())
        .await
        .expect("handler started");
    let stop = tokio::spawn(server.stop(Stop::Graceful));
    // The release comes from another task, while the connection task is parked: the stream's
    // wake-up must reach the task through its waker.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !stop.is_finished(),
        "the connection waits for its open stream"
    );
    release_tx.send(()).expect("handler waits");
    let (status, body) = tokio::time::timeout(DEADLINE, in_flight)
        .await
        .expect("response in time")
        .expect("join")
        .expect("the in-flight stream is answered, not reset");
    assert_eq!((status, &body[..]), (200, &b"finished"[..]));
    let ended = stop.await.expect("join");
    assert_eq!(ended.stats.started, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_stream_is_reset_and_the_other_streams_go_on() {
    let handler: Handler = Arc::new(|req| {
        let panic = req.uri().path() == "/panic";
        Box::pin(async move {
            tokio::task::yield_now().await;
            assert!(!panic, "a handler that panics (expected in this test)");
            ok("hi")
        })
    });
    let (mut send, server) = connect(handler, false).await;
    let (status, _) = fetch(&mut send, get("/before")).await.expect("response");
    assert_eq!(status, 200);
    assert!(
        fetch(&mut send, get("/panic")).await.is_err(),
        "the panicking stream is reset"
    );
    for _ in 0..5 {
        let (status, _) = fetch(&mut send, get("/after")).await.expect("response");
        assert_eq!(status, 200, "the connection still serves");
    }
    let ended = server.stop(Stop::Graceful).await;
    assert_eq!(ended.stats.panicked, 1);
    assert_eq!(ended.stats.started, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_keeps_waking_itself_does_not_starve_the_connection() {
    let spins = Arc::new(AtomicUsize::new(0));
    let handler: Handler = {
        let spins = spins.clone();
        Arc::new(move |req| {
            let spin = req.uri().path() == "/spin";
            let spins = spins.clone();
            Box::pin(async move {
                if spin {
                    // Always ready to run again, never done.
                    std::future::poll_fn(|cx| {
                        spins.fetch_add(1, Ordering::Relaxed);
                        cx.waker().wake_by_ref();
                        Poll::<()>::Pending
                    })
                    .await;
                }
                ok("hi")
            })
        })
    };
    let (mut send, server) = connect(handler, false).await;
    let spin = tokio::spawn(send.send_request(get("/spin")));
    wait_for("the spinning stream to run", || {
        spins.load(Ordering::Relaxed) > 0
    })
    .await;
    for _ in 0..20 {
        let (status, _) = fetch(&mut send, get("/fast")).await.expect("response");
        assert_eq!(status, 200);
    }
    assert!(!spin.is_finished());
    let ended = server.stop(Stop::Now).await;
    assert!(
        ended.stats.yielded > 0,
        "the driver yielded to the scheduler"
    );
}

/// Counts the wake-ups of the connection's task.
#[derive(Default)]
struct CountWake(AtomicUsize);

impl Wake for CountWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A stream future's record: how often it was polled, its latest waker, whether to end.
#[derive(Default)]
struct Probe {
    polls: AtomicUsize,
    waker: Mutex<Option<Waker>>,
    done: AtomicBool,
}

impl Probe {
    /// A stream that records its polls in `self` and ends once `done` is set.
    fn stream(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let probe = self.clone();
        std::future::poll_fn(move |cx| {
            probe.polls.fetch_add(1, Ordering::SeqCst);
            *probe.waker.lock().expect("waker") = Some(cx.waker().clone());
            if probe.done.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Queues [`Probe::stream`] through the executor (hyper's way).
    fn queue(self: &Arc<Self>, exec: &StreamExec) {
        hyper::rt::Executor::execute(exec, self.stream());
    }

    fn polls(&self) -> usize {
        self.polls.load(Ordering::SeqCst)
    }

    fn waker(&self) -> Waker {
        self.waker
            .lock()
            .expect("waker")
            .clone()
            .expect("polled once")
    }
}

/// The woken-slot bitmap: a waker fired from another thread wakes the connection's task and
/// gets exactly its own slot polled again, in either bitmap word (70 streams: slots 0..63 in
/// the first word, 64..69 in the second); a slot woken twice before the driver runs is polled
/// once.
#[test]
fn a_wake_from_another_thread_polls_exactly_the_woken_slot() {
    const N: usize = 70;
    let task_wakes = Arc::new(CountWake::default());
    let task_waker = Waker::from(task_wakes.clone());
    let mut cx = Context::from_waker(&task_waker);
    let mut streams = Streams::new();
    let exec = streams.executor();
    let probes: Vec<Arc<Probe>> = (0..N).map(|_| Arc::new(Probe::default())).collect();
    for probe in &probes {
        probe.queue(&exec);
    }
    let mut conn = std::pin::pin!(std::future::pending::<()>());
    assert!(streams.poll_drive(conn.as_mut(), &mut cx).is_pending());
    assert!(
        probes.iter().all(|p| p.polls() == 1),
        "each new stream polled once"
    );
    assert_eq!((streams.stats().slots, streams.stats().polls), (N, N));

    let woken = [3, 66];
    let wakers: Vec<Waker> = woken.iter().map(|&i| probes[i].waker()).collect();
    let before = task_wakes.0.load(Ordering::SeqCst);
    std::thread::spawn(move || {
        for w in &wakers {
            w.wake_by_ref();
            w.wake_by_ref();
        }
    })
    .join()
    .expect("waking thread");
    assert!(
        task_wakes.0.load(Ordering::SeqCst) > before,
        "the wake-ups from the other thread woke the connection's task"
    );
    assert!(streams.poll_drive(conn.as_mut(), &mut cx).is_pending());
    for (i, probe) in probes.iter().enumerate() {
        let want = if woken.contains(&i) { 2 } else { 1 };
        assert_eq!(probe.polls(), want, "stream {i}");
    }
    assert_eq!(streams.stats().polls, N + woken.len());

    // Nothing woken: nothing polled.
    assert!(streams.poll_drive(conn.as_mut(), &mut cx).is_pending());
    assert_eq!(streams.stats().polls, N + woken.len());

    // The woken stream that ends frees its slot, which the next stream takes.
    probes[66].done.store(true, Ordering::SeqCst);
    probes[66].waker().wake();
    assert!(streams.poll_drive(conn.as_mut(), &mut cx).is_pending());
    assert_eq!(probes[66].polls(), 3);
    let next = Arc::new(Probe::default());
    next.queue(&exec);
    assert!(streams.poll_drive(conn.as_mut(), &mut cx).is_pending());
    assert_eq!((next.polls(), streams.stats().slots), (1, N));
    assert_eq!(
        probes[66].polls(),
        3,
        "the ended stream is not polled again"
    );
}

/// A spin-wait that gives the CPU away after a while. Spinning catches the other thread
/// mid-poll (the race the test needs) when the two threads run on two CPUs, where a hand-off
/// takes well under [`Relax::SPIN`]; when they share one CPU (a loaded machine), a pure spin
/// would wait out the other thread's time slice on every hand-off, so after `SPIN` it
/// yields instead.
struct Relax(std::time::Instant);

impl Relax {
    const SPIN: Duration = Duration::from_micros(200);

    fn new() -> Self {
        Self(std::time::Instant::now())
    }

    fn wait(&self) {
        if self.0.elapsed() < Self::SPIN {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// Wake-ups from another thread racing the driver's poll (the stream is woken while the
/// driver is still inside the poll that just polled it, or after it returned) are never lost:
/// the driver polls only when its task was woken, and every wake-up gets the stream polled
/// once more. The waker goes on until [`RACES`] of its wake-ups came while the driver was
/// inside its poll (the race happened, counted), so a loaded machine that rarely runs the
/// two threads at once makes the test longer, not flaky.
#[test]
fn wake_ups_racing_the_drivers_poll_are_not_lost() {
    const RACES: usize = 5;
    const MAX_WAKES: usize = 100_000;
    let task_wakes = Arc::new(CountWake::default());
    let task_waker = Waker::from(task_wakes.clone());
    let mut cx = Context::from_waker(&task_waker);
    let mut streams = Streams::new();
    let probe = Arc::new(Probe::default());
    probe.queue(&streams.executor());
    let mut conn = std::pin::pin!(std::future::pending::<()>());
    let inside = Arc::new(AtomicBool::new(false));
    // The waker's last wake-up, once it has sent it (0 before).
    let last = Arc::new(AtomicUsize::new(0));
    let waker_thread = {
        let (probe, inside, last) = (probe.clone(), inside.clone(), last.clone());
        std::thread::spawn(move || {
            let (mut k, mut during_poll) = (0, 0);
            while during_poll < RACES {
                k += 1;
                assert!(
                    k <= MAX_WAKES,
                    "only {during_poll} of {MAX_WAKES} wake-ups came during the driver's poll"
                );
                // Wait for the poll that follows the previous wake-up.
                let until = std::time::Instant::now() + DEADLINE;
                let relax = Relax::new();
                while probe.polls() < k {
                    assert!(std::time::Instant::now() < until, "wake-up {k} was lost");
                    relax.wait();
                }
                if inside.load(Ordering::SeqCst) {
                    during_poll += 1;
                }
                probe.waker().wake_by_ref();
            }
            last.store(k, Ordering::SeqCst);
            (k, during_poll)
        })
    };
    let mut until = std::time::Instant::now() + DEADLINE;
    let mut seen = 0;
    let mut relax = Relax::new();
    loop {
        let sent = last.load(Ordering::SeqCst);
        if sent > 0 && probe.polls() > sent {
            break;
        }
        // Also while the stream was never polled (then the driver polls on and on: a stream
        // lost before its first poll must fail the test, not hang it).
        assert!(
            std::time::Instant::now() < until,
            "the driver's task was not woken, or the stream never ran (polls: {})",
            probe.polls()
        );
        // Poll only after a wake-up of the task (the first poll needs none).
        let now = task_wakes.0.load(Ordering::SeqCst);
        if now == seen && probe.polls() > 0 {
            relax.wait();
            continue;
        }
        relax = Relax::new();
        until = std::time::Instant::now() + DEADLINE;
        seen = now;
        inside.store(true, Ordering::SeqCst);
        assert!(streams.poll_drive(conn.as_mut(), &mut cx).is_pending());
        inside.store(false, Ordering::SeqCst);
    }
    let (wakes, during_poll) = waker_thread.join().expect("waker thread");
    assert_eq!(
        probe.polls(),
        wakes + 1,
        "one poll per wake-up, and the first"
    );
    assert!(
        during_poll >= RACES,
        "{during_poll} wake-ups came while the driver was polling"
    );
}

/// A connection that hands `streams` new streams to the driver on its first poll, then waits
/// (never wakes itself): as the native HTTP/2 connection does with the streams it accepts.
struct HandsOver {
    probes: Vec<Arc<Probe>>,
}

impl Driven for HandsOver {
    type Output = ();

    fn poll_driven(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        new: Option<&mut NewStreams<'_>>,
    ) -> Poll<()> {
        let new = new.expect("polled by the driver");
        for probe in self.get_mut().probes.drain(..) {
            new.boxed(Box::pin(probe.stream()));
        }
        Poll::Pending
    }
}

/// Streams the connection hands over while the driver polls it are polled in the same poll of
/// the task, in the round after the connection's (two rounds in all, as when they came through
/// the queue), without waking the task; the slot of one that ended is the next one's.
#[test]
fn streams_handed_over_by_the_connection_are_polled_in_the_same_pass() {
    let task_wakes = Arc::new(CountWake::default());
    let task_waker = Waker::from(task_wakes.clone());
    let mut cx = Context::from_waker(&task_waker);
    let mut streams = Streams::new();
    let probes: Vec<Arc<Probe>> = (0..3).map(|_| Arc::new(Probe::default())).collect();
    probes[1].done.store(true, Ordering::SeqCst);
    let mut conn = std::pin::pin!(HandsOver {
        probes: probes.clone()
    });
    assert!(streams.poll_drive(conn.as_mut(), &mut cx).is_pending());
    assert!(
        probes.iter().all(|p| p.polls() == 1),
        "each handed-over stream polled once in this pass"
    );
    let stats = streams.stats();
    assert_eq!(
        (stats.started, stats.slots, stats.polls, stats.rounds),
        (3, 3, 3, 2),
        "{stats:?}"
    );
    assert_eq!(task_wakes.0.load(Ordering::SeqCst), 0, "no wake-up");

    // A later hand-over takes the slot the ended stream left.
    let next = Arc::new(Probe::default());
    conn.as_mut().get_mut().probes.push(next.clone());
    // Through `drive`, which has the connection polled (as the connection's loop does).
    let drive = std::pin::pin!(streams.drive(conn.as_mut()));
    assert!(drive.poll(&mut cx).is_pending());
    let stats = streams.stats();
    assert_eq!((next.polls(), stats.started, stats.slots), (1, 4, 3));
    assert_eq!(
        (probes[0].polls(), probes[1].polls(), probes[2].polls()),
        (1, 1, 1),
        "the others not polled again"
    );
    assert_eq!(task_wakes.0.load(Ordering::SeqCst), 0, "no wake-up");
}
