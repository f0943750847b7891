//! The k-quant block formats, ggml's "2-6 bit quantization in super-blocks": Q2_K, Q3_K, Q4_K,
//! Q5_K and Q6_K, and Q8_K, the activation format their dot products take.
//!
//! A super-block holds [`QK_K`] = 256 weights in sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 32 (Q4_K,
//! Q5_K) elements, each with its own small integer scale (and, for Q2_K/Q4_K/Q5_K, minimum),
//! themselves scaled by the block's f16 `d` (and `dmin`):
//!
//! | type | bytes | value of element `i` in sub-block `j` |
//! |------|-------|---------------------------------------|
//! | Q2_K | 84  | `d * sc_j * q_i - dmin * m_j`, `q` 2 bits, `sc`/`m` 4 bits per 16 |
//! | Q3_K | 110 | `d * (sc_j - 32) * (q_i - 4)`, `q` 3 bits, `sc` 6 bits per 16 |
//! | Q4_K | 144 | `d * sc_j * q_i - dmin * m_j`, `q` 4 bits, `sc`/`m` 6 bits per 32 |
//! | Q5_K | 176 | as Q4_K with 5-bit `q` |
//! | Q6_K | 210 | `d * sc_j * (q_i - 32)`, `q` 6 bits, `sc` i8 per 16 |
//! | Q8_K | 292 | `d * q_i`, `d` f32, `q` i8, plus `bsums`: sums of each 16 `q` |
//!
//! The quantizers follow ggml's reference `quantize_row_q*_K_ref` (the ones model files are made
//! with when there is no importance matrix), including their searches for the best scales
//! (`make_qkx2_quants` for Q2_K/Q4_K/Q5_K, `make_q3_quants` for Q3_K, `make_qx_quants` for Q6_K)
//! and `nearest_int`'s rounding (half to even, through the float adder), operation by operation;
//! as in [`crate::formats`], results are bit-identical to a build of that C which does not contract
//! `a*b + c` into an FMA. `tests/known_vectors.rs` checks them against vectors made by ggml's C
//! through ctypes.
//!
//! Where ggml leaves bytes unwritten (the `bsums` of an all-zero Q8_K block), they are 0 here.

use crate::formats::{f16_le, f16_le_from, sealed, Block};
use crate::GgmlType;

/// Elements per super-block of every type in this module.
pub const QK_K: usize = 256;

/// Bytes of the packed 6-bit scales of Q3_K, Q4_K and Q5_K.
pub const K_SCALE_SIZE: usize = 12;

/// ggml's `GROUP_MAX_EPS`: sub-blocks whose largest magnitude is below it quantize to zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Q2_K: 2-bit quants, 4-bit scales and minimums per 16 weights.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ2K {
    /// Sub-block `j`: scale in the low nibble, minimum in the high nibble.
    pub scales: [u8; 16],
    /// Element `128 h + 32 k + l` is bits `2k..2k+2` of byte `32 h + l`.
    pub qs: [u8; 64],
    /// Super-block scale of the scales, f16 little-endian.
    pub d: [u8; 2],
    /// Super-block scale of the minimums, f16 little-endian.
    pub dmin: [u8; 2],
}

/// Q3_K: 3-bit quants (stored as 2 low bits and a high-bit mask), 6-bit scales per 16 weights.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ3K {
    /// Bit `e / 32` of byte `e % 32` is the high bit of element `e`; a clear bit means `q - 4`.
    pub hmask: [u8; 32],
    /// Low two bits, laid out as Q2_K's `qs`.
    pub qs: [u8; 64],
    /// Sixteen 6-bit scales, biased by 32; see [`q3_k_scales`].
    pub scales: [u8; K_SCALE_SIZE],
    /// Super-block scale, f16 little-endian.
    pub d: [u8; 2],
}

/// Q4_K: 4-bit quants, 6-bit scales and minimums per 32 weights.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ4K {
    /// Super-block scale of the scales, f16 little-endian.
    pub d: [u8; 2],
    /// Super-block scale of the minimums, f16 little-endian.
    pub dmin: [u8; 2],
    /// Eight 6-bit scales and eight 6-bit minimums; see [`get_scale_min_k4`].
    pub scales: [u8; K_SCALE_SIZE],
    /// Element `64 g + l` is the low nibble of byte `32 g + l`, element `64 g + 32 + l` its high
    /// nibble.
    pub qs: [u8; 128],
}

/// Q5_K: Q4_K plus a fifth bit per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ5K {
    /// As in [`BlockQ4K`].
    pub d: [u8; 2],
    /// As in [`BlockQ4K`].
    pub dmin: [u8; 2],
    /// As in [`BlockQ4K`].
    pub scales: [u8; K_SCALE_SIZE],
    /// Bit `e / 32` of byte `e % 32` is bit 4 of element `e`.
    pub qh: [u8; 32],
    /// Low four bits, laid out as in [`BlockQ4K`].
    pub qs: [u8; 128],
}

/// Q6_K: 6-bit quants, i8 scales per 16 weights.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ6K {
    /// Low four bits: in half `h`, element `128 h + l` (`l < 32`) is the low nibble of byte
    /// `64 h + l`, `+32` of byte `64 h + 32 + l`, `+64` the high nibble of byte `64 h + l`, `+96`
    /// the high nibble of byte `64 h + 32 + l`.
    pub ql: [u8; 128],
    /// High two bits: those four elements take bits 0-1, 2-3, 4-5, 6-7 of byte `32 h + l`.
    pub qh: [u8; 64],
    /// Sub-block scales.
    pub scales: [i8; 16],
    /// Super-block scale, f16 little-endian.
    pub d: [u8; 2],
}

/// Q8_K: 8-bit quants with an f32 scale and the sums of each 16 quants.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ8K {
    /// Scale, f32 little-endian.
    pub d: [u8; 4],
    /// The quants.
    pub qs: [i8; QK_K],
    /// `bsums[j]` = sum of `qs[16 j..16 j + 16]`, i16 little-endian.
    pub bsums: [[u8; 2]; QK_K / 16],
}

impl BlockQ8K {
    /// `bsums[j]` as an integer.
    #[inline]
    pub fn bsum(&self, j: usize) -> i16 {
        i16::from_le_bytes(self.bsums[j])
    }
}

const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);
const _: () = assert!(std::mem::align_of::<BlockQ2K>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ3K>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ4K>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ5K>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ6K>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ8K>() == 1);

impl Default for BlockQ2K {
    fn default() -> Self {
        BlockQ2K { scales: [0; 16], qs: [0; 64], d: [0; 2], dmin: [0; 2] }
    }
}

impl Default for BlockQ3K {
    fn default() -> Self {
        BlockQ3K { hmask: [0; 32], qs: [0; 64], scales: [0; K_SCALE_SIZE], d: [0; 2] }
    }
}

impl Default for BlockQ4K {
    fn default() -> Self {
        BlockQ4K { d: [0; 2], dmin: [0; 2], scales: [0; K_SCALE_SIZE], qs: [0; 128] }
    }
}

impl Default for BlockQ5K {
    fn default() -> Self {
        BlockQ5K { d: [0; 2], dmin: [0; 2], scales: [0; K_SCALE_SIZE], qh: [0; 32], qs: [0; 128] }
    }
}

impl Default for BlockQ6K {
    fn default() -> Self {
        BlockQ6K { ql: [0; 128], qh: [0; 64], scales: [0; 16], d: [0; 2] }
    }
}

impl Default for BlockQ8K {
    fn default() -> Self {
        BlockQ8K { d: [0; 4], qs: [0; QK_K], bsums: [[0; 2]; QK_K / 16] }
    }
}

macro_rules! impl_k_block {
    ($t:ty, $ty:expr, $d:expr) => {
        impl sealed::Sealed for $t {}
        // SAFETY: a repr(C) struct of u8/i8 arrays: alignment 1, no padding, any bits valid; the
        // size is asserted equal to the type size below.
        unsafe impl Block for $t {
            const TYPE: GgmlType = $ty;
            fn d(&self) -> f32 {
                $d(self.d)
            }
        }
        const _: () = assert!(std::mem::size_of::<$t>() == $ty.type_size());
        const _: () = assert!($ty.block_size() == QK_K);
    };
}

impl_k_block!(BlockQ2K, GgmlType::Q2K, f16_le);
impl_k_block!(BlockQ3K, GgmlType::Q3K, f16_le);
impl_k_block!(BlockQ4K, GgmlType::Q4K, f16_le);
impl_k_block!(BlockQ5K, GgmlType::Q5K, f16_le);
impl_k_block!(BlockQ6K, GgmlType::Q6K, f16_le);
impl_k_block!(BlockQ8K, GgmlType::Q8K, f32::from_le_bytes);

/// ggml's `nearest_int`: adds 1.5 * 2^23 and reads the low mantissa bits, which rounds half to
/// even for `|x| <= 4194303`. Outside that range (where ggml only asserts in debug builds) the
/// result is the same meaningless integer ggml computes.
#[inline]
pub fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K or
/// Q5_K block. Sub-blocks 0-3 take the low six bits of bytes `j` and `j + 4`; sub-blocks 4-7
/// take a nibble of byte `j + 4` and the top two bits of bytes `j - 4` and `j`.
#[inline]
pub fn get_scale_min_k4(j: usize, q: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The sixteen scales of a Q3_K block with their bias removed (`-32..=31`): scale `j` has its
/// low nibble in byte `j` (`j < 8`, low half) or `j - 8` (high half), its top two bits at bit
/// `2 (j / 4)` of byte `8 + j % 4`.
#[inline]
pub fn q3_k_scales(s: &[u8; K_SCALE_SIZE]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let lo = if j < 8 { s[j] & 0x0f } else { s[j - 8] >> 4 };
        let hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = (lo | (hi << 4)) as i8 - 32;
    }
    out
}

fn check_blocks(n: usize, nb: usize) {
    assert!(n == nb * QK_K, "row of {n} values does not match {nb} blocks of {QK_K}");
}

/// The first element of largest magnitude (`fabsf(x) > amax` in order), and that magnitude.
#[inline]
fn signed_amax(x: &[f32]) -> (f32, f32) {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    (max, amax)
}

/// `make_qkx2_quants`: quants `0..=nmax` with a scale and a minimum for `x`, weighted least
/// squares over `nstep + 1` trial scales. Returns `(scale, -min)`; `l` gets the quants.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let mut laux = [0u8; 32];
    let laux = &mut laux[..n];
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let err = |diff: f32| if use_mad { diff.abs() } else { diff * diff };
    let nmaxf = nmax as f32;
    let iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        best_error += weights[i] * err(scale * q as f32 + min - x[i]);
    }
    for is in 0..=nstep {
        let iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let (w, qf) = (weights[i], q as f32);
            sum_l += w * qf;
            sum_l2 += w * qf * qf;
            sum_xl += w * qf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                cur_error += weights[i] * err(this_scale * laux[i] as f32 + this_min - x[i]);
            }
            if cur_error < best_error {
                l.copy_from_slice(laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `make_qx_quants` as `quantize_row_q6_K_ref` calls it (`rmse_type` 1, no quant weights):
/// quants `-nmax..nmax` stored biased by `nmax`, the scale chosen among 19 trials by
/// `x^2`-weighted least squares.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (max, amax) = signed_amax(x);
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let fill = |iscale: f32, l: &mut [i8]| {
        for (o, &v) in l.iter_mut().zip(x) {
            *o = (nmax + nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as i8;
        }
    };
    let iscale = -nmaxf / max;
    fill(iscale, l);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmaxf + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            fill(iscale, l);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `make_q3_quants` with `do_rmse`: quants `-nmax..nmax` (stored biased by `nmax`), then up to
/// five passes that move single quants while the `x^2`-weighted fit improves.
fn make_q3_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (max, amax) = signed_amax(x);
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (o, &v) in l.iter_mut().zip(x) {
        let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *o = q as i8;
        let (w, qf) = (v * v, q as f32);
        sumlx += w * v * qf;
        suml2 += w * qf * qf;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for (o, &v) in l.iter_mut().zip(x) {
            let w = v * v;
            let li = *o as f32;
            let mut slx = sumlx - w * v * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != i32::from(*o) {
                    let nf = new_l as f32;
                    slx += w * v * nf;
                    sl2 += w * nf * nf;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *o = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    for o in l.iter_mut() {
        *o += nmax as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Packs 2-bit values `l` (one super-block) as Q2_K/Q3_K `qs`.
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8; 64]) {
    for h in 0..2 {
        let j = 128 * h;
        for i in 0..32 {
            qs[32 * h + i] =
                l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6);
        }
    }
}

/// Stores the 6-bit scales `ls` and minimums `lm` of Q4_K/Q5_K as `get_scale_min_k4` reads them.
fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8], s: &mut [u8; K_SCALE_SIZE]) {
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0x0f) | ((lm[j] & 0x0f) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
}

/// The sub-block fits shared by Q4_K and Q5_K (`nmax` 15 or 31): quants into `l`, then the
/// packed scales and the block's `d` and `dmin` (f16 bytes).
fn quantize_scale_min_k4(
    xb: &[f32],
    nmax: i32,
    rmin: f32,
    nstep: i32,
    l: &mut [u8; QK_K],
) -> ([u8; K_SCALE_SIZE], [u8; 2], [u8; 2]) {
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    let mut weights = [0.0f32; 32];
    for j in 0..8 {
        let x = &xb[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in x {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(x) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            nmax,
            x,
            &weights,
            &mut l[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
            false,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // `uint8_t ls = nearest_int(..)`: the C conversion keeps the low byte.
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let mut packed = [0u8; K_SCALE_SIZE];
    pack_scale_min_k4(&ls, &lm, &mut packed);
    let d = f16_le_from(max_scale / 63.0);
    let dmin = f16_le_from(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, &packed);
        let dj = f16_le(d) * f32::from(sc);
        if dj == 0.0 {
            continue;
        }
        let dm = f16_le(dmin) * f32::from(m);
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((xb[32 * j + ii] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (packed, d, dmin)
}

/// Quantizes `x` to Q2_K like `quantize_row_q2_K_ref`.
///
/// # Panics
///
/// When `x.len() != 256 * y.len()`.
pub fn quantize_row_q2_k(x: &[f32], y: &mut [BlockQ2K]) {
    check_blocks(x.len(), y.len());
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let mut l = [0u8; QK_K];
        let mut scales = [0.0f32; 16];
        let mut mins = [0.0f32; 16];
        let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
        let mut weights = [0.0f32; 16];
        for j in 0..16 {
            let x = &xb[16 * j..16 * j + 16];
            for (w, &v) in weights.iter_mut().zip(x) {
                *w = v.abs();
            }
            let (s, m) =
                make_qkx2_quants(3, x, &weights, &mut l[16 * j..16 * j + 16], -0.5, 0.1, 15, true);
            scales[j] = s;
            mins[j] = m;
            if s > max_scale {
                max_scale = s;
            }
            if m > max_min {
                max_min = m;
            }
        }
        if max_scale > 0.0 {
            let iscale = 15.0 / max_scale;
            for (o, &s) in yb.scales.iter_mut().zip(&scales) {
                *o = nearest_int(iscale * s) as u8;
            }
            yb.d = f16_le_from(max_scale / 15.0);
        } else {
            yb.scales = [0; 16];
            yb.d = f16_le_from(0.0);
        }
        if max_min > 0.0 {
            let iscale = 15.0 / max_min;
            for (o, &m) in yb.scales.iter_mut().zip(&mins) {
                *o |= nearest_int(iscale * m).wrapping_shl(4) as u8;
            }
            yb.dmin = f16_le_from(max_min / 15.0);
        } else {
            yb.dmin = f16_le_from(0.0);
        }
        for j in 0..16 {
            let d = f16_le(yb.d) * f32::from(yb.scales[j] & 0x0f);
            if d == 0.0 {
                continue;
            }
            let dm = f16_le(yb.dmin) * f32::from(yb.scales[j] >> 4);
            for ii in 0..16 {
                l[16 * j + ii] = nearest_int((xb[16 * j + ii] + dm) / d).clamp(0, 3) as u8;
            }
        }
        pack_2bit(&l, &mut yb.qs);
    }
}

/// Quantizes `x` to Q3_K like `quantize_row_q3_K_ref`.
///
/// # Panics
///
/// When `x.len() != 256 * y.len()`.
pub fn quantize_row_q3_k(x: &[f32], y: &mut [BlockQ3K]) {
    check_blocks(x.len(), y.len());
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let mut l = [0i8; QK_K];
        let mut scales = [0.0f32; 16];
        let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
        for j in 0..16 {
            scales[j] = make_q3_quants(4, &xb[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
            let s = scales[j].abs();
            if s > amax {
                amax = s;
                max_scale = scales[j];
            }
        }
        yb.scales = [0; K_SCALE_SIZE];
        if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for (j, &s) in scales.iter().enumerate() {
                // `int8_t l = nearest_int(..)`, then clamped and biased in int8_t.
                let q = (i32::from(nearest_int(iscale * s) as i8).clamp(-32, 31) + 32) as u8;
                if j < 8 {
                    yb.scales[j] = q & 0x0f;
                } else {
                    yb.scales[j - 8] |= (q & 0x0f) << 4;
                }
                yb.scales[j % 4 + 8] |= (q >> 4) << (2 * (j / 4));
            }
            yb.d = f16_le_from(1.0 / iscale);
        } else {
            yb.d = f16_le_from(0.0);
        }
        let sc = q3_k_scales(&yb.scales);
        for j in 0..16 {
            let d = f16_le(yb.d) * f32::from(sc[j]);
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                l[16 * j + ii] = (nearest_int(xb[16 * j + ii] / d).clamp(-4, 3) + 4) as i8;
            }
        }
        yb.hmask = [0; 32];
        let mut low = [0u8; QK_K];
        for (j, (&q, lo)) in l.iter().zip(low.iter_mut()).enumerate() {
            let mut q = q as u8;
            if q > 3 {
                yb.hmask[j % 32] |= 1 << (j / 32);
                q -= 4;
            }
            *lo = q;
        }
        pack_2bit(&low, &mut yb.qs);
    }
}

/// Quantizes `x` to Q4_K like `quantize_row_q4_K_ref`.
///
/// # Panics
///
/// When `x.len() != 256 * y.len()`.
pub fn quantize_row_q4_k(x: &[f32], y: &mut [BlockQ4K]) {
    check_blocks(x.len(), y.len());
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let mut l = [0u8; QK_K];
        (yb.scales, yb.d, yb.dmin) = quantize_scale_min_k4(xb, 15, -1.0, 20, &mut l);
        for g in 0..4 {
            for i in 0..32 {
                yb.qs[32 * g + i] = l[64 * g + i] | (l[64 * g + 32 + i] << 4);
            }
        }
    }
}

/// Quantizes `x` to Q5_K like `quantize_row_q5_K_ref`.
///
/// # Panics
///
/// When `x.len() != 256 * y.len()`.
pub fn quantize_row_q5_k(x: &[f32], y: &mut [BlockQ5K]) {
    check_blocks(x.len(), y.len());
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let mut l = [0u8; QK_K];
        (yb.scales, yb.d, yb.dmin) = quantize_scale_min_k4(xb, 31, -0.5, 15, &mut l);
        yb.qh = [0; 32];
        for g in 0..4 {
            for i in 0..32 {
                let (mut l1, mut l2) = (l[64 * g + i], l[64 * g + 32 + i]);
                if l1 > 15 {
                    l1 -= 16;
                    yb.qh[i] |= 1 << (2 * g);
                }
                if l2 > 15 {
                    l2 -= 16;
                    yb.qh[i] |= 2 << (2 * g);
                }
                yb.qs[32 * g + i] = l1 | (l2 << 4);
            }
        }
    }
}

/// Quantizes `x` to Q6_K like `quantize_row_q6_K_ref`.
///
/// # Panics
///
/// When `x.len() != 256 * y.len()`.
pub fn quantize_row_q6_k(x: &[f32], y: &mut [BlockQ6K]) {
    check_blocks(x.len(), y.len());
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let mut l = [0i8; QK_K];
        let mut scales = [0.0f32; 16];
        let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
        for ib in 0..16 {
            let s = make_qx_quants(32, &xb[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
            scales[ib] = s;
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            *yb = BlockQ6K::default();
            continue;
        }
        let iscale = -128.0 / max_scale;
        yb.d = f16_le_from(1.0 / iscale);
        for (o, &s) in yb.scales.iter_mut().zip(&scales) {
            *o = nearest_int(iscale * s).min(127) as i8;
        }
        for j in 0..16 {
            let d = f16_le(yb.d) * f32::from(yb.scales[j]);
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                l[16 * j + ii] = (nearest_int(xb[16 * j + ii] / d).clamp(-32, 31) + 32) as i8;
            }
        }
        let l = l.map(|v| v as u8);
        for h in 0..2 {
            let j = 128 * h;
            for i in 0..32 {
                let (a, b, c, d) = (l[j + i], l[j + i + 32], l[j + i + 64], l[j + i + 96]);
                yb.ql[64 * h + i] = (a & 0x0f) | ((c & 0x0f) << 4);
                yb.ql[64 * h + i + 32] = (b & 0x0f) | ((d & 0x0f) << 4);
                yb.qh[32 * h + i] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((d >> 4) << 6);
            }
        }
    }
}

/// Quantizes `x` to Q8_K like `quantize_row_q8_K_ref`: with `max` the first element of largest
/// magnitude, `q = min(127, nearest_int(x * (-127 / max)))` and `d = 1 / (-127 / max)` (so `d` has
/// the sign opposite to `max`'s), and `bsums` the sums of each 16 quants.
///
/// # Panics
///
/// When `x.len() != 256 * y.len()`.
pub fn quantize_row_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    check_blocks(x.len(), y.len());
    for (xb, yb) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let mut bsums = [0i16; QK_K / 16];
        let d = quantize_q8_k_block(xb.try_into().expect("block of 256"), &mut yb.qs, &mut bsums);
        yb.d = d.to_le_bytes();
        for (o, s) in yb.bsums.iter_mut().zip(bsums) {
            *o = s.to_le_bytes();
        }
    }
}

/// One Q8_K block into split fields; returns `d`. The activation quantizer's scalar path.
#[inline]
pub(crate) fn quantize_q8_k_block(
    x: &[f32; QK_K],
    qs: &mut [i8; QK_K],
    bsums: &mut [i16; QK_K / 16],
) -> f32 {
    let (max, amax) = signed_amax(x);
    if amax == 0.0 {
        qs.fill(0);
        bsums.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    for (s, q) in bsums.iter_mut().zip(qs.chunks_exact(16)) {
        *s = q.iter().map(|&v| i16::from(v)).sum();
    }
    1.0 / iscale
}

/// Dequantizes Q2_K like `dequantize_row_q2_K` (`d * sc * q - dmin * m`).
///
/// # Panics
///
/// When `y.len() != 256 * x.len()`.
pub fn dequantize_row_q2_k(x: &[BlockQ2K], y: &mut [f32]) {
    check_blocks(y.len(), x.len());
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, min) = (f16_le(xb.d), f16_le(xb.dmin));
        for (e, o) in yb.iter_mut().enumerate() {
            let sc = xb.scales[e / 16];
            let (dl, ml) = (d * f32::from(sc & 0x0f), min * f32::from(sc >> 4));
            let q = (xb.qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3;
            *o = dl * f32::from(q) - ml;
        }
    }
}

/// Dequantizes Q3_K like `dequantize_row_q3_K` (`d * (sc - 32) * (q - 4)`).
///
/// # Panics
///
/// When `y.len() != 256 * x.len()`.
pub fn dequantize_row_q3_k(x: &[BlockQ3K], y: &mut [f32]) {
    check_blocks(y.len(), x.len());
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = f16_le(xb.d);
        let sc = q3_k_scales(&xb.scales);
        for (e, o) in yb.iter_mut().enumerate() {
            let dl = d * f32::from(sc[e / 16]);
            let lo = (xb.qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3;
            let high = (xb.hmask[e % 32] >> (e / 32)) & 1;
            *o = dl * (i32::from(lo) - if high != 0 { 0 } else { 4 }) as f32;
        }
    }
}

/// The 4-bit quant of element `e` of a Q4_K/Q5_K block.
#[inline]
fn nibble_k(qs: &[u8; 128], e: usize) -> u8 {
    let b = qs[32 * (e / 64) + e % 32];
    if (e / 32).is_multiple_of(2) {
        b & 0x0f
    } else {
        b >> 4
    }
}

/// Dequantizes Q4_K like `dequantize_row_q4_K` (`d * sc * q - dmin * m`).
///
/// # Panics
///
/// When `y.len() != 256 * x.len()`.
pub fn dequantize_row_q4_k(x: &[BlockQ4K], y: &mut [f32]) {
    check_blocks(y.len(), x.len());
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, min) = (f16_le(xb.d), f16_le(xb.dmin));
        for (j, ys) in yb.chunks_exact_mut(32).enumerate() {
            let (sc, m) = get_scale_min_k4(j, &xb.scales);
            let (dl, ml) = (d * f32::from(sc), min * f32::from(m));
            for (i, o) in ys.iter_mut().enumerate() {
                *o = dl * f32::from(nibble_k(&xb.qs, 32 * j + i)) - ml;
            }
        }
    }
}

/// Dequantizes Q5_K like `dequantize_row_q5_K`.
///
/// # Panics
///
/// When `y.len() != 256 * x.len()`.
pub fn dequantize_row_q5_k(x: &[BlockQ5K], y: &mut [f32]) {
    check_blocks(y.len(), x.len());
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, min) = (f16_le(xb.d), f16_le(xb.dmin));
        for (j, ys) in yb.chunks_exact_mut(32).enumerate() {
            let (sc, m) = get_scale_min_k4(j, &xb.scales);
            let (dl, ml) = (d * f32::from(sc), min * f32::from(m));
            for (i, o) in ys.iter_mut().enumerate() {
                let q = nibble_k(&xb.qs, 32 * j + i) + ((xb.qh[i] >> j) & 1) * 16;
                *o = dl * f32::from(q) - ml;
            }
        }
    }
}

/// The 6-bit quant (0..64, bias 32 not removed) of element `e` of a Q6_K block.
#[inline]
fn q6_k_quant(b: &BlockQ6K, e: usize) -> u8 {
    let (h, k, l) = (e / 128, (e / 32) % 4, e % 32);
    let lo = b.ql[64 * h + 32 * (k % 2) + l];
    let lo = if k < 2 { lo & 0x0f } else { lo >> 4 };
    lo | (((b.qh[32 * h + l] >> (2 * k)) & 3) << 4)
}

/// Dequantizes Q6_K like `dequantize_row_q6_K` (`d * sc * (q - 32)`).
///
/// # Panics
///
/// When `y.len() != 256 * x.len()`.
pub fn dequantize_row_q6_k(x: &[BlockQ6K], y: &mut [f32]) {
    check_blocks(y.len(), x.len());
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = f16_le(xb.d);
        for (e, o) in yb.iter_mut().enumerate() {
            let q = i32::from(q6_k_quant(xb, e)) - 32;
            *o = d * f32::from(xb.scales[e / 16]) * q as f32;
        }
    }
}

/// Dequantizes Q8_K like `dequantize_row_q8_K`.
///
/// # Panics
///
/// When `y.len() != 256 * x.len()`.
pub fn dequantize_row_q8_k(x: &[BlockQ8K], y: &mut [f32]) {
    check_blocks(y.len(), x.len());
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = f32::from_le_bytes(xb.d);
        for (o, &q) in yb.iter_mut().zip(&xb.qs) {
            *o = d * f32::from(q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::{dequantize_row, quantize_row};

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for (x, want) in [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2), (0.49999997, 0)] {
            assert_eq!(nearest_int(x), want, "{x}");
        }
        assert_eq!(nearest_int(-127.4), -127);
        assert_eq!(nearest_int(4_194_303.0), 4_194_303);
    }

    #[test]
    fn scale_min_k4_round_trips_every_value() {
        // Every 6-bit value in every position survives packing and get_scale_min_k4.
        for v in 0..64u8 {
            let ls: [u8; 8] = std::array::from_fn(|j| (v + j as u8 * 7) % 64);
            let lm: [u8; 8] = std::array::from_fn(|j| (v + j as u8 * 13 + 5) % 64);
            let mut s = [0u8; K_SCALE_SIZE];
            pack_scale_min_k4(&ls, &lm, &mut s);
            for j in 0..8 {
                assert_eq!(get_scale_min_k4(j, &s), (ls[j], lm[j]));
            }
        }
    }

    #[test]
    fn q3_k_scales_decode_as_ggml_aux() {
        // ggml's dequantize_row_q3_K rebuilds the scales with 32-bit masks; this is the same.
        let mut s = [0u8; K_SCALE_SIZE];
        let mut seed = 3;
        for b in &mut s {
            *b = (lcg(&mut seed).to_bits() >> 7) as u8;
        }
        let w: [u32; 3] =
            std::array::from_fn(|i| u32::from_le_bytes(s[4 * i..][..4].try_into().unwrap()));
        let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
        let aux = [
            (w[0] & k2) | ((w[2] & k1) << 4),
            (w[1] & k2) | (((w[2] >> 2) & k1) << 4),
            ((w[0] >> 4) & k2) | (((w[2] >> 4) & k1) << 4),
            ((w[1] >> 4) & k2) | (((w[2] >> 6) & k1) << 4),
        ];
        let want: Vec<i8> =
            aux.iter().flat_map(|a| a.to_le_bytes()).map(|b| b as i8 - 32).collect();
        assert_eq!(q3_k_scales(&s).to_vec(), want);
    }

    #[test]
    fn q8_k_hand_block() {
        let mut x = [0.0f32; QK_K];
        x[3] = 5.0;
        x[10] = -5.0; // same magnitude later: max stays +5, so d is negative
        x[20] = 2.5;
        let mut y = [BlockQ8K::default()];
        quantize_row_q8_k(&x, &mut y);
        let d = f32::from_le_bytes(y[0].d);
        assert_eq!(d, 1.0 / (-127.0f32 / 5.0));
        assert_eq!((y[0].qs[3], y[0].qs[10], y[0].qs[20]), (-127, 127, -64)); // -63.5 -> even
        assert_eq!(y[0].bsum(0), 0);
        assert_eq!(y[0].bsum(1), -64);
        let mut back = vec![0.0; QK_K];
        dequantize_row_q8_k(&y, &mut back);
        assert!((back[3] - 5.0).abs() < 1e-6);
        // An all-zero block has d = 0 and zero sums.
        quantize_row_q8_k(&[0.0; QK_K], &mut y);
        assert_eq!(y[0], BlockQ8K::default());
    }

    #[test]
    fn zero_blocks_quantize_to_zero() {
        let x = vec![0.0f32; QK_K];
        for ty in [GgmlType::Q2K, GgmlType::Q3K, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
            let mut b = vec![0xaau8; ty.type_size()];
            quantize_row(ty, &x, &mut b).unwrap();
            let mut back = vec![1.0f32; QK_K];
            dequantize_row(ty, &b, &mut back).unwrap();
            assert!(back.iter().all(|&v| v == 0.0), "{ty}");
        }
    }

    fn k_values() -> impl proptest::strategy::Strategy<Value = Vec<f32>> {
        use proptest::prelude::*;
        (1usize..3, prop_oneof![Just(1e-3f32), Just(1.0f32), Just(300.0f32)]).prop_flat_map(
            |(nb, scale)| {
                prop::collection::vec(
                    prop_oneof![
                        8 => (-1.0f32..1.0).prop_map(move |v| v * scale),
                        1 => Just(0.0f32),
                    ],
                    nb * QK_K,
                )
            },
        )
    }

    /// RMS of `x - dequantize(quantize(x))` over one super-block, relative to the RMS of `x`.
    fn rel_rms(ty: GgmlType, x: &[f32]) -> f32 {
        let mut b = vec![0u8; ty.type_size()];
        quantize_row(ty, x, &mut b).unwrap();
        let mut y = vec![0.0f32; QK_K];
        dequantize_row(ty, &b, &mut y).unwrap();
        let e2: f32 = x.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).sum();
        let x2: f32 = x.iter().map(|a| a * a).sum();
        if x2 == 0.0 {
            assert!(y.iter().all(|&v| v == 0.0));
            0.0
        } else {
            (e2 / x2).sqrt()
        }
    }

    /// How far an f16 field reading `v` may be from the f32 it was rounded from: half an ulp, or
    /// half the subnormal step.
    fn f16_err(v: f32) -> f32 {
        (v.abs() * (1.0 / 2048.0)).max(1.0 / (1u32 << 25) as f32)
    }

    proptest::proptest! {
        /// Every element lies within two of the coarsest steps its block can have: with `amax`
        /// the block's largest magnitude, `amax` over the positive levels (`2 amax / 2^bits`,
        /// the range doubling with a minimum). A step is at most that, a scale quantized to 4 or
        /// 6 bits can stretch it, and a clamped extreme can lose most of another. On top comes
        /// rounding the block's `d` (and `dmin`) to f16, which the largest integer scale times
        /// the largest quant multiplies. Q8_K is within half its step.
        #[test]
        fn round_trip_error_is_bounded(x in k_values()) {
            for ty in [GgmlType::Q2K, GgmlType::Q3K, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K, GgmlType::Q8K] {
                let mut b = vec![0u8; ty.row_bytes(x.len() as u64).unwrap() as usize];
                quantize_row(ty, &x, &mut b).unwrap();
                let mut y = vec![0.0f32; x.len()];
                dequantize_row(ty, &b, &mut y).unwrap();
                for (blk, (xb, yb)) in b.chunks(ty.type_size()).zip(x.chunks(QK_K).zip(y.chunks(QK_K))) {
                    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let f16_at = |o: usize| f16_le([blk[o], blk[o + 1]]);
                    // (steps per amax, d offset, d's reach, dmin offset and reach)
                    let (levels, d_at, d_reach, min) = match ty {
                        GgmlType::Q2K => (1.5, 80, 15.0 * 3.0, Some((82, 15.0))),
                        GgmlType::Q3K => (4.0, 108, 32.0 * 4.0, None),
                        GgmlType::Q4K => (7.5, 0, 63.0 * 15.0, Some((2, 63.0))),
                        GgmlType::Q5K => (15.5, 0, 63.0 * 31.0, Some((2, 63.0))),
                        GgmlType::Q6K => (32.0, 208, 128.0 * 32.0, None),
                        _ => (0.0, 0, 0.0, None),
                    };
                    let bound = if ty == GgmlType::Q8K {
                        f32::from_le_bytes(blk[..4].try_into().unwrap()).abs() / 2.0 * 1.0001
                    } else {
                        let mut b = 2.0 * amax / levels + d_reach * f16_err(f16_at(d_at));
                        if let Some((at, reach)) = min {
                            b += reach * f16_err(f16_at(at));
                        }
                        b
                    } + 1e-6 * amax + f32::MIN_POSITIVE;
                    for (a, b) in xb.iter().zip(yb) {
                        proptest::prop_assert!((a - b).abs() <= bound, "{} {} -> {} (bound {})", ty, a, b, bound);
                    }
                }
            }
        }
    }

    #[test]
    fn round_trip_rms_matches_the_bits() {
        // Gaussian-like weights: each type's relative RMS error is about what its bits give
        // (measured worst blocks: 0.32, 0.15, 0.074, 0.036, 0.018, 0.0065).
        let mut seed = 11;
        let x: Vec<f32> =
            (0..QK_K * 8).map(|_| (0..4).map(|_| lcg(&mut seed)).sum::<f32>()).collect();
        for (ty, max_rel) in [
            (GgmlType::Q2K, 0.40),
            (GgmlType::Q3K, 0.20),
            (GgmlType::Q4K, 0.10),
            (GgmlType::Q5K, 0.05),
            (GgmlType::Q6K, 0.025),
            (GgmlType::Q8K, 0.01),
        ] {
            let worst = x.chunks(QK_K).map(|b| rel_rms(ty, b)).fold(0.0f32, f32::max);
            assert!(worst < max_rel, "{ty}: relative RMS error {worst}");
        }
    }
}
