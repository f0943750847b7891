//! Attention of a batch of queries over a KV cache: `softmax(q K^T * scale [+ mask]) V`.
//!
//! Cache layout (chosen here; the engine allocates it): for each of K and V, one buffer per layer
//! of `n_kv_head x n_ctx x head_dim` values, f32 or f16, head-major so that one KV head's
//! positions are contiguous. A token at position `p` is written at
//! `[(g * n_ctx + p) * head_dim ..][..head_dim]` for each KV head `g` ([`KvCache::store`]).
//!
//! Queries: `n_q` tokens at positions `pos0 .. pos0 + n_q`, each `n_head x head_dim`, head `h`
//! reading KV head `h / (n_head / n_kv_head)` (grouped-query attention). Query `i` sees the
//! keys `j < kv_len` with, when causal, `j <= pos0 + i`, and with a sliding window `w`,
//! `pos0 + i - j < w`: always one contiguous range of positions.
//!
//! Work is split over (query, KV head) pairs; each pair handles all query heads of its group
//! together so every K and V row is read once per group (or over single heads when there are
//! too few pairs for the threads). Scores and the weighted sum of V are
//! accumulated in f32; the softmax sum in f64.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::cpu::Isa;
use crate::error::check_len;
use crate::ops::exp_sub_sum;
use crate::pool::ThreadPool;
use crate::KernelError;

/// One layer's K or V cache buffer.
#[derive(Clone, Copy, Debug)]
pub enum KvData<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// f16 values (half the memory traffic).
    F16(&'a [f16]),
}

impl KvData<'_> {
    fn len(&self) -> usize {
        match self {
            KvData::F32(s) => s.len(),
            KvData::F16(s) => s.len(),
        }
    }
}

/// A mutable cache buffer, for [`KvCache::store`].
#[derive(Debug)]
pub enum KvDataMut<'a> {
    /// f32 values.
    F32(&'a mut [f32]),
    /// f16 values.
    F16(&'a mut [f16]),
}

/// One layer's K and V caches.
#[derive(Clone, Copy, Debug)]
pub struct KvCache<'a> {
    /// Keys, `n_kv_head x n_ctx x head_dim`.
    pub k: KvData<'a>,
    /// Values, same layout.
    pub v: KvData<'a>,
    /// KV heads.
    pub n_kv_head: usize,
    /// Positions the buffers hold.
    pub n_ctx: usize,
    /// Values per head.
    pub head_dim: usize,
}

impl KvCache<'_> {
    /// Hints into the CPU's cache the lines that storing position `pos` will write, so that
    /// the store, a product later, does not wait for memory line by line: each head's row is
    /// a line or two of its own in a cache far larger than the CPU's.
    pub fn prefetch_position(&self, pos: usize) {
        if pos >= self.n_ctx {
            return;
        }
        for data in [self.k, self.v] {
            let (base, elem) = match data {
                KvData::F32(s) => (s.as_ptr().cast::<u8>(), 4),
                KvData::F16(s) => (s.as_ptr().cast::<u8>(), 2),
            };
            let row = self.head_dim * elem;
            for g in 0..self.n_kv_head {
                let start = base.wrapping_add((g * self.n_ctx + pos) * row);
                let end = start.wrapping_add(row);
                // From the start of the line that holds the row's first byte.
                let mut line = start.wrapping_sub(start as usize % 64);
                while line < end {
                    #[cfg(target_arch = "x86_64")]
                    crate::simd::prefetch(line);
                    line = line.wrapping_add(64);
                }
            }
        }
    }

    /// Writes one token's keys or values (`n_kv_head x head_dim`, as the K or V projection
    /// produces them) at position `pos` of `dst`.
    ///
    /// # Panics
    ///
    /// When `pos >= n_ctx`, `src.len() != n_kv_head * head_dim` or `dst` is not
    /// `n_kv_head * n_ctx * head_dim` long.
    pub fn store(
        dst: KvDataMut<'_>,
        src: &[f32],
        pos: usize,
        n_kv_head: usize,
        n_ctx: usize,
        head_dim: usize,
    ) {
        assert!(pos < n_ctx, "position {pos} beyond the cache of {n_ctx}");
        assert_eq!(src.len(), n_kv_head * head_dim, "kv store: source length");
        let total = n_kv_head * n_ctx * head_dim;
        match dst {
            KvDataMut::F32(d) => {
                assert_eq!(d.len(), total, "kv store: cache length");
                for (g, s) in src.chunks_exact(head_dim).enumerate() {
                    let at = (g * n_ctx + pos) * head_dim;
                    d[at..at + head_dim].copy_from_slice(s);
                }
            }
            KvDataMut::F16(d) => {
                assert_eq!(d.len(), total, "kv store: cache length");
                for (g, s) in src.chunks_exact(head_dim).enumerate() {
                    let at = (g * n_ctx + pos) * head_dim;
                    d[at..at + head_dim].convert_from_f32_slice(s);
                }
            }
        }
    }
}

/// What to attend and how.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnParams {
    /// Query heads.
    pub n_head: usize,
    /// Multiplier of `q . k` (usually `1/sqrt(head_dim)`).
    pub scale: f32,
    /// Position of the first query.
    pub pos0: usize,
    /// Valid positions in the cache (keys `0..kv_len`).
    pub kv_len: usize,
    /// Whether query `i` is limited to keys at positions `<= pos0 + i`.
    pub causal: bool,
    /// Sliding window: keys with `pos0 + i - j >= window` are masked (Gemma's local layers).
    pub window: Option<usize>,
    /// Logit soft-cap: scores become `cap * tanh(score / cap)` after scaling.
    pub softcap: Option<f32>,
}

/// `out[i][h] = softmax_j(q[i][h] . K[g][j] * scale) . V[g][j]` for `n_q` queries (see the
/// module docs for the masking). `q` and `out` are `n_q x n_head x head_dim`. A query with no
/// visible key gets zeros.
///
/// Errors when the buffers do not match the shapes or `n_head` is not a multiple of
/// `n_kv_head`.
pub fn attention(
    pool: &ThreadPool,
    q: &[f32],
    n_q: usize,
    kv: &KvCache<'_>,
    p: &AttnParams,
    out: &mut [f32],
) -> Result<(), KernelError> {
    attention_on(Isa::current(), pool, q, n_q, kv, p, out)
}

/// [`attention`] on a given instruction set.
pub fn attention_on(
    isa: Isa,
    pool: &ThreadPool,
    q: &[f32],
    n_q: usize,
    kv: &KvCache<'_>,
    p: &AttnParams,
    out: &mut [f32],
) -> Result<(), KernelError> {
    attention_batch_on(isa, pool, &mut [Attend { q, n_q, kv: *kv, params: *p, out }])
}

/// One sequence's share of [`attention_batch`]: the arguments of [`attention`].
#[derive(Debug)]
pub struct Attend<'a> {
    pub q: &'a [f32],
    pub n_q: usize,
    pub kv: KvCache<'a>,
    pub params: AttnParams,
    pub out: &'a mut [f32],
}

/// [`attention`] for several sequences (each over its own cache) as one parallel job: a batch
/// of single-token decodes has few (query, KV head) pairs per sequence, often fewer than or not
/// a multiple of the threads, but many together. Each output is exactly what [`attention`]
/// gives for that sequence alone.
///
/// Errors, before computing anything, when any sequence's shapes are wrong.
pub fn attention_batch(pool: &ThreadPool, seqs: &mut [Attend<'_>]) -> Result<(), KernelError> {
    attention_batch_on(Isa::current(), pool, seqs)
}

/// [`attention_batch`] on a given instruction set.
pub fn attention_batch_on(
    isa: Isa,
    pool: &ThreadPool,
    seqs: &mut [Attend<'_>],
) -> Result<(), KernelError> {
    for a in seqs.iter() {
        let (kv, p, hd) = (&a.kv, &a.params, a.kv.head_dim);
        let cache_len = kv.n_kv_head * kv.n_ctx * hd;
        check_len("K cache", cache_len, kv.k.len())?;
        check_len("V cache", cache_len, kv.v.len())?;
        check_len("queries", a.n_q * p.n_head * hd, a.q.len())?;
        check_len("attention output", a.n_q * p.n_head * hd, a.out.len())?;
        if kv.n_kv_head == 0 || !p.n_head.is_multiple_of(kv.n_kv_head) || p.kv_len > kv.n_ctx {
            return Err(KernelError::Length {
                what: "heads or kv_len",
                expected: kv.n_kv_head.max(1) * (p.n_head / kv.n_kv_head.max(1)),
                got: p.n_head,
            });
        }
    }
    // A task takes `per` heads of one query sharing a KV head: the whole group, so K and V are
    // read once per group, unless there would be fewer tasks than threads, in which case single
    // heads (each then reads its group's K and V again, mostly from cache).
    let pairs: usize = seqs.iter().map(|a| a.n_q * a.kv.n_kv_head).sum();
    let whole_groups = pairs >= pool.n_threads();
    // Task `k` of a sequence writes heads `k * per ..` of its flattened (query, head) order.
    struct Task<'s> {
        q: &'s [f32],
        kv: &'s KvCache<'s>,
        p: &'s AttnParams,
        per: usize,
        first_head: usize,
        out: std::sync::Mutex<&'s mut [f32]>,
    }
    let mut tasks: Vec<Task<'_>> = Vec::new();
    for Attend { q, n_q, kv, params: p, out } in seqs.iter_mut() {
        let hd = kv.head_dim;
        if *n_q == 0 || p.n_head == 0 || hd == 0 {
            continue;
        }
        let per = if whole_groups { p.n_head / kv.n_kv_head } else { 1 };
        for (k, o) in out.chunks_mut(per * hd).enumerate() {
            let out = std::sync::Mutex::new(o);
            tasks.push(Task { q, kv, p, per, first_head: k * per, out });
        }
    }
    pool.run(tasks.len(), |t| {
        let Task { q, kv, p, per, first_head, out } = &tasks[t];
        let (hd, group) = (kv.head_dim, p.n_head / kv.n_kv_head);
        let (i, h0) = (first_head / p.n_head, first_head % p.n_head);
        let qi = &q[(i * p.n_head + h0) * hd..][..per * hd];
        let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
        attend_group(isa, qi, i, h0 / group, kv, p, &mut o);
    });
    Ok(())
}

/// The visible key positions of query `i`.
fn key_range(p: &AttnParams, i: usize) -> std::ops::Range<usize> {
    let qpos = p.pos0 + i;
    let hi = if p.causal { (qpos + 1).min(p.kv_len) } else { p.kv_len };
    let lo = p.window.map_or(0, |w| (qpos + 1).saturating_sub(w));
    lo..hi.max(lo)
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn attend_group(
    isa: Isa,
    q: &[f32],
    i: usize,
    g: usize,
    kv: &KvCache<'_>,
    p: &AttnParams,
    out: &mut [f32],
) {
    let hd = kv.head_dim;
    let keys = key_range(p, i);
    out.fill(0.0);
    let n = keys.len();
    if n == 0 {
        return;
    }
    let rows = (g * kv.n_ctx + keys.start) * hd..(g * kv.n_ctx + keys.end) * hd;
    SCRATCH.with(|cell| {
        let mut scores = cell.borrow_mut();
        scores.resize(q.len() / hd * n, 0.0);
        match kv.k {
            KvData::F32(k) => scores_pass(isa, q, &k[rows.clone()], hd, p.scale, &mut scores),
            KvData::F16(k) => {
                scores_pass(isa, q, k[rows.clone()].reinterpret_cast(), hd, p.scale, &mut scores)
            }
        }
        for sc in scores.chunks_exact_mut(n) {
            if let Some(cap) = p.softcap {
                for s in sc.iter_mut() {
                    *s = cap * (*s / cap).tanh();
                }
            }
            let max = sc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let sum = exp_sub_sum(isa, sc, max);
            let inv = (1.0 / sum) as f32;
            for v in sc.iter_mut() {
                *v *= inv;
            }
        }
        match kv.v {
            KvData::F32(v) => values_pass(isa, &scores, &v[rows.clone()], hd, out),
            KvData::F16(v) => values_pass(isa, &scores, v[rows].reinterpret_cast(), hd, out),
        }
    });
}

/// A cache element: f32, or f16 as its bits.
trait Elem: Copy {
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for u16 {
    fn to_f32(self) -> f32 {
        f16::from_bits(self).to_f32()
    }
}

/// `scores[h * n + j] = (q_h . k_j) * scale` for the heads in `q` and the `n` rows of `k`.
fn scores_pass<E: Elem + avx2::Load8>(
    isa: Isa,
    q: &[f32],
    k: &[E],
    hd: usize,
    scale: f32,
    scores: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: an `Isa` reporting AVX2 comes from detection, so the CPU has AVX2+FMA+F16C.
        return unsafe { avx2::scores_pass(q, k, hd, scale, scores) };
    }
    let _ = isa;
    let n = k.len() / hd;
    for (h, qh) in q.chunks_exact(hd).enumerate() {
        for (j, kr) in k.chunks_exact(hd).enumerate() {
            let d = qh.iter().zip(kr).fold(0.0f32, |s, (&a, &b)| s + a * b.to_f32());
            scores[h * n + j] = d * scale;
        }
    }
}

/// `out_h = sum_j probs[h * n + j] * v_j` for each head `h` of `out`.
fn values_pass<E: Elem + avx2::Load8>(
    isa: Isa,
    probs: &[f32],
    v: &[E],
    hd: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: as in `scores_pass`.
        return unsafe { avx2::values_pass(probs, v, hd, out) };
    }
    let _ = isa;
    let n = v.len() / hd;
    for (h, oh) in out.chunks_exact_mut(hd).enumerate() {
        for (j, vr) in v.chunks_exact(hd).enumerate() {
            let pj = probs[h * n + j];
            for (o, &x) in oh.iter_mut().zip(vr) {
                *o += pj * x.to_f32();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Elem;
    use crate::simd::{hsum_ps, load_f32x8, load_u16x8, store_f32x8};

    /// Loads eight cache elements as f32.
    pub(super) trait Load8: Sized {
        /// # Safety
        ///
        /// The CPU supports AVX2+FMA+F16C.
        unsafe fn load8(s: &[Self; 8]) -> __m256;
    }

    impl Load8 for f32 {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load8(s: &[f32; 8]) -> __m256 {
            load_f32x8(s)
        }
    }

    impl Load8 for u16 {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load8(s: &[u16; 8]) -> __m256 {
            _mm256_cvtph_ps(load_u16x8(s))
        }
    }

    /// `[sum(a[0]), .., sum(a[7])]`: eight dot products' lanes summed, one per lane.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn sum8(a: &[__m256; 8]) -> __m256 {
        // hadd(x, y) = [x01, x23, y01, y23 | x45, x67, y45, y67].
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        // [a0 0-3, a1 0-3, a2 0-3, a3 0-3 | the same of lanes 4-7], then a4 .. a7.
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
        let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
        _mm256_add_ps(lo, hi)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn scores_pass<E: Elem + Load8>(
        q: &[f32],
        k: &[E],
        hd: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let n = k.len() / hd;
        let hd8 = hd / 8 * 8;
        // Eight keys at a time per head: one accumulator per key, summed across lanes for all
        // eight together (a horizontal sum per key costs as much as its dot product).
        let n8 = if hd8 == hd { n / 8 * 8 } else { 0 };
        let vs = _mm256_set1_ps(scale);
        for j0 in (0..n8).step_by(8) {
            let keys: [&[[E; 8]]; 8] =
                std::array::from_fn(|r| k[(j0 + r) * hd..(j0 + r + 1) * hd].as_chunks::<8>().0);
            for (h, qh) in q.chunks_exact(hd).enumerate() {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (c, qc) in qh.as_chunks::<8>().0.iter().enumerate() {
                    let qv = load_f32x8(qc);
                    for (a, kr) in acc.iter_mut().zip(&keys) {
                        // SAFETY: this function runs only with AVX2+FMA+F16C enabled.
                        let kv = unsafe { E::load8(&kr[c]) };
                        *a = _mm256_fmadd_ps(qv, kv, *a);
                    }
                }
                let out: &mut [f32; 8] =
                    (&mut scores[h * n + j0..h * n + j0 + 8]).try_into().unwrap();
                store_f32x8(out, _mm256_mul_ps(sum8(&acc), vs));
            }
        }
        for (j, kr) in k.chunks_exact(hd).enumerate().skip(n8) {
            let (kc, kt) = kr.as_chunks::<8>();
            for (h, qh) in q.chunks_exact(hd).enumerate() {
                let qc = qh.as_chunks::<8>().0;
                let mut acc0 = _mm256_setzero_ps();
                let mut acc1 = _mm256_setzero_ps();
                let mut c = 0;
                while c + 1 < kc.len() {
                    // SAFETY: this function runs only with AVX2+FMA+F16C enabled.
                    let k0 = unsafe { E::load8(&kc[c]) };
                    // SAFETY: as above.
                    let k1 = unsafe { E::load8(&kc[c + 1]) };
                    acc0 = _mm256_fmadd_ps(load_f32x8(&qc[c]), k0, acc0);
                    acc1 = _mm256_fmadd_ps(load_f32x8(&qc[c + 1]), k1, acc1);
                    c += 2;
                }
                if c < kc.len() {
                    // SAFETY: as above.
                    let k0 = unsafe { E::load8(&kc[c]) };
                    acc0 = _mm256_fmadd_ps(load_f32x8(&qc[c]), k0, acc0);
                }
                let mut d = hsum_ps(_mm256_add_ps(acc0, acc1));
                for (&a, &b) in qh[hd8..].iter().zip(kt) {
                    d += a * b.to_f32();
                }
                scores[h * n + j] = d * scale;
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn values_pass<E: Elem + Load8>(probs: &[f32], v: &[E], hd: usize, out: &mut [f32]) {
        let n = v.len() / hd;
        let hd64 = hd / 64 * 64;
        for (h, oh) in out.chunks_exact_mut(hd).enumerate() {
            let ph = &probs[h * n..][..n];
            // 64 dimensions at a time in eight registers.
            for c0 in (0..hd64).step_by(64) {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (vr, &pj) in v.chunks_exact(hd).zip(ph) {
                    let pv = _mm256_set1_ps(pj);
                    let vc = vr[c0..c0 + 64].as_chunks::<8>().0;
                    for (a, x) in acc.iter_mut().zip(vc) {
                        // SAFETY: this function runs only with AVX2+FMA+F16C enabled.
                        let xv = unsafe { E::load8(x) };
                        *a = _mm256_fmadd_ps(pv, xv, *a);
                    }
                }
                for (o, a) in oh[c0..c0 + 64].as_chunks_mut::<8>().0.iter_mut().zip(acc) {
                    store_f32x8(o, _mm256_add_ps(load_f32x8(o), a));
                }
            }
            // The rest: eight at a time, then scalars.
            if hd64 < hd {
                for (vr, &pj) in v.chunks_exact(hd).zip(ph) {
                    let pv = _mm256_set1_ps(pj);
                    let (vc, vt) = vr[hd64..].as_chunks::<8>();
                    let (oc, ot) = oh[hd64..].as_chunks_mut::<8>();
                    for (o, x) in oc.iter_mut().zip(vc) {
                        // SAFETY: as above.
                        let xv = unsafe { E::load8(x) };
                        store_f32x8(o, _mm256_fmadd_ps(pv, xv, load_f32x8(o)));
                    }
                    for (o, &x) in ot.iter_mut().zip(vt) {
                        *o += pj * x.to_f32();
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    /// No SIMD loads off x86-64.
    pub(super) trait Load8 {}
    impl Load8 for f32 {}
    impl Load8 for u16 {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A dense f64 implementation with an explicit per-key visibility test.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        n_q: usize,
        k: &[f32],
        v: &[f32],
        n_kv: usize,
        n_ctx: usize,
        hd: usize,
        p: &AttnParams,
    ) -> Vec<f64> {
        let group = p.n_head / n_kv;
        let mut out = vec![0.0f64; n_q * p.n_head * hd];
        for i in 0..n_q {
            for h in 0..p.n_head {
                let g = h / group;
                let qpos = (p.pos0 + i) as i64;
                let mut s: Vec<(usize, f64)> = Vec::new();
                for j in 0..p.kv_len {
                    let visible = (!p.causal || j as i64 <= qpos)
                        && p.window.is_none_or(|w| qpos - (j as i64) < w as i64);
                    if !visible {
                        continue;
                    }
                    let mut d = 0.0f64;
                    for e in 0..hd {
                        d += f64::from(q[(i * p.n_head + h) * hd + e])
                            * f64::from(k[(g * n_ctx + j) * hd + e]);
                    }
                    d *= f64::from(p.scale);
                    if let Some(c) = p.softcap {
                        d = f64::from(c) * (d / f64::from(c)).tanh();
                    }
                    s.push((j, d));
                }
                let m = s.iter().fold(f64::NEG_INFINITY, |m, &(_, d)| m.max(d));
                let z: f64 = s.iter().map(|&(_, d)| (d - m).exp()).sum();
                for &(j, d) in &s {
                    let w = (d - m).exp() / z;
                    for e in 0..hd {
                        out[(i * p.n_head + h) * hd + e] +=
                            w * f64::from(v[(g * n_ctx + j) * hd + e]);
                    }
                }
            }
        }
        out
    }

    fn lcg(s: &mut u64) -> f32 {
        *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn matches_dense_reference(
            seed in 0u64..1000,
            n_kv in 1usize..3,
            group in 1usize..4,
            hd in prop::sample::select(vec![4usize, 8, 20, 64]),
            n_q in 1usize..5,
            pos0 in 0usize..12,
            causal in any::<bool>(),
            window in prop::option::of(1usize..8),
            softcap in prop::option::of(Just(2.0f32)),
            f16_cache in any::<bool>(),
        ) {
            let n_ctx = 20;
            let kv_len = (pos0 + n_q).min(n_ctx);
            let pos0 = kv_len - n_q.min(kv_len);
            let n_q = kv_len - pos0;
            prop_assume!(n_q > 0);
            let n_head = n_kv * group;
            let mut s = seed;
            let q: Vec<f32> = (0..n_q * n_head * hd).map(|_| lcg(&mut s) * 2.0).collect();
            let mut k: Vec<f32> = (0..n_kv * n_ctx * hd).map(|_| lcg(&mut s)).collect();
            let mut v: Vec<f32> = (0..n_kv * n_ctx * hd).map(|_| lcg(&mut s)).collect();
            if f16_cache {
                for x in k.iter_mut().chain(v.iter_mut()) {
                    *x = f16::from_f32(*x).to_f32();
                }
            }
            let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
            let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            let kv = if f16_cache {
                KvCache { k: KvData::F16(&k16), v: KvData::F16(&v16), n_kv_head: n_kv, n_ctx, head_dim: hd }
            } else {
                KvCache { k: KvData::F32(&k), v: KvData::F32(&v), n_kv_head: n_kv, n_ctx, head_dim: hd }
            };
            let p = AttnParams { n_head, scale: 1.0 / (hd as f32).sqrt(), pos0, kv_len, causal, window, softcap };
            let want = naive(&q, n_q, &k, &v, n_kv, n_ctx, hd, &p);
            let pool = ThreadPool::new(2);
            for isa in Isa::all_supported() {
                let mut out = vec![f32::NAN; q.len()];
                attention_on(isa, &pool, &q, n_q, &kv, &p, &mut out).unwrap();
                for (g, w) in out.iter().zip(&want) {
                    prop_assert!((f64::from(*g) - w).abs() < 2e-5, "{:?}: {} vs {}", isa, g, w);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// The daemon batches clients' decodes: a sequence's output must not depend on the
        /// others in its batch (nor on how the tasks were cut, whole groups or single heads).
        #[test]
        fn a_batch_gives_each_sequence_what_it_gets_alone(
            seed in 0u64..1000,
            n_kv in 1usize..3,
            group in 1usize..5,
            shapes in prop::collection::vec((1usize..4, 0usize..30), 1..6),
            threads in 1usize..4,
        ) {
            let (hd, n_ctx) = (16, 40);
            let n_head = n_kv * group;
            let mut s = seed;
            let caches: Vec<(Vec<f16>, Vec<f16>)> = shapes
                .iter()
                .map(|_| {
                    let mut r = || (0..n_kv * n_ctx * hd).map(|_| f16::from_f32(lcg(&mut s))).collect();
                    (r(), r())
                })
                .collect();
            let qs: Vec<Vec<f32>> =
                shapes.iter().map(|&(n_q, _)| (0..n_q * n_head * hd).map(|_| lcg(&mut s) * 2.0).collect()).collect();
            let kv_of = |i: usize| KvCache {
                k: KvData::F16(&caches[i].0),
                v: KvData::F16(&caches[i].1),
                n_kv_head: n_kv,
                n_ctx,
                head_dim: hd,
            };
            let params = |i: usize| {
                let (n_q, pos0) = shapes[i];
                AttnParams { n_head, scale: 0.25, pos0, kv_len: pos0 + n_q, causal: true, window: None, softcap: None }
            };
            let pool = ThreadPool::new(threads);
            for isa in Isa::all_supported() {
                let alone: Vec<Vec<f32>> = (0..shapes.len())
                    .map(|i| {
                        let mut out = vec![f32::NAN; qs[i].len()];
                        attention_on(isa, &pool, &qs[i], shapes[i].0, &kv_of(i), &params(i), &mut out).unwrap();
                        out
                    })
                    .collect();
                let mut outs: Vec<Vec<f32>> = qs.iter().map(|q| vec![f32::NAN; q.len()]).collect();
                let mut batch: Vec<Attend<'_>> = outs
                    .iter_mut()
                    .enumerate()
                    .map(|(i, out)| Attend { q: &qs[i], n_q: shapes[i].0, kv: kv_of(i), params: params(i), out })
                    .collect();
                attention_batch_on(isa, &pool, &mut batch).unwrap();
                drop(batch);
                for (i, (a, b)) in alone.iter().zip(&outs).enumerate() {
                    let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                    prop_assert!(same, "{:?}: sequence {} of {:?} differs in the batch", isa, i, shapes);
                }
            }
        }
    }

    #[test]
    fn single_key_returns_its_value_and_masked_query_returns_zero() {
        let hd = 8;
        let k = vec![0.5f32; 2 * hd];
        let v: Vec<f32> = (0..2 * hd).map(|i| i as f32).collect();
        let kv = KvCache {
            k: KvData::F32(&k),
            v: KvData::F32(&v),
            n_kv_head: 1,
            n_ctx: 2,
            head_dim: hd,
        };
        let q = vec![1.0f32; 2 * hd];
        let mut out = vec![f32::NAN; 2 * hd];
        let p = AttnParams {
            n_head: 1,
            scale: 1.0,
            pos0: 0,
            kv_len: 2,
            causal: true,
            window: None,
            softcap: None,
        };
        attention(&ThreadPool::new(1), &q, 2, &kv, &p, &mut out).unwrap();
        // Query 0 sees only key 0: exactly V[0].
        assert_eq!(&out[..hd], &v[..hd]);
        // Query 1 sees two equal scores: the mean of V[0] and V[1].
        for e in 0..hd {
            assert!((out[hd + e] - (v[e] + v[hd + e]) / 2.0).abs() < 1e-6);
        }
        // A window of 1 at query 1 leaves only key 1.
        let p = AttnParams { window: Some(1), ..p };
        attention(&ThreadPool::new(1), &q, 2, &kv, &p, &mut out).unwrap();
        assert_eq!(&out[hd..], &v[hd..]);
        // kv_len 0: nothing visible, zeros.
        let p = AttnParams { kv_len: 0, causal: false, window: None, ..p };
        attention(&ThreadPool::new(1), &q[..hd], 1, &kv, &p, &mut out[..hd]).unwrap();
        assert!(out[..hd].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn store_places_rows_head_major_and_checks_shapes() {
        let (n_kv, n_ctx, hd) = (2, 3, 4);
        let mut buf = vec![f16::ZERO; n_kv * n_ctx * hd];
        let src: Vec<f32> = (0..n_kv * hd).map(|i| i as f32).collect();
        KvCache::store(KvDataMut::F16(&mut buf), &src, 2, n_kv, n_ctx, hd);
        assert_eq!(buf[2 * hd].to_f32(), 0.0);
        assert_eq!(buf[(n_ctx + 2) * hd + 3].to_f32(), 7.0);
        let mut b32 = vec![0.0f32; n_kv * n_ctx * hd];
        KvCache::store(KvDataMut::F32(&mut b32), &src, 0, n_kv, n_ctx, hd);
        assert_eq!(b32[n_ctx * hd], 4.0);
        let kv = KvCache {
            k: KvData::F32(&b32),
            v: KvData::F32(&b32),
            n_kv_head: n_kv,
            n_ctx,
            head_dim: hd,
        };
        let p = AttnParams {
            n_head: 3,
            scale: 1.0,
            pos0: 0,
            kv_len: 1,
            causal: true,
            window: None,
            softcap: None,
        };
        let mut out = vec![0.0; 3 * hd];
        assert!(attention(&ThreadPool::new(1), &[0.0; 12], 1, &kv, &p, &mut out).is_err());
    }
}
