//! The forward pass against llama.cpp on the real models: logits on the same token sequences
//! (teacher forcing over the peer's greedy continuations), the free-running greedy continuation
//! up to the first near tie, and perplexity. The reference data is in
//! `tests/data/reference/<model>/` (see its README for how it was made: llama.cpp 0.3.36, flash
//! attention off).
//!
//! - SmolLM2-135M-Instruct Q4_1 (`llama`, byte-level BPE);
//! - Gemma 3 270M Q4_K_M (`gemma3`, SentencePiece, k-quants).

mod common;

use serde_json::Value;
use unicorn_engine::gguf::GgufFile;
use unicorn_engine::model::{KvType, Logits, Model, Seq};
use unicorn_kernels::ThreadPool;

/// A model whose checks run against its reference data.
struct Case {
    key: &'static str,
    file: &'static str,
}

const SMOLLM2: Case = Case { key: "smollm2", file: common::SMOLLM2 };
const GEMMA3: Case = Case { key: "gemma3", file: common::GEMMA3 };

/// A logit may differ from llama.cpp's by `ATOL + RTOL * |logit|`. The absolute part is below
/// llama.cpp's own difference between its flash attention on and off on these prompts
/// (`peer_variation` in greedy.json: 2.64 for SmolLM2, 3.02 for Gemma 3). The relative part
/// covers positions where every logit is extreme: rounding errors grow with the values, and at
/// Gemma's second position of the chat prompt the logits are near -64 instead of the usual
/// 15 to 25 (unicorn differs by 4.2 there, llama.cpp from itself by 1.6).
const ATOL: f32 = 2.0;
const RTOL: f32 = 0.05;

/// How far `ours` is from `peer`, as a fraction of the allowed difference.
fn excess(ours: f32, peer: f32) -> f32 {
    (ours - peer).abs() / (ATOL + RTOL * peer.abs())
}

fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn reference(case: &Case, name: &str) -> Value {
    let path = repo().join("tests/data/reference").join(case.key).join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn load(case: &Case) -> Model {
    let reference = reference(case, "greedy.json");
    let model = Model::load(GgufFile::open(common::model_path(case.file)).unwrap()).unwrap();
    assert_eq!(
        model.file_bytes(),
        reference["model"]["size"].as_u64().unwrap(),
        "not the reference's model file"
    );
    model
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a))).unwrap()
}

/// Logits of every token of `seq` in a fresh context, computed `chunk` tokens at a time (a
/// 262,144-entry vocabulary makes one row a megabyte).
fn all_logits(
    model: &Model,
    pool: &ThreadPool,
    seq: &[u32],
    chunk: usize,
    mut each: impl FnMut(usize, &[f32]),
) {
    let n_vocab = model.hparams().n_vocab;
    let mut kv = model.new_state(seq.len() + 8, KvType::F16).unwrap();
    let mut logits = Vec::new();
    for (c, part) in seq.chunks(chunk).enumerate() {
        model
            .forward(
                pool,
                &mut [Seq { kv: &mut kv, tokens: part, logits: Logits::All }],
                &mut logits,
            )
            .unwrap();
        assert_eq!(logits.len(), part.len() * n_vocab);
        for (i, row) in logits.chunks_exact(n_vocab).enumerate() {
            each(c * chunk + i, row);
        }
    }
}

/// A top-1 choice counts when llama.cpp's own top-2 margin is at least this: the peer's two
/// attention implementations (flash attention on and off) disagree on choices with margins
/// below it (see `peer_variation` in greedy.json).
const CLEAR_MARGIN: f64 = 0.5;
/// A near tie for the free-running comparison: below this margin llama.cpp's choice is not
/// stable across its own settings (its teacher-forced argmax and its token-by-token greedy
/// choice already disagree at such margins), and unicorn's top-1 disagreements with it on these
/// prompts all lie below 0.21.
const NEAR_TIE: f64 = 0.25;

fn teacher_forced(case: &Case) {
    let reference = reference(case, "greedy.json");
    let model = load(case);
    let pool = ThreadPool::new(2);
    let n_vocab = model.hparams().n_vocab;
    let mut checked = 0;
    for p in reference["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let mut seq = ids(&p["prompt_ids"]);
        seq.extend(ids(&p["continuation_ids"]));
        let positions = p["positions"].as_array().unwrap();
        let fulls: Vec<(usize, Vec<f32>)> = p["full_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let bytes = base64_decode(f["f32le_base64"].as_str().unwrap());
                let row = bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                (f["pos"].as_u64().unwrap() as usize, row)
            })
            .collect();
        let mut worst = 0.0f32;
        let mut worst_excess = 0.0f32;
        all_logits(&model, &pool, &seq, 64, |pos, ours| {
            let row = &positions[pos];
            assert_eq!(row["pos"].as_u64().unwrap() as usize, pos);
            if row["margin"].as_f64().unwrap() >= CLEAR_MARGIN {
                let peer_top = row["top2_ids"][0].as_u64().unwrap() as usize;
                assert_eq!(argmax(ours), peer_top, "{name}: top-1 differs at position {pos}");
                checked += 1;
            }
            for pair in row["top16"].as_array().unwrap() {
                let (id, l) =
                    (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
                worst = worst.max((ours[id] - l).abs());
                worst_excess = worst_excess.max(excess(ours[id], l));
            }
            for (fpos, peer) in &fulls {
                if *fpos == pos {
                    assert_eq!(peer.len(), n_vocab);
                    for (&a, &b) in ours.iter().zip(peer) {
                        worst = worst.max((a - b).abs());
                        worst_excess = worst_excess.max(excess(a, b));
                    }
                }
            }
        });
        eprintln!(
            "{} {name}: largest logit difference {worst:.3} ({:.0}% of the allowed difference)",
            case.key,
            worst_excess * 100.0
        );
        assert!(
            worst_excess <= 1.0,
            "{name}: logits differ beyond {ATOL} + {RTOL} * |logit| (largest difference {worst})"
        );
    }
    assert!(checked > 100, "only {checked} positions had a clear margin");
}

fn greedy(case: &Case) {
    let reference = reference(case, "greedy.json");
    let model = load(case);
    let pool = ThreadPool::new(2);
    let mut total = 0;
    for p in reference["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let prompt = ids(&p["prompt_ids"]);
        let peer = ids(&p["continuation_ids"]);
        let positions = p["positions"].as_array().unwrap();
        // The continuation is comparable until the peer's choice was a near tie.
        let comparable = (0..peer.len())
            .take_while(|&i| {
                positions[prompt.len() - 1 + i]["margin"].as_f64().unwrap() >= NEAR_TIE
            })
            .count();
        let mut kv = model.new_state(prompt.len() + peer.len(), KvType::F16).unwrap();
        let mut logits = Vec::new();
        let mut next = prompt.clone();
        let mut ours = Vec::new();
        // Token by token after the prompt: this exercises the KV cache across calls.
        while ours.len() < comparable {
            model
                .forward(
                    &pool,
                    &mut [Seq { kv: &mut kv, tokens: &next, logits: Logits::Last }],
                    &mut logits,
                )
                .unwrap();
            let t = argmax(&logits) as u32;
            ours.push(t);
            next = vec![t];
        }
        assert_eq!(ours, peer[..comparable], "{name}: greedy continuation differs");
        eprintln!(
            "{} {name}: {comparable} of {} greedy tokens compared and equal",
            case.key,
            peer.len()
        );
        total += comparable;
    }
    assert!(total >= 30, "only {total} greedy tokens were comparable");
}

fn perplexity(case: &Case) {
    let reference = reference(case, "perplexity.json");
    let model = load(case);
    let pool = ThreadPool::new(2);
    let text = std::fs::read_to_string(
        repo().join("tests/data/reference").join(reference["text"]["file"].as_str().unwrap()),
    )
    .unwrap();
    let tokens = model.tokenizer().tokenize(&text, false, false);
    assert_eq!(tokens.len() as u64, reference["text"]["n_tokens"].as_u64().unwrap());
    let w = reference["protocol"]["window"].as_u64().unwrap() as usize;
    let bos: Vec<u32> = if reference["model"]["add_bos"].as_bool().unwrap() {
        vec![model.tokenizer().bos().unwrap()]
    } else {
        vec![]
    };
    let (mut nll, mut n) = (0.0f64, 0usize);
    for window in tokens.chunks_exact(w) {
        let mut input = bos.clone();
        input.extend_from_slice(window);
        let off = bos.len();
        all_logits(&model, &pool, &input, 64, |pos, row| {
            // The row at input position `pos` predicts input[pos + 1] = window[pos + 1 - off].
            let i = pos + 1 - off;
            if pos + 1 < input.len() && i >= w / 2 {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
                nll += lse - row[window[i] as usize] as f64;
                n += 1;
            }
        });
    }
    assert_eq!(n as u64, reference["n_scored_second_half"].as_u64().unwrap());
    let ppl = (nll / n as f64).exp();
    let peer = reference["ppl_second_half"].as_f64().unwrap();
    eprintln!(
        "{} perplexity: unicorn {ppl:.4}, llama.cpp {peer:.4} ({:+.3}%)",
        case.key,
        (ppl / peer - 1.0) * 100.0
    );
    assert!((ppl / peer - 1.0).abs() < 0.01, "perplexity {ppl} vs llama.cpp's {peer}");
}

#[test]
fn smollm2_teacher_forced_logits_match_llama_cpp() {
    teacher_forced(&SMOLLM2);
}

#[test]
fn smollm2_greedy_matches_llama_cpp_up_to_the_first_near_tie() {
    greedy(&SMOLLM2);
}

#[test]
fn smollm2_perplexity_within_one_percent_of_llama_cpp() {
    perplexity(&SMOLLM2);
}

#[test]
fn gemma3_teacher_forced_logits_match_llama_cpp() {
    teacher_forced(&GEMMA3);
}

#[test]
fn gemma3_greedy_matches_llama_cpp_up_to_the_first_near_tie() {
    greedy(&GEMMA3);
}

#[test]
fn gemma3_perplexity_within_one_percent_of_llama_cpp() {
    perplexity(&GEMMA3);
}

/// Standard base64 (RFC 4648) with padding.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c) << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    out
}
