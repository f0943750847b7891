//! Inputs shared by the device tests.

use unicorn_kernels::formats::quantize_row;
use unicorn_kernels::GgmlType;

/// Deterministic values in [-1, 1).
pub fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let h = (i.wrapping_add(seed)).wrapping_mul(2_654_435_761).rotate_left(13);
            (h % 20_001) as f32 / 10_000.0 - 1.0
        })
        .collect()
}

pub fn q8_matrix(rows: usize, cols: usize, seed: u32) -> Vec<u8> {
    let ty = GgmlType::Q8_0;
    let rb = ty.row_bytes(cols as u64).unwrap() as usize;
    let w = values(rows * cols, seed);
    let mut bytes = vec![0u8; rb * rows];
    for (src, dst) in w.chunks_exact(cols).zip(bytes.chunks_exact_mut(rb)) {
        quantize_row(ty, src, dst).unwrap();
    }
    bytes
}
