//! What the registry publishes: an immutable snapshot of every target group, shared by the
//! L7 picker, the L4 ring writer, the health checkers and the admin API. Each group's view is
//! its own `Arc`, replaced only when something in it changed, so a subscriber finds what
//! changed with `Arc::ptr_eq`.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::l4::VipAddr;
use crate::targets::health_check::HealthCheck;
use crate::targets::{Member, TargetGroupConfig};

/// Every target group, as of one version of the registry.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Increases with every published change.
    pub version: u64,
    /// Groups by name.
    pub groups: BTreeMap<String, Arc<GroupView>>,
}

/// One target group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupView {
    /// Its configuration.
    pub config: Arc<TargetGroupConfig>,
    /// The check its targets get (None: checks disabled).
    pub check: Option<HealthCheck>,
    /// Used by a listener rule or a VIP (an unused group's targets are `unused` and not
    /// checked, as on AWS).
    pub in_use: bool,
    /// The DSR VIPs forwarding to it: data-path health checks go through them. (A NAT VIP's
    /// targets are plain hosts reachable from the balancer; they are checked directly.)
    pub dsr_vips: Vec<VipAddr>,
    /// Too few targets are healthy: every target that could serve takes traffic.
    pub failing_open: bool,
    /// Its targets, in address order.
    pub targets: Vec<TargetView>,
}

/// One registered target.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetView {
    /// What the L7 picker needs (address, weight, state, reason, takes new requests, slow
    /// start).
    pub member: Member,
    /// L4: flows pinned to it keep flowing (it takes new ones, or it drains).
    pub keeps_existing: bool,
    /// The state's description, for operators (time-dependent parts are added when
    /// described).
    pub description: String,
    /// Identifies this registration; health results of an earlier one are ignored.
    pub generation: u64,
    /// Health checks run on it.
    pub checked: bool,
    /// When its deregistration delay ends, if it is draining.
    pub draining_until: Option<Instant>,
}

impl TargetView {
    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.member.addr
    }
}

/// A target's entry in `describe-target-health` (AWS `TargetHealthDescription`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TargetHealthDescription {
    /// The target.
    pub target: TargetDescription,
    /// The port its checks use (`-` when checks are off or it has none).
    pub health_check_port: String,
    /// Its health.
    pub target_health: TargetHealth,
}

/// A target: address, port and weight (AWS `TargetDescription`, plus our weight).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TargetDescription {
    /// IP address.
    pub id: String,
    /// Port (0 for targets of every-port VIPs).
    pub port: u16,
    /// Weight (absent in requests: 1, or unchanged for a registered target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// AWS `TargetHealth`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TargetHealth {
    /// `initial`, `healthy`, `unhealthy`, `unhealthy.draining`, `unused`, `draining`,
    /// `unavailable`.
    pub state: String,
    /// AWS reason code, e.g. `Target.ResponseCodeMismatch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}
