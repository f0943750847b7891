//! Text generation over libunicorn's Rust API, shared by `unicorn run`/`chat` and `unicorn
//! serve`: where models live ([`model`]), a model with a context and the token loop
//! ([`session`]), and chat templates ([`template`]).
//!
//! A crate of its own so that the template engine stays out of `libunicorn.so` and the HTTP
//! server need not depend on the CLI.

pub mod model;
pub mod session;
pub mod template;

pub use session::{generate, Generated, Session, StopReason};
pub use template::{Message, Template};

/// What can go wrong while generating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon or the session failed; the status says how.
    #[error("{0}")]
    Client(#[from] unicorn::Error),
    #[error("loading {path}: {source}")]
    Load { path: std::path::PathBuf, source: unicorn::Error },
    #[error("{0}")]
    ModelFile(String),
    #[error("{0}")]
    Template(String),
    #[error("the prompt has no tokens")]
    EmptyPrompt,
    #[error("the daemon returned no token")]
    NoToken,
}

impl Error {
    /// The daemon's status when the error came from it.
    pub fn status(&self) -> Option<unicorn::Status> {
        match self {
            Error::Client(e) | Error::Load { source: e, .. } => Some(e.status()),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
