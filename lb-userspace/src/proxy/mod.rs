//! The Layer 7 tier: listeners, TLS, request handling and forwarding to targets.
//!
//! - [`server`]: listeners (HTTP/HTTPS, SNI, ALPN), the hyper server, limits, timeouts,
//!   LB-generated responses, graceful shutdown; evaluates [`crate::rules`] per request.
//! - [`desync`]: request classification (ALB desync mitigation, `defensive` mode).
//! - [`client`] and [`pool`]: forwarding to targets over pooled connections, with keep-alive
//!   learning and safe retry of stale pooled connections.
//! - [`error`]: proxy errors: which side failed, whether retry is safe, the status they map to.
//! - [`recycle`]: header maps kept per thread and used again by the native HTTP/1 path.
//! - [`names`]: header names kept per connection and used again by the native HTTP/1 path.
//! - `deadline`: idle timers moved on only when they fire, not at every activity.
//! - `date`: the current second's HTTP date, formatted once a second per thread.
//! - `rawio`: a target's plain TCP socket read and written without glibc's cancellation
//!   points.
pub mod client;
mod date;
mod deadline;
pub mod desync;
pub mod error;
pub mod names;
pub mod pool;
mod rawio;
pub mod recycle;
pub mod server;
