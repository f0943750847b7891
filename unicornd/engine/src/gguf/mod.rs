//! GGUF (versions 3 and 2) reader: header, typed metadata, tensor directory, tensor data views.
//!
//! A model file reaches the daemon from a client, so the reader treats it as hostile input. It
//! validates, before using or allocating anything:
//!
//! - the magic, and the version: 3, or 2, which has the same layout (version 3 only added
//!   big-endian files; those are recognised by their byte-swapped version and rejected, as
//!   unicorn only runs on little-endian machines). Version 1 (32-bit counts) is rejected;
//! - every count (metadata entries, tensors, array elements) against the bytes left in the file,
//!   so a claimed count of 2^60 fails at once instead of allocating. Memory use is proportional
//!   to what the file really contains: numeric arrays allocate exactly the bytes they occupy in
//!   the file, everything else is reserved in small steps and grows only as entries are read;
//! - every string length against the bytes left, and every string's UTF-8;
//! - metadata keys (non-empty, unique), value type tags, bools (0 or 1), array nesting (at most
//!   [`MAX_ARRAY_NESTING`] levels, so recursion is bounded);
//! - `general.alignment` (a `u32` power of two; 32 when absent);
//! - tensor infos: unique non-empty names of at most [`MAX_TENSOR_NAME_LEN`] bytes, at most
//!   [`MAX_DIMS`] dimensions each in `1..=i64::MAX` whose product fits an `i64`, a tensor type
//!   known to [`GgmlType`] (else "unsupported tensor type N for tensor X"), rows that are whole
//!   blocks of that type, offsets that are multiples of the alignment;
//! - tensor extents: `data_start + offset + size` is computed with checked arithmetic and must
//!   lie inside the file, and no two tensors may share a byte (gaps between tensors are allowed;
//!   llama.cpp is stricter and requires them packed in order, but nothing in unicorn depends on
//!   that, and overlap is what could make two weights alias each other).
//!
//! Metadata is copied out into owned [`Value`]s while parsing; tensor data stays in the mapping
//! and is handed out as borrowed [`TensorView`]s. Dimensions are in ggml order: `dims[0]` is the
//! row length (the fastest-varying index).

mod error;
mod parse;
mod value;
pub mod writer;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::Path;

use memmap2::{Mmap, UncheckedAdvice};
use unicorn_kernels::tiled::TiledWeights;
use unicorn_kernels::GgmlType;

pub use error::GgufError;
pub use value::{Array, Value, ValueType};

/// Alignment of the data section and of tensor offsets when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Longest tensor name, in bytes (the GGUF specification's limit).
pub const MAX_TENSOR_NAME_LEN: usize = 64;
/// Most levels of arrays in one metadata value (an array of arrays is two levels).
pub const MAX_ARRAY_NESTING: usize = 8;

/// One matrix of a file: its bytes and shape ([`GgufFile::matrices_to_tile`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatrixAt {
    pub range: std::ops::Range<usize>,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
}

/// Where a file's bytes live: a mapping (whose pages can be released) or any container.
enum Source {
    Map(Mmap),
    Other(Box<dyn AsRef<[u8]> + Send + Sync>),
}

impl Source {
    fn bytes(&self) -> &[u8] {
        match self {
            Source::Map(m) => m,
            Source::Other(b) => (**b).as_ref(),
        }
    }
}

/// Whether `file`'s pages live in memory whether mapped or not: a memfd, or a file on tmpfs,
/// ramfs or hugetlbfs. Releasing its mapped pages frees nothing, so a model in it should not be
/// laid out a second time ([`GgufFile::from_memfd`]).
pub fn held_in_memory(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    const TMPFS: i64 = 0x0102_1994;
    const RAMFS: i64 = 0x8584_58f6;
    const HUGETLBFS: i64 = 0x9584_58f6;
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the borrow of `file`, and `st` is a valid, writable
    // `statfs` the call fills.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let ty = st.f_type as i64;
    matches!(ty, TMPFS | RAMFS | HUGETLBFS)
}

/// The system's page size.
fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// A parsed GGUF file, with its bytes (usually a read-only memory mapping) kept alive.
pub struct GgufFile {
    source: Source,
    /// Byte ranges of matrices these bytes hold in the tiled layout instead of GGUF's (a model
    /// copy the daemon wrote so: [`GgufFile::from_memfd_tiled`]), sorted by start.
    tiled: Vec<std::ops::Range<usize>>,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("len", &self.len())
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("metadata_entries", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Open and map the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let file =
            File::open(path).map_err(|source| GgufError::Open { path: path.to_owned(), source })?;
        GgufFile::from_file(&file)
    }

    /// Map an already opened file (for example one built from a file descriptor a client
    /// passed in) and parse it. The mapping is independent of `file`, which may be closed after.
    ///
    /// The mapping is read-only, but its contents are only stable if nobody writes to or
    /// shrinks the file while it is mapped (a shrunk file faults on access). For descriptors
    /// from untrusted processes, pass a sealed memfd (`F_SEAL_SHRINK | F_SEAL_WRITE`), or copy
    /// the bytes and use [`GgufFile::from_bytes`].
    pub fn from_file(file: &File) -> Result<GgufFile, GgufError> {
        // SAFETY: the map is read-only and we never create a mutable view of it. Its contents
        // stay valid and unchanged as long as the file is not truncated or written while mapped,
        // which is the documented contract of this function (callers hand in files they own or
        // sealed memfds). Every access is bounds-checked against the mapping length.
        let map = unsafe { Mmap::map(file) }.map_err(GgufError::Map)?;
        GgufFile::from_mapped_file(file, map)
    }

    /// Parse `map`, a read-only mapping of `file`: as [`GgufFile::from_memfd`] when `file` is
    /// held in memory anyway ([`held_in_memory`]: its pages cannot be given back), else as
    /// [`GgufFile::from_mmap`].
    pub fn from_mapped_file(file: &File, map: Mmap) -> Result<GgufFile, GgufError> {
        if held_in_memory(file) {
            GgufFile::from_memfd(map)
        } else {
            GgufFile::from_mmap(map)
        }
    }

    /// Parse an existing mapping, which must map a file (a regular file or a memfd), not
    /// anonymous memory: [`GgufFile::release_pages`] drops pages of it that are read again from
    /// the file when touched.
    pub fn from_mmap(map: Mmap) -> Result<GgufFile, GgufError> {
        GgufFile::parse_source(Source::Map(map))
    }

    /// Parse a mapping of a memfd (the daemon's copy of a model, or a client's sealed one): its
    /// pages stay in the memfd whether this process maps them or not, so releasing them would
    /// free nothing, and the engine keeps the weights in the file's layout instead of adding a
    /// second one ([`GgufFile::releases_pages`] is false).
    pub fn from_memfd(map: Mmap) -> Result<GgufFile, GgufError> {
        GgufFile::from_source(map)
    }

    /// As [`GgufFile::from_memfd`], for a copy whose matrices at `tiled` (byte ranges, each one
    /// matrix of a 2-D tensor or of a 3-D stack, as the engine loads them) were written in the
    /// tiled layout ([`unicorn_kernels::tiled`]) instead of GGUF's: the model then holds its
    /// weights once, tiled. The engine reads those matrices only through their tiles.
    pub fn from_memfd_tiled(
        map: Mmap,
        mut tiled: Vec<std::ops::Range<usize>>,
    ) -> Result<GgufFile, GgufError> {
        let mut f = GgufFile::from_source(map)?;
        tiled.sort_by_key(|r| r.start);
        f.tiled = tiled;
        Ok(f)
    }

    /// The matrices this CPU's products would read tiled, as the engine loads them: each 2-D
    /// tensor `[cols, rows]` and each matrix of a 3-D stack `[cols, rows, n]` of a type and row
    /// count [`TiledWeights::supports`]. For writing a copy of the model in the tiled layout
    /// ([`GgufFile::from_memfd_tiled`]).
    pub fn matrices_to_tile(&self) -> Vec<MatrixAt> {
        let base = self.bytes().as_ptr() as usize;
        let mut out = Vec::new();
        for t in self.tensors() {
            let (cols, rows, n) = match t.dims[..] {
                [c, r] => (c, r, 1),
                [c, r, n] => (c, r, n),
                _ => continue,
            };
            let (Ok(cols), Ok(rows), Ok(n)) =
                (usize::try_from(cols), usize::try_from(rows), usize::try_from(n))
            else {
                continue;
            };
            if n == 0 || !TiledWeights::supports(t.ty, rows) {
                continue;
            }
            let start = t.data.as_ptr() as usize - base;
            let each = t.data.len() / n;
            for i in 0..n {
                let range = start + i * each..start + (i + 1) * each;
                out.push(MatrixAt { range, ty: t.ty, rows, cols });
            }
        }
        out
    }

    /// How these bytes hold `range`: `Some(true)` when it is exactly one of the tiled
    /// matrices, `Some(false)` when it overlaps one without being it (a split the engine does
    /// not read), `None` when it is in GGUF layout.
    pub fn tiled(&self, range: &std::ops::Range<usize>) -> Option<bool> {
        let i = self.tiled.partition_point(|r| r.end <= range.start);
        let r = self.tiled.get(i).filter(|r| r.start < range.end)?;
        Some(r == range)
    }

    /// Parse bytes held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        GgufFile::from_source(bytes)
    }

    /// Parse any byte container (a mapping, a `Vec<u8>`, an `Arc<[u8]>`, `&'static [u8]`, ...).
    pub fn from_source<S>(source: S) -> Result<GgufFile, GgufError>
    where
        S: AsRef<[u8]> + Send + Sync + 'static,
    {
        GgufFile::parse_source(Source::Other(Box::new(source)))
    }

    fn parse_source(source: Source) -> Result<GgufFile, GgufError> {
        let parsed = parse::parse(source.bytes())?;
        Ok(GgufFile {
            source,
            tiled: Vec::new(),
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            tensor_index: parsed.tensor_index,
        })
    }

    /// The file's GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of the data section and tensor offsets.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset where the data section (tensor offset 0) starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Length of the whole file in bytes.
    pub fn len(&self) -> u64 {
        self.bytes().len() as u64
    }

    /// Whether the file is empty (never true for a parsed file).
    pub fn is_empty(&self) -> bool {
        self.bytes().is_empty()
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.source.bytes()
    }

    /// Whether [`GgufFile::release_pages`] gives memory back: only for a mapped file on a
    /// filesystem, whose pages the page cache can drop and read again. Weights laid out a second time replace the
    /// file's pages only then; otherwise they would be held twice.
    pub fn releases_pages(&self) -> bool {
        matches!(self.source, Source::Map(_))
    }

    /// Tells the kernel this process no longer needs the mapped pages inside `range` (file
    /// offsets; only whole pages, so neighbouring data is untouched): a weight matrix now held
    /// in another layout. The pages leave this process's resident set; reading the range again
    /// faults them back in from the page cache with the same contents, so this changes memory
    /// use, never what is read. Nothing happens for files held in memory rather than mapped.
    pub fn release_pages(&self, range: std::ops::Range<usize>) {
        let Source::Map(map) = &self.source else { return };
        let page = page_size();
        let start = range.start.next_multiple_of(page);
        let end = range.end.min(map.len()) / page * page;
        if start >= end {
            return;
        }
        // SAFETY: the mapping is read-only (an `Mmap`) and maps a file (`from_mmap`'s
        // contract), so this process never wrote to it: MADV_DONTNEED only drops this process's
        // page-table entries, and the next access reads the same bytes from the file again
        // (whose stability is `from_file`'s contract). References into the range stay valid;
        // they read identical data.
        let r =
            unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
        if let Err(e) = r {
            log::debug!("madvise(DONTNEED) of {} model bytes: {e}", end - start);
        }
    }

    /// All metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Drops the metadata entries `keys` (those absent are skipped): for what a loaded model
    /// has copied elsewhere and no longer reads here.
    pub fn forget_metadata(&mut self, keys: &[&str]) {
        for k in keys {
            self.metadata.remove(k);
        }
    }

    /// The tensor directory, in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// All tensors with their data, in file order.
    pub fn tensors(&self) -> impl ExactSizeIterator<Item = TensorView<'_>> + '_ {
        self.tensors.iter().map(move |t| self.view(t))
    }

    /// The tensor named `name`, or `None`.
    pub fn get_tensor(&self, name: &str) -> Option<TensorView<'_>> {
        self.tensor_index.get(name).map(|&i| self.view(&self.tensors[i]))
    }

    /// The tensor named `name`, or [`GgufError::MissingTensor`].
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, GgufError> {
        self.get_tensor(name).ok_or_else(|| GgufError::MissingTensor(name.to_owned()))
    }

    /// Shorthand for `self.metadata().get_u32(key)`.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.metadata.get_u32(key)
    }

    /// Shorthand for `self.metadata().get_f32(key)`.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.metadata.get_f32(key)
    }

    /// Shorthand for `self.metadata().get_str(key)`.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.metadata.get_str(key)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.metadata.get_str("general.architecture")
    }

    fn view<'a>(&'a self, t: &'a TensorInfo) -> TensorView<'a> {
        // Extents were checked against the file length at parse time, so these are in bounds
        // and the conversions lossless.
        let start = (self.data_offset + t.offset) as usize;
        let end = start + t.size as usize;
        TensorView { name: &t.name, ty: t.ty, dims: t.dims(), data: &self.bytes()[start..end] }
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    name: String,
    ty: GgmlType,
    dims: [u64; MAX_DIMS],
    n_dims: u8,
    offset: u64,
    size: u64,
}

impl TensorInfo {
    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The element type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Dimensions in ggml order (`dims()[0]` is the row length).
    pub fn dims(&self) -> &[u64] {
        &self.dims[..self.n_dims as usize]
    }

    /// Offset of the data relative to the data section.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Size of the data in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of elements (the product of the dimensions).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A tensor and its bytes, borrowed from the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorView<'a> {
    /// The tensor's name.
    pub name: &'a str,
    /// The element type.
    pub ty: GgmlType,
    /// Dimensions in ggml order (`dims[0]` is the row length).
    pub dims: &'a [u64],
    /// The raw (possibly quantized) data, exactly `ty.row_bytes(dims[0]) * rows` bytes. Its
    /// address is a multiple of the file's alignment when the file is memory-mapped (mappings
    /// are page-aligned); bytes given to [`GgufFile::from_bytes`] only have the allocator's
    /// alignment, so readers of multi-byte values must not assume more.
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Number of rows (the product of all dimensions but the first; 1 for a scalar or vector).
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }

    /// Elements per row (`dims[0]`, or 1 for a scalar).
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }
}

/// The metadata key/value pairs of a file, in file order, with typed accessors.
///
/// The typed getters are strict: `get_u32` succeeds only for a value stored as `u32`. A missing
/// key gives [`GgufError::MissingKey`], a value of another type [`GgufError::WrongType`]; both
/// name the key. The `opt_*` variants return `Ok(None)` for a missing key (but still fail on a
/// wrong type). For integers stored with varying widths, use [`Metadata::get_uint`] or
/// [`Value::as_u64`].
#[derive(Clone, Debug, Default)]
pub struct Metadata {
    entries: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

macro_rules! typed_getters {
    ($( $get:ident, $opt:ident, $variant:ident, $ty:ty, $name:literal; )*) => {
        $(
            #[doc = concat!("The `", $name, "` value of `key`.")]
            pub fn $get(&self, key: &str) -> Result<$ty, GgufError> {
                self.$opt(key)?.ok_or_else(|| GgufError::MissingKey(key.to_owned()))
            }

            #[doc = concat!("The `", $name, "` value of `key`, or `None` when the key is absent.")]
            pub fn $opt(&self, key: &str) -> Result<Option<$ty>, GgufError> {
                match self.get(key) {
                    None => Ok(None),
                    Some(Value::$variant(v)) => Ok(Some(*v)),
                    Some(v) => Err(wrong_type(key, $name, v)),
                }
            }
        )*
    };
}

macro_rules! array_getters {
    ($( $get:ident, $opt:ident, $variant:ident, $ty:ty, $name:literal; )*) => {
        $(
            #[doc = concat!("The `", $name, "` array of `key`.")]
            pub fn $get(&self, key: &str) -> Result<&[$ty], GgufError> {
                self.$opt(key)?.ok_or_else(|| GgufError::MissingKey(key.to_owned()))
            }

            #[doc = concat!("The `", $name, "` array of `key`, or `None` when the key is absent.")]
            pub fn $opt(&self, key: &str) -> Result<Option<&[$ty]>, GgufError> {
                match self.get(key) {
                    None => Ok(None),
                    Some(Value::Array(Array::$variant(v))) => Ok(Some(v)),
                    Some(v) => Err(wrong_type(key, $name, v)),
                }
            }
        )*
    };
}

fn wrong_type(key: &str, expected: &'static str, found: &Value) -> GgufError {
    GgufError::WrongType { key: key.to_owned(), expected, found: found.type_description() }
}

impl Metadata {
    fn with_capacity(n: usize) -> Metadata {
        Metadata { entries: Vec::with_capacity(n), index: HashMap::with_capacity(n) }
    }

    /// Add an entry; `false` (and no change) if the key is already present.
    fn insert(&mut self, key: String, value: Value) -> bool {
        if self.index.contains_key(&key) {
            return false;
        }
        self.index.insert(key.clone(), self.entries.len());
        self.entries.push((key, value));
        true
    }

    /// Takes `key`'s entry out, keeping the others in file order.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let i = self.index.remove(key)?;
        let (_, value) = self.entries.remove(i);
        for j in self.index.values_mut() {
            if *j > i {
                *j -= 1;
            }
        }
        Some(value)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// The value of `key`, of any type.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    /// The value of `key`, of any type, or [`GgufError::MissingKey`].
    pub fn value(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey(key.to_owned()))
    }

    /// All entries in file order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Value)> + '_ {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    typed_getters! {
        get_u8, opt_u8, U8, u8, "u8";
        get_i8, opt_i8, I8, i8, "i8";
        get_u16, opt_u16, U16, u16, "u16";
        get_i16, opt_i16, I16, i16, "i16";
        get_u32, opt_u32, U32, u32, "u32";
        get_i32, opt_i32, I32, i32, "i32";
        get_u64, opt_u64, U64, u64, "u64";
        get_i64, opt_i64, I64, i64, "i64";
        get_f32, opt_f32, F32, f32, "f32";
        get_f64, opt_f64, F64, f64, "f64";
        get_bool, opt_bool, Bool, bool, "bool";
    }

    array_getters! {
        get_u8_array, opt_u8_array, U8, u8, "array[u8]";
        get_i32_array, opt_i32_array, I32, i32, "array[i32]";
        get_u32_array, opt_u32_array, U32, u32, "array[u32]";
        get_i64_array, opt_i64_array, I64, i64, "array[i64]";
        get_u64_array, opt_u64_array, U64, u64, "array[u64]";
        get_f32_array, opt_f32_array, F32, f32, "array[f32]";
        get_bool_array, opt_bool_array, Bool, bool, "array[bool]";
        get_str_array, opt_str_array, String, String, "array[string]";
    }

    /// The string value of `key`.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.opt_str(key)?.ok_or_else(|| GgufError::MissingKey(key.to_owned()))
    }

    /// The string value of `key`, or `None` when the key is absent.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong_type(key, "string", v)),
        }
    }

    /// The array value of `key`, of any element type.
    pub fn get_array(&self, key: &str) -> Result<&Array, GgufError> {
        self.opt_array(key)?.ok_or_else(|| GgufError::MissingKey(key.to_owned()))
    }

    /// The array value of `key`, or `None` when the key is absent.
    pub fn opt_array(&self, key: &str) -> Result<Option<&Array>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(wrong_type(key, "array", v)),
        }
    }

    /// Any non-negative integer value of `key` as `u64`, whatever its stored width.
    pub fn get_uint(&self, key: &str) -> Result<u64, GgufError> {
        self.opt_uint(key)?.ok_or_else(|| GgufError::MissingKey(key.to_owned()))
    }

    /// Like [`Metadata::get_uint`], `None` when the key is absent.
    pub fn opt_uint(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().map(Some).ok_or_else(|| wrong_type(key, "non-negative integer", v))
            }
        }
    }
}
