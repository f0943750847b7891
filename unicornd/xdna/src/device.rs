//! The ioctl surface of an amdxdna device as a trait, so that the real device and the test
//! double ([`crate::fake::FakeDevice`]) sit behind one interface.
//!
//! Arguments are the uapi structs of [`crate::sys`]; pointer fields are not set by callers but
//! derived from the slices passed beside the struct (the real device points the kernel at them,
//! the test double reads them).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::sys::{
    self, AccelFd, ConfigHwctx, CreateBo, CreateHwctx, DestroyHwctx, ExecCmd, GemClose, GetBoInfo,
    Mmap, QosInfo, SyncBo,
};

/// What a driver connection can do. Every method is one ioctl (or mmap) and returns the errno
/// the driver (or the test double) gave.
pub trait Device: Send + Sync + std::fmt::Debug {
    /// The node path, or a name that says the device is a test double.
    fn name(&self) -> String;
    /// True only for [`crate::fake::FakeDevice`]: nothing it returns was computed on an NPU.
    fn is_test_double(&self) -> bool;
    fn create_hwctx(&self, arg: &mut CreateHwctx, qos: &QosInfo) -> io::Result<()>;
    fn destroy_hwctx(&self, arg: &mut DestroyHwctx) -> io::Result<()>;
    fn config_hwctx(&self, arg: &mut ConfigHwctx, payload: &[u8]) -> io::Result<()>;
    fn create_bo(&self, arg: &mut CreateBo) -> io::Result<()>;
    fn get_bo_info(&self, arg: &mut GetBoInfo) -> io::Result<()>;
    /// Maps `len` bytes of a BO at its `map_offset` (SHMEM, DEV_HEAP and CMD BOs; DEV BOs live
    /// inside the mapped heap).
    fn map_bo(&self, handle: u32, map_offset: u64, len: usize) -> io::Result<Arc<Mmap>>;
    fn sync_bo(&self, arg: &mut SyncBo) -> io::Result<()>;
    fn gem_close(&self, arg: &mut GemClose) -> io::Result<()>;
    fn exec_cmd(&self, arg: &mut ExecCmd, args: &[u32]) -> io::Result<()>;
    /// Waits until the timeline `syncobj` reaches `point`; ETIME after `timeout`.
    fn wait_syncobj(&self, syncobj: u32, point: u64, timeout: Duration) -> io::Result<()>;
    /// GET_INFO of `param` into `buf`; returns the size the driver reports.
    fn get_info(&self, param: u32, buf: &mut [u8]) -> io::Result<u32>;
    /// GET_ARRAY; returns (element size, element count).
    fn get_array(&self, param: u32, element_size: u32, buf: &mut [u8]) -> io::Result<(u32, u32)>;
}

/// `/dev/accel/accelN` opened through [`crate::sys`].
#[derive(Debug)]
pub struct AccelDevice {
    path: PathBuf,
    fd: AccelFd,
}

impl AccelDevice {
    pub fn open(path: &Path) -> io::Result<AccelDevice> {
        Ok(AccelDevice { path: path.to_owned(), fd: AccelFd::open(path)? })
    }
}

impl Device for AccelDevice {
    fn name(&self) -> String {
        self.path.display().to_string()
    }
    fn is_test_double(&self) -> bool {
        false
    }
    fn create_hwctx(&self, arg: &mut CreateHwctx, qos: &QosInfo) -> io::Result<()> {
        self.fd.create_hwctx(arg, qos)
    }
    fn destroy_hwctx(&self, arg: &mut DestroyHwctx) -> io::Result<()> {
        self.fd.destroy_hwctx(arg)
    }
    fn config_hwctx(&self, arg: &mut ConfigHwctx, payload: &[u8]) -> io::Result<()> {
        self.fd.config_hwctx(arg, payload)
    }
    fn create_bo(&self, arg: &mut CreateBo) -> io::Result<()> {
        self.fd.create_bo(arg)
    }
    fn get_bo_info(&self, arg: &mut GetBoInfo) -> io::Result<()> {
        self.fd.get_bo_info(arg)
    }
    fn map_bo(&self, _handle: u32, map_offset: u64, len: usize) -> io::Result<Arc<Mmap>> {
        self.fd.map(map_offset, len).map(Arc::new)
    }
    fn sync_bo(&self, arg: &mut SyncBo) -> io::Result<()> {
        self.fd.sync_bo(arg)
    }
    fn gem_close(&self, arg: &mut GemClose) -> io::Result<()> {
        self.fd.gem_close(arg)
    }
    fn exec_cmd(&self, arg: &mut ExecCmd, args: &[u32]) -> io::Result<()> {
        self.fd.exec_cmd(arg, args)
    }
    fn wait_syncobj(&self, syncobj: u32, point: u64, timeout: Duration) -> io::Result<()> {
        let t = i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX);
        self.fd.syncobj_timeline_wait(syncobj, point, sys::monotonic_ns().saturating_add(t))
    }
    fn get_info(&self, param: u32, buf: &mut [u8]) -> io::Result<u32> {
        self.fd.get_info(param, buf)
    }
    fn get_array(&self, param: u32, element_size: u32, buf: &mut [u8]) -> io::Result<(u32, u32)> {
        self.fd.get_array(param, element_size, buf)
    }
}

pub(crate) fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}
