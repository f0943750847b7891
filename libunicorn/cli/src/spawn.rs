//! Connecting, and starting a user daemon when none answers, so that a first run needs no root
//! and no setup.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use unicorn::{Client, ClientOptions, Status};

/// How long a freshly started daemon has to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects with `opts`; when no daemon answers and `spawn` is set, starts `unicornd --user`
/// (on `opts.socket` if one was named) and connects to it.
pub fn connect(opts: &ClientOptions, spawn: bool) -> Result<Client> {
    connect_with_threads(opts, spawn, None)
}

/// [`connect`], starting the daemon with `threads` compute threads if it starts one.
pub fn connect_with_threads(
    opts: &ClientOptions,
    spawn: bool,
    threads: Option<u32>,
) -> Result<Client> {
    match Client::connect(opts) {
        Ok(c) => return Ok(c),
        Err(e) if e.status() == Status::NoDaemon && spawn => {
            log::debug!("no daemon: {e}; starting one");
        }
        Err(e) if e.status() == Status::NoDaemon => {
            return Err(anyhow!("{e}")).context("no daemon is running (and --no-spawn was given)")
        }
        Err(e) => return Err(anyhow!("{e}")),
    }
    // The daemon goes where this command looked first: the named socket, else the user one.
    let socket = opts
        .socket
        .clone()
        .or_else(|| std::env::var_os(unicorn::SOCKET_ENV).map(PathBuf::from))
        .unwrap_or_else(unicorn::user_socket_path);
    start_user_daemon(&socket, threads)?;
    let deadline = Instant::now() + START_TIMEOUT;
    let opts = ClientOptions { socket: Some(socket.clone()), ..opts.clone() };
    loop {
        match Client::connect(&opts) {
            Ok(c) => return Ok(c),
            Err(e) if e.status() == Status::NoDaemon && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(anyhow!("{e}")).with_context(|| {
                    format!(
                        "started unicornd --user, but it did not answer on {} (see {})",
                        socket.display(),
                        log_path().display()
                    )
                })
            }
        }
    }
}

/// The daemon binary: beside this executable when it is there (a build tree or an install
/// prefix), else `unicornd` from `PATH`.
pub fn daemon_binary() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        let beside = exe.with_file_name("unicornd");
        if beside.is_file() {
            return beside;
        }
    }
    PathBuf::from("unicornd")
}

fn log_path() -> PathBuf {
    unicorn::user_runtime_dir().join("unicornd.log")
}

fn start_user_daemon(socket: &Path, threads: Option<u32>) -> Result<()> {
    let bin = daemon_binary();
    let log = log_path();
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    eprintln!(
        "unicorn: no daemon answered; starting {} --user (log: {})",
        bin.display(),
        log.display()
    );
    let mut cmd = Command::new(&bin);
    cmd.arg("--user")
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .process_group(0);
    if let Some(t) = threads {
        cmd.arg("--threads").arg(t.to_string());
    }
    // The daemon outlives this command: a session of its own keeps it out of our terminal's
    // job control and signals. It is reaped by init when it exits.
    cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
    Ok(())
}
