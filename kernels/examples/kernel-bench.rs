//! Times the matrix products at the shapes and tensor types of SmolLM2-135M (Q4_1) and Gemma 3
//! 270M Q4_K_M (whose file mixes Q5_0, Q8_0, Q4_K and Q6_K).
//!
//! `cargo run --release -p unicorn-kernels --example kernel-bench [-- --quick] [--model smollm2|gemma3]`
//! (`UNICORN_CPU=scalar|avx2` picks the kernels.)
//!
//! "hot" repeats one matrix, which then sits in cache; "cold" cycles through enough copies
//! (>= 256 MiB) that every call streams its weights from DRAM, as decoding a whole model does.
//! "decode" runs one token's worth of products in model order (every layer's q, k, v, o, gate,
//! up, down with the file's types, then the Q8_0 output projection), each layer with its own
//! weights: an upper bound on decode speed with everything but the matrix products free.

mod common;

use common::{gemma3_products, lcg, make, smollm2_products, view, Mat, Product};

use std::time::{Duration, Instant};

use unicorn_kernels::attention::{attention, AttnParams, KvCache, KvData};
use unicorn_kernels::ops::{self, Rope, RopeMode};
use unicorn_kernels::{f16, matmul, GgmlType, Isa, ThreadPool};

/// Fastest seconds per call of `f` over at least `reps` calls after a warm-up: the minimum,
/// not the median, because the machines this runs on are shared and other processes' time
/// slices only ever add.
fn time(reps: usize, mut f: impl FnMut(usize)) -> f64 {
    for i in 0..reps.min(3) {
        f(i);
    }
    let mut samples = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut i = 0;
    while samples.len() < reps || (Instant::now() < deadline && samples.len() < reps * 20) {
        let t = Instant::now();
        f(i);
        samples.push(t.elapsed().as_secs_f64());
        i += 1;
        if Instant::now() > deadline + Duration::from_secs(3) {
            break;
        }
    }
    samples.iter().copied().fold(f64::INFINITY, f64::min)
}

/// One matrix of a model: name, type, rows (outputs), cols (inputs).
type Shape = (&'static str, GgmlType, usize, usize);

struct Model {
    name: &'static str,
    /// Shapes timed one by one (and, where `batch`, as 128-token products).
    shapes: Vec<(Shape, bool)>,
    /// Each layer's products in order.
    layers: Vec<Vec<Product>>,
    output: Product,
    /// Query heads, KV heads, head size.
    attn: (usize, usize, usize),
}

fn smollm2() -> Model {
    let q = GgmlType::Q4_1;
    Model {
        name: "SmolLM2-135M Q4_1",
        shapes: vec![
            (("attn_q/o 576x576", q, 576, 576), true),
            (("attn_k/v 192x576", q, 192, 576), true),
            (("ffn_gate/up 1536x576", q, 1536, 576), true),
            (("ffn_down 576x1536", q, 576, 1536), true),
            (("output 49152x576", GgmlType::Q8_0, 49152, 576), false),
            (("q8_0 4096x576 (in L3)", GgmlType::Q8_0, 4096, 576), false),
            (("output 49152x576 f16", GgmlType::F16, 49152, 576), false),
        ],
        layers: smollm2_products().0,
        output: smollm2_products().1,
        attn: (9, 3, 64),
    }
}

/// Gemma 3 270M Q4_K_M (its types: [`gemma3_products`]).
fn gemma3() -> Model {
    use GgmlType::{Q4K, Q5_0, Q6K, Q8_0};
    Model {
        name: "Gemma 3 270M Q4_K_M",
        shapes: vec![
            (("attn_q 1024x640 q5_0", Q5_0, 1024, 640), true),
            (("attn_k/v 256x640 q5_0", Q5_0, 256, 640), true),
            (("attn_v 256x640 q8_0", Q8_0, 256, 640), true),
            (("attn_out 640x1024 q4_K", Q4K, 640, 1024), true),
            (("ffn_gate/up 2048x640 q5_0", Q5_0, 2048, 640), true),
            (("ffn_down 640x2048 q4_K", Q4K, 640, 2048), true),
            (("ffn_down 640x2048 q6_K", Q6K, 640, 2048), true),
            (("output 262144x640 q8_0", Q8_0, 262144, 640), false),
        ],
        layers: gemma3_products().0,
        output: gemma3_products().1,
        attn: (4, 1, 256),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = args.iter().position(|a| a == "--model").and_then(|i| args.get(i + 1)).cloned();
    println!("kernels: {:?}", Isa::current());
    let mut s = 1u64;
    for threads in [1, 2] {
        let pool = ThreadPool::new(threads);
        println!("\n== {threads} thread(s) ==");
        let sink = std::sync::atomic::AtomicUsize::new(0);
        let n = 100_000;
        let t = Instant::now();
        for _ in 0..n {
            pool.run(threads.max(2), |i| {
                sink.fetch_add(i, std::sync::atomic::Ordering::Relaxed);
            });
        }
        println!("pool.run dispatch + join: {:.2} us", t.elapsed().as_secs_f64() / n as f64 * 1e6);
        for (key, model) in [("smollm2", smollm2 as fn() -> Model), ("gemma3", gemma3)] {
            if only.as_deref().is_some_and(|o| o != key) {
                continue;
            }
            bench_model(&model(), &pool, threads, quick, &mut s);
        }
    }
}

fn bench_model(model: &Model, pool: &ThreadPool, threads: usize, quick: bool, s: &mut u64) {
    println!("\n-- {} --", model.name);
    println!(
        "{:<26} {:>7} {:>10} {:>8} {:>9} | {:>10} {:>8} {:>9}",
        "matvec (1 token)", "MiB", "hot us", "GB/s", "GFLOP/s", "cold us", "GB/s", "GFLOP/s"
    );
    for &((name, ty, rows, cols), _) in &model.shapes {
        if quick && ty == GgmlType::F16 {
            continue;
        }
        let one = make(ty, rows, cols, 7);
        let bytes = one.data.len() as f64;
        let copies = ((256 << 20) as f64 / bytes).ceil().max(2.0) as usize;
        let copies = if quick { copies.min(64) } else { copies };
        // Copies of one matrix: contents do not change the speed, and quantizing 256 MiB
        // of weights would take longer than the benchmark.
        let mats: Vec<Mat> = (0..copies)
            .map(|_| Mat { ty, rows, cols, data: one.data.clone(), tiles: None })
            .collect();
        let x: Vec<f32> = (0..cols).map(|_| lcg(s)).collect();
        let mut out = vec![0.0; rows];
        let flops = 2.0 * rows as f64 * cols as f64;
        let hot = time(50, |_| matmul(pool, &view(&one), &x, 1, &mut out).unwrap());
        let cold = time(50, |i| matmul(pool, &view(&mats[i % copies]), &x, 1, &mut out).unwrap());
        println!(
            "{:<26} {:>7.2} {:>10.1} {:>8.2} {:>9.2} | {:>10.1} {:>8.2} {:>9.2}",
            name,
            bytes / (1 << 20) as f64,
            hot * 1e6,
            bytes / hot / 1e9,
            flops / hot / 1e9,
            cold * 1e6,
            bytes / cold / 1e9,
            flops / cold / 1e9
        );
    }

    let n = 128;
    println!(
        "{:<26} {:>7} {:>10} {:>8} {:>9} {:>8}",
        "matmul (128 tokens)", "MiB", "ms", "tok/s", "GFLOP/s", "GB/s"
    );
    for &((name, ty, rows, cols), batch) in &model.shapes {
        if !batch {
            continue;
        }
        let m = make(ty, rows, cols, 9);
        let x: Vec<f32> = (0..n * cols).map(|_| lcg(s)).collect();
        let mut out = vec![0.0; n * rows];
        let t = time(10, |_| matmul(pool, &view(&m), &x, n, &mut out).unwrap());
        println!(
            "{:<26} {:>7.2} {:>10.3} {:>8.0} {:>9.2} {:>8.2}",
            name,
            m.data.len() as f64 / (1 << 20) as f64,
            t * 1e3,
            n as f64 / t,
            2.0 * (rows * cols * n) as f64 / t / 1e9,
            m.data.len() as f64 / t / 1e9
        );
    }

    // Attention over an f16 cache at the model's shape.
    let (n_head, n_kv, hd) = model.attn;
    let n_ctx = 2048;
    let kc: Vec<f16> = (0..n_kv * n_ctx * hd).map(|_| f16::from_f32(lcg(s))).collect();
    let vc: Vec<f16> = (0..n_kv * n_ctx * hd).map(|_| f16::from_f32(lcg(s))).collect();
    let kv =
        KvCache { k: KvData::F16(&kc), v: KvData::F16(&vc), n_kv_head: n_kv, n_ctx, head_dim: hd };
    for (n_q, kv_len) in [(1usize, 256usize), (1, 2048), (128, 128)] {
        let q: Vec<f32> = (0..n_q * n_head * hd).map(|_| lcg(s)).collect();
        let mut o = vec![0.0; q.len()];
        let p = AttnParams {
            n_head,
            scale: 1.0 / (hd as f32).sqrt(),
            pos0: kv_len - n_q,
            kv_len,
            causal: true,
            window: None,
            softcap: None,
        };
        let t = time(50, |_| attention(pool, &q, n_q, &kv, &p, &mut o).unwrap());
        println!(
            "attention {n_q} quer{} over {kv_len} keys ({n_head}/{n_kv} heads of {hd}, f16 cache): {:.1} us",
            if n_q == 1 { "y" } else { "ies" },
            t * 1e6
        );
    }
    if threads == 1 && model.attn == (9, 3, 64) {
        let x: Vec<f32> = (0..1536).map(|_| lcg(s)).collect();
        let w: Vec<f32> = (0..576).map(|_| lcg(s)).collect();
        let mut o = vec![0.0; 1536];
        let t_norm = time(1000, |_| ops::rms_norm(&x[..576], &mut o[..576], 576, Some(&w), 1e-5));
        let t_glu = time(1000, |_| ops::swiglu(&x, &x, &mut o));
        let rope = Rope { mode: RopeMode::Norm, n_dims: 64, freq_base: 100000.0, freq_scale: 1.0 };
        let mut cache = vec![0.0; 64];
        let mut qk = vec![0.5f32; 12 * 64];
        let t_rope = time(1000, |i| {
            rope.cache(i, &mut cache);
            rope.apply(&cache, &mut qk, 64);
        });
        println!(
            "rms_norm 576: {:.2} us, swiglu 1536: {:.2} us, rope q+k (12 heads, with table): {:.2} us",
            t_norm * 1e6,
            t_glu * 1e6,
            t_rope * 1e6
        );
    }

    // One token (or a 128-token prefill) through all of the model's products.
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
    let bytes: usize =
        layers.iter().flatten().map(|m| m.data.len()).sum::<usize>() + output.data.len();
    let width = layers.iter().flatten().map(|m| m.rows.max(m.cols)).max().unwrap_or(0);
    for n in [1usize, 128] {
        let x: Vec<f32> = (0..n * width).map(|_| lcg(s)).collect();
        let mut out = vec![0.0; n * width];
        let mut logits = vec![0.0; orows];
        let t = time(if n == 1 { 20 } else { 3 }, |_| {
            for l in &layers {
                for m in l {
                    let v = view(m);
                    matmul(pool, &v, &x[..n * v.cols()], n, &mut out[..n * v.rows()]).unwrap();
                }
            }
            // Only the last token's logits are needed.
            matmul(pool, &view(&output), &x[..ocols], 1, &mut logits).unwrap();
        });
        println!(
            "{} ({:.1} MiB weights): {:.2} ms -> {:.1} tok/s{}",
            if n == 1 { "decode step, products only" } else { "prefill of 128, products only" },
            bytes as f64 / (1 << 20) as f64,
            t * 1e3,
            n as f64 / t,
            if n == 1 { format!(", {:.2} GB/s", bytes as f64 / t / 1e9) } else { String::new() }
        );
    }
}
