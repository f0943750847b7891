//! `unicorn`: the command-line client of unicornd.

mod bench;
mod bench_clients;
mod chat;
mod generate;
mod spawn;
mod stats;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Result};
use clap::{Parser, Subcommand, ValueEnum};
use unicorn::protocol::{DaemonStatus, DeviceKind};
use unicorn::{ClientOptions, Priority, WaitMode};

use stats::{fmt_bytes, fmt_duration, fmt_uptime, percentile};

/// unicorn: run LLMs on this machine's NPU, GPU and CPU, shared by every program through
/// unicornd.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Daemon socket [default: $UNICORN_SOCKET, else the system socket, else the user socket].
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Do not start a user daemon when none answers.
    #[arg(long, global = true)]
    no_spawn: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the daemon's version, uptime, sessions and devices.
    Status {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Generate a continuation of a prompt, streamed to stdout; speeds go to stderr.
    Run {
        #[command(flatten)]
        sampling: generate::SamplingArgs,
        /// One JSON object a line: each token (id and text), then a summary with the prompt's
        /// token ids and the timings.
        #[arg(long)]
        json: bool,
        /// The prompt.
        prompt: String,
    },
    /// Chat with the model through its chat template: turns from stdin, or one turn with -p.
    Chat {
        #[command(flatten)]
        sampling: generate::SamplingArgs,
        /// A system prompt.
        #[arg(long)]
        system: Option<String>,
        /// Send this one message, print the answer and exit.
        #[arg(short = 'p', long)]
        prompt: Option<String>,
        /// Chat template: `chatml`, `gemma`, or a Jinja file [default: the model's own, else by
        /// architecture].
        #[arg(long, value_name = "NAME|FILE")]
        chat_template: Option<String>,
    },
    /// Measure the round trip of empty jobs through the shared-memory rings.
    Ping {
        /// Number of pings.
        #[arg(short = 'n', long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
        /// How client and daemon wait for each other.
        #[arg(long, value_enum, default_value_t = Mode::Adaptive)]
        mode: Mode,
    },
    /// Benchmarks that print unicorn beside its peer, measured in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Debug, Subcommand)]
enum BenchWhat {
    /// Ring round trip (wake-ups and spin) beside a Unix-socket ping-pong, and ring throughput.
    Rings {
        /// Interleaved rounds; the table shows medians over rounds.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// Round trips per row per round.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(10..))]
        samples: u32,
        /// Submissions per batch in the throughput row.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=4096))]
        batch: u32,
        /// NOPs per throughput round.
        #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(1..))]
        jobs: u32,
    },
    /// Prefill and decode tokens/s through the daemon, one JSON object per measurement (the
    /// figures `scripts/bench model` prints beside llama.cpp's).
    Model {
        /// Model file [default: the default model from the model cache].
        #[arg(short = 'm', long, value_name = "FILE")]
        model: Option<PathBuf>,
        /// Prompt lengths to prefill, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "128,512")]
        prefill: Vec<usize>,
        /// Tokens to decode, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "128")]
        decode: Vec<usize>,
        /// Prompt tokens before decoding (not timed).
        #[arg(long, default_value_t = 16)]
        decode_prompt: usize,
        /// Timed runs per measurement; the median is reported.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
        /// Untimed runs first.
        #[arg(long, default_value_t = 1)]
        warmup: u32,
    },
    /// One client of `scripts/bench clients`: prefills, prints `ready`, waits for a line on
    /// stdin, decodes greedily one token at a time, prints one JSON line (latencies, tokens/s,
    /// start and end time, its memory), then waits for another line before it exits.
    DecodeWorker {
        /// Model file [default: the default model from the model cache].
        #[arg(short = 'm', long, value_name = "FILE")]
        model: Option<PathBuf>,
        /// Tokens to decode after the barrier (timed).
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
        tokens: u32,
        /// Prompt tokens prefilled before the barrier.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
        prompt_tokens: u32,
        /// Tokens decoded before the barrier (untimed).
        #[arg(long, default_value_t = 4)]
        warmup: u32,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// Spin briefly, then sleep (the default for every client).
    Adaptive,
    /// Always sleep on the doorbells.
    Sleep,
    /// Spin on both sides (1 ms budget).
    Spin,
}

impl Mode {
    fn wait(self) -> WaitMode {
        match self {
            Mode::Adaptive => WaitMode::Adaptive,
            Mode::Sleep => WaitMode::Sleep,
            Mode::Spin => WaitMode::Spin(Duration::from_millis(1)),
        }
    }
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("unicorn: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let opts = ClientOptions {
        socket: cli.socket.clone(),
        name: "unicorn".into(),
        priority: Priority::Normal,
        ..ClientOptions::default()
    };
    let spawn = !cli.no_spawn;
    match cli.command {
        Command::Status { json } => {
            let mut client = spawn::connect(&opts, spawn)?;
            let session = client.welcome().session_id;
            let st = client.status().map_err(|e| anyhow!("{e}"))?;
            if json {
                println!("{}", status_json(&st, session));
            } else {
                print_status(&st, session);
            }
            Ok(())
        }
        Command::Ping { count, mode } => {
            let opts = ClientOptions { wait: mode.wait(), ..opts };
            let mut client = spawn::connect(&opts, spawn)?;
            let mut rtts = Vec::with_capacity(count as usize);
            for _ in 0..count {
                rtts.push(client.ping().map_err(|e| anyhow!("{e}"))?);
            }
            rtts.sort_unstable();
            let mean = rtts.iter().sum::<Duration>() / count;
            println!(
                "{count} pings through the rings ({mode:?}) to {}:",
                client.socket_path().display()
            );
            println!(
                "  min {}  p50 {}  p90 {}  p99 {}  max {}  mean {}",
                fmt_duration(rtts[0]),
                fmt_duration(percentile(&rtts, 50.0)),
                fmt_duration(percentile(&rtts, 90.0)),
                fmt_duration(percentile(&rtts, 99.0)),
                fmt_duration(rtts[rtts.len() - 1]),
                fmt_duration(mean)
            );
            Ok(())
        }
        Command::Run { sampling, json, prompt } => {
            let client = spawn::connect_with_threads(&opts, spawn, sampling.threads)?;
            generate::run(client, &sampling, &prompt, json)
        }
        Command::Chat { sampling, system, prompt, chat_template } => {
            let client = spawn::connect_with_threads(&opts, spawn, sampling.threads)?;
            chat::run(
                client,
                &sampling,
                system.as_deref(),
                prompt.as_deref(),
                chat_template.as_deref(),
            )
        }
        Command::Bench {
            what: BenchWhat::Model { model, prefill, decode, decode_prompt, repeat, warmup },
        } => {
            let client = spawn::connect(&opts, spawn)?;
            let args = bench::ModelBenchArgs {
                model: generate::resolve_model(model.as_deref())?,
                prefill,
                decode,
                decode_prompt,
                repeat: repeat as usize,
                warmup: warmup as usize,
            };
            bench::model(client, &args)
        }
        Command::Bench {
            what: BenchWhat::DecodeWorker { model, tokens, prompt_tokens, warmup },
        } => {
            let opts = ClientOptions { name: "unicorn-bench-worker".into(), ..opts };
            let client = spawn::connect(&opts, spawn)?;
            let args = bench_clients::DecodeWorkerArgs {
                model: generate::resolve_model(model.as_deref())?,
                tokens: tokens as usize,
                prompt_tokens: prompt_tokens as usize,
                warmup: warmup as usize,
            };
            bench_clients::decode_worker(client, &args)
        }
        Command::Bench { what: BenchWhat::Rings { rounds, samples, batch, jobs } } => bench::run(
            &opts,
            spawn,
            bench::RingBenchArgs {
                rounds: rounds as usize,
                samples: samples as usize,
                batch: batch as usize,
                throughput_jobs: jobs as usize,
            },
        ),
    }
}

fn print_status(st: &DaemonStatus, own_session: u64) {
    println!(
        "unicornd {} (pid {}, {} mode), up {}",
        st.version,
        st.pid,
        if st.system_mode { "system" } else { "user" },
        fmt_uptime(st.uptime_ms)
    );
    println!("socket: {}", st.socket_path);
    println!(
        "sessions: {} now, {} served, {} disconnected for misbehaving; {} jobs completed",
        st.sessions.len(),
        st.sessions_served,
        st.sessions_disconnected,
        st.jobs_completed
    );
    println!("devices:");
    for kind in [DeviceKind::Cpu, DeviceKind::Gpu, DeviceKind::Npu] {
        let found: Vec<_> = st.devices.iter().filter(|d| d.kind == kind).collect();
        if found.is_empty() {
            println!("  {:<4} none found", kind.name());
        }
        for d in found {
            let used = if d.in_use { "in use" } else { "not used" };
            println!("  {:<4} {} [{used}] {}", kind.name(), d.name, d.detail);
        }
    }
    if !st.npu.summary.is_empty() {
        println!("npu: {}", st.npu.summary);
        for d in &st.npu.details {
            println!("     {d}");
        }
    }
    println!(
        "compute threads: {}; engine queue: {} job(s); {} steps, {} of them batching several contexts",
        st.threads, st.engine_queue, st.engine_steps, st.engine_batched_steps
    );
    println!("models:");
    if st.models.is_empty() {
        println!("  none loaded");
    }
    for m in &st.models {
        println!(
            "  {} ({}, {}, {}; {}) digest {}: {} session(s), {} context(s)",
            if m.name.is_empty() { "unnamed" } else { &m.name },
            m.arch,
            m.file_type,
            fmt_bytes(m.size_bytes),
            m.storage,
            &m.digest[..m.digest.len().min(16)],
            m.users,
            m.contexts
        );
    }
    println!("sessions:");
    println!(
        "  {:>5} {:>8} {:>6} {:<16} {:<12} {:>8} {:>10} {:>7} {:>9} {:>8} {:>6} {:>24} {:>9} {:>6}",
        "ID",
        "PID",
        "UID",
        "NAME",
        "PRIORITY",
        "UP",
        "JOBS",
        "FAILED",
        "IN FLIGHT",
        "BUFFERS",
        "MODELS",
        "CONTEXTS",
        "TOKENS",
        "TOK/S"
    );
    for s in &st.sessions {
        let me = if s.id == own_session { " (this command)" } else { "" };
        println!(
            "  {:>5} {:>8} {:>6} {:<16} {:<12} {:>8} {:>10} {:>7} {:>9} {:>8} {:>6} {:>24} {:>9} {:>6}{me}",
            s.id,
            s.pid,
            s.uid,
            s.name,
            s.priority.name(),
            fmt_uptime(s.connected_ms),
            s.jobs_completed,
            s.jobs_failed,
            s.jobs_in_flight,
            format!("{} ({})", s.buffers, fmt_bytes(s.buffer_bytes)),
            s.models,
            format!("{} ({} pos, {})", s.contexts, s.kv_tokens, fmt_bytes(s.kv_bytes)),
            s.tokens_decoded,
            format!("{:.1}", s.token_rate),
        );
    }
}

fn status_json(st: &DaemonStatus, own_session: u64) -> serde_json::Value {
    serde_json::json!({
        "version": st.version,
        "pid": st.pid,
        "mode": if st.system_mode { "system" } else { "user" },
        "uptime_ms": st.uptime_ms,
        "socket": st.socket_path,
        "sessions_served": st.sessions_served,
        "sessions_disconnected": st.sessions_disconnected,
        "jobs_completed": st.jobs_completed,
        "threads": st.threads,
        "engine_queue": st.engine_queue,
        "engine_steps": st.engine_steps,
        "engine_batched_steps": st.engine_batched_steps,
        "this_session": own_session,
        "models": st.models.iter().map(|m| serde_json::json!({
            "name": m.name, "arch": m.arch, "file_type": m.file_type, "size_bytes": m.size_bytes,
            "digest": m.digest, "sessions": m.users, "contexts": m.contexts, "storage": m.storage,
        })).collect::<Vec<_>>(),
        "npu": {
            "usable": st.npu.usable, "summary": st.npu.summary, "details": st.npu.details,
        },
        "devices": st.devices.iter().map(|d| serde_json::json!({
            "kind": d.kind.name(), "name": d.name, "in_use": d.in_use, "detail": d.detail,
        })).collect::<Vec<_>>(),
        "sessions": st.sessions.iter().map(|s| serde_json::json!({
            "id": s.id, "pid": s.pid, "uid": s.uid, "name": s.name,
            "priority": s.priority.name(), "connected_ms": s.connected_ms,
            "jobs_completed": s.jobs_completed, "jobs_failed": s.jobs_failed,
            "jobs_in_flight": s.jobs_in_flight, "buffers": s.buffers,
            "buffer_bytes": s.buffer_bytes, "models": s.models, "contexts": s.contexts,
            "kv_tokens": s.kv_tokens, "kv_bytes": s.kv_bytes, "tokens_decoded": s.tokens_decoded,
            "tokens_per_s": s.token_rate,
        })).collect::<Vec<_>>(),
    })
}
