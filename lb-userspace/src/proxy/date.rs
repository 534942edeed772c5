//! The current second as an HTTP date (RFC 9110 IMF-fixdate), for the `Date` of the responses
//! both servers write: formatted once a second per thread, as hyper caches its own. The
//! native HTTP/1 server copies its bytes into the head it writes; the HTTP/2 service hands h2
//! a reference-counted copy.
use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderValue;

thread_local! {
    static CACHED: RefCell<Option<(u64, HeaderValue)>> = const { RefCell::new(None) };
}

/// Calls `f` with the current second's date.
pub fn with_current<R>(f: impl FnOnce(&HeaderValue) -> R) -> R {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let make = || {
        HeaderValue::from_maybe_shared(bytes::Bytes::from(httpdate::fmt_http_date(now)))
            .expect("an HTTP date is a valid header value")
    };
    let mut f = Some(f);
    let cached = CACHED.try_with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.as_ref().is_none_or(|(at, _)| *at != secs) {
            *cached = Some((secs, make()));
        }
        let (_, value) = cached.as_ref().expect("set above");
        (f.take().expect("called once"))(value)
    });
    // The thread's storage is being torn down: format without the cache.
    cached.unwrap_or_else(|_| (f.take().expect("not called"))(&make()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The date is the clock's second between readings around the call, in IMF-fixdate; a
    /// second call within the second hands out the cached value.
    #[test]
    fn the_current_date_is_the_clocks_second_in_imf_fixdate() {
        let second = |t: SystemTime| t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
        let before = SystemTime::now();
        let (first, again) = (
            with_current(HeaderValue::clone),
            with_current(HeaderValue::clone),
        );
        let after = SystemTime::now();
        for value in [&first, &again] {
            let text = value.to_str().expect("ASCII");
            assert_eq!(text.len(), 29, "IMF-fixdate: {text}");
            assert!(text.ends_with(" GMT"), "{text}");
            let at = httpdate::parse_http_date(text).expect("an HTTP date");
            assert!(
                (second(before)..=second(after)).contains(&second(at)),
                "{text} is not between the clock's readings around the call"
            );
        }
    }
}
