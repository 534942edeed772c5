//! Our own HTTP/1.1 client for plain-TCP targets (issue 8, step 2): the request's own task
//! writes the head into a pooled socket it owns while in use, parses the response head with
//! `httparse` and frames the response body itself, without hyper's client connection task.
//!
//! The framing follows hyper's client (RFC 9112 §6): requests carry `Content-Length` when it is
//! known (from the header or the body's exact size) and are chunked otherwise, except GET, HEAD
//! and CONNECT without a known length, which go without a body. Responses to HEAD and 1xx/204/304
//! responses have no body; then `Transfer-Encoding` (chunked last: chunked, otherwise read to
//! the close), `Content-Length` (all values equal, else 502), else read to the close.
//! Informational responses other than 101 are skipped. A connection goes back to the pool only
//! after a complete response, when both sides said keep-alive, the request body was sent whole
//! and nothing beyond the response was received.
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};

use crate::headers::ForwardedTail;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use super::body::Replay;
use super::{BoxError, ProxyBody, within_idle_timeout};
use crate::headers::has_token;
use crate::proxy::error::ProxyError;
use crate::proxy::names::HeaderNames;
use crate::proxy::pool::{RawConn, TargetPool};
use crate::proxy::rawio::Raw;

/// Most header fields in a response head or trailer section (hyper's default, as before) → 502.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line accepted (size, extensions and CRLF).
const MAX_CHUNK_LINE: usize = 4096;
/// How much is read from the target at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Why a request on a raw connection failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// The target closed or reset the connection before a complete response head.
    #[error("target closed the connection before a complete response head: {0}")]
    Closed(#[source] io::Error),
    /// Reading or writing the connection failed.
    #[error("target connection: {0}")]
    Io(#[source] io::Error),
    /// The response head was larger than the limit.
    #[error("response head larger than {0} bytes")]
    HeadTooLarge(usize),
    /// The response head or trailer section had more fields than [`MAX_HEADERS`].
    #[error("more than {MAX_HEADERS} header fields in the response")]
    TooManyHeaders,
    /// The response was not valid HTTP/1.1.
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    /// The target closed the connection before the end of a framed response body.
    #[error("target closed the connection before the end of the response body")]
    Truncated,
    /// Reading the client's request body failed.
    #[error("reading the request body: {0}")]
    Body(#[source] BoxError),
}

impl H1Error {
    /// Whether the failure looks like the target having closed the connection before it got
    /// the request (see `is_stale_connection_symptom`): closed, reset or broken before a
    /// complete response head.
    pub fn is_stale_symptom(&self) -> bool {
        match self {
            Self::Closed(_) => true,
            Self::Io(e) => is_closed_kind(e.kind()),
            _ => false,
        }
    }
}

fn is_closed_kind(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
    )
}

/// How sending a request on a raw connection failed.
pub enum Failure {
    /// Nothing was written: the request, still in the caller's place, is whole and can go
    /// out on another connection.
    NotSent(H1Error),
    /// The request may have been written; no (usable) response head arrived. The request's
    /// head stays in the caller's place (as sent, framing headers included) so an idempotent
    /// request can be sent again with its replayed body, without a copy kept beforehand for
    /// the rare retry.
    Failed(H1Error),
    /// No response head within the idle timeout: quiet since the request started or since
    /// the last request body bytes went out. The connection is closed.
    TimedOut,
}

/// How the exchange on the connection ended (before the idle timeout).
enum Exchanged {
    /// The first write failed: nothing reached the connection.
    NotSent(H1Error),
    /// The request may have been written; no usable response head arrived.
    Failed(H1Error),
    /// A response head, and whether the request body went out whole.
    Head(Head, bool),
}

/// How the request body goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestFraming {
    None,
    Length(u64),
    Chunked,
}

/// The request head as it goes out.
struct EncodedHead {
    bytes: Vec<u8>,
    framing: RequestFraming,
    /// A `Connection` line of the request lists `close`.
    close: bool,
}

/// Serializes the request head (origin-form target, as `prepare_request` left it) and decides
/// the body framing as hyper's client does, fixing up the framing headers to match.
///
/// `tail`: fields written after the map's (see [`ForwardedTail`]); it comes only with a
/// request without a body. Where the map changes after they would have been appended, they go
/// into the map first (taken out of `tail`).
fn encode_head(req: &mut Request<ProxyBody>, tail: &mut Option<ForwardedTail<'_>>) -> EncodedHead {
    if req.body().is_end_stream() {
        // No body (a GET, say): the only fix-up is removing `Transfer-Encoding`, which a
        // forwarded request never has (it is hop-by-hop). The head is written first and
        // written again only if one was there: the `remove` hashed the name on every request.
        let written = write_head(req, tail.as_ref());
        if !written.transfer_encoding {
            return written.head(RequestFraming::None);
        }
        crate::proxy::recycle::recycle_buffer(written.bytes);
        into_map(tail.take(), req.headers_mut());
        req.headers_mut().remove(TRANSFER_ENCODING);
        return write_head(req, None).head(RequestFraming::None);
    }
    let exact = req.body().size_hint().exact();
    let bodiless_method = matches!(*req.method(), Method::GET | Method::HEAD | Method::CONNECT);
    into_map(tail.take(), req.headers_mut());
    let headers = req.headers_mut();
    let framing = if headers.contains_key(TRANSFER_ENCODING) {
        headers.remove(CONTENT_LENGTH);
        if !is_chunked(headers) {
            headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
        RequestFraming::Chunked
    } else if let Some(Ok(len)) = content_length(headers) {
        RequestFraming::Length(len)
    } else if let Some(len) = exact {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
        RequestFraming::Length(len)
    } else if bodiless_method {
        // As hyper: these almost never have bodies; without a length, none is sent.
        RequestFraming::None
    } else {
        headers.remove(CONTENT_LENGTH);
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        RequestFraming::Chunked
    };
    write_head(req, None).head(framing)
}

/// Puts a [`ForwardedTail`]'s fields (if there is one) into the request's map, where the map
/// functions would have put them: for every use of the request other than writing its head
/// unchanged (a map about to change, a request handed back for a retry or a report).
fn into_map(tail: Option<ForwardedTail<'_>>, headers: &mut HeaderMap) {
    if let Some(tail) = tail {
        tail.append_to(headers);
    }
}

/// A request head written by [`write_head`].
struct Written {
    bytes: Vec<u8>,
    /// A `Connection` line lists `close`.
    close: bool,
    /// A `Transfer-Encoding` line was written.
    transfer_encoding: bool,
}

impl Written {
    fn head(self, framing: RequestFraming) -> EncodedHead {
        EncodedHead {
            bytes: self.bytes,
            framing,
            close: self.close,
        }
    }
}

/// The request line and every field of `req`, in one pass over the fields: the buffer is
/// the thread's recycled one, which already has room for a usual head; a rough guess saves
/// most regrowth of a new one (an exact size took a second walk over the map on every
/// request).
fn write_head<B>(req: &Request<B>, tail: Option<&ForwardedTail<'_>>) -> Written {
    let headers = req.headers();
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let method = req.method().as_str();
    let mut head = crate::proxy::recycle::buffer();
    head.reserve(method.len() + target.len() + 16 + 48 * headers.len());
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    let mut close = false;
    let mut transfer_encoding = false;
    for (name, value) in headers.iter() {
        if name == CONNECTION {
            close = close || has_token(value, "close");
        } else if name == TRANSFER_ENCODING {
            transfer_encoding = true;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if let Some(tail) = tail {
        tail.write_to(&mut head);
    }
    head.extend_from_slice(b"\r\n");
    Written {
        bytes: head,
        close,
        transfer_encoding,
    }
}

/// Whether the last transfer coding is `chunked`.
fn is_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .next_back()
        .is_some_and(ends_chunked)
}

/// Whether the last transfer coding of one `Transfer-Encoding` line is `chunked`.
fn ends_chunked(line: &HeaderValue) -> bool {
    line.as_bytes()
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The `Content-Length`, if present: `Err` when a value is invalid or the values differ.
/// (Also the native HTTP/2 server's reading of a request's length, `server/h2native.rs`.)
pub(crate) fn content_length(headers: &HeaderMap) -> Option<Result<u64, ()>> {
    headers
        .get_all(CONTENT_LENGTH)
        .iter()
        .fold(None, add_content_length)
}

/// What the `Content-Length` lines so far say (`found`), with one more `line`: `Err` from the
/// first invalid value or value that differs from the others on.
fn add_content_length(
    found: Option<Result<u64, ()>>,
    line: &HeaderValue,
) -> Option<Result<u64, ()>> {
    let mut found = match found {
        Some(Err(())) => return found,
        Some(Ok(n)) => Some(n),
        None => None,
    };
    for item in line.as_bytes().split(|&b| b == b',') {
        let item = item.trim_ascii();
        if item.is_empty() {
            return Some(Err(()));
        }
        // Digits only (no sign), and at most `u64::MAX`: what `str::parse::<u64>` of
        // all-digit text accepts, without its checks for signs and radix.
        let mut n: u64 = 0;
        for &b in item {
            let digit = b.wrapping_sub(b'0');
            if digit > 9 {
                return Some(Err(()));
            }
            let Some(next) = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(digit)))
            else {
                return Some(Err(()));
            };
            n = next;
        }
        if found.is_some_and(|f| f != n) {
            return Some(Err(()));
        }
        found = Some(n);
    }
    found.map(Ok)
}

/// The parsed response head and what it says about the body and the connection.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: State,
    keep_alive: bool,
    /// The head has a `Keep-Alive` field (the target's idle timeout may be in it).
    keep_alive_field: bool,
    /// `headers` has a hop-by-hop field (`headers::is_hop_by_hop`). Without one,
    /// `strip_hop_by_hop` has nothing to remove: `Connection`, which names the others it
    /// removes, is one.
    hop_by_hop: bool,
}

/// Sends `req` on `conn` and reads the response head; the body streams from the connection
/// behind the returned response and gives the connection back to `pool` when it completes
/// cleanly. The whole exchange is bounded by the idle timeout, counted from the start or from
/// the last request body bytes sent (`replay` tells when), as on ALB's connections. With the
/// response, whether its head is known to have no hop-by-hop field (nothing for
/// `strip_hop_by_hop` to do).
///
/// `req` is borrowed, not taken: it stays in the caller's place (the handler's future) for the
/// whole forward, and a request that was not sent, or may have been, is still there for a
/// retry. Taken by value, the request (224-240 bytes) was written into each layer's future on
/// its way here (the forward's, a `send_raw` layer's, this one's), on every request. On success its
/// body and map are taken out of it (dropped, recycled); the rest drops with the caller's.
/// `tail` is borrowed too, from the forward's own place: taken by value, its 72 bytes were
/// written into the forward's, a `send_raw` layer's and this future per request. A request that was
/// not sent, or may have been, leaves this with the tail's fields in its map and `tail` empty.
///
/// The timer is the connection's own, kept with it in the pool, and not touched per request:
/// it may be due earlier than this request's deadline (it was set for an earlier one), never
/// later, so when it fires the real deadline is worked out and the timer set to it if that is
/// still ahead (see [`within_idle_timeout`]). A timer per request was registered in tokio's
/// timer wheel and removed again every time (about 600 instructions), and even moving a kept
/// one's deadline on every request cost 160.
///
/// A plain function returning an `async move` block, not an `async fn`, which would store
/// each argument twice in its future (captured, then moved into a local of the body on the
/// first poll: the connection and the tail, 200 bytes written once more per request).
#[expect(
    clippy::manual_async_fn,
    reason = "an `async fn` stores each argument twice in its future (see above)"
)]
#[allow(clippy::too_many_arguments)]
pub fn send<'a, 't: 'a>(
    mut conn: Box<RawConn>,
    req: &'a mut Request<ProxyBody>,
    tail: &'a mut Option<ForwardedTail<'t>>,
    max_head: usize,
    pool: &'a Arc<TargetPool>,
    target: SocketAddr,
    idle_timeout: Duration,
    replay: &'a Replay,
) -> impl Future<Output = Result<(Response<ProxyBody>, bool), Failure>> + Send + 'a {
    async move {
        let EncodedHead {
            bytes: head,
            framing,
            close: request_close,
        } = encode_head(req, tail);
        let is_head = req.method() == Method::HEAD;

        let started = Instant::now();
        let mut timer = conn
            .timer
            .take()
            .unwrap_or_else(|| Box::pin(tokio::time::sleep_until(started + idle_timeout)));
        let exchanged = {
            let exchange = pin!(exchange(
                &mut conn,
                head,
                framing,
                req.body_mut(),
                max_head,
                is_head
            ));
            within_idle_timeout(exchange, timer.as_mut(), started, idle_timeout, replay).await
        };
        let (head, body_sent) = match exchanged {
            Some(Exchanged::Head(head, body_sent)) => (head, body_sent),
            // Whatever sends the request again (or reports it) takes its head whole, in its map.
            Some(Exchanged::NotSent(error)) => {
                into_map(tail.take(), req.headers_mut());
                return Err(Failure::NotSent(error));
            }
            Some(Exchanged::Failed(error)) => {
                into_map(tail.take(), req.headers_mut());
                return Err(Failure::Failed(error));
            }
            None => return Err(Failure::TimedOut),
        };
        conn.timer = Some(timer);
        // The request body is done with (dropped here, as when it was this future's own), and
        // the head is no longer needed for a retry: its map serves another request.
        drop(std::mem::take(req.body_mut()));
        crate::proxy::recycle::recycle(std::mem::take(req.headers_mut()));
        let Head {
            status,
            version,
            headers,
            framing,
            keep_alive,
            keep_alive_field,
            hop_by_hop,
        } = head;
        // The target's idle timeout, as the hyper path reads it from every response head.
        if keep_alive_field && let Some(hint) = crate::headers::keep_alive_timeout(&headers) {
            pool.set_keep_alive_hint(hint);
        }
        let reusable =
            keep_alive && !request_close && body_sent && !matches!(framing, State::Close);
        let body = RawBody::new(
            conn,
            framing,
            reusable,
            Arc::clone(pool),
            target,
            idle_timeout,
        );
        let mut response = Response::new(body.boxed_unsync());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        Ok((response, !hop_by_hop))
    }
}

/// Writes the request head (and body) and reads the response head.
async fn exchange(
    conn: &mut RawConn,
    head: Vec<u8>,
    framing: RequestFraming,
    body: &mut ProxyBody,
    max_head: usize,
    is_head: bool,
) -> Exchanged {
    // The first write decides whether anything reached the connection.
    let written = match Raw(&conn.stream).write(&head).await {
        Ok(0) => Err(io::Error::from(io::ErrorKind::WriteZero)),
        other => other,
    };
    let written = match written {
        Ok(n) => n,
        Err(error) => return Exchanged::NotSent(H1Error::Io(error)),
    };
    if written < head.len()
        && let Err(e) = Raw(&conn.stream).write_all(&head[written..]).await
    {
        return Exchanged::Failed(H1Error::Io(e));
    }
    crate::proxy::recycle::recycle_buffer(head);

    let mut body_sent = true;
    let parsed = {
        let RawConn {
            stream, buf, names, ..
        } = conn;
        let (mut reader, mut writer) = (Raw(stream), Raw(stream));
        let mut head_read = pin!(read_head(&mut reader, buf, names, max_head, is_head));
        if framing == RequestFraming::None {
            head_read.await
        } else {
            body_sent = false;
            let body_write = write_body(&mut writer, body, framing);
            tokio::select! {
                biased;
                head = &mut head_read => head,
                sent = body_write => match sent {
                    Ok(()) => {
                        body_sent = true;
                        head_read.await
                    }
                    Err(error @ H1Error::Body(_)) => Err(error),
                    // The target may have answered (and closed) before taking the whole body.
                    Err(error) => head_read.await.map_err(|_| error),
                },
            }
        }
    };
    match parsed {
        Ok(head) => Exchanged::Head(head, body_sent),
        Err(error) => Exchanged::Failed(error),
    }
}

/// Streams the request body in the chosen framing. Trailers are not forwarded (the `Trailer`
/// header is hop-by-hop and removed, as before with hyper).
async fn write_body<W: AsyncWrite + Unpin>(
    writer: &mut W,
    body: &mut ProxyBody,
    framing: RequestFraming,
) -> Result<(), H1Error> {
    let mut remaining = match framing {
        RequestFraming::Length(n) => Some(n),
        _ => None,
    };
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(H1Error::Body)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        match &mut remaining {
            Some(left) => {
                // Never more than announced: the rest would be read as the next request.
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                writer.write_all(&data[..take]).await.map_err(H1Error::Io)?;
                *left -= take as u64;
                if *left == 0 {
                    break;
                }
            }
            None => {
                let line = format!("{:x}\r\n", data.len());
                let mut chunk = Vec::with_capacity(line.len() + data.len() + 2);
                chunk.extend_from_slice(line.as_bytes());
                chunk.extend_from_slice(&data);
                chunk.extend_from_slice(b"\r\n");
                writer.write_all(&chunk).await.map_err(H1Error::Io)?;
            }
        }
    }
    match remaining {
        Some(0) => Ok(()),
        Some(_) => Err(H1Error::Body(
            "request body shorter than its Content-Length".into(),
        )),
        None => writer.write_all(b"0\r\n\r\n").await.map_err(H1Error::Io),
    }
}

/// Reads until a complete final response head is in `buf`, skipping informational responses.
async fn read_head<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    names: &mut HeaderNames,
    max_head: usize,
    is_head: bool,
) -> Result<Head, H1Error> {
    loop {
        if !buf.is_empty()
            && let Some(head) = parse_head(buf, names, max_head, is_head)?
        {
            return Ok(head);
        }
        buf.reserve(READ_CHUNK);
        match reader.read_buf(buf).await {
            Ok(0) => return Err(H1Error::Closed(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            Err(e) if is_closed_kind(e.kind()) => return Err(H1Error::Closed(e)),
            Err(e) => return Err(H1Error::Io(e)),
        }
    }
}

/// Fields the first parse of a response head has room for: more than most targets send.
const FIRST_TRY_FIELDS: usize = 32;

/// Parses a final response head from the front of `buf` (consuming it and any informational
/// responses before it), or `None` if more bytes are needed. `names`: the connection's header
/// names of its previous response head, used again where the same name is written.
///
/// First with room for [`FIRST_TRY_FIELDS`] fields, and only for a head with more, again
/// with room for [`MAX_HEADERS`] in a function of its own: the parse's arrays are on the
/// stack, and at 100 fields (4.8 KiB with the spans) everything called below them (the
/// header map's appends, the names, the allocator) ran 3.3 KiB deeper, on stack lines
/// touched by nothing else in the request.
fn parse_head(
    buf: &mut BytesMut,
    names: &mut HeaderNames,
    max_head: usize,
    is_head: bool,
) -> Result<Option<Head>, H1Error> {
    match parse_head_with::<FIRST_TRY_FIELDS>(buf, names, max_head, is_head) {
        // Nothing was taken from the head yet (informational responses before it, if any,
        // are consumed whole and stay so).
        Err(H1Error::TooManyHeaders) => parse_long_head(buf, names, max_head, is_head),
        parsed => parsed,
    }
}

/// [`parse_head`] with room for every field a head may have; not inlined, so that its arrays
/// stay out of the usual parse's frame.
#[cold]
#[inline(never)]
fn parse_long_head(
    buf: &mut BytesMut,
    names: &mut HeaderNames,
    max_head: usize,
    is_head: bool,
) -> Result<Option<Head>, H1Error> {
    parse_head_with::<MAX_HEADERS>(buf, names, max_head, is_head)
}

/// [`parse_head`] with room for `N` fields: `TooManyHeaders` for a head with more.
fn parse_head_with<const N: usize>(
    buf: &mut BytesMut,
    names: &mut HeaderNames,
    max_head: usize,
    is_head: bool,
) -> Result<Option<Head>, H1Error> {
    loop {
        // Left uninitialized: httparse writes the fields it parses and hands back only those
        // (filling 100 empty slots per response cost about 400 instructions).
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; N];
        let mut res = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut res,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= max_head => {
                return Err(H1Error::HeadTooLarge(max_head));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(H1Error::TooManyHeaders),
            Err(_) => return Err(H1Error::Malformed("invalid response head")),
        };
        if len > max_head {
            return Err(H1Error::HeadTooLarge(max_head));
        }
        let code = res.code.unwrap_or_default();
        let status = StatusCode::from_u16(code).map_err(|_| H1Error::Malformed("status code"))?;
        let version = if res.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        if code == 101 {
            return Err(H1Error::Malformed(
                "101 Switching Protocols to a request without Upgrade",
            ));
        }
        if status.is_informational() {
            // 100 Continue, 103 Early Hints…: not forwarded, as before with hyper.
            buf.advance(len);
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        // Where each field sits in the head, so that the values can share its bytes. Offsets
        // are `u32` (the head is at most `max_head` bytes): the array is zeroed on every
        // response, and at 1.6 KB that is a few dozen vector stores where 3.2 KB of `usize`
        // went through `rep stosb` (3,200 instructions under callgrind).
        if u32::try_from(len).is_err() {
            return Err(H1Error::HeadTooLarge(max_head));
        }
        let base = buf.as_ptr() as usize;
        let count = res.headers.len();
        // Left uninitialized too: zeroing all 100 slots (1.6 KB, most of them never used)
        // wrote about 26 cache lines of stack per response, 8 or 9 of them not in the L1
        // data cache (callgrind's cache model).
        let mut spans = [const { MaybeUninit::<[u32; 4]>::uninit() }; N];
        for (span, field) in spans.iter_mut().zip(res.headers.iter()) {
            let name = field.name.as_ptr() as usize - base;
            let value = if field.value.is_empty() {
                0
            } else {
                field.value.as_ptr() as usize - base
            };
            // Lossless: every offset is within the head, whose length fits in `u32`.
            span.write([
                name as u32,
                (name + field.name.len()) as u32,
                value as u32,
                (value + field.value.len()) as u32,
            ]);
        }
        // SAFETY: the loop above wrote the first `count` slots (`count` is the number of
        // parsed fields, at most `N`, so the zip visited that many), and
        // `MaybeUninit<T>` has the layout of `T`.
        let spans: &[[u32; 4]] =
            unsafe { std::slice::from_raw_parts(spans.as_ptr().cast::<[u32; 4]>(), count) };
        let bytes = buf.split_to(len).freeze();
        let mut headers = crate::proxy::recycle::header_map(count);
        let mut keep_alive = version == Version::HTTP_11;
        let mut saw_close = false;
        // What the framing and connection fields say, gathered on the way instead of looked
        // up in the map afterwards: `Transfer-Encoding` present and whether its last line
        // ends in `chunked` (as `is_chunked`), the `Content-Length` lines folded (as
        // `content_length`), a `Keep-Alive` field present.
        let mut transfer_encoding = false;
        let mut chunked = false;
        let mut length: Option<Result<u64, ()>> = None;
        let mut keep_alive_field = false;
        // The fields the pipeline gets (`Reply::finish` removes the hop-by-hop ones with
        // `strip_hop_by_hop`) are the head's own, with one exception, made only where it
        // changes nothing the pipeline passes on: a last field `Connection: keep-alive`
        // (nginx's usual last line) with no other hop-by-hop field in the head is left out.
        // It concerns this connection only (read above for `keep_alive`), and
        // `strip_hop_by_hop` would remove just it, from the end (`HeaderMap::remove` moves
        // the last entry into the hole: here there is none), leaving the other fields in
        // their order. An earlier `Connection`, or one beside other hop-by-hop fields (whose
        // removal order moves fields), stays for it to remove. Appended and removed again,
        // it cost a hashed append and a hashed remove on every response.
        let mut hop_by_hop = false;
        for (i, &[name_start, name_end, value_start, value_end]) in
            spans[..count].iter().enumerate()
        {
            let name = names
                .get(i, &bytes[name_start as usize..name_end as usize])
                .map_err(|_| H1Error::Malformed("header name"))?;
            let value = bytes.slice(value_start as usize..value_end as usize);
            // SAFETY (a contract, not memory): `from_maybe_shared_unchecked` wants bytes that
            // `HeaderValue::from_bytes` accepts: tab, 0x20..=0x7E and 0x80..=0xFF. httparse
            // (default config: no obsolete line folding) returns only values made of exactly
            // those (its HEADER_VALUE_MAP); `a_value_httparse_accepts_is_a_valid_header_value`
            // checks every byte, and debug builds check each value again. Saves validating
            // every value byte a second time, as hyper's client does.
            let value = unsafe { HeaderValue::from_maybe_shared_unchecked(value) };
            if name == CONNECTION {
                // Once any `Connection` line asks to close, a later `keep-alive` cannot undo it.
                if saw_close || has_token(&value, "close") {
                    saw_close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = has_token(&value, "keep-alive");
                }
            } else if name == CONTENT_LENGTH {
                length = add_content_length(length, &value);
            } else if name == TRANSFER_ENCODING {
                transfer_encoding = true;
                chunked = ends_chunked(&value);
            } else if name == crate::headers::KEEP_ALIVE {
                keep_alive_field = true;
            }
            if crate::headers::is_hop_by_hop(&name) {
                if i + 1 == count && !hop_by_hop && name == CONNECTION && only_keep_alive(&value) {
                    // The last field: left out (see above).
                    break;
                }
                hop_by_hop = true;
            }
            headers.append(name, value);
        }
        let framing = if is_head || code == 204 || code == 304 {
            State::Length(0)
        } else if transfer_encoding {
            if version == Version::HTTP_10 {
                return Err(H1Error::Malformed(
                    "Transfer-Encoding in an HTTP/1.0 response",
                ));
            }
            if chunked {
                State::Chunked(Chunk::Size)
            } else {
                State::Close
            }
        } else {
            match length {
                Some(Ok(len)) => State::Length(len),
                Some(Err(())) => return Err(H1Error::Malformed("Content-Length")),
                None => State::Close,
            }
        };
        return Ok(Some(Head {
            status,
            version,
            headers,
            framing,
            keep_alive,
            keep_alive_field,
            hop_by_hop,
        }));
    }
}

/// A `Connection` value that lists `keep-alive` and nothing else (no empty element either).
fn only_keep_alive(value: &HeaderValue) -> bool {
    // The usual value, whole, before taking the list apart.
    value.as_bytes().eq_ignore_ascii_case(b"keep-alive")
        || crate::headers::list_elements(value).all(|t| t.eq_ignore_ascii_case(b"keep-alive"))
}

/// Where the response body's framing stands.
#[derive(Debug)]
enum State {
    /// This many body bytes still to come.
    Length(u64),
    /// Chunked, at this point of a chunk.
    Chunked(Chunk),
    /// Read until the target closes (never reused).
    Close,
    /// Complete.
    Done,
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

/// What decoding the buffered bytes gave.
enum Step {
    Frame(Frame<Bytes>),
    NeedMore,
    Done,
}

/// The response body read from a raw connection. When it completes cleanly the connection goes
/// back to the pool at once (before the last frame is handed on, when the end is already in the
/// buffer); dropped earlier, the connection is closed.
pub struct RawBody {
    conn: Option<Box<RawConn>>,
    state: State,
    reusable: bool,
    pool: Arc<TargetPool>,
    target: SocketAddr,
    idle_timeout: Duration,
    /// Created only when the body has to wait for the target.
    idle: Option<Pin<Box<Sleep>>>,
    /// Bytes arrived since the idle timer was last armed.
    progressed: bool,
}

impl RawBody {
    fn new(
        conn: Box<RawConn>,
        state: State,
        reusable: bool,
        pool: Arc<TargetPool>,
        target: SocketAddr,
        idle_timeout: Duration,
    ) -> Self {
        let mut body = Self {
            conn: Some(conn),
            state,
            reusable,
            pool,
            target,
            idle_timeout,
            idle: None,
            progressed: false,
        };
        if let Err(error) = body.settle() {
            // Reported when the body is polled: keep the state and drop the connection.
            tracing::debug!(target_addr = %body.target, %error, "malformed response body");
            body.conn = None;
            body.state = State::Length(1);
        }
        body
    }

    /// Advances over framing that carries no data (chunk ends, size lines, an empty trailer
    /// section) so that the end is noticed as early as possible; gives the connection back
    /// when the body is complete.
    fn settle(&mut self) -> Result<(), H1Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        let buf = &mut conn.buf;
        loop {
            match &mut self.state {
                State::Length(0) => self.state = State::Done,
                State::Chunked(chunk) => match *chunk {
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            break;
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(H1Error::Malformed("chunk not followed by CRLF"));
                        }
                        buf.advance(2);
                        *chunk = Chunk::Size;
                    }
                    Chunk::Size => {
                        let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                            if buf.len() > MAX_CHUNK_LINE {
                                return Err(H1Error::Malformed("chunk size line too long"));
                            }
                            break;
                        };
                        let line = &buf[..end];
                        let size = line.split(|&b| b == b';').next().unwrap_or_default();
                        let size = size.trim_ascii();
                        if size.is_empty() || size.len() > 16 {
                            return Err(H1Error::Malformed("chunk size"));
                        }
                        let size = std::str::from_utf8(size)
                            .ok()
                            .and_then(|s| u64::from_str_radix(s, 16).ok())
                            .ok_or(H1Error::Malformed("chunk size"))?;
                        buf.advance(end + 2);
                        *chunk = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Trailers => {
                        if buf.len() < 2 {
                            break;
                        }
                        if &buf[..2] == b"\r\n" {
                            buf.advance(2);
                            self.state = State::Done;
                        } else {
                            break;
                        }
                    }
                    Chunk::Data(_) => break,
                },
                State::Done => {
                    self.finish();
                    break;
                }
                State::Length(_) | State::Close => break,
            }
        }
        Ok(())
    }

    /// The body is complete: the connection goes back to the pool if it may be reused.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reusable
        {
            self.pool.checkin_raw(conn);
        }
    }

    /// The next frame from the buffered bytes, if there is one.
    fn decode(&mut self) -> Result<Step, H1Error> {
        self.settle()?;
        let Some(conn) = self.conn.as_mut() else {
            return Ok(match self.state {
                State::Done => Step::Done,
                _ => Step::NeedMore,
            });
        };
        let buf = &mut conn.buf;
        let frame = match &mut self.state {
            State::Done => return Ok(Step::Done),
            State::Length(left) | State::Chunked(Chunk::Data(left)) => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= take as u64;
                if *left == 0
                    && let State::Chunked(chunk) = &mut self.state
                {
                    *chunk = Chunk::DataEnd;
                }
                Frame::data(buf.split_to(take).freeze())
            }
            State::Close => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                Frame::data(buf.split().freeze())
            }
            State::Chunked(Chunk::Trailers) => {
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    if buf.len() > 32 * 1024 {
                        return Err(H1Error::HeadTooLarge(32 * 1024));
                    }
                    return Ok(Step::NeedMore);
                };
                let trailers = parse_trailers(&buf[..end + 4])?;
                buf.advance(end + 4);
                self.state = State::Done;
                Frame::trailers(trailers)
            }
            State::Chunked(_) => return Ok(Step::NeedMore),
        };
        // Notice the end now if it is already buffered (and give the connection back).
        self.settle()?;
        Ok(Step::Frame(frame))
    }

    fn fail(&mut self, error: H1Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.state = State::Done;
        Poll::Ready(Some(Err(Box::new(ProxyError::TargetFailed {
            target: self.target.to_string(),
            source: Box::new(error),
        }))))
    }
}

/// A chunked body's trailer section (field lines through the empty line) into fields, at most
/// [`MAX_HEADERS`]; a line that is no valid field fails it. The one trailer parser of both
/// HTTP/1 sides: responses from targets here, request bodies in `server/h1.rs`.
pub(crate) fn parse_trailers(section: &[u8]) -> Result<HeaderMap, H1Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((_, fields))) => {
            let mut trailers = HeaderMap::with_capacity(fields.len());
            for field in fields {
                let name = HeaderName::from_bytes(field.name.as_bytes())
                    .map_err(|_| H1Error::Malformed("trailer name"))?;
                let value = HeaderValue::from_bytes(field.value)
                    .map_err(|_| H1Error::Malformed("trailer value"))?;
                trailers.append(name, value);
            }
            Ok(trailers)
        }
        Ok(httparse::Status::Partial) => Err(H1Error::Malformed("trailer section")),
        Err(httparse::Error::TooManyHeaders) => Err(H1Error::TooManyHeaders),
        Err(_) => Err(H1Error::Malformed("trailer section")),
    }
}

impl Body for RawBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match this.decode() {
                Ok(Step::Frame(frame)) => {
                    this.progressed = true;
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(Step::Done) => return Poll::Ready(None),
                Ok(Step::NeedMore) => {}
                Err(error) => return this.fail(error),
            }
            let Some(conn) = this.conn.as_mut() else {
                // Failed earlier (see `new`).
                return this.fail(H1Error::Malformed("response body framing"));
            };
            let want = match this.state {
                State::Length(left) | State::Chunked(Chunk::Data(left)) => usize::try_from(left)
                    .unwrap_or(READ_CHUNK)
                    .clamp(1, READ_CHUNK),
                _ => READ_CHUNK,
            };
            conn.buf.reserve(want);
            let RawConn { stream, buf, .. } = &mut **conn;
            match pin!(Raw(stream).read_buf(buf)).poll(cx) {
                Poll::Ready(Ok(0)) => {
                    if matches!(this.state, State::Close) {
                        this.state = State::Done;
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    return this.fail(H1Error::Truncated);
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(error)) => return this.fail(H1Error::Io(error)),
                Poll::Pending => {
                    let idle_timeout = this.idle_timeout;
                    let progressed = std::mem::take(&mut this.progressed);
                    let idle = this
                        .idle
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle_timeout)));
                    if progressed {
                        idle.as_mut().reset(Instant::now() + idle_timeout);
                    }
                    if idle.as_mut().poll(cx).is_ready() {
                        this.conn = None;
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(Box::new(ProxyError::TargetTimeout {
                            target: this.target.to_string(),
                            timeout: idle_timeout,
                        }))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(left) if self.conn.is_some() => SizeHint::with_exact(left),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8], is_head: bool) -> Result<Option<Head>, H1Error> {
        let mut buf = BytesMut::from(raw);
        parse_head(&mut buf, &mut HeaderNames::new(), 32 * 1024, is_head)
    }

    /// What the pipeline passes on of a response head (its fields after `strip_hop_by_hop`,
    /// in order) is the same whether or not the parse left a last `Connection: keep-alive`
    /// out, over varied heads: `Connection` lines of several kinds at every position, other
    /// hop-by-hop fields, a field a `Connection` names. The reference map holds every field
    /// of the head in order. Counts that the field was left out, and that the reference's
    /// strip reordered fields (the case the exception must stay clear of).
    #[test]
    fn leaving_out_a_last_keep_alive_changes_nothing_the_pipeline_passes_on() {
        let fields: &[(&str, &str)] = &[
            ("server", "nginx"),
            ("date", "Sun, 30 Nov 2026 03:00:00 GMT"),
            ("content-type", "text/plain"),
            ("content-length", "5"),
            ("connection", "keep-alive"),
            ("connection", "Keep-Alive"),
            ("connection", "keep-alive, x-named"),
            ("connection", "keep-alive,"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("x-named", "1"),
            ("etag", "\"abc\""),
            ("te", "trailers"),
        ];
        let ordered = |h: &HeaderMap| -> Vec<(String, Vec<u8>)> {
            h.iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect()
        };
        let mut rng =
            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x1234_5678_9abc_def1);
        let mut next = move |n: usize| rand::Rng::random_range(&mut rng, 0..n);
        let (mut left_out, mut reordered, mut clean) = (0, 0, 0);
        for _ in 0..20_000 {
            let picked: Vec<(&str, &str)> =
                (0..next(7)).map(|_| fields[next(fields.len())]).collect();
            let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
            let mut reference = HeaderMap::new();
            for (name, value) in &picked {
                raw.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
                reference.append(
                    HeaderName::from_static(name),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            raw.extend_from_slice(b"\r\n");
            let head = parse(&raw, false).expect("parses").expect("complete");
            let mut ours = head.headers;
            left_out += usize::from(ours.len() < reference.len());
            let in_order = |h: &HeaderMap| {
                let names: Vec<_> = h.keys().map(|n| n.as_str()).collect();
                let mut expected: Vec<&str> = picked.iter().map(|(n, _)| *n).collect();
                expected.dedup_by(|a, b| a == b);
                expected.retain(|n| names.contains(n));
                let mut seen = Vec::new();
                for n in expected {
                    if !seen.contains(&n) {
                        seen.push(n);
                    }
                }
                names == seen
            };
            // A head without a hop-by-hop field is passed on as parsed: the strip skipped.
            if head.hop_by_hop {
                crate::headers::strip_hop_by_hop(&mut ours, false);
            } else {
                clean += 1;
            }
            crate::headers::strip_hop_by_hop(&mut reference, false);
            reordered += usize::from(!in_order(&reference));
            assert_eq!(
                ordered(&ours),
                ordered(&reference),
                "{}",
                String::from_utf8_lossy(&raw)
            );
        }
        assert!(
            left_out > 500 && reordered > 1000 && clean > 1000,
            "{left_out} {reordered} {clean}"
        );
    }

    #[test]
    fn content_length_values_must_agree() {
        let mut h = HeaderMap::new();
        h.append(CONTENT_LENGTH, HeaderValue::from_static("5, 5"));
        assert_eq!(content_length(&h), Some(Ok(5)));
        h.append(CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert_eq!(content_length(&h), Some(Err(())));
        for (value, expected) in [
            ("+5", Err(())),
            ("-5", Err(())),
            ("5 5", Err(())),
            ("0x5", Err(())),
            ("", Err(())),
            (" 007 ", Ok(7)),
            ("18446744073709551615", Ok(u64::MAX)),
            ("18446744073709551616", Err(())),
            ("99999999999999999999", Err(())),
        ] {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_LENGTH, HeaderValue::from_static(value));
            assert_eq!(content_length(&h), Some(expected), "{value:?}");
            // The rule it replaces: all digits and a `u64`.
            let digits = value.trim();
            let by_parse = if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                digits.parse::<u64>().map_err(|_| ())
            } else {
                Err(())
            };
            assert_eq!(Some(by_parse), content_length(&h), "{value:?}");
        }
    }

    #[test]
    fn informational_responses_are_skipped() {
        let head = parse(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            false,
        )
        .expect("valid")
        .expect("complete");
        assert_eq!(head.status, StatusCode::OK);
        assert!(matches!(head.framing, State::Length(2)));
        assert!(head.keep_alive);
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let head = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true)
            .expect("valid")
            .expect("complete");
        assert!(matches!(head.framing, State::Length(0)), "HEAD");
        let head = parse(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
        )
        .expect("valid")
        .expect("complete");
        assert!(matches!(head.framing, State::Length(0)), "304");
        let head = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
            false,
        )
        .expect("valid")
        .expect("complete");
        assert!(matches!(head.framing, State::Chunked(Chunk::Size)));
        let head = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false)
            .expect("valid")
            .expect("complete");
        assert!(matches!(head.framing, State::Close));
        let head = parse(b"HTTP/1.0 200 OK\r\n\r\n", false)
            .expect("valid")
            .expect("complete");
        assert!(matches!(head.framing, State::Close));
        assert!(!head.keep_alive);
        let head = parse(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .expect("valid")
        .expect("complete");
        assert!(!head.keep_alive);
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false),
            Err(H1Error::Malformed(_))
        ));
    }

    #[test]
    fn a_value_httparse_accepts_is_a_valid_header_value() {
        // `parse_head` builds values unchecked on this: every byte, alone between two letters.
        let mut accepted = Vec::new();
        for b in 0..=255u8 {
            let value = [b'a', b, b'a'];
            let mut raw = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
            raw.extend_from_slice(&value);
            raw.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
            let mut fields = [httparse::EMPTY_HEADER; 4];
            let mut res = httparse::Response::new(&mut fields);
            let httparse_takes = matches!(res.parse(&raw), Ok(httparse::Status::Complete(_)))
                && res.headers.first().is_some_and(|f| f.value == value);
            assert_eq!(
                httparse_takes,
                HeaderValue::from_bytes(&value).is_ok(),
                "byte {b:#04x}"
            );
            if httparse_takes {
                accepted.push(b);
                // Through `parse_head` too (debug builds re-validate the unchecked value).
                let head = parse(&raw, false).expect("valid").expect("complete");
                assert_eq!(head.headers["x"].as_bytes(), value, "byte {b:#04x}");
            } else {
                assert!(parse(&raw, false).is_err(), "byte {b:#04x}");
            }
        }
        // Controls: tab, printable ASCII and obs-text pass; other controls and DEL do not.
        let expected: Vec<u8> = std::iter::once(b'\t')
            .chain(0x20..=0x7e)
            .chain(0x80..=0xff)
            .collect();
        assert_eq!(accepted, expected);
    }

    #[test]
    fn framing_fields_gathered_while_parsing_agree_with_the_map() {
        /// What a case should give: a framing, or `Malformed("Content-Length")`.
        type Expected = Option<fn(&State) -> bool>;
        let cases: &[(&[u8], Expected)] = &[
            (
                b"Content-Length: 5\r\nContent-Length: 5, 5\r\n",
                Some(|s| matches!(s, State::Length(5))),
            ),
            (b"Content-Length: 5\r\nX: y\r\nContent-Length: 6\r\n", None),
            (
                b"Content-Length: 5\r\nContent-Length: x\r\nContent-Length: 5\r\n",
                None,
            ),
            (b"Content-Length: \r\n", None),
            (
                b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                Some(|s| matches!(s, State::Chunked(Chunk::Size))),
            ),
            (
                b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
                Some(|s| matches!(s, State::Close)),
            ),
            (
                b"Transfer-Encoding: chunked , gzip\r\nContent-Length: 3\r\n",
                Some(|s| matches!(s, State::Close)),
            ),
            (
                b"Transfer-Encoding: x\r\nTransfer-Encoding:  CHUNKED \r\n",
                Some(|s| matches!(s, State::Chunked(Chunk::Size))),
            ),
            (b"X: y\r\n", Some(|s| matches!(s, State::Close))),
        ];
        for (fields, expected) in cases {
            let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
            raw.extend_from_slice(fields);
            raw.extend_from_slice(b"\r\n");
            let what = String::from_utf8_lossy(fields);
            match parse(&raw, false) {
                Ok(Some(head)) => {
                    let expected = expected.unwrap_or_else(|| panic!("{what}: parsed"));
                    assert!(expected(&head.framing), "{what}: {:?}", head.framing);
                    // The map-based answers (as used for requests) say the same.
                    let by_map = if head.headers.contains_key(TRANSFER_ENCODING) {
                        if is_chunked(&head.headers) {
                            "chunked".to_string()
                        } else {
                            "close".to_string()
                        }
                    } else {
                        format!("{:?}", content_length(&head.headers))
                    };
                    let parsed = match head.framing {
                        State::Chunked(_) => "chunked".to_string(),
                        State::Close if head.headers.contains_key(TRANSFER_ENCODING) => {
                            "close".to_string()
                        }
                        State::Close => "None".to_string(),
                        State::Length(n) => format!("{:?}", Some(Ok::<u64, ()>(n))),
                        State::Done => unreachable!(),
                    };
                    assert_eq!(parsed, by_map, "{what}");
                }
                Ok(None) => panic!("{what}: incomplete"),
                Err(error) => {
                    assert!(expected.is_none(), "{what}: {error}");
                    assert!(
                        matches!(error, H1Error::Malformed("Content-Length")),
                        "{what}"
                    );
                    let mut map = HeaderMap::new();
                    for line in fields.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                        let line = std::str::from_utf8(line).expect("ascii");
                        let (name, value) = line.trim_end().split_once(':').expect("field");
                        map.append(
                            HeaderName::from_bytes(name.as_bytes()).expect("name"),
                            HeaderValue::from_str(value.trim()).expect("value"),
                        );
                    }
                    assert_eq!(content_length(&map), Some(Err(())), "{what}");
                }
            }
        }
    }

    #[test]
    fn a_keep_alive_field_is_noticed() {
        let head = parse(
            b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .expect("valid")
        .expect("complete");
        assert!(head.keep_alive_field);
        let head = parse(b"HTTP/1.1 200 OK\r\nKeep-Alivex: 1\r\n\r\n", false)
            .expect("valid")
            .expect("complete");
        assert!(!head.keep_alive_field);
    }

    fn request_parts(headers: &[(&str, &str)]) -> http::request::Parts {
        let mut builder = Request::builder().method(Method::GET).uri("/p?q");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("valid request").into_parts().0
    }

    /// [`encode_head`] of a request made of `parts` and `body`, with `parts` updated as the
    /// request's were; the body comes back.
    fn encode_parts(
        parts: &mut http::request::Parts,
        body: ProxyBody,
        tail: &mut Option<ForwardedTail<'_>>,
    ) -> (EncodedHead, ProxyBody) {
        let taken = std::mem::replace(parts, Request::new(()).into_parts().0);
        let mut req = Request::from_parts(taken, body);
        let head = encode_head(&mut req, tail);
        let (encoded, body) = req.into_parts();
        *parts = encoded;
        (head, body)
    }

    fn empty_body() -> ProxyBody {
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    #[test]
    fn the_request_head_is_written_in_one_pass_and_notices_connection_close() {
        let mut parts = request_parts(&[("host", "a.test"), ("connection", "foo, Close")]);
        let (head, _) = encode_parts(&mut parts, empty_body(), &mut None);
        assert_eq!(
            head.bytes,
            b"GET /p?q HTTP/1.1\r\nhost: a.test\r\nconnection: foo, Close\r\n\r\n"
        );
        assert!(head.close);
        assert_eq!(head.framing, RequestFraming::None);
        let mut parts = request_parts(&[("connection", "keep-alive"), ("x-close", "close")]);
        let (head, _) = encode_parts(&mut parts, empty_body(), &mut None);
        assert!(!head.close);
    }

    /// `encode_head` as it was before the head of a bodiless request was written first (the
    /// framing decided and the map fixed up, then the head written): the reference.
    fn encode_head_by_lookup(parts: &mut http::request::Parts, body: &ProxyBody) -> EncodedHead {
        let headers = &mut parts.headers;
        let framing = if body.is_end_stream() {
            headers.remove(TRANSFER_ENCODING);
            RequestFraming::None
        } else if headers.contains_key(TRANSFER_ENCODING) {
            headers.remove(CONTENT_LENGTH);
            if !is_chunked(headers) {
                headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            }
            RequestFraming::Chunked
        } else if let Some(Ok(len)) = content_length(headers) {
            RequestFraming::Length(len)
        } else if let Some(len) = body.size_hint().exact() {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
            RequestFraming::Length(len)
        } else if matches!(parts.method, Method::GET | Method::HEAD | Method::CONNECT) {
            RequestFraming::None
        } else {
            headers.remove(CONTENT_LENGTH);
            headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            RequestFraming::Chunked
        };
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut head = Vec::new();
        head.extend_from_slice(parts.method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        let mut close = false;
        for (name, value) in parts.headers.iter() {
            if name == CONNECTION && has_token(value, "close") {
                close = true;
            }
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        EncodedHead {
            bytes: head,
            framing,
            close,
        }
    }

    /// A body that is not over and whose size is unknown.
    struct Streaming;

    impl http_body::Body for Streaming {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
            std::task::Poll::Pending
        }
    }

    /// The head, framing, close flag and fixed-up map agree with the reference over varied
    /// requests (framing fields present or not, repeated, with every kind of body); counts
    /// that the rewrite path (a bodiless request with `Transfer-Encoding`) was reached.
    #[test]
    fn the_request_head_agrees_with_the_framing_decided_first() {
        let fields: &[(&str, &str)] = &[
            ("host", "a.test"),
            ("transfer-encoding", "chunked"),
            ("transfer-encoding", "gzip"),
            ("content-length", "5"),
            ("content-length", "7"),
            ("connection", "close"),
            ("connection", "keep-alive"),
            ("x-forwarded-for", "10.0.0.1"),
        ];
        let mut rng =
            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x853c_49e6_748f_ea9b);
        let mut next = move |n: usize| rand::Rng::random_range(&mut rng, 0..n);
        let mut rewritten = 0;
        for _ in 0..10_000 {
            let mut builder = Request::builder()
                .method([Method::GET, Method::POST, Method::HEAD][next(3)].clone())
                .uri("/p?q");
            for _ in 0..next(6) {
                let (name, value) = fields[next(fields.len())];
                builder = builder.header(name, value);
            }
            let parts = builder.body(()).expect("valid request").into_parts().0;
            let body: ProxyBody = match next(3) {
                0 => empty_body(),
                1 => http_body_util::Full::new(Bytes::from_static(b"hello"))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
                _ => Streaming.boxed_unsync(),
            };
            let (mut ours, mut reference) = (parts.clone(), parts);
            rewritten +=
                usize::from(body.is_end_stream() && ours.headers.contains_key(TRANSFER_ENCODING));
            let b = encode_head_by_lookup(&mut reference, &body);
            let (a, _) = encode_parts(&mut ours, body, &mut None);
            assert_eq!(
                (String::from_utf8_lossy(&a.bytes), a.framing, a.close),
                (String::from_utf8_lossy(&b.bytes), b.framing, b.close)
            );
            assert_eq!(ours.headers, reference.headers);
        }
        assert!(
            rewritten > 500,
            "only {rewritten} bodiless requests with a coding"
        );
    }

    /// A request written with a [`ForwardedTail`] is the request written with the tail's
    /// fields appended to its map: same bytes, framing and `close`; and what is left of the
    /// tail, appended to the map after encoding (what `send` does before handing a request
    /// back for a retry), gives the same map in the same order. Over bodiless requests (the
    /// ones the pipeline gives a tail), with and without a `Transfer-Encoding` to remove,
    /// and requests with bodies.
    #[test]
    fn a_tail_writes_the_head_its_fields_in_the_map_write() {
        use crate::headers::{ForwardedPeer, XffMode, forwarded_port};
        let fields: &[(&str, &str)] = &[
            ("host", "a.test"),
            ("user-agent", "h2load"),
            ("transfer-encoding", "chunked"),
            ("content-length", "5"),
            ("connection", "close"),
            ("accept", "*/*"),
        ];
        let peer = ForwardedPeer::new(std::net::IpAddr::from([10, 1, 2, 3]));
        let port = forwarded_port(8080);
        let in_order = |headers: &HeaderMap| -> Vec<(String, Vec<u8>)> {
            headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect()
        };
        let mut rng =
            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0xbb67_ae85_84ca_a73b);
        let mut next = move |n: usize| rand::Rng::random_range(&mut rng, 0..n);
        let mut reached = [0usize; 3];
        for round in 0..10_000u64 {
            let mut builder = Request::builder()
                .method([Method::GET, Method::POST, Method::HEAD][next(3)].clone())
                .uri("/p?q");
            for _ in 0..next(6) {
                let (name, value) = fields[next(fields.len())];
                builder = builder.header(name, value);
            }
            let parts = builder.body(()).expect("valid request").into_parts().0;
            let body = || -> ProxyBody {
                match round % 4 {
                    0 | 1 => empty_body(),
                    2 => http_body_util::Full::new(Bytes::from_static(b"hello"))
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                    _ => Streaming.boxed_unsync(),
                }
            };
            let mode = [XffMode::Append, XffMode::Preserve, XffMode::Remove][next(3)];
            let now = std::time::UNIX_EPOCH + Duration::from_secs(round);
            let tail = || {
                let mut random = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(round);
                ForwardedTail::new(&peer, "http", &port, mode, now, &mut random)
            };
            let (mut ours, mut reference) = (parts.clone(), parts);
            tail().append_to(&mut reference.headers);
            let (ours_body, reference_body) = (body(), body());
            let (b, _) = encode_parts(&mut reference, reference_body, &mut None);
            let mut ours_tail = Some(tail());
            let (a, ours_body) = encode_parts(&mut ours, ours_body, &mut ours_tail);
            assert_eq!(
                (String::from_utf8_lossy(&a.bytes), a.framing, a.close),
                (String::from_utf8_lossy(&b.bytes), b.framing, b.close)
            );
            reached[0] += usize::from(ours_tail.is_some());
            reached[1] += usize::from(ours_tail.is_none() && ours_body.is_end_stream());
            reached[2] += usize::from(!ours_body.is_end_stream());
            if let Some(left) = ours_tail {
                left.append_to(&mut ours.headers);
            }
            assert_eq!(in_order(&ours.headers), in_order(&reference.headers));
        }
        assert!(reached.iter().all(|&n| n > 500), "{reached:?}");
    }

    /// A head with more fields than the first parse has room for is parsed again with room
    /// for all of them, whole and in order, also after an informational response.
    #[test]
    fn a_head_with_more_fields_than_the_first_parse_holds_is_parsed_whole() {
        for fields in [FIRST_TRY_FIELDS, FIRST_TRY_FIELDS + 1, MAX_HEADERS] {
            for early_hints in [false, true] {
                let mut raw = Vec::new();
                if early_hints {
                    raw.extend(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n");
                }
                raw.extend(b"HTTP/1.1 200 OK\r\n");
                for i in 0..fields {
                    raw.extend(format!("x-{i}: {i}\r\n").as_bytes());
                }
                raw.extend(b"\r\n");
                let head = parse(&raw, false).unwrap().unwrap();
                assert_eq!(head.status, StatusCode::OK);
                let got: Vec<(String, String)> = head
                    .headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
                    .collect();
                let want: Vec<(String, String)> = (0..fields)
                    .map(|i| (format!("x-{i}"), i.to_string()))
                    .collect();
                assert_eq!(got, want, "{fields} fields, early hints: {early_hints}");
            }
        }
    }

    #[test]
    fn oversized_heads_and_too_many_fields_are_refused() {
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 40 * 1024));
        assert!(matches!(parse(&raw, false), Err(H1Error::HeadTooLarge(_))));
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            raw.extend(format!("x-{i}: y\r\n").as_bytes());
        }
        raw.extend(b"\r\n");
        assert!(matches!(parse(&raw, false), Err(H1Error::TooManyHeaders)));
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nX: y\r\n", false),
            Ok(None)
        ));
    }
}
