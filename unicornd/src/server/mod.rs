//! The server: one event-loop thread that accepts connections, answers control requests and
//! polls every session's rings.
//!
//! Each iteration takes a bounded round of entries from every session's submission ring. While
//! there is work, or for a session's spin time after its last activity, the loop keeps polling
//! (looking at the sockets only every [`CONTROL_CHECK_EVERY`] iterations); when all is quiet it
//! flags every ring "needs wake-up", re-checks, and sleeps in `epoll_wait` on the listener, the
//! control sockets, the submission doorbells and the signal descriptor.

mod listener;
mod session;

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering as Atomic;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use unicorn::protocol::messages::{MAX_FDS, MAX_REQUEST_BYTES};
use unicorn::protocol::{
    check_abi, DaemonStatus, Device, Hello, Reply, Request, RingLayout, SessionInfo, Welcome,
    ABI_MAJOR, ABI_MINOR, VERSION,
};
use unicorn::sys::fdpass;
use unicorn::sys::peer::peer_credentials;
use unicorn::{Error, Status};

pub use listener::Listener;
use session::{Active, Deferred, Session};

use crate::models::{self, Registry};
use crate::policy::{Policy, PolicyError};
use crate::scheduler::{self, Context, Engine, Event, Events};

/// While spinning, look at the sockets once every this many iterations.
const CONTROL_CHECK_EVERY: u32 = 64;
/// Control packets handled per session per wake-up, so one chatty client cannot starve others.
const PACKETS_PER_WAKEUP: usize = 16;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_SIGNAL: u64 = 1;
const TOKEN_EVENTS: u64 = 2;
/// Contexts get this many positions when the client asks for 0 (and the model allows it).
const DEFAULT_N_CTX: u32 = 4096;

fn token(session: u64, doorbell: bool) -> u64 {
    session << 2 | u64::from(doorbell)
}

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("socket {path}: {message}")]
    Socket { path: String, message: String },
    #[error("another unicornd already listens on {0}")]
    AlreadyRunning(String),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("{what}: {source}")]
    Os { what: &'static str, source: Errno },
}

fn os(what: &'static str) -> impl FnOnce(Errno) -> ServerError {
    move |source| ServerError::Os { what, source }
}

/// What the server is started with.
#[derive(Debug)]
pub struct Config {
    pub socket: PathBuf,
    pub system_mode: bool,
    pub policy: Policy,
    /// Group owning the socket file (system mode).
    pub socket_group: Option<u32>,
    /// Threads of the CPU compute pool.
    pub threads: usize,
}

#[derive(Debug)]
enum TimerKind {
    Handshake(u64),
    Deferred(Deferred),
}

#[derive(Debug)]
struct Timer {
    due: Instant,
    seq: u64,
    kind: TimerKind,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

#[derive(Debug, Default)]
struct Counters {
    sessions_served: u64,
    jobs_completed: u64,
    sessions_disconnected: u64,
}

/// The daemon's event loop and everything it owns.
#[derive(Debug)]
pub struct Server {
    config: Config,
    listener: Listener,
    epoll: Epoll,
    signals: SignalFd,
    sessions: HashMap<u64, Session>,
    sessions_per_uid: HashMap<u32, u32>,
    next_session: u64,
    timers: BinaryHeap<Reverse<Timer>>,
    timer_seq: u64,
    devices: Vec<Device>,
    npu_status: unicorn::protocol::NpuStatus,
    /// The NPU runtime when some class runs on it (its counters go into each status).
    npu_runtime: Option<Arc<unicorn_xdna::runtime::Runtime>>,
    started: Instant,
    counters: Counters,
    recv_buf: Vec<u8>,
    stop: bool,
    engine: Engine,
    events: Arc<Events>,
    registry: Registry,
    /// Model loads in progress, by file, with the sessions (and requests) waiting for each.
    loads: HashMap<models::FileIdentity, Vec<(u64, u32)>>,
    daemon_uid: u32,
}

impl Server {
    /// Binds the socket (or takes systemd's) and prepares the loop. Blocks SIGTERM and SIGINT
    /// in the calling thread, which must be the process's only thread, so that they arrive
    /// through a signalfd.
    pub fn new(config: Config) -> Result<Server, ServerError> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGTERM);
        mask.add(Signal::SIGINT);
        mask.thread_block().map_err(os("blocking signals"))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(os("signalfd"))?;
        let (mode, dir_mode) = if config.system_mode { (0o660, 0o755) } else { (0o600, 0o700) };
        let listener = match Listener::from_systemd(&config.socket)? {
            Some(l) => {
                log::info!("using the socket passed by systemd");
                l
            }
            None => Listener::bind(&config.socket, mode, config.socket_group, dir_mode)?,
        };
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(os("epoll_create"))?;
        epoll
            .add(listener.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_LISTENER))
            .map_err(os("epoll_ctl"))?;
        epoll
            .add(signals.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_SIGNAL))
            .map_err(os("epoll_ctl"))?;
        let events = Events::new().map_err(|e| ServerError::Socket {
            path: "internal".into(),
            message: e.message().to_owned(),
        })?;
        epoll
            .add(events.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_EVENTS))
            .map_err(os("epoll_ctl"))?;
        let engine = Engine::start(config.threads, events.clone()).map_err(|e| {
            ServerError::Socket { path: "engine".into(), message: e.message().to_owned() }
        })?;
        log::info!("engine: {} compute threads", config.threads);
        // Resolved and logged ("placement: ...", a warning per fallback) once per process;
        // every model uses it.
        // The NPU runtime starts only when the placement asks for the NPU somewhere.
        let wants_npu = std::env::var(unicorn_engine::model::BACKEND_ENV)
            .ok()
            .and_then(|v| v.parse::<unicorn_engine::model::Placement>().ok())
            .is_some_and(|p| p.uses(unicorn_engine::model::Backend::Xdna));
        let npu = crate::devices::npu(wants_npu);
        log::info!("npu: {}", npu.report);
        unicorn_engine::model::set_npu_offer(npu.offer.clone());
        let backends = unicorn_engine::model::Backends::from_env();
        let devices = crate::devices::discover(&backends, &npu);
        let npu_status = npu.status(&backends);
        let npu_runtime = backends.npu_runtime().cloned();
        for d in &devices {
            log::info!(
                "device {}: {} ({}; {})",
                d.kind.name(),
                d.name,
                if d.in_use { "in use" } else { "not used" },
                d.detail
            );
        }
        Ok(Server {
            config,
            listener,
            epoll,
            signals,
            sessions: HashMap::new(),
            sessions_per_uid: HashMap::new(),
            next_session: 1,
            timers: BinaryHeap::new(),
            timer_seq: 0,
            devices,
            npu_status,
            npu_runtime,
            started: Instant::now(),
            counters: Counters::default(),
            recv_buf: vec![0u8; MAX_REQUEST_BYTES],
            stop: false,
            engine,
            events,
            registry: Registry::default(),
            loads: HashMap::new(),
            daemon_uid: nix::unistd::geteuid().as_raw(),
        })
    }

    pub fn socket_path(&self) -> &std::path::Path {
        self.listener.path()
    }

    /// Serves until SIGTERM or SIGINT; then says goodbye to every client and returns.
    pub fn run(&mut self) -> Result<(), ServerError> {
        log::info!(
            "unicornd {VERSION} listening on {} ({} mode, ABI {ABI_MAJOR}.{ABI_MINOR})",
            self.listener.path().display(),
            if self.config.system_mode { "system" } else { "user" }
        );
        let mut events = vec![EpollEvent::empty(); 64];
        let mut spin_until = Instant::now();
        let mut iteration: u32 = 0;
        while !self.stop {
            let now = Instant::now();
            let spin = self.poll_rings(now);
            self.fire_timers(now);
            if let Some(spin) = spin {
                spin_until = spin_until.max(now + spin);
            }
            let spinning = spin.is_some() || now < spin_until;
            let timeout = if spinning {
                iteration = iteration.wrapping_add(1);
                if !iteration.is_multiple_of(CONTROL_CHECK_EVERY) {
                    std::hint::spin_loop();
                    continue;
                }
                EpollTimeout::ZERO
            } else {
                if self.prepare_sleep() {
                    continue;
                }
                let keep_alive =
                    Duration::from_secs(u64::from(self.config.policy.daemon.model_keep_alive_s));
                let unload_in = self.registry.sweep(Instant::now(), keep_alive);
                self.sleep_timeout(unload_in)
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => return Err(ServerError::Os { what: "epoll_wait", source: e }),
            };
            if !spinning {
                self.end_sleep();
                // Take what the doorbells announced before answering control requests, so that a
                // client's submissions are in the daemon's state before any request it sent after.
                if let Some(spin) = self.poll_rings(Instant::now()) {
                    spin_until = spin_until.max(Instant::now() + spin);
                }
            }
            for ev in &events[..n] {
                self.dispatch(ev.data(), ev.events());
            }
        }
        self.shutdown();
        Ok(())
    }

    /// One round over every active session's ring. Returns the longest spin time among the
    /// sessions that had work, or `None` when none had.
    fn poll_rings(&mut self, now: Instant) -> Option<Duration> {
        let mut spin: Option<Duration> = None;
        let mut broken = Vec::new();
        for s in self.sessions.values_mut() {
            let Some(active) = s.active.as_mut() else {
                continue;
            };
            match active.poll_ring(s.id, now) {
                Ok(round) => {
                    if round.taken > 0 {
                        spin = Some(spin.unwrap_or_default().max(active.spin));
                    }
                    self.counters.jobs_completed += round.completed;
                    for (due, d) in round.deferred {
                        self.timer_seq += 1;
                        let kind = TimerKind::Deferred(d);
                        self.timers.push(Reverse(Timer { due, seq: self.timer_seq, kind }));
                    }
                    for job in round.decodes {
                        let (session, user_data) = (job.session, job.user_data);
                        if let Err(e) = self.engine.submit(job) {
                            log::error!("{}", e.message());
                            let failed =
                                Deferred { status: e.status(), ..Deferred::ok(session, user_data) };
                            if let Err(e) = active.finish_deferred(failed) {
                                broken.push((s.id, e));
                            }
                        }
                    }
                }
                Err(e) => broken.push((s.id, e)),
            }
        }
        for (id, e) in broken {
            self.disconnect(id, e);
        }
        spin
    }

    fn fire_timers(&mut self, now: Instant) {
        while self.timers.peek().is_some_and(|t| t.0.due <= now) {
            let Some(Reverse(timer)) = self.timers.pop() else {
                break;
            };
            match timer.kind {
                TimerKind::Handshake(id) => {
                    if self.sessions.get(&id).is_some_and(|s| s.active.is_none()) {
                        let e =
                            Error::new(Status::Timeout, "no hello within the handshake timeout");
                        self.disconnect(id, e);
                    }
                }
                TimerKind::Deferred(d) => {
                    let Some(active) =
                        self.sessions.get_mut(&d.session).and_then(|s| s.active.as_mut())
                    else {
                        continue; // the session is gone, and its job with it
                    };
                    match active.finish_deferred(d) {
                        Ok(()) => self.counters.jobs_completed += 1,
                        Err(e) => self.disconnect(d.session, e),
                    }
                }
            }
        }
    }

    /// Flags every ring as sleeping, then re-checks them (see `unicorn::protocol::ring`).
    /// Returns true when work arrived meanwhile, in which case nothing sleeps.
    fn prepare_sleep(&mut self) -> bool {
        let actives = || self.sessions.values().filter_map(|s| s.active.as_ref());
        for a in actives() {
            a.set_sleeping(true);
        }
        if actives().any(|a| a.has_work()) {
            self.end_sleep();
            return true;
        }
        false
    }

    fn end_sleep(&self) {
        for a in self.sessions.values().filter_map(|s| s.active.as_ref()) {
            a.set_sleeping(false);
        }
    }

    /// How long to sleep: until the next timer, or `also` (a model's keep-alive running out).
    fn sleep_timeout(&self, also: Option<Duration>) -> EpollTimeout {
        let timer = self.timers.peek().map(|t| t.0.due.saturating_duration_since(Instant::now()));
        let next = match (timer, also) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match next {
            None => EpollTimeout::NONE,
            Some(left) => {
                // Round up to whole milliseconds so that the timer is due when we wake.
                let ms = left.as_micros().div_ceil(1000).min(u128::from(u16::MAX)) as u16;
                EpollTimeout::from(ms)
            }
        }
    }

    fn dispatch(&mut self, token: u64, events: EpollFlags) {
        match token {
            TOKEN_LISTENER => self.accept_all(),
            TOKEN_EVENTS => self.worker_events(),
            TOKEN_SIGNAL => {
                while let Ok(Some(sig)) = self.signals.read_signal() {
                    log::info!("received signal {}; shutting down", sig.ssi_signo);
                    self.stop = true;
                }
            }
            t => {
                let id = t >> 2;
                if t & 1 == 1 {
                    let Some(active) = self.sessions.get(&id).and_then(|s| s.active.as_ref())
                    else {
                        return;
                    };
                    if let Err(e) = active.submit_bell.drain() {
                        self.disconnect(id, e);
                    }
                } else {
                    self.control_ready(id, events);
                }
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            let fd = match self.listener.accept() {
                Ok(Some(fd)) => fd,
                Ok(None) => return,
                Err(e) => {
                    // EMFILE and friends: keep serving the sessions we have.
                    log::warn!("accept: {e}");
                    return;
                }
            };
            let creds = match peer_credentials(&fd) {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("could not read peer credentials: {e}");
                    continue;
                }
            };
            let id = self.next_session;
            self.next_session += 1;
            if let Err(e) =
                self.epoll.add(&fd, EpollEvent::new(EpollFlags::EPOLLIN, token(id, false)))
            {
                log::warn!("epoll_ctl for a new connection: {e}");
                continue;
            }
            log::debug!("connection {id} from pid {} uid {}", creds.pid, creds.uid);
            let now = Instant::now();
            let due =
                now + Duration::from_secs(u64::from(self.config.policy.daemon.handshake_timeout_s));
            self.timer_seq += 1;
            self.timers.push(Reverse(Timer {
                due,
                seq: self.timer_seq,
                kind: TimerKind::Handshake(id),
            }));
            self.sessions.insert(id, Session { id, ctrl: fd, creds, accepted: now, active: None });
        }
    }

    fn control_ready(&mut self, id: u64, events: EpollFlags) {
        for _ in 0..PACKETS_PER_WAKEUP {
            let Some(s) = self.sessions.get(&id) else {
                return;
            };
            let got = match fdpass::recv_packet(&s.ctrl, &mut self.recv_buf, MAX_FDS, true) {
                Ok(got) => got,
                Err(e) if e.status() == Status::WouldBlock => {
                    if events.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
                        self.close(id, "hung up");
                    }
                    return;
                }
                Err(e) if e.status() == Status::Disconnected => {
                    self.close(id, "hung up");
                    return;
                }
                Err(e) => {
                    self.disconnect(id, e);
                    return;
                }
            };
            let bytes = self.recv_buf[..got.len].to_vec();
            if let Err(e) = self.handle_packet(id, &bytes, got.fds) {
                self.disconnect(id, e);
                return;
            }
        }
    }

    /// Handles one control packet. An error return ends the session; errors the client can
    /// recover from are sent as replies instead.
    fn handle_packet(&mut self, id: u64, bytes: &[u8], fds: Vec<OwnedFd>) -> Result<(), Error> {
        let (rid, req) = Request::decode(bytes)?;
        if fds.len() != req.fd_count() {
            return Err(Error::protocol(format!(
                "request carries {} descriptors, {} expected",
                fds.len(),
                req.fd_count()
            )));
        }
        let active = self.sessions.get(&id).is_some_and(|s| s.active.is_some());
        let reply = match (req, active) {
            (Request::Hello(hello), false) => return self.hello(id, rid, hello),
            (Request::Hello(_), true) => return Err(Error::protocol("a second hello")),
            (_, false) => return Err(Error::protocol("the first message must be a hello")),
            (Request::Echo { payload }, true) => Reply::Echo { payload },
            (Request::Status, true) => Reply::Status(self.status()),
            (Request::RegisterBuffer { size }, true) => {
                let others = self.user_usage(id).2;
                let a = self.active_mut(id)?;
                let fd = fds.into_iter().next().ok_or_else(|| Error::protocol("no descriptor"))?;
                match a.register_buffer(fd, size, others) {
                    Ok((handle, size)) => Reply::BufferRegistered { handle, size },
                    Err(e) => error_reply(e),
                }
            }
            (Request::UnregisterBuffer { handle }, true) => {
                match self.active_mut(id)?.unregister_buffer(handle) {
                    Ok(()) => Reply::Done,
                    Err(e) => error_reply(e),
                }
            }
            (Request::LoadModel, true) => {
                let fd = fds.into_iter().next().ok_or_else(|| Error::protocol("no descriptor"))?;
                match self.load_model(id, rid, fd) {
                    // The reply comes when the loader thread is done.
                    Ok(None) => return Ok(()),
                    Ok(Some((reply, vocab))) => return self.send(id, rid, &reply, &[vocab]),
                    Err(e) => error_reply(e),
                }
            }
            (Request::FreeModel { model }, true) => match self.active_mut(id)?.free_model(model) {
                Ok(()) => Reply::Done,
                Err(e) => error_reply(e),
            },
            (Request::CreateContext { model, n_ctx, kv_f32, sampler }, true) => {
                match self.create_context(id, model, n_ctx, kv_f32, &sampler) {
                    Ok((ctx, n_ctx)) => Reply::ContextCreated { ctx, n_ctx },
                    Err(e) => error_reply(e),
                }
            }
            (Request::FreeContext { ctx }, true) => match self.active_mut(id)?.free_context(ctx) {
                Ok(()) => Reply::Done,
                Err(e) => error_reply(e),
            },
            (Request::SetSampler { ctx, sampler }, true) => {
                let a = self.active_mut(id)?;
                let set = scheduler::sampler_params(&sampler).and_then(|p| {
                    let c = a
                        .contexts
                        .get(&ctx)
                        .ok_or_else(|| Error::new(Status::NotFound, format!("no context {ctx}")))?;
                    c.set_sampler(p);
                    Ok(())
                });
                match set {
                    Ok(()) => Reply::Done,
                    Err(e) => error_reply(e),
                }
            }
            (Request::Tokenize { model, add_special, parse_special, text }, true) => {
                match self.active_mut(id)?.model(model) {
                    Ok(m) => Reply::Tokens {
                        ids: m.model.tokenizer().tokenize(&text, add_special, parse_special),
                    },
                    Err(e) => error_reply(e),
                }
            }
        };
        self.send(id, rid, &reply, &[])
    }

    /// Starts loading a model from a client's descriptor. A model already loaded from the same
    /// file is shared at once (the reply and the vocabulary are returned); otherwise a loader
    /// thread reads the file and the reply goes out when it reports (`None`).
    fn load_model(
        &mut self,
        id: u64,
        rid: u32,
        fd: OwnedFd,
    ) -> Result<Option<(Reply, std::os::fd::RawFd)>, Error> {
        let uid = self.sessions.get(&id).map(|s| s.creds.uid).unwrap_or(u32::MAX);
        let a = self.active_mut(id)?;
        a.check_model_room()?;
        if a.loading.is_some() {
            return Err(Error::new(Status::LimitExceeded, "a model load is already in progress"));
        }
        let max_bytes = a.policy.max_model_bytes;
        let identity = models::identify(&fd, max_bytes)?;
        if let Some(m) = self.registry.by_identity(&identity) {
            let a = self.active_mut(id)?;
            let handle = a.add_model(m.clone());
            log::info!("session {id}: shares model {:?} ({})", m.model.name(), &m.digest[..16]);
            return Ok(Some((Reply::ModelLoaded(m.info(handle, true)), m.vocab.as_raw_fd())));
        }
        self.active_mut(id)?.loading = Some(rid);
        // Another session is loading this very file: wait for that copy rather than make one.
        if let Some(waiters) = self.loads.get_mut(&identity) {
            waiters.push((id, rid));
            return Ok(None);
        }
        self.loads.insert(identity, vec![(id, rid)]);
        let events = self.events.clone();
        let daemon_uid = self.daemon_uid;
        let spawned = std::thread::Builder::new().name("unicorn-loader".into()).spawn(move || {
            let result = models::load(fd, identity, uid, daemon_uid).map(Box::new);
            models::return_free_heap();
            events.push(Event::Loaded { identity, result });
        });
        if let Err(e) = spawned {
            self.loads.remove(&identity);
            self.active_mut(id)?.loading = None;
            return Err(Error::os("starting a loader thread", e));
        }
        Ok(None)
    }

    fn create_context(
        &mut self,
        id: u64,
        model: u32,
        n_ctx: u32,
        kv_f32: bool,
        sampler: &unicorn::protocol::SamplerParams,
    ) -> Result<(u32, u32), Error> {
        let params = scheduler::sampler_params(sampler)?;
        let a = self.active_mut(id)?;
        let m = a.model(model)?.clone();
        let train = m.model.hparams().n_ctx_train as u32;
        let n_ctx = if n_ctx == 0 { train.min(DEFAULT_N_CTX) } else { n_ctx };
        if n_ctx > train {
            return Err(Error::new(
                Status::InvalidArgument,
                format!("{n_ctx} positions is more than the {train} the model was trained for"),
            ));
        }
        let (contexts, kv_tokens, _) = self.user_usage(id);
        let a = self.active_mut(id)?;
        a.check_context_room(n_ctx, contexts, kv_tokens)?;
        let ty = if kv_f32 {
            unicorn_engine::model::KvType::F32
        } else {
            unicorn_engine::model::KvType::F16
        };
        let kv = m.model.new_state(n_ctx as usize, ty).map_err(|e| {
            let status = match e {
                unicorn_engine::model::ModelError::KvMemory { .. } => Status::LimitExceeded,
                _ => Status::InvalidArgument,
            };
            Error::new(status, e.to_string())
        })?;
        let ctx = Arc::new(Context::new(m, kv, params)?);
        Ok((a.add_context(ctx), n_ctx))
    }

    /// What the user of session `id` holds in all their sessions: (contexts, KV-cache positions,
    /// buffer bytes of the other sessions).
    fn user_usage(&self, id: u64) -> (u64, u64, u64) {
        let Some(uid) = self.sessions.get(&id).map(|s| s.creds.uid) else { return (0, 0, 0) };
        let mut usage = (0, 0, 0);
        for s in self.sessions.values().filter(|s| s.creds.uid == uid) {
            if let Some(a) = &s.active {
                usage.0 += a.contexts.len() as u64;
                usage.1 += a.kv_tokens;
                if s.id != id {
                    usage.2 += a.buffer_bytes;
                }
            }
        }
        usage
    }

    /// What the engine and loader threads reported.
    fn worker_events(&mut self) {
        for ev in self.events.drain() {
            match ev {
                Event::Finished(f) => {
                    let Some(a) = self.sessions.get_mut(&f.session).and_then(|s| s.active.as_mut())
                    else {
                        continue; // the session ended while its job ran
                    };
                    let d = Deferred {
                        session: f.session,
                        user_data: f.user_data,
                        status: f.status,
                        result: f.result,
                        extra: f.extra,
                        tokens: f.tokens,
                    };
                    match a.finish_deferred(d) {
                        Ok(()) => self.counters.jobs_completed += 1,
                        Err(e) => self.disconnect(f.session, e),
                    }
                }
                Event::Loaded { identity, result } => self.model_loaded(identity, result),
            }
        }
    }

    /// A loader thread finished: every session that asked for this file gets its answer.
    fn model_loaded(
        &mut self,
        identity: models::FileIdentity,
        result: Result<Box<models::LoadedModel>, Error>,
    ) {
        let waiters = self.loads.remove(&identity).unwrap_or_default();
        let model = match result {
            Ok(m) => {
                let (m, shared) = self.registry.insert(*m);
                log::info!(
                    "loaded model {:?} ({}, {} bytes, {}, {}) for {} session(s)",
                    m.model.name(),
                    m.model.file_type(),
                    m.size,
                    m.storage.name(),
                    &m.digest[..16],
                    waiters.len()
                );
                Ok((m, shared))
            }
            Err(e) => {
                log::info!("model load failed: {}", e.message());
                Err(e)
            }
        };
        for (k, (id, rid)) in waiters.into_iter().enumerate() {
            let Some(a) = self.sessions.get_mut(&id).and_then(|s| s.active.as_mut()) else {
                continue; // the session ended while the model loaded
            };
            a.loading = None;
            let sent = match &model {
                Err(e) => self.send(id, rid, &error_reply(e.clone()), &[]),
                Ok((m, shared)) => {
                    let handle = a.add_model(m.clone());
                    let reply = Reply::ModelLoaded(m.info(handle, *shared || k > 0));
                    self.send(id, rid, &reply, &[m.vocab.as_raw_fd()])
                }
            };
            if let Err(e) = sent {
                self.disconnect(id, e);
            }
        }
    }

    fn active_mut(&mut self, id: u64) -> Result<&mut Active, Error> {
        self.sessions
            .get_mut(&id)
            .and_then(|s| s.active.as_mut())
            .ok_or_else(|| Error::new(Status::Internal, "session vanished"))
    }

    fn send(
        &self,
        id: u64,
        rid: u32,
        reply: &Reply,
        fds: &[std::os::fd::RawFd],
    ) -> Result<(), Error> {
        let Some(s) = self.sessions.get(&id) else {
            return Ok(());
        };
        fdpass::send_packet(&s.ctrl, &reply.encode(rid), fds, true).map_err(|e| {
            if e.status() == Status::WouldBlock {
                Error::protocol("the client does not read its replies")
            } else {
                e
            }
        })
    }

    /// The handshake: checks ABI and policy, sets up the rings, and welcomes the client.
    fn hello(&mut self, id: u64, rid: u32, hello: Hello) -> Result<(), Error> {
        let Some(s) = self.sessions.get(&id) else {
            return Ok(());
        };
        let creds = s.creds.clone();
        let refuse = |server: &mut Server, status: Status, message: String| {
            log::info!("refused pid {} uid {}: {message}", creds.pid, creds.uid);
            // Best effort: the connection closes either way.
            let _ = server.send(id, rid, &Reply::Error { status, message }, &[]);
            server.close(id, "refused");
            Ok(())
        };
        if let Err(m) = check_abi(hello.abi_major, hello.abi_minor) {
            return refuse(self, Status::AbiMismatch, m);
        }
        let policy = &self.config.policy;
        if let Err(m) = policy.admits(&creds) {
            return refuse(self, Status::PermissionDenied, m);
        }
        let active_sessions = self.sessions.values().filter(|s| s.active.is_some()).count();
        if active_sessions >= policy.daemon.max_sessions as usize {
            let m =
                format!("the daemon serves its maximum of {} sessions", policy.daemon.max_sessions);
            return refuse(self, Status::LimitExceeded, m);
        }
        let limits = policy.for_user(creds.uid).clone();
        let mine = self.sessions_per_uid.get(&creds.uid).copied().unwrap_or(0);
        if mine >= limits.max_sessions_per_user {
            let m = format!("uid {} already has {mine} sessions, the most allowed", creds.uid);
            return refuse(self, Status::LimitExceeded, m);
        }
        let layout =
            RingLayout::negotiate(hello.sq_entries, limits.sq_entries, limits.max_sq_entries)?;
        let priority = hello.priority.max(limits.max_priority);
        let spin_us = hello.daemon_spin_us.min(limits.max_spin_us);
        let (active, fds) = Active::new(
            hello.client_name.clone(),
            priority,
            Duration::from_micros(u64::from(spin_us)),
            layout,
            limits.clone(),
        )?;
        let welcome = Welcome {
            session_id: id,
            abi_major: ABI_MAJOR,
            abi_minor: ABI_MINOR,
            daemon_version: VERSION.into(),
            priority,
            daemon_spin_us: spin_us,
            sq_entries: layout.sq_entries(),
            cq_entries: layout.cq_entries(),
            ring_bytes: layout.size() as u64,
            limits: limits.limits,
            devices: self.devices.clone(),
        };
        self.epoll
            .add(&active.submit_bell, EpollEvent::new(EpollFlags::EPOLLIN, token(id, true)))
            .map_err(|e| Error::os("epoll_ctl", e))?;
        let raw =
            [fds.ring.as_raw_fd(), fds.submit_bell.as_raw_fd(), fds.complete_bell.as_raw_fd()];
        if let Some(s) = self.sessions.get_mut(&id) {
            s.active = Some(active);
        }
        *self.sessions_per_uid.entry(creds.uid).or_default() += 1;
        self.counters.sessions_served += 1;
        log::info!(
            "session {id}: {:?} pid {} uid {} ({}, {} ring entries, spin {spin_us} us)",
            hello.client_name,
            creds.pid,
            creds.uid,
            priority.name(),
            layout.sq_entries()
        );
        self.send(id, rid, &Reply::Welcome(welcome), &raw)
    }

    fn status(&self) -> DaemonStatus {
        let now = Instant::now();
        let mut sessions: Vec<SessionInfo> = self
            .sessions
            .values()
            .filter_map(|s| {
                let a = s.active.as_ref()?;
                Some(SessionInfo {
                    id: s.id,
                    pid: s.creds.pid,
                    uid: s.creds.uid,
                    name: a.name.clone(),
                    priority: a.priority,
                    connected_ms: now.duration_since(s.accepted).as_millis() as u64,
                    jobs_completed: a.jobs_completed,
                    jobs_failed: a.jobs_failed,
                    jobs_in_flight: a.in_flight,
                    buffers: a.buffers.len() as u32,
                    buffer_bytes: a.buffer_bytes,
                    models: a.models.len() as u32,
                    contexts: a.contexts.len() as u32,
                    kv_tokens: a.kv_tokens,
                    kv_bytes: a.kv_bytes,
                    tokens_decoded: a.tokens_decoded,
                    token_rate: a.rate.rate(now),
                })
            })
            .collect();
        sessions.sort_by_key(|s| s.id);
        DaemonStatus {
            version: VERSION.into(),
            pid: std::process::id(),
            system_mode: self.config.system_mode,
            uptime_ms: now.duration_since(self.started).as_millis() as u64,
            socket_path: self.listener.path().display().to_string(),
            sessions_served: self.counters.sessions_served,
            jobs_completed: self.counters.jobs_completed,
            sessions_disconnected: self.counters.sessions_disconnected,
            sessions,
            devices: self.devices.clone(),
            models: self.model_status(),
            threads: self.engine.threads() as u32,
            engine_queue: self.engine.stats().queued.load(Atomic::Relaxed) as u32,
            engine_steps: self.engine.stats().steps.load(Atomic::Relaxed),
            engine_batched_steps: self.engine.stats().batched_steps.load(Atomic::Relaxed),
            npu: {
                let mut npu = self.npu_status.clone();
                if let Some(rt) = &self.npu_runtime {
                    npu.details.push(crate::devices::npu_activity(rt));
                }
                npu
            },
        }
    }

    fn model_status(&self) -> Vec<unicorn::protocol::ModelStatus> {
        let actives: Vec<&Active> =
            self.sessions.values().filter_map(|s| s.active.as_ref()).collect();
        let mut out: Vec<_> = self
            .registry
            .live()
            .into_iter()
            .map(|m| {
                let users = actives
                    .iter()
                    .filter(|a| {
                        a.models.values().any(|x| Arc::ptr_eq(x, &m))
                            || a.contexts.values().any(|c| Arc::ptr_eq(&c.model, &m))
                    })
                    .count();
                let contexts = actives
                    .iter()
                    .flat_map(|a| a.contexts.values())
                    .filter(|c| Arc::ptr_eq(&c.model, &m))
                    .count();
                unicorn::protocol::ModelStatus {
                    name: m.model.name().to_owned(),
                    arch: m.model.hparams().arch.clone(),
                    file_type: m.model.file_type().to_owned(),
                    size_bytes: m.size,
                    digest: m.digest.clone(),
                    users: users as u32,
                    contexts: contexts as u32,
                    storage: m.storage.name().to_owned(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        out
    }

    /// Ends a session the client broke: tells it why, then closes it.
    fn disconnect(&mut self, id: u64, why: Error) {
        let Some(s) = self.sessions.get(&id) else {
            return;
        };
        log::warn!(
            "disconnecting session {id} (pid {} uid {}): {}",
            s.creds.pid,
            s.creds.uid,
            why.message()
        );
        let bye = Reply::Goodbye { status: why.status(), message: why.message().to_owned() };
        let _ = fdpass::send_packet(&s.ctrl, &bye.encode(0), &[], true);
        self.counters.sessions_disconnected += 1;
        self.close(id, "disconnected");
    }

    /// Frees everything a session holds. Its deferred jobs die with it (their timers find no
    /// session).
    fn close(&mut self, id: u64, how: &str) {
        let Some(s) = self.sessions.remove(&id) else {
            return;
        };
        let _ = self.epoll.delete(&s.ctrl);
        if let Some(a) = &s.active {
            a.cancel_all();
            // The client holds the same doorbell file, which would keep the registration alive.
            let _ = self.epoll.delete(&a.submit_bell);
            if let Some(n) = self.sessions_per_uid.get_mut(&s.creds.uid) {
                *n -= 1;
                if *n == 0 {
                    self.sessions_per_uid.remove(&s.creds.uid);
                }
            }
            log::info!(
                "session {id} {how}: {} jobs completed, {} in flight dropped",
                a.jobs_completed,
                a.in_flight
            );
        }
    }

    fn shutdown(&mut self) {
        let ids: Vec<u64> = self.sessions.keys().copied().collect();
        for id in ids {
            if let Some(s) = self.sessions.get(&id) {
                let bye = Reply::Goodbye {
                    status: Status::Disconnected,
                    message: "unicornd is shutting down".into(),
                };
                let _ = fdpass::send_packet(&s.ctrl, &bye.encode(0), &[], true);
            }
            self.close(id, "closed at shutdown");
        }
        log::info!("stopped after {:?}", self.started.elapsed());
    }
}

fn error_reply(e: Error) -> Reply {
    Reply::Error { status: e.status(), message: e.message().to_owned() }
}
