//! Targets and their states (AWS "Target states" with reason codes).

use std::fmt;
use std::net::SocketAddr;

/// Weight of a target registered without one. ALB has no per-target weight; weights are ours
/// (as the L4 tier's Maglev weights), so an unweighted target counts as 1.
pub const DEFAULT_WEIGHT: u32 = 1;

/// A target to register: address, port and weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TargetAddr {
    /// Where requests go.
    pub addr: SocketAddr,
    /// Relative share for `round_robin` and `weighted_random` (default [`DEFAULT_WEIGHT`]).
    /// Weight 0 means "no new requests" (sticky sessions included) while another routable
    /// target has a positive weight; if every routable target has weight 0 they share
    /// equally, so a group never refuses traffic because of weights alone.
    pub weight: u32,
}

impl TargetAddr {
    /// A target with the default weight.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            weight: DEFAULT_WEIGHT,
        }
    }

    /// A target with an explicit weight.
    pub fn with_weight(addr: SocketAddr, weight: u32) -> Self {
        Self { addr, weight }
    }
}

/// State of a registered target (AWS target states). Which states receive requests:
///
/// - in service: `Healthy`, and `Unavailable` (health checks disabled: AWS routes to such
///   targets);
/// - fail open only (when no target is in service): `Initial`, `Unhealthy`,
///   `UnhealthyDraining`;
/// - never: `Draining` (in-flight requests finish, no new ones), `Unused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetState {
    /// Registration or the first health check is in progress.
    Initial,
    /// Passing health checks.
    Healthy,
    /// Failing health checks.
    Unhealthy,
    /// Failing health checks, and keeping its established L4 flows for the group's unhealthy
    /// draining interval (NLB's `unhealthy.draining`); no new flows.
    UnhealthyDraining,
    /// Not registered, or its group is not used by any listener rule.
    Unused,
    /// Deregistering: finishing in-flight requests during the deregistration delay.
    Draining,
    /// Health checks are disabled for the group.
    Unavailable,
}

impl TargetState {
    /// Receives requests while at least one target of the group is in service.
    pub fn in_service(self) -> bool {
        matches!(self, Self::Healthy | Self::Unavailable)
    }

    /// Receives requests when the group fails open (no target in service).
    pub fn routable_when_failing_open(self) -> bool {
        matches!(
            self,
            Self::Healthy
                | Self::Unavailable
                | Self::Initial
                | Self::Unhealthy
                | Self::UnhealthyDraining
        )
    }

    /// AWS's spelling (`initial`, `healthy`, …), as shown by `describe-target-health`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initial => "initial",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::UnhealthyDraining => "unhealthy.draining",
            Self::Unused => "unused",
            Self::Draining => "draining",
            Self::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a target is in its state (AWS reason codes). Each reason belongs to exactly one state,
/// so setting a reason sets the state too; `Healthy` has no reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetReason {
    /// `Elb.RegistrationInProgress` (initial).
    RegistrationInProgress,
    /// `Elb.InitialHealthChecking` (initial).
    InitialHealthChecking,
    /// `Target.ResponseCodeMismatch` (unhealthy): the check got a status outside the matcher.
    ResponseCodeMismatch,
    /// `Target.Timeout` (unhealthy): the check timed out.
    Timeout,
    /// `Target.FailedHealthChecks` (unhealthy): connection failures and the like.
    FailedHealthChecks,
    /// `Target.NotRegistered` (unused).
    NotRegistered,
    /// `Target.NotInUse` (unused): the group is not used by any rule.
    NotInUse,
    /// `Target.DeregistrationInProgress` (draining).
    DeregistrationInProgress,
    /// `Target.HealthCheckDisabled` (unavailable).
    HealthCheckDisabled,
    /// `Elb.InternalError` (unavailable): the load balancer could not run the check (no
    /// socket, no route for a data-path probe, …), so it does not judge the target.
    InternalError,
}

impl TargetReason {
    /// The AWS reason code, e.g. `Target.Timeout`.
    pub fn code(self) -> &'static str {
        match self {
            Self::RegistrationInProgress => "Elb.RegistrationInProgress",
            Self::InitialHealthChecking => "Elb.InitialHealthChecking",
            Self::ResponseCodeMismatch => "Target.ResponseCodeMismatch",
            Self::Timeout => "Target.Timeout",
            Self::FailedHealthChecks => "Target.FailedHealthChecks",
            Self::NotRegistered => "Target.NotRegistered",
            Self::NotInUse => "Target.NotInUse",
            Self::DeregistrationInProgress => "Target.DeregistrationInProgress",
            Self::HealthCheckDisabled => "Target.HealthCheckDisabled",
            Self::InternalError => "Elb.InternalError",
        }
    }

    /// The state this reason usually explains (an unhealthy reason also explains
    /// `unhealthy.draining`).
    pub fn state(self) -> TargetState {
        match self {
            Self::RegistrationInProgress | Self::InitialHealthChecking => TargetState::Initial,
            Self::ResponseCodeMismatch | Self::Timeout | Self::FailedHealthChecks => {
                TargetState::Unhealthy
            }
            Self::NotRegistered | Self::NotInUse => TargetState::Unused,
            Self::DeregistrationInProgress => TargetState::Draining,
            Self::HealthCheckDisabled | Self::InternalError => TargetState::Unavailable,
        }
    }
}

impl fmt::Display for TargetReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}
