//! NLB metrics from real flows through `lb_xdp`: after a scripted mix of TCP connections and
//! UDP datagrams, `lb stats --json` (another process: L4 from the pins, the rest through the
//! admin API) and the Prometheus endpoint report exactly what the test sent. Needs root and
//! the `lb` binary.
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use lb_tests::{Topology, VipSpec, client};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const TCP_CONNECTIONS: u16 = 12;
const UDP_FLOWS: u16 = 5;

/// Dimensions a series may carry: a query names the ones it wants, the others must be absent
/// (NewFlowCount per VIP is not NewFlowCount per VIP and target).
const DIMENSIONS: [&str; 4] = ["vip", "target", "target_group", "listener"];

/// The series of `metric` at exactly the level `dims` names, with those values.
fn series<'a>(doc: &'a Value, metric: &str, dims: &[(&str, &str)]) -> Vec<&'a Value> {
    doc["metrics"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["metric"] == metric)
        .filter(|s| dims.iter().all(|(k, v)| s[*k] == *v))
        .filter(|s| {
            DIMENSIONS
                .iter()
                .all(|d| dims.iter().any(|(k, _)| k == d) || s.get(*d).is_none())
        })
        .collect()
}

fn total(doc: &Value, metric: &str, dims: &[(&str, &str)]) -> u64 {
    series(doc, metric, dims)
        .iter()
        .map(|s| s["total"].as_u64().unwrap_or(0))
        .sum()
}

fn value(doc: &Value, metric: &str, dims: &[(&str, &str)]) -> f64 {
    series(doc, metric, dims)
        .iter()
        .map(|s| s["value"].as_f64().unwrap_or(0.0))
        .sum()
}

/// `GET /metrics` over the admin socket.
fn prometheus(socket: &std::path::Path) -> String {
    let mut s = UnixStream::connect(socket).expect("admin socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The body may be chunked: promtool and the lookups below want the plain text.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut plain = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            plain.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        plain
    } else {
        body.to_owned()
    }
}

/// The value of the Prometheus sample `name{labels}` (labels as rendered, in order).
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn nlb_metrics_equal_what_the_test_sent_in_lb_stats_and_prometheus() {
    let tcp = VipSpec::tcp("web", VIP, 80);
    let udp = VipSpec::udp("dns", VIP, 53);
    let mut topo = Topology::builder()
        .backends(2)
        .vip(tcp)
        .vip(udp)
        .build()
        .expect("building the topology");
    topo.serve_tcp_lines(80).expect("tcp servers");
    topo.serve_udp_echo(SocketAddrV4::new(VIP, 53))
        .expect("udp servers");

    let names: Vec<String> = topo.backends().iter().map(|b| b.name.clone()).collect();
    topo.in_client(|| {
        for i in 0..TCP_CONNECTIONS {
            let who = client::ask_tcp(44_000 + i, SocketAddrV4::new(VIP, 80)).expect("tcp");
            assert!(names.contains(&who));
        }
        for i in 0..UDP_FLOWS {
            client::ask_udp(45_000 + i, SocketAddrV4::new(VIP, 53), "ping").expect("udp");
        }
    })
    .expect("client namespace");

    let lb = topo.lb(0);
    let (pin, socket) = (lb.pin_path.clone(), lb.admin_socket.clone());
    let out = topo
        .lb_cli([
            "stats".as_ref(),
            "--json".as_ref(),
            "--pin-path".as_ref(),
            pin.as_os_str(),
            "--admin-socket".as_ref(),
            socket.as_os_str(),
        ] as [&std::ffi::OsStr; 6])
        .expect("lb stats --json");
    let doc: Value = serde_json::from_str(&out).expect("lb stats JSON");
    let web = [("vip", "10.100.0.1:80/tcp")];
    let dns = [("vip", "10.100.0.1:53/udp")];

    assert_eq!(
        total(&doc, "NewFlowCount", &web),
        u64::from(TCP_CONNECTIONS),
        "{doc:#}"
    );
    assert_eq!(
        total(&doc, "NewFlowCount", &dns),
        u64::from(UDP_FLOWS),
        "{doc:#}"
    );
    // Every flow was seen moments ago: all active (NLB counts flows within the idle timeout).
    assert_eq!(
        value(&doc, "ActiveFlowCount", &web),
        f64::from(TCP_CONNECTIONS)
    );
    assert_eq!(value(&doc, "ActiveFlowCount", &dns), f64::from(UDP_FLOWS));
    // One datagram per UDP flow; at least SYN, ACK and the line per TCP connection.
    assert_eq!(total(&doc, "ProcessedPackets", &dns), u64::from(UDP_FLOWS));
    let tcp_packets = total(&doc, "ProcessedPackets", &web);
    assert!(
        tcp_packets >= 3 * u64::from(TCP_CONNECTIONS),
        "{tcp_packets}"
    );
    // The per-target series add up to the VIP's.
    let per_target: u64 = doc["metrics"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["metric"] == "NewFlowCount" && s["vip"] == web[0].1)
        .filter(|s| s.get("target").is_some())
        .map(|s| s["total"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(per_target, u64::from(TCP_CONNECTIONS), "{doc:#}");
    // Health comes from the registry (checks off: both in service), routing was normal.
    assert_eq!(
        value(&doc, "HealthyHostCount", &[("target_group", "web")]),
        2.0
    );
    assert_eq!(
        value(&doc, "UnHealthyHostCount", &[("target_group", "web")]),
        0.0
    );
    assert_eq!(total(&doc, "UnhealthyRoutingFlowCount", &web), 0);

    // The Prometheus endpoint says the same, and parses.
    let text = prometheus(&socket);
    let vip = r#"vip="10.100.0.1:80/tcp""#;
    assert_eq!(
        sample(&text, "lb_vip_new_flow_count_total", vip),
        Some(f64::from(TCP_CONNECTIONS)),
        "{text}"
    );
    assert_eq!(
        sample(&text, "lb_vip_processed_packets_total", vip),
        Some(tcp_packets as f64)
    );
    assert_eq!(
        sample(&text, "lb_vip_active_flows", r#"vip="10.100.0.1:53/udp""#),
        Some(f64::from(UDP_FLOWS))
    );
    let file = std::env::temp_dir().join(format!("lb-l4-metrics-{}.prom", std::process::id()));
    std::fs::write(&file, &text).unwrap();
    let check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("promtool (installed by the prerequisites)");
    let _ = std::fs::remove_file(&file);
    assert!(
        check.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    topo.processes_alive().expect("lb still running");
}
