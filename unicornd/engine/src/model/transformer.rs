//! The decoder-only transformer that the architectures describe, and its forward pass.
//!
//! One forward pass runs a batch of sequences together: the activations of all their tokens
//! form one matrix, so each weight matrix is read once per pass whatever the number of
//! sequences (continuous batching); only attention, which reads each sequence's own KV cache,
//! runs per sequence.

use unicorn_kernels::attention::{attention_batch, Attend, AttnParams};
use unicorn_kernels::ops::{scale, Rope, RopeMode};
use unicorn_kernels::{matmul_group, ThreadPool};

use super::flow::{Act, Flow};
use super::placement::{Exec, OpClass};
use super::weights::{vector, Matrix};
use super::{HParams, KvState, ModelError};
use crate::gguf::GgufFile;

/// How an architecture's block differs from the plain llama block. `Spec::llama` is the plain
/// block; an architecture file changes the fields it needs.
#[derive(Clone, Copy, Debug, PartialEq)]
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

/// Local attention on most layers, global on every `pattern`-th.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct SlidingWindow {
    /// A query sees the keys less than `window` positions behind it.
    pub window: usize,
    /// Layer `i` is global when `i % pattern == pattern - 1`, local otherwise.
    pub pattern: usize,
    /// RoPE base of the local layers (the global ones use `rope.freq_base`).
    pub rope_base: f32,
}

impl SlidingWindow {
    fn is_local(&self, layer: usize) -> bool {
        layer % self.pattern != self.pattern - 1
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

#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    ffn_norm: Vec<f32>,
    w_gate: Matrix,
    w_up: Matrix,
    w_down: Matrix,
    /// With `Spec::qk_norm`.
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    /// With `Spec::post_norms`.
    post_attn_norm: Option<Vec<f32>>,
    post_ffn_norm: Option<Vec<f32>>,
}

/// Weights and shape of a transformer. The matrices point into the model file's bytes, which
/// the caller passes to every call (the file outlives the transformer in [`super::Model`]).
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

impl Transformer {
    /// Loads the standard tensors (`token_embd`, `blk.N.attn_*`, `blk.N.ffn_*`, `output_norm`,
    /// `output`) with the shapes `hp` implies.
    pub fn load(gguf: &GgufFile, hp: &HParams, spec: Spec) -> Result<Transformer, ModelError> {
        let (d, ff, qd, kvd) = (hp.n_embd, hp.n_ff, hp.q_dim(), hp.kv_dim());
        let tok_embd = Matrix::load(gguf, "token_embd.weight", hp.n_vocab, d)?;
        let output = match gguf.get_tensor("output.weight") {
            Some(_) => Matrix::load(gguf, "output.weight", hp.n_vocab, d)?,
            None => tok_embd.clone(),
        };
        let layers = (0..hp.n_layer)
            .map(|i| {
                let n = |s: &str| format!("blk.{i}.{s}.weight");
                let opt = |on: bool, s: &str, len: usize| -> Result<Option<Vec<f32>>, ModelError> {
                    if on {
                        vector(gguf, &n(s), len).map(Some)
                    } else {
                        Ok(None)
                    }
                };
                Ok(Layer {
                    q_norm: opt(spec.qk_norm, "attn_q_norm", hp.head_dim)?,
                    k_norm: opt(spec.qk_norm, "attn_k_norm", hp.head_dim)?,
                    post_attn_norm: opt(spec.post_norms, "post_attention_norm", d)?,
                    post_ffn_norm: opt(spec.post_norms, "post_ffw_norm", d)?,
                    attn_norm: vector(gguf, &n("attn_norm"), d)?,
                    wq: Matrix::load(gguf, &n("attn_q"), qd, d)?,
                    wk: Matrix::load(gguf, &n("attn_k"), kvd, d)?,
                    wv: Matrix::load(gguf, &n("attn_v"), kvd, d)?,
                    wo: Matrix::load(gguf, &n("attn_output"), d, qd)?,
                    ffn_norm: vector(gguf, &n("ffn_norm"), d)?,
                    w_gate: Matrix::load(gguf, &n("ffn_gate"), ff, d)?,
                    w_up: Matrix::load(gguf, &n("ffn_up"), ff, d)?,
                    w_down: Matrix::load(gguf, &n("ffn_down"), d, ff)?,
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

    /// Runs `seqs` through the network: appends their tokens to their KV caches and writes the
    /// logits they asked for into `out` (`n_vocab` values per logits row, sequence by sequence,
    /// token order within each). Everything is validated before any state changes. The matrix
    /// products and norms of the classes `exec` places on a device run there, the rest on the
    /// CPU.
    pub fn forward(
        &self,
        bytes: &[u8],
        exec: &Exec,
        pool: &ThreadPool,
        seqs: &mut [Seq<'_>],
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let hp = &self.hp;
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
        let (d, hd, qd, kvd, ff) = (hp.n_embd, hp.head_dim, hp.q_dim(), hp.kv_dim(), hp.n_ff);
        let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        // Position of every token, and where each sequence's rows start.
        let mut pos = Vec::with_capacity(n);
        let mut starts = Vec::with_capacity(seqs.len());
        for s in seqs.iter() {
            starts.push(pos.len());
            pos.extend(s.kv.n_past()..s.kv.n_past() + s.tokens.len());
        }

        let spec = &self.spec;
        let mut flow = Flow::new(exec)?;
        let submits_before = flow.submits();
        let mut x = vec![0.0f32; n * d];
        for (row, &t) in x.chunks_exact_mut(d).zip(seqs.iter().flat_map(|s| s.tokens.iter())) {
            self.tok_embd.row(bytes, t as usize, row)?;
        }
        if spec.embed_scale {
            scale(&mut x, (d as f32).sqrt());
        }
        let rope = Rope {
            mode: spec.rope_mode,
            n_dims: hp.rope_dims,
            freq_base: hp.rope_base,
            freq_scale: hp.rope_scale,
        };
        // One (cos, sin) table per token, shared by every layer (two when local layers use
        // another base).
        let tables = |rope: &Rope| {
            let mut tab = vec![0.0f32; n * hp.rope_dims];
            for (t, &p) in tab.chunks_exact_mut(hp.rope_dims.max(1)).zip(&pos) {
                rope.cache(p, t);
            }
            tab
        };
        let rope_global = tables(&rope);
        let rope_local = spec.swa.map(|w| {
            let local = Rope { freq_base: w.rope_base, freq_scale: 1.0, ..rope };
            (local, tables(&local))
        });

        let mut x = Act::from_vec(x);
        let mut h = Act::zeros(n * d);
        let (mut q, mut k, mut v) = (Act::zeros(n * qd), Act::zeros(n * kvd), Act::zeros(n * kvd));
        let mut attn = Act::zeros(n * qd);
        let mut o = Act::zeros(n * d);
        let (mut gate, mut up, mut act) =
            (Act::zeros(n * ff), Act::zeros(n * ff), Act::zeros(n * ff));
        let qk_normed = spec.qk_norm.then(|| (Act::zeros(n * qd), Act::zeros(n * kvd)));
        let (mut qn, mut kn) = qk_normed.unwrap_or_default();
        use OpClass::{Attention, FeedForward};

        for (li, l) in self.layers.iter().enumerate() {
            let local = spec.swa.filter(|w| w.is_local(li));
            flow.norm(&mut x, &mut h, d, &l.attn_norm, hp.rms_eps)?;
            if flow.on(Attention) {
                flow.matmul(Attention, &l.wq, bytes, pool, &mut h, n, &mut q)?;
                flow.matmul(Attention, &l.wk, bytes, pool, &mut h, n, &mut k)?;
                flow.matmul(Attention, &l.wv, bytes, pool, &mut h, n, &mut v)?;
            } else {
                // One job for Q, K and V: the input quantized once, the threads kept busy.
                let qkv = [l.wq.view(bytes)?, l.wk.view(bytes)?, l.wv.view(bytes)?];
                let h = flow.host(&mut h)?;
                let (q, k, v) =
                    (flow.host_mut(&mut q)?, flow.host_mut(&mut k)?, flow.host_mut(&mut v)?);
                let mut jobs = [(qkv[0], &mut q[..]), (qkv[1], &mut k[..]), (qkv[2], &mut v[..])];
                matmul_group(pool, h, n, &mut jobs)?;
            }
            if let (Some(qw), Some(kw)) = (&l.q_norm, &l.k_norm) {
                // Every head of every token is a row of `head_dim` values.
                flow.norm(&mut q, &mut qn, hd, qw, hp.rms_eps)?;
                std::mem::swap(&mut q, &mut qn);
                flow.norm(&mut k, &mut kn, hd, kw, hp.rms_eps)?;
                std::mem::swap(&mut k, &mut kn);
            }
            let (rope_l, rope_tab) = match (&local, &rope_local) {
                (Some(_), Some((r, tab))) => (r, tab),
                _ => (&rope, &rope_global),
            };
            // RoPE, the KV cache and attention run on the CPU: the device's work so far is
            // submitted here, when Q, K and V are read back.
            let (qh, kh) = (flow.host_mut(&mut q)?, flow.host_mut(&mut k)?);
            let vh = flow.host(&mut v)?;
            for t in 0..n {
                let tab = &rope_tab[t * hp.rope_dims..][..hp.rope_dims];
                if hp.rope_dims > 0 {
                    rope_l.apply(tab, &mut qh[t * qd..][..qd], hd);
                    rope_l.apply(tab, &mut kh[t * kvd..][..kvd], hd);
                }
            }
            for (s, &t0) in seqs.iter_mut().zip(&starts) {
                for i in 0..s.tokens.len() {
                    let t = t0 + i;
                    s.kv.store(li, pos[t], &kh[t * kvd..][..kvd], &vh[t * kvd..][..kvd]);
                }
            }
            // Every sequence's attention in one job: a batch of single-token decodes has few
            // heads each.
            let mut jobs = Vec::with_capacity(seqs.len());
            let mut attn_rest = flow.host_mut(&mut attn)?.as_mut_slice();
            for (s, &t0) in seqs.iter().zip(&starts) {
                let m = s.tokens.len();
                let params = AttnParams {
                    n_head: hp.n_head,
                    scale: spec.attn_scale,
                    pos0: pos[t0],
                    kv_len: pos[t0] + m,
                    causal: true,
                    window: local.map(|w| w.window),
                    softcap: None,
                };
                let (out, rest) = std::mem::take(&mut attn_rest).split_at_mut(m * qd);
                attn_rest = rest;
                let q = &qh[t0 * qd..][..m * qd];
                jobs.push(Attend { q, n_q: m, kv: s.kv.layer(li), params, out });
            }
            attention_batch(pool, &mut jobs)?;
            flow.matmul(Attention, &l.wo, bytes, pool, &mut attn, n, &mut o)?;
            if let Some(w) = &l.post_attn_norm {
                flow.norm(&mut o, &mut h, d, w, hp.rms_eps)?;
                flow.add(&mut x, &mut h)?;
            } else {
                flow.add(&mut x, &mut o)?;
            }

            flow.norm(&mut x, &mut h, d, &l.ffn_norm, hp.rms_eps)?;
            if flow.on(FeedForward) {
                flow.matmul(FeedForward, &l.w_gate, bytes, pool, &mut h, n, &mut gate)?;
                flow.matmul(FeedForward, &l.w_up, bytes, pool, &mut h, n, &mut up)?;
            } else {
                let (wg, wu) = (l.w_gate.view(bytes)?, l.w_up.view(bytes)?);
                let h = flow.host(&mut h)?;
                let (g, u) = (flow.host_mut(&mut gate)?, flow.host_mut(&mut up)?);
                matmul_group(pool, h, n, &mut [(wg, g), (wu, u)])?;
            }
            flow.glu(spec.ffn, &mut gate, &mut up, &mut act)?;
            flow.matmul(FeedForward, &l.w_down, bytes, pool, &mut act, n, &mut o)?;
            if let Some(w) = &l.post_ffn_norm {
                flow.norm(&mut o, &mut h, d, w, hp.rms_eps)?;
                flow.add(&mut x, &mut h)?;
            } else {
                flow.add(&mut x, &mut o)?;
            }
        }

        // Logits only for the rows that want them.
        let mut rows = Vec::new();
        for (s, &t0) in seqs.iter().zip(&starts) {
            match s.logits {
                Logits::None => {}
                Logits::Last => rows.push(t0 + s.tokens.len() - 1),
                Logits::All => rows.extend(t0..t0 + s.tokens.len()),
            }
        }
        out.clear();
        if !rows.is_empty() {
            // Every row in order (a single decode, or every position): no gathering, so the
            // hidden state may stay on the device.
            let mut sel = if rows.len() == n {
                x
            } else {
                let x = flow.host(&mut x)?;
                let mut sel = Vec::with_capacity(rows.len() * d);
                for &r in &rows {
                    sel.extend_from_slice(&x[r * d..][..d]);
                }
                Act::from_vec(sel)
            };
            let mut normed = Act::zeros(rows.len() * d);
            flow.norm(&mut sel, &mut normed, d, &self.output_norm, hp.rms_eps)?;
            let mut logits = Act::from_vec(std::mem::take(out));
            flow.host_mut(&mut logits)?.resize(rows.len() * hp.n_vocab, 0.0);
            flow.matmul(
                OpClass::Output,
                &self.output,
                bytes,
                pool,
                &mut normed,
                rows.len(),
                &mut logits,
            )?;
            *out = flow.take(&mut logits)?;
            if let Some(cap) = spec.final_softcap {
                for v in out.iter_mut() {
                    *v = cap * (*v / cap).tanh();
                }
            }
        }
        flow.finish(submits_before);
        // Only now, when nothing can fail any more, do the sequences advance (a failed pass can
        // be run again, e.g. on the CPU after a device error).
        for s in seqs.iter_mut() {
            s.kv.push_tokens(s.tokens);
        }
        Ok(())
    }
}
