//! HTTP context: one request's walk from body to chosen provider and back, as host callbacks.
//!
//! Route mode: the body callback ranks providers and sets the cluster header; the route sends
//! the request; the response callbacks classify the outcome and, when it is retryable, hold
//! the response and re-dispatch the buffered request to the next provider, replacing the
//! answer. Dispatch mode: every attempt is a `dispatch_http_call` from the request phase.
//! What each callback means in each phase is the core's (`exchange`: phases and steps,
//! `walk`: attempts and verdicts); this file reads what they ask for and carries out their
//! steps and effects with host calls.

mod native;

use super::Vm;
use crate::answer;
use crate::attempt::Outcome;
use crate::errors::ApiError;
use crate::exchange::{
    self, AfterRouted, Broke, Call, Exchange, OnBody, OnHeaders, Phase, Place, Reply,
};
use crate::explain;
use crate::headers;
use crate::host;
use crate::metrics::{self, Global, Usage};
use crate::outbound::{self, NotRouted, Outgoing};
use crate::request::RequestInfo;
use crate::routing::{self, Affinity, First, OnRequest};
use crate::served::Served;
use crate::walk::{Effect, Verdict, Walk};
use log::{debug, warn};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType};
use std::rc::Rc;

pub(crate) struct Http {
    id: u32,
    vm: Rc<Vm>,
    /// The request's HTTP phases (core): where it stands, what its held answer keeps.
    ex: Exchange,
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
    /// What the last failing provider said (cleaned), for the final error.
    last_said: Option<String>,
    /// Route mode: the last bytes of an unheld answer, where its usage sits.
    tail: Vec<u8>,
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

impl Http {
    pub(crate) fn new(id: u32, vm: Rc<Vm>) -> Self {
        Self {
            id,
            vm,
            ex: Exchange::default(),
            headers: Vec::new(),
            body: Vec::new(),
            info: None,
            walk: Walk::default(),
            token: None,
            affinity: None,
            snapshot_age_ms: None,
            usage: None,
            last_said: None,
            tail: Vec::new(),
            bounced: None,
            drain: 0,
            exact_len: None,
        }
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
        self.ex.phase = Phase::Done;
        Action::Continue
    }

    /// Counts an error answer and gives its headers.
    fn error_headers(&self, e: &ApiError) -> Vec<(String, String)> {
        if let Some(c) = Global::rejected(e.reason) {
            self.vm.metrics.inc(c);
        }
        self.served().error_headers()
    }

    fn send(&mut self, status: u32, hs: &[(String, String)], body: &[u8]) {
        self.ex.phase = Phase::Done;
        let refs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        if !host::send_response(status, &refs, body) {
            warn!(
                "#{} market-router: the host refused the local reply ({status})",
                self.id
            );
        }
    }

    /// What is known of the request's answer (core): cost, our headers, decision record.
    fn served(&self) -> Served<'_> {
        Served {
            config: &self.vm.config,
            walk: &self.walk,
            model: self.info.as_ref().map(|i| i.model.as_str()),
            usage: self.usage,
            snapshot_age_ms: self.snapshot_age_ms,
            provider_error: self.last_said.as_deref(),
        }
    }

    /// Provider index of the last finished attempt.
    fn served_by(&self) -> Option<usize> {
        self.served().provider()
    }

    /// Our response headers for an answer from `provider`, handed to `emit` one by one.
    fn our_headers(&self, provider: usize, emit: impl FnMut(&'static str, &str)) {
        self.served().headers(provider, emit);
    }

    /// Writes the decision record (Envoy filter state `wasm.market_router.decision`).
    fn record_decision(&self, provider: Option<usize>, status: Option<u32>) {
        if !self.vm.config.decision_record {
            return;
        }
        let record = self.served().decision(provider, status);
        host::set_decision_property(&record.to_json());
    }

    /// Counts the delivered answer's tokens and cost.
    fn account(&self, provider: usize) {
        for (counter, n) in self.served().counts(provider).into_iter().flatten() {
            self.vm.metrics.add(provider, counter, n);
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
        let (status, body) =
            explain::answer(&vm.config, inner.market.as_deref(), &inner.health, q, now);
        drop(inner);
        let hs = vec![("content-type".to_string(), "application/json".to_string())];
        self.send(status, &hs, body.to_string().as_bytes());
        Action::Pause
    }

    /// The body is complete: the core decides (`routing`), then the first attempt goes.
    fn on_body_complete(&mut self, body: Vec<u8>) -> Action {
        let t0 = host::now_ns();
        let now = (t0 / 1_000_000) as u64;
        let info = match routing::read(&body) {
            Ok(i) => i,
            Err(e) => return self.reply_error(&e),
        };
        let vm = Rc::clone(&self.vm);
        let config = &vm.config;
        vm.sync_market(now, false);
        vm.sync_health(now, false);
        let decided = match vm.inner.try_borrow_mut() {
            Ok(mut inner) => {
                let inner = &mut *inner;
                self.snapshot_age_ms = inner.market.as_ref().map(|m| m.age_ms(now));
                let books = routing::Books {
                    market: inner.market.as_deref(),
                    health: &inner.health,
                    rng: &mut inner.rng,
                };
                routing::decide(
                    &host::Wasm,
                    config,
                    &vm.keys.affinity,
                    books,
                    &self.headers,
                    &info,
                    now,
                    &mut self.walk,
                    |e| apply(&vm, &info.model, None, now, e),
                )
            }
            Err(_) => return self.reply_error(&ApiError::internal("market-router state busy")),
        };
        self.info = Some(info);
        match decided {
            Ok(affinity) => self.affinity = affinity,
            Err(u) => {
                if u.excluded {
                    debug!("#{} market-router: {}", self.id, u.error.message);
                }
                return self.reply_error(&u.error);
            }
        }
        if let Some(ranking) = &self.walk.ranking {
            if ranking.last_resort {
                warn!(
                    "#{} market-router: every provider is held back by health; trying them anyway, soonest free first",
                    self.id
                );
            }
            if ranking.stale {
                debug!("#{} market-router: market data is stale; ranking on its last figures (its offline counts as degraded)", self.id);
            }
            if log::log_enabled!(log::Level::Debug) {
                debug!(
                    "#{} market-router: model {} strategy {} ranked [{}]",
                    self.id,
                    self.info.as_ref().map_or("", |i| i.model.as_str()),
                    ranking.strategy.as_str(),
                    routing::ranked_line(config, &self.walk)
                );
            }
        }
        self.body = body;
        let action = match routing::first(config, host::caps().route_failover) {
            First::Route => self.route_first(now),
            First::Native => self.native_first(now),
            First::Dispatch => {
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
        if self.ex.encoded || body_size == 0 {
            return;
        }
        let n = body_size.min(answer::TAIL_BYTES);
        if let Some(b) = host::buffer_at(BufferType::HttpResponseBody, body_size - n, n) {
            answer::keep_tail(&mut self.tail, &b);
        }
    }

    fn final_error(&self) -> ApiError {
        self.served().final_error(self.last_said.as_deref())
    }

    /// Route mode, first attempt: point the route at the primary and let the request go.
    fn route_first(&mut self, now: u64) -> Action {
        let vm = Rc::clone(&self.vm);
        let Some(info) = &self.info else {
            return self.reply_error(&ApiError::internal("lost request state"));
        };
        let req = Outgoing {
            config: &vm.config,
            info,
            body: &self.body,
            client: &self.headers,
        };
        let (model, affinity) = (info.model.as_str(), self.affinity.as_ref());
        let routed = outbound::route_first(
            &host::Wasm,
            &mut self.walk,
            &req,
            now,
            |p| vm.claim_probe(&vm.config.providers[p].name, now),
            |e| apply(&vm, model, affinity, now, e),
        );
        match routed {
            Ok(p) => {
                debug!(
                    "#{} market-router: routing model {} to {}",
                    self.id, model, vm.config.providers[p].name
                );
                self.ex.phase = Phase::Routed;
                Action::Continue
            }
            Err(NotRouted::NoneLeft) => {
                let e = self.final_error();
                self.reply_error(&e)
            }
            Err(NotRouted::Refused(what)) => self.reply_error(&ApiError::internal(what)),
        }
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
        let vm = Rc::clone(&self.vm);
        let Some(info) = &self.info else {
            return false;
        };
        let req = Outgoing {
            config: &vm.config,
            info,
            body: &self.body,
            client: &self.headers,
        };
        let (id, model, affinity) = (self.id, info.model.as_str(), self.affinity.as_ref());
        let token = outbound::dispatch_next(
            &host::Wasm,
            &mut self.walk,
            &req,
            now,
            |p| vm.claim_probe(&vm.config.providers[p].name, now),
            |e| apply(&vm, model, affinity, now, e),
            |p, e| {
                let name = &vm.config.providers[p].name;
                warn!("#{id} market-router: cannot dispatch to {name} ({e}); trying the next provider");
            },
        );
        let Some(token) = token else {
            return false;
        };
        if log::log_enabled!(log::Level::Debug) {
            let a = self.walk.attempts.as_ref();
            let name = a
                .and_then(|a| a.current)
                .map_or("?", |p| vm.config.providers[p].name.as_str());
            debug!(
                "#{id} market-router: attempt {} → {name}",
                a.map_or(0, |a| a.count())
            );
        }
        self.token = Some(token);
        self.ex.phase = Phase::Dispatched;
        true
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

    /// Route mode: the routed answer goes to the client, with our headers added in place.
    fn deliver_routed(&mut self, status: u32) {
        let Some(p) = self.served_by() else { return };
        self.our_headers(p, |k, v| {
            host::set_response_header(k, v);
        });
        self.account(p);
        // A streamed or unheld answer's record is written once it ends (or breaks), with its
        // usage.
        if !self.ex.record_at_end(status, self.stream()) {
            self.record_decision(Some(p), Some(status));
        }
    }

    /// Replaces the response with a dispatched attempt's answer.
    fn deliver_dispatched(&mut self, status: u32, answer: &[(String, String)], body: &[u8]) {
        let provider = self.served_by().unwrap_or(0);
        if (200..300).contains(&status) && !self.ex.encoded {
            self.usage = metrics::usage_of_answer(body).or_else(|| metrics::usage_in_sse(body));
        }
        let mut hs = headers::answer_headers(answer);
        self.our_headers(provider, |k, v| hs.push((k.to_string(), v.to_string())));
        self.account(provider);
        self.record_decision(Some(provider), Some(status));
        if !self.replace_held(status, hs.clone(), body) {
            if self.ex.encoded && !body.is_empty() && host::caps().local_reply_newline {
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
    fn replace_held(&mut self, status: u32, headers: Vec<(String, String)>, body: &[u8]) -> bool {
        let reply = Reply {
            status,
            headers,
            body: body.to_vec(),
        };
        match self.ex.place(reply) {
            (Place::Now(size), Some(r)) => {
                if !self.apply_replacement(r.status, &r.headers, &r.body, size) {
                    return false;
                }
                self.ex.phase = Phase::Done;
                host::resume_response();
                true
            }
            (Place::Later, _) => true,
            _ => false,
        }
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
        if self.ex.routed_held {
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
        let verdict = self.judge(outcome, now);
        match self.ex.after_verdict(verdict, status, self.stream()) {
            AfterRouted::Deliver => {
                self.deliver_routed(status);
                Action::Continue
            }
            // The routed attempt was the last: read what its provider said, then answer.
            AfterRouted::ReadError | AfterRouted::InFlight => Action::Pause,
            AfterRouted::FinalError => {
                let e = self.final_error();
                self.reply_error(&e)
            }
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
        if self.ex.phase == Phase::Bouncing {
            self.token = None;
            self.ex.phase = Phase::Dispatched;
            self.drain = host::caps().bounce.map_or(0, |b| b.drain);
            if let Some(f) = self.bounced.take() {
                self.conclude_call(f);
            }
            self.drain = 0;
            return;
        }
        if self.ex.phase != Phase::Dispatched {
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
        let status = host::header(&answer, ":status").and_then(|v| v.parse::<u32>().ok());
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
        let find = |name: &str| host::header(&answer, name);
        // A provider that compresses although asked for identity: its answer is delivered as
        // it came (not read, so not judged malformed; priced from the estimate).
        self.ex.encoded = answer::is_encoded(find("content-encoding"));
        let call = Call {
            status,
            failure: failure.as_deref(),
            body: &body,
            retry_after: find("retry-after"),
            encoded: self.ex.encoded,
            stream: self.stream(),
        };
        let outcome = call.outcome(|b| metrics::inspect_answer(b).is_ok());
        if call.says_why(outcome) {
            self.last_said = answer::provider_message(&body);
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
                        self.ex.phase = Phase::Bouncing;
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
        self.headers = host::request_headers();
        let vm = Rc::clone(&self.vm);
        let step = routing::on_request_headers(
            &host::Wasm,
            &vm.config,
            &self.headers,
            end_of_stream,
            // Kong never resumes a pause from here; its body callback comes anyway.
            host::caps().pause_request_headers,
            &mut self.ex.phase,
            |e| apply(&vm, "", None, 0, e),
        );
        self.on_request(step)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let step =
            routing::on_request_body(&self.vm.config, self.ex.phase, body_size, end_of_stream);
        self.on_request(step)
    }

    /// Carries out a request callback's step.
    fn on_request(&mut self, step: OnRequest) -> Action {
        match step {
            OnRequest::Continue => Action::Continue,
            OnRequest::Pause => Action::Pause,
            OnRequest::Explain(q) => self.answer_explain(q),
            OnRequest::Refuse(e) => self.reply_error(&e),
            // An empty body: Kong runs no body callback for it.
            OnRequest::Decide(None) => self.on_body_complete(Vec::new()),
            OnRequest::Decide(Some(size)) => {
                match host::buffer(BufferType::HttpRequestBody, size) {
                    Some(body) => self.on_body_complete(body),
                    None => self.reply_error(&ApiError::internal(
                        "the host did not hand over the request body",
                    )),
                }
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.exact_len.is_some() {
            return self.exact_reply_headers();
        }
        if self.ex.phase == Phase::Native {
            return self.native_response_headers(end_of_stream);
        }
        if !matches!(self.ex.phase, Phase::Routed | Phase::Validating) {
            return Action::Continue;
        }
        let now = host::now_ms();
        let status = host::response_header(":status")
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
        let (stream, include_usage) = self
            .info
            .as_ref()
            .map_or((false, false), |i| (i.stream, i.include_usage));
        let step = self.ex.on_headers(
            status,
            end_of_stream,
            stream,
            include_usage,
            &self.vm.config,
            now,
            &HostResponse,
        );
        match step {
            OnHeaders::Ignore => Action::Continue,
            OnHeaders::Hold => Action::Pause,
            OnHeaders::Judge { outcome, status } => self.after_routed(outcome, status, now),
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(len) = self.exact_len {
            return self.exact_reply_body(len, body_size, end_of_stream);
        }
        if self.ex.phase == Phase::NativeHolding {
            return self.native_response_body(body_size, end_of_stream);
        }
        let include_usage = self.info.as_ref().is_some_and(|i| i.include_usage);
        match self.ex.on_body(body_size, end_of_stream, include_usage) {
            OnBody::Continue => Action::Continue,
            OnBody::Pause => Action::Pause,
            OnBody::Replace(r, size) => {
                if !self.apply_replacement(r.status, &r.headers, &r.body, size) {
                    warn!(
                        "#{} market-router: the host refused to replace the held answer",
                        self.id
                    );
                }
                Action::Continue
            }
            OnBody::Overflow => {
                // Status and time as seen at the held headers.
                let (status, now) = self.ex.held.unwrap_or((200, host::now_ms()));
                self.keep_tail(body_size);
                self.after_routed(Outcome::Success(status), status, now)
            }
            OnBody::Inspect => {
                // Status and time as seen at the held headers: the body follows at once.
                let (status, now) = self.ex.held.unwrap_or((200, host::now_ms()));
                let body =
                    host::buffer(BufferType::HttpResponseBody, body_size).unwrap_or_default();
                let inspected = metrics::inspect_answer(&body);
                let retry_malformed = self.vm.config.failover.retry_on.malformed;
                let outcome = Exchange::validated(inspected.is_ok(), retry_malformed, status);
                self.usage = inspected.ok().flatten();
                self.after_routed(outcome, status, now)
            }
            OnBody::Tail { end } => {
                self.keep_tail(body_size);
                if let Some(status) = end {
                    self.usage = answer::usage_in_tail(&self.tail);
                    if let Some(p) = self.served_by() {
                        self.account(p);
                        self.record_decision(Some(p), Some(status));
                    }
                }
                Action::Continue
            }
            OnBody::ReadError { bytes, in_place } => {
                self.last_said = host::buffer(BufferType::HttpResponseBody, bytes)
                    .and_then(|b| answer::provider_message(&b));
                let e = self.final_error();
                if in_place {
                    return self.replace_error(&e, body_size);
                }
                self.reply_error(&e)
            }
            OnBody::Chunk { read_usage, end } => {
                // The final usage chunk, which OpenAI-compatible providers send when the
                // request asks for it (`stream_options.include_usage`): only a chunk that
                // mentions usage is parsed.
                if read_usage {
                    if let Some(chunk) = host::buffer(BufferType::HttpResponseBody, body_size) {
                        if let Some(u) = metrics::usage_in_sse(&chunk) {
                            self.usage = Some(u);
                        }
                    }
                }
                if end {
                    if let Some(p) = self.served_by() {
                        self.account(p);
                        self.record_decision(Some(p), Some(200));
                    }
                }
                Action::Continue
            }
        }
    }

    fn on_log(&mut self) {
        let delivered = match self.ex.on_log() {
            Broke::Nothing => return,
            Broke::Delivered => true,
            Broke::Held => false,
        };
        let now = host::now_ms();
        let vm = Rc::clone(&self.vm);
        let model = self.info.as_ref().map_or("", |i| i.model.as_str());
        let affinity = self.affinity.as_ref();
        let broke = self
            .walk
            .broke_off(delivered, |e| apply(&vm, model, affinity, now, e));
        let Some(p) = broke else { return };
        if !delivered {
            warn!(
                "#{} market-router: provider {} broke off its answer mid-body; the host answered 502",
                self.id, vm.config.providers[p].name
            );
        }
        self.record_decision(Some(p), Some(if delivered { 200 } else { 502 }));
    }
}

/// The routed answer's headers and reason, read from the host when the core asks.
struct HostResponse;

impl exchange::ResponseView for HostResponse {
    fn header(&self, name: &str) -> Option<String> {
        host::response_header(name)
    }

    fn code_details(&self) -> Option<String> {
        host::property(&["response", "code_details"])
    }
}

/// Carries out one of the walk's effects on this VM (health, counters, market report, affinity).
pub(crate) fn apply(vm: &Vm, model: &str, affinity: Option<&Affinity>, now: u64, effect: Effect) {
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
        Effect::TallyBroken { provider } => vm.tally_broken_stream(provider, model),
        Effect::Remember { provider } => {
            if let Some(a) = affinity {
                a.remember(&host::Wasm, &vm.config.providers[provider].name);
            }
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
