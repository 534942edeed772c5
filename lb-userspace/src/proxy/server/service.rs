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
use std::alloc::Layout;
use std::convert::Infallible;
use std::future::Future;
use std::mem::{ManuallyDrop, MaybeUninit};
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header;
use http::{HeaderMap, HeaderValue, Request, Response, Version};

use super::pipeline::{self, ConnCtx};
use super::spares::Spares;
use crate::headers::for_each_value_mut;
use crate::proxy::client::ProxyBody;

/// What the service answers: the response, never an error (the pipeline makes its own).
type Answered = Result<Response<ProxyBody>, Infallible>;

/// The pipeline's future, boxed.
type Pipeline = Pin<Box<dyn Future<Output = Answered> + Send>>;

/// One request's service future (module docs).
pub(super) struct Respond {
    /// Taken only in `drop`, which keeps its allocation for the thread's next request.
    inner: ManuallyDrop<Pipeline>,
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
    ///
    /// The heap slot is a finished request's when this thread has one of the right layout
    /// ([`Spares`]): a 4.9 KB allocation is mimalloc's slow path (about 250 instructions per
    /// request, and 70 more to free it).
    pub(super) fn new<B: pipeline::RequestBody>(ctx: &Arc<ConnCtx>, req: Request<B>) -> Self {
        let h2 = req.version() == Version::HTTP_2;
        let (req, body_in) = pipeline::forwardable(req);
        let slot = slot_for(&pipeline::handle::<Arc<ConnCtx>>);
        let future = Box::write(slot, pipeline::handle(ctx.clone(), req, body_in, None));
        Self {
            h2,
            inner: ManuallyDrop::new(Box::into_pin(future)),
        }
    }
}

impl Drop for Respond {
    fn drop(&mut self) {
        // SAFETY: `inner` is not used after this.
        let inner = unsafe { ManuallyDrop::take(&mut self.inner) };
        let layout = Layout::for_value(&*inner);
        if layout.size() == 0 {
            return;
        }
        // SAFETY: the future is dropped in place and never moved; only its allocation is
        // kept (or freed with the layout it was allocated with, `Box`'s).
        unsafe {
            let raw = Box::into_raw(Pin::into_inner_unchecked(inner));
            std::ptr::drop_in_place(raw);
            let ptr = NonNull::new_unchecked(raw.cast::<u8>());
            Spares::put(ptr, layout);
        }
    }
}

/// A heap slot for the future `make` returns: a spare one of its layout, else a new one.
/// `make` is only named, never called: it lets the caller's future type, which has no name,
/// be inferred, so the future can still be built in place.
fn slot_for<A, R, N, W, F>(_make: &impl FnOnce(A, R, N, W) -> F) -> Box<MaybeUninit<F>> {
    let layout = Layout::new::<F>();
    match Spares::take(layout) {
        // SAFETY: allocated by the global allocator with exactly this layout (a `Box` of a
        // future of this size and alignment), and no longer used by anything.
        Some(ptr) => unsafe { Box::from_raw(ptr.as_ptr().cast::<MaybeUninit<F>>()) },
        None => Box::new_uninit(),
    }
}

impl Future for Respond {
    type Output = Answered;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answered> {
        let this = self.get_mut();
        let mut answered = ready!(Pin::as_mut(&mut this.inner).poll(cx));
        if this.h2
            && let Ok(response) = &mut answered
        {
            date_not_indexed(response.headers_mut());
        }
        Poll::Ready(answered)
    }
}

/// Marks every `Date` value for HPACK's "never indexed" representation, values unchanged; a
/// response without one gets the current second's, marked the same (module docs). A usual
/// head is scanned for `Date`, not looked up ([`for_each_value_mut`]).
fn date_not_indexed(headers: &mut HeaderMap) {
    if !for_each_value_mut(headers, header::DATE, |date| date.set_sensitive(true)) {
        headers.insert(header::DATE, current_date());
    }
}

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

    fn spares() -> usize {
        Spares::kept()
    }

    /// Sets its flag when dropped.
    struct Dropped(Arc<std::sync::atomic::AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    async fn big(flag: Dropped, byte: u8, (): (), (): ()) -> Answered {
        let pad = [byte; 4096];
        std::future::pending::<()>().await;
        drop(flag);
        std::hint::black_box(pad);
        unreachable!()
    }

    async fn small(flag: Dropped, _byte: u8, (): (), (): ()) -> Answered {
        std::future::pending::<()>().await;
        drop(flag);
        unreachable!()
    }

    fn respond(inner: Pipeline) -> Respond {
        Respond {
            inner: ManuallyDrop::new(inner),
            h2: true,
        }
    }

    /// A dropped request's heap slot is kept by the thread (its future dropped) and given to
    /// the next future of the same layout, in place; a future of another layout gets its own.
    #[test]
    fn a_finished_requests_heap_slot_is_reused_by_the_next() {
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let before = spares();
        let slot = slot_for(&big);
        let first = Box::write(slot, big(Dropped(flag.clone()), 1, (), ()));
        let addr = std::ptr::from_ref(&*first).cast::<u8>();
        drop(respond(Box::into_pin(first)));
        assert!(
            flag.load(std::sync::atomic::Ordering::SeqCst),
            "the future was dropped"
        );
        assert_eq!(spares(), before + 1, "its slot was kept");

        // Another layout: not given the kept slot.
        let other = Box::write(slot_for(&small), small(Dropped(flag.clone()), 2, (), ()));
        assert_eq!(
            spares(),
            before + 1,
            "a slot of another layout is not taken"
        );
        drop(respond(Box::into_pin(other)));
        assert_eq!(spares(), before + 2);
        let other = Box::write(slot_for(&small), small(Dropped(flag.clone()), 2, (), ()));
        assert_eq!(spares(), before + 1, "the small slot was taken");
        drop(other);

        // Same layout: the kept slot, written in place.
        let second = Box::write(slot_for(&big), big(Dropped(flag.clone()), 3, (), ()));
        assert_eq!(
            std::ptr::from_ref(&*second).cast::<u8>(),
            addr,
            "the same slot"
        );
        assert_eq!(spares(), before);
        drop(respond(Box::into_pin(second)));
    }

    /// At most `SPARES_MAX` slots are kept; the others are freed.
    #[test]
    fn a_thread_keeps_a_bounded_number_of_slots() {
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let all: Vec<Respond> = (0..crate::proxy::server::spares::SPARES_MAX + 5)
            .map(|i| {
                let fut = Box::write(slot_for(&big), big(Dropped(flag.clone()), i as u8, (), ()));
                respond(Box::into_pin(fut))
            })
            .collect();
        drop(all);
        assert_eq!(spares(), crate::proxy::server::spares::SPARES_MAX);
    }

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
        use crate::headers::SCAN_MAX;
        for lines in [SCAN_MAX - 1, SCAN_MAX + 8] {
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
