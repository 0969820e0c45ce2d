//! Live provider health observed by the filter itself, shared by all workers.
//!
//! Per provider: consecutive failures, an error-rate EWMA, a time-to-first-byte EWMA, a
//! `Retry-After` window and a circuit (closed → open for a cooldown → half-open with one probe
//! → closed on the probe's success). Transitions are pure functions of (record, outcome, now);
//! the glue stores the whole table under one shared-data key with CAS.

use crate::config::Circuit;
use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

/// Smoothing factor of the EWMAs.
const ALPHA: f64 = 0.2;
/// Moves of the time-to-first-byte average smaller than this (or than 10 % of it) are noise,
/// not worth a shared write, ms.
const TTFB_NOISE_MS: f64 = 10.0;
/// Longest `Retry-After` honoured, ms.
pub const MAX_RETRY_AFTER_MS: u64 = 600_000;

/// Circuit state.
///
/// Stored as `{"s":"closed"}`, `{"s":"open","until":MS}` or `{"s":"half_open","until":MS}`,
/// through [`CircuitWire`] rather than serde's internally tagged enums, which buffer the
/// object before reading it (about 7 KB more `.wasm` for this one type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "CircuitWire", into = "CircuitWire")]
pub enum CircuitState {
    /// Normal.
    #[default]
    Closed,
    /// Kept out of rotation until `until` (ms).
    Open {
        /// End of the cooldown.
        until: u64,
    },
    /// One probe request in flight; others keep out until `until` (ms), when a new probe may go.
    HalfOpen {
        /// When the probe counts as lost.
        until: u64,
    },
}

/// The stored form of [`CircuitState`]: the state's name under `s`, its time under `until`.
#[derive(Clone, Copy, Serialize, Deserialize)]
struct CircuitWire {
    s: CircuitKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    until: Option<u64>,
}

/// The name of a circuit state.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum CircuitKind {
    Closed,
    Open,
    HalfOpen,
}

impl TryFrom<CircuitWire> for CircuitState {
    type Error = &'static str;
    fn try_from(w: CircuitWire) -> Result<Self, Self::Error> {
        match (w.s, w.until) {
            (CircuitKind::Closed, _) => Ok(CircuitState::Closed),
            (CircuitKind::Open, Some(until)) => Ok(CircuitState::Open { until }),
            (CircuitKind::HalfOpen, Some(until)) => Ok(CircuitState::HalfOpen { until }),
            (_, None) => Err("missing field `until`"),
        }
    }
}

impl From<CircuitState> for CircuitWire {
    fn from(c: CircuitState) -> Self {
        match c {
            CircuitState::Closed => CircuitWire {
                s: CircuitKind::Closed,
                until: None,
            },
            CircuitState::Open { until } => CircuitWire {
                s: CircuitKind::Open,
                until: Some(until),
            },
            CircuitState::HalfOpen { until } => CircuitWire {
                s: CircuitKind::HalfOpen,
                until: Some(until),
            },
        }
    }
}

/// Health of one provider.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProviderHealth {
    /// Failures since the last success.
    #[serde(rename = "f", default)]
    pub consecutive_failures: u32,
    /// Circuit.
    #[serde(rename = "c", default)]
    pub circuit: CircuitState,
    /// Kept out until this time (ms) because the provider said `Retry-After`.
    #[serde(rename = "ra", default)]
    pub retry_after_until: u64,
    /// EWMA of failures (1) and successes (0).
    #[serde(rename = "e", default)]
    pub error_rate: f64,
    /// EWMA of time to first byte of streaming answers, ms (0 = none yet).
    #[serde(rename = "l", default)]
    pub ttfb_ms: f64,
    /// Latency samples seen.
    #[serde(rename = "n", default)]
    pub samples: u32,
    /// Circuit openings so far.
    #[serde(rename = "o", default)]
    pub opens: u32,
}

/// The result of one attempt, as health sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observation {
    /// The provider answered well; `ttfb_ms` for streaming answers.
    Success {
        /// Time to first byte of a streaming answer.
        ttfb_ms: Option<f64>,
    },
    /// The provider failed; `retry_after_ms` when it said so.
    Failure {
        /// Requested back-off.
        retry_after_ms: Option<u64>,
    },
}

/// Whether a provider may be tried now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Yes.
    Open,
    /// Yes, as the single half-open probe (claim it first).
    Probe,
    /// No: circuit open until the given time.
    CircuitOpen(u64),
    /// No: another probe is in flight.
    ProbeInFlight,
    /// No: the provider asked to be left alone until the given time.
    RetryAfter(u64),
}

impl ProviderHealth {
    /// Whether the provider may be tried at `now`.
    pub fn admission(&self, now: u64) -> Admission {
        if self.retry_after_until > now {
            return Admission::RetryAfter(self.retry_after_until);
        }
        match self.circuit {
            CircuitState::Closed => Admission::Open,
            CircuitState::Open { until } if now < until => Admission::CircuitOpen(until),
            CircuitState::Open { .. } => Admission::Probe,
            CircuitState::HalfOpen { until } if now < until => Admission::ProbeInFlight,
            CircuitState::HalfOpen { .. } => Admission::Probe,
        }
    }

    /// Marks the probe as taken until `until`.
    pub fn claim_probe(&mut self, until: u64) {
        self.circuit = CircuitState::HalfOpen { until };
    }

    /// Applies an observation. Returns true when the change matters to other workers
    /// (anything but a routine success's latency drift) and should be written back.
    pub fn observe(&mut self, obs: Observation, now: u64, circuit: &Circuit) -> bool {
        match obs {
            Observation::Success { ttfb_ms } => {
                let was_clean = self.consecutive_failures == 0
                    && self.circuit == CircuitState::Closed
                    && self.error_rate < 0.01;
                self.consecutive_failures = 0;
                self.circuit = CircuitState::Closed;
                self.error_rate *= 1.0 - ALPHA;
                if self.error_rate < 1e-4 {
                    self.error_rate = 0.0;
                }
                let mut drift = false;
                if let Some(t) = ttfb_ms {
                    let before = self.ttfb_ms;
                    let first = self.samples == 0;
                    self.ttfb_ms = if first {
                        t
                    } else {
                        before + ALPHA * (t - before)
                    };
                    self.samples = self.samples.saturating_add(1);
                    drift =
                        first || (self.ttfb_ms - before).abs() > (0.1 * before).max(TTFB_NOISE_MS);
                }
                !was_clean || drift
            }
            Observation::Failure { retry_after_ms } => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.error_rate = self.error_rate * (1.0 - ALPHA) + ALPHA;
                if let Some(ra) = retry_after_ms {
                    self.retry_after_until =
                        self.retry_after_until.max(now + ra.min(MAX_RETRY_AFTER_MS));
                }
                let open = match self.circuit {
                    CircuitState::HalfOpen { .. } => true,
                    CircuitState::Open { .. } => true,
                    CircuitState::Closed => self.consecutive_failures >= circuit.failure_threshold,
                };
                if open {
                    if !matches!(self.circuit, CircuitState::Open { until } if until > now) {
                        self.opens = self.opens.saturating_add(1);
                    }
                    self.circuit = CircuitState::Open {
                        until: now + circuit.cooldown_ms,
                    };
                }
                true
            }
        }
    }
}

/// Health of every provider, keyed by provider name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthTable {
    /// Records by provider name; absent = healthy, no data.
    pub providers: HashMap<String, ProviderHealth>,
}

impl HealthTable {
    /// The record of `name` (default when absent).
    pub fn get(&self, name: &str) -> ProviderHealth {
        self.providers.get(name).cloned().unwrap_or_default()
    }

    /// Mutable record of `name`, created when absent.
    pub fn entry(&mut self, name: &str) -> &mut ProviderHealth {
        self.providers.entry_ref(name).or_default()
    }

    /// One worker's copy of the table: applies a success that other workers need not hear
    /// of (an admitted provider whose record stays clean, its time to first byte within noise
    /// of its average) and returns true. Anything else is left to the caller, who writes it to
    /// the shared table (false).
    pub fn observe_locally(
        &mut self,
        provider: &str,
        obs: Observation,
        now: u64,
        circuit: &Circuit,
    ) -> bool {
        let Observation::Success { ttfb_ms } = obs else {
            return false;
        };
        let current = self.providers.get(provider);
        if !current.is_none_or(|r| r.admission(now) == Admission::Open) {
            return false;
        }
        let mut rec = current.cloned().unwrap_or_default();
        if rec.observe(obs, now, circuit) {
            return false;
        }
        if ttfb_ms.is_some() {
            self.providers.insert(provider.to_string(), rec);
        }
        true
    }

    /// Shared-data encoding.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes; unreadable data counts as empty (healthy) rather than failing requests.
    pub fn decode(bytes: &[u8]) -> HealthTable {
        if bytes.is_empty() {
            return HealthTable::default();
        }
        serde_json::from_slice(bytes).unwrap_or_default()
    }
}

/// Parses a `Retry-After` header (delta-seconds only; HTTP dates are ignored) into ms.
pub fn parse_retry_after(v: &str) -> Option<u64> {
    let secs: u64 = v.trim().parse().ok()?;
    Some(secs.saturating_mul(1000).min(MAX_RETRY_AFTER_MS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuit_wire_format() {
        for (c, json) in [
            (CircuitState::Closed, r#"{"s":"closed"}"#),
            (CircuitState::Open { until: 9 }, r#"{"s":"open","until":9}"#),
            (
                CircuitState::HalfOpen { until: 5000 },
                r#"{"s":"half_open","until":5000}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&c).ok().as_deref(), Some(json));
            assert_eq!(serde_json::from_str::<CircuitState>(json).ok(), Some(c));
        }
        assert_eq!(
            serde_json::from_str::<CircuitState>(r#"{"until":3,"s":"open","x":1}"#).ok(),
            Some(CircuitState::Open { until: 3 })
        );
        assert!(serde_json::from_str::<CircuitState>(r#"{"s":"open"}"#).is_err());
        assert!(serde_json::from_str::<CircuitState>(r#"{"s":"ajar","until":1}"#).is_err());
    }

    const C: Circuit = Circuit {
        failure_threshold: 3,
        cooldown_ms: 1000,
    };
    const FAIL: Observation = Observation::Failure {
        retry_after_ms: None,
    };
    const OK: Observation = Observation::Success { ttfb_ms: None };

    #[test]
    fn circuit_opens_after_threshold_then_probes_then_closes() {
        let mut h = ProviderHealth::default();
        assert!(h.observe(FAIL, 0, &C));
        assert!(h.observe(FAIL, 1, &C));
        assert_eq!(h.admission(2), Admission::Open);
        h.observe(FAIL, 2, &C);
        assert_eq!(h.admission(3), Admission::CircuitOpen(1002));
        assert_eq!(h.opens, 1);
        assert_eq!(h.admission(1002), Admission::Probe);
        h.claim_probe(1500);
        assert_eq!(h.admission(1100), Admission::ProbeInFlight);
        // A lost probe frees the slot again.
        assert_eq!(h.admission(1500), Admission::Probe);
        assert!(h.observe(OK, 1200, &C));
        assert_eq!(h.admission(1201), Admission::Open);
        assert_eq!(h.consecutive_failures, 0);
    }

    #[test]
    fn failed_probe_reopens_for_a_full_cooldown() {
        let mut h = ProviderHealth {
            circuit: CircuitState::HalfOpen { until: 5000 },
            ..Default::default()
        };
        h.observe(FAIL, 4000, &C);
        assert_eq!(h.admission(4001), Admission::CircuitOpen(5000));
        assert_eq!(h.opens, 1);
    }

    #[test]
    fn retry_after_keeps_provider_out_and_is_capped() {
        let mut h = ProviderHealth::default();
        h.observe(
            Observation::Failure {
                retry_after_ms: Some(2000),
            },
            100,
            &C,
        );
        assert_eq!(h.admission(101), Admission::RetryAfter(2100));
        assert_eq!(h.admission(2100), Admission::Open);
        assert_eq!(parse_retry_after(" 3 "), Some(3000));
        assert_eq!(parse_retry_after("99999"), Some(MAX_RETRY_AFTER_MS));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn routine_success_is_not_worth_a_shared_write() {
        let mut h = ProviderHealth::default();
        assert!(!h.observe(OK, 0, &C));
        assert!(h.observe(
            Observation::Success {
                ttfb_ms: Some(100.0)
            },
            0,
            &C
        ));
        assert!(!h.observe(
            Observation::Success {
                ttfb_ms: Some(102.0)
            },
            0,
            &C
        ));
        // Sub-millisecond answers: the average barely moves in absolute terms.
        let mut quick = ProviderHealth::default();
        assert!(quick.observe(Observation::Success { ttfb_ms: Some(0.0) }, 0, &C));
        assert!(!quick.observe(Observation::Success { ttfb_ms: Some(1.0) }, 0, &C));
        // A real shift is shared.
        assert!(h.observe(
            Observation::Success {
                ttfb_ms: Some(400.0)
            },
            0,
            &C
        ));
        h.observe(FAIL, 0, &C);
        assert!(h.observe(OK, 0, &C), "recovery must be shared");
        assert!(h.error_rate > 0.0);
    }

    #[test]
    fn only_routine_successes_stay_local() {
        let mut t = HealthTable::default();
        let ttfb = |ms| Observation::Success { ttfb_ms: Some(ms) };
        // The first latency sample is news for every worker; a failure always is.
        assert!(!t.observe_locally("a", ttfb(100.0), 0, &C));
        assert!(!t.observe_locally("a", FAIL, 0, &C));
        assert!(t.providers.is_empty(), "left to the shared write");
        t.entry("a").observe(ttfb(100.0), 0, &C);
        assert!(t.observe_locally("a", ttfb(103.0), 0, &C));
        assert_eq!(t.get("a").samples, 2, "kept in this worker's copy");
        // A provider under an open circuit: its success closes it, which others must hear.
        for _ in 0..3 {
            t.entry("a").observe(FAIL, 0, &C);
        }
        assert!(!t.observe_locally("a", OK, 10, &C));
    }

    #[test]
    fn table_round_trips_and_tolerates_garbage() {
        let mut t = HealthTable::default();
        t.entry("a").observe(FAIL, 0, &C);
        let back = HealthTable::decode(&t.encode());
        assert_eq!(back, t);
        assert_eq!(HealthTable::decode(b"garbage"), HealthTable::default());
        assert_eq!(back.get("zzz"), ProviderHealth::default());
    }
}

#[cfg(test)]
#[path = "health_tests.rs"]
mod exact_tests;
