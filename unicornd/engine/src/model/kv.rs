//! A context's state: its KV cache, the tokens it has seen, and its position.
//!
//! Per layer with a cache of its own (`HParams::n_layer_kv`: Gemma 3n's last layers read an
//! earlier layer's cache and have none), K and V each hold `n_head_kv x n_ctx x head_dim` values in the layout of
//! `unicorn_kernels::attention` (one KV head's positions contiguous). f16 halves the memory and
//! the attention's memory traffic, and is what llama.cpp uses by default.

use half::slice::HalfBitsSliceExt;
use memmap2::MmapMut;
use unicorn_kernels::attention::{KvCache, KvData, KvDataMut};

use super::{HParams, ModelError};

/// Element type of a KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    F16,
    F32,
}

/// A context's whole cache (every layer's K and V; f16 values kept as their bits), in an
/// anonymous mapping of its own: the kernel hands out its zeroed pages as they are first
/// written, so a cache costs memory only as its positions fill, and all of it goes back when
/// the context ends. (From the heap, the allocator would clear it up front once it stops
/// mapping large blocks, which glibc does after the first such block is freed: every context's
/// cache would then be resident in full.)
#[derive(Debug)]
struct Buf {
    ty: KvType,
    map: MmapMut,
}

impl Buf {
    /// `bytes` of zeroes (a whole number of elements of `ty`).
    fn zeroed(ty: KvType, bytes: usize) -> Result<Buf, ModelError> {
        // A mapping cannot be empty; one element more than asked is never read.
        let map = MmapMut::map_anon(bytes.max(elem_bytes(ty)))
            .map_err(|source| ModelError::KvMemory { bytes: bytes as u64, source })?;
        Ok(Buf { ty, map })
    }

    fn data(&self, r: std::ops::Range<usize>) -> KvData<'_> {
        // A mapping is page-aligned, so the casts cannot fail.
        match self.ty {
            KvType::F16 => {
                KvData::F16(bytemuck::cast_slice::<u8, u16>(&self.map)[r].reinterpret_cast())
            }
            KvType::F32 => KvData::F32(&bytemuck::cast_slice::<u8, f32>(&self.map)[r]),
        }
    }

    fn data_mut(&mut self, r: std::ops::Range<usize>) -> KvDataMut<'_> {
        match self.ty {
            KvType::F16 => KvDataMut::F16(
                bytemuck::cast_slice_mut::<u8, u16>(&mut self.map)[r].reinterpret_cast_mut(),
            ),
            KvType::F32 => {
                KvDataMut::F32(&mut bytemuck::cast_slice_mut::<u8, f32>(&mut self.map)[r])
            }
        }
    }
}

fn elem_bytes(ty: KvType) -> usize {
    match ty {
        KvType::F16 => 2,
        KvType::F32 => 4,
    }
}

/// One sequence's state.
#[derive(Debug)]
pub struct KvState {
    n_ctx: usize,
    n_head_kv: usize,
    head_dim: usize,
    ty: KvType,
    /// Layers with a cache of their own (`HParams::n_layer_kv`).
    n_caches: usize,
    /// Per cache (layer with its own K and V), K then V, each `n_head_kv x n_ctx x head_dim` values.
    cache: Buf,
    /// Values in one layer's K (or V).
    per: usize,
    tokens: Vec<u32>,
}

impl KvState {
    /// A cache for `n_ctx` positions of a model of shape `hp`.
    pub fn new(hp: &HParams, n_ctx: usize, ty: KvType) -> Result<KvState, ModelError> {
        if n_ctx == 0 {
            return Err(ModelError::BadHParam { key: "n_ctx".into(), message: "0 tokens".into() });
        }
        let per = hp.n_head_kv.checked_mul(n_ctx).and_then(|v| v.checked_mul(hp.head_dim));
        let bytes = per
            .and_then(|p| p.checked_mul(2 * elem_bytes(ty)))
            .and_then(|p| p.checked_mul(hp.n_layer_kv));
        let (Some(per), Some(bytes)) = (per, bytes) else {
            return Err(ModelError::BadHParam {
                key: "n_ctx".into(),
                message: format!("{n_ctx} too large"),
            });
        };
        Ok(KvState {
            n_ctx,
            n_head_kv: hp.n_head_kv,
            head_dim: hp.head_dim,
            ty,
            n_caches: hp.n_layer_kv,
            cache: Buf::zeroed(ty, bytes)?,
            per,
            tokens: Vec::with_capacity(n_ctx.min(1 << 16)),
        })
    }

    /// Bytes a cache of `n_ctx` positions takes for a model of shape `hp`.
    pub fn bytes_for(hp: &HParams, n_ctx: usize, ty: KvType) -> u64 {
        2 * hp.n_layer_kv as u64 * hp.kv_dim() as u64 * n_ctx as u64 * elem_bytes(ty) as u64
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Bytes this cache reserves (resident only as positions fill): [`KvState::bytes_for`].
    pub fn bytes(&self) -> u64 {
        (2 * self.n_caches * self.per * elem_bytes(self.ty)) as u64
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

    /// Stores one token's keys and values in cache `layer` (`< n_layer_kv`) at `pos`.
    pub(crate) fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (n_kv, n_ctx, hd) = (self.n_head_kv, self.n_ctx, self.head_dim);
        let (kr, vr) = self.ranges(layer);
        KvCache::store(self.cache.data_mut(kr), k, pos, n_kv, n_ctx, hd);
        KvCache::store(self.cache.data_mut(vr), v, pos, n_kv, n_ctx, hd);
    }

    /// Where `layer`'s K and V are in `cache`.
    fn ranges(&self, layer: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let k0 = 2 * layer * self.per;
        (k0..k0 + self.per, k0 + self.per..k0 + 2 * self.per)
    }

    /// Cache `layer` (`< n_layer_kv`), for attention.
    pub(crate) fn layer(&self, layer: usize) -> KvCache<'_> {
        let (kr, vr) = self.ranges(layer);
        KvCache {
            k: self.cache.data(kr),
            v: self.cache.data(vr),
            n_kv_head: self.n_head_kv,
            n_ctx: self.n_ctx,
            head_dim: self.head_dim,
        }
    }
}
