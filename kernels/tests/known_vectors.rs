//! Quantization and dequantization against vectors produced by gguf-py's reference quantizers
//! and, for Q8_1 and the k-quants (Q2_K .. Q6_K, Q8_K), ggml's C `quantize_row_*_ref` and
//! `dequantize_row_*` themselves (`tests/data/gen_known_vectors.py`, which also checked gguf-py's
//! encodings, and its decodings of the k-quants, against the C when it wrote them). The k-quant
//! dot products are compared with ggml's `ggml_vec_dot_q*_K_q8_K` (generic and SIMD) results.

use unicorn_kernels::formats::{
    as_blocks, dequantize_row, quantize_row, quantize_row_q8_1, BlockQ8_0, BlockQ8_1,
};
use unicorn_kernels::kquants::BlockQ8K;
use unicorn_kernels::{dot, kdot, ActFormat, ActRow, GgmlType, Isa, QuantizedActs, ThreadPool};

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

/// ggml's dot product of the `ty` record's encoding with the Q8_K record's encoding.
struct DotRecord {
    ty: GgmlType,
    /// `ggml_vec_dot_*_q8_K_generic`.
    generic: f32,
    /// `ggml_vec_dot_*_q8_K`, the SIMD path of the library build.
    arch: f32,
}

fn type_named(name: &str) -> GgmlType {
    GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("unknown type {name}"))
}

fn dot_records() -> Vec<DotRecord> {
    let text = include_str!("data/known_vectors.txt");
    text.lines()
        .filter_map(|l| l.strip_prefix("DOT "))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 3, "malformed dot record");
            DotRecord {
                ty: type_named(f[0]),
                generic: floats(&unhex(f[1]))[0],
                arch: floats(&unhex(f[2]))[0],
            }
        })
        .collect()
}

fn records() -> Vec<Record> {
    let text = include_str!("data/known_vectors.txt");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("DOT ") && !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 4, "malformed record");
            let ty = type_named(f[0]);
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
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8K,
    ] {
        assert!(got.contains(&ty), "{ty} missing from the known vectors");
    }
    let dots: Vec<GgmlType> = dot_records().iter().map(|r| r.ty).collect();
    assert_eq!(dots, [GgmlType::Q2K, GgmlType::Q3K, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K]);
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

#[test]
fn activation_quantizer_matches_ggml_q8_k_on_every_isa() {
    let r = records().into_iter().find(|r| r.ty == GgmlType::Q8K).unwrap();
    let want: &[BlockQ8K] = as_blocks(&r.encoded).unwrap();
    let pool = ThreadPool::new(2);
    for isa in Isa::all_supported() {
        // One token per super-block, and all in one token.
        for n_tokens in [want.len(), 1] {
            let mut acts = QuantizedActs::new();
            let cols = r.input.len() / n_tokens;
            acts.quantize_as_on(isa, ActFormat::Q8K, &pool, &r.input, n_tokens, cols).unwrap();
            let got: Vec<BlockQ8K> = (0..n_tokens).flat_map(|t| acts.q8_k_blocks(t)).collect();
            assert_eq!(got.as_slice(), want, "{isa:?}");
        }
    }
}

#[test]
fn k_dot_products_agree_with_ggml() {
    // ggml's build contracts parts of its float accumulation into FMAs and its SIMD path sums in
    // another order, so the comparison is within the bound kdot documents, not bit for bit.
    let recs = records();
    let act = recs.iter().find(|r| r.ty == GgmlType::Q8K).unwrap();
    let blocks: &[BlockQ8K] = as_blocks(&act.encoded).unwrap();
    let qs: Vec<i8> = blocks.iter().flat_map(|b| b.qs).collect();
    let d: Vec<f32> = blocks.iter().map(|b| f32::from_le_bytes(b.d)).collect();
    let bsums: Vec<i16> = blocks.iter().flat_map(|b| (0..16).map(|j| b.bsum(j))).collect();
    let row = ActRow { format: ActFormat::Q8K, qs: &qs, d: &d, s: &[], bsums: &bsums };
    for dr in dot_records() {
        let w = &recs.iter().find(|r| r.ty == dr.ty).unwrap().encoded;
        let terms = kdot::scalar::abs_terms(dr.ty, w, &row).unwrap();
        let bound = 2.0 * (qs.len() as f32 / 32.0 + 8.0) * f32::EPSILON * terms;
        for isa in Isa::all_supported() {
            let got = dot::vec_dot_q(isa, dr.ty, w, row).unwrap();
            for (what, want) in [("generic", dr.generic), ("simd", dr.arch)] {
                assert!(
                    (got - want).abs() <= bound,
                    "{} {isa:?}: {got} vs ggml {what} {want} (bound {bound})",
                    dr.ty
                );
            }
        }
    }
}
