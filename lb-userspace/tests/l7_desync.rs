//! Desync mitigation as seen on the wire, per mode.
mod support;

use std::sync::atomic::Ordering;

use lb::proxy::desync::DesyncMode;
use support::target::{self, Reply};
use support::{ProxyBuilder, head_has, raw, split_response, status_of};

async fn proxy(mode: DesyncMode) -> (target::Target, support::Proxy) {
    let t = target::http1().route("/", Reply::EchoHeaders).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr])
        .listener(|l| l.desync_mode = mode)
        .start()
        .await;
    (t, p)
}

fn non_compliant(p: &support::Proxy) -> u64 {
    p.running
        .as_ref()
        .expect("running")
        .counters()
        .desync_non_compliant_requests
        .load(Ordering::Relaxed)
}

/// GET with a body: ambiguous. Defensive forwards it, answers with `Connection: close`, and the
/// request pipelined after it is never read.
#[tokio::test]
async fn defensive_forwards_ambiguous_then_closes() {
    let (t, p) = proxy(DesyncMode::Defensive).await;
    let out = raw(
        p.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /second HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&out), 200, "{out}");
    let (head, body) = split_response(&out);
    assert!(
        head_has(head, "connection", "close"),
        "the response head says the connection closes: {out}"
    );
    assert_eq!(out.matches("HTTP/1.1 200").count(), 1, "{out}");
    // The target saw the request with `Connection: close` so it does not reuse the connection
    // (the echo target writes the headers it received into the body, one per line).
    assert!(
        body.lines().any(|l| l == "connection: close"),
        "target got: {body}"
    );
    assert_eq!(t.hits(), 1);
    assert_eq!(non_compliant(&p), 1);
}

#[tokio::test]
async fn defensive_blocks_obfuscated_transfer_encoding() {
    for te in ["chunked ", "xchunked", "chunked, identity", "\tchunked"] {
        let (t, p) = proxy(DesyncMode::Defensive).await;
        let req = format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:{te}\r\n\r\n0\r\n\r\n");
        let out = raw(p.addr, req.as_bytes()).await;
        assert_eq!(status_of(&out), 400, "{te:?}: {out}");
        assert_eq!(t.hits(), 0, "{te:?}");
    }
}

#[tokio::test]
async fn defensive_blocks_bad_content_length() {
    for cl in [
        "Content-Length: 1\r\nContent-Length: 2",
        "Content-Length: abc",
        "Content-Length: 1, 1",
    ] {
        let (t, p) = proxy(DesyncMode::Defensive).await;
        let req = format!("POST / HTTP/1.1\r\nHost: x\r\n{cl}\r\n\r\nab");
        let out = raw(p.addr, req.as_bytes()).await;
        assert_eq!(status_of(&out), 400, "{cl:?}: {out}");
        assert_eq!(t.hits(), 0, "{cl:?}");
    }
}

#[tokio::test]
async fn invalid_header_name_and_nul_in_value_are_400() {
    for header in ["Bad Name: 1", "X(y): 1", "X: a\0b"] {
        let (t, p) = proxy(DesyncMode::Defensive).await;
        let req = format!("GET / HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n");
        let out = raw(p.addr, req.as_bytes()).await;
        assert_eq!(status_of(&out), 400, "{header:?}: {out}");
        assert_eq!(t.hits(), 0, "{header:?}");
    }
}

#[tokio::test]
async fn strictest_blocks_acceptable_requests() {
    let (t, p) = proxy(DesyncMode::Strictest).await;
    // GET with Content-Length: 0 is only "acceptable".
    let out = raw(
        p.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&out), 400, "{out}");
    assert_eq!(t.hits(), 0);
}

#[tokio::test]
async fn monitor_forwards_ambiguous_without_closing() {
    let (t, p) = proxy(DesyncMode::Monitor).await;
    let out = raw(
        p.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
    assert_eq!(t.hits(), 2);
    assert_eq!(non_compliant(&p), 1, "still counted");
}

/// In monitor mode CL+TE is forwarded the way hyper frames it (chunked, Content-Length dropped),
/// so the smuggled second request is body, never a request of its own.
#[tokio::test]
async fn monitor_forwards_cl_te_as_chunked_only() {
    let (t, p) = proxy(DesyncMode::Monitor).await;
    let out = raw(
        p.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&out), 200, "{out}");
    assert!(!out.contains("content-length: 40"), "{out}");
    assert_eq!(t.hits(), 1);
}
