//! Token ids, pieces and detokenized text must equal llama.cpp's, case by case, on the reference
//! files written by `scripts/make-reference.py` (`tests/data/reference/<key>/tokens.json`):
//! SmolLM2 (byte-level BPE) and Gemma 3 (SentencePiece).

mod common;

use serde_json::Value as Json;
use unicorn_engine::gguf::GgufFile;
use unicorn_engine::tokenizer::Tokenizer;

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

#[test]
fn smollm2_matches_llama_cpp_reference() {
    check_reference("smollm2", common::SMOLLM2, "gpt2");
}

#[test]
fn gemma3_matches_llama_cpp_reference() {
    check_reference("gemma3", common::GEMMA3, "llama");
}

/// Every case of `<key>/tokens.json` on the model file `file`, whose tokenizer is `model`.
fn check_reference(key: &str, file: &str, model: &str) {
    let ref_path = common::reference_path(&format!("{key}/tokens.json"));
    let text = std::fs::read_to_string(&ref_path).unwrap_or_else(|e| {
        panic!("{}: {e}; regenerate it with scripts/make-reference.py {key}", ref_path.display())
    });
    let reference: Json = serde_json::from_str(&text).expect("reference JSON");
    assert_eq!(reference["format"], "unicorn-reference-tokens");
    assert_eq!(reference["model"]["file"], file);
    let model_path = common::model_path(file);
    let gguf = GgufFile::open(&model_path).expect("open model");
    assert_eq!(
        Some(gguf.len()),
        reference["model"]["size"].as_u64(),
        "the cached model is not the file the reference was made from"
    );
    let tok = Tokenizer::from_gguf(&gguf).expect("tokenizer");
    assert_eq!(tok.model_name(), model);
    assert_eq!(Some(tok.n_vocab() as u64), reference["model"]["n_vocab"].as_u64());
    assert_eq!(Some(tok.add_bos()), reference["model"]["add_bos"].as_bool());
    assert_eq!(tok.bos().map(u64::from), reference["model"]["bos"].as_u64());
    assert_eq!(tok.eos().map(u64::from), reference["model"]["eos"].as_u64());

    let cases = reference["cases"].as_array().expect("cases");
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let input = case["text"].as_str().unwrap();
        let add_bos = case["add_bos"].as_bool().unwrap();
        let special = case["special"].as_bool().unwrap();
        let want: Vec<u32> =
            case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.tokenize(input, add_bos, special);
        if got != want {
            failures.push(format!("{name}: ids\n  got  {got:?}\n  want {want:?}"));
            continue;
        }
        let want_pieces: Vec<Vec<u8>> = case["pieces_hex"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| hex_decode(v.as_str().unwrap()))
            .collect();
        let got_pieces: Vec<Vec<u8>> =
            got.iter().map(|&id| tok.token_to_piece(id, true).unwrap().to_vec()).collect();
        if got_pieces != want_pieces {
            failures.push(format!("{name}: pieces differ"));
            continue;
        }
        // llama_detokenize(ids, remove_special = false, unparse_special = true).
        let want_detok = hex_decode(case["detok_hex"].as_str().expect("detok_hex"));
        let got_detok = tok.detokenize(&got, true).unwrap();
        if got_detok != want_detok {
            failures.push(format!(
                "{name}: detokenized {:?}, want {:?}",
                String::from_utf8_lossy(&got_detok),
                String::from_utf8_lossy(&want_detok)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from llama.cpp:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!("{key}: all {} llama.cpp reference cases match", cases.len());
}
