//! Root context: validates the configuration and keeps the market snapshot fresh.
//!
//! Refresh uses a due-time slot in shared data instead of a singleton service, so it works the
//! same on every proxy-wasm host (Envoy workers, Kong nginx workers): every VM ticks, reads
//! `<prefix>/market_due`, and only the VM whose CAS write moves the due time forward makes the
//! sidecar call. One call per period per process, whatever the worker count.

use super::{
    http::{Ctx, Http},
    read_u64, Vm,
};
use crate::config::Config;
use crate::host;
use crate::market;
use crate::metrics::Global;
use log::{debug, error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};
use std::rc::Rc;

/// Where the market service takes reports (next to the snapshot, on `market.cluster`).
const REPORTS_PATH: &str = "/v1/market/reports";

pub(crate) struct Root {
    id: u32,
    vm: Option<Rc<Vm>>,
    /// Token of the snapshot fetch in flight.
    fetch: Option<u32>,
    /// Token of the market report in flight.
    report: Option<u32>,
    /// Whether the tick period is set: once per root context (Kong traps on a second call).
    ticking: bool,
    /// Envoy mode's upstream role (an upstream filter of the provider clusters).
    upstream: bool,
}

impl Root {
    pub(crate) fn new(id: u32) -> Self {
        Self {
            id,
            vm: None,
            fetch: None,
            report: None,
            ticking: false,
            upstream: false,
        }
    }

    /// Ticks drive the market refresh and write batched counters, so they run with or without
    /// a market, at most 250 ms apart.
    fn tick_period_ms(config: &Config) -> u64 {
        config
            .market
            .as_ref()
            .map_or(250, |m| (m.refresh_ms / 4).clamp(50, 250))
    }

    /// Tries to take this period's refresh slot; true when this VM should fetch now.
    fn claim_refresh(vm: &Vm, now: u64) -> bool {
        let Some(m) = &vm.config.market else {
            return false;
        };
        let Some((due, cas)) = host::shared_get(&vm.keys.market_due) else {
            return false;
        };
        if due.len() >= 8 && now < read_u64(&due) {
            return false;
        }
        let next = now + m.refresh_ms;
        host::shared_set(&vm.keys.market_due, &next.to_le_bytes(), Some(cas)).is_ok()
    }

    /// Says once per streak (per process: only the VM holding the refresh slot checks) that
    /// the market data has gone stale and routing leans on static offers, and when it is fresh
    /// again.
    fn check_staleness(vm: &Vm, now: u64) {
        let Some(m) = &vm.config.market else { return };
        let age = match vm.inner.try_borrow() {
            Ok(inner) => match &inner.market {
                Some(view) => view.age_ms(now),
                None => return,
            },
            Err(_) => return,
        };
        let stale = age > m.max_age_ms;
        let flag = host::shared_get(&vm.keys.market_stale)
            .map(|(b, _)| b)
            .unwrap_or_default();
        let was_stale = flag == b"1";
        if stale && !was_stale {
            warn!(
                "market-router: market data is {age} ms old (market.max_age_ms {}); routing on the last good snapshot (static offers only where it has none)",
                m.max_age_ms
            );
            let _ = host::shared_set(&vm.keys.market_stale, b"1", None);
        } else if !stale && was_stale {
            info!("market-router: market data is fresh again ({age} ms old)");
            let _ = host::shared_set(&vm.keys.market_stale, b"0", None);
        }
    }

    fn start_fetch(&mut self, vm: &Vm) {
        let Some(m) = &vm.config.market else { return };
        let etag = vm
            .inner
            .try_borrow()
            .ok()
            .and_then(|i| i.market.as_ref().and_then(|m| m.etag.clone()));
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", "GET"),
            (":path", m.path.as_str()),
            (":authority", m.authority.as_str()),
            ("accept", "application/json"),
        ];
        if let Some(e) = etag.as_deref() {
            headers.push(("if-none-match", e));
        }
        match host::dispatch(&m.cluster, &headers, &[], m.timeout_ms) {
            Ok(token) => self.fetch = Some(token),
            Err(s) => {
                self.refresh_failed(vm, &format!("cannot call cluster `{}` ({s:?})", m.cluster))
            }
        }
    }

    /// Posts what this process saw since its last report (one per period, on the refresh
    /// slot). Dropped and counted when the service cannot take it: observations are for
    /// routing the fleet, never worth a retry or a request's time.
    fn start_report(&mut self, vm: &Vm) {
        let Some(m) = &vm.config.market else { return };
        if self.report.is_some() || !m.report {
            return;
        }
        let Some(tally) = vm.take_tally() else { return };
        let body = tally.report_json();
        let headers = [
            (":method", "POST"),
            (":path", REPORTS_PATH),
            (":authority", m.authority.as_str()),
            ("content-type", "application/json"),
        ];
        match host::dispatch(&m.cluster, &headers, &body, m.timeout_ms) {
            Ok(token) => self.report = Some(token),
            Err(s) => {
                vm.metrics.inc(Global::ReportsDropped);
                debug!(
                    "market-router: market report dropped: cannot call cluster `{}` ({s:?})",
                    m.cluster
                );
            }
        }
    }

    fn on_report(vm: &Vm, num_headers: usize) {
        let status = if num_headers == 0 || host::call_failure(num_headers).is_some() {
            None
        } else {
            host::header(&host::call_response_headers(), ":status").map(str::to_string)
        };
        if status.as_deref().is_some_and(|s| s.starts_with('2')) {
            vm.metrics.inc(Global::ReportsSent);
        } else {
            vm.metrics.inc(Global::ReportsDropped);
            debug!("market-router: market report dropped (answer {status:?})");
        }
    }

    /// Logs a refresh failure once per failure streak (across all workers) and keeps the last
    /// good snapshot.
    fn refresh_failed(&self, vm: &Vm, why: &str) {
        vm.metrics.inc(Global::RefreshFailed);
        let status = host::shared_get(&vm.keys.market_status)
            .map(|(b, _)| b)
            .unwrap_or_default();
        if status != b"fail" {
            warn!("market-router: market refresh failed: {why}; keeping the last good snapshot");
            let _ = host::shared_set(&vm.keys.market_status, b"fail", None);
        } else {
            debug!("market-router: market refresh failed again: {why}");
        }
    }

    fn refresh_ok(&self, vm: &Vm) {
        let status = host::shared_get(&vm.keys.market_status)
            .map(|(b, _)| b)
            .unwrap_or_default();
        if status == b"fail" {
            info!("market-router: market refresh recovered");
        }
        if status != b"ok" {
            let _ = host::shared_set(&vm.keys.market_status, b"ok", None);
        }
    }

    fn on_snapshot(&mut self, vm: &Vm, num_headers: usize, body_size: usize) {
        if let Some(why) = host::call_failure(num_headers) {
            self.refresh_failed(vm, &format!("the answer broke off ({why})"));
            return;
        }
        let headers = if num_headers == 0 {
            Vec::new()
        } else {
            host::call_response_headers()
        };
        let status = host::header(&headers, ":status");
        match status {
            Some("304") => {
                debug!("market-router: market snapshot not modified");
                vm.metrics.inc(Global::RefreshNotModified);
                self.refresh_ok(vm);
            }
            // The answer's size is checked before it is read into VM memory. Its JSON text
            // takes a few times the stored form; anything past that is no snapshot to keep.
            Some("200") if body_size > vm.config.max_snapshot_bytes.saturating_mul(8) => self
                .refresh_failed(
                    vm,
                    &format!(
                        "snapshot answer of {body_size} bytes is over 8 x limits.max_snapshot_bytes ({}); not read",
                        vm.config.max_snapshot_bytes
                    ),
                ),
            Some("200") => {
                let body =
                    host::buffer(BufferType::HttpCallResponseBody, body_size).unwrap_or_default();
                let etag = host::header(&headers, "etag").map(str::to_string);
                match market::validate(&body, &vm.config, host::now_ms(), etag) {
                    Ok(v) => {
                        if !v.invalid.is_empty() {
                            vm.metrics
                                .inc_by(Global::OffersInvalid, v.invalid.len() as u64);
                            let (i, why) = &v.invalid[0];
                            warn!(
                                "market-router: dropped {} invalid offer(s) from the snapshot (first: offers[{i}]: {why})",
                                v.invalid.len()
                            );
                        }
                        if v.unknown_providers > 0 {
                            debug!(
                                "market-router: ignored {} offer(s) of unconfigured providers",
                                v.unknown_providers
                            );
                        }
                        if self.store(vm, &v.stored) {
                            vm.metrics.inc(Global::RefreshOk);
                            self.refresh_ok(vm);
                        }
                    }
                    Err(e) => self.refresh_failed(vm, &e.to_string()),
                }
            }
            Some(s) => self.refresh_failed(vm, &format!("sidecar answered status {s}")),
            None => self.refresh_failed(vm, "no answer (connection failed, reset or timed out)"),
        }
    }

    /// Stores a validated snapshot and bumps the generation; false when it was not stored.
    fn store(&self, vm: &Vm, stored: &market::Stored) -> bool {
        let encoded = stored.encode();
        if encoded.len() > vm.config.max_snapshot_bytes {
            self.refresh_failed(
                vm,
                &format!(
                    "snapshot of {} offers takes {} bytes, over limits.max_snapshot_bytes ({})",
                    stored.offers.len(),
                    encoded.len(),
                    vm.config.max_snapshot_bytes
                ),
            );
            return false;
        }
        if let Err(e) = host::shared_set(&vm.keys.market, &encoded, None) {
            warn!(
                "market-router: cannot store the market snapshot ({e:?}); keeping the previous one"
            );
            return false;
        }
        for _ in 0..8 {
            let Some((g, cas)) = host::shared_get(&vm.keys.market_gen) else {
                break;
            };
            let next = read_u64(&g) + 1;
            if host::shared_set(&vm.keys.market_gen, &next.to_le_bytes(), Some(cas)).is_ok() {
                info!(
                    "market-router: market snapshot updated: {} offers, generated_at_ms {}",
                    stored.offers.len(),
                    stored.generated_at_ms
                );
                return true;
            }
        }
        warn!("market-router: stored a snapshot but could not bump its generation; workers pick it up after the next refresh");
        true
    }
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        super::unregister_role(self.id);
        true
    }

    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if self.report == Some(token_id) {
            self.report = None;
            if let Some(vm) = self.vm.clone() {
                Self::on_report(&vm, num_headers);
            }
            return;
        }
        if self.fetch != Some(token_id) {
            return;
        }
        self.fetch = None;
        let Some(vm) = self.vm.clone() else { return };
        self.on_snapshot(&vm, num_headers, body_size);
        vm.sync_market(host::now_ms(), true);
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        info!(
            "market-router v{} VM started (root context {})",
            env!("CARGO_PKG_VERSION"),
            self.id
        );
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = host::plugin_configuration().unwrap_or_default();
        let config = match Config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                error!("market-router: invalid plugin configuration: {e}");
                return false;
            }
        };
        let upstream = super::upstream::is_upstream_plugin();
        let role = crate::native::Role {
            upstream,
            mode: config.failover.mode,
        };
        if let Err(e) = super::register_role(self.id, role) {
            error!("market-router: invalid plugin configuration: {e}");
            return match role.refused() {
                crate::native::Refused::Configuration => false,
                crate::native::Refused::Requests => {
                    self.vm = None;
                    true
                }
            };
        }
        let seed = host::now_ms() ^ (u64::from(self.id) << 32);
        let vm = super::shared_vm(&bytes, config, seed);
        if vm.config.market.is_some() {
            // Create the refresh slot once so later claims are all CAS writes.
            if host::shared_get(&vm.keys.market_due).is_none_or(|(v, _)| v.is_empty()) {
                let _ = host::shared_set(&vm.keys.market_due, &0u64.to_le_bytes(), None);
            }
        }
        if !self.ticking {
            self.ticking = host::set_tick_period_ms(Self::tick_period_ms(&vm.config));
        }
        vm.sync_market(host::now_ms(), true);
        info!(
            "market-router configured: {} provider(s), strategy {}, failover {}, market {}",
            vm.config.providers.len(),
            vm.config.routing.strategy.as_str(),
            vm.config.failover.mode.as_str(),
            vm.config
                .market
                .as_ref()
                .map_or("none", |m| m.cluster.as_str())
        );
        self.upstream = upstream;
        self.vm = Some(vm);
        true
    }

    fn on_tick(&mut self) {
        let Some(vm) = self.vm.clone() else { return };
        let now = host::now_ms();
        vm.metrics.flush(now);
        vm.flush_tally();
        vm.sync_market(now, true);
        if let Ok(inner) = vm.inner.try_borrow() {
            if let Some(m) = &inner.market {
                vm.metrics.snapshot(m.age_ms(now), m.offers);
            }
        }
        if self.fetch.is_none() && Self::claim_refresh(&vm, now) {
            Self::check_staleness(&vm, now);
            self.start_fetch(&vm);
            self.start_report(&vm);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Never None: proxy-wasm 0.2 panics on it, which kills the VM for the whole worker.
        let Some(vm) = self.vm.clone() else {
            return Some(Box::new(Ctx::Unconfigured));
        };
        if self.upstream {
            return Some(Box::new(super::upstream::Upstream::new(context_id, vm)));
        }
        Some(Box::new(Ctx::Live(Http::new(context_id, vm))))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
