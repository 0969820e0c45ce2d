//! The failover walk of one request as a state machine: events in (an attempt started, the
//! host refused to start it, an attempt's outcome), effects out (what health, the counters, the
//! market report and session affinity learn), and a verdict on the answer at hand.
//!
//! The filter's HTTP context feeds it host callbacks and carries out its effects with host
//! calls; the market simulator (`tools/src/sim`) drives the same walk, so what it measures is
//! the algorithm that ships. Time is a parameter; claiming a half-open probe is the caller's
//! (it takes the shared health table).

use crate::attempt::{Attempts, Outcome, Step};
use crate::config::Failover;
use crate::health::Observation;
use crate::metrics::{Global, PerProvider};
use crate::select::Ranking;

/// The next attempt the walk wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// Index into the ranking's candidates.
    pub candidate: usize,
    /// Provider index in the configuration.
    pub provider: usize,
    /// Timeout for the attempt, ms.
    pub timeout_ms: u64,
}

/// What the walk asks its host to do, in the order given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Effect {
    /// Health learns what the attempt showed about the provider.
    Observe {
        /// Provider index.
        provider: usize,
        /// What was seen.
        observation: Observation,
    },
    /// The market report notes the attempt (`ttfb_ms` for a streaming answer).
    Tally {
        /// Provider index.
        provider: usize,
        /// The attempt's outcome.
        outcome: Outcome,
        /// Time to first byte, ms.
        ttfb_ms: Option<u64>,
    },
    /// A per-provider counter goes up by one.
    Count {
        /// Provider index.
        provider: usize,
        /// Which counter.
        counter: PerProvider,
    },
    /// A global counter goes up by one.
    CountGlobal(Global),
    /// The market report notes an answer that broke off after it began to reach the client.
    TallyBroken {
        /// Provider index.
        provider: usize,
    },
    /// The session (if any) is pinned to the provider that answered.
    Remember {
        /// Provider index.
        provider: usize,
    },
}

/// What becomes of the answer at hand after an attempt's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It goes to the client (a success, or a failure not worth retrying).
    Deliver,
    /// The walk fails over: the caller starts the next attempt (`Walk::next`), or answers the
    /// final error when none is left.
    FailOver,
    /// A timed-out attempt on a host that cannot dispatch again after a timed-out call: the
    /// walk stops with the final error.
    Stop,
}

/// One request's walk: its ranking, the attempts so far, and when the one in flight started.
/// Empty (`ranking`, `attempts` `None`) until the request is ranked.
#[derive(Debug, Clone, Default)]
pub struct Walk {
    /// Ranked candidates, primary first (probes another request holds are dropped as met).
    pub ranking: Option<Ranking>,
    /// Attempts so far.
    pub attempts: Option<Attempts>,
    /// When the attempt in flight started, ms.
    pub attempt_started_ms: u64,
}

impl Walk {
    /// A ranked request: the walk starts from `ranking` with the attempt budget of `attempts`.
    pub fn begin(&mut self, ranking: Ranking, attempts: Attempts) {
        self.ranking = Some(ranking);
        self.attempts = Some(attempts);
    }

    /// The next attempt, within attempts, candidates and deadline; a candidate that would be
    /// the half-open probe of an open circuit goes only when `claim_probe(provider)` wins it.
    /// `None` when the walk is used up (or not begun).
    pub fn next(&mut self, now_ms: u64, claim_probe: impl FnMut(usize) -> bool) -> Option<Attempt> {
        let (ranking, attempts) = (self.ranking.as_mut()?, self.attempts.as_mut()?);
        let (candidate, timeout_ms) =
            attempts.pick(&mut ranking.candidates, now_ms, claim_probe)?;
        Some(Attempt {
            candidate,
            provider: ranking.candidates[candidate].provider,
            timeout_ms,
        })
    }

    /// The attempt in flight is bounded by the host's own timeouts, not by the one `next`
    /// gave (route mode's streaming first attempt): its timeout does not spend the deadline.
    pub fn unbounded(&mut self) {
        if let Some(a) = self.attempts.as_mut() {
            a.unbounded();
        }
    }

    /// Event: the attempt on `provider` left at `now_ms` (or was handed to the host to send).
    pub fn started(&mut self, provider: usize, now_ms: u64, mut out: impl FnMut(Effect)) {
        let Some(attempts) = self.attempts.as_mut() else {
            return;
        };
        out(Effect::Count {
            provider,
            counter: PerProvider::Attempts,
        });
        attempts.start(provider);
        self.attempt_started_ms = now_ms;
    }

    /// Event: the host refused to start the attempt in flight (a dispatch it would not make):
    /// a connect failure, counted as a failover; the caller goes on with `next`.
    pub fn refused(&mut self, mut out: impl FnMut(Effect)) {
        let Some(attempts) = self.attempts.as_mut() else {
            return;
        };
        let Some(provider) = attempts.current else {
            return;
        };
        attempts.finish(Outcome::ConnectFailure);
        out(Effect::Tally {
            provider,
            outcome: Outcome::ConnectFailure,
            ttfb_ms: None,
        });
        out(Effect::Count {
            provider,
            counter: PerProvider::Failure,
        });
        out(Effect::Count {
            provider,
            counter: PerProvider::Failover,
        });
        out(Effect::Observe {
            provider,
            observation: Observation::Failure {
                retry_after_ms: None,
            },
        });
    }

    /// Event: the request ended (`on_log`) with its answer broken off: `delivered`, after the
    /// walk delivered it (a stream or an unheld answer: the client has bytes already, nothing
    /// can be replayed), else while a 2xx was held (the host answered the client itself).
    /// Gives the provider that broke off; `None` when there was none.
    pub fn broke_off(&mut self, delivered: bool, mut out: impl FnMut(Effect)) -> Option<usize> {
        let attempts = self.attempts.as_mut()?;
        let failure = |provider| Effect::Count {
            provider,
            counter: PerProvider::Failure,
        };
        let observe = |provider| Effect::Observe {
            provider,
            observation: Observation::Failure {
                retry_after_ms: None,
            },
        };
        if delivered {
            out(Effect::CountGlobal(Global::StreamFailedMidway));
            let provider = attempts.tried.last()?.0;
            out(failure(provider));
            out(Effect::TallyBroken { provider });
            out(observe(provider));
            return Some(provider);
        }
        let provider = attempts.current?;
        attempts.finish(Outcome::Reset);
        out(failure(provider));
        out(Effect::Tally {
            provider,
            outcome: Outcome::Reset,
            ttfb_ms: None,
        });
        out(observe(provider));
        Some(provider)
    }

    /// Event: the attempt in flight ended with `outcome` at `now_ms` (`stream`: the request
    /// asked for a stream, so its time to first byte counts). Says what becomes of the answer
    /// at hand; `None` when no attempt was in flight. `redispatch_after_timeout` is the
    /// host's: whether it can dispatch again after a timed-out call.
    pub fn answered(
        &mut self,
        outcome: Outcome,
        now_ms: u64,
        stream: bool,
        failover: &Failover,
        redispatch_after_timeout: bool,
        mut out: impl FnMut(Effect),
    ) -> Option<Verdict> {
        let attempts = self.attempts.as_mut()?;
        let provider = attempts.current?;
        let ttfb = stream.then(|| now_ms.saturating_sub(self.attempt_started_ms) as f64);
        out(Effect::Tally {
            provider,
            outcome,
            ttfb_ms: ttfb.map(|t| t as u64),
        });
        let (observation, step) = attempts.conclude(outcome, ttfb, failover);
        if let Some(observation) = observation {
            out(Effect::Observe {
                provider,
                observation,
            });
        }
        if let Outcome::Success(_) = outcome {
            out(Effect::Count {
                provider,
                counter: PerProvider::Success,
            });
            if attempts.tried.len() > 1 {
                out(Effect::CountGlobal(Global::RecoveredByFailover));
            }
            out(Effect::Remember { provider });
            return Some(Verdict::Deliver);
        }
        if matches!(observation, Some(Observation::Failure { .. })) {
            out(Effect::Count {
                provider,
                counter: PerProvider::Failure,
            });
        }
        if step == Step::Deliver {
            return Some(Verdict::Deliver);
        }
        if outcome == Outcome::Timeout && !redispatch_after_timeout {
            return Some(Verdict::Stop);
        }
        out(Effect::Count {
            provider,
            counter: PerProvider::Failover,
        });
        Some(Verdict::FailOver)
    }
}

#[cfg(test)]
#[path = "walk_tests.rs"]
mod tests;
