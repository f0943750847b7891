//! The decoder-only transformer: the building blocks every architecture shares (attention,
//! feed-forward, norms, RoPE, embedding lookup, logits) as steps of one forward pass ([`Pass`]),
//! and the plain pre-norm block ([`Transformer`]) that most architectures are, told apart by a
//! [`Spec`]. An architecture whose block is laid out differently (Gemma 3n) arranges the same
//! steps in its own file.
//!
//! One forward pass runs a batch of sequences together: the activations of all their tokens
//! form one matrix, so each weight matrix is read once per pass whatever the number of
//! sequences (continuous batching); only attention, which reads each sequence's own KV cache,
//! runs per sequence.

use unicorn_kernels::attention::{attention_batch, Attend, AttnParams};
use unicorn_kernels::ops::{scale, Rope, RopeMode};
use unicorn_kernels::{matmul_group, ThreadPool};
use unicorn_vulkan::{KvShape, Tensor, VulkanError};
use unicorn_xdna::hwctx::QosPriority;

pub(crate) use super::flow::Act;
use super::flow::Flow;
use super::placement::{Exec, OpClass};
use super::weights::{vector, Matrix};
use super::{HParams, KvState, ModelError};
use crate::gguf::GgufFile;

/// What a forward pass runs with: the model file's bytes (which the weights point into), where
/// each operation class runs, and the CPU's threads.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run<'a> {
    pub file: &'a GgufFile,
    pub exec: &'a Exec,
    pub pool: &'a ThreadPool,
    /// The NPU priority of the batch (the driver's QoS hint for its contexts).
    pub qos: QosPriority,
}

/// A network the model runs: the plain [`Transformer`], or an architecture's own arrangement
/// of the shared steps.
pub(crate) trait Network: std::fmt::Debug + Send + Sync {
    /// Runs `seqs` through the network: appends their tokens to their KV caches and writes the
    /// logits they asked for into `out` (`n_vocab` values per logits row, sequence by sequence,
    /// token order within each). Everything is validated before any state changes. The matrix
    /// products and norms of the classes `exec` places on a device run there, the rest on the
    /// CPU.
    fn forward(
        &self,
        run: Run<'_>,
        seqs: &mut [Seq<'_>],
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError>;
}

/// How an architecture's block differs from the plain llama block. `Spec::llama` is the plain
/// block; an architecture file changes the fields it needs.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Spec {
    /// Which pairs of each head RoPE rotates.
    pub rope_mode: RopeMode,
    /// Token embeddings are multiplied by `sqrt(n_embd)` (Gemma).
    pub embed_scale: bool,
    /// Each head of Q and K goes through RMSNorm (`attn_q_norm`, `attn_k_norm`) before RoPE.
    pub qk_norm: bool,
    /// The attention and feed-forward outputs go through RMSNorm (`post_attention_norm`,
    /// `post_ffw_norm`) before their residual additions.
    pub post_norms: bool,
    pub ffn: Ffn,
    /// What `q . k` is multiplied by.
    pub attn_scale: f32,
    /// Layers with local (sliding-window) attention, if any.
    pub swa: Option<SlidingWindow>,
    /// Final logits become `cap * tanh(logits / cap)`.
    pub final_softcap: Option<f32>,
}

/// The gated feed-forward's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ffn {
    /// `silu(gate) * up` (SwiGLU).
    Silu,
    /// `gelu_tanh(gate) * up` (GeGLU).
    GeluTanh,
}

/// Local (sliding-window) attention on some layers, global on the others.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SlidingWindow {
    /// A query sees the keys less than `window` positions behind it.
    pub window: usize,
    /// RoPE base of the local layers (the global ones use `rope.freq_base`).
    pub rope_base: f32,
    /// Per layer, whether it is local.
    pub local: Vec<bool>,
}

impl SlidingWindow {
    /// Every `pattern`-th layer global (`i % pattern == pattern - 1`), the others local.
    pub fn every(pattern: usize, n_layer: usize, window: usize, rope_base: f32) -> SlidingWindow {
        let local = (0..n_layer).map(|i| i % pattern != pattern - 1).collect();
        SlidingWindow { window, rope_base, local }
    }

    fn is_local(&self, layer: usize) -> bool {
        self.local.get(layer).copied().unwrap_or(false)
    }
}

impl Spec {
    /// The plain llama block for a model of shape `hp`.
    pub fn llama(hp: &HParams) -> Spec {
        Spec {
            rope_mode: RopeMode::Norm,
            embed_scale: false,
            qk_norm: false,
            post_norms: false,
            ffn: Ffn::Silu,
            attn_scale: 1.0 / (hp.head_dim as f32).sqrt(),
            swa: None,
            final_softcap: None,
        }
    }
}

/// Most tokens of a pass whose K and V rows are fetched into the CPU's cache while the
/// layer's products run, before the stores that write them: a few lines per token, worth it for
/// the tokens of a decode step (a long prefill's would only push its own weights out).
const KV_PREFETCH_TOKENS: usize = 16;

/// `blk.{layer}.{what}.weight`.
pub(crate) fn layer_tensor(layer: usize, what: &str) -> String {
    format!("blk.{layer}.{what}.weight")
}

/// A layer's attention: its products, Q/K norms, and which KV cache it uses.
#[derive(Debug)]
pub(crate) struct Attention {
    wq: Matrix,
    /// The K and V products; `None` in a layer that reads an earlier layer's cache.
    kv: Option<(Matrix, Matrix)>,
    wo: Matrix,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    /// The cache it writes (with `kv`) or reads.
    cache: usize,
    /// Sliding-window attention, with the local RoPE base.
    local: bool,
}

/// Where a layer's keys and values live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KvSource {
    /// Its own cache, of this index.
    Own(usize),
    /// The cache of this index, written by an earlier layer.
    Shared(usize),
}

impl Attention {
    /// Layer `i`'s `attn_q`, `attn_k`, `attn_v` (unless `kv` is shared), `attn_output` and, with
    /// `qk_norm`, `attn_q_norm` / `attn_k_norm`.
    pub fn load(
        gguf: &GgufFile,
        hp: &HParams,
        i: usize,
        qk_norm: bool,
        kv: KvSource,
        local: bool,
    ) -> Result<Attention, ModelError> {
        let n = |s: &str| layer_tensor(i, s);
        let (d, qd, kvd) = (hp.n_embd, hp.q_dim(), hp.kv_dim());
        let (own, cache) = match kv {
            KvSource::Own(c) => (true, c),
            KvSource::Shared(c) => (false, c),
        };
        let norm = |s: &str| -> Result<Option<Vec<f32>>, ModelError> {
            qk_norm.then(|| vector(gguf, &n(s), hp.head_dim)).transpose()
        };
        Ok(Attention {
            wq: Matrix::load(gguf, &n("attn_q"), qd, d)?,
            kv: match own {
                true => Some((
                    Matrix::load(gguf, &n("attn_k"), kvd, d)?,
                    Matrix::load(gguf, &n("attn_v"), kvd, d)?,
                )),
                false => None,
            },
            wo: Matrix::load(gguf, &n("attn_output"), d, qd)?,
            q_norm: norm("attn_q_norm")?,
            k_norm: norm("attn_k_norm")?,
            cache,
            local,
        })
    }
}

/// What an architecture's attention does on top of the shared steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AttnOpts {
    /// What `q . k` is multiplied by.
    pub scale: f32,
    /// Each head of V goes through RMSNorm without a weight (Gemma 3n).
    pub v_norm: bool,
}

/// A layer's gated feed-forward: `down(act(gate(x)) * up(x))`.
#[derive(Debug)]
pub(crate) struct FeedForward {
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

impl FeedForward {
    /// Layer `i`'s `ffn_gate`, `ffn_up` and `ffn_down`.
    pub fn load(gguf: &GgufFile, hp: &HParams, i: usize) -> Result<FeedForward, ModelError> {
        let n = |s: &str| layer_tensor(i, s);
        let (d, ff) = (hp.n_embd, hp.n_ff);
        Ok(FeedForward {
            gate: Matrix::load(gguf, &n("ffn_gate"), ff, d)?,
            up: Matrix::load(gguf, &n("ffn_up"), ff, d)?,
            down: Matrix::load(gguf, &n("ffn_down"), d, ff)?,
        })
    }
}

/// Which logits a sequence wants from a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    /// The last token's.
    Last,
    /// Every token's.
    All,
}

/// One sequence of a batch: its state, its new tokens, and the logits it wants.
#[derive(Debug)]
pub struct Seq<'a> {
    pub kv: &'a mut KvState,
    pub tokens: &'a [u32],
    pub logits: Logits,
}

/// One forward pass over a batch: the positions of its tokens, their RoPE tables, where its
/// activations live ([`Flow`]), and scratch activations. Its methods are the steps architectures
/// share.
///
/// The steps take and give [`Act`]s: with classes on the Vulkan device, a step's device
/// operations leave their outputs there, so consecutive device operations (a layer's norms,
/// products and residual additions) are recorded into one submission; a step on the CPU (an
/// architecture's own host code, via [`Pass::host`]; RoPE, the KV cache and attention when the
/// attention class is on the CPU) reads back what it needs, which is where the recorded work is
/// submitted. With the attention class on the device, RoPE, the cache store and attention run
/// there too, over each context's device cache, so a plain block's pass is one submission.
pub(crate) struct Pass<'a> {
    bytes: &'a [u8],
    file: &'a GgufFile,
    pool: &'a ThreadPool,
    hp: &'a HParams,
    flow: Flow<'a>,
    /// Submissions of the device step before this pass (for the log).
    submits_before: u64,
    /// Tokens in the batch.
    n: usize,
    /// Position of every token, and where each sequence's rows start.
    pos: Vec<usize>,
    starts: Vec<usize>,
    /// RoPE and its (cos, sin) table per token, for global layers and (with a sliding window)
    /// local ones, with the window.
    rope_global: (Rope, Vec<f32>),
    rope_local: Option<(Rope, Vec<f32>, usize)>,
    /// RoPE, the KV store and attention run on the device, over the contexts' device caches.
    dev_attn: bool,
    /// The positions as a device tensor, once uploaded.
    pos_t: Option<Tensor>,
    q: Act,
    k: Act,
    v: Act,
    attn: Act,
    gate: Act,
    up: Act,
    /// Scratch activations of different lengths (one per length, so that each keeps its
    /// device tensors through the pass).
    tmp: Vec<Act>,
}

impl<'a> Pass<'a> {
    /// Checks `seqs` against the model and the caches (nothing changes when this fails) and
    /// prepares the positions and RoPE tables. `local` is the sliding window and the RoPE base
    /// of local layers. With some class on the Vulkan device, this locks the model's device
    /// state and begins its step for the pass.
    pub fn new(
        hp: &'a HParams,
        run: Run<'a>,
        seqs: &mut [Seq<'_>],
        rope_mode: RopeMode,
        local: Option<(usize, f32)>,
    ) -> Result<Pass<'a>, ModelError> {
        for s in seqs.iter() {
            if s.tokens.is_empty() {
                return Err(ModelError::EmptySequence);
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= hp.n_vocab) {
                return Err(ModelError::TokenOutOfRange { token: t, n_vocab: hp.n_vocab });
            }
            let (n_ctx, n_past) = (s.kv.n_ctx(), s.kv.n_past());
            if n_past + s.tokens.len() > n_ctx {
                return Err(ModelError::ContextFull { n_ctx, n_past, n_new: s.tokens.len() });
            }
        }
        let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let mut pos = Vec::with_capacity(n);
        let mut starts = Vec::with_capacity(seqs.len());
        for s in seqs.iter() {
            starts.push(pos.len());
            pos.extend(s.kv.n_past()..s.kv.n_past() + s.tokens.len());
        }
        // One (cos, sin) table per token, shared by every layer.
        let tables = |rope: Rope| {
            let mut tab = vec![0.0f32; n * hp.rope_dims];
            for (t, &p) in tab.chunks_exact_mut(hp.rope_dims.max(1)).zip(&pos) {
                rope.cache(p, t);
            }
            (rope, tab)
        };
        let rope = Rope {
            mode: rope_mode,
            n_dims: hp.rope_dims,
            freq_base: hp.rope_base,
            freq_scale: hp.rope_scale,
        };
        let rope_local = local.map(|(window, base)| {
            let (r, tab) = tables(Rope { freq_base: base, freq_scale: 1.0, ..rope });
            (r, tab, window)
        });
        let rope_global = tables(rope);
        let mut flow = Flow::new(run.exec, run.qos)?;
        let submits_before = flow.submits();
        // Attention on the device needs heads the shaders take; the caches must hold every
        // position where attention runs (a copy of what only the other side has).
        let shape = KvShape { n_kv_head: hp.n_head_kv, n_ctx: 1, head_dim: hp.head_dim };
        let dev = flow.context().filter(|_| flow.on_vulkan(OpClass::Attention));
        let dev = dev.filter(|_| shape.check_head_dim().is_ok());
        for s in seqs.iter_mut() {
            match dev {
                Some(ctx) => {
                    s.kv.device_cache(ctx, run.exec.live_kv())?;
                }
                None => s.kv.sync_host(!run.exec.device_lost())?,
            }
        }
        Ok(Pass {
            bytes: run.file.bytes(),
            file: run.file,
            pool: run.pool,
            hp,
            flow,
            submits_before,
            n,
            pos,
            starts,
            rope_global,
            rope_local,
            dev_attn: dev.is_some(),
            pos_t: None,
            q: Act::default(),
            k: Act::default(),
            v: Act::default(),
            attn: Act::default(),
            gate: Act::default(),
            up: Act::default(),
            tmp: Vec::new(),
        })
    }

    /// Tokens in the batch.
    pub fn n(&self) -> usize {
        self.n
    }

    /// `a`'s current value on the host (read back from the device, submitting what is recorded,
    /// when it is only there).
    pub fn host<'b>(&mut self, a: &'b mut Act) -> Result<&'b [f32], ModelError> {
        self.flow.host(a)
    }

    /// `a`'s value on the host, to be changed there (its device copy is dropped).
    pub fn host_mut<'b>(&mut self, a: &'b mut Act) -> Result<&'b mut Vec<f32>, ModelError> {
        self.flow.host_mut(a)
    }

    /// `a`'s host storage, to be overwritten there (nothing is read back).
    pub fn overwrite<'b>(&mut self, a: &'b mut Act) -> &'b mut Vec<f32> {
        self.flow.overwrite(a)
    }

    /// Takes `a`'s host storage (its current value, read back if needed).
    pub fn take(&mut self, a: &mut Act) -> Result<Vec<f32>, ModelError> {
        self.flow.take(a)
    }

    /// Row `t` of `table` for every token of `seqs`, times `mul` (an embedding lookup).
    pub fn embed(
        &self,
        table: &Matrix,
        seqs: &[Seq<'_>],
        mul: f32,
    ) -> Result<Vec<f32>, ModelError> {
        let w = table.cols;
        let mut x = vec![0.0f32; self.n * w];
        for (row, &t) in x.chunks_exact_mut(w).zip(seqs.iter().flat_map(|s| s.tokens.iter())) {
            table.row(self.bytes, t as usize, row)?;
        }
        if mul != 1.0 {
            scale(&mut x, mul);
        }
        Ok(x)
    }

    /// `out = w x` for every token, where `class` runs (`None`: always the CPU). `out` becomes
    /// `n x w.rows`.
    pub fn matmul(
        &mut self,
        class: Option<OpClass>,
        w: &Matrix,
        x: &mut Act,
        out: &mut Act,
    ) -> Result<(), ModelError> {
        out.resize(self.n * w.rows);
        self.flow.matmul(class, w, self.file, self.pool, x, self.n, out)
    }

    /// Several products of the same `x`, each `out` becoming `n x w.rows` (on the CPU one job:
    /// the input quantized once, the threads kept busy).
    fn matmul_group(
        &mut self,
        class: OpClass,
        x: &mut Act,
        group: &mut [(&Matrix, &mut Act)],
    ) -> Result<(), ModelError> {
        if self.flow.on(class) {
            for (w, out) in group.iter_mut() {
                self.matmul(Some(class), w, x, out)?;
            }
            return Ok(());
        }
        let x = self.flow.host(x)?;
        let mut jobs = Vec::with_capacity(group.len());
        for (w, out) in group.iter_mut() {
            out.resize(self.n * w.rows);
            jobs.push((w.cpu_view(self.file)?, &mut self.flow.overwrite(out)[..]));
        }
        Ok(matmul_group(self.pool, x, self.n, &mut jobs)?)
    }

    /// RMSNorm of each row of `dim` values of `x` into `out` (made as long as `x`), where the
    /// norms run.
    pub fn norm(
        &mut self,
        x: &mut Act,
        out: &mut Act,
        dim: usize,
        w: Option<&[f32]>,
    ) -> Result<(), ModelError> {
        out.resize(x.len());
        self.flow.norm(x, out, dim, w, self.hp.rms_eps)
    }

    /// The scratch activation of `len` values (see `tmp`); given back by pushing it.
    fn scratch(&mut self, len: usize) -> Act {
        match self.tmp.iter().position(|a| a.len() == len) {
            Some(i) => self.tmp.swap_remove(i),
            None => Act::zeros(len),
        }
    }

    /// [`Pass::norm`] in place.
    fn norm_in_place(
        &mut self,
        x: &mut Act,
        dim: usize,
        w: Option<&[f32]>,
    ) -> Result<(), ModelError> {
        let mut tmp = self.scratch(x.len());
        let r = self.norm(x, &mut tmp, dim, w);
        if r.is_ok() {
            std::mem::swap(x, &mut tmp);
        }
        self.tmp.push(tmp);
        r
    }

    /// `x += norm(y)` with `w` (a post-norm), or `x += y` without.
    pub fn add_normed(
        &mut self,
        x: &mut Act,
        y: &mut Act,
        w: Option<&[f32]>,
    ) -> Result<(), ModelError> {
        match w {
            None => self.flow.add(x, y),
            Some(w) => {
                let mut tmp = self.scratch(y.len());
                let r = self.norm(y, &mut tmp, self.hp.n_embd, Some(w));
                let r = r.and_then(|()| self.flow.add(x, &mut tmp));
                self.tmp.push(tmp);
                r
            }
        }
    }

    /// `x += y`: on the device when both are there, else on the CPU.
    pub fn add(&mut self, x: &mut Act, y: &mut Act) -> Result<(), ModelError> {
        self.flow.add(x, y)
    }

    /// The attention block of `a` on the normed input `h`, into `out` (`n x n_embd`): Q (and,
    /// in a layer with its own cache, K and V, stored in the cache), their norms, RoPE,
    /// attention over each sequence's cache, and the output product. Its products and norms
    /// stay on the device; Q, K and V are read back for RoPE, the cache and attention.
    pub fn attention(
        &mut self,
        seqs: &mut [Seq<'_>],
        a: &Attention,
        opts: AttnOpts,
        h: &mut Act,
        out: &mut Act,
    ) -> Result<(), ModelError> {
        let (hp, n) = (self.hp, self.n);
        let (hd, qd, kvd) = (hp.head_dim, hp.q_dim(), hp.kv_dim());
        let (mut q, mut k, mut v) =
            (std::mem::take(&mut self.q), std::mem::take(&mut self.k), std::mem::take(&mut self.v));
        let class = Some(OpClass::Attention);
        if a.kv.is_some() && !self.dev_attn && n <= KV_PREFETCH_TOKENS {
            for (s, &t0) in seqs.iter().zip(&self.starts) {
                let cache = s.kv.layer(a.cache);
                for &p in &self.pos[t0..t0 + s.tokens.len()] {
                    cache.prefetch_position(p);
                }
            }
        }
        if let Some((wk, wv)) = &a.kv {
            let mut group = [(&a.wq, &mut q), (wk, &mut k), (wv, &mut v)];
            self.matmul_group(OpClass::Attention, h, &mut group)?;
        } else {
            self.matmul(class, &a.wq, h, &mut q)?;
        }
        // Every head of every token is a row of `head_dim` values.
        if let Some(w) = &a.q_norm {
            self.norm_in_place(&mut q, hd, Some(w))?;
        }
        if a.kv.is_some() {
            if let Some(w) = &a.k_norm {
                self.norm_in_place(&mut k, hd, Some(w))?;
            }
            if opts.v_norm {
                self.norm_in_place(&mut v, hd, None)?;
            }
        }
        if self.dev_attn {
            let r = self.device_attention(seqs, a, opts, &mut q, &mut k, &mut v, out);
            (self.q, self.k, self.v) = (q, k, v);
            return r;
        }
        // RoPE, the KV cache and attention run on the CPU: the device's work so far is
        // submitted here, when Q (and K and V) are read back.
        let qh = self.flow.host_mut(&mut q)?;
        let mut kv = match a.kv {
            Some(_) => Some((self.flow.host_mut(&mut k)?, self.flow.host(&mut v)?)),
            None => None,
        };
        let (rope, tab, window) = match (&self.rope_local, a.local) {
            (Some((r, tab, w)), true) => (r, tab, Some(*w)),
            _ => (&self.rope_global.0, &self.rope_global.1, None),
        };
        let rd = hp.rope_dims;
        if rd > 0 {
            for t in 0..n {
                let tab = &tab[t * rd..][..rd];
                rope.apply(tab, &mut qh[t * qd..][..qd], hd);
                if let Some((kh, _)) = &mut kv {
                    rope.apply(tab, &mut kh[t * kvd..][..kvd], hd);
                }
            }
        }
        if let Some((kh, vh)) = &kv {
            for (s, &t0) in seqs.iter_mut().zip(&self.starts) {
                for t in t0..t0 + s.tokens.len() {
                    s.kv.store(a.cache, self.pos[t], &kh[t * kvd..][..kvd], &vh[t * kvd..][..kvd]);
                }
            }
        }
        // Every sequence's attention in one job: a batch of single-token decodes has few heads
        // each.
        let mut attn = std::mem::take(&mut self.attn);
        attn.resize(n * qd);
        let mut jobs = Vec::with_capacity(seqs.len());
        let mut attn_rest = self.flow.overwrite(&mut attn).as_mut_slice();
        for (s, &t0) in seqs.iter().zip(&self.starts) {
            let m = s.tokens.len();
            let params = AttnParams {
                n_head: hp.n_head,
                scale: opts.scale,
                pos0: self.pos[t0],
                kv_len: self.pos[t0] + m,
                causal: true,
                window,
                softcap: None,
            };
            let (out, rest) = std::mem::take(&mut attn_rest).split_at_mut(m * qd);
            attn_rest = rest;
            let q = &qh[t0 * qd..][..m * qd];
            jobs.push(Attend { q, n_q: m, kv: s.kv.layer(a.cache), params, out });
        }
        attention_batch(self.pool, &mut jobs)?;
        drop(jobs);
        self.matmul(class, &a.wo, &mut attn, out)?;
        (self.q, self.k, self.v, self.attn) = (q, k, v, attn);
        Ok(())
    }

    /// [`Pass::attention`] after the products and norms, on the device: RoPE of Q and K, then per
    /// sequence the store of its K and V into its device cache and attention over it, then the
    /// output product. Nothing comes back to the host.
    #[allow(clippy::too_many_arguments)]
    fn device_attention(
        &mut self,
        seqs: &mut [Seq<'_>],
        a: &Attention,
        opts: AttnOpts,
        q: &mut Act,
        k: &mut Act,
        v: &mut Act,
        out: &mut Act,
    ) -> Result<(), ModelError> {
        let (hp, n) = (self.hp, self.n);
        let (hd, qd) = (hp.head_dim, hp.q_dim());
        let pos_t = match self.pos_t {
            Some(t) => t,
            None => {
                let pos = self
                    .pos
                    .iter()
                    .map(|&p| u32::try_from(p))
                    .collect::<Result<Vec<u32>, _>>()
                    .map_err(|_| VulkanError::Shape("a position beyond 32 bits".into()))?;
                *self.pos_t.insert(self.flow.upload_u32(&pos)?)
            }
        };
        let (rope, window) = match (&self.rope_local, a.local) {
            (Some((r, _, w)), true) => (*r, Some(*w)),
            _ => (self.rope_global.0, None),
        };
        if hp.rope_dims > 0 {
            self.flow.rope(&rope, q, hd, pos_t, n)?;
            if a.kv.is_some() {
                self.flow.rope(&rope, k, hd, pos_t, n)?;
            }
        }
        let mut attn = std::mem::take(&mut self.attn);
        attn.resize(n * qd);
        let r = (|| {
            let ot = self.flow.out_tensor(&mut attn)?;
            for (s, &t0) in seqs.iter_mut().zip(&self.starts) {
                let (m, pos0) = (s.tokens.len(), self.pos[t0]);
                let cache = s.kv.device_mut()?;
                if a.kv.is_some() {
                    self.flow.kv_store(cache, a.cache, k, v, t0, m, pos0)?;
                }
                let params = AttnParams {
                    n_head: hp.n_head,
                    scale: opts.scale,
                    pos0,
                    kv_len: pos0 + m,
                    causal: true,
                    window,
                    softcap: None,
                };
                self.flow.attention(q, cache, a.cache, &params, t0, m, ot)?;
            }
            self.matmul(Some(OpClass::Attention), &a.wo, &mut attn, out)
        })();
        self.attn = attn;
        r
    }

    /// The feed-forward `f` on the normed input `h`, into `out` (`n x n_embd`). With
    /// `sparsity`, each token's gate values are first cut at their mean plus `sparsity`
    /// standard deviations (Gemma 3n's gaussian top-k: `relu(gate - cutoff)`, on the CPU).
    pub fn feed_forward(
        &mut self,
        f: &FeedForward,
        act: Ffn,
        sparsity: Option<f32>,
        h: &mut Act,
        out: &mut Act,
    ) -> Result<(), ModelError> {
        let ff = f.gate.rows;
        let (mut gate, mut up) = (std::mem::take(&mut self.gate), std::mem::take(&mut self.up));
        self.matmul_group(OpClass::FeedForward, h, &mut [(&f.gate, &mut gate), (&f.up, &mut up)])?;
        if let Some(mul) = sparsity {
            gaussian_top_k(self.flow.host_mut(&mut gate)?, ff, mul);
        }
        // The gated activation goes into `tmp`.
        let mut tmp = self.scratch(gate.len());
        let r = self.flow.glu(act, &mut gate, &mut up, &mut tmp);
        (self.gate, self.up) = (gate, up);
        let r = r.and_then(|()| self.matmul(Some(OpClass::FeedForward), &f.down, &mut tmp, out));
        self.tmp.push(tmp);
        r
    }

    /// Ends the pass: the rows of `x` that want logits go through `output_norm`, the `output`
    /// product and the soft-cap into `out`, and only then (when nothing can fail any more, so
    /// that a failed pass can run again, e.g. on the CPU after a device error) do the tokens
    /// join their sequences' states.
    pub fn finish(
        mut self,
        seqs: &mut [Seq<'_>],
        mut x: Act,
        output_norm: &[f32],
        output: &Matrix,
        softcap: Option<f32>,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let d = self.hp.n_embd;
        let mut rows = Vec::new();
        for (s, &t0) in seqs.iter().zip(&self.starts) {
            match s.logits {
                Logits::None => {}
                Logits::Last => rows.push(t0 + s.tokens.len() - 1),
                Logits::All => rows.extend(t0..t0 + s.tokens.len()),
            }
        }
        if rows.is_empty() {
            out.clear();
        } else {
            // Every row in order (a single decode, or every position) needs no gathering; else
            // the rows are gathered where the hidden state is, so it may stay on the device.
            let mut sel =
                if rows.len() == self.n { x } else { self.flow.gather(&mut x, &rows, d)? };
            self.norm_in_place(&mut sel, d, Some(output_norm))?;
            // Only the selected rows: the product runs over them, not the batch. `out` keeps
            // its length from the last pass, so a pass of as many rows overwrites it without
            // zeroing it first (0.8 MB for 4 tokens of a 49152-token vocabulary).
            self.n = rows.len();
            let mut logits = Act::from_vec(std::mem::take(out));
            self.matmul(Some(OpClass::Output), output, &mut sel, &mut logits)?;
            *out = self.flow.take(&mut logits)?;
            if let Some(cap) = softcap {
                for v in out.iter_mut() {
                    *v = cap * (*v / cap).tanh();
                }
            }
        }
        self.flow.finish(self.submits_before);
        for s in seqs.iter_mut() {
            s.kv.push_tokens(s.tokens, self.dev_attn);
        }
        Ok(())
    }
}

/// `relu(x - (mean + mul * std))` of each row of `dim` values (`std` with Bessel's correction,
/// as ggml's and PyTorch's).
fn gaussian_top_k(x: &mut [f32], dim: usize, mul: f32) {
    for row in x.chunks_exact_mut(dim) {
        let mean = row.iter().sum::<f32>() / dim as f32;
        let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>()
            / (dim.saturating_sub(1).max(1)) as f32;
        let cutoff = mean + mul * var.sqrt();
        for v in row.iter_mut() {
            *v = (*v - cutoff).max(0.0);
        }
    }
}

#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    attn: Attention,
    ffn_norm: Vec<f32>,
    ffn: FeedForward,
    /// With `Spec::post_norms`.
    post_attn_norm: Option<Vec<f32>>,
    post_ffn_norm: Option<Vec<f32>>,
}

/// The plain pre-norm transformer: weights and shape. The matrices point into the model file's
/// bytes, which the caller passes to every call (the file outlives the transformer in
/// [`super::Model`]).
#[derive(Debug)]
pub(crate) struct Transformer {
    hp: HParams,
    spec: Spec,
    tok_embd: Matrix,
    output_norm: Vec<f32>,
    /// The output projection; `token_embd` itself when the file has no `output.weight`.
    output: Matrix,
    layers: Vec<Layer>,
}

/// `token_embd` and the output projection: `output`, or `token_embd` itself when the file has
/// none (tied embeddings).
pub(crate) fn embeddings(gguf: &GgufFile, hp: &HParams) -> Result<(Matrix, Matrix), ModelError> {
    let tok_embd = Matrix::load(gguf, "token_embd.weight", hp.n_vocab, hp.n_embd)?;
    let output = match gguf.get_tensor("output.weight") {
        Some(_) => Matrix::load(gguf, "output.weight", hp.n_vocab, hp.n_embd)?,
        None => tok_embd.clone(),
    };
    Ok((tok_embd, output))
}

impl Transformer {
    /// Loads the standard tensors (`token_embd`, `blk.N.attn_*`, `blk.N.ffn_*`, `output_norm`,
    /// `output`) with the shapes `hp` implies.
    pub fn load(gguf: &GgufFile, hp: &HParams, spec: Spec) -> Result<Transformer, ModelError> {
        let d = hp.n_embd;
        let (tok_embd, output) = embeddings(gguf, hp)?;
        let layers = (0..hp.n_layer)
            .map(|i| {
                let n = |s: &str| layer_tensor(i, s);
                let post = |s: &str| -> Result<Option<Vec<f32>>, ModelError> {
                    spec.post_norms.then(|| vector(gguf, &n(s), d)).transpose()
                };
                let local = spec.swa.as_ref().is_some_and(|w| w.is_local(i));
                Ok(Layer {
                    attn_norm: vector(gguf, &n("attn_norm"), d)?,
                    attn: Attention::load(gguf, hp, i, spec.qk_norm, KvSource::Own(i), local)?,
                    post_attn_norm: post("post_attention_norm")?,
                    ffn_norm: vector(gguf, &n("ffn_norm"), d)?,
                    ffn: FeedForward::load(gguf, hp, i)?,
                    post_ffn_norm: post("post_ffw_norm")?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Transformer {
            hp: hp.clone(),
            spec,
            tok_embd,
            output_norm: vector(gguf, "output_norm.weight", d)?,
            output,
            layers,
        })
    }
}

impl Network for Transformer {
    fn forward(
        &self,
        run: Run<'_>,
        seqs: &mut [Seq<'_>],
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let (hp, spec) = (&self.hp, &self.spec);
        let local = spec.swa.as_ref().map(|w| (w.window, w.rope_base));
        let mut pass = Pass::new(hp, run, seqs, spec.rope_mode, local)?;
        let d = hp.n_embd;
        let embed_scale = if spec.embed_scale { (d as f32).sqrt() } else { 1.0 };
        let mut x = Act::from_vec(pass.embed(&self.tok_embd, seqs, embed_scale)?);
        let (mut h, mut o) = (Act::default(), Act::default());
        let opts = AttnOpts { scale: spec.attn_scale, v_norm: false };
        for l in &self.layers {
            pass.norm(&mut x, &mut h, d, Some(&l.attn_norm))?;
            pass.attention(seqs, &l.attn, opts, &mut h, &mut o)?;
            pass.add_normed(&mut x, &mut o, l.post_attn_norm.as_deref())?;
            pass.norm(&mut x, &mut h, d, Some(&l.ffn_norm))?;
            pass.feed_forward(&l.ffn, spec.ffn, None, &mut h, &mut o)?;
            pass.add_normed(&mut x, &mut o, l.post_ffn_norm.as_deref())?;
        }
        pass.finish(seqs, x, &self.output_norm, &self.output, spec.final_softcap, out)
    }
}
