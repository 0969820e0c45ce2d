//! market-router: a proxy-wasm HTTP filter that routes OpenAI-compatible LLM requests to the
//! best provider for each request, by live market stats, and fails over when a provider fails.
//!
//! This crate is the proxy-wasm glue, built for wasm32-wasip1 as `market_router.wasm`: the root
//! context (configuration, market refresh) and the HTTP context (one request's walk), over the
//! per-VM state below, and `host`, the only module calling `proxy_wasm::hostcalls`. Decisions
//! live in the core (crate `market-router-core`). Natively the crate is empty.
#![cfg(target_arch = "wasm32")]
#![warn(rust_2018_idioms, unreachable_pub)]

mod host;
mod http;
mod root;
mod upstream;

// The core's modules, at the paths the glue names them by (`crate::config`, ...).
use market_router_core::{
    answer, attempt, config, errors, exchange, explain, handover, headers, health, market, native,
    outbound, refresh, report, request, rng, routing, served, shared, walk,
};

use crate::config::Config;
use crate::health::{HealthTable, Observation};
use crate::market::{MarketView, Stored};
use crate::report::Tallies;
use crate::rng::Rng;
use log::{debug, info, warn};
use market_router_core::host::{Update, CAS_TRIES};
use market_router_core::metrics::{self, Global, PerProvider};
use proxy_wasm::types::MetricType;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// How often a VM looks for a newer market generation from the request path, ms.
const MARKET_CHECK_MS: u64 = 250;
/// How often a VM re-reads the shared health table from the request path, ms: what other
/// workers observed reaches this one within this time (its own observations at once).
const HEALTH_CHECK_MS: u64 = 20;

proxy_wasm::main! {{
    // Up to debug: the host filters by its own level (its level cannot be asked: see host::HostCaps).
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Debug);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::Root::new(context_id))
    });
}}

/// Shared-data key names, all under `<prefix>/` so they resolve to one Kong shm_kv zone.
#[derive(Debug)]
pub(crate) struct Keys {
    /// Validated snapshot.
    market: String,
    /// Generation counter of `market` (small, read often).
    market_gen: String,
    /// Refresh slot: when the next fetch is due.
    market_due: String,
    /// Last refresh outcome, for once-per-streak logging.
    market_status: String,
    /// Whether the market data was last seen stale, for once-per-streak logging.
    market_stale: String,
    /// Health table.
    health: String,
    /// What the process saw since its last market report (`report::Tallies`).
    obs: String,
    /// Prefix of affinity slots.
    affinity: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Self {
            market: format!("{prefix}/market"),
            market_gen: format!("{prefix}/market_gen"),
            market_due: format!("{prefix}/market_due"),
            market_status: format!("{prefix}/market_status"),
            market_stale: format!("{prefix}/market_stale"),
            health: format!("{prefix}/health"),
            obs: format!("{prefix}/obs"),
            affinity: format!("{prefix}/aff/"),
        }
    }
}

/// Metric ids of this VM (`None` where the host refused a definition).
/// How often counters kept in VM memory are written to the host from the request path, ms
/// (the root context's tick writes them too).
const METRICS_FLUSH_MS: u64 = 100;

/// Metric ids of this VM (`None` where the host refused a definition). Counters are kept in
/// VM memory and written to the host in batches (on tick, and from the request path at most
/// every `METRICS_FLUSH_MS`): one host call per counter per flush instead of one per event.
pub(crate) struct Metrics {
    /// Counter ids: the global ones (`Global` order), then per provider (`PerProvider` order).
    counters: Vec<Option<u32>>,
    /// Increments not written yet, same order.
    pending: Vec<Cell<u64>>,
    last_flush_ms: Cell<u64>,
    snapshot_age: Option<u32>,
    snapshot_offers: Option<u32>,
    decision_us: Option<u32>,
}

impl Metrics {
    fn define(config: &Config) -> Self {
        let mut counters: Vec<Option<u32>> = Global::ALL
            .iter()
            .map(|g| host::define_metric(MetricType::Counter, g.name()))
            .collect();
        for p in &config.providers {
            counters.extend(
                PerProvider::ALL
                    .iter()
                    .map(|m| host::define_metric(MetricType::Counter, &m.name(&p.name))),
            );
        }
        Self {
            pending: counters.iter().map(|_| Cell::new(0)).collect(),
            counters,
            last_flush_ms: Cell::new(0),
            snapshot_age: host::define_metric(MetricType::Gauge, metrics::SNAPSHOT_AGE_MS),
            snapshot_offers: host::define_metric(MetricType::Gauge, metrics::SNAPSHOT_OFFERS),
            decision_us: host::define_metric(MetricType::Histogram, metrics::DECISION_US),
        }
    }

    fn bump(&self, slot: usize, by: u64) {
        if let Some(p) = self.pending.get(slot) {
            p.set(p.get().saturating_add(by));
        }
    }

    pub(crate) fn inc(&self, g: Global) {
        self.inc_by(g, 1);
    }

    pub(crate) fn inc_by(&self, g: Global, by: u64) {
        self.bump(g as usize, by);
    }

    pub(crate) fn add(&self, provider: usize, m: PerProvider, by: u64) {
        self.bump(
            Global::ALL.len() + provider * PerProvider::ALL.len() + m as usize,
            by,
        );
    }

    /// Writes the pending increments to the host.
    pub(crate) fn flush(&self, now: u64) {
        self.last_flush_ms.set(now);
        for (id, pending) in self.counters.iter().zip(&self.pending) {
            let n = pending.replace(0);
            if let (Some(id), true) = (id, n > 0) {
                host::increment_metric(*id, n.min(i64::MAX as u64) as i64);
            }
        }
    }

    /// Flushes when the last flush is at least `METRICS_FLUSH_MS` old.
    pub(crate) fn flush_if_due(&self, now: u64) {
        if now >= self.last_flush_ms.get() + METRICS_FLUSH_MS {
            self.flush(now);
        }
    }

    pub(crate) fn snapshot(&self, age_ms: u64, offers: usize) {
        if let Some(id) = self.snapshot_age {
            host::record_metric(id, age_ms);
        }
        if let Some(id) = self.snapshot_offers {
            host::record_metric(id, offers as u64);
        }
    }

    pub(crate) fn decision_time(&self, us: u64) {
        if let Some(id) = self.decision_us {
            host::record_metric(id, us);
        }
    }
}

thread_local! {
    /// The last configured VM state and the configuration bytes it came from.
    static CONFIGURED: RefCell<Option<(Vec<u8>, Rc<Vm>)>> = const { RefCell::new(None) };
}

thread_local! {
    /// The roles of this VM's configured plugins (core: `native::Roles`).
    static ROLES: RefCell<crate::native::Roles> = const { RefCell::new(crate::native::Roles::new()) };
}

/// Registers the role of the plugin of root context `id`, unless it cannot run beside the
/// VM's other plugins (`native::check_roles`).
pub(crate) fn register_role(
    id: u32,
    role: crate::native::Role,
) -> Result<(), crate::config::ConfigError> {
    ROLES.with(|r| match r.try_borrow_mut() {
        Ok(mut roles) => roles.register(id, role),
        Err(_) => Ok(()),
    })
}

/// Forgets the role of the plugin of root context `id` (the host removed it).
pub(crate) fn unregister_role(id: u32) {
    ROLES.with(|r| {
        if let Ok(mut roles) = r.try_borrow_mut() {
            roles.unregister(id);
        }
    });
}

/// The VM state for a plugin configuration: plugins of one VM with the same configuration
/// (envoy mode's downstream and upstream roles) share one, so what an attempt records is seen
/// by the next request's ranking at once, not after the next shared-data read.
pub(crate) fn shared_vm(bytes: &[u8], config: Config, seed: u64) -> Rc<Vm> {
    CONFIGURED.with(|c| {
        let Ok(mut slot) = c.try_borrow_mut() else {
            return Rc::new(Vm::new(config, seed));
        };
        if let Some((b, vm)) = slot.as_ref() {
            if b.as_slice() == bytes {
                return Rc::clone(vm);
            }
        }
        let vm = Rc::new(Vm::new(config, seed));
        *slot = Some((bytes.to_vec(), Rc::clone(&vm)));
        vm
    })
}

/// Per-VM state shared by the root context and the HTTP contexts of one worker.
pub(crate) struct Vm {
    pub(crate) config: Config,
    pub(crate) keys: Keys,
    pub(crate) metrics: Metrics,
    pub(crate) inner: RefCell<VmInner>,
}

pub(crate) struct VmInner {
    pub(crate) market: Option<Rc<MarketView>>,
    market_gen: u64,
    market_checked_ms: u64,
    pub(crate) health: HealthTable,
    health_cas: u32,
    health_checked_ms: u64,
    pub(crate) rng: Rng,
    /// What this VM saw since its last tick (merged into `keys.obs` on tick).
    tally: Tallies,
}

impl Vm {
    pub(crate) fn new(config: Config, seed: u64) -> Self {
        let keys = Keys::new(&config.shared_data_prefix);
        let seed = config.routing.seed.unwrap_or(seed);
        let metrics = Metrics::define(&config);
        Self {
            config,
            keys,
            metrics,
            inner: RefCell::new(VmInner {
                market: None,
                market_gen: 0,
                market_checked_ms: 0,
                health: HealthTable::default(),
                health_cas: 0,
                health_checked_ms: 0,
                rng: Rng::new(seed),
                tally: Tallies::default(),
            }),
        }
    }

    /// Re-decodes the market when the shared generation moved (at most every `MARKET_CHECK_MS`
    /// unless `force`).
    pub(crate) fn sync_market(&self, now: u64, force: bool) {
        if self.config.market.is_none() {
            return;
        }
        let Ok(mut inner) = self.inner.try_borrow_mut() else {
            return;
        };
        if !force && inner.market.is_some() && now < inner.market_checked_ms + MARKET_CHECK_MS {
            return;
        }
        inner.market_checked_ms = now;
        let Some((gen_bytes, _)) = host::shared_get(&self.keys.market_gen) else {
            return;
        };
        let generation = refresh::read_u64(&gen_bytes);
        if generation == 0 || generation == inner.market_gen {
            return;
        }
        if let Some((bytes, _)) = host::shared_get(&self.keys.market) {
            if let Some(stored) = Stored::decode(&bytes) {
                let view = MarketView::new(stored, &self.config);
                debug!(
                    "market-router: market generation {generation} loaded ({} offers)",
                    view.offers
                );
                inner.market = Some(Rc::new(view));
                inner.market_gen = generation;
            }
        }
    }

    /// Refreshes the cached health table when the shared copy changed (at most every
    /// `HEALTH_CHECK_MS` unless `force`).
    pub(crate) fn sync_health(&self, now: u64, force: bool) {
        let Ok(mut inner) = self.inner.try_borrow_mut() else {
            return;
        };
        if !force && now < inner.health_checked_ms + HEALTH_CHECK_MS {
            return;
        }
        inner.health_checked_ms = now;
        let Some((bytes, cas)) = host::shared_get(&self.keys.health) else {
            return;
        };
        if cas != inner.health_cas {
            inner.health = HealthTable::decode(&bytes);
            inner.health_cas = cas;
        }
    }

    /// Applies `f` to the shared health table with CAS; gives up after `CAS_TRIES`.
    /// `f` returns whether the change is worth writing. Returns whether it was applied.
    fn update_health(&self, f: impl Fn(&mut HealthTable) -> bool) -> bool {
        let update = market_router_core::host::cas_update(
            &host::Wasm,
            &self.keys.health,
            CAS_TRIES,
            HealthTable::decode,
            HealthTable::encode,
            f,
        );
        match update {
            Update::Written(table) => {
                if let Ok(mut inner) = self.inner.try_borrow_mut() {
                    inner.health = table;
                    // The next read sees a new CAS and reloads: cheaper than guessing it.
                    inner.health_cas = 0;
                }
                true
            }
            Update::Declined => false,
            Update::Refused(s) => {
                warn!("market-router: health update refused by the host ({s:?}); skipped");
                false
            }
            Update::GaveUp => {
                debug!(
                    "market-router: health update gave up after {CAS_TRIES} CAS conflicts; skipped"
                );
                false
            }
        }
    }

    /// Records what an attempt said about a provider.
    pub(crate) fn observe(&self, provider: &str, obs: Observation, now: u64) {
        let circuit = self.config.failover.circuit;
        // Most successes change nothing other workers need (a clean record, a time to first
        // byte within 10 % of its average): judged on this VM's copy of the table, kept there,
        // and the shared table is neither read nor written.
        if let Ok(mut inner) = self.inner.try_borrow_mut() {
            if inner.health.observe_locally(provider, obs, now, &circuit) {
                return;
            }
        }
        let opened = std::cell::Cell::new(false);
        self.update_health(|t| {
            let o = shared::observe(t, provider, obs, now, &circuit);
            opened.set(o.opened);
            o.material
        });
        if opened.get() {
            if let Some(idx) = self.config.provider_index(provider) {
                self.metrics.add(idx, PerProvider::CircuitOpen, 1);
            }
            warn!(
                "market-router: circuit opened for provider {provider} for {} ms after repeated failures",
                circuit.cooldown_ms
            );
        }
    }

    /// Notes an attempt's outcome for the market report, in VM memory only (no host call).
    pub(crate) fn tally(
        &self,
        provider: usize,
        model: &str,
        outcome: &crate::attempt::Outcome,
        ttfb_ms: Option<u64>,
    ) {
        if !self.config.market.as_ref().is_some_and(|m| m.report) {
            return;
        }
        let Some(p) = self.config.providers.get(provider) else {
            return;
        };
        if let Ok(mut inner) = self.inner.try_borrow_mut() {
            inner.tally.record(&p.name, model, outcome, ttfb_ms);
        }
    }

    /// Notes for the market report that a stream counted as a success broke off mid-body.
    pub(crate) fn tally_broken_stream(&self, provider: usize, model: &str) {
        if !self.config.market.as_ref().is_some_and(|m| m.report) {
            return;
        }
        let Some(p) = self.config.providers.get(provider) else {
            return;
        };
        if let Ok(mut inner) = self.inner.try_borrow_mut() {
            inner.tally.broke_off(&p.name, model);
        }
    }

    /// Merges this VM's tally into the process-wide one (tick only; one CAS write when there
    /// is something new). On give-up the tally stays for the next tick.
    pub(crate) fn flush_tally(&self) {
        let Ok(mut inner) = self.inner.try_borrow_mut() else {
            return;
        };
        if inner.tally.is_empty() {
            return;
        }
        match shared::merge_tally(&host::Wasm, &self.keys.obs, &inner.tally) {
            Update::Written(_) => inner.tally = Tallies::default(),
            Update::Refused(s) => {
                debug!("market-router: report tally refused by the host ({s:?}); kept")
            }
            Update::Declined | Update::GaveUp => {}
        }
    }

    /// Takes the process-wide tally (leaving it empty) for this period's report.
    pub(crate) fn take_tally(&self) -> Option<Tallies> {
        self.flush_tally();
        shared::take_tally(&host::Wasm, &self.keys.obs)
    }

    /// Claims the half-open probe of `provider`; false when another request has it.
    pub(crate) fn claim_probe(&self, provider: &str, now: u64) -> bool {
        let until = now + self.config.failover.attempt_timeout_ms;
        let claimed = self.update_health(|t| shared::claim_probe(t, provider, now, until));
        if claimed {
            info!("market-router: probing provider {provider} after its circuit cooldown");
        }
        claimed
    }
}
