//! Pre-tokenizers: the regex-defined splits of text into words before BPE, as hand-written
//! matchers.
//!
//! Each pre-tokenizer named by `tokenizer.ggml.pre` is a sequence of patterns applied one after
//! the other: each pattern splits every piece left by the previous one into matches and the
//! unmatched runs between them (both kept). The patterns (Hugging Face `tokenizers` regexes)
//! need look-ahead, which Rust's `regex` crate lacks, so they are matchers written out by hand.
//! They reproduce llama.cpp exactly, which is what the model files were converted for:
//!
//! - code points are classified as llama.cpp does (Unicode 15.1 categories and `White_Space`,
//!   see [`super::unicode`]); a pattern never looks past the end of the piece it splits;
//! - the GPT-2 word pattern, the Llama 3 and Qwen 2 patterns follow llama.cpp's dedicated
//!   matchers (leftmost alternative first, greedy runs, `\s+(?!\S)` leaving the last white-space
//!   character for the next word);
//! - the single-class patterns (`\p{N}`, `\p{N}+`, the punctuation run of the default
//!   pre-tokenizer, `[0-9]{3}`) match what llama.cpp's `std::regex` fallback matches on its
//!   category-collapsed text, which reduces to the same class tests.

use super::unicode::Flags;

/// A pre-tokenizer, selected by `tokenizer.ggml.pre`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PreTokenizer {
    /// llama.cpp's default (`default`, or the key missing): punctuation runs, GPT-2 words,
    /// number runs, then digits in groups of three.
    Default,
    /// GPT-2's word pattern alone (`gpt-2`, `gpt2`, `phi-2`, `mpt`, `olmo`, `jais`).
    Gpt2,
    /// Every digit alone, then GPT-2 words (`smollm`, `starcoder`, `refact`, `command-r`,
    /// `codeshell`, `exaone`, `minerva-7b`).
    Smollm,
    /// Llama 3's pattern: case-insensitive contractions, an optional non-letter prefix before
    /// letters, numbers in groups of up to three, newline runs (`llama3`, `llama-v3`,
    /// `llama-bpe`, `falcon3`, `falcon-h1`, `pixtral`, `midm-2.0`, `lfm2`, `dbrx`, `smaug-bpe`).
    Llama3,
    /// Qwen 2's pattern: as Llama 3 but every digit alone (`qwen2`, `deepseek-r1-qwen`,
    /// `stablelm2`).
    Qwen2,
}

/// Tokenizer settings that llama.cpp ties to the pre-tokenizer name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PreDefaults {
    /// A word that is a whole token in the vocabulary is emitted without merging.
    pub ignore_merges: bool,
    /// Default of `add_bos` before `tokenizer.ggml.add_bos_token` overrides it.
    pub add_bos: bool,
}

impl PreTokenizer {
    /// The pre-tokenizer called `name` in `tokenizer.ggml.pre`, with its defaults.
    pub(crate) fn from_name(name: &str) -> Option<(PreTokenizer, PreDefaults)> {
        let plain = PreDefaults { ignore_merges: false, add_bos: false };
        Some(match name {
            "" | "default" => (PreTokenizer::Default, plain),
            // "gpt2" is not a llama.cpp name (it says "gpt-2"); accepted as an obvious alias.
            "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" => (PreTokenizer::Gpt2, plain),
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => (PreTokenizer::Smollm, plain),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" => {
                (PreTokenizer::Llama3, PreDefaults { ignore_merges: true, add_bos: true })
            }
            "dbrx" | "smaug-bpe" => (PreTokenizer::Llama3, plain),
            "qwen2" | "deepseek-r1-qwen" | "stablelm2" => (PreTokenizer::Qwen2, plain),
            _ => return None,
        })
    }

    /// Split `text` into words, in order; their concatenation is `text`.
    pub fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        if text.is_empty() {
            return Vec::new();
        }
        let chars: Vec<char> = text.chars().collect();
        let flags: Vec<Flags> = chars.iter().map(|&c| Flags::of(c)).collect();
        let t = Text { chars: &chars, flags: &flags };
        let whole = vec![chars.len()];
        let pieces = match self {
            PreTokenizer::Gpt2 => t.gpt2(&whole),
            PreTokenizer::Smollm => t.gpt2(&t.isolate(&whole, |f, _| f.is_number())),
            PreTokenizer::Llama3 => t.llama3(&whole, 3),
            PreTokenizer::Qwen2 => t.llama3(&whole, 1),
            PreTokenizer::Default => {
                let p = t.runs(&whole, |f, c| f.is_punctuation() || "$+<=>^~|".contains(c));
                let p = t.gpt2(&p);
                let p = t.runs(&p, |f, _| f.is_number());
                t.ascii_digit_triples(&p)
            }
        };
        // Piece lengths are in code points; turn them into string slices.
        let mut offsets: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
        offsets.push(text.len());
        let mut out = Vec::with_capacity(pieces.len());
        let mut start = 0;
        for len in pieces {
            out.push(&text[offsets[start]..offsets[start + len]]);
            start += len;
        }
        out
    }
}

struct Text<'a> {
    chars: &'a [char],
    flags: &'a [Flags],
}

/// Collects the pieces one pattern makes of one input piece.
struct Emitter<'o> {
    out: &'o mut Vec<usize>,
    prev_end: usize,
}

impl Emitter<'_> {
    /// End the current piece at `end` (nothing if empty).
    fn emit(&mut self, end: usize) {
        if end > self.prev_end {
            self.out.push(end - self.prev_end);
        }
        self.prev_end = end;
    }
}

impl Text<'_> {
    /// Apply `f` to each input piece `[start, end)`, collecting the new pieces.
    fn each_piece(
        &self,
        pieces: &[usize],
        mut f: impl FnMut(usize, usize, &mut Emitter<'_>),
    ) -> Vec<usize> {
        let mut out = Vec::with_capacity(pieces.len());
        let mut start = 0;
        for &len in pieces {
            let end = start + len;
            let mut e = Emitter { out: &mut out, prev_end: start };
            f(start, end, &mut e);
            e.emit(end);
            start = end;
        }
        out
    }

    /// Each code point matching `pred` becomes a piece of its own (`\p{N}`).
    fn isolate(&self, pieces: &[usize], pred: impl Fn(Flags, char) -> bool) -> Vec<usize> {
        self.each_piece(pieces, |start, end, e| {
            for i in start..end {
                if pred(self.flags[i], self.chars[i]) {
                    e.emit(i);
                    e.emit(i + 1);
                }
            }
        })
    }

    /// Each maximal run of code points matching `pred` becomes a piece (`[...]+`).
    fn runs(&self, pieces: &[usize], pred: impl Fn(Flags, char) -> bool) -> Vec<usize> {
        self.each_piece(pieces, |start, end, e| {
            let mut i = start;
            while i < end {
                if pred(self.flags[i], self.chars[i]) {
                    e.emit(i);
                    while i < end && pred(self.flags[i], self.chars[i]) {
                        i += 1;
                    }
                    e.emit(i);
                } else {
                    i += 1;
                }
            }
        })
    }

    /// `[0-9][0-9][0-9]`: runs of ASCII digits cut into threes from the left.
    fn ascii_digit_triples(&self, pieces: &[usize]) -> Vec<usize> {
        self.each_piece(pieces, |start, end, e| {
            let mut i = start;
            while i + 3 <= end {
                if self.chars[i..i + 3].iter().all(char::is_ascii_digit) {
                    e.emit(i);
                    e.emit(i + 3);
                    i += 3;
                } else {
                    i += 1;
                }
            }
        })
    }

    /// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    fn gpt2(&self, pieces: &[usize]) -> Vec<usize> {
        self.each_piece(pieces, |start, end, e| {
            let cp = |i: usize| if i < end { Some(self.chars[i]) } else { None };
            let fl = |i: usize| if i < end { self.flags[i] } else { Flags::NONE };
            let mut pos = start;
            while pos < end {
                let c = self.chars[pos];
                if let Some(n) = contraction(c, cp(pos + 1), cp(pos + 2), false) {
                    pos += n;
                    e.emit(pos);
                    continue;
                }
                // An optional leading space belongs to the letters/numbers/symbols after it.
                let f2 = if c == ' ' { fl(pos + 1) } else { self.flags[pos] };
                let run = if f2.is_letter() {
                    Some(Flags::is_letter as fn(Flags) -> bool)
                } else if f2.is_number() {
                    Some(Flags::is_number as fn(Flags) -> bool)
                } else if !f2.is_ws_letter_number() && !f2.is_none() {
                    Some((|f: Flags| !f.is_ws_letter_number() && !f.is_none()) as fn(Flags) -> bool)
                } else {
                    None
                };
                if let Some(run) = run {
                    if c == ' ' {
                        pos += 1;
                    }
                    while run(fl(pos)) {
                        pos += 1;
                    }
                    e.emit(pos);
                    continue;
                }
                pos = self.whitespace(pos, end, false);
                e.emit(pos);
            }
        })
    }

    /// Llama 3 (`max_digits` 3) and Qwen 2 (`max_digits` 1):
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
    fn llama3(&self, pieces: &[usize], max_digits: usize) -> Vec<usize> {
        self.each_piece(pieces, |start, end, e| {
            let cp = |i: usize| if i < end { Some(self.chars[i]) } else { None };
            let fl = |i: usize| if i < end { self.flags[i] } else { Flags::NONE };
            let mut pos = start;
            while pos < end {
                let c = self.chars[pos];
                let f = self.flags[pos];
                if let Some(n) = contraction(c, cp(pos + 1), cp(pos + 2), true) {
                    pos += n;
                    e.emit(pos);
                    continue;
                }
                // [^\r\n\p{L}\p{N}]?\p{L}+
                if !(c == '\r' || c == '\n' || f.is_number())
                    && (f.is_letter() || fl(pos + 1).is_letter())
                {
                    pos += 1;
                    while fl(pos).is_letter() {
                        pos += 1;
                    }
                    e.emit(pos);
                    continue;
                }
                // \p{N}{1,max}
                if f.is_number() {
                    let mut run_start = pos;
                    while fl(pos).is_number() {
                        pos += 1;
                        if pos - run_start >= max_digits {
                            e.emit(pos);
                            run_start = pos;
                        }
                    }
                    e.emit(pos);
                    continue;
                }
                // ' '?[^\s\p{L}\p{N}]+[\r\n]*
                let f2 = if c == ' ' { fl(pos + 1) } else { f };
                if !f2.is_ws_letter_number() {
                    if c == ' ' {
                        pos += 1;
                    }
                    let mut g = f2;
                    while !g.is_ws_letter_number() && !g.is_none() {
                        pos += 1;
                        g = fl(pos);
                    }
                    while matches!(cp(pos), Some('\r' | '\n')) {
                        pos += 1;
                    }
                    e.emit(pos);
                    continue;
                }
                pos = self.whitespace(pos, end, true);
                e.emit(pos);
            }
        })
    }
    /// The white-space alternatives at `pos`, where no other alternative matched; returns the
    /// end of the match. With `newlines` (Llama 3), `\s*[\r\n]+` comes first: the match runs to
    /// just after the last `\r`/`\n` of the white-space run. Then `\s+(?!\S)`: the whole run
    /// if it ends the piece, else all but its last character (which then leads the next word);
    /// then `\s+` (a single white-space character before a non-space). A position matching
    /// nothing at all is a piece of one code point.
    fn whitespace(&self, pos: usize, end: usize, newlines: bool) -> usize {
        let mut n = 0;
        let mut after_last_newline = None;
        while pos + n < end && self.flags[pos + n].is_whitespace() {
            if newlines && matches!(self.chars[pos + n], '\r' | '\n') {
                after_last_newline = Some(pos + n + 1);
            }
            n += 1;
        }
        if let Some(e) = after_last_newline {
            e
        } else if n > 1 && pos + n < end {
            pos + n - 1
        } else if n > 0 {
            pos + n
        } else {
            pos + 1
        }
    }
}

/// The contraction at `c` (`'s`, `'t`, `'re`, `'ve`, `'m`, `'ll`, `'d`), as a length in code
/// points. `fold` makes the letters case-insensitive (only ASCII letters lower-case to them).
fn contraction(c: char, next: Option<char>, next2: Option<char>, fold: bool) -> Option<usize> {
    if c != '\'' {
        return None;
    }
    let low = |c: Option<char>| c.map(|c| if fold { c.to_ascii_lowercase() } else { c });
    match (low(next), low(next2)) {
        (Some('s' | 't' | 'm' | 'd'), _) => Some(2),
        (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => Some(3),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::PreTokenizer::{self, *};

    fn split(p: PreTokenizer, s: &str) -> Vec<&str> {
        let words = p.split(s);
        assert_eq!(words.concat(), s);
        words
    }

    #[test]
    fn gpt2_words() {
        assert_eq!(
            split(Gpt2, "Hello world's  123 !!\n\n x"),
            ["Hello", " world", "'s", " ", " 123", " !!", "\n\n", " x"]
        );
        // Contractions are case-sensitive here.
        assert_eq!(split(Gpt2, "I'VE"), ["I", "'", "VE"]);
        assert_eq!(split(Gpt2, "trailing  "), ["trailing", "  "]);
        assert_eq!(split(Gpt2, ""), Vec::<&str>::new());
    }

    #[test]
    fn smollm_isolates_digits() {
        assert_eq!(split(Smollm, "a 12b"), ["a", " ", "1", "2", "b"]);
        // Non-ASCII digits are numbers too.
        assert_eq!(split(Smollm, "x٣²"), ["x", "٣", "²"]);
    }

    #[test]
    fn llama3_and_qwen2() {
        let text = "I'VE 12345 x\n\n  y.\n";
        assert_eq!(
            split(Llama3, text),
            ["I", "'VE", " ", "123", "45", " x", "\n\n", " ", " y", ".\n"]
        );
        assert_eq!(
            split(Qwen2, text),
            ["I", "'VE", " ", "1", "2", "3", "4", "5", " x", "\n\n", " ", " y", ".\n"]
        );
        // A non-letter, non-digit prefix joins the letters after it.
        assert_eq!(split(Llama3, "(hello)"), ["(hello", ")"]);
    }

    #[test]
    fn default_splits_punctuation_and_digit_triples() {
        assert_eq!(
            split(Default, "Hello, world! 12345 $x"),
            ["Hello", ",", " world", "!", " ", "123", "45", " ", "$", "x"]
        );
    }

    #[test]
    fn names() {
        assert_eq!(PreTokenizer::from_name("smollm").unwrap().0, Smollm);
        assert_eq!(PreTokenizer::from_name("llama-bpe").unwrap().0, Llama3);
        assert!(PreTokenizer::from_name("llama-bpe").unwrap().1.ignore_merges);
        assert!(!PreTokenizer::from_name("dbrx").unwrap().1.ignore_merges);
        assert_eq!(PreTokenizer::from_name("").unwrap().0, Default);
        assert_eq!(PreTokenizer::from_name("gpt2").unwrap().0, Gpt2);
        assert!(PreTokenizer::from_name("tekken").is_none());
    }
}
