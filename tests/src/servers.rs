//! Small servers that run inside a namespace and tell the client who they are, so a test
//! learns which backend served each connection or datagram.
//!
//! All are std::net on threads, bounded (at most [`MAX_CONNECTIONS`] connections at once, idle
//! connections closed after [`IDLE_TIMEOUT`]) and stop when their guard drops.
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns;

/// Most connections a server handles at once; more are closed at once (tests never need more,
/// and an unbounded server could exhaust the shared machine).
pub const MAX_CONNECTIONS: usize = 256;
/// A connection silent for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often blocked loops look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// What a server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// One line `NAME\n` per line received, on the same connection.
    LinePerLine,
    /// An HTTP/1.0 response whose body is `NAME\n`, then close.
    Http,
    /// `NAME PEER\n` per line, or N bytes for a line `bytes N` ([`Server::tcp_peer`]).
    Peer,
}

/// A running server; stops (and joins its threads) on drop.
#[derive(Debug)]
pub struct Server {
    name: String,
    /// The namespace it runs in.
    ns: String,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Server {
    /// TCP server in namespace `ns` on `addr` answering every line it receives with `name`.
    pub fn tcp_lines(ns: &str, addr: SocketAddr, name: &str) -> Result<Self> {
        Self::tcp(ns, addr, name, Kind::LinePerLine)
    }

    /// TCP server in namespace `ns` on `addr` answering every line with `name PEER` (the
    /// client address it sees), and a line `bytes N` with N bytes (`0`–`9` repeating, at most
    /// 256 MiB) and a newline: who connected, and a long transfer.
    pub fn tcp_peer(ns: &str, addr: SocketAddr, name: &str) -> Result<Self> {
        Self::tcp(ns, addr, name, Kind::Peer)
    }

    /// HTTP/1.0 server in namespace `ns` on `addr` answering every request with status 200 and
    /// body `name\n`.
    pub fn http(ns: &str, addr: SocketAddr, name: &str) -> Result<Self> {
        Self::tcp(ns, addr, name, Kind::Http)
    }

    /// UDP server in namespace `ns` bound to `addr` answering each datagram with
    /// `name payload`. Bind the VIP itself (not 0.0.0.0) on a DSR backend: the reply must come
    /// from the address the client sent to, and a wildcard socket would answer from eth0's.
    pub fn udp_echo(ns: &str, addr: SocketAddr, name: &str) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            let name = name.to_owned();
            netns::spawn_in_netns(ns, &format!("udp {name}"), move || {
                let sock = UdpSocket::bind(addr).with_context(|| format!("binding udp {addr}"));
                let sock = match sock {
                    Ok(s) => {
                        let _ = bound_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = bound_tx.send(Err(format!("{e:#}")));
                        return Err(e);
                    }
                };
                sock.set_read_timeout(Some(POLL))?;
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let mut reply = format!("{name} ").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = sock.send_to(&reply, peer);
                }
                Ok(())
            })?
        };
        Self::started(ns, name, addr, stop, thread, bound_rx)
    }

    fn tcp(ns: &str, addr: SocketAddr, name: &str, kind: Kind) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            let name = name.to_owned();
            netns::spawn_in_netns(ns, &format!("tcp {name}"), move || {
                let listener = TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .with_context(|| format!("listening on tcp {addr}"));
                let listener = match listener {
                    Ok(l) => {
                        let _ = bound_tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = bound_tx.send(Err(format!("{e:#}")));
                        return Err(e);
                    }
                };
                accept_loop(&listener, &name, kind, &stop);
                Ok(())
            })?
        };
        Self::started(ns, name, addr, stop, thread, bound_rx)
    }

    fn started(
        ns: &str,
        name: &str,
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: JoinHandle<Result<()>>,
        bound: std::sync::mpsc::Receiver<Result<(), String>>,
    ) -> Result<Self> {
        let mut me = Self {
            name: name.to_owned(),
            ns: ns.to_owned(),
            addr,
            stop,
            thread: Some(thread),
        };
        match bound.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(me),
            Ok(Err(e)) => Err(anyhow::anyhow!("server {name}: {e}")),
            Err(_) => {
                // The thread ended without a word: it could not enter the namespace.
                let why = match me.thread.take().map(JoinHandle::join) {
                    Some(Ok(Err(e))) => format!("{e:#}"),
                    _ => "did not start".to_owned(),
                };
                Err(anyhow::anyhow!("server {name} on {addr}: {why}"))
            }
        }
    }

    /// The name the server answers with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace it runs in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts until `stop`, one bounded thread per connection; joins them before returning.
fn accept_loop(listener: &TcpListener, name: &str, kind: Kind, stop: &Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut handlers: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                handlers.retain(|h| !h.is_finished());
                if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    continue; // dropped: closed
                }
                active.fetch_add(1, Ordering::Relaxed);
                let (stop, mine, name) = (stop.clone(), active.clone(), name.to_owned());
                let spawned = std::thread::Builder::new()
                    .name(format!("conn {name}"))
                    .spawn(move || {
                        let _ = serve(conn, &name, kind, &stop);
                        mine.fetch_sub(1, Ordering::Relaxed);
                    });
                match spawned {
                    Ok(h) => handlers.push(h),
                    Err(_) => {
                        active.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    for h in handlers {
        let _ = h.join();
    }
}

/// Serves one connection until the peer closes, it idles out, or `stop`.
fn serve(conn: TcpStream, name: &str, kind: Kind, stop: &AtomicBool) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    let peer = conn.peer_addr()?;
    conn.set_read_timeout(Some(POLL))?;
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) && last.elapsed() < IDLE_TIMEOUT {
        let mut byte = [0u8; 1];
        match reader.read(&mut byte) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                last = Instant::now();
                line.push(byte[0]);
                if byte[0] != b'\n' {
                    continue;
                }
                match kind {
                    Kind::Peer => {
                        let text = String::from_utf8_lossy(&line).trim().to_owned();
                        line.clear();
                        let n = text
                            .strip_prefix("bytes ")
                            .and_then(|n| n.parse::<usize>().ok())
                            .filter(|n| *n <= 256 << 20);
                        if let Some(n) = n {
                            let chunk: Vec<u8> =
                                (0..65_530).map(|i| b'0' + (i % 10) as u8).collect();
                            let mut left = n;
                            while left > 0 {
                                let k = left.min(chunk.len());
                                writer.write_all(&chunk[..k])?;
                                left -= k;
                            }
                            writer.write_all(b"\n")?;
                        } else {
                            writer.write_all(format!("{name} {peer}\n").as_bytes())?;
                        }
                    }
                    Kind::LinePerLine => {
                        writer.write_all(format!("{name}\n").as_bytes())?;
                        line.clear();
                    }
                    Kind::Http => {
                        // The request ends at its first empty line (HTTP/1.0, no body).
                        if line.ends_with(b"\r\n\r\n") || line.ends_with(b"\n\n") {
                            let body = format!("{name}\n");
                            let resp = format!(
                                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\
                                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            writer.write_all(resp.as_bytes())?;
                            return Ok(());
                        }
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
