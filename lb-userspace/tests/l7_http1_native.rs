//! The native HTTP/1 path (`server/h1.rs`): requests served by the connection's own loop, not
//! hyper. Every test checks the `http1_native_requests` counter, so a silent fall-back to hyper
//! cannot pass for the native path; one test runs the same request with `http1=hyper` as the
//! counter's positive control.
mod support;

use std::sync::atomic::Ordering;

use support::target::{self, Reply};
use support::{ProxyBuilder, head_has, raw, split_response, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn native_requests(p: &support::Proxy) -> u64 {
    p.running
        .as_ref()
        .expect("running")
        .counters()
        .http1_native_requests
        .get()
}

fn handoffs(p: &support::Proxy) -> u64 {
    p.running
        .as_ref()
        .expect("running")
        .counters()
        .http1_handoffs
        .load(Ordering::Relaxed)
}

/// Reads one response head (through the empty line) byte by byte.
async fn read_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.expect("response head");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The value of header `name` in a raw head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        l.split_once(':')
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    })
}

/// Reads one response with a `content-length` body.
async fn read_response(tcp: &mut TcpStream) -> (String, String) {
    let head = read_head(tcp).await;
    let len: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no content-length in {head:?}"));
    let mut body = vec![0u8; len];
    tcp.read_exact(&mut body).await.expect("body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_by_the_native_path() {
    let t = target::http1().route("/", Reply::EchoHeaders).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    let out = raw(
        p.addr,
        b"GET /one HTTP/1.1\r\nHost: app.test\r\n\r\n\
GET /two HTTP/1.1\r\nHost: app.test\r\n\r\n\
GET /three HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let one = out.find("GET /one").expect("first answered");
    let two = out.find("GET /two").expect("second answered");
    let three = out.find("GET /three").expect("third answered");
    assert!(one < two && two < three, "{out}");
    assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{out}");
    let last_head = out.rsplit("HTTP/1.1 200 OK\r\n").next().expect("last");
    assert!(head_has(last_head, "connection", "close"), "{out}");
    assert_eq!(native_requests(&p), 3);
    assert_eq!(handoffs(&p), 0);
}

#[tokio::test]
async fn the_hyper_path_leaves_the_native_counter_alone() {
    let t = target::http1().route("/", Reply::text("hello")).run().await;
    for native in [false, true] {
        let p = ProxyBuilder::forward_to(&[t.addr])
            .listener(|l| l.http1_native = native)
            .start()
            .await;
        let out = raw(
            p.addr,
            b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
        )
        .await;
        let (head, body) = split_response(&out);
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert_eq!(body, "hello");
        // Both paths write the same head (the date aside).
        let lines: Vec<&str> = head
            .lines()
            .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
            .collect();
        assert_eq!(
            lines,
            ["HTTP/1.1 200 OK", "content-length: 5", "connection: close"],
            "native={native}"
        );
        assert!(header(head, "date").is_some(), "{head}");
        assert_eq!(native_requests(&p), u64::from(native), "native={native}");
    }
}

#[tokio::test]
async fn a_chunked_request_body_reaches_the_target_and_a_chunked_response_comes_back() {
    // The target's body is streamed (no length): the client gets it chunked.
    let (reply, gate) = Reply::gated("first,", "second");
    gate.release();
    let t = target::http1()
        .route("/echo", Reply::EchoBody)
        .route("/stream", reply)
        .run()
        .await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    within(async {
        let mut tcp = TcpStream::connect(p.addr).await.expect("connect");
        tcp.write_all(
            b"POST /echo HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n\
5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n",
        )
        .await
        .expect("write");
        let (head, body) = read_response(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, "hello, world");
        tcp.write_all(b"GET /stream HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut rest = Vec::new();
        tcp.read_to_end(&mut rest).await.expect("read");
        let rest = String::from_utf8_lossy(&rest).into_owned();
        let (head, body) = split_response(&rest);
        assert!(head_has(head, "transfer-encoding", "chunked"), "{rest}");
        assert!(header(head, "content-length").is_none(), "{rest}");
        assert_eq!(body, "6\r\nfirst,\r\n6\r\nsecond\r\n0\r\n\r\n");
    })
    .await;
    assert_eq!(native_requests(&p), 2);
}

/// A target that answers every request `304 Not Modified` (keep-alive); fixed responses
/// cannot be 3xx.
async fn not_modified_target() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        if tcp
                            .write_all(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn head_204_and_304_have_no_body_and_a_get_has_one() {
    let t = target::http1().route("/", Reply::text("hello")).run().await;
    let (not_modified, nm_task) = not_modified_target().await;
    let p = ProxyBuilder::forward_to(&[t.addr])
        .group("nm", &[not_modified])
        .rules(&[
            "web,priority=1,path=/nc,fixed-response=204",
            "web,priority=2,path=/nm,forward=nm",
            "web,default,forward=tg",
        ])
        .start()
        .await;
    // All on one connection: a body where none belongs would be read as the next response.
    let out = raw(
        p.addr,
        b"HEAD / HTTP/1.1\r\nHost: app.test\r\n\r\n\
GET /nc HTTP/1.1\r\nHost: app.test\r\n\r\n\
GET /nm HTTP/1.1\r\nHost: app.test\r\n\r\n\
GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let responses: Vec<&str> = out.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(responses.len(), 4, "{out}");
    // HEAD: the target's length, no body.
    assert!(responses[0].starts_with("200 OK\r\n"), "{out}");
    assert!(head_has(responses[0], "content-length", "5"), "{out}");
    assert!(responses[0].ends_with("\r\n\r\n"), "{out}");
    assert!(responses[1].starts_with("204 No Content\r\n"), "{out}");
    assert!(responses[1].ends_with("\r\n\r\n"), "{out}");
    assert!(header(responses[1], "content-length").is_none(), "{out}");
    assert!(responses[2].starts_with("304 Not Modified\r\n"), "{out}");
    assert!(responses[2].ends_with("\r\n\r\n"), "{out}");
    // Positive control: the GET has its body.
    assert!(responses[3].ends_with("\r\n\r\nhello"), "{out}");
    assert_eq!(native_requests(&p), 4);
    nm_task.abort();
}

#[tokio::test]
async fn http10_keeps_the_connection_only_when_asked() {
    let t = target::http1().route("/", Reply::text("hello")).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    within(async {
        let mut tcp = TcpStream::connect(p.addr).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await
            .expect("write");
        let (head, body) = read_response(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
        assert!(head_has(&head, "connection", "keep-alive"), "{head}");
        assert_eq!(body, "hello");
        // Still open: a second HTTP/1.0 request without keep-alive is answered, then closed.
        tcp.write_all(b"GET / HTTP/1.0\r\n\r\n")
            .await
            .expect("write");
        let mut rest = Vec::new();
        tcp.read_to_end(&mut rest).await.expect("read to close");
        let rest = String::from_utf8_lossy(&rest).into_owned();
        let (head, body) = split_response(&rest);
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{rest}");
        assert!(!head_has(head, "connection", "keep-alive"), "{rest}");
        assert_eq!(body, "hello");
    })
    .await;
    assert_eq!(native_requests(&p), 2);
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let t = target::http1().route("/", Reply::EchoBody).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    within(async {
        let mut tcp = TcpStream::connect(p.addr).await.expect("connect");
        tcp.write_all(
            b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .expect("write head");
        // The body is only sent once the 100 arrived.
        let interim = read_head(&mut tcp).await;
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
        tcp.write_all(b"hello").await.expect("write body");
        let (head, body) = read_response(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(body, "hello");
    })
    .await;
    assert_eq!(native_requests(&p), 1);
}

#[tokio::test]
async fn a_websocket_upgrade_after_a_request_is_handed_to_hyper_and_works() {
    let t = target::http1()
        .route("/chat", Reply::UpgradeEcho)
        .route("/", Reply::text("hello"))
        .run()
        .await;
    let p = ProxyBuilder::forward_to(&[t.addr]).start().await;
    within(async {
        let mut tcp = TcpStream::connect(p.addr).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .expect("write");
        let (_, body) = read_response(&mut tcp).await;
        assert_eq!(body, "hello");
        tcp.write_all(
            b"GET /chat HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .expect("write upgrade");
        let head = read_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        tcp.write_all(b"ping").await.expect("frame");
        let mut echo = [0u8; 4];
        tcp.read_exact(&mut echo).await.expect("echo");
        assert_eq!(&echo, b"ping");
    })
    .await;
    assert_eq!(native_requests(&p), 1, "the first request was native");
    assert_eq!(handoffs(&p), 1, "the upgrade went to hyper");
}

#[tokio::test]
async fn a_rejected_head_is_answered_by_the_native_path_and_closes() {
    let p = ProxyBuilder::new().start().await;
    let out = raw(
        p.addr,
        b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "nothing after: {out}");
    let (head, _) = split_response(&out);
    assert!(head_has(head, "connection", "close"), "{out}");
    assert_eq!(native_requests(&p), 1);
}

#[tokio::test]
async fn an_unread_request_body_is_skipped_and_the_connection_serves_the_next_request() {
    let p = ProxyBuilder::new()
        .rules(&["web,default,fixed-response=200,body=fixed"])
        .start()
        .await;
    // The fixed response never reads the POST's body; the next request must still be found
    // after it (and the body's bytes never taken for a request).
    let out = raw(
        p.addr,
        b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 28\r\n\r\n\
GET /x HTTP/1.1\r\nHost: a\r\n\r\n\
GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{out}");
    assert!(out.ends_with("\r\n\r\nfixed"), "{out}");
    assert_eq!(
        native_requests(&p),
        2,
        "the body was not parsed as a request"
    );
}
