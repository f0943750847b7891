//! AVX2 building blocks shared by the kernels: safe loads and stores over fixed-size arrays (so
//! bounds are proven by the types and the unsafe pointer access lives here only), horizontal
//! sums, and a vectorized `exp`.
//!
//! Every function but [`prefetch`] requires AVX2+FMA+F16C; callers reach them only through an
//! [`crate::cpu::Isa`] that detected those.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// Hints that the cache line holding `p` will be used soon. Needs only SSE, x86_64's baseline.
#[inline]
pub(crate) fn prefetch(p: *const u8) {
    // SAFETY: SSE is part of x86_64's baseline, and a prefetch is a hint: it never faults and
    // reads nothing the program sees, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn load_f32x8(p: &[f32; 8]) -> __m256 {
    // SAFETY: `p` is 8 readable f32s; the load has no alignment requirement.
    unsafe { _mm256_loadu_ps(p.as_ptr()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn store_f32x8(p: &mut [f32; 8], v: __m256) {
    // SAFETY: `p` is 8 writable f32s; the store has no alignment requirement.
    unsafe { _mm256_storeu_ps(p.as_mut_ptr(), v) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn load_i32x8(p: &[i32; 8]) -> __m256i {
    // SAFETY: `p` is 8 readable i32s; the load has no alignment requirement.
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

#[cfg(test)]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn store_i32x8(p: &mut [i32; 8], v: __m256i) {
    // SAFETY: `p` is 8 writable i32s; the store has no alignment requirement.
    unsafe { _mm256_storeu_si256(p.as_mut_ptr().cast(), v) }
}

/// Eight f32 from 32 little-endian bytes at any alignment.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn load_f32x8_le(p: &[u8; 32]) -> __m256 {
    // SAFETY: `p` is 32 readable bytes; the load has no alignment requirement.
    unsafe { _mm256_loadu_ps(p.as_ptr().cast()) }
}

/// Eight f16 (little-endian, any alignment) widened to f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn load_f16x8_le(p: &[u8; 16]) -> __m256 {
    _mm256_cvtph_ps(load_u8x16(p))
}

/// Eight bf16 (little-endian, any alignment) widened to f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn load_bf16x8_le(p: &[u8; 16]) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(load_u8x16(p))))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn load_u8x16(p: &[u8; 16]) -> __m128i {
    // SAFETY: `p` is 16 readable bytes; the load has no alignment requirement.
    unsafe { _mm_loadu_si128(p.as_ptr().cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn load_i8x16(p: &[i8; 16]) -> __m128i {
    // SAFETY: `p` is 16 readable bytes; the load has no alignment requirement.
    unsafe { _mm_loadu_si128(p.as_ptr().cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn load_u16x8(p: &[u16; 8]) -> __m128i {
    // SAFETY: `p` is 16 readable bytes; the load has no alignment requirement.
    unsafe { _mm_loadu_si128(p.as_ptr().cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn load_i8x32(p: &[i8; 32]) -> __m256i {
    // SAFETY: `p` is 32 readable bytes; the load has no alignment requirement.
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn load_u8x32(p: &[u8; 32]) -> __m256i {
    // SAFETY: `p` is 32 readable bytes; the load has no alignment requirement.
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn store_i8x32(p: &mut [i8; 32], v: __m256i) {
    // SAFETY: `p` is 32 writable bytes; the store has no alignment requirement.
    unsafe { _mm256_storeu_si256(p.as_mut_ptr().cast(), v) }
}

/// Two little-endian f16 at any alignment (a block's `d` and `m`) as f32 lanes 0 and 1.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn f16x2(lo: [u8; 2], hi: [u8; 2]) -> __m128 {
    let bits = u32::from(u16::from_le_bytes(lo)) | (u32::from(u16::from_le_bytes(hi)) << 16);
    _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))
}

/// One little-endian f16 as f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn f16_1(b: [u8; 2]) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(u16::from_le_bytes(b)))))
}

/// `x` rounded to the nearest f16 (ties to even) and back: [`crate::formats::round_f16`] in two
/// instructions, without a call and a feature check per value.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn round_f16_1(x: f32) -> f32 {
    let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x));
    _mm_cvtss_f32(_mm_cvtph_ps(h))
}

/// Sum of the eight lanes: (0+4, 1+5, 2+6, 3+7), then pairs, then the last two.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn hsum_ps(v: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
    _mm_cvtss_f32(s1)
}

/// Sum of eight i32 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn hsum_epi32(v: __m256i) -> i32 {
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
    let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<0b01>(s2));
    _mm_cvtsi128_si32(s1)
}

/// `e^x` per lane, within 2 ulp of the true value on [-87.3, 88]: Cody-Waite reduction by
/// `n*ln 2`, a degree-6 polynomial on |r| <= ln2/2 (the classic Cephes `expf` coefficients),
/// then `2^n` through the exponent bits. Results below 2^-126 are 0, above 88 saturate at
/// `e^88`, NaN stays NaN.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn exp_ps(x: __m256) -> __m256 {
    const LO: f32 = -87.336_55;
    // Operand order makes a NaN `x` pass through min/max.
    let xc = _mm256_max_ps(_mm256_set1_ps(LO), _mm256_min_ps(_mm256_set1_ps(88.0), x));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        xc,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.166_666_65));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
    let r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    let e =
        _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
    let y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LO));
    _mm256_andnot_ps(under, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Isa;

    #[target_feature(enable = "avx2,fma,f16c")]
    fn exp8(x: &[f32; 8]) -> [f32; 8] {
        let mut o = [0.0; 8];
        store_f32x8(&mut o, exp_ps(load_f32x8(x)));
        o
    }

    #[test]
    fn exp_is_within_two_ulp() {
        if !Isa::best().avx2() {
            return;
        }
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let xs = [x, x + 0.001, x + 0.01, x + 0.1, -x, x * 0.5, x * 1e-3, x * 1e-6];
            // SAFETY: the CPU has AVX2+FMA+F16C (checked above).
            let got = unsafe { exp8(&xs) };
            for (g, &xi) in got.iter().zip(&xs) {
                if !(-87.0..=88.0).contains(&xi) {
                    continue;
                }
                let want = f64::from(xi).exp();
                let rel = ((f64::from(*g) - want) / want).abs();
                worst = worst.max(rel);
            }
            x += 0.37;
        }
        assert!(worst < 2.5e-7, "max relative error {worst}");
        // SAFETY: as above.
        let edge = unsafe { exp8(&[-100.0, -87.4, 0.0, f32::NAN, 100.0, -0.0, 1.0, -1.0]) };
        assert_eq!(&edge[..3], &[0.0, 0.0, 1.0]);
        assert!(edge[3].is_nan());
        assert!(edge[4] > 1e38 && edge[4].is_finite());
        assert_eq!(edge[5], 1.0);
    }
}
