//! The HTTP phases' paths, one test per path the real-host failover suites
//! (crates/testbed/tests: failover.rs, promises.rs, traffic.rs, circuit.rs, kong.rs) take
//! through them, driven as the filter's HTTP context drives them: the routed answer's
//! callbacks go to the exchange, its outcomes to the walk, and a fail-over "dispatches" the
//! next attempt.

use super::*;
use crate::attempt::Attempts;
use crate::config::Strategy;
use crate::health::Observation;
use crate::metrics::{Global, PerProvider};
use crate::select::Ranking;
use crate::test_support::cand;
use crate::walk::{Effect, Verdict, Walk};
use std::cell::{Cell, RefCell};

const T0: u64 = 1_000_000;

fn config(extra: &str) -> Config {
    crate::test_support::config(3, extra)
}

/// The routed answer as the host shows it: its headers and `response.code_details`, and how
/// many reads the exchange made.
#[derive(Default)]
struct View {
    headers: Vec<(&'static str, &'static str)>,
    details: Option<&'static str>,
    reads: Cell<usize>,
    asked: RefCell<Vec<String>>,
}

impl View {
    fn new() -> Self {
        Self::default()
    }
    fn with(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }
    fn details(mut self, d: &'static str) -> Self {
        self.details = Some(d);
        self
    }
}

impl ResponseView for View {
    fn header(&self, name: &str) -> Option<String> {
        self.reads.set(self.reads.get() + 1);
        self.asked.borrow_mut().push(name.to_string());
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
    fn code_details(&self) -> Option<String> {
        self.reads.set(self.reads.get() + 1);
        self.asked.borrow_mut().push("code_details".into());
        self.details.map(str::to_string)
    }
}

/// One request in route mode, its first attempt routed to provider `a`.
struct Req {
    config: Config,
    walk: Walk,
    ex: Exchange,
    stream: bool,
    include_usage: bool,
    now: u64,
    effects: Vec<Effect>,
    /// Providers "dispatched" to after the routed attempt.
    dispatched: Vec<usize>,
}

impl Req {
    fn route(extra: &str) -> Self {
        Self::start(extra, false, false)
    }

    fn stream(extra: &str, include_usage: bool) -> Self {
        Self::start(extra, true, include_usage)
    }

    fn start(extra: &str, stream: bool, include_usage: bool) -> Self {
        let config = config(extra);
        let mut walk = Walk::default();
        walk.begin(
            Ranking {
                strategy: Strategy::Value,
                candidates: vec![cand(0), cand(1), cand(2)],
                excluded: Vec::new(),
                stale: false,
                last_resort: false,
                ttft_target_ms: None,
                ttft_target_source: None,
            },
            Attempts::new(&config, T0),
        );
        let first = walk.next(T0, |_| true).unwrap();
        let mut effects = Vec::new();
        walk.started(first.provider, T0, |e| effects.push(e));
        if stream {
            walk.unbounded();
        }
        let ex = Exchange {
            phase: Phase::Routed,
            ..Exchange::default()
        };
        Self {
            config,
            walk,
            ex,
            stream,
            include_usage,
            now: T0 + 10,
            effects,
            dispatched: Vec::new(),
        }
    }

    fn headers(&mut self, status: u32, end_of_stream: bool, view: &View) -> OnHeaders {
        self.ex.on_headers(
            status,
            end_of_stream,
            self.stream,
            self.include_usage,
            &self.config,
            self.now,
            view,
        )
    }

    fn body(&mut self, size: usize, end_of_stream: bool) -> OnBody {
        self.ex.on_body(size, end_of_stream, self.include_usage)
    }

    /// The filter's `judge`: the walk's verdict, a fail-over dispatching the next attempt.
    fn judge(&mut self, outcome: Outcome) -> Option<bool> {
        let (now, stream) = (self.now, self.stream);
        let effects = &mut self.effects;
        let verdict =
            self.walk
                .answered(outcome, now, stream, &self.config.failover, true, |e| {
                    effects.push(e)
                })?;
        match verdict {
            Verdict::Deliver => Some(true),
            Verdict::Stop => Some(false),
            Verdict::FailOver => match self.walk.next(now, |_| true) {
                Some(a) => {
                    self.walk.started(a.provider, now, |e| effects.push(e));
                    self.dispatched.push(a.provider);
                    self.ex.phase = Phase::Dispatched;
                    None
                }
                None => Some(false),
            },
        }
    }

    /// The filter's `after_routed`.
    fn after_routed(&mut self, step: OnHeaders) -> AfterRouted {
        let OnHeaders::Judge { outcome, status } = step else {
            panic!("expected a judgement, got {step:?}");
        };
        let verdict = self.judge(outcome);
        self.ex.after_verdict(verdict, status, self.stream)
    }

    fn tried(&self) -> Vec<(usize, Outcome)> {
        self.walk.attempts.as_ref().unwrap().tried.clone()
    }
}

fn reply(status: u32) -> Reply {
    Reply {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: b"{}".to_vec(),
    }
}

const OK: OnHeaders = OnHeaders::Judge {
    outcome: Outcome::Success(200),
    status: 200,
};

// ---- a 2xx held until its body is complete -------------------------------------------

#[test]
fn a_held_2xx_is_judged_from_its_whole_body_and_delivered() {
    let mut r = Req::route("");
    let view = View::new().with("content-length", "100");
    assert_eq!(r.headers(200, false, &view), OnHeaders::Hold);
    assert_eq!(r.ex.phase, Phase::Validating);
    assert_eq!(r.ex.held, Some((200, T0 + 10)));
    assert_eq!(*view.asked.borrow(), ["content-encoding", "content-length"]);
    assert_eq!(r.body(60, false), OnBody::Pause);
    assert_eq!(r.body(100, true), OnBody::Inspect);
    let outcome = Exchange::validated(true, r.config.failover.retry_on.malformed, 200);
    assert_eq!(outcome, Outcome::Success(200));
    let step = OnHeaders::Judge {
        outcome,
        status: 200,
    };
    assert_eq!(r.after_routed(step), AfterRouted::Deliver);
    assert_eq!(r.ex.phase, Phase::Done);
    // Its record is written at once, with the usage read from the held body.
    assert!(!r.ex.record_at_end(200, false));
    assert!(r.effects.contains(&Effect::Remember { provider: 0 }));
    assert_eq!(r.ex.on_log(), Broke::Nothing);
}

#[test]
fn a_malformed_200_fails_over_and_the_fallback_takes_its_place() {
    let mut r = Req::route("");
    assert_eq!(r.headers(200, false, &View::new()), OnHeaders::Hold);
    assert_eq!(r.body(20, true), OnBody::Inspect);
    let outcome = Exchange::validated(false, true, 200);
    assert_eq!(outcome, Outcome::Malformed);
    let step = OnHeaders::Judge {
        outcome,
        status: 200,
    };
    assert_eq!(r.after_routed(step), AfterRouted::InFlight);
    assert_eq!(
        (r.ex.phase, r.dispatched.clone()),
        (Phase::Dispatched, vec![1])
    );
    // The held body is complete: the fallback's answer replaces it at once.
    assert!(r.ex.routed_held);
    assert_eq!(r.judge(Outcome::Success(200)), Some(true));
    assert_eq!(r.ex.place(reply(200)), (Place::Now(20), Some(reply(200))));
    assert_eq!(
        r.tried(),
        [(0, Outcome::Malformed), (1, Outcome::Success(200))]
    );
    assert!(r
        .effects
        .contains(&Effect::CountGlobal(Global::RecoveredByFailover)));
}

#[test]
fn a_malformed_200_is_delivered_where_malformed_is_not_retried() {
    let r = Req::route(r#","failover":{"retry_on":["5xx"]}"#);
    assert!(!r.config.failover.retry_on.malformed);
    assert_eq!(
        Exchange::validated(false, false, 200),
        Outcome::Success(200)
    );
}

#[test]
fn a_200_without_a_body_is_malformed() {
    let mut r = Req::route("");
    let step = r.headers(200, true, &View::new());
    assert_eq!(
        step,
        OnHeaders::Judge {
            outcome: Outcome::Malformed,
            status: 200
        }
    );
    // Nothing held that a fallback could take the place of: its answer is a local reply.
    assert_eq!(r.after_routed(step), AfterRouted::InFlight);
    assert_eq!(r.judge(Outcome::Success(200)), Some(true));
    assert_eq!(
        r.ex.place(reply(200)),
        (Place::LocalReply, Some(reply(200)))
    );
}

#[test]
fn a_compressed_2xx_flows_unheld_and_is_priced_at_its_end() {
    let mut r = Req::route("");
    let view = View::new().with("content-encoding", "gzip");
    let step = r.headers(200, false, &view);
    assert_eq!(step, OK);
    assert!(r.ex.encoded && r.ex.unheld);
    assert_eq!(r.after_routed(step), AfterRouted::Deliver);
    assert_eq!(r.ex.phase, Phase::Unheld);
    assert!(r.ex.record_at_end(200, false));
    assert_eq!(r.body(4096, false), OnBody::Tail { end: None });
    assert_eq!(r.body(100, true), OnBody::Tail { end: Some(200) });
    assert_eq!(r.ex.phase, Phase::Done);
}

#[test]
fn a_2xx_too_big_to_hold_flows_unheld() {
    let mut r = Req::route("");
    let view = View::new().with("content-length", "1468006");
    let step = r.headers(200, false, &view);
    assert_eq!(step, OK);
    assert!(!r.ex.encoded && r.ex.unheld);
    assert_eq!(r.after_routed(step), AfterRouted::Deliver);
    assert_eq!(r.ex.phase, Phase::Unheld);
}

#[test]
fn a_chunked_2xx_that_outgrows_the_hold_flows_on_unheld() {
    let mut r = Req::route("");
    assert_eq!(r.headers(200, false, &View::new()), OnHeaders::Hold);
    assert_eq!(r.body(answer::HOLD_LIMIT_BYTES, false), OnBody::Pause);
    assert_eq!(
        r.body(answer::HOLD_LIMIT_BYTES + 1, false),
        OnBody::Overflow
    );
    assert!(r.ex.unheld);
    assert_eq!(r.after_routed(OK), AfterRouted::Deliver);
    assert_eq!(r.ex.phase, Phase::Unheld);
    assert_eq!(r.body(10, true), OnBody::Tail { end: Some(200) });
}

#[test]
fn without_checks_or_our_headers_a_2xx_is_not_held_nor_read() {
    let mut r = Req::route(r#","response_headers":false,"failover":{"retry_on":["5xx"]}"#);
    let view = View::new();
    let step = r.headers(200, false, &view);
    assert_eq!((step, view.reads.get()), (OK, 0));
    assert_eq!(r.after_routed(step), AfterRouted::Deliver);
    assert_eq!(r.ex.phase, Phase::Done);
}

// ---- a held 2xx that breaks off --------------------------------------------------------

#[test]
fn a_held_2xx_cut_mid_body_is_a_reset_and_fails_over() {
    let mut r = Req::route("");
    assert_eq!(r.headers(200, false, &View::new()), OnHeaders::Hold);
    // The host sends its own reply where the held answer broke off.
    let view = View::new().details("upstream_reset_after_response_started{remote_reset}");
    let step = r.headers(502, false, &view);
    assert_eq!(
        step,
        OnHeaders::Judge {
            outcome: Outcome::Reset,
            status: 502
        }
    );
    // Whatever the status says, an answer cut mid-body is a reset.
    let mut s = Req::route("");
    assert_eq!(s.headers(200, false, &View::new()), OnHeaders::Hold);
    let step2 = s.headers(503, false, &View::new().details("via_upstream"));
    assert_eq!(
        step2,
        OnHeaders::Judge {
            outcome: Outcome::Reset,
            status: 503
        }
    );
    assert_eq!(r.after_routed(step), AfterRouted::InFlight);
    assert_eq!(r.tried(), [(0, Outcome::Reset)]);
}

#[test]
fn a_held_2xx_the_host_answered_itself_is_counted_when_the_request_ends() {
    let mut r = Req::route("");
    assert_eq!(r.headers(200, false, &View::new()), OnHeaders::Hold);
    assert_eq!(r.ex.on_log(), Broke::Held);
    let mut effects = Vec::new();
    assert_eq!(r.walk.broke_off(false, |e| effects.push(e)), Some(0));
    assert_eq!(
        effects,
        [
            Effect::Count {
                provider: 0,
                counter: PerProvider::Failure
            },
            Effect::Tally {
                provider: 0,
                outcome: Outcome::Reset,
                ttfb_ms: None
            },
            Effect::Observe {
                provider: 0,
                observation: Observation::Failure {
                    retry_after_ms: None
                }
            },
        ]
    );
    assert_eq!(r.tried(), [(0, Outcome::Reset)]);
}

// ---- error answers -----------------------------------------------------------------------

#[test]
fn a_503_fails_over_and_the_fallback_waits_for_the_held_body() {
    let mut r = Req::route("");
    let view = View::new();
    let step = r.headers(503, false, &view);
    assert_eq!(
        step,
        OnHeaders::Judge {
            outcome: Outcome::Status {
                status: 503,
                retry_after_ms: None
            },
            status: 503
        }
    );
    assert!(r.ex.error_body && r.ex.routed_held);
    assert_eq!(
        *view.asked.borrow(),
        ["code_details", "retry-after", "content-encoding"]
    );
    assert_eq!(r.after_routed(step), AfterRouted::InFlight);
    // The fallback answers before the held error body has ended: its answer waits.
    assert_eq!(r.judge(Outcome::Success(200)), Some(true));
    assert_eq!(r.ex.place(reply(200)), (Place::Later, None));
    assert_eq!(r.ex.phase, Phase::Replacing);
    assert_eq!(r.body(10, false), OnBody::Pause);
    assert_eq!(r.body(30, true), OnBody::Replace(reply(200), 30));
    assert_eq!(r.ex.phase, Phase::Done);
    assert_eq!(r.body(0, true), OnBody::Continue);
}

#[test]
fn a_503_whose_body_ended_during_the_fallback_is_replaced_at_once() {
    let mut r = Req::route("");
    let step = r.headers(503, false, &View::new());
    assert_eq!(r.after_routed(step), AfterRouted::InFlight);
    assert_eq!(r.body(5, false), OnBody::Pause);
    assert_eq!(r.body(30, true), OnBody::Pause);
    assert_eq!(r.ex.routed_body, Some(30));
    assert_eq!(r.judge(Outcome::Success(200)), Some(true));
    assert_eq!(r.ex.place(reply(200)), (Place::Now(30), Some(reply(200))));
}

#[test]
fn a_429_with_retry_after_fails_over_and_keeps_it_out() {
    let mut r = Req::route("");
    let view = View::new().with("retry-after", "7");
    let step = r.headers(429, false, &view);
    assert_eq!(
        step,
        OnHeaders::Judge {
            outcome: Outcome::Status {
                status: 429,
                retry_after_ms: Some(7000)
            },
            status: 429
        }
    );
    assert_eq!(r.after_routed(step), AfterRouted::InFlight);
    assert!(r.effects.iter().any(|e| matches!(
        e,
        Effect::Observe {
            provider: 0,
            observation: Observation::Failure {
                retry_after_ms: Some(7000)
            }
        }
    )));
}

#[test]
fn a_refused_connection_and_a_timeout_fail_over() {
    for (status, details, outcome) in [
        (
            503,
            "upstream_reset_before_response_started{connection_failure}",
            Outcome::ConnectFailure,
        ),
        (503, "no_healthy_upstream", Outcome::ConnectFailure),
        (504, "response_timeout", Outcome::Timeout),
        (
            503,
            "upstream_reset_before_response_started{remote_reset}",
            Outcome::Reset,
        ),
    ] {
        let mut r = Req::route("");
        let step = r.headers(status, true, &View::new().details(details));
        assert_eq!(step, OnHeaders::Judge { outcome, status });
        // No body follows: nothing is held, nothing read.
        assert!(!r.ex.routed_held && !r.ex.error_body);
        assert_eq!(r.after_routed(step), AfterRouted::InFlight);
        assert_eq!(r.dispatched, [1]);
    }
}

#[test]
fn the_last_503_is_read_then_replaced_in_place() {
    let mut r = Req::route(r#","failover":{"max_attempts":1}"#);
    let step = r.headers(503, false, &View::new());
    assert_eq!(r.after_routed(step), AfterRouted::ReadError);
    assert_eq!(r.ex.phase, Phase::ReadingError);
    assert_eq!(r.body(100, false), OnBody::Pause);
    assert_eq!(
        r.body(200, true),
        OnBody::ReadError {
            bytes: 200,
            in_place: true
        }
    );
    assert_eq!(r.ex.phase, Phase::Done);
}

#[test]
fn a_last_error_too_big_to_hold_is_read_in_part_and_answered_locally() {
    let mut r = Req::route(r#","failover":{"max_attempts":1}"#);
    let step = r.headers(500, false, &View::new());
    assert_eq!(r.after_routed(step), AfterRouted::ReadError);
    assert_eq!(
        r.body(answer::HOLD_LIMIT_BYTES + 1, false),
        OnBody::ReadError {
            bytes: answer::ERROR_READ_BYTES,
            in_place: false
        }
    );
}

#[test]
fn a_last_error_without_a_body_or_compressed_is_the_final_error_at_once() {
    let mut r = Req::route(r#","failover":{"max_attempts":1}"#);
    let step = r.headers(503, true, &View::new());
    assert_eq!(r.after_routed(step), AfterRouted::FinalError);
    assert_eq!(r.ex.phase, Phase::Done);
    let mut r = Req::route(r#","failover":{"max_attempts":1}"#);
    let step = r.headers(503, false, &View::new().with("content-encoding", "gzip"));
    assert!(!r.ex.error_body && r.ex.routed_held);
    assert_eq!(r.after_routed(step), AfterRouted::FinalError);
}

#[test]
fn all_failed_puts_the_final_error_in_the_held_answers_place() {
    let mut r = Req::route(r#","failover":{"max_attempts":2}"#);
    let step = r.headers(503, false, &View::new());
    assert_eq!(r.after_routed(step), AfterRouted::InFlight);
    let fallback = Outcome::Status {
        status: 502,
        retry_after_ms: None,
    };
    assert_eq!(r.judge(fallback), Some(false));
    assert_eq!(r.ex.place(reply(503)), (Place::Later, None));
    assert_eq!(r.body(40, true), OnBody::Replace(reply(503), 40));
    assert_eq!(r.tried().len(), 2);
}

#[test]
fn a_client_error_is_delivered_not_retried() {
    let mut r = Req::route("");
    let step = r.headers(400, false, &View::new());
    assert_eq!(r.after_routed(step), AfterRouted::Deliver);
    assert_eq!((r.ex.phase, r.dispatched.len()), (Phase::Done, 0));
    assert!(!r.ex.record_at_end(400, false));
}

// ---- streams ---------------------------------------------------------------------------

#[test]
fn a_stream_flows_and_is_priced_from_its_usage_chunk_at_its_end() {
    let mut r = Req::stream("", true);
    let view = View::new();
    let step = r.headers(200, false, &view);
    assert_eq!(step, OK);
    // Only whether it came compressed is asked (a compressed stream is not read).
    assert_eq!(*view.asked.borrow(), ["content-encoding"]);
    assert_eq!(r.after_routed(step), AfterRouted::Deliver);
    assert_eq!(r.ex.phase, Phase::Streaming);
    assert!(r.ex.record_at_end(200, true));
    assert_eq!(
        r.body(120, false),
        OnBody::Chunk {
            read_usage: true,
            end: false
        }
    );
    assert_eq!(
        r.body(0, true),
        OnBody::Chunk {
            read_usage: false,
            end: true
        }
    );
    assert_eq!((r.ex.phase, r.ex.on_log()), (Phase::Done, Broke::Nothing));
    // Its time to first byte counts for the market report.
    assert!(r.effects.contains(&Effect::Tally {
        provider: 0,
        outcome: Outcome::Success(200),
        ttfb_ms: Some(10)
    }));
}

#[test]
fn a_stream_without_a_usage_chunk_or_compressed_is_not_read() {
    let mut r = Req::stream("", false);
    let view = View::new();
    let step = r.headers(200, false, &view);
    assert_eq!((step, view.reads.get()), (OK, 0));
    r.after_routed(step);
    assert_eq!(
        r.body(120, false),
        OnBody::Chunk {
            read_usage: false,
            end: false
        }
    );
    let mut r = Req::stream("", true);
    r.headers(200, false, &View::new().with("content-encoding", "br"));
    r.after_routed(OK);
    assert!(matches!(
        r.body(120, false),
        OnBody::Chunk {
            read_usage: false,
            ..
        }
    ));
}

#[test]
fn a_stream_with_its_primary_down_fails_over() {
    let mut r = Req::stream("", false);
    let step = r.headers(
        503,
        true,
        &View::new().details("upstream_reset_before_response_started{connection_failure}"),
    );
    assert_eq!(r.after_routed(step), AfterRouted::InFlight);
    assert_eq!(r.dispatched, [1]);
}

#[test]
fn a_stream_that_breaks_off_is_counted_when_the_request_ends() {
    let mut r = Req::stream("", false);
    r.headers(200, false, &View::new());
    r.after_routed(OK);
    assert_eq!(r.ex.on_log(), Broke::Delivered);
    let mut effects = Vec::new();
    assert_eq!(r.walk.broke_off(true, |e| effects.push(e)), Some(0));
    assert_eq!(
        effects,
        [
            Effect::CountGlobal(Global::StreamFailedMidway),
            Effect::Count {
                provider: 0,
                counter: PerProvider::Failure
            },
            Effect::TallyBroken { provider: 0 },
            Effect::Observe {
                provider: 0,
                observation: Observation::Failure {
                    retry_after_ms: None
                }
            },
        ]
    );
    // An unheld answer that breaks off is the same.
    let mut u = Req::route("");
    let step = u.headers(200, false, &View::new().with("content-encoding", "gzip"));
    u.after_routed(step);
    assert_eq!(u.ex.on_log(), Broke::Delivered);
}

// ---- callbacks the walk has no part in -----------------------------------------------

#[test]
fn callbacks_outside_the_walk_pass_through() {
    let c = config("");
    for phase in [Phase::Passthrough, Phase::Reading, Phase::Done] {
        let mut ex = Exchange {
            phase,
            ..Exchange::default()
        };
        let view = View::new();
        assert_eq!(
            ex.on_headers(200, false, false, false, &c, T0, &view),
            OnHeaders::Ignore
        );
        assert_eq!(view.reads.get(), 0);
        assert_eq!(ex.on_body(10, true, false), OnBody::Continue);
        assert_eq!(ex.on_log(), Broke::Nothing);
        assert_eq!(ex.phase, phase);
    }
    // A walk never begun has nothing to break off.
    assert_eq!(Walk::default().broke_off(true, |_| {}), None);
}

#[test]
fn a_dispatched_attempt_holds_the_routed_response_meanwhile() {
    for phase in [Phase::Dispatched, Phase::Bouncing] {
        let mut ex = Exchange {
            phase,
            ..Exchange::default()
        };
        assert_eq!(ex.on_body(10, false, false), OnBody::Pause);
        assert_eq!(ex.routed_body, None);
        assert_eq!(ex.on_body(12, true, false), OnBody::Pause);
        assert_eq!(ex.routed_body, Some(12));
    }
}

#[test]
fn the_routed_answer_is_read_only_when_something_needs_it() {
    let c = config("");
    assert!(reads_answer(&c, false, false));
    assert!(reads_answer(&c, true, true));
    assert!(!reads_answer(&c, true, false));
    let c = config(r#","response_headers":false,"failover":{"retry_on":["5xx"]}"#);
    assert!(!reads_answer(&c, false, false));
    // Either need alone is enough: checking for malformed answers, or pricing for our headers.
    let c = config(r#","response_headers":false,"failover":{"retry_on":["5xx","malformed"]}"#);
    assert!(reads_answer(&c, false, false));
    let c = config(r#","failover":{"retry_on":["5xx"]}"#);
    assert!(reads_answer(&c, false, false));
}

// ---- dispatched calls ------------------------------------------------------------------

fn call<'a>(status: Option<u32>, failure: Option<&'a str>, body: &'a [u8]) -> Call<'a> {
    Call {
        status,
        failure,
        body,
        retry_after: None,
        encoded: false,
        stream: false,
    }
}

fn well_formed(b: &[u8]) -> bool {
    b.starts_with(b"{")
}

#[test]
fn a_call_that_broke_off_is_a_timeout_a_connect_failure_or_a_reset() {
    // Kong says why; a cut body is the filter's own reason.
    assert_eq!(
        call(None, Some("timeout"), b"").outcome(well_formed),
        Outcome::Timeout
    );
    assert_eq!(
        call(None, Some("broken connection"), b"").outcome(well_formed),
        Outcome::ConnectFailure
    );
    assert_eq!(
        call(Some(200), Some("body cut short"), b"").outcome(well_formed),
        Outcome::Reset
    );
    // Envoy: a call without headers was reset.
    assert_eq!(call(None, None, b"").outcome(well_formed), Outcome::Reset);
}

#[test]
fn a_called_answer_is_judged_by_its_status_and_body() {
    assert_eq!(
        call(Some(200), None, b"{}").outcome(well_formed),
        Outcome::Success(200)
    );
    assert_eq!(
        call(Some(200), None, b"<html>").outcome(well_formed),
        Outcome::Malformed
    );
    // A compressed answer is not read, so not judged malformed; an empty stream is.
    let mut c = call(Some(200), None, b"\x1f\x8b");
    c.encoded = true;
    assert_eq!(c.outcome(well_formed), Outcome::Success(200));
    let mut s = call(Some(200), None, b"");
    s.stream = true;
    assert_eq!(
        s.outcome(|_| panic!("a stream is not parsed")),
        Outcome::Malformed
    );
    let mut s = call(Some(200), None, b"data: {}\n\n");
    s.stream = true;
    assert_eq!(
        s.outcome(|_| panic!("a stream is not parsed")),
        Outcome::Success(200)
    );
}

#[test]
fn a_called_error_is_read_for_what_the_provider_said_unless_compressed() {
    let mut c = call(Some(503), None, br#"{"error":{"message":"overloaded"}}"#);
    c.retry_after = Some("2");
    let o = c.outcome(well_formed);
    assert_eq!(
        o,
        Outcome::Status {
            status: 503,
            retry_after_ms: Some(2000)
        }
    );
    assert!(c.says_why(o));
    c.encoded = true;
    assert!(!c.says_why(o));
    assert!(!c.says_why(Outcome::Timeout));
}
