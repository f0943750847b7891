//! The vocabulary a model's welcome carries: every token's bytes and flags, so that clients
//! turn tokens back into text locally, without a round trip per token.
//!
//! Layout of the sealed memfd (little-endian):
//!
//! | field | size |
//! |---|---|
//! | magic "UNIV", version, token count `n`, blob length | 4 x `u32` |
//! | offsets into the blob, `n + 1` of them, non-decreasing, the last equal to the blob length | `(n + 1) x u32` |
//! | flags per token ([`CONTROL`], [`EOG`]) | `n` bytes, padded to a multiple of 4 |
//! | the pieces, back to back | blob length |

use crate::error::Error;

/// "UNIV", little-endian.
pub const VOCAB_MAGIC: u32 = u32::from_le_bytes(*b"UNIV");
pub const VOCAB_VERSION: u32 = 1;
/// Flag: a control token, shown only when special tokens are asked for.
pub const CONTROL: u8 = 1;
/// Flag: a token that ends generation.
pub const EOG: u8 = 2;

/// A model's vocabulary, for detokenizing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vocab {
    offsets: Vec<u32>,
    flags: Vec<u8>,
    blob: Vec<u8>,
}

impl Vocab {
    /// Builds a vocabulary from each token's bytes (as shown with special tokens) and flags.
    pub fn new<'a>(tokens: impl IntoIterator<Item = (&'a [u8], u8)>) -> Vocab {
        let mut v = Vocab { offsets: vec![0], flags: Vec::new(), blob: Vec::new() };
        for (piece, flags) in tokens {
            v.blob.extend_from_slice(piece);
            v.offsets.push(u32::try_from(v.blob.len()).expect("vocabularies are far below 4 GiB"));
            v.flags.push(flags);
        }
        v
    }

    pub fn len(&self) -> usize {
        self.flags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    /// The bytes of token `id` (possibly a partial UTF-8 sequence); empty for control tokens
    /// unless `special`; `None` for an id outside the vocabulary.
    pub fn piece(&self, id: u32, special: bool) -> Option<&[u8]> {
        let i = usize::try_from(id).ok()?;
        let flags = *self.flags.get(i)?;
        if flags & CONTROL != 0 && !special {
            return Some(&[]);
        }
        let (a, b) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        Some(&self.blob[a..b])
    }

    /// Whether token `id` ends generation.
    pub fn is_eog(&self, id: u32) -> bool {
        usize::try_from(id).ok().and_then(|i| self.flags.get(i)).is_some_and(|f| f & EOG != 0)
    }

    pub fn encode(&self) -> Vec<u8> {
        let n = self.flags.len();
        let mut out = Vec::with_capacity(16 + 4 * (n + 1) + n + 3 + self.blob.len());
        for w in [VOCAB_MAGIC, VOCAB_VERSION, n as u32, self.blob.len() as u32] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        for o in &self.offsets {
            out.extend_from_slice(&o.to_le_bytes());
        }
        out.extend_from_slice(&self.flags);
        out.resize(out.len() + (4 - n % 4) % 4, 0);
        out.extend_from_slice(&self.blob);
        out
    }

    /// Decodes and checks a vocabulary.
    pub fn decode(bytes: &[u8]) -> Result<Vocab, Error> {
        let word = |i: usize| -> Result<u32, Error> {
            let b = bytes
                .get(i * 4..i * 4 + 4)
                .ok_or_else(|| Error::protocol("vocabulary ends early"))?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if word(0)? != VOCAB_MAGIC || word(1)? != VOCAB_VERSION {
            return Err(Error::protocol("not a unicorn vocabulary (magic or version)"));
        }
        let n = word(2)? as usize;
        let blob_len = word(3)? as usize;
        let flags_at = 16usize
            .checked_add(
                n.checked_add(1)
                    .and_then(|m| m.checked_mul(4))
                    .ok_or_else(|| Error::protocol("vocabulary size"))?,
            )
            .ok_or_else(|| Error::protocol("vocabulary size"))?;
        let blob_at = flags_at + n + (4 - n % 4) % 4;
        if bytes.len()
            != blob_at.checked_add(blob_len).ok_or_else(|| Error::protocol("vocabulary size"))?
        {
            return Err(Error::protocol("vocabulary length does not match its header"));
        }
        let offsets: Vec<u32> = (0..=n).map(|i| word(4 + i)).collect::<Result<_, _>>()?;
        if offsets[0] != 0
            || offsets[n] as usize != blob_len
            || offsets.windows(2).any(|w| w[0] > w[1])
        {
            return Err(Error::protocol("vocabulary offsets are not ordered within the blob"));
        }
        Ok(Vocab {
            offsets,
            flags: bytes[flags_at..flags_at + n].to_vec(),
            blob: bytes[blob_at..].to_vec(),
        })
    }
}

/// Turns a stream of token pieces into text, holding back an incomplete UTF-8 sequence until
/// the bytes that complete it arrive. Invalid bytes become U+FFFD.
#[derive(Clone, Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn new() -> Utf8Stream {
        Utf8Stream::default()
    }

    /// Adds bytes; returns the text that is complete so far.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[..good]).expect("checked prefix"),
                    );
                    match e.error_len() {
                        // An incomplete sequence at the end: keep it for the next piece.
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..good + bad);
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: whatever is still held back comes out (invalid bytes as U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_lookup() {
        let v =
            Vocab::new([(&b"<s>"[..], CONTROL), (b"hello", 0), (b"\xE2\x82", 0), (b"\xAC", EOG)]);
        let back = Vocab::decode(&v.encode()).unwrap();
        assert_eq!(back, v);
        assert_eq!(back.piece(0, false), Some(&b""[..]));
        assert_eq!(back.piece(0, true), Some(&b"<s>"[..]));
        assert_eq!(back.piece(1, false), Some(&b"hello"[..]));
        assert_eq!(back.piece(4, true), None);
        assert!(back.is_eog(3) && !back.is_eog(1) && !back.is_eog(99));
    }

    #[test]
    fn corrupt_vocabularies_are_errors() {
        let good = Vocab::new([(&b"ab"[..], 0), (b"c", 0)]).encode();
        for cut in 0..good.len() {
            assert!(Vocab::decode(&good[..cut]).is_err(), "cut {cut}");
        }
        let mut bad = good.clone();
        bad[16 + 4..16 + 8].copy_from_slice(&9u32.to_le_bytes()); // offset beyond the blob
        assert!(Vocab::decode(&bad).is_err());
        let mut huge = good.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Vocab::decode(&huge).is_err());
    }

    #[test]
    fn utf8_stream_holds_back_partial_sequences() {
        let mut s = Utf8Stream::new();
        assert_eq!(s.push(b"a\xE2"), "a");
        assert_eq!(s.push(b"\x82"), "");
        assert_eq!(s.push(b"\xACb"), "\u{20AC}b");
        assert_eq!(s.push(b"\xFFc"), "\u{FFFD}c");
        assert_eq!(s.push(b"\xF0\x9F"), "");
        assert_eq!(s.finish(), "\u{FFFD}");
    }
}
