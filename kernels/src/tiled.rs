//! Weight matrices laid out again eight rows wide, for the AVX2 products of Q4_0, Q4_1, Q5_0,
//! Q5_1 and Q8_0 weights.
//!
//! GGUF stores a matrix row by row. The AVX2 tiles of [`crate::dot`] read it that way and spend
//! about as many instructions spreading each block's weights over the vector lanes (shuffles,
//! then a reduction across lanes) as multiplying them. A [`TiledWeights`] holds the same bytes
//! regrouped once, when a model's matrix is first multiplied on the CPU: for each group of eight
//! rows and each block of 32 columns, the eight rows' scales side by side, then their quants
//! interleaved four bytes at a time, so that one 32-byte load holds quarter `k` of a block (its
//! elements `4k .. 4k + 4`) for all eight rows, one row per 32-bit lane. A token's quarter `k`
//! broadcast to every lane multiplies eight rows at once (`maddubs`), and the eight quarters'
//! products added lane by lane are the eight rows' exact block sums: no shuffle, no horizontal
//! step, and a block's weights are decoded once for every token of the batch.
//!
//! Each lane then takes the scalar reference's float steps in block order, so a product equals
//! [`crate::dot::scalar`] bit for bit, as the row-layout tiles do: the layout changes speed,
//! never results. The bytes are the file's, moved: a tiled matrix is exactly as large as the
//! file's.

use crate::act::{quant_sum, ActRow};
use crate::cpu::Isa;
use crate::error::check_len;
use crate::formats::QK;
use crate::matmul::WeightView;
use crate::{GgmlType, KernelError};

/// Rows per group: one per 32-bit lane of an AVX2 vector.
pub const GROUP: usize = 8;

/// Where a type's fields sit, in a GGUF block of one row and in a tiled block of eight.
#[derive(Clone, Copy)]
struct Layout {
    /// GGUF block: `m` (f16) at, the fifth bits `qh` (u32) at, the quants at and their bytes.
    m: Option<usize>,
    qh: Option<usize>,
    qs: usize,
    qs_len: usize,
    /// Tiled block: `m[8]` at, the fifth bits (8 x u32, see [`fifth_bits`]) at, the quant
    /// chunks at; and its bytes. `d[8]` is always first.
    t_m: usize,
    t_qh: usize,
    t_qs: usize,
    bytes: usize,
}

const fn layout(ty: GgmlType) -> Option<Layout> {
    let (m, qh, qs, qs_len) = match ty {
        GgmlType::Q4_0 => (None, None, 2, 16),
        GgmlType::Q4_1 => (Some(2), None, 4, 16),
        GgmlType::Q5_0 => (None, Some(2), 6, 16),
        GgmlType::Q5_1 => (Some(2), Some(4), 8, 16),
        GgmlType::Q8_0 => (None, None, 2, 32),
        _ => return None,
    };
    let t_m = 16;
    let t_qh = if m.is_some() { 32 } else { 16 };
    let t_qs = if qh.is_some() { t_qh + 32 } else { t_qh };
    Some(Layout { m, qh, qs, qs_len, t_m, t_qh, t_qs, bytes: t_qs + 8 * qs_len })
}

/// A Q5 row's fifth bits `qh` (bit `e` for element `e`) rearranged so that byte `j` holds, in
/// its low nibble, the bits of quarter `j` (elements `4j .. 4j + 4`) and in its high nibble
/// those of quarter `j + 4` (elements `16 + 4j ..`): the two quarters a chunk's nibbles give.
const fn fifth_bits(qh: u32) -> u32 {
    let mut out = 0;
    let mut j = 0;
    while j < 4 {
        let lo = (qh >> (4 * j)) & 0xf;
        let hi = (qh >> (16 + 4 * j)) & 0xf;
        out |= (lo | hi << 4) << (8 * j);
        j += 1;
    }
    out
}

/// The inverse of [`fifth_bits`].
const fn unfifth_bits(t: u32) -> u32 {
    let mut qh = 0;
    let mut j = 0;
    while j < 4 {
        let byte = (t >> (8 * j)) & 0xff;
        qh |= (byte & 0xf) << (4 * j) | (byte >> 4) << (16 + 4 * j);
        j += 1;
    }
    qh
}

/// Whether products of tiled `ty` read the tokens' per-block quant sums (to take off the
/// offset of Q4_0's and Q5_0's unsigned quants).
pub(crate) const fn reads_quant_sums(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q5_0)
}

/// Tokens a group's blocks are worked through with at once (one accumulator each).
pub(crate) const TOKENS: usize = 4;

/// One block (32 columns) of up to [`TOKENS`] tokens' Q8_0-format activations side by side:
/// what a tiled product reads per block, at fixed offsets from one pointer. (Read from the
/// activation rows instead, each token's quants, `d` and `s` are three slices whose pointers
/// and bounds a block step loads and checks again: about a fifth of the loop's instructions.)
#[repr(C, align(32))]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct TokenBlocks {
    qs: [[i8; 32]; TOKENS],
    d: [f32; TOKENS],
    s: [f32; TOKENS],
    /// The sum of the 32 quants (filled for the types that [`reads_quant_sums`], else 0).
    sum: [i32; TOKENS],
}

/// A batch of activations laid out for the tiled products: token tile `i` (tokens `4i ..
/// 4i + 4`, the last one padded with zeros) has its `nb` blocks at `i * nb ..`.
#[derive(Debug, Default)]
pub(crate) struct TiledActs {
    n_tokens: usize,
    nb: usize,
    blocks: Vec<TokenBlocks>,
}

impl TiledActs {
    /// Room for `n_tokens` tokens of `nb` blocks, in this buffer's memory, holding whatever it
    /// held: the fillers write every lane of every block, the padding of a last, partial tile
    /// as zeros (see [`TiledActs::clear_padding`]). Zeroing it all first took two thirds as
    /// long as a decode step's quantizing itself.
    fn reset(&mut self, n_tokens: usize, nb: usize) {
        self.n_tokens = n_tokens;
        self.nb = nb;
        self.blocks.resize(n_tokens.div_ceil(TOKENS) * nb, TokenBlocks::default());
        self.clear_padding();
    }

    /// Zeros the lanes of a last, partial tile that no token fills.
    fn clear_padding(&mut self) {
        let filled = self.n_tokens % TOKENS;
        if filled == 0 {
            return;
        }
        let last = self.blocks.len() - self.nb;
        for o in &mut self.blocks[last..] {
            for i in filled..TOKENS {
                (o.qs[i], o.d[i], o.s[i], o.sum[i]) = ([0; 32], 0.0, 0.0, 0);
            }
        }
    }

    /// Lays out `acts` (Q8_0 format, all of one length), reusing this buffer's memory; the
    /// quant sums only when `sums`.
    pub(crate) fn pack(&mut self, acts: &[ActRow<'_>], sums: bool) -> Result<(), KernelError> {
        let nb = acts.first().map_or(0, |a| a.d.len());
        for a in acts {
            check_len("activation quants", nb * QK, a.qs.len())?;
            check_len("activation scales", nb, a.d.len())?;
            check_len("activation sums", nb, a.s.len())?;
        }
        self.reset(acts.len(), nb);
        for (tile, out) in acts.chunks(TOKENS).zip(self.blocks.chunks_exact_mut(nb.max(1))) {
            for (i, a) in tile.iter().enumerate() {
                let qs = a.qs.as_chunks::<QK>().0;
                for (b, o) in out.iter_mut().enumerate() {
                    o.qs[i] = qs[b];
                    o.d[i] = a.d[b];
                    o.s[i] = a.s[b];
                    o.sum[i] = if sums { quant_sum(&qs[b]) } else { 0 };
                }
            }
        }
        Ok(())
    }

    /// Quantizes `xs` (rows of one length, in whole blocks) straight into this layout: what
    /// [`crate::act::QuantizedActs`] would make of them and [`TiledActs::pack`] then lay out,
    /// without the rows in between; the quant sums only when `sums`. Tiled products run only
    /// under AVX2, and so does this.
    pub(crate) fn quantize(
        &mut self,
        isa: Isa,
        xs: &[&[f32]],
        sums: bool,
    ) -> Result<(), KernelError> {
        if !isa.avx2() {
            return Err(KernelError::Unsupported {
                ty: GgmlType::Q8_0,
                op: "tiled activations without AVX2",
            });
        }
        let cols = xs.first().map_or(0, |x| x.len());
        if !cols.is_multiple_of(QK) {
            return Err(KernelError::NotBlockMultiple { ty: GgmlType::Q8_0, n: cols });
        }
        for x in xs {
            check_len("activations", cols, x.len())?;
        }
        self.reset(xs.len(), cols / QK);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Isa` reporting AVX2 comes from detection, so the CPU has AVX2+FMA+F16C.
        unsafe {
            avx2::quantize_into(self, xs, sums)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = sums;
        Ok(())
    }
}

/// A weight matrix of `rows` (a multiple of [`GROUP`]) by `cols`, eight rows wide (see the
/// module's text). Group `g`'s block `b` is at `(g * nb + b) * bytes`: `d[8]` as little-endian
/// f16, for Q4_1 and Q5_1 `m[8]`, for Q5_0 and Q5_1 the rows' fifth bits (one u32 each,
/// rearranged by quarter), then 32-byte chunks whose lane `l` (bytes `4l .. 4l + 4`) is row
/// `8g + l`'s quant bytes `4j .. 4j + 4` in chunk `j` (four chunks of nibble pairs for Q4 and
/// Q5, eight chunks of signed quants for Q8_0).
#[derive(Clone)]
pub struct TiledWeights {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for TiledWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.view().fmt(f)
    }
}

impl TiledWeights {
    /// Whether matrices of `ty` with `rows` rows are tiled on this CPU: only the AVX2 kernels
    /// read tiles ([`Isa::current`], which `UNICORN_CPU` can lower).
    pub fn supports(ty: GgmlType, rows: usize) -> bool {
        Isa::current().avx2() && layout(ty).is_some() && rows.is_multiple_of(GROUP)
    }

    /// `w` tiled, or `None` when [`TiledWeights::supports`] says no.
    pub fn new(w: &WeightView<'_>) -> Option<TiledWeights> {
        let ty = w.ty();
        if !Self::supports(ty, w.rows()) || w.is_tiled_only() {
            return None;
        }
        let lay = layout(ty)?;
        let (bs, gb, nb) = (ty.type_size(), lay.bytes, w.cols() / QK);
        let mut data = vec![0u8; w.rows() / GROUP * nb * gb];
        // (A matrix without columns has no blocks to move.)
        for (g, out) in data.chunks_exact_mut((nb * gb).max(1)).enumerate() {
            for l in 0..GROUP {
                let row = w.row(g * GROUP + l);
                for (src, dst) in row.chunks_exact(bs).zip(out.chunks_exact_mut(gb)) {
                    dst[2 * l..2 * l + 2].copy_from_slice(&src[..2]);
                    if let Some(m) = lay.m {
                        dst[lay.t_m + 2 * l..][..2].copy_from_slice(&src[m..m + 2]);
                    }
                    if let Some(qh) = lay.qh {
                        let bits = u32::from_le_bytes(src[qh..qh + 4].try_into().unwrap());
                        dst[lay.t_qh + 4 * l..][..4]
                            .copy_from_slice(&fifth_bits(bits).to_le_bytes());
                    }
                    for (j, quad) in src[lay.qs..lay.qs + lay.qs_len].chunks_exact(4).enumerate() {
                        dst[lay.t_qs + 32 * j + 4 * l..][..4].copy_from_slice(quad);
                    }
                }
            }
        }
        Some(TiledWeights { ty, rows: w.rows(), cols: w.cols(), data })
    }

    /// The tiled bytes (to store them, e.g. in a model's copy: [`TiledView::new`] reads them).
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    /// A view of these tiles for [`WeightView::with_tiles`].
    pub fn view(&self) -> TiledView<'_> {
        TiledView { ty: self.ty, rows: self.rows, cols: self.cols, data: &self.data }
    }
}

/// Tiled weights borrowed from wherever they are held: a [`TiledWeights`], or a model copy
/// stored in the tiled layout.
#[derive(Clone, Copy)]
pub struct TiledView<'a> {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: &'a [u8],
}

impl std::fmt::Debug for TiledView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TiledView")
            .field("ty", &self.ty)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

impl<'a> TiledView<'a> {
    /// `data` as a `rows x cols` matrix of `ty` in the tiled layout. Errors when this CPU does
    /// not tile such a matrix ([`TiledWeights::supports`]) or the length is not the matrix's.
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, KernelError> {
        let lay = layout(ty).filter(|_| TiledWeights::supports(ty, rows));
        let Some(lay) = lay else {
            return Err(KernelError::Unsupported { ty, op: "tiles of this type or row count" });
        };
        if !cols.is_multiple_of(QK) {
            return Err(KernelError::NotBlockMultiple { ty, n: cols });
        }
        let want = (rows / GROUP)
            .checked_mul(cols / QK)
            .and_then(|n| n.checked_mul(lay.bytes))
            .ok_or(KernelError::NotBlockMultiple { ty, n: cols })?;
        check_len("tiled weights", want, data.len())?;
        Ok(TiledView { ty, rows, cols, data })
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` in GGUF layout again (the inverse of the tiling).
    ///
    /// # Panics
    ///
    /// When `r >= rows`.
    pub fn gguf_row(&self, r: usize) -> Vec<u8> {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        let Some(lay) = layout(self.ty) else { return Vec::new() };
        let (bs, gb, nb) = (self.ty.type_size(), lay.bytes, self.cols / QK);
        let (g, l) = (r / GROUP, r % GROUP);
        let mut row = vec![0u8; nb * bs];
        for (b, dst) in row.chunks_exact_mut(bs).enumerate() {
            let src = &self.data[(g * nb + b) * gb..][..gb];
            dst[..2].copy_from_slice(&src[2 * l..2 * l + 2]);
            if let Some(m) = lay.m {
                dst[m..m + 2].copy_from_slice(&src[lay.t_m + 2 * l..][..2]);
            }
            if let Some(qh) = lay.qh {
                let t = u32::from_le_bytes(src[lay.t_qh + 4 * l..][..4].try_into().unwrap());
                dst[qh..qh + 4].copy_from_slice(&unfifth_bits(t).to_le_bytes());
            }
            for (j, quad) in dst[lay.qs..lay.qs + lay.qs_len].chunks_exact_mut(4).enumerate() {
                quad.copy_from_slice(&src[lay.t_qs + 32 * j + 4 * l..][..4]);
            }
        }
        row
    }

    /// The whole matrix in GGUF layout again (for uploading it elsewhere).
    pub fn gguf_bytes(&self) -> Vec<u8> {
        (0..self.rows).flat_map(|r| self.gguf_row(r)).collect()
    }

    /// Checks that this is `w` tiled: same type and shape.
    pub(crate) fn check_matches(&self, w: &WeightView<'_>) -> Result<(), KernelError> {
        if self.ty != w.ty() {
            return Err(KernelError::Unsupported { ty: w.ty(), op: "tiles of another type" });
        }
        check_len("tiled rows", w.rows(), self.rows)?;
        check_len("tiled columns", w.cols(), self.cols)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::*;
    use crate::act::avx2::quantize_block;
    use crate::dot::avx2::{prefetch_ahead, Form};
    use crate::simd::{load_u8x16, load_u8x32, store_f32x8};

    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q5_0: u8 = 2;
    const Q5_1: u8 = 3;
    const Q8_0: u8 = 4;

    /// The kind's GGUF type (the layout's key).
    const fn ty(kind: u8) -> GgmlType {
        match kind {
            Q4_0 => GgmlType::Q4_0,
            Q4_1 => GgmlType::Q4_1,
            Q5_0 => GgmlType::Q5_0,
            Q5_1 => GgmlType::Q5_1,
            _ => GgmlType::Q8_0,
        }
    }

    /// The kind's layout, at compile time (every kind has one).
    const fn lay(kind: u8) -> Layout {
        match layout(ty(kind)) {
            Some(l) => l,
            None => panic!("every kind has a layout"),
        }
    }

    /// Whether the kind's blocks carry a minimum `m` (its float steps add `m * s`).
    const fn has_min(kind: u8) -> bool {
        matches!(kind, Q4_1 | Q5_1)
    }

    /// `log2` of the offset taken off the unsigned quants (8 for Q4_0, 16 for Q5_0), if any.
    const fn offset_shift(kind: u8) -> Option<i32> {
        match kind {
            Q4_0 => Some(3),
            Q5_0 => Some(4),
            _ => None,
        }
    }

    // The kinds with an offset are those whose products get the quant sums packed.
    const _: () = {
        let mut kind = 0;
        while kind <= Q8_0 {
            assert!(offset_shift(kind).is_some() == reads_quant_sums(ty(kind)));
            kind += 1;
        }
    };

    /// Quarter `k` of a token's block `qa` in every 32-bit lane.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn quarter(qa: &[i8; 32], k: usize) -> __m256i {
        let q: &[i8; 4] = qa[4 * k..4 * k + 4].try_into().unwrap();
        // SAFETY: `q` is 4 readable bytes; the load has no alignment requirement. (Loaded as
        // a vector, the broadcast reads memory directly instead of going through a register.)
        _mm256_broadcastd_epi32(unsafe { _mm_loadu_si32(q.as_ptr().cast()) })
    }

    /// A Q5 block group ready for `maddubs`: the unsigned quants of quarters 0-7 (nibble and
    /// fifth bit), the scales and the minimums.
    struct Q5Block {
        u: [__m256i; 8],
        d: __m256,
        m: __m256,
    }

    /// A block group's eight scales `d` and, for the kinds that have them, minimums `m` (else
    /// zeros).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn scales<const KIND: u8>(blk: &[u8]) -> (__m256, __m256) {
        let lay = const { lay(KIND) };
        let d = _mm256_cvtph_ps(load_u8x16(blk[..16].try_into().unwrap()));
        let m = if has_min(KIND) {
            _mm256_cvtph_ps(load_u8x16(blk[lay.t_m..lay.t_m + 16].try_into().unwrap()))
        } else {
            _mm256_setzero_ps()
        };
        (d, m)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn decode_q5<const KIND: u8>(blk: &[u8]) -> Q5Block {
        debug_assert!(matches!(KIND, Q5_0 | Q5_1));
        let lay = const { lay(KIND) };
        let (d, m) = scales::<KIND>(blk);
        let mask = _mm256_set1_epi8(0x0f);
        let mut u = [_mm256_setzero_si256(); 8];
        for j in 0..4 {
            let c = load_u8x32(blk[lay.t_qs + 32 * j..][..32].try_into().unwrap());
            // Low nibbles are elements 4j .. 4j + 4 (quarter j), high ones 16 + 4j .. (j + 4).
            u[j] = _mm256_and_si256(c, mask);
            u[j + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(c), mask);
        }
        // The fifth bits: byte j of each lane holds quarter j's in its low nibble and
        // quarter j + 4's in its high one; spread to the lane's four bytes, each byte tests
        // its own bit and becomes 0x10 or 0.
        let bits = load_u8x32(blk[lay.t_qh..lay.t_qh + 32].try_into().unwrap());
        let lo = _mm256_set1_epi32(0x0804_0201);
        let hi = _mm256_set1_epi32(0x8040_2010u32 as i32);
        let x10 = _mm256_set1_epi8(0x10);
        let spread = _mm256_setr_epi8(
            0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12, 0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8,
            12, 12, 12, 12,
        );
        for j in 0..4 {
            let b = _mm256_shuffle_epi8(bits, _mm256_add_epi8(spread, _mm256_set1_epi8(j as i8)));
            let set =
                |m: __m256i| _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(b, m), m), x10);
            u[j] = _mm256_or_si256(u[j], set(lo));
            u[j + 4] = _mm256_or_si256(u[j + 4], set(hi));
        }
        Q5Block { u, d, m }
    }

    /// The eight rows' exact integer block sums of a Q5 block group with one token's block
    /// quants `qa` (Q5_0's before the offset). Q5 quants times activation quants stay within
    /// i16 summed over 16 (16 * 31 * 128 would not fit, 8 * 31 * 128 does).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn q5_sums(blk: &Q5Block, qa: &[i8; 32]) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        let p = |k: usize| _mm256_maddubs_epi16(blk.u[k], quarter(qa, k));
        let a = _mm256_add_epi16(_mm256_add_epi16(p(0), p(1)), _mm256_add_epi16(p(2), p(3)));
        let b = _mm256_add_epi16(_mm256_add_epi16(p(4), p(5)), _mm256_add_epi16(p(6), p(7)));
        // Quants below 32: four pairs' sums per lane half fit i16, eight would not.
        _mm256_add_epi32(_mm256_madd_epi16(a, ones), _mm256_madd_epi16(b, ones))
    }

    /// The eight rows' exact integer block sums for every token of a tile, for the 4-bit kinds
    /// (Q4_0's before the offset), straight from the block's bytes. Nibbles times quants stay
    /// within i16 summed over all 32 (|sum| <= 16 * 15 * 128 per 16-bit half lane). One
    /// 32-byte chunk (quarters `j` and `j + 4`) is unpacked and multiplied into every token's
    /// sums before the next: two unpacked quarters live instead of eight, so the tokens'
    /// accumulators stay in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn nibble_sums<const KIND: u8, const T: usize>(
        blk: &[u8],
        a: &TokenBlocks,
    ) -> ([__m256i; T], __m256, __m256) {
        debug_assert!(matches!(KIND, Q4_0 | Q4_1));
        let lay = const { lay(KIND) };
        let mask = _mm256_set1_epi8(0x0f);
        let mut p = [_mm256_setzero_si256(); T];
        for j in 0..4 {
            let c = load_u8x32(blk[lay.t_qs + 32 * j..][..32].try_into().unwrap());
            let lo = _mm256_and_si256(c, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(c), mask);
            for (p, qa) in p.iter_mut().zip(&a.qs) {
                let x = _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo, quarter(qa, j)),
                    _mm256_maddubs_epi16(hi, quarter(qa, j + 4)),
                );
                *p = _mm256_add_epi16(*p, x);
            }
        }
        let ones = _mm256_set1_epi16(1);
        let (d, m) = scales::<KIND>(blk);
        (p.map(|p| _mm256_madd_epi16(p, ones)), d, m)
    }

    /// The eight rows' exact integer block sums of a Q8_0 block group for every token of a
    /// tile, half a block (four quarters) at a time: eight live vectors of weights rather than
    /// sixteen (5% faster at four tokens). `maddubs` takes |w| as unsigned bytes (|-128| reads
    /// as 128) and w's signs go onto the activations; its products are widened per quarter, as
    /// a pair of them can reach 2 * 128 * 127.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn q8_sums<const T: usize>(blk: &[u8], a: &TokenBlocks) -> ([__m256i; T], __m256, __m256) {
        let lay = const { lay(Q8_0) };
        let ones = _mm256_set1_epi16(1);
        let mut p = [_mm256_setzero_si256(); T];
        for half in 0..2 {
            let w: [__m256i; 4] = std::array::from_fn(|j| {
                load_u8x32(blk[lay.t_qs + 32 * (4 * half + j)..][..32].try_into().unwrap())
            });
            let u = w.map(|x| _mm256_sign_epi8(x, x));
            for (p, qa) in p.iter_mut().zip(&a.qs) {
                let q = |j: usize| {
                    let s = _mm256_sign_epi8(quarter(qa, 4 * half + j), w[j]);
                    _mm256_madd_epi16(_mm256_maddubs_epi16(u[j], s), ones)
                };
                let x =
                    _mm256_add_epi32(_mm256_add_epi32(q(0), q(1)), _mm256_add_epi32(q(2), q(3)));
                *p = _mm256_add_epi32(*p, x);
            }
        }
        let (d, m) = scales::<Q8_0>(blk);
        (p, d, m)
    }

    /// One group of eight rows (its blocks in `blocks`) against the first `T` tokens of a tile
    /// (its blocks in `acts`): per token the eight rows' dot products, each lane the scalar
    /// reference's float steps in block order.
    ///
    /// A block's float steps (convert, scale, add) wait on its integer sums at the end of a
    /// long chain of dependent instructions; issued right behind them, the four tokens' chains
    /// hold the core's scheduler and the next block's loads and multiplies wait. So the loop is
    /// skewed by one block: each iteration multiplies block `b` and takes the float steps of
    /// block `b - 1`, whose sums are long done (8-13% faster at four tokens on a Zen 3). The
    /// lanes' float steps stay in block order.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn group<const KIND: u8, const GB: usize, const T: usize>(
        blocks: &[u8],
        acts: &[TokenBlocks],
        prefetch: bool,
    ) -> [[f32; 8]; T] {
        let end = blocks.as_ptr_range().end;
        let mut acc = [_mm256_setzero_ps(); T];
        // A block's float steps: its sums, the weights' scales and minimums, its tokens.
        type Behind<'b, const T: usize> = ([__m256i; T], __m256, __m256, &'b TokenBlocks);
        let float_steps = |acc: &mut [__m256; T], (sums, d, m, a): Behind<'_, T>| {
            for (t, acc) in acc.iter_mut().enumerate() {
                let mut sumi = sums[t];
                if let Some(shift) = offset_shift(KIND) {
                    sumi = _mm256_sub_epi32(sumi, _mm256_set1_epi32(a.sum[t] << shift));
                }
                let f = _mm256_cvtepi32_ps(sumi);
                let da = _mm256_set1_ps(a.d[t]);
                let s = if has_min(KIND) { _mm256_set1_ps(a.s[t]) } else { _mm256_setzero_ps() };
                *acc = Form::of(ty(KIND)).step(*acc, f, d, da, m, s);
            }
        };
        let mut behind = None;
        for (b, (blk, a)) in blocks.as_chunks::<GB>().0.iter().zip(acts).enumerate() {
            if prefetch {
                prefetch_ahead(end, b, GB);
            }
            let (sums, d, m) = match KIND {
                Q4_0 | Q4_1 => nibble_sums::<KIND, T>(blk, a),
                Q8_0 => q8_sums::<T>(blk, a),
                _ => {
                    let blk = decode_q5::<KIND>(blk);
                    (std::array::from_fn(|t| q5_sums(&blk, &a.qs[t])), blk.d, blk.m)
                }
            };
            if let Some(prev) = behind.replace((sums, d, m, a)) {
                float_steps(&mut acc, prev);
            }
        }
        if let Some(last) = behind {
            float_steps(&mut acc, last);
        }
        let mut out = [[0.0f32; 8]; T];
        for (o, a) in out.iter_mut().zip(acc) {
            store_f32x8(o, a);
        }
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn drive<const KIND: u8, const GB: usize, E: FnMut(usize, usize, &[f32; GROUP]) + ?Sized>(
        tw: TiledView<'_>,
        acts: &TiledActs,
        rows: Range<usize>,
        emit: &mut E,
    ) -> Result<(), KernelError> {
        const { assert!(GB == lay(KIND).bytes) };
        let (nb, gb) = (tw.cols / QK, GB);
        if !rows.start.is_multiple_of(GROUP)
            || !rows.end.is_multiple_of(GROUP)
            || rows.end > tw.rows
        {
            return Err(KernelError::Unsupported {
                ty: tw.ty,
                op: "tiled rows not in whole groups of eight",
            });
        }
        if acts.n_tokens > 0 {
            check_len("activation blocks", nb, acts.nb)?;
        }
        for g in rows.start / GROUP..rows.end / GROUP {
            let blocks = &tw.data[g * nb * gb..(g + 1) * nb * gb];
            for i in 0..acts.n_tokens.div_ceil(TOKENS) {
                // (`pack` made the blocks `nb` per tile; none when the matrix has no columns.)
                let tile = acts.blocks.get(i * nb..(i + 1) * nb).unwrap_or_default();
                let (t0, first) = (i * TOKENS, i == 0);
                let n = (acts.n_tokens - t0).min(TOKENS);
                let mut out = [[0.0f32; 8]; TOKENS];
                match n {
                    4 => out = group::<KIND, GB, 4>(blocks, tile, first),
                    3 => out[..3].copy_from_slice(&group::<KIND, GB, 3>(blocks, tile, first)),
                    2 => out[..2].copy_from_slice(&group::<KIND, GB, 2>(blocks, tile, first)),
                    _ => out[..1].copy_from_slice(&group::<KIND, GB, 1>(blocks, tile, first)),
                }
                for (t, o) in out[..n].iter().enumerate() {
                    emit(g * GROUP, t0 + t, o);
                }
            }
        }
        Ok(())
    }

    /// The blocks of [`TiledActs::quantize`], sized and checked there.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn quantize_into(acts: &mut TiledActs, xs: &[&[f32]], sums: bool) {
        let nb = acts.nb;
        for (tile, out) in xs.chunks(TOKENS).zip(acts.blocks.chunks_exact_mut(nb.max(1))) {
            for (i, x) in tile.iter().enumerate() {
                for (o, xb) in out.iter_mut().zip(x.as_chunks::<QK>().0) {
                    let (d, s, sum) = quantize_block(xb, &mut o.qs[i]);
                    (o.d[i], o.s[i], o.sum[i]) = (d, s, if sums { sum } else { 0 });
                }
            }
        }
    }

    /// Rows `rows` (whole groups) of `tw` against every token of `acts`: `emit(r, t, v)` takes
    /// token `t`'s values of rows `r .. r + 8` (a group's, stored at once, not one by one).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn tiled_rows<E: FnMut(usize, usize, &[f32; GROUP]) + ?Sized>(
        tw: TiledView<'_>,
        acts: &TiledActs,
        rows: Range<usize>,
        emit: &mut E,
    ) -> Result<(), KernelError> {
        match tw.ty {
            // The block groups' size as a constant: their loop walks plain arrays, with
            // constant strides and prefetches.
            GgmlType::Q4_0 => drive::<Q4_0, { lay(Q4_0).bytes }, E>(tw, acts, rows, emit),
            GgmlType::Q4_1 => drive::<Q4_1, { lay(Q4_1).bytes }, E>(tw, acts, rows, emit),
            GgmlType::Q5_0 => drive::<Q5_0, { lay(Q5_0).bytes }, E>(tw, acts, rows, emit),
            GgmlType::Q5_1 => drive::<Q5_1, { lay(Q5_1).bytes }, E>(tw, acts, rows, emit),
            GgmlType::Q8_0 => drive::<Q8_0, { lay(Q8_0).bytes }, E>(tw, acts, rows, emit),
            ty => Err(KernelError::Unsupported { ty, op: "tiled product" }),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::act::{ActFormat, QuantizedActs};
    use crate::dot::vec_dot_q;
    use crate::formats::quantize_row;
    use crate::matmul::{matmul_on, matmul_quantized_on};
    use crate::ThreadPool;

    const TYPES: [GgmlType; 5] =
        [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0];

    fn matrix(ty: GgmlType, rows: usize, cols: usize, vals: &[f32]) -> Vec<u8> {
        let rb = ty.row_bytes(cols as u64).unwrap() as usize;
        let mut data = vec![0u8; rows * rb];
        for (r, dst) in data.chunks_mut(rb).enumerate() {
            let src: Vec<f32> = (0..cols).map(|c| vals[(r * cols + c) % vals.len()]).collect();
            quantize_row(ty, &src, dst).unwrap();
        }
        data
    }

    /// The tiled product of `data` with `x` (`n` tokens) against the scalar reference, bit for
    /// bit, and the GGUF-layout AVX2 product.
    fn check(ty: GgmlType, rows: usize, cols: usize, data: &[u8], x: &[f32], n: usize) {
        let pool = ThreadPool::new(2);
        let w = WeightView::new(ty, rows, cols, data).unwrap();
        let Some(tiles) = TiledWeights::new(&w) else {
            assert!(!Isa::current().avx2(), "{ty} {rows}x{cols} not tiled on an AVX2 machine");
            return;
        };
        let tiled = w.with_tiles(tiles.view()).unwrap();
        let mut acts = QuantizedActs::new();
        acts.quantize_as(ActFormat::Q8_0, &pool, x, n, cols).unwrap();
        let mut got = vec![f32::NAN; n * rows];
        matmul_on(Isa::current(), &pool, &tiled, x, n, &mut got).unwrap();
        let mut rows_layout = vec![f32::NAN; n * rows];
        matmul_on(Isa::current(), &pool, &w, x, n, &mut rows_layout).unwrap();
        // From quantized rows, laid out for the tiles (a prefill's way; a few tokens from
        // floats go straight into the tiles' layout).
        let mut packed = vec![f32::NAN; n * rows];
        matmul_quantized_on(Isa::current(), &pool, &tiled, &acts, &mut packed).unwrap();
        // The tiles alone, as a model stored tiled holds them.
        let only =
            WeightView::tiled_only(TiledView::new(ty, rows, cols, tiles.as_bytes()).unwrap());
        let mut alone = vec![f32::NAN; n * rows];
        matmul_on(Isa::current(), &pool, &only, x, n, &mut alone).unwrap();
        assert!(matmul_on(Isa::scalar(), &pool, &only, x, n, &mut alone.clone()).is_err());
        let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
        for r in [0, rows - 1] {
            w.dequantize_row(r, &mut a).unwrap();
            only.dequantize_row(r, &mut b).unwrap();
            assert_eq!(a, b, "{ty} row {r} read back from the tiles");
        }
        for t in 0..n {
            for r in 0..rows {
                let want = vec_dot_q(Isa::scalar(), ty, w.row(r), acts.row(t)).unwrap();
                let g = got[t * rows + r];
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "{ty} {rows}x{cols} n={n} row {r} token {t}"
                );
                assert_eq!(g.to_bits(), rows_layout[t * rows + r].to_bits());
                assert_eq!(g.to_bits(), packed[t * rows + r].to_bits());
                assert_eq!(g.to_bits(), alone[t * rows + r].to_bits());
            }
        }
    }

    #[test]
    fn tiling_moves_every_byte_and_back() {
        let vals: Vec<f32> = (0..997).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        for ty in TYPES {
            let (rows, cols) = (24, 96);
            let data = matrix(ty, rows, cols, &vals);
            let w = WeightView::new(ty, rows, cols, &data).unwrap();
            let Some(t) = TiledWeights::new(&w) else { continue };
            assert_eq!(
                t.as_bytes().len(),
                data.len(),
                "{ty}: a tiled matrix is as large as the file's"
            );
            for r in 0..rows {
                assert_eq!(t.view().gguf_row(r), w.row(r), "{ty} row {r}");
            }
        }
    }

    #[test]
    fn only_whole_groups_of_eight_rows_of_the_legacy_types_are_tiled() {
        let data = matrix(GgmlType::Q4_1, 12, 32, &[1.0, -2.0, 0.5]);
        let w = WeightView::new(GgmlType::Q4_1, 12, 32, &data).unwrap();
        assert!(TiledWeights::new(&w).is_none());
        let data = matrix(GgmlType::Q4K, 8, 256, &[1.0, -2.0, 0.5]);
        let w = WeightView::new(GgmlType::Q4K, 8, 256, &data).unwrap();
        assert!(TiledWeights::new(&w).is_none());
    }

    #[test]
    fn fifth_bits_round_trip() {
        for qh in [0u32, 1, 0x8000_0000, 0xffff_ffff, 0x1234_5678, 0xdead_beef] {
            assert_eq!(unfifth_bits(fifth_bits(qh)), qh);
        }
        // Quarter 1 (elements 4-7) in byte 1's low nibble, quarter 5 (20-23) in its high one.
        assert_eq!(fifth_bits(0x00f0_0000), 0x0000_f000);
        assert_eq!(fifth_bits(0x0000_00f0), 0x0000_0f00);
    }

    #[test]
    fn tiled_bytes_of_the_wrong_length_are_refused() {
        let data = matrix(GgmlType::Q4_1, 8, 64, &[1.0, -2.0, 0.5]);
        let w = WeightView::new(GgmlType::Q4_1, 8, 64, &data).unwrap();
        let Some(t) = TiledWeights::new(&w) else { return };
        let b = t.as_bytes();
        assert!(TiledView::new(GgmlType::Q4_1, 8, 64, b).is_ok());
        assert!(TiledView::new(GgmlType::Q4_1, 8, 64, &b[1..]).is_err());
        assert!(TiledView::new(GgmlType::Q4_1, 16, 64, b).is_err());
        assert!(TiledView::new(GgmlType::Q4_1, 12, 64, b).is_err());
        assert!(TiledView::new(GgmlType::Q4K, 8, 256, b).is_err());
    }

    #[test]
    fn tiles_of_another_shape_or_type_are_refused() {
        let vals = [1.0, -2.0, 0.5, 3.0];
        let a = matrix(GgmlType::Q8_0, 16, 64, &vals);
        let wa = WeightView::new(GgmlType::Q8_0, 16, 64, &a).unwrap();
        let Some(ta) = TiledWeights::new(&wa) else { return };
        let b = matrix(GgmlType::Q8_0, 8, 128, &vals);
        let wb = WeightView::new(GgmlType::Q8_0, 8, 128, &b).unwrap();
        assert!(wb.with_tiles(ta.view()).is_err());
        let c = matrix(GgmlType::Q4_0, 16, 64, &vals);
        let wc = WeightView::new(GgmlType::Q4_0, 16, 64, &c).unwrap();
        assert!(wc.with_tiles(ta.view()).is_err());
        assert!(wa.with_tiles(ta.view()).is_ok());
    }

    #[test]
    fn tokens_quantized_into_the_tiles_equal_quantized_rows_laid_out() {
        let pool = ThreadPool::new(1);
        let Some(isa) = Isa::all_supported().into_iter().find(|i| i.avx2()) else { return };
        let mut s = 7u32;
        // Kept from case to case: what a buffer held before must not show through (a case
        // after one with more blocks, with quant sums, of a whole last tile).
        let (mut reused_rows, mut reused_straight) = (TiledActs::default(), TiledActs::default());
        for (n, cols, sums) in [(1, 32, false), (3, 96, true), (4, 576, true), (9, 160, false)] {
            let x: Vec<f32> = (0..n * cols)
                .map(|_| {
                    s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (s >> 8) as f32 / (1 << 23) as f32 - 1.0
                })
                .collect();
            let mut acts = QuantizedActs::new();
            acts.quantize_as_on(isa, ActFormat::Q8_0, &pool, &x, n, cols).unwrap();
            let rows: Vec<ActRow<'_>> = (0..n).map(|t| acts.row(t)).collect();
            let mut laid_out = TiledActs::default();
            laid_out.pack(&rows, sums).unwrap();
            let xs: Vec<&[f32]> = x.chunks_exact(cols).collect();
            let mut straight = TiledActs::default();
            straight.quantize(isa, &xs, sums).unwrap();
            assert_eq!((straight.n_tokens, straight.nb), (laid_out.n_tokens, laid_out.nb));
            assert_eq!(straight.blocks, laid_out.blocks, "n={n} cols={cols}");
            reused_rows.pack(&rows, sums).unwrap();
            reused_straight.quantize(isa, &xs, sums).unwrap();
            assert_eq!(reused_rows.blocks, laid_out.blocks, "n={n} cols={cols}, reused");
            assert_eq!(reused_straight.blocks, laid_out.blocks, "n={n} cols={cols}, reused");
        }
        let mut t = TiledActs::default();
        let odd = [0.0f32; 40];
        assert!(matches!(
            t.quantize(isa, &[&odd[..]], false),
            Err(KernelError::NotBlockMultiple { n: 40, .. })
        ));
        assert!(t.quantize(isa, &[&odd[..32], &odd[..]], false).is_err());
    }

    #[test]
    fn a_matrix_without_columns_gives_zeros() {
        let pool = ThreadPool::new(2);
        let w = WeightView::new(GgmlType::Q4_1, 8, 0, &[]).unwrap();
        let Some(tiles) = TiledWeights::new(&w) else { return };
        let tiled = w.with_tiles(tiles.view()).unwrap();
        for n in [1, 5] {
            let mut out = vec![f32::NAN; 8 * n];
            matmul_on(Isa::current(), &pool, &tiled, &[], n, &mut out).unwrap();
            assert!(out.iter().all(|&v| v == 0.0), "n={n}: {out:?}");
        }
    }

    #[test]
    fn activations_of_another_width_are_refused() {
        let pool = ThreadPool::new(1);
        let (mut a, mut b) = (QuantizedActs::new(), QuantizedActs::new());
        a.quantize_as(ActFormat::Q8_0, &pool, &[0.5; 64], 1, 64).unwrap();
        b.quantize_as(ActFormat::Q8_0, &pool, &[0.5; 96], 1, 96).unwrap();
        let mut t = TiledActs::default();
        assert!(t.pack(&[a.row(0), b.row(0)], true).is_err());
        t.pack(&[b.row(0)], true).unwrap();
        assert_eq!((t.n_tokens, t.nb, t.blocks.len()), (1, 3, 3));
        assert_eq!(t.blocks[2].sum, [32 * 127, 0, 0, 0], "equal values quantize to 127");
        #[cfg(target_arch = "x86_64")]
        if Isa::current().avx2() {
            let data = matrix(GgmlType::Q4_0, 8, 64, &[1.0]);
            let w = WeightView::new(GgmlType::Q4_0, 8, 64, &data).unwrap();
            let tiles = TiledWeights::new(&w).unwrap();
            let mut emit = |_: usize, _: usize, _: &[f32; GROUP]| {};
            // SAFETY: the CPU has AVX2 (checked above, by detection).
            let r = unsafe { avx2::tiled_rows(tiles.view(), &t, 0..8, &mut emit) };
            assert!(r.is_err(), "3 blocks of activations against 2 of weights");
        }
    }

    /// The largest sums the integer steps meet: nibbles of 15, Q5 quants of 31 (and 0) and Q8_0
    /// weights of -128 with activations of +-127, where an i16 or `maddubs` overflow would show.
    #[test]
    fn extreme_weights_and_activations_are_exact() {
        let (rows, cols) = (16, 64);
        for ty in TYPES {
            let rb = ty.row_bytes(cols as u64).unwrap() as usize;
            let mut data = matrix(ty, rows, cols, &[1.0]);
            for (r, row) in data.chunks_mut(rb).enumerate() {
                for blk in row.chunks_mut(ty.type_size()) {
                    // d = 1.0 (f16), m = 0; then every quant at its extreme.
                    blk[..2].copy_from_slice(&0x3c00u16.to_le_bytes());
                    let q0 = match ty {
                        GgmlType::Q4_1 | GgmlType::Q5_1 => {
                            blk[2..4].fill(0);
                            4
                        }
                        _ => 2,
                    };
                    let fill = match (ty, r % 2) {
                        (GgmlType::Q8_0, 0) => 0x80, // -128
                        (GgmlType::Q8_0, _) => 0x7f,
                        (_, 0) => 0xff, // nibbles of 15, and for Q5 every fifth bit: 31
                        _ => 0x00,
                    };
                    blk[q0..].fill(fill);
                }
            }
            for (sign, n) in [(1.0f32, 1), (-1.0, 4), (1.0, 5)] {
                // Equal values quantize to +-127 in every block.
                let x: Vec<f32> =
                    (0..n * cols).map(|i| sign * if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
                check(ty, rows, cols, &data, &x, n);
                let x = vec![sign * 3.0; n * cols];
                check(ty, rows, cols, &data, &x, n);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn tiled_products_equal_the_scalar_reference_bit_for_bit(
            ty in prop::sample::select(TYPES.to_vec()),
            groups in 1usize..5,
            blocks in 1usize..9,
            n in 1usize..11,
            seed in any::<u64>(),
        ) {
            let (rows, cols) = (groups * GROUP, blocks * QK);
            let mut s = seed | 1;
            let mut next = || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            };
            let vals: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
            let data = matrix(ty, rows, cols, &vals);
            let x: Vec<f32> = (0..n * cols).map(|_| next() * 4.0).collect();
            check(ty, rows, cols, &data, &x, n);
        }
    }
}
