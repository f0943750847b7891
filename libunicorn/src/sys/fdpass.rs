//! Messages with descriptors over `SOCK_SEQPACKET` (`sendmsg`/`recvmsg` with `SCM_RIGHTS`).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::error::Error;
use crate::status::Status;

/// Most descriptors one message may carry; more is a protocol error.
pub const MAX_FDS: usize = crate::protocol::messages::MAX_FDS;

/// A received packet: its length in the caller's buffer, and the descriptors that came with it.
#[derive(Debug)]
pub struct Received {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
}

/// Sends one packet with `fds` attached. With `nonblocking`, a full socket buffer gives
/// [`Status::WouldBlock`] instead of waiting: the daemon never blocks on a client that does not
/// read its replies. `SIGPIPE` is never raised.
pub fn send_packet(
    sock: &impl AsFd,
    bytes: &[u8],
    fds: &[RawFd],
    nonblocking: bool,
) -> Result<(), Error> {
    let iov = [IoSlice::new(bytes)];
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
    let mut flags = MsgFlags::MSG_NOSIGNAL;
    if nonblocking {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    loop {
        match sendmsg::<()>(sock.as_fd().as_raw_fd(), &iov, cmsgs, flags, None) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(n) => {
                return Err(Error::os("sendmsg", format!("sent {n} of {} bytes", bytes.len())))
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                return Err(Error::new(Status::WouldBlock, "peer's socket buffer is full"))
            }
            Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN) => {
                return Err(Error::new(Status::Disconnected, "the peer closed the connection"))
            }
            Err(e) => return Err(Error::os("sendmsg", e)),
        }
    }
}

/// Receives one packet into `buf`, accepting at most `max_fds` descriptors. A packet longer than
/// `buf`, or with more descriptors than allowed, is a protocol error (the excess is discarded by
/// the kernel and the received descriptors are closed). End of stream is
/// [`Status::Disconnected`]; with `nonblocking`, no packet is [`Status::WouldBlock`].
pub fn recv_packet(
    sock: &impl AsFd,
    buf: &mut [u8],
    max_fds: usize,
    nonblocking: bool,
) -> Result<Received, Error> {
    let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
    if nonblocking {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    let raw = sock.as_fd().as_raw_fd();
    let (len, msg_flags, raw_fds) = loop {
        let mut iov = [IoSliceMut::new(buf)];
        match recvmsg::<()>(raw, &mut iov, Some(&mut cmsg_space), flags) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for cmsg in msg.cmsgs().map_err(|e| Error::os("recvmsg control data", e))? {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        fds.extend(received);
                    }
                }
                break (msg.bytes, msg.flags, fds);
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Err(Error::new(Status::WouldBlock, "no packet ready")),
            Err(Errno::ECONNRESET | Errno::ENOTCONN) => {
                return Err(Error::new(Status::Disconnected, "the peer closed the connection"))
            }
            Err(e) => return Err(Error::os("recvmsg", e)),
        }
    };
    let fds: Vec<OwnedFd> = raw_fds
        .into_iter()
        // SAFETY: with SCM_RIGHTS the kernel installed each of these descriptors in this
        // process just now; nothing else owns them, so each is wrapped exactly once.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if msg_flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(Error::protocol(format!("packet longer than {} bytes", buf.len())));
    }
    if msg_flags.contains(MsgFlags::MSG_CTRUNC) || fds.len() > max_fds {
        return Err(Error::protocol(format!("packet carries more than {max_fds} descriptors")));
    }
    if len == 0 {
        return Err(Error::new(Status::Disconnected, "the peer closed the connection"));
    }
    Ok(Received { len, fds })
}
