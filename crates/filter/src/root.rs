//! Root context: validates the configuration and keeps the market snapshot fresh.
//!
//! The refresh's decisions (the per-period slot, staleness, the fetch and its answer, the
//! report) are the core's (`refresh`); this turns ticks and call answers into its events, and
//! its effects into counters and log lines.

use super::{
    http::{Ctx, Http},
    Vm,
};
use crate::config::Config;
use crate::host;
use crate::refresh::{self, Answer, Call, Effect, Held, Refresh};
use log::{error, info};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use std::rc::Rc;

pub(crate) struct Root {
    id: u32,
    vm: Option<Rc<Vm>>,
    /// The refresh calls in flight.
    refresh: Refresh,
    /// Whether the tick period is set: once per root context (Kong traps on a second call).
    ticking: bool,
    /// Envoy mode's upstream role (an upstream filter of the provider clusters).
    upstream: bool,
}

/// The refresh's shared-data keys.
fn keys(vm: &Vm) -> refresh::Keys<'_> {
    refresh::Keys {
        market: &vm.keys.market,
        market_gen: &vm.keys.market_gen,
        market_due: &vm.keys.market_due,
        market_status: &vm.keys.market_status,
        market_stale: &vm.keys.market_stale,
    }
}

/// Hands `f` the call answer being delivered, as the refresh reads it: `failure` is the host's
/// word that the call broke off (`host::call_failure`); no headers are read when it did or when
/// there are none.
fn with_answer(
    failure: Option<String>,
    num_headers: usize,
    body_size: usize,
    f: impl FnOnce(&Answer<'_>),
) {
    let headers = if failure.is_some() || num_headers == 0 {
        Vec::new()
    } else {
        host::call_response_headers()
    };
    f(&Answer {
        failure: failure.as_deref(),
        headers: &headers,
        body_size,
    })
}

/// Writes a refresh effect: a counter (batched in VM memory) or a log line.
fn apply(vm: &Vm, effect: Effect) {
    match effect {
        Effect::Count(g, by) => vm.metrics.inc_by(g, by),
        Effect::Log(level, line) => log::log!(level, "{line}"),
    }
}

impl Root {
    pub(crate) fn new(id: u32) -> Self {
        Self {
            id,
            vm: None,
            refresh: Refresh::default(),
            ticking: false,
            upstream: false,
        }
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
        let call = self.refresh.answered(token_id);
        let Some(vm) = self.vm.clone() else { return };
        match call {
            Call::Report => {
                // Asked only when the answer has headers (see `host::call_failure`).
                let failure = if num_headers == 0 {
                    None
                } else {
                    host::call_failure(num_headers)
                };
                with_answer(failure, num_headers, body_size, |answer| {
                    refresh::on_report(answer, &mut |e| apply(&vm, e))
                });
            }
            Call::Snapshot => {
                let failure = host::call_failure(num_headers);
                with_answer(failure, num_headers, body_size, |answer| {
                    refresh::on_snapshot(
                        &host::Wasm,
                        &vm.config,
                        &keys(&vm),
                        answer,
                        host::call_response_body,
                        host::now_ms(),
                        &mut |e| apply(&vm, e),
                    );
                });
                vm.sync_market(host::now_ms(), true);
            }
            Call::Other => {}
        }
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
            refresh::create_slot(&host::Wasm, &keys(&vm));
        }
        if !self.ticking {
            self.ticking = host::set_tick_period_ms(refresh::tick_period_ms(&vm.config));
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
        let view = vm.inner.try_borrow().ok().and_then(|i| i.market.clone());
        let held = view.as_ref().map(|m| {
            let age_ms = m.age_ms(now);
            vm.metrics.snapshot(age_ms, m.offers);
            Held {
                age_ms,
                etag: m.etag.as_deref(),
            }
        });
        self.refresh.tick(
            &host::Wasm,
            &vm.config,
            &keys(&vm),
            now,
            held,
            || vm.take_tally(),
            &mut |e| apply(&vm, e),
        );
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
