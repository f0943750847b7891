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

use crate::policy::{Policy, PolicyError};

/// While spinning, look at the sockets once every this many iterations.
const CONTROL_CHECK_EVERY: u32 = 64;
/// Control packets handled per session per wake-up, so one chatty client cannot starve others.
const PACKETS_PER_WAKEUP: usize = 16;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_SIGNAL: u64 = 1;

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
    started: Instant,
    counters: Counters,
    recv_buf: Vec<u8>,
    stop: bool,
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
        let devices = crate::devices::discover();
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
            started: Instant::now(),
            counters: Counters::default(),
            recv_buf: vec![0u8; MAX_REQUEST_BYTES],
            stop: false,
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
                if iteration % CONTROL_CHECK_EVERY != 0 {
                    std::hint::spin_loop();
                    continue;
                }
                EpollTimeout::ZERO
            } else {
                if self.prepare_sleep() {
                    continue;
                }
                self.sleep_timeout()
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => return Err(ServerError::Os { what: "epoll_wait", source: e }),
            };
            if !spinning {
                self.end_sleep();
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

    fn sleep_timeout(&self) -> EpollTimeout {
        match self.timers.peek() {
            None => EpollTimeout::NONE,
            Some(t) => {
                let left = t.0.due.saturating_duration_since(Instant::now());
                // Round up to whole milliseconds so that the timer is due when we wake.
                let ms = left.as_micros().div_ceil(1000).min(u128::from(u16::MAX)) as u16;
                EpollTimeout::from(ms)
            }
        }
    }

    fn dispatch(&mut self, token: u64, events: EpollFlags) {
        match token {
            TOKEN_LISTENER => self.accept_all(),
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
                let a = self.active_mut(id)?;
                let fd = fds.into_iter().next().ok_or_else(|| Error::protocol("no descriptor"))?;
                match a.register_buffer(fd, size) {
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
        };
        self.send(id, rid, &reply, &[])
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
        }
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
