//! An OpenAI-compatible mock LLM provider with injectable faults, for tests, benchmarks and
//! the demo.
//!
//! ```text
//! mock_provider --port P --name NAME [--bind ADDR] [--status CODE] [--retry-after SECS]
//!               [--latency-ms N] [--ttft-ms N] [--chunk-ms N] [--hang] [--reset-mid]
//!               [--malformed] [--api-key KEY] [--quiet] [--no-compress]
//!               [--compress-always CODING] [--answer-bytes N] [--chunked]
//! ```
//!
//! Like hosted LLM APIs, answers are compressed when the request's `Accept-Encoding` allows it
//! (br, gzip, zstd or deflate, highest q-value first; `--no-compress` turns that off), or with
//! one coding whatever the request says (`--compress-always`). `--answer-bytes N` makes
//! non-streaming answers at least N bytes long (a longer message, a longer embedding);
//! `--chunked` sends them chunked, without `Content-Length`.
//!
//! LLM endpoints: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, and
//! `GET /v1/models`. Admin endpoints (never counted): `GET /__mock/health`,
//! `GET /__mock/stats`, `POST /__mock/behavior` (full replacement of the fault behaviour),
//! `POST /__mock/reset`. With `--port 0` the first output line reports the port picked.
//! One line per request goes to stdout (method, path, model, outcome; never bodies or header
//! values) unless `--quiet` is given (for load tests).

use market_router_testbed as common;

use clap::Parser;
use common::{lock, unix_now, Reply, Request};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// How long a hanging request holds its connection at most.
const HANG_MAX: Duration = Duration::from_secs(120);

/// Models `GET /v1/models` always lists.
const BASE_MODELS: &[&str] = &["gpt-4o-mini", "gpt-4o", "llama-3.1-8b-instruct"];

/// Fault behaviour; replaced as a whole by `POST /__mock/behavior`.
#[derive(Debug, Clone, PartialEq)]
struct Behavior {
    status: u16,
    retry_after: Option<u64>,
    latency_ms: u64,
    ttft_ms: u64,
    chunk_ms: u64,
    hang: bool,
    reset_mid: bool,
    malformed: bool,
    /// Compress when the request's Accept-Encoding allows it.
    compress: bool,
    /// Compress with this coding whatever the request says.
    compress_always: Option<String>,
    /// Least size of non-streaming answers, bytes (0: natural size).
    answer_bytes: u64,
    /// Non-streaming answers chunked, without Content-Length.
    chunked: bool,
    /// Streams only: the first event is an SSE error event, then the stream ends.
    sse_error_first: bool,
    /// Streams only: 200 headers, then the connection is cut before any event.
    reset_before_body: bool,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            status: 200,
            retry_after: None,
            latency_ms: 0,
            ttft_ms: 0,
            chunk_ms: 0,
            hang: false,
            reset_mid: false,
            malformed: false,
            compress: true,
            compress_always: None,
            answer_bytes: 0,
            chunked: false,
            sse_error_first: false,
            reset_before_body: false,
        }
    }
}

fn check_status(status: u64) -> Result<u16, String> {
    match u16::try_from(status) {
        Ok(s) if (200..=599).contains(&s) => Ok(s),
        _ => Err(format!("status {status}: expected 200..599")),
    }
}

impl Behavior {
    /// Parses a behaviour object; missing fields take their defaults, unknown ones are refused.
    fn from_json(v: &Value) -> Result<Behavior, String> {
        let obj = match v {
            Value::Object(o) => o,
            Value::Null => return Ok(Behavior::default()),
            _ => return Err("expected a JSON object".into()),
        };
        let mut b = Behavior::default();
        for (k, val) in obj {
            let uint = || {
                val.as_u64()
                    .ok_or_else(|| format!("`{k}`: expected a non-negative integer"))
            };
            let boolean = || {
                val.as_bool()
                    .ok_or_else(|| format!("`{k}`: expected true or false"))
            };
            match k.as_str() {
                "status" => b.status = check_status(uint()?)?,
                "retry_after" => b.retry_after = if val.is_null() { None } else { Some(uint()?) },
                "latency_ms" => b.latency_ms = uint()?,
                "ttft_ms" => b.ttft_ms = uint()?,
                "chunk_ms" => b.chunk_ms = uint()?,
                "hang" => b.hang = boolean()?,
                "reset_mid" => b.reset_mid = boolean()?,
                "malformed" => b.malformed = boolean()?,
                "compress" => b.compress = boolean()?,
                "compress_always" => {
                    b.compress_always = match val {
                        Value::Null => None,
                        Value::String(c) => {
                            common::encoding::Encoder::new(c)?;
                            Some(c.clone())
                        }
                        _ => return Err(format!("`{k}`: expected a coding name or null")),
                    }
                }
                "answer_bytes" => b.answer_bytes = uint()?,
                "chunked" => b.chunked = boolean()?,
                "sse_error_first" => b.sse_error_first = boolean()?,
                "reset_before_body" => b.reset_before_body = boolean()?,
                _ => {
                    return Err(format!(
                        "unknown field `{k}`; allowed: status, retry_after, latency_ms, ttft_ms, chunk_ms, hang, reset_mid, malformed, compress, compress_always, answer_bytes, chunked, sse_error_first, reset_before_body"
                    ))
                }
            }
        }
        Ok(b)
    }

    fn to_json(&self) -> Value {
        json!({
            "status": self.status,
            "retry_after": self.retry_after,
            "latency_ms": self.latency_ms,
            "ttft_ms": self.ttft_ms,
            "chunk_ms": self.chunk_ms,
            "hang": self.hang,
            "reset_mid": self.reset_mid,
            "malformed": self.malformed,
            "compress": self.compress,
            "compress_always": self.compress_always,
            "answer_bytes": self.answer_bytes,
            "chunked": self.chunked,
            "sse_error_first": self.sse_error_first,
            "reset_before_body": self.reset_before_body,
        })
    }
}

#[derive(Debug, Default)]
struct Stats {
    /// Every request but the admin endpoints', whatever the path.
    seen: u64,
    requests: u64,
    by_path: BTreeMap<String, u64>,
    by_status: BTreeMap<String, u64>,
    /// Content coding of LLM answers ("identity" when none).
    by_encoding: BTreeMap<String, u64>,
    last_request: Value,
}

struct Mock {
    name: String,
    api_key: Option<String>,
    quiet: bool,
    behavior: Mutex<Behavior>,
    stats: Mutex<Stats>,
    models_seen: Mutex<BTreeSet<String>>,
    seq: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
    Embedding,
}

/// An OpenAI-style error body.
fn error_reply(status: u16, message: &str, code: &str) -> Reply {
    let kind = match status {
        401 | 403 => "invalid_request_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    Reply::json(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

fn sse_event(v: &Value) -> Vec<u8> {
    format!("data: {v}\n\n").into_bytes()
}

/// Splits the answer into word-led pieces: "Hello", " from", " x", ...
fn pieces(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, w) in text.split(' ').enumerate() {
        out.push(if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        });
    }
    out
}

impl Mock {
    fn handle(&self, req: &Request) -> Reply {
        let path = req.path().to_string();
        if !path.starts_with("/__mock/") {
            lock(&self.stats).seen += 1;
        }
        let (reply, model) = match (req.method.as_str(), path.as_str()) {
            (_, "/__mock/health") => (
                Reply::json(200, &json!({"ok": true, "name": self.name})),
                None,
            ),
            ("GET", "/__mock/stats") => (Reply::json(200, &self.stats_json()), None),
            ("POST", "/__mock/behavior") => (self.set_behavior(req), None),
            ("POST", "/__mock/reset") => {
                *lock(&self.stats) = Stats::default();
                (Reply::json(200, &json!({"ok": true})), None)
            }
            ("POST", "/v1/chat/completions") => self.llm(req, Kind::Chat),
            ("POST", "/v1/completions") => self.llm(req, Kind::Completion),
            ("POST", "/v1/embeddings") => self.llm(req, Kind::Embedding),
            ("GET", "/v1/models") => (self.models(req), None),
            (
                _,
                "/v1/chat/completions"
                | "/v1/completions"
                | "/v1/embeddings"
                | "/v1/models"
                | "/__mock/stats"
                | "/__mock/behavior"
                | "/__mock/reset",
            ) => (
                error_reply(
                    405,
                    &format!("method {} not allowed on {path}", req.method),
                    "method_not_allowed",
                ),
                None,
            ),
            _ => (
                error_reply(
                    404,
                    &format!("no route for {} {path}", req.method),
                    "not_found",
                ),
                None,
            ),
        };
        let outcome = match &reply {
            Reply::Hang(_) => "hang".to_string(),
            Reply::Close => "close".to_string(),
            Reply::Cut { status, .. } => format!("{status} (cut)"),
            Reply::Stream {
                status,
                abort_after: Some(_),
                ..
            } => format!("{status} (stream, cut)"),
            Reply::Stream { status, .. } => format!("{status} (stream)"),
            Reply::Full { status, .. } => status.to_string(),
        };
        if !self.quiet {
            let model = model.as_deref().unwrap_or("-");
            println!("{} {path} model={model} status={outcome}", req.method);
        }
        reply
    }

    fn stats_json(&self) -> Value {
        let s = lock(&self.stats);
        json!({
            "name": self.name,
            "seen": s.seen,
            "requests": s.requests,
            "by_path": s.by_path,
            "by_status": s.by_status,
            "by_encoding": s.by_encoding,
            "last_request": s.last_request,
            "behavior": lock(&self.behavior).to_json(),
        })
    }

    fn set_behavior(&self, req: &Request) -> Reply {
        let parsed = req.json_or_null();
        match parsed.and_then(|v| Behavior::from_json(&v)) {
            Ok(b) => {
                let j = b.to_json();
                *lock(&self.behavior) = b;
                Reply::json(200, &json!({"ok": true, "behavior": j}))
            }
            Err(e) => error_reply(400, &format!("bad behavior: {e}"), "bad_behavior"),
        }
    }

    fn authorized(&self, req: &Request) -> bool {
        match &self.api_key {
            None => true,
            Some(key) => req
                .header("authorization")
                .is_some_and(|v| v == format!("Bearer {key}")),
        }
    }

    fn unauthorized() -> Reply {
        error_reply(401, "Incorrect API key provided.", "invalid_api_key")
    }

    fn models(&self, req: &Request) -> Reply {
        if !self.authorized(req) {
            return Mock::unauthorized();
        }
        let mut ids: BTreeSet<String> = BASE_MODELS.iter().map(|m| m.to_string()).collect();
        ids.extend(lock(&self.models_seen).iter().cloned());
        let data: Vec<Value> = ids
            .iter()
            .map(|id| json!({"id": id, "object": "model", "created": 1_700_000_000u64, "owned_by": self.name}))
            .collect();
        Reply::json(
            200,
            &json!({"object": "list", "data": data, "provider": self.name}),
        )
    }

    /// Records an LLM request; headers are kept for tests to inspect.
    fn record(&self, req: &Request, model: Option<&str>, stream: bool) {
        let mut headers = Map::new();
        for (k, v) in &req.headers {
            let merged = match headers.get(k).and_then(Value::as_str) {
                Some(prev) => format!("{prev}, {v}"),
                None => v.clone(),
            };
            headers.insert(k.clone(), Value::String(merged));
        }
        let mut s = lock(&self.stats);
        s.requests += 1;
        *s.by_path.entry(req.path().to_string()).or_insert(0) += 1;
        s.last_request = json!({
            "method": req.method,
            "path": req.path(),
            "model": model,
            "stream": stream,
            "http2": req.http2,
            "scheme": req.scheme,
            "headers": headers,
            "body_bytes": req.body.len(),
        });
    }

    fn count_status(&self, reply: &Reply) {
        let key = reply
            .status()
            .map_or_else(|| "none".to_string(), |s| s.to_string());
        *lock(&self.stats).by_status.entry(key).or_insert(0) += 1;
    }

    fn llm(&self, req: &Request, kind: Kind) -> (Reply, Option<String>) {
        let body = req.json().ok();
        let model = body
            .as_ref()
            .and_then(|b| b["model"].as_str())
            .map(str::to_string);
        let stream = kind != Kind::Embedding && body.as_ref().is_some_and(|b| b["stream"] == true);
        self.record(req, model.as_deref(), stream);
        let b = lock(&self.behavior).clone();
        let reply = self.answer(req, kind, body.as_ref(), model.as_deref(), stream);
        let reply = match self.shape(reply, req, &b) {
            Ok(r) => r,
            Err(e) => error_reply(500, &format!("mock: {e}"), "mock_error"),
        };
        self.count_status(&reply);
        let reply = match reply {
            r @ (Reply::Hang(_) | Reply::Close) => r,
            r => r.with_header("x-mock-provider", &self.name),
        };
        (reply, model)
    }

    /// Encodes and frames an answer as the behaviour says: compressed when the request allows
    /// it (or always with one coding), chunked without a length.
    fn shape(&self, reply: Reply, req: &Request, b: &Behavior) -> Result<Reply, String> {
        let coding: Option<String> = b.compress_always.clone().or_else(|| {
            b.compress
                .then(|| common::encoding::negotiate(req.header("accept-encoding")))
                .flatten()
                .map(str::to_string)
        });
        if !matches!(reply, Reply::Hang(_) | Reply::Close) {
            let key = coding.as_deref().unwrap_or("identity").to_string();
            *lock(&self.stats).by_encoding.entry(key).or_insert(0) += 1;
        }
        let mark = |headers: &mut Vec<(String, String)>| {
            if let Some(c) = &coding {
                headers.push(("content-encoding".into(), c.clone()));
                headers.push(("vary".into(), "accept-encoding".into()));
            }
        };
        let encode = |body: Vec<u8>| match &coding {
            Some(c) => common::encoding::encode(c, &body),
            None => Ok(body),
        };
        Ok(match reply {
            Reply::Full {
                status,
                mut headers,
                body,
            } => {
                mark(&mut headers);
                let body = encode(body)?;
                if b.chunked {
                    let parts = body
                        .chunks(16 * 1024)
                        .map(|c| (Duration::ZERO, c.to_vec()))
                        .collect();
                    Reply::Stream {
                        status,
                        headers,
                        parts,
                        abort_after: None,
                    }
                } else {
                    Reply::Full {
                        status,
                        headers,
                        body,
                    }
                }
            }
            Reply::Stream {
                status,
                mut headers,
                parts,
                abort_after,
            } => {
                let Some(c) = &coding else {
                    return Ok(Reply::Stream {
                        status,
                        headers,
                        parts,
                        abort_after,
                    });
                };
                mark(&mut headers);
                let mut enc = common::encoding::Encoder::new(c)?;
                let mut out = Vec::with_capacity(parts.len());
                for (delay, part) in parts {
                    out.push((delay, enc.part(&part)?));
                }
                let end = enc.finish()?;
                if let Some(last) = out.last_mut() {
                    last.1.extend(end);
                }
                Reply::Stream {
                    status,
                    headers,
                    parts: out,
                    abort_after,
                }
            }
            Reply::Cut {
                status,
                mut headers,
                body,
                ..
            } => {
                mark(&mut headers);
                let body = encode(body)?;
                let sent = body.len() / 2;
                Reply::Cut {
                    status,
                    headers,
                    body,
                    sent,
                }
            }
            other => other,
        })
    }

    fn answer(
        &self,
        req: &Request,
        kind: Kind,
        body: Option<&Value>,
        model: Option<&str>,
        stream: bool,
    ) -> Reply {
        let b = lock(&self.behavior).clone();
        if b.hang {
            return Reply::Hang(HANG_MAX);
        }
        if b.latency_ms > 0 {
            thread::sleep(Duration::from_millis(b.latency_ms));
        }
        if !self.authorized(req) {
            return Mock::unauthorized();
        }
        if b.status != 200 {
            let msg = format!(
                "{}: simulated {} {}",
                self.name,
                b.status,
                common::http::reason(b.status)
            );
            let code = match b.status {
                429 => "rate_limit_exceeded",
                500..=599 => "server_error",
                _ => "simulated_error",
            };
            let r = error_reply(b.status, &msg, code);
            return match b.retry_after {
                Some(secs) => r.with_header("retry-after", &secs.to_string()),
                None => r,
            };
        }
        let Some(body) = body.filter(|v| v.is_object()) else {
            return error_reply(
                400,
                "We could not parse the JSON body of your request.",
                "invalid_json",
            );
        };
        let Some(model) = model else {
            return error_reply(400, "you must provide a model parameter", "missing_model");
        };
        lock(&self.models_seen).insert(model.to_string());
        if b.malformed {
            let junk = format!("{{\"id\": \"x\", \"model\": \"{model}\", \"choices\": [");
            return Reply::bytes(200, "application/json", junk.into_bytes());
        }
        let n = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let prompt_tokens = (req.body.len() as u64 / 4).max(1);
        let max_tokens = body["max_tokens"]
            .as_u64()
            .or_else(|| body["max_completion_tokens"].as_u64());
        let completion_tokens = max_tokens.map_or(8, |m| m.min(8));
        let usage = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        });
        let mut text = format!("Hello from {} (model {model})", self.name);
        // A long answer: the message grows to the size asked for.
        while (text.len() as u64) < b.answer_bytes {
            text.push_str(" lorem");
        }
        let include_usage = body["stream_options"]["include_usage"] == true;
        match kind {
            Kind::Embedding => {
                let usage = json!({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens});
                // A long answer: a vector of as many dimensions as fill the size asked for
                // (each value takes 7 bytes: `0.dddd,`).
                let dims = (b.answer_bytes / 7).max(3) as usize;
                let embedding: Vec<f64> = if b.answer_bytes == 0 {
                    vec![0.1, 0.2, 0.3]
                } else {
                    (0..dims)
                        .map(|i| {
                            let v = 1001 + i * 7919 % 8999;
                            (if v % 10 == 0 { v + 1 } else { v }) as f64 / 10_000.0
                        })
                        .collect()
                };
                let v = json!({
                    "object": "list",
                    "data": [{"object": "embedding", "index": 0, "embedding": embedding}],
                    "model": model,
                    "provider": self.name,
                    "usage": usage,
                });
                full_or_cut(&v, b.reset_mid)
            }
            _ if stream => self.stream(kind, n, model, &text, include_usage, &usage, &b),
            Kind::Chat => {
                let v = json!({
                    "id": format!("chatcmpl-{n}"),
                    "object": "chat.completion",
                    "created": unix_now(),
                    "model": model,
                    "provider": self.name,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }],
                    "usage": usage,
                });
                full_or_cut(&v, b.reset_mid)
            }
            Kind::Completion => {
                let v = json!({
                    "id": format!("cmpl-{n}"),
                    "object": "text_completion",
                    "created": unix_now(),
                    "model": model,
                    "provider": self.name,
                    "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": "stop"}],
                    "usage": usage,
                });
                full_or_cut(&v, b.reset_mid)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        kind: Kind,
        n: u64,
        model: &str,
        text: &str,
        include_usage: bool,
        usage: &Value,
        b: &Behavior,
    ) -> Reply {
        let created = unix_now();
        let (id, object) = match kind {
            Kind::Chat => (format!("chatcmpl-{n}"), "chat.completion.chunk"),
            _ => (format!("cmpl-{n}"), "text_completion"),
        };
        // `sent_at_ms` is stamped when the event is written (see SENT_AT_MS), so a client can
        // tell how long each event took to reach it.
        let chunk = |choices: Value| {
            json!({
                "id": id,
                "object": object,
                "created": created,
                "model": model,
                "provider": self.name,
                "sent_at_ms": common::http::SENT_AT_MS,
                "choices": choices,
            })
        };
        let headers = vec![
            ("content-type".to_string(), "text/event-stream".to_string()),
            ("cache-control".to_string(), "no-cache".to_string()),
        ];
        if b.sse_error_first || b.reset_before_body {
            let error = json!({"error": {"message": format!("{}: simulated overload", self.name),
                "type": "server_error", "code": "overloaded"}});
            let mut first = b"event: error\n".to_vec();
            first.extend_from_slice(&sse_event(&error));
            return Reply::Stream {
                status: 200,
                headers,
                parts: vec![(Duration::from_millis(b.ttft_ms), first)],
                abort_after: b.reset_before_body.then_some(0),
            };
        }
        let mut events: Vec<Value> = Vec::new();
        match kind {
            Kind::Chat => {
                let role = json!({"role": "assistant", "content": ""});
                events.push(chunk(
                    json!([{"index": 0, "delta": role, "finish_reason": null}]),
                ));
                for p in pieces(text) {
                    events.push(chunk(
                        json!([{"index": 0, "delta": {"content": p}, "finish_reason": null}]),
                    ));
                }
                events.push(chunk(
                    json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
                ));
            }
            _ => {
                for p in pieces(text) {
                    events.push(chunk(
                        json!([{"text": p, "index": 0, "logprobs": null, "finish_reason": null}]),
                    ));
                }
                events.push(chunk(
                    json!([{"text": "", "index": 0, "logprobs": null, "finish_reason": "stop"}]),
                ));
            }
        }
        if include_usage {
            let mut last = chunk(json!([]));
            last["usage"] = usage.clone();
            events.push(last);
        }
        let mut parts: Vec<(Duration, Vec<u8>)> = Vec::with_capacity(events.len() + 1);
        for (i, e) in events.iter().enumerate() {
            let delay = if i == 0 { b.ttft_ms } else { b.chunk_ms };
            parts.push((Duration::from_millis(delay), sse_event(e)));
        }
        parts.push((Duration::ZERO, b"data: [DONE]\n\n".to_vec()));
        Reply::Stream {
            status: 200,
            headers,
            parts,
            abort_after: if b.reset_mid { Some(2) } else { None },
        }
    }
}

/// A JSON 200, or with `cut` the same response cut off after half its body.
fn full_or_cut(v: &Value, cut: bool) -> Reply {
    let body = v.to_string().into_bytes();
    if cut {
        let sent = body.len() / 2;
        Reply::Cut {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body,
            sent,
        }
    } else {
        Reply::bytes(200, "application/json", body)
    }
}

/// `mock_provider`'s command line: its starting behaviour (`POST /__behavior` changes it).
#[derive(Debug, Parser)]
#[command(
    name = "mock_provider",
    about = "An OpenAI-compatible mock provider (HTTP/1.1 and h2c on one port) whose behaviour the tests set: status, latency, streaming pace, hangs, resets, compression"
)]
struct Cli {
    /// Port to listen on (0: any free port, printed at start)
    #[arg(long, value_name = "P", default_value_t = 0)]
    port: u16,
    /// Its name, in x-mock-provider and its answers
    #[arg(long, value_name = "NAME", default_value = "mock")]
    name: String,
    /// Address to bind
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    bind: String,
    /// Status of every answer, 200..599
    #[arg(long, value_name = "CODE", default_value_t = 200, value_parser = check_status_arg)]
    status: u16,
    /// Retry-After seconds on error answers
    #[arg(long, value_name = "SECS")]
    retry_after: Option<u64>,
    /// Delay before a non-streamed answer, ms
    #[arg(long, value_name = "N", default_value_t = 0)]
    latency_ms: u64,
    /// Delay before a streamed answer's first event, ms
    #[arg(long, value_name = "N", default_value_t = 0)]
    ttft_ms: u64,
    /// Delay between streamed events, ms
    #[arg(long, value_name = "N", default_value_t = 0)]
    chunk_ms: u64,
    /// Hold every request without answering (up to two minutes)
    #[arg(long)]
    hang: bool,
    /// Reset the connection in the middle of a streamed answer
    #[arg(long)]
    reset_mid: bool,
    /// Answer with a malformed body
    #[arg(long)]
    malformed: bool,
    /// The API key requests must carry (Authorization: Bearer KEY)
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Log nothing per request
    #[arg(long)]
    quiet: bool,
    /// Never compress answers, whatever accept-encoding says
    #[arg(long)]
    no_compress: bool,
    /// Compress every answer with this coding, even when not accepted (gzip, deflate, br, zstd)
    #[arg(long, value_name = "CODING")]
    compress_always: Option<String>,
    /// Pad non-streamed answers to about this many bytes
    #[arg(long, value_name = "N", default_value_t = 0)]
    answer_bytes: u64,
    /// Send non-streamed answers chunked (no content-length)
    #[arg(long)]
    chunked: bool,
}

fn check_status_arg(s: &str) -> Result<u16, String> {
    check_status(s.parse::<u64>().map_err(|e| format!("{s:?}: {e}"))?)
}

fn run(cli: Cli) -> Result<(), String> {
    let port = cli.port;
    let bind = cli.bind;
    let name = cli.name;
    let behavior = Behavior {
        status: cli.status,
        retry_after: cli.retry_after,
        latency_ms: cli.latency_ms,
        ttft_ms: cli.ttft_ms,
        chunk_ms: cli.chunk_ms,
        hang: cli.hang,
        reset_mid: cli.reset_mid,
        malformed: cli.malformed,
        compress: !cli.no_compress,
        compress_always: match cli.compress_always {
            Some(c) => {
                common::encoding::Encoder::new(&c)?;
                Some(c)
            }
            None => None,
        },
        answer_bytes: cli.answer_bytes,
        chunked: cli.chunked,
        ..Behavior::default()
    };
    let mock = Arc::new(Mock {
        name: name.clone(),
        api_key: cli.api_key,
        quiet: cli.quiet,
        behavior: Mutex::new(behavior),
        stats: Mutex::new(Stats::default()),
        models_seen: Mutex::new(BTreeSet::new()),
        seq: AtomicU64::new(0),
    });
    let h = common::handler(move |req| mock.handle(req));
    // On hyper: HTTP/1.1 and h2c on the same port, whichever the gateway speaks.
    common::hyper_serve::bind_and_serve(&bind, port, &format!("mock_provider {name}"), h)
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("mock_provider: {e}");
        std::process::exit(2);
    }
}
