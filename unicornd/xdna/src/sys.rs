//! The amdxdna kernel interface: ioctl numbers, the `#[repr(C)]` argument structs, and the only
//! `unsafe` of this crate (ioctl, mmap, munmap, getrlimit).
//!
//! Every struct below is written from `include/uapi/drm/amdxdna_accel.h` (mainline Linux, plus
//! `WAIT_CMD` and `GET_ARRAY` from AMD's out-of-tree driver) and `include/uapi/drm/drm.h`
//! (`drm_gem_close`, `drm_syncobj_timeline_wait`); each has compile-time size and offset
//! assertions taken from those definitions, and the tests check the ioctl numbers against the
//! values a C compiler computes from the same definitions with `<linux/ioctl.h>`.
//!
//! The safe functions here set every pointer field themselves from Rust slices and references
//! that outlive the call, so no caller can hand the kernel a dangling pointer.

use std::ffi::CString;
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

// ---------------------------------------------------------------------------------------------
// ioctl numbers (<asm-generic/ioctl.h>: dir << 30 | size << 16 | type << 8 | nr)

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
/// `DRM_IOCTL_BASE`.
const DRM_TYPE: u32 = b'd' as u32;
/// `DRM_COMMAND_BASE`: driver ioctls start here.
pub const DRM_COMMAND_BASE: u32 = 0x40;

const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    assert!(size < (1 << 14), "ioctl argument too large for _IOC_SIZE");
    (dir << 30) | ((size as u32) << 16) | (DRM_TYPE << 8) | nr
}

/// `DRM_IOWR(nr, size)`.
pub const fn drm_iowr(nr: u32, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, size)
}

/// `DRM_IOW(nr, size)`.
pub const fn drm_iow(nr: u32, size: usize) -> u32 {
    ioc(IOC_WRITE, nr, size)
}

/// `enum amdxdna_drm_ioctl_id`.
pub mod id {
    pub const CREATE_HWCTX: u32 = 0;
    pub const DESTROY_HWCTX: u32 = 1;
    pub const CONFIG_HWCTX: u32 = 2;
    pub const CREATE_BO: u32 = 3;
    pub const GET_BO_INFO: u32 = 4;
    pub const SYNC_BO: u32 = 5;
    pub const EXEC_CMD: u32 = 6;
    pub const GET_INFO: u32 = 7;
    pub const SET_STATE: u32 = 8;
    /// Out-of-tree driver only.
    pub const WAIT_CMD: u32 = 9;
    /// Newer kernels and the out-of-tree driver only.
    pub const GET_ARRAY: u32 = 10;
}

const fn amdxdna_iowr(id: u32, size: usize) -> u32 {
    drm_iowr(DRM_COMMAND_BASE + id, size)
}

pub const IOCTL_CREATE_HWCTX: u32 = amdxdna_iowr(id::CREATE_HWCTX, size_of::<CreateHwctx>());
pub const IOCTL_DESTROY_HWCTX: u32 = amdxdna_iowr(id::DESTROY_HWCTX, size_of::<DestroyHwctx>());
pub const IOCTL_CONFIG_HWCTX: u32 = amdxdna_iowr(id::CONFIG_HWCTX, size_of::<ConfigHwctx>());
pub const IOCTL_CREATE_BO: u32 = amdxdna_iowr(id::CREATE_BO, size_of::<CreateBo>());
pub const IOCTL_GET_BO_INFO: u32 = amdxdna_iowr(id::GET_BO_INFO, size_of::<GetBoInfo>());
pub const IOCTL_SYNC_BO: u32 = amdxdna_iowr(id::SYNC_BO, size_of::<SyncBo>());
pub const IOCTL_EXEC_CMD: u32 = amdxdna_iowr(id::EXEC_CMD, size_of::<ExecCmd>());
pub const IOCTL_GET_INFO: u32 = amdxdna_iowr(id::GET_INFO, size_of::<GetInfo>());
pub const IOCTL_SET_STATE: u32 = amdxdna_iowr(id::SET_STATE, size_of::<SetState>());
/// `DRM_IOW`, unlike the others.
pub const IOCTL_WAIT_CMD: u32 = drm_iow(DRM_COMMAND_BASE + id::WAIT_CMD, size_of::<WaitCmd>());
pub const IOCTL_GET_ARRAY: u32 = amdxdna_iowr(id::GET_ARRAY, size_of::<GetArray>());
/// `DRM_IOCTL_GEM_CLOSE`: frees a buffer object handle.
pub const IOCTL_GEM_CLOSE: u32 = drm_iow(0x09, size_of::<GemClose>());
/// `DRM_IOCTL_SYNCOBJ_TIMELINE_WAIT`.
pub const IOCTL_SYNCOBJ_TIMELINE_WAIT: u32 = drm_iowr(0xCA, size_of::<SyncobjTimelineWait>());

// ---------------------------------------------------------------------------------------------
// Constants of the uapi

/// `enum amdxdna_bo_type`.
pub const BO_SHMEM: u32 = 1;
pub const BO_DEV_HEAP: u32 = 2;
pub const BO_DEV: u32 = 3;
pub const BO_CMD: u32 = 4;

/// `SYNC_DIRECT_TO_DEVICE`, `SYNC_DIRECT_FROM_DEVICE`.
pub const SYNC_TO_DEVICE: u32 = 0;
pub const SYNC_FROM_DEVICE: u32 = 1;

/// `enum amdxdna_drm_config_hwctx_param`.
pub const HWCTX_CONFIG_CU: u32 = 0;
pub const HWCTX_ASSIGN_DBG_BUF: u32 = 1;
pub const HWCTX_REMOVE_DBG_BUF: u32 = 2;
/// The driver copies at most a page of CONFIG_HWCTX payload.
pub const CONFIG_PAYLOAD_MAX: usize = 4096;

/// `enum amdxdna_cmd_type`.
pub const CMD_SUBMIT_EXEC_BUF: u32 = 0;
pub const CMD_SUBMIT_DEPENDENCY: u32 = 1;
pub const CMD_SUBMIT_SIGNAL: u32 = 2;

/// `enum amdxdna_drm_get_param`.
pub mod query {
    pub const AIE_STATUS: u32 = 0;
    pub const AIE_METADATA: u32 = 1;
    pub const AIE_VERSION: u32 = 2;
    pub const CLOCK_METADATA: u32 = 3;
    pub const SENSORS: u32 = 4;
    pub const HW_CONTEXTS: u32 = 5;
    pub const FIRMWARE_VERSION: u32 = 8;
    pub const GET_POWER_MODE: u32 = 9;
}

/// `DRM_AMDXDNA_HW_CONTEXT_ALL` (a GET_ARRAY param).
pub const ARRAY_HW_CONTEXT_ALL: u32 = 0;

/// The out-of-tree driver's `AMDXDNA_QOS_*_PRIORITY` values for `amdxdna_qos_info::priority`.
pub const QOS_REALTIME_PRIORITY: u32 = 0x100;
pub const QOS_HIGH_PRIORITY: u32 = 0x180;
pub const QOS_NORMAL_PRIORITY: u32 = 0x200;
pub const QOS_LOW_PRIORITY: u32 = 0x280;

/// `DRM_SYNCOBJ_WAIT_FLAGS_*`.
pub const SYNCOBJ_WAIT_ALL: u32 = 1 << 0;
pub const SYNCOBJ_WAIT_FOR_SUBMIT: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Argument structs

/// Compile-time layout checks: total size and each named field's offset.
macro_rules! layout {
    ($t:ty, $size:expr, { $($field:ident: $off:expr),* $(,)? }) => {
        const _: () = assert!(size_of::<$t>() == $size);
        $(const _: () = assert!(offset_of!($t, $field) == $off);)*
    };
}

/// `struct amdxdna_qos_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QosInfo {
    pub gops: u32,
    pub fps: u32,
    pub dma_bandwidth: u32,
    pub latency: u32,
    pub frame_exec_time: u32,
    pub priority: u32,
}
layout!(QosInfo, 24, { gops: 0, frame_exec_time: 16, priority: 20 });

/// `struct amdxdna_drm_create_hwctx`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CreateHwctx {
    pub ext: u64,
    pub ext_flags: u64,
    pub qos_p: u64,
    pub umq_bo: u32,
    pub log_buf_bo: u32,
    pub max_opc: u32,
    pub num_tiles: u32,
    pub mem_size: u32,
    pub umq_doorbell: u32,
    pub handle: u32,
    pub syncobj_handle: u32,
}
layout!(CreateHwctx, 56, {
    ext: 0, ext_flags: 8, qos_p: 16, umq_bo: 24, log_buf_bo: 28, max_opc: 32, num_tiles: 36,
    mem_size: 40, umq_doorbell: 44, handle: 48, syncobj_handle: 52,
});

/// `struct amdxdna_drm_destroy_hwctx`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DestroyHwctx {
    pub handle: u32,
    pub pad: u32,
}
layout!(DestroyHwctx, 8, { handle: 0, pad: 4 });

/// `struct amdxdna_cu_config`: one entry of the CONFIG_CU payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CuConfig {
    pub cu_bo: u32,
    pub cu_func: u8,
    pub pad: [u8; 3],
}
layout!(CuConfig, 8, { cu_bo: 0, cu_func: 4, pad: 5 });

/// The fixed head of `struct amdxdna_hwctx_param_config_cu`; `num_cus` [`CuConfig`]s follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConfigCuHead {
    pub num_cus: u16,
    pub pad: [u16; 3],
}
layout!(ConfigCuHead, 8, { num_cus: 0, pad: 2 });

/// `struct amdxdna_drm_config_hwctx`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConfigHwctx {
    pub handle: u32,
    pub param_type: u32,
    pub param_val: u64,
    pub param_val_size: u32,
    pub pad: u32,
}
layout!(ConfigHwctx, 24, { handle: 0, param_type: 4, param_val: 8, param_val_size: 16, pad: 20 });

/// `struct amdxdna_drm_create_bo`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CreateBo {
    pub flags: u64,
    pub vaddr: u64,
    pub size: u64,
    pub ty: u32,
    pub handle: u32,
}
layout!(CreateBo, 32, { flags: 0, vaddr: 8, size: 16, ty: 24, handle: 28 });

/// `struct amdxdna_drm_get_bo_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GetBoInfo {
    pub ext: u64,
    pub ext_flags: u64,
    pub handle: u32,
    pub pad: u32,
    pub map_offset: u64,
    pub vaddr: u64,
    pub xdna_addr: u64,
}
layout!(GetBoInfo, 48, { handle: 16, map_offset: 24, vaddr: 32, xdna_addr: 40 });

/// `struct amdxdna_drm_sync_bo`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncBo {
    pub handle: u32,
    pub direction: u32,
    pub offset: u64,
    pub size: u64,
}
layout!(SyncBo, 24, { handle: 0, direction: 4, offset: 8, size: 16 });

/// `struct amdxdna_drm_exec_cmd`. With one command, `cmd_handles` holds the handle itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExecCmd {
    pub ext: u64,
    pub ext_flags: u64,
    pub hwctx: u32,
    pub ty: u32,
    pub cmd_handles: u64,
    pub args: u64,
    pub cmd_count: u32,
    pub arg_count: u32,
    pub seq: u64,
}
layout!(ExecCmd, 56, {
    hwctx: 16, ty: 20, cmd_handles: 24, args: 32, cmd_count: 40, arg_count: 44, seq: 48,
});

/// `struct amdxdna_drm_get_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GetInfo {
    pub param: u32,
    pub buffer_size: u32,
    pub buffer: u64,
}
layout!(GetInfo, 16, { param: 0, buffer_size: 4, buffer: 8 });

/// `struct amdxdna_drm_set_state`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SetState {
    pub param: u32,
    pub buffer_size: u32,
    pub buffer: u64,
}
layout!(SetState, 16, { param: 0, buffer_size: 4, buffer: 8 });

/// `struct amdxdna_drm_wait_cmd` (out-of-tree driver).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WaitCmd {
    pub hwctx: u32,
    pub timeout: u32,
    pub seq: u64,
}
layout!(WaitCmd, 16, { hwctx: 0, timeout: 4, seq: 8 });

/// `struct amdxdna_drm_get_array`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GetArray {
    pub param: u32,
    pub element_size: u32,
    pub num_element: u32,
    pub pad: u32,
    pub buffer: u64,
}
layout!(GetArray, 24, { param: 0, element_size: 4, num_element: 8, pad: 12, buffer: 16 });

/// `struct amdxdna_drm_query_aie_version`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AieVersion {
    pub major: u32,
    pub minor: u32,
}
layout!(AieVersion, 8, { major: 0, minor: 4 });

/// `struct amdxdna_drm_query_aie_tile_metadata`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AieTileMetadata {
    pub row_count: u16,
    pub row_start: u16,
    pub dma_channel_count: u16,
    pub lock_count: u16,
    pub event_reg_count: u16,
    pub pad: [u16; 3],
}
layout!(AieTileMetadata, 16, { row_count: 0, row_start: 2, event_reg_count: 8 });

/// `struct amdxdna_drm_query_aie_metadata`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AieMetadata {
    pub col_size: u32,
    pub cols: u16,
    pub rows: u16,
    pub version: AieVersion,
    pub core: AieTileMetadata,
    pub mem: AieTileMetadata,
    pub shim: AieTileMetadata,
}
layout!(AieMetadata, 64, { col_size: 0, cols: 4, rows: 6, version: 8, core: 16, mem: 32, shim: 48 });

/// `struct amdxdna_drm_query_clock`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    pub name: [u8; 16],
    pub freq_mhz: u32,
    pub pad: u32,
}
layout!(Clock, 24, { name: 0, freq_mhz: 16 });

/// `struct amdxdna_drm_query_clock_metadata`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockMetadata {
    pub mp_npu_clock: Clock,
    pub h_clock: Clock,
}
layout!(ClockMetadata, 48, { mp_npu_clock: 0, h_clock: 24 });

/// `struct amdxdna_drm_query_firmware_version`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FirmwareVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    pub build: u32,
}
layout!(FirmwareVersion, 16, { major: 0, build: 12 });

/// `struct drm_gem_close`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GemClose {
    pub handle: u32,
    pub pad: u32,
}
layout!(GemClose, 8, { handle: 0 });

/// `struct drm_syncobj_timeline_wait` with `deadline_nsec` (Linux 6.4+). The DRM core copies
/// `min(user size, kernel size)` and zero-fills, so older kernels accept it; `deadline_nsec` is
/// only read with `DRM_SYNCOBJ_WAIT_FLAGS_WAIT_DEADLINE`, which this crate never sets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncobjTimelineWait {
    pub handles: u64,
    pub points: u64,
    /// Absolute CLOCK_MONOTONIC time.
    pub timeout_nsec: i64,
    pub count_handles: u32,
    pub flags: u32,
    pub first_signaled: u32,
    pub pad: u32,
    pub deadline_nsec: u64,
}
layout!(SyncobjTimelineWait, 48, {
    handles: 0, points: 8, timeout_nsec: 16, count_handles: 24, flags: 28, first_signaled: 32,
    deadline_nsec: 40,
});

/// Plain-old-data structs the kernel fills: any bit pattern is a valid value.
///
/// # Safety
/// Implement only for `#[repr(C)]` structs of integers and arrays of integers (no padding the
/// kernel could leave uninitialised that Rust would read as something other than bytes, no
/// references, no enums).
pub unsafe trait Pod: Copy + Default {}
// SAFETY: each is #[repr(C)] of u8/u16/u32 fields and arrays of them, with explicit pads.
unsafe impl Pod for AieVersion {}
// SAFETY: as above.
unsafe impl Pod for AieMetadata {}
// SAFETY: as above.
unsafe impl Pod for ClockMetadata {}
// SAFETY: as above.
unsafe impl Pod for FirmwareVersion {}
// SAFETY: as above.
unsafe impl Pod for AieTileMetadata {}

/// The bytes of a [`Pod`] value.
pub fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: T is Pod (repr(C) integers with explicit padding fields), so all size_of::<T>()
    // bytes are initialised; the slice borrows `v`.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

/// A [`Pod`] value from the first `size_of::<T>()` bytes of `bytes` (missing bytes are zero).
pub fn pod_from_bytes<T: Pod>(bytes: &[u8]) -> T {
    let mut v = T::default();
    let n = bytes.len().min(size_of::<T>());
    // SAFETY: T is Pod, so any bytes make a valid T; we write n <= size_of::<T>() bytes into
    // `v`, which we own, from `bytes`, which holds at least n bytes; they do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut v as *mut T).cast::<u8>(), n);
    }
    v
}

// ---------------------------------------------------------------------------------------------
// The device file

/// An open accel node. Every ioctl of the crate goes through its methods.
#[derive(Debug)]
pub struct AccelFd {
    fd: OwnedFd,
}

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl AccelFd {
    /// Opens `path` read-write, close-on-exec.
    pub fn open(path: &Path) -> io::Result<AccelFd> {
        use std::os::unix::ffi::OsStrExt;
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        // SAFETY: `c` is a valid NUL-terminated string that lives across the call.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: open returned a new descriptor that nothing else owns.
        Ok(AccelFd { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// One ioctl on an argument struct without pointers, retried on EINTR/EAGAIN.
    fn raw<T>(&self, request: u32, arg: &mut T) -> io::Result<()> {
        loop {
            // SAFETY: `arg` is a live, exclusive reference to a #[repr(C)] struct whose size is
            // the one encoded in `request` (every request constant is built from size_of of its
            // struct); every pointer field in it was set by the caller in this module to memory
            // that outlives this call.
            let r = unsafe {
                libc::ioctl(self.fd.as_raw_fd(), request as libc::c_ulong, arg as *mut T)
            };
            match cvt(r) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
                other => return other,
            }
        }
    }

    /// CREATE_HWCTX; `arg.qos_p` is set here to point at `qos`. Fills `handle` and
    /// `syncobj_handle`.
    pub fn create_hwctx(&self, arg: &mut CreateHwctx, qos: &QosInfo) -> io::Result<()> {
        arg.qos_p = qos as *const QosInfo as u64;
        self.raw(IOCTL_CREATE_HWCTX, arg)
    }

    pub fn destroy_hwctx(&self, arg: &mut DestroyHwctx) -> io::Result<()> {
        self.raw(IOCTL_DESTROY_HWCTX, arg)
    }

    /// CONFIG_HWCTX; `param_val` and `param_val_size` are set here from `payload`.
    pub fn config_hwctx(&self, arg: &mut ConfigHwctx, payload: &[u8]) -> io::Result<()> {
        arg.param_val = payload.as_ptr() as u64;
        arg.param_val_size =
            u32::try_from(payload.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        self.raw(IOCTL_CONFIG_HWCTX, arg)
    }

    pub fn create_bo(&self, arg: &mut CreateBo) -> io::Result<()> {
        self.raw(IOCTL_CREATE_BO, arg)
    }

    pub fn get_bo_info(&self, arg: &mut GetBoInfo) -> io::Result<()> {
        self.raw(IOCTL_GET_BO_INFO, arg)
    }

    pub fn sync_bo(&self, arg: &mut SyncBo) -> io::Result<()> {
        self.raw(IOCTL_SYNC_BO, arg)
    }

    pub fn gem_close(&self, arg: &mut GemClose) -> io::Result<()> {
        self.raw(IOCTL_GEM_CLOSE, arg)
    }

    /// EXEC_CMD; `args` and `arg_count` are set here from `args` (`cmd_handles` holds the one
    /// command handle itself, `cmd_count` is 1). Fills `seq`.
    pub fn exec_cmd(&self, arg: &mut ExecCmd, args: &[u32]) -> io::Result<()> {
        arg.args = if args.is_empty() { 0 } else { args.as_ptr() as u64 };
        arg.arg_count =
            u32::try_from(args.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        self.raw(IOCTL_EXEC_CMD, arg)
    }

    /// GET_INFO of `param` into `buf`; returns the size the kernel reports.
    pub fn get_info(&self, param: u32, buf: &mut [u8]) -> io::Result<u32> {
        let mut a = GetInfo {
            param,
            buffer_size: u32::try_from(buf.len())
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
            buffer: buf.as_mut_ptr() as u64,
        };
        self.raw(IOCTL_GET_INFO, &mut a)?;
        Ok(a.buffer_size)
    }

    /// GET_ARRAY of `param` into `buf` with elements of `element_size` bytes; returns the
    /// (element size, element count) the kernel reports.
    pub fn get_array(
        &self,
        param: u32,
        element_size: u32,
        buf: &mut [u8],
    ) -> io::Result<(u32, u32)> {
        let num = buf.len().checked_div(element_size as usize).unwrap_or(0);
        let mut a = GetArray {
            param,
            element_size,
            num_element: u32::try_from(num).unwrap_or(u32::MAX),
            pad: 0,
            buffer: buf.as_mut_ptr() as u64,
        };
        self.raw(IOCTL_GET_ARRAY, &mut a)?;
        Ok((a.element_size, a.num_element))
    }

    /// WAIT_CMD (out-of-tree driver only); `timeout_ms` 0 waits forever.
    pub fn wait_cmd(&self, hwctx: u32, seq: u64, timeout_ms: u32) -> io::Result<()> {
        self.raw(IOCTL_WAIT_CMD, &mut WaitCmd { hwctx, timeout: timeout_ms, seq })
    }

    /// Waits until `syncobj` reaches `point`, or until the absolute CLOCK_MONOTONIC time
    /// `deadline_ns` (then ETIME).
    pub fn syncobj_timeline_wait(
        &self,
        syncobj: u32,
        point: u64,
        deadline_ns: i64,
    ) -> io::Result<()> {
        let handles = [syncobj];
        let points = [point];
        let mut a = SyncobjTimelineWait {
            handles: handles.as_ptr() as u64,
            points: points.as_ptr() as u64,
            timeout_nsec: deadline_ns,
            count_handles: 1,
            flags: SYNCOBJ_WAIT_ALL | SYNCOBJ_WAIT_FOR_SUBMIT,
            ..Default::default()
        };
        self.raw(IOCTL_SYNCOBJ_TIMELINE_WAIT, &mut a)
    }

    /// Maps `len` bytes of the BO at the fake offset `map_offset`, shared, read-write.
    pub fn map(&self, map_offset: u64, len: usize) -> io::Result<Mmap> {
        let off = libc::off_t::try_from(map_offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        Mmap::new(len, Some((self.fd.as_raw_fd(), off)))
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec the call writes.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // 64-bit Linux: time_t and c_long are i64.
    ts.tv_sec.saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec)
}

/// The soft and hard RLIMIT_MEMLOCK of this process (`None`: unlimited).
pub fn memlock_limit() -> io::Result<(Option<u64>, Option<u64>)> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `r` is a valid rlimit the call writes.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) })?;
    // 64-bit Linux: rlim_t is u64.
    let f = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v);
    Ok((f(r.rlim_cur), f(r.rlim_max)))
}

// ---------------------------------------------------------------------------------------------
// Memory mappings

/// A shared, read-write mapping: a BO of the device, or anonymous memory (the test double's
/// BOs). The device (or the test double) may read and write it at any time, so it is only ever
/// accessed by copying bytes in and out, never through Rust references.
#[derive(Debug)]
pub struct Mmap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; all access copies bytes with
// bounds checks, and concurrent access is the device-sharing contract of the BO (a race gives
// stale bytes, never undefined behaviour in Rust's sense because no reference into it exists).
unsafe impl Send for Mmap {}
// SAFETY: as above.
unsafe impl Sync for Mmap {}

impl Mmap {
    /// Anonymous zeroed memory of `len` bytes (page aligned).
    pub fn anonymous(len: usize) -> io::Result<Mmap> {
        Mmap::new(len, None)
    }

    fn new(len: usize, file: Option<(libc::c_int, libc::off_t)>) -> io::Result<Mmap> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let (flags, fd, off) = match file {
            Some((fd, off)) => (libc::MAP_SHARED, fd, off),
            None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0),
        };
        // SAFETY: a fresh mapping at an address the kernel chooses; no existing memory is
        // affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap { ptr: p.cast(), len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapping's address (what the driver reports as a BO's user `vaddr`).
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    fn check(&self, off: usize, n: usize) -> io::Result<()> {
        match off.checked_add(n) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EFAULT)),
        }
    }

    /// Copies `data` to byte `off`.
    pub fn write(&self, off: usize, data: &[u8]) -> io::Result<()> {
        self.check(off, data.len())?;
        // SAFETY: off + len is within the mapping (checked), which lives as long as self;
        // `data` is a separate Rust slice, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
        Ok(())
    }

    /// Copies bytes from `off` into `out`.
    pub fn read(&self, off: usize, out: &mut [u8]) -> io::Result<()> {
        self.check(off, out.len())?;
        // SAFETY: as in `write`, in the other direction.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), out.as_mut_ptr(), out.len()) };
        Ok(())
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, and no reference into the mapping
        // exists (all access copies).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers a C compiler computes with `<linux/ioctl.h>`'s `_IOWR`/`_IOW` on structs
    /// written from the uapi headers (x86-64 and aarch64 share the generic encoding).
    #[test]
    fn ioctl_numbers_match_the_uapi() {
        assert_eq!(IOCTL_CREATE_HWCTX, 0xc038_6440);
        assert_eq!(IOCTL_DESTROY_HWCTX, 0xc008_6441);
        assert_eq!(IOCTL_CONFIG_HWCTX, 0xc018_6442);
        assert_eq!(IOCTL_CREATE_BO, 0xc020_6443);
        assert_eq!(IOCTL_GET_BO_INFO, 0xc030_6444);
        assert_eq!(IOCTL_SYNC_BO, 0xc018_6445);
        assert_eq!(IOCTL_EXEC_CMD, 0xc038_6446);
        assert_eq!(IOCTL_GET_INFO, 0xc010_6447);
        assert_eq!(IOCTL_SET_STATE, 0xc010_6448);
        assert_eq!(IOCTL_WAIT_CMD, 0x4010_6449);
        assert_eq!(IOCTL_GET_ARRAY, 0xc018_644a);
        assert_eq!(IOCTL_SYNCOBJ_TIMELINE_WAIT, 0xc030_64ca);
        assert_eq!(IOCTL_GEM_CLOSE, 0x4008_6409);
    }

    #[test]
    fn pod_round_trips_through_bytes() {
        let v = FirmwareVersion { major: 1, minor: 5, patch: 2, build: 380 };
        let b = pod_bytes(&v).to_vec();
        assert_eq!(&b[..4], &1u32.to_ne_bytes());
        assert_eq!(pod_from_bytes::<FirmwareVersion>(&b), v);
        // Short input: the rest is zero.
        assert_eq!(pod_from_bytes::<FirmwareVersion>(&b[..8]).patch, 0);
    }

    #[test]
    fn mappings_are_bounds_checked() {
        let m = Mmap::anonymous(4096).unwrap();
        m.write(4090, &[1, 2, 3, 4, 5, 6]).unwrap();
        let mut out = [0u8; 6];
        m.read(4090, &mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 4, 5, 6]);
        assert!(m.write(4091, &[0; 6]).is_err());
        assert!(m.read(usize::MAX, &mut out).is_err());
        assert!(Mmap::anonymous(0).is_err());
    }

    #[test]
    fn opening_a_missing_node_is_an_error() {
        let e = AccelFd::open(Path::new("/nonexistent/accel0")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
}
