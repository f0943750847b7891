//! The operations: matrix-vector products with GGUF weights, RMSNorm, SwiGLU, GeGLU, add, mul,
//! scale, softmax, RoPE, the f16 KV cache store and decode attention.
//!
//! Each call here records one dispatch, submits it and waits: inputs are copied into temporary
//! buffers and the result is read back. [`crate::Step`] records many of the same dispatches
//! (planned by the same `plan_*` checks) into one submission, with activations left on the device.

use unicorn_kernels::attention::AttnParams;
use unicorn_kernels::ops::{Rope, RopeMode};
use unicorn_kernels::GgmlType;

use crate::error::{Result, VulkanError};
use crate::shaders::{Kernel, MvFormat};
use crate::{Buffer, Context};

/// One checked dispatch: the kernel, its push constants and its grid.
pub(crate) struct Plan {
    pub kernel: Kernel,
    pub push: Vec<u32>,
    pub groups: [u32; 3],
}

/// The binary shader's operation codes.
pub(crate) const OP_ADD: u32 = 0;
pub(crate) const OP_MUL: u32 = 1;

/// The largest head the attention shader holds (its query in shared memory).
pub const MAX_HEAD_DIM: usize = 512;

/// The shape of one layer's f16 K or V cache on the device: `n_kv_head x n_ctx x head_dim` values,
/// head-major (`unicorn_kernels::attention`'s layout), `2 * n_kv_head * n_ctx * head_dim` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    /// KV heads.
    pub n_kv_head: usize,
    /// Positions the cache holds.
    pub n_ctx: usize,
    /// Values per head: even (two f16 per 32-bit word), at most [`MAX_HEAD_DIM`].
    pub head_dim: usize,
}

impl KvShape {
    /// Bytes of one K or V cache buffer of this shape.
    pub fn bytes(&self) -> Option<usize> {
        self.n_kv_head.checked_mul(self.n_ctx)?.checked_mul(self.head_dim)?.checked_mul(2)
    }

    fn check(&self, what: &str, cache: &Buffer<'_>) -> Result<()> {
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) || self.head_dim > MAX_HEAD_DIM {
            return Err(VulkanError::Shape(format!(
                "head_dim {} (must be even, 2..={MAX_HEAD_DIM})",
                self.head_dim
            )));
        }
        if self.bytes() != Some(cache.len()) {
            return Err(VulkanError::Shape(format!(
                "{what}: a {self:?} f16 cache needs {:?} bytes, the buffer holds {}",
                self.bytes(),
                cache.len()
            )));
        }
        // The shaders index with 32-bit element offsets.
        let _ = to_u32("KV cache size", cache.padded_size())?;
        Ok(())
    }
}

fn to_u32(what: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| VulkanError::Limit {
        what,
        value: v as u64,
        limit: u32::MAX.into(),
    })
}

impl Context {
    /// Workgroup grid covering `n` rows, one workgroup each: `[x, y]` with `x * y >= n`.
    fn row_grid(&self, n: u32) -> [u32; 2] {
        let max_x = self.info().max_workgroup_count[0].max(1);
        let x = n.min(max_x);
        [x, if x == 0 { 0 } else { n.div_ceil(x) }]
    }

    /// Grid-stride dispatch width for `n` elements.
    fn stride_groups(&self, n: u32) -> u32 {
        let wg = self.info().workgroup_size;
        n.div_ceil(wg).clamp(1, self.info().max_workgroup_count[0].min(4096))
    }

    /// `out[r] = dot(W[r], x)` for the `rows x cols` row-major weight matrix in `weights`, stored
    /// as GGUF rows of `ty` (`ty.row_bytes(cols)` bytes each). Accumulates in f32 from f32
    /// activations (the CPU path quantizes activations to Q8; results differ by rounding).
    pub fn matvec(
        &self,
        ty: GgmlType,
        weights: &Buffer<'_>,
        rows: usize,
        cols: usize,
        x: &[f32],
    ) -> Result<Vec<f32>> {
        self.matmul(ty, weights, rows, cols, x, 1)
    }

    /// [`Context::matvec`] for `n_tokens` activation vectors: `x` holds `n_tokens * cols`
    /// values, the result `n_tokens * rows` with `out[t * rows + r] = dot(W[r], x[t])`.
    pub fn matmul(
        &self,
        ty: GgmlType,
        weights: &Buffer<'_>,
        rows: usize,
        cols: usize,
        x: &[f32],
        n_tokens: usize,
    ) -> Result<Vec<f32>> {
        let (w_len, w_padded) = (weights.len(), weights.padded_size());
        let Some(plan) = self.plan_matmul(ty, w_len, w_padded, rows, cols, x.len(), n_tokens)?
        else {
            return Ok(Vec::new());
        };
        let xb = Buffer::from_f32(self, x)?;
        let out = Buffer::zeroed(self, n_tokens * rows * 4)?;
        self.run(plan, [weights, &xb, &out])?;
        Ok(out.to_f32())
    }

    /// Checks a product of `n_tokens` vectors of `cols` values (`x_len` in all) with the `rows x
    /// cols` weights of `ty` in a buffer of `w_len` bytes (`w_padded` as the shaders see it), and
    /// plans its dispatch (offsets 0: `push[4]` is the first input value, `push[5]` the first
    /// output value). `None`: nothing to compute.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plan_matmul(
        &self,
        ty: GgmlType,
        w_len: usize,
        w_padded: usize,
        rows: usize,
        cols: usize,
        x_len: usize,
        n_tokens: usize,
    ) -> Result<Option<Plan>> {
        let format = MvFormat::of(ty).ok_or(VulkanError::UnsupportedType(ty))?;
        let row_bytes = ty.row_bytes(cols as u64).filter(|_| cols > 0).ok_or_else(|| {
            VulkanError::Shape(format!(
                "{cols} columns is not a positive whole number of {} blocks",
                ty.name()
            ))
        })?;
        let need = row_bytes.checked_mul(rows as u64);
        if need != Some(w_len as u64) {
            return Err(VulkanError::Shape(format!(
                "{rows} x {cols} {} weights need {need:?} bytes, the buffer holds {w_len}",
                ty.name(),
            )));
        }
        let want = n_tokens.checked_mul(cols);
        if want != Some(x_len) {
            return Err(VulkanError::Shape(format!(
                "x holds {x_len} values, {n_tokens} tokens of {cols} need {want:?}"
            )));
        }
        let _ = n_tokens
            .checked_mul(rows)
            .and_then(|n| n.checked_mul(4))
            .ok_or_else(|| VulkanError::Shape("output too large".into()))?;
        if rows == 0 || n_tokens == 0 {
            return Ok(None);
        }
        let rows32 = to_u32("rows", rows)?;
        let push =
            vec![rows32, to_u32("cols", cols)?, 0, to_u32("row bytes", row_bytes as usize)?, 0, 0];
        // The shaders index with 32-bit offsets: buffers past 4 GiB would need splitting.
        let _ = to_u32("weight buffer size", w_padded)?;
        let [gx, gy] = self.row_grid(rows32);
        let groups = [gx, gy, to_u32("tokens", n_tokens)?];
        Ok(Some(Plan { kernel: Kernel::MulMv(format), push, groups }))
    }

    /// RMSNorm of each row of `dim` values in `x`, times `weight` when given, as
    /// `unicorn_kernels::ops::rms_norm`.
    pub fn rms_norm(
        &self,
        x: &[f32],
        dim: usize,
        weight: Option<&[f32]>,
        eps: f32,
    ) -> Result<Vec<f32>> {
        let Some(plan) = self.plan_rms_norm(x.len(), dim, weight.map(<[f32]>::len), eps)? else {
            return Ok(Vec::new());
        };
        self.run_f32(plan, x, weight.unwrap_or(&[]))
    }

    /// Checks and plans an RMSNorm of `n` values in rows of `dim`, with a weight of
    /// `weight_len` values when given.
    pub(crate) fn plan_rms_norm(
        &self,
        n: usize,
        dim: usize,
        weight_len: Option<usize>,
        eps: f32,
    ) -> Result<Option<Plan>> {
        if dim == 0 || !n.is_multiple_of(dim) {
            return Err(VulkanError::Shape(format!("{n} values are not rows of {dim}")));
        }
        if weight_len.is_some_and(|w| w != dim) {
            return Err(VulkanError::Shape(format!("weight is not {dim} values")));
        }
        let rows = to_u32("rows", n / dim)?;
        if rows == 0 {
            return Ok(None);
        }
        let push = vec![rows, to_u32("dim", dim)?, u32::from(weight_len.is_some()), eps.to_bits()];
        let [gx, gy] = self.row_grid(rows);
        Ok(Some(Plan { kernel: Kernel::RmsNorm, push, groups: [gx, gy, 1] }))
    }

    /// Runs `plan` on copies of `a` and `b` into an output as long as `a`, and reads it back.
    fn run_f32(&self, plan: Plan, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
        let ab = Buffer::from_f32(self, a)?;
        let bb = Buffer::from_f32(self, b)?;
        let out = Buffer::zeroed(self, std::mem::size_of_val(a))?;
        self.run(plan, [&ab, &bb, &out])?;
        Ok(out.to_f32())
    }

    /// Runs one planned dispatch on `buffers` and waits for it.
    fn run(&self, plan: Plan, buffers: [&Buffer<'_>; 3]) -> Result<()> {
        self.dispatch(plan.kernel, buffers, &plan.push, plan.groups)
    }

    /// Softmax of each row of `dim` values in `x` (`exp(x - max) / sum`), as
    /// `unicorn_kernels::ops::softmax`.
    pub fn softmax(&self, x: &[f32], dim: usize) -> Result<Vec<f32>> {
        if dim == 0 || !x.len().is_multiple_of(dim) {
            return Err(VulkanError::Shape(format!("{} values are not rows of {dim}", x.len())));
        }
        let rows = to_u32("rows", x.len() / dim)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let xb = Buffer::from_f32(self, x)?;
        let unused = Buffer::zeroed(self, 0)?;
        let out = Buffer::zeroed(self, std::mem::size_of_val(x))?;
        let push = [rows, to_u32("dim", dim)?];
        let [gx, gy] = self.row_grid(rows);
        self.dispatch(Kernel::Softmax, [&xb, &unused, &out], &push, [gx, gy, 1])?;
        Ok(out.to_f32())
    }

    /// `x * s`, as `unicorn_kernels::ops::scale`.
    pub fn scale(&self, x: &[f32], s: f32) -> Result<Vec<f32>> {
        if x.is_empty() {
            return Ok(Vec::new());
        }
        let n = to_u32("length", x.len())?;
        let xb = Buffer::from_f32(self, x)?;
        let unused = Buffer::zeroed(self, 0)?;
        let out = Buffer::zeroed(self, std::mem::size_of_val(x))?;
        let push = [n, 2, s.to_bits()];
        self.dispatch(Kernel::Binary, [&xb, &unused, &out], &push, [self.stride_groups(n), 1, 1])?;
        Ok(out.to_f32())
    }

    /// `silu(gate) * up`, as `unicorn_kernels::ops::swiglu`.
    pub fn swiglu(&self, gate: &[f32], up: &[f32]) -> Result<Vec<f32>> {
        self.elementwise(Kernel::Swiglu, gate, up, None)
    }

    /// `gelu_tanh(gate) * up` (Gemma's feed-forward), as `unicorn_kernels::ops::geglu`.
    pub fn geglu(&self, gate: &[f32], up: &[f32]) -> Result<Vec<f32>> {
        self.elementwise(Kernel::Geglu, gate, up, None)
    }

    /// `a + b` element-wise.
    pub fn add(&self, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
        self.elementwise(Kernel::Binary, a, b, Some(OP_ADD))
    }

    /// `a * b` element-wise.
    pub fn mul(&self, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
        self.elementwise(Kernel::Binary, a, b, Some(OP_MUL))
    }

    /// RoPE of `x`, `positions.len()` tokens of `n_heads x head_dim` values each (`n_heads` is
    /// `x.len() / (positions.len() * head_dim)`), the token `t` at `positions[t]`, as
    /// `unicorn_kernels::ops::Rope::rotate` on each token. The angles are the CPU's f32 values
    /// exactly; sin and cos are the device's, after reducing the angle to [-pi, pi] (exact for
    /// angles below 2^16 * 2 pi, about 411 000).
    pub fn rope(
        &self,
        rope: &Rope,
        x: &[f32],
        head_dim: usize,
        positions: &[usize],
    ) -> Result<Vec<f32>> {
        if !rope.n_dims.is_multiple_of(2) || rope.n_dims > head_dim || head_dim == 0 {
            return Err(VulkanError::Shape(format!(
                "rope: {} rotated dims of heads of {head_dim} (must be even and at most the head)",
                rope.n_dims
            )));
        }
        let token = positions.len().checked_mul(head_dim).filter(|&t| t > 0);
        let Some(n_heads) = token.filter(|&t| x.len().is_multiple_of(t)).map(|t| x.len() / t)
        else {
            return Err(VulkanError::Shape(format!(
                "rope: {} values are not {} tokens of heads of {head_dim}",
                x.len(),
                positions.len()
            )));
        };
        let rows = to_u32("rope rows", positions.len() * n_heads)?;
        let half = to_u32("rope dims", rope.n_dims / 2)?;
        let pairs = rows.checked_mul(half).ok_or(VulkanError::Limit {
            what: "rope pairs",
            value: u64::from(rows) * u64::from(half),
            limit: u32::MAX.into(),
        })?;
        if pairs == 0 {
            return Ok(x.to_vec());
        }
        let pos = positions.iter().map(|&p| to_u32("position", p)).collect::<Result<Vec<_>>>()?;
        // As Rope::cache, in f32 on the host so the device multiplies by the very same value.
        let theta_scale = rope.freq_base.powf(-2.0 / rope.n_dims as f32);
        let xb = Buffer::from_f32(self, x)?;
        let pb = Buffer::from_bytes(
            self,
            &pos.iter().flat_map(|p| p.to_le_bytes()).collect::<Vec<_>>(),
        )?;
        let unused = Buffer::zeroed(self, 0)?;
        let push = [
            rows,
            to_u32("heads", n_heads)?,
            to_u32("head_dim", head_dim)?,
            half,
            u32::from(rope.mode == RopeMode::Neox),
            theta_scale.to_bits(),
            rope.freq_scale.to_bits(),
        ];
        self.dispatch(Kernel::Rope, [&xb, &pb, &unused], &push, [self.stride_groups(pairs), 1, 1])?;
        Ok(xb.to_f32())
    }

    /// Writes one token's keys or values `src` (`n_kv_head x head_dim` f32) at position `pos` of
    /// the f16 cache `cache` of shape `shape`, rounding to nearest even, as
    /// `unicorn_kernels::attention::KvCache::store` into an f16 cache.
    pub fn kv_store(
        &self,
        cache: &mut Buffer<'_>,
        shape: KvShape,
        src: &[f32],
        pos: usize,
    ) -> Result<()> {
        shape.check("kv_store", cache)?;
        if pos >= shape.n_ctx {
            return Err(VulkanError::Shape(format!(
                "position {pos} beyond the cache of {}",
                shape.n_ctx
            )));
        }
        let n = shape.n_kv_head * shape.head_dim;
        if src.len() != n {
            return Err(VulkanError::Shape(format!(
                "kv_store: {} values, {} KV heads of {} need {n}",
                src.len(),
                shape.n_kv_head,
                shape.head_dim
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let pairs = to_u32("kv_store values", n / 2)?;
        let sb = Buffer::from_f32(self, src)?;
        let unused = Buffer::zeroed(self, 0)?;
        let push = [
            pairs,
            to_u32("head_dim", shape.head_dim)?,
            to_u32("n_ctx", shape.n_ctx)?,
            to_u32("position", pos)?,
        ];
        let groups = [self.stride_groups(pairs), 1, 1];
        self.dispatch(Kernel::KvStore, [&sb, &unused, &*cache], &push, groups)?;
        Ok(())
    }

    /// Decode attention of one query token `q` (`p.n_head x head_dim`) over the f16 caches `k`
    /// and `v` of shape `shape`, as `unicorn_kernels::attention::attention` with `n_q = 1`: the
    /// query at position `p.pos0` sees keys `0..p.kv_len`, limited by `p.causal` and
    /// `p.window`, with the scores scaled by `p.scale` and soft-capped when `p.softcap` is set.
    /// Query head `h` reads KV head `h / (n_head / n_kv_head)`. No visible key gives zeros.
    pub fn attention(
        &self,
        q: &[f32],
        k: &Buffer<'_>,
        v: &Buffer<'_>,
        shape: KvShape,
        p: &AttnParams,
    ) -> Result<Vec<f32>> {
        shape.check("K cache", k)?;
        shape.check("V cache", v)?;
        if shape.n_kv_head == 0 || !p.n_head.is_multiple_of(shape.n_kv_head) {
            return Err(VulkanError::Shape(format!(
                "{} query heads are not a multiple of {} KV heads",
                p.n_head, shape.n_kv_head
            )));
        }
        if p.kv_len > shape.n_ctx {
            return Err(VulkanError::Shape(format!(
                "kv_len {} beyond the cache of {}",
                p.kv_len, shape.n_ctx
            )));
        }
        let q_len = p.n_head.checked_mul(shape.head_dim);
        if q_len != Some(q.len()) {
            return Err(VulkanError::Shape(format!(
                "q holds {} values, {} heads of {} need {q_len:?}",
                q.len(),
                p.n_head,
                shape.head_dim,
            )));
        }
        let softcap = match p.softcap {
            None => 0.0,
            Some(c) if c > 0.0 && c.is_finite() => c,
            Some(c) => return Err(VulkanError::Shape(format!("soft-cap {c} is not positive"))),
        };
        if p.n_head == 0 {
            return Ok(Vec::new());
        }
        // The visible keys, as unicorn_kernels::attention's key_range for query 0.
        let qpos = p.pos0;
        let hi = if p.causal { qpos.saturating_add(1).min(p.kv_len) } else { p.kv_len };
        let lo = p.window.map_or(0, |w| qpos.saturating_add(1).saturating_sub(w));
        if lo >= hi {
            return Ok(vec![0.0; q.len()]);
        }
        let push = [
            to_u32("group", p.n_head / shape.n_kv_head)?,
            to_u32("head_dim", shape.head_dim)?,
            to_u32("n_ctx", shape.n_ctx)?,
            to_u32("first key", lo)?,
            to_u32("last key", hi)?,
            p.scale.to_bits(),
            softcap.to_bits(),
        ];
        let qb = Buffer::from_f32(self, q)?;
        let groups = [to_u32("heads", p.n_head)?, 1, 1];
        self.dispatch(Kernel::Attn, [&qb, k, v], &push, groups)?;
        Ok(qb.to_f32())
    }

    fn elementwise(&self, k: Kernel, a: &[f32], b: &[f32], op: Option<u32>) -> Result<Vec<f32>> {
        let Some(plan) = self.plan_elementwise(k, a.len(), b.len(), op)? else {
            return Ok(Vec::new());
        };
        self.run_f32(plan, a, b)
    }

    /// Checks and plans `k` (SwiGLU, GeGLU, or the binary `op`) on inputs of `a` and `b` values.
    pub(crate) fn plan_elementwise(
        &self,
        k: Kernel,
        a: usize,
        b: usize,
        op: Option<u32>,
    ) -> Result<Option<Plan>> {
        if a != b {
            return Err(VulkanError::Shape(format!("lengths {a} and {b} differ")));
        }
        if a == 0 {
            return Ok(None);
        }
        let n = to_u32("length", a)?;
        let push = vec![n, op.unwrap_or(0), 0];
        Ok(Some(Plan { kernel: k, push, groups: [self.stride_groups(n), 1, 1] }))
    }
}
