//! Every status the load balancer generates, each produced by a real failure on loopback.
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::target::{self, RawBehavior, Reply};
use support::{ProxyBuilder, get, raw, send, status_of, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn hello_target() -> target::Target {
    target::http1().route("/", Reply::text("hello")).run().await
}

#[tokio::test]
async fn forwards_a_plain_request() {
    let t = hello_target().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let got = get(p.addr, "/").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "hello");
    assert_eq!(t.hits(), 1);
}

#[tokio::test]
async fn malformed_request_line_is_400_with_alb_page_and_close() {
    let t = hello_target().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    // A version that is not HTTP/1.d (severe: BadVersion).
    let out = raw(p.addr, b"GET /a HTTP/1.x\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&out), 400, "{out}");
    assert!(out.contains("<title>400 Bad Request</title>"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    assert_eq!(t.hits(), 0, "a malformed request is never forwarded");
}

#[tokio::test]
async fn header_over_16_kib_is_400() {
    let t = hello_target().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let mut req = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 16 * 1024 + 1));
    req.extend_from_slice(b"\r\n\r\n");
    let out = raw(p.addr, &req).await;
    assert_eq!(status_of(&out), 400, "{out}");
    assert_eq!(t.hits(), 0);
}

#[tokio::test]
async fn headers_over_64_kib_in_total_are_400_but_just_under_passes() {
    let t = hello_target().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let head = |lines: usize| {
        let mut req = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..lines {
            // 1 KiB per line including CRLF.
            req.extend_from_slice(format!("X-{i:05}: ").as_bytes());
            req.extend(std::iter::repeat_n(b'v', 1024 - 11));
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"Connection: close\r\n\r\n");
        req
    };
    let out = raw(p.addr, &head(63)).await;
    assert_eq!(status_of(&out), 200, "63 KiB of headers pass");
    let out = raw(p.addr, &head(65)).await;
    assert_eq!(status_of(&out), 400, "65 KiB of headers are too many");
    assert_eq!(t.hits(), 1);
}

/// ALB calls Content-Length next to Transfer-Encoding ambiguous: forwarded once, framed as
/// chunked (Content-Length dropped, RFC 9112 §6.3), both connections closed after it. What the
/// client meant to smuggle after the chunked body is never read.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_forwarded_chunked_once_then_closed() {
    let t = target::http1().route("/", Reply::EchoHeaders).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let out = raw(
        p.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("HTTP/1.1 ")).count(),
        1,
        "one response only: {out}"
    );
    let (head, body) = support::split_response(&out);
    assert!(support::head_has(head, "connection", "close"), "{out}");
    assert!(!body.contains("content-length"), "{body}");
    assert!(body.lines().any(|l| l == "connection: close"), "{body}");
    assert_eq!(t.hits(), 1, "the smuggled request never reached the target");
    let counters = p.running.as_ref().expect("running").counters();
    assert_eq!(
        counters
            .desync_non_compliant_requests
            .load(Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn a_request_line_over_16_kib_is_400_and_16_kib_passes() {
    let t = hello_target().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let line = |target_len: usize| {
        // "GET " + target + " HTTP/1.1" is 13 bytes plus the target.
        let mut req = b"GET /".to_vec();
        req.extend(std::iter::repeat_n(b'a', target_len - 1));
        req.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        req
    };
    let out = raw(p.addr, &line(16 * 1024 - 13)).await;
    assert_eq!(status_of(&out), 200, "a 16 KiB request line passes");
    let out = raw(p.addr, &line(16 * 1024 - 12)).await;
    assert_eq!(status_of(&out), 400, "one byte more is too long");
    assert!(out.contains("<title>400 Bad Request</title>"), "{out}");
    assert_eq!(t.hits(), 1);
}

#[tokio::test]
async fn http11_without_host_is_400() {
    let t = hello_target().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let out = raw(p.addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(status_of(&out), 400, "{out}");
    let out = raw(p.addr, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").await;
    assert_eq!(status_of(&out), 400, "{out}");
    assert_eq!(t.hits(), 0);
}

#[tokio::test]
async fn trace_is_405() {
    let t = hello_target().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let got = send(
        p.addr,
        Request::builder()
            .method("TRACE")
            .uri("/")
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .expect("req"),
    )
    .await;
    assert_eq!(got.status, 405);
    assert!(got.body.contains("405 Method Not Allowed"));
    assert_eq!(t.hits(), 0);
}

#[tokio::test]
async fn silent_client_gets_408_after_the_idle_timeout() {
    let t = hello_target().await;
    let p = ProxyBuilder::forward_to(&[t.addr])
        .listener(|l| l.idle_timeout = Duration::from_millis(300))
        .start()
        .await;
    // Connect and send nothing.
    let out = raw(p.addr, b"").await;
    assert_eq!(status_of(&out), 408, "{out}");
    assert!(out.contains("408 Request Timeout"));
}

#[tokio::test]
async fn client_leaving_before_the_response_is_counted_as_460() {
    let t = target::http1()
        .route("/", Reply::Slow(Duration::from_secs(30), "late".into()))
        .run()
        .await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let counters = p.running.as_ref().expect("running").counters().clone();
    let mut tcp = TcpStream::connect(p.addr).await.expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    // Wait until the request reached the target, then leave.
    within(async {
        while t.hits() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    drop(tcp);
    within(async {
        while counters.client_closed_requests.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(counters.client_closed_requests.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn client_aborting_its_upload_is_counted_as_460() {
    let t = target::http1().route("/", Reply::Hang).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let counters = p.running.as_ref().expect("running").counters().clone();
    let mut tcp = TcpStream::connect(p.addr).await.expect("connect");
    tcp.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .expect("write");
    within(async {
        while t.hits() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    drop(tcp);
    within(async {
        while counters.client_closed_requests.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(counters.client_closed_requests.load(Ordering::Relaxed), 1);
    assert_eq!(
        counters.elb_5xx.load(Ordering::Relaxed),
        0,
        "a client that left is not a load balancer error"
    );
}

#[tokio::test]
async fn more_than_30_forwarded_for_addresses_is_463() {
    let t = hello_target().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let xff = (1..=31)
        .map(|i| format!("10.0.0.{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let got = send(
        p.addr,
        Request::get("/")
            .header("host", "x")
            .header("x-forwarded-for", xff)
            .body(Full::new(Bytes::new()))
            .expect("req"),
    )
    .await;
    assert_eq!(got.status.as_u16(), 463);
    assert_eq!(t.hits(), 0);
}

#[tokio::test]
async fn transfer_encoding_gzip_is_501() {
    let t = hello_target().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let out = raw(
        p.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nxxxx",
    )
    .await;
    assert_eq!(status_of(&out), 501, "{out}");
    assert!(out.contains("501 Not Implemented"));
    assert_eq!(t.hits(), 0);
}

#[tokio::test]
async fn http_3_0_on_http1_is_505() {
    let t = hello_target().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let out = raw(p.addr, b"GET / HTTP/3.0\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&out), 505, "{out}");
    assert_eq!(t.hits(), 0);
}

#[tokio::test]
async fn target_reset_is_502() {
    let t = target::raw(RawBehavior::Reset).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let got = get(p.addr, "/").await;
    assert_eq!(got.status, 502);
    assert!(got.body.contains("<title>502 Bad Gateway</title>"));
}

#[tokio::test]
async fn target_garbage_is_502() {
    let t = target::raw(RawBehavior::Garbage).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    assert_eq!(get(p.addr, "/").await.status, 502);
}

#[tokio::test]
async fn target_closing_with_request_outstanding_is_502() {
    let t = target::raw(RawBehavior::CloseAfterRequest).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    assert_eq!(get(p.addr, "/").await.status, 502);
}

#[tokio::test]
async fn group_without_targets_is_503() {
    let p = ProxyBuilder::forward_to(&[]).start().await;
    let got = get(p.addr, "/").await;
    assert_eq!(got.status, 503);
    assert!(
        got.body
            .contains("<title>503 Service Temporarily Unavailable</title>")
    );
}

#[tokio::test]
async fn hanging_target_is_504_after_the_idle_timeout() {
    let t = target::http1().route("/", Reply::Hang).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr])
        .client(|c| c.idle_timeout = Duration::from_millis(300))
        .start()
        .await;
    assert_eq!(get(p.addr, "/").await.status, 504);
}

#[tokio::test]
async fn http1_request_to_an_http2_group_is_464() {
    let t = target::http2().route("/", Reply::text("h2")).run().await;
    let p = ProxyBuilder::new()
        .group_spec("tg,protocol-version=http2", &[t.addr])
        .rules(&["web,default,forward=tg"])
        .start()
        .await;
    assert_eq!(get(p.addr, "/").await.status.as_u16(), 464);
    assert_eq!(t.hits(), 0);
}

#[tokio::test]
async fn keep_alive_connection_serves_several_requests() {
    let t = hello_target().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let mut tcp = TcpStream::connect(p.addr).await.expect("connect");
    within(async {
        tcp.write_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("write");
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.expect("read");
        assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
    })
    .await;
    assert_eq!(t.hits(), 2);
}

/// A target that reads request heads and answers each with 200, `extra` header fields of its own
/// and, as the body, the number of header fields it received. Returns its address and the
/// number of requests it answered.
async fn header_counting_target(extra: usize) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.ends_with(b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                // Lines between the request line and the empty line.
                let fields = String::from_utf8_lossy(&head).split("\r\n").count() - 3;
                let body = fields.to_string();
                let mut reply = b"HTTP/1.1 200 OK\r\nConnection: close\r\n".to_vec();
                for i in 0..extra {
                    reply.extend_from_slice(format!("X-R{i}: v\r\n").as_bytes());
                }
                reply.extend_from_slice(
                    format!("Content-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
                );
                count.fetch_add(1, Ordering::SeqCst);
                let _ = tcp.write_all(&reply).await;
            });
        }
    });
    (addr, answered)
}

/// A request with `Host`, `Connection: close` and `fields - 2` more header fields.
fn request_with_fields(fields: usize) -> Vec<u8> {
    let mut req = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".to_vec();
    for i in 0..fields - 2 {
        req.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req
}

#[tokio::test]
async fn a_request_with_100_header_fields_passes_and_one_with_101_is_400() {
    let (addr, answered) = header_counting_target(0).await;
    let p = ProxyBuilder::forward_to(&[addr]).start().await;
    let out = raw(p.addr, &request_with_fields(100)).await;
    assert_eq!(status_of(&out), 200, "{out}");
    let seen: usize = out
        .rsplit("\r\n\r\n")
        .next()
        .and_then(|b| b.parse().ok())
        .expect("the target's count");
    // The client's 100 and the X-Forwarded-* and X-Amzn-Trace-Id fields the balancer adds.
    assert!(seen > 100, "the target saw {seen} header fields");
    assert_eq!(answered.load(Ordering::SeqCst), 1);

    let out = raw(p.addr, &request_with_fields(101)).await;
    assert_eq!(status_of(&out), 400, "{out}");
    assert_eq!(answered.load(Ordering::SeqCst), 1, "never forwarded");
}

#[tokio::test]
async fn a_response_with_100_header_fields_passes_and_one_with_101_is_502() {
    // The target's own fields are Connection and Content-Length, plus `extra`.
    let (addr, answered) = header_counting_target(98).await;
    let p = ProxyBuilder::forward_to(&[addr]).start().await;
    let got = get(p.addr, "/").await;
    assert_eq!(got.status, 200);
    assert_eq!(answered.load(Ordering::SeqCst), 1);

    let (addr, answered) = header_counting_target(99).await;
    let p = ProxyBuilder::forward_to(&[addr]).start().await;
    let got = get(p.addr, "/").await;
    assert_eq!(got.status, 502);
    assert_eq!(answered.load(Ordering::SeqCst), 1, "the target did answer");
}
