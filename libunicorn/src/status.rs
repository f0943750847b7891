//! Status codes: the one list of outcomes shared by the wire protocol (completions, error replies)
//! and the C ABI (`unicorn_status`). Numbers are ABI: never renumber, only append.

use std::ffi::CStr;
use std::fmt;

/// The outcome of a call or a job. `UNICORN_OK` (0) is success; everything else is an error.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// An argument or a job field is out of range or inconsistent.
    InvalidArgument = 1,
    /// No daemon answered at the socket (or none could be started).
    NoDaemon = 2,
    /// The daemon's policy refused this client or this request.
    PermissionDenied = 3,
    /// Client and daemon speak incompatible ABI versions.
    AbiMismatch = 4,
    /// A message or ring entry violated the protocol.
    Protocol = 5,
    /// A per-session limit or quota would be exceeded.
    LimitExceeded = 6,
    /// Nothing can be done without blocking (ring full, no completion ready).
    WouldBlock = 7,
    /// A handle names nothing that exists.
    NotFound = 8,
    /// An operating-system call failed.
    Io = 9,
    /// The session is closed (the daemon went away or disconnected this client).
    Disconnected = 10,
    /// The operation or job kind is not supported by this daemon or device.
    Unsupported = 11,
    /// A bug in unicorn (for example a caught panic); the message says more.
    Internal = 12,
    /// The job was cancelled.
    Cancelled = 13,
    /// A wait ran out of time.
    Timeout = 14,
    /// A caller-provided buffer is too small for the result.
    BufferTooSmall = 15,
}

impl Status {
    /// Every status, in numeric order.
    /// cbindgen:ignore
    pub const ALL: [Status; 16] = [
        Status::Ok,
        Status::InvalidArgument,
        Status::NoDaemon,
        Status::PermissionDenied,
        Status::AbiMismatch,
        Status::Protocol,
        Status::LimitExceeded,
        Status::WouldBlock,
        Status::NotFound,
        Status::Io,
        Status::Disconnected,
        Status::Unsupported,
        Status::Internal,
        Status::Cancelled,
        Status::Timeout,
        Status::BufferTooSmall,
    ];

    /// The status with wire number `n`, or `None` for a number this version does not know.
    pub fn from_u32(n: u32) -> Option<Status> {
        Status::ALL.get(usize::try_from(n).ok()?).copied()
    }

    /// The wire number.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// A short, static description (what `unicorn_status_str` returns).
    pub fn description(self) -> &'static str {
        self.c_description().to_str().expect("descriptions are ASCII")
    }

    /// The description as a NUL-terminated string, for C.
    pub const fn c_description(self) -> &'static CStr {
        match self {
            Status::Ok => c"ok",
            Status::InvalidArgument => c"invalid argument",
            Status::NoDaemon => c"no daemon",
            Status::PermissionDenied => c"permission denied",
            Status::AbiMismatch => c"ABI version mismatch",
            Status::Protocol => c"protocol error",
            Status::LimitExceeded => c"limit exceeded",
            Status::WouldBlock => c"would block",
            Status::NotFound => c"not found",
            Status::Io => c"I/O error",
            Status::Disconnected => c"disconnected",
            Status::Unsupported => c"unsupported",
            Status::Internal => c"internal error",
            Status::Cancelled => c"cancelled",
            Status::Timeout => c"timed out",
            Status::BufferTooSmall => c"buffer too small",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_dense_and_round_trip() {
        for (i, s) in Status::ALL.iter().enumerate() {
            assert_eq!(s.as_u32() as usize, i);
            assert_eq!(Status::from_u32(s.as_u32()), Some(*s));
        }
        assert_eq!(Status::from_u32(Status::ALL.len() as u32), None);
        assert_eq!(Status::from_u32(u32::MAX), None);
    }
}
