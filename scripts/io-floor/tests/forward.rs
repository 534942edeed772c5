//! Each variant forwards keep-alive requests and responses unchanged and in order, including a
//! request head and a response that arrive in two pieces (the framing's "incomplete" paths).
//! Ports 23090-23097 on 127.0.0.1 (the uring helper's range).
use std::io::{Read, Write};
use std::thread::sleep;
use std::time::Duration;

mod common;

use common::{connect, read_head, start};

/// The request's path as the body.
fn echo_path(head: &[u8]) -> Vec<u8> {
    let head = String::from_utf8_lossy(head);
    let path = head.split(' ').nth(1).unwrap_or("?");
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}",
        path.len()
    )
    .into_bytes()
}

fn check(variant: &str, port: u16) {
    let (_p, listen) = start(variant, port, echo_path);
    let mut c = connect(&listen, variant);
    let mut buf = Vec::new();
    for i in 0..5 {
        let req = format!("GET /r{i} HTTP/1.1\r\nHost: x\r\n\r\n");
        if i == 1 {
            // the head in two pieces: the proxy must wait for the rest
            c.write_all(&req.as_bytes()[..10]).unwrap();
            sleep(Duration::from_millis(20));
            c.write_all(&req.as_bytes()[10..]).unwrap();
        } else {
            c.write_all(req.as_bytes()).unwrap();
        }
        let h = read_head(&mut c, &mut buf).unwrap_or_else(|| panic!("{variant}: no response {i}"));
        let want = format!("/r{i}");
        while buf.len() < h + want.len() {
            let mut b = [0u8; 4096];
            let n = c
                .read(&mut b)
                .unwrap_or_else(|e| panic!("{variant}: response {i} cut: {e}"));
            assert!(n > 0, "{variant}: closed in response {i}");
            buf.extend_from_slice(&b[..n]);
        }
        let expect = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{want}",
            want.len()
        );
        assert_eq!(
            String::from_utf8_lossy(&buf[..h + want.len()]),
            expect,
            "{variant}: response {i}"
        );
        buf.drain(..h + want.len());
    }
}

#[test]
fn epoll_tokio_forwards() {
    check("epoll-tokio", 23090);
}

#[test]
fn epoll_raw_forwards() {
    check("epoll-raw", 23092);
}

#[test]
fn uring_forwards() {
    check("uring", 23094);
}

#[test]
fn uring_mshot_forwards() {
    check("uring-mshot", 23096);
}
