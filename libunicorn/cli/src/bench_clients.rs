//! `unicorn bench decode-worker`: one client process of the many-clients benchmark
//! (`scripts/bench clients`, which runs `scripts/bench-clients.py`).
//!
//! The worker loads the model through the daemon (which shares it between processes), prefills
//! a prompt cut from the same text as `scripts/peer-bench.py`'s, decodes a few untimed tokens,
//! then prints `ready` and waits for a line on stdin: the orchestrator releases every worker at
//! once. It then decodes greedily one token per `DECODE`, timing each, and prints one JSON line:
//! the per-token latency summary, its tokens/s, the wall-clock start and end (Unix time in
//! nanoseconds, comparable across processes, so the orchestrator can take the aggregate over
//! the span of all of them), and its own resident memory. Last it waits for one more line (or
//! the end of stdin) before it exits, so that the orchestrator can read every process's memory
//! while they are all still alive. `scripts/peer-worker.py` is the same worker for llama.cpp.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context as _, Result};
use unicorn::{Client, ContextParams, LogitsWanted, SamplerParams};

use crate::stats::percentile;

/// The text the prompt is cut from: the same as `bench.rs`'s and `scripts/peer-bench.py`'s, so
/// every engine sees the same tokens (a test checks it against `bench.rs`).
const PROMPT_TEXT: &str = "The history of computing is a story of ideas that took decades to mature. Early machines filled rooms and were programmed by rewiring panels; later, stored programs, compilers and operating systems made them general tools. Today a small model can run on a laptop, turning a prompt into text one token at a time, and the speed of that loop depends on memory bandwidth, cache sizes, vector instructions and careful engineering of every kernel. ";

/// How many generated token ids the JSON line shows (a check that every worker, of either
/// engine, generated the same text).
const HEAD_TOKENS: usize = 16;

#[derive(Debug, Clone)]
pub struct DecodeWorkerArgs {
    pub model: PathBuf,
    /// Timed decode steps.
    pub tokens: usize,
    /// Prompt tokens prefilled before the barrier.
    pub prompt_tokens: usize,
    /// Untimed decode steps before the barrier.
    pub warmup: usize,
}

/// Runs one worker: see the module comment.
pub fn decode_worker(client: Client, args: &DecodeWorkerArgs) -> Result<()> {
    let mut c = client;
    let status = c.status().map_err(|e| anyhow!("{e}"))?;
    let m = c.load_model(&args.model).map_err(|e| anyhow!("{e}"))?;
    let base = c.tokenize(&m, PROMPT_TEXT, false, false).map_err(|e| anyhow!("{e}"))?;
    let mut prompt = Vec::with_capacity(args.prompt_tokens);
    if m.info().add_bos && m.info().bos != u32::MAX {
        prompt.push(m.info().bos);
    }
    while prompt.len() < args.prompt_tokens {
        prompt.extend_from_slice(&base);
    }
    prompt.truncate(args.prompt_tokens);
    if prompt.is_empty() {
        return Err(anyhow!("--prompt-tokens must be at least 1"));
    }
    let n_ctx = (args.prompt_tokens + args.warmup + args.tokens).max(64).next_multiple_of(256);
    let n_ctx = u32::try_from(n_ctx).map_err(|_| anyhow!("{n_ctx} positions are too many"))?;
    let ctx = c
        .create_context(&m, &ContextParams { n_ctx, kv_f32: false, sampler: SamplerParams::GREEDY })
        .map_err(|e| anyhow!("{e}"))?;
    let step = |c: &mut Client, tokens: &[u32]| -> Result<u32> {
        c.decode(&ctx, tokens, LogitsWanted::None, true)
            .map_err(|e| anyhow!("{e}"))?
            .token
            .ok_or_else(|| anyhow!("no token sampled"))
    };
    let mut next = step(&mut c, &prompt)?;
    for _ in 0..args.warmup {
        next = step(&mut c, &[next])?;
    }

    barrier("ready")?;
    let start_ns = unix_ns();
    let t0 = Instant::now();
    let mut latencies = Vec::with_capacity(args.tokens);
    let mut head = Vec::with_capacity(HEAD_TOKENS);
    for _ in 0..args.tokens {
        let t = Instant::now();
        next = step(&mut c, &[next])?;
        latencies.push(t.elapsed());
        if head.len() < HEAD_TOKENS {
            head.push(next);
        }
    }
    let elapsed = t0.elapsed();
    let end_ns = unix_ns();

    let (rss, hwm) = (proc_status_kib("VmRSS"), proc_status_kib("VmHWM"));
    let mean = latencies.iter().sum::<Duration>().checked_div(latencies.len() as u32);
    latencies.sort_unstable();
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    println!(
        "{}",
        serde_json::json!({
            "engine": "unicorn",
            "pid": std::process::id(),
            "model": args.model.file_name().map(|f| f.to_string_lossy().into_owned()),
            "threads": status.threads,
            "daemon_pid": status.pid,
            "tokens": args.tokens,
            "prompt_tokens": args.prompt_tokens,
            "warmup": args.warmup,
            "start_ns": start_ns,
            "end_ns": end_ns,
            "seconds": elapsed.as_secs_f64(),
            "tokens_per_s": args.tokens as f64 / elapsed.as_secs_f64(),
            "p50_ms": ms(percentile(&latencies, 50.0)),
            "p99_ms": ms(percentile(&latencies, 99.0)),
            "mean_ms": ms(mean.unwrap_or_default()),
            "max_ms": ms(latencies.last().copied().unwrap_or_default()),
            "rss_kib": rss,
            "hwm_kib": hwm,
            "head": head,
        })
    );
    std::io::stdout().flush()?;
    // Stay alive (with the context) until the orchestrator has read everyone's memory.
    barrier_quiet()?;
    Ok(())
}

/// Prints `word` and waits for a line on stdin (the end of stdin releases too).
fn barrier(word: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{word}")?;
    out.flush()?;
    drop(out);
    barrier_quiet()
}

fn barrier_quiet() -> Result<()> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("reading the barrier from stdin")?;
    Ok(())
}

/// Wall-clock time in nanoseconds since the Unix epoch: the one clock every process (and
/// Python's `time.time_ns()`) reads the same.
fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// A `kB` field of `/proc/self/status` (0 when absent).
fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_text_matches_the_model_benchmark() {
        assert!(include_str!("bench.rs").contains(PROMPT_TEXT));
        // The C client of the same benchmark, as one C string literal.
        let c = include_str!("../../../scripts/decode-worker.c");
        assert!(c.contains(&format!("\n    \"{PROMPT_TEXT}\";\n")));
    }

    #[test]
    fn reads_own_memory() {
        assert!(proc_status_kib("VmRSS") > 0);
        assert!(proc_status_kib("VmHWM") >= proc_status_kib("VmRSS") / 2);
        assert_eq!(proc_status_kib("NoSuchField"), 0);
    }
}
