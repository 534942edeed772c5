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

/// Severe `Transfer-Encoding` forms (unknown coding, `chunked` twice) are blocked; the table in
/// `desync_oracle.rs` covers the compliant forms (lists, parameters, whitespace) ALB forwards.
#[tokio::test]
async fn defensive_blocks_severe_transfer_encoding() {
    for te in ["xchunked", "chunked, chunked", "x-gzip", ""] {
        let (t, p) = proxy(DesyncMode::Defensive).await;
        let req = format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {te}\r\n\r\n0\r\n\r\n");
        let out = raw(p.addr, req.as_bytes()).await;
        assert_eq!(status_of(&out), 400, "{te:?}: {out}");
        assert_eq!(t.hits(), 0, "{te:?}");
        assert_eq!(non_compliant(&p), 1, "{te:?}");
    }
}

/// Positive control for the test above, and the forms the issue found rejected although ALB
/// calls them compliant.
#[tokio::test]
async fn defensive_forwards_compliant_transfer_encoding_lists_and_parameters() {
    for te in [
        "chunked ",
        "\tchunked",
        "chunked, identity",
        "chunked;ext=1",
    ] {
        let (t, p) = proxy(DesyncMode::Defensive).await;
        let req = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:{te}\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        );
        let out = raw(p.addr, req.as_bytes()).await;
        assert_eq!(status_of(&out), 200, "{te:?}: {out}");
        let (_, body) = split_response(&out);
        assert!(
            body.lines().any(|l| l == "transfer-encoding: chunked"),
            "the target got plain chunked framing: {body}"
        );
        assert_eq!(t.hits(), 1, "{te:?}");
        assert_eq!(non_compliant(&p), 0, "{te:?}");
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
async fn nul_or_cr_in_a_header_is_400() {
    for header in ["X: a\0b", "X\0Y: 1", "X: a\rb"] {
        let (t, p) = proxy(DesyncMode::Defensive).await;
        let req = format!("GET / HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n");
        let out = raw(p.addr, req.as_bytes()).await;
        assert_eq!(status_of(&out), 400, "{header:?}: {out}");
        assert_eq!(t.hits(), 0, "{header:?}");
    }
}

/// Header names with non-token bytes are only "acceptable" to ALB: forwarded. hyper cannot
/// carry such a name, so the line is dropped (as ALB's drop_invalid_header_fields does) and
/// the rest of the request goes through.
#[tokio::test]
async fn invalid_header_names_are_dropped_and_the_request_forwarded() {
    for header in ["Bad Name: 1", "X(y): 1", "X-Ctl: a\x01b"] {
        let (t, p) = proxy(DesyncMode::Defensive).await;
        let req = format!(
            "GET / HTTP/1.1\r\nHost: x\r\n{header}\r\nX-Kept: yes\r\nConnection: close\r\n\r\n"
        );
        let out = raw(p.addr, req.as_bytes()).await;
        assert_eq!(status_of(&out), 200, "{header:?}: {out}");
        let (_, body) = split_response(&out);
        assert!(body.lines().any(|l| l == "x-kept: yes"), "{body}");
        assert!(
            !body.contains("bad name") && !body.contains("x(y)") && !body.contains("x-ctl"),
            "{body}"
        );
        assert_eq!(t.hits(), 1, "{header:?}");
        assert_eq!(non_compliant(&p), 1, "{header:?}");
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
    let (head, _) = split_response(&out);
    assert!(
        !head_has(head, "connection", "close"),
        "the first response keeps the connection: {out}"
    );
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
