//! The SentencePiece tokenizer (`tokenizer.ggml.model = llama`) on small vocabularies written
//! here: merge order by score, byte fallback, the dummy-prefix space, BOS/EOS defaults,
//! special tokens, pieces and detokenization rules.

use unicorn_engine::gguf::writer::GgufWriter;
use unicorn_engine::gguf::{Array, GgufFile, Value};
use unicorn_engine::tokenizer::{PreTokenizer, TokenType, Tokenizer, TokenizerError};

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// Tokens (text, type, score).
type Tokens<'a> = &'a [(&'a str, i32, f32)];

fn build(tokens: Tokens<'_>, extra: Vec<(&str, Value)>) -> Result<Tokenizer, TokenizerError> {
    let mut kvs: Vec<(&str, Value)> = vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(Array::String(tokens.iter().map(|t| t.0.to_owned()).collect())),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(Array::I32(tokens.iter().map(|t| t.1).collect())),
        ),
        ("tokenizer.ggml.scores", Value::Array(Array::F32(tokens.iter().map(|t| t.2).collect()))),
    ];
    for (k, v) in extra {
        match kvs.iter_mut().find(|(key, _)| *key == k) {
            Some(slot) => slot.1 = v,
            None => kvs.push((k, v)),
        }
    }
    let mut w = GgufWriter::new();
    for (k, v) in kvs {
        w.kv(k, v);
    }
    Tokenizer::from_gguf(&GgufFile::from_bytes(w.to_bytes()).expect("valid GGUF"))
}

const TOKENS: Tokens<'static> = &[
    ("<unk>", UNKNOWN, 0.0),    // 0
    ("<s>", CONTROL, 0.0),      // 1
    ("</s>", CONTROL, 0.0),     // 2
    ("▁", NORMAL, -1.0),        // 3
    ("a", NORMAL, -2.0),        // 4
    ("b", NORMAL, -2.0),        // 5
    ("c", NORMAL, -2.0),        // 6
    ("ab", NORMAL, -3.0),       // 7
    ("bc", NORMAL, -1.0),       // 8
    ("aa", NORMAL, -1.0),       // 9
    ("▁a", NORMAL, -0.5),       // 10
    ("<0xC3>", BYTE, 0.0),      // 11
    ("<0xA9>", BYTE, 0.0),      // 12
    ("<|x|>", USER, 0.0),       // 13
    ("▁▁", NORMAL, -0.1),       // 14
    ("<unused0>", UNUSED, 0.0), // 15
];

/// The vocabulary above, without the dummy prefix.
fn plain() -> Tokenizer {
    build(TOKENS, vec![("tokenizer.ggml.add_space_prefix", Value::Bool(false))]).unwrap()
}

/// The vocabulary above with token `id`'s score replaced.
fn rescored(id: usize, score: f32) -> Tokenizer {
    let mut tokens = TOKENS.to_vec();
    tokens[id].2 = score;
    build(&tokens, vec![("tokenizer.ggml.add_space_prefix", Value::Bool(false))]).unwrap()
}

#[test]
fn highest_score_merges_first() {
    let t = plain();
    // "bc" (-1) outscores "ab" (-3).
    assert_eq!(t.tokenize("abc", false, false), [4, 8]);
    assert_eq!(rescored(7, -0.5).tokenize("abc", false, false), [7, 6]);
    // Equal scores: the leftmost pair merges first.
    assert_eq!(t.tokenize("aaa", false, false), [9, 4]);
    assert_eq!(t.tokenize("aaaa", false, false), [9, 9]);
    assert_eq!(rescored(7, -1.0).tokenize("abc", false, false), [7, 6]);
    // -0.0 and 0.0 are equal scores, as in C++: leftmost again.
    let mut tokens = TOKENS.to_vec();
    tokens[7].2 = 0.0;
    tokens[8].2 = -0.0;
    let t0 = build(&tokens, vec![("tokenizer.ggml.add_space_prefix", Value::Bool(false))]);
    assert_eq!(t0.unwrap().tokenize("abc", false, false), [7, 6]);
    // A merged symbol merges on with its neighbours: "▁" + "▁" first (-0.1), then nothing.
    assert_eq!(t.tokenize("  a", false, false), [14, 4]);
    assert_eq!(t.tokenize(" a", false, false), [10]);
}

#[test]
fn byte_fallback_then_unknown() {
    let t = plain();
    // 'é' is not a token: its bytes C3 A9 are.
    assert_eq!(t.tokenize("é", false, false), [11, 12]);
    assert_eq!(t.tokenize("aéa", false, false), [4, 11, 12, 4]);
    // 'q' has neither a token nor a byte token: unknown (llama.cpp would throw).
    assert_eq!(t.tokenize("qé", false, false), [0, 11, 12]);
    // Byte tokens render as their byte.
    assert_eq!(t.detokenize(&[11, 12], false).unwrap(), "é".as_bytes());
    assert_eq!(t.token_to_piece(11, false).unwrap(), [0xC3]);
    assert_eq!(t.token_type(11).unwrap(), TokenType::Byte);
}

#[test]
fn space_prefix_defaults_on_and_follows_special_tokens() {
    let t = build(TOKENS, vec![]).unwrap();
    assert!(t.add_space_prefix() && t.add_bos() && !t.add_eos());
    assert_eq!(t.pre_tokenizer(), PreTokenizer::Default);
    assert_eq!((t.bos(), t.eos(), t.special_tokens().unk), (Some(1), Some(2), Some(0)));
    assert_eq!(t.tokenize("a", false, false), [10]);
    assert_eq!(t.tokenize("a", true, false), [1, 10]);
    assert_eq!(t.tokenize("a a", false, false), [10, 10]);
    // A leading space doubles up with the prefix.
    assert_eq!(t.tokenize(" a", false, false), [14, 4]);
    // After a special token (control or user-defined) the fragment gets a prefix again.
    assert_eq!(t.tokenize("<s>a", false, true), [1, 10]);
    assert_eq!(t.tokenize("a<|x|>a", false, false), [10, 13, 10]);
    // Without parse_special, "<s>" is text (and the prefix goes before it).
    assert_eq!(t.tokenize("<s>", false, false)[0], 3);
    assert_eq!(t.tokenize("", true, false), [1]);
    assert_eq!(t.tokenize("", false, false), Vec::<u32>::new());

    // Detokenization strips the space of the first piece only.
    assert_eq!(t.detokenize(&[10, 10], false).unwrap(), b"a a");
    assert_eq!(t.detokenize(&[14, 4], false).unwrap(), b" a");
    assert_eq!(t.detokenize(&[1, 10], true).unwrap(), b"<s> a");
    // The first token is stripped even when it renders as nothing: the next one is not.
    assert_eq!(t.detokenize(&[1, 10], false).unwrap(), b" a");
    assert_eq!(t.detokenize_with(&[1, 10], true, true).unwrap(), b" a");
    assert_eq!(t.detokenize_with(&[10, 2], true, true).unwrap(), b"a</s>");
}

#[test]
fn bos_eos_and_metadata() {
    let t = build(
        TOKENS,
        vec![
            ("tokenizer.ggml.add_eos_token", Value::Bool(true)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
            // llama.cpp ignores the pre-tokenizer of a SentencePiece model.
            ("tokenizer.ggml.pre", Value::String("nonsense".into())),
        ],
    )
    .unwrap();
    assert_eq!(t.tokenize("a", true, false), [10, 2]);
    assert_eq!(t.detokenize_with(&[10, 2], true, true).unwrap(), b"a");
    assert!(t.is_eog(2));

    // The defaults (BOS 1, EOS 2) outside a one-token vocabulary: adding BOS is impossible.
    let err = build(&TOKENS[..1], vec![]).unwrap_err();
    assert!(matches!(err, TokenizerError::MissingSpecial { what: "BOS" }), "{err}");
    let one = build(&TOKENS[..1], vec![("tokenizer.ggml.add_bos_token", Value::Bool(false))]);
    let one = one.unwrap();
    assert_eq!((one.bos(), one.eos(), one.special_tokens().unk), (None, None, Some(0)));
    // No merges are needed; scores are optional (all 0).
    let mut w = GgufWriter::new();
    w.kv("tokenizer.ggml.model", Value::String("llama".into()));
    w.kv("tokenizer.ggml.tokens", Value::Array(Array::String(vec!["x".into(), "y".into()])));
    w.kv("tokenizer.ggml.add_bos_token", Value::Bool(false));
    w.kv("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    let t = Tokenizer::from_gguf(&GgufFile::from_bytes(w.to_bytes()).unwrap()).unwrap();
    assert_eq!(t.tokenize("yx", false, false), [1, 0]);
    // Wrong types name the key.
    let err = build(TOKENS, vec![("tokenizer.ggml.add_space_prefix", Value::U8(1))]).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.add_space_prefix"), "{err}");
}

#[test]
fn pieces_by_token_type() {
    let t = plain();
    assert_eq!(t.token_to_piece(10, false).unwrap(), b" a");
    assert_eq!(t.token_to_piece(14, false).unwrap(), b"  ");
    assert_eq!(t.token_to_piece(1, true).unwrap(), b"<s>");
    assert_eq!(t.token_to_piece(1, false).unwrap(), b"");
    assert_eq!(t.token_to_piece(0, true).unwrap(), b"<unk>");
    assert_eq!(t.token_to_piece(0, false).unwrap(), b"");
    assert_eq!(t.token_to_piece(13, false).unwrap(), b"<|x|>");
    // Unused tokens render as nothing, even with `special`.
    assert_eq!(t.token_to_piece(15, true).unwrap(), b"");
}

#[test]
fn odd_scores_and_texts_do_not_panic() {
    let mut tokens = TOKENS.to_vec();
    tokens[8].2 = f32::NAN;
    tokens[9].2 = f32::INFINITY;
    tokens[7].2 = f32::NEG_INFINITY;
    let t = build(&tokens, vec![]).unwrap();
    for text in ["abc", "aaaa", "", " ", "é\0q<s><|x|>", "▁▁▁", "🦀 bc ab"] {
        for (add, special) in [(false, false), (true, true)] {
            let ids = t.tokenize(text, add, special);
            assert!(ids.iter().all(|&id| (id as usize) < t.n_vocab()));
            t.detokenize(&ids, true).unwrap();
        }
    }
    // An infinite score merges first; NaN ranks below everything.
    assert_eq!(rescored(9, f32::INFINITY).tokenize("aaa", false, false), [9, 4]);
    assert_eq!(rescored(8, f32::NAN).tokenize("abc", false, false), [7, 6]);
}
