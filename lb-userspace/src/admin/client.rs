//! Sending one request to a running daemon's admin API.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::api::{ErrorEnvelope, Request, Response};
use super::server::AdminError;

/// How long one request may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Where the admin API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The Unix socket.
    Unix(PathBuf),
    /// The loopback TCP listener, with its bearer token.
    Tcp {
        /// Its address.
        addr: SocketAddr,
        /// The token.
        token: Option<String>,
    },
}

impl Endpoint {
    fn place(&self) -> String {
        match self {
            Self::Unix(p) => p.display().to_string(),
            Self::Tcp { addr, .. } => addr.to_string(),
        }
    }
}

/// Sends `req` and returns the answer; an error answer becomes [`AdminError::Api`].
pub fn call(endpoint: &Endpoint, req: &Request) -> Result<Response, AdminError> {
    let place = endpoint.place();
    let io = |source| AdminError::Io {
        place: place.clone(),
        source,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io)?;
    rt.block_on(async {
        match tokio::time::timeout(TIMEOUT, send(endpoint, req)).await {
            Ok(r) => r,
            Err(_) => Err(io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer within 30 s",
            ))),
        }
    })
}

async fn send(endpoint: &Endpoint, req: &Request) -> Result<Response, AdminError> {
    let place = endpoint.place();
    let io = |source| AdminError::Io {
        place: place.clone(),
        source,
    };
    match endpoint {
        Endpoint::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path).await.map_err(io)?;
            exchange(s, req, None, &place).await
        }
        Endpoint::Tcp { addr, token } => {
            let s = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
            exchange(s, req, token.as_deref(), &place).await
        }
    }
}

async fn exchange<S>(
    stream: S,
    req: &Request,
    token: Option<&str>,
    place: &str,
) -> Result<Response, AdminError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let protocol = |problem: String| AdminError::Protocol {
        place: place.to_owned(),
        problem,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| protocol(e.to_string()))?;
    tokio::spawn(conn);
    let body = serde_json::to_vec(req).map_err(|e| protocol(e.to_string()))?;
    let mut builder = http::Request::post("/")
        .header(http::header::HOST, "lb")
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let request = builder
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| protocol(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| protocol(e.to_string()))?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| protocol(e.to_string()))?
        .to_bytes();
    if status.is_success() {
        serde_json::from_slice(&bytes).map_err(|e| protocol(e.to_string()))
    } else {
        let envelope: ErrorEnvelope = serde_json::from_slice(&bytes)
            .map_err(|e| protocol(format!("status {status}: {e}")))?;
        Err(AdminError::Api(envelope.error))
    }
}
