//! Support for the cross-process tests: start a real `unicornd` in a private directory, find
//! the built binaries, and speak the raw protocol the way a hostile client would.
//!
//! The binaries come from the same target directory as the test executable. `cargo test
//! --workspace` (what `make test` runs) builds them; a test fails with a clear message when one
//! is missing.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use unicorn::protocol::ring::{Consumer, CqeWords, Producer, SqeWords};
use unicorn::protocol::{Hello, Priority, Reply, Request, RingLayout, ABI_MAJOR, ABI_MINOR};
use unicorn::sys::{fdpass, SharedMemory};
use unicorn::{Client, ClientOptions, WaitMode};

/// The directory holding the workspace's built binaries (`target/debug` or `target/release`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_owned()
}

/// A built binary of the workspace.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace first (`cargo build --workspace` or `make test`)",
        p.display()
    );
    p
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repo").to_owned()
}

/// The default model (SmolLM2-135M-Instruct Q4_1), fetched by `scripts/fetch-model`.
pub fn default_model() -> PathBuf {
    let dir = std::env::var_os("UNICORN_MODEL_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache")
        });
        cache.join("unicorn/models")
    });
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run scripts/fetch-model first", p.display());
    p
}

/// A fresh private directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "unicorn-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `unicornd --user` on a private socket. Dropping it stops it.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    pub dir: TempDir,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts a daemon with the default policy.
    pub fn start() -> Daemon {
        Daemon::start_with_policy(None)
    }

    /// Starts a daemon with `policy` (TOML text) as its policy file.
    pub fn start_with_policy(policy: Option<&str>) -> Daemon {
        let dir = TempDir::new("daemon");
        let socket = dir.path().join("unicornd.sock");
        let log = dir.path().join("unicornd.log");
        let mut cmd = Command::new(bin("unicornd"));
        cmd.arg("--user").arg("--socket").arg(&socket);
        if let Some(text) = policy {
            let path = dir.path().join("policy.toml");
            std::fs::write(&path, text).expect("write policy");
            cmd.arg("--config").arg(path);
        }
        let log_file = std::fs::File::create(&log).expect("log file");
        cmd.env("RUST_LOG", "debug").stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file);
        let child = cmd.spawn().expect("spawn unicornd");
        let mut d = Daemon { child: Some(child), dir, socket, log };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("unicornd exited early with {status}:\n{}", self.log());
            }
            if Client::connect(&self.options()).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("unicornd did not answer within 20 s:\n{}", self.log());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Client options for this daemon.
    pub fn options(&self) -> ClientOptions {
        ClientOptions {
            socket: Some(self.socket.clone()),
            name: "test".into(),
            priority: Priority::Normal,
            sq_entries: 0,
            wait: WaitMode::Adaptive,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.options()).expect("connect to the test daemon")
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the daemon process is still alive.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Sends `sig` and waits for the daemon to exit.
    pub fn stop_with(&mut self, sig: Signal) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        kill(Pid::from_raw(child.id() as i32), sig).expect("kill");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "unicornd did not exit after {sig}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asserts that the daemon still serves a well-behaved client correctly.
    pub fn assert_healthy(&mut self) {
        assert!(self.alive(), "unicornd died:\n{}", self.log());
        let mut c = self.client();
        for _ in 0..10 {
            c.ping().expect("ping after the hostile client");
        }
        let st = c.status().expect("status");
        assert!(st.sessions.iter().any(|s| s.id == c.welcome().session_id));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// A client that speaks the protocol by hand, to misbehave in ways the real client never does.
#[derive(Debug)]
pub struct RawClient {
    pub ctrl: OwnedFd,
    buf: Vec<u8>,
}

/// The rings of a raw session, mapped by the test.
#[derive(Debug)]
pub struct RawRing {
    pub layout: RingLayout,
    pub mem: SharedMemory,
    pub sq: Producer<SqeWords>,
    pub cq: Consumer<CqeWords>,
    pub fds: Vec<OwnedFd>,
}

impl RawClient {
    pub fn connect(path: &Path) -> RawClient {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let fd = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
            .expect("socket");
        connect(fd.as_raw_fd(), &UnixAddr::new(path).expect("addr")).expect("connect");
        let tv = nix::sys::time::TimeVal::new(10, 0);
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .expect("timeout");
        RawClient { ctrl: fd, buf: vec![0; unicorn::protocol::messages::MAX_REPLY_BYTES] }
    }

    pub fn send_bytes(&self, bytes: &[u8], fds: &[RawFd]) -> unicorn::Result<()> {
        fdpass::send_packet(&self.ctrl, bytes, fds, false)
    }

    pub fn send(&self, req: &Request, id: u32, fds: &[RawFd]) -> unicorn::Result<()> {
        self.send_bytes(&req.encode(id), fds)
    }

    /// The next packet: a reply (with its descriptors), or the error that ended the stream.
    pub fn recv(&mut self) -> unicorn::Result<(Reply, Vec<OwnedFd>)> {
        let got = fdpass::recv_packet(&self.ctrl, &mut self.buf, 3, false)?;
        let (_, reply) = Reply::decode(&self.buf[..got.len])?;
        Ok((reply, got.fds))
    }

    /// Reads until the daemon closes the connection; returns the replies seen.
    pub fn drain_until_closed(&mut self) -> Vec<Reply> {
        let mut seen = Vec::new();
        loop {
            match self.recv() {
                Ok((r, _)) => seen.push(r),
                Err(e) if e.status() == unicorn::Status::Disconnected => return seen,
                Err(e) => {
                    panic!("expected the daemon to close the connection, got {e:?} after {seen:?}")
                }
            }
        }
    }

    pub fn hello(&self) -> Hello {
        Hello {
            abi_major: ABI_MAJOR,
            abi_minor: ABI_MINOR,
            priority: Priority::Normal,
            sq_entries: 8,
            daemon_spin_us: 0,
            client_name: "raw".into(),
        }
    }

    /// Completes the handshake and maps the rings.
    pub fn handshake(&mut self) -> RawRing {
        self.send(&Request::Hello(self.hello()), 1, &[]).expect("send hello");
        let (reply, fds) = self.recv().expect("welcome");
        let Reply::Welcome(w) = reply else { panic!("expected a welcome, got {reply:?}") };
        assert_eq!(fds.len(), 3);
        let layout = RingLayout::new(w.sq_entries).expect("layout");
        let mem = SharedMemory::map(&fds[0], layout.size()).expect("map ring");
        layout.check_header(&mem).expect("header");
        RawRing { sq: layout.sq_producer(), cq: layout.cq_consumer(), layout, mem, fds }
    }
}

impl RawRing {
    /// Rings the submission doorbell (the test sessions ask the daemon not to spin).
    pub fn kick(&self) {
        nix::unistd::write(self.fds[1].as_fd(), &1u64.to_ne_bytes()).expect("ring doorbell");
    }

    /// Waits up to `timeout` for `n` completions.
    pub fn collect(&mut self, n: usize, timeout: Duration) -> Vec<unicorn::Completion> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let avail = self.cq.available(&self.mem).expect("daemon-written cq tail");
            for _ in 0..avail {
                out.push(unicorn::Completion::from_words(&self.cq.pop(&self.mem)));
            }
            self.cq.release(&self.mem);
            if avail == 0 {
                assert!(Instant::now() < deadline, "only {} of {n} completions arrived", out.len());
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        out
    }
}

/// Runs a command to completion and returns (status, stdout, stderr).
pub fn run(cmd: &mut Command) -> (ExitStatus, String, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.take().expect("stdout").read_to_string(&mut out).expect("read stdout");
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("read stderr");
    (child.wait().expect("wait"), out, err)
}

/// Polls `f` every 10 ms until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
