//! CPU compute kernels for unicorn: the arithmetic of running a GGUF model.
//!
//! # Modules
//!
//! - [`types`]: [`GgmlType`], the tensor types as GGUF numbers them, with block geometry.
//! - [`formats`]: the block structs (`BlockQ4_0` .. `BlockQ8_1`), views of tensor bytes as
//!   blocks, and the scalar reference quantization/dequantization of F32, F16, BF16, Q4_0, Q4_1,
//!   Q5_0, Q5_1, Q8_0 and Q8_1, bit-exact with ggml's reference C (`quantize_row_*_ref`,
//!   `dequantize_row_*`) and gguf-py (`tests/known_vectors.rs` checks vectors made by gguf-py
//!   and by ggml's C); [`formats::quantize_row`] and [`formats::dequantize_row`] take every type.
//! - [`kquants`]: the k-quant blocks (`BlockQ2K` .. `BlockQ6K`, and `BlockQ8K`), 256 weights
//!   each, with their reference quantizers (ggml's scale searches, `nearest_int`) and
//!   dequantizers, bit-exact with ggml's C (checked against vectors it made).
//! - [`QuantizedActs`] (module `act`): activations quantized for the integer dot products, to
//!   Q8_0/Q8_1 values or, for the k-quants, to Q8_K ([`ActFormat`]).
//! - [`dot`]: dot products of one weight row with one activation row, scalar reference and
//!   AVX2 tiles of several rows by several tokens; [`dot::act_format`] says which activations a
//!   weight type takes.
//! - [`kdot`]: the same for Q2_K .. Q6_K weights with Q8_K activations (reached through
//!   [`dot`]'s entry points and [`fn@matmul`]).
//! - [`tiled`]: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 matrices laid out eight rows wide
//!   ([`tiled::TiledWeights`]) for the AVX2 products, bit-exact with the same reference.
//! - [`mod@matmul`]: weight matrix ([`WeightView`]) times a batch of activations, split across the
//!   pool; also the embedding-row lookup.
//! - [`ops`]: RMSNorm, RoPE (ggml's NORM and NEOX layouts), softmax, SiLU/SwiGLU,
//!   GELU-tanh/GeGLU, element-wise arithmetic.
//! - [`attention`]: grouped-query attention of a batch of queries over an f32 or f16 KV cache,
//!   with causal mask, sliding window and logit soft-cap.
//! - [`pool`]: [`ThreadPool`], a fixed worker pool with a microsecond parallel-for, and
//!   [`default_threads`] (physical cores).
//! - [`cpu`]: [`Isa`], the instruction set chosen once per process (`UNICORN_CPU` lowers it).
//!
//! # Example
//!
//! ```
//! use unicorn_kernels::formats::quantize_row;
//! use unicorn_kernels::{matmul, GgmlType, ThreadPool, WeightView};
//!
//! let pool = ThreadPool::new(2); // once, sized by --threads (default: default_threads())
//! let (rows, cols) = (4, 64);
//! let row_bytes = GgmlType::Q4_1.row_bytes(cols as u64).unwrap() as usize;
//! let mut data = vec![0u8; rows * row_bytes]; // as mapped from the GGUF file
//! for (r, dst) in data.chunks_mut(row_bytes).enumerate() {
//!     quantize_row(GgmlType::Q4_1, &vec![r as f32; cols], dst)?;
//! }
//! let w = WeightView::new(GgmlType::Q4_1, rows, cols, &data)?;
//! let x = vec![1.0f32; 2 * cols]; // two tokens
//! let mut out = vec![0.0f32; 2 * rows]; // out[t * rows + r]
//! matmul(&pool, &w, &x, 2, &mut out)?;
//! assert_eq!(out[rows + 3], 3.0 * 64.0);
//! # Ok::<(), unicorn_kernels::KernelError>(())
//! ```
//!
//! # Instruction sets
//!
//! Every SIMD kernel has a scalar reference, and tests run each path the machine supports
//! against it: integer parts of the quantized dot products bit for bit, float parts within
//! rounding bounds stated in each module (for the k-quants, in [`kdot`]). Paths: scalar and
//! AVX2+FMA+F16C. **AVX-512 (and
//! VNNI) kernels are pending a machine to test them on**: [`IsaLevel::Avx512`] is detected and
//! currently runs the AVX2 kernels, and each dispatch point is where an AVX-512 branch would go.
//! Writing them without running them would ship untested code to the CI machines that have
//! AVX-512.
//!
//! # Errors and panics
//!
//! Functions fed from model files ([`WeightView::new`], [`fn@matmul`], [`formats::dequantize_row`],
//! [`attention::attention`]) return [`KernelError`] for shapes that do not fit. The
//! slice-to-slice float kernels in [`ops`] panic on mismatched lengths: those are fixed by the
//! engine's code, not by input.

mod act;
pub mod attention;
pub mod cpu;
pub mod dot;
mod error;
pub mod formats;
pub mod kdot;
pub mod kquants;
pub mod matmul;
pub mod ops;
pub mod pool;
#[cfg(target_arch = "x86_64")]
mod simd;
pub mod tiled;
pub mod types;

pub use act::{ActFormat, ActRow, QuantizedActs};
pub use cpu::{Isa, IsaLevel};
pub use error::KernelError;
pub use half::f16;
pub use matmul::{matmul, matmul_group, matmul_quantized, WeightView};
pub use pool::{default_threads, ThreadPool};
pub use types::GgmlType;
