//! unicorn's Vulkan compute backend (first slice).
//!
//! - [`Context::new`] loads the Vulkan loader at run time (ash's `loaded` feature: no link-time
//!   libvulkan), chooses a device (discrete GPU, integrated GPU, ..., a CPU device such as Mesa's
//!   lavapipe only when [`Options::allow_cpu`] or `UNICORN_VULKAN_ALLOW_CPU=1`), and creates one
//!   compute queue. No loader or no device is a [`VulkanError`], never a panic.
//! - [`Buffer`]: storage buffers in host-visible coherent memory, checked against
//!   `maxStorageBufferRange`. Weights uploaded with [`Step::weight`] live in device-local memory,
//!   through a staging buffer where that memory is not mapped ([`choose_weight_memory`]).
//! - Operations ([`Context::matvec`], [`Context::matmul`] with the GGUF block formats, k-quants
//!   and float weights, [`Context::rms_norm`], [`Context::swiglu`], [`Context::geglu`],
//!   [`Context::add`], [`Context::mul`], [`Context::scale`], [`Context::softmax`],
//!   [`Context::rope`], [`Context::kv_store`], [`Context::attention`]) run GLSL compute shaders
//!   from the workspace's `shaders/`, compiled by `build.rs` with `glslc` and embedded as SPIR-V.
//!   Each call submits one dispatch and waits.
//! - [`Step`]: the same operations recorded into one command buffer on device-resident tensors,
//!   submitted once when the host needs a result, with optional per-dispatch timestamps
//!   ([`TIMING_ENV`]).
//!
//! See README.md for what is missing and how to run the tests.

mod buffer;
mod context;
mod error;
mod kv;
mod memory;
mod ops;
mod recorder;
mod shaders;
mod step;

pub use buffer::Buffer;
pub use context::{
    list_devices, Context, DeviceInfo, DeviceSummary, DeviceType, Options, ALLOW_CPU_ENV,
    DEFAULT_STAGING_CHUNK, STAGING_ENV,
};
pub use error::{Result, VulkanError};
pub use kv::{KvCache, KvElem, KvShape, MAX_HEAD_DIM};
pub use memory::{choose_weight_memory, MemoryType, WeightMemory};
pub use step::{timing_from_env, OpTime, OutRows, Step, StepStats, Tensor, Weight, TIMING_ENV};

/// Whether a Vulkan device must be found here, so that a test that finds none fails instead of
/// skipping: Mesa's lavapipe ICD file is installed (`scripts/install-deps` installs it), or
/// `UNICORN_VULKAN_REQUIRE=1` (CI sets it).
pub fn device_required() -> bool {
    let lavapipe = std::fs::read_dir("/usr/share/vulkan/icd.d").is_ok_and(|dir| {
        dir.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("lvp_icd.") && name.ends_with(".json")
        })
    });
    lavapipe || std::env::var("UNICORN_VULKAN_REQUIRE").is_ok_and(|v| v == "1")
}
