//! Byte-level BPE (`tokenizer.ggml.model = gpt2`): GPT-2 byte encoding and rank-ordered merges.
//!
//! A word from the pre-tokenizer is first byte-encoded: each UTF-8 byte becomes one character of
//! GPT-2's byte alphabet (the alphabet the vocabulary and merges are written in). The word starts
//! as one symbol per byte; the adjacent pair with the lowest merge rank (ties: leftmost) is merged
//! repeatedly, using a priority queue over a linked list of symbols, so a word of n bytes costs
//! O(n log n). Stale queue entries (a side merged meanwhile) are recognised by their lengths.
//! A final symbol that is not in the vocabulary falls back to single-byte tokens, as llama.cpp
//! does (which drops bytes that have no single-character token).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::unicode::BYTE_TO_CHAR;
use super::{TokenId, Vocab};

/// Index of an interned string (a vocabulary token text or a merge half).
type PieceId = u32;

#[derive(Clone, Copy, Debug)]
struct Merge {
    rank: u32,
    /// The merged string's piece, if it is interned (else it can never merge further).
    result: Option<PieceId>,
}

/// The merge table and the interned strings it refers to.
#[derive(Debug)]
pub(crate) struct Bpe {
    /// The token each piece is, if it is a vocabulary token.
    piece_token: Vec<Option<TokenId>>,
    merges: HashMap<(PieceId, PieceId), Merge>,
    /// The piece of each byte's one-character encoding.
    byte_piece: [Option<PieceId>; 256],
    /// Emit a word that is a whole vocabulary token without merging (Llama 3).
    ignore_merges: bool,
}

#[derive(Clone, Copy, Debug)]
struct Symbol {
    /// Byte range in the encoded word.
    start: u32,
    len: u32,
    prev: u32,
    next: u32,
    piece: Option<PieceId>,
}

const NIL: u32 = u32::MAX;

impl Bpe {
    /// Build from merge strings (`"left right"`) and the vocabulary. As in llama.cpp, a merge
    /// splits at the first space after its first byte, a merge without such a space counts as
    /// the pair ("", ""), and of duplicate merges the first (lowest) rank wins.
    pub(crate) fn new(merges: &[String], vocab: &Vocab, ignore_merges: bool) -> Bpe {
        let mut pieces: HashMap<Box<str>, PieceId> = HashMap::new();
        let mut piece_token: Vec<Option<TokenId>> = Vec::new();
        let mut intern = |s: &str| -> PieceId {
            if let Some(&p) = pieces.get(s) {
                return p;
            }
            let p = piece_token.len() as PieceId;
            pieces.insert(s.into(), p);
            piece_token.push(vocab.token_to_id.get(s).copied());
            p
        };
        for t in &vocab.tokens {
            intern(&t.text);
        }
        let mut pairs = Vec::with_capacity(merges.len());
        for m in merges {
            // The search starts at byte 1 (not character 1), so a leading space is part of
            // the left half; a space byte is always a character boundary.
            let split = m.as_bytes().iter().skip(1).position(|&b| b == b' ');
            let (a, b) = match split {
                Some(i) => (&m[..i + 1], &m[i + 2..]),
                None => ("", ""),
            };
            pairs.push((intern(a), intern(b), format!("{a}{b}")));
        }
        let mut table = HashMap::with_capacity(pairs.len());
        for (rank, (a, b, joined)) in pairs.into_iter().enumerate() {
            table.entry((a, b)).or_insert(Merge {
                rank: rank as u32,
                result: pieces.get(joined.as_str()).copied(),
            });
        }
        let mut byte_piece = [None; 256];
        let mut buf = [0u8; 4];
        for (b, bp) in byte_piece.iter_mut().enumerate() {
            *bp = pieces.get(BYTE_TO_CHAR[b].encode_utf8(&mut buf) as &str).copied();
        }
        Bpe { piece_token, merges: table, byte_piece, ignore_merges }
    }

    /// Number of distinct merges.
    pub(crate) fn n_merges(&self) -> usize {
        self.merges.len()
    }

    /// Tokenize one pre-tokenized word, appending to `out`.
    pub(crate) fn encode_word(&self, word: &str, vocab: &Vocab, out: &mut Vec<TokenId>) {
        if word.is_empty() {
            return;
        }
        let mut encoded = String::with_capacity(word.len() * 2);
        for &b in word.as_bytes() {
            encoded.push(BYTE_TO_CHAR[b as usize]);
        }
        if self.ignore_merges {
            if let Some(&id) = vocab.token_to_id.get(encoded.as_str()) {
                out.push(id);
                return;
            }
        }
        let mut syms: Vec<Symbol> = Vec::with_capacity(word.len());
        let mut start = 0u32;
        for (i, &b) in word.as_bytes().iter().enumerate() {
            let len = BYTE_TO_CHAR[b as usize].len_utf8() as u32;
            syms.push(Symbol {
                start,
                len,
                prev: if i == 0 { NIL } else { i as u32 - 1 },
                next: if i + 1 == word.len() { NIL } else { i as u32 + 1 },
                piece: self.byte_piece[b as usize],
            });
            start += len;
        }

        // (rank, left, right, combined length): popped lowest rank first, then leftmost.
        let mut queue: BinaryHeap<Reverse<(u32, u32, u32, u32)>> = BinaryHeap::new();
        let push = |queue: &mut BinaryHeap<_>, syms: &[Symbol], l: u32, r: u32| {
            if l == NIL || r == NIL {
                return;
            }
            let (ls, rs) = (&syms[l as usize], &syms[r as usize]);
            if let (Some(a), Some(b)) = (ls.piece, rs.piece) {
                if let Some(m) = self.merges.get(&(a, b)) {
                    queue.push(Reverse((m.rank, l, r, ls.len + rs.len)));
                }
            }
        };
        for i in 1..syms.len() as u32 {
            push(&mut queue, &syms, i - 1, i);
        }
        while let Some(Reverse((_, l, r, total))) = queue.pop() {
            let (ls, rs) = (syms[l as usize], syms[r as usize]);
            // Stale: one side was merged away, or grew, since this pair was queued.
            if ls.len == 0 || rs.len == 0 || ls.next != r || ls.len + rs.len != total {
                continue;
            }
            let (a, b) = (ls.piece.unwrap_or(0), rs.piece.unwrap_or(0));
            let result = self.merges.get(&(a, b)).and_then(|m| m.result);
            let left = &mut syms[l as usize];
            left.len += rs.len;
            left.next = rs.next;
            left.piece = result;
            syms[r as usize].len = 0;
            if rs.next != NIL {
                syms[rs.next as usize].prev = l;
            }
            push(&mut queue, &syms, ls.prev, l);
            push(&mut queue, &syms, l, rs.next);
        }

        let mut i = 0u32;
        while i != NIL {
            let s = &syms[i as usize];
            match s.piece.and_then(|p| self.piece_token[p as usize]) {
                Some(id) => out.push(id),
                None => {
                    // Not a token: each byte of the encoded text on its own. Only ASCII bytes
                    // can be single-character tokens; the others are dropped, like llama.cpp.
                    let text = &encoded[s.start as usize..(s.start + s.len) as usize];
                    for &b in text.as_bytes() {
                        if b.is_ascii() {
                            let mut buf = [0u8; 4];
                            let one = char::from(b).encode_utf8(&mut buf);
                            if let Some(&id) = vocab.token_to_id.get(one as &str) {
                                out.push(id);
                            }
                        }
                    }
                }
            }
            i = s.next;
        }
    }
}
