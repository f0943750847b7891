//! Loaded models, shared by every session that loads the same file or the same bytes.
//!
//! A client opens its GGUF file itself and passes the descriptor (the daemon never opens a path a
//! client names). Whether the daemon may map that file directly depends on who can change it:
//!
//! - a memfd sealed against writing, shrinking and growing cannot change: mapped;
//! - a regular file owned by root, or by the daemon's user when that is not the client's, and
//!   writable by nobody else: mapped;
//! - anything else could shrink under the mapping (SIGBUS) or change after validation, so it is
//!   copied once, with positioned reads, into a memfd the daemon owns and seals; the copy is
//!   what gets validated and used. The copy holds the matrices the CPU multiplies in the tiled
//!   layout its products read (`unicorn_kernels::tiled`), so the model is in memory once, in
//!   that layout (a mapped file is tiled by the engine instead, which gives the file's pages
//!   back).
//!
//! Either way the bytes are hashed (BLAKE3) and the model is registered under its file identity
//! and its digest: a session loading a file already loaded (same identity), or other bytes that
//! are the same model (same digest), gets the loaded model instead of a second copy.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use memmap2::{Mmap, MmapOptions};
use nix::fcntl::SealFlag;
use unicorn::protocol::vocab::{self, Vocab};
use unicorn::protocol::ModelInfo;
use unicorn::sys::memfd;
use unicorn::{Error, Status};
use unicorn_engine::gguf::{GgufFile, MatrixAt};
use unicorn_engine::model::Model;
use unicorn_kernels::tiled::TiledWeights;
use unicorn_kernels::WeightView;

/// Who may change a file: what decides between mapping and copying.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

/// How the daemon holds a model's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// The client's file, mapped: nobody but root (or the daemon) can change it.
    Mapped,
    /// A private copy in a sealed memfd.
    Copied,
}

impl Storage {
    pub fn name(self) -> &'static str {
        match self {
            Storage::Mapped => "mapped",
            Storage::Copied => "copied",
        }
    }
}

/// A model as the daemon holds it.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: Model,
    /// BLAKE3 of the file's bytes, hex.
    pub digest: String,
    pub identity: FileIdentity,
    pub storage: Storage,
    /// The vocabulary for clients: a sealed memfd each session receives with its welcome.
    pub vocab: OwnedFd,
    pub size: u64,
}

impl LoadedModel {
    /// What a session is told about the model.
    pub fn info(&self, handle: u32, shared: bool) -> ModelInfo {
        let hp = self.model.hparams();
        let tok = self.model.tokenizer();
        ModelInfo {
            handle,
            arch: hp.arch.clone(),
            name: self.model.name().to_owned(),
            file_type: self.model.file_type().to_owned(),
            n_vocab: hp.n_vocab as u32,
            n_ctx_train: hp.n_ctx_train as u32,
            n_embd: hp.n_embd as u32,
            n_layer: hp.n_layer as u32,
            n_head: hp.n_head as u32,
            n_head_kv: hp.n_head_kv as u32,
            n_params: self.model.n_params(),
            size_bytes: self.size,
            bos: tok.bos().unwrap_or(u32::MAX),
            eos: tok.eos().unwrap_or(u32::MAX),
            add_bos: tok.add_bos(),
            digest: self.digest.clone(),
            shared,
            chat_template: self.model.chat_template().to_owned(),
        }
    }
}

/// Loaded models by identity and by digest. A model lives while a session or context holds it,
/// and for the keep-alive time after the last one lets go (`held`).
#[derive(Debug, Default)]
pub struct Registry {
    by_identity: HashMap<FileIdentity, Weak<LoadedModel>>,
    by_digest: HashMap<String, Weak<LoadedModel>>,
    /// Every loaded model, with the moment it became unused (only the registry holds it).
    held: Vec<(Arc<LoadedModel>, Option<Instant>)>,
}

impl Registry {
    /// The live model loaded from this file identity, if any.
    pub fn by_identity(&mut self, id: &FileIdentity) -> Option<Arc<LoadedModel>> {
        let found = self.by_identity.get(id).and_then(Weak::upgrade);
        if found.is_none() {
            self.by_identity.remove(id);
        }
        found
    }

    /// Registers a freshly loaded model, or returns the live one with the same digest (the
    /// fresh one is then dropped). The second value says whether it was already there.
    pub fn insert(&mut self, m: LoadedModel) -> (Arc<LoadedModel>, bool) {
        self.by_identity.retain(|_, w| w.strong_count() > 0);
        self.by_digest.retain(|_, w| w.strong_count() > 0);
        let id = m.identity;
        if let Some(existing) = self.by_digest.get(&m.digest).and_then(Weak::upgrade) {
            self.by_identity.insert(id, Arc::downgrade(&existing));
            return (existing, true);
        }
        let m = Arc::new(m);
        self.by_identity.insert(id, Arc::downgrade(&m));
        self.by_digest.insert(m.digest.clone(), Arc::downgrade(&m));
        self.held.push((m.clone(), None));
        (m, false)
    }

    /// Unloads models unused for `keep_alive`; returns how long until the next one expires.
    pub fn sweep(&mut self, now: Instant, keep_alive: Duration) -> Option<Duration> {
        let mut next: Option<Duration> = None;
        let before = self.held.len();
        self.held.retain_mut(|(m, idle_since)| {
            if Arc::strong_count(m) > 1 {
                *idle_since = None;
                return true;
            }
            let since = *idle_since.get_or_insert(now);
            let left = keep_alive.saturating_sub(now.duration_since(since));
            if left.is_zero() {
                log::info!("unloading model {:?} ({})", m.model.name(), &m.digest[..16]);
                return false;
            }
            next = Some(next.map_or(left, |n| n.min(left)));
            true
        });
        if self.held.len() < before {
            return_free_heap();
        }
        next
    }

    /// Every live model.
    pub fn live(&self) -> Vec<Arc<LoadedModel>> {
        self.by_digest.values().filter_map(Weak::upgrade).collect()
    }
}

/// The identity of the file behind `fd`, checked to be something a model can be read from.
pub fn identify(fd: &impl AsFd, max_bytes: u64) -> Result<FileIdentity, Error> {
    let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| Error::os("fstat", e))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Error::new(
            Status::InvalidArgument,
            "the model descriptor is not a regular file",
        ));
    }
    let size = u64::try_from(st.st_size).unwrap_or(0);
    if size > max_bytes {
        return Err(Error::new(
            Status::LimitExceeded,
            format!("the model file is {size} bytes; this session may load at most {max_bytes}"),
        ));
    }
    Ok(FileIdentity {
        dev: st.st_dev,
        ino: st.st_ino,
        size,
        mtime_ns: i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec),
    })
}

/// Whether the daemon may map `file` directly (see the module docs).
fn immutable(file: &File, client_uid: u32, daemon_uid: u32) -> bool {
    if let Ok(seals) = memfd::seals(file) {
        let needed = SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW;
        return seals.contains(needed);
    }
    let Ok(meta) = file.metadata() else { return false };
    let owner_trusted = meta.uid() == 0 || meta.uid() == daemon_uid;
    owner_trusted && meta.uid() != client_uid && meta.mode() & 0o022 == 0
}

/// Loads a model from a client's descriptor. Runs on a loader thread: it reads the whole file.
pub fn load(
    fd: OwnedFd,
    id: FileIdentity,
    client_uid: u32,
    daemon_uid: u32,
) -> Result<LoadedModel, Error> {
    let file = File::from(fd);
    let (gguf, storage, digest) = if immutable(&file, client_uid, daemon_uid) {
        // SAFETY: `immutable` established that nobody but root or this daemon can change or
        // shrink the file while it is mapped.
        let map = unsafe { map_read_only(&file) }?;
        check_size(&map, id.size)?;
        let digest = blake3::hash(&map).to_hex().to_string();
        // A memfd's (or a tmpfs file's) pages stay in memory: no second layout beside them.
        let gguf = GgufFile::from_mapped_file(&file, map);
        (gguf.map_err(|e| bad_model(&e))?, Storage::Mapped, digest)
    } else {
        let (map, tiled, digest) = copy_to_sealed_memfd(&file, id.size)?;
        check_size(&map, id.size)?;
        let gguf = GgufFile::from_memfd_tiled(map, tiled).map_err(|e| bad_model(&e))?;
        (gguf, Storage::Copied, digest)
    };
    let model = Model::load(gguf).map_err(|e| bad_model(&e))?;
    let vocab = vocab_memfd(&model)?;
    Ok(LoadedModel { model, digest, identity: id, storage, vocab, size: id.size })
}

/// Hands the heap's free pages back to the system. glibc keeps freed memory for the next
/// allocations, and a model's load and unload free megabytes that the daemon would then hold
/// for nothing: the parse and its vocabulary arrays (dropped once the tokenizer holds them),
/// the copy's tiling buffers, at unload the tokenizer's tables. (With SmolLM2 and one client,
/// the daemon holds 114 MB instead of 124.)
pub fn return_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `malloc_trim` only gives back memory the allocator holds free; it takes no
    // pointer and may run beside other threads' allocations.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn check_size(map: &Mmap, size: u64) -> Result<(), Error> {
    if map.len() as u64 != size {
        return Err(Error::new(
            Status::InvalidArgument,
            "the model file changed size while loading",
        ));
    }
    Ok(())
}

fn bad_model(e: &dyn std::fmt::Display) -> Error {
    Error::new(Status::InvalidArgument, format!("not a usable model: {e}"))
}

/// Copies `size` bytes of `file` with positioned reads (the client shares the file offset) into a
/// new memfd, seals it, and maps the copy read-only.
/// Copies the model into a memfd the daemon owns, with the matrices the CPU products read
/// tiled written in the tiled layout instead of GGUF's, seals it and maps it: the model is then
/// held once, in the layout the products read (a memfd's pages stay in memory, so tiles made
/// later would double it). Returns the mapping, the tiled byte ranges and the BLAKE3 digest of
/// the file's own bytes.
fn copy_to_sealed_memfd(
    file: &File,
    size: u64,
) -> Result<(Mmap, Vec<std::ops::Range<usize>>, String), Error> {
    let len =
        usize::try_from(size).map_err(|_| Error::new(Status::LimitExceeded, "model too large"))?;
    let copy = memfd::create_memfd("model", len)?;
    let out = File::from(copy);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let want = buf.len().min((size - off) as usize);
        let n =
            file.read_at(&mut buf[..want], off).map_err(|e| Error::os("reading the model", e))?;
        if n == 0 {
            return Err(Error::new(
                Status::InvalidArgument,
                "the model file shrank while it was copied",
            ));
        }
        hasher.update(&buf[..n]);
        out.write_all_at(&buf[..n], off).map_err(|e| Error::os("copying the model", e))?;
        off += n as u64;
    }
    let digest = hasher.finalize().to_hex().to_string();
    let tiled = tile_copy(&out)?;
    memfd::add_seals(&out, memfd::REQUIRED_SEALS | SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SEAL)?;
    // SAFETY: the memfd is this daemon's own and sealed against writing, shrinking and growing.
    Ok((unsafe { map_read_only(&out) }?, tiled, digest))
}

/// Rewrites, in the daemon's unsealed copy `out`, every matrix this CPU tiles (each matrix of a
/// 2-D tensor `[cols, rows]` or of a 3-D stack `[cols, rows, n]`, as the engine loads them) in
/// the tiled layout, one matrix at a time, and returns their byte ranges. A file that does not
/// parse is left as it is: loading it reports why.
fn tile_copy(out: &File) -> Result<Vec<std::ops::Range<usize>>, Error> {
    // The matrices, read from a mapping dropped before anything is written.
    let plan = {
        // SAFETY: the memfd is this daemon's own and nothing writes to it while this mapping
        // lives (it is dropped at the end of this block).
        let map = unsafe { map_read_only(out) }?;
        match GgufFile::from_memfd(map) {
            Ok(gguf) => gguf.matrices_to_tile(),
            Err(_) => return Ok(Vec::new()),
        }
    };
    // A group of eight rows tiles into exactly those rows' bytes, so each matrix is tiled in
    // place a slice of rows at a time: the buffers stay small (a matrix-sized one would stay in
    // the allocator's heap after the load, tens of MB).
    const ROWS: usize = 512;
    let mut tiled = Vec::with_capacity(plan.len());
    let mut buf = Vec::new();
    for MatrixAt { range, ty, rows, cols } in plan {
        let row_bytes = range.len() / rows;
        for r0 in (0..rows).step_by(ROWS) {
            let n = ROWS.min(rows - r0);
            let at = (range.start + r0 * row_bytes) as u64;
            buf.resize(n * row_bytes, 0);
            out.read_exact_at(&mut buf, at).map_err(|e| Error::os("reading the model copy", e))?;
            let view = WeightView::new(ty, n, cols, &buf).map_err(|e| bad_model(&e))?;
            let tiles = TiledWeights::new(&view)
                .ok_or_else(|| Error::new(Status::Internal, "a matrix to tile was refused"))?;
            out.write_all_at(tiles.as_bytes(), at)
                .map_err(|e| Error::os("tiling the model copy", e))?;
        }
        tiled.push(range);
    }
    Ok(tiled)
}

/// A private read-only mapping. A write-sealed memfd refuses shared mappings of a descriptor
/// opened for writing; a private one it allows, and nothing is ever written through it, so no
/// page is ever copied.
///
/// # Safety
/// The file must not change or shrink while mapped.
unsafe fn map_read_only(file: &File) -> Result<Mmap, Error> {
    // SAFETY: forwarded to the caller.
    unsafe { MmapOptions::new().map_copy_read_only(file) }.map_err(|e| Error::os("mmap", e))
}

/// The model's vocabulary as clients need it for detokenizing, in a sealed memfd.
fn vocab_memfd(model: &Model) -> Result<OwnedFd, Error> {
    let tok = model.tokenizer();
    let n = tok.n_vocab() as u32;
    let mut pieces = Vec::with_capacity(n as usize);
    for id in 0..n {
        let special = tok.token_to_piece(id, true).map_err(|e| bad_model(&e))?;
        let plain = tok.token_to_piece(id, false).map_err(|e| bad_model(&e))?;
        let mut flags = 0;
        if plain.is_empty() && !special.is_empty() {
            flags |= vocab::CONTROL;
        }
        if tok.is_eog(id) {
            flags |= vocab::EOG;
        }
        pieces.push((special, flags));
    }
    let vocab = Vocab::new(pieces);
    let bytes = vocab.as_bytes();
    let fd = memfd::create_memfd("vocab", bytes.len())?;
    let file = File::from(fd);
    file.write_all_at(bytes, 0).map_err(|e| Error::os("writing the vocabulary", e))?;
    memfd::add_seals(
        &file,
        memfd::REQUIRED_SEALS | SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SEAL,
    )?;
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use unicorn_engine::gguf::writer::GgufWriter;
    use unicorn_kernels::formats::quantize_row;
    use unicorn_kernels::tiled::TiledView;
    use unicorn_kernels::GgmlType;

    fn quantized(ty: GgmlType, rows: usize, cols: usize, seed: f32) -> Vec<u8> {
        let rb = ty.row_bytes(cols as u64).unwrap() as usize;
        let mut data = vec![0u8; rows * rb];
        for (r, dst) in data.chunks_mut(rb).enumerate() {
            let src: Vec<f32> = (0..cols).map(|c| ((r * 31 + c * 7) as f32 * seed).sin()).collect();
            quantize_row(ty, &src, dst).unwrap();
        }
        data
    }

    /// The copy holds every tileable matrix tiled (a 2-D one, each of a 3-D stack), exactly as
    /// `TiledWeights` lays it out, and everything else as the file has it.
    #[test]
    fn the_copy_holds_the_tileable_matrices_tiled_and_the_rest_as_is() {
        // More rows than one slice of the in-place tiling.
        let q8 = quantized(GgmlType::Q8_0, 1040, 32, 0.1);
        let stack = quantized(GgmlType::Q4_1, 8 * 3, 32, 0.2);
        let odd = quantized(GgmlType::Q4_0, 12, 32, 0.3);
        let norm: Vec<u8> = (0..64u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mut w = GgufWriter::new();
        w.tensor("a", GgmlType::Q8_0, &[32, 1040], q8.clone())
            .tensor("b", GgmlType::Q4_1, &[32, 8, 3], stack.clone())
            .tensor("c", GgmlType::Q4_0, &[32, 12], odd.clone())
            .tensor("d", GgmlType::F32, &[64], norm.clone());
        let bytes = w.to_bytes();
        let src = File::from(memfd::create_memfd("src", bytes.len()).unwrap());
        src.write_all_at(&bytes, 0).unwrap();
        let (map, tiled, digest) = copy_to_sealed_memfd(&src, bytes.len() as u64).unwrap();
        assert_eq!(digest, blake3::hash(&bytes).to_hex().to_string(), "the file's own digest");
        let gguf = GgufFile::from_memfd_tiled(map, tiled.clone()).unwrap();
        let data = |name: &str| {
            let t = gguf.tensor(name).unwrap();
            let at = t.data.as_ptr() as usize - gguf.bytes().as_ptr() as usize;
            (at..at + t.data.len(), t.data)
        };
        if !TiledWeights::supports(GgmlType::Q8_0, 1040) {
            assert!(tiled.is_empty(), "no tiles where the CPU has no AVX2");
            return;
        }
        let (ra, a) = data("a");
        let (rb, b) = data("b");
        let each = rb.len() / 3;
        let want: Vec<_> = std::iter::once(ra.clone())
            .chain((0..3).map(|i| rb.start + i * each..rb.start + (i + 1) * each))
            .collect();
        assert_eq!(tiled, want, "a, then b's three matrices; c has 12 rows, d is a vector");
        let expect = |ty, rows, cols, file: &[u8]| {
            let v = WeightView::new(ty, rows, cols, file).unwrap();
            TiledWeights::new(&v).unwrap().as_bytes().to_vec()
        };
        assert_eq!(a, &expect(GgmlType::Q8_0, 1040, 32, &q8)[..]);
        for (i, m) in b.chunks(each).enumerate() {
            let file = &stack[i * each..(i + 1) * each];
            assert_eq!(m, &expect(GgmlType::Q4_1, 8, 32, file)[..], "matrix {i} of b");
            let v = TiledView::new(GgmlType::Q4_1, 8, 32, m).unwrap();
            assert_eq!(v.gguf_bytes(), file, "matrix {i} of b reads back");
        }
        assert_eq!(data("c").1, &odd[..]);
        assert_eq!(data("d").1, &norm[..]);
        assert_eq!(gguf.tiled(&ra), Some(true));
        assert_eq!(gguf.tiled(&(ra.start..ra.start + 8)), Some(false));
        assert_eq!(gguf.tiled(&data("c").0), None);
    }
}
