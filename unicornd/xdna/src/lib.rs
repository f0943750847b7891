//! unicorn's AMD XDNA NPU backend (the `amdxdna` accel driver), built to be checked without the
//! chip.
//!
//! - [`sys`]: ioctl numbers, `#[repr(C)]` uapi structs with layout assertions, and the crate's
//!   only `unsafe` (ioctl, mmap).
//! - [`device::Device`]: the ioctl surface; [`device::AccelDevice`] is `/dev/accel/accelN`,
//!   [`fake::FakeDevice`] a test double that validates calls like the driver and computes
//!   nothing.
//! - [`bo`], [`hwctx`], [`cmd`]: buffer objects, the heap, hardware contexts with their CUs,
//!   ERT_START_NPU and ERT_CMD_CHAIN packets, submission and syncobj waits with timeouts.
//! - [`runtime`]: the kernels of the manifest as the engine runs them (contexts per QoS
//!   priority, prepared runs, fallback counting and retirement).
//! - [`xclbin`]: the container parser (hostile input), [`manifest`]: the kernel manifest,
//!   [`discover`]: finding the NPU and saying why there is none.
//!
//! See README.md for what has and has not run on real hardware (nothing has run on an NPU).

pub mod bo;
pub mod cmd;
pub mod device;
pub mod discover;
mod error;
pub mod fake;
pub mod hwctx;
pub mod manifest;
pub mod runtime;
pub mod sys;
pub mod xclbin;

pub use error::{Result, XdnaError};
