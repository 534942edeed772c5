//! Health-check settings of a target group: what the operator set, and the effective check
//! once AWS's defaults for the group's protocol are filled in.
//!
//! AWS's defaults differ between ALB (HTTP/HTTPS target groups) and NLB (TCP/UDP target
//! groups); [`HealthCheckSettings::effective`] is the one place that knows them. Unset fields
//! stay `None`, so changing the check protocol later (modify-target-group) picks up the new
//! protocol's defaults instead of keeping stale ones.

use std::fmt;
use std::time::Duration;

use super::config::TargetProtocol;

/// Interval between checks of one target (AWS default 30 s for ALB and NLB).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// Timeout of one HTTP/HTTPS check of an ALB target group (AWS default 5 s).
pub const DEFAULT_ALB_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of one TCP or HTTPS check of an NLB target group (AWS default 10 s).
pub const DEFAULT_NLB_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of one HTTP check of an NLB target group (AWS default 6 s).
pub const DEFAULT_NLB_HTTP_TIMEOUT: Duration = Duration::from_secs(6);
/// Consecutive passes that make an unhealthy target healthy (AWS default 5).
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 5;
/// Consecutive failures that make a healthy target unhealthy (AWS default 2).
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 2;
/// Path of HTTP/HTTPS checks (AWS default `/`).
pub const DEFAULT_PATH: &str = "/";
/// Thresholds AWS accepts (2–10).
pub const THRESHOLD_RANGE: std::ops::RangeInclusive<u32> = 2..=10;
/// Intervals we accept. AWS allows 5–300 s; shorter intervals are allowed here for fast
/// failure detection and for tests.
pub const INTERVAL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(300);
/// Timeouts we accept. AWS allows 2–120 s; shorter ones are allowed as for intervals.
pub const TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(50)..=Duration::from_secs(120);

/// How a check talks to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckProtocol {
    /// `GET path`; the status must match the matcher.
    Http,
    /// `GET path` over TLS (the certificate is not verified, as on AWS).
    Https,
    /// A TCP connection that opens (and is closed at once).
    Tcp,
}

impl CheckProtocol {
    /// The spelling on the command line and in `describe-target-groups`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "HTTP",
            Self::Https => "HTTPS",
            Self::Tcp => "TCP",
        }
    }

    /// Parses `http`, `https` or `tcp` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "http" => Some(Self::Http),
            "https" => Some(Self::Https),
            "tcp" => Some(Self::Tcp),
            _ => None,
        }
    }
}

impl fmt::Display for CheckProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the check connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckPort {
    /// The port the target receives traffic on (AWS `traffic-port`, the default).
    #[default]
    TrafficPort,
    /// A fixed port.
    Port(u16),
}

impl CheckPort {
    /// The port to check for a target registered on `traffic_port`; None when that is 0 (a
    /// target of an every-port VIP has no traffic port to check).
    pub fn resolve(self, traffic_port: u16) -> Option<u16> {
        match self {
            Self::TrafficPort if traffic_port == 0 => None,
            Self::TrafficPort => Some(traffic_port),
            Self::Port(p) => Some(p),
        }
    }
}

impl fmt::Display for CheckPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TrafficPort => f.write_str("traffic-port"),
            Self::Port(p) => write!(f, "{p}"),
        }
    }
}

/// Which path an L4 check takes to a target of a DSR VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckMode {
    /// Through the data path when the group serves an L4 VIP, direct otherwise.
    #[default]
    Auto,
    /// Encapsulated like client traffic, inner destination the VIP: proves the target
    /// accepts VIP traffic (VIP on `lo`, `lb decap` running), not only that it is up.
    DataPath,
    /// To the target's own address.
    Direct,
}

impl CheckMode {
    /// The spelling on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::DataPath => "datapath",
            Self::Direct => "direct",
        }
    }

    /// Parses `auto`, `datapath` or `direct`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Some(Self::Auto),
            "datapath" | "data-path" => Some(Self::DataPath),
            "direct" => Some(Self::Direct),
            _ => None,
        }
    }
}

/// Status codes that count as a pass: a list of codes and ranges (`200`, `200,202`,
/// `200-299`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher(Vec<(u16, u16)>);

impl Matcher {
    /// ALB's default: `200`.
    pub fn alb_default() -> Self {
        Self(vec![(200, 200)])
    }

    /// NLB's default for HTTP checks: `200-399`.
    pub fn nlb_default() -> Self {
        Self(vec![(200, 399)])
    }

    /// Parses codes and ranges separated by `,` or `|`, each within `allowed`.
    pub fn parse(s: &str, allowed: std::ops::RangeInclusive<u16>) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in s.split([',', '|']).map(str::trim) {
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let code = |c: &str| {
                c.parse::<u16>()
                    .ok()
                    .filter(|c| allowed.contains(c))
                    .ok_or_else(|| {
                        format!(
                            "{part:?} is not a status code or range within {}-{}",
                            allowed.start(),
                            allowed.end()
                        )
                    })
            };
            let (lo, hi) = (code(lo)?, code(hi)?);
            if lo > hi {
                return Err(format!("range {part:?} runs backwards"));
            }
            out.push((lo, hi));
        }
        Ok(Self(out))
    }

    /// Whether `status` passes.
    pub fn matches(&self, status: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (lo, hi)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

/// Health-check settings as the operator gave them; `None` means "AWS's default for this
/// group" (see [`HealthCheckSettings::effective`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSettings {
    /// Whether targets are checked at all. Default true. Without checks, targets are
    /// `unavailable` (Target.HealthCheckDisabled) and receive traffic, as on AWS.
    pub enabled: bool,
    /// Check protocol; default: HTTP for HTTP groups, HTTPS for HTTPS groups, TCP for TCP and
    /// UDP groups.
    pub protocol: Option<CheckProtocol>,
    /// Port; default the traffic port.
    pub port: CheckPort,
    /// Path of HTTP/HTTPS checks; default [`DEFAULT_PATH`].
    pub path: Option<String>,
    /// Interval; default [`DEFAULT_INTERVAL`].
    pub interval: Option<Duration>,
    /// Timeout of one check; default [`DEFAULT_ALB_TIMEOUT`] for HTTP/HTTPS groups,
    /// [`DEFAULT_NLB_TIMEOUT`] / [`DEFAULT_NLB_HTTP_TIMEOUT`] for TCP/UDP groups.
    pub timeout: Option<Duration>,
    /// Passes to become healthy; default [`DEFAULT_HEALTHY_THRESHOLD`].
    pub healthy_threshold: Option<u32>,
    /// Failures to become unhealthy; default [`DEFAULT_UNHEALTHY_THRESHOLD`].
    pub unhealthy_threshold: Option<u32>,
    /// Passing status codes; default `200` (ALB) or `200-399` (NLB).
    pub matcher: Option<Matcher>,
    /// Path of L4 checks; default [`CheckMode::Auto`].
    pub mode: CheckMode,
}

impl Default for HealthCheckSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            protocol: None,
            port: CheckPort::TrafficPort,
            path: None,
            interval: None,
            timeout: None,
            healthy_threshold: None,
            unhealthy_threshold: None,
            matcher: None,
            mode: CheckMode::Auto,
        }
    }
}

/// The check a target group runs, every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Protocol.
    pub protocol: CheckProtocol,
    /// Port.
    pub port: CheckPort,
    /// Path (HTTP/HTTPS).
    pub path: String,
    /// Interval between checks of one target.
    pub interval: Duration,
    /// Timeout of one check.
    pub timeout: Duration,
    /// Consecutive passes to become healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures to become unhealthy.
    pub unhealthy_threshold: u32,
    /// Passing status codes (HTTP/HTTPS).
    pub matcher: Matcher,
    /// Path of L4 checks.
    pub mode: CheckMode,
}

/// Whether a group's defaults are ALB's (HTTP/HTTPS groups) or NLB's (TCP/UDP groups).
fn is_nlb(group: TargetProtocol) -> bool {
    matches!(group, TargetProtocol::Tcp | TargetProtocol::Udp)
}

impl HealthCheckSettings {
    /// The check a group of protocol `group` runs (None when checks are disabled).
    pub fn effective(&self, group: TargetProtocol) -> Option<HealthCheck> {
        if !self.enabled {
            return None;
        }
        let protocol = self.protocol.unwrap_or(match group {
            TargetProtocol::Http => CheckProtocol::Http,
            TargetProtocol::Https => CheckProtocol::Https,
            TargetProtocol::Tcp | TargetProtocol::Udp => CheckProtocol::Tcp,
        });
        let nlb = is_nlb(group);
        let timeout = self.timeout.unwrap_or(match (nlb, protocol) {
            (false, _) => DEFAULT_ALB_TIMEOUT,
            (true, CheckProtocol::Http) => DEFAULT_NLB_HTTP_TIMEOUT,
            (true, _) => DEFAULT_NLB_TIMEOUT,
        });
        let matcher = self.matcher.clone().unwrap_or_else(|| {
            if nlb {
                Matcher::nlb_default()
            } else {
                Matcher::alb_default()
            }
        });
        Some(HealthCheck {
            protocol,
            port: self.port,
            path: self.path.clone().unwrap_or_else(|| DEFAULT_PATH.to_owned()),
            interval: self.interval.unwrap_or(DEFAULT_INTERVAL),
            timeout,
            healthy_threshold: self.healthy_threshold.unwrap_or(DEFAULT_HEALTHY_THRESHOLD),
            unhealthy_threshold: self
                .unhealthy_threshold
                .unwrap_or(DEFAULT_UNHEALTHY_THRESHOLD),
            matcher,
            mode: self.mode,
        })
    }

    /// Status codes a matcher may name for a group of this protocol: 200–499 on ALB,
    /// 200–599 on NLB.
    pub fn matcher_range(group: TargetProtocol) -> std::ops::RangeInclusive<u16> {
        if is_nlb(group) { 200..=599 } else { 200..=499 }
    }

    /// Checks the settings that depend on each other; returns what is wrong.
    pub fn validate(&self, group: TargetProtocol) -> Result<(), String> {
        let Some(check) = self.effective(group) else {
            return Ok(());
        };
        if check.timeout >= check.interval {
            return Err(format!(
                "health-check-timeout ({} s) must be shorter than health-check-interval ({} s)",
                check.timeout.as_secs_f64(),
                check.interval.as_secs_f64()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alb_and_nlb_groups_get_their_own_aws_defaults() {
        let s = HealthCheckSettings::default();
        let alb = s.effective(TargetProtocol::Http).unwrap();
        assert_eq!(alb.protocol, CheckProtocol::Http);
        assert_eq!(alb.interval, Duration::from_secs(30));
        assert_eq!(alb.timeout, Duration::from_secs(5));
        assert_eq!((alb.healthy_threshold, alb.unhealthy_threshold), (5, 2));
        assert_eq!(alb.path, "/");
        assert!(alb.matcher.matches(200) && !alb.matcher.matches(204));

        let https = s.effective(TargetProtocol::Https).unwrap();
        assert_eq!(https.protocol, CheckProtocol::Https);

        let nlb = s.effective(TargetProtocol::Tcp).unwrap();
        assert_eq!(nlb.protocol, CheckProtocol::Tcp);
        assert_eq!(nlb.timeout, Duration::from_secs(10));
        let nlb_http = HealthCheckSettings {
            protocol: Some(CheckProtocol::Http),
            ..HealthCheckSettings::default()
        }
        .effective(TargetProtocol::Udp)
        .unwrap();
        assert_eq!(nlb_http.timeout, Duration::from_secs(6));
        assert!(nlb_http.matcher.matches(399) && !nlb_http.matcher.matches(400));
    }

    #[test]
    fn disabled_checks_have_no_effective_check() {
        let s = HealthCheckSettings {
            enabled: false,
            ..HealthCheckSettings::default()
        };
        assert_eq!(s.effective(TargetProtocol::Http), None);
    }

    #[test]
    fn matchers_take_lists_and_ranges_within_the_allowed_codes() {
        let m = Matcher::parse("200,202|300-302", 200..=499).unwrap();
        for ok in [200, 202, 300, 301, 302] {
            assert!(m.matches(ok), "{ok}");
        }
        for bad in [201, 299, 303, 404] {
            assert!(!m.matches(bad), "{bad}");
        }
        assert_eq!(m.to_string(), "200,202,300-302");
        for bad in ["", "abc", "199", "500", "300-200", "200-"] {
            assert!(Matcher::parse(bad, 200..=499).is_err(), "{bad}");
        }
        assert!(Matcher::parse("500-599", 200..=599).is_ok());
    }

    #[test]
    fn timeout_must_be_shorter_than_interval() {
        let s = HealthCheckSettings {
            interval: Some(Duration::from_secs(6)),
            ..HealthCheckSettings::default()
        };
        assert!(s.validate(TargetProtocol::Http).is_ok(), "ALB: 5 s < 6 s");
        assert!(
            s.validate(TargetProtocol::Tcp)
                .unwrap_err()
                .contains("shorter"),
            "NLB: 10 s is not shorter than 6 s"
        );
    }

    #[test]
    fn traffic_port_of_an_every_port_target_cannot_be_checked() {
        assert_eq!(CheckPort::TrafficPort.resolve(80), Some(80));
        assert_eq!(CheckPort::TrafficPort.resolve(0), None);
        assert_eq!(CheckPort::Port(8080).resolve(0), Some(8080));
    }
}
