//! CPU compute kernels for unicorn.
