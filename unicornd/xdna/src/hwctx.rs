//! A driver client (device + heap), hardware contexts with their compute units, and command
//! submission with completion waits.
//!
//! Order the driver requires, and that these types enforce by construction: the heap exists
//! (and is mapped) before any hardware context; a context is configured with its CUs before
//! commands run; a context is destroyed before its CU BOs are closed; the heap outlives every
//! DEV BO (each holds an `Arc` of it).

use std::sync::Arc;
use std::time::Duration;

use crate::bo::{Bo, BoKind, SyncDir};
use crate::cmd::{self, CmdState, Packet, StartNpu};
use crate::device::Device;
use crate::error::{Result, XdnaError};
use crate::sys::{self, ConfigCuHead, ConfigHwctx, CreateHwctx, CuConfig, DestroyHwctx, ExecCmd};
use crate::xclbin::Xclbin;

/// XRT's heap size for a client.
pub const DEFAULT_HEAP_BYTES: usize = 48 << 20;
/// How long a command may run before its wait gives up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// unicornd's scheduling classes as the driver's QoS priority hint. The driver stores the hint
/// (and reports it through GET_ARRAY) but does not schedule by it; unicornd's scheduler decides
/// what is submitted when, so the hint only tells the driver and other tools what we meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosPriority {
    Realtime,
    High,
    Normal,
    Low,
}

impl QosPriority {
    /// `AMDXDNA_QOS_*_PRIORITY`.
    pub fn value(self) -> u32 {
        match self {
            QosPriority::Realtime => sys::QOS_REALTIME_PRIORITY,
            QosPriority::High => sys::QOS_HIGH_PRIORITY,
            QosPriority::Normal => sys::QOS_NORMAL_PRIORITY,
            QosPriority::Low => sys::QOS_LOW_PRIORITY,
        }
    }

    /// From unicorn's priority class index (0 realtime, 1 interactive, 2 normal, 3 background).
    pub fn from_class(class: u8) -> QosPriority {
        match class {
            0 => QosPriority::Realtime,
            1 => QosPriority::High,
            2 => QosPriority::Normal,
            _ => QosPriority::Low,
        }
    }
}

/// One connection to the driver with its device heap.
#[derive(Debug, Clone)]
pub struct Client {
    dev: Arc<dyn Device>,
    heap: Arc<Bo>,
}

impl Client {
    /// Creates and maps the heap of `heap_bytes`.
    pub fn new(dev: Arc<dyn Device>, heap_bytes: usize) -> Result<Client> {
        let heap = Arc::new(Bo::new(&dev, BoKind::DevHeap, heap_bytes)?);
        Ok(Client { dev, heap })
    }

    pub fn device(&self) -> &Arc<dyn Device> {
        &self.dev
    }

    /// A SHMEM BO (weights, activations).
    pub fn shmem(&self, size: usize) -> Result<Bo> {
        Bo::new(&self.dev, BoKind::Shmem, size)
    }

    /// A DEV BO from the heap (instruction streams, PDIs).
    pub fn dev_bo(&self, size: usize) -> Result<Bo> {
        Bo::new_dev(&self.heap, size)
    }

    /// A DEV BO holding `bytes`, synced to the device.
    pub fn dev_bo_with(&self, bytes: &[u8]) -> Result<Bo> {
        let bo = self.dev_bo(bytes.len())?;
        bo.write(0, bytes)?;
        bo.sync_all(SyncDir::ToDevice)?;
        Ok(bo)
    }

    /// A CMD BO holding one ERT_START_NPU packet.
    pub fn command(&self, run: &StartNpu) -> Result<Bo> {
        let bytes = run.encode().map_err(|e| XdnaError::Invalid(e.to_string()))?;
        self.cmd_bo(&bytes)
    }

    /// A CMD BO holding an ERT_CMD_CHAIN of `cmds` (CMD BOs, run in order).
    pub fn chain(&self, cmds: &[&Bo]) -> Result<Bo> {
        if let Some(b) = cmds.iter().find(|b| b.kind() != BoKind::Cmd) {
            return Err(XdnaError::Invalid(format!("chain member {} is not a CMD BO", b.handle())));
        }
        let handles: Vec<u32> = cmds.iter().map(|b| b.handle()).collect();
        let bytes = cmd::encode_chain(&handles).map_err(|e| XdnaError::Invalid(e.to_string()))?;
        self.cmd_bo(&bytes)
    }

    fn cmd_bo(&self, bytes: &[u8]) -> Result<Bo> {
        let bo = Bo::new(&self.dev, BoKind::Cmd, bytes.len().next_multiple_of(4096))?;
        bo.write(0, bytes)?;
        Ok(bo)
    }

    /// A hardware context running the compute units of `xclbin` on `num_tiles` tiles
    /// (columns x core rows), each CU's PDI in a DEV BO, configured with CONFIG_CU.
    pub fn load(
        &self,
        xclbin: &Xclbin,
        num_tiles: u32,
        priority: QosPriority,
    ) -> Result<HwContext> {
        let part = xclbin
            .partition
            .as_ref()
            .ok_or(crate::xclbin::XclbinError::Missing("AIE_PARTITION"))?;
        let cus = xclbin.compute_units()?;
        let max_cus = (sys::CONFIG_PAYLOAD_MAX - size_of::<ConfigCuHead>()) / size_of::<CuConfig>();
        if cus.len() > max_cus {
            return Err(XdnaError::Invalid(format!(
                "{} CUs; CONFIG_CU takes at most {max_cus}",
                cus.len()
            )));
        }
        let mut pdi_bos = Vec::with_capacity(cus.len());
        for cu in &cus {
            pdi_bos.push(self.dev_bo_with(&part.pdis[cu.pdi].image)?);
        }
        let qos = sys::QosInfo { priority: priority.value(), ..Default::default() };
        let mut a = CreateHwctx { max_opc: part.ops_per_cycle, num_tiles, ..Default::default() };
        self.dev.create_hwctx(&mut a, &qos).map_err(XdnaError::ioctl("CREATE_HWCTX"))?;
        let ctx = HwContext {
            dev: Arc::clone(&self.dev),
            handle: a.handle,
            syncobj: a.syncobj_handle,
            cu_names: cus.iter().map(|c| c.name.clone()).collect(),
            _pdis: pdi_bos,
            _heap: Arc::clone(&self.heap),
            timeout: DEFAULT_TIMEOUT,
        };
        let mut payload = Vec::with_capacity(8 + 8 * cus.len());
        payload.extend((cus.len() as u16).to_le_bytes());
        payload.extend([0u8; 6]);
        for (cu, bo) in cus.iter().zip(&ctx._pdis) {
            payload.extend(bo.handle().to_le_bytes());
            payload.push(cu.func);
            payload.extend([0u8; 3]);
        }
        let mut c = ConfigHwctx {
            handle: ctx.handle,
            param_type: sys::HWCTX_CONFIG_CU,
            ..Default::default()
        };
        self.dev.config_hwctx(&mut c, &payload).map_err(XdnaError::ioctl("CONFIG_HWCTX"))?;
        Ok(ctx)
    }
}

/// A hardware context with its configured CUs; destroyed on drop (before its CU BOs close).
#[derive(Debug)]
pub struct HwContext {
    dev: Arc<dyn Device>,
    handle: u32,
    syncobj: u32,
    cu_names: Vec<String>,
    _pdis: Vec<Bo>,
    _heap: Arc<Bo>,
    timeout: Duration,
}

impl HwContext {
    pub fn handle(&self) -> u32 {
        self.handle
    }

    /// The CU mask of the CU named `name`.
    pub fn cu_mask(&self, name: &str) -> Option<u32> {
        let i = self.cu_names.iter().position(|n| n == name)?;
        (i < 32).then(|| 1u32 << i)
    }

    pub fn cu_names(&self) -> &[String] {
        &self.cu_names
    }

    /// How long [`HwContext::run`] waits.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// EXEC_CMD of `cmd` (a CMD BO) with the BOs the command uses; returns the sequence number.
    pub fn submit(&self, cmd: &Bo, args: &[&Bo]) -> Result<u64> {
        if cmd.kind() != BoKind::Cmd {
            return Err(XdnaError::Invalid(format!("BO {} is not a CMD BO", cmd.handle())));
        }
        cmd.sync_all(SyncDir::ToDevice)?;
        let handles: Vec<u32> = args.iter().map(|b| b.handle()).collect();
        let mut a = ExecCmd {
            hwctx: self.handle,
            ty: sys::CMD_SUBMIT_EXEC_BUF,
            cmd_handles: u64::from(cmd.handle()),
            cmd_count: 1,
            arg_count: u32::try_from(handles.len())
                .map_err(|_| XdnaError::Invalid(format!("{} argument BOs", handles.len())))?,
            ..Default::default()
        };
        self.dev.exec_cmd(&mut a, &handles).map_err(XdnaError::ioctl("EXEC_CMD"))?;
        Ok(a.seq)
    }

    /// Waits for `seq` on the context's syncobj, then reads the command's final state:
    /// COMPLETED is success, anything else an error (with the chain's error index).
    pub fn wait(&self, cmd: &Bo, seq: u64, timeout: Duration) -> Result<()> {
        match self.dev.wait_syncobj(self.syncobj, seq, timeout) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                return Err(XdnaError::Timeout(timeout))
            }
            Err(e) => return Err(XdnaError::Ioctl { call: "SYNCOBJ_TIMELINE_WAIT", source: e }),
        }
        cmd.sync(SyncDir::FromDevice, 0, cmd.size())?;
        let mut head = [0u8; 4 * 4];
        cmd.read(0, &mut head)?;
        let state = cmd::state_of(&head).unwrap_or(CmdState::Invalid);
        if state == CmdState::Completed {
            return Ok(());
        }
        let mut buf = vec![0u8; cmd.size().min(4 * (1 + cmd::MAX_PAYLOAD_WORDS))];
        cmd.read(0, &mut buf)?;
        let index = match Packet::decode(&buf) {
            Ok(Packet::Chain { error_index, .. }) => Some(error_index),
            _ => None,
        };
        Err(XdnaError::Command { state, index })
    }

    /// Submits `cmd` and waits for it with the context's timeout.
    pub fn run(&self, cmd: &Bo, args: &[&Bo]) -> Result<()> {
        let seq = self.submit(cmd, args)?;
        self.wait(cmd, seq, self.timeout)
    }
}

impl Drop for HwContext {
    fn drop(&mut self) {
        if let Err(e) = self.dev.destroy_hwctx(&mut DestroyHwctx { handle: self.handle, pad: 0 }) {
            log::warn!("DESTROY_HWCTX {} failed: {e}", self.handle);
        }
    }
}
