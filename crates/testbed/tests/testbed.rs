//! Tests of the test bed itself: the HTTP toolkit, the mock provider, the market sidecar, and
//! the generated Envoy configuration running in a real Envoy.
//!
//! Needs the example binaries (`cargo test` builds them; after `cargo test --test testbed`
//! alone, run `cargo build --examples` first) and Envoy (`make envoy`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use market_router_testbed as common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(5);

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}]})
}

#[test]
fn http_toolkit_round_trips() {
    let server = Server::spawn(
        "127.0.0.1:0",
        handler(|req: &Request| match req.path() {
            "/echo" => Reply::bytes(200, "application/octet-stream", req.body.clone())
                .with_header("x-method", &req.method)
                .with_header("x-query", req.query().unwrap_or("")),
            "/stream" => Reply::Stream {
                status: 200,
                headers: vec![],
                parts: vec![
                    (Duration::ZERO, b"ab".to_vec()),
                    (Duration::from_millis(20), b"cd".to_vec()),
                ],
                abort_after: None,
            },
            "/nocontent" => Reply::empty(204),
            _ => Reply::text(404, "nope"),
        }),
    )
    .unwrap();

    // Content-Length request body.
    let r = request("POST", &server.url("/echo?x=1"), &[], b"hello", T).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    assert_eq!(r.header("X-Method"), Some("POST"));
    assert_eq!(r.header("x-query"), Some("x=1"));

    // Chunked request body, host:port/path form.
    let raw = format!("127.0.0.1:{}/echo", server.port());
    let r = request(
        "PUT",
        &raw,
        &[("transfer-encoding", "chunked")],
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        T,
    )
    .unwrap();
    assert_eq!(r.text(), "hello world");

    // Chunked response, 204, keep-alive reuse.
    let mut conn = Conn::connect(&format!("http://127.0.0.1:{}", server.port()), T).unwrap();
    for _ in 0..3 {
        let r = conn.send("GET", "/stream", &[], &[], T).unwrap();
        assert_eq!(r.text(), "abcd");
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        let r = conn.send("GET", "/nocontent", &[], &[], T).unwrap();
        assert_eq!((r.status, r.body.len()), (204, 0));
        assert!(conn.is_open());
    }

    // A request that is not HTTP gets a 400, and the server keeps serving.
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.write_all(b"GARBAGE\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(get(&server.url("/missing"), T).unwrap().status, 404);
}

#[test]
fn client_reads_close_delimited_bodies() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
            .unwrap();
    });
    let r = get(&format!("http://127.0.0.1:{port}/"), T).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "until the end"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    t.join().unwrap();
}

#[test]
fn mock_answers_chat_and_counts() {
    let mock = MockProvider::start("alpha", &MockOpts::default()).unwrap();
    let url = mock.url("/v1/chat/completions");
    let r = post_json(&url, &[("x-request-id", "req-1")], &chat("gpt-4o-mini"), T).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-mock-provider"), Some("alpha"));
    let v = r.json().unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["provider"], "alpha");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Hello from alpha (model gpt-4o-mini)"
    );
    let u = &v["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() >= 1);
    assert_eq!(u["completion_tokens"], 8);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + 8)
    );

    // max_tokens caps completion tokens; other endpoints answer in their own shapes.
    let mut body = chat("m2");
    body["max_tokens"] = json!(3);
    let v = post_json(&url, &[], &body, T).unwrap().json().unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let v = post_json(
        &mock.url("/v1/completions"),
        &[],
        &json!({"model": "m3", "prompt": "hi"}),
        T,
    )
    .unwrap()
    .json()
    .unwrap();
    assert_eq!(
        (v["object"].as_str(), v["provider"].as_str()),
        (Some("text_completion"), Some("alpha"))
    );
    let v = post_json(
        &mock.url("/v1/embeddings"),
        &[],
        &json!({"model": "e1", "input": "hi"}),
        T,
    )
    .unwrap()
    .json()
    .unwrap();
    assert_eq!(v["data"][0]["embedding"], json!([0.1, 0.2, 0.3]));
    let v = get(&mock.url("/v1/models"), T).unwrap().json().unwrap();
    assert!(v["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "m2"));

    // Admin calls are not counted; the last request's headers are kept.
    assert_eq!(mock.hits().unwrap(), 4);
    assert_eq!(mock.hits().unwrap(), 4);
    let s = mock.stats().unwrap();
    assert_eq!(s["by_path"]["/v1/chat/completions"], 2);
    assert_eq!(s["last_request"]["model"], "e1");
    let first = post_json(
        &url,
        &[("x-request-id", "req-9"), ("traceparent", "00-abc-def-01")],
        &chat("m"),
        T,
    )
    .unwrap();
    assert_eq!(first.status, 200);
    let last = mock.last_request().unwrap();
    assert_eq!(last["headers"]["x-request-id"], "req-9");
    assert_eq!(last["headers"]["traceparent"], "00-abc-def-01");
    assert_eq!(last["path"], "/v1/chat/completions");
    mock.reset().unwrap();
    assert_eq!(mock.hits().unwrap(), 0);
    assert!(mock
        .log_contents()
        .contains("POST /v1/chat/completions model=gpt-4o-mini status=200"));
}

#[test]
fn mock_streams_sse() {
    let mock = MockProvider::start("beta", &MockOpts::default().stream_timing(150, 10)).unwrap();
    let mut body = chat("llama");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let start = Instant::now();
    let r = post_json(&mock.url("/v1/chat/completions"), &[], &body, T).unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "ttft not applied"
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(r.text().contains("data: [DONE]"));
    assert_eq!(r.sse_content(), "Hello from beta (model llama)");
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 8);
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(
        (first["model"].as_str(), first["provider"].as_str()),
        (Some("llama"), Some("beta"))
    );

    // Without include_usage there is no usage chunk.
    body["stream_options"] = json!({"include_usage": false});
    let r = post_json(&mock.url("/v1/chat/completions"), &[], &body, T).unwrap();
    assert!(!r.text().contains("\"usage\""));
}

#[test]
fn mock_checks_api_key() {
    let mock = MockProvider::start("gamma", &MockOpts::default().api_key("sk-test")).unwrap();
    let url = mock.url("/v1/chat/completions");
    let r = post_json(&url, &[], &chat("m"), T).unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.json().unwrap()["error"]["code"], "invalid_api_key");
    let r = post_json(&url, &[("authorization", "Bearer wrong")], &chat("m"), T).unwrap();
    assert_eq!(r.status, 401);
    let r = post_json(&url, &[("authorization", "Bearer sk-test")], &chat("m"), T).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(mock.hits().unwrap(), 3);
}

#[test]
fn mock_behaviour_changes_at_runtime() {
    let mock = MockProvider::start("delta", &MockOpts::default()).unwrap();
    let url = mock.url("/v1/chat/completions");

    mock.set_behavior(&json!({"status": 503, "retry_after": 2}))
        .unwrap();
    let r = post_json(&url, &[], &chat("m"), T).unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("2"));
    assert_eq!(r.header("x-mock-provider"), Some("delta"));
    assert_eq!(r.json().unwrap()["error"]["type"], "server_error");

    mock.set_behavior(&json!({"status": 429})).unwrap();
    let r = post_json(&url, &[], &chat("m"), T).unwrap();
    assert_eq!((r.status, r.header("retry-after")), (429, None));

    // Full replacement: {} is back to normal.
    mock.set_behavior(&json!({})).unwrap();
    assert_eq!(post_json(&url, &[], &chat("m"), T).unwrap().status, 200);

    mock.set_behavior(&json!({"latency_ms": 120})).unwrap();
    let start = Instant::now();
    assert_eq!(post_json(&url, &[], &chat("m"), T).unwrap().status, 200);
    assert!(start.elapsed() >= Duration::from_millis(120));

    mock.set_behavior(&json!({"hang": true})).unwrap();
    let err = post_json(&url, &[], &chat("m"), Duration::from_millis(300)).unwrap_err();
    assert!(err.contains("timed out"), "{err}");

    mock.set_behavior(&json!({"reset_mid": true})).unwrap();
    let err = post_json(&url, &[], &chat("m"), T).unwrap_err();
    assert!(err.contains("reading response"), "{err}");
    let mut body = chat("m");
    body["stream"] = json!(true);
    assert!(
        post_json(&url, &[], &body, T).is_err(),
        "a cut stream must not parse as complete"
    );

    mock.set_behavior(&json!({"malformed": true})).unwrap();
    let r = post_json(&url, &[], &chat("m"), T).unwrap();
    assert_eq!(
        (r.status, r.header("content-type")),
        (200, Some("application/json"))
    );
    assert!(r.json().is_err());

    assert!(
        mock.set_behavior(&json!({"stauts": 500})).is_err(),
        "unknown fields are refused"
    );
    mock.set_behavior(&json!({})).unwrap();
    let r = request(
        "POST",
        &url,
        &[("content-type", "application/json")],
        b"{not json",
        T,
    )
    .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(mock.hits().unwrap(), 9);
}

#[test]
fn sidecar_serves_snapshot_with_etag() {
    let dir = TempDir::new("sidecar-test").unwrap();
    let file = dir.join("snapshot.json");
    std::fs::write(&file, br#"{"version":1}"#).unwrap();
    let sc = Sidecar::start(&file).unwrap();
    let url = sc.snapshot_url();

    let r = get(&url, T).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, r#"{"version":1}"#));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let etag = r.header("etag").unwrap().to_string();
    assert_eq!(etag, format!("\"{:016x}\"", fnv1a64(br#"{"version":1}"#)));

    let r = request("GET", &url, &[("if-none-match", &etag)], b"", T).unwrap();
    assert_eq!((r.status, r.body.len()), (304, 0));
    assert_eq!(r.header("etag"), Some(etag.as_str()));

    // A changed file is served at once, with a new tag.
    std::fs::write(&file, br#"{"version":2}"#).unwrap();
    let r = request("GET", &url, &[("if-none-match", &etag)], b"", T).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, r#"{"version":2}"#));
    assert_ne!(r.header("etag"), Some(etag.as_str()));

    let s = sc.stats().unwrap();
    assert_eq!(
        (s["requests"].as_u64(), s["not_modified"].as_u64()),
        (Some(3), Some(1))
    );

    sc.set_behavior(&json!({"status": 500})).unwrap();
    assert_eq!(get(&url, T).unwrap().status, 500);
    sc.set_behavior(&json!({"body": "{\"override\":true}"}))
        .unwrap();
    assert_eq!(get(&url, T).unwrap().text(), "{\"override\":true}");
    sc.set_behavior(&json!({})).unwrap();
    std::fs::remove_file(&file).unwrap();
    assert_eq!(get(&url, T).unwrap().status, 503);
    assert_eq!(sc.hits().unwrap(), 6);
    sc.reset().unwrap();
    assert_eq!(sc.hits().unwrap(), 0);
    assert_eq!(get(&sc.url("/other"), T).unwrap().status, 404);
}

#[test]
fn envoy_alone_proxies_to_provider_with_key() {
    let mock = MockProvider::start("alpha", &MockOpts::default().api_key("sk-alpha")).unwrap();
    let cfg = EnvoyConfig::new()
        .provider(ProviderCluster::new("provider_alpha", mock.port()).with_key("sk-alpha"));
    let envoy = Envoy::start(&cfg, 1).unwrap();

    let r = post_json(
        &envoy.url("/v1/chat/completions"),
        &[("x-request-id", "rid-1")],
        &chat("gpt-4o-mini"),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), envoy.log_tail(20));
    assert_eq!(r.json().unwrap()["provider"], "alpha");
    let last = mock.last_request().unwrap();
    assert_eq!(
        last["headers"]["authorization"], "Bearer sk-alpha",
        "the cluster injects the key"
    );
    assert_eq!(last["headers"]["x-request-id"], "rid-1");

    // A client key is overwritten, and streams pass through.
    let mut body = chat("m");
    body["stream"] = json!(true);
    let r = post_json(
        &envoy.url("/v1/chat/completions"),
        &[("authorization", "Bearer client")],
        &body,
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.sse_data().last().map(String::as_str), Some("[DONE]"));
    assert_eq!(r.sse_content(), "Hello from alpha (model m)");
    assert_eq!(mock.hits().unwrap(), 2);
    assert_eq!(
        envoy
            .stat("cluster.provider_alpha.upstream_rq_200")
            .unwrap(),
        Some(2)
    );

    // Upstream errors pass through unchanged without a filter.
    mock.set_behavior(&json!({"status": 503, "retry_after": 1}))
        .unwrap();
    let r = post_json(&envoy.url("/v1/chat/completions"), &[], &chat("m"), T).unwrap();
    assert_eq!((r.status, r.header("retry-after")), (503, Some("1")));
}

#[test]
fn generated_configs_pass_envoy_validate() {
    let dir = TempDir::new("validate-test").unwrap();
    let alone = EnvoyConfig::new()
        .provider(ProviderCluster::new("provider_a", 18001).with_key("sk-\"quoted\" key"))
        .provider(ProviderCluster::new("provider_b", 18002))
        .sidecar("market", 18003)
        .access_log(true)
        .route_timeout(Duration::from_millis(1500));
    let yaml = alone.to_yaml();
    assert!(
        yaml.contains("cluster: \"provider_a\"") && !yaml.contains("cluster_header"),
        "{yaml}"
    );
    alone.validate().unwrap();

    let config = json!({
        "providers": [
            {"name": "a", "cluster": "provider_a", "models": {"gpt-4o-mini": "gpt-4o-mini"}},
            {"name": "b", "cluster": "provider_b", "models": {"gpt-4o-mini": "llama-3.1-8b-instruct"}}
        ],
        "market": {"cluster": "market"}
    })
    .to_string();
    let routed = alone.clone().market_router(&config);
    let yaml = routed.to_yaml();
    assert!(
        yaml.contains("cluster_header: \"x-market-router-cluster\""),
        "{yaml}"
    );
    assert!(
        yaml.contains("envoy.filters.http.wasm")
            && yaml.contains("allow_on_headers_stop_iteration: true")
    );

    // Validation instantiates the module, so it needs a real one: a missing one fails the
    // test (`make build`), it is not skipped.
    let wasm = wasm_path();
    assert!(
        wasm.is_file(),
        "{} not built: run `make build` (or set MR_WASM)",
        wasm.display()
    );
    routed.validate().unwrap();
    let refused = alone
        .clone()
        .market_router(r#"{"providers": [], "bogus_field": 1}"#)
        .validate()
        .unwrap_err();
    assert!(refused.contains("market_router"), "{refused}");
    let dummy = dir.join("dummy.wasm");
    std::fs::write(&dummy, b"not wasm").unwrap();
    let bogus = alone.filter(Filter::Wasm {
        path: dummy,
        config_json: "{}".into(),
        root_id: "x".into(),
    });
    assert!(bogus.validate().is_err(), "validate mode loads the module");
}

#[test]
fn envoy_start_failure_reports_the_log() {
    let dir = TempDir::new("bad-wasm").unwrap();
    let dummy = dir.join("dummy.wasm");
    std::fs::write(&dummy, b"not wasm").unwrap();
    let cfg = EnvoyConfig::new()
        .provider(ProviderCluster::new("p", free_port()))
        .filter(Filter::Wasm {
            path: dummy,
            config_json: "{}".into(),
            root_id: "x".into(),
        });
    let start = Instant::now();
    let err = Envoy::start(&cfg, 1)
        .err()
        .expect("Envoy must refuse a module that is not wasm");
    assert!(
        err.contains("Envoy failed to start") && err.contains("wasm"),
        "{err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "exit is detected, not waited out"
    );
}
