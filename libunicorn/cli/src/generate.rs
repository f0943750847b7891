//! `unicorn run` and the generation loop `unicorn chat` shares: load a model, decode a prompt,
//! sample token after token through the daemon, stream the text.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Args;
use unicorn::protocol::vocab::Utf8Stream;
use unicorn::{Client, ContextParams, LogitsWanted, Model, ModelContext, SamplerParams};

/// The model `unicorn run` uses when none is named (fetched by `scripts/fetch-model`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where `scripts/fetch-model` caches models.
pub fn model_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("UNICORN_MODEL_DIR") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/".into())).join(".cache")
    });
    cache.join("unicorn/models")
}

/// `-m` or the default model, which must exist.
pub fn resolve_model(m: Option<&Path>) -> Result<PathBuf> {
    let path = match m {
        Some(p) => p.to_owned(),
        None => model_dir().join(DEFAULT_MODEL_FILE),
    };
    if !path.is_file() {
        if m.is_none() {
            bail!(
                "the default model is not downloaded yet ({}); fetch it with `scripts/fetch-model`, or name one with -m",
                path.display()
            );
        }
        bail!("{}: no such model file", path.display());
    }
    Ok(path)
}

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

/// A model and a context on it.
pub struct Session {
    pub client: Client,
    pub model: Model,
    pub ctx: ModelContext,
    pub sampler: SamplerParams,
    /// Every token decoded in the context so far.
    pub tokens: Vec<u32>,
}

impl Session {
    pub fn open(mut client: Client, args: &SamplingArgs) -> Result<Session> {
        let path = resolve_model(args.model.as_deref())?;
        let model = client
            .load_model(&path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("loading {}", path.display()))?;
        let sampler = args.sampler();
        let params = ContextParams { n_ctx: args.ctx_size, kv_f32: false, sampler };
        let ctx = client.create_context(&model, &params).map_err(|e| anyhow!("{e}"))?;
        Ok(Session { client, model, ctx, sampler, tokens: Vec::new() })
    }

    pub fn tokenize(&mut self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.client.tokenize(&self.model, text, add_special, true).map_err(|e| anyhow!("{e}"))
    }

    /// Makes the context hold `prompt` (reusing the longest prefix it already holds) and
    /// returns the first sampled token.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<u32> {
        if prompt.is_empty() {
            bail!("the prompt has no tokens");
        }
        let mut keep = self.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        // At least one token must be decoded to get fresh logits.
        if keep == prompt.len() {
            keep -= 1;
        }
        if keep < self.tokens.len() {
            self.client.rewind(&self.ctx, keep as u32).map_err(|e| anyhow!("{e}"))?;
            self.tokens.truncate(keep);
        }
        let out = self
            .client
            .decode(&self.ctx, &prompt[keep..], LogitsWanted::None, true)
            .map_err(|e| anyhow!("{e}"))?;
        self.tokens.extend_from_slice(&prompt[keep..]);
        out.token.ok_or_else(|| anyhow!("the daemon returned no token"))
    }

    /// Feeds one token and returns the next one sampled.
    pub fn step(&mut self, token: u32) -> Result<u32> {
        let out = self
            .client
            .decode(&self.ctx, &[token], LogitsWanted::None, true)
            .map_err(|e| anyhow!("{e}"))?;
        self.tokens.push(token);
        out.token.ok_or_else(|| anyhow!("the daemon returned no token"))
    }
}

/// Timings and ending of one generation.
#[derive(Debug, Default)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub text: String,
    pub prefill: Duration,
    pub n_prompt: usize,
    pub decode: Duration,
    /// Why generation stopped: `eog` (an end-of-generation token), `length` or `context`.
    pub stop: &'static str,
}

impl Generated {
    pub fn report(&self) -> String {
        let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
        format!(
            "prefill: {} tokens in {:.1} ms ({:.1} tokens/s); decode: {} tokens in {:.1} ms ({:.1} tokens/s)",
            self.n_prompt,
            self.prefill.as_secs_f64() * 1e3,
            rate(self.n_prompt, self.prefill),
            self.tokens.len(),
            self.decode.as_secs_f64() * 1e3,
            rate(self.tokens.len(), self.decode)
        )
    }
}

/// Generates after `prompt`, calling `on_piece(token, text)` as text completes.
pub fn generate(
    s: &mut Session,
    prompt: &[u32],
    max: u32,
    ignore_eos: bool,
    mut on_piece: impl FnMut(u32, &str) -> Result<()>,
) -> Result<Generated> {
    let mut g = Generated { n_prompt: prompt.len(), stop: "length", ..Default::default() };
    let t0 = Instant::now();
    let mut next = s.prefill(prompt)?;
    g.prefill = t0.elapsed();
    let mut utf8 = Utf8Stream::new();
    let t1 = Instant::now();
    let n_ctx = s.ctx.n_ctx() as usize;
    for i in 0..max {
        if !ignore_eos && s.model.is_eog(next) {
            g.stop = "eog";
            break;
        }
        let piece = s.model.token_to_piece(next, false).unwrap_or_default();
        let text = utf8.push(piece);
        g.tokens.push(next);
        g.text.push_str(&text);
        on_piece(next, &text)?;
        if i + 1 == max {
            break;
        }
        if s.tokens.len() + 1 >= n_ctx {
            g.stop = "context";
            break;
        }
        next = s.step(next)?;
    }
    let rest = utf8.finish();
    if !rest.is_empty() {
        g.text.push_str(&rest);
        on_piece(u32::MAX, &rest)?;
    }
    g.decode = t1.elapsed();
    Ok(g)
}

/// `unicorn run`: generate a continuation of `prompt`.
pub fn run(client: Client, args: &SamplingArgs, prompt: &str, json: bool) -> Result<()> {
    let mut s = Session::open(client, args)?;
    let ids = s.tokenize(prompt, true)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if !json {
        write!(out, "{prompt}")?;
        out.flush()?;
    }
    let g = generate(&mut s, &ids, args.n_predict, args.ignore_eos, |token, piece| {
        if json {
            if token != u32::MAX {
                writeln!(out, "{}", serde_json::json!({ "token": token, "piece": piece }))?;
            }
        } else {
            write!(out, "{piece}")?;
            out.flush()?;
        }
        Ok(())
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
                "stop": g.stop,
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
