//! Models and contexts, from the client's side.
//!
//! A model is loaded by the daemon from a descriptor this process opens; its vocabulary comes
//! back with it, so turning tokens into text needs no round trip. A context is a sequence on a
//! model (KV cache, position, sampler) that `DECODE` jobs advance. Synchronous decodes pass
//! their tokens and receive their logits through one registered staging buffer, a sealed memfd
//! the client grows as needed.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Client, RESERVED_USER_DATA};
use crate::error::{Error, Result};
use crate::protocol::job::MAX_DECODE_TOKENS;
use crate::protocol::vocab::Vocab;
use crate::protocol::{
    Completion, Decode, Job, LogitsOut, ModelInfo, Reply, Request, SamplerParams, TokenInput,
};
use crate::status::Status;
use crate::sys::{memfd, SharedMemory};

/// A model the daemon loaded for this session.
#[derive(Clone, Debug)]
pub struct Model {
    info: ModelInfo,
    vocab: Arc<Vocab>,
}

impl Model {
    /// The session's handle for the model.
    pub fn handle(&self) -> u32 {
        self.info.handle
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn vocab(&self) -> &Arc<Vocab> {
        &self.vocab
    }

    /// The bytes of token `id`, possibly a partial UTF-8 sequence (see
    /// [`crate::protocol::vocab::Utf8Stream`]); control tokens are empty unless `special`.
    pub fn token_to_piece(&self, id: u32, special: bool) -> Option<&[u8]> {
        self.vocab.piece(id, special)
    }

    /// Whether `id` ends generation (end of sequence, end of turn).
    pub fn is_eog(&self, id: u32) -> bool {
        self.vocab.is_eog(id)
    }
}

/// How to create a context.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ContextParams {
    /// Positions the context holds; 0 for the smaller of the model's training context and 4096.
    pub n_ctx: u32,
    /// An f32 KV cache instead of f16.
    pub kv_f32: bool,
    pub sampler: SamplerParams,
}

impl Default for ContextParams {
    fn default() -> Self {
        ContextParams { n_ctx: 0, kv_f32: false, sampler: SamplerParams::DEFAULT }
    }
}

/// A context the daemon holds for this session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelContext {
    handle: u32,
    n_ctx: u32,
    n_vocab: u32,
}

impl ModelContext {
    pub fn handle(&self) -> u32 {
        self.handle
    }

    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    pub fn n_vocab(&self) -> u32 {
        self.n_vocab
    }
}

/// Which logits a synchronous decode returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    /// The last token's (`n_vocab` values).
    Last,
    /// Every token's (`n_tokens x n_vocab`, token-major).
    All,
}

/// What a synchronous decode gives back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DecodeOutput {
    /// The sampled next token, when sampling was asked for.
    pub token: Option<u32>,
    /// The context's position afterwards.
    pub n_past: u32,
    pub logits: Vec<f32>,
}

/// The registered buffer synchronous decodes use for tokens in and logits out.
#[derive(Debug)]
pub(super) struct Staging {
    mem: SharedMemory,
    handle: u32,
    size: usize,
    _fd: OwnedFd,
}

/// How long a model load may take before the daemon is declared stuck.
const LOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a cancellable wait looks at its flag. A cancel arrives this much later at worst,
/// and the wake-ups cost nothing next to a decode step.
const CANCEL_POLL: Duration = Duration::from_millis(5);

impl Client {
    /// Opens `path` and has the daemon load it (the daemon never opens paths itself).
    pub fn load_model(&mut self, path: &Path) -> Result<Model> {
        let file = File::open(path)
            .map_err(|e| Error::new(Status::InvalidArgument, format!("{}: {e}", path.display())))?;
        self.load_model_fd(file.as_fd())
    }

    /// Has the daemon load the GGUF file open at `fd`.
    pub fn load_model_fd(&mut self, fd: BorrowedFd<'_>) -> Result<Model> {
        self.set_reply_timeout(LOAD_TIMEOUT)?;
        let got = self.request_fds(&Request::LoadModel, &[fd.as_raw_fd()], 1);
        self.set_reply_timeout(super::CONTROL_TIMEOUT)?;
        let (reply, fds) = got?;
        let Reply::ModelLoaded(info) = reply else {
            return Err(Error::protocol(format!("expected a loaded model, got {reply:?}")));
        };
        let vocab_fd = fds.into_iter().next().ok_or_else(|| Error::protocol("no vocabulary"))?;
        let vocab = Vocab::from_memfd(&vocab_fd)?;
        if vocab.len() != info.n_vocab as usize {
            return Err(Error::protocol("vocabulary size differs from the model's"));
        }
        Ok(Model { info, vocab: Arc::new(vocab) })
    }

    /// Releases this session's hold on a model (contexts on it keep it until they are freed).
    pub fn free_model(&mut self, m: &Model) -> Result<()> {
        self.expect_done(&Request::FreeModel { model: m.handle() })
    }

    /// The model's token ids for `text` (at most 128 KiB). `add_special` adds BOS/EOS as the
    /// model wants them; `parse_special` turns special-token text into the special tokens.
    pub fn tokenize(
        &mut self,
        m: &Model,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        let max = crate::protocol::messages::MAX_TOKENIZE_BYTES;
        if text.len() > max {
            return Err(Error::new(
                Status::InvalidArgument,
                format!("text of {} bytes: at most {max} per call", text.len()),
            ));
        }
        let req = Request::Tokenize {
            model: m.handle(),
            add_special,
            parse_special,
            text: text.to_owned(),
        };
        match self.request(&req, &[])? {
            Reply::Tokens { ids } => Ok(ids),
            other => Err(Error::protocol(format!("expected tokens, got {other:?}"))),
        }
    }

    pub fn create_context(&mut self, m: &Model, p: &ContextParams) -> Result<ModelContext> {
        let req = Request::CreateContext {
            model: m.handle(),
            n_ctx: p.n_ctx,
            kv_f32: p.kv_f32,
            sampler: p.sampler,
        };
        match self.request(&req, &[])? {
            Reply::ContextCreated { ctx, n_ctx } => {
                Ok(ModelContext { handle: ctx, n_ctx, n_vocab: m.info.n_vocab })
            }
            other => Err(Error::protocol(format!("expected a context, got {other:?}"))),
        }
    }

    pub fn free_context(&mut self, c: &ModelContext) -> Result<()> {
        self.expect_done(&Request::FreeContext { ctx: c.handle })
    }

    /// Changes how the context samples, from its next job on; the sampler starts afresh (its
    /// random sequence from the seed, its penalty history empty) even when `s` is unchanged.
    pub fn set_sampler(&mut self, c: &ModelContext, s: &SamplerParams) -> Result<()> {
        self.expect_done(&Request::SetSampler { ctx: c.handle, sampler: *s })
    }

    fn expect_done(&mut self, req: &Request) -> Result<()> {
        match self.request(req, &[])? {
            Reply::Done => Ok(()),
            other => Err(Error::protocol(format!("expected done, got {other:?}"))),
        }
    }

    /// Runs `tokens` through the model on context `c` and waits: returns the logits asked for
    /// and, with `sample`, the next token drawn by the context's sampler. With no tokens it
    /// samples (or returns the logits) from the last decode again.
    pub fn decode(
        &mut self,
        c: &ModelContext,
        tokens: &[u32],
        logits: LogitsWanted,
        sample: bool,
    ) -> Result<DecodeOutput> {
        self.decode_at(c, tokens, logits, sample, None, None)
    }

    /// [`Client::decode`] that another thread can stop: once `cancel` is set, the job is
    /// cancelled in the daemon (a `CANCEL`, taking effect at its next step boundary) and this
    /// returns [`Status::Cancelled`], the context as it was before the call.
    pub fn decode_cancellable(
        &mut self,
        c: &ModelContext,
        tokens: &[u32],
        logits: LogitsWanted,
        sample: bool,
        cancel: &AtomicBool,
    ) -> Result<DecodeOutput> {
        self.decode_at(c, tokens, logits, sample, None, Some(cancel))
    }

    /// Forgets the context's positions from `n_past` on, to reuse a common prefix.
    pub fn rewind(&mut self, c: &ModelContext, n_past: u32) -> Result<()> {
        self.decode_at(c, &[], LogitsWanted::None, false, Some(n_past), None).map(drop)
    }

    fn decode_at(
        &mut self,
        c: &ModelContext,
        tokens: &[u32],
        logits: LogitsWanted,
        sample: bool,
        rewind_to: Option<u32>,
        cancel: Option<&AtomicBool>,
    ) -> Result<DecodeOutput> {
        let n = u32::try_from(tokens.len()).ok().filter(|n| *n <= MAX_DECODE_TOKENS).ok_or_else(
            || {
                Error::new(
                    Status::InvalidArgument,
                    format!("{} tokens in one decode", tokens.len()),
                )
            },
        )?;
        let rows = match logits {
            LogitsWanted::None => 0,
            LogitsWanted::Last => 1,
            LogitsWanted::All => tokens.len(),
        };
        let logits_at = (tokens.len() * 4).next_multiple_of(64);
        let logits_len = rows * c.n_vocab as usize;
        let input = if tokens.is_empty() {
            TokenInput::Inline { tokens: [0, 0], n: 0 }
        } else if tokens.len() <= 2 && rows == 0 {
            TokenInput::Inline { tokens: [tokens[0], *tokens.get(1).unwrap_or(&0)], n }
        } else {
            let st = self.staging(logits_at + logits_len * 4)?;
            for (i, t) in tokens.iter().enumerate() {
                st.mem.atomic_u32(i * 4).store(t.to_le(), std::sync::atomic::Ordering::Relaxed);
            }
            TokenInput::Buffer { buffer: st.handle, offset: 0, n }
        };
        let out = if rows > 0 {
            let handle = self.staging(logits_at + logits_len * 4)?.handle;
            Some(LogitsOut {
                buffer: handle,
                offset: logits_at as u64,
                all: logits == LogitsWanted::All,
            })
        } else {
            None
        };
        let job = Job::Decode(Decode { ctx: c.handle, input, logits: out, sample, rewind_to });
        let done = self.run_sync_cancellable(job, cancel)?;
        if done.status != Status::Ok {
            return Err(Error::new(done.status, format!("decode failed: {}", done.status)));
        }
        let mut logits = vec![0.0f32; logits_len];
        if logits_len > 0 {
            let st = self.staging.as_ref().expect("the staging buffer holds the logits");
            st.mem.load_f32s(logits_at, &mut logits);
        }
        Ok(DecodeOutput {
            token: sample.then_some(done.result as u32),
            n_past: done.extra as u32,
            logits,
        })
    }

    /// Queues a decode of one or two tokens without waiting; the completion (with the sampled
    /// token as its result when `sample`) arrives like any other. Returns false when the ring is
    /// full.
    pub fn submit_decode(
        &mut self,
        c: &ModelContext,
        tokens: &[u32],
        sample: bool,
        user_data: u64,
    ) -> Result<bool> {
        if tokens.is_empty() && !sample || tokens.len() > 2 {
            return Err(Error::new(
                Status::InvalidArgument,
                "an asynchronous decode takes one or two tokens (or none, to sample again)",
            ));
        }
        let input = TokenInput::Inline {
            tokens: [*tokens.first().unwrap_or(&0), *tokens.get(1).unwrap_or(&0)],
            n: tokens.len() as u32,
        };
        let job =
            Job::Decode(Decode { ctx: c.handle, input, logits: None, sample, rewind_to: None });
        Ok(self.submit(&[(job, user_data)])? == 1)
    }

    /// The staging buffer, grown to at least `bytes`.
    fn staging(&mut self, bytes: usize) -> Result<&Staging> {
        let big_enough = self.staging.as_ref().is_some_and(|s| s.size >= bytes);
        if !big_enough {
            let size = bytes.max(1 << 20).next_power_of_two();
            let fd = memfd::create_sealed_memfd("staging", size)?;
            let mem = SharedMemory::map(&fd, size)?;
            let handle = self.register_buffer(&fd, size as u64)?;
            if let Some(old) = self.staging.take() {
                self.unregister_buffer(old.handle)?;
            }
            self.staging = Some(Staging { mem, handle, size, _fd: fd });
        }
        Ok(self.staging.as_ref().expect("just ensured"))
    }

    /// Submits one job and waits for its completion, keeping other jobs' completions for
    /// [`Client::reap`].
    pub(super) fn run_sync(&mut self, job: Job) -> Result<Completion> {
        self.run_sync_cancellable(job, None)
    }

    /// [`Client::run_sync`] that cancels the job in the daemon once `cancel` is set; the job's
    /// completion (`Cancelled`, or its result if it finished first) is still what it returns.
    fn run_sync_cancellable(
        &mut self,
        job: Job,
        cancel: Option<&AtomicBool>,
    ) -> Result<Completion> {
        self.check_open()?;
        let token = self.probe_id();
        while self.submit_any(&[(job, token)])? == 0 {
            // The ring is full of the caller's own jobs: wait for some to finish.
            self.wait(None)?;
            self.reap_into_stash()?;
        }
        // The CANCEL's own completion must be taken off the ring too (it carries a reserved
        // user_data that the caller must never reap), so a sent CANCEL is waited for.
        let mut cancel_id = None;
        let mut cancel_done = false;
        let mut found = None;
        loop {
            let mut got = Vec::with_capacity(8);
            self.reap_ring(&mut got, usize::MAX)?;
            for c in got {
                if c.user_data == token {
                    found = Some(c);
                } else if Some(c.user_data) == cancel_id {
                    cancel_done = true;
                } else {
                    self.stash.push_back(c);
                }
            }
            if let Some(c) = found {
                if cancel_id.is_none() || cancel_done {
                    return Ok(c);
                }
            }
            match cancel {
                Some(flag) => {
                    if found.is_none() && cancel_id.is_none() && flag.load(Ordering::Acquire) {
                        let id = self.probe_id();
                        // A full ring takes the CANCEL on a later round.
                        if self.submit_any(&[(Job::Cancel { target: token }, id)])? == 1 {
                            cancel_id = Some(id);
                        }
                    }
                    self.wait_for_ring(Some(CANCEL_POLL))?;
                }
                None => {
                    self.wait_ring_only()?;
                }
            }
        }
    }

    /// A user_data for the library's own jobs.
    fn probe_id(&mut self) -> u64 {
        let id = self.next_probe;
        self.next_probe = self.next_probe.wrapping_add(1).max(RESERVED_USER_DATA);
        id
    }
}
