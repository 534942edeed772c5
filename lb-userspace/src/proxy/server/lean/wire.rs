//! The lean HTTP/1.1 path's request and response work, as plain functions over bytes: which
//! request heads it serves ([`examine`]), the head it forwards ([`write_forwarded`]), and the
//! response head it writes to the client ([`response_head`]). Everything it does not take is
//! left to the native path (`server/h1.rs`), which serves the request and the rest of its
//! connection as before: the lean path never answers a request differently, it only declines.
use std::mem::MaybeUninit;

use crate::headers::{ForwardedTail, is_hop_by_hop_name};
use crate::proxy::desync::{RawHead, is_tchar, trim_ows};

/// Most request or response header fields (the native path's limit).
pub(super) const MAX_HEADERS: usize = 100;

/// What [`examine`] read off a request head it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Facts<'a> {
    /// `Host`'s value (trimmed).
    pub host: &'a [u8],
    /// `User-Agent`'s value, for the access log.
    pub user_agent: Option<&'a [u8]>,
    /// The client asked to close after the response (`Connection: close`).
    pub close: bool,
    /// The request is `HEAD` (its response has no body).
    pub head: bool,
}

/// Request header names that make the lean path decline a request, beside the hop-by-hop
/// fields other than `Connection` and `Keep-Alive` (`headers::is_hop_by_hop_name`: framing,
/// upgrades, `TE`, proxy fields): a body's length (bodies stay on the native path), the
/// fields `lb` adds itself (the native path merges a received one), `Expect`, and HTTP/2's
/// upgrade settings.
const DECLINED: [&[u8]; 7] = [
    b"content-length",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-port",
    b"x-amzn-trace-id",
    b"expect",
    b"http2-settings",
];

fn is(name: &[u8], lowercase: &[u8]) -> bool {
    name.len() == lowercase.len() && name.eq_ignore_ascii_case(lowercase)
}

/// A field value a header map takes as it is: no control bytes but tab.
fn plain_value(v: &[u8]) -> bool {
    v.iter().all(|&b| (b >= 0x20 && b != 0x7f) || b == b'\t')
}

/// A request target the native path would forward unchanged: origin-form, and only bytes
/// a URI holds without encoding (no fragment).
fn plain_target(t: &[u8]) -> bool {
    t.first() == Some(&b'/')
        && t.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._~:/?[]@!$&'()*+,;=%".contains(&b))
}

/// Whether a `Connection` value lists only `close` and `keep-alive`; `Some(close)` if so.
fn connection_close(v: &[u8]) -> Option<bool> {
    let mut close = false;
    for token in v.split(|&b| b == b',') {
        let token = trim_ows(token);
        if is(token, b"close") {
            close = true;
        } else if !is(token, b"keep-alive") {
            return None;
        }
    }
    Some(close)
}

/// The facts of a compliant request head (`raw`, which the desync classifier called
/// compliant) that the lean path serves, or `None`: the native path takes it. Served: HTTP/1.1,
/// a method other than `CONNECT` and `TRACE`, an origin-form target, exactly one `Host`, no
/// body, none of [`DECLINED`], `Connection` with only `close`/`keep-alive`, at most
/// [`MAX_HEADERS`] fields, and values without control bytes.
pub(super) fn examine<'a>(raw: &RawHead<'a>) -> Option<Facts<'a>> {
    if raw.version != b"HTTP/1.1"
        || raw.method.is_empty()
        || !raw.method.iter().all(|&b| is_tchar(b))
        || raw.method == b"CONNECT"
        || raw.method == b"TRACE"
        || !plain_target(raw.target)
        || raw.headers.len() > MAX_HEADERS
    {
        return None;
    }
    let mut host = None;
    let mut hosts = 0;
    let mut user_agent = None;
    let mut close = false;
    for h in &raw.headers {
        if h.continuation || h.no_colon || h.name.is_empty() || !h.name.iter().all(|&b| is_tchar(b))
        {
            return None;
        }
        let value = trim_ows(h.value);
        if !plain_value(value) {
            return None;
        }
        let name = h.name;
        if is(name, b"host") {
            hosts += 1;
            host = Some(value);
        } else if is(name, b"connection") {
            close |= connection_close(value)?;
        } else if is(name, b"user-agent") {
            user_agent = Some(value);
        } else if (is_hop_by_hop_name(name) && !is(name, b"keep-alive"))
            || DECLINED.iter().any(|d| is(name, d))
        {
            return None;
        }
    }
    if hosts != 1 {
        return None;
    }
    Some(Facts {
        host: host?,
        user_agent,
        close,
        head: raw.method == b"HEAD",
    })
}

/// Writes the head forwarded to the target: the request line with `HTTP/1.1`, every field
/// but `Connection` and `Keep-Alive` (names lowercased, values trimmed, in the client's
/// order), then `tail`'s fields (`X-Forwarded-*`, `X-Amzn-Trace-Id`), as the native path's
/// client writes a request of this kind.
pub(super) fn write_forwarded(out: &mut Vec<u8>, raw: &RawHead<'_>, tail: &ForwardedTail<'_>) {
    out.extend_from_slice(raw.method);
    out.push(b' ');
    out.extend_from_slice(raw.target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in &raw.headers {
        if is(h.name, b"connection") || is(h.name, b"keep-alive") {
            continue;
        }
        let start = out.len();
        out.extend_from_slice(h.name);
        out[start..].make_ascii_lowercase();
        out.extend_from_slice(b": ");
        out.extend_from_slice(trim_ows(h.value));
        out.extend_from_slice(b"\r\n");
    }
    tail.write_to(out);
    out.extend_from_slice(b"\r\n");
}

/// How a response body is delimited on the target connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Body {
    /// No body (a response to HEAD, 204, 304), or `Content-Length` bytes.
    Length(u64),
    /// Chunked: passed through as it comes.
    Chunked,
    /// Until the target closes: re-framed as chunked for the client.
    UntilClose,
}

/// A target's response head, as [`response_head`] read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Response {
    /// Bytes of the target's buffer the head took (informational heads before it included).
    pub consumed: usize,
    /// Its status.
    pub status: u16,
    /// Its body's framing.
    pub body: Body,
    /// The target connection may carry another request after this response.
    pub reusable: bool,
    /// Bytes of the head written for the client.
    pub written: usize,
}

/// Why a target's response head cannot be forwarded (502).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BadResponse(pub &'static str);

/// Reads the target's response head from `buf` and writes the client's into `out`, as the
/// native path does (status line with the standard reason phrase; the target's fields in
/// order without the hop-by-hop ones and those its `Connection` names, names lowercased;
/// `connection: close` when `close`; the framing field when the target sent none; a `date`
/// unless the target sent one). Informational heads (100, 103) are skipped; 101 is an error
/// (no upgrade was asked for). `Ok(None)`: the head is not complete yet.
pub(super) fn response_head(
    buf: &[u8],
    out: &mut Vec<u8>,
    head_request: bool,
    close: bool,
    max_head: usize,
) -> Result<Option<Response>, BadResponse> {
    let mut consumed = 0;
    loop {
        let rest = &buf[consumed..];
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut res, rest, &mut slots)
        {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if rest.len() >= max_head => {
                return Err(BadResponse("response head too large"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(BadResponse("more than 100 header fields in the response"));
            }
            Err(_) => return Err(BadResponse("invalid response head")),
        };
        if len > max_head {
            return Err(BadResponse("response head too large"));
        }
        let status = res.code.unwrap_or_default();
        let Ok(code) = http::StatusCode::from_u16(status) else {
            return Err(BadResponse("status code"));
        };
        if status == 101 {
            return Err(BadResponse(
                "101 Switching Protocols to a request without Upgrade",
            ));
        }
        if code.is_informational() {
            consumed += len;
            continue;
        }
        let http11 = res.version == Some(1);
        // What the framing and connection fields say, and which fields `Connection` names.
        let mut keep_alive = http11;
        let mut saw_close = false;
        let mut length: Option<u64> = None;
        let mut transfer_encoding = false;
        let mut chunked = false;
        let mut named: Vec<&[u8]> = Vec::new();
        for h in res.headers.iter() {
            let name = h.name.as_bytes();
            if is(name, b"connection") {
                for token in h.value.split(|&b| b == b',') {
                    let token = trim_ows(token);
                    if is(token, b"close") {
                        saw_close = true;
                        keep_alive = false;
                    } else if is(token, b"keep-alive") {
                        keep_alive |= !saw_close;
                    } else if !token.is_empty() {
                        named.push(token);
                    }
                }
            } else if is(name, b"content-length") {
                let Some(n) = crate::proxy::desync::parse_content_length(h.value) else {
                    return Err(BadResponse("Content-Length"));
                };
                if length.is_some_and(|l| l != n) {
                    return Err(BadResponse("Content-Length"));
                }
                length = Some(n);
            } else if is(name, b"transfer-encoding") {
                transfer_encoding = true;
                chunked = h
                    .value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|last| trim_ows(last).eq_ignore_ascii_case(b"chunked"));
            }
        }
        let no_body = head_request || status == 204 || status == 304;
        let body = if no_body {
            Body::Length(0)
        } else if transfer_encoding {
            if !http11 {
                return Err(BadResponse("Transfer-Encoding in an HTTP/1.0 response"));
            }
            if chunked {
                Body::Chunked
            } else {
                Body::UntilClose
            }
        } else {
            match length {
                Some(n) => Body::Length(n),
                None => Body::UntilClose,
            }
        };
        let start = out.len();
        if status == 200 {
            out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        } else {
            out.extend_from_slice(b"HTTP/1.1 ");
            out.extend_from_slice(code.as_str().as_bytes());
            out.push(b' ');
            out.extend_from_slice(code.canonical_reason().unwrap_or("<none>").as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        // The target's `Content-Length` stays in its place, except where the native path
        // writes its own at the end (an empty body that may have one: `content-length: 0`)
        // or none (204, 304).
        let no_body_status = status == 204 || status == 304;
        let own_length = no_body_status || (!head_request && length == Some(0));
        let mut wrote_length = false;
        let mut wrote_date = false;
        for h in res.headers.iter() {
            let name = h.name.as_bytes();
            // Hop-by-hop fields (the same list the native path strips) and those the
            // target's `Connection` names are never passed on.
            if is_hop_by_hop_name(name) || named.iter().any(|n| is(name, n)) {
                continue;
            }
            if is(name, b"content-length") {
                if wrote_length || own_length {
                    continue;
                }
                wrote_length = true;
            } else if is(name, b"date") {
                wrote_date = true;
            }
            let at = out.len();
            out.extend_from_slice(name);
            out[at..].make_ascii_lowercase();
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        match body {
            Body::Chunked | Body::UntilClose => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            }
            Body::Length(0) if !wrote_length && !head_request && !no_body_status => {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
            Body::Length(_) => {}
        }
        if !wrote_date {
            out.extend_from_slice(b"date: ");
            crate::proxy::date::with_current(|d| out.extend_from_slice(d.as_bytes()));
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        return Ok(Some(Response {
            consumed: consumed + len,
            status,
            body,
            reusable: keep_alive && body != Body::UntilClose,
            written: out.len() - start,
        }));
    }
}

/// The load balancer's own error response (ALB's page), written as the native path writes
/// it: `content-type`, `connection: close` when `close`, `content-length`, `date`. Returns
/// the head's and the body's sizes.
pub(super) fn error_response(out: &mut Vec<u8>, status: u16, close: bool) -> (usize, usize) {
    let code = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    let page = super::super::pipeline::error_page(code);
    let start = out.len();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(code.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(code.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: text/html\r\n");
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(page.len()).as_bytes());
    out.extend_from_slice(b"\r\ndate: ");
    crate::proxy::date::with_current(|d| out.extend_from_slice(d.as_bytes()));
    out.extend_from_slice(b"\r\n\r\n");
    let head = out.len() - start;
    out.extend_from_slice(page.as_bytes());
    (head, page.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::desync::{classify_tokens, tokenize};

    /// [`examine`] as the loop calls it: only on heads the classifier calls compliant.
    fn facts(head: &[u8]) -> Option<Facts<'_>> {
        let raw = tokenize(head);
        if classify_tokens(&raw).tier != crate::proxy::desync::Tier::Compliant {
            return None;
        }
        // The tokens borrow `head`, not `raw`: the facts outlive the token list.
        examine(&raw)
    }

    #[test]
    fn the_common_get_is_taken_and_what_needs_the_native_path_is_declined() {
        let get = b"GET /a?b=1 HTTP/1.1\r\nHost: x.test:80\r\nUser-Agent: t/1\r\nConnection: close\r\n\r\n";
        let f = facts(get).expect("a plain GET is lean");
        assert_eq!(f.host, b"x.test:80");
        assert_eq!(f.user_agent, Some(&b"t/1"[..]));
        assert!(f.close && !f.head);
        assert!(facts(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap().head);
        for declined in [
            &b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nx-amzn-trace-id: Root=1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close, x-private\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a#frag HTTP/1.1\r\nHost: x\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic eA==\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n",
        ] {
            assert_eq!(
                facts(declined),
                None,
                "{:?} goes to the native path",
                String::from_utf8_lossy(declined)
            );
        }
    }

    #[test]
    fn the_forwarded_head_drops_connection_fields_and_ends_with_the_tail() {
        let head = b"GET /p HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nAccept: */*\r\nKeep-Alive: 5\r\nX-Mixed-Case: V\r\n\r\n";
        let raw = tokenize(head);
        let peer = crate::headers::ForwardedPeer::new("10.1.2.3".parse().unwrap());
        let port = crate::headers::forwarded_port(8080);
        let tail = ForwardedTail::new(
            &peer,
            "http",
            &port,
            crate::headers::XffMode::Append,
            std::time::SystemTime::UNIX_EPOCH,
            &mut rand::rng(),
        );
        let mut out = Vec::new();
        write_forwarded(&mut out, &raw, &tail);
        let text = String::from_utf8(out).unwrap();
        let trace = tail.trace_id().to_str().unwrap();
        assert_eq!(
            text,
            format!(
                "GET /p HTTP/1.1\r\nhost: x\r\naccept: */*\r\nx-mixed-case: V\r\n\
                 x-forwarded-for: 10.1.2.3\r\nx-forwarded-proto: http\r\nx-forwarded-port: 8080\r\n\
                 x-amzn-trace-id: {trace}\r\n\r\n"
            )
        );
    }

    fn response(target: &[u8], head_request: bool, close: bool) -> (Response, String) {
        let mut out = Vec::new();
        let r = response_head(target, &mut out, head_request, close, 32 * 1024)
            .expect("forwardable")
            .expect("complete");
        (r, String::from_utf8(out).unwrap())
    }

    #[test]
    fn response_heads_keep_the_targets_fields_and_add_only_framing_close_and_date() {
        let (r, text) = response(
            b"HTTP/1.1 200 OK\r\nServer: n\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello",
            false,
            false,
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nserver: n\r\ndate: Tue, 01 Dec 2026 00:00:00 GMT\r\ncontent-length: 5\r\n\r\n"
        );
        assert_eq!((r.status, r.body, r.reusable), (200, Body::Length(5), true));
        assert_eq!(r.consumed, 110, "the head, not the body");
        let (r, text) = response(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Whatever\r\nTransfer-Encoding: chunked\r\nConnection: close, x-hop\r\nX-Hop: 1\r\nDate: D\r\n\r\n",
            false,
            true,
        );
        assert_eq!(
            text,
            "HTTP/1.1 404 Not Found\r\ndate: D\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!((r.body, r.reusable), (Body::Chunked, false));
        // No framing from an HTTP/1.0 target: until it closes, re-framed as chunked.
        let (r, text) = response(b"HTTP/1.0 200 OK\r\nDate: D\r\n\r\n", false, false);
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ndate: D\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!((r.body, r.reusable), (Body::UntilClose, false));
        // HEAD and 304 carry no body whatever their length says; a date is added.
        let (r, text) = response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true, false);
        assert_eq!(r.body, Body::Length(0));
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ncontent-length: 9\r\ndate: "));
        let (r, _) = response(
            b"HTTP/1.1 304 Not Modified\r\nDate: D\r\n\r\n",
            false,
            false,
        );
        assert_eq!(r.body, Body::Length(0));
        // An empty body's length is written after the fields (and `connection`), as the
        // native path writes it; 204 and 304 get none.
        let (_, text) = response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nDate: D\r\n\r\n",
            false,
            true,
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ndate: D\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
        );
        let (_, text) = response(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nDate: D\r\n\r\n",
            false,
            false,
        );
        assert_eq!(text, "HTTP/1.1 204 No Content\r\ndate: D\r\n\r\n");
    }

    #[test]
    fn bad_response_heads_are_refused_and_partial_ones_wait() {
        let mut out = Vec::new();
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"garbage\r\n\r\n",
        ] {
            assert!(response_head(bad, &mut out, false, false, 32 * 1024).is_err());
        }
        assert_eq!(
            response_head(
                b"HTTP/1.1 200 OK\r\nContent-Le",
                &mut out,
                false,
                false,
                32 * 1024
            ),
            Ok(None)
        );
        assert!(response_head(&[b'a'; 64], &mut out, false, false, 16).is_err());
        // Equal lengths twice are one length, written once.
        let (_, text) = response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\ncontent-length: 2\r\nDate: D\r\n\r\n",
            false,
            false,
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ndate: D\r\n\r\n"
        );
    }

    #[test]
    fn error_responses_carry_albs_page_and_its_length() {
        let mut out = Vec::new();
        let (head, body) = error_response(&mut out, 502, true);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(head + body, text.len());
        assert!(text.starts_with(
            "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\nconnection: close\r\ncontent-length: "
        ));
        assert!(
            text.ends_with("<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n")
        );
        assert!(text[..head].contains(&format!("content-length: {body}\r\n")));
    }
}
