//! A small bed for the suites that check promises end to end (`circuit`, `workers`,
//! `promises`): mock providers named `a`, `b`, ... behind clusters `provider_<name>`, an
//! optional market sidecar (cluster `market_sidecar`), and Envoy running the filter with a
//! configuration the test writes itself. Included with `#[path = "support/bed.rs"] mod bed;`
//! next to `mod common;`.

#![allow(dead_code)]

use crate::common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

/// Client timeout of one request.
pub const T: Duration = Duration::from_secs(10);
/// Cluster name of the sidecar.
pub const SIDECAR_CLUSTER: &str = "market_sidecar";
/// A failover mode a test may give [`Bed::start`] and [`Bed::start_spec`] beside `route`,
/// `dispatch` and `envoy`: dispatch mode in Kong's wasm host (the scenario's Kong twin).
pub const KONG: &str = "kong";

/// Cluster of provider `name`.
pub fn cluster(name: &str) -> String {
    format!("provider_{name}")
}

/// A provider entry serving `model` under its own name, with a static offer at `price`
/// (USD per Mtok in and out) and a 300 ms median time to first token.
pub fn static_provider(name: &str, model: &str, price: f64) -> Value {
    json!({
        "name": name,
        "cluster": cluster(name),
        "models": {model: model},
        "static_offer": {
            "price": {"input_per_mtok": price, "output_per_mtok": price},
            "latency_ms": {"ttft_p50": 300},
            "uptime": 0.99
        }
    })
}

/// The usual chat body.
pub fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 50})
}

/// Replaces a snapshot file atomically.
pub fn write_snapshot(path: &std::path::Path, doc: &Value) {
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_vec(doc).unwrap()).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// What stands behind one provider cluster.
pub enum Up {
    /// A mock provider started with these options.
    Mock(MockOpts),
    /// A mock provider started with these options, its cluster speaking HTTP/2 to it (h2c).
    MockH2c(MockOpts),
    /// A port held bound but never listening: connections are refused.
    Dead,
}

/// Mocks, an optional sidecar and Envoy (or Kong's wasm host: [`Bed::start_kong`]) with the
/// filter.
pub struct Bed {
    // Dropped first: the host never sees its upstreams vanish mid-test.
    pub gateway: Gateway,
    pub sidecar: Option<Sidecar>,
    pub mocks: BTreeMap<String, MockProvider>,
    pub snapshot: Option<PathBuf>,
    _dead: Vec<RefusingPort>,
    _dir: TempDir,
}

/// How to start a [`Bed`].
pub struct Spec<'a> {
    /// Providers, in cluster order, and what stands behind each.
    pub ups: Vec<(&'a str, Up)>,
    /// The filter configuration (its `market.cluster` must be [`SIDECAR_CLUSTER`] when a
    /// snapshot is given).
    pub config: Value,
    /// Snapshot the sidecar serves (no sidecar when `None`).
    pub snapshot: Option<Value>,
    /// Envoy worker threads.
    pub concurrency: u32,
    /// Path the sidecar serves the snapshot at (its default when `None`).
    pub sidecar_path: Option<&'a str>,
}

impl Bed {
    /// Healthy mocks for `names`, no sidecar.
    pub fn start(names: &[&str], config: Value, concurrency: u32) -> Bed {
        Bed::start_spec(
            Spec {
                ups: names
                    .iter()
                    .map(|n| (*n, Up::Mock(MockOpts::default())))
                    .collect(),
                config,
                snapshot: None,
                concurrency,
                sidecar_path: None,
            },
            |c| c,
        )
    }

    /// Starts everything in `spec`; `tweak` adjusts the Envoy bootstrap. With failover mode
    /// [`KONG`] the filter runs in Kong's wasm host instead (`tweak` unused, `concurrency`
    /// nginx workers): see [`Bed::kong_config`].
    pub fn start_spec(spec: Spec<'_>, tweak: impl FnOnce(EnvoyConfig) -> EnvoyConfig) -> Bed {
        let kong = spec.config["failover"]["mode"] == KONG;
        let dir = TempDir::new("bed").unwrap();
        let mut mocks = BTreeMap::new();
        let mut dead = Vec::new();
        let mut ports = BTreeMap::new();
        let mut cfg = EnvoyConfig::new();
        for (name, up) in spec.ups {
            let mock = match up {
                Up::Mock(opts) => Some((opts, false)),
                Up::MockH2c(opts) => Some((opts, true)),
                Up::Dead => None,
            };
            let (port, h2c) = match mock {
                Some((opts, h2c)) => {
                    let m = MockProvider::start(name, &opts).unwrap();
                    let port = m.port();
                    mocks.insert(name.to_string(), m);
                    (port, h2c)
                }
                None => {
                    let r = RefusingPort::bind().unwrap();
                    let port = r.port();
                    dead.push(r);
                    (port, false)
                }
            };
            assert!(
                !(kong && h2c),
                "Kong's host calls providers over HTTP/1.1 only"
            );
            ports.insert(cluster(name), port);
            let c = ProviderCluster::new(&cluster(name), port);
            cfg = cfg.provider(if h2c { c.h2c() } else { c });
        }
        let (sidecar, snapshot) = match &spec.snapshot {
            Some(doc) => {
                let path = dir.join("snapshot.json");
                write_snapshot(&path, doc);
                let sc = match spec.sidecar_path {
                    Some(p) => Sidecar::start_at(&path, p).unwrap(),
                    None => Sidecar::start(&path).unwrap(),
                };
                cfg = cfg.sidecar(SIDECAR_CLUSTER, sc.port());
                (Some(sc), Some(path))
            }
            None => (None, None),
        };
        if kong {
            let config = Bed::kong_config(spec.config, &ports, sidecar.as_ref().map(Sidecar::port));
            let mut kc = KongConfig::new()
                .workers(spec.concurrency as usize)
                .market_router(&config.to_string());
            // Shared-data keys `<prefix>/...` live in the shm_kv zone named `<prefix>`.
            if let Some(prefix) = config["shared_data_prefix"].as_str() {
                kc.shm_kv.push((prefix.to_string(), "16m".to_string()));
            }
            let kong = Kong::start(&kc).unwrap();
            return Bed {
                gateway: Gateway::Kong(kong),
                sidecar,
                mocks,
                snapshot,
                _dead: dead,
                _dir: dir,
            };
        }
        let cfg = tweak(cfg.market_router(&spec.config.to_string()));
        let envoy = Envoy::start(&cfg, spec.concurrency).unwrap();
        if spec.concurrency > 1 {
            assert_eq!(
                envoy.stat("server.concurrency").unwrap(),
                Some(u64::from(spec.concurrency))
            );
        }
        Bed {
            gateway: Gateway::Envoy(envoy),
            sidecar,
            mocks,
            snapshot,
            _dead: dead,
            _dir: dir,
        }
    }

    /// Kong's wasm host with `workers` nginx workers and the filter in dispatch mode, in front
    /// of healthy mocks for `names`.
    pub fn start_kong(names: &[&str], mut config: Value, workers: usize) -> Bed {
        config["failover"]["mode"] = json!(KONG);
        Bed::start(names, config, workers as u32)
    }

    /// `config` as Kong's host needs it (it has no clusters): each cluster in `ports` becomes
    /// `127.0.0.1:<port>`, the sidecar's cluster the sidecar's address, and failover mode
    /// [`KONG`] `dispatch`.
    fn kong_config(
        mut config: Value,
        ports: &BTreeMap<String, u16>,
        sidecar: Option<u16>,
    ) -> Value {
        for p in config["providers"].as_array_mut().into_iter().flatten() {
            if let Some(port) = p["cluster"].as_str().and_then(|c| ports.get(c)) {
                p["cluster"] = json!(format!("127.0.0.1:{port}"));
            }
        }
        if let (Some(port), true) = (sidecar, config["market"]["cluster"] == SIDECAR_CLUSTER) {
            config["market"]["cluster"] = json!(format!("127.0.0.1:{port}"));
        }
        config["failover"]["mode"] = json!("dispatch");
        config
    }

    /// The Envoy this bed runs (fails on a Kong bed).
    pub fn envoy(&self) -> &Envoy {
        self.gateway
            .envoy()
            .unwrap_or_else(|| panic!("this bed runs Kong's wasm host, not Envoy"))
    }

    /// Whether this bed runs Kong's wasm host.
    pub fn is_kong(&self) -> bool {
        self.gateway.envoy().is_none()
    }

    /// Times provider `name`'s circuit opened, polled until it reaches `want` (5 s at most):
    /// Envoy's counter `provider.<name>.circuit_open`, or on Kong (no stats endpoint) the
    /// filter's log lines saying so.
    pub fn wait_circuit_opened(&self, name: &str, want: u64) -> u64 {
        if !self.is_kong() {
            return self.wait_counter(&format!("provider.{name}.circuit_open"), want);
        }
        let line = format!("circuit opened for provider {name}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = self.log_lines(&line).len() as u64;
            if n >= want || Instant::now() >= deadline {
                return n;
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn mock(&self, name: &str) -> &MockProvider {
        self.mocks
            .get(name)
            .unwrap_or_else(|| panic!("no mock {name}"))
    }

    /// LLM requests mock `name` received.
    pub fn hits(&self, name: &str) -> u64 {
        self.mock(name).hits().unwrap()
    }

    /// Replaces mock `name`'s behaviour.
    pub fn behave(&self, name: &str, behavior: Value) {
        self.mock(name).set_behavior(&behavior).unwrap();
    }

    /// Replaces the snapshot the sidecar serves.
    pub fn write(&self, doc: &Value) {
        write_snapshot(self.snapshot.as_ref().expect("a bed with a sidecar"), doc);
    }

    /// POSTs `body` to `path` on Envoy's listener (a fresh connection each time).
    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &Value) -> Response {
        post_json(&self.gateway.url(path), headers, body, T)
            .unwrap_or_else(|e| panic!("request failed: {e}\n{}", self.gateway.log_tail(30)))
    }

    /// A chat request for `model`.
    pub fn chat(&self, model: &str, headers: &[(&str, &str)]) -> Response {
        self.post("/v1/chat/completions", headers, &chat_body(model))
    }

    /// A chat request that must succeed; returns the provider that answered (the header,
    /// checked against the mock's own answer).
    pub fn routed(&self, model: &str, headers: &[(&str, &str)]) -> String {
        let r = self.chat(model, headers);
        assert_eq!(r.status, 200, "{}\n{}", show(&r), self.gateway.log_tail(20));
        let p = r
            .header("x-market-router-provider")
            .unwrap_or_else(|| panic!("no provider header: {}", show(&r)))
            .to_string();
        assert_eq!(r.json().unwrap()["provider"], p.as_str(), "{}", show(&r));
        p
    }

    /// GET on the listener.
    pub fn get(&self, path: &str) -> Response {
        get(&self.gateway.url(path), T).unwrap()
    }

    /// The filter's counter `market_router.<name>`, once settled; fails when it does not exist.
    pub fn counter(&self, name: &str) -> u64 {
        self.envoy()
            .counter(&format!("wasmcustom.market_router.{name}"))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The filter's counter `market_router.<name>` on Envoy; `None` on Kong's host (no stats
    /// endpoint), where a test leaves the check out.
    pub fn counter_on_envoy(&self, name: &str) -> Option<u64> {
        (!self.is_kong()).then(|| self.counter(name))
    }

    /// Polls counter `market_router.<name>` until it reaches `want` (5 s at most) and
    /// returns the last value read; fails when the counter does not exist.
    pub fn wait_counter(&self, name: &str, want: u64) -> u64 {
        let full = format!("wasmcustom.market_router.{name}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = self
                .envoy()
                .stat(&full)
                .unwrap()
                .unwrap_or_else(|| panic!("Envoy has no stat `{full}`"));
            if v >= want || Instant::now() >= deadline {
                return v;
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// Connections each worker accepted, from Envoy's per-worker listener stats.
    pub fn connections_by_worker(&self) -> BTreeMap<String, u64> {
        let r = get(
            &self
                .envoy()
                .admin_url("/stats?filter=worker_[0-9]+\\.downstream_cx_total$"),
            T,
        )
        .unwrap();
        r.text()
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                let worker = k.split('.').find(|p| p.starts_with("worker_"))?;
                Some((worker.to_string(), v.trim().parse().ok()?))
            })
            .fold(BTreeMap::new(), |mut m, (w, n): (String, u64)| {
                *m.entry(w).or_insert(0) += n;
                m
            })
    }

    /// Workers that accepted at least one connection.
    pub fn busy_workers(&self) -> usize {
        self.connections_by_worker()
            .values()
            .filter(|n| **n > 0)
            .count()
    }

    /// Lines of the host's log (Envoy's, or nginx's error.log) containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        let log = match &self.gateway {
            Gateway::Envoy(e) => e.log_contents(),
            Gateway::Kong(k) => k.error_log(),
        };
        log.lines()
            .filter(|l| l.contains(needle))
            .map(String::from)
            .collect()
    }
}

/// Status, our headers and body, for assertion messages.
pub fn show(r: &Response) -> String {
    format!(
        "status {} provider {:?} attempts {:?} body {}",
        r.status,
        r.header("x-market-router-provider"),
        r.header("x-market-router-attempts"),
        r.text()
    )
}

/// Polls `cond` every 25 ms until it holds or `within` passes; returns whether it held.
pub fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(25));
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A complete, valid market offer.
pub fn offer(provider: &str, model: &str, input: f64, output: f64) -> Value {
    json!({
        "provider": provider, "model": model,
        "price": {"input_per_mtok": input, "output_per_mtok": output},
        "latency_ms": {"ttft_p50": 300.0, "ttft_p95": 600.0}, "uptime": 0.99,
        "availability": "online", "provider_type": "company", "region": "us-east"
    })
}

/// A version-1 snapshot generated now.
pub fn snapshot(offers: &[Value]) -> Value {
    json!({"version": 1, "generated_at_ms": now_ms(), "offers": offers})
}

/// A provider entry without a static offer.
pub fn market_provider(name: &str, models: &[&str]) -> Value {
    let models: serde_json::Map<String, Value> =
        models.iter().map(|m| (m.to_string(), json!(m))).collect();
    json!({"name": name, "cluster": cluster(name), "models": models})
}

/// The `market` section for the bed's sidecar.
pub fn market_section(refresh_ms: u64) -> Value {
    json!({"cluster": SIDECAR_CLUSTER, "refresh_ms": refresh_ms, "max_age_ms": 600_000, "timeout_ms": 2000})
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.gateway.assert_no_crash();
    }
}
