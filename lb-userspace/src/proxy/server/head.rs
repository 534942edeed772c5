//! What hyper gets for an HTTP/1 request head the listener lets through.
//!
//! ALB forwards requests its desync classifier lets through even when they are not RFC
//! compliant: a folded header line, a `Transfer-Encoding` list, an empty request target, a
//! space in the target. hyper's parser rejects many of them on its own (with a bodiless 400),
//! and forwarding bytes we did not frame ourselves is how request smuggling starts. So every
//! request head the sniffer passes is rebuilt here from the same tokens the classifier saw
//! ([`desync::tokenize`]), in a form hyper parses exactly as we decided:
//!
//! - request line `METHOD TARGET HTTP/1.x`: an empty or missing target becomes `/` (RFC 9112
//!   §3.2.1); spaces around the target are dropped; bytes a URI cannot hold (spaces and control
//!   bytes inside it, bytes ≥ 0x80 that are not UTF-8) are percent-encoded; a version padded
//!   with spaces is trimmed.
//! - header lines keep their order, names and values (without surrounding whitespace); a folded
//!   line is joined to the header it continues with one space (RFC 9112 §5.2). Lines hyper
//!   cannot represent are dropped: no colon, an empty name, a name with non-token bytes
//!   (ALB forwards those unless `routing.http.drop_invalid_header_fields.enabled`; hyper
//!   cannot), a value with control bytes, and names that imitate `Transfer-Encoding` or
//!   `Content-Length` (`Transfer_Encoding`): a target that normalises names would frame the
//!   body by them.
//! - framing, written once at the end: `transfer-encoding: chunked` when `chunked` is among the
//!   codings (then every `Content-Length` is dropped, RFC 9112 §6.3), else
//!   `content-length: N` when `Content-Length` headers agree on N. The only codings supported
//!   are `chunked` and `identity` (ALB answers anything else with 501); parameters are ignored.
//!   HTTP/1.0 with `Transfer-Encoding` (ambiguous) is passed to hyper as HTTP/1.1, which is how
//!   its chunked body can be framed at all; the connection closes after it in `defensive` mode.
//!
//! What cannot be forwarded is reported instead: an unsupported version (505), an unsupported
//! coding (501), and heads no rebuilding makes valid (no method, a target that is no URI,
//! conflicting or invalid `Content-Length`, `chunked` twice): 400.
use std::cell::Cell;
use std::mem::MaybeUninit;

use http::header::{HeaderName, HeaderValue};

use crate::proxy::desync::{
    Classification, RawHead, Similarity, framing_similarity, known_coding, parse_content_length,
    trim_ows,
};
use crate::proxy::names::HeaderNames;

/// How the body after the head is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// `Content-Length` bytes (0 included: the header is forwarded).
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
}

/// The HTTP/1 versions served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0.
    Http10,
    /// HTTP/1.1.
    Http11,
}

/// A request head ready for hyper, or the facts that keep it from being forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// The head to give hyper (request line through the empty line).
    pub head: Vec<u8>,
    /// How its body is delimited.
    pub framing: Framing,
    /// `None`: a version other than HTTP/1.0 and HTTP/1.1 (505).
    pub version: Option<Version>,
    /// The method is `TRACE` (405, before 501 and 505 as ALB does).
    pub trace: bool,
    /// `Transfer-Encoding` names a coding other than chunked and identity (501).
    pub unsupported_coding: bool,
    /// Why the head cannot be forwarded at all (400), if it cannot.
    pub malformed: Option<&'static str>,
    /// `Host` header lines (an HTTP/1.1 request needs exactly one).
    pub host_headers: usize,
    /// `Upgrade` present or method CONNECT: the connection may be taken over.
    pub upgrade: bool,
}

/// Percent-encodes `b` into `out`.
fn encode(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
}

/// A normalised request target: its bytes (for a rebuilt head) or, on the request-parts path,
/// the URI parsed from them.
enum Target {
    Bytes(Vec<u8>),
    Uri(http::Uri),
}

/// The request target as a URI hyper accepts, if there is one: as bytes, or (`as_uri`) as the
/// parsed URI itself, so the parts path parses it once and copies it never.
fn normalize_target(raw: &[u8], as_uri: bool) -> Option<Target> {
    let target = trim_ows(raw);
    if as_uri && target == b"/" {
        // The most common target of all: the URI `http` parses `/` into, without copying it
        // into a buffer of its own first.
        return Some(Target::Uri(http::Uri::from_static("/")));
    }
    let utf8 = std::str::from_utf8(target).is_ok();
    let lenient = || {
        if target.is_empty() {
            return b"/".to_vec();
        }
        let needs_encoding = |b: u8| b <= b' ' || b == 0x7f || (b >= 0x80 && !utf8);
        // Usually nothing is encoded: then one copy, not a push per byte.
        if !target.iter().any(|&b| needs_encoding(b)) {
            return target.to_vec();
        }
        let mut out = Vec::with_capacity(target.len());
        for &b in target {
            if needs_encoding(b) {
                encode(&mut out, b);
            } else {
                out.push(b);
            }
        }
        out
    };
    let accept = |bytes: Vec<u8>| -> Result<Target, Vec<u8>> {
        if as_uri {
            // No copy: `Bytes` takes the vector (the bytes are needed again only on failure,
            // rare, and then rebuilt).
            http::Uri::from_maybe_shared(bytes::Bytes::from(bytes))
                .map(Target::Uri)
                .map_err(|_| Vec::new())
        } else if http::Uri::try_from(bytes.as_slice()).is_ok() {
            Ok(Target::Bytes(bytes))
        } else {
            Err(bytes)
        }
    };
    let out = match accept(lenient()) {
        Ok(target) => return Some(target),
        Err(out) if !as_uri => out,
        Err(_) => lenient(),
    };
    // Other bytes the URI grammar does not allow (`"`, `<`, `\`, `{`…): encode them too.
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=%".contains(&b);
    let mut strict = Vec::with_capacity(out.len());
    for &b in &out {
        if allowed(b) {
            strict.push(b);
        } else {
            encode(&mut strict, b);
        }
    }
    accept(strict).ok()
}

/// Rebuilds a tokenised head for hyper (see the module docs).
pub fn prepare(raw: &RawHead<'_>) -> Prepared {
    prepare_as(raw, false, false, &mut HeaderNames::new()).0
}

/// As [`prepare`], but the head comes out as the `http` request parts the pipeline takes
/// (what hyper would have parsed from the rebuilt head: same target, same header lines in the
/// same order, the framing header last) instead of bytes; `Prepared::head` stays empty.
/// `None` when the head cannot be forwarded (see the other fields). `names`: the connection's
/// header names of its previous head, used again where the same name is written.
/// `classification`: what [`crate::proxy::desync::classify_tokens`] said of `raw`; a compliant
/// head's values are taken without checking their bytes again.
pub fn prepare_parts(
    raw: &RawHead<'_>,
    classification: Classification,
    names: &mut HeaderNames,
) -> (Prepared, Option<Box<http::request::Parts>>) {
    prepare_as(raw, true, values_checked(raw, classification), names)
}

/// Whether the classifier has checked every byte of every header value of `raw` against what
/// `HeaderValue` accepts, and found them all good: it found the head compliant (nothing at
/// all raised: a value byte outside VCHAR, obs-text, SP and HTAB raises `NonCompliantHeader`
/// or `BadHeader`, and `is_value_char` is `HeaderValue`'s own rule), and did look at the
/// headers (it leaves heads of HTTP/2 and later, which it does not read, compliant).
fn values_checked(raw: &RawHead<'_>, classification: Classification) -> bool {
    classification == Classification::COMPLIANT && raw.version < b"HTTP/2".as_slice()
}

fn prepare_as(
    raw: &RawHead<'_>,
    as_parts: bool,
    values_valid: bool,
    names: &mut HeaderNames,
) -> (Prepared, Option<Box<http::request::Parts>>) {
    let mut malformed = None;
    let method = raw.method;
    // Parsed once: the check here, and the request parts' method below.
    let parsed_method = http::Method::from_bytes(method).ok();
    if method.is_empty() || parsed_method.is_none() {
        malformed = Some("invalid method");
    }
    let target = normalize_target(raw.target, as_parts).unwrap_or_else(|| {
        malformed = malformed.or(Some("invalid request target"));
        Target::Bytes(Vec::new())
    });
    let mut version = match trim_ows(raw.version) {
        b"HTTP/1.1" => Some(Version::Http11),
        b"HTTP/1.0" => Some(Version::Http10),
        _ => None,
    };

    // Each kept line: its name as written (for a rebuilt head), the name parsed (once: the
    // parse is the representability check and the request parts' name) and its value, `None`
    // if `HeaderValue` refuses it (a control byte): such a line is dropped. The conversion is
    // the only check of a value (one vectorised pass; a separate check before it read every
    // value twice). A folded line joins the value it continues: a refused value stays refused,
    // as more bytes cannot make it valid.
    let mut kept: Vec<(&[u8], HeaderName, Option<HeaderValue>)> =
        Vec::with_capacity(raw.headers.len());
    let mut te_values: Vec<&[u8]> = Vec::new();
    let mut cl_values: Vec<&[u8]> = Vec::new();
    // Whether the last header line was kept, so a folded line after it is joined to it.
    let mut last_kept = false;
    // How many names were parsed: each one's position for `names`.
    let mut parsed = 0;
    for h in &raw.headers {
        let (te, cl) = framing_similarity(h.name);
        if te == Similarity::Identical {
            te_values.push(h.value);
            last_kept = false;
            continue;
        }
        if cl == Similarity::Identical {
            cl_values.push(h.value);
            last_kept = false;
            continue;
        }
        if h.continuation {
            let more = trim_ows(h.line);
            if last_kept
                && !more.is_empty()
                && let Some((_, _, slot)) = kept.last_mut()
                && let Some(value) = slot.as_ref()
            {
                let mut joined = Vec::with_capacity(value.len() + 1 + more.len());
                joined.extend_from_slice(value.as_bytes());
                if !joined.is_empty() {
                    joined.push(b' ');
                }
                joined.extend_from_slice(more);
                *slot = value_of(joined);
            }
            continue;
        }
        let name = (!h.no_colon && te == Similarity::Distant && cl == Similarity::Distant)
            .then(|| {
                parsed += 1;
                names.get(parsed - 1, h.name).ok()
            })
            .flatten();
        last_kept = name.is_some();
        if let Some(name) = name {
            let value = trim_ows(h.value).to_vec();
            let value = if values_valid {
                // SAFETY (a contract, not memory): `from_maybe_shared_unchecked` wants bytes
                // `HeaderValue::from_bytes` accepts; `values_valid` says the classifier found
                // every byte of this line's value to be one (see `values_checked`; trimming
                // only drops bytes). Debug builds check each value again; the test
                // `values_taken_unchecked_are_the_values_checking_gives` runs every byte.
                Some(unsafe { HeaderValue::from_maybe_shared_unchecked(bytes::Bytes::from(value)) })
            } else {
                value_of(value)
            };
            kept.push((h.name, name, value));
        }
    }

    let mut unsupported_coding = false;
    let mut chunked = 0;
    for item in te_values.iter().flat_map(|v| v.split(|&b| b == b',')) {
        match known_coding(item) {
            Some(b"chunked") => chunked += 1,
            Some(b"identity") => {}
            _ => unsupported_coding = true,
        }
    }
    let framing = if chunked > 1 {
        malformed = malformed.or(Some("chunked applied more than once"));
        Framing::Empty
    } else if chunked == 1 {
        Framing::Chunked
    } else if cl_values.is_empty() {
        Framing::Empty
    } else {
        let lengths: Option<Vec<u64>> = cl_values.iter().map(|v| parse_content_length(v)).collect();
        match lengths.as_deref() {
            Some([first, rest @ ..]) if rest.iter().all(|n| n == first) => Framing::Length(*first),
            Some(_) => {
                malformed = malformed.or(Some("conflicting Content-Length"));
                Framing::Empty
            }
            None => {
                malformed = malformed.or(Some("invalid Content-Length"));
                Framing::Empty
            }
        }
    };
    if framing == Framing::Chunked && version == Some(Version::Http10) {
        // hyper refuses Transfer-Encoding on HTTP/1.0; see the module docs.
        version = Some(Version::Http11);
    }

    // Kept names are tokens, so the parsed name is `host` exactly when the written one is
    // `Host` in any case.
    let host_headers = kept
        .iter()
        .filter(|(_, name, value)| value.is_some() && name == http::header::HOST)
        .count();
    let upgrade = method == b"CONNECT"
        || kept
            .iter()
            .any(|(_, name, value)| value.is_some() && name == http::header::UPGRADE);

    let mut head = Vec::new();
    let mut parts = None;
    if as_parts
        && malformed.is_none()
        && let Some(v) = version
        && let Some(m) = parsed_method
    {
        parts = request_parts(m, target, v, kept, framing);
        if parts.is_none() {
            malformed = Some("invalid request head");
        }
    } else if malformed.is_none()
        && let Some(v) = version
    {
        head.reserve(raw.target.len() + 64 * (kept.len() + 2));
        head.extend_from_slice(method);
        head.push(b' ');
        if let Target::Bytes(target) = &target {
            head.extend_from_slice(target);
        }
        head.extend_from_slice(match v {
            Version::Http10 => b" HTTP/1.0\r\n",
            Version::Http11 => b" HTTP/1.1\r\n",
        });
        for (name, _, value) in &kept {
            let Some(value) = value else { continue };
            head.extend_from_slice(name);
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        match framing {
            Framing::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            Framing::Length(n) => {
                head.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
            }
            Framing::Empty => {}
        }
        head.extend_from_slice(b"\r\n");
    }
    let prepared = Prepared {
        head,
        framing,
        version,
        trace: method == b"TRACE",
        unsupported_coding,
        malformed,
        host_headers,
        upgrade,
    };
    (prepared, parts)
}

/// A header value as `http` accepts it (visible ASCII, obs-text, space and tab; no other control
/// byte), without a copy; `None` if it is not one.
fn value_of(bytes: Vec<u8>) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(bytes)).ok()
}

/// Headers the pipeline adds to a forwarded request (`X-Forwarded-For`, `X-Forwarded-Proto`,
/// `X-Forwarded-Port`, `X-Amzn-Trace-Id`).
const ADDED_BY_PIPELINE: usize = 4;

/// The request parts of a head [`prepare_as`] found forwardable. Every piece was checked
/// there already (method, target, names, values); `None` only if one still does not convert.
fn request_parts(
    method: http::Method,
    target: Target,
    version: Version,
    kept: Vec<(&[u8], HeaderName, Option<HeaderValue>)>,
    framing: Framing,
) -> Option<Box<http::request::Parts>> {
    // Boxed where it is made, and filled in the box: the native loop takes it boxed, and the
    // 224 bytes were copied at each of the four returns on the way there (and into the box).
    let mut parts = Box::write(spare_parts(), http::Request::new(()).into_parts().0);
    parts.method = method;
    parts.uri = match target {
        Target::Uri(uri) => uri,
        Target::Bytes(bytes) => http::Uri::from_maybe_shared(bytes::Bytes::from(bytes)).ok()?,
    };
    parts.version = match version {
        Version::Http10 => http::Version::HTTP_10,
        Version::Http11 => http::Version::HTTP_11,
    };
    // Room for the framing header and for what the pipeline adds to every forwarded request
    // (`X-Forwarded-For`, `-Proto`, `-Port`, `X-Amzn-Trace-Id`): a map that has to grow for
    // them reallocates twice per request. A map finished with on this thread is used again.
    let mut headers = crate::proxy::recycle::header_map(kept.len() + 1 + ADDED_BY_PIPELINE);
    for (_, name, value) in kept {
        if let Some(value) = value {
            headers.append(name, value);
        }
    }
    match framing {
        Framing::Chunked => {
            headers.append(
                http::header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        Framing::Length(n) => {
            headers.append(http::header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        Framing::Empty => {}
    }
    parts.headers = headers;
    Some(parts)
}

thread_local! {
    /// The allocation of the last request parts this thread unboxed (see [`unbox_parts`]).
    static SPARE_PARTS: Cell<Option<Box<MaybeUninit<http::request::Parts>>>> =
        const { Cell::new(None) };
}

/// Room for a request's parts: the allocation this thread kept (written by the previous
/// request, so likely still in the L1 data cache), else a new one. A fresh block from the
/// allocator was freed many requests ago (mimalloc reuses a page's freed blocks only once its
/// free list runs out), and each of its cache lines missed the L1 on the first write.
fn spare_parts() -> Box<MaybeUninit<http::request::Parts>> {
    SPARE_PARTS
        .try_with(Cell::take)
        .ok()
        .flatten()
        .unwrap_or_else(Box::new_uninit)
}

/// The parts out of their box; the allocation is kept for the next request's parts on this
/// thread (one per thread: a second one is freed).
pub(super) fn unbox_parts(parts: Box<http::request::Parts>) -> http::request::Parts {
    let raw = Box::into_raw(parts);
    // SAFETY: `raw` comes from a `Box<Parts>`: the value is read out once, and the allocation
    // is then owned as a `MaybeUninit<Parts>` (same layout) whose contents are never read
    // before `Box::write` fills them again.
    let (parts, room) = unsafe {
        (
            std::ptr::read(raw),
            Box::from_raw(raw.cast::<MaybeUninit<http::request::Parts>>()),
        )
    };
    let _ = SPARE_PARTS.try_with(|spare| spare.set(Some(room)));
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::desync::{classify_tokens, tokenize};

    /// Values taken without a second check (the classifier found the head compliant) are the
    /// values checking them gives: every byte but CR and LF, at the start, middle and end of a
    /// value, on its own line, after a folded line, and in a head the classifier does not read
    /// (HTTP/2 version; the head is not forwardable then, and nothing may be taken unchecked).
    /// Debug builds check inside `from_maybe_shared_unchecked` too: a head wrongly taken as
    /// checked panics here. Counts that both paths ran.
    #[test]
    fn values_taken_unchecked_are_the_values_checking_gives() {
        let (mut unchecked, mut checked) = (0, 0);
        let mut names = HeaderNames::new();
        for b in (0..=255u8).filter(|b| !matches!(b, b'\r' | b'\n')) {
            for value in [vec![b, b'z'], vec![b'a', b, b'z'], vec![b'a', b]] {
                for (version, fold) in
                    [("HTTP/1.1", false), ("HTTP/1.1", true), ("HTTP/2.0", false)]
                {
                    let mut head = format!("GET / {version}\r\nHost: h\r\nX: ").into_bytes();
                    head.extend_from_slice(&value);
                    if fold {
                        head.extend_from_slice(b"\r\n folded");
                    }
                    head.extend_from_slice(b"\r\nY: v\r\n\r\n");
                    let raw = tokenize(&head);
                    let c = classify_tokens(&raw);
                    let fast = prepare_parts(&raw, c, &mut names);
                    let slow = prepare_as(&raw, true, false, &mut names);
                    assert_eq!(fast.0.malformed, slow.0.malformed, "{head:?}");
                    assert_eq!(
                        fast.1.map(|p| p.headers),
                        slow.1.map(|p| p.headers),
                        "{head:?}"
                    );
                    if values_checked(&raw, c) {
                        unchecked += 1;
                    } else {
                        checked += 1;
                    }
                }
            }
        }
        assert!(unchecked > 500 && checked > 1000, "{unchecked} {checked}");
    }

    /// The native loop unboxes each request's parts with [`unbox_parts`]; the next head made
    /// on the thread is built in that same allocation: one allocation fewer than with nothing
    /// kept (the positive control), and the parts are the head's.
    #[test]
    fn unboxed_parts_leave_their_allocation_to_the_next_head() {
        use crate::rules::tests::allocations::so_far;
        let head = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n".as_slice();
        let raw = tokenize(head);
        let c = classify_tokens(&raw);
        let mut names = HeaderNames::new();
        let mut parts_of = |keep: bool| {
            if !keep {
                let _ = SPARE_PARTS.with(Cell::take);
            }
            let before = so_far();
            let parts = prepare_parts(&raw, c, &mut names).1.expect("forwardable");
            let allocations = so_far() - before;
            let parts = unbox_parts(parts);
            assert_eq!(parts.uri, "/a");
            assert_eq!(parts.headers["host"], "h");
            // Given back, so the next head takes the same maps whether or not the box is kept.
            crate::proxy::recycle::recycle(parts.headers);
            allocations
        };
        parts_of(true);
        let fresh = parts_of(false);
        let kept = parts_of(true);
        assert_eq!(kept + 1, fresh, "kept {kept}, with nothing kept {fresh}");
        // The allocation itself: taken back without allocating; none kept, one is allocated.
        let room = spare_parts();
        let at = room.as_ptr() as usize;
        let parts = unbox_parts(Box::write(room, http::Request::new(()).into_parts().0));
        let before = so_far();
        let again = spare_parts();
        assert_eq!((so_far() - before, again.as_ptr() as usize), (0, at));
        let other = spare_parts();
        assert_eq!(so_far() - before, 1, "nothing kept, yet nothing allocated");
        drop((parts, again, other));
    }

    fn prep(head: &str) -> Prepared {
        prepare(&tokenize(head.as_bytes()))
    }

    /// A line whose value holds a byte `http` refuses is dropped, from the rebuilt head and
    /// from the request parts alike, also when the byte comes with a folded line; every other
    /// byte is kept.
    #[test]
    fn a_value_http_refuses_drops_its_line() {
        // One connection's names for every head: each head checks the kept names too.
        let mut names = HeaderNames::new();
        for b in (0..=255u8).filter(|b| !matches!(b, b'\r' | b'\n')) {
            let valid = HeaderValue::from_bytes(&[b'a', b, b'z']).is_ok();
            let mut plain = b"GET / HTTP/1.1\r\nHost: h\r\nX: a".to_vec();
            plain.extend_from_slice(&[b, b'z']);
            plain.extend_from_slice(b"\r\n\r\n");
            let mut folded = b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n a".to_vec();
            folded.extend_from_slice(&[b, b'z']);
            folded.extend_from_slice(b"\r\n\r\n");
            for head in [plain, folded] {
                let raw = tokenize(&head);
                let rebuilt = prepare(&raw).head;
                let has_x = rebuilt.windows(5).any(|w| w == b"\r\nX: ");
                assert_eq!(has_x, valid, "byte {b:#04x} in {head:?}");
                let (_, parts) = prepare_parts(&raw, classify_tokens(&raw), &mut names);
                let parts = parts.expect("forwardable");
                assert_eq!(parts.headers.contains_key("x"), valid, "byte {b:#04x}");
                assert_eq!(parts.headers.len(), 1 + usize::from(valid));
            }
        }
    }

    /// The `/` taken without a copy is the URI parsing a copy gives (path, query, form).
    #[test]
    fn the_slash_target_is_the_uri_parsing_gives() {
        for raw in [&b"/"[..], b" / ", b"\t/"] {
            let Some(Target::Uri(fast)) = normalize_target(raw, true) else {
                panic!("a URI");
            };
            let parsed = http::Uri::from_maybe_shared(bytes::Bytes::copy_from_slice(b"/")).unwrap();
            assert_eq!(fast, parsed);
            assert_eq!(
                (fast.scheme(), fast.authority(), fast.path(), fast.query()),
                (
                    parsed.scheme(),
                    parsed.authority(),
                    parsed.path(),
                    parsed.query()
                )
            );
            assert_eq!(fast.to_string(), "/");
        }
    }

    #[test]
    fn parts_get_the_target_the_rebuilt_head_has() {
        for target in [
            "/",
            "",
            "/a b?c=d",
            "/x\"y",
            "http://h.test/p?q",
            "*",
            "/caf\u{e9}",
        ] {
            let head = format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n");
            let raw = tokenize(head.as_bytes());
            let rebuilt = prepare(&raw).head;
            let line = rebuilt.split(|&b| b == b'\r').next().unwrap().to_vec();
            let (_, parts) = prepare_parts(&raw, classify_tokens(&raw), &mut HeaderNames::new());
            let parts = parts.expect("forwardable");
            let expected = String::from_utf8(line).unwrap();
            assert_eq!(
                format!("GET {} HTTP/1.1", parts.uri),
                expected,
                "target {target:?}"
            );
        }
    }

    fn rebuilt(head: &str) -> String {
        let p = prep(head);
        assert_eq!(p.malformed, None, "{head:?}");
        String::from_utf8(p.head).expect("utf-8 head")
    }

    #[test]
    fn a_plain_head_is_rebuilt_unchanged_apart_from_the_framing_header_spelling() {
        assert_eq!(
            rebuilt("GET /a?b=1 HTTP/1.1\r\nHost: h\r\nX-App: kept \r\n\r\n"),
            "GET /a?b=1 HTTP/1.1\r\nHost: h\r\nX-App: kept\r\n\r\n"
        );
        assert_eq!(
            rebuilt("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nX: y\r\n\r\n"),
            "POST / HTTP/1.1\r\nHost: h\r\nX: y\r\ncontent-length: 5\r\n\r\n"
        );
    }

    #[test]
    fn an_empty_or_missing_target_becomes_slash() {
        assert_eq!(
            rebuilt("GET  HTTP/1.1\r\nHost: h\r\n\r\n"),
            "GET / HTTP/1.1\r\nHost: h\r\n\r\n"
        );
        assert_eq!(
            rebuilt("GET HTTP/1.1\r\nHost: h\r\n\r\n"),
            "GET / HTTP/1.1\r\nHost: h\r\n\r\n"
        );
    }

    #[test]
    fn targets_are_percent_encoded_where_a_uri_cannot_hold_the_bytes() {
        assert!(rebuilt("GET /a b HTTP/1.1\r\nHost: h\r\n\r\n").starts_with("GET /a%20b HTTP/1.1"));
        assert!(
            rebuilt("GET /a\tb HTTP/1.1\r\nHost: h\r\n\r\n").starts_with("GET /a%09b HTTP/1.1")
        );
        assert!(
            rebuilt("GET  /x HTTP/1.1\r\nHost: h\r\n\r\n").starts_with("GET /x HTTP/1.1"),
            "spaces around the target are not part of it"
        );
        // UTF-8 stays as it is; other high bytes are encoded.
        assert!(
            rebuilt("GET /caf\u{e9} HTTP/1.1\r\nHost: h\r\n\r\n")
                .starts_with("GET /caf\u{e9} HTTP/1.1")
        );
        let p = prepare(&tokenize(b"GET /\xff HTTP/1.1\r\nHost: h\r\n\r\n"));
        assert!(p.head.starts_with(b"GET /%FF HTTP/1.1"), "{:?}", p.head);
        assert!(rebuilt("GET /{a} HTTP/1.1\r\nHost: h\r\n\r\n").starts_with("GET /"));
        assert_eq!(
            prep("GET http://[ HTTP/1.1\r\nHost: h\r\n\r\n").malformed,
            Some("invalid request target")
        );
    }

    #[test]
    fn transfer_encoding_lists_and_parameters_frame_as_chunked() {
        for te in [
            "chunked",
            "Chunked ",
            "\tchunked",
            "identity, chunked",
            "chunked, identity",
            "chunked;foo=bar",
        ] {
            let p = prep(&format!(
                "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: {te}\r\n\r\n"
            ));
            assert_eq!(
                (p.framing, p.unsupported_coding),
                (Framing::Chunked, false),
                "{te:?}"
            );
            assert!(
                String::from_utf8_lossy(&p.head)
                    .ends_with("\r\ntransfer-encoding: chunked\r\n\r\n"),
                "{te:?}"
            );
        }
        let p = prep(
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(p.framing, Framing::Chunked);
        for te in ["gzip", "gzip, chunked", "deflate"] {
            let p = prep(&format!(
                "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: {te}\r\n\r\n"
            ));
            assert!(p.unsupported_coding, "{te:?}");
        }
        assert_eq!(
            prep("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n")
                .malformed,
            Some("chunked applied more than once")
        );
    }

    #[test]
    fn content_length_is_dropped_next_to_chunked_and_deduplicated_otherwise() {
        let p = prep(
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(p.framing, Framing::Chunked);
        assert!(!String::from_utf8_lossy(&p.head).contains("content-length"));
        let h = rebuilt(
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 005\r\n\r\n",
        );
        assert_eq!(h.matches("content-length: 5\r\n").count(), 1, "{h}");
        assert_eq!(
            prep("POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\n").framing,
            Framing::Length(0),
            "an empty Content-Length is 0, as the classifier reads it"
        );
        assert_eq!(
            prep("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .malformed,
            Some("conflicting Content-Length")
        );
        assert_eq!(
            prep("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\n").malformed,
            Some("invalid Content-Length")
        );
    }

    #[test]
    fn folded_lines_are_joined_and_unrepresentable_lines_dropped() {
        assert_eq!(
            rebuilt(
                "GET / HTTP/1.1\r\nHost: h\r\nContent-Type: a\r\n  b\r\nX: 1\r\n\ty\r\nNoColon\r\n: empty\r\nBad Name: v\r\nCtl: a\x01b\r\nTransfer_Encoding: chunked\r\nZ: last\r\n\r\n"
            ),
            "GET / HTTP/1.1\r\nHost: h\r\nContent-Type: a b\r\nX: 1 y\r\nZ: last\r\n\r\n"
        );
    }

    #[test]
    fn versions() {
        assert_eq!(
            prep("GET / HTTP/1.0\r\n\r\n").version,
            Some(Version::Http10)
        );
        assert_eq!(
            prep("GET / HTTP/1.1 \r\nHost: h\r\n\r\n").version,
            Some(Version::Http11)
        );
        for v in ["HTTP/1.2", "HTTP/2.0", "HTTP/3.0", "HTTX/1.1", ""] {
            assert_eq!(prep(&format!("GET / {v}\r\n\r\n")).version, None, "{v:?}");
        }
        // Chunked on HTTP/1.0 is framed as HTTP/1.1.
        let p = prep("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(p.version, Some(Version::Http11));
        assert!(p.head.starts_with(b"POST / HTTP/1.1\r\n"));
    }

    #[test]
    fn host_headers_upgrade_and_trace_are_reported() {
        assert_eq!(prep("GET / HTTP/1.1\r\n\r\n").host_headers, 0);
        assert_eq!(
            prep("GET / HTTP/1.1\r\nhost: a\r\nHOST: b\r\n\r\n").host_headers,
            2
        );
        assert!(prep("GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n").upgrade);
        assert!(prep("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n").upgrade);
        assert!(!prep("GET / HTTP/1.1\r\n\r\n").upgrade);
        assert!(prep("TRACE / HTTP/1.1\r\n\r\n").trace);
        assert_eq!(
            prep(" / HTTP/1.1\r\nHost: h\r\n\r\n").malformed,
            Some("invalid method")
        );
    }
}
