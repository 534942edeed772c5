//! The metrics of a running `lb run`, read from another process: after a scripted mix of
//! requests, every L7 metric equals what the test counted, in `lb stats --json` and in the
//! Prometheus endpoint, which Prometheus's own `promtool check metrics` accepts.
mod support_lb;

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support_lb::{KeepAlive, LB, Lb, Target, wait_for};

const FAST: &str = "health-check-interval=0.2,health-check-timeout=0.15,\
                    healthy-threshold=2,unhealthy-threshold=2";

/// `GET /metrics` over the admin socket: the body.
fn scrape(lb: &Lb) -> String {
    let mut s = UnixStream::connect(&lb.admin).expect("admin socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let (head, body) = resp.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("text/plain; version=0.0.4"),
        "{head}"
    );
    // hyper may chunk the body.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        return out;
    }
    body.to_owned()
}

/// The value of the Prometheus sample `name{labels}` (labels as written, in order).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// `lb stats --json` (from another process): the `total` (counters) or `value` (gauges) of
/// the series named `metric` whose dimensions include every `(key, value)`.
fn stat(doc: &Value, metric: &str, dims: &[(&str, &str)]) -> f64 {
    let found: Vec<&Value> = doc["metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .filter(|s| s["metric"] == metric && dims.iter().all(|(k, v)| s[*k] == *v))
        // Exactly these dimensions: a target-level series also names its group.
        .filter(|s| {
            [
                "listener",
                "target_group",
                "target",
                "vip",
                "reason",
                "log",
                "worker",
            ]
            .iter()
            .filter(|k| s.get(**k).is_some())
            .count()
                == dims.len()
        })
        .collect();
    assert_eq!(found.len(), 1, "{metric} {dims:?}: {found:?}");
    found[0]["total"]
        .as_f64()
        .or_else(|| found[0]["value"].as_f64())
        .unwrap_or_else(|| panic!("{metric}: no total or value"))
}

/// `lb stats --json`, another process, through the admin socket (no pins: L7 only).
fn stats_json(lb: &Lb) -> Value {
    let out = Command::new(LB)
        .args([
            "stats",
            "--json",
            "--pin-path",
            "/nonexistent",
            "--admin-socket",
        ])
        .arg(&lb.admin)
        .output()
        .expect("lb stats");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// A metric, its dimensions, and the value the test counted.
type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], u64);

#[test]
fn every_metric_equals_what_the_test_counted_in_lb_stats_and_prometheus() {
    let a = Target::start("a");
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let flags: Vec<String> = [
        "--listener",
        "web=http://127.0.0.1:0",
        "--target-group",
        &format!("app,{FAST}"),
        "--target-group",
        "gone,health-check=off",
        "--target",
        &format!("app={}", a.addr),
        "--target",
        &format!("gone={dead}"),
        "--rule",
        "web,priority=1,path=/moved,redirect=https://#{host}:443/#{path},status=301",
        "--rule",
        "web,priority=2,path=/missing,fixed-response=404",
        "--rule",
        "web,priority=3,path=/broken,forward=gone",
        "--rule",
        "web,default,forward=app",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let lb = Lb::start("metrics", &flags);
    lb.wait_state("app", a.addr.port(), "healthy");

    // The script: what each request must count.
    let forwarded = 7;
    for _ in 0..forwarded {
        assert_eq!(lb.get("/").0, 200);
    }
    let redirects = 2;
    for _ in 0..redirects {
        assert_eq!(lb.get("/moved").0, 301);
    }
    let fixed = 3;
    for _ in 0..fixed {
        assert_eq!(lb.get("/missing").0, 404);
    }
    let refused = 2;
    for _ in 0..refused {
        assert_eq!(lb.get("/broken").0, 502);
    }
    let requests = forwarded + redirects + fixed + refused;
    // Rules evaluated: `/` tries all three, /moved one, /missing two, /broken three.
    let rules = forwarded * 3 + redirects + fixed * 2 + refused * 3;

    // lb stats --json, another process, through the admin socket.
    let doc: Value = wait_for(
        "lb stats to see every request",
        Duration::from_secs(20),
        || {
            let doc = stats_json(&lb);
            (stat(&doc, "NewConnectionCount", &[("listener", "web")]) >= requests as f64)
                .then_some(doc)
        },
    );
    let web = [("listener", "web")];
    let checks: [Expected<'_>; 13] = [
        ("NewConnectionCount", &web, requests),
        ("RequestCount", &web, forwarded + refused),
        ("HTTPCode_ELB_3XX_Count", &web, redirects),
        ("HTTPCode_ELB_4XX_Count", &web, fixed),
        ("HTTPCode_ELB_5XX_Count", &web, refused),
        ("HTTPCode_ELB_502_Count", &web, refused),
        ("HTTP_Redirect_Count", &web, redirects),
        ("HTTP_Fixed_Response_Count", &web, fixed),
        ("RuleEvaluations", &web, rules),
        ("RequestCount", &[("target_group", "app")], forwarded),
        (
            "HTTPCode_Target_2XX_Count",
            &[("target_group", "app")],
            forwarded,
        ),
        (
            "TargetConnectionErrorCount",
            &[("target_group", "gone")],
            refused,
        ),
        (
            "RequestCountPerTarget",
            &[("target_group", "app"), ("target", &a.addr.to_string())],
            forwarded,
        ),
    ];
    for (metric, dims, want) in checks {
        assert_eq!(stat(&doc, metric, dims), want as f64, "{metric} {dims:?}");
    }
    assert_eq!(
        stat(&doc, "HealthyHostCount", &[("target_group", "app")]),
        1.0
    );

    // The same numbers through Prometheus.
    let text = scrape(&lb);
    let prom = [
        ("lb_new_connection_count_total{listener=\"web\"}", requests),
        (
            "lb_request_count_total{listener=\"web\"}",
            forwarded + refused,
        ),
        (
            "lb_http_code_elb_3xx_count_total{listener=\"web\"}",
            redirects,
        ),
        ("lb_http_code_elb_4xx_count_total{listener=\"web\"}", fixed),
        (
            "lb_http_code_elb_502_count_total{listener=\"web\"}",
            refused,
        ),
        ("lb_rule_evaluations_total{listener=\"web\"}", rules),
        (
            "lb_target_group_request_count_total{target_group=\"app\"}",
            forwarded,
        ),
        (
            "lb_target_group_target_response_time_seconds_count{target_group=\"app\"}",
            forwarded,
        ),
        (
            "lb_target_group_target_connection_error_count_total{target_group=\"gone\"}",
            refused,
        ),
    ];
    for (series, want) in prom {
        assert_eq!(sample(&text, series), want as f64, "{series}");
    }
    assert_eq!(
        sample(&text, "lb_target_group_healthy_hosts{target_group=\"app\"}"),
        1.0
    );

    // The shared runtime has no per-worker series (README, "Worker layout").
    assert!(!text.contains("lb_worker_"), "{text}");

    promtool_accepts(&text);
}

/// Prometheus's own parser and linter accept the whole exposition.
fn promtool_accepts(text: &str) {
    let promtool = which_promtool();
    let out = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .output_with_stdin(text.as_bytes())
        .expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether the scrape has a pool series for `addr`.
fn has_pool(text: &str, addr: std::net::SocketAddr) -> bool {
    let series = format!("lb_pool_new_connection_count_total{{target=\"{addr}\"}} ");
    text.lines().any(|l| l.starts_with(&series))
}

/// `lb` with one listener forwarding to group `app` of targets `a` and `b`: no health checks,
/// no deregistration delay.
fn two_target_lb(name: &str, a: &Target, b: &Target) -> Lb {
    let flags: Vec<String> = [
        "--listener",
        "web=http://127.0.0.1:0",
        "--target-group",
        "app,health-check=off,deregistration-delay=0",
        "--target",
        &format!("app={}", a.addr),
        "--target",
        &format!("app={}", b.addr),
        "--rule",
        "web,default,forward=app",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Lb::start(name, &flags)
}

#[test]
fn a_deregistered_targets_connection_pool_and_its_series_go_away() {
    let a = Target::start("a");
    let b = Target::start("b");
    let lb = two_target_lb("pool-prune", &a, &b);
    wait_for("both targets answered", Duration::from_secs(20), || {
        assert_eq!(lb.get("/").0, 200);
        (a.hits() > 0 && b.hits() > 0).then_some(())
    });
    // Control: both targets have a pool while both are registered.
    let text = scrape(&lb);
    assert!(has_pool(&text, a.addr) && has_pool(&text, b.addr), "{text}");

    lb.deregister("app", a.addr);
    wait_for("a's pool gone", Duration::from_secs(20), || {
        (!has_pool(&scrape(&lb), a.addr)).then_some(())
    });
    // The target that stayed keeps its pool, and is still served.
    assert!(has_pool(&scrape(&lb), b.addr));
    assert_eq!(lb.get("/").0, 200);
}

/// The value of a `lb_pool_…` series of `addr`, if the pool is listed.
fn pool_value(text: &str, name: &str, addr: std::net::SocketAddr) -> Option<f64> {
    let series = format!("{name}{{target=\"{addr}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().parse().expect("a number"))
}

/// Requests the target's listed pool has sent (new and reused connections).
fn pool_requests(text: &str, addr: std::net::SocketAddr) -> Option<u64> {
    let fresh = pool_value(text, "lb_pool_new_connection_count_total", addr)?;
    let reused = pool_value(text, "lb_pool_reused_connection_count_total", addr)?;
    Some((fresh + reused) as u64)
}

#[test]
fn a_target_deregistered_and_registered_again_gets_a_fresh_working_pool() {
    let a = Target::start("a");
    let b = Target::start("b");
    let lb = two_target_lb("pool-readd", &a, &b);
    // The first registration's pool sends several requests to `a`.
    wait_for("a answered 5 requests", Duration::from_secs(20), || {
        assert_eq!(lb.get("/").0, 200);
        (a.hits() >= 5).then_some(())
    });
    let first = pool_requests(&scrape(&lb), a.addr).expect("a's pool listed");
    assert_eq!(first, a.hits(), "the pool's counters are not a's requests");
    lb.deregister("app", a.addr);
    wait_for("a's pool gone", Duration::from_secs(20), || {
        (!has_pool(&scrape(&lb), a.addr)).then_some(())
    });
    let hits_before = a.hits();

    lb.register("app", a.addr);
    // `a` is served again, through a pool the forwarder lists (its series are back).
    wait_for("a served again", Duration::from_secs(20), || {
        assert_eq!(lb.get("/").0, 200);
        (a.hits() >= hits_before + 2).then_some(())
    });
    let text = scrape(&lb);
    let again = pool_requests(&text, a.addr).expect("a's new pool is not listed");
    // A fresh pool: its counters hold the new registration's requests only.
    assert_eq!(
        again,
        a.hits() - hits_before,
        "the old pool's counts carried over: {text}"
    );
}

/// promtool from Debian's `prometheus` package (scripts/install-prereqs.sh installs it); a
/// missing one fails the test with the command that installs it.
fn which_promtool() -> std::path::PathBuf {
    let p = std::path::PathBuf::from("/usr/bin/promtool");
    assert!(
        p.exists(),
        "promtool is missing: apt-get update && apt-get install -y --no-install-recommends prometheus \
         (or run scripts/install-prereqs.sh)"
    );
    p
}

trait OutputWithStdin {
    fn output_with_stdin(&mut self, input: &[u8]) -> Option<std::process::Output>;
}

impl OutputWithStdin for Command {
    fn output_with_stdin(&mut self, input: &[u8]) -> Option<std::process::Output> {
        let mut child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        child.stdin.take()?.write_all(input).ok()?;
        child.wait_with_output().ok()
    }
}

/// The sum over workers 0 and 1 of the Prometheus sample `family{worker="W"}`.
fn worker_sum(text: &str, family: &str) -> f64 {
    (0..2)
        .map(|w| sample(text, &format!("{family}{{worker=\"{w}\"}}")))
        .sum()
}

/// With `--l7-runtime per-worker` and two workers, the per-worker counts that Prometheus and
/// `lb stats` show add up to the connections the test opened, both workers have some
/// (balanced accept spreads them), and the open counts fall back to 0 once they are closed.
#[test]
fn per_worker_connection_counts_add_up_to_the_connections_opened() {
    let a = Target::start("a");
    let flags: Vec<String> = [
        "--listener",
        "web=http://127.0.0.1:0",
        "--target-group",
        "app,health-check=off",
        "--target",
        &format!("app={}", a.addr),
        "--rule",
        "web,default,forward=app",
        "--l7-runtime",
        "per-worker",
        "--l7-workers",
        "2",
        "--l7-accept",
        "balanced",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let lb = Lb::start("per-worker", &flags);
    let addr = lb.listener_addr("web");
    // Each connection answered once and kept open: the only client connections lb sees.
    let opened = 6;
    let conns: Vec<KeepAlive> = (0..opened)
        .map(|_| {
            let mut c = KeepAlive::connect(addr);
            assert_eq!(c.get("/").map(|(status, _)| status), Some(200));
            c
        })
        .collect();
    let text = scrape(&lb);
    assert_eq!(
        worker_sum(&text, "lb_worker_new_connection_count_total"),
        opened as f64,
        "{text}"
    );
    assert_eq!(
        worker_sum(&text, "lb_worker_active_connections"),
        opened as f64,
        "{text}"
    );
    for w in ["0", "1"] {
        assert!(
            sample(
                &text,
                &format!("lb_worker_active_connections{{worker=\"{w}\"}}")
            ) > 0.0,
            "balanced accept gives worker {w} some connections: {text}"
        );
    }
    promtool_accepts(&text);
    // One foreign-reuse series per worker's shard of the target's pool, each 0: the HTTP/1.1
    // pool never lends a worker's connection to another.
    for w in ["0", "1"] {
        let series = format!(
            "lb_pool_foreign_worker_reuse_count_total{{worker=\"{w}\",target=\"{}\"}}",
            a.addr
        );
        assert_eq!(sample(&text, &series), 0.0, "{text}");
    }
    // The same counts in `lb stats --json` (the history samples them: wait for the sample).
    let doc = wait_for(
        "lb stats to see the connections",
        Duration::from_secs(20),
        || {
            let doc = stats_json(&lb);
            let open: f64 = ["0", "1"]
                .iter()
                .map(|w| stat(&doc, "WorkerActiveConnectionCount", &[("worker", w)]))
                .sum();
            (open == opened as f64).then_some(doc)
        },
    );
    let accepted: f64 = ["0", "1"]
        .iter()
        .map(|w| stat(&doc, "WorkerNewConnectionCount", &[("worker", w)]))
        .sum();
    assert_eq!(accepted, opened as f64);

    drop(conns);
    wait_for(
        "every worker's open count back to 0",
        Duration::from_secs(20),
        || {
            let text = scrape(&lb);
            (worker_sum(&text, "lb_worker_active_connections") == 0.0).then_some(())
        },
    );
    let text = scrape(&lb);
    assert_eq!(
        worker_sum(&text, "lb_worker_new_connection_count_total"),
        opened as f64,
        "closing does not undo the accepted count: {text}"
    );
}
