//! What the kernel benchmarks share: quantized test matrices from a fixed pseudo-random stream.
// Each example uses part of this.
#![allow(dead_code)]

use unicorn_kernels::formats::quantize_row;
use unicorn_kernels::{GgmlType, WeightView};

pub struct Mat {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
}

/// The next value in [-1, 1) of a linear congruential stream.
pub fn lcg(s: &mut u64) -> f32 {
    *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// A `rows x cols` matrix of `ty`. Quantizing large matrices is slow: past 256 rows the
/// distinct rows repeat (the bytes are still distinct memory, which is what the timing sees).
pub fn make(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Mat {
    let rb = ty.row_bytes(cols as u64).unwrap() as usize;
    let mut data = vec![0u8; rows * rb];
    let mut s = seed;
    let mut row = vec![0.0f32; cols];
    let distinct = rows.min(256);
    let mut first = Vec::new();
    for (i, dst) in data.chunks_mut(rb).enumerate() {
        if i < distinct {
            for v in row.iter_mut() {
                *v = lcg(&mut s) * 0.1;
            }
            quantize_row(ty, &row, dst).unwrap();
            first.extend_from_slice(dst);
        } else {
            dst.copy_from_slice(&first[(i % distinct) * rb..][..rb]);
        }
    }
    Mat { ty, rows, cols, data }
}

pub fn view(m: &Mat) -> WeightView<'_> {
    WeightView::new(m.ty, m.rows, m.cols, &m.data).unwrap()
}
