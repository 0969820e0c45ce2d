//! What the fleet's gateways see: reports (`POST /v1/market/reports`, one per gateway process
//! per market period) folded into the snapshot's offers as `observed` figures.
//!
//! A report carries, per (provider, model) since the gateway's last report: attempts,
//! successes, failures by kind, 429s (kept apart from uptime) with the longest Retry-After,
//! and a time-to-first-byte histogram over [`TTFB_BOUNDS_MS`]. The service keeps each report's
//! figures for [`WINDOW_MS`] and folds what the window holds into every matching offer:
//!
//! - uptime: successes / (successes + failures), blended with the feeds' figure by weight
//!   n / (n + k), k = [`BLEND_K`] (a fresh feed figure), [`BLEND_K_STALE`] (a stale one) or 0
//!   (a default: the fleet's figure alone);
//! - `latency_ms.ttft_p50/p95`: quantiles of the summed histograms, blended the same way;
//! - availability: `offline` when the last [`RECENT_MS`] hold at least [`MIN_FAILURES`]
//!   failures and no success, or when the newest reports since the last one with a success
//!   hold that many failures (a provider that starts failing, however well it did before), or
//!   a Retry-After window is open; `degraded` when at least half of at least
//!   [`MIN_FAILURES`] recent attempts failed;
//! - provenance `{"source": "observed", "as_of_ms": <last report>, "samples": n}`.
//!
//! Cold start: an offer nobody has reported on keeps its feed figures unchanged. Operator
//! overrides stay in force. Samples leave the window whole, so the snapshot changes only when
//! a report arrives or one expires (no per-second republishing).

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Upper bounds (ms) of the TTFB histogram buckets; a last bucket holds everything above.
pub const TTFB_BOUNDS_MS: [u64; 7] = [100, 250, 500, 1000, 2500, 5000, 10000];
/// Number of histogram buckets.
pub const BUCKETS: usize = TTFB_BOUNDS_MS.len() + 1;
/// How long a report's figures count.
pub const WINDOW_MS: u64 = 300_000;
/// The window availability is judged on.
pub const RECENT_MS: u64 = 30_000;
/// Failures needed before the fleet marks a provider degraded or offline.
pub const MIN_FAILURES: u64 = 3;
/// Blend constant against a fresh feed figure.
pub const BLEND_K: f64 = 20.0;
/// Blend constant against a stale feed figure.
pub const BLEND_K_STALE: f64 = 5.0;
/// Most entries one report may carry.
pub const MAX_ENTRIES: usize = 512;
/// Most (provider, model) keys the service tracks.
pub const MAX_KEYS: usize = 8192;
/// Longest Retry-After honoured, ms.
pub const MAX_RETRY_AFTER_MS: u64 = 3_600_000;
/// Largest report body accepted, bytes.
pub const MAX_REPORT_BYTES: usize = 256 * 1024;
/// Most reports a replica keeps for sharing (see [`Fleet::accept`]); the oldest go first.
pub const MAX_KNOWN: usize = 65_536;

/// One report, as posted.
#[derive(Debug, Deserialize, Serialize)]
pub struct Report {
    /// Must be 1.
    pub version: u32,
    /// Per (provider, model).
    #[serde(default)]
    pub observations: Vec<Entry>,
}

/// One (provider, model) of a report.
#[derive(Debug, Deserialize, Serialize, Clone, Default)]
pub struct Entry {
    /// Plugin provider name.
    pub provider: String,
    /// Client model name.
    pub model: String,
    /// Attempts sent.
    #[serde(default)]
    pub attempts: u64,
    /// Attempts answered well.
    #[serde(default)]
    pub successes: u64,
    /// Failures by kind (`5xx`, `connect_failure`, `reset`, `timeout`, `malformed`); 429s are
    /// not failures here.
    #[serde(default)]
    pub failures: BTreeMap<String, u64>,
    /// 429 answers.
    #[serde(default)]
    pub rate_limited: u64,
    /// Longest Retry-After of those 429s (or of 5xx answers), ms.
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    /// TTFB histogram, [`BUCKETS`] counts.
    #[serde(default)]
    pub ttfb_hist: Vec<u64>,
    /// Failures after the period's last success (how it ended); absent: all of them when
    /// the period saw no success, else none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_failures: Option<u64>,
}

/// Why a report was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ReportError {
    /// Not JSON of the report shape.
    Shape(String),
    /// `version` is not 1.
    Version(u32),
    /// More than [`MAX_ENTRIES`] entries.
    TooMany(usize),
}

impl std::fmt::Display for ReportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shape(e) => write!(f, "not a market report: {e}"),
            Self::Version(v) => write!(f, "report version {v} is not supported (expected 1)"),
            Self::TooMany(n) => write!(f, "report has {n} entries, at most {MAX_ENTRIES} allowed"),
        }
    }
}

/// Parses and checks a report body.
pub fn parse(body: &[u8]) -> Result<Report, ReportError> {
    let r: Report = serde_json::from_slice(body).map_err(|e| ReportError::Shape(e.to_string()))?;
    if r.version != 1 {
        return Err(ReportError::Version(r.version));
    }
    if r.observations.len() > MAX_ENTRIES {
        return Err(ReportError::TooMany(r.observations.len()));
    }
    Ok(r)
}

#[derive(Debug, Clone)]
struct Sample {
    at_ms: u64,
    successes: u64,
    failures: u64,
    /// Failures after the last success.
    tail: u64,
    hist: [u64; BUCKETS],
}

/// A report a replica knows (received itself, or read from the shared store), kept while its
/// figures count so that it can be shared again after the store lost it.
#[derive(Debug, Clone)]
pub struct Known {
    /// When a replica received it.
    pub at_ms: u64,
    /// The report, serialized.
    pub body: Arc<Vec<u8>>,
    /// Whether the shared store holds it (in its current epoch).
    pub shared: bool,
    /// Until when it matters: the window, or a longer Retry-After window it opened.
    keep_until_ms: u64,
}

/// The Retry-After windows a report opens: (provider, model, until ms).
pub fn windows_of(report: &Report, at_ms: u64) -> Vec<(String, String, u64)> {
    report
        .observations
        .iter()
        .filter_map(|e| {
            let failures: u64 = e.failures.values().sum();
            e.retry_after_ms
                .filter(|_| e.rate_limited > 0 || failures > 0)
                .map(|ra| {
                    (
                        e.provider.clone(),
                        e.model.clone(),
                        at_ms + ra.min(MAX_RETRY_AFTER_MS),
                    )
                })
        })
        .collect()
}

#[derive(Debug, Default)]
struct Track {
    samples: VecDeque<Sample>,
    retry_until_ms: u64,
    last_ms: u64,
}

/// The fleet's observations held by the service.
#[derive(Debug, Default)]
pub struct Fleet {
    tracks: BTreeMap<(String, String), Track>,
    /// Reports accepted.
    pub reports: u64,
    /// Entries dropped (no room for a new key).
    pub dropped_entries: u64,
    /// Reports by id, kept for sharing (only filled through [`Fleet::accept`]).
    known: BTreeMap<String, Known>,
}

/// What the window holds for one offer.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    /// Successes + failures (429s excluded) in the window.
    pub samples: u64,
    /// successes / samples.
    pub uptime: Option<f64>,
    /// TTFB samples in the window.
    pub ttft_samples: u64,
    /// Median TTFB, ms.
    pub ttft_p50: Option<f64>,
    /// 95th percentile TTFB, ms.
    pub ttft_p95: Option<f64>,
    /// Fleet-seen availability, when it says anything.
    pub availability: Option<&'static str>,
    /// Last report touching this offer.
    pub as_of_ms: u64,
}

/// Quantile `q` of a histogram over [`TTFB_BOUNDS_MS`], interpolated inside its bucket (the
/// last bucket reports twice its lower bound).
pub fn quantile(hist: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0.0;
    for (i, &n) in hist.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let lo = if i == 0 {
            0.0
        } else {
            TTFB_BOUNDS_MS[i - 1] as f64
        };
        let hi = TTFB_BOUNDS_MS.get(i).map_or(lo * 2.0, |b| *b as f64);
        if seen + n as f64 >= rank {
            let frac = ((rank - seen) / n as f64).clamp(0.0, 1.0);
            return Some(lo + (hi - lo) * frac);
        }
        seen += n as f64;
    }
    None
}

/// Failures since the fleet's last success: the newest recent reports' failures after their
/// last success, newest first until a report that saw one. A provider that starts failing
/// (even mid-period) is offline as soon as the fleet's latest reports say so, however well it
/// did before. Ties in time are taken in a fixed order (successes first), so every replica
/// holding the same reports reads the same streak.
fn failure_streak(samples: &VecDeque<Sample>, now: u64) -> u64 {
    let mut recent: Vec<&Sample> = samples
        .iter()
        .filter(|s| now.saturating_sub(s.at_ms) < RECENT_MS && s.successes + s.failures > 0)
        .collect();
    recent.sort_by_key(|s| (std::cmp::Reverse(s.at_ms), std::cmp::Reverse(s.successes)));
    let mut streak = 0;
    for s in recent {
        streak += s.tail;
        if s.successes > 0 {
            break;
        }
    }
    streak
}

impl Fleet {
    /// Adds a report received at `now`.
    pub fn add(&mut self, report: &Report, now: u64) {
        self.reports += 1;
        for e in &report.observations {
            let key = (e.provider.clone(), e.model.clone());
            if !self.tracks.contains_key(&key) && self.tracks.len() >= MAX_KEYS {
                self.dropped_entries += 1;
                continue;
            }
            let t = self.tracks.entry(key).or_default();
            let failures: u64 = e.failures.values().sum();
            let mut hist = [0u64; BUCKETS];
            for (h, v) in hist.iter_mut().zip(&e.ttfb_hist) {
                *h = *v;
            }
            if e.successes + failures > 0 || hist.iter().any(|h| *h > 0) {
                let tail = e
                    .tail_failures
                    .unwrap_or(if e.successes == 0 { failures } else { 0 })
                    .min(failures);
                t.samples.push_back(Sample {
                    at_ms: now,
                    successes: e.successes,
                    failures,
                    tail,
                    hist,
                });
            }
            if let Some(ra) = e
                .retry_after_ms
                .filter(|_| e.rate_limited > 0 || failures > 0)
            {
                t.retry_until_ms = t.retry_until_ms.max(now + ra.min(MAX_RETRY_AFTER_MS));
            }
            // Reports may come in any order (read back from the shared store): the latest counts.
            t.last_ms = t.last_ms.max(now);
        }
    }

    /// Adds a report known by `id`, received at `at_ms`, unless it is known already (a report
    /// read back from the shared store, or shared again after the store lost it, counts once).
    /// `shared`: it came from the store. Returns whether it was new.
    pub fn accept(&mut self, id: &str, at_ms: u64, report: &Report, shared: bool) -> bool {
        if let Some(k) = self.known.get_mut(id) {
            k.shared |= shared;
            return false;
        }
        self.add(report, at_ms);
        let keep_until_ms = windows_of(report, at_ms)
            .iter()
            .map(|w| w.2)
            .fold(at_ms + WINDOW_MS, u64::max);
        let body = Arc::new(serde_json::to_vec(report).unwrap_or_default());
        self.known.insert(
            id.to_string(),
            Known {
                at_ms,
                body,
                shared,
                keep_until_ms,
            },
        );
        while self.known.len() > MAX_KNOWN {
            let oldest = self
                .known
                .iter()
                .min_by_key(|(_, k)| k.at_ms)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => self.known.remove(&id),
                None => break,
            };
        }
        true
    }

    /// Reports not in the shared store yet, oldest first, at most `max`: (id, at_ms, body).
    pub fn unshared(&self, max: usize) -> Vec<(String, u64, Arc<Vec<u8>>)> {
        let mut v: Vec<_> = self
            .known
            .iter()
            .filter(|(_, k)| !k.shared)
            .map(|(id, k)| (id.clone(), k.at_ms, k.body.clone()))
            .collect();
        v.sort_by_key(|x| x.1);
        v.truncate(max);
        v
    }

    /// How many reports are known (kept for sharing).
    pub fn known_count(&self) -> usize {
        self.known.len()
    }

    /// How many known reports the shared store does not hold.
    pub fn unshared_count(&self) -> usize {
        self.known.values().filter(|k| !k.shared).count()
    }

    /// Marks a report as held by the shared store.
    pub fn mark_shared(&mut self, id: &str) {
        if let Some(k) = self.known.get_mut(id) {
            k.shared = true;
        }
    }

    /// The shared store lost its data (or was never joined): every known report is to be
    /// shared again.
    pub fn mark_all_unshared(&mut self) {
        for k in self.known.values_mut() {
            k.shared = false;
        }
    }

    /// The open Retry-After windows: (provider, model, until ms).
    pub fn windows(&self, now: u64) -> Vec<(String, String, u64)> {
        self.tracks
            .iter()
            .filter(|(_, t)| t.retry_until_ms > now)
            .map(|((p, m), t)| (p.clone(), m.clone(), t.retry_until_ms))
            .collect()
    }

    /// Opens (or extends) a Retry-After window another replica learned of; returns whether it
    /// changed anything.
    pub fn open_window(&mut self, provider: &str, model: &str, until_ms: u64) -> bool {
        let key = (provider.to_string(), model.to_string());
        if !self.tracks.contains_key(&key) && self.tracks.len() >= MAX_KEYS {
            self.dropped_entries += 1;
            return false;
        }
        let t = self.tracks.entry(key).or_default();
        let until = until_ms.min(u64::MAX / 2);
        if until > t.retry_until_ms {
            t.retry_until_ms = until;
            true
        } else {
            false
        }
    }

    /// Forgets what left the window; returns whether anything did.
    pub fn expire(&mut self, now: u64) -> bool {
        let mut changed = false;
        self.tracks.retain(|_, t| {
            let before = t.samples.len();
            // Samples read back from the shared store may be out of order.
            t.samples
                .retain(|s| now.saturating_sub(s.at_ms) < WINDOW_MS);
            changed |= t.samples.len() != before;
            !t.samples.is_empty() || t.retry_until_ms > now
        });
        self.known.retain(|_, k| k.keep_until_ms > now);
        changed
    }

    /// What the window holds for (provider, model) at `now`.
    pub fn figures(&self, provider: &str, model: &str, now: u64) -> Option<Figures> {
        let t = self
            .tracks
            .get(&(provider.to_string(), model.to_string()))?;
        let (mut ok, mut bad, mut rok, mut rbad) = (0, 0, 0, 0);
        let mut hist = [0u64; BUCKETS];
        for s in &t.samples {
            if now.saturating_sub(s.at_ms) >= WINDOW_MS {
                continue;
            }
            ok += s.successes;
            bad += s.failures;
            if now.saturating_sub(s.at_ms) < RECENT_MS {
                rok += s.successes;
                rbad += s.failures;
            }
            for (h, v) in hist.iter_mut().zip(&s.hist) {
                *h += v;
            }
        }
        let availability = if t.retry_until_ms > now
            || (rbad >= MIN_FAILURES && rok == 0)
            || failure_streak(&t.samples, now) >= MIN_FAILURES
        {
            Some("offline")
        } else if rbad >= MIN_FAILURES && rbad >= rok {
            Some("degraded")
        } else {
            None
        };
        let n = ok + bad;
        Some(Figures {
            samples: n,
            uptime: (n > 0).then(|| ok as f64 / n as f64),
            ttft_samples: hist.iter().sum(),
            ttft_p50: quantile(&hist, 0.5),
            ttft_p95: quantile(&hist, 0.95),
            availability,
            as_of_ms: t.last_ms,
        })
    }

    /// Folds the window into built offers (snapshot v1 JSON objects).
    pub fn fold(&self, offers: &mut [Value], now: u64) {
        for o in offers.iter_mut() {
            let (Some(p), Some(m)) = (
                o.get("provider").and_then(Value::as_str),
                o.get("model").and_then(Value::as_str),
            ) else {
                continue;
            };
            if let Some(f) = self.figures(p, m, now) {
                fold_offer(o, &f);
            }
        }
    }
}

fn source_of<'a>(o: &'a Value, figure: &str) -> Option<&'a Map<String, Value>> {
    o.get("provenance")?.get(figure)?.as_object()
}

/// The weight of `n` fleet samples against the offer's own figure.
fn weight(o: &Value, figure: &str, n: u64, has_value: bool) -> Option<f64> {
    if n == 0 {
        return None;
    }
    let src = source_of(o, figure);
    let source = src.and_then(|s| s.get("source")).and_then(Value::as_str);
    if source == Some("override") {
        return None;
    }
    if !has_value || source.is_none_or(|s| s == "default") {
        return Some(1.0);
    }
    let stale = src
        .and_then(|s| s.get("stale"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let k = if stale { BLEND_K_STALE } else { BLEND_K };
    Some(n as f64 / (n as f64 + k))
}

/// `x` to a multiple of `1 / per_unit` (dividing keeps 0.825 from printing as 0.8250000000000001).
fn round(x: f64, per_unit: f64) -> f64 {
    (x * per_unit).round() / per_unit
}

fn mark(o: &mut Map<String, Value>, figure: &str, f: &Figures, samples: u64) {
    let prov = o
        .entry("provenance")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(p) = prov.as_object_mut() {
        p.insert(
            figure.into(),
            json!({"source": "observed", "as_of_ms": f.as_of_ms, "samples": samples}),
        );
    }
}

fn fold_offer(offer: &mut Value, f: &Figures) {
    let snapshot = offer.clone();
    let Some(o) = offer.as_object_mut() else {
        return;
    };
    if let Some(u) = f.uptime {
        let feed = o.get("uptime").and_then(Value::as_f64);
        if let Some(w) = weight(&snapshot, "uptime", f.samples, feed.is_some()) {
            let v = feed.map_or(u, |x| w * u + (1.0 - w) * x);
            o.insert("uptime".into(), json!(round(v.clamp(0.0, 1.0), 10_000.0)));
            mark(o, "uptime", f, f.samples);
        }
    }
    if let (Some(p50), Some(p95)) = (f.ttft_p50, f.ttft_p95) {
        let lat = snapshot.get("latency_ms");
        let feed50 = lat.and_then(|l| l.get("ttft_p50")).and_then(Value::as_f64);
        let feed95 = lat.and_then(|l| l.get("ttft_p95")).and_then(Value::as_f64);
        if let Some(w) = weight(&snapshot, "ttft", f.ttft_samples, feed50.is_some()) {
            let b50 = feed50.map_or(p50, |x| w * p50 + (1.0 - w) * x);
            let b95 = feed95.map_or(p95, |x| w * p95 + (1.0 - w) * x).max(b50);
            let l = o
                .entry("latency_ms")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(l) = l.as_object_mut() {
                l.insert("ttft_p50".into(), json!(round(b50.max(1.0), 1.0)));
                l.insert("ttft_p95".into(), json!(round(b95.max(1.0), 1.0)));
            }
            mark(o, "ttft", f, f.ttft_samples);
        }
    }
    if let Some(a) = f.availability {
        let src = source_of(&snapshot, "availability")
            .and_then(|s| s.get("source"))
            .and_then(Value::as_str);
        let current = o.get("availability").and_then(Value::as_str);
        // The fleet only ever makes an offer worse than the feeds say.
        let worse = !matches!(
            (current, a),
            (Some("offline"), _) | (Some("degraded"), "degraded")
        );
        if src != Some("override") && worse {
            o.insert("availability".into(), json!(a));
            mark(o, "availability", f, f.samples);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(p: &str, ok: u64, bad: u64, hist: &[u64]) -> Entry {
        let mut failures = BTreeMap::new();
        if bad > 0 {
            failures.insert("5xx".to_string(), bad);
        }
        Entry {
            provider: p.into(),
            model: "m".into(),
            attempts: ok + bad,
            successes: ok,
            failures,
            ttfb_hist: hist.to_vec(),
            ..Entry::default()
        }
    }

    fn report(e: Vec<Entry>) -> Report {
        Report {
            version: 1,
            observations: e,
        }
    }

    fn offer(provider: &str, uptime: f64, ttft: f64, source: &str) -> Value {
        json!({"provider": provider, "model": "m", "price": {"input_per_mtok": 1, "output_per_mtok": 1},
               "latency_ms": {"ttft_p50": ttft}, "uptime": uptime, "availability": "online",
               "provenance": {"uptime": {"source": source}, "ttft": {"source": source},
                              "availability": {"source": source}}})
    }

    #[test]
    fn parse_checks_version_and_bounds() {
        assert!(parse(br#"{"version":1,"observations":[]}"#).is_ok());
        assert_eq!(
            parse(br#"{"version":2}"#).err(),
            Some(ReportError::Version(2))
        );
        assert!(matches!(parse(b"nope"), Err(ReportError::Shape(_))));
        let many: Vec<Value> = (0..MAX_ENTRIES + 1)
            .map(|i| json!({"provider": format!("p{i}"), "model": "m"}))
            .collect();
        let body = json!({"version": 1, "observations": many}).to_string();
        assert_eq!(
            parse(body.as_bytes()).err(),
            Some(ReportError::TooMany(MAX_ENTRIES + 1))
        );
    }

    #[test]
    fn cold_start_keeps_feed_figures() {
        let fleet = Fleet::default();
        let mut offers = vec![offer("a", 0.99, 300.0, "openrouter")];
        let before = offers.clone();
        fleet.fold(&mut offers, 1000);
        assert_eq!(offers, before);
    }

    #[test]
    fn failures_make_an_offer_offline_and_429s_stay_apart_from_uptime() {
        let mut fleet = Fleet::default();
        let mut e = entry("a", 0, 4, &[]);
        e.failures.insert("connect_failure".into(), 1);
        fleet.add(&report(vec![e]), 1000);
        let mut limited = entry("b", 10, 0, &[]);
        limited.rate_limited = 5;
        limited.retry_after_ms = Some(20_000);
        fleet.add(&report(vec![limited]), 1000);
        let mut offers = vec![
            offer("a", 0.99, 300.0, "openrouter"),
            offer("b", 0.99, 300.0, "openrouter"),
        ];
        fleet.fold(&mut offers, 2000);
        assert_eq!(offers[0]["availability"], "offline");
        assert_eq!(
            offers[0]["provenance"]["availability"]["source"],
            "observed"
        );
        // 5 failures of 5 against a fresh feed figure of 0.99: 5/25 weight on 0.
        assert_eq!(offers[0]["uptime"], 0.792);
        assert_eq!(offers[0]["provenance"]["uptime"]["samples"], 5);
        // b: 429s do not lower uptime, but its Retry-After window is shared: offline until it ends.
        assert!(offers[1]["uptime"].as_f64().unwrap() > 0.99);
        assert_eq!(offers[1]["availability"], "offline");
        let mut later = vec![offer("b", 0.99, 300.0, "openrouter")];
        fleet.fold(&mut later, 1000 + 20_001);
        assert_eq!(later[0]["availability"], "online");
    }

    #[test]
    fn mixed_results_degrade_and_recent_success_recovers() {
        let mut fleet = Fleet::default();
        fleet.add(&report(vec![entry("a", 3, 3, &[])]), 0);
        let f = fleet.figures("a", "m", 10).unwrap();
        assert_eq!(f.availability, Some("degraded"));
        // Once the failures are older than RECENT_MS the fleet says nothing about availability.
        fleet.add(&report(vec![entry("a", 5, 0, &[])]), RECENT_MS + 1);
        let f = fleet.figures("a", "m", RECENT_MS + 2).unwrap();
        assert_eq!(f.availability, None);
        assert_eq!(f.samples, 11);
    }

    #[test]
    fn ttft_quantiles_from_histograms_blend_by_sample_count() {
        let mut fleet = Fleet::default();
        // 20 samples, all in (500, 1000].
        fleet.add(&report(vec![entry("a", 20, 0, &[0, 0, 0, 20])]), 0);
        let f = fleet.figures("a", "m", 1).unwrap();
        assert_eq!(f.ttft_p50, Some(750.0));
        assert_eq!(f.ttft_p95, Some(975.0));
        let mut offers = vec![offer("a", 0.99, 250.0, "openrouter")];
        fleet.fold(&mut offers, 1);
        // Weight 20/40 against the feed's 250.
        assert_eq!(offers[0]["latency_ms"]["ttft_p50"], 500.0);
        assert_eq!(offers[0]["provenance"]["ttft"]["source"], "observed");
        // Against a default figure the fleet's alone counts.
        let mut offers = vec![offer("a", 0.99, 1000.0, "default")];
        fleet.fold(&mut offers, 1);
        assert_eq!(offers[0]["latency_ms"]["ttft_p50"], 750.0);
        assert_eq!(offers[0]["uptime"], 1.0);
    }

    #[test]
    fn overrides_win_and_the_window_expires() {
        let mut fleet = Fleet::default();
        fleet.add(&report(vec![entry("a", 0, 5, &[])]), 0);
        let mut offers = vec![offer("a", 0.99, 300.0, "override")];
        fleet.fold(&mut offers, 1);
        assert_eq!(offers[0]["availability"], "online");
        assert_eq!(offers[0]["uptime"], 0.99);
        assert!(!fleet.expire(WINDOW_MS - 1));
        assert!(fleet.expire(WINDOW_MS));
        assert!(fleet.figures("a", "m", WINDOW_MS).is_none());
    }

    #[test]
    fn key_count_is_bounded() {
        let mut fleet = Fleet::default();
        let many: Vec<Entry> = (0..MAX_ENTRIES)
            .map(|i| entry(&format!("p{i}"), 1, 0, &[]))
            .collect();
        for _ in 0..(MAX_KEYS / MAX_ENTRIES) + 1 {
            let r = report(
                many.iter()
                    .map(|e| Entry {
                        model: format!("m{}", fleet.reports),
                        ..e.clone()
                    })
                    .collect(),
            );
            fleet.add(&r, 0);
        }
        assert_eq!(fleet.tracks.len(), MAX_KEYS);
        assert_eq!(fleet.dropped_entries, MAX_ENTRIES as u64);
    }

    #[test]
    fn a_report_known_by_id_counts_once_in_any_order() {
        // Two replicas learn the same reports, in different orders, some twice: same figures.
        let r1 = report(vec![entry("a", 2, 1, &[0, 3])]);
        let r2 = report(vec![entry("a", 0, 4, &[])]);
        let mut x = Fleet::default();
        assert!(x.accept("r1", 1_000, &r1, false));
        assert!(x.accept("r2", 2_000, &r2, false));
        let mut y = Fleet::default();
        assert!(y.accept("r2", 2_000, &r2, true));
        assert!(!y.accept("r2", 2_000, &r2, true));
        assert!(y.accept("r1", 1_000, &r1, true));
        assert_eq!(x.figures("a", "m", 3_000), y.figures("a", "m", 3_000));
        let f = x.figures("a", "m", 3_000).unwrap();
        assert_eq!((f.samples, f.as_of_ms), (7, 2_000));
        // What x received itself is to be shared, oldest first; read back, it is shared.
        let u = x.unshared(10);
        assert_eq!(
            u.iter()
                .map(|(id, at, _)| (id.as_str(), *at))
                .collect::<Vec<_>>(),
            [("r1", 1_000), ("r2", 2_000)]
        );
        let back: Report = serde_json::from_slice(&u[0].2).unwrap();
        assert_eq!(back.observations[0].successes, 2);
        assert!(!x.accept("r1", 1_000, &r1, true));
        x.mark_shared("r2");
        assert_eq!(x.unshared_count(), 0);
        // The store lost its data: everything known is to be shared again.
        x.mark_all_unshared();
        assert_eq!(x.unshared(1).len(), 1);
        assert_eq!(x.unshared_count(), 2);
        // Known reports leave with the window.
        x.expire(2_000 + WINDOW_MS);
        assert_eq!(x.unshared_count(), 0);
    }

    #[test]
    fn retry_after_windows_are_kept_and_can_be_opened_from_elsewhere() {
        let mut limited = entry("b", 1, 0, &[]);
        limited.rate_limited = 2;
        limited.retry_after_ms = Some(WINDOW_MS * 2);
        let r = report(vec![limited, entry("a", 1, 0, &[])]);
        assert_eq!(
            windows_of(&r, 10),
            vec![("b".to_string(), "m".to_string(), 10 + WINDOW_MS * 2)]
        );
        let mut x = Fleet::default();
        x.accept("r", 10, &r, false);
        // The report outlives the sample window while its Retry-After window is open.
        x.expire(10 + WINDOW_MS);
        assert_eq!(x.unshared_count(), 1);
        assert_eq!(x.windows(10 + WINDOW_MS).len(), 1);
        let mut y = Fleet::default();
        assert!(y.open_window("b", "m", 10 + WINDOW_MS * 2));
        assert!(!y.open_window("b", "m", 20));
        assert_eq!(
            y.figures("b", "m", 100).unwrap().availability,
            Some("offline")
        );
        assert_eq!(
            y.figures("b", "m", 11 + WINDOW_MS * 2)
                .unwrap()
                .availability,
            None
        );
    }

    #[test]
    fn a_provider_that_starts_failing_is_offline_at_once_whatever_it_did_before() {
        let mut fleet = Fleet::default();
        // Healthy for a while, then two reports of failures only.
        fleet.add(&report(vec![entry("a", 50, 0, &[])]), 1_000);
        fleet.add(&report(vec![entry("a", 0, 2, &[])]), 2_000);
        assert_eq!(fleet.figures("a", "m", 2_001).unwrap().availability, None);
        fleet.add(&report(vec![entry("a", 0, 1, &[])]), 3_000);
        assert_eq!(
            fleet.figures("a", "m", 3_001).unwrap().availability,
            Some("offline")
        );
        // One gateway still gets answers: the newest report has a success, no streak.
        fleet.add(&report(vec![entry("a", 1, 0, &[])]), 3_000);
        assert_eq!(fleet.figures("a", "m", 3_001).unwrap().availability, None);
        // A period that went well, then down: its tail counts.
        let mut mid = Fleet::default();
        mid.add(&report(vec![entry("a", 50, 0, &[])]), 1_000);
        let mut e = entry("a", 20, 2, &[]);
        e.tail_failures = Some(2);
        mid.add(&report(vec![e]), 2_000);
        assert_eq!(mid.figures("a", "m", 2_001).unwrap().availability, None);
        mid.add(&report(vec![entry("a", 0, 1, &[])]), 3_000);
        assert_eq!(
            mid.figures("a", "m", 3_001).unwrap().availability,
            Some("offline")
        );
        // The streak ages out with the recent window.
        let mut f = Fleet::default();
        f.add(&report(vec![entry("a", 50, 0, &[])]), 0);
        f.add(&report(vec![entry("a", 0, 3, &[])]), 10);
        assert_eq!(
            f.figures("a", "m", 11).unwrap().availability,
            Some("offline")
        );
        assert_eq!(
            f.figures("a", "m", 10 + RECENT_MS).unwrap().availability,
            None
        );
    }
}
