//! Storage buffers in host-visible, host-coherent memory, one allocation each.
//!
//! Device-local memory with a staging upload is a later step; on integrated GPUs and lavapipe
//! host-visible memory is device memory anyway.

use std::fmt;

use ash::vk;

use crate::error::{Result, VkContext, VulkanError};
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
// create themselves, so shared references on several threads never see a concurrent write.
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
        // Shaders read whole words: pad to a multiple of 4, and never create an empty buffer.
        let size = len.max(1).div_ceil(4) * 4;
        let limit = ctx.info().max_storage_buffer_range;
        if size as u64 > limit {
            return Err(VulkanError::Limit {
                what: "storage buffer size",
                value: size as u64,
                limit,
            });
        }
        let d = &ctx.device;
        let ci = vk::BufferCreateInfo::default()
            .size(size as u64)
            .usage(vk::BufferUsageFlags::STORAGE_BUFFER)
            .sharing_mode(vk::SharingMode::EXCLUSIVE);
        // SAFETY: the device is live (`ctx` outlives the buffer); `ci` is valid, size > 0.
        let buffer = unsafe { d.create_buffer(&ci, None) }.vk("vkCreateBuffer")?;
        let mut b = Buffer {
            ctx,
            buffer,
            memory: vk::DeviceMemory::null(),
            len,
            ptr: std::ptr::null_mut(),
            size,
        };
        // SAFETY: `buffer` was just created from this device.
        let req = unsafe { d.get_buffer_memory_requirements(buffer) };
        let wanted = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
        let mem = &ctx.memory;
        let type_index = (0..mem.memory_type_count)
            .find(|&i| {
                req.memory_type_bits & (1 << i) != 0
                    && mem.memory_types[i as usize].property_flags.contains(wanted)
            })
            .ok_or(VulkanError::NoMemoryType)?;
        let ai = vk::MemoryAllocateInfo::default()
            .allocation_size(req.size)
            .memory_type_index(type_index);
        // SAFETY: `ai` names a memory type of this device that the buffer accepts.
        b.memory = unsafe { d.allocate_memory(&ai, None) }.vk("vkAllocateMemory")?;
        // SAFETY: the memory is fresh, large enough (`req.size`), of a type the buffer accepts,
        // and offset 0 satisfies any alignment.
        unsafe { d.bind_buffer_memory(buffer, b.memory, 0) }.vk("vkBindBufferMemory")?;
        // SAFETY: the memory is host-visible and not mapped yet; it stays mapped until drop.
        let ptr = unsafe { d.map_memory(b.memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()) }
            .vk("vkMapMemory")?;
        b.ptr = ptr.cast();
        // SAFETY: the mapping covers `req.size >= size` bytes, which nothing else accesses yet.
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
