//! Making new connections to a target, and the driver task that runs each one.
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{ClientConfig, Conn, ProxyBody, Target};
use crate::proxy::error::{ProxyError, TargetTlsError};
use crate::proxy::pool::{ConnId, ConnShared, DriverAction, H1Conn, H2Conn, RawConn, TargetPool};

/// Connects to `target` (TCP with `TCP_NODELAY`, TLS if configured, HTTP handshake) within the
/// connect timeout, and starts the connection's driver task.
pub(super) async fn connect(
    target: &Target,
    config: &ClientConfig,
) -> Result<(Conn, Duration), ProxyError> {
    let started = Instant::now();
    let addr = target.endpoint.addr;
    match tokio::time::timeout(config.connect_timeout, establish(target, config)).await {
        Ok(Ok(conn)) => Ok((conn, started.elapsed())),
        Ok(Err(error)) => Err(error),
        Err(_elapsed) => Err(ProxyError::ConnectTimeout {
            target: addr.to_string(),
        }),
    }
}

/// Connects a plain-TCP HTTP/1.1 connection for our own client (`h1`), within the connect
/// timeout. No driver task: the pool's sweeper watches it while it is idle.
pub(super) async fn connect_raw(
    target: &Target,
    config: &ClientConfig,
) -> Result<(Box<RawConn>, Duration), ProxyError> {
    let started = Instant::now();
    let addr = target.endpoint.addr;
    let tcp = match tokio::time::timeout(config.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(error)) => return Err(connect_error(addr, error)),
        Err(_elapsed) => {
            return Err(ProxyError::ConnectTimeout {
                target: addr.to_string(),
            });
        }
    };
    // Heads are written whole; Nagle would only delay the last segment.
    tcp.set_nodelay(true).map_err(|e| connect_error(addr, e))?;
    let conn = Box::new(RawConn {
        id: target.pool().next_id(),
        stream: tcp,
        buf: bytes::BytesMut::new(),
        timer: None,
        names: crate::proxy::names::HeaderNames::new(),
    });
    Ok((conn, started.elapsed()))
}

/// Hands a raw connection (pooled or new) to hyper's client, for a request that stays on hyper
/// on a plain-TCP target (an `Upgrade` request). The connection is not pooled again unless
/// hyper's path gives it back as a hyper connection.
pub(super) async fn into_hyper(
    target: &Target,
    config: &ClientConfig,
    conn: Box<RawConn>,
) -> Result<Conn, ProxyError> {
    let addr = target.endpoint.addr;
    let RawConn {
        id, stream, buf, ..
    } = *conn;
    if !buf.is_empty() {
        return Err(connect_error(
            addr,
            io::Error::other("unread bytes on an idle connection"),
        ));
    }
    let io = TokioIo::new(TargetStream::Plain(stream));
    let (sender, connection) = http1::Builder::new()
        .max_header_size(config.max_response_header_bytes)
        .handshake::<_, ProxyBody>(io)
        .await
        .map_err(|e| connect_error(addr, e))?;
    let shared = Arc::new(ConnShared::default());
    tokio::spawn(drive_h1(
        Arc::clone(target.pool()),
        id,
        Arc::clone(&shared),
        connection.with_upgrades(),
        addr,
    ));
    Ok(Conn::H1(H1Conn { id, sender, shared }))
}

fn connect_error(addr: SocketAddr, source: impl Into<super::BoxError>) -> ProxyError {
    ProxyError::Connect {
        target: addr.to_string(),
        source: source.into(),
    }
}

async fn establish(target: &Target, config: &ClientConfig) -> Result<Conn, ProxyError> {
    let addr = target.endpoint.addr;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| connect_error(addr, e))?;
    // Requests are written whole by hyper; Nagle would only delay the last segment.
    tcp.set_nodelay(true).map_err(|e| connect_error(addr, e))?;
    let stream = match &target.tls {
        None => TargetStream::Plain(tcp),
        Some(Err(reason)) => {
            return Err(connect_error(
                addr,
                TargetTlsError(format!("TLS configuration: {reason}").into()),
            ));
        }
        Some(Ok((tls_config, server_name))) => {
            let tls = TlsConnector::from(Arc::clone(tls_config))
                .connect(server_name.clone(), tcp)
                .await
                .map_err(|e| connect_error(addr, TargetTlsError(Box::new(e))))?;
            TargetStream::Tls(Box::new(tls))
        }
    };
    let io = TokioIo::new(stream);
    let pool = Arc::clone(target.pool());
    let id = pool.next_id();
    let shared = Arc::new(ConnShared::default());
    if target.endpoint.http2 {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(
                u32::try_from(config.max_response_header_bytes).unwrap_or(u32::MAX),
            )
            .handshake::<_, ProxyBody>(io)
            .await
            .map_err(|e| connect_error(addr, e))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(target_addr = %addr, %error, "HTTP/2 target connection ended");
            }
            pool.on_connection_ended(id, &shared);
        });
        let conn = H2Conn { id, sender };
        target.pool().set_h2(&conn);
        Ok(Conn::H2(conn))
    } else {
        // The byte limit is ALB's. The count stays at hyper's default (100 header fields, as
        // Envoy's; more is a 502): any explicit count makes hyper allocate and fill two arrays
        // of header slots for every response.
        let (sender, connection) = http1::Builder::new()
            .max_header_size(config.max_response_header_bytes)
            .handshake::<_, ProxyBody>(io)
            .await
            .map_err(|e| connect_error(addr, e))?;
        let driver_shared = Arc::clone(&shared);
        tokio::spawn(drive_h1(
            pool,
            id,
            driver_shared,
            connection.with_upgrades(),
            addr,
        ));
        Ok(Conn::H1(H1Conn { id, sender, shared }))
    }
}

/// Runs an HTTP/1.1 connection until it ends, and enforces its idle deadlines: retiring it
/// from reuse before the target's idle-close time and closing it after our idle timeout.
async fn drive_h1(
    pool: Arc<TargetPool>,
    id: ConnId,
    shared: Arc<ConnShared>,
    connection: impl Future<Output = hyper::Result<()>>,
    addr: SocketAddr,
) {
    let mut connection = pin!(connection);
    loop {
        let deadline = pool.idle_deadline(id);
        // Far enough to never fire; only polled when there is a deadline anyway.
        let sleep = tokio::time::sleep_until(
            deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400)),
        );
        tokio::select! {
            ended = &mut connection => {
                if let Err(error) = ended {
                    tracing::debug!(target_addr = %addr, %error, "HTTP/1.1 target connection ended");
                }
                break;
            }
            () = shared.wake.notified() => {}
            () = sleep, if deadline.is_some() => {
                if pool.on_idle_deadline(id) == DriverAction::Close {
                    // Dropping the connection closes it.
                    return;
                }
            }
        }
    }
    pool.on_connection_ended(id, &shared);
}

/// A connection to a target: plain TCP or TLS over TCP.
pub(super) enum TargetStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (boxed: the TLS state is large).
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for TargetStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TargetStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}
