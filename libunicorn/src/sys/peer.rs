//! Who is on the other end of a Unix socket (`SO_PEERCRED`, `SO_PEERGROUPS`).

use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{getsockopt, sockopt};

use crate::error::Error;

/// Credentials of a connected peer, as the kernel recorded them at `connect` time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCredentials {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (empty when the kernel cannot tell).
    pub groups: Vec<u32>,
}

impl PeerCredentials {
    /// True when the peer's primary or a supplementary group is `gid`.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// Reads the peer's credentials from a connected Unix socket.
pub fn peer_credentials(sock: &impl AsFd) -> Result<PeerCredentials, Error> {
    let cred = getsockopt(&sock.as_fd(), sockopt::PeerCredentials)
        .map_err(|e| Error::os("SO_PEERCRED", e))?;
    Ok(PeerCredentials {
        pid: u32::try_from(cred.pid()).unwrap_or(0),
        uid: cred.uid(),
        gid: cred.gid(),
        groups: peer_groups(sock).unwrap_or_default(),
    })
}

fn peer_groups(sock: &impl AsFd) -> Result<Vec<u32>, Error> {
    // NGROUPS_MAX on Linux is 65536; ask with a small buffer first, then the size the kernel
    // reports.
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..2 {
        let mut len = libc::socklen_t::try_from(groups.len() * size_of::<libc::gid_t>())
            .map_err(|_| Error::os("SO_PEERGROUPS", "buffer too large"))?;
        // SAFETY: `groups` is a live, writable buffer of exactly `len` bytes, and the kernel
        // writes at most `len` bytes into it and the actual length into `len`.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && n > groups.len() && n <= 65536 {
            groups.resize(n, 0);
            continue;
        }
        return Err(Error::os("SO_PEERGROUPS", err));
    }
    Err(Error::os("SO_PEERGROUPS", "group list keeps growing"))
}
