//! Control-channel messages (the slow path): one message per `SOCK_SEQPACKET` packet.
//!
//! Every packet starts with an 8-byte header `{kind: u16, flags: u16 (0), request_id: u32}`;
//! the body follows in the encoding of [`super::codec`]. A client numbers its requests and the
//! daemon echoes the number in the reply; unsolicited messages ([`Reply::Goodbye`]) carry 0.
//! File descriptors travel beside the bytes as `SCM_RIGHTS`: [`Request::RegisterBuffer`]
//! carries one (the memfd), [`Reply::Welcome`] three (ring memfd, submission doorbell,
//! completion doorbell); any other message carrying descriptors is a protocol error.
//!
//! Compatibility: fields are only ever appended. The daemon reads requests strictly (trailing
//! bytes are an error); clients ignore trailing bytes in replies, so a newer daemon may append
//! fields that an older client does not know.

use super::codec::{self, Reader, Writer};
use crate::error::Error;
use crate::status::Status;

/// Longest request the daemon accepts, in bytes (header included): room for a tokenize
/// request of [`MAX_TOKENIZE_BYTES`].
pub const MAX_REQUEST_BYTES: usize = MAX_TOKENIZE_BYTES + 64;
/// Longest text one tokenize request may carry.
pub const MAX_TOKENIZE_BYTES: usize = 128 * 1024;
/// Longest reply a client must be ready to receive, in bytes (a tokenize reply holds at most
/// one token per byte of text, four bytes each).
pub const MAX_REPLY_BYTES: usize = 4 * MAX_TOKENIZE_BYTES + 4096;
/// Longest client name, in bytes.
pub const MAX_CLIENT_NAME: usize = 64;
/// Longest echo payload, in bytes.
pub const MAX_ECHO_BYTES: usize = 1024;
/// Size of the packet header.
pub const HEADER_BYTES: usize = 8;
/// Most descriptors any message carries.
pub const MAX_FDS: usize = 3;

/// Scheduling class of a session; lower numbers are served first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Priority {
    Realtime = 0,
    Interactive = 1,
    Normal = 2,
    Background = 3,
}

impl Priority {
    pub const ALL: [Priority; 4] =
        [Priority::Realtime, Priority::Interactive, Priority::Normal, Priority::Background];

    pub fn from_u8(v: u8) -> Option<Priority> {
        Priority::ALL.get(usize::from(v)).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Priority::Realtime => "realtime",
            Priority::Interactive => "interactive",
            Priority::Normal => "normal",
            Priority::Background => "background",
        }
    }

    pub fn from_name(s: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// Per-session limits the daemon enforces (and announces in the welcome).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Jobs accepted from the ring and not yet completed.
    pub max_jobs_in_flight: u32,
    /// Registered buffers.
    pub max_buffers: u32,
    /// Bytes of registered buffers, all together.
    pub max_buffer_bytes: u64,
    /// Models loaded by this session.
    pub max_models: u32,
    /// Contexts at once.
    pub max_contexts: u32,
    /// KV-cache tokens of all contexts together.
    pub max_kv_tokens: u32,
}

/// What kind of compute device a [`Device`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DeviceKind {
    Cpu = 0,
    Gpu = 1,
    Npu = 2,
}

impl DeviceKind {
    pub fn from_u8(v: u8) -> Option<DeviceKind> {
        [DeviceKind::Cpu, DeviceKind::Gpu, DeviceKind::Npu].get(usize::from(v)).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Gpu => "gpu",
            DeviceKind::Npu => "npu",
        }
    }
}

/// A device the daemon found, and whether it serves jobs on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub kind: DeviceKind,
    pub name: String,
    /// True when the daemon runs jobs on this device.
    pub in_use: bool,
    /// Why it is or is not in use, features, paths: for people, not for programs.
    pub detail: String,
}

/// The first message of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub abi_major: u16,
    pub abi_minor: u16,
    pub priority: Priority,
    /// Submission ring size wanted (0: the daemon's default); rounded up to a power of two and
    /// capped by the daemon.
    pub sq_entries: u32,
    /// How long the daemon should keep polling this session's ring after activity before it
    /// sleeps (capped by policy). 0 means always sleep: every submission rings the doorbell.
    pub daemon_spin_us: u32,
    pub client_name: String,
}

/// The daemon's answer to [`Hello`]; the ring memfd and both doorbells come with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub session_id: u64,
    pub abi_major: u16,
    pub abi_minor: u16,
    pub daemon_version: String,
    pub priority: Priority,
    pub daemon_spin_us: u32,
    pub sq_entries: u32,
    pub cq_entries: u32,
    pub ring_bytes: u64,
    pub limits: Limits,
    pub devices: Vec<Device>,
}

/// One session as `unicorn status` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionInfo {
    pub id: u64,
    pub pid: u32,
    pub uid: u32,
    pub name: String,
    pub priority: Priority,
    pub connected_ms: u64,
    pub jobs_completed: u64,
    pub jobs_failed: u64,
    pub jobs_in_flight: u32,
    pub buffers: u32,
    pub buffer_bytes: u64,
    pub models: u32,
    pub contexts: u32,
    /// KV-cache tokens of this session's contexts.
    pub kv_tokens: u64,
    /// Bytes the KV caches of this session's contexts reserve (a layer that reads another
    /// layer's cache, as in Gemma 3n, has none).
    pub kv_bytes: u64,
    /// Tokens decoded for this session.
    pub tokens_decoded: u64,
    /// Tokens per second decoded for this session lately (a 5-second moving average).
    pub token_rate: f32,
}

/// The daemon's state as `unicorn status` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct DaemonStatus {
    pub version: String,
    pub pid: u32,
    pub system_mode: bool,
    pub uptime_ms: u64,
    pub socket_path: String,
    /// Sessions accepted since the daemon started.
    pub sessions_served: u64,
    /// Jobs completed since the daemon started (successfully or not).
    pub jobs_completed: u64,
    /// Sessions disconnected for misbehaving.
    pub sessions_disconnected: u64,
    pub sessions: Vec<SessionInfo>,
    pub devices: Vec<Device>,
    pub models: Vec<ModelStatus>,
    /// Threads of the CPU compute pool.
    pub threads: u32,
    /// Jobs waiting or running on the engine.
    pub engine_queue: u32,
    /// Forward passes run, and those that batched more than one context.
    pub engine_steps: u64,
    pub engine_batched_steps: u64,
    /// The NPU as discovery found it (appended in 0.1; empty from an older daemon).
    pub npu: NpuStatus,
}

/// The NPU in a status reply: whether the xdna backend can use one, and in words what was
/// found or why there is none, and which NPU kernels are loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NpuStatus {
    pub usable: bool,
    /// One line: the device, or plainly why there is no usable NPU.
    pub summary: String,
    /// One line each: kernels, placement.
    pub details: Vec<String>,
}

/// How the daemon samples the next token of a context (see `unicorn_sampler_params` in C).
/// Floats travel as their IEEE-754 bits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// 0 keeps every candidate.
    pub top_k: u32,
    /// 1.0 keeps every candidate.
    pub top_p: f32,
    /// 0.0 keeps every candidate.
    pub min_p: f32,
    /// 1.0 means no penalty.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at; 0 disables it.
    pub repeat_last_n: u32,
    pub seed: u64,
}

impl SamplerParams {
    /// llama.cpp's default sampling: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05.
    pub const DEFAULT: SamplerParams = SamplerParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        seed: 0,
    };

    /// Greedy decoding: always the most likely token.
    pub const GREEDY: SamplerParams = SamplerParams {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 0,
        seed: 0,
    };
}

impl Eq for SamplerParams {}

/// What a model is, as the daemon loaded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInfo {
    /// The session's handle for the model.
    pub handle: u32,
    /// `general.architecture`, e.g. `llama`.
    pub arch: String,
    /// `general.name`, or the empty string.
    pub name: String,
    /// The dominant weight type, e.g. `Q4_1`.
    pub file_type: String,
    pub n_vocab: u32,
    pub n_ctx_train: u32,
    pub n_embd: u32,
    pub n_layer: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub n_params: u64,
    /// Bytes of the model file.
    pub size_bytes: u64,
    /// Beginning- and end-of-sequence tokens; `u32::MAX` when the model has none.
    pub bos: u32,
    pub eos: u32,
    /// Whether prompts should start with BOS.
    pub add_bos: bool,
    /// Content digest (BLAKE3, hex) that identifies the model across files.
    pub digest: String,
    /// True when another session had already loaded this model and this one shares it.
    pub shared: bool,
    /// The model's chat template (`tokenizer.chat_template`), or the empty string.
    pub chat_template: String,
}

/// A loaded model as `unicorn status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelStatus {
    pub name: String,
    pub arch: String,
    pub file_type: String,
    pub size_bytes: u64,
    pub digest: String,
    /// Sessions holding it.
    pub users: u32,
    pub contexts: u32,
    /// `mapped` (the file itself) or `copied` (a private copy the daemon validated).
    pub storage: String,
}

/// Client to daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Hello(Hello),
    /// The daemon sends the payload back: a socket round trip to compare the rings with.
    Echo {
        payload: Vec<u8>,
    },
    Status,
    /// Register the memfd passed with this message as a buffer jobs may read and write. The
    /// memfd must be sealed against shrinking and growing.
    RegisterBuffer {
        size: u64,
    },
    UnregisterBuffer {
        handle: u32,
    },
    /// Load the GGUF file passed with this message (opened by the client).
    LoadModel,
    FreeModel {
        model: u32,
    },
    /// A context (KV cache, position, sampler) of `n_ctx` tokens on a model; 0 takes the
    /// smaller of the model's training context and 4096.
    CreateContext {
        model: u32,
        n_ctx: u32,
        kv_f32: bool,
        sampler: SamplerParams,
    },
    FreeContext {
        ctx: u32,
    },
    SetSampler {
        ctx: u32,
        sampler: SamplerParams,
    },
    Tokenize {
        model: u32,
        add_special: bool,
        parse_special: bool,
        text: String,
    },
}

/// Daemon to client.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Error {
        status: Status,
        message: String,
    },
    Welcome(Welcome),
    Echo {
        payload: Vec<u8>,
    },
    Status(DaemonStatus),
    BufferRegistered {
        handle: u32,
        size: u64,
    },
    Done,
    /// Sent, unsolicited, just before the daemon closes a session, saying why.
    Goodbye {
        status: Status,
        message: String,
    },
    /// The model is loaded; its vocabulary comes with it as a sealed memfd (see `vocab`).
    ModelLoaded(ModelInfo),
    ContextCreated {
        ctx: u32,
        n_ctx: u32,
    },
    Tokens {
        ids: Vec<u32>,
    },
}

mod kind {
    pub const HELLO: u16 = 0x01;
    pub const ECHO: u16 = 0x02;
    pub const STATUS: u16 = 0x03;
    pub const REGISTER_BUFFER: u16 = 0x04;
    pub const UNREGISTER_BUFFER: u16 = 0x05;
    pub const LOAD_MODEL: u16 = 0x06;
    pub const FREE_MODEL: u16 = 0x07;
    pub const CREATE_CONTEXT: u16 = 0x08;
    pub const FREE_CONTEXT: u16 = 0x09;
    pub const SET_SAMPLER: u16 = 0x0A;
    pub const TOKENIZE: u16 = 0x0B;

    pub const ERROR: u16 = 0x80;
    pub const WELCOME: u16 = 0x81;
    pub const ECHO_REPLY: u16 = 0x82;
    pub const STATUS_REPLY: u16 = 0x83;
    pub const BUFFER_REGISTERED: u16 = 0x84;
    pub const DONE: u16 = 0x85;
    pub const GOODBYE: u16 = 0x86;
    pub const MODEL_LOADED: u16 = 0x87;
    pub const CONTEXT_CREATED: u16 = 0x88;
    pub const TOKENS: u16 = 0x89;
}

fn write_sampler(w: &mut Writer, p: &SamplerParams) {
    w.u32(p.temperature.to_bits())
        .u32(p.top_k)
        .u32(p.top_p.to_bits())
        .u32(p.min_p.to_bits())
        .u32(p.repeat_penalty.to_bits())
        .u32(p.repeat_last_n)
        .u64(p.seed);
}

fn read_sampler(r: &mut Reader<'_>) -> Result<SamplerParams, Error> {
    Ok(SamplerParams {
        temperature: f32::from_bits(r.u32("temperature")?),
        top_k: r.u32("top_k")?,
        top_p: f32::from_bits(r.u32("top_p")?),
        min_p: f32::from_bits(r.u32("min_p")?),
        repeat_penalty: f32::from_bits(r.u32("repeat_penalty")?),
        repeat_last_n: r.u32("repeat_last_n")?,
        seed: r.u64("seed")?,
    })
}

/// Token ids travel as a blob of little-endian `u32`s (lists of `u16` count are too short).
fn write_ids(w: &mut Writer, ids: &[u32]) {
    let bytes: Vec<u8> = ids.iter().flat_map(|t| t.to_le_bytes()).collect();
    w.bytes(&bytes);
}

fn read_ids(r: &mut Reader<'_>, max: usize) -> Result<Vec<u32>, Error> {
    let bytes = r.bytes("token ids", max * 4)?;
    if bytes.len() % 4 != 0 {
        return Err(Error::protocol("token id blob is not a whole number of u32s"));
    }
    Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn header(kind: u16, request_id: u32) -> Writer {
    let mut w = Writer::new();
    w.u16(kind).u16(0).u32(request_id);
    w
}

fn read_header<'a>(bytes: &'a [u8]) -> Result<(u16, u32, Reader<'a>), Error> {
    let mut r = Reader::new(bytes);
    let kind = r.u16("message kind")?;
    let flags = r.u16("message flags")?;
    if flags != 0 {
        return Err(Error::protocol(format!("message flags {flags:#x}: none are defined")));
    }
    let id = r.u32("request id")?;
    Ok((kind, id, r))
}

impl Request {
    /// How many descriptors must accompany this request.
    pub fn fd_count(&self) -> usize {
        match self {
            Request::RegisterBuffer { .. } | Request::LoadModel => 1,
            _ => 0,
        }
    }

    pub fn encode(&self, request_id: u32) -> Vec<u8> {
        let mut w;
        match self {
            Request::Hello(h) => {
                w = header(kind::HELLO, request_id);
                w.u16(h.abi_major)
                    .u16(h.abi_minor)
                    .u8(h.priority as u8)
                    .u32(h.sq_entries)
                    .u32(h.daemon_spin_us)
                    .str(&h.client_name);
            }
            Request::Echo { payload } => {
                w = header(kind::ECHO, request_id);
                w.bytes(payload);
            }
            Request::Status => w = header(kind::STATUS, request_id),
            Request::RegisterBuffer { size } => {
                w = header(kind::REGISTER_BUFFER, request_id);
                w.u64(*size);
            }
            Request::UnregisterBuffer { handle } => {
                w = header(kind::UNREGISTER_BUFFER, request_id);
                w.u32(*handle);
            }
            Request::LoadModel => w = header(kind::LOAD_MODEL, request_id),
            Request::FreeModel { model } => {
                w = header(kind::FREE_MODEL, request_id);
                w.u32(*model);
            }
            Request::CreateContext { model, n_ctx, kv_f32, sampler } => {
                w = header(kind::CREATE_CONTEXT, request_id);
                w.u32(*model).u32(*n_ctx).bool(*kv_f32);
                write_sampler(&mut w, sampler);
            }
            Request::FreeContext { ctx } => {
                w = header(kind::FREE_CONTEXT, request_id);
                w.u32(*ctx);
            }
            Request::SetSampler { ctx, sampler } => {
                w = header(kind::SET_SAMPLER, request_id);
                w.u32(*ctx);
                write_sampler(&mut w, sampler);
            }
            Request::Tokenize { model, add_special, parse_special, text } => {
                w = header(kind::TOKENIZE, request_id);
                w.u32(*model).bool(*add_special).bool(*parse_special);
                w.bytes(codec::truncate_str(text, MAX_TOKENIZE_BYTES).as_bytes());
            }
        }
        w.into_bytes()
    }

    /// Decodes a request strictly. The ABI version fields of a `Hello` are returned as sent, so
    /// that the daemon can refuse a mismatch with a clear message.
    pub fn decode(bytes: &[u8]) -> Result<(u32, Request), Error> {
        let (k, id, mut r) = read_header(bytes)?;
        let req = match k {
            kind::HELLO => {
                let abi_major = r.u16("abi_major")?;
                let abi_minor = r.u16("abi_minor")?;
                let p = r.u8("priority")?;
                let priority = Priority::from_u8(p)
                    .ok_or_else(|| Error::protocol(format!("priority {p} does not exist")))?;
                let sq_entries = r.u32("sq_entries")?;
                let daemon_spin_us = r.u32("daemon_spin_us")?;
                let client_name = r.str("client_name", MAX_CLIENT_NAME)?;
                Request::Hello(Hello {
                    abi_major,
                    abi_minor,
                    priority,
                    sq_entries,
                    daemon_spin_us,
                    client_name,
                })
            }
            kind::ECHO => Request::Echo { payload: r.bytes("echo payload", MAX_ECHO_BYTES)? },
            kind::STATUS => Request::Status,
            kind::REGISTER_BUFFER => Request::RegisterBuffer { size: r.u64("buffer size")? },
            kind::UNREGISTER_BUFFER => Request::UnregisterBuffer { handle: r.u32("handle")? },
            kind::LOAD_MODEL => Request::LoadModel,
            kind::FREE_MODEL => Request::FreeModel { model: r.u32("model")? },
            kind::CREATE_CONTEXT => Request::CreateContext {
                model: r.u32("model")?,
                n_ctx: r.u32("n_ctx")?,
                kv_f32: r.bool("kv_f32")?,
                sampler: read_sampler(&mut r)?,
            },
            kind::FREE_CONTEXT => Request::FreeContext { ctx: r.u32("ctx")? },
            kind::SET_SAMPLER => {
                Request::SetSampler { ctx: r.u32("ctx")?, sampler: read_sampler(&mut r)? }
            }
            kind::TOKENIZE => {
                let model = r.u32("model")?;
                let add_special = r.bool("add_special")?;
                let parse_special = r.bool("parse_special")?;
                let bytes = r.bytes("text", MAX_TOKENIZE_BYTES)?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| Error::protocol("text to tokenize is not valid UTF-8"))?;
                Request::Tokenize { model, add_special, parse_special, text }
            }
            other => return Err(Error::protocol(format!("unknown request kind {other:#x}"))),
        };
        r.finish("request")?;
        Ok((id, req))
    }
}

fn write_device(w: &mut Writer, d: &Device) {
    w.u8(d.kind as u8).str(&d.name).bool(d.in_use).str(&d.detail);
}

fn read_device(r: &mut Reader<'_>) -> Result<Device, Error> {
    let k = r.u8("device kind")?;
    let kind = DeviceKind::from_u8(k).ok_or_else(|| Error::protocol(format!("device kind {k}")))?;
    Ok(Device {
        kind,
        name: r.str("device name", usize::from(u16::MAX))?,
        in_use: r.bool("device in_use")?,
        detail: r.str("device detail", usize::from(u16::MAX))?,
    })
}

fn read_priority(r: &mut Reader<'_>) -> Result<Priority, Error> {
    let p = r.u8("priority")?;
    Priority::from_u8(p).ok_or_else(|| Error::protocol(format!("priority {p} does not exist")))
}

fn read_status(r: &mut Reader<'_>) -> Result<Status, Error> {
    let s = r.u32("status")?;
    // A status this client does not know still is an error, never success.
    Ok(Status::from_u32(s).unwrap_or(Status::Internal))
}

impl Reply {
    /// How many descriptors accompany this reply.
    pub fn fd_count(&self) -> usize {
        match self {
            Reply::Welcome(_) => 3,
            Reply::ModelLoaded(_) => 1,
            _ => 0,
        }
    }

    pub fn encode(&self, request_id: u32) -> Vec<u8> {
        let mut w;
        match self {
            Reply::Error { status, message } => {
                w = header(kind::ERROR, request_id);
                w.u32(status.as_u32()).str(message);
            }
            Reply::Goodbye { status, message } => {
                w = header(kind::GOODBYE, request_id);
                w.u32(status.as_u32()).str(message);
            }
            Reply::Welcome(m) => {
                w = header(kind::WELCOME, request_id);
                w.u64(m.session_id)
                    .u16(m.abi_major)
                    .u16(m.abi_minor)
                    .str(&m.daemon_version)
                    .u8(m.priority as u8)
                    .u32(m.daemon_spin_us)
                    .u32(m.sq_entries)
                    .u32(m.cq_entries)
                    .u64(m.ring_bytes)
                    .u32(m.limits.max_jobs_in_flight)
                    .u32(m.limits.max_buffers)
                    .u64(m.limits.max_buffer_bytes)
                    .u32(m.limits.max_models)
                    .u32(m.limits.max_contexts)
                    .u32(m.limits.max_kv_tokens)
                    .list(&m.devices, write_device);
            }
            Reply::Echo { payload } => {
                w = header(kind::ECHO_REPLY, request_id);
                w.bytes(payload);
            }
            Reply::Status(s) => {
                w = header(kind::STATUS_REPLY, request_id);
                w.str(&s.version)
                    .u32(s.pid)
                    .bool(s.system_mode)
                    .u64(s.uptime_ms)
                    .str(&s.socket_path)
                    .u64(s.sessions_served)
                    .u64(s.jobs_completed)
                    .u64(s.sessions_disconnected)
                    .list(&s.sessions, |w, x| {
                        w.u64(x.id)
                            .u32(x.pid)
                            .u32(x.uid)
                            .str(&x.name)
                            .u8(x.priority as u8)
                            .u64(x.connected_ms)
                            .u64(x.jobs_completed)
                            .u64(x.jobs_failed)
                            .u32(x.jobs_in_flight)
                            .u32(x.buffers)
                            .u64(x.buffer_bytes)
                            .u32(x.models)
                            .u32(x.contexts)
                            .u64(x.kv_tokens)
                            .u64(x.kv_bytes)
                            .u64(x.tokens_decoded)
                            .u32(x.token_rate.to_bits());
                    })
                    .list(&s.devices, write_device)
                    .list(&s.models, |w, m| {
                        w.str(&m.name)
                            .str(&m.arch)
                            .str(&m.file_type)
                            .u64(m.size_bytes)
                            .str(&m.digest)
                            .u32(m.users)
                            .u32(m.contexts)
                            .str(&m.storage);
                    })
                    .u32(s.threads)
                    .u32(s.engine_queue)
                    .u64(s.engine_steps)
                    .u64(s.engine_batched_steps)
                    .bool(s.npu.usable)
                    .str(&s.npu.summary)
                    .list(&s.npu.details, |w, d| {
                        w.str(d);
                    });
            }
            Reply::BufferRegistered { handle, size } => {
                w = header(kind::BUFFER_REGISTERED, request_id);
                w.u32(*handle).u64(*size);
            }
            Reply::Done => w = header(kind::DONE, request_id),
            Reply::ModelLoaded(m) => {
                w = header(kind::MODEL_LOADED, request_id);
                w.u32(m.handle)
                    .str(&m.arch)
                    .str(&m.name)
                    .str(&m.file_type)
                    .u32(m.n_vocab)
                    .u32(m.n_ctx_train)
                    .u32(m.n_embd)
                    .u32(m.n_layer)
                    .u32(m.n_head)
                    .u32(m.n_head_kv)
                    .u64(m.n_params)
                    .u64(m.size_bytes)
                    .u32(m.bos)
                    .u32(m.eos)
                    .bool(m.add_bos)
                    .str(&m.digest)
                    .bool(m.shared)
                    .str(&m.chat_template);
            }
            Reply::ContextCreated { ctx, n_ctx } => {
                w = header(kind::CONTEXT_CREATED, request_id);
                w.u32(*ctx).u32(*n_ctx);
            }
            Reply::Tokens { ids } => {
                w = header(kind::TOKENS, request_id);
                write_ids(&mut w, ids);
            }
        }
        w.into_bytes()
    }

    /// Decodes a reply; bytes after the known fields are ignored (see the module docs).
    pub fn decode(bytes: &[u8]) -> Result<(u32, Reply), Error> {
        let (k, id, mut r) = read_header(bytes)?;
        let reply = match k {
            kind::ERROR | kind::GOODBYE => {
                let status = read_status(&mut r)?;
                let message = r.str("error message", usize::from(u16::MAX))?;
                if k == kind::ERROR {
                    Reply::Error { status, message }
                } else {
                    Reply::Goodbye { status, message }
                }
            }
            kind::WELCOME => Reply::Welcome(Welcome {
                session_id: r.u64("session id")?,
                abi_major: r.u16("abi_major")?,
                abi_minor: r.u16("abi_minor")?,
                daemon_version: r.str("daemon version", 256)?,
                priority: read_priority(&mut r)?,
                daemon_spin_us: r.u32("daemon_spin_us")?,
                sq_entries: r.u32("sq_entries")?,
                cq_entries: r.u32("cq_entries")?,
                ring_bytes: r.u64("ring bytes")?,
                limits: Limits {
                    max_jobs_in_flight: r.u32("max_jobs_in_flight")?,
                    max_buffers: r.u32("max_buffers")?,
                    max_buffer_bytes: r.u64("max_buffer_bytes")?,
                    max_models: r.u32("max_models")?,
                    max_contexts: r.u32("max_contexts")?,
                    max_kv_tokens: r.u32("max_kv_tokens")?,
                },
                devices: r.list("devices", 6, read_device)?,
            }),
            kind::ECHO_REPLY => Reply::Echo { payload: r.bytes("echo payload", MAX_REPLY_BYTES)? },
            kind::STATUS_REPLY => Reply::Status(DaemonStatus {
                version: r.str("version", 256)?,
                pid: r.u32("pid")?,
                system_mode: r.bool("system mode")?,
                uptime_ms: r.u64("uptime")?,
                socket_path: r.str("socket path", 4096)?,
                sessions_served: r.u64("sessions served")?,
                jobs_completed: r.u64("jobs completed")?,
                sessions_disconnected: r.u64("sessions disconnected")?,
                sessions: r.list("sessions", 91, |r| {
                    Ok(SessionInfo {
                        id: r.u64("session id")?,
                        pid: r.u32("pid")?,
                        uid: r.u32("uid")?,
                        name: r.str("name", MAX_CLIENT_NAME)?,
                        priority: read_priority(r)?,
                        connected_ms: r.u64("connected")?,
                        jobs_completed: r.u64("jobs completed")?,
                        jobs_failed: r.u64("jobs failed")?,
                        jobs_in_flight: r.u32("jobs in flight")?,
                        buffers: r.u32("buffers")?,
                        buffer_bytes: r.u64("buffer bytes")?,
                        models: r.u32("models")?,
                        contexts: r.u32("contexts")?,
                        kv_tokens: r.u64("kv tokens")?,
                        kv_bytes: r.u64("kv bytes")?,
                        tokens_decoded: r.u64("tokens decoded")?,
                        token_rate: f32::from_bits(r.u32("token rate")?),
                    })
                })?,
                devices: r.list("devices", 6, read_device)?,
                models: r.list("models", 34, |r| {
                    Ok(ModelStatus {
                        name: r.str("model name", usize::from(u16::MAX))?,
                        arch: r.str("arch", 256)?,
                        file_type: r.str("file type", 256)?,
                        size_bytes: r.u64("size")?,
                        digest: r.str("digest", 256)?,
                        users: r.u32("users")?,
                        contexts: r.u32("contexts")?,
                        storage: r.str("storage", 64)?,
                    })
                })?,
                threads: r.u32("threads")?,
                engine_queue: r.u32("engine queue")?,
                engine_steps: r.u64("engine steps")?,
                engine_batched_steps: r.u64("engine batched steps")?,
                npu: if r.remaining() == 0 {
                    NpuStatus::default()
                } else {
                    NpuStatus {
                        usable: r.bool("npu usable")?,
                        summary: r.str("npu summary", usize::from(u16::MAX))?,
                        details: r.list("npu details", 2, |r| {
                            r.str("npu detail", usize::from(u16::MAX))
                        })?,
                    }
                },
            }),
            kind::BUFFER_REGISTERED => {
                Reply::BufferRegistered { handle: r.u32("handle")?, size: r.u64("size")? }
            }
            kind::DONE => Reply::Done,
            kind::MODEL_LOADED => {
                let long = usize::from(u16::MAX);
                Reply::ModelLoaded(ModelInfo {
                    handle: r.u32("model")?,
                    arch: r.str("arch", 256)?,
                    name: r.str("name", long)?,
                    file_type: r.str("file type", 256)?,
                    n_vocab: r.u32("n_vocab")?,
                    n_ctx_train: r.u32("n_ctx_train")?,
                    n_embd: r.u32("n_embd")?,
                    n_layer: r.u32("n_layer")?,
                    n_head: r.u32("n_head")?,
                    n_head_kv: r.u32("n_head_kv")?,
                    n_params: r.u64("n_params")?,
                    size_bytes: r.u64("size")?,
                    bos: r.u32("bos")?,
                    eos: r.u32("eos")?,
                    add_bos: r.bool("add_bos")?,
                    digest: r.str("digest", 256)?,
                    shared: r.bool("shared")?,
                    chat_template: r.str("chat template", long)?,
                })
            }
            kind::CONTEXT_CREATED => {
                Reply::ContextCreated { ctx: r.u32("ctx")?, n_ctx: r.u32("n_ctx")? }
            }
            kind::TOKENS => Reply::Tokens { ids: read_ids(&mut r, MAX_TOKENIZE_BYTES + 2)? },
            other => return Err(Error::protocol(format!("unknown reply kind {other:#x}"))),
        };
        Ok((id, reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Device {
        Device { kind: DeviceKind::Cpu, name: "x86-64".into(), in_use: true, detail: "avx2".into() }
    }

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Hello(Hello {
                abi_major: 1,
                abi_minor: 0,
                priority: Priority::Interactive,
                sq_entries: 128,
                daemon_spin_us: 50,
                client_name: "test".into(),
            }),
            Request::Echo { payload: vec![1, 2, 3] },
            Request::Status,
            Request::RegisterBuffer { size: 4096 },
            Request::UnregisterBuffer { handle: 7 },
            Request::LoadModel,
            Request::FreeModel { model: 2 },
            Request::CreateContext {
                model: 2,
                n_ctx: 512,
                kv_f32: true,
                sampler: SamplerParams::GREEDY,
            },
            Request::FreeContext { ctx: 3 },
            Request::SetSampler {
                ctx: 3,
                sampler: SamplerParams {
                    temperature: 0.7,
                    top_k: 40,
                    seed: 9,
                    ..SamplerParams::GREEDY
                },
            },
            Request::Tokenize {
                model: 2,
                add_special: true,
                parse_special: false,
                text: "héllo".into(),
            },
        ];
        for (i, req) in reqs.iter().enumerate() {
            let bytes = req.encode(i as u32 + 1);
            assert!(bytes.len() <= MAX_REQUEST_BYTES);
            assert_eq!(Request::decode(&bytes).unwrap(), (i as u32 + 1, req.clone()));
            // Every strict prefix is an error, and so is any trailing byte.
            for cut in 0..bytes.len() {
                assert!(Request::decode(&bytes[..cut]).is_err(), "prefix {cut} of {req:?}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(Request::decode(&longer).is_err());
        }
    }

    /// A status reply from a daemon older than the NPU field decodes with an empty one.
    #[test]
    fn status_without_the_npu_field_decodes() {
        let st = DaemonStatus {
            version: "0.1.0".into(),
            pid: 1,
            system_mode: true,
            uptime_ms: 2,
            socket_path: "/s".into(),
            sessions_served: 0,
            jobs_completed: 0,
            sessions_disconnected: 0,
            sessions: vec![],
            devices: vec![device()],
            models: vec![],
            threads: 2,
            engine_queue: 0,
            engine_steps: 0,
            engine_batched_steps: 0,
            npu: NpuStatus::default(),
        };
        let bytes = Reply::Status(st.clone()).encode(3);
        // bool + empty string (2 bytes) + empty list (2 bytes)
        let old = &bytes[..bytes.len() - 5];
        assert_eq!(Reply::decode(old).unwrap(), (3, Reply::Status(st.clone())));
        // A truncated NPU field is an error, not a default.
        let with = DaemonStatus {
            npu: NpuStatus { usable: true, summary: "npu".into(), details: vec!["k".into()] },
            ..st
        };
        let bytes = Reply::Status(with).encode(3);
        assert!(Reply::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn replies_round_trip() {
        let replies = [
            Reply::Error { status: Status::LimitExceeded, message: "too many".into() },
            Reply::Goodbye { status: Status::Protocol, message: "bye".into() },
            Reply::Welcome(Welcome {
                session_id: 9,
                abi_major: 1,
                abi_minor: 0,
                daemon_version: "0.1.0".into(),
                priority: Priority::Normal,
                daemon_spin_us: 20,
                sq_entries: 256,
                cq_entries: 512,
                ring_bytes: 65536,
                limits: Limits {
                    max_jobs_in_flight: 256,
                    max_buffers: 64,
                    max_buffer_bytes: 1 << 30,
                    max_models: 4,
                    max_contexts: 16,
                    max_kv_tokens: 65536,
                },
                devices: vec![device()],
            }),
            Reply::Echo { payload: vec![9; 64] },
            Reply::Status(DaemonStatus {
                version: "0.1.0".into(),
                pid: 42,
                system_mode: false,
                uptime_ms: 1000,
                socket_path: "/run/x".into(),
                sessions_served: 3,
                jobs_completed: 10,
                sessions_disconnected: 1,
                sessions: vec![SessionInfo {
                    id: 1,
                    pid: 2,
                    uid: 3,
                    name: "a".into(),
                    priority: Priority::Background,
                    connected_ms: 4,
                    jobs_completed: 5,
                    jobs_failed: 6,
                    jobs_in_flight: 7,
                    buffers: 8,
                    buffer_bytes: 9,
                    models: 1,
                    contexts: 2,
                    kv_tokens: 4096,
                    kv_bytes: 1 << 20,
                    tokens_decoded: 77,
                    token_rate: 12.5,
                }],
                devices: vec![device()],
                models: vec![ModelStatus {
                    name: "m".into(),
                    arch: "llama".into(),
                    file_type: "Q4_1".into(),
                    size_bytes: 10,
                    digest: "ab".into(),
                    users: 2,
                    contexts: 3,
                    storage: "copied".into(),
                }],
                threads: 2,
                engine_queue: 3,
                engine_steps: 10,
                engine_batched_steps: 4,
                npu: NpuStatus {
                    usable: false,
                    summary: "no NPU: no /dev/accel node".into(),
                    details: vec!["kernels: none".into(), "placement: cpu".into()],
                },
            }),
            Reply::BufferRegistered { handle: 3, size: 8192 },
            Reply::Done,
            Reply::ModelLoaded(ModelInfo {
                handle: 1,
                arch: "llama".into(),
                name: "SmolLM2".into(),
                file_type: "Q4_1".into(),
                n_vocab: 49152,
                n_ctx_train: 8192,
                n_embd: 576,
                n_layer: 30,
                n_head: 9,
                n_head_kv: 3,
                n_params: 134_515_008,
                size_bytes: 98_362_432,
                bos: 1,
                eos: 2,
                add_bos: false,
                digest: "00ff".into(),
                shared: true,
                chat_template: "{{ x }}".into(),
            }),
            Reply::ContextCreated { ctx: 4, n_ctx: 2048 },
            Reply::Tokens { ids: vec![1, 2, 49151, 0] },
        ];
        for reply in replies {
            let bytes = reply.encode(5);
            assert_eq!(Reply::decode(&bytes).unwrap(), (5, reply.clone()));
            // Appended fields from a newer daemon are ignored.
            let mut longer = bytes.clone();
            longer.extend_from_slice(&[1, 2, 3]);
            assert_eq!(Reply::decode(&longer).unwrap(), (5, reply));
        }
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(Request::decode(&[]).is_err());
        assert!(Request::decode(&[0xFF, 0xFF, 0, 0, 0, 0, 0, 0]).is_err());
        // Flags set.
        assert!(Request::decode(&[0x03, 0, 1, 0, 0, 0, 0, 0]).is_err());
        // Hello with an unknown priority.
        let mut hello = Request::Hello(Hello {
            abi_major: 1,
            abi_minor: 0,
            priority: Priority::Normal,
            sq_entries: 0,
            daemon_spin_us: 0,
            client_name: String::new(),
        })
        .encode(1);
        hello[12] = 9;
        assert!(Request::decode(&hello).is_err());
        // An unknown error status still decodes as an error.
        let mut err = Reply::Error { status: Status::Io, message: String::new() }.encode(1);
        err[8..12].copy_from_slice(&999u32.to_le_bytes());
        assert!(matches!(
            Reply::decode(&err).unwrap().1,
            Reply::Error { status: Status::Internal, .. }
        ));
    }
}
