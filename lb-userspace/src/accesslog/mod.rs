//! Access logs in ALB's format, and the health-check log.
//!
//! The L7 tier fills one [`Record`] per request as it passes through the pipeline and emits it
//! once (see `proxy/server/exchange.rs`); every L7 request counter is derived from the same
//! record, so the log and the metrics always agree. A record becomes one line here, field for
//! field ALB's (`ALB-REFERENCE.md`), with AWS's `-` / `-1` semantics, followed by `lb`'s own
//! fields, so ALB log parsers (Athena's table, GoAccess, Logstash patterns) keep working:
//!
//! ```text
//! type time elb client:port target:port request_processing_time target_processing_time
//! response_processing_time elb_status_code target_status_code received_bytes sent_bytes
//! "request" "user_agent" ssl_cipher ssl_protocol target_group_arn "trace_id" "domain_name"
//! "chosen_cert_arn" matched_rule_priority request_creation_time "actions_executed"
//! "redirect_url" "error_reason" "target:port_list" "target_status_code_list"
//! "classification" "classification_reason" conn_trace_id
//! "listener" "lb_error_reason" "lb_error_detail" lb_retry lb_target_connection
//! ```
//!
//! Where `lb` has no AWS resource, the field names what it has: `elb` is
//! `app/<--lb-name>/<id>`, `target_group_arn` the target group's name, `chosen_cert_arn` the
//! certificate file. ALB's `error_reason` codes are about authentication, Lambda and WAF, none
//! of which `lb` has, so it is always `-`; why a request failed on the target side is in
//! `lb_error_reason` (a code) and `lb_error_detail` (the error's text).
//!
//! Writing happens on a background thread ([`writer`]) that drops and counts lines instead of
//! ever blocking a request.
use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::proxy::desync::{Classification, Tier};

pub(crate) mod fast;
pub mod health;
pub mod writer;

pub use writer::{Destination, LogWriter, Rotation, WriterStats};

/// ALB's `type` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// HTTP/1.x on a plain listener.
    Http,
    /// HTTP/1.x over TLS.
    Https,
    /// HTTP/2 (over TLS, or with prior knowledge on a plain listener).
    H2,
    /// WebSocket on a plain listener.
    Ws,
    /// WebSocket over TLS.
    Wss,
}

impl RequestType {
    /// The field's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
            Self::H2 => "h2",
            Self::Ws => "ws",
            Self::Wss => "wss",
        }
    }
}

/// The action a rule ended in (`actions_executed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionKind {
    /// Forwarded to a target group.
    Forward,
    /// Answered with a redirect.
    Redirect,
    /// Answered with a fixed response.
    FixedResponse,
}

impl ActionKind {
    /// ALB's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::Redirect => "redirect",
            Self::FixedResponse => "fixed-response",
        }
    }
}

/// What the TLS handshake of the client connection settled (HTTPS listeners).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    /// Cipher suite in OpenSSL's naming (`ECDHE-RSA-AES128-GCM-SHA256`, `TLS_AES_128_GCM_SHA256`).
    pub cipher: &'static str,
    /// `TLSv1.2` or `TLSv1.3`.
    pub protocol: &'static str,
    /// The SNI name the client sent.
    pub sni: Option<String>,
    /// The certificate presented (its file).
    pub certificate: Option<Arc<str>>,
}

/// The request line as the client sent it: `METHOD scheme://host:port/uri HTTP/x.y`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLine {
    /// The method (the standard ones not copied).
    pub method: Cow<'static, str>,
    /// `scheme://host:port/path?query`.
    pub url: String,
    /// `HTTP/1.1`, `HTTP/2.0`, … (not copied but from a line the load balancer refused).
    pub version: Cow<'static, str>,
}

/// Why a request failed, in `lb`'s own words (the `lb_error_reason` field and the
/// `TargetConnectionErrorCount`/`TargetTLSNegotiationErrorCount` metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbError {
    /// The target refused the connection (502).
    TargetConnectRefused,
    /// No route to the target, or the connection was reset while it was being made (502).
    TargetConnectFailed,
    /// No connection within the connect timeout (504).
    TargetConnectTimeout,
    /// The TLS handshake with the target failed (502).
    TargetTlsNegotiation,
    /// The target reset or closed the connection with the request outstanding, or answered
    /// something that is not HTTP (502).
    TargetResponseFailed,
    /// No response head within the idle timeout (504).
    TargetResponseTimeout,
    /// The target's deregistration delay ended with the request open (502).
    TargetDrainExpired,
    /// The target group had no target in service (503).
    NoTarget,
    /// The client went away before the response (460), or broke off its upload.
    ClientClosed,
    /// The client sent a request the load balancer refused (400, 405, 408, 463, 464, 501,
    /// 505); `lb_error_detail` says what.
    ClientRequest,
    /// The response body broke off after the head was sent (the target closed, or its
    /// deregistration delay ended).
    ResponseBodyFailed,
    /// A fault of the load balancer itself (500).
    Internal,
}

impl LbError {
    /// The `lb_error_reason` code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TargetConnectRefused => "TargetConnectRefused",
            Self::TargetConnectFailed => "TargetConnectFailed",
            Self::TargetConnectTimeout => "TargetConnectTimeout",
            Self::TargetTlsNegotiation => "TargetTLSNegotiationError",
            Self::TargetResponseFailed => "TargetResponseFailed",
            Self::TargetResponseTimeout => "TargetResponseTimeout",
            Self::TargetDrainExpired => "TargetDeregistrationDelayExpired",
            Self::NoTarget => "NoTargetInService",
            Self::ClientClosed => "ClientClosed",
            Self::ClientRequest => "ClientRequestRefused",
            Self::ResponseBodyFailed => "ResponseBodyFailed",
            Self::Internal => "Internal",
        }
    }

    /// Whether it counts as TargetConnectionErrorCount ("connections not successfully
    /// established between the load balancer and the target").
    pub fn is_target_connection_error(self) -> bool {
        matches!(
            self,
            Self::TargetConnectRefused
                | Self::TargetConnectFailed
                | Self::TargetConnectTimeout
                | Self::TargetTlsNegotiation
        )
    }
}

/// Whether the request went to the target on a new or a pooled connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetConnection {
    /// A connection made for this request.
    New,
    /// A pooled keep-alive connection.
    Reused,
    /// A pooled connection failed before the response and the request was sent again on a new
    /// one (`lb_retry` says `StalePooledConnection`).
    RetriedOnNew,
}

impl TargetConnection {
    fn as_str(self) -> &'static str {
        match self {
            Self::New | Self::RetriedOnNew => "new",
            Self::Reused => "reused",
        }
    }
}

/// Everything one L7 exchange leaves behind: one access-log line, and the input of every L7
/// request counter. Filled as the request goes through the pipeline, emitted once.
#[derive(Clone, Debug)]
pub struct Record {
    /// `type`.
    pub kind: RequestType,
    /// When the response was generated (WebSocket: when the connection closed).
    pub time: SystemTime,
    /// When the request arrived (`request_creation_time`).
    pub request_creation_time: SystemTime,
    /// The client's address and port.
    pub client: SocketAddr,
    /// The target the request was sent to (or was being sent to when it failed).
    pub target: Option<SocketAddr>,
    /// From sending the request until the target's response head arrived.
    pub target_processing: Option<Duration>,
    /// Status sent to the client (460: none could be).
    pub elb_status: Option<u16>,
    /// Status the target answered.
    pub target_status: Option<u16>,
    /// Request bytes from the client: head and body (WebSocket: everything the client sent).
    pub received_bytes: u64,
    /// Response bytes to the client: head and body (WebSocket: everything sent to it).
    pub sent_bytes: u64,
    /// TLS details (HTTPS listeners).
    pub tls: Option<Arc<TlsInfo>>,
    /// 0 for the default rule, 1–50000 for a rule; `None` (logged `-1`) when no rule was
    /// evaluated.
    pub matched_rule_priority: Option<u32>,
    /// Rules evaluated for this request (RuleEvaluations).
    pub rules_evaluated: u32,
    /// The action executed.
    pub action: Option<ActionKind>,
    /// Desync classification (HTTP/1; HTTP/2 requests are compliant).
    pub classification: Classification,
    /// The client connection's id (`conn_trace_id`).
    pub conn_id: u64,
    /// Why it failed, in `lb`'s words.
    pub lb_error: Option<LbError>,
    /// The failure's text.
    pub lb_error_detail: Option<String>,
    /// How the target connection was had.
    pub target_connection: Option<TargetConnection>,
    /// The pick happened while the group failed open (UnhealthyRoutingRequestCount).
    pub unhealthy_routing: bool,
    /// The group has stickiness and no valid cookie chose the target (NonStickyRequestCount).
    pub non_sticky: bool,
    /// The fields only the access log reads, gathered only while a log is open: without
    /// one, a request writes and reads back none of their bytes (they were more than half
    /// of the record's 408 bytes, seven cache lines written and read per request).
    pub text: Option<Box<LogText>>,
}

/// The part of a [`Record`] only the access log reads (`-` in the line for each field not
/// set, as for a record without it).
#[derive(Clone, Debug, Default)]
pub struct LogText {
    /// The listener's name.
    pub listener: Option<Arc<str>>,
    /// From the request's arrival until it was sent to the target (`-1` if it never was).
    pub request_processing: Option<Duration>,
    /// From the target's response head until the load balancer started sending the response.
    pub response_processing: Option<Duration>,
    /// The request line; `None` when it could not be read.
    pub request: Option<RequestLine>,
    /// `User-Agent`.
    pub user_agent: Option<String>,
    /// The target group chosen.
    pub target_group: Option<Arc<str>>,
    /// `X-Amzn-Trace-Id` as sent to the target.
    pub trace_id: Option<String>,
    /// The `Location` of a redirect.
    pub redirect_url: Option<String>,
}

impl Record {
    /// A record for a request that has just arrived; the pipeline fills the rest (and
    /// [`LogText`], when a log is open). Inlined: the caller boxes it, and a call's return
    /// slot was copied into the box.
    #[inline]
    pub fn new(
        kind: RequestType,
        client: SocketAddr,
        conn_id: u64,
        tls: Option<Arc<TlsInfo>>,
    ) -> Self {
        let now = SystemTime::now();
        Self {
            kind,
            time: now,
            request_creation_time: now,
            client,
            target: None,
            target_processing: None,
            elb_status: None,
            target_status: None,
            received_bytes: 0,
            sent_bytes: 0,
            tls,
            matched_rule_priority: None,
            rules_evaluated: 0,
            action: None,
            classification: Classification::COMPLIANT,
            conn_id,
            lb_error: None,
            lb_error_detail: None,
            target_connection: None,
            unhealthy_routing: false,
            non_sticky: false,
            text: None,
        }
    }

    /// The log's fields, created empty when first asked for.
    pub fn text_mut(&mut self) -> &mut LogText {
        self.text.get_or_insert_with(Box::default)
    }

    /// Whether the load balancer generated the response itself (ELB status counters), rather
    /// than passing on the target's.
    pub fn generated_by_lb(&self) -> bool {
        self.elb_status.is_some() && self.target_status.is_none()
    }

    /// Appends the access-log line (no newline) to `out`, in ALB's field order, `elb` being
    /// the load balancer's `app/NAME/ID`.
    pub fn write_line(&self, elb: &str, out: &mut String) {
        let dash = |o: &mut String| o.push('-');
        let text = self.text.as_deref();
        out.push_str(self.kind.as_str());
        out.push(' ');
        iso8601(self.time, out);
        out.push(' ');
        token(elb, out);
        out.push(' ');
        fast::push_addr(out, &self.client);
        out.push(' ');
        match &self.target {
            Some(t) => fast::push_addr(out, t),
            None => dash(out),
        }
        for d in [
            text.and_then(|t| t.request_processing),
            self.target_processing,
            text.and_then(|t| t.response_processing),
        ] {
            out.push(' ');
            seconds(d, out);
        }
        for s in [self.elb_status, self.target_status] {
            out.push(' ');
            match s {
                Some(s) => fast::push_u64(out, u64::from(s)),
                None => dash(out),
            }
        }
        out.push(' ');
        fast::push_u64(out, self.received_bytes);
        out.push(' ');
        fast::push_u64(out, self.sent_bytes);
        out.push(' ');
        match text.and_then(|t| t.request.as_ref()) {
            Some(r) => {
                out.push('"');
                escaped(&r.method, out);
                out.push(' ');
                escaped(&r.url, out);
                out.push(' ');
                escaped(&r.version, out);
                out.push('"');
            }
            None => out.push_str("\"- - -\""),
        }
        out.push(' ');
        quoted(text.and_then(|t| t.user_agent.as_deref()), out);
        let tls = self.tls.as_deref();
        out.push(' ');
        token(tls.map_or("-", |t| t.cipher), out);
        out.push(' ');
        token(tls.map_or("-", |t| t.protocol), out);
        out.push(' ');
        token(
            text.and_then(|t| t.target_group.as_deref()).unwrap_or("-"),
            out,
        );
        out.push(' ');
        quoted(text.and_then(|t| t.trace_id.as_deref()), out);
        out.push(' ');
        quoted(tls.and_then(|t| t.sni.as_deref()), out);
        out.push(' ');
        quoted(tls.and_then(|t| t.certificate.as_deref()), out);
        match self.matched_rule_priority {
            Some(p) => {
                out.push(' ');
                fast::push_u64(out, u64::from(p));
                out.push(' ');
            }
            None => out.push_str(" -1 "),
        }
        iso8601(self.request_creation_time, out);
        out.push(' ');
        quoted(self.action.map(ActionKind::as_str), out);
        out.push(' ');
        quoted(text.and_then(|t| t.redirect_url.as_deref()), out);
        // error_reason: ALB's codes (authentication, Lambda, WAF) never apply.
        out.push_str(" \"-\" ");
        out.push('"');
        match &self.target {
            Some(t) => fast::push_addr(out, t),
            None => dash(out),
        }
        out.push_str("\" \"");
        match self.target_status {
            Some(s) => fast::push_u64(out, u64::from(s)),
            None => dash(out),
        }
        out.push('"');
        let (class, reason) = match self.classification.tier {
            Tier::Compliant => (None, None),
            tier => (
                Some(tier.as_str()),
                self.classification.reason.map(|r| r.as_str()),
            ),
        };
        out.push(' ');
        quoted(class, out);
        out.push(' ');
        quoted(reason, out);
        out.push_str(" TID_");
        fast::push_hex16(out, self.conn_id);
        // lb's own fields, after ALB's.
        out.push(' ');
        quoted(text.and_then(|t| t.listener.as_deref()), out);
        out.push(' ');
        quoted(self.lb_error.map(LbError::as_str), out);
        out.push(' ');
        quoted(self.lb_error_detail.as_deref(), out);
        out.push(' ');
        token(
            match self.target_connection {
                Some(TargetConnection::RetriedOnNew) => "StalePooledConnection",
                _ => "-",
            },
            out,
        );
        out.push(' ');
        token(
            self.target_connection.map_or("-", TargetConnection::as_str),
            out,
        );
    }
}

/// The access log's writer: records (boxed, as the exchange builds them) formatted as ALB
/// lines with `elb` as the load balancer's id (see [`elb_id`]) on the thread that logs them;
/// at most `capacity` lines held between two writes.
#[expect(
    clippy::borrowed_box,
    reason = "the exchange logs boxed records; the formatter sees them so"
)]
pub fn access_log_writer(
    destination: Destination,
    rotation: Rotation,
    capacity: usize,
    elb: String,
) -> std::io::Result<LogWriter<Box<Record>>> {
    LogWriter::with_capacity(
        "access-log",
        destination,
        rotation,
        capacity,
        move |r: &Box<Record>, out: &mut String| r.write_line(&elb, out),
    )
}

/// `2018-07-02T22:23:00.186641Z`: ISO 8601, UTC, microseconds.
pub fn iso8601(t: SystemTime, out: &mut String) {
    fast::push_iso8601(out, t);
}

/// Seconds with millisecond precision, or `-1`.
fn seconds(d: Option<Duration>, out: &mut String) {
    match d {
        Some(d) => fast::push_seconds(out, d),
        None => out.push_str("-1"),
    }
}

/// A bare field: never empty, never with a space, quote or control byte in it (those, and
/// non-ASCII bytes, as `\xHH`).
fn token(s: &str, out: &mut String) {
    if s.is_empty() {
        out.push('-');
        return;
    }
    escape_runs(
        s,
        out,
        b'!',
        |b| b.is_ascii_graphic() && b != b'"' && b != b'\\',
        |b, out| {
            push_hex_escape(b, out);
        },
    );
}

/// A quoted field, `"-"` when absent.
fn quoted(s: Option<&str>, out: &mut String) {
    out.push('"');
    match s {
        Some(s) if !s.is_empty() => escaped(s, out),
        _ => out.push('-'),
    }
    out.push('"');
}

/// Text inside a quoted field: `"` and `\` escaped with a backslash, control and non-ASCII
/// bytes as `\xHH`, so a line never breaks and a quote never ends a field early.
fn escaped(s: &str, out: &mut String) {
    escape_runs(
        s,
        out,
        b' ',
        |b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\',
        |b, out| match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            _ => push_hex_escape(b, out),
        },
    );
}

/// Whether every byte is in `lo..=b'~'` and none is `"` or `\` (`lo` at most 128): the
/// plain bytes of [`escaped`] (`lo` = space) and [`token`] (`lo` = `!`), eight at a time
/// (a field is tested whole before it is copied: 4 to 5 instructions a byte one at a time).
fn all_plain(bytes: &[u8], lo: u8) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // Each term has a byte's high bit set for some byte iff that byte (or a lower one) is
    // what it tests for: only whether any is, is exact.
    let zero = |v: u64| v.wrapping_sub(ONES) & !v;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        let below = w.wrapping_sub(ONES * u64::from(lo)) & !w;
        let above = w.wrapping_add(ONES) | w; // 0x7f and up
        let quote = zero(w ^ (ONES * u64::from(b'"')));
        let backslash = zero(w ^ (ONES * u64::from(b'\\')));
        if (below | above | quote | backslash) & HIGH != 0 {
            return false;
        }
    }
    chunks
        .remainder()
        .iter()
        .all(|&b| (lo..=b'~').contains(&b) && b != b'"' && b != b'\\')
}

/// Copies `s` to `out` a run of `plain` bytes at a time, writing every other byte as
/// `escape` says. Byte by byte, a non-ASCII character's escape is its UTF-8 bytes', each
/// `\xHH`. `plain` is [`all_plain`]'s test with `lo`.
fn escape_runs(
    s: &str,
    out: &mut String,
    lo: u8,
    plain: impl Fn(u8) -> bool,
    escape: impl Fn(u8, &mut String),
) {
    let bytes = s.as_bytes();
    // Most fields have nothing to escape: one scan and one copy.
    if all_plain(bytes, lo) {
        out.push_str(s);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !plain(b) {
            // `start..i` holds only ASCII bytes, so it is whole characters (an empty run may
            // start inside a character: it is not sliced).
            if start < i {
                out.push_str(&s[start..i]);
            }
            escape(b, out);
            start = i + 1;
        }
    }
    if start < bytes.len() {
        out.push_str(&s[start..]);
    }
}

fn push_hex_escape(b: u8, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push_str("\\x");
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0xf)]));
}

/// The `elb` field: `app/NAME/ID`, ID 16 hex digits derived from the name and the host name
/// (stable across restarts of the same balancer, different between hosts).
pub fn elb_id(name: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    // FNV-1a: stable across Rust versions, unlike DefaultHasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes().chain([0]).chain(host.trim().bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut out = String::from("app/");
    token(name, &mut out);
    let _ = write!(out, "/{h:016x}");
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn all_plain_is_the_byte_test_for_every_byte_at_every_place() {
        for lo in [b' ', b'!'] {
            let reference = |b: u8| (lo..=b'~').contains(&b) && b != b'"' && b != b'\\';
            for len in [0, 1, 7, 8, 9, 16, 17] {
                for at in 0..len {
                    for v in 0..=255u8 {
                        let mut bytes = vec![b'a'; len];
                        bytes[at] = v;
                        assert_eq!(
                            super::all_plain(&bytes, lo),
                            reference(v),
                            "byte {v:#04x} at {at} of {len}, lo {lo:#04x}"
                        );
                    }
                }
            }
            assert!(super::all_plain(b"", lo));
        }
    }

    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::proxy::desync::Reason;

    fn at(secs: u64, micros: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, micros * 1000)
    }

    #[test]
    fn times_are_iso8601_utc_with_microseconds() {
        let mut s = String::new();
        iso8601(at(1_530_570_180, 186_641), &mut s);
        assert_eq!(s, "2018-07-02T22:23:00.186641Z");
        let mut s = String::new();
        iso8601(at(951_782_400, 0), &mut s);
        assert_eq!(s, "2000-02-29T00:00:00.000000Z", "a leap day");
        let mut s = String::new();
        iso8601(UNIX_EPOCH, &mut s);
        assert_eq!(s, "1970-01-01T00:00:00.000000Z");
    }

    /// Splits a line into fields: spaces separate, double quotes group (with `\"` inside).
    fn fields(line: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = String::new();
        let mut quoted = false;
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' if quoted => {
                    cur.push(c);
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                '"' => quoted = !quoted,
                ' ' if !quoted => out.push(std::mem::take(&mut cur)),
                _ => cur.push(c),
            }
        }
        out.push(cur);
        out
    }

    fn record() -> Record {
        let mut r = Record::new(
            RequestType::Http,
            "192.0.2.7:2817".parse().unwrap(),
            0xabc,
            None,
        );
        r.text_mut().listener = Some("web".into());
        r.time = at(1_530_570_180, 186_641);
        r.request_creation_time = at(1_530_570_180, 100_000);
        r
    }

    /// `r` answered by lb itself: 400 for a bad Content-Length, never sent to a target.
    fn refused_as_bad_length(r: &mut Record) {
        r.elb_status = Some(400);
        r.classification = Classification {
            tier: Tier::Severe,
            reason: Some(Reason::BadContentLength),
        };
        r.lb_error = Some(LbError::ClientRequest);
        r.lb_error_detail = Some("bad \"length\"".into());
    }

    #[test]
    fn a_request_answered_by_the_balancer_has_dashes_and_minus_ones() {
        let mut r = record();
        refused_as_bad_length(&mut r);
        let mut line = String::new();
        r.write_line("app/lb/0123456789abcdef", &mut line);
        let f = fields(&line);
        assert_eq!(f.len(), 35, "{line}");
        assert_eq!(f[0], "http");
        assert_eq!(f[1], "2018-07-02T22:23:00.186641Z");
        assert_eq!(f[2], "app/lb/0123456789abcdef");
        assert_eq!(f[3], "192.0.2.7:2817");
        assert_eq!(f[4], "-");
        assert_eq!(&f[5..8], ["-1", "-1", "-1"]);
        assert_eq!(f[8], "400");
        assert_eq!(f[9], "-");
        assert_eq!(f[12], "- - -");
        assert_eq!(f[13], "-");
        assert_eq!(&f[14..17], ["-", "-", "-"]);
        assert_eq!(f[20], "-1", "no rule evaluated");
        assert_eq!(f[21], "2018-07-02T22:23:00.100000Z");
        assert_eq!(&f[22..27], ["-", "-", "-", "-", "-"]);
        assert_eq!(f[27], "Severe");
        assert_eq!(f[28], "BadContentLength");
        assert_eq!(f[29], "TID_0000000000000abc");
        assert_eq!(f[30], "web");
        assert_eq!(f[31], "ClientRequestRefused");
        assert_eq!(f[32], "bad \\\"length\\\"");
        assert_eq!(&f[33..35], ["-", "-"]);
    }

    #[test]
    fn hostile_text_cannot_break_the_line_or_a_field() {
        let mut r = record();
        r.text_mut().request = Some(RequestLine {
            method: "GET".into(),
            url: "http://x:80/a\"b\nc d".into(),
            version: "HTTP/1.1".into(),
        });
        r.text_mut().user_agent = Some("evil\" 1 2 \r\n\u{7f}é".into());
        let mut line = String::new();
        r.write_line("app/lb/0", &mut line);
        assert!(!line.contains('\n') && !line.contains('\r'), "{line}");
        let f = fields(&line);
        assert_eq!(f.len(), 35, "{line}");
        assert_eq!(f[12], "GET http://x:80/a\\\"b\\x0Ac d HTTP/1.1");
        assert_eq!(f[13], "evil\\\" 1 2 \\x0D\\x0A\\x7F\\xC3\\xA9");
    }

    #[test]
    fn durations_have_millisecond_precision() {
        let mut s = String::new();
        seconds(Some(Duration::from_micros(86_499)), &mut s);
        assert_eq!(s, "0.086");
        let mut s = String::new();
        seconds(None, &mut s);
        assert_eq!(s, "-1");
    }

    /// A line written by hand from ALB-REFERENCE's field list (not from the code's output):
    /// every field set, TLS, a retried request, a response time on a half-millisecond tie.
    #[test]
    fn a_full_line_is_albs_fields_in_order() {
        let mut r = record();
        r.kind = RequestType::Https;
        r.client = "192.168.131.39:2817".parse().unwrap();
        r.request_creation_time = at(1_530_570_168, 364_000);
        r.target = Some("10.0.0.1:80".parse().unwrap());
        r.text_mut().request_processing = Some(Duration::from_micros(86));
        r.target_processing = Some(Duration::from_millis(1048));
        r.text_mut().response_processing = Some(Duration::from_micros(37_500));
        r.elb_status = Some(200);
        r.target_status = Some(200);
        r.received_bytes = 34;
        r.sent_bytes = 366;
        r.text_mut().request = Some(RequestLine {
            method: "GET".into(),
            url: "https://www.example.com:443/".into(),
            version: "HTTP/2.0".into(),
        });
        r.text_mut().user_agent = Some("curl/7.46.0".into());
        r.tls = Some(Arc::new(TlsInfo {
            cipher: "ECDHE-RSA-AES128-GCM-SHA256",
            protocol: "TLSv1.2",
            sni: Some("www.example.com".into()),
            certificate: Some("/etc/lb/cert.pem".into()),
        }));
        r.text_mut().target_group = Some("tg-web".into());
        r.text_mut().trace_id = Some("Root=1-58337327-72bd00b0343d75b906739c42".into());
        r.matched_rule_priority = Some(1);
        r.action = Some(ActionKind::Forward);
        r.conn_id = 0x1f;
        r.text_mut().listener = Some("tls".into());
        r.target_connection = Some(TargetConnection::RetriedOnNew);
        let mut line = String::new();
        r.write_line("app/my-loadbalancer/50dc6c495c0c9188", &mut line);
        assert_eq!(
            line,
            "https 2018-07-02T22:23:00.186641Z app/my-loadbalancer/50dc6c495c0c9188 \
             192.168.131.39:2817 10.0.0.1:80 0.000 1.048 0.037 200 200 34 366 \
             \"GET https://www.example.com:443/ HTTP/2.0\" \"curl/7.46.0\" \
             ECDHE-RSA-AES128-GCM-SHA256 TLSv1.2 tg-web \
             \"Root=1-58337327-72bd00b0343d75b906739c42\" \"www.example.com\" \
             \"/etc/lb/cert.pem\" 1 2018-07-02T22:22:48.364000Z \"forward\" \"-\" \"-\" \
             \"10.0.0.1:80\" \"200\" \"-\" \"-\" TID_000000000000001f \"tls\" \"-\" \"-\" \
             StalePooledConnection new"
        );
    }

    /// The same by hand for a refused request from an IPv6 client: nothing but dashes and
    /// `-1`s where no target, time or rule was had.
    #[test]
    fn a_refused_request_from_ipv6_is_albs_fields_in_order() {
        let mut r = record();
        r.time = UNIX_EPOCH;
        r.request_creation_time = UNIX_EPOCH;
        r.client = "[2001:db8::7]:51000".parse().unwrap();
        refused_as_bad_length(&mut r);
        r.conn_id = u64::MAX;
        let mut line = String::new();
        r.write_line("app/lb/0123456789abcdef", &mut line);
        assert_eq!(
            line,
            "http 1970-01-01T00:00:00.000000Z app/lb/0123456789abcdef [2001:db8::7]:51000 - \
             -1 -1 -1 400 - 0 0 \"- - -\" \"-\" - - - \"-\" \"-\" \"-\" -1 \
             1970-01-01T00:00:00.000000Z \"-\" \"-\" \"-\" \"-\" \"-\" \"Severe\" \
             \"BadContentLength\" TID_ffffffffffffffff \"web\" \"ClientRequestRefused\" \
             \"bad \\\"length\\\"\" - -"
        );
    }

    /// The escaping as it was written before it went byte-wise (char by char, `write!` for
    /// `\xHH`): the oracle of the property test below.
    fn token_by_chars(s: &str, out: &mut String) {
        if s.is_empty() {
            out.push('-');
            return;
        }
        for c in s.chars() {
            if c.is_ascii_graphic() && c != '"' && c != '\\' {
                out.push(c);
            } else {
                escape_by_chars(c, out);
            }
        }
    }

    fn escaped_by_chars(s: &str, out: &mut String) {
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                ' '..='~' => out.push(c),
                _ => escape_by_chars(c, out),
            }
        }
    }

    fn escape_by_chars(c: char, out: &mut String) {
        let mut buf = [0u8; 4];
        for b in c.encode_utf8(&mut buf).bytes() {
            let _ = write!(out, "\\x{b:02X}");
        }
    }

    #[test]
    fn escaping_byte_wise_is_escaping_char_by_char() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xe5c);
        // ASCII (controls, space, quote, backslash, DEL among them) and 2-, 3-, 4-byte chars.
        let alphabet: Vec<char> = (0u8..=0x7f)
            .map(char::from)
            .chain("é€𝄞\u{fffd}\u{85}\u{2028}".chars())
            .collect();
        let mut escaped_some = false;
        for _ in 0..20_000 {
            let len = rng.random_range(0..24);
            let s: String = (0..len)
                .map(|_| {
                    if rng.random_bool(0.7) {
                        char::from(rng.random_range(b'a'..=b'z'))
                    } else {
                        alphabet[rng.random_range(0..alphabet.len())]
                    }
                })
                .collect();
            let (mut a, mut b) = (String::new(), String::new());
            token(&s, &mut a);
            token_by_chars(&s, &mut b);
            assert_eq!(a, b, "token {s:?}");
            let (mut a, mut b) = (String::new(), String::new());
            escaped(&s, &mut a);
            escaped_by_chars(&s, &mut b);
            assert_eq!(a, b, "escaped {s:?}");
            escaped_some |= a.contains("\\x") && a.contains("\\\"");
        }
        assert!(escaped_some, "the strings had bytes to escape");
    }

    #[test]
    fn elb_id_is_stable_and_a_single_token() {
        let a = elb_id("my lb");
        assert_eq!(a, elb_id("my lb"));
        assert!(a.starts_with("app/my\\x20lb/"), "{a}");
        assert_eq!(a.rsplit('/').next().unwrap().len(), 16);
    }
}
