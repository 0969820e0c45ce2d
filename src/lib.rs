//! market-router: a proxy-wasm HTTP filter that routes OpenAI-compatible LLM requests to the
//! best provider for each request, by live market stats, and fails over when a provider fails.
//!
//! The core modules are plain Rust and build and test natively; only `filter` (compiled for
//! wasm32 only) touches the proxy-wasm host.

#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]

pub mod config;
pub mod errors;
pub mod health;
pub mod market;
pub mod request;
pub mod rng;
pub mod select;
