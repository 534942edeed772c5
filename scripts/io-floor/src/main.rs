//! io-floor: a minimal HTTP/1.1 keep-alive forwarder in four I/O models, to measure what system
//! time per proxied request each model costs (issue 8; BENCHMARKS.md, "System time per request
//! by I/O model (stop 24)"). A study tool, not part of lb.
//!
//! usage: io-floor epoll-tokio|epoll-raw|epoll-h1|uring|uring-mshot|uring-h1 LISTEN BACKEND [THREADS]
//!   LISTEN, BACKEND: IPv4 address:port. THREADS: workers (default 2 = the VM's CPUs).
//!   Per accepted client connection one backend connection; each request head (up to
//!   `\r\n\r\n`, no body) and each response (head + Content-Length body) is forwarded
//!   unchanged, except in the `-h1` arms (`epoll-h1` on `epoll-raw`'s loop, `uring-h1` on
//!   `uring-mshot`'s), which do `lb`'s per-request work instead (module `h1`: parse, desync
//!   checks, rules, round robin, the rewritten head with `X-Forwarded-*`, the response
//!   re-encoded). On SIGTERM/SIGINT it prints its counters to stderr and exits.
//!   IOFLOOR_URING_FLAGS=defer (default: SINGLE_ISSUER + DEFER_TASKRUN) | coop (SINGLE_ISSUER +
//!   COOP_TASKRUN) | none. IOFLOOR_BURN_NS=N: about N ns of a multiply-add chain per request
//!   (user time, to see each model's system time at a proxy's user time).
mod epoll_raw;
mod frame;
mod h1;
mod sock;
mod stats;
mod tokio_v;
mod uring;

use std::net::SocketAddrV4;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 4 {
        eprintln!(
            "usage: io-floor epoll-tokio|epoll-raw|epoll-h1|uring|uring-mshot|uring-h1 LISTEN BACKEND [THREADS]"
        );
        std::process::exit(2);
    }
    let listen: SocketAddrV4 = a[2].parse().expect("LISTEN");
    let backend: SocketAddrV4 = a[3].parse().expect("BACKEND");
    let threads: usize = a.get(4).map(|t| t.parse().expect("THREADS")).unwrap_or(2);
    stats::install();
    let r = match a[1].as_str() {
        "epoll-tokio" => tokio_v::run(listen, backend, threads),
        "epoll-raw" => epoll_raw::run(listen, backend, threads, false),
        "epoll-h1" => epoll_raw::run(listen, backend, threads, true),
        "uring" => uring::run(listen, backend, threads, false, false),
        "uring-mshot" => uring::run(listen, backend, threads, true, false),
        "uring-h1" => uring::run(listen, backend, threads, true, true),
        v => {
            eprintln!("unknown variant {v}");
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("io-floor: {e}");
        std::process::exit(1);
    }
}
