//! unicorn's inference engine.
//!
//! - [`gguf`]: the GGUF model file reader (hostile-input safe).
//! - [`tokenizer`]: tokenizers built from GGUF metadata (byte-level BPE now, SentencePiece next).

pub mod gguf;
pub mod tokenizer;
