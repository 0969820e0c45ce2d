//! Envoy mode (`failover.mode: envoy`): the formats of what the filter hands Envoy's router so
//! that the router itself walks the market's order, and of what the same module records once
//! per attempt as an upstream filter; which plugin roles may share a VM. The steps built on
//! them are `crate::handover` (downstream role) and `crate::upstream` (upstream role).
//!
//! The hand-over, per request:
//! - the order, as the request header [`ORDER_HEADER`]: a base64 protobuf `google.protobuf.Value`
//!   (a list of `{name: <provider>}`), which `header_to_metadata` turns into the dynamic metadata
//!   the `priority_group` cluster specifier reads (namespace [`METADATA_NAMESPACE`]);
//! - the attempt bound `x-envoy-max-retries` and the per-try timeout
//!   `x-envoy-upstream-rq-per-try-timeout-ms` (the client's own `x-envoy-*` retry headers are
//!   removed first);
//! - the [`Plan`] (each provider's model id, the per-try bound, whether the answer streams), as
//!   filter state the upstream role reads; upstream filters share the request's stream info.
//!
//! Per attempt the upstream role appends one [`Tried`] entry to filter state, which the
//! downstream role reads when the answer comes back (decision record, response headers).

use crate::attempt::Outcome;
use crate::config::{Config, ConfigError, FailoverMode};
use crate::metrics::Usage;
use serde::{Deserialize, Serialize};

/// Request header carrying the order to `header_to_metadata` (removed there).
pub const ORDER_HEADER: &str = "x-market-router-order";
/// Dynamic metadata namespace the route's `priority_group` specifier reads.
pub const METADATA_NAMESPACE: &str = "market_router";
/// Key under [`METADATA_NAMESPACE`].
pub const METADATA_KEY: &str = "priority_groups";
/// Filter state (property) holding the [`Plan`].
pub const PLAN_PROPERTY: &str = "market_router.plan";
/// Filter state (property) holding the attempts made so far.
pub const TRIED_PROPERTY: &str = "market_router.tried";
/// Filter state (property) holding what the last failing attempt's provider said (its error
/// message, cleaned), for the decision record.
pub const SAID_PROPERTY: &str = "market_router.said";
/// Root id of the upstream role (the downstream filter uses any other, e.g. `market_router`).
pub const UPSTREAM_ROOT_ID: &str = "market_router_upstream";

/// Request headers a client could use to steer Envoy's retries; removed before ours are set.
pub const CLIENT_RETRY_HEADERS: [&str; 11] = [
    "x-envoy-max-retries",
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-attempt-count",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-expected-rq-timeout-ms",
];

/// Credential headers OpenAI-compatible providers use, removed on every attempt besides the
/// ones named in any provider's `headers`.
pub const COMMON_CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "x-api-key", "api-key"];

/// Whether a plugin with this root id plays the upstream role.
pub fn is_upstream_root_id(root_id: &str) -> bool {
    root_id == UPSTREAM_ROOT_ID || root_id.ends_with("_upstream")
}

/// One configured plugin of a VM, for [`check_roles`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Role {
    /// Whether it plays the upstream role.
    pub upstream: bool,
    /// Its `failover.mode`.
    pub mode: FailoverMode,
}

/// Whether a plugin playing `me` may run in a VM whose other plugins play `others`.
///
/// The upstream role exists for envoy mode only. And a route- or dispatch-mode filter must not
/// share its VM with the upstream role: its `dispatch_http_call` to a provider cluster runs that
/// cluster's upstream filters inside the call, so the VM would be entered again while it is
/// busy (the proxy-wasm SDK panics on that, killing the VM for the worker).
pub fn check_roles(me: Role, others: &[Role]) -> Result<(), ConfigError> {
    let mode = |m: FailoverMode| format!("\"{}\"", m.as_str());
    if me.upstream && me.mode != FailoverMode::Envoy {
        return Err(ConfigError {
            field: "failover.mode".into(),
            value: mode(me.mode),
            expected: format!(
                "expected \"envoy\" for the upstream role (root id {UPSTREAM_ROOT_ID}); route and dispatch modes need no filter on the provider clusters: remove it there"
            ),
        });
    }
    let all = || std::iter::once(&me).chain(others);
    if all().any(|r| r.upstream) {
        if let Some(d) = all().find(|r| !r.upstream && r.mode != FailoverMode::Envoy) {
            return Err(ConfigError {
                field: "failover.mode".into(),
                value: mode(d.mode),
                expected: format!(
                    "expected \"envoy\": this VM also runs the upstream role (root id {UPSTREAM_ROOT_ID}) on the provider clusters, which a dispatched {}-mode attempt would enter while the VM is busy; use envoy mode, remove the upstream filter from the clusters, or give it its own vm_id",
                    d.mode.as_str()
                ),
            });
        }
    }
    Ok(())
}

/// The roles of a VM's configured plugins, by root context id: each new one is checked
/// against the others ([`check_roles`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roles(Vec<(u32, Role)>);

impl Roles {
    /// No plugin yet.
    pub const fn new() -> Self {
        Roles(Vec::new())
    }

    /// Registers the role of the plugin of root context `id` (replacing an earlier one of
    /// it), unless it cannot run beside the VM's other plugins.
    pub fn register(&mut self, id: u32, role: Role) -> Result<(), ConfigError> {
        self.0.retain(|(i, _)| *i != id);
        let others: Vec<Role> = self.0.iter().map(|(_, r)| *r).collect();
        check_roles(role, &others)?;
        self.0.push((id, role));
        Ok(())
    }

    /// Forgets the role of the plugin of root context `id` (the host removed it).
    pub fn unregister(&mut self, id: u32) {
        self.0.retain(|(i, _)| *i != id);
    }
}

/// What `on_configure` does with a plugin whose role [`Roles::register`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Refuse the configuration: the host creates no context for it (the upstream role, so
    /// no dispatched call enters it).
    Configuration,
    /// Accept it unconfigured: every LLM request gets an OpenAI-style 503 pointing to the
    /// log line (the listener's filter, whose conflict Envoy shows only after the base VM's
    /// checks of each plugin alone passed; Envoy runs on, and nothing dispatches into the
    /// upstream role).
    Requests,
}

impl Role {
    /// How a refused plugin of this role is turned away.
    pub fn refused(self) -> Refused {
        if self.upstream {
            Refused::Configuration
        } else {
            Refused::Requests
        }
    }
}

/// The order as the `header_to_metadata` value: base64 of a protobuf `Value` holding a list of
/// structs `{name: <group>}`.
pub fn order_header(groups: &[&str]) -> String {
    let mut list = Vec::with_capacity(groups.len() * 24);
    for g in groups {
        // Value{string_value: g}
        let mut s = Vec::with_capacity(g.len() + 4);
        field(&mut s, 3, g.as_bytes());
        // map entry {key: "name", value: Value}
        let mut entry = Vec::with_capacity(s.len() + 10);
        field(&mut entry, 1, b"name");
        field(&mut entry, 2, &s);
        // Struct{fields: [entry]}
        let mut st = Vec::with_capacity(entry.len() + 4);
        field(&mut st, 1, &entry);
        // Value{struct_value: st}
        let mut v = Vec::with_capacity(st.len() + 4);
        field(&mut v, 5, &st);
        // ListValue.values += v
        field(&mut list, 1, &v);
    }
    // Value{list_value: list}
    let mut out = Vec::with_capacity(list.len() + 4);
    field(&mut out, 6, &list);
    base64(&out)
}

/// A length-delimited protobuf field.
fn field(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    varint(out, u64::from(number << 3 | 2));
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Bound of one attempt's time to first byte: the offer's `ttft_p95` (NaN when unknown) times
/// `factor`, within `attempt_timeout_ms`; `attempt_timeout_ms` when the offer has no p95.
pub fn attempt_ttfb_bound_ms(ttft_p95_ms: f64, factor: f64, attempt_timeout_ms: u64) -> u64 {
    if ttft_p95_ms.is_finite() && ttft_p95_ms > 0.0 {
        ((ttft_p95_ms * factor).ceil() as u64).clamp(1, attempt_timeout_ms.max(1))
    } else {
        attempt_timeout_ms.max(1)
    }
}

/// Envoy takes one per-try timeout per request: the largest bound among the providers in the
/// order, so no provider is cut before its own bound (one that is quicker than the others is
/// left at the larger bound).
pub fn per_try_timeout_ms(bounds: impl IntoIterator<Item = u64>, attempt_timeout_ms: u64) -> u64 {
    bounds
        .into_iter()
        .max()
        .unwrap_or(attempt_timeout_ms)
        .max(1)
}

/// What the downstream role decided, for the upstream role of each attempt.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Model the client asked for.
    #[serde(rename = "m")]
    pub model: String,
    /// Whether the answer streams (SSE): the upstream role holds headers until the first chunk.
    #[serde(rename = "s")]
    pub stream: bool,
    /// Per-try timeout set for the request, ms.
    #[serde(rename = "t")]
    pub per_try_ms: u64,
    /// The client's `:path`: each attempt starts from it (an earlier attempt's cluster may
    /// have rewritten the shared header map, e.g. a provider serving under another prefix).
    #[serde(rename = "u", default)]
    pub path: String,
    /// Providers in order: (provider index, its model id).
    #[serde(rename = "p")]
    pub providers: Vec<(usize, String)>,
}

impl Plan {
    /// As stored in filter state.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// From filter state; `None` when absent or not ours.
    pub fn decode(bytes: &[u8]) -> Option<Plan> {
        serde_json::from_slice(bytes).ok()
    }

    /// The model id for `provider`, when it is in the order.
    pub fn model_for(&self, provider: usize) -> Option<&str> {
        self.providers
            .iter()
            .find(|(p, _)| *p == provider)
            .map(|(_, m)| m.as_str())
    }
}

/// One attempt as the upstream role saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tried {
    /// Provider index.
    pub provider: usize,
    /// How it ended.
    pub outcome: Outcome,
    /// Usage of a non-streaming answer the upstream role checked (so the downstream role
    /// prices it without holding the answer again).
    pub usage: Option<Usage>,
}

/// Appends one attempt to the stored list (`<idx>:<code>[:u<prompt>/<completion>]` entries
/// separated by `,`).
pub fn push_tried(list: &mut Vec<u8>, t: Tried) {
    use std::io::Write;
    if !list.is_empty() {
        list.push(b',');
    }
    let _ = match t.outcome {
        Outcome::Success(s) => write!(list, "{}:s{s}", t.provider),
        Outcome::Status {
            status,
            retry_after_ms: Some(ra),
        } => write!(list, "{}:h{status}/{ra}", t.provider),
        Outcome::Status { status, .. } => write!(list, "{}:h{status}", t.provider),
        Outcome::ConnectFailure => write!(list, "{}:c", t.provider),
        Outcome::Reset => write!(list, "{}:r", t.provider),
        Outcome::Timeout => write!(list, "{}:t", t.provider),
        Outcome::Malformed => write!(list, "{}:m", t.provider),
    };
    if let Some(u) = t.usage {
        let _ = write!(list, ":u{}/{}", u.prompt_tokens, u.completion_tokens);
    }
}

/// How many attempts the stored list holds (without parsing them).
pub fn tried_count(list: &[u8]) -> usize {
    if list.is_empty() {
        0
    } else {
        list.iter().filter(|b| **b == b',').count() + 1
    }
}

/// The stored list back; entries that do not parse are skipped.
pub fn parse_tried(list: &[u8]) -> Vec<Tried> {
    let text = String::from_utf8_lossy(list);
    text.split(',')
        .filter_map(|e| {
            let (p, rest) = e.split_once(':')?;
            let (code, usage) = match rest.split_once(":u") {
                Some((code, u)) => {
                    let (i, o) = u.split_once('/')?;
                    let usage = Usage {
                        prompt_tokens: i.parse().ok()?,
                        completion_tokens: o.parse().ok()?,
                    };
                    (code, Some(usage))
                }
                None => (rest, None),
            };
            let provider = p.parse().ok()?;
            let outcome = match code.as_bytes().first()? {
                b's' => Outcome::Success(code[1..].parse().ok()?),
                b'h' => {
                    let (status, ra) = match code[1..].split_once('/') {
                        Some((s, ra)) => (s.parse().ok()?, Some(ra.parse().ok()?)),
                        None => (code[1..].parse().ok()?, None),
                    };
                    Outcome::Status {
                        status,
                        retry_after_ms: ra,
                    }
                }
                b'c' => Outcome::ConnectFailure,
                b'r' => Outcome::Reset,
                b't' => Outcome::Timeout,
                b'm' => Outcome::Malformed,
                _ => return None,
            };
            Some(Tried {
                provider,
                outcome,
                usage,
            })
        })
        .collect()
}

/// Every credential header name any provider uses (its `headers`) plus the common ones: all
/// removed on each attempt before that provider's own are set, since Envoy's attempts share
/// one request-header map.
pub fn credential_headers(config: &Config) -> Vec<String> {
    let mut names: Vec<String> = COMMON_CREDENTIAL_HEADERS
        .iter()
        .map(|s| s.to_string())
        .collect();
    for p in &config.providers {
        for (k, _) in &p.headers {
            if !names.iter().any(|n| n == k) {
                names.push(k.clone());
            }
        }
    }
    names
}

/// Whether `name` is one of the credential headers [`credential_headers`] lists.
pub fn credential_headers_contain(config: &Config, name: &str) -> bool {
    COMMON_CREDENTIAL_HEADERS.contains(&name)
        || config
            .providers
            .iter()
            .any(|p| p.headers.iter().any(|(k, _)| k == name))
}

/// Whether the first chunk of an SSE answer is an error event (`event: error`, or a `data:`
/// line whose JSON object has an `error` member): such a stream has not started and the
/// attempt fails over.
pub fn sse_error_first(chunk: &[u8]) -> bool {
    let text = String::from_utf8_lossy(&chunk[..chunk.len().min(4096)]);
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(ev) = line.strip_prefix("event:") {
            return ev.trim() == "error";
        }
        if let Some(data) = line.strip_prefix("data:") {
            return serde_json::from_str::<serde_json::Value>(data.trim())
                .ok()
                .is_some_and(|v| v.get("error").is_some());
        }
        if line.starts_with(':') {
            continue;
        }
        return false;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal protobuf reader for the test: (field number, bytes) of length-delimited fields.
    fn fields(mut b: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        let read = |b: &mut &[u8]| -> u64 {
            let (mut v, mut shift) = (0u64, 0);
            loop {
                let x = b[0];
                *b = &b[1..];
                v |= u64::from(x & 0x7f) << shift;
                shift += 7;
                if x < 0x80 {
                    return v;
                }
            }
        };
        while !b.is_empty() {
            let tag = read(&mut b);
            assert_eq!(tag & 7, 2, "only length-delimited fields");
            let len = read(&mut b) as usize;
            out.push(((tag >> 3) as u32, b[..len].to_vec()));
            b = &b[len..];
        }
        out
    }

    fn unbase64(s: &str) -> Vec<u8> {
        const A: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut bits = 0u32;
        let mut n = 0;
        let mut out = Vec::new();
        for c in s.chars().filter(|c| *c != '=') {
            bits = bits << 6 | A.find(c).unwrap() as u32;
            n += 6;
            if n >= 8 {
                n -= 8;
                out.push((bits >> n) as u8);
            }
        }
        out
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), enc);
            assert_eq!(unbase64(enc), plain.as_bytes());
        }
    }

    #[test]
    fn order_header_is_a_list_of_name_structs() {
        let long = "p".repeat(200); // lengths over 127 take two varint bytes
        let groups = ["b", "a", long.as_str()];
        let bytes = unbase64(&order_header(&groups));
        let top = fields(&bytes);
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].0, 6, "Value.list_value");
        let values = fields(&top[0].1);
        assert_eq!(values.len(), 3);
        for (v, want) in values.iter().zip(groups) {
            assert_eq!(v.0, 1, "ListValue.values");
            let st = fields(&v.1);
            assert_eq!(st[0].0, 5, "Value.struct_value");
            let entry = fields(&st[0].1);
            assert_eq!(entry[0].0, 1, "Struct.fields");
            let kv = fields(&entry[0].1);
            assert_eq!(kv[0], (1, b"name".to_vec()));
            assert_eq!(kv[1].0, 2);
            let s = fields(&kv[1].1);
            assert_eq!(s, vec![(3, want.as_bytes().to_vec())], "Value.string_value");
        }
        // The exact bytes for one short group.
        assert_eq!(
            unbase64(&order_header(&["a"])),
            [
                0x32, 0x11, 0x0a, 0x0f, 0x2a, 0x0d, 0x0a, 0x0b, 0x0a, 0x04, b'n', b'a', b'm', b'e',
                0x12, 0x03, 0x1a, 0x01, b'a'
            ]
        );
    }

    #[test]
    fn ttfb_bound_follows_p95_within_the_attempt_timeout() {
        assert_eq!(attempt_ttfb_bound_ms(400.0, 2.0, 30_000), 800);
        assert_eq!(attempt_ttfb_bound_ms(400.0, 2.0, 500), 500);
        assert_eq!(attempt_ttfb_bound_ms(f64::NAN, 2.0, 30_000), 30_000);
        assert_eq!(attempt_ttfb_bound_ms(0.2, 1.0, 30_000), 1);
        assert_eq!(per_try_timeout_ms([800, 300, 1200], 30_000), 1200);
        assert_eq!(per_try_timeout_ms([], 30_000), 30_000);
    }

    #[test]
    fn plan_round_trips() {
        let p = Plan {
            model: "gpt \"4o\"\n".into(),
            stream: true,
            per_try_ms: 900,
            path: "/v1/chat/completions".into(),
            providers: vec![(2, "m-2".into()), (0, "m-0".into())],
        };
        let back = Plan::decode(&p.encode()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.model_for(0), Some("m-0"));
        assert_eq!(back.model_for(1), None);
        assert_eq!(Plan::decode(b"nope"), None);
    }

    #[test]
    fn tried_list_round_trips_every_outcome() {
        let all = [
            Outcome::Success(200),
            Outcome::Status {
                status: 429,
                retry_after_ms: Some(2000),
            },
            Outcome::Status {
                status: 503,
                retry_after_ms: None,
            },
            Outcome::ConnectFailure,
            Outcome::Reset,
            Outcome::Timeout,
            Outcome::Malformed,
        ];
        let mut list = Vec::new();
        for (i, o) in all.iter().enumerate() {
            let usage = (i == 0).then_some(Usage {
                prompt_tokens: 18,
                completion_tokens: 8,
            });
            push_tried(
                &mut list,
                Tried {
                    provider: i,
                    outcome: *o,
                    usage,
                },
            );
        }
        let back = parse_tried(&list);
        assert_eq!(back.len(), all.len());
        assert_eq!(tried_count(&list), all.len());
        assert_eq!(tried_count(b""), 0);
        for (i, t) in back.iter().enumerate() {
            assert_eq!((t.provider, t.outcome), (i, all[i]));
        }
        assert_eq!(back[0].usage.map(|u| u.prompt_tokens), Some(18));
        assert_eq!(back[1].usage, None);
        assert!(parse_tried(b"").is_empty());
        assert_eq!(parse_tried(b"x:s200,1:q,2:r").len(), 1);
    }

    #[test]
    fn sse_error_events_are_recognised_only_first() {
        assert!(sse_error_first(b"event: error\ndata: {}\n\n"));
        assert!(sse_error_first(
            b"data: {\"error\":{\"message\":\"overloaded\"}}\n\n"
        ));
        assert!(sse_error_first(
            b": keep-alive\n\ndata: {\"error\":\"x\"}\n\n"
        ));
        assert!(!sse_error_first(
            b"data: {\"id\":\"1\",\"choices\":[{\"delta\":{\"content\":\"error\"}}]}\n\n"
        ));
        assert!(!sse_error_first(b"data: [DONE]\n\n"));
        assert!(!sse_error_first(b""));
    }

    #[test]
    fn upstream_role_only_in_envoy_mode_and_never_beside_a_dispatching_filter() {
        let up = |mode| Role {
            upstream: true,
            mode,
        };
        let down = |mode| Role {
            upstream: false,
            mode,
        };
        use FailoverMode::*;
        assert!(check_roles(up(Envoy), &[down(Envoy)]).is_ok());
        assert!(check_roles(down(Envoy), &[up(Envoy)]).is_ok());
        assert!(check_roles(down(Route), &[]).is_ok());
        assert!(check_roles(down(Dispatch), &[down(Route)]).is_ok());
        for m in [Route, Dispatch] {
            let e = check_roles(up(m), &[]).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!(
                    "field `failover.mode` = \"{}\": expected \"envoy\" for the upstream role",
                    m.as_str()
                )),
                "{e}"
            );
            // Whichever of the two is configured second is refused.
            for e in [
                check_roles(up(Envoy), &[down(Envoy), down(m)]),
                check_roles(down(m), &[up(Envoy)]),
            ] {
                let e = e.unwrap_err().to_string();
                assert!(
                    e.starts_with(&format!(
                        "field `failover.mode` = \"{}\": expected \"envoy\": this VM also runs the upstream role",
                        m.as_str()
                    )),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn credentials_and_roles() {
        let c = Config::parse(
            br#"{"providers":[{"name":"a","cluster":"ca","models":{"m":"m"},"headers":{"x-goog-api-key":"k"}},
                {"name":"b","cluster":"ca","models":{"m":"m"}}],"failover":{"mode":"envoy"}}"#,
        );
        // Two providers on one cluster cannot be told apart per attempt.
        let e = c.unwrap_err().to_string();
        assert!(
            e.starts_with("field `providers[1].cluster` = \"ca\""),
            "{e}"
        );
        let c = Config::parse(
            br#"{"providers":[{"name":"a","cluster":"ca","models":{"m":"m"},"headers":{"x-goog-api-key":"k"}},
                {"name":"b","cluster":"cb","models":{"m":"m"}}],"failover":{"mode":"envoy"}}"#,
        )
        .unwrap();
        assert_eq!(
            credential_headers(&c),
            ["authorization", "x-api-key", "api-key", "x-goog-api-key"]
        );
        assert!(is_upstream_root_id("market_router_upstream"));
        assert!(!is_upstream_root_id("market_router"));
    }
}
