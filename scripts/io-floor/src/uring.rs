//! (c) `uring`: one thread per CPU, each with its own ring (`IORING_SETUP_SINGLE_ISSUER` +
//! `IORING_SETUP_DEFER_TASKRUN` unless `IOFLOOR_URING_FLAGS` says otherwise) and its own
//! `SO_REUSEPORT` listener (multishot accept). The completions of one wait are handled as a
//! batch; the operations they start are queued and go in with the next `submit_and_wait(1)`:
//! one `io_uring_enter` per batch. Per request: recv (client), send (backend), recv (backend),
//! send (client).
//!
//! (d) `uring-mshot`: the same, but each socket has one multishot recv drawing from a provided
//! buffer ring (the data is copied from the ring's buffer into the connection's buffer, so the
//! framing is the same code); per request only the two sends are submitted.
//!
//! (e) `uring-h1`: `uring-mshot` with `lb`'s request work ([`crate::h1`]) instead of forwarding
//! the bytes unchanged: each request head parsed, routed and rewritten into the pair's target
//! output buffer, each response re-encoded into its client output buffer; the sends go from
//! those buffers. A refused request is answered (400/501) and the pair closed once nothing is
//! in flight; with earlier requests still unanswered (pipelining) the pair is closed without
//! the answer. A response that does not fit the 16 KiB target buffer closes the pair.
use crate::frame::{BACKEND_BUF, CLIENT_BUF, Resp, request_len, response_len};
use crate::h1;
use crate::sock;
use crate::stats::*;
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use std::net::SocketAddrV4;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering::Relaxed, Ordering::Release};

const ACCEPT: u64 = 0;
const RECV_C: u64 = 1;
const RECV_B: u64 = 2;
const SEND_B: u64 = 3;
const SEND_C: u64 = 4;

const BGID: u16 = 0;
const NBUF: u16 = 512;
const BUF_SIZE: usize = 2048;

struct Pair {
    cfd: RawFd,
    bfd: RawFd,
    cbuf: Box<[u8]>,
    clen: usize,
    bbuf: Box<[u8]>,
    blen: usize,
    req_len: usize,
    resp_len: usize,
    crecv: bool,
    brecv: bool,
    sreq: bool,
    sresp: bool,
    inflight: u32,
    closing: bool,
    responses: u64,
    /// Bytes handed to the target's / the client's send in flight (the `-h1` arm sends its
    /// output buffers, whose lengths differ from what was consumed).
    send_b_len: usize,
    send_c_len: usize,
    /// `uring-h1`: the connection's forwarded-head values, the output buffers (target side,
    /// client side), requests forwarded and not yet answered, and whether to close once they
    /// are.
    h1: Option<h1::Conn>,
    bout: Vec<u8>,
    cout: Vec<u8>,
    outstanding: u32,
    close_after: bool,
}

fn ud(i: usize, op: u64) -> u64 {
    (i as u64) << 8 | op
}

pub fn run(
    listen: SocketAddrV4,
    backend: SocketAddrV4,
    threads: usize,
    mshot: bool,
    with_h1: bool,
) -> std::io::Result<()> {
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let l = sock::listener(listen, false)?;
            let router = with_h1.then(|| h1::Router::new(backend));
            Ok(std::thread::spawn(move || {
                worker(l, backend, mshot, router, listen.port())
            }))
        })
        .collect::<std::io::Result<_>>()?;
    for h in hs {
        h.join().unwrap()?;
    }
    Ok(())
}

/// The provided-buffer ring of one thread (`uring-mshot`).
struct BufRing {
    ring: *mut types::BufRingEntry,
    tail: u16,
    bufs: Box<[u8]>,
}

impl BufRing {
    fn new(ring: &IoUring) -> std::io::Result<BufRing> {
        let len = NBUF as usize * size_of::<types::BufRingEntry>();
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let mut br = BufRing {
            ring: p.cast(),
            tail: 0,
            bufs: vec![0u8; NBUF as usize * BUF_SIZE].into(),
        };
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(p as u64, NBUF, BGID, 0)?
        };
        for bid in 0..NBUF {
            br.add(bid);
        }
        br.publish();
        Ok(br)
    }

    fn add(&mut self, bid: u16) {
        let e = unsafe { &mut *self.ring.add((self.tail & (NBUF - 1)) as usize) };
        e.set_addr(self.bufs[bid as usize * BUF_SIZE..].as_ptr() as u64);
        e.set_len(BUF_SIZE as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        unsafe {
            (*(types::BufRingEntry::tail(self.ring) as *const AtomicU16)).store(self.tail, Release)
        };
    }

    fn buf(&self, bid: u16, n: usize) -> &[u8] {
        &self.bufs[bid as usize * BUF_SIZE..][..n]
    }
}

struct W {
    pending: Vec<squeue::Entry>,
    mshot: bool,
    /// `uring-h1`: the listener's rules and target group.
    router: Option<h1::Router>,
}

impl W {
    fn recv(&mut self, p: &mut Pair, i: usize, client: bool) {
        let (fd, op) = if client {
            (p.cfd, RECV_C)
        } else {
            (p.bfd, RECV_B)
        };
        let e = if self.mshot {
            opcode::RecvMulti::new(types::Fd(fd), BGID).build()
        } else if client {
            let b = &mut p.cbuf[p.clen..];
            opcode::Recv::new(types::Fd(fd), b.as_mut_ptr(), b.len() as u32).build()
        } else {
            let b = &mut p.bbuf[p.blen..];
            opcode::Recv::new(types::Fd(fd), b.as_mut_ptr(), b.len() as u32).build()
        };
        self.pending.push(e.user_data(ud(i, op)));
        if client {
            p.crecv = true;
        } else {
            p.brecv = true;
        }
        p.inflight += 1;
    }

    fn close(&mut self, p: &mut Pair) {
        if !p.closing {
            p.closing = true;
            unsafe {
                libc::shutdown(p.cfd, libc::SHUT_RDWR);
                libc::shutdown(p.bfd, libc::SHUT_RDWR);
            }
        }
    }

    fn send(&mut self, p: &mut Pair, i: usize, client: bool) {
        let (fd, b, op) = if client {
            p.send_c_len = p.cout.len();
            (p.cfd, &p.cout, SEND_C)
        } else {
            p.send_b_len = p.bout.len();
            (p.bfd, &p.bout, SEND_B)
        };
        let e = opcode::Send::new(types::Fd(fd), b.as_ptr(), b.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        self.pending.push(e.user_data(ud(i, op)));
        p.inflight += 1;
        if client {
            p.sresp = true;
        } else {
            p.sreq = true;
        }
    }

    /// `uring-h1`'s client side: the next complete request parsed, routed and its rewritten
    /// head sent to the target (one send in flight per direction, as in `fwd_req`).
    fn fwd_req_h1(&mut self, p: &mut Pair, i: usize) {
        if p.closing || p.sreq || p.close_after {
            return;
        }
        let (Some(router), Some(conn)) = (self.router.as_mut(), p.h1.as_ref()) else {
            return;
        };
        match h1::request(&p.cbuf[..p.clen], conn, router, &mut p.bout) {
            h1::Req::Forward { consumed, close } => {
                p.req_len = consumed;
                p.outstanding += 1;
                p.close_after = close;
                self.send(p, i, false);
            }
            h1::Req::Incomplete if p.clen == p.cbuf.len() => {
                BAD.fetch_add(1, Relaxed);
                self.close(p);
            }
            h1::Req::Incomplete => {}
            h1::Req::Refuse => {
                BAD.fetch_add(1, Relaxed);
                if p.outstanding == 0 && !p.sresp {
                    std::mem::swap(&mut p.bout, &mut p.cout);
                    p.resp_len = 0;
                    p.close_after = true;
                    self.send(p, i, true);
                } else {
                    self.close(p);
                }
            }
        }
    }

    /// `uring-h1`'s target side: the next complete response re-encoded and sent to the client.
    fn fwd_resp_h1(&mut self, p: &mut Pair, i: usize) {
        if p.closing || p.sresp {
            return;
        }
        match h1::response(&p.bbuf[..p.blen], &mut p.cout) {
            h1::Resp::Forward { consumed, close } => {
                p.resp_len = consumed;
                p.outstanding = p.outstanding.saturating_sub(1);
                p.close_after |= close;
                self.send(p, i, true);
            }
            h1::Resp::Incomplete if p.blen == p.bbuf.len() => {
                BAD.fetch_add(1, Relaxed);
                self.close(p);
            }
            h1::Resp::Incomplete => {}
            h1::Resp::Refuse => {
                BAD.fetch_add(1, Relaxed);
                p.resp_len = 0;
                p.outstanding = 0;
                p.close_after = true;
                self.send(p, i, true);
            }
        }
    }

    fn fwd_req(&mut self, p: &mut Pair, i: usize) {
        if self.router.is_some() {
            return self.fwd_req_h1(p, i);
        }
        if p.closing {
            return;
        }
        if !p.sreq {
            if let Some(h) = request_len(&p.cbuf[..p.clen]) {
                burn();
                let e = opcode::Send::new(types::Fd(p.bfd), p.cbuf.as_ptr(), h as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build();
                self.pending.push(e.user_data(ud(i, SEND_B)));
                p.sreq = true;
                p.req_len = h;
                p.send_b_len = h;
                p.inflight += 1;
                if !self.mshot && !p.brecv && !p.sresp {
                    self.recv(p, i, false);
                }
                return;
            }
            if p.clen == p.cbuf.len() {
                BAD.fetch_add(1, Relaxed);
                self.close(p);
                return;
            }
        }
        if !self.mshot && !p.sreq && !p.crecv {
            self.recv(p, i, true);
        }
    }

    fn fwd_resp(&mut self, p: &mut Pair, i: usize) {
        if self.router.is_some() {
            return self.fwd_resp_h1(p, i);
        }
        if p.closing {
            return;
        }
        if !p.sresp {
            match response_len(&p.bbuf[..p.blen]) {
                Resp::Complete(t) => {
                    let e = opcode::Send::new(types::Fd(p.cfd), p.bbuf.as_ptr(), t as u32)
                        .flags(libc::MSG_NOSIGNAL)
                        .build();
                    self.pending.push(e.user_data(ud(i, SEND_C)));
                    p.sresp = true;
                    p.resp_len = t;
                    p.send_c_len = t;
                    p.inflight += 1;
                    return;
                }
                Resp::Bad => {
                    BAD.fetch_add(1, Relaxed);
                    self.close(p);
                    return;
                }
                Resp::Incomplete if p.blen == p.bbuf.len() => {
                    BAD.fetch_add(1, Relaxed);
                    self.close(p);
                    return;
                }
                Resp::Incomplete => {}
            }
        }
        if !self.mshot && !p.sresp && !p.brecv {
            self.recv(p, i, false);
        }
    }
}

fn worker(
    l: RawFd,
    backend: SocketAddrV4,
    mshot: bool,
    router: Option<h1::Router>,
    port: u16,
) -> std::io::Result<()> {
    let mut b = IoUring::builder();
    match std::env::var("IOFLOOR_URING_FLAGS").as_deref() {
        Ok("none") => {}
        Ok("coop") => {
            b.setup_single_issuer().setup_coop_taskrun();
        }
        _ => {
            b.setup_single_issuer().setup_defer_taskrun();
        }
    }
    b.setup_submit_all().setup_cqsize(4096);
    let mut ring: IoUring = b.build(1024)?;
    let mut bufs = if mshot {
        Some(BufRing::new(&ring)?)
    } else {
        None
    };
    let mut w = W {
        pending: Vec::with_capacity(1024),
        mshot,
        router,
    };
    let port = port.to_string();
    let mut pairs: Vec<Option<Pair>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(4096);
    w.pending.push(
        opcode::AcceptMulti::new(types::Fd(l))
            .build()
            .user_data(ud(0, ACCEPT)),
    );
    loop {
        for e in w.pending.drain(..) {
            while unsafe { ring.submission().push(&e) }.is_err() {
                ring.submit()?;
            }
        }
        if let Some(b) = &bufs {
            b.publish();
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
                ) => {}
            Err(e) => return Err(e),
        }
        cqes.clear();
        cqes.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(u, res, fl) in &cqes {
            let (i, op) = ((u >> 8) as usize, u & 0xff);
            if op == ACCEPT {
                if res >= 0 {
                    let c = res;
                    let conn = match w.router {
                        Some(_) => sock::peer(c).ok().map(|a| h1::Conn {
                            peer: a.ip().to_string(),
                            port: port.clone(),
                            target: backend,
                        }),
                        None => None,
                    };
                    match sock::connect(backend, false) {
                        Ok(bfd)
                            if sock::prepare(c, false).is_ok()
                                && (w.router.is_none() || conn.is_some()) =>
                        {
                            let i = free.pop().unwrap_or_else(|| {
                                pairs.push(None);
                                pairs.len() - 1
                            });
                            let mut p = Pair {
                                cfd: c,
                                bfd,
                                cbuf: vec![0; CLIENT_BUF].into(),
                                clen: 0,
                                bbuf: vec![0; BACKEND_BUF].into(),
                                blen: 0,
                                req_len: 0,
                                resp_len: 0,
                                crecv: false,
                                brecv: false,
                                sreq: false,
                                sresp: false,
                                inflight: 0,
                                closing: false,
                                responses: 0,
                                send_b_len: 0,
                                send_c_len: 0,
                                bout: Vec::with_capacity(if conn.is_some() {
                                    CLIENT_BUF
                                } else {
                                    0
                                }),
                                cout: Vec::with_capacity(if conn.is_some() {
                                    BACKEND_BUF
                                } else {
                                    0
                                }),
                                h1: conn,
                                outstanding: 0,
                                close_after: false,
                            };
                            w.recv(&mut p, i, true);
                            if mshot {
                                w.recv(&mut p, i, false);
                            }
                            pairs[i] = Some(p);
                            PAIRS_OPENED.fetch_add(1, Relaxed);
                        }
                        Ok(bfd) => unsafe {
                            libc::close(c);
                            libc::close(bfd);
                        },
                        Err(_) => unsafe {
                            libc::close(c);
                        },
                    }
                }
                if !cqueue::more(fl) {
                    w.pending.push(
                        opcode::AcceptMulti::new(types::Fd(l))
                            .build()
                            .user_data(ud(0, ACCEPT)),
                    );
                }
                continue;
            }
            let Some(p) = pairs[i].as_mut() else { continue };
            match op {
                RECV_C | RECV_B => {
                    let client = op == RECV_C;
                    let more = mshot && cqueue::more(fl);
                    if !more {
                        p.inflight -= 1;
                        if client {
                            p.crecv = false;
                        } else {
                            p.brecv = false;
                        }
                    }
                    if res > 0 {
                        let n = res as usize;
                        let mut fits = true;
                        if let Some(br) = bufs.as_mut() {
                            let bid =
                                cqueue::buffer_select(fl).expect("multishot recv without a buffer");
                            let (buf, len) = if client {
                                (&mut p.cbuf, &mut p.clen)
                            } else {
                                (&mut p.bbuf, &mut p.blen)
                            };
                            if *len + n <= buf.len() {
                                buf[*len..*len + n].copy_from_slice(br.buf(bid, n));
                                *len += n;
                            } else {
                                fits = false;
                            }
                            br.add(bid);
                        } else if client {
                            p.clen += n;
                        } else {
                            p.blen += n;
                        }
                        if !fits {
                            BAD.fetch_add(1, Relaxed);
                            w.close(p);
                        } else if client {
                            w.fwd_req(p, i);
                        } else {
                            w.fwd_resp(p, i);
                        }
                        if mshot && !more && !p.closing {
                            w.recv(p, i, client);
                        }
                    } else if res == -libc::ENOBUFS && mshot && !p.closing {
                        ENOBUFS.fetch_add(1, Relaxed);
                        if !more {
                            w.recv(p, i, client);
                        }
                    } else {
                        w.close(p);
                    }
                }
                SEND_B => {
                    p.inflight -= 1;
                    p.sreq = false;
                    if res < 0 {
                        FAILED_WRITES.fetch_add(1, Relaxed);
                        w.close(p);
                    } else if res as usize != p.send_b_len {
                        SHORT_WRITES.fetch_add(1, Relaxed);
                        w.close(p);
                    } else {
                        p.cbuf.copy_within(p.req_len..p.clen, 0);
                        p.clen -= p.req_len;
                        w.fwd_req(p, i);
                    }
                }
                _ => {
                    p.inflight -= 1;
                    p.sresp = false;
                    if res < 0 {
                        FAILED_WRITES.fetch_add(1, Relaxed);
                        w.close(p);
                    } else if res as usize != p.send_c_len {
                        SHORT_WRITES.fetch_add(1, Relaxed);
                        w.close(p);
                    } else {
                        p.responses += 1;
                        p.bbuf.copy_within(p.resp_len..p.blen, 0);
                        p.blen -= p.resp_len;
                        if p.close_after && p.outstanding == 0 {
                            w.close(p);
                        }
                        w.fwd_resp(p, i);
                        if mshot {
                            w.fwd_req(p, i);
                        }
                    }
                }
            }
            if p.closing && p.inflight == 0 {
                unsafe {
                    libc::close(p.cfd);
                    libc::close(p.bfd);
                }
                RESPONSES.fetch_add(p.responses, Relaxed);
                PAIRS_CLOSED.fetch_add(1, Relaxed);
                pairs[i] = None;
                free.push(i);
            }
        }
    }
}
