//! The native HTTP/2 path (`server/h2native.rs`): streams served by lb's own glue on the `h2`
//! crate, not hyper's HTTP/2 server. Every test runs on both paths (`http2=native|hyper`) and
//! checks the `http2_native_requests` counter, so a silent fall-back to hyper cannot pass for
//! the native path (and the hyper run is the counter's positive control). The client is the
//! `h2` crate itself (prior knowledge), for control over windows, trailers and resets.
mod support;
mod support_client;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{Proxy, ProxyBuilder, wait_until, within};
use support_client::{RawBehaviour, RawTarget};
use tokio::net::{TcpListener, TcpStream};

fn native_requests(p: &Proxy) -> u64 {
    p.running
        .as_ref()
        .expect("running")
        .counters()
        .http2_native_requests
        .get()
}

/// What the path under test should have counted: every stream on the native path, none on
/// hyper's.
fn expect_counted(p: &Proxy, native: bool, streams: u64) {
    let want = if native { streams } else { 0 };
    assert_eq!(native_requests(p), want, "native={native}");
}

/// An HTTP/2 client connection (prior knowledge), its driver spawned; `window` is the client's
/// initial stream window (what lb may send on a stream before the client reads).
async fn h2_client(addr: SocketAddr, window: u32) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect to proxy");
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(window)
        .initial_connection_window_size(16 * 1024 * 1024)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn request(method: &str, path: &str) -> Request<()> {
    Request::builder()
        .method(method)
        .uri(format!("http://app.test{path}"))
        .body(())
        .expect("request")
}

/// Reads a whole response body, releasing capacity as it goes; returns it and the trailers.
async fn read_body(mut body: h2::RecvStream) -> (Vec<u8>, Option<HeaderMap>) {
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("response body chunk");
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.expect("trailers");
    (got, trailers)
}

type TargetBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A hyper target (HTTP/1.1 or, `http2`, HTTP/2) answering every request with `answer`.
async fn target<F, Fut>(http2: bool, answer: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TargetBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let fut = answer(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                if http2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                }
            });
        }
    });
    (addr, task)
}

fn text(s: impl Into<Bytes>) -> TargetBody {
    http_body_util::Full::new(s.into()).boxed()
}

fn proxy_to(addr: SocketAddr, http2_target: bool, native: bool) -> ProxyBuilder {
    let spec = if http2_target {
        "tg,protocol-version=http2"
    } else {
        "tg"
    };
    ProxyBuilder::new()
        .group_spec(spec, &[addr])
        .rules(&["web,default,forward=tg"])
        .listener(|l| l.http2_native = native)
}

/// A 5 MiB upload, five times the stream and connection windows lb grants: it completes only
/// if lb releases flow-control capacity as the pipeline forwards the body. The HTTP/1.1 target
/// gets it framed by the client's `content-length` (not chunked), on both paths.
#[tokio::test]
async fn a_request_body_larger_than_the_window_is_uploaded_whole() {
    const SIZE: usize = 5 * 1024 * 1024;
    let (t, _task) = target(false, |req: Request<Incoming>| async move {
        let framing = format!(
            "content-length {:?}, transfer-encoding {:?}",
            req.headers().get("content-length"),
            req.headers().get("transfer-encoding")
        );
        let body = req.into_body().collect().await.expect("body").to_bytes();
        let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
        Response::new(text(format!("{} {sum} {framing}", body.len())))
    })
    .await;
    for native in [true, false] {
        let p = proxy_to(t, false, native).start().await;
        within(async {
            let mut client = h2_client(p.addr, 65_535).await;
            let mut req = request("POST", "/upload");
            req.headers_mut()
                .insert("content-length", SIZE.to_string().parse().expect("value"));
            let (response, mut body) = client.send_request(req, false).expect("send");
            let payload: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
            let sum: u64 = payload.iter().map(|&b| u64::from(b)).sum();
            let mut payload = Bytes::from(payload);
            while !payload.is_empty() {
                body.reserve_capacity(payload.len().min(64 * 1024));
                let cap = std::future::poll_fn(|cx| body.poll_capacity(cx))
                    .await
                    .expect("stream open")
                    .expect("capacity");
                let chunk = payload.split_to(cap.min(payload.len()));
                body.send_data(chunk, payload.is_empty())
                    .expect("send data");
            }
            let response = response.await.expect("response");
            assert_eq!(response.status(), 200, "native={native}");
            let (got, _) = read_body(response.into_body()).await;
            assert_eq!(
                String::from_utf8_lossy(&got),
                format!("{SIZE} {sum} content-length Some(\"{SIZE}\"), transfer-encoding None"),
                "native={native}: the target got every byte, framed by its length"
            );
        })
        .await;
        expect_counted(&p, native, 1);
    }
}

/// A small PUT with a `content-length` is retried on a new target connection when its pooled
/// one turns out stale: only a body whose size hint says it is small enough to be kept is
/// retryable, and only a retryable request may reuse a connection whose idle age the pool has
/// not proven safe (a fresh pool has proven none). The target answers a connection's first
/// request and resets the connection after reading its second, so the PUT, reusing the GET's
/// connection, is lost there and must be replayed, whole, on a second connection. Without the
/// hint (the native path's body dropping it) the PUT would go out fresh instead: no retry,
/// which the pool's `retried` counter and the target's record tell apart.
#[tokio::test]
async fn a_small_put_with_a_length_is_retried_on_a_stale_pooled_connection() {
    for native in [true, false] {
        let t = RawTarget::start(RawBehaviour {
            reset_after_reading_request: Some(2),
            ..RawBehaviour::default()
        })
        .await;
        let p = proxy_to(t.addr, false, native).start().await;
        let running = p.running.as_ref().expect("running");
        within(async {
            let mut client = h2_client(p.addr, 65_535).await;
            let (response, _) = client
                .send_request(request("GET", "/first"), true)
                .expect("send GET");
            let response = response.await.expect("GET response");
            assert_eq!(response.status(), 200, "native={native}");
            read_body(response.into_body()).await;
            // The GET's target connection is back in the pool before the PUT goes out.
            wait_until("the GET's connection pooled", || {
                running
                    .pool_stats()
                    .first()
                    .is_some_and(|s| s.idle_connections == 1)
            })
            .await;

            let mut req = request("PUT", "/doc");
            req.headers_mut()
                .insert("content-length", "9".parse().expect("value"));
            let (response, mut body) = client.send_request(req, false).expect("send PUT");
            body.send_data(Bytes::from_static(b"version-2"), true)
                .expect("send PUT body");
            let response = response.await.expect("PUT response");
            let status = response.status();
            let (got, _) = read_body(response.into_body()).await;
            assert_eq!(
                (status.as_u16(), String::from_utf8_lossy(&got).into_owned()),
                (200, "PUT /doc #1 on connection 1".to_string()),
                "native={native}: answered on the second connection"
            );
        })
        .await;
        let puts: Vec<_> = t
            .seen()
            .into_iter()
            .filter(|s| s.method == "PUT")
            .map(|s| (s.connection, s.nth_on_connection, s.body))
            .collect();
        assert_eq!(
            puts,
            vec![(0, 2, b"version-2".to_vec()), (1, 1, b"version-2".to_vec())],
            "native={native}: the PUT reused the GET's connection, was lost there and sent \
             again, whole, on a new one"
        );
        let stats = running.pool_stats().pop().expect("one target pool");
        assert_eq!(
            (stats.reused, stats.retried, stats.unproven_reuse_avoided),
            (1, 1, 0),
            "native={native}: {stats:?}"
        );
        expect_counted(&p, native, 2);
    }
}

/// A 64 MiB response to a client that reads nothing past its 64 KiB window: lb pulls from the
/// target only what its bounded send buffer (and the sockets between) can hold, far from the
/// whole body; once the client reads, the whole body arrives.
#[tokio::test]
async fn a_large_response_to_a_slow_reader_is_not_buffered_whole() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: u64 = 1024; // 64 MiB
    let produced = Arc::new(AtomicU64::new(0));
    let made = produced.clone();
    let (t, _task) = target(false, move |_req: Request<Incoming>| {
        let made = made.clone();
        async move {
            made.store(0, Ordering::SeqCst);
            let stream = futures_util::stream::unfold(0u64, move |n| {
                let made = made.clone();
                async move {
                    (n < CHUNKS).then(|| {
                        made.fetch_add(CHUNK as u64, Ordering::SeqCst);
                        (
                            Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; CHUNK]))),
                            n + 1,
                        )
                    })
                }
            });
            Response::new(StreamBody::new(stream).boxed())
        }
    })
    .await;
    for native in [true, false] {
        let p = proxy_to(t, false, native).start().await;
        within(async {
            let mut client = h2_client(p.addr, 64 * 1024).await;
            let (response, _) = client
                .send_request(request("GET", "/big"), true)
                .expect("send");
            let response = response.await.expect("response head");
            assert_eq!(response.status(), 200);
            // Let lb pull what it will: wait until the target's production stops growing.
            let mut last = u64::MAX;
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let now = produced.load(Ordering::SeqCst);
                if now == last {
                    break;
                }
                last = now;
            }
            let total = CHUNK as u64 * CHUNKS;
            assert!(
                last < total / 2,
                "native={native}: lb pulled {last} of {total} bytes for a client that read 64 KiB"
            );
            let (got, _) = read_body(response.into_body()).await;
            assert_eq!(
                got.len() as u64,
                total,
                "native={native}: all of it in the end"
            );
        })
        .await;
        expect_counted(&p, native, 1);
    }
}

/// Request trailers reach an HTTP/2 target and the target's response trailers reach the client
/// (gRPC's `grpc-status` travels so).
#[tokio::test]
async fn trailers_pass_both_ways() {
    let (t, _task) = target(true, |req: Request<Incoming>| async move {
        let collected = req.into_body().collect().await.expect("body");
        let got = collected
            .trailers()
            .and_then(|t| t.get("x-request-trailer"))
            .map(|v| v.to_str().unwrap_or("?").to_owned())
            .unwrap_or_else(|| "none".to_owned());
        let data = collected.to_bytes();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().expect("value"));
        trailers.insert("x-seen", got.parse().expect("value"));
        let frames = futures_util::stream::iter([
            Ok::<_, Infallible>(Frame::data(data)),
            Ok(Frame::trailers(trailers)),
        ]);
        let mut response = Response::new(StreamBody::new(frames).boxed());
        response
            .headers_mut()
            .insert("content-type", "application/grpc".parse().expect("value"));
        response
    })
    .await;
    for native in [true, false] {
        let p = proxy_to(t, true, native).start().await;
        within(async {
            let mut client = h2_client(p.addr, 65_535).await;
            let mut req = request("POST", "/svc/Method");
            req.headers_mut()
                .insert("content-type", "application/grpc".parse().expect("value"));
            req.headers_mut()
                .insert("te", "trailers".parse().expect("value"));
            let (response, mut body) = client.send_request(req, false).expect("send");
            body.send_data(Bytes::from_static(b"hello"), false)
                .expect("data");
            let mut trailers = HeaderMap::new();
            trailers.insert("x-request-trailer", "sent".parse().expect("value"));
            body.send_trailers(trailers).expect("trailers");
            let response = response.await.expect("response");
            assert_eq!(response.status(), 200, "native={native}");
            let (got, trailers) = read_body(response.into_body()).await;
            assert_eq!(got, b"hello", "native={native}");
            let trailers = trailers.unwrap_or_else(|| panic!("native={native}: no trailers"));
            assert_eq!(trailers["grpc-status"], "0", "native={native}");
            assert_eq!(
                trailers["x-seen"], "sent",
                "native={native}: the request trailer reached the target"
            );
        })
        .await;
        expect_counted(&p, native, 1);
    }
}

/// The client resets a stream in the middle of its response: lb lets go of the response body
/// (the target sees its body dropped) and the connection serves the next request.
#[tokio::test]
async fn a_client_reset_mid_response_drops_the_body_and_keeps_the_connection() {
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = dropped.clone();
    let (t, _task) = target(false, move |req: Request<Incoming>| {
        let flag = flag.clone();
        async move {
            if req.uri().path() == "/small" {
                return Response::new(text("small"));
            }
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"first")))).await;
                // Then nothing more until lb lets go of the body.
                tx.closed().await;
                flag.store(true, Ordering::SeqCst);
            });
            let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
            Response::new(StreamBody::new(stream).boxed())
        }
    })
    .await;
    for native in [true, false] {
        dropped.store(false, Ordering::SeqCst);
        let p = proxy_to(t, false, native).start().await;
        within(async {
            let mut client = h2_client(p.addr, 65_535).await;
            let (response, _) = client
                .send_request(request("GET", "/stream"), true)
                .expect("send");
            let response = response.await.expect("response head");
            let mut body = response.into_body();
            let first = body.data().await.expect("a chunk").expect("data");
            assert_eq!(&first[..], b"first");
            // Positive control: the body is still held while the stream is open.
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(
                !dropped.load(Ordering::SeqCst),
                "native={native}: dropped early"
            );
            // RST_STREAM(CANCEL): h2 sends it when the client drops the stream's handles.
            drop(body);
            wait_until("the target's body dropped after the reset", || {
                dropped.load(Ordering::SeqCst)
            })
            .await;
            let (response, _) = client
                .send_request(request("GET", "/small"), true)
                .expect("the connection is still usable");
            let response = response.await.expect("second response");
            let (got, _) = read_body(response.into_body()).await;
            assert_eq!(got, b"small", "native={native}");
        })
        .await;
        expect_counted(&p, native, 2);
    }
}

/// Draining the tier sends GOAWAY: the client can open no new stream, but the stream already
/// open finishes with its whole response.
#[tokio::test]
async fn drain_sends_goaway_and_the_open_stream_finishes() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let open = gate.clone();
    let (t, _task) = target(false, move |_req: Request<Incoming>| {
        let open = open.clone();
        async move {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            tokio::spawn(async move {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"first,"))))
                    .await;
                open.notified().await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"last")))).await;
            });
            let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
            Response::new(StreamBody::new(stream).boxed())
        }
    })
    .await;
    for native in [true, false] {
        let mut p = proxy_to(t, false, native).start().await;
        let counters = p.running.as_ref().expect("running").counters().clone();
        within(async {
            let mut client = h2_client(p.addr, 65_535).await;
            let (response, _) = client
                .send_request(request("GET", "/slow"), true)
                .expect("send");
            let response = response.await.expect("response head");
            let mut body = response.into_body();
            let first = body.data().await.expect("a chunk").expect("data");
            assert_eq!(&first[..], b"first,");
            // Positive control: before the drain a new stream can be opened.
            assert!(client.clone().ready().await.is_ok(), "native={native}");
            let running = p.running.take().expect("running");
            let shutdown = tokio::spawn(running.shutdown(support::SAFETY));
            // GOAWAY: once it arrived, h2 refuses to open new streams on this connection.
            let refused = async {
                while client.clone().ready().await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            refused.await;
            gate.notify_waiters();
            gate.notify_one();
            let mut rest = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("the open stream finishes without error");
                let _ = body.flow_control().release_capacity(chunk.len());
                rest.extend_from_slice(&chunk);
            }
            assert_eq!(rest, b"last", "native={native}");
            shutdown.await.expect("join").expect("shutdown");
        })
        .await;
        let counted = counters.http2_native_requests.get();
        assert_eq!(counted > 0, native, "native={native}: {counted}");
    }
}

/// What a client gets for `:method CONNECT` (extended CONNECT is not enabled): the native path
/// answers it as hyper's did, for a target that accepts it (2xx) and one that refuses it.
#[tokio::test]
async fn connect_gets_what_it_got_from_hyper() {
    let (t, _task) = target(false, |req: Request<Incoming>| async move {
        let mut response = Response::new(text("refused"));
        if req.uri().port_u16() == Some(443) {
            *response.status_mut() = http::StatusCode::OK;
        } else {
            *response.status_mut() = http::StatusCode::METHOD_NOT_ALLOWED;
        }
        response
    })
    .await;
    let mut seen = Vec::new();
    for native in [true, false] {
        let p = proxy_to(t, false, native).start().await;
        let mut outcomes = Vec::new();
        for authority in ["app.test:443", "app.test:8080"] {
            let outcome = within(async {
                let mut client = h2_client(p.addr, 65_535).await;
                let req = Request::builder()
                    .method("CONNECT")
                    .uri(authority)
                    .body(())
                    .expect("request");
                let (response, _body) = client.send_request(req, false).expect("send");
                match response.await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let has_length = response.headers().contains_key("content-length");
                        let (body, reset) = {
                            let mut body = response.into_body();
                            let mut got = Vec::new();
                            let mut reset = None;
                            // A tunnel that stays open is an outcome too (not an assertion
                            // on time: both paths are read the same way).
                            loop {
                                match tokio::time::timeout(Duration::from_secs(2), body.data())
                                    .await
                                {
                                    Err(_) => {
                                        reset = Some("still open".to_owned());
                                        break;
                                    }
                                    Ok(None) => break,
                                    Ok(Some(Ok(c))) => got.extend_from_slice(&c),
                                    Ok(Some(Err(e))) => {
                                        reset = Some(format!("{:?}", e.reason()));
                                        break;
                                    }
                                }
                            }
                            (String::from_utf8_lossy(&got).into_owned(), reset)
                        };
                        format!("{status} length={has_length} body={body:?} reset={reset:?}")
                    }
                    Err(e) => format!("error {:?}", e.reason()),
                }
            })
            .await;
            outcomes.push(outcome);
        }
        eprintln!("native={native}: {outcomes:?}");
        seen.push(outcomes);
    }
    assert_eq!(seen[0], seen[1], "native, then hyper");
}

/// What a client sees of one response: status, `content-length`, whether the HEADERS frame
/// ended the stream, the body, the trailers, and how the stream ended.
async fn outcome(client: &mut h2::client::SendRequest<Bytes>, req: Request<()>) -> String {
    let (response, _) = client.send_request(req, true).expect("send");
    let response = match response.await {
        Ok(r) => r,
        Err(e) => return format!("error {:?}", e.reason()),
    };
    let status = response.status().as_u16();
    let length = response
        .headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap_or("?").to_owned());
    let mut body = response.into_body();
    let ended_with_head = body.is_end_stream();
    let mut got = Vec::new();
    let mut end = "end".to_owned();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(c) => {
                let _ = body.flow_control().release_capacity(c.len());
                got.extend_from_slice(&c);
            }
            Err(e) => {
                end = format!("reset {:?}", e.reason());
                break;
            }
        }
    }
    format!(
        "{status} length={length:?} end_with_head={ended_with_head} body={:?} {end}",
        String::from_utf8_lossy(&got)
    )
}

/// HEAD, 204 and 304 end the stream with the HEADERS frame (no DATA frame), a HEAD answer keeps
/// the target's `content-length`, and a response body that fails half-way resets the stream
/// with INTERNAL_ERROR: the same on both paths, and as expected.
#[tokio::test]
async fn bodiless_answers_and_a_failing_body_look_the_same_on_both_paths() {
    let (t, _task) = target(false, |req: Request<Incoming>| async move {
        let status = match req.uri().path() {
            "/204" => 204,
            "/304" => 304,
            _ => 200,
        };
        if req.uri().path() == "/broken" {
            // A declared length the target never delivers: the body fails when it closes.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"part")))).await;
            });
            let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
            let mut response = Response::new(StreamBody::new(stream).boxed());
            response
                .headers_mut()
                .insert("content-length", "100".parse().expect("value"));
            return response;
        }
        let mut response = Response::new(text(if status == 200 { "hello" } else { "" }));
        *response.status_mut() = http::StatusCode::from_u16(status).expect("status");
        response
    })
    .await;
    let mut seen = Vec::new();
    for native in [true, false] {
        let p = proxy_to(t, false, native).start().await;
        let outcomes = within(async {
            let mut client = h2_client(p.addr, 65_535).await;
            let mut outcomes = Vec::new();
            for (method, path) in [
                ("HEAD", "/"),
                ("GET", "/204"),
                ("GET", "/304"),
                ("GET", "/"),
                ("GET", "/broken"),
            ] {
                outcomes.push(outcome(&mut client, request(method, path)).await);
            }
            outcomes
        })
        .await;
        eprintln!("native={native}: {outcomes:#?}");
        assert_eq!(
            outcomes[..4],
            [
                r#"200 length=Some("5") end_with_head=true body="" end"#,
                r#"204 length=None end_with_head=true body="" end"#,
                r#"304 length=None end_with_head=true body="" end"#,
                r#"200 length=Some("5") end_with_head=false body="hello" end"#,
            ],
            "native={native}"
        );
        // The reset may reach the client with the head or after some of the body, depending
        // on how the frames were batched: either way the stream ends with INTERNAL_ERROR.
        assert!(
            outcomes[4].ends_with("reset Some(INTERNAL_ERROR)")
                || outcomes[4] == "error Some(INTERNAL_ERROR)",
            "native={native}: {}",
            outcomes[4]
        );
        expect_counted(&p, native, 5);
        seen.push(outcomes);
    }
    assert_eq!(seen[0][..4], seen[1][..4], "native, then hyper");
}
