//! Every BPE pre-tokenizer against llama.cpp: SmolLM2's vocabulary and merges with
//! `tokenizer.ggml.pre` replaced, on a seeded corpus of awkward strings (odd white space,
//! digits of many scripts, marks, controls, unassigned code points, emoji, contractions,
//! special-token text). Reference written by `scripts/make-pretok-reference.py`.

mod common;

use serde_json::Value as Json;
use unicorn_engine::gguf::writer::GgufWriter;
use unicorn_engine::gguf::{GgufFile, Value};
use unicorn_engine::tokenizer::{PreTokenizer, Tokenizer};

fn tokenizer_with_pre(model: &GgufFile, pre: &str) -> Tokenizer {
    let mut w = GgufWriter::new();
    for (k, v) in model.metadata().iter() {
        if k == "tokenizer.ggml.pre" {
            w.kv(k, Value::String(pre.to_owned()));
        } else {
            w.kv(k, v.clone());
        }
    }
    let vocab = GgufFile::from_bytes(w.to_bytes()).expect("re-parse");
    Tokenizer::from_gguf(&vocab).expect("tokenizer")
}

#[test]
fn all_pre_tokenizers_match_llama_cpp() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/pretok_reference.json");
    let reference: Json =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("reference file")).unwrap();
    let model = GgufFile::open(common::model_path(common::SMOLLM2)).expect("model");
    let texts: Vec<&str> =
        reference["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let pres = reference["pre"].as_object().unwrap();
    assert_eq!(pres.len(), 5);
    let mut failures = Vec::new();
    let mut compared = 0;
    for (pre, modes) in pres {
        let tok = tokenizer_with_pre(&model, pre);
        let expected_kind = match pre.as_str() {
            "smollm" => PreTokenizer::Smollm,
            "gpt-2" => PreTokenizer::Gpt2,
            "default" => PreTokenizer::Default,
            "llama-bpe" => PreTokenizer::Llama3,
            "qwen2" => PreTokenizer::Qwen2,
            other => panic!("unexpected pre-tokenizer {other}"),
        };
        assert_eq!(tok.pre_tokenizer(), expected_kind);
        for (mode, special) in [("plain", false), ("special", true)] {
            let rows = modes[mode].as_array().unwrap();
            assert_eq!(rows.len(), texts.len());
            for (text, want) in texts.iter().zip(rows) {
                let want: Vec<u32> =
                    want.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
                let got = tok.tokenize(text, false, special);
                compared += 1;
                if got != want {
                    failures
                        .push(format!("{pre}/{mode} {text:?}\n  got  {got:?}\n  want {want:?}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {compared} tokenizations differ from llama.cpp:\n{}",
        failures.len(),
        failures.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    eprintln!("{compared} tokenizations match llama.cpp");
}

use std::path::PathBuf;
