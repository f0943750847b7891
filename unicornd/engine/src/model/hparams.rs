//! Hyper-parameters read from GGUF metadata (`<arch>.<key>`), checked before anything is sized
//! by them: a hostile file must not make the engine allocate absurd buffers or divide by zero.

use super::ModelError;
use crate::gguf::{GgufFile, Metadata, Value};

/// Upper bounds far above any real model, so that sizes computed from them cannot overflow.
const MAX_EMBD: u64 = 1 << 16;
const MAX_LAYERS: u64 = 1 << 10;
const MAX_HEADS: u64 = 1 << 10;
const MAX_FF: u64 = 1 << 18;
const MAX_CTX: u64 = 1 << 24;

/// The shape of a decoder-only transformer.
#[derive(Clone, Debug, PartialEq)]
pub struct HParams {
    pub arch: String,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    /// Layers with a KV cache of their own: the first `n_layer_kv`; any later layer reads the
    /// cache of one of them (Gemma 3n). `n_layer` for every other architecture.
    pub n_layer_kv: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// Leading dimensions of each head that RoPE rotates.
    pub rope_dims: usize,
    /// Linear RoPE position scale (1 / `rope.scaling.factor`).
    pub rope_scale: f32,
}

impl HParams {
    /// Reads the common keys of `arch`; `n_vocab` comes from the tokenizer.
    pub fn read(gguf: &GgufFile, arch: &str, n_vocab: usize) -> Result<HParams, ModelError> {
        let md = gguf.metadata();
        let key = |k: &str| format!("{arch}.{k}");
        let bad = |k: &str, m: String| ModelError::BadHParam { key: key(k), message: m };
        let uint = |k: &str, max: u64| -> Result<usize, ModelError> {
            let v = md.get_uint(&key(k))?;
            if v == 0 || v > max {
                return Err(bad(k, format!("{v} is outside 1..={max}")));
            }
            Ok(v as usize)
        };
        let opt_uint = |k: &str, max: u64| -> Result<Option<usize>, ModelError> {
            match md.opt_uint(&key(k))? {
                None => Ok(None),
                Some(v) if v == 0 || v > max => Err(bad(k, format!("{v} is outside 1..={max}"))),
                Some(v) => Ok(Some(v as usize)),
            }
        };
        let n_embd = uint("embedding_length", MAX_EMBD)?;
        let n_layer = uint("block_count", MAX_LAYERS)?;
        let n_head = uint("attention.head_count", MAX_HEADS)?;
        let n_head_kv = opt_uint("attention.head_count_kv", MAX_HEADS)?.unwrap_or(n_head);
        if n_head % n_head_kv != 0 {
            return Err(bad(
                "attention.head_count_kv",
                format!("{n_head_kv} does not divide the {n_head} query heads"),
            ));
        }
        let head_dim = match opt_uint("attention.key_length", MAX_EMBD)? {
            Some(d) => d,
            None if n_embd % n_head == 0 => n_embd / n_head,
            None => {
                return Err(bad(
                    "attention.head_count",
                    format!("{n_head} does not divide {n_embd}"),
                ))
            }
        };
        if let Some(v) = opt_uint("attention.value_length", MAX_EMBD)? {
            if v != head_dim {
                return Err(bad(
                    "attention.value_length",
                    format!("{v} differs from key_length {head_dim}"),
                ));
            }
        }
        let rope_dims = opt_uint("rope.dimension_count", MAX_EMBD)?.unwrap_or(head_dim);
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(bad(
                "rope.dimension_count",
                format!("{rope_dims} for heads of {head_dim}"),
            ));
        }
        let rms_eps = md.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
        if !(rms_eps.is_finite() && rms_eps > 0.0 && rms_eps < 1.0) {
            return Err(bad("attention.layer_norm_rms_epsilon", format!("{rms_eps}")));
        }
        let rope_base = md.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        if !(rope_base.is_finite() && rope_base > 1.0) {
            return Err(bad("rope.freq_base", format!("{rope_base}")));
        }
        let rope_scale = match md.opt_str(&key("rope.scaling.type"))? {
            None | Some("none") => 1.0,
            Some("linear") => {
                let f = md.get_f32(&key("rope.scaling.factor"))?;
                if !(f.is_finite() && f >= 1.0) {
                    return Err(bad("rope.scaling.factor", format!("{f}")));
                }
                1.0 / f
            }
            Some(other) => {
                return Err(bad("rope.scaling.type", format!("{other:?} scaling is not supported")))
            }
        };
        Ok(HParams {
            arch: arch.to_owned(),
            n_vocab,
            n_ctx_train: uint("context_length", MAX_CTX)?,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: feed_forward_length(md, &key("feed_forward_length"), n_layer)?,
            n_layer_kv: n_layer,
            rms_eps,
            rope_base,
            rope_dims,
            rope_scale,
        })
    }

    /// Width of the query projection.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Width of the key and value projections.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}

/// `feed_forward_length`: one number, or one per layer (Gemma 3n's converter writes an array).
/// Layers of different widths are not supported; equal ones are the one number.
fn feed_forward_length(md: &Metadata, key: &str, n_layer: usize) -> Result<usize, ModelError> {
    let bad = |m: String| ModelError::BadHParam { key: key.to_owned(), message: m };
    let widths: Vec<u64> = match md.value(key)? {
        Value::Array(a) => {
            let all =
                a.to_u64s().ok_or_else(|| bad("not an array of non-negative integers".into()))?;
            if all.len() != n_layer {
                return Err(bad(format!("{} values for {n_layer} layers", all.len())));
            }
            all
        }
        _ => vec![md.get_uint(key)?],
    };
    let first = widths[0];
    if let Some(other) = widths.iter().find(|&&w| w != first) {
        return Err(bad(format!(
            "layers of different widths ({first} and {other}) are not supported"
        )));
    }
    if first == 0 || first > MAX_FF {
        return Err(bad(format!("{first} is outside 1..={MAX_FF}")));
    }
    Ok(first as usize)
}
