//! Where each activation of a forward pass lives, and the operations that move it only when
//! they must.
//!
//! An [`Act`] has a host copy, a device copy, or both. An operation placed on the device takes
//! its inputs' device copies (uploading a host-only input) and leaves its output on the device
//! only; one on the CPU takes host copies (reading a device-only input back, which submits what
//! the step has recorded so far) and leaves its output on the host. So consecutive device
//! operations are recorded into one submission, and a CPU operation after them is where the step
//! submits and waits: the forward pass never decides that itself.
//!
//! The element-wise glue (residual additions, the gated activation) follows its inputs: on the
//! device when they are all there, on the CPU otherwise.

use std::sync::MutexGuard;

use unicorn_kernels::attention::AttnParams;
use unicorn_kernels::ops::{add_assign, geglu, rms_norm, swiglu, Rope};
use unicorn_kernels::{matmul, ThreadPool};
use unicorn_vulkan::{Context, KvCache, OutRows, Tensor, VulkanError};
use unicorn_xdna::hwctx::QosPriority;

use super::npu::NpuPass;
use super::placement::{Exec, Gpu, OpClass};
use super::transformer::Ffn;
use super::weights::Matrix;
use super::ModelError;
use crate::gguf::GgufFile;

/// An activation of a pass (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct Act {
    host: Vec<f32>,
    /// Whether `host` holds the current value.
    host_ok: bool,
    /// The device copy of the current value, if there is one.
    dev: Option<Tensor>,
    /// The two device tensors operations write this activation into, alternately (so an
    /// operation can read the old value while writing the new one).
    homes: [Option<Tensor>; 2],
}

impl Act {
    /// `len` zeros on the host.
    pub fn zeros(len: usize) -> Act {
        Act::from_vec(vec![0.0; len])
    }

    /// `v` on the host.
    pub fn from_vec(v: Vec<f32>) -> Act {
        Act { host: v, host_ok: true, dev: None, homes: [None; 2] }
    }

    /// Values it holds.
    pub fn len(&self) -> usize {
        self.host.len()
    }

    /// Makes `self` an activation of `len` values to be overwritten: unchanged when it has that
    /// length; otherwise `len` zeros on the host (in its old host storage).
    pub fn resize(&mut self, len: usize) {
        if self.host.len() != len {
            self.host.clear();
            self.host.resize(len, 0.0);
            (self.host_ok, self.dev, self.homes) = (true, None, [None; 2]);
        }
    }
}

/// A pass's device state (when some class is on the device) and what runs where.
pub(crate) struct Flow<'e> {
    gpu: Option<MutexGuard<'e, Option<Gpu>>>,
    on: [bool; 4],
    /// The NPU side, when some class's products or norms run there ([`super::npu`]).
    npu: Option<NpuPass<'e>>,
    on_npu: [bool; 4],
}

impl<'e> Flow<'e> {
    /// A pass on `exec`'s placement; locks and begins the device step when some class is there,
    /// and locks the model's NPU side (its runs at priority `qos`) when some class is on it.
    pub fn new(exec: &'e Exec, qos: QosPriority) -> Result<Flow<'e>, ModelError> {
        let on = OpClass::ALL.map(|c| exec.on_device(c));
        let on_npu = OpClass::ALL.map(|c| exec.on_npu(c));
        let npu = if on_npu.contains(&true) { exec.npu(qos) } else { None };
        Ok(Flow { gpu: exec.gpu()?, on, npu, on_npu })
    }

    /// The device state, when the class is on it.
    fn gpu_for(&mut self, class: OpClass) -> Option<&mut Gpu> {
        if self.on[class as usize] {
            self.gpu()
        } else {
            None
        }
    }

    fn gpu(&mut self) -> Option<&mut Gpu> {
        self.gpu.as_mut().and_then(|g| g.as_mut())
    }

    /// Whether `class` runs on a device (Vulkan, or the NPU: then each of its products or norms
    /// is dispatched on its own, see [`Flow::matmul`] and [`Flow::norm`]).
    pub fn on(&self, class: OpClass) -> bool {
        self.on_vulkan(class) || (self.on_npu[class as usize] && self.npu.is_some())
    }

    /// Whether `class` runs on the Vulkan device (not the NPU): where its attention, RoPE and KV
    /// cache go with it.
    pub fn on_vulkan(&self, class: OpClass) -> bool {
        self.on[class as usize] && self.gpu.is_some()
    }

    /// `a`'s current value on the host, read back from the device if needed.
    pub fn host<'a>(&mut self, a: &'a mut Act) -> Result<&'a [f32], ModelError> {
        if !a.host_ok {
            let (Some(gpu), Some(t)) = (self.gpu(), a.dev) else {
                return Err(ModelError::Vulkan(unicorn_vulkan::VulkanError::Shape(
                    "an activation with no current value".into(),
                )));
            };
            gpu.step.read(t, &mut a.host)?;
            a.host_ok = true;
        }
        Ok(&a.host)
    }

    /// `a`'s host copy, to be overwritten or changed: the device copy is dropped.
    pub fn host_mut<'a>(&mut self, a: &'a mut Act) -> Result<&'a mut Vec<f32>, ModelError> {
        self.host(a)?;
        a.dev = None;
        Ok(&mut a.host)
    }

    /// `a`'s host storage, to be overwritten (nothing is read back): the device copy is dropped.
    pub fn overwrite<'a>(&mut self, a: &'a mut Act) -> &'a mut Vec<f32> {
        a.dev = None;
        a.host_ok = true;
        &mut a.host
    }

    /// `a`'s current value on the device, uploaded if needed.
    fn dev(gpu: &mut Gpu, a: &mut Act) -> Result<Tensor, ModelError> {
        if let Some(t) = a.dev {
            return Ok(t);
        }
        let t = gpu.step.upload(&a.host)?;
        a.dev = Some(t);
        Ok(t)
    }

    /// A device tensor to write `a`'s new value into (not its current device copy), after which
    /// that is `a`'s only copy.
    fn out(gpu: &mut Gpu, a: &mut Act) -> Result<Tensor, ModelError> {
        let slot = usize::from(a.dev.is_some() && a.dev == a.homes[0]);
        let t = match a.homes[slot] {
            Some(t) if t.len() == a.host.len() => t,
            _ => *a.homes[slot].insert(gpu.step.tensor(a.host.len())?),
        };
        a.dev = Some(t);
        a.host_ok = false;
        Ok(t)
    }

    /// RMSNorm of the rows of `dim` values of `x` into `out`, times `w` when given.
    pub fn norm(
        &mut self,
        x: &mut Act,
        out: &mut Act,
        dim: usize,
        w: Option<&[f32]>,
        eps: f32,
    ) -> Result<(), ModelError> {
        if let Some(gpu) = self.gpu_for(OpClass::Norms) {
            let xt = Flow::dev(gpu, x)?;
            let wt = w.map(|w| gpu.vector(w)).transpose()?;
            let ot = Flow::out(gpu, out)?;
            gpu.step.rms_norm(xt, dim, wt, eps, ot)?;
        } else if self.on_npu[OpClass::Norms as usize] && self.npu.is_some() {
            // The NPU path falls back to the CPU per norm by itself.
            let x = self.host(x)?;
            let out = self.overwrite(out);
            if let Some(npu) = self.npu.as_mut() {
                npu.norm(x, out, dim, w, eps);
            }
        } else {
            let x = self.host(x)?;
            rms_norm(x, self.overwrite(out), dim, w, eps);
        }
        Ok(())
    }

    /// `out[t] = m x[t]` for the `n` rows of `x`, where `class` runs (`None`: on the CPU).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &mut self,
        class: Option<OpClass>,
        m: &Matrix,
        file: &GgufFile,
        pool: &ThreadPool,
        x: &mut Act,
        n: usize,
        out: &mut Act,
    ) -> Result<(), ModelError> {
        let bytes = file.bytes();
        if class.is_some_and(|c| self.on_npu[c as usize]) && self.npu.is_some() {
            // The NPU path falls back to the CPU per product by itself.
            let x = self.host(x)?;
            let out = self.overwrite(out);
            if let Some(npu) = self.npu.as_mut() {
                npu.matmul(m, bytes, pool, x, n, out)?;
            }
        } else if let Some(gpu) = class.and_then(|c| self.gpu_for(c)) {
            let parts = gpu.matrix(m, bytes)?;
            let xt = Flow::dev(gpu, x)?;
            let ot = Flow::out(gpu, out)?;
            for p in parts.iter() {
                let o = OutRows { first: p.row0, of: m.rows };
                gpu.step.matmul(m.ty, p.w, p.rows, m.cols, xt, n, ot, o)?;
            }
        } else {
            let x = self.host(x)?;
            matmul(pool, &m.cpu_view(file)?, x, n, self.overwrite(out))?;
        }
        Ok(())
    }

    /// `x += y`: on the device when both are there, else on the CPU.
    pub fn add(&mut self, x: &mut Act, y: &mut Act) -> Result<(), ModelError> {
        if let (Some(xt), Some(yt), Some(gpu)) = (x.dev, y.dev, self.gpu()) {
            let ot = Flow::out(gpu, x)?;
            gpu.step.add(xt, yt, ot)?;
        } else {
            let y = self.host(y)?;
            add_assign(self.host_mut(x)?, y);
        }
        Ok(())
    }

    /// `out = act(gate) * up`: on the device when both inputs are there, else on the CPU.
    pub fn glu(
        &mut self,
        ffn: Ffn,
        gate: &mut Act,
        up: &mut Act,
        out: &mut Act,
    ) -> Result<(), ModelError> {
        if let (Some(gt), Some(ut), Some(gpu)) = (gate.dev, up.dev, self.gpu()) {
            let ot = Flow::out(gpu, out)?;
            match ffn {
                Ffn::Silu => gpu.step.swiglu(gt, ut, ot)?,
                Ffn::GeluTanh => gpu.step.geglu(gt, ut, ot)?,
            }
        } else {
            let (g, u) = (self.host(gate)?, self.host(up)?);
            let out = self.overwrite(out);
            match ffn {
                Ffn::Silu => swiglu(g, u, out),
                Ffn::GeluTanh => geglu(g, u, out),
            }
        }
        Ok(())
    }

    /// The device state, for an operation that only runs there.
    fn device(&mut self) -> Result<&mut Gpu, ModelError> {
        self.gpu()
            .ok_or_else(|| VulkanError::Shape("a device operation without a device".into()))
            .map_err(ModelError::from)
    }

    /// The Vulkan context, when some class runs there.
    pub fn context(&mut self) -> Option<&'static Context> {
        self.gpu().map(|g| g.step.context())
    }

    /// A device tensor holding the words `v` (token positions).
    pub fn upload_u32(&mut self, v: &[u32]) -> Result<Tensor, ModelError> {
        Ok(self.device()?.step.upload_u32(v)?)
    }

    /// RoPE on the device, in place on `x` (`n` tokens of heads of `head_dim`, at the positions
    /// in `pos`).
    pub fn rope(
        &mut self,
        rope: &Rope,
        x: &mut Act,
        head_dim: usize,
        pos: Tensor,
        n: usize,
    ) -> Result<(), ModelError> {
        let gpu = self.device()?;
        let t = Flow::dev(gpu, x)?;
        gpu.step.rope(rope, t, head_dim, pos, n)?;
        x.host_ok = false;
        Ok(())
    }

    /// Stores rows `tok0..tok0 + n` of `k` and `v` at positions `pos0..` of `layer` of the
    /// device cache `kv`.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_store(
        &mut self,
        kv: &mut KvCache<'static>,
        layer: usize,
        k: &mut Act,
        v: &mut Act,
        tok0: usize,
        n: usize,
        pos0: usize,
    ) -> Result<(), ModelError> {
        let gpu = self.device()?;
        let (kt, vt) = (Flow::dev(gpu, k)?, Flow::dev(gpu, v)?);
        Ok(gpu.step.kv_store(kv, layer, kt, vt, tok0, n, pos0)?)
    }

    /// A device tensor that `a`'s new value is written into, by parts (see [`Flow::attention`]).
    pub fn out_tensor(&mut self, a: &mut Act) -> Result<Tensor, ModelError> {
        Flow::out(self.device()?, a)
    }

    /// Attention of rows `tok0..tok0 + n` of `q` over `layer` of the device cache `kv`, into the
    /// same rows of `out` (from [`Flow::out_tensor`]).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &mut self,
        q: &mut Act,
        kv: &mut KvCache<'static>,
        layer: usize,
        p: &AttnParams,
        tok0: usize,
        n: usize,
        out: Tensor,
    ) -> Result<(), ModelError> {
        let gpu = self.device()?;
        let qt = Flow::dev(gpu, q)?;
        Ok(gpu.step.attention(qt, kv, layer, p, tok0, n, out)?)
    }

    /// Rows `rows` (of `d` values) of `x`, gathered on the device when `x` is only there (so
    /// the hidden state need not come back), else on the host.
    pub fn gather(&mut self, x: &mut Act, rows: &[usize], d: usize) -> Result<Act, ModelError> {
        let mut sel = Act::zeros(rows.len() * d);
        if let (false, Some(xt), Some(gpu)) = (x.host_ok, x.dev, self.gpu()) {
            let ot = Flow::out(gpu, &mut sel)?;
            for (i, &r) in rows.iter().enumerate() {
                gpu.step.copy(xt, r * d, ot, i * d, d)?;
            }
            return Ok(sel);
        }
        let x = self.host(x)?;
        let out = self.overwrite(&mut sel);
        for (o, &r) in out.chunks_exact_mut(d).zip(rows) {
            o.copy_from_slice(&x[r * d..][..d]);
        }
        Ok(sel)
    }

    /// Takes `a`'s host storage (its current value, read back if needed).
    pub fn take(&mut self, a: &mut Act) -> Result<Vec<f32>, ModelError> {
        self.host(a)?;
        a.dev = None;
        Ok(std::mem::take(&mut a.host))
    }

    /// Ends the pass: keeps the timings of its dispatches (when measured) and logs what it cost.
    pub fn finish(mut self, submits_before: u64) {
        if let Some(gpu) = self.gpu() {
            let s = gpu.step.stats();
            log::trace!(
                "vulkan pass: {} submissions, {} dispatches so far",
                s.submits - submits_before,
                s.dispatches
            );
            if gpu.step.timed() {
                gpu.last_timings = gpu.step.take_timings();
                for t in &gpu.last_timings {
                    log::debug!("vulkan: {:>16} x{:<4} {:9.3} ms", t.op, t.count, t.ns / 1e6);
                }
            }
        }
    }

    /// Submissions of the step so far.
    pub fn submits(&mut self) -> u64 {
        self.gpu().map_or(0, |g| g.step.stats().submits)
    }
}
