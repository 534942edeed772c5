//! End to end through the L7 tier: a client keeps one connection to the proxy and sends
//! requests timed to reach the target just as it closes its idle pooled connection (the
//! classic ALB 502). The client must see no 5xx and no connection closed without a response,
//! and the target must never receive a POST body twice, from the first request on (POSTs
//! included, no warm-up). Every third request comes after a short gap and must reuse a pooled
//! connection, so the test fails for a proxy that never pools. `forwarder_keepalive.rs` tests
//! the mechanism at the forwarder; this tests what a client of `lb` experiences.
mod support;
mod support_client;

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Full};
use rand::Rng as _;
use support::ProxyBuilder;
use support_client::{RawBehaviour, RawTarget};

/// The target closes connections idle this long.
const TARGET_IDLE_CLOSE: Duration = Duration::from_millis(200);
/// Measured requests (half POSTs with unique bodies), from the first contact on.
const REQUESTS: usize = 300;
/// Spacing jitter: requests arrive within ±2 ms of the close (the race window on loopback is
/// about 1 ms, so a looser spacing would prove nothing).
const JITTER_MICROS: i64 = 2_000;
/// Every third request comes after this short gap instead: it must reuse a pooled connection.
const SHORT_GAP: Duration = Duration::from_millis(30);

async fn pause() {
    let jitter = rand::rng().random_range(-JITTER_MICROS..=JITTER_MICROS);
    let micros = TARGET_IDLE_CLOSE.as_micros() as i64 + jitter;
    tokio::time::sleep(Duration::from_micros(micros as u64)).await;
}

async fn client_sees_no_failure(advertise_keep_alive: bool) {
    let target = RawTarget::start(RawBehaviour {
        idle_close_after: Some(TARGET_IDLE_CLOSE),
        keep_alive_header: advertise_keep_alive.then(|| "timeout=0.2".to_string()),
        ..RawBehaviour::default()
    })
    .await;
    let proxy = ProxyBuilder::forward_to(&[target.addr]).start().await;

    // One long-lived client connection, as a browser or an SDK would keep.
    let mut sender = support::h1_client(proxy.addr).await;

    let mut failures: Vec<String> = Vec::new();
    let mut posts = 0;
    let mut short_gap_gets = 0;
    for i in 0..REQUESTS {
        let post = i % 2 == 0;
        if i % 3 == 2 {
            tokio::time::sleep(SHORT_GAP).await;
            short_gap_gets += u64::from(!post);
        } else {
            pause().await;
        }
        let (method, path) = if post {
            ("POST", format!("/p/{i}"))
        } else {
            ("GET", format!("/g/{i}"))
        };
        let req = if post {
            posts += 1;
            Request::post(&path)
                .header("host", "app.test")
                .body(Full::new(Bytes::from(format!("body-{i}"))))
        } else {
            Request::get(&path)
                .header("host", "app.test")
                .body(Full::new(Bytes::new()))
        }
        .expect("request");
        if sender.ready().await.is_err() {
            failures.push(format!(
                "request {i}: the proxy closed the client connection"
            ));
            break;
        }
        match tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await {
            Ok(Ok(resp)) => {
                let status = resp.status();
                match tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
                    .await
                {
                    Ok(Ok(body)) => {
                        let body = body.to_bytes();
                        let body = String::from_utf8_lossy(&body);
                        // "METHOD PATH #n on connection c": this request's answer, whole.
                        if status != 200 || !body.starts_with(&format!("{method} {path} #")) {
                            failures.push(format!("request {i}: {status} {body:?}"));
                        }
                    }
                    Ok(Err(e)) => failures.push(format!("request {i}: body broke off: {e}")),
                    Err(_) => failures.push(format!("request {i}: body stalled")),
                }
            }
            Ok(Err(e)) => failures.push(format!("request {i}: closed without a response: {e}")),
            Err(_) => failures.push(format!("request {i}: no response within 10 s")),
        }
    }

    assert!(
        failures.is_empty(),
        "{} failure(s): {failures:#?}",
        failures.len()
    );
    let seen = target.seen();
    let mut bodies: HashMap<Vec<u8>, usize> = HashMap::new();
    for s in seen.iter().filter(|s| s.method == "POST") {
        *bodies.entry(s.body.clone()).or_default() += 1;
    }
    assert_eq!(bodies.len(), posts, "every POST reached the target");
    let twice: Vec<_> = bodies.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "POST bodies delivered more than once: {twice:?}"
    );
    // The race was real: the target closed idle connections during the run (many
    // connections), and the proxy did pool (requests after short gaps reused a connection).
    let connections = seen.iter().map(|s| s.connection).max().unwrap_or(0) + 1;
    assert!(
        connections > 10,
        "only {connections} target connection(s): no race happened"
    );
    let stats = proxy
        .running
        .as_ref()
        .expect("running")
        .pool_stats()
        .pop()
        .expect("one target pool");
    assert!(
        stats.reused >= short_gap_gets,
        "requests after short gaps went out on pooled connections: {stats:?}"
    );
    assert!(
        seen.iter().filter(|s| s.nth_on_connection > 1).count() as u64 >= short_gap_gets,
        "the target saw those requests on reused connections"
    );
    if advertise_keep_alive {
        assert_eq!(
            stats.retried, 0,
            "with the hint no stale connection is ever reused: {stats:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_never_see_stale_keepalive_failures_when_the_target_advertises_its_timeout() {
    client_sees_no_failure(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_never_see_stale_keepalive_failures_when_the_target_advertises_nothing() {
    client_sees_no_failure(false).await;
}

/// Header lines of `head` named `name` (case-insensitive).
fn lines_named<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.split("\r\n")
        .filter(|line| {
            line.split_once(':')
                .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        })
        .collect()
}

/// The retry on a new connection sends the same request as the first attempt, with the
/// headers the balancer adds (`X-Forwarded-For`, `-Proto`, `-Port`, `X-Amzn-Trace-Id`, which
/// our own client writes after the request's map) exactly once: a retry that lost them, or
/// added them a second time, would reach the target as a different request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_carries_the_balancers_headers_once_as_the_first_attempt_did() {
    let target = RawTarget::start(RawBehaviour {
        reset_after_reading_request: Some(2),
        ..RawBehaviour::default()
    })
    .await;
    let proxy = ProxyBuilder::forward_to(&[target.addr]).start().await;
    let mut sender = support::h1_client(proxy.addr).await;
    for path in ["/first", "/again"] {
        let req = Request::get(path)
            .header("host", "app.test")
            .body(Full::new(Bytes::new()))
            .expect("request");
        // The client connection takes the next request once it has finished the last one.
        sender.ready().await.expect("client connection ready");
        let resp = sender.send_request(req).await.expect("answered");
        assert_eq!(resp.status(), 200, "{path}");
        resp.into_body().collect().await.expect("body");
    }

    let seen = target.seen();
    let again: Vec<_> = seen.iter().filter(|s| s.path == "/again").collect();
    assert_eq!(
        again.iter().map(|s| s.connection).collect::<Vec<_>>(),
        vec![0, 1],
        "the second request is read on the first connection (then reset) and retried on a new one: {seen:?}"
    );
    let first = seen
        .iter()
        .find(|s| s.path == "/first")
        .expect("/first seen");
    for attempt in [first, again[0], again[1]] {
        for name in [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-port",
            "x-amzn-trace-id",
        ] {
            assert_eq!(
                lines_named(&attempt.head, name).len(),
                1,
                "{name} once in {} on connection {}:\n{}",
                attempt.path,
                attempt.connection,
                attempt.head
            );
        }
    }
    assert_eq!(
        again[0].head, again[1].head,
        "the retry differs from the first attempt"
    );
}
