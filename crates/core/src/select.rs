//! Provider ranking: candidates → constraints → score per strategy → ordered list.
//!
//! Every decision is a function of (config, market view, health, request, preferences, now,
//! rng): nothing here touches the host, so tests build those values directly.

use crate::config::{Config, Constraints, ProviderType, Strategy};
use crate::health::{Admission, HealthTable};
use crate::market::{Availability, MarketView};
use crate::request::RequestInfo;
use crate::rng::Rng;
use std::fmt;

/// Where a candidate's numbers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Fresh market data.
    Market,
    /// Market data older than `market.max_age_ms` with no static offer to fall back on.
    StaleMarket,
    /// The provider's `static_offer`.
    Static,
    /// Nothing known: ranked after every provider with data.
    Unknown,
}

impl Source {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Market => "market",
            Self::StaleMarket => "stale_market",
            Self::Static => "static",
            Self::Unknown => "unknown",
        }
    }
}

/// A provider that may serve the request, with the numbers it was ranked on.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Index into `config.providers`.
    pub provider: usize,
    /// Model id to send to this provider.
    pub provider_model: String,
    /// Origin of the numbers.
    pub source: Source,
    /// USD per million input tokens.
    pub input_per_mtok: f64,
    /// USD per million output tokens.
    pub output_per_mtok: f64,
    /// Time to first token used for ranking, ms.
    pub ttft_ms: f64,
    /// Its median time to first token as the market (or the static offer) gives it, ms: what
    /// `ttft_ms` is before observed latency raises it.
    pub ttft_p50_ms: f64,
    /// 95th percentile time to first token from the offer, ms (NaN when unknown).
    pub ttft_p95_ms: f64,
    /// Market (or static) uptime.
    pub uptime: f64,
    /// Reliability used for ranking: uptime discounted by observed errors and availability.
    pub reliability: f64,
    /// Availability.
    pub availability: Availability,
    /// Provider category.
    pub provider_type: ProviderType,
    /// Expected cost of this request, USD.
    pub expected_cost_usd: f64,
    /// What the `value` strategy compares, USD: the expected cost × (1 + the expected share of
    /// failed attempts, 1 − reliability) × (time to first token / target, when over it).
    pub value_usd: f64,
    /// Score under the strategy used (higher is better).
    pub score: f64,
    /// This attempt would be the half-open probe of an open circuit.
    pub probe: bool,
    /// Its median time to first token (market or static, as `constraints.max_ttft_ms` reads
    /// it) is over `routing.ttft_target_ms`, or unknown while a target is set: ranked after
    /// the candidates within the target.
    pub beyond_ttft_target: bool,
}

/// Why a provider that serves the model is not a candidate.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    /// The market says `offline`.
    Offline,
    /// Price over the cap.
    MaxPrice {
        /// Highest of input and output price.
        price: f64,
        /// Cap.
        max: f64,
    },
    /// Uptime under the floor.
    MinUptime {
        /// Uptime.
        uptime: f64,
        /// Floor.
        min: f64,
    },
    /// TTFT over the cap.
    MaxTtft {
        /// TTFT.
        ttft_ms: f64,
        /// Cap.
        max: f64,
    },
    /// Provider type not allowed.
    ProviderType(ProviderType),
    /// Region not allowed (or unknown).
    Region(Option<String>),
    /// The request needs more context than the offer has.
    ContextWindow {
        /// Tokens needed (estimate).
        need: u64,
        /// Offer's window.
        have: u64,
    },
    /// A constraint needs numbers the provider has none of.
    NoData,
    /// Circuit open after failures.
    CircuitOpen {
        /// End of the cooldown, ms.
        until: u64,
    },
    /// Half-open probe already in flight.
    ProbeInFlight,
    /// Provider asked to back off.
    RetryAfter {
        /// End of the back-off, ms.
        until: u64,
    },
    /// Excluded by the client's `x-market-router-exclude`.
    ExcludedByClient,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Offline => write!(f, "offline in the market"),
            Self::MaxPrice { price, max } => {
                write!(f, "price {price}/Mtok over max_price_per_mtok {max}")
            }
            Self::MinUptime { uptime, min } => write!(f, "uptime {uptime} under min_uptime {min}"),
            Self::MaxTtft { ttft_ms, max } => write!(f, "ttft {ttft_ms} ms over max_ttft_ms {max}"),
            Self::ProviderType(t) => write!(f, "provider type {} not allowed", t.as_str()),
            Self::Region(Some(r)) => write!(f, "region {r} not allowed"),
            Self::Region(None) => write!(f, "region unknown and regions are constrained"),
            Self::ContextWindow { need, have } => {
                write!(f, "needs ~{need} tokens, context window {have}")
            }
            Self::NoData => write!(
                f,
                "no market data or static_offer to check constraints against"
            ),
            Self::CircuitOpen { .. } => write!(f, "circuit open after repeated failures"),
            Self::ProbeInFlight => write!(f, "recovery probe in flight"),
            Self::RetryAfter { .. } => write!(f, "asked to back off (Retry-After)"),
            Self::ExcludedByClient => write!(f, "excluded by the client"),
        }
    }
}

impl Reason {
    /// Short constraint name for metrics and messages.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Offline => "offline",
            Self::MaxPrice { .. } => "max_price_per_mtok",
            Self::MinUptime { .. } => "min_uptime",
            Self::MaxTtft { .. } => "max_ttft_ms",
            Self::ProviderType(_) => "provider_types",
            Self::Region(_) => "regions",
            Self::ContextWindow { .. } => "context_window",
            Self::NoData => "no_data",
            Self::CircuitOpen { .. } => "circuit_open",
            Self::ProbeInFlight => "probe_in_flight",
            Self::RetryAfter { .. } => "retry_after",
            Self::ExcludedByClient => "excluded_by_client",
        }
    }
}

/// Per-request preferences (client headers, when allowed), on top of the configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prefs {
    /// Strategy override.
    pub strategy: Option<Strategy>,
    /// Extra price cap (the stricter of this and the configured one applies).
    pub max_price_per_mtok: Option<f64>,
    /// Allowed provider types (intersected with the configured ones).
    pub provider_types: Vec<ProviderType>,
    /// Allowed regions (intersected with the configured ones).
    pub regions: Vec<String>,
    /// Provider names not to use.
    pub exclude: Vec<String>,
}

/// The ranking of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranking {
    /// Strategy used.
    pub strategy: Strategy,
    /// Primary first, then fallbacks.
    pub candidates: Vec<Candidate>,
    /// Providers serving the model that were left out, and why.
    pub excluded: Vec<(usize, Reason)>,
    /// The market data was stale.
    pub stale: bool,
    /// Every candidate was held back by health; these are tried anyway, soonest-free first.
    pub last_resort: bool,
    /// The time-to-first-token target ranked against, ms: `routing.ttft_target_ms`, else under
    /// the `value` strategy the median of the model's offers (none when nothing is known).
    pub ttft_target_ms: Option<f64>,
    /// Where the target comes from: `configured` or `market_median`.
    pub ttft_target_source: Option<&'static str>,
}

/// Why nothing can be ranked.
#[derive(Debug, Clone, PartialEq)]
pub enum NoRoute {
    /// No configured provider serves the model.
    UnknownModel,
    /// Providers serve it, but all were excluded.
    AllExcluded(Vec<(usize, Reason)>),
}

/// Ranks the providers for `req`.
#[allow(clippy::too_many_arguments)]
pub fn rank(
    config: &Config,
    market: Option<&MarketView>,
    health: &HealthTable,
    req: &RequestInfo,
    prefs: &Prefs,
    now_ms: u64,
    rng: &mut Rng,
) -> Result<Ranking, NoRoute> {
    let strategy = prefs.strategy.unwrap_or(config.routing.strategy);
    let stale = match (market, &config.market) {
        (Some(m), Some(mc)) => m.age_ms(now_ms) > mc.max_age_ms,
        _ => false,
    };
    let in_tokens = req.estimated_input_tokens();
    let out_tokens = req.estimated_output_tokens(config.routing.default_output_tokens);
    // `max_tokens` is a ceiling (the context window must hold it), not what answers usually
    // take: the cost estimate counts the smaller of it and `default_output_tokens`.
    let cost_out_tokens = out_tokens.min(config.routing.default_output_tokens);
    let c = &config.routing.constraints;
    let mut serves = false;
    let mut candidates = Vec::new();
    let mut excluded = Vec::new();
    let mut held_back: Vec<(u64, Candidate)> = Vec::new();
    // Median TTFTs of the model's offers that are not offline: the market's typical speed.
    let mut medians: Vec<f64> = Vec::new();
    for (idx, p) in config.providers.iter().enumerate() {
        let Some(configured_model) = p.model_id(&req.model) else {
            continue;
        };
        serves = true;
        let offer = market.and_then(|m| m.offer(&req.model, idx));
        let mut cand = candidate(
            idx,
            configured_model,
            offer,
            p.static_offer.as_ref(),
            p.provider_type,
            stale,
        );
        let region = offer
            .and_then(|o| o.region.as_deref())
            .or(p.region.as_deref());
        let window = offer
            .and_then(|o| o.context_window)
            .or(p.static_offer.as_ref().and_then(|s| s.context_window));
        // (A known candidate's median is finite: the market and the configuration check it.)
        if cand.source != Source::Unknown && cand.availability != Availability::Offline {
            medians.push(cand.ttft_ms);
        }
        if let Some(reason) = check(
            c,
            prefs,
            &p.name,
            &cand,
            region,
            window,
            in_tokens + out_tokens,
        ) {
            excluded.push((idx, reason));
            continue;
        }
        // The soft target reads the same median as the constraint, before observed latency.
        cand.beyond_ttft_target = config
            .routing
            .ttft_target_ms
            .is_some_and(|t| cand.source == Source::Unknown || cand.ttft_ms > t);
        // Health holds a provider back until this time (not a policy: see the last resort below).
        let held = match health.providers.get(&p.name).map(|h| h.admission(now_ms)) {
            None | Some(Admission::Open) => None,
            Some(Admission::Probe) => {
                cand.probe = true;
                None
            }
            Some(Admission::CircuitOpen(until)) => Some((until, Reason::CircuitOpen { until })),
            Some(Admission::ProbeInFlight) => Some((u64::MAX, Reason::ProbeInFlight)),
            Some(Admission::RetryAfter(until)) => Some((until, Reason::RetryAfter { until })),
        };
        if cand.source != Source::Unknown {
            let h = health.providers.get(&p.name);
            let err = h.map_or(0.0, |h| h.error_rate);
            let avail = if cand.availability == Availability::Degraded {
                0.9
            } else {
                1.0
            };
            cand.reliability = cand.uptime * (1.0 - err) * avail;
            if let Some(h) = h.filter(|h| h.samples >= 3 && h.ttfb_ms > cand.ttft_ms) {
                cand.ttft_ms = h.ttfb_ms;
            }
            cand.expected_cost_usd = (in_tokens as f64 * cand.input_per_mtok
                + cost_out_tokens as f64 * cand.output_per_mtok)
                / 1e6;
        }
        match held {
            Some((until, reason)) => {
                excluded.push((idx, reason));
                held_back.push((until, cand));
            }
            None => candidates.push(cand),
        }
    }
    if !serves {
        return Err(NoRoute::UnknownModel);
    }
    let (ttft_target_ms, ttft_target_source) = match config.routing.ttft_target_ms {
        Some(t) => (Some(t), Some("configured")),
        None if strategy == Strategy::Value => match median(&mut medians) {
            Some(t) => (Some(t), Some("market_median")),
            None => (None, None),
        },
        None => (None, None),
    };
    if config.routing.ttft_target_ms.is_none() {
        if let Some(t) = ttft_target_ms {
            for c in candidates
                .iter_mut()
                .chain(held_back.iter_mut().map(|(_, c)| c))
            {
                c.beyond_ttft_target = c.source == Source::Unknown || value_ttft(c) > t;
            }
        }
    }
    // Health exclusions are not policy: when they would leave nothing to try, the providers
    // they hold back are tried anyway, the one free soonest first, rather than failing a
    // request that one of them may well answer.
    let last_resort = candidates.is_empty() && !held_back.is_empty();
    if last_resort {
        sort_stable_by(&mut held_back, |a, b| a.0.cmp(&b.0));
        candidates = held_back.into_iter().map(|(_, c)| c).collect();
    } else if candidates.is_empty() {
        return Err(NoRoute::AllExcluded(excluded));
    } else {
        score(&mut candidates, strategy, config, ttft_target_ms, rng);
    }
    Ok(Ranking {
        last_resort,
        strategy,
        candidates,
        excluded,
        stale,
        ttft_target_ms,
        ttft_target_source,
    })
}

/// The numbers provider `idx` is ranked on: market data, else its static offer, else nothing
/// known. Market data older than `max_age_ms` is still ranked on (counted as stale): prices,
/// latency and uptime minutes or hours old are closer to the truth than configured figures,
/// which are as old as the configuration; its `offline` no longer excludes (it counts as
/// degraded, and health judges the provider by its answers).
fn candidate(
    idx: usize,
    configured_model: &str,
    offer: Option<&crate::market::Offer>,
    static_offer: Option<&crate::config::StaticOffer>,
    provider_type: ProviderType,
    stale: bool,
) -> Candidate {
    match (offer, static_offer) {
        (Some(o), _) => Candidate {
            provider: idx,
            provider_model: o
                .provider_model
                .clone()
                .unwrap_or_else(|| configured_model.to_string()),
            source: if stale {
                Source::StaleMarket
            } else {
                Source::Market
            },
            input_per_mtok: o.input_per_mtok,
            output_per_mtok: o.output_per_mtok,
            ttft_ms: o.ttft_p50_ms,
            ttft_p50_ms: o.ttft_p50_ms,
            ttft_p95_ms: o.ttft_p95_ms.unwrap_or(f64::NAN),
            uptime: o.uptime,
            reliability: o.uptime,
            availability: if stale && o.availability == Availability::Offline {
                Availability::Degraded
            } else {
                o.availability
            },
            provider_type: o.provider_type,
            expected_cost_usd: 0.0,
            value_usd: 0.0,
            score: 0.0,
            probe: false,
            beyond_ttft_target: false,
        },
        (_, Some(so)) => Candidate {
            provider: idx,
            provider_model: configured_model.to_string(),
            source: Source::Static,
            input_per_mtok: so.input_per_mtok,
            output_per_mtok: so.output_per_mtok,
            ttft_ms: so.ttft_p50_ms,
            ttft_p50_ms: so.ttft_p50_ms,
            ttft_p95_ms: so.ttft_p95_ms.unwrap_or(f64::NAN),
            uptime: so.uptime,
            reliability: so.uptime,
            availability: Availability::Online,
            provider_type,
            expected_cost_usd: 0.0,
            value_usd: 0.0,
            score: 0.0,
            probe: false,
            beyond_ttft_target: false,
        },
        (_, None) => Candidate {
            provider: idx,
            provider_model: configured_model.to_string(),
            source: Source::Unknown,
            input_per_mtok: f64::NAN,
            output_per_mtok: f64::NAN,
            ttft_ms: f64::NAN,
            ttft_p50_ms: f64::NAN,
            ttft_p95_ms: f64::NAN,
            uptime: f64::NAN,
            reliability: f64::NAN,
            availability: Availability::Online,
            provider_type,
            expected_cost_usd: f64::NAN,
            value_usd: f64::NAN,
            score: 0.0,
            probe: false,
            beyond_ttft_target: false,
        },
    }
}

fn check(
    c: &Constraints,
    prefs: &Prefs,
    name: &str,
    cand: &Candidate,
    region: Option<&str>,
    window: Option<u64>,
    need_tokens: u64,
) -> Option<Reason> {
    if prefs.exclude.iter().any(|e| e == name) {
        return Some(Reason::ExcludedByClient);
    }
    if cand.availability == Availability::Offline {
        return Some(Reason::Offline);
    }
    let types_ok = |list: &[ProviderType]| list.is_empty() || list.contains(&cand.provider_type);
    if !types_ok(&c.provider_types) || !types_ok(&prefs.provider_types) {
        return Some(Reason::ProviderType(cand.provider_type));
    }
    let region_ok =
        |list: &[String]| list.is_empty() || region.is_some_and(|r| list.iter().any(|x| x == r));
    if !region_ok(&c.regions) || !region_ok(&prefs.regions) {
        return Some(Reason::Region(region.map(str::to_string)));
    }
    if let Some(have) = window {
        if need_tokens > have {
            return Some(Reason::ContextWindow {
                need: need_tokens,
                have,
            });
        }
    }
    let max_price = match (c.max_price_per_mtok, prefs.max_price_per_mtok) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let numeric = max_price.is_some() || c.min_uptime.is_some() || c.max_ttft_ms.is_some();
    if cand.source == Source::Unknown {
        return numeric.then_some(Reason::NoData);
    }
    if let Some(max) = max_price {
        let price = cand.input_per_mtok.max(cand.output_per_mtok);
        if price > max {
            return Some(Reason::MaxPrice { price, max });
        }
    }
    if let Some(min) = c.min_uptime {
        if cand.uptime < min {
            return Some(Reason::MinUptime {
                uptime: cand.uptime,
                min,
            });
        }
    }
    if let Some(max) = c.max_ttft_ms {
        if cand.ttft_ms > max {
            return Some(Reason::MaxTtft {
                ttft_ms: cand.ttft_ms,
                max,
            });
        }
    }
    None
}

/// "Nines" of reliability: 0.99 → 2, 0.999 → 3; capped so a perfect 1.0 stays finite.
fn nines(r: f64) -> f64 {
    -(1.0 - r.clamp(0.0, 0.99999)).log10()
}

/// A ranking key rounded to nine decimals (NaN stays NaN: `total_cmp` orders it).
fn quantize(key: f64) -> f64 {
    (key * 1e9).round() / 1e9
}

/// Sorts `v` stably by `cmp`: binary insertion, for the few candidates a request ranks. One
/// small instantiation per element type instead of the standard library's driftsort (about
/// 4 KB of `.wasm` per call site); `O(n log n)` comparisons, and moves that are cheap for the
/// short slices sorted here (and for the model list of `GET <prefix>/models`, which is
/// answered rarely).
pub(crate) fn sort_stable_by<T>(v: &mut [T], mut cmp: impl FnMut(&T, &T) -> std::cmp::Ordering) {
    for i in 1..v.len() {
        // The first place in the sorted prefix whose element sorts after `v[i]`: equal ones
        // stay ahead of it.
        let (mut lo, mut hi) = (0, i);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if cmp(&v[mid], &v[i]).is_gt() {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        for j in (lo..i).rev() {
            v.swap(j, j + 1);
        }
    }
}

/// Median of `xs` (reordered); none when empty.
fn median(xs: &mut [f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    sort_stable_by(xs, f64::total_cmp);
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    })
}

/// How far over the time-to-first-token target `value` lets a provider be before its latency
/// counts: 1.3× (a provider 30 % slower than the market's median costs nothing extra).
pub const VALUE_TTFT_TOLERANCE: f64 = 1.3;

/// The `value` strategy's figure of a known candidate, USD: expected cost × (1 + expected
/// failed-attempt share, 1 − uptime, degraded offers at 0.9 × uptime) × latency factor, the
/// factor being ttft / (1.3 × target) for a median TTFT over 1.3× the target and 1 otherwise:
/// a provider twice as slow as that bar must be half the price to rank level.
/// The time to first token `value` weighs: the offer's median (market or static). Observed
/// answers are left to health: they come only from the providers in use, include prompt
/// processing, and one slow answer would keep a provider out that no longer gets the traffic
/// to correct it.
fn value_ttft(c: &Candidate) -> f64 {
    c.ttft_p50_ms
}

fn value_usd(c: &Candidate, target_ms: Option<f64>) -> f64 {
    let avail = if c.availability == Availability::Degraded {
        0.9
    } else {
        1.0
    };
    let retries = (1.0 - c.uptime * avail).clamp(0.0, 1.0);
    let latency = match target_ms {
        Some(t) if t > 0.0 && value_ttft(c) > VALUE_TTFT_TOLERANCE * t => {
            value_ttft(c) / (VALUE_TTFT_TOLERANCE * t)
        }
        _ => 1.0,
    };
    c.expected_cost_usd * (1.0 + retries) * latency
}

fn score(
    cands: &mut Vec<Candidate>,
    strategy: Strategy,
    config: &Config,
    target_ms: Option<f64>,
    rng: &mut Rng,
) {
    let known = |c: &Candidate| c.source != Source::Unknown;
    for c in cands.iter_mut().filter(|c| known(c)) {
        c.value_usd = value_usd(c, target_ms);
    }
    let min_value = cands
        .iter()
        .filter(|c| known(c))
        .map(|c| c.value_usd)
        .fold(f64::INFINITY, f64::min);
    let min_cost = cands
        .iter()
        .filter(|c| known(c))
        .map(|c| c.expected_cost_usd)
        .fold(f64::INFINITY, f64::min);
    let min_ttft = cands
        .iter()
        .filter(|c| known(c))
        .map(|c| c.ttft_ms)
        .fold(f64::INFINITY, f64::min);
    let max_nines = cands
        .iter()
        .filter(|c| known(c))
        .map(|c| nines(c.reliability))
        .fold(0.0, f64::max);
    let w = config.routing.weights;
    for c in cands.iter_mut() {
        if !known(c) {
            c.score = -1.0;
            continue;
        }
        let price = if c.expected_cost_usd <= 0.0 {
            1.0
        } else {
            min_cost / c.expected_cost_usd
        };
        let latency = min_ttft / c.ttft_ms;
        let rel = if max_nines <= 0.0 {
            1.0
        } else {
            nines(c.reliability) / max_nines
        };
        let balanced = w.price * price + w.latency * latency + w.reliability * rel;
        let value = if c.value_usd <= 0.0 {
            1.0
        } else {
            min_value / c.value_usd
        };
        c.score = match strategy {
            Strategy::Value => value,
            Strategy::Cheapest => price,
            Strategy::Fastest => latency,
            Strategy::MostReliable => rel,
            Strategy::Balanced | Strategy::Weighted => balanced,
        };
    }
    // One random key per candidate: the tie-break, or (weighted) the sampling key.
    let keys: Vec<(f64, f64)> = cands
        .iter()
        .map(|c| {
            let u = rng.next_f64().max(f64::MIN_POSITIVE);
            let key = match strategy {
                // Efraimidis–Spirakis weighted order: key = u^(1/w), with w = score⁴ so
                // better offers win most draws while others still get some traffic.
                // (Candidates with no figures score −1: their key stays below every draw.)
                Strategy::Weighted if c.score > 0.0 => u.powf(1.0 / c.score.powi(4)),
                _ => c.score,
            };
            (key, u)
        })
        .collect();
    // Keys equal to nine decimals count as a tie. Rounding each key first (rather than
    // comparing with a tolerance, which is not transitive) keeps the comparator a total order:
    // Rust's sort may panic on one that is not.
    let keys: Vec<(f64, f64)> = keys.into_iter().map(|(k, u)| (quantize(k), u)).collect();
    let mut order: Vec<usize> = (0..cands.len()).collect();
    sort_stable_by(&mut order, |&x, &y| {
        let (a, b) = (keys[x], keys[y]);
        // The soft latency target splits the order in two: within it first, then the rest
        // (`value` weighs it into its figure instead).
        let group = cands[x]
            .beyond_ttft_target
            .cmp(&cands[y].beyond_ttft_target);
        if group.is_ne() && strategy != Strategy::Value {
            return group;
        }
        b.0.total_cmp(&a.0).then_with(|| b.1.total_cmp(&a.1))
    });
    // Apply the permutation without cloning candidates.
    let mut taken: Vec<Option<Candidate>> = std::mem::take(cands).into_iter().map(Some).collect();
    cands.extend(order.into_iter().filter_map(|i| taken[i].take()));
}

/// A ranking holding only provider `idx` (requests outside `rollout_percent` go to the
/// default provider as they did before market routing: no constraints, no fallbacks).
pub fn pinned(
    config: &Config,
    market: Option<&MarketView>,
    req: &RequestInfo,
    idx: usize,
) -> Option<Ranking> {
    let p = config.providers.get(idx)?;
    let configured_model = p.model_id(&req.model)?;
    let offer = market.and_then(|m| m.offer(&req.model, idx));
    let mut cand = candidate(
        idx,
        configured_model,
        offer,
        p.static_offer.as_ref(),
        p.provider_type,
        false,
    );
    cand.score = 1.0;
    Some(Ranking {
        strategy: config.routing.strategy,
        candidates: vec![cand],
        excluded: Vec::new(),
        stale: false,
        last_resort: false,
        ttft_target_ms: None,
        ttft_target_source: None,
    })
}

/// Whether a request takes market routing under `rollout_percent`: sticky per affinity value
/// when there is one, else a draw.
pub fn in_rollout(percent: u8, affinity: Option<&str>, rng: &mut Rng) -> bool {
    if percent >= 100 {
        return true;
    }
    let bucket = match affinity {
        Some(s) => crate::rng::fnv1a(s.as_bytes()) % 100,
        None => rng.next_u64() % 100,
    };
    bucket < u64::from(percent)
}

/// Moves `provider` to the front when it is a candidate (session affinity).
pub fn prefer(ranking: &mut Ranking, provider: usize) -> bool {
    match ranking
        .candidates
        .iter()
        .position(|c| c.provider == provider)
    {
        Some(0) => true,
        Some(i) => {
            let c = ranking.candidates.remove(i);
            ranking.candidates.insert(0, c);
            true
        }
        None => false,
    }
}

/// A one-line account of why nothing could be chosen, for the 503 message.
pub fn explain_exclusions(config: &Config, model: &str, excluded: &[(usize, Reason)]) -> String {
    let mut s = format!(
        "no provider for model `{}` meets the routing constraints: ",
        crate::errors::clip(model, 200)
    );
    for (i, (idx, reason)) in excluded.iter().enumerate() {
        if i > 0 {
            s.push_str("; ");
        }
        let name = config.providers.get(*idx).map_or("?", |p| p.name.as_str());
        s.push_str(&format!("{name}: {reason} [{}]", reason.code()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{Observation, ProviderHealth};
    use crate::market::{validate, MarketView};
    use crate::request;

    fn config(strategy: &str, extra: &str) -> Config {
        let doc = format!(
            r#"{{"providers":[
                {{"name":"cheap","cluster":"c1","models":{{"llama":"llama-cheap"}},"provider_type":"community","region":"eu-west"}},
                {{"name":"fast","cluster":"c2","models":{{"llama":"llama"}},"region":"us-east"}},
                {{"name":"solid","cluster":"c3","models":{{"llama":"llama"}},"region":"us-east"}},
                {{"name":"other","cluster":"c4","models":{{"gpt":"gpt"}}}}],
              "market":{{"cluster":"m","max_age_ms":60000}},
              "routing":{{"strategy":"{strategy}"{extra}}}}}"#
        );
        Config::parse(doc.as_bytes()).unwrap()
    }

    /// cheap: lowest price, slow, less reliable; fast: lowest ttft; solid: most reliable.
    fn market(c: &Config, generated_at: u64) -> MarketView {
        let offer = |p: &str, i: f64, o: f64, t: f64, u: f64, a: &str, k: &str| {
            format!(
                r#"{{"provider":"{p}","model":"llama","price":{{"input_per_mtok":{i},"output_per_mtok":{o}}},
                  "latency_ms":{{"ttft_p50":{t}}},"uptime":{u},"availability":"{a}","provider_type":"{k}"}}"#
            )
        };
        let doc = format!(
            r#"{{"version":1,"generated_at_ms":{generated_at},"offers":[{},{},{}]}}"#,
            offer("cheap", 0.1, 0.2, 900.0, 0.97, "online", "community"),
            offer("fast", 0.6, 0.9, 150.0, 0.99, "online", "company"),
            offer("solid", 0.8, 1.2, 500.0, 0.9995, "online", "company"),
        );
        MarketView::new(validate(doc.as_bytes(), c, 0, None).unwrap().stored, c)
    }

    fn req() -> RequestInfo {
        request::parse(
            br#"{"model":"llama","messages":[{"role":"user","content":"hello"}],"max_tokens":100}"#,
        )
        .unwrap()
    }

    fn try_rank(
        c: &Config,
        m: &MarketView,
        h: &HealthTable,
        now: u64,
        seed: u64,
    ) -> Result<Ranking, NoRoute> {
        rank(
            c,
            Some(m),
            h,
            &req(),
            &Prefs::default(),
            now,
            &mut Rng::new(seed),
        )
    }

    fn rank_at(c: &Config, m: &MarketView, h: &HealthTable, now: u64) -> Ranking {
        try_rank(c, m, h, now, 1).unwrap()
    }

    /// One failure of `name` at t = 1000 ms.
    fn fail(
        h: &mut HealthTable,
        name: &str,
        retry_after_ms: Option<u64>,
        circuit: &crate::config::Circuit,
    ) {
        h.entry(name)
            .observe(Observation::Failure { retry_after_ms }, 1000, circuit);
    }

    fn names(c: &Config, r: &Ranking) -> Vec<String> {
        r.candidates
            .iter()
            .map(|x| c.providers[x.provider].name.clone())
            .collect()
    }

    fn ranked(strategy: &str) -> Vec<String> {
        let c = config(strategy, "");
        let m = market(&c, 1000);
        let r = try_rank(&c, &m, &HealthTable::default(), 1000, 7).unwrap();
        names(&c, &r)
    }

    #[test]
    fn each_strategy_orders_the_fixture_catalog() {
        assert_eq!(ranked("cheapest"), ["cheap", "fast", "solid"]);
        assert_eq!(ranked("fastest"), ["fast", "solid", "cheap"]);
        assert_eq!(ranked("most_reliable"), ["solid", "fast", "cheap"]);
        // balanced (0.5 price, 0.3 latency, 0.2 reliability): cheap wins on price.
        assert_eq!(ranked("balanced")[0], "cheap");
    }

    #[test]
    fn the_soft_latency_target_orders_but_never_excludes() {
        // cheap 900 ms, fast 150 ms, solid 500 ms: within 600 ms go first, cheapest first.
        let c = config("cheapest", r#","ttft_target_ms":600"#);
        let m = market(&c, 1000);
        let r = rank_at(&c, &m, &HealthTable::default(), 1000);
        assert_eq!(names(&c, &r), ["fast", "solid", "cheap"]);
        assert!(r.excluded.is_empty());
        // Nobody within the target: the strategy's order stands.
        let c = config("cheapest", r#","ttft_target_ms":100"#);
        let r = rank_at(&c, &market(&c, 1000), &HealthTable::default(), 1000);
        assert_eq!(names(&c, &r), ["cheap", "fast", "solid"]);
        // Everyone within it: the same.
        let c = config("cheapest", r#","ttft_target_ms":1000"#);
        let r = rank_at(&c, &market(&c, 1000), &HealthTable::default(), 1000);
        assert_eq!(names(&c, &r), ["cheap", "fast", "solid"]);
    }

    #[test]
    fn balanced_weights_shift_the_choice() {
        let c = config(
            "balanced",
            r#","weights":{"price":0.1,"latency":0.8,"reliability":0.1}"#,
        );
        let m = market(&c, 1000);
        let r = rank_at(&c, &m, &HealthTable::default(), 1000);
        assert_eq!(names(&c, &r)[0], "fast");
    }

    #[test]
    fn model_is_rewritten_per_provider_and_cost_is_estimated() {
        let c = config("cheapest", "");
        let m = market(&c, 1000);
        let r = rank_at(&c, &m, &HealthTable::default(), 1000);
        let first = &r.candidates[0];
        assert_eq!(first.provider_model, "llama-cheap");
        let want = (req().estimated_input_tokens() as f64 * 0.1 + 100.0 * 0.2) / 1e6;
        assert!((first.expected_cost_usd - want).abs() < 1e-15);
    }

    #[test]
    fn constraints_exclude_with_reasons() {
        let c = config(
            "cheapest",
            r#","constraints":{"max_price_per_mtok":1.0,"min_uptime":0.98,"provider_types":["company"]}"#,
        );
        let m = market(&c, 1000);
        let r = rank_at(&c, &m, &HealthTable::default(), 1000);
        assert_eq!(names(&c, &r), ["fast"]);
        let codes: Vec<&str> = r.excluded.iter().map(|(_, why)| why.code()).collect();
        assert_eq!(codes, ["provider_types", "max_price_per_mtok"]);
    }

    #[test]
    fn all_excluded_explains_each_provider() {
        let c = config("cheapest", r#","constraints":{"max_ttft_ms":100}"#);
        let m = market(&c, 1000);
        let e = try_rank(&c, &m, &HealthTable::default(), 1000, 1).unwrap_err();
        let NoRoute::AllExcluded(ex) = e else {
            panic!("expected AllExcluded")
        };
        let msg = explain_exclusions(&c, "llama", &ex);
        assert!(
            msg.contains("cheap: ttft 900 ms over max_ttft_ms 100 [max_ttft_ms]"),
            "{msg}"
        );
        assert_eq!(ex.len(), 3);
    }

    #[test]
    fn unknown_model_is_its_own_error() {
        let c = config("cheapest", "");
        let mut r = req();
        r.model = "nope".into();
        let e = rank(
            &c,
            None,
            &HealthTable::default(),
            &r,
            &Prefs::default(),
            0,
            &mut Rng::new(1),
        );
        assert_eq!(e, Err(NoRoute::UnknownModel));
    }

    #[test]
    fn offline_offers_are_skipped() {
        let c = config("fastest", "");
        let doc = r#"{"version":1,"generated_at_ms":1000,"offers":[
            {"provider":"fast","model":"llama","price":{"input_per_mtok":0.6,"output_per_mtok":0.9},
             "latency_ms":{"ttft_p50":150},"uptime":0.99,"availability":"offline","provider_type":"company"},
            {"provider":"solid","model":"llama","price":{"input_per_mtok":0.8,"output_per_mtok":1.2},
             "latency_ms":{"ttft_p50":500},"uptime":0.999,"availability":"online","provider_type":"company"}]}"#;
        let m = MarketView::new(validate(doc.as_bytes(), &c, 0, None).unwrap().stored, &c);
        let r = rank_at(&c, &m, &HealthTable::default(), 1000);
        // cheap has no market offer and no static offer: it ranks last, as unknown.
        assert_eq!(names(&c, &r), ["solid", "cheap"]);
        assert_eq!(r.candidates[1].source, Source::Unknown);
        assert_eq!(r.excluded, vec![(1, Reason::Offline)]);
    }

    #[test]
    fn stale_market_data_outranks_static_offers_and_says_so() {
        let doc = r#"{"providers":[
            {"name":"a","cluster":"c1","models":{"m":"m"},
             "static_offer":{"price":{"input_per_mtok":9,"output_per_mtok":9},"latency_ms":{"ttft_p50":100},"uptime":0.99}},
            {"name":"b","cluster":"c2","models":{"m":"m"}}],
            "market":{"cluster":"s","refresh_ms":1000,"max_age_ms":5000},"routing":{"strategy":"cheapest"}}"#;
        let c = Config::parse(doc.as_bytes()).unwrap();
        let snap = r#"{"version":1,"generated_at_ms":0,"offers":[
            {"provider":"a","model":"m","price":{"input_per_mtok":0.1,"output_per_mtok":0.1},"latency_ms":{"ttft_p50":100},"uptime":0.99,"availability":"online","provider_type":"company"},
            {"provider":"b","model":"m","price":{"input_per_mtok":1,"output_per_mtok":1},"latency_ms":{"ttft_p50":100},"uptime":0.99,"availability":"offline","provider_type":"company"}]}"#;
        let m = MarketView::new(validate(snap.as_bytes(), &c, 0, None).unwrap().stored, &c);
        let r = request::parse(br#"{"model":"m"}"#).unwrap();
        let fresh = rank(
            &c,
            Some(&m),
            &HealthTable::default(),
            &r,
            &Prefs::default(),
            4000,
            &mut Rng::new(1),
        )
        .unwrap();
        assert!(!fresh.stale);
        assert_eq!(fresh.candidates[0].provider, 0);
        let stale = rank(
            &c,
            Some(&m),
            &HealthTable::default(),
            &r,
            &Prefs::default(),
            6000,
            &mut Rng::new(1),
        )
        .unwrap();
        assert!(stale.stale);
        assert!(fresh.excluded.contains(&(1, Reason::Offline)));
        // The last market price (0.1) is still a better guess than a's static offer (9); b's
        // `offline` from data past max_age_ms no longer excludes it: it ranks as degraded.
        assert_eq!(stale.candidates[0].provider, 0);
        assert_eq!(stale.candidates[0].input_per_mtok, 0.1);
        assert_eq!(stale.candidates[0].source, Source::StaleMarket);
        assert_eq!(stale.candidates[1].provider, 1);
        assert_eq!(stale.candidates[1].source, Source::StaleMarket);
        assert_eq!(stale.candidates[1].availability, Availability::Degraded);
        assert!(stale.excluded.is_empty());
    }

    #[test]
    fn health_excludes_open_circuits_and_flags_probes() {
        let c = config("cheapest", "");
        let m = market(&c, 1000);
        let mut h = HealthTable::default();
        let circuit = c.failover.circuit;
        for _ in 0..3 {
            fail(&mut h, "cheap", None, &circuit);
        }
        fail(&mut h, "fast", Some(5000), &circuit);
        let r = rank_at(&c, &m, &h, 1001);
        assert_eq!(names(&c, &r), ["solid"]);
        let after = rank_at(&c, &m, &h, 1000 + 30_000);
        assert_eq!(names(&c, &after), ["cheap", "fast", "solid"]);
        assert!(after.candidates[0].probe);
    }

    #[test]
    fn when_health_holds_back_everyone_the_soonest_free_is_tried() {
        let c = config("cheapest", "");
        let m = market(&c, 1000);
        let circuit = c.failover.circuit;
        let mut h = HealthTable::default();
        for _ in 0..3 {
            fail(&mut h, "cheap", None, &circuit);
        }
        fail(&mut h, "fast", Some(5000), &circuit);
        fail(&mut h, "solid", Some(9000), &circuit);
        let r = rank_at(&c, &m, &h, 1001);
        assert!(r.last_resort);
        // fast free at 6000, solid at 10000, cheap's circuit at 31000.
        assert_eq!(names(&c, &r), ["fast", "solid", "cheap"]);
        assert_eq!(r.excluded.len(), 3);
        // Policy still excludes: a constraint that removes everyone is a 503.
        let strict = config("cheapest", r#","constraints":{"max_ttft_ms":100}"#);
        let e = try_rank(&strict, &m, &h, 1001, 1);
        assert!(matches!(e, Err(NoRoute::AllExcluded(_))));
    }

    #[test]
    fn observed_errors_lower_reliability() {
        let c = config("most_reliable", "");
        let m = market(&c, 1000);
        let mut h = HealthTable::default();
        h.providers.insert(
            "solid".into(),
            ProviderHealth {
                error_rate: 0.5,
                ..Default::default()
            },
        );
        let r = rank_at(&c, &m, &h, 1000);
        assert_eq!(names(&c, &r)[0], "fast");
    }

    #[test]
    fn client_prefs_narrow_and_override() {
        let c = config("cheapest", "");
        let m = market(&c, 1000);
        let prefs = Prefs {
            strategy: Some(Strategy::Fastest),
            exclude: vec!["fast".into()],
            regions: vec!["us-east".into()],
            ..Prefs::default()
        };
        let r = rank(
            &c,
            Some(&m),
            &HealthTable::default(),
            &req(),
            &prefs,
            1000,
            &mut Rng::new(1),
        )
        .unwrap();
        assert_eq!(r.strategy, Strategy::Fastest);
        assert_eq!(names(&c, &r), ["solid"]);
    }

    #[test]
    fn ties_are_broken_by_the_seed_deterministically() {
        let doc = r#"{"providers":[
            {"name":"a","cluster":"c1","models":{"m":"m"}},{"name":"b","cluster":"c2","models":{"m":"m"}},
            {"name":"c","cluster":"c3","models":{"m":"m"}}],"routing":{"strategy":"cheapest"}}"#;
        let c = Config::parse(doc.as_bytes()).unwrap();
        let r = request::parse(br#"{"model":"m"}"#).unwrap();
        let order = |seed| {
            let x = rank(
                &c,
                None,
                &HealthTable::default(),
                &r,
                &Prefs::default(),
                0,
                &mut Rng::new(seed),
            )
            .unwrap();
            names(&c, &x)
        };
        assert_eq!(order(42), order(42));
        let firsts: std::collections::HashSet<String> =
            (0..50).map(|s| order(s)[0].clone()).collect();
        assert_eq!(
            firsts.len(),
            3,
            "ties spread over all providers across seeds"
        );
    }

    #[test]
    fn weighted_spreads_but_favours_the_best() {
        let c = config("weighted", "");
        let m = market(&c, 1000);
        let mut rng = Rng::new(99);
        let mut wins = std::collections::HashMap::new();
        for _ in 0..2000 {
            let r = rank(
                &c,
                Some(&m),
                &HealthTable::default(),
                &req(),
                &Prefs::default(),
                1000,
                &mut rng,
            )
            .unwrap();
            *wins.entry(names(&c, &r)[0].clone()).or_insert(0) += 1;
        }
        let best = ranked("balanced")[0].clone();
        let best_wins = wins[&best];
        assert!(best_wins > 1000, "{wins:?}");
        assert!(
            wins.len() == 3 && wins.values().all(|&n| n > 20),
            "{wins:?}"
        );
    }

    #[test]
    fn context_window_excludes_too_small_offers() {
        let doc = r#"{"providers":[
            {"name":"small","cluster":"c1","models":{"m":"m"},"static_offer":{"price":{"input_per_mtok":0,"output_per_mtok":0},"context_window":100}},
            {"name":"big","cluster":"c2","models":{"m":"m"},"static_offer":{"price":{"input_per_mtok":1,"output_per_mtok":1}}}],
            "routing":{"strategy":"cheapest"}}"#;
        let c = Config::parse(doc.as_bytes()).unwrap();
        let r = request::parse(br#"{"model":"m","max_tokens":500}"#).unwrap();
        let x = rank(
            &c,
            None,
            &HealthTable::default(),
            &r,
            &Prefs::default(),
            0,
            &mut Rng::new(1),
        )
        .unwrap();
        assert_eq!(names(&c, &x), ["big"]);
        assert_eq!(x.excluded[0].1.code(), "context_window");
    }

    #[test]
    fn rollout_splits_and_sticks_per_session() {
        let mut rng = Rng::new(3);
        let n = (0..10_000)
            .filter(|_| in_rollout(30, None, &mut rng))
            .count();
        assert!((2700..3300).contains(&n), "{n}");
        let first = in_rollout(30, Some("s-1"), &mut rng);
        assert!((0..50).all(|_| in_rollout(30, Some("s-1"), &mut rng) == first));
        assert!(in_rollout(100, None, &mut rng));
        assert!(!in_rollout(0, Some("x"), &mut rng));
        let c = config("cheapest", "");
        let r = pinned(&c, None, &req(), 2).unwrap();
        assert_eq!(names(&c, &r), ["solid"]);
        assert!(
            pinned(&c, None, &req(), 3).is_none(),
            "other does not serve llama"
        );
    }

    #[test]
    fn affinity_moves_a_candidate_first() {
        let c = config("cheapest", "");
        let m = market(&c, 1000);
        let mut r = rank_at(&c, &m, &HealthTable::default(), 1000);
        assert!(prefer(&mut r, 2));
        assert_eq!(names(&c, &r), ["solid", "cheap", "fast"]);
        assert!(!prefer(&mut r, 3));
    }

    #[test]
    fn near_ties_and_nan_keys_sort_as_a_total_order() {
        // Keys 0.4e-9 apart: with a tolerance each is "equal" to its neighbours but not to
        // keys further along, which is not an order; rounded keys are.
        let keys: Vec<f64> = (0..64)
            .map(|i| 0.5 + f64::from(i % 7) * 4e-10 + f64::from(i % 3) * 1e-12)
            .chain([f64::NAN, -f64::NAN, f64::INFINITY, -1.0])
            .collect();
        let q: Vec<f64> = keys.iter().map(|k| quantize(*k)).collect();
        for a in &q {
            for b in &q {
                for c in &q {
                    if a.total_cmp(b).is_le() && b.total_cmp(c).is_le() {
                        assert!(a.total_cmp(c).is_le(), "{a} {b} {c}");
                    }
                }
            }
        }
        let mut order: Vec<usize> = (0..q.len()).collect();
        order.sort_by(|&x, &y| q[y].total_cmp(&q[x]));
        assert_eq!(order.len(), keys.len());
        assert_eq!(quantize(0.5 + 4e-10), 0.5);
        assert_eq!(quantize(0.5 + 6e-10), 0.500_000_001);
    }
}

#[cfg(test)]
#[path = "select_tests.rs"]
mod exact_tests;
