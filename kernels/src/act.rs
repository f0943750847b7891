//! Activations quantized for the integer dot products.
//!
//! ggml multiplies Q4_0/Q5_0/Q8_0 weights with activations in Q8_0 and Q4_1/Q5_1 weights with
//! activations in Q8_1. The two agree on `d` and `qs` (`d = amax/127`, `q = roundf(x/d)`); Q8_1
//! adds `s = d * sum(qs)`. [`QuantizedActs`] holds both at once, laid out for SIMD: the quants of
//! a token contiguous, and `d` and `s` as f32 arrays holding exactly the f16 values the block
//! formats would store. [`QuantizedActs::q8_0_blocks`] and [`QuantizedActs::q8_1_blocks`] give
//! the GGUF blocks back, equal to `quantize_row_q8_0`/`quantize_row_q8_1`.
//!
//! This is ggml's *reference* activation quantizer. ggml's AVX2 build quantizes activations
//! differently (`id = 127/amax` and round-half-to-even), so its dot products can differ from ours
//! in the last bits; both are valid roundings of the same definition.
//!
//! The k-quants (Q2_K .. Q6_K) multiply with activations in Q8_K instead ([`ActFormat::Q8K`]):
//! blocks of 256 with an f32 `d = 1 / (-127 / max)` (`max` the first value of largest magnitude,
//! so `d` has the opposite sign), quants `nearest_int(x * (-127 / max))` rounded half to even, and
//! `bsums`, the sums of each 16 quants, which the dot products use for the minimum and offset
//! terms. That is `quantize_row_q8_K_ref`, which ggml's x86 builds also run for activations, so
//! these Q8_K rows are bit-identical to llama.cpp's. [`QuantizedActs::q8_k_blocks`] gives the
//! blocks back, equal to `quantize_row_q8_k`.

use std::sync::Mutex;

use crate::cpu::Isa;
use crate::error::check_len;
use crate::formats::{f16_le_from, round_f16, BlockQ8_0, BlockQ8_1, QK};
use crate::kquants::{quantize_q8_k_block, BlockQ8K, QK_K};
use crate::pool::ThreadPool;
use crate::{GgmlType, KernelError};

/// The block format activations are quantized to: ggml's `vec_dot_type` of the weights they
/// multiply ([`crate::dot::act_format`] says which).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ActFormat {
    /// Blocks of 32: Q8_0's `d` and `qs` with Q8_1's `s`. For Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0.
    #[default]
    Q8_0,
    /// Q8_K: blocks of 256 with an f32 `d` and the sums of each 16 quants. For Q2_K .. Q6_K.
    Q8K,
}

impl ActFormat {
    /// Values per block.
    pub const fn block_size(self) -> usize {
        match self {
            ActFormat::Q8_0 => QK,
            ActFormat::Q8K => QK_K,
        }
    }

    /// The GGUF type whose blocks these are.
    pub const fn ty(self) -> GgmlType {
        match self {
            ActFormat::Q8_0 => GgmlType::Q8_0,
            ActFormat::Q8K => GgmlType::Q8K,
        }
    }
}

/// A batch of activation rows quantized to Q8_0/Q8_1 or Q8_K values (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct QuantizedActs {
    n_tokens: usize,
    cols: usize,
    format: ActFormat,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    bsums: Vec<i16>,
}

/// The sum of a block's quants: what the products of weights stored with an offset (Q4_0,
/// Q5_0) take off, `offset * sum(qs)`.
#[inline]
pub(crate) fn quant_sum(qs: &[i8]) -> i32 {
    qs.iter().map(|&q| i32::from(q)).sum()
}

/// One quantized token row: `cols` quants and, per block, `d` and (Q8_0 format) `s` or (Q8_K
/// format) sixteen `bsums`.
#[derive(Clone, Copy, Debug)]
pub struct ActRow<'a> {
    /// The block format.
    pub format: ActFormat,
    /// The quants.
    pub qs: &'a [i8],
    /// Per-block scale: in Q8_0 format an f16 value widened to f32, in Q8_K format an f32.
    pub d: &'a [f32],
    /// Q8_0 format: per block `d * sum(qs)` (with the unrounded `d`), an f16 value widened to
    /// f32. Empty in Q8_K format.
    pub s: &'a [f32],
    /// Q8_K format: the sum of each 16 quants. Empty in Q8_0 format.
    pub bsums: &'a [i16],
}

impl QuantizedActs {
    /// An empty buffer; [`QuantizedActs::quantize`] sizes it.
    pub fn new() -> QuantizedActs {
        QuantizedActs::default()
    }

    /// Tokens held.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Values per token.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The block format of the quants held.
    pub fn format(&self) -> ActFormat {
        self.format
    }

    /// Quantizes `x` (`n_tokens` rows of `cols`, row-major) to Q8_0/Q8_1 values, reusing this
    /// buffer's memory. Uses the pool when there are several tokens.
    ///
    /// Errors when `cols` is not a multiple of 32 or `x.len() != n_tokens * cols`.
    pub fn quantize(
        &mut self,
        pool: &ThreadPool,
        x: &[f32],
        n_tokens: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        self.quantize_on(Isa::current(), pool, x, n_tokens, cols)
    }

    /// [`QuantizedActs::quantize`] on a given instruction set.
    pub fn quantize_on(
        &mut self,
        isa: Isa,
        pool: &ThreadPool,
        x: &[f32],
        n_tokens: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        self.quantize_as_on(isa, ActFormat::Q8_0, pool, x, n_tokens, cols)
    }

    /// Quantizes `x` as [`QuantizedActs::quantize`] does, to `format`.
    ///
    /// Errors when `cols` is not a multiple of the format's block size or
    /// `x.len() != n_tokens * cols`.
    pub fn quantize_as(
        &mut self,
        format: ActFormat,
        pool: &ThreadPool,
        x: &[f32],
        n_tokens: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        self.quantize_as_on(Isa::current(), format, pool, x, n_tokens, cols)
    }

    /// [`QuantizedActs::quantize_as`] on a given instruction set.
    pub fn quantize_as_on(
        &mut self,
        isa: Isa,
        format: ActFormat,
        pool: &ThreadPool,
        x: &[f32],
        n_tokens: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        let bs = format.block_size();
        if !cols.is_multiple_of(bs) {
            return Err(KernelError::NotBlockMultiple { ty: format.ty(), n: cols });
        }
        check_len("activations", n_tokens * cols, x.len())?;
        let nb = cols / bs;
        // Per token: the quants, `d`, and `s` (Q8_0) or `bsums` (Q8_K).
        let (s_len, bsums_len) = match format {
            ActFormat::Q8_0 => (nb, 0),
            ActFormat::Q8K => (0, cols / 16),
        };
        self.n_tokens = n_tokens;
        self.cols = cols;
        self.format = format;
        self.qs.resize(n_tokens * cols, 0);
        self.d.resize(n_tokens * nb, 0.0);
        self.s.resize(n_tokens * s_len, 0.0);
        self.bsums.resize(n_tokens * bsums_len, 0);
        if n_tokens == 0 || cols == 0 {
            return Ok(());
        }
        let per_task = tokens_per_task(cols);
        let n_tasks = n_tokens.div_ceil(per_task);
        if n_tasks <= 1 || pool.n_threads() == 1 {
            quantize_blocks(
                isa,
                format,
                x,
                &mut self.qs,
                &mut self.d,
                &mut self.s,
                &mut self.bsums,
            );
            return Ok(());
        }
        let xs = x.chunks(per_task * cols);
        let qs = self.qs.chunks_mut(per_task * cols);
        let ds = self.d.chunks_mut(per_task * nb);
        let ss = split(&mut self.s, per_task * s_len, n_tasks);
        let bss = split(&mut self.bsums, per_task * bsums_len, n_tasks);
        let parts: Vec<Mutex<Part<'_>>> = xs
            .zip(qs)
            .zip(ds)
            .zip(ss)
            .zip(bss)
            .map(|((((x, q), d), s), b)| Mutex::new((x, q, d, s, b)))
            .collect();
        pool.run(parts.len(), |i| {
            let mut g = parts[i].lock().unwrap_or_else(|e| e.into_inner());
            let (x, q, d, s, b) = &mut *g;
            quantize_blocks(isa, format, x, q, d, s, b);
        });
        Ok(())
    }

    /// Token `t`'s row.
    ///
    /// # Panics
    ///
    /// When `t >= n_tokens`.
    pub fn row(&self, t: usize) -> ActRow<'_> {
        assert!(t < self.n_tokens, "token {t} of {}", self.n_tokens);
        let nb = self.cols / self.format.block_size();
        let (s_len, bsums_len) = match self.format {
            ActFormat::Q8_0 => (nb, 0),
            ActFormat::Q8K => (0, self.cols / 16),
        };
        ActRow {
            format: self.format,
            qs: &self.qs[t * self.cols..(t + 1) * self.cols],
            d: &self.d[t * nb..(t + 1) * nb],
            s: &self.s[t * s_len..(t + 1) * s_len],
            bsums: &self.bsums[t * bsums_len..(t + 1) * bsums_len],
        }
    }

    /// Token `t` as GGUF Q8_K blocks.
    ///
    /// # Panics
    ///
    /// When the activations are not in Q8_K format, or `t >= n_tokens`.
    pub fn q8_k_blocks(&self, t: usize) -> Vec<BlockQ8K> {
        assert_eq!(self.format, ActFormat::Q8K, "activations are not in Q8_K format");
        let r = self.row(t);
        r.qs.chunks_exact(QK_K)
            .zip(r.d.iter().zip(r.bsums.chunks_exact(16)))
            .map(|(q, (&d, bs))| BlockQ8K {
                d: d.to_le_bytes(),
                qs: q.try_into().expect("block of 256"),
                bsums: std::array::from_fn(|j| bs[j].to_le_bytes()),
            })
            .collect()
    }

    /// Token `t` as GGUF Q8_0 blocks.
    ///
    /// # Panics
    ///
    /// When the activations are not in Q8_0 format, or `t >= n_tokens`.
    pub fn q8_0_blocks(&self, t: usize) -> Vec<BlockQ8_0> {
        assert_eq!(self.format, ActFormat::Q8_0, "activations are not in Q8_0 format");
        let r = self.row(t);
        r.qs.chunks_exact(QK)
            .zip(r.d)
            .map(|(q, &d)| BlockQ8_0 { d: f16_le_from(d), qs: q.try_into().expect("block of 32") })
            .collect()
    }

    /// Token `t` as GGUF Q8_1 blocks.
    ///
    /// # Panics
    ///
    /// As [`QuantizedActs::q8_0_blocks`].
    pub fn q8_1_blocks(&self, t: usize) -> Vec<BlockQ8_1> {
        assert_eq!(self.format, ActFormat::Q8_0, "activations are not in Q8_0 format");
        let r = self.row(t);
        r.qs.chunks_exact(QK)
            .zip(r.d.iter().zip(r.s))
            .map(|(q, (&d, &s))| BlockQ8_1 {
                d: f16_le_from(d),
                s: f16_le_from(s),
                qs: q.try_into().expect("block of 32"),
            })
            .collect()
    }
}

/// Tokens of `cols` values that one task quantizes: enough work to be worth a wake-up, about
/// 16 Ki values. (A batch of at most this many is quantized on the calling thread.)
pub(crate) fn tokens_per_task(cols: usize) -> usize {
    (16384 / cols.max(1)).max(1)
}

/// One task's share: input values, and the quants, scales, and sums (`s` or `bsums`) they
/// produce.
type Part<'a> = (&'a [f32], &'a mut [i8], &'a mut [f32], &'a mut [f32], &'a mut [i16]);

/// `v` in `n` chunks of `chunk` (the last shorter), or `n` empty slices when `chunk` is 0.
fn split<T>(v: &mut [T], chunk: usize, n: usize) -> Vec<&mut [T]> {
    if chunk == 0 {
        (0..n).map(|_| &mut [][..]).collect()
    } else {
        v.chunks_mut(chunk).collect()
    }
}

fn quantize_blocks(
    isa: Isa,
    format: ActFormat,
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    bsums: &mut [i16],
) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: an `Isa` reporting AVX2 comes from detection, so the CPU has AVX2+FMA+F16C.
        unsafe {
            match format {
                ActFormat::Q8_0 => avx2::quantize_blocks(x, qs, d, s),
                ActFormat::Q8K => avx2::quantize_k_blocks(x, qs, d, bsums),
            }
        };
        return;
    }
    let _ = isa;
    match format {
        ActFormat::Q8_0 => quantize_blocks_scalar(x, qs, d, s),
        ActFormat::Q8K => quantize_k_blocks_scalar(x, qs, d, bsums),
    }
}

/// The Q8_K reference: `quantize_row_q8_K_ref` written into the split layout.
pub(crate) fn quantize_k_blocks_scalar(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
    for (((xb, qb), db), sb) in x
        .as_chunks::<QK_K>()
        .0
        .iter()
        .zip(qs.as_chunks_mut::<QK_K>().0)
        .zip(d.iter_mut())
        .zip(bsums.as_chunks_mut::<16>().0)
    {
        *db = quantize_q8_k_block(xb, qb, sb);
    }
}

/// The reference: `quantize_row_q8_1_ref` written into the split layout.
pub(crate) fn quantize_blocks_scalar(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for (((xb, qb), db), sb) in
        x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).zip(d.iter_mut()).zip(s.iter_mut())
    {
        let mut amax = 0.0f32;
        for &v in xb {
            let a = v.abs();
            amax = if amax > a { amax } else { a };
        }
        let dd = amax / 127.0;
        let id = if dd != 0.0 { 1.0 / dd } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = (v * id).round() as i8;
            sum += i32::from(*q);
        }
        *db = round_f16(dd);
        *sb = round_f16(sum as f32 * dd);
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use crate::formats::QK;
    use crate::kquants::QK_K;
    use crate::simd::{hsum_epi32, load_f32x8, round_f16_1, store_i8x32};

    /// Q8_K blocks, bit-identical to `quantize_k_blocks_scalar` for finite input: `nearest_int`
    /// is round-half-even, which `_mm256_round_ps` does exactly for these magnitudes (`|x| <=
    /// 127`), and `min(127, q)` never binds there (`|x / max| <= 1`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn quantize_k_blocks(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for (((xb, qb), db), sb) in x
            .as_chunks::<QK_K>()
            .0
            .iter()
            .zip(qs.as_chunks_mut::<QK_K>().0)
            .zip(d.iter_mut())
            .zip(bsums.as_chunks_mut::<16>().0)
        {
            let xv = xb.as_chunks::<8>().0;
            let mut m = _mm256_setzero_ps();
            for v in xv {
                m = _mm256_max_ps(m, _mm256_and_ps(load_f32x8(v), abs_mask));
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
            if amax == 0.0 {
                qb.fill(0);
                sb.fill(0);
                *db = 0.0;
                continue;
            }
            // The first element of that magnitude, with its sign.
            let target = _mm256_set1_ps(amax);
            let mut max = 0.0f32;
            for (k, v) in xv.iter().enumerate() {
                let eq =
                    _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_and_ps(load_f32x8(v), abs_mask), target);
                let bits = _mm256_movemask_ps(eq);
                if bits != 0 {
                    max = xb[8 * k + bits.trailing_zeros() as usize];
                    break;
                }
            }
            let iscale = -127.0 / max;
            let iv = _mm256_set1_ps(iscale);
            let top = _mm256_set1_epi32(127);
            for (g, (qg, sg)) in
                qb.as_chunks_mut::<32>().0.iter_mut().zip(sb.as_chunks_mut::<2>().0).enumerate()
            {
                let mut q = [_mm256_setzero_si256(); 4];
                for (k, qk) in q.iter_mut().enumerate() {
                    let y = _mm256_mul_ps(load_f32x8(&xv[4 * g + k]), iv);
                    let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
                    *qk = _mm256_min_epi32(_mm256_cvtps_epi32(r), top);
                }
                sg[0] = hsum_epi32(_mm256_add_epi32(q[0], q[1])) as i16;
                sg[1] = hsum_epi32(_mm256_add_epi32(q[2], q[3])) as i16;
                let p01 = _mm256_packs_epi32(q[0], q[1]);
                let p23 = _mm256_packs_epi32(q[2], q[3]);
                let p = _mm256_packs_epi16(p01, p23);
                let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                store_i8x32(qg, p);
            }
            *db = 1.0 / iscale;
        }
    }

    /// Bit-identical to `quantize_blocks_scalar` for finite input.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn quantize_blocks(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
        for (((xb, qb), db), sb) in x
            .as_chunks::<QK>()
            .0
            .iter()
            .zip(qs.as_chunks_mut::<QK>().0)
            .zip(d.iter_mut())
            .zip(s.iter_mut())
        {
            (*db, *sb, _) = quantize_block(xb, qb);
        }
    }

    /// One block of [`quantize_blocks`]: its quants into `qb`; returns `d`, `s` and the sum of
    /// the quants (which `s` is `d` times, before rounding to f16).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(crate) fn quantize_block(xb: &[f32; QK], qb: &mut [i8; QK]) -> (f32, f32, i32) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
        // The float just below 1/2: `trunc(y + copysign(it, y))` is exactly `roundf(y)` (halves
        // away from zero), in half the instructions of truncating, then stepping by the
        // dropped part: below a half the sum stays below the next integer, from a half on it
        // rounds to it.
        let below_half = _mm256_set1_ps(0.5f32.next_down());
        let v = [
            load_f32x8(xb[0..8].try_into().unwrap()),
            load_f32x8(xb[8..16].try_into().unwrap()),
            load_f32x8(xb[16..24].try_into().unwrap()),
            load_f32x8(xb[24..32].try_into().unwrap()),
        ];
        let m01 = _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask));
        let m23 = _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask));
        let m = _mm256_max_ps(m01, m23);
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m1 = _mm_max_ss(m2, _mm_movehdup_ps(m2));
        let amax = _mm_cvtss_f32(m1);
        let dd = amax / 127.0;
        let id = _mm256_set1_ps(if dd != 0.0 { 1.0 / dd } else { 0.0 });
        let mut q = [_mm256_setzero_si256(); 4];
        for k in 0..4 {
            let y = _mm256_mul_ps(v[k], id);
            let nudge = _mm256_or_ps(_mm256_and_ps(y, sign_mask), below_half);
            q[k] = _mm256_cvttps_epi32(_mm256_add_ps(y, nudge));
        }
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256::<1>(sum));
        let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<0b01>(s2));
        let isum = _mm_cvtsi128_si32(s1);
        // packs works within 128-bit lanes; the permute restores element order.
        let p01 = _mm256_packs_epi32(q[0], q[1]);
        let p23 = _mm256_packs_epi32(q[2], q[3]);
        let p = _mm256_packs_epi16(p01, p23);
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        store_i8x32(qb, p);
        (round_f16_1(dd), round_f16_1(isum as f32 * dd), isum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::{quantize_row_q8_0, quantize_row_q8_1};
    use crate::kquants::BlockQ8K;
    use proptest::prelude::*;

    fn values() -> impl Strategy<Value = Vec<f32>> {
        (1usize..6).prop_flat_map(|nb| {
            prop::collection::vec(
                prop_oneof![
                    -100.0f32..100.0,
                    -1e-3f32..1e-3,
                    // Integers and halves make roundf's ties common.
                    (-254i32..254).prop_map(|i| i as f32 * 0.5),
                    Just(0.0f32),
                ],
                nb * 32,
            )
        })
    }

    proptest! {
        #[test]
        fn every_isa_matches_the_gguf_blocks(x in values()) {
            let pool = ThreadPool::new(1);
            let nb = x.len() / 32;
            let mut want0 = vec![BlockQ8_0::default(); nb];
            let mut want1 = vec![BlockQ8_1::default(); nb];
            quantize_row_q8_0(&x, &mut want0);
            quantize_row_q8_1(&x, &mut want1);
            for isa in Isa::all_supported() {
                let mut a = QuantizedActs::new();
                a.quantize_on(isa, &pool, &x, 1, x.len()).unwrap();
                prop_assert_eq!(&a.q8_0_blocks(0), &want0, "{:?}", isa);
                prop_assert_eq!(&a.q8_1_blocks(0), &want1, "{:?}", isa);
            }
        }
    }

    fn k_values() -> impl Strategy<Value = Vec<f32>> {
        (1usize..3).prop_flat_map(|nb| {
            prop::collection::vec(
                prop_oneof![
                    -100.0f32..100.0,
                    -1e-3f32..1e-3,
                    // With 127 as the largest magnitude, x.5 are nearest_int's ties.
                    (-254i32..254).prop_map(|i| i as f32 * 0.5),
                    Just(127.0f32),
                    Just(-127.0f32),
                    Just(0.0f32),
                ],
                nb * QK_K,
            )
        })
    }

    proptest! {
        #[test]
        fn every_isa_matches_the_q8_k_blocks(x in k_values(), zero_block in any::<bool>()) {
            let mut x = x;
            if zero_block {
                x[..QK_K].fill(0.0);
            }
            let pool = ThreadPool::new(1);
            let mut want = vec![BlockQ8K::default(); x.len() / QK_K];
            crate::kquants::quantize_row_q8_k(&x, &mut want);
            for isa in Isa::all_supported() {
                let mut a = QuantizedActs::new();
                a.quantize_as_on(isa, ActFormat::Q8K, &pool, &x, 1, x.len()).unwrap();
                prop_assert_eq!(&a.q8_k_blocks(0), &want, "{:?}", isa);
            }
        }
    }

    #[test]
    fn q8_k_rows_switch_format_and_reuse_the_buffer() {
        let pool = ThreadPool::new(3);
        let (n, cols) = (150, 512); // several tasks of 32 tokens
        let x: Vec<f32> = (0..n * cols).map(|i| ((i * 7919) % 1000) as f32 - 500.0).collect();
        let mut a = QuantizedActs::new();
        a.quantize(&pool, &x, n, cols).unwrap();
        assert_eq!(a.row(3).s.len(), 16);
        a.quantize_as(ActFormat::Q8K, &pool, &x, n, cols).unwrap();
        assert_eq!(a.format(), ActFormat::Q8K);
        let r = a.row(149);
        assert_eq!((r.qs.len(), r.d.len(), r.s.len(), r.bsums.len()), (512, 2, 0, 32));
        for t in [0, 31, 32, 149] {
            let mut want = vec![BlockQ8K::default(); 2];
            crate::kquants::quantize_row_q8_k(&x[t * cols..(t + 1) * cols], &mut want);
            assert_eq!(a.q8_k_blocks(t), want);
        }
        assert!(matches!(
            a.quantize_as(ActFormat::Q8K, &pool, &x[..288], 1, 288),
            Err(KernelError::NotBlockMultiple { ty: GgmlType::Q8K, n: 288 })
        ));
    }

    #[test]
    fn ties_round_away_from_zero_on_every_isa() {
        // amax 127 -> d = 1 and id = 1, so x*id is exactly the tie.
        let mut x = vec![0.0f32; 32];
        x[0] = 127.0;
        x[1] = 0.5;
        x[2] = -0.5;
        x[3] = 1.5;
        x[4] = -2.5;
        let pool = ThreadPool::new(1);
        for isa in Isa::all_supported() {
            let mut a = QuantizedActs::new();
            a.quantize_on(isa, &pool, &x, 1, 32).unwrap();
            assert_eq!(&a.row(0).qs[..5], &[127, 1, -1, 2, -3], "{isa:?}");
            assert_eq!(a.row(0).s[0], 127.0 + 1.0 - 1.0 + 2.0 - 3.0);
        }
    }

    #[test]
    fn every_half_and_its_neighbours_round_as_roundf_on_every_isa() {
        // Each block leads with 127, so id = 1 and the quantizer rounds the values themselves:
        // every half up to 126.5 either way, and the floats just below and above each.
        let mut vals = Vec::new();
        for k in -127..127 {
            let h = k as f32 + 0.5;
            vals.extend([h.next_down(), h, h.next_up()]);
        }
        let x: Vec<f32> = vals
            .chunks(31)
            .flat_map(|c| {
                [127.0]
                    .into_iter()
                    .chain(c.iter().copied())
                    .chain(std::iter::repeat_n(0.0, 31 - c.len()))
            })
            .collect();
        let pool = ThreadPool::new(1);
        for isa in Isa::all_supported() {
            let mut a = QuantizedActs::new();
            a.quantize_on(isa, &pool, &x, 1, x.len()).unwrap();
            let want: Vec<i8> = x.iter().map(|v| v.round() as i8).collect();
            assert_eq!(a.row(0).qs, &want[..], "{isa:?}");
        }
    }

    #[test]
    fn batch_split_across_pool_matches_serial() {
        let pool = ThreadPool::new(3);
        let cols = 64;
        let n = 700; // several tasks of 256 tokens
        let x: Vec<f32> = (0..n * cols).map(|i| ((i * 7919) % 1000) as f32 - 500.0).collect();
        let mut par = QuantizedActs::new();
        par.quantize(&pool, &x, n, cols).unwrap();
        let mut ser = QuantizedActs::new();
        ser.quantize(&ThreadPool::new(1), &x, n, cols).unwrap();
        for t in [0, 255, 256, 699] {
            assert_eq!(par.q8_1_blocks(t), ser.q8_1_blocks(t));
        }
        assert!(matches!(
            par.quantize(&pool, &x[..33], 1, 33),
            Err(KernelError::NotBlockMultiple { .. })
        ));
    }
}
