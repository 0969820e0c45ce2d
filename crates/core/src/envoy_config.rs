//! The Envoy pieces envoy mode (`failover.mode: envoy`) needs, generated from the plugin
//! configuration so that the route's priority groups, the clusters and the plugin's providers
//! cannot drift apart. Used by the `market-router-envoy-config` command, the test bed and the
//! check of the shipped configs (`make validate`). Native builds only.

use crate::config::Config;
use crate::native;
use serde_json::{json, Value};

/// Type URL of the wasm filter's configuration.
const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
/// Root id (and plugin name) of the downstream role.
pub const DOWNSTREAM_ROOT_ID: &str = "market_router";
/// VM id both roles share (one VM per worker, so they share its memory and counters).
pub const VM_ID: &str = "market_router";
/// Paths the filter routes (what `headers::is_llm_path` accepts), as one route match.
pub const LLM_PATH_REGEX: &str = "^/v1/(chat/completions|completions|embeddings)$";
/// Concurrent retries a provider cluster allows (Envoy's default, 3, is far too few).
pub const CLUSTER_MAX_RETRIES: u64 = 1024;

/// Where the module is and how it is configured.
#[derive(Debug, Clone)]
pub struct Module<'a> {
    /// Path of `market_router.wasm` as Envoy sees it.
    pub wasm_file: &'a str,
    /// The plugin configuration text, embedded as is in both roles.
    pub config_json: &'a str,
}

fn wasm_filter(m: &Module<'_>, root_id: &str) -> Value {
    json!({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": WASM_TYPE,
            "config": {
                "name": root_id,
                "root_id": root_id,
                // Both roles hold headers while they read the body.
                "allow_on_headers_stop_iteration": true,
                "vm_config": {
                    "vm_id": VM_ID,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": m.wasm_file}}
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": m.config_json
                }
            }
        }
    })
}

/// Lua that makes Envoy resolve the route again once the order is in the metadata. (The
/// transform filter can clear the route cache too, but it buffers and parses every JSON body
/// to do so, and skips bodies that are not `application/json`.)
pub const ROUTE_REFRESH_LUA: &str = "function envoy_on_request(h) h:clearRouteCache() end\n";

/// The downstream HTTP filters, in order, ending with the router. Other filters (compression,
/// auth) may stand before them or between them and the router. The module itself drops a
/// client-sent order header on every request.
pub fn http_filters(m: &Module<'_>) -> Value {
    json!([
        wasm_filter(m, DOWNSTREAM_ROOT_ID),
        {
            "name": "envoy.filters.http.header_to_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
                "request_rules": [{
                    "header": native::ORDER_HEADER,
                    "remove": true,
                    "on_header_present": {
                        "metadata_namespace": native::METADATA_NAMESPACE,
                        "key": native::METADATA_KEY,
                        "type": "PROTOBUF_VALUE",
                        "encode": "BASE64"
                    }
                }]
            }
        },
        {
            // Re-resolves the route so the cluster specifier reads the order just set.
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": ROUTE_REFRESH_LUA}
            }
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
        }
    ])
}

/// Envoy's `retry_on` for the plugin's `failover.retry_on` (malformed answers and SSE error
/// events reach the router as 502/503 from the upstream role).
pub fn retry_on(config: &Config) -> (String, Vec<u32>) {
    let r = &config.failover.retry_on;
    let mut on: Vec<&str> = Vec::new();
    if r.status_5xx {
        on.push("5xx");
    } else if r.timeout || r.malformed {
        on.push("gateway-error");
    }
    if r.reset {
        on.push("reset");
    }
    if r.connect_failure {
        on.push("connect-failure");
    }
    let mut codes: Vec<u32> = config.failover.retry_on_status.clone();
    if r.status_429 && !codes.contains(&429) {
        codes.push(429);
    }
    if r.status_4xx {
        codes.extend((400..500).filter(|c| *c != 429 || !r.status_429));
    }
    codes.sort_unstable();
    codes.dedup();
    if !codes.is_empty() {
        on.push("retriable-status-codes");
    }
    (on.join(","), codes)
}

fn secs(ms: u64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{}.{:03}s", ms / 1000, ms % 1000)
    }
}

/// The route entry for the LLM paths: the priority-group cluster specifier with one group per
/// provider (named after it) and the retry policy that walks them.
pub fn llm_route(config: &Config) -> Value {
    let groups: Vec<Value> = config
        .providers
        .iter()
        .map(|p| json!({"name": p.name, "clusters": [{"cluster_name": p.cluster, "weight": 1}]}))
        .collect();
    let (on, codes) = retry_on(config);
    let mut retry = json!({
        "retry_on": on,
        "num_retries": config.failover.max_attempts.saturating_sub(1),
        "refresh_cluster_on_retry": true,
        "retry_back_off": {"base_interval": "0.002s", "max_interval": "0.005s"},
        "per_try_timeout": secs(config.failover.attempt_timeout_ms)
    });
    if !codes.is_empty() {
        retry["retriable_status_codes"] = json!(codes);
    }
    json!({
        // POST only: the module routes nothing else, so nothing else may reach a provider.
        "match": {
            "safe_regex": {"regex": LLM_PATH_REGEX},
            "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]
        },
        "route": {
            // Streams run as long as they flow; each attempt's wait for its first byte is
            // bounded by the per-try timeout the filter sets, a non-streaming request by
            // failover.deadline_ms.
            "timeout": "0s",
            "inline_cluster_specifier_plugin": {
                "extension": {
                    "name": "envoy.router.cluster_specifier_plugin.priority_group",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.router.cluster_specifiers.priority_group.v3.PriorityGroupClusterSpecifier",
                        "override_metadata_namespace": native::METADATA_NAMESPACE,
                        "priority_groups": groups
                    }
                }
            },
            "retry_policy": retry
        },
        // A body Envoy cannot buffer is not retried: room for the largest the filter accepts.
        "request_body_buffer_limit": config.max_body_bytes
    })
}

/// The upstream HTTP filters of every provider cluster
/// (`HttpProtocolOptions.http_filters`): the upstream role, then the codec. A filter that sets
/// a secret credential (header mutation from SDS) may stand between them.
pub fn upstream_http_filters(m: &Module<'_>) -> Value {
    json!([
        wasm_filter(m, native::UPSTREAM_ROOT_ID),
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}
        }
    ])
}

/// Circuit breakers of a provider cluster: room for concurrent retries.
pub fn cluster_circuit_breakers() -> Value {
    json!({"thresholds": [{"priority": "DEFAULT", "max_retries": CLUSTER_MAX_RETRIES}]})
}

/// Everything at once, as the command prints it.
pub fn pieces(config: &Config, m: &Module<'_>) -> Value {
    json!({
        "http_filters": http_filters(m),
        "llm_route": llm_route(config),
        "provider_clusters": config.providers.iter().map(|p| p.cluster.as_str()).collect::<Vec<_>>(),
        "cluster_upstream_http_filters": upstream_http_filters(m),
        "cluster_circuit_breakers": cluster_circuit_breakers()
    })
}

/// A YAML rendering of a JSON value (block style; strings as JSON literals, which YAML reads
/// the same way).
pub fn to_yaml(v: &Value, indent: usize) -> String {
    let mut out = String::new();
    yaml(&mut out, v, indent, false);
    out
}

fn yaml(out: &mut String, v: &Value, indent: usize, in_seq: bool) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (i, (k, val)) in m.iter().enumerate() {
                if !(in_seq && i == 0) {
                    out.push_str(&pad);
                }
                out.push_str(&scalar_key(k));
                out.push(':');
                match val {
                    Value::Object(o) if !o.is_empty() => {
                        out.push('\n');
                        yaml(out, val, indent + 2, false);
                    }
                    Value::Array(a) if !a.is_empty() => {
                        out.push('\n');
                        yaml(out, val, indent, false);
                    }
                    _ => {
                        out.push(' ');
                        out.push_str(&flow(val));
                        out.push('\n');
                    }
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for item in a {
                out.push_str(&pad);
                out.push_str("- ");
                match item {
                    Value::Object(o) if !o.is_empty() => yaml(out, item, indent + 2, true),
                    Value::Array(x) if !x.is_empty() => {
                        out.push('\n');
                        yaml(out, item, indent + 2, false);
                    }
                    _ => {
                        out.push_str(&flow(item));
                        out.push('\n');
                    }
                }
            }
        }
        _ => {
            out.push_str(&pad);
            out.push_str(&flow(v));
            out.push('\n');
        }
    }
}

fn scalar_key(k: &str) -> String {
    if k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        k.to_string()
    } else {
        Value::from(k).to_string()
    }
}

fn flow(v: &Value) -> String {
    match v {
        Value::String(s) if s.contains('\n') => Value::from(s.as_str()).to_string(),
        _ => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::parse(
            format!(
                r#"{{"providers":[{{"name":"a","cluster":"provider_a","models":{{"m":"m"}}}},
                    {{"name":"b","cluster":"provider_b","models":{{"m":"m-b"}}}}],
                    "failover":{{"mode":"envoy"{extra}}}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn route_has_one_group_per_provider_and_the_retry_bound() {
        let c = config(r#","max_attempts":2"#);
        let r = llm_route(&c);
        let spec = &r["route"]["inline_cluster_specifier_plugin"]["extension"]["typed_config"];
        assert_eq!(
            spec["priority_groups"],
            json!([{"name": "a", "clusters": [{"cluster_name": "provider_a", "weight": 1}]},
                   {"name": "b", "clusters": [{"cluster_name": "provider_b", "weight": 1}]}])
        );
        assert_eq!(spec["override_metadata_namespace"], "market_router");
        let retry = &r["route"]["retry_policy"];
        assert_eq!(retry["num_retries"], 1);
        assert_eq!(retry["refresh_cluster_on_retry"], true);
        assert_eq!(
            retry["retry_on"],
            "5xx,reset,connect-failure,retriable-status-codes"
        );
        assert_eq!(retry["retriable_status_codes"], json!([429]));
        assert_eq!(r["request_body_buffer_limit"], 1 << 20);
    }

    #[test]
    fn retry_on_follows_the_plugin() {
        let c = config(r#","retry_on":["connect-failure","timeout"]"#);
        assert_eq!(
            retry_on(&c),
            ("gateway-error,connect-failure".to_string(), vec![])
        );
        let c = config(r#","retry_on":["5xx"],"retry_on_status":[408]"#);
        assert_eq!(
            retry_on(&c),
            ("5xx,retriable-status-codes".to_string(), vec![408])
        );
    }

    #[test]
    fn both_roles_share_one_vm_and_one_configuration() {
        let m = Module {
            wasm_file: "x.wasm",
            config_json: "{\"providers\":[]}",
        };
        let down = &http_filters(&m)[0]["typed_config"]["config"];
        let up = &upstream_http_filters(&m)[0]["typed_config"]["config"];
        assert_eq!(down["vm_config"], up["vm_config"]);
        assert_eq!(down["configuration"], up["configuration"]);
        assert_eq!(up["root_id"], native::UPSTREAM_ROOT_ID);
        assert!(native::is_upstream_root_id(up["root_id"].as_str().unwrap()));
        assert!(!native::is_upstream_root_id(
            down["root_id"].as_str().unwrap()
        ));
    }

    #[test]
    fn yaml_rendering_reads_back_as_the_same_value() {
        let m = Module {
            wasm_file: "x.wasm",
            config_json: "{\n  \"providers\": []\n}\n",
        };
        let v = pieces(&config(""), &m);
        let y = to_yaml(&v, 0);
        // Every line is `key: value`, `- ...` or a nested key; strings are JSON literals.
        assert!(y.contains("\n- name: \"envoy.filters.http.wasm\"\n"), "{y}");
        assert!(
            y.contains("value: \"{\\n  \\\"providers\\\": []\\n}\\n\""),
            "{y}"
        );
    }
}
