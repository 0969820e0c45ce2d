//! market-router: a proxy-wasm HTTP filter that routes OpenAI-compatible LLM requests to the
//! best provider for each request, by live market stats, and fails over when a provider fails.
//!
//! The core modules are plain Rust and build and test natively; only `host` and `filter`
//! (compiled for wasm32 only) touch the proxy-wasm host.

#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

pub mod answer;
pub mod attempt;
pub mod config;
pub mod decision;
#[cfg(not(target_arch = "wasm32"))]
pub mod envoy_config;
pub mod errors;
pub mod explain;
pub mod headers;
pub mod health;
pub mod json;
pub mod market;
pub mod metrics;
pub mod native;
pub mod report;
pub mod request;
pub mod rng;
pub mod select;
