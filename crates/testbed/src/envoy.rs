//! Envoy bootstrap generation and a running-Envoy handle.

use super::http::{get, wait_ready_while};
use super::procs::{envoy_bin, wasm_path, Proc, TempDir};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// How long [`Envoy::start`] waits for `/ready` (an Envoy that exits is seen at once). Its main
/// thread compiles the module before it answers: on a loaded 2-core machine, beside other
/// Envoys doing the same, that was seen to take over 30 s (as long as Kong's bed allows).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One upstream cluster for an LLM provider on 127.0.0.1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderCluster {
    /// Cluster name (what the filter's config and `cluster_header` name).
    pub name: String,
    /// Port on 127.0.0.1.
    pub port: u16,
    /// When set, an upstream header-mutation filter sets `authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Reach it over HTTP/2 without TLS (h2c, prior knowledge) instead of HTTP/1.1.
    pub http2: bool,
}

impl ProviderCluster {
    /// A cluster without credentials.
    pub fn new(name: &str, port: u16) -> ProviderCluster {
        ProviderCluster {
            name: name.to_string(),
            port,
            api_key: None,
            http2: false,
        }
    }

    /// Reaches the provider over HTTP/2 without TLS (h2c).
    pub fn h2c(mut self) -> ProviderCluster {
        self.http2 = true;
        self
    }

    /// Sets the key the cluster injects.
    pub fn with_key(mut self, key: &str) -> ProviderCluster {
        self.api_key = Some(key.to_string());
        self
    }
}

/// The market-stats sidecar cluster on 127.0.0.1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarCluster {
    /// Cluster name.
    pub name: String,
    /// Port on 127.0.0.1.
    pub port: u16,
}

/// Which HTTP filter runs before the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// No filter: Envoy alone, routing everything to the first provider cluster (baseline).
    None,
    /// The market-router module at [`wasm_path`], root id `market_router`.
    MarketRouter {
        /// Plugin configuration JSON.
        config_json: String,
    },
    /// The market-router module in envoy mode: the filter chain, LLM route and provider
    /// clusters' upstream filters come from `market_router_core::envoy_config`, as the
    /// `market-router-envoy-config` command prints them.
    MarketRouterEnvoy {
        /// Plugin configuration JSON (`failover.mode: envoy`).
        config_json: String,
    },
    /// Any proxy-wasm module.
    Wasm {
        /// Module file.
        path: PathBuf,
        /// Plugin configuration JSON.
        config_json: String,
        /// Root id (also used as plugin name and VM id).
        root_id: String,
    },
}

/// An Envoy bootstrap for the test bed: one listener, provider clusters, an optional sidecar
/// cluster and an optional wasm filter. Ports left at 0 are picked by Envoy and discovered by
/// [`Envoy::start`].
#[derive(Debug, Clone)]
pub struct EnvoyConfig {
    /// Listener port (0 = any).
    pub port: u16,
    /// Admin port (0 = any).
    pub admin_port: u16,
    /// Provider clusters.
    pub providers: Vec<ProviderCluster>,
    /// Market sidecar cluster.
    pub sidecar: Option<SidecarCluster>,
    /// Filter before the router.
    pub filter: Filter,
    /// Request header the route takes the cluster from (wasm variants).
    pub cluster_header: String,
    /// Route timeout.
    pub route_timeout: Duration,
    /// Route `idle_timeout` (none when `None`): bounds a stream that sends nothing.
    pub route_idle_timeout: Option<Duration>,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Write an access log line per request to stdout (the Envoy log).
    pub access_log: bool,
    /// `-l` level.
    pub log_level: String,
    /// `--component-log-level` value (empty = none).
    pub component_log_level: String,
    /// Text format of the access log lines (Envoy's default format when `None`).
    pub access_log_format: Option<String>,
    /// Bootstrap `stats_flush_interval` (Envoy's default, 5 s, when `None`). Histograms show
    /// new samples in admin `/stats` only after a flush.
    pub stats_flush_interval: Option<Duration>,
    /// `--file-flush-interval-msec`: how often buffered log files, the stdout access log
    /// included, are written out (Envoy's default, 10 s, when `None`).
    pub file_flush_interval: Option<Duration>,
    /// Envoy's compressor filters (gzip, brotli, zstd) in front of the filter, as the shipped
    /// configurations have them.
    pub compression: bool,
    /// Explicit routes for other paths (wasm variants): `(path, cluster)`.
    pub explicit_routes: Vec<(String, String)>,
    /// Outside envoy mode: give every provider cluster envoy mode's upstream role with this
    /// plugin configuration anyway (a deployment that left it there).
    pub upstream_role: Option<String>,
    /// Envoy mode: the LLM route generated from this plugin configuration instead of the
    /// module's (a route that drifted from the plugin's providers).
    pub envoy_route_from: Option<String>,
}

impl Default for EnvoyConfig {
    fn default() -> Self {
        EnvoyConfig {
            port: 0,
            admin_port: 0,
            providers: Vec::new(),
            sidecar: None,
            filter: Filter::None,
            cluster_header: "x-market-router-cluster".to_string(),
            route_timeout: Duration::from_secs(120),
            route_idle_timeout: None,
            connect_timeout: Duration::from_secs(1),
            access_log: false,
            log_level: "warning".to_string(),
            component_log_level: "wasm:debug".to_string(),
            access_log_format: None,
            stats_flush_interval: None,
            file_flush_interval: None,
            compression: false,
            explicit_routes: Vec::new(),
            upstream_role: None,
            envoy_route_from: None,
        }
    }
}

/// The paths the filter routes; the only ones a route sends by the cluster header.
pub const LLM_PATHS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];

/// The route for every other path: an OpenAI-style 404 from Envoy itself.
const NOT_FOUND_ROUTE: &str = r#"              - match: { prefix: "/" }
                direct_response:
                  status: 404
                  body: { inline_string: "{\"error\":{\"message\":\"no route for this path\",\"type\":\"invalid_request_error\",\"code\":\"not_found\"}}" }
                response_headers_to_add:
                - header: { key: content-type, value: application/json }
"#;

/// Envoy's compressors (gzip, brotli, zstd: whichever the client prefers) in front of the
/// filter: answers, local replies included, reach the client in an encoding it accepted.
const COMPRESSORS: &str = r#"          - name: envoy.filters.http.compressor.gzip
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor
              compressor_library:
                name: gzip
                typed_config: { "@type": type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip }
          - name: envoy.filters.http.compressor.brotli
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor
              compressor_library:
                name: brotli
                typed_config: { "@type": type.googleapis.com/envoy.extensions.compression.brotli.compressor.v3.Brotli }
          - name: envoy.filters.http.compressor.zstd
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor
              compressor_library:
                name: zstd
                typed_config: { "@type": type.googleapis.com/envoy.extensions.compression.zstd.compressor.v3.Zstd }
"#;

/// A YAML double-quoted scalar. A JSON string literal is one: JSON's escapes are a subset of
/// YAML's.
fn q(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

fn secs(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{}.{:03}s", ms / 1000, ms % 1000)
    }
}

impl EnvoyConfig {
    /// Defaults: ports picked by Envoy, no clusters, no filter, 120 s route timeout.
    pub fn new() -> EnvoyConfig {
        EnvoyConfig::default()
    }

    /// Sets the listener port.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Sets the admin port.
    pub fn admin_port(mut self, port: u16) -> Self {
        self.admin_port = port;
        self
    }

    /// Adds a provider cluster.
    pub fn provider(mut self, cluster: ProviderCluster) -> Self {
        self.providers.push(cluster);
        self
    }

    /// Sets the market sidecar cluster.
    pub fn sidecar(mut self, name: &str, port: u16) -> Self {
        self.sidecar = Some(SidecarCluster {
            name: name.to_string(),
            port,
        });
        self
    }

    /// Sets the filter.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }

    /// Uses the market-router module with this configuration.
    pub fn market_router(self, config_json: &str) -> Self {
        self.filter(Filter::MarketRouter {
            config_json: config_json.to_string(),
        })
    }

    /// Sets the header the route reads the cluster from.
    pub fn cluster_header(mut self, header: &str) -> Self {
        self.cluster_header = header.to_string();
        self
    }

    /// Sets the route timeout.
    pub fn route_timeout(mut self, timeout: Duration) -> Self {
        self.route_timeout = timeout;
        self
    }

    /// Sets the route's `idle_timeout`.
    pub fn route_idle_timeout(mut self, timeout: Duration) -> Self {
        self.route_idle_timeout = Some(timeout);
        self
    }

    /// Sets the upstream connect timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Enables the stdout access log.
    pub fn access_log(mut self, on: bool) -> Self {
        self.access_log = on;
        self
    }

    /// Sets the access log's text format (command operators such as `%RESPONSE_CODE%` or
    /// `%FILTER_STATE(wasm.market_router.decision:PLAIN)%`; end it with `\n`). Only used with
    /// [`EnvoyConfig::access_log`].
    pub fn access_log_format(mut self, format: &str) -> Self {
        self.access_log_format = Some(format.to_string());
        self
    }

    /// Sets how often Envoy flushes stats (and merges histograms for admin `/stats`).
    pub fn stats_flush_interval(mut self, interval: Duration) -> Self {
        self.stats_flush_interval = Some(interval);
        self
    }

    /// Sets how often Envoy writes out buffered log files (access log lines show up in
    /// [`Envoy::log_contents`] only then).
    pub fn file_flush_interval(mut self, interval: Duration) -> Self {
        self.file_flush_interval = Some(interval);
        self
    }

    /// Routes `path` (exactly) to `cluster`, whatever the headers say: an API the filter does
    /// not route, served by one cluster.
    pub fn explicit_route(mut self, path: &str, cluster: &str) -> Self {
        self.explicit_routes
            .push((path.to_string(), cluster.to_string()));
        self
    }

    /// Adds Envoy's compressor filters before the filter.
    pub fn compression(mut self, on: bool) -> Self {
        self.compression = on;
        self
    }

    /// Sets `-l` (e.g. `warning`, `info`, `debug`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    /// Sets `--component-log-level` (e.g. `wasm:debug`; empty for none).
    pub fn component_log_level(mut self, levels: &str) -> Self {
        self.component_log_level = levels.to_string();
        self
    }

    /// Uses the market-router module in envoy mode with this configuration.
    pub fn market_router_envoy(self, config_json: &str) -> Self {
        self.filter(Filter::MarketRouterEnvoy {
            config_json: config_json.to_string(),
        })
    }

    /// Puts envoy mode's upstream role, with this configuration, on every provider cluster
    /// although the filter is not in envoy mode.
    pub fn upstream_role(mut self, config_json: &str) -> Self {
        self.upstream_role = Some(config_json.to_string());
        self
    }

    /// Envoy mode: generates the LLM route from `config_json` instead of the module's
    /// configuration (a route that does not match the plugin's providers).
    pub fn envoy_route_from(mut self, config_json: &str) -> Self {
        self.envoy_route_from = Some(config_json.to_string());
        self
    }

    /// Envoy mode's generated pieces (`None` in the other variants).
    fn envoy_mode(&self) -> Option<(market_router_core::config::Config, serde_json::Value)> {
        let Filter::MarketRouterEnvoy { config_json } = &self.filter else {
            return None;
        };
        let config = market_router_core::config::Config::parse(config_json.as_bytes()).ok()?;
        let wasm = wasm_path().to_string_lossy().into_owned();
        let m = market_router_core::envoy_config::Module {
            wasm_file: &wasm,
            config_json,
        };
        let mut pieces = market_router_core::envoy_config::pieces(&config, &m);
        if let Some(other) = &self.envoy_route_from {
            let c = market_router_core::config::Config::parse(other.as_bytes()).ok()?;
            pieces["llm_route"] = market_router_core::envoy_config::llm_route(&c);
        }
        Some((config, pieces))
    }

    /// The bootstrap YAML.
    pub fn to_yaml(&self) -> String {
        let envoy_mode = self.envoy_mode();
        let mut y = String::new();
        if let Some(interval) = self.stats_flush_interval {
            let _ = writeln!(y, "stats_flush_interval: {}", secs(interval));
        }
        y.push_str(&listener_head(self.admin_port, self.port));
        if self.access_log {
            y.push_str(
                r#"          access_log:
          - name: envoy.access_loggers.stdout
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
"#,
            );
            if let Some(format) = &self.access_log_format {
                let _ = write!(
                    y,
                    r#"              log_format:
                text_format_source:
                  inline_string: {}
"#,
                    q(format)
                );
            }
        }
        let timeout = match self.route_idle_timeout {
            Some(idle) => format!("{}, idle_timeout: {}", secs(self.route_timeout), secs(idle)),
            None => secs(self.route_timeout),
        };
        let action = match (&self.filter, self.providers.first()) {
            (Filter::None, Some(first)) => format!(
                "route: {{ cluster: {}, timeout: {timeout} }}",
                q(&first.name)
            ),
            (Filter::None, None) => "direct_response: { status: 503 }".to_string(),
            _ => format!(
                "route: {{ cluster_header: {}, timeout: {timeout} }}\n                request_headers_to_remove: [{}]",
                q(&self.cluster_header),
                q(&self.cluster_header)
            ),
        };
        let _ = write!(
            y,
            r#"          route_config:
            name: local_route
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
"#
        );
        if matches!(self.filter, Filter::None) {
            let _ = writeln!(
                y,
                "              - match: {{ prefix: \"/\" }}\n                {action}"
            );
        } else {
            // As the shipped configurations: only the LLM paths are routed by the market
            // (envoy mode: the generated route, JSON being YAML; otherwise by the cluster
            // header); anything else is a 404 that reaches no cluster.
            if let Some((_, p)) = &envoy_mode {
                let _ = writeln!(y, "              - {}", p["llm_route"]);
            }
            for path in LLM_PATHS.iter().filter(|_| envoy_mode.is_none()) {
                let _ = writeln!(
                    y,
                    "              - match: {{ path: {}, headers: [{{ name: \":method\", string_match: {{ exact: POST }} }}] }}\n                {action}",
                    q(path)
                );
            }
            for (path, cluster) in &self.explicit_routes {
                let _ = writeln!(
                    y,
                    "              - match: {{ path: {} }}\n                route: {{ cluster: {}, timeout: {} }}",
                    q(path),
                    q(cluster),
                    secs(self.route_timeout)
                );
            }
            y.push_str(NOT_FOUND_ROUTE);
        }
        y.push_str("          http_filters:\n");
        if self.compression {
            y.push_str(COMPRESSORS);
        }
        if let Some((_, p)) = &envoy_mode {
            // All but the router, which closes the list below.
            let filters = p["http_filters"]
                .as_array()
                .map_or(&[][..], |a| a.as_slice());
            for f in &filters[..filters.len().saturating_sub(1)] {
                let _ = writeln!(y, "          - {f}");
            }
        }
        let wasm = match &self.filter {
            Filter::None | Filter::MarketRouterEnvoy { .. } => None,
            Filter::MarketRouter { config_json } => {
                Some((wasm_path(), config_json.as_str(), "market_router"))
            }
            Filter::Wasm {
                path,
                config_json,
                root_id,
            } => Some((path.clone(), config_json.as_str(), root_id.as_str())),
        };
        if let Some((path, config_json, root_id)) = wasm {
            let _ = write!(
                y,
                r#"          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {id}
                root_id: {id}
                vm_config:
                  vm_id: {id}
                  runtime: envoy.wasm.runtime.v8
                  code:
                    local:
                      filename: {file}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {value}
                allow_on_headers_stop_iteration: true
                fail_open: false
"#,
                id = q(root_id),
                file = q(&path.to_string_lossy()),
                value = q(config_json),
            );
        }
        y.push_str(
            r#"          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
        );
        if self.providers.is_empty() && self.sidecar.is_none() {
            y.push_str("  clusters: []\n");
            return y;
        }
        y.push_str("  clusters:\n");
        for p in &self.providers {
            match &envoy_mode {
                Some((config, pieces)) if config.providers.iter().any(|c| c.cluster == p.name) => {
                    self.write_envoy_mode_cluster(&mut y, p, pieces)
                }
                _ => match &self.upstream_role {
                    Some(config_json) => {
                        let wasm = wasm_path().to_string_lossy().into_owned();
                        let m = market_router_core::envoy_config::Module {
                            wasm_file: &wasm,
                            config_json,
                        };
                        let pieces = serde_json::json!({
                            "cluster_upstream_http_filters": market_router_core::envoy_config::upstream_http_filters(&m),
                            "cluster_circuit_breakers": market_router_core::envoy_config::cluster_circuit_breakers(),
                        });
                        self.write_envoy_mode_cluster(&mut y, p, &pieces)
                    }
                    None => {
                        self.write_cluster(&mut y, &p.name, p.port, p.api_key.as_deref(), p.http2)
                    }
                },
            }
        }
        if let Some(s) = &self.sidecar {
            self.write_cluster(&mut y, &s.name, s.port, None, false);
        }
        y
    }

    /// A provider cluster in envoy mode: the upstream role first, then (when the cluster has a
    /// key) a header mutation that sets it, as a deployment setting keys from secrets would.
    fn write_envoy_mode_cluster(
        &self,
        y: &mut String,
        p: &ProviderCluster,
        pieces: &serde_json::Value,
    ) {
        let mut filters = pieces["cluster_upstream_http_filters"].clone();
        if let (Some(key), Some(list)) = (&p.api_key, filters.as_array_mut()) {
            list.insert(
                1,
                serde_json::json!({
                    "name": "envoy.filters.http.header_mutation",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                        "mutations": {"request_mutations": [{"append": {
                            "header": {"key": "authorization", "value": format!("Bearer {key}")},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
                        }}]}
                    }
                }),
            );
        }
        // The plain cluster, then (at the protocol options' level) its filters and (back at
        // the cluster's level) its circuit breakers.
        self.write_cluster(y, &p.name, p.port, None, p.http2);
        let _ = writeln!(y, "        http_filters: {filters}");
        let _ = writeln!(
            y,
            "    circuit_breakers: {}",
            pieces["cluster_circuit_breakers"]
        );
    }

    fn write_cluster(
        &self,
        y: &mut String,
        name: &str,
        port: u16,
        api_key: Option<&str>,
        http2: bool,
    ) {
        let _ = write!(
            y,
            r#"  - name: {name}
    type: STATIC
    connect_timeout: {connect}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          {protocol}: {{}}
"#,
            name = q(name),
            connect = secs(self.connect_timeout),
            protocol = if http2 {
                "http2_protocol_options"
            } else {
                "http_protocol_options"
            },
        );
        if let Some(key) = api_key {
            // Upstream filters: the key is set on the way out of this cluster only.
            let _ = write!(
                y,
                r#"        http_filters:
        - name: envoy.filters.http.header_mutation
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
            mutations:
              request_mutations:
              - append:
                  header:
                    key: authorization
                    value: {value}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
        - name: envoy.filters.http.upstream_codec
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec
"#,
                value = q(&format!("Bearer {key}")),
            );
        }
    }

    /// Runs `envoy --mode validate` on this config. `Ok(output)` when Envoy accepts it,
    /// `Err(output)` otherwise. Validation instantiates wasm filters, so the module must exist
    /// and accept its configuration.
    pub fn validate(&self) -> Result<String, String> {
        let envoy = envoy_bin()?;
        let dir = TempDir::new("envoy-validate")?;
        let yaml = dir.join("envoy.yaml");
        fs::write(&yaml, self.to_yaml())
            .map_err(|e| format!("cannot write {}: {e}", yaml.display()))?;
        let out = Command::new(&envoy)
            .arg("--mode")
            .arg("validate")
            .arg("-c")
            .arg(&yaml)
            .arg("--disable-hot-restart")
            .arg("-l")
            .arg("warning")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", envoy.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "envoy --mode validate failed ({}):\n{text}",
                out.status
            ))
        }
    }
}

/// How to run one Envoy process.
struct Launch<'a> {
    concurrency: u32,
    log_level: &'a str,
    component_log_level: &'a str,
    file_flush_interval: Option<Duration>,
    /// 0: discover.
    admin_port: u16,
    /// 0: discover the `ingress` listener's.
    port: u16,
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    proc: Proc,
    port: u16,
    admin_port: u16,
    yaml_path: PathBuf,
}

impl Envoy {
    /// Writes the config to a temp dir and runs `envoy -c <file> --concurrency <n>
    /// --disable-hot-restart` (no shared memory, so any number of Envoys can run side by side),
    /// then waits for admin `/ready` and discovers ports that were left at 0.
    pub fn start(cfg: &EnvoyConfig, concurrency: u32) -> Result<Envoy, String> {
        Self::launch(
            &cfg.to_yaml(),
            &Launch {
                concurrency,
                log_level: &cfg.log_level,
                component_log_level: &cfg.component_log_level,
                file_flush_interval: cfg.file_flush_interval,
                admin_port: cfg.admin_port,
                port: cfg.port,
            },
        )
    }

    /// Runs a hand-written bootstrap the same way. `yaml` binds its admin address and a listener
    /// named `ingress` to port 0 (both are discovered).
    pub fn start_bootstrap(yaml: &str, concurrency: u32) -> Result<Envoy, String> {
        Self::launch(
            yaml,
            &Launch {
                concurrency,
                log_level: "warning",
                component_log_level: "",
                file_flush_interval: None,
                admin_port: 0,
                port: 0,
            },
        )
    }

    fn launch(yaml: &str, l: &Launch<'_>) -> Result<Envoy, String> {
        let envoy = envoy_bin()?;
        let dir = TempDir::new("envoy")?;
        let yaml_path = dir.join("envoy.yaml");
        let admin_file = dir.join("admin-address");
        fs::write(&yaml_path, yaml)
            .map_err(|e| format!("cannot write {}: {e}", yaml_path.display()))?;
        let mut cmd = Command::new(&envoy);
        cmd.arg("-c")
            .arg(&yaml_path)
            .arg("--concurrency")
            .arg(l.concurrency.max(1).to_string())
            .arg("--disable-hot-restart")
            .arg("--admin-address-path")
            .arg(&admin_file)
            .arg("-l")
            .arg(l.log_level);
        if !l.component_log_level.is_empty() {
            cmd.arg("--component-log-level").arg(l.component_log_level);
        }
        if let Some(interval) = l.file_flush_interval {
            cmd.arg("--file-flush-interval-msec")
                .arg(interval.as_millis().max(1).to_string());
        }
        let mut proc = Proc::spawn_in("envoy", &mut cmd, dir)?;
        // Errors about an exited process carry the log tail already.
        let fail = |proc: &Proc, e: String| {
            if e.contains("log tail:") {
                format!("Envoy failed to start: {e}")
            } else {
                format!(
                    "Envoy failed to start: {e}\nlog tail:\n{}",
                    proc.log_tail(40)
                )
            }
        };

        let admin_port = if l.admin_port != 0 {
            l.admin_port
        } else {
            match read_admin_address(&mut proc, &admin_file, READY_TIMEOUT) {
                Ok(p) => p,
                Err(e) => return Err(fail(&proc, e)),
            }
        };
        let ready = format!("http://127.0.0.1:{admin_port}/ready");
        if let Err(e) = wait_ready_while(&ready, READY_TIMEOUT, || proc.check_running()) {
            return Err(fail(&proc, e));
        }
        let port = if l.port != 0 {
            l.port
        } else {
            match listener_port(admin_port) {
                Ok(p) => p,
                Err(e) => return Err(fail(&proc, e)),
            }
        };
        Ok(Envoy {
            proc,
            port,
            admin_port,
            yaml_path,
        })
    }

    /// Listener port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Admin port.
    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// `http://127.0.0.1:<admin port><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin_port, path)
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The bootstrap file Envoy runs with.
    pub fn yaml_path(&self) -> &Path {
        &self.yaml_path
    }

    /// Envoy's whole log so far.
    pub fn log_contents(&self) -> String {
        self.proc.log_contents()
    }

    /// Last `n` lines of Envoy's log.
    pub fn log_tail(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }

    /// `Err` with the log tail if Envoy has exited.
    pub fn check_running(&mut self) -> Result<(), String> {
        self.proc.check_running()
    }
    /// A counter the filter writes in batches (at least every 250 ms), once it has settled:
    /// reads until two reads 300 ms apart agree, for at most 5 s.
    pub fn stat_settled(&self, name: &str) -> Result<Option<u64>, String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut last = self.stat(name)?;
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = self.stat(name)?;
            if now == last || std::time::Instant::now() >= deadline {
                return Ok(now);
            }
            last = now;
        }
    }

    /// A counter or gauge that must exist, read once settled (see [`Envoy::stat_settled`]):
    /// an error naming it when Envoy has no such stat, so a misspelled or undefined counter
    /// fails the test instead of reading as 0.
    pub fn counter(&self, name: &str) -> Result<u64, String> {
        self.stat_settled(name)?.ok_or_else(|| {
            format!("Envoy has no stat `{name}` (misspelled, or never defined by the filter)")
        })
    }

    /// Value of one counter or gauge from admin `/stats` (`None` if Envoy has no such stat).
    pub fn stat(&self, name: &str) -> Result<Option<u64>, String> {
        let r = get(
            &self.admin_url(&format!("/stats?filter=^{name}$")),
            Duration::from_secs(5),
        )?;
        if r.status != 200 {
            return Err(format!("admin /stats answered {}", r.status));
        }
        Ok(r.text().lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            if k.trim() == name {
                v.trim().parse().ok()
            } else {
                None
            }
        }))
    }
}

/// Waits for Envoy to write its admin address (`127.0.0.1:<port>`) to `file`.
/// The start of a bootstrap: the admin address and the `ingress` listener down to its HTTP
/// connection manager's `codec_type` (ports at 0 are picked by Envoy and discovered by
/// [`Envoy::start`] and [`Envoy::start_bootstrap`]).
pub fn listener_head(admin_port: u16, port: u16) -> String {
    format!(
        r#"admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}
static_resources:
  listeners:
  - name: ingress
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    # Room for a held answer (up to the filter's 512 KiB) plus one read of the upstream's
    # (up to its own 1 MiB buffer), as the shipped configurations have it.
    per_connection_buffer_limit_bytes: 4194304
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: AUTO
"#
    )
}

fn read_admin_address(proc: &mut Proc, file: &Path, timeout: Duration) -> Result<u16, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = fs::read_to_string(file) {
            if let Some(port) = s
                .trim()
                .rsplit(':')
                .next()
                .and_then(|p| p.parse::<u16>().ok())
            {
                return Ok(port);
            }
        }
        proc.check_running()?;
        if Instant::now() >= deadline {
            return Err(format!(
                "no admin address in {} after {} ms",
                file.display(),
                timeout.as_millis()
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Port of the `ingress` listener, from admin `/listeners?format=json`.
fn listener_port(admin_port: u16) -> Result<u16, String> {
    let r = get(
        &format!("http://127.0.0.1:{admin_port}/listeners?format=json"),
        Duration::from_secs(5),
    )?;
    let v = r.json()?;
    v["listener_statuses"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == "ingress"))
        .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| format!("no ingress listener port in admin /listeners: {}", r.text()))
}
