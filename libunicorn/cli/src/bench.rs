//! `unicorn bench rings`: the ring round trip beside a Unix-socket ping-pong between the same
//! two processes, and ring throughput with batched submissions.
//!
//! Everything is measured in one run against one daemon, in interleaved rounds (each round
//! measures every row once, in turn), and the table shows the median over rounds of each
//! round's percentile, because the machines are shared and noisy.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use unicorn::{Client, ClientOptions, Completion, Job, WaitMode};

use crate::stats::{fmt_duration, median, percentile};

#[derive(Debug, Clone, Copy)]
pub struct RingBenchArgs {
    pub rounds: usize,
    pub samples: usize,
    pub batch: usize,
    pub throughput_jobs: usize,
}

struct Row {
    name: &'static str,
    p50: Vec<Duration>,
    p99: Vec<Duration>,
}

impl Row {
    fn new(name: &'static str) -> Row {
        Row { name, p50: Vec::new(), p99: Vec::new() }
    }

    fn add(&mut self, mut samples: Vec<Duration>) {
        samples.sort_unstable();
        self.p50.push(percentile(&samples, 50.0));
        self.p99.push(percentile(&samples, 99.0));
    }
}

fn spin_opts(base: &ClientOptions, wait: WaitMode, sq_entries: u32) -> ClientOptions {
    ClientOptions { wait, sq_entries, name: format!("{}-bench", base.name), ..base.clone() }
}

pub fn run(base: &ClientOptions, spawn: bool, args: RingBenchArgs) -> Result<()> {
    // One session per wait mode: the daemon's spin is a property of the session.
    let mut sleepy = crate::spawn::connect(&spin_opts(base, WaitMode::Sleep, 0), spawn)?;
    let spin = WaitMode::Spin(Duration::from_millis(1));
    let mut spinny = crate::spawn::connect(&spin_opts(base, spin, 1024), spawn)?;
    let mut adaptive = crate::spawn::connect(&spin_opts(base, WaitMode::Adaptive, 0), spawn)?;
    let status = sleepy.status().map_err(|e| anyhow!("{e}"))?;
    eprintln!(
        "unicorn bench rings: daemon pid {} at {}; {} rounds x {} samples, batch {}",
        status.pid,
        sleepy.socket_path().display(),
        args.rounds,
        args.samples,
        args.batch
    );

    let mut ring_sleep = Row::new("ring round trip, wake-ups (eventfd/socket doorbells)");
    let mut ring_spin = Row::new("ring round trip, spin (both sides poll)");
    let mut ring_adaptive = Row::new("ring round trip, adaptive (the default)");
    let mut socket = Row::new("Unix socket ping-pong (SOCK_SEQPACKET, 64 B)");
    let mut throughput = Vec::new();
    let payload = [0x5Au8; 64];
    for round in 0..args.rounds {
        // Rotate the order so no row always runs right after another.
        for step in 0..4 {
            match (round + step) % 4 {
                0 => {
                    settle();
                    ring_sleep.add(pings(&mut sleepy, args.samples)?);
                }
                1 => {
                    ring_spin.add(pings(&mut spinny, args.samples)?);
                }
                2 => {
                    settle();
                    ring_adaptive.add(pings(&mut adaptive, args.samples)?);
                }
                _ => {
                    settle();
                    socket.add(echoes(&mut sleepy, &payload, args.samples)?);
                }
            }
        }
        throughput.push(jobs_per_second(&mut spinny, args.batch, args.throughput_jobs)?);
        eprint!(".");
    }
    eprintln!();

    println!("{:<54} {:>10} {:>10}", "round trip (median of rounds)", "p50", "p99");
    for row in [&ring_sleep, &ring_adaptive, &ring_spin, &socket] {
        println!(
            "{:<54} {:>10} {:>10}",
            row.name,
            fmt_duration(median(&row.p50)),
            fmt_duration(median(&row.p99))
        );
    }
    let sock = median(&socket.p50).as_secs_f64();
    let ratio = |row: &Row| median(&row.p50).as_secs_f64() / sock;
    println!();
    println!(
        "ring p50 / socket p50: wake-ups {:.2}x, adaptive {:.2}x, spin {:.2}x",
        ratio(&ring_sleep),
        ratio(&ring_adaptive),
        ratio(&ring_spin)
    );
    let tput =
        median(&throughput.iter().map(|t| Duration::from_secs_f64(1.0 / t)).collect::<Vec<_>>());
    println!(
        "ring throughput, batches of {}: {:.2} M NOPs/s (median of {} rounds; min {:.2}, max {:.2})",
        args.batch,
        1.0 / tput.as_secs_f64() / 1e6,
        throughput.len(),
        throughput.iter().cloned().fold(f64::INFINITY, f64::min) / 1e6,
        throughput.iter().cloned().fold(0.0, f64::max) / 1e6,
    );
    Ok(())
}

/// Lets the daemon's spin from the previous row run out, so a wake-up row measures wake-ups.
fn settle() {
    std::thread::sleep(Duration::from_millis(5));
}

fn pings(c: &mut Client, n: usize) -> Result<Vec<Duration>> {
    for _ in 0..n / 10 {
        c.ping().map_err(|e| anyhow!("{e}"))?;
    }
    (0..n).map(|_| c.ping().map_err(|e| anyhow!("{e}"))).collect()
}

fn echoes(c: &mut Client, payload: &[u8], n: usize) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        let back = c.echo(payload).map_err(|e| anyhow!("{e}"))?;
        let rtt = t.elapsed();
        if back != payload {
            return Err(anyhow!("the echo came back different"));
        }
        if i >= n / 10 {
            out.push(rtt);
        }
    }
    Ok(out)
}

/// Pushes `total` NOPs in batches, reaping as they complete; returns NOPs per second.
fn jobs_per_second(c: &mut Client, batch: usize, total: usize) -> Result<f64> {
    let jobs: Vec<(Job, u64)> =
        (0..batch as u64).map(|i| (Job::Nop { delay: Duration::ZERO }, i)).collect();
    let mut done = Vec::with_capacity(batch * 2);
    let mut submitted = 0;
    let mut completed = 0;
    let start = Instant::now();
    while completed < total {
        if submitted < total {
            let want = batch.min(total - submitted);
            submitted += c.submit(&jobs[..want]).map_err(|e| anyhow!("{e}"))?;
        }
        done.clear();
        if c.reap(&mut done, usize::MAX).map_err(|e| anyhow!("{e}"))? == 0 {
            c.wait(Some(Duration::from_secs(10))).map_err(|e| anyhow!("{e}"))?;
        }
        if let Some(bad) = done.iter().find(|d: &&Completion| d.status != unicorn::Status::Ok) {
            return Err(anyhow!("a NOP failed: {bad:?}"));
        }
        completed += done.len();
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// The text benchmark prompts are cut from: the same as `scripts/peer-bench.py`'s, so both
/// engines see the same tokens.
const PROMPT_TEXT: &str = "The history of computing is a story of ideas that took decades to mature. Early machines filled rooms and were programmed by rewiring panels; later, stored programs, compilers and operating systems made them general tools. Today a small model can run on a laptop, turning a prompt into text one token at a time, and the speed of that loop depends on memory bandwidth, cache sizes, vector instructions and careful engineering of every kernel. ";

#[derive(Debug, Clone)]
pub struct ModelBenchArgs {
    pub model: std::path::PathBuf,
    pub prefill: Vec<usize>,
    pub decode: Vec<usize>,
    pub decode_prompt: usize,
    pub repeat: usize,
    pub warmup: usize,
}

/// `unicorn bench model`: prefill and decode speed through the daemon, measured the way
/// `scripts/peer-bench.py` measures llama.cpp (same prompt text, fresh context per prefill,
/// greedy single-token steps for decode, median of repeats after warm-up runs). One JSON
/// object per measurement on stdout.
pub fn model(client: Client, args: &ModelBenchArgs) -> Result<()> {
    use unicorn::{ContextParams, LogitsWanted, SamplerParams};
    let mut c = client;
    let m = c.load_model(&args.model).map_err(|e| anyhow!("{e}"))?;
    let base = c.tokenize(&m, PROMPT_TEXT, false, false).map_err(|e| anyhow!("{e}"))?;
    let tokens = |n: usize| -> Vec<u32> {
        let mut t = Vec::with_capacity(n);
        if m.info().add_bos && m.info().bos != u32::MAX {
            t.push(m.info().bos);
        }
        while t.len() < n {
            t.extend_from_slice(&base);
        }
        t.truncate(n);
        t
    };
    let longest = args
        .prefill
        .iter()
        .copied()
        .chain(args.decode.iter().map(|d| d + args.decode_prompt))
        .max()
        .unwrap_or(64);
    let n_ctx = longest.max(64).next_multiple_of(256) as u32;
    let ctx = c
        .create_context(&m, &ContextParams { n_ctx, kv_f32: false, sampler: SamplerParams::GREEDY })
        .map_err(|e| anyhow!("{e}"))?;
    let status = c.status().map_err(|e| anyhow!("{e}"))?;
    let mut run = |kind: &str, n: usize| -> Result<Duration> {
        c.rewind(&ctx, 0).map_err(|e| anyhow!("{e}"))?;
        if kind == "prefill" {
            let t = tokens(n);
            let start = Instant::now();
            c.decode(&ctx, &t, LogitsWanted::None, false).map_err(|e| anyhow!("{e}"))?;
            return Ok(start.elapsed());
        }
        let prompt = tokens(args.decode_prompt);
        let mut next =
            c.decode(&ctx, &prompt, LogitsWanted::None, true).map_err(|e| anyhow!("{e}"))?.token;
        let start = Instant::now();
        for _ in 0..n {
            let t = next.ok_or_else(|| anyhow!("no token sampled"))?;
            next =
                c.decode(&ctx, &[t], LogitsWanted::None, true).map_err(|e| anyhow!("{e}"))?.token;
        }
        Ok(start.elapsed())
    };
    let jobs: Vec<(&str, usize)> = args
        .prefill
        .iter()
        .map(|&n| ("prefill", n))
        .chain(args.decode.iter().map(|&n| ("decode", n)))
        .collect();
    for (kind, n) in jobs {
        for _ in 0..args.warmup {
            run(kind, n)?;
        }
        let mut times = Vec::with_capacity(args.repeat);
        for r in 0..args.repeat {
            let t = run(kind, n)?;
            eprintln!(
                "unicorn bench model: {kind} {n}: run {}/{}: {:.1} tok/s",
                r + 1,
                args.repeat,
                n as f64 / t.as_secs_f64()
            );
            times.push(t);
        }
        let med = median(&times).as_secs_f64();
        println!(
            "{}",
            serde_json::json!({
                "engine": "unicorn",
                "model": args.model.file_name().map(|f| f.to_string_lossy().into_owned()),
                "threads": status.threads,
                "kind": kind,
                "tokens": n,
                "tokens_per_s": (n as f64 / med * 100.0).round() / 100.0,
                "seconds_median": med,
                "runs_tokens_per_s": times.iter().map(|t| n as f64 / t.as_secs_f64()).collect::<Vec<_>>(),
                "daemon_pid": status.pid,
            })
        );
    }
    Ok(())
}
