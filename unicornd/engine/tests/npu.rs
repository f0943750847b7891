//! The NPU operator path against the test double (`FakeDevice`, which checks every call like
//! the driver and COMPUTES NOTHING): a forward pass of the qwen3-tiny fixture with its products
//! placed on xdna. What these tests check is the host side: which products go to the NPU, the
//! fallback to the CPU when runs fail (the logits then equal the CPU pass exactly), retirement
//! of failing kernels, the weights' layout in their BOs, the command packets, the QoS of the
//! contexts and the teardown. No logit here was computed by an NPU; where runs "complete" on the
//! fake, their outputs are whatever the BO held and are never compared.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::fixture::Fixture;
use unicorn_engine::gguf::GgufFile;
use unicorn_engine::model::{
    Backend, Backends, KvType, Logits, Model, NpuOffer, OpClass, Placement, QosPriority, Seq,
};
use unicorn_kernels::{GgmlType, ThreadPool};
use unicorn_xdna::cmd::{self, CmdState, Packet};
use unicorn_xdna::device::Device;
use unicorn_xdna::fake::{FakeDevice, Outcome};
use unicorn_xdna::manifest::{DType, Kernel, Manifest, Op, Ready, Shape, WeightLayout};
use unicorn_xdna::runtime::{Runtime, RETIRE_AFTER};
use unicorn_xdna::sys;
use unicorn_xdna::xclbin::{build, Xclbin};

const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];
const N_EMBD: u32 = 64;
const N_FF: u32 = 192;
const N_VOCAB: u32 = 49152;

/// Whether `a` and `b` hold the same values, bit for bit, as far as both go.
fn bit_equal(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn kernel(name: &str, op: Op, m: u32, k: u32, n: u32, weights: WeightLayout) -> Ready {
    Ready {
        kernel: Kernel {
            name: name.into(),
            op,
            xclbin: format!("build/{name}.xclbin").into(),
            instructions: format!("build/{name}.insts.bin").into(),
            cu: "MLIR_AIE".into(),
            shape: Shape { m, k, n },
            dtype: DType::Bf16,
            weights,
            columns: 1,
            source: None,
            eps: None,
        },
        xclbin: Xclbin::parse(&build::npu_xclbin(&["MLIR_AIE"], 1, 256)).unwrap(),
        instructions: vec![0; 64],
    }
}

fn mv(name: &str, m: u32, k: u32) -> Ready {
    kernel(name, Op::Matvec, m, k, 1, WeightLayout::RowMajorBf16)
}

/// A kernel of every product shape of qwen3-tiny, plus a matmul for the feed-forward's gate and
/// up (4 tokens at a time).
fn all_kernels() -> Vec<Ready> {
    vec![
        mv("q", 128, N_EMBD),
        mv("kv", 64, N_EMBD),
        mv("wo", N_EMBD, 128),
        mv("up", N_FF, N_EMBD),
        mv("down", N_EMBD, N_FF),
        mv("out", N_VOCAB, N_EMBD),
        kernel("up_mm", Op::Matmul, N_FF, N_EMBD, 4, WeightLayout::RowMajorBf16),
    ]
}

/// An rms_norm kernel of rows of `k` values, `rows` rows per run, declaring `eps` (as the
/// manifest's entry for `iron_ops.py rms_norm`: f32 weight vector, bf16 rows).
fn norm_kernel(name: &str, k: u32, rows: u32, eps: f32) -> Ready {
    let mut r = kernel(name, Op::RmsNorm, rows, k, 1, WeightLayout::VectorF32);
    r.kernel.eps = Some(eps);
    r
}

/// qwen3-tiny's norm epsilon.
const EPS: f32 = 1e-6;
/// Its head dimension (the width of the Q and K norms).
const HEAD_DIM: u32 = 32;

struct Npu {
    fake: Arc<FakeDevice>,
    rt: Arc<Runtime>,
    backends: Backends,
}

fn npu(kernels: Vec<Ready>) -> Npu {
    npu_on(kernels, "attention=xdna,feed_forward=xdna,output=xdna")
}

/// The runtime of `kernels` on a fake device, with the classes of `placement` resolved against
/// its offer (all of them must be offered).
fn npu_on(kernels: Vec<Ready>, placement: &str) -> Npu {
    let fake = Arc::new(FakeDevice::new());
    let dev: Arc<dyn Device> = fake.clone();
    let m = Manifest { dir: "test".into(), ready: kernels, unusable: Vec::new() };
    let rt = Arc::new(Runtime::new(dev, &m, 4).unwrap());
    let offer = NpuOffer::for_runtime(Arc::clone(&rt));
    let placement: Placement = placement.parse().unwrap();
    let backends = Backends::resolve_with_npu(placement, &offer, || Err("no vulkan here".into()));
    assert_eq!(backends.placement(), placement, "{:?}", backends.fallbacks());
    Npu { fake, rt, backends }
}

fn gguf(file: &str) -> GgufFile {
    GgufFile::open(Fixture::open("qwen3-tiny").verified(file)).unwrap()
}

/// The prompt with every position's logits, then two decode steps: all logits, in order.
fn generate(model: &Model, qos: QosPriority) -> Vec<f32> {
    let pool = ThreadPool::new(2);
    let mut kv = model.new_state(16, KvType::F16).unwrap();
    let mut all = Vec::new();
    let mut logits = Vec::new();
    let mut seq = [Seq { kv: &mut kv, tokens: &PROMPT, logits: Logits::All }];
    model.forward_at(&pool, &mut seq, &mut logits, qos).unwrap();
    all.extend_from_slice(&logits);
    for t in [253u32, 655] {
        let mut seq = [Seq { kv: &mut kv, tokens: &[t], logits: Logits::Last }];
        model.forward_at(&pool, &mut seq, &mut logits, qos).unwrap();
        all.extend_from_slice(&logits);
    }
    all
}

fn cpu_logits(file: &str) -> Vec<f32> {
    let model = Model::load_with(gguf(file), Backends::cpu()).unwrap();
    generate(&model, QosPriority::Normal)
}

/// Every run fails (ERROR, TIMEOUT state, or a wait that runs out): the products come from the
/// CPU, the logits are the CPU pass's bit for bit, each kernel fails RETIRE_AFTER times and is
/// then out of use.
#[test]
fn failed_runs_fall_back_to_the_cpu_and_retire_their_kernels() {
    let want = cpu_logits("qwen3-tiny-f16.gguf");
    for outcome in [
        Outcome::Fail { state: CmdState::Error, chain_index: 0 },
        Outcome::Fail { state: CmdState::Timeout, chain_index: 0 },
        Outcome::Hang,
    ] {
        let n = npu(all_kernels());
        n.fake.set_default_outcome(Some(outcome));
        let model = Model::load_with(gguf("qwen3-tiny-f16.gguf"), n.backends.clone()).unwrap();
        let got = generate(&model, QosPriority::Normal);
        assert_eq!(got.len(), want.len());
        let same = bit_equal(&got, &want);
        assert!(same, "{outcome:?}: the logits differ from the cpu pass");
        let s = n.rt.stats();
        assert_eq!(s.runs, 0, "{outcome:?}");
        // Every kernel was tried until retired (the output kernel once per pass: 3 passes).
        let k = all_kernels().len();
        assert_eq!(s.retired, k, "{outcome:?}: retired {:?}", n.rt.retired());
        assert_eq!(s.fallbacks, u64::from(RETIRE_AFTER) * k as u64, "{outcome:?}");
        // The device saw the submissions that failed, and nothing after retirement.
        assert_eq!(n.fake.submissions().len(), RETIRE_AFTER as usize * k, "{outcome:?}");
        // Retired kernels gave their contexts back.
        assert!(n.fake.context_priorities().is_empty());
    }
}

/// A shape without a kernel (K and V, 64 x 64) runs on the CPU; every other product of the
/// pass is submitted to the NPU.
#[test]
fn a_missing_kernel_keeps_its_products_on_the_cpu_and_the_others_go_to_the_npu() {
    let kernels: Vec<Ready> = all_kernels().into_iter().filter(|r| r.kernel.name != "kv").collect();
    let n = npu(kernels);
    let model = Model::load_with(gguf("qwen3-tiny-f16.gguf"), n.backends.clone()).unwrap();
    let pool = ThreadPool::new(2);
    let mut kv = model.new_state(8, KvType::F16).unwrap();
    let mut logits = Vec::new();
    let mut seq = [Seq { kv: &mut kv, tokens: &PROMPT[..1], logits: Logits::Last }];
    model.forward(&pool, &mut seq, &mut logits).unwrap();
    assert_eq!(logits.len(), N_VOCAB as usize);
    // One token, 4 layers: q, wo, gate, up, down per layer, and the output product.
    let s = n.rt.stats();
    assert_eq!((s.runs, s.fallbacks, s.retired), (4 * 5 + 1, 0, 0));
    let subs = n.fake.submissions();
    assert_eq!(subs.len(), 21);
    let weight_sizes: BTreeSet<u64> = subs
        .iter()
        .map(|sub| {
            let Packet::StartNpu { run, .. } = &sub.packet else { panic!("{sub:?}") };
            let w = cmd::npu_arg_addrs(&run.args).unwrap()[0];
            n.fake.bo_at(w).unwrap().2
        })
        .collect();
    let bf16 = |m: u32, k: u32| u64::from(m * k * 2);
    assert_eq!(
        weight_sizes,
        [bf16(128, 64), bf16(64, 128), bf16(N_FF, 64), bf16(64, N_FF), bf16(N_VOCAB, 64)]
            .into_iter()
            .collect()
    );
    assert!(!weight_sizes.contains(&bf16(64, 64)), "K and V have no kernel");
}

fn bf16_bits(bytes: &[u8]) -> Vec<u16> {
    bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect()
}

/// An independent dequantization of a Q8_0 tensor (34-byte blocks: f16 scale, 32 int8 values).
fn q8_0_reference(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(34)
        .flat_map(|b| {
            let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            b[2..].iter().map(move |&q| f32::from(q as i8) * d)
        })
        .collect()
}

/// The weights in their BOs are the kernels' layouts of the file's tensors (row-major bf16;
/// int8 rows with f32 row scales), checked by decoding the BOs with references written here;
/// each packet names the instruction stream, the weight, input and output BOs in the design's
/// order with their sizes, and the EXEC_CMD passes exactly those BOs.
#[test]
fn weights_are_in_the_kernels_layouts_and_packets_name_the_right_buffers() {
    let n = npu(vec![
        mv("q", 128, N_EMBD),
        kernel("wo_i8", Op::Matvec, N_EMBD, 128, 1, WeightLayout::RowMajorI8RowScale),
    ]);
    let file = gguf("qwen3-tiny-q8_0.gguf");
    let q_ref = {
        let t = file.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!(t.ty, GgmlType::Q8_0);
        q8_0_reference(t.data)
    };
    let wo_ref = q8_0_reference(file.tensor("blk.0.attn_output.weight").unwrap().data);
    let model = Model::load_with(file, n.backends.clone()).unwrap();
    let pool = ThreadPool::new(2);
    let mut kv = model.new_state(8, KvType::F16).unwrap();
    let mut logits = Vec::new();
    let mut seq = [Seq { kv: &mut kv, tokens: &PROMPT[..1], logits: Logits::Last }];
    model.forward(&pool, &mut seq, &mut logits).unwrap();
    let subs = n.fake.submissions();
    // Layer 0's q product, then its wo product, are the first two runs.
    assert_eq!(subs.len(), 8);
    let mut seen_w = Vec::new();
    for (sub, (m, k, w_bytes)) in
        subs.iter().zip([(128u64, 64u64, 128 * 64 * 2), (64, 128, 64 * 128 + 64 * 4)])
    {
        let Packet::StartNpu { header, run, prop_count, .. } = &sub.packet else {
            panic!("{sub:?}")
        };
        assert_eq!(
            (header.opcode, header.state, *prop_count),
            (cmd::ERT_START_NPU, CmdState::New, 0)
        );
        assert_eq!(run.cu_mask, 1);
        let (instr, kind, size) = n.fake.bo_at(run.instr_addr).unwrap();
        assert_eq!((kind, size, run.instr_size), (sys::BO_DEV, 64, 64));
        let addrs = cmd::npu_arg_addrs(&run.args).unwrap();
        assert_eq!(&addrs[3..], &[0, 0]);
        let bo = |a: u64| n.fake.bo_at(a).unwrap();
        let (w, x, y) = (bo(addrs[0]), bo(addrs[1]), bo(addrs[2]));
        assert_eq!((w.1, x.1, y.1), (sys::BO_SHMEM, sys::BO_SHMEM, sys::BO_SHMEM));
        assert_eq!((w.2, x.2, y.2), (w_bytes, k * 2, m * 2), "W, x, y sizes of a {m} x {k}");
        assert_eq!(sub.args, vec![instr, w.0, x.0, y.0]);
        seen_w.push(n.fake.bo_bytes(w.0).unwrap());
    }
    // Row-major bf16, rounded to nearest even from the dequantized values.
    let want: Vec<u16> = q_ref.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
    assert_eq!(bf16_bits(&seen_w[0]), want);
    // int8 rows, then one f32 scale per row: q * s is within half a step of the weight, and s
    // is the row's largest magnitude over 127.
    let (q, scales) = seen_w[1].split_at(64 * 128);
    for (r, (row, s)) in wo_ref.chunks_exact(128).zip(scales.chunks_exact(4)).enumerate() {
        let s = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        let amax = row.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        assert!((s - amax / 127.0).abs() <= amax * 1e-6, "row {r}: scale {s}, max {amax}");
        for (c, &w) in row.iter().enumerate() {
            let v = f32::from(q[r * 128 + c] as i8) * s;
            assert!((v - w).abs() <= s * 0.5 + amax * 1e-6, "row {r} col {c}: {v} vs {w}");
        }
    }
}

/// The batch's priority is the QoS of the contexts its kernels run in; a context the driver
/// refuses (its limit) makes the run share an existing context instead of failing.
#[test]
fn contexts_carry_the_batchs_qos() {
    let n = npu(vec![mv("up", N_FF, N_EMBD), mv("down", N_EMBD, N_FF)]);
    let model = Model::load_with(gguf("qwen3-tiny-f16.gguf"), n.backends.clone()).unwrap();
    let pool = ThreadPool::new(2);
    let mut kv = model.new_state(8, KvType::F16).unwrap();
    let mut logits = Vec::new();
    let mut step = |t: u32, qos| {
        let mut seq = [Seq { kv: &mut kv, tokens: &[t], logits: Logits::Last }];
        model.forward_at(&pool, &mut seq, &mut logits, qos).unwrap();
    };
    step(504, QosPriority::Realtime);
    let prios =
        |f: &FakeDevice| f.context_priorities().into_iter().map(|(_, p)| p).collect::<Vec<_>>();
    assert_eq!(prios(&n.fake), [sys::QOS_REALTIME_PRIORITY; 2]);
    step(3575, QosPriority::Low);
    let mut p = prios(&n.fake);
    p.sort();
    assert_eq!(p, [0x100, 0x100, 0x280, 0x280]);
    // The driver refuses more contexts: a new priority shares one, runs still complete.
    n.fake.refuse_contexts(Some(libc::EBUSY));
    let runs = n.rt.stats().runs;
    step(282, QosPriority::High);
    assert_eq!(prios(&n.fake).len(), 4);
    // One token, 4 layers: gate, up and down.
    assert_eq!(n.rt.stats().runs, runs + 12);
    assert_eq!(n.rt.stats().fallbacks, 0);
    let ctxs = n.rt.contexts();
    assert_eq!(ctxs["up"], [QosPriority::Realtime, QosPriority::Low]);
}

/// Dropping the model closes its weight, I/O and command BOs; dropping the runtime's last
/// owner destroys the contexts and closes the rest, heap last: nothing leaks.
#[test]
fn dropping_the_model_and_the_runtime_leaks_nothing() {
    let six: Vec<Ready> = all_kernels().into_iter().filter(|r| r.kernel.name != "up_mm").collect();
    let Npu { fake, rt, backends } = npu(six);
    assert_eq!(fake.live(), (1, 0), "the heap only");
    let model = Model::load_with(gguf("qwen3-tiny-f16.gguf"), backends.clone()).unwrap();
    generate(&model, QosPriority::High);
    let (bos, ctxs) = fake.live();
    assert_eq!(ctxs, 6, "each kernel in one context");
    assert!(bos > 1 + 2 * 6, "{bos}");
    drop(model);
    // Left: the heap, and per kernel its PDI and instruction stream.
    assert_eq!(fake.live(), (1 + 2 * 6, 6));
    assert!(fake.context_priorities().iter().all(|&(_, p)| p == sys::QOS_HIGH_PRIORITY));
    drop((rt, backends));
    assert_eq!(fake.live(), (0, 0), "{:?}", fake.calls().iter().rev().take(5).collect::<Vec<_>>());
    let calls = fake.calls();
    let last_destroy = calls.iter().rposition(|c| c.starts_with("DESTROY_HWCTX")).unwrap();
    let heap_close = calls.iter().rposition(|c| c == "GEM_CLOSE(1)").unwrap();
    assert!(last_destroy < heap_close, "contexts go before the heap");
}

/// Seven kernels on a device of six contexts: the least recently used kernel gives its context
/// back and loads again later; no run falls back. The prompt's gate and up run as 4-token
/// matmuls (two runs for 5 tokens), everything else as one matvec per token.
#[test]
fn more_kernels_than_contexts_take_turns() {
    let n = npu(all_kernels());
    let model = Model::load_with(gguf("qwen3-tiny-f16.gguf"), n.backends.clone()).unwrap();
    generate(&model, QosPriority::Normal);
    let s = n.rt.stats();
    // Prompt: per layer q 5, k 5, v 5, wo 5, gate 2, up 2, down 5; then 5 output rows.
    // Each decode: 7 per layer and 1 output row.
    assert_eq!((s.runs, s.fallbacks, s.retired), (4 * 29 + 5 + 2 * (4 * 7 + 1), 0, 0));
    assert_eq!(n.fake.live().1, 6);
    let loads = n.fake.calls().iter().filter(|c| c.starts_with("CREATE_HWCTX")).count();
    assert!(loads > 7, "{loads} contexts made: the evicted kernel loaded again");
}

/// The hardware test's per-kernel check, on the test double: it runs (the packet and buffers
/// pass the fake's checks) but nothing is computed, so the output is all zeros and the error
/// is the whole reference: the check can never pass without an NPU doing the product or norm.
#[test]
fn the_kernel_check_never_passes_on_the_test_double() {
    let n = npu(vec![
        mv("q", 128, N_EMBD),
        kernel("wo_i8", Op::Matvec, N_EMBD, 128, 1, WeightLayout::RowMajorI8RowScale),
        kernel("up_mm", Op::Matmul, N_FF, N_EMBD, 4, WeightLayout::RowMajorBf16),
        norm_kernel("norm", N_EMBD, 4, EPS),
    ]);
    for i in 0..4 {
        let c = unicorn_engine::model::check_kernel(&n.rt, i, 2, 7).unwrap();
        assert!(c.max_abs_ref > 0.1, "{c:?}");
        assert_eq!(c.max_abs_err, c.max_abs_ref, "{c:?}");
    }
    assert_eq!(n.rt.stats().runs, 8);
}

/// Products on the NPU beside products on Vulkan (lavapipe here): with every NPU run failing,
/// the pass equals the same placement with those classes on the CPU, bit for bit, so the
/// activations move correctly between the Vulkan device, the host and the NPU path.
#[test]
fn npu_classes_beside_vulkan_classes_move_activations_correctly() {
    let Some(reference) = common::vulkan_backends("output=vulkan".parse().unwrap()) else {
        return;
    };
    let want = {
        let model = Model::load_with(gguf("qwen3-tiny-f16.gguf"), reference).unwrap();
        generate(&model, QosPriority::Normal)
    };
    let fake = Arc::new(FakeDevice::new());
    fake.set_default_outcome(Some(Outcome::Fail { state: CmdState::Error, chain_index: 0 }));
    let m = Manifest { dir: "test".into(), ready: all_kernels(), unusable: Vec::new() };
    let rt = Arc::new(Runtime::new(fake.clone(), &m, 4).unwrap());
    let placement: Placement = "attention=xdna,feed_forward=xdna,output=vulkan".parse().unwrap();
    let backends =
        Backends::resolve_with_npu(placement, &NpuOffer::for_runtime(rt.clone()), || {
            unicorn_engine::model::shared_vulkan_context(true).map_err(|e| e.to_string())
        });
    assert_eq!(backends.placement(), placement, "{:?}", backends.fallbacks());
    let model = Model::load_with(gguf("qwen3-tiny-f16.gguf"), backends).unwrap();
    let got = generate(&model, QosPriority::Normal);
    assert_eq!(got.len(), want.len());
    assert!(bit_equal(&got, &want));
    assert!(rt.stats().fallbacks > 0);
}

const ALL_ON_NPU: &str = "attention=xdna,feed_forward=xdna,output=xdna,norms=xdna";

/// Norms placed on xdna beside the products, every run failing: the norms come from the CPU
/// too, the logits are the CPU pass's bit for bit, and both rms_norm kernels (widths n_embd and
/// head_dim) are retired after RETIRE_AFTER failures each, like the product kernels.
#[test]
fn failed_norm_runs_fall_back_to_the_cpu_and_retire_their_kernels() {
    let want = cpu_logits("qwen3-tiny-f16.gguf");
    for outcome in [Outcome::Fail { state: CmdState::Error, chain_index: 0 }, Outcome::Hang] {
        let mut kernels = all_kernels();
        kernels.push(norm_kernel("norm", N_EMBD, 4, EPS));
        kernels.push(norm_kernel("qk_norm", HEAD_DIM, 8, EPS));
        let k = kernels.len();
        let n = npu_on(kernels, ALL_ON_NPU);
        n.fake.set_default_outcome(Some(outcome));
        let model = Model::load_with(gguf("qwen3-tiny-f16.gguf"), n.backends.clone()).unwrap();
        let got = generate(&model, QosPriority::Normal);
        assert_eq!(got.len(), want.len());
        let same = bit_equal(&got, &want);
        assert!(same, "{outcome:?}: the logits differ from the cpu pass");
        let s = n.rt.stats();
        assert_eq!(s.runs, 0, "{outcome:?}");
        let retired = n.rt.retired();
        assert!(retired.contains(&"norm".to_owned()), "{retired:?}");
        assert!(retired.contains(&"qk_norm".to_owned()), "{retired:?}");
        assert_eq!(s.retired, k, "{outcome:?}: retired {retired:?}");
        assert_eq!(s.fallbacks, u64::from(RETIRE_AFTER) * k as u64, "{outcome:?}");
        assert_eq!(n.fake.submissions().len(), RETIRE_AFTER as usize * k, "{outcome:?}");
    }
}

/// Norms alone on xdna, with only an n_embd-wide kernel (4 rows per run): the attention,
/// feed-forward and output norms go to the NPU, each in runs of up to 4 rows (the last padded
/// with zero rows); each packet names the input, weight and output BOs in the design's order
/// `(x, w, y)` with their sizes; each weight BO holds the model's norm weights as the kernel's
/// f32 vector, checked against the file's tensors decoded here; the head-wide Q/K norms, which
/// have no kernel, stay on the CPU.
#[test]
fn norm_weights_are_f32_vectors_and_packets_name_x_w_y() {
    let n = npu_on(vec![norm_kernel("norm", N_EMBD, 4, EPS)], "norms=xdna");
    let file = gguf("qwen3-tiny-f16.gguf");
    let vector = |name: &str| -> Vec<f32> {
        let t = file.tensor(name).unwrap();
        match t.ty {
            GgmlType::F32 => t
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            GgmlType::F16 => t
                .data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            ty => panic!("{name}: {ty:?}"),
        }
    };
    // The norms of one layer in pass order, then the output norm.
    let layer =
        |l: usize| [format!("blk.{l}.attn_norm.weight"), format!("blk.{l}.ffn_norm.weight")];
    let mut order: Vec<String> = (0..4).flat_map(layer).collect();
    order.push("output_norm.weight".into());
    let refs: Vec<Vec<f32>> = order.iter().map(|t| vector(t)).collect();
    let model = Model::load_with(file, n.backends.clone()).unwrap();
    let pool = ThreadPool::new(2);
    let mut kv = model.new_state(8, KvType::F16).unwrap();
    let mut logits = Vec::new();
    let mut seq = [Seq { kv: &mut kv, tokens: &PROMPT, logits: Logits::Last }];
    model.forward(&pool, &mut seq, &mut logits).unwrap();
    // 5 tokens: two runs (4 + 1 rows) per layer norm, one for the last row's output norm.
    let s = n.rt.stats();
    assert_eq!((s.runs, s.fallbacks, s.retired), (4 * 2 * 2 + 1, 0, 0));
    let subs = n.fake.submissions();
    assert_eq!(subs.len(), 17);
    let row_bytes = u64::from(N_EMBD) * 2;
    let mut weights = Vec::new();
    for sub in &subs {
        let Packet::StartNpu { header, run, .. } = &sub.packet else { panic!("{sub:?}") };
        assert_eq!(header.opcode, cmd::ERT_START_NPU);
        let (instr, kind, _) = n.fake.bo_at(run.instr_addr).unwrap();
        assert_eq!(kind, sys::BO_DEV);
        let addrs = cmd::npu_arg_addrs(&run.args).unwrap();
        assert_eq!(&addrs[3..], &[0, 0]);
        let bo = |a: u64| n.fake.bo_at(a).unwrap();
        let (x, w, y) = (bo(addrs[0]), bo(addrs[1]), bo(addrs[2]));
        assert_eq!((x.1, w.1, y.1), (sys::BO_SHMEM, sys::BO_SHMEM, sys::BO_SHMEM));
        assert_eq!((x.2, w.2, y.2), (4 * row_bytes, u64::from(N_EMBD) * 4, 4 * row_bytes));
        assert_eq!(sub.args, vec![instr, x.0, w.0, y.0]);
        let wb = n.fake.bo_bytes(w.0).unwrap();
        weights.push(
            wb.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<f32>>(),
        );
    }
    // Two runs per layer norm name the same weight BO; the output norm's once.
    let per_run: Vec<&Vec<f32>> =
        refs[..8].iter().flat_map(|r| [r, r]).chain(std::iter::once(&refs[8])).collect();
    for (i, (got, want)) in weights.iter().zip(&per_run).enumerate() {
        let same = bit_equal(got, want);
        assert!(
            same && got.len() == want.len(),
            "run {i}: weight BO is not {}",
            order[i.min(16) / 2]
        );
    }
    // The last run (the output norm of one row) padded its input with 3 zero rows.
    let Packet::StartNpu { run, .. } = &subs[16].packet else { unreachable!() };
    let x = n.fake.bo_at(cmd::npu_arg_addrs(&run.args).unwrap()[0]).unwrap();
    let xb = n.fake.bo_bytes(x.0).unwrap();
    assert!(xb[..row_bytes as usize].iter().any(|&b| b != 0), "the row itself is there");
    assert!(xb[row_bytes as usize..].iter().all(|&b| b == 0), "padding rows are zero");
}

/// An rms_norm kernel of the right widths whose baked-in epsilon (1e-5, as aie/ops.cc's) is
/// not the model's (1e-6): norms are offered (the offer does not know the model) but never
/// submitted; the pass is the CPU's bit for bit and nothing counts as a fallback.
#[test]
fn a_norm_kernel_of_another_eps_is_never_used() {
    let want = cpu_logits("qwen3-tiny-f16.gguf");
    let n = npu_on(
        vec![norm_kernel("norm", N_EMBD, 4, 1e-5), norm_kernel("qk_norm", HEAD_DIM, 8, 1e-5)],
        "norms=xdna",
    );
    let model = Model::load_with(gguf("qwen3-tiny-f16.gguf"), n.backends.clone()).unwrap();
    let got = generate(&model, QosPriority::Normal);
    assert!(bit_equal(&got, &want));
    assert_eq!(n.rt.stats(), Default::default());
    assert!(n.fake.submissions().is_empty());
}

/// A manifest without an rms_norm kernel the engine drives (none, or one that declares no
/// eps) does not offer norms: norms=xdna falls back (here to the CPU, no Vulkan) with the
/// reason, while the products stay on the NPU.
#[test]
fn without_an_rms_norm_kernel_norms_are_not_offered() {
    let mut no_eps = norm_kernel("norm", N_EMBD, 4, EPS);
    no_eps.kernel.eps = None;
    for kernels in [all_kernels(), [all_kernels(), vec![no_eps]].concat()] {
        let fake = Arc::new(FakeDevice::new());
        let m = Manifest { dir: "test".into(), ready: kernels, unusable: Vec::new() };
        let rt = Arc::new(Runtime::new(fake.clone(), &m, 4).unwrap());
        let offer = NpuOffer::for_runtime(rt);
        assert!(!offer.covers(OpClass::Norms), "{}", offer.reason());
        assert!(offer.covers(OpClass::FeedForward));
        let placement: Placement = ALL_ON_NPU.parse().unwrap();
        let b = Backends::resolve_with_npu(placement, &offer, || Err("no vulkan here".into()));
        assert_eq!(b.placement().get(OpClass::Norms), Backend::Cpu);
        assert_eq!(b.placement().get(OpClass::FeedForward), Backend::Xdna);
        let f = b.fallbacks().join(" | ");
        assert!(f.contains("xdna cannot run norms"), "{f}");
        assert!(f.contains("no rms_norm kernel the engine runs is ready"), "{f}");
    }
}
