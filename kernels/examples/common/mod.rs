//! What the kernel benchmarks share: quantized test matrices from a fixed pseudo-random stream.
// Each example uses part of this.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};

use unicorn_kernels::formats::quantize_row;
use unicorn_kernels::tiled::TiledWeights;
use unicorn_kernels::{GgmlType, WeightView};

pub struct Mat {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
    /// The matrix tiled eight rows wide, when [`set_tiled`] asked for it and the type allows.
    pub tiles: Option<TiledWeights>,
}

static TILED: AtomicBool = AtomicBool::new(false);

/// Whether matrices made from now on carry a tiled copy for the products to read.
pub fn set_tiled(on: bool) {
    TILED.store(on, Ordering::Relaxed);
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
    let mut m = Mat { ty, rows, cols, data, tiles: None };
    if TILED.load(Ordering::Relaxed) {
        m.tiles = TiledWeights::new(&view(&m));
    }
    m
}

pub fn view(m: &Mat) -> WeightView<'_> {
    let v = WeightView::new(m.ty, m.rows, m.cols, &m.data).unwrap();
    match &m.tiles {
        Some(t) => v.with_tiles(t.view()).unwrap(),
        None => v,
    }
}

/// One product of a layer: weight type, rows (outputs), cols (inputs).
pub type Product = (GgmlType, usize, usize);

/// SmolLM2-135M Q4_1's products in model order: 30 layers of q, k, v, o, gate, up, down, and
/// the Q8_0 output projection.
pub fn smollm2_products() -> (Vec<Vec<Product>>, Product) {
    let q = GgmlType::Q4_1;
    let layer = vec![
        (q, 576, 576),
        (q, 192, 576),
        (q, 192, 576),
        (q, 576, 576),
        (q, 1536, 576),
        (q, 1536, 576),
        (q, 576, 1536),
    ];
    (vec![layer; 30], (GgmlType::Q8_0, 49152, 576))
}

/// Gemma 3 270M as `gemma-3-270m-q4_k_m.gguf` stores it: d_model 640 is not a multiple of 256,
/// so the matrices reading it (q, k, v, gate, up) fall back to Q5_0/Q8_0; attn_output reads
/// 1024 and ffn_down 2048, which are Q4_K, and ffn_down Q6_K in 9 of the 18 layers.
pub fn gemma3_products() -> (Vec<Vec<Product>>, Product) {
    use GgmlType::{Q4K, Q5_0, Q6K, Q8_0};
    let wide = [0, 1, 4, 7, 10, 13, 15, 16, 17]; // layers with Q8_0 attn_v and Q6_K ffn_down
    let layers = (0..18)
        .map(|l| {
            let w = wide.contains(&l);
            vec![
                (Q5_0, 1024, 640),
                (Q5_0, 256, 640),
                (if w { Q8_0 } else { Q5_0 }, 256, 640),
                (Q4K, 640, 1024),
                (Q5_0, 2048, 640),
                (Q5_0, 2048, 640),
                (if w { Q6K } else { Q4K }, 640, 2048),
            ]
        })
        .collect();
    (layers, (Q8_0, 262144, 640))
}
