//! Raw socket set-up shared by the per-CPU variants.
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::RawFd;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as _,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn setopt(fd: RawFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> io::Result<()> {
    let p = &v as *const libc::c_int as *const libc::c_void;
    cvt(unsafe { libc::setsockopt(fd, level, opt, p, 4) }).map(drop)
}

/// A `SO_REUSEPORT` listener (one per thread), blocking or not.
pub fn listener(a: SocketAddrV4, nonblocking: bool) -> io::Result<RawFd> {
    let ty =
        libc::SOCK_STREAM | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, ty, 0) })?;
    setopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    setopt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    let sa = sockaddr(a);
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    cvt(unsafe { libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) })?;
    cvt(unsafe { libc::listen(fd, 4096) })?;
    Ok(fd)
}

/// Connects to the backend (blocking: set-up only, once per client connection), then sets
/// `TCP_NODELAY` and, if asked, `O_NONBLOCK`.
pub fn connect(a: SocketAddrV4, nonblocking: bool) -> io::Result<RawFd> {
    let fd =
        cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    let sa = sockaddr(a);
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    if let Err(e) = cvt(unsafe { libc::connect(fd, &sa as *const _ as *const libc::sockaddr, len) })
    {
        unsafe { libc::close(fd) };
        return Err(e);
    }
    prepare(fd, nonblocking)?;
    Ok(fd)
}

/// `TCP_NODELAY` (lb sets it on both sides) and the blocking mode.
pub fn prepare(fd: RawFd, nonblocking: bool) -> io::Result<()> {
    setopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    let mut nb: libc::c_int = nonblocking as _;
    cvt(unsafe { libc::ioctl(fd, libc::FIONBIO, &mut nb) }).map(drop)
}

/// The peer's IPv4 address of a connected socket (once per client connection, for the `-h1`
/// arms' `X-Forwarded-For`).
pub fn peer(fd: RawFd) -> io::Result<SocketAddrV4> {
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    cvt(unsafe { libc::getpeername(fd, &mut sa as *mut _ as *mut libc::sockaddr, &mut len) })?;
    Ok(SocketAddrV4::new(
        u32::from_be(sa.sin_addr.s_addr).into(),
        u16::from_be(sa.sin_port),
    ))
}
