//! Tokenize JSON strings with a GGUF file's tokenizer:
//! `cargo run --release --example tokenize -- MODEL.gguf < texts.json` prints one JSON array of
//! ids per input string (the input is a JSON array of strings). `--special` parses special
//! tokens; `--add-special` adds BOS/EOS as the model asks.

use std::io::Read;

use unicorn_engine::gguf::GgufFile;
use unicorn_engine::tokenizer::Tokenizer;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.iter().find(|a| !a.starts_with("--")).expect("usage: tokenize MODEL.gguf");
    let special = args.iter().any(|a| a == "--special");
    let add_special = args.iter().any(|a| a == "--add-special");
    let f = GgufFile::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let tok = Tokenizer::from_gguf(&f).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).expect("stdin");
    let texts: Vec<String> = serde_json::from_str(&input).expect("a JSON array of strings");
    for t in texts {
        let start = std::time::Instant::now();
        let ids = tok.tokenize(&t, add_special, special);
        let elapsed = start.elapsed();
        eprintln!("{} bytes -> {} tokens in {elapsed:?}", t.len(), ids.len());
        println!("{}", serde_json::to_string(&ids).unwrap());
    }
}
