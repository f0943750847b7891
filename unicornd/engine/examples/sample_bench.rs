//! Time of one sampling call over a vocabulary of random logits, for greedy decoding and for
//! llama.cpp's default chain (top-k 40, top-p 0.95, min-p 0.05, temperature 0.8), with and
//! without a repetition penalty: what the daemon spends per client and step after the forward
//! pass.
//!
//!     cargo run --release -p unicorn-engine --example sample_bench -- [N_VOCAB] [CALLS]
//!
//! (N_VOCAB defaults to 49152, SmolLM2's; CALLS to 2000. The figure is the mean over the calls.)

use std::time::Instant;

use unicorn_engine::sampling::{Sampler, SamplerParams};

fn main() {
    let arg = |i: usize, default: usize| -> usize {
        match std::env::args().nth(i) {
            None => default,
            Some(s) => s.parse().unwrap_or_else(|_| {
                eprintln!("usage: sample_bench [N_VOCAB] [CALLS] (positive numbers): {s}");
                std::process::exit(2);
            }),
        }
    };
    let (n_vocab, calls) = (arg(1, 49152).max(1), arg(2, 2000).max(1));
    // A fixed LCG: the same logits every run.
    let mut state = 1u64;
    let logits: Vec<f32> = (0..n_vocab)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 24) as f32 * 20.0 - 10.0
        })
        .collect();
    let history: Vec<u32> = (0..64).map(|i| (i * 701 % n_vocab) as u32).collect();
    let default = SamplerParams { seed: 5, ..SamplerParams::default() };
    let cases = [
        ("greedy", SamplerParams::greedy()),
        ("default chain", default),
        ("default chain, repeat penalty 1.1", SamplerParams { repeat_penalty: 1.1, ..default }),
    ];
    println!("{n_vocab} logits, {calls} calls each");
    for (name, params) in cases {
        let mut sampler = Sampler::new(params).expect("valid parameters");
        let t = Instant::now();
        let mut check = 0u64;
        for _ in 0..calls {
            check = check.wrapping_add(u64::from(sampler.sample(&logits, &history)));
        }
        let us = t.elapsed().as_secs_f64() / calls as f64 * 1e6;
        println!("{name:36} {us:8.1} us per call  (token sum {check})");
    }
}
