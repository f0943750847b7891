//! The parser: a bounds-checked cursor over the file bytes and the layout walk.
//!
//! Nothing here trusts a number read from the file: every length and count is compared with the
//! bytes that remain before anything is read or allocated, and every offset computation is
//! checked for overflow.

use std::collections::HashMap;

use unicorn_kernels::GgmlType;

use super::value::{Array, Value, ValueType};
use super::{
    GgufError, Metadata, TensorInfo, DEFAULT_ALIGNMENT, MAX_ARRAY_NESTING, MAX_DIMS,
    MAX_TENSOR_NAME_LEN,
};

/// The fewest bytes one metadata entry can take: key length (8), a one-byte key, value type (4),
/// a one-byte value.
const MIN_KV_LEN: u64 = 8 + 1 + 4 + 1;
/// The fewest bytes one tensor info can take: name length (8), a one-byte name, n_dims (4),
/// no dims, type (4), offset (8).
const MIN_TENSOR_INFO_LEN: u64 = 8 + 1 + 4 + 4 + 8;
/// Entries reserved up front for metadata, tensor infos, string arrays and nested arrays; they
/// grow as entries are actually read, so a large claimed count costs nothing until the bytes
/// are there. (Numeric arrays are allocated at once: their size is exactly bytes in the file.)
const MAX_PRERESERVE: usize = 4096;

/// What a successful parse produced.
pub(super) struct Parsed {
    pub version: u32,
    pub alignment: u64,
    pub data_offset: u64,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    pub tensor_index: HashMap<String, usize>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    /// The next `n` bytes, or a truncation error naming `what`.
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.offset(),
                needed: n,
                available: self.remaining(),
            });
        }
        // n <= remaining <= usize::MAX, so the conversion is lossless.
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A GGUF string: u64 byte length, then that many bytes of UTF-8.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(&|| format!("{} length", what()))?;
        let at = self.offset();
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::InvalidUtf8 { what: what(), offset: at }),
        }
    }

    /// Check that `count` elements of at least `min_len` bytes each can fit in what is left.
    fn check_count(
        &self,
        count: u64,
        min_len: u64,
        what: &dyn Fn() -> String,
    ) -> Result<(), GgufError> {
        if count > self.remaining() / min_len {
            return Err(GgufError::CountTooLarge {
                what: what(),
                offset: self.offset(),
                count,
                available: self.remaining(),
            });
        }
        Ok(())
    }
}

/// Parse a whole GGUF file held in `buf`.
pub(super) fn parse(buf: &[u8]) -> Result<Parsed, GgufError> {
    let mut c = Cursor { buf, pos: 0 };
    let file_len = buf.len() as u64;
    if file_len < 4 {
        let mut found = [0u8; 4];
        found[..buf.len()].copy_from_slice(buf);
        if found != *b"GGUF" {
            return Err(GgufError::BadMagic { found });
        }
    }
    let magic: [u8; 4] = c.array(&|| "magic".into())?;
    if magic != *b"GGUF" {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = c.u32(&|| "version".into())?;
    match version {
        2 | 3 => {}
        v if matches!(v.swap_bytes(), 2 | 3) => return Err(GgufError::BigEndian),
        v => return Err(GgufError::UnsupportedVersion(v)),
    }
    let n_tensors = c.u64(&|| "tensor count".into())?;
    let n_kv = c.u64(&|| "metadata count".into())?;
    // Both sections must fit in what is left; checking them together rejects a pair of counts
    // that only fit one at a time.
    c.check_count(n_kv, MIN_KV_LEN, &|| "metadata count".into())?;
    let kv_min = n_kv * MIN_KV_LEN; // cannot overflow: n_kv <= remaining / MIN_KV_LEN
    if n_tensors > (c.remaining() - kv_min) / MIN_TENSOR_INFO_LEN {
        return Err(GgufError::CountTooLarge {
            what: "tensor count".into(),
            offset: 8,
            count: n_tensors,
            available: c.remaining() - kv_min,
        });
    }

    let metadata = parse_metadata(&mut c, n_kv)?;
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(v @ Value::U32(_)) => return Err(GgufError::BadAlignment(format!("{v:?}"))),
        Some(v) => return Err(GgufError::BadAlignment(v.type_description())),
    };

    let reserve = (n_tensors as usize).min(MAX_PRERESERVE);
    let mut tensors = Vec::with_capacity(reserve);
    let mut tensor_index = HashMap::with_capacity(reserve);
    for i in 0..n_tensors {
        let info = parse_tensor_info(&mut c, i, alignment)?;
        if tensor_index.insert(info.name.clone(), tensors.len()).is_some() {
            return Err(GgufError::DuplicateTensor(info.name));
        }
        tensors.push(info);
    }

    // The data section starts at the next multiple of the alignment.
    let end_of_infos = c.offset();
    let data_offset = end_of_infos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| GgufError::OffsetOverflow("data section start".into()))?;

    check_extents(&tensors, data_offset, file_len)?;

    log::debug!(
        "gguf: v{version}, {} metadata entries, {} tensors, alignment {alignment}, data at {data_offset}",
        metadata.len(),
        tensors.len()
    );
    Ok(Parsed { version, alignment, data_offset, metadata, tensors, tensor_index })
}

fn parse_metadata(c: &mut Cursor<'_>, n_kv: u64) -> Result<Metadata, GgufError> {
    let mut md = Metadata::with_capacity((n_kv as usize).min(MAX_PRERESERVE));
    for i in 0..n_kv {
        let key_at = c.offset();
        let key = c.string(&|| format!("metadata key #{i}"))?;
        if key.is_empty() {
            return Err(GgufError::EmptyKey { offset: key_at });
        }
        let ty = c.u32(&|| format!("type of metadata key {key:?}"))?;
        let ty = ValueType::from_id(ty)
            .ok_or_else(|| GgufError::UnknownValueType { key: key.clone(), id: ty })?;
        let value = parse_value(c, ty, &key, 0)?;
        if !md.insert(key.clone(), value) {
            return Err(GgufError::DuplicateKey(key));
        }
    }
    Ok(md)
}

fn parse_value(
    c: &mut Cursor<'_>,
    ty: ValueType,
    key: &str,
    depth: usize,
) -> Result<Value, GgufError> {
    let what = || format!("value of metadata key {key:?}");
    Ok(match ty {
        ValueType::U8 => Value::U8(c.array::<1>(&what)?[0]),
        ValueType::I8 => Value::I8(i8::from_le_bytes(c.array(&what)?)),
        ValueType::U16 => Value::U16(u16::from_le_bytes(c.array(&what)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(c.array(&what)?)),
        ValueType::U32 => Value::U32(u32::from_le_bytes(c.array(&what)?)),
        ValueType::I32 => Value::I32(i32::from_le_bytes(c.array(&what)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(c.array(&what)?)),
        ValueType::U64 => Value::U64(u64::from_le_bytes(c.array(&what)?)),
        ValueType::I64 => Value::I64(i64::from_le_bytes(c.array(&what)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(c.array(&what)?)),
        ValueType::Bool => Value::Bool(parse_bool(c.array::<1>(&what)?[0], key)?),
        ValueType::String => Value::String(c.string(&what)?),
        ValueType::Array => Value::Array(parse_array(c, key, depth + 1)?),
    })
}

fn parse_bool(b: u8, key: &str) -> Result<bool, GgufError> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        value => Err(GgufError::InvalidBool { key: key.to_owned(), value }),
    }
}

/// Decode `count` fixed-size little-endian elements; the caller has already taken exactly
/// `count * N` bytes.
fn fixed<const N: usize, T>(bytes: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|ch| {
            let mut a = [0u8; N];
            a.copy_from_slice(ch);
            f(a)
        })
        .collect()
}

fn parse_array(c: &mut Cursor<'_>, key: &str, depth: usize) -> Result<Array, GgufError> {
    if depth > MAX_ARRAY_NESTING {
        return Err(GgufError::NestingTooDeep { key: key.to_owned(), max: MAX_ARRAY_NESTING });
    }
    let what = || format!("array of metadata key {key:?}");
    let ty = c.u32(&what)?;
    let ty = ValueType::from_id(ty)
        .ok_or_else(|| GgufError::UnknownValueType { key: key.to_owned(), id: ty })?;
    let count = c.u64(&what)?;
    c.check_count(count, ty.min_encoded_len(), &what)?;
    // For fixed-size elements the byte length is count * size, which fits in what is left.
    let fixed_len = count * ty.min_encoded_len();
    Ok(match ty {
        ValueType::U8 => Array::U8(c.take(fixed_len, &what)?.to_vec()),
        ValueType::I8 => Array::I8(fixed(c.take(fixed_len, &what)?, i8::from_le_bytes)),
        ValueType::U16 => Array::U16(fixed(c.take(fixed_len, &what)?, u16::from_le_bytes)),
        ValueType::I16 => Array::I16(fixed(c.take(fixed_len, &what)?, i16::from_le_bytes)),
        ValueType::U32 => Array::U32(fixed(c.take(fixed_len, &what)?, u32::from_le_bytes)),
        ValueType::I32 => Array::I32(fixed(c.take(fixed_len, &what)?, i32::from_le_bytes)),
        ValueType::F32 => Array::F32(fixed(c.take(fixed_len, &what)?, f32::from_le_bytes)),
        ValueType::U64 => Array::U64(fixed(c.take(fixed_len, &what)?, u64::from_le_bytes)),
        ValueType::I64 => Array::I64(fixed(c.take(fixed_len, &what)?, i64::from_le_bytes)),
        ValueType::F64 => Array::F64(fixed(c.take(fixed_len, &what)?, f64::from_le_bytes)),
        ValueType::Bool => {
            let bytes = c.take(fixed_len, &what)?;
            let mut v = Vec::with_capacity(bytes.len());
            for &b in bytes {
                v.push(parse_bool(b, key)?);
            }
            Array::Bool(v)
        }
        ValueType::String => {
            let mut v = Vec::with_capacity((count as usize).min(MAX_PRERESERVE));
            for i in 0..count {
                v.push(c.string(&|| format!("element {i} of metadata key {key:?}"))?);
            }
            Array::String(v)
        }
        ValueType::Array => {
            let mut v = Vec::with_capacity((count as usize).min(MAX_PRERESERVE));
            for _ in 0..count {
                v.push(parse_array(c, key, depth + 1)?);
            }
            Array::Array(v)
        }
    })
}

fn parse_tensor_info(c: &mut Cursor<'_>, i: u64, alignment: u64) -> Result<TensorInfo, GgufError> {
    let name_at = c.offset();
    let name = c.string(&|| format!("name of tensor #{i}"))?;
    if name.is_empty() {
        return Err(GgufError::EmptyTensorName { offset: name_at });
    }
    if name.len() > MAX_TENSOR_NAME_LEN {
        return Err(GgufError::TensorNameTooLong {
            len: name.len(),
            name,
            max: MAX_TENSOR_NAME_LEN,
        });
    }
    let n_dims = c.u32(&|| format!("dimension count of tensor {name:?}"))?;
    if n_dims as usize > MAX_DIMS {
        return Err(GgufError::TooManyDims { tensor: name, n_dims, max: MAX_DIMS });
    }
    let mut dims = [1u64; MAX_DIMS];
    let mut n_elements: u64 = 1;
    for (index, d) in dims.iter_mut().enumerate().take(n_dims as usize) {
        let size = c.u64(&|| format!("dimensions of tensor {name:?}"))?;
        // ggml stores sizes as int64; zero-sized and negative dimensions are rejected.
        if size == 0 || size > i64::MAX as u64 {
            return Err(GgufError::BadDim { tensor: name, index, size });
        }
        *d = size;
        n_elements = n_elements
            .checked_mul(size)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| GgufError::TensorTooLarge { tensor: name.clone() })?;
    }
    let type_id = c.u32(&|| format!("type of tensor {name:?}"))?;
    let offset = c.u64(&|| format!("data offset of tensor {name:?}"))?;
    let ty = GgmlType::from_id(type_id)
        .ok_or_else(|| GgufError::UnsupportedTensorType { tensor: name.clone(), id: type_id })?;
    let row = dims[0];
    if row % ty.block_size() as u64 != 0 {
        return Err(GgufError::PartialBlock { tensor: name, ty, row, block: ty.block_size() });
    }
    let row_bytes =
        ty.row_bytes(row).ok_or_else(|| GgufError::TensorTooLarge { tensor: name.clone() })?;
    let n_rows = n_elements / row; // exact: row divides the product of all dims
    let size = row_bytes
        .checked_mul(n_rows)
        .ok_or_else(|| GgufError::TensorTooLarge { tensor: name.clone() })?;
    if offset % alignment != 0 {
        return Err(GgufError::TensorMisaligned { tensor: name, offset, alignment });
    }
    Ok(TensorInfo { name, ty, dims, n_dims: n_dims as u8, offset, size })
}

/// Every tensor must lie inside the data section, and no two may share a byte.
fn check_extents(tensors: &[TensorInfo], data_offset: u64, file_len: u64) -> Result<(), GgufError> {
    for t in tensors {
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.size));
        match (start, end) {
            (Some(_), Some(end)) if end <= file_len => {}
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    tensor: t.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len,
                })
            }
        }
    }
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].offset);
    for w in order.windows(2) {
        let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
        // Sizes are non-zero (dims are >= 1 and every type has a non-zero block size), and
        // a.offset + a.size cannot overflow: it was checked against the file length above.
        if a.offset + a.size > b.offset {
            return Err(GgufError::TensorOverlap { first: a.name.clone(), second: b.name.clone() });
        }
    }
    Ok(())
}
