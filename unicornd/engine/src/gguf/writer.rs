//! A small GGUF writer, for tests and fixtures.
//!
//! It writes what the reader accepts: a version 3 header, the metadata in insertion order, the
//! tensor directory, and tensor data packed in order at the alignment (`general.alignment` when
//! set as a `u32`, else 32). It does not validate its input: tests use it to build files that
//! are valid except for one deliberate defect, and [`GgufWriter::layout`] tells them where each
//! part landed so they can corrupt it.

use unicorn_kernels::GgmlType;

use super::value::{Array, Value};
use super::DEFAULT_ALIGNMENT;

/// Builds a GGUF file in memory.
#[derive(Clone, Debug, Default)]
pub struct GgufWriter {
    version: Option<u32>,
    kvs: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

#[derive(Clone, Debug)]
struct PendingTensor {
    name: String,
    type_id: u32,
    dims: Vec<u64>,
    data: Vec<u8>,
}

/// Where the parts of a written file are (absolute byte offsets).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Offset of each metadata entry (its key length field).
    pub kv_offsets: Vec<usize>,
    /// Offset of each tensor info (its name length field).
    pub tensor_info_offsets: Vec<usize>,
    /// Start of the data section.
    pub data_offset: usize,
    /// Offset of each tensor's data, relative to the data section.
    pub tensor_data_offsets: Vec<u64>,
}

impl GgufWriter {
    /// An empty version 3 file.
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Write `version` in the header instead of 3.
    pub fn version(&mut self, version: u32) -> &mut GgufWriter {
        self.version = Some(version);
        self
    }

    /// Add a metadata entry (no duplicate check).
    pub fn kv(&mut self, key: &str, value: Value) -> &mut GgufWriter {
        self.kvs.push((key.to_owned(), value));
        self
    }

    /// Add a tensor. `data` is written as given (its length is not checked against `dims`).
    pub fn tensor(
        &mut self,
        name: &str,
        ty: GgmlType,
        dims: &[u64],
        data: Vec<u8>,
    ) -> &mut GgufWriter {
        self.tensor_raw(name, ty.id(), dims, data)
    }

    /// Add a tensor with a raw type id (which may be unknown to the reader).
    pub fn tensor_raw(
        &mut self,
        name: &str,
        type_id: u32,
        dims: &[u64],
        data: Vec<u8>,
    ) -> &mut GgufWriter {
        self.tensors.push(PendingTensor {
            name: name.to_owned(),
            type_id,
            dims: dims.to_vec(),
            data,
        });
        self
    }

    fn alignment(&self) -> usize {
        self.kvs
            .iter()
            .find_map(|(k, v)| match (k.as_str(), v) {
                ("general.alignment", Value::U32(a)) if *a > 0 => Some(*a as usize),
                _ => None,
            })
            .unwrap_or(DEFAULT_ALIGNMENT as usize)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.build().0
    }

    /// The file's bytes and where its parts are.
    pub fn build(&self) -> (Vec<u8>, Layout) {
        let align = self.alignment();
        let mut out = Vec::new();
        let mut layout = Layout::default();
        out.extend_from_slice(b"GGUF");
        put_u32(&mut out, self.version.unwrap_or(3));
        put_u64(&mut out, self.tensors.len() as u64);
        put_u64(&mut out, self.kvs.len() as u64);
        for (k, v) in &self.kvs {
            layout.kv_offsets.push(out.len());
            put_str(&mut out, k);
            put_u32(&mut out, v.value_type().id());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            layout.tensor_info_offsets.push(out.len());
            put_str(&mut out, &t.name);
            put_u32(&mut out, t.dims.len() as u32);
            for &d in &t.dims {
                put_u64(&mut out, d);
            }
            put_u32(&mut out, t.type_id);
            put_u64(&mut out, offset);
            layout.tensor_data_offsets.push(offset);
            offset = (offset + t.data.len() as u64).next_multiple_of(align as u64);
        }
        out.resize(out.len().next_multiple_of(align), 0);
        layout.data_offset = out.len();
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            out.resize(
                layout.data_offset + (out.len() - layout.data_offset).next_multiple_of(align),
                0,
            );
        }
        (out, layout)
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    put_u32(out, a.element_type().id());
    put_u64(out, a.len() as u64);
    macro_rules! le {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => le!(v),
        Array::U16(v) => le!(v),
        Array::I16(v) => le!(v),
        Array::U32(v) => le!(v),
        Array::I32(v) => le!(v),
        Array::F32(v) => le!(v),
        Array::U64(v) => le!(v),
        Array::I64(v) => le!(v),
        Array::F64(v) => le!(v),
        Array::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        Array::String(v) => v.iter().for_each(|s| put_str(out, s)),
        Array::Array(v) => v.iter().for_each(|inner| put_array(out, inner)),
    }
}
