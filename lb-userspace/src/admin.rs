//! The admin socket: runtime changes to a running `lb run` (AWS CLI-like verbs).
//!
//! Protocol: one JSON request per line on a Unix stream socket, one JSON response line back.
//! The daemon implements [`Handler`]; `lb targets …` is the client ([`call`]).
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

/// A request to the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// AWS `register-targets`: `OWNER=ADDR[:PORT][,weight=W]` values.
    RegisterTargets {
        /// Target specs, as for `lb run --target`.
        targets: Vec<String>,
    },
    /// AWS `deregister-targets`: `OWNER=ADDR[:PORT]` values.
    DeregisterTargets {
        /// Target specs.
        targets: Vec<String>,
    },
    /// AWS `describe-target-health`.
    DescribeTargets,
}

/// One target as `describe` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetDescription {
    /// VIP (`ADDR:PORT/PROTO`) or target group name.
    pub owner: String,
    /// `ADDR:PORT`.
    pub target: String,
    /// Weight.
    pub weight: u32,
    /// State (`healthy`, …).
    pub state: String,
}

/// The daemon's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was applied.
    pub ok: bool,
    /// What went wrong, if not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Targets (for describe).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetDescription>,
}

impl Response {
    /// Success without data.
    pub fn ok() -> Self {
        Self {
            ok: true,
            ..Self::default()
        }
    }

    /// Failure.
    pub fn error(e: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            error: Some(e.to_string()),
            targets: Vec::new(),
        }
    }
}

/// What the daemon does with requests.
pub trait Handler: Send + Sync + 'static {
    /// Applies one request.
    fn handle(&self, req: Request) -> Response;
}

/// Errors of the admin socket.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Socket setup or I/O failed.
    #[error("admin socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered something unreadable.
    #[error("admin socket {path}: unreadable answer: {source}")]
    Protocol {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
}

/// The bound admin socket; removes the socket file on drop.
pub struct AdminServer {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl AdminServer {
    /// Binds `path`. A stale socket file (nobody listening) is replaced; a live one is an
    /// error, so two daemons never share a socket.
    pub fn bind(path: &Path) -> Result<Self, AdminError> {
        let io = |source| AdminError::Io {
            path: path.into(),
            source,
        };
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
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
        let listener = tokio::net::UnixListener::bind(path).map_err(io)?;
        Ok(Self {
            listener,
            path: path.into(),
        })
    }

    /// Serves requests until the task is dropped.
    pub async fn serve(self, handler: Arc<dyn Handler>) {
        loop {
            let Ok((stream, _)) = self.listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(r).lines();
                // Bounded: one request per line; a client that never sends is dropped with
                // the connection.
                while let Ok(Some(line)) = lines.next_line().await {
                    let resp = match serde_json::from_str::<Request>(&line) {
                        Ok(req) => {
                            let h = handler.clone();
                            tokio::task::spawn_blocking(move || h.handle(req))
                                .await
                                .unwrap_or_else(|e| Response::error(format!("handler failed: {e}")))
                        }
                        Err(e) => Response::error(format!("malformed request: {e}")),
                    };
                    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                    out.push(b'\n');
                    if w.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one request to the daemon at `path` and returns its response.
pub fn call(path: &Path, req: &Request) -> Result<Response, AdminError> {
    let io = |source| AdminError::Io {
        path: path.into(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut line = serde_json::to_vec(req).expect("requests serialize");
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|source| AdminError::Protocol {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    struct Recorder(Mutex<Vec<Request>>);

    impl Handler for Recorder {
        fn handle(&self, req: Request) -> Response {
            self.0.lock().unwrap().push(req.clone());
            match req {
                Request::DeregisterTargets { .. } => Response::error("no such target"),
                _ => Response::ok(),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_round_trip_and_errors_come_back() {
        let dir = std::env::temp_dir().join(format!("lb-admin-test-{}", std::process::id()));
        let path = dir.join("admin.sock");
        let server = AdminServer::bind(&path).unwrap();
        let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
        let task = tokio::spawn(server.serve(rec.clone()));

        let p = path.clone();
        let (a, b) = tokio::task::spawn_blocking(move || {
            let a = call(
                &p,
                &Request::RegisterTargets {
                    targets: vec!["web=10.0.0.11".into()],
                },
            )
            .unwrap();
            let b = call(
                &p,
                &Request::DeregisterTargets {
                    targets: vec!["web=10.0.0.12".into()],
                },
            )
            .unwrap();
            (a, b)
        })
        .await
        .unwrap();
        assert!(a.ok);
        assert_eq!(b.error.as_deref(), Some("no such target"));
        assert_eq!(rec.0.lock().unwrap().len(), 2);

        // A second daemon on the same live socket is refused.
        assert!(AdminServer::bind(&path).is_err());
        task.abort();
        let _ = task.await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
