//! Header rewriting the load balancer does on the way through, as ALB does it. Pure functions
//! over [`http::HeaderMap`]; the proxy calls them.
//!
//! # API
//!
//! - [`strip_hop_by_hop`]: removes hop-by-hop headers and the ones `Connection` names
//!   (requests and responses), optionally keeping a WebSocket upgrade.
//! - [`apply_forwarded`]: `X-Forwarded-For` per [`XffMode`] (limit: 30 addresses, else
//!   [`TooManyForwardedFor`] → 463), `X-Forwarded-Proto`, `X-Forwarded-Port`.
//! - [`trace_id`]: creates or extends `X-Amzn-Trace-Id`, returns it for the access log.
//! - [`keep_alive_timeout`]: a response's `Keep-Alive: timeout=N`, for the connection pool.
//! - [`request_cookies`]: every `Cookie` line joined, for target stickiness.
//! - [`list_elements`], [`has_token`]: the elements of a comma-separated value such as
//!   `Connection`, and whether one of them is a given token.
//!
//! Order on a request: [`keep_alive_timeout`] has nothing to do there; call
//! [`strip_hop_by_hop`] first (a client could otherwise name `X-Forwarded-For` in
//! `Connection` to delete what we add), then [`apply_forwarded`] and [`trace_id`]. On a
//! response, read [`keep_alive_timeout`] before [`strip_hop_by_hop`] removes `Keep-Alive`.
//! `Host` is never touched.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{
    CONNECTION, COOKIE, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue};

/// `X-Forwarded-For`: the client address and the proxies before us.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`: the listener's protocol (`http` or `https`).
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Port`: the listener's port.
pub const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
/// `X-Amzn-Trace-Id`: the request's trace id.
pub const X_AMZN_TRACE_ID: HeaderName = HeaderName::from_static("x-amzn-trace-id");
/// `Keep-Alive` (RFC 2068 §19.7.1; hop-by-hop).
pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// `Proxy-Connection` (non-standard, sent by old clients; hop-by-hop).
pub const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Most `X-Forwarded-For` addresses a request may carry (after appending ours); more is
/// answered with 463, as on ALB.
pub const MAX_FORWARDED_FOR: usize = 30;

/// What the load balancer does with `X-Forwarded-For` (ALB attribute
/// `routing.http.xff_header_processing.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XffMode {
    /// Append the client's address (the TCP peer), creating the header if absent. AWS default.
    #[default]
    Append,
    /// Forward the header exactly as received (absent stays absent).
    Preserve,
    /// Remove the header before forwarding.
    Remove,
}

impl XffMode {
    /// AWS's spelling (`append`, `preserve`, `remove`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Append => "append",
            Self::Preserve => "preserve",
            Self::Remove => "remove",
        }
    }
}

impl fmt::Display for XffMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `X-Forwarded-For` mode that is not `append`, `preserve` or `remove`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid X-Forwarded-For mode {0:?} (expected append, preserve or remove)")]
pub struct InvalidXffMode(pub String);

impl FromStr for XffMode {
    type Err = InvalidXffMode;

    /// Case-insensitive `append`, `preserve` or `remove`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "append" => Ok(Self::Append),
            "preserve" => Ok(Self::Preserve),
            "remove" => Ok(Self::Remove),
            _ => Err(InvalidXffMode(s.to_owned())),
        }
    }
}

/// The request's `X-Forwarded-For` holds more than [`MAX_FORWARDED_FOR`] addresses: the proxy
/// answers 463 and forwards nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("X-Forwarded-For holds {count} addresses, more than {MAX_FORWARDED_FOR}")]
pub struct TooManyForwardedFor {
    /// Addresses counted (including the one `append` would add).
    pub count: usize,
}

/// Applies `X-Forwarded-For`, `-Proto` and `-Port` as ALB does.
///
/// - `X-Forwarded-For`: addresses are counted over every header line (comma separated,
///   empty entries ignored). `Append` merges all lines into one, `a, b, <peer>` (an
///   IPv4-mapped IPv6 peer is written as IPv4); `Preserve` leaves the lines as they are;
///   `Remove` deletes them.
/// - The 30-address limit applies in every mode, to what the request carries plus, in
///   `Append`, the peer: ALB documents 463 as a property of the received header, not of the
///   mode, and a header that long is abuse whatever we forward. On error nothing is changed.
/// - `X-Forwarded-Proto: <proto>` and `X-Forwarded-Port: <port>` always replace what the
///   client sent. Both are the listener's and made when it is set up ([`forwarded_port`]),
///   not on every request.
/// - `peer` is the connection's address as text, made once per connection
///   ([`ForwardedPeer::new`]): a request without `X-Forwarded-For` gets a clone of it (a
///   reference count, no formatting, no allocation).
pub fn apply_forwarded(
    headers: &mut HeaderMap,
    peer: &ForwardedPeer,
    proto: &HeaderValue,
    port: &HeaderValue,
    mode: XffMode,
) -> Result<(), TooManyForwardedFor> {
    // One hashed lookup of `X-Forwarded-For` for reading, replacing and removing it.
    match headers.entry(X_FORWARDED_FOR) {
        http::header::Entry::Occupied(mut entry) => {
            let received: Vec<&[u8]> = entry
                .iter()
                .flat_map(list_elements)
                .filter(|entry| !entry.is_empty())
                .collect();
            let count = received.len() + usize::from(mode == XffMode::Append);
            if count > MAX_FORWARDED_FOR {
                return Err(TooManyForwardedFor { count });
            }
            match mode {
                XffMode::Append => {
                    let value = merged_forwarded_for(&received, peer.0.as_bytes());
                    // Replaces every line the client sent with the one merged value.
                    entry.insert(value);
                }
                XffMode::Preserve => {}
                XffMode::Remove => {
                    // Every line goes.
                    entry.remove();
                }
            }
        }
        http::header::Entry::Vacant(entry) => {
            if mode == XffMode::Append {
                entry.insert(peer.0.clone());
            }
        }
    }
    headers.insert(X_FORWARDED_PROTO, proto.clone());
    headers.insert(X_FORWARDED_PORT, port.clone());
    Ok(())
}

/// What [`apply_forwarded`] and [`trace_id`] add to a request that carries none of
/// `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Port` and `X-Amzn-Trace-Id`, kept out
/// of the header map: there each would be appended at the end, in this order, after a hashed
/// lookup of its custom name (about 1,100 instructions a request for the four). Our own
/// HTTP/1.1 client writes these fields after the map's ([`ForwardedTail::write_to`]); every
/// other user of the request puts them into the map first ([`ForwardedTail::append_to`]),
/// which gives exactly the map the two functions make (`the_forwarded_tail_is_what_the_map_functions_add`).
#[derive(Debug)]
pub struct ForwardedTail<'a> {
    /// The peer's entry (`append` mode), else nothing (`preserve` and `remove` add none).
    forwarded_for: Option<&'a HeaderValue>,
    /// The listener's protocol (`http`, `https`).
    proto: &'static str,
    /// The listener's port ([`forwarded_port`]).
    port: &'a HeaderValue,
    /// A new trace id (`Root=1-…-…`).
    trace_id: HeaderValue,
}

impl<'a> ForwardedTail<'a> {
    /// The fields for a request that has none of the four (the caller knows: it scanned the
    /// request's fields). Takes the same arguments as [`apply_forwarded`] and [`trace_id`],
    /// and draws the same random numbers.
    pub fn new(
        peer: &'a ForwardedPeer,
        proto: &'static str,
        port: &'a HeaderValue,
        mode: XffMode,
        now: SystemTime,
        random: &mut impl rand::RngCore,
    ) -> Self {
        Self {
            forwarded_for: (mode == XffMode::Append).then_some(&peer.0),
            proto,
            port,
            trace_id: trace_value(std::iter::empty, now, random),
        }
    }

    /// The `X-Amzn-Trace-Id` sent (the access log records it).
    pub fn trace_id(&self) -> &HeaderValue {
        &self.trace_id
    }

    /// Writes the fields as HTTP/1.1 header lines (`name: value\r\n`), after a map's, in the
    /// order the map functions append them. Each name with its `: ` is one constant (copied
    /// inline), each value one copy.
    pub fn write_to(&self, head: &mut Vec<u8>) {
        if let Some(peer) = self.forwarded_for {
            head.extend_from_slice(b"x-forwarded-for: ");
            head.extend_from_slice(peer.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"x-forwarded-proto: ");
        head.extend_from_slice(self.proto.as_bytes());
        head.extend_from_slice(b"\r\nx-forwarded-port: ");
        head.extend_from_slice(self.port.as_bytes());
        head.extend_from_slice(b"\r\nx-amzn-trace-id: ");
        head.extend_from_slice(self.trace_id.as_bytes());
        head.extend_from_slice(b"\r\n");
    }

    /// Puts the fields into `headers` (at its end, as the map functions do).
    pub fn append_to(self, headers: &mut HeaderMap) {
        if let Some(peer) = self.forwarded_for {
            headers.append(X_FORWARDED_FOR, peer.clone());
        }
        headers.append(X_FORWARDED_PROTO, HeaderValue::from_static(self.proto));
        headers.append(X_FORWARDED_PORT, self.port.clone());
        headers.append(X_AMZN_TRACE_ID, self.trace_id);
    }

    /// Whether `name` is one of the fields a tail stands for (a request carrying one takes
    /// the map functions instead).
    pub fn names(name: &HeaderName) -> bool {
        *name == X_FORWARDED_FOR
            || *name == X_FORWARDED_PROTO
            || *name == X_FORWARDED_PORT
            || *name == X_AMZN_TRACE_ID
    }
}

/// The client's address as an `X-Forwarded-For` entry (an IPv4-mapped IPv6 address written
/// as IPv4), made once per client connection: every request on it without an
/// `X-Forwarded-For` of its own forwards a clone, and `append` joins its text to what the
/// request carries.
#[derive(Debug, Clone)]
pub struct ForwardedPeer(HeaderValue);

impl ForwardedPeer {
    /// `peer`'s entry. Cloned once before it is kept, as [`forwarded_port`] is, so that each
    /// request's clone only counts a reference.
    pub fn new(peer: IpAddr) -> Self {
        let mut buf = AddrBuf::default();
        let text = buf.format(peer.to_canonical());
        // An IP address in text is always a valid header value.
        let value = HeaderValue::from_maybe_shared(Bytes::copy_from_slice(text))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        let _shared = value.clone();
        Self(value)
    }
}

/// `a, b, <peer>`: the received entries and the peer's entry ([`ForwardedPeer`]), joined
/// into one buffer of the final size: one allocation (this runs on every forwarded request
/// that carries an `X-Forwarded-For`).
fn merged_forwarded_for(received: &[&[u8]], peer: &[u8]) -> HeaderValue {
    let len = received.iter().map(|e| e.len() + 2).sum::<usize>() + peer.len();
    let mut merged = Vec::with_capacity(len);
    for entry in received.iter().copied().chain([peer]) {
        if !merged.is_empty() {
            merged.extend_from_slice(b", ");
        }
        merged.extend_from_slice(entry);
    }
    // Entries come from valid header values or are an IP address: always valid.
    HeaderValue::from_maybe_shared(Bytes::from(merged))
        .or_else(|_| HeaderValue::from_bytes(peer))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A listener's `X-Forwarded-Port` value, made once when the listener is set up. It is cloned
/// before it is handed out, so that every request's clone only counts a reference (the first
/// clone of a value built from owned bytes allocates).
pub fn forwarded_port(port: u16) -> HeaderValue {
    let value = HeaderValue::from(port);
    let _shared = value.clone();
    value
}

/// Room for an IP address in text, formatted without allocating (the longest
/// address text, IPv6 with an embedded IPv4 address, takes 45 bytes).
struct AddrBuf {
    buf: [u8; 48],
    len: usize,
}

impl Default for AddrBuf {
    fn default() -> Self {
        Self {
            buf: [0; 48],
            len: 0,
        }
    }
}

impl AddrBuf {
    /// `addr` as text (what its `Display` writes), without allocating.
    fn format(&mut self, addr: IpAddr) -> &[u8] {
        use std::fmt::Write as _;
        self.len = 0;
        match addr {
            // The usual client: written digit by digit, as `Display` would write it but
            // without the formatting machinery (about 1,000 instructions a request).
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.push(b'.');
                    }
                    if octet >= 100 {
                        self.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        self.push(b'0' + octet / 10 % 10);
                    }
                    self.push(b'0' + octet % 10);
                }
            }
            IpAddr::V6(_) => {
                if write!(self, "{addr}").is_err() {
                    self.len = 0;
                }
            }
        }
        self.as_bytes()
    }

    /// Appends one byte (an IPv4 address, at most 15, always fits).
    fn push(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    /// What was written so far.
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for AddrBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let room = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        room.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Sets `X-Amzn-Trace-Id` as ALB does and returns its new value (the access log records it).
///
/// - No header, or one without a `Root` field: a new `Root=1-<8 hex epoch seconds>-<24 hex
///   random>` goes first; other fields the client sent are kept after it.
/// - A header with a `Root`: `Self=1-<8 hex>-<24 hex>` is put in front (replacing any
///   `Self` already there, wherever it was) and every other field (`Root`, `Parent`,
///   `Sampled`, custom ones) is kept in order.
///
/// Fields are `;`-separated (`Self=…;Root=…;CalledFrom=app`); several header lines are
/// merged into one. A header that is not valid UTF-8 is treated as absent.
///
/// Runs on every forwarded request: the value is written into one buffer of its final size
/// (one allocation), not formatted piece by piece.
pub fn trace_id<'h>(
    headers: &'h mut HeaderMap,
    now: SystemTime,
    random: &mut impl rand::RngCore,
) -> &'h HeaderValue {
    // One hashed lookup for reading and replacing the header.
    match headers.entry(X_AMZN_TRACE_ID) {
        // Replaces every line the client sent with the one merged value.
        http::header::Entry::Occupied(mut e) => {
            let value = trace_value(|| received_trace_fields(e.iter()), now, random);
            e.insert(value);
            e.into_mut()
        }
        http::header::Entry::Vacant(e) => e.insert(trace_value(std::iter::empty, now, random)),
    }
}

/// The new `X-Amzn-Trace-Id` value given the `fields` received (see [`trace_id`]).
fn trace_value<'a, I: Iterator<Item = &'a str>>(
    fields: impl Fn() -> I,
    now: SystemTime,
    random: &mut impl rand::RngCore,
) -> HeaderValue {
    let mut has_root = false;
    let mut kept_len = 0;
    for field in fields() {
        match field_name(field) {
            "Root" => {
                has_root = true;
                kept_len += 1 + field.len();
            }
            "Self" => {}
            _ => kept_len += 1 + field.len(),
        }
    }
    let mut first = [0u8; TRACE_FIELD_LEN];
    first[..5].copy_from_slice(if has_root { b"Self=" } else { b"Root=" });
    new_trace_id(&mut first[5..], now, random);
    let mut text = Vec::with_capacity(TRACE_FIELD_LEN + kept_len);
    text.extend_from_slice(&first);
    for field in fields().filter(|f| field_name(f) != "Self") {
        text.push(b';');
        text.extend_from_slice(field.as_bytes());
    }
    if text.len() == TRACE_FIELD_LEN {
        // SAFETY (a contract, not memory): `from_maybe_shared_unchecked` wants bytes
        // `HeaderValue::from_bytes` accepts. This is only the field we made: `Root=` or
        // `Self=`, hex digits and dashes, all visible ASCII (checking it again cost about 90
        // instructions a request). Debug builds check it again inside `http`;
        // `a_new_trace_value_taken_unchecked_is_the_checked_one` compares the two.
        return unsafe { HeaderValue::from_maybe_shared_unchecked(Bytes::from(text)) };
    }
    // Fields come from a valid value (trimmed, split on ';') or are ASCII we made.
    HeaderValue::from_maybe_shared(Bytes::from(text))
        .or_else(|_| HeaderValue::from_bytes(&first))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The `X-Amzn-Trace-Id` fields in a request's `lines`, in order: every line that is valid
/// UTF-8, split on `;`, trimmed, empty ones left out.
fn received_trace_fields<'a>(
    lines: impl Iterator<Item = &'a HeaderValue>,
) -> impl Iterator<Item = &'a str> {
    lines
        .filter_map(|line| line.to_str().ok())
        .flat_map(|line| line.split(';'))
        .map(str::trim)
        .filter(|field| !field.is_empty())
}

/// The name of a `Name=value` trace-id field (the whole field if it has no `=`).
fn field_name(field: &str) -> &str {
    field.split_once('=').map_or(field, |(name, _)| name).trim()
}

/// Length of a trace id, `1-<8 hex>-<24 hex>`.
const TRACE_ID_LEN: usize = 35;
/// Length of the field we put first: `Root=` or `Self=` and a trace id.
const TRACE_FIELD_LEN: usize = 5 + TRACE_ID_LEN;

/// Writes `1-<8 hex epoch seconds>-<24 hex random>` (the X-Ray trace id format, lowercase)
/// into `out` (exactly [`TRACE_ID_LEN`] bytes).
fn new_trace_id(out: &mut [u8], now: SystemTime, random: &mut impl rand::RngCore) {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // 8 hex digits hold the seconds until 2106; X-Ray keeps the low 32 bits as well.
    let secs = secs & u64::from(u32::MAX);
    let (prefix, rest) = out.split_at_mut(2);
    prefix.copy_from_slice(b"1-");
    let (epoch, rest) = rest.split_at_mut(8);
    epoch.copy_from_slice(&hex8(secs as u32));
    let (dash, rest) = rest.split_at_mut(1);
    dash[0] = b'-';
    let high = random.next_u64();
    let (a, rest) = rest.split_at_mut(8);
    a.copy_from_slice(&hex8((high >> 32) as u32));
    let (b, low) = rest.split_at_mut(8);
    b.copy_from_slice(&hex8(high as u32));
    low.copy_from_slice(&hex8(random.next_u32()));
}

/// `n`'s 8 hex digits (lowercase, zero-padded), all at once in one `u64`: each nibble spread
/// into a byte of its own, then `'0'` added to each and 39 more (`'a' - '0' - 10`) to those
/// of 10 and over. (A table of digit pairs took about 8 instructions per pair, 134 per trace
/// id; this is about 15 per 8 digits.)
fn hex8(n: u32) -> [u8; 8] {
    let x = u64::from(n);
    // Nibble `i` (from the lowest) into byte `i`, in three halvings.
    let x = ((x & 0xffff_0000) << 16) | (x & 0xffff);
    let x = ((x & 0x0000_ff00_0000_ff00) << 8) | (x & 0x0000_00ff_0000_00ff);
    let x = ((x & 0x00f0_00f0_00f0_00f0) << 4) | (x & 0x000f_000f_000f_000f);
    // 1 in each byte whose nibble is 10 or more (nibble + 6 carries into bit 4; no byte
    // overflows).
    let letters = ((x + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    (x + 0x3030_3030_3030_3030 + letters * 39).to_be_bytes()
}

/// Most header lines [`for_each_value_mut`] scans; a longer map is looked up.
pub(crate) const SCAN_MAX: usize = 16;

/// Calls `f` on every value of `name` in `headers`, and says whether there was one. A usual
/// response head (at most [`SCAN_MAX`] lines) is scanned: a standard name compares as a tag,
/// while the hashed lookup (`entry`) cost about 170 instructions per response. A longer head
/// is looked up, so the scan never costs more than the lookup it replaces (a caller that then
/// inserts the missing name hashes it once more: long heads only). Inlined, so that the
/// comparison is with the caller's constant name (out of line: about 200 instructions more
/// per HTTP/2 response, measured).
#[inline]
pub(crate) fn for_each_value_mut(
    headers: &mut HeaderMap,
    name: HeaderName,
    mut f: impl FnMut(&mut HeaderValue),
) -> bool {
    if headers.len() <= SCAN_MAX {
        let mut found = false;
        for (n, value) in headers.iter_mut() {
            if *n == name {
                f(value);
                found = true;
            }
        }
        return found;
    }
    match headers.entry(name) {
        http::header::Entry::Occupied(mut values) => {
            values.iter_mut().for_each(f);
            true
        }
        http::header::Entry::Vacant(_) => false,
    }
}

/// Removes the hop-by-hop headers (`Connection`, `Keep-Alive`, `Proxy-Connection`, `TE`,
/// `Trailer`, `Transfer-Encoding`, `Upgrade`, `Proxy-Authenticate`, `Proxy-Authorization`)
/// and every header `Connection` names (RFC 9110 §7.6.1), except `Host`, which a client
/// cannot make us drop.
///
/// With `keep_upgrade`, a request asking for an upgrade (`Connection` lists `upgrade` and an
/// `Upgrade` header is present) keeps its `Upgrade` lines and is left with exactly
/// `Connection: upgrade`, so a WebSocket handshake reaches the target.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the header lines finds which hop-by-hop headers are there (usually only
    // `Connection` and `Keep-Alive`, if any) and reads the `Connection` lines on the way, so
    // that only the headers to remove are looked up again. (This runs twice per request:
    // removing all nine cost nine hashed lookups, and reading `Connection` through `get_all`
    // one more, about 110 instructions per request.)
    let mut present = 0u16;
    // Names `Connection` lists that are present and not removed below anyway. A token is
    // made into a `HeaderName` (an allocation for a name `http` does not know, such as
    // `close`) only when such a header is there to remove.
    let mut named: Vec<HeaderName> = Vec::new();
    let mut names_upgrade = false;
    for (name, value) in headers.iter() {
        let bit = hop_by_hop_bit(name);
        present |= bit;
        if bit == CONNECTION_BIT {
            connection_tokens(headers, value, &mut named, &mut names_upgrade);
        }
    }
    if present == 0 {
        // No `Connection` (so nothing named in it, no upgrade) and nothing else to remove.
        return;
    }
    let upgrading = keep_upgrade && names_upgrade && present & UPGRADE_BIT != 0;
    let upgrade: Vec<HeaderValue> = if upgrading {
        headers.get_all(UPGRADE).iter().cloned().collect()
    } else {
        Vec::new()
    };

    for name in named {
        headers.remove(name);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }

    if upgrading {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        for value in upgrade {
            headers.append(UPGRADE, value);
        }
    }
}

/// Reads one `Connection` line for [`strip_hop_by_hop`]: whether it lists `upgrade`, and the
/// headers it names that are present and not removed anyway (hop-by-hop ones are; `Host`
/// never is), in the order listed.
fn connection_tokens(
    headers: &HeaderMap,
    line: &HeaderValue,
    named: &mut Vec<HeaderName>,
    names_upgrade: &mut bool,
) {
    for token in list_elements(line) {
        if token.eq_ignore_ascii_case(UPGRADE.as_str().as_bytes()) {
            *names_upgrade = true;
        }
        let removed_anyway = hop_by_hop_bit_of_token(token) != 0;
        if removed_anyway || token.eq_ignore_ascii_case(HOST.as_str().as_bytes()) {
            continue;
        }
        if std::str::from_utf8(token).is_ok_and(|t| headers.contains_key(t))
            && let Ok(name) = HeaderName::from_bytes(token)
        {
            named.push(name);
        }
    }
}

/// The headers [`strip_hop_by_hop`] always removes. A `static`, not a `const`: a `const`
/// array of `HeaderName`s is a new value, dropped again, wherever it is used.
static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
];

// Each name's [`hop_by_hop_bit`]: bit `i` for `HOP_BY_HOP[i]`, written once here for the two
// lookups below (by `HeaderName`, by lowercase text); `every_hop_by_hop_name_has_its_own_bit`
// checks both against the array.
const CONNECTION_BIT: u16 = 1 << 0;
const KEEP_ALIVE_BIT: u16 = 1 << 1;
const PROXY_CONNECTION_BIT: u16 = 1 << 2;
const TE_BIT: u16 = 1 << 3;
const TRAILER_BIT: u16 = 1 << 4;
const TRANSFER_ENCODING_BIT: u16 = 1 << 5;
const UPGRADE_BIT: u16 = 1 << 6;
const PROXY_AUTHENTICATE_BIT: u16 = 1 << 7;
const PROXY_AUTHORIZATION_BIT: u16 = 1 << 8;

/// Whether [`strip_hop_by_hop`] removes `name` whatever `Connection` says: one of
/// [`HOP_BY_HOP`].
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop_bit(name) != 0
}

/// `name`'s bit if it is one of [`HOP_BY_HOP`] (bit `i` for `HOP_BY_HOP[i]`), else 0.
///
/// Compared as `HeaderName`s, not as text: a name `http` knows is a one-byte tag, so this
/// reads neither its text nor `http`'s table of the known names' texts, which `as_str` reads
/// (one line of that table per name, cold again by the next request: about 10 L1 read misses
/// per HTTP/1.1 request, this running for every header of the request and the response).
/// `Keep-Alive` and `Proxy-Connection` are not known to `http`: their text is compared.
fn hop_by_hop_bit(name: &HeaderName) -> u16 {
    match *name {
        CONNECTION => CONNECTION_BIT,
        TE => TE_BIT,
        TRAILER => TRAILER_BIT,
        TRANSFER_ENCODING => TRANSFER_ENCODING_BIT,
        UPGRADE => UPGRADE_BIT,
        PROXY_AUTHENTICATE => PROXY_AUTHENTICATE_BIT,
        PROXY_AUTHORIZATION => PROXY_AUTHORIZATION_BIT,
        _ if *name == KEEP_ALIVE => KEEP_ALIVE_BIT,
        _ if *name == PROXY_CONNECTION => PROXY_CONNECTION_BIT,
        _ => 0,
    }
}

/// [`hop_by_hop_bit`] of a lowercase name. Length and first byte pick the one candidate,
/// so most names are told apart without comparing their text (this runs for every header of
/// every request and response).
fn hop_by_hop_bit_of(name: &[u8]) -> u16 {
    let (candidate, bit): (&[u8], u16) = match (name.len(), name.first()) {
        (10, Some(b'c')) => (b"connection", CONNECTION_BIT),
        (10, Some(b'k')) => (b"keep-alive", KEEP_ALIVE_BIT),
        (16, Some(b'p')) => (b"proxy-connection", PROXY_CONNECTION_BIT),
        (2, Some(b't')) => (b"te", TE_BIT),
        (7, Some(b't')) => (b"trailer", TRAILER_BIT),
        (17, Some(b't')) => (b"transfer-encoding", TRANSFER_ENCODING_BIT),
        (7, Some(b'u')) => (b"upgrade", UPGRADE_BIT),
        (18, Some(b'p')) => (b"proxy-authenticate", PROXY_AUTHENTICATE_BIT),
        (19, Some(b'p')) => (b"proxy-authorization", PROXY_AUTHORIZATION_BIT),
        _ => return 0,
    };
    if name == candidate { bit } else { 0 }
}

/// [`hop_by_hop_bit`] of a `Connection` token, whatever its case.
fn hop_by_hop_bit_of_token(token: &[u8]) -> u16 {
    let mut lower = [0u8; 19];
    let Some(lower) = lower.get_mut(..token.len()) else {
        return 0;
    };
    for (l, t) in lower.iter_mut().zip(token) {
        *l = t.to_ascii_lowercase();
    }
    hop_by_hop_bit_of(lower)
}

/// Whether `name`, in any case, is one of the hop-by-hop fields [`strip_hop_by_hop`] removes
/// (for code that reads field names as bytes, such as the lean HTTP/1.1 path's).
pub(crate) fn is_hop_by_hop_name(name: &[u8]) -> bool {
    hop_by_hop_bit_of_token(name) != 0
}

/// The `timeout=N` of a response's `Keep-Alive` header: how long the target keeps an idle
/// connection open, so the pool can retire it first. Whole seconds by convention (RFC 2068
/// §19.7.1.1); decimal seconds (`timeout=0.5`) are accepted too, as some servers send them.
/// Parameter names are case-insensitive and may come in any order; the first `timeout`
/// found decides. `None` when there is no such parameter or its value is not a plain,
/// unsigned number of seconds of at most a day (nothing larger is a keep-alive timeout one can
/// act on).
pub fn keep_alive_timeout(headers: &HeaderMap) -> Option<Duration> {
    const MAX_SECS: f64 = 86_400.0;
    let value = headers
        .get_all(KEEP_ALIVE)
        .iter()
        .filter_map(|line| line.to_str().ok())
        .flat_map(|line| line.split(','))
        .filter_map(|param| param.split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("timeout"))?
        .1
        .trim();
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    // Digits with at most one '.': no sign, exponent, NaN or unit.
    let plain = value.bytes().any(|b| b.is_ascii_digit())
        && value.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && value.bytes().filter(|&b| b == b'.').count() <= 1;
    if !plain {
        return None;
    }
    let secs: f64 = value.parse().ok()?;
    (secs <= MAX_SECS).then(|| Duration::from_secs_f64(secs))
}

/// Every `Cookie` line of a request joined with `"; "` (HTTP/2 sends one line per cookie,
/// RFC 9113 §8.2.3), for [`crate::targets::TargetGroup::pick`]. Lines that are not UTF-8
/// are skipped; `None` when nothing is left. The usual single line is borrowed, not copied.
pub fn request_cookies(headers: &HeaderMap) -> Option<std::borrow::Cow<'_, str>> {
    let mut lines = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|line| line.to_str().ok());
    let first = lines.next()?;
    match lines.next() {
        None => Some(std::borrow::Cow::Borrowed(first)),
        Some(second) => {
            let mut joined = format!("{first}; {second}");
            for line in lines {
                joined.push_str("; ");
                joined.push_str(line);
            }
            Some(std::borrow::Cow::Owned(joined))
        }
    }
}

/// Values of every cookie called `name` in a `Cookie` header value (`a=1; b=2`, e.g. from
/// [`request_cookies`]), in order.
/// Names are case-sensitive (RFC 6265); surrounding double quotes are removed.
pub fn cookie_values<'a>(header: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> {
    header.split(';').filter_map(move |pair| {
        let (n, v) = pair.split_once('=')?;
        (n.trim() == name).then(|| {
            let v = v.trim();
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v)
        })
    })
}

/// The elements of a comma-separated header value (RFC 9110 section 5.6.1), trimmed of
/// spaces and tabs; empty elements are kept. Works on the bytes, so an element with bytes
/// outside visible ASCII does not hide the others.
pub fn list_elements(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
}

/// Whether the comma-separated `value` (`Connection`, `TE`, `Keep-Alive`, …) lists `token`,
/// compared ASCII case-insensitively.
pub fn has_token(value: &HeaderValue, token: &str) -> bool {
    list_elements(value).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use rand::SeedableRng as _;
    use rand::rngs::StdRng;

    use super::*;

    /// The fields of `headers` in order (`HeaderMap`'s `==` ignores the order of names).
    fn in_order(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
        headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    /// A request without any of the four fields gets from [`ForwardedTail`] (appended, or
    /// written as lines) exactly what [`apply_forwarded`] and [`trace_id`] put into its map,
    /// in the same order, and the same trace id: over generated maps (fields that are and
    /// are not near the four names), every mode, IPv4 and IPv6 peers, both protocols.
    #[test]
    fn the_forwarded_tail_is_what_the_map_functions_add() {
        let fields: &[(&str, &str)] = &[
            ("host", "a.example"),
            ("user-agent", "curl/8"),
            ("accept", "*/*"),
            ("x-forwarded-host", "b.example"),
            ("x-amzn-trace", "Root=1-2-3"),
            ("cookie", "a=1"),
            ("host", "c.example"),
        ];
        let peers = [
            ForwardedPeer::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))),
            ForwardedPeer::new(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))),
        ];
        let ports = [forwarded_port(80), forwarded_port(8443)];
        let mut rng = StdRng::seed_from_u64(0x6a09_e667_f3bc_c908);
        let mut next = move |n: usize| rand::Rng::random_range(&mut rng, 0..n);
        let mut by_mode = [0usize; 3];
        for round in 0..5_000u64 {
            let mut headers = HeaderMap::new();
            for _ in 0..next(6) {
                let (name, value) = fields[next(fields.len())];
                headers.append(
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                );
            }
            let mode = [XffMode::Append, XffMode::Preserve, XffMode::Remove][next(3)];
            by_mode[mode as usize] += 1;
            let peer = &peers[next(2)];
            let proto = ["http", "https"][next(2)];
            let port = &ports[next(2)];
            let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000 + round);

            let mut reference = headers.clone();
            apply_forwarded(
                &mut reference,
                peer,
                &HeaderValue::from_static(proto),
                port,
                mode,
            )
            .expect("one address at most");
            let id = trace_id(&mut reference, now, &mut StdRng::seed_from_u64(round)).clone();

            let tail = ForwardedTail::new(
                peer,
                proto,
                port,
                mode,
                now,
                &mut StdRng::seed_from_u64(round),
            );
            assert_eq!(tail.trace_id(), &id);
            // Written after the map's lines: the lines the reference map's last fields make.
            let mut lines = Vec::new();
            tail.write_to(&mut lines);
            let mut expected = Vec::new();
            for (name, value) in reference.iter().skip(headers.len()) {
                expected.extend_from_slice(name.as_str().as_bytes());
                expected.extend_from_slice(b": ");
                expected.extend_from_slice(value.as_bytes());
                expected.extend_from_slice(b"\r\n");
            }
            assert_eq!(
                String::from_utf8_lossy(&lines),
                String::from_utf8_lossy(&expected)
            );
            let mut ours = headers.clone();
            tail.append_to(&mut ours);
            assert_eq!(in_order(&ours), in_order(&reference), "{headers:?} {mode}");
            for (name, _) in reference.iter().skip(headers.len()) {
                assert!(ForwardedTail::names(name), "{name}");
            }
        }
        assert!(by_mode.iter().all(|&n| n > 1_000), "{by_mode:?}");
        for name in ["x-forwarded-host", "x-amzn-trace", "host", "forwarded"] {
            assert!(
                !ForwardedTail::names(&HeaderName::from_static(name)),
                "{name}"
            );
        }
    }

    /// The new trace field taken without a check is the value checking gives (debug builds
    /// check inside `http` too); with received fields the value is checked as before.
    #[test]
    fn a_new_trace_value_taken_unchecked_is_the_checked_one() {
        let mut random = StdRng::seed_from_u64(7);
        for secs in [0, 1, 0xffff_ffff, 0x1_0000_0000, 1_700_000_000] {
            for _ in 0..200 {
                let now = UNIX_EPOCH + Duration::from_secs(secs);
                let value = trace_value(std::iter::empty, now, &mut random);
                assert_eq!(value.len(), TRACE_FIELD_LEN);
                assert_eq!(
                    HeaderValue::from_bytes(value.as_bytes()).ok().as_ref(),
                    Some(&value)
                );
                assert!(value.as_bytes().iter().all(|b| b.is_ascii_graphic()));
            }
        }
    }

    #[test]
    fn has_token_finds_a_listed_token_in_any_case_and_spacing_only_as_a_whole_element() {
        let v = |s: &[u8]| HeaderValue::from_bytes(s).unwrap();
        assert!(has_token(&v(b"close"), "close"));
        assert!(has_token(&v(b"Keep-Alive ,\tCLOSE "), "close"));
        assert!(has_token(&v(b",,close,"), "close"));
        // An element with a byte outside visible ASCII (obs-text) does not hide the others;
        // the value is not valid `to_str`, which the check once went through.
        let obs = v(b"x-\xe9t\xe9, close");
        assert!(obs.to_str().is_err());
        assert!(has_token(&obs, "close"));
        // Negative checks: part of an element, or a token with other words, is not the token.
        assert!(!has_token(&v(b"closed, keep-alive"), "close"));
        assert!(!has_token(&v(b"close keep-alive"), "close"));
        assert!(!has_token(&v(b""), "close"));
    }

    fn map(headers: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    /// Headers as (name, value) pairs sorted by name, values of one name in order.
    fn dump(map: &HeaderMap) -> Vec<(String, String)> {
        let mut pairs: Vec<_> = map
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
            .collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs
    }

    fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        dump(&map(pairs))
    }

    const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));

    #[test]
    fn addresses_are_formatted_as_display_formats_them() {
        for addr in [
            "203.0.113.7",
            "255.255.255.255",
            "::1",
            "2001:db8::7",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
            "::255.255.255.255",
        ] {
            let ip: IpAddr = addr.parse().unwrap();
            let mut buf = AddrBuf::default();
            assert_eq!(buf.format(ip), ip.to_string().as_bytes(), "{addr}");
        }
    }

    /// The hand-written IPv4 path writes what `Display` writes, for every octet length in
    /// every position (the digit boundaries 9/10, 99/100, 199/200, 249/250/255).
    #[test]
    fn ipv4_addresses_are_written_as_display_writes_them() {
        const OCTETS: [u8; 13] = [0, 1, 9, 10, 11, 99, 100, 101, 199, 200, 249, 250, 255];
        let mut checked = 0;
        for a in OCTETS {
            for b in OCTETS {
                for c in OCTETS {
                    for d in OCTETS {
                        let ip = IpAddr::V4(Ipv4Addr::new(a, b, c, d));
                        let mut buf = AddrBuf::default();
                        assert_eq!(buf.format(ip), ip.to_string().as_bytes(), "{ip}");
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 13 * 13 * 13 * 13);
        // A mapped IPv6 peer goes through the IPv4 path once made canonical, as
        // `apply_forwarded` does.
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 200, 0, 9).to_ipv6_mapped());
        assert_eq!(
            AddrBuf::default().format(mapped.to_canonical()),
            b"10.200.0.9"
        );
    }

    /// `hop_by_hop_bit` is the bit of the name's place in `HOP_BY_HOP`, one bit per name,
    /// and no bit for any other name.
    #[test]
    fn every_hop_by_hop_name_has_its_own_bit() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_bit(name), 1 << i, "{name}");
        }
        for other in [HOST, COOKIE, X_FORWARDED_FOR, http::header::CONTENT_LENGTH] {
            assert_eq!(hop_by_hop_bit(&other), 0, "{other}");
        }
        let custom = HeaderName::from_static("x-connection");
        assert_eq!(hop_by_hop_bit(&custom), 0);
        // Same length and first letter as a hop-by-hop name, another name.
        assert_eq!(hop_by_hop_bit(&HeaderName::from_static("keep-alivf")), 0);
        assert_eq!(hop_by_hop_bit(&http::header::TRANSFER_ENCODING), 1 << 5);
        // Names as parsed from a head (any case), known to `http` or not.
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            let upper = name.as_str().to_ascii_uppercase();
            let parsed = HeaderName::from_bytes(upper.as_bytes()).unwrap();
            assert_eq!(hop_by_hop_bit(&parsed), 1 << i, "{upper}");
        }
        // Connection tokens come in any case; a token longer than every name is none.
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            let upper = name.as_str().to_ascii_uppercase();
            assert_eq!(hop_by_hop_bit_of_token(upper.as_bytes()), 1 << i, "{upper}");
        }
        assert_eq!(hop_by_hop_bit_of_token(b"Proxy-Authorization-X"), 0);
        assert_eq!(hop_by_hop_bit_of_token(b""), 0);
    }

    /// What the forwarding headers cost a plain request (no `X-Forwarded-For`, no trace id,
    /// `Connection: keep-alive`): one allocation for the trace id, none for the hop-by-hop
    /// headers, none for `X-Forwarded-For` (the connection's [`ForwardedPeer`], made when it
    /// is accepted) and none for `X-Forwarded-Proto`/`-Port` (the listener's values, made when
    /// it is set up).
    #[test]
    fn forwarding_headers_allocate_once_per_value_they_add() {
        use crate::rules::tests::allocations::so_far;
        let mut headers = HeaderMap::with_capacity(16);
        headers.insert(HOST, HeaderValue::from_static("example.com"));
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        let mut rng = StdRng::seed_from_u64(4);
        let peer = ForwardedPeer::new(IpAddr::V6("2001:db8::7".parse().unwrap()));
        let (proto, port) = (HeaderValue::from_static("https"), forwarded_port(8443));
        let before = so_far();
        strip_hop_by_hop(&mut headers, false);
        let stripped = so_far();
        apply_forwarded(&mut headers, &peer, &proto, &port, XffMode::Append).unwrap();
        let forwarded = so_far();
        trace_id(&mut headers, new_year(), &mut rng);
        let traced = so_far();
        assert_eq!(stripped - before, 0, "strip_hop_by_hop");
        assert_eq!(forwarded - stripped, 0, "apply_forwarded");
        assert_eq!(traced - forwarded, 1, "trace_id");
        // The values are what the other tests check; here only that they are there.
        assert_eq!(headers[X_FORWARDED_FOR], "2001:db8::7");
        assert_eq!(headers[X_FORWARDED_PROTO], "https");
        assert_eq!(headers[X_FORWARDED_PORT], "8443");
        assert!(headers.contains_key(X_AMZN_TRACE_ID));
        assert!(!headers.contains_key(CONNECTION) && !headers.contains_key(KEEP_ALIVE));
        // The counter sees allocations this thread makes (so the zeros above can fail).
        let v = std::hint::black_box(vec![1u8; 16]);
        assert!(so_far() > traced);
        drop(v);
    }

    #[test]
    fn forwarded_headers_table() {
        struct Case {
            name: &'static str,
            input: &'static [(&'static str, &'static str)],
            peer: IpAddr,
            mode: XffMode,
            expected: &'static [(&'static str, &'static str)],
        }
        let cases = [
            Case {
                name: "append creates the header",
                input: &[("host", "example.com")],
                peer: V4,
                mode: XffMode::Append,
                expected: &[
                    ("host", "example.com"),
                    ("x-forwarded-for", "203.0.113.7"),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-port", "443"),
                ],
            },
            Case {
                name: "append adds the peer after the existing chain",
                input: &[("x-forwarded-for", "198.51.100.1, 10.0.0.1")],
                peer: V4,
                mode: XffMode::Append,
                expected: &[
                    ("x-forwarded-for", "198.51.100.1, 10.0.0.1, 203.0.113.7"),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-port", "443"),
                ],
            },
            Case {
                name: "append merges several lines into one and drops empty entries",
                input: &[
                    ("x-forwarded-for", "198.51.100.1"),
                    ("x-forwarded-for", " 10.0.0.1 ,, 10.0.0.2"),
                ],
                peer: V4,
                mode: XffMode::Append,
                expected: &[
                    (
                        "x-forwarded-for",
                        "198.51.100.1, 10.0.0.1, 10.0.0.2, 203.0.113.7",
                    ),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-port", "443"),
                ],
            },
            Case {
                name: "append writes IPv6 peers plainly and mapped IPv4 as IPv4",
                input: &[("x-forwarded-for", "2001:db8::1")],
                peer: IpAddr::V6(Ipv4Addr::new(192, 0, 2, 9).to_ipv6_mapped()),
                mode: XffMode::Append,
                expected: &[
                    ("x-forwarded-for", "2001:db8::1, 192.0.2.9"),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-port", "443"),
                ],
            },
            Case {
                name: "preserve leaves every line untouched",
                input: &[
                    ("x-forwarded-for", "198.51.100.1"),
                    ("x-forwarded-for", "10.0.0.1 ,x"),
                ],
                peer: V4,
                mode: XffMode::Preserve,
                expected: &[
                    ("x-forwarded-for", "198.51.100.1"),
                    ("x-forwarded-for", "10.0.0.1 ,x"),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-port", "443"),
                ],
            },
            Case {
                name: "preserve does not create the header",
                input: &[],
                peer: V4,
                mode: XffMode::Preserve,
                expected: &[("x-forwarded-proto", "https"), ("x-forwarded-port", "443")],
            },
            Case {
                name: "remove deletes every line",
                input: &[
                    ("x-forwarded-for", "198.51.100.1"),
                    ("x-forwarded-for", "10.0.0.1"),
                ],
                peer: V4,
                mode: XffMode::Remove,
                expected: &[("x-forwarded-proto", "https"), ("x-forwarded-port", "443")],
            },
            Case {
                name: "client proto and port are replaced, host kept",
                input: &[
                    ("host", "example.com:8443"),
                    ("x-forwarded-proto", "http"),
                    ("x-forwarded-proto", "gopher"),
                    ("x-forwarded-port", "1"),
                ],
                peer: IpAddr::V6(Ipv6Addr::LOCALHOST),
                mode: XffMode::Remove,
                expected: &[
                    ("host", "example.com:8443"),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-port", "443"),
                ],
            },
        ];
        for case in cases {
            let mut headers = map(case.input);
            apply_forwarded(
                &mut headers,
                &ForwardedPeer::new(case.peer),
                &HeaderValue::from_static("https"),
                &forwarded_port(443),
                case.mode,
            )
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            assert_eq!(dump(&headers), owned(case.expected), "{}", case.name);
        }
    }

    /// One connection's [`ForwardedPeer`] serves all its requests: one without
    /// `X-Forwarded-For` gets the peer alone, one with it gets the peer appended, and the one
    /// after that the peer alone again (the append did not change the kept value).
    #[test]
    fn one_connections_peer_serves_requests_with_and_without_their_own_xff() {
        let peer = ForwardedPeer::new(IpAddr::V6(Ipv4Addr::new(10, 200, 0, 9).to_ipv6_mapped()));
        let (proto, port) = (HeaderValue::from_static("http"), forwarded_port(80));
        let requests: [(&[(&str, &str)], &str); 3] = [
            (&[], "10.200.0.9"),
            (
                &[("x-forwarded-for", "198.51.100.1")],
                "198.51.100.1, 10.200.0.9",
            ),
            (&[], "10.200.0.9"),
        ];
        for (i, (input, expected)) in requests.into_iter().enumerate() {
            let mut headers = map(input);
            apply_forwarded(&mut headers, &peer, &proto, &port, XffMode::Append).unwrap();
            let lines: Vec<_> = headers.get_all(X_FORWARDED_FOR).iter().collect();
            assert_eq!(lines, [expected], "request {i}");
        }
    }

    fn chain(n: usize) -> String {
        (1..=n)
            .map(|i| format!("10.0.0.{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    #[test]
    fn thirty_addresses_pass_and_thirty_one_are_refused() {
        // (received addresses, mode, expected outcome: Ok or the count reported)
        let cases: &[(usize, XffMode, Result<(), usize>)] = &[
            (29, XffMode::Append, Ok(())),
            (30, XffMode::Append, Err(31)),
            (30, XffMode::Preserve, Ok(())),
            (31, XffMode::Preserve, Err(31)),
            (30, XffMode::Remove, Ok(())),
            (31, XffMode::Remove, Err(31)),
        ];
        for &(received, mode, expected) in cases {
            let value = chain(received);
            let mut headers = map(&[("x-forwarded-for", &value)]);
            let outcome = apply_forwarded(
                &mut headers,
                &ForwardedPeer::new(V4),
                &HeaderValue::from_static("http"),
                &forwarded_port(80),
                mode,
            );
            assert_eq!(
                outcome,
                expected.map_err(|count| TooManyForwardedFor { count }),
                "{received} addresses, {mode}"
            );
            if outcome.is_err() {
                assert_eq!(
                    dump(&headers),
                    owned(&[("x-forwarded-for", &value)]),
                    "refused request left unchanged"
                );
            }
        }
    }

    #[test]
    fn the_limit_counts_addresses_across_lines() {
        let (first, second) = (chain(15), chain(15));
        let mut headers = map(&[("x-forwarded-for", &first), ("x-forwarded-for", &second)]);
        assert_eq!(
            apply_forwarded(
                &mut headers,
                &ForwardedPeer::new(V4),
                &HeaderValue::from_static("http"),
                &forwarded_port(80),
                XffMode::Append
            ),
            Err(TooManyForwardedFor { count: 31 })
        );
    }

    #[test]
    fn xff_modes_parse_case_insensitively() {
        assert_eq!("append".parse(), Ok(XffMode::Append));
        assert_eq!("Preserve".parse(), Ok(XffMode::Preserve));
        assert_eq!("REMOVE".parse(), Ok(XffMode::Remove));
        let err = "replace".parse::<XffMode>().unwrap_err();
        assert!(err.to_string().contains("append, preserve or remove"));
    }

    /// Whether `id` is `1-<8 hex>-<24 hex>` (lowercase).
    fn is_trace_id(id: &str) -> bool {
        let parts: Vec<&str> = id.split('-').collect();
        let hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        parts.len() == 3 && parts[0] == "1" && hex(parts[1], 8) && hex(parts[2], 24)
    }

    /// 2024-01-01T00:00:00Z = 0x65920080 seconds.
    fn new_year() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_704_067_200)
    }

    #[test]
    fn trace_id_table() {
        // (incoming lines, expected fields after the new first one, name of the new field)
        let cases: &[(&[&str], &[&str], &str)] = &[
            (&[], &[], "Root"),
            (
                &["Root=1-5759e988-bd862e3fe1be46a994272793"],
                &["Root=1-5759e988-bd862e3fe1be46a994272793"],
                "Self",
            ),
            (
                &[
                    "Self=1-67891234-12456789abcdef012345678;Root=1-67891233-abcdef012345678912345678;CalledFrom=app",
                ],
                &["Root=1-67891233-abcdef012345678912345678", "CalledFrom=app"],
                "Self",
            ),
            (
                &[
                    "Root=1-5759e988-bd862e3fe1be46a994272793; Parent=53995c3f42cd8ad8; Sampled=1; Self=1-00000000-000000000000000000000000; Lineage=a:1",
                ],
                &[
                    "Root=1-5759e988-bd862e3fe1be46a994272793",
                    "Parent=53995c3f42cd8ad8",
                    "Sampled=1",
                    "Lineage=a:1",
                ],
                "Self",
            ),
            (
                &["Root=1-5759e988-bd862e3fe1be46a994272793", "Custom=x"],
                &["Root=1-5759e988-bd862e3fe1be46a994272793", "Custom=x"],
                "Self",
            ),
            (
                &["Parent=53995c3f42cd8ad8;Sampled=0"],
                &["Parent=53995c3f42cd8ad8", "Sampled=0"],
                "Root",
            ),
        ];
        for (input, kept, new_field) in cases {
            let mut headers = HeaderMap::new();
            for line in *input {
                headers.append(X_AMZN_TRACE_ID, HeaderValue::from_str(line).unwrap());
            }
            let mut rng = StdRng::seed_from_u64(1);
            let value = trace_id(&mut headers, new_year(), &mut rng).clone();
            assert_eq!(headers.get_all(X_AMZN_TRACE_ID).iter().count(), 1);
            assert_eq!(headers.get(X_AMZN_TRACE_ID), Some(&value));
            let text = value.to_str().unwrap();
            let fields: Vec<&str> = text.split(';').collect();
            let (name, id) = fields[0].split_once('=').unwrap();
            assert_eq!(name, *new_field, "{input:?} → {text}");
            assert!(is_trace_id(id), "{input:?} → {text}");
            assert!(
                id.starts_with("1-65920080-"),
                "epoch seconds in hex: {text}"
            );
            assert_eq!(&fields[1..], *kept, "{input:?} → {text}");
        }
    }

    #[test]
    fn trace_ids_differ_per_request() {
        let mut rng = StdRng::seed_from_u64(2);
        let a = trace_id(&mut HeaderMap::new(), new_year(), &mut rng).clone();
        let b = trace_id(&mut HeaderMap::new(), new_year(), &mut rng).clone();
        assert_ne!(a, b);
    }

    #[test]
    fn refreshing_self_replaces_the_old_one() {
        let mut headers = HeaderMap::new();
        let mut rng = StdRng::seed_from_u64(3);
        let root = trace_id(&mut headers, new_year(), &mut rng).clone();
        let first = trace_id(&mut headers, new_year(), &mut rng).clone();
        let second = trace_id(&mut headers, new_year(), &mut rng).clone();
        let fields: Vec<&str> = second.to_str().unwrap().split(';').collect();
        assert_eq!(fields.len(), 2, "{second:?}");
        assert!(fields[0].starts_with("Self="));
        assert_eq!(fields[1], root.to_str().unwrap());
        assert_ne!(first, second);
    }

    /// The function as it was before it read `Connection` in its pass over the headers
    /// (`get_all`, then removals): the oracle of the property test below.
    fn strip_hop_by_hop_reference(headers: &mut HeaderMap, keep_upgrade: bool) {
        let present = headers
            .keys()
            .fold(0u16, |bits, name| bits | hop_by_hop_bit(name));
        if present == 0 {
            return;
        }
        let mut named: Vec<HeaderName> = Vec::new();
        let mut names_upgrade = false;
        if present & CONNECTION_BIT != 0 {
            for token in headers.get_all(CONNECTION).iter().flat_map(list_elements) {
                if token.eq_ignore_ascii_case(b"upgrade") {
                    names_upgrade = true;
                }
                if hop_by_hop_bit_of_token(token) != 0 || token.eq_ignore_ascii_case(b"host") {
                    continue;
                }
                if std::str::from_utf8(token).is_ok_and(|t| headers.contains_key(t))
                    && let Ok(name) = HeaderName::from_bytes(token)
                {
                    named.push(name);
                }
            }
        }
        let upgrading = keep_upgrade && names_upgrade && present & UPGRADE_BIT != 0;
        let upgrade: Vec<HeaderValue> = if upgrading {
            headers.get_all(UPGRADE).iter().cloned().collect()
        } else {
            Vec::new()
        };
        for name in named {
            headers.remove(name);
        }
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            if present & (1 << i) != 0 {
                headers.remove(name);
            }
        }
        if upgrading {
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            for value in upgrade {
                headers.append(UPGRADE, value);
            }
        }
    }

    /// `is_hop_by_hop` says of each name what `strip_hop_by_hop` does to it without a
    /// `Connection` naming it: removes it or not (the nine names, their near misses, others).
    #[test]
    fn the_hop_by_hop_names_are_those_strip_removes() {
        let mut removed = 0;
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authenticate",
            "proxy-authorization",
            "connectiom",
            "keep-alivf",
            "proxy-connectiom",
            "tf",
            "trailers",
            "transfer-encodinf",
            "upgradf",
            "proxy-authenticatf",
            "proxy-authorizatiom",
            "host",
            "x-connection",
            "content-length",
            "t",
            "u",
        ] {
            let name = HeaderName::from_static(name);
            let mut headers = HeaderMap::new();
            headers.append(name.clone(), HeaderValue::from_static("v"));
            headers.append(
                HeaderName::from_static("x-other"),
                HeaderValue::from_static("y"),
            );
            strip_hop_by_hop(&mut headers, false);
            let strip_removes = !headers.contains_key(&name);
            assert_eq!(is_hop_by_hop(&name), strip_removes, "{name}");
            removed += usize::from(strip_removes);
        }
        assert_eq!(removed, 9);
    }

    /// `strip_hop_by_hop` leaves exactly what the reference leaves, in the same order, over
    /// random header sets: every hop-by-hop name, end-to-end names, `Host`, names only a
    /// `Connection` token makes (`close`, `x-a`), several lines of a name, and `Connection`
    /// lines listing random tokens in random case (hop-by-hop names, `upgrade`, `host`,
    /// present and absent names, empty elements). Counts that the interesting cases came up.
    #[test]
    fn strip_hop_by_hop_matches_the_reference_over_random_header_sets() {
        use rand::Rng as _;
        use rand::seq::IndexedRandom as _;
        const NAMES: &[&str] = &[
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authenticate",
            "proxy-authorization",
            "host",
            "x-a",
            "x-b",
            "close",
            "cookie",
            "content-type",
            "date",
            "server",
        ];
        const TOKENS: &[&str] = &[
            "keep-alive",
            "Keep-Alive",
            "close",
            "CLOSE",
            "upgrade",
            "Upgrade",
            "host",
            "HOST",
            "x-a",
            "X-B",
            "x-absent",
            "te",
            "Transfer-Encoding",
            "proxy-authorization",
            "",
            " ",
        ];
        let mut rng = StdRng::seed_from_u64(23);
        let (mut named_removed, mut upgrades_kept, mut stripped) = (0, 0, 0);
        for round in 0..20_000 {
            let mut headers = HeaderMap::new();
            for _ in 0..rng.random_range(0..10) {
                let name = *NAMES.choose(&mut rng).expect("names");
                let value = if name == "connection" {
                    let tokens: Vec<&str> = (0..rng.random_range(1..4))
                        .map(|_| *TOKENS.choose(&mut rng).expect("tokens"))
                        .collect();
                    tokens.join(if rng.random_bool(0.5) { "," } else { " , " })
                } else {
                    format!("v{}", rng.random_range(0..100))
                };
                headers.append(
                    HeaderName::from_static(name),
                    HeaderValue::from_str(&value).expect("valid"),
                );
            }
            let keep_upgrade = rng.random_bool(0.5);
            let mut expected = headers.clone();
            strip_hop_by_hop_reference(&mut expected, keep_upgrade);
            let before = headers.len();
            strip_hop_by_hop(&mut headers, keep_upgrade);
            let list = |h: &HeaderMap| {
                h.iter()
                    .map(|(n, v)| (n.clone(), v.clone()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(list(&headers), list(&expected), "round {round}");
            for name in &HOP_BY_HOP {
                let allowed = usize::from(*name == CONNECTION || *name == UPGRADE);
                assert!(
                    headers.get_all(name).iter().count() <= allowed * before,
                    "round {round}: {name} kept"
                );
            }
            if headers.contains_key(UPGRADE) {
                upgrades_kept += 1;
            } else {
                assert!(!headers.contains_key(CONNECTION), "round {round}");
            }
            stripped += usize::from(headers.len() < before);
            let named_gone = ["x-a", "x-b", "close"]
                .iter()
                .any(|n| expected.len() < before && !expected.contains_key(*n));
            named_removed += usize::from(named_gone);
        }
        assert!(stripped > 5_000, "{stripped}");
        assert!(upgrades_kept > 100, "{upgrades_kept}");
        assert!(named_removed > 1_000, "{named_removed}");
    }

    /// Every hop-by-hop header goes whatever else is there, `Upgrade` and `Connection` only
    /// stay on an upgrade (the reference could share a bug with the function).
    #[test]
    fn no_hop_by_hop_header_survives_without_an_upgrade() {
        let mut headers = HeaderMap::new();
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            headers.append(name.clone(), HeaderValue::from(i));
            headers.append(HeaderName::from_static("x-kept"), HeaderValue::from(i));
        }
        headers.append(CONNECTION, HeaderValue::from_static("x-named, upgrade"));
        headers.insert(HeaderName::from_static("x-named"), HeaderValue::from(1));
        strip_hop_by_hop(&mut headers, false);
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
        assert_eq!(headers.len(), HOP_BY_HOP.len());
    }

    /// `hex8` gives what `format!` gives, and a trace id is the seconds' and the random
    /// numbers' digits in `format!`'s words.
    #[test]
    fn hex8_matches_format() {
        use rand::Rng as _;
        let mut rng = StdRng::seed_from_u64(8);
        for n in [
            0,
            1,
            9,
            0xa,
            0xf,
            0x10,
            0x9f,
            0xa0,
            0xff,
            0xabc,
            u32::MAX,
            0x0123_4567,
        ]
        .into_iter()
        .chain((0..0x100).map(|i| i * 0x0101_0101))
        .chain((0..20_000).map(|_| rng.random::<u32>() >> rng.random_range(0..32)))
        {
            assert_eq!(hex8(n), *format!("{n:08x}").as_bytes(), "{n:#x}");
        }
        for _ in 0..2_000 {
            let secs = rng.random::<u64>() >> rng.random_range(24..64);
            let now = UNIX_EPOCH + Duration::from_secs(secs);
            let seed = rng.random::<u64>();
            let mut drawn = StdRng::seed_from_u64(seed);
            let (high, low) = (
                rand::RngCore::next_u64(&mut drawn),
                rand::RngCore::next_u32(&mut drawn),
            );
            let mut out = [0u8; TRACE_ID_LEN];
            new_trace_id(&mut out, now, &mut StdRng::seed_from_u64(seed));
            let expected = format!("1-{:08x}-{high:016x}{low:08x}", secs & u64::from(u32::MAX));
            assert_eq!(std::str::from_utf8(&out).unwrap(), expected);
        }
    }

    #[test]
    fn hop_by_hop_table() {
        // (input, keep_upgrade, expected)
        type Headers = &'static [(&'static str, &'static str)];
        let cases: &[(&str, Headers, bool, Headers)] = &[
            (
                "every standard hop-by-hop header goes, end-to-end ones stay",
                &[
                    ("host", "example.com"),
                    ("connection", "keep-alive"),
                    ("keep-alive", "timeout=5"),
                    ("proxy-connection", "keep-alive"),
                    ("te", "trailers"),
                    ("trailer", "x-checksum"),
                    ("transfer-encoding", "chunked"),
                    ("upgrade", "h2c"),
                    ("proxy-authenticate", "Basic"),
                    ("proxy-authorization", "Basic Zm9vOmJhcg=="),
                    ("authorization", "Bearer t"),
                    ("content-type", "text/plain"),
                ],
                false,
                &[
                    ("host", "example.com"),
                    ("authorization", "Bearer t"),
                    ("content-type", "text/plain"),
                ],
            ),
            (
                "headers named in Connection go, on every Connection line",
                &[
                    ("connection", "close, X-Secret"),
                    ("connection", " x-other ,"),
                    ("x-secret", "1"),
                    ("x-other", "2"),
                    ("x-kept", "3"),
                ],
                false,
                &[("x-kept", "3")],
            ),
            (
                "a header named like a connection option goes too (`close` here)",
                &[("connection", "Close"), ("close", "1"), ("x-kept", "3")],
                false,
                &[("x-kept", "3")],
            ),
            (
                "Connection cannot remove Host",
                &[
                    ("host", "example.com"),
                    ("connection", "host, x-a"),
                    ("x-a", "1"),
                ],
                false,
                &[("host", "example.com")],
            ),
            (
                "websocket upgrade is kept when asked",
                &[
                    ("connection", "keep-alive, Upgrade"),
                    ("upgrade", "websocket"),
                    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                    ("keep-alive", "timeout=5"),
                ],
                true,
                &[
                    ("connection", "upgrade"),
                    ("upgrade", "websocket"),
                    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ],
            ),
            (
                "upgrade is removed when not asked to keep it",
                &[("connection", "upgrade"), ("upgrade", "websocket")],
                false,
                &[],
            ),
            (
                "hop-by-hop headers go without a Connection header too",
                &[
                    ("keep-alive", "timeout=5"),
                    ("proxy-connection", "keep-alive"),
                    ("x-kept", "3"),
                ],
                false,
                &[("x-kept", "3")],
            ),
            (
                "nothing hop-by-hop: nothing changes",
                &[("host", "example.com"), ("x-kept", "3"), ("x-kept", "4")],
                true,
                &[("host", "example.com"), ("x-kept", "3"), ("x-kept", "4")],
            ),
            (
                "Upgrade without Connection: upgrade is not an upgrade",
                &[("connection", "close"), ("upgrade", "websocket")],
                true,
                &[],
            ),
        ];
        for (name, input, keep_upgrade, expected) in cases {
            let mut headers = map(input);
            strip_hop_by_hop(&mut headers, *keep_upgrade);
            assert_eq!(dump(&headers), owned(expected), "{name}");
        }
    }

    #[test]
    fn keep_alive_timeout_table() {
        let cases: &[(&[&str], Option<u64>)] = &[
            (&[], None),
            (&["timeout=5"], Some(5_000)),
            (&["timeout=5, max=1000"], Some(5_000)),
            (&["max=1000, Timeout = 20"], Some(20_000)),
            (&["max=100", "timeout=\"7\""], Some(7_000)),
            (&["timeout=0"], Some(0)),
            (&["timeout=0.2"], Some(200)),
            (&["timeout=\"3.5\""], Some(3_500)),
            (&["timeout=86400"], Some(86_400_000)),
            (&["timeout=86401"], None),
            (&["timeout="], None),
            (&["timeout=."], None),
            (&["timeout=1.2.3"], None),
            (&["timeout=-1"], None),
            (&["timeout=+5"], None),
            (&["timeout=5s"], None),
            (&["timeout=1e12"], None),
            (&["timeout=NaN"], None),
            (&["timeout=abc"], None),
            (&["timeout=99999999999999999999999"], None),
            (&["max=5"], None),
            (&[""], None),
        ];
        for (lines, expected_ms) in cases {
            let mut headers = HeaderMap::new();
            for line in *lines {
                headers.append(KEEP_ALIVE, HeaderValue::from_str(line).unwrap());
            }
            assert_eq!(
                keep_alive_timeout(&headers),
                expected_ms.map(Duration::from_millis),
                "{lines:?}"
            );
        }
    }

    #[test]
    fn request_cookies_joins_every_cookie_line() {
        assert_eq!(request_cookies(&HeaderMap::new()), None);
        let one = map(&[("cookie", "a=1; b=2")]);
        assert!(
            matches!(
                request_cookies(&one),
                Some(std::borrow::Cow::Borrowed("a=1; b=2"))
            ),
            "a single line is borrowed"
        );
        let headers = map(&[("cookie", "a=1; b=2"), ("cookie", "AWSALB=x")]);
        assert_eq!(
            request_cookies(&headers).as_deref(),
            Some("a=1; b=2; AWSALB=x")
        );
    }

    #[test]
    fn cookie_values_are_found_by_exact_name() {
        let header = "a=1; AWSALB=x; awsalb=lower;AWSALBCORS=y; AWSALB=\"z\"; bad";
        let found: Vec<_> = cookie_values(header, "AWSALB").collect();
        assert_eq!(found, ["x", "z"]);
        assert_eq!(cookie_values(header, "missing").count(), 0);
    }
}
