//! What the forwarding tests share: a child process killed on drop, and reading one HTTP head.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The arm under test, killed and reaped when the test ends (also on panic).
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads from `s` into `buf` until `buf` holds a whole head (up to `\r\n\r\n`); its length, or
/// None when the peer closes or the read fails first.
pub fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut b = [0u8; 4096];
        let n = s.read(&mut b).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&b[..n]);
    }
}

/// A backend on `l`: every connection in its own thread, each request head answered with
/// `respond(head)` in two writes 20 ms apart (the last two bytes second), so that the arms'
/// "incomplete response" paths run.
fn backend(l: TcpListener, respond: fn(&[u8]) -> Vec<u8>) {
    for s in l.incoming() {
        let Ok(mut s) = s else { return };
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            while let Some(h) = read_head(&mut s, &mut buf) {
                let head: Vec<u8> = buf.drain(..h).collect();
                let resp = respond(&head);
                let (a, b) = resp.split_at(resp.len() - 2);
                if s.write_all(a).is_err() {
                    return;
                }
                sleep(Duration::from_millis(20));
                if s.write_all(b).is_err() {
                    return;
                }
            }
        });
    }
}

/// Starts a backend answering with `respond` on 127.0.0.1:`port` and the arm `variant`
/// listening on `port + 1` and forwarding to it: the arm (killed on drop) and its listening
/// address.
pub fn start(variant: &str, port: u16, respond: fn(&[u8]) -> Vec<u8>) -> (Kill, String) {
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || backend(l, respond));
    let listen = format!("127.0.0.1:{}", port + 1);
    let arm = Kill(
        Command::new(env!("CARGO_BIN_EXE_io-floor"))
            .args([variant, &listen, &format!("127.0.0.1:{port}")])
            .spawn()
            .unwrap(),
    );
    (arm, listen)
}

/// A client connection to the arm at `listen`, retried until it listens (30 s at most), with a
/// 30 s read timeout.
pub fn connect(listen: &str, variant: &str) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    let c = loop {
        match TcpStream::connect(listen) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("{variant} never listened: {e}"),
            Err(_) => sleep(Duration::from_millis(20)),
        }
    };
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c
}
