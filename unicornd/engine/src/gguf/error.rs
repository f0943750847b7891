//! Errors of the GGUF reader: one variant per validation the reader performs, each carrying the
//! key, tensor or file offset concerned.

use std::io;
use std::path::PathBuf;

/// Why a GGUF file could not be read, or why a metadata key / tensor lookup failed.
///
/// Every variant names what was being read (and where), so that a message about a bad model
/// file can be acted on without a hex editor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    #[error("cannot open GGUF file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot map GGUF file: {0}")]
    Map(#[source] io::Error),
    #[error("not a GGUF file: magic is {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("GGUF version {0} is not supported (unicorn reads versions 2 and 3)")]
    UnsupportedVersion(u32),
    #[error("big-endian GGUF files are not supported")]
    BigEndian,
    #[error(
        "file truncated: {what} at offset {offset} needs {needed} bytes, only {available} left"
    )]
    Truncated { what: String, offset: u64, needed: u64, available: u64 },
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },
    #[error("{what} at offset {offset}: count {count} cannot fit in the {available} bytes left")]
    CountTooLarge { what: String, offset: u64, count: u64, available: u64 },
    #[error("empty metadata key at offset {offset}")]
    EmptyKey { offset: u64 },
    #[error("duplicate metadata key {0:?}")]
    DuplicateKey(String),
    #[error("metadata key {key:?}: unknown value type {id}")]
    UnknownValueType { key: String, id: u32 },
    #[error("metadata key {key:?}: arrays nested deeper than {max} levels")]
    NestingTooDeep { key: String, max: usize },
    #[error("metadata key {key:?}: invalid bool byte {value} (must be 0 or 1)")]
    InvalidBool { key: String, value: u8 },
    #[error("general.alignment must be a u32 power of two, found {0}")]
    BadAlignment(String),
    #[error("empty tensor name at offset {offset}")]
    EmptyTensorName { offset: u64 },
    #[error("tensor name {name:?} is {len} bytes long, the limit is {max}")]
    TensorNameTooLong { name: String, len: usize, max: usize },
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    #[error("tensor {tensor:?} has {n_dims} dimensions, at most {max} are supported")]
    TooManyDims { tensor: String, n_dims: u32, max: usize },
    #[error("tensor {tensor:?}: dimension {index} has invalid size {size} (must be 1..=2^63-1)")]
    BadDim { tensor: String, index: usize, size: u64 },
    #[error("unsupported tensor type {id} for tensor {tensor:?}")]
    UnsupportedTensorType { tensor: String, id: u32 },
    #[error(
        "tensor {tensor:?}: row of {row} elements is not a whole number of {ty} blocks ({block} elements)"
    )]
    PartialBlock { tensor: String, ty: unicorn_kernels::GgmlType, row: u64, block: usize },
    #[error("tensor {tensor:?}: element count or byte size overflows")]
    TensorTooLarge { tensor: String },
    #[error(
        "tensor {tensor:?}: data offset {offset} is not a multiple of the alignment {alignment}"
    )]
    TensorMisaligned { tensor: String, offset: u64, alignment: u64 },
    #[error(
        "tensor {tensor:?}: data at file bytes {start}..{end} is outside the data section (file is {file_len} bytes)"
    )]
    TensorOutOfBounds { tensor: String, start: u64, end: u64, file_len: u64 },
    #[error("tensors {first:?} and {second:?} overlap in the data section")]
    TensorOverlap { first: String, second: String },
    #[error("offset overflow while reading {0}")]
    OffsetOverflow(String),
    #[error("metadata key {0:?} not found")]
    MissingKey(String),
    #[error("metadata key {key:?} has type {found}, expected {expected}")]
    WrongType { key: String, expected: &'static str, found: String },
    #[error("tensor {0:?} not found")]
    MissingTensor(String),
}
