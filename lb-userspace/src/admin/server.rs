//! The admin API's listeners: HTTP/1.1 on a Unix socket (created mode 0600: root only) and,
//! optionally, on a loopback TCP address where every request must carry the bearer token.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::api::{ApiError, ErrorEnvelope, Request, Response};
use crate::config::AdminTcp;

/// Largest request body accepted (a request is a few hundred bytes).
const MAX_BODY: usize = 1 << 20;

/// What the daemon does with requests.
pub trait Handler: Send + Sync + 'static {
    /// Applies one request.
    fn handle(&self, req: Request) -> Result<Response, ApiError>;

    /// The metrics in Prometheus's text format (`GET /metrics`); `None`: not served.
    fn prometheus(&self) -> Option<String> {
        None
    }
}

/// Errors of the admin listeners.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Socket setup or I/O failed.
    #[error("admin API {place}: {source}")]
    Io {
        /// The socket path or address.
        place: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered something unreadable.
    #[error("admin API {place}: unreadable answer: {problem}")]
    Protocol {
        /// The socket path or address.
        place: String,
        /// What was wrong.
        problem: String,
    },
    /// The daemon refused the request.
    #[error("{0}")]
    Api(#[from] ApiError),
}

/// The bound admin listeners; the socket file is removed on drop.
pub struct AdminServer {
    unix: tokio::net::UnixListener,
    path: PathBuf,
    tcp: Option<(tokio::net::TcpListener, Arc<str>)>,
}

impl AdminServer {
    /// Binds the Unix socket at `path` (mode 0600) and, if given, the TCP listener. A stale
    /// socket file (nobody listening) is replaced; a live one is an error, so two daemons
    /// never share a socket. Must run inside a tokio runtime.
    pub fn bind(path: &Path, tcp: Option<&AdminTcp>) -> Result<Self, AdminError> {
        let io = |source| AdminError::Io {
            place: path.display().to_string(),
            source,
        };
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another lb is listening here (use --admin-socket to pick another path)",
                )));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        // The socket is created with the umask's permissions: make them 0600 from the start
        // rather than chmod afterwards (no window in which others could connect).
        // SAFETY: umask has no preconditions; restored right after the bind.
        let old = unsafe { libc::umask(0o177) };
        let bound = tokio::net::UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let unix = bound.map_err(io)?;
        let tcp = match tcp {
            None => None,
            Some(t) => {
                let std = std::net::TcpListener::bind(t.addr).map_err(|source| AdminError::Io {
                    place: t.addr.to_string(),
                    source,
                })?;
                std.set_nonblocking(true).map_err(|source| AdminError::Io {
                    place: t.addr.to_string(),
                    source,
                })?;
                let l =
                    tokio::net::TcpListener::from_std(std).map_err(|source| AdminError::Io {
                        place: t.addr.to_string(),
                        source,
                    })?;
                Some((l, Arc::from(t.token.as_str())))
            }
        };
        Ok(Self {
            unix,
            path: path.into(),
            tcp,
        })
    }

    /// The TCP listener's address (port 0 resolved).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves both listeners until the task is dropped.
    pub async fn serve(self, handler: Arc<dyn Handler>) {
        let Self { unix, path, tcp } = self;
        let _remove = RemoveOnDrop(path);
        let unix_loop = {
            let handler = handler.clone();
            async move {
                loop {
                    if let Ok((stream, _)) = unix.accept().await {
                        tokio::spawn(serve_conn(stream, handler.clone(), None));
                    }
                }
            }
        };
        match tcp {
            None => unix_loop.await,
            Some((listener, token)) => {
                let tcp_loop = async move {
                    loop {
                        if let Ok((stream, _)) = listener.accept().await {
                            tokio::spawn(serve_conn(stream, handler.clone(), Some(token.clone())));
                        }
                    }
                };
                tokio::join!(unix_loop, tcp_loop);
            }
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn serve_conn<S>(stream: S, handler: Arc<dyn Handler>, token: Option<Arc<str>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let handler = handler.clone();
        let token = token.clone();
        async move { Ok::<_, Infallible>(answer(req, handler, token).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// Compares without an early exit, so the time taken does not tell how much of a guessed
/// token was right.
fn same_token(given: &[u8], want: &[u8]) -> bool {
    if given.len() != want.len() {
        return false;
    }
    given
        .iter()
        .zip(want)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

async fn answer(
    req: http::Request<Incoming>,
    handler: Arc<dyn Handler>,
    token: Option<Arc<str>>,
) -> http::Response<Full<Bytes>> {
    if let Some(token) = token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !same_token(given.as_bytes(), token.as_bytes()) {
            return error(ApiError::new(
                "AccessDenied",
                "this listener needs `Authorization: Bearer <token>` with the token of \
                 --admin-token-file",
            ));
        }
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => {
            return http::Response::new(Full::new(Bytes::from_static(b"ok\n")));
        }
        (&Method::GET, "/metrics") => {
            // Collecting reads the XDP maps (system calls): off the async workers.
            let text = tokio::task::spawn_blocking(move || handler.prometheus())
                .await
                .ok()
                .flatten();
            let Some(text) = text else {
                return error(ApiError::new(
                    "ValidationError",
                    "this daemon serves no metrics",
                ));
            };
            let mut r = http::Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static(crate::metrics::prometheus::CONTENT_TYPE),
            );
            return r;
        }
        (&Method::POST, "/") => {}
        _ => {
            return error(ApiError::new(
                "ValidationError",
                "POST / with a JSON request, e.g. {\"Action\":\"DescribeTargetHealth\"}, \
                 or GET /metrics",
            ));
        }
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error(ApiError::new(
                "ValidationError",
                format!("request body: {e}"),
            ));
        }
    };
    let request: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(ApiError::new(
                "ValidationError",
                format!("malformed request: {e}"),
            ));
        }
    };
    let result = tokio::task::spawn_blocking(move || handler.handle(request))
        .await
        .unwrap_or_else(|e| {
            Err(ApiError::new(
                "InternalError",
                format!("handler failed: {e}"),
            ))
        });
    match result {
        Ok(resp) => json(StatusCode::OK, &resp),
        Err(e) => error(e),
    }
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> http::Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut r = http::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(e: ApiError) -> http::Response<Full<Bytes>> {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    json(status, &ErrorEnvelope { error: e })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::admin::client::{Endpoint, call};

    struct Recorder(Mutex<Vec<Request>>);

    impl Handler for Recorder {
        fn handle(&self, req: Request) -> Result<Response, ApiError> {
            self.0.lock().unwrap().push(req.clone());
            match req {
                Request::DeleteTargetGroup { .. } => {
                    Err(ApiError::new("ResourceInUse", "used by a rule"))
                }
                _ => Ok(Response::default()),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_round_trip_over_both_listeners_and_errors_come_back() {
        let dir = std::env::temp_dir().join(format!("lb-admin-test-{}", std::process::id()));
        let path = dir.join("admin.sock");
        let tcp = AdminTcp {
            addr: "127.0.0.1:0".parse().unwrap(),
            token: "0123456789abcdef".into(),
        };
        let server = AdminServer::bind(&path, Some(&tcp)).unwrap();
        let tcp_addr = server.tcp_addr().unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the socket is root's only");
        let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
        let task = tokio::spawn(server.serve(rec.clone()));

        let p = path.clone();
        let results = tokio::task::spawn_blocking(move || {
            let unix = Endpoint::Unix(p);
            let good = Endpoint::Tcp {
                addr: tcp_addr,
                token: Some("0123456789abcdef".into()),
            };
            let none = Endpoint::Tcp {
                addr: tcp_addr,
                token: None,
            };
            let wrong = Endpoint::Tcp {
                addr: tcp_addr,
                token: Some("0123456789abcdeX".into()),
            };
            let ok = Request::DescribeListeners;
            let refused = Request::DeleteTargetGroup {
                target_group_name: "web".into(),
            };
            (
                call(&unix, &ok).map_err(|e| e.to_string()),
                call(&unix, &refused).map_err(|e| e.to_string()),
                call(&good, &ok).map_err(|e| e.to_string()),
                call(&none, &ok).map_err(|e| e.to_string()),
                call(&wrong, &ok).map_err(|e| e.to_string()),
            )
        })
        .await
        .unwrap();
        assert!(results.0.is_ok(), "{results:?}");
        assert!(
            results.1.as_ref().unwrap_err().contains("ResourceInUse"),
            "{results:?}"
        );
        assert!(results.2.is_ok(), "{results:?}");
        assert!(
            results.3.as_ref().unwrap_err().contains("AccessDenied"),
            "{results:?}"
        );
        assert!(
            results.4.as_ref().unwrap_err().contains("AccessDenied"),
            "{results:?}"
        );
        // Only the three requests that got through reached the handler.
        assert_eq!(rec.0.lock().unwrap().len(), 3);

        // A second daemon on the same live socket is refused.
        assert!(AdminServer::bind(&path, None).is_err());
        task.abort();
        let _ = task.await;
        assert!(
            !path.exists(),
            "the socket file is removed when serving stops"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abd", b"abc"));
        assert!(!same_token(b"ab", b"abc"));
        assert!(!same_token(b"", b"abc"));
    }
}
