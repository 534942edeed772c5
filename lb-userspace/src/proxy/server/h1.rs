//! HTTP/1 served by the connection's own task, without hyper (the "native" path).
//!
//! The sniffer (`sniff.rs`, in native mode) reads the client's bytes, finds and limits each
//! request head, classifies it and turns it straight into the request parts the pipeline takes
//! (`head::prepare_parts`: no head is rebuilt as bytes and parsed again). This loop hands each
//! request to the pipeline (`pipeline::handle`, the same one hyper calls) with a body that
//! reads the request's own framing from the connection ([`RequestBody`]), then writes the
//! response the way hyper's HTTP/1 server does (`encode_head`: same status line, header lines,
//! `Date`, framing, `Connection` rules), and goes on with the next request in the buffer.
//!
//! What this loop does not serve it hands to hyper at a request boundary ([`Ended::Handoff`]):
//! a request that may upgrade the connection (`Upgrade`, CONNECT) and the HTTP/2 preface. The
//! sniffer then replays, from that head on, exactly what hyper would have got, and hyper serves
//! the rest of the connection as it does when the native path is off.
//!
//! Rules kept from hyper (hyper 1.x `proto/h1`), so both paths answer alike:
//! - keep-alive: HTTP/1.1 unless a `Connection` header says `close`; HTTP/1.0 only with
//!   `Connection: keep-alive` (then echoed in the response); a response to HTTP/1.0 says
//!   `HTTP/1.0`; a closing HTTP/1.1 connection's response says `Connection: close`.
//! - framing: the response's `Content-Length` (or its body's exact size), else chunked for
//!   HTTP/1.1 and close-delimited for HTTP/1.0; nothing after the head for HEAD, 204 and 304
//!   (a HEAD response keeps the target's `Content-Length`); trailers only when the request said
//!   `TE: trailers` and the response's `Trailer` header names them.
//! - `Expect: 100-continue` (HTTP/1.1, with a body): `100 Continue` is sent when the body is
//!   first read, unless the response has started.
//! - the client closing its end while a request is in flight ends the request (460), as
//!   hyper's read-side EOF detection does; a request body nobody read (a fixed response to a
//!   POST) is discarded after the response when it has arrived whole, else the connection
//!   closes.
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tokio::io::{AsyncRead, AsyncWrite};

use super::L7Counters;
use super::pipeline::{self, ConnCtx};
use super::sniff::{ChunkPiece, ChunkScan, Native, NativeEvent, Sniffer};
use super::spares::Spares;
use crate::headers::has_token;
use crate::proxy::client::ProxyBody;
use crate::proxy::client::h1::parse_trailers;

/// How a native connection ended.
pub(super) enum Ended<IO> {
    /// Closed (client gone, `Connection: close`, idle, drain, an error).
    Closed,
    /// hyper serves the rest: the sniffer replays from the request that needs it.
    Handoff(Box<Sniffer<IO>>),
}

/// Lets the connection's control loop (keep-alive lifetime, drain) close the connection the
/// way hyper's `graceful_shutdown` does: at once when no request is in progress, otherwise
/// after the current response (with `Connection: close`).
#[derive(Debug, Default)]
pub(super) struct Control {
    idle: AtomicBool,
    closing: AtomicBool,
}

impl Control {
    /// Asks the connection to close; true if it is idle and can just be dropped now.
    pub fn shutdown(&self) -> bool {
        self.closing.store(true, Ordering::Relaxed);
        self.idle.load(Ordering::Relaxed)
    }

    /// Whether [`Control::shutdown`] was called (keep-alive disabled).
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }
}

/// The connection, shared by the loop and the request body it lends to the pipeline.
struct ConnIo<IO> {
    /// `None` once handed to hyper.
    sniffer: Option<Sniffer<IO>>,
    /// A request boundary read while watching for the client's EOF during a request.
    stash: Option<NativeEvent>,
    /// The current request's body has bytes not read yet.
    body_open: bool,
    /// The response head is being written: no more `100 Continue`.
    responding: bool,
}

type Shared<IO> = Arc<Mutex<ConnIo<IO>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "client connection handed off")
}

/// What the response writer needs to know about the request.
#[cfg_attr(test, derive(Debug, PartialEq, Eq))]
struct RequestInfo {
    version: Version,
    head: bool,
    connect: bool,
    keep_alive: bool,
    te_trailers: bool,
}

/// How the request's body is framed, as its headers say (the sniffer made them: at most one
/// framing header, checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BodyFraming {
    chunked: bool,
    /// The first `Content-Length` (0 without one, or if it does not parse).
    length: u64,
    /// HTTP/1.1 with `Expect: 100-continue` (the last `Expect` field).
    expect_continue: bool,
}

impl RequestInfo {
    /// What the response writer and the request body need from the request, from one pass
    /// over its headers: the five lookups this replaces (`Connection`, `TE`,
    /// `Transfer-Encoding`, `Content-Length`, `Expect`) each hashed a name and probed the map.
    /// [`RequestInfo::of_by_lookup`] is the same by lookups (the tests compare them).
    fn scan(parts: &http::request::Parts) -> (Self, BodyFraming) {
        let version = parts.version;
        let mut keep_alive = version == Version::HTTP_11;
        let mut saw_close = false;
        let mut te_trailers = false;
        let mut chunked = false;
        let mut length: Option<&HeaderValue> = None;
        let mut expect: Option<&HeaderValue> = None;
        for (name, value) in &parts.headers {
            if *name == header::CONNECTION {
                if saw_close || has_token(value, "close") {
                    saw_close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = has_token(value, "keep-alive");
                }
            } else if *name == header::CONTENT_LENGTH {
                length = length.or(Some(value));
            } else if *name == header::TRANSFER_ENCODING {
                chunked = true;
            } else if *name == header::TE {
                te_trailers = te_trailers || has_token(value, "trailers");
            } else if *name == header::EXPECT {
                expect = Some(value);
            }
        }
        let info = Self {
            version,
            head: parts.method == Method::HEAD,
            connect: parts.method == Method::CONNECT,
            keep_alive,
            te_trailers,
        };
        let framing = BodyFraming {
            chunked,
            length: length
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0),
            expect_continue: version == Version::HTTP_11
                && expect.is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue")),
        };
        (info, framing)
    }

    /// [`RequestInfo::scan`] by lookups, one per header name: the reference the tests hold
    /// the scan to.
    #[cfg(test)]
    fn of_by_lookup(parts: &http::request::Parts) -> (Self, BodyFraming) {
        let version = parts.version;
        let mut keep_alive = version == Version::HTTP_11;
        let mut saw_close = false;
        for value in parts.headers.get_all(header::CONNECTION) {
            if saw_close || has_token(value, "close") {
                saw_close = true;
                keep_alive = false;
            } else if !keep_alive {
                keep_alive = has_token(value, "keep-alive");
            }
        }
        let info = Self {
            version,
            head: parts.method == Method::HEAD,
            connect: parts.method == Method::CONNECT,
            keep_alive,
            te_trailers: parts
                .headers
                .get_all(header::TE)
                .iter()
                .any(|v| has_token(v, "trailers")),
        };
        let framing = BodyFraming {
            chunked: parts.headers.contains_key(header::TRANSFER_ENCODING),
            length: parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0),
            expect_continue: parts.version == Version::HTTP_11
                && parts
                    .headers
                    .get_all(header::EXPECT)
                    .iter()
                    .next_back()
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue")),
        };
        (info, framing)
    }
}

/// The request the load balancer answers itself after the sniffer refused a head (what hyper
/// parses from the sniffer's synthetic head on the hyper path).
fn synthetic_parts() -> http::request::Parts {
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.uri = http::Uri::from_static("/");
    parts
        .headers
        .insert(header::HOST, HeaderValue::from_static("lb.invalid"));
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    parts
}

/// Serves HTTP/1 requests on `sniffer` (in native mode) until the connection closes or a
/// request needs hyper.
pub(super) async fn serve<IO>(
    ctx: Arc<ConnCtx>,
    sniffer: Sniffer<IO>,
    control: Arc<Control>,
) -> Ended<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io: Shared<IO> = Arc::new(Mutex::new(ConnIo {
        sniffer: Some(sniffer),
        stash: None,
        body_open: false,
        responding: false,
    }));
    let counters = ctx.listener.shared.counters.clone();
    let mut wbuf = Vec::with_capacity(1024);
    // The watches on the targets this connection's requests went to, kept for its next ones.
    let mut watches = pipeline::TargetWatches::default();
    loop {
        control.idle.store(true, Ordering::Relaxed);
        if control.closing() {
            return Ended::Closed;
        }
        let event = std::future::poll_fn(|cx| next_event(&io, cx)).await;
        control.idle.store(false, Ordering::Relaxed);
        let parts = match event {
            Ok(NativeEvent::Head(parts)) => super::head::unbox_parts(parts),
            Ok(NativeEvent::Synthetic) => synthetic_parts(),
            Ok(NativeEvent::Handoff) => {
                L7Counters::add(&counters.http1_handoffs, 1);
                return match lock(&io).sniffer.take() {
                    Some(s) => Ended::Handoff(Box::new(s)),
                    None => Ended::Closed,
                };
            }
            Err(_) => return Ended::Closed,
        };
        counters.http1_native_requests.add(1);
        let (info, framing) = RequestInfo::scan(&parts);
        let body = RequestBody::new(&io, framing);
        {
            let mut g = lock(&io);
            g.body_open = !body.is_end_stream();
            g.responding = false;
        }
        let (request, body_in) = pipeline::forwardable(Request::from_parts(parts, body));
        // Made in a block of this thread's (see [`Reused`]), written where it is made: the
        // handler's future is several KiB, and handing it over by value moved (copied) it.
        let mut handled =
            Reused::new(|| pipeline::handle(&ctx, request, body_in, Some(&mut watches)));
        let response = watch_client(&io, handled.as_mut()).await;
        // The block goes back now, for the next request the thread starts (on any connection).
        drop(handled);
        let Some(response) = response else {
            // The client went away: the handler was dropped (460) and there is no one to
            // answer.
            return Ended::Closed;
        };
        lock(&io).responding = true;
        let keep_alive = info.keep_alive && !control.closing();
        let Ok(response) = response;
        let close = match write_response(&io, response, &info, keep_alive, &mut wbuf).await {
            Ok(close) => close,
            Err(e) => {
                tracing::debug!(client = %ctx.peer, error = %e, "writing the response failed");
                return Ended::Closed;
            }
        };
        if close || !drain_body(&io) {
            // A body not read to its end leaves the connection's framing unknown.
            let _ =
                std::future::poll_fn(|cx| with_io(&io, cx, |s, cx| Pin::new(s).poll_shutdown(cx)))
                    .await;
            return Ended::Closed;
        }
    }
}

/// A value (the handler's future) in a heap block taken from the blocks this thread gave
/// back ([`Spares`], the one given back last first). The handler's future lived inside the
/// connection's own future, whose memory one request touched again only after every other
/// connection's request had gone through the L1 data cache; a block just given back by the
/// request that finished is likely still there.
pub(super) struct Reused<F> {
    ptr: std::ptr::NonNull<F>,
}

// SAFETY: `Reused<F>` owns its `F` as a `Box<F>` does; the block goes back to the list of the
// thread that drops it (the allocator frees across threads).
unsafe impl<F: Send> Send for Reused<F> {}

impl<F> Reused<F> {
    /// `make()`'s value in a block: a kept one of `F`'s layout, else a new allocation.
    pub fn new(make: impl FnOnce() -> F) -> Self {
        let layout = std::alloc::Layout::new::<F>();
        assert!(layout.size() > 0, "Reused holds no zero-sized values");
        let block = Spares::take(layout).unwrap_or_else(|| {
            // SAFETY: `layout` is not zero-sized.
            let p = unsafe { std::alloc::alloc(layout) };
            std::ptr::NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
        });
        let ptr = block.cast::<F>();
        // SAFETY: the block has `F`'s layout and holds nothing.
        unsafe { ptr.as_ptr().write(make()) };
        Self { ptr }
    }

    /// The value, pinned: it never moves until it is dropped.
    pub fn as_mut(&mut self) -> Pin<&mut F> {
        // SAFETY: `ptr` holds an `F` until `drop`, and the block is not moved or reused before.
        unsafe { Pin::new_unchecked(self.ptr.as_mut()) }
    }
}

impl<F> Drop for Reused<F> {
    fn drop(&mut self) {
        // SAFETY: `ptr` holds an `F`, dropped once, here; its block was allocated by the
        // global allocator with `F`'s layout (`new`) and is used by nothing after.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            Spares::put(self.ptr.cast::<u8>(), std::alloc::Layout::new::<F>());
        }
    }
}

/// After a response whose request body was not read to its end (a fixed response or a
/// redirect to a POST, say): discards what of it has arrived already, as hyper does. True if
/// the body is over (the connection can serve the next request), false if the rest of it has
/// not arrived (the connection closes).
fn drain_body<IO: AsyncRead + Unpin>(io: &Shared<IO>) -> bool {
    let mut g = lock(io);
    if !g.body_open {
        return true;
    }
    let conn = &mut *g;
    let Some(s) = conn.sniffer.as_mut() else {
        return false;
    };
    let mut cx = Context::from_waker(std::task::Waker::noop());
    loop {
        match s.poll_native(&mut cx) {
            Poll::Ready(Ok(Native::Data(_))) => {}
            Poll::Ready(Ok(Native::Event(e))) => {
                conn.stash = Some(e);
                break;
            }
            Poll::Ready(Ok(Native::Eof) | Err(_)) => return false,
            Poll::Pending if s.in_body() => return false,
            Poll::Pending => break,
        }
    }
    conn.body_open = false;
    true
}

/// The next request boundary (`Err` when the connection is over).
fn next_event<IO: AsyncRead + Unpin>(
    io: &Shared<IO>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<NativeEvent>> {
    let mut g = lock(io);
    if let Some(e) = g.stash.take() {
        return Poll::Ready(Ok(e));
    }
    let Some(s) = g.sniffer.as_mut() else {
        return Poll::Ready(Err(gone()));
    };
    loop {
        match ready!(s.poll_native(cx)) {
            Ok(Native::Event(e)) => return Poll::Ready(Ok(e)),
            // Bytes of a body nobody reads: the connection closes after such a request,
            // so this is not reached; skip them if it is.
            Ok(Native::Data(_)) => {}
            Ok(Native::Eof) => {
                return Poll::Ready(Err(io::Error::from(io::ErrorKind::UnexpectedEof)));
            }
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Runs `handled` while watching the client's side: `None` if the client closed (or the
/// connection failed) first. Watching stops at the next request's head (kept for later) and
/// while the request body is still being read (its reader sees the EOF).
async fn watch_client<IO, F>(io: &Shared<IO>, mut handled: Pin<&mut F>) -> Option<F::Output>
where
    IO: AsyncRead + Unpin,
    F: Future,
{
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = handled.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        let mut g = lock(io);
        if g.body_open || g.stash.is_some() {
            return Poll::Pending;
        }
        let Some(s) = g.sniffer.as_mut() else {
            return Poll::Pending;
        };
        match s.poll_native(cx) {
            Poll::Ready(Ok(Native::Event(e))) => {
                g.stash = Some(e);
                Poll::Pending
            }
            Poll::Ready(Ok(Native::Data(_))) => Poll::Pending,
            Poll::Ready(Ok(Native::Eof) | Err(_)) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Calls `f` with the connection (an error once it was handed off).
fn with_io<IO, T>(
    io: &Shared<IO>,
    cx: &mut Context<'_>,
    f: impl FnOnce(&mut Sniffer<IO>, &mut Context<'_>) -> Poll<io::Result<T>>,
) -> Poll<io::Result<T>> {
    let mut g = lock(io);
    match g.sniffer.as_mut() {
        Some(s) => f(s, cx),
        None => Poll::Ready(Err(gone())),
    }
}

/// Writes `buf` and then `data` (one `writev` where the connection supports it), and
/// empties `buf`. What is left in one piece (a head with its body copied behind it, the usual
/// case) goes in a plain write: on a TCP socket `send`, which skips the VFS layer and the
/// iovec import a `writev` costs in the kernel.
async fn write_out<IO: AsyncWrite + Unpin>(
    io: &Shared<IO>,
    buf: &mut Vec<u8>,
    data: Option<&[u8]>,
) -> io::Result<()> {
    let data = data.unwrap_or_default();
    let mut done = 0usize;
    let total = buf.len() + data.len();
    while done < total {
        let n = std::future::poll_fn(|cx| {
            with_io(io, cx, |s, cx| {
                let (first, second) = if done < buf.len() {
                    (&buf[done..], data)
                } else {
                    (&data[done - buf.len()..], &[][..])
                };
                if second.is_empty() {
                    Pin::new(s).poll_write(cx, first)
                } else {
                    let slices = [io::IoSlice::new(first), io::IoSlice::new(second)];
                    Pin::new(s).poll_write_vectored(cx, &slices)
                }
            })
        })
        .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    buf.clear();
    Ok(())
}

async fn flush<IO: AsyncWrite + Unpin>(io: &Shared<IO>) -> io::Result<()> {
    std::future::poll_fn(|cx| with_io(io, cx, |s, cx| Pin::new(s).poll_flush(cx))).await
}

/// How the response body is delimited on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Encoder {
    Length(u64),
    Chunked(Option<Vec<HeaderName>>),
    CloseDelimited,
}

/// What hyper knows of a response body before sending it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyLength {
    /// Empty (`is_end_stream`).
    None,
    Known(u64),
    Unknown,
}

fn can_chunked(info: &RequestInfo, status: StatusCode) -> bool {
    if info.head || info.connect && status.is_success() || status.is_informational() {
        false
    } else {
        !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
    }
}

fn can_have_content_length(info: &RequestInfo, status: StatusCode) -> bool {
    if status.is_informational() || info.connect && status.is_success() {
        false
    } else {
        !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
    }
}

/// A response header the writer refuses (hyper's "user header" error): nothing is sent and
/// the connection closes.
#[derive(Debug)]
struct BadResponseHeader(&'static str);

/// Writes the response head into `dst` as hyper's HTTP/1 server does (`Server::encode` and
/// `Conn::enforce_version` in hyper 1.x); returns the body's framing and whether the
/// connection closes after this response.
fn encode_head(
    dst: &mut Vec<u8>,
    parts: &mut http::response::Parts,
    info: &RequestInfo,
    body: BodyLength,
    mut keep_alive: bool,
) -> Result<(Encoder, bool), BadResponseHeader> {
    let status = parts.status;
    let out_version = if info.version == Version::HTTP_10 {
        let says_keep_alive = parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, "keep-alive"));
        if !says_keep_alive {
            match parts.version {
                Version::HTTP_10 => keep_alive = false,
                Version::HTTP_11 if keep_alive => {
                    parts
                        .headers
                        .append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
                }
                _ => {}
            }
        }
        Version::HTTP_10
    } else {
        if !keep_alive
            && !parts
                .headers
                .get_all(header::CONNECTION)
                .iter()
                .any(|v| has_token(v, "close"))
        {
            parts
                .headers
                .append(header::CONNECTION, HeaderValue::from_static("close"));
        }
        parts.version
    };
    let mut is_last = !keep_alive || status == StatusCode::SWITCHING_PROTOCOLS;
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    if out_version == Version::HTTP_11 && status == StatusCode::OK && reason.is_none() {
        dst.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        dst.extend_from_slice(if out_version == Version::HTTP_10 {
            b"HTTP/1.0 "
        } else {
            b"HTTP/1.1 "
        });
        dst.extend_from_slice(status.as_str().as_bytes());
        dst.push(b' ');
        match reason {
            Some(r) => dst.extend_from_slice(r.as_bytes()),
            None => dst.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
        }
        dst.extend_from_slice(b"\r\n");
    }

    let chunkable = out_version != Version::HTTP_10 && can_chunked(info, status);
    let mut encoder = Encoder::Length(0);
    let mut trailers: Option<Vec<HeaderName>> = None;
    let mut wrote_len = false;
    let mut wrote_date = false;
    let mut is_name_written = false;
    let mut must_write_chunked = false;
    let mut prev_len: Option<u64> = None;
    let mut prev_name: Option<&HeaderName> = None;
    for (name, value) in &parts.headers {
        if prev_name != Some(name) {
            if is_name_written {
                dst.extend_from_slice(if must_write_chunked {
                    b", chunked\r\n"
                } else {
                    b"\r\n"
                });
            }
            is_name_written = false;
            prev_name = Some(name);
        }
        match *name {
            header::CONTENT_LENGTH => {
                if wrote_len && !is_name_written {
                    return Err(BadResponseHeader("content-length next to a framing header"));
                }
                match body {
                    BodyLength::Known(n) => {
                        if !is_name_written {
                            encoder = Encoder::Length(n);
                            dst.extend_from_slice(b"content-length: ");
                            dst.extend_from_slice(value.as_bytes());
                            wrote_len = true;
                            is_name_written = true;
                        }
                        continue;
                    }
                    BodyLength::Unknown => {
                        let Some(n) = crate::proxy::desync::parse_content_length(value.as_bytes())
                        else {
                            return Err(BadResponseHeader("invalid content-length"));
                        };
                        if let Some(prev) = prev_len {
                            if prev != n {
                                return Err(BadResponseHeader("conflicting content-length"));
                            }
                            continue;
                        }
                        encoder = Encoder::Length(n);
                        dst.extend_from_slice(b"content-length: ");
                        dst.extend_from_slice(value.as_bytes());
                        wrote_len = true;
                        is_name_written = true;
                        prev_len = Some(n);
                        continue;
                    }
                    BodyLength::None => {
                        if !info.head {
                            continue;
                        }
                    }
                }
                wrote_len = true;
            }
            header::TRANSFER_ENCODING => {
                if wrote_len && !is_name_written {
                    return Err(BadResponseHeader(
                        "transfer-encoding next to a framing header",
                    ));
                }
                if !chunkable {
                    continue;
                }
                wrote_len = true;
                must_write_chunked = !value
                    .to_str()
                    .ok()
                    .and_then(|s| s.rsplit(',').next())
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
                if is_name_written {
                    dst.extend_from_slice(b", ");
                } else {
                    encoder = Encoder::Chunked(None);
                    is_name_written = true;
                    dst.extend_from_slice(b"transfer-encoding: ");
                }
                dst.extend_from_slice(value.as_bytes());
                continue;
            }
            header::CONNECTION => {
                if !is_last && has_token(value, "close") {
                    is_last = true;
                }
                if is_name_written {
                    dst.extend_from_slice(b", ");
                } else {
                    is_name_written = true;
                    dst.extend_from_slice(b"connection: ");
                }
                dst.extend_from_slice(value.as_bytes());
                continue;
            }
            header::DATE => wrote_date = true,
            header::TRAILER => {
                if !chunkable {
                    continue;
                }
                if is_name_written {
                    dst.extend_from_slice(b", ");
                } else {
                    is_name_written = true;
                    dst.extend_from_slice(b"trailer: ");
                }
                dst.extend_from_slice(value.as_bytes());
                if let Ok(s) = value.to_str() {
                    trailers.get_or_insert_default().extend(
                        s.split(',')
                            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok()),
                    );
                }
                continue;
            }
            _ => {}
        }
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    if is_name_written {
        dst.extend_from_slice(if must_write_chunked {
            b", chunked\r\n"
        } else {
            b"\r\n"
        });
    }
    if !wrote_len {
        encoder = match body {
            BodyLength::Unknown => {
                if chunkable {
                    dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    Encoder::Chunked(None)
                } else {
                    Encoder::CloseDelimited
                }
            }
            BodyLength::None | BodyLength::Known(0) => {
                if can_have_content_length(info, status) && !info.head {
                    dst.extend_from_slice(b"content-length: 0\r\n");
                }
                Encoder::Length(0)
            }
            BodyLength::Known(n) => {
                if can_have_content_length(info, status) {
                    dst.extend_from_slice(b"content-length: ");
                    dst.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                    dst.extend_from_slice(b"\r\n");
                    Encoder::Length(n)
                } else {
                    Encoder::Length(0)
                }
            }
        };
    }
    if !can_chunked(info, status) {
        encoder = Encoder::Length(0);
    }
    if wrote_date {
        dst.extend_from_slice(b"\r\n");
    } else {
        dst.extend_from_slice(b"date: ");
        crate::proxy::date::with_current(|date| dst.extend_from_slice(date.as_bytes()));
        dst.extend_from_slice(b"\r\n\r\n");
    }
    if let (Encoder::Chunked(allowed), Some(names)) = (&mut encoder, trailers) {
        *allowed = Some(names);
    }
    let close = is_last || encoder == Encoder::CloseDelimited;
    Ok((encoder, close))
}

/// Trailer fields hyper never sends (`is_valid_trailer_field`).
fn forbidden_trailer(name: &HeaderName) -> bool {
    matches!(
        *name,
        header::AUTHORIZATION
            | header::CACHE_CONTROL
            | header::CONTENT_ENCODING
            | header::CONTENT_LENGTH
            | header::CONTENT_RANGE
            | header::CONTENT_TYPE
            | header::HOST
            | header::MAX_FORWARDS
            | header::SET_COOKIE
            | header::TRAILER
            | header::TRANSFER_ENCODING
            | header::TE
    )
}

/// Bodies up to this size are copied behind the head (one write); bigger ones go in a writev.
const COPY_BELOW: usize = 16 * 1024;
/// Buffered response bytes are written once this many are pending.
const WRITE_AT: usize = 64 * 1024;

/// Writes one response; `Ok(true)` if the connection must close after it.
async fn write_response<IO: AsyncWrite + Unpin>(
    io: &Shared<IO>,
    response: Response<ProxyBody>,
    info: &RequestInfo,
    keep_alive: bool,
    buf: &mut Vec<u8>,
) -> io::Result<bool> {
    let (mut parts, mut body) = response.into_parts();
    let length = if body.is_end_stream() {
        BodyLength::None
    } else {
        body.size_hint()
            .exact()
            .map_or(BodyLength::Unknown, BodyLength::Known)
    };
    buf.clear();
    let (mut encoder, close) = match encode_head(buf, &mut parts, info, length, keep_alive) {
        Ok(e) => e,
        Err(BadResponseHeader(why)) => {
            buf.clear();
            return Err(io::Error::new(io::ErrorKind::InvalidData, why));
        }
    };
    // The head is written out: its map serves another request.
    crate::proxy::recycle::recycle(std::mem::take(&mut parts.headers));
    if encoder == Encoder::Length(0) {
        // Nothing after the head (HEAD, 204, 304, empty): the body is not polled, as in hyper.
        drop(body);
        write_out(io, buf, None).await?;
        flush(io).await?;
        return Ok(close);
    }
    loop {
        let frame = match body.frame().now_or_never() {
            Some(frame) => frame,
            None => {
                // The body has nothing yet: send what is ready and wait.
                if !buf.is_empty() {
                    write_out(io, buf, None).await?;
                    flush(io).await?;
                }
                body.frame().await
            }
        };
        let frame = match frame {
            None => break,
            Some(Err(e)) => {
                // hyper aborts the connection when the response body fails.
                if !buf.is_empty() {
                    let _ = write_out(io, buf, None).await;
                    let _ = flush(io).await;
                }
                return Err(io::Error::other(e));
            }
            Some(Ok(frame)) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                if data.is_empty() {
                    continue;
                }
                let data = match &mut encoder {
                    Encoder::Length(left) => {
                        let n = data.len() as u64;
                        if n > *left {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "response body longer than its length",
                            ));
                        }
                        *left -= n;
                        data
                    }
                    Encoder::Chunked(_) => {
                        buf.extend_from_slice(format!("{:X}\r\n", data.len()).as_bytes());
                        data
                    }
                    Encoder::CloseDelimited => data,
                };
                if data.len() < COPY_BELOW {
                    buf.extend_from_slice(&data);
                } else {
                    write_out(io, buf, Some(&data)).await?;
                }
                if matches!(encoder, Encoder::Chunked(_)) {
                    buf.extend_from_slice(b"\r\n");
                }
                if buf.len() >= WRITE_AT {
                    write_out(io, buf, None).await?;
                }
                if body.is_end_stream() {
                    break;
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers()
            && let Encoder::Chunked(Some(allowed)) = &encoder
            && info.te_trailers
        {
            let mut fields = Vec::new();
            for (name, value) in &trailers {
                if allowed.contains(name) && !forbidden_trailer(name) {
                    fields.extend_from_slice(name.as_str().as_bytes());
                    fields.extend_from_slice(b": ");
                    fields.extend_from_slice(value.as_bytes());
                    fields.extend_from_slice(b"\r\n");
                }
            }
            if !fields.is_empty() {
                buf.extend_from_slice(b"0\r\n");
                buf.extend_from_slice(&fields);
                buf.extend_from_slice(b"\r\n");
                encoder = Encoder::Length(0);
                break;
            }
        }
    }
    match encoder {
        Encoder::Chunked(_) => buf.extend_from_slice(b"0\r\n\r\n"),
        Encoder::Length(left) if left > 0 => {
            let _ = write_out(io, buf, None).await;
            let _ = flush(io).await;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "response body shorter than its length",
            ));
        }
        Encoder::Length(_) | Encoder::CloseDelimited => {}
    }
    drop(body);
    write_out(io, buf, None).await?;
    flush(io).await?;
    Ok(close)
}

/// `HTTP/1.1 100 Continue`, as hyper sends it.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The request body: read from the connection, by the request's own framing. `None` for a
/// request without one (a GET, say: the usual case), which is done from the start. Boxed
/// otherwise: inline, the body's state (120 bytes) made the request 344 bytes, and the
/// request is moved by value several times on its way to the target (into the handler's
/// future, into `route`, into `prepare_forward`): `memcpy` of 257 to 512 bytes takes its
/// loop (about 64 instructions under callgrind), up to 256 bytes it does not (about 29).
/// Without the box the empty body also cloned (and dropped) the connection's `Arc`.
pub(super) struct RequestBody<IO>(Option<Box<Streaming<IO>>>);

/// A request body's reading state (a body that is not empty from the start).
struct Streaming<IO> {
    io: Shared<IO>,
    framing: Framing,
    /// Decoded frames not yet returned.
    frames: VecDeque<Frame<Bytes>>,
    /// The body's end was reached.
    done: bool,
    /// `Expect: 100-continue`: bytes of `100 Continue` written (`None`: not expected).
    continued: Option<usize>,
}

enum Framing {
    Length(u64),
    Chunked(ChunkedDecoder),
}

impl<IO> RequestBody<IO> {
    /// The body `head` announces, read from `io`. Without a body (no `Transfer-Encoding`, a
    /// `Content-Length` of 0 or none) nothing is read and `io` is not kept: such a body was
    /// done from the start and never read the connection, nor wrote `100 Continue`.
    fn new(io: &Shared<IO>, head: BodyFraming) -> Self {
        if !head.chunked && head.length == 0 {
            return Self(None);
        }
        let framing = if head.chunked {
            Framing::Chunked(ChunkedDecoder::default())
        } else {
            Framing::Length(head.length)
        };
        Self(Some(Box::new(Streaming {
            io: io.clone(),
            framing,
            frames: VecDeque::new(),
            done: false,
            continued: head.expect_continue.then_some(0),
        })))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Body for RequestBody<IO> {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match &mut self.get_mut().0 {
            Some(body) => body.poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(|body| body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Some(body) => body.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Streaming<IO> {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self;
        loop {
            if let Some(frame) = this.frames.pop_front() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let mut g = lock(&this.io);
            let conn = &mut *g;
            let Some(s) = conn.sniffer.as_mut() else {
                return Poll::Ready(Some(Err(gone())));
            };
            if let Some(written) = this.continued {
                if conn.responding {
                    this.continued = None;
                } else if written < CONTINUE.len() {
                    let n = ready!(Pin::new(&mut *s).poll_write(cx, &CONTINUE[written..]))?;
                    if n == 0 {
                        return Poll::Ready(Some(Err(io::ErrorKind::WriteZero.into())));
                    }
                    this.continued = Some(written + n);
                    continue;
                } else {
                    ready!(Pin::new(&mut *s).poll_flush(cx))?;
                    this.continued = None;
                }
            }
            let data = match ready!(s.poll_native(cx)) {
                Ok(Native::Data(data)) => data,
                Ok(Native::Eof) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "client closed the connection inside the request body",
                    ))));
                }
                Ok(Native::Event(e)) => {
                    // Not reached: the sniffer puts a body's bytes before the next head.
                    conn.stash = Some(e);
                    this.done = true;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "request body cut short",
                    ))));
                }
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            };
            match &mut this.framing {
                Framing::Length(left) => {
                    let data = if data.len() as u64 > *left {
                        data.slice(..usize::try_from(*left).unwrap_or(usize::MAX))
                    } else {
                        data
                    };
                    *left -= data.len() as u64;
                    this.done = *left == 0;
                    if !data.is_empty() {
                        this.frames.push_back(Frame::data(data));
                    }
                }
                Framing::Chunked(decoder) => {
                    if let Err(e) = decoder.feed(&data, &mut this.frames) {
                        this.done = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                    this.done = decoder.done;
                }
            }
            if this.done {
                conn.body_open = false;
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.framing {
            Framing::Length(left) => {
                let queued: usize = self
                    .frames
                    .iter()
                    .filter_map(|f| f.data_ref().map(Bytes::len))
                    .sum();
                SizeHint::with_exact(*left + queued as u64)
            }
            Framing::Chunked(_) if self.is_end_stream() => SizeHint::with_exact(0),
            Framing::Chunked(_) => SizeHint::default(),
        }
    }
}

/// Most bytes of request trailer lines (hyper's limit).
const MAX_TRAILERS: usize = 16 * 1024;

/// Chunked request-body decoding, with the sniffer's grammar ([`ChunkScan`]): both must agree
/// on where the body ends.
#[derive(Debug, Default)]
struct ChunkedDecoder {
    scan: ChunkScan,
    trailers: Vec<u8>,
    done: bool,
}

impl ChunkedDecoder {
    fn feed(&mut self, data: &Bytes, out: &mut VecDeque<Frame<Bytes>>) -> io::Result<()> {
        if self.done {
            return Ok(());
        }
        let trailers = &mut self.trailers;
        let end = self.scan.scan(data, |piece| {
            match piece {
                ChunkPiece::Data(range) => out.push_back(Frame::data(data.slice(range))),
                ChunkPiece::Trailer(b) => {
                    trailers.push(b);
                    if trailers.len() > MAX_TRAILERS {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "chunk trailers bytes over limit",
                        ));
                    }
                }
            }
            Ok(())
        })?;
        if end.is_some() {
            self.done = true;
            if !self.trailers.is_empty() {
                // The scan keeps every trailer byte but the final line feed.
                self.trailers.push(b'\n');
                let trailers = parse_trailers(&self.trailers).map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("trailer section: {e}"))
                })?;
                out.push_back(Frame::trailers(trailers));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next request's handler future is written in the block the previous one gave back:
    /// no allocation, the same address, and the old future (with what it held) dropped first.
    /// Controls: while a block is in use, a second value allocates its own; the list keeps at
    /// most `SPARES_MAX` blocks.
    #[test]
    fn a_handler_block_given_back_is_the_next_handlers() {
        use crate::rules::tests::allocations::so_far;
        let drain = Spares::drain;
        drain();
        let held = Arc::new(());
        let handler = |held: Arc<()>| async move {
            let _held = held;
            std::future::ready(7u64).await
        };
        let before = so_far();
        let mut first = Reused::new(|| handler(held.clone()));
        assert_eq!(so_far() - before, 1, "nothing kept, yet nothing allocated");
        let at = first.ptr.as_ptr() as usize;
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert_eq!(first.as_mut().poll(&mut cx), Poll::Ready(7));
        // Control: a second handler while the first holds its block allocates another.
        let before = so_far();
        let second = Reused::new(|| handler(held.clone()));
        assert_eq!(so_far() - before, 1, "two live handlers shared a block");
        assert_ne!(second.ptr.as_ptr() as usize, at);
        assert_eq!(
            Arc::strong_count(&held),
            2,
            "the finished handler still holds its capture"
        );
        drop(second);
        assert_eq!(
            Arc::strong_count(&held),
            1,
            "a dropped handler kept its capture"
        );
        drop(first);
        // Last given back, first taken: the block `first` had.
        let before = so_far();
        let mut next = Reused::new(|| handler(held.clone()));
        assert_eq!(so_far() - before, 0, "a kept block was not used");
        assert_eq!(next.ptr.as_ptr() as usize, at);
        assert_eq!(next.as_mut().poll(&mut cx), Poll::Ready(7));
        drop(next);
        // Bounded: of more blocks than it keeps, the list keeps `SPARES_MAX`.
        let many: Vec<_> = (0..crate::proxy::server::spares::SPARES_MAX + 5)
            .map(|_| Reused::new(|| handler(held.clone())))
            .collect();
        drop(many);
        assert_eq!(Spares::kept(), crate::proxy::server::spares::SPARES_MAX);
        assert_eq!(Arc::strong_count(&held), 1);
        drain();
    }

    fn info(version: Version, head: bool) -> RequestInfo {
        RequestInfo {
            version,
            head,
            connect: false,
            keep_alive: true,
            te_trailers: false,
        }
    }

    fn encoded(
        status: u16,
        headers: &[(&'static str, &'static str)],
        info: &RequestInfo,
        body: BodyLength,
    ) -> (String, Encoder, bool) {
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::from_u16(status).expect("status");
        for (n, v) in headers {
            response
                .headers_mut()
                .append(*n, HeaderValue::from_static(v));
        }
        let (mut parts, ()) = response.into_parts();
        let mut dst = Vec::new();
        let (encoder, close) =
            encode_head(&mut dst, &mut parts, info, body, info.keep_alive).expect("encodes");
        let text = String::from_utf8(dst).expect("utf-8");
        // The date varies: cut it off.
        let text = match text.find("date: ") {
            Some(i) => text[..i].to_owned(),
            None => text,
        };
        (text, encoder, close)
    }

    /// A body-less request's body holds nothing (no box, no clone of the connection) and is
    /// done; with a `Content-Length` or chunked it keeps the connection and is not (the
    /// positive control). The request stays within 256 bytes, the largest `memcpy` without a
    /// loop: it is moved by value several times per request.
    #[test]
    fn an_empty_request_body_holds_nothing_and_the_request_stays_small() {
        let io: Shared<tokio::io::DuplexStream> = Arc::new(Mutex::new(ConnIo {
            sniffer: None,
            stash: None,
            body_open: false,
            responding: false,
        }));
        let framing = |chunked, length, expect_continue| BodyFraming {
            chunked,
            length,
            expect_continue,
        };
        for expect in [false, true] {
            let empty = RequestBody::new(&io, framing(false, 0, expect));
            assert!(empty.0.is_none());
            assert!(empty.is_end_stream());
            assert_eq!(empty.size_hint().exact(), Some(0));
        }
        assert_eq!(Arc::strong_count(&io), 1, "an empty body keeps no handle");
        let sized = RequestBody::new(&io, framing(false, 5, true));
        assert!(!sized.is_end_stream());
        assert_eq!(sized.size_hint().exact(), Some(5));
        assert_eq!(sized.0.as_ref().and_then(|b| b.continued), Some(0));
        let chunked = RequestBody::new(&io, framing(true, 0, false));
        assert!(!chunked.is_end_stream());
        assert_eq!(chunked.0.as_ref().and_then(|b| b.continued), None);
        assert_eq!(Arc::strong_count(&io), 3);
        let size = std::mem::size_of::<Request<RequestBody<tokio::net::TcpStream>>>();
        assert!(size <= 256, "{size} bytes");
    }

    #[test]
    fn known_length_and_unknown_length_framing() {
        let i = info(Version::HTTP_11, false);
        let (head, enc, close) = encoded(200, &[("x", "1")], &i, BodyLength::Known(5));
        assert_eq!(head, "HTTP/1.1 200 OK\r\nx: 1\r\ncontent-length: 5\r\n");
        assert_eq!((enc, close), (Encoder::Length(5), false));
        let (head, enc, _) = encoded(200, &[], &i, BodyLength::Unknown);
        assert_eq!(head, "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n");
        assert_eq!(enc, Encoder::Chunked(None));
        let (head, enc, close) = encoded(
            404,
            &[],
            &info(Version::HTTP_10, false),
            BodyLength::Unknown,
        );
        assert_eq!(head, "HTTP/1.0 404 Not Found\r\nconnection: keep-alive\r\n");
        assert_eq!((enc, close), (Encoder::CloseDelimited, true));
    }

    #[test]
    fn head_204_and_304_carry_no_body_but_a_positive_control_does() {
        let (head, enc, _) = encoded(
            200,
            &[("content-length", "42")],
            &info(Version::HTTP_11, true),
            BodyLength::None,
        );
        assert_eq!(head, "HTTP/1.1 200 OK\r\ncontent-length: 42\r\n");
        assert_eq!(enc, Encoder::Length(0));
        for status in [204, 304] {
            let (head, enc, _) = encoded(
                status,
                &[],
                &info(Version::HTTP_11, false),
                BodyLength::Known(3),
            );
            assert!(!head.contains("content-length"), "{head}");
            assert_eq!(enc, Encoder::Length(0));
        }
        let (_, enc, _) = encoded(
            200,
            &[],
            &info(Version::HTTP_11, false),
            BodyLength::Known(3),
        );
        assert_eq!(enc, Encoder::Length(3));
    }

    #[test]
    fn closing_rules() {
        let mut i = info(Version::HTTP_11, false);
        i.keep_alive = false;
        let (head, _, close) = encoded(200, &[], &i, BodyLength::None);
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n"
        );
        assert!(close);
        let (_, _, close) = encoded(
            400,
            &[("connection", "close")],
            &info(Version::HTTP_11, false),
            BodyLength::Known(1),
        );
        assert!(close);
        let (_, _, close) = encoded(
            200,
            &[],
            &info(Version::HTTP_11, false),
            BodyLength::Known(1),
        );
        assert!(!close, "positive control");
    }

    #[test]
    fn chunked_request_bodies_decode_with_trailers() {
        let mut d = ChunkedDecoder::default();
        let mut out = VecDeque::new();
        let input = Bytes::from_static(b"5;x=1\r\nhello\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\nGET");
        for i in 0..input.len() {
            d.feed(&input.slice(i..=i), &mut out).expect("decodes");
            if d.done {
                assert_eq!(i, input.len() - 4, "ends at the empty line");
                break;
            }
        }
        let mut data = Vec::new();
        let mut trailers = None;
        for f in out {
            match f.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        assert_eq!(data, b"helloabc");
        assert_eq!(trailers.expect("trailers")["t"], "1");
    }

    fn decode_all(input: &'static [u8]) -> io::Result<Vec<Frame<Bytes>>> {
        let mut d = ChunkedDecoder::default();
        let mut out = VecDeque::new();
        d.feed(&Bytes::from_static(input), &mut out)?;
        assert!(d.done, "the body ended");
        Ok(out.into())
    }

    #[test]
    fn trailer_sections_with_bare_line_feeds_parse_and_invalid_fields_fail() {
        let frames = decode_all(b"0\nA: 1\nB: two\n\n").expect("decodes");
        let trailers = frames
            .into_iter()
            .find_map(|f| f.into_trailers().ok())
            .expect("trailers");
        assert_eq!(
            (&trailers["a"], &trailers["b"]),
            (&"1".parse().unwrap(), &"two".parse().unwrap())
        );
        // A line that is no field fails the body; the valid section above is the control.
        let e = decode_all(b"0\r\nno colon here\r\n\r\n").expect_err("an invalid trailer line");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // No trailers: nothing but the end.
        let frames = decode_all(b"0\r\n\r\n").expect("decodes");
        assert!(
            frames
                .iter()
                .all(|f| !f.is_trailers() || f.trailers_ref().is_some_and(|t| t.is_empty()))
        );
    }

    /// The one-pass scan of the request's headers against the lookups it replaced, over
    /// heads built from every kind of field it reads (repeated, in varied orders and cases of
    /// their tokens), beside fields it must ignore. Also counts that the varied heads really
    /// reach each outcome (a generator that never made one would prove nothing about it).
    #[test]
    fn the_header_scan_agrees_with_a_lookup_per_name() {
        let fields: &[(&str, &str)] = &[
            ("connection", "close"),
            ("connection", "keep-alive"),
            ("connection", "Keep-Alive, Upgrade"),
            ("connection", "x-foo , CLOSE"),
            ("connection", "keepalive"),
            ("te", "trailers"),
            ("te", "gzip, Trailers"),
            ("te", "trailers;q=0.5"),
            ("content-length", "0"),
            ("content-length", "17"),
            ("content-length", "4"),
            ("content-length", "x1"),
            ("transfer-encoding", "chunked"),
            ("expect", "100-continue"),
            ("expect", "100-Continue"),
            ("expect", "200-ok"),
            ("host", "example.com"),
            ("x-te", "trailers"),
            ("x-connection", "close"),
            ("upgrade", "websocket"),
        ];
        let mut rng =
            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        let mut next = move |n: usize| rand::Rng::random_range(&mut rng, 0..n);
        let (mut keep, mut close, mut trailers, mut chunked, mut length, mut expect) =
            (0, 0, 0, 0, 0, 0);
        for _ in 0..20_000 {
            let (mut parts, ()) = Request::new(()).into_parts();
            parts.version = [Version::HTTP_10, Version::HTTP_11][next(2)];
            parts.method =
                [Method::GET, Method::HEAD, Method::CONNECT, Method::POST][next(4)].clone();
            for _ in 0..next(7) {
                let (name, value) = fields[next(fields.len())];
                parts.headers.append(
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                );
            }
            let scanned = RequestInfo::scan(&parts);
            let looked_up = RequestInfo::of_by_lookup(&parts);
            assert_eq!(
                scanned, looked_up,
                "{:?} {:?}",
                parts.version, parts.headers
            );
            let (info, framing) = scanned;
            if info.keep_alive {
                keep += 1;
            } else {
                close += 1;
            }
            trailers += usize::from(info.te_trailers);
            chunked += usize::from(framing.chunked);
            length += usize::from(framing.length > 0);
            expect += usize::from(framing.expect_continue);
        }
        for (what, n) in [
            ("keep-alive", keep),
            ("close", close),
            ("te trailers", trailers),
            ("chunked", chunked),
            ("a length", length),
            ("100-continue", expect),
        ] {
            assert!(n > 500, "only {n} heads with {what}");
        }
    }
}
