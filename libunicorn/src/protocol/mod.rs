//! The wire protocol between libunicorn and unicornd: the one definition both sides compile.
//!
//! Two channels per session (design.md section 4):
//! - control: a `SOCK_SEQPACKET` connection carrying the [`messages`] of the slow path;
//! - data: a shared memfd holding the submission and completion [`ring`]s, whose entries are
//!   [`job`]s and completions.
//!
//! A session starts with [`Request::Hello`]; the daemon answers [`Reply::Welcome`] with the
//! ring memfd and two doorbells, or [`Reply::Error`] and closes the connection.

pub mod codec;
pub mod job;
pub mod messages;
pub mod ring;
pub mod vocab;

pub use job::{Completion, Decode, Job, LogitsOut, Opcode, Sqe, TokenInput};
pub use messages::{
    DaemonStatus, Device, DeviceKind, Hello, Limits, ModelInfo, ModelStatus, NpuStatus, Priority,
    Reply, Request, SamplerParams, SessionInfo, Welcome,
};
pub use ring::RingLayout;

/// ABI major version: a client and a daemon with different majors cannot talk.
pub const ABI_MAJOR: u16 = 1;
/// ABI minor version: a daemon serves clients of its own or an older minor.
pub const ABI_MINOR: u16 = 0;

/// Checks a client's ABI version against this side's, saying why it is refused.
pub fn check_abi(client_major: u16, client_minor: u16) -> Result<(), String> {
    if client_major != ABI_MAJOR {
        return Err(format!(
            "client speaks ABI {client_major}.{client_minor}, this daemon speaks {ABI_MAJOR}.{ABI_MINOR}: \
             the major versions differ"
        ));
    }
    if client_minor > ABI_MINOR {
        return Err(format!(
            "client speaks ABI {client_major}.{client_minor}, newer than this daemon's \
             {ABI_MAJOR}.{ABI_MINOR}: upgrade unicornd"
        ));
    }
    Ok(())
}

/// The daemon version string, which is also the library's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_rules() {
        assert!(check_abi(ABI_MAJOR, ABI_MINOR).is_ok());
        assert!(check_abi(ABI_MAJOR + 1, 0).is_err());
        assert!(check_abi(ABI_MAJOR, ABI_MINOR + 1).is_err());
        // Every minor up to ours, of the same major, is served.
        for minor in 0..=ABI_MINOR {
            assert!(check_abi(ABI_MAJOR, minor).is_ok());
        }
    }
}
