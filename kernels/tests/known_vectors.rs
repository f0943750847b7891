//! Quantization and dequantization against vectors produced by gguf-py's reference quantizers
//! and, for Q8_1, ggml's C `quantize_row_q8_1_ref` itself (`tests/data/gen_known_vectors.py`,
//! which also checked gguf-py's encodings against the C when it wrote them).

use unicorn_kernels::formats::{
    as_blocks, dequantize_row, quantize_row, quantize_row_q8_1, BlockQ8_0, BlockQ8_1,
};
use unicorn_kernels::{GgmlType, QuantizedActs, ThreadPool};

struct Record {
    ty: GgmlType,
    input: Vec<f32>,
    encoded: Vec<u8>,
    decoded: Vec<f32>,
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2));
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn records() -> Vec<Record> {
    let text = include_str!("data/known_vectors.txt");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 4, "malformed record");
            let ty = GgmlType::ALL
                .into_iter()
                .find(|t| t.name() == f[0])
                .unwrap_or_else(|| panic!("unknown type {}", f[0]));
            Record {
                ty,
                input: floats(&unhex(f[1])),
                encoded: unhex(f[2]),
                decoded: floats(&unhex(f[3])),
            }
        })
        .collect()
}

#[test]
fn every_type_is_covered() {
    let got: Vec<GgmlType> = records().iter().map(|r| r.ty).collect();
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
    ] {
        assert!(got.contains(&ty), "{ty} missing from the known vectors");
    }
}

#[test]
fn quantization_is_bit_exact() {
    for r in records() {
        let mut out = vec![0u8; r.encoded.len()];
        quantize_row(r.ty, &r.input, &mut out).unwrap();
        if out != r.encoded {
            let bs = r.ty.type_size();
            let first = out.iter().zip(&r.encoded).position(|(a, b)| a != b).unwrap();
            panic!(
                "{}: byte {first} (block {}) differs: ours {:02x?} want {:02x?}",
                r.ty,
                first / bs,
                &out[first / bs * bs..][..bs],
                &r.encoded[first / bs * bs..][..bs]
            );
        }
    }
}

#[test]
fn dequantization_is_bit_exact() {
    for r in records() {
        let mut out = vec![0.0f32; r.decoded.len()];
        dequantize_row(r.ty, &r.encoded, &mut out).unwrap();
        for (i, (a, b)) in out.iter().zip(&r.decoded).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{} element {i}: {a} vs {b}", r.ty);
        }
    }
}

#[test]
fn q8_1_shares_q8_0_scale_and_quants() {
    // gguf-py has no Q8_1 quantizer; ggml defines its d and qs exactly as Q8_0's.
    let r = records().into_iter().find(|r| r.ty == GgmlType::Q8_0).unwrap();
    let want: &[BlockQ8_0] = as_blocks(&r.encoded).unwrap();
    let mut got = vec![BlockQ8_1::default(); want.len()];
    quantize_row_q8_1(&r.input, &mut got);
    for (g, w) in got.iter().zip(want) {
        assert_eq!((g.d, g.qs), (w.d, w.qs));
    }
}

#[test]
fn activation_quantizer_matches_ggml_q8_1_on_every_isa() {
    let r = records().into_iter().find(|r| r.ty == GgmlType::Q8_1).unwrap();
    let want: &[BlockQ8_1] = as_blocks(&r.encoded).unwrap();
    let pool = ThreadPool::new(2);
    for isa in unicorn_kernels::Isa::all_supported() {
        let mut acts = QuantizedActs::new();
        // Four tokens of a quarter of the values each.
        let cols = r.input.len() / 4;
        acts.quantize_on(isa, &pool, &r.input, 4, cols).unwrap();
        let got: Vec<BlockQ8_1> = (0..4).flat_map(|t| acts.q8_1_blocks(t)).collect();
        assert_eq!(got.as_slice(), want, "{isa:?}");
    }
}
