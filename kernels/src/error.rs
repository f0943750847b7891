//! The one error type of the kernels' checked entry points.

use std::fmt;

use crate::GgmlType;

/// A kernel call whose arguments do not fit together.
///
/// Entry points that take tensor data from a file (weights, their shapes) return this instead of
/// panicking; see each function's docs for the few checks that panic as programmer errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelError {
    /// The operation is not implemented for this tensor type.
    Unsupported {
        /// The tensor type.
        ty: GgmlType,
        /// What was asked of it.
        op: &'static str,
    },
    /// A row length that is not a whole number of the type's blocks.
    NotBlockMultiple {
        /// The tensor type.
        ty: GgmlType,
        /// The element count given.
        n: usize,
    },
    /// A buffer of the wrong length.
    Length {
        /// Which argument.
        what: &'static str,
        /// The length the other arguments imply.
        expected: usize,
        /// The length given.
        got: usize,
    },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::Unsupported { ty, op } => write!(f, "{op} is not supported for {ty}"),
            KernelError::NotBlockMultiple { ty, n } => write!(
                f,
                "{n} elements are not a whole number of {ty} blocks of {}",
                ty.block_size()
            ),
            KernelError::Length { what, expected, got } => {
                write!(f, "{what} has length {got}, expected {expected}")
            }
        }
    }
}

impl std::error::Error for KernelError {}

/// `Ok(())` when `got == expected`.
pub(crate) fn check_len(
    what: &'static str,
    expected: usize,
    got: usize,
) -> Result<(), KernelError> {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::Length { what, expected, got })
    }
}
