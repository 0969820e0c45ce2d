//! The walk's paths, one test per path the real-host failover suites (crates/testbed/tests:
//! failover.rs, promises.rs, circuit.rs, kong.rs) take through it, driven as the filter's
//! dispatch loop drives it.

use super::*;
use crate::config::Config;
use crate::select::Candidate;
use crate::test_support;

const T0: u64 = 1_000_000;
/// Each scripted attempt takes this long, ms.
const STEP_MS: u64 = 10;

fn cand(provider: usize, probe: bool) -> Candidate {
    Candidate {
        probe,
        ..test_support::cand(provider)
    }
}

fn config(failover: &str) -> Config {
    test_support::config(4, &format!(r#","failover":{{{failover}}}"#))
}

fn walk(config: &Config, candidates: Vec<Candidate>) -> Walk {
    test_support::walk(config, candidates, T0)
}

/// What a host does with one attempt.
#[derive(Clone, Copy)]
enum Host {
    /// It refuses to dispatch it.
    Refuses,
    /// It sends it and the attempt ends so.
    Ends(Outcome),
}

/// How the scripted request ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    /// The answer of this provider went to the client, with this outcome.
    Delivered(usize, Outcome),
    /// The final error, with this status.
    Failed(u32),
}

struct Run {
    end: End,
    effects: Vec<Effect>,
    tried: Vec<(usize, Outcome)>,
}

/// Drives the walk as the filter's dispatch loop does: next, started, then refused or answered,
/// until a verdict ends it. `claim` answers probe claims; `redispatch` is the host's cap.
fn drive(
    config: &Config,
    mut w: Walk,
    script: &[Host],
    stream: bool,
    redispatch: bool,
    mut claim: impl FnMut(usize) -> bool,
) -> Run {
    let mut effects = Vec::new();
    let mut now = T0;
    let mut script = script.iter().copied();
    let end = loop {
        let Some(a) = w.next(now, &mut claim) else {
            break End::Failed(final_status(config, &w));
        };
        w.started(a.provider, now, |e| effects.push(e));
        match script.next().unwrap_or(Host::Ends(Outcome::Success(200))) {
            Host::Refuses => w.refused(|e| effects.push(e)),
            Host::Ends(outcome) => {
                now += STEP_MS;
                let verdict = w.answered(outcome, now, stream, &config.failover, redispatch, |e| {
                    effects.push(e)
                });
                match verdict.unwrap() {
                    Verdict::Deliver => break End::Delivered(a.provider, outcome),
                    Verdict::Stop => break End::Failed(final_status(config, &w)),
                    Verdict::FailOver => {}
                }
            }
        }
    };
    let tried = w.attempts.as_ref().unwrap().tried.clone();
    Run {
        end,
        effects,
        tried,
    }
}

fn final_status(config: &Config, w: &Walk) -> u32 {
    w.attempts
        .as_ref()
        .unwrap()
        .final_error(config, "m", None)
        .status
}

fn four() -> Vec<Candidate> {
    (0..4).map(|p| cand(p, false)).collect()
}

fn status(status: u32, retry_after_ms: Option<u64>) -> Outcome {
    Outcome::Status {
        status,
        retry_after_ms,
    }
}

fn count(p: usize, counter: PerProvider) -> Effect {
    Effect::Count {
        provider: p,
        counter,
    }
}

fn observed(run: &Run, p: usize) -> Vec<Observation> {
    observed_in(&run.effects, p)
}

fn counted(run: &Run, p: usize, c: PerProvider) -> usize {
    run.effects.iter().filter(|e| **e == count(p, c)).count()
}

fn failure(retry_after_ms: Option<u64>) -> Observation {
    Observation::Failure { retry_after_ms }
}

// failover.rs `ok`: the primary answers; nothing else happens.
#[test]
fn a_healthy_primary_answers_alone() {
    let c = config("");
    let run = drive(&c, walk(&c, four()), &[], false, true, |_| true);
    assert_eq!(run.end, End::Delivered(0, Outcome::Success(200)));
    assert_eq!(
        run.effects,
        vec![
            count(0, PerProvider::Attempts),
            Effect::Tally {
                provider: 0,
                outcome: Outcome::Success(200),
                ttfb_ms: None
            },
            Effect::Observe {
                provider: 0,
                observation: Observation::Success { ttfb_ms: None }
            },
            count(0, PerProvider::Success),
            Effect::Remember { provider: 0 },
        ]
    );
}

/// One outcome of the primary and what the walk makes of it. `Case::new` is the common path:
/// the primary fails, health hears a failure, the walk fails over and b answers.
struct Case {
    what: &'static str,
    /// Members of the `failover` object.
    failover: &'static str,
    /// What becomes of the first attempt (the ones after it succeed).
    primary: Host,
    /// Whether the host can dispatch again after a timed-out call.
    redispatch: bool,
    end: End,
    /// What health hears of the primary.
    heard: Vec<Observation>,
    /// The primary's failure and failover counters.
    counted: (usize, usize),
}

impl Case {
    fn new(what: &'static str, primary: Outcome) -> Case {
        Case {
            what,
            failover: "",
            primary: Host::Ends(primary),
            redispatch: true,
            end: End::Delivered(1, Outcome::Success(200)),
            heard: vec![failure(None)],
            counted: (1, 1),
        }
    }
    fn failover(self, failover: &'static str) -> Case {
        Case { failover, ..self }
    }
    fn no_redispatch(self) -> Case {
        Case {
            redispatch: false,
            ..self
        }
    }
    fn ends(self, end: End) -> Case {
        Case { end, ..self }
    }
    /// The primary's own answer goes to the client.
    fn delivered(self) -> Case {
        let Host::Ends(outcome) = self.primary else {
            return self;
        };
        self.ends(End::Delivered(0, outcome))
    }
    fn heard(self, heard: Vec<Observation>) -> Case {
        Case { heard, ..self }
    }
    fn counted(self, failures: usize, failovers: usize) -> Case {
        Case {
            counted: (failures, failovers),
            ..self
        }
    }
}

// The real-host suites each of these paths stands for (crates/testbed/tests):
// - refused connection: primary_refused_fails_over_{route,dispatch,envoy}, kong
//   primary_refused_fails_over;
// - timeout: primary_hang_times_out_and_fails_over_{route,dispatch,envoy}; on a host that cannot
//   dispatch after a timed-out call, kong primary_hang_ends_the_request_at_the_attempt_timeout
//   (the final error, 504: every attempt timed out);
// - reset: primary_reset_mid_response_fails_over_{dispatch,envoy}, kong primary_cut_mid_body;
// - client error: client_error_is_not_retried_{route,dispatch,envoy} (a 400 goes to the client,
//   says nothing about the provider and counts no failure).
#[test]
fn each_outcome_of_the_primary_is_delivered_or_failed_over() {
    use Outcome::*;
    let cases = [
        Case::new("refused connection", ConnectFailure),
        Case::new("timeout", Timeout),
        Case::new("timeout, no dispatch after it", Timeout)
            .no_redispatch()
            .ends(End::Failed(504))
            .counted(1, 0),
        Case::new("reset before the answer", Reset),
        Case::new("2xx whose body is no answer", Malformed),
        Case::new("malformed, not in retry_on", Malformed)
            .failover(r#""retry_on":["5xx"]"#)
            .delivered()
            .counted(1, 0),
        Case::new("503", status(503, None)),
        Case::new("429 with Retry-After", status(429, Some(2000))).heard(vec![failure(Some(2000))]),
        Case::new("429, not in retry_on", status(429, None))
            .failover(r#""retry_on":["5xx","connect-failure"]"#)
            .delivered()
            .counted(1, 0),
        Case::new("client error", status(400, None))
            .delivered()
            .heard(vec![])
            .counted(0, 0),
        Case::new("client error in retry_on_status", status(400, None))
            .failover(r#""retry_on_status":[400]"#)
            .heard(vec![])
            .counted(0, 1),
    ];
    for case in cases {
        let c = config(case.failover);
        let run = drive(
            &c,
            walk(&c, four()),
            &[case.primary],
            false,
            case.redispatch,
            |_| true,
        );
        let what = case.what;
        assert_eq!(run.end, case.end, "{what}");
        assert_eq!(observed(&run, 0), case.heard, "{what}");
        let failures = counted(&run, 0, PerProvider::Failure);
        let failovers = counted(&run, 0, PerProvider::Failover);
        assert_eq!((failures, failovers), case.counted, "{what}");
        // Only a success pins the session, to the provider that gave it, as the last effect;
        // a success after a failover counts as recovered by it.
        let remembered: Vec<_> = run
            .effects
            .iter()
            .filter(|e| matches!(e, Effect::Remember { .. }))
            .collect();
        let recovered = run
            .effects
            .contains(&Effect::CountGlobal(Global::RecoveredByFailover));
        match case.end {
            End::Delivered(p, Outcome::Success(_)) => {
                assert_eq!(remembered, [&Effect::Remember { provider: p }], "{what}");
                assert_eq!(run.effects.last(), remembered.last().copied(), "{what}");
                assert_eq!(counted(&run, p, PerProvider::Success), 1, "{what}");
                assert_eq!(recovered, p != 0, "{what}");
            }
            _ => {
                assert!(remembered.is_empty(), "{what}");
                assert!(!recovered, "{what}");
            }
        }
    }
}

// Dispatch mode, a dispatch the host will not make (unknown cluster): the next provider.
#[test]
fn a_dispatch_the_host_refuses_is_a_connect_failure_and_the_walk_goes_on() {
    let c = config("");
    let run = drive(&c, walk(&c, four()), &[Host::Refuses], false, true, |_| {
        true
    });
    assert_eq!(run.end, End::Delivered(1, Outcome::Success(200)));
    assert_eq!(run.tried[0], (0, Outcome::ConnectFailure));
    assert_eq!(
        &run.effects[..5],
        &[
            count(0, PerProvider::Attempts),
            Effect::Tally {
                provider: 0,
                outcome: Outcome::ConnectFailure,
                ttfb_ms: None
            },
            count(0, PerProvider::Failure),
            count(0, PerProvider::Failover),
            Effect::Observe {
                provider: 0,
                observation: failure(None)
            },
        ]
    );
}

// stream_with_primary_down_gets_complete_sse_*; kong stream_is_answered_and_fails_over;
// promises fastest_is_raised_by_the_observed_streaming_ttfb: a stream's success carries the
// fallback's own time to first byte, measured from its own start.
#[test]
fn a_stream_fails_over_and_its_time_to_first_byte_is_the_fallbacks() {
    let c = config("");
    let run = drive(
        &c,
        walk(&c, four()),
        &[Host::Ends(status(503, None))],
        true,
        true,
        |_| true,
    );
    assert_eq!(run.end, End::Delivered(1, Outcome::Success(200)));
    assert_eq!(
        observed(&run, 1),
        vec![Observation::Success {
            ttfb_ms: Some(STEP_MS as f64)
        }]
    );
    assert!(run.effects.contains(&Effect::Tally {
        provider: 1,
        outcome: Outcome::Success(200),
        ttfb_ms: Some(STEP_MS)
    }));
}

// attempts_are_bounded_{route,dispatch,envoy}: max_attempts failures, then the final error
// with the last provider's status.
#[test]
fn attempts_are_bounded_and_the_last_status_is_answered() {
    let c = config(r#""max_attempts":2"#);
    let all = [Host::Ends(status(503, None)); 4];
    let run = drive(&c, walk(&c, four()), &all, false, true, |_| true);
    assert_eq!(run.end, End::Failed(503));
    assert_eq!(run.tried.len(), 2);
    assert_eq!(counted(&run, 0, PerProvider::Attempts), 1);
    assert_eq!(counted(&run, 1, PerProvider::Attempts), 1);
    assert_eq!(counted(&run, 2, PerProvider::Attempts), 0);
}

// promises all_providers_failed_carries_the_soonest_retry_after; kong all_failing_is_one_clear_error.
#[test]
fn every_provider_failing_ends_with_the_last_answer_and_the_soonest_retry_after() {
    let c = config("");
    let script = [
        status(503, Some(9000)),
        status(503, Some(4000)),
        status(429, Some(7000)),
    ];
    let mut w = walk(&c, four());
    let mut effects = Vec::new();
    let mut now = T0;
    for o in script {
        let a = w.next(now, |_| true).unwrap();
        w.started(a.provider, now, |e| effects.push(e));
        now += STEP_MS;
        let v = w.answered(o, now, false, &c.failover, true, |e| effects.push(e));
        assert_eq!(v, Some(Verdict::FailOver));
    }
    assert!(w.next(now, |_| true).is_none(), "max_attempts 3 used up");
    let attempts = w.attempts.as_ref().unwrap();
    let e = attempts.final_error(&c, "m", None);
    assert_eq!(e.status, 429);
    assert_eq!(attempts.min_retry_after_s(), Some(4));
    let failures: Vec<_> = (0..3).flat_map(|p| observed_in(&effects, p)).collect();
    assert_eq!(
        failures,
        vec![
            failure(Some(9000)),
            failure(Some(4000)),
            failure(Some(7000))
        ]
    );
}

fn observed_in(effects: &[Effect], p: usize) -> Vec<Observation> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Observe {
                provider,
                observation,
            } if *provider == p => Some(*observation),
            _ => None,
        })
        .collect()
}

// promises the_deadline_cuts_attempts_short: no attempt starts past the deadline, and the
// last one's timeout is what is left of it.
#[test]
fn the_deadline_bounds_the_walk_and_the_last_timeout() {
    let c = config(r#""attempt_timeout_ms":1000,"deadline_ms":1500"#);
    let mut w = walk(&c, four());
    let a = w.next(T0, |_| true).unwrap();
    assert_eq!(a.timeout_ms, 1000);
    w.started(a.provider, T0, |_| {});
    let v = w.answered(
        Outcome::Timeout,
        T0 + 1000,
        false,
        &c.failover,
        true,
        |_| {},
    );
    assert_eq!(v, Some(Verdict::FailOver));
    let a = w.next(T0 + 1000, |_| true).unwrap();
    assert_eq!((a.provider, a.timeout_ms), (1, 500));
    w.started(a.provider, T0 + 1000, |_| {});
    let v = w.answered(
        Outcome::Timeout,
        T0 + 1500,
        false,
        &c.failover,
        true,
        |_| {},
    );
    assert_eq!(v, Some(Verdict::FailOver));
    assert!(w.next(T0 + 1500, |_| true).is_none());
    assert_eq!(final_status(&c, &w), 504);
}

// circuit.rs one_request_probes_a_half_open_circuit_* / a_failed_probe_reopens_the_circuit_*:
// a probe candidate goes only to the request that wins the claim; the others skip it.
#[test]
fn a_half_open_probe_goes_only_with_the_claim() {
    let c = config("");
    let cands = vec![cand(0, true), cand(1, false)];
    let lost = drive(&c, walk(&c, cands.clone()), &[], false, true, |_| false);
    assert_eq!(lost.end, End::Delivered(1, Outcome::Success(200)));
    assert_eq!(lost.tried.len(), 1);
    let mut claims = Vec::new();
    let won = drive(
        &c,
        walk(&c, cands),
        &[Host::Ends(status(500, None))],
        false,
        true,
        |p| {
            claims.push(p);
            true
        },
    );
    assert_eq!(claims, vec![0]);
    // The probe failed: health hears it (and reopens the circuit), the walk goes on.
    assert_eq!(observed(&won, 0), vec![failure(None)]);
    assert_eq!(won.end, End::Delivered(1, Outcome::Success(200)));
}

// promises last_resort_tries_held_back_providers_soonest_free_first: the walk tries the
// candidates in the order given.
#[test]
fn candidates_are_tried_in_ranking_order_each_once() {
    let c = config(r#""max_attempts":4"#);
    let cands = vec![
        cand(2, false),
        cand(0, false),
        cand(3, false),
        cand(1, false),
    ];
    let all = [Host::Ends(Outcome::Reset); 4];
    let run = drive(&c, walk(&c, cands), &all, false, true, |_| true);
    let order: Vec<usize> = run.tried.iter().map(|(p, _)| *p).collect();
    assert_eq!(order, vec![2, 0, 3, 1]);
    assert_eq!(run.end, End::Failed(502));
}

// A walk not begun (no ranking) neither starts nor judges anything.
#[test]
fn an_empty_walk_does_nothing() {
    let c = config("");
    let mut w = Walk::default();
    assert!(w.next(T0, |_| true).is_none());
    let mut effects = Vec::new();
    w.started(0, T0, |e| effects.push(e));
    w.refused(|e| effects.push(e));
    let v = w.answered(Outcome::Success(200), T0, false, &c.failover, true, |e| {
        effects.push(e)
    });
    assert_eq!(v, None);
    assert!(effects.is_empty());
}

// Route mode's streaming first attempt is bounded by the route's own timeouts, not by the
// timeout the walk gave it: when it times out, the rest of the deadline is still there for the
// next attempt. A bounded attempt given the whole deadline spends it.
#[test]
fn an_unbounded_attempt_timing_out_leaves_the_rest_of_the_deadline() {
    let c = config(r#""attempt_timeout_ms":2000,"deadline_ms":2000"#);
    for (unbounded, then) in [(false, None), (true, Some((1, 1500)))] {
        let mut w = walk(&c, four());
        let a = w.next(T0, |_| true).unwrap();
        assert_eq!(a.timeout_ms, 2000);
        w.started(a.provider, T0, |_| {});
        if unbounded {
            w.unbounded();
        }
        let v = w.answered(Outcome::Timeout, T0 + 500, false, &c.failover, true, |_| {});
        assert_eq!(v, Some(Verdict::FailOver));
        let next = w.next(T0 + 500, |_| true);
        assert_eq!(
            next.map(|a| (a.provider, a.timeout_ms)),
            then,
            "unbounded {unbounded}"
        );
    }
    // A walk not begun has nothing to unbound.
    Walk::default().unbounded();
}
