//! HTTPS targets (verification off like ALB, or against a CA), HTTP/2 targets, and upgraded
//! (WebSocket-style) connections through the forwarder.
mod support_client;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb::proxy::client::{Forwarder, TargetEndpoint, TargetTls};
use lb::proxy::error::ProxyError;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support_client::{SAFETY, config, empty, forward_collect, get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Answers every request with what it saw: `METHOD URI VERSION host=HOST`; a request for
/// `/never` is never answered.
async fn describe(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/never" {
        std::future::pending::<()>().await;
    }
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let text = format!(
        "{} {} {:?} host={host}",
        req.method(),
        req.uri(),
        req.version()
    );
    Ok(Response::new(Full::new(Bytes::from(text))))
}

/// Which protocol a test server speaks on each accepted connection.
#[derive(Clone, Copy)]
enum Speak {
    Http1,
    Http2,
}

async fn serve<S>(stream: S, speak: Speak)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(stream);
    let _ = match speak {
        Speak::Http1 => {
            hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service_fn(describe))
                .await
        }
        Speak::Http2 => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, service_fn(describe))
                .await
        }
    };
}

/// A cleartext target (HTTP/1.1, or HTTP/2 by prior knowledge).
async fn cleartext_target(speak: Speak) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, speak));
        }
    });
    (addr, task)
}

/// A test CA and a certificate for `localhost` it issued.
struct Pki {
    ca_pem: String,
    leaf: CertificateDer<'static>,
    leaf_key: PrivateKeyDer<'static>,
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "lb test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("CA certificate");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf certificate");
    Pki {
        ca_pem: ca.pem(),
        leaf: leaf.der().clone(),
        leaf_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    }
}

/// A TLS target presenting `pki`'s leaf certificate, offering ALPN `h2` or `http/1.1`.
async fn tls_target(pki: &Pki, speak: Speak) -> (SocketAddr, JoinHandle<()>) {
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(vec![pki.leaf.clone()], pki.leaf_key.clone_key())
    .expect("server certificate");
    server.alpn_protocols = vec![match speak {
        Speak::Http1 => b"http/1.1".to_vec(),
        Speak::Http2 => b"h2".to_vec(),
    }];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(stream).await {
                    serve(tls, speak).await;
                }
            });
        }
    });
    (addr, task)
}

/// A PEM file in the temp directory, removed on drop.
struct TempPem(PathBuf);

impl TempPem {
    fn new(name: &str, pem: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "lb-forwarder-test-{}-{name}.pem",
            std::process::id()
        ));
        std::fs::write(&path, pem).expect("write temp PEM");
        Self(path)
    }
}

impl Drop for TempPem {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn tls_endpoint(
    addr: SocketAddr,
    http2: bool,
    verify: bool,
    ca_file: Option<PathBuf>,
) -> TargetEndpoint {
    TargetEndpoint {
        addr,
        tls: Some(TargetTls {
            server_name: "localhost".into(),
            verify,
            ca_file,
        }),
        http2,
    }
}

#[tokio::test]
async fn an_https_target_with_a_self_signed_certificate_works_without_verification_like_alb() {
    let pki = pki();
    let (addr, _target) = tls_target(&pki, Speak::Http1).await;
    let (forwarded, body) = forward_collect(
        &Forwarder::new(config()),
        &tls_endpoint(addr, false, false, None),
        get("/tls"),
    )
    .await
    .expect("TLS without verification");
    assert_eq!(forwarded.response.status(), 200);
    assert_eq!(body, "GET /tls HTTP/1.1 host=app.test");
}

#[tokio::test]
async fn an_https_target_verified_against_its_ca_works() {
    let pki = pki();
    let ca = TempPem::new("right-ca", &pki.ca_pem);
    let (addr, _target) = tls_target(&pki, Speak::Http1).await;
    let endpoint = tls_endpoint(addr, false, true, Some(ca.0.clone()));
    let (forwarded, _) = forward_collect(&Forwarder::new(config()), &endpoint, get("/"))
        .await
        .expect("verified");
    assert_eq!(forwarded.response.status(), 200);
}

#[tokio::test]
async fn an_https_target_verified_against_the_wrong_ca_is_a_502() {
    let pki = pki();
    let other = self::pki();
    let wrong_ca = TempPem::new("wrong-ca", &other.ca_pem);
    let (addr, _target) = tls_target(&pki, Speak::Http1).await;
    let endpoint = tls_endpoint(addr, false, true, Some(wrong_ca.0.clone()));
    let error = forward_collect(&Forwarder::new(config()), &endpoint, get("/"))
        .await
        .expect_err("untrusted certificate");
    assert!(matches!(error, ProxyError::Connect { .. }), "{error:?}");
    assert_eq!(error.status(), 502);
}

#[tokio::test]
async fn an_http2_target_by_prior_knowledge_gets_http2_with_the_authority_from_host() {
    let (addr, _target) = cleartext_target(Speak::Http2).await;
    let endpoint = TargetEndpoint {
        addr,
        tls: None,
        http2: true,
    };
    let forwarder = Forwarder::new(config());
    let (first, body) = forward_collect(&forwarder, &endpoint, get("/h2?x=1"))
        .await
        .expect("h2c");
    assert_eq!(first.response.status(), 200);
    assert_eq!(first.response.version(), http::Version::HTTP_2);
    // The host goes as `:authority` (the URI) and not also as `Host`, which nginx 1.22
    // refuses beside it.
    assert_eq!(body, "GET http://app.test/h2?x=1 HTTP/2.0 host=-");
    let (second, _) = forward_collect(&forwarder, &endpoint, get("/again"))
        .await
        .expect("h2c again");
    assert!(second.reused_connection, "the HTTP/2 connection is shared");
    let stats = forwarder.stats();
    assert_eq!((stats[0].fresh, stats[0].reused), (1, 1), "{stats:?}");
}

/// hyper's client path (HTTP/2 and HTTPS targets) bounds the wait for the response head by
/// the idle timeout as lb's own HTTP/1.1 client does (`within_idle_timeout`, shared): a
/// stream the target never answers is a 504, on a connection that answers others (the
/// control, before and after).
#[tokio::test]
async fn an_http2_target_that_never_answers_a_request_is_a_504_from_the_idle_timeout() {
    let (addr, _target) = cleartext_target(Speak::Http2).await;
    let endpoint = TargetEndpoint {
        addr,
        tls: None,
        http2: true,
    };
    let forwarder = Forwarder::new(lb::proxy::client::ClientConfig {
        idle_timeout: std::time::Duration::from_millis(300),
        ..config()
    });
    let (answered, _) = forward_collect(&forwarder, &endpoint, get("/h2"))
        .await
        .expect("answered");
    assert_eq!(answered.response.status(), 200);
    let error = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        forward_collect(&forwarder, &endpoint, get("/never")),
    )
    .await
    .expect("still waiting 20 s after a 300 ms idle timeout")
    .expect_err("never answered");
    assert!(
        matches!(error, ProxyError::TargetTimeout { .. }),
        "{error:?}"
    );
    assert_eq!(error.status(), 504);
    let (again, _) = forward_collect(&forwarder, &endpoint, get("/h2"))
        .await
        .expect("answered after the timeout");
    assert_eq!(again.response.status(), 200);
}

#[tokio::test]
async fn an_https_http2_target_negotiated_by_alpn_works() {
    let pki = pki();
    let (addr, _target) = tls_target(&pki, Speak::Http2).await;
    let (forwarded, body) = forward_collect(
        &Forwarder::new(config()),
        &tls_endpoint(addr, true, false, None),
        get("/"),
    )
    .await
    .expect("h2 over TLS");
    assert_eq!(forwarded.response.version(), http::Version::HTTP_2);
    assert_eq!(body, "GET https://app.test/ HTTP/2.0 host=-");
}

/// Answers upgrade requests with 101 and then echoes every byte on the upgraded connection.
async fn echo_upgrade(mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if !req.headers().contains_key("upgrade") {
        return Ok(Response::new(Full::new(Bytes::from_static(
            b"not an upgrade",
        ))));
    }
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(&mut req).await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        let mut buf = [0u8; 1024];
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    response
        .headers_mut()
        .insert("connection", "upgrade".parse().expect("header"));
    response
        .headers_mut()
        .insert("upgrade", "echo".parse().expect("header"));
    Ok(response)
}

#[tokio::test]
async fn an_upgraded_connection_through_the_forwarder_is_a_working_bidirectional_stream() {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    let _target = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(echo_upgrade))
                    .with_upgrades(),
            );
        }
    });
    let forwarder = Forwarder::new(config());
    let req = Request::builder()
        .uri("/chat")
        .header("host", "app.test")
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(empty())
        .expect("request");
    let endpoint = TargetEndpoint {
        addr,
        tls: None,
        http2: false,
    };
    let mut forwarded = tokio::time::timeout(SAFETY, forwarder.forward(&endpoint, req))
        .await
        .expect("safety net")
        .expect("101");
    assert_eq!(forwarded.response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = tokio::time::timeout(SAFETY, hyper::upgrade::on(&mut forwarded.response))
        .await
        .expect("safety net")
        .expect("the response carries the upgraded connection");
    let mut io = TokioIo::new(upgraded);
    for message in [&b"ping"[..], b"a longer second message", b"3"] {
        io.write_all(message).await.expect("write to the tunnel");
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(SAFETY, io.read_exact(&mut echoed))
            .await
            .expect("safety net")
            .expect("echo");
        assert_eq!(echoed, message);
    }
    assert_eq!(
        forwarder.stats()[0].idle_connections,
        0,
        "an upgraded connection is never pooled"
    );
}
