//! HTTP: `GET <path>` (the snapshot, with ETag and 304), `POST /v1/market/reports` (what a
//! gateway saw, see [`crate::observed`]), `GET /healthz`, `GET /metrics` (Prometheus text
//! format).

use crate::{now_ms, App};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;
use std::fmt::Write as _;
use std::sync::Arc;

/// Where gateways post their reports.
pub const REPORTS_PATH: &str = "/v1/market/reports";

async fn report(State(app): State<Arc<App>>, body: Bytes) -> Response {
    match app.report(&body, now_ms()) {
        Ok(n) => json_response(StatusCode::ACCEPTED, &json!({"accepted": n})),
        Err(e) => {
            tracing::debug!("report refused: {e}");
            json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": {"message": e.to_string(), "status": 400}}),
            )
        }
    }
}

/// The service's routes, the snapshot at `path`.
pub fn router(app: Arc<App>, path: &str) -> Router {
    Router::new()
        .route(path, get(snapshot))
        .route(
            REPORTS_PATH,
            post(report).layer(DefaultBodyLimit::max(crate::observed::MAX_REPORT_BYTES)),
        )
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(app)
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// Whether an `If-None-Match` value matches `etag` (weak comparison, `*` matches).
fn matches(if_none_match: &str, etag: &str) -> bool {
    if_none_match
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

async fn snapshot(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let Some(p) = app.snapshot() else {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": {"message": "no source has been loaded yet", "status": 503}}),
        );
    };
    let etag = HeaderValue::from_str(&p.etag).unwrap_or(HeaderValue::from_static("\"0\""));
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|inm| matches(inm, &p.etag))
    {
        app.count_served(true);
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    app.count_served(false);
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        p.body.as_ref().clone(),
    )
        .into_response()
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let now = now_ms();
    let snap = app.snapshot();
    let sources: serde_json::Map<String, serde_json::Value> = app
        .source_report(now)
        .into_iter()
        .map(|(name, c, age, entries, loaded, total)| {
            (
                name,
                json!({"age_ms": age, "entries": entries, "feeds_loaded": loaded, "feeds": total,
                       "failures": c.failures.values().sum::<u64>()}),
            )
        })
        .collect();
    let stats = app.last_build();
    let mut body = json!({
        "status": if snap.is_some() { "ok" } else { "starting" },
        "snapshot": snap.as_ref().map(|p| json!({
            "generated_at_ms": p.generated_at_ms, "etag": p.etag, "offers": stats.offers,
            "stale_offers": stats.stale_offers})),
        "sources": sources,
    });
    if let Some(r) = app.redis_status() {
        body["redis"] = json!({
            "replica": r.replica,
            "state": if !r.connected { "disconnected" } else if r.leader { "leader" } else { "follower" },
            "leader": r.leader_id,
            "serving": if r.serving_shared { "shared" } else { "own" },
            "unshared_reports": r.unshared,
            "last_error": r.last_error,
        });
    }
    let status = if snap.is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &body)
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of the service's state.
pub fn render_metrics(app: &App) -> String {
    let now = now_ms();
    let mut m = String::new();
    let report = app.source_report(now);
    let head = |m: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    head(
        &mut m,
        "market_sidecar_source_fetches_total",
        "counter",
        "Fetches per source by result: updated (new document), not_modified, failed.",
    );
    for (name, c, ..) in &report {
        let n = label(name);
        let failed: u64 = c.failures.values().sum();
        let _ = writeln!(
            m,
            "market_sidecar_source_fetches_total{{source=\"{n}\",result=\"updated\"}} {}",
            c.updated
        );
        let _ = writeln!(
            m,
            "market_sidecar_source_fetches_total{{source=\"{n}\",result=\"not_modified\"}} {}",
            c.not_modified
        );
        let _ = writeln!(
            m,
            "market_sidecar_source_fetches_total{{source=\"{n}\",result=\"failed\"}} {failed}"
        );
    }
    head(&mut m, "market_sidecar_source_failures_total", "counter",
        "Failed fetches per source and reason (timeout, unreachable, status, garbage, empty, too_large, api_key).");
    for (name, c, ..) in &report {
        for (reason, n) in &c.failures {
            let _ = writeln!(
                m,
                "market_sidecar_source_failures_total{{source=\"{}\",reason=\"{reason}\"}} {n}",
                label(name)
            );
        }
    }
    head(&mut m, "market_sidecar_source_age_seconds", "gauge",
        "Time since the source last confirmed its data (its oldest feed); absent before a first good fetch.");
    for (name, _, age, ..) in &report {
        if let Some(a) = age {
            let _ = writeln!(
                m,
                "market_sidecar_source_age_seconds{{source=\"{}\"}} {:.3}",
                label(name),
                *a as f64 / 1000.0
            );
        }
    }
    head(
        &mut m,
        "market_sidecar_source_entries",
        "gauge",
        "Entries held from the source's last good documents.",
    );
    for (name, _, _, entries, ..) in &report {
        let _ = writeln!(
            m,
            "market_sidecar_source_entries{{source=\"{}\"}} {entries}",
            label(name)
        );
    }
    head(&mut m, "market_sidecar_source_dropped_entries_total", "counter",
        "Source entries dropped for impossible values (negative price, uptime outside 0..100, ...).");
    for (name, c, ..) in &report {
        let _ = writeln!(
            m,
            "market_sidecar_source_dropped_entries_total{{source=\"{}\"}} {}",
            label(name),
            c.dropped
        );
    }
    let stats = app.last_build();
    head(&mut m, "market_sidecar_unmapped_ids", "gauge",
        "Distinct external ids of the source that map to no configured provider, or (for mapped providers) to no configured model.");
    for (name, (p, mo)) in &stats.unmapped {
        let _ = writeln!(
            m,
            "market_sidecar_unmapped_ids{{source=\"{}\",kind=\"provider\"}} {p}",
            label(name)
        );
        let _ = writeln!(
            m,
            "market_sidecar_unmapped_ids{{source=\"{}\",kind=\"model\"}} {mo}",
            label(name)
        );
    }
    head(
        &mut m,
        "market_sidecar_offers",
        "gauge",
        "Offers in the served snapshot, by freshness of their figures.",
    );
    let _ = writeln!(
        m,
        "market_sidecar_offers{{state=\"fresh\"}} {}",
        stats.offers - stats.stale_offers.min(stats.offers)
    );
    let _ = writeln!(
        m,
        "market_sidecar_offers{{state=\"stale\"}} {}",
        stats.stale_offers
    );
    head(&mut m, "market_sidecar_offers_dropped", "gauge",
        "Offers of the last build left out: invalid (a snapshot v1 rule), unpriced (no source has a price), over_limit.");
    let _ = writeln!(
        m,
        "market_sidecar_offers_dropped{{reason=\"invalid\"}} {}",
        stats.invalid
    );
    let _ = writeln!(
        m,
        "market_sidecar_offers_dropped{{reason=\"unpriced\"}} {}",
        stats.unpriced
    );
    let _ = writeln!(
        m,
        "market_sidecar_offers_dropped{{reason=\"over_limit\"}} {}",
        stats.over_limit
    );
    let (accepted, refused, dropped) = app.report_counts();
    head(
        &mut m,
        "market_sidecar_reports_total",
        "counter",
        "Gateway reports by result: accepted, refused (bad shape, version or size).",
    );
    let _ = writeln!(
        m,
        "market_sidecar_reports_total{{result=\"accepted\"}} {accepted}"
    );
    let _ = writeln!(
        m,
        "market_sidecar_reports_total{{result=\"refused\"}} {refused}"
    );
    head(
        &mut m,
        "market_sidecar_report_entries_dropped_total",
        "counter",
        "Report entries dropped because the service tracks its maximum of (provider, model) keys.",
    );
    let _ = writeln!(m, "market_sidecar_report_entries_dropped_total {dropped}");
    if let Some(r) = app.redis_status() {
        head(
            &mut m,
            "market_sidecar_redis_up",
            "gauge",
            "1 while the last sync with Redis succeeded (replicas share observations and the snapshot), else 0.",
        );
        let _ = writeln!(m, "market_sidecar_redis_up {}", u8::from(r.connected));
        head(
            &mut m,
            "market_sidecar_redis_leader",
            "gauge",
            "1 while this replica holds the leader lease (it publishes the snapshot the others serve).",
        );
        let _ = writeln!(m, "market_sidecar_redis_leader {}", u8::from(r.leader));
        head(
            &mut m,
            "market_sidecar_redis_serving_shared",
            "gauge",
            "1 while this replica serves the leader's snapshot read from Redis, 0 while it serves its own.",
        );
        let _ = writeln!(
            m,
            "market_sidecar_redis_serving_shared {}",
            u8::from(r.serving_shared)
        );
        head(
            &mut m,
            "market_sidecar_redis_reports_total",
            "counter",
            "Reports shared through Redis: pushed (received here), pulled (received by another replica).",
        );
        let _ = writeln!(
            m,
            "market_sidecar_redis_reports_total{{direction=\"pushed\"}} {}",
            r.pushed
        );
        let _ = writeln!(
            m,
            "market_sidecar_redis_reports_total{{direction=\"pulled\"}} {}",
            r.pulled
        );
        head(
            &mut m,
            "market_sidecar_redis_unshared_reports",
            "gauge",
            "Reports this replica holds that Redis does not (shared when it is back).",
        );
        let _ = writeln!(m, "market_sidecar_redis_unshared_reports {}", r.unshared);
        head(
            &mut m,
            "market_sidecar_redis_errors_total",
            "counter",
            "Failed syncs and connection attempts.",
        );
        let _ = writeln!(m, "market_sidecar_redis_errors_total {}", r.errors);
        head(
            &mut m,
            "market_sidecar_redis_data_lost_total",
            "counter",
            "Times Redis was found to have lost its data (a restart without persistence); replicas then share again what they know.",
        );
        let _ = writeln!(
            m,
            "market_sidecar_redis_data_lost_total {}",
            r.epoch_changes
        );
    }
    let c = app.counters();
    head(
        &mut m,
        "market_sidecar_snapshots_published_total",
        "counter",
        "Snapshots published.",
    );
    let _ = writeln!(
        m,
        "market_sidecar_snapshots_published_total {}",
        c.published
    );
    head(
        &mut m,
        "market_sidecar_snapshots_rejected_total",
        "counter",
        "Built snapshots refused by the snapshot v1 check (the previous one stays served).",
    );
    let _ = writeln!(m, "market_sidecar_snapshots_rejected_total {}", c.rejected);
    head(
        &mut m,
        "market_sidecar_snapshot_age_seconds",
        "gauge",
        "Age of the served snapshot by its generated_at_ms.",
    );
    if let Some(p) = app.snapshot() {
        let _ = writeln!(
            m,
            "market_sidecar_snapshot_age_seconds {:.3}",
            now.saturating_sub(p.generated_at_ms) as f64 / 1000.0
        );
    }
    head(
        &mut m,
        "market_sidecar_snapshot_requests_total",
        "counter",
        "Snapshot requests by status.",
    );
    let _ = writeln!(
        m,
        "market_sidecar_snapshot_requests_total{{status=\"200\"}} {}",
        c.served
    );
    let _ = writeln!(
        m,
        "market_sidecar_snapshot_requests_total{{status=\"304\"}} {}",
        c.served_not_modified
    );
    head(
        &mut m,
        "market_sidecar_config_reloads_total",
        "counter",
        "Configuration reloads by result.",
    );
    let _ = writeln!(
        m,
        "market_sidecar_config_reloads_total{{result=\"ok\"}} {}",
        c.reloads_ok
    );
    let _ = writeln!(
        m,
        "market_sidecar_config_reloads_total{{result=\"refused\"}} {}",
        c.reloads_failed
    );
    m
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render_metrics(&app),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_matching() {
        assert!(matches("\"a\"", "\"a\""));
        assert!(matches("W/\"a\", \"b\"", "\"a\""));
        assert!(matches("*", "\"a\""));
        assert!(!matches("\"b\"", "\"a\""));
    }
}
