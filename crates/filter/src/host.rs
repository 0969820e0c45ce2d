//! The only module that calls the proxy-wasm host. Every call goes through
//! `proxy_wasm::hostcalls` and every error is turned into a value: the SDK's convenience
//! methods panic on host errors, and a panic kills the VM for every request on the worker.

pub(crate) use market_router_core::host::header;
use market_router_core::host::{self as core_host, Host, HostError, HttpHost, Properties};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, Status};
use std::time::{Duration, UNIX_EPOCH};

/// Milliseconds since the Unix epoch by the host's clock (0 if unavailable).
pub(crate) fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Header names as the filter compares them: lowercase. Envoy hands them over lowercase
/// already; Kong keeps the case they arrived in (e.g. `Transfer-Encoding` of a dispatched
/// call's answer), so they are lowercased here, in place, for every host.
fn lowercase_names(mut headers: Vec<(String, String)>) -> Vec<(String, String)> {
    for (k, _) in &mut headers {
        k.make_ascii_lowercase();
    }
    headers
}

/// All request headers (empty when unavailable), names lowercase.
pub(crate) fn request_headers() -> Vec<(String, String)> {
    lowercase_names(hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default())
}

/// Sets (or with `None` removes) a request header; false when the host refused.
pub(crate) fn set_request_header(name: &str, value: Option<&str>) -> bool {
    hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value).is_ok()
}

/// One response header.
pub(crate) fn response_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpResponseHeaders, name)
        .ok()
        .flatten()
}

/// Removes a response header; false when the host refused.
pub(crate) fn remove_response_header(name: &str) -> bool {
    hostcalls::set_map_value(MapType::HttpResponseHeaders, name, None).is_ok()
}

/// Sets a response header; false when the host refused.
pub(crate) fn set_response_header(name: &str, value: &str) -> bool {
    hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value)).is_ok()
}

/// Reads `size` bytes of a buffer.
pub(crate) fn buffer(kind: BufferType, size: usize) -> Option<Vec<u8>> {
    if size == 0 {
        return Some(Vec::new());
    }
    hostcalls::get_buffer(kind, 0, size)
        .ok()
        .map(Option::unwrap_or_default)
}

/// Reads `size` bytes of a buffer from byte `start` on.
pub(crate) fn buffer_at(kind: BufferType, start: usize, size: usize) -> Option<Vec<u8>> {
    if size == 0 {
        return Some(Vec::new());
    }
    hostcalls::get_buffer(kind, start, size)
        .ok()
        .map(Option::unwrap_or_default)
}

/// Replaces all response headers; false when the host refused.
pub(crate) fn set_response_headers(headers: &[(&str, &str)]) -> bool {
    hostcalls::set_map(MapType::HttpResponseHeaders, headers.to_vec()).is_ok()
}

/// Resumes a response the filter paused; false when the host refused.
pub(crate) fn resume_response() -> bool {
    hostcalls::resume_http_response().is_ok()
}

/// Replaces a buffer's first `size` bytes with `value`.
pub(crate) fn set_buffer(kind: BufferType, size: usize, value: &[u8]) -> bool {
    hostcalls::set_buffer(kind, 0, size, value).is_ok()
}

/// A property as UTF-8 (lossy).
pub(crate) fn property(path: &[&str]) -> Option<String> {
    hostcalls::get_property(path.to_vec())
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// The host's shared data behind the core's [`Host`] trait, every `Status` a typed
/// [`HostError`]; the rules on top of it (the overwrite loop, CAS updates) are the core's.
pub(crate) struct Wasm;

/// A host status as the core's typed error.
pub(crate) fn host_error(s: Status) -> HostError {
    match s {
        Status::NotFound => HostError::NotFound,
        Status::BadArgument => HostError::BadArgument,
        Status::SerializationFailure => HostError::SerializationFailure,
        Status::ParseFailure => HostError::ParseFailure,
        Status::Empty => HostError::Empty,
        Status::CasMismatch => HostError::CasMismatch,
        Status::InternalFailure => HostError::InternalFailure,
        other => HostError::Other(other as u32),
    }
}

impl Host for Wasm {
    fn get_shared(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), HostError> {
        hostcalls::get_shared_data(key).map_err(host_error)
    }

    fn set_shared(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(host_error)
    }
}

impl HttpHost for Wasm {
    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError> {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value).map_err(host_error)
    }

    fn set_request_body(&self, size: usize, body: &[u8]) -> Result<(), HostError> {
        hostcalls::set_buffer(BufferType::HttpRequestBody, 0, size, body).map_err(host_error)
    }

    fn response_header(&self, name: &str) -> Result<Option<String>, HostError> {
        hostcalls::get_map_value(MapType::HttpResponseHeaders, name).map_err(host_error)
    }

    fn set_response_header(&self, name: &str, value: &str) -> Result<(), HostError> {
        hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value))
            .map_err(host_error)
    }

    fn send_reply(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HostError> {
        hostcalls::send_http_response(status, headers.to_vec(), Some(body)).map_err(host_error)
    }

    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, HostError> {
        dispatch(cluster, headers, body, timeout_ms).map_err(host_error)
    }
}

impl Properties for Wasm {
    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        hostcalls::get_property(path.to_vec()).map_err(host_error)
    }

    fn set_property(&self, name: &str, value: &[u8]) -> Result<(), HostError> {
        hostcalls::set_property(vec![name], Some(value)).map_err(host_error)
    }
}

/// A shared-data value and its CAS; `None` when the host refused (a missing key is empty).
pub(crate) fn shared_get(key: &str) -> Option<(Vec<u8>, u32)> {
    core_host::shared_get(&Wasm, key)
}

/// Starts an HTTP call to a host cluster.
pub(crate) fn dispatch(
    cluster: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout_ms: u64,
) -> Result<u32, Status> {
    hostcalls::dispatch_http_call(
        cluster,
        headers.to_vec(),
        if body.is_empty() { None } else { Some(body) },
        Vec::new(),
        Duration::from_millis(timeout_ms.max(1)),
    )
}

/// The body of the call response being delivered (`size` bytes). `None` when the host
/// refuses it: Kong does for an answer whose connection closed before its announced body was
/// complete (the SDK's `get_buffer` would panic there, hence the checked call).
pub(crate) fn call_response_body(size: usize) -> Option<Vec<u8>> {
    if size == 0 {
        return Some(Vec::new());
    }
    match market_router_hostcall::get_buffer(BufferType::HttpCallResponseBody as u32, 0, size) {
        Ok(b) => Some(b.unwrap_or_default()),
        Err(_) => None,
    }
}

/// Headers of the call response being delivered, names lowercase.
pub(crate) fn call_response_headers() -> Vec<(String, String)> {
    lowercase_names(hostcalls::get_map(MapType::HttpCallResponseHeaders).unwrap_or_default())
}

/// The host's word that the call being delivered failed at the transport level after its
/// answer began: Kong's `:dispatch_status` (e.g. `broken connection` for an answer cut
/// mid-body, `timeout`). `None` when the call completed, and on hosts that do not say
/// (Envoy answers NotFound). Asked only when the call has headers (Envoy refuses the lookup
/// otherwise, which the SDK turns into a panic). The body of a failed call must not be read:
/// Kong refuses it (BadArgument), another panic in the SDK.
pub(crate) fn call_failure(num_headers: usize) -> Option<String> {
    // Without headers only where the host is known to answer (Kong; never probed from here,
    // as this also runs in the root context).
    let says = CAPS.with(|c| c.get()).is_some_and(|c| c.dispatch_status);
    if num_headers == 0 && !says {
        return None;
    }
    match hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":dispatch_status") {
        Ok(Some(s)) if !s.is_empty() && s != "ok" => Some(s),
        _ => None,
    }
}

/// Sends a local reply; false when the host refused.
pub(crate) fn send_response(status: u32, headers: &[(&str, &str)], body: &[u8]) -> bool {
    hostcalls::send_http_response(status, headers.to_vec(), Some(body)).is_ok()
}

/// Sets the root context's tick period.
pub(crate) fn set_tick_period_ms(ms: u64) -> bool {
    hostcalls::set_tick_period(Duration::from_millis(ms)).is_ok()
}

/// Plugin configuration bytes.
pub(crate) fn plugin_configuration() -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
        .ok()
        .flatten()
}

/// Defines a metric; `None` when the host refused (then the metric is simply not recorded).
pub(crate) fn define_metric(kind: proxy_wasm::types::MetricType, name: &str) -> Option<u32> {
    // define_metric panics on any status but Ok: guard the name so the host has no reason to refuse.
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return None;
    }
    hostcalls::define_metric(kind, name).ok()
}

/// Adds to a counter or gauge.
pub(crate) fn increment_metric(id: u32, by: i64) {
    let _ = hostcalls::increment_metric(id, by);
}

/// Records a gauge value or a histogram sample.
pub(crate) fn record_metric(id: u32, value: u64) {
    let _ = hostcalls::record_metric(id, value);
}

/// Writes the per-request decision record where the host keeps it (see
/// [`HostCaps::decision_property`]); false when this host has no such place or refused.
/// Call from an HTTP context only.
pub(crate) fn set_decision_property(value: &[u8]) -> bool {
    match caps().decision_property {
        Some(path) => hostcalls::set_property(path.to_vec(), Some(value)).is_ok(),
        None => false,
    }
}

/// Monotonic-enough nanoseconds for measuring the filter's own work (0 if unavailable).
pub(crate) fn now_ns() -> u128 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

/// What differs between the proxy-wasm hosts market-router runs in, named one capability
/// at a time. Everything host-specific in the filter reads it from here; nothing else checks
/// which host it is in.
///
/// Handled the same way on every host, so not listed: the log level (the filter logs up to
/// debug and the host filters; `proxy_get_log_level` is never imported, since Kong's has
/// another signature and wasmtime refuses a module importing it), shared-data CAS (a
/// CAS of 0 overwrites on Envoy and only creates on Kong: see `market_router_core::host::shared_set`), and the tick
/// period (set once per root context: Kong traps on a second call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HostCaps {
    /// For log lines.
    pub(crate) name: &'static str,
    /// A `Pause` from the request-headers callback waits for the body (Envoy, with
    /// `allow_on_headers_stop_iteration`). On Kong nothing ever resumes it; there the headers
    /// callback continues and the body callback still runs once with the whole body.
    pub(crate) pause_request_headers: bool,
    /// Response callbacks can pause the answer and dispatch calls, so failover can start
    /// from the host's route (route mode). Kong can do neither: every attempt is dispatched.
    pub(crate) route_failover: bool,
    /// Property path the decision record is written to: any path on Envoy (filter state
    /// `wasm.market_router.decision`); on Kong only `ngx.*` and `wasmx.*` are writable
    /// (anything else is NotFound, which the SDK turns into a panic).
    ///
    /// Properties read by the filter exist only where they are used: `response.code_details`
    /// (why Envoy answered itself) is read in route mode only, which Kong does not run. Kong
    /// has no value for it, nor for `request.id` without the header, `plugin_vm_id`, `node`,
    /// `cluster_name`, `route_name`, `response.flags` or upstream TLS details.
    pub(crate) decision_property: Option<&'static [&'static str]>,
    /// How the filter acts on an attempt whose answer brought no body from the host (a
    /// timeout, a reset, a body cut short, a bodyless status): from the callback of another
    /// call (see [`Bounce`]) rather than from the attempt's own. `None` where any callback
    /// can act (Envoy).
    pub(crate) bounce: Option<Bounce>,
    /// The host tells why a dispatched call failed (`:dispatch_status` among the call's
    /// headers, even when it has no others): Kong. See [`call_failure`].
    pub(crate) dispatch_status: bool,
    /// The host adds a newline to the body of every local reply, and counts it in the
    /// reply's `content-length` (ngx_wasm_module 3bed278: `ngx_http_wasm_stash_local_response`
    /// appends an LF). Harmless after JSON; fatal to a compressed answer passed on as it came
    /// (gzip, br and zstd decoders refuse the trailing byte). Where it is set, such a reply
    /// is sent without its `content-length` and the newline is cut off again in the reply's
    /// own body callback.
    pub(crate) local_reply_newline: bool,
}

/// Kong (ngx_wasm_module 3bed278; read in its source, then measured) recycles a request's
/// buffers in two ways that break acting from the callback of a call whose answer brought no
/// body:
///
/// 1. Once a call's callback returns, the host marks that call's request-body buffer empty
///    and makes it the head of the request's free list. Sending had already put that buffer
///    on the free list, and reading an answer body takes it back off; without an answer body
///    it is the first buffer the callback's own allocations take. So a next attempt's body
///    comes out empty and its request chain loops on itself (the worker spins on "send()
///    returned zero", the client hangs), and a local reply comes out empty (nginx closes the
///    client's connection).
/// 2. A new call's socket takes a copy of the free list's head when it is dispatched, and
///    later takes its read buffer from that copy while the list itself hands the same buffers
///    out again (to the call's request headers, to its answer's body): with more than one
///    buffer on the list at that moment, the answer is read into a buffer the host reuses
///    underneath it and comes out garbled (the next attempt is then judged malformed).
///
/// So the filter first sends a *bounce* call: no body (the host has nothing of it to mark
/// empty), to an address whose connect fails at once (`unix:/dev/null` is never a socket), so
/// its callback runs on the next turn of the event loop, after the finished attempt's buffers
/// were recycled. From there a local reply is safe. Before a next attempt it first sends
/// `drain` calls with a one-byte body to the same address: each takes one buffer off the free
/// list (the finished attempt's request headers and body are the two on it), so the next
/// attempt's socket copies an empty list. Cost, only after such an attempt: up to `1 + drain`
/// failed connects on loopback, each logged by nginx ("connect() to unix:/dev/null failed",
/// "dispatch failed"), no extra wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounce {
    /// Where the bounce and drain calls go (their connect must fail at once).
    pub(crate) target: &'static str,
    /// Drain calls sent before a next attempt.
    pub(crate) drain: usize,
}

impl HostCaps {
    /// Envoy (V8 or any runtime).
    pub(crate) const ENVOY: HostCaps = HostCaps {
        name: "envoy",
        pause_request_headers: true,
        route_failover: true,
        decision_property: Some(&["market_router.decision"]),
        bounce: None,
        dispatch_status: false,
        local_reply_newline: false,
    };

    /// Kong's ngx_wasm_module (nginx on wasmtime). Other differences are settings of the
    /// host, not of the filter: providers are addressed `host:port` (TLS when their `scheme`
    /// is `https`), shared-data keys `<prefix>/...` need a shm_kv zone named `<prefix>`,
    /// bodies over `client_body_buffer_size` never reach the filter, and metrics are named
    /// `pw.<filter>.<name>`.
    pub(crate) const KONG: HostCaps = HostCaps {
        name: "kong",
        pause_request_headers: false,
        route_failover: false,
        decision_property: Some(&["wasmx", "market_router_decision"]),
        bounce: Some(Bounce {
            target: "unix:/dev/null",
            drain: 2,
        }),
        dispatch_status: true,
        local_reply_newline: true,
    };

    /// Probes the host, from an HTTP context: nginx variables (`ngx.*` properties) exist only
    /// in ngx_wasm_module; Envoy answers NotFound. (Not from the root context: Kong traps on
    /// a scoped property outside a request.)
    fn detect() -> HostCaps {
        match hostcalls::get_property(vec!["ngx", "pid"]) {
            Ok(Some(v)) if !v.is_empty() => HostCaps::KONG,
            _ => HostCaps::ENVOY,
        }
    }
}

thread_local! {
    static CAPS: std::cell::Cell<Option<HostCaps>> = const { std::cell::Cell::new(None) };
}

/// This host's capabilities, probed on first use (from an HTTP context) and then kept.
pub(crate) fn caps() -> HostCaps {
    CAPS.with(|c| match c.get() {
        Some(caps) => caps,
        None => {
            let caps = HostCaps::detect();
            c.set(Some(caps));
            log::info!("market-router: running in {}", caps.name);
            caps
        }
    })
}
