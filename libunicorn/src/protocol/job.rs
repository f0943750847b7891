//! Jobs and completions: what a ring entry means.
//!
//! Submission entry (64 bytes, little-endian words):
//!
//! | word | bits | field |
//! |---|---|---|
//! | 0 | 0..8 | opcode |
//! | 0 | 8..16 | flags (none defined: must be 0) |
//! | 0 | 16..32 | reserved (0) |
//! | 0 | 32..64 | handle (a context or buffer; 0 when the job takes none) |
//! | 1 | | user_data, echoed in the completion |
//! | 2..8 | | six opcode-specific arguments; unused ones must be 0 |
//!
//! Completion entry (32 bytes): `user_data`, `status | flags << 32`, `result`, `extra`.
//!
//! Entries carry handles and offsets, never pointers. The daemon decodes a copy of the entry,
//! strictly: unknown opcodes, set reserved bits or nonzero unused arguments fail the job with an
//! error completion instead of being ignored, so garbage is noticed.

use std::time::Duration;

use super::ring::{CqeWords, SqeWords};
use crate::error::Error;
use crate::status::Status;

/// Longest delay a `NOP` may ask for.
pub const MAX_NOP_DELAY: Duration = Duration::from_secs(10);
/// Most bytes one `FILL` may write (it runs inline in the daemon's loop).
pub const MAX_FILL_BYTES: u64 = 1 << 20;

/// Job kinds, as numbered on the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    /// Does nothing and completes with [`Status::Ok`]: the latency probe. Argument 0: a delay in
    /// nanoseconds before it completes (0 for at once), holding a job slot meanwhile.
    Nop = 1,
    /// Completes with the error status given in argument 0: for tests of error paths.
    Fail = 2,
    /// Writes a byte into a range of a registered buffer: handle = buffer, arguments
    /// `offset`, `length` (at most [`MAX_FILL_BYTES`]), `byte`. The simplest job that touches
    /// client memory, for tests of buffer validation.
    Fill = 3,
}

impl Opcode {
    pub fn from_u8(v: u8) -> Option<Opcode> {
        match v {
            1 => Some(Opcode::Nop),
            2 => Some(Opcode::Fail),
            3 => Some(Opcode::Fill),
            _ => None,
        }
    }
}

/// A job, decoded and validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    Nop { delay: Duration },
    Fail { status: Status },
    Fill { buffer: u32, offset: u64, len: u64, byte: u8 },
}

/// A raw submission entry, in fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe {
    pub opcode: u8,
    pub flags: u8,
    pub reserved: u16,
    pub handle: u32,
    pub user_data: u64,
    pub args: [u64; 6],
}

impl Sqe {
    pub fn to_words(&self) -> SqeWords {
        let w0 = u64::from(self.opcode)
            | u64::from(self.flags) << 8
            | u64::from(self.reserved) << 16
            | u64::from(self.handle) << 32;
        let a = self.args;
        [w0, self.user_data, a[0], a[1], a[2], a[3], a[4], a[5]]
    }

    pub fn from_words(w: &SqeWords) -> Sqe {
        Sqe {
            opcode: w[0] as u8,
            flags: (w[0] >> 8) as u8,
            reserved: (w[0] >> 16) as u16,
            handle: (w[0] >> 32) as u32,
            user_data: w[1],
            args: [w[2], w[3], w[4], w[5], w[6], w[7]],
        }
    }
}

impl Job {
    /// The entry for this job.
    pub fn to_sqe(&self, user_data: u64) -> Sqe {
        let mut sqe = Sqe { user_data, ..Sqe::default() };
        match *self {
            Job::Nop { delay } => {
                sqe.opcode = Opcode::Nop as u8;
                sqe.args[0] = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
            }
            Job::Fail { status } => {
                sqe.opcode = Opcode::Fail as u8;
                sqe.args[0] = u64::from(status.as_u32());
            }
            Job::Fill { buffer, offset, len, byte } => {
                sqe.opcode = Opcode::Fill as u8;
                sqe.handle = buffer;
                sqe.args[..3].copy_from_slice(&[offset, len, u64::from(byte)]);
            }
        }
        sqe
    }

    /// Decodes and validates an entry the daemon copied out of a ring.
    pub fn from_sqe(sqe: &Sqe) -> Result<Job, Error> {
        let bad = |msg: String| Err(Error::new(Status::InvalidArgument, msg));
        if sqe.flags != 0 || sqe.reserved != 0 {
            return bad(format!(
                "entry flags {:#x} / reserved {:#x}: none are defined",
                sqe.flags, sqe.reserved
            ));
        }
        let Some(op) = Opcode::from_u8(sqe.opcode) else {
            return Err(Error::new(Status::Unsupported, format!("unknown opcode {}", sqe.opcode)));
        };
        let (used_args, takes_handle) = match op {
            Opcode::Nop | Opcode::Fail => (1, false),
            Opcode::Fill => (3, true),
        };
        if !takes_handle && sqe.handle != 0 {
            return bad(format!("{op:?} takes no handle, got {}", sqe.handle));
        }
        if let Some(i) = sqe.args[used_args..].iter().position(|&a| a != 0) {
            return bad(format!("{op:?}: argument {} must be 0", used_args + i));
        }
        match op {
            Opcode::Nop => {
                let delay = Duration::from_nanos(sqe.args[0]);
                if delay > MAX_NOP_DELAY {
                    return bad(format!("NOP delay {delay:?} is over {MAX_NOP_DELAY:?}"));
                }
                Ok(Job::Nop { delay })
            }
            Opcode::Fail => match u32::try_from(sqe.args[0]).ok().and_then(Status::from_u32) {
                Some(status) if status != Status::Ok => Ok(Job::Fail { status }),
                _ => bad(format!("FAIL status {} is not an error status", sqe.args[0])),
            },
            Opcode::Fill => {
                let [offset, len, byte, ..] = sqe.args;
                if len > MAX_FILL_BYTES {
                    return bad(format!("FILL of {len} bytes is over {MAX_FILL_BYTES}"));
                }
                let Ok(byte) = u8::try_from(byte) else {
                    return bad(format!("FILL byte {byte} is not a byte"));
                };
                Ok(Job::Fill { buffer: sqe.handle, offset, len, byte })
            }
        }
    }
}

/// A completion as read from the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub user_data: u64,
    pub status: Status,
    pub flags: u32,
    /// Opcode-specific result (0 for NOP and FAIL).
    pub result: u64,
    pub extra: u64,
}

impl Completion {
    pub fn ok(user_data: u64, result: u64) -> Completion {
        Completion { user_data, status: Status::Ok, flags: 0, result, extra: 0 }
    }

    pub fn error(user_data: u64, status: Status) -> Completion {
        Completion { user_data, status, flags: 0, result: 0, extra: 0 }
    }

    pub fn to_words(&self) -> CqeWords {
        [
            self.user_data,
            u64::from(self.status.as_u32()) | u64::from(self.flags) << 32,
            self.result,
            self.extra,
        ]
    }

    /// Decodes a completion; a status this version does not know reads as an error.
    pub fn from_words(w: &CqeWords) -> Completion {
        Completion {
            user_data: w[0],
            status: Status::from_u32(w[1] as u32).unwrap_or(Status::Internal),
            flags: (w[1] >> 32) as u32,
            result: w[2],
            extra: w[3],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn jobs_round_trip() {
        for job in [
            Job::Nop { delay: Duration::ZERO },
            Job::Nop { delay: Duration::from_micros(5) },
            Job::Fail { status: Status::LimitExceeded },
            Job::Fill { buffer: 3, offset: 8, len: 100, byte: 0xAB },
        ] {
            let sqe = job.to_sqe(77);
            let back = Sqe::from_words(&sqe.to_words());
            assert_eq!(back, sqe);
            assert_eq!(Job::from_sqe(&back).unwrap(), job);
        }
    }

    #[test]
    fn garbage_entries_are_refused() {
        let nop = Job::Nop { delay: Duration::ZERO }.to_sqe(1);
        let cases = [
            (Sqe { opcode: 0, ..nop }, Status::Unsupported),
            (Sqe { opcode: 200, ..nop }, Status::Unsupported),
            (Sqe { flags: 1, ..nop }, Status::InvalidArgument),
            (Sqe { reserved: 1, ..nop }, Status::InvalidArgument),
            (Sqe { handle: 3, ..nop }, Status::InvalidArgument),
            (Sqe { args: [0, 0, 0, 0, 0, 1], ..nop }, Status::InvalidArgument),
            (Sqe { args: [u64::MAX, 0, 0, 0, 0, 0], ..nop }, Status::InvalidArgument),
            (
                Sqe { opcode: Opcode::Fail as u8, args: [0, 0, 0, 0, 0, 0], ..nop },
                Status::InvalidArgument,
            ),
            (
                Sqe { opcode: Opcode::Fail as u8, args: [1 << 40, 0, 0, 0, 0, 0], ..nop },
                Status::InvalidArgument,
            ),
            (
                Sqe { opcode: Opcode::Fill as u8, handle: 1, args: [0, 1, 256, 0, 0, 0], ..nop },
                Status::InvalidArgument,
            ),
            (
                Sqe {
                    opcode: Opcode::Fill as u8,
                    handle: 1,
                    args: [0, 1 << 21, 1, 0, 0, 0],
                    ..nop
                },
                Status::InvalidArgument,
            ),
            (
                Sqe { opcode: Opcode::Fill as u8, handle: 1, args: [0, 1, 1, 1, 0, 0], ..nop },
                Status::InvalidArgument,
            ),
        ];
        for (sqe, status) in cases {
            assert_eq!(Job::from_sqe(&sqe).unwrap_err().status(), status, "{sqe:?}");
        }
    }

    #[test]
    fn completions_round_trip() {
        let c = Completion { user_data: 5, status: Status::Timeout, flags: 3, result: 9, extra: 1 };
        assert_eq!(Completion::from_words(&c.to_words()), c);
        let unknown = [1, 999, 0, 0];
        assert_eq!(Completion::from_words(&unknown).status, Status::Internal);
    }

    proptest! {
        #[test]
        fn any_entry_decodes_or_errors(words in any::<[u64; 8]>()) {
            let sqe = Sqe::from_words(&words);
            prop_assert_eq!(sqe.to_words(), words);
            if let Ok(job) = Job::from_sqe(&sqe) {
                // Whatever was accepted re-encodes to the same entry.
                prop_assert_eq!(job.to_sqe(sqe.user_data), sqe);
            }
        }
    }
}
