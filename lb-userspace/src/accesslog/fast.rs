//! The access log's number and time formatting without `core::fmt`: every access-log line
//! holds a dozen integers, two times, three durations and an address, and `write!` spent
//! about 7,500 instructions a line on them (stop 20's callgrind). Each function here writes
//! exactly what the `format!` named in its doc writes (tests: the same for many random
//! values), so the log's bytes do not change.
use std::cell::RefCell;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `{n}`.
pub fn push_u64(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// `{n:0W$}` for `W` = `width` (more digits when `n` needs them).
pub fn push_padded(out: &mut String, n: u64, width: usize) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(n);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.push_str(digits);
}

/// `{n:02}` for `n` below 100.
fn push2(out: &mut String, n: u64) {
    debug_assert!(n < 100);
    out.push(char::from(b'0' + (n / 10) as u8));
    out.push(char::from(b'0' + (n % 10) as u8));
}

/// `{n:016x}`.
pub fn push_hex16(out: &mut String, n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 16];
    for (k, pair) in buf.chunks_exact_mut(2).enumerate() {
        let byte = (n >> (56 - 8 * k)) as u8;
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    // One ASCII check and one copy, not 16 `push`es.
    out.push_str(std::str::from_utf8(&buf).unwrap_or_default());
}

/// `{addr}`: IPv4 written here, IPv6 (rare, and with `::` compression to get right) by
/// `Display`.
pub fn push_addr(out: &mut String, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            for (k, o) in a.ip().octets().into_iter().enumerate() {
                if k > 0 {
                    out.push('.');
                }
                push_u64(out, u64::from(o));
            }
            out.push(':');
            push_u64(out, u64::from(a.port()));
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{addr}");
        }
    }
}

/// `{:.3}` of `d.as_secs_f64()`. Integer arithmetic gives the same digits except where the
/// float's rounding could differ from the integer's: a remainder of exactly half a
/// millisecond (the float may sit on either side of the tie) or durations of 2^20 seconds
/// (12 days) and more (the float's error nears a nanosecond); those go through `format!`.
pub fn push_seconds(out: &mut String, d: Duration) {
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    let rem = nanos % 1_000_000;
    if secs >= 1 << 20 || rem == 500_000 {
        let _ = write!(out, "{:.3}", d.as_secs_f64());
        return;
    }
    let mut millis = u64::from(nanos / 1_000_000) + u64::from(rem > 500_000);
    let mut secs = secs;
    if millis == 1000 {
        millis = 0;
        secs += 1;
    }
    push_u64(out, secs);
    out.push('.');
    push_padded(out, millis, 3);
}

/// `2018-07-02T22:23:00.186641Z`: ISO 8601, UTC, microseconds; what
/// `"{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{micros:06}Z"` writes. The part up to
/// the second is kept per thread and reused while the second is the same (a line's two times,
/// and the lines of a busy second, share it).
pub fn push_iso8601(out: &mut String, t: SystemTime) {
    thread_local! {
        /// The second last written, and its text up to the `.`.
        static LAST: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    LAST.with_borrow_mut(|(last, text)| {
        if *last != secs {
            text.clear();
            push_date_time(text, secs);
            *last = secs;
        }
        out.push_str(text);
    });
    push_padded(out, u64::from(d.subsec_micros()), 6);
    out.push('Z');
}

/// `2018-07-02T22:23:00.` for `secs` since the epoch.
fn push_date_time(out: &mut String, secs: u64) {
    let (year, month, day) = crate::civil::civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    push_padded(out, year, 4);
    out.push('-');
    push2(out, month);
    out.push('-');
    push2(out, day);
    out.push('T');
    push2(out, rem / 3600);
    out.push(':');
    push2(out, rem % 3600 / 60);
    out.push(':');
    push2(out, rem % 60);
    out.push('.');
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(0x5eed_0ac1)
    }

    /// Random integers of every length (uniform over the bit width, so small ones occur).
    fn random_u64(r: &mut impl Rng) -> u64 {
        let bits = r.random_range(0..=64u32);
        if bits == 0 {
            0
        } else {
            r.random::<u64>() >> (64 - bits)
        }
    }

    fn with(f: impl FnOnce(&mut String)) -> String {
        let mut s = String::from("x");
        f(&mut s);
        s.split_off(1)
    }

    #[test]
    fn integers_are_what_format_writes() {
        let mut r = rng();
        let edges = [0, 1, 9, 10, 99, 100, 999, 1000, u64::MAX, u64::MAX - 1];
        let values: Vec<u64> = edges
            .into_iter()
            .chain((0..100_000).map(|_| random_u64(&mut r)))
            .collect();
        for n in values {
            assert_eq!(with(|s| push_u64(s, n)), format!("{n}"));
            assert_eq!(with(|s| push_hex16(s, n)), format!("{n:016x}"));
            for w in [2, 3, 4, 6] {
                assert_eq!(
                    with(|s| push_padded(s, n, w)),
                    format!("{n:0w$}"),
                    "width {w}"
                );
            }
        }
    }

    #[test]
    fn addresses_are_what_display_writes() {
        let mut r = rng();
        let mut fixed: Vec<SocketAddr> = [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.0.0.1:80",
            "[::1]:443",
            "[fe80::1%2]:8080",
            "[::ffff:192.0.2.1]:1",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        fixed.extend((0..20_000).map(|_| {
            if r.random_bool(0.9) {
                SocketAddr::from((r.random::<[u8; 4]>(), r.random::<u16>()))
            } else {
                SocketAddr::from((r.random::<[u16; 8]>(), r.random::<u16>()))
            }
        }));
        for a in fixed {
            assert_eq!(with(|s| push_addr(s, &a)), a.to_string());
        }
    }

    #[test]
    fn durations_are_what_format_writes() {
        let mut r = rng();
        let mut ds: Vec<Duration> = vec![
            Duration::ZERO,
            Duration::from_nanos(499_999),
            Duration::from_nanos(500_000),
            Duration::from_nanos(500_001),
            Duration::from_nanos(1_500_000),
            Duration::from_nanos(2_500_000),
            Duration::new(0, 999_500_000),
            Duration::new(0, 999_499_999),
            Duration::new(0, 999_999_999),
            Duration::new(1, 999_500_001),
            Duration::new((1 << 20) - 1, 999_999_999),
            Duration::new(1 << 20, 123_456_789),
            Duration::new(u64::MAX, 999_999_999),
        ];
        for _ in 0..200_000 {
            // Mostly the sub-second times a request takes; some long ones (WebSocket
            // tunnels); some exactly on a half-millisecond or a whole one.
            let secs = match r.random_range(0..4) {
                0 | 1 => 0,
                2 => r.random_range(0..100),
                _ => random_u64(&mut r),
            };
            let nanos = match r.random_range(0..4) {
                0 => r.random_range(0..1000) * 1_000_000 + 500_000,
                1 => r.random_range(0..1000) * 1_000_000,
                _ => r.random_range(0..1_000_000_000),
            };
            ds.push(Duration::new(secs, nanos));
        }
        for d in ds {
            assert_eq!(
                with(|s| push_seconds(s, d)),
                format!("{:.3}", d.as_secs_f64()),
                "{d:?}"
            );
        }
    }

    #[test]
    fn times_are_what_format_writes() {
        let mut r = rng();
        let mut ts = vec![
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::new(253_402_300_799, 999_999_999),
        ];
        // Up to the year 9999 (the field's four digits), every microsecond value.
        ts.extend((0..100_000).map(|_| {
            UNIX_EPOCH
                + Duration::new(
                    r.random_range(0..253_402_300_800),
                    r.random_range(0..1_000_000_000),
                )
        }));
        // A walk through time in small steps, as a log's lines go: the same second many
        // times over (the cached part reused), then the next.
        let mut t = UNIX_EPOCH + Duration::from_secs(1_764_460_799);
        for _ in 0..100_000 {
            t += Duration::from_micros(r.random_range(0..200_000));
            ts.push(t);
        }
        for t in ts {
            let d = t.duration_since(UNIX_EPOCH).unwrap();
            let secs = d.as_secs();
            let (year, month, day) = crate::civil::civil_from_days(secs / 86_400);
            let rem = secs % 86_400;
            let want = format!(
                "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
                rem / 3600,
                rem % 3600 / 60,
                rem % 60,
                d.subsec_micros()
            );
            assert_eq!(with(|s| push_iso8601(s, t)), want, "{d:?}");
        }
    }
}
