//! Special-token partitioning: cutting the raw text at special tokens before pre-tokenization.
//!
//! The special tokens are the control, user-defined and unknown tokens. As in llama.cpp they are
//! tried longest first (ties: lowest id; llama.cpp leaves that order unspecified), and each one
//! splits every remaining text fragment at its non-overlapping occurrences, left to right. With
//! `parse_special` off, control and unknown tokens are not matched (their text is tokenized as
//! ordinary text) but user-defined tokens still are.
//!
//! To stay fast with large special-token sets (Gemma has thousands), one Aho-Corasick pass over
//! the text first finds which special tokens occur at all; only those take part. That gives the
//! same result, since a token absent from the text is absent from every fragment of it.

use aho_corasick::{AhoCorasick, MatchKind};

use super::{attr, TokenId, Vocab};

/// A piece of the input: raw text (a byte range of it) or a special token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fragment {
    Text(usize, usize),
    Token(TokenId),
}

/// The special tokens in matching order, with an automaton over their texts.
#[derive(Debug)]
pub(crate) struct SpecialMatcher {
    order: Vec<TokenId>,
    /// Patterns are `order`'s texts, in that order. `None` if building it failed (then every
    /// special token is tried).
    automaton: Option<AhoCorasick>,
}

impl SpecialMatcher {
    pub(crate) fn new(vocab: &Vocab) -> SpecialMatcher {
        let mut order: Vec<TokenId> = (0..vocab.tokens.len() as TokenId)
            .filter(|&id| {
                vocab.tokens[id as usize].attr
                    & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN)
                    != 0
            })
            .collect();
        order.sort_by_key(|&id| (std::cmp::Reverse(vocab.tokens[id as usize].text.len()), id));
        let automaton = if order.is_empty() {
            None
        } else {
            let texts = order.iter().map(|&id| vocab.tokens[id as usize].text.as_bytes());
            match AhoCorasick::builder().match_kind(MatchKind::Standard).build(texts) {
                Ok(ac) => Some(ac),
                Err(e) => {
                    log::warn!("special tokens: cannot build matcher ({e}); using plain search");
                    None
                }
            }
        };
        SpecialMatcher { order, automaton }
    }

    /// Number of special tokens.
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    /// Split `text` at special tokens.
    pub(crate) fn partition(
        &self,
        text: &str,
        vocab: &Vocab,
        parse_special: bool,
    ) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut frags = vec![Fragment::Text(0, text.len())];
        if self.order.is_empty() {
            return frags;
        }
        let present: Vec<bool> = match &self.automaton {
            Some(ac) => {
                let mut present = vec![false; self.order.len()];
                for m in ac.find_overlapping_iter(text) {
                    present[m.pattern().as_usize()] = true;
                }
                present
            }
            None => vec![true; self.order.len()],
        };
        let bytes = text.as_bytes();
        for (i, &id) in self.order.iter().enumerate() {
            if !present[i] {
                continue;
            }
            let token = &vocab.tokens[id as usize];
            if !parse_special && token.attr & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let needle = token.text.as_bytes();
            let finder = memchr::memmem::Finder::new(needle);
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                let (start, end) = match f {
                    Fragment::Text(s, e) => (s, e),
                    tok => {
                        next.push(tok);
                        continue;
                    }
                };
                let mut pos = start;
                while let Some(at) = finder.find(&bytes[pos..end]) {
                    let m = pos + at;
                    if m > pos {
                        next.push(Fragment::Text(pos, m));
                    }
                    next.push(Fragment::Token(id));
                    pos = m + needle.len();
                }
                if pos < end {
                    next.push(Fragment::Text(pos, end));
                }
            }
            frags = next;
        }
        frags
    }
}
