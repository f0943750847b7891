//! A context's state: its KV cache, the tokens it has seen, and its position.
//!
//! Per layer, K and V each hold `n_head_kv x n_ctx x head_dim` values in the layout of
//! `unicorn_kernels::attention` (one KV head's positions contiguous). f16 halves the memory and
//! the attention's memory traffic, and is what llama.cpp uses by default.

use half::slice::HalfBitsSliceExt;
use unicorn_kernels::attention::{KvCache, KvData, KvDataMut};

use super::{HParams, ModelError};

/// Element type of a KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    F16,
    F32,
}

/// f16 values are kept as their bits: a zeroed `Vec<u16>` comes from zeroed pages, which the
/// kernel hands out lazily, so a large cache costs memory only as it fills.
#[derive(Debug)]
enum Buf {
    F16(Vec<u16>),
    F32(Vec<f32>),
}

impl Buf {
    fn zeroed(ty: KvType, n: usize) -> Buf {
        match ty {
            KvType::F16 => Buf::F16(vec![0u16; n]),
            KvType::F32 => Buf::F32(vec![0.0; n]),
        }
    }

    fn data(&self) -> KvData<'_> {
        match self {
            Buf::F16(v) => KvData::F16(v.reinterpret_cast()),
            Buf::F32(v) => KvData::F32(v),
        }
    }

    fn data_mut(&mut self) -> KvDataMut<'_> {
        match self {
            Buf::F16(v) => KvDataMut::F16(v.reinterpret_cast_mut()),
            Buf::F32(v) => KvDataMut::F32(v),
        }
    }
}

/// One sequence's state.
#[derive(Debug)]
pub struct KvState {
    n_ctx: usize,
    n_head_kv: usize,
    head_dim: usize,
    ty: KvType,
    layers: Vec<(Buf, Buf)>,
    tokens: Vec<u32>,
}

impl KvState {
    /// A cache for `n_ctx` positions of a model of shape `hp`.
    pub fn new(hp: &HParams, n_ctx: usize, ty: KvType) -> Result<KvState, ModelError> {
        if n_ctx == 0 {
            return Err(ModelError::BadHParam { key: "n_ctx".into(), message: "0 tokens".into() });
        }
        let per = hp.n_head_kv.checked_mul(n_ctx).and_then(|v| v.checked_mul(hp.head_dim));
        let Some(per) = per else {
            return Err(ModelError::BadHParam {
                key: "n_ctx".into(),
                message: format!("{n_ctx} too large"),
            });
        };
        let layers =
            (0..hp.n_layer).map(|_| (Buf::zeroed(ty, per), Buf::zeroed(ty, per))).collect();
        Ok(KvState {
            n_ctx,
            n_head_kv: hp.n_head_kv,
            head_dim: hp.head_dim,
            ty,
            layers,
            tokens: Vec::with_capacity(n_ctx.min(1 << 16)),
        })
    }

    /// Bytes a cache of `n_ctx` positions takes for a model of shape `hp`.
    pub fn bytes_for(hp: &HParams, n_ctx: usize, ty: KvType) -> u64 {
        let elem = match ty {
            KvType::F16 => 2,
            KvType::F32 => 4,
        };
        2 * hp.n_layer as u64 * hp.kv_dim() as u64 * n_ctx as u64 * elem
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Tokens decoded so far (the next token goes at this position).
    pub fn n_past(&self) -> usize {
        self.tokens.len()
    }

    /// The tokens decoded so far, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn kv_type(&self) -> KvType {
        self.ty
    }

    /// Forgets every position from `n` on.
    pub fn rewind(&mut self, n: usize) -> Result<(), ModelError> {
        if n > self.tokens.len() {
            return Err(ModelError::BadRewind { to: n, n_past: self.tokens.len() });
        }
        self.tokens.truncate(n);
        Ok(())
    }

    pub(crate) fn push_tokens(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }

    /// Stores one token's keys and values of `layer` at `pos`.
    pub(crate) fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (n_kv, n_ctx, hd) = (self.n_head_kv, self.n_ctx, self.head_dim);
        let (kb, vb) = &mut self.layers[layer];
        KvCache::store(kb.data_mut(), k, pos, n_kv, n_ctx, hd);
        KvCache::store(vb.data_mut(), v, pos, n_kv, n_ctx, hd);
    }

    /// The cache of `layer`, for attention.
    pub(crate) fn layer(&self, layer: usize) -> KvCache<'_> {
        let (k, v) = &self.layers[layer];
        KvCache {
            k: k.data(),
            v: v.data(),
            n_kv_head: self.n_head_kv,
            n_ctx: self.n_ctx,
            head_dim: self.head_dim,
        }
    }
}
