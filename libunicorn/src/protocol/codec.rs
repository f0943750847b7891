//! The encoding of control messages: fixed-layout little-endian fields in declaration order.
//!
//! - integers: little-endian, their natural width;
//! - `bool`: one byte, 0 or 1 (anything else is an error);
//! - strings: `u16` byte length, then UTF-8 bytes (never NUL-terminated);
//! - byte blobs: `u32` length, then the bytes;
//! - lists: `u16` count, then the elements.
//!
//! Every read is bounds-checked and every length is checked against what is left of the message
//! before anything is allocated, so a hostile message can make decoding fail but never panic or
//! allocate more than the message itself holds.

use crate::error::Error;

/// Appends fields to a message.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer { buf: Vec::with_capacity(128) }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// Writes a string, cut at a character boundary to at most `u16::MAX` bytes.
    pub fn str(&mut self, s: &str) -> &mut Self {
        let s = truncate_str(s, usize::from(u16::MAX));
        self.u16(s.len() as u16);
        self.buf.extend_from_slice(s.as_bytes());
        self
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        let len = u32::try_from(b.len()).expect("control messages are far below 4 GiB");
        self.u32(len);
        self.buf.extend_from_slice(b);
        self
    }

    /// Writes a list, keeping at most `u16::MAX` elements.
    pub fn list<T>(&mut self, items: &[T], mut each: impl FnMut(&mut Writer, &T)) -> &mut Self {
        let n = items.len().min(usize::from(u16::MAX));
        self.u16(n as u16);
        for item in &items[..n] {
            each(self, item);
        }
        self
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Reads fields from a received message.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Error> {
        let rest = &self.buf[self.pos..];
        if rest.len() < n {
            return Err(Error::protocol(format!(
                "message ends inside {what}: needs {n} bytes, {} left",
                rest.len()
            )));
        }
        self.pos += n;
        Ok(&rest[..n])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Error> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub fn u8(&mut self, what: &str) -> Result<u8, Error> {
        Ok(self.array::<1>(what)?[0])
    }

    pub fn u16(&mut self, what: &str) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &str) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &str) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub fn bool(&mut self, what: &str) -> Result<bool, Error> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(Error::protocol(format!("{what}: {v} is not a boolean"))),
        }
    }

    /// Reads a string of at most `max` bytes.
    pub fn str(&mut self, what: &str, max: usize) -> Result<String, Error> {
        let len = usize::from(self.u16(what)?);
        if len > max {
            return Err(Error::protocol(format!("{what}: {len} bytes, at most {max} allowed")));
        }
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| Error::protocol(format!("{what} is not valid UTF-8")))
    }

    /// Reads a byte blob of at most `max` bytes.
    pub fn bytes(&mut self, what: &str, max: usize) -> Result<Vec<u8>, Error> {
        let len = self.u32(what)?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > max {
            return Err(Error::protocol(format!("{what}: {len} bytes, at most {max} allowed")));
        }
        Ok(self.take(len, what)?.to_vec())
    }

    /// Reads a list whose elements take at least `min_item_bytes` each; the count is checked
    /// against the bytes left before anything is allocated.
    pub fn list<T>(
        &mut self,
        what: &str,
        min_item_bytes: usize,
        mut each: impl FnMut(&mut Reader<'a>) -> Result<T, Error>,
    ) -> Result<Vec<T>, Error> {
        let n = usize::from(self.u16(what)?);
        let left = self.buf.len() - self.pos;
        if n.saturating_mul(min_item_bytes.max(1)) > left {
            return Err(Error::protocol(format!("{what}: {n} entries cannot fit in {left} bytes")));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(each(self)?);
        }
        Ok(out)
    }

    /// Bytes not read yet (a reply from an older daemon ends before fields appended later).
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Fails unless every byte was consumed (used on requests, which the daemon reads strictly).
    pub fn finish(&self, what: &str) -> Result<(), Error> {
        let left = self.buf.len() - self.pos;
        if left != 0 {
            return Err(Error::protocol(format!("{what}: {left} unexpected trailing bytes")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let mut w = Writer::new();
        w.u8(7).u16(0xBEEF).u32(0xDEAD_BEEF).u64(u64::MAX).bool(true).str("héllo").bytes(&[1, 2]);
        w.list(&[10u32, 20], |w, v| {
            w.u32(*v);
        });
        let bytes = w.into_bytes();
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.u16("b").unwrap(), 0xBEEF);
        assert_eq!(r.u32("c").unwrap(), 0xDEAD_BEEF);
        assert_eq!(r.u64("d").unwrap(), u64::MAX);
        assert!(r.bool("e").unwrap());
        assert_eq!(r.str("f", 16).unwrap(), "héllo");
        assert_eq!(r.bytes("g", 16).unwrap(), vec![1, 2]);
        assert_eq!(r.list("h", 4, |r| r.u32("x")).unwrap(), vec![10, 20]);
        r.finish("msg").unwrap();
    }

    #[test]
    fn hostile_lengths_fail_without_allocating() {
        // A list claiming 65535 entries in a 2-byte message.
        let mut r = Reader::new(&[0xFF, 0xFF]);
        assert!(r.list("l", 8, |r| r.u64("x")).is_err());
        // A blob claiming 4 GiB.
        let mut r = Reader::new(&[0xFF, 0xFF, 0xFF, 0xFF]);
        assert!(r.bytes("b", 1 << 20).is_err());
        // A string longer than allowed, and one that is not UTF-8.
        let mut r = Reader::new(&[5, 0, b'a', b'b', b'c', b'd', b'e']);
        assert!(r.str("s", 4).is_err());
        let mut r = Reader::new(&[2, 0, 0xC3, 0x28]);
        assert!(r.str("s", 4).is_err());
        let mut r = Reader::new(&[2]);
        assert!(r.bool("b").is_err());
        let mut r = Reader::new(&[1, 2]);
        r.u8("x").unwrap();
        assert!(r.finish("m").is_err());
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_str("aé", 2), "a");
        assert_eq!(truncate_str("abc", 5), "abc");
    }
}
