//! Tokenizers built from GGUF metadata, reproducing llama.cpp's token ids.
//!
//! [`Tokenizer::from_gguf`] reads `tokenizer.ggml.*` and validates it before use: the token list
//! must be a non-empty string array of at most `i32::MAX` entries; `token_type` and `scores`, when
//! present, must have an entry per token; special token ids outside the vocabulary are ignored
//! (with a warning, like llama.cpp); a tokenizer that adds BOS/EOS must have one. Unknown models,
//! and unknown pre-tokenizers of byte-level BPE, are errors rather than guesses, because a wrong
//! split silently changes every token id.
//!
//! Implemented, as variants of the internal `Model` enum that plug in at
//! [`Tokenizer::tokenize`]'s per-model match and share the vocabulary, special-token
//! partitioning, pieces and streaming here:
//! - `tokenizer.ggml.model = gpt2`: byte-level BPE, with the pre-tokenizers of [`PreTokenizer`];
//! - `tokenizer.ggml.model = llama`: SentencePiece BPE (Llama 2, Gemma): merges by token score,
//!   byte fallback through `<0xXX>` tokens, spaces escaped as U+2581 '▁', no pre-tokenizer
//!   (`tokenizer.ggml.pre` is ignored, as llama.cpp does).
//!
//! Behaviour follows llama.cpp's `llama_tokenize` / `llama_token_to_piece` / `llama_detokenize`:
//! - `tokenize(text, add_special, parse_special)`: special tokens are cut out of the text first
//!   (longest first, as llama.cpp does); with `add_special`, BOS/EOS are added when the model's
//!   `add_bos` / `add_eos` say so (SmolLM2's `add_bos_token = false` means no BOS even then).
//! - SentencePiece defaults, as llama.cpp sets them for `llama`: BOS 1, EOS 2, UNK 0, `add_bos`
//!   true, `add_eos` false, and `add_space_prefix` (`tokenizer.ggml.add_space_prefix`) true:
//!   then every text fragment at the start of the text or right after a special token is
//!   tokenized with a space in front. Gemma's files set it to false. For byte-level BPE it
//!   defaults to false and, as in llama.cpp, only affects detokenization.
//! - token types come from `tokenizer.ggml.token_type`; like llama.cpp, tokens whose text marks
//!   them as end-of-generation or fill-in-the-middle controls (`<|im_end|>`, `<|endoftext|>`,
//!   `<|fim_prefix|>`, ...) are treated as control tokens even if the file types them as normal.
//! - pieces: normal tokens are decoded to raw bytes (which may be a partial UTF-8 sequence):
//!   from GPT-2's byte alphabet for byte-level BPE, with '▁' back to a space for SentencePiece;
//!   byte tokens `<0xXX>` are that byte; control/user-defined/unknown tokens render as their
//!   text, control and unknown ones only when `special` is requested; other tokens (unused,
//!   undefined) render as nothing.
//! - detokenization concatenates pieces; with `add_space_prefix`, one leading space of the first
//!   piece is dropped (the prefix the tokenizer added; a kept BOS is the first piece, and after
//!   a removed one nothing is dropped: [`Tokenizer::detokenize_with`]). Streaming
//!   ([`StreamDecoder`]) emits pieces unchanged, as a continuation's first token keeps its
//!   space.

mod bpe;
mod pretokenize;
mod special;
mod spm;
mod stream;
mod unicode;
mod unicode_data;

use std::collections::HashMap;
use std::ops::Range;

use crate::gguf::{GgufError, GgufFile, Metadata};

use pretokenize::PreDefaults;
pub use pretokenize::PreTokenizer;
pub use stream::{StreamDecoder, Utf8Assembler};

/// A token id (an index into the vocabulary).
pub type TokenId = u32;

/// A token's type, as `tokenizer.ggml.token_type` numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// The type with GGUF number `n` (unknown numbers are `Undefined`, as in llama.cpp).
    pub fn from_gguf(n: i32) -> TokenType {
        match n {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }
}

/// Token attributes (llama.cpp's `llama_token_attr` bits): the type, plus overrides.
pub(crate) mod attr {
    pub const UNKNOWN: u16 = 1 << 0;
    pub const UNUSED: u16 = 1 << 1;
    pub const NORMAL: u16 = 1 << 2;
    pub const CONTROL: u16 = 1 << 3;
    pub const USER_DEFINED: u16 = 1 << 4;
    pub const BYTE: u16 = 1 << 5;

    pub fn of(t: super::TokenType) -> u16 {
        use super::TokenType::*;
        match t {
            Undefined => 0,
            Normal => NORMAL,
            Unknown => UNKNOWN,
            Control => CONTROL,
            UserDefined => USER_DEFINED,
            Unused => UNUSED,
            Byte => BYTE,
        }
    }
}

/// Why a tokenizer could not be built, or a token id was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    #[error(transparent)]
    Metadata(#[from] GgufError),
    #[error("tokenizer model {0:?} is not supported yet")]
    UnsupportedModel(String),
    #[error("unknown pre-tokenizer {0:?} (tokenizer.ggml.pre)")]
    UnknownPreTokenizer(String),
    #[error("the vocabulary (tokenizer.ggml.tokens) is empty")]
    EmptyVocab,
    #[error("the vocabulary has {0} tokens, more than token ids can address")]
    VocabTooLarge(usize),
    #[error("{key} has {found} entries, fewer than the {n_vocab} tokens")]
    ShortArray { key: &'static str, found: usize, n_vocab: usize },
    #[error("the tokenizer adds a {what} token but the vocabulary has none")]
    MissingSpecial { what: &'static str },
    #[error("token id {id} is out of range (vocabulary of {n_vocab})")]
    InvalidToken { id: TokenId, n_vocab: usize },
}

/// Ids of the tokens with special roles (from `tokenizer.ggml.*_token_id`, with llama.cpp's
/// defaults and text-based detection).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<TokenId>,
    pub eos: Option<TokenId>,
    pub eot: Option<TokenId>,
    pub eom: Option<TokenId>,
    pub unk: Option<TokenId>,
    pub sep: Option<TokenId>,
    pub pad: Option<TokenId>,
    pub mask: Option<TokenId>,
    pub fim_pre: Option<TokenId>,
    pub fim_suf: Option<TokenId>,
    pub fim_mid: Option<TokenId>,
    pub fim_pad: Option<TokenId>,
    pub fim_rep: Option<TokenId>,
    pub fim_sep: Option<TokenId>,
}

#[derive(Debug)]
pub(crate) struct TokenData {
    pub text: Box<str>,
    pub score: f32,
    pub ty: TokenType,
    pub attr: u16,
    /// The bytes the token stands for, as rendered with `special` on.
    pub piece: Box<[u8]>,
}

/// The token list and its reverse index.
#[derive(Debug)]
pub(crate) struct Vocab {
    pub tokens: Vec<TokenData>,
    /// Text to id; for duplicate texts the highest id wins, as in llama.cpp.
    pub token_to_id: HashMap<Box<str>, TokenId>,
}

/// The per-model encoder.
#[derive(Debug)]
enum Model {
    /// `gpt2`: byte-level BPE.
    Bpe(bpe::Bpe),
    /// `llama`: SentencePiece BPE.
    Spm(spm::Spm),
}

/// A tokenizer: text to token ids and back. Cheap to share (`Send + Sync`, no interior state).
pub struct Tokenizer {
    model: Model,
    model_name: String,
    pre: PreTokenizer,
    vocab: Vocab,
    special: SpecialTokens,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    eog: Vec<TokenId>,
    specials: special::SpecialMatcher,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model_name)
            .field("pre", &self.pre)
            .field("n_vocab", &self.vocab.tokens.len())
            .field("special", &self.special)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("add_space_prefix", &self.add_space_prefix)
            .field("eog", &self.eog)
            .finish_non_exhaustive()
    }
}

/// Texts that llama.cpp treats as end-of-generation tokens (and so as control tokens).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "</s>",
    "<eos>",
    "[EOT]",
    "[EOS]",
    "<｜end▁of▁sentence｜>",
];
/// Texts llama.cpp picks the EOT token from when `eot_token_id` is absent.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] =
    &["<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "▁<PRE>"];
const FIM_SUF_TEXTS: &[&str] =
    &["<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "▁<SUF>"];
const FIM_MID_TEXTS: &[&str] =
    &["<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>", "▁<MID>"];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"];
const FIM_REP_TEXTS: &[&str] =
    &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

impl Tokenizer {
    /// Build the tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_metadata(gguf.metadata())
    }

    /// Build the tokenizer described by `tokenizer.ggml.*` metadata.
    pub fn from_metadata(md: &Metadata) -> Result<Tokenizer, TokenizerError> {
        let model_name = md.get_str("tokenizer.ggml.model")?;
        let spm = match model_name {
            "gpt2" => false,
            "llama" => true,
            _ => return Err(TokenizerError::UnsupportedModel(model_name.to_owned())),
        };
        let (pre, pre_defaults) = if spm {
            // llama.cpp ignores tokenizer.ggml.pre for SentencePiece and adds BOS by default.
            (PreTokenizer::Default, PreDefaults { ignore_merges: false, add_bos: true })
        } else {
            let pre_name = md.opt_str("tokenizer.ggml.pre")?.unwrap_or("");
            if pre_name.is_empty() {
                log::warn!("tokenizer.ggml.pre is missing: using the default pre-tokenizer");
            }
            PreTokenizer::from_name(pre_name)
                .ok_or_else(|| TokenizerError::UnknownPreTokenizer(pre_name.to_owned()))?
        };

        let mut vocab = read_vocab(md)?;
        let n_vocab = vocab.tokens.len();

        // llama.cpp's defaults per model, disabled when outside the vocabulary.
        let in_vocab = |id: TokenId| ((id as usize) < n_vocab).then_some(id);
        let mut special = if spm {
            SpecialTokens {
                bos: in_vocab(1),
                eos: in_vocab(2),
                unk: in_vocab(0),
                ..SpecialTokens::default()
            }
        } else {
            SpecialTokens { bos: in_vocab(11), eos: in_vocab(11), ..SpecialTokens::default() }
        };
        type Slot = fn(&mut SpecialTokens) -> &mut Option<TokenId>;
        let slots: [(&str, Slot); 17] = [
            ("bos_token_id", |s| &mut s.bos),
            ("eos_token_id", |s| &mut s.eos),
            ("eot_token_id", |s| &mut s.eot),
            ("eom_token_id", |s| &mut s.eom),
            ("unknown_token_id", |s| &mut s.unk),
            ("seperator_token_id", |s| &mut s.sep),
            ("padding_token_id", |s| &mut s.pad),
            ("mask_token_id", |s| &mut s.mask),
            ("fim_pre_token_id", |s| &mut s.fim_pre),
            ("fim_suf_token_id", |s| &mut s.fim_suf),
            ("fim_mid_token_id", |s| &mut s.fim_mid),
            ("fim_pad_token_id", |s| &mut s.fim_pad),
            ("fim_rep_token_id", |s| &mut s.fim_rep),
            ("fim_sep_token_id", |s| &mut s.fim_sep),
            // Deprecated names.
            ("prefix_token_id", |s| &mut s.fim_pre),
            ("suffix_token_id", |s| &mut s.fim_suf),
            ("middle_token_id", |s| &mut s.fim_mid),
        ];
        for (name, slot) in slots {
            let key = format!("tokenizer.ggml.{name}");
            if let Some(id) = md.opt_uint(&key)? {
                match u32::try_from(id).ok().and_then(in_vocab) {
                    Some(id) => *slot(&mut special) = Some(id),
                    None => log::warn!("{key} = {id} is outside the vocabulary; ignored"),
                }
            }
        }
        let add_bos = md.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(pre_defaults.add_bos);
        let add_eos = md.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let add_space_prefix = md.opt_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(spm);
        if add_bos && special.bos.is_none() {
            return Err(TokenizerError::MissingSpecial { what: "BOS" });
        }
        if add_eos && special.eos.is_none() {
            return Err(TokenizerError::MissingSpecial { what: "EOS" });
        }

        let eog = detect_by_text(&mut vocab, &mut special);
        for t in &mut vocab.tokens {
            t.piece = render_piece(&t.text, t.attr, spm).into_boxed_slice();
        }

        let specials = special::SpecialMatcher::new(&vocab);
        let model = if spm {
            let spm = spm::Spm::new(&vocab, special.unk);
            log::debug!(
                "tokenizer: llama (SentencePiece), {n_vocab} tokens, {} byte tokens, {} special \
                 tokens, add_bos {add_bos}, add_space_prefix {add_space_prefix}",
                spm.n_byte_tokens(),
                specials.len()
            );
            Model::Spm(spm)
        } else {
            let merges = md.get_str_array("tokenizer.ggml.merges")?;
            let bpe = bpe::Bpe::new(merges, &vocab, pre_defaults.ignore_merges);
            log::debug!(
                "tokenizer: gpt2/{pre:?}, {n_vocab} tokens, {} merges, {} special tokens, \
                 add_bos {add_bos}",
                bpe.n_merges(),
                specials.len()
            );
            Model::Bpe(bpe)
        };
        Ok(Tokenizer {
            model,
            model_name: model_name.to_owned(),
            pre,
            vocab,
            special,
            add_bos,
            add_eos,
            add_space_prefix,
            eog,
            specials,
        })
    }

    /// Tokenize `text`. With `add_special`, BOS/EOS are added as the model asks
    /// ([`Tokenizer::add_bos`], [`Tokenizer::add_eos`]). With `parse_special`, the text of a
    /// control token (e.g. `<|im_start|>`) becomes that token; without it, such text is
    /// tokenized as plain text (user-defined tokens are matched either way). With
    /// [`Tokenizer::add_space_prefix`] (SentencePiece), a text fragment at the start or right
    /// after a special token is tokenized with a space in front.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<TokenId> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.special.bos);
        }
        let fragments = self.specials.partition(text, &self.vocab, parse_special);
        match &self.model {
            Model::Bpe(bpe) => {
                // Words repeat a lot in real text: remember where each one's tokens are in `out`.
                let mut seen: HashMap<&str, Range<usize>> = HashMap::new();
                for f in fragments {
                    match f {
                        special::Fragment::Token(id) => out.push(id),
                        special::Fragment::Text(s, e) => {
                            for word in self.pre.split(&text[s..e]) {
                                if let Some(r) = seen.get(word) {
                                    out.extend_from_within(r.clone());
                                } else {
                                    let start = out.len();
                                    bpe.encode_word(word, &self.vocab, &mut out);
                                    seen.insert(word, start..out.len());
                                }
                            }
                        }
                    }
                }
            }
            Model::Spm(spm) => {
                let mut prev_special = true;
                let mut escaped = String::new();
                for f in fragments {
                    match f {
                        special::Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                        special::Fragment::Text(s, e) => {
                            escaped.clear();
                            if self.add_space_prefix && prev_special {
                                escaped.push(SPACE_ESCAPE);
                            }
                            for (i, part) in text[s..e].split(' ').enumerate() {
                                if i > 0 {
                                    escaped.push(SPACE_ESCAPE);
                                }
                                escaped.push_str(part);
                            }
                            spm.encode(&escaped, &self.vocab, &mut out);
                            prev_special = false;
                        }
                    }
                }
            }
        }
        if add_special && self.add_bos && out.len() >= 2 && out[1] == out[0] {
            log::debug!("the text starts with BOS and another BOS was added in front");
        }
        if add_special && self.add_eos {
            out.extend(self.special.eos);
        }
        out
    }

    /// The bytes token `id` stands for. With `special`, control and unknown tokens render as
    /// their text; without, as nothing (llama.cpp's `token_to_piece` with `special = false`).
    pub fn token_to_piece(&self, id: TokenId, special: bool) -> Result<&[u8], TokenizerError> {
        let t = self.token(id)?;
        if !special && t.attr & (attr::CONTROL | attr::UNKNOWN) != 0 {
            return Ok(&[]);
        }
        Ok(&t.piece)
    }

    /// The text of `ids`: their pieces (see [`Tokenizer::token_to_piece`]), concatenated, with
    /// the first piece's leading space dropped when [`Tokenizer::add_space_prefix`] is set
    /// (llama.cpp's `llama_detokenize` with `remove_special = false`; see
    /// [`Tokenizer::detokenize_with`]). The result may contain invalid UTF-8 where a character
    /// was cut; use [`String::from_utf8_lossy`] or a [`StreamDecoder`].
    pub fn detokenize(&self, ids: &[TokenId], special: bool) -> Result<Vec<u8>, TokenizerError> {
        self.detokenize_with(ids, false, special)
    }

    /// llama.cpp's `llama_detokenize(ids, remove_special, unparse_special)`:
    /// - with `remove_special`, a leading BOS is dropped if the model adds BOS, and a trailing
    ///   EOS if it adds EOS;
    /// - with [`Tokenizer::add_space_prefix`], one leading space is stripped from the first
    ///   remaining token's piece, but not when a BOS was dropped (llama.cpp's rule: the space
    ///   after a removed BOS is kept). A BOS that is kept is itself the first piece, so
    ///   then nothing is stripped either;
    /// - pieces are [`Tokenizer::token_to_piece`] with `special = unparse_special`.
    ///
    /// Not reproduced: the `clean_spaces` clean-up (removing spaces before `?!.,` and in
    /// contractions) that llama.cpp applies for some byte-level BPE pre-tokenizers; it never
    /// applies to SentencePiece or to SmolLM2's `smollm`.
    pub fn detokenize_with(
        &self,
        ids: &[TokenId],
        remove_special: bool,
        unparse_special: bool,
    ) -> Result<Vec<u8>, TokenizerError> {
        let mut ids = ids;
        let mut strip_space = self.add_space_prefix;
        if remove_special && self.add_bos {
            if let Some((&first, rest)) = ids.split_first() {
                if Some(first) == self.special.bos {
                    strip_space = false;
                    ids = rest;
                }
            }
        }
        if remove_special && self.add_eos {
            if let Some((&last, rest)) = ids.split_last() {
                if Some(last) == self.special.eos {
                    ids = rest;
                }
            }
        }
        let mut out = Vec::new();
        for &id in ids {
            let mut piece = self.token_to_piece(id, unparse_special)?;
            if strip_space {
                piece = piece.strip_prefix(b" ").unwrap_or(piece);
                strip_space = false;
            }
            out.extend_from_slice(piece);
        }
        Ok(out)
    }

    /// A decoder that turns tokens into text one at a time, holding back incomplete UTF-8.
    pub fn stream_decoder(&self, special: bool) -> StreamDecoder<'_> {
        StreamDecoder::new(self, special)
    }

    /// Number of tokens in the vocabulary.
    pub fn n_vocab(&self) -> usize {
        self.vocab.tokens.len()
    }

    /// `tokenizer.ggml.model`.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// The pre-tokenizer in use. SentencePiece has none; for it this is `Default`, which is
    /// what llama.cpp records.
    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }

    /// Whether `tokenize(.., add_special = true, ..)` adds BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `tokenize(.., add_special = true, ..)` adds EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Whether the tokenizer puts a space in front of the text and of every text fragment
    /// after a special token (SentencePiece's dummy prefix), and so detokenization drops the
    /// first piece's leading space. `tokenizer.ggml.add_space_prefix`, by default true for
    /// SentencePiece and false for byte-level BPE (where it only affects detokenization).
    pub fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// Ids of the tokens with special roles.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// The beginning-of-sequence token.
    pub fn bos(&self) -> Option<TokenId> {
        self.special.bos
    }

    /// The end-of-sequence token.
    pub fn eos(&self) -> Option<TokenId> {
        self.special.eos
    }

    /// Whether generation should stop at `id` (EOS, EOT, EOM and tokens like `<|im_end|>`).
    pub fn is_eog(&self, id: TokenId) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation tokens, ascending.
    pub fn eog_tokens(&self) -> &[TokenId] {
        &self.eog
    }

    /// The stored text of token `id` (for byte-level BPE, in GPT-2's byte alphabet; for
    /// SentencePiece, with spaces as '▁').
    pub fn token_text(&self, id: TokenId) -> Result<&str, TokenizerError> {
        Ok(&self.token(id)?.text)
    }

    /// The token's type from the file.
    pub fn token_type(&self, id: TokenId) -> Result<TokenType, TokenizerError> {
        Ok(self.token(id)?.ty)
    }

    /// The token's score (`tokenizer.ggml.scores`, 0 when absent).
    pub fn token_score(&self, id: TokenId) -> Result<f32, TokenizerError> {
        Ok(self.token(id)?.score)
    }

    /// Whether `id` is treated as a control token (typed so, or detected from its text).
    pub fn is_control(&self, id: TokenId) -> Result<bool, TokenizerError> {
        Ok(self.token(id)?.attr & attr::CONTROL != 0)
    }

    /// The token whose stored text is exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<TokenId> {
        self.vocab.token_to_id.get(text).copied()
    }

    fn token(&self, id: TokenId) -> Result<&TokenData, TokenizerError> {
        self.vocab
            .tokens
            .get(id as usize)
            .ok_or(TokenizerError::InvalidToken { id, n_vocab: self.vocab.tokens.len() })
    }
}

/// The metadata arrays a [`Tokenizer`] copies into its own tables: a model that keeps its file
/// can drop them once its tokenizer is built.
pub const COPIED_ARRAYS: &[&str] = &[
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.merges",
];

fn read_vocab(md: &Metadata) -> Result<Vocab, TokenizerError> {
    let texts = md.get_str_array("tokenizer.ggml.tokens")?;
    let n = texts.len();
    if n == 0 {
        return Err(TokenizerError::EmptyVocab);
    }
    if n > i32::MAX as usize {
        return Err(TokenizerError::VocabTooLarge(n));
    }
    let types = md.opt_i32_array("tokenizer.ggml.token_type")?;
    if let Some(t) = types {
        if t.len() < n {
            return Err(TokenizerError::ShortArray {
                key: "tokenizer.ggml.token_type",
                found: t.len(),
                n_vocab: n,
            });
        }
    }
    let scores: Option<Vec<f32>> = match md.opt_array("tokenizer.ggml.scores")? {
        None => None,
        Some(crate::gguf::Array::F32(v)) => Some(v.clone()),
        Some(crate::gguf::Array::I32(v)) => Some(v.iter().map(|&s| s as f32).collect()),
        Some(_) => {
            return Err(GgufError::WrongType {
                key: "tokenizer.ggml.scores".into(),
                expected: "array[f32]",
                found: md
                    .get("tokenizer.ggml.scores")
                    .map(|v| v.type_description())
                    .unwrap_or_default(),
            }
            .into())
        }
    };
    if let Some(s) = &scores {
        if s.len() < n {
            return Err(TokenizerError::ShortArray {
                key: "tokenizer.ggml.scores",
                found: s.len(),
                n_vocab: n,
            });
        }
    }
    let mut tokens = Vec::with_capacity(n);
    let mut token_to_id = HashMap::with_capacity(n);
    for (i, text) in texts.iter().enumerate() {
        // llama.cpp gives empty tokens a placeholder text, so they can never match.
        let text: Box<str> = if text.is_empty() {
            log::warn!("empty token at index {i}");
            format!("[EMPTY_{i}]").into()
        } else {
            text.as_str().into()
        };
        let ty = types.map_or(TokenType::Normal, |t| TokenType::from_gguf(t[i]));
        token_to_id.insert(text.clone(), i as TokenId);
        tokens.push(TokenData {
            text,
            score: scores.as_ref().map_or(0.0, |s| s[i]),
            ty,
            attr: attr::of(ty),
            piece: Box::default(),
        });
    }
    Ok(Vocab { tokens, token_to_id })
}

/// llama.cpp's text-based detection: fill unset EOT/EOM/FIM ids from well-known token texts,
/// mark those tokens and the end-of-generation texts as control, and return the sorted set of
/// end-of-generation tokens. Where several tokens match a role, the lowest id is taken
/// (llama.cpp takes whichever its hash map yields first).
fn detect_by_text(vocab: &mut Vocab, special: &mut SpecialTokens) -> Vec<TokenId> {
    let find = |texts: &[&str]| -> Option<TokenId> {
        texts.iter().filter_map(|t| vocab.token_to_id.get(*t).copied()).min()
    };
    let mut eog = Vec::new();
    let mut make_control = Vec::new();
    let roles: [(&mut Option<TokenId>, &[&str], bool); 8] = [
        (&mut special.eot, EOT_TEXTS, false),
        (&mut special.eom, EOM_TEXTS, false),
        (&mut special.fim_pre, FIM_PRE_TEXTS, false),
        (&mut special.fim_suf, FIM_SUF_TEXTS, false),
        (&mut special.fim_mid, FIM_MID_TEXTS, false),
        (&mut special.fim_pad, FIM_PAD_TEXTS, true),
        (&mut special.fim_rep, FIM_REP_TEXTS, true),
        (&mut special.fim_sep, FIM_SEP_TEXTS, true),
    ];
    for (slot, texts, ends_generation) in roles {
        if slot.is_none() {
            if let Some(id) = find(texts) {
                *slot = Some(id);
                make_control.push(id);
            }
        }
        if ends_generation {
            eog.extend(*slot);
        }
    }
    for t in EOG_TEXTS {
        if let Some(&id) = vocab.token_to_id.get(*t) {
            eog.push(id);
            make_control.push(id);
        }
    }
    for id in make_control {
        let t = &mut vocab.tokens[id as usize];
        if t.attr & attr::CONTROL == 0 {
            log::warn!("token {id} {:?} looks like a control token; treating it as one", t.text);
            t.attr |= attr::CONTROL;
        }
    }
    eog.extend(special.eos);
    eog.extend(special.eot);
    eog.extend(special.eom);
    eog.sort_unstable();
    eog.dedup();
    eog
}

/// How SentencePiece writes a space in token texts: U+2581 LOWER ONE EIGHTH BLOCK.
const SPACE_ESCAPE: char = '\u{2581}';

/// The bytes a token renders as (with special tokens shown), for byte-level BPE or (`spm`)
/// SentencePiece.
fn render_piece(text: &str, a: u16, spm: bool) -> Vec<u8> {
    if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
        return text.as_bytes().to_vec();
    }
    if a & attr::NORMAL != 0 && spm {
        return text.replace(SPACE_ESCAPE, " ").into_bytes();
    }
    if a & attr::NORMAL != 0 {
        let mut out = Vec::with_capacity(text.len());
        for c in text.chars() {
            match unicode::char_to_byte(c) {
                Some(b) => out.push(b),
                None => {
                    // Not a byte character: llama.cpp writes a marker with the character's
                    // UTF-8 bytes and the whole token text.
                    out.extend_from_slice(b"[UNK_BYTE_0x");
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.extend_from_slice(format!("{b:02x}").as_bytes());
                    }
                    out.extend_from_slice(text.as_bytes());
                    out.push(b']');
                }
            }
        }
        return out;
    }
    if a & attr::BYTE != 0 {
        // "<0xAB>": the two hex digits after "<0x" (a missing or bad digit reads as 0).
        let hex = text.as_bytes().get(3..text.len().min(5)).unwrap_or_default();
        let digits: String =
            hex.iter().take_while(|b| b.is_ascii_hexdigit()).map(|&b| char::from(b)).collect();
        return vec![u8::from_str_radix(&digits, 16).unwrap_or(0)];
    }
    Vec::new()
}
