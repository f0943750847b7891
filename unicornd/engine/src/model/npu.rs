//! The NPU operator path: the matrix products of the classes placed on `xdna` run as the
//! manifest's kernels through [`unicorn_xdna::runtime::Runtime`], each product falling back to
//! the CPU kernel on its own.
//!
//! - Kernel choice: a product of `rows x cols` takes a kernel of op `matmul` with shape
//!   `m = rows, k = cols` for a batch of several tokens (run over chunks of its `n` tokens, the
//!   last chunk padded with zeros), else one of op `matvec` with that shape (run once per
//!   token). Kernels whose activations are bf16 or f32 and whose weights are `row_major_bf16` or
//!   `row_major_i8_row_scale` can be driven; others (int8 activations) are not used.
//! - A matrix with no kernel of its shape runs on the CPU (logged once per shape).
//! - Weights: converted once per model into the kernel's layout (dequantized with the CPU's
//!   dequantization, [`unicorn_kernels::WeightView::dequantize_row`]) in a SHMEM BO that every
//!   pass shares; activations and results go through one input and one output BO per kernel.
//!   All of them are the model's and close when it is dropped; contexts and instruction streams
//!   belong to the runtime (shared by every model of the process).
//! - Failures: a run that fails (command state, timeout, a refused submission, a BO that cannot
//!   be made) is counted and logged by the runtime, which retires the kernel after repeated
//!   failures; the product is computed by the CPU kernel, so nothing wrong reaches the caller.
//!
//! Argument order of the runs is the order of the IRON designs' runtime sequences
//! (`kernels/xdna/iron_ops.py`): matvec `(W, x, y)`, matmul `(X, W, Y)`; the words are laid out
//! by [`unicorn_xdna::cmd::npu_args`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use unicorn_kernels::formats::{bf16_to_f32, f32_to_bf16};
use unicorn_kernels::{matmul, KernelError, ThreadPool};
use unicorn_xdna::bo::Bo;
use unicorn_xdna::hwctx::QosPriority;
use unicorn_xdna::manifest::{DType, Kernel, Op, WeightLayout};
use unicorn_xdna::runtime::{self, Prepared, Runtime};
use unicorn_xdna::XdnaError;

use super::weights::Matrix;
use super::ModelError;

/// Whether the engine can drive kernel `k` (its activation type and weight layout).
pub(crate) fn drivable(k: &Kernel) -> bool {
    matches!(k.op, Op::Matvec | Op::Matmul)
        && matches!(k.dtype, DType::Bf16 | DType::F32)
        && matches!(k.weights, WeightLayout::RowMajorBf16 | WeightLayout::RowMajorI8RowScale)
}

/// A model's NPU side: the runtime and the model's buffers on it.
#[derive(Debug)]
pub(crate) struct Npu {
    rt: Arc<Runtime>,
    state: Mutex<State>,
}

impl Npu {
    pub fn new(rt: Arc<Runtime>) -> Npu {
        Npu { rt, state: Mutex::new(State::default()) }
    }

    /// The model's NPU state for a pass at priority `qos`; passes take turns (they share the
    /// input and output BOs).
    pub fn pass(&self, qos: QosPriority) -> NpuPass<'_> {
        NpuPass { rt: &self.rt, state: self.state.lock().unwrap_or_else(|e| e.into_inner()), qos }
    }
}

/// A kernel's input and output BOs (one pair per kernel and model).
#[derive(Debug)]
struct Io {
    x: Bo,
    y: Bo,
}

/// A matrix ready to run on kernel `kernel`: its prepared command, its weights and the I/O.
#[derive(Debug)]
struct Ready {
    prepared: Prepared,
    w: Arc<Bo>,
    io: Arc<Io>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    /// Prepared runs by (matrix offset in the file, kernel).
    runs: HashMap<(usize, usize), Ready>,
    /// Converted weights by (matrix offset, layout).
    weights: HashMap<(usize, u8), Arc<Bo>>,
    io: HashMap<usize, Arc<Io>>,
    /// Shapes without a kernel, logged once each.
    no_kernel: HashSet<(usize, usize)>,
    /// Matrices whose weights could not be put on the NPU (logged once each): CPU for good.
    cpu_only: HashSet<usize>,
}

/// The NPU side of one forward pass.
#[derive(Debug)]
pub(crate) struct NpuPass<'e> {
    rt: &'e Runtime,
    state: MutexGuard<'e, State>,
    qos: QosPriority,
}

fn layout_key(l: WeightLayout) -> u8 {
    match l {
        WeightLayout::None => 0,
        WeightLayout::RowMajorBf16 => 1,
        WeightLayout::RowMajorI8RowScale => 2,
        WeightLayout::VectorF32 => 3,
    }
}

/// Why weights could not be converted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConvertError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("a matrix cannot take the weight layout {0:?}")]
    Layout(WeightLayout),
}

/// `m`'s weights in `layout`: row-major bf16, or int8 rows (`round(w / s)`, `s = max |w| / 127`
/// per row) followed by the rows' f32 scales. Little-endian.
pub(crate) fn convert_weights(
    m: &Matrix,
    bytes: &[u8],
    layout: WeightLayout,
) -> Result<Vec<u8>, ConvertError> {
    let view = m.view(bytes)?;
    let mut row = vec![0.0f32; m.cols];
    match layout {
        WeightLayout::RowMajorBf16 => {
            let mut out = Vec::with_capacity(m.rows * m.cols * 2);
            for r in 0..m.rows {
                view.dequantize_row(r, &mut row)?;
                out.extend(row.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()));
            }
            Ok(out)
        }
        WeightLayout::RowMajorI8RowScale => {
            let mut out = Vec::with_capacity(m.rows * m.cols + 4 * m.rows);
            let mut scales = Vec::with_capacity(m.rows);
            for r in 0..m.rows {
                view.dequantize_row(r, &mut row)?;
                let amax = row.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let s = amax / 127.0;
                let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                out.extend(row.iter().map(|&v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8));
                scales.push(s);
            }
            out.extend(scales.iter().flat_map(|s| s.to_le_bytes()));
            Ok(out)
        }
        other => Err(ConvertError::Layout(other)),
    }
}

fn elem_bytes(d: DType) -> usize {
    match d {
        DType::Bf16 => 2,
        DType::F32 => 4,
        DType::I8 => 1,
    }
}

/// `x` as the kernel's activations into `buf` (`x.len()` elements; the rest of `buf` zero).
fn encode_acts(d: DType, x: &[f32], buf: &mut [u8]) {
    buf.fill(0);
    match d {
        DType::Bf16 => {
            for (o, &v) in buf.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f32_to_bf16(v).to_le_bytes());
            }
        }
        _ => {
            for (o, &v) in buf.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

fn decode_acts(d: DType, buf: &[u8], out: &mut [f32]) {
    match d {
        DType::Bf16 => {
            for (o, b) in out.iter_mut().zip(buf.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        _ => {
            for (o, b) in out.iter_mut().zip(buf.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

/// Why a product did not run on the NPU.
enum Miss {
    /// No usable kernel, or weights that could not be placed: the CPU, nothing to count.
    NoKernel,
    /// Kernel `.0` failed: counted, then the CPU.
    Failed(usize, XdnaError),
}

impl NpuPass<'_> {
    /// `out[t] = m x[t]` for the `n` rows of `x`: on the NPU when a kernel fits and runs, else
    /// on the CPU. Only the CPU kernel's errors are returned.
    pub fn matmul(
        &mut self,
        m: &Matrix,
        bytes: &[u8],
        pool: &ThreadPool,
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        match self.try_matmul(m, bytes, x, n, out) {
            Ok(()) => return Ok(()),
            Err(Miss::NoKernel) => {}
            Err(Miss::Failed(k, e)) => {
                self.rt.failed(k, &e);
            }
        }
        Ok(matmul(pool, &m.view(bytes)?, x, n, out)?)
    }

    /// The usable, drivable kernel of `op` for a `rows x cols` product.
    fn find(&self, op: Op, rows: usize, cols: usize) -> Option<usize> {
        self.rt.kernels().enumerate().position(|(i, k)| {
            k.op == op
                && k.shape.m as usize == rows
                && k.shape.k as usize == cols
                && (op != Op::Matvec || k.shape.n == 1)
                && drivable(k)
                && self.rt.usable(i)
        })
    }

    fn try_matmul(
        &mut self,
        m: &Matrix,
        bytes: &[u8],
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<(), Miss> {
        if self.state.cpu_only.contains(&m.offset()) {
            return Err(Miss::NoKernel);
        }
        let batched = if n > 1 { self.find(Op::Matmul, m.rows, m.cols) } else { None };
        let Some(k) = batched.or_else(|| self.find(Op::Matvec, m.rows, m.cols)) else {
            if self.state.no_kernel.insert((m.rows, m.cols)) {
                log::info!(
                    "npu: no usable kernel for a {} x {} product; it runs on the cpu",
                    m.rows,
                    m.cols
                );
            }
            return Err(Miss::NoKernel);
        };
        let kernel = self.rt.kernel(k).expect("found above").clone();
        let ready = self.ready(m, bytes, k, &kernel)?;
        let (w, io) = (Arc::clone(&ready.w), Arc::clone(&ready.io));
        let bos: [&Bo; 3] = match kernel.op {
            Op::Matmul => [&io.x, &w, &io.y],
            _ => [&w, &io.x, &io.y],
        };
        let per = kernel.shape.n as usize;
        let (rows, cols, d) = (m.rows, m.cols, kernel.dtype);
        let mut xb = vec![0u8; per * cols * elem_bytes(d)];
        let mut yb = vec![0u8; per * rows * elem_bytes(d)];
        let fail = |e| Miss::Failed(k, e);
        for t0 in (0..n).step_by(per) {
            let t = per.min(n - t0);
            encode_acts(d, &x[t0 * cols..(t0 + t) * cols], &mut xb);
            runtime::upload(&io.x, &xb).map_err(fail)?;
            let ready = &self.state.runs[&(m.offset(), k)];
            self.rt.run(&ready.prepared, self.qos, &bos).map_err(fail)?;
            runtime::download(&io.y, &mut yb).map_err(fail)?;
            decode_acts(d, &yb, &mut out[t0 * rows..(t0 + t) * rows]);
        }
        Ok(())
    }

    /// `m`'s prepared run on kernel `k`, made on first use: weights converted and uploaded,
    /// I/O BOs made, the command packet written.
    fn ready(
        &mut self,
        m: &Matrix,
        bytes: &[u8],
        k: usize,
        kernel: &Kernel,
    ) -> Result<&Ready, Miss> {
        let key = (m.offset(), k);
        if !self.state.runs.contains_key(&key) {
            let w = match self.weights(m, bytes, kernel.weights) {
                Ok(w) => w,
                Err(e) => {
                    log::warn!(
                        "npu: the weights of a {} x {} product cannot be put on the NPU ({e}); \
                         it runs on the cpu",
                        m.rows,
                        m.cols
                    );
                    self.state.cpu_only.insert(m.offset());
                    return Err(Miss::NoKernel);
                }
            };
            let io = self.io(k, kernel).map_err(|e| Miss::Failed(k, e))?;
            let bos: [&Bo; 3] = match kernel.op {
                Op::Matmul => [&io.x, &w, &io.y],
                _ => [&w, &io.x, &io.y],
            };
            let prepared = self.rt.prepare(k, self.qos, &bos).map_err(|e| Miss::Failed(k, e))?;
            self.state.runs.insert(key, Ready { prepared, w, io });
        }
        Ok(&self.state.runs[&key])
    }

    fn weights(
        &mut self,
        m: &Matrix,
        bytes: &[u8],
        layout: WeightLayout,
    ) -> Result<Arc<Bo>, String> {
        let key = (m.offset(), layout_key(layout));
        if let Some(w) = self.state.weights.get(&key) {
            return Ok(Arc::clone(w));
        }
        let data = convert_weights(m, bytes, layout).map_err(|e| e.to_string())?;
        let bo = self.rt.shmem(data.len()).map_err(|e| e.to_string())?;
        runtime::upload(&bo, &data).map_err(|e| e.to_string())?;
        let bo = Arc::new(bo);
        self.state.weights.insert(key, Arc::clone(&bo));
        Ok(bo)
    }

    fn io(&mut self, k: usize, kernel: &Kernel) -> Result<Arc<Io>, XdnaError> {
        if let Some(io) = self.state.io.get(&k) {
            return Ok(Arc::clone(io));
        }
        let (s, e) = (kernel.shape, elem_bytes(kernel.dtype));
        let x = self.rt.shmem(s.n as usize * s.k as usize * e)?;
        let y = self.rt.shmem(s.n as usize * s.m as usize * e)?;
        let io = Arc::new(Io { x, y });
        self.state.io.insert(k, Arc::clone(&io));
        Ok(io)
    }
}
