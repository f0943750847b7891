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
//!   what gets validated and used.
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
use unicorn_engine::gguf::{held_in_memory, GgufFile};
use unicorn_engine::model::Model;

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
    let (map, storage) = if immutable(&file, client_uid, daemon_uid) {
        // SAFETY: `immutable` established that nobody but root or this daemon can change or
        // shrink the file while it is mapped.
        let map = unsafe { map_read_only(&file) }?;
        (map, Storage::Mapped)
    } else {
        (copy_to_sealed_memfd(&file, id.size)?, Storage::Copied)
    };
    if map.len() as u64 != id.size {
        return Err(Error::new(
            Status::InvalidArgument,
            "the model file changed size while loading",
        ));
    }
    let digest = blake3::hash(&map).to_hex().to_string();
    // A memfd's pages (or a tmpfs file's) stay in memory while it lives: the engine must not
    // lay its weights out a second time beside them (a disk file's pages, it can give back).
    let in_memory = storage == Storage::Copied || held_in_memory(&file);
    let gguf = if in_memory { GgufFile::from_memfd(map) } else { GgufFile::from_mmap(map) }
        .map_err(|e| bad_model(&e))?;
    let model = Model::load(gguf).map_err(|e| bad_model(&e))?;
    let vocab = vocab_memfd(&model)?;
    Ok(LoadedModel { model, digest, identity: id, storage, vocab, size: id.size })
}

fn bad_model(e: &dyn std::fmt::Display) -> Error {
    Error::new(Status::InvalidArgument, format!("not a usable model: {e}"))
}

/// Copies `size` bytes of `file` with positioned reads (the client shares the file offset) into a
/// new memfd, seals it, and maps the copy read-only.
fn copy_to_sealed_memfd(file: &File, size: u64) -> Result<Mmap, Error> {
    let len =
        usize::try_from(size).map_err(|_| Error::new(Status::LimitExceeded, "model too large"))?;
    let copy = memfd::create_memfd("model", len)?;
    let out = File::from(copy);
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
        out.write_all_at(&buf[..n], off).map_err(|e| Error::os("copying the model", e))?;
        off += n as u64;
    }
    memfd::add_seals(&out, memfd::REQUIRED_SEALS | SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SEAL)?;
    // SAFETY: the memfd is this daemon's own and sealed against writing, shrinking and growing.
    unsafe { map_read_only(&out) }
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
    let bytes = Vocab::new(pieces).encode();
    let fd = memfd::create_memfd("vocab", bytes.len())?;
    let file = File::from(fd);
    file.write_all_at(&bytes, 0).map_err(|e| Error::os("writing the vocabulary", e))?;
    memfd::add_seals(
        &file,
        memfd::REQUIRED_SEALS | SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SEAL,
    )?;
    Ok(OwnedFd::from(file))
}
