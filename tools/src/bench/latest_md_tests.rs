//! `latest.md` rendered from typed results: every section's figures where the text puts them,
//! numbers as `latest.json` writes them, what is unknown as n/a, and a section that did not
//! run left out.

use super::failover::{Failover, Scenario, ScenarioGoals};
use super::memory::{MemReading, MemRow, Memory, Refresh, VmMemory};
use super::overhead::{
    Bodies, Comparison, CpuGroup, CpuSplit, Floor, Goal, LoadShape, Overhead, PerfSplit, Quantiles,
    TableRow, VariantInfo,
};
use super::streaming::{StreamComparison, StreamRow, Streaming};
use super::{markdown, Meta, Results};
use std::collections::BTreeMap;

fn meta() -> Meta {
    Meta {
        date: "2026-12-01T18:00:00Z".into(),
        commit: "abc1234".into(),
        dirty: true,
        envoy: "1.40.0".into(),
        cores: 2,
        quick: false,
        args: vec![],
        wasm_bytes: 1,
        loadavg_start: "1.00 2.00 3.00".into(),
        runtime_s: 1.0,
        loadavg_end: "4.00 5.00 6.00".into(),
    }
}

fn variants() -> Vec<VariantInfo> {
    vec![
        VariantInfo {
            key: "a",
            about: "Envoy alone",
        },
        VariantInfo {
            key: "c",
            about: "route mode",
        },
    ]
}

fn row(body: &'static str, variant: &'static str, rps: f64) -> TableRow {
    TableRow {
        body,
        variant,
        about: "",
        rps,
        cpu_us_per_req: 61.25,
        sat_p50_us: 1.0,
        sat_p99_us: 2.0,
        p50_us: 400.4,
        p99_us: f64::NAN,
    }
}

fn quantiles(p50: f64) -> Quantiles {
    [("p50".to_string(), p50), ("p99".to_string(), 9.0)].into()
}

fn overhead() -> Overhead {
    let cmp = |r| Comparison {
        rps_ratio: r,
        added_p50_us: 12.4,
        added_p99_us: -3.0,
        added_cpu_us_per_req: 68.5,
    };
    let comparisons = [
        (
            "small".to_string(),
            [("c/b".to_string(), cmp(0.5712))].into(),
        ),
        ("large".to_string(), [("c/a".to_string(), cmp(0.25))].into()),
        ("other".to_string(), [("x/y".to_string(), cmp(9.0))].into()),
    ]
    .into();
    let groups = [(
        "kernel".to_string(),
        CpuGroup {
            share_pct: 20.4,
            cpu_us_per_req: 12.34,
        },
    )]
    .into();
    Overhead {
        upstream: "nginx".into(),
        load_generator: "wrk".into(),
        envoy_concurrency: 1,
        bodies: Bodies {
            small: 200,
            large: 65536,
        },
        saturation: LoadShape {
            connections: 16,
            threads: 2,
            secs: 3,
        },
        latency: LoadShape {
            connections: 1,
            threads: 1,
            secs: 2,
        },
        rounds: 5,
        variants: variants(),
        table: vec![row("small", "a", 10_000.4), row("large", "c", 2_500.6)],
        comparisons,
        goals: vec![Goal {
            goal: "route mode keeps half the empty filter's throughput",
            value: 3.0,
            target: 0.5,
            pass: true,
        }],
        floor: Some(Floor {
            rps_ratio_vs_b: 0.9,
            added_p50_us_vs_a: 5.0,
        }),
        decision_us: [
            ("c".to_string(), None),
            ("d".to_string(), Some(quantiles(3.0))),
        ]
        .into(),
        decision_us_by_body: [("c/small".to_string(), quantiles(2.5))].into(),
        cpu_split: [
            (
                "c".to_string(),
                CpuSplit::Profile(PerfSplit {
                    requests: 10,
                    cpu_us_per_req: 60.0,
                    samples: 100,
                    groups,
                    by_dso: vec![],
                }),
            ),
            (
                "d".to_string(),
                CpuSplit::Failed {
                    error: "no perf".into(),
                },
            ),
        ]
        .into(),
        filter_counters: BTreeMap::new(),
        wasm_stats: BTreeMap::new(),
        runs: vec![],
    }
}

fn scenario(name: &str, statuses: &[(&str, usize)], overflow: u64) -> Scenario {
    Scenario {
        name: name.into(),
        envoy_concurrency: 2,
        connections: 8,
        secs: 10,
        switch_at_s: 5.0,
        requests: 1234,
        by_status: statuses.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
        success_ratio: 0.999,
        outage_requests: 600,
        outage_success_ratio: 1.0,
        dead_attempts: 3,
        dead_attempts_per_request: 0.005,
        a_hits: 1,
        b_hits: 2,
        healthy_rps: 120.4,
        outage_rps: 110.6,
        outage_throughput_share: 0.9187,
        healthy_p50_us: 800,
        healthy_p99_us: 2000,
        outage_p50_us: 900,
        outage_p99_us: 2500,
        p99_us: 2500,
        p99_budget_us: 8000,
        requests_per_500ms: vec![],
        counters: [(
            "cluster.providers.upstream_rq_retry_overflow".to_string(),
            overflow,
        )]
        .into(),
        goals: ScenarioGoals {
            success_100pct: false,
            dead_attempts_le_0_01: true,
            throughput_ge_0_9: true,
            p99_within_budget: true,
        },
    }
}

fn failover() -> Failover {
    Failover {
        market_router_envoy_mode: scenario("n", &[("200", 5)], 0),
        upstream: "mock",
        upstream_rtt_p50_us: 150,
        market_router: scenario("c", &[("200", 5), ("503", 1), ("0", 2)], 0),
        envoy_retry: scenario("e", &[("200", 5)], 7),
        market_router_config: serde_json::Value::Null,
        envoy_retry_setup: "retry_on 5xx",
    }
}

fn reading(rss: Option<f64>, size: f64) -> MemReading {
    MemReading {
        rss_mib: rss,
        hwm_mib: None,
        tcmalloc_allocated_mib: Some(4.25),
        tcmalloc_heap_mib: None,
        wasm_linear_memories: 3,
        wasm_linear_per_vm_mib: vec![
            VmMemory {
                size: 2.0,
                resident: 1.5,
            },
            VmMemory {
                size,
                resident: 1.0,
            },
        ],
        wasm_linear_size_mib: size,
        wasm_linear_resident_mib: 1.0,
    }
}

fn memory() -> Memory {
    let mem_row = |offers, size| MemRow {
        offers,
        snapshot_json_bytes: 10 * 1024,
        loaded_after_ms: 40,
        after_load: reading(Some(30.0), size),
        requests: 200,
        after_traffic: reading(None, size),
        after_refreshes: None,
    };
    Memory {
        envoy_concurrency: 2,
        providers: 10,
        rows: vec![mem_row(10, 2.0), mem_row(10_000, 6.5)],
        refresh: Some(Refresh {
            offers: 10_000,
            tries: 3,
            fetch_to_visible_ms: vec![250.0, 260.5],
            fetch_to_visible_ms_median: 255.2,
            fetch_to_stored_ms: vec![],
            fetch_to_stored_ms_median: 30.0,
            file_write_to_visible_ms: vec![],
            note: "",
        }),
        wasm_stats: vec![],
        notes: "",
    }
}

fn streaming() -> Streaming {
    Streaming {
        upstream: "mock".into(),
        events_per_answer: 8,
        connections: 16,
        secs: 3,
        rounds: 5,
        variants: variants(),
        table: vec![StreamRow {
            kind: "usage",
            variant: "c",
            rps: 900.4,
            cpu_us_per_req: 80.04,
        }],
        comparisons: [(
            "usage".to_string(),
            [(
                "c/b".to_string(),
                StreamComparison {
                    added_cpu_us_per_req: 20.0,
                    cpu_capacity_ratio: 0.8,
                },
            )]
            .into(),
        )]
        .into(),
    }
}

fn all() -> Results {
    Results {
        meta: meta(),
        overhead: Some(overhead()),
        streaming: Some(streaming()),
        failover: Some(failover()),
        memory: Some(memory()),
    }
}

#[test]
fn every_section_shows_its_figures() {
    let md = markdown(&all());
    for line in [
        "2026-12-01T18:00:00Z · commit `abc1234` (with uncommitted changes) · Envoy 1.40.0 · 2 cores",
        "Load average (1/5/15 min) 1.00 2.00 3.00 at the start, 4.00 5.00 6.00 at the end",
        // Overhead: the variants, the table, the comparisons of both bodies (no other), goals
        // with their figures as the JSON has them, the floor, decision times, the perf split.
        "5 rounds of alternating runs (a, c)",
        "- **c**: route mode",
        "| 200 B | a | 10000 | 61.2 | 400 | n/a |",
        "| 64 KiB | c | 2501 | 61.2 | 400 | n/a |",
        "| 200 B | c vs b | 0.571 | +12 | -3 | +68.5 |",
        "| 64 KiB | c vs a | 0.250 |",
        "measured 3.0 (target 0.5): **PASS**",
        "0.900× the empty filter's throughput, +5 µs p50",
        "| c | 200 B | 2.5 | n/a | 9.0 |",
        "| c | all, whole run | n/a | n/a | n/a |",
        "| d | all, whole run | 3.0 | n/a | 9.0 |",
        "| c | 60.0 | 0 | 0 | 12.3 (20 %) | 0 |",
        "| d | perf failed: no perf | | | | |",
        // Failover: the three setups side by side.
        "8 client connections (keep-alive, closed loop, 200-byte body) for 10 s; provider `a` answers 503 from t = 5.0 s on.",
        "one round trip 150 µs (p50, direct). Envoy `--concurrency 2`.",
        "- **Envoy retry**: retry_on 5xx.",
        "| requests | 1234 | 1234 | 1234 |  |",
        "| success ratio | 99.900 % | 99.900 % | 99.900 % | 100 % |",
        "| failed answers | 2 × transport error 1 × 503 | none | none (7 retries refused by the cluster's retry circuit breaker, max_retries 3 by default) | none |",
        "| dead-provider attempts per request (outage) | 0.0050 (3 / 600) |",
        "| req/s healthy → outage | 120 → 111 |",
        "| outage throughput / healthy | 0.919 |",
        "| p99 µs healthy → outage | 2000 → 2500 |",
        "| goals | success FAIL · dead attempts PASS · throughput PASS · p99 PASS |",
        // Memory.
        "Envoy `--concurrency 2` with market-router (10 providers, route mode), snapshots of N offers (every provider offers N/10 models). Measured once the route endpoint shows all N offers, and again after 200 requests.",
        "| 10000 | 10 KiB | 40 ms | 30.0 → n/a | 4.2 → 4.2 | 6.5 (1.0) → 6.5 (1.0) |",
        "Wasm linear memories counted: 3 (one per VM). Per VM with the largest snapshot, MiB (size/resident): 2.0/1.5, 6.5/1.0.",
        "Refresh of a 10000-offer snapshot (tries: 3)",
        "median 30 ms; to the route endpoint showing the new generation: median 255 ms (tries: 250.0, 260.5 ms)",
        // Streaming.
        "Load: wrk, 16 connections, 3 s runs, variants alternating, rounds: 5;",
        "| usage | c | 900 | 80.0 |",
        "| usage | c vs b | +20.0 | 0.800 |",
    ] {
        assert!(md.contains(line), "missing {line:?} in\n{md}");
    }
    assert!(!md.contains("x vs y"), "{md}");
    for section in [
        "## 1. Overhead",
        "## 2. Failover",
        "## 3. Memory",
        "## 4. Streaming",
    ] {
        assert_eq!(md.matches(section).count(), 1, "{section}");
    }
}

#[test]
fn a_section_that_did_not_run_is_left_out() {
    let results = Results {
        meta: Meta {
            dirty: false,
            quick: true,
            ..meta()
        },
        overhead: None,
        streaming: None,
        failover: Some(failover()),
        memory: None,
    };
    let md = markdown(&results);
    assert!(md.contains("· `make bench ARGS=--quick`"), "{md}");
    assert!(!md.contains("uncommitted"), "{md}");
    assert!(md.contains("## 2. Failover under load"));
    for gone in ["## 1.", "## 3.", "## 4."] {
        assert!(!md.contains(gone), "{gone} in {md}");
    }
    // No runs, no perf: the tables' heads stay, the perf split goes.
    let bare = Overhead {
        cpu_split: BTreeMap::new(),
        floor: None,
        ..overhead()
    };
    let md = super::overhead::markdown_part(Some(&bare));
    assert!(!md.contains("Where Envoy's CPU goes"));
    assert!(!md.contains("knob (j)"));
}
