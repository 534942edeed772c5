//! Stickiness cookies: sealing a target id into an opaque `AWSALB` / `AWSALBAPP-0` value,
//! opening it again, and the `Cookie` / `Set-Cookie` text around it.
//!
//! A value is hex of `kind (1 byte) ‖ target id (8) ‖ expiry, Unix seconds (8) ‖ tag (32)`,
//! the tag being HMAC-SHA256 over the first 17 bytes with a key drawn at random for each
//! target group when it is created. So a value names a target without revealing its address,
//! cannot be forged or edited (a changed byte fails the tag), expires on the server side even
//! if a client ignores `Expires`, is not valid in another group, and does not outlive the
//! process (a restart re-picks, as a key rotation does on AWS). The kind byte keeps an
//! `AWSALB` value from being replayed as `AWSALBAPP-0`.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, header::SET_COOKIE};
use rand::RngCore as _;
use ring::hmac;

/// Cookie of duration-based stickiness.
pub const LB_COOKIE: &str = "AWSALB";
/// Copy of [`LB_COOKIE`] with `SameSite=None; Secure`, for cross-origin (CORS) requests.
pub const LB_CORS_COOKIE: &str = "AWSALBCORS";
/// Load-balancer cookie of application-based stickiness. AWS splits a long value over
/// `AWSALBAPP-0` … `AWSALBAPP-3`; ours always fits in the first.
pub const APP_COOKIE: &str = "AWSALBAPP-0";

/// Which stickiness a sealed value belongs to (the first byte of the value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CookieKind {
    /// `AWSALB` / `AWSALBCORS`.
    Lb = 1,
    /// `AWSALBAPP-0`.
    App = 2,
}

const PAYLOAD_LEN: usize = 1 + 8 + 8;
const TAG_LEN: usize = 32;
const SEALED_LEN: usize = PAYLOAD_LEN + TAG_LEN;

/// The per-group secret that seals and opens stickiness cookies.
pub(crate) struct CookieKey(hmac::Key);

impl std::fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieKey(..)")
    }
}

impl CookieKey {
    /// A fresh key from the thread's CSPRNG (seeded by the operating system).
    pub(crate) fn random() -> Self {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        Self(hmac::Key::new(hmac::HMAC_SHA256, &secret))
    }

    /// The cookie value naming `target_id` until `expires`.
    pub(crate) fn seal(&self, kind: CookieKind, target_id: u64, expires: SystemTime) -> String {
        let mut bytes = [0u8; SEALED_LEN];
        bytes[0] = kind as u8;
        bytes[1..9].copy_from_slice(&target_id.to_be_bytes());
        bytes[9..PAYLOAD_LEN].copy_from_slice(&unix_seconds(expires).to_be_bytes());
        let tag = hmac::sign(&self.0, &bytes[..PAYLOAD_LEN]);
        bytes[PAYLOAD_LEN..].copy_from_slice(tag.as_ref());
        let mut value = String::with_capacity(SEALED_LEN * 2);
        for b in bytes {
            // Writing to a String cannot fail.
            let _ = write!(value, "{b:02x}");
        }
        value
    }

    /// The target id in `value` if it is an intact value of this key and kind that has not
    /// expired at `now`; `None` for anything else (tampered, foreign, expired, garbage).
    pub(crate) fn open(&self, kind: CookieKind, value: &str, now: SystemTime) -> Option<u64> {
        let bytes = decode_hex::<SEALED_LEN>(value)?;
        hmac::verify(&self.0, &bytes[..PAYLOAD_LEN], &bytes[PAYLOAD_LEN..]).ok()?;
        if bytes[0] != kind as u8 {
            return None;
        }
        let id = u64::from_be_bytes(bytes[1..9].try_into().ok()?);
        let expires = u64::from_be_bytes(bytes[9..PAYLOAD_LEN].try_into().ok()?);
        (unix_seconds(now) < expires).then_some(id)
    }
}

fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        *byte = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(out)
}

/// Seconds since the Unix epoch (0 before it).
fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Whether a response sets a cookie called `name` (any `Set-Cookie` line).
pub(crate) fn response_sets_cookie(headers: &HeaderMap, name: &str) -> bool {
    headers.get_all(SET_COOKIE).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b'=')
            .next()
            .is_some_and(|n| n.trim_ascii() == name.as_bytes())
    })
}

/// `NAME=VALUE; Expires=<IMF-fixdate>; Path=/` plus `extra` (e.g. `; SameSite=None; Secure`).
pub(crate) fn set_cookie(name: &str, value: &str, expires: SystemTime, extra: &str) -> HeaderValue {
    let text = format!(
        "{name}={value}; Expires={}; Path=/{extra}",
        http_date(expires)
    );
    // Names are our constants, values are hex, the date is ASCII: always a valid value.
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Expiry of a cookie issued at `now` for `duration`.
pub(crate) fn expiry(now: SystemTime, duration: Duration) -> SystemTime {
    now.checked_add(duration).unwrap_or(now)
}

/// RFC 9110 §5.6.7 IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT` (`httpdate`, which the
/// `Date` header of lb's own responses uses too). A clock before 1970 gives the epoch's date
/// (`httpdate` would panic on it); expiry dates are at most a week ahead (the stickiness
/// duration's bound), far from the year 9999 it also refuses.
pub(crate) fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t.max(UNIX_EPOCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn sealed_value_opens_to_its_target_until_it_expires() {
        let key = CookieKey::random();
        let value = key.seal(CookieKind::Lb, 42, at(1_000));
        assert_eq!(value.len(), SEALED_LEN * 2);
        assert_eq!(key.open(CookieKind::Lb, &value, at(999)), Some(42));
        assert_eq!(key.open(CookieKind::Lb, &value, at(1_000)), None);
    }

    #[test]
    fn any_edited_character_is_refused() {
        let key = CookieKey::random();
        let value = key.seal(CookieKind::Lb, 7, at(10_000));
        for i in 0..value.len() {
            let mut edited = value.clone().into_bytes();
            edited[i] = if edited[i] == b'0' { b'1' } else { b'0' };
            let edited = String::from_utf8(edited).unwrap();
            assert_eq!(key.open(CookieKind::Lb, &edited, at(0)), None, "byte {i}");
        }
    }

    #[test]
    fn values_of_another_group_or_kind_or_garbage_are_refused() {
        let key = CookieKey::random();
        let other = CookieKey::random();
        let value = other.seal(CookieKind::Lb, 1, at(10_000));
        assert_eq!(key.open(CookieKind::Lb, &value, at(0)), None);
        let app = key.seal(CookieKind::App, 1, at(10_000));
        assert_eq!(key.open(CookieKind::Lb, &app, at(0)), None);
        for garbage in ["", "zz", "10.0.0.1:80", &"g".repeat(SEALED_LEN * 2)] {
            assert_eq!(key.open(CookieKind::Lb, garbage, at(0)), None, "{garbage}");
        }
    }

    #[test]
    fn response_sets_cookie_matches_names_exactly() {
        let mut headers = HeaderMap::new();
        headers.append(SET_COOKIE, HeaderValue::from_static("other=1"));
        headers.append(SET_COOKIE, HeaderValue::from_static("SESSION=abc; Path=/"));
        assert!(response_sets_cookie(&headers, "SESSION"));
        assert!(!response_sets_cookie(&headers, "SESS"));
        assert!(!response_sets_cookie(&headers, "session"));
    }

    #[test]
    fn http_dates_are_imf_fixdate() {
        // RFC 9110's example, and a leap day.
        assert_eq!(http_date(at(784_111_777)), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(at(951_782_400)), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(http_date(at(0)), "Thu, 01 Jan 1970 00:00:00 GMT");
        let before_1970 = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(http_date(before_1970), "Thu, 01 Jan 1970 00:00:00 GMT");
    }

    #[test]
    fn set_cookie_line_has_expiry_and_path() {
        let v = set_cookie(
            LB_CORS_COOKIE,
            "ab",
            at(784_111_777),
            "; SameSite=None; Secure",
        );
        assert_eq!(
            v,
            "AWSALBCORS=ab; Expires=Sun, 06 Nov 1994 08:49:37 GMT; Path=/; SameSite=None; Secure"
        );
    }
}
