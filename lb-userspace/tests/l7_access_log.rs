//! Golden access-log tests: one request of each kind through the real L7 tier with a real
//! access log file, and each line parsed field by field (ALB's fields in order, then `lb`'s).
//! The expected values come from what each test sent and knows, never from the code.
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lb::accesslog::{Destination, Rotation, access_log_writer};
use lb::proxy::server::{AccessLog, CertificateSpec, ListenerProtocol};
use support::target::{self, Reply};
use support::{ProxyBuilder, get, raw, status_of, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// ALB's fields, then lb's: their positions in a line.
const TYPE: usize = 0;
const TIME: usize = 1;
const ELB: usize = 2;
const CLIENT: usize = 3;
const TARGET: usize = 4;
const REQUEST_TIME: usize = 5;
const TARGET_TIME: usize = 6;
const RESPONSE_TIME: usize = 7;
const ELB_STATUS: usize = 8;
const TARGET_STATUS: usize = 9;
const RECEIVED: usize = 10;
const SENT: usize = 11;
const REQUEST: usize = 12;
const USER_AGENT: usize = 13;
const CIPHER: usize = 14;
const PROTOCOL: usize = 15;
const TARGET_GROUP: usize = 16;
const TRACE_ID: usize = 17;
const DOMAIN: usize = 18;
const CERT: usize = 19;
const PRIORITY: usize = 20;
const CREATED: usize = 21;
const ACTIONS: usize = 22;
const REDIRECT: usize = 23;
const ERROR_REASON: usize = 24;
const TARGET_LIST: usize = 25;
const STATUS_LIST: usize = 26;
const CLASSIFICATION: usize = 27;
const CLASSIFICATION_REASON: usize = 28;
const CONN_TRACE_ID: usize = 29;
const LISTENER: usize = 30;
const LB_ERROR: usize = 31;
const LB_DETAIL: usize = 32;
const LB_RETRY: usize = 33;
const LB_TARGET_CONNECTION: usize = 34;

/// The access log of these tests: a file of its own, read back line by line.
use support::LogFile as Log;

fn seconds(f: &str) -> f64 {
    let v: f64 = f.parse().unwrap_or_else(|_| panic!("{f:?} is not seconds"));
    assert!(
        v >= 0.0 && f.split('.').nth(1).map(str::len) == Some(3),
        "{f}"
    );
    v
}

fn assert_iso_time(f: &str) {
    // 2018-07-02T22:23:00.186641Z
    assert_eq!(f.len(), 27, "{f}");
    assert!(
        f.ends_with('Z') && &f[10..11] == "T" && &f[19..20] == ".",
        "{f}"
    );
}

/// Fields every line has the same way.
fn common(f: &[String], client: Option<SocketAddr>) {
    assert_iso_time(&f[TIME]);
    assert_iso_time(&f[CREATED]);
    assert!(
        f[CREATED] <= f[TIME],
        "created {} after {}",
        f[CREATED],
        f[TIME]
    );
    assert_eq!(f[ELB], "app/lb/0123456789abcdef");
    if let Some(c) = client {
        assert_eq!(f[CLIENT], c.to_string());
    }
    assert!(f[CONN_TRACE_ID].starts_with("TID_"), "{}", f[CONN_TRACE_ID]);
    assert_eq!(f[ERROR_REASON], "-");
    assert_eq!(f[LISTENER], "web");
}

/// A line for a request the load balancer answered without a target.
fn no_target(f: &[String]) {
    assert_eq!(f[TARGET], "-");
    assert_eq!(&f[REQUEST_TIME..=RESPONSE_TIME], ["-1", "-1", "-1"]);
    assert_eq!(f[TARGET_STATUS], "-");
    assert_eq!(f[TARGET_GROUP], "-");
    assert_eq!(f[TARGET_LIST], "-");
    assert_eq!(f[STATUS_LIST], "-");
    assert_eq!(f[LB_TARGET_CONNECTION], "-");
}

#[tokio::test]
async fn a_forwarded_request_has_every_phase_its_target_and_its_trace_id() {
    let log = Log::new("forward");
    let t = target::http1().route("/", Reply::text("hello")).run().await;
    let p = log.proxy(&[t.addr]).await;
    let got = support::send(
        p.addr,
        http::Request::get("/a/b?c=d")
            .header("host", "app.test")
            .header("user-agent", "golden \"test\"/1.0")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"")))
            .expect("request"),
    )
    .await;
    assert_eq!(got.status, 200);
    let f = log.line(1).await;
    common(&f, None);
    // `time` is the response's end, read from the clock when the record is emitted, not the
    // request's arrival: a forward to a new target connection in between takes far more than
    // the microsecond the field resolves.
    assert!(
        f[CREATED] < f[TIME],
        "time {} is not after created {}",
        f[TIME],
        f[CREATED]
    );
    assert_eq!(f[TYPE], "http");
    assert_eq!(f[TARGET], t.addr.to_string());
    for phase in &f[REQUEST_TIME..=RESPONSE_TIME] {
        seconds(phase);
    }
    assert_eq!(
        (f[ELB_STATUS].as_str(), f[TARGET_STATUS].as_str()),
        ("200", "200")
    );
    let port = p.addr.port();
    assert_eq!(
        f[REQUEST],
        format!("GET http://app.test:{port}/a/b?c=d HTTP/1.1")
    );
    assert_eq!(f[USER_AGENT], "golden \"test\"/1.0");
    let received: u64 = f[RECEIVED].parse().expect("received_bytes");
    let sent: u64 = f[SENT].parse().expect("sent_bytes");
    assert!(
        received >= "GET /a/b?c=d HTTP/1.1\r\n\r\n".len() as u64,
        "{received}"
    );
    assert!(sent > "hello".len() as u64 + 17, "{sent}");
    assert_eq!((f[CIPHER].as_str(), f[PROTOCOL].as_str()), ("-", "-"));
    assert_eq!(f[TARGET_GROUP], "tg");
    assert!(f[TRACE_ID].starts_with("Root=1-"), "{}", f[TRACE_ID]);
    assert_eq!((f[DOMAIN].as_str(), f[CERT].as_str()), ("-", "-"));
    assert_eq!(f[PRIORITY], "0", "the default rule");
    assert_eq!(f[ACTIONS], "forward");
    assert_eq!(f[REDIRECT], "-");
    assert_eq!(f[TARGET_LIST], t.addr.to_string());
    assert_eq!(f[STATUS_LIST], "200");
    assert_eq!(
        (
            f[CLASSIFICATION].as_str(),
            f[CLASSIFICATION_REASON].as_str()
        ),
        ("-", "-")
    );
    assert_eq!((f[LB_ERROR].as_str(), f[LB_DETAIL].as_str()), ("-", "-"));
    assert_eq!(f[LB_RETRY], "-");
    assert_eq!(f[LB_TARGET_CONNECTION], "new");
}

#[tokio::test]
async fn a_redirect_logs_its_url_and_no_target() {
    let log = Log::new("redirect");
    let mut b = ProxyBuilder::new().rules(&[
        "web,priority=7,path=/old/*,redirect=https://#{host}:443/new/#{path},status=301",
        "web,default,fixed-response=404",
    ]);
    b.access_log = Some(log.writer.clone());
    let p = b.start().await;
    let got = get(p.addr, "/old/x").await;
    assert_eq!(got.status, 301);
    let f = log.line(1).await;
    common(&f, None);
    no_target(&f);
    assert_eq!(f[ELB_STATUS], "301");
    assert_eq!(f[PRIORITY], "7");
    assert_eq!(f[ACTIONS], "redirect");
    assert_eq!(f[REDIRECT], "https://app.test:443/new/old/x");
    assert_eq!(f[LB_ERROR], "-");
}

#[tokio::test]
async fn a_fixed_response_logs_its_status_and_action() {
    let log = Log::new("fixed");
    let mut b = ProxyBuilder::new().rules(&["web,default,fixed-response=503,body=down"]);
    b.access_log = Some(log.writer.clone());
    let p = b.start().await;
    assert_eq!(get(p.addr, "/").await.status, 503);
    let f = log.line(1).await;
    common(&f, None);
    no_target(&f);
    assert_eq!(f[ELB_STATUS], "503");
    assert_eq!(f[PRIORITY], "0");
    assert_eq!(f[ACTIONS], "fixed-response");
    let sent: u64 = f[SENT].parse().expect("sent_bytes");
    assert!(sent >= "down".len() as u64 + 17, "{sent}");
}

#[tokio::test]
async fn a_refused_connection_is_a_502_naming_the_target_and_the_cause() {
    let log = Log::new("502");
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let p = log.proxy(&[closed]).await;
    assert_eq!(get(p.addr, "/").await.status, 502);
    let f = log.line(1).await;
    common(&f, None);
    assert_eq!(f[TARGET], closed.to_string(), "the target it tried");
    assert_eq!(
        &f[REQUEST_TIME..=RESPONSE_TIME],
        ["-1", "-1", "-1"],
        "never sent"
    );
    assert_eq!(
        (f[ELB_STATUS].as_str(), f[TARGET_STATUS].as_str()),
        ("502", "-")
    );
    assert_eq!(f[TARGET_GROUP], "tg");
    assert_eq!(f[LB_ERROR], "TargetConnectRefused");
    assert!(
        f[LB_DETAIL].contains(&closed.to_string()),
        "{}",
        f[LB_DETAIL]
    );
}

#[tokio::test]
async fn a_target_that_never_answers_is_a_504_with_the_request_sent() {
    let log = Log::new("504");
    let t = target::http1().route("/", Reply::Hang).run().await;
    let mut b =
        ProxyBuilder::forward_to(&[t.addr]).client(|c| c.idle_timeout = Duration::from_millis(300));
    b.access_log = Some(log.writer.clone());
    let p = b.start().await;
    assert_eq!(get(p.addr, "/").await.status, 504);
    let f = log.line(1).await;
    common(&f, None);
    assert_eq!(f[TARGET], t.addr.to_string());
    seconds(&f[REQUEST_TIME]);
    assert_eq!(&f[TARGET_TIME..=RESPONSE_TIME], ["-1", "-1"]);
    assert_eq!(
        (f[ELB_STATUS].as_str(), f[TARGET_STATUS].as_str()),
        ("504", "-")
    );
    assert_eq!(f[LB_ERROR], "TargetResponseTimeout");
}

#[tokio::test]
async fn a_client_leaving_before_the_response_is_a_460() {
    let log = Log::new("460");
    let t = target::http1()
        .route("/", Reply::Slow(Duration::from_secs(30), "late".into()))
        .run()
        .await;
    let p = log.proxy(&[t.addr]).await;
    let mut tcp = TcpStream::connect(p.addr).await.expect("connect");
    let client = tcp.local_addr().expect("local");
    tcp.write_all(b"GET /slow HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .expect("write");
    within(async {
        while t.hits() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    drop(tcp);
    let f = log.line(1).await;
    common(&f, Some(client));
    assert_eq!(f[TARGET], t.addr.to_string());
    assert_eq!(
        (f[ELB_STATUS].as_str(), f[TARGET_STATUS].as_str()),
        ("460", "-")
    );
    assert_eq!(&f[TARGET_TIME..=RESPONSE_TIME], ["-1", "-1"]);
    assert_eq!(f[LB_ERROR], "ClientClosed");
}

#[tokio::test]
async fn too_many_forwarded_for_addresses_is_a_463_before_any_target() {
    let log = Log::new("463");
    let t = target::http1().route("/", Reply::text("never")).run().await;
    let p = log.proxy(&[t.addr]).await;
    let req = format!(
        "GET / HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: {}\r\nConnection: close\r\n\r\n",
        xff_past_the_limit()
    );
    assert_eq!(status_of(&raw(p.addr, req.as_bytes()).await), 463);
    let f = log.line(1).await;
    common(&f, None);
    no_target(&f);
    assert_eq!(f[ELB_STATUS], "463");
    assert_eq!(
        f[ACTIONS], "forward",
        "the rule matched; no target was picked"
    );
    assert_eq!(f[LB_ERROR], "ClientRequestRefused");
    assert_eq!(t.hits(), 0);
}

/// `received_bytes` is the head plus the body the balancer forwarded: a forwarded request's
/// body counts byte for byte, and the body of a request the balancer answers itself (463
/// here) is never read and adds nothing.
#[tokio::test]
async fn received_bytes_counts_a_forwarded_body_and_not_an_unforwarded_one() {
    let log = Log::new("body");
    let t = target::http1().route("/", Reply::text("ok")).run().await;
    let p = log.proxy(&[t.addr]).await;
    let body = "b".repeat(1000);
    let post = |extra: &str| {
        format!(
            "POST /upload HTTP/1.1\r\nHost: app.test\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let forwarded = post("");
    assert_eq!(status_of(&raw(p.addr, forwarded.as_bytes()).await), 200);
    let f = log.line(1).await;
    assert_eq!(f[ELB_STATUS], "200");
    assert_eq!(
        f[RECEIVED].parse::<u64>().expect("received_bytes"),
        forwarded.len() as u64,
        "the head and the 1000-byte body"
    );
    let refused = post(&format!("X-Forwarded-For: {}\r\n", xff_past_the_limit()));
    assert_eq!(status_of(&raw(p.addr, refused.as_bytes()).await), 463);
    let f = log.line(2).await;
    assert_eq!(f[ELB_STATUS], "463");
    assert_eq!(
        f[RECEIVED].parse::<u64>().expect("received_bytes"),
        (refused.len() - body.len()) as u64,
        "the head only"
    );
    assert_eq!(t.hits(), 1);
}

#[tokio::test]
async fn a_severe_desync_request_is_a_400_with_its_classification_and_request_line() {
    let log = Log::new("desync");
    let t = target::http1().route("/", Reply::text("never")).run().await;
    let p = log.proxy(&[t.addr]).await;
    let req =
        b"POST /upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n";
    assert_eq!(status_of(&raw(p.addr, req).await), 400);
    let f = log.line(1).await;
    common(&f, None);
    no_target(&f);
    assert_eq!(f[ELB_STATUS], "400");
    let port = p.addr.port();
    assert_eq!(
        f[REQUEST],
        format!("POST http://app.test:{port}/upload HTTP/1.1"),
        "what the client sent, not hyper's stand-in"
    );
    assert_eq!(f[PRIORITY], "-1", "no rule was evaluated");
    assert_eq!(f[ACTIONS], "-");
    assert_eq!(f[CLASSIFICATION], "Severe");
    // An unknown transfer coding: AWS's classifier calls it BadTransferEncoding.
    assert_eq!(f[CLASSIFICATION_REASON], "BadTransferEncoding");
    let received: u64 = f[RECEIVED].parse().expect("received_bytes");
    assert_eq!(
        received,
        (req.len() - "0\r\n\r\n".len()) as u64,
        "the head as sent"
    );
    assert_eq!(t.hits(), 0);
}

#[tokio::test]
async fn an_https_request_logs_cipher_protocol_sni_and_certificate() {
    let log = Log::new("https");
    let dir = std::env::temp_dir().join(format!("lb-access-log-certs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ck = rcgen::generate_simple_self_signed(vec!["secure.test".to_owned()]).expect("rcgen");
    let cert = dir.join("secure.crt");
    let key = dir.join("secure.key");
    std::fs::write(&cert, ck.cert.pem()).expect("cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("key");
    let t = target::http1().route("/", Reply::text("tls")).run().await;
    let mut b = ProxyBuilder::forward_to(&[t.addr]).listener(|l| {
        l.protocol = ListenerProtocol::Https;
        l.certificates = vec![CertificateSpec {
            cert: cert.clone(),
            key,
        }];
    });
    b.access_log = Some(log.writer.clone());
    let p = b.start().await;
    // The client offers one suite, so the test knows which is negotiated.
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|s| s.suite() == rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256);
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
    within(async {
        let tcp = TcpStream::connect(p.addr).await.expect("connect");
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(
                rustls::pki_types::ServerName::try_from("secure.test").expect("name"),
                tcp,
            )
            .await
            .expect("handshake");
        tls.write_all(b"GET / HTTP/1.1\r\nHost: secure.test\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out).await;
        assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    })
    .await;
    let f = log.line(1).await;
    common(&f, None);
    assert_eq!(f[TYPE], "https");
    assert_eq!(f[PROTOCOL], "TLSv1.2");
    // rcgen's default key is ECDSA P-256; the client offered only this suite.
    assert_eq!(f[CIPHER], "ECDHE-ECDSA-AES128-GCM-SHA256");
    assert_eq!(f[DOMAIN], "secure.test");
    assert_eq!(f[CERT], cert.display().to_string());
    let port = p.addr.port();
    assert_eq!(
        f[REQUEST],
        format!("GET https://secure.test:{port}/ HTTP/1.1")
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_websocket_is_logged_when_it_closes_with_its_bytes() {
    let log = Log::new("ws");
    let t = target::http1().route("/", Reply::UpgradeEcho).run().await;
    let p = log.proxy(&[t.addr]).await;
    let upgrade =
        b"GET /chat HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let payload = b"0123456789abcdef";
    within(async {
        let mut tcp = TcpStream::connect(p.addr).await.expect("connect");
        tcp.write_all(upgrade).await.expect("write");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tcp.read_exact(&mut byte).await.expect("head");
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"));
        tcp.write_all(payload).await.expect("frame");
        let mut echo = vec![0u8; payload.len()];
        tcp.read_exact(&mut echo).await.expect("echo");
        // Still open: nothing is logged before the tunnel closes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            std::fs::read_to_string(&log.path)
                .unwrap_or_default()
                .is_empty(),
            "logged at close, not before"
        );
    })
    .await;
    let f = log.line(1).await;
    common(&f, None);
    assert_eq!(f[TYPE], "ws");
    assert_eq!(
        (f[ELB_STATUS].as_str(), f[TARGET_STATUS].as_str()),
        ("101", "101")
    );
    assert_eq!(f[TARGET], t.addr.to_string());
    let received: u64 = f[RECEIVED].parse().expect("received_bytes");
    let sent: u64 = f[SENT].parse().expect("sent_bytes");
    assert_eq!(
        received,
        (upgrade.len() + payload.len()) as u64,
        "head plus tunnelled bytes"
    );
    assert!(
        sent >= payload.len() as u64 + 17,
        "the 101 head plus the echo: {sent}"
    );
}

/// Accepts any server certificate.
#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_nobody_reads_drops_and_counts_lines_while_requests_complete() {
    use std::os::fd::FromRawFd as _;
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills the two descriptors; each is owned by one File below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: fresh descriptors from pipe(2), owned from here on.
    let (read_end, write_end) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let writer: Arc<AccessLog> = Arc::new(
        access_log_writer(
            Destination::Writer(Box::new(write_end)),
            Rotation::default(),
            16,
            "app/lb/0".into(),
        )
        .expect("writer"),
    );
    let mut b = ProxyBuilder::new().rules(&["web,default,fixed-response=200,body=ok"]);
    b.access_log = Some(writer.clone());
    let p = b.start().await;
    // Far more lines than the pipe (64 KiB), the writer's buffer and the queue hold.
    const REQUESTS: usize = 2000;
    let bodies = support::get_many(p.addr, "/", REQUESTS).await;
    assert_eq!(bodies.len(), REQUESTS);
    assert!(bodies.iter().all(|b| b == "ok"), "every request completed");
    let stats = writer.stats();
    assert!(
        stats.dropped > 0,
        "the writer is stuck on the pipe, so lines were dropped: {stats:?}"
    );
    // Unblock it: the reader goes away, the stuck write fails, the rest is accounted for.
    drop(read_end);
    writer.close(Duration::from_secs(10));
    let s = writer.stats();
    assert_eq!(
        s.written + s.dropped,
        REQUESTS as u64,
        "every line handed to the writer or dropped: {s:?}"
    );
    assert!(
        s.errors >= 1,
        "the write stuck on the closed pipe failed: {s:?}"
    );
}

/// An `X-Forwarded-For` of 31 addresses: past ALB's limit of 30, so the request is refused
/// with a 463.
fn xff_past_the_limit() -> String {
    (1..=31)
        .map(|i| format!("10.0.0.{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}
