//! The `-h1` arms do `lb`'s request work: the head the target receives has the hop-by-hop
//! headers (and the one `Connection` names) removed and `x-forwarded-for`, `-proto`, `-port`
//! and `x-amzn-trace-id` added; the client receives the response re-encoded (names lowercased,
//! the target's `Connection` dropped, a `date` added) with its body; `Connection: close` closes
//! after the response; a request with a body is answered 501, not forwarded.
//! Ports 23098-23101 on 127.0.0.1.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread::sleep;
use std::time::Duration;

mod common;

use common::{connect, read_head, start};

/// The head received, as the body of a keep-alive response with headers the arm must drop.
fn echo_head(head: &[u8]) -> Vec<u8> {
    let mut resp = format!(
        "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Up: 1\r\nContent-Length: {}\r\n\r\n",
        head.len()
    )
    .into_bytes();
    resp.extend_from_slice(head);
    resp
}

/// One response: head (as text) and body.
fn response(c: &mut TcpStream, buf: &mut Vec<u8>, variant: &str) -> (String, String) {
    let h = read_head(c, buf).unwrap_or_else(|| panic!("{variant}: no response"));
    let head = String::from_utf8_lossy(&buf[..h]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap_or_else(|| panic!("{variant}: no content-length in {head}"))
        .parse()
        .unwrap();
    while buf.len() < h + len {
        let mut b = [0u8; 4096];
        let n = c.read(&mut b).unwrap();
        assert!(n > 0, "{variant}: closed in a response");
        buf.extend_from_slice(&b[..n]);
    }
    let body = String::from_utf8_lossy(&buf[h..h + len]).to_string();
    buf.drain(..h + len);
    (head, body)
}

/// The received head with its date value (the proxy's clock) replaced by `D`.
fn without_date(head: &str) -> String {
    head.lines()
        .map(|l| {
            if l.starts_with("date: ") {
                "date: D"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// The forwarded head with its trace id (random) replaced by `T`, after checking its form.
fn without_trace(head: &str, variant: &str) -> String {
    head.lines()
        .map(|l| match l.strip_prefix("x-amzn-trace-id: Root=1-") {
            Some(id) => {
                let (t, r) = id.split_once('-').unwrap_or(("", ""));
                assert!(t.len() == 8 && r.len() == 24, "{variant}: trace id {id:?}");
                "x-amzn-trace-id: T"
            }
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

fn check(variant: &str, port: u16) {
    let (_p, listen) = start(variant, port, echo_head);
    let mut c = connect(&listen, variant);
    let mut buf = Vec::new();
    for i in 0..2 {
        let last = i == 1;
        let req = format!(
            "GET /r{i}?q HTTP/1.1\r\nHost: a.test\r\nConnection: {}X-Drop\r\nKeep-Alive: 5\r\nX-Drop: 1\r\nTE: trailers\r\nX-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Port: 1\r\nAccept: */*\r\n\r\n",
            if last { "close, " } else { "" }
        );
        // the head in two pieces: the proxy must wait for the rest
        c.write_all(&req.as_bytes()[..10]).unwrap();
        sleep(Duration::from_millis(20));
        c.write_all(&req.as_bytes()[10..]).unwrap();
        let (head, body) = response(&mut c, &mut buf, variant);
        let forwarded = format!(
            "GET /r{i}?q HTTP/1.1\r\nhost: a.test\r\naccept: */*\r\nx-forwarded-for: 192.0.2.1, 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-port: {}\r\nx-amzn-trace-id: T\r\n",
            port + 1
        );
        assert_eq!(
            without_trace(&body, variant),
            forwarded,
            "{variant}: request {i} as forwarded"
        );
        assert_eq!(
            without_date(&head),
            format!(
                "HTTP/1.1 200 OK\r\nx-up: 1\r\ncontent-length: {}\r\ndate: D\r\n",
                body.len()
            ),
            "{variant}: response {i}"
        );
        assert!(head.contains(" GMT\r\n"), "{variant}: date {head}");
    }
    // `Connection: close`: the proxy closes after the response
    let mut b = [0u8; 16];
    assert_eq!(
        c.read(&mut b).unwrap_or(0),
        0,
        "{variant}: open after close"
    );

    // a body it cannot frame: 501, not forwarded, and closed
    let mut c = connect(&listen, variant);
    c.write_all(b"POST /p HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\nabc")
        .unwrap();
    let (head, _) = response(&mut c, &mut buf, variant);
    assert!(head.starts_with("HTTP/1.1 501 "), "{variant}: {head}");
    assert_eq!(c.read(&mut b).unwrap_or(0), 0, "{variant}: open after 501");
}

#[test]
fn uring_h1_rewrites_the_request_and_reencodes_the_response() {
    check("uring-h1", 23098);
}

#[test]
fn epoll_h1_rewrites_the_request_and_reencodes_the_response() {
    check("epoll-h1", 23100);
}
