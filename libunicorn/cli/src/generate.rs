//! `unicorn run` and the sampling options `unicorn chat` shares; the generation loop itself is
//! `unicorn_generate`'s.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use unicorn::{Client, ContextParams, SamplerParams};
pub use unicorn_generate::model::resolve_model;
use unicorn_generate::session::NO_TOKEN;
use unicorn_generate::{generate, Session};

/// Sampling options shared by `run` and `chat`.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Model file (GGUF) [default: SmolLM2-135M-Instruct Q4_1 from the model cache].
    #[arg(short = 'm', long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    pub n_predict: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temperature: f32,
    /// Always take the most likely token (same as --temp 0).
    #[arg(long)]
    pub greedy: bool,
    /// Keep only the K most likely tokens (0: off).
    #[arg(long, default_value_t = 40)]
    pub top_k: u32,
    /// Keep the most likely tokens up to this total probability (1: off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one (0: off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalty for repeating recent tokens (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Random seed [default: from the clock; printed with --json].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Context size in tokens [default: the model's training context, at most 4096].
    #[arg(short = 'c', long, default_value_t = 0)]
    pub ctx_size: u32,
    /// Compute threads of the daemon this command starts, if it starts one [default: the
    /// physical cores]. A daemon that already runs keeps its own.
    #[arg(short = 't', long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// Keep generating after an end-of-generation token.
    #[arg(long)]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    pub fn sampler(&self) -> SamplerParams {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        SamplerParams {
            temperature: if self.greedy { 0.0 } else { self.temperature },
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: 64,
            seed,
        }
    }
}

/// Connects the model `args` names and a context with its sampler.
pub fn open_session(client: Client, args: &SamplingArgs) -> Result<Session> {
    let path = resolve_model(args.model.as_deref())?;
    let params = ContextParams { n_ctx: args.ctx_size, kv_f32: false, sampler: args.sampler() };
    Ok(Session::open(client, &path, &params)?)
}

/// `unicorn run`: generate a continuation of `prompt`.
pub fn run(client: Client, args: &SamplingArgs, prompt: &str, json: bool) -> Result<()> {
    let mut s = open_session(client, args)?;
    let ids = s.tokenize(prompt, true)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if !json {
        write!(out, "{prompt}")?;
        out.flush()?;
    }
    let g = generate(&mut s, &ids, args.n_predict, args.ignore_eos, |token, piece| {
        if json {
            if token != NO_TOKEN {
                writeln!(out, "{}", serde_json::json!({ "token": token, "piece": piece }))?;
            }
        } else {
            write!(out, "{piece}")?;
            out.flush()?;
        }
        anyhow::Ok(ControlFlow::Continue(()))
    })?;
    if json {
        let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
        let summary = serde_json::json!({
            "summary": {
                "model": s.model.info().name,
                "prompt_tokens": ids,
                "n_prompt": g.n_prompt,
                "n_generated": g.tokens.len(),
                "text": g.text,
                "stop": g.stop.as_str(),
                "seed": s.sampler.seed,
                "temperature": s.sampler.temperature,
                "prefill_ms": g.prefill.as_secs_f64() * 1e3,
                "prefill_tokens_per_s": rate(g.n_prompt, g.prefill),
                "decode_ms": g.decode.as_secs_f64() * 1e3,
                "decode_tokens_per_s": rate(g.tokens.len(), g.decode),
            }
        });
        writeln!(out, "{summary}")?;
    } else {
        writeln!(out)?;
        eprintln!("{}", g.report());
    }
    Ok(())
}
