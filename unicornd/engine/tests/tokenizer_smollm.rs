//! The tokenizer on the real SmolLM2 vocabulary: hand-checked cases, special tokens, pieces,
//! streaming, round trips and speed.

mod common;

use std::sync::OnceLock;
use std::time::Instant;

use proptest::prelude::*;
use unicorn_engine::gguf::GgufFile;
use unicorn_engine::tokenizer::{PreTokenizer, TokenType, Tokenizer, TokenizerError};

fn tok() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let f = GgufFile::open(common::model_path(common::SMOLLM2)).expect("model");
        Tokenizer::from_gguf(&f).expect("tokenizer")
    })
}

fn pieces(ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&id| String::from_utf8_lossy(tok().token_to_piece(id, true).unwrap()).into_owned())
        .collect()
}

#[test]
fn vocabulary_and_special_ids() {
    let t = tok();
    assert_eq!(t.model_name(), "gpt2");
    assert_eq!(t.pre_tokenizer(), PreTokenizer::Smollm);
    assert_eq!(t.n_vocab(), 49152);
    assert_eq!(t.bos(), Some(1));
    assert_eq!(t.eos(), Some(2));
    assert_eq!(t.special_tokens().pad, Some(2));
    assert_eq!(t.special_tokens().unk, Some(0));
    assert!(!t.add_bos());
    assert!(!t.add_eos());
    assert_eq!(t.token_text(1).unwrap(), "<|im_start|>");
    assert_eq!(t.token_text(2).unwrap(), "<|im_end|>");
    assert_eq!(t.token_type(1).unwrap(), TokenType::Control);
    assert_eq!(t.token_id("<|im_end|>"), Some(2));
    // <|endoftext|> and <|im_end|> end generation; <|im_start|> does not.
    assert!(t.is_eog(0) && t.is_eog(2) && !t.is_eog(1));
    assert!(matches!(
        t.token_text(49152),
        Err(TokenizerError::InvalidToken { id: 49152, n_vocab: 49152 })
    ));
}

#[test]
fn hand_checked_tokenizations() {
    let t = tok();
    let ids = t.tokenize("Hello world", false, false);
    assert_eq!(pieces(&ids), ["Hello", " world"]);
    assert_eq!(t.token_text(ids[1]).unwrap(), "Ġworld");
    // smollm isolates every digit, so a number is one token per digit.
    let ids = t.tokenize("In 2024", false, false);
    assert_eq!(pieces(&ids), ["In", " ", "2", "0", "2", "4"]);
    // Contractions are their own words (lower case only, in GPT-2's pattern).
    assert_eq!(pieces(&t.tokenize("don't", false, false)), ["don", "'t"]);
    // Two spaces before a word: the first stays alone, the second leads the word.
    assert_eq!(pieces(&t.tokenize("a  b", false, false)), ["a", " ", " b"]);
    assert_eq!(t.tokenize("", true, true), Vec::<u32>::new());
}

#[test]
fn special_tokens_only_with_parse_special() {
    let t = tok();
    let text = "<|im_start|>user\nhi<|im_end|>";
    let ids = t.tokenize(text, false, true);
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(pieces(&ids).concat(), text);
    let plain = t.tokenize(text, false, false);
    assert!(!plain.contains(&1) && !plain.contains(&2));
    assert_eq!(pieces(&plain).concat(), text);
    // add_special does not add BOS: SmolLM2's add_bos_token is false.
    assert_eq!(t.tokenize("hi", true, false), t.tokenize("hi", false, false));
    // Control tokens render as nothing without `special`.
    assert_eq!(t.token_to_piece(1, false).unwrap(), b"");
    assert_eq!(t.token_to_piece(1, true).unwrap(), b"<|im_start|>");
    assert_eq!(t.detokenize(&ids, false).unwrap(), b"user\nhi");
}

#[test]
fn streaming_holds_back_partial_characters() {
    let t = tok();
    let text = "I love 🦀 and 你好";
    let ids = t.tokenize(text, false, false);
    // The crab is split into byte tokens that are not UTF-8 on their own.
    assert!(ids
        .iter()
        .any(|&id| std::str::from_utf8(t.token_to_piece(id, true).unwrap()).is_err()));
    let mut d = t.stream_decoder(false);
    let mut out = String::new();
    for &id in &ids {
        let chunk = d.push(id).unwrap();
        assert!(!chunk.contains('\u{FFFD}'), "emitted a partial character");
        out.push_str(&chunk);
    }
    assert!(d.pending().is_empty());
    assert_eq!(out + &d.finish(), text);
    assert!(d.push(60000).is_err());
}

#[test]
fn tokenizing_100kb_is_fast() {
    let t = tok();
    let gpl = std::fs::read_to_string(common::reference_path("texts/GPL-3.txt")).unwrap();
    // Varied text: the licence, plus the same words shuffled into new lines so the per-call
    // word cache does not make it trivial.
    let mut text = gpl.clone();
    let words: Vec<&str> = gpl.split_whitespace().collect();
    let mut i = 0usize;
    while text.len() < 100_000 {
        text.push_str(words[(i * 7919) % words.len()]);
        text.push(if i.is_multiple_of(13) { '\n' } else { ' ' });
        i += 1;
    }
    let start = Instant::now();
    let ids = t.tokenize(&text, false, false);
    let elapsed = start.elapsed();
    eprintln!("{} bytes -> {} tokens in {elapsed:?}", text.len(), ids.len());
    assert_eq!(t.detokenize(&ids, true).unwrap(), text.as_bytes());
    // Generous even for an unoptimised build; release builds take tens of milliseconds.
    assert!(elapsed.as_secs_f64() < 1.0, "took {elapsed:?}");
}

#[test]
fn licence_text_has_llama_cpp_token_count() {
    // perplexity.json records llama.cpp's token count for the whole file.
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::reference_path("smollm2/perplexity.json")).unwrap(),
    )
    .unwrap();
    let gpl = std::fs::read_to_string(common::reference_path("texts/GPL-3.txt")).unwrap();
    let n = reference["text"]["n_tokens"].as_u64().unwrap();
    assert_eq!(tok().tokenize(&gpl, false, false).len() as u64, n);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Byte-level BPE loses nothing: pieces concatenate back to the input.
    #[test]
    fn round_trips_any_text(s in "\\PC{0,40}|[ \\t\\n\\r\\u{a0}\\u{3000}a-z0-9'!.]{0,40}") {
        let t = tok();
        let ids = t.tokenize(&s, false, false);
        prop_assert_eq!(t.detokenize(&ids, true).unwrap(), s.as_bytes());
        let mut d = t.stream_decoder(true);
        let mut out = String::new();
        for id in ids {
            out.push_str(&d.push(id).unwrap());
        }
        prop_assert_eq!(out + &d.finish(), s);
    }
}
