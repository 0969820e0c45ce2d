//! What the client and the counters learn about the answer a request got: its cost (from its
//! usage, else the ranking's estimate, flagged so), our `x-market-router-*` response headers,
//! the decision record, the counters it adds to, and the headers and body of the final error.
//!
//! A view over one request's walk; the filter's HTTP context writes what it gives with host
//! calls.

use crate::config::Config;
use crate::decision::Decision;
use crate::errors::ApiError;
use crate::headers;
use crate::metrics::{PerProvider, Usage};
use crate::walk::Walk;

/// One request's answer, as far as it is known.
#[derive(Debug, Clone, Copy)]
pub struct Served<'a> {
    /// The filter's configuration.
    pub config: &'a Config,
    /// The request's walk (ranking and attempts).
    pub walk: &'a Walk,
    /// The requested model, once the body was read.
    pub model: Option<&'a str>,
    /// The delivered answer's usage, when known.
    pub usage: Option<Usage>,
    /// Age of the market snapshot at decision time, ms.
    pub snapshot_age_ms: Option<u64>,
    /// What the last failing provider said (cleaned), for the record.
    pub provider_error: Option<&'a str>,
}

impl<'a> Served<'a> {
    /// The provider of the last finished attempt.
    pub fn provider(&self) -> Option<usize> {
        self.walk
            .attempts
            .as_ref()
            .and_then(|a| a.tried.last().map(|(p, _)| *p))
    }

    /// Prices of `provider` in this request's ranking: input and output per million tokens,
    /// and the expected cost.
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

    /// Cost of the answer from `provider`, USD: from its usage, else the ranking's estimate
    /// (`true`: estimated).
    pub fn cost(&self, provider: usize) -> Option<(f64, bool)> {
        let (i, o, estimate) = self.prices(provider)?;
        match self.usage {
            Some(u) if i.is_finite() && o.is_finite() => Some((u.cost_usd(i, o), false)),
            _ if estimate.is_finite() => Some((estimate, true)),
            _ => None,
        }
    }

    /// Our response headers for an answer from `provider`, handed to `emit` one by one
    /// (none when `response_headers` is off).
    pub fn headers(&self, provider: usize, mut emit: impl FnMut(&'static str, &str)) {
        if !self.config.response_headers {
            return;
        }
        let name = self
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

    /// The decision record of an answer from `provider` (none: a local reply) with `status`.
    pub fn decision(&self, provider: Option<usize>, status: Option<u32>) -> Decision<'a> {
        let config = self.config;
        let name = |i: usize| config.providers.get(i).map_or("?", |p| p.name.as_str());
        let walk = self.walk;
        let tried: Vec<(&str, &'static str)> = walk
            .attempts
            .as_ref()
            .map(|a| a.tried.iter().map(|(p, o)| (name(*p), o.label())).collect())
            .unwrap_or_default();
        let score = provider.and_then(|p| {
            walk.ranking
                .as_ref()?
                .candidates
                .iter()
                .find(|c| c.provider == p)
                .map(|c| (c.score * 1e4).round() / 1e4)
        });
        let cost = provider.and_then(|p| self.cost(p));
        Decision {
            model: self.model,
            provider: provider.map(name),
            status,
            tried,
            strategy: walk.ranking.as_ref().map(|r| r.strategy.as_str()),
            score,
            cost_usd: cost.map(|c| c.0),
            cost_estimated: cost.map(|c| c.1),
            prompt_tokens: self.usage.map(|u| u.prompt_tokens),
            completion_tokens: self.usage.map(|u| u.completion_tokens),
            snapshot_age_ms: self.snapshot_age_ms,
            provider_error: self.provider_error,
        }
    }

    /// What the delivered answer from `provider` adds to its counters: tokens in and out,
    /// and its cost in micro-USD when priced from its usage (an estimate is not counted).
    pub fn counts(&self, provider: usize) -> [Option<(PerProvider, u64)>; 3] {
        let Some(u) = self.usage else {
            return [None; 3];
        };
        let cost = match self.cost(provider) {
            Some((usd, false)) => Some((PerProvider::CostMicroUsd, (usd * 1e6).round() as u64)),
            _ => None,
        };
        [
            Some((PerProvider::TokensIn, u.prompt_tokens)),
            Some((PerProvider::TokensOut, u.completion_tokens)),
            cost,
        ]
    }

    /// The headers of an error answer: its content type, the attempts made (with our
    /// headers on) and, always, the soonest `retry-after` a provider asked for.
    pub fn error_headers(&self) -> Vec<(String, String)> {
        let mut hs: Vec<(String, String)> =
            vec![("content-type".into(), "application/json".into())];
        if let Some(a) = &self.walk.attempts {
            if self.config.response_headers {
                hs.push(("x-market-router-attempts".into(), a.tried.len().to_string()));
            }
            // Standard HTTP, not one of our x-market-router-* headers: always sent.
            if let Some(s) = a.min_retry_after_s() {
                hs.push(("retry-after".into(), s.to_string()));
            }
        }
        hs
    }

    /// The final error when the walk is used up (`last_said`: what the last failing provider
    /// said, cleaned).
    pub fn final_error(&self, last_said: Option<&str>) -> ApiError {
        let model = self.model.unwrap_or("");
        match &self.walk.attempts {
            Some(a) if !a.tried.is_empty() => a.final_error(self.config, model, last_said),
            _ => ApiError::no_provider(format!(
                "no provider for model `{}` could be tried",
                crate::errors::clip(model, 200)
            )),
        }
    }
}

#[cfg(test)]
#[path = "served_tests.rs"]
mod tests;
