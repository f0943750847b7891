//! Prefill and decode tokens/s of one model on the placement `UNICORN_BACKEND` asks for, as one
//! JSON line (scripts/bench-gpu runs it per model and backend and prints the table).
//!
//!     cargo run --release -p unicorn-engine --example backend_bench -- MODEL.gguf \
//!         [--prompt 128] [--gen 64] [--threads N]
//!
//! The prompt is `--prompt` token ids (one prefill pass), then `--gen` single-token decode passes
//! (greedy: each pass feeds the previous pass's top token). With Vulkan in use the line also has
//! the device, the submissions per decode step, and, with `UNICORN_VULKAN_TIMING=1`, the device
//! time per kind of operation of the last decode step.

use std::time::Instant;

use unicorn_engine::gguf::GgufFile;
use unicorn_engine::model::{KvType, Logits, Model, Seq};
use unicorn_kernels::ThreadPool;

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse().unwrap_or_else(|_| {
                eprintln!("backend_bench: {name} {v}: not a number");
                std::process::exit(2);
            })
        })
        .unwrap_or(default)
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("backend_bench: {e}");
    std::process::exit(1);
}

fn argmax(row: &[f32]) -> u32 {
    (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0) as u32
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1).filter(|a| !a.starts_with("--")) else {
        eprintln!("usage: backend_bench MODEL.gguf [--prompt N] [--gen N] [--threads N]");
        std::process::exit(2);
    };
    let (n_prompt, n_gen) = (arg(&args, "--prompt", 128).max(1), arg(&args, "--gen", 64).max(1));
    let threads = arg(&args, "--threads", unicorn_kernels::default_threads());
    let model =
        Model::load(GgufFile::open(path).unwrap_or_else(|e| fail(e))).unwrap_or_else(|e| fail(e));
    let pool = ThreadPool::new(threads);
    let n_vocab = model.hparams().n_vocab as u32;
    let mut kv = model.new_state(n_prompt + n_gen + 1, KvType::F16).unwrap_or_else(|e| fail(e));
    let prompt: Vec<u32> = (0..n_prompt as u32).map(|i| 100 + i * 7 % (n_vocab - 100)).collect();
    let mut out = Vec::new();

    let t0 = Instant::now();
    let mut seqs = [Seq { kv: &mut kv, tokens: &prompt, logits: Logits::Last }];
    model.forward(&pool, &mut seqs, &mut out).unwrap_or_else(|e| fail(e));
    let prefill = t0.elapsed().as_secs_f64();

    let before = model.vulkan_stats().unwrap_or_default();
    let t0 = Instant::now();
    for _ in 0..n_gen {
        let tok = [argmax(&out)];
        let mut seqs = [Seq { kv: &mut kv, tokens: &tok, logits: Logits::Last }];
        model.forward(&pool, &mut seqs, &mut out).unwrap_or_else(|e| fail(e));
    }
    let decode = t0.elapsed().as_secs_f64();
    let after = model.vulkan_stats().unwrap_or_default();

    let b = model.backends();
    let timings: Vec<String> = model
        .vulkan_timings()
        .iter()
        .map(|t| format!("{{\"op\":\"{}\",\"count\":{},\"ms\":{:.4}}}", t.op, t.count, t.ns / 1e6))
        .collect();
    println!(
        "{{\"model\":\"{}\",\"placement\":\"{}\",\"device\":\"{}\",\"threads\":{threads},\
         \"prompt\":{n_prompt},\"gen\":{n_gen},\"prefill_tok_s\":{:.2},\"decode_tok_s\":{:.2},\
         \"submits_per_decode_step\":{:.1},\"dispatches_per_decode_step\":{:.1},\
         \"last_step_device_time\":[{}]}}",
        model.name().replace('"', "'"),
        b.placement(),
        b.vulkan_device().unwrap_or("cpu").replace('"', "'"),
        n_prompt as f64 / prefill,
        n_gen as f64 / decode,
        (after.submits - before.submits) as f64 / n_gen as f64,
        (after.dispatches - before.dispatches) as f64 / n_gen as f64,
        timings.join(",")
    );
}
