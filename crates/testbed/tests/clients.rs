//! Real clients nobody here wrote, against the filter in a real Envoy with the shipped
//! compressor in front: the official OpenAI Python SDK (pinned in the project's `.venv` by
//! `make clients`), the official Node SDK (`tests/clients/node`, installed by `npm ci`), and
//! curl with its default options. Both failover modes, and dispatch mode in Kong's wasm host
//! (`_kong`: providers addressed `127.0.0.1:<port>`, nginx's gzip filter in front).
//!
//! The SDK scripts (`tests/clients/python/sdk_check.py`, `tests/clients/node/sdk_check.mjs`)
//! make a plain call, a stream with `stream_options.include_usage`, embeddings (a small and a
//! 1.4 MB answer), a call that fails over, and one call for each error the filter answers,
//! checking the SDK's own exception type for each. A missing SDK fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use market_router_testbed as common;

use common::*;
use serde_json::json;
use std::path::PathBuf;
use std::process::Command;

const MODEL: &str = "gpt-4o-mini";
const EMBED: &str = "text-embedding-3-small";

/// The providers and what they are like:
/// - `a`, `b`: healthy (a cheaper); serve the plain models.
/// - `big`: answers embeddings of 1.4 MB.
/// - `flaky`: 503 (cheapest for `flaky-model`, then `b`; alone for `unavailable-model`).
/// - `down`: 502 (alone for `down-model`).
/// - `busy`: 429 with Retry-After 1.
const PROVIDERS: [(&str, f64, &[&str]); 6] = [
    ("a", 0.2, &[MODEL, EMBED]),
    ("b", 0.5, &[MODEL, EMBED, "flaky-model"]),
    ("big", 0.5, &["big-embedding"]),
    ("flaky", 0.1, &["flaky-model", "unavailable-model"]),
    ("down", 0.3, &["down-model"]),
    ("busy", 0.1, &["busy-model"]),
];

fn opts(name: &str) -> MockOpts {
    match name {
        "big" => MockOpts {
            answer_bytes: 1_400_000,
            ..MockOpts::default()
        },
        "flaky" => MockOpts::default().status(503),
        "down" => MockOpts::default().status(502),
        "busy" => MockOpts {
            status: Some(429),
            retry_after: Some(1),
            ..MockOpts::default()
        },
        _ => MockOpts::default(),
    }
}

struct Bed {
    mocks: Vec<MockProvider>,
    gateway: Gateway,
}

impl Bed {
    /// `mode`: a failover mode in Envoy, or `kong` (dispatch mode in Kong's wasm host).
    fn start(mode: &str) -> Bed {
        let kong = mode == "kong";
        let mocks: Vec<MockProvider> = PROVIDERS
            .iter()
            .map(|(n, _, _)| MockProvider::start(n, &opts(n)).unwrap())
            .collect();
        let providers: Vec<_> = PROVIDERS
            .iter()
            .map(|(name, price, models)| {
                let models: serde_json::Map<String, serde_json::Value> =
                    models.iter().map(|m| (m.to_string(), json!(m))).collect();
                let port = mocks.iter().find(|m| m.name() == *name).map_or(0, |m| m.port());
                json!({
                    "name": name,
                    "cluster": if kong { format!("127.0.0.1:{port}") } else { format!("provider_{name}") },
                    "models": models,
                    "static_offer": {"price": {"input_per_mtok": price, "output_per_mtok": price}}
                })
            })
            .collect();
        let config = json!({
            "providers": providers,
            "routing": {"strategy": "cheapest"},
            "failover": {"mode": if kong { "dispatch" } else { mode }, "max_attempts": 2, "attempt_timeout_ms": 10000, "deadline_ms": 20000},
            "limits": {"max_body_bytes": 8192}
        });
        if kong {
            let kong = Kong::start(
                &KongConfig::new()
                    .market_router(&config.to_string())
                    .compression(true),
            )
            .unwrap();
            return Bed {
                mocks,
                gateway: Gateway::Kong(kong),
            };
        }
        let mut cfg = EnvoyConfig::new()
            .market_router(&config.to_string())
            .compression(true);
        for m in &mocks {
            cfg = cfg.provider(ProviderCluster::new(
                &format!("provider_{}", m.name()),
                m.port(),
            ));
        }
        let envoy = Envoy::start(&cfg, 1).unwrap();
        Bed {
            mocks,
            gateway: Gateway::Envoy(envoy),
        }
    }

    fn base(&self) -> String {
        self.gateway.url("")
    }

    fn hits(&self) -> Vec<(String, u64)> {
        self.mocks
            .iter()
            .map(|m| (m.name().to_string(), m.hits().unwrap()))
            .collect()
    }

    /// What one run of the SDK script must have cost each provider: one call each for the
    /// plain, stream and failover checks, and one attempt per failing call (no SDK retries).
    fn assert_hits(&self, who: &str) {
        let want: Vec<(String, u64)> = [
            ("a", 3),
            ("b", 1),
            ("big", 1),
            ("flaky", 2),
            ("down", 1),
            ("busy", 1),
        ]
        .iter()
        .map(|(n, h)| (n.to_string(), *h))
        .collect();
        assert_eq!(self.hits(), want, "{who}");
    }
}

/// Runs a client program; fails the test, with its output, unless it exits 0 having printed
/// every check.
fn run(who: &str, mut cmd: Command, checks: &[&str]) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{who}: cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{who} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for c in checks {
        assert!(
            stdout.lines().any(|l| l == format!("ok {c}")),
            "{who}: no `ok {c}` in\n{stdout}\n{stderr}"
        );
    }
    assert!(stdout.contains("all checks passed"), "{who}:\n{stdout}");
}

const CHECKS: [&str; 11] = [
    "chat",
    "stream",
    "embeddings",
    "big_embeddings",
    "failover",
    "not_found",
    "bad_request",
    "too_large",
    "rate_limited",
    "unavailable",
    "bad_gateway",
];

fn python() -> PathBuf {
    let p = crate_root().join(".venv/bin/python");
    assert!(
        p.is_file(),
        "no {} (run `make clients`: it installs the pinned OpenAI SDK into .venv)",
        p.display()
    );
    p
}

fn node_dir() -> PathBuf {
    let dir = crate_root().join("crates/testbed/tests/clients/node");
    assert!(
        dir.join("node_modules/openai/package.json").is_file(),
        "the OpenAI Node SDK is not installed in {} (run `make clients`: npm ci)",
        dir.display()
    );
    dir
}

fn python_sdk(mode: &str) {
    let bed = Bed::start(mode);
    let mut cmd = Command::new(python());
    cmd.arg(crate_root().join("crates/testbed/tests/clients/python/sdk_check.py"))
        .arg(bed.base());
    run(&format!("python sdk ({mode})"), cmd, &CHECKS);
    bed.assert_hits(&format!("python sdk ({mode})"));
}

fn node_sdk(mode: &str) {
    let bed = Bed::start(mode);
    let dir = node_dir();
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("sdk_check.mjs"))
        .arg(bed.base())
        .current_dir(&dir);
    run(&format!("node sdk ({mode})"), cmd, &CHECKS);
    bed.assert_hits(&format!("node sdk ({mode})"));
}

#[test]
fn python_sdk_route() {
    python_sdk("route");
}

#[test]
fn python_sdk_dispatch() {
    python_sdk("dispatch");
}

#[test]
fn python_sdk_kong() {
    python_sdk("kong");
}

#[test]
fn node_sdk_route() {
    node_sdk("route");
}

#[test]
fn node_sdk_dispatch() {
    node_sdk("dispatch");
}

#[test]
fn node_sdk_kong() {
    node_sdk("kong");
}

/// curl with its default options (no Accept-Encoding, HTTP/1.1, `-d` for the body), and with
/// `--compressed`, which asks for every coding curl knows.
#[test]
fn curl_with_default_options() {
    for mode in ["route", "dispatch", "kong"] {
        let bed = Bed::start(mode);
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
        let url = bed.gateway.url("/v1/chat/completions");
        for extra in [&[][..], &["--compressed"][..]] {
            let out = Command::new("curl")
                .args(["-sS", "-i", "-H", "content-type: application/json", "-d"])
                .arg(body.to_string())
                .args(extra)
                .arg(&url)
                .output()
                .unwrap_or_else(|e| panic!("cannot run curl: {e}"));
            let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
            assert!(out.status.success(), "curl {extra:?} ({mode}): {text}");
            let (head, body) = text.split_once("\n\n").unwrap();
            assert!(head.starts_with("HTTP/1.1 200"), "{mode} {extra:?}: {head}");
            let head = head.to_ascii_lowercase();
            assert!(head.contains("x-market-router-provider: a"), "{head}");
            if extra.is_empty() {
                assert!(!head.contains("content-encoding"), "{head}");
            } else {
                assert!(head.contains("content-encoding:"), "{head}");
            }
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert!(v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .starts_with("Hello from a"));
        }
        // An error the filter answers, as curl shows it.
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-d"])
            .arg(json!({"model": "no-such-model", "messages": []}).to_string())
            .arg(&url)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "404", "{mode}");
    }
}
