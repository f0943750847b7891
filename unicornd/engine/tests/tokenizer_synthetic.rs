//! The tokenizer on small vocabularies written here: merge order, special-token partitioning,
//! BOS/EOS, pieces, and the validation of tokenizer metadata.

use unicorn_engine::gguf::writer::GgufWriter;
use unicorn_engine::gguf::{Array, GgufError, GgufFile, Value};
use unicorn_engine::tokenizer::{Tokenizer, TokenizerError};

const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER: i32 = 4;

struct Spec<'a> {
    tokens: &'a [(&'a str, i32)],
    merges: &'a [&'a str],
    extra: Vec<(&'a str, Value)>,
}

fn build(spec: Spec<'_>) -> Result<Tokenizer, TokenizerError> {
    let mut kvs: Vec<(&str, Value)> = vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt-2".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(Array::String(spec.tokens.iter().map(|t| t.0.to_owned()).collect())),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(Array::I32(spec.tokens.iter().map(|t| t.1).collect())),
        ),
        (
            "tokenizer.ggml.merges",
            Value::Array(Array::String(spec.merges.iter().map(|m| m.to_string()).collect())),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ("tokenizer.ggml.eos_token_id", Value::U32(0)),
    ];
    for (k, v) in spec.extra {
        match kvs.iter_mut().find(|(key, _)| *key == k) {
            Some(slot) => slot.1 = v,
            None => kvs.push((k, v)),
        }
    }
    let mut w = GgufWriter::new();
    for (k, v) in kvs {
        w.kv(k, v);
    }
    let f = GgufFile::from_bytes(w.to_bytes()).expect("valid GGUF");
    Tokenizer::from_gguf(&f)
}

/// Tokens: 0 "<s>" control, 1 "a", 2 "b", 3 "ab", 4 "bb", 5 "aa", 6 "Ġ", 7 "Ġa", 8 "<|x|>"
/// control, 9 "bcd" user-defined, 10 "cb" user-defined, 11 "c", 12 "d", 13 "<|im_end|>" normal.
const TOKENS: &[(&str, i32)] = &[
    ("<s>", CONTROL),
    ("a", NORMAL),
    ("b", NORMAL),
    ("ab", NORMAL),
    ("bb", NORMAL),
    ("aa", NORMAL),
    ("Ġ", NORMAL),
    ("Ġa", NORMAL),
    ("<|x|>", CONTROL),
    ("bcd", USER),
    ("cb", USER),
    ("c", NORMAL),
    ("d", NORMAL),
    ("<|im_end|>", NORMAL),
];

fn tok(merges: &[&str]) -> Tokenizer {
    build(Spec { tokens: TOKENS, merges, extra: vec![] }).unwrap()
}

#[test]
fn lowest_rank_merges_first() {
    assert_eq!(tok(&["a b", "b b"]).tokenize("abb", false, false), [3, 2]);
    assert_eq!(tok(&["b b", "a b"]).tokenize("abb", false, false), [1, 4]);
    // Equal ranks: the leftmost pair merges first.
    assert_eq!(tok(&["a a"]).tokenize("aaa", false, false), [5, 1]);
    assert_eq!(tok(&["a a"]).tokenize("aaaa", false, false), [5, 5]);
    // The space is part of the byte alphabet ('Ġ').
    assert_eq!(tok(&["Ġ a"]).tokenize("b a", false, false), [2, 7]);
    // A duplicate merge keeps its first (lower) rank.
    assert_eq!(tok(&["a b", "b b", "a b"]).tokenize("abb", false, false), [3, 2]);
}

#[test]
fn bytes_without_a_token_are_dropped_like_llama_cpp() {
    let t = tok(&[]);
    // "e" is not in the vocabulary; neither are the byte characters of "é".
    assert_eq!(t.tokenize("aeb", false, false), [1, 2]);
    assert_eq!(t.tokenize("é", false, false), Vec::<u32>::new());
}

#[test]
fn special_tokens_longest_first_and_user_defined_always() {
    let t = tok(&["a b"]);
    // Control tokens need parse_special...
    assert_eq!(t.tokenize("<|x|>", false, true), [8]);
    assert!(!t.tokenize("<|x|>", false, false).contains(&8));
    // ...user-defined tokens do not.
    assert_eq!(t.tokenize("abcd", false, false), [1, 9]);
    // Longest first, not leftmost: "bcd" (3 bytes) is cut out before "cb" (2 bytes) is tried,
    // so "cbcd" is "c" + "bcd", not "cb" + "c" + "d".
    assert_eq!(t.tokenize("cbcd", false, true), [11, 9]);
    assert_eq!(t.tokenize("cb", false, false), [10]);
    assert_eq!(t.tokenize("xcbc", false, false), [10, 11]);
    // Occurrences are found left to right without overlap.
    assert_eq!(t.tokenize("bcdbcd", false, false), [9, 9]);
}

#[test]
fn bos_and_eos_follow_metadata() {
    let plain = tok(&[]);
    assert!(!plain.add_bos() && !plain.add_eos());
    assert_eq!(plain.tokenize("a", true, false), [1]);
    let t = build(Spec {
        tokens: TOKENS,
        merges: &[],
        extra: vec![
            ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
            ("tokenizer.ggml.add_eos_token", Value::Bool(true)),
            ("tokenizer.ggml.eos_token_id", Value::U32(8)),
        ],
    })
    .unwrap();
    assert_eq!(t.tokenize("a", true, false), [0, 1, 8]);
    assert_eq!(t.tokenize("a", false, false), [1]);
    assert_eq!(t.tokenize("", true, false), [0, 8]);
    assert!(t.is_eog(8));
}

#[test]
fn pieces_and_control_detection() {
    let t = tok(&[]);
    assert_eq!(t.token_to_piece(7, false).unwrap(), b" a");
    assert_eq!(t.token_to_piece(8, true).unwrap(), b"<|x|>");
    assert_eq!(t.token_to_piece(8, false).unwrap(), b"");
    assert_eq!(t.token_to_piece(9, false).unwrap(), b"bcd"); // user-defined: always shown
                                                             // "<|im_end|>" is typed normal, but llama.cpp treats it as a control, end-of-generation
                                                             // token because of its text.
    assert!(t.is_control(13).unwrap());
    assert!(t.is_eog(13));
    assert_eq!(t.special_tokens().eot, Some(13));
    assert_eq!(t.tokenize("<|im_end|>", false, true), [13]);
    assert_eq!(t.token_to_piece(13, false).unwrap(), b"");
    assert!(matches!(
        t.token_to_piece(14, true),
        Err(TokenizerError::InvalidToken { id: 14, n_vocab: 14 })
    ));
}

#[test]
fn empty_token_text_never_matches() {
    let t = build(Spec {
        tokens: &[("<s>", CONTROL), ("", CONTROL), ("a", NORMAL)],
        merges: &[],
        extra: vec![],
    })
    .unwrap();
    assert_eq!(t.token_text(1).unwrap(), "[EMPTY_1]");
    assert_eq!(t.tokenize("a", false, true), [2]);
}

#[test]
fn metadata_is_validated() {
    let with =
        |extra: Vec<(&'static str, Value)>| build(Spec { tokens: TOKENS, merges: &[], extra });
    let mut w = GgufWriter::new();
    w.kv("tokenizer.ggml.model", Value::String("t5".into()));
    let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
    assert!(
        matches!(Tokenizer::from_gguf(&f), Err(TokenizerError::UnsupportedModel(m)) if m == "t5")
    );

    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::String("x".into()));
    let f = GgufFile::from_bytes(w.to_bytes()).unwrap();
    match Tokenizer::from_gguf(&f) {
        Err(TokenizerError::Metadata(GgufError::MissingKey(k))) => {
            assert_eq!(k, "tokenizer.ggml.model")
        }
        r => panic!("{r:?}"),
    }

    let raw = |kvs: Vec<(&str, Value)>| {
        let mut w = GgufWriter::new();
        for (k, v) in kvs {
            w.kv(k, v);
        }
        Tokenizer::from_gguf(&GgufFile::from_bytes(w.to_bytes()).unwrap())
    };
    let model = ("tokenizer.ggml.model", Value::String("gpt2".into()));
    let tokens = |n: usize| {
        (
            "tokenizer.ggml.tokens",
            Value::Array(Array::String((0..n).map(|i| format!("t{i}")).collect())),
        )
    };
    let merges = ("tokenizer.ggml.merges", Value::Array(Array::String(vec![])));
    let err = raw(vec![
        model.clone(),
        ("tokenizer.ggml.pre", Value::String("nonsense".into())),
        tokens(20),
        merges.clone(),
    ]);
    assert!(matches!(err, Err(TokenizerError::UnknownPreTokenizer(p)) if p == "nonsense"));
    let err = raw(vec![model.clone(), tokens(0), merges.clone()]);
    assert!(matches!(err, Err(TokenizerError::EmptyVocab)));
    let err = raw(vec![
        model.clone(),
        ("tokenizer.ggml.tokens", Value::Array(Array::I32(vec![1]))),
        merges.clone(),
    ]);
    assert!(matches!(err, Err(TokenizerError::Metadata(GgufError::WrongType { .. }))));
    let err = raw(vec![model.clone(), tokens(20)]);
    assert!(
        matches!(err, Err(TokenizerError::Metadata(GgufError::MissingKey(k))) if k == "tokenizer.ggml.merges")
    );
    let err = raw(vec![
        model.clone(),
        tokens(20),
        ("tokenizer.ggml.token_type", Value::Array(Array::I32(vec![1; 19]))),
        merges.clone(),
    ]);
    assert!(matches!(err, Err(TokenizerError::ShortArray { found: 19, n_vocab: 20, .. })));
    let err = raw(vec![
        model.clone(),
        tokens(20),
        ("tokenizer.ggml.scores", Value::Array(Array::F32(vec![0.0; 3]))),
        merges.clone(),
    ]);
    assert!(matches!(err, Err(TokenizerError::ShortArray { found: 3, .. })));
    // A BOS id outside the vocabulary is ignored; the gpt2 default (11) is used instead.
    let t = raw(vec![
        model.clone(),
        tokens(20),
        merges.clone(),
        ("tokenizer.ggml.bos_token_id", Value::U32(1000)),
    ])
    .unwrap();
    assert_eq!(t.bos(), Some(11));
    // ...but a tokenizer that must add BOS and has none is an error.
    let err = raw(vec![
        model.clone(),
        tokens(5),
        merges.clone(),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
    ]);
    assert!(matches!(err, Err(TokenizerError::MissingSpecial { what: "BOS" })));
    // Wrong types name the key.
    let err = with(vec![("tokenizer.ggml.add_bos_token", Value::U8(1))]).unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.add_bos_token"), "{err}");
}

#[test]
fn shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Tokenizer>();
    send_sync::<GgufFile>();
    let t = std::sync::Arc::new(tok(&["a b"]));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let t = t.clone();
            std::thread::spawn(move || t.tokenize("ab ab", false, false))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), [3, 6, 3]);
    }
}
