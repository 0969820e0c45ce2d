//! HTTP context: one request's walk from body to chosen provider and back.
//!
//! Route mode: the body callback ranks providers and sets the cluster header; the route sends
//! the request; the response callbacks classify the outcome and, when it is retryable, hold
//! the response and re-dispatch the buffered request to the next provider, replacing the
//! answer. Dispatch mode: every attempt is a `dispatch_http_call` from the request phase.

mod native;

use super::Vm;
use crate::answer;
use crate::attempt::{classify_dispatched, classify_routed, Attempts, Outcome};
use crate::config::FailoverMode;
use crate::errors::ApiError;
use crate::explain;
use crate::headers;
use crate::host;
use crate::metrics::{self, Global, PerProvider, Usage};
use crate::request::{self, RequestInfo};
use crate::select::{self, NoRoute, Prefs};
use crate::walk::{Effect, Verdict, Walk};
use log::{debug, warn};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType};
use serde_json::json;
use std::borrow::Cow;
use std::rc::Rc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not an LLM request: hands off.
    Passthrough,
    /// Holding headers while the body arrives.
    Reading,
    /// First attempt sent through the host's route.
    Routed,
    /// Route mode: holding a 2xx answer until its body is complete (validity, usage, cost).
    Validating,
    /// Route mode: a streaming answer is flowing to the client.
    Streaming,
    /// Route mode: a non-streaming 2xx too big to hold (or compressed) flows to the client;
    /// its end is kept to read the usage.
    Unheld,
    /// Route mode: the last attempt's error answer is read for what the provider said, then
    /// replaced by the final error.
    ReadingError,
    /// Route mode: a fallback's answer (or the final error) is ready and waits for the end of
    /// the held routed answer, whose place it takes.
    Replacing,
    /// An attempt by `dispatch_http_call` is in flight.
    Dispatched,
    /// An attempt ended without a body from the host; a bounce call (see
    /// [`host::HostCaps::bounce`]) is in flight, from whose callback the filter acts on it.
    Bouncing,
    /// The answer is decided (delivered, replaced or a local reply).
    Done,
    /// Envoy mode: Envoy's router is making the attempts in the filter's order.
    Native,
    /// Envoy mode: holding a 2xx answer until its body is complete (usage, cost).
    NativeHolding,
}

struct Affinity {
    key: String,
    tag: String,
    stored: Option<String>,
}

pub(crate) struct Http {
    id: u32,
    vm: Rc<Vm>,
    state: State,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    info: Option<RequestInfo>,
    /// The failover walk (core): ranking, attempts, the attempt in flight.
    walk: Walk,
    token: Option<u32>,
    affinity: Option<Affinity>,
    /// Snapshot age at decision time, ms.
    snapshot_age_ms: Option<u64>,
    /// Usage of the delivered answer, when known.
    usage: Option<Usage>,
    /// Route mode: status and time (ms) of the 2xx held while its body arrives.
    held: Option<(u32, u64)>,
    /// What the last failing provider said (cleaned), for the final error.
    last_said: Option<String>,
    /// Route mode: the last bytes of an unheld answer, where its usage sits.
    tail: Vec<u8>,
    /// The delivered answer came compressed: its body is not read.
    encoded: bool,
    /// Route mode: the 2xx at hand is delivered unheld (too big to hold, or compressed).
    unheld: bool,
    /// Route mode: the routed attempt's error answer has a body still to come.
    error_body: bool,
    /// Route mode: the routed answer is held while fallbacks run, and has a body whose place
    /// the final answer can take (so it goes through the host's encoders, its compressor
    /// among them, which a local reply sent while the response is held would skip).
    routed_held: bool,
    /// Route mode: size of the held routed answer's body once it is complete.
    routed_body: Option<usize>,
    /// Route mode: the answer waiting to take the held one's place (status, headers, body).
    pending: Option<Answer>,
    /// A finished attempt waiting for its bounce call's callback.
    bounced: Option<Finished>,
    /// Drain calls to send before the next dispatch (see [`host::Bounce`]).
    drain: usize,
    /// Length of a compressed answer sent as a local reply on a host that adds a newline
    /// to it (see [`host::HostCaps::local_reply_newline`]): cut back to this in the reply's
    /// response callbacks.
    exact_len: Option<usize>,
}

/// A dispatched attempt as it ended: outcome, when, status, answer headers and body.
struct Finished {
    outcome: Outcome,
    now: u64,
    status: Option<u32>,
    answer: Vec<(String, String)>,
    body: Vec<u8>,
}

/// An answer to deliver: status, headers, body.
type Answer = (u32, Vec<(String, String)>, Vec<u8>);

impl Http {
    pub(crate) fn new(id: u32, vm: Rc<Vm>) -> Self {
        Self {
            id,
            vm,
            state: State::Passthrough,
            headers: Vec::new(),
            body: Vec::new(),
            info: None,
            walk: Walk::default(),
            token: None,
            affinity: None,
            snapshot_age_ms: None,
            usage: None,
            held: None,
            last_said: None,
            tail: Vec::new(),
            encoded: false,
            unheld: false,
            error_body: false,
            routed_held: false,
            routed_body: None,
            pending: None,
            bounced: None,
            drain: 0,
            exact_len: None,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn stream(&self) -> bool {
        self.info.as_ref().is_some_and(|i| i.stream)
    }

    /// Answers with an OpenAI-style error and stops the stream.
    fn reply_error(&mut self, e: &ApiError) -> Action {
        let hs = self.error_headers(e);
        self.record_decision(None, Some(e.status));
        self.send(e.status, &hs, &e.body());
        Action::Pause
    }

    /// Route mode: turns the held error answer of size `body_size` into the final error in
    /// place, so it goes on through the host's encoders (its compressor among them), which a
    /// local reply sent while the response is held would skip.
    fn replace_error(&mut self, e: &ApiError, body_size: usize) -> Action {
        let body = e.body();
        if !host::set_buffer(BufferType::HttpResponseBody, body_size, &body) {
            return self.reply_error(e);
        }
        let mut num = [0u8; 20];
        host::set_response_header(":status", headers::decimal(u64::from(e.status), &mut num));
        host::set_response_header("content-length", &body.len().to_string());
        for (k, v) in self.error_headers(e) {
            host::set_response_header(&k, &v);
        }
        self.record_decision(None, Some(e.status));
        self.state = State::Done;
        Action::Continue
    }

    /// Counts an error answer and gives its headers.
    fn error_headers(&self, e: &ApiError) -> Vec<(String, String)> {
        if let Some(c) = Global::rejected(e.reason) {
            self.vm.metrics.inc(c);
        }
        let mut hs: Vec<(String, String)> =
            vec![("content-type".into(), "application/json".into())];
        if let Some(a) = &self.walk.attempts {
            if self.vm.config.response_headers {
                hs.push(("x-market-router-attempts".into(), a.tried.len().to_string()));
            }
            // Standard HTTP, not one of our x-market-router-* headers: always sent.
            if let Some(s) = a.min_retry_after_s() {
                hs.push(("retry-after".into(), s.to_string()));
            }
        }
        hs
    }

    fn send(&mut self, status: u32, hs: &[(String, String)], body: &[u8]) {
        self.state = State::Done;
        let refs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        if !host::send_response(status, &refs, body) {
            warn!(
                "#{} market-router: the host refused the local reply ({status})",
                self.id
            );
        }
    }

    /// Provider index of the last finished attempt.
    fn served_by(&self) -> Option<usize> {
        self.walk
            .attempts
            .as_ref()
            .and_then(|a| a.tried.last().map(|(p, _)| *p))
    }

    /// Price of the candidate for `provider` in this request's ranking.
    fn prices(&self, provider: usize) -> Option<(f64, f64, f64)> {
        let c = self
            .walk
            .ranking
            .as_ref()?
            .candidates
            .iter()
            .find(|c| c.provider == provider)?;
        Some((c.input_per_mtok, c.output_per_mtok, c.expected_cost_usd))
    }

    /// Cost of the answer: from its usage, else the ranking's estimate (flagged as such).
    fn cost(&self, provider: usize) -> Option<(f64, bool)> {
        let (i, o, estimate) = self.prices(provider)?;
        match self.usage {
            Some(u) if i.is_finite() && o.is_finite() => Some((u.cost_usd(i, o), false)),
            _ if estimate.is_finite() => Some((estimate, true)),
            _ => None,
        }
    }

    /// Our response headers for an answer from `provider`, handed to `emit` one by one.
    fn our_headers(&self, provider: usize, mut emit: impl FnMut(&'static str, &str)) {
        if !self.vm.config.response_headers {
            return;
        }
        let name = self
            .vm
            .config
            .providers
            .get(provider)
            .map_or("", |p| p.name.as_str());
        let mut num = [0u8; 20];
        let attempts = self
            .walk
            .attempts
            .as_ref()
            .map_or(1, |a| a.tried.len().max(1));
        emit("x-market-router-provider", name);
        emit(
            "x-market-router-attempts",
            headers::decimal(attempts as u64, &mut num),
        );
        if let Some(r) = &self.walk.ranking {
            emit("x-market-router-strategy", r.strategy.as_str());
        }
        if let Some(age) = self.snapshot_age_ms {
            emit(
                "x-market-router-snapshot-age-ms",
                headers::decimal(age, &mut num),
            );
        }
        if let Some((usd, estimated)) = self.cost(provider) {
            let mut buf = [0u8; 32];
            if let Some(v) = headers::usd8(usd, &mut buf) {
                emit("x-market-router-cost-usd", v);
                if estimated {
                    emit("x-market-router-cost-estimated", "true");
                }
            }
        }
    }

    /// Writes the decision record (Envoy filter state `wasm.market_router.decision`).
    fn record_decision(&self, provider: Option<usize>, status: Option<u32>) {
        if !self.vm.config.decision_record {
            return;
        }
        let config = &self.vm.config;
        let name = |i: usize| config.providers.get(i).map_or("?", |p| p.name.as_str());
        let tried: Vec<(&str, &'static str)> = self
            .walk
            .attempts
            .as_ref()
            .map(|a| a.tried.iter().map(|(p, o)| (name(*p), o.label())).collect())
            .unwrap_or_default();
        let score = provider.and_then(|p| {
            self.walk
                .ranking
                .as_ref()?
                .candidates
                .iter()
                .find(|c| c.provider == p)
                .map(|c| (c.score * 1e4).round() / 1e4)
        });
        let cost = provider.and_then(|p| self.cost(p));
        let record = crate::decision::Decision {
            model: self.info.as_ref().map(|i| i.model.as_str()),
            provider: provider.map(name),
            status,
            tried,
            strategy: self.walk.ranking.as_ref().map(|r| r.strategy.as_str()),
            score,
            cost_usd: cost.map(|c| c.0),
            cost_estimated: cost.map(|c| c.1),
            prompt_tokens: self.usage.map(|u| u.prompt_tokens),
            completion_tokens: self.usage.map(|u| u.completion_tokens),
            snapshot_age_ms: self.snapshot_age_ms,
            provider_error: self.last_said.as_deref(),
        };
        host::set_decision_property(&record.to_json());
    }

    /// Counts the delivered answer's tokens and cost.
    fn account(&self, provider: usize) {
        let Some(u) = self.usage else { return };
        let m = &self.vm.metrics;
        m.add(provider, PerProvider::TokensIn, u.prompt_tokens);
        m.add(provider, PerProvider::TokensOut, u.completion_tokens);
        if let Some((usd, false)) = self.cost(provider) {
            m.add(
                provider,
                PerProvider::CostMicroUsd,
                (usd * 1e6).round() as u64,
            );
        }
    }

    fn answer_explain(&mut self, q: explain::Query) -> Action {
        let vm = Rc::clone(&self.vm);
        let now = host::now_ms();
        vm.sync_market(now, false);
        vm.sync_health(now, true);
        let Ok(inner) = vm.inner.try_borrow() else {
            return self.reply_error(&ApiError::internal("market-router state busy"));
        };
        let market = inner.market.as_deref();
        let (status, body) = match q {
            explain::Query::Models => (200, explain::models(&vm.config, market, now)),
            explain::Query::Route {
                model,
                input_tokens,
                output_tokens,
            } => explain::route(
                &vm.config,
                market,
                &inner.health,
                &model,
                input_tokens,
                output_tokens,
                now,
            ),
            explain::Query::NotFound => (
                404,
                json!({"error": {"message": "unknown market-router endpoint; try GET <prefix>/models or <prefix>/route?model=…", "type": "invalid_request_error", "code": "not_found"}}),
            ),
        };
        drop(inner);
        let hs = vec![("content-type".to_string(), "application/json".to_string())];
        self.send(status, &hs, body.to_string().as_bytes());
        Action::Pause
    }

    fn on_body_complete(&mut self, body: Vec<u8>) -> Action {
        let t0 = host::now_ns();
        let now = (t0 / 1_000_000) as u64;
        let info = match request::parse(&body) {
            Ok(i) => i,
            Err(e) => return self.reply_error(&ApiError::bad_request(e.code(), e.message())),
        };
        let vm = Rc::clone(&self.vm);
        let config = &vm.config;
        vm.sync_market(now, false);
        vm.sync_health(now, false);
        let prefs = if config.routing.client_overrides {
            headers::prefs_from_headers(&self.headers)
        } else {
            Prefs::default()
        };
        let session = config
            .routing
            .affinity_header
            .as_deref()
            .and_then(|h| self.header(h))
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let ranked = match vm.inner.try_borrow_mut() {
            Ok(mut inner) => {
                let inner = &mut *inner;
                self.snapshot_age_ms = inner.market.as_ref().map(|m| m.age_ms(now));
                let pinned = match config.routing.default_provider {
                    Some(d)
                        if !select::in_rollout(
                            config.routing.rollout_percent,
                            session.as_deref(),
                            &mut inner.rng,
                        ) =>
                    {
                        select::pinned(config, inner.market.as_deref(), &info, d)
                    }
                    _ => None,
                };
                match pinned {
                    Some(r) => {
                        vm.metrics.inc(Global::RolloutDefault);
                        Ok(r)
                    }
                    None => {
                        if config.routing.rollout_percent < 100 {
                            vm.metrics.inc(Global::RolloutMarket);
                        }
                        select::rank(
                            config,
                            inner.market.as_deref(),
                            &inner.health,
                            &info,
                            &prefs,
                            now,
                            &mut inner.rng,
                        )
                    }
                }
            }
            Err(_) => return self.reply_error(&ApiError::internal("market-router state busy")),
        };
        self.info = Some(info);
        let mut ranking = match ranked {
            Ok(r) => r,
            Err(NoRoute::UnknownModel) => {
                let model = self
                    .info
                    .as_ref()
                    .map_or("", |i| i.model.as_str())
                    .to_string();
                return self.reply_error(&ApiError::unknown_model(&model));
            }
            Err(NoRoute::AllExcluded(ex)) => {
                let model = self.info.as_ref().map_or("", |i| i.model.as_str());
                let msg = select::explain_exclusions(config, model, &ex);
                debug!("#{} market-router: {msg}", self.id);
                return self.reply_error(&ApiError::no_provider(msg));
            }
        };
        if ranking.last_resort {
            warn!(
                "#{} market-router: every provider is held back by health; trying them anyway, soonest free first",
                self.id
            );
        }
        if ranking.stale {
            vm.metrics.inc(Global::StaleDecisions);
            debug!("#{} market-router: market data is stale; ranking on its last figures (its offline counts as degraded)", self.id);
        }
        if let Some(session) = session.as_deref() {
            let (slot, tag) = headers::affinity_slot(session);
            let key = format!("{}{slot}", vm.keys.affinity);
            let stored = host::shared_get(&key)
                .and_then(|(v, _)| headers::affinity_decode(&v, &tag).map(str::to_string));
            if let Some(idx) = stored.as_deref().and_then(|n| config.provider_index(n)) {
                select::prefer(&mut ranking, idx);
            }
            self.affinity = Some(Affinity { key, tag, stored });
        }
        if log::log_enabled!(log::Level::Debug) {
            debug!(
                "#{} market-router: model {} strategy {} ranked [{}]",
                self.id,
                self.info.as_ref().map_or("", |i| i.model.as_str()),
                ranking.strategy.as_str(),
                ranking
                    .candidates
                    .iter()
                    .map(|c| format!("{}:{:.3}", config.providers[c.provider].name, c.score))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        self.walk.begin(ranking, Attempts::new(config, now));
        self.body = body;
        let action = match config.failover.mode {
            // Without route failover in the host (Kong), route mode's attempts are dispatched.
            FailoverMode::Route if host::caps().route_failover => self.route_first(now),
            FailoverMode::Envoy => self.native_first(now),
            FailoverMode::Route | FailoverMode::Dispatch => {
                if self.dispatch_next(now) {
                    Action::Pause
                } else {
                    let e = self.final_error();
                    self.reply_error(&e)
                }
            }
        };
        let elapsed_us = host::now_ns().saturating_sub(t0) / 1000;
        vm.metrics.decision_time(elapsed_us as u64);
        vm.metrics.flush_if_due(now);
        action
    }

    /// Keeps the end of the response body chunk at hand (an unheld answer's usage is there).
    fn keep_tail(&mut self, body_size: usize) {
        if self.encoded || body_size == 0 {
            return;
        }
        let n = body_size.min(answer::TAIL_BYTES);
        if let Some(b) = host::buffer_at(BufferType::HttpResponseBody, body_size - n, n) {
            answer::keep_tail(&mut self.tail, &b);
        }
    }

    fn final_error(&self) -> ApiError {
        let model = self.info.as_ref().map_or("", |i| i.model.as_str());
        match &self.walk.attempts {
            Some(a) if !a.tried.is_empty() => {
                a.final_error(&self.vm.config, model, self.last_said.as_deref())
            }
            _ => ApiError::no_provider(format!(
                "no provider for model `{}` could be tried",
                crate::errors::clip(model, 200)
            )),
        }
    }

    /// Picks the next attempt: (candidate index, timeout), claiming half-open probes.
    fn next_attempt(&mut self, now: u64) -> Option<(usize, u64)> {
        let vm = &self.vm;
        self.walk
            .next(now, |p| vm.claim_probe(&vm.config.providers[p].name, now))
            .map(|a| (a.candidate, a.timeout_ms))
    }

    /// Route mode, first attempt: point the route at the primary and let the request go.
    fn route_first(&mut self, now: u64) -> Action {
        let Some((idx, timeout_ms)) = self.next_attempt(now) else {
            let e = self.final_error();
            return self.reply_error(&e);
        };
        let vm = Rc::clone(&self.vm);
        let config = &vm.config;
        let (Some(ranking), Some(info)) = (&self.walk.ranking, &self.info) else {
            return self.reply_error(&ApiError::internal("lost request state"));
        };
        let cand = &ranking.candidates[idx];
        let provider_idx = cand.provider;
        let provider = &config.providers[provider_idx];
        if !host::set_request_header(&config.routing.cluster_header, Some(&provider.cluster)) {
            return self.reply_error(&ApiError::internal("the host refused the cluster header"));
        }
        if let Some(new_body) = request::rewrite_model(&self.body, info, &cand.provider_model) {
            if !host::set_buffer(BufferType::HttpRequestBody, self.body.len(), &new_body) {
                return self.reply_error(&ApiError::internal("the host refused the body rewrite"));
            }
            if self.header("content-length").is_some() {
                host::set_request_header("content-length", Some(&new_body.len().to_string()));
            }
        }
        // (The cluster and preference headers are gone already: see the request headers.)
        for (k, _) in &self.headers {
            if k == "proxy-authorization"
                || (k == "authorization" && !config.failover.forward_client_authorization)
            {
                host::set_request_header(k, None);
            }
        }
        // An answer the filter reads must come in plain bytes; the host's compressor encodes
        // what reaches the client as the client asked.
        let reads_answer = if info.stream {
            info.include_usage
        } else {
            config.failover.retry_on.malformed || config.response_headers
        };
        if reads_answer {
            host::set_request_header("accept-encoding", Some(answer::IDENTITY));
        }
        if !info.stream {
            host::set_request_header(
                "x-envoy-upstream-rq-timeout-ms",
                Some(&timeout_ms.to_string()),
            );
        }

        for (k, v) in &provider.headers {
            host::set_request_header(k, Some(v));
        }
        debug!(
            "#{} market-router: routing model {} to {}",
            self.id, info.model, provider.name
        );
        let (model, affinity) = (info.model.as_str(), self.affinity.as_ref());
        let stream = info.stream;
        self.walk.started(provider_idx, now, |e| {
            apply(&vm, model, affinity, now, e);
        });
        if stream {
            // Bounded by the route's timeouts, not by `timeout_ms`.
            self.walk.unbounded();
        }
        self.state = State::Routed;
        Action::Continue
    }

    /// Starts the next attempt by `dispatch_http_call`. False when none is left.
    fn dispatch_next(&mut self, now: u64) -> bool {
        if self.drain > 0 {
            if let Some(bounce) = host::caps().bounce {
                for _ in 0..std::mem::take(&mut self.drain) {
                    // Nothing waits for them: their callbacks find no matching token.
                    let _ = host::dispatch(bounce.target, BOUNCE_HEADERS, b"-", BOUNCE_TIMEOUT_MS);
                }
            }
        }
        while let Some((idx, timeout_ms)) = self.next_attempt(now) {
            let vm = Rc::clone(&self.vm);
            let config = &vm.config;
            let (Some(ranking), Some(info)) = (&self.walk.ranking, &self.info) else {
                return false;
            };
            let cand = &ranking.candidates[idx];
            let provider_idx = cand.provider;
            let provider = &config.providers[provider_idx];
            let body: Cow<'_, [u8]> =
                match request::rewrite_model(&self.body, info, &cand.provider_model) {
                    Some(b) => Cow::Owned(b),
                    None => Cow::Borrowed(&self.body),
                };
            let path = self.header(":path").unwrap_or("/v1/chat/completions");
            let fwd = headers::forwarded(config, &self.headers);
            let mut hs: Vec<(&str, &str)> = vec![
                (":method", "POST"),
                (":path", path),
                (":authority", provider.authority.as_str()),
                (":scheme", provider.scheme.as_str()),
                ("accept-encoding", answer::IDENTITY),
            ];
            hs.extend(
                fwd.iter()
                    .filter(|(k, _)| !provider.headers.iter().any(|(h, _)| h == k))
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            );
            hs.extend(
                provider
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            );
            let result = host::dispatch(&provider.cluster, &hs, &body, timeout_ms);
            let name = provider.name.as_str();
            if self.walk.attempts.is_none() {
                return false;
            }
            let (model, affinity) = (info.model.as_str(), self.affinity.as_ref());
            let effect = |e| apply(&vm, model, affinity, now, e);
            self.walk.started(provider_idx, now, effect);
            match result {
                Ok(token) => {
                    debug!(
                        "#{} market-router: attempt {} → {name}",
                        self.id,
                        self.walk.attempts.as_ref().map_or(0, |a| a.count())
                    );
                    self.token = Some(token);
                    self.state = State::Dispatched;
                    return true;
                }
                Err(s) => {
                    warn!("#{} market-router: cannot dispatch to {name} ({s:?}); trying the next provider", self.id);
                    self.walk.refused(effect);
                }
            }
        }
        false
    }

    /// Notes for the market report an answer that broke off after it began.
    fn tally_reset(&self, provider: usize) {
        let model = self.info.as_ref().map_or("", |i| i.model.as_str());
        self.vm.tally(provider, model, &Outcome::Reset, None);
    }

    /// Records an outcome and says whether the answer at hand should reach the client.
    /// `Some(true)` deliver it, `Some(false)` fail with the final error, `None` a next attempt
    /// is in flight.
    fn judge(&mut self, outcome: Outcome, now: u64) -> Option<bool> {
        let vm = Rc::clone(&self.vm);
        let provider = self.walk.attempts.as_ref().and_then(|a| a.current)?;
        let name = vm.config.providers[provider].name.as_str();
        let stream = self.stream();
        // Every host fails over after a timed-out attempt too (Kong from the callback of a
        // bounce call: see `host::Bounce`), so the walk's Stop verdict never comes.
        let redispatch = true;
        let model = self.info.as_ref().map_or("", |i| i.model.as_str());
        let affinity = self.affinity.as_ref();
        let verdict =
            self.walk
                .answered(outcome, now, stream, &vm.config.failover, redispatch, |e| {
                    apply(&vm, model, affinity, now, e)
                })?;
        match verdict {
            Verdict::Deliver => Some(true),
            Verdict::Stop => {
                warn!(
                    "#{} market-router: provider {name} failed ({outcome}); this host cannot dispatch after a timed-out call",
                    self.id
                );
                Some(false)
            }
            Verdict::FailOver => {
                warn!(
                    "#{} market-router: provider {name} failed ({outcome}); failing over",
                    self.id
                );
                if self.dispatch_next(now) {
                    None
                } else {
                    Some(false)
                }
            }
        }
    }

    fn remember_affinity(&self, provider: &str) {
        remember(self.affinity.as_ref(), provider);
    }

    /// Route mode: the routed answer goes to the client, with our headers added in place.
    fn deliver_routed(&mut self, status: u32) {
        let Some(p) = self.served_by() else { return };
        self.our_headers(p, |k, v| {
            host::set_response_header(k, v);
        });
        self.account(p);
        // A streamed or unheld answer's record is written once it ends (or breaks), with its
        // usage.
        if !((self.stream() || self.unheld) && (200..300).contains(&status)) {
            self.record_decision(Some(p), Some(status));
        }
    }

    /// Replaces the response with a dispatched attempt's answer.
    fn deliver_dispatched(&mut self, status: u32, answer: &[(String, String)], body: &[u8]) {
        let provider = self.served_by().unwrap_or(0);
        if (200..300).contains(&status) && !self.encoded {
            self.usage = metrics::usage_of_answer(body).or_else(|| metrics::usage_in_sse(body));
        }
        let mut hs = headers::answer_headers(answer);
        self.our_headers(provider, |k, v| hs.push((k.to_string(), v.to_string())));
        self.account(provider);
        self.record_decision(Some(provider), Some(status));
        if !self.replace_held(status, hs.clone(), body) {
            if self.encoded && !body.is_empty() && host::caps().local_reply_newline {
                hs.retain(|(k, _)| k != "content-length");
                self.exact_len = Some(body.len());
            }
            self.send(status, &hs, body);
        }
    }

    /// The response callbacks of a local reply whose host adds a newline to its body (see
    /// [`host::HostCaps::local_reply_newline`]): no `content-length` (the host set one with
    /// the newline counted), and the body cut back to `len` bytes.
    fn exact_reply_headers(&mut self) -> Action {
        if !host::remove_response_header("content-length") {
            warn!(
                "#{} market-router: the host kept the local reply's content-length",
                self.id
            );
        }
        Action::Continue
    }

    fn exact_reply_body(&mut self, len: usize, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream || body_size != len + 1 {
            if end_of_stream {
                warn!(
                    "#{} market-router: a local reply of {len} bytes came out as {body_size}",
                    self.id
                );
            }
            return Action::Continue;
        }
        self.exact_len = None;
        let cut = host::buffer(BufferType::HttpResponseBody, body_size)
            .filter(|b| b.len() == body_size && b.ends_with(b"\n"))
            .is_some_and(|b| host::set_buffer(BufferType::HttpResponseBody, body_size, &b[..len]));
        if !cut {
            warn!(
                "#{} market-router: could not cut the host's newline off a local reply",
                self.id
            );
        }
        Action::Continue
    }

    /// Route mode: the final answer takes the held routed answer's place, now or once the
    /// held one is complete. False when it cannot (no held answer with a body): then it is
    /// sent as a local reply.
    fn replace_held(&mut self, status: u32, hs: Vec<(String, String)>, body: &[u8]) -> bool {
        if !self.routed_held {
            return false;
        }
        match self.routed_body {
            Some(size) => {
                if !self.apply_replacement(status, &hs, body, size) {
                    return false;
                }
                self.state = State::Done;
                host::resume_response();
            }
            None => {
                self.pending = Some((status, hs, body.to_vec()));
                self.state = State::Replacing;
            }
        }
        true
    }

    /// Replaces the held response's headers and its `size`-byte body.
    fn apply_replacement(
        &mut self,
        status: u32,
        hs: &[(String, String)],
        body: &[u8],
        size: usize,
    ) -> bool {
        if !host::set_buffer(BufferType::HttpResponseBody, size, body) {
            return false;
        }
        let (mut num, mut len) = ([0u8; 20], [0u8; 20]);
        let mut all: Vec<(&str, &str)> = vec![
            (":status", headers::decimal(u64::from(status), &mut num)),
            (
                "content-length",
                headers::decimal(body.len() as u64, &mut len),
            ),
        ];
        all.extend(hs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        host::set_response_headers(&all)
    }

    /// The final error, in place of the held answer when there is one, else as a local reply.
    fn fail_with(&mut self, e: &ApiError) {
        if self.routed_held {
            let hs = self.error_headers(e);
            self.record_decision(None, Some(e.status));
            if self.replace_held(e.status, hs.clone(), &e.body()) {
                return;
            }
            self.send(e.status, &hs, &e.body());
            return;
        }
        self.reply_error(e);
    }

    /// Route mode: what to do with the routed attempt's outcome at response time.
    fn after_routed(&mut self, outcome: Outcome, status: u32, now: u64) -> Action {
        match self.judge(outcome, now) {
            Some(true) => {
                self.deliver_routed(status);
                let ok = (200..300).contains(&status);
                self.state = if ok && self.stream() {
                    State::Streaming
                } else if ok && self.unheld {
                    State::Unheld
                } else {
                    State::Done
                };
                Action::Continue
            }
            // The routed attempt was the last: read what its provider said, then answer.
            Some(false) if self.error_body => {
                self.state = State::ReadingError;
                Action::Pause
            }
            Some(false) => {
                let e = self.final_error();
                self.reply_error(&e)
            }
            None => Action::Pause,
        }
    }
}

// The host callbacks of one request, reached through `Ctx` (one trait object type for the
// configured and the unconfigured case keeps the SDK's default methods compiled in once).
impl Http {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if self.token != Some(token_id) {
            return;
        }
        if self.state == State::Bouncing {
            self.token = None;
            self.state = State::Dispatched;
            self.drain = host::caps().bounce.map_or(0, |b| b.drain);
            if let Some(f) = self.bounced.take() {
                self.conclude_call(f);
            }
            self.drain = 0;
            return;
        }
        if self.state != State::Dispatched {
            return;
        }
        self.token = None;
        self.last_said = None;
        let now = host::now_ms();
        let answer = if num_headers == 0 {
            Vec::new()
        } else {
            host::call_response_headers()
        };
        let status = answer
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| v.parse::<u32>().ok());
        // A call that broke off (Kong says so) has no body to read.
        let mut failure = host::call_failure(num_headers);
        let body = if num_headers == 0 || failure.is_some() {
            Vec::new()
        } else {
            match host::call_response_body(body_size) {
                Some(b) => b,
                // Kong: the connection closed before the announced body was complete, which
                // the host reports as a finished call whose body it then refuses to hand over.
                None => {
                    failure = Some("body cut short".to_string());
                    Vec::new()
                }
            }
        };
        let retry_after = answer
            .iter()
            .find(|(k, _)| k == "retry-after")
            .map(|(_, v)| v.as_str());
        let mut outcome = match failure.as_deref() {
            Some("timeout") => Outcome::Timeout,
            // No answer at all: the connection failed (Kong says `broken connection`).
            Some(_) if status.is_none() => Outcome::ConnectFailure,
            Some(_) => Outcome::Reset,
            None => classify_dispatched(status, &body, retry_after),
        };
        // A provider that compresses although asked for identity: its answer is delivered as
        // it came (not read, so not judged malformed; priced from the estimate).
        self.encoded = answer::is_encoded(
            answer
                .iter()
                .find(|(k, _)| k == "content-encoding")
                .map(|(_, v)| v.as_str()),
        );
        match outcome {
            Outcome::Success(_)
                if !self.stream() && !self.encoded && metrics::inspect_answer(&body).is_err() =>
            {
                outcome = Outcome::Malformed
            }
            // A stream with nothing in it is no answer either (Kong reports a chunked answer
            // cut before its first complete chunk as a finished call with an empty body).
            Outcome::Success(_) if body.is_empty() => outcome = Outcome::Malformed,
            Outcome::Status { .. } if !self.encoded => {
                self.last_said = answer::provider_message(&body);
            }
            _ => {}
        }
        let finished = Finished {
            outcome,
            now,
            status,
            answer,
            body,
        };
        // Where the host cannot act from the callback of a call that brought no body, act
        // from the callback of a bounce call instead.
        if finished.body.is_empty() {
            if let Some(bounce) = host::caps().bounce {
                match host::dispatch(bounce.target, BOUNCE_HEADERS, &[], BOUNCE_TIMEOUT_MS) {
                    Ok(token) => {
                        self.token = Some(token);
                        self.state = State::Bouncing;
                        self.bounced = Some(finished);
                        return;
                    }
                    Err(s) => warn!(
                        "#{} market-router: cannot dispatch the bounce call ({s:?}); acting from this callback",
                        self.id
                    ),
                }
            }
        }
        self.conclude_call(finished);
    }

    /// Judges a finished dispatched attempt and acts: delivers it, fails over, or answers
    /// with the final error.
    fn conclude_call(&mut self, f: Finished) {
        match self.judge(f.outcome, f.now) {
            Some(true) => self.deliver_dispatched(f.status.unwrap_or(502), &f.answer, &f.body),
            Some(false) => {
                let e = self.final_error();
                self.fail_with(&e);
            }
            None => {}
        }
    }
}

/// The bounce and drain calls (see [`host::Bounce`]): answered by nobody.
const BOUNCE_HEADERS: &[(&str, &str)] = &[
    (":method", "GET"),
    (":path", "/"),
    (":authority", "localhost"),
];
/// Bound of a bounce call (it fails at connect, well within a millisecond).
const BOUNCE_TIMEOUT_MS: u64 = 1000;

impl Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // One host call for all headers: cheaper than reading the path alone and then the rest.
        let hs = host::request_headers();
        // No client picks a cluster or passes preferences on, whatever the path.
        for (k, _) in hs
            .iter()
            .filter(|(k, _)| headers::is_owned(&self.vm.config, k))
        {
            host::set_request_header(k, None);
        }
        let value = |name: &str| {
            hs.iter()
                .find(|(k, _)| k == name)
                .map_or("", |(_, v)| v.as_str())
        };
        let (method, path) = (value(":method"), value(":path"));
        // Only the filter names the order Envoy's retries follow, never the client.
        if self.vm.config.failover.mode == FailoverMode::Envoy
            && hs.iter().any(|(k, _)| k == crate::native::ORDER_HEADER)
        {
            host::set_request_header(crate::native::ORDER_HEADER, None);
        }
        if !headers::is_llm_path(method, path) {
            let explain = self
                .vm
                .config
                .explain_path_prefix
                .as_deref()
                .filter(|prefix| path.starts_with(prefix))
                .and_then(|prefix| explain::parse(prefix, method, path));
            return match explain {
                Some(q) => self.answer_explain(q),
                None => Action::Continue,
            };
        }
        self.vm.metrics.inc(Global::Requests);
        self.headers = hs;
        if let Some(len) = self
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            if len > self.vm.config.max_body_bytes {
                return self.reply_error(&ApiError::body_too_large(self.vm.config.max_body_bytes));
            }
        }
        // An empty body: Kong runs no body callback for it.
        if end_of_stream || self.header("content-length") == Some("0") {
            return self.on_body_complete(Vec::new());
        }
        self.state = State::Reading;
        // Kong never resumes a pause from here; its body callback comes anyway.
        if host::caps().pause_request_headers {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.state != State::Reading {
            return Action::Continue;
        }
        if body_size > self.vm.config.max_body_bytes {
            return self.reply_error(&ApiError::body_too_large(self.vm.config.max_body_bytes));
        }
        if !end_of_stream {
            return Action::Pause;
        }
        match host::buffer(BufferType::HttpRequestBody, body_size) {
            Some(body) => self.on_body_complete(body),
            None => self.reply_error(&ApiError::internal(
                "the host did not hand over the request body",
            )),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.exact_len.is_some() {
            return self.exact_reply_headers();
        }
        if self.state == State::Native {
            return self.native_response_headers(end_of_stream);
        }
        // Validating: the held 2xx broke off mid-body and the host now sends its own reply.
        let abandoned = self.state == State::Validating;
        if self.state != State::Routed && !abandoned {
            return Action::Continue;
        }
        let now = host::now_ms();
        let status = host::response_header(":status")
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
        if abandoned {
            self.state = State::Routed;
            let details = host::property(&["response", "code_details"]);
            let outcome = match classify_routed(status, details.as_deref(), None) {
                Outcome::Success(_) | Outcome::Status { .. } => Outcome::Reset,
                other => other,
            };
            return self.after_routed(outcome, status, now);
        }
        if (200..300).contains(&status) {
            let config = &self.vm.config;
            let encoded =
                || answer::is_encoded(host::response_header("content-encoding").as_deref());
            // Non-streaming answers are held until complete: to check they are well-formed
            // (retry_on malformed) and to price them from their usage (cost header).
            if !self.stream() && (config.failover.retry_on.malformed || config.response_headers) {
                self.held = Some((status, now));
                // Compressed although asked for identity, or bigger than the host can hold:
                // it flows to the client unheld, priced from its usage if its end shows it.
                self.encoded = encoded();
                if self.encoded
                    || !answer::fits(
                        host::response_header("content-length").as_deref(),
                        answer::HOLD_LIMIT_BYTES,
                    )
                {
                    self.unheld = true;
                    return self.after_routed(Outcome::Success(status), status, now);
                }
                if end_of_stream {
                    return self.after_routed(Outcome::Malformed, status, now);
                }
                self.state = State::Validating;
                return Action::Pause;
            }
            if self.stream() && self.info.as_ref().is_some_and(|i| i.include_usage) {
                self.encoded = encoded();
            }
            return self.after_routed(Outcome::Success(status), status, now);
        }
        let details = host::property(&["response", "code_details"]);
        let retry_after = host::response_header("retry-after");
        let outcome = classify_routed(status, details.as_deref(), retry_after.as_deref());
        self.error_body = !end_of_stream
            && matches!(outcome, Outcome::Status { .. })
            && !answer::is_encoded(host::response_header("content-encoding").as_deref());
        self.routed_held = !end_of_stream;
        self.after_routed(outcome, status, now)
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(len) = self.exact_len {
            return self.exact_reply_body(len, body_size, end_of_stream);
        }
        match self.state {
            State::Dispatched | State::Bouncing => {
                if end_of_stream {
                    self.routed_body = Some(body_size);
                }
                Action::Pause
            }
            State::NativeHolding => self.native_response_body(body_size, end_of_stream),
            State::Replacing => {
                if !end_of_stream {
                    return Action::Pause;
                }
                self.state = State::Done;
                let Some((status, hs, body)) = self.pending.take() else {
                    return Action::Continue;
                };
                if !self.apply_replacement(status, &hs, &body, body_size) {
                    warn!(
                        "#{} market-router: the host refused to replace the held answer",
                        self.id
                    );
                }
                Action::Continue
            }
            State::Validating => {
                // Status and time as seen at the held headers: the body follows at once.
                let (status, now) = self.held.unwrap_or((200, host::now_ms()));
                if !end_of_stream {
                    if body_size <= answer::HOLD_LIMIT_BYTES {
                        return Action::Pause;
                    }
                    // A chunked answer grew past what may be held: it flows on from here,
                    // what is held so far first.
                    self.keep_tail(body_size);
                    self.unheld = true;
                    return self.after_routed(Outcome::Success(status), status, now);
                }
                let body =
                    host::buffer(BufferType::HttpResponseBody, body_size).unwrap_or_default();
                let inspected = metrics::inspect_answer(&body);
                let malformed = self.vm.config.failover.retry_on.malformed && inspected.is_err();
                self.usage = inspected.ok().flatten();
                let outcome = if malformed {
                    Outcome::Malformed
                } else {
                    Outcome::Success(status)
                };
                self.routed_held = true;
                self.routed_body = Some(body_size);
                self.after_routed(outcome, status, now)
            }
            State::Unheld => {
                self.keep_tail(body_size);
                if end_of_stream {
                    self.state = State::Done;
                    self.usage = answer::usage_in_tail(&self.tail);
                    if let Some(p) = self.served_by() {
                        let status = self.held.map_or(200, |h| h.0);
                        self.account(p);
                        self.record_decision(Some(p), Some(status));
                    }
                }
                Action::Continue
            }
            State::ReadingError => {
                if !end_of_stream && body_size <= answer::HOLD_LIMIT_BYTES {
                    return Action::Pause;
                }
                let n = body_size.min(answer::ERROR_READ_BYTES);
                self.last_said = host::buffer(BufferType::HttpResponseBody, n)
                    .and_then(|b| answer::provider_message(&b));
                let e = self.final_error();
                if end_of_stream {
                    return self.replace_error(&e, body_size);
                }
                self.reply_error(&e)
            }
            State::Streaming => {
                // Look for the final usage chunk, which OpenAI-compatible providers send when
                // the request asks for it (`stream_options.include_usage`); otherwise no chunk
                // is read (one host read per chunk adds up over a long stream) and the cost
                // stays the pre-route estimate. Only a chunk that mentions usage is parsed.
                let wants_usage =
                    !self.encoded && self.info.as_ref().is_some_and(|i| i.include_usage);
                if wants_usage && body_size > 0 {
                    if let Some(chunk) = host::buffer(BufferType::HttpResponseBody, body_size) {
                        if let Some(u) = metrics::usage_in_sse(&chunk) {
                            self.usage = Some(u);
                        }
                    }
                }
                if end_of_stream {
                    self.state = State::Done;
                    if let Some(p) = self.served_by() {
                        self.account(p);
                        self.record_decision(Some(p), Some(200));
                    }
                }
                Action::Continue
            }
            _ => Action::Continue,
        }
    }

    fn on_log(&mut self) {
        if !matches!(
            self.state,
            State::Streaming | State::Unheld | State::Validating
        ) {
            return;
        }
        let now = host::now_ms();
        let failure = crate::health::Observation::Failure {
            retry_after_ms: None,
        };
        match self.state {
            // A stream that ended without its end-of-stream body callback (reset mid-response):
            // the client already has bytes, so nothing can be replayed; count it.
            State::Streaming | State::Unheld => {
                self.vm.metrics.inc(Global::StreamFailedMidway);
                if let Some(p) = self.served_by() {
                    self.vm.metrics.add(p, PerProvider::Failure, 1);
                    let model = self.info.as_ref().map_or("", |i| i.model.as_str());
                    self.vm.tally_broken_stream(p, model);
                    self.vm
                        .observe(&self.vm.config.providers[p].name, failure, now);
                    self.record_decision(Some(p), Some(200));
                }
            }
            // A held 2xx that broke off mid-body: Envoy answers the client itself (502) without
            // passing the reply back through this filter, so it can only be counted.
            State::Validating => {
                let Some(p) = self.walk.attempts.as_ref().and_then(|a| a.current) else {
                    return;
                };
                if let Some(a) = self.walk.attempts.as_mut() {
                    a.finish(Outcome::Reset);
                }
                warn!(
                    "#{} market-router: provider {} broke off its answer mid-body; the host answered 502",
                    self.id, self.vm.config.providers[p].name
                );
                self.vm.metrics.add(p, PerProvider::Failure, 1);
                self.tally_reset(p);
                self.vm
                    .observe(&self.vm.config.providers[p].name, failure, now);
                self.record_decision(Some(p), Some(502));
            }
            _ => {}
        }
    }
}

/// Carries out one of the walk's effects on this VM (health, counters, market report, affinity).
fn apply(vm: &Vm, model: &str, affinity: Option<&Affinity>, now: u64, effect: Effect) {
    match effect {
        Effect::Observe {
            provider,
            observation,
        } => vm.observe(&vm.config.providers[provider].name, observation, now),
        Effect::Tally {
            provider,
            outcome,
            ttfb_ms,
        } => vm.tally(provider, model, &outcome, ttfb_ms),
        Effect::Count { provider, counter } => vm.metrics.add(provider, counter, 1),
        Effect::CountGlobal(counter) => vm.metrics.inc(counter),
        Effect::Remember { provider } => remember(affinity, &vm.config.providers[provider].name),
    }
}

/// Pins the session to `provider` (unless it is pinned there already).
fn remember(affinity: Option<&Affinity>, provider: &str) {
    if let Some(a) = affinity {
        if a.stored.as_deref() != Some(provider) {
            let _ = host::shared_set(&a.key, &headers::affinity_encode(&a.tag, provider), None);
        }
    }
}

/// The HTTP context handed to the host: a request's walk, or, on a VM that has no
/// configuration applied, a pass-through that routes nothing, still keeps clients from picking
/// a cluster with the default routing headers, and answers LLM requests with a 503 instead of
/// letting them reach whatever cluster a header names.
// The host holds it boxed already; the unit variant's unused room costs nothing per request.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Ctx {
    /// A configured VM.
    Live(Http),
    /// No configuration applied.
    Unconfigured,
}

impl Context for Ctx {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        num_trailers: usize,
    ) {
        if let Ctx::Live(h) = self {
            h.on_http_call_response(token_id, num_headers, body_size, num_trailers);
        }
    }
}

impl HttpContext for Ctx {
    fn on_http_request_headers(&mut self, num_headers: usize, end_of_stream: bool) -> Action {
        match self {
            Ctx::Live(h) => h.on_http_request_headers(num_headers, end_of_stream),
            Ctx::Unconfigured => unconfigured_request(),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match self {
            Ctx::Live(h) => h.on_http_request_body(body_size, end_of_stream),
            Ctx::Unconfigured => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, num_headers: usize, end_of_stream: bool) -> Action {
        match self {
            Ctx::Live(h) => h.on_http_response_headers(num_headers, end_of_stream),
            Ctx::Unconfigured => Action::Continue,
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match self {
            Ctx::Live(h) => h.on_http_response_body(body_size, end_of_stream),
            Ctx::Unconfigured => Action::Continue,
        }
    }

    fn on_log(&mut self) {
        if let Ctx::Live(h) = self {
            h.on_log();
        }
    }
}

fn unconfigured_request() -> Action {
    let hs = host::request_headers();
    let mut llm = (false, false);
    for (k, v) in &hs {
        match k.as_str() {
            ":method" => llm.0 = v == "POST",
            ":path" => llm.1 = headers::is_llm_path("POST", v),
            k if k == headers::DEFAULT_CLUSTER_HEADER || headers::PREF_HEADERS.contains(&k) => {
                host::set_request_header(k, None);
            }
            _ => {}
        }
    }
    if llm != (true, true) {
        return Action::Continue;
    }
    let e = ApiError::no_provider("market-router has no valid configuration; see the host's log");
    if !host::send_response(503, &[("content-type", "application/json")], &e.body()) {
        warn!("market-router: the host refused the local reply (503)");
    }
    Action::Pause
}
