//! lb: an ELB-style load balancer. This library holds everything the `lb` binary wires up;
//! `main.rs` only parses flags and dispatches.
//!
//! - Layer 4: [`dataplane`] loads the XDP programs and writes their maps; [`maglev`] builds the
//!   consistent-hash rings; [`l4`] keeps the VIP/backend registry and turns changes into map
//!   writes.
//! - Layer 7: [`proxy`] (listeners, TLS, forwarding), [`rules`] (ALB listener rules),
//!   [`targets`] (target groups, algorithms, stickiness), [`headers`] (X-Forwarded-*, trace id).
//! - Control: [`cli`] (flags), [`config`] (flags → validated model), [`admin`] (runtime socket).
//! - Process: [`rlimit`] (the open-files limit `lb run` raises at start).
pub mod admin;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod headers;
pub mod inspect;
pub mod l4;
pub mod maglev;
pub mod packet;
pub mod proxy;
pub mod rlimit;
pub mod rules;
pub mod targets;
