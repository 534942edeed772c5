//! Target-group algorithms and stickiness end to end.
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use lb::targets::TargetAddr;
use support::target::{self, Reply};
use support::{ProxyBuilder, send, within};

async fn named(names: &[&str]) -> Vec<target::Target> {
    let mut out = Vec::new();
    for n in names {
        out.push(target::http1().route("/", Reply::text(n)).run().await);
    }
    out
}

fn addrs(ts: &[target::Target]) -> Vec<std::net::SocketAddr> {
    ts.iter().map(|t| t.addr).collect()
}

#[tokio::test]
async fn round_robin_is_exact_over_a_cycle() {
    let ts = named(&["a", "b", "c"]).await;
    let p = ProxyBuilder::new()
        .group("tg", &addrs(&ts))
        .rules(&["web,default,forward=tg"])
        .start()
        .await;
    let bodies = support::get_many(p.addr, "/", 30).await;
    for name in ["a", "b", "c"] {
        assert_eq!(
            bodies.iter().filter(|b| b.as_str() == name).count(),
            10,
            "{bodies:?}"
        );
    }
    for i in 3..bodies.len() {
        assert_eq!(
            bodies[i],
            bodies[i - 3],
            "the order repeats every cycle: {bodies:?}"
        );
    }
}

#[tokio::test]
async fn least_outstanding_avoids_the_busy_target() {
    let slow = target::http1()
        .route("/", Reply::Slow(Duration::from_secs(30), "slow".into()))
        .run()
        .await;
    let fast = target::http1().route("/", Reply::text("fast")).run().await;
    let p = ProxyBuilder::new()
        .group_spec(
            "tg,algorithm=least_outstanding_requests",
            &[slow.addr, fast.addr],
        )
        .rules(&["web,default,forward=tg"])
        .start()
        .await;
    // Occupy the slow target with one outstanding request (bounded tries: ties go round robin).
    let mut pending = Vec::new();
    for _ in 0..4 {
        if slow.hits() > 0 {
            break;
        }
        let addr = p.addr;
        pending.push(tokio::spawn(async move { support::get(addr, "/").await }));
        within(async {
            while slow.hits() + fast.hits() < pending.len() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }
    assert_eq!(slow.hits(), 1);
    let bodies = support::get_many(p.addr, "/", 20).await;
    assert!(bodies.iter().all(|b| b == "fast"), "{bodies:?}");
    assert_eq!(slow.hits(), 1, "no second request went to the busy target");
}

#[tokio::test]
async fn weighted_random_shares_follow_weights() {
    let ts = named(&["heavy", "light"]).await;
    let p = ProxyBuilder::new()
        .group_targets(
            "tg,algorithm=weighted_random",
            vec![
                TargetAddr::with_weight(ts[0].addr, 3),
                TargetAddr::with_weight(ts[1].addr, 1),
            ],
        )
        .rules(&["web,default,forward=tg"])
        .start()
        .await;
    let bodies = support::get_many(p.addr, "/", 2000).await;
    let heavy = bodies.iter().filter(|b| b.as_str() == "heavy").count() * 100 / bodies.len();
    assert!((70..=80).contains(&heavy), "heavy got {heavy}%");
}

#[tokio::test]
async fn lb_cookie_pins_a_client_to_one_target() {
    let ts = named(&["a", "b", "c"]).await;
    let p = ProxyBuilder::new()
        .group_spec("tg,stickiness=lb_cookie", &addrs(&ts))
        .rules(&["web,default,forward=tg"])
        .start()
        .await;
    let first = support::get(p.addr, "/").await;
    let cookie = first
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("AWSALB="))
        .expect("AWSALB cookie")
        .split(';')
        .next()
        .expect("pair")
        .to_owned();
    for _ in 0..50 {
        let got = send(
            p.addr,
            Request::get("/")
                .header("host", "x")
                .header("cookie", &cookie)
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await;
        assert_eq!(got.body, first.body);
    }
}
