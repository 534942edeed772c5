//! The future hyper gets from the service for each request it serves (HTTP/2 streams, and
//! HTTP/1 on hyper's path), and the native HTTP/2 path's streams (`h2native.rs`) too: the
//! pipeline's future, boxed, and on HTTP/2 one HPACK hint for the response's `Date`.
//!
//! The pipeline's future is large (it holds the whole request's state, the forward to the
//! target included). hyper's HTTP/2 server puts the service future inside its stream future
//! and hands that to the executor (`h2exec.rs`), which boxes it: the stream future was copied
//! twice on the way (about 1,200 instructions of `memcpy` per request, and a large allocation
//! on mimalloc's slow path). Boxed here once, only a pointer travels with the stream.
//!
//! HTTP/2 `Date`: the same header, value and position reach the client; only its HPACK
//! representation changes, from "literal with incremental indexing" (then "indexed" while the
//! second lasts) to "literal never indexed" (RFC 7541 §6.2.3), marked through
//! [`http::HeaderValue::set_sensitive`]. Why: h2's encoder chains the dynamic-table entries
//! of one header name from oldest to newest and walks the whole chain for every header it
//! encodes. `Date` changes every second, so each second of a connection's life leaves one more
//! entry; after about a minute the 4 KiB table holds some 60 dates and every response walked
//! all of them (about 70 instructions each: 4,300 per request on a 70 s old connection, 1,000
//! to 3,000 on younger ones). Never indexed, a date costs its Huffman encoding (about 550
//! instructions) whatever the connection's age, and about 20 more bytes in the HEADERS frame.
//! Responses without a `Date` (the load balancer's own: fixed responses, redirects, errors)
//! get one here, the current second's, also never indexed (a rule answering many requests
//! itself would otherwise chain its dates the same way). hyper's own `Date` for HTTP/2 is off
//! (`auto_date_header(false)` in `server.rs`): it looked the header up a second time in every
//! response (about 170 instructions per request) only to find the target's. `Date` is found
//! by a scan of the (short) response head, not a hashed lookup.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::{self, Entry};
use http::{HeaderMap, HeaderValue, Request, Response, Version};

use super::pipeline::{self, ConnCtx};
use crate::proxy::client::ProxyBody;

/// What the service answers: the response, never an error (the pipeline makes its own).
type Answered = Result<Response<ProxyBody>, Infallible>;

/// One request's service future (module docs).
pub(super) struct Respond {
    inner: Pin<Box<dyn Future<Output = Answered> + Send>>,
    /// An HTTP/2 request: its response's `Date` is not indexed, and added if missing (module
    /// docs).
    h2: bool,
}

impl Respond {
    /// Starts the pipeline for `req`, its future built in its heap slot: the allocation comes
    /// first, so the compiler writes the new future's few initial fields (the arguments)
    /// straight into it. `Box::pin(pipeline::handle(..))` built the whole future (4,928 bytes
    /// in the release build) on the stack and copied it into the box: a 4,928-byte `memcpy`
    /// per request onto cold memory, about 75 L1 data-cache write misses per HTTP/2 request
    /// in callgrind's simulation. Written here rather than through a helper taking a closure:
    /// the closure holding `req` was one more copy of the request (52 instructions of
    /// `memcpy` per request).
    pub(super) fn new<B: pipeline::RequestBody>(ctx: &Arc<ConnCtx>, req: Request<B>) -> Self {
        let h2 = req.version() == Version::HTTP_2;
        let slot = Box::new_uninit();
        let future = Box::write(slot, pipeline::handle(ctx.clone(), req));
        Self {
            h2,
            inner: Box::into_pin(future),
        }
    }
}

impl Future for Respond {
    type Output = Answered;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answered> {
        let this = self.get_mut();
        let mut answered = ready!(this.inner.as_mut().poll(cx));
        if this.h2
            && let Ok(response) = &mut answered
        {
            date_not_indexed(response.headers_mut());
        }
        Poll::Ready(answered)
    }
}

/// Marks every `Date` value for HPACK's "never indexed" representation, values unchanged; a
/// response without one gets the current second's, marked the same (module docs).
///
/// A usual response head (a handful of headers) is scanned for `Date` rather than looked up:
/// comparing a standard name is a byte compare, while the hashed lookup (`entry`) cost about
/// 170 instructions per response. Heads longer than [`DATE_SCAN_MAX`] lines are looked up, so
/// the scan never costs more than the lookup it replaces.
fn date_not_indexed(headers: &mut HeaderMap) {
    if headers.len() <= DATE_SCAN_MAX {
        let mut found = false;
        for (name, value) in headers.iter_mut() {
            if *name == header::DATE {
                value.set_sensitive(true);
                found = true;
            }
        }
        if !found {
            headers.insert(header::DATE, current_date());
        }
        return;
    }
    match headers.entry(header::DATE) {
        Entry::Occupied(mut dates) => {
            for date in dates.iter_mut() {
                date.set_sensitive(true);
            }
        }
        Entry::Vacant(slot) => {
            slot.insert(current_date());
        }
    }
}

/// Most header lines [`date_not_indexed`] scans; beyond, it looks `Date` up.
const DATE_SCAN_MAX: usize = 16;

/// The current second's date ([`crate::proxy::date`]), marked never indexed.
fn current_date() -> HeaderValue {
    let mut value = crate::proxy::date::with_current(HeaderValue::clone);
    value.set_sensitive(true);
    value
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;
    use http::HeaderValue;

    #[test]
    fn date_is_marked_not_indexed_and_nothing_else_changes() {
        let mut headers = HeaderMap::new();
        headers.insert(header::SERVER, HeaderValue::from_static("nginx"));
        headers.append(
            header::DATE,
            HeaderValue::from_static("Sun, 29 Nov 2026 16:00:14 GMT"),
        );
        headers.append(
            header::DATE,
            HeaderValue::from_static("Sun, 29 Nov 2026 16:00:15 GMT"),
        );
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let before: Vec<_> = headers
            .iter()
            .map(|(n, v)| (n.clone(), v.as_bytes().to_vec()))
            .collect();
        date_not_indexed(&mut headers);
        let after: Vec<_> = headers
            .iter()
            .map(|(n, v)| (n.clone(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(before, after, "names, values and order unchanged");
        assert_eq!(headers.get_all(header::DATE).iter().count(), 2);
        assert!(
            headers
                .get_all(header::DATE)
                .iter()
                .all(HeaderValue::is_sensitive)
        );
        assert!(!headers[header::SERVER].is_sensitive());
        assert!(!headers[header::CONTENT_TYPE].is_sensitive());
    }

    /// A head longer than the scan's limit takes the hashed lookup: the same result, with and
    /// without a `Date` (both paths run: one line below the limit, then one above).
    #[test]
    fn long_heads_are_looked_up_with_the_same_result() {
        for lines in [DATE_SCAN_MAX - 1, DATE_SCAN_MAX + 8] {
            for with_date in [true, false] {
                let mut headers = HeaderMap::new();
                for i in 0..lines {
                    headers.append(header::SET_COOKIE, HeaderValue::from(i));
                }
                if with_date {
                    headers.append(
                        header::DATE,
                        HeaderValue::from_static("Sun, 29 Nov 2026 16:00:14 GMT"),
                    );
                }
                date_not_indexed(&mut headers);
                let dates: Vec<_> = headers.get_all(header::DATE).iter().collect();
                assert_eq!(dates.len(), 1, "{lines} lines, date {with_date}");
                assert!(dates[0].is_sensitive(), "{lines} lines, date {with_date}");
                if with_date {
                    assert_eq!(dates[0], "Sun, 29 Nov 2026 16:00:14 GMT");
                }
                assert_eq!(headers.len(), lines + 1);
                assert!(
                    headers
                        .get_all(header::SET_COOKIE)
                        .iter()
                        .all(|v| !v.is_sensitive())
                );
            }
        }
    }

    #[test]
    fn a_response_without_date_gets_the_current_second_not_indexed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::SERVER, HeaderValue::from_static("lb"));
        let before = SystemTime::now();
        date_not_indexed(&mut headers);
        let after = SystemTime::now();
        assert_eq!(headers.len(), 2);
        assert!(!headers[header::SERVER].is_sensitive());
        let date = &headers[header::DATE];
        assert!(date.is_sensitive());
        let text = date.to_str().expect("ASCII");
        assert_eq!(text.len(), 29, "IMF-fixdate: {text}");
        assert!(text.ends_with(" GMT"), "{text}");
        let at = httpdate::parse_http_date(text).expect("an HTTP date");
        let second = |t: SystemTime| t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
        assert!(
            (second(before)..=second(after)).contains(&second(at)),
            "{text} is not between the clock's readings around the call"
        );
        // The per-thread cache hands out the same value within the second, marked each time.
        let mut again = HeaderMap::new();
        date_not_indexed(&mut again);
        assert!(again[header::DATE].is_sensitive());
        assert!(httpdate::parse_http_date(again[header::DATE].to_str().expect("ASCII")).is_ok());
    }
}
