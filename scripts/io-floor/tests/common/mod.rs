//! What the forwarding tests share: a child process killed on drop, and reading one HTTP head.
use std::io::Read;
use std::net::TcpStream;
use std::process::Child;

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
