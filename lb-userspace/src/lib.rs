//! lb: an ELB-style load balancer. This library holds everything the `lb` binary wires up;
//! `main.rs` only parses flags and dispatches.
//!
//! - Layer 4: [`dataplane`] loads the XDP programs and writes their maps; [`maglev`] builds the
//!   consistent-hash rings; [`l4`] knows what a VIP is and keeps the maps in line with the
//!   registry.
//! - Layer 7: [`proxy`] (listeners, TLS, forwarding), [`rules`] (ALB listener rules),
//!   [`targets`] (target groups, routing, algorithms, stickiness), [`headers`]
//!   (X-Forwarded-*, trace id).
//! - Control: [`registry`] (the one source of truth for targets and their states),
//!   [`health`] (health checks), [`cli`] (flags), [`config`] (flags → validated model),
//!   [`admin`] (the runtime API), [`ctl`] (the CLI verbs that call it), [`daemon`] (`lb run`).
//! - Observability: [`accesslog`] (ALB-format access logs, the health-check log, the
//!   background writer), [`metrics`] (CloudWatch-named metrics of both planes, Prometheus).
//! - Process: [`rlimit`] (the open-files limit `lb run` raises at start).
pub mod accesslog;
pub mod admin;
pub mod civil;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod dataplane;
pub mod headers;
pub mod health;
pub mod inspect;
pub mod l4;
pub mod maglev;
pub mod metrics;
pub mod packet;
pub mod proxy;
pub mod registry;
pub mod rlimit;
pub mod rules;
pub mod stats;
pub mod targets;
