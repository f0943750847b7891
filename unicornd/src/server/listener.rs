//! The listening socket: created and bound by the daemon, or inherited from systemd.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, connect, getsockopt, listen, socket, sockopt, AddressFamily, Backlog, SockFlag,
    SockType, UnixAddr,
};
use nix::sys::stat::{umask, Mode};

use super::ServerError;

/// A bound, listening `SOCK_SEQPACKET` socket.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
    /// Whether this process created the socket file and removes it on exit.
    owns_file: bool,
}

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

impl Listener {
    /// Binds `path`, removing a stale socket file left by a daemon that died, but refusing when
    /// a live daemon answers there. `mode` is the socket file's mode (0600 for a user daemon,
    /// 0660 for the system daemon); `group` the group that owns it, if any; `dir_mode` the mode
    /// of its directory when this call creates it.
    pub fn bind(
        path: &Path,
        mode: u32,
        group: Option<u32>,
        dir_mode: u32,
    ) -> Result<Listener, ServerError> {
        let err = |what: &str, e: &dyn std::fmt::Display| ServerError::Socket {
            path: path.display().to_string(),
            message: format!("{what}: {e}"),
        };
        if let Some(dir) = path.parent() {
            prepare_dir(dir, dir_mode).map_err(|e| err("socket directory", &e))?;
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(err("exists and is not a socket", &"refusing to replace it"));
            }
            if daemon_answers(path) {
                return Err(ServerError::AlreadyRunning(path.display().to_string()));
            }
            log::info!("removing stale socket {}", path.display());
            std::fs::remove_file(path).map_err(|e| err("removing stale socket", &e))?;
        }
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| err("socket", &e))?;
        let addr = UnixAddr::new(path).map_err(|e| err("socket path", &e))?;
        // The socket file is created with the umask applied; set it so that the file is never,
        // even briefly, more open than `mode`.
        let old = umask(Mode::from_bits_truncate(0o777 & !mode));
        let bound = bind(fd.as_raw_fd(), &addr);
        umask(old);
        bound.map_err(|e| err("bind", &e))?;
        let listener = Listener { fd, path: path.to_owned(), owns_file: true };
        if let Some(gid) = group {
            nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
                .map_err(|e| err("chown", &e))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| err("chmod", &e))?;
        listen(&listener.fd, Backlog::new(128).expect("128 is a valid backlog"))
            .map_err(|e| err("listen", &e))?;
        Ok(listener)
    }

    /// The socket systemd passed with socket activation (`LISTEN_PID`/`LISTEN_FDS`), if any.
    pub fn from_systemd(path: &Path) -> Result<Option<Listener>, ServerError> {
        let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok())
            == Some(std::process::id());
        let count =
            std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
        if !ours || count == 0 {
            return Ok(None);
        }
        // SAFETY: systemd's protocol hands this process descriptor 3 (checked through
        // LISTEN_PID above) and nothing else in the process owns it; it is wrapped once.
        let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
        let bad = |m: String| ServerError::Socket { path: "systemd socket".into(), message: m };
        let ty = getsockopt(&fd, sockopt::SockType).map_err(|e| bad(format!("SO_TYPE: {e}")))?;
        let listening =
            getsockopt(&fd, sockopt::AcceptConn).map_err(|e| bad(format!("SO_ACCEPTCONN: {e}")))?;
        if ty != SockType::SeqPacket || !listening {
            return Err(bad("descriptor 3 is not a listening SOCK_SEQPACKET socket".into()));
        }
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| bad(format!("F_GETFL: {e}")))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| bad(format!("F_SETFL: {e}")))?;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
            .map_err(|e| bad(format!("F_SETFD: {e}")))?;
        // SAFETY: no other thread runs yet (this is daemon start-up), so nothing reads the
        // environment concurrently.
        unsafe {
            std::env::remove_var("LISTEN_PID");
            std::env::remove_var("LISTEN_FDS");
            std::env::remove_var("LISTEN_FDNAMES");
        }
        Ok(Some(Listener { fd, path: path.to_owned(), owns_file: false }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts one pending connection, if any.
    pub fn accept(&self) -> Result<Option<OwnedFd>, Errno> {
        loop {
            match accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK) {
                // SAFETY: accept4 just created this descriptor; nothing else owns it.
                Ok(fd) => return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) })),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN | Errno::ECONNABORTED) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if self.owns_file {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("could not remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Creates the socket's directory if needed. A directory this process creates is private to
/// its owner; an existing one must not be writable by others unless sticky (like /tmp), so
/// nobody else can swap the socket file.
fn prepare_dir(dir: &Path, dir_mode: u32) -> std::io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))?;
            Ok(())
        }
        Err(e) => Err(e),
        Ok(meta) => {
            let me = nix::unistd::geteuid().as_raw();
            let mode = meta.mode();
            if !meta.is_dir() {
                return Err(std::io::Error::other("not a directory"));
            }
            if meta.uid() != me && meta.uid() != 0 {
                return Err(std::io::Error::other(format!(
                    "owned by uid {}, not by this user or root",
                    meta.uid()
                )));
            }
            if mode & 0o022 != 0 && mode & 0o1000 == 0 {
                return Err(std::io::Error::other(format!(
                    "writable by others (mode {:o})",
                    mode & 0o7777
                )));
            }
            Ok(())
        }
    }
}

/// Whether a daemon accepts connections at `path` right now.
fn daemon_answers(path: &Path) -> bool {
    let Ok(fd) = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
    else {
        return false;
    };
    let Ok(addr) = UnixAddr::new(path) else {
        return false;
    };
    connect(fd.as_raw_fd(), &addr).is_ok()
}
