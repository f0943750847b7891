//! Buffer objects: owned handles that close themselves.
//!
//! SHMEM BOs (weights, activations), the DEV_HEAP (one per client, created and mapped before any
//! hardware context), DEV BOs sub-allocated from the heap (instruction streams, PDIs) and CMD BOs
//! (exec buffers). Host access copies bytes through the mapping; `sync` flushes a range to the
//! device or invalidates it from the device.

use std::sync::Arc;

use crate::device::Device;
use crate::error::{Result, XdnaError};
use crate::sys::{self, CreateBo, GemClose, GetBoInfo, Mmap, SyncBo};

/// `enum amdxdna_bo_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoKind {
    Shmem,
    DevHeap,
    Dev,
    Cmd,
}

impl BoKind {
    pub fn bits(self) -> u32 {
        match self {
            BoKind::Shmem => sys::BO_SHMEM,
            BoKind::DevHeap => sys::BO_DEV_HEAP,
            BoKind::Dev => sys::BO_DEV,
            BoKind::Cmd => sys::BO_CMD,
        }
    }
}

/// Direction of [`Bo::sync`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncDir {
    ToDevice,
    FromDevice,
}

/// A buffer object of one client; closed (GEM_CLOSE) on drop.
#[derive(Debug)]
pub struct Bo {
    dev: Arc<dyn Device>,
    handle: u32,
    kind: BoKind,
    size: usize,
    xdna_addr: u64,
    map: Arc<Mmap>,
    /// Offset of this BO in `map` (non-zero only for DEV BOs inside the heap).
    off: usize,
    /// A DEV BO keeps its heap alive.
    _heap: Option<Arc<Bo>>,
}

fn info(dev: &dyn Device, handle: u32) -> Result<GetBoInfo> {
    let mut i = GetBoInfo { handle, ..Default::default() };
    dev.get_bo_info(&mut i).map_err(XdnaError::ioctl("GET_BO_INFO"))?;
    Ok(i)
}

/// Closes `handle` when a half-built BO is dropped on an error path.
struct HandleGuard<'a> {
    dev: &'a dyn Device,
    handle: Option<u32>,
}

impl Drop for HandleGuard<'_> {
    fn drop(&mut self) {
        if let Some(handle) = self.handle {
            let _ = self.dev.gem_close(&mut GemClose { handle, pad: 0 });
        }
    }
}

impl Bo {
    fn create_handle(dev: &dyn Device, kind: BoKind, size: usize) -> Result<u32> {
        let mut a = CreateBo { size: size as u64, ty: kind.bits(), ..Default::default() };
        dev.create_bo(&mut a).map_err(XdnaError::ioctl("CREATE_BO"))?;
        Ok(a.handle)
    }

    /// A SHMEM, DEV_HEAP or CMD BO of `size` bytes, mapped.
    pub fn new(dev: &Arc<dyn Device>, kind: BoKind, size: usize) -> Result<Bo> {
        if kind == BoKind::Dev {
            return Err(XdnaError::Invalid("DEV BOs come from a heap: use Bo::new_dev".into()));
        }
        let handle = Bo::create_handle(dev.as_ref(), kind, size)?;
        let mut guard = HandleGuard { dev: dev.as_ref(), handle: Some(handle) };
        let i = info(dev.as_ref(), handle)?;
        let map = dev.map_bo(handle, i.map_offset, size).map_err(XdnaError::ioctl("mmap"))?;
        guard.handle = None;
        Ok(Bo {
            dev: Arc::clone(dev),
            handle,
            kind,
            size,
            xdna_addr: i.xdna_addr,
            map,
            off: 0,
            _heap: None,
        })
    }

    /// A DEV BO of `size` bytes sub-allocated from `heap` (which must be mapped: it is, being
    /// a `Bo`). The driver's `vaddr` must lie inside the heap's mapping.
    pub fn new_dev(heap: &Arc<Bo>, size: usize) -> Result<Bo> {
        if heap.kind != BoKind::DevHeap {
            return Err(XdnaError::Invalid(format!("{:?} BO is not a heap", heap.kind)));
        }
        let dev = &heap.dev;
        let handle = Bo::create_handle(dev.as_ref(), BoKind::Dev, size)?;
        let mut guard = HandleGuard { dev: dev.as_ref(), handle: Some(handle) };
        let i = info(dev.as_ref(), handle)?;
        let base = heap.map.addr();
        let off = i
            .vaddr
            .checked_sub(base)
            .filter(|o| o.checked_add(size as u64).is_some_and(|e| e <= heap.size as u64))
            .ok_or_else(|| {
                XdnaError::Invalid(format!(
                    "DEV BO at {:#x}+{size} is outside the heap mapping {base:#x}+{}",
                    i.vaddr, heap.size
                ))
            })?;
        guard.handle = None;
        Ok(Bo {
            dev: Arc::clone(dev),
            handle,
            kind: BoKind::Dev,
            size,
            xdna_addr: i.xdna_addr,
            map: Arc::clone(&heap.map),
            off: off as usize,
            _heap: Some(Arc::clone(heap)),
        })
    }

    pub fn handle(&self) -> u32 {
        self.handle
    }
    pub fn kind(&self) -> BoKind {
        self.kind
    }
    pub fn size(&self) -> usize {
        self.size
    }
    /// The device address (for instruction buffers and kernel arguments).
    pub fn xdna_addr(&self) -> u64 {
        self.xdna_addr
    }

    fn range(&self, off: usize, len: usize) -> Result<usize> {
        match off.checked_add(len) {
            Some(end) if end <= self.size => Ok(self.off + off),
            _ => Err(XdnaError::Invalid(format!(
                "{len} bytes at {off} outside a BO of {} bytes",
                self.size
            ))),
        }
    }

    /// Copies `data` into the BO at `off` (host side; [`Bo::sync`] it to the device).
    pub fn write(&self, off: usize, data: &[u8]) -> Result<()> {
        let at = self.range(off, data.len())?;
        self.map.write(at, data).map_err(XdnaError::ioctl("BO write"))
    }

    /// Copies bytes at `off` out of the BO.
    pub fn read(&self, off: usize, out: &mut [u8]) -> Result<()> {
        let at = self.range(off, out.len())?;
        self.map.read(at, out).map_err(XdnaError::ioctl("BO read"))
    }

    /// SYNC_BO of `len` bytes at `off`.
    pub fn sync(&self, dir: SyncDir, off: usize, len: usize) -> Result<()> {
        self.range(off, len)?;
        let direction = match dir {
            SyncDir::ToDevice => sys::SYNC_TO_DEVICE,
            SyncDir::FromDevice => sys::SYNC_FROM_DEVICE,
        };
        let mut a = SyncBo { handle: self.handle, direction, offset: off as u64, size: len as u64 };
        self.dev.sync_bo(&mut a).map_err(XdnaError::ioctl("SYNC_BO"))
    }

    /// The whole BO synced in `dir`.
    pub fn sync_all(&self, dir: SyncDir) -> Result<()> {
        self.sync(dir, 0, self.size)
    }
}

impl Drop for Bo {
    fn drop(&mut self) {
        if let Err(e) = self.dev.gem_close(&mut GemClose { handle: self.handle, pad: 0 }) {
            log::warn!("GEM_CLOSE of BO {} ({:?}) failed: {e}", self.handle, self.kind);
        }
    }
}
