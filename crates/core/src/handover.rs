//! Envoy mode, downstream role: the hand-over to Envoy's router once the request is ranked
//! (the order, the attempt bound, the per-try timeout, the [`Plan`]), and what becomes of the
//! answer the router settled on, read back with the attempts the upstream role recorded
//! (`crate::upstream`).
//!
//! The filter's HTTP context (`crates/filter/src/http/native.rs`) calls these from its
//! callbacks and carries out what they give back; host calls go through [`HttpHost`] (header
//! edits, the answer's headers) and [`Properties`] (the plan, the attempt list), effects
//! (counters, affinity) come out as [`Note`]s. Time is a parameter.

use crate::answer;
use crate::attempt::Outcome;
use crate::config::Config;
use crate::exchange::{Exchange, Phase};
use crate::headers::{self, PREF_HEADERS};
use crate::host::{self, property_text, HttpHost, Properties};
use crate::metrics::{Global, Usage};
use crate::native::{self, Plan};
use crate::request::RequestInfo;
use crate::walk::{Effect, Walk};

/// Why the request was not handed to Envoy's router: each is answered with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotHanded {
    /// The request has no ranking or no body read (internal error "lost request state").
    Lost,
    /// No candidate is left (probes taken by other requests): the final error.
    NoneLeft,
    /// The host refused the routing headers or the plan (internal error).
    Refused,
}

/// Hands the ranked request to Envoy's router: the order (ranked candidates within
/// `max_attempts`, a half-open probe only when `claim_probe(provider)` wins it, else dropped
/// from the ranking), the attempt bound and the per-try timeout as headers, and the [`Plan`]
/// for the upstream role. The client's own retry and timeout headers never steer Envoy, nor
/// do its credentials reach a provider (the upstream role sets each provider's own).
pub fn hand_over<H: HttpHost + Properties>(
    host: &H,
    config: &Config,
    walk: &mut Walk,
    info: Option<&RequestInfo>,
    client: &[(String, String)],
    mut claim_probe: impl FnMut(usize) -> bool,
) -> Result<(), NotHanded> {
    let mut order: Vec<usize> = Vec::new();
    if let Some(ranking) = walk.ranking.as_mut() {
        let mut i = 0;
        while i < ranking.candidates.len() && order.len() < config.failover.max_attempts as usize {
            let c = &ranking.candidates[i];
            if c.probe && !claim_probe(c.provider) {
                ranking.candidates.remove(i);
                continue;
            }
            order.push(i);
            i += 1;
        }
    }
    let (Some(ranking), Some(info)) = (&walk.ranking, info) else {
        return Err(NotHanded::Lost);
    };
    if order.is_empty() {
        return Err(NotHanded::NoneLeft);
    }
    let failover = &config.failover;
    let (factor, attempt_timeout) = (failover.ttft_timeout_factor, failover.attempt_timeout_ms);
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
        path: host::header(client, ":path")
            .unwrap_or_default()
            .to_string(),
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
    for (k, _) in client {
        if native::CLIENT_RETRY_HEADERS.contains(&k.as_str())
            || PREF_HEADERS.contains(&k.as_str())
            || headers::is_client_credential(config, k)
            || (k != "authorization" && native::credential_headers_contain(config, k))
        {
            // A refused removal is caught below: the same host then refuses ours too.
            let _ = host.set_request_header(k, None);
        }
    }
    let mut num = [0u8; 20];
    let set = |name: &str, value: &str| host.set_request_header(name, Some(value)).is_ok();
    let ok = set(native::ORDER_HEADER, &native::order_header(&names))
        && set(
            "x-envoy-max-retries",
            headers::decimal(order.len() as u64 - 1, &mut num),
        )
        && set(
            "x-envoy-upstream-rq-per-try-timeout-ms",
            headers::decimal(per_try, &mut num),
        )
        && (info.stream
            || set(
                "x-envoy-upstream-rq-timeout-ms",
                headers::decimal(failover.deadline_ms, &mut num),
            ))
        && host
            .set_property(native::PLAN_PROPERTY, &plan.encode())
            .is_ok();
    if !ok {
        return Err(NotHanded::Refused);
    }
    Ok(())
}

/// What the upstream role recorded, read back when the answer comes.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadBack {
    /// The last attempt's usage, when the upstream role checked a non-streaming answer.
    pub usage: Option<Usage>,
    /// Whether an attempt failed.
    pub failed: bool,
    /// What the last failing attempt's provider said (read only when one failed).
    pub said: Option<String>,
}

/// Reads the attempts the upstream role recorded into `walk` (the attempt in flight is over).
pub fn read_back(host: &impl Properties, walk: &mut Walk) -> ReadBack {
    let list = property_text(host, &[native::TRIED_PROPERTY]).unwrap_or_default();
    let tried = native::parse_tried(list.as_bytes());
    let usage = tried.last().and_then(|t| t.usage);
    let failed = tried
        .iter()
        .any(|t| !matches!(t.outcome, Outcome::Success(_)));
    let said = if failed {
        property_text(host, &[native::SAID_PROPERTY])
    } else {
        None
    };
    if let Some(a) = walk.attempts.as_mut() {
        a.current = None;
        a.tried = tried.into_iter().map(|t| (t.provider, t.outcome)).collect();
    }
    ReadBack {
        usage,
        failed,
        said,
    }
}

/// What an answer's headers lead to, besides the host calls.
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    /// A walk effect (counters, the session's affinity).
    Effect(Effect),
    /// Envoy's route and the plugin's providers do not match (counted already, by a
    /// [`Note::Effect`] just before): logged as `crate::upstream` says.
    Drift(String),
    /// Warn: every attempt failed; the client gets the last provider's answer.
    AllFailed {
        /// Attempts made.
        tried: usize,
        /// The answer's status.
        status: u32,
    },
}

/// What the filter does with the answer Envoy's router settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnAnswer {
    /// Replace it with the final error, listing the attempts (Envoy answered itself).
    FinalError,
    /// Let it through untouched: no attempt was recorded, there is nothing to add.
    Pass,
    /// Hold it until its body is complete, to price it (the phase is `NativeHolding`).
    Hold,
    /// Deliver it with our headers; its status.
    Deliver(u32),
}

/// Event: the headers of the answer Envoy's router settled on (a provider's own, or its local
/// reply after the last attempt), the attempts read back into `walk` already. `stream`: the
/// request streams; `priced`: its usage is known (the upstream role read it). Sets `ex`'s
/// phase (and what it keeps of a held answer) for what follows.
#[allow(clippy::too_many_arguments)]
pub fn on_answer<H: HttpHost + Properties>(
    host: &H,
    config: &Config,
    ex: &mut Exchange,
    walk: &Walk,
    stream: bool,
    priced: bool,
    end_of_stream: bool,
    clock: impl Fn() -> u64,
    mut out: impl FnMut(Note),
) -> OnAnswer {
    let header = |name: &str| host.response_header(name).ok().flatten();
    let status = header(":status")
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(0);
    let tried = walk.attempts.as_ref().map_or(0, |a| a.tried.len());
    let mut drift = |what: String| {
        out(Note::Effect(Effect::CountGlobal(Global::RouteDrift)));
        out(Note::Drift(what));
    };
    // A 2xx is the provider's (Envoy's own replies on this route are errors).
    let details = if (200..300).contains(&status) {
        String::new()
    } else {
        property_text(host, &["response", "code_details"]).unwrap_or_default()
    };
    let from_provider = details.is_empty() || details == "via_upstream";
    if !from_provider {
        if tried == 0 {
            drift(format!("Envoy answered {status} ({details}) without trying any provider (the route's priority groups lack the order's providers, or the clusters lack the upstream role)"));
        }
        return OnAnswer::FinalError;
    }
    if tried == 0 {
        drift(format!(
            "an answer arrived but no attempt was recorded: the provider clusters lack the market-router upstream filter (root id {})",
            native::UPSTREAM_ROOT_ID
        ));
        ex.phase = Phase::Done;
        return OnAnswer::Pass;
    }
    let last = walk.attempts.as_ref().and_then(|a| a.tried.last());
    if (200..300).contains(&status) {
        if tried > 1 {
            out(Note::Effect(Effect::CountGlobal(
                Global::RecoveredByFailover,
            )));
        }
        if let Some(&(provider, _)) = last {
            out(Note::Effect(Effect::Remember { provider }));
        }
        // Held to price it from its usage, unless the upstream role already read it. Too
        // big to hold, or compressed: it flows, priced from the usage at its end (the
        // record is written then).
        if !stream && !priced && !end_of_stream {
            ex.held = Some((status, clock()));
            ex.encoded = answer::is_encoded(header("content-encoding").as_deref());
            let holdable = !ex.encoded
                && answer::fits(
                    header("content-length").as_deref(),
                    answer::HOLD_LIMIT_BYTES,
                );
            if config.response_headers && holdable {
                ex.phase = Phase::NativeHolding;
                return OnAnswer::Hold;
            }
            ex.unheld = true;
            ex.phase = Phase::Unheld;
            return OnAnswer::Deliver(status);
        }
        ex.phase = if stream {
            Phase::Streaming
        } else {
            Phase::Done
        };
        return OnAnswer::Deliver(status);
    }
    // Every attempt failed (or the provider's answer is not retried): its own answer.
    if last.is_some_and(|(_, o)| {
        o.retryable(&config.failover.retry_on, &config.failover.retry_on_status)
    }) {
        out(Note::Effect(Effect::CountGlobal(Global::AllFailed)));
        out(Note::AllFailed { tried, status });
    }
    ex.phase = Phase::Done;
    OnAnswer::Deliver(status)
}

/// What a held answer's body chunk leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnHeldBody {
    /// Keep holding.
    Pause,
    /// It grew past what may be held: it flows on from here (keep its tail for the usage at
    /// its end), delivered with this status.
    Overflow(u32),
    /// It is complete: read it for its usage, then deliver it with this status.
    Complete(u32),
}

/// Event: a chunk of the held answer (`body_size` bytes so far; `end_of_stream`: the last).
pub fn on_held_body(ex: &mut Exchange, body_size: usize, end_of_stream: bool) -> OnHeldBody {
    let (status, _) = ex.held.unwrap_or((200, 0));
    if !end_of_stream {
        if body_size <= answer::HOLD_LIMIT_BYTES {
            return OnHeldBody::Pause;
        }
        ex.unheld = true;
        ex.phase = Phase::Unheld;
        return OnHeldBody::Overflow(status);
    }
    ex.phase = Phase::Done;
    OnHeldBody::Complete(status)
}

#[cfg(test)]
#[path = "handover_tests.rs"]
mod tests;
