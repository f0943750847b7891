//! The Rust client API: connect to unicornd, push jobs through the rings, reap completions.
//!
//! A [`Client`] is one session. It is used from one thread at a time (`&mut self`); the C ABI
//! wraps it in a mutex. Submissions and completions never block; [`Client::wait`] blocks, first
//! spinning briefly (see [`WaitMode`]) and then sleeping on the completion doorbell.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::UnixAddr;
use nix::sys::socket::{connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType};
use nix::sys::time::TimeVal;

use crate::error::{Error, Result};
use crate::protocol::messages::{MAX_CLIENT_NAME, MAX_REPLY_BYTES};
use crate::protocol::ring::{Consumer, CqeWords, Producer, SqeWords};
use crate::protocol::{
    codec, Completion, DaemonStatus, Hello, Job, Priority, Reply, Request, RingLayout, Welcome,
    ABI_MAJOR, ABI_MINOR,
};
use crate::status::Status;
use crate::sys::doorbell::{CompletionDoorbell, SubmitDoorbell};
use crate::sys::{fdpass, memfd, SharedMemory};

mod models;
pub use models::{ContextParams, DecodeOutput, LogitsWanted, Model, ModelContext};

/// Where the system daemon listens.
pub const SYSTEM_SOCKET: &str = "/run/unicorn/unicornd.sock";
/// Environment variable naming the socket to use instead of the default search.
pub const SOCKET_ENV: &str = "UNICORN_SOCKET";

/// How long a control request may wait for its reply before the daemon is declared stuck.
pub(crate) const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest spin of [`WaitMode::Adaptive`]; completions slower than this are slept for.
const ADAPTIVE_SPIN_MAX: Duration = Duration::from_micros(50);
/// What [`WaitMode::Adaptive`] asks the daemon to poll for after this session's activity.
const ADAPTIVE_DAEMON_SPIN_US: u32 = 50;

/// The user-mode socket path: `$XDG_RUNTIME_DIR/unicorn/unicornd.sock`, or
/// `/tmp/unicorn-$UID/unicornd.sock` when `XDG_RUNTIME_DIR` is unset.
pub fn user_socket_path() -> PathBuf {
    user_runtime_dir().join("unicornd.sock")
}

/// The user-mode runtime directory that holds the socket.
pub fn user_runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("unicorn"),
        None => PathBuf::from(format!("/tmp/unicorn-{}", nix::unistd::getuid())),
    }
}

/// The sockets tried in order: `$UNICORN_SOCKET` alone when set; else the system socket, then
/// the user socket.
pub fn socket_candidates() -> Vec<PathBuf> {
    match std::env::var_os(SOCKET_ENV).filter(|v| !v.is_empty()) {
        Some(p) => vec![PathBuf::from(p)],
        None => vec![PathBuf::from(SYSTEM_SOCKET), user_socket_path()],
    }
}

/// How a client waits for completions, and how long it asks the daemon to keep polling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitMode {
    /// Spin for about twice the recent completion latency (up to 50 µs), then sleep; the
    /// daemon polls for 50 µs after activity. The default.
    Adaptive,
    /// Always sleep on the doorbells: lowest CPU use, a wake-up on every round trip.
    Sleep,
    /// Spin up to this long on both sides before sleeping: lowest latency, burns CPU.
    Spin(Duration),
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The socket; `None` searches [`socket_candidates`].
    pub socket: Option<PathBuf>,
    /// Shown in `unicorn status` (cut to 64 bytes).
    pub name: String,
    pub priority: Priority,
    /// Submission ring entries wanted (0: the daemon's default).
    pub sq_entries: u32,
    pub wait: WaitMode,
}

impl Default for ClientOptions {
    fn default() -> Self {
        let name = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "client".into());
        ClientOptions {
            socket: None,
            name,
            priority: Priority::Normal,
            sq_entries: 0,
            wait: WaitMode::Adaptive,
        }
    }
}

/// A session with unicornd.
#[derive(Debug)]
pub struct Client {
    ctrl: OwnedFd,
    socket_path: PathBuf,
    welcome: Welcome,
    mem: SharedMemory,
    sq: Producer<SqeWords>,
    cq: Consumer<CqeWords>,
    submit_bell: SubmitDoorbell,
    complete_bell: CompletionDoorbell,
    wait_mode: WaitMode,
    /// Recent completion latency, for the adaptive spin.
    latency_ewma: Duration,
    /// Completions taken off the ring by `ping` that belong to the caller's own jobs.
    stash: VecDeque<Completion>,
    /// Jobs submitted and not yet reaped.
    in_flight: u64,
    next_request: u32,
    next_probe: u64,
    reply_buf: Vec<u8>,
    /// Set once the session is over; every later call fails with it.
    closed: Option<Error>,
    /// The buffer synchronous decodes pass tokens and logits through.
    staging: Option<models::Staging>,
}

/// user_data values at or above this are reserved for the client's own probes (`ping`).
pub const RESERVED_USER_DATA: u64 = 1 << 63;

impl Client {
    /// Connects with default options.
    pub fn connect_default() -> Result<Client> {
        Client::connect(&ClientOptions::default())
    }

    /// Connects to the daemon and sets up the rings.
    pub fn connect(opts: &ClientOptions) -> Result<Client> {
        let candidates = match &opts.socket {
            Some(p) => vec![p.clone()],
            None => socket_candidates(),
        };
        let mut tried = Vec::new();
        // A daemon that is there but refuses us says more than a socket that is missing: its
        // status wins, so that callers (and the CLI's auto-spawn) do not mistake it for none.
        let mut status = Status::NoDaemon;
        for path in &candidates {
            match connect_socket(path) {
                Ok(fd) => return Client::handshake(fd, path, opts),
                Err(e) => {
                    if status == Status::NoDaemon {
                        status = e.status();
                    }
                    tried.push(format!("{}: {}", path.display(), e.message()));
                }
            }
        }
        let (what, hint) = match status {
            Status::NoDaemon => ("no unicornd answered", "start one with `unicornd --user`"),
            Status::PermissionDenied => (
                "unicornd refused this user",
                "ask to be added to group `unicorn`, or start your own with `unicornd --user`",
            ),
            _ => ("could not connect to unicornd", "see the daemon's log"),
        };
        Err(Error::new(status, format!("{what} ({}); {hint}", tried.join("; "))))
    }

    fn handshake(ctrl: OwnedFd, path: &Path, opts: &ClientOptions) -> Result<Client> {
        let daemon_spin_us = match opts.wait {
            WaitMode::Adaptive => ADAPTIVE_DAEMON_SPIN_US,
            WaitMode::Sleep => 0,
            WaitMode::Spin(d) => u32::try_from(d.as_micros()).unwrap_or(u32::MAX),
        };
        let hello = Request::Hello(Hello {
            abi_major: ABI_MAJOR,
            abi_minor: ABI_MINOR,
            priority: opts.priority,
            sq_entries: opts.sq_entries,
            daemon_spin_us,
            client_name: codec::truncate_str(&opts.name, MAX_CLIENT_NAME).to_owned(),
        });
        let mut reply_buf = vec![0u8; MAX_REPLY_BYTES];
        fdpass::send_packet(&ctrl, &hello.encode(1), &[], false)?;
        let got = fdpass::recv_packet(&ctrl, &mut reply_buf, 3, false)?;
        let (_, reply) = Reply::decode(&reply_buf[..got.len])?;
        let welcome = match reply {
            Reply::Welcome(w) => w,
            Reply::Error { status, message } | Reply::Goodbye { status, message } => {
                return Err(Error::new(status, format!("unicornd refused the session: {message}")))
            }
            other => return Err(Error::protocol(format!("expected a welcome, got {other:?}"))),
        };
        let mut fds = got.fds.into_iter();
        let (Some(ring_fd), Some(submit_fd), Some(complete_fd)) =
            (fds.next(), fds.next(), fds.next())
        else {
            return Err(Error::protocol(
                "the welcome did not carry the ring and doorbell descriptors",
            ));
        };
        let layout = RingLayout::new(welcome.sq_entries)?;
        if layout.cq_entries() != welcome.cq_entries || layout.size() as u64 != welcome.ring_bytes {
            return Err(Error::protocol(format!(
                "welcome announces a ring of {}+{} entries in {} bytes, which is not the layout {:?}",
                welcome.sq_entries, welcome.cq_entries, welcome.ring_bytes, layout
            )));
        }
        memfd::require_size_seals(&ring_fd)?;
        let mem = SharedMemory::map(&ring_fd, layout.size())?;
        layout.check_header(&mem)?;
        Ok(Client {
            ctrl,
            socket_path: path.to_owned(),
            sq: layout.sq_producer(),
            cq: layout.cq_consumer(),
            welcome,
            mem,
            submit_bell: SubmitDoorbell::from_fd(submit_fd),
            complete_bell: CompletionDoorbell::from_fd(complete_fd),
            wait_mode: opts.wait,
            latency_ewma: Duration::from_micros(10),
            stash: VecDeque::new(),
            in_flight: 0,
            next_request: 2,
            next_probe: RESERVED_USER_DATA,
            reply_buf,
            closed: None,
            staging: None,
        })
    }

    /// What the daemon said when the session started.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The socket this client connected to.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Jobs submitted and not yet reaped.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    /// The descriptor that becomes readable when completions arrive. It is armed by a
    /// [`Client::reap`] that found nothing: after such a call, poll it, then reap again.
    pub fn completion_fd(&self) -> BorrowedFd<'_> {
        self.complete_bell.as_fd()
    }

    fn check_open(&self) -> Result<()> {
        match &self.closed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Ends the session with `err`: every later call returns it.
    fn fail(&mut self, err: Error) -> Error {
        if err.status() == Status::Disconnected || err.status() == Status::Protocol {
            self.closed.get_or_insert_with(|| err.clone());
        }
        err
    }

    /// Sends a control request and waits for its reply.
    fn request(&mut self, req: &Request, fds: &[RawFd]) -> Result<Reply> {
        Ok(self.request_fds(req, fds, 0)?.0)
    }

    /// Sends a control request and waits for its reply and up to `max_fds` descriptors.
    fn request_fds(
        &mut self,
        req: &Request,
        fds: &[RawFd],
        max_fds: usize,
    ) -> Result<(Reply, Vec<OwnedFd>)> {
        self.check_open()?;
        let id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1).max(1);
        if let Err(e) = fdpass::send_packet(&self.ctrl, &req.encode(id), fds, false) {
            return Err(self.fail(e));
        }
        loop {
            let got = match fdpass::recv_packet(&self.ctrl, &mut self.reply_buf, max_fds, false) {
                Ok(got) => got,
                // SO_RCVTIMEO expired: the daemon is stuck, and a late reply would be taken
                // for the next request's, so the session is over.
                Err(e) if e.status() == Status::WouldBlock => {
                    let err = Error::new(
                        Status::Timeout,
                        format!("unicornd did not answer within {CONTROL_TIMEOUT:?}"),
                    );
                    self.closed = Some(err.clone());
                    return Err(err);
                }
                Err(e) => return Err(self.fail(e)),
            };
            let (reply_id, reply) = match Reply::decode(&self.reply_buf[..got.len]) {
                Ok(r) => r,
                Err(e) => return Err(self.fail(e)),
            };
            match reply {
                Reply::Goodbye { status, message } => {
                    let err = Error::new(
                        Status::Disconnected,
                        format!("unicornd ended the session ({status}): {message}"),
                    );
                    self.closed = Some(err.clone());
                    return Err(err);
                }
                _ if reply_id != id => continue,
                Reply::Error { status, message } => return Err(Error::new(status, message)),
                reply => {
                    if got.fds.len() != reply.fd_count() {
                        return Err(self.fail(Error::protocol(format!(
                            "reply carries {} descriptors, {} expected",
                            got.fds.len(),
                            reply.fd_count()
                        ))));
                    }
                    return Ok((reply, got.fds));
                }
            }
        }
    }

    /// A round trip over the control socket: the daemon sends `payload` back.
    pub fn echo(&mut self, payload: &[u8]) -> Result<Vec<u8>> {
        match self.request(&Request::Echo { payload: payload.to_vec() }, &[])? {
            Reply::Echo { payload } => Ok(payload),
            other => Err(Error::protocol(format!("expected an echo, got {other:?}"))),
        }
    }

    /// The daemon's state: version, uptime, sessions, devices.
    pub fn status(&mut self) -> Result<DaemonStatus> {
        match self.request(&Request::Status, &[])? {
            Reply::Status(s) => Ok(s),
            other => Err(Error::protocol(format!("expected a status, got {other:?}"))),
        }
    }

    /// Registers a memfd (sealed with `F_SEAL_SHRINK | F_SEAL_GROW`) as a buffer that jobs may
    /// use; returns its handle.
    pub fn register_buffer(&mut self, fd: &impl AsFd, size: u64) -> Result<u32> {
        let raw = fd.as_fd().as_raw_fd();
        match self.request(&Request::RegisterBuffer { size }, &[raw])? {
            Reply::BufferRegistered { handle, .. } => Ok(handle),
            other => Err(Error::protocol(format!("expected a buffer handle, got {other:?}"))),
        }
    }

    pub fn unregister_buffer(&mut self, handle: u32) -> Result<()> {
        match self.request(&Request::UnregisterBuffer { handle }, &[])? {
            Reply::Done => Ok(()),
            other => Err(Error::protocol(format!("expected done, got {other:?}"))),
        }
    }

    /// Queues as many of `jobs` as the ring has room for, without blocking, and returns how
    /// many were queued (possibly 0 when the ring is full: reap, then submit the rest).
    pub fn submit(&mut self, jobs: &[(Job, u64)]) -> Result<usize> {
        if let Some((_, u)) = jobs.iter().find(|(_, u)| *u >= RESERVED_USER_DATA) {
            return Err(Error::new(
                Status::InvalidArgument,
                format!("user_data {u:#x}: values from 2^63 on are reserved for the library"),
            ));
        }
        self.submit_any(jobs)
    }

    /// [`Client::submit`] without the reserved-user_data check, for the library's own probes.
    fn submit_any(&mut self, jobs: &[(Job, u64)]) -> Result<usize> {
        self.check_open()?;
        let free = match self.sq.free(&self.mem) {
            Ok(n) => n as usize,
            Err(e) => return Err(self.fail(e.into())),
        };
        let n = free.min(jobs.len());
        if n == 0 {
            return Ok(0);
        }
        for (job, user_data) in &jobs[..n] {
            self.sq.push(&self.mem, &job.to_sqe(*user_data).to_words());
        }
        self.sq.publish(&self.mem);
        self.in_flight += n as u64;
        if self.sq.daemon_sleeps(&self.mem) {
            self.submit_bell.ring()?;
        }
        Ok(n)
    }

    /// Moves ready completions into `out` without blocking; returns how many. When it finds
    /// none, the completion descriptor is armed (see [`Client::completion_fd`]).
    pub fn reap(&mut self, out: &mut Vec<Completion>, max: usize) -> Result<usize> {
        self.check_open()?;
        let mut n = 0;
        while n < max {
            let Some(c) = self.stash.pop_front() else {
                break;
            };
            out.push(c);
            n += 1;
        }
        n += self.reap_ring(out, max - n)?;
        if n == 0 && max > 0 {
            self.complete_bell.drain();
            self.cq.set_client_waiting(&self.mem, true);
            n += self.reap_ring(out, max)?;
        }
        if n > 0 {
            self.cq.set_client_waiting(&self.mem, false);
        }
        Ok(n)
    }

    fn reap_ring(&mut self, out: &mut Vec<Completion>, max: usize) -> Result<usize> {
        let ready = match self.cq.available(&self.mem) {
            Ok(n) => n as usize,
            Err(e) => return Err(self.fail(e.into())),
        };
        let n = ready.min(max);
        for _ in 0..n {
            out.push(Completion::from_words(&self.cq.pop(&self.mem)));
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        if n > 0 {
            self.cq.release(&self.mem);
            // If the daemon stopped taking submissions because the completion ring was full, it
            // sleeps with work left: the slots just freed need it awake.
            let queued =
                self.sq.free(&self.mem).map(|f| f < self.welcome.sq_entries).unwrap_or(false);
            if queued && self.sq.daemon_sleeps(&self.mem) {
                self.submit_bell.ring()?;
            }
        }
        Ok(n)
    }

    /// Waits until at least one completion is ready or `timeout` passes (`None`: no limit).
    /// Returns whether completions are ready. Returns at once with `false` when no job is in
    /// flight, since nothing could arrive.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<bool> {
        self.check_open()?;
        if !self.stash.is_empty() {
            return Ok(true);
        }
        if self.in_flight == 0 {
            return Ok(false);
        }
        self.wait_for_ring(timeout)
    }

    /// Waits until the completion ring itself has an entry (completions already taken off it
    /// and kept aside do not count).
    fn wait_ring_only(&mut self) -> Result<bool> {
        self.wait_for_ring(None)
    }

    fn wait_for_ring(&mut self, timeout: Option<Duration>) -> Result<bool> {
        let start = Instant::now();
        let deadline = timeout.map(|t| start + t);
        let spin = match self.wait_mode {
            WaitMode::Sleep => Duration::ZERO,
            WaitMode::Spin(d) => d,
            WaitMode::Adaptive if self.latency_ewma <= ADAPTIVE_SPIN_MAX => {
                (self.latency_ewma * 2).clamp(Duration::from_micros(5), ADAPTIVE_SPIN_MAX)
            }
            WaitMode::Adaptive => Duration::ZERO,
        };
        let ready = self.wait_ring(start, spin, deadline)?;
        if ready {
            let lat = start.elapsed();
            // An exponentially weighted average with weight 1/8 for the newest sample.
            self.latency_ewma = (self.latency_ewma * 7 + lat) / 8;
        }
        Ok(ready)
    }

    fn ring_ready(&mut self) -> Result<bool> {
        match self.cq.available(&self.mem) {
            Ok(n) => Ok(n > 0),
            Err(e) => Err(self.fail(e.into())),
        }
    }

    fn wait_ring(
        &mut self,
        start: Instant,
        spin: Duration,
        deadline: Option<Instant>,
    ) -> Result<bool> {
        // Spin first: a completion that arrives within microseconds is seen without a syscall.
        loop {
            if self.ring_ready()? {
                return Ok(true);
            }
            let now = Instant::now();
            if now.duration_since(start) >= spin || deadline.is_some_and(|d| now >= d) {
                break;
            }
            std::hint::spin_loop();
        }
        // Then sleep: arm the doorbell, re-check, and poll it together with the control socket
        // (which reports a daemon that went away).
        loop {
            self.complete_bell.drain();
            self.cq.set_client_waiting(&self.mem, true);
            if self.ring_ready()? {
                self.cq.set_client_waiting(&self.mem, false);
                return Ok(true);
            }
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        self.cq.set_client_waiting(&self.mem, false);
                        return Ok(false);
                    }
                    let ms = left.as_millis().max(1).min(i32::MAX as u128) as u32;
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [
                PollFd::new(self.complete_bell.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.ctrl.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(Error::os("poll", e)),
            }
            let ctrl_ready = fds[1].revents().is_some_and(|r| !r.is_empty());
            if ctrl_ready {
                self.cq.set_client_waiting(&self.mem, false);
                if self.ring_ready()? {
                    return Ok(true);
                }
                return Err(self.read_goodbye());
            }
        }
    }

    /// The control socket became readable outside a request: the daemon is ending the session.
    fn read_goodbye(&mut self) -> Error {
        let err = match fdpass::recv_packet(&self.ctrl, &mut self.reply_buf, 0, true) {
            Ok(got) => match Reply::decode(&self.reply_buf[..got.len]) {
                Ok((_, Reply::Goodbye { status, message })) => Error::new(
                    Status::Disconnected,
                    format!("unicornd ended the session ({status}): {message}"),
                ),
                Ok((_, other)) => Error::protocol(format!("unexpected message {other:?}")),
                Err(e) => e,
            },
            Err(e) if e.status() == Status::WouldBlock => return e,
            Err(e) => e,
        };
        let err = if err.status() == Status::Disconnected || err.status() == Status::Protocol {
            err
        } else {
            Error::new(Status::Disconnected, err.message().to_owned())
        };
        self.closed = Some(err.clone());
        err
    }

    /// Takes every ready completion off the ring and keeps it for [`Client::reap`].
    fn reap_into_stash(&mut self) -> Result<()> {
        let mut got = Vec::new();
        self.reap_ring(&mut got, usize::MAX)?;
        self.stash.extend(got);
        Ok(())
    }

    fn set_reply_timeout(&mut self, t: Duration) -> Result<()> {
        let tv = TimeVal::new(t.as_secs() as i64, 0);
        setsockopt(&self.ctrl, sockopt::ReceiveTimeout, &tv)
            .map_err(|e| Error::os("SO_RCVTIMEO", e))
    }

    /// Sends one `NOP` through the rings and waits for it; returns the round-trip time.
    /// Completions of the caller's own jobs that arrive meanwhile are kept for [`Client::reap`].
    pub fn ping(&mut self) -> Result<Duration> {
        let start = Instant::now();
        let c = self.run_sync(Job::Nop { delay: Duration::ZERO })?;
        let rtt = start.elapsed();
        if c.status != Status::Ok {
            return Err(Error::new(c.status, "the ping NOP failed"));
        }
        Ok(rtt)
    }
}

fn connect_socket(path: &Path) -> Result<OwnedFd> {
    let fd = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| Error::os("socket", e))?;
    let addr = UnixAddr::new(path)
        .map_err(|e| Error::new(Status::InvalidArgument, format!("socket path: {e}")))?;
    loop {
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(Errno::EINTR) => continue,
            Err(e @ (Errno::ENOENT | Errno::ECONNREFUSED)) => {
                return Err(Error::new(Status::NoDaemon, format!("{e}")))
            }
            Err(e @ Errno::EACCES) => {
                return Err(Error::new(
                    Status::PermissionDenied,
                    format!("{e} (is this user in group `unicorn`?)"),
                ))
            }
            Err(e) => return Err(Error::os("connect", e)),
        }
    }
    let tv = TimeVal::new(CONTROL_TIMEOUT.as_secs() as i64, 0);
    setsockopt(&fd, sockopt::ReceiveTimeout, &tv).map_err(|e| Error::os("SO_RCVTIMEO", e))?;
    setsockopt(&fd, sockopt::SendTimeout, &tv).map_err(|e| Error::os("SO_SNDTIMEO", e))?;
    Ok(fd)
}
