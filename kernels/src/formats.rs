//! GGUF block formats: the block structs, views of tensor bytes as blocks, and the scalar reference
//! quantization and dequantization of each type.
//!
//! Quantization follows ggml's `quantize_row_*_ref` (the functions model files are made with) and
//! dequantization `dequantize_row_*`, operation by operation, so results are bit-identical to a
//! build of those C functions that does not contract `a*b + c` into an FMA (which is what the C
//! source says; GCC's default `-ffp-contract=fast` may fuse them, so a `-march=native` build of
//! ggml can differ from these in the last bit of rare elements). f32 to f16 rounds to nearest,
//! ties to even, like `GGML_FP32_TO_FP16` (F16C `vcvtps2ph` with rounding mode 0 or its software
//! twin).
//!
//! Block fields that hold an f16 are `[u8; 2]` (little-endian) so every block has alignment 1: a
//! GGUF tensor is only aligned at its start and blocks are 18 to 292 bytes, so nothing inside a
//! tensor may be assumed aligned.
//!
//! The k-quant blocks (Q2_K .. Q6_K, Q8_K) and their reference quantizers live in
//! [`crate::kquants`]; [`quantize_row`] and [`dequantize_row`] cover them too.

use half::f16;

use crate::error::check_len;
use crate::{kquants, GgmlType, KernelError};

/// Elements per block of every type in this module.
pub const QK: usize = 32;

/// Q4_0: 32 weights as 4-bit unsigned `q` meaning `(q - 8) * d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ4_0 {
    /// Scale, f16 little-endian.
    pub d: [u8; 2],
    /// Byte `j` holds element `j` in its low nibble and element `j + 16` in its high nibble.
    pub qs: [u8; 16],
}

/// Q4_1: 32 weights as 4-bit unsigned `q` meaning `q * d + m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ4_1 {
    /// Scale, f16 little-endian.
    pub d: [u8; 2],
    /// Minimum, f16 little-endian.
    pub m: [u8; 2],
    /// As in [`BlockQ4_0`].
    pub qs: [u8; 16],
}

/// Q5_0: 32 weights as 5-bit unsigned `q` meaning `(q - 16) * d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ5_0 {
    /// Scale, f16 little-endian.
    pub d: [u8; 2],
    /// Bit `j` of this little-endian u32 is bit 4 of element `j`.
    pub qh: [u8; 4],
    /// Low four bits, laid out as in [`BlockQ4_0`].
    pub qs: [u8; 16],
}

/// Q5_1: 32 weights as 5-bit unsigned `q` meaning `q * d + m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ5_1 {
    /// Scale, f16 little-endian.
    pub d: [u8; 2],
    /// Minimum, f16 little-endian.
    pub m: [u8; 2],
    /// As in [`BlockQ5_0`].
    pub qh: [u8; 4],
    /// As in [`BlockQ5_0`].
    pub qs: [u8; 16],
}

/// Q8_0: 32 values as `q * d`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ8_0 {
    /// Scale, f16 little-endian.
    pub d: [u8; 2],
    /// The quants.
    pub qs: [i8; 32],
}

/// Q8_1: Q8_0 plus `s = d * sum(qs)`, which the Q4_1/Q5_1 dot products use for the minimum term.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ8_1 {
    /// Scale, f16 little-endian.
    pub d: [u8; 2],
    /// `d * sum(qs)` with `d` the unrounded f32 scale, f16 little-endian.
    pub s: [u8; 2],
    /// The quants.
    pub qs: [i8; 32],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);
const _: () = assert!(std::mem::align_of::<BlockQ4_0>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ4_1>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ5_0>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ5_1>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ8_0>() == 1);
const _: () = assert!(std::mem::align_of::<BlockQ8_1>() == 1);

pub(crate) mod sealed {
    pub trait Sealed {}
}

/// A block type that may be viewed in place over tensor bytes.
///
/// # Safety
///
/// Implementors are `#[repr(C)]` structs of byte arrays: alignment 1, no padding, size
/// `TYPE.type_size()`, and every bit pattern valid. The trait is sealed; the impls are below and
/// in [`crate::kquants`].
pub unsafe trait Block: sealed::Sealed + Copy + Default + 'static {
    /// The GGUF type this block belongs to.
    const TYPE: GgmlType;

    /// The block's scale `d` as f32 (f16 in every block but Q8_K's).
    fn d(&self) -> f32;
}

macro_rules! impl_block {
    ($t:ty, $ty:expr) => {
        impl sealed::Sealed for $t {}
        // SAFETY: a repr(C) struct of u8/i8 arrays: alignment 1, no padding, any bits valid; the
        // size is asserted equal to the type size below.
        unsafe impl Block for $t {
            const TYPE: GgmlType = $ty;
            fn d(&self) -> f32 {
                f16_le(self.d)
            }
        }
        const _: () = assert!(std::mem::size_of::<$t>() == $ty.type_size());
        const _: () = assert!($ty.block_size() == QK);
    };
}

impl_block!(BlockQ4_0, GgmlType::Q4_0);
impl_block!(BlockQ4_1, GgmlType::Q4_1);
impl_block!(BlockQ5_0, GgmlType::Q5_0);
impl_block!(BlockQ5_1, GgmlType::Q5_1);
impl_block!(BlockQ8_0, GgmlType::Q8_0);
impl_block!(BlockQ8_1, GgmlType::Q8_1);

/// Decodes a little-endian f16.
#[inline]
pub fn f16_le(b: [u8; 2]) -> f32 {
    f16::from_bits(u16::from_le_bytes(b)).to_f32()
}

/// Encodes an f32 as little-endian f16, rounding to nearest even.
#[inline]
pub fn f16_le_from(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

/// Rounds `x` through f16 and back, as a value stored in an f16 field reads.
#[inline]
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// bf16 bits to f32.
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// f32 to bf16 bits as ggml's `ggml_compute_fp32_to_bf16`: NaN made quiet, otherwise round to
/// nearest even. (Older ggml also flushed subnormals to zero; current ggml and gguf-py do not.)
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// Views `bytes` as blocks. Errors when the length is not a whole number of blocks.
pub fn as_blocks<B: Block>(bytes: &[u8]) -> Result<&[B], KernelError> {
    let size = std::mem::size_of::<B>();
    if !bytes.len().is_multiple_of(size) {
        return Err(KernelError::Length {
            what: "block data",
            expected: bytes.len() / size * size,
            got: bytes.len(),
        });
    }
    let n = bytes.len() / size;
    // SAFETY: `B: Block` has alignment 1, no padding and no invalid bit patterns, and `n * size`
    // bytes are in bounds, so the bytes are `n` valid `B`s for the borrow's lifetime.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), n) })
}

/// Mutable view of `bytes` as blocks. Errors when the length is not a whole number of blocks.
pub fn as_blocks_mut<B: Block>(bytes: &mut [u8]) -> Result<&mut [B], KernelError> {
    let size = std::mem::size_of::<B>();
    if !bytes.len().is_multiple_of(size) {
        return Err(KernelError::Length {
            what: "block data",
            expected: bytes.len() / size * size,
            got: bytes.len(),
        });
    }
    let n = bytes.len() / size;
    // SAFETY: as in `as_blocks`; writing any `B` leaves valid bytes behind, and the exclusive
    // borrow is moved into the result.
    Ok(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<B>(), n) })
}

/// The bytes of `blocks`, as they are laid out in a GGUF file.
pub fn blocks_as_bytes<B: Block>(blocks: &[B]) -> &[u8] {
    // SAFETY: `B: Block` is plain bytes without padding, so its memory is initialized `u8`s.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
    }
}

fn check_blocks(n: usize, nb: usize) {
    assert!(n == nb * QK, "row of {n} values does not match {nb} blocks of {QK}");
}

/// ggml's `MAX(amax, fabsf(v))` over a block, including its treatment of NaN.
#[inline]
fn abs_max(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    for &v in x {
        let a = v.abs();
        amax = if amax > a { amax } else { a };
    }
    amax
}

/// The element with the largest magnitude, the first one on ties (Q4_0, Q5_0).
#[inline]
fn signed_abs_max(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

#[inline]
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

#[inline]
fn inv(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Quantizes `x` to Q4_0 like `quantize_row_q4_0_ref`.
///
/// # Panics
///
/// When `x.len() != 32 * y.len()`.
pub fn quantize_row_q4_0(x: &[f32], y: &mut [BlockQ4_0]) {
    check_blocks(x.len(), y.len());
    for (xb, yb) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let d = signed_abs_max(xb) / -8.0;
        let id = inv(d);
        yb.d = f16_le_from(d);
        for j in 0..16 {
            // (int8_t)(x*id + 8.5f): truncation toward zero, then MIN(15, ..).
            let q0 = ((xb[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((xb[j + 16] * id + 8.5) as i8).min(15) as u8;
            yb.qs[j] = q0 | (q1 << 4);
        }
    }
}

/// Quantizes `x` to Q4_1 like `quantize_row_q4_1_ref`.
///
/// # Panics
///
/// When `x.len() != 32 * y.len()`.
pub fn quantize_row_q4_1(x: &[f32], y: &mut [BlockQ4_1]) {
    check_blocks(x.len(), y.len());
    for (xb, yb) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 15.0;
        let id = inv(d);
        yb.d = f16_le_from(d);
        yb.m = f16_le_from(min);
        for j in 0..16 {
            let q0 = (((xb[j] - min) * id + 0.5) as i8).min(15) as u8;
            let q1 = (((xb[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
            yb.qs[j] = q0 | (q1 << 4);
        }
    }
}

/// Quantizes `x` to Q5_0 like `quantize_row_q5_0_ref`.
///
/// # Panics
///
/// When `x.len() != 32 * y.len()`.
pub fn quantize_row_q5_0(x: &[f32], y: &mut [BlockQ5_0]) {
    check_blocks(x.len(), y.len());
    for (xb, yb) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let d = signed_abs_max(xb) / -16.0;
        let id = inv(d);
        yb.d = f16_le_from(d);
        let mut qh = 0u32;
        for j in 0..16 {
            let q0 = ((xb[j] * id + 16.5) as i8).min(31) as u8;
            let q1 = ((xb[j + 16] * id + 16.5) as i8).min(31) as u8;
            yb.qs[j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
            qh |= u32::from(q0 >> 4) << j;
            qh |= u32::from(q1 >> 4) << (j + 16);
        }
        yb.qh = qh.to_le_bytes();
    }
}

/// Quantizes `x` to Q5_1 like `quantize_row_q5_1_ref` (which, unlike Q4_1, does not clamp: the
/// quotient cannot reach 31.5).
///
/// # Panics
///
/// When `x.len() != 32 * y.len()`.
pub fn quantize_row_q5_1(x: &[f32], y: &mut [BlockQ5_1]) {
    check_blocks(x.len(), y.len());
    for (xb, yb) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 31.0;
        let id = inv(d);
        yb.d = f16_le_from(d);
        yb.m = f16_le_from(min);
        let mut qh = 0u32;
        for j in 0..16 {
            let q0 = ((xb[j] - min) * id + 0.5) as u8;
            let q1 = ((xb[j + 16] - min) * id + 0.5) as u8;
            yb.qs[j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
            qh |= u32::from((q0 >> 4) & 1) << j;
            qh |= u32::from((q1 >> 4) & 1) << (j + 16);
        }
        yb.qh = qh.to_le_bytes();
    }
}

/// `roundf` then the C conversion to `int8_t`: half away from zero.
#[inline]
fn round_i8(v: f32) -> i8 {
    v.round() as i8
}

/// Quantizes `x` to Q8_0 like `quantize_row_q8_0_ref`: `d = amax / 127`, `q = roundf(x / d)`
/// (half away from zero, computed as `x * (1/d)`).
///
/// # Panics
///
/// When `x.len() != 32 * y.len()`.
pub fn quantize_row_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    check_blocks(x.len(), y.len());
    for (xb, yb) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let d = abs_max(xb) / 127.0;
        let id = inv(d);
        yb.d = f16_le_from(d);
        for (q, &v) in yb.qs.iter_mut().zip(xb) {
            *q = round_i8(v * id);
        }
    }
}

/// Quantizes `x` to Q8_1 like `quantize_row_q8_1_ref`: Q8_0's `d` and `qs`, and
/// `s = f16(sum(qs) * d)` with the f32 `d` before its rounding to f16.
///
/// # Panics
///
/// When `x.len() != 32 * y.len()`.
pub fn quantize_row_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    check_blocks(x.len(), y.len());
    for (xb, yb) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let d = abs_max(xb) / 127.0;
        let id = inv(d);
        yb.d = f16_le_from(d);
        let mut sum = 0i32;
        for (q, &v) in yb.qs.iter_mut().zip(xb) {
            *q = round_i8(v * id);
            sum += i32::from(*q);
        }
        yb.s = f16_le_from(sum as f32 * d);
    }
}

/// Dequantizes Q4_0 like `dequantize_row_q4_0`.
///
/// # Panics
///
/// When `y.len() != 32 * x.len()`.
pub fn dequantize_row_q4_0(x: &[BlockQ4_0], y: &mut [f32]) {
    check_blocks(y.len(), x.len());
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = f16_le(xb.d);
        for j in 0..16 {
            yb[j] = (i32::from(xb.qs[j] & 0x0f) - 8) as f32 * d;
            yb[j + 16] = (i32::from(xb.qs[j] >> 4) - 8) as f32 * d;
        }
    }
}

/// Dequantizes Q4_1 like `dequantize_row_q4_1` (`q * d + m`, two roundings).
///
/// # Panics
///
/// When `y.len() != 32 * x.len()`.
pub fn dequantize_row_q4_1(x: &[BlockQ4_1], y: &mut [f32]) {
    check_blocks(y.len(), x.len());
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let (d, m) = (f16_le(xb.d), f16_le(xb.m));
        for j in 0..16 {
            yb[j] = f32::from(xb.qs[j] & 0x0f) * d + m;
            yb[j + 16] = f32::from(xb.qs[j] >> 4) * d + m;
        }
    }
}

/// The 5-bit values of a Q5 block, in element order.
#[inline]
fn q5_values(qh: [u8; 4], qs: &[u8; 16]) -> [u8; 32] {
    let qh = u32::from_le_bytes(qh);
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
        q[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

/// Dequantizes Q5_0 like `dequantize_row_q5_0`.
///
/// # Panics
///
/// When `y.len() != 32 * x.len()`.
pub fn dequantize_row_q5_0(x: &[BlockQ5_0], y: &mut [f32]) {
    check_blocks(y.len(), x.len());
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = f16_le(xb.d);
        for (o, q) in yb.iter_mut().zip(q5_values(xb.qh, &xb.qs)) {
            *o = (i32::from(q) - 16) as f32 * d;
        }
    }
}

/// Dequantizes Q5_1 like `dequantize_row_q5_1`.
///
/// # Panics
///
/// When `y.len() != 32 * x.len()`.
pub fn dequantize_row_q5_1(x: &[BlockQ5_1], y: &mut [f32]) {
    check_blocks(y.len(), x.len());
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let (d, m) = (f16_le(xb.d), f16_le(xb.m));
        for (o, q) in yb.iter_mut().zip(q5_values(xb.qh, &xb.qs)) {
            *o = f32::from(q) * d + m;
        }
    }
}

/// Dequantizes Q8_0 like `dequantize_row_q8_0`.
///
/// # Panics
///
/// When `y.len() != 32 * x.len()`.
pub fn dequantize_row_q8_0(x: &[BlockQ8_0], y: &mut [f32]) {
    check_blocks(y.len(), x.len());
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = f16_le(xb.d);
        for (o, &q) in yb.iter_mut().zip(&xb.qs) {
            *o = f32::from(q) * d;
        }
    }
}

/// Dequantizes Q8_1 (`qs * d`; `s` is only used by dot products).
///
/// # Panics
///
/// When `y.len() != 32 * x.len()`.
pub fn dequantize_row_q8_1(x: &[BlockQ8_1], y: &mut [f32]) {
    check_blocks(y.len(), x.len());
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = f16_le(xb.d);
        for (o, &q) in yb.iter_mut().zip(&xb.qs) {
            *o = f32::from(q) * d;
        }
    }
}

fn row_len(ty: GgmlType, n: usize) -> Result<usize, KernelError> {
    match ty.row_bytes(n as u64) {
        Some(b) => Ok(b as usize),
        None => Err(KernelError::NotBlockMultiple { ty, n }),
    }
}

/// Dequantizes one row of `ty` from its GGUF bytes into `dst` (`dst.len()` elements).
///
/// Errors when `dst.len()` is not a whole number of blocks, or when `src` is not exactly that many
/// elements long. (Every [`GgmlType`] has a dequantization.)
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    let bytes = row_len(ty, dst.len())?;
    check_len("source row", bytes, src.len())?;
    match ty {
        GgmlType::F32 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16_le([b[0], b[1]]);
            }
        }
        GgmlType::BF16 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        GgmlType::Q4_0 => dequantize_row_q4_0(as_blocks(src)?, dst),
        GgmlType::Q4_1 => dequantize_row_q4_1(as_blocks(src)?, dst),
        GgmlType::Q5_0 => dequantize_row_q5_0(as_blocks(src)?, dst),
        GgmlType::Q5_1 => dequantize_row_q5_1(as_blocks(src)?, dst),
        GgmlType::Q8_0 => dequantize_row_q8_0(as_blocks(src)?, dst),
        GgmlType::Q8_1 => dequantize_row_q8_1(as_blocks(src)?, dst),
        GgmlType::Q2K => kquants::dequantize_row_q2_k(as_blocks(src)?, dst),
        GgmlType::Q3K => kquants::dequantize_row_q3_k(as_blocks(src)?, dst),
        GgmlType::Q4K => kquants::dequantize_row_q4_k(as_blocks(src)?, dst),
        GgmlType::Q5K => kquants::dequantize_row_q5_k(as_blocks(src)?, dst),
        GgmlType::Q6K => kquants::dequantize_row_q6_k(as_blocks(src)?, dst),
        GgmlType::Q8K => kquants::dequantize_row_q8_k(as_blocks(src)?, dst),
    }
    Ok(())
}

/// Quantizes one row of f32 into `ty`'s GGUF bytes, bit-exact with ggml's reference quantizers
/// (`quantize_row_*_ref`; for the k-quants the ones used without an importance matrix).
///
/// Errors as [`dequantize_row`] does, with `dst` the byte buffer.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), KernelError> {
    let bytes = row_len(ty, src.len())?;
    check_len("destination row", bytes, dst.len())?;
    match ty {
        GgmlType::F32 => {
            for (v, o) in src.iter().zip(dst.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (v, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
                o.copy_from_slice(&f16_le_from(*v));
            }
        }
        GgmlType::BF16 => {
            for (v, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
                o.copy_from_slice(&f32_to_bf16(*v).to_le_bytes());
            }
        }
        GgmlType::Q4_0 => quantize_row_q4_0(src, as_blocks_mut(dst)?),
        GgmlType::Q4_1 => quantize_row_q4_1(src, as_blocks_mut(dst)?),
        GgmlType::Q5_0 => quantize_row_q5_0(src, as_blocks_mut(dst)?),
        GgmlType::Q5_1 => quantize_row_q5_1(src, as_blocks_mut(dst)?),
        GgmlType::Q8_0 => quantize_row_q8_0(src, as_blocks_mut(dst)?),
        GgmlType::Q8_1 => quantize_row_q8_1(src, as_blocks_mut(dst)?),
        GgmlType::Q2K => kquants::quantize_row_q2_k(src, as_blocks_mut(dst)?),
        GgmlType::Q3K => kquants::quantize_row_q3_k(src, as_blocks_mut(dst)?),
        GgmlType::Q4K => kquants::quantize_row_q4_k(src, as_blocks_mut(dst)?),
        GgmlType::Q5K => kquants::quantize_row_q5_k(src, as_blocks_mut(dst)?),
        GgmlType::Q6K => kquants::quantize_row_q6_k(src, as_blocks_mut(dst)?),
        GgmlType::Q8K => kquants::quantize_row_q8_k(src, as_blocks_mut(dst)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_of(f: impl Fn(usize) -> f32) -> Vec<f32> {
        (0..32).map(f).collect()
    }

    #[test]
    fn views_reject_partial_blocks_and_need_no_alignment() {
        let bytes = vec![0u8; 20 * 3 + 1];
        // Offset 1 makes the view misaligned for anything wider than a byte.
        let v: &[BlockQ4_1] = as_blocks(&bytes[1..]).unwrap();
        assert_eq!(v.len(), 3);
        assert!(as_blocks::<BlockQ4_1>(&bytes).is_err());
        assert_eq!(blocks_as_bytes(v).len(), 60);
    }

    #[test]
    fn q8_0_hand_block() {
        // amax 127 -> d = 1, q = roundf(x): ties go away from zero.
        let mut x = block_of(|i| i as f32 - 16.0);
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = 0.49999997;
        let mut y = [BlockQ8_0::default()];
        quantize_row_q8_0(&x, &mut y);
        assert_eq!(f16_le(y[0].d), 1.0);
        assert_eq!(&y[0].qs[..5], &[127, 3, -3, 0, -12]);
        let mut back = vec![0.0; 32];
        dequantize_row_q8_0(&y, &mut back);
        assert_eq!(back[1], 3.0);
        assert_eq!(back[31], 15.0);
    }

    #[test]
    fn q8_1_sum_uses_unrounded_d() {
        // amax 1 -> d = 1/127, not representable in f16; s must be sum * (1/127) rounded once.
        let x = block_of(|i| if i < 16 { 1.0 } else { 0.0 });
        let mut y = [BlockQ8_1::default()];
        quantize_row_q8_1(&x, &mut y);
        assert!(y[0].qs[..16].iter().all(|&q| q == 127));
        let d = 1.0f32 / 127.0;
        assert_eq!(y[0].s, f16_le_from((16 * 127) as f32 * d));
        assert_eq!(f16_le(y[0].s), 16.0);
        assert_eq!(y[0].d, f16_le_from(d));
    }

    #[test]
    fn q4_0_hand_block() {
        // The signed max is -8 -> d = 1; q = trunc(x + 8.5) clamped to 15.
        let x = block_of(|i| match i {
            0 => -8.0,
            1 => 7.0,
            2 => 8.0, // would be 16: clamped
            3 => -0.5,
            4 => 0.4,
            _ => 0.0,
        });
        let mut y = [BlockQ4_0::default()];
        quantize_row_q4_0(&x, &mut y);
        assert_eq!(f16_le(y[0].d), 1.0);
        let lo: Vec<u8> = y[0].qs.iter().map(|b| b & 15).collect();
        assert_eq!(&lo[..6], &[0, 15, 15, 8, 8, 8]);
        assert!(y[0].qs.iter().all(|b| b >> 4 == 8));
        // A positive maximum gives a negative d.
        let x = block_of(|i| if i == 5 { 4.0 } else { 1.0 });
        quantize_row_q4_0(&x, &mut y);
        assert_eq!(f16_le(y[0].d), -0.5);
        let mut back = vec![0.0; 32];
        dequantize_row_q4_0(&y, &mut back);
        assert_eq!(back[5], 4.0);
        assert_eq!(back[0], 1.0);
    }

    #[test]
    fn q4_1_hand_block() {
        // min 1, max 16 -> d = 1, m = 1, q = trunc(x - 1 + 0.5).
        let x = block_of(|i| 1.0 + (i % 16) as f32 + if i == 17 { 0.5 } else { 0.0 });
        let mut y = [BlockQ4_1::default()];
        quantize_row_q4_1(&x, &mut y);
        assert_eq!((f16_le(y[0].d), f16_le(y[0].m)), (1.0, 1.0));
        assert_eq!(y[0].qs[1], 1 | (2 << 4)); // 1.5 + .5 truncates to 2
        let mut back = vec![0.0; 32];
        dequantize_row_q4_1(&y, &mut back);
        assert_eq!(back[15], 16.0);
        assert_eq!(back[17], 3.0);
    }

    #[test]
    fn q5_hand_blocks() {
        let x = block_of(|i| i as f32 - 16.0); // -16..15, signed max -16 -> d = 1
        let mut y = [BlockQ5_0::default()];
        quantize_row_q5_0(&x, &mut y);
        assert_eq!(f16_le(y[0].d), 1.0);
        // q = x + 16 = i: bit 4 set exactly for i >= 16.
        assert_eq!(u32::from_le_bytes(y[0].qh), 0xffff_0000);
        let mut back = vec![0.0; 32];
        dequantize_row_q5_0(&y, &mut back);
        assert_eq!(back, x);

        let x = block_of(|i| 2.0 * i as f32 - 10.0); // min -10, max 52 -> d = 2
        let mut y = [BlockQ5_1::default()];
        quantize_row_q5_1(&x, &mut y);
        assert_eq!((f16_le(y[0].d), f16_le(y[0].m)), (2.0, -10.0));
        dequantize_row_q5_1(&y, &mut back);
        assert_eq!(back, x);
    }

    #[test]
    fn zero_block_quantizes_to_zero_scale() {
        let x = vec![0.0f32; 32];
        let mut bytes = vec![0xaau8; 34];
        quantize_row(GgmlType::Q8_0, &x, &mut bytes).unwrap();
        assert!(bytes.iter().all(|&b| b == 0));
        let mut bytes = vec![0xaau8; 20];
        quantize_row(GgmlType::Q4_1, &x, &mut bytes).unwrap();
        assert!(bytes.iter().all(|&b| b == 0));
    }

    fn block_values() -> impl proptest::strategy::Strategy<Value = Vec<f32>> {
        use proptest::prelude::*;
        (1usize..5, prop_oneof![Just(1e-3f32), Just(1.0f32), Just(300.0f32)]).prop_flat_map(
            |(nb, scale)| {
                prop::collection::vec((-1.0f32..1.0).prop_map(move |v| v * scale), nb * QK)
            },
        )
    }

    proptest::proptest! {
        /// dequantize(quantize(x)) is within half a step of x, plus what rounding the block's
        /// f16 scale (and minimum) costs; Q4_0/Q5_0 may clamp their extreme to one full step.
        #[test]
        fn round_trip_error_is_bounded(x in block_values()) {
            for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::Q8_1] {
                let mut b = vec![0u8; ty.row_bytes(x.len() as u64).unwrap() as usize];
                quantize_row(ty, &x, &mut b).unwrap();
                let mut y = vec![0.0f32; x.len()];
                dequantize_row(ty, &b, &mut y).unwrap();
                for (blk, (xb, yb)) in b.chunks(ty.type_size()).zip(x.chunks(QK).zip(y.chunks(QK))) {
                    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let (lo, hi) = xb.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
                    // (exact step, levels above zero, whether an extreme may clamp, has minimum)
                    let (step, levels, clamps, min) = match ty {
                        GgmlType::Q4_0 => (amax / 8.0, 8.0, true, false),
                        GgmlType::Q5_0 => (amax / 16.0, 16.0, true, false),
                        GgmlType::Q4_1 => ((hi - lo) / 15.0, 15.0, false, true),
                        GgmlType::Q5_1 => ((hi - lo) / 31.0, 31.0, false, true),
                        _ => (amax / 127.0, 127.0, false, false),
                    };
                    let d16 = f16_le([blk[0], blk[1]]).abs();
                    let mut bound = if clamps { step } else { step / 2.0 } + levels * (d16 - step).abs();
                    if min {
                        bound += (f16_le([blk[2], blk[3]]) - lo).abs();
                    }
                    bound = bound * 1.0001 + 1e-6 * amax + f32::MIN_POSITIVE;
                    for (a, b) in xb.iter().zip(yb) {
                        proptest::prop_assert!((a - b).abs() <= bound, "{} {} -> {} (bound {})", ty, a, b, bound);
                    }
                }
            }
            for (ty, rel) in [(GgmlType::F16, 1.0 / 2048.0), (GgmlType::BF16, 1.0 / 256.0)] {
                let mut b = vec![0u8; x.len() * 2];
                quantize_row(ty, &x, &mut b).unwrap();
                let mut y = vec![0.0f32; x.len()];
                dequantize_row(ty, &b, &mut y).unwrap();
                for (a, b) in x.iter().zip(&y) {
                    // Relative half-ulp, or absolute near f16's subnormal range.
                    proptest::prop_assert!((a - b).abs() <= a.abs() * rel + 3e-8, "{} {} -> {}", ty, a, b);
                }
            }
        }
    }

    #[test]
    fn bf16_matches_half_and_quiets_nan() {
        for x in [1.0f32, -3.3203125, 1e-40, 3.0e38, f32::INFINITY, 1.003_906_3, 1.011_718_8] {
            assert_eq!(f32_to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x}");
        }
        assert_eq!(f32_to_bf16(f32::from_bits(0x7f80_0001)), 0x7fc0);
        // Ties go to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
        assert_eq!(bf16_to_f32(f32_to_bf16(1.003_906_3)), 1.0);
    }

    #[test]
    fn typed_rows_check_lengths() {
        let mut out = vec![0.0; 32];
        assert_eq!(
            dequantize_row(GgmlType::Q4_1, &[0; 19], &mut out),
            Err(KernelError::Length { what: "source row", expected: 20, got: 19 })
        );
        assert!(matches!(
            dequantize_row(GgmlType::Q4_1, &[0; 20], &mut out[..31]),
            Err(KernelError::NotBlockMultiple { .. })
        ));
        assert!(matches!(
            dequantize_row(GgmlType::Q4K, &[0; 144], &mut vec![0.0; 255]),
            Err(KernelError::NotBlockMultiple { .. })
        ));
        assert_eq!(
            quantize_row(GgmlType::Q6K, &[0.0; 256], &mut [0; 209]),
            Err(KernelError::Length { what: "destination row", expected: 210, got: 209 })
        );
        let x: Vec<f32> = (0..4).map(|i| i as f32 * 0.5).collect();
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            let mut b = vec![0u8; ty.type_size() * 4];
            quantize_row(ty, &x, &mut b).unwrap();
            let mut back = vec![0.0; 4];
            dequantize_row(ty, &b, &mut back).unwrap();
            assert_eq!(back, x, "{ty}");
        }
    }
}
