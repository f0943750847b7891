//! A forward step's work in as few submissions as the host's needs allow.
//!
//! A [`Step`] owns everything its dispatches touch: weights (uploaded once, kept for the step's
//! life) and scratch tensors (handed out in order during a step and reused, by that order, in the
//! next one, so a decode loop allocates nothing after its first step). Operations are recorded
//! into one command buffer; nothing runs until the host needs a result ([`Step::read`]) or asks
//! ([`Step::flush`]): then the recording is submitted once and waited for once. Intermediate
//! activations never leave the device.
//!
//! Since the step owns every buffer a recording names, no buffer can be freed while the device
//! still uses it; tensors carry the step generation they belong to, so a stale handle is an
//! error rather than a read of another step's data.

use std::fmt;
use std::sync::Arc;

use ash::vk;
use unicorn_kernels::attention::AttnParams;
use unicorn_kernels::ops::Rope;
use unicorn_kernels::GgmlType;

use crate::buffer::WeightBuffer;
use crate::error::{Result, VulkanError};
use crate::kv::{KvCache, KvMem};
use crate::ops::{to_u32, Plan, OP_ADD, OP_MUL};
use crate::recorder::Recorder;
use crate::shaders::Kernel;
use crate::{Buffer, Context};

/// The environment variable that turns on per-dispatch device timing (`UNICORN_VULKAN_TIMING=1`).
pub const TIMING_ENV: &str = "UNICORN_VULKAN_TIMING";

/// A weight (or any constant) uploaded to a [`Step`] for the step's whole life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weight(u32);

/// A scratch tensor of f32 values on the device, valid during the step that handed it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tensor {
    idx: u32,
    generation: u64,
    len: usize,
}

impl Tensor {
    /// Values it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where the rows of a (possibly split) weight matrix land in a product's output: rows
/// `first..first + rows` of an output of `of` values per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutRows {
    pub first: usize,
    pub of: usize,
}

/// What a step cost, counted since the step object was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepStats {
    /// Submissions (each waited for once).
    pub submits: u64,
    /// Dispatches recorded and submitted.
    pub dispatches: u64,
    /// Host-to-device copies of activations ([`Step::upload`]).
    pub uploads: u64,
    /// Device-to-host copies of activations ([`Step::read`]).
    pub downloads: u64,
}

/// Device time of one kind of operation, summed over the dispatches measured.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    /// The shader variant, e.g. `mul_mv_q4_k`, `rms_norm`.
    pub op: String,
    /// Dispatches measured.
    pub count: u64,
    /// Nanoseconds, from the queue's timestamps.
    pub ns: f64,
}

/// See the module documentation.
pub struct Step<'c> {
    ctx: &'c Context,
    rec: Recorder,
    weights: Vec<WeightBuffer<'c>>,
    /// A word bound where a shader's optional input is absent.
    unused: Buffer<'c>,
    scratch: Vec<Buffer<'c>>,
    /// The KV caches the current recording names, held until it is submitted and waited for
    /// (or dropped), so that a cache dropped meanwhile is freed only then.
    keep: Vec<Arc<KvMem<'c>>>,
    /// Scratch buffers handed out in the current step.
    used: usize,
    generation: u64,
    stats: StepStats,
    /// Per kernel (by [`Kernel::index`]): dispatches and nanoseconds since the last
    /// [`Step::take_timings`].
    times: Vec<(u64, f64)>,
}

impl fmt::Debug for Step<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("weights", &self.weights.len())
            .field("scratch", &self.scratch.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        // Every submission was waited for, so nothing of the recorder is in use.
        self.rec.destroy(self.ctx);
    }
}

/// Whether `UNICORN_VULKAN_TIMING=1`.
pub fn timing_from_env() -> bool {
    std::env::var(TIMING_ENV).is_ok_and(|v| v == "1")
}

impl<'c> Step<'c> {
    /// A step on `ctx`. With `timing`, every dispatch is timed with the queue's timestamps when it
    /// has them ([`Context::timestamp_period_ns`]); otherwise timing is silently off.
    pub fn new(ctx: &'c Context, timing: bool) -> Result<Step<'c>> {
        let rec = Recorder::new(ctx, timing)?;
        let unused = match Buffer::zeroed(ctx, 4) {
            Ok(b) => b,
            Err(e) => {
                let mut rec = rec;
                rec.destroy(ctx);
                return Err(e);
            }
        };
        let mut step = Step {
            ctx,
            rec,
            weights: Vec::new(),
            unused,
            scratch: Vec::new(),
            keep: Vec::new(),
            used: 0,
            generation: 0,
            stats: StepStats::default(),
            times: vec![(0, 0.0); Kernel::COUNT],
        };
        step.begin()?;
        Ok(step)
    }

    /// The context.
    pub fn context(&self) -> &'c Context {
        self.ctx
    }

    /// Whether dispatches are being timed.
    pub fn timed(&self) -> bool {
        self.rec.timed()
    }

    /// Uploads `bytes` (e.g. a weight tensor in its GGUF layout) for the step's life, into
    /// device-local memory: mapped where the device shares memory with the host, through a
    /// staging buffer otherwise or with [`crate::Options::force_staging`]
    /// ([`crate::choose_weight_memory`]). A staged upload submits and waits per chunk; it does
    /// not touch the step's recording.
    pub fn weight(&mut self, bytes: &[u8]) -> Result<Weight> {
        let idx = u32::try_from(self.weights.len())
            .map_err(|_| VulkanError::Shape("too many weights".into()))?;
        self.weights.push(WeightBuffer::upload(self.ctx, bytes)?);
        Ok(Weight(idx))
    }

    /// Weights of this step that went through a staging buffer (not mapped by the host).
    pub fn staged_weights(&self) -> usize {
        self.weights.iter().filter(|w| w.staged()).count()
    }

    /// Uploads `values` for the step's life.
    pub fn weight_f32(&mut self, values: &[f32]) -> Result<Weight> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
        self.weight(&bytes)
    }

    /// Starts a step: the previous step's tensors become invalid and their buffers are handed out
    /// again. A recording that was never submitted is dropped.
    pub fn begin(&mut self) -> Result<()> {
        self.generation += 1;
        self.used = 0;
        self.rec.begin(self.ctx)?;
        // The old recording is reset: nothing names the caches it held any more.
        self.keep.clear();
        Ok(())
    }

    /// KV caches held by the current recording (see [`Step::kv_store`]).
    pub fn held_kv_caches(&self) -> usize {
        self.keep.len()
    }

    /// A scratch tensor of `len` values for this step; its contents are unspecified until a
    /// dispatch writes it.
    pub fn tensor(&mut self, len: usize) -> Result<Tensor> {
        let bytes = len
            .checked_mul(4)
            .ok_or_else(|| VulkanError::Shape(format!("a tensor of {len} values")))?;
        let idx = self.used;
        // The buffer at `idx` is not named by any recorded dispatch of this step (it is handed out
        // now for the first time in this step) nor pending from an earlier one (every submission
        // is waited for): it may be replaced.
        match self.scratch.get(idx) {
            Some(b) if b.len() >= bytes => {}
            Some(_) => self.scratch[idx] = Buffer::zeroed(self.ctx, bytes)?,
            None => self.scratch.push(Buffer::zeroed(self.ctx, bytes)?),
        }
        self.used += 1;
        let idx = u32::try_from(idx).map_err(|_| VulkanError::Shape("too many tensors".into()))?;
        Ok(Tensor { idx, generation: self.generation, len })
    }

    /// A new tensor holding `values`. It is written now, which is sound while recording because
    /// no dispatch recorded so far names a tensor handed out after it.
    pub fn upload(&mut self, values: &[f32]) -> Result<Tensor> {
        self.upload_words(values.iter().map(|v| v.to_ne_bytes()))
    }

    /// A new tensor of `values.len()` 32-bit words holding `values` (e.g. token positions for
    /// [`Step::rope`]); written now, as [`Step::upload`].
    pub fn upload_u32(&mut self, values: &[u32]) -> Result<Tensor> {
        self.upload_words(values.iter().map(|v| v.to_ne_bytes()))
    }

    fn upload_words(&mut self, words: impl ExactSizeIterator<Item = [u8; 4]>) -> Result<Tensor> {
        let t = self.tensor(words.len())?;
        let buf = &mut self.scratch[t.idx as usize];
        for (o, w) in buf.as_bytes_mut().chunks_exact_mut(4).zip(words) {
            o.copy_from_slice(&w);
        }
        self.stats.uploads += 1;
        Ok(t)
    }

    /// Copies `t` into `out` (of `t.len()` values), first submitting and waiting for what is
    /// recorded when anything is.
    pub fn read(&mut self, t: Tensor, out: &mut [f32]) -> Result<()> {
        self.check(t, "read")?;
        if out.len() != t.len {
            return Err(VulkanError::Shape(format!(
                "reading a tensor of {} values into {}",
                t.len,
                out.len()
            )));
        }
        self.flush()?;
        let src = &self.scratch[t.idx as usize].as_bytes()[..t.len * 4];
        for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
            *o = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        }
        self.stats.downloads += 1;
        Ok(())
    }

    /// Submits what is recorded (if anything), waits for it, and starts a new recording in the
    /// same step (tensors stay valid).
    pub fn flush(&mut self) -> Result<()> {
        if self.rec.dispatches() == 0 {
            return Ok(());
        }
        let n = self.rec.dispatches() as u64;
        let times = self.rec.submit(self.ctx);
        // A new recording even after an error, so that the step stays usable.
        let begun = self.rec.begin(self.ctx);
        let times = times?;
        // Waited for: the device is done with every cache the recording named.
        self.keep.clear();
        begun?;
        self.stats.submits += 1;
        self.stats.dispatches += n;
        for (k, ns) in times {
            let e = &mut self.times[k.index()];
            e.0 += 1;
            e.1 += ns;
        }
        Ok(())
    }

    /// Submissions, dispatches and transfers so far.
    pub fn stats(&self) -> StepStats {
        self.stats
    }

    /// Device time per kind of operation since the last call, largest first (empty when not
    /// [`Step::timed`]).
    pub fn take_timings(&mut self) -> Vec<OpTime> {
        let sg = self.ctx.info().subgroup_arithmetic;
        let mut out: Vec<OpTime> = Kernel::all()
            .filter_map(|k| {
                let (count, ns) = std::mem::take(&mut self.times[k.index()]);
                (count > 0).then(|| OpTime { op: k.spirv_name(sg), count, ns })
            })
            .collect();
        out.sort_by(|a, b| b.ns.total_cmp(&a.ns));
        out
    }

    fn check(&self, t: Tensor, what: &str) -> Result<()> {
        if t.generation != self.generation || t.idx as usize >= self.used {
            return Err(VulkanError::Shape(format!("{what}: a tensor of another step")));
        }
        Ok(())
    }

    fn weight_buf(&self, w: Weight) -> Result<&WeightBuffer<'c>> {
        self.weights
            .get(w.0 as usize)
            .ok_or_else(|| VulkanError::Shape(format!("no weight {}", w.0)))
    }

    /// Records `plan` on the buffers of `args` at bindings 0, 1, 2; the caller has checked that
    /// no tensor it writes is also one it reads.
    fn record_args(&mut self, plan: Plan, args: [Arg; 3]) -> Result<()> {
        let mut raw = [self.unused.raw(); 3];
        for (slot, arg) in raw.iter_mut().zip(args) {
            *slot = match arg {
                Arg::T(t) => {
                    self.check(t, "input")?;
                    self.scratch[t.idx as usize].raw()
                }
                Arg::W(w) => self.weight_buf(w)?.raw(),
                Arg::Raw(b) => b,
                Arg::None => self.unused.raw(),
            };
        }
        // Every buffer named is owned by the step (or held in `keep`) and outlives the
        // submission, which `flush` waits for.
        self.rec.dispatch(self.ctx, plan.kernel, raw, &plan.push, plan.groups)
    }

    /// Holds `kv`'s memory for the current recording; its raw buffer `buf`.
    fn hold(&mut self, kv: &mut KvCache<'c>, buf: usize) -> vk::Buffer {
        let mem = kv.share();
        let raw = mem.raw(buf);
        if !self.keep.iter().any(|m| Arc::ptr_eq(m, &mem)) {
            self.keep.push(mem);
        }
        raw
    }

    /// RoPE in place on `x`, `n_tokens` tokens of heads of `head_dim` values, token `t` at the
    /// position `pos[t]` (a tensor of u32 words, [`Step::upload_u32`]); as
    /// [`Context::rope`].
    pub fn rope(
        &mut self,
        rope: &Rope,
        x: Tensor,
        head_dim: usize,
        pos: Tensor,
        n_tokens: usize,
    ) -> Result<()> {
        if pos.len != n_tokens || pos.idx == x.idx {
            return Err(VulkanError::Shape(format!(
                "rope: {} positions for {n_tokens} tokens (a tensor of their own)",
                pos.len
            )));
        }
        let Some(plan) = self.ctx.plan_rope(rope, x.len, head_dim, n_tokens)? else {
            return Ok(());
        };
        self.record_args(plan, [Arg::T(x), Arg::T(pos), Arg::None])
    }

    /// Stores the keys `k` and values `v` of tokens `tok0..tok0 + n_tok` (rows of
    /// `n_kv_head x head_dim` values of the tensors) at positions `pos0..pos0 + n_tok` of layer
    /// `layer` of `kv`, as [`Context::kv_store`]. The step holds `kv`'s memory until this
    /// recording is submitted and waited for, or dropped.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_store(
        &mut self,
        kv: &mut KvCache<'c>,
        layer: usize,
        k: Tensor,
        v: Tensor,
        tok0: usize,
        n_tok: usize,
        pos0: usize,
    ) -> Result<()> {
        let kvd = kv.shape().n_kv_head * kv.shape().head_dim;
        if k.len != v.len {
            return Err(VulkanError::Shape("kv_store: K and V of different lengths".into()));
        }
        let off = tok0.checked_mul(kvd).ok_or_else(|| VulkanError::Shape("kv_store".into()))?;
        let Some(plan) = self.ctx.plan_kv_store(kv, layer, n_tok, k.len, off, pos0)? else {
            return Ok(());
        };
        let buf = kv.at(layer)?.buf;
        let cache = self.hold(kv, buf);
        self.record_args(plan, [Arg::T(k), Arg::T(v), Arg::Raw(cache)])
    }

    /// Attention of query tokens `tok0..tok0 + n_q` of `q` (rows of `p.n_head x head_dim`)
    /// over layer `layer` of `kv`, into the same rows of `out`; the first at position `p.pos0`
    /// (as [`Context::attention`]). The step holds `kv`'s memory as in [`Step::kv_store`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &mut self,
        q: Tensor,
        kv: &mut KvCache<'c>,
        layer: usize,
        p: &AttnParams,
        tok0: usize,
        n_q: usize,
        out: Tensor,
    ) -> Result<()> {
        if q.idx == out.idx {
            return Err(VulkanError::Shape("an output that is also an input".into()));
        }
        self.check(out, "output")?;
        let per = p.n_head.checked_mul(kv.shape().head_dim);
        let off = per.and_then(|n| n.checked_mul(tok0));
        let off = off.ok_or_else(|| VulkanError::Shape("attention offset".into()))?;
        let Some(plan) = self.ctx.plan_attention(kv, layer, p, n_q, q.len, off, out.len)? else {
            return Ok(());
        };
        let buf = kv.at(layer)?.buf;
        let cache = self.hold(kv, buf);
        self.record_args(plan, [Arg::T(q), Arg::Raw(cache), Arg::T(out)])
    }

    /// `dst[dst_off..][..n] = src[src_off..][..n]` (gathering rows on the device).
    pub fn copy(
        &mut self,
        src: Tensor,
        src_off: usize,
        dst: Tensor,
        dst_off: usize,
        n: usize,
    ) -> Result<()> {
        let fits = |off: usize, len: usize| off.checked_add(n).is_some_and(|e| e <= len);
        if src.idx == dst.idx || !fits(src_off, src.len) || !fits(dst_off, dst.len) {
            return Err(VulkanError::Shape(format!(
                "copy of {n} values at {src_off} of {} to {dst_off} of {} (another tensor)",
                src.len, dst.len
            )));
        }
        self.check(dst, "output")?;
        if n == 0 {
            return Ok(());
        }
        let n32 = to_u32("copy length", n)?;
        let push = vec![n32, to_u32("copy source", src_off)?, to_u32("copy target", dst_off)?];
        let plan = Plan {
            kernel: crate::shaders::Kernel::Copy,
            push,
            groups: [self.ctx.stride_groups(n32), 1, 1],
        };
        self.record_args(plan, [Arg::T(src), Arg::None, Arg::T(dst)])
    }

    /// Records `plan` reading `inputs` and writing `out`, which must not be one of them.
    fn record(&mut self, plan: Plan, inputs: [Arg; 2], out: Tensor) -> Result<()> {
        self.check(out, "output")?;
        let mut raw = [self.unused.raw(); 3];
        for (slot, arg) in raw.iter_mut().zip(inputs) {
            *slot = match arg {
                Arg::T(t) => {
                    self.check(t, "input")?;
                    if t.idx == out.idx {
                        return Err(VulkanError::Shape("an output that is also an input".into()));
                    }
                    self.scratch[t.idx as usize].raw()
                }
                Arg::W(w) => self.weight_buf(w)?.raw(),
                Arg::Raw(b) => b,
                Arg::None => self.unused.raw(),
            };
        }
        raw[2] = self.scratch[out.idx as usize].raw();
        // Every buffer named is owned by the step and outlives the submission, which `flush`
        // waits for.
        self.rec.dispatch(self.ctx, plan.kernel, raw, &plan.push, plan.groups)
    }

    /// `out[t * o.of + o.first + r] = dot(W[r], x[t])` for the `n_tokens` vectors of `cols`
    /// values in `x`, with the `rows x cols` weights of type `ty` in `w` (see
    /// [`Context::matmul`]).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &mut self,
        ty: GgmlType,
        w: Weight,
        rows: usize,
        cols: usize,
        x: Tensor,
        n_tokens: usize,
        out: Tensor,
        o: OutRows,
    ) -> Result<()> {
        let wb = self.weight_buf(w)?;
        let (w_len, w_padded) = (wb.len(), wb.padded_size());
        let plan = self.ctx.plan_matmul(ty, w_len, w_padded, rows, cols, x.len, n_tokens)?;
        let Some(plan) = plan else { return Ok(()) };
        let need = n_tokens.checked_mul(o.of);
        if o.first.checked_add(rows).is_none_or(|end| end > o.of) || need != Some(out.len) {
            return Err(VulkanError::Shape(format!(
                "{rows} rows at {} of an output of {} x {n_tokens} in a tensor of {}",
                o.first, o.of, out.len
            )));
        }
        let u32_of = |what, v: usize| {
            u32::try_from(v).map_err(|_| VulkanError::Limit {
                what,
                value: v as u64,
                limit: u32::MAX.into(),
            })
        };
        if o.of == rows {
            return self.record(plan, [Arg::W(w), Arg::T(x)], out);
        }
        // Rows of a split matrix: one dispatch per token, each at its place in the output.
        for t in 0..n_tokens {
            let mut p = Plan { kernel: plan.kernel, push: plan.push.clone(), groups: plan.groups };
            p.push[4] = u32_of("input offset", t * cols)?;
            p.push[5] = u32_of("output offset", t * o.of + o.first)?;
            p.groups[2] = 1;
            self.record(p, [Arg::W(w), Arg::T(x)], out)?;
        }
        Ok(())
    }

    /// RMSNorm of each row of `dim` values of `x` into `out`, times `w` when given.
    pub fn rms_norm(
        &mut self,
        x: Tensor,
        dim: usize,
        w: Option<Weight>,
        eps: f32,
        out: Tensor,
    ) -> Result<()> {
        let w_len = w.map(|w| self.weight_buf(w).map(|b| b.len() / 4)).transpose()?;
        same_len(x, out)?;
        let Some(plan) = self.ctx.plan_rms_norm(x.len, dim, w_len, eps)? else { return Ok(()) };
        self.record(plan, [Arg::T(x), w.map_or(Arg::None, Arg::W)], out)
    }

    /// `out = a + b`.
    pub fn add(&mut self, a: Tensor, b: Tensor, out: Tensor) -> Result<()> {
        self.elementwise(Kernel::Binary, a, b, Some(OP_ADD), out)
    }

    /// `out = a * b`.
    pub fn mul(&mut self, a: Tensor, b: Tensor, out: Tensor) -> Result<()> {
        self.elementwise(Kernel::Binary, a, b, Some(OP_MUL), out)
    }

    /// `out = silu(gate) * up`.
    pub fn swiglu(&mut self, gate: Tensor, up: Tensor, out: Tensor) -> Result<()> {
        self.elementwise(Kernel::Swiglu, gate, up, None, out)
    }

    /// `out = gelu_tanh(gate) * up`.
    pub fn geglu(&mut self, gate: Tensor, up: Tensor, out: Tensor) -> Result<()> {
        self.elementwise(Kernel::Geglu, gate, up, None, out)
    }

    fn elementwise(
        &mut self,
        k: Kernel,
        a: Tensor,
        b: Tensor,
        op: Option<u32>,
        out: Tensor,
    ) -> Result<()> {
        same_len(a, out)?;
        let Some(plan) = self.ctx.plan_elementwise(k, a.len, b.len, op)? else { return Ok(()) };
        self.record(plan, [Arg::T(a), Arg::T(b)], out)
    }
}

/// A dispatch input.
#[derive(Clone, Copy)]
enum Arg {
    T(Tensor),
    W(Weight),
    /// A buffer the step holds otherwise (a KV cache in `keep`).
    Raw(vk::Buffer),
    None,
}

fn same_len(x: Tensor, out: Tensor) -> Result<()> {
    if x.len != out.len {
        return Err(VulkanError::Shape(format!(
            "an input of {} values and an output of {}",
            x.len, out.len
        )));
    }
    Ok(())
}
