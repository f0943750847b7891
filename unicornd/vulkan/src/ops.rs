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
use crate::kv::KvCache;
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

pub(crate) fn to_u32(what: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| VulkanError::Limit {
        what,
        value: v as u64,
        limit: u32::MAX.into(),
    })
}

/// What attention needs of its parameters against the cache, whatever the queries.
fn check_attention(kv: &KvCache<'_>, p: &AttnParams) -> Result<()> {
    let shape = kv.shape();
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
    match p.softcap {
        Some(c) if !(c > 0.0 && c.is_finite()) => {
            Err(VulkanError::Shape(format!("soft-cap {c} is not positive")))
        }
        _ => Ok(()),
    }
}

impl Context {
    /// Workgroup grid covering `n` rows, one workgroup each: `[x, y]` with `x * y >= n`.
    fn row_grid(&self, n: u32) -> [u32; 2] {
        let max_x = self.info().max_workgroup_count[0].max(1);
        let x = n.min(max_x);
        [x, if x == 0 { 0 } else { n.div_ceil(x) }]
    }

    /// Grid-stride dispatch width for `n` elements.
    pub(crate) fn stride_groups(&self, n: u32) -> u32 {
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
        let pos = positions.iter().map(|&p| to_u32("position", p)).collect::<Result<Vec<_>>>()?;
        let Some(plan) = self.plan_rope(rope, x.len(), head_dim, pos.len())? else {
            return Ok(x.to_vec());
        };
        let xb = Buffer::from_f32(self, x)?;
        let pb = Buffer::from_bytes(
            self,
            &pos.iter().flat_map(|p| p.to_le_bytes()).collect::<Vec<_>>(),
        )?;
        let unused = Buffer::zeroed(self, 0)?;
        self.run(plan, [&xb, &pb, &unused])?;
        Ok(xb.to_f32())
    }

    /// Checks and plans RoPE in place on `x_len` values, `n_tokens` tokens of heads of
    /// `head_dim` (binding 0 the values, binding 1 one u32 position per token). `None`: nothing
    /// rotates.
    pub(crate) fn plan_rope(
        &self,
        rope: &Rope,
        x_len: usize,
        head_dim: usize,
        n_tokens: usize,
    ) -> Result<Option<Plan>> {
        if !rope.n_dims.is_multiple_of(2) || rope.n_dims > head_dim || head_dim == 0 {
            return Err(VulkanError::Shape(format!(
                "rope: {} rotated dims of heads of {head_dim} (must be even and at most the head)",
                rope.n_dims
            )));
        }
        let token = n_tokens.checked_mul(head_dim).filter(|&t| t > 0);
        let Some(n_heads) = token.filter(|&t| x_len.is_multiple_of(t)).map(|t| x_len / t) else {
            return Err(VulkanError::Shape(format!(
                "rope: {x_len} values are not {n_tokens} tokens of heads of {head_dim}"
            )));
        };
        let rows = to_u32("rope rows", n_tokens * n_heads)?;
        let half = to_u32("rope dims", rope.n_dims / 2)?;
        let pairs = rows.checked_mul(half).ok_or(VulkanError::Limit {
            what: "rope pairs",
            value: u64::from(rows) * u64::from(half),
            limit: u32::MAX.into(),
        })?;
        if pairs == 0 {
            return Ok(None);
        }
        // As Rope::cache, in f32 on the host so the device multiplies by the very same value.
        let theta_scale = rope.freq_base.powf(-2.0 / rope.n_dims as f32);
        let push = vec![
            rows,
            to_u32("heads", n_heads)?,
            to_u32("head_dim", head_dim)?,
            half,
            u32::from(rope.mode == RopeMode::Neox),
            theta_scale.to_bits(),
            rope.freq_scale.to_bits(),
        ];
        Ok(Some(Plan { kernel: Kernel::Rope, push, groups: [self.stride_groups(pairs), 1, 1] }))
    }

    /// Writes the keys `k` and values `v` of `n` tokens (each `n_kv_head x head_dim` f32) at
    /// positions `pos0..pos0 + n` of layer `layer` of `kv`, as
    /// `unicorn_kernels::attention::KvCache::store` of each token (f16: round to nearest even).
    pub fn kv_store(
        &self,
        kv: &mut KvCache<'_>,
        layer: usize,
        k: &[f32],
        v: &[f32],
        pos0: usize,
    ) -> Result<()> {
        let kvd = kv.shape().n_kv_head * kv.shape().head_dim;
        if k.len() != v.len() || kvd == 0 || !k.len().is_multiple_of(kvd) {
            return Err(VulkanError::Shape(format!(
                "kv_store: {} keys and {} values are not tokens of {kvd}",
                k.len(),
                v.len()
            )));
        }
        let Some(plan) = self.plan_kv_store(kv, layer, k.len() / kvd, k.len(), 0, pos0)? else {
            return Ok(());
        };
        let kb = Buffer::from_f32(self, k)?;
        let vb = Buffer::from_f32(self, v)?;
        let buf = kv.at(layer)?.buf;
        // No step may hold the cache while this call's submission writes it.
        let _ = kv.layer_mut(layer)?;
        self.dispatch(plan.kernel, [&kb, &vb, kv.mem().buffer(buf)], &plan.push, plan.groups)
    }

    /// Checks and plans storing `n_tok` tokens' K and V, starting at value `src_off` of sources
    /// of `src_len` values, at positions `pos0..` of `layer` of `kv`.
    pub(crate) fn plan_kv_store(
        &self,
        kv: &KvCache<'_>,
        layer: usize,
        n_tok: usize,
        src_len: usize,
        src_off: usize,
        pos0: usize,
    ) -> Result<Option<Plan>> {
        let shape = kv.shape();
        let at = kv.at(layer)?;
        if pos0.checked_add(n_tok).is_none_or(|end| end > shape.n_ctx) {
            return Err(VulkanError::Shape(format!(
                "positions {pos0}.. of {n_tok} tokens beyond the cache of {}",
                shape.n_ctx
            )));
        }
        let kvd = shape.n_kv_head * shape.head_dim;
        let need = n_tok.checked_mul(kvd).and_then(|n| n.checked_add(src_off));
        if need.is_none_or(|n| n > src_len) {
            return Err(VulkanError::Shape(format!(
                "kv_store: {n_tok} tokens of {kvd} from value {src_off} of {src_len}"
            )));
        }
        let pairs = kvd / 2;
        let total = to_u32("kv_store values", n_tok * pairs)?;
        if total == 0 {
            return Ok(None);
        }
        let push = vec![
            to_u32("kv pairs", pairs)?,
            to_u32("head_dim", shape.head_dim)?,
            to_u32("n_ctx", shape.n_ctx)?,
            to_u32("position", pos0)?,
            to_u32("tokens", n_tok)?,
            to_u32("source offset", src_off)?,
            at.kbase,
            at.vbase,
        ];
        let groups = [self.stride_groups(total), 1, 1];
        Ok(Some(Plan { kernel: Kernel::KvStore(kv.elem()), push, groups }))
    }

    /// Attention of the `n_q` query tokens in `q` (`n_q x p.n_head x head_dim`, so `n_q` is
    /// `q.len() / (p.n_head * head_dim)`) over layer `layer` of `kv`, as
    /// `unicorn_kernels::attention::attention`: query `i` at position `p.pos0 + i` sees keys
    /// `0..p.kv_len`, limited by `p.causal` and `p.window`, with the scores scaled by `p.scale`
    /// and soft-capped when `p.softcap` is set. Query head `h` reads KV head
    /// `h / (n_head / n_kv_head)`. A query with no visible key gets zeros.
    pub fn attention(
        &self,
        q: &[f32],
        kv: &mut KvCache<'_>,
        layer: usize,
        p: &AttnParams,
    ) -> Result<Vec<f32>> {
        let per_token = p.n_head.checked_mul(kv.shape().head_dim);
        let Some(n_q) =
            per_token.filter(|&t| t > 0 && q.len().is_multiple_of(t)).map(|t| q.len() / t)
        else {
            if p.n_head == 0 && q.is_empty() {
                return Ok(Vec::new());
            }
            return Err(VulkanError::Shape(format!(
                "q holds {} values, not tokens of {} heads of {}",
                q.len(),
                p.n_head,
                kv.shape().head_dim
            )));
        };
        // Checked before the shortcut below, so a bad call is an error whatever its positions.
        check_attention(kv, p)?;
        let buf = kv.at(layer)?.buf;
        // Every query sees no key (e.g. a window far past the valid keys): zeros, even where the
        // positions would not fit the shader's 32 bits.
        let sees = |i: usize| {
            let qpos = p.pos0.saturating_add(i);
            let hi = if p.causal { qpos.saturating_add(1).min(p.kv_len) } else { p.kv_len };
            let lo = p.window.map_or(0, |w| qpos.saturating_add(1).saturating_sub(w));
            lo < hi
        };
        if !(0..n_q).any(sees) {
            return Ok(vec![0.0; q.len()]);
        }
        let Some(plan) = self.plan_attention(kv, layer, p, n_q, q.len(), 0, q.len())? else {
            return Ok(Vec::new());
        };
        let qb = Buffer::from_f32(self, q)?;
        let out = Buffer::zeroed(self, std::mem::size_of_val(q))?;
        // No step may write the cache while this call's submission reads it.
        let _ = kv.layer_mut(layer)?;
        self.dispatch(plan.kernel, [&qb, kv.mem().buffer(buf), &out], &plan.push, plan.groups)?;
        Ok(out.to_f32())
    }

    /// Checks and plans attention of `n_q` tokens of queries starting at value `qoff` of a
    /// buffer of `q_len` values, into the same place of one of `out_len`, over `layer` of `kv`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plan_attention(
        &self,
        kv: &KvCache<'_>,
        layer: usize,
        p: &AttnParams,
        n_q: usize,
        q_len: usize,
        qoff: usize,
        out_len: usize,
    ) -> Result<Option<Plan>> {
        check_attention(kv, p)?;
        let shape = kv.shape();
        let at = kv.at(layer)?;
        let need = n_q
            .checked_mul(p.n_head)
            .and_then(|n| n.checked_mul(shape.head_dim))
            .and_then(|n| n.checked_add(qoff));
        if need.is_none_or(|n| n > q_len || n > out_len) {
            return Err(VulkanError::Shape(format!(
                "attention: {n_q} tokens of {} heads of {} from value {qoff} of queries of                  {q_len} into an output of {out_len}",
                p.n_head, shape.head_dim
            )));
        }
        if n_q == 0 || p.n_head == 0 {
            return Ok(None);
        }
        let last = p.pos0.checked_add(n_q).ok_or_else(|| {
            VulkanError::Shape(format!("attention: {n_q} queries from position {}", p.pos0))
        })?;
        let _ = to_u32("last query position", last)?;
        let softcap = p.softcap.unwrap_or(0.0);
        let window = match p.window {
            None => 0,
            Some(0) => return Err(VulkanError::Shape("a sliding window of 0 keys".into())),
            // A window wider than any position is no window.
            Some(w) => u32::try_from(w).unwrap_or(u32::MAX),
        };
        let push = vec![
            to_u32("group", p.n_head / shape.n_kv_head)?,
            to_u32("head_dim", shape.head_dim)?,
            to_u32("n_ctx", shape.n_ctx)?,
            at.kbase,
            at.vbase,
            to_u32("query offset", qoff)?,
            to_u32("first query position", p.pos0)?,
            to_u32("kv_len", p.kv_len)?,
            u32::from(p.causal),
            window,
            p.scale.to_bits(),
            softcap.to_bits(),
        ];
        let groups = [to_u32("heads", p.n_head)?, to_u32("query tokens", n_q)?, 1];
        Ok(Some(Plan { kernel: Kernel::Attn(kv.elem()), push, groups }))
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
