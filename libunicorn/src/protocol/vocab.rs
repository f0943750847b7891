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
//!
//! A client reads the daemon's memfd in place ([`Vocab::from_memfd`]) instead of copying it:
//! every client of a model shares its pages, and only those of the tokens a client turns into
//! text are ever read (a 262,144-token vocabulary is 4 MB). So loading checks the header and the
//! length only, and each lookup checks the two offsets it reads.

use std::os::fd::AsFd;

use memmap2::Mmap;

use crate::error::Error;
use crate::sys::memfd;

/// "UNIV", little-endian.
pub const VOCAB_MAGIC: u32 = u32::from_le_bytes(*b"UNIV");
pub const VOCAB_VERSION: u32 = 1;
/// Flag: a control token, shown only when special tokens are asked for.
pub const CONTROL: u8 = 1;
/// Flag: a token that ends generation.
pub const EOG: u8 = 2;

/// Where a vocabulary's bytes (the whole layout above) are.
#[derive(Debug)]
enum Bytes {
    Owned(Vec<u8>),
    /// A write-sealed memfd, mapped read-only.
    Mapped(Mmap),
}

/// A model's vocabulary, for detokenizing.
#[derive(Debug)]
pub struct Vocab {
    bytes: Bytes,
    n: usize,
    blob_len: usize,
    flags_at: usize,
    blob_at: usize,
}

impl PartialEq for Vocab {
    fn eq(&self, other: &Vocab) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Vocab {}

impl Vocab {
    /// Builds a vocabulary from each token's bytes (as shown with special tokens) and flags.
    pub fn new<'a>(tokens: impl IntoIterator<Item = (&'a [u8], u8)>) -> Vocab {
        let (mut offsets, mut flags, mut blob) = (vec![0u32], Vec::new(), Vec::new());
        for (piece, f) in tokens {
            blob.extend_from_slice(piece);
            offsets.push(u32::try_from(blob.len()).expect("vocabularies are far below 4 GiB"));
            flags.push(f);
        }
        let n = flags.len();
        let mut out = Vec::with_capacity(16 + 4 * (n + 1) + n + 3 + blob.len());
        for w in [VOCAB_MAGIC, VOCAB_VERSION, n as u32, blob.len() as u32] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        for o in &offsets {
            out.extend_from_slice(&o.to_le_bytes());
        }
        out.extend_from_slice(&flags);
        out.resize(out.len() + (4 - n % 4) % 4, 0);
        out.extend_from_slice(&blob);
        Vocab::parse(Bytes::Owned(out)).expect("a vocabulary just laid out is well formed")
    }

    /// A vocabulary in a copy of `bytes` (its layout's header and length checked).
    pub fn decode(bytes: &[u8]) -> Result<Vocab, Error> {
        Vocab::parse(Bytes::Owned(bytes.to_vec()))
    }

    /// The vocabulary in the daemon's memfd, read in place: the memfd must be sealed against
    /// writing and resizing, so that its bytes cannot change or go away under the mapping.
    pub fn from_memfd(fd: &impl AsFd) -> Result<Vocab, Error> {
        Vocab::parse(Bytes::Mapped(memfd::map_sealed(fd)?))
    }

    fn parse(bytes: Bytes) -> Result<Vocab, Error> {
        let b = match &bytes {
            Bytes::Owned(v) => &v[..],
            Bytes::Mapped(m) => &m[..],
        };
        let word = |i: usize| -> Result<usize, Error> {
            let w =
                b.get(i * 4..i * 4 + 4).ok_or_else(|| Error::protocol("vocabulary ends early"))?;
            Ok(u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize)
        };
        if word(0)? != VOCAB_MAGIC as usize || word(1)? != VOCAB_VERSION as usize {
            return Err(Error::protocol("not a unicorn vocabulary (magic or version)"));
        }
        let (n, blob_len) = (word(2)?, word(3)?);
        let size = || Error::protocol("vocabulary size");
        let flags_at = n
            .checked_add(1)
            .and_then(|m| m.checked_mul(4))
            .and_then(|m| m.checked_add(16))
            .ok_or_else(size)?;
        let blob_at = flags_at.checked_add(n.next_multiple_of(4)).ok_or_else(size)?;
        if b.len() != blob_at.checked_add(blob_len).ok_or_else(size)? {
            return Err(Error::protocol("vocabulary length does not match its header"));
        }
        Ok(Vocab { bytes, n, blob_len, flags_at, blob_at })
    }

    /// The layout's bytes, as the daemon writes them into the memfd.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Owned(v) => v,
            Bytes::Mapped(m) => m,
        }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn flags(&self, id: u32) -> Option<u8> {
        let i = usize::try_from(id).ok().filter(|&i| i < self.n)?;
        Some(self.as_bytes()[self.flags_at + i])
    }

    /// The bytes of token `id` (possibly a partial UTF-8 sequence); empty for control tokens
    /// unless `special`; `None` for an id outside the vocabulary, or whose offsets are out of
    /// order or beyond the pieces (a corrupt vocabulary).
    pub fn piece(&self, id: u32, special: bool) -> Option<&[u8]> {
        let flags = self.flags(id)?;
        if flags & CONTROL != 0 && !special {
            return Some(&[]);
        }
        let b = self.as_bytes();
        let offset = |i: usize| {
            let w: [u8; 4] = b[16 + 4 * i..20 + 4 * i].try_into().unwrap();
            u32::from_le_bytes(w) as usize
        };
        let (start, end) = (offset(id as usize), offset(id as usize + 1));
        if start > end || end > self.blob_len {
            return None;
        }
        Some(&b[self.blob_at + start..self.blob_at + end])
    }

    /// Whether token `id` ends generation.
    pub fn is_eog(&self, id: u32) -> bool {
        self.flags(id).is_some_and(|f| f & EOG != 0)
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
        let back = Vocab::decode(v.as_bytes()).unwrap();
        assert_eq!(back, v);
        assert_eq!(back.len(), 4);
        assert_eq!(back.piece(0, false), Some(&b""[..]));
        assert_eq!(back.piece(0, true), Some(&b"<s>"[..]));
        assert_eq!(back.piece(1, false), Some(&b"hello"[..]));
        assert_eq!(back.piece(3, false), Some(&b"\xAC"[..]));
        assert_eq!(back.piece(4, true), None);
        assert_eq!(back.piece(u32::MAX, true), None);
        assert!(back.is_eog(3) && !back.is_eog(1) && !back.is_eog(99));
    }

    #[test]
    fn corrupt_vocabularies_are_errors_or_absent_tokens() {
        let good = Vocab::new([(&b"ab"[..], 0), (b"c", 0)]).as_bytes().to_vec();
        for cut in 0..good.len() {
            assert!(Vocab::decode(&good[..cut]).is_err(), "cut {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(Vocab::decode(&long).is_err());
        let mut huge = good.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Vocab::decode(&huge).is_err());
        // Offsets are checked where they are read: a bad one loses its tokens, not the rest.
        let mut bad = good.clone();
        bad[16 + 4..16 + 8].copy_from_slice(&9u32.to_le_bytes()); // beyond the blob
        let v = Vocab::decode(&bad).unwrap();
        assert_eq!((v.piece(0, true), v.piece(1, true)), (None, None));
        let mut bad = good.clone();
        bad[16 + 8..16 + 12].copy_from_slice(&1u32.to_le_bytes()); // before the one it follows
        let v = Vocab::decode(&bad).unwrap();
        assert_eq!((v.piece(0, true), v.piece(1, true)), (Some(&b"ab"[..]), None));
    }

    #[test]
    fn a_write_sealed_memfd_is_read_in_place() {
        use nix::fcntl::SealFlag;
        use std::os::unix::fs::FileExt;
        let v = Vocab::new([(&b"<s>"[..], CONTROL), (b"hello", EOG)]);
        let fd = memfd::create_memfd("vocab-test", v.as_bytes().len()).unwrap();
        let file = std::fs::File::from(fd);
        file.write_all_at(v.as_bytes(), 0).unwrap();
        memfd::add_seals(&file, memfd::REQUIRED_SEALS).unwrap();
        let err = Vocab::from_memfd(&file).unwrap_err();
        assert!(err.to_string().contains("F_SEAL_WRITE"), "{err}");
        memfd::add_seals(&file, SealFlag::F_SEAL_WRITE).unwrap();
        let mapped = Vocab::from_memfd(&file).unwrap();
        assert_eq!(mapped, v);
        assert_eq!(mapped.piece(1, false), Some(&b"hello"[..]));
        assert!(mapped.is_eog(1));
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
