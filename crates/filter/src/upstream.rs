//! Envoy mode, upstream role: the same module as an upstream HTTP filter of each provider
//! cluster (root id `market_router_upstream`), run once per attempt of Envoy's router.
//!
//! Per attempt: find the provider by the attempt's cluster, remove every provider's credential
//! headers (attempts share one request-header map) and set this provider's own, rewrite `model`
//! to its id, hold a streaming answer's headers until its first chunk (so a reset or an SSE
//! error event before it stays retriable), and record the outcome: shared health, counters and
//! the attempt list the downstream role reads back (`native::TRIED_PROPERTY`).

use super::Vm;
use crate::attempt::{Outcome, Outcome::*};
use crate::health::Observation;
use crate::host;
use crate::metrics::{self, PerProvider};
use crate::native::{self, Plan, Tried};
use crate::request;
use log::{debug, error, warn};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType};
use std::cell::Cell;
use std::rc::Rc;

thread_local! {
    /// When this VM last logged a drift (ms; 0: never).
    static DRIFT_LOGGED_MS: Cell<u64> = const { Cell::new(0) };
}
/// A drift is logged at most this often per VM (each one is counted).
const DRIFT_LOG_EVERY_MS: u64 = 60_000;

/// Envoy's route and the plugin's providers do not match: counted every time
/// (`market_router.route_drift`), logged at error at most once a minute per VM, in one line
/// naming what to regenerate.
pub(crate) fn drift(vm: &Vm, what: &str) {
    vm.metrics.inc(crate::metrics::Global::RouteDrift);
    let now = host::now_ms();
    let last = DRIFT_LOGGED_MS.with(Cell::get);
    if last == 0 || now >= last + DRIFT_LOG_EVERY_MS {
        DRIFT_LOGGED_MS.with(|c| c.set(now.max(1)));
        error!(
            "market-router: envoy mode: {what}; the route's priority groups and clusters do not match the plugin's providers: regenerate them from this plugin configuration with market-router-envoy-config (counted in market_router.route_drift; logged at most once a minute)"
        );
    }
}

/// Whether this plugin instance plays the upstream role (its root id says so).
pub(crate) fn is_upstream_plugin() -> bool {
    host::property(&["plugin_root_id"]).is_some_and(|id| native::is_upstream_root_id(&id))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    None,
    /// A 2xx stream's headers, until the first body chunk.
    FirstChunk,
    /// A 2xx non-streaming answer's headers, until the whole body (malformed check).
    WholeBody,
    /// An error answer's headers, until its body (or its first `ERROR_READ_BYTES`): what the
    /// provider said goes to the decision record.
    ErrorBody,
}

pub(crate) struct Upstream {
    id: u32,
    vm: Rc<Vm>,
    plan: Option<Plan>,
    provider: Option<usize>,
    /// The body needs this model id written in.
    rewrite: Option<String>,
    started_ms: u64,
    recorded: bool,
    hold: Hold,
    status: u32,
    /// The attempt list as this attempt found it (earlier attempts of the request).
    tried: Vec<u8>,
}

impl Upstream {
    pub(crate) fn new(id: u32, vm: Rc<Vm>) -> Self {
        Self {
            id,
            vm,
            plan: None,
            provider: None,
            rewrite: None,
            started_ms: 0,
            recorded: false,
            hold: Hold::None,
            status: 0,
            tried: Vec::new(),
        }
    }

    /// Records how the attempt ended: counters, shared health, the attempt list.
    fn record(&mut self, outcome: Outcome, now: u64) {
        self.record_with(outcome, None, now);
    }

    fn record_with(&mut self, outcome: Outcome, usage: Option<metrics::Usage>, now: u64) {
        let (Some(p), false) = (self.provider, self.recorded) else {
            return;
        };
        self.recorded = true;
        let vm = Rc::clone(&self.vm);
        let config = &vm.config;
        let name = config.providers[p].name.as_str();
        let stream = self.plan.as_ref().is_some_and(|pl| pl.stream);
        let ttfb = (stream && matches!(outcome, Success(_)))
            .then(|| now.saturating_sub(self.started_ms) as f64);
        // For the market report, as route mode notes each attempt.
        if let Some(plan) = &self.plan {
            vm.tally(p, &plan.model, &outcome, ttfb.map(|t| t as u64));
        }
        if let Some(obs) = outcome.observation(ttfb) {
            if matches!(obs, Observation::Failure { .. }) {
                vm.metrics.add(p, PerProvider::Failure, 1);
            }
            vm.observe(name, obs, now);
        }
        let mut list = std::mem::take(&mut self.tried);
        let before = if list.is_empty() {
            0
        } else {
            list.iter().filter(|b| **b == b',').count() + 1
        };
        native::push_tried(
            &mut list,
            Tried {
                provider: p,
                outcome,
                usage,
            },
        );
        host::set_property(native::TRIED_PROPERTY, &list);
        match outcome {
            Success(_) => vm.metrics.add(p, PerProvider::Success, 1),
            o if o.retryable(&config.failover.retry_on, &config.failover.retry_on_status) => {
                let planned = self.plan.as_ref().map_or(0, |pl| pl.providers.len());
                if before + 1 < planned {
                    vm.metrics.add(p, PerProvider::Failover, 1);
                    warn!(
                        "#{} market-router: provider {name} failed ({o}); Envoy tries the next provider",
                        self.id
                    );
                }
            }
            _ => {}
        }
        vm.metrics.flush_if_due(now);
    }

    /// How an attempt ended that never reached (or never finished) its response headers.
    fn lost_outcome(&self, now: u64) -> Outcome {
        let transport =
            host::property(&["upstream", "transport_failure_reason"]).unwrap_or_default();
        let per_try = self.plan.as_ref().map_or(u64::MAX, |p| p.per_try_ms);
        if !transport.is_empty() {
            ConnectFailure
        } else if now.saturating_sub(self.started_ms) + 5 >= per_try {
            Timeout
        } else {
            Reset
        }
    }
}

impl Context for Upstream {
    fn on_done(&mut self) -> bool {
        if self.provider.is_some() && !self.recorded {
            // Cut because the client went away first: says nothing about the provider (a
            // user stopping a request must not open its circuit).
            if host::property(&["response", "code_details"]).as_deref()
                == Some("downstream_remote_disconnect")
            {
                self.recorded = true;
                debug!(
                    "#{} market-router: attempt cut: the client went away before the answer",
                    self.id
                );
                return true;
            }
            let now = host::now_ms();
            let outcome = self.lost_outcome(now);
            self.record(outcome, now);
        }
        true
    }
}

impl HttpContext for Upstream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // No plan: a request the downstream role did not route (passthrough); hands off.
        let Some(plan) =
            host::property(&[native::PLAN_PROPERTY]).and_then(|s| Plan::decode(s.as_bytes()))
        else {
            return Action::Continue;
        };
        let vm = Rc::clone(&self.vm);
        let config = &vm.config;
        let cluster = host::property(&["xds", "cluster_name"]).unwrap_or_default();
        let Some(p) = config.providers.iter().position(|p| p.cluster == cluster) else {
            drift(
                &vm,
                &format!("the route sent an attempt to cluster `{cluster}`, which no provider in the plugin configuration uses"),
            );
            return Action::Continue;
        };
        self.tried = host::property(&[native::TRIED_PROPERTY])
            .map(String::into_bytes)
            .unwrap_or_default();
        // Envoy walks the route's priority groups in the order handed over: attempt N must be
        // on the order's N-th provider (the last one if Envoy tries more).
        let before = if self.tried.is_empty() {
            0
        } else {
            self.tried.iter().filter(|b| **b == b',').count() + 1
        };
        if let Some(&(want, _)) = plan.providers.get(before).or(plan.providers.last()) {
            if want != p {
                let w = &config.providers[want];
                drift(
                    &vm,
                    &format!(
                        "attempt {} of a request went to cluster `{cluster}` (provider {}) where the order named provider {} (cluster `{}`)",
                        before + 1,
                        config.providers[p].name,
                        w.name,
                        w.cluster
                    ),
                );
            }
        }
        self.provider = Some(p);
        self.started_ms = host::now_ms();
        vm.metrics.add(p, PerProvider::Attempts, 1);
        let provider = &config.providers[p];
        if provider.authority != provider.cluster {
            host::set_request_header(":authority", Some(&provider.authority));
        }
        // Attempts share one header map: a retry starts from the client's path and drops the
        // credentials an earlier attempt set for its provider (the downstream role removed the
        // client's own before the first).
        if !self.tried.is_empty() {
            if !plan.path.is_empty() {
                host::set_request_header(":path", Some(&plan.path));
            }
            for name in native::credential_headers(config) {
                if name == "authorization" && config.failover.forward_client_authorization {
                    continue;
                }
                if !provider.headers.iter().any(|(k, _)| *k == name) {
                    host::set_request_header(&name, None);
                }
            }
        }
        for (k, v) in &provider.headers {
            host::set_request_header(k, Some(v));
        }
        // This role reads answers (a stream's first chunk, a checked answer whole): ask for
        // bytes it can read; Envoy's compressors encode what reaches the client.
        host::set_request_header("accept-encoding", Some(crate::answer::IDENTITY));
        let model = plan.model_for(p).unwrap_or(plan.model.as_str());
        if model != plan.model {
            self.rewrite = Some(model.to_string());
        }
        debug!(
            "#{} market-router: attempt on {} (cluster {cluster})",
            self.id, provider.name
        );
        self.plan = Some(plan);
        if self.rewrite.is_some() && !end_of_stream {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(model) = self.rewrite.as_deref() else {
            return Action::Continue;
        };
        if !end_of_stream {
            return Action::Pause;
        }
        let Some(body) = host::buffer(BufferType::HttpRequestBody, body_size) else {
            return Action::Continue;
        };
        if let Some(new_body) = request::parse(&body)
            .ok()
            .and_then(|info| request::rewrite_model(&body, &info, model))
        {
            if host::set_buffer(BufferType::HttpRequestBody, body_size, &new_body) {
                host::set_request_header("content-length", Some(&new_body.len().to_string()));
            }
        }
        self.rewrite = None;
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.provider.is_none() || self.recorded {
            return Action::Continue;
        }
        let now = host::now_ms();
        self.status = host::response_header(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if (200..300).contains(&self.status) {
            let stream = self.plan.as_ref().is_some_and(|p| p.stream);
            // Compressed although asked for identity, or too big to hold: delivered as it
            // came, not charged a failure.
            let readable =
                !crate::answer::is_encoded(host::response_header("content-encoding").as_deref());
            let holdable = crate::answer::fits(
                host::response_header("content-length").as_deref(),
                crate::answer::HOLD_LIMIT_BYTES,
            );
            if !readable || (!stream && !holdable) {
                self.record(Success(self.status), now);
                return Action::Continue;
            }
            let check_body = !stream && self.vm.config.failover.retry_on.malformed;
            if stream && !end_of_stream {
                self.hold = Hold::FirstChunk;
                return Action::Pause;
            }
            if check_body && !end_of_stream {
                self.hold = Hold::WholeBody;
                return Action::Pause;
            }
            if check_body {
                // A 2xx without a body is no answer.
                host::set_response_header(":status", "502");
                self.record(Malformed, now);
            } else {
                self.record(Success(self.status), now);
            }
            return Action::Continue;
        }
        let retry_after = host::response_header("retry-after")
            .as_deref()
            .and_then(crate::health::parse_retry_after);
        self.record(
            Status {
                status: self.status,
                retry_after_ms: retry_after,
            },
            now,
        );
        // Held until its body says why (an error body is small; a compressed one is not read).
        if !end_of_stream
            && !crate::answer::is_encoded(host::response_header("content-encoding").as_deref())
        {
            self.hold = Hold::ErrorBody;
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match self.hold {
            Hold::None => Action::Continue,
            Hold::FirstChunk => {
                if body_size == 0 && !end_of_stream {
                    return Action::Pause;
                }
                let now = host::now_ms();
                let chunk = host::buffer(BufferType::HttpResponseBody, body_size.min(4096))
                    .unwrap_or_default();
                self.hold = Hold::None;
                if native::sse_error_first(&chunk) {
                    // Not started: a 503 makes Envoy try the next provider.
                    host::set_response_header(":status", "503");
                    self.record(
                        Status {
                            status: 503,
                            retry_after_ms: None,
                        },
                        now,
                    );
                } else {
                    self.record(Success(self.status), now);
                }
                Action::Continue
            }
            Hold::ErrorBody => {
                if !end_of_stream && body_size < crate::answer::ERROR_READ_BYTES {
                    return Action::Pause;
                }
                self.hold = Hold::None;
                let n = body_size.min(crate::answer::ERROR_READ_BYTES);
                if let Some(said) = host::buffer(BufferType::HttpResponseBody, n)
                    .and_then(|b| crate::answer::provider_message(&b))
                {
                    host::set_property(native::SAID_PROPERTY, said.as_bytes());
                }
                Action::Continue
            }
            Hold::WholeBody => {
                if !end_of_stream {
                    if body_size <= crate::answer::HOLD_LIMIT_BYTES {
                        return Action::Pause;
                    }
                    // A chunked answer grew past what may be held: it flows on unchecked
                    // (the downstream role prices it from the usage at its end).
                    self.hold = Hold::None;
                    self.record(Success(self.status), host::now_ms());
                    return Action::Continue;
                }
                let now = host::now_ms();
                let body =
                    host::buffer(BufferType::HttpResponseBody, body_size).unwrap_or_default();
                self.hold = Hold::None;
                match metrics::inspect_answer(&body) {
                    Err(_) => {
                        host::set_response_header(":status", "502");
                        self.record(Malformed, now);
                    }
                    Ok(usage) => self.record_with(Success(self.status), usage, now),
                }
                Action::Continue
            }
        }
    }
}
