//! Streaming detokenization: token pieces are bytes, and a character may be split across
//! tokens (an emoji is often 2-4 byte tokens), so text is released only as complete UTF-8.
//!
//! An incomplete sequence at the end is held back until the next piece completes it. Bytes that
//! can never become valid UTF-8 (a stray continuation byte, an invalid lead byte, a sequence
//! interrupted by a new lead byte) are replaced by U+FFFD at once, one per maximal invalid
//! subpart as [`String::from_utf8_lossy`] does, so the output is always valid UTF-8 and the
//! held-back part never exceeds 3 bytes.

use super::{TokenId, Tokenizer, TokenizerError};

/// Turns a stream of byte chunks into a stream of complete UTF-8 text.
#[derive(Clone, Debug, Default)]
pub struct Utf8Assembler {
    pending: Vec<u8>,
}

impl Utf8Assembler {
    /// A new assembler with nothing held back.
    pub fn new() -> Utf8Assembler {
        Utf8Assembler::default()
    }

    /// Add `bytes`; return the text that is now complete (possibly empty).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        let mut out = String::new();
        self.push_into(bytes, &mut out);
        out
    }

    /// Like [`Utf8Assembler::push`], appending to `out`.
    pub fn push_into(&mut self, bytes: &[u8], out: &mut String) {
        self.pending.extend_from_slice(bytes);
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid` is valid UTF-8 by the definition of `valid_up_to`.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete sequence at the end: keep it for the next push.
                        None => {
                            rest = after;
                            break;
                        }
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let drop = self.pending.len() - keep;
        self.pending.drain(..drop);
    }

    /// Bytes held back (an incomplete UTF-8 sequence, at most 3 bytes).
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// End of stream: an incomplete sequence still held back becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

/// Detokenizes one token at a time, emitting only complete UTF-8.
#[derive(Debug)]
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    special: bool,
    text: Utf8Assembler,
}

impl<'t> StreamDecoder<'t> {
    pub(crate) fn new(tokenizer: &'t Tokenizer, special: bool) -> StreamDecoder<'t> {
        StreamDecoder { tokenizer, special, text: Utf8Assembler::new() }
    }

    /// Add token `id`; return the text it completes (possibly empty).
    pub fn push(&mut self, id: TokenId) -> Result<String, TokenizerError> {
        let piece = self.tokenizer.token_to_piece(id, self.special)?;
        Ok(self.text.push(piece))
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending(&self) -> &[u8] {
        self.text.pending()
    }

    /// End of stream: whatever is held back, as U+FFFD.
    pub fn finish(&mut self) -> String {
        self.text.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_split_characters() {
        let crab = "🦀".as_bytes(); // f0 9f a6 80
        let mut a = Utf8Assembler::new();
        assert_eq!(a.push(b"a"), "a");
        assert_eq!(a.push(&crab[..1]), "");
        assert_eq!(a.push(&crab[1..3]), "");
        assert_eq!(a.pending(), &crab[..3]);
        assert_eq!(a.push(&[crab[3], b'b']), "🦀b");
        assert!(a.pending().is_empty());
    }

    #[test]
    fn replaces_invalid_bytes_at_once() {
        let mut a = Utf8Assembler::new();
        // A stray continuation byte, then a lead byte interrupted by ASCII.
        assert_eq!(a.push(&[0x80, b'x', 0xE2, 0x82]), "\u{FFFD}x");
        assert_eq!(a.pending(), &[0xE2, 0x82]);
        assert_eq!(a.push(b"y"), "\u{FFFD}y");
        assert_eq!(a.push(&[0xFF]), "\u{FFFD}");
        assert_eq!(a.push(&[0xC3]), "");
        assert_eq!(a.finish(), "\u{FFFD}");
        assert!(a.pending().is_empty());
    }

    #[test]
    fn matches_lossy_decoding_when_fed_byte_by_byte() {
        let inputs: [&[u8]; 4] = [
            "héllo wörld 你好 👍🏽".as_bytes(),
            &[0xF0, 0x9F, 0x41, 0xC0, 0xAF, 0xED, 0xA0, 0x80, 0x42],
            &[0xE0, 0x80, 0x80, 0xF4, 0x90, 0x80, 0x80],
            &[0xF0, 0x9F, 0xA6],
        ];
        for input in inputs {
            let mut a = Utf8Assembler::new();
            let mut out = String::new();
            for &b in input {
                out.push_str(&a.push(&[b]));
            }
            out.push_str(&a.finish());
            assert_eq!(out, String::from_utf8_lossy(input), "{input:02x?}");
        }
    }
}
