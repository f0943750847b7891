//! A `MAP_SHARED` mapping of a memfd that another process maps too.
//!
//! The other process is not trusted and may write any byte at any time, so this memory is only
//! ever touched through atomic loads and stores: a concurrent foreign write can give a surprising
//! value, which the callers validate, but never undefined behaviour in this process.

use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::Error;

/// A shared read-write mapping of `len` bytes.
#[derive(Debug)]
pub struct SharedMemory {
    map: MmapRaw,
}

impl SharedMemory {
    /// Maps the first `len` bytes of `fd`, which must be at least that long: a mapping beyond the
    /// end of a file faults (SIGBUS) on access, so the size is checked here, and callers seal
    /// the memfd against shrinking (or check that it is sealed) first.
    pub fn map(fd: &impl AsFd, len: usize) -> Result<SharedMemory, Error> {
        let fd = fd.as_fd();
        let size = super::memfd::file_size(&fd)?;
        if (size as u128) < len as u128 || len == 0 {
            return Err(Error::protocol(format!("cannot map {len} bytes of a {size}-byte memfd")));
        }
        let map = MmapOptions::new()
            .len(len)
            .map_raw(fd.as_raw_fd())
            .map_err(|e| Error::os("mmap", e))?;
        Ok(SharedMemory { map })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Panics unless `[offset, offset + size)` lies inside the mapping and is `align`-aligned.
    /// Offsets come from this process's own layout computations, never from the other side,
    /// so a failure here is a bug, not bad input.
    fn check(&self, offset: usize, size: usize, align: usize) {
        let end = offset.checked_add(size).expect("offset overflow");
        assert!(end <= self.map.len(), "offset {offset}+{size} outside {} bytes", self.map.len());
        assert!(offset.is_multiple_of(align), "offset {offset} not {align}-aligned");
    }

    /// The `u32` at `offset`, as an atomic.
    pub fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        self.check(offset, 4, 4);
        // SAFETY: the range is inside the live mapping and 4-aligned (mmap returns page-aligned
        // memory). The mapping lives as long as `self`, which bounds the reference. The memory
        // is shared with another process and is only accessed through atomics here.
        unsafe { &*self.map.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        self.check(offset, 8, 8);
        // SAFETY: as in `atomic_u32`, with 8-byte alignment checked.
        unsafe { &*self.map.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    /// Reads the byte at `offset` (relaxed).
    pub fn load_u8(&self, offset: usize) -> u8 {
        self.check(offset, 1, 1);
        // SAFETY: as in `atomic_u32`; bytes need no alignment.
        let b = unsafe { &*self.map.as_ptr().add(offset).cast::<AtomicU8>() };
        b.load(Ordering::Relaxed)
    }

    /// Sets `len` bytes from `offset` to `byte` (relaxed stores). Panics when the range is
    /// outside the mapping: callers check client-supplied ranges with [`SharedMemory::range`].
    pub fn fill(&self, offset: usize, len: usize, byte: u8) {
        self.check(offset, len, 1);
        let base = self.map.as_ptr();
        for i in offset..offset + len {
            // SAFETY: `i` is inside the live mapping (checked above); bytes need no alignment.
            let b = unsafe { &*base.add(i).cast::<AtomicU8>() };
            b.store(byte, Ordering::Relaxed);
        }
    }

    /// Checks a range a client named (`offset`, `len`, both untrusted) against the mapping with
    /// overflow-safe arithmetic; returns it as `usize`s when it lies inside.
    pub fn range(&self, offset: u64, len: u64) -> Option<(usize, usize)> {
        let end = offset.checked_add(len)?;
        if end > self.map.len() as u64 {
            return None;
        }
        Some((usize::try_from(offset).ok()?, usize::try_from(len).ok()?))
    }

    /// Copies `out.len()` little-endian `u32`s starting at `offset` (4-aligned) out of the
    /// shared memory: how the daemon takes a client's token ids, once.
    pub fn load_u32s(&self, offset: usize, out: &mut [u32]) {
        for (i, w) in out.iter_mut().enumerate() {
            *w = u32::from_le(self.atomic_u32(offset + i * 4).load(Ordering::Relaxed));
        }
    }

    /// Copies `out.len()` little-endian f32s starting at `offset` (4-aligned) out of the shared
    /// memory.
    pub fn load_f32s(&self, offset: usize, out: &mut [f32]) {
        for (i, v) in out.iter_mut().enumerate() {
            *v = f32::from_bits(u32::from_le(
                self.atomic_u32(offset + i * 4).load(Ordering::Relaxed),
            ));
        }
    }

    /// Copies `values` into the shared memory at `offset` (4-aligned), as little-endian f32s.
    pub fn store_f32s(&self, offset: usize, values: &[f32]) {
        for (i, v) in values.iter().enumerate() {
            self.atomic_u32(offset + i * 4).store(v.to_bits().to_le(), Ordering::Relaxed);
        }
    }

    /// Copies `out.len()` words starting at `offset` out of the shared memory (relaxed loads;
    /// the caller orders them with an acquire load of a counter before).
    pub fn load_u64s(&self, offset: usize, out: &mut [u64]) {
        for (i, w) in out.iter_mut().enumerate() {
            *w = u64::from_le(self.atomic_u64(offset + i * 8).load(Ordering::Relaxed));
        }
    }

    /// Copies `words` into the shared memory at `offset` (relaxed stores; the caller publishes
    /// them with a release store of a counter after).
    pub fn store_u64s(&self, offset: usize, words: &[u64]) {
        for (i, w) in words.iter().enumerate() {
            self.atomic_u64(offset + i * 8).store(w.to_le(), Ordering::Relaxed);
        }
    }
}
