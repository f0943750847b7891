//! Dot products of k-quant weight rows (Q2_K .. Q6_K) with Q8_K activation rows.
//!
//! Per super-block of 256 every type reduces to integers: with `v_e` the weight's integer value
//! (sub-block scale times quant, Q3_K/Q6_K offsets applied) and `a_e` the activation's quant,
//! `isum = sum_e v_e a_e`; Q2_K, Q4_K and Q5_K add `msum = sum_j m_j bsums_j`, the sub-block
//! minimums times the activation's sums of 16. The block contributes
//! `d_w d_a isum - dmin_w d_a msum`.
//!
//! The scalar functions are the reference and follow ggml's `ggml_vec_dot_q*_K_q8_K_generic`
//! operation by operation, float accumulation included: Q2_K adds `dall * isum - dmin * msum` per
//! block; the others keep `isum` in eight lanes (element `e` in lane `e % 8`), add
//! `d * lane` into eight float sums per block, subtract `dmin * msum` from the total block by
//! block, and add the eight sums at the end. (ggml built with FMA contracts some of those into
//! fused multiply-adds, which the C source does not ask for; `tests/known_vectors.rs` compares with
//! such a build within the bound below.)
//!
//! The AVX2 kernels compute `isum` and `msum` exactly (tests compare them bit for bit with
//! [`scalar::block_isums`]): the unsigned quants times the activations by `maddubs` (no pair can
//! saturate: quants are below 64, activations at most 128 in magnitude), times the sub-block
//! scales by `madd`, and the Q3_K/Q6_K offsets (`-4` and `-32` times the scale) through `bsums`.
//! Only the float accumulation differs: one fused `d * isum` (and `dmin * msum`) per block into
//! eight lanes, summed at the end. With `abs_terms = sum_b (|d_b| sum_l |lane_b,l| + |dmin_b msum_b|)`
//! ([`scalar::abs_terms`]), both are within `(n_b + 8) eps abs_terms` of the exact value
//! (`n_b` blocks, `eps = 2^-23`), so `|simd - ref| <= 2 (n / 32 + 8) eps abs_terms` with `n` the
//! row length, the bound [`crate::dot`] states for the other types; tests check it.
//!
//! The kernels work on tiles of weight rows by tokens like [`crate::dot`]'s: each chunk of 32
//! weights is decoded once per tile (quants unpacked to bytes, scales to 16-bit multipliers) and
//! used for every token of it. A single token goes four rows at a time; batches go one row by
//! eight tokens (the eight integer accumulators, the decoded chunk and its factors fit the
//! sixteen registers), what remains of a batch two rows by four tokens, then four rows by one.

use crate::act::{ActFormat, ActRow};
use crate::cpu::Isa;
use crate::dot::{token_tiles, Q32};
use crate::error::check_len;
use crate::formats::{as_blocks, f16_le};
use crate::kquants::{
    get_scale_min_k4, q3_k_scales, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, QK_K,
};
use crate::{GgmlType, KernelError};

/// Whether `ty` is one of the k-quants with a dot product here.
pub(crate) fn is_k(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K)
}

/// Checks a weight row of k-quant `ty` against a Q8_K activation row.
pub(crate) fn check_k_row(ty: GgmlType, w: &[u8], a: &ActRow<'_>) -> Result<(), KernelError> {
    if a.format != ActFormat::Q8K {
        return Err(KernelError::Unsupported { ty, op: "dot product with non-Q8_K activations" });
    }
    let n = a.qs.len();
    let bytes = ty.row_bytes(n as u64).ok_or(KernelError::NotBlockMultiple { ty, n })?;
    check_len("weight row", bytes as usize, w.len())?;
    check_len("activation scales", n / QK_K, a.d.len())?;
    check_len("activation sums", n / 16, a.bsums.len())
}

/// Computes `emit(r, t, dot(row r, token t))` for rows `rows` of a row-major k-quant matrix
/// (`row_bytes` bytes per row) and every token of `acts` (Q8_K rows).
pub(crate) fn k_rows(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    acts: &[ActRow<'_>],
    rows: std::ops::Range<usize>,
    emit: &mut dyn FnMut(usize, usize, f32),
) -> Result<(), KernelError> {
    if isa.avx2() {
        let mut p = KPacked::default();
        p.pack(acts);
        return k_rows_packed(isa, ty, w, row_bytes, acts, &p, rows, emit);
    }
    for r in rows {
        let wr = &w[r * row_bytes..(r + 1) * row_bytes];
        for (t, a) in acts.iter().enumerate() {
            let v = match ty {
                GgmlType::Q2K => scalar::dot_q2_k(as_blocks(wr)?, a),
                GgmlType::Q3K => scalar::dot_q3_k(as_blocks(wr)?, a),
                GgmlType::Q4K => scalar::dot_q4_k(as_blocks(wr)?, a),
                GgmlType::Q5K => scalar::dot_q5_k(as_blocks(wr)?, a),
                GgmlType::Q6K => scalar::dot_q6_k(as_blocks(wr)?, a),
                _ => return Err(KernelError::Unsupported { ty, op: "k-quant dot product" }),
            };
            emit(r, t, v);
        }
    }
    Ok(())
}

/// As [`k_rows`] on AVX2, with `acts` packed by [`KPacked::pack`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn k_rows_packed<E: FnMut(usize, usize, f32) + ?Sized>(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    acts: &[ActRow<'_>],
    p: &KPacked,
    rows: std::ops::Range<usize>,
    emit: &mut E,
) -> Result<(), KernelError> {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: an `Isa` reporting AVX2 comes from detection, so the CPU has AVX2+FMA+F16C.
        return unsafe { avx2::k_rows_packed(ty, w, row_bytes, acts, p, rows, emit) };
    }
    let _ = (isa, w, row_bytes, acts, p, rows, emit);
    Err(KernelError::Unsupported { ty, op: "packed k-quant activations without AVX2" })
}

/// A token tile of [`KPacked`]: tokens `t0 .. t0 + real` as a tile of `width` (1, 2, 4 or 8; the
/// tokens past `real` padding), its quarters at `q_at`, pairs of sums at `b_at` and scales at
/// `l_at`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KTokenTile {
    pub(crate) t0: usize,
    pub(crate) real: usize,
    pub(crate) width: usize,
    pub(crate) q_at: usize,
    pub(crate) b_at: usize,
    pub(crate) l_at: usize,
}

/// Row (within a row tile) and token (within a token tile of `width`) of each output lane of the
/// AVX2 k-quant tiles: a tile of `width` tokens covers `8 / width` rows.
pub(crate) const fn lane_map(width: usize) -> ([usize; 8], [usize; 8]) {
    match width {
        8 => ([0; 8], [0, 1, 2, 3, 4, 5, 6, 7]),
        4 => ([0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 3, 0, 1, 2, 3]),
        2 => ([0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 0, 1, 0, 1, 0, 1]),
        _ => ([0, 1, 2, 3, NO_ROW, NO_ROW, NO_ROW, NO_ROW], [0; 8]),
    }
}

/// The row of an unused lane in [`lane_map`].
pub(crate) const NO_ROW: usize = usize::MAX / 2;

/// Rows of a tile of `width` tokens.
pub(crate) const fn tile_rows(width: usize) -> usize {
    if width == 1 {
        4
    } else {
        8 / width
    }
}

/// A batch of Q8_K activations laid out for the AVX2 k-quant tiles, built once per product and
/// read by every task. Per token tile of four or eight tokens and block: per chunk of 32, per
/// group of four tokens and quarter `k` (0-3), 32 bytes holding the four tokens' quants
/// `4k .. 4k + 4` of the chunk in the low half and `16 + 4k ..` in the high half; then eight
/// vectors of the tokens' `bsums` in pairs (pair `p`: sums `2p` and `2p + 1`), one token per
/// 32-bit lane as [`lane_map`] orders them. Every tile has each block's `d` in lane order.
/// Tiles of one or two tokens read the activation rows themselves.
#[derive(Debug, Default)]
pub(crate) struct KPacked {
    pub(crate) nb: usize,
    pub(crate) tiles: Vec<KTokenTile>,
    pub(crate) q: Vec<Q32>,
    pub(crate) bs: Vec<Q32>,
    pub(crate) d: Vec<[f32; 8]>,
}

impl KPacked {
    /// Packs `acts` (Q8_K format, all of one length), reusing this buffer's memory.
    pub(crate) fn pack(&mut self, acts: &[ActRow<'_>]) {
        let nb = acts.first().map_or(0, |a| a.d.len());
        self.nb = nb;
        self.tiles.clear();
        let (mut t0, mut nq, mut nbs, mut nl) = (0, 0, 0, 0);
        for (width, real) in token_tiles(acts.len()) {
            self.tiles.push(KTokenTile { t0, real, width, q_at: nq, b_at: nbs, l_at: nl });
            t0 += real;
            if width >= 4 {
                nq += nb * 8 * width;
                nbs += nb * 8;
            }
            nl += nb;
        }
        self.q.clear();
        self.q.resize(nq, Q32([0; 32]));
        self.bs.clear();
        self.bs.resize(nbs, Q32([0; 32]));
        self.d.clear();
        self.d.resize(nl, [0.0; 8]);
        for t in &self.tiles {
            let toks = &acts[t.t0..t.t0 + t.real];
            let (_, lt) = lane_map(t.width);
            for b in 0..nb {
                for (k, &i) in lt.iter().enumerate() {
                    if i < t.real {
                        self.d[t.l_at + b][k] = toks[i].d[b];
                    }
                }
                if t.width < 4 {
                    continue;
                }
                let groups = t.width / 4;
                for (i, a) in toks.iter().enumerate() {
                    let (g, lane) = (i / 4, i % 4);
                    for c in 0..8 {
                        let src = &a.qs[QK_K * b + 32 * c..][..32];
                        for k in 0..4 {
                            let dst = &mut self.q[t.q_at + ((b * 8 + c) * groups + g) * 4 + k].0;
                            dst[4 * lane..4 * lane + 4].copy_from_slice(&src[4 * k..4 * k + 4]);
                            dst[16 + 4 * lane..20 + 4 * lane]
                                .copy_from_slice(&src[16 + 4 * k..20 + 4 * k]);
                        }
                    }
                }
                for (k, &i) in lt.iter().enumerate() {
                    if i >= t.real {
                        continue;
                    }
                    let bsums = &toks[i].bsums[16 * b..16 * b + 16];
                    for p in 0..8 {
                        let dst = &mut self.bs[t.b_at + b * 8 + p].0;
                        let (lo, hi) = (bsums[2 * p].to_le_bytes(), bsums[2 * p + 1].to_le_bytes());
                        dst[4 * k..4 * k + 4].copy_from_slice(&[
                            lo[0] as i8,
                            lo[1] as i8,
                            hi[0] as i8,
                            hi[1] as i8,
                        ]);
                    }
                }
            }
        }
    }
}

/// The scalar reference dot products, operation for operation as ggml's generic C.
pub mod scalar {
    use super::*;

    /// One block's integers against one activation block: `isum` in ggml's eight lanes, and
    /// `msum` (0 for types without minimums).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct BlockSums {
        /// `sum_e v_e a_e` over the elements `e` with `e % 8 == l`.
        pub lanes: [i32; 8],
        /// `sum_j m_j bsums_j`.
        pub msum: i32,
    }

    impl BlockSums {
        /// `sum_e v_e a_e`.
        pub fn isum(&self) -> i32 {
            self.lanes.iter().sum()
        }
    }

    /// Lanes of `sum_e v[e] a[e]`.
    fn lanes(v: &[i32; QK_K], a: &[i8]) -> [i32; 8] {
        let mut l = [0i32; 8];
        for (e, (&v, &a)) in v.iter().zip(a).enumerate() {
            l[e % 8] += v * i32::from(a);
        }
        l
    }

    /// `sum_j m[j / per] bsums[j]`.
    fn msum(m: &[u8], per: usize, bsums: &[i16]) -> i32 {
        bsums.iter().enumerate().map(|(j, &s)| i32::from(m[j / per]) * i32::from(s)).sum()
    }

    /// The 2-bit quant of element `e` of a Q2_K/Q3_K block's `qs`.
    fn q2(qs: &[u8; 64], e: usize) -> i32 {
        i32::from((qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3)
    }

    /// The 4-bit quant of element `e` of a Q4_K/Q5_K block's `qs`.
    fn q4(qs: &[u8; 128], e: usize) -> i32 {
        let b = qs[32 * (e / 64) + e % 32];
        i32::from(if (e / 32).is_multiple_of(2) { b & 0x0f } else { b >> 4 })
    }

    fn sums_q2_k(b: &BlockQ2K, a: &[i8], bsums: &[i16]) -> BlockSums {
        let v = std::array::from_fn(|e| i32::from(b.scales[e / 16] & 0x0f) * q2(&b.qs, e));
        let m = b.scales.map(|s| s >> 4);
        BlockSums { lanes: lanes(&v, a), msum: msum(&m, 1, bsums) }
    }

    fn sums_q3_k(b: &BlockQ3K, a: &[i8]) -> BlockSums {
        let sc = q3_k_scales(&b.scales);
        let v = std::array::from_fn(|e| {
            let high = (b.hmask[e % 32] >> (e / 32)) & 1;
            i32::from(sc[e / 16]) * (q2(&b.qs, e) - if high != 0 { 0 } else { 4 })
        });
        BlockSums { lanes: lanes(&v, a), msum: 0 }
    }

    fn scales_mins_k4(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
        let mut sc = [0u8; 8];
        let mut m = [0u8; 8];
        for j in 0..8 {
            (sc[j], m[j]) = get_scale_min_k4(j, s);
        }
        (sc, m)
    }

    fn sums_q4_k(b: &BlockQ4K, a: &[i8], bsums: &[i16]) -> BlockSums {
        let (sc, m) = scales_mins_k4(&b.scales);
        let v = std::array::from_fn(|e| i32::from(sc[e / 32]) * q4(&b.qs, e));
        BlockSums { lanes: lanes(&v, a), msum: msum(&m, 2, bsums) }
    }

    fn sums_q5_k(b: &BlockQ5K, a: &[i8], bsums: &[i16]) -> BlockSums {
        let (sc, m) = scales_mins_k4(&b.scales);
        let v = std::array::from_fn(|e| {
            let high = i32::from((b.qh[e % 32] >> (e / 32)) & 1);
            i32::from(sc[e / 32]) * (q4(&b.qs, e) + 16 * high)
        });
        BlockSums { lanes: lanes(&v, a), msum: msum(&m, 2, bsums) }
    }

    fn sums_q6_k(b: &BlockQ6K, a: &[i8]) -> BlockSums {
        let v = std::array::from_fn(|e| {
            let (h, k, l) = (e / 128, (e / 32) % 4, e % 32);
            let lo = b.ql[64 * h + 32 * (k % 2) + l];
            let lo = if k < 2 { lo & 0x0f } else { lo >> 4 };
            let q = lo | (((b.qh[32 * h + l] >> (2 * k)) & 3) << 4);
            i32::from(b.scales[e / 16]) * (i32::from(q) - 32)
        });
        BlockSums { lanes: lanes(&v, a), msum: 0 }
    }

    /// The activation quants and sums of block `b`.
    fn act_block<'a>(a: &ActRow<'a>, b: usize) -> (&'a [i8], &'a [i16]) {
        (&a.qs[b * QK_K..(b + 1) * QK_K], &a.bsums[b * 16..(b + 1) * 16])
    }

    /// Per block: the integer sums and the weight's `d` and `dmin` (0 without minimums).
    fn parts(
        ty: GgmlType,
        w: &[u8],
        a: &ActRow<'_>,
    ) -> Result<Vec<(BlockSums, f32, f32)>, KernelError> {
        check_k_row(ty, w, a)?;
        let each = |b: usize| act_block(a, b);
        Ok(match ty {
            GgmlType::Q2K => as_blocks::<BlockQ2K>(w)?
                .iter()
                .enumerate()
                .map(|(b, x)| {
                    let (q, s) = each(b);
                    (sums_q2_k(x, q, s), f16_le(x.d), f16_le(x.dmin))
                })
                .collect(),
            GgmlType::Q3K => as_blocks::<BlockQ3K>(w)?
                .iter()
                .enumerate()
                .map(|(b, x)| (sums_q3_k(x, each(b).0), f16_le(x.d), 0.0))
                .collect(),
            GgmlType::Q4K => as_blocks::<BlockQ4K>(w)?
                .iter()
                .enumerate()
                .map(|(b, x)| {
                    let (q, s) = each(b);
                    (sums_q4_k(x, q, s), f16_le(x.d), f16_le(x.dmin))
                })
                .collect(),
            GgmlType::Q5K => as_blocks::<BlockQ5K>(w)?
                .iter()
                .enumerate()
                .map(|(b, x)| {
                    let (q, s) = each(b);
                    (sums_q5_k(x, q, s), f16_le(x.d), f16_le(x.dmin))
                })
                .collect(),
            GgmlType::Q6K => as_blocks::<BlockQ6K>(w)?
                .iter()
                .enumerate()
                .map(|(b, x)| (sums_q6_k(x, each(b).0), f16_le(x.d), 0.0))
                .collect(),
            _ => return Err(KernelError::Unsupported { ty, op: "k-quant dot product" }),
        })
    }

    /// The per-block integer sums of a k-quant row with a Q8_K row. Exposed so SIMD paths can
    /// be checked bit for bit.
    pub fn block_isums(
        ty: GgmlType,
        w: &[u8],
        a: &ActRow<'_>,
    ) -> Result<Vec<BlockSums>, KernelError> {
        Ok(parts(ty, w, a)?.into_iter().map(|(s, _, _)| s).collect())
    }

    /// `sum |term|` of the reference accumulation, for the tolerance of other paths (see the
    /// module docs).
    pub fn abs_terms(ty: GgmlType, w: &[u8], a: &ActRow<'_>) -> Result<f32, KernelError> {
        let mut total = 0.0f32;
        for (b, (s, d, dmin)) in parts(ty, w, a)?.into_iter().enumerate() {
            let lanes: f32 = s.lanes.iter().map(|&l| l.unsigned_abs() as f32).sum();
            total += (d * a.d[b]).abs() * lanes + (dmin * a.d[b] * s.msum as f32).abs();
        }
        Ok(total)
    }

    /// The accumulation of Q3_K .. Q6_K: eight lane sums of `d * lane`, minimums (`has_min`)
    /// subtracted block by block, lanes added last.
    fn lane_dot(
        parts: impl Iterator<Item = (BlockSums, f32, f32)>,
        has_min: bool,
        a: &ActRow<'_>,
    ) -> f32 {
        let mut sums = [0.0f32; 8];
        let mut sumf = 0.0f32;
        for (b, (s, dw, dminw)) in parts.enumerate() {
            let d = dw * a.d[b];
            for (acc, &l) in sums.iter_mut().zip(&s.lanes) {
                *acc += d * l as f32;
            }
            if has_min {
                let dmin = dminw * a.d[b];
                sumf -= dmin * s.msum as f32;
            }
        }
        for s in sums {
            sumf += s;
        }
        sumf
    }

    /// Q2_K x Q8_K.
    pub fn dot_q2_k(w: &[BlockQ2K], a: &ActRow<'_>) -> f32 {
        let mut sumf = 0.0f32;
        for (b, x) in w.iter().enumerate() {
            let (q, bs) = act_block(a, b);
            let s = sums_q2_k(x, q, bs);
            let dall = a.d[b] * f16_le(x.d);
            let dmin = a.d[b] * f16_le(x.dmin);
            sumf += dall * s.isum() as f32 - dmin * s.msum as f32;
        }
        sumf
    }

    /// Q3_K x Q8_K.
    pub fn dot_q3_k(w: &[BlockQ3K], a: &ActRow<'_>) -> f32 {
        lane_dot(
            w.iter().enumerate().map(|(b, x)| (sums_q3_k(x, act_block(a, b).0), f16_le(x.d), 0.0)),
            false,
            a,
        )
    }

    /// Q4_K x Q8_K.
    pub fn dot_q4_k(w: &[BlockQ4K], a: &ActRow<'_>) -> f32 {
        lane_dot(
            w.iter().enumerate().map(|(b, x)| {
                let (q, bs) = act_block(a, b);
                (sums_q4_k(x, q, bs), f16_le(x.d), f16_le(x.dmin))
            }),
            true,
            a,
        )
    }

    /// Q5_K x Q8_K.
    pub fn dot_q5_k(w: &[BlockQ5K], a: &ActRow<'_>) -> f32 {
        lane_dot(
            w.iter().enumerate().map(|(b, x)| {
                let (q, bs) = act_block(a, b);
                (sums_q5_k(x, q, bs), f16_le(x.d), f16_le(x.dmin))
            }),
            true,
            a,
        )
    }

    /// Q6_K x Q8_K.
    pub fn dot_q6_k(w: &[BlockQ6K], a: &ActRow<'_>) -> f32 {
        lane_dot(
            w.iter().enumerate().map(|(b, x)| (sums_q6_k(x, act_block(a, b).0), f16_le(x.d), 0.0)),
            false,
            a,
        )
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::*;
    use crate::dot::avx2::prefetch_ahead;
    use crate::formats::Block;
    use crate::simd::{f16_1, f16x2, load_f32x8, load_i8x32, load_u8x16, store_f32x8};

    /// Rows a drive works through for every token tile before moving on (a multiple of every
    /// row tile).
    const ROW_BLOCK: usize = 64;

    /// What a k-quant block's chunks of 32 weights are decoded from, prepared once per block
    /// and row. A chunk is 32 unsigned quants (bytes below 64) and the 16-bit factors `madd`
    /// multiplies their `maddubs` pair sums by: the sub-block scale of elements 0-15 in the low
    /// half, of 16-31 in the high half.
    #[derive(Clone, Copy)]
    pub(crate) struct Prep {
        /// The scales as 16-bit words in both 128-bit halves, which the chunks' factors are
        /// shuffled out of: chunks 0-3 from `sc[0]`, 4-7 from `sc[1]`.
        sc: [__m256i; 2],
        /// Q3_K's `hmask`, Q5_K's `qh`.
        bits: __m256i,
        /// Per group of 16, the factors of the activation's `bsums`: minimums (`HAS_MIN`) or
        /// `-offset * scale`.
        coef: __m256i,
        d: f32,
        dmin: f32,
    }

    impl Prep {
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        fn zero() -> Prep {
            let z = _mm256_setzero_si256();
            Prep { sc: [z; 2], bits: z, coef: z, d: 0.0, dmin: 0.0 }
        }
    }

    /// A k-quant block the AVX2 kernels can decode.
    pub(crate) trait Avx2KBlock: Block {
        /// `coef` holds minimums, subtracted with `dmin`, rather than offsets added to `isum`.
        const HAS_MIN: bool;
        /// The largest quant a chunk holds.
        const MAX_Q: u32;
        /// The per-block state.
        ///
        /// # Safety
        ///
        /// The CPU supports AVX2+FMA+F16C.
        unsafe fn prep(&self) -> Prep;
        /// Chunk `C` (0..8): its quants and factors. (`C` is a constant so that every shift,
        /// mask and shuffle control below is one.)
        ///
        /// # Safety
        ///
        /// As for `prep`.
        unsafe fn chunk<const C: usize>(&self, p: &Prep) -> (__m256i, __m256i);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn load_u8x32(p: &[u8; 32]) -> __m256i {
        // SAFETY: `p` is 32 readable bytes; the load has no alignment requirement.
        unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn load_i8x16(p: &[i8; 16]) -> __m128i {
        // SAFETY: `p` is 16 readable bytes; the load has no alignment requirement.
        unsafe { _mm_loadu_si128(p.as_ptr().cast()) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn load_i16x16(p: &[i16]) -> __m256i {
        let p: &[i16; 16] = p[..16].try_into().unwrap();
        // SAFETY: `p` is 32 readable bytes; the load has no alignment requirement.
        unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
    }

    /// 32 bytes of `q` from byte `at`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn bytes32<const N: usize>(q: &[u8; N], at: usize) -> __m256i {
        load_u8x32(q[at..at + 32].try_into().unwrap())
    }

    /// Shifts each 16-bit lane right by `n` (a constant once the chunk loop is unrolled).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn shr16(v: __m256i, n: usize) -> __m256i {
        _mm256_srl_epi16(v, _mm_cvtsi32_si128(n as i32))
    }

    /// Word `lo` of each half of `src` in the low half's eight words, word `hi` in the high
    /// half's.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn pick_words(src: __m256i, lo: usize, hi: usize) -> __m256i {
        let w = |i: usize| i16::from_le_bytes([2 * i as u8, 2 * i as u8 + 1]);
        _mm256_shuffle_epi8(src, _mm256_set_m128i(_mm_set1_epi16(w(hi)), _mm_set1_epi16(w(lo))))
    }

    /// Sixteen per-16 scales (bytes, signed when `SIGNED`) as the two shuffle sources.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn sources16<const SIGNED: bool>(s: __m128i) -> ([__m256i; 2], __m256i) {
        let w = if SIGNED { _mm256_cvtepi8_epi16(s) } else { _mm256_cvtepu8_epi16(s) };
        let lo = _mm256_permute2x128_si256::<0x00>(w, w);
        let hi = _mm256_permute2x128_si256::<0x11>(w, w);
        ([lo, hi], w)
    }

    /// Chunk `c`'s factors from per-16 scales: sub-blocks `2c` and `2c + 1`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn factors16(p: &Prep, c: usize) -> __m256i {
        let j = 2 * (c % 4);
        pick_words(p.sc[c / 4], j, j + 1)
    }

    /// Chunk `c`'s factors from per-32 scales: sub-block `c` in both halves.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn factors32(p: &Prep, c: usize) -> __m256i {
        pick_words(p.sc[0], c, c)
    }

    /// Q4_K/Q5_K scales and minimums as bytes `sc0..sc7` and `m0..m7` (ggml's 32-bit shuffle of
    /// `get_scale_min_k4`).
    #[inline]
    fn scale_min_bytes(s: &[u8; 12]) -> (u64, u64) {
        let w = |i: usize| u32::from_le_bytes(s[4 * i..4 * i + 4].try_into().unwrap());
        let (u0, u1, u2) = (w(0), w(1), w(2));
        let (k1, k2, k3) = (0x3f3f_3f3fu32, 0x0f0f_0f0fu32, 0x0303_0303u32);
        let sc_lo = u0 & k1;
        let sc_hi = (u2 & k2) | (((u0 >> 6) & k3) << 4);
        let m_lo = u1 & k1;
        let m_hi = ((u2 >> 4) & k2) | (((u1 >> 6) & k3) << 4);
        (u64::from(sc_lo) | (u64::from(sc_hi) << 32), u64::from(m_lo) | (u64::from(m_hi) << 32))
    }

    /// [`q3_k_scales`] as sixteen bytes, through ggml's 32-bit masks (`dequantize_row_q3_K`).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn q3_k_scale_bytes(s: &[u8; 12]) -> __m128i {
        let w = |i: usize| u32::from_le_bytes(s[4 * i..4 * i + 4].try_into().unwrap());
        let (a0, a1, hi) = (w(0), w(1), w(2));
        let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
        let b = [
            (a0 & k2) | ((hi & k1) << 4),
            (a1 & k2) | (((hi >> 2) & k1) << 4),
            ((a0 >> 4) & k2) | (((hi >> 4) & k1) << 4),
            ((a1 >> 4) & k2) | (((hi >> 6) & k1) << 4),
        ];
        let v = _mm_setr_epi32(b[0] as i32, b[1] as i32, b[2] as i32, b[3] as i32);
        _mm_sub_epi8(v, _mm_set1_epi8(32))
    }

    /// The Q4_K/Q5_K state but for `bits`: eight scales as words in both halves, each minimum
    /// twice (once per group of 16) as `coef`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn prep_k4(s: &[u8; 12], d: [u8; 2], dmin: [u8; 2]) -> Prep {
        let (sc, m) = scale_min_bytes(s);
        let w = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
        let m = _mm_cvtsi64_si128(m as i64);
        let dm = f16x2(d, dmin);
        Prep {
            sc: [w, w],
            bits: _mm256_setzero_si256(),
            coef: _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m, m)),
            d: _mm_cvtss_f32(dm),
            dmin: _mm_cvtss_f32(_mm_movehdup_ps(dm)),
        }
    }

    /// The nibbles of chunk `c` of Q4_K/Q5_K `qs`: the low (even `c`) or high ones of
    /// `qs[32 (c / 2)..]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn nibbles(qs: &[u8; 128], c: usize) -> __m256i {
        let v = bytes32(qs, 32 * (c / 2));
        let v = if c.is_multiple_of(2) { v } else { _mm256_srli_epi16::<4>(v) };
        _mm256_and_si256(v, _mm256_set1_epi8(0x0f))
    }

    /// Bits `2k..2k+2` (`k = c % 4`) of `qs[32 (c / 4)..]`: the 2-bit fields of Q2_K/Q3_K.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn two_bits(qs: &[u8; 64], c: usize) -> __m256i {
        _mm256_and_si256(shr16(bytes32(qs, 32 * (c / 4)), 2 * (c % 4)), _mm256_set1_epi8(3))
    }

    /// Bit `c` of each byte of `bits`, moved to bit `to`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn bit_plane<const TO: i32>(bits: __m256i, c: usize) -> __m256i {
        // Within a 16-bit lane, bits of the neighbouring byte that land in this byte sit
        // elsewhere than bit TO (< 8), so the mask drops them.
        let v = _mm256_slli_epi16::<TO>(shr16(bits, c));
        _mm256_and_si256(v, _mm256_set1_epi8(1 << TO))
    }

    impl Avx2KBlock for BlockQ2K {
        const HAS_MIN: bool = true;
        const MAX_Q: u32 = 3;
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn prep(&self) -> Prep {
            let s = load_u8x16(&self.scales);
            let lo = _mm_and_si128(s, _mm_set1_epi8(0x0f));
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(s), _mm_set1_epi8(0x0f));
            let (sc, _) = sources16::<false>(lo);
            let dm = f16x2(self.d, self.dmin);
            Prep {
                sc,
                bits: _mm256_setzero_si256(),
                coef: _mm256_cvtepu8_epi16(hi),
                d: _mm_cvtss_f32(dm),
                dmin: _mm_cvtss_f32(_mm_movehdup_ps(dm)),
            }
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn chunk<const C: usize>(&self, p: &Prep) -> (__m256i, __m256i) {
            let c = C;
            (two_bits(&self.qs, c), factors16(p, c))
        }
    }

    impl Avx2KBlock for BlockQ3K {
        const HAS_MIN: bool = false;
        const MAX_Q: u32 = 7;
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn prep(&self) -> Prep {
            let (src, w) = sources16::<true>(q3_k_scale_bytes(&self.scales));
            Prep {
                sc: src,
                bits: load_u8x32(&self.hmask),
                // -4 * scale per 16, for the quants' offset.
                coef: _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16::<2>(w)),
                d: f16_1(self.d),
                dmin: 0.0,
            }
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn chunk<const C: usize>(&self, p: &Prep) -> (__m256i, __m256i) {
            let c = C;
            let q = _mm256_or_si256(two_bits(&self.qs, c), bit_plane::<2>(p.bits, c));
            (q, factors16(p, c))
        }
    }

    impl Avx2KBlock for BlockQ4K {
        const HAS_MIN: bool = true;
        const MAX_Q: u32 = 15;
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn prep(&self) -> Prep {
            prep_k4(&self.scales, self.d, self.dmin)
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn chunk<const C: usize>(&self, p: &Prep) -> (__m256i, __m256i) {
            let c = C;
            (nibbles(&self.qs, c), factors32(p, c))
        }
    }

    impl Avx2KBlock for BlockQ5K {
        const HAS_MIN: bool = true;
        const MAX_Q: u32 = 31;
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn prep(&self) -> Prep {
            Prep { bits: load_u8x32(&self.qh), ..prep_k4(&self.scales, self.d, self.dmin) }
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn chunk<const C: usize>(&self, p: &Prep) -> (__m256i, __m256i) {
            let c = C;
            let q = _mm256_or_si256(nibbles(&self.qs, c), bit_plane::<4>(p.bits, c));
            (q, factors32(p, c))
        }
    }

    impl Avx2KBlock for BlockQ6K {
        const HAS_MIN: bool = false;
        const MAX_Q: u32 = 63;
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn prep(&self) -> Prep {
            let (sc, w) = sources16::<true>(load_i8x16(&self.scales));
            Prep {
                sc,
                bits: _mm256_setzero_si256(),
                // -32 * scale per 16, for the quants' offset.
                coef: _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16::<5>(w)),
                d: f16_1(self.d),
                dmin: 0.0,
            }
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn chunk<const C: usize>(&self, p: &Prep) -> (__m256i, __m256i) {
            let c = C;
            let (h, k) = (c / 4, c % 4);
            // Low four bits: a nibble of `ql[64 h + 32 (k % 2)..]`; high two: bits 2k..2k+2 of
            // `qh[32 h..]`, moved to bits 4..6.
            let l = bytes32(&self.ql, 64 * h + 32 * (k % 2));
            let l = if k < 2 { l } else { _mm256_srli_epi16::<4>(l) };
            let hb = bytes32(&self.qh, 32 * h);
            let hb = match k {
                0 => _mm256_slli_epi16::<4>(hb),
                1 => _mm256_slli_epi16::<2>(hb),
                2 => hb,
                _ => _mm256_srli_epi16::<2>(hb),
            };
            let q = _mm256_or_si256(
                _mm256_and_si256(l, _mm256_set1_epi8(0x0f)),
                _mm256_and_si256(hb, _mm256_set1_epi8(0x30)),
            );
            (q, factors16(p, c))
        }
    }

    /// What a chunk step reads: the tile's rows, the block index, the rows' states and the
    /// tokens' quants.
    type StepIn<'x, 'y, B, const R: usize, const T: usize> =
        (&'x [&'y [B]; R], usize, &'x [Prep; R], &'x [&'y [[i8; 32]]; T]);

    /// Chunk `C` of block `b`: every row's quants against every token's, into `isum`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn chunk_step<B: Avx2KBlock, const C: usize, const R: usize, const T: usize>(
        (wr, b, prep, aq): StepIn<'_, '_, B, R, T>,
        isum: &mut [[__m256i; T]; R],
    ) {
        let mut av = [_mm256_setzero_si256(); T];
        for t in 0..T {
            av[t] = load_i8x32(&aq[t][8 * b + C]);
        }
        for r in 0..R {
            // SAFETY: this function runs only with AVX2+FMA+F16C enabled.
            let (q, f) = unsafe { wr[r][b].chunk::<C>(&prep[r]) };
            for t in 0..T {
                let p = _mm256_maddubs_epi16(q, av[t]);
                isum[r][t] = _mm256_add_epi32(isum[r][t], _mm256_madd_epi16(p, f));
            }
        }
    }

    #[cfg(test)]
    use crate::simd::hsum_epi32;

    /// Per-block `(isum, msum)` through the same decode and products as the tiles.
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn block_isums<B: Avx2KBlock>(w: &[B], a: &ActRow<'_>) -> Vec<(i32, i32)> {
        let aq = a.qs.as_chunks::<32>().0;
        let mut out = Vec::with_capacity(w.len());
        for (b, blk) in w.iter().enumerate() {
            {
                // SAFETY: this function runs only with AVX2+FMA+F16C enabled.
                let p = unsafe { blk.prep() };
                let mut isum = [[_mm256_setzero_si256(); 1]; 1];
                let ab = (&[w], b, &[p], &[aq]);
                chunk_step::<B, 0, 1, 1>(ab, &mut isum);
                chunk_step::<B, 1, 1, 1>(ab, &mut isum);
                chunk_step::<B, 2, 1, 1>(ab, &mut isum);
                chunk_step::<B, 3, 1, 1>(ab, &mut isum);
                chunk_step::<B, 4, 1, 1>(ab, &mut isum);
                chunk_step::<B, 5, 1, 1>(ab, &mut isum);
                chunk_step::<B, 6, 1, 1>(ab, &mut isum);
                chunk_step::<B, 7, 1, 1>(ab, &mut isum);
                let acc = isum[0][0];
                let extra = _mm256_madd_epi16(p.coef, load_i16x16(&a.bsums[16 * b..]));
                out.push(if B::HAS_MIN {
                    (hsum_epi32(acc), hsum_epi32(extra))
                } else {
                    (hsum_epi32(_mm256_add_epi32(acc, extra)), 0)
                });
            }
        }
        out
    }

    /// Eight i32 vectors to their lane sums: lane `i` of the result is the sum of `v[i]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn reduce8(v: [__m256i; 8]) -> __m256i {
        let pair = |x: __m256i, y: __m256i| {
            _mm256_add_epi32(_mm256_unpacklo_epi32(x, y), _mm256_unpackhi_epi32(x, y))
        };
        let quad = |x: __m256i, y: __m256i| {
            _mm256_add_epi32(_mm256_unpacklo_epi64(x, y), _mm256_unpackhi_epi64(x, y))
        };
        let lo = quad(pair(v[0], v[1]), pair(v[2], v[3]));
        let hi = quad(pair(v[4], v[5]), pair(v[6], v[7]));
        _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(lo, hi),
            _mm256_permute2x128_si256::<0x31>(lo, hi),
        )
    }

    /// Two vectors of per-half partial sums `[x lo | x hi]`, `[y lo | y hi]` (four lanes each) to
    /// `[x lo + x hi | y lo + y hi]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn fold_halves(x: __m256i, y: __m256i) -> __m256i {
        _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(x, y),
            _mm256_permute2x128_si256::<0x31>(x, y),
        )
    }

    /// The block's float step, the same for every tile: `acc + (d_w d_a) isum`, then minus
    /// `(dmin_w d_a) msum` for types with minimums (for the others `msum` is in `isum`). One
    /// (row, token) pair per lane; `dw` and `dmin` the rows' scales, `da` the tokens'.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn block_step<B: Avx2KBlock>(
        acc: __m256,
        isum: __m256i,
        msum: __m256i,
        (dw, dmin, da): (__m256, __m256, __m256),
    ) -> __m256 {
        if B::HAS_MIN {
            let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, da), acc);
            _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_mul_ps(dmin, da), acc)
        } else {
            let i = _mm256_add_epi32(isum, msum);
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(dw, da), acc)
        }
    }

    /// Dword `K` of each half of `v` in all four dwords of that half.
    macro_rules! dword {
        ($v:expr, 0) => {
            _mm256_shuffle_epi32::<0x00>($v)
        };
        ($v:expr, 1) => {
            _mm256_shuffle_epi32::<0x55>($v)
        };
        ($v:expr, 2) => {
            _mm256_shuffle_epi32::<0xaa>($v)
        };
        ($v:expr, 3) => {
            _mm256_shuffle_epi32::<0xff>($v)
        };
    }

    /// Chunk `C` of block `b` for a quarter tile of `W` tokens (one row by two groups of four
    /// tokens, or two rows by one group): the row's chunk spread as quarters (`pshufd` gives
    /// quarter `k` in the low half and `k + 4` in the high half, matching the packed
    /// activations), products summed vertically in i16 (at most eight products of quants below
    /// 32 per lane, four below 64) and multiplied by the chunk's factors, into `isum[unit]`:
    /// per unit, the four tokens' sums of elements 0-15 in the low half and 16-31 in the high.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn quarter_chunk<B: Avx2KBlock, const C: usize, const W: usize>(
        wr: &[&[B]; 8],
        b: usize,
        prep: &[Prep; 2],
        q: &[Q32],
        isum: &mut [__m256i; 2],
    ) {
        let (rows, groups) = (8 / W, W / 4);
        for r in 0..rows {
            // SAFETY: this function runs only with AVX2+FMA+F16C enabled.
            let (qv, f) = unsafe { wr[r][b].chunk::<C>(&prep[r]) };
            let w = [dword!(qv, 0), dword!(qv, 1), dword!(qv, 2), dword!(qv, 3)];
            for g in 0..groups {
                let a = &q[(C * groups + g) * 4..][..4];
                let p = |k: usize| _mm256_maddubs_epi16(w[k], load_i8x32(&a[k].0));
                let s = if B::MAX_Q < 32 {
                    let x = _mm256_add_epi16(
                        _mm256_add_epi16(p(0), p(1)),
                        _mm256_add_epi16(p(2), p(3)),
                    );
                    _mm256_madd_epi16(x, f)
                } else {
                    _mm256_add_epi32(
                        _mm256_madd_epi16(_mm256_add_epi16(p(0), p(1)), f),
                        _mm256_madd_epi16(_mm256_add_epi16(p(2), p(3)), f),
                    )
                };
                isum[r + g] = _mm256_add_epi32(isum[r + g], s);
            }
        }
    }

    /// The rows' `d` and `dmin` in lane order ([`lane_map`]) for a tile of `W` tokens.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn row_scales<const W: usize>(prep: &[Prep]) -> (__m256, __m256) {
        let by = |f: &dyn Fn(&Prep) -> f32| -> __m256 {
            match W {
                8 => _mm256_set1_ps(f(&prep[0])),
                4 => _mm256_set_m128(_mm_set1_ps(f(&prep[1])), _mm_set1_ps(f(&prep[0]))),
                2 => {
                    let (a, b, c, d) = (f(&prep[0]), f(&prep[1]), f(&prep[2]), f(&prep[3]));
                    _mm256_setr_ps(a, a, b, b, c, c, d, d)
                }
                _ => {
                    let v: [f32; 4] = std::array::from_fn(|i| f(&prep[i]));
                    _mm256_setr_ps(v[0], v[1], v[2], v[3], 0.0, 0.0, 0.0, 0.0)
                }
            }
        };
        (by(&|p| p.d), by(&|p| p.dmin))
    }

    /// A tile of `W` = 8 or 4 packed tokens (one row by eight tokens, two rows by four) over
    /// whole rows, as the eight lanes of [`lane_map`]: per block exact `isum` and `msum` per
    /// (row, token) pair, then [`block_step`]. `prefetch_next` as in [`crate::dot`]'s tiles.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn quarter_tile<B: Avx2KBlock, const W: usize>(
        w: &[&[B]; 8],
        t: &KTile<'_>,
        prefetch_next: bool,
    ) -> [f32; 8] {
        let nb = t.d.len();
        let rows = 8 / W;
        let groups = W / 4;
        let mut wr: [&[B]; 8] = [&[]; 8];
        for r in 0..rows {
            wr[r] = &w[r][..nb];
        }
        let q = &t.q[..nb * 32 * groups];
        let bs = &t.bs[..nb * 8];
        let mut acc = _mm256_setzero_ps();
        let step = rows * std::mem::size_of::<B>();
        let tile_end = w[rows - 1].as_ptr_range().end.cast::<u8>();
        for b in 0..nb {
            if prefetch_next {
                prefetch_ahead(tile_end, b, step);
            }
            let mut prep = [Prep::zero(); 2];
            for r in 0..rows {
                // SAFETY: this function runs only with AVX2+FMA+F16C enabled.
                prep[r] = unsafe { wr[r][b].prep() };
            }
            let qb = &q[b * 32 * groups..(b + 1) * 32 * groups];
            let mut isum = [_mm256_setzero_si256(); 2];
            quarter_chunk::<B, 0, W>(&wr, b, &prep, qb, &mut isum);
            quarter_chunk::<B, 1, W>(&wr, b, &prep, qb, &mut isum);
            quarter_chunk::<B, 2, W>(&wr, b, &prep, qb, &mut isum);
            quarter_chunk::<B, 3, W>(&wr, b, &prep, qb, &mut isum);
            quarter_chunk::<B, 4, W>(&wr, b, &prep, qb, &mut isum);
            quarter_chunk::<B, 5, W>(&wr, b, &prep, qb, &mut isum);
            quarter_chunk::<B, 6, W>(&wr, b, &prep, qb, &mut isum);
            quarter_chunk::<B, 7, W>(&wr, b, &prep, qb, &mut isum);
            let isum = fold_halves(isum[0], isum[1]);
            // msum: per pair p of groups of 16, the tokens' two sums (packed) times the rows'
            // two factors, summed over the eight pairs.
            let c1 = if W == 8 { prep[0].coef } else { prep[1].coef };
            let clo = _mm256_permute2x128_si256::<0x20>(prep[0].coef, c1);
            let chi = _mm256_permute2x128_si256::<0x31>(prep[0].coef, c1);
            let bsb = &bs[b * 8..b * 8 + 8];
            let m = |k: usize, c: __m256i| _mm256_madd_epi16(load_i8x32(&bsb[k].0), c);
            let s0 = _mm256_add_epi32(m(0, dword!(clo, 0)), m(1, dword!(clo, 1)));
            let s1 = _mm256_add_epi32(m(2, dword!(clo, 2)), m(3, dword!(clo, 3)));
            let s2 = _mm256_add_epi32(m(4, dword!(chi, 0)), m(5, dword!(chi, 1)));
            let s3 = _mm256_add_epi32(m(6, dword!(chi, 2)), m(7, dword!(chi, 3)));
            let msum = _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3));
            let (dw, dmin) = row_scales::<W>(&prep[..rows]);
            let da = load_f32x8(&t.d[b]);
            acc = block_step::<B>(acc, isum, msum, (dw, dmin, da));
        }
        let mut out = [0.0f32; 8];
        store_f32x8(&mut out, acc);
        out
    }

    /// A tile of `W` = 2 or 1 tokens (four rows by two or by one) over whole rows, as the
    /// lanes of [`lane_map`]: `R x T` lane-wise accumulations per block as `chunk_step`
    /// makes them, reduced to exact `isum` and `msum` per pair, then [`block_step`].
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn row_tile<B: Avx2KBlock, const R: usize, const T: usize>(
        w: &[&[B]; 8],
        a: &[&ActRow<'_>; T],
        d: &[[f32; 8]],
        prefetch_next: bool,
    ) -> [f32; 8] {
        let nb = d.len();
        let mut aq: [&[[i8; 32]]; T] = [&[]; T];
        let mut ab: [&[i16]; T] = [&[]; T];
        for t in 0..T {
            aq[t] = &a[t].qs.as_chunks::<32>().0[..8 * nb];
            ab[t] = &a[t].bsums[..16 * nb];
        }
        let mut wr: [&[B]; R] = [&[]; R];
        for r in 0..R {
            wr[r] = &w[r][..nb];
        }
        let mut acc = _mm256_setzero_ps();
        let step = R * std::mem::size_of::<B>();
        let tile_end = w[R - 1].as_ptr_range().end.cast::<u8>();
        for b in 0..nb {
            if prefetch_next {
                prefetch_ahead(tile_end, b, step);
            }
            let mut prep = [Prep::zero(); R];
            for r in 0..R {
                // SAFETY: this function runs only with AVX2+FMA+F16C enabled.
                prep[r] = unsafe { wr[r][b].prep() };
            }
            let mut isum = [[_mm256_setzero_si256(); T]; R];
            let step_in = (&wr, b, &prep, &aq);
            chunk_step::<B, 0, R, T>(step_in, &mut isum);
            chunk_step::<B, 1, R, T>(step_in, &mut isum);
            chunk_step::<B, 2, R, T>(step_in, &mut isum);
            chunk_step::<B, 3, R, T>(step_in, &mut isum);
            chunk_step::<B, 4, R, T>(step_in, &mut isum);
            chunk_step::<B, 5, R, T>(step_in, &mut isum);
            chunk_step::<B, 6, R, T>(step_in, &mut isum);
            chunk_step::<B, 7, R, T>(step_in, &mut isum);
            // Lanes past R x T stay zero.
            let mut iv = [_mm256_setzero_si256(); 8];
            let mut mv = [_mm256_setzero_si256(); 8];
            for t in 0..T {
                let bs = load_i16x16(&ab[t][16 * b..]);
                for r in 0..R {
                    let extra = _mm256_madd_epi16(prep[r].coef, bs);
                    iv[r * T + t] = isum[r][t];
                    mv[r * T + t] = extra;
                }
            }
            let (isum, msum) = if B::HAS_MIN {
                (reduce8(iv), reduce8(mv))
            } else {
                (
                    reduce8(std::array::from_fn(|i| _mm256_add_epi32(iv[i], mv[i]))),
                    _mm256_setzero_si256(),
                )
            };
            let (dw, dmin) = row_scales::<T>(&prep);
            let da = load_f32x8(&d[b]);
            acc = block_step::<B>(acc, isum, msum, (dw, dmin, da));
        }
        let mut out = [0.0f32; 8];
        store_f32x8(&mut out, acc);
        out
    }

    /// One token tile's packed activations, for [`quarter_tile`] and [`row_tile`].
    pub(crate) struct KTile<'a> {
        q: &'a [Q32],
        bs: &'a [Q32],
        d: &'a [[f32; 8]],
    }

    /// Rows `rows` against every token of `p` (packed from `acts`): per block of 64 rows, each
    /// token tile in turn over all of the block's rows, in row tiles of `8 / width` (the last
    /// one's missing rows repeating its last row, their outputs dropped).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn drive<B: Avx2KBlock, E: FnMut(usize, usize, f32) + ?Sized>(
        w: &[u8],
        row_bytes: usize,
        acts: &[ActRow<'_>],
        p: &KPacked,
        rows: Range<usize>,
        emit: &mut E,
    ) -> Result<(), KernelError> {
        let nb = row_bytes / std::mem::size_of::<B>();
        check_len("activation blocks", nb, p.nb)?;
        let row = |r: usize| as_blocks::<B>(&w[r * row_bytes..(r + 1) * row_bytes]);
        let mut r0 = rows.start;
        while r0 < rows.end {
            let r1 = (r0 + ROW_BLOCK).min(rows.end);
            for (i, t) in p.tiles.iter().enumerate() {
                let first = i == 0;
                let kt = KTile {
                    q: &p.q[t.q_at..t.q_at + if t.width >= 4 { nb * 8 * t.width } else { 0 }],
                    bs: &p.bs[t.b_at..t.b_at + if t.width >= 4 { nb * 8 } else { 0 }],
                    d: &p.d[t.l_at..t.l_at + nb],
                };
                let per = tile_rows(t.width);
                let (lr, lt) = lane_map(t.width);
                let at = |k: usize| &acts[t.t0 + k.min(t.real - 1)];
                let mut r = r0;
                while r < r1 {
                    let mut wr: [&[B]; 8] = [&[]; 8];
                    for (k, x) in wr.iter_mut().take(per).enumerate() {
                        *x = row((r + k).min(r1 - 1))?;
                    }
                    let o = match t.width {
                        8 => quarter_tile::<B, 8>(&wr, &kt, first),
                        4 => quarter_tile::<B, 4>(&wr, &kt, first),
                        2 => row_tile::<B, 4, 2>(&wr, &[at(0), at(1)], kt.d, first),
                        _ => row_tile::<B, 4, 1>(&wr, &[at(0)], kt.d, first),
                    };
                    for (k, &v) in o.iter().enumerate() {
                        if lr[k] < per && r + lr[k] < r1 && lt[k] < t.real {
                            emit(r + lr[k], t.t0 + lt[k], v);
                        }
                    }
                    r += per;
                }
            }
            r0 = r1;
        }
        Ok(())
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn k_rows_packed<E: FnMut(usize, usize, f32) + ?Sized>(
        ty: GgmlType,
        w: &[u8],
        row_bytes: usize,
        acts: &[ActRow<'_>],
        p: &KPacked,
        rows: Range<usize>,
        emit: &mut E,
    ) -> Result<(), KernelError> {
        match ty {
            GgmlType::Q2K => drive::<BlockQ2K, E>(w, row_bytes, acts, p, rows, emit),
            GgmlType::Q3K => drive::<BlockQ3K, E>(w, row_bytes, acts, p, rows, emit),
            GgmlType::Q4K => drive::<BlockQ4K, E>(w, row_bytes, acts, p, rows, emit),
            GgmlType::Q5K => drive::<BlockQ5K, E>(w, row_bytes, acts, p, rows, emit),
            GgmlType::Q6K => drive::<BlockQ6K, E>(w, row_bytes, acts, p, rows, emit),
            _ => Err(KernelError::Unsupported { ty, op: "k-quant dot product" }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::QuantizedActs;
    use crate::formats::quantize_row;
    use crate::pool::ThreadPool;
    use proptest::prelude::*;

    const KTYPES: [GgmlType; 5] =
        [GgmlType::Q2K, GgmlType::Q3K, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K];

    fn acts(x: &[f32]) -> QuantizedActs {
        let mut a = QuantizedActs::new();
        a.quantize_as(ActFormat::Q8K, &ThreadPool::new(1), x, 1, x.len()).unwrap();
        a
    }

    fn dot(isa: Isa, ty: GgmlType, w: &[u8], a: &ActRow<'_>) -> f32 {
        crate::dot::vec_dot_q(isa, ty, w, *a).unwrap()
    }

    fn tol(n: usize, abs_terms: f32) -> f32 {
        2.0 * (n as f32 / 32.0 + 8.0) * f32::EPSILON * abs_terms + f32::MIN_POSITIVE
    }

    #[cfg(target_arch = "x86_64")]
    fn simd_isums(ty: GgmlType, w: &[u8], a: &ActRow<'_>) -> Vec<(i32, i32)> {
        // SAFETY: only called after checking the CPU has AVX2+FMA+F16C.
        unsafe {
            match ty {
                GgmlType::Q2K => avx2::block_isums::<BlockQ2K>(as_blocks(w).unwrap(), a),
                GgmlType::Q3K => avx2::block_isums::<BlockQ3K>(as_blocks(w).unwrap(), a),
                GgmlType::Q4K => avx2::block_isums::<BlockQ4K>(as_blocks(w).unwrap(), a),
                GgmlType::Q5K => avx2::block_isums::<BlockQ5K>(as_blocks(w).unwrap(), a),
                _ => avx2::block_isums::<BlockQ6K>(as_blocks(w).unwrap(), a),
            }
        }
    }

    fn vals(n: usize) -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(
            prop_oneof![4 => -2.0f32..2.0, 1 => -300.0f32..300.0, 1 => Just(0.0f32)],
            n,
        )
    }

    /// Random block bytes: every bit pattern is a valid block, including scales and quants the
    /// quantizers never produce (Q6_K scales of -128, Q8_K-style extremes).
    fn raw_row(ty: GgmlType, nb: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut b: Vec<u8> = (0..nb * ty.type_size())
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect();
        // Keep the f16 scales finite and modest so the float sums stay comparable.
        let d_at: &[usize] = match ty {
            GgmlType::Q2K => &[80, 82],
            GgmlType::Q3K => &[108],
            GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            _ => &[208],
        };
        for blk in b.chunks_mut(ty.type_size()) {
            for &o in d_at {
                blk[o + 1] &= 0x3b; // exponent below 15: |d| < 1
            }
        }
        b
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn k_paths_match_reference(
            (w, x) in (1usize..5).prop_flat_map(|nb| (vals(nb * QK_K), vals(nb * QK_K))),
            seed in any::<u64>(),
        ) {
            let a = acts(&x);
            let row = a.row(0);
            for ty in KTYPES {
                for raw in [false, true] {
                    let wb = if raw {
                        raw_row(ty, w.len() / QK_K, seed)
                    } else {
                        let mut wb = vec![0u8; ty.row_bytes(w.len() as u64).unwrap() as usize];
                        quantize_row(ty, &w, &mut wb).unwrap();
                        wb
                    };
                    let want = dot(Isa::scalar(), ty, &wb, &row);
                    let bound = tol(w.len(), scalar::abs_terms(ty, &wb, &row).unwrap());
                    #[cfg(target_arch = "x86_64")]
                    if Isa::best().avx2() {
                        let isums: Vec<(i32, i32)> = scalar::block_isums(ty, &wb, &row)
                            .unwrap()
                            .iter()
                            .map(|s| (s.isum(), s.msum))
                            .collect();
                        prop_assert_eq!(simd_isums(ty, &wb, &row), isums, "{} raw={}", ty, raw);
                    }
                    for isa in Isa::all_supported() {
                        let got = dot(isa, ty, &wb, &row);
                        prop_assert!((got - want).abs() <= bound, "{} {:?} raw={}: {} vs {} (tol {})", ty, isa, raw, got, want, bound);
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_dot_approximates_the_float_dot() {
        // End to end: each k-quant times Q8_K is close to the exact product, closer with bits.
        let mut s = 5u64;
        let mut r = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let n = 4 * QK_K;
        let w: Vec<f32> = (0..n).map(|_| r()).collect();
        let x: Vec<f32> = (0..n).map(|_| r()).collect();
        let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
        let scale: f32 = w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
        let a = acts(&x);
        for (ty, rel) in [
            (GgmlType::Q2K, 0.2),
            (GgmlType::Q3K, 0.1),
            (GgmlType::Q4K, 0.05),
            (GgmlType::Q5K, 0.03),
            (GgmlType::Q6K, 0.02),
        ] {
            let mut wb = vec![0u8; ty.row_bytes(n as u64).unwrap() as usize];
            quantize_row(ty, &w, &mut wb).unwrap();
            for isa in Isa::all_supported() {
                let got = dot(isa, ty, &wb, &a.row(0));
                assert!((got - exact).abs() < rel * scale, "{ty} {isa:?}: {got} vs {exact}");
            }
        }
    }

    #[test]
    fn formats_must_match() {
        let x = vec![1.0f32; QK_K];
        let mut wb = vec![0u8; 144];
        quantize_row(GgmlType::Q4K, &x, &mut wb).unwrap();
        let mut q8 = QuantizedActs::new();
        q8.quantize(&ThreadPool::new(1), &x, 1, QK_K).unwrap();
        assert!(matches!(
            crate::dot::vec_dot_q(Isa::scalar(), GgmlType::Q4K, &wb, q8.row(0)),
            Err(KernelError::Unsupported { .. })
        ));
        let k = acts(&x);
        assert!(matches!(
            crate::dot::vec_dot_q(Isa::scalar(), GgmlType::Q4_0, &[0; 144], k.row(0)),
            Err(KernelError::Unsupported { .. })
        ));
        assert!(matches!(
            crate::dot::vec_dot_q(Isa::scalar(), GgmlType::Q4K, &wb[..143], k.row(0)),
            Err(KernelError::Length { .. })
        ));
    }
}
