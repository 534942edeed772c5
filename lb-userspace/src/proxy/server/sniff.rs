//! The client-side byte stream of an HTTP/1 connection, as seen *before* hyper parses it.
//!
//! hyper's HTTP/1 parser normalises (drops `Content-Length` next to `Transfer-Encoding`, trims
//! whitespace) and rejects some requests with its own bodiless status codes (400 for
//! `Transfer-Encoding: gzip` or `HTTP/3.0`, 431 for big heads), and its header-read timeout
//! closes without 408. ALB answers these differently, so [`Sniffer`] sits between the socket and
//! hyper: it collects each request head (within the listener's `header-timeout`), enforces the
//! header size limits, classifies it ([`crate::proxy::desync`]) and then either hands hyper the
//! head rebuilt from its tokens (`head.rs`: framed exactly as we frame the body) or, when the
//! request must be answered by the load balancer without being parsed by hyper (400, 408, 501,
//! 505), a small synthetic head. In both cases a [`HeadVerdict`] is queued for the request
//! handler, which pops one per HTTP/1 request (hyper handles one request at a time, in order).
//! After a rejection, and after the body of a request forwarded-then-closed (ambiguous in
//! `defensive` mode), no further client bytes reach hyper: the handler answers with
//! `Connection: close` and hyper closes. Request bodies are tracked (length or chunked framing)
//! so the next head is found where hyper will look for it. A possible upgrade (`Upgrade`,
//! CONNECT) pauses reading until the handler says whether the response was 101; after a 101 the
//! stream is passed through untouched (it is a WebSocket now). HTTP/2 connections (ALPN `h2`, or
//! the prior-knowledge preface on plain listeners) are passed through, with the idle timeout.
//!
//! In native mode (the default for HTTP/1, `h1.rs`) the same decisions come out differently:
//! a head let through becomes request parts built from its tokens (no rebuilt head), a
//! rejection becomes a [`NativeEvent::Synthetic`] instead of the synthetic head, and body bytes
//! are delivered up to the next head ([`Sniffer::poll_native`]). At an upgrade or the HTTP/2
//! preface the sniffer leaves native mode ([`NativeEvent::Handoff`]) and feeds hyper as above.
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::head;
use crate::proxy::deadline::poll_idle_deadline;
use crate::proxy::desync::{self, Classification, DesyncMode, Mitigation};
use crate::proxy::names::HeaderNames;

/// Longest request line and longest single header line (ALB: 16 KiB).
pub const MAX_LINE: usize = 16 * 1024;
/// Most bytes of all header lines together (ALB: 64 KiB).
pub const MAX_HEADERS_TOTAL: usize = 64 * 1024;
/// Most header fields in one HTTP/1 request: hyper's parser keeps its header slots on the stack
/// for up to 100 (its default, and Envoy's; HAProxy allows 101). ALB documents no count limit,
/// only the 64 KiB total; a higher bound here would make hyper allocate and fill two slot arrays
/// of that size for every message, which cost 10–25% of the HTTP/1 requests per CPU-second
/// (BENCHMARKS.md). The sniffer rejects the 101st header with ALB's 400 before hyper sees it.
pub const MAX_HEADER_COUNT: usize = 100;

/// The `reason` of the 408 for a request head that missed the listener's `header-timeout`.
pub const HEADER_TIMEOUT_REASON: &str = "request head not complete within the header timeout";

const HTTP2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0\r\n";
/// What a connection's head buffer starts with: most request heads fit.
const INITIAL_HEAD_CAPACITY: usize = 512;
/// The largest head buffer a connection keeps between requests (a bigger one, from an unusual
/// head, is freed rather than held for the connection's life).
const KEPT_HEAD_CAPACITY: usize = 4096;
/// What hyper parses in place of a request the load balancer answers itself.
const SYNTHETIC_HEAD: &[u8] = b"GET / HTTP/1.1\r\nhost: lb.invalid\r\nconnection: close\r\n\r\n";

/// What the sniffer decided about one HTTP/1 request head, for the request handler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadVerdict {
    /// hyper got the original head.
    Pass {
        /// The desync classification.
        classification: Classification,
        /// What the listener's desync mode says to do.
        mitigation: Mitigation,
        /// The request may upgrade the connection; the handler must call
        /// [`ConnShared::decide_upgrade`].
        upgrade: bool,
        /// Bytes of the head as the client sent it (request line through the empty line):
        /// the access log's `received_bytes` counts them.
        head_len: usize,
    },
    /// hyper got [`SYNTHETIC_HEAD`]; answer `status` and close.
    Reject {
        /// 400, 408, 501 or 505.
        status: StatusCode,
        /// Short reason for logs.
        reason: &'static str,
        /// The classification (compliant for limits, 408, 501, 505).
        classification: Classification,
        /// The request line and host, when the head was complete enough to have them (the
        /// access log shows what the client sent, not the synthetic head hyper got).
        line: Option<Box<RawRequestLine>>,
        /// Bytes of the head received.
        head_len: usize,
    },
}

/// A rejected request's line as the client wrote it (lossy UTF-8, each part at most
/// [`MAX_LINE`] bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRequestLine {
    /// The method token.
    pub method: String,
    /// The request target.
    pub target: String,
    /// The version token.
    pub version: String,
    /// The first `Host` header's value, trimmed.
    pub host: Option<String>,
}

impl RawRequestLine {
    fn of(raw: &desync::RawHead<'_>) -> Box<Self> {
        let text = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(MAX_LINE)]).into_owned();
        Box::new(Self {
            method: text(raw.method),
            target: text(raw.target),
            version: text(raw.version.trim_ascii()),
            host: raw
                .headers
                .iter()
                .find(|h| !h.continuation && h.name.trim_ascii().eq_ignore_ascii_case(b"host"))
                .map(|h| text(h.value.trim_ascii())),
        })
    }
}

/// State shared between a connection's [`Sniffer`] and its request handler.
#[derive(Debug)]
pub struct ConnShared {
    verdicts: Mutex<VecDeque<HeadVerdict>>,
    inflight: AtomicUsize,
    activity: Mutex<Instant>,
    upgrade: Mutex<UpgradeGate>,
}

#[derive(Debug, Default)]
struct UpgradeGate {
    decision: Option<bool>,
    waker: Option<Waker>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ConnShared {
    /// Fresh state for a new connection.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            verdicts: Mutex::default(),
            inflight: AtomicUsize::new(0),
            activity: Mutex::new(Instant::now()),
            upgrade: Mutex::default(),
        })
    }

    /// The verdict for the next HTTP/1 request, in order. `None` for HTTP/2 (or if the sniffer
    /// was bypassed), which is treated as compliant.
    pub fn pop_verdict(&self) -> Option<HeadVerdict> {
        lock(&self.verdicts).pop_front()
    }

    /// A request started; the idle timeout does not run while requests are outstanding.
    pub fn request_started(&self) {
        self.inflight.fetch_add(1, Ordering::SeqCst);
    }

    /// A request (including its response body) finished; the idle timeout restarts now.
    pub fn request_finished(&self) {
        *lock(&self.activity) = Instant::now();
        self.inflight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Tells the sniffer whether the request flagged `upgrade` got a 101.
    pub fn decide_upgrade(&self, upgraded: bool) {
        let mut gate = lock(&self.upgrade);
        gate.decision = Some(upgraded);
        if let Some(w) = gate.waker.take() {
            w.wake();
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Chunk {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data(u64),
    DataCr,
    DataLf,
    /// In a trailer line (`true` if it has any byte besides CR).
    Trailer(bool),
}

/// Where the scan of a chunked body stands. The one chunked grammar of the HTTP/1 server side:
/// the sniffer uses it to find where a body ends (and the next head starts), the native path's
/// body decoder (`h1.rs`) to take the body apart, so both end a body at the same byte. It is
/// tolerant the way the desync classifier expects: a chunk size ends at the first byte that is
/// no hex digit (the rest of that line is an extension), a lone LF ends a line, and a chunk's
/// data need not be followed by CRLF.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct ChunkScan {
    chunk: Chunk,
    size: u64,
}

/// A piece of a chunked body, as [`ChunkScan::scan`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ChunkPiece {
    /// Chunk data: this range of the scanned bytes.
    Data(std::ops::Range<usize>),
    /// A byte of the trailer section (every byte after the last chunk but the final LF).
    Trailer(u8),
}

impl ChunkScan {
    fn after_size(&self) -> Chunk {
        if self.size == 0 {
            Chunk::Trailer(false)
        } else {
            Chunk::Data(self.size)
        }
    }

    /// Advances over `data`, reporting chunk data and trailer bytes to `on` (an error from `on`
    /// stops the scan). Returns the index just past the body's end when the body ends within
    /// `data`, else `None`: all of `data` belongs to the body.
    pub(super) fn scan<E>(
        &mut self,
        data: &[u8],
        mut on: impl FnMut(ChunkPiece) -> Result<(), E>,
    ) -> Result<Option<usize>, E> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.chunk {
                Chunk::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let digit = u64::from((b as char).to_digit(16).unwrap_or(0));
                        self.size = self.size.saturating_mul(16).saturating_add(digit);
                    }
                    b'\r' => self.chunk = Chunk::SizeLf,
                    b'\n' => self.chunk = self.after_size(),
                    _ => self.chunk = Chunk::Ext,
                },
                Chunk::Ext => match b {
                    b'\r' => self.chunk = Chunk::SizeLf,
                    b'\n' => self.chunk = self.after_size(),
                    _ => {}
                },
                Chunk::SizeLf => self.chunk = self.after_size(),
                Chunk::Data(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len() - i);
                    on(ChunkPiece::Data(i..i + take))?;
                    i += take;
                    let left = n - take as u64;
                    self.chunk = if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left)
                    };
                    continue;
                }
                Chunk::DataCr => {
                    self.chunk = if b == b'\r' {
                        Chunk::DataLf
                    } else {
                        Chunk::Size
                    };
                    self.size = 0;
                }
                Chunk::DataLf => {
                    self.chunk = Chunk::Size;
                    self.size = 0;
                }
                Chunk::Trailer(has_bytes) => {
                    if b == b'\n' && !has_bytes {
                        return Ok(Some(i + 1));
                    }
                    on(ChunkPiece::Trailer(b))?;
                    match b {
                        b'\n' => self.chunk = Chunk::Trailer(false),
                        b'\r' => {}
                        _ => self.chunk = Chunk::Trailer(true),
                    }
                }
            }
            i += 1;
        }
        Ok(None)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Collecting a request head.
    Head,
    /// Passing a fixed-length body.
    Length(u64),
    /// Passing a chunked body (current chunk state, chunk size being read).
    Chunked(ChunkScan),
    /// Waiting for the handler to say whether the connection was upgraded.
    AwaitUpgrade,
    /// Raw pass-through (HTTP/2 with the idle timeout; upgraded connections without).
    Passthrough { idle: bool },
    /// A rejection was handed to hyper; nothing more is read.
    Stopped,
}

/// The client-side timeouts the sniffer enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// No byte from the client for this long: 408 before a request, close between requests,
    /// error inside a request body (the listener's `idle-timeout`).
    pub idle: Duration,
    /// An HTTP/1 request head must be complete this long after it started (408 otherwise):
    /// the listener's `header-timeout`.
    pub header: Duration,
}

/// What the connection's own HTTP/1 loop (`h1.rs`, the "native" path) gets from a sniffer in
/// native mode, in stream order with the body bytes ([`Sniffer::poll_native`]).
#[derive(Debug)]
pub enum NativeEvent {
    /// A request head the sniffer let through, as request parts (its verdict is queued as
    /// for hyper). Its body bytes, if any, follow as [`Native::Data`].
    Head(Box<http::request::Parts>),
    /// The load balancer answers the request itself (400, 408, 501, 505): its `Reject`
    /// verdict is queued; nothing more is read.
    Synthetic,
    /// From here on hyper serves the connection (WebSocket/CONNECT upgrade, HTTP/2 preface):
    /// the sniffer is back in its hyper mode and `poll_read` replays, from this point, what
    /// hyper must parse.
    Handoff,
}

/// One step of [`Sniffer::poll_native`].
#[derive(Debug)]
pub enum Native {
    /// Request body bytes, as the client framed them (chunk framing included).
    Data(bytes::Bytes),
    /// A request boundary.
    Event(NativeEvent),
    /// The client closed the connection, or it was idle between requests for the idle
    /// timeout.
    Eof,
}

/// The sniffing wrapper around a client connection (see the module docs).
pub struct Sniffer<IO> {
    io: IO,
    /// Native mode: heads come out as [`NativeEvent`]s instead of bytes for hyper.
    native: bool,
    /// Native mode: events and the `out` offset each sits at.
    events: VecDeque<(usize, NativeEvent)>,
    shared: Arc<ConnShared>,
    mode: DesyncMode,
    state: State,
    /// Bytes of the head being collected.
    head: Vec<u8>,
    /// Start of the current, unfinished line in `head`.
    line_start: usize,
    /// Complete lines in `head` (the request line included).
    head_lines: usize,
    /// Length of the request line once known.
    request_line: Option<usize>,
    /// Bytes ready for hyper, and how many of them were delivered.
    out: Vec<u8>,
    out_pos: usize,
    /// A head is complete and its body is being passed; go to `AwaitUpgrade` after it.
    upgrade_after_body: bool,
    /// A head is complete and its body is being passed; read nothing after it (the request
    /// was forwarded with `Connection: close`).
    stop_after_body: bool,
    /// Any byte received on this connection yet.
    seen_any: bool,
    first_head: bool,
    /// Length of the last complete head (a rejection after it reports it).
    last_head_len: usize,
    idle_timeout: Duration,
    last_read: Instant,
    sleep: Pin<Box<Sleep>>,
    header_timeout: Duration,
    /// When the head being collected must be complete: set when the connection starts (first
    /// request) or with the first byte of a later head; cleared when the head is complete.
    head_deadline: Option<Instant>,
    header_sleep: Pin<Box<Sleep>>,
    /// Native mode: the header names of the previous head, used again (`proxy::names`).
    names: HeaderNames,
}

impl<IO> Sniffer<IO> {
    /// Wraps `io`. `http1`: sniff HTTP/1 heads (false: HTTP/2 by ALPN, pass through).
    pub fn new(
        io: IO,
        shared: Arc<ConnShared>,
        mode: DesyncMode,
        timeouts: Timeouts,
        http1: bool,
    ) -> Self {
        let now = Instant::now();
        let Timeouts {
            idle: idle_timeout,
            header: header_timeout,
        } = timeouts;
        Self {
            io,
            native: false,
            events: VecDeque::new(),
            shared,
            mode,
            state: if http1 {
                State::Head
            } else {
                State::Passthrough { idle: true }
            },
            head: Vec::new(),
            line_start: 0,
            head_lines: 0,
            request_line: None,
            out: Vec::new(),
            out_pos: 0,
            upgrade_after_body: false,
            stop_after_body: false,
            seen_any: false,
            first_head: true,
            last_head_len: 0,
            idle_timeout,
            last_read: now,
            sleep: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
            header_timeout,
            head_deadline: http1.then(|| now + header_timeout),
            header_sleep: Box::pin(tokio::time::sleep_until(now + header_timeout)),
            names: HeaderNames::new(),
        }
    }

    /// Whether the bytes being read belong to a request body (its end not reached yet).
    pub fn in_body(&self) -> bool {
        matches!(self.state, State::Length(_) | State::Chunked(..))
    }

    /// Whether the connection is HTTP/2 passed through (ALPN `h2`, or the prior-knowledge
    /// preface the native HTTP/1 path handed off), not an HTTP/1 request handed to hyper.
    pub fn is_http2(&self) -> bool {
        matches!(self.state, State::Passthrough { idle: true })
    }

    /// Native mode (see [`Sniffer::poll_native`]); call before any byte is read.
    pub fn set_native(&mut self) {
        self.native = true;
    }

    fn push_verdict(&self, v: HeadVerdict) {
        lock(&self.shared.verdicts).push_back(v);
    }

    fn reject(&mut self, status: StatusCode, reason: &'static str, classification: Classification) {
        self.reject_line(status, reason, classification, None);
    }

    fn reject_line(
        &mut self,
        status: StatusCode,
        reason: &'static str,
        classification: Classification,
        line: Option<Box<RawRequestLine>>,
    ) {
        let head_len = if self.head.is_empty() {
            std::mem::take(&mut self.last_head_len)
        } else {
            self.head.len()
        };
        self.push_verdict(HeadVerdict::Reject {
            status,
            reason,
            classification,
            line,
            head_len,
        });
        if self.native {
            self.events
                .push_back((self.out.len(), NativeEvent::Synthetic));
        } else {
            self.out.extend_from_slice(SYNTHETIC_HEAD);
        }
        self.head.clear();
        self.head_deadline = None;
        self.state = State::Stopped;
    }

    /// Feeds newly read bytes through the state machine; they were read at `last_read`.
    fn on_bytes(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Stopped => return,
                State::Passthrough { .. } | State::AwaitUpgrade => {
                    self.out.extend_from_slice(data);
                    return;
                }
                State::Length(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len());
                    self.out.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        self.after_body()
                    } else {
                        State::Length(left)
                    };
                }
                State::Chunked(mut scan) => {
                    let Ok(end) = scan.scan(data, |_| Ok::<(), std::convert::Infallible>(()));
                    let used = match end {
                        Some(end) => {
                            self.state = self.after_body();
                            end
                        }
                        None => {
                            self.state = State::Chunked(scan);
                            data.len()
                        }
                    };
                    self.out.extend_from_slice(&data[..used]);
                    data = &data[used..];
                }
                State::Head => {
                    if self.head_deadline.is_none() {
                        // The head starts with the read that brought its first byte (its time
                        // is at hand: a second clock read per request is not needed).
                        self.head_deadline = Some(self.last_read + self.header_timeout);
                    }
                    let used = self.head_bytes(data);
                    data = &data[used..];
                }
            }
        }
    }

    fn after_body(&mut self) -> State {
        if std::mem::take(&mut self.upgrade_after_body) {
            State::AwaitUpgrade
        } else if std::mem::take(&mut self.stop_after_body) {
            State::Stopped
        } else {
            State::Head
        }
    }

    /// Collects head bytes; returns how many of `data` were consumed (the rest follows the head).
    fn head_bytes(&mut self, data: &[u8]) -> usize {
        let mut i = 0;
        // Empty lines before a request line are ignored by hyper (RFC 7230 §3.5).
        if self.head.is_empty() {
            while i < data.len() && matches!(data[i], b'\r' | b'\n') {
                i += 1;
            }
            if !self.native {
                self.out.extend_from_slice(&data[..i]);
            }
        }
        if self.head.capacity() == 0 {
            self.head.reserve(INITIAL_HEAD_CAPACITY);
        }
        while i < data.len() {
            // A line at a time: the bytes up to and including the next LF are copied in one
            // piece (a byte-at-a-time push was the head's biggest cost). Without an LF, all of
            // `data` belongs to the unfinished line; its limits are checked below.
            let Some(lf) = memchr::memchr(b'\n', &data[i..]) else {
                self.head.extend_from_slice(&data[i..]);
                i = data.len();
                break;
            };
            let end = i + lf + 1;
            self.head.extend_from_slice(&data[i..end]);
            i = end;
            let line = &self.head[self.line_start..];
            let content_len =
                line.len() - 1 - usize::from(line.len() >= 2 && line[line.len() - 2] == b'\r');
            self.line_start = self.head.len();
            self.head_lines += 1;
            if self.request_line.is_none() {
                self.request_line = Some(self.head.len());
                if content_len > MAX_LINE {
                    self.reject(
                        StatusCode::BAD_REQUEST,
                        "request line over 16 KiB",
                        Classification::COMPLIANT,
                    );
                    return data.len();
                }
                continue;
            }
            if content_len == 0 {
                self.complete_head();
                return i;
            }
            if content_len > MAX_LINE {
                self.reject(
                    StatusCode::BAD_REQUEST,
                    "header over 16 KiB",
                    Classification::COMPLIANT,
                );
                return data.len();
            }
        }
        // Limits on what is still incomplete.
        let unfinished = self.head.len() - self.line_start;
        let headers_total = self.head.len() - self.request_line.unwrap_or(0);
        if unfinished > MAX_LINE + 2 {
            let reason = if self.request_line.is_none() {
                "request line over 16 KiB"
            } else {
                "header over 16 KiB"
            };
            self.reject(StatusCode::BAD_REQUEST, reason, Classification::COMPLIANT);
            return data.len();
        }
        if self.request_line.is_some() && headers_total > MAX_HEADERS_TOTAL {
            self.reject(
                StatusCode::BAD_REQUEST,
                "headers over 64 KiB",
                Classification::COMPLIANT,
            );
            return data.len();
        }
        i
    }

    /// A whole head is in `self.head`: decide what hyper gets. The buffer is kept for the
    /// next head (emptied): a new one grew from 8 bytes by doubling, four allocations on
    /// every request of a keep-alive connection. One that grew large is let go.
    fn complete_head(&mut self) {
        let mut head = std::mem::take(&mut self.head);
        self.decide_head(&head);
        if self.head.is_empty() && head.capacity() <= KEPT_HEAD_CAPACITY {
            head.clear();
            self.head = head;
        }
    }

    fn decide_head(&mut self, head: &[u8]) {
        self.head_deadline = None;
        self.last_head_len = head.len();
        self.line_start = 0;
        let lines = std::mem::take(&mut self.head_lines);
        let request_line = self.request_line.take().unwrap_or(0);
        let first = std::mem::replace(&mut self.first_head, false);
        if first && head.starts_with(HTTP2_PREFACE_LINE) {
            // HTTP/2 prior knowledge (h2c): the listener's HTTP/2 server takes it from here
            // (`server/h2native.rs`, or hyper-util's auto builder with `http2=hyper`).
            self.hand_off();
            self.out.extend_from_slice(head);
            self.state = State::Passthrough { idle: true };
            return;
        }
        if head.len() - request_line > MAX_HEADERS_TOTAL {
            self.reject(
                StatusCode::BAD_REQUEST,
                "headers over 64 KiB",
                Classification::COMPLIANT,
            );
            return;
        }
        // Every line after the request line, less the empty one that ends the head: an upper
        // bound on the header fields hyper will find (a folded line counts as one more).
        let header_lines = lines.saturating_sub(1);
        if header_lines.saturating_sub(1) > MAX_HEADER_COUNT {
            self.reject(
                StatusCode::BAD_REQUEST,
                "too many headers",
                Classification::COMPLIANT,
            );
            return;
        }
        let raw = desync::tokenize_lines(head, lines);
        let c = desync::classify_tokens(&raw);
        let mitigation = self.mode.mitigation(c.tier);
        if mitigation == Mitigation::Block {
            let reason = c.reason.map_or("non-compliant request", |r| r.as_str());
            self.reject_line(
                StatusCode::BAD_REQUEST,
                reason,
                c,
                Some(RawRequestLine::of(&raw)),
            );
            return;
        }
        let (mut p, parts) = if self.native {
            head::prepare_parts(&raw, c, &mut self.names)
        } else {
            (head::prepare(&raw), None)
        };
        if p.trace && (p.unsupported_coding || p.version.is_none()) {
            // ALB's order: 405 for TRACE comes before 501 and 505.
            self.reject_line(
                StatusCode::METHOD_NOT_ALLOWED,
                "TRACE",
                c,
                Some(RawRequestLine::of(&raw)),
            );
            return;
        }
        if p.version.is_none() {
            self.reject_line(
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "unsupported HTTP version",
                c,
                Some(RawRequestLine::of(&raw)),
            );
            return;
        }
        if let Some(reason) = p.malformed {
            self.reject_line(
                StatusCode::BAD_REQUEST,
                reason,
                c,
                Some(RawRequestLine::of(&raw)),
            );
            return;
        }
        if p.version == Some(head::Version::Http11) && p.host_headers != 1 {
            // RFC 9112 §3.2: exactly one Host in HTTP/1.1, else 400 (routing on a guessed
            // host would be unsafe).
            let reason = if p.host_headers == 0 {
                "missing Host header"
            } else {
                "more than one Host header"
            };
            self.reject_line(
                StatusCode::BAD_REQUEST,
                reason,
                c,
                Some(RawRequestLine::of(&raw)),
            );
            return;
        }
        if p.unsupported_coding {
            self.reject_line(
                StatusCode::NOT_IMPLEMENTED,
                "unsupported transfer-encoding",
                c,
                Some(RawRequestLine::of(&raw)),
            );
            return;
        }
        self.push_verdict(HeadVerdict::Pass {
            classification: c,
            mitigation,
            upgrade: p.upgrade,
            head_len: head.len(),
        });
        self.last_head_len = 0;
        match parts {
            Some(parts) if !p.upgrade => {
                self.events
                    .push_back((self.out.len(), NativeEvent::Head(parts)));
            }
            _ => {
                if self.native {
                    // An upgrade: hyper serves the rest of the connection, from this head on.
                    self.hand_off();
                    p = head::prepare(&raw);
                }
                // hyper gets the rebuilt head, never the client's bytes: it frames what we
                // framed.
                self.out.extend_from_slice(&p.head);
            }
        }
        self.upgrade_after_body = p.upgrade;
        // Ambiguous in defensive mode: nothing after this request's body reaches hyper; the
        // response says `Connection: close`.
        self.stop_after_body = mitigation == Mitigation::ForwardThenClose;
        self.state = match p.framing {
            head::Framing::Length(n) if n > 0 => State::Length(n),
            head::Framing::Chunked => State::Chunked(ChunkScan::default()),
            head::Framing::Empty | head::Framing::Length(_) => self.after_body(),
        };
    }

    /// The request-head deadline, polled when the socket has nothing to read. Returns true when
    /// a head is being collected and its deadline passed.
    fn head_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = self.head_deadline.filter(|_| self.state == State::Head) else {
            return false;
        };
        if self.header_sleep.deadline() != deadline {
            self.header_sleep.as_mut().reset(deadline);
        }
        self.header_sleep.as_mut().poll(cx).is_ready()
    }

    /// The idle timer, polled when the socket has nothing to read. Returns true when it expired.
    /// Between requests it does not run while a response is outstanding (the target side has
    /// its own timeout); inside a request body it always runs: the client must keep sending.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let in_body = matches!(self.state, State::Length(_) | State::Chunked(..));
        if !in_body && self.shared.inflight.load(Ordering::SeqCst) > 0 {
            return false;
        }
        let activity = *lock(&self.shared.activity);
        let deadline = self.last_read.max(activity) + self.idle_timeout;
        // Only ever moved to an earlier deadline here (the deadline moves later with every
        // request; `poll_idle_deadline` moves the timer on when it fires).
        if self.sleep.deadline() > deadline {
            self.sleep.as_mut().reset(deadline);
        }
        poll_idle_deadline(self.sleep.as_mut(), cx, || deadline).is_ready()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Sniffer<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            match this.state {
                // The handler answers with `Connection: close`; hyper closes after writing it.
                State::Stopped => return Poll::Pending,
                State::Passthrough { idle: false } => {
                    return Pin::new(&mut this.io).poll_read(cx, buf);
                }
                State::AwaitUpgrade => {
                    let mut gate = lock(&this.shared.upgrade);
                    match gate.decision.take() {
                        Some(true) => this.state = State::Passthrough { idle: false },
                        Some(false) => this.state = State::Head,
                        None => {
                            gate.waker = Some(cx.waker().clone());
                            return Poll::Pending;
                        }
                    }
                    continue;
                }
                State::Head | State::Length(_) | State::Chunked(..) | State::Passthrough { .. } => {
                }
            }
            match ready!(this.poll_fill(cx)) {
                Ok(true) => {}
                Ok(false) => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> Sniffer<IO> {
    /// Reads once from the client into the state machine and runs the timeouts when there is
    /// nothing to read. `Ok(true)`: progress (bytes, or a 408 queued); `Ok(false)`: the client
    /// closed, or an idle keep-alive connection timed out.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        // Uninitialised: zeroing 8 KiB before every read showed in the HTTP/1 profile, and
        // `ReadBuf` only hands out the bytes the read filled.
        let mut tmp = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
        let mut rb = ReadBuf::uninit(&mut tmp);
        match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let filled = rb.filled();
                if filled.is_empty() {
                    return Poll::Ready(Ok(false));
                }
                self.last_read = Instant::now();
                self.seen_any = true;
                self.on_bytes(filled);
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.head_expired(cx) {
                    // Slow request head (slowloris): 408, then close, even while bytes
                    // keep trickling in.
                    self.reject(
                        StatusCode::REQUEST_TIMEOUT,
                        HEADER_TIMEOUT_REASON,
                        Classification::COMPLIANT,
                    );
                    return Poll::Ready(Ok(true));
                }
                if !self.idle_expired(cx) {
                    return Poll::Pending;
                }
                match self.state {
                    State::Head if !self.seen_any || !self.head.is_empty() => {
                        // ALB: the client sent no (complete) request within the idle
                        // timeout: 408, then close.
                        self.reject(
                            StatusCode::REQUEST_TIMEOUT,
                            "idle timeout before a request",
                            Classification::COMPLIANT,
                        );
                        Poll::Ready(Ok(true))
                    }
                    // Idle keep-alive connection (or HTTP/2 with no stream): just close.
                    State::Head | State::Passthrough { .. } => Poll::Ready(Ok(false)),
                    _ => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client idle timeout during the request body",
                    ))),
                }
            }
        }
    }

    /// Native mode: the next body bytes or request boundary, in stream order. Body bytes come
    /// only up to the next event, so a body's reader never sees the next request.
    pub fn poll_native(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Native>> {
        loop {
            let limit = self.events.front().map_or(self.out.len(), |(at, _)| *at);
            if self.out_pos < limit {
                let data = bytes::Bytes::copy_from_slice(&self.out[self.out_pos..limit]);
                self.out_pos = limit;
                self.compact_out();
                return Poll::Ready(Ok(Native::Data(data)));
            }
            if let Some((_, event)) = self.events.pop_front() {
                self.compact_out();
                return Poll::Ready(Ok(Native::Event(event)));
            }
            match self.state {
                // After a rejection or a forwarded-then-closed request: nothing more is read.
                // (Upgrades and HTTP/2 were handed off before their states.)
                State::Stopped | State::AwaitUpgrade | State::Passthrough { .. } => {
                    return Poll::Pending;
                }
                State::Head | State::Length(_) | State::Chunked(..) => {}
            }
            match ready!(self.poll_fill(cx)) {
                Ok(true) => {}
                Ok(false) => return Poll::Ready(Ok(Native::Eof)),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Drops what was delivered once everything up to the queued events is.
    fn compact_out(&mut self) {
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            for (at, _) in &mut self.events {
                *at = 0;
            }
        }
    }
}

impl<IO> Sniffer<IO> {
    /// Native mode ends here: queue the hand-off; what follows goes to `out` for hyper.
    fn hand_off(&mut self) {
        if self.native {
            self.native = false;
            self.events
                .push_back((self.out.len(), NativeEvent::Handoff));
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Sniffer<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `input` in pieces of `step` bytes; returns the data, the trailer bytes and the
    /// index just past the body.
    fn scan_in_steps(input: &[u8], step: usize) -> (Vec<u8>, Vec<u8>, Option<usize>) {
        let mut scan = ChunkScan::default();
        let (mut data, mut trailers) = (Vec::new(), Vec::new());
        let mut at = 0;
        while at < input.len() {
            let piece = &input[at..(at + step).min(input.len())];
            let Ok(end) = scan.scan(piece, |p| {
                match p {
                    ChunkPiece::Data(r) => data.extend_from_slice(&piece[r]),
                    ChunkPiece::Trailer(b) => trailers.push(b),
                }
                Ok::<(), std::convert::Infallible>(())
            });
            if let Some(end) = end {
                return (data, trailers, Some(at + end));
            }
            at += piece.len();
        }
        (data, trailers, None)
    }

    #[test]
    fn the_chunk_scan_ends_the_body_at_the_same_byte_however_it_is_split() {
        let input = b"5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\nGET / HTTP/1.1";
        let body_end = input.len() - b"GET / HTTP/1.1".len();
        for step in [1, 2, 3, 7, input.len()] {
            let (data, trailers, end) = scan_in_steps(input, step);
            assert_eq!(data, b"helloabc", "step {step}");
            assert_eq!(trailers, b"T: 1\r\n\r", "step {step}");
            assert_eq!(end, Some(body_end), "step {step}");
        }
        // Positive control for the end: without the final line the body goes on.
        let (_, _, end) = scan_in_steps(&input[..body_end - 1], 4);
        assert_eq!(end, None);
    }

    fn timeouts(idle: Duration, header: Duration) -> Timeouts {
        Timeouts { idle, header }
    }

    fn sniffer() -> Sniffer<tokio::io::Empty> {
        Sniffer::new(
            tokio::io::empty(),
            ConnShared::new(),
            DesyncMode::Defensive,
            timeouts(Duration::from_secs(60), Duration::from_secs(60)),
            true,
        )
    }

    #[tokio::test]
    async fn pipelined_requests_with_bodies_are_split_where_hyper_splits_them() {
        let mut s = sniffer();
        let input = b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nGET /\r\n0\r\nT: 1\r\n\r\n\
GET /c HTTP/1.1\r\nHost: h\r\n\r\n";
        // Byte by byte, to exercise every resumption point.
        for b in input {
            s.on_bytes(std::slice::from_ref(b));
        }
        // Heads are rebuilt (framing headers written once, at the end); bodies pass unchanged.
        let want = b"POST /a HTTP/1.1\r\nHost: h\r\ncontent-length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\nHost: h\r\ntransfer-encoding: chunked\r\n\r\n5;x=1\r\nGET /\r\n0\r\nT: 1\r\n\r\n\
GET /c HTTP/1.1\r\nHost: h\r\n\r\n";
        assert_eq!(
            String::from_utf8_lossy(&s.out),
            String::from_utf8_lossy(want)
        );
        let mut n = 0;
        while let Some(v) = s.shared.pop_verdict() {
            assert!(matches!(v, HeadVerdict::Pass { .. }), "{v:?}");
            n += 1;
        }
        // The `GET /` inside the chunk is body, not a request.
        assert_eq!(n, 3);
        assert_eq!(s.state, State::Head);
    }

    /// 100 header lines pass and 101 are refused, whether the head comes in one read or a
    /// byte at a time (the lines are counted as they arrive), after empty lines or not, and on
    /// the second request of a connection.
    #[tokio::test]
    async fn the_101st_header_line_is_refused() {
        let head = |n: usize| {
            let mut h = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
            for i in 1..n {
                h.push_str(&format!("X-{i}: v\r\n"));
            }
            h.push_str("\r\n");
            h.into_bytes()
        };
        for (n, passes) in [(MAX_HEADER_COUNT, true), (MAX_HEADER_COUNT + 1, false)] {
            let mut second = head(1);
            second.extend_from_slice(&head(n));
            let mut leading = b"\r\n\r\n".to_vec();
            leading.extend_from_slice(&head(n));
            for (input, verdicts) in [(head(n), 1), (leading, 1), (second, 2)] {
                for step in [input.len(), 1] {
                    let mut s = sniffer();
                    for piece in input.chunks(step) {
                        s.on_bytes(piece);
                    }
                    for _ in 1..verdicts {
                        assert!(matches!(
                            s.shared.pop_verdict(),
                            Some(HeadVerdict::Pass { .. })
                        ));
                    }
                    let v = s.shared.pop_verdict();
                    if passes {
                        assert!(matches!(v, Some(HeadVerdict::Pass { .. })), "{n}: {v:?}");
                    } else {
                        assert!(
                            matches!(
                                v,
                                Some(HeadVerdict::Reject {
                                    reason: "too many headers",
                                    ..
                                })
                            ),
                            "{n}: {v:?}"
                        );
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn after_an_ambiguous_request_in_defensive_mode_nothing_more_is_read() {
        let mut s = sniffer();
        s.on_bytes(
            b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET /next HTTP/1.1\r\nHost: h\r\n\r\n",
        );
        assert!(matches!(
            s.shared.pop_verdict(),
            Some(HeadVerdict::Pass {
                mitigation: Mitigation::ForwardThenClose,
                ..
            })
        ));
        assert!(
            s.shared.pop_verdict().is_none(),
            "the next request is never read"
        );
        assert_eq!(s.state, State::Stopped);
        assert!(s.out.ends_with(b"\r\n\r\nabc"), "{:?}", s.out);
    }

    #[tokio::test]
    async fn severe_head_is_replaced_and_reading_stops() {
        let mut s = sniffer();
        s.on_bytes(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n");
        assert_eq!(s.out, SYNTHETIC_HEAD.to_vec());
        assert!(matches!(
            s.shared.pop_verdict(),
            Some(HeadVerdict::Reject { status, .. }) if status == StatusCode::BAD_REQUEST
        ));
        assert!(
            s.shared.pop_verdict().is_none(),
            "the smuggled request is never seen"
        );
        assert_eq!(s.state, State::Stopped);
    }

    #[tokio::test]
    async fn oversized_header_line_is_rejected_before_the_head_ends() {
        let mut s = sniffer();
        s.on_bytes(b"GET / HTTP/1.1\r\nX: ");
        s.on_bytes(&vec![b'a'; MAX_LINE + 10]);
        assert!(matches!(
            s.shared.pop_verdict(),
            Some(HeadVerdict::Reject {
                reason: "header over 16 KiB",
                ..
            })
        ));
    }

    #[tokio::test]
    async fn header_of_exactly_16_kib_passes() {
        let mut s = sniffer();
        let mut head = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
        head.extend_from_slice(b"X: ");
        head.extend_from_slice(&vec![b'a'; MAX_LINE - 3]);
        head.extend_from_slice(b"\r\n\r\n");
        s.on_bytes(&head);
        assert!(matches!(
            s.shared.pop_verdict(),
            Some(HeadVerdict::Pass { .. })
        ));
    }

    async fn read_some(s: &mut Sniffer<tokio::io::DuplexStream>) -> io::Result<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await?;
        buf.truncate(n);
        Ok(buf)
    }

    #[tokio::test]
    async fn stalled_request_body_times_out_even_with_the_request_in_flight() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(4096);
        let shared = ConnShared::new();
        let mut s = Sniffer::new(
            server,
            shared.clone(),
            DesyncMode::Defensive,
            timeouts(Duration::from_millis(100), Duration::from_secs(60)),
            true,
        );
        client
            .write_all(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .expect("write");
        let got = read_some(&mut s).await.expect("head and body start");
        assert!(got.ends_with(b"abc"));
        shared.request_started();
        let err = read_some(&mut s).await.expect_err("idle timeout");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    /// The idle timer is armed at the connection's start and not moved later by each request;
    /// it still closes an idle keep-alive connection exactly the idle timeout after the last
    /// activity (time is paused: the clock moves only to the next timer).
    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_counts_from_the_last_activity_however_the_timer_was_armed() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(4096);
        let shared = ConnShared::new();
        let start = Instant::now();
        let mut s = Sniffer::new(
            server,
            shared.clone(),
            DesyncMode::Defensive,
            timeouts(Duration::from_secs(10), Duration::from_secs(60)),
            true,
        );
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .expect("write");
        read_some(&mut s).await.expect("head");
        shared.request_started();
        tokio::time::advance(Duration::from_secs(8)).await;
        // The response ends 8 s in: the connection may idle until 18 s, past the 10 s the
        // timer was first armed for.
        shared.request_finished();
        let got = read_some(&mut s).await.expect("closed, not failed");
        assert!(got.is_empty(), "{got:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(18));
    }

    #[tokio::test]
    async fn silent_connection_gets_a_synthetic_408() {
        let (_client, server) = tokio::io::duplex(4096);
        let shared = ConnShared::new();
        let mut s = Sniffer::new(
            server,
            shared.clone(),
            DesyncMode::Defensive,
            timeouts(Duration::from_millis(100), Duration::from_secs(60)),
            true,
        );
        let got = read_some(&mut s).await.expect("synthetic head");
        assert_eq!(got, SYNTHETIC_HEAD);
        assert!(matches!(
            shared.pop_verdict(),
            Some(HeadVerdict::Reject { status, .. }) if status == StatusCode::REQUEST_TIMEOUT
        ));
    }

    #[tokio::test]
    async fn a_dribbled_head_gets_408_at_the_header_timeout_although_bytes_keep_coming() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(4096);
        let shared = ConnShared::new();
        let mut s = Sniffer::new(
            server,
            shared.clone(),
            DesyncMode::Defensive,
            timeouts(Duration::from_secs(60), Duration::from_millis(200)),
            true,
        );
        let writer = tokio::spawn(async move {
            client.write_all(b"GET / HTTP/1.1\r\n").await?;
            for i in 0..1000 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                client.write_all(format!("X-{i}: 1\r\n").as_bytes()).await?;
            }
            Ok::<_, io::Error>(client)
        });
        let got = tokio::time::timeout(Duration::from_secs(20), read_some(&mut s))
            .await
            .expect("the sniffer gave up on the head")
            .expect("synthetic head");
        assert_eq!(got, SYNTHETIC_HEAD);
        assert!(matches!(
            shared.pop_verdict(),
            Some(HeadVerdict::Reject { status, reason, .. })
                if status == StatusCode::REQUEST_TIMEOUT && reason == HEADER_TIMEOUT_REASON
        ));
        writer.abort();
    }

    #[tokio::test]
    async fn a_slow_body_is_not_cut_by_the_header_timeout() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(4096);
        let shared = ConnShared::new();
        let mut s = Sniffer::new(
            server,
            shared.clone(),
            DesyncMode::Defensive,
            timeouts(Duration::from_secs(60), Duration::from_millis(50)),
            true,
        );
        client
            .write_all(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n")
            .await
            .expect("write");
        let mut got = read_some(&mut s).await.expect("head");
        assert!(matches!(
            shared.pop_verdict(),
            Some(HeadVerdict::Pass { .. })
        ));
        shared.request_started();
        let writer = tokio::spawn(async move {
            for b in b"hello" {
                // Each gap is longer than the header timeout.
                tokio::time::sleep(Duration::from_millis(150)).await;
                client.write_all(&[*b]).await?;
            }
            Ok::<_, io::Error>(client)
        });
        while !got.ends_with(b"hello") {
            got.extend(read_some(&mut s).await.expect("body bytes"));
        }
        assert!(shared.pop_verdict().is_none(), "no 408 was queued");
        let _client = writer.await.expect("writer").expect("wrote the body");
    }

    #[tokio::test]
    async fn the_header_timeout_of_a_later_request_starts_with_its_first_byte() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(4096);
        let shared = ConnShared::new();
        let mut s = Sniffer::new(
            server,
            shared.clone(),
            DesyncMode::Defensive,
            timeouts(Duration::from_secs(60), Duration::from_millis(100)),
            true,
        );
        client
            .write_all(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .expect("write");
        read_some(&mut s).await.expect("first head");
        assert!(matches!(
            shared.pop_verdict(),
            Some(HeadVerdict::Pass { .. })
        ));
        // Idle on the keep-alive connection for longer than the header timeout: only the idle
        // timeout applies between requests.
        let idle = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            client
                .write_all(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
                .await
                .map(|()| client)
        });
        let got = read_some(&mut s).await.expect("second head");
        assert!(got.starts_with(b"GET /2"), "{got:?}");
        assert!(matches!(
            shared.pop_verdict(),
            Some(HeadVerdict::Pass { .. })
        ));
        let _client = idle.await.expect("writer").expect("wrote");
    }

    #[tokio::test]
    async fn trace_is_405_before_501_and_505() {
        for head in [
            &b"TRACE / HTTP/3.0\r\nHost: h\r\n\r\n"[..],
            b"TRACE / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n",
        ] {
            let mut s = sniffer();
            s.on_bytes(head);
            assert!(
                matches!(s.shared.pop_verdict(), Some(HeadVerdict::Reject { status, .. }) if status == StatusCode::METHOD_NOT_ALLOWED),
                "{head:?}"
            );
        }
    }

    #[tokio::test]
    async fn http11_without_exactly_one_host_is_rejected() {
        for head in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ] {
            let mut s = sniffer();
            s.on_bytes(head);
            assert!(
                matches!(s.shared.pop_verdict(), Some(HeadVerdict::Reject { status, .. }) if status == StatusCode::BAD_REQUEST),
                "{head:?}"
            );
        }
        // HTTP/1.0 predates Host.
        let mut s = sniffer();
        s.on_bytes(b"GET / HTTP/1.0\r\n\r\n");
        assert!(matches!(
            s.shared.pop_verdict(),
            Some(HeadVerdict::Pass { .. })
        ));
    }

    #[tokio::test]
    async fn native_mode_gives_heads_as_parts_between_body_bytes_until_an_upgrade() {
        let mut s = sniffer();
        s.set_native();
        s.on_bytes(
            b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n",
        );
        let events: Vec<_> = s.events.drain(..).collect();
        assert_eq!(events.len(), 2, "{events:?}");
        match &events[0] {
            (0, NativeEvent::Head(parts)) => {
                assert_eq!(parts.uri, "/a");
                assert_eq!(parts.method, http::Method::POST);
                assert_eq!(parts.headers["content-length"], "5");
                assert_eq!(parts.headers["host"], "h");
            }
            other => panic!("{other:?}"),
        }
        // The body, then hyper's part: the upgrade request's rebuilt head.
        assert!(matches!(events[1], (5, NativeEvent::Handoff)), "{events:?}");
        assert_eq!(
            String::from_utf8_lossy(&s.out),
            "helloGET /b HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n"
        );
        assert!(!s.native);
        // Both requests have their verdicts queued, in order.
        assert!(matches!(
            s.shared.pop_verdict(),
            Some(HeadVerdict::Pass { upgrade: false, .. })
        ));
        assert!(matches!(
            s.shared.pop_verdict(),
            Some(HeadVerdict::Pass { upgrade: true, .. })
        ));
    }

    #[tokio::test]
    async fn h2_preface_switches_to_passthrough() {
        let mut s = sniffer();
        s.on_bytes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0");
        assert_eq!(s.state, State::Passthrough { idle: true });
        assert!(s.out.ends_with(b"SM\r\n\r\n\0\0"));
        assert!(s.shared.pop_verdict().is_none());
    }
}
