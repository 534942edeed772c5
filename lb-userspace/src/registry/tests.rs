//! The registry's lifecycle, with time passed in: every AWS state and transition, checked
//! without waiting.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::targets::parse_target_group;

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, n], 80))
}

fn fail(reason: TargetReason, why: &str) -> CheckResult {
    CheckResult::Fail {
        reason,
        description: why.into(),
    }
}

/// A registry with group `spec`, used by one listener rule, with targets 1..=n.
fn registry(spec: &str, n: u8) -> Registry {
    let mut r = Registry::new();
    r.create_group(parse_target_group(spec).unwrap()).unwrap();
    let name = spec.split(',').next().unwrap().to_owned();
    r.set_rule_users(&BTreeMap::from([(name.clone(), 1)]));
    let targets: Vec<(SocketAddr, u32)> = (1..=n).map(|i| (addr(i), 1)).collect();
    r.register(&name, &targets).unwrap();
    r
}

fn view(r: &mut Registry, now: Instant) -> Arc<GroupView> {
    r.dirty.extend(r.groups.keys().cloned());
    r.publish(now);
    r.published.values().next().unwrap().clone()
}

fn target(v: &GroupView, n: u8) -> &TargetView {
    v.targets.iter().find(|t| t.addr() == addr(n)).unwrap()
}

fn generation(r: &mut Registry, n: u8, now: Instant) -> u64 {
    target(&view(r, now), n).generation
}

fn report(r: &mut Registry, n: u8, result: CheckResult, now: Instant) -> Option<Flip> {
    let g = generation(r, n, now);
    r.report("web", addr(n), g, result, now)
}

#[test]
fn a_new_target_is_initial_until_one_check_passes() {
    let now = Instant::now();
    let mut r = registry("web", 2);
    let v = view(&mut r, now);
    let t = target(&v, 1);
    assert_eq!(t.member.state, TargetState::Initial);
    assert_eq!(t.member.reason, Some(TargetReason::RegistrationInProgress));
    // Nothing healthy yet: the group fails open, so traffic still flows.
    assert!(v.failing_open && t.member.takes_new);

    let g = t.generation;
    r.checking("web", addr(1), g);
    let v = view(&mut r, now);
    assert_eq!(
        target(&v, 1).member.reason,
        Some(TargetReason::InitialHealthChecking)
    );

    assert_eq!(
        report(&mut r, 1, CheckResult::Pass, now),
        Some(Flip::Healthy)
    );
    let v = view(&mut r, now);
    assert_eq!(target(&v, 1).member.state, TargetState::Healthy);
    assert!(!v.failing_open);
    assert!(target(&v, 1).member.takes_new);
    assert!(!target(&v, 2).member.takes_new, "still initial: no traffic");
}

#[test]
fn failures_make_a_target_unhealthy_with_the_reason_and_description() {
    let now = Instant::now();
    let mut r = registry("web", 2);
    report(&mut r, 1, CheckResult::Pass, now);
    report(&mut r, 2, CheckResult::Pass, now);
    let mismatch = || {
        fail(
            TargetReason::ResponseCodeMismatch,
            "Health checks failed with these codes: [404]",
        )
    };
    assert_eq!(report(&mut r, 2, mismatch(), now), None);
    assert_eq!(report(&mut r, 2, mismatch(), now), Some(Flip::Unhealthy));
    let v = view(&mut r, now);
    let t = target(&v, 2);
    assert_eq!(t.member.state, TargetState::Unhealthy);
    assert_eq!(t.member.reason, Some(TargetReason::ResponseCodeMismatch));
    assert_eq!(
        t.description,
        "Health checks failed with these codes: [404]"
    );
    assert!(!t.member.takes_new && !t.keeps_existing);
    // Back after the healthy threshold (5 by default).
    for i in 0..5 {
        let flip = report(&mut r, 2, CheckResult::Pass, now);
        assert_eq!(flip.is_some(), i == 4, "pass {i}");
    }
    assert!(target(&view(&mut r, now), 2).member.takes_new);
}

#[test]
fn every_target_unhealthy_fails_open_in_both_tiers() {
    let now = Instant::now();
    let mut r = registry("web", 2);
    for n in 1..=2 {
        report(
            &mut r,
            n,
            fail(TargetReason::Timeout, "Request timed out"),
            now,
        );
        report(
            &mut r,
            n,
            fail(TargetReason::Timeout, "Request timed out"),
            now,
        );
    }
    let v = view(&mut r, now);
    assert!(v.failing_open);
    assert!(
        v.targets
            .iter()
            .all(|t| t.member.takes_new && t.keeps_existing)
    );
    assert!(
        v.targets
            .iter()
            .all(|t| t.member.state == TargetState::Unhealthy)
    );
}

#[test]
fn the_health_threshold_fails_open_below_a_count_or_percentage() {
    let now = Instant::now();
    let mut r = registry("web,min-healthy-targets=2", 3);
    report(&mut r, 1, CheckResult::Pass, now);
    assert!(view(&mut r, now).failing_open, "1 healthy < 2");
    report(&mut r, 2, CheckResult::Pass, now);
    assert!(!view(&mut r, now).failing_open);

    let mut r = registry("web,min-healthy-percent=50", 4);
    report(&mut r, 1, CheckResult::Pass, now);
    assert!(view(&mut r, now).failing_open, "25% < 50%");
    report(&mut r, 2, CheckResult::Pass, now);
    let v = view(&mut r, now);
    assert!(!v.failing_open);
    assert_eq!(v.targets.iter().filter(|t| t.member.takes_new).count(), 2);
}

#[test]
fn deregistration_drains_for_the_delay_then_the_target_is_unused() {
    let now = Instant::now();
    let mut r = registry("web,deregistration-delay=30", 2);
    report(&mut r, 1, CheckResult::Pass, now);
    report(&mut r, 2, CheckResult::Pass, now);
    r.deregister("web", &[addr(2)], now).unwrap();
    let v = view(&mut r, now);
    let t = target(&v, 2);
    assert_eq!(t.member.state, TargetState::Draining);
    assert_eq!(
        t.member.reason,
        Some(TargetReason::DeregistrationInProgress)
    );
    assert!(!t.member.takes_new, "no new requests or flows");
    assert!(t.keeps_existing, "established flows keep flowing");
    assert!(!t.checked);
    let d = r
        .describe_target_health("web", None, now + Duration::from_millis(10_300))
        .unwrap();
    assert_eq!(d[1].target_health.state, "draining");
    assert!(
        d[1].target_health
            .description
            .as_deref()
            .unwrap()
            .ends_with("(20 s left)"),
        "{d:?}"
    );
    assert_eq!(r.next_deadline(now), Some(now + Duration::from_secs(30)));

    r.tick(now + Duration::from_secs(29));
    assert_eq!(view(&mut r, now).targets.len(), 2);
    r.tick(now + Duration::from_secs(30));
    let v = view(&mut r, now + Duration::from_secs(30));
    assert_eq!(v.targets.len(), 1);
    let d = r
        .describe_target_health("web", Some(&[addr(2)]), now)
        .unwrap();
    assert_eq!(d[0].target_health.state, "unused");
    assert_eq!(
        d[0].target_health.reason.as_deref(),
        Some("Target.NotRegistered")
    );
}

#[test]
fn a_zero_delay_removes_at_once_and_registering_again_cancels_a_drain() {
    let now = Instant::now();
    let mut r = registry("web,deregistration-delay=0", 2);
    r.deregister("web", &[addr(2)], now).unwrap();
    assert_eq!(view(&mut r, now).targets.len(), 1);

    let mut r = registry("web", 1);
    report(&mut r, 1, CheckResult::Pass, now);
    let g = generation(&mut r, 1, now);
    r.deregister("web", &[addr(1)], now).unwrap();
    r.register("web", &[(addr(1), 4)]).unwrap();
    let v = view(&mut r, now);
    let t = target(&v, 1);
    assert_eq!(t.member.state, TargetState::Healthy, "keeps its health");
    assert_eq!((t.member.weight, t.generation), (4, g));
}

#[test]
fn unknown_targets_and_groups_are_refused_without_changes() {
    let now = Instant::now();
    let mut r = registry("web", 1);
    let err = r.deregister("web", &[addr(1), addr(9)], now).unwrap_err();
    assert!(matches!(err, RegistryError::NotRegistered { .. }), "{err}");
    assert_eq!(
        target(&view(&mut r, now), 1).member.state,
        TargetState::Initial
    );
    assert!(matches!(
        r.register("nope", &[(addr(1), 1)]),
        Err(RegistryError::NoSuchGroup(_))
    ));
    assert!(matches!(
        r.register("web", &[(addr(2), 0)]),
        Err(RegistryError::InvalidTarget { .. })
    ));
}

#[test]
fn an_unhealthy_target_can_keep_its_flows_for_the_draining_interval() {
    let now = Instant::now();
    let mut r = registry("web,protocol=tcp,unhealthy-draining=60", 2);
    r.add_vip(vip(80), "web").unwrap();
    report(&mut r, 1, CheckResult::Pass, now);
    report(&mut r, 2, CheckResult::Pass, now);
    for _ in 0..2 {
        report(
            &mut r,
            2,
            fail(TargetReason::FailedHealthChecks, "Connection refused"),
            now,
        );
    }
    let v = view(&mut r, now);
    let t = target(&v, 2);
    assert_eq!(t.member.state, TargetState::UnhealthyDraining);
    assert!(!t.member.takes_new && t.keeps_existing);
    assert_eq!(r.next_deadline(now), Some(now + Duration::from_secs(60)));
    let later = now + Duration::from_secs(60);
    r.tick(later);
    let v = view(&mut r, later);
    let t = target(&v, 2);
    assert_eq!(t.member.state, TargetState::Unhealthy);
    assert!(!t.keeps_existing, "its flows are released");

    // By default (no interval) the flows go at once.
    let mut r = registry("web,protocol=tcp", 2);
    r.add_vip(vip(80), "web").unwrap();
    report(&mut r, 1, CheckResult::Pass, now);
    for _ in 0..2 {
        report(&mut r, 2, fail(TargetReason::Timeout, "timed out"), now);
    }
    assert!(!target(&view(&mut r, now), 2).keeps_existing);
}

#[test]
fn the_operator_switch_takes_a_target_out_without_touching_its_connections() {
    let now = Instant::now();
    let mut r = registry("web", 2);
    report(&mut r, 1, CheckResult::Pass, now);
    report(&mut r, 2, CheckResult::Pass, now);
    r.set_enabled("web", &[addr(2)], false).unwrap();
    let v = view(&mut r, now);
    let t = target(&v, 2);
    assert_eq!(t.member.state, TargetState::Unused);
    assert_eq!(t.member.reason, Some(TargetReason::NotInUse));
    assert!(!t.member.takes_new && t.keeps_existing && t.checked);
    r.set_enabled("web", &[addr(2)], true).unwrap();
    assert!(target(&view(&mut r, now), 2).member.takes_new);
}

#[test]
fn targets_of_an_unused_group_are_unused_and_not_checked() {
    let now = Instant::now();
    let mut r = registry("web", 1);
    r.set_rule_users(&BTreeMap::new());
    let v = view(&mut r, now);
    assert!(!v.in_use);
    let t = target(&v, 1);
    assert_eq!(
        (t.member.state, t.member.reason),
        (TargetState::Unused, Some(TargetReason::NotInUse))
    );
    assert!(!t.checked);
}

#[test]
fn disabled_checks_make_targets_unavailable_and_in_service() {
    let now = Instant::now();
    let mut r = registry("web,health-check=off", 1);
    let v = view(&mut r, now);
    let t = target(&v, 1);
    assert_eq!(t.member.state, TargetState::Unavailable);
    assert_eq!(t.member.reason, Some(TargetReason::HealthCheckDisabled));
    assert!(t.member.takes_new && !t.checked && !v.failing_open);
    assert!(v.check.is_none());
}

#[test]
fn a_check_the_balancer_cannot_run_is_not_held_against_the_target() {
    let now = Instant::now();
    let mut r = registry("web", 1);
    report(&mut r, 1, CheckResult::Pass, now);
    report(
        &mut r,
        1,
        CheckResult::Error {
            description: "no route to the VIP".into(),
        },
        now,
    );
    let v = view(&mut r, now);
    let t = target(&v, 1);
    assert_eq!(t.member.state, TargetState::Unavailable);
    assert_eq!(t.member.reason, Some(TargetReason::InternalError));
    assert!(t.description.contains("no route to the VIP"));
    assert!(t.member.takes_new);
}

#[test]
fn results_of_an_earlier_registration_are_ignored() {
    let now = Instant::now();
    let mut r = registry("web,deregistration-delay=0", 1);
    let old = generation(&mut r, 1, now);
    r.deregister("web", &[addr(1)], now).unwrap();
    r.register("web", &[(addr(1), 1)]).unwrap();
    assert_ne!(generation(&mut r, 1, now), old);
    assert_eq!(r.report("web", addr(1), old, CheckResult::Pass, now), None);
    assert_eq!(
        target(&view(&mut r, now), 1).member.state,
        TargetState::Initial
    );
}

#[test]
fn steady_passes_publish_nothing() {
    let now = Instant::now();
    let mut r = registry("web", 1);
    report(&mut r, 1, CheckResult::Pass, now);
    r.publish(now);
    let g = generation(&mut r, 1, now);
    r.publish(now);
    for _ in 0..10 {
        r.report("web", addr(1), g, CheckResult::Pass, now);
        assert!(
            r.publish(now).is_none(),
            "a pass of a healthy target is no news"
        );
    }
    r.report("web", addr(1), g, fail(TargetReason::Timeout, "t"), now);
    assert!(
        r.publish(now).is_none(),
        "one failure below the threshold is no news"
    );
    r.report("web", addr(1), g, fail(TargetReason::Timeout, "t"), now);
    assert!(r.publish(now).is_some());
}

#[test]
fn slow_start_ramps_a_target_only_when_another_is_serving() {
    let now = Instant::now();
    let mut r = registry("web,slow-start=60", 2);
    report(&mut r, 1, CheckResult::Pass, now);
    assert_eq!(
        target(&view(&mut r, now), 1).member.slow_start,
        None,
        "alone"
    );
    report(&mut r, 2, CheckResult::Pass, now);
    let ramp = target(&view(&mut r, now), 2)
        .member
        .slow_start
        .expect("ramps");
    assert_eq!(ramp.duration, Duration::from_secs(60));
    assert_eq!(r.next_deadline(now), Some(now + Duration::from_secs(60)));
    let later = now + Duration::from_secs(60);
    r.tick(later);
    assert_eq!(target(&view(&mut r, later), 2).member.slow_start, None);
}

#[test]
fn modify_group_changes_checks_and_attributes_and_refuses_the_rest() {
    let now = Instant::now();
    let mut r = registry("web", 1);
    report(&mut r, 1, CheckResult::Pass, now);
    let change = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
    r.modify_group("web", &change("health-check-path", "/health"))
        .unwrap();
    let v = view(&mut r, now);
    assert_eq!(v.check.as_ref().unwrap().path, "/health");
    assert_eq!(
        target(&v, 1).member.state,
        TargetState::Initial,
        "a new check path: the old verdict does not apply"
    );
    r.modify_group("web", &change("deregistration-delay", "5"))
        .unwrap();
    assert_eq!(
        r.group_config("web")
            .unwrap()
            .attributes
            .deregistration_delay,
        Duration::from_secs(5)
    );
    let err = r
        .modify_group("web", &change("algorithm", "weighted_random"))
        .unwrap_err();
    assert!(err.to_string().contains("cannot change"), "{err}");
    let err = r
        .modify_group("web", &change("health-check-timeout", "40"))
        .unwrap_err();
    assert!(err.to_string().contains("shorter"), "{err}");
    assert_eq!(
        r.group_config("web").unwrap().check().unwrap().path,
        "/health"
    );
}

#[test]
fn targets_whose_checks_start_over_keep_their_flows() {
    let now = Instant::now();
    let mut r = registry("web", 2);
    report(&mut r, 1, CheckResult::Pass, now);
    report(&mut r, 2, CheckResult::Pass, now);
    let change = vec![("health-check-path".to_owned(), "/health".to_owned())];
    r.modify_group("web", &change).unwrap();
    // Both initial: the group fails open, both take new traffic.
    let v = view(&mut r, now);
    assert!(v.failing_open);
    // Target 1 passes first: the group no longer fails open and target 2, still initial,
    // takes nothing new, but its established flows must not be cut.
    report(&mut r, 1, CheckResult::Pass, now);
    let v = view(&mut r, now);
    assert!(!v.failing_open);
    let t = target(&v, 2);
    assert_eq!(t.member.state, TargetState::Initial);
    assert!(!t.member.takes_new && t.keeps_existing);
}

fn vip(port: u16) -> VipSpec {
    VipSpec::new(
        Some("v".into()),
        VipAddr {
            addr: std::net::Ipv4Addr::new(10, 100, 0, 1).into(),
            port,
            proto: crate::l4::Proto::Tcp,
        },
    )
}

#[test]
fn target_specs_resolve_through_vips_and_groups() {
    let mut r = Registry::new();
    r.create_group(parse_target_group("web,protocol=tcp").unwrap())
        .unwrap();
    r.create_group(parse_target_group("api").unwrap()).unwrap();
    r.add_vip(vip(80), "web").unwrap();
    let spec = |s: &str| parse_target(s).unwrap();
    assert_eq!(
        r.resolve(&spec("v=10.0.0.11")).unwrap(),
        ("web".to_owned(), "10.0.0.11:80".parse().unwrap())
    );
    assert_eq!(
        r.resolve(&spec("10.100.0.1:80/tcp=10.0.0.11:80"))
            .unwrap()
            .0,
        "web"
    );
    assert_eq!(
        r.resolve(&spec("web=10.0.0.12")).unwrap().1,
        "10.0.0.12:80".parse().unwrap(),
        "a group serving a VIP takes the VIP's port"
    );
    assert!(
        r.resolve(&spec("v=10.0.0.11:8080"))
            .unwrap_err()
            .contains("VIP port")
    );
    assert!(
        r.resolve(&spec("api=10.0.0.11"))
            .unwrap_err()
            .contains("need a port")
    );
    assert!(
        r.resolve(&spec("nope=10.0.0.11:80"))
            .unwrap_err()
            .contains("no VIP or target group")
    );
    let (g, a) = r.resolve(&spec("api=10.0.0.11:8080")).unwrap();
    r.register(&g, &[(a, 1)]).unwrap();
    // Targets of either family serve an IPv4 VIP; unroutable ones are refused.
    let v6: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
    r.register("web", &[(v6, 1)]).unwrap();
    for bad in [
        "[fe80::1]:80",
        "[::ffff:10.0.0.1]:80",
        "[::1]:80",
        "0.0.0.0:80",
    ] {
        let a: SocketAddr = bad.parse().unwrap();
        let err = r.register("web", &[(a, 1)]).unwrap_err().to_string();
        assert!(err.contains("outer destination"), "{bad}: {err}");
    }
}

#[test]
fn a_target_the_maps_had_in_service_starts_healthy() {
    let mut r = Registry::new();
    r.create_group(parse_target_group("web,protocol=tcp").unwrap())
        .unwrap();
    r.add_vip(vip(80), "web").unwrap();
    let a: SocketAddr = "10.0.0.11:80".parse().unwrap();
    let b: SocketAddr = "10.0.0.12:80".parse().unwrap();
    r.register("web", &[(a, 1), (b, 1)]).unwrap();
    assert!(r.assume_healthy("web", a));
    assert!(!r.assume_healthy("web", "10.0.0.13:80".parse().unwrap()));
    let now = Instant::now();
    let snap = r.publish(now).unwrap();
    let v = &snap.groups["web"];
    let state = |x: SocketAddr| {
        v.targets
            .iter()
            .find(|t| t.addr() == x)
            .unwrap()
            .member
            .state
    };
    assert_eq!(state(a), TargetState::Healthy);
    assert_eq!(state(b), TargetState::Initial);
    assert!(!v.failing_open, "one healthy target: no fail-open");
}

#[test]
fn vips_take_only_groups_that_fit() {
    let mut r = Registry::new();
    r.create_group(parse_target_group("u,protocol=udp").unwrap())
        .unwrap();
    r.create_group(parse_target_group("t,protocol=tcp").unwrap())
        .unwrap();
    let err = r.add_vip(vip(80), "u").unwrap_err();
    assert!(
        err.to_string()
            .contains("needs a tcp, http or https target group"),
        "{err}"
    );
    r.add_vip(vip(80), "t").unwrap();
    let mut other = vip(443);
    other.vip.addr = std::net::Ipv4Addr::new(10, 100, 0, 2).into();
    let err = r.add_vip(other, "t").unwrap_err();
    assert!(err.to_string().contains("share the port"), "{err}");
    assert!(matches!(
        r.delete_group("t"),
        Err(RegistryError::GroupInUse { .. })
    ));
    r.delete_group("u").unwrap();
}
