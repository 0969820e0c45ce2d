//! The only module that calls the proxy-wasm host. Every call goes through
//! `proxy_wasm::hostcalls` and every error is turned into a value: the SDK's convenience
//! methods panic on host errors, and a panic kills the VM for every request on the worker.

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

/// All request headers (empty when unavailable).
pub(crate) fn request_headers() -> Vec<(String, String)> {
    hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default()
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

/// A shared-data value and its CAS; `None` when the key does not exist or the host refused.
pub(crate) fn shared_get(key: &str) -> Option<(Vec<u8>, u32)> {
    match hostcalls::get_shared_data(key) {
        Ok((Some(v), cas)) => Some((v, cas.unwrap_or(0))),
        Ok((None, cas)) => Some((Vec::new(), cas.unwrap_or(0))),
        Err(_) => None,
    }
}

/// Why a shared-data write did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SetError {
    /// Someone wrote first.
    CasMismatch,
    /// The host refused (e.g. a full zone on Kong).
    Refused(Status),
}

/// Writes shared data, with CAS when `cas` is `Some(nonzero)`.
pub(crate) fn shared_set(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
    match hostcalls::set_shared_data(key, Some(value), cas.filter(|c| *c != 0)) {
        Ok(()) => Ok(()),
        Err(Status::CasMismatch) => Err(SetError::CasMismatch),
        Err(s) => Err(SetError::Refused(s)),
    }
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

/// Headers of the call response being delivered.
pub(crate) fn call_response_headers() -> Vec<(String, String)> {
    hostcalls::get_map(MapType::HttpCallResponseHeaders).unwrap_or_default()
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

/// Writes a per-request property (Envoy: filter state `wasm.<name>`, readable by access logs).
pub(crate) fn set_property(name: &str, value: &[u8]) -> bool {
    hostcalls::set_property(vec![name], Some(value)).is_ok()
}

/// Monotonic-enough nanoseconds for measuring the filter's own work (0 if unavailable).
pub(crate) fn now_ns() -> u128 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

/// Follows the host's log level so disabled levels cost nothing (hosts without
/// `proxy_get_log_level`, such as Kong, get info).
pub(crate) fn follow_host_log_level() {
    let level = hostcalls::get_log_level().unwrap_or(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_log_level(level);
}
