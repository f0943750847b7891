//! One client session: its control socket, credentials, rings, buffers and counters, and the
//! ring-side work (taking entries, completing jobs).
//!
//! Trust: everything read from the ring memory was written by the client. Entries are copied out
//! once ([`Consumer::pop`]) and only the copy is decoded and validated; the client's counters are
//! checked on every read; the daemon's own counters are never read back from shared memory.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use unicorn::protocol::ring::{Consumer, CqeWords, Producer, SqeWords};
use unicorn::protocol::{Completion, Decode, Job, Priority, RingLayout, Sqe, TokenInput};
use unicorn::sys::doorbell::{CompletionDoorbell, SubmitDoorbell};
use unicorn::sys::peer::PeerCredentials;
use unicorn::sys::{memfd, SharedMemory};
use unicorn::{Error, Status};

use crate::models::LoadedModel;
use crate::policy::Resolved;
use crate::scheduler::{Context, DecodeJob, LogitsSink};

/// Ring entries taken from one session per loop iteration, so one busy client cannot starve
/// the others.
const ENTRIES_PER_ROUND: u32 = 64;

/// A connection, from `accept` on; it becomes an active session after its hello.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub ctrl: OwnedFd,
    pub creds: PeerCredentials,
    pub accepted: Instant,
    pub active: Option<Active>,
}

/// A registered client buffer, mapped into the daemon.
#[derive(Debug)]
pub struct Buffer {
    /// Shared with the engine thread while a job writes into it.
    pub mem: Arc<SharedMemory>,
    pub size: u64,
}

/// The state of a session after a successful handshake.
#[derive(Debug)]
pub struct Active {
    pub name: String,
    pub priority: Priority,
    /// How long to keep polling this ring after activity.
    pub spin: Duration,
    pub policy: Resolved,
    mem: SharedMemory,
    sq: Consumer<SqeWords>,
    cq: Producer<CqeWords>,
    pub submit_bell: SubmitDoorbell,
    complete_bell: CompletionDoorbell,
    /// Jobs accepted and not yet completed; each holds a completion slot.
    pub in_flight: u32,
    /// Malformed entries since the last good one.
    malformed_streak: u32,
    pub buffers: HashMap<u32, Buffer>,
    pub buffer_bytes: u64,
    next_buffer: u32,
    pub jobs_completed: u64,
    pub jobs_failed: u64,
    /// Completions written since the last publish.
    unpublished: bool,
    pub models: HashMap<u32, Arc<LoadedModel>>,
    next_model: u32,
    pub contexts: HashMap<u32, Arc<Context>>,
    next_ctx: u32,
    /// KV-cache positions of this session's contexts.
    pub kv_tokens: u64,
    /// Bytes the KV caches of this session's contexts reserve.
    pub kv_bytes: u64,
    pub tokens_decoded: u64,
    /// The request id of a model load in progress.
    pub loading: Option<u32>,
    /// Cancel flags of the DECODE jobs on the engine, by user_data.
    decodes: HashMap<u64, Arc<AtomicBool>>,
    /// Recent decoding speed.
    pub rate: RateMeter,
}

/// Tokens per second over the last few seconds: an exponentially decaying count.
#[derive(Debug, Clone, Copy)]
pub struct RateMeter {
    /// Decayed token count, in tokens per second once divided by `TAU`.
    level: f64,
    at: Instant,
}

impl RateMeter {
    /// The averaging time constant.
    const TAU: f64 = 5.0;

    pub fn new(now: Instant) -> RateMeter {
        RateMeter { level: 0.0, at: now }
    }

    fn decay(&self, now: Instant) -> f64 {
        self.level * (-now.saturating_duration_since(self.at).as_secs_f64() / Self::TAU).exp()
    }

    pub fn add(&mut self, now: Instant, tokens: u64) {
        self.level = self.decay(now) + tokens as f64;
        self.at = now;
    }

    /// Tokens per second, averaged over about the last `TAU` seconds.
    pub fn rate(&self, now: Instant) -> f32 {
        (self.decay(now) / Self::TAU) as f32
    }
}

/// The descriptors the client receives in its welcome.
#[derive(Debug)]
pub struct ClientFds {
    pub ring: OwnedFd,
    pub submit_bell: OwnedFd,
    pub complete_bell: OwnedFd,
}

/// A job that completes later (a delayed NOP today; device work later).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deferred {
    pub session: u64,
    pub user_data: u64,
    pub status: Status,
    pub result: u64,
    pub extra: u64,
    /// Tokens the job decoded.
    pub tokens: u64,
}

impl Deferred {
    pub fn ok(session: u64, user_data: u64) -> Deferred {
        Deferred { session, user_data, status: Status::Ok, result: 0, extra: 0, tokens: 0 }
    }
}

/// What one round of ring polling did.
#[derive(Debug, Default)]
pub struct RoundResult {
    /// Entries taken off the submission ring.
    pub taken: u32,
    /// Completions written.
    pub completed: u64,
    /// Jobs that finish later, with their due time.
    pub deferred: Vec<(Instant, Deferred)>,
    /// Model work for the engine thread.
    pub decodes: Vec<DecodeJob>,
}

impl Active {
    /// Sets up the rings and doorbells for a new session.
    pub fn new(
        name: String,
        priority: Priority,
        spin: Duration,
        layout: RingLayout,
        policy: Resolved,
    ) -> Result<(Active, ClientFds), Error> {
        let ring_fd = memfd::create_sealed_memfd("ring", layout.size())?;
        let mem = SharedMemory::map(&ring_fd, layout.size())?;
        layout.write_header(&mem);
        let submit_bell = SubmitDoorbell::new()?;
        let (complete_bell, client_bell) = CompletionDoorbell::pair()?;
        let client_submit = submit_bell_dup(&submit_bell)?;
        let active = Active {
            name,
            priority,
            spin,
            policy,
            mem,
            sq: layout.sq_consumer(),
            cq: layout.cq_producer(),
            submit_bell,
            complete_bell,
            in_flight: 0,
            malformed_streak: 0,
            buffers: HashMap::new(),
            buffer_bytes: 0,
            next_buffer: 1,
            jobs_completed: 0,
            jobs_failed: 0,
            unpublished: false,
            models: HashMap::new(),
            next_model: 1,
            contexts: HashMap::new(),
            next_ctx: 1,
            kv_tokens: 0,
            kv_bytes: 0,
            tokens_decoded: 0,
            loading: None,
            decodes: HashMap::new(),
            rate: RateMeter::new(Instant::now()),
        };
        let fds = ClientFds {
            ring: ring_fd,
            submit_bell: client_submit,
            complete_bell: client_bell.into(),
        };
        Ok((active, fds))
    }

    /// Whether a round could take an entry now: one is waiting and a completion slot is free.
    /// A corrupt ring counts as work, so that the next round finds and reports it.
    pub fn has_work(&self) -> bool {
        match (self.sq.available(&self.mem), self.cq.free(&self.mem)) {
            (Ok(avail), Ok(free)) => avail > 0 && free > self.in_flight,
            _ => true,
        }
    }

    pub fn set_sleeping(&self, on: bool) {
        self.sq.set_daemon_sleeping(&self.mem, on);
    }

    /// Takes up to a round's worth of entries and runs or defers each. An error means the
    /// client broke the protocol and the session must end.
    pub fn poll_ring(&mut self, session: u64, now: Instant) -> Result<RoundResult, Error> {
        let mut round = RoundResult::default();
        let avail = self.sq.available(&self.mem)?;
        if avail == 0 {
            return Ok(round);
        }
        // Every accepted entry needs a completion slot: free ones minus those promised to jobs
        // in flight. A client that does not reap simply stops being served until it does.
        let room = self.cq.free(&self.mem)?.saturating_sub(self.in_flight);
        let n = avail.min(room).min(ENTRIES_PER_ROUND);
        for _ in 0..n {
            let sqe = Sqe::from_words(&self.sq.pop(&self.mem));
            match Job::from_sqe(&sqe) {
                Ok(job) => {
                    self.malformed_streak = 0;
                    self.run(session, sqe.user_data, job, now, &mut round);
                }
                Err(e) => {
                    log::debug!("session {session}: bad entry: {}", e.message());
                    self.complete(Completion::error(sqe.user_data, e.status()), &mut round);
                    self.malformed_streak += 1;
                    if self.malformed_streak >= self.policy.max_malformed_entries {
                        self.sq.release(&self.mem);
                        self.publish();
                        return Err(Error::protocol(format!(
                            "{} malformed ring entries in a row",
                            self.malformed_streak
                        )));
                    }
                }
            }
        }
        round.taken = n;
        self.sq.release(&self.mem);
        self.publish();
        Ok(round)
    }

    fn run(
        &mut self,
        session: u64,
        user_data: u64,
        job: Job,
        now: Instant,
        round: &mut RoundResult,
    ) {
        match job {
            Job::Nop { delay } if delay.is_zero() => {
                self.complete(Completion::ok(user_data, 0), round)
            }
            Job::Nop { delay } => {
                if self.in_flight >= self.policy.limits.max_jobs_in_flight {
                    self.complete(Completion::error(user_data, Status::LimitExceeded), round);
                    return;
                }
                self.in_flight += 1;
                round.deferred.push((now + delay, Deferred::ok(session, user_data)));
            }
            Job::Decode(d) => {
                if self.in_flight >= self.policy.limits.max_jobs_in_flight {
                    self.complete(Completion::error(user_data, Status::LimitExceeded), round);
                    return;
                }
                match self.prepare_decode(session, user_data, d) {
                    Ok(job) => {
                        self.in_flight += 1;
                        self.decodes.insert(user_data, job.cancel.clone());
                        round.decodes.push(job);
                    }
                    Err(e) => {
                        log::debug!("session {session}: DECODE refused: {}", e.message());
                        self.complete(Completion::error(user_data, e.status()), round);
                    }
                }
            }
            Job::Fail { status } => self.complete(Completion::error(user_data, status), round),
            Job::Cancel { target } => {
                let status = match self.decodes.get(&target) {
                    Some(flag) => {
                        flag.store(true, Ordering::Release);
                        Status::Ok
                    }
                    None => Status::NotFound,
                };
                self.complete(
                    Completion { user_data, status, flags: 0, result: 0, extra: 0 },
                    round,
                )
            }
            Job::Fill { buffer, offset, len, byte } => {
                let status = match self.buffers.get(&buffer) {
                    None => Status::NotFound,
                    Some(b) => match b.mem.range(offset, len) {
                        None => Status::InvalidArgument,
                        Some((off, len)) => {
                            b.mem.fill(off, len, byte);
                            Status::Ok
                        }
                    },
                };
                self.complete(
                    Completion { user_data, status, flags: 0, result: 0, extra: 0 },
                    round,
                )
            }
        }
    }

    fn complete(&mut self, c: Completion, round: &mut RoundResult) {
        self.cq.push(&self.mem, &c.to_words());
        self.unpublished = true;
        round.completed += 1;
        self.jobs_completed += 1;
        if c.status != Status::Ok {
            self.jobs_failed += 1;
        }
    }

    /// Completes a deferred job in the slot reserved for it.
    pub fn finish_deferred(&mut self, d: Deferred) -> Result<(), Error> {
        self.in_flight = self.in_flight.saturating_sub(1);
        // The slot was reserved when the job was accepted; it can only be gone if the client
        // rewrote its completion head.
        if self.cq.free(&self.mem)? == 0 {
            return Err(Error::protocol("completion ring full although a slot was reserved"));
        }
        let mut round = RoundResult::default();
        let c = Completion {
            user_data: d.user_data,
            status: d.status,
            flags: 0,
            result: d.result,
            extra: d.extra,
        };
        self.complete(c, &mut round);
        self.tokens_decoded += d.tokens;
        if d.tokens > 0 {
            self.rate.add(Instant::now(), d.tokens);
        }
        self.decodes.remove(&d.user_data);
        self.publish();
        Ok(())
    }

    /// Publishes written completions and rings the client if it sleeps.
    fn publish(&mut self) {
        if !self.unpublished {
            return;
        }
        self.unpublished = false;
        self.cq.publish(&self.mem);
        if self.cq.client_sleeps(&self.mem) {
            self.complete_bell.ring();
        }
    }

    /// Registers a client memfd as a buffer after checking its seals, size and the limits;
    /// `others` is what the user's other sessions hold in buffers.
    pub fn register_buffer(
        &mut self,
        fd: OwnedFd,
        size: u64,
        others: u64,
    ) -> Result<(u32, u64), Error> {
        let limits = self.policy.limits;
        if self.buffers.len() as u64 >= u64::from(limits.max_buffers) {
            return Err(Error::new(
                Status::LimitExceeded,
                format!(
                    "this session already has {} buffers, the most allowed",
                    limits.max_buffers
                ),
            ));
        }
        memfd::require_size_seals(&fd)?;
        let actual = memfd::file_size(&fd)?;
        if actual != size || size == 0 {
            return Err(Error::new(
                Status::InvalidArgument,
                format!("buffer is {actual} bytes, the request said {size} (and 0 is not allowed)"),
            ));
        }
        let total = self.buffer_bytes.checked_add(size);
        let Some(total) = total.filter(|t| t.saturating_add(others) <= limits.max_buffer_bytes)
        else {
            return Err(Error::new(
                Status::LimitExceeded,
                format!(
                    "{size} more bytes would exceed this user's {} bytes of buffers ({} in use)",
                    limits.max_buffer_bytes,
                    self.buffer_bytes + others
                ),
            ));
        };
        let len = usize::try_from(size)
            .map_err(|_| Error::new(Status::InvalidArgument, "buffer too large to map"))?;
        let mem = SharedMemory::map(&fd, len).map_err(|e| {
            Error::new(
                Status::InvalidArgument,
                format!("cannot map the buffer read-write: {}", e.message()),
            )
        })?;
        let handle = self.next_buffer;
        self.next_buffer = self.next_buffer.checked_add(1).ok_or_else(|| {
            Error::new(Status::LimitExceeded, "this session used up its buffer handles")
        })?;
        self.buffers.insert(handle, Buffer { mem: Arc::new(mem), size });
        self.buffer_bytes = total;
        Ok((handle, size))
    }

    pub fn unregister_buffer(&mut self, handle: u32) -> Result<(), Error> {
        let buf = self.buffers.remove(&handle).ok_or_else(|| {
            Error::new(Status::NotFound, format!("no buffer with handle {handle}"))
        })?;
        self.buffer_bytes -= buf.size;
        Ok(())
    }
}

impl Active {
    /// Validates a `DECODE` completely and copies its tokens out of the client's buffer, once.
    fn prepare_decode(&self, session: u64, user_data: u64, d: Decode) -> Result<DecodeJob, Error> {
        let ctx = self
            .contexts
            .get(&d.ctx)
            .ok_or_else(|| Error::new(Status::NotFound, format!("no context {}", d.ctx)))?;
        let n_vocab = ctx.model.model.hparams().n_vocab;
        let tokens = match d.input {
            TokenInput::Inline { tokens, n } => tokens[..n as usize].to_vec(),
            TokenInput::Buffer { buffer, offset, n } => {
                let b = self.buffer(buffer)?;
                let (off, _) = b.mem.range(offset, u64::from(n) * 4).ok_or_else(|| {
                    Error::new(Status::InvalidArgument, "the tokens lie outside their buffer")
                })?;
                let mut t = vec![0u32; n as usize];
                b.mem.load_u32s(off, &mut t);
                t
            }
        };
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(Error::new(
                Status::InvalidArgument,
                format!("token {bad} is outside the vocabulary of {n_vocab}"),
            ));
        }
        if tokens.len() > ctx.n_ctx as usize {
            return Err(Error::new(
                Status::LimitExceeded,
                format!("{} tokens do not fit a context of {}", tokens.len(), ctx.n_ctx),
            ));
        }
        let logits = match d.logits {
            None => None,
            Some(l) => {
                let b = self.buffer(l.buffer)?;
                let rows = if l.all { tokens.len() as u64 } else { 1 };
                let bytes = rows * n_vocab as u64 * 4;
                let (off, _) = b.mem.range(l.offset, bytes).ok_or_else(|| {
                    Error::new(
                        Status::InvalidArgument,
                        format!("{bytes} bytes of logits do not fit the buffer at {}", l.offset),
                    )
                })?;
                Some(LogitsSink { mem: b.mem.clone(), offset: off, all: l.all })
            }
        };
        Ok(DecodeJob {
            session,
            user_data,
            ctx: ctx.clone(),
            tokens,
            logits,
            sample: d.sample,
            rewind_to: d.rewind_to,
            priority: self.priority,
            cancel: Arc::new(AtomicBool::new(false)),
        })
    }

    fn buffer(&self, handle: u32) -> Result<&Buffer, Error> {
        self.buffers
            .get(&handle)
            .ok_or_else(|| Error::new(Status::NotFound, format!("no buffer {handle}")))
    }

    /// The model with `handle`.
    pub fn model(&self, handle: u32) -> Result<&Arc<LoadedModel>, Error> {
        self.models
            .get(&handle)
            .ok_or_else(|| Error::new(Status::NotFound, format!("no model {handle}")))
    }

    /// Checks that one more model fits the session's limit.
    pub fn check_model_room(&self) -> Result<(), Error> {
        let max = self.policy.limits.max_models;
        if self.models.len() as u64 >= u64::from(max) {
            return Err(Error::new(
                Status::LimitExceeded,
                format!("this session already holds {max} models, the most allowed"),
            ));
        }
        Ok(())
    }

    pub fn add_model(&mut self, m: Arc<LoadedModel>) -> u32 {
        let h = self.next_model;
        self.next_model = self.next_model.wrapping_add(1).max(1);
        self.models.insert(h, m);
        h
    }

    pub fn free_model(&mut self, handle: u32) -> Result<(), Error> {
        // Contexts on the model keep it alive until they are freed.
        self.models
            .remove(&handle)
            .map(drop)
            .ok_or_else(|| Error::new(Status::NotFound, format!("no model {handle}")))
    }

    /// Checks the user's context limits for one more context of `n_ctx` positions, given what
    /// the user holds in all sessions (`contexts`, `kv_tokens`).
    pub fn check_context_room(
        &self,
        n_ctx: u32,
        contexts: u64,
        kv_tokens: u64,
    ) -> Result<(), Error> {
        let l = self.policy.limits;
        if contexts >= u64::from(l.max_contexts) {
            return Err(Error::new(
                Status::LimitExceeded,
                format!("this user already holds {} contexts, the most allowed", l.max_contexts),
            ));
        }
        if kv_tokens + u64::from(n_ctx) > u64::from(l.max_kv_tokens) {
            return Err(Error::new(
                Status::LimitExceeded,
                format!(
                    "{n_ctx} more KV-cache positions would exceed this user's {} ({kv_tokens} in use)",
                    l.max_kv_tokens
                ),
            ));
        }
        Ok(())
    }

    pub fn add_context(&mut self, ctx: Arc<Context>) -> u32 {
        let h = self.next_ctx;
        self.next_ctx = self.next_ctx.wrapping_add(1).max(1);
        self.kv_tokens += u64::from(ctx.n_ctx);
        self.kv_bytes += ctx.kv_bytes;
        self.contexts.insert(h, ctx);
        h
    }

    pub fn free_context(&mut self, handle: u32) -> Result<(), Error> {
        let ctx = self
            .contexts
            .remove(&handle)
            .ok_or_else(|| Error::new(Status::NotFound, format!("no context {handle}")))?;
        ctx.cancelled.store(true, Ordering::Release);
        self.kv_tokens -= u64::from(ctx.n_ctx);
        self.kv_bytes -= ctx.kv_bytes;
        Ok(())
    }

    /// The session is ending: queued work on its contexts is dropped.
    pub fn cancel_all(&self) {
        for c in self.contexts.values() {
            c.cancelled.store(true, Ordering::Release);
        }
    }
}

/// A second descriptor for the client's side of the submission doorbell.
fn submit_bell_dup(bell: &SubmitDoorbell) -> Result<OwnedFd, Error> {
    use std::os::fd::AsFd;
    bell.as_fd().try_clone_to_owned().map_err(|e| Error::os("dup", e))
}
