//! market-router's tools: the benchmarks, the market simulator, the report, the demo and the
//! Envoy-mode config printer are binaries (`src/bin/`); the simulator's model is this library's
//! `sim` module, shared with `tools/tests/market_sim.rs`.

pub mod bench;
pub mod cli;
pub mod sim;
pub mod wrk;
