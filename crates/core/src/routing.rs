//! The request phase of one request, before its first attempt: what the request callbacks
//! lead to (pass it through, answer an explain query, refuse it, wait for the body, decide),
//! and the decision itself — the body read, the client's preferences (when allowed), the
//! rollout split, the ranking, the session's affinity looked up, the walk begun — and which
//! kind of first attempt follows.
//!
//! The filter's HTTP context (`crates/filter/src/http.rs`) hands each request callback here
//! as an event and carries out the step it gets back; host calls go through [`HttpHost`]
//! (header edits) and [`Host`] (the affinity slot), effects (counters) come out as the walk's
//! [`Effect`]s. Time and randomness are parameters.

use crate::attempt::Attempts;
use crate::config::{Config, FailoverMode};
use crate::errors::ApiError;
use crate::exchange::Phase;
use crate::explain;
use crate::headers;
use crate::health::HealthTable;
use crate::host::{self, Host, HttpHost};
use crate::market::MarketView;
use crate::metrics::Global;
use crate::native;
use crate::request::{self, RequestInfo};
use crate::rng::Rng;
use crate::select::{self, NoRoute, Prefs};
use crate::walk::{Effect, Walk};

/// What the filter does with a request callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnRequest {
    /// Let the request go on (not an LLM request, or not this phase's business).
    Continue,
    /// Hold the request: its body is still coming.
    Pause,
    /// A query of the explain endpoints: answer it.
    Explain(explain::Query),
    /// Answer this error.
    Refuse(ApiError),
    /// The body is complete: decide. `Some(size)`: read the `size`-byte body first; `None`:
    /// the request has no body (the host runs no body callback for it).
    Decide(Option<usize>),
}

/// Event: the request's headers (`client`, all of them, names lower-case; `end_of_stream`:
/// no body follows). Removes the headers only the filter may set (the cluster header, the
/// preference headers, and in envoy mode the attempt order) whatever the path; for an LLM
/// request, counts it and checks its announced length. `pause_for_body`: the host waits for
/// the body when the headers callback pauses (Envoy), else it continues.
pub fn on_request_headers(
    host: &impl HttpHost,
    config: &Config,
    client: &[(String, String)],
    end_of_stream: bool,
    pause_for_body: bool,
    phase: &mut Phase,
    mut out: impl FnMut(Effect),
) -> OnRequest {
    // No client picks a cluster or passes preferences on, whatever the path.
    for (k, _) in client.iter().filter(|(k, _)| headers::is_owned(config, k)) {
        let _ = host.set_request_header(k, None);
    }
    let value = |name: &str| {
        client
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let (method, path) = (value(":method").unwrap_or(""), value(":path").unwrap_or(""));
    // Only the filter names the order Envoy's retries follow, never the client.
    if config.failover.mode == FailoverMode::Envoy
        && client.iter().any(|(k, _)| k == native::ORDER_HEADER)
    {
        let _ = host.set_request_header(native::ORDER_HEADER, None);
    }
    if !headers::is_llm_path(method, path) {
        let explain = config
            .explain_path_prefix
            .as_deref()
            .filter(|prefix| path.starts_with(prefix))
            .and_then(|prefix| explain::parse(prefix, method, path));
        return match explain {
            Some(q) => OnRequest::Explain(q),
            None => OnRequest::Continue,
        };
    }
    out(Effect::CountGlobal(Global::Requests));
    let length = value("content-length");
    if let Some(len) = length.and_then(|v| v.parse::<usize>().ok()) {
        if len > config.max_body_bytes {
            return OnRequest::Refuse(ApiError::body_too_large(config.max_body_bytes));
        }
    }
    if end_of_stream || length == Some("0") {
        return OnRequest::Decide(None);
    }
    *phase = Phase::Reading;
    if pause_for_body {
        OnRequest::Pause
    } else {
        OnRequest::Continue
    }
}

/// Event: a chunk of the request body (`body_size` bytes so far; `end_of_stream`: it is all).
pub fn on_request_body(
    config: &Config,
    phase: Phase,
    body_size: usize,
    end_of_stream: bool,
) -> OnRequest {
    if phase != Phase::Reading {
        return OnRequest::Continue;
    }
    if body_size > config.max_body_bytes {
        return OnRequest::Refuse(ApiError::body_too_large(config.max_body_bytes));
    }
    if !end_of_stream {
        return OnRequest::Pause;
    }
    OnRequest::Decide(Some(body_size))
}

/// What the complete body says, or the 400 it gets.
pub fn read(body: &[u8]) -> Result<RequestInfo, ApiError> {
    request::parse(body).map_err(|e| ApiError::bad_request(e.code(), e.message()))
}

/// What the ranking is made from: this worker's copy of the market and of the health table,
/// and its random draws.
#[derive(Debug)]
pub struct Books<'a> {
    /// The market snapshot, if one was loaded.
    pub market: Option<&'a MarketView>,
    /// Provider health.
    pub health: &'a HealthTable,
    /// Random draws (rollout, tie-breaks).
    pub rng: &'a mut Rng,
}

/// A session's affinity slot in shared data: where it is kept, the value that names the
/// session in it, and the provider it was pinned to when the request came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Affinity {
    /// Shared-data key of the slot.
    pub key: String,
    /// The session's tag in the slot's value.
    pub tag: String,
    /// The provider the slot held for this session.
    pub stored: Option<String>,
}

impl Affinity {
    /// Reads the slot of `session` (keys under `prefix`); a refused read is no pin.
    pub fn lookup(host: &impl Host, prefix: &str, session: &str) -> Self {
        let (slot, tag) = headers::affinity_slot(session);
        let key = format!("{prefix}{slot}");
        let stored = host::shared_get(host, &key)
            .and_then(|(v, _)| headers::affinity_decode(&v, &tag).map(str::to_string));
        Self { key, tag, stored }
    }

    /// Pins the session to `provider`, unless it is pinned there already (a refused write
    /// only costs stickiness).
    pub fn remember(&self, host: &impl Host, provider: &str) {
        if self.stored.as_deref() != Some(provider) {
            let value = headers::affinity_encode(&self.tag, provider);
            let _ = host::shared_set(host, &self.key, &value, None);
        }
    }
}

/// Why a request got no ranking: the error it is answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrouted {
    /// The answer.
    pub error: ApiError,
    /// Whether the error lists what was excluded and why (worth a debug line).
    pub excluded: bool,
}

/// Decides the request `info` at `now`: the client's preferences when
/// `routing.client_overrides` allows them, the rollout split (outside it, the default
/// provider alone), else the market's ranking; the session's pinned provider first when it is
/// a candidate (affinity slots under `affinity_prefix`); then begins `walk` on the ranking.
/// Gives the session's affinity slot, if the request names a session. Counters come out
/// through `out`.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    host: &impl Host,
    config: &Config,
    affinity_prefix: &str,
    books: Books<'_>,
    client: &[(String, String)],
    info: &RequestInfo,
    now: u64,
    walk: &mut Walk,
    mut out: impl FnMut(Effect),
) -> Result<Option<Affinity>, Unrouted> {
    let routing = &config.routing;
    let prefs = if routing.client_overrides {
        headers::prefs_from_headers(client)
    } else {
        Prefs::default()
    };
    let session = routing
        .affinity_header
        .as_deref()
        .and_then(|h| client.iter().find(|(k, _)| k == h))
        .map(|(_, v)| v.as_str())
        .filter(|s| !s.is_empty());
    let pinned = match routing.default_provider {
        Some(d) if !select::in_rollout(routing.rollout_percent, session, books.rng) => {
            select::pinned(config, books.market, info, d)
        }
        _ => None,
    };
    let ranked = match pinned {
        Some(r) => {
            out(Effect::CountGlobal(Global::RolloutDefault));
            Ok(r)
        }
        None => {
            if routing.rollout_percent < 100 {
                out(Effect::CountGlobal(Global::RolloutMarket));
            }
            select::rank(
                config,
                books.market,
                books.health,
                info,
                &prefs,
                now,
                books.rng,
            )
        }
    };
    let mut ranking = match ranked {
        Ok(r) => r,
        Err(NoRoute::UnknownModel) => {
            return Err(Unrouted {
                error: ApiError::unknown_model(&info.model),
                excluded: false,
            })
        }
        Err(NoRoute::AllExcluded(ex)) => {
            let msg = select::explain_exclusions(config, &info.model, &ex);
            return Err(Unrouted {
                error: ApiError::no_provider(msg),
                excluded: true,
            });
        }
    };
    if ranking.stale {
        out(Effect::CountGlobal(Global::StaleDecisions));
    }
    let affinity = session.map(|s| {
        let a = Affinity::lookup(host, affinity_prefix, s);
        if let Some(idx) = a.stored.as_deref().and_then(|n| config.provider_index(n)) {
            select::prefer(&mut ranking, idx);
        }
        a
    });
    walk.begin(ranking, Attempts::new(config, now));
    Ok(affinity)
}

/// How the first attempt goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum First {
    /// Through the host's route, pointed at the primary (route mode).
    Route,
    /// Through Envoy's router, which makes the attempts in the filter's order (envoy mode).
    Native,
    /// As a dispatched call (dispatch mode; route mode on a host without route failover).
    Dispatch,
}

/// The first attempt for `config`'s failover mode on a host that can (`route_failover`) or
/// cannot fail over after a routed attempt.
pub fn first(config: &Config, route_failover: bool) -> First {
    match config.failover.mode {
        FailoverMode::Route if route_failover => First::Route,
        FailoverMode::Envoy => First::Native,
        FailoverMode::Route | FailoverMode::Dispatch => First::Dispatch,
    }
}

/// A debug line's account of the ranking: each candidate's provider and score.
pub fn ranked_line(config: &Config, walk: &Walk) -> String {
    walk.ranking.as_ref().map_or_else(String::new, |r| {
        r.candidates
            .iter()
            .map(|c| format!("{}:{:.3}", config.providers[c.provider].name, c.score))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

#[cfg(test)]
#[path = "routing_tests.rs"]
mod tests;
