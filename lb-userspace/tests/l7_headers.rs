//! Request headers as the target receives them.
mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use lb::headers::XffMode;
use support::target::{self, Reply};
use support::{ProxyBuilder, send};

/// Sends a request with `headers` through a listener in `mode`; returns the target's echo and
/// the listener's port.
async fn echo_with_port(mode: XffMode, headers: &[(&str, &str)]) -> (String, u16) {
    let t = target::http1().route("/", Reply::EchoHeaders).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr])
        .listener(|l| l.xff = mode)
        .start()
        .await;
    let mut req = Request::get("/echo?q=1").header("host", "app.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let got = send(p.addr, req.body(Full::new(Bytes::new())).expect("req")).await;
    assert_eq!(got.status, 200, "{}", got.body);
    (got.body, p.addr.port())
}

/// [`echo_with_port`] without the port.
async fn echo(mode: XffMode, headers: &[(&str, &str)]) -> String {
    echo_with_port(mode, headers).await.0
}

/// The value of header `name` in the target's echo; fails if the target got it more than once.
fn header<'a>(echo: &'a str, name: &str) -> Option<&'a str> {
    let mut values = echo
        .lines()
        .filter_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(": ")));
    let first = values.next();
    assert!(values.next().is_none(), "{name} more than once:\n{echo}");
    first
}

#[tokio::test]
async fn forwarded_for_modes_as_seen_by_the_target() {
    let cases: [(XffMode, Option<&str>, Option<&str>); 6] = [
        (XffMode::Append, None, Some("127.0.0.1")),
        (
            XffMode::Append,
            Some("10.0.0.1"),
            Some("10.0.0.1, 127.0.0.1"),
        ),
        (XffMode::Preserve, None, None),
        (XffMode::Preserve, Some("10.0.0.1"), Some("10.0.0.1")),
        (XffMode::Remove, None, None),
        (XffMode::Remove, Some("10.0.0.1"), None),
    ];
    for (mode, sent, want) in cases {
        // A client-supplied X-Forwarded-Port/Proto must be replaced, not passed on.
        let mut headers: Vec<(&str, &str)> =
            vec![("x-forwarded-port", "1"), ("x-forwarded-proto", "gopher")];
        headers.extend(sent.map(|v| ("x-forwarded-for", v)));
        let (e, port) = echo_with_port(mode, &headers).await;
        assert_eq!(
            header(&e, "x-forwarded-for"),
            want,
            "{mode:?} {sent:?}\n{e}"
        );
        assert_eq!(header(&e, "x-forwarded-proto"), Some("http"), "{e}");
        assert_eq!(
            header(&e, "x-forwarded-port"),
            Some(port.to_string().as_str()),
            "the port of the listener the client connected to: {e}"
        );
    }
}

#[tokio::test]
async fn host_path_and_query_are_preserved_and_hop_by_hop_headers_dropped() {
    let e = echo(
        XffMode::Append,
        &[
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("x-app", "kept"),
        ],
    )
    .await;
    assert!(e.starts_with("GET /echo?q=1 HTTP/1.1"), "{e}");
    assert_eq!(header(&e, "host"), Some("app.test"), "{e}");
    assert_eq!(header(&e, "x-app"), Some("kept"), "{e}");
    assert_eq!(header(&e, "keep-alive"), None, "{e}");
    assert_eq!(
        header(&e, "x-secret"),
        None,
        "headers named in Connection are hop-by-hop: {e}"
    );
}

#[tokio::test]
async fn trace_id_is_created_or_extended() {
    let secs = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    };
    let before = secs();
    let e = echo(XffMode::Append, &[]).await;
    let after = secs();
    let id = header(&e, "x-amzn-trace-id").expect("trace id");
    let root = id.strip_prefix("Root=1-").expect("Root=1-");
    let (epoch, random) = root.split_once('-').expect("two parts");
    assert_eq!(epoch.len(), 8, "{id}");
    assert_eq!(random.len(), 24, "{id}");
    assert!(
        epoch
            .chars()
            .chain(random.chars())
            .all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    // The epoch seconds are the request's (the proxy takes them from when the request
    // arrived): between the clock read before it was sent and the one after its answer.
    let epoch = u64::from_str_radix(epoch, 16).expect("hex");
    assert!(
        (before..=after).contains(&epoch),
        "{before} <= {epoch} <= {after}: {id}"
    );

    let sent = "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1";
    let e = echo(XffMode::Append, &[("x-amzn-trace-id", sent)]).await;
    let id = header(&e, "x-amzn-trace-id").expect("trace id");
    assert!(id.starts_with("Self=1-"), "{id}");
    assert!(id.ends_with(sent), "the client's fields are kept: {id}");
}

/// A client cannot delete what the load balancer adds by naming it in `Connection`: the
/// headers a request's `Connection` names are the client's own hop-by-hop headers, removed
/// before `X-Forwarded-*` and `X-Amzn-Trace-Id` are written (the client's own copies go).
#[tokio::test]
async fn headers_the_balancer_adds_survive_a_connection_header_naming_them() {
    let e = echo(
        XffMode::Append,
        &[
            (
                "connection",
                "x-forwarded-for, X-Forwarded-Proto, x-forwarded-port, x-amzn-trace-id",
            ),
            ("x-forwarded-for", "10.9.9.9"),
            (
                "x-amzn-trace-id",
                "Root=1-5759e988-bd862e3fe1be46a994272793",
            ),
        ],
    )
    .await;
    assert_eq!(
        header(&e, "x-forwarded-for"),
        Some("127.0.0.1"),
        "the client's X-Forwarded-For was hop-by-hop (removed), ours is added: {e}"
    );
    assert_eq!(header(&e, "x-forwarded-proto"), Some("http"), "{e}");
    assert!(header(&e, "x-forwarded-port").is_some(), "{e}");
    let id = header(&e, "x-amzn-trace-id").expect("a trace id of our own");
    assert!(
        id.starts_with("Root=1-") && !id.contains("5759e988"),
        "the client's trace id was hop-by-hop, a new one is made: {id}"
    );
}

/// The client's `X-Forwarded-For` entry is written once per connection and reused: on one
/// connection, a request without the header gets the client alone, one with it gets the client
/// appended, and the next one without it gets the client alone again.
#[tokio::test]
async fn forwarded_for_on_one_connection_with_and_without_the_clients_own() {
    use http_body_util::BodyExt as _;

    let t = target::http1().route("/", Reply::EchoHeaders).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr])
        .listener(|l| l.xff = XffMode::Append)
        .start()
        .await;
    let requests: [(Option<&str>, &str); 3] = [
        (None, "127.0.0.1"),
        (Some("10.0.0.1"), "10.0.0.1, 127.0.0.1"),
        (None, "127.0.0.1"),
    ];
    support::within(async {
        // One connection: every request goes over this one handshake's sender.
        let mut sender = support::h1_client(p.addr).await;
        for (i, (sent, want)) in requests.into_iter().enumerate() {
            let mut req = Request::get("/echo").header("host", "app.test");
            if let Some(xff) = sent {
                req = req.header("x-forwarded-for", xff);
            }
            let resp = sender
                .send_request(req.body(Full::new(Bytes::new())).expect("req"))
                .await
                .unwrap_or_else(|e| panic!("request {i} on the same connection: {e}"));
            assert_eq!(resp.status(), 200, "request {i}");
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            let e = String::from_utf8_lossy(&body);
            assert_eq!(
                header(&e, "x-forwarded-for"),
                Some(want),
                "request {i}\n{e}"
            );
        }
    })
    .await;
}
