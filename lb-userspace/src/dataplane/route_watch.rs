//! Invalidation of `lb_xdp`'s next-hop cache: a thread that listens on a `NETLINK_ROUTE`
//! socket joined to the kernel's link, neighbour, address, route and rule groups of both
//! families (rtnetlink(7)) and bumps [`LbConfig::nexthop_generation`] after every batch of
//! messages. The messages are not parsed: any change there may move a backend's next hop (a
//! neighbour's MAC, a route via another gateway or interface, an MTU, an address the lookup
//! depends on), and a new generation costs one `bpf_fib_lookup` per backend per CPU.
//! A lost message (`ENOBUFS`: the socket's buffer overflowed) counts as a change too.
//!
//! The socket belongs to the network namespace of the thread that calls
//! [`RouteWatch::start`], the namespace whose routes `bpf_fib_lookup` consults.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    thread::JoinHandle,
};

use aya::maps::{Array, IterableMap as _, MapData};
use lb_common::LbConfig;

use super::{DataplaneError, Result, update_lb_config};

/// rtnetlink multicast groups (`enum rtnetlink_groups`, include/uapi/linux/rtnetlink.h).
const GROUPS: [(u32, &str); 9] = [
    (1, "link"),
    (3, "neigh"),
    (5, "ipv4-ifaddr"),
    (7, "ipv4-route"),
    (8, "ipv4-rule"),
    (9, "ipv6-ifaddr"),
    (11, "ipv6-route"),
    (19, "ipv6-rule"),
    // Nexthop objects (`ip nexthop`, Linux 5.3); optional.
    (32, "nexthop"),
];

/// Receive buffer asked for: a burst of changes (a link flap withdraws many routes) should
/// not overflow it; if it does, `ENOBUFS` still bumps the generation.
const RCVBUF: libc::c_int = 1 << 20;

/// Moves the generation on by one; returns the new one. The read-modify-write holds the
/// process's `LB_CONFIG` lock (see [`update_lb_config`]), so no other write of the entry falls
/// between its read and its write: a generation never goes back to one that lookups before
/// the change were stored under.
pub fn bump_generation(config: &mut Array<MapData, LbConfig>) -> Result<u32> {
    update_lb_config(config, |c| {
        c.nexthop_generation = c.nexthop_generation.wrapping_add(1);
    })
    .map(|c| c.nexthop_generation)
}

/// The running watch; dropping it stops the thread.
pub struct RouteWatch {
    /// Write end of the pipe the thread polls besides the socket: closing it ends the thread.
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

fn os_err(what: &str) -> DataplaneError {
    DataplaneError::Io {
        what: "watching route changes:",
        path: what.into(),
        source: io::Error::last_os_error(),
    }
}

/// A `NETLINK_ROUTE` socket joined to [`GROUPS`], in the calling thread's namespace.
fn subscribe() -> Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(os_err("socket(AF_NETLINK, NETLINK_ROUTE)"));
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid sockaddr_nl (pid 0: the kernel assigns one).
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: valid descriptor and address of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(os_err("bind(netlink)"));
    }
    // Best effort: the default buffer works, only a burst may overflow it sooner.
    let rcvbuf = RCVBUF;
    // SAFETY: valid descriptor and option value of the size passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const rcvbuf).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    for (group, name) in GROUPS {
        // SAFETY: valid descriptor and option value of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_ADD_MEMBERSHIP,
                (&raw const group).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if rc != 0 && name != "nexthop" {
            return Err(os_err(&format!("joining rtnetlink group {name}")));
        }
    }
    Ok(fd)
}

/// Reads every message waiting on the non-blocking socket. True if the socket is unusable
/// (the thread then ends, leaving the cache to its maximum age).
fn drain(sock: &OwnedFd, buf: &mut [u8]) -> bool {
    loop {
        // SAFETY: valid descriptor and buffer of the length passed.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            continue;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) => return false,
            // Messages were lost: treated as a change, as all are.
            Some(libc::ENOBUFS | libc::EINTR) => continue,
            _ => return true,
        }
    }
}

impl RouteWatch {
    /// Subscribes (in the calling thread's network namespace) and starts the thread that
    /// bumps the generation in `config` (through a second handle on the same map) after every
    /// change.
    pub fn start(config: &Array<MapData, LbConfig>) -> Result<Self> {
        let sock = subscribe()?;
        let map_fd = config
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| DataplaneError::Io {
                what: "watching route changes: duplicating",
                path: "LB_CONFIG".into(),
                source,
            })?;
        let mut config: Array<MapData, LbConfig> =
            aya::maps::Map::Array(MapData::from_fd(map_fd).map_err(|source| {
                DataplaneError::Map {
                    what: "opening LB_CONFIG for the route watch".into(),
                    source,
                }
            })?)
            .try_into()
            .map_err(|source| DataplaneError::Map {
                what: "opening LB_CONFIG for the route watch".into(),
                source,
            })?;
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: valid out-array of two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(os_err("pipe2"));
        }
        // SAFETY: fresh descriptors we own.
        let (stop_rx, stop_tx) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let thread = std::thread::Builder::new()
            .name("lb-route-watch".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let mut pfd = [
                        libc::pollfd {
                            fd: sock.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: stop_rx.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    // SAFETY: valid array of two pollfds.
                    let rc = unsafe { libc::poll(pfd.as_mut_ptr(), 2, -1) };
                    if rc < 0 {
                        if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                            continue;
                        }
                        tracing::warn!(error = %io::Error::last_os_error(), "route watch: poll failed; cached next hops now expire by age only");
                        return;
                    }
                    if pfd[1].revents != 0 {
                        return;
                    }
                    if pfd[0].revents == 0 {
                        continue;
                    }
                    let broken = drain(&sock, &mut buf);
                    if let Err(e) = bump_generation(&mut config) {
                        tracing::warn!(error = %e, "route watch: cannot bump the next-hop generation");
                    }
                    if broken {
                        tracing::warn!(error = %io::Error::last_os_error(), "route watch: netlink socket failed; cached next hops now expire by age only");
                        return;
                    }
                }
            })
            .map_err(|source| DataplaneError::Io {
                what: "watching route changes: spawning",
                path: "lb-route-watch".into(),
                source,
            })?;
        Ok(Self {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for RouteWatch {
    fn drop(&mut self) {
        // Closing the write end wakes the thread's poll (POLLHUP on the read end).
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
