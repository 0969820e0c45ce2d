//! market-sidecar: the market service of market-router. It polls live marketplace feeds and
//! price catalogs, maps their ids to the plugin's provider and model names, merges them per
//! figure and serves market snapshot v1 (with each figure's source and age) to the filter.
//!
//! Modules: [`config`] (the service's configuration file), [`sources`] (parsers of the real
//! formats), [`fetch`] (files and URLs, conditional requests), [`merge`] (mapping and
//! precedence), [`serve`] (HTTP: snapshot, health, metrics). [`App`] ties them together: one
//! polling task per feed, one builder that republishes the snapshot when a source changes.

#![deny(missing_docs)]

pub mod config;
pub mod fetch;
pub mod merge;
pub mod observed;
pub mod serve;
pub mod shared;
pub mod sources;

use config::{Config, Location, Source};
use fetch::{Outcome, Validators};
use merge::{BuildStats, SourceData};
use sources::Entry;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// One polled document: a source, and for OpenRouter one of its models.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FeedKey {
    /// Source name.
    pub source: String,
    /// OpenRouter model id.
    pub model: Option<String>,
    /// Where from.
    pub location: Location,
}

impl Source {
    /// The keys of this source's feeds.
    pub fn feed_keys(&self) -> Vec<FeedKey> {
        self.feeds()
            .into_iter()
            .map(|(model, location)| FeedKey {
                source: self.name.clone(),
                model,
                location,
            })
            .collect()
    }
}

/// A feed's last good copy.
#[derive(Debug, Default)]
struct Feed {
    entries: Arc<Vec<Entry>>,
    /// When the source last confirmed the entries.
    last_ok_ms: Option<u64>,
    validators: Validators,
    /// In a failure streak (logged once).
    failing: bool,
}

/// Per-source counters for `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct SourceCounters {
    /// Fetches that brought a new document.
    pub updated: u64,
    /// Fetches the source answered with "not modified".
    pub not_modified: u64,
    /// Failed fetches by reason.
    pub failures: BTreeMap<&'static str, u64>,
    /// Entries dropped for impossible values.
    pub dropped: u64,
}

/// The snapshot being served.
#[derive(Debug, Clone)]
pub struct Published {
    /// The document.
    pub body: Arc<Vec<u8>>,
    /// Its ETag (quoted).
    pub etag: String,
    /// Its `generated_at_ms`.
    pub generated_at_ms: u64,
    /// The offers part, to tell whether anything changed (empty for one read from Redis).
    offers: Arc<Vec<u8>>,
}

impl Published {
    /// A snapshot another replica built (read from the shared store).
    pub fn from_shared(body: Vec<u8>, etag: String, generated_at_ms: u64) -> Published {
        Published {
            body: Arc::new(body),
            etag,
            generated_at_ms,
            offers: Arc::new(Vec::new()),
        }
    }
}

/// Service-wide counters.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Snapshots published.
    pub published: u64,
    /// Built documents refused by the snapshot v1 check (the previous one stays).
    pub rejected: u64,
    /// Configuration reloads by result.
    pub reloads_ok: u64,
    /// Refused configuration reloads.
    pub reloads_failed: u64,
    /// Snapshot requests answered 200.
    pub served: u64,
    /// Snapshot requests answered 304.
    pub served_not_modified: u64,
}

/// The service's state, shared by its tasks and HTTP handlers.
pub struct App {
    config: RwLock<Arc<Config>>,
    feeds: Mutex<BTreeMap<FeedKey, Feed>>,
    source_counters: Mutex<BTreeMap<String, SourceCounters>>,
    snapshot: RwLock<Option<Published>>,
    last_build: Mutex<BuildStats>,
    counters: Mutex<Counters>,
    changed: Notify,
    http: reqwest::Client,
    fleet: Mutex<observed::Fleet>,
    refused_reports: Mutex<u64>,
    /// The snapshot the Redis leader published, served instead of this replica's own while
    /// this replica follows (see [`shared`]).
    shared_snapshot: RwLock<Option<Published>>,
    /// Redis link state; `None` when no Redis is configured (one replica alone).
    redis: Mutex<Option<shared::Status>>,
    /// Wakes the Redis sync task (a report arrived, a snapshot was built).
    sync_wake: Notify,
    /// Prefix of the ids of the reports this replica receives (unique per process).
    report_prefix: String,
    report_seq: std::sync::atomic::AtomicU64,
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl App {
    /// A service with `config`; nothing runs until [`App::start`].
    pub fn new(config: Config) -> Result<Arc<App>, String> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("market-sidecar/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Arc::new(App {
            config: RwLock::new(Arc::new(config)),
            feeds: Mutex::new(BTreeMap::new()),
            source_counters: Mutex::new(BTreeMap::new()),
            snapshot: RwLock::new(None),
            last_build: Mutex::new(BuildStats::default()),
            counters: Mutex::new(Counters::default()),
            changed: Notify::new(),
            http,
            fleet: Mutex::new(observed::Fleet::default()),
            refused_reports: Mutex::new(0),
            shared_snapshot: RwLock::new(None),
            redis: Mutex::new(None),
            sync_wake: Notify::new(),
            report_prefix: format!("{:x}-{:x}", std::process::id(), now_ms()),
            report_seq: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        read(&self.config).clone()
    }

    /// The snapshot being served, if any: the Redis leader's while this replica follows it,
    /// else this replica's own.
    pub fn snapshot(&self) -> Option<Published> {
        read(&self.shared_snapshot)
            .clone()
            .or_else(|| self.own_snapshot())
    }

    /// The snapshot this replica built itself (what it serves alone or as the Redis leader).
    pub fn own_snapshot(&self) -> Option<Published> {
        read(&self.snapshot).clone()
    }

    /// Serves `p` (the leader's snapshot) instead of this replica's own, or stops (`None`).
    pub fn set_shared_snapshot(&self, p: Option<Published>) {
        *write(&self.shared_snapshot) = p;
    }

    /// The Redis link state, when Redis is configured.
    pub fn redis_status(&self) -> Option<shared::Status> {
        let mut s = lock(&self.redis).clone()?;
        s.unshared = lock(&self.fleet).unshared_count();
        Some(s)
    }

    fn set_redis_status(&self, f: impl FnOnce(&mut shared::Status)) {
        if let Some(s) = lock(&self.redis).as_mut() {
            f(s);
        }
    }

    /// Statistics of the last build.
    pub fn last_build(&self) -> BuildStats {
        lock(&self.last_build).clone()
    }

    /// Service counters.
    pub fn counters(&self) -> Counters {
        lock(&self.counters).clone()
    }

    fn count(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut lock(&self.counters));
    }

    /// Counts one snapshot request (304 or 200).
    pub fn count_served(&self, not_modified: bool) {
        self.count(|c| {
            if not_modified {
                c.served_not_modified += 1
            } else {
                c.served += 1
            }
        });
    }

    /// Takes one gateway report (`POST /v1/market/reports`); the next build folds it in.
    pub fn report(&self, body: &[u8], now: u64) -> Result<usize, observed::ReportError> {
        match observed::parse(body) {
            Ok(r) => {
                let n = r.observations.len();
                if lock(&self.redis).is_some() {
                    // Kept by id, to be shared with the other replicas (and counted once).
                    let seq = self
                        .report_seq
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let id = format!("{}-{seq}", self.report_prefix);
                    lock(&self.fleet).accept(&id, now, &r, false);
                    self.sync_wake.notify_one();
                } else {
                    lock(&self.fleet).add(&r, now);
                }
                self.changed.notify_one();
                Ok(n)
            }
            Err(e) => {
                *lock(&self.refused_reports) += 1;
                Err(e)
            }
        }
    }

    /// Reports accepted, refused, and entries dropped for want of room.
    pub fn report_counts(&self) -> (u64, u64, u64) {
        let f = lock(&self.fleet);
        (f.reports, *lock(&self.refused_reports), f.dropped_entries)
    }

    /// Per source: counters, age of its oldest confirmed feed (ms; none before a first good
    /// fetch), entries held, feeds loaded of feeds configured.
    pub fn source_report(
        &self,
        now: u64,
    ) -> Vec<(String, SourceCounters, Option<u64>, usize, usize, usize)> {
        let cfg = self.config();
        let feeds = lock(&self.feeds);
        let counters = lock(&self.source_counters);
        cfg.sources
            .iter()
            .map(|s| {
                let mut age: Option<u64> = None;
                let (mut entries, mut loaded, mut total) = (0, 0, 0);
                for key in s.feed_keys() {
                    total += 1;
                    if let Some(f) = feeds.get(&key) {
                        if let Some(t) = f.last_ok_ms {
                            loaded += 1;
                            entries += f.entries.len();
                            let a = now.saturating_sub(t);
                            age = Some(age.map_or(a, |x| x.max(a)));
                        }
                    }
                }
                (
                    s.name.clone(),
                    counters.get(&s.name).cloned().unwrap_or_default(),
                    age,
                    entries,
                    loaded,
                    total,
                )
            })
            .collect()
    }

    /// Fetches one feed once and records the outcome.
    pub async fn poll(&self, source: &Source, key: &FeedKey) {
        let (validators, have_data) = {
            let feeds = lock(&self.feeds);
            feeds
                .get(key)
                .map(|f| (f.validators.clone(), f.last_ok_ms.is_some()))
                .unwrap_or_default()
        };
        let max = self.config().limits.max_source_bytes;
        let outcome = fetch::fetch(
            &self.http,
            source,
            &key.location,
            &validators,
            have_data,
            max,
        )
        .await;
        let now = now_ms();
        let what = match &key.model {
            Some(m) => format!("source {} ({m})", source.name),
            None => format!("source {}", source.name),
        };
        let mut feeds = lock(&self.feeds);
        let mut counters = lock(&self.source_counters);
        let c = counters.entry(source.name.clone()).or_default();
        let feed = feeds.entry(key.clone()).or_default();
        let failure = match outcome {
            Outcome::Updated(parsed, v) => {
                if parsed.dropped > 0 {
                    c.dropped += parsed.dropped;
                    tracing::warn!(
                        "{what}: dropped {} entr{} with impossible values (first: {})",
                        parsed.dropped,
                        if parsed.dropped == 1 { "y" } else { "ies" },
                        parsed.first_drop.as_deref().unwrap_or("?")
                    );
                }
                if parsed.entries.is_empty() && !feed.entries.is_empty() {
                    Some((
                        "empty",
                        format!("{what}: the new document has no usable entries"),
                    ))
                } else {
                    c.updated += 1;
                    if feed.failing {
                        tracing::info!("{what}: recovered, {} entries", parsed.entries.len());
                    } else {
                        tracing::debug!("{what}: {} entries", parsed.entries.len());
                    }
                    feed.entries = Arc::new(parsed.entries);
                    feed.validators = v;
                    feed.last_ok_ms = Some(now);
                    feed.failing = false;
                    None
                }
            }
            Outcome::NotModified => {
                c.not_modified += 1;
                feed.last_ok_ms = Some(now);
                if feed.failing {
                    tracing::info!("{what}: recovered (not modified)");
                }
                feed.failing = false;
                None
            }
            Outcome::Failed(reason, detail) => Some((reason, detail)),
        };
        if let Some((reason, detail)) = failure {
            *c.failures.entry(reason).or_default() += 1;
            let kept = match feed.last_ok_ms {
                Some(t) => format!(
                    "keeping its last good {} entries from {} s ago",
                    feed.entries.len(),
                    now.saturating_sub(t) / 1000
                ),
                None => "no data from it yet".to_string(),
            };
            if feed.failing {
                tracing::debug!("{what}: fetch failed again ({reason}): {detail}");
            } else {
                tracing::warn!("{what}: fetch failed ({reason}): {detail}; {kept}");
            }
            feed.failing = true;
        }
        drop(counters);
        drop(feeds);
        self.changed.notify_one();
    }

    /// Merges every source's last good copy and publishes the result when it changed (or
    /// when the last one is older than `republish`). Returns whether it published.
    pub fn rebuild(&self, now: u64) -> bool {
        let cfg = self.config();
        let feeds = lock(&self.feeds);
        let mut holders: Vec<(&Source, Arc<Vec<Entry>>, u64)> = Vec::new();
        for s in &cfg.sources {
            for key in s.feed_keys() {
                if let Some(f) = feeds.get(&key) {
                    if let Some(t) = f.last_ok_ms {
                        holders.push((s, f.entries.clone(), t));
                    }
                }
            }
        }
        drop(feeds);
        if holders.is_empty() && cfg.overrides.is_empty() {
            return false;
        }
        let data: Vec<SourceData<'_>> = holders
            .iter()
            .map(|(s, e, t)| SourceData {
                source: s,
                entries: e,
                as_of_ms: *t,
                stale: now.saturating_sub(*t) > s.max_age.as_millis() as u64,
            })
            .collect();
        let (mut offers, stats) = merge::build(&cfg, &data);
        {
            let mut fleet = lock(&self.fleet);
            fleet.expire(now);
            fleet.fold(&mut offers, now);
        }
        let offers_bytes = serde_json::to_vec(&offers).unwrap_or_default();
        if let Some(prev) = self.own_snapshot() {
            if *prev.offers == offers_bytes
                && now.saturating_sub(prev.generated_at_ms) < cfg.republish.as_millis() as u64
            {
                *lock(&self.last_build) = stats;
                return false;
            }
        }
        let doc = serde_json::json!({"version": 1, "generated_at_ms": now, "offers": offers});
        let body = serde_json::to_vec(&doc).unwrap_or_default();
        // The filter's own rules: a document they would refuse, even in part, is never served.
        match market_router_core::market::validate_any(&body, now) {
            Ok(v) if v.invalid.is_empty() => {}
            Ok(v) => {
                self.count(|c| c.rejected += 1);
                tracing::error!(
                    "built snapshot has {} offer(s) the filter would drop (first: {:?}); serving the previous one",
                    v.invalid.len(),
                    v.invalid.first()
                );
                return false;
            }
            Err(e) => {
                self.count(|c| c.rejected += 1);
                tracing::error!("built snapshot is invalid ({e}); serving the previous one");
                return false;
            }
        }
        let etag = format!("\"{:016x}\"", fnv1a64(&body));
        let before = self.own_snapshot().map(|p| p.offers.len());
        if before != Some(offers_bytes.len()) {
            tracing::info!(
                offers = stats.offers,
                stale = stats.stale_offers,
                invalid = stats.invalid,
                unpriced = stats.unpriced,
                "snapshot updated"
            );
        }
        *write(&self.snapshot) = Some(Published {
            body: Arc::new(body),
            etag,
            generated_at_ms: now,
            offers: Arc::new(offers_bytes),
        });
        *lock(&self.last_build) = stats;
        self.count(|c| c.published += 1);
        self.sync_wake.notify_one();
        true
    }

    /// Replaces the configuration (sources are restarted by the caller). Feeds no longer
    /// configured are forgotten.
    pub fn set_config(&self, config: Config) {
        let keep: Vec<FeedKey> = config.sources.iter().flat_map(Source::feed_keys).collect();
        lock(&self.feeds).retain(|k, _| keep.contains(k));
        lock(&self.source_counters).retain(|k, _| config.sources.iter().any(|s| &s.name == k));
        *write(&self.config) = Arc::new(config);
        self.changed.notify_one();
    }

    /// Starts one polling task per feed of the configuration in force.
    pub fn start(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        let cfg = self.config();
        let mut tasks = Vec::new();
        for s in &cfg.sources {
            for key in s.feed_keys() {
                let app = self.clone();
                let source = s.clone();
                tasks.push(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(source.period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tick.tick().await;
                        app.poll(&source, &key).await;
                    }
                }));
            }
        }
        tasks
    }

    /// Rebuilds after every source change, and at least once a second (for ageing).
    pub async fn run_builder(self: Arc<Self>) {
        loop {
            let wait = self.config().republish.min(Duration::from_secs(1));
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            self.rebuild(now_ms());
        }
    }

    /// Polls the configuration file and applies a changed, valid one (restarting the
    /// sources); an invalid one is refused with one log line and the old one stays.
    pub async fn run_reloader(
        self: Arc<Self>,
        path: PathBuf,
        every: Duration,
        mut tasks: Vec<JoinHandle<()>>,
    ) {
        let sig = |p: &PathBuf| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().ok(), m.len()))
        };
        let mut last = sig(&path);
        loop {
            tokio::time::sleep(every).await;
            let now = sig(&path);
            if now == last {
                continue;
            }
            last = now;
            match Config::load(&path) {
                Ok(c) if c == *self.config() => {}
                Ok(c) => {
                    for t in tasks.drain(..) {
                        t.abort();
                    }
                    self.set_config(c);
                    tasks = self.start();
                    self.count(|c| c.reloads_ok += 1);
                    tracing::info!("configuration reloaded from {}", path.display());
                }
                Err(e) => {
                    self.count(|c| c.reloads_failed += 1);
                    tracing::warn!("configuration not reloaded, keeping the one in force: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[tokio::test]
    async fn bad_source_data_never_empties_the_market() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ll.json");
        std::fs::write(
            &file,
            br#"{"deepinfra/openai/gpt-oss-120b":{"litellm_provider":"deepinfra","mode":"chat","input_cost_per_token":4e-08,"output_cost_per_token":1.7e-07}}"#,
        )
        .unwrap();
        let cfg = Config::parse(
            r#"{"sources":[{"name":"ll","kind":"litellm","file":"ll.json","period_s":1,"max_age_s":1}],
                "providers":{"deepinfra":{}},"models":{"gpt-oss-120b":{}},"republish_s":0.05}"#,
            dir.path(),
        )
        .unwrap();
        let app = App::new(cfg).unwrap();
        let source = app.config().sources[0].clone();
        let key = FeedKey {
            source: "ll".into(),
            model: None,
            location: source.location.clone(),
        };
        app.poll(&source, &key).await;
        assert!(app.rebuild(now_ms()));
        let first = app.snapshot().unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
        assert_eq!(doc["offers"][0]["provider"], "deepinfra");
        // Garbage, then an empty catalog: both refused, the last good entries stay.
        std::fs::write(&file, b"<html>oops</html>").unwrap();
        app.poll(&source, &key).await;
        std::fs::write(&file, b"{}").unwrap();
        app.poll(&source, &key).await;
        let report = app.source_report(now_ms());
        assert_eq!(report[0].1.failures.get("garbage"), Some(&1));
        assert_eq!(report[0].1.failures.get("empty"), Some(&1));
        assert_eq!(report[0].3, 1);
        // Once it ages out the offer is still served, marked stale.
        let later = now_ms() + 5_000;
        assert!(app.rebuild(later));
        let doc: serde_json::Value = serde_json::from_slice(&app.snapshot().unwrap().body).unwrap();
        assert_eq!(doc["offers"].as_array().unwrap().len(), 1);
        assert_eq!(doc["offers"][0]["stale"], true);
        assert_eq!(doc["offers"][0]["provenance"]["price"]["stale"], true);
        assert!(market_router_core::market::validate_any(&app.snapshot().unwrap().body, 0).is_ok());
        let _ = Path::new(".");
    }
}
