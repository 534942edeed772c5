//! Everything that can be wrong with a listener rule, each message saying exactly what.

/// A rule, condition, action or `--rule` spec that AWS ALB would refuse (or that cannot be
/// parsed). Messages name the offending value so the operator can fix it without guessing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// Rule priorities are 1–50,000 (0 is reserved for the default rule).
    #[error("priority {priority} is outside 1-50000")]
    PriorityOutOfRange {
        /// The priority given.
        priority: u64,
    },
    /// Two rules of one listener share a priority.
    #[error("priority {priority} is used by more than one rule of this listener")]
    DuplicatePriority {
        /// The repeated priority.
        priority: u32,
    },
    /// A non-default rule without conditions (only the default rule has none).
    #[error("a rule needs at least one condition (only the default rule has none)")]
    NoConditions,
    /// host-header, path-pattern, http-request-method and source-ip may appear once per rule.
    #[error("{condition} may appear only once per rule")]
    RepeatedCondition {
        /// The condition type, e.g. `host-header`.
        condition: &'static str,
    },
    /// A condition without any value.
    #[error("{condition} needs at least one value")]
    NoValues {
        /// The condition type.
        condition: &'static str,
    },
    /// More than 3 values in one condition.
    #[error("{condition} has {count} values; at most {max} are allowed per condition")]
    TooManyValuesInCondition {
        /// The condition type.
        condition: &'static str,
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More than 5 condition values in one rule.
    #[error("the rule has {count} condition values; at most {max} are allowed per rule")]
    TooManyValuesInRule {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More than 5 wildcards in one rule.
    #[error("the rule has {count} wildcards (* or ?); at most {max} are allowed per rule")]
    TooManyWildcards {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A condition value that ALB does not accept.
    #[error("{condition} value {value:?} is invalid: {reason}")]
    InvalidConditionValue {
        /// The condition type.
        condition: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A forward action without target groups.
    #[error("forward needs at least one target group")]
    NoTargetGroups,
    /// More than 5 target groups in one forward action.
    #[error("forward has {count} target groups; at most {max} are allowed")]
    TooManyTargetGroups {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The same target group twice in one forward action.
    #[error("target group {name:?} appears more than once in one forward action")]
    DuplicateTargetGroup {
        /// The repeated name.
        name: String,
    },
    /// An empty target group name.
    #[error("a target group name cannot be empty")]
    EmptyTargetGroup,
    /// A target group weight outside 0–999.
    #[error("weight {weight} of target group {group:?} is outside 0-999")]
    WeightOutOfRange {
        /// The group.
        group: String,
        /// The weight given.
        weight: u64,
    },
    /// Every weight of a forward action is 0, so no group could ever be chosen.
    #[error("at least one target group of a forward action needs a weight above 0")]
    AllWeightsZero,
    /// Group stickiness outside 1 s – 7 days.
    #[error("group stickiness of {seconds} s is outside 1-604800 seconds (7 days)")]
    StickinessOutOfRange {
        /// The duration given, in seconds.
        seconds: u64,
    },
    /// A redirect status other than 301/302.
    #[error("redirect status {value:?} is invalid: use 301 or 302 (HTTP_301 or HTTP_302)")]
    InvalidRedirectStatus {
        /// The status given.
        value: String,
    },
    /// A redirect component ALB does not accept.
    #[error("redirect {component} {value:?} is invalid: {reason}")]
    InvalidRedirectComponent {
        /// `protocol`, `host`, `port`, `path` or `query`.
        component: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Every redirect component left at its default: the client would loop forever.
    #[error(
        "the redirect leaves protocol, host, port, path and query unchanged, so it would redirect to itself"
    )]
    SelfRedirect,
    /// A redirect that resolves, on its listener, to the very URL requested.
    #[error(
        "rule {priority} redirects to this listener's own protocol and port with host, path and query unchanged, so it would redirect to itself"
    )]
    RedirectLoop {
        /// The rule's priority (0 = default rule).
        priority: u32,
    },
    /// An HTTPS listener with a redirect to plain HTTP.
    #[error("rule {priority} redirects to HTTP, but an HTTPS listener cannot redirect to HTTP")]
    RedirectDowngrade {
        /// The rule's priority (0 = default rule).
        priority: u32,
    },
    /// A fixed-response status not matching `^(2|4|5)\d\d$`.
    #[error("fixed-response status {value:?} is invalid: it must be 2XX, 4XX or 5XX")]
    InvalidFixedResponseStatus {
        /// The status given.
        value: String,
    },
    /// A fixed-response content type outside ALB's five.
    #[error(
        "content type {value:?} is invalid: use text/plain, text/css, text/html, application/javascript or application/json"
    )]
    InvalidContentType {
        /// The content type given.
        value: String,
    },
    /// A fixed-response body over 1024 characters.
    #[error("fixed-response body has {chars} characters; at most {max} are allowed")]
    BodyTooLong {
        /// Its length in characters.
        chars: usize,
        /// The limit.
        max: usize,
    },
    /// A `--rule` spec that cannot be parsed.
    #[error("{0}")]
    Syntax(String),
    /// Several independent problems, all reported at once.
    #[error("{}", join(.0))]
    Many(Vec<RuleError>),
    /// An error located in one comma-separated part of a `--rule` spec.
    #[error("in `{part}`: {source}")]
    InPart {
        /// The offending part, as written.
        part: String,
        /// What is wrong with it.
        #[source]
        source: Box<RuleError>,
    },
}

fn join(errors: &[RuleError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl RuleError {
    /// One error from a non-empty list (the single error itself, or [`RuleError::Many`]).
    pub(crate) fn from_vec(mut errors: Vec<RuleError>) -> Self {
        if errors.len() == 1 {
            errors.remove(0)
        } else {
            Self::Many(errors)
        }
    }

    /// Attaches the spec part (as written) the error comes from.
    pub(crate) fn in_part(self, part: &str) -> Self {
        Self::InPart {
            part: part.to_owned(),
            source: Box::new(self),
        }
    }

    pub(crate) fn invalid_value(
        condition: &'static str,
        value: &str,
        reason: impl Into<String>,
    ) -> Self {
        Self::InvalidConditionValue {
            condition,
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}
