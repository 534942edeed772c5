//! Connection lifecycle: WebSocket tunnels, HTTP/2 prior knowledge, idle and keep-alive limits,
//! graceful shutdown, LB-generated actions.
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::target::{self, Reply};
use support::{ProxyBuilder, get, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn websocket_upgrade_is_tunnelled_both_ways() {
    let t = target::http1().route("/", Reply::UpgradeEcho).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    within(async {
        let mut tcp = TcpStream::connect(p.addr).await.expect("connect");
        tcp.write_all(
            b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .expect("write");
        // Read the 101 head.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tcp.read_exact(&mut byte).await.expect("read head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: websocket"), "{head}");
        for msg in [&b"ping"[..], b"GET / HTTP/1.1\r\n\r\n", b"pong"] {
            tcp.write_all(msg).await.expect("write frame");
            let mut echo = vec![0u8; msg.len()];
            tcp.read_exact(&mut echo).await.expect("read echo");
            assert_eq!(
                echo, msg,
                "bytes after the upgrade are tunnelled, not parsed"
            );
        }
    })
    .await;
    assert_eq!(t.hits(), 1);
}

#[tokio::test]
async fn http2_prior_knowledge_works_on_plain_listeners() {
    let t = target::http1()
        .route("/", Reply::text("over h2c"))
        .run()
        .await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let body = within(async {
        let tcp = TcpStream::connect(p.addr).await.expect("connect");
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2c handshake");
        tokio::spawn(conn);
        let resp = send
            .send_request(
                Request::get("http://app.test/")
                    .body(Full::new(Bytes::new()))
                    .expect("req"),
            )
            .await
            .expect("response");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.expect("body").to_bytes()
    })
    .await;
    assert_eq!(&body[..], b"over h2c");
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_without_a_response() {
    let t = target::http1().route("/", Reply::text("hi")).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr])
        .listener(|l| l.idle_timeout = Duration::from_millis(300))
        .start()
        .await;
    let out = within(async {
        let mut tcp = TcpStream::connect(p.addr).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        // Returns at EOF, i.e. when the balancer closes the idle connection.
        tcp.read_to_end(&mut out).await.expect("read");
        String::from_utf8_lossy(&out).into_owned()
    })
    .await;
    assert_eq!(
        out.matches("HTTP/1.1").count(),
        1,
        "only the real response: {out}"
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[tokio::test]
async fn keep_alive_lifetime_closes_after_the_current_response() {
    let t = target::http1()
        .route("/", Reply::Slow(Duration::from_millis(1500), "slow".into()))
        .run()
        .await;
    let p = ProxyBuilder::forward_to(&[t.addr])
        .listener(|l| l.client_keepalive = Duration::from_millis(200))
        .start()
        .await;
    let out = within(async {
        let mut tcp = TcpStream::connect(p.addr).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        tcp.read_to_end(&mut out).await.expect("read");
        String::from_utf8_lossy(&out).into_owned()
    })
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    assert!(out.ends_with("slow"), "{out}");
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let t = target::http1()
        .route(
            "/",
            Reply::Slow(Duration::from_millis(500), "finished".into()),
        )
        .run()
        .await;
    let mut p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let addr = p.addr;
    let request = tokio::spawn(async move { get(addr, "/").await });
    within(async {
        while t.hits() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let running = p.running.take().expect("running");
    within(running.shutdown(Duration::from_secs(10)))
        .await
        .expect("shutdown");
    let got = within(request).await.expect("request task");
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "finished");
    // New connections are refused after shutdown.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn shutdown_deadline_cuts_requests_that_take_longer() {
    let t = target::http1().route("/", Reply::Hang).run().await;
    let mut p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let addr = p.addr;
    let request = tokio::spawn(async move {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out).await;
        out
    });
    within(async {
        while t.hits() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let running = p.running.take().expect("running");
    within(running.shutdown(Duration::from_millis(200)))
        .await
        .expect("shutdown");
    let out = within(request).await.expect("request task");
    assert!(out.is_empty(), "connection closed without a response");
}

#[tokio::test]
async fn fixed_response_action_answers_without_a_target() {
    let p = ProxyBuilder::new()
        .rules(&["web,default,fixed-response=418,content-type=text/plain,body=short and stout"])
        .start()
        .await;
    let got = get(p.addr, "/anything").await;
    assert_eq!(got.status.as_u16(), 418);
    assert_eq!(got.headers["content-type"], "text/plain");
    assert_eq!(got.body, "short and stout");
}

/// HTTP/2 from the client (h2c prior knowledge) to an HTTP/2 target group, end to end.
async fn h2c_get(addr: std::net::SocketAddr, content_type: Option<&str>) -> (u16, Bytes) {
    within(async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2c handshake");
        tokio::spawn(conn);
        let mut req = Request::post("http://app.test/svc");
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = send
            .send_request(req.body(Full::new(Bytes::new())).expect("req"))
            .await
            .expect("response");
        let status = resp.status().as_u16();
        (
            status,
            resp.into_body().collect().await.expect("body").to_bytes(),
        )
    })
    .await
}

#[tokio::test]
async fn http2_client_reaches_an_http2_group() {
    let t = target::http2().route("/", Reply::EchoHeaders).run().await;
    let p = ProxyBuilder::new()
        .group_spec("tg,protocol-version=http2", &[t.addr])
        .rules(&["web,default,forward=tg"])
        .start()
        .await;
    let (status, body) = h2c_get(p.addr, Some("application/grpc")).await;
    assert_eq!(status, 200);
    let body = String::from_utf8_lossy(&body);
    let request_line = body.lines().next().unwrap_or_default();
    assert!(request_line.starts_with("POST "), "{body}");
    assert!(
        request_line.ends_with("/svc HTTP/2.0"),
        "the target spoke HTTP/2: {body}"
    );
}

#[tokio::test]
async fn grpc_to_an_http1_group_is_464() {
    let t = target::http1().route("/", Reply::text("h1")).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let (status, _) = h2c_get(p.addr, Some("application/grpc+proto")).await;
    assert_eq!(status, 464);
    let (status, body) = h2c_get(p.addr, None).await;
    assert_eq!(
        (status, &body[..]),
        (200, &b"h1"[..]),
        "plain HTTP/2 to HTTP/1 is fine"
    );
    assert_eq!(t.hits(), 1);
}

#[tokio::test]
async fn response_bodies_are_streamed_not_buffered() {
    let (reply, gate) = Reply::gated("first,", "second");
    let t = target::http1().route("/", reply).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    within(async {
        let tcp = TcpStream::connect(p.addr).await.expect("connect");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let resp = send
            .send_request(
                Request::get("/")
                    .header("host", "x")
                    .body(Full::new(Bytes::new()))
                    .expect("req"),
            )
            .await
            .expect("response");
        let mut body = resp.into_body();
        // The first chunk arrives while the target is still holding the rest back.
        let first = body.frame().await.expect("frame").expect("ok");
        assert_eq!(first.into_data().expect("data"), "first,");
        gate.release();
        let rest = body.collect().await.expect("rest").to_bytes();
        assert_eq!(rest, "second");
    })
    .await;
}
