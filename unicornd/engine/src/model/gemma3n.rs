//! `gemma3n`: Gemma 3n (E2B, E4B), text only. Its layers use the shared attention (Q/K norms,
//! NEOX RoPE, a sliding window on most layers) and GeGLU feed-forward, arranged unlike the plain
//! block:
//!
//! - **AltUp**: the residual stream is `altup.num_inputs` streams. The embedding is stream 0;
//!   the others are `altup_proj` of it, scaled to its magnitude. Each layer *predicts* every
//!   stream as a mix of all of them (coefficients from `altup_predict_coef` applied to a router:
//!   `tanh(altup_router · rms_norm(x) / n_embd)`), runs the block on the active stream, and
//!   *corrects* every stream by its share (`altup_correct_coef`, plus one) of the block's
//!   innovation. At the end, streams 1.. go through `altup_unembd_proj`, are scaled to the
//!   active stream's magnitude, and all are averaged.
//! - **LAuReL**: beside attention, `x + norm(laurel_r · laurel_l · x)` (a low-rank residual);
//!   attention's output plus it, over `sqrt(2)`, is the feed-forward's input.
//! - **Per-layer inputs**: each token also has a `256`-wide input per layer: its row of
//!   `per_layer_token_embd` (times `sqrt(256)`) plus the normed `per_layer_model_proj` of its
//!   embedding, over `sqrt(2)`. After each layer the corrected active stream is gated by it
//!   (`proj · (gelu(inp_gate · x) * input)`, normed by `post_norm`) and added to streams 1..
//! - **KV sharing**: the last `attention.shared_kv_layers` layers compute only queries, and
//!   attend over the cache of the last earlier layer of the same kind (local or global). They
//!   have no cache (the file still carries their K and V products; they are not loaded).
//! - **Activation sparsity**: in the first layers, the feed-forward's gate values are cut at
//!   their mean plus `icdf(0.95)` standard deviations (gaussian top-k).
//! - V is RMS-normed per head (no weight), the attention scale is 1, norm weights are used as
//!   stored (no `+1`), and the logits are soft-capped.
//!
//! Values llama.cpp (commit 0c1e570) fixes in code rather than reading from the file. Here each
//! is read from the file when the key is there (the converter writes them), with
//! llama.cpp's value as the fallback:
//! - AltUp: 4 streams, active index 0 (`altup.num_inputs`, `altup.active_idx`);
//! - the per-layer input width 256 (`embedding_length_per_layer_input`), checked against the
//!   shape of `per_layer_token_embd`;
//! - caches in layers 0..19 (`attention.shared_kv_layers`: the last n layers share);
//! - activation sparsity in layers 0..9 with multiplier 1.6448533535 = icdf(0.95)
//!   (`activation_sparsity_scale`: icdf(p) per layer, `-inf` for a dense one);
//! - the LAuReL rank 64: the shape of `laurel_l`;
//! - the attention scale 1.0 (no key; fixed here too: Q and K are normed instead).
//!
//! Read by llama.cpp too, with its value for a file without the key: the soft-cap
//! `final_logit_softcapping` (30), the local/global pattern `attention.sliding_window_pattern`
//! (every 5th layer global), the local layers' RoPE base `rope.freq_base_swa` (10 000; global
//! layers use `rope.freq_base`).
//!
//! Where they run: LAuReL's products with the attention class, the per-layer input's gate and
//! projection with the feed-forward class; the AltUp router, coefficients and projections and
//! `per_layer_model_proj` (small, or once per token) on the CPU. With classes on the Vulkan
//! device the block's norms, products and residual additions stay on the device between the
//! shared steps, and with the attention class there RoPE, the KV cache and attention too; the
//! host code (AltUp's prediction and correction, LAuReL's `1/sqrt(2)`, the gaussian top-k, the
//! per-layer input's GeGLU) reads its inputs back, so a layer is about five and a half
//! submissions rather than one (see `unicornd/vulkan/README.md`).

use super::placement::OpClass;
use super::transformer::{
    embeddings, layer_tensor, Act, Attention, AttnOpts, FeedForward, Ffn, KvSource, Network, Pass,
    Run, Seq, SlidingWindow,
};
use super::weights::{vector, Matrix};
use super::{HParams, ModelError};
use crate::gguf::GgufFile;
use unicorn_kernels::ops::{add_assign, geglu, scale, RopeMode};

/// llama.cpp's fixed values, used when the file does not give them.
const ALTUP_INPUTS: usize = 4;
const ALTUP_ACTIVE: usize = 0;
const PER_LAYER_WIDTH: usize = 256;
const KV_LAYERS: usize = 20;
const SWA_PATTERN: usize = 5;
const SWA_ROPE_BASE: f32 = 10_000.0;
const SPARSE_LAYERS: usize = 10;
/// `icdf(0.95)` of the standard normal distribution.
const SPARSITY_STD_MUL: f32 = 1.644_853_4;
const SOFTCAP: f32 = 30.0;
/// Q and K are RMS-normed, so `q . k` is not scaled.
const ATTN_SCALE: f32 = 1.0;

#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    attn: Attention,
    post_attn_norm: Vec<f32>,
    laurel_l: Matrix,
    laurel_r: Matrix,
    laurel_post_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    ffn: FeedForward,
    post_ffn_norm: Vec<f32>,
    /// Gaussian top-k multiplier of the gate, in the sparse layers.
    sparsity: Option<f32>,
    router_norm: Vec<f32>,
    /// `n_altup` outputs.
    router: Matrix,
    /// `n_altup^2` outputs (row `j * n_altup + i`: stream `i`'s share in stream `j`).
    predict_coef: Matrix,
    /// `n_altup` outputs.
    correct_coef: Matrix,
    correct_scale: Vec<f32>,
    /// `per_layer_width` outputs, then back to `n_embd`.
    inp_gate: Matrix,
    proj: Matrix,
    post_norm: Vec<f32>,
}

#[derive(Debug)]
pub(crate) struct Gemma3n {
    hp: HParams,
    n_altup: usize,
    active: usize,
    per_layer_width: usize,
    window: usize,
    swa_rope_base: f32,
    softcap: f32,
    tok_embd: Matrix,
    output: Matrix,
    output_norm: Vec<f32>,
    /// `n_layer * per_layer_width` per token.
    per_layer_tok_embd: Matrix,
    per_layer_model_proj: Matrix,
    per_layer_proj_norm: Vec<f32>,
    /// One per stream after the first.
    altup_proj: Vec<Matrix>,
    altup_unembd_proj: Vec<Matrix>,
    layers: Vec<Layer>,
}

fn bad(key: &str, message: String) -> ModelError {
    ModelError::BadHParam { key: format!("gemma3n.{key}"), message }
}

/// Reads the hyper-parameters beyond the common ones (setting `hp.n_layer_kv`) and the tensors.
pub(crate) fn load(gguf: &GgufFile, hp: &mut HParams) -> Result<Box<dyn Network>, ModelError> {
    let md = gguf.metadata();
    let key = |k: &str| format!("gemma3n.{k}");
    let n_layer = hp.n_layer;
    let uint_or = |k: &str, default: usize| -> Result<usize, ModelError> {
        Ok(md.opt_uint(&key(k))?.map_or(default, |v| v.min(usize::MAX as u64) as usize))
    };

    let n_altup = uint_or("altup.num_inputs", ALTUP_INPUTS)?;
    if !(2..=16).contains(&n_altup) {
        return Err(bad("altup.num_inputs", format!("{n_altup} streams: 2..=16 are supported")));
    }
    let active = uint_or("altup.active_idx", ALTUP_ACTIVE)?;
    if active >= n_altup {
        return Err(bad("altup.active_idx", format!("{active} of {n_altup} streams")));
    }
    let per_layer_width = uint_or("embedding_length_per_layer_input", PER_LAYER_WIDTH)?;
    if per_layer_width == 0 || per_layer_width > 1 << 16 {
        return Err(bad("embedding_length_per_layer_input", format!("{per_layer_width}")));
    }

    // KV sharing: the first `n_layer_kv` layers have a cache.
    let n_layer_kv = match md.opt_uint(&key("attention.shared_kv_layers"))? {
        Some(shared) if shared as usize >= n_layer => {
            return Err(bad(
                "attention.shared_kv_layers",
                format!("{shared} of {n_layer} layers: some layer must have a cache"),
            ))
        }
        Some(shared) => n_layer - shared as usize,
        None => KV_LAYERS.min(n_layer),
    };
    hp.n_layer_kv = n_layer_kv;

    let window = md.get_uint(&key("attention.sliding_window"))?;
    if window == 0 || window > 1 << 24 {
        return Err(bad("attention.sliding_window", format!("{window}")));
    }
    let swa_rope_base = md.opt_f32(&key("rope.freq_base_swa"))?.unwrap_or(SWA_ROPE_BASE);
    if !(swa_rope_base.is_finite() && swa_rope_base > 1.0) {
        return Err(bad("rope.freq_base_swa", format!("{swa_rope_base}")));
    }
    let swa = match md.opt_bool_array(&key("attention.sliding_window_pattern"))? {
        Some(local) if local.len() != n_layer => {
            return Err(bad(
                "attention.sliding_window_pattern",
                format!("{} values for {n_layer} layers", local.len()),
            ))
        }
        Some(local) => SlidingWindow {
            window: window as usize,
            rope_base: swa_rope_base,
            local: local.to_vec(),
        },
        None => SlidingWindow::every(SWA_PATTERN, n_layer, window as usize, swa_rope_base),
    };

    let sparsity: Vec<Option<f32>> = match md.opt_f32_array(&key("activation_sparsity_scale"))? {
        Some(v) if v.len() != n_layer => {
            return Err(bad(
                "activation_sparsity_scale",
                format!("{} values for {n_layer} layers", v.len()),
            ))
        }
        Some(v) => match v.iter().position(|s| s.is_nan() || *s == f32::INFINITY) {
            Some(i) => {
                return Err(bad("activation_sparsity_scale", format!("layer {i}: {}", v[i])))
            }
            // icdf(0) = -inf: a dense layer.
            None => v.iter().map(|&s| s.is_finite().then_some(s)).collect(),
        },
        None => (0..n_layer).map(|i| (i < SPARSE_LAYERS).then_some(SPARSITY_STD_MUL)).collect(),
    };

    let softcap = md.opt_f32(&key("final_logit_softcapping"))?.unwrap_or(SOFTCAP);
    if !(softcap.is_finite() && softcap > 0.0) {
        return Err(bad("final_logit_softcapping", format!("{softcap}")));
    }

    // Each sharing layer reads the last layer with a cache of the same kind.
    let kv_source = |i: usize| -> Result<KvSource, ModelError> {
        if i < n_layer_kv {
            return Ok(KvSource::Own(i));
        }
        let kind = if swa.local[i] { "local" } else { "global" };
        let found = (0..n_layer_kv).rev().find(|&j| swa.local[j] == swa.local[i]);
        found.map(KvSource::Shared).ok_or_else(|| {
            bad(
                "attention.shared_kv_layers",
                format!(
                    "layer {i} ({kind}) shares a cache, but none of the {n_layer_kv} layers with \
                     one is {kind} (see gemma3n.attention.sliding_window_pattern)"
                ),
            )
        })
    };

    let hp = &*hp;
    let d = hp.n_embd;
    let (tok_embd, output) = embeddings(gguf, hp)?;
    let all_width = n_layer * per_layer_width;
    let per_token = gguf.tensor("per_layer_token_embd.weight")?.dims[0];
    if per_token != all_width as u64 {
        return Err(bad(
            "embedding_length_per_layer_input",
            format!(
                "{per_layer_width} for {n_layer} layers, but per_layer_token_embd.weight holds \
                 {per_token} values per token"
            ),
        ));
    }
    let rank = match gguf.tensor(&layer_tensor(0, "laurel_l"))?.dims {
        [_, rank] => *rank as usize,
        dims => {
            return Err(ModelError::BadTensor {
                name: layer_tensor(0, "laurel_l"),
                message: format!("shape {dims:?}, expected 2 dimensions"),
            })
        }
    };
    let layers = (0..n_layer)
        .map(|i| {
            let n = |s: &str| layer_tensor(i, s);
            let v = |s: &str, len: usize| vector(gguf, &n(s), len);
            let m = |s: &str, rows: usize, cols: usize| Matrix::load(gguf, &n(s), rows, cols);
            let attn = Attention::load(gguf, hp, i, true, kv_source(i)?, swa.local[i])?;
            Ok(Layer {
                attn_norm: v("attn_norm", d)?,
                attn,
                post_attn_norm: v("post_attention_norm", d)?,
                laurel_l: m("laurel_l", rank, d)?,
                laurel_r: m("laurel_r", d, rank)?,
                laurel_post_norm: v("laurel_post_norm", d)?,
                ffn_norm: v("ffn_norm", d)?,
                ffn: FeedForward::load(gguf, hp, i)?,
                post_ffn_norm: v("post_ffw_norm", d)?,
                sparsity: sparsity[i],
                router_norm: v("altup_router_norm", d)?,
                router: m("altup_router", n_altup, d)?,
                predict_coef: m("altup_predict_coef", n_altup * n_altup, n_altup)?,
                correct_coef: m("altup_correct_coef", n_altup, n_altup)?,
                correct_scale: v("altup_correct_scale", d)?,
                inp_gate: m("inp_gate", per_layer_width, d)?,
                proj: m("proj", d, per_layer_width)?,
                post_norm: v("post_norm", d)?,
            })
        })
        .collect::<Result<Vec<_>, ModelError>>()?;
    let stack = |name: &str| Matrix::load_stack(gguf, name, d, d, Some(n_altup - 1));
    Ok(Box::new(Gemma3n {
        hp: hp.clone(),
        n_altup,
        active,
        per_layer_width,
        window: swa.window,
        swa_rope_base: swa.rope_base,
        softcap,
        tok_embd,
        output,
        output_norm: vector(gguf, "output_norm.weight", d)?,
        per_layer_tok_embd: Matrix::load(
            gguf,
            "per_layer_token_embd.weight",
            hp.n_vocab,
            all_width,
        )?,
        per_layer_model_proj: Matrix::load(gguf, "per_layer_model_proj.weight", all_width, d)?,
        per_layer_proj_norm: vector(gguf, "per_layer_proj_norm.weight", per_layer_width)?,
        altup_proj: stack("altup_proj.weight")?,
        altup_unembd_proj: stack("altup_unembd_proj.weight")?,
        layers,
    }))
}

/// `sqrt(sum x^2)` of each row of `dim` values.
fn magnitudes(x: &[f32], dim: usize) -> Vec<f32> {
    x.chunks_exact(dim).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).collect()
}

/// Scales each row of `x` to the magnitude `target` of its token.
fn rescale(x: &mut [f32], dim: usize, target: &[f32]) {
    let have = magnitudes(x, dim);
    for (row, (&want, have)) in x.chunks_exact_mut(dim).zip(target.iter().zip(have)) {
        scale(row, want / have.max(f32::MIN_POSITIVE));
    }
}

impl Gemma3n {
    /// The AltUp router of layer `l` for the rows `x`: `n_altup` weights per token. `h` is
    /// scratch (kept by the caller so that its device tensors serve every layer).
    fn router(
        &self,
        pass: &mut Pass<'_>,
        l: &Layer,
        x: &mut Act,
        h: &mut Act,
    ) -> Result<Vec<f32>, ModelError> {
        let d = self.hp.n_embd;
        pass.norm(x, h, d, Some(&l.router_norm))?;
        scale(pass.host_mut(h)?, 1.0 / d as f32);
        let mut out = Act::default();
        pass.matmul(None, &l.router, h, &mut out)?;
        let mut out = pass.take(&mut out)?;
        out.iter_mut().for_each(|v| *v = v.tanh());
        Ok(out)
    }

    /// AltUp's prediction: stream `j` plus `sum_i c[j][i] * stream i`, per token.
    fn predict(
        &self,
        pass: &mut Pass<'_>,
        l: &Layer,
        streams: &mut [Vec<f32>],
        h: &mut Act,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let (d, a) = (self.hp.n_embd, self.n_altup);
        let mut x = Act::from_vec(std::mem::take(&mut streams[self.active]));
        let modalities = self.router(pass, l, &mut x, h);
        streams[self.active] = pass.take(&mut x)?;
        let mut modalities = Act::from_vec(modalities?);
        let mut coef = Act::default();
        pass.matmul(None, &l.predict_coef, &mut modalities, &mut coef)?;
        let coef = pass.host(&mut coef)?;
        let mut preds = streams.to_vec();
        for (j, p) in preds.iter_mut().enumerate() {
            for (t, row) in p.chunks_exact_mut(d).enumerate() {
                for (i, s) in streams.iter().enumerate() {
                    let c = coef[t * a * a + j * a + i];
                    for (o, &x) in row.iter_mut().zip(&s[t * d..][..d]) {
                        *o += c * x;
                    }
                }
            }
        }
        Ok(preds)
    }

    /// AltUp's correction: each predicted stream plus its share (coefficient + 1) of the
    /// innovation `out - preds[active]`.
    fn correct(
        &self,
        pass: &mut Pass<'_>,
        l: &Layer,
        mut preds: Vec<Vec<f32>>,
        out: &mut Act,
        h: &mut Act,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let (d, a) = (self.hp.n_embd, self.n_altup);
        let mut modalities = Act::from_vec(self.router(pass, l, out, h)?);
        let mut coef = Act::default();
        pass.matmul(None, &l.correct_coef, &mut modalities, &mut coef)?;
        let coef = pass.host(&mut coef)?;
        let out = pass.host(out)?;
        let innovation: Vec<f32> =
            out.iter().zip(&preds[self.active]).map(|(&y, &p)| y - p).collect();
        for (s, p) in preds.iter_mut().enumerate() {
            for (t, row) in p.chunks_exact_mut(d).enumerate() {
                let c = coef[t * a + s] + 1.0;
                for (o, &x) in row.iter_mut().zip(&innovation[t * d..][..d]) {
                    *o += c * x;
                }
            }
        }
        Ok(preds)
    }

    /// Each token's input of every layer (`n x n_layer x per_layer_width`).
    fn per_layer_inputs(
        &self,
        pass: &mut Pass<'_>,
        seqs: &[Seq<'_>],
        embd: &mut Act,
    ) -> Result<Vec<f32>, ModelError> {
        let (d, w) = (self.hp.n_embd, self.per_layer_width);
        let mut inputs = pass.embed(&self.per_layer_tok_embd, seqs, (w as f32).sqrt())?;
        let mut proj = Act::default();
        pass.matmul(None, &self.per_layer_model_proj, embd, &mut proj)?;
        scale(pass.host_mut(&mut proj)?, 1.0 / (d as f32).sqrt());
        let mut normed = Act::default();
        pass.norm(&mut proj, &mut normed, w, Some(&self.per_layer_proj_norm))?;
        add_assign(&mut inputs, pass.host(&mut normed)?);
        scale(&mut inputs, std::f32::consts::FRAC_1_SQRT_2);
        Ok(inputs)
    }
}

impl Network for Gemma3n {
    /// The block's norms and products are the shared steps on [`Act`]s, so on the device they
    /// stay there between steps; AltUp, LAuReL's scaling and the per-layer inputs are host code
    /// on the stream values, where they are read back.
    fn forward(
        &self,
        run: Run<'_>,
        seqs: &mut [Seq<'_>],
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let hp = &self.hp;
        let local = Some((self.window, self.swa_rope_base));
        let mut pass = Pass::new(hp, run, seqs, RopeMode::Neox, local)?;
        let (d, w, a) = (hp.n_embd, self.per_layer_width, self.n_altup);
        let mut embd = Act::from_vec(pass.embed(&self.tok_embd, seqs, (d as f32).sqrt())?);
        let inputs = self.per_layer_inputs(&mut pass, seqs, &mut embd)?;

        // Stream 0 is the embedding, the others its projections at its magnitude.
        let target = magnitudes(pass.host(&mut embd)?, d);
        let mut streams = Vec::with_capacity(a);
        let mut s = Act::default();
        for p in &self.altup_proj {
            pass.matmul(None, p, &mut embd, &mut s)?;
            let s = pass.host_mut(&mut s)?;
            rescale(s, d, &target);
            streams.push(s.clone());
        }
        streams.insert(0, pass.take(&mut embd)?);

        let opts = AttnOpts { scale: ATTN_SCALE, v_norm: true };
        let (mut x, mut h, mut o) = (Act::default(), Act::default(), Act::default());
        let (mut low, mut laurel) = (Act::default(), Act::default());
        let (mut gate, mut gated) = (Act::default(), Act::default());
        let mut layer_input = Vec::new();
        let attn_class = Some(OpClass::Attention);
        let ffn_class = Some(OpClass::FeedForward);
        for (li, l) in self.layers.iter().enumerate() {
            let preds = self.predict(&mut pass, l, &mut streams, &mut h)?;
            pass.overwrite(&mut x).clone_from(&preds[self.active]);
            pass.norm(&mut x, &mut h, d, Some(&l.attn_norm))?;

            // LAuReL: h + norm(laurel_r · laurel_l · h).
            pass.matmul(attn_class, &l.laurel_l, &mut h, &mut low)?;
            pass.matmul(attn_class, &l.laurel_r, &mut low, &mut o)?;
            pass.norm(&mut o, &mut laurel, d, Some(&l.laurel_post_norm))?;
            pass.add(&mut laurel, &mut h)?;

            pass.attention(seqs, &l.attn, opts, &mut h, &mut o)?;
            pass.add_normed(&mut x, &mut o, Some(&l.post_attn_norm))?;
            pass.add(&mut x, &mut laurel)?;
            scale(pass.host_mut(&mut x)?, std::f32::consts::FRAC_1_SQRT_2);

            pass.norm(&mut x, &mut h, d, Some(&l.ffn_norm))?;
            pass.feed_forward(&l.ffn, Ffn::GeluTanh, l.sparsity, &mut h, &mut o)?;
            pass.add_normed(&mut x, &mut o, Some(&l.post_ffn_norm))?;

            streams = self.correct(&mut pass, l, preds, &mut x, &mut h)?;

            // The per-layer input, gated by the corrected active stream, joins streams 1..
            let hs = pass.overwrite(&mut h);
            hs.clone_from(&streams[self.active]);
            for row in hs.chunks_exact_mut(d) {
                row.iter_mut().zip(&l.correct_scale).for_each(|(v, s)| *v *= s);
            }
            pass.matmul(ffn_class, &l.inp_gate, &mut h, &mut gate)?;
            layer_input.clear();
            for t in 0..pass.n() {
                layer_input.extend_from_slice(&inputs[(t * hp.n_layer + li) * w..][..w]);
            }
            gated.resize(gate.len());
            geglu(pass.host(&mut gate)?, &layer_input, pass.overwrite(&mut gated));
            pass.matmul(ffn_class, &l.proj, &mut gated, &mut o)?;
            pass.norm(&mut o, &mut h, d, Some(&l.post_norm))?;
            let h = pass.host(&mut h)?;
            for s in &mut streams[1..] {
                add_assign(s, h);
            }
        }

        // Streams 1.. back through their projections at the active stream's magnitude, then
        // the mean of all.
        let target = magnitudes(&streams[self.active], d);
        let mut x = streams[0].clone();
        for (p, s) in self.altup_unembd_proj.iter().zip(&mut streams[1..]) {
            let mut s = Act::from_vec(std::mem::take(s));
            pass.matmul(None, p, &mut s, &mut o)?;
            let o = pass.host_mut(&mut o)?;
            rescale(o, d, &target);
            add_assign(&mut x, o);
        }
        scale(&mut x, 1.0 / a as f32);
        let x = Act::from_vec(x);
        pass.finish(seqs, x, &self.output_norm, &self.output, Some(self.softcap), out)
    }
}
