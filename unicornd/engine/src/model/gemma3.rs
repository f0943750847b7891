//! `gemma3`: Gemma 3. Against the llama block: embeddings scaled by `sqrt(n_embd)`; RMSNorm of
//! each query and key head before RoPE; RMSNorm of the attention and feed-forward outputs
//! before their residual additions; a GeGLU feed-forward (tanh GELU); RoPE on the two halves of
//! each head (NEOX); sliding-window attention on five of every six layers.
//!
//! GGUF files store Gemma's norm weights with the `1 +` of its RMSNorm already added (llama.cpp's
//! converter does so), so the plain RMSNorm applies. Values llama.cpp fixes in code rather than
//! reading from the file, and which are therefore fixed here too:
//! - the local/global pattern: every 6th layer global (`set_swa_pattern(6)`);
//! - the RoPE base of local layers: 10 000 (`rope_freq_base_train_swa`); global layers use
//!   `gemma3.rope.freq_base`;
//! - the query scale: `1/sqrt(head_dim)`, except for the 27B model (62 layers), which uses
//!   `1/sqrt(n_embd / n_head)`.

use unicorn_kernels::ops::RopeMode;

use super::transformer::{Ffn, Network, SlidingWindow, Spec, Transformer};
use super::{HParams, ModelError};
use crate::gguf::GgufFile;

const SWA_PATTERN: usize = 6;
const SWA_ROPE_BASE: f32 = 10_000.0;

pub(crate) fn load(gguf: &GgufFile, hp: &mut HParams) -> Result<Box<dyn Network>, ModelError> {
    let key = "gemma3.attention.sliding_window";
    let window = gguf.metadata().get_uint(key)?;
    if window == 0 || window > 1 << 24 {
        return Err(ModelError::BadHParam { key: key.into(), message: format!("{window}") });
    }
    let attn_scale = if hp.n_layer == 62 {
        1.0 / ((hp.n_embd / hp.n_head) as f32).sqrt()
    } else {
        1.0 / (hp.head_dim as f32).sqrt()
    };
    let spec = Spec {
        rope_mode: RopeMode::Neox,
        embed_scale: true,
        qk_norm: true,
        post_norms: true,
        ffn: Ffn::GeluTanh,
        attn_scale,
        swa: Some(SlidingWindow::every(SWA_PATTERN, hp.n_layer, window as usize, SWA_ROPE_BASE)),
        final_softcap: None,
    };
    Ok(Box::new(Transformer::load(gguf, hp, spec)?))
}
