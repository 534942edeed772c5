//! The framing every variant shares: a request is its head (no body is forwarded); a response
//! is its head plus a `Content-Length` body. Nothing is rewritten.

/// Size of the client-side buffer (as lb's HTTP/1 server).
pub const CLIENT_BUF: usize = 8 * 1024;
/// Size of the target-side buffer (as lb's HTTP/1 client).
pub const BACKEND_BUF: usize = 16 * 1024;

fn head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Length of the first complete request head in `b`, if there is one.
pub fn request_len(b: &[u8]) -> Option<usize> {
    head_end(b)
}

pub enum Resp {
    Incomplete,
    Complete(usize),
    /// No `Content-Length` (or an unparsable one): this tool forwards nothing else.
    Bad,
}

/// Length of the first complete response (head + `Content-Length` body) in `b`.
pub fn response_len(b: &[u8]) -> Resp {
    let Some(h) = head_end(b) else {
        return Resp::Incomplete;
    };
    let mut cl = None;
    for line in b[..h].split(|&c| c == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > 15 && line[..15].eq_ignore_ascii_case(b"content-length:") {
            let v = std::str::from_utf8(&line[15..]).ok().map(str::trim);
            cl = v.and_then(|v| v.parse::<usize>().ok());
            if cl.is_none() {
                return Resp::Bad;
            }
        }
    }
    match cl {
        Some(n) if b.len() >= h + n => Resp::Complete(h + n),
        Some(_) => Resp::Incomplete,
        None => Resp::Bad,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        assert_eq!(
            request_len(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET"),
            Some(27)
        );
        assert_eq!(request_len(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcHTTP";
        assert!(matches!(response_len(r), Resp::Complete(41)));
        assert!(matches!(response_len(&r[..40]), Resp::Incomplete));
        assert!(matches!(
            response_len(b"HTTP/1.1 200 OK\r\n\r\n"),
            Resp::Bad
        ));
    }
}
