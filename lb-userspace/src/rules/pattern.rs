//! ALB wildcard patterns: `*` matches zero or more characters, `?` exactly one.
//!
//! Patterns are compiled once at configuration time into a token list; matching is iterative
//! (the classic "remember the last `*` and retry from one character further" algorithm), so it
//! runs in O(pattern × text) time with O(1) memory and never recurses, whatever the pattern
//! (`*a*a*a*a*a*b` against a long run of `a` included). Matching allocates nothing: case
//! folding is ASCII-only and done byte by byte, percent-decoding (for query strings) is done
//! on the fly by the [`Text`] cursor.
//!
//! "Character" means a UTF-8 scalar when the text holds valid UTF-8 at that point, otherwise a
//! single byte, so `?` matches `é` (two bytes) just as it matches `e`.

/// One compiled pattern element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// A literal byte (already ASCII-lowercased when the pattern is case-insensitive).
    Byte(u8),
    /// `?`: exactly one character.
    One,
    /// `*`: zero or more characters (runs of `*` are collapsed into one at compile time).
    Star,
}

/// A compiled wildcard pattern, immutable after configuration.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    toks: Box<[Tok]>,
    /// Compare ASCII letters case-insensitively.
    fold: bool,
    /// Number of `*`/`?` as written (escaped ones excluded): ALB caps wildcards per rule.
    wildcards: usize,
}

impl Pattern {
    /// Compiles `src`. With `escapes`, `\*`, `\?` and `\\` stand for the literal character
    /// (ALB allows this in query-string conditions only); any other backslash is literal.
    pub(crate) fn compile(src: &str, fold: bool, escapes: bool) -> Self {
        let bytes = src.as_bytes();
        let mut toks = Vec::with_capacity(bytes.len());
        let mut wildcards = 0;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            i += 1;
            let tok = match b {
                b'\\' if escapes && matches!(bytes.get(i), Some(b'*' | b'?' | b'\\')) => {
                    let lit = bytes[i];
                    i += 1;
                    Tok::Byte(lit)
                }
                b'*' => {
                    wildcards += 1;
                    if toks.last() == Some(&Tok::Star) {
                        continue;
                    }
                    Tok::Star
                }
                b'?' => {
                    wildcards += 1;
                    Tok::One
                }
                _ if fold => Tok::Byte(b.to_ascii_lowercase()),
                _ => Tok::Byte(b),
            };
            toks.push(tok);
        }
        Self {
            toks: toks.into_boxed_slice(),
            fold,
            wildcards,
        }
    }

    /// How many wildcard characters the pattern was written with.
    pub(crate) fn wildcards(&self) -> usize {
        self.wildcards
    }

    /// Does the whole of `text` match the whole pattern?
    pub(crate) fn matches(&self, text: &[u8]) -> bool {
        self.matches_text(&Raw(text))
    }

    /// Does the whole of `text`, percent-decoded on the fly, match the whole pattern?
    pub(crate) fn matches_decoded(&self, text: &[u8]) -> bool {
        self.matches_text(&PercentDecoded(text))
    }

    fn matches_text<T: Text>(&self, text: &T) -> bool {
        let pat = &self.toks;
        let (mut p, mut t) = (0, 0);
        // The most recent `*`: the pattern index just after it, and where in the text its
        // match currently ends. Earlier stars never need revisiting: whatever they could
        // absorb, the latest star can absorb too.
        let mut star: Option<(usize, usize)> = None;
        loop {
            match pat.get(p) {
                Some(Tok::Star) => {
                    p += 1;
                    star = Some((p, t));
                    continue;
                }
                Some(Tok::One) => {
                    if let Some(next) = step_char(text, t) {
                        p += 1;
                        t = next;
                        continue;
                    }
                }
                Some(&Tok::Byte(want)) => {
                    if let Some((got, next)) = text.at(t) {
                        let got = if self.fold {
                            got.to_ascii_lowercase()
                        } else {
                            got
                        };
                        if got == want {
                            p += 1;
                            t = next;
                            continue;
                        }
                    }
                }
                None if text.at(t).is_none() => return true,
                None => {}
            }
            // Mismatch: let the last star swallow one more character and retry after it.
            let Some((after_star, end)) = star else {
                return false;
            };
            let Some(end) = step_char(text, end) else {
                return false;
            };
            star = Some((after_star, end));
            p = after_star;
            t = end;
        }
    }
}

/// A byte cursor over text: the byte at a position and the position after it.
trait Text {
    fn at(&self, pos: usize) -> Option<(u8, usize)>;
}

/// Text as received.
struct Raw<'a>(&'a [u8]);

impl Text for Raw<'_> {
    fn at(&self, pos: usize) -> Option<(u8, usize)> {
        self.0.get(pos).map(|&b| (b, pos + 1))
    }
}

/// Text with `%XX` sequences decoded (RFC 3986; `+` stays `+`, a malformed `%` is literal).
struct PercentDecoded<'a>(&'a [u8]);

impl Text for PercentDecoded<'_> {
    fn at(&self, pos: usize) -> Option<(u8, usize)> {
        let b = *self.0.get(pos)?;
        if b == b'%'
            && let (Some(hi), Some(lo)) = (
                self.0.get(pos + 1).and_then(|&h| hex(h)),
                self.0.get(pos + 2).and_then(|&l| hex(l)),
            )
        {
            return Some((hi << 4 | lo, pos + 3));
        }
        Some((b, pos + 1))
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The position after the character at `pos`: a whole UTF-8 sequence when one starts there,
/// otherwise one byte.
fn step_char<T: Text>(text: &T, pos: usize) -> Option<usize> {
    let (lead, mut next) = text.at(pos)?;
    let continuation = match lead {
        0xF0..=0xF7 => 3,
        0xE0..=0xEF => 2,
        0xC0..=0xDF => 1,
        _ => 0,
    };
    for _ in 0..continuation {
        match text.at(next) {
            Some((b, after)) if b & 0xC0 == 0x80 => next = after,
            _ => break,
        }
    }
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sensitive(p: &str, t: &str) -> bool {
        Pattern::compile(p, false, false).matches(t.as_bytes())
    }

    fn insensitive(p: &str, t: &str) -> bool {
        Pattern::compile(p, true, false).matches(t.as_bytes())
    }

    /// Reference matcher written directly from the definition (exponential, tiny inputs only).
    fn reference(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|k| reference(rest, &t[k..])),
            Some(('?', rest)) => !t.is_empty() && reference(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && reference(rest, &t[1..]),
        }
    }

    #[test]
    fn star_matches_zero_or_more_characters() {
        assert!(sensitive("/api*", "/api"));
        assert!(sensitive("/api*", "/api/v1/users"));
        assert!(sensitive("*", ""));
        assert!(sensitive("a*b*c", "aXXbYYc"));
        assert!(!sensitive("a*b*c", "aXXbYY"));
        assert!(sensitive("**a**", "a"));
    }

    #[test]
    fn question_mark_needs_exactly_one_character() {
        assert!(sensitive("/v?/x", "/v1/x"));
        assert!(!sensitive("/v?/x", "/v/x"));
        assert!(!sensitive("/v?/x", "/v12/x"));
        assert!(!sensitive("?", ""));
    }

    #[test]
    fn question_mark_counts_a_multibyte_character_as_one() {
        assert!(sensitive("caf?", "café"));
        assert!(!sensitive("caf??", "café"));
        assert!(sensitive("*?", "é"));
        assert!(!sensitive("*??", "é"));
    }

    #[test]
    fn case_folding_is_ascii_and_optional() {
        assert!(insensitive("*.EXAMPLE.com", "www.example.COM"));
        assert!(!sensitive("/api*", "/API/x"));
        assert!(sensitive("/API*", "/API/x"));
    }

    #[test]
    fn escaped_wildcards_are_literal_only_when_escapes_are_enabled() {
        let escaped = Pattern::compile(r"a\*b", true, true);
        assert!(escaped.matches(b"a*b"));
        assert!(!escaped.matches(b"aXb"));
        assert_eq!(escaped.wildcards(), 0);
        let plain = Pattern::compile(r"a\*b", true, false);
        assert!(plain.matches(br"a\XYZb"));
        assert_eq!(plain.wildcards(), 1);
        assert!(Pattern::compile(r"a\\b", false, true).matches(br"a\b"));
    }

    #[test]
    fn wildcards_are_counted_as_written() {
        assert_eq!(Pattern::compile("*a**?", false, false).wildcards(), 4);
        assert_eq!(Pattern::compile("plain", false, false).wildcards(), 0);
    }

    #[test]
    fn percent_decoded_text_matches_the_decoded_form() {
        let p = Pattern::compile("john doe", true, false);
        assert!(p.matches_decoded(b"John%20Doe"));
        assert!(!p.matches(b"John%20Doe"));
        // A malformed escape is taken literally; `+` is not a space (RFC 3986).
        assert!(Pattern::compile("%zz", false, false).matches_decoded(b"%zz"));
        assert!(!p.matches_decoded(b"john+doe"));
        // A decoded multi-byte character is one character for `?`.
        assert!(Pattern::compile("caf?", false, false).matches_decoded(b"caf%C3%A9"));
    }

    #[test]
    fn pathological_pattern_does_not_explode() {
        let text = "a".repeat(20_000);
        let p = Pattern::compile("*a*a*a*a*a*b", false, false);
        assert!(!p.matches(text.as_bytes()));
        let with_b = format!("{text}b");
        assert!(p.matches(with_b.as_bytes()));
    }

    #[test]
    fn agrees_with_the_reference_matcher_on_random_inputs() {
        // Deterministic xorshift so a failure reproduces.
        let mut state: u32 = 0x9E37_79B9;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        for _ in 0..20_000 {
            let plen = (next() % 7) as usize;
            let tlen = (next() % 9) as usize;
            let p: String = (0..plen)
                .map(|_| ['a', 'b', '*', '?'][(next() % 4) as usize])
                .collect();
            let t: String = (0..tlen)
                .map(|_| ['a', 'b'][(next() % 2) as usize])
                .collect();
            let expected = reference(
                &p.chars().collect::<Vec<_>>(),
                &t.chars().collect::<Vec<_>>(),
            );
            assert_eq!(sensitive(&p, &t), expected, "pattern {p:?} text {t:?}");
        }
    }
}
