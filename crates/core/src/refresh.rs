//! The market refresh, as the root context of every VM runs it: which VM of the process takes
//! this period's refresh slot, the staleness check, the snapshot fetch and its answer
//! (validated, stored, the generation bumped; or the last good snapshot kept and the failure
//! streak noted), and the market report with its answer.
//!
//! The slot is a due time in shared data instead of a singleton service, so it works the same
//! on every proxy-wasm host (Envoy workers, Kong nginx workers): every VM ticks, reads
//! `<prefix>/market_due`, and only the VM whose CAS write moves the due time forward makes the
//! sidecar call. One call per period per process, whatever the worker count.
//!
//! Events in (a tick, a call answered), shared data and calls over [`Host`] and [`HttpHost`],
//! the rest out as [`Effect`]s (counters, log lines) that the filter's root context writes.

use crate::config::{Config, Market};
use crate::host::{cas_update, header, shared_get, shared_set, Host, HttpHost, Update, CAS_TRIES};
use crate::market::{self, Stored};
use crate::metrics::Global;
use crate::report::Tallies;
use log::Level;

/// Where the market service takes reports (next to the snapshot, on `market.cluster`).
pub const REPORTS_PATH: &str = "/v1/market/reports";

/// The shared-data keys the refresh reads and writes.
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    /// Validated snapshot.
    pub market: &'a str,
    /// Generation counter of `market`.
    pub market_gen: &'a str,
    /// Refresh slot: when the next fetch is due.
    pub market_due: &'a str,
    /// Last refresh outcome (`ok`, `fail`), for once-per-streak logging.
    pub market_status: &'a str,
    /// Whether the market data was last seen stale (`1`, `0`), for once-per-streak logging.
    pub market_stale: &'a str,
}

/// What the refresh leads to besides its shared-data writes and calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Add to a counter.
    Count(Global, u64),
    /// A log line at a level.
    Log(Level, String),
}

/// Which call of the refresh an answer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// The snapshot fetch.
    Snapshot,
    /// The market report.
    Report,
    /// Not the refresh's.
    Other,
}

/// An answered call, as the host delivered it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Answer<'a> {
    /// The host's word that the call failed after its answer began (Kong's
    /// `:dispatch_status`).
    pub failure: Option<&'a str>,
    /// Its headers, names lowercase (empty: no answer).
    pub headers: &'a [(String, String)],
    /// Its body's size; the body itself is read only when it is to be kept.
    pub body_size: usize,
}

/// The snapshot this VM routes on, as the refresh needs it.
#[derive(Debug, Clone, Copy)]
pub struct Held<'a> {
    /// Its age now, ms.
    pub age_ms: u64,
    /// Its entity tag, for a conditional fetch.
    pub etag: Option<&'a str>,
}

/// Ticks drive the market refresh and write batched counters, so they run with or without a
/// market, at most 250 ms apart.
pub fn tick_period_ms(config: &Config) -> u64 {
    config
        .market
        .as_ref()
        .map_or(250, |m| (m.refresh_ms / 4).clamp(50, 250))
}

/// Creates the refresh slot (due at once) unless it exists, so later claims are all CAS
/// writes.
pub fn create_slot(host: &impl Host, keys: &Keys<'_>) {
    if shared_get(host, keys.market_due).is_none_or(|(v, _)| v.is_empty()) {
        let _ = shared_set(host, keys.market_due, &0u64.to_le_bytes(), None);
    }
}

/// A counter as the refresh keeps it in shared data (the generation, the slot's due time):
/// eight little-endian bytes; 0 when shorter (not written yet).
pub fn read_u64(bytes: &[u8]) -> u64 {
    bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// The refresh calls of one root context in flight.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refresh {
    /// Token of the snapshot fetch in flight.
    fetch: Option<u32>,
    /// Token of the market report in flight.
    report: Option<u32>,
}

impl Refresh {
    /// Whether a snapshot fetch is in flight.
    pub fn fetching(&self) -> bool {
        self.fetch.is_some()
    }

    /// Whether a market report is in flight.
    pub fn reporting(&self) -> bool {
        self.report.is_some()
    }

    /// A tick at `now`: unless a fetch is in flight, tries to take this period's slot; with it,
    /// checks staleness (on `held`, the snapshot this VM routes on), starts the fetch and the
    /// report (of the tally `take_tally` hands over). True when this VM took the slot.
    #[allow(clippy::too_many_arguments)]
    pub fn tick<H: Host + HttpHost>(
        &mut self,
        host: &H,
        config: &Config,
        keys: &Keys<'_>,
        now: u64,
        held: Option<Held<'_>>,
        take_tally: impl FnOnce() -> Option<Tallies>,
        out: &mut impl FnMut(Effect),
    ) -> bool {
        let Some(m) = &config.market else {
            return false;
        };
        if self.fetch.is_some() || !claim(host, m, keys, now) {
            return false;
        }
        if let Some(h) = held {
            check_staleness(host, m, keys, h.age_ms, out);
        }
        self.start_fetch(host, m, keys, held.and_then(|h| h.etag), out);
        self.start_report(host, m, take_tally, out);
        true
    }

    fn start_fetch(
        &mut self,
        host: &(impl Host + HttpHost),
        m: &Market,
        keys: &Keys<'_>,
        etag: Option<&str>,
        out: &mut impl FnMut(Effect),
    ) {
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", "GET"),
            (":path", m.path.as_str()),
            (":authority", m.authority.as_str()),
            ("accept", "application/json"),
        ];
        if let Some(e) = etag {
            headers.push(("if-none-match", e));
        }
        match host.dispatch(&m.cluster, &headers, &[], m.timeout_ms) {
            Ok(token) => self.fetch = Some(token),
            Err(s) => failed(
                host,
                keys,
                &format!("cannot call cluster `{}` ({s:?})", m.cluster),
                out,
            ),
        }
    }

    /// Posts what this process saw since its last report (one per period, on the refresh
    /// slot). Dropped and counted when the service cannot take it: observations are for
    /// routing the fleet, never worth a retry or a request's time.
    fn start_report(
        &mut self,
        host: &impl HttpHost,
        m: &Market,
        take_tally: impl FnOnce() -> Option<Tallies>,
        out: &mut impl FnMut(Effect),
    ) {
        if self.report.is_some() || !m.report {
            return;
        }
        let Some(tally) = take_tally() else { return };
        let body = tally.report_json();
        let headers = [
            (":method", "POST"),
            (":path", REPORTS_PATH),
            (":authority", m.authority.as_str()),
            ("content-type", "application/json"),
        ];
        match host.dispatch(&m.cluster, &headers, &body, m.timeout_ms) {
            Ok(token) => self.report = Some(token),
            Err(s) => {
                out(Effect::Count(Global::ReportsDropped, 1));
                out(Effect::Log(
                    Level::Debug,
                    format!(
                        "market-router: market report dropped: cannot call cluster `{}` ({s:?})",
                        m.cluster
                    ),
                ));
            }
        }
    }

    /// Which call the answer with `token` belongs to; that call is no longer in flight.
    pub fn answered(&mut self, token: u32) -> Call {
        if self.report == Some(token) {
            self.report = None;
            Call::Report
        } else if self.fetch == Some(token) {
            self.fetch = None;
            Call::Snapshot
        } else {
            Call::Other
        }
    }
}

/// Tries to take this period's refresh slot at `now`: true when this VM should fetch now.
fn claim(host: &impl Host, m: &Market, keys: &Keys<'_>, now: u64) -> bool {
    let Some((due, cas)) = shared_get(host, keys.market_due) else {
        return false;
    };
    if due.len() >= 8 && now < read_u64(&due) {
        return false;
    }
    let next = now + m.refresh_ms;
    shared_set(host, keys.market_due, &next.to_le_bytes(), Some(cas)).is_ok()
}

/// Says once per streak (per process: only the VM holding the refresh slot checks) that the
/// market data has gone stale and routing leans on static offers, and when it is fresh again.
fn check_staleness(
    host: &impl Host,
    m: &Market,
    keys: &Keys<'_>,
    age: u64,
    out: &mut impl FnMut(Effect),
) {
    let stale = age > m.max_age_ms;
    let flag = shared_get(host, keys.market_stale)
        .map(|(b, _)| b)
        .unwrap_or_default();
    let was_stale = flag == b"1";
    if stale && !was_stale {
        out(Effect::Log(
            Level::Warn,
            format!(
                "market-router: market data is {age} ms old (market.max_age_ms {}); routing on the last good snapshot (static offers only where it has none)",
                m.max_age_ms
            ),
        ));
        let _ = shared_set(host, keys.market_stale, b"1", None);
    } else if !stale && was_stale {
        out(Effect::Log(
            Level::Info,
            format!("market-router: market data is fresh again ({age} ms old)"),
        ));
        let _ = shared_set(host, keys.market_stale, b"0", None);
    }
}

/// Counts a refresh failure and logs it once per failure streak (across all workers); the
/// last good snapshot stays.
fn failed(host: &impl Host, keys: &Keys<'_>, why: &str, out: &mut impl FnMut(Effect)) {
    out(Effect::Count(Global::RefreshFailed, 1));
    let status = shared_get(host, keys.market_status)
        .map(|(b, _)| b)
        .unwrap_or_default();
    if status != b"fail" {
        out(Effect::Log(
            Level::Warn,
            format!("market-router: market refresh failed: {why}; keeping the last good snapshot"),
        ));
        let _ = shared_set(host, keys.market_status, b"fail", None);
    } else {
        out(Effect::Log(
            Level::Debug,
            format!("market-router: market refresh failed again: {why}"),
        ));
    }
}

/// Ends a failure streak (logged once) and notes the refresh as ok.
fn succeeded(host: &impl Host, keys: &Keys<'_>, out: &mut impl FnMut(Effect)) {
    let status = shared_get(host, keys.market_status)
        .map(|(b, _)| b)
        .unwrap_or_default();
    if status == b"fail" {
        out(Effect::Log(
            Level::Info,
            "market-router: market refresh recovered".to_string(),
        ));
    }
    if status != b"ok" {
        let _ = shared_set(host, keys.market_status, b"ok", None);
    }
}

/// The market report's answer: counted as sent on a 2xx, else as dropped.
pub fn on_report(answer: &Answer<'_>, out: &mut impl FnMut(Effect)) {
    let status = if answer.failure.is_some() {
        None
    } else {
        header(answer.headers, ":status")
    };
    if status.is_some_and(|s| s.starts_with('2')) {
        out(Effect::Count(Global::ReportsSent, 1));
    } else {
        out(Effect::Count(Global::ReportsDropped, 1));
        out(Effect::Log(
            Level::Debug,
            format!(
                "market-router: market report dropped (answer {:?})",
                status.map(str::to_string)
            ),
        ));
    }
}

/// The snapshot fetch's answer at `now`: a 304 keeps the snapshot; a 200 within bounds is read
/// (`read_body`, `None` when the host refuses it), validated against `config` and stored with
/// its generation bumped; anything else is a failure, and the last good snapshot stays.
pub fn on_snapshot(
    host: &impl Host,
    config: &Config,
    keys: &Keys<'_>,
    answer: &Answer<'_>,
    read_body: impl FnOnce(usize) -> Option<Vec<u8>>,
    now: u64,
    out: &mut impl FnMut(Effect),
) {
    if let Some(why) = answer.failure {
        failed(host, keys, &format!("the answer broke off ({why})"), out);
        return;
    }
    let body_size = answer.body_size;
    match header(answer.headers, ":status") {
        Some("304") => {
            out(Effect::Log(
                Level::Debug,
                "market-router: market snapshot not modified".to_string(),
            ));
            out(Effect::Count(Global::RefreshNotModified, 1));
            succeeded(host, keys, out);
        }
        // The answer's size is checked before it is read into VM memory. Its JSON text takes a
        // few times the stored form; anything past that is no snapshot to keep.
        Some("200") if body_size > config.max_snapshot_bytes.saturating_mul(8) => failed(
            host,
            keys,
            &format!(
                "snapshot answer of {body_size} bytes is over 8 x limits.max_snapshot_bytes ({}); not read",
                config.max_snapshot_bytes
            ),
            out,
        ),
        Some("200") => {
            let body = read_body(body_size).unwrap_or_default();
            let etag = header(answer.headers, "etag").map(str::to_string);
            match market::validate(&body, config, now, etag) {
                Ok(v) => {
                    if !v.invalid.is_empty() {
                        out(Effect::Count(Global::OffersInvalid, v.invalid.len() as u64));
                        let (i, why) = &v.invalid[0];
                        out(Effect::Log(
                            Level::Warn,
                            format!(
                                "market-router: dropped {} invalid offer(s) from the snapshot (first: offers[{i}]: {why})",
                                v.invalid.len()
                            ),
                        ));
                    }
                    if v.unknown_providers > 0 {
                        out(Effect::Log(
                            Level::Debug,
                            format!(
                                "market-router: ignored {} offer(s) of unconfigured providers",
                                v.unknown_providers
                            ),
                        ));
                    }
                    if store(host, config, keys, &v.stored, out) {
                        out(Effect::Count(Global::RefreshOk, 1));
                        succeeded(host, keys, out);
                    }
                }
                Err(e) => failed(host, keys, &e.to_string(), out),
            }
        }
        Some(s) => failed(host, keys, &format!("sidecar answered status {s}"), out),
        None => failed(
            host,
            keys,
            "no answer (connection failed, reset or timed out)",
            out,
        ),
    }
}

/// Stores a validated snapshot and bumps the generation (one compare-and-swap update, at most
/// [`CAS_TRIES`] times); false when it was not stored.
fn store(
    host: &impl Host,
    config: &Config,
    keys: &Keys<'_>,
    stored: &Stored,
    out: &mut impl FnMut(Effect),
) -> bool {
    let encoded = stored.encode();
    if encoded.len() > config.max_snapshot_bytes {
        failed(
            host,
            keys,
            &format!(
                "snapshot of {} offers takes {} bytes, over limits.max_snapshot_bytes ({})",
                stored.offers.len(),
                encoded.len(),
                config.max_snapshot_bytes
            ),
            out,
        );
        return false;
    }
    if let Err(e) = shared_set(host, keys.market, &encoded, None) {
        out(Effect::Log(
            Level::Warn,
            format!(
                "market-router: cannot store the market snapshot ({e:?}); keeping the previous one"
            ),
        ));
        return false;
    }
    let bumped = cas_update(
        host,
        keys.market_gen,
        CAS_TRIES,
        read_u64,
        |g| g.to_le_bytes().to_vec(),
        |g| {
            *g = g.wrapping_add(1);
            true
        },
    );
    if let Update::Written(_) = bumped {
        out(Effect::Log(
            Level::Info,
            format!(
                "market-router: market snapshot updated: {} offers, generated_at_ms {}",
                stored.offers.len(),
                stored.generated_at_ms
            ),
        ));
    } else {
        out(Effect::Log(
            Level::Warn,
            "market-router: stored a snapshot but could not bump its generation; workers pick it up after the next refresh".to_string(),
        ));
    }
    true
}

#[cfg(test)]
#[path = "refresh_tests.rs"]
mod tests;
