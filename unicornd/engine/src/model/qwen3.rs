//! `qwen3`: Qwen 3 (dense). Against the llama block: RMSNorm of each query and key head before
//! RoPE (`attn_q_norm`, `attn_k_norm`, as in Gemma 3), RoPE on the two halves of each head
//! (NEOX), and no biases. The head width is `qwen3.attention.key_length`, so `n_head *
//! head_dim` need not be `n_embd`; small models tie the output projection to `token_embd`.

use unicorn_kernels::ops::RopeMode;

use super::transformer::{Network, Spec, Transformer};
use super::{HParams, ModelError};
use crate::gguf::GgufFile;

pub(crate) fn load(gguf: &GgufFile, hp: &mut HParams) -> Result<Box<dyn Network>, ModelError> {
    let spec = Spec { rope_mode: RopeMode::Neox, qk_norm: true, ..Spec::llama(hp) };
    Ok(Box::new(Transformer::load(gguf, hp, spec)?))
}
