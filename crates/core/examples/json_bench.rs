//! Micro-benchmark: the filter's one-pass JSON walker (`crates/core/src/json.rs`, through
//! `request::parse` and `metrics::inspect_answer`) against typed serde doing the same work
//! (`#[derive(Deserialize)]` with `#[serde(borrow)]`, everything else skipped as `IgnoredAny`).
//! Built for wasm32-wasip1 and run under Node's WASI, the way the filter's code runs in a
//! host's wasm engine (`make bench-json`); it also runs natively.
//!
//!     make bench-json                                   # wasm, writes bench/results/json.{md,json}
//!     cargo run --release -p market-router-core --example json_bench -- --quick
//!
//! Both sides do what the filter needs: the request side validates the whole body and reads
//! `model` (with its byte span, for the rewrite), `stream`, `stream_options.include_usage`
//! and `max_tokens`/`max_completion_tokens`; the answer side checks the answer is UTF-8 JSON
//! and reads `usage.prompt_tokens`/`completion_tokens`. Before timing, both must agree on
//! every fixture. Each case runs `--samples` timed samples of enough iterations for about
//! `--sample-ms` each. On a shared machine other work only ever adds time, so the figure
//! compared is the fastest sample (ns per call); the median is shown beside it. The walker
//! runs twice, before and after serde: the gap between its two runs is the noise.

use market_router_core::metrics::{self, Usage};
use market_router_core::request::{self, RequestInfo};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::hint::black_box;
use std::time::Instant;

// ---- typed serde: the same facts --------------------------------------------------------

#[derive(Deserialize)]
struct Req<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream_options: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<IgnoredAnyOrBool>,
}

/// `true` only for the literal true, like the walker.
struct IgnoredAnyOrBool(bool);

impl<'de> Deserialize<'de> for IgnoredAnyOrBool {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = bool;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, b: bool) -> Result<bool, E> {
                Ok(b)
            }
            fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
                Ok(false)
            }
            fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
                Ok(false)
            }
            fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
                Ok(false)
            }
            fn visit_str<E>(self, _: &str) -> Result<bool, E> {
                Ok(false)
            }
            fn visit_unit<E>(self) -> Result<bool, E> {
                Ok(false)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<bool, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(false)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<bool, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(false)
            }
        }
        d.deserialize_any(V).map(IgnoredAnyOrBool)
    }
}

fn unsigned(v: Option<&RawValue>) -> Option<u64> {
    v.and_then(|v| v.get().parse().ok())
}

/// `request::parse` in typed serde (Ok only; the error kinds are not compared).
fn serde_request(body: &[u8]) -> Option<RequestInfo> {
    let r: Req<'_> = serde_json::from_slice(body).ok()?;
    let raw = r.model?;
    let text = raw.get();
    let model: String = serde_json::from_str(text).ok()?;
    if model.is_empty() {
        return None;
    }
    let start = text.as_ptr() as usize - body.as_ptr() as usize;
    let include_usage = r
        .stream_options
        .and_then(|o| serde_json::from_str::<StreamOptions>(o.get()).ok())
        .and_then(|o| o.include_usage)
        .is_some_and(|b| b.0);
    Some(RequestInfo {
        model,
        model_span: start..start + text.len(),
        stream: r.stream.is_some_and(|s| s.get() == "true"),
        include_usage,
        max_tokens: unsigned(r.max_completion_tokens).or(unsigned(r.max_tokens)),
        body_len: body.len(),
    })
}

#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct UsageFields<'a> {
    #[serde(borrow, default)]
    prompt_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    completion_tokens: Option<&'a RawValue>,
}

/// `metrics::inspect_answer` in typed serde.
fn serde_answer(body: &[u8]) -> Result<Option<Usage>, ()> {
    // Ignored strings are not checked for UTF-8 by serde_json; the walker's caller checks the
    // whole body first, so this side does too.
    let text = std::str::from_utf8(body).map_err(|_| ())?;
    let a: Answer<'_> = serde_json::from_str(text).map_err(|_| ())?;
    let Some(u) = a.usage else { return Ok(None) };
    let Ok(u) = serde_json::from_str::<UsageFields<'_>>(u.get()) else {
        return Ok(None);
    };
    let (p, c) = (unsigned(u.prompt_tokens), unsigned(u.completion_tokens));
    if p.is_none() && c.is_none() {
        return Ok(None);
    }
    Ok(Some(Usage {
        prompt_tokens: p.unwrap_or(0),
        completion_tokens: c.unwrap_or(0),
    }))
}

// ---- fixtures ---------------------------------------------------------------------------

/// The model `make bench` asks for.
const BENCH_MODEL: &str = "gpt-4o-mini";

/// The request body `make bench` sends (tools/src/bin/bench.rs `chat_body`), exactly `size` bytes:
/// one user message of plain words, no escapes.
fn bench_request(size: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"model":"{BENCH_MODEL}","max_tokens":64,"messages":[{{"role":"user","content":""#
    );
    let tail = r#""}]}"#;
    let fill = size.saturating_sub(head.len() + tail.len());
    let words = "lorem ipsum dolor sit amet consectetur adipiscing elit ";
    let mut content = String::with_capacity(fill);
    while content.len() < fill {
        content.push_str(words);
    }
    content.truncate(fill);
    format!("{head}{content}{tail}").into_bytes()
}

/// A multi-turn chat request of about `size` bytes as clients send them: a system prompt,
/// then user and assistant turns of prose with line breaks every 70-100 bytes, a quoted
/// phrase now and then and a non-ASCII character sent escaped (one escape per ~80 bytes,
/// as in pasted documents and chat transcripts), `stream` and `stream_options` last.
fn chat_request(size: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"model":"{BENCH_MODEL}","messages":[{{"role":"system","content":"You are a careful analyst.\nAnswer in short paragraphs; cite figures from the text."}}"#
    );
    let tail = r#"],"max_tokens":512,"temperature":0.2,"stream":true,"stream_options":{"include_usage":true}}"#;
    let user = r#",{"role":"user","content":"Here is the next part of the quarterly report.\nRevenue grew 4% year over year, driven by the \"enterprise\" tier,\nwhile margins held steady as operating costs rose with headcount.\nThe board expects caf\u00e9 and retail sales to recover next quarter.\nWhat are the main risks?"}"#;
    let assistant = r#",{"role":"assistant","content":"Three risks stand out.\nFirst, growth depends on a single tier; a slowdown there hits revenue directly.\nSecond, costs rise with headcount, so margins shrink if hiring outpaces sales.\nThird, the retail recovery is a forecast, not a result."}"#;
    let mut out = head;
    let mut turn = 0;
    while out.len() + user.len().max(assistant.len()) + tail.len() < size {
        out.push_str(if turn % 2 == 0 { user } else { assistant });
        turn += 1;
    }
    out.push_str(tail);
    out.into_bytes()
}

/// The answer `make bench`'s upstream returns (tools/src/bin/bench.rs `UPSTREAM_ANSWER`).
const BENCH_ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the benchmark upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":50,"completion_tokens":8,"total_tokens":58}}"#;

/// A non-streaming chat completion of about `size` bytes as providers send it: markdown-ish
/// prose with a line break every ~60 bytes and a quote now and then, `usage` after
/// `choices`.
fn chat_answer(size: usize) -> Vec<u8> {
    let head = r#"{"id":"chatcmpl-9x2Lq","object":"chat.completion","created":1733000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Summary:\n\n"#;
    let tail = r#""},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":1234,"completion_tokens":567,"total_tokens":1801,"prompt_tokens_details":{"cached_tokens":0}},"system_fingerprint":"fp_0ba0d124f1"}"#;
    let piece = r#"- Revenue grew 4% on the \"enterprise\" tier alone.\n- Margins held; costs rose with headcount.\n- Retail recovery is forecast, not observed.\n\n"#;
    let mut out = head.to_string();
    while out.len() + piece.len() + tail.len() < size {
        out.push_str(piece);
    }
    out.push_str(tail);
    out.into_bytes()
}

// ---- timing -----------------------------------------------------------------------------

struct Figure {
    median_ns: f64,
    min_ns: f64,
}

fn time(samples: usize, sample_ms: u64, mut f: impl FnMut()) -> Figure {
    // Calibrate: iterations for about sample_ms.
    let mut iters = 1u64;
    loop {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        let el = t.elapsed();
        if el.as_millis() as u64 >= sample_ms / 4 || iters >= 1 << 30 {
            let per = el.as_nanos() as f64 / iters as f64;
            iters = ((sample_ms as f64 * 1e6 / per.max(1.0)) as u64).max(1);
            break;
        }
        iters *= 4;
    }
    let mut ns: Vec<f64> = (0..samples)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    ns.sort_by(f64::total_cmp);
    Figure {
        median_ns: ns[ns.len() / 2],
        min_ns: ns[0],
    }
}

struct Row {
    case: String,
    bytes: usize,
    walker: Figure,
    walker_again: Figure,
    serde: Figure,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let samples: usize = value("--samples")
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 5 } else { 21 });
    let sample_ms: u64 = value("--sample-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 40 } else { 150 });
    let out_dir = value("--out");
    let target = if cfg!(target_arch = "wasm32") {
        "wasm32-wasip1 under Node's WASI"
    } else {
        "native"
    };

    let requests = [
        ("request, make bench body", bench_request(200)),
        ("request, make bench body", bench_request(64 << 10)),
        ("request, chat with escapes", chat_request(2 << 10)),
        ("request, chat with escapes", chat_request(64 << 10)),
    ];
    let answers = [
        (
            "answer, make bench upstream",
            BENCH_ANSWER.as_bytes().to_vec(),
        ),
        ("answer, chat completion", chat_answer(4 << 10)),
        ("answer, chat completion", chat_answer(64 << 10)),
    ];
    let mut rows = Vec::new();
    for (case, body) in requests {
        let size = body.len();
        let walker = request::parse(&body).ok();
        let typed = serde_request(&body);
        if walker.is_none() || walker != typed {
            eprintln!("json_bench: {case} {size}: the two sides disagree:\n walker {walker:?}\n serde  {typed:?}");
            std::process::exit(1);
        }
        let w = time(samples, sample_ms, || {
            black_box(request::parse(black_box(&body)).ok());
        });
        let s = time(samples, sample_ms, || {
            black_box(serde_request(black_box(&body)));
        });
        let w2 = time(samples, sample_ms, || {
            black_box(request::parse(black_box(&body)).ok());
        });
        rows.push(Row {
            case: case.into(),
            bytes: body.len(),
            walker: w,
            walker_again: w2,
            serde: s,
        });
    }
    for (case, body) in answers {
        let size = body.len();
        let walker = metrics::inspect_answer(&body).map_err(|_| ());
        let typed = serde_answer(&body);
        if !matches!(walker, Ok(Some(_))) || walker != typed {
            eprintln!("json_bench: {case} {size}: the two sides disagree:\n walker {walker:?}\n serde  {typed:?}");
            std::process::exit(1);
        }
        let w = time(samples, sample_ms, || {
            let _ = black_box(metrics::inspect_answer(black_box(&body)));
        });
        let s = time(samples, sample_ms, || {
            let _ = black_box(serde_answer(black_box(&body)));
        });
        let w2 = time(samples, sample_ms, || {
            let _ = black_box(metrics::inspect_answer(black_box(&body)));
        });
        rows.push(Row {
            case: case.into(),
            bytes: body.len(),
            walker: w,
            walker_again: w2,
            serde: s,
        });
    }

    let mut md = String::new();
    md.push_str("# JSON micro-benchmark: json.rs walker vs typed serde\n\n");
    md.push_str(&format!(
        "Target: {target}. {samples} samples of ~{sample_ms} ms per case; ns per call, fastest \
         sample (median in brackets). The walker runs twice, before and after serde: the gap \
         between its two runs is the noise. serde / walker below 1 means serde is faster. \
         `make bench-json`.\n\n"
    ));
    md.push_str("| case | bytes | walker ns | walker again ns | typed serde ns | serde / walker | noise |\n|---|---:|---:|---:|---:|---:|---:|\n");
    let mut json_rows = Vec::new();
    for r in &rows {
        let walker = r.walker.min_ns.min(r.walker_again.min_ns);
        let ratio = r.serde.min_ns / walker;
        let noise = (r.walker.min_ns - r.walker_again.min_ns).abs() / walker;
        let f = |x: &Figure| format!("{:.0} ({:.0})", x.min_ns, x.median_ns);
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.2} | {:.0}% |\n",
            r.case,
            r.bytes,
            f(&r.walker),
            f(&r.walker_again),
            f(&r.serde),
            ratio,
            noise * 100.0
        ));
        json_rows.push(serde_json::json!({
            "case": r.case, "bytes": r.bytes,
            "walker_min_ns": r.walker.min_ns, "walker_again_min_ns": r.walker_again.min_ns,
            "serde_min_ns": r.serde.min_ns,
            "walker_median_ns": r.walker.median_ns, "walker_again_median_ns": r.walker_again.median_ns,
            "serde_median_ns": r.serde.median_ns,
            "serde_over_walker": ratio, "noise": noise,
        }));
    }
    print!("{md}");
    if let Some(dir) = out_dir {
        let doc = serde_json::json!({"target": target, "samples": samples, "sample_ms": sample_ms, "rows": json_rows});
        let ok = std::fs::write(format!("{dir}/json.md"), &md).is_ok()
            && serde_json::to_string_pretty(&doc)
                .map(|t| std::fs::write(format!("{dir}/json.json"), t + "\n").is_ok())
                .unwrap_or(false);
        if !ok {
            eprintln!("json_bench: cannot write {dir}/json.md and json.json");
            std::process::exit(1);
        }
    }
}
