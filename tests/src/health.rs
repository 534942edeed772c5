//! Reading `lb targets health --json` (AWS describe-target-health) into typed rows, by the
//! AWS field names alone: `TargetHealthDescriptions[].{TargetGroupName, Target{Id, Port,
//! Weight}, HealthCheckPort, TargetHealth{State, Reason, Description}}`. The reader does not
//! use `lb`'s own types, so a change of the JSON an operator's script sees breaks the tests.
use std::net::IpAddr;

use anyhow::{Context, Result};
use serde_json::Value;

/// One target's row of describe-target-health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetHealth {
    /// `TargetGroupName`.
    pub group: String,
    /// `Target.Id`.
    pub addr: IpAddr,
    /// `Target.Port`.
    pub port: u16,
    /// `Target.Weight`, if given.
    pub weight: Option<u32>,
    /// `HealthCheckPort` (`-` when checks are off).
    pub health_check_port: String,
    /// `TargetHealth.State`: `initial`, `healthy`, `unhealthy`, `draining`, …
    pub state: String,
    /// `TargetHealth.Reason`, e.g. `Target.FailedHealthChecks`.
    pub reason: Option<String>,
    /// `TargetHealth.Description`.
    pub description: Option<String>,
}

impl TargetHealth {
    /// `state (reason): description`, for messages.
    pub fn summary(&self) -> String {
        format!(
            "{} {} ({}): {}",
            self.addr,
            self.state,
            self.reason.as_deref().unwrap_or("-"),
            self.description.as_deref().unwrap_or("")
        )
    }
}

/// Parses the output of `lb targets health --json`.
pub fn parse(json: &str) -> Result<Vec<TargetHealth>> {
    let doc: Value = serde_json::from_str(json)
        .with_context(|| format!("`lb targets health --json` is not JSON: {json}"))?;
    let rows = doc["TargetHealthDescriptions"]
        .as_array()
        .with_context(|| format!("no TargetHealthDescriptions array in {json}"))?;
    rows.iter()
        .map(|r| row(r).with_context(|| format!("reading the row {r}")))
        .collect()
}

fn row(r: &Value) -> Result<TargetHealth> {
    let text = |v: &Value, what: &str| -> Result<String> {
        v.as_str()
            .map(str::to_owned)
            .with_context(|| format!("{what} is not a string"))
    };
    let opt_text = |v: &Value| v.as_str().map(str::to_owned);
    let target = &r["Target"];
    let health = &r["TargetHealth"];
    Ok(TargetHealth {
        group: text(&r["TargetGroupName"], "TargetGroupName")?,
        addr: text(&target["Id"], "Target.Id")?
            .parse()
            .context("Target.Id is not an IP address")?,
        port: target["Port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .context("Target.Port is not a port")?,
        weight: target["Weight"]
            .as_u64()
            .and_then(|w| u32::try_from(w).ok()),
        health_check_port: text(&r["HealthCheckPort"], "HealthCheckPort")?,
        state: text(&health["State"], "TargetHealth.State")?,
        reason: opt_text(&health["Reason"]),
        description: opt_text(&health["Description"]),
    })
}

/// The row of `addr`, if it is listed.
pub fn of(rows: &[TargetHealth], addr: impl Into<IpAddr>) -> Option<&TargetHealth> {
    let addr = addr.into();
    rows.iter().find(|r| r.addr == addr)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn reads_the_aws_shape() {
        let json = r#"{"TargetHealthDescriptions": [
            {"TargetGroupName": "web", "Target": {"Id": "10.0.0.11", "Port": 80, "Weight": 2},
             "HealthCheckPort": "80",
             "TargetHealth": {"State": "unhealthy", "Reason": "Target.FailedHealthChecks",
                              "Description": "Connection refused"}},
            {"TargetGroupName": "web", "Target": {"Id": "10.0.0.12", "Port": 80},
             "HealthCheckPort": "80", "TargetHealth": {"State": "healthy"}}
        ]}"#;
        let rows = parse(json).unwrap();
        assert_eq!(rows.len(), 2);
        let a = of(&rows, Ipv4Addr::new(10, 0, 0, 11)).unwrap();
        assert_eq!(a.weight, Some(2));
        assert_eq!(a.reason.as_deref(), Some("Target.FailedHealthChecks"));
        assert_eq!(a.description.as_deref(), Some("Connection refused"));
        let b = of(&rows, Ipv4Addr::new(10, 0, 0, 12)).unwrap();
        let six = parse(
            r#"{"TargetHealthDescriptions": [{"TargetGroupName": "web",
               "Target": {"Id": "fd00::11", "Port": 80}, "HealthCheckPort": "80",
               "TargetHealth": {"State": "healthy"}}]}"#,
        )
        .unwrap();
        assert!(of(&six, "fd00::11".parse::<IpAddr>().unwrap()).is_some());
        assert_eq!((b.state.as_str(), b.reason.as_deref()), ("healthy", None));
        assert!(parse(r#"{"TargetGroups": []}"#).is_err());
    }
}
