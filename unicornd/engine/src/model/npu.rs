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
//! RMSNorms (class `norms`) run the same way on an `rms_norm` kernel of their row width (its
//! `m` rows per run, the last run padded with zero rows), with the norm's weight vector in the
//! kernel's layout (`vector_f32`) in a BO made once per model. The kernel's epsilon is baked into
//! its code and declared in the manifest (`eps`): a model with another epsilon, a norm without a
//! weight or a width without a kernel runs on the CPU (logged once each). Failures count and
//! retire the kernel exactly as for products.
//!
//! Argument order of the runs is the order of the IRON designs' runtime sequences
//! (`kernels/xdna/iron_ops.py`): matvec `(W, x, y)`, matmul `(X, W, Y)`, rms_norm `(x, w, y)`;
//! the words are laid out by [`unicorn_xdna::cmd::npu_args`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use unicorn_kernels::formats::{bf16_to_f32, f32_to_bf16};
use unicorn_kernels::ops::rms_norm;
use unicorn_kernels::{matmul, KernelError, ThreadPool};
use unicorn_xdna::bo::Bo;
use unicorn_xdna::device::{AccelDevice, Device};
use unicorn_xdna::discover::Report;
use unicorn_xdna::hwctx::QosPriority;
use unicorn_xdna::manifest::{DType, Kernel, Manifest, Op, WeightLayout};
use unicorn_xdna::runtime::{self, Prepared, Runtime};
use unicorn_xdna::XdnaError;

use super::placement::NpuOffer;
use super::weights::Matrix;
use super::ModelError;

/// What NPU discovery found: the report, the kernel manifest (when an NPU is usable) and the
/// offer the placement resolves against (with the runtime running the offered classes).
#[derive(Debug)]
pub struct NpuDiscovery {
    pub report: Report,
    pub manifest: Option<Result<Manifest, String>>,
    pub offer: NpuOffer,
}

/// Discovers the NPU and, when one is usable, loads the kernel manifest
/// ([`Manifest::default_dir`]) and, with `start`, starts the runtime on the device
/// ([`offer_for_manifest`]). Without a usable NPU, or without `start` (no class asks for the
/// NPU: the runtime's heap would pin 48 MiB for nothing), the offer is empty and says why.
pub fn discover_npu(start: bool) -> NpuDiscovery {
    let report = unicorn_xdna::discover::discover();
    let Some(node) = report.usable() else {
        let offer = NpuOffer::none(report.summary());
        return NpuDiscovery { report, manifest: None, offer };
    };
    let manifest = match Manifest::default_dir() {
        None => Err(format!(
            "no kernel manifest (set {} or install {})",
            unicorn_xdna::manifest::DIR_ENV,
            unicorn_xdna::manifest::INSTALLED_DIR
        )),
        Some(dir) => Manifest::load(&dir).map_err(|e| e.to_string()),
    };
    let offer = match &manifest {
        Err(e) => NpuOffer::none(format!("the NPU has no usable kernels ({e})")),
        Ok(m) => {
            let rows = node.info.as_ref().map_or(0, |i| u32::from(i.aie.core.row_count));
            let path = node.path.clone();
            offer_for_manifest(m, rows, start, || {
                AccelDevice::open(&path).map(|d| Arc::new(d) as _)
            })
        }
    };
    NpuDiscovery { report, manifest: Some(manifest), offer }
}

/// The offer for `manifest`'s kernels on the device `open` opens (`core_rows` from its AIE
/// metadata): when some ready kernel is one the engine runs and `start` (some class asks for
/// the NPU), a runtime on that device offering the classes its kernels serve
/// ([`NpuOffer::for_runtime`]: the product classes, and `norms` with an `rms_norm` kernel);
/// otherwise nothing, and why.
pub fn offer_for_manifest(
    manifest: &Manifest,
    core_rows: u32,
    start: bool,
    open: impl FnOnce() -> std::io::Result<Arc<dyn Device>>,
) -> NpuOffer {
    let driven = manifest.ready.iter().filter(|r| drivable(&r.kernel)).count();
    if driven == 0 {
        return NpuOffer::none(format!(
            "no kernel the engine runs is ready ({}; the NPU path runs matvec and matmul \
             kernels with bf16 or f32 activations, and rms_norm kernels with a declared eps)",
            manifest.summary()
        ));
    }
    if !start {
        return NpuOffer::none(format!(
            "{driven} kernel(s) the engine runs are ready, but no operation class is placed on \
             xdna ({}, e.g. attention=xdna,feed_forward=xdna,output=xdna,norms=xdna)",
            super::BACKEND_ENV
        ));
    }
    let dev = match open() {
        Ok(d) => d,
        Err(e) => return NpuOffer::none(format!("the NPU could not be opened for kernels: {e}")),
    };
    match Runtime::new(dev, manifest, core_rows) {
        Ok(rt) => NpuOffer::for_runtime(Arc::new(rt)),
        Err(e) => NpuOffer::none(format!("the NPU runtime could not start: {e}")),
    }
}

/// Whether the engine can drive kernel `k`: a product or a norm it runs.
pub(crate) fn drivable(k: &Kernel) -> bool {
    drivable_product(k) || drivable_norm(k)
}

/// A matvec or matmul with activations and weights the engine converts to.
pub(crate) fn drivable_product(k: &Kernel) -> bool {
    matches!(k.op, Op::Matvec | Op::Matmul)
        && matches!(k.dtype, DType::Bf16 | DType::F32)
        && matches!(k.weights, WeightLayout::RowMajorBf16 | WeightLayout::RowMajorI8RowScale)
}

/// An rms_norm with an f32 weight vector and a declared epsilon (without one, what it computes
/// is unknown, so no model's norm may take it).
pub(crate) fn drivable_norm(k: &Kernel) -> bool {
    k.op == Op::RmsNorm
        && matches!(k.dtype, DType::Bf16 | DType::F32)
        && k.weights == WeightLayout::VectorF32
        && k.eps.is_some()
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

/// A matrix ready to run on a kernel: its prepared command, its weights and the I/O.
#[derive(Debug)]
struct Ready {
    prepared: Prepared,
    op: Op,
    w: Arc<Bo>,
    io: Arc<Io>,
}

impl Ready {
    /// The buffers in the order of the design's runtime sequence (`iron_ops.py`).
    fn bos(&self) -> [&Bo; 3] {
        buffers(self.op, &self.w, &self.io)
    }
}

fn buffers<'a>(op: Op, w: &'a Bo, io: &'a Io) -> [&'a Bo; 3] {
    match op {
        Op::Matmul => [&io.x, w, &io.y],
        Op::RmsNorm => [&io.x, w, &io.y],
        _ => [w, &io.x, &io.y],
    }
}

#[derive(Debug, Default)]
pub(crate) struct State {
    /// Prepared runs by (matrix offset in the file, kernel).
    runs: HashMap<(usize, usize), Arc<Ready>>,
    /// Converted weights by (matrix offset, layout).
    weights: HashMap<(usize, u8), Arc<Bo>>,
    io: HashMap<usize, Arc<Io>>,
    /// Shapes without a kernel, logged once each.
    no_kernel: HashSet<(usize, usize)>,
    /// Matrices whose weights could not be put on the NPU (logged once each): CPU for good.
    cpu_only: HashSet<usize>,
    /// Norms' prepared runs by (weight vector address, kernel), and their weight BOs (with the
    /// values uploaded) by address. The vectors are the model's, alive as long as it; the
    /// values are compared on each use so that a reused address never runs stale weights.
    norm_runs: HashMap<(usize, usize), Arc<Ready>>,
    norm_weights: HashMap<usize, (Vec<f32>, Arc<Bo>)>,
    /// Why norms run on the CPU, each reason logged once.
    norm_cpu: HashSet<String>,
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

/// `m`'s weights in `layout` (see [`encode_weights`]), dequantized by the CPU's code.
pub(crate) fn convert_weights(
    m: &Matrix,
    bytes: &[u8],
    layout: WeightLayout,
) -> Result<Vec<u8>, ConvertError> {
    let view = m.view(bytes)?;
    encode_weights(layout, m.rows, m.cols, |r, row| view.dequantize_row(r, row))
}

/// `rows` rows of `cols` weights, row `r` written by `row(r, buf)`, in `layout`: row-major bf16
/// (rounded to nearest even), or int8 rows (`round(w / s)`, `s = max |w| / 127` per row)
/// followed by the rows' f32 scales. Little-endian.
pub(crate) fn encode_weights(
    layout: WeightLayout,
    rows: usize,
    cols: usize,
    mut row: impl FnMut(usize, &mut [f32]) -> Result<(), KernelError>,
) -> Result<Vec<u8>, ConvertError> {
    let mut buf = vec![0.0f32; cols];
    match layout {
        WeightLayout::RowMajorBf16 => {
            let mut out = Vec::with_capacity(rows * cols * 2);
            for r in 0..rows {
                row(r, &mut buf)?;
                out.extend(buf.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()));
            }
            Ok(out)
        }
        WeightLayout::RowMajorI8RowScale => {
            let mut out = Vec::with_capacity(rows * cols + 4 * rows);
            let mut scales = Vec::with_capacity(rows);
            for r in 0..rows {
                row(r, &mut buf)?;
                let amax = buf.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let s = amax / 127.0;
                let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                out.extend(buf.iter().map(|&v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8));
                scales.push(s);
            }
            out.extend(scales.iter().flat_map(|s| s.to_le_bytes()));
            Ok(out)
        }
        other => Err(ConvertError::Layout(other)),
    }
}

/// The weights of `layout` back as f32 (what the kernel multiplies by).
fn decode_weights(layout: WeightLayout, rows: usize, cols: usize, data: &[u8]) -> Vec<f32> {
    match layout {
        WeightLayout::RowMajorI8RowScale => {
            let (q, s) = data.split_at(rows * cols);
            q.chunks_exact(cols)
                .zip(s.chunks_exact(4))
                .flat_map(|(row, s)| {
                    let s = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                    row.iter().map(move |&v| f32::from(v as i8) * s)
                })
                .collect()
        }
        _ => data.chunks_exact(2).map(|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
    }
}

/// One kernel against the CPU on random inputs: the hardware test's per-kernel row.
#[derive(Clone, Debug)]
pub struct KernelCheck {
    pub name: String,
    /// Largest |NPU - CPU| over the outputs, and the largest |CPU| (its scale).
    pub max_abs_err: f32,
    pub max_abs_ref: f32,
    /// Median wall time of one NPU run (input upload, run, output download) and of the CPU's
    /// f32 product of the same weights, in microseconds.
    pub npu_us: f64,
    pub cpu_us: f64,
}

/// Uniform values in [-1, 1) from `seed` (xorshift64*).
fn uniform(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed | 1;
    move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs kernel `i` of `rt` `reps` times on random weights and inputs (seeded) and compares its
/// output with the CPU's f32 result on the values as the kernel receives them (so the
/// difference is the kernel's, not the conversion's): a product against an f32 product of the
/// weights as its layout holds them, an rms_norm against an f32 RMSNorm with the kernel's
/// declared eps. On the test double nothing is computed and the outputs stay zero: the error
/// then equals the reference's size.
pub fn check_kernel(
    rt: &Runtime,
    i: usize,
    reps: usize,
    seed: u64,
) -> Result<KernelCheck, XdnaError> {
    let k = rt.kernel(i).ok_or_else(|| XdnaError::Invalid(format!("no kernel {i}")))?.clone();
    if drivable_norm(&k) {
        return check_norm(rt, i, &k, reps, seed);
    }
    if !drivable_product(&k) {
        return Err(XdnaError::Invalid(format!(
            "kernel {} is not a product or norm the engine runs",
            k.name
        )));
    }
    let (m, kk, n) = (k.shape.m as usize, k.shape.k as usize, k.shape.n as usize);
    let mut rand = uniform(seed);
    let scale = 1.0 / (kk as f32).sqrt();
    let wdata = encode_weights(k.weights, m, kk, |_, row| {
        row.iter_mut().for_each(|v| *v = rand() * scale);
        Ok(())
    })
    .map_err(|e| XdnaError::Invalid(e.to_string()))?;
    let w = decode_weights(k.weights, m, kk, &wdata);
    let x: Vec<f32> = (0..n * kk).map(|_| rand()).collect();
    let d = k.dtype;
    let mut xb = vec![0u8; n * kk * elem_bytes(d)];
    encode_acts(d, &x, &mut xb);
    let mut xr = vec![0.0f32; n * kk];
    decode_acts(d, &xb, &mut xr);
    measure(rt, i, &k, &wdata, &xb, n * m, reps, |want| {
        for (t, xrow) in xr.chunks_exact(kk).enumerate() {
            for (r, wrow) in w.chunks_exact(kk).enumerate() {
                want[t * m + r] = wrow.iter().zip(xrow).map(|(a, b)| a * b).sum();
            }
        }
    })
}

/// Runs kernel `i` (`k`) `reps` times on the weights `wdata` and the encoded activations `xb`,
/// its `out_len` outputs against `cpu`'s (timed as often), both times medians.
#[allow(clippy::too_many_arguments)]
fn measure(
    rt: &Runtime,
    i: usize,
    k: &Kernel,
    wdata: &[u8],
    xb: &[u8],
    out_len: usize,
    reps: usize,
    mut cpu: impl FnMut(&mut [f32]),
) -> Result<KernelCheck, XdnaError> {
    let d = k.dtype;
    let out_bytes = out_len * elem_bytes(d);
    let (wbo, xbo, ybo) = (rt.shmem(wdata.len())?, rt.shmem(xb.len())?, rt.shmem(out_bytes)?);
    runtime::upload(&wbo, wdata)?;
    let io = Io { x: xbo, y: ybo };
    let bos = buffers(k.op, &wbo, &io);
    let qos = QosPriority::Normal;
    let p = rt.prepare(i, qos, &bos)?;
    let mut yb = vec![0u8; out_bytes];
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let t = std::time::Instant::now();
        runtime::upload(&io.x, xb)?;
        rt.run(&p, qos, &bos)?;
        runtime::download(&io.y, &mut yb)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mut y = vec![0.0f32; out_len];
    decode_acts(d, &yb, &mut y);
    let mut want = vec![0.0f32; out_len];
    let mut cpu_times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let t = std::time::Instant::now();
        cpu(&mut want);
        cpu_times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(KernelCheck {
        name: k.name.clone(),
        max_abs_err: y.iter().zip(&want).fold(0.0f32, |a, (p, q)| a.max((p - q).abs())),
        max_abs_ref: want.iter().fold(0.0f32, |a, v| a.max(v.abs())),
        npu_us: median(&mut times),
        cpu_us: median(&mut cpu_times),
    })
}

/// [`check_kernel`] of rms_norm kernel `i` (`k`): `m` random rows of `k` values, a random
/// weight vector around 1.
fn check_norm(
    rt: &Runtime,
    i: usize,
    k: &Kernel,
    reps: usize,
    seed: u64,
) -> Result<KernelCheck, XdnaError> {
    let (rows, dim, d) = (k.shape.m as usize, k.shape.k as usize, k.dtype);
    let eps = k.eps.ok_or_else(|| XdnaError::Invalid(format!("{}: no eps", k.name)))?;
    let mut rand = uniform(seed);
    let w: Vec<f32> = (0..dim).map(|_| 1.0 + 0.5 * rand()).collect();
    let x: Vec<f32> = (0..rows * dim).map(|_| rand()).collect();
    let mut xb = vec![0u8; rows * dim * elem_bytes(d)];
    encode_acts(d, &x, &mut xb);
    let mut xr = vec![0.0f32; rows * dim];
    decode_acts(d, &xb, &mut xr);
    let wdata: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    measure(rt, i, k, &wdata, &xb, rows * dim, reps, |want| rms_norm(&xr, want, dim, Some(&w), eps))
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
                && drivable_product(k)
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
        let per = kernel.shape.n as usize;
        self.run_rows(k, &kernel, &ready, per, (x, m.cols), (&mut out[..n * m.rows], m.rows))
    }

    /// Runs kernel `k`'s prepared run over the rows of `x` (`in_w` values each), `per` rows a
    /// run (the last run padded with zeros), into the rows of `out` (`out_w` values each).
    fn run_rows(
        &self,
        k: usize,
        kernel: &Kernel,
        ready: &Ready,
        per: usize,
        (x, in_w): (&[f32], usize),
        (out, out_w): (&mut [f32], usize),
    ) -> Result<(), Miss> {
        let d = kernel.dtype;
        let bos = ready.bos();
        let mut xb = vec![0u8; per * in_w * elem_bytes(d)];
        let mut yb = vec![0u8; per * out_w * elem_bytes(d)];
        let fail = |e| Miss::Failed(k, e);
        let rows = out.len() / out_w;
        for r0 in (0..rows).step_by(per) {
            let r = per.min(rows - r0);
            encode_acts(d, &x[r0 * in_w..(r0 + r) * in_w], &mut xb);
            runtime::upload(&ready.io.x, &xb).map_err(fail)?;
            self.rt.run(&ready.prepared, self.qos, &bos).map_err(fail)?;
            runtime::download(&ready.io.y, &mut yb).map_err(fail)?;
            decode_acts(d, &yb, &mut out[r0 * out_w..(r0 + r) * out_w]);
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
    ) -> Result<Arc<Ready>, Miss> {
        let key = (m.offset(), k);
        if let Some(r) = self.state.runs.get(&key) {
            return Ok(Arc::clone(r));
        }
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
        let bos = buffers(kernel.op, &w, &io);
        let prepared = self.rt.prepare(k, self.qos, &bos).map_err(|e| Miss::Failed(k, e))?;
        let ready = Arc::new(Ready { prepared, op: kernel.op, w, io });
        self.state.runs.insert(key, Arc::clone(&ready));
        Ok(ready)
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
        // A product runs `n` tokens of `k` in, `m` out; a norm `m` rows of `k` in and out.
        let (xn, yn) = match kernel.op {
            Op::RmsNorm => (s.m as usize * s.k as usize, s.m as usize * s.k as usize),
            _ => (s.n as usize * s.k as usize, s.n as usize * s.m as usize),
        };
        let x = self.rt.shmem(xn * e)?;
        let y = self.rt.shmem(yn * e)?;
        let io = Arc::new(Io { x, y });
        self.state.io.insert(k, Arc::clone(&io));
        Ok(io)
    }

    /// RMSNorm of the rows of `dim` values of `x` into `out`, times `w` (eps `eps`): on the NPU
    /// when an rms_norm kernel of that width and epsilon is usable, else on the CPU (a failed
    /// run is counted and retires its kernel like a product's).
    pub fn norm(&mut self, x: &[f32], out: &mut [f32], dim: usize, w: Option<&[f32]>, eps: f32) {
        match self.try_norm(x, out, dim, w, eps) {
            Ok(()) => return,
            Err(Miss::NoKernel) => {}
            Err(Miss::Failed(k, e)) => {
                self.rt.failed(k, &e);
            }
        }
        rms_norm(x, out, dim, w, eps);
    }

    /// Logs `why` (a norm runs on the CPU) the first time.
    fn norm_on_cpu(&mut self, why: String) -> Miss {
        if self.state.norm_cpu.insert(why.clone()) {
            log::info!("npu: {why}; it runs on the cpu");
        }
        Miss::NoKernel
    }

    fn try_norm(
        &mut self,
        x: &[f32],
        out: &mut [f32],
        dim: usize,
        w: Option<&[f32]>,
        eps: f32,
    ) -> Result<(), Miss> {
        let Some(w) = w else {
            // The kernel always multiplies by a weight vector.
            return Err(self.norm_on_cpu(format!("a norm of width {dim} has no weight")));
        };
        let width = |k: &Kernel| k.op == Op::RmsNorm && k.shape.k as usize == dim;
        let found = self.rt.kernels().enumerate().position(|(i, k)| {
            width(k) && drivable_norm(k) && k.eps == Some(eps) && self.rt.usable(i)
        });
        let Some(k) = found else {
            let other_eps: Vec<String> = self
                .rt
                .kernels()
                .enumerate()
                .filter(|&(i, k)| width(k) && drivable_norm(k) && self.rt.usable(i))
                .map(|(_, k)| format!("{} computes with eps {:e}", k.name, k.eps.unwrap_or(0.0)))
                .collect();
            let why = if other_eps.is_empty() {
                format!("no usable rms_norm kernel of width {dim}")
            } else {
                format!(
                    "the model's norm eps is {eps:e}, but {} (baked into the kernel)",
                    other_eps.join(", ")
                )
            };
            return Err(self.norm_on_cpu(why));
        };
        let kernel = self.rt.kernel(k).expect("found above").clone();
        let ready = self.norm_ready(w, k, &kernel)?;
        let per = kernel.shape.m as usize;
        let rows = x.len() / dim;
        self.run_rows(k, &kernel, &ready, per, (x, dim), (&mut out[..rows * dim], dim))
    }

    /// The norm of weight `w`'s prepared run on kernel `k`, made on first use: the weight
    /// uploaded as the kernel's f32 vector, I/O BOs made, the command packet written.
    fn norm_ready(&mut self, w: &[f32], k: usize, kernel: &Kernel) -> Result<Arc<Ready>, Miss> {
        let addr = w.as_ptr() as usize;
        if self.state.norm_weights.get(&addr).is_some_and(|(v, _)| v.as_slice() != w) {
            self.state.norm_weights.remove(&addr);
            self.state.norm_runs.retain(|&(a, _), _| a != addr);
        }
        if let Some(r) = self.state.norm_runs.get(&(addr, k)) {
            return Ok(Arc::clone(r));
        }
        let wbo = match self.state.norm_weights.get(&addr) {
            Some((_, b)) => Arc::clone(b),
            None => {
                let data: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
                let bo = self.rt.shmem(data.len()).and_then(|bo| {
                    runtime::upload(&bo, &data)?;
                    Ok(bo)
                });
                let bo = Arc::new(bo.map_err(|e| Miss::Failed(k, e))?);
                self.state.norm_weights.insert(addr, (w.to_vec(), Arc::clone(&bo)));
                bo
            }
        };
        let io = self.io(k, kernel).map_err(|e| Miss::Failed(k, e))?;
        let bos = buffers(kernel.op, &wbo, &io);
        let prepared = self.rt.prepare(k, self.qos, &bos).map_err(|e| Miss::Failed(k, e))?;
        let ready = Arc::new(Ready { prepared, op: kernel.op, w: wbo, io });
        self.state.norm_runs.insert((addr, k), Arc::clone(&ready));
        Ok(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unicorn_xdna::fake::FakeDevice;
    use unicorn_xdna::manifest::{Ready as ReadyKernel, Shape};
    use unicorn_xdna::xclbin::{build, Xclbin};

    /// An rms_norm kernel of width 4, 2 rows per run, eps 1e-5, on a fake device.
    fn norm_runtime() -> (Arc<FakeDevice>, Arc<Runtime>) {
        let kernel = Kernel {
            name: "norm4".into(),
            op: Op::RmsNorm,
            xclbin: "build/norm4.xclbin".into(),
            instructions: "build/norm4.insts.bin".into(),
            cu: "MLIR_AIE".into(),
            shape: Shape { m: 2, k: 4, n: 1 },
            dtype: DType::Bf16,
            weights: WeightLayout::VectorF32,
            columns: 1,
            source: None,
            eps: Some(1e-5),
        };
        let ready = ReadyKernel {
            kernel,
            xclbin: Xclbin::parse(&build::npu_xclbin(&["MLIR_AIE"], 1, 256)).unwrap(),
            instructions: vec![0; 64],
        };
        let fake = Arc::new(FakeDevice::new());
        let m = Manifest { dir: "test".into(), ready: vec![ready], unusable: Vec::new() };
        let rt = Arc::new(Runtime::new(fake.clone(), &m, 4).unwrap());
        (fake, rt)
    }

    /// A norm without a weight, of a width without a kernel, or of another eps runs on the
    /// CPU (its exact result) without a submission, each reason recorded once; a norm the
    /// kernel fits is submitted in runs of the kernel's rows.
    #[test]
    fn norms_the_kernel_does_not_fit_run_on_the_cpu_once_logged() {
        let (fake, rt) = norm_runtime();
        let npu = Npu::new(rt);
        let mut pass = npu.pass(QosPriority::Normal);
        let x: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
        let w = [0.5f32, 1.0, 1.5, 2.0];
        let w6 = [1.0f32; 6];
        let cases: [(usize, Option<&[f32]>, f32); 3] =
            [(4, None, 1e-5), (6, Some(&w6), 1e-5), (4, Some(&w), 1e-6)];
        for _ in 0..2 {
            for (dim, wt, eps) in cases {
                let (mut got, mut want) = (vec![7.0f32; 12], vec![0.0f32; 12]);
                pass.norm(&x, &mut got, dim, wt, eps);
                rms_norm(&x, &mut want, dim, wt, eps);
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{dim}");
            }
        }
        assert!(fake.submissions().is_empty());
        let why: Vec<&String> = pass.state.norm_cpu.iter().collect();
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(why.iter().any(|w| w.contains("has no weight")), "{why:?}");
        assert!(why.iter().any(|w| w.contains("no usable rms_norm kernel of width 6")), "{why:?}");
        assert!(why.iter().any(|w| w.contains("norm4 computes with eps 1e-5")), "{why:?}");
        // Fits: 3 rows of 4 in runs of 2 rows.
        let mut out = vec![0.0f32; 12];
        let mut w = w;
        let weight_bo = |fake: &FakeDevice| {
            let subs = fake.submissions();
            let unicorn_xdna::cmd::Packet::StartNpu { run, .. } = &subs.last().unwrap().packet
            else {
                panic!("not a run")
            };
            let a = unicorn_xdna::cmd::npu_arg_addrs(&run.args).unwrap()[1];
            fake.bo_bytes(fake.bo_at(a).unwrap().0).unwrap()
        };
        let f32s = |w: &[f32]| w.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        pass.norm(&x, &mut out, 4, Some(&w), 1e-5);
        assert_eq!(fake.submissions().len(), 2);
        assert_eq!(pass.rt.stats().runs, 2);
        assert_eq!(weight_bo(&fake), f32s(&w));
        // The same vector with new values is uploaded again, not served stale.
        w[0] = -3.0;
        pass.norm(&x, &mut out, 4, Some(&w), 1e-5);
        assert_eq!(fake.submissions().len(), 4);
        assert_eq!(weight_bo(&fake), f32s(&w));
    }
}
