//! The logs of a running `lb run`, end to end: the access log reopened on SIGHUP after a
//! logrotate-style move and rotated by time, the health-check log, `--log-format json`
//! without terminal colours, rustls's per-connection warnings left out of `lb`'s own log by
//! default, and `lb stats --watch`.
mod support_lb;

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support_lb::{LB, Lb, ScratchDir, Target, wait_for};

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn flags(extra: &[String], target: &Target) -> Vec<String> {
    let mut f = vec![
        "--listener".to_owned(),
        "web=http://127.0.0.1:0".to_owned(),
        "--target-group".to_owned(),
        "app,health-check=off".to_owned(),
        "--target".to_owned(),
        format!("app={}", target.addr),
        "--rule".to_owned(),
        "web,default,forward=app".to_owned(),
    ];
    f.extend(extra.iter().cloned());
    f
}

fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    wait_for(
        &format!("{n} lines in {}", path.display()),
        Duration::from_secs(20),
        || {
            let l = lines(path);
            (l.len() >= n).then_some(l)
        },
    )
}

#[test]
fn sighup_reopens_the_access_log_after_it_was_moved() {
    let t = Target::start("t");
    let dir = ScratchDir::new("logs-hup");
    let log = dir.join("access.log");
    let moved = dir.join("access.log.1");
    let lb = Lb::start(
        "logs-hup",
        &flags(&["--access-log".into(), log.display().to_string()], &t),
    );
    for _ in 0..3 {
        assert_eq!(lb.get("/before").0, 200);
    }
    wait_lines(&log, 3);
    // logrotate moves the file; lb keeps writing to the file it has open …
    std::fs::rename(&log, &moved).unwrap();
    assert_eq!(lb.get("/moved").0, 200);
    let old = wait_lines(&moved, 4);
    assert!(old[3].contains("/moved"), "{old:?}");
    assert!(!log.exists());
    // … until SIGHUP: then it opens the path again.
    lb.signal(libc::SIGHUP);
    wait_for("the log reopened", Duration::from_secs(20), || {
        assert_eq!(lb.get("/after").0, 200);
        (!lines(&log).is_empty()).then_some(())
    });
    let new = lines(&log);
    assert!(new.iter().all(|l| l.contains("/after")), "{new:?}");
    assert!(lines(&moved).iter().all(|l| !l.contains("/after")));
}

#[test]
fn the_access_log_rotates_by_time() {
    let t = Target::start("t");
    let dir = ScratchDir::new("logs-rotate");
    let log = dir.join("access.log");
    let lb = Lb::start(
        "logs-rotate",
        &flags(
            &[
                "--access-log".into(),
                log.display().to_string(),
                "--access-log-rotate-interval".into(),
                "1".into(),
            ],
            &t,
        ),
    );
    let rotated = wait_for("a rotated file", Duration::from_secs(20), || {
        assert_eq!(lb.get("/tick").0, 200);
        std::thread::sleep(Duration::from_millis(100));
        let others: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p != &log && p.to_string_lossy().contains("access.log"))
            .collect();
        (!others.is_empty()).then_some(others)
    });
    // Nothing is lost across the rotation: every request is in one of the files.
    let served = t.hits() as usize;
    let logged: usize = lines(&log).len() + rotated.iter().map(|p| lines(p).len()).sum::<usize>();
    assert_eq!(logged, served, "{rotated:?}");
}

#[test]
fn the_health_check_log_has_a_line_per_probe_with_its_result() {
    let ok = Target::start("ok");
    let missing = Target::start("missing");
    missing.set(|b| b.health_status = 404);
    let dir = ScratchDir::new("logs-hc");
    let hc = dir.join("health.log");
    let f = vec![
        "--listener".to_owned(),
        "web=http://127.0.0.1:0".to_owned(),
        "--target-group".to_owned(),
        "app,health-check-interval=0.2,health-check-timeout=0.1".to_owned(),
        "--target".to_owned(),
        format!("app={}", ok.addr),
        "--target".to_owned(),
        format!("app={}", missing.addr),
        "--rule".to_owned(),
        "web,default,forward=app".to_owned(),
        "--health-check-log".to_owned(),
        hc.display().to_string(),
    ];
    let _lb = Lb::start("logs-hc", &f);
    let l = wait_for("probes of both targets", Duration::from_secs(20), || {
        let l = lines(&hc);
        let has = |a: &std::net::SocketAddr| l.iter().any(|x| x.contains(&a.to_string()));
        (has(&ok.addr) && has(&missing.addr)).then_some(l)
    });
    // type time elb target_group target:port latency status status_code reason "description"
    let pass = l.iter().find(|x| x.contains(&ok.addr.to_string())).unwrap();
    let w: Vec<&str> = pass.split_whitespace().collect();
    assert_eq!(
        (w[0], w[3], w[6], w[7], w[8]),
        ("http", "app", "PASS", "200", "-"),
        "{pass}"
    );
    assert!(w[5].parse::<f64>().is_ok(), "latency: {pass}");
    let fail = l
        .iter()
        .find(|x| x.contains(&missing.addr.to_string()))
        .unwrap();
    let w: Vec<&str> = fail.split_whitespace().collect();
    assert_eq!(
        (w[6], w[7], w[8]),
        ("FAIL", "404", "Target.ResponseCodeMismatch"),
        "{fail}"
    );
    assert!(
        fail.ends_with("\"Health checks failed with these codes: [404]\""),
        "{fail}"
    );
}

#[test]
fn json_logs_are_one_object_per_line_and_text_logs_have_no_colours_off_a_terminal() {
    let t = Target::start("t");
    let text = Lb::start("logs-text", &flags(&[], &t));
    let json = Lb::start_with("logs-json", &["--log-format", "json"], &flags(&[], &t));
    for lb in [&text, &json] {
        lb.register("app", t.addr);
    }
    let text_log = wait_for("text log lines", Duration::from_secs(20), || {
        let l = text.log();
        l.contains("listening").then_some(l)
    });
    assert!(
        !text_log.contains('\x1b'),
        "ANSI escapes in a non-terminal log:\n{text_log}"
    );
    let json_log = wait_for("json log lines", Duration::from_secs(20), || {
        let l = json.log();
        l.contains("listening").then_some(l)
    });
    let mut objects = 0;
    for line in json_log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
        objects += 1;
    }
    assert!(objects >= 2, "{json_log}");
}

#[test]
fn lb_stats_watch_prints_a_document_per_interval() {
    let t = Target::start("t");
    let lb = Lb::start("logs-watch", &flags(&[], &t));
    assert_eq!(lb.get("/").0, 200);
    let mut child = Command::new(LB)
        .args(["stats", "--json", "--watch", "0.3", "--admin-socket"])
        .arg(&lb.admin)
        .args(["--pin-path", "/nonexistent"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut docs = Vec::new();
    while docs.len() < 3 {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON document per line");
        docs.push(v);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(docs.len(), 3);
    let times: Vec<&str> = docs
        .iter()
        .map(|d| d["time"].as_str().unwrap_or(""))
        .collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    assert!(
        docs.iter()
            .all(|d| d["metrics"].as_array().is_some_and(|m| !m.is_empty()))
    );
}

/// A TLS 1.3 ClientHello as `openssl s_client -connect 127.0.0.1:PORT -servername 127.0.0.1`
/// sends it: with the IP address as SNI, which RFC 6066 forbids and rustls warns about.
const CLIENT_HELLO_WITH_IP_SNI: &str = "16030100ee010000ea0303ebb9e4755e20d11fa3798755d1c87116880a5ef46de9be9b2e6dc64e99915f9520d0b39681a659a7529c8203f19626d7399fe18a56f714b61aaa4e07bf44b02941000813021303130100ff010000990000000e000c0000093132372e302e302e31000b000403000102000a00160014001d0017001e0019001801000101010201030104002300000016000000170000000d001e001c040305030603080708080809080a080b080408050806040105010601002b0003020304002d00020101003300260024001d00207949c85bcf03210b07a01521fb2559edfc0a3733f46d450cfb1efaa299a10875";

/// Sends [`CLIENT_HELLO_WITH_IP_SNI`] to `addr` and waits for the ServerHello's record
/// header: rustls has handled (and logged about) the ClientHello by then.
fn hello_with_ip_sni(addr: std::net::SocketAddr) {
    use std::io::{Read as _, Write as _};
    let hello: Vec<u8> = (0..CLIENT_HELLO_WITH_IP_SNI.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&CLIENT_HELLO_WITH_IP_SNI[i..i + 2], 16).expect("hex"))
        .collect();
    let mut c = std::net::TcpStream::connect(addr).expect("connect to the TLS listener");
    c.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    c.write_all(&hello).expect("send the ClientHello");
    let mut header = [0u8; 5];
    c.read_exact(&mut header).expect("the ServerHello");
    // 0x16: a handshake record (the ServerHello), not an alert.
    assert_eq!(header[0], 0x16, "{header:?}");
}

#[test]
fn rustls_warnings_about_what_a_client_sent_are_not_logged_by_default() {
    let t = Target::start("t");
    let dir = ScratchDir::new("logs-tls-certs");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).expect("cert.pem");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("key.pem");
    let extra = [
        "--listener".to_owned(),
        format!(
            // Port 0 twice on one address reads as a clash; any 127/8 address is loopback.
            "tls=https://127.0.0.2:0,cert={}:{}",
            cert.display(),
            key.display()
        ),
        "--rule".to_owned(),
        "tls,default,forward=app".to_owned(),
    ];
    // Positive control: with rustls's warnings asked for, the same ClientHello logs one.
    let warned = Lb::start_logging(
        "logs-rustls-warn",
        &[],
        &flags(&extra, &t),
        Some("info,rustls=warn"),
    );
    hello_with_ip_sni(warned.listener_addr("tls"));
    wait_for(
        "rustls's warning with LB_LOG=info,rustls=warn",
        Duration::from_secs(20),
        || warned.log().contains("Illegal SNI").then_some(()),
    );
    let default = Lb::start_logging("logs-rustls-default", &[], &flags(&extra, &t), None);
    for _ in 0..3 {
        hello_with_ip_sni(default.listener_addr("tls"));
    }
    let log = default.log();
    // The default filter still logs lb's own info lines.
    assert!(log.contains("listening"), "{log}");
    assert!(!log.contains("Illegal SNI"), "{log}");
}
