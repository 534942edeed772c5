//! HTTP/1 request classification for ALB desync mitigation.
//!
//! ALB classifies every HTTP/1 request head as compliant, acceptable, ambiguous or severe with
//! AWS's `http_desync_guardian` and, depending on the listener's [`DesyncMode`], forwards it,
//! forwards it and closes both connections afterwards, or blocks it with 400. We classify the
//! raw bytes of the head *before* hyper parses them, because hyper normalises exactly the things
//! that matter (it drops `Content-Length` when `Transfer-Encoding` is present, trims
//! whitespace), so the parsed request no longer shows them.
//!
//! [`classify`] follows `http_desync_guardian` 0.1.3 rule for rule (tokenisation of the request
//! line and of header lines included), so a request gets the tier ALB gives it; the
//! `desync_oracle` test compares the two on a table and on generated requests. We do not call
//! the crate on the request path: it keeps process-global metrics and rate-limited logging, and
//! we need its tokenisation (which header lines exist, which are folded) to build what we
//! forward (`server/head.rs`). Its rules, with the reason names ALB logs:
//!
//! | what | tier | reason |
//! |---|---|---|
//! | method with a non-token byte | severe | `BadMethod` |
//! | request target with NUL, CR or LF | severe | `BadUri` |
//! | request target with another control byte or DEL | ambiguous | `AmbiguousUri` |
//! | request target with a space | acceptable | `SpaceInUri` |
//! | no request target (`GET HTTP/1.1`) | ambiguous | `MissingUri` |
//! | version not `HTTP/1.d` | severe | `BadVersion` |
//! | `HTTP/1.2`–`HTTP/1.9`, `HTTP/0.9` or none, spaces around it | acceptable | `NonCompliantVersion` |
//! | version sorting at or after `HTTP/2` (byte order) | compliant: not analysed | – |
//! | header name or value with NUL, CR or LF | severe | `BadHeader` |
//! | header name with another non-token byte, value with a control byte | acceptable | `NonCompliantHeader` |
//! | empty header name (`: x`) | ambiguous | `EmptyHeader` |
//! | line without a colon | ambiguous | `MissingHeaderColon` |
//! | folded line (starts with SP/HTAB), except in `Content-Type` | ambiguous | `MultilineHeader` |
//! | name that spells `Transfer-Encoding`/`Content-Length` with other separators or look-alike letters | ambiguous | `SuspiciousHeader` |
//! | `Content-Length` not digits after trimming (an empty value counts as 0) or overflowing | severe | `BadContentLength` |
//! | two `Content-Length` with different values | severe | `MultipleContentLength` |
//! | two `Content-Length` with the same value | ambiguous | `DuplicateContentLength` |
//! | `Transfer-Encoding` coding other than chunked, compress, deflate, gzip, identity (parameters allowed) | severe | `BadTransferEncoding` |
//! | `chunked` twice in a row (one header or several) | severe | `MultipleTransferEncodingChunked` |
//! | both `Content-Length` and `Transfer-Encoding` | ambiguous | `BothTeClPresent` |
//! | `Transfer-Encoding` on HTTP/1.0 or older (`Content-Length` on 0.9) | ambiguous | `UndefinedTransferEncodingSemantics` (`…ContentLength…`) |
//! | GET/HEAD with `Transfer-Encoding` / `Content-Length` > 0 | ambiguous | `Undefined…Semantics` |
//! | GET/HEAD with `Content-Length: 0` | acceptable | `GetHeadZeroContentLength` |
//! | lines ending in bare LF | acceptable | `NonCrLfLineTermination` |
//!
//! The highest tier wins; its reason is the first finding of that tier, in the guardian's order
//! (request line and header lines as parsed, then per header, then `Transfer-Encoding` and
//! `Content-Length`, method, version, target). Whether a request the tier lets through can be
//! forwarded, and how, is decided in `server/head.rs`: an unsupported coding is a 501, an
//! unsupported version a 505, a head hyper cannot represent a 400.
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

/// Why a request is not compliant (ALB's `classification_reason` access-log field): the
/// reasons of `http_desync_guardian`, described in the module table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs, reason = "each variant is described in the module table")]
pub enum Reason {
    EmptyHeader,
    SuspiciousHeader,
    NonCompliantHeader,
    BadHeader,
    AmbiguousUri,
    SpaceInUri,
    BadUri,
    NonCompliantVersion,
    BadVersion,
    GetHeadZeroContentLength,
    UndefinedContentLengthSemantics,
    MultipleContentLength,
    DuplicateContentLength,
    BadContentLength,
    UndefinedTransferEncodingSemantics,
    MultipleTransferEncodingChunked,
    BadTransferEncoding,
    BothTeClPresent,
    BadMethod,
    NonCrLfLineTermination,
    MultilineHeader,
    PartialHeaderLine,
    MissingLastEmptyLine,
    MissingHeaderColon,
    MissingUri,
}

impl Reason {
    /// The name logged in `classification_reason` (the variant's name, as the guardian's).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EmptyHeader => "EmptyHeader",
            Self::SuspiciousHeader => "SuspiciousHeader",
            Self::NonCompliantHeader => "NonCompliantHeader",
            Self::BadHeader => "BadHeader",
            Self::AmbiguousUri => "AmbiguousUri",
            Self::SpaceInUri => "SpaceInUri",
            Self::BadUri => "BadUri",
            Self::NonCompliantVersion => "NonCompliantVersion",
            Self::BadVersion => "BadVersion",
            Self::GetHeadZeroContentLength => "GetHeadZeroContentLength",
            Self::UndefinedContentLengthSemantics => "UndefinedContentLengthSemantics",
            Self::MultipleContentLength => "MultipleContentLength",
            Self::DuplicateContentLength => "DuplicateContentLength",
            Self::BadContentLength => "BadContentLength",
            Self::UndefinedTransferEncodingSemantics => "UndefinedTransferEncodingSemantics",
            Self::MultipleTransferEncodingChunked => "MultipleTransferEncodingChunked",
            Self::BadTransferEncoding => "BadTransferEncoding",
            Self::BothTeClPresent => "BothTeClPresent",
            Self::BadMethod => "BadMethod",
            Self::NonCrLfLineTermination => "NonCrLfLineTermination",
            Self::MultilineHeader => "MultilineHeader",
            Self::PartialHeaderLine => "PartialHeaderLine",
            Self::MissingLastEmptyLine => "MissingLastEmptyLine",
            Self::MissingHeaderColon => "MissingHeaderColon",
            Self::MissingUri => "MissingUri",
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

const TE_NAME: &[u8] = b"transfer-encoding";
const CL_NAME: &[u8] = b"content-length";
/// The transfer codings the guardian knows (`VALID_TE`); anything else is `BadTransferEncoding`.
const KNOWN_CODINGS: [&[u8]; 5] = [b"chunked", b"compress", b"deflate", b"gzip", b"identity"];

/// tchar (RFC 9110 §5.6.2), the definition [`TCHAR`] is built from.
const fn is_tchar_by_definition(b: u8) -> bool {
    const OTHERS: &[u8] = b"!#$%&'*+-.^_`|~";
    if b.is_ascii_alphanumeric() {
        return true;
    }
    let mut i = 0;
    while i < OTHERS.len() {
        if OTHERS[i] == b {
            return true;
        }
        i += 1;
    }
    false
}

/// [`is_tchar_by_definition`] for every byte, so that the test is one load: searching the
/// 15 punctuation tchars for every byte of every header name was most of the classifier's cost.
const TCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = is_tchar_by_definition(b as u8);
        b += 1;
    }
    table
};

/// tchar (RFC 9110 §5.6.2).
pub(crate) fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// Bytes that are never acceptable in a header or target: NUL, CR, LF.
fn is_bad_char(b: u8) -> bool {
    matches!(b, 0 | b'\r' | b'\n')
}

/// Header value bytes RFC 9110 allows: VCHAR, obs-text, SP, HTAB.
fn is_value_char(b: u8) -> bool {
    (b >= 0x20) & (b != 0x7f) | (b == b'\t')
}

/// Trims SP and HTAB on both sides (OWS).
pub(crate) fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// How close a header name is to `Transfer-Encoding` or `Content-Length`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Similarity {
    /// The same name, ignoring case.
    Identical,
    /// The same letters with other separators, padding or look-alike letters
    /// (`Transfer_Encoding`, `Content-Length `, `Transfer-Encodıng`).
    SameLetters,
    /// Another name.
    Distant,
}

fn next_alphanumeric(v: &[u8], mut i: usize) -> usize {
    while i < v.len() && !v[i].is_ascii_alphanumeric() {
        i += 1;
    }
    i
}

fn next_above_space(v: &[u8], mut i: usize) -> usize {
    while i < v.len() && v[i] <= b' ' {
        i += 1;
    }
    i
}

/// Whether `header[index..]` starts with the letter `want`, counting the UTF-8 letters that
/// upper-case to an ASCII letter of the two names (ſ → S, ı → I); returns where the next
/// character starts.
fn same_char(want: u8, header: &[u8], index: usize) -> (bool, usize) {
    const LOOK_ALIKES: [(u8, u8, u8); 2] = [(b's', 0xc5, 0xbf), (b'i', 0xc4, 0xb1)];
    let got = header[index];
    if want == got.to_ascii_lowercase() {
        return (true, index + 1);
    }
    if header.len() > index + 1 && LOOK_ALIKES.contains(&(want, got, header[index + 1])) {
        return (true, index + 2);
    }
    (false, index + 1)
}

/// `determine_similarity` of the guardian: compares the letters of `header` with those of
/// `important` (lower-case letters and `-`), skipping other bytes.
pub(crate) fn similarity(important: &[u8], header: &[u8]) -> Similarity {
    if header.len() < important.len() {
        return Similarity::Distant;
    }
    let mut at = next_alphanumeric(header, 0);
    let mut identical = at == 0 && important.len() == header.len();
    for &c in important {
        if at == header.len() {
            return Similarity::Distant;
        }
        let delimiter = c == b'-';
        let (same, next) = same_char(c, header, at);
        if !same {
            if !delimiter {
                break;
            }
            identical = false;
        }
        at = if delimiter {
            next_alphanumeric(header, next)
        } else {
            next_above_space(header, next)
        };
    }
    let exhausted = at == header.len();
    if exhausted && identical {
        Similarity::Identical
    } else if exhausted || next_alphanumeric(header, at) == header.len() {
        Similarity::SameLetters
    } else {
        Similarity::Distant
    }
}

/// Similarity to `Transfer-Encoding`, then (if distant) to `Content-Length`.
pub(crate) fn framing_similarity(name: &[u8]) -> (Similarity, Similarity) {
    let te = similarity(TE_NAME, name);
    let cl = if te == Similarity::Distant {
        similarity(CL_NAME, name)
    } else {
        Similarity::Distant
    };
    (te, cl)
}

/// `Content-Length` as the guardian reads it: digits after trimming OWS, an empty value is 0,
/// no overflow.
pub(crate) fn parse_content_length(value: &[u8]) -> Option<u64> {
    trim_ows(value).iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// One `Transfer-Encoding` list item, trimmed and without parameters (`gzip;q=1` → `gzip`),
/// if it is a coding the guardian knows.
pub(crate) fn known_coding(item: &[u8]) -> Option<&'static [u8]> {
    let item = trim_ows(item);
    let coding = trim_ows(item.split(|&b| b == b';').next().unwrap_or_default());
    KNOWN_CODINGS
        .iter()
        .copied()
        .find(|known| known.eq_ignore_ascii_case(coding))
}

/// A window on the head, as the guardian's `RequestBuffer` (the same index arithmetic, so the
/// same bytes end up in the method, target, version and header tokens).
#[derive(Clone, Copy)]
struct Window<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Window<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            end: buf.len(),
        }
    }

    fn is_done(&self) -> bool {
        self.pos >= self.end
    }

    /// An expected delimiter was missing.
    fn is_partial(&self) -> bool {
        self.pos > self.end
    }

    fn token(&self) -> &'a [u8] {
        if self.pos < self.end {
            &self.buf[self.pos..self.end]
        } else {
            &[]
        }
    }

    fn starts_with_whitespace(&self) -> bool {
        self.pos < self.end && matches!(self.buf[self.pos], b' ' | b'\t')
    }

    /// Drops a final CR; false if there was none (the line ended in a bare LF).
    fn trim_last_cr(&mut self) -> bool {
        if self.end > self.pos && self.buf[self.end - 1] == b'\r' {
            self.end -= 1;
            true
        } else {
            false
        }
    }

    /// The token up to `delimiter` (excluded); the window moves past the delimiter.
    fn next_token(&mut self, delimiter: u8) -> Self {
        let at = if self.pos < self.end {
            memchr::memchr(delimiter, &self.buf[self.pos..self.end])
                .map_or(self.end, |k| self.pos + k)
        } else {
            self.pos
        };
        let token = Self {
            buf: self.buf,
            pos: self.pos,
            end: at,
        };
        self.pos = at + 1;
        token
    }

    /// The last token after `delimiter`, ignoring non-token bytes at the very end; the window
    /// ends before the delimiter.
    fn last_token(&mut self, delimiter: u8) -> Self {
        let mut at = if self.end > self.pos {
            self.end - 1
        } else {
            self.pos
        };
        let mut skip_non_tchars = true;
        while self.pos < at && (self.buf[at] != delimiter || skip_non_tchars) {
            skip_non_tchars &= !is_tchar(self.buf[at]);
            at -= 1;
        }
        if at >= self.pos && at < self.end {
            let begin = if self.buf[at] == delimiter {
                at + 1
            } else {
                at
            };
            let token = Self {
                buf: self.buf,
                pos: begin,
                end: self.end,
            };
            self.end = begin.saturating_sub(1);
            token
        } else {
            // No token: a partial window.
            Self {
                buf: self.buf,
                pos: 1,
                end: 0,
            }
        }
    }
}

/// One header line as tokenised: name and value (value not trimmed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RawHeader<'a> {
    /// The whole line (without its line end).
    pub line: &'a [u8],
    /// The name (for a folded line: the name of the header it continues).
    pub name: &'a [u8],
    /// Everything after the first colon (for a folded line: the line up to a colon).
    pub value: &'a [u8],
    /// A folded line (starting with SP/HTAB, without a colon, or inside `Content-Type`) that
    /// continues the previous header.
    pub continuation: bool,
    /// The line had no colon.
    pub no_colon: bool,
}

/// A request head tokenised the way the guardian does it.
#[derive(Clone, Debug)]
pub(crate) struct RawHead<'a> {
    /// The method token (may be empty).
    pub method: &'a [u8],
    /// The request target (may be empty or contain spaces).
    pub target: &'a [u8],
    /// The version token as written (may be empty or padded).
    pub version: &'a [u8],
    /// Header lines in order.
    pub headers: Vec<RawHeader<'a>>,
    /// What tokenising found (line endings, missing target, missing colons, folding).
    findings: Classification,
}

/// Tokenises `head` (request line through the empty line) as the guardian's raw parser does.
pub(crate) fn tokenize(head: &[u8]) -> RawHead<'_> {
    // (memchr's count: the plain filter-and-count loop compiled to 19 instructions per 4 bytes.)
    tokenize_lines(head, memchr::memchr_iter(b'\n', head).count())
}

/// [`tokenize`] when the caller knows how many LFs `head` holds (the sniffer counted them
/// while collecting it); the count only sizes the header list.
pub(crate) fn tokenize_lines(head: &[u8], lines: usize) -> RawHead<'_> {
    let mut findings = Classification::COMPLIANT;
    let mut buffer = Window::new(head);

    let mut line = buffer.next_token(b'\n');
    if !line.trim_last_cr() {
        findings.raise(Tier::Acceptable, Reason::NonCrLfLineTermination);
    }
    let method = line.next_token(b' ');
    let mut version = line.last_token(b' ');
    let mut target = line;
    if (target.is_partial() && version.token().starts_with(b"HTTP/1."))
        || (version.is_done() && target.is_done())
    {
        findings.raise(Tier::Ambiguous, Reason::MissingUri);
    } else if target.is_partial() {
        // No version: HTTP/0.9.
        target = version;
        version = Window::new(&[]);
    }

    // Sized once for every line the head has (the request line's slot is spare): grown from
    // empty, a browser's dozen header lines cost three allocations instead of one.
    let mut headers = Vec::with_capacity(lines);
    let mut folding_into: Option<&[u8]> = None;
    let mut in_content_type = false;
    loop {
        let mut line = buffer.next_token(b'\n');
        if !line.trim_last_cr() {
            findings.raise(Tier::Acceptable, Reason::NonCrLfLineTermination);
        }
        if line.is_done() {
            break;
        }
        let whole = line.token();
        let folded = line.starts_with_whitespace();
        let first = line.next_token(b':').token();
        let no_colon = line.is_partial();
        if !folded && !no_colon {
            in_content_type = first.eq_ignore_ascii_case(b"content-type");
            folding_into = Some(first);
        }
        let header = match folding_into {
            Some(name) if folded && (in_content_type || no_colon) => RawHeader {
                line: whole,
                name,
                value: first,
                continuation: true,
                no_colon,
            },
            _ => RawHeader {
                line: whole,
                name: first,
                value: line.token(),
                continuation: false,
                no_colon,
            },
        };
        headers.push(header);
        if !folded && no_colon {
            findings.raise(Tier::Ambiguous, Reason::MissingHeaderColon);
        }
        if folded && !in_content_type {
            findings.raise(Tier::Ambiguous, Reason::MultilineHeader);
        }
        if buffer.is_partial() {
            findings.raise(Tier::Ambiguous, Reason::PartialHeaderLine);
            break;
        } else if buffer.is_done() {
            findings.raise(Tier::Ambiguous, Reason::MissingLastEmptyLine);
            break;
        }
    }
    RawHead {
        method: method.token(),
        target: target.token(),
        version: version.token(),
        headers,
        findings,
    }
}

/// How a header name and value look on their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum HeaderTier {
    Compliant,
    NonCompliant,
    Bad,
}

fn header_tier(name: &[u8], value: &[u8]) -> HeaderTier {
    // The common case first: every byte allowed. The value's test does not stop early, so it
    // is vectorised (values are most of a head's bytes).
    if name.iter().all(|&b| is_tchar(b)) && value.iter().fold(true, |ok, &b| ok & is_value_char(b))
    {
        return HeaderTier::Compliant;
    }
    header_tier_by_bytes(name, value)
}

/// [`header_tier`] without its fast path.
fn header_tier_by_bytes(name: &[u8], value: &[u8]) -> HeaderTier {
    let part = |bytes: &[u8], ok: fn(u8) -> bool| {
        let mut tier = HeaderTier::Compliant;
        for &b in bytes {
            if !ok(b) {
                if is_bad_char(b) {
                    return HeaderTier::Bad;
                }
                tier = HeaderTier::NonCompliant;
            }
        }
        tier
    };
    part(name, is_tchar).max(part(value, is_value_char))
}

/// Classifies one raw HTTP/1 request head (request line through the empty line).
pub fn classify(head: &[u8]) -> Classification {
    classify_tokens(&tokenize(head))
}

/// [`classify`] on an already tokenised head.
pub(crate) fn classify_tokens(raw: &RawHead<'_>) -> Classification {
    // The guardian leaves versions from HTTP/2 on (in byte order) to the HTTP/2 stack and
    // calls them compliant, whatever else the head holds.
    if raw.version >= b"HTTP/2".as_slice() {
        return Classification::COMPLIANT;
    }
    let version: &[u8] = if trim_ows(raw.version).is_empty() {
        b"HTTP/0.9"
    } else {
        raw.version
    };
    let mut c = raw.findings;
    let mut te = Vec::new();
    let mut cl = Vec::new();
    for (i, h) in raw.headers.iter().enumerate() {
        let (te_sim, cl_sim) = framing_similarity(h.name);
        let essential = te_sim == Similarity::Identical || cl_sim == Similarity::Identical;
        let tier = header_tier(h.name, h.value);
        match tier {
            HeaderTier::Bad => c.raise(Tier::Severe, Reason::BadHeader),
            HeaderTier::NonCompliant => c.raise(Tier::Acceptable, Reason::NonCompliantHeader),
            HeaderTier::Compliant => {}
        }
        let name = trim_ows(h.name);
        if name.is_empty() || name[0] == b':' {
            c.raise(Tier::Ambiguous, Reason::EmptyHeader);
        } else if !essential && tier != HeaderTier::Bad {
            // A look-alike still counts as the header it imitates below, as in the guardian.
            if te_sim == Similarity::SameLetters {
                te.push(i);
                c.raise(Tier::Ambiguous, Reason::SuspiciousHeader);
            } else if cl_sim == Similarity::SameLetters {
                cl.push(i);
                c.raise(Tier::Ambiguous, Reason::SuspiciousHeader);
            }
        } else if te_sim == Similarity::Identical {
            te.push(i);
        } else if cl_sim == Similarity::Identical {
            cl.push(i);
        }
    }
    framing_findings(&mut c, raw, version, &te, &cl);
    if !raw.method.iter().copied().all(is_tchar) {
        c.raise(Tier::Severe, Reason::BadMethod);
    }
    version_findings(&mut c, version);
    for &b in raw.target {
        if b > b' ' && b != 0x7f {
            continue;
        }
        if is_bad_char(b) {
            c.raise(Tier::Severe, Reason::BadUri);
            break;
        } else if b == b' ' {
            c.raise(Tier::Acceptable, Reason::SpaceInUri);
        } else {
            c.raise(Tier::Ambiguous, Reason::AmbiguousUri);
        }
    }
    c
}

/// `Transfer-Encoding` and `Content-Length` (`te`, `cl`: indexes of those headers).
fn framing_findings(
    c: &mut Classification,
    raw: &RawHead<'_>,
    version: &[u8],
    te: &[usize],
    cl: &[usize],
) {
    if te.is_empty() && cl.is_empty() {
        return;
    }
    // Before HTTP/1.1 the framing headers have no defined meaning: nothing else is checked.
    if version <= b"HTTP/1.0".as_slice() && !te.is_empty() {
        c.raise(Tier::Ambiguous, Reason::UndefinedTransferEncodingSemantics);
        return;
    }
    if version < b"HTTP/1.0".as_slice() && !cl.is_empty() {
        c.raise(Tier::Ambiguous, Reason::UndefinedContentLengthSemantics);
        return;
    }
    let mut chunked_before = false;
    for &i in te {
        for item in raw.headers[i].value.split(|&b| b == b',') {
            match known_coding(item) {
                Some(coding) => {
                    let chunked = coding == b"chunked";
                    if chunked_before && chunked {
                        c.raise(Tier::Severe, Reason::MultipleTransferEncodingChunked);
                    }
                    chunked_before = chunked;
                }
                None => c.raise(Tier::Severe, Reason::BadTransferEncoding),
            }
        }
    }
    let mut length = None;
    for &i in cl {
        match parse_content_length(raw.headers[i].value) {
            Some(n) => match length {
                Some(first) if first != n => c.raise(Tier::Severe, Reason::MultipleContentLength),
                Some(_) => c.raise(Tier::Ambiguous, Reason::DuplicateContentLength),
                None => length = Some(n),
            },
            None => c.raise(Tier::Severe, Reason::BadContentLength),
        }
    }
    if raw.method == b"GET" || raw.method == b"HEAD" {
        if !te.is_empty() {
            c.raise(Tier::Ambiguous, Reason::UndefinedTransferEncodingSemantics);
        }
        match length {
            Some(0) => c.raise(Tier::Acceptable, Reason::GetHeadZeroContentLength),
            Some(_) => c.raise(Tier::Ambiguous, Reason::UndefinedContentLengthSemantics),
            None => {}
        }
    }
    if length.is_some() && !te.is_empty() {
        c.raise(Tier::Ambiguous, Reason::BothTeClPresent);
    }
}

fn version_findings(c: &mut Classification, version: &[u8]) {
    let trimmed = trim_ows(version);
    if trimmed == b"HTTP/0.9" {
        c.raise(Tier::Acceptable, Reason::NonCompliantVersion);
        return;
    }
    match trimmed {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor] if minor.is_ascii_digit() => {
            if trimmed.len() != version.len() || *minor > b'1' {
                c.raise(Tier::Acceptable, Reason::NonCompliantVersion);
            }
        }
        _ => c.raise(Tier::Severe, Reason::BadVersion),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A browser's head (a dozen header lines) is tokenized with one allocation, not one per
    /// doubling of the line list.
    #[test]
    fn a_head_is_tokenized_with_one_allocation() {
        use crate::rules::tests::allocations::so_far;
        let mut head = String::from("GET /index.html HTTP/1.1\r\nHost: example.com\r\n");
        for i in 0..12 {
            head.push_str(&format!("X-Header-{i}: value {i}\r\n"));
        }
        head.push_str("\r\n");
        let before = so_far();
        let raw = std::hint::black_box(tokenize(head.as_bytes()));
        let after = so_far();
        assert_eq!(raw.headers.len(), 13);
        // One, not zero: the counter sees this thread's allocations.
        assert_eq!(after - before, 1, "tokenize allocated more than once");
    }

    #[test]
    fn value_chars_are_vchar_obs_text_sp_htab() {
        for b in 0..=255u8 {
            let rfc = (0x21..=0x7e).contains(&b) || b >= 0x80 || b == b' ' || b == b'\t';
            assert_eq!(is_value_char(b), rfc, "byte {b:#04x}");
        }
    }

    /// The table gives every byte the tchar verdict of RFC 9110's list.
    #[test]
    fn tchar_table_matches_the_rfc_list() {
        for b in 0..=255u8 {
            let rfc = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            assert_eq!(is_tchar(b), rfc, "byte {b:#04x}");
        }
    }

    /// The all-clean fast path of `header_tier` gives the verdict the byte-by-byte rule gives,
    /// for every byte in the name and in the value, alone and next to clean bytes.
    #[test]
    fn header_tier_fast_path_agrees_with_the_byte_rule() {
        let mut tiers = std::collections::BTreeSet::new();
        for b in 0..=255u8 {
            for (name, value) in [
                (vec![b], b"v".to_vec()),
                (b"x".to_vec(), vec![b]),
                (vec![b'a', b, b'z'], b"value".to_vec()),
                (b"Name".to_vec(), vec![b'a', b, b'z']),
                (vec![b, b], vec![b, b]),
            ] {
                let tier = header_tier(&name, &value);
                assert_eq!(
                    tier,
                    header_tier_by_bytes(&name, &value),
                    "{name:?} {value:?}"
                );
                tiers.insert(tier);
            }
        }
        // Positive control: the inputs reach all three tiers.
        assert_eq!(tiers.len(), 3);
    }

    fn classify_str(head: &str) -> (Tier, Option<Reason>) {
        let c = classify(head.as_bytes());
        (c.tier, c.reason)
    }

    /// Expected values as `http_desync_guardian` 0.1.3 computes them (the `desync_oracle`
    /// integration test checks the same and more against the crate itself).
    #[test]
    fn classification_table() {
        use Reason::*;
        use Tier::*;
        let cases: &[(&str, Tier, Option<Reason>)] = &[
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", Compliant, None),
            ("GET  HTTP/1.1\r\nHost: a\r\n\r\n", Compliant, None),
            (
                "GET /caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n",
                Compliant,
                None,
            ),
            ("GET / HTTP/3.0\r\nHost: a\r\n\r\n", Compliant, None),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Compliant,
                None,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked;foo=bar\r\n\r\n",
                Compliant,
                None,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked \r\n\r\n",
                Compliant,
                None,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 005\r\n\r\n",
                Compliant,
                None,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
                Compliant,
                None,
            ),
            (
                "GET / HTTP/1.1\r\nContent-Type: a\r\n b\r\n\r\n",
                Compliant,
                None,
            ),
            ("GET /a b HTTP/1.1\r\n\r\n", Acceptable, Some(SpaceInUri)),
            (
                "GET / HTTP/1.2\r\n\r\n",
                Acceptable,
                Some(NonCompliantVersion),
            ),
            ("GET /\r\n\r\n", Acceptable, Some(NonCompliantVersion)),
            (
                "GET / HTTP/1.1\nHost: a\n\n",
                Acceptable,
                Some(NonCrLfLineTermination),
            ),
            (
                "GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
                Acceptable,
                Some(NonCompliantHeader),
            ),
            (
                "GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n",
                Acceptable,
                Some(NonCompliantHeader),
            ),
            (
                "GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                Acceptable,
                Some(GetHeadZeroContentLength),
            ),
            ("GET HTTP/1.1\r\n\r\n", Ambiguous, Some(MissingUri)),
            ("GET /a\tb HTTP/1.1\r\n\r\n", Ambiguous, Some(AmbiguousUri)),
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
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                Ambiguous,
                Some(UndefinedTransferEncodingSemantics),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                Ambiguous,
                Some(DuplicateContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                Ambiguous,
                Some(BothTeClPresent),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer_Encoding: chunked\r\n\r\n",
                Ambiguous,
                Some(SuspiciousHeader),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",
                Ambiguous,
                Some(SuspiciousHeader),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encod\u{131}ng: chunked\r\n\r\n",
                Ambiguous,
                Some(SuspiciousHeader),
            ),
            (
                "GET / HTTP/1.1\r\nNoColon\r\n\r\n",
                Ambiguous,
                Some(MissingHeaderColon),
            ),
            (
                "GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
                Ambiguous,
                Some(MultilineHeader),
            ),
            (
                "GET / HTTP/1.1\r\n: a\r\n\r\n",
                Ambiguous,
                Some(EmptyHeader),
            ),
            ("G(T / HTTP/1.1\r\n\r\n", Severe, Some(BadMethod)),
            ("GET / HTTP/1.x\r\n\r\n", Severe, Some(BadVersion)),
            ("GET / HTTP/11\r\n\r\n", Severe, Some(BadVersion)),
            ("GET / HTTP/1.1\r\nX\0Y: 1\r\n\r\n", Severe, Some(BadHeader)),
            ("GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", Severe, Some(BadHeader)),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
                Severe,
                Some(BadTransferEncoding),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: x-gzip\r\n\r\n",
                Severe,
                Some(BadTransferEncoding),
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                Severe,
                Some(MultipleTransferEncodingChunked),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                Severe,
                Some(MultipleContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
                Severe,
                Some(BadContentLength),
            ),
        ];
        for (head, tier, reason) in cases {
            assert_eq!(classify_str(head), (*tier, *reason), "{head:?}");
        }
    }

    #[test]
    fn similarity_follows_the_guardian() {
        use Similarity::*;
        for (name, want) in [
            ("Transfer-Encoding", Identical),
            ("transfer-encoding", Identical),
            ("Transfer_Encoding", SameLetters),
            ("Transfer-Encoding ", SameLetters),
            (" Transfer-Encoding", SameLetters),
            ("\x01Transfer-Encoding", SameLetters),
            ("Tran\u{17f}fer-Encoding", SameLetters),
            ("Transfer-Encodings", Distant),
            ("X-Transfer-Encoding", Distant),
            ("Transfer", Distant),
        ] {
            assert_eq!(similarity(TE_NAME, name.as_bytes()), want, "{name:?}");
        }
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
