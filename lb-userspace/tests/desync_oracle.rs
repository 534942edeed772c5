//! ALB's desync classification, tier for tier, with AWS's own classifier
//! (`http_desync_guardian`, the crate ALB documents) as the oracle:
//!
//! 1. a table of requests with their tier: the oracle and `lb::proxy::desync::classify` must
//!    both give it, with the same reason;
//! 2. many generated requests (method, target, version and header lines from lists of tricky
//!    pieces): ours and the oracle's tier and reason must agree on every one;
//! 3. the table on the wire, in every mode: what the listener answers, whether the target got
//!    the request, whether the connection closes and whether a pipelined request after it is
//!    read. ALB's table: compliant and acceptable are forwarded (strictest blocks acceptable),
//!    ambiguous is forwarded and both connections closed (strictest blocks it), severe is
//!    blocked with 400 (monitor forwards what it can frame). A request the tier lets through
//!    can still be one the load balancer answers itself: 501 for codings other than chunked and
//!    identity, 505 for versions other than HTTP/1.0 and 1.1 (both as ALB).
mod support;

use http_desync_guardian::RequestSafetyTier;
use http_desync_guardian::request_analyzer::HttpRequestData;
use lb::proxy::desync::{DesyncMode, Tier, classify};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use support::target::{self, Reply};
use support::{ProxyBuilder, head_has, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request of the table.
struct Case {
    /// Request line and headers (without the empty line that ends the head).
    head: &'static str,
    /// The body sent after the head (framed as the client meant it).
    body: &'static str,
    /// The tier ALB gives it.
    tier: Tier,
    /// Status when the mode lets it through: 200 (forwarded), or 501/505 (the load balancer
    /// cannot serve it, as ALB).
    passed: u16,
    /// Severe requests only: what monitor mode does with them (it blocks nothing; what it
    /// cannot frame is a malformed request, 400).
    monitor: u16,
}

const fn case(head: &'static str, body: &'static str, tier: Tier, passed: u16) -> Case {
    Case {
        head,
        body,
        tier,
        passed,
        monitor: passed,
    }
}

const fn severe(head: &'static str, body: &'static str, monitor: u16) -> Case {
    Case {
        head,
        body,
        tier: Tier::Severe,
        passed: 400,
        monitor,
    }
}

use Tier::{Acceptable, Ambiguous, Compliant};

const TABLE: &[Case] = &[
    // Compliant.
    case("GET /t HTTP/1.1\r\nHost: x", "", Compliant, 200),
    case("GET  HTTP/1.1\r\nHost: x", "", Compliant, 200),
    case("GET /caf\u{e9} HTTP/1.1\r\nHost: x", "", Compliant, 200),
    case("OPTIONS * HTTP/1.1\r\nHost: x", "", Compliant, 200),
    case(
        "POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity",
        "0\r\n\r\n",
        Compliant,
        200,
    ),
    case(
        "POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity, chunked",
        "3\r\nabc\r\n0\r\n\r\n",
        Compliant,
        200,
    ),
    case(
        "POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked;foo=bar",
        "0\r\n\r\n",
        Compliant,
        200,
    ),
    case(
        "POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked ",
        "0\r\n\r\n",
        Compliant,
        200,
    ),
    case(
        "POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked",
        "0\r\n\r\n",
        Compliant,
        200,
    ),
    case(
        "POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked",
        "0\r\n\r\n",
        Compliant,
        200,
    ),
    case(
        "POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked",
        "0\r\n\r\n",
        Compliant,
        501,
    ),
    case(
        "POST /t HTTP/1.1\r\nHost: x\r\nContent-Length: 005",
        "hello",
        Compliant,
        200,
    ),
    case(
        "POST /t HTTP/1.1\r\nHost: x\r\nContent-Length: ",
        "",
        Compliant,
        200,
    ),
    case(
        "GET /t HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain;\r\n charset=utf-8",
        "",
        Compliant,
        200,
    ),
    case("GET /t HTTP/3.0\r\nHost: x", "", Compliant, 505),
    case("GET /t HTTX/1.1\r\nHost: x", "", Compliant, 505),
    // Acceptable.
    case("GET /a b HTTP/1.1\r\nHost: x", "", Acceptable, 200),
    case("GET /t HTTP/1.1 \r\nHost: x", "", Acceptable, 200),
    case("GET /t HTTP/1.2\r\nHost: x", "", Acceptable, 505),
    case("GET /t", "", Acceptable, 505),
    case("GET /t HTTP/1.1\nHost: x", "", Acceptable, 200),
    case(
        "GET /t HTTP/1.1\r\nHost: x\r\nX: a\x01b",
        "",
        Acceptable,
        200,
    ),
    case(
        "GET /t HTTP/1.1\r\nHost: x\r\nBad Name: 1",
        "",
        Acceptable,
        200,
    ),
    case(
        "GET /t HTTP/1.1\r\nHost: x\r\nContent-Length: 0",
        "",
        Acceptable,
        200,
    ),
    // Ambiguous.
    case("GET HTTP/1.1\r\nHost: x", "", Ambiguous, 200),
    case("GET /a\tb HTTP/1.1\r\nHost: x", "", Ambiguous, 200),
    case(
        "GET /t HTTP/1.1\r\nHost: x\r\nContent-Length: 3",
        "abc",
        Ambiguous,
        200,
    ),
    case(
        "POST /t HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked",
        "0\r\n\r\n",
        Ambiguous,
        200,
    ),
    case(
        "POST /t HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5",
        "hello",
        Ambiguous,
        200,
    ),
    case(
        "POST /t HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked",
        "0\r\n\r\n",
        Ambiguous,
        200,
    ),
    case(
        "POST /t HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked",
        "",
        Ambiguous,
        200,
    ),
    case(
        "POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked",
        "",
        Ambiguous,
        200,
    ),
    case(
        "GET /t HTTP/1.1\r\nHost: x\r\nNoColonHere",
        "",
        Ambiguous,
        200,
    ),
    case(
        "GET /t HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b",
        "",
        Ambiguous,
        200,
    ),
    case("GET /t HTTP/1.1\r\nHost: x\r\n: empty", "", Ambiguous, 200),
    // Severe.
    severe("G(T /t HTTP/1.1\r\nHost: x", "", 400),
    severe("GET /t HTTP/1.x\r\nHost: x", "", 505),
    severe("GET /t HTTP/1.1\r\nHost: x\r\nX\0Y: 1", "", 200),
    severe("GET /t HTTP/1.1\r\nHost: x\r\nX: a\rb", "", 200),
    severe("GET /a\0b HTTP/1.1\r\nHost: x", "", 200),
    severe(
        "POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked",
        "0\r\n\r\n",
        501,
    ),
    severe(
        "POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked",
        "0\r\n\r\n",
        400,
    ),
    severe(
        "POST /t HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6",
        "hello",
        400,
    ),
    severe(
        "POST /t HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5",
        "hello",
        400,
    ),
    severe(
        "POST /t HTTP/1.1\r\nHost: x\r\nContent-Length: +5",
        "hello",
        400,
    ),
];

/// The head as sent: the table's lines plus the empty line, in the line ending it uses.
fn full_head(case: &Case) -> Vec<u8> {
    let end: &[u8] = if case.head.contains("\r\n") || !case.head.contains('\n') {
        b"\r\n\r\n"
    } else {
        b"\n\n"
    };
    [case.head.as_bytes(), end].concat()
}

fn oracle(head: &[u8]) -> (Tier, String) {
    let verdict = HttpRequestData::analyze_raw_request(head);
    let tier = match verdict.tier {
        RequestSafetyTier::Compliant => Tier::Compliant,
        RequestSafetyTier::Acceptable => Tier::Acceptable,
        RequestSafetyTier::Ambiguous => Tier::Ambiguous,
        RequestSafetyTier::Severe => Tier::Severe,
    };
    (tier, format!("{:?}", verdict.reason))
}

fn ours(head: &[u8]) -> (Tier, String) {
    let c = classify(head);
    let reason = c.reason.map_or("Compliant", |r| r.as_str());
    (c.tier, reason.to_owned())
}

#[test]
fn the_table_has_the_tiers_the_oracle_gives() {
    for case in TABLE {
        let head = full_head(case);
        let want = oracle(&head);
        assert_eq!(want.0, case.tier, "the table is wrong for {:?}", case.head);
        assert_eq!(ours(&head), want, "{:?}", case.head);
    }
}

/// Pieces of requests that exercise every rule of the classifier.
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "G(T", "", "get", "OPTIONS"];
const TARGETS: &[&[u8]] = &[
    b"/",
    b"/a?b=c",
    b"",
    b" /",
    b"/a b",
    b"/a\tb",
    b"/a\x01b",
    b"/a\x7fb",
    b"/caf\xc3\xa9",
    b"/\xff",
    b"*",
    b"http://h/p",
    b"/a\0b",
];
const VERSIONS: &[&[u8]] = &[
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/0.9",
    b"HTTP/1.2",
    b"HTTP/2.0",
    b"HTTP/3",
    b"HTTX/1.1",
    b"HTTP/1.x",
    b"HTTP/11",
    b"HTTP/1.1 ",
    b" HTTP/1.1",
    b"",
    b"http/1.1",
    b"HTTP/1.1\x01",
];
const HEADER_LINES: &[&[u8]] = &[
    b"Host: x",
    b"X-App: 1",
    b"Content-Length: 5",
    b"Content-Length: 0",
    b"Content-Length: 6",
    b"Content-Length: 005",
    b"Content-Length: ",
    b"Content-Length: 5, 5",
    b"Content-Length: -1",
    b"Content-Length: 99999999999999999999999",
    b"content-length:5",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: chunked, gzip, chunked",
    b"Transfer-Encoding: chunked;a=b",
    b"Transfer-Encoding: identity",
    b"Transfer-Encoding: xchunked",
    b"Transfer-Encoding: x-gzip",
    b"Transfer-Encoding: ",
    b"Transfer-Encoding: chunked,",
    b"TRANSFER-ENCODING:\tchunked ",
    b"Transfer_Encoding: chunked",
    b"Transfer-Encoding : chunked",
    b" Transfer-Encoding: chunked",
    b"\x01Transfer-Encoding: chunked",
    b"Transfer-Encod\xc4\xb1ng: chunked",
    b"Tran\xc5\xbffer-Encoding: chunked",
    b"Content_Length: 5",
    b"Content-Length\x00: 5",
    b"Content-Type: a",
    b" folded continuation",
    b"\tfolded: with colon",
    b"NoColon",
    b": empty name",
    b"Bad Name: 1",
    b"X(y): 1",
    b"X: a\x01b",
    b"X: a\x7fb",
    b"X: caf\xc3\xa9",
    b"X: a\0b",
    b"X: a\rb",
    b"X\0Y: 1",
];

#[test]
fn generated_requests_get_the_oracles_tier_and_reason() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut by_tier = [0usize; 4];
    for i in 0..50_000 {
        let mut head = Vec::new();
        head.extend_from_slice(METHODS[rng.random_range(0..METHODS.len())].as_bytes());
        head.push(b' ');
        head.extend_from_slice(TARGETS[rng.random_range(0..TARGETS.len())]);
        // Sometimes no version at all (and no space before it).
        let version = VERSIONS[rng.random_range(0..VERSIONS.len())];
        if !version.is_empty() || rng.random_bool(0.5) {
            head.push(b' ');
        }
        head.extend_from_slice(version);
        let crlf: &[u8] = if rng.random_bool(0.9) { b"\r\n" } else { b"\n" };
        head.extend_from_slice(crlf);
        for _ in 0..rng.random_range(0..6) {
            head.extend_from_slice(HEADER_LINES[rng.random_range(0..HEADER_LINES.len())]);
            head.extend_from_slice(if rng.random_bool(0.95) { crlf } else { b"\n" });
        }
        head.extend_from_slice(crlf);
        let want = oracle(&head);
        assert_eq!(
            ours(&head),
            want,
            "request #{i}: {:?}",
            String::from_utf8_lossy(&head)
        );
        by_tier[want.0 as usize] += 1;
    }
    // The generator must reach every tier, or it proves little.
    assert!(by_tier.iter().all(|&n| n > 1000), "{by_tier:?}");
}

/// What the listener did with one request on the wire.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    status: u16,
    forwarded: bool,
    close: bool,
    /// Responses on the connection (a pipelined probe after the request is answered when the
    /// connection goes on).
    responses: usize,
}

/// Sends `case` followed by a pipelined `GET /probe` on one connection.
async fn send(addr: std::net::SocketAddr, t: &target::Target, case: &Case) -> Seen {
    let before = t.hits();
    let mut bytes = full_head(case);
    bytes.extend_from_slice(case.body.as_bytes());
    bytes.extend_from_slice(b"GET /probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let out = within(async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(&bytes).await.expect("write");
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    })
    .await;
    let status = support::status_of(&out);
    let head = out.split("\r\n\r\n").next().unwrap_or_default();
    Seen {
        status,
        // The target counts a request when its handler runs, before it answers: every request
        // it got was counted by the time its response was read.
        forwarded: t.hits() > before,
        close: head_has(head, "connection", "close"),
        responses: out.matches("HTTP/1.1 ").count(),
    }
}

async fn on_the_wire(mode: DesyncMode) {
    let t = target::http1().route("/", Reply::text("ok")).run().await;
    let p = ProxyBuilder::forward_to(&[t.addr])
        .listener(|l| l.desync_mode = mode)
        .start()
        .await;
    let mut failures = Vec::new();
    for case in TABLE {
        let seen = send(p.addr, &t, case).await;
        let blocked = match mode {
            DesyncMode::Monitor => false,
            DesyncMode::Defensive => case.tier == Tier::Severe,
            DesyncMode::Strictest => case.tier > Tier::Compliant,
        };
        let status = match (blocked, mode) {
            (true, _) => 400,
            (false, DesyncMode::Monitor) => case.monitor,
            (false, _) => case.passed,
        };
        let forwarded = status == 200;
        // The connection closes after the load balancer's own 4xx/5xx, and after an ambiguous
        // request in defensive mode; otherwise the pipelined probe is answered too.
        let close_after_ambiguous = mode == DesyncMode::Defensive && case.tier == Tier::Ambiguous;
        let want = Seen {
            status,
            forwarded,
            close: !forwarded || close_after_ambiguous,
            responses: if forwarded && !close_after_ambiguous {
                2
            } else {
                1
            },
        };
        // In monitor mode, a forwarded non-compliant request may leave the connection out of
        // step with the client (that is what the mode accepts): only the first response counts.
        let got = if mode == DesyncMode::Monitor && case.tier >= Tier::Ambiguous {
            Seen {
                responses: want.responses,
                forwarded: want.forwarded,
                ..seen
            }
        } else {
            seen
        };
        if got != want {
            failures.push(format!("{:?}: got {got:?}, want {want:?}", case.head));
        }
    }
    assert!(
        failures.is_empty(),
        "{mode}: {} of {} requests handled wrongly:\n{}",
        failures.len(),
        TABLE.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn defensive_mode_on_the_wire() {
    on_the_wire(DesyncMode::Defensive).await;
}

#[tokio::test]
async fn strictest_mode_on_the_wire() {
    on_the_wire(DesyncMode::Strictest).await;
}

#[tokio::test]
async fn monitor_mode_on_the_wire() {
    on_the_wire(DesyncMode::Monitor).await;
}
