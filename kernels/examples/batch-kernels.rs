//! Times the quantized matrix products of a batched decode step (2 to 8 tokens, and prefill
//! sizes) at the shapes of SmolLM2-135M (Q4_1, Q8_0 output) and Gemma 3 270M Q4_K_M (Q5_0,
//! Q8_0, Q4_K, Q6_K), one matrix at a time and as a whole step.
//!
//! `cargo run --release -p unicorn-kernels --example batch-kernels [-- --model smollm2|gemma3]
//! [--threads N] [--tokens 1,2,4,8] [--reps N] [--step-only] [--shapes-only] [--check] [--big] [--tiled]`
//!
//! `--big` times the model's output projection alone (with `--shapes-only`). `--tiled` gives
//! the Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 matrices their copy tiled eight rows wide, as the engine does.
//!
//! Per matrix: microseconds per call (the fastest of many: the machines are shared) with the
//! weights in cache ("hot": the same matrix again), and GFLOP/s. "step": one decode step's
//! products in model order, every layer with its own weights (so they stream from DRAM as in
//! the engine), plus the output projection for every token; this is the part of a batched step
//! the kernels own. `--check` compares every product against the scalar reference: bit for bit
//! where the SIMD path claims it, else within the documented bound (it prints the largest
//! relative difference).

mod common;

use common::{gemma3_products, lcg, make, smollm2_products, view, Mat, Product};

use std::time::{Duration, Instant};

use unicorn_kernels::matmul::matmul_on;
use unicorn_kernels::{GgmlType, Isa, ThreadPool};

/// Fastest seconds per call of `f` over at least `reps` calls after a warm-up.
fn time(reps: usize, budget_ms: u64, mut f: impl FnMut()) -> f64 {
    for _ in 0..reps.min(3) {
        f();
    }
    let mut best = f64::INFINITY;
    let deadline = Instant::now() + Duration::from_millis(budget_ms);
    let mut n = 0;
    while n < reps || Instant::now() < deadline {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        n += 1;
        if n >= reps * 50 {
            break;
        }
    }
    best
}

type Shape = (&'static str, GgmlType, usize, usize);

struct Model {
    shapes: Vec<Shape>,
    layers: Vec<Vec<Product>>,
    output: Product,
}

fn smollm2() -> Model {
    let q = GgmlType::Q4_1;
    Model {
        shapes: vec![
            ("attn_q/o 576x576 q4_1", q, 576, 576),
            ("attn_k/v 192x576 q4_1", q, 192, 576),
            ("ffn_gate/up 1536x576 q4_1", q, 1536, 576),
            ("ffn_down 576x1536 q4_1", q, 576, 1536),
            ("q8_0 4096x576", GgmlType::Q8_0, 4096, 576),
        ],
        layers: smollm2_products().0,
        output: smollm2_products().1,
    }
}

fn gemma3() -> Model {
    use GgmlType::{Q4K, Q5_0, Q6K, Q8_0};
    Model {
        shapes: vec![
            ("attn_q 1024x640 q5_0", Q5_0, 1024, 640),
            ("attn_k/v 256x640 q5_0", Q5_0, 256, 640),
            ("attn_v 256x640 q8_0", Q8_0, 256, 640),
            ("attn_out 640x1024 q4_K", Q4K, 640, 1024),
            ("ffn_gate/up 2048x640 q5_0", Q5_0, 2048, 640),
            ("ffn_down 640x2048 q4_K", Q4K, 640, 2048),
            ("ffn_down 640x2048 q6_K", Q6K, 640, 2048),
            ("q8_0 4096x640", Q8_0, 4096, 640),
        ],
        layers: gemma3_products().0,
        output: gemma3_products().1,
    }
}

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(|s| s.as_str())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model_name = arg(&args, "--model").unwrap_or("smollm2");
    let threads: usize = arg(&args, "--threads").and_then(|s| s.parse().ok()).unwrap_or(2);
    let reps: usize = arg(&args, "--reps").and_then(|s| s.parse().ok()).unwrap_or(20);
    let tokens: Vec<usize> = arg(&args, "--tokens")
        .unwrap_or("1,2,3,4,5,8,16,128")
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let step_only = args.iter().any(|a| a == "--step-only");
    let shapes_only = args.iter().any(|a| a == "--shapes-only");
    let check = args.iter().any(|a| a == "--check");
    let big = args.iter().any(|a| a == "--big");
    common::set_tiled(args.iter().any(|a| a == "--tiled"));
    let mut model = match model_name {
        "gemma3" => gemma3(),
        _ => smollm2(),
    };
    if big {
        // The output projection alone: larger than any cache, so every call streams it.
        let (ty, rows, cols) = model.output;
        model.shapes = vec![("output (streams from DRAM)", ty, rows, cols)];
    }
    let isa = Isa::current();
    let pool = ThreadPool::new(threads);
    println!("kernels: {isa:?}, {threads} thread(s), model {model_name}");
    let mut s = 1u64;

    if check {
        let mut worst = 0.0f64;
        let mut invariant = true;
        for &(name, ty, rows, cols) in &model.shapes {
            let m = make(ty, rows.min(301), cols, 3);
            for &n in &tokens {
                let x: Vec<f32> = (0..n * cols).map(|_| lcg(&mut s)).collect();
                let mut want = vec![0.0; n * m.rows];
                let mut got = vec![0.0; n * m.rows];
                matmul_on(Isa::scalar(), &pool, &view(&m), &x, n, &mut want).unwrap();
                matmul_on(isa, &pool, &view(&m), &x, n, &mut got).unwrap();
                let (mut same, mut rel) = (0usize, 0.0f64);
                for (g, w) in got.iter().zip(&want) {
                    same += usize::from(g.to_bits() == w.to_bits());
                    rel = rel.max(f64::from((g - w).abs()) / f64::from(w.abs()).max(1e-3));
                }
                worst = worst.max(rel);
                // Each token alone must give its batched column bit for bit.
                let mut alone_same = 0usize;
                let mut one = vec![0.0; m.rows];
                for t in 0..n {
                    matmul_on(isa, &pool, &view(&m), &x[t * cols..(t + 1) * cols], 1, &mut one)
                        .unwrap();
                    for (r, v) in one.iter().enumerate() {
                        alone_same += usize::from(v.to_bits() == got[t * m.rows + r].to_bits());
                    }
                }
                invariant &= alone_same == got.len();
                println!(
                    "check {name:<28} n={n:<4} same as scalar {same}/{}, same as alone {alone_same}/{}, max rel diff to scalar {rel:.2e}",
                    got.len(), got.len()
                );
            }
        }
        println!(
            "worst relative difference to scalar {worst:.2e}; batches equal solo: {invariant}"
        );
        assert!(invariant, "a batched product differs from the token's solo product");
        return;
    }

    if !step_only {
        print!("{:<28}", "hot us (GFLOP/s)");
        for &n in &tokens {
            print!(" {:>17}", format!("n={n}"));
        }
        println!();
        for &(name, ty, rows, cols) in &model.shapes {
            let m = make(ty, rows, cols, 7);
            print!("{name:<28}");
            for &n in &tokens {
                let x: Vec<f32> = (0..n * cols).map(|_| lcg(&mut s)).collect();
                let mut out = vec![0.0; n * rows];
                let r = if n >= 64 { reps.div_ceil(4) } else { reps };
                let t = time(r, 300, || matmul_on(isa, &pool, &view(&m), &x, n, &mut out).unwrap());
                let gf = 2.0 * (rows * cols * n) as f64 / t / 1e9;
                print!(" {:>17}", format!("{:.1} ({gf:.1})", t * 1e6));
            }
            println!();
        }
    }
    if shapes_only {
        return;
    }

    // A decode step's products, each layer with its own weights, then the output projection.
    let layers: Vec<Vec<Mat>> = model
        .layers
        .iter()
        .enumerate()
        .map(|(l, mats)| {
            mats.iter()
                .enumerate()
                .map(|(i, &(ty, rows, cols))| make(ty, rows, cols, (l * 10 + i) as u64))
                .collect()
        })
        .collect();
    let (oty, orows, ocols) = model.output;
    let output = make(oty, orows, ocols, 1000);
    let width = layers.iter().flatten().map(|m| m.rows.max(m.cols)).max().unwrap_or(0);
    let flops_tok: f64 = layers.iter().flatten().map(|m| 2.0 * (m.rows * m.cols) as f64).sum();
    let out_flops = 2.0 * (orows * ocols) as f64;
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>12} {:>10}",
        "step", "layers ms", "output ms", "total ms", "ms/token", "GFLOP/s"
    );
    for &n in &tokens {
        if n > 16 {
            continue;
        }
        let x: Vec<f32> = (0..n * width).map(|_| lcg(&mut s)).collect();
        let mut out = vec![0.0; n * width];
        let mut logits = vec![0.0; n * orows];
        let tl = time(reps.div_ceil(4).max(3), 1500, || {
            for l in &layers {
                for m in l {
                    let v = view(m);
                    matmul_on(isa, &pool, &v, &x[..n * v.cols()], n, &mut out[..n * v.rows()])
                        .unwrap();
                }
            }
        });
        let to = time(reps.div_ceil(4).max(3), 1500, || {
            matmul_on(isa, &pool, &view(&output), &x[..n * ocols], n, &mut logits).unwrap();
        });
        println!(
            "{:<10} {:>10.2} {:>10.2} {:>10.2} {:>12.2} {:>10.1}",
            format!("n={n}"),
            tl * 1e3,
            to * 1e3,
            (tl + to) * 1e3,
            (tl + to) * 1e3 / n as f64,
            n as f64 * (flops_tok + out_flops) / (tl + to) / 1e9
        );
    }
}
