//! The error type of the Rust API: a [`Status`] plus a message for humans.

use crate::status::Status;

/// An error from libunicorn or from the daemon. The status is what programs branch on; the message
/// says what happened in words (it is what `unicorn_last_error` returns in C).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    status: Status,
    message: String,
}

impl Error {
    /// An error with `status` and `message`. `status` must not be [`Status::Ok`]; if it is, the
    /// error is recorded as [`Status::Internal`] so that no error ever reads as success.
    pub fn new(status: Status, message: impl Into<String>) -> Error {
        let status = if status == Status::Ok { Status::Internal } else { status };
        Error { status, message: message.into() }
    }

    /// An OS error with the call that failed.
    pub fn os(what: impl std::fmt::Display, err: impl std::fmt::Display) -> Error {
        Error::new(Status::Io, format!("{what}: {err}"))
    }

    /// A protocol violation by the peer.
    pub fn protocol(message: impl Into<String>) -> Error {
        Error::new(Status::Protocol, message)
    }

    pub fn status(&self) -> Status {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

/// The result type of the Rust API.
pub type Result<T, E = Error> = std::result::Result<T, E>;
