//! Header maps and head buffers used again instead of allocated per request (native HTTP/1
//! path).
//!
//! Each HTTP/1.1 request the native path forwards builds two header maps: the request's (from
//! the client's head, `server/head.rs`) and the target's response's (`client/h1.rs`). A map
//! is two heap blocks (its index table and its entries). Once a map has done its work (the
//! response head is written to the client, the request head to the target and its response
//! has arrived) it is emptied and kept on the worker thread that finished with it, and the
//! next request built on that thread takes it. Maps move between tokio's worker threads with
//! their requests, so each thread's list fills where maps are finished and drains where they
//! are built; a thread whose list is empty allocates as before.
//!
//! What is kept is bounded: at most [`KEEP`] maps per thread, none that grew beyond
//! [`MAX_CAPACITY`] headers (a request with hundreds of headers does not pin its memory).
//!
//! The request head our own client writes to a target is serialized into one buffer per
//! thread the same way ([`buffer`], [`recycle_buffer`]): it is needed only until it is written.
use std::cell::{Cell, RefCell};

use http::HeaderMap;

/// Maps kept per thread. More than the requests a thread has in flight at its busiest is
/// useless; 64 covers 64 keep-alive connections served by one thread.
const KEEP: usize = 64;
/// Maps with room for more headers than this are freed, not kept.
const MAX_CAPACITY: usize = 64;

/// Buffers that grew beyond this are freed, not kept.
const MAX_BUFFER: usize = 16 * 1024;

thread_local! {
    static MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
    static BUFFER: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// An empty byte buffer: the one kept on this thread if it is free, else a new (empty, not yet
/// allocated) one.
pub fn buffer() -> Vec<u8> {
    BUFFER.try_with(Cell::take).unwrap_or_default()
}

/// Gives back a buffer whose bytes are written: emptied and kept for [`buffer`] (one per
/// thread; the larger of two is kept).
pub fn recycle_buffer(mut buf: Vec<u8>) {
    if buf.capacity() > MAX_BUFFER {
        return;
    }
    buf.clear();
    let _ = BUFFER.try_with(|kept| {
        let other = kept.take();
        kept.set(if other.capacity() > buf.capacity() {
            other
        } else {
            buf
        });
    });
}

/// An empty header map with room for at least `capacity` headers: one finished with on this
/// thread if there is one, else a new one.
pub fn header_map(capacity: usize) -> HeaderMap {
    // `try_with`: the thread-local may already be gone while a thread shuts down.
    let kept = MAPS
        .try_with(|maps| maps.try_borrow_mut().ok()?.pop())
        .ok()
        .flatten();
    match kept {
        Some(mut map) => {
            map.reserve(capacity);
            map
        }
        None => HeaderMap::with_capacity(capacity),
    }
}

/// Gives back a map whose request or response is done with: emptied (its values are dropped
/// now) and kept for [`header_map`] if there is room.
pub fn recycle(mut map: HeaderMap) {
    if map.capacity() == 0 || map.capacity() > MAX_CAPACITY {
        return;
    }
    map.clear();
    let _ = MAPS.try_with(|maps| {
        if let Ok(mut maps) = maps.try_borrow_mut()
            && maps.len() < KEEP
        {
            maps.push(map);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::tests::allocations::so_far;
    use http::header::{HOST, USER_AGENT};
    use http::{HeaderName, HeaderValue};

    fn drain() {
        MAPS.with(|maps| maps.borrow_mut().clear());
    }

    fn fill(map: &mut HeaderMap) {
        map.insert(HOST, HeaderValue::from_static("example.com"));
        map.insert(USER_AGENT, HeaderValue::from_static("test"));
    }

    #[test]
    fn a_map_given_back_is_taken_again_empty_and_without_allocating() {
        drain();
        let mut map = header_map(8);
        fill(&mut map);
        recycle(map);
        let before = so_far();
        let mut again = header_map(8);
        assert!(again.is_empty(), "a kept map still had its headers");
        fill(&mut again);
        let after = so_far();
        assert_eq!(after - before, 0, "a kept map allocated");
        assert_eq!(again.len(), 2);
        // Control: with nothing kept, a map is allocated, and the counter sees it.
        drain();
        let fresh = std::hint::black_box(header_map(8));
        assert!(so_far() > after, "the counter missed a new map");
        drop((again, fresh));
    }

    #[test]
    fn a_buffer_given_back_is_taken_again_empty_and_without_allocating() {
        drop(buffer());
        let mut buf = buffer();
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        recycle_buffer(buf);
        let before = so_far();
        let mut again = buffer();
        assert!(again.is_empty(), "a kept buffer still had its bytes");
        again.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let after = so_far();
        assert_eq!(after - before, 0, "a kept buffer allocated");
        // Control: while the kept one is out, a new one allocates, and the counter sees it.
        let mut other = buffer();
        other.extend_from_slice(b"x");
        assert!(so_far() > after, "the counter missed a new buffer");
        // A big one is not kept.
        recycle_buffer(Vec::with_capacity(MAX_BUFFER + 1));
        assert_eq!(buffer().capacity(), 0);
        drop((again, other));
    }

    #[test]
    fn big_maps_and_more_than_the_limit_are_not_kept() {
        drain();
        let mut big = HeaderMap::with_capacity(MAX_CAPACITY + 1);
        big.insert(HOST, HeaderValue::from_static("x"));
        recycle(big);
        assert_eq!(MAPS.with(|m| m.borrow().len()), 0, "a big map was kept");
        for _ in 0..KEEP + 5 {
            recycle(HeaderMap::with_capacity(4));
        }
        assert_eq!(MAPS.with(|m| m.borrow().len()), KEEP);
        // An unused empty map (no capacity) is not worth keeping.
        drain();
        recycle(HeaderMap::new());
        assert_eq!(MAPS.with(|m| m.borrow().len()), 0);
        drain();
    }

    #[test]
    fn a_kept_map_grows_for_what_is_asked() {
        drain();
        recycle(HeaderMap::with_capacity(2));
        let mut map = header_map(20);
        assert!(map.capacity() >= 20);
        for i in 0..20 {
            map.insert(
                HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        assert_eq!(map.len(), 20);
        drain();
    }
}
