//! Greedy generation straight from the engine, with prefill and decode speeds: a tool for
//! profiling the forward pass without the daemon.
//!
//!     cargo run --release -p unicorn-engine --example generate -- MODEL.gguf "PROMPT" [N] [THREADS]
//!
//! With `UNICORN_BACKEND` naming `xdna`, it discovers the NPU and loads the kernel manifest as
//! the daemon does, and prints what ran on the NPU and what fell back to the CPU.

use std::time::Instant;

use unicorn_engine::gguf::GgufFile;
use unicorn_engine::model::{discover_npu, set_npu_offer, KvType, Logits, Model, Seq, BACKEND_ENV};
use unicorn_kernels::ThreadPool;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: generate MODEL.gguf PROMPT [N_TOKENS] [THREADS]");
        std::process::exit(2);
    }
    let n: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(64);
    let threads: usize =
        args.get(4).and_then(|s| s.parse().ok()).unwrap_or_else(unicorn_kernels::default_threads);
    // The NPU is offered only where discovery ran (the daemon runs it at start).
    if std::env::var(BACKEND_ENV).is_ok_and(|v| v.contains("xdna")) {
        let d = discover_npu(true);
        eprintln!("npu: {}", d.report);
        if let Some(m) = &d.manifest {
            eprintln!("npu: {}", m.as_ref().map_or_else(|e| e.clone(), |m| m.summary()));
        }
        set_npu_offer(d.offer);
    }
    let model = Model::load(GgufFile::open(&args[1]).expect("open")).expect("load");
    eprintln!("placement: {}", model.backends().describe());
    let pool = ThreadPool::new(threads);
    eprintln!("placement: {}", model.backends().describe());
    for f in model.backends().fallbacks() {
        eprintln!("fallback: {f}");
    }
    let tok = model.tokenizer();
    let prompt = tok.tokenize(&args[2], true, true);
    let mut kv = model.new_state(prompt.len() + n + 1, KvType::F16).expect("kv");
    let mut logits = Vec::new();
    let t0 = Instant::now();
    model
        .forward(
            &pool,
            &mut [Seq { kv: &mut kv, tokens: &prompt, logits: Logits::Last }],
            &mut logits,
        )
        .expect("prefill");
    let prefill = t0.elapsed();
    let mut out = tok.stream_decoder(false);
    let mut text = String::new();
    let submits = || model.vulkan_stats().map_or(0, |s| s.submits);
    let after_prefill = submits();
    let t1 = Instant::now();
    for _ in 0..n {
        let next =
            (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap() as u32;
        text.push_str(&out.push(next).expect("piece"));
        model
            .forward(
                &pool,
                &mut [Seq { kv: &mut kv, tokens: &[next], logits: Logits::Last }],
                &mut logits,
            )
            .expect("decode");
    }
    let decode = t1.elapsed();
    println!("{}{}", args[2], text);
    if let Some(s) = model.vulkan_stats() {
        eprintln!(
            "vulkan: {} submissions for the prompt, {:.1} per decode step",
            after_prefill,
            (s.submits - after_prefill) as f64 / n.max(1) as f64
        );
    }
    eprintln!(
        "prefill {} tokens: {:.1} tok/s; decode {n} tokens: {:.1} tok/s ({threads} threads)",
        prompt.len(),
        prompt.len() as f64 / prefill.as_secs_f64(),
        n as f64 / decode.as_secs_f64()
    );
    if let Some(rt) = model.backends().npu_runtime() {
        let s = rt.stats();
        eprintln!(
            "npu: {} kernel runs completed, {} fell back to the cpu, retired {:?}{}",
            s.runs,
            s.fallbacks,
            rt.retired(),
            if rt.device().is_test_double() { " [TEST DOUBLE: nothing computed]" } else { "" }
        );
    }
}
