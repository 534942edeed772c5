//! Slow and greedy clients: the request-head deadline (`header-timeout`) and the connection
//! limits (`max-connections`, `max-connections-per-source`).
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lb::proxy::server::L7Counters;
use support::target::{self, Reply};
use support::{ProxyBuilder, SAFETY, head_has, split_response, status_of, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn counters(p: &support::Proxy) -> Arc<L7Counters> {
    p.running.as_ref().expect("running").counters().clone()
}

fn get(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Sends the request line and then one header line every `gap`, never finishing the head
/// (for at most [`SAFETY`]); returns everything the proxy sent until it closed.
async fn dribble_head(addr: SocketAddr, gap: Duration, lines: usize, finish: bool) -> String {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await?;
        for i in 0..lines {
            tokio::time::sleep(gap).await;
            wr.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
                .await?;
        }
        if finish {
            wr.write_all(b"Connection: close\r\n\r\n").await?;
        }
        // Keep the write half open until the test ends.
        std::future::pending::<()>().await;
        Ok::<_, std::io::Error>(())
    });
    let mut out = Vec::new();
    let read = tokio::time::timeout(SAFETY, rd.read_to_end(&mut out)).await;
    writer.abort();
    assert!(
        read.is_ok(),
        "the proxy never closed the connection; got {:?}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_request_head_dribbled_past_the_header_timeout_gets_408_and_close() {
    let t = target::http1().route("/", Reply::text("hello")).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr])
        .listener(|l| l.header_timeout = Duration::from_millis(500))
        .start()
        .await;
    // One header line every 100 ms, for far longer than the deadline: the idle timeout (60 s)
    // never fires because bytes keep coming.
    let out = dribble_head(p.addr, Duration::from_millis(100), 200, false).await;
    assert_eq!(status_of(&out), 408, "{out}");
    let (head, body) = split_response(&out);
    assert!(head_has(head, "connection", "close"), "{out}");
    assert!(body.contains("408 Request Timeout"), "{out}");
    assert_eq!(t.hits(), 0, "an incomplete request is never forwarded");
    let c = counters(&p);
    assert_eq!(get(&c.header_timeouts), 1);
    assert_eq!(get(&c.elb_4xx), 1);
}

#[tokio::test]
async fn a_head_completed_within_the_header_timeout_is_served() {
    // Positive control for the test above: the same dribble, finished well within the deadline.
    let t = target::http1().route("/", Reply::text("hello")).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr])
        .listener(|l| l.header_timeout = Duration::from_secs(5))
        .start()
        .await;
    let out = dribble_head(p.addr, Duration::from_millis(100), 3, true).await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert_eq!(get(&counters(&p).header_timeouts), 0);
}

#[tokio::test]
async fn a_slow_request_body_is_not_cut_by_the_header_timeout() {
    let t = target::http1().route("/", Reply::EchoBody).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr])
        .listener(|l| l.header_timeout = Duration::from_millis(200))
        .start()
        .await;
    let mut tcp = TcpStream::connect(p.addr).await.expect("connect");
    tcp.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nConnection: close\r\n\r\n")
        .await
        .expect("head");
    // Eight body bytes, 150 ms apart: 1.2 s in all, six header timeouts.
    for b in b"slowbody" {
        tokio::time::sleep(Duration::from_millis(150)).await;
        tcp.write_all(&[*b]).await.expect("body byte");
    }
    let mut out = String::new();
    within(tcp.read_to_string(&mut out)).await.expect("read");
    assert_eq!(status_of(&out), 200, "{out}");
    assert_eq!(split_response(&out).1, "slowbody");
    assert_eq!(get(&counters(&p).header_timeouts), 0);
}

/// Connects from `source` (a loopback address) to `addr`.
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source address"))
        .expect("bind source");
    socket.connect(addr).await.expect("connect")
}

/// Sends a keep-alive GET on `tcp` and reads its response (the target answers `Content-Length`
/// framed, so the connection stays open).
async fn served(tcp: &mut TcpStream) -> bool {
    within(async {
        if tcp
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .is_err()
        {
            return false;
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.ends_with(b"hello") {
                return got.starts_with(b"HTTP/1.1 200");
            }
        }
    })
    .await
}

/// Whether the proxy closed `tcp` without a byte (read sees EOF or a reset). A connection the
/// proxy serves would block here until its idle timeout (60 s), far beyond the safety net.
async fn closed_at_once(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(SAFETY, tcp.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn connections_over_the_listener_limit_are_closed_at_once_and_counted() {
    let t = target::http1().route("/", Reply::text("hello")).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr])
        .listener(|l| l.max_connections = Some(2))
        .start()
        .await;
    let c = counters(&p);
    let mut first = TcpStream::connect(p.addr).await.expect("first");
    let mut second = TcpStream::connect(p.addr).await.expect("second");
    assert!(served(&mut first).await, "under the limit");
    assert!(served(&mut second).await, "at the limit");

    let mut third = TcpStream::connect(p.addr)
        .await
        .expect("the kernel accepts it");
    assert!(closed_at_once(&mut third).await, "over the limit");
    assert_eq!(get(&c.rejected_connections), 1);
    assert!(
        served(&mut second).await,
        "open connections keep being served"
    );

    // Once a connection ends, its place is free again (the proxy notices the close shortly
    // after, so a few attempts may still be rejected).
    drop(first);
    let mut admitted = None;
    within(async {
        while admitted.is_none() {
            let mut next = TcpStream::connect(p.addr).await.expect("connect");
            if served(&mut next).await {
                admitted = Some(next);
            }
        }
    })
    .await;
    assert_eq!(
        get(&c.new_connections),
        3 + get(&c.rejected_connections),
        "every accepted connection counted once"
    );
}

#[tokio::test]
async fn the_per_source_limit_rejects_only_that_source() {
    let t = target::http1().route("/", Reply::text("hello")).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr])
        .listener(|l| l.max_connections_per_source = Some(1))
        .start()
        .await;
    let mut a1 = connect_from("127.0.0.2", p.addr).await;
    assert!(served(&mut a1).await, "first from 127.0.0.2");
    let mut a2 = connect_from("127.0.0.2", p.addr).await;
    assert!(closed_at_once(&mut a2).await, "second from 127.0.0.2");
    let mut b1 = connect_from("127.0.0.3", p.addr).await;
    assert!(served(&mut b1).await, "another source is not affected");
    assert!(served(&mut a1).await, "the first one is still served");
    assert_eq!(get(&counters(&p).rejected_connections), 1);
}
