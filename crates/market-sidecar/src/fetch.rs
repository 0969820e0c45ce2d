//! Fetching one feed (a source document): from a file (re-read only when its modification
//! time or size changed) or a URL (with `If-None-Match` / `If-Modified-Since`), within the
//! source's timeout and size bound, gzip-compressed documents included.

use crate::config::{KeyFrom, Location, Source};
use crate::sources::{self, Parsed};
use std::io::Read;
use std::time::SystemTime;

/// Validators of the last good copy, sent back to the source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Validators {
    /// `ETag` of the last good response.
    pub etag: Option<String>,
    /// `Last-Modified` of the last good response.
    pub last_modified: Option<String>,
    /// Modification time and size of the last good file read.
    pub file: Option<(SystemTime, u64)>,
}

/// What one fetch gave.
#[derive(Debug)]
pub enum Outcome {
    /// A new document, parsed, with its validators.
    Updated(Parsed, Validators),
    /// The source confirmed the last good copy (304, or the file did not change).
    NotModified,
    /// The fetch failed; the reason is a short metric label, the detail a log line.
    Failed(&'static str, String),
}

fn gunzip_if_needed(bytes: Vec<u8>, max: usize) -> Result<Vec<u8>, (&'static str, String)> {
    if bytes.len() < 2 || bytes[0] != 0x1f || bytes[1] != 0x8b {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ("garbage", format!("bad gzip data: {e}")))?;
    if out.len() > max {
        return Err((
            "too_large",
            format!("decompressed document over {max} bytes"),
        ));
    }
    Ok(out)
}

fn api_key(from: &KeyFrom) -> Result<String, String> {
    let key = match from {
        KeyFrom::Env(name) => {
            std::env::var(name).map_err(|_| format!("API key variable {name} is not set"))?
        }
        KeyFrom::File(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the API key file {}: {e}", path.display()))?,
    };
    let key = key.trim().to_string();
    if key.is_empty() {
        return Err("the API key is empty".into());
    }
    Ok(key)
}

async fn parse_blocking(
    source: &Source,
    body: Vec<u8>,
    max: usize,
) -> Result<Parsed, (&'static str, String)> {
    let kind = source.kind;
    tokio::task::spawn_blocking(move || {
        let body = gunzip_if_needed(body, max)?;
        sources::parse(kind, &body).map_err(|e| ("garbage", e))
    })
    .await
    .map_err(|e| ("internal", format!("parser task failed: {e}")))?
}

async fn fetch_file(
    source: &Source,
    path: &std::path::Path,
    last: &Validators,
    have_data: bool,
    max: usize,
) -> Outcome {
    let meta = match tokio::fs::metadata(path).await {
        Ok(m) => m,
        Err(e) => return Outcome::Failed("unreachable", format!("{}: {e}", path.display())),
    };
    let sig = (
        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        meta.len(),
    );
    if have_data && last.file == Some(sig) {
        return Outcome::NotModified;
    }
    if meta.len() > max as u64 {
        return Outcome::Failed(
            "too_large",
            format!("{}: {} bytes, over {max}", path.display(), meta.len()),
        );
    }
    let body = match tokio::fs::read(path).await {
        Ok(b) => b,
        Err(e) => return Outcome::Failed("unreachable", format!("{}: {e}", path.display())),
    };
    match parse_blocking(source, body, max).await {
        Ok(p) => Outcome::Updated(
            p,
            Validators {
                file: Some(sig),
                ..Validators::default()
            },
        ),
        Err((r, d)) => Outcome::Failed(r, format!("{}: {d}", path.display())),
    }
}

async fn fetch_url(
    client: &reqwest::Client,
    source: &Source,
    url: &str,
    last: &Validators,
    have_data: bool,
    max: usize,
) -> Outcome {
    let mut req = client
        .get(url)
        .timeout(source.timeout)
        .header(reqwest::header::ACCEPT, "application/json");
    if have_data {
        if let Some(e) = &last.etag {
            req = req.header(reqwest::header::IF_NONE_MATCH, e);
        }
        if let Some(lm) = &last.last_modified {
            req = req.header(reqwest::header::IF_MODIFIED_SINCE, lm);
        }
    }
    if let Some(from) = &source.api_key {
        let key = match api_key(from) {
            Ok(k) => k,
            Err(e) => return Outcome::Failed("api_key", e),
        };
        let mut value = match reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")) {
            Ok(v) => v,
            Err(_) => {
                return Outcome::Failed("api_key", "the API key is not a valid header value".into())
            }
        };
        value.set_sensitive(true);
        req = req.header(reqwest::header::AUTHORIZATION, value);
    }
    // Errors from reqwest name the URL, never headers: the key stays out of the log.
    let mut resp = match req.send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return Outcome::Failed("timeout", format!("{url}: timed out")),
        Err(e) => return Outcome::Failed("unreachable", format!("{url}: {e}")),
    };
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_MODIFIED {
        return Outcome::NotModified;
    }
    if !status.is_success() {
        return Outcome::Failed("status", format!("{url}: status {}", status.as_u16()));
    }
    let header = |name: reqwest::header::HeaderName| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let validators = Validators {
        etag: header(reqwest::header::ETAG),
        last_modified: header(reqwest::header::LAST_MODIFIED),
        file: None,
    };
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if body.len() + c.len() > max {
                    return Outcome::Failed("too_large", format!("{url}: body over {max} bytes"));
                }
                body.extend_from_slice(&c);
            }
            Ok(None) => break,
            Err(e) if e.is_timeout() => {
                return Outcome::Failed("timeout", format!("{url}: timed out reading the body"))
            }
            Err(e) => return Outcome::Failed("unreachable", format!("{url}: {e}")),
        }
    }
    match parse_blocking(source, body, max).await {
        Ok(p) => Outcome::Updated(p, validators),
        Err((r, d)) => Outcome::Failed(r, format!("{url}: {d}")),
    }
}

/// Fetches one feed of `source` at `location`, bounded by the source's timeout.
pub async fn fetch(
    client: &reqwest::Client,
    source: &Source,
    location: &Location,
    last: &Validators,
    have_data: bool,
    max_bytes: usize,
) -> Outcome {
    let work = async {
        match location {
            Location::File(p) => fetch_file(source, p, last, have_data, max_bytes).await,
            Location::Url(u) => fetch_url(client, source, u, last, have_data, max_bytes).await,
        }
    };
    match tokio::time::timeout(source.timeout, work).await {
        Ok(o) => o,
        Err(_) => Outcome::Failed(
            "timeout",
            format!("no answer within {:.1} s", source.timeout.as_secs_f64()),
        ),
    }
}
