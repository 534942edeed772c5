//! The lean HTTP/1.1 path (`http1=lean`): one event loop per worker of the per-worker runtime
//! and lean listener, serving plain-HTTP/1.1 keep-alive traffic without a task, a timer or a
//! header map per connection or request.
//!
//! Each loop is a thread of its own beside its worker's runtime thread (bound to the same CPU
//! when the workers are bound), waiting in its own `epoll_wait` as nginx's workers do; its
//! epoll instance holds the worker's listening socket, its client connections and its own
//! pool of target connections, all edge-triggered. (A first version ran the loop as a task on
//! the worker's runtime, its epoll descriptor registered in the runtime's reactor: every
//! wake-up then took two `epoll_wait`s, 0.50 against 0.24 per request.)
//! A request the loop takes ([`wire::examine`]: compliant HTTP/1.1 without a body, forwarded
//! to a plain HTTP/1.1 target group without stickiness) goes through the same steps as on the
//! native path: the rules, the pick (`TargetGroup::pick_at`), the forwarded fields and the
//! trace id (`ForwardedTail`), one [`Exchange`] record per request (every metric and the
//! access log come from it). Anything else (a body, an upgrade, a non-compliant head, a
//! fixed response or redirect, no target in service, …) is not served differently: the loop
//! hands the connection, with the bytes it read, to the native path on the worker's runtime
//! at that request boundary, and the native path serves that request and the rest of the
//! connection (`L7Counters::http1_lean_handoffs`).
//!
//! Timeouts (idle, header, the target's idle and connect timeouts, the client keep-alive
//! lifetime) are deadlines on the connections, checked by a sweep on a coarse tick (an
//! eighth of the shortest timeout, 10–250 ms), as nginx's timers are coarse: a timeout
//! fires up to one tick late.
mod wire;

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::exchange::{ConnInfo, Exchange};
use super::limits::ConnectionSlot;
use super::pipeline::ConnCtx;
use super::{L7Counters, Listener, OpenConnection, Phase};
use crate::accesslog::{ActionKind, LbError, TargetConnection};
use crate::headers::ForwardedTail;
use crate::proxy::desync::{Tier, classify_tokens, tokenize};
use crate::proxy::error::ProxyError;
use crate::rules::{RequestView, ResolvedAction};
use crate::targets::{Picked, ProtocolVersion, Stickiness, TargetProtocol};

/// A request head longer than this (complete or not) goes to the native path, which applies
/// the listener's limits to it (16 KiB request line, 64 KiB head): the lean path never has to.
const MAX_LEAN_HEAD: usize = 8 * 1024;
/// Room kept free for one client read.
const READ_ROOM: usize = 4 * 1024;
/// Response bytes queued for a client before the loop stops reading its target.
const HIGH_WATER: usize = 256 * 1024;
/// Events taken per `epoll_wait`.
const EVENTS: usize = 256;

const KIND_LISTEN: u64 = 0;
const KIND_CLIENT: u64 = 1;
const KIND_TARGET: u64 = 2;

/// An epoll token: the kind, the slab index and the slot's generation (an event for a
/// connection closed earlier in the same batch must not reach the one now in its slot).
fn token(kind: u64, index: usize, generation: u32) -> u64 {
    (u64::from(generation) << 32) | ((index as u64) << 2) | kind
}

fn untoken(t: u64) -> (u64, usize, u32) {
    (t & 3, ((t & 0xffff_ffff) >> 2) as usize, (t >> 32) as u32)
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The loop's epoll instance (owned by its reactor registration).
struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> io::Result<Self> {
        // SAFETY: plain system call; a returned descriptor is ours alone.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` was just created and nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self) -> Ctl {
        Ctl(self.0.as_raw_fd())
    }
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Calls on the loop's epoll instance, which outlives the loop's state.
#[derive(Clone, Copy)]
struct Ctl(RawFd);

impl Ctl {
    fn add(self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid event for the call's duration.
        cvt(unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
    }

    fn delete(self, fd: RawFd) {
        // SAFETY: as in `add`; a null event is allowed for DEL.
        unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
    }

    /// Ready events, waiting up to `timeout_ms` for the first (an interrupted wait returns
    /// none).
    fn wait(self, events: &mut [libc::epoll_event], timeout_ms: i32) -> usize {
        // SAFETY: `events` is valid for `len` entries.
        let n = unsafe {
            libc::epoll_wait(
                self.0,
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                timeout_ms,
            )
        };
        usize::try_from(n).unwrap_or(0)
    }
}

const CONN_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
const GONE_EVENTS: u32 = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;

/// A nonblocking TCP connect to `addr` with `TCP_NODELAY`: the socket, and whether it is
/// still connecting (`EINPROGRESS`).
fn connect(addr: SocketAddr) -> io::Result<(TcpStream, bool)> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain system call; a returned descriptor is ours alone.
    let fd = cvt(unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: `fd` was just created and nothing else owns it.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    stream.set_nodelay(true)?;
    let (storage, len) = sockaddr(addr);
    // SAFETY: `storage` holds a valid address of `len` bytes.
    let r = unsafe { libc::connect(fd, std::ptr::addr_of!(storage).cast(), len) };
    if r == 0 {
        return Ok((stream, false));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINPROGRESS) {
        Ok((stream, true))
    } else {
        Err(e)
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A connect's outcome, read once the socket says it is writable.
fn connect_error(s: &TcpStream) -> Option<io::Error> {
    match s.take_error() {
        Ok(e) => e,
        Err(e) => Some(e),
    }
}

/// Reads what `s` has into `buf`'s spare room (at least [`READ_ROOM`], not zeroed first):
/// `Ok(0)` is the peer's close, `WouldBlock` nothing to read. `*readable` is cleared when the
/// socket is known to be empty (the read did not fill the room, or would block):
/// edge-triggered, the next byte raises an event, so the loop does not read again until then
/// (an empty read per message was two more system calls per request). The system call is
/// made directly, without glibc's cancellation point (`proxy::rawio`: its bracket was a fifth
/// of this loop's user time).
///
/// A peer that has closed (`closed`: the event said `EPOLLRDHUP`/`EPOLLHUP`) may have sent its
/// close with the last bytes, in the same edge: then only a read of 0 clears `*readable`.
fn read_into(
    s: &TcpStream,
    buf: &mut Vec<u8>,
    readable: &mut bool,
    closed: bool,
) -> io::Result<usize> {
    buf.reserve(READ_ROOM);
    let room = buf.capacity() - buf.len();
    let r = crate::proxy::rawio::recv(s.as_raw_fd(), buf.spare_capacity_mut());
    let n = *r.as_ref().unwrap_or(&0);
    // SAFETY: the kernel wrote `n` bytes (at most the spare room's length) at the vector's end.
    unsafe { buf.set_len(buf.len() + n) };
    if n < room && !matches!(r, Ok(0)) && !closed {
        *readable = false;
    }
    r
}

/// Writes `buf[*pos..]` to `s` (directly, as [`read_into`] reads): `Ok(true)` when all of it
/// went out.
fn write_from(s: &TcpStream, buf: &[u8], pos: &mut usize) -> io::Result<bool> {
    while *pos < buf.len() {
        match crate::proxy::rawio::send(s.as_raw_fd(), &buf[*pos..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => *pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Where a response's body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyLeft {
    /// The head has not arrived.
    Head,
    /// This many bytes of a `Content-Length` body to come.
    Length(u64),
    /// A chunked body, passed through as scanned.
    Chunked(super::sniff::ChunkScan),
    /// Until the target closes, re-framed as chunked.
    UntilClose,
}

/// A request on its way: forwarded, or waiting for its target.
struct Flight {
    ex: Exchange,
    picked: Picked,
    target: usize,
    /// The forwarded head (kept for one retry on a new connection) and how much was sent.
    request: Vec<u8>,
    sent: usize,
    connection: TargetConnection,
    connect_started: Option<Instant>,
    connect_time: Duration,
    body: BodyLeft,
    head_request: bool,
    /// Response bytes (head and body) came from the target.
    answered: bool,
    /// The response head went to the client.
    responded: bool,
    reusable: bool,
    body_sent: u64,
    /// Target deadline: connect timeout, then the idle timeout after each byte.
    deadline: Instant,
}

enum State {
    /// Waiting for (or reading) a request head.
    Head,
    /// A request is in flight.
    Busy(Box<Flight>),
}

struct Client {
    tcp: TcpStream,
    ctx: Arc<ConnCtx>,
    open: OpenConnection,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    state: State,
    /// When the request head being read must be complete (set at accept for the first
    /// request and at the first byte of later ones).
    head_deadline: Option<Instant>,
    /// When the connection counts as idle (no byte for the idle timeout).
    idle_deadline: Instant,
    /// When the client keep-alive lifetime ends.
    lifetime_end: Instant,
    /// Close once `out` is written.
    closing: bool,
    /// A byte came from the client.
    seen_any: bool,
    /// The socket may have bytes to read (see [`read_into`]).
    readable: bool,
    /// The peer closed its side (or the socket failed): reads go on until they return 0.
    closed: bool,
}

struct Target {
    tcp: TcpStream,
    addr: SocketAddr,
    /// The client whose request it carries; `None` while it sits in the pool.
    owner: Option<usize>,
    connecting: bool,
    buf: Vec<u8>,
    /// Pooled since.
    idle_since: Instant,
    /// The socket may have bytes to read (see [`read_into`]).
    readable: bool,
    /// The peer closed its side (or the socket failed): reads go on until they return 0.
    closed: bool,
}

/// A slab of connections: stable indexes, reused slots with a new generation.
struct Slab<T> {
    slots: Vec<Option<T>>,
    generations: Vec<u32>,
    free: Vec<usize>,
}

impl<T> Slab<T> {
    fn new() -> Self {
        Self {
            slots: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
        }
    }

    /// The slot the next insert takes, and its generation.
    fn next(&mut self) -> (usize, u32) {
        let i = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.generations.push(0);
            self.slots.len() - 1
        });
        self.generations[i] = self.generations[i].wrapping_add(1);
        self.free.push(i);
        (i, self.generations[i])
    }

    fn insert(&mut self, i: usize, value: T) {
        if self.free.last() == Some(&i) {
            self.free.pop();
        }
        self.slots[i] = Some(value);
    }

    fn get(&mut self, i: usize, generation: u32) -> Option<&mut T> {
        if self.generations.get(i) != Some(&generation) {
            return None;
        }
        self.slots.get_mut(i)?.as_mut()
    }

    fn at(&mut self, i: usize) -> Option<&mut T> {
        self.slots.get_mut(i)?.as_mut()
    }

    fn remove(&mut self, i: usize) -> Option<T> {
        let v = self.slots.get_mut(i)?.take();
        if v.is_some() {
            self.free.push(i);
        }
        v
    }

    fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn indexes(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|_| i))
    }
}

/// One worker's lean loop for one listener.
struct Lean {
    listener: Arc<Listener>,
    worker: usize,
    /// The loop's epoll instance, owned (closed with the loop), and calls on it.
    _epoll: Epoll,
    epoll: Ctl,
    accept: Option<std::net::TcpListener>,
    clients: Slab<Client>,
    targets: Slab<Target>,
    /// Idle target connections by address, the most recently used last.
    pool: HashMap<SocketAddr, Vec<usize>>,
    /// Connections to hand to the native path after this batch.
    handoffs: Vec<Client>,
    /// The handed-over connections' tasks, waited for by the worker before it ends.
    handed: tokio_util::task::TaskTracker,
    /// The worker's runtime, which runs them.
    runtime: tokio::runtime::Handle,
    draining: bool,
    /// The clock, read once per wake-up (as nginx's cached time).
    now: Instant,
    /// The wall clock, read with `now`.
    wall: std::time::SystemTime,
    idle_timeout: Duration,
    header_timeout: Duration,
    keepalive: Duration,
    target_idle: Duration,
    connect_timeout: Duration,
    max_response_head: usize,
    max_idle_per_target: usize,
}

/// Starts the lean loop for `listener` on worker `worker`: a thread of its own beside the
/// worker's runtime thread (bound to the worker's CPU, if it has one), which waits in its own
/// `epoll_wait` (one system call per wake-up, as nginx's workers; nested in the runtime's
/// reactor, every wake-up took two). Connections it hands over run on the worker's runtime
/// (the current one). Returns what the worker awaits in place of the accept loop: it ends
/// when the loop has ended (the tier drained) and the handed-over connections with it.
pub(super) fn start(
    listener: Arc<Listener>,
    socket: std::net::TcpListener,
    worker: usize,
    cpu: Option<usize>,
) -> io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    socket.set_nonblocking(true)?;
    let epoll = Epoll::new()?;
    let ctl = epoll.ctl();
    ctl.add(
        socket.as_raw_fd(),
        token(KIND_LISTEN, 0, 0),
        libc::EPOLLIN as u32,
    )?;
    let client = listener.shared.forwarder.config().clone();
    let cfg = &listener.cfg;
    let shortest = cfg
        .idle_timeout
        .min(cfg.header_timeout)
        .min(client.idle_timeout)
        .min(client.connect_timeout);
    let tick = (shortest / 8).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let handed = tokio_util::task::TaskTracker::new();
    let name = format!("l7lean{worker}:{}", listener.port);
    let lean = Lean {
        idle_timeout: cfg.idle_timeout,
        header_timeout: cfg.header_timeout,
        keepalive: cfg.client_keepalive,
        target_idle: client.idle_timeout,
        connect_timeout: client.connect_timeout,
        max_response_head: client.max_response_header_bytes,
        max_idle_per_target: client.max_idle_per_target,
        listener,
        worker,
        _epoll: epoll,
        epoll: ctl,
        accept: Some(socket),
        clients: Slab::new(),
        targets: Slab::new(),
        pool: HashMap::new(),
        handoffs: Vec::new(),
        handed: handed.clone(),
        runtime: tokio::runtime::Handle::current(),
        draining: false,
        now: Instant::now(),
        wall: std::time::SystemTime::now(),
    };
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new().name(name).spawn(move || {
        // Dropped when the loop ends, also by a panic: the worker stops waiting then.
        let _ended = ended_tx;
        if let Some(cpu) = cpu {
            match super::affinity::bind_this_thread(cpu) {
                Ok(()) => tracing::info!(worker, cpu, "lean HTTP/1.1 loop bound to its CPU"),
                Err(e) => tracing::error!(
                    worker, cpu, error = %e,
                    "binding the lean HTTP/1.1 loop to its CPU failed; it runs unbound"
                ),
            }
        }
        lean.run(tick);
    })?;
    Ok(async move {
        let _ = ended_rx.await;
        handed.close();
        handed.wait().await;
    })
}

impl Lean {
    /// The loop: wait for events (or the next tick), handle them, sweep the deadlines on
    /// each tick, follow the tier's phase; returns when a drain has closed every connection.
    fn run(mut self, tick: Duration) {
        let mut phase = self.listener.shared.phase.clone();
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        let mut next_tick = Instant::now() + tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            // Rounded up: a wait of 0.3 ms is 1 ms, not a busy loop.
            let ms = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            let n = self.epoll.wait(&mut events, ms);
            self.now = Instant::now();
            self.wall = std::time::SystemTime::now();
            for ev in &events[..n] {
                let (e, t) = (ev.events, ev.u64);
                self.event(t, e);
            }
            if self.now >= next_tick {
                self.sweep();
                next_tick = self.now + tick;
            }
            if phase.has_changed().unwrap_or(true) {
                let now = match phase.has_changed() {
                    Ok(_) => *phase.borrow_and_update(),
                    // The tier is gone: as a stop.
                    Err(_) => Phase::Stopped,
                };
                if now != Phase::Running {
                    self.drain(now == Phase::Stopped);
                }
            }
            self.hand_off();
            if self.draining && self.clients.len() == 0 {
                break;
            }
        }
        self.close_pool();
    }

    fn event(&mut self, t: u64, events: u32) {
        let (kind, index, generation) = untoken(t);
        match kind {
            KIND_LISTEN => self.accept_all(),
            KIND_CLIENT => {
                let Some(c) = self.clients.get(index, generation) else {
                    return;
                };
                mark(events, &mut c.readable, &mut c.closed);
                if events & GONE_EVENTS != 0 && matches!(c.state, State::Busy(_)) {
                    // The client went away (or half-closed) with its request in flight.
                    self.client_gone(index);
                    return;
                }
                self.drive(index);
            }
            KIND_TARGET => {
                let Some(t) = self.targets.get(index, generation) else {
                    return;
                };
                mark(events, &mut t.readable, &mut t.closed);
                match t.owner {
                    None => {
                        // A pooled connection spoke or closed: it is no longer usable.
                        if events & (libc::EPOLLIN as u32 | GONE_EVENTS) != 0 {
                            self.drop_target(index);
                        }
                    }
                    Some(owner) => {
                        if t.connecting {
                            if events & (libc::EPOLLOUT as u32 | GONE_EVENTS) == 0 {
                                return;
                            }
                            t.connecting = false;
                            if let Some(e) = connect_error(&t.tcp) {
                                self.connect_failed(owner, e);
                                self.drive(owner);
                                return;
                            }
                            if let Some(c) = self.clients.at(owner)
                                && let State::Busy(f) = &mut c.state
                            {
                                f.connect_time = f.connect_started.map_or(Duration::ZERO, |s| {
                                    self.now.saturating_duration_since(s)
                                });
                            }
                        }
                        self.drive(owner);
                    }
                }
            }
            _ => {}
        }
    }

    fn accept_all(&mut self) {
        loop {
            let Some(socket) = &self.accept else {
                return;
            };
            let (tcp, peer) = match socket.accept() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the next tick or connection tries again.
                    tracing::warn!(listener = %self.listener.cfg.name, error = %e, "accept failed");
                    return;
                }
            };
            let listener = &self.listener;
            L7Counters::add(&listener.shared.workers[self.worker].accepted, 1);
            L7Counters::add(&listener.shared.counters.new_connections, 1);
            L7Counters::add(&listener.cells.new_connections, 1);
            let slot = match listener.connections.admit(peer.ip()) {
                Ok(slot) => slot,
                Err(over) => {
                    L7Counters::add(&listener.shared.counters.rejected_connections, 1);
                    L7Counters::add(&listener.cells.rejected_connections, 1);
                    tracing::debug!(listener = %listener.cfg.name, %peer, limit = %over, "connection rejected");
                    continue;
                }
            };
            if tcp.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = tcp.set_nodelay(true);
            self.admit(tcp, peer, slot);
        }
    }

    fn admit(&mut self, tcp: TcpStream, peer: SocketAddr, slot: ConnectionSlot) {
        let listener = self.listener.clone();
        let open = OpenConnection::new(&listener.shared, self.worker);
        let ctx = Arc::new(ConnCtx {
            forwarded_peer: crate::headers::ForwardedPeer::new(peer.ip()),
            conn: super::sniff::ConnShared::new(),
            slot: Arc::new(slot),
            abuse: Arc::default(),
            info: ConnInfo {
                id: rand::random::<u64>(),
                tls: None,
            },
            listener,
            peer,
        });
        let (i, generation) = self.clients.next();
        if let Err(e) = self.epoll.add(
            tcp.as_raw_fd(),
            token(KIND_CLIENT, i, generation),
            CONN_EVENTS,
        ) {
            tracing::warn!(error = %e, "registering a client connection failed");
            return;
        }
        let now = self.now;
        self.clients.insert(
            i,
            Client {
                tcp,
                ctx,
                open,
                inbuf: Vec::with_capacity(READ_ROOM),
                out: Vec::new(),
                out_pos: 0,
                state: State::Head,
                head_deadline: Some(now + self.header_timeout),
                idle_deadline: now + self.idle_timeout,
                lifetime_end: now + self.keepalive,
                closing: self.draining,
                seen_any: false,
                readable: true,
                closed: false,
            },
        );
        // Edge-triggered: bytes that arrived with the connection raise no later event.
        self.drive(i);
    }

    /// Moves client `ci` as far as it goes: writes what is queued, reads, starts requests,
    /// forwards, relays the response.
    fn drive(&mut self, ci: usize) {
        loop {
            let Some(c) = self.clients.at(ci) else {
                return;
            };
            let mut progress = false;
            // What is queued for the client goes first.
            if c.out_pos < c.out.len() {
                let before = c.out_pos;
                match write_from(&c.tcp, &c.out, &mut c.out_pos) {
                    Ok(_) if c.out_pos > before => {
                        progress = true;
                        c.idle_deadline = self.now + self.idle_timeout;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        self.client_gone(ci);
                        return;
                    }
                }
                if c.out_pos == c.out.len() {
                    c.out.clear();
                    c.out_pos = 0;
                }
            }
            let flushed = c.out.is_empty();
            match &c.state {
                State::Head => {
                    if !flushed {
                        if !progress {
                            return;
                        }
                        continue;
                    }
                    if c.closing {
                        self.close_client(ci);
                        return;
                    }
                    match self.next_request(ci) {
                        Step::Progress => continue,
                        Step::Done => return,
                        Step::Wait => {}
                    }
                    // Read more of the head.
                    let Some(c) = self.clients.at(ci) else {
                        return;
                    };
                    if !c.readable {
                        return;
                    }
                    match read_into(&c.tcp, &mut c.inbuf, &mut c.readable, c.closed) {
                        Ok(0) => {
                            // The client closed: quietly between requests, as the native
                            // path does with a partial head too.
                            self.close_client(ci);
                            return;
                        }
                        Ok(_) => {
                            c.seen_any = true;
                            c.idle_deadline = self.now + self.idle_timeout;
                            if c.head_deadline.is_none() {
                                c.head_deadline = Some(self.now + self.header_timeout);
                            }
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(_) => {
                            self.close_client(ci);
                            return;
                        }
                    }
                }
                State::Busy(_) => match self.relay(ci, flushed) {
                    Step::Progress => continue,
                    Step::Done | Step::Wait if progress => continue,
                    Step::Done | Step::Wait => return,
                },
            }
        }
    }

    /// Starts the next request if its head is complete: `Progress` when it was started or
    /// handed off, `Wait` when more bytes are needed.
    fn next_request(&mut self, ci: usize) -> Step {
        let Some(c) = self.clients.at(ci) else {
            return Step::Done;
        };
        if c.inbuf.is_empty() {
            return Step::Wait;
        }
        let Some(end) = head_end(&c.inbuf) else {
            if c.inbuf.len() > MAX_LEAN_HEAD || c.inbuf.starts_with(b"PRI ") {
                self.decline(ci);
                return Step::Done;
            }
            return Step::Wait;
        };
        if end > MAX_LEAN_HEAD {
            self.decline(ci);
            return Step::Done;
        }
        match self.start(ci, end) {
            Some(()) => Step::Progress,
            None => {
                self.decline(ci);
                Step::Done
            }
        }
    }

    /// The native path takes client `ci` from its current request on: out of the loop now
    /// (no later event of this batch reaches it), handed over after the batch.
    fn decline(&mut self, ci: usize) {
        if let Some(c) = self.clients.remove(ci) {
            self.epoll.delete(c.tcp.as_raw_fd());
            self.handoffs.push(c);
        }
    }

    /// Starts the request whose head is `inbuf[..end]`; `None`: the native path takes it.
    fn start(&mut self, ci: usize, end: usize) -> Option<()> {
        let c = self.clients.at(ci)?;
        let head = &c.inbuf[..end];
        let raw = tokenize(head);
        if classify_tokens(&raw).tier != Tier::Compliant {
            return None;
        }
        let facts = wire::examine(&raw)?;
        let listener = &c.ctx.listener;
        let rules = listener.rules.load();
        let host = std::str::from_utf8(facts.host).ok()?;
        let target = std::str::from_utf8(raw.target).ok()?;
        let method = std::str::from_utf8(raw.method).ok()?;
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let headers = if rules.reads_headers() {
            header_map(&raw)?
        } else {
            http::HeaderMap::new()
        };
        let view = RequestView {
            method,
            host: Some(host),
            path,
            query,
            headers: &headers,
            source_ip: c.ctx.peer.ip(),
        };
        let matched = rules.evaluate(&view);
        let ResolvedAction::Forward(forward) = matched.action else {
            return None;
        };
        if forward.action.group_stickiness.is_some() {
            return None;
        }
        let index = forward.action.choose_index_with(rand::random)?;
        let (group, _) = forward.group(index)?;
        let gcfg = group.config();
        if gcfg.protocol != TargetProtocol::Http
            || gcfg.protocol_version != ProtocolVersion::Http1
            || gcfg.stickiness != Stickiness::None
        {
            return None;
        }
        // No target in service: the native path answers (503) and records it. (Without
        // stickiness the pick reads no time; the batch's clock reading stands in.)
        let picked = group.pick_at(None, self.wall)?;
        // Committed from here on: the request is this loop's.
        let mut ex = Exchange::start_lean(
            c.ctx.clone(),
            end,
            Some((raw.method, raw.target, facts.host)),
            facts.user_agent,
        );
        let now = ex.received_at();
        ex.rule(
            matched.priority,
            matched.rules_evaluated,
            ActionKind::Forward,
        );
        ex.picked(group, &picked);
        let tail = ForwardedTail::new(
            &c.ctx.forwarded_peer,
            listener.cfg.protocol.as_str(),
            &listener.forwarded_port,
            listener.cfg.xff,
            now,
            &mut rand::rng(),
        );
        ex.trace_id_bytes(tail.trace_id().as_bytes());
        let mut request = Vec::with_capacity(end + 160);
        wire::write_forwarded(&mut request, &raw, &tail);
        drop(rules);
        listener.shared.counters.http1_lean_requests.add(1);
        let head_request = facts.head;
        if facts.close || self.now >= c.lifetime_end {
            c.closing = true;
        }
        c.inbuf.drain(..end);
        c.head_deadline = (!c.inbuf.is_empty()).then(|| self.now + self.header_timeout);
        ex.dispatching();
        let addr = picked.addr;
        let deadline = self.now + self.connect_timeout;
        c.state = State::Busy(Box::new(Flight {
            ex,
            picked,
            target: usize::MAX,
            request,
            sent: 0,
            connection: TargetConnection::New,
            connect_started: None,
            connect_time: Duration::ZERO,
            body: BodyLeft::Head,
            head_request,
            answered: false,
            responded: false,
            reusable: false,
            body_sent: 0,
            deadline,
        }));
        self.attach_target(ci, addr, false);
        Some(())
    }

    /// Gives client `ci`'s request a target connection: a pooled one (unless `fresh`), else a
    /// new one.
    fn attach_target(&mut self, ci: usize, addr: SocketAddr, fresh: bool) {
        let pooled = if fresh {
            None
        } else {
            self.pool.get_mut(&addr).and_then(Vec::pop)
        };
        let (ti, connection, connecting) = match pooled {
            Some(ti) => (ti, TargetConnection::Reused, false),
            None => match connect(addr) {
                Ok((tcp, connecting)) => {
                    let (ti, generation) = self.targets.next();
                    if let Err(e) = self.epoll.add(
                        tcp.as_raw_fd(),
                        token(KIND_TARGET, ti, generation),
                        CONN_EVENTS,
                    ) {
                        self.connect_failed(ci, e);
                        return;
                    }
                    self.targets.insert(
                        ti,
                        Target {
                            tcp,
                            addr,
                            owner: None,
                            connecting,
                            buf: Vec::new(),
                            idle_since: self.now,
                            readable: false,
                            closed: false,
                        },
                    );
                    let connection = if fresh {
                        TargetConnection::RetriedOnNew
                    } else {
                        TargetConnection::New
                    };
                    (ti, connection, connecting)
                }
                Err(e) => {
                    self.connect_failed(ci, e);
                    return;
                }
            },
        };
        if let Some(t) = self.targets.at(ti) {
            t.owner = Some(ci);
        }
        let now = self.now;
        if let Some(c) = self.clients.at(ci)
            && let State::Busy(f) = &mut c.state
        {
            f.target = ti;
            f.connection = connection;
            f.sent = 0;
            f.connect_started = connecting.then_some(now);
            f.connect_time = Duration::ZERO;
        }
    }

    /// Sends the request and relays the response of client `ci`'s flight. `flushed`: nothing
    /// is queued for the client.
    fn relay(&mut self, ci: usize, flushed: bool) -> Step {
        let Some(c) = self.clients.at(ci) else {
            return Step::Done;
        };
        let State::Busy(f) = &mut c.state else {
            return Step::Wait;
        };
        let ti = f.target;
        let Some(t) = self.targets.at(ti) else {
            return Step::Wait;
        };
        if t.connecting {
            return Step::Wait;
        }
        let mut progress = false;
        if f.sent < f.request.len() {
            let before = f.sent;
            match write_from(&t.tcp, &f.request, &mut f.sent) {
                Ok(_) => progress |= f.sent > before,
                Err(e) => return self.target_broke(ci, e.to_string()),
            }
            if f.sent > before {
                f.deadline = self.now + self.target_idle;
            }
            if f.sent < f.request.len() {
                return if progress { Step::Progress } else { Step::Wait };
            }
        }
        // The response: read only while the client keeps up.
        if c.out.len() - c.out_pos >= HIGH_WATER || (!flushed && c.out.len() >= HIGH_WATER) {
            return if progress { Step::Progress } else { Step::Wait };
        }
        if !t.readable {
            return if progress { Step::Progress } else { Step::Wait };
        }
        match read_into(&t.tcp, &mut t.buf, &mut t.readable, t.closed) {
            Ok(0) => return self.target_closed(ci),
            Ok(_) => {
                f.deadline = self.now + self.target_idle;
                f.answered = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return if progress { Step::Progress } else { Step::Wait };
            }
            Err(e) => return self.target_broke(ci, e.to_string()),
        }
        self.feed(ci)
    }

    /// Turns the bytes read from client `ci`'s target into its response.
    fn feed(&mut self, ci: usize) -> Step {
        let max_head = self.max_response_head;
        let Some(c) = self.clients.at(ci) else {
            return Step::Done;
        };
        let closing = c.closing;
        let State::Busy(f) = &mut c.state else {
            return Step::Wait;
        };
        let Some(t) = self.targets.at(f.target) else {
            return Step::Wait;
        };
        if f.body == BodyLeft::Head {
            let out_start = c.out.len();
            match wire::response_head(&t.buf, &mut c.out, f.head_request, closing, max_head) {
                Ok(None) => return Step::Progress,
                Ok(Some(r)) => {
                    t.buf.drain(..r.consumed);
                    f.ex.forwarded_lean(r.status, f.connection, f.connect_time);
                    f.ex.responding_lean(r.status, r.written);
                    f.responded = true;
                    f.reusable = r.reusable;
                    f.body = match r.body {
                        wire::Body::Length(n) => BodyLeft::Length(n),
                        wire::Body::Chunked => BodyLeft::Chunked(Default::default()),
                        wire::Body::UntilClose => BodyLeft::UntilClose,
                    };
                    debug_assert_eq!(c.out.len() - out_start, r.written);
                }
                Err(bad) => {
                    c.out.truncate(out_start);
                    let e = ProxyError::TargetFailed {
                        target: f.picked.addr.to_string(),
                        source: bad.0.into(),
                    };
                    return self.fail(ci, e);
                }
            }
        }
        // Body bytes.
        let taken = match &mut f.body {
            BodyLeft::Head => 0,
            BodyLeft::Length(n) => {
                let take = usize::try_from(*n).unwrap_or(usize::MAX).min(t.buf.len());
                c.out.extend_from_slice(&t.buf[..take]);
                *n -= take as u64;
                take
            }
            BodyLeft::Chunked(scan) => {
                let end = scan.scan(&t.buf, |_| Ok::<(), ()>(())).unwrap_or(None);
                let take = end.unwrap_or(t.buf.len());
                c.out.extend_from_slice(&t.buf[..take]);
                if end.is_some() {
                    f.body = BodyLeft::Length(0);
                }
                take
            }
            BodyLeft::UntilClose => {
                let take = t.buf.len();
                if take > 0 {
                    chunk(&mut c.out, &t.buf);
                }
                take
            }
        };
        t.buf.drain(..taken);
        f.body_sent += taken as u64;
        if f.body == BodyLeft::Length(0) {
            if !t.buf.is_empty() {
                // Bytes after the response: the connection cannot be trusted again.
                f.reusable = false;
            }
            self.finish(ci);
        }
        Step::Progress
    }

    /// The flight of client `ci` is over (the response is queued for the client): the
    /// record is emitted, the target goes back to the pool or is closed.
    fn finish(&mut self, ci: usize) {
        let Some(Flight {
            ex,
            picked,
            target,
            reusable,
            ..
        }) = self.land(ci)
        else {
            return;
        };
        ex.finish();
        if let Some(c) = self.clients.at(ci)
            && c.head_deadline.is_none()
            && !c.inbuf.is_empty()
        {
            c.head_deadline = Some(self.now + self.header_timeout);
        }
        let gone = picked.left();
        drop(picked);
        if reusable && !gone && !self.draining {
            self.pool_target(target);
        } else {
            self.drop_target(target);
        }
    }

    /// Takes client `ci`'s flight off it (the connection is between requests again, its idle
    /// clock restarted) and returns it, its record holding the response body bytes sent so
    /// far (none before the head went out). What ends a flight (`finish`, `fail`,
    /// `client_gone`) starts here.
    fn land(&mut self, ci: usize) -> Option<Flight> {
        let c = self.clients.at(ci)?;
        let State::Busy(f) = std::mem::replace(&mut c.state, State::Head) else {
            return None;
        };
        c.idle_deadline = self.now + self.idle_timeout;
        let mut f = *f;
        f.ex.sent_body(f.body_sent);
        Some(f)
    }

    fn pool_target(&mut self, ti: usize) {
        let Some(t) = self.targets.at(ti) else {
            return;
        };
        if t.closed {
            // The target closed it while answering: no use keeping it.
            self.drop_target(ti);
            return;
        }
        t.owner = None;
        t.idle_since = self.now;
        t.buf.clear();
        let addr = t.addr;
        let idle = self.pool.entry(addr).or_default();
        idle.push(ti);
        if idle.len() > self.max_idle_per_target {
            let oldest = idle.remove(0);
            self.drop_target(oldest);
        }
    }

    fn drop_target(&mut self, ti: usize) {
        if let Some(t) = self.targets.remove(ti) {
            self.epoll.delete(t.tcp.as_raw_fd());
            if t.owner.is_none()
                && let Some(idle) = self.pool.get_mut(&t.addr)
            {
                idle.retain(|&i| i != ti);
            }
        }
    }

    fn close_pool(&mut self) {
        for ti in self.targets.indexes().collect::<Vec<_>>() {
            self.drop_target(ti);
        }
    }

    /// The target connection of client `ci` closed.
    fn target_closed(&mut self, ci: usize) -> Step {
        let Some(c) = self.clients.at(ci) else {
            return Step::Done;
        };
        let State::Busy(f) = &mut c.state else {
            return Step::Wait;
        };
        match f.body {
            BodyLeft::UntilClose => {
                c.out.extend_from_slice(b"0\r\n\r\n");
                f.body = BodyLeft::Length(0);
                f.reusable = false;
                self.finish(ci);
                Step::Progress
            }
            _ => self.target_broke(ci, "the target closed the connection".into()),
        }
    }

    /// The target connection of client `ci` failed (`why`): retried once on a new
    /// connection if it was a pooled one that had not answered, else the request fails.
    fn target_broke(&mut self, ci: usize, why: String) -> Step {
        let Some(c) = self.clients.at(ci) else {
            return Step::Done;
        };
        let State::Busy(f) = &mut c.state else {
            return Step::Wait;
        };
        let (ti, addr) = (f.target, f.picked.addr);
        if f.connection == TargetConnection::Reused && !f.answered {
            self.drop_target(ti);
            self.attach_target(ci, addr, true);
            return Step::Progress;
        }
        self.fail(
            ci,
            ProxyError::TargetFailed {
                target: addr.to_string(),
                source: why.into(),
            },
        )
    }

    fn connect_failed(&mut self, ci: usize, e: io::Error) {
        let addr = match self.clients.at(ci).map(|c| &c.state) {
            Some(State::Busy(f)) => f.picked.addr,
            _ => return,
        };
        // Not driven from here: a connect that fails at once fails inside `drive` (which goes
        // on with the next request), and driving again from here nested one `drive` per
        // pipelined request.
        self.fail(
            ci,
            ProxyError::Connect {
                target: addr.to_string(),
                source: Box::new(e),
            },
        );
    }

    /// Client `ci`'s request failed with `e`: before its response head, the load balancer
    /// answers (502, 504) and the connection goes on; after it, the response is cut off and
    /// the connection closed.
    fn fail(&mut self, ci: usize, e: ProxyError) -> Step {
        let Some(Flight {
            mut ex,
            picked,
            target,
            responded,
            ..
        }) = self.land(ci)
        else {
            return if self.clients.at(ci).is_some() {
                Step::Wait
            } else {
                Step::Done
            };
        };
        let Some(c) = self.clients.at(ci) else {
            return Step::Done;
        };
        if responded {
            ex.body_failed(e.to_string());
            c.closing = true;
            c.inbuf.clear();
            // What is queued goes out; the response ends short, and the connection closes.
        } else {
            tracing::debug!(error = %e, "request failed");
            ex.failed(&e);
            let status = e.status().as_u16();
            let (head, body) = wire::error_response(&mut c.out, status, c.closing);
            ex.responding_lean(status, head);
            ex.sent_body(body as u64);
        }
        ex.finish();
        drop(picked);
        self.drop_target(target);
        Step::Progress
    }

    /// Client `ci` went away: its request in flight ends as 460 (nothing sent).
    fn client_gone(&mut self, ci: usize) {
        if let Some(Flight {
            mut ex,
            picked,
            target,
            responded,
            ..
        }) = self.land(ci)
        {
            if responded {
                ex.body_failed("the client closed the connection".into());
            }
            // Dropped without a response: the record says 460.
            drop(ex);
            drop(picked);
            self.drop_target(target);
        }
        self.close_client(ci);
    }

    fn close_client(&mut self, ci: usize) {
        if let Some(c) = self.clients.remove(ci) {
            self.epoll.delete(c.tcp.as_raw_fd());
        }
    }

    /// Hands the connections the loop declined to the native path, on the worker's runtime.
    fn hand_off(&mut self) {
        for c in std::mem::take(&mut self.handoffs) {
            L7Counters::add(&self.listener.shared.counters.http1_lean_handoffs, 1);
            let Client {
                tcp,
                ctx,
                open,
                inbuf,
                ..
            } = c;
            let (listener, peer, slot, id) = (
                ctx.listener.clone(),
                ctx.peer,
                ctx.slot.clone(),
                ctx.info.id,
            );
            drop(ctx);
            self.runtime.spawn(self.handed.track_future(async move {
                let _open = open;
                let tcp = match tokio::net::TcpStream::from_std(tcp) {
                    Ok(tcp) => tcp,
                    Err(e) => {
                        tracing::warn!(error = %e, "handing a connection to the native path failed");
                        return;
                    }
                };
                super::run_http(
                    listener,
                    Prefixed::new(inbuf, tcp),
                    peer,
                    true,
                    slot,
                    ConnInfo { id, tls: None },
                )
                .await;
            }));
        }
    }

    /// The tick: deadlines of clients and targets, and pooled connections idle too long.
    /// The client side as on the native path (`sniff.rs`): a head not complete by its
    /// deadline is answered 408; no byte for the idle timeout closes the connection, with a
    /// 408 if no request came yet or one was half sent; the idle timeout does not run while
    /// a request is in flight (the target's timeouts do).
    fn sweep(&mut self) {
        let now = self.now;
        for ci in self.clients.indexes().collect::<Vec<_>>() {
            let Some(c) = self.clients.at(ci) else {
                continue;
            };
            let State::Busy(f) = &c.state else {
                if c.out_pos < c.out.len() {
                    // A response still queued: the client must keep reading it.
                    if now >= c.idle_deadline {
                        self.close_client(ci);
                    }
                } else if c.head_deadline.is_some_and(|d| now >= d) {
                    self.reject(ci, super::HEADER_TIMEOUT_REASON);
                } else if now >= c.idle_deadline {
                    if !c.seen_any || !c.inbuf.is_empty() {
                        self.reject(ci, "idle timeout before a request");
                    } else {
                        self.close_client(ci);
                    }
                } else if now >= c.lifetime_end && !c.closing {
                    c.closing = true;
                    if c.inbuf.is_empty() {
                        self.close_client(ci);
                    }
                }
                continue;
            };
            if now >= c.lifetime_end {
                c.closing = true;
            }
            let addr = f.picked.addr;
            let e = if f.picked.left() {
                // The target left its group (deregistration delay over) mid-request.
                ProxyError::DrainExpired {
                    target: addr.to_string(),
                }
            } else if now >= f.deadline {
                match self.targets.at(f.target) {
                    Some(t) if t.connecting => ProxyError::ConnectTimeout {
                        target: addr.to_string(),
                    },
                    _ => ProxyError::TargetTimeout {
                        target: addr.to_string(),
                        timeout: self.target_idle,
                    },
                }
            } else {
                continue;
            };
            self.fail(ci, e);
            self.drive(ci);
        }
        for ti in self.targets.indexes().collect::<Vec<_>>() {
            if let Some(t) = self.targets.at(ti)
                && t.owner.is_none()
                && now.saturating_duration_since(t.idle_since) >= self.target_idle
            {
                self.drop_target(ti);
            }
        }
    }

    /// The client side timed out before a complete request head (`reason`): 408, recorded
    /// like the native path's, and the connection closes.
    fn reject(&mut self, ci: usize, reason: &'static str) {
        let Some(c) = self.clients.at(ci) else {
            return;
        };
        let mut ex = Exchange::start_lean(c.ctx.clone(), c.inbuf.len(), None, None);
        tracing::debug!(client = %c.ctx.peer, status = 408, reason, "request rejected");
        ex.answer(
            http::StatusCode::REQUEST_TIMEOUT,
            Some((LbError::ClientRequest, reason.to_owned())),
        );
        c.closing = true;
        c.inbuf.clear();
        c.head_deadline = None;
        let (head, body) = wire::error_response(&mut c.out, 408, true);
        ex.responding_lean(408, head);
        ex.sent_body(body as u64);
        ex.finish();
        self.drive(ci);
    }

    /// The tier drains: no more connections; idle ones close now, busy ones after their
    /// response (`stopped`: all of them now).
    fn drain(&mut self, stopped: bool) {
        self.draining = true;
        if let Some(socket) = self.accept.take() {
            self.epoll.delete(socket.as_raw_fd());
        }
        for ci in self.clients.indexes().collect::<Vec<_>>() {
            let Some(c) = self.clients.at(ci) else {
                continue;
            };
            c.closing = true;
            let idle = matches!(c.state, State::Head) && c.out.is_empty();
            if stopped || idle {
                if let State::Busy(_) = c.state {
                    self.client_gone(ci);
                } else {
                    self.close_client(ci);
                }
            }
        }
        let idle: Vec<usize> = self.pool.values().flatten().copied().collect();
        for ti in idle {
            self.drop_target(ti);
        }
    }
}

/// What a step of a connection did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Something moved: go on.
    Progress,
    /// Nothing to do until the next event.
    Wait,
    /// The connection is gone (closed or handed off).
    Done,
}

/// What an event says of a socket's read side: bytes (or the peer's close) to read, and
/// whether the peer closed (see [`read_into`]).
fn mark(events: u32, readable: &mut bool, closed: &mut bool) {
    if events & (libc::EPOLLIN as u32 | GONE_EVENTS) != 0 {
        *readable = true;
    }
    *closed |= events & GONE_EVENTS != 0;
}

/// Where a request head ends (just past its empty line), if it is complete: CRLF CRLF, or a
/// bare LF line end anywhere (which the native path classifies).
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]) {
        let i = from + i;
        match buf.get(i + 1) {
            Some(b'\n') => return Some(i + 2),
            Some(b'\r') if buf.get(i + 2) == Some(&b'\n') => return Some(i + 3),
            Some(_) => from = i + 1,
            None => return None,
        }
    }
    None
}

/// `data` as one chunk of a chunked body (the size in uppercase hex, as the native path writes it).
fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    let mut hex = [0u8; 16];
    let mut n = data.len();
    let mut i = hex.len();
    loop {
        i -= 1;
        hex[i] = b"0123456789ABCDEF"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&hex[i..]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The request's fields as a header map, for rule sets with `http-header` conditions;
/// `None` for a field a map cannot hold (the native path takes the request then).
fn header_map(raw: &crate::proxy::desync::RawHead<'_>) -> Option<http::HeaderMap> {
    let mut map = http::HeaderMap::with_capacity(raw.headers.len());
    for h in &raw.headers {
        let name = http::HeaderName::from_bytes(h.name).ok()?;
        let value = http::HeaderValue::from_bytes(crate::proxy::desync::trim_ows(h.value)).ok()?;
        map.append(name, value);
    }
    Some(map)
}

/// A connection handed to the native path: the bytes the lean loop read come first.
pub(super) struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    tcp: tokio::net::TcpStream,
}

impl Prefixed {
    fn new(prefix: Vec<u8>, tcp: tokio::net::TcpStream) -> Self {
        Self {
            prefix,
            pos: 0,
            tcp,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_ends_at_its_empty_line_whatever_its_line_ends() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: x\n\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r"), None);
        assert_eq!(head_end(b""), None);
    }

    #[test]
    fn chunks_carry_their_size_in_hex() {
        let mut out = Vec::new();
        chunk(&mut out, &[b'a'; 26]);
        chunk(&mut out, b"z");
        assert_eq!(
            out,
            [&b"1A\r\n"[..], &[b'a'; 26], b"\r\n1\r\nz\r\n"].concat()
        );
    }

    #[test]
    fn tokens_keep_kind_index_and_generation_apart() {
        for (kind, index, generation) in [(0, 0, 0), (2, 12345, 7), (1, (1 << 30) - 1, u32::MAX)] {
            assert_eq!(
                untoken(token(kind, index, generation)),
                (kind, index, generation)
            );
        }
    }

    #[test]
    fn slab_slots_come_back_with_a_new_generation() {
        let mut s = Slab::new();
        let (a, ga) = s.next();
        s.insert(a, "a");
        let (b, gb) = s.next();
        s.insert(b, "b");
        assert_eq!(s.len(), 2);
        assert_eq!(s.remove(a), Some("a"));
        let (c, gc) = s.next();
        s.insert(c, "c");
        assert_eq!(c, a, "the freed slot is used again");
        assert_ne!(gc, ga);
        assert!(
            s.get(a, ga).is_none(),
            "an old token no longer reaches the slot"
        );
        assert_eq!(s.get(c, gc), Some(&mut "c"));
        assert_eq!(s.get(b, gb), Some(&mut "b"));
        // A slot taken by `next` but never filled goes back to the free list.
        let (d, _) = s.next();
        assert!(s.at(d).is_none());
        assert_eq!(s.len(), 2);
    }
}
