//! The foundation, through a real Envoy running the built filter in route mode: each model
//! reaches the provider that serves it (with its own model id and a correct body length), the
//! three LLM paths are routed and everything else passes through, bad requests get OpenAI-style
//! errors without reaching any provider, an invalid plugin configuration is refused with one
//! log line, and credentials stay with the host.
//!
//! Needs the example binaries (`cargo build --examples`), the filter (`make build`) and Envoy
//! (`make envoy`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use market_router_testbed as common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(5);

/// Client model of provider `a`, and the id `a` knows it by.
const MODEL_A: &str = "llama-3.1-70b";
const MODEL_A_ID: &str = "meta/llama-70b";
/// Served by provider `b` under the same name.
const MODEL_B: &str = "gpt-4o-mini";

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}]})
}

/// Two providers, no market: `a` serves MODEL_A (rewritten), `b` serves MODEL_B.
fn two_provider_config(extra: Value) -> String {
    let mut c = json!({
        "providers": [
            {"name": "a", "cluster": "provider_a", "models": {MODEL_A: MODEL_A_ID}},
            {"name": "b", "cluster": "provider_b", "models": {MODEL_B: MODEL_B}}
        ],
        "failover": {"attempt_timeout_ms": 3000, "deadline_ms": 6000}
    });
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    c.to_string()
}

/// Two mocks (a, b) behind an Envoy running the filter with `extra` config fields.
fn setup(extra: Value) -> (MockProvider, MockProvider, Envoy) {
    let a = MockProvider::start("a", &MockOpts::default()).unwrap();
    let b = MockProvider::start("b", &MockOpts::default()).unwrap();
    let cfg = EnvoyConfig::new()
        .provider(ProviderCluster::new("provider_a", a.port()))
        .provider(ProviderCluster::new("provider_b", b.port()))
        .route_timeout(Duration::from_secs(10))
        .market_router(&two_provider_config(extra));
    let envoy = Envoy::start(&cfg, 1).unwrap();
    (a, b, envoy)
}

fn hits(a: &MockProvider, b: &MockProvider) -> (u64, u64) {
    (a.hits().unwrap(), b.hits().unwrap())
}

/// Names of the `x-market-router-*` response headers.
fn our_headers(r: &Response) -> Vec<&str> {
    r.headers
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.starts_with("x-market-router-"))
        .collect()
}

/// Checks a local error answer: status, content type, OpenAI shape, exact code. Returns the
/// message.
fn assert_api_error(r: &Response, status: u16, code: &str, what: &str) -> String {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{what}: content type"
    );
    let v = r.json().unwrap_or_else(|e| panic!("{what}: {e}"));
    let e = &v["error"];
    assert_eq!(e["code"], code, "{what}: {v}");
    assert!(
        e["type"].as_str().is_some_and(|t| !t.is_empty()),
        "{what}: error.type: {v}"
    );
    let msg = e["message"].as_str().unwrap_or("").to_string();
    assert!(!msg.is_empty(), "{what}: error.message: {v}");
    assert_eq!(
        v.as_object().map(|o| o.len()),
        Some(1),
        "{what}: only `error` at the top: {v}"
    );
    msg
}

/// One chunk of a chunked body.
fn chunk(bytes: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", bytes.len()).into_bytes();
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
    out
}

/// A chunked transfer-encoding of `body` in pieces of `piece` bytes.
fn chunked(body: &[u8], piece: usize) -> Vec<u8> {
    let mut out: Vec<u8> = body.chunks(piece).flat_map(chunk).collect();
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A chat body of at least `size` bytes.
fn big_chat(model: &str, size: usize) -> Vec<u8> {
    let mut v = chat(model);
    v["messages"][0]["content"] = json!("x".repeat(size));
    v.to_string().into_bytes()
}

fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy
        .stat_settled(&format!("wasmcustom.{name}"))
        .unwrap()
        .unwrap_or_else(|| panic!("no stat wasmcustom.{name}"))
}

#[test]
fn each_model_reaches_its_provider_with_its_own_id() {
    let (a, b, envoy) = setup(json!({}));

    // Model A → provider a, rewritten to a's id.
    let body_a = chat(MODEL_A).to_string();
    let r = request(
        "POST",
        &envoy.url("/v1/chat/completions"),
        &[("content-type", "application/json")],
        body_a.as_bytes(),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), envoy.log_tail(30));
    assert_eq!(r.header("x-market-router-provider"), Some("a"));
    assert_eq!(r.header("x-market-router-attempts"), Some("1"));
    assert_eq!(r.header("x-mock-provider"), Some("a"));
    let v = r.json().unwrap();
    assert_eq!(v["provider"], "a");
    assert_eq!(v["model"], MODEL_A_ID, "the provider saw its own model id");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        format!("Hello from a (model {MODEL_A_ID})")
    );
    assert_eq!(hits(&a, &b), (1, 0));

    // The rewritten body has the right length: the mock read all of it and parsed it.
    let last = a.last_request().unwrap();
    assert_eq!(last["model"], MODEL_A_ID);
    assert_eq!(last["path"], "/v1/chat/completions");
    let want_len = body_a.len() + MODEL_A_ID.len() - MODEL_A.len();
    assert_eq!(last["body_bytes"], want_len, "{last}");
    assert_eq!(
        last["headers"]["content-length"],
        want_len.to_string(),
        "{last}"
    );

    // Model B → provider b, same id, body untouched.
    let body_b = chat(MODEL_B).to_string();
    let r = request(
        "POST",
        &envoy.url("/v1/chat/completions"),
        &[("content-type", "application/json")],
        body_b.as_bytes(),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-market-router-provider"), Some("b"));
    assert_eq!(r.header("x-market-router-attempts"), Some("1"));
    assert_eq!(r.json().unwrap()["model"], MODEL_B);
    assert_eq!(hits(&a, &b), (1, 1));
    let last = b.last_request().unwrap();
    assert_eq!(last["body_bytes"], body_b.len());
    assert_eq!(last["headers"]["content-length"], body_b.len().to_string());

    // A few more of each, interleaved, on one keep-alive connection: never crossed.
    let mut conn = Conn::connect(&envoy.url(""), T).unwrap();
    for i in 0..6 {
        let (model, want) = if i % 2 == 0 {
            (MODEL_A, "a")
        } else {
            (MODEL_B, "b")
        };
        let r = conn
            .send(
                "POST",
                "/v1/chat/completions",
                &[("content-type", "application/json")],
                chat(model).to_string().as_bytes(),
                T,
            )
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-market-router-provider"), Some(want));
        assert_eq!(r.json().unwrap()["provider"], want);
        assert!(conn.is_open());
    }
    assert_eq!(hits(&a, &b), (4, 4));
    assert_eq!(stat(&envoy, "market_router.requests"), 8);
    assert_eq!(stat(&envoy, "market_router.provider.a.attempts"), 4);
    assert_eq!(stat(&envoy, "market_router.provider.b.success"), 4);
}

#[test]
fn llm_paths_are_routed_and_other_paths_pass_through() {
    let (a, b, envoy) = setup(json!({}));

    let cases = [
        ("/v1/chat/completions", chat(MODEL_A), "chat.completion"),
        (
            "/v1/completions",
            json!({"model": MODEL_A, "prompt": "Say hello"}),
            "text_completion",
        ),
        (
            "/v1/embeddings",
            json!({"model": MODEL_A, "input": "hello"}),
            "list",
        ),
    ];
    for (n, (path, body, object)) in cases.iter().enumerate() {
        let r = post_json(&envoy.url(path), &[], body, T).unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.header("x-market-router-provider"), Some("a"), "{path}");
        assert_eq!(r.header("x-market-router-attempts"), Some("1"), "{path}");
        let v = r.json().unwrap();
        assert_eq!(v["object"], *object, "{path}: {v}");
        assert_eq!(v["model"], MODEL_A_ID, "{path}: rewritten");
        let last = a.last_request().unwrap();
        assert_eq!(last["path"], *path);
        assert_eq!(last["model"], MODEL_A_ID);
        assert_eq!(a.hits().unwrap(), n as u64 + 1, "{path}");
    }
    // The same paths with a query string are routed too.
    let r = post_json(
        &envoy.url("/v1/chat/completions?trace=1"),
        &[],
        &chat(MODEL_B),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-market-router-provider"), Some("b"));
    assert_eq!(hits(&a, &b), (3, 1));

    // Another path: the filter does not route it, and the client's own cluster header picks
    // nothing: the header is stripped from every request and only the LLM paths are routed
    // by it, so Envoy answers 404 and no provider is reached.
    let seen = |m: &MockProvider| m.seen().unwrap();
    let (seen_a, seen_b) = (seen(&a), seen(&b));
    for (method, path, cluster) in [
        ("GET", "/v1/models", "provider_b"),
        ("POST", "/v1/models", "provider_b"),
        ("GET", "/v1/chat/completions", "provider_a"),
    ] {
        let r = request(
            method,
            &envoy.url(path),
            &[
                ("x-market-router-cluster", cluster),
                ("content-type", "application/json"),
            ],
            chat("no-such-model").to_string().as_bytes(),
            T,
        )
        .unwrap();
        assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
        assert!(our_headers(&r).is_empty(), "{:?}", r.headers);
    }
    assert_eq!(
        (seen(&a), seen(&b)),
        (seen_a, seen_b),
        "no provider reached"
    );

    // Passthrough requests are not LLM requests: the mocks did not count them.
    assert_eq!(hits(&a, &b), (3, 1));
    assert_eq!(stat(&envoy, "market_router.requests"), 4);
}

#[test]
fn bad_requests_get_openai_errors_and_reach_no_provider() {
    let (a, b, envoy) = setup(json!({"limits": {"max_body_bytes": 1024}}));
    let url = envoy.url("/v1/chat/completions");
    let json_ct = [("content-type", "application/json")];
    let send = |body: &[u8]| request("POST", &url, &json_ct, body, T).unwrap();

    let r = send(b"{\"model\": \"gpt-4o-mini\", \"messages\": [");
    assert_api_error(&r, 400, "invalid_json", "truncated JSON");
    let r = send(b"model=gpt-4o-mini");
    assert_api_error(&r, 400, "invalid_json", "form body");
    let r = send(br#"{"messages": [{"role": "user", "content": "hi"}]}"#);
    let msg = assert_api_error(&r, 400, "model_missing", "no model");
    assert!(msg.contains("model"), "{msg}");
    let r = send(br#"{"model": 42, "messages": []}"#);
    assert_api_error(&r, 400, "model_missing", "model is a number");
    let r = send(br#"{"model": ["gpt-4o-mini"], "messages": []}"#);
    assert_api_error(&r, 400, "model_missing", "model is an array");
    let r = send(b"");
    assert_api_error(&r, 400, "invalid_json", "empty body");

    let r = send(chat("gpt-5-imaginary").to_string().as_bytes());
    let msg = assert_api_error(&r, 404, "model_not_found", "unknown model");
    assert!(msg.contains("gpt-5-imaginary"), "names the model: {msg}");
    assert!(our_headers(&r).is_empty(), "{:?}", r.headers);

    // Over limits.max_body_bytes, announced by Content-Length...
    let big = big_chat(MODEL_B, 2000);
    assert!(big.len() > 1024);
    let r = send(&big);
    let msg = assert_api_error(&r, 413, "request_too_large", "Content-Length body");
    assert!(msg.contains("1024"), "names the limit: {msg}");
    // ...and found while a chunked body streams in.
    let hs = [
        ("content-type", "application/json"),
        ("transfer-encoding", "chunked"),
    ];
    let r = request("POST", &url, &hs, &chunked(&big, 300), T).unwrap();
    assert_api_error(&r, 413, "request_too_large", "chunked body");
    // ...also before the body has ended: the client sends two chunks over the limit, keeps
    // the stream open, and gets the 413 without sending the last chunk.
    let (status, head, body) = partial_chunked_upload(&envoy, &big[..1400]);
    assert_eq!(status, 413, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "request_too_large", "{v}");

    assert_eq!(hits(&a, &b), (0, 0), "no provider saw a bad request");
    assert_eq!(stat(&envoy, "market_router.rejected.bad_request"), 6);
    assert_eq!(stat(&envoy, "market_router.rejected.unknown_model"), 1);
    assert_eq!(stat(&envoy, "market_router.rejected.too_large"), 3);

    // Control: a chunked body under the limit is routed, so the 413 above was about size.
    let small = chat(MODEL_B).to_string().into_bytes();
    let r = request("POST", &url, &hs, &chunked(&small, 16), T).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-market-router-provider"), Some("b"));
    assert_eq!(hits(&a, &b), (0, 1));
    assert_eq!(b.last_request().unwrap()["body_bytes"], small.len());
}

/// Sends a chunked request head and `body` as two chunks, with a pause between them so they
/// arrive separately, without the terminating chunk; returns the status line's code, the
/// response head and body.
fn partial_chunked_upload(envoy: &Envoy, body: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", envoy.port())).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
        envoy.port()
    );
    s.write_all(head.as_bytes()).unwrap();
    let (first, second) = body.split_at(body.len() / 2);
    s.write_all(&chunk(first)).unwrap();
    s.flush().unwrap();
    // Shapes the traffic (two reads on Envoy's side); nothing is awaited here.
    thread::sleep(Duration::from_millis(50));
    // Envoy may already have answered and closed: a failed write is fine, the answer is read below.
    let _ = s.write_all(&chunk(second));
    let mut r = BufReader::new(s);
    let mut head = String::new();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "closed in head: {head}"
        );
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap();
            }
        }
        head.push_str(&line);
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

/// Runs Envoy on a configuration it is expected to refuse; returns its whole log once it has
/// exited. Spawned here rather than with `Envoy::start` to read the full log and exit status.
fn refused_run(cfg: &EnvoyConfig, concurrency: u32) -> String {
    let dir = TempDir::new("envoy-refused").unwrap();
    let yaml = dir.join("envoy.yaml");
    std::fs::write(&yaml, cfg.to_yaml()).unwrap();
    let mut cmd = Command::new(envoy_bin().unwrap());
    cmd.arg("-c")
        .arg(&yaml)
        .arg("--concurrency")
        .arg(concurrency.to_string())
        .arg("--disable-hot-restart")
        .arg("--admin-address-path")
        .arg(dir.join("admin-address"))
        .arg("-l")
        .arg("warning")
        .arg("--component-log-level")
        .arg("wasm:info");
    let mut proc = Proc::spawn_in("envoy", &mut cmd, dir).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Err(e) = proc.check_running() {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "Envoy kept running on a bad configuration; log:\n{}",
            proc.log_contents()
        );
        thread::sleep(Duration::from_millis(20));
    };
    assert!(
        exit.contains("exited with exit status: 1"),
        "Envoy must exit with status 1: {exit}"
    );
    proc.log_contents()
}

/// Lines of `log` that report an invalid configuration, as the text after the prefix.
fn config_error_lines(log: &str) -> Vec<String> {
    const PREFIX: &str = "market-router: invalid plugin configuration: ";
    log.lines()
        .filter_map(|l| {
            l.split_once(PREFIX)
                .map(|(_, rest)| rest.trim().to_string())
        })
        .collect()
}

fn refused_cfg(config_json: &str) -> EnvoyConfig {
    EnvoyConfig::new()
        .provider(ProviderCluster::new("c", free_port()))
        .market_router(config_json)
}

#[test]
fn invalid_plugin_configuration_is_refused_with_one_line() {
    const STRATEGY_LINE: &str = "field `routing.strategy` = \"fastes\": expected one of value, cheapest, fastest, most_reliable, balanced, weighted";
    let bad = r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"routing":{"strategy":"fastes"}}"#;
    let cfg = refused_cfg(bad);

    // Envoy 1.40 configures the plugin on the base VM on the main thread while loading the
    // static listener; on_configure returning false fails that ("Failed to configure base Wasm
    // plugin"), the fail-closed plugin cannot be created, and the server exits with status 1
    // before the listener exists or any worker VM is cloned (only the admin endpoint was up for
    // a moment). So the line appears exactly once even with two workers: one VM got the
    // configuration.
    let log = refused_run(&cfg, 2);
    assert_eq!(
        config_error_lines(&log),
        vec![STRATEGY_LINE.to_string()],
        "one line naming the field, value and allowed values; log:\n{log}"
    );
    assert!(
        log.contains("Unable to create Wasm plugin market_router"),
        "{log}"
    );

    // The test bed's start reports the failure (with the log) instead of hanging on /ready.
    let err = Envoy::start(&cfg, 1)
        .err()
        .expect("Envoy must not come up on a bad plugin configuration");
    assert!(err.contains("Envoy failed to start"), "{err}");
    assert!(err.contains(STRATEGY_LINE), "{err}");

    // Validate mode instantiates the module and runs on_configure too.
    let err = cfg
        .validate()
        .expect_err("envoy --mode validate must reject it");
    assert_eq!(
        config_error_lines(&err),
        vec![STRATEGY_LINE.to_string()],
        "{err}"
    );

    // Other mistakes, each refused with its own line.
    let cases: &[(&str, &str, bool)] = &[
        (
            r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"routing":{"stratgy":"fastest"}}"#,
            "field `routing.stratgy` = (not shown): unknown field; allowed: strategy, ",
            false,
        ),
        (
            r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"failover":{"max_attempts":0}}"#,
            "field `failover.max_attempts` = 0: expected an integer in 1..=10",
            true,
        ),
        (
            r#"{"market":{"cluster":"s"}}"#,
            "field `providers` = (missing): required",
            true,
        ),
        (
            r#"{"providers":[{"name":"a","cluster":"c","models":{"m":"m"}}],"limits":{"max_body_bytes":"1MB"}}"#,
            "field `limits.max_body_bytes` = \"1MB\": expected an integer in 1..=67108864",
            true,
        ),
    ];
    // Two Envoys at a time: each run is short and mostly module compilation.
    let logs: Vec<String> = cases
        .chunks(2)
        .flat_map(|pair| {
            thread::scope(|sc| {
                let runs: Vec<_> = pair
                    .iter()
                    .map(|(doc, _, _)| sc.spawn(move || refused_run(&refused_cfg(doc), 1)))
                    .collect();
                runs.into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for ((doc, want, exact), log) in cases.iter().zip(&logs) {
        let lines = config_error_lines(log);
        assert_eq!(lines.len(), 1, "{doc}: one line; log:\n{log}");
        if *exact {
            assert_eq!(lines[0], *want, "{doc}");
        } else {
            assert!(lines[0].starts_with(want), "{doc}: {}", lines[0]);
        }
    }
}

#[test]
fn credentials_stay_with_the_host() {
    const KEY: &str = "sk-cluster-b-7f3a";
    const CLIENT: &str = "Bearer client-token-91c2";
    let a = MockProvider::start("a", &MockOpts::default()).unwrap();
    // b refuses anything without its own key.
    let b = MockProvider::start("b", &MockOpts::default().api_key(KEY)).unwrap();
    let cfg = EnvoyConfig::new()
        .provider(ProviderCluster::new("provider_a", a.port()))
        .provider(ProviderCluster::new("provider_b", b.port()).with_key(KEY))
        .route_timeout(Duration::from_secs(10))
        .market_router(&two_provider_config(json!({})));
    let envoy = Envoy::start(&cfg, 1).unwrap();
    let hs = [("authorization", CLIENT), ("x-request-id", "rid-cred-1")];

    // No key on a's cluster: the client's authorization is not passed on.
    let r = post_json(&envoy.url("/v1/chat/completions"), &hs, &chat(MODEL_A), T).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-market-router-provider"), Some("a"));
    let last = a.last_request().unwrap();
    let got = &last["headers"];
    assert!(
        got.get("authorization").is_none(),
        "the client's authorization reached the provider"
    );
    assert_eq!(got["x-request-id"], "rid-cred-1", "other headers do pass");

    // b's cluster sets its own key: b accepts (it answers 401 otherwise) and sees that key.
    let r = post_json(&envoy.url("/v1/chat/completions"), &hs, &chat(MODEL_B), T).unwrap();
    assert_eq!(r.status, 200, "b refused the request: {}", r.text());
    assert_eq!(r.header("x-market-router-provider"), Some("b"));
    let last = b.last_request().unwrap();
    let auth = last["headers"]["authorization"].as_str();
    assert!(auth.is_some(), "no authorization reached b");
    assert!(
        auth == Some(format!("Bearer {KEY}").as_str()),
        "b did not receive exactly its cluster key"
    );
    assert!(
        !last["headers"].to_string().contains("client-token"),
        "the client's token leaked to b"
    );
    // The same without a client authorization at all.
    let r = post_json(
        &envoy.url("/v1/embeddings"),
        &[],
        &json!({"model": MODEL_B, "input": "x"}),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(hits(&a, &b), (1, 2));
}
