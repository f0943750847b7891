//! `FakeDevice`: a TEST DOUBLE of an amdxdna device, in the spirit of Mesa's drm-shim.
//!
//! It sits behind the same [`Device`] trait as the real `/dev/accel/accelN` and checks every
//! call the way the driver does (the rules and their errnos are listed on each method below),
//! keeps handle ownership (BOs, contexts, syncobjs), sub-allocates DEV BOs from the heap, decodes
//! command packets, and then completes commands WITHOUT COMPUTING ANYTHING: an ERT_START_NPU
//! command's output buffers are left as they were. Its GET_INFO answers are made-up values
//! (see [`FakeDevice::METADATA`]), its name says "test double", and [`Device::is_test_double`]
//! is true, so nothing can report its results as NPU results.
//!
//! Failure injection: [`FakeDevice::refuse_contexts`] makes CREATE_HWCTX fail with an errno;
//! [`FakeDevice::push_outcome`] decides how the next commands end (COMPLETED, another final
//! state such as ERROR or TIMEOUT, or never signalled so that the wait times out), and
//! [`FakeDevice::set_default_outcome`] how all later ones do.
//!
//! Inspection for tests: [`FakeDevice::submissions`] (each accepted packet with its argument
//! BOs), [`FakeDevice::bo_at`] and [`FakeDevice::bo_bytes`] (what a BO holds), [`FakeDevice::live`]
//! (leaked handles), [`FakeDevice::context_priorities`] (the QoS of each context).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::cmd::{self, CmdState, Packet};
use crate::device::{err, Device};
use crate::sys::{
    self, AieMetadata, AieTileMetadata, AieVersion, Clock, ClockMetadata, ConfigHwctx, CreateBo,
    CreateHwctx, DestroyHwctx, ExecCmd, FirmwareVersion, GemClose, GetBoInfo, Mmap, QosInfo,
    SyncBo,
};

const PAGE: u64 = 4096;
/// Device address of the heap's first byte (where the driver puts it on NPU1).
pub const HEAP_XDNA_BASE: u64 = 0x400_0000;
/// The driver's limit on the heap (`dev_mem_size` of NPU1).
pub const HEAP_MAX: u64 = 64 << 20;
/// The driver's limit on argument BOs per command.
pub const MAX_ARGS: u32 = 4095;

/// How a submitted command ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// COMPLETED (nothing is computed).
    Complete,
    /// This final state in the header (ERROR, ABORT, TIMEOUT, NORESPONSE); a chain reports
    /// `chain_index` as its `error_index`.
    Fail { state: CmdState, chain_index: u32 },
    /// Never signalled: the wait runs out (ETIME).
    Hang,
}

#[derive(Debug)]
struct FakeBo {
    kind: u32,
    size: u64,
    /// Memory of HEAP, SHMEM and CMD BOs.
    mem: Option<Arc<Mmap>>,
    /// Offset in the heap of a DEV BO.
    heap_off: u64,
    xdna_addr: u64,
}

#[derive(Debug)]
struct FakeCtx {
    syncobj: u32,
    cus: Vec<sys::CuConfig>,
    priority: u32,
    last_seq: u64,
    signaled: BTreeSet<u64>,
}

#[derive(Debug, Default)]
struct State {
    bos: HashMap<u32, FakeBo>,
    next_handle: u32,
    heap: Option<u32>,
    heap_map: Option<Arc<Mmap>>,
    /// (offset, size, handle) of DEV BOs in the heap.
    heap_used: Vec<(u64, u64, u32)>,
    ctxs: HashMap<u32, FakeCtx>,
    next_ctx: u32,
    refuse: Option<i32>,
    outcomes: VecDeque<Outcome>,
    /// How commands end when `outcomes` is empty (`None`: COMPLETED).
    default_outcome: Option<Outcome>,
    calls: Vec<String>,
    submitted: Vec<Submission>,
}

/// A command the fake accepted (EXEC_CMD passed its checks), for tests to inspect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submission {
    pub hwctx: u32,
    /// The packet as submitted (state NEW).
    pub packet: Packet,
    /// The argument BO handles of the EXEC_CMD.
    pub args: Vec<u32>,
}

/// The test double. See the module documentation.
#[derive(Debug)]
pub struct FakeDevice {
    state: Mutex<State>,
    max_contexts: usize,
    get_array: bool,
}

impl Default for FakeDevice {
    fn default() -> FakeDevice {
        FakeDevice::new()
    }
}

fn einval<T>() -> io::Result<T> {
    Err(err(libc::EINVAL))
}

impl FakeDevice {
    /// Made-up NPU1-shaped metadata: 5 columns, 6 rows (1 shim, 1 memory, 4 core rows).
    pub const METADATA: AieMetadata = AieMetadata {
        col_size: 0x10_0000,
        cols: 5,
        rows: 6,
        version: AieVersion { major: 2, minor: 0 },
        core: AieTileMetadata {
            row_count: 4,
            row_start: 2,
            dma_channel_count: 2,
            lock_count: 16,
            event_reg_count: 128,
            pad: [0; 3],
        },
        mem: AieTileMetadata {
            row_count: 1,
            row_start: 1,
            dma_channel_count: 6,
            lock_count: 64,
            event_reg_count: 192,
            pad: [0; 3],
        },
        shim: AieTileMetadata {
            row_count: 1,
            row_start: 0,
            dma_channel_count: 2,
            lock_count: 16,
            event_reg_count: 128,
            pad: [0; 3],
        },
    };

    /// A fake NPU1: at most 6 contexts, no GET_ARRAY (like mainline before 2025).
    pub fn new() -> FakeDevice {
        FakeDevice { state: Mutex::new(State::default()), max_contexts: 6, get_array: false }
    }

    /// This fake with the GET_ARRAY ioctl (newer kernels).
    pub fn with_get_array(mut self) -> FakeDevice {
        self.get_array = true;
        self
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// CREATE_HWCTX fails with `errno` from now on (`None`: accepted again).
    pub fn refuse_contexts(&self, errno: Option<i32>) {
        self.st().refuse = errno;
    }

    /// How the next submitted command ends (queued; COMPLETED when the queue is empty).
    pub fn push_outcome(&self, o: Outcome) {
        self.st().outcomes.push_back(o);
    }

    /// How every command ends once the queue of [`FakeDevice::push_outcome`] is empty
    /// (`None`: COMPLETED, the default).
    pub fn set_default_outcome(&self, o: Option<Outcome>) {
        self.st().default_outcome = o;
    }

    /// Every call so far, e.g. `CREATE_BO(type 2)`, in order.
    pub fn calls(&self) -> Vec<String> {
        self.st().calls.clone()
    }

    /// Live BO handles and contexts: (BOs, contexts).
    pub fn live(&self) -> (usize, usize) {
        let s = self.st();
        (s.bos.len(), s.ctxs.len())
    }

    /// The QoS priority a context was created with.
    pub fn context_priority(&self, handle: u32) -> Option<u32> {
        self.st().ctxs.get(&handle).map(|c| c.priority)
    }

    /// The QoS priorities of the live contexts, by handle.
    pub fn context_priorities(&self) -> Vec<(u32, u32)> {
        let mut v: Vec<(u32, u32)> = self.st().ctxs.iter().map(|(&h, c)| (h, c.priority)).collect();
        v.sort();
        v
    }

    /// Every command accepted so far, in order.
    pub fn submissions(&self) -> Vec<Submission> {
        self.st().submitted.clone()
    }

    /// The live BO whose device address range holds `addr`: (handle, type, size). A DEV BO is
    /// preferred to the heap that holds it.
    pub fn bo_at(&self, addr: u64) -> Option<(u32, u32, u64)> {
        let s = self.st();
        let inside = |b: &FakeBo| addr >= b.xdna_addr && addr - b.xdna_addr < b.size;
        let mut hits: Vec<(u32, &FakeBo)> =
            s.bos.iter().filter(|(_, b)| inside(b)).map(|(&h, b)| (h, b)).collect();
        hits.sort_by_key(|(_, b)| b.kind != sys::BO_DEV);
        hits.first().map(|(h, b)| (*h, b.kind, b.size))
    }

    /// The host-visible contents of a live SHMEM, CMD or heap BO (what the device would read).
    pub fn bo_bytes(&self, handle: u32) -> Option<Vec<u8>> {
        let s = self.st();
        let bo = s.bos.get(&handle)?;
        let mem = bo.mem.as_ref()?;
        let mut out = vec![0u8; usize::try_from(bo.size).ok()?];
        mem.read(0, &mut out).ok()?;
        Some(out)
    }

    fn log(s: &mut State, call: String) {
        s.calls.push(call);
    }

    fn heap_alloc(s: &mut State, size: u64) -> Option<u64> {
        let heap_size = s.bos.get(&s.heap?)?.size;
        let size = size.div_ceil(PAGE) * PAGE;
        let mut used: Vec<(u64, u64)> = s.heap_used.iter().map(|&(o, n, _)| (o, n)).collect();
        used.sort();
        let mut at = 0;
        for (o, n) in used {
            if at + size <= o {
                break;
            }
            at = at.max(o + n);
        }
        (at + size <= heap_size).then_some(at)
    }

    /// The bytes of CMD BO `handle`.
    fn cmd_bytes(s: &State, handle: u32) -> io::Result<(Arc<Mmap>, Vec<u8>)> {
        let bo = s.bos.get(&handle).ok_or_else(|| err(libc::ENOENT))?;
        if bo.kind != sys::BO_CMD {
            return Err(err(libc::EINVAL));
        }
        let mem = Arc::clone(bo.mem.as_ref().ok_or_else(|| err(libc::EINVAL))?);
        let mut bytes = vec![0u8; bo.size as usize];
        mem.read(0, &mut bytes)?;
        Ok((mem, bytes))
    }

    /// Whether `addr..addr+size` lies inside one live DEV BO.
    fn in_dev_bo(s: &State, addr: u64, size: u64) -> bool {
        s.heap_used.iter().any(|&(o, n, _)| {
            let base = HEAP_XDNA_BASE + o;
            addr >= base && addr.checked_add(size).is_some_and(|e| e <= base + n)
        })
    }

    fn set_state(mem: &Mmap, state: CmdState) -> io::Result<()> {
        let mut w = [0u8; 4];
        mem.read(0, &mut w)?;
        let word = cmd::with_state(u32::from_le_bytes(w), state);
        mem.write(0, &word.to_le_bytes())
    }
}

impl Device for FakeDevice {
    fn name(&self) -> String {
        "fake amdxdna device (test double: computes nothing)".into()
    }

    fn is_test_double(&self) -> bool {
        true
    }

    /// ext/ext_flags must be zero (EINVAL); the client's heap must exist (ENOENT, "dev heap
    /// object not exist"); max_opc and num_tiles non-zero, num_tiles a multiple of the core
    /// rows and at most all core tiles (EINVAL); at most 6 contexts (EBUSY).
    fn create_hwctx(&self, arg: &mut CreateHwctx, qos: &QosInfo) -> io::Result<()> {
        let mut s = self.st();
        Self::log(&mut s, format!("CREATE_HWCTX(tiles {}, opc {})", arg.num_tiles, arg.max_opc));
        if let Some(e) = s.refuse {
            return Err(err(e));
        }
        if arg.ext != 0 || arg.ext_flags != 0 {
            return einval();
        }
        if s.heap.is_none() {
            return Err(err(libc::ENOENT));
        }
        let rows = u32::from(Self::METADATA.core.row_count);
        let all = rows * u32::from(Self::METADATA.cols);
        if arg.max_opc == 0
            || arg.num_tiles == 0
            || !arg.num_tiles.is_multiple_of(rows)
            || arg.num_tiles > all
        {
            return einval();
        }
        if s.ctxs.len() >= self.max_contexts {
            return Err(err(libc::EBUSY));
        }
        s.next_ctx += 1;
        let handle = s.next_ctx;
        let syncobj = 1000 + handle;
        s.ctxs.insert(
            handle,
            FakeCtx {
                syncobj,
                cus: Vec::new(),
                priority: qos.priority,
                last_seq: 0,
                signaled: BTreeSet::new(),
            },
        );
        arg.handle = handle;
        arg.syncobj_handle = syncobj;
        Ok(())
    }

    /// pad must be zero and the handle live (EINVAL).
    fn destroy_hwctx(&self, arg: &mut DestroyHwctx) -> io::Result<()> {
        let mut s = self.st();
        Self::log(&mut s, format!("DESTROY_HWCTX({})", arg.handle));
        if arg.pad != 0 || s.ctxs.remove(&arg.handle).is_none() {
            return einval();
        }
        Ok(())
    }

    /// Only CONFIG_CU (the debug-buffer params: EOPNOTSUPP here); the context must be live and
    /// not yet configured; payload at most a page and exactly 8 + 8 x num_cus bytes, num_cus
    /// non-zero, pads zero (EINVAL); each cu_bo a live DEV BO (ENOENT).
    fn config_hwctx(&self, arg: &mut ConfigHwctx, payload: &[u8]) -> io::Result<()> {
        let mut s = self.st();
        Self::log(&mut s, format!("CONFIG_HWCTX({}, param {})", arg.handle, arg.param_type));
        if arg.pad != 0 {
            return einval();
        }
        if arg.param_type != sys::HWCTX_CONFIG_CU {
            return Err(err(libc::EOPNOTSUPP));
        }
        if payload.len() > sys::CONFIG_PAYLOAD_MAX || payload.len() < 8 {
            return einval();
        }
        let num = u16::from_le_bytes([payload[0], payload[1]]) as usize;
        if num == 0 || payload[2..8].iter().any(|&b| b != 0) || payload.len() != 8 + 8 * num {
            return einval();
        }
        let mut cus = Vec::with_capacity(num);
        for e in payload[8..].chunks_exact(8) {
            let cu = sys::CuConfig {
                cu_bo: u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                cu_func: e[4],
                pad: [e[5], e[6], e[7]],
            };
            if cu.pad != [0; 3] {
                return einval();
            }
            match s.bos.get(&cu.cu_bo) {
                Some(b) if b.kind == sys::BO_DEV => {}
                _ => return Err(err(libc::ENOENT)),
            }
            cus.push(cu);
        }
        let ctx = s.ctxs.get_mut(&arg.handle).ok_or_else(|| err(libc::EINVAL))?;
        if !ctx.cus.is_empty() {
            return einval();
        }
        ctx.cus = cus;
        Ok(())
    }

    /// flags and vaddr must be zero, the type known, the size non-zero (EINVAL); one heap per
    /// client (EBUSY), at most [`HEAP_MAX`] (EINVAL); DEV BOs need a mapped heap (EINVAL) with
    /// room (ENOMEM), page-granular; a CMD BO holds at least its header word (EINVAL).
    fn create_bo(&self, arg: &mut CreateBo) -> io::Result<()> {
        let mut s = self.st();
        Self::log(&mut s, format!("CREATE_BO(type {}, {} bytes)", arg.ty, arg.size));
        if arg.flags != 0 || arg.vaddr != 0 || arg.size == 0 {
            return einval();
        }
        let size = arg.size;
        let (mem, heap_off, xdna_addr) = match arg.ty {
            sys::BO_DEV_HEAP => {
                if s.heap.is_some() {
                    return Err(err(libc::EBUSY));
                }
                if size > HEAP_MAX {
                    return einval();
                }
                (Some(Arc::new(Mmap::anonymous(size as usize)?)), 0, HEAP_XDNA_BASE)
            }
            sys::BO_DEV => {
                if s.heap_map.is_none() {
                    return einval();
                }
                let off = Self::heap_alloc(&mut s, size).ok_or_else(|| err(libc::ENOMEM))?;
                (None, off, HEAP_XDNA_BASE + off)
            }
            sys::BO_SHMEM | sys::BO_CMD => {
                if arg.ty == sys::BO_CMD && size < 4 {
                    return einval();
                }
                let len = usize::try_from(size).map_err(|_| err(libc::EINVAL))?;
                (Some(Arc::new(Mmap::anonymous(len)?)), 0, 0)
            }
            _ => return einval(),
        };
        s.next_handle += 1;
        let handle = s.next_handle;
        let xdna_addr =
            if xdna_addr == 0 { 0x1_0000_0000 + (u64::from(handle) << 24) } else { xdna_addr };
        if arg.ty == sys::BO_DEV_HEAP {
            s.heap = Some(handle);
        }
        if arg.ty == sys::BO_DEV {
            let n = size.div_ceil(PAGE) * PAGE;
            s.heap_used.push((heap_off, n, handle));
        }
        s.bos.insert(handle, FakeBo { kind: arg.ty, size, mem, heap_off, xdna_addr });
        arg.handle = handle;
        Ok(())
    }

    /// ext/ext_flags/pad must be zero (EINVAL), the handle live (ENOENT).
    fn get_bo_info(&self, arg: &mut GetBoInfo) -> io::Result<()> {
        let s = self.st();
        if arg.ext != 0 || arg.ext_flags != 0 || arg.pad != 0 {
            return einval();
        }
        let bo = s.bos.get(&arg.handle).ok_or_else(|| err(libc::ENOENT))?;
        arg.xdna_addr = bo.xdna_addr;
        if bo.kind == sys::BO_DEV {
            let base = s.heap_map.as_ref().map(|m| m.addr()).unwrap_or(0);
            arg.vaddr = base + bo.heap_off;
            arg.map_offset = u64::MAX;
        } else {
            arg.vaddr = 0;
            arg.map_offset = u64::from(arg.handle) << 32;
        }
        Ok(())
    }

    /// The handle must be live and not a DEV BO, the offset the one GET_BO_INFO gave, the
    /// length within the BO (EINVAL).
    fn map_bo(&self, handle: u32, map_offset: u64, len: usize) -> io::Result<Arc<Mmap>> {
        let mut s = self.st();
        Self::log(&mut s, format!("mmap({handle})"));
        let bo = s.bos.get(&handle).ok_or_else(|| err(libc::EINVAL))?;
        if map_offset != u64::from(handle) << 32 || len as u64 > bo.size {
            return einval();
        }
        let mem = Arc::clone(bo.mem.as_ref().ok_or_else(|| err(libc::EINVAL))?);
        if bo.kind == sys::BO_DEV_HEAP {
            s.heap_map = Some(Arc::clone(&mem));
        }
        Ok(mem)
    }

    /// The handle must be live (ENOENT), the direction 0 or 1 and the range inside the BO
    /// (EINVAL).
    fn sync_bo(&self, arg: &mut SyncBo) -> io::Result<()> {
        let mut s = self.st();
        Self::log(&mut s, format!("SYNC_BO({}, dir {})", arg.handle, arg.direction));
        let bo = s.bos.get(&arg.handle).ok_or_else(|| err(libc::ENOENT))?;
        if arg.direction > sys::SYNC_FROM_DEVICE
            || arg.offset.checked_add(arg.size).is_none_or(|e| e > bo.size)
        {
            return einval();
        }
        Ok(())
    }

    /// pad must be zero and the handle live (EINVAL): a second close of one handle fails.
    fn gem_close(&self, arg: &mut GemClose) -> io::Result<()> {
        let mut s = self.st();
        Self::log(&mut s, format!("GEM_CLOSE({})", arg.handle));
        if arg.pad != 0 {
            return einval();
        }
        let bo = s.bos.remove(&arg.handle).ok_or_else(|| err(libc::EINVAL))?;
        if bo.kind == sys::BO_DEV {
            s.heap_used.retain(|&(_, _, h)| h != arg.handle);
        }
        if s.heap == Some(arg.handle) {
            // The driver keeps the heap while DEV BOs refer to it; a client that closes it
            // cannot create another one.
            s.heap_map = None;
        }
        Ok(())
    }

    /// ext/ext_flags zero, type EXEC_BUF, exactly one command, at most 4095 argument BOs and
    /// `args` as long as `arg_count` (EINVAL); a live, configured context (EINVAL); the command
    /// a live CMD BO and every argument BO live (ENOENT); the packet well-formed (count inside
    /// the BO, START_NPU or CMD_CHAIN, a CU mask naming a configured CU, chain members live CMD
    /// BOs holding START_NPU packets) (EINVAL). An instruction stream outside every DEV BO is
    /// what the firmware faults on: the command ends in ERROR.
    fn exec_cmd(&self, arg: &mut ExecCmd, args: &[u32]) -> io::Result<()> {
        let mut s = self.st();
        Self::log(&mut s, format!("EXEC_CMD(ctx {}, cmd {})", arg.hwctx, arg.cmd_handles));
        if arg.ext != 0 || arg.ext_flags != 0 || arg.ty != sys::CMD_SUBMIT_EXEC_BUF {
            return einval();
        }
        if arg.cmd_count != 1 || arg.arg_count > MAX_ARGS || arg.arg_count as usize != args.len() {
            return einval();
        }
        let ncus = match s.ctxs.get(&arg.hwctx) {
            Some(c) if !c.cus.is_empty() => c.cus.len(),
            _ => return einval(),
        };
        let cmd_handle = u32::try_from(arg.cmd_handles).map_err(|_| err(libc::EINVAL))?;
        let (mem, bytes) = Self::cmd_bytes(&s, cmd_handle)?;
        if let Some(a) = args.iter().find(|a| !s.bos.contains_key(a)) {
            log::debug!("fake: argument BO {a} does not exist");
            return Err(err(libc::ENOENT));
        }
        let packet = Packet::decode(&bytes).map_err(|_| err(libc::EINVAL))?;
        // (member memory, instruction range ok) for each run in the submission.
        let mut runs: Vec<(Arc<Mmap>, bool)> = Vec::new();
        let check_run = |s: &State, p: &Packet| -> io::Result<bool> {
            match p {
                Packet::StartNpu { cu_masks, run, .. } => {
                    let cu = cu_masks[0].trailing_zeros() as usize;
                    if cu >= ncus || cu_masks.iter().skip(1).any(|&m| m != 0) {
                        return einval();
                    }
                    Ok(run.instr_size > 0
                        && run.instr_size % 4 == 0
                        && Self::in_dev_bo(s, run.instr_addr, u64::from(run.instr_size)))
                }
                Packet::Chain { .. } => einval(),
            }
        };
        match &packet {
            Packet::StartNpu { .. } => {
                let ok = check_run(&s, &packet)?;
                runs.push((Arc::clone(&mem), ok));
            }
            Packet::Chain { handles, .. } => {
                for &h in handles {
                    if h == cmd_handle {
                        return einval();
                    }
                    let (m, b) = Self::cmd_bytes(&s, h)?;
                    let p = Packet::decode(&b).map_err(|_| err(libc::EINVAL))?;
                    let ok = check_run(&s, &p)?;
                    runs.push((m, ok));
                }
            }
        }
        s.submitted.push(Submission {
            hwctx: arg.hwctx,
            packet: packet.clone(),
            args: args.to_vec(),
        });
        let outcome = s.outcomes.pop_front().or(s.default_outcome).unwrap_or(Outcome::Complete);
        let ctx = s.ctxs.get_mut(&arg.hwctx).ok_or_else(|| err(libc::EINVAL))?;
        ctx.last_seq += 1;
        let seq = ctx.last_seq;
        arg.seq = seq;
        // The first run whose instructions the firmware could not fetch fails the submission.
        let bad = runs.iter().position(|(_, ok)| !ok);
        let (state, index) = match (outcome, bad) {
            (Outcome::Hang, _) => return Ok(()),
            (_, Some(i)) => (CmdState::Error, i as u32),
            (Outcome::Complete, None) => (CmdState::Completed, 0),
            (Outcome::Fail { state, chain_index }, None) => {
                (state, chain_index.min(runs.len() as u32 - 1))
            }
        };
        for (i, (m, _)) in runs.iter().enumerate() {
            let st = match state {
                CmdState::Completed => CmdState::Completed,
                s if i as u32 == index => s,
                _ if (i as u32) < index => CmdState::Completed,
                _ => CmdState::Abort,
            };
            Self::set_state(m, st)?;
        }
        if matches!(packet, Packet::Chain { .. }) {
            if state != CmdState::Completed {
                mem.write(cmd::CHAIN_ERROR_INDEX_OFFSET, &index.to_le_bytes())?;
            }
            Self::set_state(&mem, state)?;
        }
        ctx.signaled.insert(seq);
        Ok(())
    }

    /// The syncobj must belong to a live context (ENOENT); a point that was never submitted or
    /// never signalled times out (ETIME) at once, without sleeping.
    fn wait_syncobj(&self, syncobj: u32, point: u64, _timeout: Duration) -> io::Result<()> {
        let mut s = self.st();
        Self::log(&mut s, format!("SYNCOBJ_TIMELINE_WAIT({syncobj}, {point})"));
        let ctx =
            s.ctxs.values().find(|c| c.syncobj == syncobj).ok_or_else(|| err(libc::ENOENT))?;
        if ctx.signaled.contains(&point) {
            Ok(())
        } else {
            Err(err(libc::ETIME))
        }
    }

    /// AIE_METADATA, AIE_VERSION, CLOCK_METADATA and FIRMWARE_VERSION with made-up values; a
    /// buffer smaller than the struct is EINVAL; other params EOPNOTSUPP.
    fn get_info(&self, param: u32, buf: &mut [u8]) -> io::Result<u32> {
        let clock = |name: &[u8]| {
            let mut c = Clock::default();
            c.name[..name.len()].copy_from_slice(name);
            c
        };
        let bytes: Vec<u8> = match param {
            sys::query::AIE_METADATA => sys::pod_bytes(&Self::METADATA).to_vec(),
            sys::query::AIE_VERSION => sys::pod_bytes(&Self::METADATA.version).to_vec(),
            sys::query::CLOCK_METADATA => sys::pod_bytes(&ClockMetadata {
                mp_npu_clock: clock(b"fake MP-NPU"),
                h_clock: clock(b"fake H"),
            })
            .to_vec(),
            sys::query::FIRMWARE_VERSION => {
                sys::pod_bytes(&FirmwareVersion { major: 0, minor: 0, patch: 0, build: 0 }).to_vec()
            }
            _ => return Err(err(libc::EOPNOTSUPP)),
        };
        if buf.len() < bytes.len() {
            return einval();
        }
        buf[..bytes.len()].copy_from_slice(&bytes);
        Ok(bytes.len() as u32)
    }

    /// Absent unless [`FakeDevice::with_get_array`] (EINVAL, as the DRM core answers an ioctl
    /// number past the driver's table); HW_CONTEXT_ALL returns the number of live contexts.
    fn get_array(&self, param: u32, element_size: u32, _buf: &mut [u8]) -> io::Result<(u32, u32)> {
        if !self.get_array || param != sys::ARRAY_HW_CONTEXT_ALL {
            return einval();
        }
        Ok((element_size, self.st().ctxs.len() as u32))
    }
}
