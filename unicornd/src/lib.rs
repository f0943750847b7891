//! unicornd: the daemon that owns the accelerators and serves every client.
//!
//! - [`server`]: sockets, sessions, the handshake, the event loop that polls the rings;
//! - [`policy`]: the policy file (who may connect, per-session limits);
//! - [`devices`]: what compute devices the machine has;
//! - [`models`]: loading models from client descriptors, shared across sessions;
//! - [`scheduler`]: the engine thread that runs model work, and contexts;
//! - the engine (GGUF, tokenizers, models) is the `unicorn-engine` crate beside this one.
//!
//! The wire protocol is libunicorn's (`unicorn::protocol`), the one definition both sides
//! compile.

pub mod devices;
pub mod models;
pub mod policy;
pub mod scheduler;
pub mod server;

use std::path::PathBuf;

use clap::Parser;

/// unicornd: serves LLM inference on this machine's CPU, GPU and NPU to local programs
/// through shared-memory rings.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Args {
    /// Run as a user daemon: socket in $XDG_RUNTIME_DIR/unicorn, only this user may connect.
    #[arg(long, conflicts_with = "system")]
    pub user: bool,
    /// Run as the system daemon on /run/unicorn/unicornd.sock (the default).
    #[arg(long)]
    pub system: bool,
    /// Listen on this socket instead of the mode's default.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Policy file [default: /etc/unicorn/unicornd.toml in system mode, none in user mode].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Group that owns the system socket [default: unicorn, if it exists].
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Threads of the CPU compute pool [default: the physical cores].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// Print the default policy file and exit.
    #[arg(long)]
    pub print_default_config: bool,
}

/// The default policy file, with every key and its default value.
pub const DEFAULT_POLICY: &str = include_str!("../unicornd.toml");

/// Runs the daemon with `args`; returns the process exit code.
pub fn run(args: Args) -> i32 {
    if args.print_default_config {
        print!("{DEFAULT_POLICY}");
        return 0;
    }
    match start(args) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{e}");
            eprintln!("unicornd: {e}");
            1
        }
    }
}

fn start(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let system_mode = !args.user;
    let uid = nix::unistd::getuid().as_raw();
    let socket = match (&args.socket, system_mode) {
        (Some(p), _) => p.clone(),
        (None, true) => PathBuf::from(unicorn::SYSTEM_SOCKET),
        (None, false) => unicorn::user_socket_path(),
    };
    let policy = match (&args.config, system_mode) {
        (Some(path), _) => policy::Policy::load(path, true)?,
        (None, true) => {
            policy::Policy::load(std::path::Path::new(policy::DEFAULT_POLICY_PATH), false)?
        }
        (None, false) => policy::Policy::default(),
    };
    // A user daemon serves its own user only, whatever the policy file says about access.
    let policy = if system_mode { policy } else { policy.only_user(uid) };
    let socket_group = if system_mode {
        let name = args.socket_group.as_deref().unwrap_or("unicorn");
        match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Some(g.gid.as_raw()),
            _ if args.socket_group.is_some() => {
                return Err(format!("unknown group {name:?}").into())
            }
            _ => {
                log::warn!(
                    "group {name:?} does not exist; the socket stays owned by this user's group"
                );
                None
            }
        }
    } else {
        None
    };
    let threads = args.threads.map(|t| t as usize).unwrap_or_else(unicorn_kernels::default_threads);
    let config = server::Config { socket, system_mode, policy, socket_group, threads };
    let mut server = server::Server::new(config)?;
    server.run()?;
    Ok(())
}
