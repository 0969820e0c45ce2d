//! Market simulation benchmark: routes one seeded request stream through a world of providers
//! whose prices, latency and availability change, with round-robin, static ordered fallback,
//! latency-only learning, market-router (the crate's own selection core) and an oracle, and
//! checks the market-router goals.
//!
//! ```text
//! cargo run --release --example market_sim -- [--seed N] [--requests N] [--rps X]
//!     [--informed-oracle true|false] [--sidecar-outages-per-hour X] [--json out.json]
//! ```
//!
//! The world and the strategies are described at the top of `examples/sim/mod.rs`.

mod sim;

use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!(
        "usage: market_sim [--seed N] [--requests N] [--rps X] [--informed-oracle true|false] \
         [--sidecar-outages-per-hour X] [--json out.json]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut o = sim::Options::default();
    let mut json_out: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next();
        let ok = match (a.as_str(), v) {
            ("--seed", Some(v)) => v.parse().map(|x| o.seed = x).is_ok(),
            ("--requests", Some(v)) => v.parse().map(|x| o.requests = x).is_ok() && o.requests > 0,
            ("--rps", Some(v)) => {
                v.parse().map(|x| o.rps = x).is_ok() && o.rps > 0.0 && o.rps.is_finite()
            }
            ("--informed-oracle", Some(v)) => v.parse().map(|x| o.informed_oracle = x).is_ok(),
            ("--sidecar-outages-per-hour", Some(v)) => v
                .parse()
                .map(|x| o.sidecar_outages_h = x)
                .is_ok_and(|_| o.sidecar_outages_h >= 0.0),
            ("--json", Some(v)) => {
                json_out = Some(v);
                true
            }
            _ => false,
        };
        if !ok {
            return usage();
        }
    }
    let t = std::time::Instant::now();
    let report = match sim::simulate(o) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("market_sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report.text());
    println!("\n({:.1} s)", t.elapsed().as_secs_f64());
    if let Some(path) = json_out {
        let body = serde_json::to_string_pretty(&report.json()).unwrap_or_default();
        if let Err(e) = std::fs::write(&path, body + "\n") {
            eprintln!("market_sim: cannot write {path}: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
