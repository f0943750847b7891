//! unicorn's inference engine.
//!
//! - [`gguf`]: the GGUF model file reader (hostile-input safe).
//! - [`tokenizer`]: tokenizers built from GGUF metadata (byte-level BPE now, SentencePiece next).
//! - [`model`]: architectures, the forward pass, KV caches.
//! - [`sampling`]: choosing the next token from logits.

pub mod gguf;
pub mod model;
pub mod sampling;
pub mod tokenizer;
