//! The forward pass with operation classes placed on Vulkan against the CPU backend, on the real
//! models (SmolLM2-135M Q4_1 and Gemma 3 270M Q4_K_M): the logits of a short prompt (teacher
//! forced) and of each greedy step, and the greedy tokens up to the first near tie.
//!
//! In CI the device is Mesa's lavapipe (allowed here explicitly). These tests do not skip
//! silently: when lavapipe's ICD file is installed (or `UNICORN_VULKAN_REQUIRE=1`) and no device
//! can be opened, they fail; only on a machine without lavapipe do they skip, saying so on
//! stderr. lavapipe is slow (about 1 s per SmolLM2 token, 3 s per Gemma 3 token on 2 cores), so
//! the prompt is short and the greedy run a few tokens: the four tests take about 85 s.
//!
//! Tolerance: the Vulkan products take f32 activations where the CPU quantizes them to Q8 (and
//! sums in another order), so a logit may differ from the CPU's by
//! `RTOL * max|cpu logits of the row| + ATOL`. Seen on lavapipe: at most 1.15 for SmolLM2 and 1.41
//! for Gemma 3 (0.52 and 0.69 of the tolerance), the mean difference of a row at most 0.55;
//! attention and norms on the device change little. llama.cpp differs from itself by 2.6 to 3.0
//! between its two attention paths on these models (tests/parity.rs).

mod common;

use std::time::Instant;

use unicorn_engine::gguf::GgufFile;
use unicorn_engine::model::{Backends, KvType, Logits, Model, Placement, Seq};
use unicorn_kernels::ThreadPool;

const RTOL: f32 = 0.05;
const ATOL: f32 = 1.0;
/// Greedy steps compared after the prompt.
const STEPS: usize = 8;
/// A CPU top-2 margin below this is a near tie: the comparison of tokens stops there.
const NEAR_TIE: f32 = 0.5;

fn load(file: &str, backends: Backends) -> Model {
    Model::load_with(GgufFile::open(common::model_path(file)).unwrap(), backends).unwrap()
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a))).unwrap()
}

/// The gap between the largest and second largest value.
fn margin(row: &[f32]) -> f32 {
    let top = argmax(row);
    let second = row.iter().enumerate().filter(|&(i, _)| i != top).map(|(_, &v)| v);
    row[top] - second.fold(f32::NEG_INFINITY, f32::max)
}

/// The largest `|vk - cpu|` of a row as a fraction of what is allowed, and that difference.
fn compare(what: &str, cpu: &[f32], vk: &[f32]) -> (f32, f32) {
    assert_eq!(cpu.len(), vk.len());
    let max_abs = cpu.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let tol = RTOL * max_abs + ATOL;
    let diff = cpu.iter().zip(vk).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    let mean =
        cpu.iter().zip(vk).map(|(a, b)| f64::from((a - b).abs())).sum::<f64>() / cpu.len() as f64;
    eprintln!("{what}: max |vk - cpu| {diff:.3}, mean {mean:.4}, max |logit| {max_abs:.2}");
    assert!(vk.iter().all(|v| v.is_finite()), "{what}: non-finite vulkan logits");
    assert!(diff <= tol, "{what}: max |vk - cpu| = {diff} > {tol} (max |logit| {max_abs})");
    (diff / tol, diff)
}

fn run(file: &str, placement: Placement) {
    let Some(b) = common::vulkan_backends(placement) else { return };
    let t0 = Instant::now();
    let cpu = load(file, Backends::cpu());
    let vk = load(file, b);
    assert_eq!(vk.backends().placement(), placement);
    let pool = ThreadPool::new(2);
    let n_vocab = cpu.hparams().n_vocab;
    let prompt = cpu.tokenizer().tokenize("The capital of France is", true, false);

    // With every class on the device (the KV cache there too), a pass is one submission: the
    // logits read back at its end.
    let one_submission = |what: &str, before: u64| {
        if placement == Placement::vulkan_all() {
            let n = vk.vulkan_stats().expect("ran on vulkan").submits - before;
            assert_eq!(n, 1, "{what}: {n} submissions");
        }
    };
    let submits = || vk.vulkan_stats().map_or(0, |s| s.submits);

    // Teacher forcing: every prompt position's logits.
    let mut states = [&cpu, &vk].map(|m| m.new_state(64, KvType::F16).unwrap());
    let mut logits = [Vec::new(), Vec::new()];
    let before = submits();
    for ((m, kv), out) in [&cpu, &vk].into_iter().zip(&mut states).zip(&mut logits) {
        let mut seqs = [Seq { kv, tokens: &prompt, logits: Logits::All }];
        m.forward(&pool, &mut seqs, out).unwrap();
    }
    one_submission("the prompt", before);
    let (mut worst, mut worst_diff) = (0.0f32, 0.0f32);
    for (i, (c, v)) in
        logits[0].chunks_exact(n_vocab).zip(logits[1].chunks_exact(n_vocab)).enumerate()
    {
        let (f, d) = compare(&format!("prompt position {i}"), c, v);
        worst = worst.max(f);
        worst_diff = worst_diff.max(d);
    }

    // Greedy: each model continues from its own choice; the tokens must agree up to the first
    // near tie of the CPU's logits.
    let last = |l: &[f32]| l[l.len() - n_vocab..].to_vec();
    let (mut cpu_row, mut vk_row) = (last(&logits[0]), last(&logits[1]));
    let mut tokens = Vec::new();
    for step in 0..STEPS {
        let gap = margin(&cpu_row);
        let (tc, tv) = (argmax(&cpu_row) as u32, argmax(&vk_row) as u32);
        if gap < NEAR_TIE {
            eprintln!("step {step}: near tie (margin {gap}), stopping the comparison");
            break;
        }
        assert_eq!(tc, tv, "step {step}: greedy tokens differ (cpu margin {gap}) after {tokens:?}");
        tokens.push(tc);
        let before = submits();
        for ((m, kv), out) in [&cpu, &vk].into_iter().zip(&mut states).zip(&mut logits) {
            let mut seqs = [Seq { kv, tokens: &[tc], logits: Logits::Last }];
            m.forward(&pool, &mut seqs, out).unwrap();
        }
        one_submission(&format!("greedy step {step}"), before);
        let (f, d) = compare(&format!("greedy step {step}"), &logits[0], &logits[1]);
        worst = worst.max(f);
        worst_diff = worst_diff.max(d);
        (cpu_row, vk_row) = (logits[0].clone(), logits[1].clone());
    }
    eprintln!(
        "{file} on {}: {} prompt tokens, {} greedy tokens equal ({:?}); largest |vk - cpu| \
         {worst_diff}, {:.2} of the tolerance; {:.1} s",
        placement,
        prompt.len(),
        tokens.len(),
        String::from_utf8_lossy(&cpu.tokenizer().detokenize(&tokens, false).unwrap()),
        worst,
        t0.elapsed().as_secs_f64()
    );
    assert!(tokens.len() >= 4, "only {} greedy tokens compared", tokens.len());
}

#[test]
fn smollm2_feed_forward_and_output_on_vulkan_match_the_cpu() {
    run(common::SMOLLM2, Placement::vulkan());
}

/// `vulkan-all`: the attention products and the norms too.
#[test]
fn smollm2_everything_on_vulkan_matches_the_cpu() {
    run(common::SMOLLM2, Placement::vulkan_all());
}

#[test]
fn gemma3_feed_forward_and_output_on_vulkan_match_the_cpu() {
    run(common::GEMMA3, Placement::vulkan());
}

/// `vulkan-all`: with Gemma's Q/K norms and post-norms on the device as well.
#[test]
fn gemma3_everything_on_vulkan_matches_the_cpu() {
    run(common::GEMMA3, Placement::vulkan_all());
}

/// Greedy tokens of `prompts` (one context each) for `steps` steps after the prompt, and every
/// pass's logits, either each context alone or all in one pass per step (a prefill of every
/// prompt, the last token's logits each, then one decode token each).
fn greedy(m: &Model, prompts: &[Vec<u32>], steps: usize, batched: bool) -> Vec<Vec<Vec<f32>>> {
    let pool = ThreadPool::new(2);
    let n_vocab = m.hparams().n_vocab;
    let mut kvs: Vec<_> = prompts.iter().map(|_| m.new_state(64, KvType::F16).unwrap()).collect();
    let mut rows: Vec<Vec<Vec<f32>>> = vec![Vec::new(); prompts.len()];
    let mut inputs: Vec<Vec<u32>> = prompts.to_vec();
    let groups: Vec<Vec<usize>> = if batched {
        vec![(0..prompts.len()).collect()]
    } else {
        (0..prompts.len()).map(|i| vec![i]).collect()
    };
    for _ in 0..=steps {
        for g in &groups {
            let before = m.vulkan_stats().map_or(0, |s| s.submits);
            let mut seqs: Vec<Seq> = kvs
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| g.contains(i))
                .map(|(i, kv)| Seq { kv, tokens: &inputs[i], logits: Logits::Last })
                .collect();
            let mut out = Vec::new();
            m.forward(&pool, &mut seqs, &mut out).unwrap();
            let n = m.vulkan_stats().expect("ran on vulkan").submits - before;
            assert_eq!(n, 1, "a pass of {} contexts: {n} submissions", g.len());
            for (&i, row) in g.iter().zip(out.chunks_exact(n_vocab)) {
                rows[i].push(row.to_vec());
            }
        }
        for (i, r) in rows.iter().enumerate() {
            inputs[i] = vec![argmax(r.last().unwrap()) as u32];
        }
    }
    rows
}

/// Two contexts batched in every pass (their prompts in one prefill pass, then one decode token
/// each per pass) on `vulkan-all` give the tokens and logits each gives alone: each reads its
/// own device KV cache at its own positions. The same shaders run on the same rows either way,
/// so the logits agree to rounding (seen: equal).
#[test]
fn smollm2_two_contexts_batched_on_vulkan_match_each_alone() {
    let Some(b) = common::vulkan_backends(Placement::vulkan_all()) else { return };
    let vk = load(common::SMOLLM2, b);
    let tok = vk.tokenizer();
    let prompts: Vec<Vec<u32>> = ["The capital of France is", "Once upon a time, a small"]
        .iter()
        .map(|p| tok.tokenize(p, true, false))
        .collect();
    assert_ne!(prompts[0].len(), prompts[1].len());
    let alone = greedy(&vk, &prompts, 3, false);
    let together = greedy(&vk, &prompts, 3, true);
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        let ids = |r: &Vec<Vec<f32>>| r.iter().map(|l| argmax(l)).collect::<Vec<_>>();
        assert_eq!(ids(a), ids(t), "context {i}: greedy tokens");
        for (s, (x, y)) in a.iter().zip(t).enumerate() {
            let d = x.iter().zip(y).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
            eprintln!("context {i} pass {s}: max |alone - batched| {d}");
            assert!(d <= 1e-3, "context {i} pass {s}: {d}");
        }
    }
    assert_eq!(vk.device_kv_caches(), 0, "the contexts and their device caches are gone");
}

/// `file` copied into a memfd with its tileable matrices written tiled, as the daemon holds a
/// model its client could change.
fn tiled_copy(file: &str) -> GgufFile {
    let path = common::model_path(file);
    let src = GgufFile::open(&path).unwrap();
    let mut bytes = src.bytes().to_vec();
    let plan = src.matrices_to_tile();
    for m in &plan {
        let view = unicorn_kernels::WeightView::new(m.ty, m.rows, m.cols, &bytes[m.range.clone()])
            .unwrap();
        let tiles = unicorn_kernels::tiled::TiledWeights::new(&view).unwrap();
        bytes[m.range.clone()].copy_from_slice(tiles.as_bytes());
    }
    let name = std::ffi::CString::new("tiled-copy").unwrap();
    // SAFETY: a valid C string and flags; the descriptor is checked and owned right after.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let memfd = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    std::io::Write::write_all(&mut &memfd, &bytes).unwrap();
    // SAFETY: the test's own memfd, which nothing changes while it is mapped.
    let map = unsafe { memmap2::Mmap::map(&memfd) }.unwrap();
    GgufFile::from_memfd_tiled(map, plan.into_iter().map(|m| m.range).collect()).unwrap()
}

/// A model held tiled (the daemon's copy) gives the file's logits bit for bit on the CPU (its
/// products read the same tiles, its embedding rows come back from them), and on Vulkan, which
/// uploads its matrices read back into GGUF layout, the CPU's within the tolerance.
#[test]
fn smollm2_held_tiled_matches_the_file_on_the_cpu_and_on_vulkan() {
    let file = "SmolLM2-135M-Instruct.Q4_1.gguf";
    let plain = load(file, Backends::cpu());
    let tiled = Model::load_with(tiled_copy(file), Backends::cpu()).unwrap();
    let pool = ThreadPool::new(2);
    let prompt = plain.tokenizer().tokenize("The capital of France is", true, false);
    let logits = |m: &Model| {
        let mut kv = m.new_state(64, KvType::F16).unwrap();
        let mut out = Vec::new();
        m.forward(
            &pool,
            &mut [Seq { kv: &mut kv, tokens: &prompt, logits: Logits::All }],
            &mut out,
        )
        .unwrap();
        out
    };
    let want = logits(&plain);
    let got = logits(&tiled);
    assert_eq!(got.len(), want.len());
    let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "a model held tiled gives other logits on the CPU");
    let Some(b) = common::vulkan_backends(Placement::vulkan_all()) else { return };
    let vk = Model::load_with(tiled_copy(file), b).unwrap();
    compare("held tiled, on vulkan", &want, &logits(&vk));
}
