//! Target groups: configuration (protocol, algorithm, stickiness, health checks, lifecycle
//! attributes), the routing rule both tiers follow, and the L7 picker. Pure logic and shared
//! runtime state; no network I/O. Who the targets are and how healthy they are is the
//! registry's business ([`crate::registry`]); it hands the picker its view through
//! [`TargetGroup::apply`].
//!
//! # API
//!
//! - [`parse_target_group`] turns one `--target-group` value into a [`TargetGroupConfig`]
//!   ([`TargetProtocol`], [`ProtocolVersion`], [`Algorithm`], [`Stickiness`], `verify_tls`,
//!   [`health_check::HealthCheckSettings`], [`GroupAttributes`]), every option at its AWS
//!   default unless given; [`modify_target_group`] changes a running group's health checks
//!   and attributes. Errors ([`TargetGroupError`]) name the option and what it accepts.
//! - [`routing`]: which targets take new traffic, and when a group fails open.
//! - [`TargetGroup`] is the L7 runtime group, shared by all connections behind an `Arc`:
//!   [`apply`](TargetGroup::apply) ([`Member`]: the registry's view of one target),
//!   [`describe`](TargetGroup::describe) ([`TargetStatus`]), [`counters`](TargetGroup::counters)
//!   ([`TargetGroupCounters`]) and [`host_counts`](TargetGroup::host_counts);
//!   [`set_targets`](TargetGroup::set_targets) / [`set_state`](TargetGroup::set_state) for
//!   tests and tools without a control plane.
//! - [`TargetGroup::pick`] chooses a target for a request and returns a [`Picked`] guard: it
//!   counts one outstanding request on the target until dropped, says whether stickiness
//!   chose it ([`Picked::sticky`]), which `Set-Cookie` lines the response needs
//!   ([`Picked::set_cookies`]), when the target is gone for good ([`Picked::gone`]), and
//!   the forwarder's handle on the target's connection pool ([`Picked::target_handle`]: asked
//!   for once per registration of the target, then kept by its entry).
//!
//! # Picking
//!
//! 1. Routable targets: those the registry says take new requests ([`routing`]: in service,
//!    or every not-draining target while the group fails open; such picks count as
//!    UnhealthyRoutingRequestCount). With no routable target at all, `pick` returns `None`
//!    (503).
//! 2. Stickiness overrides the algorithm after the first pick: a valid, unexpired cookie of
//!    this group naming a routable target chooses it. A tampered, foreign, expired cookie, or
//!    one naming a target that left (deregistered, not routable) is ignored: the algorithm
//!    picks and a new cookie is issued. See [`sticky`] for the cookie format.
//! 3. Otherwise the algorithm: smooth weighted round robin, least outstanding requests (ties
//!    round robin), or weighted random. A target in slow start gets its weight times the
//!    fraction of the ramp elapsed.
//!
//! Weights are ours (ALB has none per target): default 1, weight 0 takes no new requests
//! unless every routable target has weight 0.

mod config;
mod group;
pub mod health_check;
pub mod routing;
mod state;
pub mod sticky;

pub use config::{
    Algorithm, DEFAULT_DEREGISTRATION_DELAY, DEFAULT_STICKINESS_DURATION, GroupAttributes,
    MAX_STICKINESS_SECONDS, MAX_TARGET_GROUP_NAME_LEN, MIN_STICKINESS_SECONDS, MinHealthy,
    ProtocolVersion, RUNTIME_OPTIONS, Stickiness, TargetGroupConfig, TargetGroupError,
    TargetProtocol, modify_target_group, parse_target_group,
};
#[cfg(test)]
pub(crate) use group::Detached;
pub use group::{
    Member, Picked, PickedCells, Registration, SlowStart, TargetGroup, TargetGroupCounters,
    TargetStatus,
};
pub use state::{DEFAULT_WEIGHT, TargetAddr, TargetReason, TargetState};
