//! HTTP/1 request classification for ALB desync mitigation.
//!
//! ALB classifies every HTTP/1 request head as compliant, acceptable, ambiguous or severe (the
//! scheme of AWS's `http_desync_guardian` crate) and, depending on the listener's
//! [`DesyncMode`], forwards it, forwards it and closes both connections afterwards, or blocks
//! it with 400. We classify the raw bytes of the head *before* hyper parses them, because hyper
//! normalises exactly the things that matter (it drops `Content-Length` when
//! `Transfer-Encoding` is present, trims whitespace), so the parsed request no longer shows them.
//!
//! We do not use `http_desync_guardian` itself: it is a C-ABI oriented crate with process-global
//! metrics and logging hooks. The table below follows its tiers, with one deliberate difference
//! the issue asks for: `Content-Length` together with `Transfer-Encoding` is **severe** (the
//! guardian calls it ambiguous). Everything hyper's own parser would reject is severe too, so a
//! request we classify as forwardable is always one hyper frames exactly as we do.
//!
//! | what | tier | reason |
//! |---|---|---|
//! | method with a non-token byte | severe | `BadMethod` |
//! | request target with CTL/NUL/DEL, missing, or with spaces | severe | `BadUri` |
//! | request target with bytes ≥ 0x80 | ambiguous | `AmbiguousUri` |
//! | version not `HTTP/d.d` | severe | `BadVersion` |
//! | header name empty / with a non-token byte (incl. space before the colon) | severe | `BadHeader` |
//! | header line without a colon | severe | `MissingHeaderColon` |
//! | obsolete line folding (line starts with SP/HTAB) | severe | `MultilineHeader` |
//! | header value with NUL, bare CR, or another CTL except HTAB | severe | `BadHeader` |
//! | header value with bytes ≥ 0x80 (obs-text) | acceptable | `NonCompliantHeader` |
//! | name that spells `Transfer-Encoding`/`Content-Length` with other separators | ambiguous | `SuspiciousHeader` |
//! | `Content-Length` not plain digits (signs, commas, spaces inside, empty, overflow) | severe | `BadContentLength` |
//! | two `Content-Length` with different values | severe | `MultipleContentLength` |
//! | two `Content-Length` with the same value | ambiguous | `DuplicateContentLength` |
//! | `Content-Length` with leading zeros (`007`) | ambiguous | `ContentLengthLeadingZeros` |
//! | both `Content-Length` and `Transfer-Encoding` | severe | `BothTeClPresent` |
//! | more than one `Transfer-Encoding` header | severe | `MultipleTransferEncoding` |
//! | `Transfer-Encoding` with unknown codings or odd whitespace (`xchunked`, `chunked `, tab) | severe | `BadTransferEncoding` |
//! | `Transfer-Encoding` list where `chunked` is not last (`chunked, identity`) | severe | `BadTransferEncoding` |
//! | `Transfer-Encoding` on HTTP/1.0 | severe | `UndefinedTransferEncodingSemantics` |
//! | GET/HEAD with `Transfer-Encoding` | ambiguous | `UndefinedTransferEncodingSemantics` |
//! | GET/HEAD with `Content-Length` > 0 | ambiguous | `UndefinedContentLengthSemantics` |
//! | GET/HEAD with `Content-Length: 0` | acceptable | `GetHeadZeroContentLength` |
//! | lines ending in bare LF | acceptable | `NonCrLfLineTermination` |
//!
//! A valid coding list that is not exactly `chunked` (`gzip`, `gzip, chunked`, `identity`) is
//! not a desync risk but a coding we do not implement: [`HeadAnalysis::unsupported_coding`] makes
//! the server answer 501. A well-formed version other than 1.0/1.1 (`HTTP/3.0`) is compliant
//! here and answered with 505 by the server.
use std::fmt;
use std::str::FromStr;

/// What the listener does with non-compliant requests (ALB attribute
/// `routing.http.desync_mitigation_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DesyncMode {
    /// Forward everything hyper can parse; only count non-compliant requests.
    Monitor,
    /// AWS default: block severe requests, forward ambiguous ones and close both connections.
    #[default]
    Defensive,
    /// Block every request that is not compliant.
    Strictest,
}

/// A `--listener ...,desync=` value that is none of the three modes.
#[derive(Debug, thiserror::Error)]
#[error("unknown desync mode {0:?} (expected monitor, defensive or strictest)")]
pub struct UnknownDesyncMode(pub String);

impl FromStr for DesyncMode {
    type Err = UnknownDesyncMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "monitor" => Ok(Self::Monitor),
            "defensive" => Ok(Self::Defensive),
            "strictest" => Ok(Self::Strictest),
            other => Err(UnknownDesyncMode(other.to_owned())),
        }
    }
}

impl fmt::Display for DesyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Monitor => "monitor",
            Self::Defensive => "defensive",
            Self::Strictest => "strictest",
        })
    }
}

/// How risky a request is, lowest first (ALB's `classification` access-log field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// Complies with RFC 7230.
    Compliant,
    /// Not compliant, but every known server parses it the same way.
    Acceptable,
    /// Not compliant; servers may disagree about it.
    Ambiguous,
    /// A known smuggling vector.
    Severe,
}

impl Tier {
    /// The name ALB logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Compliant => "Compliant",
            Self::Acceptable => "Acceptable",
            Self::Ambiguous => "Ambiguous",
            Self::Severe => "Severe",
        }
    }
}

/// Why a request is not compliant (ALB's `classification_reason` access-log field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs, reason = "each variant is described in the module table")]
pub enum Reason {
    BadMethod,
    BadUri,
    AmbiguousUri,
    BadVersion,
    BadHeader,
    MissingHeaderColon,
    MultilineHeader,
    NonCompliantHeader,
    SuspiciousHeader,
    BadContentLength,
    MultipleContentLength,
    DuplicateContentLength,
    ContentLengthLeadingZeros,
    BothTeClPresent,
    MultipleTransferEncoding,
    BadTransferEncoding,
    UndefinedTransferEncodingSemantics,
    UndefinedContentLengthSemantics,
    GetHeadZeroContentLength,
    NonCrLfLineTermination,
}

impl Reason {
    /// The name logged in `classification_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadMethod => "BadMethod",
            Self::BadUri => "BadUri",
            Self::AmbiguousUri => "AmbiguousUri",
            Self::BadVersion => "BadVersion",
            Self::BadHeader => "BadHeader",
            Self::MissingHeaderColon => "MissingHeaderColon",
            Self::MultilineHeader => "MultilineHeader",
            Self::NonCompliantHeader => "NonCompliantHeader",
            Self::SuspiciousHeader => "SuspiciousHeader",
            Self::BadContentLength => "BadContentLength",
            Self::MultipleContentLength => "MultipleContentLength",
            Self::DuplicateContentLength => "DuplicateContentLength",
            Self::ContentLengthLeadingZeros => "ContentLengthLeadingZeros",
            Self::BothTeClPresent => "BothTeClPresent",
            Self::MultipleTransferEncoding => "MultipleTransferEncoding",
            Self::BadTransferEncoding => "BadTransferEncoding",
            Self::UndefinedTransferEncodingSemantics => "UndefinedTransferEncodingSemantics",
            Self::UndefinedContentLengthSemantics => "UndefinedContentLengthSemantics",
            Self::GetHeadZeroContentLength => "GetHeadZeroContentLength",
            Self::NonCrLfLineTermination => "NonCrLfLineTermination",
        }
    }
}

/// The tier of a request and the reason for the first finding of that tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classification {
    /// The highest tier found.
    pub tier: Tier,
    /// Why; `None` for compliant requests.
    pub reason: Option<Reason>,
}

impl Classification {
    /// A compliant request (also what HTTP/2 requests get: the classifier is HTTP/1 only).
    pub const COMPLIANT: Self = Self {
        tier: Tier::Compliant,
        reason: None,
    };

    fn raise(&mut self, tier: Tier, reason: Reason) {
        if tier > self.tier {
            self.tier = tier;
            self.reason = Some(reason);
        }
    }
}

/// What the listener does with a classified request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mitigation {
    /// Forward normally.
    Forward,
    /// Forward, then close the client and the target connection.
    ForwardThenClose,
    /// Answer 400 and close the client connection; never forwarded.
    Block,
}

impl DesyncMode {
    /// ALB's mitigation table.
    pub fn mitigation(self, tier: Tier) -> Mitigation {
        match (self, tier) {
            (Self::Monitor, _) => Mitigation::Forward,
            (Self::Defensive, Tier::Compliant | Tier::Acceptable) => Mitigation::Forward,
            (Self::Defensive, Tier::Ambiguous) => Mitigation::ForwardThenClose,
            (Self::Defensive, Tier::Severe) => Mitigation::Block,
            (Self::Strictest, Tier::Compliant) => Mitigation::Forward,
            (Self::Strictest, _) => Mitigation::Block,
        }
    }
}

/// How the request body is delimited, exactly as hyper's HTTP/1 parser will decide it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// hyper will reject the head; no body can be delimited.
    Invalid,
}

/// Everything the server needs to know about a raw HTTP/1 request head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadAnalysis {
    /// The desync classification.
    pub classification: Classification,
    /// How the body that follows is delimited.
    pub framing: Framing,
    /// `(major, minor)` of a well-formed `HTTP/d.d` version; `None` if malformed.
    pub version: Option<(u8, u8)>,
    /// `Transfer-Encoding` is a valid coding list other than exactly `chunked` (answer 501).
    pub unsupported_coding: bool,
    /// `Upgrade` header present or method CONNECT: the connection may be taken over.
    pub upgrade: bool,
    /// How many `Host` header lines the head has (RFC 9112 §3.2: an HTTP/1.1 request needs
    /// exactly one, else 400; the server enforces that whatever the desync mode).
    pub host_headers: usize,
}

const TE_NAME: &[u8] = b"transfer-encoding";
const CL_NAME: &[u8] = b"content-length";
/// Transfer codings RFC 7230 registers (`is_valid_te` in http_desync_guardian).
const KNOWN_CODINGS: [&[u8]; 7] = [
    b"chunked",
    b"compress",
    b"deflate",
    b"gzip",
    b"identity",
    b"x-gzip",
    b"x-compress",
];

/// tchar (RFC 7230 §3.2.6).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Letters of a header name, lower-cased, ignoring everything else; used to spot names that
/// imitate `Transfer-Encoding`/`Content-Length` (`Transfer_Encoding`, `Content-Length.`).
fn same_letters(name: &[u8], target: &[u8]) -> bool {
    let mut letters = name
        .iter()
        .filter(|b| b.is_ascii_alphabetic())
        .map(u8::to_ascii_lowercase);
    let mut want = target.iter().copied().filter(u8::is_ascii_alphabetic);
    loop {
        match (letters.next(), want.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// Plain `1*DIGIT` without overflow, as hyper requires (`from_digits`).
fn parse_digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Splits `head` into lines at LF, reporting whether each ended in CRLF.
fn lines(head: &[u8]) -> impl Iterator<Item = (&[u8], bool)> {
    head.split(|&b| b == b'\n').map(|line| match line {
        [rest @ .., b'\r'] => (rest, true),
        _ => (line, false),
    })
}

/// Classifies one raw HTTP/1 request head (request line through the empty line; leading empty
/// lines allowed) and works out its framing.
pub fn analyze(head: &[u8]) -> HeadAnalysis {
    let mut c = Classification::COMPLIANT;
    let mut it = lines(head).skip_while(|(l, _)| l.is_empty()).peekable();

    let (request_line, crlf) = it.next().unwrap_or((&[][..], true));
    if !crlf {
        c.raise(Tier::Acceptable, Reason::NonCrLfLineTermination);
    }
    let mut parts = request_line.split(|&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next();
    let version_token = parts.next();
    let extra = parts.next();
    if method.is_empty() || !method.iter().copied().all(is_tchar) {
        c.raise(Tier::Severe, Reason::BadMethod);
    }
    match target {
        None | Some([]) => c.raise(Tier::Severe, Reason::BadUri),
        Some(t) => {
            if extra.is_some() || t.iter().any(|&b| b < 0x21 || b == 0x7f) {
                c.raise(Tier::Severe, Reason::BadUri);
            } else if t.iter().any(|&b| b >= 0x80) {
                c.raise(Tier::Ambiguous, Reason::AmbiguousUri);
            }
        }
    }
    let version = match version_token {
        Some([b'H', b'T', b'T', b'P', b'/', major, b'.', minor])
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Some((major - b'0', minor - b'0'))
        }
        _ => {
            c.raise(Tier::Severe, Reason::BadVersion);
            None
        }
    };
    let http10 = version == Some((1, 0));
    let body_less_method = method == b"GET" || method == b"HEAD";

    let mut content_length: Option<u64> = None;
    let mut cl_count = 0usize;
    let mut te_values: Vec<&[u8]> = Vec::new();
    let mut upgrade = method == b"CONNECT";
    let mut host_headers = 0usize;

    for (line, crlf) in it {
        if line.is_empty() {
            break;
        }
        if !crlf {
            c.raise(Tier::Acceptable, Reason::NonCrLfLineTermination);
        }
        if matches!(line.first(), Some(b' ' | b'\t')) {
            c.raise(Tier::Severe, Reason::MultilineHeader);
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            c.raise(Tier::Severe, Reason::MissingHeaderColon);
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().copied().all(is_tchar) {
            c.raise(Tier::Severe, Reason::BadHeader);
            continue;
        }
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            c.raise(Tier::Severe, Reason::BadHeader);
            continue;
        }
        if value.iter().any(|&b| b >= 0x80) {
            c.raise(Tier::Acceptable, Reason::NonCompliantHeader);
        }
        if name.eq_ignore_ascii_case(TE_NAME) {
            te_values.push(value);
        } else if name.eq_ignore_ascii_case(CL_NAME) {
            cl_count += 1;
            let v = trim_ows(value);
            match parse_digits(v) {
                None => c.raise(Tier::Severe, Reason::BadContentLength),
                Some(n) => {
                    if v.len() > 1 && v[0] == b'0' {
                        c.raise(Tier::Ambiguous, Reason::ContentLengthLeadingZeros);
                    }
                    match content_length {
                        Some(prev) if prev != n => {
                            c.raise(Tier::Severe, Reason::MultipleContentLength);
                        }
                        Some(_) => c.raise(Tier::Ambiguous, Reason::DuplicateContentLength),
                        None => content_length = Some(n),
                    }
                }
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        } else if name.eq_ignore_ascii_case(b"host") {
            host_headers += 1;
        } else if same_letters(name, TE_NAME) || same_letters(name, CL_NAME) {
            c.raise(Tier::Ambiguous, Reason::SuspiciousHeader);
        }
    }

    // Transfer-Encoding: exactly `chunked` is the only framing we forward; a valid list of
    // registered codings is a 501; anything else is an obfuscation attempt.
    let mut unsupported_coding = false;
    if let Some(&last) = te_values.last() {
        if http10 {
            c.raise(Tier::Severe, Reason::UndefinedTransferEncodingSemantics);
        }
        if te_values.len() > 1 {
            c.raise(Tier::Severe, Reason::MultipleTransferEncoding);
        }
        if cl_count > 0 {
            c.raise(Tier::Severe, Reason::BothTeClPresent);
        }
        let leading = last.iter().take_while(|&&b| b == b' ').count();
        let value = &last[leading..];
        let codings: Vec<&[u8]> = value
            .split(|&b| b == b',')
            .enumerate()
            .map(|(i, s)| {
                if i > 0 {
                    s.strip_prefix(b" ").unwrap_or(s)
                } else {
                    s
                }
            })
            .collect();
        let well_formed = codings.iter().all(|k| {
            KNOWN_CODINGS
                .iter()
                .any(|known| k.eq_ignore_ascii_case(known))
        });
        let chunked_positions = codings
            .iter()
            .filter(|k| k.eq_ignore_ascii_case(b"chunked"))
            .count();
        let ends_chunked = codings
            .last()
            .is_some_and(|k| k.eq_ignore_ascii_case(b"chunked"));
        if !well_formed || (chunked_positions > 0 && !ends_chunked) || chunked_positions > 1 {
            c.raise(Tier::Severe, Reason::BadTransferEncoding);
        } else if !value.eq_ignore_ascii_case(b"chunked") {
            unsupported_coding = true;
        }
        if body_less_method {
            c.raise(Tier::Ambiguous, Reason::UndefinedTransferEncodingSemantics);
        }
    } else if body_less_method {
        match content_length {
            Some(0) => c.raise(Tier::Acceptable, Reason::GetHeadZeroContentLength),
            Some(_) => c.raise(Tier::Ambiguous, Reason::UndefinedContentLengthSemantics),
            None => {}
        }
    }

    HeadAnalysis {
        classification: c,
        framing: hyper_framing(&te_values, content_length, cl_count, c.tier),
        version,
        unsupported_coding,
        upgrade,
        host_headers,
    }
}

/// The framing hyper 1's server parser chooses (`proto::h1::role::Server::parse`): the last
/// `Transfer-Encoding` decides (its last coding must be `chunked`, else hyper rejects), then
/// `Content-Length`. Only meaningful when hyper accepts the head; a severe head in `monitor`
/// mode is passed to hyper, which either rejects it or frames it this way.
fn hyper_framing(
    te_values: &[&[u8]],
    content_length: Option<u64>,
    cl_count: usize,
    tier: Tier,
) -> Framing {
    if let Some(last) = te_values.last() {
        let last_coding = last.rsplit(|&b| b == b',').next().unwrap_or_default();
        return if trim_ows(last_coding).eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked
        } else {
            Framing::Invalid
        };
    }
    match content_length {
        Some(n) => Framing::Length(n),
        None if cl_count > 0 || tier == Tier::Severe => Framing::Invalid,
        None => Framing::Empty,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(head: &str) -> (Tier, Option<Reason>) {
        let a = analyze(head.as_bytes());
        (a.classification.tier, a.classification.reason)
    }

    #[test]
    fn classification_table() {
        use Reason::*;
        use Tier::*;
        let cases: &[(&str, Tier, Option<Reason>)] = &[
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", Compliant, None),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
                Compliant,
                None,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Compliant,
                None,
            ),
            (
                "GET / HTTP/1.1\nHost: a\n\n",
                Acceptable,
                Some(NonCrLfLineTermination),
            ),
            (
                "GET / HTTP/1.1\r\nX: caf\u{e9}\r\n\r\n",
                Acceptable,
                Some(NonCompliantHeader),
            ),
            (
                "GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                Acceptable,
                Some(GetHeadZeroContentLength),
            ),
            (
                "GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\n",
                Ambiguous,
                Some(UndefinedContentLengthSemantics),
            ),
            (
                "HEAD / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Ambiguous,
                Some(UndefinedTransferEncodingSemantics),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 005\r\n\r\n",
                Ambiguous,
                Some(ContentLengthLeadingZeros),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                Ambiguous,
                Some(DuplicateContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer_Encoding: chunked\r\n\r\n",
                Ambiguous,
                Some(SuspiciousHeader),
            ),
            (
                "GET /caf\u{e9} HTTP/1.1\r\n\r\n",
                Ambiguous,
                Some(AmbiguousUri),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                Severe,
                Some(BothTeClPresent),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                Severe,
                Some(MultipleContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: five\r\n\r\n",
                Severe,
                Some(BadContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
                Severe,
                Some(BadContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
                Severe,
                Some(BadContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked \r\n\r\n",
                Severe,
                Some(BadTransferEncoding),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
                Severe,
                Some(BadTransferEncoding),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
                Severe,
                Some(BadTransferEncoding),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding:\tchunked\r\n\r\n",
                Severe,
                Some(BadTransferEncoding),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                Severe,
                Some(MultipleTransferEncoding),
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                Severe,
                Some(UndefinedTransferEncodingSemantics),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",
                Severe,
                Some(BadHeader),
            ),
            ("GET / HTTP/1.1\r\nX\0Y: 1\r\n\r\n", Severe, Some(BadHeader)),
            ("GET / HTTP/1.1\r\nX: a\0b\r\n\r\n", Severe, Some(BadHeader)),
            ("GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", Severe, Some(BadHeader)),
            (
                "GET / HTTP/1.1\r\nNoColon\r\n\r\n",
                Severe,
                Some(MissingHeaderColon),
            ),
            (
                "GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
                Severe,
                Some(MultilineHeader),
            ),
            ("G(T / HTTP/1.1\r\n\r\n", Severe, Some(BadMethod)),
            ("GET /a b HTTP/1.1\r\n\r\n", Severe, Some(BadUri)),
            ("GET HTTP/1.1\r\n\r\n", Severe, Some(BadVersion)),
            ("GET / HTTX/1.1\r\n\r\n", Severe, Some(BadVersion)),
        ];
        for (head, tier, reason) in cases {
            assert_eq!(classify(head), (*tier, *reason), "{head:?}");
        }
    }

    #[test]
    fn framing_mirrors_hyper() {
        let f = |h: &str| analyze(h.as_bytes()).framing;
        assert_eq!(f("GET / HTTP/1.1\r\n\r\n"), Framing::Empty);
        assert_eq!(
            f("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n"),
            Framing::Length(12)
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\ntransfer-encoding: Chunked\r\n\r\n"),
            Framing::Chunked
        );
        // hyper drops Content-Length when Transfer-Encoding is present.
        assert_eq!(
            f("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Framing::Chunked
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Framing::Invalid
        );
    }

    #[test]
    fn valid_but_unimplemented_codings_are_501_not_desync() {
        for te in ["gzip", "gzip, chunked", "identity", "GZIP"] {
            let head = format!("POST / HTTP/1.1\r\nTransfer-Encoding: {te}\r\n\r\n");
            let a = analyze(head.as_bytes());
            assert!(a.unsupported_coding, "{te}");
            assert_eq!(a.classification.tier, Tier::Compliant, "{te}");
        }
        let a = analyze(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(!a.unsupported_coding);
    }

    #[test]
    fn versions_are_parsed_for_505() {
        let v = |h: &str| analyze(h.as_bytes()).version;
        assert_eq!(v("GET / HTTP/1.1\r\n\r\n"), Some((1, 1)));
        assert_eq!(v("GET / HTTP/1.0\r\n\r\n"), Some((1, 0)));
        assert_eq!(v("GET / HTTP/3.0\r\n\r\n"), Some((3, 0)));
        assert_eq!(v("GET / HTTP/11\r\n\r\n"), None);
    }

    #[test]
    fn host_headers_are_counted() {
        let n = |h: &str| analyze(h.as_bytes()).host_headers;
        assert_eq!(n("GET / HTTP/1.1\r\n\r\n"), 0);
        assert_eq!(n("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), 1);
        assert_eq!(n("GET / HTTP/1.1\r\nhost: a\r\nHOST: b\r\n\r\n"), 2);
    }

    #[test]
    fn upgrade_is_detected() {
        assert!(analyze(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n").upgrade);
        assert!(analyze(b"CONNECT a:443 HTTP/1.1\r\n\r\n").upgrade);
        assert!(!analyze(b"GET / HTTP/1.1\r\n\r\n").upgrade);
    }

    #[test]
    fn mitigation_follows_alb_table() {
        use Mitigation::*;
        use Tier::*;
        let table = [
            (DesyncMode::Monitor, Severe, Forward),
            (DesyncMode::Defensive, Acceptable, Forward),
            (DesyncMode::Defensive, Ambiguous, ForwardThenClose),
            (DesyncMode::Defensive, Severe, Block),
            (DesyncMode::Strictest, Compliant, Forward),
            (DesyncMode::Strictest, Acceptable, Block),
        ];
        for (mode, tier, want) in table {
            assert_eq!(mode.mitigation(tier), want, "{mode} {tier:?}");
        }
    }

    #[test]
    fn desync_mode_parses_and_rejects_unknown() {
        assert_eq!(
            "strictest".parse::<DesyncMode>().ok(),
            Some(DesyncMode::Strictest)
        );
        assert!("lenient".parse::<DesyncMode>().is_err());
        assert_eq!(DesyncMode::default(), DesyncMode::Defensive);
    }
}
