//! The health-check log (`--health-check-log`): one line per probe, modelled on the health
//! check log ALB added in 2025:
//!
//! ```text
//! type time elb target_group target:port latency status status_code reason_code "description"
//! http 2025-11-21T10:00:00.123456Z app/lb/0123456789abcdef web 10.0.0.11:80 0.002 PASS 200 - "-"
//! tcp 2025-11-21T10:00:30.001234Z app/lb/0123456789abcdef web 10.0.0.12:80 5.001 FAIL - Target.Timeout "Request timed out after 5 s"
//! ```
//!
//! `type` is the check's protocol; `latency` how long the probe took; `status` `PASS`, `FAIL`
//! (the target failed it) or `ERROR` (the balancer could not run it, reason
//! `Elb.InternalError`); `status_code` the HTTP status when one came back.
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{iso8601, quoted, token};

/// The outcome of one probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeStatus {
    /// The target passed.
    Pass,
    /// The target failed.
    Fail,
    /// The balancer could not run the check.
    Error,
}

impl ProbeStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Error => "ERROR",
        }
    }
}

/// One probe, as logged.
#[derive(Clone, Debug)]
pub struct ProbeRecord {
    /// When the result came.
    pub time: SystemTime,
    /// `http`, `https` or `tcp`.
    pub protocol: &'static str,
    /// The target group.
    pub target_group: Arc<str>,
    /// The target checked (its address and the check's port).
    pub target: SocketAddr,
    /// How long the probe took.
    pub latency: Duration,
    /// The outcome.
    pub status: ProbeStatus,
    /// The HTTP status the target answered, if any.
    pub status_code: Option<u16>,
    /// AWS reason code when it did not pass (`Target.Timeout`, `Elb.InternalError`, …).
    pub reason_code: Option<&'static str>,
    /// What happened, in words.
    pub description: Option<String>,
}

impl ProbeRecord {
    /// Appends the line (no newline) to `out`.
    pub fn write_line(&self, elb: &str, out: &mut String) {
        token(self.protocol, out);
        out.push(' ');
        iso8601(self.time, out);
        out.push(' ');
        token(elb, out);
        out.push(' ');
        token(&self.target_group, out);
        let _ = write!(
            out,
            " {} {:.3} {} ",
            self.target,
            self.latency.as_secs_f64(),
            self.status.as_str()
        );
        match self.status_code {
            Some(c) => {
                let _ = write!(out, "{c}");
            }
            None => out.push('-'),
        }
        out.push(' ');
        token(self.reason_code.unwrap_or("-"), out);
        out.push(' ');
        quoted(self.description.as_deref(), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_probe_names_its_reason_and_quotes_its_description() {
        let r = ProbeRecord {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_763_719_230),
            protocol: "http",
            target_group: "web".into(),
            target: "10.0.0.12:80".parse().unwrap(),
            latency: Duration::from_millis(5001),
            status: ProbeStatus::Fail,
            status_code: Some(404),
            reason_code: Some("Target.ResponseCodeMismatch"),
            description: Some("Health checks failed with these codes: [404]".into()),
        };
        let mut line = String::new();
        r.write_line("app/lb/0", &mut line);
        assert_eq!(
            line,
            "http 2025-11-21T10:00:30.000000Z app/lb/0 web 10.0.0.12:80 5.001 FAIL 404 \
             Target.ResponseCodeMismatch \"Health checks failed with these codes: [404]\""
        );
    }
}
