//! SentencePiece BPE (`tokenizer.ggml.model = llama`): score-ordered merges with byte fallback.
//!
//! There is no pre-tokenizer: each text fragment left by the special-token partition is one
//! input, with its spaces already escaped as U+2581 '▁' (and, with `add_space_prefix`, a '▁'
//! put in front; see [`super::Tokenizer::tokenize`]). The fragment starts as one symbol per
//! character. Every adjacent pair whose concatenated text is a vocabulary token is a candidate;
//! the candidate with the highest token score is merged first (ties: the leftmost), and the
//! merged symbol makes new candidates with its neighbours. As in the byte-level BPE, a priority
//! queue over a linked list of symbols does this in O(n log n); a stale queue entry (a side
//! merged meanwhile) is recognised by its combined length.
//!
//! Every merge yields a vocabulary token, so a final symbol is either a token or a single
//! character that is not one. llama.cpp's resegmentation (splitting a symbol that is not a token
//! back into the pair it was merged from) therefore never applies and is not needed here. A
//! character that is not a token falls back to its UTF-8 bytes, each as the byte token `<0xXX>`
//! (upper-case hex; llama.cpp's `byte_to_token`). That function next tries the token whose text
//! is the one byte, which never exists here: such a byte is an ASCII character, and had it been
//! a token it would have been found as itself.
//!
//! Where a byte has no token, llama.cpp throws; here the whole character becomes the unknown
//! token instead (nothing if there is none), as SentencePiece does for an unknown piece without
//! byte fallback.

use std::collections::BinaryHeap;

use super::{TokenId, Vocab};

/// The byte-fallback table.
#[derive(Debug)]
pub(crate) struct Spm {
    /// The token of each byte: `<0xXX>`.
    byte_token: [Option<TokenId>; 256],
    /// Emitted for a character with a byte that has no byte token.
    unk: Option<TokenId>,
}

#[derive(Clone, Copy, Debug)]
struct Symbol {
    /// Byte range in the escaped text; `len` 0 once merged into its left neighbour.
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

const NIL: usize = usize::MAX;

/// A candidate merge, ordered as llama.cpp's queue pops them: highest score, then leftmost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Bigram {
    score: u32,
    /// Bitwise-inverted index of the left symbol, so the leftmost is the greatest.
    left_inv: usize,
    right: usize,
    /// Combined byte length when queued.
    size: usize,
}

/// An order-preserving integer key for a score. Scores compare as C++ floats do: -0.0 equals
/// 0.0 (then the leftmost pair wins). NaN, which llama.cpp cannot order, ranks lowest.
fn score_key(score: f32) -> u32 {
    let s = if score.is_nan() { f32::NEG_INFINITY } else { score + 0.0 };
    let bits = s.to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

impl Spm {
    /// Build the byte-fallback table from the vocabulary.
    pub(crate) fn new(vocab: &Vocab, unk: Option<TokenId>) -> Spm {
        let mut byte_token = [None; 256];
        for (b, slot) in byte_token.iter_mut().enumerate() {
            *slot = vocab.token_to_id.get(format!("<0x{b:02X}>").as_str()).copied();
        }
        Spm { byte_token, unk }
    }

    /// Number of bytes that have a `<0xXX>` token.
    pub(crate) fn n_byte_tokens(&self) -> usize {
        self.byte_token.iter().filter(|t| t.is_some()).count()
    }

    /// Tokenize one escaped text fragment (spaces already '▁'), appending to `out`.
    pub(crate) fn encode(&self, text: &str, vocab: &Vocab, out: &mut Vec<TokenId>) {
        if text.is_empty() {
            return;
        }
        let mut syms: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let i = syms.len();
            syms.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: if i == 0 { NIL } else { i - 1 },
                next: if start + c.len_utf8() == text.len() { NIL } else { i + 1 },
            });
        }

        let mut queue: BinaryHeap<Bigram> = BinaryHeap::with_capacity(syms.len());
        let push = |queue: &mut BinaryHeap<Bigram>, syms: &[Symbol], l: usize, r: usize| {
            if l == NIL || r == NIL {
                return;
            }
            let (ls, rs) = (&syms[l], &syms[r]);
            let joined = &text[ls.start..ls.start + ls.len + rs.len];
            if let Some(&id) = vocab.token_to_id.get(joined) {
                queue.push(Bigram {
                    score: score_key(vocab.tokens[id as usize].score),
                    left_inv: !l,
                    right: r,
                    size: joined.len(),
                });
            }
        };
        for i in 1..syms.len() {
            push(&mut queue, &syms, i - 1, i);
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (!b.left_inv, b.right);
            let (ls, rs) = (syms[l], syms[r]);
            // Stale: one side was merged away, or grew, since this pair was queued.
            if ls.len == 0 || rs.len == 0 || ls.len + rs.len != b.size {
                continue;
            }
            syms[l].len += rs.len;
            syms[l].next = rs.next;
            syms[r].len = 0;
            if rs.next != NIL {
                syms[rs.next].prev = l;
            }
            push(&mut queue, &syms, ls.prev, l);
            push(&mut queue, &syms, l, rs.next);
        }

        let mut i = 0;
        while i != NIL {
            let s = syms[i];
            let piece = &text[s.start..s.start + s.len];
            match vocab.token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => self.byte_fallback(piece, out),
            }
            i = s.next;
        }
    }

    /// A character that is not a token: its bytes as byte tokens.
    fn byte_fallback(&self, piece: &str, out: &mut Vec<TokenId>) {
        let bytes = piece.as_bytes();
        if bytes.iter().all(|&b| self.byte_token[b as usize].is_some()) {
            out.extend(bytes.iter().filter_map(|&b| self.byte_token[b as usize]));
        } else {
            out.extend(self.unk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_keys_order_like_floats() {
        let scores = [f32::NEG_INFINITY, -1e30, -2.5, -1.0, -1e-40, 0.0, 1e-40, 0.5, 3.0, 1e30];
        for w in scores.windows(2) {
            assert!(score_key(w[0]) < score_key(w[1]), "{w:?}");
        }
        assert_eq!(score_key(-0.0), score_key(0.0));
        assert_eq!(score_key(f32::NAN), score_key(f32::NEG_INFINITY));
        assert!(score_key(f32::INFINITY) > score_key(1e30));
    }

    #[test]
    fn queue_pops_highest_score_then_leftmost() {
        let mut q = BinaryHeap::new();
        for (score, left) in [(1.0, 5usize), (2.0, 7), (2.0, 3), (-1.0, 0)] {
            q.push(Bigram { score: score_key(score), left_inv: !left, right: left + 1, size: 2 });
        }
        let order: Vec<usize> = std::iter::from_fn(|| q.pop()).map(|b| !b.left_inv).collect();
        assert_eq!(order, [3, 7, 5, 0]);
    }
}
