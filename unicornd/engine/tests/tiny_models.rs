//! The `gemma3n` and `qwen3` architectures against llama.cpp, on the random-weight fixtures in
//! `tests/fixtures/` (their READMEs say how the references were made and what agreement to
//! expect): the tokenization of the fixture prompts, the logits of every prompt position, and
//! the greedy steps teacher-forced on llama.cpp's ids, on the CPU and with every class on Vulkan
//! (lavapipe in CI); the KV cache of Gemma 3n's sharing layers; and the loading checks.
//!
//! Tolerances (abs logit error, min cosine per row), from the READMEs' measurements:
//! - F16 is tight: an independent float64 forward lands within 0.024 (gemma3n) and 0.019
//!   (qwen3) of llama.cpp, two llama.cpp runs within 0.008. 0.06 allows for our f32 arithmetic
//!   and f16 cache; every structural mistake the gemma3n README lists moves the logits by 0.21
//!   (no soft-cap) to 7.3, so each of them fails.
//! - Q8_0 is loose: ggml rounds activations to 8 bits before each product, and its own runs
//!   differ by about 0.1; the float64 forward is 0.62 (gemma3n) and 0.39 (qwen3) away. The
//!   READMEs advise 1.0 and cosine 0.995; structural mistakes (2.7 to 7.3) still fail.
//! - Vulkan takes f32 activations where the CPU and ggml round them (to f16 or Q8): against
//!   llama.cpp it is held to the same bounds as the CPU.
//!
//! Greedy: a step's argmax must be llama.cpp's id where llama.cpp's top-1 margin is clear (F16:
//! twice the tolerance, so that two logits within it cannot swap; Q8_0: 0.5, see `Q8_0`); every
//! step's recorded top-5 logits must be within the tolerance (greedy_ids ran with flash attention on, which moves them by at most
//! 0.008 (F16) and 0.125 (Q8_0) from the runs above).

mod common;

use std::time::Instant;

use common::fixture::Fixture;
use serde_json::Value;
use unicorn_engine::gguf::writer::GgufWriter;
use unicorn_engine::gguf::{GgufFile, Value as GgufValue};
use unicorn_engine::model::{Backends, KvState, KvType, Logits, Model, ModelError, Placement, Seq};
use unicorn_kernels::ThreadPool;

const PROMPTS: usize = 4;

#[derive(Clone, Copy)]
struct Tol {
    atol: f32,
    min_cos: f64,
    /// A greedy step whose llama.cpp top-1 margin exceeds this must give llama.cpp's id.
    clear_margin: f64,
}

/// Twice the tolerance: two logits each within it of llama.cpp's cannot swap.
const F16: Tol = Tol { atol: 0.06, min_cos: 0.9999, clear_margin: 0.12 };
/// The float64 forward is within 0.21 of the greedy runs' top-5 logits on Q8_0 (and llama.cpp
/// within 0.125 of itself): margins above 0.5 are clear for a correct implementation.
const Q8_0: Tol = Tol { atol: 1.0, min_cos: 0.995, clear_margin: 0.5 };

struct Case {
    fixture: &'static str,
    /// The file name without `.gguf`.
    model: &'static str,
    tol: Tol,
    /// Whether `logits_all.pK.npy` holds every prompt position (else only the last one is in
    /// `last_logits.npy`: 49,152 logits a row would make the files large).
    all_positions: bool,
}

const GEMMA3N_F16: Case =
    Case { fixture: "gemma3n-tiny", model: "gemma3n-tiny-f16", tol: F16, all_positions: true };
const GEMMA3N_Q8_0: Case =
    Case { fixture: "gemma3n-tiny", model: "gemma3n-tiny-q8_0", tol: Q8_0, all_positions: true };
const QWEN3_F16: Case =
    Case { fixture: "qwen3-tiny", model: "qwen3-tiny-f16", tol: F16, all_positions: false };
const QWEN3_Q8_0: Case =
    Case { fixture: "qwen3-tiny", model: "qwen3-tiny-q8_0", tol: Q8_0, all_positions: false };

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a))).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
    let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// The largest differences seen, for the report.
#[derive(Default)]
struct Worst {
    abs: f32,
    cos: f64,
}

impl Worst {
    fn new() -> Worst {
        Worst { abs: 0.0, cos: 1.0 }
    }

    /// Checks a whole row of logits.
    fn row(&mut self, what: &str, tol: Tol, ours: &[f32], peer: &[f32]) {
        assert_eq!(ours.len(), peer.len(), "{what}");
        assert!(ours.iter().all(|v| v.is_finite()), "{what}: non-finite logits");
        let abs = ours.iter().zip(peer).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let cos = cosine(ours, peer);
        assert!(abs <= tol.atol, "{what}: logits differ by {abs} > {}", tol.atol);
        assert!(cos >= tol.min_cos, "{what}: cosine {cos} < {}", tol.min_cos);
        self.abs = self.abs.max(abs);
        self.cos = self.cos.min(cos);
    }
}

fn load(case: &Case, backends: Backends) -> (Fixture, Model) {
    let fixture = Fixture::open(case.fixture);
    let path = fixture.verified(&format!("{}.gguf", case.model));
    let model = Model::load_with(GgufFile::open(path).unwrap(), backends).unwrap();
    (fixture, model)
}

/// Tokenization, every prompt position, and the teacher-forced greedy steps, on `backends`:
/// token by token after the prompt (the single-token path and the cache across calls), or with
/// `one_pass` all in one batched pass with the prompts (lavapipe waits for every operation: 64
/// passes of 25 layers take half a minute there).
fn run(case: &Case, backends: Backends, one_pass: bool) {
    let t0 = Instant::now();
    let placement = backends.placement();
    let (fixture, model) = load(case, backends);
    let greedy = fixture.json(&format!("{}.greedy.json", case.model));
    let prompts = greedy["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), PROMPTS);
    let n_vocab = model.hparams().n_vocab;
    let pool = ThreadPool::new(2);
    let tol = case.tol;
    let (last_shape, last) = fixture.npy(&format!("{}.last_logits.npy", case.model));
    assert_eq!(last_shape, [PROMPTS, n_vocab]);

    // Every prompt in one pass, every position's logits (with `one_pass`: all four prompts
    // batched, each followed by llama.cpp's greedy ids); `rows[k]` are prompt k's.
    let prompt_ids: Vec<Vec<u32>> = prompts.iter().map(|p| ids(&p["prompt_ids"])).collect();
    let generated: Vec<Vec<u32>> = prompts.iter().map(|p| ids(&p["generated_ids"])).collect();
    let inputs: Vec<Vec<u32>> = prompt_ids
        .iter()
        .zip(&generated)
        .map(|(p, g)| if one_pass { [&p[..], &g[..g.len() - 1]].concat() } else { p.clone() })
        .collect();
    let mut kvs: Vec<KvState> = prompt_ids
        .iter()
        .zip(&generated)
        .map(|(p, g)| model.new_state(p.len() + g.len(), KvType::F16).unwrap())
        .collect();
    let mut logits = Vec::new();
    let mut rows: Vec<Vec<Vec<f32>>> = Vec::new();
    let batches: Vec<Vec<usize>> = if one_pass {
        vec![(0..PROMPTS).collect()]
    } else {
        (0..PROMPTS).map(|k| vec![k]).collect()
    };
    for batch in batches {
        let mut seqs: Vec<Seq> = kvs
            .iter_mut()
            .zip(&inputs)
            .enumerate()
            .filter(|(k, _)| batch.contains(k))
            .map(|(_, (kv, input))| Seq { kv, tokens: input, logits: Logits::All })
            .collect();
        model.forward(&pool, &mut seqs, &mut logits).unwrap();
        let mut rest = &logits[..];
        for &k in &batch {
            let (mine, others) = rest.split_at(inputs[k].len() * n_vocab);
            rows.push(mine.chunks_exact(n_vocab).map(<[f32]>::to_vec).collect());
            rest = others;
        }
        assert!(rest.is_empty());
    }

    let (mut prompt_worst, mut step_worst) = (Worst::new(), Worst::new());
    let (mut compared, mut steps) = (0, 0);
    for (k, p) in prompts.iter().enumerate() {
        let (prompt, generated, kv) = (&prompt_ids[k], &generated[k], &mut kvs[k]);
        let text = p["prompt"].as_str().unwrap();
        assert_eq!(&model.tokenizer().tokenize(text, true, true), prompt, "tokens of {text:?}");
        let all_rows = &rows[k];
        let rows = &all_rows[..prompt.len()];
        if case.all_positions {
            let (shape, all) = fixture.npy(&format!("{}.logits_all.p{k}.npy", case.model));
            assert_eq!(shape, [prompt.len(), n_vocab]);
            for (i, (ours, peer)) in rows.iter().zip(all.chunks_exact(n_vocab)).enumerate() {
                prompt_worst.row(&format!("prompt {k} position {i}"), tol, ours, peer);
            }
        }
        let peer_last = &last[k * n_vocab..][..n_vocab];
        prompt_worst.row(
            &format!("prompt {k} last position"),
            tol,
            &rows[rows.len() - 1],
            peer_last,
        );

        // The greedy steps on llama.cpp's ids: from the pass above, or one token at a time.
        let mut row = rows[rows.len() - 1].clone();
        for (i, s) in p["steps"].as_array().unwrap().iter().enumerate() {
            let top = s["top"].as_array().unwrap();
            for pair in top {
                let (id, l) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap());
                let d = (row[id] - l as f32).abs();
                assert!(d <= tol.atol, "prompt {k} step {i}: logit of {id} differs by {d}");
                step_worst.abs = step_worst.abs.max(d);
            }
            let margin = s["margin_top1_top2"].as_f64().unwrap();
            if margin > tol.clear_margin {
                assert_eq!(
                    argmax(&row) as u32,
                    generated[i],
                    "prompt {k} step {i}: greedy id differs (llama.cpp's margin {margin})"
                );
                compared += 1;
            }
            steps += 1;
            if one_pass && i + 1 < generated.len() {
                row.clone_from(&all_rows[prompt.len() + i]);
            } else if i + 1 < generated.len() {
                let mut seq =
                    [Seq { kv: &mut *kv, tokens: &generated[i..=i], logits: Logits::Last }];
                model.forward(&pool, &mut seq, &mut logits).unwrap();
                row.copy_from_slice(&logits);
            }
        }
    }
    eprintln!(
        "{} on {placement}: prompt logits max |diff| {:.4}, min cosine {:.6} (tolerance {}, {}); \
         greedy top-5 max |diff| {:.4}; {compared} of {steps} greedy ids compared (margin > {}), \
         all equal; {:.2} s",
        case.model,
        prompt_worst.abs,
        prompt_worst.cos,
        tol.atol,
        tol.min_cos,
        step_worst.abs,
        tol.clear_margin,
        t0.elapsed().as_secs_f64()
    );
    // A tolerance that lets nothing be compared would prove nothing.
    assert!(compared >= steps / 4, "only {compared} of {steps} greedy ids were comparable");
}

fn cpu(case: &Case) {
    run(case, Backends::cpu(), false);
}

fn vulkan(case: &Case) {
    if let Some(b) = common::vulkan_backends(Placement::vulkan_all()) {
        run(case, b, true);
    }
}

#[test]
fn gemma3n_f16_matches_llama_cpp_on_the_cpu() {
    cpu(&GEMMA3N_F16);
}

#[test]
fn gemma3n_q8_0_matches_llama_cpp_on_the_cpu() {
    cpu(&GEMMA3N_Q8_0);
}

#[test]
fn qwen3_f16_matches_llama_cpp_on_the_cpu() {
    cpu(&QWEN3_F16);
}

#[test]
fn qwen3_q8_0_matches_llama_cpp_on_the_cpu() {
    cpu(&QWEN3_Q8_0);
}

#[test]
fn gemma3n_f16_matches_llama_cpp_on_vulkan() {
    vulkan(&GEMMA3N_F16);
}

#[test]
fn gemma3n_q8_0_matches_llama_cpp_on_vulkan() {
    vulkan(&GEMMA3N_Q8_0);
}

#[test]
fn qwen3_f16_matches_llama_cpp_on_vulkan() {
    vulkan(&QWEN3_F16);
}

#[test]
fn qwen3_q8_0_matches_llama_cpp_on_vulkan() {
    vulkan(&QWEN3_Q8_0);
}

/// Submissions of a prompt's pass (the last token's logits) and of one decode step after it,
/// with every class on Vulkan.
fn pass_submits(m: &Model) -> (u64, u64) {
    let pool = ThreadPool::new(2);
    let mut kv = m.new_state(16, KvType::F16).unwrap();
    let mut out = Vec::new();
    let mut step = |tokens: &[u32]| {
        let before = m.vulkan_stats().map_or(0, |s| s.submits);
        let mut seq = [Seq { kv: &mut kv, tokens, logits: Logits::Last }];
        m.forward(&pool, &mut seq, &mut out).unwrap();
        m.vulkan_stats().expect("the pass ran on vulkan").submits - before
    };
    (step(&[2, 818, 505, 670]), step(&[509]))
}

/// With every class on Vulkan the activations and the KV cache stay on the device: the plain
/// block (qwen3) submits once per pass, a prefill chunk as a decode step (the logits read back
/// at the end); Gemma 3n's host code (AltUp, LAuReL's scale, the per-layer inputs) reads back a
/// few times per layer, still far from once per operation.
#[test]
fn a_vulkan_pass_submits_once_per_stretch_of_device_work() {
    let Some(b) = common::vulkan_backends(Placement::vulkan_all()) else { return };
    let (_, qwen) = load(&QWEN3_Q8_0, b.clone());
    assert_eq!(pass_submits(&qwen), (1, 1));
    let (_, g) = load(&GEMMA3N_Q8_0, b);
    let ((_, n), layers) = (pass_submits(&g), g.hparams().n_layer as u64);
    eprintln!("gemma3n: {n} submissions per decode step of {layers} layers");
    assert!((layers..=6 * layers).contains(&n), "{n} submissions for {layers} layers");
}

/// The logits of `tokens` appended to `kv`, in one pass.
fn step(m: &Model, kv: &mut KvState, tokens: &[u32]) -> Vec<f32> {
    let pool = ThreadPool::new(2);
    let mut out = Vec::new();
    m.forward(&pool, &mut [Seq { kv, tokens, logits: Logits::Last }], &mut out).unwrap();
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// A context rewound on the device decodes as a fresh one that never saw the dropped tokens:
/// positions past the rewind are simply overwritten, in the device cache as in the host one.
#[test]
fn a_rewound_context_on_vulkan_decodes_as_a_fresh_one() {
    let Some(b) = common::vulkan_backends(Placement::vulkan_all()) else { return };
    let (_, m) = load(&QWEN3_Q8_0, b);
    let mut kv = m.new_state(32, KvType::F16).unwrap();
    step(&m, &mut kv, &[2, 818, 505, 670]);
    step(&m, &mut kv, &[509]);
    step(&m, &mut kv, &[77, 78]);
    kv.rewind(3).unwrap();
    let got = step(&m, &mut kv, &[1000, 1001]);
    let mut fresh = m.new_state(32, KvType::F16).unwrap();
    let want = step(&m, &mut fresh, &[2, 818, 505, 1000, 1001]);
    // The same shaders on the same rows: only the order of work may differ.
    let d = max_diff(&got, &want);
    assert!(d <= 1e-3, "rewound vs fresh: {d}");
    assert_eq!(kv.tokens(), fresh.tokens());
}

/// A device error in a pass moves the model to the CPU (Model::forward's fail-over): a context
/// whose keys and values were only in its device cache gets them copied back, so it goes on
/// with the tokens the CPU backend gives. The error here is real: a second context so long that
/// one layer of its cache exceeds the device's largest storage buffer fails that pass.
#[test]
fn after_a_device_error_a_context_goes_on_from_its_device_cache() {
    // Seen: Vulkan against the CPU at most 0.16 before the failure and 0.18 after it; with the
    // copy back left out (a cache of zeros on the host) 14.
    const TOL: f32 = 0.5;
    let Some(b) = common::vulkan_backends(Placement::vulkan_all()) else { return };
    let (_, vk) = load(&QWEN3_Q8_0, b);
    let (_, cpu) = load(&QWEN3_Q8_0, Backends::cpu());
    let hp = vk.hparams().clone();
    let mut a = vk.new_state(64, KvType::F16).unwrap();
    let mut a_cpu = cpu.new_state(64, KvType::F16).unwrap();
    for tokens in [&[2, 818, 505, 670][..], &[509], &[77]] {
        let d = max_diff(&step(&vk, &mut a, tokens), &step(&cpu, &mut a_cpu, tokens));
        assert!(d <= TOL, "vulkan against the cpu: {d}");
    }
    assert!(a.on_device());
    assert_eq!(vk.device_kv_caches(), 1);
    // K and V of one layer, f16, just above the limit.
    let ctx = unicorn_engine::model::shared_vulkan_context(true).unwrap();
    let limit = ctx.info().max_storage_buffer_range.min(u64::from(u32::MAX)) as usize;
    let n_ctx = limit / (2 * 2 * hp.n_head_kv * hp.head_dim) + 1;
    let mut long = vk.new_state(n_ctx, KvType::F16).unwrap();
    let pool = ThreadPool::new(2);
    let mut out = Vec::new();
    vk.forward(
        &pool,
        &mut [
            Seq { kv: &mut a, tokens: &[99], logits: Logits::Last },
            Seq { kv: &mut long, tokens: &[5, 6], logits: Logits::Last },
        ],
        &mut out,
    )
    .unwrap();
    assert!(vk.vulkan_stats().is_none(), "the model left the device");
    let want = step(&cpu, &mut a_cpu, &[99]);
    let got = &out[..hp.n_vocab];
    // Positions 0..6 came from the device, computed there from f32 activations (Q8 on the
    // CPU): as close to the CPU's as Vulkan's own logits.
    let d = max_diff(got, &want);
    eprintln!("after fail-over: max |got - cpu| {d}");
    assert!(d <= TOL, "after fail-over: {d}");
    let d = max_diff(&step(&vk, &mut a, &[100]), &step(&cpu, &mut a_cpu, &[100]));
    assert!(d <= TOL, "the next step: {d}");
    drop(a);
    assert_eq!(vk.device_kv_caches(), 0, "the device cache went with its context");
}

/// Every context's device cache is freed when the context is dropped, however many there were;
/// a model never holds one for a context that is gone.
#[test]
fn dropped_contexts_free_their_device_caches() {
    let Some(b) = common::vulkan_backends(Placement::vulkan_all()) else { return };
    let (_, m) = load(&QWEN3_Q8_0, b);
    let pool = ThreadPool::new(2);
    let mut out = Vec::new();
    for round in 0..3 {
        let mut kvs: Vec<KvState> =
            (0..20).map(|_| m.new_state(16, KvType::F16).unwrap()).collect();
        let mut seqs: Vec<Seq> = kvs
            .iter_mut()
            .enumerate()
            .map(|(i, kv)| Seq { kv, tokens: &[2, 818][..1 + i % 2], logits: Logits::Last })
            .collect();
        m.forward(&pool, &mut seqs, &mut out).unwrap();
        drop(seqs);
        assert_eq!(m.device_kv_caches(), 20, "round {round}");
        kvs.truncate(5);
        assert_eq!(m.device_kv_caches(), 5, "round {round}");
        drop(kvs);
        assert_eq!(m.device_kv_caches(), 0, "round {round}");
    }
}

/// Layers 20..24 read the caches of layers 18 and 19: the cache holds 20 layers, not 25.
#[test]
fn gemma3n_sharing_layers_have_no_kv_cache() {
    let (_, model) = load(&GEMMA3N_F16, Backends::cpu());
    let hp = model.hparams();
    assert_eq!((hp.n_layer, hp.n_layer_kv), (25, 20));
    // 20 layers x K and V x 2 KV heads x 32 values x 2 bytes per position.
    assert_eq!(KvState::bytes_for(hp, 100, KvType::F16), 20 * 2 * 64 * 2 * 100);
    assert_eq!(KvState::bytes_for(hp, 100, KvType::F32), 20 * 2 * 64 * 4 * 100);
    let (_, qwen) = load(&QWEN3_F16, Backends::cpu());
    assert_eq!(qwen.hparams().n_layer_kv, qwen.hparams().n_layer);
}

/// The gemma3n fixture rewritten by `edit`, which may drop or replace metadata entries and
/// tensors (returning `None` drops one).
fn edited_gemma3n(
    edit_kv: impl Fn(&str, &GgufValue) -> Option<GgufValue>,
    keep_tensor: impl Fn(&str) -> bool,
) -> Result<Model, ModelError> {
    let fixture = Fixture::open("gemma3n-tiny");
    let src = GgufFile::open(fixture.verified("gemma3n-tiny-f16.gguf")).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in src.metadata().iter() {
        if let Some(v) = edit_kv(k, v) {
            w.kv(k, v);
        }
    }
    for t in src.tensors().filter(|t| keep_tensor(t.name)) {
        w.tensor(t.name, t.ty, t.dims, t.data.to_vec());
    }
    Model::load_with(GgufFile::from_bytes(w.to_bytes()).unwrap(), Backends::cpu())
}

fn keep_all(_: &str) -> bool {
    true
}

fn unchanged(_: &str, v: &GgufValue) -> Option<GgufValue> {
    Some(v.clone())
}

#[test]
fn gemma3n_loading_names_what_is_missing_or_unsupported() {
    // The rewriting itself changes nothing.
    let original = edited_gemma3n(unchanged, keep_all).unwrap();

    let missing = |name: &'static str| {
        let e = edited_gemma3n(unchanged, |t| t != name).unwrap_err();
        assert!(matches!(e, ModelError::Arch { ref arch, .. } if arch == "gemma3n"), "{e:?}");
        let msg = e.to_string();
        assert!(msg.starts_with("gemma3n: ") && msg.contains(name), "{name}: {msg}");
        msg
    };
    missing("blk.3.laurel_l.weight");
    missing("per_layer_token_embd.weight");
    missing("altup_unembd_proj.weight");
    missing("blk.24.altup_predict_coef.weight");
    // A sharing layer's K and V are not needed.
    edited_gemma3n(unchanged, |t| t != "blk.22.attn_k.weight" && t != "blk.22.attn_v.weight")
        .unwrap();
    // ... but a layer with its own cache needs them.
    missing("blk.19.attn_v.weight");

    let with = |key: &'static str, value: GgufValue| {
        let e =
            edited_gemma3n(|k, v| Some(if k == key { value.clone() } else { v.clone() }), keep_all)
                .unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("gemma3n: ") && msg.contains(key), "{key}: {msg}");
        msg
    };
    let msg = with("gemma3n.attention.shared_kv_layers", GgufValue::U32(25));
    assert!(msg.contains("some layer must have a cache"), "{msg}");
    // Every layer local: the global layer 24 has no global layer to share with.
    let msg = with(
        "gemma3n.attention.sliding_window_pattern",
        GgufValue::Array(unicorn_engine::gguf::Array::Bool((0..25).map(|i| i != 24).collect())),
    );
    assert!(msg.contains("layer 24 (global) shares a cache"), "{msg}");
    with("gemma3n.altup.active_idx", GgufValue::U32(4));
    with("gemma3n.embedding_length_per_layer_input", GgufValue::U32(128));
    with(
        "gemma3n.feed_forward_length",
        GgufValue::Array(unicorn_engine::gguf::Array::U32((0..25).map(|i| 128 + i).collect())),
    );

    // Without a key llama.cpp fixes, its value is used: the file gives the same ones.
    let fixed = [
        "gemma3n.altup.num_inputs",
        "gemma3n.altup.active_idx",
        "gemma3n.embedding_length_per_layer_input",
        "gemma3n.attention.shared_kv_layers",
        "gemma3n.final_logit_softcapping",
        "gemma3n.activation_sparsity_scale",
    ];
    let m = edited_gemma3n(|k, v| (!fixed.contains(&k)).then(|| v.clone()), keep_all).unwrap();
    assert_eq!(m.hparams().n_layer_kv, 20);
    assert_eq!(prompt_logits(&m), prompt_logits(&original));
}

/// The logits of every position of the first fixture prompt.
fn prompt_logits(m: &Model) -> Vec<f32> {
    let tokens = [2, 818, 505, 670, 509, 514, 529, 633, 936, 831, 563];
    let mut kv = m.new_state(tokens.len(), KvType::F16).unwrap();
    let mut out = Vec::new();
    let mut seq = [Seq { kv: &mut kv, tokens: &tokens, logits: Logits::All }];
    m.forward(&ThreadPool::new(2), &mut seq, &mut out).unwrap();
    out
}
