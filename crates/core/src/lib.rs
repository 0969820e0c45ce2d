//! market-router's core: what the proxy-wasm filter (crate `market-router`) decides for each
//! request, by live market stats, and how it fails over when a provider fails.
//!
//! Plain Rust with no proxy-wasm dependency: it builds and tests natively and compiled to
//! wasm32-wasip1; the filter crate turns host callbacks into calls here.

#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

pub mod answer;
pub mod attempt;
pub mod config;
pub mod decision;
#[cfg(not(target_arch = "wasm32"))]
pub mod envoy_config;
pub mod errors;
pub mod exchange;
pub mod explain;
pub mod handover;
pub mod headers;
pub mod health;
pub mod host;
pub mod json;
pub mod market;
pub mod metrics;
pub mod native;
pub mod outbound;
pub mod refresh;
pub mod report;
pub mod request;
pub mod rng;
pub mod routing;
pub mod select;
pub mod served;
pub mod shared;
pub mod upstream;
pub mod walk;

#[cfg(test)]
mod test_support;
