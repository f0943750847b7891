//! Dot products of weight rows with activation rows: the inner loop of every matrix product.
//!
//! Quantized weights pair with [`QuantizedActs`] as in ggml: Q4_0, Q5_0 and Q8_0 with the Q8_0
//! values, Q4_1 and Q5_1 with the Q8_1 values (whose `s` carries the minimum's contribution), the
//! k-quants Q2_K .. Q6_K with Q8_K values ([`act_format`] says which; their kernels are in
//! [`crate::kdot`], reached through the same entry points here).
//! Float weights (F32, F16, BF16) pair with f32 activations (ggml rounds activations to f16 for
//! F16 weights; we keep them f32, which is at least as accurate).
//!
//! The scalar functions are the reference and follow ggml's `ggml_vec_dot_*_generic`: per block
//! an exact integer sum `sumi`, then an f32 accumulation of `d_w * d_a * sumi (+ m_w * s_a)` in
//! block order. For the types with a minimum (Q4_1, Q5_1) both additions are fused with the
//! multiplication before them (`f32::mul_add`): the SIMD kernels are bound by vector operations
//! once a block serves several tokens, and this spares two of their six float steps per block.
//! The one-scale types keep ggml's unfused steps: fused, they took Gemma 3 (Q5_0 and Q8_0) on
//! one parity prompt from 62% to 124% of the logit difference from llama.cpp that the test
//! allows, for one float step of three.
//!
//! The AVX2 kernels for Q4_0 .. Q8_0 compute the same per-block integer sums exactly and then
//! the same float operations in the same order, so their results equal the reference bit for
//! bit, whatever the batch and the tile a (row, token) pair lands in. They work on tiles of
//! eight (row, token) pairs: eight rows by one token, four by two, two by four or one by eight.
//! Each 128-bit half of a vector carries one pair's sixteen weights and activations (the row's
//! block is decoded once for the tile's tokens), `maddubs` multiplies, and a short tree of
//! unpacks and adds (in i16 as far as the weights' range allows) gives the eight pairs' exact
//! block sums in the eight lanes of one vector; the float steps then run once per block for
//! all eight. The activations come packed per product (`PackedActs`): tokens in tiles of
//! 8, 4, 2 or 1 with the quants of two tokens interleaved by half block, and `d`, `s` and the
//! quant sums per block in the tiles' lane order.
//!
//! A matrix tiled eight rows wide ([`crate::tiled`]) takes another AVX2 path, with the same
//! per-block integer sums and float steps (so the same results, bit for bit) and no shuffles.
//!
//! The float kernels (and the k-quants, see [`crate::kdot`]) differ from the reference in the
//! float accumulation only: eight lane-wise partial sums with fused multiply-adds, added at the
//! end. Their results agree with the reference to within rounding of a sum of `n` terms,
//! `|simd - ref| <= 2 (n + 8) eps sum|terms|` with `n` the number of elements (blocks for the
//! k-quants) and `eps = 2^-23`; tests check that bound.

use crate::act::{quant_sum, ActFormat, ActRow, QuantizedActs};
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
    if packs(isa, ty) {
        let mut p = PackedActs::default();
        p.pack(acts);
        return q_rows_packed(isa, ty, w, row_bytes, acts, &p, rows, emit);
    }
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

/// Whether products of `ty` weights on `isa` take [`PackedActs`] ([`q_rows_packed`]).
pub(crate) fn packs(isa: Isa, ty: GgmlType) -> bool {
    cfg!(target_arch = "x86_64")
        && isa.avx2()
        && matches!(
            ty,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0
        )
}

/// As [`q_rows`] for weights that [`packs`] accepts, with `acts` packed by
/// [`PackedActs::pack`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn q_rows_packed<E: FnMut(usize, usize, f32) + ?Sized>(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    acts: &[ActRow<'_>],
    p: &PackedActs,
    rows: std::ops::Range<usize>,
    emit: &mut E,
) -> Result<(), KernelError> {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        // SAFETY: an `Isa` reporting AVX2 comes from detection, so the CPU has AVX2+FMA+F16C.
        return unsafe { avx2::q_rows_packed(ty, w, row_bytes, acts, p, rows, emit) };
    }
    let _ = (isa, w, row_bytes, acts, p, rows, emit);
    Err(KernelError::Unsupported { ty, op: "packed activations without AVX2" })
}

/// Thirty-two quants, aligned for a vector load.
#[repr(C, align(32))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Q32(pub(crate) [i8; 32]);

/// One block of a token tile, in the tile's lane order ([`lane_map`]): the tokens' `d`, `s`
/// and sums of the 32 quants (zero for padding).
#[repr(C, align(32))]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Lanes {
    pub(crate) d: [f32; 8],
    pub(crate) s: [f32; 8],
    pub(crate) sum: [i32; 8],
}

/// Tokens `t0 .. t0 + real` of a batch as one tile of `width` (1, 2, 4 or 8; the tokens past
/// `real` padding), its quants at `q_at` and lanes at `l_at` of [`PackedActs`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct TokenTile {
    pub(crate) t0: usize,
    pub(crate) real: usize,
    pub(crate) width: usize,
    pub(crate) q_at: usize,
    pub(crate) l_at: usize,
}

/// Row (within a row tile) and token (within a token tile of `width`) of each output lane of the
/// AVX2 tiles; rows from [`tile_rows`] on mark unused lanes.
pub(crate) const fn lane_map(width: usize) -> ([usize; 8], [usize; 8]) {
    match width {
        8 => ([0; 8], [0, 1, 2, 3, 4, 5, 6, 7]),
        4 => ([0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 3, 0, 1, 2, 3]),
        2 => ([0, 1, 2, 3, 0, 1, 2, 3], [0, 0, 0, 0, 1, 1, 1, 1]),
        _ => ([0, 1, 4, 4, 2, 3, 4, 4], [0; 8]),
    }
}

/// Rows of a tile of `width` tokens: eight (row, token) pairs, but four rows for a single
/// token, whose tiles stream the weights from memory (more rows at once measure slower there).
pub(crate) const fn tile_rows(width: usize) -> usize {
    if width == 1 {
        4
    } else {
        8 / width
    }
}

/// 32-byte chunks of quants per block of a packed token tile of `width` (none for one token,
/// whose tiles read the activation row).
pub(crate) const fn per_block(width: usize) -> usize {
    match width {
        1 => 0,
        2 => 2,
        _ => 8,
    }
}

/// The token tiles of a batch of `n`: `(width, real tokens)`, whole tiles of eight, then the
/// rest as one or two smaller tiles (three tokens and seven padded to the next width, where
/// a split would cost more passes over the weights than the padding wastes).
pub(crate) fn token_tiles(n: usize) -> impl Iterator<Item = (usize, usize)> {
    let rest: &[(usize, usize)] = match n % 8 {
        0 => &[],
        1 => &[(1, 1)],
        2 => &[(2, 2)],
        3 => &[(4, 3)],
        4 => &[(4, 4)],
        5 => &[(4, 4), (1, 1)],
        6 => &[(4, 4), (2, 2)],
        _ => &[(8, 7)],
    };
    std::iter::repeat_n((8, 8), n / 8).chain(rest.iter().copied())
}

/// A batch of Q8_0-format activations laid out for the AVX2 tiles of Q4_0 .. Q8_0 weights,
/// built once per product and read by every task. Per token tile of two or more tokens and
/// block: the quants as 32-byte chunks (tiles of four or eight: eight chunks, chunk `k` holding
/// quants `4k .. 4k + 4` of each token in its 32-bit lanes as [`lane_map`] orders them; tiles of
/// two: `[t lo | t' lo]`, `[t hi | t' hi]` with `lo` quants 0-15 and `hi` 16-31), and one
/// [`Lanes`]. A single token's tile reads the activation row and takes its blocks' quant sums
/// from `sums`.
#[derive(Debug, Default)]
pub(crate) struct PackedActs {
    pub(crate) nb: usize,
    pub(crate) tiles: Vec<TokenTile>,
    pub(crate) q: Vec<Q32>,
    pub(crate) lanes: Vec<Lanes>,
    pub(crate) sums: Vec<i32>,
    /// The same tokens for the matrices tiled eight rows wide ([`crate::tiled`]).
    pub(crate) tiled: crate::tiled::TiledActs,
}

impl PackedActs {
    /// Packs `acts` (Q8_0 format, all of one length), reusing this buffer's memory.
    pub(crate) fn pack(&mut self, acts: &[ActRow<'_>]) {
        let nb = acts.first().map_or(0, |a| a.d.len());
        self.nb = nb;
        self.tiles.clear();
        let (mut t0, mut nq, mut nl, mut ns) = (0, 0, 0, 0);
        for (width, real) in token_tiles(acts.len()) {
            let l_at = if width == 1 { ns } else { nl };
            self.tiles.push(TokenTile { t0, real, width, q_at: nq, l_at });
            t0 += real;
            nq += nb * per_block(width);
            if width == 1 {
                ns += nb;
            } else {
                nl += nb;
            }
        }
        self.q.clear();
        self.q.resize(nq, Q32([0; 32]));
        self.lanes.clear();
        self.lanes.resize(nl, Lanes::default());
        self.sums.clear();
        self.sums.resize(ns, 0);
        for t in &self.tiles {
            let toks = &acts[t.t0..t.t0 + t.real];
            if t.width == 1 {
                for (s, q) in
                    self.sums[t.l_at..t.l_at + nb].iter_mut().zip(toks[0].qs.chunks_exact(QK))
                {
                    *s = quant_sum(q);
                }
                continue;
            }
            let (_, lt) = lane_map(t.width);
            let per = per_block(t.width);
            for b in 0..nb {
                let mut sums = [0i32; 8];
                let qb = &mut self.q[t.q_at + b * per..][..per];
                for (i, a) in toks.iter().enumerate() {
                    let src: &[i8; 32] = a.qs[32 * b..32 * b + 32].try_into().unwrap();
                    sums[i] = quant_sum(src);
                    if t.width == 2 {
                        for (h, c) in qb.iter_mut().enumerate() {
                            c.0[16 * i..16 * i + 16].copy_from_slice(&src[16 * h..16 * h + 16]);
                        }
                        continue;
                    }
                    // Token i's lanes: i, and for four tokens also 4 + i.
                    for (k, c) in qb.iter_mut().enumerate() {
                        let quarter = &src[4 * k..4 * k + 4];
                        c.0[4 * i..4 * i + 4].copy_from_slice(quarter);
                        if t.width == 4 {
                            c.0[16 + 4 * i..20 + 4 * i].copy_from_slice(quarter);
                        }
                    }
                }
                let l = &mut self.lanes[t.l_at + b];
                for (k, &i) in lt.iter().enumerate() {
                    if i < t.real {
                        l.d[k] = toks[i].d[b];
                        l.s[k] = toks[i].s[b];
                        l.sum[k] = sums[i];
                    }
                }
            }
        }
    }
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

/// The scalar reference dot products: ggml's generic C (fused for Q4_1 and Q5_1, see above).
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
            sumf = (f16_le(blk.d) * a.d[b]).mul_add(sumi as f32, sumf);
            sumf = f16_le(blk.m).mul_add(a.s[b], sumf);
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
            sumf = (f16_le(blk.d) * a.d[b]).mul_add(sumi as f32, sumf);
            sumf = f16_le(blk.m).mul_add(a.s[b], sumf);
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
    #[cfg(test)]
    use crate::simd::store_i32x8;
    use crate::simd::{
        hsum_ps, load_bf16x8_le, load_f16x8_le, load_f32x8, load_f32x8_le, load_i32x8, load_i8x16,
        load_i8x32, load_u8x16, prefetch, store_f32x8,
    };

    /// Rows a drive works through for every token tile before moving on: their weights stay
    /// in L2 while each token tile passes over them (a multiple of every row tile).
    const ROW_BLOCK: usize = 64;

    /// A weight block the AVX2 kernels can decode.
    ///
    /// A block's 32 weights go into `maddubs` as two vectors, elements 0-15 (`lo`) and 16-31
    /// (`hi`), each 128-bit half of a vector holding one (row, token) pair's sixteen: the same
    /// row twice ([`Avx2Block::split1`], paired with two tokens) or two rows
    /// ([`Avx2Block::split2`], paired with one token twice).
    pub(crate) trait Avx2Block: Block {
        /// Signed weights (Q8_0), multiplied through the sign trick and widened at once. The
        /// others are unsigned bytes below 32, their offset taken off through the activations'
        /// sums afterwards.
        const SIGNED: bool;
        /// `log2` of the offset subtracted from the unsigned weights (8 for Q4_0, 16 for Q5_0),
        /// or `None`.
        const OFFSET_SHIFT: Option<i32>;
        /// Pair-wise i16 additions the unsigned products allow before they must be widened: with
        /// weights below 16, sums of 16 products stay within i16 (|sum| <= 16 * 15 * 128); below
        /// 32, sums of 8.
        const LEVELS: u32;
        /// The block's first four bytes, little-endian: `d` in the low half and, for blocks with
        /// a minimum, `m` in the high half (else whatever bytes follow `d`).
        fn head(&self) -> i32;
        /// Elements 0-15 of the block in both halves of `lo`, 16-31 in both halves of `hi`.
        ///
        /// # Safety
        ///
        /// The CPU supports AVX2+FMA+F16C.
        unsafe fn split1(&self) -> (__m256i, __m256i);
        /// As `split1` with block `a` in the low halves and `b` in the high halves.
        ///
        /// # Safety
        ///
        /// As for `split1`.
        unsafe fn split2(a: &Self, b: &Self) -> (__m256i, __m256i);
        /// Quarter `k` (elements `4k .. 4k + 4`) of the block in every 32-bit lane of vector
        /// `k`.
        ///
        /// # Safety
        ///
        /// As for `split1`.
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn quarters1(&self) -> [__m256i; 8] {
            // SAFETY: the caller's.
            let (lo, hi) = unsafe { self.split1() };
            spread(lo, hi)
        }
        /// As `quarters1` with block `a` in the low halves and `b` in the high halves.
        ///
        /// # Safety
        ///
        /// As for `split1`.
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn quarters2(a: &Self, b: &Self) -> [__m256i; 8] {
            // SAFETY: the caller's.
            let (lo, hi) = unsafe { Self::split2(a, b) };
            spread(lo, hi)
        }
    }

    /// The quarters of a split block: dword `k % 4` of `lo` (`k < 4`) or `hi` in every lane
    /// of its half.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn spread(lo: __m256i, hi: __m256i) -> [__m256i; 8] {
        [
            _mm256_shuffle_epi32::<0x00>(lo),
            _mm256_shuffle_epi32::<0x55>(lo),
            _mm256_shuffle_epi32::<0xaa>(lo),
            _mm256_shuffle_epi32::<0xff>(lo),
            _mm256_shuffle_epi32::<0x00>(hi),
            _mm256_shuffle_epi32::<0x55>(hi),
            _mm256_shuffle_epi32::<0xaa>(hi),
            _mm256_shuffle_epi32::<0xff>(hi),
        ]
    }

    /// The float operations of one block, which must be the scalar reference's (`sumi` is the
    /// block's integer sum, `da` and `s` the activation's scale and sum, `fma(a, b, c)` is
    /// `a * b + c` rounded once).
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Form {
        /// `sumf += (sumi * d) * da` (Q4_0).
        SumiD,
        /// `sumf += (d * da) * sumi` (Q5_0, Q8_0).
        DdSumi,
        /// `sumf = fma(m, s, fma(d * da, sumi, sumf))` (Q4_1, Q5_1).
        DdSumiMin,
    }

    impl Form {
        /// The form of `ty`'s blocks (the legacy quantized types).
        pub(crate) const fn of(ty: GgmlType) -> Form {
            match ty {
                GgmlType::Q4_0 => Form::SumiD,
                GgmlType::Q4_1 | GgmlType::Q5_1 => Form::DdSumiMin,
                _ => Form::DdSumi,
            }
        }

        /// One block's float steps in eight lanes: `acc` the sums so far, `f` the block's
        /// integer sums as floats, `d` and `m` the weights' scale and minimum, `da` and `s` the
        /// activations' scale and sum (`m` and `s` read by [`Form::DdSumiMin`] only).
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        pub(crate) fn step(
            self,
            acc: __m256,
            f: __m256,
            d: __m256,
            da: __m256,
            m: __m256,
            s: __m256,
        ) -> __m256 {
            match self {
                Form::SumiD => _mm256_add_ps(acc, _mm256_mul_ps(_mm256_mul_ps(f, d), da)),
                Form::DdSumi => _mm256_add_ps(acc, _mm256_mul_ps(_mm256_mul_ps(d, da), f)),
                Form::DdSumiMin => {
                    _mm256_fmadd_ps(m, s, _mm256_fmadd_ps(_mm256_mul_ps(d, da), f, acc))
                }
            }
        }
    }

    /// Sixteen nibbles of `q` (low ones in `lo`, high ones in `hi`).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn nibbles2(q: __m256i) -> (__m256i, __m256i) {
        let m = _mm256_set1_epi8(0x0f);
        (_mm256_and_si256(q, m), _mm256_and_si256(_mm256_srli_epi16::<4>(q), m))
    }

    /// 0x10 in the bytes whose bit of `qh` is set: for `lo`, bits 0-15 of each 128-bit half's
    /// `qh` (broadcast in `x`), for `hi` bits 16-31.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn high_bits2(x: __m256i) -> (__m256i, __m256i) {
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let sel = |ctl: __m256i| {
            let spread = _mm256_shuffle_epi8(x, ctl);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
            _mm256_and_si256(set, _mm256_set1_epi8(0x10))
        };
        let lo = _mm256_set_epi64x(0x0101_0101_0101_0101, 0, 0x0101_0101_0101_0101, 0);
        let hi = _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
        );
        (sel(lo), sel(hi))
    }

    /// A Q5 block's 32 quants (nibbles `qs`, fifth bits `qh`) as the low and high sixteen, each
    /// in both 128-bit halves ([`Avx2Block::split1`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn five_bits1(qs: &[u8; 16], qh: [u8; 4]) -> (__m256i, __m256i) {
        let (lo, hi) = nibbles2(both16(qs));
        let (hl, hh) = high_bits2(_mm256_set1_epi32(i32::from_le_bytes(qh)));
        (_mm256_or_si256(lo, hl), _mm256_or_si256(hi, hh))
    }

    /// Two Q5 blocks' quants, `a` in the low 128-bit halves and `b` in the high ones
    /// ([`Avx2Block::split2`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn five_bits2(a: (&[u8; 16], [u8; 4]), b: (&[u8; 16], [u8; 4])) -> (__m256i, __m256i) {
        let (lo, hi) = nibbles2(pair16(a.0, b.0));
        let x = _mm256_set_m128i(
            _mm_set1_epi32(i32::from_le_bytes(b.1)),
            _mm_set1_epi32(i32::from_le_bytes(a.1)),
        );
        let (hl, hh) = high_bits2(x);
        (_mm256_or_si256(lo, hl), _mm256_or_si256(hi, hh))
    }

    /// The sixteen bytes of `a` in the low half and of `b` in the high half.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn pair16(a: &[u8; 16], b: &[u8; 16]) -> __m256i {
        _mm256_set_m128i(load_u8x16(b), load_u8x16(a))
    }

    /// The sixteen bytes of `a` in both halves.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn both16(a: &[u8; 16]) -> __m256i {
        _mm256_broadcastsi128_si256(load_u8x16(a))
    }

    fn half(qs: &[i8; 32], h: usize) -> &[i8; 16] {
        qs[16 * h..16 * h + 16].try_into().unwrap()
    }

    impl Avx2Block for BlockQ4_0 {
        const SIGNED: bool = false;
        const OFFSET_SHIFT: Option<i32> = Some(3);
        const LEVELS: u32 = 2;
        #[inline]
        fn head(&self) -> i32 {
            i32::from_le_bytes([self.d[0], self.d[1], self.qs[0], self.qs[1]])
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn split1(&self) -> (__m256i, __m256i) {
            nibbles2(both16(&self.qs))
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn split2(a: &Self, b: &Self) -> (__m256i, __m256i) {
            nibbles2(pair16(&a.qs, &b.qs))
        }
    }

    impl Avx2Block for BlockQ4_1 {
        const SIGNED: bool = false;
        const OFFSET_SHIFT: Option<i32> = None;
        const LEVELS: u32 = 2;
        #[inline]
        fn head(&self) -> i32 {
            i32::from_le_bytes([self.d[0], self.d[1], self.m[0], self.m[1]])
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn split1(&self) -> (__m256i, __m256i) {
            nibbles2(both16(&self.qs))
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn split2(a: &Self, b: &Self) -> (__m256i, __m256i) {
            nibbles2(pair16(&a.qs, &b.qs))
        }
    }

    impl Avx2Block for BlockQ5_0 {
        const SIGNED: bool = false;
        const OFFSET_SHIFT: Option<i32> = Some(4);
        const LEVELS: u32 = 1;
        #[inline]
        fn head(&self) -> i32 {
            i32::from_le_bytes([self.d[0], self.d[1], self.qh[0], self.qh[1]])
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn split1(&self) -> (__m256i, __m256i) {
            five_bits1(&self.qs, self.qh)
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn split2(a: &Self, b: &Self) -> (__m256i, __m256i) {
            five_bits2((&a.qs, a.qh), (&b.qs, b.qh))
        }
    }

    impl Avx2Block for BlockQ5_1 {
        const SIGNED: bool = false;
        const OFFSET_SHIFT: Option<i32> = None;
        const LEVELS: u32 = 1;
        #[inline]
        fn head(&self) -> i32 {
            i32::from_le_bytes([self.d[0], self.d[1], self.m[0], self.m[1]])
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn split1(&self) -> (__m256i, __m256i) {
            five_bits1(&self.qs, self.qh)
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn split2(a: &Self, b: &Self) -> (__m256i, __m256i) {
            five_bits2((&a.qs, a.qh), (&b.qs, b.qh))
        }
    }

    impl Avx2Block for BlockQ8_0 {
        const SIGNED: bool = true;
        const OFFSET_SHIFT: Option<i32> = None;
        const LEVELS: u32 = 0;
        #[inline]
        fn head(&self) -> i32 {
            i32::from_le_bytes([self.d[0], self.d[1], self.qs[0] as u8, self.qs[1] as u8])
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn split1(&self) -> (__m256i, __m256i) {
            let h = |i: usize| _mm256_broadcastsi128_si256(load_i8x16(half(&self.qs, i)));
            (h(0), h(1))
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn split2(a: &Self, b: &Self) -> (__m256i, __m256i) {
            let h =
                |i: usize| _mm256_set_m128i(load_i8x16(half(&b.qs, i)), load_i8x16(half(&a.qs, i)));
            (h(0), h(1))
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        unsafe fn quarters1(&self) -> [__m256i; 8] {
            std::array::from_fn(|k| {
                let q: [i8; 4] = self.qs[4 * k..4 * k + 4].try_into().unwrap();
                _mm256_set1_epi32(i32::from_le_bytes(q.map(|x| x as u8)))
            })
        }
    }

    /// Bytes beyond the end of the current row tile that the tile prefetches.
    pub(crate) const PREFETCH_AHEAD: usize = 1024;

    /// For block `b` of a tile whose rows end at `end` and take `step` bytes a block together:
    /// hints the `step` bytes [`PREFETCH_AHEAD`] beyond that block's, the same number of lines
    /// every block.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(crate) fn prefetch_ahead(end: *const u8, b: usize, step: usize) {
        let p = end.wrapping_add(PREFETCH_AHEAD + b * step);
        for k in 0..step.div_ceil(64) {
            prefetch(p.wrapping_add(k * 64));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn load_q32(q: &Q32) -> __m256i {
        load_i8x32(&q.0)
    }

    /// A row's split weights ready for `maddubs`: the unsigned factors, and for signed blocks
    /// the weights whose signs go onto the activations.
    #[derive(Clone, Copy)]
    struct Split {
        lo: __m256i,
        hi: __m256i,
        slo: __m256i,
        shi: __m256i,
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn ready<B: Avx2Block>((lo, hi): (__m256i, __m256i)) -> Split {
        if B::SIGNED {
            Split { lo: _mm256_sign_epi8(lo, lo), hi: _mm256_sign_epi8(hi, hi), slo: lo, shi: hi }
        } else {
            Split { lo, hi, slo: lo, shi: hi }
        }
    }

    /// One vector of two pairs' products, before the reduction: i16 sums of four products
    /// (unsigned weights), or i32 sums of eight (signed). Exact: no `maddubs` pair can saturate
    /// (|w| <= 128, |a| <= 127, so |pair| <= 32512), and unsigned weights below 32 leave room
    /// for the sum of the two.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn products<B: Avx2Block>(w: &Split, alo: __m256i, ahi: __m256i) -> __m256i {
        if B::SIGNED {
            let ones = _mm256_set1_epi16(1);
            let plo = _mm256_maddubs_epi16(w.lo, _mm256_sign_epi8(alo, w.slo));
            let phi = _mm256_maddubs_epi16(w.hi, _mm256_sign_epi8(ahi, w.shi));
            _mm256_add_epi32(_mm256_madd_epi16(plo, ones), _mm256_madd_epi16(phi, ones))
        } else {
            _mm256_add_epi16(_mm256_maddubs_epi16(w.lo, alo), _mm256_maddubs_epi16(w.hi, ahi))
        }
    }

    /// Eight (row, token) pairs' exact block sums from quarters: `w[k]` the weights' quarter
    /// `k` ([`Avx2Block::quarters1`] or `quarters2`) and `a[k]` the tokens' quants `4k .. 4k + 4`
    /// in the 32-bit lanes matching the weights' (each lane one pair). The products' i16 lanes
    /// add up vertically, sixteen products each for weights below 16 (|sum| <= 16 * 15 * 128),
    /// eight below 32, and signed ones are widened at once; a final `madd` gives each lane's
    /// sum.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn quarters<B: Avx2Block>(w: &[__m256i; 8], a: &[Q32]) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        let a: &[Q32; 8] = a.try_into().unwrap();
        let p = |k: usize| {
            let ak = load_q32(&a[k]);
            if B::SIGNED {
                let u = _mm256_sign_epi8(w[k], w[k]);
                _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(ak, w[k])), ones)
            } else {
                _mm256_maddubs_epi16(w[k], ak)
            }
        };
        if B::SIGNED {
            let s = |x: __m256i, y: __m256i| _mm256_add_epi32(x, y);
            s(s(s(p(0), p(1)), s(p(2), p(3))), s(s(p(4), p(5)), s(p(6), p(7))))
        } else {
            let s = |x: __m256i, y: __m256i| _mm256_add_epi16(x, y);
            let x0 = s(s(p(0), p(1)), s(p(2), p(3)));
            let x1 = s(s(p(4), p(5)), s(p(6), p(7)));
            if B::LEVELS >= 2 {
                _mm256_madd_epi16(s(x0, x1), ones)
            } else {
                _mm256_add_epi32(_mm256_madd_epi16(x0, ones), _mm256_madd_epi16(x1, ones))
            }
        }
    }

    /// The four vectors of `products` to eight exact i32 sums: lane `k` holds the low-half pair
    /// of `v[k]`, lane `4 + k` the high-half pair.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn reduce<B: Avx2Block>(v: [__m256i; 4]) -> __m256i {
        if B::SIGNED {
            // Each half of `v[k]` holds four i32 partial sums of its pair.
            let s01 = _mm256_add_epi32(
                _mm256_unpacklo_epi32(v[0], v[1]),
                _mm256_unpackhi_epi32(v[0], v[1]),
            );
            let s23 = _mm256_add_epi32(
                _mm256_unpacklo_epi32(v[2], v[3]),
                _mm256_unpackhi_epi32(v[2], v[3]),
            );
            return _mm256_add_epi32(
                _mm256_unpacklo_epi64(s01, s23),
                _mm256_unpackhi_epi64(s01, s23),
            );
        }
        let ones = _mm256_set1_epi16(1);
        // Each half of `v[k]` holds eight i16 partial sums (of four products) of its pair; per
        // half `a01` alternates v[0]'s and v[1]'s sums of eight products.
        let a01 =
            _mm256_add_epi16(_mm256_unpacklo_epi16(v[0], v[1]), _mm256_unpackhi_epi16(v[0], v[1]));
        let a23 =
            _mm256_add_epi16(_mm256_unpacklo_epi16(v[2], v[3]), _mm256_unpackhi_epi16(v[2], v[3]));
        if B::LEVELS >= 2 {
            // Sums of sixteen: words [v0, v1, v2, v3, v0, v1, v2, v3] per half; pair each pair's
            // two words and widen.
            let b =
                _mm256_add_epi16(_mm256_unpacklo_epi32(a01, a23), _mm256_unpackhi_epi32(a01, a23));
            let ctl = _mm256_set_epi8(
                15, 14, 7, 6, 13, 12, 5, 4, 11, 10, 3, 2, 9, 8, 1, 0, //
                15, 14, 7, 6, 13, 12, 5, 4, 11, 10, 3, 2, 9, 8, 1, 0,
            );
            _mm256_madd_epi16(_mm256_shuffle_epi8(b, ctl), ones)
        } else {
            // Widen the sums of eight: group each pair's four words, add them in twos, then the
            // two halves' results.
            let ctl = _mm256_set_epi8(
                15, 14, 11, 10, 7, 6, 3, 2, 13, 12, 9, 8, 5, 4, 1, 0, //
                15, 14, 11, 10, 7, 6, 3, 2, 13, 12, 9, 8, 5, 4, 1, 0,
            );
            let c01 = _mm256_castsi256_ps(_mm256_madd_epi16(_mm256_shuffle_epi8(a01, ctl), ones));
            let c23 = _mm256_castsi256_ps(_mm256_madd_epi16(_mm256_shuffle_epi8(a23, ctl), ones));
            _mm256_add_epi32(
                _mm256_castps_si256(_mm256_shuffle_ps::<0b10_00_10_00>(c01, c23)),
                _mm256_castps_si256(_mm256_shuffle_ps::<0b11_01_11_01>(c01, c23)),
            )
        }
    }

    /// The weights' `d` (and `m`) in lane order from the heads of the tile's rows: for a tile of
    /// `K` tokens, `h` holds its `8 / K` rows' heads.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn row_scales<const K: usize>(h: &[i32; 8]) -> (__m256, __m256) {
        // Word `2i` of `x` is row i's `d`, word `2i + 1` its `m`.
        let words = |x: __m128i, ctl: __m128i| _mm256_cvtph_ps(_mm_shuffle_epi8(x, ctl));
        match K {
            8 => {
                let y = _mm256_cvtph_ps(_mm_set1_epi32(h[0]));
                (_mm256_permute_ps::<0b00_00_00_00>(y), _mm256_permute_ps::<0b01_01_01_01>(y))
            }
            4 => {
                // Rows [0, 0, 0, 0 | 1, 1, 1, 1].
                let x = _mm_set_epi32(0, 0, h[1], h[0]);
                let d = _mm_set_epi8(5, 4, 5, 4, 5, 4, 5, 4, 1, 0, 1, 0, 1, 0, 1, 0);
                let m = _mm_set_epi8(7, 6, 7, 6, 7, 6, 7, 6, 3, 2, 3, 2, 3, 2, 3, 2);
                (words(x, d), words(x, m))
            }
            2 => {
                // Rows [0, 1, 2, 3] in each half.
                let x = _mm_set_epi32(h[3], h[2], h[1], h[0]);
                let d = _mm_set_epi8(13, 12, 9, 8, 5, 4, 1, 0, 13, 12, 9, 8, 5, 4, 1, 0);
                let m = _mm_set_epi8(15, 14, 11, 10, 7, 6, 3, 2, 15, 14, 11, 10, 7, 6, 3, 2);
                (words(x, d), words(x, m))
            }
            _ => {
                // Rows [0, 1, 4, 5 | 2, 3, 6, 7].
                let ya = _mm256_cvtph_ps(_mm_set_epi32(h[3], h[2], h[1], h[0]));
                let yb = _mm256_cvtph_ps(_mm_set_epi32(h[7], h[6], h[5], h[4]));
                (
                    _mm256_shuffle_ps::<0b10_00_10_00>(ya, yb),
                    _mm256_shuffle_ps::<0b11_01_11_01>(ya, yb),
                )
            }
        }
    }

    /// A single token's quants (as halves), scales, sums and quant sums.
    type OneToken<'a> = (&'a [[i8; 16]], &'a [f32], &'a [f32], &'a [i32]);

    /// What a tile reads of its tokens: for two or more, their packed quants and lanes; for one,
    /// the activation row itself and its blocks' quant sums.
    #[derive(Clone, Copy)]
    struct TileActs<'a> {
        q: &'a [Q32],
        lanes: &'a [Lanes],
        one: Option<(&'a ActRow<'a>, &'a [i32])>,
    }

    /// One tile over whole rows: `K` tokens by `tile_rows(K)` rows `w`, as the lanes of
    /// [`lane_map`]. Every lane gets exactly the scalar reference's value: the block's exact
    /// integer sum (quarters for four or eight tokens, the split-half products and their
    /// reduction for one or two), then the reference's float steps in block order. With
    /// `prefetch_next`, the rows must be contiguous in memory, and the tile hints the bytes that
    /// follow them into cache while working (from [`PREFETCH_AHEAD`] beyond them, the same
    /// number of lines every block, which predicts better than one hint per line),
    /// since the hardware prefetcher alone leaves a streaming matvec at about half the memory
    /// bandwidth.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn tile<B: Avx2Block, const K: usize>(
        w: &[&[B]; 8],
        nb: usize,
        src: TileActs<'_>,
        prefetch_next: bool,
    ) -> [f32; 8] {
        let rows = tile_rows(K);
        let mut wr: [&[B]; 8] = [&[]; 8];
        for r in 0..rows {
            wr[r] = &w[r][..nb];
        }
        let (q, lanes) = if K == 1 {
            (&[][..], &[][..])
        } else {
            (&src.q[..nb * per_block(K)], &src.lanes[..nb])
        };
        let (aq, ad, asum, aqsum): OneToken<'_> = match src.one {
            Some((a, s)) if K == 1 => {
                (&a.qs.as_chunks::<16>().0[..2 * nb], &a.d[..nb], &a.s[..nb], &s[..nb])
            }
            _ => (&[], &[], &[], &[]),
        };
        let mut acc = _mm256_setzero_ps();
        let step = rows * std::mem::size_of::<B>();
        let tile_end = w[rows - 1].as_ptr_range().end.cast::<u8>();
        for b in 0..nb {
            if prefetch_next {
                prefetch_ahead(tile_end, b, step);
            }
            let mut h = [0i32; 8];
            for r in 0..rows {
                h[r] = wr[r][b].head();
            }
            let raw = match K {
                8 | 4 => {
                    let w = if K == 8 {
                        // SAFETY: this function runs only with AVX2+FMA+F16C enabled.
                        unsafe { wr[0][b].quarters1() }
                    } else {
                        // SAFETY: as above.
                        unsafe { B::quarters2(&wr[0][b], &wr[1][b]) }
                    };
                    quarters::<B>(&w, &q[b * 8..(b + 1) * 8])
                }
                2 => {
                    let qb = &q[b * 2..(b + 1) * 2];
                    let (alo, ahi) = (load_q32(&qb[0]), load_q32(&qb[1]));
                    let mut v = [_mm256_setzero_si256(); 4];
                    for r in 0..4 {
                        // SAFETY: as above.
                        let s = ready::<B>(unsafe { wr[r][b].split1() });
                        v[r] = products::<B>(&s, alo, ahi);
                    }
                    reduce::<B>(v)
                }
                _ => {
                    let (alo, ahi) = (both16_i8(&aq[2 * b]), both16_i8(&aq[2 * b + 1]));
                    // Row pairs (0, 2) and (1, 3), as `row_scales` orders them; lanes 2, 3, 6
                    // and 7 stay zero.
                    let mut v = [_mm256_setzero_si256(); 4];
                    for (k, (ra, rb)) in [(0, 2), (1, 3)].into_iter().enumerate() {
                        // SAFETY: as above.
                        let s = ready::<B>(unsafe { B::split2(&wr[ra][b], &wr[rb][b]) });
                        v[k] = products::<B>(&s, alo, ahi);
                    }
                    reduce::<B>(v)
                }
            };
            let (da, sa, qsum) = if K == 1 {
                (_mm256_set1_ps(ad[b]), _mm256_set1_ps(asum[b]), _mm256_set1_epi32(aqsum[b]))
            } else {
                let l = &lanes[b];
                (load_f32x8(&l.d), load_f32x8(&l.s), load_i32x8(&l.sum))
            };
            let mut sumi = raw;
            if let Some(shift) = B::OFFSET_SHIFT {
                sumi = _mm256_sub_epi32(sumi, _mm256_sll_epi32(qsum, _mm_cvtsi32_si128(shift)));
            }
            let f = _mm256_cvtepi32_ps(sumi);
            let (dw, mw) = row_scales::<K>(&h);
            acc = Form::of(B::TYPE).step(acc, f, dw, da, mw, sa);
        }
        let mut out = [0.0f32; 8];
        store_f32x8(&mut out, acc);
        out
    }

    /// The sixteen quants `a` in both halves.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn both16_i8(a: &[i8; 16]) -> __m256i {
        _mm256_broadcastsi128_si256(load_i8x16(a))
    }

    /// Per-block integer sums through the same decode, products and reduction as the
    /// single-token tiles.
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn block_isums<B: Avx2Block>(w: &[B], a: &ActRow<'_>) -> Vec<i32> {
        let aq = a.qs.as_chunks::<16>().0;
        let mut out = Vec::with_capacity(w.len());
        for (b, blk) in w.iter().enumerate() {
            let (alo, ahi) = (both16_i8(&aq[2 * b]), both16_i8(&aq[2 * b + 1]));
            // SAFETY: this function runs only with AVX2+FMA+F16C enabled.
            let s = ready::<B>(unsafe { B::split2(blk, blk) });
            let v = products::<B>(&s, alo, ahi);
            let mut sumi = reduce::<B>([v; 4]);
            if let Some(shift) = B::OFFSET_SHIFT {
                let qsum = quant_sum(&a.qs[32 * b..32 * b + 32]);
                let off = _mm256_sll_epi32(_mm256_set1_epi32(qsum), _mm_cvtsi32_si128(shift));
                sumi = _mm256_sub_epi32(sumi, off);
            }
            let mut lanes = [0i32; 8];
            store_i32x8(&mut lanes, sumi);
            assert!(lanes.iter().all(|&x| x == lanes[0]), "every lane holds the same pair");
            out.push(lanes[0]);
        }
        out
    }

    /// Rows `rows` against every token of `p` (packed from `acts`): per block of 64 rows, each
    /// token tile in turn over all of the block's rows, in row tiles of `tile_rows(width)` (the
    /// last one's missing rows repeating its last row, their outputs dropped).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn drive<B: Avx2Block, E: FnMut(usize, usize, f32) + ?Sized>(
        w: &[u8],
        row_bytes: usize,
        acts: &[ActRow<'_>],
        p: &PackedActs,
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
                let src = if t.width == 1 {
                    TileActs {
                        q: &[],
                        lanes: &[],
                        one: Some((&acts[t.t0], &p.sums[t.l_at..t.l_at + nb])),
                    }
                } else {
                    TileActs {
                        q: &p.q[t.q_at..t.q_at + nb * per_block(t.width)],
                        lanes: &p.lanes[t.l_at..t.l_at + nb],
                        one: None,
                    }
                };
                let per = tile_rows(t.width);
                let (lr, lt) = lane_map(t.width);
                let mut r = r0;
                while r < r1 {
                    let mut wr: [&[B]; 8] = [&[]; 8];
                    for (k, x) in wr.iter_mut().take(per).enumerate() {
                        *x = row((r + k).min(r1 - 1))?;
                    }
                    let o = match t.width {
                        8 => tile::<B, 8>(&wr, nb, src, first),
                        4 => tile::<B, 4>(&wr, nb, src, first),
                        2 => tile::<B, 2>(&wr, nb, src, first),
                        _ => tile::<B, 1>(&wr, nb, src, first),
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
    pub(crate) fn q_rows_packed<E: FnMut(usize, usize, f32) + ?Sized>(
        ty: GgmlType,
        w: &[u8],
        row_bytes: usize,
        acts: &[ActRow<'_>],
        p: &PackedActs,
        rows: Range<usize>,
        emit: &mut E,
    ) -> Result<(), KernelError> {
        match ty {
            GgmlType::Q4_0 => drive::<BlockQ4_0, E>(w, row_bytes, acts, p, rows, emit),
            GgmlType::Q4_1 => drive::<BlockQ4_1, E>(w, row_bytes, acts, p, rows, emit),
            GgmlType::Q5_0 => drive::<BlockQ5_0, E>(w, row_bytes, acts, p, rows, emit),
            GgmlType::Q5_1 => drive::<BlockQ5_1, E>(w, row_bytes, acts, p, rows, emit),
            GgmlType::Q8_0 => drive::<BlockQ8_0, E>(w, row_bytes, acts, p, rows, emit),
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
