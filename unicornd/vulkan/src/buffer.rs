//! Storage buffers, one allocation each: [`Buffer`] in host-visible, host-coherent memory (every
//! activation and scratch buffer, which the host reads back), and the crate's weight buffers in
//! device-local memory (see [`crate::memory`]), mapped where that memory is host-visible and
//! filled through a staging buffer where it is not.

use std::fmt;

use ash::vk;

use crate::error::{Result, VkContext, VulkanError};
use crate::memory::{choose_weight_memory, MemoryType, WeightMemory};
use crate::Context;

/// A storage buffer of a [`Context`], mapped for its whole life and freed on drop.
///
/// The GPU reads it only during an operation that borrows it and waits for completion, and writes
/// only buffers the operations create internally, so `&`/`&mut` access from the host is sound.
pub struct Buffer<'c> {
    ctx: &'c Context,
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    /// Bytes the caller asked for (the allocation is padded to whole 4-byte words).
    len: usize,
    /// The whole padded allocation, mapped.
    ptr: *mut u8,
    size: usize,
}

// SAFETY: the buffer owns its memory and mapping; moving it to another thread moves that
// ownership (the context it borrows is `Sync`, and `Drop` only calls thread-safe device
// functions on handles nobody else uses).
unsafe impl Send for Buffer<'_> {}

// SAFETY: through `&Buffer` the host only reads the mapping (`as_bytes`, `to_f32`) and the device
// only reads it inside an operation that waits for completion; operations write only buffers they
// create themselves, or those of a `KvCache`, which never hands out a `&Buffer` and gives host
// access to its contents only while no step holds it (`KvCache::layer`), so shared references on
// several threads never see a concurrent write.
unsafe impl Sync for Buffer<'_> {}

impl fmt::Debug for Buffer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer").field("len", &self.len).finish_non_exhaustive()
    }
}

impl<'c> Buffer<'c> {
    /// A zeroed buffer of `len` bytes. Errors when `len` exceeds the device's
    /// `maxStorageBufferRange` (splitting is not implemented yet) or allocation fails.
    pub fn zeroed(ctx: &'c Context, len: usize) -> Result<Buffer<'c>> {
        Buffer::host(ctx, len, vk::BufferUsageFlags::STORAGE_BUFFER)
    }

    /// A zeroed host-visible, host-coherent buffer of `len` bytes with `usage`.
    fn host(ctx: &'c Context, len: usize, usage: vk::BufferUsageFlags) -> Result<Buffer<'c>> {
        let size = padded(len);
        if usage.contains(vk::BufferUsageFlags::STORAGE_BUFFER) {
            check_storage_size(ctx, size)?;
        }
        let (buffer, memory, ()) =
            create_bound(ctx, size, usage, |bits| Ok((host_visible_type(ctx, bits)?, ())))?;
        Buffer::mapped(ctx, buffer, memory, len, size)
    }

    /// Takes ownership of `buffer` bound to host-visible, host-coherent `memory` of at least
    /// `size` bytes, maps it and zeroes it.
    fn mapped(
        ctx: &'c Context,
        buffer: vk::Buffer,
        memory: vk::DeviceMemory,
        len: usize,
        size: usize,
    ) -> Result<Buffer<'c>> {
        // From here `Drop` frees the buffer and memory on error.
        let mut b = Buffer { ctx, buffer, memory, len, ptr: std::ptr::null_mut(), size };
        let d = &ctx.device;
        // SAFETY: the memory is host-visible (the caller chose its type) and not mapped yet; it
        // stays mapped until drop (freeing memory unmaps it).
        let ptr = unsafe { d.map_memory(b.memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()) }
            .vk("vkMapMemory")?;
        b.ptr = ptr.cast();
        // SAFETY: the mapping covers the allocation, at least `size` bytes, which nothing else
        // accesses yet.
        unsafe { std::ptr::write_bytes(b.ptr, 0, size) };
        Ok(b)
    }

    /// A buffer holding `bytes` (e.g. a weight tensor in its GGUF layout).
    pub fn from_bytes(ctx: &'c Context, bytes: &[u8]) -> Result<Buffer<'c>> {
        let mut b = Buffer::zeroed(ctx, bytes.len())?;
        b.as_bytes_mut().copy_from_slice(bytes);
        Ok(b)
    }

    /// A buffer holding `values`.
    pub fn from_f32(ctx: &'c Context, values: &[f32]) -> Result<Buffer<'c>> {
        let mut b = Buffer::zeroed(ctx, std::mem::size_of_val(values))?;
        for (o, v) in b.as_bytes_mut().chunks_exact_mut(4).zip(values) {
            o.copy_from_slice(&v.to_ne_bytes());
        }
        Ok(b)
    }

    /// Length in bytes, as created.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The contents.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `size >= len` bytes for the buffer's life; the device writes the
        // buffer only inside an operation that holds `&self` of the context and waits for the
        // device before returning, and operations write only buffers they create themselves, so
        // no device write overlaps this shared borrow.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The contents, writable.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_bytes`; `&mut self` excludes every other host access, and the device
        // accesses the buffer only while an operation borrows it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The contents as f32 (native endian); trailing bytes that do not make an f32 are ignored.
    pub fn to_f32(&self) -> Vec<f32> {
        self.as_bytes()
            .chunks_exact(4)
            .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    pub(crate) fn raw(&self) -> vk::Buffer {
        self.buffer
    }

    /// The padded size the shaders see.
    pub(crate) fn padded_size(&self) -> usize {
        self.size
    }
}

impl Drop for Buffer<'_> {
    fn drop(&mut self) {
        let d = &self.ctx.device;
        // SAFETY: the buffer and memory were created from this live device (the borrow of the
        // context outlives the buffer); no submission uses them any more, since operations wait
        // for completion before returning; null handles are ignored.
        unsafe {
            d.destroy_buffer(self.buffer, None);
            if self.memory != vk::DeviceMemory::null() {
                d.free_memory(self.memory, None);
            }
        }
    }
}

/// Shaders read whole words: pad to a multiple of 4, and never create an empty buffer.
fn padded(len: usize) -> usize {
    len.max(1).div_ceil(4) * 4
}

fn check_storage_size(ctx: &Context, size: usize) -> Result<()> {
    let limit = ctx.info().max_storage_buffer_range;
    if size as u64 > limit {
        return Err(VulkanError::Limit { what: "storage buffer size", value: size as u64, limit });
    }
    Ok(())
}

/// The first host-visible, host-coherent memory type among `type_bits`.
fn host_visible_type(ctx: &Context, type_bits: u32) -> Result<u32> {
    let wanted = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
    let mem = &ctx.memory;
    (0..mem.memory_type_count.min(32))
        .find(|&i| {
            type_bits & (1 << i) != 0
                && mem.memory_types[i as usize].property_flags.contains(wanted)
        })
        .ok_or(VulkanError::NoMemoryType)
}

/// The device's memory types as [`choose_weight_memory`] takes them.
fn memory_types(ctx: &Context) -> Vec<MemoryType> {
    let mem = &ctx.memory;
    let n = (mem.memory_type_count as usize).min(mem.memory_types.len());
    mem.memory_types[..n]
        .iter()
        .map(|t| MemoryType {
            device_local: t.property_flags.contains(vk::MemoryPropertyFlags::DEVICE_LOCAL),
            host_visible: t.property_flags.contains(vk::MemoryPropertyFlags::HOST_VISIBLE),
            host_coherent: t.property_flags.contains(vk::MemoryPropertyFlags::HOST_COHERENT),
        })
        .collect()
}

/// Creates a buffer of `size` (> 0) bytes with `usage` and binds it to a fresh allocation of the
/// memory type `pick` chooses from the buffer's `memoryTypeBits` (along with a value returned as
/// the third element). On error nothing is left allocated.
fn create_bound<T>(
    ctx: &Context,
    size: usize,
    usage: vk::BufferUsageFlags,
    pick: impl FnOnce(u32) -> Result<(u32, T)>,
) -> Result<(vk::Buffer, vk::DeviceMemory, T)> {
    let d = &ctx.device;
    let ci = vk::BufferCreateInfo::default()
        .size(size as u64)
        .usage(usage)
        .sharing_mode(vk::SharingMode::EXCLUSIVE);
    // SAFETY: the device is live (`ctx` outlives the call); `ci` is valid, size > 0.
    let buffer = unsafe { d.create_buffer(&ci, None) }.vk("vkCreateBuffer")?;
    let bound = (|| {
        // SAFETY: `buffer` was just created from this device.
        let req = unsafe { d.get_buffer_memory_requirements(buffer) };
        let (type_index, extra) = pick(req.memory_type_bits)?;
        let ai = vk::MemoryAllocateInfo::default()
            .allocation_size(req.size)
            .memory_type_index(type_index);
        // SAFETY: `ai` names a memory type of this device that the buffer accepts (`pick` chose
        // it from `memory_type_bits`).
        let memory = unsafe { d.allocate_memory(&ai, None) }.vk("vkAllocateMemory")?;
        // SAFETY: the memory is fresh, large enough (`req.size`), of a type the buffer accepts,
        // and offset 0 satisfies any alignment.
        if let Err(e) = unsafe { d.bind_buffer_memory(buffer, memory, 0) } {
            // SAFETY: the memory is unused (binding failed) and freed once.
            unsafe { d.free_memory(memory, None) };
            return Err(VulkanError::Vk { call: "vkBindBufferMemory", result: e });
        }
        Ok((memory, extra))
    })();
    match bound {
        Ok((memory, extra)) => Ok((buffer, memory, extra)),
        Err(e) => {
            // SAFETY: the buffer is unused by any submission and destroyed once.
            unsafe { d.destroy_buffer(buffer, None) };
            Err(e)
        }
    }
}

/// A weight (or any upload-once constant) on the device: see [`crate::memory`].
pub(crate) enum WeightBuffer<'c> {
    /// In mapped memory, written by the host (unified memory).
    Mapped(Buffer<'c>),
    /// In memory the host does not map, written through a staging buffer.
    Local(LocalBuffer<'c>),
}

impl<'c> WeightBuffer<'c> {
    /// A buffer holding `bytes`, in the memory [`choose_weight_memory`] picks for this device
    /// (and [`crate::Options::force_staging`]); staged uploads go in chunks of
    /// [`Context::staging_chunk`] bytes.
    pub(crate) fn upload(ctx: &'c Context, bytes: &[u8]) -> Result<WeightBuffer<'c>> {
        let size = padded(bytes.len());
        check_storage_size(ctx, size)?;
        let usage = vk::BufferUsageFlags::STORAGE_BUFFER | vk::BufferUsageFlags::TRANSFER_DST;
        let types = memory_types(ctx);
        let (buffer, memory, how) = create_bound(ctx, size, usage, |bits| {
            let how =
                choose_weight_memory(&types, bits, ctx.info().device_type, ctx.force_staging())
                    .ok_or(VulkanError::NoMemoryType)?;
            let i = match how {
                WeightMemory::Mapped { type_index } | WeightMemory::Staged { type_index } => {
                    type_index
                }
            };
            Ok((i, how))
        })?;
        ctx.log_weight_memory(how);
        match how {
            WeightMemory::Mapped { .. } => {
                let mut b = Buffer::mapped(ctx, buffer, memory, bytes.len(), size)?;
                b.as_bytes_mut().copy_from_slice(bytes);
                Ok(WeightBuffer::Mapped(b))
            }
            WeightMemory::Staged { .. } => {
                let b = LocalBuffer { ctx, buffer, memory, len: bytes.len(), size };
                b.fill(bytes)?;
                Ok(WeightBuffer::Local(b))
            }
        }
    }

    pub(crate) fn raw(&self) -> vk::Buffer {
        match self {
            WeightBuffer::Mapped(b) => b.raw(),
            WeightBuffer::Local(b) => b.buffer,
        }
    }

    /// Length in bytes, as uploaded.
    pub(crate) fn len(&self) -> usize {
        match self {
            WeightBuffer::Mapped(b) => b.len(),
            WeightBuffer::Local(b) => b.len,
        }
    }

    /// The padded size the shaders see.
    pub(crate) fn padded_size(&self) -> usize {
        match self {
            WeightBuffer::Mapped(b) => b.padded_size(),
            WeightBuffer::Local(b) => b.size,
        }
    }

    /// Whether the weight went through a staging buffer.
    pub(crate) fn staged(&self) -> bool {
        matches!(self, WeightBuffer::Local(_))
    }
}

/// A storage buffer in memory the host does not map; freed on drop.
pub(crate) struct LocalBuffer<'c> {
    ctx: &'c Context,
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    len: usize,
    size: usize,
}

impl LocalBuffer<'_> {
    /// Writes `bytes` (at most `size`; the rest of the padded size is zeroed) through a
    /// host-visible staging buffer of at most [`Context::staging_chunk`] bytes, one copy command
    /// and fence wait per chunk, each followed by a transfer-to-compute barrier.
    fn fill(&self, bytes: &[u8]) -> Result<()> {
        let ctx = self.ctx;
        let chunk = ctx.staging_chunk().clamp(4, self.size.max(4)) / 4 * 4;
        let mut staging = Buffer::host(ctx, chunk, vk::BufferUsageFlags::TRANSFER_SRC)?;
        let once = OneTime::new(ctx)?;
        let mut off = 0;
        while off < self.size {
            let n = chunk.min(self.size - off);
            let src = bytes.get(off..bytes.len().min(off + n)).unwrap_or(&[]);
            let dst = &mut staging.as_bytes_mut()[..n];
            dst[..src.len()].copy_from_slice(src);
            dst[src.len()..].fill(0);
            once.copy(&staging, self, off, n)?;
            off += n;
        }
        Ok(())
    }
}

impl Drop for LocalBuffer<'_> {
    fn drop(&mut self) {
        let d = &self.ctx.device;
        // SAFETY: both were created from this live device; every submission that used them was
        // waited for (uploads wait per chunk, steps before returning), so nothing uses them.
        unsafe {
            d.destroy_buffer(self.buffer, None);
            d.free_memory(self.memory, None);
        }
    }
}

/// A command pool, one command buffer and a fence for one-time transfers; destroyed on drop.
struct OneTime<'c> {
    ctx: &'c Context,
    pool: vk::CommandPool,
    cmd: vk::CommandBuffer,
    fence: vk::Fence,
}

impl<'c> OneTime<'c> {
    fn new(ctx: &'c Context) -> Result<OneTime<'c>> {
        let d = ctx.device();
        let ci = vk::CommandPoolCreateInfo::default().queue_family_index(ctx.queue_family()).flags(
            vk::CommandPoolCreateFlags::TRANSIENT
                | vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER,
        );
        // SAFETY: the family is the one the device's queue was created with.
        let pool = unsafe { d.create_command_pool(&ci, None) }.vk("vkCreateCommandPool")?;
        // From here `Drop` destroys what was created (null handles are ignored).
        let mut o = OneTime { ctx, pool, cmd: vk::CommandBuffer::null(), fence: vk::Fence::null() };
        let ai = vk::CommandBufferAllocateInfo::default()
            .command_pool(pool)
            .level(vk::CommandBufferLevel::PRIMARY)
            .command_buffer_count(1);
        // SAFETY: the pool is live and used only by this object.
        o.cmd = unsafe { d.allocate_command_buffers(&ai) }.vk("vkAllocateCommandBuffers")?[0];
        // SAFETY: a live device; the fence starts unsignalled.
        o.fence =
            unsafe { d.create_fence(&vk::FenceCreateInfo::default(), None) }.vk("vkCreateFence")?;
        Ok(o)
    }

    /// Copies the first `n` bytes of `src` to `dst` at `offset`, then a barrier from the
    /// transfer to every later compute shader read; submits and waits.
    fn copy(&self, src: &Buffer<'_>, dst: &LocalBuffer<'_>, offset: usize, n: usize) -> Result<()> {
        let d = self.ctx.device();
        let region = [vk::BufferCopy { src_offset: 0, dst_offset: offset as u64, size: n as u64 }];
        let barrier = [vk::BufferMemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::TRANSFER_WRITE)
            .dst_access_mask(vk::AccessFlags::SHADER_READ)
            .src_queue_family_index(vk::QUEUE_FAMILY_IGNORED)
            .dst_queue_family_index(vk::QUEUE_FAMILY_IGNORED)
            .buffer(dst.buffer)
            .offset(offset as u64)
            .size(n as u64)];
        let begin = vk::CommandBufferBeginInfo::default()
            .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
        // SAFETY: the command buffer is not pending (every submission is waited for before
        // `copy` returns) and its pool allows resetting it; `src` was created with TRANSFER_SRC
        // and holds at least `n` bytes, `dst` with TRANSFER_DST and `offset + n <= dst.size`
        // (the caller's loop); both stay alive until the wait below has returned. The barrier
        // orders the copy's writes before, and makes them visible to, compute shader reads of
        // later submissions on this queue.
        unsafe {
            d.reset_command_buffer(self.cmd, vk::CommandBufferResetFlags::empty())
                .vk("vkResetCommandBuffer")?;
            d.begin_command_buffer(self.cmd, &begin).vk("vkBeginCommandBuffer")?;
            d.cmd_copy_buffer(self.cmd, src.raw(), dst.buffer, &region);
            d.cmd_pipeline_barrier(
                self.cmd,
                vk::PipelineStageFlags::TRANSFER,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::DependencyFlags::empty(),
                &[],
                &barrier,
                &[],
            );
            d.end_command_buffer(self.cmd).vk("vkEndCommandBuffer")?;
        }
        // Host writes to the coherent staging mapping before the submit are visible to it.
        self.ctx.submit_and_wait(self.cmd, self.fence)
    }
}

impl Drop for OneTime<'_> {
    fn drop(&mut self) {
        let d = self.ctx.device();
        // SAFETY: every submission was waited for (or the wait failed, the device being lost),
        // so nothing uses these objects; null handles are ignored.
        unsafe {
            d.destroy_fence(self.fence, None);
            d.destroy_command_pool(self.pool, None);
        }
    }
}
