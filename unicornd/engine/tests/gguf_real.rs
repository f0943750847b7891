//! The reader on the real model files.

mod common;

use std::collections::HashSet;
use std::fs::File;

use unicorn_engine::gguf::{GgufError, GgufFile};
use unicorn_kernels::GgmlType;

#[test]
fn smollm2_parses_with_expected_hyperparameters_and_tensors() {
    let path = common::model_path(common::SMOLLM2);
    let f = GgufFile::open(&path).expect("parse SmolLM2");
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.data_offset() % 32, 0);
    assert_eq!(f.architecture().unwrap(), "llama");
    let md = f.metadata();
    assert_eq!(md.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(md.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(md.get_u32("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(md.get_u32("llama.attention.head_count").unwrap(), 9);
    assert_eq!(md.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(md.get_u32("llama.context_length").unwrap(), 8192);
    assert_eq!(md.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(md.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(), 1e-5);
    assert_eq!(md.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(md.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    assert_eq!(md.get_str_array("tokenizer.ggml.tokens").unwrap().len(), 49152);
    assert_eq!(md.get_str_array("tokenizer.ggml.merges").unwrap().len(), 48900);
    assert_eq!(md.get_i32_array("tokenizer.ggml.token_type").unwrap().len(), 49152);
    assert!(!md.get_bool("tokenizer.ggml.add_bos_token").unwrap());
    assert_eq!(md.get_uint("tokenizer.ggml.bos_token_id").unwrap(), 1);

    // Typed errors name the key.
    match md.get_u32("llama.rope.freq_base") {
        Err(GgufError::WrongType { key, expected, found }) => {
            assert_eq!(
                (key.as_str(), expected, found.as_str()),
                ("llama.rope.freq_base", "u32", "f32")
            );
        }
        other => panic!("{other:?}"),
    }
    let err = md.get_u32("llama.no_such_key").unwrap_err();
    assert!(err.to_string().contains("llama.no_such_key"), "{err}");
    let err = md.get_str_array("tokenizer.ggml.token_type").unwrap_err();
    assert!(err.to_string().contains("array[i32]"), "{err}");

    assert_eq!(f.tensor_infos().len(), 272);
    let emb = f.tensor("token_embd.weight").unwrap();
    assert_eq!(emb.ty, GgmlType::Q8_0);
    assert_eq!(emb.dims, &[576, 49152]);
    assert_eq!(emb.data.len() as u64, 49152 * GgmlType::Q8_0.row_bytes(576).unwrap());
    assert!(f.get_tensor("output.weight").is_none());
    assert!(
        matches!(f.tensor("output.weight"), Err(GgufError::MissingTensor(n)) if n == "output.weight")
    );
    let q = f.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.ty, q.dims), (GgmlType::Q4_1, &[576u64, 576][..]));
    assert_eq!(q.data.len(), 576 * 576 / 32 * 20);
    let norm = f.tensor("blk.29.attn_norm.weight").unwrap();
    assert_eq!((norm.ty, norm.dims), (GgmlType::F32, &[576u64][..]));
    // RMS-norm weights are ordinary floats, not garbage.
    let w: Vec<f32> =
        norm.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert!(w.iter().all(|x| x.is_finite() && x.abs() < 100.0));
    assert!(w.iter().any(|&x| x != 0.0));

    // Every tensor is inside the file and they do not overlap.
    let mut extents: Vec<(u64, u64)> =
        f.tensor_infos().iter().map(|t| (t.offset(), t.offset() + t.size())).collect();
    extents.sort();
    assert!(extents.windows(2).all(|w| w[0].1 <= w[1].0));
    assert!(f.data_offset() + extents.last().unwrap().1 <= f.len());
    for t in f.tensors() {
        assert_eq!(
            t.data.len() as u64,
            t.ty.row_bytes(t.row_len()).unwrap() * t.n_rows(),
            "{}",
            t.name
        );
    }
}

#[test]
fn opening_from_file_and_bytes_gives_the_same_result() {
    let path = common::model_path(common::SMOLLM2);
    let a = GgufFile::from_file(&File::open(&path).unwrap()).unwrap();
    let b = GgufFile::from_bytes(std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(a.tensor_infos(), b.tensor_infos());
    assert_eq!(a.metadata().len(), b.metadata().len());
    for ((ka, va), (kb, vb)) in a.metadata().iter().zip(b.metadata().iter()) {
        assert_eq!((ka, va), (kb, vb));
    }
    assert_eq!(a.tensor("blk.3.ffn_up.weight").unwrap(), b.tensor("blk.3.ffn_up.weight").unwrap());
}

#[test]
fn gemma3_parses() {
    let f = GgufFile::open(common::model_path(common::GEMMA3)).expect("parse Gemma 3");
    assert_eq!(f.architecture().unwrap(), "gemma3");
    let md = f.metadata();
    assert_eq!(md.get_u32("gemma3.block_count").unwrap(), 18);
    assert_eq!(md.get_u32("gemma3.embedding_length").unwrap(), 640);
    assert_eq!(md.get_u32("gemma3.feed_forward_length").unwrap(), 2048);
    assert_eq!(md.get_u32("gemma3.attention.head_count").unwrap(), 4);
    assert_eq!(md.get_u32("gemma3.attention.head_count_kv").unwrap(), 1);
    assert_eq!(md.get_u32("gemma3.attention.key_length").unwrap(), 256);
    assert_eq!(md.get_u32("gemma3.attention.sliding_window").unwrap(), 512);
    assert_eq!(md.get_str("tokenizer.ggml.model").unwrap(), "llama");
    assert_eq!(md.get_str_array("tokenizer.ggml.tokens").unwrap().len(), 262144);
    assert_eq!(md.get_f32_array("tokenizer.ggml.scores").unwrap().len(), 262144);
    assert_eq!(f.tensor_infos().len(), 236);
    let emb = f.tensor("token_embd.weight").unwrap();
    assert_eq!((emb.ty, emb.dims), (GgmlType::Q8_0, &[640u64, 262144][..]));
    assert_eq!(f.tensor("blk.0.attn_q_norm.weight").unwrap().dims, &[256]);
    let types: HashSet<GgmlType> = f.tensors().map(|t| t.ty).collect();
    let expected: HashSet<GgmlType> =
        [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q5_0, GgmlType::Q6K].into();
    assert_eq!(types, expected);
    // The SentencePiece tokenizer (tested in tokenizer_gemma.rs).
    let tok = unicorn_engine::tokenizer::Tokenizer::from_gguf(&f).expect("tokenizer");
    assert_eq!(tok.model_name(), "llama");
}
