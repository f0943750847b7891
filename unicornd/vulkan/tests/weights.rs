//! Weights in device-local memory: the memory-type choice on synthetic memory-property tables,
//! and weights uploaded through the staging path (forced, in many small chunks) giving exactly
//! what the directly mapped path gives.
//!
//! Like tests/ops.rs the device tests fail rather than skip where lavapipe's ICD is installed.

mod common;

use unicorn_kernels::GgmlType;
use unicorn_vulkan::{
    choose_weight_memory, Context, DeviceType, MemoryType, Options, OutRows, Step, WeightMemory,
};

use common::{q8_matrix, values};

const DL: MemoryType = MemoryType { device_local: true, host_visible: false, host_coherent: false };
const HOST: MemoryType =
    MemoryType { device_local: false, host_visible: true, host_coherent: true };
const UNIFIED: MemoryType =
    MemoryType { device_local: true, host_visible: true, host_coherent: true };
const NONE: MemoryType =
    MemoryType { device_local: false, host_visible: false, host_coherent: false };

fn mapped(type_index: u32) -> Option<WeightMemory> {
    Some(WeightMemory::Mapped { type_index })
}

fn staged(type_index: u32) -> Option<WeightMemory> {
    Some(WeightMemory::Staged { type_index })
}

#[test]
fn lavapipe_and_integrated_gpus_map_device_local_memory() {
    // lavapipe: one type, device-local and host-visible.
    let lvp = [UNIFIED];
    assert_eq!(choose_weight_memory(&lvp, 1, DeviceType::Cpu, false), mapped(0));
    assert_eq!(choose_weight_memory(&lvp, 1, DeviceType::Cpu, true), staged(0));
    // An integrated GPU listing a device-local-only type first: the mappable one, unless forced.
    let igpu = [DL, UNIFIED, HOST];
    assert_eq!(choose_weight_memory(&igpu, 0b111, DeviceType::IntegratedGpu, false), mapped(1));
    assert_eq!(choose_weight_memory(&igpu, 0b111, DeviceType::IntegratedGpu, true), staged(0));
    // Only types the buffer accepts count.
    assert_eq!(choose_weight_memory(&igpu, 0b101, DeviceType::IntegratedGpu, false), staged(0));
    assert_eq!(choose_weight_memory(&igpu, 0b100, DeviceType::IntegratedGpu, false), mapped(2));
    // Device-local, host-visible but not coherent is not mapped (buffers are never flushed).
    let incoherent = MemoryType { host_coherent: false, ..UNIFIED };
    let t = [incoherent, HOST];
    assert_eq!(choose_weight_memory(&t, 0b11, DeviceType::IntegratedGpu, false), staged(0));
}

#[test]
fn discrete_gpus_stage_into_device_local_memory() {
    // Like an NVIDIA card with resizable BAR: a type with no flags, device-local, two host
    // types, and the BAR window (device-local and host-visible).
    let nv = [NONE, DL, HOST, HOST, UNIFIED];
    for ty in [DeviceType::DiscreteGpu, DeviceType::VirtualGpu, DeviceType::Other] {
        assert_eq!(choose_weight_memory(&nv, 0b11111, ty, false), staged(1), "{ty}");
        assert_eq!(choose_weight_memory(&nv, 0b11111, ty, true), staged(1), "{ty}");
    }
    // The device-local-only type excluded: any device-local type, still staged.
    assert_eq!(choose_weight_memory(&nv, 0b11101, DeviceType::DiscreteGpu, false), staged(4));
    // No device-local type accepted: host-visible memory, as every other buffer.
    assert_eq!(choose_weight_memory(&nv, 0b01100, DeviceType::DiscreteGpu, false), mapped(2));
    // Forced staging stages even into a host type rather than mapping.
    assert_eq!(choose_weight_memory(&nv, 0b01100, DeviceType::DiscreteGpu, true), staged(2));
}

#[test]
fn no_usable_type_is_none() {
    assert_eq!(choose_weight_memory(&[UNIFIED, DL], 0, DeviceType::DiscreteGpu, false), None);
    assert_eq!(choose_weight_memory(&[NONE], 1, DeviceType::DiscreteGpu, false), None);
    assert_eq!(choose_weight_memory(&[], u32::MAX, DeviceType::Cpu, false), None);
    // Bits past the table are ignored.
    assert_eq!(choose_weight_memory(&[NONE], 0b10, DeviceType::Cpu, true), None);
}

fn open(options: Options) -> Option<Context> {
    match Context::new(Options { allow_cpu: true, ..options }) {
        Ok(c) => Some(c),
        Err(e) => {
            assert!(!unicorn_vulkan::device_required(), "no Vulkan device: {e}");
            eprintln!("SKIPPED: no Vulkan device ({e})");
            None
        }
    }
}

/// Products with a 96 x 256 Q8_0 matrix (26112 bytes), a 3 x 32 one (102 bytes, not a whole
/// number of words) and an f32 one, and an RMSNorm with an uploaded weight, on `ctx`.
fn run(ctx: &Context) -> (Vec<Vec<f32>>, usize) {
    let mut step = Step::new(ctx, false).unwrap();
    let mut out_all = Vec::new();
    let cases: [(GgmlType, usize, usize, Vec<u8>); 3] = [
        (GgmlType::Q8_0, 96, 256, q8_matrix(96, 256, 1)),
        (GgmlType::Q8_0, 3, 32, q8_matrix(3, 32, 2)),
        (GgmlType::F32, 40, 64, values(40 * 64, 3).iter().flat_map(|v| v.to_ne_bytes()).collect()),
    ];
    for (ty, rows, cols, bytes) in &cases {
        let w = step.weight(bytes).unwrap();
        let n_tokens = 3;
        let x = step.upload(&values(n_tokens * cols, 7)).unwrap();
        let out = step.tensor(n_tokens * rows).unwrap();
        step.matmul(*ty, w, *rows, *cols, x, n_tokens, out, OutRows { first: 0, of: *rows })
            .unwrap();
        let mut got = vec![0.0; n_tokens * rows];
        step.read(out, &mut got).unwrap();
        out_all.push(got);
    }
    let norm = step.weight_f32(&values(64, 9)).unwrap();
    let x = step.upload(&values(128, 11)).unwrap();
    let out = step.tensor(128).unwrap();
    step.rms_norm(x, 64, Some(norm), 1e-6, out).unwrap();
    let mut got = vec![0.0; 128];
    step.read(out, &mut got).unwrap();
    out_all.push(got);
    (out_all, step.staged_weights())
}

#[test]
fn staged_weights_in_small_chunks_match_mapped_ones() {
    let Some(direct) = open(Options::default()) else { return };
    let (want, staged_direct) = run(&direct);
    let unified = matches!(direct.info().device_type, DeviceType::Cpu | DeviceType::IntegratedGpu);
    if unified {
        assert_eq!(staged_direct, 0, "unified memory is mapped unless staging is forced");
    }
    drop(direct);
    // 1000 bytes: 27 chunks for the large matrix (the last 112 bytes), one partial for the small.
    for chunk in [1000, 4, 1 << 20] {
        let opts =
            Options { force_staging: true, staging_chunk: Some(chunk), ..Options::default() };
        let Some(ctx) = open(opts) else { return };
        let (got, staged) = run(&ctx);
        assert_eq!(staged, 4, "every weight staged (chunk {chunk})");
        for (i, (a, b)) in want.iter().zip(&got).enumerate() {
            let same =
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "case {i}, chunk {chunk}: staged {b:?} vs mapped {a:?}");
        }
    }
}
