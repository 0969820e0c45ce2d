//! The per-request failover state machine: which provider next, whether an outcome is worth
//! another attempt, and the final answer when every attempt failed.
//!
//! Bounded by `failover.max_attempts`, the overall deadline and the ranked list; a provider is
//! never tried twice for one request.

use crate::config::{Config, Failover, RetryOn};
use crate::errors::ApiError;
use crate::health::Observation;
use crate::select::Candidate;
use std::fmt;

/// What one attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx with a usable answer.
    Success(u32),
    /// The provider answered with this non-2xx status.
    Status {
        /// HTTP status.
        status: u32,
        /// Parsed `Retry-After`, ms.
        retry_after_ms: Option<u64>,
    },
    /// Could not connect (refused, no healthy host, unknown cluster).
    ConnectFailure,
    /// Connection reset before a complete response.
    Reset,
    /// No answer within the attempt timeout.
    Timeout,
    /// 2xx whose body is not the JSON it should be.
    Malformed,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Success(s) => write!(f, "ok {s}"),
            Self::Status { status, .. } => write!(f, "status {status}"),
            Self::ConnectFailure => write!(f, "connect failure"),
            Self::Reset => write!(f, "reset"),
            Self::Timeout => write!(f, "timeout"),
            Self::Malformed => write!(f, "malformed answer"),
        }
    }
}

impl Outcome {
    /// Short label for metrics and headers.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Success(_) => "success",
            Self::Status { status: 429, .. } => "429",
            Self::Status { status, .. } if *status >= 500 => "5xx",
            Self::Status { .. } => "4xx",
            Self::ConnectFailure => "connect_failure",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
            Self::Malformed => "malformed",
        }
    }

    /// Whether `retry_on` (plus extra statuses) makes this outcome move on to the next provider.
    pub fn retryable(&self, retry_on: &RetryOn, extra_statuses: &[u32]) -> bool {
        match *self {
            Self::Success(_) => false,
            Self::Status { status, .. } => {
                extra_statuses.contains(&status)
                    || match status {
                        429 => retry_on.status_429,
                        500..=599 => retry_on.status_5xx,
                        400..=499 => retry_on.status_4xx,
                        _ => false,
                    }
            }
            Self::ConnectFailure => retry_on.connect_failure,
            Self::Reset => retry_on.reset,
            Self::Timeout => retry_on.timeout,
            Self::Malformed => retry_on.malformed,
        }
    }

    /// How health should record it; `None` for outcomes that say nothing about the provider
    /// (a client error such as 400 or 401).
    pub fn observation(&self, ttfb_ms: Option<f64>) -> Option<Observation> {
        match *self {
            Self::Success(_) => Some(Observation::Success { ttfb_ms }),
            Self::Status {
                status,
                retry_after_ms,
            } if status == 429 || status >= 500 => Some(Observation::Failure { retry_after_ms }),
            Self::Status { .. } => None,
            Self::ConnectFailure | Self::Reset | Self::Timeout | Self::Malformed => {
                Some(Observation::Failure {
                    retry_after_ms: None,
                })
            }
        }
    }

    /// Whether the outcome came from the provider's own answer (as opposed to the host's).
    pub fn from_provider(&self) -> bool {
        matches!(
            self,
            Self::Success(_) | Self::Status { .. } | Self::Malformed
        )
    }
}

/// Classifies a routed response from `:status` and Envoy's `response.code_details`.
pub fn classify_routed(
    status: u32,
    code_details: Option<&str>,
    retry_after: Option<&str>,
) -> Outcome {
    let retry_after_ms = retry_after.and_then(crate::health::parse_retry_after);
    match code_details {
        Some(d) if d != "via_upstream" => {
            if d.starts_with("upstream_reset_before_response_started") {
                let connect = [
                    "connection_failure",
                    "connect_error",
                    "connection_refused",
                    "Connection_refused",
                ];
                if connect.iter().any(|c| d.contains(c)) {
                    Outcome::ConnectFailure
                } else {
                    Outcome::Reset
                }
            } else if d.contains("timeout") {
                Outcome::Timeout
            } else if d == "cluster_not_found"
                || d == "no_healthy_upstream"
                || d.starts_with("upstream_connect")
            {
                Outcome::ConnectFailure
            } else if d.starts_with("upstream_reset") {
                Outcome::Reset
            } else {
                status_outcome(status, retry_after_ms)
            }
        }
        _ => status_outcome(status, retry_after_ms),
    }
}

/// Classifies the answer to a dispatched call. Envoy's async client reports connect failures
/// and timeouts as local replies with a plain-text body, and a reset as no headers at all.
pub fn classify_dispatched(status: Option<u32>, body: &[u8], retry_after: Option<&str>) -> Outcome {
    let Some(status) = status else {
        return Outcome::Reset;
    };
    let retry_after_ms = retry_after.and_then(crate::health::parse_retry_after);
    if status == 503 || status == 504 {
        let head = &body[..body.len().min(160)];
        let text = String::from_utf8_lossy(head);
        if text.starts_with("upstream request timeout") {
            return Outcome::Timeout;
        }
        if text.starts_with("upstream connect error") {
            let connect = [
                "connection failure",
                "connection_failure",
                "Connection refused",
                "connect error",
            ];
            let reason = text.split("reset reason:").nth(1).unwrap_or("");
            return if connect.iter().any(|c| reason.contains(c)) {
                Outcome::ConnectFailure
            } else {
                Outcome::Reset
            };
        }
        if text.starts_with("no healthy upstream") {
            return Outcome::ConnectFailure;
        }
    }
    status_outcome(status, retry_after_ms)
}

fn status_outcome(status: u32, retry_after_ms: Option<u64>) -> Outcome {
    if (200..300).contains(&status) {
        Outcome::Success(status)
    } else {
        Outcome::Status {
            status,
            retry_after_ms,
        }
    }
}

/// What the walk does after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The answer at hand goes to the client (a success, or a failure not worth retrying).
    Deliver,
    /// Try the next provider, if any is left.
    FailOver,
}

/// Attempts made so far for one request.
#[derive(Debug, Clone)]
pub struct Attempts {
    started_ms: u64,
    deadline_ms: u64,
    max_attempts: u32,
    attempt_timeout_ms: u64,
    /// (provider index, outcome) of finished attempts, in order.
    pub tried: Vec<(usize, Outcome)>,
    /// Provider of the attempt in flight.
    pub current: Option<usize>,
    /// The last attempt picked was given the rest of the deadline as its timeout.
    picked_to_deadline: bool,
    /// The attempt in flight runs to the deadline: its timeout is the deadline's.
    current_to_deadline: bool,
    /// An attempt that ran to the deadline timed out: the deadline is spent, whatever the
    /// clock says when its timeout is reported (a host timer may fire a millisecond early).
    deadline_spent: bool,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try this candidate (index into the ranking) with this timeout (ms).
    Try {
        /// Index into the ranked candidates.
        candidate: usize,
        /// Timeout for the attempt, ms.
        timeout_ms: u64,
    },
    /// Stop: attempts, candidates or time are used up.
    GiveUp,
}

impl Attempts {
    /// A request that started at `now_ms`.
    pub fn new(config: &Config, now_ms: u64) -> Self {
        Self {
            started_ms: now_ms,
            deadline_ms: now_ms + config.failover.deadline_ms,
            max_attempts: config.failover.max_attempts,
            attempt_timeout_ms: config.failover.attempt_timeout_ms,
            tried: Vec::new(),
            current: None,
            picked_to_deadline: false,
            current_to_deadline: false,
            deadline_spent: false,
        }
    }

    /// Number of attempts started.
    pub fn count(&self) -> usize {
        self.tried.len() + usize::from(self.current.is_some())
    }

    /// When the request started.
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    /// Picks the next candidate not tried yet, within attempts and deadline.
    pub fn next(&self, candidates: &[Candidate], now_ms: u64) -> Next {
        if self.count() >= self.max_attempts as usize
            || now_ms >= self.deadline_ms
            || self.deadline_spent
        {
            return Next::GiveUp;
        }
        let used = |p: usize| self.tried.iter().any(|(q, _)| *q == p) || self.current == Some(p);
        match candidates.iter().position(|c| !used(c.provider)) {
            Some(candidate) => Next::Try {
                candidate,
                timeout_ms: self
                    .attempt_timeout_ms
                    .min(self.deadline_ms - now_ms)
                    .max(1),
            },
            None => Next::GiveUp,
        }
    }

    /// Marks an attempt on `provider` as started, with the timeout the last `pick` gave.
    pub fn start(&mut self, provider: usize) {
        self.current = Some(provider);
        self.current_to_deadline = self.picked_to_deadline;
    }

    /// The attempt in flight is not bounded by the timeout `pick` gave (route mode's streaming
    /// first attempt, bounded by the route's own timeouts): its timeout says nothing about the
    /// deadline.
    pub fn unbounded(&mut self) {
        self.current_to_deadline = false;
    }

    /// Records the outcome of the attempt in flight. An attempt given the rest of the deadline
    /// that timed out spends it: no further attempt starts.
    pub fn finish(&mut self, outcome: Outcome) {
        if let Some(p) = self.current.take() {
            self.tried.push((p, outcome));
            if outcome == Outcome::Timeout && self.current_to_deadline {
                self.deadline_spent = true;
            }
        }
        self.current_to_deadline = false;
    }

    /// The answer when every attempt failed. When the last attempt got an error answer from its
    /// provider, its status is kept (a 429 stays a 429, a 503 a 503); otherwise 504 if all
    /// timed out, 503 if every provider was unavailable (connect failure, 503, 429), else 502.
    /// The message lists each attempt, then what the last provider said (`last_said`, already
    /// cleaned by `answer::provider_message`).
    pub fn final_error(&self, config: &Config, model: &str, last_said: Option<&str>) -> ApiError {
        let all = |f: &dyn Fn(&Outcome) -> bool| {
            !self.tried.is_empty() && self.tried.iter().all(|(_, o)| f(o))
        };
        let status = if let Some((_, Outcome::Status { status, .. })) = self.tried.last() {
            *status
        } else if all(&|o| *o == Outcome::Timeout) {
            504
        } else if all(&|o| {
            matches!(
                o,
                Outcome::ConnectFailure
                    | Outcome::Status {
                        status: 503 | 429,
                        ..
                    }
            )
        }) {
            503
        } else {
            502
        };
        let mut msg = format!(
            "all {} attempt(s) for model `{}` failed: ",
            self.tried.len(),
            crate::errors::clip(model, 200)
        );
        for (i, (p, o)) in self.tried.iter().enumerate() {
            if i > 0 {
                msg.push_str("; ");
            }
            let name = config.providers.get(*p).map_or("?", |p| p.name.as_str());
            msg.push_str(&format!("{name}: {o}"));
        }
        if let (Some(said), Some((p, _))) = (last_said, self.tried.last()) {
            let name = config.providers.get(*p).map_or("?", |p| p.name.as_str());
            msg.push_str(&format!("; {name} answered: {said}"));
        }
        ApiError::all_failed(status, msg)
    }

    /// The next attempt of the walk: (candidate index, timeout). A candidate that would be the
    /// half-open probe of an open circuit goes only when `claim_probe(provider)` wins the probe;
    /// when another request holds it, the candidate leaves `candidates` and the walk goes on.
    pub fn pick(
        &mut self,
        candidates: &mut Vec<Candidate>,
        now_ms: u64,
        mut claim_probe: impl FnMut(usize) -> bool,
    ) -> Option<(usize, u64)> {
        loop {
            match self.next(candidates, now_ms) {
                Next::GiveUp => return None,
                Next::Try {
                    candidate,
                    timeout_ms,
                } => {
                    let c = &candidates[candidate];
                    if c.probe && !claim_probe(c.provider) {
                        candidates.remove(candidate);
                        continue;
                    }
                    self.picked_to_deadline = now_ms + timeout_ms >= self.deadline_ms;
                    return Some((candidate, timeout_ms));
                }
            }
        }
    }

    /// Records the outcome of the attempt in flight (`ttfb_ms` for a streaming answer) and
    /// says what follows: what health should learn of the provider (none for an outcome that
    /// says nothing about it) and whether the answer goes to the client or the walk fails over.
    pub fn conclude(
        &mut self,
        outcome: Outcome,
        ttfb_ms: Option<f64>,
        failover: &Failover,
    ) -> (Option<Observation>, Step) {
        self.finish(outcome);
        let step = if outcome.retryable(&failover.retry_on, &failover.retry_on_status) {
            Step::FailOver
        } else {
            Step::Deliver
        };
        (outcome.observation(ttfb_ms), step)
    }

    /// Shortest `Retry-After` any attempt reported, in whole seconds.
    pub fn min_retry_after_s(&self) -> Option<u64> {
        self.tried
            .iter()
            .filter_map(|(_, o)| match o {
                Outcome::Status {
                    retry_after_ms: Some(ms),
                    ..
                } => Some(ms.div_ceil(1000)),
                _ => None,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::cand;

    fn config(extra: &str) -> Config {
        crate::test_support::config(4, extra)
    }

    #[test]
    fn routed_classification_uses_code_details() {
        let refused = "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}";
        assert_eq!(
            classify_routed(503, Some(refused), None),
            Outcome::ConnectFailure
        );
        assert_eq!(
            classify_routed(
                503,
                Some("upstream_reset_before_response_started{connection_termination}"),
                None
            ),
            Outcome::Reset
        );
        assert_eq!(
            classify_routed(504, Some("response_timeout"), None),
            Outcome::Timeout
        );
        assert_eq!(
            classify_routed(503, Some("cluster_not_found"), None),
            Outcome::ConnectFailure
        );
        assert_eq!(
            classify_routed(503, Some("via_upstream"), Some("2")),
            Outcome::Status {
                status: 503,
                retry_after_ms: Some(2000)
            }
        );
        assert_eq!(
            classify_routed(200, Some("via_upstream"), None),
            Outcome::Success(200)
        );
        assert_eq!(
            classify_routed(429, None, None),
            Outcome::Status {
                status: 429,
                retry_after_ms: None
            }
        );
    }

    #[test]
    fn dispatched_classification_reads_local_reply_bodies() {
        assert_eq!(classify_dispatched(None, b"", None), Outcome::Reset);
        assert_eq!(
            classify_dispatched(Some(504), b"upstream request timeout", None),
            Outcome::Timeout
        );
        assert_eq!(
            classify_dispatched(
                Some(503),
                b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: delayed connect error: Connection refused",
                None
            ),
            Outcome::ConnectFailure
        );
        assert_eq!(
            classify_dispatched(Some(503), b"upstream connect error or disconnect/reset before headers. reset reason: connection termination", None),
            Outcome::Reset
        );
        assert_eq!(
            classify_dispatched(Some(503), br#"{"error":{}}"#, Some("1")),
            Outcome::Status {
                status: 503,
                retry_after_ms: Some(1000)
            }
        );
        assert_eq!(
            classify_dispatched(Some(200), b"{}", None),
            Outcome::Success(200)
        );
    }

    #[test]
    fn retry_rules_follow_config() {
        let r = config("").failover.retry_on;
        assert!(Outcome::Status {
            status: 503,
            retry_after_ms: None
        }
        .retryable(&r, &[]));
        assert!(Outcome::Status {
            status: 429,
            retry_after_ms: None
        }
        .retryable(&r, &[]));
        assert!(!Outcome::Status {
            status: 400,
            retry_after_ms: None
        }
        .retryable(&r, &[]));
        assert!(!Outcome::Status {
            status: 401,
            retry_after_ms: None
        }
        .retryable(&r, &[]));
        assert!(Outcome::Status {
            status: 401,
            retry_after_ms: None
        }
        .retryable(&r, &[401]));
        assert!(Outcome::ConnectFailure.retryable(&r, &[]));
        assert!(!Outcome::Success(200).retryable(&r, &[]));
        let only_5xx = config(r#","failover":{"retry_on":["5xx"]}"#)
            .failover
            .retry_on;
        assert!(!Outcome::Timeout.retryable(&only_5xx, &[]));
        assert!(!Outcome::Status {
            status: 429,
            retry_after_ms: None
        }
        .retryable(&only_5xx, &[]));
    }

    #[test]
    fn client_errors_do_not_count_against_the_provider() {
        assert_eq!(
            Outcome::Status {
                status: 400,
                retry_after_ms: None
            }
            .observation(None),
            None
        );
        assert_eq!(
            Outcome::Status {
                status: 429,
                retry_after_ms: Some(5)
            }
            .observation(None),
            Some(Observation::Failure {
                retry_after_ms: Some(5)
            })
        );
    }

    #[test]
    fn walk_is_bounded_by_attempts_and_never_repeats_a_provider() {
        let c = config("");
        let cands: Vec<Candidate> = (0..4).map(cand).collect();
        let mut a = Attempts::new(&c, 0);
        let mut seen = Vec::new();
        while let Next::Try { candidate, .. } = a.next(&cands, 10) {
            let p = cands[candidate].provider;
            assert!(!seen.contains(&p));
            seen.push(p);
            a.start(p);
            a.finish(Outcome::ConnectFailure);
        }
        assert_eq!(seen, vec![0, 1, 2], "max_attempts 3");
        let e = a.final_error(&c, "m", None);
        assert_eq!(e.status, 503);
        assert!(
            e.message
                .contains("a: connect failure; b: connect failure; c: connect failure"),
            "{}",
            e.message
        );
    }

    #[test]
    fn deadline_caps_the_attempt_timeout_and_stops_the_walk() {
        let c = config(r#","failover":{"attempt_timeout_ms":1000,"deadline_ms":1500}"#);
        let cands: Vec<Candidate> = (0..4).map(cand).collect();
        let mut a = Attempts::new(&c, 0);
        assert_eq!(
            a.next(&cands, 0),
            Next::Try {
                candidate: 0,
                timeout_ms: 1000
            }
        );
        a.start(0);
        a.finish(Outcome::Timeout);
        assert_eq!(
            a.next(&cands, 1000),
            Next::Try {
                candidate: 1,
                timeout_ms: 500
            }
        );
        a.start(1);
        a.finish(Outcome::Timeout);
        assert_eq!(a.next(&cands, 1500), Next::GiveUp);
        assert_eq!(a.final_error(&c, "m", None).status, 504);
    }

    #[test]
    fn pick_claims_probes_and_conclude_decides_the_next_step() {
        let c = config("");
        let mut cands: Vec<Candidate> = (0..3).map(cand).collect();
        cands[0].probe = true;
        cands[1].probe = true;
        let mut a = Attempts::new(&c, 0);
        // 0's probe is taken by another request: it leaves the list; 1's is won.
        let mut asked = Vec::new();
        let picked = a.pick(&mut cands, 0, |p| {
            asked.push(p);
            p == 1
        });
        assert_eq!(picked, Some((0, c.failover.attempt_timeout_ms)));
        assert_eq!(asked, [0, 1]);
        assert_eq!(cands.iter().map(|c| c.provider).collect::<Vec<_>>(), [1, 2]);
        a.start(1);
        let (obs, step) = a.conclude(
            Outcome::Status {
                status: 503,
                retry_after_ms: None,
            },
            None,
            &c.failover,
        );
        assert_eq!(step, Step::FailOver);
        assert!(matches!(obs, Some(Observation::Failure { .. })));
        assert_eq!(a.tried.len(), 1);
        a.start(2);
        let (obs, step) = a.conclude(Outcome::Success(200), Some(120.0), &c.failover);
        assert_eq!(step, Step::Deliver);
        assert_eq!(
            obs,
            Some(Observation::Success {
                ttfb_ms: Some(120.0)
            })
        );
        // A client error is delivered as it is and tells health nothing.
        let mut b = Attempts::new(&c, 0);
        b.start(0);
        let (obs, step) = b.conclude(
            Outcome::Status {
                status: 400,
                retry_after_ms: None,
            },
            None,
            &c.failover,
        );
        assert_eq!((obs, step), (None, Step::Deliver));
    }

    #[test]
    fn mixed_failures_are_a_bad_gateway_and_retry_after_is_kept() {
        let c = config("");
        let mut a = Attempts::new(&c, 0);
        a.start(0);
        a.finish(Outcome::Status {
            status: 429,
            retry_after_ms: Some(2500),
        });
        a.start(1);
        a.finish(Outcome::Malformed);
        assert_eq!(a.final_error(&c, "m", None).status, 502);
        assert_eq!(a.min_retry_after_s(), Some(3));
    }

    #[test]
    fn the_last_providers_answer_is_kept() {
        let c = config("");
        let mut a = Attempts::new(&c, 0);
        a.start(0);
        a.finish(Outcome::Status {
            status: 503,
            retry_after_ms: Some(9000),
        });
        a.start(1);
        a.finish(Outcome::Status {
            status: 429,
            retry_after_ms: Some(1200),
        });
        let e = a.final_error(&c, "m", Some("Rate limit reached"));
        assert_eq!(e.status, 429, "the last provider's status");
        assert_eq!(e.code, "all_providers_failed");
        assert_eq!(
            e.message,
            "all 2 attempt(s) for model `m` failed: a: status 503; b: status 429; b answered: Rate limit reached"
        );
        // Retry-After: the soonest any provider sent (here the last one's).
        assert_eq!(a.min_retry_after_s(), Some(2));
        // A last attempt that got no answer: the summary's status, and nothing said.
        a.start(2);
        a.finish(Outcome::Timeout);
        let e = a.final_error(&c, "m", None);
        assert_eq!(e.status, 502);
        assert!(!e.message.contains("answered"), "{}", e.message);
        assert_eq!(a.min_retry_after_s(), Some(2), "the shortest reported");
    }
}

#[cfg(test)]
#[path = "attempt_tests.rs"]
mod exact_tests;
