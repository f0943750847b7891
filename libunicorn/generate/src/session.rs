//! A model and a context on it, and the token loop: decode a prompt, then sample token after
//! token through the daemon, handing out text as it completes.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use unicorn::protocol::vocab::Utf8Stream;
use unicorn::{Client, ContextParams, LogitsWanted, Model, ModelContext, SamplerParams};

use crate::{Error, Result};

/// A session with the daemon, a model it loaded and one context on it.
#[derive(Debug)]
pub struct Session {
    pub client: Client,
    pub model: Model,
    pub ctx: ModelContext,
    pub sampler: SamplerParams,
    /// Every token decoded in the context so far.
    pub tokens: Vec<u32>,
    /// Once set, the decode in flight is cancelled in the daemon and the loop ends with
    /// [`unicorn::Status::Cancelled`].
    cancel: Option<Arc<AtomicBool>>,
}

impl Session {
    /// Loads `path` (the daemon shares a model already loaded) and creates a context on it.
    pub fn open(mut client: Client, path: &Path, params: &ContextParams) -> Result<Session> {
        let model = client
            .load_model(path)
            .map_err(|source| Error::Load { path: path.to_owned(), source })?;
        let ctx = client.create_context(&model, params)?;
        Ok(Session {
            client,
            model,
            ctx,
            sampler: params.sampler,
            tokens: Vec::new(),
            cancel: None,
        })
    }

    /// Makes the next decodes watch `flag` (`None`: decodes cannot be cancelled).
    pub fn set_cancel(&mut self, flag: Option<Arc<AtomicBool>>) {
        self.cancel = flag;
    }

    /// Changes the sampler from the next decode on. Sent even when unchanged: it restarts the
    /// random sequence from the seed, so that a seeded request repeats on a reused context.
    pub fn set_sampler(&mut self, sampler: SamplerParams) -> Result<()> {
        self.client.set_sampler(&self.ctx, &sampler)?;
        self.sampler = sampler;
        Ok(())
    }

    /// The model's tokens for `text`, with special-token text parsed.
    pub fn tokenize(&mut self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        Ok(self.client.tokenize(&self.model, text, add_special, true)?)
    }

    fn decode_sample(&mut self, tokens: &[u32]) -> Result<u32> {
        let out = match &self.cancel {
            Some(flag) => {
                self.client.decode_cancellable(&self.ctx, tokens, LogitsWanted::None, true, flag)?
            }
            None => self.client.decode(&self.ctx, tokens, LogitsWanted::None, true)?,
        };
        out.token.ok_or(Error::NoToken)
    }

    /// Makes the context hold `prompt` (reusing the longest prefix it already holds) and
    /// returns the first sampled token.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<u32> {
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let mut keep = self.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        // At least one token must be decoded to get fresh logits.
        if keep == prompt.len() {
            keep -= 1;
        }
        if keep < self.tokens.len() {
            self.client.rewind(&self.ctx, keep as u32)?;
            self.tokens.truncate(keep);
        }
        // A failed or cancelled decode leaves the context where it was: `tokens` still says so.
        let next = self.decode_sample(&prompt[keep..])?;
        self.tokens.extend_from_slice(&prompt[keep..]);
        Ok(next)
    }

    /// Feeds one token and returns the next one sampled.
    pub fn step(&mut self, token: u32) -> Result<u32> {
        let next = self.decode_sample(&[token])?;
        self.tokens.push(token);
        Ok(next)
    }
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-generation token.
    Eog,
    /// The most tokens asked for.
    #[default]
    Length,
    /// The context is full.
    Context,
    /// The caller's callback said so (a stop string, a reader gone).
    Caller,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eog => "eog",
            StopReason::Length => "length",
            StopReason::Context => "context",
            StopReason::Caller => "caller",
        }
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
    pub stop: StopReason,
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

/// The token [`generate`] passes with text that completes no token of its own (the end of an
/// incomplete UTF-8 sequence, flushed at the end).
pub const NO_TOKEN: u32 = u32::MAX;

/// Generates at most `max` tokens after `prompt`, calling `on_piece(token, text)` as text
/// completes; `on_piece` may end generation early ([`StopReason::Caller`]) or fail.
pub fn generate<E: From<Error>>(
    s: &mut Session,
    prompt: &[u32],
    max: u32,
    ignore_eos: bool,
    mut on_piece: impl FnMut(u32, &str) -> Result<ControlFlow<()>, E>,
) -> Result<Generated, E> {
    let mut g = Generated { n_prompt: prompt.len(), ..Default::default() };
    let t0 = Instant::now();
    let mut next = s.prefill(prompt)?;
    g.prefill = t0.elapsed();
    let mut utf8 = Utf8Stream::new();
    let t1 = Instant::now();
    let n_ctx = s.ctx.n_ctx() as usize;
    for i in 0..max {
        if !ignore_eos && s.model.is_eog(next) {
            g.stop = StopReason::Eog;
            break;
        }
        let piece = s.model.token_to_piece(next, false).unwrap_or_default();
        let text = utf8.push(piece);
        g.tokens.push(next);
        g.text.push_str(&text);
        if on_piece(next, &text)?.is_break() {
            g.stop = StopReason::Caller;
            break;
        }
        if i + 1 == max {
            break;
        }
        if s.tokens.len() + 1 >= n_ctx {
            g.stop = StopReason::Context;
            break;
        }
        next = s.step(next)?;
    }
    let rest = utf8.finish();
    if !rest.is_empty() && g.stop != StopReason::Caller {
        g.text.push_str(&rest);
        // Generation is over: a request to stop changes nothing.
        let _ = on_piece(NO_TOKEN, &rest)?;
    }
    g.decode = t1.elapsed();
    Ok(g)
}
