//! The request work of the `-h1` arms (`uring-h1`, `epoll-h1`): what `lb`'s native HTTP/1.1
//! path does per request, as plain functions over byte buffers (no hyper, no tokio), so that
//! an I/O model can be measured with a real request path instead of a busy loop.
//!
//! Per request ([`request`]): the head is parsed with `httparse` (100 header slots, `lb`'s
//! limit); `lb`'s desync checks in their simplest form (two `Content-Length` lines, or
//! `Transfer-Encoding` with `Content-Length`: 400 and close); `Host`, `Connection` and
//! `Content-Length` are found; a rule list of three host / path-prefix conditions is evaluated
//! ([`Router`]) and a target picked by round robin from a group of one; the forwarded head is
//! written: method, path, `HTTP/1.1`, every header but the hop-by-hop ones and those
//! `Connection` names (names lowercased, as `lb`'s `write_head` writes `HeaderName`s), then
//! `x-forwarded-for` (a received one with the client's address appended), `x-forwarded-proto:
//! http`, `x-forwarded-port` and a new `x-amzn-trace-id` (`lb`'s `ForwardedTail`).
//!
//! Per response ([`response`]): the head is parsed with `httparse` (100 slots), the body framed
//! by `Content-Length`, and the head re-encoded (status line, headers without the hop-by-hop
//! ones, names lowercased, a `date` if the target sent none: what `lb`'s hyper server writes)
//! with the body after it, for one send to the client.
//!
//! What this does not handle it refuses, never mis-forwards: a request with a body (a
//! `Content-Length` above 0, or `Transfer-Encoding`) is answered 501 and the connection closed;
//! a response without a `Content-Length` (chunked, or delimited by close), a 1xx, or two
//! differing lengths is answered 502 and the connection closed. A request's `x-amzn-trace-id`
//! is forwarded as received (`lb` appends a `Self=` field to it). The bench's traffic (wrk's
//! GETs, nginx's `Content-Length` responses) needs none of these.
use std::fmt::Write as _;
use std::mem::MaybeUninit;
use std::net::SocketAddrV4;

/// Header slots for a request or response head (`lb`'s limit).
pub const MAX_HEADERS: usize = 100;

/// Uninitialised header slots, as hyper parses (initialising 100 slots is 3.2 KB of stores
/// per parse).
fn slots<'b>() -> [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS] {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// What [`request`] found in the client's buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Req {
    /// The head is not complete yet.
    Incomplete,
    /// The forwarded head is in `out`; `consumed` bytes of the buffer were the request;
    /// `close`: the client asked to close after the response.
    Forward { consumed: usize, close: bool },
    /// A complete response for the client is in `out`; close after sending it.
    Refuse,
}

/// What [`response`] found in the target's buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Resp {
    /// The head or the body is not complete yet.
    Incomplete,
    /// The re-encoded response (head and body) is in `out`; `consumed` bytes of the buffer
    /// were the response; `close`: the target asked to close.
    Forward { consumed: usize, close: bool },
    /// A 502 for the client is in `out`; close after sending it.
    Refuse,
}

/// One condition pair of a rule: the host (exact, case-insensitive, without the port) if any,
/// and a path prefix.
struct Rule {
    host: Option<&'static [u8]>,
    prefix: &'static [u8],
    group: usize,
}

/// A default-rule listener's rules: three conditions on host and path (none matches the
/// bench's `GET /` with `Host: 127.0.0.1:PORT`, so every rule is evaluated before the default),
/// each and the default forwarding to a target group of one, picked by round robin.
pub struct Router {
    rules: [Rule; 3],
    groups: [Group; 1],
}

struct Group {
    targets: Vec<SocketAddrV4>,
    next: usize,
}

impl Router {
    /// The bench's listener: every rule and the default forward to `backend`'s group.
    pub fn new(backend: SocketAddrV4) -> Self {
        Self {
            rules: [
                Rule {
                    host: Some(b"api.example.com"),
                    prefix: b"/v2/",
                    group: 0,
                },
                Rule {
                    host: None,
                    prefix: b"/static/",
                    group: 0,
                },
                Rule {
                    host: Some(b"admin.example.com"),
                    prefix: b"/",
                    group: 0,
                },
            ],
            groups: [Group {
                targets: vec![backend],
                next: 0,
            }],
        }
    }

    /// The target for a request: the first rule whose conditions hold, else the default
    /// (group 0); round robin within the group.
    pub fn pick(&mut self, host: &[u8], path: &[u8]) -> SocketAddrV4 {
        let host = host
            .rsplit_once_byte(b':')
            .filter(|(_, port)| port.iter().all(u8::is_ascii_digit))
            .map_or(host, |(h, _)| h);
        let g = self
            .rules
            .iter()
            .find(|r| {
                r.host.is_none_or(|h| h.eq_ignore_ascii_case(host)) && path.starts_with(r.prefix)
            })
            .map_or(0, |r| r.group);
        let g = &mut self.groups[g];
        let t = g.targets[g.next % g.targets.len()];
        g.next = g.next.wrapping_add(1);
        t
    }
}

trait SplitByte {
    fn rsplit_once_byte(&self, b: u8) -> Option<(&[u8], &[u8])>;
}

impl SplitByte for [u8] {
    fn rsplit_once_byte(&self, b: u8) -> Option<(&[u8], &[u8])> {
        let i = self.iter().rposition(|&c| c == b)?;
        Some((&self[..i], &self[i + 1..]))
    }
}

/// The per-connection values of the forwarded head: the client's address as an
/// `X-Forwarded-For` entry and the listener's port, formatted once.
pub struct Conn {
    pub peer: String,
    pub port: String,
    /// The target the connection's backend socket is connected to (a pick elsewhere is
    /// refused: with a group of one it never is).
    pub target: SocketAddrV4,
}

/// Headers `lb` always removes (`headers::HOP_BY_HOP`), lowercase.
const HOP_BY_HOP: [&[u8]; 9] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"proxy-authenticate",
    b"proxy-authorization",
];

fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name.as_bytes()))
}

fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&c| c == b',').map(<[u8]>::trim_ascii)
}

/// Whether a `Connection` value names `name`.
fn names(connection: &[&[u8]], name: &str) -> bool {
    connection
        .iter()
        .any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case(name.as_bytes())))
}

fn put_lower(out: &mut Vec<u8>, name: &str) {
    out.extend(name.bytes().map(|c| c.to_ascii_lowercase()));
}

fn status(out: &mut Vec<u8>, code: u16, reason: &str) {
    out.clear();
    let _ = write!(
        Buf(out),
        "HTTP/1.1 {code} {reason}\r\ncontent-length: 0\r\nconnection: close\r\n"
    );
    date(out);
    out.extend_from_slice(b"\r\n");
}

struct Buf<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Buf<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Parses the first request in `buf` and writes what goes out into `out` (cleared first).
pub fn request(buf: &[u8], conn: &Conn, router: &mut Router, out: &mut Vec<u8>) -> Req {
    if buf.is_empty() {
        return Req::Incomplete;
    }
    let mut slots = slots();
    let mut req = httparse::Request::new(&mut []);
    let consumed = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Req::Incomplete,
        Err(_) => {
            status(out, 400, "Bad Request");
            return Req::Refuse;
        }
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        status(out, 400, "Bad Request");
        return Req::Refuse;
    };
    let mut host = None;
    let mut content_length = None;
    let mut lengths = 0;
    let mut transfer_encoding = false;
    let mut connection: [&[u8]; 4] = [b""; 4];
    let mut nconn = 0;
    let mut forwarded_for = None;
    for h in req.headers.iter() {
        let n = h.name.as_bytes();
        if n.eq_ignore_ascii_case(b"host") {
            host = Some(h.value);
        } else if n.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            content_length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
        } else if n.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = true;
        } else if n.eq_ignore_ascii_case(b"connection") {
            if nconn == connection.len() {
                status(out, 400, "Bad Request");
                return Req::Refuse;
            }
            connection[nconn] = h.value;
            nconn += 1;
        } else if n.eq_ignore_ascii_case(b"x-forwarded-for") {
            if forwarded_for.is_some() {
                status(out, 400, "Bad Request");
                return Req::Refuse;
            }
            forwarded_for = Some(h.value);
        }
    }
    let connection = &connection[..nconn];
    if lengths > 1
        || (lengths == 1 && transfer_encoding)
        || (lengths == 1 && content_length.is_none())
    {
        status(out, 400, "Bad Request");
        return Req::Refuse;
    }
    let host = match host {
        Some(h) => h,
        None if version == 0 => b"",
        None => {
            status(out, 400, "Bad Request");
            return Req::Refuse;
        }
    };
    if transfer_encoding || content_length.is_some_and(|n| n > 0) {
        status(out, 501, "Not Implemented");
        return Req::Refuse;
    }
    let close = if version == 0 {
        !names(connection, "keep-alive")
    } else {
        names(connection, "close")
    };
    if router.pick(host, path.as_bytes()) != conn.target {
        status(out, 502, "Bad Gateway");
        return Req::Refuse;
    }
    out.clear();
    out.reserve(consumed + conn.peer.len() + 160);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut trace = false;
    for h in req.headers.iter() {
        let n = h.name;
        if is_hop_by_hop(n)
            || n.eq_ignore_ascii_case("x-forwarded-for")
            || n.eq_ignore_ascii_case("x-forwarded-proto")
            || n.eq_ignore_ascii_case("x-forwarded-port")
            || (!connection.is_empty() && !n.eq_ignore_ascii_case("host") && names(connection, n))
        {
            continue;
        }
        trace = trace || n.eq_ignore_ascii_case("x-amzn-trace-id");
        put_lower(out, n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(v) = forwarded_for {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(conn.peer.as_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-proto: http\r\nx-forwarded-port: ");
    out.extend_from_slice(conn.port.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !trace {
        out.extend_from_slice(b"x-amzn-trace-id: ");
        trace_id(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Req::Forward { consumed, close }
}

/// `Root=1-<8 hex digits of the time>-<24 hex digits of random>` (`lb`'s format), the random
/// part from a per-thread xorshift seeded from the clock (`lb` draws from its thread's RNG).
fn trace_id(out: &mut Vec<u8>) {
    use std::cell::Cell;
    thread_local!(static STATE: Cell<u64> = Cell::new(seed()));
    fn seed() -> u64 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        t.as_nanos() as u64 | 1
    }
    fn next(s: &Cell<u64>) -> u64 {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (a, b) = STATE.with(|s| (next(s), next(s)));
    out.extend_from_slice(b"Root=1-");
    hex(out, secs, 8);
    out.push(b'-');
    hex(out, a, 16);
    hex(out, b, 8);
}

/// The low `digits` hex digits of `v`, lowercase, zero-padded.
fn hex(out: &mut Vec<u8>, v: u64, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend((0..digits).rev().map(|i| HEX[(v >> (4 * i)) as usize & 15]));
}

/// Appends `date: <IMF-fixdate>\r\n`, formatted once per second per thread (as hyper caches
/// its `date` header).
fn date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local!(static CACHE: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != now {
            c.1.clear();
            c.1.extend_from_slice(b"date: ");
            imf_fixdate(&mut c.1, now);
            c.1.extend_from_slice(b"\r\n");
            c.0 = now;
        }
        out.extend_from_slice(&c.1);
    });
}

/// RFC 9110 §5.6.7 `IMF-fixdate` of a Unix time (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn imf_fixdate(out: &mut Vec<u8>, secs: u64) {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86400;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let _ = write!(
        Buf(out),
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
}

/// Parses the first response in `buf` and, when it is complete, writes it re-encoded into
/// `out` (cleared first).
pub fn response(buf: &[u8], out: &mut Vec<u8>) -> Resp {
    if buf.is_empty() {
        return Resp::Incomplete;
    }
    let mut slots = slots();
    let mut resp = httparse::Response::new(&mut []);
    let head = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Resp::Incomplete,
        Err(_) => {
            status(out, 502, "Bad Gateway");
            return Resp::Refuse;
        }
    };
    let (Some(code), Some(version)) = (resp.code, resp.version) else {
        status(out, 502, "Bad Gateway");
        return Resp::Refuse;
    };
    let mut length = None;
    let mut has_date = false;
    let mut connection: [&[u8]; 4] = [b""; 4];
    let mut nconn = 0;
    for h in resp.headers.iter() {
        let n = h.name.as_bytes();
        if n.eq_ignore_ascii_case(b"content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
            if v.is_none() || length.is_some_and(|l| Some(l) != v) {
                status(out, 502, "Bad Gateway");
                return Resp::Refuse;
            }
            length = v;
        } else if n.eq_ignore_ascii_case(b"transfer-encoding") {
            status(out, 502, "Bad Gateway");
            return Resp::Refuse;
        } else if n.eq_ignore_ascii_case(b"date") {
            has_date = true;
        } else if n.eq_ignore_ascii_case(b"connection") && nconn < connection.len() {
            connection[nconn] = h.value;
            nconn += 1;
        }
    }
    let connection = &connection[..nconn];
    let body = match (code, length) {
        (100..=199, _) => {
            status(out, 502, "Bad Gateway");
            return Resp::Refuse;
        }
        (204 | 304, _) => 0,
        (_, Some(n)) => n,
        (_, None) => {
            status(out, 502, "Bad Gateway");
            return Resp::Refuse;
        }
    };
    if buf.len() < head + body {
        return Resp::Incomplete;
    }
    let close = if version == 0 {
        !names(connection, "keep-alive")
    } else {
        names(connection, "close")
    };
    out.clear();
    out.reserve(head + body + 40);
    // httparse accepts only three-digit codes
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        let n = h.name;
        if is_hop_by_hop(n) || (!connection.is_empty() && names(connection, n)) {
            continue;
        }
        put_lower(out, n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if !has_date {
        date(out);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&buf[head..head + body]);
    Resp::Forward {
        consumed: head + body,
        close,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> (Conn, Router) {
        let t: SocketAddrV4 = "10.0.0.2:80".parse().unwrap();
        (
            Conn {
                peer: "10.0.0.9".into(),
                port: "8080".into(),
                target: t,
            },
            Router::new(t),
        )
    }

    fn forwarded(req: &[u8]) -> (Req, String) {
        let (c, mut r) = conn();
        let mut out = Vec::new();
        let v = request(req, &c, &mut r, &mut out);
        (v, String::from_utf8(out).unwrap())
    }

    #[test]
    fn forwarded_head_drops_hop_by_hop_and_appends_forwarded_fields() {
        let req = b"GET /a?b HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: 5\r\nX-Secret: s\r\nX-Forwarded-For: 1.2.3.4\r\nAccept: */*\r\n\r\nGET";
        let (v, out) = forwarded(req);
        assert_eq!(
            v,
            Req::Forward {
                consumed: req.len() - 3,
                close: false
            }
        );
        let (head, trace) = out.split_once("x-amzn-trace-id: Root=1-").unwrap();
        assert_eq!(
            head,
            "GET /a?b HTTP/1.1\r\nhost: x\r\naccept: */*\r\nx-forwarded-for: 1.2.3.4, 10.0.0.9\r\nx-forwarded-proto: http\r\nx-forwarded-port: 8080\r\n"
        );
        assert_eq!(trace.len(), 8 + 1 + 24 + 4, "{trace:?}");
        assert!(trace.ends_with("\r\n\r\n"));
    }

    #[test]
    fn desync_and_bodies_are_refused() {
        for (req, code) in [
            (&b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n"[..], "400"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "400"),
            (b"GET / HTTP/1.1\r\n\r\n", "400"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", "501"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", "501"),
        ] {
            let (v, out) = forwarded(req);
            assert_eq!(v, Req::Refuse, "{out}");
            assert!(out.starts_with(&format!("HTTP/1.1 {code} ")), "{out}");
        }
        // positive control: one Content-Length of 0 is forwarded
        let (v, _) = forwarded(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        assert!(matches!(v, Req::Forward { .. }));
        assert_eq!(
            forwarded(b"GET / HTTP/1.1\r\nHost: x\r\n").0,
            Req::Incomplete
        );
    }

    #[test]
    fn response_is_reencoded_with_its_body() {
        let r = b"HTTP/1.1 200 OK\r\nServer: n\r\nDate: D\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nabcHTTP";
        let mut out = Vec::new();
        assert_eq!(response(&r[..r.len() - 6], &mut out), Resp::Incomplete);
        assert_eq!(
            response(r, &mut out),
            Resp::Forward {
                consumed: r.len() - 4,
                close: false
            }
        );
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "HTTP/1.1 200 OK\r\nserver: n\r\ndate: D\r\ncontent-length: 3\r\n\r\nabc"
        );
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(response(chunked, &mut out), Resp::Refuse);
        assert!(out.starts_with(b"HTTP/1.1 502 "));
    }

    #[test]
    fn routing_strips_the_port_and_matches_prefixes() {
        let (_, mut r) = conn();
        let t = r.groups[0].targets[0];
        assert_eq!(r.pick(b"API.example.com:80", b"/v2/x"), t);
        assert_eq!(r.groups[0].next, 1);
    }

    #[test]
    fn imf_fixdate_formats_rfc_example() {
        let mut out = Vec::new();
        imf_fixdate(&mut out, 784111777);
        assert_eq!(out, b"Sun, 06 Nov 1994 08:49:37 GMT");
    }
}
