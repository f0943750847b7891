//! Where model files are found.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The model used when none is named (fetched by `scripts/fetch-model`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where `scripts/fetch-model` caches models: `$UNICORN_MODEL_DIR`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/unicorn/models`.
pub fn model_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("UNICORN_MODEL_DIR") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/".into())).join(".cache")
    });
    cache.join("unicorn/models")
}

/// `m`, or the default model; it must exist.
pub fn resolve_model(m: Option<&Path>) -> Result<PathBuf> {
    let path = match m {
        Some(p) => p.to_owned(),
        None => model_dir().join(DEFAULT_MODEL_FILE),
    };
    if !path.is_file() {
        if m.is_none() {
            return Err(Error::ModelFile(format!(
                "the default model is not downloaded yet ({}); fetch it with `scripts/fetch-model`, or name one with -m",
                path.display()
            )));
        }
        return Err(Error::ModelFile(format!("{}: no such model file", path.display())));
    }
    Ok(path)
}
