//! A short market simulation (the engine is `examples/sim/mod.rs`) on a fixed seed:
//! market-router, driven through the crate's own selection core, against round-robin, static
//! fallback, latency-only learning and the oracle. Run with `--nocapture` to see the table.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../examples/sim/mod.rs"]
mod sim;

const BALANCED: &str = sim::VARIANTS[0].0;
const CHEAPEST: &str = sim::VARIANTS[1].0;

/// 20,000 requests at 5/s: 1.1 h of simulated time, a few seconds in a debug build.
fn short() -> sim::Report {
    let o = sim::Options {
        seed: 42,
        requests: 20_000,
        informed_oracle: false,
        ..sim::Options::default()
    };
    let report = sim::simulate(o).expect("the simulation's configurations are valid");
    println!("{}", report.text());
    report
}

fn goal<'a>(goals: &'a [sim::Goal], variant: &str, prefix: &str) -> &'a sim::Goal {
    goals
        .iter()
        .find(|g| g.variant == variant && g.goal.starts_with(prefix))
        .expect("goal exists")
}

/// The goals the core meets on this seed, per configuration: every variant answers ≥ 99.9 %
/// of requests at ≥ 20 % below round-robin's cost; the default (balanced) strategy does so at
/// no worse p95 than round-robin; the cheapest strategy stays within 10 % of the oracle's cost.
#[test]
fn market_router_goals_on_a_fixed_seed() {
    let r = short();
    let goals = r.goals();
    for (variant, _, _) in sim::VARIANTS {
        let success = goal(&goals, variant, "success");
        assert!(success.pass, "{variant}: success {:.3} %", success.value);
        let vs_rr = goal(&goals, variant, "cost / round-robin");
        assert!(
            vs_rr.pass,
            "{variant}: cost {:.3} of round-robin's",
            vs_rr.value
        );
    }
    let p95 = goal(&goals, BALANCED, "p95");
    assert!(
        p95.pass,
        "{BALANCED}: p95 {:.3} of round-robin's",
        p95.value
    );
    let vs_oracle = goal(&goals, CHEAPEST, "cost / oracle");
    assert!(
        vs_oracle.pass,
        "{CHEAPEST}: cost {:.3} of the oracle's",
        vs_oracle.value
    );

    // Every row saw the same requests; nobody answers them more cheaply than the oracle.
    let oracle = r.row(sim::ORACLE).expect("oracle row");
    for row in &r.rows {
        assert_eq!(row.requests, 20_000, "{}", row.label);
        assert_eq!(row.latencies.len(), 20_000, "{}", row.label);
        assert!(
            row.cost_per_1k() >= oracle.cost_per_1k() * 0.999 || row.ok < oracle.ok,
            "{} is cheaper than the oracle",
            row.label
        );
    }
    // The market was used: snapshots were taken and ranked on.
    for i in &r.internals {
        assert!(i.refreshes > 0, "{}: no snapshot accepted", i.label);
    }
}

/// Same seed, same numbers: the world, the requests and every router are seeded.
#[test]
fn simulation_is_reproducible() {
    let o = sim::Options {
        seed: 7,
        requests: 2_000,
        informed_oracle: true,
        ..sim::Options::default()
    };
    let a = sim::simulate(o).expect("valid").json();
    let b = sim::simulate(o).expect("valid").json();
    assert_eq!(a, b);
    let other = sim::simulate(sim::Options { seed: 8, ..o })
        .expect("valid")
        .json();
    assert_ne!(a["strategies"], other["strategies"]);
}
