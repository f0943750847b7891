//! Time of one decode step for N sequences batched together, against N = 1: how well a step
//! shares the weight reads across clients.
//!
//!     cargo run --release -p unicorn-engine --example batch_bench -- MODEL.gguf [THREADS] [N,N,..]
//!
//! (the batch sizes default to 1,2,4,8; one size alone is handy under a profiler)

use std::time::Instant;

use unicorn_engine::gguf::GgufFile;
use unicorn_engine::model::{KvType, Logits, Model, Seq};
use unicorn_kernels::ThreadPool;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: batch_bench MODEL.gguf [THREADS] [N,N,..]");
        std::process::exit(2);
    };
    let threads: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2);
    let model = match GgufFile::open(path)
        .map_err(|e| e.to_string())
        .and_then(|f| Model::load(f).map_err(|e| e.to_string()))
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!("batch_bench: {path}: {e}");
            std::process::exit(1);
        }
    };
    let sizes: Vec<usize> = match args.get(3) {
        Some(list) => match list.split(',').map(str::parse).collect() {
            Ok(v) => v,
            Err(_) => {
                eprintln!("batch_bench: batch sizes must be numbers separated by commas: {list}");
                std::process::exit(2);
            }
        },
        None => vec![1, 2, 4, 8],
    };
    let pool = ThreadPool::new(threads);
    let prompt: Vec<u32> = (100..116).collect();
    for n in sizes {
        let mut kvs: Vec<_> = (0..n).map(|_| model.new_state(512, KvType::F16).unwrap()).collect();
        let mut out = Vec::new();
        for kv in kvs.iter_mut() {
            model
                .forward(&pool, &mut [Seq { kv, tokens: &prompt, logits: Logits::Last }], &mut out)
                .unwrap();
        }
        let steps = 64;
        let t0 = Instant::now();
        for s in 0..steps {
            let toks = [200 + s as u32];
            let mut seqs: Vec<Seq<'_>> =
                kvs.iter_mut().map(|kv| Seq { kv, tokens: &toks, logits: Logits::Last }).collect();
            model.forward(&pool, &mut seqs, &mut out).unwrap();
        }
        let per = t0.elapsed().as_secs_f64() / steps as f64;
        println!("N={n}: {:.2} ms per step, {:.0} tokens/s aggregate", per * 1e3, n as f64 / per);
    }
}
