//! Small real targets on 127.0.0.1 for the forwarder tests, and request/response helpers.
#![allow(
    dead_code,
    reason = "each test file uses a different part of the support code"
)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use lb::proxy::client::{BoxError, ClientConfig, Forwarded, Forwarder, ProxyBody, TargetEndpoint};
use lb::proxy::error::ProxyError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Safety net for anything a test awaits; never an assertion about speed.
pub const SAFETY: Duration = Duration::from_secs(20);

/// Polls `condition` every 10 ms until it holds; fails the test, saying `what` was awaited and
/// showing `state()`, if it does not hold within [`SAFETY`]. For conditions a test must see
/// happen, instead of sleeping a guessed time and checking once.
pub async fn wait_for<S: std::fmt::Debug>(
    what: &str,
    mut state: impl FnMut() -> S,
    mut condition: impl FnMut(&S) -> bool,
) -> S {
    let deadline = tokio::time::Instant::now() + SAFETY;
    loop {
        let now = state();
        if condition(&now) {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {SAFETY:?} for {what}; last state: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A request body from bytes.
pub fn body(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| -> BoxError { match never {} })
        .boxed_unsync()
}

/// An empty request body.
pub fn empty() -> ProxyBody {
    body(Bytes::new())
}

/// `GET path` with a Host header.
pub fn get(path: &str) -> Request<ProxyBody> {
    request("GET", path, Bytes::new())
}

/// A request with a body and an explicit Content-Length (as the server side forwards them).
pub fn request(method: &str, path: &str, payload: impl Into<Bytes>) -> Request<ProxyBody> {
    let payload = payload.into();
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "app.test");
    if !payload.is_empty() || method == "POST" || method == "PUT" {
        builder = builder.header("content-length", payload.len());
    }
    builder.body(body(payload)).expect("valid test request")
}

/// A plain HTTP/1.1 endpoint at `addr`.
pub fn plain(addr: SocketAddr) -> TargetEndpoint {
    TargetEndpoint {
        addr,
        tls: None,
        http2: false,
    }
}

/// Forwards with the safety net, returning the status and the whole body.
pub async fn forward_collect(
    forwarder: &Forwarder,
    target: &TargetEndpoint,
    req: Request<ProxyBody>,
) -> Result<(Forwarded, Bytes), ProxyError> {
    let mut forwarded = tokio::time::timeout(SAFETY, forwarder.forward(target, req))
        .await
        .expect("forward finished within the safety net")?;
    let body = std::mem::replace(forwarded.response.body_mut(), empty());
    let bytes = tokio::time::timeout(SAFETY, body.collect())
        .await
        .expect("response body finished within the safety net")
        .expect("response body streamed without error")
        .to_bytes();
    Ok((forwarded, bytes))
}

/// A test config: ALB defaults except what the test says.
pub fn config() -> ClientConfig {
    ClientConfig::default()
}

/// What a raw target saw of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Request method.
    pub method: String,
    /// Request target (path).
    pub path: String,
    /// Request body.
    pub body: Vec<u8>,
    /// Which connection (0, 1, …, in accept order).
    pub connection: usize,
    /// 1 for the first request on its connection, 2 for the second, …
    pub nth_on_connection: usize,
    /// The request line and header lines as received (with their CRLFs and the empty line).
    pub head: String,
}

/// How a raw HTTP/1.1 target behaves.
#[derive(Clone, Debug, Default)]
pub struct RawBehaviour {
    /// Close a connection that has been idle (no request byte) this long after a response.
    pub idle_close_after: Option<Duration>,
    /// Only the first this-many connections close when idle (the others never do).
    pub idle_close_first_connections: Option<usize>,
    /// Value of a `Keep-Alive` header added to every response.
    pub keep_alive_header: Option<String>,
    /// Reset (RST) the connection after reading its n-th request, without answering.
    pub reset_after_reading_request: Option<usize>,
    /// Extra header bytes added to every response (`X-Pad: aaaa…`), to test head limits.
    pub pad_response_headers_to: Option<usize>,
    /// A request that arrives on a connection idle at least this long is read, recorded and
    /// then answered with a close (FIN), never a response: the target's idle close crossing
    /// the request on the wire, made deterministic. Whether the target acted on the request is
    /// unknown to the sender, so it must not be sent again unless it is idempotent.
    pub drop_request_after_idle: Option<Duration>,
}

/// A raw-TCP HTTP/1.1 target (only what the tests need: Content-Length bodies, keep-alive),
/// with exact control of when it closes idle connections and a record of every request.
///
/// Requests it cannot understand (a `Transfer-Encoding` body) are recorded as violations, not
/// asserted in its connection tasks, where a panic would go unnoticed: [`RawTarget::seen`] and
/// the drop of the target fail the test when there are any.
pub struct RawTarget {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    violations: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for RawTarget {
    fn drop(&mut self) {
        self.task.abort();
        if !std::thread::panicking() {
            self.assert_no_violations();
        }
    }
}

impl RawTarget {
    /// Starts the target on an ephemeral loopback port.
    pub async fn start(behaviour: RawBehaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let report = Arc::clone(&violations);
        let task = tokio::spawn(async move {
            let mut connection = 0;
            let mut handlers = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                handlers.spawn(serve_raw(
                    stream,
                    connection,
                    behaviour.clone(),
                    Arc::clone(&record),
                    Arc::clone(&report),
                ));
                connection += 1;
            }
        });
        Self {
            addr,
            seen,
            violations,
            task,
        }
    }

    /// Every request seen so far, in order. Fails the test if the target got a request it
    /// could not understand.
    pub fn seen(&self) -> Vec<Seen> {
        self.assert_no_violations();
        self.seen.lock().expect("seen lock").clone()
    }

    fn assert_no_violations(&self) {
        let violations = self.violations.lock().expect("violations lock");
        assert!(
            violations.is_empty(),
            "the raw target got requests it cannot handle: {violations:?}"
        );
    }
}

struct RawRequest {
    method: String,
    path: String,
    head: String,
    body: Vec<u8>,
}

/// Why [`read_request`] returned no request.
enum ReadError {
    /// The connection closed or failed (not a test failure: targets see closes all the time).
    Closed,
    /// The request is one this target does not understand: the test must fail.
    Unsupported(String),
}

/// Reads one request.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<RawRequest, ReadError> {
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| ReadError::Closed)?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let unsupported = || ReadError::Unsupported(head.clone());
    let mut request_line = lines.next().ok_or_else(unsupported)?.split(' ');
    let method = request_line.next().ok_or_else(unsupported)?.to_string();
    let path = request_line.next().ok_or_else(unsupported)?.to_string();
    let mut length = 0usize;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().map_err(|_| unsupported())?;
            }
            if name.trim().eq_ignore_ascii_case("transfer-encoding") {
                // Only Content-Length bodies are understood here.
                return Err(unsupported());
            }
        }
    }
    buf.drain(..head_end);
    while buf.len() < length {
        let mut chunk = [0u8; 4096];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| ReadError::Closed)?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf.drain(..length).collect();
    Ok(RawRequest {
        method,
        path,
        head,
        body,
    })
}

async fn serve_raw(
    mut stream: TcpStream,
    connection: usize,
    behaviour: RawBehaviour,
    seen: Arc<Mutex<Vec<Seen>>>,
    violations: Arc<Mutex<Vec<String>>>,
) {
    let mut buf = Vec::new();
    let mut nth = 0;
    let mut idle_since = tokio::time::Instant::now();
    loop {
        // The idle clock runs from the end of the previous response to the first byte of the
        // next request, as in real servers (nginx keepalive_timeout, Node keepAliveTimeout).
        let closes_when_idle = behaviour
            .idle_close_first_connections
            .is_none_or(|first| connection < first);
        if let (Some(idle), true, true, true) = (
            behaviour.idle_close_after,
            closes_when_idle,
            nth > 0,
            buf.is_empty(),
        ) {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(idle, stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                // Idle too long (or closed): close, as the target's keep-alive timeout does.
                _ => return,
            }
        }
        let request = match read_request(&mut stream, &mut buf).await {
            Ok(request) => request,
            Err(ReadError::Closed) => return,
            Err(ReadError::Unsupported(head)) => {
                violations.lock().expect("violations lock").push(head);
                return;
            }
        };
        nth += 1;
        seen.lock().expect("seen lock").push(Seen {
            method: request.method.clone(),
            path: request.path.clone(),
            body: request.body.clone(),
            connection,
            nth_on_connection: nth,
            head: request.head.clone(),
        });
        if let Some(idle) = behaviour.drop_request_after_idle
            && nth > 1
            && idle_since.elapsed() >= idle
        {
            let _ = stream.shutdown().await;
            return;
        }
        if behaviour.reset_after_reading_request == Some(nth) {
            // SO_LINGER 0: close() sends RST instead of FIN (and does not block).
            #[expect(deprecated, reason = "a zero linger never blocks the thread on drop")]
            let _ = stream.set_linger(Some(Duration::ZERO));
            return;
        }
        let payload = format!(
            "{} {} #{nth} on connection {connection}",
            request.method, request.path
        );
        let mut head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n", payload.len());
        if let Some(keep_alive) = &behaviour.keep_alive_header {
            head.push_str(&format!("Keep-Alive: {keep_alive}\r\n"));
        }
        if let Some(pad) = behaviour.pad_response_headers_to {
            let fill = pad.saturating_sub(head.len() + "X-Pad: \r\n\r\n".len());
            head.push_str(&format!("X-Pad: {}\r\n", "a".repeat(fill)));
        }
        head.push_str("\r\n");
        if stream.write_all(head.as_bytes()).await.is_err()
            || stream.write_all(payload.as_bytes()).await.is_err()
        {
            return;
        }
        idle_since = tokio::time::Instant::now();
    }
}

/// A target that accepts connections and answers each with `bytes` (then keeps it open).
pub async fn answering_target(bytes: &'static [u8]) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    let task = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = Vec::new();
            if read_request(&mut stream, &mut buf).await.is_ok() {
                let _ = stream.write_all(bytes).await;
            }
            open.push(stream);
        }
    });
    (addr, task)
}
