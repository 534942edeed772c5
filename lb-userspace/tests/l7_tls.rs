//! HTTPS listeners: SNI certificate selection, ALPN, HTTP/2 and HTTP/1.1 over TLS, handshake
//! failures counted.
mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb::proxy::server::{CertificateSpec, ListenerProtocol};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use support::target::{self, Reply};
use support::{ProxyBuilder, within};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Certificates written to a directory that is removed on drop.
struct Certs {
    dir: PathBuf,
    /// (DER of the leaf, spec) in listener order: default first.
    certs: Vec<(Vec<u8>, CertificateSpec)>,
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn make_certs(sets: &[&[&str]]) -> Certs {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "lb-l7-tls-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let certs = sets
        .iter()
        .enumerate()
        .map(|(i, names)| {
            let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
            let ck = rcgen::generate_simple_self_signed(names).expect("rcgen");
            let cert = dir.join(format!("{i}.crt"));
            let key = dir.join(format!("{i}.key"));
            std::fs::write(&cert, ck.cert.pem()).expect("write cert");
            std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
            (ck.cert.der().to_vec(), CertificateSpec { cert, key })
        })
        .collect();
    Certs { dir, certs }
}

/// Accepts any server certificate: the tests compare the presented certificate themselves.
#[derive(Debug)]
struct AcceptAny;

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

async fn connect(addr: SocketAddr, sni: Option<&str>, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    connect_with(addr, sni, alpn, rustls::DEFAULT_VERSIONS).await
}

async fn connect_with(
    addr: SocketAddr,
    sni: Option<&str>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsStream<TcpStream> {
    connect_offering(addr, sni, alpn, versions, None).await
}

/// As [`connect_with`], offering only `suites`, in that order (`None`: ring's defaults).
async fn connect_offering(
    addr: SocketAddr,
    sni: Option<&str>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
    suites: Option<&[rustls::CipherSuite]>,
) -> TlsStream<TcpStream> {
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(order) = suites {
        let all = std::mem::take(&mut provider.cipher_suites);
        provider.cipher_suites = order
            .iter()
            .filter_map(|want| all.iter().find(|s| s.suite() == *want).copied())
            .collect();
    }
    let provider = Arc::new(provider);
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_owned()).expect("dns name"),
        // An IP address as server name: rustls sends no SNI.
        None => ServerName::IpAddress(addr.ip().into()),
    };
    within(async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .expect("handshake")
    })
    .await
}

fn leaf(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().expect("certs")[0].to_vec()
}

/// A proxy with one HTTPS listener serving `certs`, forwarding to `target`.
fn https_to(target: SocketAddr, certs: &Certs) -> ProxyBuilder {
    let specs = certs.certs.iter().map(|(_, s)| s.clone()).collect();
    ProxyBuilder::forward_to(&[target]).listener(|l| {
        l.protocol = ListenerProtocol::Https;
        l.certificates = specs;
    })
}

async fn https_proxy(certs: &Certs) -> (target::Target, support::Proxy) {
    let t = target::http1().route("/", Reply::EchoHeaders).run().await;
    let p = https_to(t.addr, certs).start().await;
    (t, p)
}

#[tokio::test]
async fn sni_selects_the_matching_certificate_else_the_default() {
    let certs = make_certs(&[&["default.test"], &["a.test"], &["*.b.test"]]);
    let (_t, p) = https_proxy(&certs).await;
    let der = |i: usize| certs.certs[i].0.clone();
    let cases: [(Option<&str>, usize); 5] = [
        (Some("a.test"), 1),
        (Some("x.b.test"), 2),
        (Some("default.test"), 0),
        (Some("unknown.test"), 0),
        (None, 0),
    ];
    for (sni, want) in cases {
        let s = connect(p.addr, sni, &[b"http/1.1"]).await;
        assert_eq!(leaf(&s), der(want), "sni {sni:?}");
    }
}

#[tokio::test]
async fn alpn_negotiates_h2_and_serves_http2() {
    let certs = make_certs(&[&["default.test"]]);
    let (_t, p) = https_proxy(&certs).await;
    let s = connect(p.addr, Some("default.test"), &[b"h2", b"http/1.1"]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let body = within(async {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        let resp = send
            .send_request(
                Request::get("https://default.test/h2")
                    .body(Full::new(Bytes::new()))
                    .expect("req"),
            )
            .await
            .expect("response");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.expect("body").to_bytes()
    })
    .await;
    let body = String::from_utf8_lossy(&body);
    // The target (HTTP/1.1) got Host from :authority and X-Forwarded-Proto https.
    assert!(body.starts_with("GET /h2 HTTP/1.1"), "{body}");
    assert!(body.contains("host: default.test\n"), "{body}");
    assert!(body.contains("x-forwarded-proto: https\n"), "{body}");
}

#[tokio::test]
async fn alpn_negotiates_http1_and_serves_it() {
    let certs = make_certs(&[&["default.test"]]);
    let (_t, p) = https_proxy(&certs).await;
    let s = connect(p.addr, Some("default.test"), &[b"http/1.1"]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let status = within(async {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        send.send_request(
            Request::get("/")
                .header("host", "default.test")
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await
        .expect("response")
        .status()
    })
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn tls12_and_tls13_both_negotiate_aead_suites() {
    let certs = make_certs(&[&["default.test"]]);
    let (_t, p) = https_proxy(&certs).await;
    for (version, want) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let s = connect_with(p.addr, Some("default.test"), &[b"http/1.1"], &[version]).await;
        let conn = s.get_ref().1;
        assert_eq!(conn.protocol_version(), Some(want));
        let suite = format!(
            "{:?}",
            conn.negotiated_cipher_suite().expect("suite").suite()
        );
        assert!(
            suite.contains("GCM") || suite.contains("CHACHA20_POLY1305"),
            "{suite}"
        );
    }
}

#[tokio::test]
async fn the_listener_chooses_the_cipher_suite_in_albs_order_not_the_clients() {
    use rustls::CipherSuite as C;
    let certs = make_certs(&[&["default.test"]]);
    let (_t, p) = https_proxy(&certs).await;
    let negotiated = |s: &TlsStream<TcpStream>| {
        s.get_ref()
            .1
            .negotiated_cipher_suite()
            .expect("suite")
            .suite()
    };
    let cases: [(&'static rustls::SupportedProtocolVersion, &[C], C); 4] = [
        // A client preferring AES-256 (OpenSSL's order) gets ALB's first choice, AES-128.
        (
            &rustls::version::TLS13,
            &[
                C::TLS13_AES_256_GCM_SHA384,
                C::TLS13_CHACHA20_POLY1305_SHA256,
                C::TLS13_AES_128_GCM_SHA256,
            ],
            C::TLS13_AES_128_GCM_SHA256,
        ),
        (
            &rustls::version::TLS12,
            &[
                C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            ],
            C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
        // Control: what the client offers alone is what it gets. And one preferring ChaCha20
        // over AES-256 gets AES-256, ALB's next choice.
        (
            &rustls::version::TLS13,
            &[C::TLS13_AES_256_GCM_SHA384],
            C::TLS13_AES_256_GCM_SHA384,
        ),
        (
            &rustls::version::TLS13,
            &[
                C::TLS13_CHACHA20_POLY1305_SHA256,
                C::TLS13_AES_256_GCM_SHA384,
            ],
            C::TLS13_AES_256_GCM_SHA384,
        ),
    ];
    for (version, offer, want) in cases {
        let s = connect_offering(
            p.addr,
            Some("default.test"),
            &[b"http/1.1"],
            &[version],
            Some(offer),
        )
        .await;
        assert_eq!(negotiated(&s), want, "offered {offer:?}");
    }
}

#[tokio::test]
async fn failed_handshakes_are_counted() {
    let certs = make_certs(&[&["default.test"]]);
    let (_t, p) = https_proxy(&certs).await;
    within(async {
        let mut tcp = TcpStream::connect(p.addr).await.expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut buf = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut buf).await;
    })
    .await;
    let counters = p.running.as_ref().expect("running").counters().clone();
    within(async {
        while counters
            .client_tls_negotiation_errors
            .load(Ordering::Relaxed)
            == 0
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(
        counters
            .client_tls_negotiation_errors
            .load(Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn a_slow_request_head_over_tls_gets_408_from_the_header_timeout() {
    // The deadline starts after the handshake and the 408 goes out inside TLS.
    let certs = make_certs(&[&["default.test"]]);
    let t = target::http1().route("/", Reply::text("hello")).run().await;
    let p = https_to(t.addr, &certs)
        .listener(|l| l.header_timeout = std::time::Duration::from_millis(300))
        .start()
        .await;
    let mut s = connect(p.addr, Some("default.test"), &[b"http/1.1"]).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("an unfinished head");
    let mut out = Vec::new();
    let _ = within(tokio::io::AsyncReadExt::read_to_end(&mut s, &mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert_eq!(support::status_of(&out), 408, "{out}");
    let counters = p.running.as_ref().expect("running").counters();
    assert_eq!(counters.header_timeouts.load(Ordering::Relaxed), 1);
    assert_eq!(t.hits(), 0);
}

/// An HTTP/2 connection over TLS to the proxy: the request sender, and the connection's task
/// (it ends when the proxy closes the connection).
async fn h2_over_tls(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let s = connect(addr, Some("default.test"), &[b"h2"]).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = within(hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(s),
    ))
    .await
    .expect("h2 handshake");
    (send, tokio::spawn(conn))
}

#[tokio::test]
async fn http2_responses_carry_one_date_the_load_balancers_own_included() {
    // hyper's automatic `Date` is off for HTTP/2; `service.rs` adds the current second's to
    // the responses lb makes itself (here a fixed response) and keeps the target's on the
    // others. Without that, the fixed response would have no `Date` (RFC 9110 §6.6.1: an
    // origin with a clock must send one).
    let certs = make_certs(&[&["default.test"]]);
    let t = target::http1().route("/", Reply::EchoHeaders).run().await;
    let p = https_to(t.addr, &certs)
        .rules(&[
            "web,priority=10,path=/fixed,fixed-response=503,body=down",
            "web,default,forward=tg",
        ])
        .start()
        .await;
    let (send, _conn) = h2_over_tls(p.addr).await;
    for (path, status) in [("/fixed", 503), ("/forwarded", 200)] {
        let mut send = send.clone();
        let before = std::time::SystemTime::now();
        let resp = within(
            send.send_request(
                Request::get(format!("https://default.test{path}"))
                    .body(Full::new(Bytes::new()))
                    .expect("req"),
            ),
        )
        .await
        .expect("response");
        let after = std::time::SystemTime::now();
        assert_eq!(resp.status(), status, "{path}");
        let dates: Vec<_> = resp.headers().get_all(http::header::DATE).iter().collect();
        assert_eq!(dates.len(), 1, "{path}: {dates:?}");
        let text = dates[0].to_str().expect("ASCII");
        let at = httpdate::parse_http_date(text).expect("an HTTP date");
        let second = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_secs()
        };
        assert!(
            (second(before)..=second(after)).contains(&second(at)),
            "{path}: {text} is not between the clock's readings around the request"
        );
    }
}

#[tokio::test]
async fn http2_over_tls_answers_every_stream_of_a_burst_and_large_bodies_whole() {
    // Responses of many streams share TLS writes (`batch.rs`): each must still reach its own
    // stream whole, and a body larger than the write batch must arrive intact.
    let certs = make_certs(&[&["default.test"]]);
    let t = target::http1()
        .route("/echo", Reply::EchoBody)
        .route("/", Reply::EchoHeaders)
        .run()
        .await;
    let p = https_to(t.addr, &certs).start().await;
    let (send, _conn) = h2_over_tls(p.addr).await;
    let streams = (0..100).map(|i| {
        let mut send = send.clone();
        async move {
            let req = Request::get(format!("https://default.test/s{i}"))
                .body(Full::new(Bytes::new()))
                .expect("req");
            let resp = send.send_request(req).await.expect("response");
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            let body = String::from_utf8_lossy(&body).into_owned();
            assert!(body.starts_with(&format!("GET /s{i} HTTP/1.1")), "{body}");
        }
    });
    within(futures_util::future::join_all(streams)).await;
    // 300 KiB: more than the 64 KiB the batch keeps, in frames of both sizes.
    // ASCII: the target echoes the body as text.
    let big: Vec<u8> = (0..300 * 1024u32)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[(i % 36) as usize])
        .collect();
    let echoed = within(async {
        let mut send = send.clone();
        let req = Request::post("https://default.test/echo")
            .body(Full::new(Bytes::from(big.clone())))
            .expect("req");
        let resp = send.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.expect("body").to_bytes()
    })
    .await;
    let first_difference = echoed.iter().zip(&big).position(|(a, b)| a != b);
    assert!(
        echoed == big,
        "the echoed body differs: {} bytes back of {}, first difference at {first_difference:?}",
        echoed.len(),
        big.len()
    );
}

#[tokio::test]
async fn http2_over_tls_graceful_shutdown_finishes_the_stream_then_closes() {
    let certs = make_certs(&[&["default.test"]]);
    let t = target::http1()
        .route(
            "/",
            Reply::Slow(std::time::Duration::from_millis(500), "finished".into()),
        )
        .run()
        .await;
    let mut p = https_to(t.addr, &certs).start().await;
    let (mut send, conn) = h2_over_tls(p.addr).await;
    let request = tokio::spawn(async move {
        let req = Request::get("https://default.test/")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let resp = send.send_request(req).await.expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, body)
    });
    within(async {
        while t.hits() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    let running = p.running.take().expect("running");
    within(running.shutdown(std::time::Duration::from_secs(10)))
        .await
        .expect("shutdown");
    let (status, body) = within(request).await.expect("request task");
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"finished");
    // The proxy's GOAWAY and close reached the client: its connection task ends cleanly.
    within(conn)
        .await
        .expect("connection task")
        .expect("a clean end of the connection");
}

#[tokio::test]
async fn http2_over_tls_idle_connection_is_closed_by_the_idle_timeout() {
    let certs = make_certs(&[&["default.test"]]);
    let t = target::http1().route("/", Reply::text("hi")).run().await;
    let p = https_to(t.addr, &certs)
        .listener(|l| l.idle_timeout = std::time::Duration::from_millis(300))
        .start()
        .await;
    let (mut send, conn) = h2_over_tls(p.addr).await;
    // One request answered (a lone response on an otherwise idle connection is not held
    // back), then silence: the connection ends.
    let body = within(async {
        let req = Request::get("https://default.test/")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let resp = send.send_request(req).await.expect("response");
        resp.into_body().collect().await.expect("body").to_bytes()
    })
    .await;
    assert_eq!(&body[..], b"hi");
    let _ = within(conn).await.expect("connection task");
    assert!(send.is_closed());
}
