//! What this gateway saw of each (provider, model) since its last report to the market
//! service (`POST /v1/market/reports`): attempts, successes, failures by kind, 429s with the
//! longest Retry-After, and a time-to-first-byte histogram.
//!
//! The request path only adds to a tally in VM memory (no host call). The root context's tick
//! merges that tally into the process-wide one in shared data (one CAS write per tick, only
//! when there is something new), and the VM holding the market refresh slot takes the
//! process-wide tally and posts it, so one report per period per process. Bounded: at most
//! [`MAX_KEYS`] (provider, model) pairs (further pairs are counted in `dropped`), model
//! names clipped to [`MAX_MODEL_BYTES`].

use crate::attempt::Outcome;
use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

/// Upper bounds (ms) of the TTFB buckets (the market service's `TTFB_BOUNDS_MS`); one more
/// bucket holds everything above.
pub const TTFB_BOUNDS_MS: [u64; 7] = [100, 250, 500, 1000, 2500, 5000, 10000];
/// Number of histogram buckets.
pub const BUCKETS: usize = TTFB_BOUNDS_MS.len() + 1;
/// Most (provider, model) pairs per tally.
pub const MAX_KEYS: usize = 256;
/// Longest model name kept.
pub const MAX_MODEL_BYTES: usize = 128;
/// Failure kinds, in `Tally::failures` order (the labels of [`Outcome::label`]).
pub const FAILURE_KINDS: [&str; 5] = ["5xx", "connect_failure", "reset", "timeout", "malformed"];

/// One (provider, model).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Attempts with an outcome.
    #[serde(rename = "a", default)]
    pub attempts: u64,
    /// 2xx answers.
    #[serde(rename = "s", default)]
    pub successes: u64,
    /// Failures by [`FAILURE_KINDS`].
    #[serde(rename = "f", default)]
    pub failures: [u64; 5],
    /// 429 answers.
    #[serde(rename = "r", default)]
    pub rate_limited: u64,
    /// Longest Retry-After seen, ms.
    #[serde(rename = "w", default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// TTFB histogram.
    #[serde(rename = "h", default)]
    pub hist: [u64; BUCKETS],
    /// Failures since the last success (429s apart): how the period ended, which the totals
    /// do not tell (a provider that went down mid-period).
    #[serde(rename = "l", default)]
    pub tail_failures: u64,
}

impl Tally {
    /// Adds `o`, the newer of the two.
    fn merge(&mut self, o: &Tally) {
        self.tail_failures = if o.successes > 0 {
            o.tail_failures
        } else {
            self.tail_failures + o.tail_failures
        };
        self.attempts += o.attempts;
        self.successes += o.successes;
        for (a, b) in self.failures.iter_mut().zip(o.failures) {
            *a += b;
        }
        self.rate_limited += o.rate_limited;
        self.retry_after_ms = self.retry_after_ms.max(o.retry_after_ms);
        for (a, b) in self.hist.iter_mut().zip(o.hist) {
            *a += b;
        }
    }
}

/// Tallies by (provider, model).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tallies {
    /// `provider\u{0}model` → tally.
    #[serde(rename = "t", default)]
    pub by_key: HashMap<String, Tally>,
    /// Observations left out for want of room.
    #[serde(rename = "d", default)]
    pub dropped: u64,
}

fn bucket(ttfb_ms: u64) -> usize {
    TTFB_BOUNDS_MS
        .iter()
        .position(|b| ttfb_ms <= *b)
        .unwrap_or(BUCKETS - 1)
}

fn key(provider: &str, model: &str) -> String {
    format!(
        "{provider}\u{0}{}",
        crate::errors::clip(model, MAX_MODEL_BYTES)
    )
}

impl Tallies {
    /// Whether there is nothing to report.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty() && self.dropped == 0
    }

    fn slot(&mut self, k: String) -> Option<&mut Tally> {
        if !self.by_key.contains_key(&k) && self.by_key.len() >= MAX_KEYS {
            self.dropped += 1;
            return None;
        }
        Some(self.by_key.entry(k).or_default())
    }

    /// Records one attempt's outcome (`ttfb_ms` for an answer whose first byte was timed).
    /// 4xx other than 429 say nothing about the provider and are left out.
    pub fn record(&mut self, provider: &str, model: &str, outcome: &Outcome, ttfb_ms: Option<u64>) {
        let kind = match outcome {
            Outcome::Success(_) => None,
            Outcome::Status { status: 429, .. } => Some(usize::MAX),
            Outcome::Status { status, .. } if *status >= 500 => Some(0),
            Outcome::Status { .. } => return,
            Outcome::ConnectFailure => Some(1),
            Outcome::Reset => Some(2),
            Outcome::Timeout => Some(3),
            Outcome::Malformed => Some(4),
        };
        let Some(t) = self.slot(key(provider, model)) else {
            return;
        };
        t.attempts += 1;
        match kind {
            None => {
                t.successes += 1;
                t.tail_failures = 0;
                if let Some(ms) = ttfb_ms {
                    t.hist[bucket(ms)] += 1;
                }
            }
            Some(usize::MAX) => t.rate_limited += 1,
            Some(i) => {
                if let Some(f) = t.failures.get_mut(i) {
                    *f += 1;
                    t.tail_failures += 1;
                }
            }
        }
        if let Outcome::Status {
            retry_after_ms: Some(ra),
            ..
        } = outcome
        {
            t.retry_after_ms = t.retry_after_ms.max(Some(*ra));
        }
    }

    /// Records that a stream already counted as a success broke off mid-body: the success
    /// becomes a `reset` failure of the same attempt (if it has not been merged away yet).
    pub fn broke_off(&mut self, provider: &str, model: &str) {
        let Some(t) = self.slot(key(provider, model)) else {
            return;
        };
        if t.successes > 0 {
            t.successes -= 1;
        } else {
            t.attempts += 1;
        }
        t.failures[2] += 1;
        t.tail_failures += 1;
    }

    /// Adds `other` in (bounded the same way).
    pub fn merge(&mut self, other: &Tallies) {
        self.dropped += other.dropped;
        for (k, t) in &other.by_key {
            if let Some(mine) = self.slot(k.clone()) {
                mine.merge(t);
            }
        }
    }

    /// Shared-data encoding.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes; unreadable data counts as empty.
    pub fn decode(bytes: &[u8]) -> Tallies {
        if bytes.is_empty() {
            return Tallies::default();
        }
        serde_json::from_slice(bytes).unwrap_or_default()
    }

    /// The report body the market service takes.
    pub fn report_json(&self) -> Vec<u8> {
        let observations: Vec<serde_json::Value> = self
            .by_key
            .iter()
            .map(|(k, t)| {
                let (provider, model) = k.split_once('\u{0}').unwrap_or((k.as_str(), ""));
                let failures: serde_json::Map<String, serde_json::Value> = FAILURE_KINDS
                    .iter()
                    .zip(t.failures)
                    .filter(|(_, n)| *n > 0)
                    .map(|(k, n)| ((*k).to_string(), n.into()))
                    .collect();
                serde_json::json!({
                    "provider": provider, "model": model, "attempts": t.attempts,
                    "successes": t.successes, "failures": failures,
                    "rate_limited": t.rate_limited, "retry_after_ms": t.retry_after_ms,
                    "ttfb_hist": t.hist, "tail_failures": t.tail_failures,
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "version": 1, "dropped": self.dropped, "observations": observations,
        }))
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_by_kind_and_keeps_429s_apart() {
        let mut t = Tallies::default();
        t.record("a", "m", &Outcome::Success(200), Some(120));
        t.record("a", "m", &Outcome::Success(200), None);
        t.record("a", "m", &Outcome::ConnectFailure, None);
        t.record(
            "a",
            "m",
            &Outcome::Status {
                status: 429,
                retry_after_ms: Some(3000),
            },
            None,
        );
        t.record(
            "a",
            "m",
            &Outcome::Status {
                status: 503,
                retry_after_ms: None,
            },
            None,
        );
        t.record(
            "a",
            "m",
            &Outcome::Status {
                status: 400,
                retry_after_ms: None,
            },
            None,
        );
        let a = &t.by_key[&key("a", "m")];
        assert_eq!(a.attempts, 5);
        assert_eq!(a.successes, 2);
        assert_eq!(a.failures, [1, 1, 0, 0, 0]);
        assert_eq!(a.rate_limited, 1);
        assert_eq!(a.retry_after_ms, Some(3000));
        assert_eq!(a.hist[1], 1);
        let doc: serde_json::Value = serde_json::from_slice(&t.report_json()).unwrap();
        assert_eq!(doc["version"], 1);
        let o = &doc["observations"][0];
        assert_eq!(o["provider"], "a");
        assert_eq!(o["model"], "m");
        assert_eq!(o["failures"]["5xx"], 1);
        assert_eq!(o["failures"]["connect_failure"], 1);
        assert_eq!(o["ttfb_hist"].as_array().unwrap().len(), BUCKETS);
    }

    #[test]
    fn merge_round_trips_and_stays_bounded() {
        let mut a = Tallies::default();
        for i in 0..MAX_KEYS + 3 {
            a.record(&format!("p{i}"), "m", &Outcome::Timeout, None);
        }
        assert_eq!(a.by_key.len(), MAX_KEYS);
        assert_eq!(a.dropped, 3);
        let mut b = Tallies::decode(&a.encode());
        assert_eq!(b, a);
        b.merge(&a);
        assert_eq!(b.by_key[&key("p0", "m")].failures[3], 2);
        assert_eq!(b.dropped, 6);
        assert_eq!(Tallies::decode(b"junk"), Tallies::default());
        assert!(a.encode().len() < 64 * 1024);
    }

    #[test]
    fn a_broken_stream_is_one_failed_attempt() {
        let mut t = Tallies::default();
        t.record("a", "m", &Outcome::Success(200), Some(50));
        t.broke_off("a", "m");
        let a = &t.by_key[&key("a", "m")];
        assert_eq!((a.attempts, a.successes, a.failures[2]), (1, 0, 1));
    }

    #[test]
    fn buckets_match_the_bounds() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(100), 0);
        assert_eq!(bucket(101), 1);
        assert_eq!(bucket(10_001), BUCKETS - 1);
    }

    #[test]
    fn the_tail_says_how_the_period_ended() {
        let fail = Outcome::Status {
            status: 503,
            retry_after_ms: None,
        };
        let mut older = Tallies::default();
        for _ in 0..5 {
            older.record("a", "m", &Outcome::Success(200), None);
        }
        older.record("a", "m", &fail, None);
        older.record("a", "m", &fail, None);
        assert_eq!(older.by_key[&key("a", "m")].tail_failures, 2);
        // A 429 is no failure of the provider's health: the tail stays.
        older.record(
            "a",
            "m",
            &Outcome::Status {
                status: 429,
                retry_after_ms: None,
            },
            None,
        );
        assert_eq!(older.by_key[&key("a", "m")].tail_failures, 2);
        // Merged with newer failures only, the streak goes on; with a newer success it is
        // that tally's own tail.
        let mut newer = Tallies::default();
        newer.record("a", "m", &Outcome::Timeout, None);
        let mut m = older.clone();
        m.merge(&newer);
        assert_eq!(m.by_key[&key("a", "m")].tail_failures, 3);
        newer.record("a", "m", &Outcome::Success(200), None);
        let mut m = older.clone();
        m.merge(&newer);
        assert_eq!(m.by_key[&key("a", "m")].tail_failures, 0);
        let doc: serde_json::Value = serde_json::from_slice(&older.report_json()).unwrap();
        assert_eq!(doc["observations"][0]["tail_failures"], 2);
    }

    fn status(status: u32, retry_after_ms: Option<u64>) -> Outcome {
        Outcome::Status {
            status,
            retry_after_ms,
        }
    }

    /// One (provider, model) with every field of its tally different from the others, so a
    /// field swapped, dropped or miscounted shows.
    fn busy() -> Tallies {
        let mut t = Tallies::default();
        // One answer per TTFB bucket edge and one past the last (8 successes), one untimed.
        for ms in [100, 250, 500, 1000, 2500, 5000, 10_000, 10_001, 101, 4999] {
            t.record("p", "m", &Outcome::Success(200), Some(ms));
        }
        t.record("p", "m", &Outcome::Success(201), None);
        t.record("p", "m", &status(429, Some(2000)), None);
        t.record("p", "m", &status(429, None), None);
        t.record("p", "m", &status(503, Some(1000)), None);
        t.record("p", "m", &status(500, None), None);
        // A 4xx other than 429 says nothing about the provider: not counted at all.
        t.record("p", "m", &status(499, Some(9000)), None);
        t.record("p", "m", &status(404, None), None);
        t.record("p", "m", &Outcome::ConnectFailure, None);
        t.record("p", "m", &Outcome::Reset, None);
        t.record("p", "m", &Outcome::Reset, None);
        t.record("p", "m", &Outcome::Reset, None);
        t.record("p", "m", &Outcome::Timeout, None);
        t.record("p", "m", &Outcome::Timeout, None);
        t.record("p", "m", &Outcome::Timeout, None);
        t.record("p", "m", &Outcome::Timeout, None);
        t
    }

    #[test]
    fn every_field_of_the_report_body_is_the_tallys_own() {
        let t = busy();
        let a = &t.by_key[&key("p", "m")];
        let want = Tally {
            attempts: 11 + 2 + 2 + 1 + 3 + 4,
            successes: 11,
            failures: [2, 1, 3, 4, 0],
            rate_limited: 2,
            retry_after_ms: Some(2000),
            hist: [1, 2, 1, 1, 1, 2, 1, 1],
            tail_failures: 10,
        };
        assert_eq!(a, &want);
        let doc: serde_json::Value = serde_json::from_slice(&t.report_json()).unwrap();
        // The whole body (object members compare without regard to order): failure kinds
        // with no count are left out, the histogram has one more bucket than bounds.
        assert_eq!(
            doc,
            serde_json::json!({
                "version": 1, "dropped": 0,
                "observations": [{
                    "provider": "p", "model": "m", "attempts": 23, "successes": 11,
                    "failures": {"5xx": 2, "connect_failure": 1, "reset": 3, "timeout": 4},
                    "rate_limited": 2, "retry_after_ms": 2000,
                    "ttfb_hist": [1, 2, 1, 1, 1, 2, 1, 1], "tail_failures": 10,
                }],
            })
        );
        let mut m = Tallies::default();
        m.record("q", "", &Outcome::Malformed, None);
        m.dropped = 7;
        let doc: serde_json::Value = serde_json::from_slice(&m.report_json()).unwrap();
        assert_eq!(
            doc,
            serde_json::json!({
                "version": 1, "dropped": 7,
                "observations": [{
                    "provider": "q", "model": "", "attempts": 1, "successes": 0,
                    "failures": {"malformed": 1}, "rate_limited": 0, "retry_after_ms": null,
                    "ttfb_hist": [0, 0, 0, 0, 0, 0, 0, 0], "tail_failures": 1,
                }],
            })
        );
        let doc: serde_json::Value =
            serde_json::from_slice(&Tallies::default().report_json()).unwrap();
        assert_eq!(
            doc,
            serde_json::json!({"version": 1, "dropped": 0, "observations": []})
        );
    }

    #[test]
    fn the_shared_data_encoding_is_short_keys_in_a_fixed_order() {
        let mut t = Tallies::default();
        t.record("p", "m", &Outcome::Success(200), Some(300));
        t.record("p", "m", &status(429, Some(1500)), None);
        t.record("p", "m", &Outcome::Reset, None);
        t.dropped = 4;
        assert_eq!(
            String::from_utf8(t.encode()).unwrap(),
            r#"{"t":{"p\u0000m":{"a":3,"s":1,"f":[0,0,1,0,0],"r":1,"w":1500,"h":[0,0,1,0,0,0,0,0],"l":1}},"d":4}"#
        );
        assert_eq!(Tallies::decode(&t.encode()), t);
        // No Retry-After seen: the member is left out, and read back as none.
        let mut n = Tallies::default();
        n.record("p", "m", &Outcome::Timeout, None);
        assert_eq!(
            String::from_utf8(n.encode()).unwrap(),
            r#"{"t":{"p\u0000m":{"a":1,"s":0,"f":[0,0,0,1,0],"r":0,"h":[0,0,0,0,0,0,0,0],"l":1}},"d":0}"#
        );
        assert_eq!(Tallies::decode(&n.encode()), n);
        assert_eq!(Tallies::decode(b""), Tallies::default());
        // Members left out read as zero.
        let sparse = Tallies::decode(br#"{"t":{"p\u0000m":{"a":2}}}"#);
        assert_eq!(sparse.by_key[&key("p", "m")].attempts, 2);
        assert_eq!(sparse.by_key[&key("p", "m")].hist, [0; BUCKETS]);
        assert_eq!(sparse.dropped, 0);
    }

    #[test]
    fn merging_adds_every_count_and_keeps_the_longest_retry_after() {
        let mut older = busy();
        let mut newer = Tallies::default();
        newer.record("p", "m", &Outcome::Success(200), Some(50));
        newer.record("p", "m", &Outcome::Success(200), Some(20_000));
        newer.record("p", "m", &Outcome::Success(200), Some(20_000));
        newer.record("p", "m", &status(429, Some(500)), None);
        newer.record("p", "m", &status(502, None), None);
        newer.record("p", "m", &Outcome::Malformed, None);
        newer.record("p", "m", &Outcome::Malformed, None);
        newer.record("p", "m", &Outcome::Malformed, None);
        newer.record("other", "m", &Outcome::Reset, None);
        newer.dropped = 5;
        older.dropped = 2;
        older.merge(&newer);
        assert_eq!(
            older.by_key[&key("p", "m")],
            Tally {
                attempts: 23 + 8,
                successes: 11 + 3,
                failures: [3, 1, 3, 4, 3],
                rate_limited: 3,
                retry_after_ms: Some(2000),
                hist: [2, 2, 1, 1, 1, 2, 1, 3],
                // The newer tally has a success: its own tail is how the period ended.
                tail_failures: 4,
            }
        );
        assert_eq!(older.by_key[&key("other", "m")].failures, [0, 0, 1, 0, 0]);
        assert_eq!(older.dropped, 7);
        // A longer Retry-After in the newer tally wins.
        let mut a = Tallies::default();
        a.record("p", "m", &status(429, Some(100)), None);
        let mut b = Tallies::default();
        b.record("p", "m", &status(429, Some(700)), None);
        a.merge(&b);
        assert_eq!(a.by_key[&key("p", "m")].retry_after_ms, Some(700));
        assert_eq!(a.by_key[&key("p", "m")].rate_limited, 2);
    }

    #[test]
    fn nothing_to_report_is_no_pair_and_nothing_dropped() {
        let mut t = Tallies::default();
        assert!(t.is_empty());
        t.dropped = 1;
        assert!(!t.is_empty());
        let mut k = Tallies::default();
        k.record("p", "m", &Outcome::Timeout, None);
        assert!(!k.is_empty());
        // A 4xx records nothing, not even the pair.
        let mut four = Tallies::default();
        four.record("p", "m", &status(404, None), None);
        assert!(four.is_empty());
    }

    #[test]
    fn a_full_tally_still_counts_its_pairs_and_drops_only_new_ones() {
        let mut t = Tallies::default();
        for i in 0..MAX_KEYS {
            t.record(&format!("p{i}"), "m", &Outcome::Success(200), None);
        }
        t.record("p0", "m", &Outcome::Timeout, None);
        t.broke_off("p1", "m");
        assert_eq!(t.dropped, 0);
        assert_eq!(t.by_key[&key("p0", "m")].attempts, 2);
        assert_eq!(t.by_key[&key("p1", "m")].failures[2], 1);
        t.broke_off("new", "m");
        t.record("new", "m", &Outcome::Timeout, None);
        assert_eq!(t.dropped, 2);
        assert_eq!(t.by_key.len(), MAX_KEYS);
        let mut other = Tallies::default();
        other.record("p2", "m", &Outcome::Reset, None);
        other.record("new2", "m", &Outcome::Reset, None);
        t.merge(&other);
        assert_eq!(t.by_key[&key("p2", "m")].failures[2], 1);
        assert_eq!(t.dropped, 3);
    }

    #[test]
    fn a_stream_broken_off_before_any_success_was_counted_is_a_new_failed_attempt() {
        let mut t = Tallies::default();
        t.broke_off("a", "m");
        t.broke_off("a", "m");
        let a = &t.by_key[&key("a", "m")];
        assert_eq!(
            (a.attempts, a.successes, a.failures, a.tail_failures),
            (2, 0, [0, 0, 2, 0, 0], 2)
        );
        // After two successes, one breaks off: one success left, the tail starts again.
        let mut t = Tallies::default();
        t.record("a", "m", &Outcome::Success(200), None);
        t.record("a", "m", &Outcome::Success(200), None);
        t.broke_off("a", "m");
        let a = &t.by_key[&key("a", "m")];
        assert_eq!(
            (a.attempts, a.successes, a.failures[2], a.tail_failures),
            (2, 1, 1, 1)
        );
    }

    #[test]
    fn long_model_names_are_clipped_in_the_key() {
        let long = "x".repeat(MAX_MODEL_BYTES + 10);
        let mut t = Tallies::default();
        t.record("p", &long, &Outcome::Timeout, None);
        t.record("p", &long[..MAX_MODEL_BYTES], &Outcome::Timeout, None);
        assert_eq!(t.by_key.len(), 1);
        let k = t.by_key.keys().next().unwrap();
        assert_eq!(k, &format!("p\u{0}{}", &long[..MAX_MODEL_BYTES]));
        assert_eq!(t.by_key[k].attempts, 2);
    }
}
