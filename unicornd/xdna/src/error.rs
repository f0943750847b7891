//! The crate's error type. None of these is a panic; the daemon maps [`XdnaError::job_failure`]
//! to a failed job and falls back to another backend for the operation.

use crate::cmd::CmdState;
use crate::xclbin::XclbinError;

#[derive(Debug, thiserror::Error)]
pub enum XdnaError {
    /// An ioctl (or mmap) the driver refused.
    #[error("{call}: {source}")]
    Ioctl {
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The xclbin is malformed or lacks what the NPU needs.
    #[error("xclbin: {0}")]
    Xclbin(#[from] XclbinError),
    /// A command finished in a state other than COMPLETED. For a chain, `index` is the failing
    /// sub-command the device reported.
    #[error("NPU command ended in state {state}{}", .index.map(|i| format!(" at chain index {i}")).unwrap_or_default())]
    Command { state: CmdState, index: Option<u32> },
    /// The completion wait ran out.
    #[error("NPU command did not complete within {0:?}")]
    Timeout(std::time::Duration),
    /// Arguments that do not fit together (sizes, counts, shapes); also replies of the device
    /// that do not fit (a BO address outside the heap, a short GET_INFO).
    #[error("invalid: {0}")]
    Invalid(String),
    /// The kernel manifest.
    #[error("kernel manifest {path}: {reason}")]
    Manifest { path: String, reason: String },
}

impl XdnaError {
    pub(crate) fn ioctl(call: &'static str) -> impl FnOnce(std::io::Error) -> XdnaError {
        move |source| XdnaError::Ioctl { call, source }
    }

    /// True when the failure is the job's (a command error or timeout): the operation may be
    /// retried on another backend and the device stays usable. Other errors mean the device
    /// path itself is broken.
    pub fn job_failure(&self) -> bool {
        matches!(self, XdnaError::Command { .. } | XdnaError::Timeout(_))
    }
}

pub type Result<T, E = XdnaError> = std::result::Result<T, E>;
