//! One health check of one target: TCP (a connection opens), HTTP or HTTPS (`GET path`, the
//! status must match). Every check opens its own connection and closes it, sends
//! `User-Agent: ELB-HealthChecker/2.0` and `Host: target:port`, as AWS's checks do.
//!
//! A probe either goes to the target's own address (*direct*), or through the data path:
//! to the VIP, with a socket mark that `lb_hc_encap` (TC egress) turns into IP-in-IP to this
//! one backend, so the probe reaches it exactly as client traffic does.
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

use crate::proxy::client::TargetTls;
use crate::registry::CheckResult;
use crate::targets::TargetReason;
use crate::targets::health_check::{CheckProtocol, HealthCheck};

tokio::task_local! {
    /// Where an HTTP probe run inside [`STATUS`]`.scope(…)` leaves the status it got (the
    /// health-check log's `status_code`), without changing what a check returns.
    pub static STATUS: StatusSeen;
}

/// The last HTTP status a probe saw (0: none).
#[derive(Clone, Debug, Default)]
pub struct StatusSeen(Arc<std::sync::atomic::AtomicU16>);

impl StatusSeen {
    /// The status, if a response came.
    pub fn get(&self) -> Option<u16> {
        let v = self.0.load(std::sync::atomic::Ordering::Relaxed);
        (v != 0).then_some(v)
    }

    fn set(&self, code: u16) {
        self.0.store(code, std::sync::atomic::Ordering::Relaxed);
    }
}

/// AWS's health checker identifies itself so.
pub const USER_AGENT: &str = "ELB-HealthChecker/2.0";
/// Largest response head read (status line and headers).
const MAX_HEAD: usize = 16 * 1024;

/// One check to make.
#[derive(Debug, Clone)]
pub struct Probe {
    /// What to check.
    pub check: HealthCheck,
    /// Where the socket connects (the target, or the VIP for a data-path probe).
    pub connect_to: SocketAddr,
    /// `Host:` header value: the target's `addr:port`.
    pub host: String,
    /// Socket mark (data-path probes).
    pub mark: Option<u32>,
}

fn fail(reason: TargetReason, description: impl Into<String>) -> CheckResult {
    CheckResult::Fail {
        reason,
        description: description.into(),
    }
}

fn timed_out(t: Duration) -> CheckResult {
    fail(
        TargetReason::Timeout,
        format!("Request timed out after {} s", fmt_secs(t)),
    )
}

fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s}")
    }
}

/// Runs one check; never takes longer than the check's timeout (plus scheduling).
pub async fn run(p: &Probe) -> CheckResult {
    let timeout = p.check.timeout;
    match tokio::time::timeout(timeout, check(p)).await {
        Ok(result) => result,
        Err(_) => timed_out(timeout),
    }
}

async fn check(p: &Probe) -> CheckResult {
    let stream = match connect(p).await {
        Ok(s) => s,
        Err(e) => return connect_failure(p, &e),
    };
    match p.check.protocol {
        CheckProtocol::Tcp => CheckResult::Pass,
        CheckProtocol::Http => http_get(stream, p).await,
        CheckProtocol::Https => {
            let tls = TargetTls {
                server_name: String::new(),
                verify: false,
                ca_file: None,
            };
            let config = match crate::proxy::client::tls::client_config(&tls, b"http/1.1") {
                Ok(c) => c,
                Err(e) => {
                    return CheckResult::Error {
                        description: format!("building the TLS client: {e}"),
                    };
                }
            };
            let name = rustls::pki_types::ServerName::IpAddress(p.connect_to.ip().into());
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&config));
            match connector.connect(name, stream).await {
                Ok(tls) => http_get(tls, p).await,
                Err(e) => fail(
                    TargetReason::FailedHealthChecks,
                    format!("TLS handshake failed: {e}"),
                ),
            }
        }
    }
}

async fn connect(p: &Probe) -> std::io::Result<TcpStream> {
    let socket = match p.connect_to {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(mark) = p.mark {
        set_mark(&socket, mark)?;
    }
    socket.connect(p.connect_to).await
}

fn set_mark(socket: &TcpSocket, mark: u32) -> std::io::Result<()> {
    // SAFETY: a valid socket descriptor and a u32 option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn connect_failure(p: &Probe, e: &std::io::Error) -> CheckResult {
    match (e.kind(), p.mark) {
        (ErrorKind::ConnectionRefused, _) => {
            fail(TargetReason::FailedHealthChecks, "Connection refused")
        }
        (ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable, Some(_))
            if e.raw_os_error() == Some(libc::ENETUNREACH) =>
        {
            // Our own routing: the probe never left this host.
            CheckResult::Error {
                description: format!(
                    "no route from this host to the VIP {}: data-path checks leave through \
                     the route to the VIP (add one, e.g. a default route, or set \
                     health-check-mode=direct)",
                    p.connect_to.ip()
                ),
            }
        }
        (ErrorKind::PermissionDenied, Some(_)) => CheckResult::Error {
            description: format!("cannot mark the probe socket: {e} (needs CAP_NET_ADMIN)"),
        },
        (ErrorKind::TimedOut, _) => timed_out(p.check.timeout),
        _ => fail(
            TargetReason::FailedHealthChecks,
            capitalised(&e.to_string()),
        ),
    }
}

/// "connection reset by peer (os error 104)" → "Connection reset by peer".
fn capitalised(s: &str) -> String {
    let s = s.split(" (os error").next().unwrap_or(s);
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, p: &Probe) -> CheckResult {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {USER_AGENT}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        p.check.path, p.host
    );
    if let Err(e) = s.write_all(request.as_bytes()).await {
        return fail(
            TargetReason::FailedHealthChecks,
            capitalised(&e.to_string()),
        );
    }
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    loop {
        let n = match s.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                return fail(
                    TargetReason::FailedHealthChecks,
                    capitalised(&e.to_string()),
                );
            }
        };
        if n == 0 {
            return fail(
                TargetReason::FailedHealthChecks,
                if head.is_empty() {
                    "The target closed the connection without a response".to_owned()
                } else {
                    "The target closed the connection in the middle of its response".to_owned()
                },
            );
        }
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&head) {
            Ok(httparse::Status::Complete(_)) | Ok(httparse::Status::Partial)
                if response.code.is_some() =>
            {
                let code = response.code.unwrap_or_default();
                let _ = STATUS.try_with(|seen| seen.set(code));
                let _ = s.shutdown().await;
                return if p.check.matcher.matches(code) {
                    CheckResult::Pass
                } else {
                    fail(
                        TargetReason::ResponseCodeMismatch,
                        format!("Health checks failed with these codes: [{code}]"),
                    )
                };
            }
            Ok(_) if head.len() < MAX_HEAD => continue,
            Ok(_) => {
                return fail(
                    TargetReason::FailedHealthChecks,
                    "The target's response head is too large",
                );
            }
            Err(e) => {
                return fail(
                    TargetReason::FailedHealthChecks,
                    format!("The target sent an invalid HTTP response ({e})"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncBufReadExt as _;
    use tokio::net::TcpListener;

    use super::*;
    use crate::targets::TargetProtocol;
    use crate::targets::health_check::{CheckPort, HealthCheckSettings, Matcher};

    fn http_check(path: &str) -> HealthCheck {
        let mut c = HealthCheckSettings::default()
            .effective(TargetProtocol::Http)
            .unwrap();
        c.path = path.to_owned();
        c.timeout = Duration::from_millis(500);
        c.port = CheckPort::TrafficPort;
        c
    }

    fn probe(check: HealthCheck, addr: SocketAddr) -> Probe {
        Probe {
            check,
            connect_to: addr,
            host: addr.to_string(),
            mark: None,
        }
    }

    /// A server answering every connection with `status`, recording the request heads.
    async fn server(status: u16) -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let rec = seen.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let rec = rec.clone();
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut lines = tokio::io::BufReader::new(r).lines();
                    let mut head = String::new();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if line.is_empty() {
                            break;
                        }
                        head.push_str(&line);
                        head.push('\n');
                    }
                    rec.lock().unwrap().push(head);
                    let _ = w
                        .write_all(
                            format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn http_checks_pass_on_a_matching_status_and_send_aws_headers() {
        let (addr, seen) = server(200).await;
        assert_eq!(
            run(&probe(http_check("/health"), addr)).await,
            CheckResult::Pass
        );
        let head = seen.lock().unwrap()[0].clone();
        assert!(head.starts_with("GET /health HTTP/1.1\n"), "{head}");
        assert!(head.contains("User-Agent: ELB-HealthChecker/2.0"), "{head}");
        assert!(head.contains(&format!("Host: {addr}")), "{head}");
        assert!(head.contains("Connection: close"), "{head}");
    }

    #[tokio::test]
    async fn a_wrong_status_is_a_response_code_mismatch_naming_the_code() {
        let (addr, _) = server(404).await;
        let result = run(&probe(http_check("/"), addr)).await;
        assert_eq!(
            result,
            CheckResult::Fail {
                reason: TargetReason::ResponseCodeMismatch,
                description: "Health checks failed with these codes: [404]".into()
            }
        );
        let mut check = http_check("/");
        check.matcher = Matcher::parse("200-499", 200..=499).unwrap();
        assert_eq!(run(&probe(check, addr)).await, CheckResult::Pass);
    }

    #[tokio::test]
    async fn nothing_listening_is_connection_refused() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let result = run(&probe(http_check("/"), addr)).await;
        assert_eq!(
            result,
            CheckResult::Fail {
                reason: TargetReason::FailedHealthChecks,
                description: "Connection refused".into()
            }
        );
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out() {
        // Accepts (the kernel completes the handshake) but never answers.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let result = run(&probe(http_check("/"), addr)).await;
        assert_eq!(
            result,
            CheckResult::Fail {
                reason: TargetReason::Timeout,
                description: "Request timed out after 0.5 s".into()
            }
        );
        drop(l);
        // A TCP check of the same listener passes: the connection opens.
        let l = TcpListener::bind(addr).await.unwrap();
        let mut tcp = http_check("/");
        tcp.protocol = CheckProtocol::Tcp;
        assert_eq!(run(&probe(tcp, addr)).await, CheckResult::Pass);
        drop(l);
    }

    #[tokio::test]
    async fn garbage_and_silence_are_failed_checks() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = l.accept().await {
                n += 1;
                // Read the request first: closing with unread data would be a reset.
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req).await;
                if n == 1 {
                    let _ = s.write_all(b"SSH-2.0-OpenSSH\r\n\r\n").await;
                }
                // The second connection is closed without a byte.
            }
        });
        let garbage = run(&probe(http_check("/"), addr)).await;
        assert!(
            matches!(&garbage, CheckResult::Fail { reason: TargetReason::FailedHealthChecks, description } if description.contains("invalid HTTP")),
            "{garbage:?}"
        );
        let closed = run(&probe(http_check("/"), addr)).await;
        assert!(
            matches!(&closed, CheckResult::Fail { reason: TargetReason::FailedHealthChecks, description } if description.contains("without a response")),
            "{closed:?}"
        );
    }

    /// An HTTPS server with a self-signed certificate answering every request with `status`.
    async fn tls_server(status: u16) -> SocketAddr {
        let ck = rcgen::generate_simple_self_signed(vec!["target.internal".to_owned()]).unwrap();
        let dir =
            std::env::temp_dir().join(format!("lb-probe-tls-{}-{status}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        let config =
            crate::proxy::server::tls::server_config(&[crate::proxy::server::CertificateSpec {
                cert,
                key,
            }])
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let mut buf = [0u8; 1024];
                    let _ = tls.read(&mut buf).await;
                    let _ = tls
                        .write_all(
                            format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn https_checks_accept_any_target_certificate_and_match_the_status() {
        let mut check = http_check("/");
        check.protocol = CheckProtocol::Https;
        let ok = tls_server(200).await;
        assert_eq!(run(&probe(check.clone(), ok)).await, CheckResult::Pass);
        let wrong = tls_server(503).await;
        assert_eq!(
            run(&probe(check.clone(), wrong)).await,
            CheckResult::Fail {
                reason: TargetReason::ResponseCodeMismatch,
                description: "Health checks failed with these codes: [503]".into()
            }
        );
        // A plain HTTP server is no TLS target: the handshake fails, and says so.
        let (plain, _) = server(200).await;
        let result = run(&probe(check, plain)).await;
        assert!(
            matches!(&result, CheckResult::Fail { reason: TargetReason::FailedHealthChecks, description } if description.starts_with("TLS handshake failed")),
            "{result:?}"
        );
    }
}
