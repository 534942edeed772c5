//! One target's health as its checks report it: an explicit state machine in which every
//! flip is an event (pingora's `Health { healthy, consecutive_counter }` shape), with AWS's
//! thresholds:
//!
//! - a new target (`Unknown`) becomes healthy after **one** passing check, and unhealthy
//!   after `unhealthy_threshold` consecutive failures;
//! - a healthy target becomes unhealthy after `unhealthy_threshold` consecutive failures;
//! - an unhealthy target becomes healthy after `healthy_threshold` consecutive passes.
//!
//! A check the balancer could not run ([`CheckResult::Error`]: no socket, no route for a
//! data-path probe) is not held against the target: it neither passes nor fails, and the
//! target shows `unavailable` (Elb.InternalError) until a check runs again.
use std::time::Instant;

use crate::targets::TargetReason;

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckResult {
    /// The target answered as required.
    Pass,
    /// The target failed: `reason` is an AWS unhealthy reason (ResponseCodeMismatch,
    /// Timeout, FailedHealthChecks); `description` says what happened in words an operator
    /// can act on ("Health checks failed with these codes: [404]", "Connection refused").
    Fail {
        /// AWS reason code.
        reason: TargetReason,
        /// What happened.
        description: String,
    },
    /// The balancer could not run the check.
    Error {
        /// Why.
        description: String,
    },
}

/// Where the checks have put a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No verdict yet (newly registered, or checks just enabled).
    Unknown,
    /// Passing.
    Healthy,
    /// Failing, since the given time.
    Unhealthy {
        /// When it turned unhealthy.
        since: Instant,
    },
}

/// A status flip, the event subscribers and logs care about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flip {
    /// Unknown or Unhealthy → Healthy.
    Healthy,
    /// Unknown or Healthy → Unhealthy.
    Unhealthy,
}

/// One target's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Current verdict.
    pub status: Status,
    /// A check has started at least once (initial: InitialHealthChecking rather than
    /// RegistrationInProgress).
    pub checks_started: bool,
    /// Consecutive passes.
    pub passes: u32,
    /// Consecutive failures.
    pub failures: u32,
    /// The latest failure, kept for the description while unhealthy.
    pub last_failure: Option<(TargetReason, String)>,
    /// The balancer could not check the target the last time it tried.
    pub error: Option<String>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            status: Status::Unknown,
            checks_started: false,
            passes: 0,
            failures: 0,
            last_failure: None,
            error: None,
        }
    }
}

impl Health {
    /// Takes one check result; returns the flip it caused, if any.
    pub fn observe(
        &mut self,
        result: CheckResult,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
        now: Instant,
    ) -> Option<Flip> {
        self.checks_started = true;
        match result {
            CheckResult::Error { description } => {
                self.error = Some(description);
                None
            }
            CheckResult::Pass => {
                self.error = None;
                self.failures = 0;
                self.passes = self.passes.saturating_add(1);
                let flips = match self.status {
                    Status::Healthy => false,
                    Status::Unknown => true,
                    Status::Unhealthy { .. } => self.passes >= healthy_threshold,
                };
                flips.then(|| {
                    self.status = Status::Healthy;
                    self.last_failure = None;
                    Flip::Healthy
                })
            }
            CheckResult::Fail {
                reason,
                description,
            } => {
                self.error = None;
                self.passes = 0;
                self.failures = self.failures.saturating_add(1);
                self.last_failure = Some((reason, description));
                let flips = match self.status {
                    Status::Unhealthy { .. } => false,
                    Status::Unknown | Status::Healthy => self.failures >= unhealthy_threshold,
                };
                flips.then(|| {
                    self.status = Status::Unhealthy { since: now };
                    Flip::Unhealthy
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail() -> CheckResult {
        CheckResult::Fail {
            reason: TargetReason::Timeout,
            description: "Request timed out".into(),
        }
    }

    fn run(h: &mut Health, results: &[CheckResult]) -> Vec<Option<Flip>> {
        let now = Instant::now();
        results
            .iter()
            .map(|r| h.observe(r.clone(), 5, 2, now))
            .collect()
    }

    #[test]
    fn a_new_target_is_healthy_after_one_pass() {
        let mut h = Health::default();
        assert_eq!(run(&mut h, &[CheckResult::Pass]), [Some(Flip::Healthy)]);
        assert_eq!(h.status, Status::Healthy);
    }

    #[test]
    fn a_new_target_is_unhealthy_after_the_unhealthy_threshold() {
        let mut h = Health::default();
        assert_eq!(
            run(&mut h, &[fail(), fail()]),
            [None, Some(Flip::Unhealthy)]
        );
        assert!(matches!(h.status, Status::Unhealthy { .. }));
        assert_eq!(h.last_failure.as_ref().unwrap().0, TargetReason::Timeout);
    }

    #[test]
    fn healthy_flips_only_after_consecutive_failures() {
        let mut h = Health::default();
        run(&mut h, &[CheckResult::Pass]);
        let flips = run(&mut h, &[fail(), CheckResult::Pass, fail(), fail()]);
        assert_eq!(flips, [None, None, None, Some(Flip::Unhealthy)]);
    }

    #[test]
    fn unhealthy_needs_the_healthy_threshold_of_consecutive_passes() {
        let mut h = Health::default();
        run(&mut h, &[fail(), fail()]);
        let p = CheckResult::Pass;
        let flips = run(
            &mut h,
            &[p.clone(), p.clone(), fail(), p.clone(), p.clone()],
        );
        assert!(flips.iter().all(Option::is_none), "{flips:?}");
        let flips = run(&mut h, &[p.clone(), p.clone(), p]);
        assert_eq!(flips, [None, None, Some(Flip::Healthy)]);
        assert_eq!(h.last_failure, None);
    }

    #[test]
    fn errors_of_the_balancer_are_not_held_against_the_target() {
        let mut h = Health::default();
        run(&mut h, &[CheckResult::Pass]);
        let err = CheckResult::Error {
            description: "no route".into(),
        };
        assert_eq!(
            run(&mut h, &[err.clone(), err.clone(), err]),
            [None, None, None]
        );
        assert_eq!(h.status, Status::Healthy);
        assert!(h.error.is_some());
        run(&mut h, &[CheckResult::Pass]);
        assert!(h.error.is_none());
    }
}
