//! One request's [`Record`], filled as the pipeline goes and emitted exactly once: when the
//! response body ends or is dropped, when the load balancer answers itself, when the client
//! goes away before any response (460), or when a WebSocket tunnel closes. Emitting feeds
//! every L7 request counter (listener, target group, target,
//! [`L7Counters`](super::L7Counters)) and the access log from the same record, so they always
//! agree.
use std::borrow::Cow;
use std::cell::Cell;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};

use super::pipeline::ConnCtx;
use super::sniff::HeadVerdict;
use crate::accesslog::fast::push_u64;
use crate::accesslog::{
    ActionKind, LbError, Record, RequestLine, RequestType, TargetConnection, TlsInfo,
};
use crate::proxy::client::Forwarded;
use crate::proxy::error::ProxyError;
use crate::targets::{Picked, PickedCells, TargetGroup};

/// What a connection tells each of its requests' records.
pub(super) struct ConnInfo {
    /// `conn_trace_id`.
    pub id: u64,
    /// TLS details (HTTPS).
    pub tls: Option<Arc<TlsInfo>>,
}

/// Size of a head as HTTP/1.1 writes it: start line, `name: value` lines, empty line. For
/// HTTP/2 heads (HPACK-compressed on the wire) the same count stands for their size.
pub(super) fn head_bytes(start_line: usize, headers: &HeaderMap) -> u64 {
    let fields: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + 2 + v.len() + 2)
        .sum();
    (start_line + 2 + fields + 2) as u64
}

/// `HTTP/1.1`, as in a request line.
fn version_text(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "-",
    }
}

/// The method as in a request line: the standard ones without a copy.
fn method_text(m: &Method) -> Cow<'static, str> {
    Cow::Borrowed(match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        _ => return Cow::Owned(m.as_str().to_owned()),
    })
}

/// `{scheme}://{host}:{port}{path_and_query}` in one allocation, without `core::fmt`.
fn url(scheme: &str, host: &str, port: u16, path_and_query: &str) -> String {
    let mut u = String::with_capacity(scheme.len() + host.len() + path_and_query.len() + 9);
    u.push_str(scheme);
    u.push_str("://");
    u.push_str(host);
    u.push(':');
    push_u64(&mut u, u64::from(port));
    u.push_str(path_and_query);
    u
}

/// A response head's size (see [`head_bytes`]): `HTTP/1.1 200 OK` and the headers.
pub(super) fn response_head_bytes(status: StatusCode, headers: &HeaderMap) -> u64 {
    let reason = status.canonical_reason().map_or(0, |r| r.len() + 1);
    head_bytes("HTTP/1.1 200".len() + reason, headers)
}

/// The record of one request and what emitting it needs.
pub(super) struct Exchange {
    record: Option<Box<Record>>,
    /// The connection's context, for its listener's cells, the tier's counters and the log
    /// at emit time (the exchange outlives the handler: it rides in the response body). A
    /// clone of the connection's handle, whose count stays in the cache of the connection's
    /// one worker; a clone of the listener's, shared by every connection, wrote a line that
    /// both workers' requests wrote.
    ctx: Arc<ConnCtx>,
    /// When the request arrived (monotonic), for the log's `request_processing_time`: read
    /// only when an access log is open, the one reader of the request and response
    /// processing times (the target's goes to the metrics too, and is always measured).
    started: Option<Instant>,
    head_len: u64,
    body_in: Option<Arc<AtomicU64>>,
    /// The picked target's and its group's metrics, through the pick's target entry.
    cells: Option<PickedCells>,
    sent_at: Option<Instant>,
    head_at: Option<Instant>,
}

impl Exchange {
    /// A record for `req`, which just arrived on the connection of `ctx`. For HTTP/1 the
    /// sniffer's verdict gives the head's real size and, for a head the load balancer
    /// refused, the request line the client wrote (hyper only saw a stand-in).
    pub fn start<B>(ctx: Arc<ConnCtx>, req: &Request<B>, verdict: Option<&HeadVerdict>) -> Self {
        let listener = &ctx.listener;
        let conn = &ctx.info;
        let peer = ctx.peer;
        let https = conn.tls.is_some();
        let kind = match (req.version(), https) {
            (Version::HTTP_2, _) => RequestType::H2,
            (_, true) => RequestType::Https,
            (_, false) => RequestType::Http,
        };
        let mut record = Box::write(
            spare_record(),
            Record::new(kind, peer, conn.id, conn.tls.clone()),
        );
        let logging = listener.shared.access_log.is_some();
        if logging {
            record.text_mut().listener = Some(listener.name.clone());
        }
        let scheme = listener.cfg.protocol.as_str();
        let port = listener.port;
        let head_len = match verdict {
            Some(HeadVerdict::Pass { head_len, .. } | HeadVerdict::Reject { head_len, .. }) => {
                *head_len as u64
            }
            None => {
                let line = req.method().as_str().len()
                    + 1
                    + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
                    + 1
                    + 8;
                head_bytes(line, req.headers())
            }
        };
        match verdict {
            Some(HeadVerdict::Reject { line, .. }) => {
                if logging && let Some(line) = line {
                    let host = line.host.as_deref().map(strip_port).unwrap_or("-");
                    let url = if line.target.contains("://") {
                        line.target.clone()
                    } else {
                        url(scheme, host, port, &line.target)
                    };
                    record.text_mut().request = Some(RequestLine {
                        method: line.method.clone().into(),
                        url,
                        version: line.version.clone().into(),
                    });
                }
            }
            _ => {
                if logging {
                    let host = req
                        .headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .or_else(|| req.uri().authority().map(|a| a.as_str()))
                        .map_or("-", strip_port);
                    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
                    let text = record.text_mut();
                    text.request = Some(RequestLine {
                        method: method_text(req.method()),
                        url: url(scheme, host, port, pq),
                        version: version_text(req.version()).into(),
                    });
                    text.user_agent = req
                        .headers()
                        .get(http::header::USER_AGENT)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                }
            }
        }
        if let Some(
            HeadVerdict::Pass { classification, .. } | HeadVerdict::Reject { classification, .. },
        ) = verdict
        {
            record.classification = *classification;
        }
        Self {
            record: Some(record),
            ctx,
            started: logging.then(Instant::now),
            head_len,
            body_in: None,
            cells: None,
            sent_at: None,
            head_at: None,
        }
    }

    /// A record for a request the lean HTTP/1.1 loop (`lean.rs`) serves: a compliant
    /// HTTP/1.1 head of `head_len` bytes on a plain listener, its request line and
    /// `User-Agent` as written (read only when an access log is open).
    /// `line` (method, target, `Host`) is `None` for a head the loop refused before it was
    /// complete (a timeout): the log shows no request line then, as on the native path.
    pub fn start_lean(
        ctx: Arc<ConnCtx>,
        head_len: usize,
        line: Option<(&[u8], &[u8], &[u8])>,
        user_agent: Option<&[u8]>,
    ) -> Self {
        let listener = &ctx.listener;
        let mut record = Box::write(
            spare_record(),
            Record::new(RequestType::Http, ctx.peer, ctx.info.id, None),
        );
        let logging = listener.shared.access_log.is_some();
        if logging {
            let text = record.text_mut();
            text.listener = Some(listener.name.clone());
            if let Some((method, target, host)) = line {
                let host = strip_port(std::str::from_utf8(host).unwrap_or("-"));
                let pq = std::str::from_utf8(target).unwrap_or("/");
                text.request = Some(RequestLine {
                    method: String::from_utf8_lossy(method).into_owned().into(),
                    url: url(listener.cfg.protocol.as_str(), host, listener.port, pq),
                    version: "HTTP/1.1".into(),
                });
            }
            text.user_agent = user_agent.map(|v| String::from_utf8_lossy(v).into_owned());
        }
        Self {
            record: Some(record),
            ctx,
            started: logging.then(Instant::now),
            head_len: head_len as u64,
            body_in: None,
            cells: None,
            sent_at: None,
            head_at: None,
        }
    }

    /// The trace id as sent to the target, as bytes (the lean loop's [`Exchange::trace_id`]).
    pub fn trace_id_bytes(&mut self, v: &[u8]) {
        if self.logging()
            && let Some(r) = self.rec()
        {
            r.text_mut().trace_id = Some(String::from_utf8_lossy(v).into_owned());
        }
    }

    /// The target's response head arrived, with `status`, on a `connection`; `connect` is
    /// how long connecting took (part of getting the request there). The lean loop calls it
    /// directly, [`Exchange::forwarded`] with what the forwarder reports.
    pub fn forwarded_lean(&mut self, status: u16, connection: TargetConnection, connect: Duration) {
        let now = Instant::now();
        let sent = (self.sent_at.unwrap_or(now) + connect).min(now);
        self.sent_at = Some(sent);
        self.head_at = Some(now);
        let started = self.started;
        if let Some(r) = self.rec() {
            if let Some(started) = started {
                r.text_mut().request_processing = Some(sent.saturating_duration_since(started));
            }
            r.target_processing = Some(now.saturating_duration_since(sent));
            r.target_status = Some(status);
            r.target_connection = Some(connection);
        }
    }

    /// The response head, `head_len` bytes with status `status`, goes to the client now. The
    /// lean loop calls it with the bytes it wrote, [`Exchange::responding`] with the size
    /// of a head it has as fields.
    pub fn responding_lean(&mut self, status: u16, head_len: usize) {
        // Only the log reads the response processing time: without one, no clock read.
        let head_at = self.head_at.filter(|_| self.logging());
        if let Some(r) = self.rec() {
            r.elb_status = Some(status);
            r.sent_bytes = head_len as u64;
            if let Some(h) = head_at {
                r.text_mut().response_processing = Some(h.elapsed());
            }
        }
    }

    fn rec(&mut self) -> Option<&mut Record> {
        self.record.as_deref_mut()
    }

    /// When the request arrived (the record's `request_creation_time`, read from the clock
    /// once): the wall-clock instant the rest of the request's handling reuses where "now"
    /// means "this request" (stickiness cookie expiry, the trace id's epoch seconds) rather
    /// than reading the clock again. After the record is emitted, the clock.
    pub fn received_at(&self) -> SystemTime {
        self.record
            .as_deref()
            .map_or_else(SystemTime::now, |r| r.request_creation_time)
    }

    /// Whether the access log is on (text fields are only gathered then).
    pub fn logging(&self) -> bool {
        self.ctx.listener.shared.access_log.is_some()
    }

    /// The rule that matched, how many were evaluated, and its action.
    pub fn rule(&mut self, priority: u32, evaluated: u32, action: ActionKind) {
        if let Some(r) = self.rec() {
            r.matched_rule_priority = Some(priority);
            r.rules_evaluated = evaluated;
            r.action = Some(action);
        }
    }

    /// The `Location` of a redirect.
    pub fn redirect(&mut self, url: &str) {
        if self.logging()
            && let Some(r) = self.rec()
        {
            r.text_mut().redirect_url = Some(url.to_owned());
        }
    }

    /// The load balancer answers `status` itself; `why` says what went wrong, if anything.
    pub fn answer(&mut self, status: StatusCode, why: Option<(LbError, String)>) {
        if let Some(r) = self.rec() {
            r.elb_status = Some(status.as_u16());
            if let Some((e, detail)) = why {
                r.lb_error.get_or_insert(e);
                r.lb_error_detail.get_or_insert(detail);
            }
        }
    }

    /// The request failed with `e` (the load balancer answers `e.status()`).
    pub fn failed(&mut self, e: &ProxyError) {
        let dispatched = matches!(
            e,
            ProxyError::TargetFailed { .. }
                | ProxyError::TargetTimeout { .. }
                | ProxyError::DrainExpired { .. }
                | ProxyError::ClientClosed
        );
        if dispatched
            && self.cells.is_some()
            && let Some(sent) = self.sent_at
            && let Some(started) = self.started
            && let Some(r) = self.rec()
        {
            r.text_mut().request_processing = Some(sent.saturating_duration_since(started));
        }
        self.answer(e.status(), Some((e.lb_error(), e.to_string())));
    }

    /// A target of `group` was picked.
    pub fn picked(&mut self, group: &Arc<TargetGroup>, picked: &Picked) {
        self.cells = Some(picked.cells());
        if let Some(r) = self.rec() {
            if let Some(text) = r.text.as_deref_mut() {
                text.target_group = Some(group.shared_name());
            }
            r.target = Some(picked.addr);
            r.non_sticky = picked.non_sticky();
            r.unhealthy_routing = picked.unhealthy_routing();
        }
    }

    /// The trace id as sent to the target.
    pub fn trace_id(&mut self, v: &http::HeaderValue) {
        if self.logging()
            && let Some(r) = self.rec()
        {
            r.text_mut().trace_id = Some(String::from_utf8_lossy(v.as_bytes()).into_owned());
        }
    }

    /// The request body's bytes, counted as they stream to the target ([`Counted::new`]'s
    /// counter; none for a body without content), go into the record.
    pub fn count_body(&mut self, n: Option<Arc<AtomicU64>>) {
        self.body_in = n;
    }

    /// The request is about to be sent (the forwarder connects or takes a pooled connection
    /// now).
    pub fn dispatching(&mut self) {
        self.sent_at = Some(Instant::now());
    }

    /// The target's response head arrived.
    pub fn forwarded(&mut self, f: &Forwarded) {
        let connection = if f.retried {
            TargetConnection::RetriedOnNew
        } else if f.reused_connection {
            TargetConnection::Reused
        } else {
            TargetConnection::New
        };
        self.forwarded_lean(
            f.response.status().as_u16(),
            connection,
            f.connect_time.unwrap_or(Duration::ZERO),
        );
    }

    /// The response (head) is handed to the client now.
    pub fn responding(&mut self, status: StatusCode, headers: &HeaderMap) {
        let head = response_head_bytes(status, headers);
        self.responding_lean(status.as_u16(), usize::try_from(head).unwrap_or(usize::MAX));
    }

    /// Whether the target answered (the response is the target's, not the load balancer's).
    pub fn answered_by_target(&self) -> bool {
        self.record
            .as_deref()
            .is_some_and(|r| r.target_status.is_some())
    }

    /// `n` more response body bytes went to the client.
    pub fn sent_body(&mut self, n: u64) {
        if let Some(r) = self.rec() {
            r.sent_bytes += n;
        }
    }

    /// The response body broke off (the target closed, or its deregistration delay ended).
    pub fn body_failed(&mut self, detail: String) {
        if let Some(r) = self.rec() {
            r.lb_error.get_or_insert(LbError::ResponseBodyFailed);
            r.lb_error_detail.get_or_insert(detail);
        }
    }

    /// Moves the record into a new exchange (the WebSocket tunnel's); this one then emits
    /// nothing.
    pub fn split_off(&mut self) -> Exchange {
        Exchange {
            record: self.record.take(),
            ctx: self.ctx.clone(),
            started: self.started,
            head_len: self.head_len,
            body_in: self.body_in.clone(),
            cells: self.cells.take(),
            sent_at: self.sent_at,
            head_at: self.head_at,
        }
    }

    /// The tunnel closed after carrying these bytes each way.
    pub fn tunnel_closed(&mut self, from_client: u64, to_client: u64) {
        if let Some(r) = self.rec() {
            r.kind = if r.tls.is_some() {
                RequestType::Wss
            } else {
                RequestType::Ws
            };
            r.received_bytes += from_client;
            r.sent_bytes += to_client;
        }
    }

    /// Emits now (also what dropping does).
    pub fn finish(mut self) {
        self.emit();
    }

    fn emit(&mut self) {
        let Some(mut r) = self.record.take() else {
            return;
        };
        if self.logging() {
            // The response's end, the log line's `time`: only the log reads it (the counters
            // and metrics below do not), so without a log the clock is not read (about 80
            // instructions a request).
            r.time = SystemTime::now();
        }
        r.received_bytes += self.head_len
            + self
                .body_in
                .as_ref()
                .map_or(0, |n| n.load(Ordering::Relaxed));
        if r.elb_status.is_none() {
            // Dropped before any response existed: the client went away (460).
            r.elb_status = Some(ProxyError::ClientClosed.status().as_u16());
            r.lb_error.get_or_insert(LbError::ClientClosed);
            tracing::info!(
                client = %r.client,
                status = 460,
                "client closed the connection before the response"
            );
        }
        let listener = &self.ctx.listener;
        listener.cells.record(&r);
        if r.target.is_some()
            && let Some(cells) = &self.cells
        {
            cells.group().record(&r);
            cells.target().record(&r);
        }
        listener.shared.counters.record(&r);
        if let Some(log) = &listener.shared.access_log {
            log.log(r);
        } else {
            keep_record(r);
        }
    }
}

thread_local! {
    /// The allocation of the last record this thread emitted without an access log, emptied,
    /// for the next record started here (see [`spare_record`]).
    static SPARE_RECORD: Cell<Option<Box<MaybeUninit<Record>>>> = const { Cell::new(None) };
}

/// Room for a record: the one this thread kept (its memory was written by the previous
/// request, so it is likely still in the L1 data cache), else a new allocation. A fresh
/// block from the allocator is a block freed many requests ago (mimalloc reuses a page's
/// freed blocks only once its free list runs out): each of its cache lines missed the L1 on
/// the first write, one miss per 64 bytes of the record per request.
fn spare_record() -> Box<MaybeUninit<Record>> {
    SPARE_RECORD
        .try_with(Cell::take)
        .ok()
        .flatten()
        .unwrap_or_else(Box::new_uninit)
}

/// Drops the record's fields and keeps its allocation for [`spare_record`] (one per thread:
/// a second one is freed).
fn keep_record(r: Box<Record>) {
    let raw = Box::into_raw(r);
    // SAFETY: `raw` comes from a `Box<Record>` and is valid; its fields are dropped once, here,
    // and the allocation is then owned as a `MaybeUninit<Record>` (same layout) whose
    // contents are never read before `Box::write` fills them again.
    let room = unsafe {
        std::ptr::drop_in_place(raw);
        Box::from_raw(raw.cast::<MaybeUninit<Record>>())
    };
    let _ = SPARE_RECORD.try_with(|spare| spare.set(Some(room)));
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.emit();
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..=h.len()]);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// A request body that counts the bytes it yields.
pub(super) struct Counted<B> {
    inner: B,
    n: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    /// `body`, and the counter of the bytes it yields.
    pub fn new(body: B) -> (Self, Arc<AtomicU64>) {
        let n = Arc::new(AtomicU64::new(0));
        (
            Self {
                inner: body,
                n: n.clone(),
            },
            n,
        )
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(d) = frame.data_ref()
        {
            self.n.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    /// An emitted record's allocation is written again by the next record started on the
    /// thread: no allocation then (with nothing kept, one: the positive control), the same
    /// address, and the old record's fields were dropped (its TLS details released).
    #[test]
    fn a_kept_record_is_the_next_records_room() {
        use crate::rules::tests::allocations::so_far;
        let name = Arc::new(TlsInfo {
            cipher: "c",
            protocol: "p",
            sni: None,
            certificate: None,
        });
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let record = |id| Record::new(RequestType::Https, peer, id, Some(name.clone()));
        let _ = SPARE_RECORD.with(Cell::take);
        let before = so_far();
        let first = Box::write(spare_record(), record(1));
        assert_eq!(so_far() - before, 1, "nothing kept, yet nothing allocated");
        let at = &raw const *first as usize;
        assert_eq!(Arc::strong_count(&name), 2);
        keep_record(first);
        assert_eq!(
            Arc::strong_count(&name),
            1,
            "the kept record's fields were not dropped"
        );
        let before = so_far();
        let second = Box::write(spare_record(), record(2));
        assert_eq!(so_far() - before, 0, "a kept record's room allocated");
        assert_eq!(&raw const *second as usize, at);
        assert_eq!(second.conn_id, 2);
        drop(second);
        assert_eq!(Arc::strong_count(&name), 1);
    }

    #[test]
    fn ports_come_off_hosts() {
        assert_eq!(strip_port("app.test:8080"), "app.test");
        assert_eq!(strip_port("app.test"), "app.test");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn urls_are_what_format_writes() {
        for (scheme, host, port, pq) in [
            ("http", "app.test", 80, "/"),
            ("https", "[::1]", 65535, "/a?b=c"),
            ("http", "-", 0, "*"),
            ("https", "h", 8443, ""),
        ] {
            assert_eq!(
                url(scheme, host, port, pq),
                format!("{scheme}://{host}:{port}{pq}")
            );
        }
    }

    #[test]
    fn methods_are_as_written() {
        for m in [
            "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "CONNECT", "PATCH", "TRACE",
            "PURGE", "get",
        ] {
            assert_eq!(method_text(&Method::from_bytes(m.as_bytes()).unwrap()), m);
        }
    }

    #[test]
    fn head_sizes_count_lines_as_http1_writes_them() {
        let mut h = HeaderMap::new();
        h.insert("host", "x".parse().unwrap());
        // "GET / HTTP/1.1\r\n" + "host: x\r\n" + "\r\n"
        assert_eq!(head_bytes("GET / HTTP/1.1".len(), &h), 16 + 9 + 2);
        // "HTTP/1.1 200 OK\r\n" + "\r\n"
        assert_eq!(
            response_head_bytes(StatusCode::OK, &HeaderMap::new()),
            17 + 2
        );
    }

    /// Without an access log a request's record gets no log text (no `LogText` allocated,
    /// `Record::text` stays `None`); with one, `Exchange::start` fills it (the listener's
    /// name, the request line).
    #[tokio::test]
    async fn the_log_text_is_made_only_for_an_access_log() {
        use crate::proxy::server::{Groups, L7Config, start};
        for logging in [false, true] {
            let access_log = logging.then(|| {
                Arc::new(
                    crate::accesslog::access_log_writer(
                        crate::accesslog::Destination::Writer(Box::new(std::io::sink())),
                        crate::accesslog::Rotation::default(),
                        16,
                        "elb".into(),
                    )
                    .expect("access log"),
                )
            });
            let cfg = L7Config {
                access_log,
                ..L7Config::one_listener(
                    "web",
                    "127.0.0.1:0".parse().unwrap(),
                    L7Config::fixed_200(),
                    Groups::default(),
                )
            };
            let running = start(cfg).await.expect("listener starts");
            let listener = running.handle().listeners[0].clone();
            let req = Request::get("/x").header("host", "web").body(()).unwrap();
            let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
            let ctx = Arc::new(ConnCtx {
                listener: listener.clone(),
                peer,
                forwarded_peer: crate::headers::ForwardedPeer::new(peer.ip()),
                conn: super::super::sniff::ConnShared::new(),
                slot: Arc::new(listener.connections.admit(peer.ip()).expect("a slot")),
                abuse: Arc::default(),
                info: ConnInfo { id: 1, tls: None },
            });
            let ex = Exchange::start(ctx, &req, None);
            let text = ex.record.as_deref().expect("a record").text.as_deref();
            if logging {
                let text = text.expect("with an access log, the log text");
                assert_eq!(text.listener.as_deref(), Some("web"));
                let url = text.request.as_ref().map(|r| r.url.as_str());
                assert_eq!(
                    url,
                    Some(format!("http://web:{}/x", listener.port).as_str())
                );
            } else {
                assert!(
                    text.is_none(),
                    "without an access log, a LogText was allocated"
                );
            }
            drop(ex);
            drop(listener);
            running.shutdown(Duration::ZERO).await.expect("shutdown");
        }
    }
}
