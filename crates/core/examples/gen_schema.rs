//! Writes the configuration's JSON Schema, generated from the serde types in
//! `src/config/raw.rs`, to `schema/market-router.schema.json`.
//!
//!     cargo run -p market-router-core --features schema --example gen_schema            # (re)write the file
//!     cargo run -p market-router-core --features schema --example gen_schema -- --check # exit 1 if it is stale
//!
//! `make schema` runs it and then the two scripts that derive the README field table and
//! Kong's meta.json from the file.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schema/market-router.schema.json");
    let schema = market_router_core::config::json_schema();
    let text = match serde_json::to_string_pretty(&schema) {
        Ok(t) => t + "\n",
        Err(e) => {
            eprintln!("gen_schema: {e}");
            return ExitCode::FAILURE;
        }
    };
    let check = std::env::args().any(|a| a == "--check");
    if check {
        return match std::fs::read_to_string(&path) {
            Ok(old) if old == text => {
                println!("schema/market-router.schema.json is up to date");
                ExitCode::SUCCESS
            }
            _ => {
                eprintln!(
                    "schema/market-router.schema.json is stale: run make schema \
                     (make schema)"
                );
                ExitCode::FAILURE
            }
        };
    }
    match std::fs::write(&path, text) {
        Ok(()) => {
            println!("wrote schema/market-router.schema.json");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gen_schema: {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}
