//! A context's KV cache on the device: every layer's K and V in a few storage buffers, so that
//! RoPE, the cache store and attention run inside a [`crate::Step`] and a forward step needs no
//! host round trip per layer.
//!
//! Layout: layer `l`'s K then its V, each `n_kv_head x n_ctx x head_dim` values head-major (the
//! layout of `unicorn_kernels::attention` and of the engine's host cache, so host and device
//! copies are exchanged by plain copies of ranges). Layers are packed into as few buffers as
//! `maxStorageBufferRange` allows (whole layers per buffer: a shader sees one binding).
//!
//! Lifetime: the memory is shared (`Arc`) between the cache and every [`crate::Step`] that has
//! recorded a dispatch naming it, until that recording is submitted and waited for or dropped.
//! So dropping a cache never frees memory a pending submission uses; the memory goes back when
//! the last holder lets go. Recording takes `&mut KvCache`, and host access checks that no step
//! holds the memory, so the host never reads or writes it while the device may.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ash::vk;

use crate::error::{Result, VulkanError};
use crate::{Buffer, Context};

/// The largest head the attention shader holds (its query in shared memory).
pub const MAX_HEAD_DIM: usize = 512;

/// Element type of a device KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvElem {
    /// f16 bits, rounded to nearest even (what the CPU cache stores).
    F16,
    F32,
}

impl KvElem {
    /// Bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            KvElem::F16 => 2,
            KvElem::F32 => 4,
        }
    }
}

/// The shape of one layer's K (or V) cache: `n_kv_head x n_ctx x head_dim` values, head-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    /// KV heads.
    pub n_kv_head: usize,
    /// Positions the cache holds.
    pub n_ctx: usize,
    /// Values per head: even (the shaders move two values at a time), at most [`MAX_HEAD_DIM`].
    pub head_dim: usize,
}

impl KvShape {
    /// Values in one layer's K (or V).
    pub fn values(&self) -> Option<usize> {
        self.n_kv_head.checked_mul(self.n_ctx)?.checked_mul(self.head_dim)
    }

    /// Whether the shaders take heads of this width.
    pub fn check_head_dim(&self) -> Result<()> {
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) || self.head_dim > MAX_HEAD_DIM {
            return Err(VulkanError::Shape(format!(
                "head_dim {} (must be even, 2..={MAX_HEAD_DIM})",
                self.head_dim
            )));
        }
        Ok(())
    }
}

/// Where one layer is: its buffer, and the first element of its K and of its V there.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LayerAt {
    pub buf: usize,
    pub kbase: u32,
    pub vbase: u32,
}

/// The memory of a cache, shared with the steps that recorded dispatches naming it.
pub(crate) struct KvMem<'c> {
    bufs: Vec<Buffer<'c>>,
    /// Whole layers per buffer.
    per_buf: usize,
    live: Option<Arc<AtomicUsize>>,
}

impl<'c> KvMem<'c> {
    pub(crate) fn raw(&self, buf: usize) -> vk::Buffer {
        self.bufs[buf].raw()
    }

    pub(crate) fn buffer(&self, buf: usize) -> &Buffer<'c> {
        &self.bufs[buf]
    }
}

impl Drop for KvMem<'_> {
    fn drop(&mut self) {
        if let Some(n) = &self.live {
            n.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// See the module documentation.
pub struct KvCache<'c> {
    mem: Arc<KvMem<'c>>,
    shape: KvShape,
    elem: KvElem,
    n_layers: usize,
}

impl fmt::Debug for KvCache<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvCache")
            .field("shape", &self.shape)
            .field("elem", &self.elem)
            .field("n_layers", &self.n_layers)
            .field("buffers", &self.mem.bufs.len())
            .finish()
    }
}

impl<'c> KvCache<'c> {
    /// A zeroed cache of `n_layers` layers of `shape` in `elem`. `live`, when given, counts the
    /// caches whose memory is still allocated: it is incremented now and decremented when the
    /// memory is freed (after the cache and every step holding it let go), so an owner can check
    /// that none leak.
    pub fn new(
        ctx: &'c Context,
        shape: KvShape,
        elem: KvElem,
        n_layers: usize,
        live: Option<Arc<AtomicUsize>>,
    ) -> Result<KvCache<'c>> {
        shape.check_head_dim()?;
        let too_large = || VulkanError::Shape(format!("a KV cache of {n_layers} x {shape:?}"));
        let values = shape.values().ok_or_else(too_large)?;
        let layer_bytes =
            values.checked_mul(2 * elem.bytes()).filter(|&b| b > 0).ok_or_else(too_large)?;
        let limit = ctx.info().max_storage_buffer_range.min(u64::from(u32::MAX));
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        if layer_bytes > limit {
            return Err(VulkanError::Limit {
                what: "one layer's KV cache",
                value: layer_bytes as u64,
                limit: limit as u64,
            });
        }
        let per_buf = (limit / layer_bytes).clamp(1, n_layers.max(1));
        let mut bufs = Vec::with_capacity(n_layers.div_ceil(per_buf));
        let mut left = n_layers;
        while left > 0 {
            let n = left.min(per_buf);
            bufs.push(Buffer::zeroed(ctx, n * layer_bytes)?);
            left -= n;
        }
        if let Some(c) = &live {
            c.fetch_add(1, Ordering::Relaxed);
        }
        Ok(KvCache { mem: Arc::new(KvMem { bufs, per_buf, live }), shape, elem, n_layers })
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    pub fn elem(&self) -> KvElem {
        self.elem
    }

    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    /// Device buffers holding the layers.
    pub fn buffers(&self) -> usize {
        self.mem.bufs.len()
    }

    /// Bytes of one layer's K (or V).
    fn half_bytes(&self) -> usize {
        // Checked in `new`.
        self.shape.n_kv_head * self.shape.n_ctx * self.shape.head_dim * self.elem.bytes()
    }

    /// Where `layer` is.
    pub(crate) fn at(&self, layer: usize) -> Result<LayerAt> {
        if layer >= self.n_layers {
            return Err(VulkanError::Shape(format!(
                "layer {layer} of a cache of {}",
                self.n_layers
            )));
        }
        let values = self.half_bytes() / self.elem.bytes();
        // A buffer holds at most maxStorageBufferRange bytes, below 2^32: element offsets fit.
        let kbase = (layer % self.mem.per_buf) * 2 * values;
        let to_u32 = |v: usize| {
            u32::try_from(v).map_err(|_| VulkanError::Limit {
                what: "KV cache offset",
                value: v as u64,
                limit: u32::MAX.into(),
            })
        };
        Ok(LayerAt {
            buf: layer / self.mem.per_buf,
            kbase: to_u32(kbase)?,
            vbase: to_u32(kbase + values)?,
        })
    }

    /// The memory, for a step to hold until its recording is done. Takes `&mut self` so that no
    /// host borrow of the contents ([`KvCache::layer`]) is alive when a step starts holding it.
    pub(crate) fn share(&mut self) -> Arc<KvMem<'c>> {
        Arc::clone(&self.mem)
    }

    fn byte_range(&self, layer: usize) -> Result<(usize, std::ops::Range<usize>)> {
        let at = self.at(layer)?;
        let half = self.half_bytes();
        let k0 = at.kbase as usize * self.elem.bytes();
        Ok((at.buf, k0..k0 + 2 * half))
    }

    fn idle(&self) -> Result<()> {
        if Arc::strong_count(&self.mem) != 1 {
            return Err(VulkanError::InUse("a KV cache named by a step's recording"));
        }
        Ok(())
    }

    /// Layer `layer`'s K and V bytes as the host sees them (native-endian values in the layout
    /// above). An error while a step holds the cache (a recording naming it is not yet
    /// submitted and waited for, or dropped).
    pub fn layer(&self, layer: usize) -> Result<(&[u8], &[u8])> {
        self.idle()?;
        let (buf, r) = self.byte_range(layer)?;
        let bytes = &self.mem.bufs[buf].as_bytes()[r];
        Ok(bytes.split_at(bytes.len() / 2))
    }

    /// [`KvCache::layer`], writable.
    pub fn layer_mut(&mut self, layer: usize) -> Result<(&mut [u8], &mut [u8])> {
        let (buf, r) = self.byte_range(layer)?;
        let mem = Arc::get_mut(&mut self.mem)
            .ok_or(VulkanError::InUse("a KV cache named by a step's recording"))?;
        let bytes = &mut mem.bufs[buf].as_bytes_mut()[r];
        let half = bytes.len() / 2;
        Ok(bytes.split_at_mut(half))
    }

    pub(crate) fn mem(&self) -> &KvMem<'c> {
        &self.mem
    }
}
