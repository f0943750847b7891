//! The C ABI: `include/unicorn.h` is generated from this file by cbindgen.
//!
//! Rules every export follows:
//! - it runs inside a panic boundary: a panic becomes `UNICORN_ERR_INTERNAL`, never an unwind
//!   into C;
//! - every fallible call returns a `unicorn_status`; on failure the message for humans is kept
//!   per thread and read with `unicorn_last_error`;
//! - pointers are checked for NULL; handles are opaque and owned by the caller until passed to
//!   their free function, which accepts NULL;
//! - integers and booleans that C writes into structs are range-checked before Rust reads them
//!   as enums or `bool`s.
//!
//! Handles: a `unicorn_client` is a session; `unicorn_model` and `unicorn_context` handles made
//! through it share it (an `Arc`), so they stay usable, and the session open, until every one of
//! them is freed, in any order.
//!
//! Threads: every handle may be used from several threads; calls that talk to the daemon through
//! one client (its models and contexts included) are serialized on that client. Calls that only
//! read a model's vocabulary or a handle's sizes take no lock.

#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString, OsStr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::client::{
    Client, ClientOptions, ContextParams, LogitsWanted, Model, ModelContext, WaitMode,
    RESERVED_USER_DATA,
};
use crate::error::Error;
use crate::protocol::job::MAX_DECODE_TOKENS;
use crate::protocol::messages::MAX_TOKENIZE_BYTES;
use crate::protocol::{Completion, Job, Priority, SamplerParams};
use crate::status::Status;

/// Major version of the ABI: programs built against another major cannot use this library.
pub const UNICORN_ABI_MAJOR: u32 = 1;
/// Minor version of the ABI: grows when functions or fields are added.
pub const UNICORN_ABI_MINOR: u32 = 0;
/// The library's version (the header's `UNICORN_VERSION`).
/// cbindgen:ignore
pub const UNICORN_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Most jobs `unicorn_submit_nops` takes per call: the ring bounds what is queued, and this
/// bounds the caller's array too, so a wild count cannot make the library read far.
const MAX_BATCH: usize = 1 << 16;

/// Most tokens `unicorn_detokenize` takes per call (a bound on the caller's array).
const MAX_DETOKENIZE: usize = 1 << 24;

/// The session a client handle and the models and contexts made through it share.
type SharedClient = Arc<Mutex<Client>>;

/// A session with unicornd. Create with `unicorn_connect`, free with `unicorn_disconnect`.
#[derive(Debug)]
pub struct unicorn_client {
    inner: SharedClient,
}

/// A finished job.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct unicorn_completion {
    /// The value given when the job was submitted.
    pub user_data: u64,
    /// `UNICORN_OK`, or why the job failed.
    pub status: Status,
    /// Reserved; 0.
    pub flags: u32,
    /// The job's result: 0 for NOPs; the sampled token for a decode submitted with sampling by
    /// `unicorn_decode_async` (0 without sampling).
    pub result: u64,
}

/// How a client waits for completions.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum unicorn_wait_mode {
    /// Spin for about twice the recent latency (at most 50 us), then sleep. The default.
    Adaptive = 0,
    /// Always sleep on the doorbells.
    Sleep = 1,
    /// Spin up to `spin_us` on both sides before sleeping.
    Spin = 2,
}

/// Scheduling class of a session.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum unicorn_priority {
    Realtime = 0,
    Interactive = 1,
    Normal = 2,
    Background = 3,
}

/// Options for `unicorn_connect_opts`. Fill with `unicorn_connect_options_init` first, so that
/// fields added in later versions get their defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct unicorn_connect_options {
    /// `sizeof(unicorn_connect_options)`, set by `unicorn_connect_options_init`.
    pub struct_size: u32,
    /// A `unicorn_priority`: the scheduling class (capped by the daemon's policy).
    pub priority: u32,
    /// A `unicorn_wait_mode`.
    pub wait_mode: u32,
    /// Spin budget for `UNICORN_WAIT_MODE_SPIN`, in microseconds.
    pub spin_us: u32,
    /// Submission ring entries wanted; 0 for the daemon's default.
    pub sq_entries: u32,
    /// The daemon's socket; NULL to search `$UNICORN_SOCKET`, the system and the user socket.
    pub socket_path: *const c_char,
    /// Name shown in `unicorn status`; NULL for the program's name.
    pub client_name: *const c_char,
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_last_error(msg: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = msg);
}

/// Runs `f` behind the panic boundary and turns its result into a status.
fn guard(f: impl FnOnce() -> Result<(), Error>) -> Status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => Status::Ok,
        Ok(Err(e)) => {
            let status = e.status();
            set_last_error(format!("{}: {}", status, e.message()));
            status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(format!("internal error in libunicorn: {what}"));
            Status::Internal
        }
    }
}

fn null(what: &str) -> Error {
    Error::new(Status::InvalidArgument, format!("{what} is NULL"))
}

/// # Safety
/// `p` is NULL or a NUL-terminated string valid for reads.
unsafe fn opt_str(p: *const c_char, what: &str) -> Result<Option<String>, Error> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller guarantees a valid NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(|s| Some(s.to_owned()))
        .map_err(|_| Error::new(Status::InvalidArgument, format!("{what} is not valid UTF-8")))
}

/// # Safety
/// `client` is NULL or a pointer returned by `unicorn_connect*` and not yet disconnected.
unsafe fn client_ref<'a>(client: *const unicorn_client) -> Result<&'a unicorn_client, Error> {
    // SAFETY: the caller guarantees the pointer is NULL or a live client.
    unsafe { client.as_ref() }.ok_or_else(|| null("client"))
}

fn lock(c: &Mutex<Client>) -> Result<MutexGuard<'_, Client>, Error> {
    c.lock().map_err(|_| {
        Error::new(Status::Internal, "this client is unusable after an earlier internal error")
    })
}

/// The ABI version this library implements: `(major << 16) | minor`.
#[no_mangle]
pub extern "C" fn unicorn_abi_version() -> u32 {
    UNICORN_ABI_MAJOR << 16 | UNICORN_ABI_MINOR
}

/// The library's version, e.g. "0.1.0". Static; do not free.
#[no_mangle]
pub extern "C" fn unicorn_version_string() -> *const c_char {
    VERSION_C.as_ptr()
}

/// cbindgen:ignore
const VERSION_C: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(s) => s,
        Err(_) => panic!("the package version contains a NUL"),
    };

/// A short description of a status. Static; do not free. Unknown values give "unknown status".
#[no_mangle]
pub extern "C" fn unicorn_status_str(status: c_int) -> *const c_char {
    let s = u32::try_from(status).ok().and_then(Status::from_u32);
    match s {
        Some(s) => s.c_description().as_ptr(),
        None => c"unknown status".as_ptr(),
    }
}

/// Copies the calling thread's last error message into `buf` (at most `len` bytes including
/// the terminating NUL; cut at a character boundary) and returns the message's full length
/// without the NUL, as `snprintf` does. With `buf` NULL or `len` 0 it only returns the length.
///
/// # Safety
/// `buf` is NULL or valid for writes of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn unicorn_last_error(buf: *mut c_char, len: usize) -> usize {
    let r = catch_unwind(|| {
        LAST_ERROR.with(|e| {
            let msg = e.borrow();
            if !buf.is_null() && len > 0 {
                let n = crate::protocol::codec::truncate_str(&msg, len - 1).len();
                // SAFETY: the caller guarantees `buf` holds `len` bytes; we write n + 1 <= len.
                unsafe {
                    std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.cast::<u8>(), n);
                    *buf.add(n) = 0;
                }
            }
            msg.len()
        })
    });
    r.unwrap_or(0)
}

/// Fills `opts` with the defaults (adaptive waiting, normal priority, default socket search).
///
/// # Safety
/// `opts` is NULL or valid for writes of one `unicorn_connect_options`.
#[no_mangle]
pub unsafe extern "C" fn unicorn_connect_options_init(
    opts: *mut unicorn_connect_options,
) -> Status {
    guard(|| {
        if opts.is_null() {
            return Err(null("opts"));
        }
        let v = unicorn_connect_options {
            struct_size: size_of::<unicorn_connect_options>() as u32,
            priority: unicorn_priority::Normal as u32,
            wait_mode: unicorn_wait_mode::Adaptive as u32,
            spin_us: 1000,
            sq_entries: 0,
            socket_path: std::ptr::null(),
            client_name: std::ptr::null(),
        };
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe { opts.write(v) };
        Ok(())
    })
}

/// Connects to unicornd with default options. `socket_path` may be NULL to search
/// `$UNICORN_SOCKET`, then the system socket, then the user socket. On success `*out` is a new
/// client; free it with `unicorn_disconnect`.
///
/// # Safety
/// `socket_path` is NULL or a NUL-terminated string; `out` is valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn unicorn_connect(
    socket_path: *const c_char,
    out: *mut *mut unicorn_client,
) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let path = unsafe { opt_str(socket_path, "socket_path") }?;
        let opts = ClientOptions { socket: path.map(PathBuf::from), ..ClientOptions::default() };
        // SAFETY: forwarded caller guarantee.
        unsafe { connect_into(&opts, out) }
    })
}

/// Connects to unicornd with `opts` (see `unicorn_connect_options_init`).
///
/// # Safety
/// `opts` points to an initialised `unicorn_connect_options` whose strings are NULL or
/// NUL-terminated; `out` is valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn unicorn_connect_opts(
    opts: *const unicorn_connect_options,
    out: *mut *mut unicorn_client,
) -> Status {
    guard(|| {
        // SAFETY: the caller guarantees `opts` is NULL or valid.
        let o = unsafe { opts.as_ref() }.ok_or_else(|| null("opts"))?;
        if (o.struct_size as usize) < size_of::<unicorn_connect_options>() {
            return Err(Error::new(
                Status::InvalidArgument,
                "opts.struct_size is too small: initialise opts with unicorn_connect_options_init",
            ));
        }
        let (prio, wait) = (o.priority, o.wait_mode);
        let priority = u8::try_from(prio).ok().and_then(Priority::from_u8).ok_or_else(|| {
            Error::new(
                Status::InvalidArgument,
                format!("priority {prio} is not a unicorn_priority"),
            )
        })?;
        let wait = match wait {
            0 => WaitMode::Adaptive,
            1 => WaitMode::Sleep,
            2 => WaitMode::Spin(Duration::from_micros(u64::from(o.spin_us))),
            other => {
                return Err(Error::new(
                    Status::InvalidArgument,
                    format!("wait_mode {other} is not a unicorn_wait_mode"),
                ))
            }
        };
        let mut copts =
            ClientOptions { priority, wait, sq_entries: o.sq_entries, ..ClientOptions::default() };
        // SAFETY: forwarded caller guarantee.
        if let Some(p) = unsafe { opt_str(o.socket_path, "socket_path") }? {
            copts.socket = Some(PathBuf::from(p));
        }
        // SAFETY: forwarded caller guarantee.
        if let Some(n) = unsafe { opt_str(o.client_name, "client_name") }? {
            copts.name = n;
        }
        // SAFETY: forwarded caller guarantee.
        unsafe { connect_into(&copts, out) }
    })
}

/// # Safety
/// `out` is NULL or valid for one pointer write.
unsafe fn connect_into(opts: &ClientOptions, out: *mut *mut unicorn_client) -> Result<(), Error> {
    if out.is_null() {
        return Err(null("out"));
    }
    let client = Client::connect(opts)?;
    let boxed = Box::new(unicorn_client { inner: Arc::new(Mutex::new(client)) });
    // SAFETY: checked non-NULL; the caller guarantees it is writable.
    unsafe { out.write(Box::into_raw(boxed)) };
    Ok(())
}

/// Frees the client handle. NULL is harmless. The session ends, and jobs still in flight are
/// dropped, once the client and every model and context made through it are freed: models and
/// contexts keep working after their client is freed (free them first all the same, so that the
/// session ends here).
///
/// # Safety
/// `client` is NULL or a client from `unicorn_connect*` that is not used again.
#[no_mangle]
pub unsafe extern "C" fn unicorn_disconnect(client: *mut unicorn_client) {
    if client.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller hands back ownership of a pointer from Box::into_raw.
        drop(unsafe { Box::from_raw(client) });
    }));
}

/// Sends one empty job through the rings and waits for it; `*rtt_ns` gets the round trip in
/// nanoseconds.
///
/// # Safety
/// `client` is a live client; `rtt_ns` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn unicorn_ping(client: *mut unicorn_client, rtt_ns: *mut u64) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let c = unsafe { client_ref(client) }?;
        let rtt = lock(&c.inner)?.ping()?;
        if !rtt_ns.is_null() {
            // SAFETY: checked non-NULL; the caller guarantees it is writable.
            unsafe { rtt_ns.write(u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX)) };
        }
        Ok(())
    })
}

/// The descriptor that becomes readable when completions arrive, for poll/epoll loops, or -1
/// for a NULL client. It is armed by a `unicorn_reap` that returned no completions: after such a
/// call, wait for it to become readable, then reap again. Owned by the client; do not close it.
///
/// # Safety
/// `client` is NULL or a live client.
#[no_mangle]
pub unsafe extern "C" fn unicorn_completion_fd(client: *const unicorn_client) -> c_int {
    let r = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: forwarded caller guarantee.
        let Ok(c) = (unsafe { client_ref(client) }) else {
            return -1;
        };
        match lock(&c.inner) {
            Ok(g) => g.completion_fd().as_raw_fd(),
            Err(_) => -1,
        }
    }));
    r.unwrap_or(-1)
}

/// Queues up to `count` NOP jobs, without blocking; the i-th carries `user_data[i]`.
/// `*submitted` gets how many were queued: fewer than `count` when the ring is full (reap
/// completions, then submit the rest). At most 65536 per call.
///
/// # Safety
/// `client` is a live client; `user_data` is valid for `count` reads (or NULL when `count` is
/// 0); `submitted` is valid for one write.
#[no_mangle]
pub unsafe extern "C" fn unicorn_submit_nops(
    client: *mut unicorn_client,
    user_data: *const u64,
    count: usize,
    submitted: *mut usize,
) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let c = unsafe { client_ref(client) }?;
        if submitted.is_null() {
            return Err(null("submitted"));
        }
        if count > MAX_BATCH {
            return Err(Error::new(
                Status::InvalidArgument,
                format!("count {count} is over {MAX_BATCH}"),
            ));
        }
        let data: &[u64] = if count == 0 {
            &[]
        } else if user_data.is_null() {
            return Err(null("user_data"));
        } else {
            // SAFETY: non-NULL, and the caller guarantees `count` readable elements.
            unsafe { std::slice::from_raw_parts(user_data, count) }
        };
        let jobs: Vec<(Job, u64)> =
            data.iter().map(|&u| (Job::Nop { delay: Duration::ZERO }, u)).collect();
        let n = lock(&c.inner)?.submit(&jobs)?;
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe { submitted.write(n) };
        Ok(())
    })
}

/// Moves up to `max` finished jobs into `out`, without blocking; `*count` gets how many. When
/// it finds none, the completion descriptor is armed (see `unicorn_completion_fd`).
///
/// # Safety
/// `client` is a live client; `out` is valid for `max` writes (or NULL when `max` is 0);
/// `count` is valid for one write.
#[no_mangle]
pub unsafe extern "C" fn unicorn_reap(
    client: *mut unicorn_client,
    out: *mut unicorn_completion,
    max: usize,
    count: *mut usize,
) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let c = unsafe { client_ref(client) }?;
        if count.is_null() {
            return Err(null("count"));
        }
        if max > 0 && out.is_null() {
            return Err(null("out"));
        }
        let mut got: Vec<Completion> = Vec::with_capacity(max.min(4096));
        let n = lock(&c.inner)?.reap(&mut got, max)?;
        for (i, done) in got.iter().enumerate() {
            let cc = unicorn_completion {
                user_data: done.user_data,
                status: done.status,
                flags: done.flags,
                result: done.result,
            };
            // SAFETY: i < n <= max, and the caller guarantees `max` writable elements.
            unsafe { out.add(i).write(cc) };
        }
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe { count.write(n) };
        Ok(())
    })
}

/// Waits until at least one completion is ready (`UNICORN_OK`) or `timeout_ms` passes
/// (`UNICORN_ERR_TIMEOUT`); a negative timeout waits without limit. With no job in flight it
/// returns `UNICORN_ERR_WOULD_BLOCK` at once.
///
/// # Safety
/// `client` is a live client.
#[no_mangle]
pub unsafe extern "C" fn unicorn_wait(client: *mut unicorn_client, timeout_ms: i32) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let c = unsafe { client_ref(client) }?;
        let mut g = lock(&c.inner)?;
        if g.in_flight() == 0 {
            return Err(Error::new(Status::WouldBlock, "no job is in flight"));
        }
        let timeout = u64::try_from(timeout_ms).ok().map(Duration::from_millis);
        if g.wait(timeout)? {
            Ok(())
        } else {
            Err(Error::new(Status::Timeout, format!("no completion within {timeout_ms} ms")))
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Models, tokens, contexts and decoding.
// ---------------------------------------------------------------------------------------------

/// A model the daemon loaded for a client. Create with `unicorn_model_load` or
/// `unicorn_model_load_fd`, free with `unicorn_model_free`. It carries the model's vocabulary, so
/// `unicorn_token_to_piece` and `unicorn_token_is_eog` need no round trip to the daemon.
#[derive(Debug)]
pub struct unicorn_model {
    client: SharedClient,
    model: Model,
    arch: CString,
    name: CString,
    file_type: CString,
    chat_template: CString,
    digest: CString,
}

/// A context: one sequence on a model (its KV cache, position and sampler), held by the daemon.
/// Create with `unicorn_context_create`, free with `unicorn_context_free`.
#[derive(Debug)]
pub struct unicorn_context {
    client: SharedClient,
    ctx: ModelContext,
}

/// The size of the first version of `unicorn_model_desc` (up to `digest`): the least
/// `unicorn_model_info` fills. Fields are only ever appended after it.
const MODEL_DESC_MIN_SIZE: usize =
    std::mem::offset_of!(unicorn_model_desc, digest) + size_of::<*const c_char>();

/// What a model is: filled by `unicorn_model_info`. The strings belong to the model handle and
/// stay valid until `unicorn_model_free`; a string of the model file that holds a NUL byte is cut
/// there.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct unicorn_model_desc {
    /// Set it to `sizeof(unicorn_model_desc)` before calling `unicorn_model_info`; the library
    /// fills at most that many bytes and sets it to the number it filled.
    pub struct_size: u32,
    /// Tokens in the vocabulary (the length of a row of logits).
    pub n_vocab: u32,
    /// The context length the model was trained with (the largest `n_ctx` of a context).
    pub n_ctx_train: u32,
    /// Embedding width.
    pub n_embd: u32,
    /// Transformer blocks.
    pub n_layer: u32,
    /// Attention heads.
    pub n_head: u32,
    /// Key/value heads (fewer than `n_head` with grouped-query attention).
    pub n_head_kv: u32,
    /// The beginning-of-sequence token, or -1 when the model has none.
    pub bos: i32,
    /// The end-of-sequence token, or -1 when the model has none.
    pub eos: i32,
    /// Whether prompts should start with BOS (`unicorn_tokenize` with `add_special` adds it).
    pub add_bos: bool,
    /// True when another session had already loaded this model and this one shares it.
    pub shared: bool,
    /// Parameters (weights) in the model.
    pub n_params: u64,
    /// Bytes of the model file.
    pub size_bytes: u64,
    /// `general.architecture`, e.g. "llama".
    pub arch: *const c_char,
    /// `general.name`, or "".
    pub name: *const c_char,
    /// The dominant weight type, e.g. "Q4_1".
    pub file_type: *const c_char,
    /// The model's chat template (`tokenizer.chat_template`, Jinja), or "".
    pub chat_template: *const c_char,
    /// The content digest (BLAKE3, hex) that identifies the model across files.
    pub digest: *const c_char,
}

/// How a context picks the next token. Fill with `unicorn_sampler_params_default` or
/// `unicorn_sampler_params_greedy`, then change what you want. The daemon checks the values:
/// a value out of range fails the call with `UNICORN_ERR_INVALID_ARGUMENT` and says why.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct unicorn_sampler_params {
    /// Softmax temperature, finite and >= 0; 0 is greedy (always the most likely token).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps them all.
    pub top_k: u32,
    /// Keep the most likely tokens up to this total probability, in (0, 1]; 1 keeps them all.
    pub top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one, in [0, 1]; 0 is off.
    pub min_p: f32,
    /// Penalty for repeating recent tokens, finite and > 0; 1 is off.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at; 0 disables it.
    pub repeat_last_n: u32,
    /// Seed of the random draws: the same seed, prompt and settings give the same text.
    pub seed: u64,
}

/// How to create a context. Fill with `unicorn_context_params_init` first, so that fields added
/// in later versions get their defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct unicorn_context_params {
    /// `sizeof(unicorn_context_params)`, set by `unicorn_context_params_init`.
    pub struct_size: u32,
    /// Positions (tokens) the context holds, at most the model's `n_ctx_train`; 0 for the smaller
    /// of `n_ctx_train` and 4096.
    pub n_ctx: u32,
    /// Keep the KV cache in f32 instead of f16 (twice the memory).
    pub kv_f32: bool,
    /// How the context samples (`unicorn_set_sampler` changes it later).
    pub sampler: unicorn_sampler_params,
}

/// `unicorn_context_params` as Rust reads it from C: the same layout with the `bool` read as a
/// byte, so that a stray value is refused instead of being undefined behaviour.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawContextParams {
    struct_size: u32,
    n_ctx: u32,
    kv_f32: u8,
    sampler: unicorn_sampler_params,
}

const _: () = {
    use std::mem::offset_of;
    assert!(size_of::<RawContextParams>() == size_of::<unicorn_context_params>());
    assert!(align_of::<RawContextParams>() == align_of::<unicorn_context_params>());
    assert!(offset_of!(RawContextParams, n_ctx) == offset_of!(unicorn_context_params, n_ctx));
    assert!(offset_of!(RawContextParams, kv_f32) == offset_of!(unicorn_context_params, kv_f32));
    assert!(offset_of!(RawContextParams, sampler) == offset_of!(unicorn_context_params, sampler));
    assert!(size_of::<bool>() == 1);
};

impl From<SamplerParams> for unicorn_sampler_params {
    fn from(p: SamplerParams) -> Self {
        unicorn_sampler_params {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            repeat_penalty: p.repeat_penalty,
            repeat_last_n: p.repeat_last_n,
            seed: p.seed,
        }
    }
}

impl unicorn_sampler_params {
    /// The wire form, with every float checked to be a number (the daemon checks the ranges).
    fn to_wire(self) -> Result<SamplerParams, Error> {
        for (name, v) in [
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("min_p", self.min_p),
            ("repeat_penalty", self.repeat_penalty),
        ] {
            if !v.is_finite() {
                return Err(Error::new(
                    Status::InvalidArgument,
                    format!("sampler: {name} must be a finite number, got {v}"),
                ));
            }
        }
        Ok(SamplerParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        })
    }
}

/// # Safety
/// `model` is NULL or a live model from `unicorn_model_load*`.
unsafe fn model_ref<'a>(model: *const unicorn_model) -> Result<&'a unicorn_model, Error> {
    // SAFETY: the caller guarantees the pointer is NULL or a live model.
    unsafe { model.as_ref() }.ok_or_else(|| null("model"))
}

/// # Safety
/// `ctx` is NULL or a live context from `unicorn_context_create`.
unsafe fn context_ref<'a>(ctx: *const unicorn_context) -> Result<&'a unicorn_context, Error> {
    // SAFETY: the caller guarantees the pointer is NULL or a live context.
    unsafe { ctx.as_ref() }.ok_or_else(|| null("ctx"))
}

/// Writes `v` through `out`, which must not be NULL.
///
/// # Safety
/// `out` is NULL or valid for one write of `T`.
unsafe fn write_out<T>(out: *mut T, v: T, what: &str) -> Result<(), Error> {
    if out.is_null() {
        return Err(null(what));
    }
    // SAFETY: checked non-NULL; the caller guarantees it is writable.
    unsafe { out.write(v) };
    Ok(())
}

/// The `n` elements at `p`, refusing NULL with `n > 0` and counts above `max`.
///
/// # Safety
/// `p` is NULL or valid for reads of `n` elements, unchanged while the slice lives.
unsafe fn in_slice<'a, T>(p: *const T, n: usize, max: usize, what: &str) -> Result<&'a [T], Error> {
    if n > max {
        return Err(Error::new(Status::InvalidArgument, format!("{n} {what}: at most {max}")));
    }
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-NULL, n <= max keeps the size far below isize::MAX, and the caller guarantees
    // `n` readable elements.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Checks `max > 0` implies a non-NULL output buffer.
fn out_buffer<T>(p: *mut T, max: usize, what: &str) -> Result<(), Error> {
    if max > 0 && p.is_null() {
        return Err(null(what));
    }
    Ok(())
}

/// A C string from `s`, cut at its first NUL byte.
fn c_string(s: &str) -> CString {
    let bytes = s.as_bytes();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    CString::new(&bytes[..end]).expect("cut before the first NUL")
}

/// Wraps a loaded model into a handle and hands it to C.
///
/// # Safety
/// `out` is valid for one pointer write (checked non-NULL by the caller).
unsafe fn model_into(client: &SharedClient, model: Model, out: *mut *mut unicorn_model) {
    let info = model.info();
    let boxed = Box::new(unicorn_model {
        client: Arc::clone(client),
        arch: c_string(&info.arch),
        name: c_string(&info.name),
        file_type: c_string(&info.file_type),
        chat_template: c_string(&info.chat_template),
        digest: c_string(&info.digest),
        model,
    });
    // SAFETY: the caller checked `out` and guarantees it is writable.
    unsafe { out.write(Box::into_raw(boxed)) };
}

/// Has the daemon load the GGUF model file at `path` (opened by this process, with its
/// permissions: the daemon never opens paths itself). On success `*out` is a new model; free it
/// with `unicorn_model_free`. A model another session already loaded is shared, not loaded
/// again. Loading a large file takes a while; other calls on the same client wait meanwhile.
///
/// # Safety
/// `client` is a live client; `path` is a NUL-terminated string; `out` is valid for one
/// pointer write.
#[no_mangle]
pub unsafe extern "C" fn unicorn_model_load(
    client: *mut unicorn_client,
    path: *const c_char,
    out: *mut *mut unicorn_model,
) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let c = unsafe { client_ref(client) }?;
        if path.is_null() {
            return Err(null("path"));
        }
        if out.is_null() {
            return Err(null("out"));
        }
        // SAFETY: checked non-NULL; the caller guarantees a NUL-terminated string.
        let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
        let path = Path::new(OsStr::from_bytes(bytes));
        let model = lock(&c.inner)?.load_model(path)?;
        // SAFETY: `out` checked non-NULL above; the caller guarantees it is writable.
        unsafe { model_into(&c.inner, model, out) };
        Ok(())
    })
}

/// Has the daemon load the GGUF model file open at descriptor `fd` (a regular file opened for
/// reading). The descriptor stays the caller's: the library does not close it, and the caller
/// may close it once this returns. Otherwise as `unicorn_model_load`.
///
/// # Safety
/// `client` is a live client; `fd` is an open descriptor for the duration of the call; `out` is
/// valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn unicorn_model_load_fd(
    client: *mut unicorn_client,
    fd: c_int,
    out: *mut *mut unicorn_model,
) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let c = unsafe { client_ref(client) }?;
        if fd < 0 {
            return Err(Error::new(
                Status::InvalidArgument,
                format!("fd {fd} is not a descriptor"),
            ));
        }
        if out.is_null() {
            return Err(null("out"));
        }
        // SAFETY: fd is not negative, and the caller guarantees it stays open during the call.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let model = lock(&c.inner)?.load_model_fd(borrowed)?;
        // SAFETY: `out` checked non-NULL above; the caller guarantees it is writable.
        unsafe { model_into(&c.inner, model, out) };
        Ok(())
    })
}

/// Tells the daemon this session no longer needs the model and frees the handle; errors (a
/// session already over) are ignored. Contexts created on the model keep working until they are
/// freed. The strings of its `unicorn_model_desc` are invalid afterwards. NULL is harmless.
///
/// # Safety
/// `model` is NULL or a model from `unicorn_model_load*` that is not used again.
#[no_mangle]
pub unsafe extern "C" fn unicorn_model_free(model: *mut unicorn_model) {
    if model.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller hands back ownership of a pointer from Box::into_raw.
        let m = unsafe { Box::from_raw(model) };
        if let Ok(mut c) = lock(&m.client) {
            let _ = c.free_model(&m.model);
        };
    }));
}

/// Fills `*out` with what the model is. Set `out->struct_size = sizeof(unicorn_model_desc)`
/// first: the library fills at most that many bytes (so a program built against an older header,
/// whose struct lacks fields added since, keeps working) and sets `struct_size` to the number it
/// filled. Needs no round trip.
///
/// # Safety
/// `model` is a live model; `out` is NULL or valid for reads and writes of `out->struct_size`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn unicorn_model_info(
    model: *const unicorn_model,
    out: *mut unicorn_model_desc,
) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let m = unsafe { model_ref(model) }?;
        if out.is_null() {
            return Err(null("out"));
        }
        // SAFETY: checked non-NULL; `struct_size` is the first field, a u32 the caller wrote.
        let given = unsafe { out.cast::<u32>().read() } as usize;
        if given < MODEL_DESC_MIN_SIZE {
            return Err(Error::new(
                Status::InvalidArgument,
                format!(
                    "out->struct_size is {given}: set it to sizeof(unicorn_model_desc) ({})",
                    size_of::<unicorn_model_desc>()
                ),
            ));
        }
        let filled = given.min(size_of::<unicorn_model_desc>());
        let i = m.model.info();
        let token = |t: u32| i32::try_from(t).unwrap_or(-1);
        let d = unicorn_model_desc {
            struct_size: filled as u32,
            n_vocab: i.n_vocab,
            n_ctx_train: i.n_ctx_train,
            n_embd: i.n_embd,
            n_layer: i.n_layer,
            n_head: i.n_head,
            n_head_kv: i.n_head_kv,
            bos: token(i.bos),
            eos: token(i.eos),
            add_bos: i.add_bos,
            shared: i.shared,
            n_params: i.n_params,
            size_bytes: i.size_bytes,
            arch: m.arch.as_ptr(),
            name: m.name.as_ptr(),
            file_type: m.file_type.as_ptr(),
            chat_template: m.chat_template.as_ptr(),
            digest: m.digest.as_ptr(),
        };
        // SAFETY: checked non-NULL; the caller guarantees `given >= filled` writable bytes, and
        // `d` holds `filled` bytes. An untyped copy, so padding bytes may be uninitialised.
        unsafe {
            std::ptr::copy_nonoverlapping((&raw const d).cast::<u8>(), out.cast::<u8>(), filled)
        };
        Ok(())
    })
}

/// Turns `text_len` bytes of UTF-8 `text` (at most 128 KiB; need not be NUL-terminated) into the
/// model's token ids, in one round trip to the daemon. `add_special` adds BOS/EOS as the model
/// wants them (see `add_bos`); `parse_special` turns the text of special tokens (such as
/// "<|im_start|>") into those tokens instead of tokenizing it as plain text.
///
/// `*n_tokens` gets the number of tokens. When it is more than `max_tokens`, nothing is written
/// to `tokens` and the call fails with `UNICORN_ERR_BUFFER_TOO_SMALL`: call again with a buffer
/// of `*n_tokens` (`tokens` may be NULL when `max_tokens` is 0, to ask for the count). One token
/// per byte of text, plus 2, is always enough.
///
/// # Safety
/// `model` is a live model; `text` is valid for reads of `text_len` bytes (or NULL when
/// `text_len` is 0); `tokens` is valid for writes of `max_tokens` ids (or NULL when
/// `max_tokens` is 0); `n_tokens` is valid for one write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn unicorn_tokenize(
    model: *const unicorn_model,
    text: *const c_char,
    text_len: usize,
    add_special: bool,
    parse_special: bool,
    tokens: *mut u32,
    max_tokens: usize,
    n_tokens: *mut usize,
) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let m = unsafe { model_ref(model) }?;
        if n_tokens.is_null() {
            return Err(null("n_tokens"));
        }
        out_buffer(tokens, max_tokens, "tokens")?;
        // SAFETY: forwarded caller guarantee.
        let bytes =
            unsafe { in_slice(text.cast::<u8>(), text_len, MAX_TOKENIZE_BYTES, "text bytes") }?;
        let text = std::str::from_utf8(bytes).map_err(|e| {
            Error::new(
                Status::InvalidArgument,
                format!("text is not valid UTF-8 (bad byte at offset {})", e.valid_up_to()),
            )
        })?;
        let ids = lock(&m.client)?.tokenize(&m.model, text, add_special, parse_special)?;
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe { n_tokens.write(ids.len()) };
        if ids.len() > max_tokens {
            return Err(Error::new(
                Status::BufferTooSmall,
                format!("the text is {} tokens and max_tokens is {max_tokens}", ids.len()),
            ));
        }
        if !ids.is_empty() {
            // SAFETY: ids.len() <= max_tokens, and max_tokens > 0 means `tokens` was checked
            // non-NULL; the caller guarantees `max_tokens` writable ids.
            unsafe { std::ptr::copy_nonoverlapping(ids.as_ptr(), tokens, ids.len()) };
        }
        Ok(())
    })
}

/// Copies `bytes` into the caller's buffer with the size protocol of `unicorn_token_to_piece`.
///
/// # Safety
/// `buf` is valid for writes of `len` bytes (or NULL when `len` is 0); `n` is non-NULL and valid
/// for one write.
unsafe fn copy_out_bytes(
    bytes: &[u8],
    buf: *mut c_char,
    len: usize,
    n: *mut usize,
) -> Result<(), Error> {
    // SAFETY: the caller guarantees `n` is writable.
    unsafe { n.write(bytes.len()) };
    if bytes.len() > len {
        return Err(Error::new(
            Status::BufferTooSmall,
            format!("{} bytes do not fit a buffer of {len}", bytes.len()),
        ));
    }
    if len > 0 {
        // SAFETY: len > 0 means `buf` was checked non-NULL; bytes.len() <= len, and the NUL is
        // written only when bytes.len() < len.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len());
            if bytes.len() < len {
                *buf.add(bytes.len()) = 0;
            }
        }
    }
    Ok(())
}

/// Copies the text of `token` into `buf`: its raw bytes, which may be a partial UTF-8 sequence
/// (a character split over several tokens; write the bytes of consecutive tokens out as they
/// come, or concatenate them before treating them as text). Control tokens (BOS, EOS,
/// "<|im_end|>") give no bytes unless `special`. Needs no round trip.
///
/// `*n` gets the piece's length in bytes, without a NUL. When it is more than `len` the call
/// fails with `UNICORN_ERR_BUFFER_TOO_SMALL` and writes nothing; otherwise the bytes are
/// copied, followed by a NUL when there is room (`len > *n`). A piece may itself hold a NUL
/// byte: use `*n`, not `strlen`. Pieces are short (a word or less), and a buffer that is too
/// small just gets the needed size back.
///
/// # Safety
/// `model` is a live model; `buf` is valid for writes of `len` bytes (or NULL when `len` is 0);
/// `n` is valid for one write.
#[no_mangle]
pub unsafe extern "C" fn unicorn_token_to_piece(
    model: *const unicorn_model,
    token: u32,
    special: bool,
    buf: *mut c_char,
    len: usize,
    n: *mut usize,
) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let m = unsafe { model_ref(model) }?;
        if n.is_null() {
            return Err(null("n"));
        }
        out_buffer(buf, len, "buf")?;
        let piece = m.model.token_to_piece(token, special).ok_or_else(|| {
            Error::new(
                Status::InvalidArgument,
                format!("token {token} is outside the vocabulary of {}", m.model.info().n_vocab),
            )
        })?;
        // SAFETY: `buf` checked against `len`, `n` checked non-NULL; forwarded guarantees.
        unsafe { copy_out_bytes(piece, buf, len, n) }
    })
}

/// Copies the text of `n_tokens` tokens into `buf`: their pieces (see `unicorn_token_to_piece`)
/// back to back, with the same size protocol (`*n` = bytes needed, without the NUL). At most
/// 16 Mi tokens per call. Needs no round trip.
///
/// # Safety
/// `model` is a live model; `tokens` is valid for reads of `n_tokens` ids (or NULL when
/// `n_tokens` is 0); `buf` is valid for writes of `len` bytes (or NULL when `len` is 0); `n` is
/// valid for one write.
#[no_mangle]
pub unsafe extern "C" fn unicorn_detokenize(
    model: *const unicorn_model,
    tokens: *const u32,
    n_tokens: usize,
    special: bool,
    buf: *mut c_char,
    len: usize,
    n: *mut usize,
) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let m = unsafe { model_ref(model) }?;
        if n.is_null() {
            return Err(null("n"));
        }
        out_buffer(buf, len, "buf")?;
        // SAFETY: forwarded caller guarantee.
        let ids = unsafe { in_slice(tokens, n_tokens, MAX_DETOKENIZE, "tokens") }?;
        let mut text = Vec::new();
        for &t in ids {
            let piece = m.model.token_to_piece(t, special).ok_or_else(|| {
                Error::new(
                    Status::InvalidArgument,
                    format!("token {t} is outside the vocabulary of {}", m.model.info().n_vocab),
                )
            })?;
            text.extend_from_slice(piece);
        }
        // SAFETY: `buf` checked against `len`, `n` checked non-NULL; forwarded guarantees.
        unsafe { copy_out_bytes(&text, buf, len, n) }
    })
}

/// Whether `token` ends generation (end of sequence, end of turn). False for a NULL model or a
/// token outside the vocabulary. Needs no round trip.
///
/// # Safety
/// `model` is NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn unicorn_token_is_eog(model: *const unicorn_model, token: u32) -> bool {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: forwarded caller guarantee.
        unsafe { model_ref(model) }.is_ok_and(|m| m.model.is_eog(token))
    }))
    .unwrap_or(false)
}

/// Fills `*out` with llama.cpp's default sampling: temperature 0.8, top-k 40, top-p 0.95,
/// min-p 0.05, no repetition penalty (1.0 over 64 tokens), seed 0 (pick your own seed to vary
/// the text between runs).
///
/// # Safety
/// `out` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn unicorn_sampler_params_default(
    out: *mut unicorn_sampler_params,
) -> Status {
    // SAFETY: forwarded caller guarantee.
    guard(|| unsafe { write_out(out, SamplerParams::DEFAULT.into(), "out") })
}

/// Fills `*out` with greedy sampling: always the most likely token (temperature 0).
///
/// # Safety
/// `out` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn unicorn_sampler_params_greedy(out: *mut unicorn_sampler_params) -> Status {
    // SAFETY: forwarded caller guarantee.
    guard(|| unsafe { write_out(out, SamplerParams::GREEDY.into(), "out") })
}

/// Fills `*params` with the defaults: `n_ctx` 0 (the model's training context, at most 4096), an
/// f16 KV cache, and llama.cpp's default sampling (`unicorn_sampler_params_default`).
///
/// # Safety
/// `params` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn unicorn_context_params_init(
    params: *mut unicorn_context_params,
) -> Status {
    let d = ContextParams::default();
    let v = unicorn_context_params {
        struct_size: size_of::<unicorn_context_params>() as u32,
        n_ctx: d.n_ctx,
        kv_f32: d.kv_f32,
        sampler: d.sampler.into(),
    };
    // SAFETY: forwarded caller guarantee.
    guard(|| unsafe { write_out(params, v, "params") })
}

/// Reads and checks context parameters written by C.
///
/// # Safety
/// `p` is non-NULL and points to at least a `u32`; when that `u32` (`struct_size`) is large
/// enough, to a whole `unicorn_context_params`.
unsafe fn read_context_params(p: *const unicorn_context_params) -> Result<ContextParams, Error> {
    // SAFETY: `struct_size` is the first field; the caller guarantees it is readable.
    let size = unsafe { p.cast::<u32>().read() } as usize;
    if size < size_of::<unicorn_context_params>() {
        return Err(Error::new(
            Status::InvalidArgument,
            "params.struct_size is too small: initialise params with unicorn_context_params_init",
        ));
    }
    // SAFETY: the caller wrote a whole struct (its size says so); RawContextParams has the same
    // layout and reads the bool as a byte, for which every value is valid.
    let raw = unsafe { p.cast::<RawContextParams>().read() };
    let kv_f32 = match raw.kv_f32 {
        0 => false,
        1 => true,
        other => {
            return Err(Error::new(
                Status::InvalidArgument,
                format!("params.kv_f32 holds {other}, which is not a bool"),
            ))
        }
    };
    Ok(ContextParams { n_ctx: raw.n_ctx, kv_f32, sampler: raw.sampler.to_wire()? })
}

/// Creates a context on `model` with `params` (NULL for the defaults of
/// `unicorn_context_params_init`). On success `*out` is a new context; free it with
/// `unicorn_context_free`. The daemon allocates the KV cache now: an `n_ctx` beyond the model's
/// training context, or beyond what the daemon's policy grants this session, fails here.
///
/// # Safety
/// `model` is a live model; `params` is NULL or an initialised `unicorn_context_params`; `out`
/// is valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn unicorn_context_create(
    model: *const unicorn_model,
    params: *const unicorn_context_params,
    out: *mut *mut unicorn_context,
) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let m = unsafe { model_ref(model) }?;
        if out.is_null() {
            return Err(null("out"));
        }
        let p = if params.is_null() {
            ContextParams::default()
        } else {
            // SAFETY: non-NULL; the caller guarantees an initialised struct.
            unsafe { read_context_params(params) }?
        };
        let ctx = lock(&m.client)?.create_context(&m.model, &p)?;
        let boxed = Box::new(unicorn_context { client: Arc::clone(&m.client), ctx });
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe { out.write(Box::into_raw(boxed)) };
        Ok(())
    })
}

/// Tells the daemon to drop the context (its KV cache; queued decodes on it are dropped) and
/// frees the handle; errors (a session already over) are ignored. NULL is harmless.
///
/// # Safety
/// `ctx` is NULL or a context from `unicorn_context_create` that is not used again.
#[no_mangle]
pub unsafe extern "C" fn unicorn_context_free(ctx: *mut unicorn_context) {
    if ctx.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller hands back ownership of a pointer from Box::into_raw.
        let c = unsafe { Box::from_raw(ctx) };
        if let Ok(mut client) = lock(&c.client) {
            let _ = client.free_context(&c.ctx);
        };
    }));
}

/// Positions the context holds (the `n_ctx` it was given, or the default chosen), or 0 for NULL.
///
/// # Safety
/// `ctx` is NULL or a live context.
#[no_mangle]
pub unsafe extern "C" fn unicorn_context_n_ctx(ctx: *const unicorn_context) -> u32 {
    // SAFETY: forwarded caller guarantee.
    unsafe { ctx.as_ref() }.map_or(0, |c| c.ctx.n_ctx())
}

/// The model's vocabulary size (the length of a row of logits), or 0 for NULL.
///
/// # Safety
/// `ctx` is NULL or a live context.
#[no_mangle]
pub unsafe extern "C" fn unicorn_context_n_vocab(ctx: *const unicorn_context) -> u32 {
    // SAFETY: forwarded caller guarantee.
    unsafe { ctx.as_ref() }.map_or(0, |c| c.ctx.n_vocab())
}

/// Changes how the context samples, from its next decode on (decodes already queued included).
/// The sampler starts afresh, its random sequence from the seed, even when `params` are the
/// settings it already has.
///
/// # Safety
/// `ctx` is a live context; `params` is NULL or valid for reads of one
/// `unicorn_sampler_params`.
#[no_mangle]
pub unsafe extern "C" fn unicorn_set_sampler(
    ctx: *mut unicorn_context,
    params: *const unicorn_sampler_params,
) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let c = unsafe { context_ref(ctx) }?;
        // SAFETY: the caller guarantees NULL or a readable struct; all its fields are plain
        // numbers, valid for any bits.
        let p = unsafe { params.as_ref() }.ok_or_else(|| null("params"))?;
        let s = p.to_wire()?;
        lock(&c.client)?.set_sampler(&c.ctx, &s)
    })
}

/// Forgets the context's positions from `n_past` on, to reuse a common prefix (0 empties it).
/// After a rewind, decode at least one token before sampling. Rewinding beyond the position the
/// context holds is `UNICORN_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `ctx` is a live context.
#[no_mangle]
pub unsafe extern "C" fn unicorn_context_rewind(ctx: *mut unicorn_context, n_past: u32) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let c = unsafe { context_ref(ctx) }?;
        let r = lock(&c.client)?.rewind(&c.ctx, n_past);
        r.map_err(|e| match e.status() {
            // The only argument a rewind has.
            Status::InvalidArgument => Error::new(
                e.status(),
                format!("cannot rewind to position {n_past}: the context holds fewer tokens"),
            ),
            _ => e,
        })
    })
}

/// Checks the tokens a caller passes to a decode, so that a bad id gets a clear message.
fn check_tokens(c: &unicorn_context, tokens: &[u32]) -> Result<(), Error> {
    let n_vocab = c.ctx.n_vocab();
    if let Some(bad) = tokens.iter().find(|&&t| t >= n_vocab) {
        return Err(Error::new(
            Status::InvalidArgument,
            format!("token {bad} is outside the vocabulary of {n_vocab}"),
        ));
    }
    Ok(())
}

/// Says what a failed decode's status means: a job's completion carries only its status.
fn explain_decode(c: &unicorn_context, e: Error) -> Error {
    match e.status() {
        // Both ways a decode exceeds a limit: the tokens do not fit the context's room.
        Status::LimitExceeded => Error::new(
            e.status(),
            format!(
                "decode failed: the tokens do not fit the context's {} positions (rewind it, or \
                 create a larger context)",
                c.ctx.n_ctx()
            ),
        ),
        _ => e,
    }
}

/// Runs `n_tokens` tokens through the model on `ctx` and waits for it: the context's position
/// advances by `n_tokens`. With `logits` non-NULL, the logits of the last token (`n_vocab`
/// floats, see `unicorn_context_n_vocab`) are copied there; `logits_len` is its length in floats
/// and must be at least `n_vocab` (else `UNICORN_ERR_BUFFER_TOO_SMALL`, and nothing is decoded).
/// At least one token, at most 65536 per call and what the context has room for
/// (`UNICORN_ERR_LIMIT_EXCEEDED` when it is full). Completions of the caller's own asynchronous
/// jobs that arrive meanwhile are kept for `unicorn_reap`.
///
/// # Safety
/// `ctx` is a live context; `tokens` is valid for reads of `n_tokens` ids; `logits` is NULL or
/// valid for writes of `logits_len` floats.
#[no_mangle]
pub unsafe extern "C" fn unicorn_decode(
    ctx: *mut unicorn_context,
    tokens: *const u32,
    n_tokens: usize,
    logits: *mut f32,
    logits_len: usize,
) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let c = unsafe { context_ref(ctx) }?;
        if n_tokens == 0 {
            return Err(Error::new(
                Status::InvalidArgument,
                "unicorn_decode needs at least one token (unicorn_sample samples again)",
            ));
        }
        // SAFETY: forwarded caller guarantee.
        let ids = unsafe { in_slice(tokens, n_tokens, MAX_DECODE_TOKENS as usize, "tokens") }?;
        check_tokens(c, ids)?;
        let n_vocab = c.ctx.n_vocab() as usize;
        let wanted = if logits.is_null() {
            LogitsWanted::None
        } else if logits_len < n_vocab {
            return Err(Error::new(
                Status::BufferTooSmall,
                format!("logits_len is {logits_len}: the logits are {n_vocab} floats"),
            ));
        } else {
            LogitsWanted::Last
        };
        let out = lock(&c.client)?
            .decode(&c.ctx, ids, wanted, false)
            .map_err(|e| explain_decode(c, e))?;
        if wanted == LogitsWanted::Last {
            if out.logits.len() != n_vocab {
                return Err(Error::new(
                    Status::Internal,
                    format!("{} logits came back, {n_vocab} expected", out.logits.len()),
                ));
            }
            // SAFETY: non-NULL, and the caller guarantees `logits_len >= n_vocab` writable
            // floats.
            unsafe { std::ptr::copy_nonoverlapping(out.logits.as_ptr(), logits, n_vocab) };
        }
        Ok(())
    })
}

/// Runs `n_tokens` tokens as `unicorn_decode` does, then samples the next token with the
/// context's sampler into `*token`, in one round trip: the step of a generation loop. With
/// `n_tokens` 0 it samples again from the last decode's logits (as `unicorn_sample`). The sampled
/// token is not decoded: pass it to the next call.
///
/// # Safety
/// `ctx` is a live context; `tokens` is valid for reads of `n_tokens` ids (or NULL when
/// `n_tokens` is 0); `token` is valid for one write.
#[no_mangle]
pub unsafe extern "C" fn unicorn_decode_sample(
    ctx: *mut unicorn_context,
    tokens: *const u32,
    n_tokens: usize,
    token: *mut u32,
) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let c = unsafe { context_ref(ctx) }?;
        if token.is_null() {
            return Err(null("token"));
        }
        // SAFETY: forwarded caller guarantee.
        let ids = unsafe { in_slice(tokens, n_tokens, MAX_DECODE_TOKENS as usize, "tokens") }?;
        check_tokens(c, ids)?;
        let out = lock(&c.client)?.decode(&c.ctx, ids, LogitsWanted::None, true).map_err(|e| {
            // Tokens and sampler are checked already: what is left is having no logits.
            if ids.is_empty() && e.status() == Status::InvalidArgument {
                Error::new(
                    e.status(),
                    "nothing to sample from: decode tokens first (a new or rewound context has \
                     no logits)",
                )
            } else {
                explain_decode(c, e)
            }
        })?;
        let t = out.token.ok_or_else(|| Error::new(Status::Internal, "no token was sampled"))?;
        // SAFETY: checked non-NULL; the caller guarantees it is writable.
        unsafe { token.write(t) };
        Ok(())
    })
}

/// Samples the next token with the context's sampler from the logits of the last decode, into
/// `*token`. Sampling again draws again (with a random sampler, possibly another token).
///
/// # Safety
/// `ctx` is a live context; `token` is valid for one write.
#[no_mangle]
pub unsafe extern "C" fn unicorn_sample(ctx: *mut unicorn_context, token: *mut u32) -> Status {
    // SAFETY: forwarded caller guarantee (no tokens: NULL is allowed).
    unsafe { unicorn_decode_sample(ctx, std::ptr::null(), 0, token) }
}

/// Queues a decode of one or two tokens (`n_tokens` 1 or 2; or 0 with `sample`, to sample
/// again) without waiting, like `unicorn_submit_nops`: its completion, carrying `user_data`
/// (below 2^63; higher values are the library's own), arrives through `unicorn_reap` and the
/// completion descriptor. With `sample`, the completion's `result` is the sampled token. Fails
/// with `UNICORN_ERR_WOULD_BLOCK` when the ring is full (reap, then submit again). Decodes run
/// in the order they were queued, synchronous ones included. The completion's `status` says
/// whether the decode worked (`UNICORN_ERR_LIMIT_EXCEEDED` when the context is full). Reaping
/// needs the client: keep it until the completions of a context's decodes are in.
///
/// # Safety
/// `ctx` is a live context; `tokens` is valid for reads of `n_tokens` ids (or NULL when
/// `n_tokens` is 0).
#[no_mangle]
pub unsafe extern "C" fn unicorn_decode_async(
    ctx: *mut unicorn_context,
    tokens: *const u32,
    n_tokens: usize,
    sample: bool,
    user_data: u64,
) -> Status {
    guard(|| {
        // SAFETY: forwarded caller guarantee.
        let c = unsafe { context_ref(ctx) }?;
        if n_tokens > 2 || (n_tokens == 0 && !sample) {
            return Err(Error::new(
                Status::InvalidArgument,
                format!(
                    "an asynchronous decode takes one or two tokens (or none, to sample \
                     again), not {n_tokens}{}",
                    if n_tokens == 0 { " without sampling" } else { "" }
                ),
            ));
        }
        if user_data >= RESERVED_USER_DATA {
            return Err(Error::new(
                Status::InvalidArgument,
                format!("user_data {user_data:#x} is reserved: use values below 2^63"),
            ));
        }
        // SAFETY: forwarded caller guarantee.
        let ids = unsafe { in_slice(tokens, n_tokens, 2, "tokens") }?;
        check_tokens(c, ids)?;
        if lock(&c.client)?.submit_decode(&c.ctx, ids, sample, user_data)? {
            Ok(())
        } else {
            Err(Error::new(
                Status::WouldBlock,
                "the submission ring is full: reap completions, then submit again",
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_constants_match_the_protocol() {
        assert_eq!(UNICORN_ABI_MAJOR, u32::from(crate::protocol::ABI_MAJOR));
        assert_eq!(UNICORN_ABI_MINOR, u32::from(crate::protocol::ABI_MINOR));
        assert_eq!(UNICORN_VERSION, crate::protocol::VERSION);
        // SAFETY: the function returns a static NUL-terminated string.
        let v = unsafe { CStr::from_ptr(unicorn_version_string()) };
        assert_eq!(v.to_str().unwrap(), UNICORN_VERSION);
    }

    #[test]
    fn status_strings() {
        for s in Status::ALL {
            // SAFETY: static NUL-terminated strings.
            let d = unsafe { CStr::from_ptr(unicorn_status_str(s as c_int)) };
            assert_eq!(d.to_str().unwrap(), s.description());
        }
        // SAFETY: as above.
        let d = unsafe { CStr::from_ptr(unicorn_status_str(-1)) };
        assert_eq!(d.to_str().unwrap(), "unknown status");
    }

    #[test]
    fn null_arguments_are_errors_and_last_error_truncates() {
        // SAFETY: NULL is explicitly allowed for every pointer here.
        unsafe {
            assert_eq!(
                unicorn_ping(std::ptr::null_mut(), std::ptr::null_mut()),
                Status::InvalidArgument
            );
            unicorn_disconnect(std::ptr::null_mut());
            assert_eq!(unicorn_completion_fd(std::ptr::null()), -1);
            assert_eq!(unicorn_connect_options_init(std::ptr::null_mut()), Status::InvalidArgument);
            let full = unicorn_last_error(std::ptr::null_mut(), 0);
            assert!(full > 5);
            let mut buf = [0x7f as c_char; 6];
            assert_eq!(unicorn_last_error(buf.as_mut_ptr(), buf.len()), full);
            assert_eq!(buf[5], 0);
            let got = CStr::from_ptr(buf.as_ptr()).to_str().unwrap();
            assert_eq!(got.len(), 5);
        }
    }

    #[test]
    fn a_panic_becomes_internal() {
        let s = guard(|| panic!("boom"));
        assert_eq!(s, Status::Internal);
        let mut buf = [0 as c_char; 128];
        // SAFETY: buf is writable for its length.
        unsafe { unicorn_last_error(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: NUL-terminated by unicorn_last_error.
        let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
        assert!(msg.contains("boom"), "{msg}");
    }

    #[test]
    fn bad_enum_values_from_c_are_refused() {
        let mut o = std::mem::MaybeUninit::<unicorn_connect_options>::uninit();
        // SAFETY: `o` is writable; after init it is fully initialised.
        let mut o = unsafe {
            assert_eq!(unicorn_connect_options_init(o.as_mut_ptr()), Status::Ok);
            o.assume_init()
        };
        o.wait_mode = 7;
        let mut out = std::ptr::null_mut();
        // SAFETY: valid pointers.
        let status = unsafe { unicorn_connect_opts(&o, &mut out) };
        assert_eq!(status, Status::InvalidArgument);
        assert!(out.is_null());
        o.wait_mode = 0;
        o.priority = 4;
        // SAFETY: valid pointers.
        let status = unsafe { unicorn_connect_opts(&o, &mut out) };
        assert_eq!(status, Status::InvalidArgument);
        o.priority = 0;
        o.struct_size = 8;
        // SAFETY: valid pointers.
        let status = unsafe { unicorn_connect_opts(&o, &mut out) };
        assert_eq!(status, Status::InvalidArgument);
    }

    #[test]
    fn model_and_context_calls_refuse_null_handles() {
        let null_model: *const unicorn_model = std::ptr::null();
        let null_ctx: *mut unicorn_context = std::ptr::null_mut();
        let (mut n, mut t) = (0usize, 0u32);
        let mut buf = [0 as c_char; 8];
        let mut out_model = std::ptr::null_mut();
        let mut out_ctx = std::ptr::null_mut();
        let sp = unicorn_sampler_params::from(SamplerParams::GREEDY);
        // SAFETY: NULL handles are allowed everywhere; the other pointers are valid.
        unsafe {
            unicorn_model_free(std::ptr::null_mut());
            unicorn_context_free(null_ctx);
            let bad = Status::InvalidArgument;
            assert_eq!(
                unicorn_model_load(std::ptr::null_mut(), c"x".as_ptr(), &mut out_model),
                bad
            );
            assert_eq!(unicorn_model_load_fd(std::ptr::null_mut(), 0, &mut out_model), bad);
            assert!(out_model.is_null());
            assert_eq!(unicorn_model_info(null_model, std::ptr::null_mut()), bad);
            let text = c"hi".as_ptr();
            let tokens = &mut t as *mut u32;
            assert_eq!(unicorn_tokenize(null_model, text, 2, true, true, tokens, 1, &mut n), bad);
            let b = buf.as_mut_ptr();
            assert_eq!(unicorn_token_to_piece(null_model, 0, false, b, 8, &mut n), bad);
            assert_eq!(unicorn_detokenize(null_model, &t, 1, false, b, 8, &mut n), bad);
            assert!(!unicorn_token_is_eog(null_model, 2));
            assert_eq!(unicorn_context_create(null_model, std::ptr::null(), &mut out_ctx), bad);
            assert!(out_ctx.is_null());
            assert_eq!(unicorn_context_n_ctx(null_ctx), 0);
            assert_eq!(unicorn_context_n_vocab(null_ctx), 0);
            assert_eq!(unicorn_set_sampler(null_ctx, &sp), bad);
            assert_eq!(unicorn_context_rewind(null_ctx, 0), bad);
            assert_eq!(unicorn_decode(null_ctx, &t, 1, std::ptr::null_mut(), 0), bad);
            assert_eq!(unicorn_sample(null_ctx, &mut t), bad);
            assert_eq!(unicorn_decode_sample(null_ctx, &t, 1, &mut t), bad);
            assert_eq!(unicorn_decode_async(null_ctx, &t, 1, true, 0), bad);
            assert_eq!(unicorn_sampler_params_default(std::ptr::null_mut()), bad);
            assert_eq!(unicorn_sampler_params_greedy(std::ptr::null_mut()), bad);
            assert_eq!(unicorn_context_params_init(std::ptr::null_mut()), bad);
        }
    }

    #[test]
    fn context_params_from_c_are_checked() {
        let mut p = std::mem::MaybeUninit::<unicorn_context_params>::uninit();
        // SAFETY: `p` is writable; after init it is fully initialised.
        let p = unsafe {
            assert_eq!(unicorn_context_params_init(p.as_mut_ptr()), Status::Ok);
            p.assume_init()
        };
        assert_eq!(p.struct_size as usize, size_of::<unicorn_context_params>());
        assert_eq!(p.sampler, SamplerParams::DEFAULT.into());
        // SAFETY: a whole, initialised struct.
        let got = unsafe { read_context_params(&p) }.unwrap();
        assert_eq!(got, ContextParams::default());

        let mut small = p;
        small.struct_size = 4;
        // SAFETY: as above.
        let e = unsafe { read_context_params(&small) }.unwrap_err();
        assert_eq!(e.status(), Status::InvalidArgument);

        let mut nan = p;
        nan.sampler.top_p = f32::NAN;
        // SAFETY: as above.
        let e = unsafe { read_context_params(&nan) }.unwrap_err();
        assert!(e.message().contains("top_p"), "{e:?}");

        // A C program can leave any byte in a bool; it must be refused, not read as a bool.
        let mut raw = RawContextParams {
            struct_size: p.struct_size,
            n_ctx: 7,
            kv_f32: 1,
            sampler: p.sampler,
        };
        let as_c = (&raw const raw).cast::<unicorn_context_params>();
        // SAFETY: the same layout (checked at compile time), with a valid bool byte.
        let got = unsafe { read_context_params(as_c) }.unwrap();
        assert_eq!((got.n_ctx, got.kv_f32), (7, true));
        raw.kv_f32 = 2;
        let as_c = (&raw const raw).cast::<unicorn_context_params>();
        // SAFETY: read_context_params reads the bool as a byte, never as a `bool`.
        let e = unsafe { read_context_params(as_c) }.unwrap_err();
        assert!(e.message().contains("kv_f32"), "{e:?}");
    }

    #[test]
    fn sampler_presets_and_float_checks() {
        let mut s = std::mem::MaybeUninit::<unicorn_sampler_params>::uninit();
        // SAFETY: `s` is writable; after the call it is initialised.
        let mut s = unsafe {
            assert_eq!(unicorn_sampler_params_greedy(s.as_mut_ptr()), Status::Ok);
            s.assume_init()
        };
        assert_eq!(s.to_wire().unwrap(), SamplerParams::GREEDY);
        // SAFETY: `s` is writable.
        assert_eq!(unsafe { unicorn_sampler_params_default(&mut s) }, Status::Ok);
        assert_eq!(s.to_wire().unwrap(), SamplerParams::DEFAULT);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let e = unicorn_sampler_params { repeat_penalty: bad, ..s }.to_wire().unwrap_err();
            assert_eq!(e.status(), Status::InvalidArgument);
            assert!(e.message().contains("repeat_penalty"), "{e:?}");
        }
        // Ranges are the daemon's to check, with its own message.
        assert!(unicorn_sampler_params { top_p: 7.0, ..s }.to_wire().is_ok());
    }

    #[test]
    fn model_desc_layout_and_strings() {
        // The first version of the struct is all of it today; fields are only appended.
        assert_eq!(MODEL_DESC_MIN_SIZE, size_of::<unicorn_model_desc>());
        assert_eq!(size_of::<unicorn_model_desc>(), 96);
        assert_eq!(c_string("llama").as_bytes(), b"llama");
        assert_eq!(c_string("cut\0here").as_bytes(), b"cut");
    }
}
