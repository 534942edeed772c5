//! L7 target groups: configuration, balancing algorithms, weights, stickiness and per-target
//! state. Pure logic and shared runtime state; no network I/O (the proxy connects, health
//! checks come later and only call [`TargetGroup::set_reason`] / [`TargetGroup::set_state`]).
//!
//! # API
//!
//! - [`parse_target_group`] turns one `--target-group` value into a [`TargetGroupConfig`]
//!   ([`TargetProtocol`], [`ProtocolVersion`], [`Algorithm`], [`Stickiness`], `verify_tls`),
//!   every option at its AWS default unless given; errors ([`TargetGroupError`]) name the
//!   option and what it accepts.
//! - [`TargetGroup`] is the runtime group, shared by all connections behind an `Arc`:
//!   [`set_targets`](TargetGroup::set_targets), [`register`](TargetGroup::register),
//!   [`deregister`](TargetGroup::deregister) ([`TargetAddr`]: address and weight),
//!   [`set_state`](TargetGroup::set_state) / [`set_reason`](TargetGroup::set_reason)
//!   ([`TargetState`], [`TargetReason`]: AWS states and reason codes),
//!   [`describe`](TargetGroup::describe) ([`TargetStatus`]), [`counters`](TargetGroup::counters)
//!   ([`TargetGroupCounters`]) and [`host_counts`](TargetGroup::host_counts).
//! - [`TargetGroup::pick`] chooses a target for a request and returns a [`Picked`] guard: it
//!   counts one outstanding request on the target until dropped, says whether stickiness
//!   chose it ([`Picked::sticky`]) and which `Set-Cookie` lines the response needs
//!   ([`Picked::set_cookies`]).
//!
//! # Picking
//!
//! 1. Routable targets: those in service (`Healthy`, `Unavailable`). If none is in service the
//!    group fails open: `Initial` and `Unhealthy` targets are routable too, and the pick counts
//!    as UnhealthyRoutingRequestCount. `Draining` and `Unused` targets never get new requests;
//!    with no routable target at all, `pick` returns `None` (503).
//! 2. Stickiness overrides the algorithm after the first pick: a valid, unexpired cookie of
//!    this group naming a routable target chooses it. A tampered, foreign, expired cookie, or
//!    one naming a target that left (deregistered, not routable) is ignored: the algorithm
//!    picks and a new cookie is issued. See [`sticky`] for the cookie format.
//! 3. Otherwise the algorithm: smooth weighted round robin, least outstanding requests (ties
//!    round robin), or weighted random.
//!
//! Weights are ours (ALB has none per target): default 1, weight 0 takes no new requests
//! unless every routable target has weight 0.

mod config;
mod group;
mod state;
pub mod sticky;

pub use config::{
    Algorithm, DEFAULT_STICKINESS_DURATION, MAX_STICKINESS_SECONDS, MAX_TARGET_GROUP_NAME_LEN,
    MIN_STICKINESS_SECONDS, ProtocolVersion, Stickiness, TargetGroupConfig, TargetGroupError,
    TargetProtocol, parse_target_group,
};
pub use group::{Picked, TargetGroup, TargetGroupCounters, TargetStatus};
pub use state::{DEFAULT_WEIGHT, TargetAddr, TargetReason, TargetState};
