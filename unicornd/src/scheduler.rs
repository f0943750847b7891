//! The engine thread: runs model work away from the event loop, so that a long prefill never
//! delays another client's ring. Jobs run in the order they were submitted; each reports back
//! through the [`Events`] queue, which wakes the event loop.
//!
//! Contexts live here: a context is a model, a KV cache, a sampler and the last logits. The
//! event loop validates a job completely (handles, buffer ranges, token ids) before it gets
//! here; what only the context knows (how full it is) is checked here.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};

use nix::sys::eventfd::{EfdFlags, EventFd};
use unicorn::protocol::{Priority, SamplerParams as WireSampler};
use unicorn::sys::SharedMemory;
use unicorn::{Error, Status};
use unicorn_engine::model::{KvState, Logits, ModelError, QosPriority, Seq};
use unicorn_engine::sampling::{Sampler, SamplerParams};
use unicorn_kernels::ThreadPool;

use crate::models::LoadedModel;

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
    /// The `SetSampler` count that `sampler` was built for.
    sampler_version: u64,
    /// Logits of the last token decoded, for sampling.
    last_logits: Vec<f32>,
}

/// A context: the state of one sequence on one model.
#[derive(Debug)]
pub struct Context {
    pub model: Arc<LoadedModel>,
    pub n_ctx: u32,
    /// Bytes its KV cache reserves.
    pub kv_bytes: u64,
    state: Mutex<ContextState>,
    /// The sampler settings to use from the next job on (set from the event loop without
    /// waiting for a running job), and how many times they were set.
    next_sampler: Mutex<(SamplerParams, u64)>,
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
            kv_bytes: kv.bytes(),
            model,
            state: Mutex::new(ContextState {
                kv,
                sampler: s,
                sampler_version: 0,
                last_logits: Vec::new(),
            }),
            next_sampler: Mutex::new((sampler, 0)),
            cancelled: AtomicBool::new(false),
        })
    }

    /// Takes effect at the next job, with a fresh sampler even when `p` is unchanged: a client
    /// that sets the same seed again gets the same draws again.
    pub fn set_sampler(&self, p: SamplerParams) {
        let mut next = self.next_sampler.lock().unwrap_or_else(|e| e.into_inner());
        *next = (p, next.1.wrapping_add(1));
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
    /// The session's scheduling class.
    pub priority: Priority,
    /// Set by a `CANCEL` of this job.
    pub cancel: Arc<AtomicBool>,
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
    /// The load of the model file `identity` ended.
    Loaded {
        identity: crate::models::FileIdentity,
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

/// What the engine thread reports about itself.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Jobs waiting or running (as of the last step).
    pub queued: AtomicUsize,
    /// Forward passes run.
    pub steps: AtomicU64,
    /// Forward passes that ran tokens of more than one context together.
    pub batched_steps: AtomicU64,
}

/// The engine thread's handle.
#[derive(Debug)]
pub struct Engine {
    tx: Sender<DecodeJob>,
    threads: usize,
    stats: Arc<EngineStats>,
}

impl Engine {
    /// Starts the engine thread with a compute pool of `threads`.
    pub fn start(threads: usize, events: Arc<Events>) -> Result<Engine, Error> {
        let (tx, rx) = channel();
        let stats = Arc::new(EngineStats::default());
        let st = stats.clone();
        std::thread::Builder::new()
            .name("unicorn-engine".into())
            .spawn(move || engine_main(threads, rx, events, st))
            .map_err(|e| Error::os("starting the engine thread", e))?;
        Ok(Engine { tx, threads, stats })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn submit(&self, job: DecodeJob) -> Result<(), Error> {
        self.tx.send(job).map_err(|_| Error::new(Status::Internal, "the engine thread has stopped"))
    }
}

/// Tokens one scheduler step runs at most, all contexts together.
pub const STEP_TOKENS: usize = 512;
/// Tokens of one job's prompt a step takes at most, so that a long prefill shares steps with
/// other clients' decoding instead of stalling it.
pub const PREFILL_CHUNK: usize = 256;

/// What a job ended with: (sampled token, position afterwards), or why it failed.
type Outcome = Result<(u64, u64), Error>;

/// A job on the engine thread, with how far it got.
#[derive(Debug)]
struct Running {
    job: DecodeJob,
    /// Arrival order.
    seq: u64,
    /// Tokens already run.
    done: usize,
    /// The context's position before the job's first step, once it started (a cancelled job
    /// rewinds its context to it, leaving the context as it found it).
    started_at: Option<usize>,
}

impl Running {
    fn cancelled(&self) -> bool {
        self.job.cancel.load(Ordering::Acquire) || self.job.ctx.cancelled.load(Ordering::Acquire)
    }

    fn left(&self) -> usize {
        self.job.tokens.len() - self.done
    }
}

/// What the planner needs to know of a queued job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Item {
    /// Identity of the job's context and model (addresses; only compared).
    ctx: usize,
    model: usize,
    priority: Priority,
    session: u64,
    /// Arrival order.
    seq: u64,
    /// Tokens still to run.
    left: usize,
}

impl Running {
    fn item(&self) -> Item {
        Item {
            ctx: Arc::as_ptr(&self.job.ctx) as usize,
            model: Arc::as_ptr(&self.job.ctx.model) as usize,
            priority: self.job.priority,
            session: self.job.session,
            seq: self.seq,
            left: self.left(),
        }
    }
}

/// Prompt tokens normal and background jobs take per step, all together, while interactive
/// work is about: those clients' tokens then wait for at most a short step.
pub const INTERACTIVE_YIELD: usize = 32;

/// Which jobs run in the next step, and how many of their tokens.
///
/// The policy (docs/architecture.md, "Scheduling"):
/// - only the oldest job of each context is eligible, so a context's jobs run in order;
/// - eligible jobs are ordered by class (realtime, interactive, normal, background), then by
///   how few tokens their session got recently (fair sharing within a class), then by age;
/// - the first picks the model; every eligible job of that model joins the step in that order
///   until the step's token budget is spent, each taking at most `PREFILL_CHUNK` of its prompt;
/// - while realtime work is about (`urgent` = `Some(Realtime)`), lower classes only get their
///   single-token decodes into steps (no prompt chunks), so realtime tokens never wait behind
///   a long step; while interactive work is about, normal and background prompts share
///   `INTERACTIVE_YIELD` tokens per step.
fn plan(
    items: &[Item],
    served: &HashMap<u64, u64>,
    urgent: Option<Priority>,
) -> Vec<(usize, usize)> {
    let mut eligible: Vec<usize> = Vec::new();
    let mut by_age: Vec<usize> = (0..items.len()).collect();
    by_age.sort_by_key(|&i| items[i].seq);
    let mut seen: Vec<usize> = Vec::new();
    for i in by_age {
        if !seen.contains(&items[i].ctx) {
            seen.push(items[i].ctx);
            eligible.push(i);
        }
    }
    eligible.sort_by_key(|&i| {
        let it = &items[i];
        (it.priority, served.get(&it.session).copied().unwrap_or(0), it.seq)
    });
    let Some(&first) = eligible.first() else { return Vec::new() };
    let model = items[first].model;
    let mut budget = STEP_TOKENS;
    // What lower classes may take while urgent work is about.
    let mut yield_budget = match urgent {
        Some(Priority::Realtime) => 0,
        Some(Priority::Interactive) => INTERACTIVE_YIELD,
        _ => STEP_TOKENS,
    };
    let mut step = Vec::new();
    for i in eligible {
        let it = &items[i];
        if it.model != model {
            continue;
        }
        let lower = urgent.is_some_and(|u| it.priority > u.max(Priority::Interactive));
        let mut take = it.left.min(PREFILL_CHUNK).min(budget);
        if lower && it.left > 1 {
            take = take.min(yield_budget);
            yield_budget -= take;
        }
        if take == 0 && it.left > 0 {
            continue; // no budget left for it this step
        }
        budget -= take;
        step.push((i, take));
    }
    step
}

/// How long a step waits at most for clients of the last step whose next token has not
/// arrived yet; never more than `1 / BATCH_WAIT_SHARE` of the last step's time.
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_micros(400);
const BATCH_WAIT_SHARE: u32 = 8;

/// Whether every context in `decoders` has a job queued.
fn all_back(queue: &[Running], decoders: &[usize]) -> bool {
    decoders.iter().all(|&c| queue.iter().any(|r| Arc::as_ptr(&r.job.ctx) as usize == c))
}

/// How long realtime or interactive work counts as "about" after its last job was queued: the
/// gap between one token's completion and the client's next submission.
const URGENT_WINDOW: std::time::Duration = std::time::Duration::from_millis(200);

fn engine_main(
    threads: usize,
    rx: Receiver<DecodeJob>,
    events: Arc<Events>,
    stats: Arc<EngineStats>,
) {
    let pool = ThreadPool::new(threads);
    let mut queue: Vec<Running> = Vec::new();
    let mut next_seq = 0u64;
    // Tokens served per session, halved every step: a recent-usage measure for fairness.
    let mut served: HashMap<u64, u64> = HashMap::new();
    // The most urgent class seen lately, and until when it counts as about.
    let mut urgent: Option<(Priority, std::time::Instant)> = None;
    // Contexts whose single-token decodes the last step ran, and how long that step took.
    let mut last_decoders: Vec<usize> = Vec::new();
    let mut last_step = std::time::Duration::ZERO;
    let mut logits = Vec::new();
    loop {
        // Nothing to run until a client's next job arrives: the compute threads park rather
        // than spin on cores that the event loop and the clients need for that round trip.
        if queue.is_empty() {
            pool.rest();
            match rx.recv() {
                Ok(job) => {
                    queue.push(Running { job, seq: next_seq, done: 0, started_at: None });
                    next_seq += 1;
                }
                Err(_) => return,
            }
        }
        while let Ok(job) = rx.try_recv() {
            queue.push(Running { job, seq: next_seq, done: 0, started_at: None });
            next_seq += 1;
        }
        // Clients decoding token by token submit their next token a round trip after the last
        // step ends. Waiting a moment for those of the last step who are not back yet keeps the
        // steps full: each step costs milliseconds, the wait a fraction of one. It waits for
        // those contexts by name, not for as many: two clients that arrived out of phase would
        // otherwise alternate, one token per step, for ever.
        let deadline = std::time::Instant::now() + BATCH_WAIT.min(last_step / BATCH_WAIT_SHARE);
        while !all_back(&queue, &last_decoders) {
            pool.rest();
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(job) => {
                    queue.push(Running { job, seq: next_seq, done: 0, started_at: None });
                    next_seq += 1;
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        // A step boundary: jobs cancelled meanwhile (or of a session that ended) are dropped.
        let mut i = 0;
        while i < queue.len() {
            if queue[i].cancelled() {
                let r = queue.swap_remove(i);
                if let Some(p) = r.started_at {
                    let mut st = r.job.ctx.state.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = st.kv.rewind(p);
                    st.last_logits.clear();
                }
                finish(&events, &r.job, Err(Error::new(Status::Cancelled, "cancelled")));
            } else {
                i += 1;
            }
        }
        stats.queued.store(queue.len(), Ordering::Relaxed);
        let now = std::time::Instant::now();
        let about = urgent.filter(|(_, until)| now < *until).map(|(p, _)| p);
        let top =
            queue.iter().map(|r| r.job.priority).filter(|p| *p <= Priority::Interactive).min();
        if let Some(top) = top {
            // A class stays "about" for a window after its last job; a more urgent one takes
            // over at once.
            if about.is_none_or(|p| top <= p) {
                urgent = Some((top, now + URGENT_WINDOW));
            }
        }
        let about = urgent.filter(|(_, until)| now < *until).map(|(p, _)| p);
        let items: Vec<Item> = queue.iter().map(Running::item).collect();
        let step = plan(&items, &served, about);
        if step.is_empty() {
            continue;
        }
        stats.steps.fetch_add(1, Ordering::Relaxed);
        if step.iter().filter(|(_, take)| *take > 0).count() > 1 {
            stats.batched_steps.fetch_add(1, Ordering::Relaxed);
        }
        last_decoders = step
            .iter()
            .filter(|&&(i, _)| queue[i].job.tokens.len() == 1)
            .map(|&(i, _)| Arc::as_ptr(&queue[i].job.ctx) as usize)
            .collect();
        let began = std::time::Instant::now();
        for v in served.values_mut() {
            *v /= 2;
        }
        let finished = run_step(&pool, &mut queue, &step, &mut logits, &mut served);
        last_step = began.elapsed();
        // Remove finished jobs, highest index first so the others keep their places.
        let mut done: Vec<(usize, Outcome)> = finished;
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        for (i, result) in done {
            let r = queue.swap_remove(i);
            finish(&events, &r.job, result);
        }
        stats.queued.store(queue.len(), Ordering::Relaxed);
    }
}

fn finish(events: &Events, job: &DecodeJob, result: Outcome) {
    let (status, result, extra, tokens) = match result {
        Ok((token, n_past)) => (Status::Ok, token, n_past, job.tokens.len() as u64),
        Err(e) => {
            log::debug!("session {}: decode ended: {}", job.session, e.message());
            (e.status(), 0, 0, 0)
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

/// Prepares a job's first step: the sampler it asked for, its rewind, room for its tokens.
fn start(st: &mut ContextState, r: &mut Running) -> Result<(), Error> {
    let ctx = &r.job.ctx;
    let (wanted, version) = *ctx.next_sampler.lock().unwrap_or_else(|e| e.into_inner());
    if version != st.sampler_version {
        st.sampler =
            Sampler::new(wanted).map_err(|e| Error::new(Status::InvalidArgument, e.to_string()))?;
        st.sampler_version = version;
    }
    if let Some(p) = r.job.rewind_to {
        st.kv.rewind(p as usize).map_err(model_error)?;
        st.last_logits.clear();
    }
    let (n_ctx, n_past, n) = (st.kv.n_ctx(), st.kv.n_past(), r.job.tokens.len());
    if n_past + n > n_ctx {
        return Err(model_error(ModelError::ContextFull { n_ctx, n_past, n_new: n }));
    }
    r.started_at = Some(n_past);
    Ok(())
}

/// Completes a job whose tokens have all run: logits out, sampling. Returns (token, n_past).
fn conclude(st: &mut ContextState, job: &DecodeJob) -> Outcome {
    if let Some(sink) = job.logits.as_ref().filter(|l| !l.all) {
        if st.last_logits.is_empty() {
            return Err(Error::new(
                Status::InvalidArgument,
                "nothing decoded yet to return logits of",
            ));
        }
        sink.mem.store_f32s(sink.offset, &st.last_logits);
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

/// The NPU QoS hint of a class: realtime -> realtime, interactive -> high, normal -> normal,
/// background -> low (the driver's `AMDXDNA_QOS_*_PRIORITY`).
pub fn npu_qos(p: Priority) -> QosPriority {
    match p {
        Priority::Realtime => QosPriority::Realtime,
        Priority::Interactive => QosPriority::High,
        Priority::Normal => QosPriority::Normal,
        Priority::Background => QosPriority::Low,
    }
}

/// The NPU QoS hint of a batch: that of its most urgent class, so a batch that carries a
/// realtime job never runs in a context marked low. The hint only labels the driver's contexts
/// (it does not schedule by it); which jobs share a batch and what runs first stays this
/// scheduler's decision.
pub fn batch_qos(priorities: impl IntoIterator<Item = Priority>) -> QosPriority {
    npu_qos(priorities.into_iter().min().unwrap_or(Priority::Normal))
}

/// Runs one step: one forward pass over every job in `step` (all on one model). Returns the
/// jobs that ended (finished or failed) with their results.
fn run_step(
    pool: &ThreadPool,
    queue: &mut [Running],
    step: &[(usize, usize)],
    logits: &mut Vec<f32>,
    served: &mut HashMap<u64, u64>,
) -> Vec<(usize, Outcome)> {
    let mut ended = Vec::new();
    let model = &queue[step[0].0].job.ctx.model.clone();
    let n_vocab = model.model.hparams().n_vocab;
    // Lock every context of the step (each appears once) and start jobs not yet started.
    let mut members: Vec<(usize, usize)> = Vec::with_capacity(step.len());
    let ctxs: Vec<Arc<Context>> = step.iter().map(|&(i, _)| queue[i].job.ctx.clone()).collect();
    let mut guards: Vec<_> =
        ctxs.iter().map(|c| c.state.lock().unwrap_or_else(|e| e.into_inner())).collect();
    let mut live_guards = Vec::with_capacity(step.len());
    for (k, &(i, take)) in step.iter().enumerate() {
        let r = &mut queue[i];
        if r.started_at.is_none() {
            if let Err(e) = start(&mut guards[k], r) {
                ended.push((i, Err(e)));
                continue;
            }
        }
        if take == 0 {
            // Nothing to run (a sample, a rewind, logits again): conclude at once.
            ended.push((i, conclude(&mut guards[k], &r.job)));
            continue;
        }
        members.push((i, take));
        live_guards.push(k);
    }
    if members.is_empty() {
        return ended;
    }
    // Pull the guards of the members out in order, so each Seq can borrow its own.
    let mut member_guards: Vec<&mut ContextState> = Vec::with_capacity(members.len());
    {
        let mut rest: &mut [_] = &mut guards;
        let mut consumed = 0;
        for &k in &live_guards {
            let (_, tail) = rest.split_at_mut(k - consumed);
            let (g, tail) = tail.split_first_mut().expect("guard index in range");
            member_guards.push(&mut **g);
            rest = tail;
            consumed = k + 1;
        }
    }
    let wants: Vec<Logits> = members
        .iter()
        .map(|&(i, take)| {
            let r = &queue[i];
            if r.job.logits.as_ref().is_some_and(|l| l.all) {
                Logits::All
            } else if r.done + take == r.job.tokens.len() {
                // The last token's logits are always kept, so that a later SAMPLE can use them.
                Logits::Last
            } else {
                Logits::None
            }
        })
        .collect();
    let result = {
        let mut seqs: Vec<Seq<'_>> = member_guards
            .iter_mut()
            .zip(&members)
            .zip(&wants)
            .map(|((st, &(i, take)), &want)| {
                let r = &queue[i];
                Seq { kv: &mut st.kv, tokens: &r.job.tokens[r.done..r.done + take], logits: want }
            })
            .collect();
        let qos = batch_qos(members.iter().map(|&(i, _)| queue[i].job.priority));
        model.model.forward_at(pool, &mut seqs, logits, qos)
    };
    if let Err(e) = result {
        let err = model_error(e);
        for (&(i, _), st) in members.iter().zip(member_guards.iter_mut()) {
            if let Some(p) = queue[i].started_at {
                let _ = st.kv.rewind(p);
                st.last_logits.clear();
            }
            ended.push((i, Err(err.clone())));
        }
        return ended;
    }
    let mut row = 0;
    for ((&(i, take), st), want) in members.iter().zip(member_guards.iter_mut()).zip(&wants) {
        let r = &mut queue[i];
        let rows = match want {
            Logits::None => 0,
            Logits::Last => 1,
            Logits::All => take,
        };
        let mine = &logits[row * n_vocab..(row + rows) * n_vocab];
        row += rows;
        if *want == Logits::All {
            let sink = r.job.logits.as_ref().expect("All comes from a sink");
            sink.mem.store_f32s(sink.offset + r.done * n_vocab * 4, mine);
        }
        r.done += take;
        *served.entry(r.job.session).or_default() += take as u64;
        if r.done == r.job.tokens.len() {
            st.last_logits.clear();
            st.last_logits.extend_from_slice(&mine[mine.len() - n_vocab..]);
            ended.push((i, conclude(st, &r.job)));
        }
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_map_to_the_drivers_qos_hints() {
        use unicorn_xdna::sys;
        let values: Vec<u32> = Priority::ALL.iter().map(|&p| npu_qos(p).value()).collect();
        assert_eq!(
            values,
            [
                sys::QOS_REALTIME_PRIORITY,
                sys::QOS_HIGH_PRIORITY,
                sys::QOS_NORMAL_PRIORITY,
                sys::QOS_LOW_PRIORITY
            ]
        );
        // The same order as the classes (numerically lower is more urgent, as in the driver).
        assert!(values.windows(2).all(|w| w[0] < w[1]));
        // A batch takes its most urgent class.
        assert_eq!(batch_qos([Priority::Background, Priority::Interactive]), QosPriority::High);
        assert_eq!(batch_qos([Priority::Normal, Priority::Realtime]), QosPriority::Realtime);
        assert_eq!(batch_qos([Priority::Background]), QosPriority::Low);
        assert_eq!(batch_qos([]), QosPriority::Normal);
    }

    fn item(ctx: usize, priority: Priority, session: u64, seq: u64, left: usize) -> Item {
        Item { ctx, model: 1, priority, session, seq, left }
    }

    #[test]
    fn a_context_runs_its_jobs_in_order() {
        let items = [item(1, Priority::Normal, 1, 0, 5), item(1, Priority::Normal, 1, 1, 1)];
        assert_eq!(plan(&items, &HashMap::new(), None), vec![(0, 5)]);
    }

    #[test]
    fn higher_classes_come_first_and_long_prompts_are_chunked() {
        let items = [
            item(1, Priority::Background, 1, 0, 4000),
            item(2, Priority::Background, 2, 1, 4000),
            item(3, Priority::Realtime, 3, 2, 1),
            item(4, Priority::Normal, 4, 3, 1),
        ];
        let step = plan(&items, &HashMap::new(), None);
        // Realtime, then normal, then the background prompts in chunks within the budget.
        assert_eq!(
            step,
            vec![(2, 1), (3, 1), (0, PREFILL_CHUNK), (1, STEP_TOKENS - 2 - PREFILL_CHUNK)]
        );
        // While realtime work is about, the others only decode single tokens.
        let step = plan(&items, &HashMap::new(), Some(Priority::Realtime));
        assert_eq!(step, vec![(2, 1), (3, 1)]);
        // While interactive work is about, background prompts share a small budget.
        let items = [
            item(1, Priority::Background, 1, 0, 4000),
            item(2, Priority::Background, 2, 1, 4000),
            item(3, Priority::Interactive, 3, 2, 1),
        ];
        let step = plan(&items, &HashMap::new(), Some(Priority::Interactive));
        assert_eq!(step, vec![(2, 1), (0, INTERACTIVE_YIELD)]);
    }

    #[test]
    fn within_a_class_the_least_served_session_goes_first() {
        let items = [item(1, Priority::Normal, 1, 0, 300), item(2, Priority::Normal, 2, 1, 300)];
        let mut served = HashMap::new();
        served.insert(1, 1000);
        let step = plan(&items, &served, None);
        assert_eq!(step[0], (1, PREFILL_CHUNK), "session 2 got less recently: it goes first");
        assert_eq!(step[1], (0, STEP_TOKENS - PREFILL_CHUNK));
    }

    #[test]
    fn one_model_per_step() {
        let mut other = item(2, Priority::Realtime, 2, 1, 1);
        other.model = 2;
        let items = [item(1, Priority::Normal, 1, 0, 1), other];
        // The realtime job picks its model; the other model waits for the next step.
        assert_eq!(plan(&items, &HashMap::new(), None), vec![(1, 1)]);
    }

    #[test]
    fn jobs_without_tokens_still_get_their_turn() {
        let items =
            [item(1, Priority::Normal, 1, 0, STEP_TOKENS * 4), item(2, Priority::Normal, 2, 1, 0)];
        let step = plan(&items, &HashMap::new(), None);
        assert!(step.contains(&(1, 0)), "{step:?}");
    }
}
