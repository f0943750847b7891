//! Token ids and pieces must equal llama.cpp's, case by case, on the reference file written by
//! `scripts/make-reference.py` (`tests/data/reference/smollm2/tokens.json`).

mod common;

use serde_json::Value as Json;
use unicorn_engine::gguf::GgufFile;
use unicorn_engine::tokenizer::Tokenizer;

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

#[test]
fn smollm2_matches_llama_cpp_reference() {
    let ref_path = common::reference_path("smollm2/tokens.json");
    let text = std::fs::read_to_string(&ref_path).unwrap_or_else(|e| {
        panic!("{}: {e}; regenerate it with scripts/make-reference.py smollm2", ref_path.display())
    });
    let reference: Json = serde_json::from_str(&text).expect("reference JSON");
    assert_eq!(reference["format"], "unicorn-reference-tokens");
    let model_path = common::model_path(common::SMOLLM2);
    let gguf = GgufFile::open(&model_path).expect("open model");
    assert_eq!(
        Some(gguf.len()),
        reference["model"]["size"].as_u64(),
        "the cached model is not the file the reference was made from"
    );
    let tok = Tokenizer::from_gguf(&gguf).expect("tokenizer");
    assert_eq!(Some(tok.n_vocab() as u64), reference["model"]["n_vocab"].as_u64());
    assert_eq!(Some(tok.add_bos()), reference["model"]["add_bos"].as_bool());

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
        if let Some(detok) = case["detok_hex"].as_str() {
            let got = tok.detokenize(&got, true).unwrap();
            if got != hex_decode(detok) {
                failures.push(format!(
                    "{name}: detokenized {:?}, want {:?}",
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&hex_decode(detok))
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from llama.cpp:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!("all {} llama.cpp reference cases match", cases.len());
}
