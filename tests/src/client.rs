//! Client helpers: connect from a chosen source port, ask a [`crate::servers::Server`] who it
//! is, over TCP, HTTP/1.0 or UDP, and ping. Every call is bounded by a timeout (a safety net:
//! on a working topology answers take milliseconds).
//!
//! Call these from inside the client namespace ([`crate::netns::in_netns`], or
//! [`crate::Topology::in_client`]).
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Default timeout of one exchange.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A `sockaddr_in` for `addr`.
fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn check(rc: libc::c_int, what: &str) -> Result<()> {
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_owned());
    }
    Ok(())
}

/// A `sockaddr_in6` for `addr`.
fn sockaddr6(addr: Ipv6Addr, port: u16) -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: port.to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: addr.octets(),
        },
        sin6_scope_id: 0,
    }
}

/// Storage for a `sockaddr_in` or `sockaddr_in6` and its length.
enum RawAddr {
    V4(libc::sockaddr_in),
    V6(libc::sockaddr_in6),
}

impl RawAddr {
    fn of(addr: SocketAddr) -> Self {
        match addr {
            SocketAddr::V4(a) => RawAddr::V4(sockaddr(a)),
            SocketAddr::V6(a) => RawAddr::V6(sockaddr6(*a.ip(), a.port())),
        }
    }

    fn ptr_len(&self) -> (*const libc::sockaddr, libc::socklen_t) {
        match self {
            RawAddr::V4(a) => (
                (a as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ),
            RawAddr::V6(a) => (
                (a as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            ),
        }
    }
}

/// The wildcard address of `dst`'s family with port `port` (where to bind a client socket).
fn any_of(dst: SocketAddr, port: u16) -> SocketAddr {
    match dst {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    }
}

/// Connects to `dst` (IPv4 or IPv6) from local port `src_port` (0: the kernel picks one),
/// failing after `timeout`. `SO_REUSEADDR` lets a test reuse a port whose earlier connection
/// is in TIME_WAIT towards another destination.
pub fn tcp_connect_from(
    src_port: u16,
    dst: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<TcpStream> {
    tcp_connect(src_port, None, dst.into(), timeout)
}

/// Connects to `dst` from `src` (a local address of the client and a port, 0: any), failing
/// after `timeout`: a second client address on the same host.
pub fn tcp_connect_bound(
    src: SocketAddr,
    dst: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<TcpStream> {
    tcp_connect_at(src, None, dst.into(), timeout)
}

/// Connects to `dst` from a socket with `SO_MARK = mark` (needs CAP_NET_ADMIN), failing after
/// `timeout`: what the health checker does to send a probe through `lb_hc_encap`
/// (`lb_common::hc_mark`).
pub fn tcp_connect_marked(
    mark: u32,
    dst: impl Into<SocketAddr>,
    timeout: Duration,
) -> Result<TcpStream> {
    tcp_connect(0, Some(mark), dst.into(), timeout)
}

fn tcp_connect(
    src_port: u16,
    mark: Option<u32>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    tcp_connect_at(any_of(dst, src_port), mark, dst, timeout)
}

fn tcp_connect_at(
    local: SocketAddr,
    mark: Option<u32>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    let src_port = local.port();
    let family = if dst.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket(2); the fd is owned by `fd` from here on.
    let raw = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    check(raw, "socket")?;
    // SAFETY: `raw` is a fresh, valid fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd, pointer to a c_int of the given length.
    check(
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&raw const one).cast(),
                len,
            )
        },
        "SO_REUSEADDR",
    )?;
    if let Some(mark) = mark {
        let len = std::mem::size_of::<u32>() as libc::socklen_t;
        // SAFETY: valid fd, pointer to a u32 of the given length.
        check(
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_MARK,
                    (&raw const mark).cast(),
                    len,
                )
            },
            &format!("SO_MARK {mark:#x}"),
        )?;
    }
    let local = RawAddr::of(local);
    let (ptr, len) = local.ptr_len();
    // SAFETY: valid fd and a sockaddr of the given length.
    check(
        unsafe { libc::bind(fd.as_raw_fd(), ptr, len) },
        &format!("binding source port {src_port}"),
    )?;
    let remote = RawAddr::of(dst);
    let (ptr, len) = remote.ptr_len();
    // SAFETY: as above.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), ptr, len) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err).with_context(|| format!("connecting to {dst} from :{src_port}"));
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        check(n, "poll")?;
        if n == 0 {
            bail!("connecting to {dst} from :{src_port}: no answer within {timeout:?}");
        }
        let mut so_error: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid fd, out-pointer to a c_int and its length.
        check(
            unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    (&raw mut so_error).cast(),
                    &raw mut len,
                )
            },
            "SO_ERROR",
        )?;
        if so_error != 0 {
            return Err(std::io::Error::from_raw_os_error(so_error))
                .with_context(|| format!("connecting to {dst} from :{src_port}"));
        }
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// A connection to a line server ([`crate::servers::Server::tcp_lines`]) that asks, line by
/// line, who is answering.
#[derive(Debug)]
pub struct LineClient {
    reader: BufReader<TcpStream>,
    local: SocketAddr,
}

impl LineClient {
    /// Connects to `dst` from `src_port` (0: any).
    pub fn connect(src_port: u16, dst: impl Into<SocketAddr>) -> Result<Self> {
        let stream = tcp_connect_from(src_port, dst, TIMEOUT)?;
        let local = stream.local_addr()?;
        Ok(Self {
            reader: BufReader::new(stream),
            local,
        })
    }

    /// The local (client) address of the connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Sends one line and returns the server's answer (its name).
    pub fn ask(&mut self) -> Result<String> {
        self.reader
            .get_mut()
            .write_all(b"who?\n")
            .with_context(|| format!("sending from {}", self.local))?;
        let mut answer = String::new();
        let n = self
            .reader
            .read_line(&mut answer)
            .with_context(|| format!("reading the answer on {}", self.local))?;
        if n == 0 {
            bail!("connection from {} closed without an answer", self.local);
        }
        Ok(answer.trim_end().to_owned())
    }
}

/// One connection from `src_port` to `dst`, one question: the name of the server that answered.
pub fn ask_tcp(src_port: u16, dst: impl Into<SocketAddr>) -> Result<String> {
    LineClient::connect(src_port, dst)?.ask()
}

/// One HTTP/1.0 `GET /` from `src_port` to `dst`; returns (status code, body).
pub fn http_get(src_port: u16, dst: impl Into<SocketAddr>) -> Result<(u16, String)> {
    let dst = dst.into();
    let mut stream = tcp_connect_from(src_port, dst, TIMEOUT)?;
    // One write, one segment: `write!` on an unbuffered stream sends each piece alone.
    let request = format!("GET / HTTP/1.0\r\nHost: {dst}\r\nUser-Agent: lb-tests\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("sending the HTTP request to {dst}"))?;
    let mut raw = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    let mut buf = [0u8; 4096];
    loop {
        if Instant::now() > deadline {
            bail!("HTTP response from {dst} not complete within {TIMEOUT:?}");
        }
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("reading the HTTP response from {dst}"))?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if raw.len() > 1 << 20 {
            bail!("HTTP response from {dst} larger than 1 MiB");
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header/body separator in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status code in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Sends `payload` from `src_port` to `dst` over UDP and returns the answer of a UDP echo
/// server ([`crate::servers::Server::udp_echo`]) as (server name, echoed payload). Retries a
/// few times: a datagram may be lost while a neighbour entry is being resolved.
pub fn ask_udp(
    src_port: u16,
    dst: impl Into<SocketAddr>,
    payload: &str,
) -> Result<(String, String)> {
    ask_udp_tries(src_port, dst, payload, 5)
}

/// [`ask_udp`] with `tries` attempts of one second each (a test expecting no answer uses few).
pub fn ask_udp_tries(
    src_port: u16,
    dst: impl Into<SocketAddr>,
    payload: &str,
    tries: u32,
) -> Result<(String, String)> {
    let dst = dst.into();
    let sock = UdpSocket::bind(any_of(dst, src_port))
        .with_context(|| format!("binding udp :{src_port}"))?;
    sock.connect(dst)?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 2048];
    for _attempt in 0..tries {
        sock.send(payload.as_bytes())
            .with_context(|| format!("sending udp to {dst}"))?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let (name, echo) = text.split_once(' ').unwrap_or((text.as_str(), ""));
                return Ok((name.to_owned(), echo.to_owned()));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).with_context(|| format!("receiving udp from {dst}")),
        }
    }
    bail!("no UDP answer from {dst} to source port {src_port} after {tries} tries")
}

/// Sends one ICMP echo request to `dst` (raw socket: needs root) and waits for the matching
/// echo reply. Returns an error if none arrives within `timeout`.
pub fn ping(dst: Ipv4Addr, timeout: Duration) -> Result<()> {
    // SAFETY: plain socket(2); the fd is owned by `fd` from here on.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    check(raw, "raw ICMP socket")?;
    // SAFETY: fresh valid fd.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let id = (std::process::id() & 0xffff) as u16;
    let seq: u16 = 1;
    let mut pkt = [0u8; 16];
    pkt[0] = 8; // echo request
    pkt[4..6].copy_from_slice(&id.to_be_bytes());
    pkt[6..8].copy_from_slice(&seq.to_be_bytes());
    pkt[8..16].copy_from_slice(b"lb-tests");
    let sum = inet_checksum(&pkt);
    pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    let to = sockaddr(SocketAddrV4::new(dst, 0));
    let sa_len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid fd, buffer and sockaddr with their lengths.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&raw const to).cast(),
            sa_len,
        )
    };
    check(
        i32::try_from(sent).unwrap_or(-1),
        &format!("sending ICMP echo to {dst}"),
    )?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut pfd, 1, 100) };
        check(n, "poll")?;
        if n == 0 {
            continue;
        }
        // SAFETY: valid fd and buffer.
        let got = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(got) = usize::try_from(got) else {
            continue;
        };
        // Raw sockets deliver the IPv4 header too.
        let pkt = &buf[..got];
        let Some(ihl) = pkt.first().map(|b| usize::from(b & 0x0f) * 4) else {
            continue;
        };
        let src = pkt
            .get(12..16)
            .map(|s| Ipv4Addr::new(s[0], s[1], s[2], s[3]));
        let icmp = pkt.get(ihl..ihl + 8);
        if let (Some(src), Some(icmp)) = (src, icmp)
            && src == dst
            && icmp[0] == 0
            && icmp[4..6] == id.to_be_bytes()
            && icmp[6..8] == seq.to_be_bytes()
        {
            return Ok(());
        }
    }
    bail!("no ICMP echo reply from {dst} within {timeout:?}")
}

/// The Internet checksum (RFC 1071) of `data`.
fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum (with end-around carry) to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(inet_checksum(&data), !0xddf2);
    }
}

/// Sends the IPv4 packet `ip` (its header included, `IP_HDRINCL`) to its destination with a
/// raw socket, as a router sending an ICMP error would. Needs root.
pub fn send_raw_ipv4(ip: &[u8]) -> Result<()> {
    let dst = ip
        .get(16..20)
        .map(|d| Ipv4Addr::new(d[0], d[1], d[2], d[3]))
        .context("an IPv4 header")?;
    // SAFETY: plain socket(2); the fd is owned by `fd` from here on.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    check(raw, "raw IPv4 socket")?;
    // SAFETY: fresh valid fd.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let to = RawAddr::of(SocketAddr::from((dst, 0)));
    let (ptr, len) = to.ptr_len();
    // SAFETY: valid fd, buffer and sockaddr with their lengths.
    let sent = unsafe { libc::sendto(fd.as_raw_fd(), ip.as_ptr().cast(), ip.len(), 0, ptr, len) };
    check(
        i32::try_from(sent).unwrap_or(-1),
        &format!("sending a raw packet to {dst}"),
    )
}

/// Sends the ICMPv6 message `msg` to `dst` from a raw ICMPv6 socket (the kernel writes the
/// IPv6 header and the checksum). Needs root.
pub fn send_icmpv6(dst: Ipv6Addr, msg: &[u8]) -> Result<()> {
    // SAFETY: plain socket(2); the fd is owned by `fd` from here on.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET6,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMPV6,
        )
    };
    check(raw, "raw ICMPv6 socket")?;
    // SAFETY: fresh valid fd.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let to = RawAddr::of(SocketAddr::from((dst, 0)));
    let (ptr, len) = to.ptr_len();
    // SAFETY: valid fd, buffer and sockaddr with their lengths.
    let sent = unsafe { libc::sendto(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0, ptr, len) };
    check(
        i32::try_from(sent).unwrap_or(-1),
        &format!("sending ICMPv6 to {dst}"),
    )
}

/// A raw socket of one IP protocol (ICMP, ICMPv6, TCP) that collects what the host it lives
/// in receives of it: IPv4 sockets see whole IP packets, IPv6 ones the payload after the IPv6
/// header. Open it inside the namespace to watch.
#[derive(Debug)]
pub struct RawCapture {
    fd: OwnedFd,
}

impl RawCapture {
    /// ICMP (IPv4) or ICMPv6 (`v6`).
    pub fn icmp(v6: bool) -> Result<Self> {
        if v6 {
            Self::open(libc::AF_INET6, libc::IPPROTO_ICMPV6)
        } else {
            Self::open(libc::AF_INET, libc::IPPROTO_ICMP)
        }
    }

    /// TCP segments of IPv4 (`v6` false) or IPv6.
    pub fn tcp(v6: bool) -> Result<Self> {
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        Self::open(family, libc::IPPROTO_TCP)
    }

    fn open(family: libc::c_int, proto: libc::c_int) -> Result<Self> {
        // SAFETY: plain socket(2); the fd is owned below.
        let raw = unsafe {
            libc::socket(
                family,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                proto,
            )
        };
        check(raw, "raw socket")?;
        // SAFETY: fresh valid fd.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        })
    }

    /// Looks at what was received so far, and until `timeout` passes, for a packet matching
    /// `want`; returns the first that matches, or None.
    pub fn wait_for(&self, timeout: Duration, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&raw mut pfd, 1, 50) };
            if n <= 0 {
                continue;
            }
            // SAFETY: valid fd and buffer.
            let got =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if let Ok(got) = usize::try_from(got)
                && want(&buf[..got])
            {
                return Some(buf[..got].to_vec());
            }
        }
        None
    }
}
