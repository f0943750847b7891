//! Shared helpers for the engine's integration tests.
#![allow(dead_code)]

pub mod fixture;

use std::path::PathBuf;

use unicorn_engine::model::{shared_vulkan_context, Backends, Placement};

/// The default model (SmolLM2-135M-Instruct, Q4_1).
pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Gemma 3 270M, Q4_K_M.
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

/// The cache directory `scripts/fetch-model` uses.
fn model_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("UNICORN_MODEL_DIR") {
        return d.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("neither XDG_CACHE_HOME nor HOME is set");
    base.join("unicorn").join("models")
}

/// Path of a cached model file. `UNICORN_TEST_MODEL` overrides the path of the default model
/// (SmolLM2). Panics with instructions when the file is missing: these tests never skip.
pub fn model_path(file: &str) -> PathBuf {
    let path = match std::env::var_os("UNICORN_TEST_MODEL") {
        Some(p) if file == SMOLLM2 => PathBuf::from(p),
        _ => model_dir().join(file),
    };
    if !path.is_file() {
        let fetch =
            if file == GEMMA3 { "scripts/fetch-model gemma3" } else { "scripts/fetch-model" };
        panic!(
            "model file {} is missing: run `{fetch}` from the repository root first \
             (or point UNICORN_TEST_MODEL / UNICORN_MODEL_DIR at it)",
            path.display()
        );
    }
    path
}

/// A file under the repository's `tests/data/reference/`.
pub fn reference_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/reference").join(rel)
}

/// `placement` resolved on the shared context (CPU devices allowed), or `None` (after saying
/// so) where no Vulkan device can exist.
pub fn vulkan_backends(placement: Placement) -> Option<Backends> {
    let b = Backends::resolve_with(placement, || {
        shared_vulkan_context(true).map_err(|e| e.to_string())
    });
    if b.placement() != placement {
        assert!(
            !unicorn_vulkan::device_required(),
            "the lavapipe ICD is installed (or UNICORN_VULKAN_REQUIRE=1) but Vulkan is not \
             available: {:?}",
            b.fallbacks()
        );
        eprintln!("SKIPPED: no Vulkan device ({:?}); scripts/install-deps installs lavapipe", {
            b.fallbacks()
        });
        return None;
    }
    eprintln!("placement {}", b.describe());
    Some(b)
}
