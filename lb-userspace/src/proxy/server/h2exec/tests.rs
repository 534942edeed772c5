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
        let stats = streams.stats;
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
