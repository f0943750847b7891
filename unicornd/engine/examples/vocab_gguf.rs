//! Write a tensor-less copy of a GGUF file's metadata, optionally with another
//! `tokenizer.ggml.pre`: `cargo run --example vocab_gguf -- SRC OUT [PRE]`.
//!
//! Used by `scripts/make-pretok-reference.py` to have llama.cpp (loaded with `vocab_only`)
//! tokenize with each pre-tokenizer over a real vocabulary.

use unicorn_engine::gguf::writer::GgufWriter;
use unicorn_engine::gguf::{GgufFile, Value};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (src, out) = match (args.first(), args.get(1)) {
        (Some(s), Some(o)) => (s, o),
        _ => {
            eprintln!("usage: vocab_gguf SRC OUT [PRE]");
            std::process::exit(2);
        }
    };
    let f = GgufFile::open(src).unwrap_or_else(|e| panic!("{src}: {e}"));
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata().iter() {
        match (k, args.get(2)) {
            ("tokenizer.ggml.pre", Some(pre)) => w.kv(k, Value::String(pre.clone())),
            _ => w.kv(k, v.clone()),
        };
    }
    std::fs::write(out, w.to_bytes()).unwrap_or_else(|e| panic!("{out}: {e}"));
}
