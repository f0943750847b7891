//! Errors of loading and running a model.

use crate::gguf::GgufError;
use crate::tokenizer::TokenizerError;
use unicorn_kernels::KernelError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("architecture {0:?} is not supported (unicorn runs: {1})")]
    UnsupportedArch(String, &'static str),
    /// A file that the architecture `arch` cannot run: a tensor or key missing, a shape or a
    /// combination of hyper-parameters it does not support.
    #[error("{arch}: {source}")]
    Arch { arch: String, source: Box<ModelError> },
    #[error("{key}: {message}")]
    BadHParam { key: String, message: String },
    #[error("tensor {name}: {message}")]
    BadTensor { name: String, message: String },
    #[error("token {token} is outside the vocabulary of {n_vocab}")]
    TokenOutOfRange { token: u32, n_vocab: usize },
    #[error("the context holds {n_ctx} tokens: {n_past} decoded plus {n_new} new do not fit")]
    ContextFull { n_ctx: usize, n_past: usize, n_new: usize },
    #[error("cannot rewind to position {to}: the context holds {n_past} tokens")]
    BadRewind { to: usize, n_past: usize },
    #[error("a sequence has no tokens")]
    EmptySequence,
    #[error("kernel: {0}")]
    Kernel(#[from] KernelError),
    #[error("vulkan: {0}")]
    Vulkan(#[from] unicorn_vulkan::VulkanError),
    /// The context's cache was on a Vulkan device that was lost, so positions `valid..n_past`
    /// exist nowhere else: rewind to `valid` (or less) and decode them again.
    #[error(
        "the KV cache of positions {valid}..{n_past} was on a lost Vulkan device; rewind the \
         context to {valid} or less"
    )]
    KvLost { valid: usize, n_past: usize },
    #[error("could not map {bytes} bytes for the KV cache: {source}")]
    KvMemory { bytes: u64, source: std::io::Error },
}
