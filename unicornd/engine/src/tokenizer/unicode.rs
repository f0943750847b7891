//! Code point classification for the pre-tokenizers, and GPT-2's byte-to-character mapping.
//!
//! The pre-tokenizer splits of llama.cpp depend on how it classifies code points: the major
//! general category (letter, number, punctuation, ...) from Unicode 15.1, plus the Unicode
//! `White_Space` property. The same classes are used here, from a table generated from Unicode
//! 15.1 (`scripts/gen-unicode-data.py`), so that text splits identically, including for code
//! points that newer Unicode versions assign.

use super::unicode_data::CLASS_RANGES;

/// The major general category of a code point; unassigned code points (`Cn`) are `Undefined`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CpClass {
    Undefined,
    Number,
    Letter,
    Separator,
    Mark,
    Punctuation,
    Symbol,
    Control,
}

/// A code point's class and white-space property, or nothing (a position outside the text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Flags(u16);

impl Flags {
    const UNDEFINED: u16 = 0x001;
    const NUMBER: u16 = 0x002;
    const LETTER: u16 = 0x004;
    const SEPARATOR: u16 = 0x008;
    const MARK: u16 = 0x010;
    const PUNCTUATION: u16 = 0x020;
    const SYMBOL: u16 = 0x040;
    const CONTROL: u16 = 0x080;
    const WHITESPACE: u16 = 0x100;

    /// The flags of "no code point" (past the end of the text being split).
    pub(crate) const NONE: Flags = Flags(0);

    const fn from_class(class: CpClass, whitespace: bool) -> Flags {
        let c = match class {
            CpClass::Undefined => Flags::UNDEFINED,
            CpClass::Number => Flags::NUMBER,
            CpClass::Letter => Flags::LETTER,
            CpClass::Separator => Flags::SEPARATOR,
            CpClass::Mark => Flags::MARK,
            CpClass::Punctuation => Flags::PUNCTUATION,
            CpClass::Symbol => Flags::SYMBOL,
            CpClass::Control => Flags::CONTROL,
        };
        Flags(c | if whitespace { Flags::WHITESPACE } else { 0 })
    }

    /// The flags of `c`.
    pub(crate) fn of(c: char) -> Flags {
        let cp = c as u32;
        if cp < 128 {
            return ASCII_FLAGS[cp as usize];
        }
        Flags::from_class(class_of(cp), is_white_space(cp))
    }

    pub(crate) fn is_none(self) -> bool {
        self.0 == 0
    }
    pub(crate) fn is_letter(self) -> bool {
        self.0 & Flags::LETTER != 0
    }
    pub(crate) fn is_number(self) -> bool {
        self.0 & Flags::NUMBER != 0
    }
    pub(crate) fn is_punctuation(self) -> bool {
        self.0 & Flags::PUNCTUATION != 0
    }
    pub(crate) fn is_whitespace(self) -> bool {
        self.0 & Flags::WHITESPACE != 0
    }
    /// Whitespace, letter or number: the complement of `[^\s\p{L}\p{N}]`.
    pub(crate) fn is_ws_letter_number(self) -> bool {
        self.0 & (Flags::WHITESPACE | Flags::LETTER | Flags::NUMBER) != 0
    }
}

/// The class of code point `cp` (binary search over the generated ranges).
pub(crate) const fn class_of(cp: u32) -> CpClass {
    // Find the last range starting at or before cp. CLASS_RANGES[0] starts at 0.
    let (mut lo, mut hi) = (0usize, CLASS_RANGES.len());
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if CLASS_RANGES[mid].0 <= cp {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    CLASS_RANGES[lo].1
}

/// The Unicode `White_Space` property (PropList.txt; unchanged since Unicode 6.2).
pub(crate) const fn is_white_space(cp: u32) -> bool {
    matches!(
        cp,
        0x09..=0x0D
            | 0x20
            | 0x85
            | 0xA0
            | 0x1680
            | 0x2000..=0x200A
            | 0x2028
            | 0x2029
            | 0x202F
            | 0x205F
            | 0x3000
    )
}

static ASCII_FLAGS: [Flags; 128] = {
    let mut t = [Flags::NONE; 128];
    let mut cp = 0;
    while cp < 128 {
        t[cp] = Flags::from_class(class_of(cp as u32), is_white_space(cp as u32));
        cp += 1;
    }
    t
};

/// GPT-2's reversible byte-to-character mapping: printable Latin-1 bytes map to themselves, the
/// other 68 bytes (controls, space, DEL, NBSP, soft hyphen, ...) to U+0100 onwards in byte order.
pub(crate) const BYTE_TO_CHAR: [char; 256] = {
    let mut t = ['\0'; 256];
    let mut next = 256u32;
    let mut b = 0usize;
    while b < 256 {
        let printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        let cp = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        t[b] = match char::from_u32(cp) {
            Some(c) => c,
            None => panic!("byte mapping out of range"),
        };
        b += 1;
    }
    t
};

/// The inverse of [`BYTE_TO_CHAR`], indexed by code point (`-1`: not a byte character).
const CHAR_TO_BYTE: [i16; 0x144] = {
    let mut t = [-1i16; 0x144];
    let mut b = 0usize;
    while b < 256 {
        t[BYTE_TO_CHAR[b] as usize] = b as i16;
        b += 1;
    }
    t
};

/// The byte a GPT-2 byte-level character stands for, if `c` is one.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let b = *CHAR_TO_BYTE.get(c as usize)?;
    u8::try_from(b).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_of_known_code_points() {
        assert_eq!(class_of('a' as u32), CpClass::Letter);
        assert_eq!(class_of('Z' as u32), CpClass::Letter);
        assert_eq!(class_of('7' as u32), CpClass::Number);
        assert_eq!(class_of('!' as u32), CpClass::Punctuation);
        assert_eq!(class_of('$' as u32), CpClass::Symbol);
        assert_eq!(class_of('`' as u32), CpClass::Symbol);
        assert_eq!(class_of(' ' as u32), CpClass::Separator);
        assert_eq!(class_of('\n' as u32), CpClass::Control);
        assert_eq!(class_of(0x0301), CpClass::Mark); // combining acute
        assert_eq!(class_of(0x4F60), CpClass::Letter); // 你
        assert_eq!(class_of(0x00B2), CpClass::Number); // superscript two
        assert_eq!(class_of(0x1F980), CpClass::Symbol); // crab
        assert_eq!(class_of(0x200B), CpClass::Control); // zero width space (Cf)
        assert_eq!(class_of(0x0378), CpClass::Undefined); // unassigned
                                                          // Assigned in Unicode 15.1 (IDS characters), unassigned before.
        assert_eq!(class_of(0x2FFC), CpClass::Symbol);
        // Assigned only in Unicode 16: still undefined here, as in llama.cpp.
        assert_eq!(class_of(0x1C89), CpClass::Undefined);
        assert_eq!(class_of(0x10FFFF), CpClass::Undefined);
    }

    #[test]
    fn table_is_well_formed() {
        assert_eq!(CLASS_RANGES[0].0, 0);
        assert!(CLASS_RANGES.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 != w[1].1));
        assert!(CLASS_RANGES.last().unwrap().0 <= 0x10FFFF);
    }

    #[test]
    fn white_space_flags() {
        for c in ['\t', '\n', '\x0B', '\x0C', '\r', ' ', '\u{85}', '\u{A0}', '\u{3000}'] {
            assert!(Flags::of(c).is_whitespace(), "{c:?}");
        }
        for c in ['\x1C', '\x1F', '\u{200B}', 'a', '\u{180E}'] {
            assert!(!Flags::of(c).is_whitespace(), "{c:?}");
        }
    }

    #[test]
    fn byte_mapping_round_trips() {
        assert_eq!(BYTE_TO_CHAR[b' ' as usize], '\u{120}'); // 'Ġ'
        assert_eq!(BYTE_TO_CHAR[b'\n' as usize], '\u{10A}'); // 'Ċ'
        assert_eq!(BYTE_TO_CHAR[b'a' as usize], 'a');
        assert_eq!(BYTE_TO_CHAR[0xAD], '\u{143}');
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(BYTE_TO_CHAR[b as usize]), Some(b));
        }
        assert_eq!(char_to_byte('\u{144}'), None);
        assert_eq!(char_to_byte(' '), None);
    }
}
