//! CPU compute kernels for unicorn.

mod types;

pub use types::GgmlType;
