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
/// Most tokens one `DECODE` may carry (the context size limits it further).
pub const MAX_DECODE_TOKENS: u32 = 1 << 16;

/// Flags of a `DECODE` job (the high half of argument 0).
pub mod decode_flags {
    /// Write the logits of the last input token into the logits buffer (`n_vocab` f32s).
    pub const LOGITS: u32 = 1;
    /// Write the logits of every input token (`n_tokens x n_vocab` f32s, token-major).
    pub const LOGITS_ALL: u32 = 2;
    /// Sample the next token with the context's sampler; it is the completion's result.
    pub const SAMPLE: u32 = 4;
    /// The tokens are in argument 1 itself (one or two), not in a buffer.
    pub const INLINE: u32 = 8;
    /// First forget the context's tokens from position argument 5 on (to reuse a prefix).
    pub const REWIND: u32 = 16;
    pub const ALL: u32 = LOGITS | LOGITS_ALL | SAMPLE | INLINE | REWIND;
}

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
    /// Runs the model on tokens of a context: handle = context; argument 0 = `n_tokens |
    /// flags << 32` ([`decode_flags`]); 1 = the tokens (`INLINE`: `t0 | t1 << 32`) or the
    /// input buffer's handle; 2 = the byte offset of the `u32` tokens in it; 3 = the logits
    /// buffer's handle (0 for none); 4 = the byte offset of the logits in it; 5 = the position
    /// to rewind to (`REWIND`). Completion: result = the sampled token (`SAMPLE`), extra = the
    /// context's position afterwards.
    Decode = 4,
    /// Cancels this session's job whose user_data is argument 0 (the latest one, if several
    /// share it). Completes at once: Ok when the job was found, NotFound otherwise; the
    /// cancelled job then completes with `Cancelled` at the next step boundary, its context as
    /// it was before the job.
    Cancel = 5,
}

impl Opcode {
    pub fn from_u8(v: u8) -> Option<Opcode> {
        match v {
            1 => Some(Opcode::Nop),
            2 => Some(Opcode::Fail),
            3 => Some(Opcode::Fill),
            4 => Some(Opcode::Decode),
            5 => Some(Opcode::Cancel),
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
    Decode(Decode),
    Cancel { target: u64 },
}

/// Where a `DECODE` job's tokens are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenInput {
    /// One or two tokens carried in the entry.
    Inline { tokens: [u32; 2], n: u32 },
    /// `n` little-endian `u32` tokens at `offset` in a registered buffer.
    Buffer { buffer: u32, offset: u64, n: u32 },
}

impl TokenInput {
    pub fn len(&self) -> u32 {
        match *self {
            TokenInput::Inline { n, .. } | TokenInput::Buffer { n, .. } => n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a `DECODE` job writes logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogitsOut {
    pub buffer: u32,
    pub offset: u64,
    /// Every input token's logits, not only the last one's.
    pub all: bool,
}

/// A `DECODE` job, validated field by field (the daemon checks handles and ranges).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decode {
    pub ctx: u32,
    pub input: TokenInput,
    pub logits: Option<LogitsOut>,
    pub sample: bool,
    pub rewind_to: Option<u32>,
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
            Job::Cancel { target } => {
                sqe.opcode = Opcode::Cancel as u8;
                sqe.args[0] = target;
            }
            Job::Decode(d) => {
                use decode_flags::*;
                sqe.opcode = Opcode::Decode as u8;
                sqe.handle = d.ctx;
                let mut flags = 0;
                match d.input {
                    TokenInput::Inline { n: 0, .. } => {}
                    TokenInput::Inline { tokens, .. } => {
                        flags |= INLINE;
                        sqe.args[1] = u64::from(tokens[0]) | u64::from(tokens[1]) << 32;
                    }
                    TokenInput::Buffer { buffer, offset, .. } => {
                        sqe.args[1] = u64::from(buffer);
                        sqe.args[2] = offset;
                    }
                }
                if let Some(l) = d.logits {
                    flags |= if l.all { LOGITS_ALL } else { LOGITS };
                    sqe.args[3] = u64::from(l.buffer);
                    sqe.args[4] = l.offset;
                }
                if d.sample {
                    flags |= SAMPLE;
                }
                if let Some(p) = d.rewind_to {
                    flags |= REWIND;
                    sqe.args[5] = u64::from(p);
                }
                sqe.args[0] = u64::from(d.input.len()) | u64::from(flags) << 32;
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
            Opcode::Nop | Opcode::Fail | Opcode::Cancel => (1, false),
            Opcode::Fill => (3, true),
            Opcode::Decode => (6, true),
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
            Opcode::Decode => decode_from_args(sqe.handle, &sqe.args).map(Job::Decode),
            Opcode::Cancel => Ok(Job::Cancel { target: sqe.args[0] }),
        }
    }
}

fn decode_from_args(ctx: u32, a: &[u64; 6]) -> Result<Decode, Error> {
    use decode_flags::*;
    let bad = |msg: String| Err(Error::new(Status::InvalidArgument, msg));
    let n = a[0] as u32;
    let flags = (a[0] >> 32) as u32;
    if flags & !ALL != 0 {
        return bad(format!("DECODE flags {flags:#x}: unknown bits"));
    }
    if n > MAX_DECODE_TOKENS {
        return bad(format!("DECODE of {n} tokens: at most {MAX_DECODE_TOKENS} allowed"));
    }
    // Without tokens a DECODE only rewinds, samples, or reads the last logits again.
    if n == 0 && (flags & (SAMPLE | REWIND | LOGITS) == 0 || flags & (INLINE | LOGITS_ALL) != 0) {
        return bad(
            "a DECODE without tokens must SAMPLE, REWIND or ask for LOGITS, and nothing else"
                .into(),
        );
    }
    let input = if n == 0 {
        if a[1] != 0 || a[2] != 0 {
            return bad("a DECODE without tokens takes no input".into());
        }
        TokenInput::Inline { tokens: [0, 0], n: 0 }
    } else if flags & INLINE != 0 {
        if n > 2 || a[2] != 0 {
            return bad("inline DECODE carries one or two tokens and no offset".into());
        }
        TokenInput::Inline { tokens: [a[1] as u32, (a[1] >> 32) as u32], n }
    } else {
        let Ok(buffer) = u32::try_from(a[1]) else {
            return bad(format!("input buffer handle {} out of range", a[1]));
        };
        if buffer == 0 || !a[2].is_multiple_of(4) {
            return bad("DECODE input needs a buffer handle and a 4-aligned offset".into());
        }
        TokenInput::Buffer { buffer, offset: a[2], n }
    };
    let logits = match flags & (LOGITS | LOGITS_ALL) {
        0 => {
            if a[3] != 0 || a[4] != 0 {
                return bad("a logits buffer without a LOGITS flag".into());
            }
            None
        }
        f if f == LOGITS || f == LOGITS_ALL => {
            let Ok(buffer) = u32::try_from(a[3]) else {
                return bad(format!("logits buffer handle {} out of range", a[3]));
            };
            if buffer == 0 || !a[4].is_multiple_of(4) {
                return bad("DECODE logits need a buffer handle and a 4-aligned offset".into());
            }
            Some(LogitsOut { buffer, offset: a[4], all: f == LOGITS_ALL })
        }
        _ => return bad("LOGITS and LOGITS_ALL exclude each other".into()),
    };
    let rewind_to = if flags & REWIND != 0 {
        let Ok(p) = u32::try_from(a[5]) else {
            return bad(format!("rewind position {} out of range", a[5]));
        };
        Some(p)
    } else if a[5] != 0 {
        return bad("argument 5 must be 0 without REWIND".into());
    } else {
        None
    };
    Ok(Decode { ctx, input, logits, sample: flags & SAMPLE != 0, rewind_to })
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
            Job::Cancel { target: 77 },
            Job::Decode(Decode {
                ctx: 2,
                input: TokenInput::Inline { tokens: [0, 0], n: 0 },
                logits: None,
                sample: true,
                rewind_to: None,
            }),
            Job::Decode(Decode {
                ctx: 2,
                input: TokenInput::Inline { tokens: [17, 0], n: 1 },
                logits: None,
                sample: true,
                rewind_to: None,
            }),
            Job::Decode(Decode {
                ctx: 2,
                input: TokenInput::Buffer { buffer: 5, offset: 64, n: 300 },
                logits: Some(LogitsOut { buffer: 6, offset: 0, all: true }),
                sample: false,
                rewind_to: Some(12),
            }),
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
            // DECODE: no tokens, too many inline, unknown flags, both logits kinds, a
            // misaligned offset, a logits buffer without the flag, a rewind argument without
            // the flag.
            (
                Sqe { opcode: 4, handle: 1, args: [0, 0, 0, 0, 0, 0], ..nop },
                Status::InvalidArgument,
            ),
            (
                Sqe { opcode: 4, handle: 1, args: [8 << 32 | 4 << 32, 0, 0, 0, 0, 0], ..nop },
                Status::InvalidArgument,
            ),
            (
                Sqe { opcode: 4, handle: 1, args: [4 << 32, 7, 0, 0, 0, 0], ..nop },
                Status::InvalidArgument,
            ),
            (
                Sqe { opcode: 4, handle: 1, args: [3 | 8 << 32, 0, 0, 0, 0, 0], ..nop },
                Status::InvalidArgument,
            ),
            (
                Sqe { opcode: 4, handle: 1, args: [1 | 64 << 32, 2, 0, 0, 0, 0], ..nop },
                Status::InvalidArgument,
            ),
            (
                Sqe { opcode: 4, handle: 1, args: [1 | 3 << 32, 2, 0, 3, 0, 0], ..nop },
                Status::InvalidArgument,
            ),
            (
                Sqe { opcode: 4, handle: 1, args: [1, 2, 2, 0, 0, 0], ..nop },
                Status::InvalidArgument,
            ),
            (
                Sqe { opcode: 4, handle: 1, args: [1, 2, 0, 3, 0, 0], ..nop },
                Status::InvalidArgument,
            ),
            (
                Sqe { opcode: 4, handle: 1, args: [1, 2, 0, 0, 0, 9], ..nop },
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
