//! Envoy mode, upstream role: what the module decides as an upstream HTTP filter of each
//! provider cluster (root id [`native::UPSTREAM_ROOT_ID`]), once per attempt of Envoy's router.
//!
//! Per attempt: find the provider by the attempt's cluster (a cluster no provider uses, or
//! another provider than the order's next, is route drift), remove every provider's credential
//! headers (attempts share one request-header map) and set this provider's own, rewrite `model`
//! to its id, hold a streaming answer's headers until its first chunk (so a reset or an SSE
//! error event before it stays retriable), and record the outcome: shared health, counters,
//! the market report and the attempt list the downstream role reads back
//! ([`native::TRIED_PROPERTY`]).
//!
//! The filter's upstream context (`crates/filter/src/upstream.rs`) hands each callback here as
//! an event; host calls go through [`HttpHost`] (headers, the request body) and
//! [`Properties`] (the plan, the attempt list, the attempt's cluster); what the VM learns
//! comes out as [`Out`]s. Time is a parameter (`clock`, read only where the attempt needs it).

use crate::answer;
use crate::attempt::Outcome::{self, *};
use crate::config::Config;
use crate::health::{self, Observation};
use crate::host::{property_text, HttpHost, Properties};
use crate::metrics::{self, Global, PerProvider, Usage};
use crate::native::{self, Plan, Tried};
use crate::request;
use crate::walk::Effect;

/// A route drift is logged at most this often per VM (each one is counted).
pub const DRIFT_LOG_EVERY_MS: u64 = 60_000;

/// When a VM last logged a route drift: every drift is counted, one a minute is logged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriftLog {
    /// When the last one was logged, ms (0: never).
    last_ms: u64,
}

impl DriftLog {
    /// None logged yet.
    pub const NEVER: DriftLog = DriftLog { last_ms: 0 };

    /// Whether a drift seen at `now` is logged (then it is the last logged one).
    pub fn due(&mut self, now: u64) -> bool {
        if self.last_ms == 0 || now >= self.last_ms + DRIFT_LOG_EVERY_MS {
            self.last_ms = now.max(1);
            true
        } else {
            false
        }
    }
}

/// The log line of a route drift described by `what`.
pub fn drift_line(what: &str) -> String {
    format!(
        "market-router: envoy mode: {what}; the route's priority groups and clusters do not match the plugin's providers: regenerate them from this plugin configuration with market-router-envoy-config (counted in market_router.route_drift; logged at most once a minute)"
    )
}

/// Whether the callbacks of the request at hand go on or wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on.
    Continue,
    /// Wait (for the body, or more of it).
    Pause,
}

/// What an attempt's callback leads to besides its host calls, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Out<'a> {
    /// A walk effect (health, counters, the market report) of a request for `model`, at `now`.
    Effect {
        /// The effect.
        effect: Effect,
        /// The model the client asked for (the market report's key).
        model: &'a str,
        /// When, ms.
        now: u64,
    },
    /// Envoy's route and the plugin's providers do not match (counted already, by an
    /// [`Out::Effect`] just before): logged at error through [`DriftLog`] and [`drift_line`].
    Drift(String),
    /// Debug: an attempt on `provider` starts.
    Attempting {
        /// Provider index.
        provider: usize,
    },
    /// Warn: `provider` failed and Envoy tries the next one.
    FailingOver {
        /// Provider index.
        provider: usize,
        /// How it failed.
        outcome: Outcome,
    },
    /// Debug: the attempt was cut because the client went away first.
    Cut,
    /// An outcome was recorded at `now`: batched counters may be written.
    Recorded {
        /// When, ms.
        now: u64,
    },
}

/// What the attempt's answer is held for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Hold {
    #[default]
    None,
    /// A 2xx stream's headers, until the first body chunk.
    FirstChunk,
    /// A 2xx non-streaming answer's headers, until the whole body (malformed check).
    WholeBody,
    /// An error answer's headers, until its body (or its first `ERROR_READ_BYTES`): what the
    /// provider said goes to the decision record.
    ErrorBody,
}

/// One attempt of Envoy's router, as the upstream role follows it.
#[derive(Debug, Clone, Default)]
pub struct Attempt {
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

impl Attempt {
    /// The provider this attempt went to, once its request headers were seen with a plan.
    pub fn provider(&self) -> Option<usize> {
        self.provider
    }

    /// Event: the attempt's request headers (`end_of_stream`: no body follows). Without a plan
    /// (a request the downstream role did not route) the attempt is left alone.
    pub fn on_request_headers<H: HttpHost + Properties>(
        &mut self,
        host: &H,
        config: &Config,
        end_of_stream: bool,
        clock: impl Fn() -> u64,
        mut out: impl FnMut(Out<'_>),
    ) -> Flow {
        let Some(plan) =
            property_text(host, &[native::PLAN_PROPERTY]).and_then(|s| Plan::decode(s.as_bytes()))
        else {
            return Flow::Continue;
        };
        let cluster = property_text(host, &["xds", "cluster_name"]).unwrap_or_default();
        let drift = |out: &mut dyn FnMut(Out<'_>), what: String| {
            out(Out::Effect {
                effect: Effect::CountGlobal(Global::RouteDrift),
                model: "",
                now: 0,
            });
            out(Out::Drift(what));
        };
        let Some(p) = config.providers.iter().position(|p| p.cluster == cluster) else {
            drift(
                &mut out,
                format!("the route sent an attempt to cluster `{cluster}`, which no provider in the plugin configuration uses"),
            );
            return Flow::Continue;
        };
        self.tried = property_text(host, &[native::TRIED_PROPERTY])
            .map(String::into_bytes)
            .unwrap_or_default();
        // Envoy walks the route's priority groups in the order handed over: attempt N must be
        // on the order's N-th provider (the last one if Envoy tries more).
        let before = native::tried_count(&self.tried);
        if let Some(&(want, _)) = plan.providers.get(before).or(plan.providers.last()) {
            if want != p {
                let w = &config.providers[want];
                drift(
                    &mut out,
                    format!(
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
        self.started_ms = clock();
        out(Out::Effect {
            effect: Effect::Count {
                provider: p,
                counter: PerProvider::Attempts,
            },
            model: &plan.model,
            now: self.started_ms,
        });
        let provider = &config.providers[p];
        // A refused header edit leaves the attempt as Envoy built it: nothing here can do
        // better than let it go (the provider's answer says whether it was accepted).
        if provider.authority != provider.cluster {
            let _ = host.set_request_header(":authority", Some(&provider.authority));
        }
        // Attempts share one header map: a retry starts from the client's path and drops the
        // credentials an earlier attempt set for its provider (the downstream role removed the
        // client's own before the first).
        if !self.tried.is_empty() {
            if !plan.path.is_empty() {
                let _ = host.set_request_header(":path", Some(&plan.path));
            }
            for name in native::credential_headers(config) {
                if name == "authorization" && config.failover.forward_client_authorization {
                    continue;
                }
                if !provider.headers.iter().any(|(k, _)| *k == name) {
                    let _ = host.set_request_header(&name, None);
                }
            }
        }
        for (k, v) in &provider.headers {
            let _ = host.set_request_header(k, Some(v));
        }
        // This role reads answers (a stream's first chunk, a checked answer whole): ask for
        // bytes it can read; Envoy's compressors encode what reaches the client.
        let _ = host.set_request_header("accept-encoding", Some(answer::IDENTITY));
        let model = plan.model_for(p).unwrap_or(plan.model.as_str());
        if model != plan.model {
            self.rewrite = Some(model.to_string());
        }
        out(Out::Attempting { provider: p });
        self.plan = Some(plan);
        if self.rewrite.is_some() && !end_of_stream {
            return Flow::Pause;
        }
        Flow::Continue
    }

    /// Event: the attempt's request body (`body_size` bytes so far, `read` hands them over):
    /// the provider's model id is written in once it is complete.
    pub fn on_request_body(
        &mut self,
        host: &impl HttpHost,
        body_size: usize,
        end_of_stream: bool,
        read: impl FnOnce(usize) -> Option<Vec<u8>>,
    ) -> Flow {
        let Some(model) = self.rewrite.as_deref() else {
            return Flow::Continue;
        };
        if !end_of_stream {
            return Flow::Pause;
        }
        let Some(body) = read(body_size) else {
            return Flow::Continue;
        };
        if let Some(new_body) = request::parse(&body)
            .ok()
            .and_then(|info| request::rewrite_model(&body, &info, model))
        {
            if host.set_request_body(body_size, &new_body).is_ok() {
                let _ =
                    host.set_request_header("content-length", Some(&new_body.len().to_string()));
            }
        }
        self.rewrite = None;
        Flow::Continue
    }

    /// Event: the attempt's response headers (`end_of_stream`: no body follows).
    pub fn on_response_headers<H: HttpHost + Properties>(
        &mut self,
        host: &H,
        config: &Config,
        end_of_stream: bool,
        clock: impl Fn() -> u64,
        out: impl FnMut(Out<'_>),
    ) -> Flow {
        if self.provider.is_none() || self.recorded {
            return Flow::Continue;
        }
        let now = clock();
        let header = |name: &str| host.response_header(name).ok().flatten();
        self.status = header(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
        if (200..300).contains(&self.status) {
            let stream = self.plan.as_ref().is_some_and(|p| p.stream);
            // Compressed although asked for identity, or too big to hold: delivered as it
            // came, not charged a failure.
            let readable = !answer::is_encoded(header("content-encoding").as_deref());
            let holdable = answer::fits(
                header("content-length").as_deref(),
                answer::HOLD_LIMIT_BYTES,
            );
            if !readable || (!stream && !holdable) {
                self.record(host, config, Success(self.status), None, now, out);
                return Flow::Continue;
            }
            let check_body = !stream && config.failover.retry_on.malformed;
            if stream && !end_of_stream {
                self.hold = Hold::FirstChunk;
                return Flow::Pause;
            }
            if check_body && !end_of_stream {
                self.hold = Hold::WholeBody;
                return Flow::Pause;
            }
            if check_body {
                // A 2xx without a body is no answer (a refused edit leaves Envoy's 2xx: the
                // attempt is recorded malformed all the same).
                let _ = host.set_response_header(":status", "502");
                self.record(host, config, Malformed, None, now, out);
            } else {
                self.record(host, config, Success(self.status), None, now, out);
            }
            return Flow::Continue;
        }
        let retry_after = header("retry-after")
            .as_deref()
            .and_then(health::parse_retry_after);
        let status = self.status;
        self.record(
            host,
            config,
            Status {
                status,
                retry_after_ms: retry_after,
            },
            None,
            now,
            out,
        );
        // Held until its body says why (an error body is small; a compressed one is not read).
        if !end_of_stream && !answer::is_encoded(header("content-encoding").as_deref()) {
            self.hold = Hold::ErrorBody;
            return Flow::Pause;
        }
        Flow::Continue
    }

    /// Event: the attempt's response body (`body_size` bytes so far; `read(n)` hands over
    /// its first `n`).
    #[allow(clippy::too_many_arguments)]
    pub fn on_response_body<H: HttpHost + Properties>(
        &mut self,
        host: &H,
        config: &Config,
        body_size: usize,
        end_of_stream: bool,
        clock: impl Fn() -> u64,
        read: impl FnOnce(usize) -> Option<Vec<u8>>,
        out: impl FnMut(Out<'_>),
    ) -> Flow {
        match self.hold {
            Hold::None => Flow::Continue,
            Hold::FirstChunk => {
                if body_size == 0 && !end_of_stream {
                    return Flow::Pause;
                }
                let now = clock();
                let chunk = read(body_size.min(4096)).unwrap_or_default();
                self.hold = Hold::None;
                if native::sse_error_first(&chunk) {
                    // Not started: a 503 makes Envoy try the next provider.
                    let _ = host.set_response_header(":status", "503");
                    let outcome = Status {
                        status: 503,
                        retry_after_ms: None,
                    };
                    self.record(host, config, outcome, None, now, out);
                } else {
                    self.record(host, config, Success(self.status), None, now, out);
                }
                Flow::Continue
            }
            Hold::ErrorBody => {
                if !end_of_stream && body_size < answer::ERROR_READ_BYTES {
                    return Flow::Pause;
                }
                self.hold = Hold::None;
                let n = body_size.min(answer::ERROR_READ_BYTES);
                if let Some(said) = read(n).and_then(|b| answer::provider_message(&b)) {
                    // Refused: the decision record goes without the provider's words.
                    let _ = host.set_property(native::SAID_PROPERTY, said.as_bytes());
                }
                Flow::Continue
            }
            Hold::WholeBody => {
                if !end_of_stream {
                    if body_size <= answer::HOLD_LIMIT_BYTES {
                        return Flow::Pause;
                    }
                    // A chunked answer grew past what may be held: it flows on unchecked
                    // (the downstream role prices it from the usage at its end).
                    self.hold = Hold::None;
                    let status = self.status;
                    self.record(host, config, Success(status), None, clock(), out);
                    return Flow::Continue;
                }
                let now = clock();
                let body = read(body_size).unwrap_or_default();
                self.hold = Hold::None;
                match metrics::inspect_answer(&body) {
                    Err(_) => {
                        let _ = host.set_response_header(":status", "502");
                        self.record(host, config, Malformed, None, now, out);
                    }
                    Ok(usage) => {
                        let status = self.status;
                        self.record(host, config, Success(status), usage, now, out);
                    }
                }
                Flow::Continue
            }
        }
    }

    /// Event: the attempt is over. One that never reached (or never finished) its answer is
    /// recorded as lost, unless the client went away first: that says nothing about the
    /// provider (a user stopping a request must not open its circuit).
    pub fn on_done<H: HttpHost + Properties>(
        &mut self,
        host: &H,
        config: &Config,
        clock: impl Fn() -> u64,
        mut out: impl FnMut(Out<'_>),
    ) {
        if self.provider.is_none() || self.recorded {
            return;
        }
        if property_text(host, &["response", "code_details"]).as_deref()
            == Some("downstream_remote_disconnect")
        {
            self.recorded = true;
            out(Out::Cut);
            return;
        }
        let now = clock();
        let outcome = self.lost_outcome(host, now);
        self.record(host, config, outcome, None, now, out);
    }

    /// How an attempt ended that never reached (or never finished) its response headers.
    fn lost_outcome(&self, host: &impl Properties, now: u64) -> Outcome {
        let transport =
            property_text(host, &["upstream", "transport_failure_reason"]).unwrap_or_default();
        let per_try = self.plan.as_ref().map_or(u64::MAX, |p| p.per_try_ms);
        if !transport.is_empty() {
            ConnectFailure
        } else if now.saturating_sub(self.started_ms) + 5 >= per_try {
            Timeout
        } else {
            Reset
        }
    }

    /// Records how the attempt ended (once): the market report, shared health, the attempt
    /// list, counters.
    fn record(
        &mut self,
        host: &impl Properties,
        config: &Config,
        outcome: Outcome,
        usage: Option<Usage>,
        now: u64,
        mut out: impl FnMut(Out<'_>),
    ) {
        let (Some(p), false) = (self.provider, self.recorded) else {
            return;
        };
        self.recorded = true;
        let plan = self.plan.as_ref();
        let model = plan.map_or("", |pl| pl.model.as_str());
        let fx = |effect| Out::Effect { effect, model, now };
        let stream = plan.is_some_and(|pl| pl.stream);
        let ttfb = (stream && matches!(outcome, Success(_)))
            .then(|| now.saturating_sub(self.started_ms) as f64);
        // For the market report, as route mode notes each attempt.
        if plan.is_some() {
            out(fx(Effect::Tally {
                provider: p,
                outcome,
                ttfb_ms: ttfb.map(|t| t as u64),
            }));
        }
        if let Some(observation) = outcome.observation(ttfb) {
            if matches!(observation, Observation::Failure { .. }) {
                out(fx(Effect::Count {
                    provider: p,
                    counter: PerProvider::Failure,
                }));
            }
            out(fx(Effect::Observe {
                provider: p,
                observation,
            }));
        }
        let mut list = std::mem::take(&mut self.tried);
        let before = native::tried_count(&list);
        native::push_tried(
            &mut list,
            Tried {
                provider: p,
                outcome,
                usage,
            },
        );
        // Refused: the downstream role finds fewer attempts (its answer then says so).
        let _ = host.set_property(native::TRIED_PROPERTY, &list);
        match outcome {
            Success(_) => out(fx(Effect::Count {
                provider: p,
                counter: PerProvider::Success,
            })),
            o if o.retryable(&config.failover.retry_on, &config.failover.retry_on_status) => {
                let planned = plan.map_or(0, |pl| pl.providers.len());
                if before + 1 < planned {
                    out(fx(Effect::Count {
                        provider: p,
                        counter: PerProvider::Failover,
                    }));
                    out(Out::FailingOver {
                        provider: p,
                        outcome: o,
                    });
                }
            }
            _ => {}
        }
        out(Out::Recorded { now });
    }
}

#[cfg(test)]
#[path = "upstream_tests.rs"]
mod tests;
