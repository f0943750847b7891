//! Dot products of weight rows with activation rows: the inner loop of every matrix product.
//!
//! Quantized weights pair with [`QuantizedActs`] as in ggml: Q4_0, Q5_0 and Q8_0 with the Q8_0
//! values, Q4_1 and Q5_1 with the Q8_1 values (whose `s` carries the minimum's contribution), the
//! k-quants Q2_K .. Q6_K with Q8_K values ([`act_format`] says which; their kernels are in
//! [`crate::kdot`], reached through the same entry points here).
//! Float weights (F32, F16, BF16) pair with f32 activations (ggml rounds activations to f16 for
//! F16 weights; we keep them f32, which is at least as accurate).
//!
//! The scalar functions are the reference and follow ggml's `ggml_vec_dot_*_generic` operation by
//! operation: per block an exact integer sum `sumi`, then an f32 accumulation of
//! `d_w * d_a * sumi (+ m_w * s_a)` in block order.
//!
//! The AVX2 kernels compute the same per-block integer sums exactly (tests compare them bit for
//! bit), and differ only in the float accumulation: eight lane-wise partial sums with fused
//! multiply-adds, added at the end. The float results therefore agree with the reference to
//! within rounding of a sum of `n` terms, `|simd - ref| <= 2 (n + 8) eps sum|terms|` with `n` the
//! number of blocks (elements for float weights) and `eps = 2^-23`; tests check that bound.
//!
//! The kernels work on tiles of `R` weight rows by `T` tokens, so one weight block is decoded
//! once and used for `T` tokens, and one activation block loaded once for `R` rows.

use crate::act::{ActFormat, ActRow, QuantizedActs};
use crate::cpu::Isa;
use crate::error::check_len;
use crate::formats::{
    as_blocks, bf16_to_f32, f16_le, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, QK,
};
use crate::kdot;
use crate::{GgmlType, KernelError};

/// Whether `ty` multiplies with [`QuantizedActs`] (true) or with f32 activations (false), or
/// `None` when no dot product exists for it (Q8_1 and Q8_K, which are activation formats).
pub fn uses_quantized_acts(ty: GgmlType) -> Option<bool> {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => Some(false),
        _ => act_format(ty).map(|_| true),
    }
}

/// The format [`QuantizedActs`] must hold to multiply weights of type `ty` (ggml's
/// `vec_dot_type`), or `None` for float weights and types without a dot product.
pub fn act_format(ty: GgmlType) -> Option<ActFormat> {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            Some(ActFormat::Q8_0)
        }
        GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => {
            Some(ActFormat::Q8K)
        }
        _ => None,
    }
}

fn check_act_row(ty: GgmlType, w: &[u8], a: &ActRow<'_>) -> Result<(), KernelError> {
    if kdot::is_k(ty) {
        return kdot::check_k_row(ty, w, a);
    }
    if a.format != ActFormat::Q8_0 {
        return Err(KernelError::Unsupported { ty, op: "dot product with non-Q8_0 activations" });
    }
    let n = a.qs.len();
    let bytes = ty.row_bytes(n as u64).ok_or(KernelError::NotBlockMultiple { ty, n })?;
    check_len("weight row", bytes as usize, w.len())?;
    check_len("activation scales", n / QK, a.d.len())?;
    check_len("activation sums", n / QK, a.s.len())
}

/// Dot product of one quantized weight row (its GGUF bytes) with one quantized activation row.
///
/// Errors when `ty` is not a quantized type with a kernel here, or the lengths disagree.
pub fn vec_dot_q(isa: Isa, ty: GgmlType, w: &[u8], a: ActRow<'_>) -> Result<f32, KernelError> {
    check_act_row(ty, w, &a)?;
    let mut out = 0.0;
    q_rows(isa, ty, w, w.len(), std::slice::from_ref(&a), 0..1, &mut |_, _, v| out = v)?;
    Ok(out)
}

/// Dot product of one float weight row (F32, F16 or BF16 GGUF bytes) with f32 activations.
pub fn vec_dot_f(isa: Isa, ty: GgmlType, w: &[u8], x: &[f32]) -> Result<f32, KernelError> {
    if uses_quantized_acts(ty) != Some(false) {
        return Err(KernelError::Unsupported { ty, op: "float dot product" });
    }
    check_len("weight row", x.len() * ty.type_size(), w.len())?;
    let mut out = 0.0;
    f_rows(isa, ty, w, w.len(), &[x], 0..1, &mut |_, _, v| out = v)?;
    Ok(out)
}

/// Computes `emit(r, t, dot(row r, token t))` for rows `rows` of a row-major quantized matrix
/// (`row_bytes` bytes per row) and every token of `acts`.
pub(crate) fn q_rows(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    acts: &[ActRow<'_>],
    rows: std::ops::Range<usize>,
    emit: &mut dyn FnMut(usize, usize, f32),
) -> Result<(), KernelError> {
    if kdot::is_k(ty) {
        return kdot::k_rows(isa, ty, w, row_bytes, acts, rows, emit);
    }
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: an `Isa` reporting AVX2 comes from detection, so the CPU has AVX2+FMA+F16C.
        return unsafe { avx2::q_rows(ty, w, row_bytes, acts, rows, emit) };
    }
    let _ = isa;
    for r in rows {
        let wr = &w[r * row_bytes..(r + 1) * row_bytes];
        for (t, a) in acts.iter().enumerate() {
            let v = match ty {
                GgmlType::Q4_0 => scalar::dot_q4_0(as_blocks(wr)?, a),
                GgmlType::Q4_1 => scalar::dot_q4_1(as_blocks(wr)?, a),
                GgmlType::Q5_0 => scalar::dot_q5_0(as_blocks(wr)?, a),
                GgmlType::Q5_1 => scalar::dot_q5_1(as_blocks(wr)?, a),
                GgmlType::Q8_0 => scalar::dot_q8_0(as_blocks(wr)?, a),
                _ => return Err(KernelError::Unsupported { ty, op: "quantized dot product" }),
            };
            emit(r, t, v);
        }
    }
    Ok(())
}

/// As [`q_rows`] for float weights and f32 activations (each `x[t]` one token of `cols`).
pub(crate) fn f_rows(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    x: &[&[f32]],
    rows: std::ops::Range<usize>,
    emit: &mut dyn FnMut(usize, usize, f32),
) -> Result<(), KernelError> {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: an `Isa` reporting AVX2 comes from detection, so the CPU has AVX2+FMA+F16C.
        return unsafe { avx2::f_rows(ty, w, row_bytes, x, rows, emit) };
    }
    let _ = isa;
    for r in rows {
        let wr = &w[r * row_bytes..(r + 1) * row_bytes];
        for (t, xt) in x.iter().enumerate() {
            let v = match ty {
                GgmlType::F32 => scalar::dot_f32(wr, xt),
                GgmlType::F16 => scalar::dot_f16(wr, xt),
                GgmlType::BF16 => scalar::dot_bf16(wr, xt),
                _ => return Err(KernelError::Unsupported { ty, op: "float dot product" }),
            };
            emit(r, t, v);
        }
    }
    Ok(())
}

/// Convenience over [`vec_dot_q`] for token `t` of `acts`.
pub fn vec_dot_acts(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    acts: &QuantizedActs,
    t: usize,
) -> Result<f32, KernelError> {
    vec_dot_q(isa, ty, w, acts.row(t))
}

/// The scalar reference dot products, operation for operation as ggml's generic C.
pub mod scalar {
    use super::*;

    fn nibbles(qs: &[u8; 16]) -> [i32; 32] {
        let mut q = [0i32; 32];
        for j in 0..16 {
            q[j] = i32::from(qs[j] & 0x0f);
            q[j + 16] = i32::from(qs[j] >> 4);
        }
        q
    }

    fn q5(qh: [u8; 4], qs: &[u8; 16]) -> [i32; 32] {
        let h = u32::from_le_bytes(qh);
        let mut q = nibbles(qs);
        for (j, v) in q.iter_mut().enumerate() {
            *v |= (((h >> j) & 1) as i32) << 4;
        }
        q
    }

    fn isum(w: &[i32; 32], a: &[i8]) -> i32 {
        w.iter().zip(a).map(|(&w, &a)| w * i32::from(a)).sum()
    }

    /// The per-block integer sums `sum_j w_j * a_j` of a quantized row (Q4_0 and Q5_0 weights
    /// with their offsets applied). Exposed so SIMD paths can be checked bit for bit. The
    /// k-quants have two sums per block: [`crate::kdot::scalar::block_isums`].
    pub fn block_isums(ty: GgmlType, w: &[u8], a: &ActRow<'_>) -> Result<Vec<i32>, KernelError> {
        if kdot::is_k(ty) {
            return Err(KernelError::Unsupported { ty, op: "dot::scalar::block_isums" });
        }
        check_act_row(ty, w, a)?;
        let ab = a.qs.chunks_exact(QK);
        Ok(match ty {
            GgmlType::Q4_0 => as_blocks::<BlockQ4_0>(w)?
                .iter()
                .zip(ab)
                .map(|(b, a)| isum(&nibbles(&b.qs).map(|v| v - 8), a))
                .collect(),
            GgmlType::Q4_1 => as_blocks::<BlockQ4_1>(w)?
                .iter()
                .zip(ab)
                .map(|(b, a)| isum(&nibbles(&b.qs), a))
                .collect(),
            GgmlType::Q5_0 => as_blocks::<BlockQ5_0>(w)?
                .iter()
                .zip(ab)
                .map(|(b, a)| isum(&q5(b.qh, &b.qs).map(|v| v - 16), a))
                .collect(),
            GgmlType::Q5_1 => as_blocks::<BlockQ5_1>(w)?
                .iter()
                .zip(ab)
                .map(|(b, a)| isum(&q5(b.qh, &b.qs), a))
                .collect(),
            GgmlType::Q8_0 => as_blocks::<BlockQ8_0>(w)?
                .iter()
                .zip(ab)
                .map(|(b, a)| isum(&b.qs.map(i32::from), a))
                .collect(),
            _ => return Err(KernelError::Unsupported { ty, op: "quantized dot product" }),
        })
    }

    /// `sum |term|` of the reference accumulation, for the tolerance of other paths (for the
    /// k-quants, [`crate::kdot::scalar::abs_terms`]).
    pub fn abs_terms(ty: GgmlType, w: &[u8], a: &ActRow<'_>) -> Result<f32, KernelError> {
        if kdot::is_k(ty) {
            return kdot::scalar::abs_terms(ty, w, a);
        }
        let isums = block_isums(ty, w, a)?;
        let bs = ty.type_size();
        let mut total = 0.0f32;
        for (b, &si) in isums.iter().enumerate() {
            let blk = &w[b * bs..(b + 1) * bs];
            let dw = f16_le([blk[0], blk[1]]);
            total += (dw * a.d[b] * si as f32).abs();
            if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                total += (f16_le([blk[2], blk[3]]) * a.s[b]).abs();
            }
        }
        Ok(total)
    }

    /// Q4_0 x Q8_0.
    pub fn dot_q4_0(w: &[BlockQ4_0], a: &ActRow<'_>) -> f32 {
        let mut sumf = 0.0f32;
        for (b, (blk, aq)) in w.iter().zip(a.qs.chunks_exact(QK)).enumerate() {
            let sumi = isum(&nibbles(&blk.qs).map(|v| v - 8), aq);
            sumf += sumi as f32 * f16_le(blk.d) * a.d[b];
        }
        sumf
    }

    /// Q4_1 x Q8_1.
    pub fn dot_q4_1(w: &[BlockQ4_1], a: &ActRow<'_>) -> f32 {
        let mut sumf = 0.0f32;
        for (b, (blk, aq)) in w.iter().zip(a.qs.chunks_exact(QK)).enumerate() {
            let sumi = isum(&nibbles(&blk.qs), aq);
            sumf += (f16_le(blk.d) * a.d[b]) * sumi as f32 + f16_le(blk.m) * a.s[b];
        }
        sumf
    }

    /// Q5_0 x Q8_0.
    pub fn dot_q5_0(w: &[BlockQ5_0], a: &ActRow<'_>) -> f32 {
        let mut sumf = 0.0f32;
        for (b, (blk, aq)) in w.iter().zip(a.qs.chunks_exact(QK)).enumerate() {
            let sumi = isum(&q5(blk.qh, &blk.qs).map(|v| v - 16), aq);
            sumf += (f16_le(blk.d) * a.d[b]) * sumi as f32;
        }
        sumf
    }

    /// Q5_1 x Q8_1.
    pub fn dot_q5_1(w: &[BlockQ5_1], a: &ActRow<'_>) -> f32 {
        let mut sumf = 0.0f32;
        for (b, (blk, aq)) in w.iter().zip(a.qs.chunks_exact(QK)).enumerate() {
            let sumi = isum(&q5(blk.qh, &blk.qs), aq);
            sumf += (f16_le(blk.d) * a.d[b]) * sumi as f32 + f16_le(blk.m) * a.s[b];
        }
        sumf
    }

    /// Q8_0 x Q8_0.
    pub fn dot_q8_0(w: &[BlockQ8_0], a: &ActRow<'_>) -> f32 {
        let mut sumf = 0.0f32;
        for (b, (blk, aq)) in w.iter().zip(a.qs.chunks_exact(QK)).enumerate() {
            let sumi = isum(&blk.qs.map(i32::from), aq);
            sumf += sumi as f32 * (f16_le(blk.d) * a.d[b]);
        }
        sumf
    }

    /// F32 weights (little-endian bytes) x f32, summed in order.
    pub fn dot_f32(w: &[u8], x: &[f32]) -> f32 {
        w.chunks_exact(4)
            .zip(x)
            .fold(0.0, |s, (b, &x)| s + f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * x)
    }

    /// F16 weights x f32, summed in order.
    pub fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
        w.chunks_exact(2).zip(x).fold(0.0, |s, (b, &x)| s + f16_le([b[0], b[1]]) * x)
    }

    /// BF16 weights x f32, summed in order.
    pub fn dot_bf16(w: &[u8], x: &[f32]) -> f32 {
        w.chunks_exact(2)
            .zip(x)
            .fold(0.0, |s, (b, &x)| s + bf16_to_f32(u16::from_le_bytes([b[0], b[1]])) * x)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::*;
    use crate::formats::{Block, BlockQ8_0};
    use crate::simd::{
        f16_1, f16x2, hsum_ps, load_bf16x8_le, load_f16x8_le, load_f32x8, load_f32x8_le,
        load_i8x32, load_u8x16,
    };

    /// A weight block the AVX2 kernels can decode.
    pub(crate) trait Avx2Block: Block {
        /// `quants` are signed (use the sign trick) rather than unsigned.
        const SIGNED: bool;
        /// The block has a minimum `m` multiplying the activation's `s`.
        const HAS_MIN: bool;
        /// The 32 weights in element order: i8 when `SIGNED`, else u8 below 32.
        ///
        /// # Safety
        ///
        /// The CPU supports AVX2+FMA+F16C.
        unsafe fn quants(&self) -> __m256i;
        /// `(d, m)`, `m` 0 without a minimum.
        ///
        /// # Safety
        ///
        /// As for `quants`.
        unsafe fn dm(&self) -> (f32, f32);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn nibbles(qs: &[u8; 16]) -> __m256i {
        let q = load_u8x16(qs);
        let m = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(q, m);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), m);
        _mm256_set_m128i(hi, lo)
    }

    /// Byte `j` is 0x10 when bit `j` of `qh` is set.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn high_bits(qh: [u8; 4]) -> __m256i {
        let x = _mm256_set1_epi32(i32::from_le_bytes(qh));
        let spread = _mm256_shuffle_epi8(
            x,
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    impl Avx2Block for BlockQ4_0 {
        const SIGNED: bool = true;
        const HAS_MIN: bool = false;
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn quants(&self) -> __m256i {
            _mm256_sub_epi8(nibbles(&self.qs), _mm256_set1_epi8(8))
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn dm(&self) -> (f32, f32) {
            (f16_1(self.d), 0.0)
        }
    }

    impl Avx2Block for BlockQ4_1 {
        const SIGNED: bool = false;
        const HAS_MIN: bool = true;
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn quants(&self) -> __m256i {
            nibbles(&self.qs)
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn dm(&self) -> (f32, f32) {
            let v = f16x2(self.d, self.m);
            (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
        }
    }

    impl Avx2Block for BlockQ5_0 {
        const SIGNED: bool = true;
        const HAS_MIN: bool = false;
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn quants(&self) -> __m256i {
            let q = _mm256_or_si256(nibbles(&self.qs), high_bits(self.qh));
            _mm256_sub_epi8(q, _mm256_set1_epi8(16))
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn dm(&self) -> (f32, f32) {
            (f16_1(self.d), 0.0)
        }
    }

    impl Avx2Block for BlockQ5_1 {
        const SIGNED: bool = false;
        const HAS_MIN: bool = true;
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn quants(&self) -> __m256i {
            _mm256_or_si256(nibbles(&self.qs), high_bits(self.qh))
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn dm(&self) -> (f32, f32) {
            let v = f16x2(self.d, self.m);
            (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
        }
    }

    impl Avx2Block for BlockQ8_0 {
        const SIGNED: bool = true;
        const HAS_MIN: bool = false;
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn quants(&self) -> __m256i {
            load_i8x32(&self.qs)
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn dm(&self) -> (f32, f32) {
            (f16_1(self.d), 0.0)
        }
    }

    /// The unsigned factor of `maddubs` for a block's weights: `|w|` when signed.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn weight_factor<B: Avx2Block>(q: __m256i) -> __m256i {
        if B::SIGNED {
            _mm256_sign_epi8(q, q)
        } else {
            q
        }
    }

    /// Eight i32 partial sums of `w . a` for one block; `wf = weight_factor(q)`. Exact: no
    /// pair of products can saturate i16 (|w| <= 128, |a| <= 127).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn block_dot<B: Avx2Block>(q: __m256i, wf: __m256i, a: __m256i) -> __m256i {
        let a = if B::SIGNED { _mm256_sign_epi8(a, q) } else { a };
        _mm256_madd_epi16(_mm256_maddubs_epi16(wf, a), _mm256_set1_epi16(1))
    }

    /// Bytes beyond the end of the current row tile that the tile prefetches.
    pub(crate) const PREFETCH_AHEAD: usize = 1024;

    /// Hints that the line holding `p` will be read soon.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(crate) fn prefetch(p: *const u8) {
        // A prefetch never faults, so an address past the weights is fine.
        _mm_prefetch::<_MM_HINT_T0>(p.cast())
    }

    /// One `R` rows x `T` tokens tile over whole rows. With `prefetch_next`, the rows must be
    /// contiguous in memory, and while working the tile hints the bytes that follow them into
    /// cache, since the hardware prefetcher alone leaves a streaming matvec at about half the
    /// memory bandwidth.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn tile<B: Avx2Block, const R: usize, const T: usize>(
        w: &[&[B]; R],
        a: &[&ActRow<'_>; T],
        s_t: &[[f32; T]],
        prefetch_next: bool,
    ) -> [[f32; T]; R] {
        let nb = w[0].len();
        let mut aq: [&[[i8; 32]]; T] = [&[]; T];
        let mut ad: [&[f32]; T] = [&[]; T];
        for t in 0..T {
            aq[t] = &a[t].qs.as_chunks::<32>().0[..nb];
            ad[t] = &a[t].d[..nb];
        }
        let s_t = &s_t[..nb];
        let mut wr: [&[B]; R] = [&[]; R];
        for r in 0..R {
            wr[r] = &w[r][..nb];
        }
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        // The minimum's term, one lane per token so it vectorizes over the tile's tokens.
        let mut mins = [[0.0f32; T]; R];
        let step = R * std::mem::size_of::<B>();
        let pf_base = w[R - 1].as_ptr_range().end.cast::<u8>().wrapping_add(PREFETCH_AHEAD);
        for b in 0..nb {
            if prefetch_next {
                let p = pf_base.wrapping_add(b * step);
                for k in 0..step.div_ceil(64) {
                    prefetch(p.wrapping_add(k * 64));
                }
            }
            let mut av = [_mm256_setzero_si256(); T];
            for t in 0..T {
                av[t] = load_i8x32(&aq[t][b]);
            }
            for r in 0..R {
                let blk = &wr[r][b];
                // SAFETY: this function runs only with AVX2+FMA+F16C enabled.
                let q = unsafe { blk.quants() };
                // SAFETY: as above.
                let (d, m) = unsafe { blk.dm() };
                let wf = weight_factor::<B>(q);
                let dv = _mm256_set1_ps(d);
                for t in 0..T {
                    let p = block_dot::<B>(q, wf, av[t]);
                    let scale = _mm256_mul_ps(dv, _mm256_broadcast_ss(&ad[t][b]));
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[r][t]);
                }
                if B::HAS_MIN {
                    for t in 0..T {
                        mins[r][t] += m * s_t[b][t];
                    }
                }
            }
        }
        let mut out = [[0.0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                out[r][t] = hsum_ps(acc[r][t]) + mins[r][t];
            }
        }
        out
    }

    #[cfg(test)]
    use crate::simd::hsum_epi32;

    /// Per-block integer sums through the same decode and `block_dot` as the tiles.
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn block_isums<B: Avx2Block>(w: &[B], a: &ActRow<'_>) -> Vec<i32> {
        let mut out = Vec::with_capacity(w.len());
        for (blk, aq) in w.iter().zip(a.qs.as_chunks::<32>().0) {
            // SAFETY: this function runs only with AVX2+FMA+F16C enabled.
            let q = unsafe { blk.quants() };
            let wf = weight_factor::<B>(q);
            out.push(hsum_epi32(block_dot::<B>(q, wf, load_i8x32(aq))));
        }
        out
    }

    /// The activations' `s` regrouped by tiles of `T` tokens: entry `[tile * nb + b][i]` is
    /// block `b`'s `s` of token `tile * T + i` (zero past the last token).
    fn s_by_tile<const T: usize>(acts: &[ActRow<'_>], nb: usize) -> Vec<[f32; T]> {
        let tiles = acts.len().div_ceil(T);
        let mut st = vec![[0.0f32; T]; tiles * nb];
        for (t, a) in acts.iter().enumerate() {
            for (b, &s) in a.s[..nb].iter().enumerate() {
                st[(t / T) * nb + b][t % T] = s;
            }
        }
        st
    }

    /// The tokens of one `drive` call, with their `s` regrouped for the tiles.
    struct Tokens<'a, 'b, const T: usize> {
        acts: &'a [ActRow<'b>],
        /// Tokens covered by whole tiles of `T`.
        full: usize,
        nb: usize,
        /// `s_by_tile` of the first `full` tokens.
        st: Vec<[f32; T]>,
        /// `s_by_tile` of the rest (fewer than `T` tokens, one tile of their own), by their
        /// number: a batch of 2 or 3 leftover tokens shares each decoded weight block too.
        st1: Vec<[f32; 1]>,
        st2: Vec<[f32; 2]>,
        st3: Vec<[f32; 3]>,
    }

    /// Every token against rows `r0..r0 + R`: tiles of `T` tokens, then one at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn row_tile<B: Avx2Block, const R: usize, const T: usize>(
        wr: &[&[B]; R],
        r0: usize,
        tk: &Tokens<'_, '_, T>,
        emit: &mut dyn FnMut(usize, usize, f32),
    ) {
        let (acts, nb) = (tk.acts, tk.nb);
        let mut t = 0;
        while t < tk.full {
            let mut at: [&ActRow<'_>; T] = [&acts[t]; T];
            for (i, x) in at.iter_mut().enumerate() {
                *x = &acts[t + i];
            }
            let o = tile::<B, R, T>(wr, &at, &tk.st[(t / T) * nb..][..nb], t == 0);
            for (i, orow) in o.iter().enumerate() {
                for (j, &v) in orow.iter().enumerate() {
                    emit(r0 + i, t + j, v);
                }
            }
            t += T;
        }
        let first = t == 0;
        let mut out = |o: &[&[f32]]| {
            for (i, orow) in o.iter().enumerate() {
                for (j, &v) in orow.iter().enumerate() {
                    emit(r0 + i, t + j, v);
                }
            }
        };
        match acts.len() - t {
            0 => {}
            1 => {
                let o = tile::<B, R, 1>(wr, &[&acts[t]], &tk.st1[..nb], first);
                out(&o.each_ref().map(|r| &r[..]));
            }
            2 => {
                let o = tile::<B, R, 2>(wr, &[&acts[t], &acts[t + 1]], &tk.st2[..nb], first);
                out(&o.each_ref().map(|r| &r[..]));
            }
            _ => {
                let at = [&acts[t], &acts[t + 1], &acts[t + 2]];
                let o = tile::<B, R, 3>(wr, &at, &tk.st3[..nb], first);
                out(&o.each_ref().map(|r| &r[..]));
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn drive<B: Avx2Block, const R: usize, const T: usize>(
        w: &[u8],
        row_bytes: usize,
        acts: &[ActRow<'_>],
        rows: Range<usize>,
        emit: &mut dyn FnMut(usize, usize, f32),
    ) -> Result<(), KernelError> {
        let nb = row_bytes / std::mem::size_of::<B>();
        let full = acts.len() / T * T;
        let rest = &acts[full..];
        debug_assert!(rest.len() < T && T <= 4, "leftover tiles hold at most 3 tokens");
        let tk = Tokens::<T> {
            acts,
            full,
            nb,
            st: s_by_tile::<T>(&acts[..full], nb),
            st1: if rest.len() == 1 { s_by_tile::<1>(rest, nb) } else { Vec::new() },
            st2: if rest.len() == 2 { s_by_tile::<2>(rest, nb) } else { Vec::new() },
            st3: if rest.len() == 3 { s_by_tile::<3>(rest, nb) } else { Vec::new() },
        };
        let row = |r: usize| as_blocks::<B>(&w[r * row_bytes..(r + 1) * row_bytes]);
        let mut r = rows.start;
        while r < rows.end {
            if r + R <= rows.end {
                let mut wr: [&[B]; R] = [&[]; R];
                for (i, x) in wr.iter_mut().enumerate() {
                    *x = row(r + i)?;
                }
                row_tile::<B, R, T>(&wr, r, &tk, emit);
                r += R;
            } else {
                row_tile::<B, 1, T>(&[row(r)?], r, &tk, emit);
                r += 1;
            }
        }
        Ok(())
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn drive_any<B: Avx2Block>(
        w: &[u8],
        row_bytes: usize,
        acts: &[ActRow<'_>],
        rows: Range<usize>,
        emit: &mut dyn FnMut(usize, usize, f32),
    ) -> Result<(), KernelError> {
        // Tiles by batch size: four rows for one or two tokens (each decoded weight block
        // serves every token of the tile), two rows by four tokens for larger batches, whose
        // leftover tokens form one smaller tile.
        match acts.len() {
            1 => drive::<B, 4, 1>(w, row_bytes, acts, rows, emit),
            2 => drive::<B, 4, 2>(w, row_bytes, acts, rows, emit),
            _ => drive::<B, 2, 4>(w, row_bytes, acts, rows, emit),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn q_rows(
        ty: GgmlType,
        w: &[u8],
        row_bytes: usize,
        acts: &[ActRow<'_>],
        rows: Range<usize>,
        emit: &mut dyn FnMut(usize, usize, f32),
    ) -> Result<(), KernelError> {
        match ty {
            GgmlType::Q4_0 => drive_any::<BlockQ4_0>(w, row_bytes, acts, rows, emit),
            GgmlType::Q4_1 => drive_any::<BlockQ4_1>(w, row_bytes, acts, rows, emit),
            GgmlType::Q5_0 => drive_any::<BlockQ5_0>(w, row_bytes, acts, rows, emit),
            GgmlType::Q5_1 => drive_any::<BlockQ5_1>(w, row_bytes, acts, rows, emit),
            GgmlType::Q8_0 => drive_any::<BlockQ8_0>(w, row_bytes, acts, rows, emit),
            _ => Err(KernelError::Unsupported { ty, op: "quantized dot product" }),
        }
    }

    /// Loads eight weights of a float type from their little-endian bytes.
    #[derive(Clone, Copy)]
    enum FloatKind {
        F32,
        F16,
        Bf16,
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn load8(kind: FloatKind, w: &[u8], i: usize) -> __m256 {
        match kind {
            FloatKind::F32 => load_f32x8_le(w[i * 4..i * 4 + 32].try_into().unwrap()),
            FloatKind::F16 => load_f16x8_le(w[i * 2..i * 2 + 16].try_into().unwrap()),
            FloatKind::Bf16 => load_bf16x8_le(w[i * 2..i * 2 + 16].try_into().unwrap()),
        }
    }

    fn load1(kind: FloatKind, w: &[u8], i: usize) -> f32 {
        match kind {
            FloatKind::F32 => {
                f32::from_le_bytes([w[i * 4], w[i * 4 + 1], w[i * 4 + 2], w[i * 4 + 3]])
            }
            FloatKind::F16 => f16_le([w[i * 2], w[i * 2 + 1]]),
            FloatKind::Bf16 => bf16_to_f32(u16::from_le_bytes([w[i * 2], w[i * 2 + 1]])),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn ftile<const R: usize, const T: usize>(
        kind: FloatKind,
        w: &[&[u8]; R],
        x: &[&[f32]; T],
        prefetch_next: bool,
    ) -> [[f32; T]; R] {
        let n = x[0].len();
        let n8 = n / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let bytes8 = match kind {
            FloatKind::F32 => 32,
            FloatKind::F16 | FloatKind::Bf16 => 16,
        };
        let pf_base = w[R - 1].as_ptr_range().end.wrapping_add(PREFETCH_AHEAD);
        let mut i = 0;
        while i < n8 {
            if prefetch_next {
                // R * bytes8 bytes per step, at most two lines.
                let p = pf_base.wrapping_add(i / 8 * R * bytes8);
                prefetch(p);
                if R * bytes8 > 64 {
                    prefetch(p.wrapping_add(64));
                }
            }
            let mut xv = [_mm256_setzero_ps(); T];
            for t in 0..T {
                xv[t] = load_f32x8(x[t][i..i + 8].try_into().unwrap());
            }
            for r in 0..R {
                let wv = load8(kind, w[r], i);
                for t in 0..T {
                    acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
                }
            }
            i += 8;
        }
        let mut out = [[0.0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                let mut s = hsum_ps(acc[r][t]);
                for (j, &xj) in x[t].iter().enumerate().skip(n8) {
                    s += load1(kind, w[r], j) * xj;
                }
                out[r][t] = s;
            }
        }
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn f_rows(
        ty: GgmlType,
        w: &[u8],
        row_bytes: usize,
        x: &[&[f32]],
        rows: Range<usize>,
        emit: &mut dyn FnMut(usize, usize, f32),
    ) -> Result<(), KernelError> {
        let kind = match ty {
            GgmlType::F32 => FloatKind::F32,
            GgmlType::F16 => FloatKind::F16,
            GgmlType::BF16 => FloatKind::Bf16,
            _ => return Err(KernelError::Unsupported { ty, op: "float dot product" }),
        };
        const R: usize = 2;
        const T: usize = 4;
        let row = |r: usize| &w[r * row_bytes..(r + 1) * row_bytes];
        let mut r = rows.start;
        while r < rows.end {
            if r + R <= rows.end {
                let wr = [row(r), row(r + 1)];
                let mut t = 0;
                while t + T <= x.len() {
                    let o = ftile::<R, T>(kind, &wr, &[x[t], x[t + 1], x[t + 2], x[t + 3]], t == 0);
                    for (i, orow) in o.iter().enumerate() {
                        for (j, &v) in orow.iter().enumerate() {
                            emit(r + i, t + j, v);
                        }
                    }
                    t += T;
                }
                while t < x.len() {
                    let o = ftile::<R, 1>(kind, &wr, &[x[t]], t == 0);
                    emit(r, t, o[0][0]);
                    emit(r + 1, t, o[1][0]);
                    t += 1;
                }
                r += R;
            } else {
                for (t, xt) in x.iter().enumerate() {
                    emit(r, t, ftile::<1, 1>(kind, &[row(r)], &[xt], t == 0)[0][0]);
                }
                r += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::quantize_row;
    use crate::pool::ThreadPool;
    use proptest::prelude::*;

    const QTYPES: [GgmlType; 5] =
        [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0];

    fn acts(x: &[f32]) -> QuantizedActs {
        let mut a = QuantizedActs::new();
        a.quantize(&ThreadPool::new(1), x, 1, x.len()).unwrap();
        a
    }

    fn tol(n: usize, abs_terms: f32) -> f32 {
        2.0 * (n as f32 + 8.0) * f32::EPSILON * abs_terms + f32::MIN_POSITIVE
    }

    #[cfg(target_arch = "x86_64")]
    fn simd_isums(ty: GgmlType, w: &[u8], a: &ActRow<'_>) -> Vec<i32> {
        // SAFETY: only called after checking the CPU has AVX2+FMA+F16C.
        unsafe {
            match ty {
                GgmlType::Q4_0 => avx2::block_isums::<BlockQ4_0>(as_blocks(w).unwrap(), a),
                GgmlType::Q4_1 => avx2::block_isums::<BlockQ4_1>(as_blocks(w).unwrap(), a),
                GgmlType::Q5_0 => avx2::block_isums::<BlockQ5_0>(as_blocks(w).unwrap(), a),
                GgmlType::Q5_1 => avx2::block_isums::<BlockQ5_1>(as_blocks(w).unwrap(), a),
                _ => avx2::block_isums::<BlockQ8_0>(as_blocks(w).unwrap(), a),
            }
        }
    }

    fn vals(n: usize) -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(
            prop_oneof![4 => -2.0f32..2.0, 1 => -300.0f32..300.0, 1 => Just(0.0f32)],
            n,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn quantized_paths_match_reference(
            (w, x) in (1usize..12).prop_flat_map(|nb| (vals(nb * 32), vals(nb * 32)))
        ) {
            let a = acts(&x);
            let row = a.row(0);
            for ty in QTYPES {
                let mut wb = vec![0u8; ty.row_bytes(w.len() as u64).unwrap() as usize];
                quantize_row(ty, &w, &mut wb).unwrap();
                let want = vec_dot_q(Isa::scalar(), ty, &wb, row).unwrap();
                let bound = tol(w.len() / 32, scalar::abs_terms(ty, &wb, &row).unwrap());
                #[cfg(target_arch = "x86_64")]
                if Isa::best().avx2() {
                    let isums = scalar::block_isums(ty, &wb, &row).unwrap();
                    prop_assert_eq!(simd_isums(ty, &wb, &row), isums, "{}", ty);
                }
                for isa in Isa::all_supported() {
                    let got = vec_dot_q(isa, ty, &wb, row).unwrap();
                    prop_assert!((got - want).abs() <= bound, "{} {:?}: {} vs {} (tol {})", ty, isa, got, want, bound);
                }
            }
        }

        #[test]
        fn float_paths_match_reference(
            (w, x) in (1usize..80).prop_flat_map(|n| (vals(n), vals(n)))
        ) {
            let terms: f32 = w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
            for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
                let mut wb = vec![0u8; w.len() * ty.type_size()];
                quantize_row(ty, &w, &mut wb).unwrap();
                let want = vec_dot_f(Isa::scalar(), ty, &wb, &x).unwrap();
                // The weights were rounded to the type; bound by the rounded terms, plus slack.
                let bound = tol(w.len(), terms * 1.01);
                for isa in Isa::all_supported() {
                    let got = vec_dot_f(isa, ty, &wb, &x).unwrap();
                    prop_assert!((got - want).abs() <= bound, "{} {:?}: {} vs {}", ty, isa, got, want);
                }
            }
        }
    }

    #[test]
    fn q8_0_weights_of_minus_128_do_not_saturate() {
        // -128 is not produced by the quantizer but is a valid byte in a file.
        let mut w = vec![0u8; 34];
        w[..2].copy_from_slice(&crate::formats::f16_le_from(1.0));
        for b in &mut w[2..] {
            *b = 0x80;
        }
        let x = vec![-127.0f32; 32];
        let a = acts(&x);
        for isa in Isa::all_supported() {
            // d_a = 1, so the dot is exactly 32 * 128 * 127.
            assert_eq!(
                vec_dot_q(isa, GgmlType::Q8_0, &w, a.row(0)).unwrap(),
                (32 * 128 * 127) as f32,
                "{isa:?}"
            );
        }
    }

    #[test]
    fn hand_computed_q4_1_dot() {
        // One block: d = 1, m = 1, q_j = j % 16 -> w_j = j % 16 + 1.
        let w: Vec<f32> = (0..32).map(|j| (j % 16) as f32 + 1.0).collect();
        let mut wb = vec![0u8; 20];
        quantize_row(GgmlType::Q4_1, &w, &mut wb).unwrap();
        // Activations: x_j = 127 for j < 16, else 0 -> d_a = 1, s = 16 * 127.
        let x: Vec<f32> = (0..32).map(|j| if j < 16 { 127.0 } else { 0.0 }).collect();
        let a = acts(&x);
        // sum_j (q_j + 1) * 127 over j < 16 = 127 * (120 + 16).
        for isa in Isa::all_supported() {
            assert_eq!(
                vec_dot_q(isa, GgmlType::Q4_1, &wb, a.row(0)).unwrap(),
                127.0 * 136.0,
                "{isa:?}"
            );
        }
    }

    #[test]
    fn mismatched_lengths_are_errors() {
        let a = acts(&[1.0; 64]);
        assert!(matches!(
            vec_dot_q(Isa::scalar(), GgmlType::Q4_1, &[0; 20], a.row(0)),
            Err(KernelError::Length { .. })
        ));
        assert!(matches!(
            vec_dot_q(Isa::scalar(), GgmlType::F32, &[0; 256], a.row(0)),
            Err(KernelError::Unsupported { .. }) | Err(KernelError::Length { .. })
        ));
        assert!(matches!(
            vec_dot_f(Isa::scalar(), GgmlType::Q8_0, &[0; 34], &[0.0; 32]),
            Err(KernelError::Unsupported { .. })
        ));
    }
}
