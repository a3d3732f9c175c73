use std::time::Duration;

use super::*;
use crate::assign::Splitter;
use crate::sequential::tests::Rng;
use crate::window::{Counts, Event};

fn guards() -> Guards {
    Guards {
        max_error_rate_delta: 0.02,
        max_p99_ratio: 1.5,
        ctr: Some(SeqGuard::new(0.05, 0.0)),
        cvr: None,
        max_psi: Some(0.25),
    }
}

fn plan() -> Plan {
    Plan {
        steps: vec![10, 50, 100],
        min_step_ms: 60_000,
        min_samples: 1000,
        guards: guards(),
    }
}

/// Totals with `requests` requests (and as many impressions), `errors` errors, `clicks`
/// clicks, a p99 of `p99_ms`.
fn totals(requests: u64, errors: u64, clicks: u64, p99_ms: f64) -> Totals {
    Totals {
        requests,
        errors,
        error_rate: errors as f64 / requests.max(1) as f64,
        p50_ms: p99_ms / 3.0,
        p99_ms,
        impressions: requests,
        clicks,
        ctr: clicks as f64 / requests.max(1) as f64,
        ..Totals::default()
    }
}

fn healthy(requests: u64) -> Totals {
    totals(requests, requests / 200, requests / 20, 50.0)
}

fn rolled_back_by(decision: Option<Decision>) -> String {
    match decision.map(|d| d.action) {
        Some(Action::RollBack { guard }) => guard,
        other => panic!("expected a rollback, got {other:?}"),
    }
}

#[test]
fn validation_names_the_field() {
    let field = |change: fn(&mut Plan)| {
        let mut p = plan();
        change(&mut p);
        p.validate().unwrap_err().field
    };
    assert_eq!(plan().validate(), Ok(()));
    assert_eq!(field(|p| p.steps = vec![100]), "steps");
    assert_eq!(field(|p| p.steps = vec![0, 100]), "steps");
    assert_eq!(field(|p| p.steps = vec![50, 10, 100]), "steps");
    assert_eq!(field(|p| p.steps = vec![10, 50]), "steps");
    assert_eq!(field(|p| p.min_samples = 0), "min_samples");
    assert_eq!(
        field(|p| p.guards.max_error_rate_delta = -0.1),
        "guards.max_error_rate_delta"
    );
    assert_eq!(
        field(|p| p.guards.max_p99_ratio = 0.5),
        "guards.max_p99_ratio"
    );
    assert_eq!(
        field(|p| p.guards.max_p99_ratio = f64::NAN),
        "guards.max_p99_ratio"
    );
    assert_eq!(
        field(|p| p.guards.ctr = Some(SeqGuard::new(0.0, 0.0))),
        "guards.ctr.alpha"
    );
    assert_eq!(
        field(|p| p.guards.cvr = Some(SeqGuard::new(0.05, 2.0))),
        "guards.cvr.margin"
    );
    assert_eq!(field(|p| p.guards.max_psi = Some(0.0)), "guards.max_psi");
    let err = Rollout::new(
        Plan {
            steps: vec![],
            ..plan()
        },
        "b",
        "c",
        0,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "rollout plan: steps needs at least two steps"
    );
}

#[test]
fn advances_after_time_and_samples_then_promotes() {
    let mut r = Rollout::new(plan(), "stable", "next", 1_000).unwrap();
    assert_eq!((r.state(), r.canary_percent()), (State::Running, 10));
    assert_eq!(
        r.evaluate(30_000, &healthy(5000), &healthy(5000)),
        None,
        "too soon"
    );
    assert_eq!(
        r.evaluate(61_000, &healthy(5000), &healthy(999)),
        None,
        "too few"
    );
    let d = r.evaluate(61_000, &healthy(5000), &healthy(1000)).unwrap();
    assert_eq!(d.action, Action::Advance { to_percent: 50 });
    assert_eq!(d.evidence.step_percent, 10);
    assert_eq!(d.evidence.canary.requests, 1000);
    assert_eq!((r.canary_percent(), r.step_started_ms()), (50, 61_000));
    assert_eq!(r.evaluate(100_000, &healthy(2000), &healthy(2000)), None);
    let d = r.evaluate(121_000, &healthy(2000), &healthy(2000)).unwrap();
    assert_eq!(d.action, Action::Promote);
    assert_eq!((r.state(), r.canary_percent()), (State::Promoted, 100));
    assert_eq!(
        r.evaluate(200_000, &healthy(1), &totals(10, 10, 0, 1e6)),
        None
    );
    assert_eq!(r.history().len(), 2);
}

#[test]
fn error_guard_rolls_back_at_once() {
    let mut r = Rollout::new(plan(), "b", "c", 0).unwrap();
    assert_eq!(
        r.evaluate(1_000, &healthy(1000), &totals(150, 30, 8, 50.0)),
        None
    );
    let bad = totals(400, 80, 20, 50.0);
    assert_eq!(
        rolled_back_by(r.evaluate(2_000, &healthy(4000), &bad)),
        "error_rate"
    );
    assert_eq!((r.state(), r.canary_percent()), (State::RolledBack, 0));
    assert!(r.evidence().p_error <= ERROR_GUARD_ALPHA / 2.0);
    assert_eq!(r.evaluate(3_000, &healthy(4000), &healthy(4000)), None);
}

#[test]
fn a_small_error_excess_within_the_margin_is_tolerated() {
    let mut r = Rollout::new(plan(), "b", "c", 0).unwrap();
    let slightly = totals(20_000, 300, 1000, 50.0);
    assert_eq!(
        r.evaluate(1_000, &totals(20_000, 100, 1000, 50.0), &slightly),
        None
    );
}

#[test]
fn p99_guard_waits_for_enough_requests() {
    let mut r = Rollout::new(plan(), "b", "c", 0).unwrap();
    let slow = |n| totals(n, 0, n / 20, 160.0);
    assert_eq!(r.evaluate(1_000, &healthy(5000), &slow(999)), None);
    assert_eq!(
        rolled_back_by(r.evaluate(2_000, &healthy(5000), &slow(1000))),
        "p99_latency"
    );
}

#[test]
fn p99_floor_ignores_sub_millisecond_jitter() {
    let mut r = Rollout::new(plan(), "b", "c", 0).unwrap();
    let fast = |n, ms| totals(n, 0, n / 20, ms);
    assert_eq!(r.evaluate(1_000, &fast(5000, 0.5), &fast(5000, 4.0)), None);
}

#[test]
fn ctr_guard_rolls_back_a_worse_canary() {
    let mut r = Rollout::new(plan(), "b", "c", 0).unwrap();
    let worse = totals(2000, 0, 40, 50.0);
    assert_eq!(
        rolled_back_by(r.evaluate(1_000, &healthy(20_000), &worse)),
        "ctr"
    );
    assert!(r.evidence().p_ctr.unwrap().0 <= 0.025);
}

#[test]
fn cvr_guard_rolls_back_a_worse_canary() {
    let mut p = plan();
    p.guards.ctr = None;
    p.guards.cvr = Some(SeqGuard::new(0.05, 0.0));
    let mut r = Rollout::new(p, "b", "c", 0).unwrap();
    let with_purchases = |purchases| Totals {
        purchases,
        ..healthy(20_000)
    };
    let d = r.evaluate(1_000, &with_purchases(1000), &with_purchases(400));
    assert_eq!(rolled_back_by(d), "cvr");
}

#[test]
fn psi_guard_rolls_back_a_shifted_score_distribution() {
    let mut r = Rollout::new(plan(), "b", "c", 0).unwrap();
    let scored = |scores: Vec<u64>| Totals {
        scores,
        ..healthy(2000)
    };
    let low = scored(vec![800, 200, 0, 0]);
    let high = scored(vec![0, 0, 200, 800]);
    assert_eq!(r.evaluate(1_000, &low, &low), None);
    assert!(r.evidence().psi.unwrap() < 1e-9);
    assert_eq!(rolled_back_by(r.evaluate(2_000, &low, &high)), "psi");
}

#[test]
fn operator_transitions() {
    let mut r = Rollout::new(plan(), "b", "c", 0).unwrap();
    assert_eq!(
        r.resume(1).unwrap_err(),
        TransitionError {
            from: State::Running,
            action: "resume"
        }
    );
    assert_eq!(r.pause(2).unwrap().action, Action::Pause);
    assert_eq!((r.state(), r.canary_percent()), (State::Paused, 10));
    assert!(r.pause(3).is_err());
    assert_eq!(r.evaluate(100_000, &healthy(9000), &healthy(9000)), None);
    assert_eq!(r.resume(4).unwrap().action, Action::Resume);
    assert_eq!(r.state(), State::Running);
    r.pause(5).unwrap();
    assert_eq!(r.promote(6).unwrap().action, Action::ManualPromote);
    assert_eq!((r.state(), r.canary_percent()), (State::Promoted, 100));
    for result in [r.abort(7), r.promote(7), r.pause(7), r.resume(7)] {
        assert_eq!(result.unwrap_err().from, State::Promoted);
    }
    let mut r = Rollout::new(plan(), "b", "c", 0).unwrap();
    assert_eq!(r.abort(1).unwrap().action, Action::Abort);
    assert_eq!((r.state(), r.canary_percent()), (State::Aborted, 0));
    assert!(r.resume(2).is_err());
    let mut r = Rollout::new(plan(), "b", "c", 0).unwrap();
    rolled_back_by(r.evaluate(1, &healthy(20_000), &totals(2000, 0, 0, 50.0)));
    assert_eq!(r.promote(2).unwrap_err().from, State::RolledBack);
}

#[test]
fn history_is_bounded() {
    let mut r = Rollout::new(plan(), "b", "c", 0).unwrap();
    for t in 0..150 {
        r.pause(2 * t).unwrap();
        r.resume(2 * t + 1).unwrap();
    }
    assert_eq!(r.history().len(), HISTORY_CAP);
    assert_eq!(r.history().next().unwrap().at_ms, 200);
    assert_eq!(r.history().last().unwrap().at_ms, 299);
}

#[test]
fn serde_round_trip() {
    let mut r = Rollout::new(plan(), "stable", "next", 0).unwrap();
    r.evaluate(61_000, &healthy(5000), &healthy(1000)).unwrap();
    r.evaluate(62_000, &healthy(700), &healthy(650));
    r.pause(63_000).unwrap();
    let json = serde_json::to_string(&r).unwrap();
    let back: Rollout = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
    assert_eq!(serde_json::to_string(&back).unwrap(), json);
    let plan_json = serde_json::to_string(&plan()).unwrap();
    assert_eq!(serde_json::from_str::<Plan>(&plan_json).unwrap(), plan());
    let without_tau = r#"{"alpha":0.05,"margin":0.001}"#;
    let guard: SeqGuard = serde_json::from_str(without_tau).unwrap();
    assert_eq!(guard.tau, DEFAULT_TAU);
    let past_the_end = json.replace(r#""step":1"#, r#""step":2"#);
    assert_ne!(past_the_end, json);
    let err = serde_json::from_str::<Rollout>(&past_the_end).unwrap_err();
    assert!(err.to_string().contains("step is past"), "{err}");
    let bad_plan = json.replace(r#""min_samples":1000"#, r#""min_samples":0"#);
    assert!(serde_json::from_str::<Rollout>(&bad_plan).is_err());
    for d in r.history() {
        let json = serde_json::to_string(d).unwrap();
        assert_eq!(&serde_json::from_str::<Decision>(&json).unwrap(), d);
    }
}

/// One variant's shoppers in the simulation.
#[derive(Clone, Copy)]
struct Behaviour {
    ctr: f64,
    purchase_per_click: f64,
    error_rate: f64,
    latency_scale: f64,
}

const BASELINE: Behaviour = Behaviour {
    ctr: 0.05,
    purchase_per_click: 0.2,
    error_rate: 0.005,
    latency_scale: 1.0,
};

fn sim_plan() -> Plan {
    Plan {
        steps: vec![10, 50, 100],
        min_step_ms: 60_000,
        min_samples: 2000,
        guards: Guards {
            max_error_rate_delta: 0.02,
            max_p99_ratio: 1.5,
            ctr: Some(SeqGuard::new(0.05, 0.0)),
            cvr: None,
            max_psi: Some(0.25),
        },
    }
}

const SHOPPERS: u32 = 1000;

/// Drives a rollout with synthetic shoppers, each request from a random shopper of a fixed
/// population, assigned through a [`Splitter`] at the rollout's current weights; a request
/// every 10 ms, an evaluation every 250 requests. Stops when the rollout ends or after
/// 300,000 requests.
fn simulate(seed: u64, canary: Behaviour) -> Rollout {
    let mut rng = Rng(seed);
    let mut rollout = Rollout::new(sim_plan(), "baseline", "canary", 0).unwrap();
    let mut counts = [Counts::default(), Counts::default()];
    let salt = seed.to_be_bytes();
    let mut percent = 0;
    let mut assigned = Vec::new();
    for request in 1..=300_000u64 {
        if rollout.canary_percent() != percent {
            percent = rollout.canary_percent();
            let weights = [
                ("baseline", 100 - u32::from(percent)),
                ("canary", u32::from(percent)),
            ];
            let splitter = Splitter::new(&salt, &weights).unwrap();
            assigned = (0..SHOPPERS)
                .map(|s| splitter.assign(&s.to_be_bytes()))
                .collect();
        }
        let arm = assigned[(rng.next_u64() % u64::from(SHOPPERS)) as usize];
        let b = if arm == 1 { canary } else { BASELINE };
        let error = rng.chance(b.error_rate);
        let uniform = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let latency_ms = b.latency_scale * (10.0 - 15.0 * (1.0 - uniform).ln());
        let c = &mut counts[arm];
        c.record(Event::Request {
            latency: Duration::from_secs_f64(latency_ms / 1000.0),
            error,
        });
        if !error {
            c.record(Event::Impression);
            c.record(Event::Score(uniform));
            if rng.chance(b.ctr) {
                c.record(Event::Click);
                if rng.chance(b.purchase_per_click) {
                    c.record(Event::Purchase);
                }
            }
        }
        if request % 250 == 0 {
            let now_ms = request * 10;
            let decision = rollout.evaluate(now_ms, &counts[0].totals(), &counts[1].totals());
            match decision.map(|d| d.action) {
                Some(Action::Advance { .. }) => counts.iter_mut().for_each(Counts::reset),
                Some(_) => break,
                None => {}
            }
        }
    }
    rollout
}

fn guard_of(r: &Rollout) -> Option<String> {
    r.history().find_map(|d| match &d.action {
        Action::RollBack { guard } => Some(guard.clone()),
        _ => None,
    })
}

#[test]
fn a_better_canary_is_promoted() {
    let better = Behaviour {
        ctr: 0.06,
        ..BASELINE
    };
    let r = simulate(1, better);
    assert_eq!(
        r.state(),
        State::Promoted,
        "{:?}",
        r.history().collect::<Vec<_>>()
    );
    let actions: Vec<_> = r.history().map(|d| d.action.clone()).collect();
    assert_eq!(
        actions,
        [Action::Advance { to_percent: 50 }, Action::Promote]
    );
}

#[test]
fn a_worse_ctr_canary_is_rolled_back() {
    let worse = Behaviour {
        ctr: 0.03,
        ..BASELINE
    };
    let r = simulate(2, worse);
    assert_eq!(
        (r.state(), guard_of(&r).as_deref()),
        (State::RolledBack, Some("ctr"))
    );
}

#[test]
fn an_error_prone_canary_is_rolled_back() {
    let failing = Behaviour {
        error_rate: 0.08,
        ..BASELINE
    };
    let r = simulate(3, failing);
    assert_eq!(
        (r.state(), guard_of(&r).as_deref()),
        (State::RolledBack, Some("error_rate"))
    );
    assert!(r.history().last().unwrap().evidence.canary.requests < 2000);
}

#[test]
fn a_slower_canary_is_rolled_back() {
    let slow = Behaviour {
        latency_scale: 2.0,
        ..BASELINE
    };
    let r = simulate(4, slow);
    assert_eq!(
        (r.state(), guard_of(&r).as_deref()),
        (State::RolledBack, Some("p99_latency"))
    );
}

#[test]
fn a_a_false_rollback_rate_is_at_most_alpha() {
    let runs = 200;
    let mut rollbacks = 0;
    let mut by_guard = std::collections::BTreeMap::<String, u32>::new();
    for seed in 0..runs {
        let r = simulate(10_000 + seed, BASELINE);
        match r.state() {
            State::Promoted => {}
            State::RolledBack => {
                rollbacks += 1;
                *by_guard.entry(guard_of(&r).unwrap()).or_default() += 1;
            }
            other => panic!("seed {seed} ended {other:?}"),
        }
    }
    let rate = f64::from(rollbacks) / runs as f64;
    println!("end-to-end A/A: {rollbacks}/{runs} = {rate:.3} rolled back {by_guard:?}");
    assert!(rate <= 0.05, "{rate}");
}

#[test]
fn detection_rates_over_seeds() {
    let runs = 40;
    let rate = |canary: Behaviour, want: State, base: u64| {
        let hits = (0..runs)
            .filter(|&s| simulate(base + s, canary).state() == want)
            .count();
        hits as f64 / runs as f64
    };
    let worse = rate(
        Behaviour {
            ctr: 0.04,
            ..BASELINE
        },
        State::RolledBack,
        20_000,
    );
    let better = rate(
        Behaviour {
            ctr: 0.06,
            ..BASELINE
        },
        State::Promoted,
        30_000,
    );
    println!("end-to-end over {runs} seeds: CTR 4% vs 5% rolled back {worse:.3}; CTR 6% vs 5% promoted {better:.3}");
    assert!(better >= 0.9, "{better}");
}
