//! The NPU as the engine uses it: one driver client (device + heap) with the manifest's ready
//! kernels, hardware contexts made on first use, kernel runs, and the health of each kernel.
//!
//! - Contexts: one per (kernel, QoS priority), created the first time a run of that kernel asks
//!   for that priority (the PDIs load then, not per run). NPU1 holds at most 6 contexts: when
//!   the driver refuses another one (EBUSY), a kernel that has a context of another priority
//!   shares it (the priority is only a hint: the driver does not schedule by it, unicornd's
//!   scheduler decides what is submitted when); a kernel with none takes the contexts of the
//!   least recently used kernel, which loads again on its next run (slow: a model whose
//!   products need more than 6 kernels should get kernels packed into fewer xclbins).
//! - Instruction streams: one DEV BO per kernel, made with its first context.
//! - Health: a failed run (command state ERROR/TIMEOUT/..., a wait that ran out, a refused
//!   submission) counts against its kernel; after [`RETIRE_AFTER`] failures the kernel is
//!   retired and [`Runtime::usable`] stops offering it. Failures are logged once per kernel,
//!   retirement once. The caller computes the failed operation elsewhere (the CPU).
//! - Counters ([`Runtime::stats`]): runs completed on the NPU, runs that fell back.
//!
//! Everything drops in order: contexts before their PDI BOs, every BO before the heap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::bo::{Bo, SyncDir};
use crate::cmd::{self, CmdState, StartNpu};
use crate::device::Device;
use crate::error::{Result, XdnaError};
use crate::hwctx::{Client, HwContext, QosPriority, DEFAULT_HEAP_BYTES};
use crate::manifest::{Kernel, Manifest, Ready};

/// Failures after which a kernel is taken out of use for the life of the process.
pub const RETIRE_AFTER: u32 = 3;

/// What the NPU has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Kernel runs that completed.
    pub runs: u64,
    /// Runs that failed; their operations were computed elsewhere.
    pub fallbacks: u64,
    /// Kernels taken out of use.
    pub retired: usize,
}

#[derive(Debug)]
struct Slot {
    ready: Ready,
    /// Contexts by QoS priority, and the instruction stream (made with the first context).
    loaded: Mutex<Loaded>,
    /// The runtime's tick at the last use (for evicting the least recently used context).
    last_used: AtomicU64,
    failures: AtomicU32,
    retired: AtomicBool,
}

/// Fields drop in order: the contexts before the instruction stream they ran.
#[derive(Debug, Default)]
struct Loaded {
    ctxs: Vec<(QosPriority, Arc<HwContext>)>,
    instr: Option<Arc<Bo>>,
}

/// One prepared kernel run: the command packet naming the buffers, rewritten to state NEW
/// before each submission.
#[derive(Debug)]
pub struct Prepared {
    kernel: usize,
    cmd: Bo,
    packet: Vec<u8>,
}

impl Prepared {
    pub fn kernel(&self) -> usize {
        self.kernel
    }
}

/// The NPU runtime (see the module documentation).
#[derive(Debug)]
pub struct Runtime {
    /// Before `client`: contexts and BOs go before the heap's last owner.
    slots: Vec<Slot>,
    client: Client,
    core_rows: u32,
    runs: AtomicU64,
    fallbacks: AtomicU64,
    tick: AtomicU64,
}

impl Runtime {
    /// A client on `dev` (its heap is made now) running the ready kernels of `manifest`;
    /// `core_rows` is the AIE metadata's core row count (tiles per column).
    pub fn new(dev: Arc<dyn Device>, manifest: &Manifest, core_rows: u32) -> Result<Runtime> {
        if core_rows == 0 {
            return Err(XdnaError::Invalid("zero core rows".into()));
        }
        let client = Client::new(dev, DEFAULT_HEAP_BYTES)?;
        let slots = manifest
            .ready
            .iter()
            .map(|r| Slot {
                ready: r.clone(),
                loaded: Mutex::new(Loaded::default()),
                last_used: AtomicU64::new(0),
                failures: AtomicU32::new(0),
                retired: AtomicBool::new(false),
            })
            .collect();
        Ok(Runtime {
            slots,
            client,
            core_rows,
            runs: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            tick: AtomicU64::new(0),
        })
    }

    /// The device (a test double says so).
    pub fn device(&self) -> &Arc<dyn Device> {
        self.client.device()
    }

    /// Every kernel, in manifest order (indices are what the other methods take).
    pub fn kernels(&self) -> impl Iterator<Item = &Kernel> {
        self.slots.iter().map(|s| &s.ready.kernel)
    }

    pub fn kernel(&self, i: usize) -> Option<&Kernel> {
        self.slots.get(i).map(|s| &s.ready.kernel)
    }

    /// Whether kernel `i` exists and is not retired.
    pub fn usable(&self, i: usize) -> bool {
        self.slots.get(i).is_some_and(|s| !s.retired.load(Ordering::Relaxed))
    }

    /// The names of the retired kernels.
    pub fn retired(&self) -> Vec<String> {
        self.slots
            .iter()
            .filter(|s| s.retired.load(Ordering::Relaxed))
            .map(|s| s.ready.kernel.name.clone())
            .collect()
    }

    pub fn stats(&self) -> Stats {
        Stats {
            runs: self.runs.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            retired: self.slots.iter().filter(|s| s.retired.load(Ordering::Relaxed)).count(),
        }
    }

    /// A SHMEM BO of `size` bytes (weights, activations).
    pub fn shmem(&self, size: usize) -> Result<Bo> {
        self.client.shmem(size)
    }

    fn slot(&self, i: usize) -> Result<&Slot> {
        self.slots.get(i).ok_or_else(|| XdnaError::Invalid(format!("no kernel {i}")))
    }

    /// Kernel `i`'s context for `qos` (made on first use) and its instruction stream.
    fn context(&self, i: usize, qos: QosPriority) -> Result<(Arc<HwContext>, Arc<Bo>)> {
        let slot = self.slot(i)?;
        slot.last_used.store(self.tick.fetch_add(1, Ordering::Relaxed) + 1, Ordering::Relaxed);
        let mut l = slot.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if l.instr.is_none() {
            l.instr = Some(Arc::new(self.client.dev_bo_with(&slot.ready.instructions)?));
        }
        let instr = Arc::clone(l.instr.as_ref().expect("made above"));
        if let Some((_, c)) = l.ctxs.iter().find(|(q, _)| *q == qos) {
            return Ok((Arc::clone(c), instr));
        }
        let k = &slot.ready.kernel;
        let tiles = u32::from(k.columns) * self.core_rows;
        let mut loaded = self.client.load(&slot.ready.xclbin, tiles, qos);
        let busy = |r: &Result<HwContext>| matches!(r, Err(XdnaError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EBUSY));
        // The device's contexts are all taken (NPU1 has 6): give back the least recently used
        // kernel's and try once more.
        if busy(&loaded) && l.ctxs.is_empty() && self.evict_lru(i) {
            loaded = self.client.load(&slot.ready.xclbin, tiles, qos);
        }
        match loaded {
            Ok(c) => {
                log::debug!(
                    "npu: kernel {} loaded in a context of priority {qos:?} ({tiles} tiles)",
                    k.name
                );
                let c = Arc::new(c);
                l.ctxs.push((qos, Arc::clone(&c)));
                Ok((c, instr))
            }
            // No new context: share one of another priority (the priority is a hint only).
            Err(e) if !l.ctxs.is_empty() => {
                log::debug!("npu: no new context for {} at {qos:?} ({e}); sharing one", k.name);
                Ok((Arc::clone(&l.ctxs[0].1), instr))
            }
            Err(e) => Err(e),
        }
    }

    /// Drops the contexts of the least recently used kernel other than `except` that has any
    /// (skipping one another thread holds); returns whether one was dropped. A run in flight
    /// keeps its context alive until it ends.
    fn evict_lru(&self, except: usize) -> bool {
        let mut order: Vec<usize> = (0..self.slots.len()).filter(|&j| j != except).collect();
        order.sort_by_key(|&j| self.slots[j].last_used.load(Ordering::Relaxed));
        for j in order {
            // try_lock: never wait on another kernel's lock while holding ours.
            if let Ok(mut other) = self.slots[j].loaded.try_lock() {
                if !other.ctxs.is_empty() {
                    log::debug!("npu: contexts of {} given back", self.slots[j].ready.kernel.name);
                    other.ctxs.clear();
                    return true;
                }
            }
        }
        false
    }

    /// A prepared run of kernel `i` on the buffers `bos` (in the order of the design's runtime
    /// sequence; see [`cmd::npu_args`]).
    pub fn prepare(&self, i: usize, qos: QosPriority, bos: &[&Bo]) -> Result<Prepared> {
        let (ctx, instr) = self.context(i, qos)?;
        let k = &self.slot(i)?.ready.kernel;
        let cu_mask = ctx.cu_mask(&k.cu).ok_or_else(|| {
            XdnaError::Invalid(format!("kernel {}: its context has no CU {:?}", k.name, k.cu))
        })?;
        let addrs: Vec<u64> = bos.iter().map(|b| b.xdna_addr()).collect();
        let args = cmd::npu_args(&addrs)
            .ok_or_else(|| XdnaError::Invalid(format!("{} buffers for one kernel", bos.len())))?;
        let run = StartNpu {
            cu_mask,
            instr_addr: instr.xdna_addr(),
            instr_size: u32::try_from(instr.size())
                .map_err(|_| XdnaError::Invalid("instruction stream over 4 GiB".into()))?,
            args,
        };
        let packet = run.encode().map_err(|e| XdnaError::Invalid(e.to_string()))?;
        let cmd = self.client.command(&run)?;
        Ok(Prepared { kernel: i, cmd, packet })
    }

    /// Runs `p` at priority `qos`: its inputs must be written and synced to the device; waits
    /// for completion (with the context's timeout). `bos` are the buffers `p` names.
    pub fn run(&self, p: &Prepared, qos: QosPriority, bos: &[&Bo]) -> Result<()> {
        if !self.usable(p.kernel) {
            return Err(XdnaError::Command { state: CmdState::Abort, index: None });
        }
        let (ctx, instr) = self.context(p.kernel, qos)?;
        // The device wrote the last run's final state into the header.
        p.cmd.write(0, &p.packet)?;
        let mut args: Vec<&Bo> = Vec::with_capacity(bos.len() + 1);
        args.push(&instr);
        args.extend(bos);
        ctx.run(&p.cmd, &args)?;
        self.runs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Records that a run of kernel `i` failed with `e` and its operation was computed
    /// elsewhere: counted, logged once per kernel, the kernel retired after [`RETIRE_AFTER`]
    /// failures. Returns whether this failure retired it.
    pub fn failed(&self, i: usize, e: &XdnaError) -> bool {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = self.slots.get(i) else {
            return false;
        };
        let name = &slot.ready.kernel.name;
        let n = slot.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 {
            log::warn!("npu: kernel {name} failed ({e}); the operation ran on the cpu instead");
        }
        if n >= RETIRE_AFTER && !slot.retired.swap(true, Ordering::Relaxed) {
            log::error!(
                "npu: kernel {name} failed {n} times (last: {e}); it is out of use, its \
                 operations run on the cpu"
            );
            // Its contexts are of no further use: give the device's slots back.
            let mut l = slot.loaded.lock().unwrap_or_else(|e| e.into_inner());
            l.ctxs.clear();
            return true;
        }
        false
    }

    /// Live contexts per kernel name (for status and tests).
    pub fn contexts(&self) -> HashMap<String, Vec<QosPriority>> {
        self.slots
            .iter()
            .map(|s| {
                let l = s.loaded.lock().unwrap_or_else(|e| e.into_inner());
                (s.ready.kernel.name.clone(), l.ctxs.iter().map(|(q, _)| *q).collect())
            })
            .collect()
    }
}

/// Copies host bytes into `bo` and syncs them to the device.
pub fn upload(bo: &Bo, bytes: &[u8]) -> Result<()> {
    bo.write(0, bytes)?;
    bo.sync(SyncDir::ToDevice, 0, bytes.len())
}

/// Syncs `out.len()` bytes of `bo` from the device and copies them out.
pub fn download(bo: &Bo, out: &mut [u8]) -> Result<()> {
    bo.sync(SyncDir::FromDevice, 0, out.len())?;
    bo.read(0, out)
}
