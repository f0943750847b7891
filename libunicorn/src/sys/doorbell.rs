//! Doorbells: the descriptors a sleeping side waits on and the other side rings.
//!
//! - Submission doorbell (client rings, daemon sleeps): an eventfd. The daemon drains it with
//!   `preadv2(RWF_NOWAIT)`, which never blocks whatever the client did to the shared open file
//!   description (a client can clear `O_NONBLOCK` on it, and could then make a plain `read`
//!   block).
//! - Completion doorbell (daemon rings, client sleeps): a connected `AF_UNIX` datagram socket
//!   pair. The daemon rings with `send(MSG_DONTWAIT)`, which cannot block either. An eventfd
//!   cannot serve here: writes have no per-call non-blocking flag (`pwritev2(RWF_NOWAIT)` answers
//!   `EOPNOTSUPP`), and a client that fills the counter and clears `O_NONBLOCK` would hang the
//!   daemon's next write. For the client both are simply pollable descriptors.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{
    recv, send, shutdown, socketpair, AddressFamily, MsgFlags, Shutdown, SockFlag, SockType,
};

use crate::error::Error;

/// The submission doorbell, an eventfd.
#[derive(Debug)]
pub struct SubmitDoorbell {
    fd: OwnedFd,
}

impl SubmitDoorbell {
    pub fn new() -> Result<SubmitDoorbell, Error> {
        let fd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| Error::os("eventfd", e))?;
        Ok(SubmitDoorbell { fd: fd.into() })
    }

    pub fn from_fd(fd: OwnedFd) -> SubmitDoorbell {
        SubmitDoorbell { fd }
    }

    /// Rings (client side). A full counter already means "rung", so `EAGAIN` is fine.
    pub fn ring(&self) -> Result<(), Error> {
        loop {
            match nix::unistd::write(&self.fd, &1u64.to_ne_bytes()) {
                Ok(_) | Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(Error::os("ringing the submission doorbell", e)),
            }
        }
    }

    /// Resets the doorbell without ever blocking (daemon side).
    pub fn drain(&self) -> Result<(), Error> {
        let mut value = [0u8; 8];
        let iov = libc::iovec { iov_base: value.as_mut_ptr().cast(), iov_len: value.len() };
        loop {
            // SAFETY: `iov` describes the live 8-byte buffer `value`, which outlives the call;
            // the kernel writes at most 8 bytes into it.
            let rc = unsafe { libc::preadv2(self.fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
            if rc >= 0 {
                return Ok(());
            }
            match Errno::last() {
                Errno::EAGAIN => return Ok(()),
                Errno::EINTR => continue,
                e => return Err(Error::os("draining the submission doorbell", e)),
            }
        }
    }
}

impl AsFd for SubmitDoorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One end of the completion doorbell.
#[derive(Debug)]
pub struct CompletionDoorbell {
    fd: OwnedFd,
}

impl CompletionDoorbell {
    /// A connected pair: (the daemon's end, which only sends; the client's end, which only
    /// receives).
    pub fn pair() -> Result<(CompletionDoorbell, CompletionDoorbell), Error> {
        let (daemon, client) = socketpair(
            AddressFamily::Unix,
            SockType::Datagram,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(|e| Error::os("socketpair", e))?;
        // Nothing the client sends can pile up at the daemon's end, and the client's end
        // cannot send at all.
        shutdown(daemon.as_raw_fd(), Shutdown::Read).map_err(|e| Error::os("shutdown", e))?;
        shutdown(client.as_raw_fd(), Shutdown::Write).map_err(|e| Error::os("shutdown", e))?;
        Ok((CompletionDoorbell { fd: daemon }, CompletionDoorbell { fd: client }))
    }

    pub fn from_fd(fd: OwnedFd) -> CompletionDoorbell {
        CompletionDoorbell { fd }
    }

    /// Rings (daemon side). Never blocks: a full queue already means "rung", and a client that
    /// closed its end is noticed on the control socket, not here.
    pub fn ring(&self) {
        let _ = send(self.fd.as_raw_fd(), &[1], MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL);
    }

    /// Resets the doorbell (client side).
    pub fn drain(&self) {
        let mut buf = [0u8; 16];
        loop {
            match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => return,
            }
        }
    }

    /// Waits until the doorbell rings or `timeout` passes (`None`: forever). Returns whether it
    /// rang.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool, Error> {
        wait_readable(self.fd.as_fd(), timeout)
    }
}

impl From<CompletionDoorbell> for OwnedFd {
    fn from(bell: CompletionDoorbell) -> OwnedFd {
        bell.fd
    }
}

impl AsFd for CompletionDoorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Waits until `fd` is readable or `timeout` passes. Returns whether it became readable.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> Result<bool, Error> {
    let timeout = match timeout {
        None => PollTimeout::NONE,
        Some(t) => {
            let ms = t.as_millis().min(i32::MAX as u128 - 1) as u32;
            // Round up, so a short timeout does not become a busy poll.
            let ms = if Duration::from_millis(u64::from(ms)) < t { ms + 1 } else { ms };
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        }
    };
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, timeout) {
            Ok(n) => return Ok(n > 0),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::os("poll", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submit_doorbell_never_blocks_the_drainer() {
        let bell = SubmitDoorbell::new().unwrap();
        bell.drain().unwrap();
        bell.ring().unwrap();
        assert!(wait_readable(bell.as_fd(), Some(Duration::ZERO)).unwrap());
        bell.drain().unwrap();
        assert!(!wait_readable(bell.as_fd(), Some(Duration::ZERO)).unwrap());
        // A hostile client clears O_NONBLOCK on the shared file description: draining an empty
        // doorbell must still return at once.
        nix::fcntl::fcntl(&bell.fd, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()))
            .unwrap();
        bell.drain().unwrap();
    }

    #[test]
    fn completion_doorbell_rings_without_blocking() {
        let (daemon, client) = CompletionDoorbell::pair().unwrap();
        assert!(!client.wait(Some(Duration::ZERO)).unwrap());
        daemon.ring();
        assert!(client.wait(Some(Duration::from_secs(1))).unwrap());
        client.drain();
        assert!(!client.wait(Some(Duration::ZERO)).unwrap());
        // Ringing far more often than the client drains never blocks.
        for _ in 0..100_000 {
            daemon.ring();
        }
        client.drain();
        // The client's end cannot send to the daemon.
        assert!(send(client.fd.as_raw_fd(), &[1], MsgFlags::MSG_DONTWAIT).is_err());
    }
}
