//! Listener rules end to end: precedence, each condition type, each action.
mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::target::{self, Reply};
use support::{ProxyBuilder, send};

struct Case {
    method: &'static str,
    host: &'static str,
    path: &'static str,
    header: Option<(&'static str, &'static str)>,
    status: u16,
    body: &'static str,
}

const fn case(
    method: &'static str,
    host: &'static str,
    path: &'static str,
    status: u16,
    body: &'static str,
) -> Case {
    Case {
        method,
        host,
        path,
        header: None,
        status,
        body,
    }
}

#[tokio::test]
async fn rules_are_evaluated_by_priority_with_every_condition_type() {
    let api = target::http1().route("/", Reply::text("api")).run().await;
    let web = target::http1().route("/", Reply::text("web")).run().await;
    let canary = target::http1()
        .route("/", Reply::text("canary"))
        .run()
        .await;
    let p = ProxyBuilder::new()
        .group("api", &[api.addr])
        .group("web", &[web.addr])
        .group("canary", &[canary.addr])
        .rules(&[
            "web,priority=5,host=admin.test,fixed-response=403,content-type=text/plain,body=admins only",
            "web,priority=10,path=/api/*,forward=api",
            "web,priority=20,header=X-Canary:yes,forward=canary",
            "web,priority=30,method=DELETE,fixed-response=405,content-type=text/plain,body=no deletes",
            "web,priority=40,query=version:v2,forward=canary",
            "web,priority=50,source-ip=10.0.0.0/8,fixed-response=403,content-type=text/plain,body=ten",
            "web,priority=60,source-ip=127.0.0.0/8,path=/local,fixed-response=200,content-type=text/plain,body=local",
            "web,default,forward=web",
        ])
        .start()
        .await;
    let cases = [
        case("GET", "app.test", "/", 200, "web"),
        case("GET", "app.test", "/api/users", 200, "api"),
        // Priority 5 (host) beats priority 10 (path).
        case("GET", "ADMIN.test", "/api/users", 403, "admins only"),
        // Path patterns are case sensitive and never see the query.
        case("GET", "app.test", "/API/users", 200, "web"),
        case("GET", "app.test", "/x?p=/api/", 200, "web"),
        Case {
            header: Some(("x-canary", "YES")),
            ..case("GET", "app.test", "/", 200, "canary")
        },
        case("DELETE", "app.test", "/thing", 405, "no deletes"),
        // Methods are case sensitive.
        case("delete", "app.test", "/thing", 200, "web"),
        case("GET", "app.test", "/q?a=1&Version=V2", 200, "canary"),
        // source-ip uses the TCP peer (127.0.0.1), never X-Forwarded-For.
        Case {
            header: Some(("x-forwarded-for", "10.1.1.1")),
            ..case("GET", "app.test", "/local", 200, "local")
        },
    ];
    for c in cases {
        let mut req = Request::builder()
            .method(c.method)
            .uri(c.path)
            .header("host", c.host);
        if let Some((k, v)) = c.header {
            req = req.header(k, v);
        }
        let got = send(p.addr, req.body(Full::new(Bytes::new())).expect("req")).await;
        assert_eq!(
            (got.status.as_u16(), got.body.as_str()),
            (c.status, c.body),
            "{} {} {}",
            c.method,
            c.host,
            c.path
        );
    }
}

#[tokio::test]
async fn redirect_expands_placeholders() {
    let p = ProxyBuilder::new()
        .rules(&[
            "web,priority=1,path=/old/*,redirect=https://#{host}:8443/new/#{path}?#{query},status=301",
            "web,default,redirect-protocol=HTTPS,redirect-port=443,status=302",
        ])
        .start()
        .await;
    let got = send(
        p.addr,
        Request::get("/old/a/b?x=1")
            .header("host", "shop.test:80")
            .body(Full::new(Bytes::new()))
            .expect("req"),
    )
    .await;
    assert_eq!(got.status, 301);
    assert_eq!(
        got.headers["location"],
        "https://shop.test:8443/new/old/a/b?x=1"
    );
    let got = send(
        p.addr,
        Request::get("/p?q")
            .header("host", "shop.test")
            .body(Full::new(Bytes::new()))
            .expect("req"),
    )
    .await;
    assert_eq!(got.status, 302);
    assert_eq!(got.headers["location"], "https://shop.test:443/p?q");
}

#[tokio::test]
async fn weighted_forward_splits_between_groups() {
    let a = target::http1().route("/", Reply::text("a")).run().await;
    let b = target::http1().route("/", Reply::text("b")).run().await;
    let p = ProxyBuilder::new()
        .group("a", &[a.addr])
        .group("b", &[b.addr])
        .rules(&["web,default,forward=a:3|b:1"])
        .start()
        .await;
    let bodies = support::get_many(p.addr, "/", 2000).await;
    let share_a = bodies.iter().filter(|b| b.as_str() == "a").count() * 100 / bodies.len();
    assert!((70..=80).contains(&share_a), "a got {share_a}%");
}

#[tokio::test]
async fn group_stickiness_keeps_the_chosen_group() {
    let a = target::http1().route("/", Reply::text("a")).run().await;
    let b = target::http1().route("/", Reply::text("b")).run().await;
    let p = ProxyBuilder::new()
        .group("a", &[a.addr])
        .group("b", &[b.addr])
        .rules(&["web,default,forward=a:1|b:1,group-stickiness=60"])
        .start()
        .await;
    let first = support::get(p.addr, "/").await;
    let cookie = first
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("AWSALBTG="))
        .expect("AWSALBTG cookie")
        .split(';')
        .next()
        .expect("pair")
        .to_owned();
    for _ in 0..30 {
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
