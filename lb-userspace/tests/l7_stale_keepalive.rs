//! End to end through the L7 tier: a client keeps one connection to the proxy and sends
//! requests timed to reach the target just as it closes its idle pooled connection (the
//! classic ALB 502). The client must see no 5xx and no connection closed without a response,
//! and the target must never receive a POST body twice. `forwarder_keepalive.rs` tests the
//! mechanism at the forwarder; this tests what a client of `lb` experiences.
mod support;
mod support_client;

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rand::Rng as _;
use support::ProxyBuilder;
use support_client::{RawBehaviour, RawTarget};
use tokio::net::TcpStream;

/// The target closes connections idle this long.
const TARGET_IDLE_CLOSE: Duration = Duration::from_millis(200);
/// Measured requests (half POSTs with unique bodies).
const REQUESTS: usize = 300;
/// Spacing jitter: requests arrive within ±2 ms of the close (the race window on loopback is
/// about 1 ms, so a looser spacing would prove nothing).
const JITTER_MICROS: i64 = 2_000;
/// Without a Keep-Alive hint the proxy must first see the target close one idle connection;
/// GETs (safely retryable) go first, at the same spacing.
const WARM_UP_GETS: usize = 20;

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
    let tcp = TcpStream::connect(proxy.addr)
        .await
        .expect("connect to proxy");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);

    let warm_up = if advertise_keep_alive {
        0
    } else {
        WARM_UP_GETS
    };
    let mut failures: Vec<String> = Vec::new();
    let mut posts = 0;
    for i in 0..warm_up + REQUESTS {
        pause().await;
        let post = i >= warm_up && i % 2 == 0;
        let req = if post {
            posts += 1;
            Request::post(format!("/p/{i}"))
                .header("host", "app.test")
                .body(Full::new(Bytes::from(format!("body-{i}"))))
        } else {
            Request::get(format!("/g/{i}"))
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
                let _ = resp.into_body().collect().await;
                if status.is_server_error() {
                    failures.push(format!("request {i}: {status}"));
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
    let mut bodies: HashMap<Vec<u8>, usize> = HashMap::new();
    for s in target.seen().into_iter().filter(|s| s.method == "POST") {
        *bodies.entry(s.body).or_default() += 1;
    }
    assert_eq!(bodies.len(), posts, "every POST reached the target");
    let twice: Vec<_> = bodies.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "POST bodies delivered more than once: {twice:?}"
    );
    // The target really did close idle connections during the run, so the race was real.
    let connections = target
        .seen()
        .iter()
        .map(|s| s.connection)
        .max()
        .unwrap_or(0)
        + 1;
    assert!(
        connections > 10,
        "only {connections} target connection(s): no race happened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_never_see_stale_keepalive_failures_when_the_target_advertises_its_timeout() {
    client_sees_no_failure(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_never_see_stale_keepalive_failures_when_the_target_advertises_nothing() {
    client_sees_no_failure(false).await;
}
