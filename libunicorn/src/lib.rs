//! libunicorn: the client library of unicorn.
//!
//! - [`protocol`]: the wire protocol, the one definition that unicornd compiles too;
//! - [`Client`]: the Rust API (connect, submit, reap, wait, ping, status);
//! - `ffi`: the C ABI (`include/unicorn.h`), a thin layer over [`Client`];
//! - [`sys`]: safe wrappers over the system calls both sides use.
//!
//! The flow of a job: [`Client::submit`] writes an entry into the shared submission ring and,
//! if the daemon sleeps, rings its doorbell; unicornd copies the entry out, validates the copy,
//! runs it and writes a completion; [`Client::reap`] or [`Client::wait`] picks it up.

// Only `ffi` and `status` reach the C header; cbindgen skips the rest.
/// cbindgen:ignore
mod client;
/// cbindgen:ignore
mod error;
pub mod ffi;
/// cbindgen:ignore
pub mod protocol;
mod status;
/// cbindgen:ignore
pub mod sys;

pub use client::{
    socket_candidates, user_runtime_dir, user_socket_path, Client, ClientOptions, ContextParams,
    DecodeOutput, LogitsWanted, Model, ModelContext, WaitMode, RESERVED_USER_DATA, SOCKET_ENV,
    SYSTEM_SOCKET,
};
pub use error::{Error, Result};
pub use protocol::{Completion, Job, Priority, SamplerParams};
pub use status::Status;
