//! What the forwarding tests share: a child process killed on drop, and reading one HTTP head.
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command};

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

/// Starts `backend` on 127.0.0.1:`port` and the arm `variant` listening on `port + 1` and
/// forwarding to it: the arm (killed on drop) and its listening address.
pub fn start(variant: &str, port: u16, backend: fn(TcpListener)) -> (Kill, String) {
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || backend(l));
    let listen = format!("127.0.0.1:{}", port + 1);
    let arm = Kill(
        Command::new(env!("CARGO_BIN_EXE_io-floor"))
            .args([variant, &listen, &format!("127.0.0.1:{port}")])
            .spawn()
            .unwrap(),
    );
    (arm, listen)
}
