//! Envoy mode, downstream role: rank, hand Envoy the order and the bounds, and read back what
//! the attempts (the upstream role, `filter/upstream.rs`) recorded when the answer arrives.

use super::{Http, State};
use crate::errors::ApiError;
use crate::headers::PREF_HEADERS;
use crate::host;
use crate::metrics::{self, Global};
use crate::native::{self, Plan};
use log::warn;
use proxy_wasm::types::{Action, BufferType};
use std::rc::Rc;

impl Http {
    /// Sets the order, the attempt bound and the per-try timeout, and lets the request go to
    /// Envoy's router.
    pub(super) fn native_first(&mut self, now: u64) -> Action {
        let vm = Rc::clone(&self.vm);
        let config = &vm.config;
        // The order: ranked candidates within max_attempts, half-open probes claimed first.
        let mut order: Vec<usize> = Vec::new();
        if let Some(ranking) = self.walk.ranking.as_mut() {
            let mut i = 0;
            while i < ranking.candidates.len()
                && order.len() < config.failover.max_attempts as usize
            {
                let c = &ranking.candidates[i];
                if c.probe && !vm.claim_probe(&config.providers[c.provider].name, now) {
                    ranking.candidates.remove(i);
                    continue;
                }
                order.push(i);
                i += 1;
            }
        }
        let (Some(ranking), Some(info)) = (&self.walk.ranking, &self.info) else {
            return self.reply_error(&ApiError::internal("lost request state"));
        };
        if order.is_empty() {
            let e = self.final_error();
            return self.reply_error(&e);
        }
        let factor = config.failover.ttft_timeout_factor;
        let attempt_timeout = config.failover.attempt_timeout_ms;
        // A stream's first byte is its first token; a non-streaming answer's first byte is the
        // whole answer (the upstream role holds it to check it), bounded by the attempt timeout.
        let per_try = if info.stream {
            native::per_try_timeout_ms(
                order.iter().map(|&i| {
                    native::attempt_ttfb_bound_ms(
                        ranking.candidates[i].ttft_p95_ms,
                        factor,
                        attempt_timeout,
                    )
                }),
                attempt_timeout,
            )
        } else {
            attempt_timeout
        };
        let plan = Plan {
            model: info.model.clone(),
            stream: info.stream,
            per_try_ms: per_try,
            path: self.header(":path").unwrap_or_default().to_string(),
            providers: order
                .iter()
                .map(|&i| {
                    let c = &ranking.candidates[i];
                    (c.provider, c.provider_model.clone())
                })
                .collect(),
        };
        let names: Vec<&str> = plan
            .providers
            .iter()
            .map(|(p, _)| config.providers[*p].name.as_str())
            .collect();
        // The client's own retry and timeout headers never steer Envoy.
        // Nor do the client's credentials reach a provider (the upstream role sets each
        // provider's own on every attempt).
        for (k, _) in &self.headers {
            if native::CLIENT_RETRY_HEADERS.contains(&k.as_str())
                || PREF_HEADERS.contains(&k.as_str())
                || k == "proxy-authorization"
                || (k == "authorization" && !config.failover.forward_client_authorization)
                || (k != "authorization" && native::credential_headers_contain(config, k))
            {
                host::set_request_header(k, None);
            }
        }
        let mut num = [0u8; 20];
        let ok =
            host::set_request_header(native::ORDER_HEADER, Some(&native::order_header(&names)))
                && host::set_request_header(
                    "x-envoy-max-retries",
                    Some(crate::headers::decimal(order.len() as u64 - 1, &mut num)),
                )
                && host::set_request_header(
                    "x-envoy-upstream-rq-per-try-timeout-ms",
                    Some(crate::headers::decimal(per_try, &mut num)),
                )
                && (info.stream
                    || host::set_request_header(
                        "x-envoy-upstream-rq-timeout-ms",
                        Some(crate::headers::decimal(
                            config.failover.deadline_ms,
                            &mut num,
                        )),
                    ))
                && host::set_property(native::PLAN_PROPERTY, &plan.encode());
        if !ok {
            return self.reply_error(&ApiError::internal("the host refused the routing headers"));
        }
        self.state = State::Native;
        Action::Continue
    }

    /// The attempts the upstream role recorded, into `self.walk.attempts` (and the last one's
    /// usage, when it checked a non-streaming answer).
    fn load_tried(&mut self) {
        let list = host::property(&[native::TRIED_PROPERTY]).unwrap_or_default();
        let tried = native::parse_tried(list.as_bytes());
        if let Some(u) = tried.last().and_then(|t| t.usage) {
            self.usage = Some(u);
        }
        // What a failed attempt's provider said (read only when one failed).
        if tried
            .iter()
            .any(|t| !matches!(t.outcome, crate::attempt::Outcome::Success(_)))
        {
            self.last_said = host::property(&[native::SAID_PROPERTY]);
        }
        if let Some(a) = self.walk.attempts.as_mut() {
            a.current = None;
            a.tried = tried.into_iter().map(|t| (t.provider, t.outcome)).collect();
        }
    }

    /// The answer Envoy's router settled on: a provider's own (delivered with our headers) or
    /// Envoy's local reply after the last attempt (replaced by our error listing the attempts).
    pub(super) fn native_response_headers(&mut self, end_of_stream: bool) -> Action {
        self.load_tried();
        let status = host::response_header(":status")
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
        let tried = self.walk.attempts.as_ref().map_or(0, |a| a.tried.len());
        // A 2xx is the provider's (Envoy's own replies on this route are errors).
        let details = if (200..300).contains(&status) {
            String::new()
        } else {
            host::property(&["response", "code_details"]).unwrap_or_default()
        };
        let from_provider = details.is_empty() || details == "via_upstream";
        if !from_provider {
            if tried == 0 {
                crate::upstream::drift(
                    &self.vm,
                    &format!("Envoy answered {status} ({details}) without trying any provider (the route's priority groups lack the order's providers, or the clusters lack the upstream role)"),
                );
            }
            let e = self.final_error();
            return self.reply_error(&e);
        }
        if tried == 0 {
            crate::upstream::drift(
                &self.vm,
                &format!(
                    "an answer arrived but no attempt was recorded: the provider clusters lack the market-router upstream filter (root id {})",
                    native::UPSTREAM_ROOT_ID
                ),
            );
            self.state = State::Done;
            return Action::Continue;
        }
        if (200..300).contains(&status) {
            if tried > 1 {
                self.vm.metrics.inc(Global::RecoveredByFailover);
            }
            if let Some(p) = self.served_by() {
                let name = self.vm.config.providers[p].name.clone();
                self.remember_affinity(&name);
            }
            // Held to price it from its usage, unless the upstream role already read it. Too
            // big to hold, or compressed: it flows, priced from the usage at its end (the
            // record is written then).
            if !self.stream() && self.usage.is_none() && !end_of_stream {
                self.held = Some((status, host::now_ms()));
                self.encoded =
                    crate::answer::is_encoded(host::response_header("content-encoding").as_deref());
                let holdable = !self.encoded
                    && crate::answer::fits(
                        host::response_header("content-length").as_deref(),
                        crate::answer::HOLD_LIMIT_BYTES,
                    );
                if self.vm.config.response_headers && holdable {
                    self.state = State::NativeHolding;
                    return Action::Pause;
                }
                self.unheld = true;
                self.deliver_routed(status);
                self.state = State::Unheld;
                return Action::Continue;
            }
            self.deliver_routed(status);
            self.state = if self.stream() {
                State::Streaming
            } else {
                State::Done
            };
            return Action::Continue;
        }
        // Every attempt failed (or the provider's answer is not retried): its own answer.
        if self.walk.attempts.as_ref().is_some_and(|a| {
            a.tried.last().is_some_and(|(_, o)| {
                o.retryable(
                    &self.vm.config.failover.retry_on,
                    &self.vm.config.failover.retry_on_status,
                )
            })
        }) {
            self.vm.metrics.inc(Global::AllFailed);
            warn!(
                "#{} market-router: all {tried} attempt(s) failed; the client gets the last provider's answer ({status})",
                self.id
            );
        }
        self.deliver_routed(status);
        self.state = State::Done;
        Action::Continue
    }

    /// A held non-streaming answer is complete: its usage prices it, then it goes out.
    pub(super) fn native_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (status, _) = self.held.unwrap_or((200, 0));
        if !end_of_stream {
            if body_size <= crate::answer::HOLD_LIMIT_BYTES {
                return Action::Pause;
            }
            // A chunked answer grew past what may be held: it flows on from here, priced from
            // the usage at its end.
            self.keep_tail(body_size);
            self.unheld = true;
            self.deliver_routed(status);
            self.state = State::Unheld;
            return Action::Continue;
        }
        let body = host::buffer(BufferType::HttpResponseBody, body_size).unwrap_or_default();
        self.usage = metrics::inspect_answer(&body).ok().flatten();
        self.deliver_routed(status);
        self.state = State::Done;
        Action::Continue
    }
}
