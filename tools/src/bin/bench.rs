//! `make bench`: what the market-router filter costs and how it behaves under load, measured
//! in a real Envoy on loopback (`market_router_tools::bench`, one module a section). Writes
//! `bench/results/latest.json` and `latest.md`; `bench --help` lists the options.

fn main() {
    market_router_tools::bench::main();
}
