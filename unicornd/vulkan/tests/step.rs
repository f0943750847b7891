//! [`Step`]: a chain of operations recorded into one submission gives what the op-level calls
//! (each its own submission, tested against the CPU kernels in tests/ops.rs) give, with one
//! submit per host read; stale tensors and aliasing are errors; timestamps when asked for.
//!
//! Like tests/ops.rs these fail rather than skip where lavapipe's ICD is installed.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use unicorn_kernels::attention::AttnParams;
use unicorn_kernels::ops::{Rope, RopeMode};
use unicorn_kernels::GgmlType;
use unicorn_vulkan::{
    Context, KvCache, KvElem, KvShape, Options, OutRows, Step, VulkanError, Weight,
};

use common::{q8_matrix, values};

fn ctx() -> Option<&'static Context> {
    static CTX: OnceLock<Option<Context>> = OnceLock::new();
    CTX.get_or_init(|| match Context::new(Options { allow_cpu: true, ..Options::default() }) {
        Ok(c) => Some(c),
        Err(e) => {
            assert!(!unicorn_vulkan::device_required(), "no Vulkan device: {e}");
            eprintln!("SKIPPED: no Vulkan device ({e})");
            None
        }
    })
    .as_ref()
}

fn assert_close(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        // The same shaders on the same inputs: equal up to the device's own nondeterminism.
        assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{what}[{i}]: {x} vs {y}");
    }
}

struct Block {
    gate: Weight,
    up: Weight,
    down: Weight,
    norm: Weight,
}

const D: usize = 64;
const FF: usize = 128;

/// norm -> gate, up -> swiglu -> down -> residual add, twice, as one recording.
#[test]
fn a_chain_in_one_submission_matches_the_op_level_calls() {
    let Some(ctx) = ctx() else { return };
    let n = 3;
    let (wg, wu, wd) = (q8_matrix(FF, D, 1), q8_matrix(FF, D, 2), q8_matrix(D, FF, 3));
    let norm_w = values(D, 4);
    let x0 = values(n * D, 5);

    // The op-level path, one submission per call.
    let ty = GgmlType::Q8_0;
    let bufs = [&wg, &wu, &wd].map(|b| unicorn_vulkan::Buffer::from_bytes(ctx, b).unwrap());
    let mut want = x0.clone();
    for _ in 0..2 {
        let h = ctx.rms_norm(&want, D, Some(&norm_w), 1e-5).unwrap();
        let g = ctx.matmul(ty, &bufs[0], FF, D, &h, n).unwrap();
        let u = ctx.matmul(ty, &bufs[1], FF, D, &h, n).unwrap();
        let a = ctx.swiglu(&g, &u).unwrap();
        let o = ctx.matmul(ty, &bufs[2], D, FF, &a, n).unwrap();
        want = ctx.add(&want, &o).unwrap();
    }

    let mut step = Step::new(ctx, false).unwrap();
    let b = Block {
        gate: step.weight(&wg).unwrap(),
        up: step.weight(&wu).unwrap(),
        down: step.weight(&wd).unwrap(),
        norm: step.weight_f32(&norm_w).unwrap(),
    };
    // Two steps: the second reuses the first one's buffers.
    for round in 0..2 {
        step.begin().unwrap();
        let before = step.stats();
        let mut x = step.upload(&x0).unwrap();
        let h = step.tensor(n * D).unwrap();
        let (g, u, a) = (
            step.tensor(n * FF).unwrap(),
            step.tensor(n * FF).unwrap(),
            step.tensor(n * FF).unwrap(),
        );
        let o = step.tensor(n * D).unwrap();
        let mut x2 = step.tensor(n * D).unwrap();
        let full = |rows| OutRows { first: 0, of: rows };
        for _ in 0..2 {
            step.rms_norm(x, D, Some(b.norm), 1e-5, h).unwrap();
            step.matmul(ty, b.gate, FF, D, h, n, g, full(FF)).unwrap();
            step.matmul(ty, b.up, FF, D, h, n, u, full(FF)).unwrap();
            step.swiglu(g, u, a).unwrap();
            step.matmul(ty, b.down, D, FF, a, n, o, full(D)).unwrap();
            step.add(x, o, x2).unwrap();
            std::mem::swap(&mut x, &mut x2);
        }
        let mut got = vec![0.0; n * D];
        step.read(x, &mut got).unwrap();
        let mut again = vec![0.0; n * D];
        step.read(x, &mut again).unwrap();
        let s = step.stats();
        assert_eq!(
            s.submits - before.submits,
            1,
            "round {round}: one submission for 12 dispatches"
        );
        assert_eq!(s.dispatches - before.dispatches, 12);
        assert_eq!(s.uploads - before.uploads, 1);
        assert_eq!(s.downloads - before.downloads, 2);
        assert_close("chain", &want, &got);
        assert_eq!(got, again);
    }
}

/// A matrix split by rows writes each part at its place in the output.
#[test]
fn split_matrices_land_at_their_rows() {
    let Some(ctx) = ctx() else { return };
    let (rows, n) = (96, 2);
    let w = q8_matrix(rows, D, 7);
    let x0 = values(n * D, 8);
    let whole = unicorn_vulkan::Buffer::from_bytes(ctx, &w).unwrap();
    let want = ctx.matmul(GgmlType::Q8_0, &whole, rows, D, &x0, n).unwrap();

    let mut step = Step::new(ctx, false).unwrap();
    let rb = w.len() / rows;
    let split = 40;
    let top = step.weight(&w[..split * rb]).unwrap();
    let bottom = step.weight(&w[split * rb..]).unwrap();
    let x = step.upload(&x0).unwrap();
    let out = step.tensor(n * rows).unwrap();
    let ty = GgmlType::Q8_0;
    step.matmul(ty, top, split, D, x, n, out, OutRows { first: 0, of: rows }).unwrap();
    let rest = rows - split;
    step.matmul(ty, bottom, rest, D, x, n, out, OutRows { first: split, of: rows }).unwrap();
    let mut got = vec![0.0; n * rows];
    step.read(out, &mut got).unwrap();
    assert_close("split", &want, &got);
}

#[test]
fn stale_tensors_aliasing_and_bad_shapes_are_errors() {
    let Some(ctx) = ctx() else { return };
    let mut step = Step::new(ctx, false).unwrap();
    let a = step.upload(&values(D, 1)).unwrap();
    let b = step.tensor(D).unwrap();
    assert!(step.add(a, b, a).is_err(), "output aliasing an input");
    let longer = step.tensor(D + 1).unwrap();
    assert!(step.rms_norm(a, D, None, 1e-5, longer).is_err(), "lengths differ");
    step.begin().unwrap();
    let mut out = vec![0.0; D];
    assert!(step.read(a, &mut out).is_err(), "a tensor of the previous step");
    let c = step.tensor(D).unwrap();
    assert!(step.read(c, &mut [0.0; 3]).is_err(), "length mismatch");
    assert_eq!(step.stats().submits, 0);
}

/// With timing on (and a queue with timestamps, as lavapipe has), every dispatch is measured and
/// no time is negative or absurd; the per-op totals add up to the dispatch count.
#[test]
fn timestamps_measure_every_dispatch() {
    let Some(ctx) = ctx() else { return };
    let Some(period) = ctx.timestamp_period_ns() else {
        assert!(
            !unicorn_vulkan::device_required(),
            "lavapipe's compute queue has timestamps; this device reports none"
        );
        eprintln!("SKIPPED: the queue has no timestamps");
        return;
    };
    assert!(period > 0.0);
    let mut step = Step::new(ctx, true).unwrap();
    assert!(step.timed());
    let norm = step.weight_f32(&values(D, 2)).unwrap();
    let wb = q8_matrix(FF, D, 3);
    let w = step.weight(&wb).unwrap();
    let x = step.upload(&values(D, 4)).unwrap();
    let h = step.tensor(D).unwrap();
    let y = step.tensor(FF).unwrap();
    // More dispatches than the first query pool holds, so the pool grows on the next recording.
    for _ in 0..150 {
        step.rms_norm(x, D, Some(norm), 1e-5, h).unwrap();
        step.matmul(GgmlType::Q8_0, w, FF, D, h, 1, y, OutRows { first: 0, of: FF }).unwrap();
    }
    step.flush().unwrap();
    let t = step.take_timings();
    let measured: u64 = t.iter().map(|o| o.count).sum();
    assert!(measured > 0 && measured <= 300, "{t:?}");
    for o in &t {
        assert!(o.ns.is_finite() && o.ns >= 0.0 && o.ns < 60e9, "{o:?}");
        assert!(o.op.starts_with("rms_norm") || o.op.starts_with("mul_mv_q8_0"), "{o:?}");
    }
    assert!(t.iter().map(|o| o.ns).sum::<f64>() > 0.0, "{t:?}");
    // The second recording has a pool large enough for all 300.
    for _ in 0..150 {
        step.rms_norm(x, D, Some(norm), 1e-5, h).unwrap();
        step.matmul(GgmlType::Q8_0, w, FF, D, h, 1, y, OutRows { first: 0, of: FF }).unwrap();
    }
    step.flush().unwrap();
    let t = step.take_timings();
    assert_eq!(t.iter().map(|o| o.count).sum::<u64>(), 300, "{t:?}");
    assert!(step.take_timings().is_empty(), "taken");
    eprintln!("timings: {t:?}");
}

/// Attention as the engine runs it with the attention class on the device, for two contexts
/// batched in one step (a prefill chunk of 3 tokens and a single decode token, each with its own
/// cache): RoPE of Q and K at each token's position, the store of each context's K and V, and
/// attention over its cache, in one submission, giving what the op-level calls give. A cache
/// dropped while a recording names it stays allocated until that recording is submitted.
#[test]
fn rope_store_and_attention_of_two_contexts_in_one_submission() {
    let Some(ctx) = ctx() else { return };
    let (n_head, n_kv, hd, n_ctx) = (4, 2, 16, 8);
    let shape = KvShape { n_kv_head: n_kv, n_ctx, head_dim: hd };
    let rope = Rope { mode: RopeMode::Neox, n_dims: hd, freq_base: 10_000.0, freq_scale: 1.0 };
    let live = Arc::new(AtomicUsize::new(0));
    let new_cache = || KvCache::new(ctx, shape, KvElem::F16, 2, Some(Arc::clone(&live))).unwrap();
    // Context A has 2 positions already; B none. The batch: A's 1 token, then B's 3.
    let (lens, past) = ([1usize, 3], [2usize, 0]);
    let n = 4;
    let pos: Vec<usize> = vec![2, 0, 1, 2];
    let (qd, kvd) = (n_head * hd, n_kv * hd);
    let (q, k, v) = (values(n * qd, 11), values(n * kvd, 12), values(n * kvd, 13));
    let (old_k, old_v) = (values(2 * kvd, 14), values(2 * kvd, 15));

    // The op-level path, each call its own submission.
    let mut want = Vec::new();
    {
        let mut caches = [new_cache(), new_cache()];
        ctx.kv_store(&mut caches[0], 1, &old_k, &old_v, 0).unwrap();
        let qr = ctx.rope(&rope, &q, hd, &pos).unwrap();
        let kr = ctx.rope(&rope, &k, hd, &pos).unwrap();
        let mut t0 = 0;
        for (c, (&m, &p0)) in caches.iter_mut().zip(lens.iter().zip(&past)) {
            ctx.kv_store(c, 1, &kr[t0 * kvd..][..m * kvd], &v[t0 * kvd..][..m * kvd], p0).unwrap();
            let p = AttnParams {
                n_head,
                scale: 0.25,
                pos0: p0,
                kv_len: p0 + m,
                causal: true,
                window: Some(2),
                softcap: None,
            };
            want.extend(ctx.attention(&qr[t0 * qd..][..m * qd], c, 1, &p).unwrap());
            t0 += m;
        }
    }
    assert_eq!(live.load(Ordering::Relaxed), 0, "the op-level caches were freed");

    let mut caches = [new_cache(), new_cache()];
    ctx.kv_store(&mut caches[0], 1, &old_k, &old_v, 0).unwrap();
    let mut step = Step::new(ctx, false).unwrap();
    let before = step.stats();
    let pos_t = step.upload_u32(&pos.iter().map(|&p| p as u32).collect::<Vec<_>>()).unwrap();
    let (qt, kt, vt) =
        (step.upload(&q).unwrap(), step.upload(&k).unwrap(), step.upload(&v).unwrap());
    let out = step.tensor(n * qd).unwrap();
    step.rope(&rope, qt, hd, pos_t, n).unwrap();
    step.rope(&rope, kt, hd, pos_t, n).unwrap();
    let mut t0 = 0;
    for (c, (&m, &p0)) in caches.iter_mut().zip(lens.iter().zip(&past)) {
        step.kv_store(c, 1, kt, vt, t0, m, p0).unwrap();
        let p = AttnParams {
            n_head,
            scale: 0.25,
            pos0: p0,
            kv_len: p0 + m,
            causal: true,
            window: Some(2),
            softcap: None,
        };
        step.attention(qt, c, 1, &p, t0, m, out).unwrap();
        t0 += m;
    }
    assert_eq!(step.held_kv_caches(), 2);
    assert!(matches!(caches[0].layer(1), Err(VulkanError::InUse(_))), "held by the recording");
    // Dropping a context's cache now frees nothing: the recording still names it.
    let [a, b] = caches;
    drop(b);
    assert_eq!(live.load(Ordering::Relaxed), 2);
    let mut got = vec![0.0; n * qd];
    step.read(out, &mut got).unwrap();
    assert_eq!(step.stats().submits - before.submits, 1, "one submission for the batch");
    assert_eq!(step.held_kv_caches(), 0);
    assert_eq!(live.load(Ordering::Relaxed), 1, "freed once the submission was waited for");
    assert_close("attention", &want, &got);
    assert!(a.layer(1).is_ok(), "released by the submission");
    drop(a);
    assert_eq!(live.load(Ordering::Relaxed), 0);

    // Bad arguments are errors, not panics: a query tensor also the output, positions of the
    // wrong length, rows beyond the tensors.
    let mut c = new_cache();
    step.begin().unwrap();
    let qt = step.upload(&q).unwrap();
    let out = step.tensor(n * qd).unwrap();
    let p = AttnParams {
        n_head,
        scale: 0.25,
        pos0: 0,
        kv_len: 1,
        causal: true,
        window: None,
        softcap: None,
    };
    assert!(step.attention(qt, &mut c, 0, &p, 0, 1, qt).is_err());
    assert!(step.attention(qt, &mut c, 0, &p, 4, 1, out).is_err());
    let short = step.upload_u32(&[0, 1]).unwrap();
    assert!(step.rope(&rope, qt, hd, short, n).is_err());
    assert!(step.copy(qt, 0, out, n * qd - 1, 2).is_err());
}

/// Rows gathered on the device land where asked.
#[test]
fn copy_gathers_rows() {
    let Some(ctx) = ctx() else { return };
    let mut step = Step::new(ctx, false).unwrap();
    let x0 = values(5 * D, 21);
    let x = step.upload(&x0).unwrap();
    let sel = step.tensor(2 * D).unwrap();
    step.copy(x, 4 * D, sel, 0, D).unwrap();
    step.copy(x, D, sel, D, D).unwrap();
    let mut got = vec![0.0; 2 * D];
    step.read(sel, &mut got).unwrap();
    assert_eq!(&got[..D], &x0[4 * D..]);
    assert_eq!(&got[D..], &x0[D..2 * D]);
}
