//! Element-wise and per-row float kernels: RMSNorm, RoPE, softmax, activations and arithmetic.
//!
//! Each function with an AVX2 path has an `_on(isa, ..)` twin so tests can run every path; the
//! plain function uses [`Isa::current`]. Scalar code follows ggml's CPU ops (including where ggml
//! accumulates in f64). AVX2 paths use a polynomial `exp` (within 2 ulp) and reorder sums, so
//! they agree with the scalar reference to a few ulp, not bit for bit; tests state the bounds.
//!
//! Length mismatches between arguments are programmer errors and panic.

use crate::cpu::Isa;

fn same_len(a: usize, b: usize, what: &str) {
    assert_eq!(a, b, "{what}: lengths differ");
}

/// RMSNorm of each `dim`-sized row of `x` into `out`: `out = x / sqrt(mean(x^2) + eps) * w`,
/// without the multiplication when `weight` is `None`.
///
/// As ggml: squares in f32 summed in f64, `1/sqrtf` of the f32 mean, then the scale and the
/// weight applied as two separate roundings. (Gemma's `1 + w` is already in GGUF weights.)
///
/// # Panics
///
/// When `dim` is 0 or does not divide `x.len()`, `out.len() != x.len()`, or
/// `weight.len() != dim`.
pub fn rms_norm(x: &[f32], out: &mut [f32], dim: usize, weight: Option<&[f32]>, eps: f32) {
    rms_norm_on(Isa::current(), x, out, dim, weight, eps)
}

/// [`rms_norm`] on a given instruction set.
pub fn rms_norm_on(
    isa: Isa,
    x: &[f32],
    out: &mut [f32],
    dim: usize,
    weight: Option<&[f32]>,
    eps: f32,
) {
    assert!(dim > 0 && x.len().is_multiple_of(dim), "rms_norm: rows of {dim}");
    same_len(x.len(), out.len(), "rms_norm");
    if let Some(w) = weight {
        same_len(w.len(), dim, "rms_norm weight");
    }
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let sum = sum_squares(isa, xr);
        let mean = (sum / dim as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        scale_into(isa, xr, scale, or);
        if let Some(w) = weight {
            mul_in_place(isa, or, w);
        }
    }
}

fn sum_squares(isa: Isa, x: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: an `Isa` reporting AVX2 comes from detection, so the CPU has AVX2+FMA+F16C.
        return unsafe { avx2::sum_squares(x) };
    }
    let _ = isa;
    x.iter().map(|&v| f64::from(v * v)).sum()
}

fn scale_into(isa: Isa, x: &[f32], s: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: as in `sum_squares`.
        return unsafe { avx2::scale_into(x, s, out) };
    }
    let _ = isa;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * s;
    }
}

fn mul_in_place(isa: Isa, x: &mut [f32], w: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: as in `sum_squares`.
        return unsafe { avx2::mul_in_place(x, w) };
    }
    let _ = isa;
    for (o, &v) in x.iter_mut().zip(w) {
        *o *= v;
    }
}

/// Which pairs RoPE rotates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeMode {
    /// ggml mode 0 (`llama`): adjacent pairs `(x[2i], x[2i+1])`.
    Norm,
    /// ggml mode 2 (`gemma3`, `qwen2`): pairs `(x[i], x[i + n_dims/2])`.
    Neox,
}

/// RoPE parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    /// Pair layout.
    pub mode: RopeMode,
    /// Leading dimensions of each head that rotate (even, at most `head_dim`); the rest pass
    /// through.
    pub n_dims: usize,
    /// `rope.freq_base`.
    pub freq_base: f32,
    /// Linear position scaling (`1 / rope.scaling.factor`; 1 for none).
    pub freq_scale: f32,
}

impl Rope {
    /// Fills `cache` (`n_dims` values) with `(cos, sin)` of each pair's angle at `pos`.
    ///
    /// As ggml: `theta_i = pos * freq_scale * base^(-2i/n_dims)`, with the powers built by
    /// repeated multiplication in f32 (`theta *= powf(base, -2/n_dims)`), cos and sin in f32.
    ///
    /// # Panics
    ///
    /// When `cache.len() != n_dims` or `n_dims` is odd.
    pub fn cache(&self, pos: usize, cache: &mut [f32]) {
        assert!(self.n_dims.is_multiple_of(2), "rope: odd n_dims {}", self.n_dims);
        same_len(cache.len(), self.n_dims, "rope cache");
        let theta_scale = self.freq_base.powf(-2.0 / self.n_dims as f32);
        let mut theta = pos as f32;
        for cs in cache.chunks_exact_mut(2) {
            let t = self.freq_scale * theta;
            cs[0] = t.cos();
            cs[1] = t.sin();
            theta *= theta_scale;
        }
    }

    /// Rotates each `head_dim`-sized head of `x` (any number of heads of one token) with a
    /// table from [`Rope::cache`].
    ///
    /// # Panics
    ///
    /// When `head_dim` does not divide `x.len()`, `n_dims > head_dim`, or the cache length is
    /// not `n_dims`.
    pub fn apply(&self, cache: &[f32], x: &mut [f32], head_dim: usize) {
        self.apply_on(Isa::current(), cache, x, head_dim)
    }

    /// [`Rope::apply`] on a given instruction set (the same bits on each: the AVX2 path takes
    /// the same two products and one sum per value as the scalar one).
    pub fn apply_on(&self, isa: Isa, cache: &[f32], x: &mut [f32], head_dim: usize) {
        same_len(cache.len(), self.n_dims, "rope cache");
        assert!(
            self.n_dims <= head_dim && head_dim > 0 && x.len().is_multiple_of(head_dim),
            "rope: heads of {head_dim} with {} rotated dims",
            self.n_dims
        );
        let half = self.n_dims / 2;
        for head in x.chunks_exact_mut(head_dim) {
            // Pairs from `done` on are left to the scalar loop.
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if isa.avx2() {
                // SAFETY: an `Isa` reporting AVX2 comes from detection, so the CPU has
                // AVX2+FMA+F16C.
                done = unsafe {
                    match self.mode {
                        RopeMode::Norm => avx2::rope_norm(cache, &mut head[..self.n_dims]),
                        RopeMode::Neox => avx2::rope_neox(cache, &mut head[..self.n_dims]),
                    }
                };
            }
            let _ = isa;
            for (i, cs) in cache.chunks_exact(2).enumerate().skip(done) {
                let (c, s) = (cs[0], cs[1]);
                let (a, b) = match self.mode {
                    RopeMode::Norm => (2 * i, 2 * i + 1),
                    RopeMode::Neox => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    }

    /// [`Rope::cache`] then [`Rope::apply`] for one token at `pos`.
    pub fn rotate(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        let mut cache = vec![0.0; self.n_dims];
        self.cache(pos, &mut cache);
        self.apply(&cache, x, head_dim);
    }
}

/// In-place softmax of each `dim`-sized row: `exp(x - max) / sum`, the sum accumulated in f64
/// as ggml does. A row of all `-inf` becomes NaN, as in ggml.
///
/// # Panics
///
/// When `dim` is 0 or does not divide `x.len()`.
pub fn softmax(x: &mut [f32], dim: usize) {
    softmax_on(Isa::current(), x, dim)
}

/// [`softmax`] on a given instruction set.
pub fn softmax_on(isa: Isa, x: &mut [f32], dim: usize) {
    assert!(dim > 0 && x.len().is_multiple_of(dim), "softmax: rows of {dim}");
    for row in x.chunks_exact_mut(dim) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let sum = exp_sub_sum(isa, row, max);
        let inv = (1.0 / sum) as f32;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// `x[i] = exp(x[i] - max)`, returning the sum.
pub(crate) fn exp_sub_sum(isa: Isa, x: &mut [f32], max: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: an `Isa` reporting AVX2 comes from detection, so the CPU has AVX2+FMA+F16C.
        return unsafe { avx2::exp_sub_sum(x, max) };
    }
    let _ = isa;
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += f64::from(*v);
    }
    sum
}

/// `out = silu(x) = x / (1 + exp(-x))`.
///
/// # Panics
///
/// When the lengths differ.
pub fn silu(x: &[f32], out: &mut [f32]) {
    silu_on(Isa::current(), x, out)
}

/// [`silu`] on a given instruction set.
pub fn silu_on(isa: Isa, x: &[f32], out: &mut [f32]) {
    same_len(x.len(), out.len(), "silu");
    glu(isa, Act::Silu, x, None, out)
}

/// SwiGLU: `out = silu(gate) * up`.
///
/// # Panics
///
/// When the lengths differ.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    swiglu_on(Isa::current(), gate, up, out)
}

/// [`swiglu`] on a given instruction set.
pub fn swiglu_on(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    same_len(gate.len(), out.len(), "swiglu");
    same_len(up.len(), out.len(), "swiglu");
    glu(isa, Act::Silu, gate, Some(up), out)
}

/// GELU, tanh approximation: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, computed in
/// f32 (ggml's CPU op may use an f16 lookup table instead; this is the formula it tabulates).
///
/// # Panics
///
/// When the lengths differ.
pub fn gelu_tanh(x: &[f32], out: &mut [f32]) {
    gelu_tanh_on(Isa::current(), x, out)
}

/// [`gelu_tanh`] on a given instruction set.
pub fn gelu_tanh_on(isa: Isa, x: &[f32], out: &mut [f32]) {
    same_len(x.len(), out.len(), "gelu");
    glu(isa, Act::Gelu, x, None, out)
}

/// GeGLU (Gemma's feed-forward): `out = gelu_tanh(gate) * up`.
///
/// # Panics
///
/// When the lengths differ.
pub fn geglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    geglu_on(Isa::current(), gate, up, out)
}

/// [`geglu`] on a given instruction set.
pub fn geglu_on(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    same_len(gate.len(), out.len(), "geglu");
    same_len(up.len(), out.len(), "geglu");
    glu(isa, Act::Gelu, gate, Some(up), out)
}

#[derive(Clone, Copy)]
enum Act {
    Silu,
    Gelu,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_COEF_A: f32 = 0.044_715;

fn silu1(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn gelu1(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x)).tanh())
}

fn glu(isa: Isa, act: Act, x: &[f32], up: Option<&[f32]>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: an `Isa` reporting AVX2 comes from detection, so the CPU has AVX2+FMA+F16C.
        return unsafe { avx2::glu(act, x, up, out) };
    }
    let _ = isa;
    let f = match act {
        Act::Silu => silu1,
        Act::Gelu => gelu1,
    };
    match up {
        Some(u) => {
            for ((o, &g), &u) in out.iter_mut().zip(x).zip(u) {
                *o = f(g) * u;
            }
        }
        None => {
            for (o, &g) in out.iter_mut().zip(x) {
                *o = f(g);
            }
        }
    }
}

/// `x += y` (the residual connection).
///
/// # Panics
///
/// When the lengths differ.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    same_len(x.len(), y.len(), "add");
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `x *= y` element-wise.
///
/// # Panics
///
/// When the lengths differ.
pub fn mul_assign(x: &mut [f32], y: &[f32]) {
    same_len(x.len(), y.len(), "mul");
    for (a, &b) in x.iter_mut().zip(y) {
        *a *= b;
    }
}

/// `x *= s`.
pub fn scale(x: &mut [f32], s: f32) {
    for a in x.iter_mut() {
        *a *= s;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{gelu1, silu1, Act, GELU_COEF_A, SQRT_2_OVER_PI};
    use crate::simd::{exp_ps, hsum_ps, load_f32x8, store_f32x8};

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn sum_squares(x: &[f32]) -> f64 {
        let (chunks, tail) = x.as_chunks::<8>();
        let mut lo = _mm256_setzero_pd();
        let mut hi = _mm256_setzero_pd();
        for c in chunks {
            let v = load_f32x8(c);
            let sq = _mm256_mul_ps(v, v);
            lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(sq)));
            hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(sq)));
        }
        let s = _mm256_add_pd(lo, hi);
        let s2 = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd::<1>(s));
        let mut sum = _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)));
        for &v in tail {
            sum += f64::from(v * v);
        }
        sum
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn scale_into(x: &[f32], s: f32, out: &mut [f32]) {
        let sv = _mm256_set1_ps(s);
        let (xc, xt) = x.as_chunks::<8>();
        let (oc, ot) = out.as_chunks_mut::<8>();
        for (o, c) in oc.iter_mut().zip(xc) {
            store_f32x8(o, _mm256_mul_ps(load_f32x8(c), sv));
        }
        for (o, &v) in ot.iter_mut().zip(xt) {
            *o = v * s;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn mul_in_place(x: &mut [f32], w: &[f32]) {
        let (wc, wt) = w.as_chunks::<8>();
        let (xc, xt) = x.as_chunks_mut::<8>();
        for (o, c) in xc.iter_mut().zip(wc) {
            let v = _mm256_mul_ps(load_f32x8(o), load_f32x8(c));
            store_f32x8(o, v);
        }
        for (o, &v) in xt.iter_mut().zip(wt) {
            *o *= v;
        }
    }

    /// RoPE of adjacent pairs over whole groups of four pairs of `x` (`cache` its `(cos, sin)`
    /// pairs, as long as `x`); returns the pairs done. The cache's pairs line up with the
    /// values': `x0 * c - x1 * s` in even lanes and `x1 * c + x0 * s` in odd ones.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn rope_norm(cache: &[f32], x: &mut [f32]) -> usize {
        let (xc, _) = x.as_chunks_mut::<8>();
        let (cc, _) = cache.as_chunks::<8>();
        for (v, cs) in xc.iter_mut().zip(cc) {
            let (xv, csv) = (load_f32x8(v), load_f32x8(cs));
            let c = _mm256_moveldup_ps(csv);
            let s = _mm256_movehdup_ps(csv);
            let swapped = _mm256_permute_ps::<0b1011_0001>(xv);
            store_f32x8(v, _mm256_addsub_ps(_mm256_mul_ps(xv, c), _mm256_mul_ps(swapped, s)));
        }
        xc.len().min(cc.len()) * 4
    }

    /// RoPE of the pairs `(x[i], x[i + half])` for whole groups of eight `i`, `half` being
    /// `x.len() / 2` (`cache` the `(cos, sin)` pairs); returns the pairs done.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn rope_neox(cache: &[f32], x: &mut [f32]) -> usize {
        let half = x.len() / 2;
        let (lo, hi) = x.split_at_mut(half);
        let (lc, _) = lo.as_chunks_mut::<8>();
        let (hc, _) = hi.as_chunks_mut::<8>();
        let (cc, _) = cache.as_chunks::<16>();
        let mut done = 0;
        for ((l, h), cs) in lc.iter_mut().zip(hc).zip(cc) {
            let a = load_f32x8(cs[..8].try_into().unwrap());
            let b = load_f32x8(cs[8..].try_into().unwrap());
            // Even elements are the cosines, odd ones the sines; shuffle_ps picks per 128-bit
            // lane, the permute puts the 64-bit halves back in order.
            let c = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b1101_1000>(_mm256_castps_pd(
                _mm256_shuffle_ps::<0b1000_1000>(a, b),
            )));
            let s = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b1101_1000>(_mm256_castps_pd(
                _mm256_shuffle_ps::<0b1101_1101>(a, b),
            )));
            let (x0, x1) = (load_f32x8(l), load_f32x8(h));
            store_f32x8(l, _mm256_sub_ps(_mm256_mul_ps(x0, c), _mm256_mul_ps(x1, s)));
            store_f32x8(h, _mm256_add_ps(_mm256_mul_ps(x0, s), _mm256_mul_ps(x1, c)));
            done += 8;
        }
        done
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn exp_sub_sum(x: &mut [f32], max: f32) -> f64 {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        let (xc, xt) = x.as_chunks_mut::<8>();
        for c in xc.iter_mut() {
            let e = exp_ps(_mm256_sub_ps(load_f32x8(c), m));
            store_f32x8(c, e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut sum = f64::from(hsum_ps(acc));
        for v in xt.iter_mut() {
            *v = (*v - max).exp();
            sum += f64::from(*v);
        }
        sum
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn act8(act: Act, x: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        match act {
            Act::Silu => {
                let neg = _mm256_xor_ps(x, _mm256_set1_ps(-0.0));
                _mm256_div_ps(x, _mm256_add_ps(one, exp_ps(neg)))
            }
            Act::Gelu => {
                let x2 = _mm256_mul_ps(x, x);
                let inner = _mm256_mul_ps(
                    _mm256_mul_ps(_mm256_set1_ps(SQRT_2_OVER_PI), x),
                    _mm256_fmadd_ps(_mm256_set1_ps(GELU_COEF_A), x2, one),
                );
                // tanh(z) = 1 - 2 / (exp(2z) + 1): saturates correctly at both ends.
                let e = exp_ps(_mm256_add_ps(inner, inner));
                let t =
                    _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0), _mm256_add_ps(e, one)));
                _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5), x), _mm256_add_ps(one, t))
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn glu(act: Act, x: &[f32], up: Option<&[f32]>, out: &mut [f32]) {
        let (xc, xt) = x.as_chunks::<8>();
        let (oc, ot) = out.as_chunks_mut::<8>();
        let f = match act {
            Act::Silu => silu1,
            Act::Gelu => gelu1,
        };
        match up {
            Some(u) => {
                let (uc, ut) = u.as_chunks::<8>();
                for ((o, c), uu) in oc.iter_mut().zip(xc).zip(uc) {
                    store_f32x8(o, _mm256_mul_ps(act8(act, load_f32x8(c)), load_f32x8(uu)));
                }
                for ((o, &g), &uu) in ot.iter_mut().zip(xt).zip(ut) {
                    *o = f(g) * uu;
                }
            }
            None => {
                for (o, c) in oc.iter_mut().zip(xc) {
                    store_f32x8(o, act8(act, load_f32x8(c)));
                }
                for (o, &g) in ot.iter_mut().zip(xt) {
                    *o = f(g);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn close(a: f32, b: f32, rel: f32, abs: f32) -> bool {
        (a - b).abs() <= abs + rel * a.abs().max(b.abs())
    }

    #[test]
    fn rms_norm_hand_values() {
        // Row [3, 4]: mean square 12.5.
        let x = [3.0f32, 4.0, 1.0, 1.0];
        let mut out = [0.0f32; 4];
        for isa in Isa::all_supported() {
            rms_norm_on(isa, &x, &mut out, 2, Some(&[1.0, 2.0]), 0.0);
            let s = 1.0 / 12.5f32.sqrt();
            assert_eq!(out, [3.0 * s, 4.0 * s * 2.0, 1.0, 2.0], "{isa:?}");
        }
    }

    #[test]
    fn rope_norm_and_neox_pairs() {
        // n_dims 4, base 10000: pair 0 angle = pos, pair 1 angle = pos / 100.
        let pos = 3;
        for (mode, pairs) in
            [(RopeMode::Norm, [(0usize, 1usize), (2, 3)]), (RopeMode::Neox, [(0, 2), (1, 3)])]
        {
            let rope = Rope { mode, n_dims: 4, freq_base: 10000.0, freq_scale: 1.0 };
            let mut x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
            let orig = x;
            rope.rotate(&mut x, 6, pos);
            for (k, (a, b)) in pairs.into_iter().enumerate() {
                let th = pos as f64 * 10000f64.powf(-(2.0 * k as f64) / 4.0);
                let (c, s) = (th.cos(), th.sin());
                let want_a = f64::from(orig[a]) * c - f64::from(orig[b]) * s;
                let want_b = f64::from(orig[a]) * s + f64::from(orig[b]) * c;
                assert!((f64::from(x[a]) - want_a).abs() < 1e-5, "{mode:?}");
                assert!((f64::from(x[b]) - want_b).abs() < 1e-5, "{mode:?}");
            }
            // Dimensions past n_dims pass through; position 0 is the identity.
            assert_eq!(&x[4..], &orig[4..]);
            let mut y = orig;
            rope.rotate(&mut y, 6, 0);
            assert_eq!(y, orig);
        }
    }

    proptest! {
        #[test]
        fn rope_is_the_same_bits_on_every_isa(
            neox in any::<bool>(),
            pairs in 1usize..40,
            extra in 0usize..5,
            heads in 1usize..4,
            // From 1: at position 0 RoPE is the identity (`rope_norm_and_neox_pairs` checks that),
            // and the check below that it moved something would fail.
            pos in 1usize..5000,
            seed in 0u32..1000,
        ) {
            let mode = if neox { RopeMode::Neox } else { RopeMode::Norm };
            let rope = Rope { mode, n_dims: 2 * pairs, freq_base: 10000.0, freq_scale: 1.0 };
            let head_dim = 2 * pairs + extra;
            let mut cache = vec![0.0; rope.n_dims];
            rope.cache(pos, &mut cache);
            let x: Vec<f32> = (0..heads * head_dim)
                .map(|i| ((i as u32 ^ seed).wrapping_mul(2654435761) % 2001) as f32 / 100.0 - 10.0)
                .collect();
            let mut want = x.clone();
            rope.apply_on(Isa::scalar(), &cache, &mut want, head_dim);
            prop_assert_ne!(&want, &x);
            for isa in Isa::all_supported() {
                let mut got = x.clone();
                rope.apply_on(isa, &cache, &mut got, head_dim);
                let (g, w): (Vec<u32>, Vec<u32>) =
                    got.iter().zip(&want).map(|(a, b)| (a.to_bits(), b.to_bits())).unzip();
                prop_assert_eq!(g, w, "{:?} {:?}", isa, mode);
            }
        }
    }

    #[test]
    fn rope_keeps_norms_of_pairs() {
        let rope = Rope { mode: RopeMode::Neox, n_dims: 64, freq_base: 1e6, freq_scale: 0.125 };
        let mut x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
        let n0: f32 = x.iter().map(|v| v * v).sum();
        rope.rotate(&mut x, 64, 12345);
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4 * n0);
    }

    #[test]
    fn softmax_is_stable_and_normalized() {
        let mut x = [1000.0f32, 1001.0, f32::NEG_INFINITY, 999.0];
        for isa in Isa::all_supported() {
            let mut y = x;
            softmax_on(isa, &mut y, 4);
            let e = [(-1.0f64).exp(), 1.0, 0.0, (-2.0f64).exp()];
            let s: f64 = e.iter().sum();
            for (g, w) in y.iter().zip(e) {
                assert!((f64::from(*g) - w / s).abs() < 1e-6, "{isa:?} {y:?}");
            }
        }
        softmax(&mut x, 2);
        assert!((x[0] + x[1] - 1.0).abs() < 1e-6);
        assert_eq!(x[2], 0.0);
        assert_eq!(x[3], 1.0);
    }

    fn vals() -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(prop_oneof![-10.0f32..10.0, -100.0f32..100.0, -1e-3f32..1e-3], 1..70)
    }

    proptest! {
        #[test]
        fn float_ops_agree_with_scalar(x in vals(), seed in 0u32..1000) {
            let n = x.len();
            let y: Vec<f32> = (0..n).map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) % 2000).map(|v| v as f32 / 1000.0 - 1.0).collect();
            let s = Isa::scalar();
            for isa in Isa::all_supported() {
                // rms_norm: the f64 sum of squares is reordered, so allow 2 ulp.
                let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
                rms_norm_on(s, &x, &mut a, n, Some(&y), 1e-6);
                rms_norm_on(isa, &x, &mut b, n, Some(&y), 1e-6);
                for (p, q) in a.iter().zip(&b) {
                    prop_assert!(close(*p, *q, 2.5e-7, 0.0), "rms {:?} {} {}", isa, p, q);
                }
                // softmax: exp within 2 ulp, sum reordered.
                let (mut a, mut b) = (x.clone(), x.clone());
                softmax_on(s, &mut a, n);
                softmax_on(isa, &mut b, n);
                for (p, q) in a.iter().zip(&b) {
                    prop_assert!(close(*p, *q, 1e-6, 1e-30), "softmax {:?} {} {}", isa, p, q);
                }
                // SwiGLU and GeGLU: exp within 2 ulp; tanh through exp loses up to ~1e-7
                // absolute near 0.
                let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
                swiglu_on(s, &x, &y, &mut a);
                swiglu_on(isa, &x, &y, &mut b);
                for (p, q) in a.iter().zip(&b) {
                    prop_assert!(close(*p, *q, 1e-6, 1e-30), "swiglu {:?} {} {}", isa, p, q);
                }
                geglu_on(s, &x, &y, &mut a);
                geglu_on(isa, &x, &y, &mut b);
                for (p, q) in a.iter().zip(&b) {
                    prop_assert!(close(*p, *q, 1e-6, 1e-6), "geglu {:?} {} {}", isa, p, q);
                }
                silu_on(isa, &x, &mut b);
                gelu_tanh_on(isa, &x, &mut a);
                for ((&v, &si), &ge) in x.iter().zip(&b).zip(&a) {
                    let want_si = f64::from(v) / (1.0 + (-f64::from(v)).exp());
                    prop_assert!((f64::from(si) - want_si).abs() <= 1e-6 * want_si.abs() + 1e-30);
                    let vv = f64::from(v);
                    let want_ge = 0.5 * vv * (1.0 + (0.7978845608 * (vv + 0.044715 * vv * vv * vv)).tanh());
                    prop_assert!((f64::from(ge) - want_ge).abs() <= 2e-6 * want_ge.abs() + 1e-6);
                }
            }
        }
    }

    #[test]
    fn activation_hand_values() {
        let x = [0.0f32, 1.0, -1.0, 20.0, -20.0];
        let mut o = [0.0f32; 5];
        for isa in Isa::all_supported() {
            silu_on(isa, &x, &mut o);
            assert_eq!(o[0], 0.0);
            assert!((o[1] - 0.731_058_6).abs() < 1e-6, "{isa:?} {o:?}");
            assert!((o[2] + 0.268_941_43).abs() < 1e-6);
            assert!((o[3] - 20.0).abs() < 1e-5 && o[4].abs() < 1e-7);
            gelu_tanh_on(isa, &x, &mut o);
            assert_eq!(o[0], 0.0);
            assert!((o[1] - 0.841_192).abs() < 1e-6, "{isa:?} {o:?}");
            assert!((o[2] + 0.158_808).abs() < 1e-6);
            assert_eq!(o[3], 20.0);
            assert!(o[4].abs() < 1e-6);
        }
        let mut a = [1.0f32, 2.0];
        add_assign(&mut a, &[0.5, 0.5]);
        mul_assign(&mut a, &[2.0, 4.0]);
        scale(&mut a, 0.5);
        assert_eq!(a, [1.5, 5.0]);
    }
}
