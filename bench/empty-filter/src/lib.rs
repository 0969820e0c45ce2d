//! A proxy-wasm filter that does nothing: with its default configuration every callback returns
//! Continue. Loaded by the benchmark to measure what any wasm filter costs in Envoy (a VM entry
//! per callback) before it does any work of its own.
//!
//! Benchmark knobs, as a comma-separated plugin configuration (anything else means none):
//! - `pause_request`: hold the request headers until the body is complete (what body-based
//!   routing needs), reading nothing.
//! - `hold_response`: hold the response until its body is complete, reading nothing.
//! - `replay`: both of the above, plus the host calls market-router makes on a routed,
//!   non-streaming request (read the headers and both bodies, set the cluster, timeout and five
//!   response headers, clock reads, the decision-time histogram, the decision property), with
//!   fixed values and none of its logic: what those host calls cost in Envoy by themselves.
//! - `read_one`: read one request header (`:path`) once the body is complete, nothing else.
//! - `floor`: the least a body-routing filter with response-phase failover does: hold the
//!   request headers until the body is complete, read the body, set the cluster header, read
//!   the response status.
//! - `order=<value>`: the least envoy mode's downstream role does: hold the request headers
//!   until the body is complete, read the body, set the order header to `<value>` and
//!   `x-envoy-max-retries`. As the upstream role (root id ending in `_upstream`) it does nothing.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(EmptyRoot::default()) });
}}

/// A decision record of the size market-router writes.
const DECISION: &str = r#"{"model":"gpt-4o-mini","provider":"alpha","status":200,"attempts":1,"tried":[["alpha","ok"]],"strategy":"balanced","score":0.8123,"cost_usd":0.0000123,"cost_estimated":false,"prompt_tokens":50,"completion_tokens":8,"snapshot_age_ms":1234}"#;

#[derive(Debug, Clone, Copy, Default)]
struct Knobs {
    pause_request: bool,
    hold_response: bool,
    replay: bool,
    floor: bool,
    read_one: bool,
}

/// The order header envoy mode hands to header_to_metadata (`order=` knob).
const ORDER_HEADER: &str = "x-market-router-order";

#[derive(Debug, Clone, Copy, Default)]
struct Metrics {
    histogram: Option<u32>,
}

#[derive(Default)]
struct EmptyRoot {
    knobs: Knobs,
    metrics: Metrics,
    order: Option<std::rc::Rc<str>>,
}

impl Context for EmptyRoot {}

impl RootContext for EmptyRoot {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        if plugin_configuration_size > 0 {
            if let Ok(Some(bytes)) = hostcalls::get_buffer(
                BufferType::PluginConfiguration,
                0,
                plugin_configuration_size,
            ) {
                let text = String::from_utf8_lossy(&bytes);
                for knob in text.split(',').map(str::trim) {
                    match knob {
                        "pause_request" => self.knobs.pause_request = true,
                        "hold_response" => self.knobs.hold_response = true,
                        "replay" => self.knobs.replay = true,
                        "floor" => self.knobs.floor = true,
                        "read_one" => self.knobs.read_one = true,
                        k if k.starts_with("order=") => {
                            self.order = Some(k["order=".len()..].into());
                        }
                        _ => {}
                    }
                }
            }
        }
        let upstream = hostcalls::get_property(vec!["plugin_root_id"])
            .ok()
            .flatten()
            .is_some_and(|id| id.ends_with(b"_upstream"));
        if upstream {
            self.order = None;
        }
        if self.knobs.floor || self.order.is_some() {
            self.knobs.pause_request = true;
        }
        if self.knobs.replay {
            self.knobs.pause_request = true;
            self.knobs.hold_response = true;
            self.metrics = Metrics {
                histogram: hostcalls::define_metric(
                    MetricType::Histogram,
                    "empty_filter.replay_us",
                )
                .ok(),
            };
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(EmptyHttp {
            knobs: self.knobs,
            metrics: self.metrics,
            order: self.order.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct EmptyHttp {
    knobs: Knobs,
    metrics: Metrics,
    order: Option<std::rc::Rc<str>>,
}

impl EmptyHttp {
    fn clock(times: usize) {
        for _ in 0..times {
            let _ = hostcalls::get_current_time();
        }
    }
}

impl Context for EmptyHttp {}

impl HttpContext for EmptyHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.knobs.replay {
            let _ = hostcalls::get_map(MapType::HttpRequestHeaders);
        }
        if self.knobs.pause_request && !end_of_stream {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.knobs.pause_request && !end_of_stream {
            return Action::Pause;
        }
        if self.knobs.read_one {
            let _ = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":path");
        }
        if self.knobs.floor {
            let _ = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size);
            let _ = hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                "x-market-router-cluster",
                Some("provider_a"),
            );
        }
        if let Some(order) = &self.order {
            let _ = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size);
            let _ =
                hostcalls::set_map_value(MapType::HttpRequestHeaders, ORDER_HEADER, Some(order));
            let _ = hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                "x-envoy-max-retries",
                Some("1"),
            );
        }
        if self.knobs.replay {
            let _ = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size);
            Self::clock(1);
            let _ = hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                "x-market-router-cluster",
                Some("provider_a"),
            );
            let _ = hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                "x-envoy-upstream-rq-timeout-ms",
                Some("30000"),
            );
            Self::clock(1);
            if let Some(id) = self.metrics.histogram {
                let _ = hostcalls::record_metric(id, 5);
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.knobs.floor {
            let _ = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status");
        }
        if self.knobs.replay {
            Self::clock(1);
            let _ = hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status");
        }
        if self.knobs.hold_response && !end_of_stream {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.knobs.hold_response && !end_of_stream {
            return Action::Pause;
        }
        if self.knobs.replay {
            Self::clock(1);
            let _ = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size);
            for (k, v) in [
                ("x-market-router-provider", "alpha"),
                ("x-market-router-attempts", "1"),
                ("x-market-router-strategy", "balanced"),
                ("x-market-router-snapshot-age-ms", "1234"),
                ("x-market-router-cost-usd", "0.00001230"),
            ] {
                let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, k, Some(v));
            }
            let _ =
                hostcalls::set_property(vec!["market_router.decision"], Some(DECISION.as_bytes()));
        }
        Action::Continue
    }
}
