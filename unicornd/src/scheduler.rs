//! The engine thread: runs model work away from the event loop, so that a long prefill never
//! delays another client's ring. Jobs run in the order they were submitted; each reports back
//! through the [`Events`] queue, which wakes the event loop.
//!
//! Contexts live here: a context is a model, a KV cache, a sampler and the last logits. The
//! event loop validates a job completely (handles, buffer ranges, token ids) before it gets
//! here; what only the context knows (how full it is) is checked here.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use nix::sys::eventfd::{EfdFlags, EventFd};
use unicorn::protocol::SamplerParams as WireSampler;
use unicorn::sys::SharedMemory;
use unicorn::{Error, Status};
use unicorn_engine::model::{KvState, Logits, ModelError, Seq};
use unicorn_engine::sampling::{Sampler, SamplerParams};
use unicorn_kernels::ThreadPool;

use crate::models::LoadedModel;

/// Tokens one forward pass takes at most: longer inputs run in chunks of this many.
pub const CHUNK_TOKENS: usize = 512;

/// The sampler settings of the wire protocol, checked.
pub fn sampler_params(p: &WireSampler) -> Result<SamplerParams, Error> {
    let params = SamplerParams {
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        min_p: p.min_p,
        repeat_penalty: p.repeat_penalty,
        repeat_last_n: p.repeat_last_n,
        seed: p.seed,
    };
    params.validate().map_err(|e| Error::new(Status::InvalidArgument, format!("sampler: {e}")))?;
    Ok(params)
}

#[derive(Debug)]
struct ContextState {
    kv: KvState,
    sampler: Sampler,
    /// Logits of the last token decoded, for sampling.
    last_logits: Vec<f32>,
}

/// A context: the state of one sequence on one model.
#[derive(Debug)]
pub struct Context {
    pub model: Arc<LoadedModel>,
    pub n_ctx: u32,
    state: Mutex<ContextState>,
    /// The sampler settings to use from the next job on (set from the event loop without
    /// waiting for a running job).
    next_sampler: Mutex<SamplerParams>,
    /// Set when the context is freed or its session ends: queued jobs are dropped.
    pub cancelled: AtomicBool,
}

impl Context {
    pub fn new(
        model: Arc<LoadedModel>,
        kv: KvState,
        sampler: SamplerParams,
    ) -> Result<Context, Error> {
        let s = Sampler::new(sampler)
            .map_err(|e| Error::new(Status::InvalidArgument, e.to_string()))?;
        Ok(Context {
            n_ctx: kv.n_ctx() as u32,
            model,
            state: Mutex::new(ContextState { kv, sampler: s, last_logits: Vec::new() }),
            next_sampler: Mutex::new(sampler),
            cancelled: AtomicBool::new(false),
        })
    }

    pub fn set_sampler(&self, p: SamplerParams) {
        *self.next_sampler.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }
}

/// Where a job's logits go: a range of a client's registered buffer.
#[derive(Debug)]
pub struct LogitsSink {
    pub mem: Arc<SharedMemory>,
    pub offset: usize,
    /// Every token's logits, not only the last one's.
    pub all: bool,
}

/// A validated `DECODE`.
#[derive(Debug)]
pub struct DecodeJob {
    pub session: u64,
    pub user_data: u64,
    pub ctx: Arc<Context>,
    pub tokens: Vec<u32>,
    pub logits: Option<LogitsSink>,
    pub sample: bool,
    pub rewind_to: Option<u32>,
}

/// A finished job, for the session's completion ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub session: u64,
    pub user_data: u64,
    pub status: Status,
    pub result: u64,
    pub extra: u64,
    /// Tokens the job decoded.
    pub tokens: u64,
}

/// What the worker threads report to the event loop.
#[derive(Debug)]
pub enum Event {
    Finished(Finished),
    /// A model load for `session`'s request `request` ended.
    Loaded {
        session: u64,
        request: u32,
        result: Result<Box<crate::models::LoadedModel>, Error>,
    },
}

/// A queue of events from worker threads, with an eventfd that wakes the event loop. The
/// eventfd is the daemon's own (never shared with a client).
#[derive(Debug)]
pub struct Events {
    queue: Mutex<VecDeque<Event>>,
    bell: EventFd,
}

impl Events {
    pub fn new() -> Result<Arc<Events>, Error> {
        let bell = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| Error::os("eventfd", e))?;
        Ok(Arc::new(Events { queue: Mutex::new(VecDeque::new()), bell }))
    }

    pub fn push(&self, e: Event) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).push_back(e);
        let _ = self.bell.write(1);
    }

    /// Takes every queued event and resets the bell.
    pub fn drain(&self) -> Vec<Event> {
        let _ = self.bell.read();
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect()
    }
}

impl AsFd for Events {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.bell.as_fd()
    }
}

/// The engine thread's handle.
#[derive(Debug)]
pub struct Engine {
    tx: Sender<DecodeJob>,
    threads: usize,
}

impl Engine {
    /// Starts the engine thread with a compute pool of `threads`.
    pub fn start(threads: usize, events: Arc<Events>) -> Result<Engine, Error> {
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("unicorn-engine".into())
            .spawn(move || engine_main(threads, rx, events))
            .map_err(|e| Error::os("starting the engine thread", e))?;
        Ok(Engine { tx, threads })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn submit(&self, job: DecodeJob) -> Result<(), Error> {
        self.tx.send(job).map_err(|_| Error::new(Status::Internal, "the engine thread has stopped"))
    }
}

fn engine_main(threads: usize, rx: Receiver<DecodeJob>, events: Arc<Events>) {
    let pool = ThreadPool::new(threads);
    let mut logits = Vec::new();
    while let Ok(job) = rx.recv() {
        let (status, result, extra, tokens) = if job.ctx.cancelled.load(Ordering::Acquire) {
            (Status::Cancelled, 0, 0, 0)
        } else {
            match run(&pool, &job, &mut logits) {
                Ok((token, n_past)) => (Status::Ok, token, n_past, job.tokens.len() as u64),
                Err(e) => {
                    log::debug!("session {}: decode failed: {}", job.session, e.message());
                    (e.status(), 0, 0, 0)
                }
            }
        };
        events.push(Event::Finished(Finished {
            session: job.session,
            user_data: job.user_data,
            status,
            result,
            extra,
            tokens,
        }));
    }
}

fn model_error(e: ModelError) -> Error {
    let status = match e {
        ModelError::ContextFull { .. } => Status::LimitExceeded,
        ModelError::TokenOutOfRange { .. }
        | ModelError::BadRewind { .. }
        | ModelError::EmptySequence => Status::InvalidArgument,
        _ => Status::Internal,
    };
    Error::new(status, e.to_string())
}

/// Runs one job; returns (sampled token or 0, the context's position afterwards).
fn run(pool: &ThreadPool, job: &DecodeJob, logits: &mut Vec<f32>) -> Result<(u64, u64), Error> {
    let ctx = &job.ctx;
    let model = &ctx.model.model;
    let n_vocab = model.hparams().n_vocab;
    let mut st = ctx.state.lock().unwrap_or_else(|e| e.into_inner());
    let st = &mut *st;
    let wanted = *ctx.next_sampler.lock().unwrap_or_else(|e| e.into_inner());
    if &wanted != st.sampler.params() {
        st.sampler =
            Sampler::new(wanted).map_err(|e| Error::new(Status::InvalidArgument, e.to_string()))?;
    }
    if let Some(p) = job.rewind_to {
        st.kv.rewind(p as usize).map_err(model_error)?;
        st.last_logits.clear();
    }
    let n = job.tokens.len();
    if n > 0 {
        let (n_ctx, n_past) = (st.kv.n_ctx(), st.kv.n_past());
        if n_past + n > n_ctx {
            return Err(model_error(ModelError::ContextFull { n_ctx, n_past, n_new: n }));
        }
        let all = job.logits.as_ref().is_some_and(|l| l.all);
        let mut done = 0;
        for chunk in job.tokens.chunks(CHUNK_TOKENS) {
            let last = done + chunk.len() == n;
            // The last token's logits are always kept, so that a later SAMPLE can use them.
            let want = if all {
                Logits::All
            } else if last {
                Logits::Last
            } else {
                Logits::None
            };
            model
                .forward(pool, &mut [Seq { kv: &mut st.kv, tokens: chunk, logits: want }], logits)
                .map_err(model_error)?;
            if all {
                let sink = job.logits.as_ref().expect("all implies a sink");
                sink.mem.store_f32s(sink.offset + done * n_vocab * 4, logits);
            }
            if last {
                st.last_logits.clear();
                st.last_logits.extend_from_slice(&logits[logits.len() - n_vocab..]);
            }
            done += chunk.len();
        }
        if let Some(sink) = job.logits.as_ref().filter(|l| !l.all) {
            sink.mem.store_f32s(sink.offset, &st.last_logits);
        }
    }
    let token = if job.sample {
        if st.last_logits.is_empty() {
            return Err(Error::new(Status::InvalidArgument, "nothing decoded yet to sample from"));
        }
        u64::from(st.sampler.sample(&st.last_logits, st.kv.tokens()))
    } else {
        0
    };
    Ok((token, st.kv.n_past() as u64))
}
