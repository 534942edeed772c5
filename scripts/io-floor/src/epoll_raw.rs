//! (b) `epoll-raw`: one thread per CPU, each with its own level-triggered epoll and its own
//! `SO_REUSEPORT` listener; a connection stays on the thread that accepted it (nginx's model).
//! Each readiness event gets one `recv`; a complete message goes out at once with one `send`.
//!
//! `epoll-h1`: the same loop with `lb`'s request work ([`crate::h1`]) instead of forwarding the
//! bytes unchanged: each request head parsed, routed and rewritten, each response re-encoded
//! (the same-run control of `uring-h1`). A refused request is answered (400/501) and the pair
//! closed; with earlier requests still unanswered (pipelining) the pair is closed without it.
use crate::frame::{BACKEND_BUF, CLIENT_BUF, Resp, request_len, response_len};
use crate::h1;
use crate::sock;
use crate::stats::*;
use std::net::SocketAddrV4;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering::Relaxed;

const LISTENER: u64 = u64::MAX;

struct Pair {
    cfd: RawFd,
    bfd: RawFd,
    cbuf: Box<[u8]>,
    clen: usize,
    bbuf: Box<[u8]>,
    blen: usize,
    responses: u64,
    /// `epoll-h1`: the connection's forwarded-head values, the output buffer, requests
    /// forwarded and not yet answered, and whether to close once they are.
    h1: Option<h1::Conn>,
    out: Vec<u8>,
    outstanding: u32,
    close_after: bool,
}

pub fn run(
    listen: SocketAddrV4,
    backend: SocketAddrV4,
    threads: usize,
    with_h1: bool,
) -> std::io::Result<()> {
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let l = sock::listener(listen, true)?;
            let router = with_h1.then(|| h1::Router::new(backend));
            Ok(std::thread::spawn(move || {
                worker(l, backend, router, listen.port())
            }))
        })
        .collect::<std::io::Result<_>>()?;
    for h in hs {
        h.join().unwrap()?;
    }
    Ok(())
}

fn ctl_add(ep: RawFd, fd: RawFd, token: u64) -> std::io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One `send`; anything but the whole message is counted (short or failed) and ends the pair.
fn send_all(fd: RawFd, b: &[u8]) -> bool {
    let n = unsafe { libc::send(fd, b.as_ptr().cast(), b.len(), libc::MSG_NOSIGNAL) };
    if n as usize != b.len() {
        if n < 0 {
            FAILED_WRITES.fetch_add(1, Relaxed)
        } else {
            SHORT_WRITES.fetch_add(1, Relaxed)
        };
        return false;
    }
    true
}

fn worker(
    l: RawFd,
    backend: SocketAddrV4,
    mut router: Option<h1::Router>,
    port: u16,
) -> std::io::Result<()> {
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    ctl_add(ep, l, LISTENER)?;
    let mut pairs: Vec<Option<Pair>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    loop {
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), evs.len() as _, -1) };
        if n < 0 {
            continue; // EINTR
        }
        for ev in &evs[..n as usize] {
            let token = ev.u64;
            if token == LISTENER {
                loop {
                    let c = unsafe {
                        libc::accept4(
                            l,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_CLOEXEC,
                        )
                    };
                    if c < 0 {
                        break;
                    }
                    let Ok(b) = sock::connect(backend, true) else {
                        unsafe { libc::close(c) };
                        continue;
                    };
                    sock::prepare(c, true)?;
                    let conn = match &router {
                        Some(_) => match sock::peer(c) {
                            Ok(a) => Some(h1::Conn {
                                peer: a.ip().to_string(),
                                port: port.to_string(),
                                target: backend,
                            }),
                            Err(_) => {
                                unsafe {
                                    libc::close(c);
                                    libc::close(b);
                                }
                                continue;
                            }
                        },
                        None => None,
                    };
                    let i = free.pop().unwrap_or_else(|| {
                        pairs.push(None);
                        pairs.len() - 1
                    });
                    let p = Pair {
                        cfd: c,
                        bfd: b,
                        cbuf: vec![0; CLIENT_BUF].into(),
                        clen: 0,
                        bbuf: vec![0; BACKEND_BUF].into(),
                        blen: 0,
                        responses: 0,
                        h1: conn,
                        out: Vec::with_capacity(BACKEND_BUF),
                        outstanding: 0,
                        close_after: false,
                    };
                    ctl_add(ep, c, (i as u64) << 1)?;
                    ctl_add(ep, b, (i as u64) << 1 | 1)?;
                    pairs[i] = Some(p);
                    PAIRS_OPENED.fetch_add(1, Relaxed);
                }
                continue;
            }
            let i = (token >> 1) as usize;
            let Some(p) = pairs[i].as_mut() else { continue };
            let ok = match (token & 1 == 0, router.as_mut()) {
                (true, None) => on_client(p),
                (false, None) => on_backend(p),
                (true, Some(r)) => on_client_h1(p, r),
                (false, Some(_)) => on_backend_h1(p),
            };
            if !ok {
                unsafe {
                    libc::close(p.cfd);
                    libc::close(p.bfd);
                }
                RESPONSES.fetch_add(p.responses, Relaxed);
                pairs[i] = None;
                free.push(i);
                PAIRS_CLOSED.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Returns false when the pair is to be closed.
fn on_client(p: &mut Pair) -> bool {
    if p.clen == p.cbuf.len() {
        BAD.fetch_add(1, Relaxed);
        return false;
    }
    let n = unsafe {
        libc::recv(
            p.cfd,
            p.cbuf[p.clen..].as_mut_ptr().cast(),
            p.cbuf.len() - p.clen,
            0,
        )
    };
    if n == 0 {
        return false;
    }
    if n < 0 {
        return std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock;
    }
    p.clen += n as usize;
    while let Some(h) = request_len(&p.cbuf[..p.clen]) {
        burn();
        if !send_all(p.bfd, &p.cbuf[..h]) {
            return false;
        }
        p.cbuf.copy_within(h..p.clen, 0);
        p.clen -= h;
    }
    true
}

fn on_backend(p: &mut Pair) -> bool {
    if p.blen == p.bbuf.len() {
        BAD.fetch_add(1, Relaxed);
        return false;
    }
    let n = unsafe {
        libc::recv(
            p.bfd,
            p.bbuf[p.blen..].as_mut_ptr().cast(),
            p.bbuf.len() - p.blen,
            0,
        )
    };
    if n == 0 {
        return false;
    }
    if n < 0 {
        return std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock;
    }
    p.blen += n as usize;
    loop {
        match response_len(&p.bbuf[..p.blen]) {
            Resp::Complete(t) => {
                if !send_all(p.cfd, &p.bbuf[..t]) {
                    return false;
                }
                p.responses += 1;
                p.bbuf.copy_within(t..p.blen, 0);
                p.blen -= t;
            }
            Resp::Incomplete => return true,
            Resp::Bad => {
                BAD.fetch_add(1, Relaxed);
                return false;
            }
        }
    }
}

/// Reads into `buf[*len..]`: `None` to close (peer closed, error, buffer full), `Some(false)`
/// when nothing was read (`EAGAIN`), `Some(true)` when something was.
fn recv_into(fd: RawFd, buf: &mut [u8], len: &mut usize) -> Option<bool> {
    if *len == buf.len() {
        BAD.fetch_add(1, Relaxed);
        return None;
    }
    let n = unsafe { libc::recv(fd, buf[*len..].as_mut_ptr().cast(), buf.len() - *len, 0) };
    if n == 0 {
        return None;
    }
    if n < 0 {
        return (std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock)
            .then_some(false);
    }
    *len += n as usize;
    Some(true)
}

/// `epoll-h1`'s client side: each complete request head parsed, routed and its rewritten head
/// sent to the target. Returns false when the pair is to be closed.
fn on_client_h1(p: &mut Pair, router: &mut h1::Router) -> bool {
    match recv_into(p.cfd, &mut p.cbuf, &mut p.clen) {
        None => return false,
        Some(false) => return true,
        Some(true) => {}
    }
    let Some(conn) = p.h1.as_ref() else {
        return false;
    };
    while !p.close_after {
        match h1::request(&p.cbuf[..p.clen], conn, router, &mut p.out) {
            h1::Req::Incomplete => break,
            h1::Req::Forward { consumed, close } => {
                if !send_all(p.bfd, &p.out) {
                    return false;
                }
                p.outstanding += 1;
                p.close_after = close;
                p.cbuf.copy_within(consumed..p.clen, 0);
                p.clen -= consumed;
            }
            h1::Req::Refuse => {
                BAD.fetch_add(1, Relaxed);
                if p.outstanding == 0 {
                    send_all(p.cfd, &p.out);
                }
                return false;
            }
        }
    }
    true
}

/// `epoll-h1`'s target side: each complete response re-encoded and sent to the client.
fn on_backend_h1(p: &mut Pair) -> bool {
    match recv_into(p.bfd, &mut p.bbuf, &mut p.blen) {
        None => return false,
        Some(false) => return true,
        Some(true) => {}
    }
    loop {
        match h1::response(&p.bbuf[..p.blen], &mut p.out) {
            h1::Resp::Forward { consumed, close } => {
                if !send_all(p.cfd, &p.out) {
                    return false;
                }
                p.responses += 1;
                p.outstanding = p.outstanding.saturating_sub(1);
                p.bbuf.copy_within(consumed..p.blen, 0);
                p.blen -= consumed;
                if close || (p.close_after && p.outstanding == 0) {
                    return false;
                }
            }
            h1::Resp::Incomplete => return true,
            h1::Resp::Refuse => {
                BAD.fetch_add(1, Relaxed);
                send_all(p.cfd, &p.out);
                return false;
            }
        }
    }
}
