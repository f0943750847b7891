//! A context's state: its KV cache, the tokens it has seen, and its position.
//!
//! Per layer with a cache of its own (`HParams::n_layer_kv`: Gemma 3n's last layers read an
//! earlier layer's cache and have none), K and V each hold `n_head_kv x n_ctx x head_dim` values in the layout of
//! `unicorn_kernels::attention` (one KV head's positions contiguous). f16 halves the memory and
//! the attention's memory traffic, and is what llama.cpp uses by default.
//!
//! With attention on the Vulkan device the cache lives there instead ([`unicorn_vulkan::KvCache`],
//! the same layout, allocated on the context's first pass there and freed with the context). A
//! state tracks how many leading positions each copy holds, so a pass that runs attention on
//! the other side first copies the positions it lacks (host to device, or back after a fail-over
//! to the CPU), and a rewind needs nothing on either side.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use half::slice::HalfBitsSliceExt;
use memmap2::MmapMut;
use unicorn_kernels::attention::{KvCache, KvData, KvDataMut};
use unicorn_vulkan::{Context, KvElem, KvShape};

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

/// Copies positions `r` of every head (`n_kv` heads of `n_ctx` rows of `row` bytes) from `src`
/// to `dst`, two caches of one layer's K or V in the same layout.
fn copy_positions(
    src: &[u8],
    dst: &mut [u8],
    n_kv: usize,
    n_ctx: usize,
    row: usize,
    r: std::ops::Range<usize>,
) {
    for g in 0..n_kv {
        let at = (g * n_ctx + r.start) * row..(g * n_ctx + r.end) * row;
        dst[at.clone()].copy_from_slice(&src[at]);
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
    /// The cache on the Vulkan device, once a pass ran attention there.
    dev: Option<unicorn_vulkan::KvCache<'static>>,
    /// Leading positions whose keys and values the host cache holds, and the device cache.
    host_valid: usize,
    dev_valid: usize,
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
            dev: None,
            host_valid: 0,
            dev_valid: 0,
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
        self.host_valid = self.host_valid.min(n);
        self.dev_valid = self.dev_valid.min(n);
        Ok(())
    }

    /// Appends the tokens of a pass whose keys and values went into the device cache
    /// (`on_device`) or the host one.
    pub(crate) fn push_tokens(&mut self, tokens: &[u32], on_device: bool) {
        let n = self.tokens.len();
        self.tokens.extend_from_slice(tokens);
        let valid = if on_device { &mut self.dev_valid } else { &mut self.host_valid };
        if *valid == n {
            *valid = self.tokens.len();
        }
    }

    /// Whether the device cache exists (a pass ran attention on the device).
    pub fn on_device(&self) -> bool {
        self.dev.is_some()
    }

    /// The device cache for a pass that runs attention on `ctx`: allocated on first use
    /// (counted in `live`), and given the positions only the host holds.
    pub(crate) fn device_cache(
        &mut self,
        ctx: &'static Context,
        live: &Arc<AtomicUsize>,
    ) -> Result<&mut unicorn_vulkan::KvCache<'static>, ModelError> {
        let n_past = self.tokens.len();
        if self.dev.is_none() {
            let elem = match self.ty {
                KvType::F16 => KvElem::F16,
                KvType::F32 => KvElem::F32,
            };
            let dev = unicorn_vulkan::KvCache::new(
                ctx,
                self.shape(),
                elem,
                self.n_caches,
                Some(Arc::clone(live)),
            )?;
            log::debug!("KV cache on the device: {dev:?}");
            self.dev = Some(dev);
            self.dev_valid = 0;
        }
        if self.dev_valid < n_past {
            if self.host_valid < n_past {
                return Err(ModelError::KvLost { valid: self.host_valid, n_past });
            }
            let (a, b) = (self.dev_valid, n_past);
            let eb = elem_bytes(self.ty);
            let (n_kv, n_ctx, hd, per) = (self.n_head_kv, self.n_ctx, self.head_dim, self.per);
            let dev = self.dev.as_mut().expect("allocated above");
            for layer in 0..self.n_caches {
                let host = &self.cache.map[2 * layer * per * eb..][..2 * per * eb];
                let (hk, hv) = host.split_at(per * eb);
                let (dk, dv) = dev.layer_mut(layer)?;
                copy_positions(hk, dk, n_kv, n_ctx, hd * eb, a..b);
                copy_positions(hv, dv, n_kv, n_ctx, hd * eb, a..b);
            }
            self.dev_valid = n_past;
        }
        Ok(self.dev.as_mut().expect("allocated above"))
    }

    /// The device cache of a pass that runs attention there ([`KvState::device_cache`] made it).
    pub(crate) fn device_mut(
        &mut self,
    ) -> Result<&mut unicorn_vulkan::KvCache<'static>, ModelError> {
        self.dev.as_mut().ok_or_else(|| {
            unicorn_vulkan::VulkanError::Shape("a context without a device KV cache".into()).into()
        })
    }

    /// Makes the host cache hold every position, for a pass that runs attention on the CPU:
    /// copies back what only the device cache holds, when `device_ok` (its memory can be
    /// trusted: the device was not lost); otherwise that is [`ModelError::KvLost`].
    pub(crate) fn sync_host(&mut self, device_ok: bool) -> Result<(), ModelError> {
        let n_past = self.tokens.len();
        if self.host_valid >= n_past {
            return Ok(());
        }
        let lost = ModelError::KvLost { valid: self.host_valid, n_past };
        let Some(dev) = self.dev.as_ref().filter(|_| device_ok && self.dev_valid >= n_past) else {
            return Err(lost);
        };
        let (a, b) = (self.host_valid, n_past);
        let eb = elem_bytes(self.ty);
        let (n_kv, n_ctx, hd, per) = (self.n_head_kv, self.n_ctx, self.head_dim, self.per);
        for layer in 0..self.n_caches {
            let (dk, dv) = dev.layer(layer)?;
            let host = &mut self.cache.map[2 * layer * per * eb..][..2 * per * eb];
            let (hk, hv) = host.split_at_mut(per * eb);
            copy_positions(dk, hk, n_kv, n_ctx, hd * eb, a..b);
            copy_positions(dv, hv, n_kv, n_ctx, hd * eb, a..b);
        }
        log::info!("KV cache positions {a}..{b} copied back from the device");
        self.host_valid = n_past;
        Ok(())
    }

    /// The shape of one layer's K (or V).
    fn shape(&self) -> KvShape {
        KvShape { n_kv_head: self.n_head_kv, n_ctx: self.n_ctx, head_dim: self.head_dim }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hp() -> HParams {
        HParams {
            arch: "llama".into(),
            n_vocab: 32,
            n_ctx_train: 64,
            n_embd: 8,
            n_layer: 2,
            n_head: 2,
            n_head_kv: 1,
            head_dim: 4,
            n_ff: 16,
            n_layer_kv: 2,
            rms_eps: 1e-5,
            rope_base: 10000.0,
            rope_dims: 4,
            rope_scale: 1.0,
        }
    }

    /// Positions whose keys and values exist only in a device cache that cannot be trusted (the
    /// device was lost), or that never existed on the host, are an error for a pass on the CPU,
    /// never silently zeros; rewinding to what the host holds makes the context usable again.
    #[test]
    fn positions_only_on_a_lost_device_are_an_error_until_rewound() {
        let mut kv = KvState::new(&hp(), 16, KvType::F16).unwrap();
        kv.push_tokens(&[1, 2], false);
        kv.push_tokens(&[3], true);
        kv.push_tokens(&[4], true);
        assert_eq!(kv.n_past(), 4);
        let lost = |r: Result<(), ModelError>| match r {
            Err(ModelError::KvLost { valid, n_past }) => (valid, n_past),
            other => panic!("{other:?}"),
        };
        assert_eq!(lost(kv.sync_host(false)), (2, 4));
        // Even a trusted device has nothing to give without a device cache.
        assert_eq!(lost(kv.sync_host(true)), (2, 4));
        kv.rewind(3).unwrap();
        assert_eq!(lost(kv.sync_host(false)), (2, 3));
        kv.rewind(2).unwrap();
        kv.sync_host(false).unwrap();
        // Tokens a CPU pass appends are on the host.
        kv.push_tokens(&[5], false);
        kv.sync_host(false).unwrap();
        assert_eq!(kv.tokens(), &[1, 2, 5]);
    }
}
