//! Envoy mode, upstream role: the same module as an upstream HTTP filter of each provider
//! cluster (root id `market_router_upstream`), run once per attempt of Envoy's router. What
//! each callback decides is the core's (`upstream`: the attempt's provider, its headers, what
//! its answer is held for, how it is recorded); this file hands it the callbacks and carries
//! out what comes back on this VM.

use super::Vm;
use crate::host;
use crate::native;
use log::{debug, error, warn};
use market_router_core::upstream::{self as core, DriftLog, Flow, Out};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType};
use std::cell::Cell;
use std::rc::Rc;

thread_local! {
    /// When this VM last logged a drift.
    static DRIFT_LOG: Cell<DriftLog> = const { Cell::new(DriftLog::NEVER) };
}

/// Logs a route drift (counted already) at error, at most once a minute per VM.
pub(crate) fn log_drift(what: &str) {
    let now = host::now_ms();
    let due = DRIFT_LOG.with(|c| {
        let mut log = c.get();
        let due = log.due(now);
        c.set(log);
        due
    });
    if due {
        error!("{}", core::drift_line(what));
    }
}

/// Whether this plugin instance plays the upstream role (its root id says so).
pub(crate) fn is_upstream_plugin() -> bool {
    host::property(&["plugin_root_id"]).is_some_and(|id| native::is_upstream_root_id(&id))
}

pub(crate) struct Upstream {
    id: u32,
    vm: Rc<Vm>,
    /// The attempt (core).
    attempt: core::Attempt,
}

impl Upstream {
    pub(crate) fn new(id: u32, vm: Rc<Vm>) -> Self {
        Self {
            id,
            vm,
            attempt: core::Attempt::default(),
        }
    }
}

/// Carries out what an attempt's callback led to on this VM.
fn carry_out(vm: &Vm, id: u32, out: Out<'_>) {
    match out {
        Out::Effect { effect, model, now } => super::http::apply(vm, model, None, now, effect),
        Out::Drift(what) => log_drift(&what),
        Out::Attempting { provider } => {
            let p = &vm.config.providers[provider];
            debug!(
                "#{id} market-router: attempt on {} (cluster {})",
                p.name, p.cluster
            );
        }
        Out::FailingOver { provider, outcome } => warn!(
            "#{id} market-router: provider {} failed ({outcome}); Envoy tries the next provider",
            vm.config.providers[provider].name
        ),
        Out::Cut => {
            debug!("#{id} market-router: attempt cut: the client went away before the answer")
        }
        Out::Recorded { now } => vm.metrics.flush_if_due(now),
    }
}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

impl Context for Upstream {
    fn on_done(&mut self) -> bool {
        let (vm, id) = (Rc::clone(&self.vm), self.id);
        self.attempt
            .on_done(&host::Wasm, &vm.config, host::now_ms, |o| {
                carry_out(&vm, id, o)
            });
        true
    }
}

impl HttpContext for Upstream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let (vm, id) = (Rc::clone(&self.vm), self.id);
        action(self.attempt.on_request_headers(
            &host::Wasm,
            &vm.config,
            end_of_stream,
            host::now_ms,
            |o| carry_out(&vm, id, o),
        ))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(
            self.attempt
                .on_request_body(&host::Wasm, body_size, end_of_stream, |n| {
                    host::buffer(BufferType::HttpRequestBody, n)
                }),
        )
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let (vm, id) = (Rc::clone(&self.vm), self.id);
        action(self.attempt.on_response_headers(
            &host::Wasm,
            &vm.config,
            end_of_stream,
            host::now_ms,
            |o| carry_out(&vm, id, o),
        ))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (vm, id) = (Rc::clone(&self.vm), self.id);
        action(self.attempt.on_response_body(
            &host::Wasm,
            &vm.config,
            body_size,
            end_of_stream,
            host::now_ms,
            |n| host::buffer(BufferType::HttpResponseBody, n),
            |o| carry_out(&vm, id, o),
        ))
    }
}
