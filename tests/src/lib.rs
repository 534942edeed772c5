//! Test harness of `lb`: real topologies in network namespaces, the real `lb` binary, real
//! traffic.
//!
//! - [`Topology`] builds a client, balancers and backends on one bridged L2 segment, starts
//!   `lb run` and `lb decap`, and removes everything on drop (also while panicking).
//! - [`netns`] runs code and commands inside a namespace ([`netns::in_netns`]).
//! - [`servers`] are small TCP, HTTP/1.0 and UDP servers that answer with their backend's name;
//!   [`client`] connects to them from chosen source ports.
//! - [`stats`] reads `lb stats --json` without depending on its exact layout; [`health`]
//!   reads `lb targets health --json` by its AWS field names.
//! - [`wait::wait_until`] waits for a condition with a deadline (tests never assert timings).
//! - [`bpf`] makes and alters pinned maps with raw `bpf(2)` calls, as another `lb` would have
//!   left them.
//!
//! Errors are `anyhow` with context: a harness failure is read by a person, never matched.
//!
//! ```no_run
//! use std::net::{Ipv4Addr, SocketAddrV4};
//! use lb_tests::{Topology, VipSpec, client, tally};
//!
//! let vip = SocketAddrV4::new(Ipv4Addr::new(10, 100, 0, 1), 80);
//! let mut topo = Topology::builder()
//!     .backends(3)
//!     .vip(VipSpec::tcp("web", *vip.ip(), vip.port()))
//!     .build()?;
//! topo.serve_tcp_lines(80)?;
//! let answers = topo.in_client(|| {
//!     (0..30u16).map(|i| client::ask_tcp(20_000 + i, vip)).collect::<Result<Vec<_>, _>>()
//! })??;
//! println!("{:?}", tally(answers)); // {"backend-1": 9, "backend-2": 11, "backend-3": 10}
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! Kernel tests need root and the `lb` binary (`$LB_BIN`, else `<target>/debug/lb`). Topologies
//! of one process are serialised by a lock, so `cargo test` is safe; `--test-threads=1` keeps
//! the output readable.
pub mod bpf;
pub mod client;
pub mod health;
pub mod netns;
mod pass;
pub mod process;
pub mod servers;
pub mod stats;
pub mod topology;
pub mod wait;

pub use topology::{Node, Proto, TargetSpec, Topology, TopologyBuilder, VipSpec};

/// Counts how often each answer occurs (e.g. which backend served each connection).
pub fn tally<I, S>(answers: I) -> std::collections::BTreeMap<String, usize>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut counts = std::collections::BTreeMap::new();
    for a in answers {
        *counts.entry(a.into()).or_insert(0) += 1;
    }
    counts
}
