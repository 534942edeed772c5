//! Target group configuration: the options of one `--target-group` value and their parser.
//!
//! Every default here is the AWS default, written once next to its field.

use std::fmt;
use std::time::Duration;

use super::health_check::{
    CheckMode, CheckPort, CheckProtocol, HealthCheck, HealthCheckSettings, INTERVAL_RANGE, Matcher,
    THRESHOLD_RANGE, TIMEOUT_RANGE,
};

/// Protocol the load balancer speaks to the targets of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetProtocol {
    /// Plain HTTP to the targets (AWS default for an HTTP target group).
    #[default]
    Http,
    /// TLS to the targets. Certificates are not verified unless
    /// [`TargetGroupConfig::verify_tls`] is set, as on AWS.
    Https,
    /// An L4 (NLB-style) group of TCP targets: usable by TCP VIPs only. Health checks default
    /// to NLB's (TCP, 10 s timeout).
    Tcp,
    /// An L4 group of UDP targets: usable by UDP VIPs only; checked over TCP by default, as
    /// AWS checks UDP targets.
    Udp,
}

impl TargetProtocol {
    /// The spelling used on the command line and in logs (`http`, `https`, `tcp`, `udp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    /// Whether L7 rules may forward to a group of this protocol (HTTP and HTTPS groups).
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Https)
    }
}

impl fmt::Display for TargetProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// HTTP version spoken to the targets (AWS "protocol version"; `GRPC` is not offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProtocolVersion {
    /// HTTP/1.1 to the targets, whatever the client spoke (AWS default).
    #[default]
    Http1,
    /// HTTP/2 to the targets. On AWS such a group only accepts HTTP/2 requests; an HTTP/1
    /// request gets 464 (the proxy decides that, not this module).
    Http2,
}

impl ProtocolVersion {
    /// The spelling used on the command line (`http1`, `http2`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
        }
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a target group chooses a target for a request that is not pinned by stickiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Smooth weighted round robin (nginx's): exact over a cycle; with equal weights each of N
    /// targets gets exactly one of every N requests. AWS default.
    #[default]
    RoundRobin,
    /// The target with the fewest requests in flight; ties broken round robin. Weights only
    /// matter through weight 0 (no new requests).
    LeastOutstandingRequests,
    /// Random, in proportion to the target weights.
    WeightedRandom,
}

impl Algorithm {
    /// The spelling used on the command line (AWS's attribute values).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::LeastOutstandingRequests => "least_outstanding_requests",
            Self::WeightedRandom => "weighted_random",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Stickiness duration when none is given: one day (AWS default, for both cookie kinds).
pub const DEFAULT_STICKINESS_DURATION: Duration = Duration::from_secs(86_400);
/// Shortest stickiness duration AWS accepts: 1 s.
pub const MIN_STICKINESS_SECONDS: u64 = 1;
/// Longest stickiness duration AWS accepts: 7 days.
pub const MAX_STICKINESS_SECONDS: u64 = 604_800;
/// Longest target group name AWS accepts.
pub const MAX_TARGET_GROUP_NAME_LEN: usize = 32;

/// Session stickiness of a target group. Off by default, as on AWS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Stickiness {
    /// Every request is balanced on its own (AWS default).
    #[default]
    None,
    /// Duration-based: the load balancer issues cookie `AWSALB` (and `AWSALBCORS`) naming the
    /// target; requests carrying a valid one go to that target until it expires.
    LbCookie {
        /// Lifetime of the `AWSALB` cookie (1 s..=7 days, default 1 day).
        duration: Duration,
    },
    /// Application-based: requests stick while they carry the application's own cookie
    /// (`cookie_name`); the load balancer's cookie is `AWSALBAPP-0`, issued whenever the
    /// application sets its cookie.
    AppCookie {
        /// Name of the application's session cookie (case-sensitive). Names starting with
        /// `AWSALB` are reserved.
        cookie_name: String,
        /// Lifetime of the `AWSALBAPP-0` cookie (1 s..=7 days, default 1 day).
        duration: Duration,
    },
}

impl Stickiness {
    /// Whether stickiness is on (requests not pinned by a cookie then count as
    /// NonStickyRequestCount).
    pub fn enabled(&self) -> bool {
        !matches!(self, Self::None)
    }
}

/// The configuration of one L7 target group (everything but its targets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetGroupConfig {
    /// Name: 1–32 characters, ASCII letters, digits and `-`, not starting or ending with `-`
    /// (AWS rules). Rules and `--target` refer to the group by it.
    pub name: String,
    /// Protocol to the targets; default `http`.
    pub protocol: TargetProtocol,
    /// HTTP version to the targets; default `http1`.
    pub protocol_version: ProtocolVersion,
    /// Balancing algorithm; default `round_robin`.
    pub algorithm: Algorithm,
    /// Stickiness; default off.
    pub stickiness: Stickiness,
    /// Verify target certificates (only with `protocol=https`); default `false`, as on AWS,
    /// which never verifies target certificates.
    pub verify_tls: bool,
    /// Health checks; every unset field takes AWS's default for the protocol.
    pub health_check: HealthCheckSettings,
    /// Lifecycle attributes (deregistration delay, slow start, fail-open threshold, …).
    pub attributes: GroupAttributes,
}

impl TargetGroupConfig {
    /// A group with every option at its AWS default. The name is not validated here;
    /// [`parse_target_group`] validates it.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            protocol: TargetProtocol::default(),
            protocol_version: ProtocolVersion::default(),
            algorithm: Algorithm::default(),
            stickiness: Stickiness::default(),
            verify_tls: false,
            health_check: HealthCheckSettings::default(),
            attributes: GroupAttributes::default(),
        }
    }

    /// The effective health check (None when checks are disabled).
    pub fn check(&self) -> Option<HealthCheck> {
        self.health_check.effective(self.protocol)
    }
}

/// Deregistration delay default (AWS `deregistration_delay.timeout_seconds`: 300 s).
pub const DEFAULT_DEREGISTRATION_DELAY: Duration = Duration::from_secs(300);
/// Longest deregistration delay AWS accepts: 3600 s.
pub const MAX_DEREGISTRATION_DELAY: Duration = Duration::from_secs(3600);
/// Slow-start durations AWS accepts (30–900 s; 0 turns it off).
pub const SLOW_START_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(30)..=Duration::from_secs(900);
/// Longest unhealthy draining interval AWS accepts: 360,000 s.
pub const MAX_UNHEALTHY_DRAINING: Duration = Duration::from_secs(360_000);

/// When a group stops trusting its health checks and routes to every target ("fail open"):
/// below `count` healthy targets, or below `percent` of the targets that could serve.
/// AWS `target_group_health.unhealthy_state_routing.minimum_healthy_targets.*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinHealthy {
    /// Minimum healthy count (AWS default 1: fail open only when none is healthy).
    pub count: u32,
    /// Minimum healthy percentage, 1–100 (AWS default off).
    pub percent: Option<u8>,
}

impl Default for MinHealthy {
    fn default() -> Self {
        Self {
            count: 1,
            percent: None,
        }
    }
}

/// A target group's lifecycle attributes (AWS target group attributes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupAttributes {
    /// How long a deregistered target drains: no new requests or flows, in-flight ones
    /// finish; what is left when it ends is closed. Default [`DEFAULT_DEREGISTRATION_DELAY`].
    pub deregistration_delay: Duration,
    /// Slow start (L7): a newly healthy target's share ramps up linearly over this long.
    /// Default off.
    pub slow_start: Option<Duration>,
    /// Fail-open threshold; default: fail open only when no target is healthy.
    pub min_healthy: MinHealthy,
    /// L4: an unhealthy target keeps its established flows this long (NLB's
    /// `target_health_state.unhealthy.draining_interval_seconds` with connection termination
    /// disabled). Default None: its flows are re-steered at once (NLB's default).
    pub unhealthy_draining: Option<Duration>,
}

impl Default for GroupAttributes {
    fn default() -> Self {
        Self {
            deregistration_delay: DEFAULT_DEREGISTRATION_DELAY,
            slow_start: None,
            min_healthy: MinHealthy::default(),
            unhealthy_draining: None,
        }
    }
}

/// Options `--target-group` accepts after the name (listed in error messages).
const OPTIONS: &str = "protocol, protocol-version, algorithm, stickiness, verify-tls, \
    health-check, health-check-port, health-check-path, health-check-interval, \
    health-check-timeout, healthy-threshold, unhealthy-threshold, matcher, health-check-mode, \
    deregistration-delay, slow-start, min-healthy-targets, min-healthy-percent, \
    unhealthy-draining";

/// Options that can change on a running group (modify-target-group). The others shape how
/// requests are forwarded and picked; change them by creating a new group.
pub const RUNTIME_OPTIONS: &[&str] = &[
    "health-check",
    "health-check-port",
    "health-check-path",
    "health-check-interval",
    "health-check-timeout",
    "healthy-threshold",
    "unhealthy-threshold",
    "matcher",
    "health-check-mode",
    "deregistration-delay",
    "slow-start",
    "min-healthy-targets",
    "min-healthy-percent",
    "unhealthy-draining",
];

/// Why a `--target-group` value was refused. Every variant names the option at fault and what
/// it accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetGroupError {
    /// The value does not start with a name.
    #[error("target group: missing name (expected NAME[,OPTION=VALUE…])")]
    MissingName,
    /// The name breaks the AWS naming rules.
    #[error(
        "target group name {name:?}: {reason} (1-{MAX_TARGET_GROUP_NAME_LEN} characters: letters, digits and '-', not starting or ending with '-')"
    )]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An option this parser does not know.
    #[error("target group {group}: unknown option {option:?} (options: {OPTIONS})")]
    UnknownOption {
        /// Group name.
        group: String,
        /// The option as given.
        option: String,
    },
    /// `OPTION` without `=VALUE`, or with an empty value.
    #[error("target group {group}: option {option} needs a value ({expected})")]
    MissingValue {
        /// Group name.
        group: String,
        /// The option.
        option: &'static str,
        /// What the option accepts.
        expected: &'static str,
    },
    /// The same option twice.
    #[error("target group {group}: option {option} given twice")]
    DuplicateOption {
        /// Group name.
        group: String,
        /// The option.
        option: &'static str,
    },
    /// A value the option does not accept.
    #[error("target group {group}: invalid {option} {value:?} (expected {expected})")]
    InvalidValue {
        /// Group name.
        group: String,
        /// The option.
        option: &'static str,
        /// The value as given.
        value: String,
        /// What the option accepts.
        expected: &'static str,
    },
    /// A stickiness duration outside 1 s..=7 days.
    #[error(
        "target group {group}: stickiness duration {value:?} out of range (whole seconds, {MIN_STICKINESS_SECONDS}..={MAX_STICKINESS_SECONDS}, i.e. 1 s to 7 days)"
    )]
    DurationOutOfRange {
        /// Group name.
        group: String,
        /// The duration as given.
        value: String,
    },
    /// `verify-tls=true` on a plain HTTP group: there is no certificate to verify.
    #[error("target group {group}: verify-tls=true needs protocol=https")]
    VerifyTlsWithoutHttps {
        /// Group name.
        group: String,
    },
    /// Options that contradict each other (e.g. a timeout not shorter than the interval).
    #[error("target group {group}: {problem}")]
    Inconsistent {
        /// Group name.
        group: String,
        /// What is wrong.
        problem: String,
    },
    /// An option that cannot change on a running group.
    #[error(
        "target group {group}: {option} cannot change on a running group (create a new group and move the rules); changeable: {}",
        RUNTIME_OPTIONS.join(", ")
    )]
    NotChangeable {
        /// Group name.
        group: String,
        /// The option.
        option: String,
    },
}

const PROTOCOL_VALUES: &str = "http, https, tcp or udp";
const PROTOCOL_VERSION_VALUES: &str = "http1 or http2";
const ALGORITHM_VALUES: &str = "round_robin, least_outstanding_requests or weighted_random";
const STICKINESS_VALUES: &str = "lb_cookie[:SECONDS] or app_cookie:COOKIE[:SECONDS]";
const VERIFY_TLS_VALUES: &str = "true or false";
const HEALTH_CHECK_VALUES: &str = "http, https, tcp, on or off";
const PORT_VALUES: &str = "traffic-port or a port from 1 to 65535";
const PATH_VALUES: &str = "an absolute path starting with '/', at most 1024 characters";
const INTERVAL_VALUES: &str = "seconds from 0.1 to 300 (AWS: 5 to 300)";
const TIMEOUT_VALUES: &str = "seconds from 0.05 to 120 (AWS: 2 to 120)";
const THRESHOLD_VALUES: &str = "a count from 2 to 10";
const MATCHER_VALUES: &str = "status codes and ranges separated by '|', e.g. 200|202|300-399";
const MODE_VALUES: &str = "auto, datapath or direct";
const DELAY_VALUES: &str = "seconds from 0 to 3600";
const SLOW_START_VALUES: &str = "0 (off) or seconds from 30 to 900";
const MIN_HEALTHY_VALUES: &str = "a count of at least 1";
const MIN_PERCENT_VALUES: &str = "a percentage from 1 to 100, or off";
const UNHEALTHY_DRAINING_VALUES: &str = "0 (off) or seconds up to 360000";
const COOKIE_NAME_VALUES: &str =
    "a cookie name: RFC 6265 token characters, not starting with AWSALB (reserved)";

/// Parses one `--target-group` value: `NAME[,OPTION=VALUE…]`, options as in the README
/// (`protocol`, `protocol-version`, `algorithm`, `stickiness`, `verify-tls`, the
/// `health-check*` settings and the lifecycle attributes).
///
/// Option names and keyword values are case-insensitive; the name and the cookie name are
/// taken as given. Each option may appear once.
pub fn parse_target_group(spec: &str) -> Result<TargetGroupConfig, TargetGroupError> {
    let mut parts = spec.split(',').map(str::trim);
    let name = parts.next().unwrap_or_default();
    validate_name(name)?;
    let mut config = TargetGroupConfig::new(name);
    let mut seen: Vec<&'static str> = Vec::new();
    for part in parts {
        let (raw_option, value) = match part.split_once('=') {
            Some((option, value)) => (option.trim(), value.trim()),
            None => (part, ""),
        };
        let option = set_option(&mut config, raw_option, value)?;
        if seen.contains(&option) {
            return Err(TargetGroupError::DuplicateOption {
                group: config.name,
                option,
            });
        }
        seen.push(option);
    }
    check_consistency(&config)?;
    Ok(config)
}

/// Applies `OPTION=VALUE` pairs to a running group's configuration (modify-target-group):
/// only [`RUNTIME_OPTIONS`] may change. Returns the new configuration; `config` is left as
/// it was when anything is refused.
pub fn modify_target_group(
    config: &TargetGroupConfig,
    changes: &[(String, String)],
) -> Result<TargetGroupConfig, TargetGroupError> {
    let mut new = config.clone();
    for (option, value) in changes {
        let canonical = option.trim().to_ascii_lowercase();
        if !RUNTIME_OPTIONS.contains(&canonical.as_str()) {
            // Unknown options get the unknown-option error, known ones this.
            let mut probe = TargetGroupConfig::new(config.name.clone());
            set_option(&mut probe, option, value)?;
            return Err(TargetGroupError::NotChangeable {
                group: config.name.clone(),
                option: canonical,
            });
        }
        set_option(&mut new, option, value.trim())?;
    }
    check_consistency(&new)?;
    Ok(new)
}

/// Settings that are valid one by one but not together.
fn check_consistency(config: &TargetGroupConfig) -> Result<(), TargetGroupError> {
    let group = || config.name.clone();
    if config.verify_tls && config.protocol != TargetProtocol::Https {
        return Err(TargetGroupError::VerifyTlsWithoutHttps { group: group() });
    }
    config
        .health_check
        .validate(config.protocol)
        .map_err(|problem| TargetGroupError::Inconsistent {
            group: group(),
            problem,
        })?;
    if let Some(m) = &config.health_check.matcher {
        let allowed = HealthCheckSettings::matcher_range(config.protocol);
        if Matcher::parse(&m.to_string(), allowed.clone()).is_err() {
            return Err(TargetGroupError::Inconsistent {
                group: group(),
                problem: format!(
                    "matcher {m} allows codes outside {}-{} for a {} group",
                    allowed.start(),
                    allowed.end(),
                    config.protocol
                ),
            });
        }
    }
    if config.attributes.slow_start.is_some()
        && config.algorithm == Algorithm::LeastOutstandingRequests
    {
        return Err(TargetGroupError::Inconsistent {
            group: group(),
            problem: "slow-start cannot be combined with least_outstanding_requests (as on AWS)"
                .into(),
        });
    }
    if !config.protocol.is_http() {
        let l7_only = [
            (
                config.protocol_version != ProtocolVersion::default(),
                "protocol-version",
            ),
            (config.algorithm != Algorithm::default(), "algorithm"),
            (config.stickiness.enabled(), "stickiness"),
            (config.attributes.slow_start.is_some(), "slow-start"),
        ];
        if let Some((_, option)) = l7_only.iter().find(|(set, _)| *set) {
            return Err(TargetGroupError::Inconsistent {
                group: group(),
                problem: format!(
                    "{option} applies to http/https groups only; a {} group is balanced by \
                     Maglev in lb_xdp",
                    config.protocol
                ),
            });
        }
    }
    Ok(())
}

/// Seconds as a decimal number (`30`, `0.5`), within `range`.
fn parse_seconds(value: &str, range: std::ops::RangeInclusive<Duration>) -> Option<Duration> {
    let secs: f64 = value.parse().ok()?;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return None;
    }
    let d = Duration::from_secs_f64(secs);
    range.contains(&d).then_some(d)
}

/// Sets one option on `config`; returns its canonical name. Errors name the option and what
/// it accepts.
fn set_option(
    config: &mut TargetGroupConfig,
    raw_option: &str,
    value: &str,
) -> Result<&'static str, TargetGroupError> {
    let group = config.name.clone();
    let (option, expected): (&'static str, &'static str) =
        match raw_option.to_ascii_lowercase().as_str() {
            "protocol" => ("protocol", PROTOCOL_VALUES),
            "protocol-version" => ("protocol-version", PROTOCOL_VERSION_VALUES),
            "algorithm" => ("algorithm", ALGORITHM_VALUES),
            "stickiness" => ("stickiness", STICKINESS_VALUES),
            "verify-tls" => ("verify-tls", VERIFY_TLS_VALUES),
            "health-check" => ("health-check", HEALTH_CHECK_VALUES),
            "health-check-port" => ("health-check-port", PORT_VALUES),
            "health-check-path" => ("health-check-path", PATH_VALUES),
            "health-check-interval" => ("health-check-interval", INTERVAL_VALUES),
            "health-check-timeout" => ("health-check-timeout", TIMEOUT_VALUES),
            "healthy-threshold" => ("healthy-threshold", THRESHOLD_VALUES),
            "unhealthy-threshold" => ("unhealthy-threshold", THRESHOLD_VALUES),
            "matcher" => ("matcher", MATCHER_VALUES),
            "health-check-mode" => ("health-check-mode", MODE_VALUES),
            "deregistration-delay" => ("deregistration-delay", DELAY_VALUES),
            "slow-start" => ("slow-start", SLOW_START_VALUES),
            "min-healthy-targets" => ("min-healthy-targets", MIN_HEALTHY_VALUES),
            "min-healthy-percent" => ("min-healthy-percent", MIN_PERCENT_VALUES),
            "unhealthy-draining" => ("unhealthy-draining", UNHEALTHY_DRAINING_VALUES),
            _ => {
                return Err(TargetGroupError::UnknownOption {
                    group,
                    option: raw_option.to_owned(),
                });
            }
        };
    if value.is_empty() {
        return Err(TargetGroupError::MissingValue {
            group,
            option,
            expected,
        });
    }
    let invalid = || TargetGroupError::InvalidValue {
        group: group.clone(),
        option,
        value: value.to_owned(),
        expected,
    };
    let keyword = value.to_ascii_lowercase();
    let hc = &mut config.health_check;
    let attrs = &mut config.attributes;
    match option {
        "protocol" => {
            config.protocol = match keyword.as_str() {
                "http" => TargetProtocol::Http,
                "https" => TargetProtocol::Https,
                "tcp" => TargetProtocol::Tcp,
                "udp" => TargetProtocol::Udp,
                _ => return Err(invalid()),
            }
        }
        "protocol-version" => {
            config.protocol_version = match keyword.as_str() {
                "http1" => ProtocolVersion::Http1,
                "http2" => ProtocolVersion::Http2,
                _ => return Err(invalid()),
            }
        }
        "algorithm" => {
            config.algorithm = match keyword.as_str() {
                "round_robin" => Algorithm::RoundRobin,
                "least_outstanding_requests" => Algorithm::LeastOutstandingRequests,
                "weighted_random" => Algorithm::WeightedRandom,
                _ => return Err(invalid()),
            }
        }
        "stickiness" => config.stickiness = parse_stickiness(&group, value)?,
        "verify-tls" => {
            config.verify_tls = match keyword.as_str() {
                "true" => true,
                "false" => false,
                _ => return Err(invalid()),
            }
        }
        "health-check" => {
            if keyword == "off" || keyword == "false" {
                hc.enabled = false;
            } else if keyword == "on" || keyword == "true" {
                hc.enabled = true;
            } else {
                hc.protocol = Some(CheckProtocol::parse(&keyword).ok_or_else(invalid)?);
                hc.enabled = true;
            }
        }
        "health-check-port" => {
            hc.port = if keyword == "traffic-port" {
                CheckPort::TrafficPort
            } else {
                CheckPort::Port(value.parse().ok().filter(|p| *p != 0).ok_or_else(invalid)?)
            }
        }
        "health-check-path" => {
            if !value.starts_with('/') || value.len() > 1024 || value.bytes().any(|b| b <= b' ') {
                return Err(invalid());
            }
            hc.path = Some(value.to_owned());
        }
        "health-check-interval" => {
            hc.interval = Some(parse_seconds(value, INTERVAL_RANGE).ok_or_else(invalid)?)
        }
        "health-check-timeout" => {
            hc.timeout = Some(parse_seconds(value, TIMEOUT_RANGE).ok_or_else(invalid)?)
        }
        "healthy-threshold" | "unhealthy-threshold" => {
            let n = value
                .parse::<u32>()
                .ok()
                .filter(|n| THRESHOLD_RANGE.contains(n))
                .ok_or_else(invalid)?;
            if option == "healthy-threshold" {
                hc.healthy_threshold = Some(n);
            } else {
                hc.unhealthy_threshold = Some(n);
            }
        }
        "matcher" => {
            hc.matcher = Some(Matcher::parse(value, 200..=599).map_err(|_| invalid())?);
        }
        "health-check-mode" => hc.mode = CheckMode::parse(&keyword).ok_or_else(invalid)?,
        "deregistration-delay" => {
            attrs.deregistration_delay =
                parse_seconds(value, Duration::ZERO..=MAX_DEREGISTRATION_DELAY)
                    .ok_or_else(invalid)?
        }
        "slow-start" => {
            attrs.slow_start = match parse_seconds(value, Duration::ZERO..=*SLOW_START_RANGE.end())
            {
                Some(Duration::ZERO) => None,
                Some(d) if SLOW_START_RANGE.contains(&d) => Some(d),
                _ => return Err(invalid()),
            }
        }
        "min-healthy-targets" => {
            attrs.min_healthy.count = value.parse().ok().filter(|n| *n >= 1).ok_or_else(invalid)?
        }
        "min-healthy-percent" => {
            attrs.min_healthy.percent = if keyword == "off" {
                None
            } else {
                Some(
                    value
                        .trim_end_matches('%')
                        .parse()
                        .ok()
                        .filter(|p| (1..=100).contains(p))
                        .ok_or_else(invalid)?,
                )
            }
        }
        _ => {
            // "unhealthy-draining", the last option of the table above.
            attrs.unhealthy_draining =
                match parse_seconds(value, Duration::ZERO..=MAX_UNHEALTHY_DRAINING) {
                    Some(Duration::ZERO) => None,
                    Some(d) => Some(d),
                    None => return Err(invalid()),
                }
        }
    }
    Ok(option)
}

/// AWS target group naming rules.
fn validate_name(name: &str) -> Result<(), TargetGroupError> {
    let invalid = |reason| TargetGroupError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(TargetGroupError::MissingName);
    }
    if name.len() > MAX_TARGET_GROUP_NAME_LEN {
        return Err(invalid("too long"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(invalid("invalid character"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(invalid("starts or ends with '-'"));
    }
    Ok(())
}

/// `lb_cookie[:SECONDS]` or `app_cookie:COOKIE[:SECONDS]`.
fn parse_stickiness(group: &str, value: &str) -> Result<Stickiness, TargetGroupError> {
    let mut fields = value.split(':');
    let kind = fields.next().unwrap_or_default().to_ascii_lowercase();
    let invalid = |expected| TargetGroupError::InvalidValue {
        group: group.to_owned(),
        option: "stickiness",
        value: value.to_owned(),
        expected,
    };
    let stickiness = match kind.as_str() {
        "lb_cookie" => {
            let duration = parse_duration(group, fields.next())?;
            Stickiness::LbCookie { duration }
        }
        "app_cookie" => {
            let cookie_name = fields.next().unwrap_or_default();
            if !is_cookie_name(cookie_name) {
                return Err(invalid(COOKIE_NAME_VALUES));
            }
            let duration = parse_duration(group, fields.next())?;
            Stickiness::AppCookie {
                cookie_name: cookie_name.to_owned(),
                duration,
            }
        }
        _ => return Err(invalid(STICKINESS_VALUES)),
    };
    if fields.next().is_some() {
        return Err(invalid(STICKINESS_VALUES));
    }
    Ok(stickiness)
}

/// Whole seconds in 1..=604800; absent means the default (one day).
fn parse_duration(group: &str, seconds: Option<&str>) -> Result<Duration, TargetGroupError> {
    let Some(seconds) = seconds else {
        return Ok(DEFAULT_STICKINESS_DURATION);
    };
    match seconds.parse::<u64>() {
        Ok(s) if (MIN_STICKINESS_SECONDS..=MAX_STICKINESS_SECONDS).contains(&s) => {
            Ok(Duration::from_secs(s))
        }
        _ => Err(TargetGroupError::DurationOutOfRange {
            group: group.to_owned(),
            value: seconds.to_owned(),
        }),
    }
}

/// RFC 6265 `cookie-name` (an RFC 7230 token), minus the names AWS reserves for itself
/// (`AWSALB`, `AWSALBAPP`, `AWSALBTG`: we refuse the whole `AWSALB` prefix, which also covers
/// `AWSALBCORS` and `AWSALBAPP-0…`).
fn is_cookie_name(name: &str) -> bool {
    const TCHAR_PUNCT: &[u8] = b"!#$%&'*+-.^_`|~";
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || TCHAR_PUNCT.contains(&b))
        && !name.to_ascii_uppercase().starts_with("AWSALB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_name_gets_every_aws_default() {
        let config = parse_target_group("web").unwrap();
        assert_eq!(
            config,
            TargetGroupConfig {
                name: "web".into(),
                protocol: TargetProtocol::Http,
                protocol_version: ProtocolVersion::Http1,
                algorithm: Algorithm::RoundRobin,
                stickiness: Stickiness::None,
                verify_tls: false,
                health_check: HealthCheckSettings::default(),
                attributes: GroupAttributes::default(),
            }
        );
    }

    #[test]
    fn every_option_is_accepted() {
        let config = parse_target_group(
            "api-2,protocol=https,protocol-version=http2,algorithm=least_outstanding_requests,\
             stickiness=app_cookie:SESSIONID:3600,verify-tls=true",
        )
        .unwrap();
        assert_eq!(config.name, "api-2");
        assert_eq!(config.protocol, TargetProtocol::Https);
        assert_eq!(config.protocol_version, ProtocolVersion::Http2);
        assert_eq!(config.algorithm, Algorithm::LeastOutstandingRequests);
        assert_eq!(
            config.stickiness,
            Stickiness::AppCookie {
                cookie_name: "SESSIONID".into(),
                duration: Duration::from_secs(3600)
            }
        );
        assert!(config.verify_tls);
    }

    #[test]
    fn accepted_values_table() {
        let cases: &[(&str, Algorithm, Stickiness)] = &[
            (
                "g,algorithm=round_robin",
                Algorithm::RoundRobin,
                Stickiness::None,
            ),
            (
                "g,ALGORITHM=Weighted_Random",
                Algorithm::WeightedRandom,
                Stickiness::None,
            ),
            (
                "g,stickiness=lb_cookie",
                Algorithm::RoundRobin,
                Stickiness::LbCookie {
                    duration: Duration::from_secs(86_400),
                },
            ),
            (
                "g,stickiness=lb_cookie:1",
                Algorithm::RoundRobin,
                Stickiness::LbCookie {
                    duration: Duration::from_secs(1),
                },
            ),
            (
                "g, stickiness = lb_cookie:604800 ",
                Algorithm::RoundRobin,
                Stickiness::LbCookie {
                    duration: Duration::from_secs(604_800),
                },
            ),
            (
                "g,stickiness=app_cookie:my.session",
                Algorithm::RoundRobin,
                Stickiness::AppCookie {
                    cookie_name: "my.session".into(),
                    duration: Duration::from_secs(86_400),
                },
            ),
        ];
        for (spec, algorithm, stickiness) in cases {
            let config = parse_target_group(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
            assert_eq!(config.algorithm, *algorithm, "{spec}");
            assert_eq!(&config.stickiness, stickiness, "{spec}");
        }
    }

    #[test]
    fn rejected_values_name_the_option_and_what_it_accepts() {
        // (spec, words the message must contain)
        let cases: &[(&str, &[&str])] = &[
            ("", &["missing name"]),
            (",protocol=http", &["missing name"]),
            ("-web", &["\"-web\"", "not starting or ending with '-'"]),
            ("web_1", &["invalid character"]),
            ("a23456789012345678901234567890123", &["too long", "1-32"]),
            (
                "web,port=80",
                &["unknown option \"port\"", "protocol-version"],
            ),
            (
                "web,protocol=ftp",
                &["protocol", "\"ftp\"", "http, https, tcp or udp"],
            ),
            (
                "web,protocol",
                &["protocol needs a value", "http, https, tcp or udp"],
            ),
            (
                "web,protocol-version=http3",
                &["protocol-version", "http1 or http2"],
            ),
            (
                "web,algorithm=random",
                &["algorithm", "least_outstanding_requests"],
            ),
            (
                "web,algorithm=round_robin,algorithm=weighted_random",
                &["algorithm given twice"],
            ),
            (
                "web,stickiness=source_ip",
                &["stickiness", "lb_cookie[:SECONDS]"],
            ),
            ("web,stickiness=lb_cookie:0", &["\"0\"", "1..=604800"]),
            ("web,stickiness=lb_cookie:604801", &["\"604801\"", "7 days"]),
            ("web,stickiness=lb_cookie:1h", &["\"1h\"", "whole seconds"]),
            (
                "web,stickiness=lb_cookie:10:20",
                &["stickiness", "app_cookie:COOKIE"],
            ),
            ("web,stickiness=app_cookie", &["stickiness", "cookie name"]),
            ("web,stickiness=app_cookie:AWSALBAPP", &["reserved"]),
            ("web,stickiness=app_cookie:a;b", &["cookie name"]),
            ("web,verify-tls=yes", &["verify-tls", "true or false"]),
            (
                "web,verify-tls=true",
                &["verify-tls=true needs protocol=https"],
            ),
        ];
        for (spec, words) in cases {
            let message = match parse_target_group(spec) {
                Ok(config) => panic!("{spec:?} accepted: {config:?}"),
                Err(e) => e.to_string(),
            };
            for word in *words {
                assert!(
                    message.contains(word),
                    "{spec:?}: {message:?} lacks {word:?}"
                );
            }
        }
    }
}
