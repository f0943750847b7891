//! `llama`: Llama 2/3, SmolLM2, Mistral-style models. The plain block: RMSNorm, grouped-query
//! attention with RoPE on adjacent pairs (GGUF stores Q and K permuted for that layout), a
//! SwiGLU feed-forward, and the token embedding as output projection when `output.weight` is
//! absent.

use super::transformer::{Network, Spec, Transformer};
use super::{HParams, ModelError};
use crate::gguf::GgufFile;

/// Architecture loaders take `&mut HParams` because some (Gemma 3n) complete the common ones.
pub(crate) fn load(gguf: &GgufFile, hp: &mut HParams) -> Result<Box<dyn Network>, ModelError> {
    Ok(Box::new(Transformer::load(gguf, hp, Spec::llama(hp))?))
}
