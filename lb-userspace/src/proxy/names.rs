//! Header names parsed once per connection (native HTTP/1 path).
//!
//! A keep-alive client sends the same header names in the same order on every request, and a
//! target answers every response with the same names in the same order. Each connection
//! (the client's sniffer, our own client's pooled target connection) keeps the names of its
//! previous head by position; a name written the same way at the same position again is that
//! name, cloned, instead of parsed again by `HeaderName::from_bytes`.
//!
//! Why: the parse dispatches on the name's length and bytes through jump tables whose target
//! changes from one header to the next, and it is a few hundred bytes of code on every
//! header. In callgrind's simulation of an HTTP/1.1 request it was the largest single source
//! of mispredicted indirect branches (BENCHMARKS.md, branch `h1ind`). The check that replaces
//! it is a comparison of the written bytes with those of the previous head's name at that
//! position, eight bytes at a time.
//!
//! The result is exactly the parse's: the same bytes parse to the same name. Anything else is
//! parsed as before (a name written in another case, or at another position, included).
use http::header::{HeaderName, InvalidHeaderName};

/// Positions kept per connection: heads with more headers parse the rest each time.
const KEEP: usize = 32;
/// Bytes of written names kept per connection (beyond them, names are parsed each time).
const KEEP_BYTES: usize = 1024;

/// The header names of a connection's previous head, by position.
#[derive(Debug, Default)]
pub struct HeaderNames {
    /// The names as written, one after another.
    written: Vec<u8>,
    /// Each position's name, and where its written form ends in `written` (it starts where
    /// the previous one ends).
    seen: Vec<(u32, HeaderName)>,
}

impl HeaderNames {
    /// Nothing kept yet (allocates nothing).
    pub const fn new() -> Self {
        Self {
            written: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// The name written as `written`, the `index`th name parsed in its head: what
    /// `HeaderName::from_bytes(written)` returns. Always inlined into the response parse's
    /// loop: where the compiler left it a call (it did when other code in the crate changed),
    /// it cost about 50 instructions more per field.
    #[inline(always)]
    pub fn get(&mut self, index: usize, written: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
        if let Some((end, name)) = self.seen.get(index) {
            let start = index.checked_sub(1).map_or(0, |i| self.seen[i].0 as usize);
            if same_bytes(&self.written[start..*end as usize], written) {
                return Ok(name.clone());
            }
        }
        self.parse(index, written)
    }

    /// A name not written this way at this position before: parsed, and kept for the next
    /// head in place of what was kept from this position on.
    #[inline(never)]
    fn parse(&mut self, index: usize, written: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
        let name = HeaderName::from_bytes(written)?;
        if index <= self.seen.len() && index < KEEP {
            self.seen.truncate(index);
            let start = self.seen.last().map_or(0, |(end, _)| *end as usize);
            self.written.truncate(start);
            if start + written.len() <= KEEP_BYTES {
                self.written.extend_from_slice(written);
                // Lossless: at most `KEEP_BYTES`.
                self.seen.push((self.written.len() as u32, name.clone()));
            }
        }
        Ok(name)
    }
}

/// `a == b`, for the short slices header names are: eight bytes at a time (the last eight
/// overlapping), without a call to `memcmp`.
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| u64::from_ne_bytes(s[at..at + 8].try_into().unwrap_or([0; 8]));
    let half = |s: &[u8], at: usize| u32::from_ne_bytes(s[at..at + 4].try_into().unwrap_or([0; 4]));
    if n >= 8 {
        let mut at = 0;
        while at + 8 < n {
            if word(a, at) != word(b, at) {
                return false;
            }
            at += 8;
        }
        word(a, n - 8) == word(b, n - 8)
    } else if n >= 4 {
        half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4)
    } else {
        a == b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_seen_before_is_the_name_parsed() {
        let mut names = HeaderNames::new();
        let written: [&[u8]; 6] = [
            b"Host",
            b"X-Custom-Thing",
            b"content-type",
            b"HOST",
            b"x-custom-thing",
            b"Accept",
        ];
        // Heads with the same names, in the same order again (kept names answer) and in
        // other orders (names parsed): every answer is the parse's.
        for round in [0, 0, 1, 1, 2, 0, 0] {
            for (i, w) in written.iter().cycle().skip(round).take(6).enumerate() {
                assert_eq!(
                    names.get(i, w).expect("valid"),
                    HeaderName::from_bytes(w).expect("valid"),
                    "{round} {i}"
                );
            }
        }
    }

    #[test]
    fn the_same_name_again_is_the_kept_one_not_parsed_again() {
        let mut names = HeaderNames::new();
        let first = names.get(0, b"X-Custom").expect("valid");
        let again = names.get(0, b"X-Custom").expect("valid");
        // A name `http` does not know owns its bytes: the kept one is shared, not copied.
        assert_eq!(first.as_str().as_ptr(), again.as_str().as_ptr());
        // Control: a parse makes a copy of its own.
        let parsed = HeaderName::from_bytes(b"X-Custom").expect("valid");
        assert_ne!(first.as_str().as_ptr(), parsed.as_str().as_ptr());
    }

    #[test]
    fn a_name_written_differently_is_parsed_again() {
        let mut names = HeaderNames::new();
        assert_eq!(names.get(0, b"x-a").expect("valid").as_str(), "x-a");
        // Same length, one byte different: not the kept name.
        assert_eq!(names.get(0, b"x-b").expect("valid").as_str(), "x-b");
        // Every length the comparison handles, each byte changed in turn (the last one of an
        // overlapping word included).
        for len in 1..=40 {
            let kept: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let mut names = HeaderNames::new();
            names.get(0, &kept).expect("valid");
            for at in 0..len {
                let mut other = kept.clone();
                other[at] = b'-';
                assert_eq!(
                    names.get(0, &other).expect("valid").as_str().as_bytes(),
                    &other[..],
                    "{len} {at}"
                );
                // `names` now keeps `other`: the original is parsed again, and then kept.
                assert_eq!(
                    names.get(0, &kept).expect("valid").as_str().as_bytes(),
                    &kept[..]
                );
            }
        }
        // A prefix of the kept name: not the kept name.
        assert_eq!(names.get(0, b"x-").expect("valid").as_str(), "x-");
        // Invalid bytes are refused as by the parse, whatever is kept.
        assert!(names.get(0, b"x-\xe9").is_err());
        assert!(names.get(0, b"").is_err());
        assert!(names.get(0, b"x a").is_err());
        assert_eq!(names.get(0, b"X-").expect("valid").as_str(), "x-");
    }

    #[test]
    fn only_the_first_positions_are_kept() {
        let mut names = HeaderNames::new();
        for i in 0..KEEP + 8 {
            names.get(i, format!("x-{i}").as_bytes()).expect("valid");
        }
        assert_eq!(names.seen.len(), KEEP);
        assert_eq!(names.written.len(), names.seen[KEEP - 1].0 as usize);
        // A position beyond the kept ones still answers.
        let far = format!("x-{}", KEEP + 3);
        assert_eq!(
            names.get(KEEP + 3, far.as_bytes()).expect("valid").as_str(),
            far
        );
        // A gap (position 1 before 0) keeps nothing out of order.
        let mut gap = HeaderNames::new();
        gap.get(1, b"x-one").expect("valid");
        assert!(gap.seen.is_empty());
    }
}
