//! The C ABI: `include/unicorn.h` is generated from this file by cbindgen.
//!
//! Rules every export follows:
//! - it runs inside a panic boundary: a panic becomes `UNICORN_ERR_INTERNAL`, never an unwind
//!   into C;
//! - every fallible call returns a `unicorn_status`; on failure the message for humans is kept
//!   per thread and read with `unicorn_last_error`;
//! - pointers are checked for NULL; handles are opaque and owned by the caller until passed to
//!   their free function, which accepts NULL.
//!
//! A `unicorn_client` may be used from several threads; calls on one client are serialized.

#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use crate::client::{Client, ClientOptions, WaitMode};
use crate::error::Error;
use crate::protocol::{Completion, Job, Priority};
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

/// A session with unicornd. Create with `unicorn_connect`, free with `unicorn_disconnect`.
#[derive(Debug)]
pub struct unicorn_client {
    inner: Mutex<Client>,
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
    /// The job's result (0 for NOPs).
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

fn lock(c: &unicorn_client) -> Result<std::sync::MutexGuard<'_, Client>, Error> {
    c.inner.lock().map_err(|_| {
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
    let boxed = Box::new(unicorn_client { inner: Mutex::new(client) });
    // SAFETY: checked non-NULL; the caller guarantees it is writable.
    unsafe { out.write(Box::into_raw(boxed)) };
    Ok(())
}

/// Ends the session and frees the client. Jobs still in flight are dropped. NULL is harmless.
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
        let rtt = lock(c)?.ping()?;
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
        match lock(c) {
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
        let n = lock(c)?.submit(&jobs)?;
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
        let n = lock(c)?.reap(&mut got, max)?;
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
        let mut g = lock(c)?;
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
}
