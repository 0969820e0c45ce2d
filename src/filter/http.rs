//! HTTP context: one request's walk from body to chosen provider and back.
//!
//! Route mode: the body callback ranks providers and sets the cluster header; the route sends
//! the request; the response callbacks classify the outcome and, when it is retryable, hold
//! the response and re-dispatch the buffered request to the next provider, replacing the
//! answer. Dispatch mode: every attempt is a `dispatch_http_call` from the request phase.

use super::Vm;
use crate::attempt::{classify_dispatched, classify_routed, Attempts, Next, Outcome};
use crate::config::FailoverMode;
use crate::errors::ApiError;
use crate::headers::{self, PREF_HEADERS};
use crate::host;
use crate::request::{self, RequestInfo};
use crate::select::{self, NoRoute, Prefs, Ranking};
use log::{debug, warn};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType};
use std::borrow::Cow;
use std::rc::Rc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not an LLM request, or finished: hands off.
    Passthrough,
    /// Holding headers while the body arrives.
    Reading,
    /// First attempt sent through the host's route.
    Routed,
    /// Route mode: holding a 2xx answer until its body shows it is well-formed.
    Validating,
    /// An attempt by `dispatch_http_call` is in flight.
    Dispatched,
    /// The filter answered (local reply or replaced response).
    Replied,
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
    ranking: Option<Ranking>,
    attempts: Option<Attempts>,
    token: Option<u32>,
    attempt_started_ms: u64,
    affinity: Option<Affinity>,
}

fn is_json(body: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
}

impl Http {
    pub(crate) fn new(id: u32, vm: Rc<Vm>) -> Self {
        Self {
            id,
            vm,
            state: State::Passthrough,
            headers: Vec::new(),
            body: Vec::new(),
            info: None,
            ranking: None,
            attempts: None,
            token: None,
            attempt_started_ms: 0,
            affinity: None,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Answers with an OpenAI-style error and stops the stream.
    fn reply_error(&mut self, e: &ApiError) -> Action {
        self.state = State::Replied;
        let mut hs: Vec<(String, String)> = vec![("content-type".into(), "application/json".into())];
        if self.vm.config.response_headers {
            if let Some(a) = &self.attempts {
                hs.push(("x-market-router-attempts".into(), a.tried.len().to_string()));
                if let Some(s) = a.min_retry_after_s() {
                    hs.push(("retry-after".into(), s.to_string()));
                }
            }
        }
        let refs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        if !host::send_response(e.status, &refs, &e.body()) {
            warn!("#{} market-router: the host refused the local reply ({})", self.id, e.status);
        }
        Action::Pause
    }

    /// Our response headers for an answer from `provider`.
    fn our_headers(&self, provider: usize) -> Vec<(String, String)> {
        if !self.vm.config.response_headers {
            return Vec::new();
        }
        let name = self.vm.config.providers.get(provider).map_or("", |p| p.name.as_str());
        let attempts = self.attempts.as_ref().map_or(1, |a| a.tried.len().max(1));
        let mut hs = vec![
            ("x-market-router-provider".to_string(), name.to_string()),
            ("x-market-router-attempts".to_string(), attempts.to_string()),
        ];
        if let Some(r) = &self.ranking {
            hs.push(("x-market-router-strategy".to_string(), r.strategy.as_str().to_string()));
        }
        hs
    }

    fn on_body_complete(&mut self, body: Vec<u8>) -> Action {
        let now = host::now_ms();
        let info = match request::parse(&body) {
            Ok(i) => i,
            Err(e) => return self.reply_error(&ApiError::bad_request(e.code(), e.message())),
        };
        let vm = Rc::clone(&self.vm);
        let config = &vm.config;
        vm.sync_market(now, false);
        vm.sync_health();
        let prefs = if config.routing.client_overrides {
            headers::prefs_from_headers(&self.headers)
        } else {
            Prefs::default()
        };
        let ranked = match vm.inner.try_borrow_mut() {
            Ok(mut inner) => {
                let inner = &mut *inner;
                select::rank(config, inner.market.as_deref(), &inner.health, &info, &prefs, now, &mut inner.rng)
            }
            Err(_) => return self.reply_error(&ApiError::internal("market-router state busy")),
        };
        let mut ranking = match ranked {
            Ok(r) => r,
            Err(NoRoute::UnknownModel) => return self.reply_error(&ApiError::unknown_model(&info.model)),
            Err(NoRoute::AllExcluded(ex)) => {
                let msg = select::explain_exclusions(config, &info.model, &ex);
                debug!("#{} market-router: {msg}", self.id);
                return self.reply_error(&ApiError::no_provider(msg));
            }
        };
        if ranking.stale {
            debug!("#{} market-router: market data is stale; ranking with static offers where configured", self.id);
        }
        if let Some(h) = &config.routing.affinity_header {
            if let Some(session) = self.header(h).filter(|s| !s.is_empty()) {
                let (slot, tag) = headers::affinity_slot(session);
                let key = format!("{}{slot}", vm.keys.affinity);
                let stored = host::shared_get(&key)
                    .and_then(|(v, _)| headers::affinity_decode(&v, &tag).map(str::to_string));
                if let Some(idx) = stored.as_deref().and_then(|n| config.provider_index(n)) {
                    select::prefer(&mut ranking, idx);
                }
                self.affinity = Some(Affinity { key, tag, stored });
            }
        }
        debug!(
            "#{} market-router: model {} strategy {} ranked [{}]",
            self.id,
            info.model,
            ranking.strategy.as_str(),
            ranking
                .candidates
                .iter()
                .map(|c| format!("{}:{:.3}", config.providers[c.provider].name, c.score))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.attempts = Some(Attempts::new(config, now));
        self.ranking = Some(ranking);
        self.info = Some(info);
        self.body = body;
        match config.failover.mode {
            FailoverMode::Route => self.route_first(now),
            FailoverMode::Dispatch => {
                if self.dispatch_next(now) {
                    Action::Pause
                } else {
                    let e = self.final_error();
                    self.reply_error(&e)
                }
            }
        }
    }

    fn final_error(&self) -> ApiError {
        let model = self.info.as_ref().map_or("", |i| i.model.as_str());
        match &self.attempts {
            Some(a) if !a.tried.is_empty() => a.final_error(&self.vm.config, model),
            _ => ApiError::no_provider(format!(
                "no provider for model `{}` could be tried",
                crate::errors::clip(model, 200)
            )),
        }
    }

    /// Picks the next attempt: (candidate index, timeout), claiming half-open probes.
    fn next_attempt(&mut self, now: u64) -> Option<(usize, u64)> {
        loop {
            let (ranking, attempts) = (self.ranking.as_mut()?, self.attempts.as_ref()?);
            match attempts.next(&ranking.candidates, now) {
                Next::GiveUp => return None,
                Next::Try { candidate, timeout_ms } => {
                    let c = &ranking.candidates[candidate];
                    if c.probe {
                        let name = &self.vm.config.providers[c.provider].name;
                        if !self.vm.claim_probe(name, now) {
                            ranking.candidates.remove(candidate);
                            continue;
                        }
                    }
                    return Some((candidate, timeout_ms));
                }
            }
        }
    }

    /// Route mode, first attempt: point the route at the primary and let the request go.
    fn route_first(&mut self, now: u64) -> Action {
        let Some((idx, timeout_ms)) = self.next_attempt(now) else {
            let e = self.final_error();
            return self.reply_error(&e);
        };
        let vm = Rc::clone(&self.vm);
        let config = &vm.config;
        let (Some(ranking), Some(info)) = (&self.ranking, &self.info) else {
            return self.reply_error(&ApiError::internal("lost request state"));
        };
        let cand = &ranking.candidates[idx];
        let provider = &config.providers[cand.provider];
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
        for (k, _) in &self.headers {
            if PREF_HEADERS.contains(&k.as_str()) || (k == "authorization" && !config.failover.forward_client_authorization) {
                host::set_request_header(k, None);
            }
        }
        if !info.stream {
            host::set_request_header("x-envoy-upstream-rq-timeout-ms", Some(&timeout_ms.to_string()));
        }
        let provider_idx = cand.provider;
        debug!("#{} market-router: routing model {} to {}", self.id, info.model, provider.name);
        if let Some(a) = self.attempts.as_mut() {
            a.start(provider_idx);
        }
        self.attempt_started_ms = now;
        self.state = State::Routed;
        Action::Continue
    }

    /// Starts the next attempt by `dispatch_http_call`. False when none is left.
    fn dispatch_next(&mut self, now: u64) -> bool {
        while let Some((idx, timeout_ms)) = self.next_attempt(now) {
            let vm = Rc::clone(&self.vm);
            let config = &vm.config;
            let (Some(ranking), Some(info)) = (&self.ranking, &self.info) else { return false };
            let cand = &ranking.candidates[idx];
            let provider_idx = cand.provider;
            let provider = &config.providers[provider_idx];
            let body: Cow<'_, [u8]> = match request::rewrite_model(&self.body, info, &cand.provider_model) {
                Some(b) => Cow::Owned(b),
                None => Cow::Borrowed(&self.body),
            };
            let path = self.header(":path").unwrap_or("/v1/chat/completions");
            let fwd = headers::forwarded(config, &self.headers);
            let mut hs: Vec<(&str, &str)> =
                vec![(":method", "POST"), (":path", path), (":authority", provider.authority.as_str())];
            hs.extend(fwd.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let result = host::dispatch(&provider.cluster, &hs, &body, timeout_ms);
            let name = provider.name.clone();
            let Some(attempts) = self.attempts.as_mut() else { return false };
            attempts.start(provider_idx);
            match result {
                Ok(token) => {
                    debug!("#{} market-router: attempt {} → {name}", self.id, attempts.count());
                    self.token = Some(token);
                    self.attempt_started_ms = now;
                    self.state = State::Dispatched;
                    return true;
                }
                Err(s) => {
                    warn!("#{} market-router: cannot dispatch to {name} ({s:?}); trying the next provider", self.id);
                    attempts.finish(Outcome::ConnectFailure);
                    vm.observe(&name, crate::health::Observation::Failure { retry_after_ms: None }, now);
                }
            }
        }
        false
    }

    /// Records an outcome and says whether the answer at hand should reach the client.
    /// Returns `Some(true)` deliver, `Some(false)` fail with the final error, `None` a next
    /// attempt is in flight.
    fn judge(&mut self, outcome: Outcome, now: u64) -> Option<bool> {
        let vm = Rc::clone(&self.vm);
        let provider = self.attempts.as_ref().and_then(|a| a.current)?;
        let name = vm.config.providers[provider].name.clone();
        let stream = self.info.as_ref().is_some_and(|i| i.stream);
        let ttfb = stream.then(|| now.saturating_sub(self.attempt_started_ms) as f64);
        if let Some(a) = self.attempts.as_mut() {
            a.finish(outcome);
        }
        if let Some(obs) = outcome.observation(ttfb) {
            vm.observe(&name, obs, now);
        }
        if let Outcome::Success(_) = outcome {
            self.remember_affinity(&name);
            return Some(true);
        }
        if !outcome.retryable(&vm.config.failover.retry_on, &vm.config.failover.retry_on_status) {
            return Some(true);
        }
        warn!("#{} market-router: provider {name} failed ({outcome}); failing over", self.id);
        if self.dispatch_next(now) {
            None
        } else {
            Some(false)
        }
    }

    fn remember_affinity(&self, provider: &str) {
        if let Some(a) = &self.affinity {
            if a.stored.as_deref() != Some(provider) {
                let _ = host::shared_set(&a.key, &headers::affinity_encode(&a.tag, provider), None);
            }
        }
    }

    /// Adds our headers to the routed response in place.
    fn decorate_routed(&self) {
        let Some(p) = self.attempts.as_ref().and_then(|a| a.tried.last().map(|(p, _)| *p)) else { return };
        for (k, v) in self.our_headers(p) {
            host::set_response_header(&k, &v);
        }
    }

    /// Replaces the response with a dispatched attempt's answer.
    fn deliver_dispatched(&mut self, status: u32, answer: &[(String, String)], body: &[u8]) {
        let provider = self.attempts.as_ref().and_then(|a| a.tried.last().map(|(p, _)| *p)).unwrap_or(0);
        let mut hs = headers::answer_headers(answer);
        hs.extend(self.our_headers(provider));
        let refs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.state = State::Replied;
        if !host::send_response(status, &refs, body) {
            warn!("#{} market-router: the host refused the replaced answer", self.id);
        }
    }

    /// Route mode: what to do with the routed attempt's outcome at response time.
    fn after_routed(&mut self, outcome: Outcome, now: u64) -> Action {
        match self.judge(outcome, now) {
            Some(true) => {
                self.decorate_routed();
                self.state = State::Passthrough;
                Action::Continue
            }
            Some(false) => {
                let e = self.final_error();
                self.reply_error(&e)
            }
            None => Action::Pause,
        }
    }
}

impl Context for Http {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        if self.token != Some(token_id) || self.state != State::Dispatched {
            return;
        }
        self.token = None;
        let now = host::now_ms();
        let answer = if num_headers == 0 { Vec::new() } else { host::call_response_headers() };
        let status = answer.iter().find(|(k, _)| k == ":status").and_then(|(_, v)| v.parse::<u32>().ok());
        let body = host::buffer(BufferType::HttpCallResponseBody, body_size).unwrap_or_default();
        let retry_after = answer.iter().find(|(k, _)| k == "retry-after").map(|(_, v)| v.as_str());
        let mut outcome = classify_dispatched(status, &body, retry_after);
        let stream = self.info.as_ref().is_some_and(|i| i.stream);
        if matches!(outcome, Outcome::Success(_)) && !stream && !is_json(&body) {
            outcome = Outcome::Malformed;
        }
        match self.judge(outcome, now) {
            Some(true) => self.deliver_dispatched(status.unwrap_or(502), &answer, &body),
            Some(false) => {
                let e = self.final_error();
                self.reply_error(&e);
            }
            None => {}
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let hs = host::request_headers();
        let method = hs.iter().find(|(k, _)| k == ":method").map_or("", |(_, v)| v.as_str());
        let path = hs.iter().find(|(k, _)| k == ":path").map_or("", |(_, v)| v.as_str());
        if !headers::is_llm_path(method, path) {
            return Action::Continue;
        }
        self.headers = hs;
        if let Some(len) = self.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            if len > self.vm.config.max_body_bytes {
                return self.reply_error(&ApiError::body_too_large(self.vm.config.max_body_bytes));
            }
        }
        if end_of_stream {
            return self.on_body_complete(Vec::new());
        }
        self.state = State::Reading;
        Action::Pause
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
            None => self.reply_error(&ApiError::internal("the host did not hand over the request body")),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.state != State::Routed {
            return Action::Continue;
        }
        let now = host::now_ms();
        let status = host::response_header(":status").and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
        if (200..300).contains(&status) {
            let stream = self.info.as_ref().is_some_and(|i| i.stream);
            if !stream && self.vm.config.failover.retry_on.malformed {
                if end_of_stream {
                    return self.after_routed(Outcome::Malformed, now);
                }
                self.state = State::Validating;
                return Action::Pause;
            }
            return self.after_routed(Outcome::Success(status), now);
        }
        let details = host::property(&["response", "code_details"]);
        let retry_after = host::response_header("retry-after");
        let outcome = classify_routed(status, details.as_deref(), retry_after.as_deref());
        self.after_routed(outcome, now)
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match self.state {
            State::Dispatched => Action::Pause,
            State::Validating => {
                if !end_of_stream {
                    return Action::Pause;
                }
                let now = host::now_ms();
                let body = host::buffer(BufferType::HttpResponseBody, body_size).unwrap_or_default();
                let outcome = if is_json(&body) { Outcome::Success(200) } else { Outcome::Malformed };
                self.after_routed(outcome, now)
            }
            _ => Action::Continue,
        }
    }
}
