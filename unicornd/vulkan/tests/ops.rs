//! The Vulkan operations against the CPU kernels (unicorn_kernels) on whatever device Vulkan
//! offers, CPU devices allowed: in CI that is Mesa's lavapipe.
//!
//! These tests do not skip silently: when lavapipe's ICD file is installed (or
//! `UNICORN_VULKAN_REQUIRE=1`) and no device can be opened, they fail. Only on a machine without
//! lavapipe do they skip, saying so on stderr (run scripts/install-deps to install it).
//!
//! Tolerances: a matrix-vector output may differ from the f64 reference dot product of the
//! dequantized weights by 1e-4 of sum|w*x| over the row (f32 accumulation in a different order,
//! and `q * d + m` possibly fused). RMSNorm, SwiGLU, add and mul: see each test.

use std::sync::OnceLock;

use unicorn_kernels::attention::{attention, AttnParams, KvCache, KvData, KvDataMut};
use unicorn_kernels::formats::{dequantize_row, quantize_row};
use unicorn_kernels::ops::{Rope, RopeMode};
use unicorn_kernels::{f16, ops, GgmlType, ThreadPool};
use unicorn_vulkan::{
    Buffer, Context, DeviceType, KvCache as DevKv, KvElem, KvShape, Options, VulkanError,
    MAX_HEAD_DIM,
};

const MATVEC_TOL: f64 = 1e-4;

/// The shared context, or `None` (after saying so) where no Vulkan device can exist.
fn ctx() -> Option<&'static Context> {
    static CTX: OnceLock<Option<Context>> = OnceLock::new();
    CTX.get_or_init(|| open(Options { allow_cpu: true, ..Options::default() })).as_ref()
}

/// A second context whose reductions never use subgroup operations.
fn ctx_without_subgroups() -> Option<&'static Context> {
    static CTX: OnceLock<Option<Context>> = OnceLock::new();
    CTX.get_or_init(|| {
        open(Options { allow_cpu: true, no_subgroup_ops: true, ..Options::default() })
    })
    .as_ref()
}

fn open(options: Options) -> Option<Context> {
    match Context::new(options) {
        Ok(c) => {
            let i = c.info();
            eprintln!(
                "vulkan device: {} ({}), subgroup size {}, arithmetic {}, workgroup {}, \
                 maxStorageBufferRange {}",
                i.name,
                i.device_type,
                i.subgroup_size,
                i.subgroup_arithmetic,
                i.workgroup_size,
                i.max_storage_buffer_range
            );
            Some(c)
        }
        Err(e) => {
            assert!(
                !unicorn_vulkan::device_required(),
                "the lavapipe ICD is installed (or UNICORN_VULKAN_REQUIRE=1) but no Vulkan \
                 device could be opened: {e}"
            );
            eprintln!("SKIPPED: no Vulkan device ({e}); scripts/install-deps installs lavapipe");
            None
        }
    }
}

/// SplitMix64: deterministic test data without a dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
}

/// Quantized weights and their dequantized values.
fn weights(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> (Vec<u8>, Vec<f32>) {
    let rb = ty.row_bytes(cols as u64).unwrap() as usize;
    let mut bytes = vec![0u8; rb * rows];
    let mut deq = vec![0f32; rows * cols];
    for r in 0..rows {
        // Rows of different magnitudes, so the scales vary.
        let scale = 0.05 + (r % 7) as f32 * 0.3;
        let w = rng.vec(cols, scale);
        quantize_row(ty, &w, &mut bytes[r * rb..(r + 1) * rb]).unwrap();
        dequantize_row(ty, &bytes[r * rb..(r + 1) * rb], &mut deq[r * cols..(r + 1) * cols])
            .unwrap();
    }
    (bytes, deq)
}

/// Runs one matmul and returns the largest error relative to sum|w*x| of its row.
fn check_matmul(ctx: &Context, ty: GgmlType, rows: usize, cols: usize, n: usize, seed: u64) -> f64 {
    let mut rng = Rng(seed);
    let (bytes, deq) = weights(ty, rows, cols, &mut rng);
    let x = rng.vec(n * cols, 2.0);
    check_matmul_bytes(ctx, ty, &bytes, &deq, rows, cols, &x, n)
}

/// [`check_matmul`] for given weight bytes, their dequantized values and activations.
#[allow(clippy::too_many_arguments)]
fn check_matmul_bytes(
    ctx: &Context,
    ty: GgmlType,
    bytes: &[u8],
    deq: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
) -> f64 {
    let w = Buffer::from_bytes(ctx, bytes).unwrap();
    let got = ctx.matmul(ty, &w, rows, cols, x, n).unwrap();
    assert_eq!(got.len(), n * rows);
    let mut worst = 0f64;
    for t in 0..n {
        let xt = &x[t * cols..(t + 1) * cols];
        for r in 0..rows {
            let wr = &deq[r * cols..(r + 1) * cols];
            let exact: f64 = wr.iter().zip(xt).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            let mag: f64 =
                wr.iter().zip(xt).map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs()).sum();
            let err = (f64::from(got[t * rows + r]) - exact).abs() / mag.max(1e-30);
            assert!(
                err <= MATVEC_TOL,
                "{} {rows}x{cols} token {t} row {r}: got {}, want {exact} (rel err {err:e})",
                ty.name(),
                got[t * rows + r]
            );
            worst = worst.max(err);
        }
    }
    worst
}

const QUANTS: [GgmlType; 5] =
    [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0];

/// The k-quants: 256-weight super-blocks, so `cols` is a multiple of 256.
const KQUANTS: [GgmlType; 5] =
    [GgmlType::Q2K, GgmlType::Q3K, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K];

/// `nb` super-blocks of `ty` of random bytes, as kernels/src/kdot.rs's `raw_row`, so every scale,
/// minimum and quant bit pattern occurs; only the f16 super-block scales are kept finite (|d| < 1).
fn raw_k_row(ty: GgmlType, nb: usize, rng: &mut Rng) -> Vec<u8> {
    let mut b: Vec<u8> = (0..nb * ty.type_size()).map(|_| (rng.next_u64() >> 56) as u8).collect();
    let d_at: &[usize] = match ty {
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q6K => &[208],
        _ => unreachable!("not a k-quant: {ty:?}"),
    };
    for blk in b.chunks_mut(ty.type_size()) {
        for &o in d_at {
            blk[o + 1] &= 0x3b; // exponent below 15: |d| < 1
        }
    }
    b
}

#[test]
fn matvec_matches_the_cpu_reference_for_every_k_quant() {
    let Some(ctx) = ctx() else { return };
    for ty in KQUANTS {
        let mut worst = 0f64;
        for blocks in 1..=3 {
            for rows in [1, 3, 17, 65] {
                let seed = (ty.id() as u64) << 32 | (blocks * 1000 + rows) as u64;
                worst = worst.max(check_matmul(ctx, ty, rows, blocks * 256, 1, seed));
            }
        }
        worst = worst.max(check_matmul(ctx, ty, 19, 4096, 2, 77 + ty.id() as u64));
        eprintln!("{}: largest relative error {worst:e}", ty.name());
    }
}

/// Random bytes instead of quantizer output: every scale/min bit pattern, including the
/// sub-blocks 4..7 of Q4_K/Q5_K whose top bits live in other bytes, and negative Q6_K scales.
#[test]
fn matvec_k_quants_on_raw_random_blocks() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng(2024);
    for ty in KQUANTS {
        let (rows, nb) = (24, 4);
        let cols = nb * 256;
        let mut bytes = Vec::new();
        let mut deq = vec![0f32; rows * cols];
        for r in 0..rows {
            let row = raw_k_row(ty, nb, &mut rng);
            dequantize_row(ty, &row, &mut deq[r * cols..(r + 1) * cols]).unwrap();
            bytes.extend_from_slice(&row);
        }
        let x = rng.vec(2 * cols, 2.0);
        let worst = check_matmul_bytes(ctx, ty, &bytes, &deq, rows, cols, &x, 2);
        eprintln!("{} raw blocks: largest relative error {worst:e}", ty.name());
    }
}

#[test]
fn matvec_matches_the_cpu_reference_for_every_block_format() {
    let Some(ctx) = ctx() else { return };
    for ty in QUANTS {
        let mut worst = 0f64;
        for blocks in 1..=8 {
            for rows in [1, 3, 17, 65, 130] {
                let seed = (ty.id() as u64) << 32 | (blocks * 1000 + rows) as u64;
                worst = worst.max(check_matmul(ctx, ty, rows, blocks * 32, 1, seed));
            }
        }
        eprintln!("{}: largest relative error {worst:e}", ty.name());
    }
}

#[test]
fn matvec_long_rows() {
    let Some(ctx) = ctx() else { return };
    for ty in QUANTS {
        let worst = check_matmul(ctx, ty, 67, 4096, 1, 7 + ty.id() as u64);
        eprintln!("{} 67x4096: largest relative error {worst:e}", ty.name());
    }
}

/// More rows than one grid dimension holds: the rows spill into the grid's second dimension.
#[test]
fn matvec_rows_beyond_the_workgroup_count_limit() {
    let Some(ctx) = ctx() else { return };
    let max_x = ctx.info().max_workgroup_count[0] as usize;
    if max_x > 1 << 20 {
        eprintln!("maxComputeWorkGroupCount[0] is {max_x}: too many rows to test here");
        return;
    }
    let worst = check_matmul(ctx, GgmlType::Q8_0, max_x + 3, 32, 1, 3);
    eprintln!("Q8_0 {}x32: largest relative error {worst:e}", max_x + 3);
}

#[test]
fn matmul_several_tokens() {
    let Some(ctx) = ctx() else { return };
    for ty in QUANTS.into_iter().chain([GgmlType::F16, GgmlType::BF16, GgmlType::F32]) {
        let worst = check_matmul(ctx, ty, 33, 96, 3, 99 + ty.id() as u64);
        eprintln!("{} 33x96 x3 tokens: largest relative error {worst:e}", ty.name());
    }
}

#[test]
fn matvec_float_weights_any_width() {
    let Some(ctx) = ctx() else { return };
    for ty in [GgmlType::F16, GgmlType::BF16, GgmlType::F32] {
        let mut worst = 0f64;
        for cols in [1, 7, 32, 33, 100, 1000] {
            for rows in [1, 5, 66] {
                worst = worst.max(check_matmul(ctx, ty, rows, cols, 1, (cols * 31 + rows) as u64));
            }
        }
        eprintln!("{}: largest relative error {worst:e}", ty.name());
    }
}

#[test]
fn matvec_rejects_bad_arguments() {
    let Some(ctx) = ctx() else { return };
    let w = Buffer::from_bytes(ctx, &[0u8; 18]).unwrap();
    let x = [0f32; 32];
    assert!(matches!(
        ctx.matvec(GgmlType::Q8K, &w, 1, 32, &x),
        Err(VulkanError::UnsupportedType(GgmlType::Q8K))
    ));
    // 32 columns is not a whole Q4_K super-block.
    assert!(matches!(ctx.matvec(GgmlType::Q4K, &w, 1, 32, &x), Err(VulkanError::Shape(_))));
    // 31 columns is not whole Q4_0 blocks.
    assert!(matches!(ctx.matvec(GgmlType::Q4_0, &w, 1, 31, &x[..31]), Err(VulkanError::Shape(_))));
    // Two rows do not fit an 18-byte buffer.
    assert!(matches!(ctx.matvec(GgmlType::Q4_0, &w, 2, 32, &x), Err(VulkanError::Shape(_))));
    // x of the wrong length.
    assert!(matches!(ctx.matvec(GgmlType::Q4_0, &w, 1, 32, &x[..16]), Err(VulkanError::Shape(_))));
}

#[test]
fn buffers_beyond_max_storage_buffer_range_are_an_error() {
    let Some(ctx) = ctx() else { return };
    let limit = ctx.info().max_storage_buffer_range;
    let Ok(len) = usize::try_from(limit + 1) else { return };
    // Checked before anything is allocated.
    match Buffer::zeroed(ctx, len) {
        Err(VulkanError::Limit { limit: l, .. }) => assert_eq!(l, limit),
        other => panic!("expected a limit error, got {other:?}"),
    }
}

#[test]
fn shared_memory_reductions_without_subgroup_ops() {
    let Some(ctx) = ctx_without_subgroups() else { return };
    assert!(!ctx.info().subgroup_arithmetic);
    for ty in QUANTS.into_iter().chain([GgmlType::F16, GgmlType::BF16, GgmlType::F32]) {
        let mut worst = 0f64;
        for (rows, cols) in [(1, 32), (65, 96), (7, 256), (3, 4096)] {
            worst = worst.max(check_matmul(ctx, ty, rows, cols, 2, (rows * cols) as u64));
        }
        eprintln!("{} without subgroups: largest relative error {worst:e}", ty.name());
    }
    for ty in KQUANTS {
        let mut worst = 0f64;
        for (rows, cols) in [(1, 256), (65, 512), (3, 4096)] {
            worst = worst.max(check_matmul(ctx, ty, rows, cols, 2, (rows * cols) as u64));
        }
        eprintln!("{} without subgroups: largest relative error {worst:e}", ty.name());
    }
    check_rms_norm(ctx);
}

#[test]
fn rms_norm_matches_the_cpu_kernel() {
    let Some(ctx) = ctx() else { return };
    check_rms_norm(ctx);
}

fn check_rms_norm(ctx: &Context) {
    let mut rng = Rng(5);
    let mut worst = 0f64;
    for (dim, rows) in [(1, 3), (7, 2), (64, 1), (100, 5), (2048, 3), (4096, 2)] {
        let x = rng.vec(dim * rows, 3.0);
        let w: Vec<f32> = (0..dim).map(|_| 1.0 + rng.f32()).collect();
        for weight in [None, Some(&w[..])] {
            let got = ctx.rms_norm(&x, dim, weight, 1e-6).unwrap();
            let mut want = vec![0f32; x.len()];
            ops::rms_norm(&x, &mut want, dim, weight, 1e-6);
            for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                // f32 sum of squares on the device against f64 on the CPU.
                let err = f64::from((g - e).abs()) / f64::from(e.abs()).max(1e-3);
                assert!(err <= 1e-5, "dim {dim} elem {i}: got {g}, want {e} (rel {err:e})");
                worst = worst.max(err);
            }
        }
    }
    eprintln!("rms_norm: largest relative error {worst:e}");
}

#[test]
fn swiglu_add_mul_match_the_cpu_kernels() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng(11);
    let mut worst = [0f64; 3];
    for n in [1, 5, 64, 1000, 300_000] {
        let a = rng.vec(n, 12.0);
        let b = rng.vec(n, 3.0);
        let mut want = vec![0f32; n];
        ops::swiglu(&a, &b, &mut want);
        let got = ctx.swiglu(&a, &b).unwrap();
        for (&g, &e) in got.iter().zip(&want) {
            // exp() on the device is not correctly rounded (GLSL allows 3 + 2|x| ulp).
            let err = f64::from((g - e).abs()) / f64::from(e.abs()).max(1e-3);
            assert!(err <= 1e-5, "swiglu: got {g}, want {e} (rel {err:e})");
            worst[0] = worst[0].max(err);
        }
        let mut sum = a.clone();
        ops::add_assign(&mut sum, &b);
        let mut prod = a.clone();
        ops::mul_assign(&mut prod, &b);
        // One correctly rounded f32 operation each: exact agreement.
        assert_eq!(ctx.add(&a, &b).unwrap(), sum);
        assert_eq!(ctx.mul(&a, &b).unwrap(), prod);
    }
    eprintln!("swiglu: largest relative error {:e}", worst[0]);
    assert!(matches!(ctx.swiglu(&[1.0], &[]), Err(VulkanError::Shape(_))));
}

/// GeGLU: 1 + tanh(z) loses precision where tanh is near -1 (on the CPU as here), by a few ulp of
/// 1; so within 1e-5 relative plus 1e-6 of |gate * up|.
#[test]
fn geglu_matches_the_cpu_kernel() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng(13);
    let mut worst = 0f64;
    for n in [1, 5, 64, 1000, 300_000] {
        let mut gate = rng.vec(n, 12.0);
        let up = rng.vec(n, 3.0);
        // Saturation at both ends and zero.
        for (g, v) in gate.iter_mut().zip([0.0, 20.0, -20.0, 100.0, -100.0]) {
            *g = v;
        }
        let mut want = vec![0f32; n];
        ops::geglu(&gate, &up, &mut want);
        let got = ctx.geglu(&gate, &up).unwrap();
        for i in 0..n {
            let (g, e) = (f64::from(got[i]), f64::from(want[i]));
            let tol = 1e-5 * e.abs() + 1e-6 * f64::from(gate[i] * up[i]).abs();
            assert!((g - e).abs() <= tol, "geglu({}) * {}: got {g}, want {e}", gate[i], up[i]);
            worst = worst.max((g - e).abs() / tol.max(1e-30));
        }
    }
    eprintln!("geglu: largest error {worst:.3} of the tolerance");
    assert!(matches!(ctx.geglu(&[1.0], &[]), Err(VulkanError::Shape(_))));
}

#[test]
fn without_allow_cpu_a_cpu_only_machine_has_no_suitable_device() {
    let devices = match unicorn_vulkan::list_devices() {
        Ok(d) => d,
        Err(e) => {
            assert!(
                !unicorn_vulkan::device_required(),
                "lavapipe is installed but Vulkan fails: {e}"
            );
            assert!(matches!(
                e,
                VulkanError::Loader(_)
                    | VulkanError::InstanceVersion { .. }
                    | VulkanError::NoSuitableDevice { .. }
            ));
            return;
        }
    };
    eprintln!("vulkan devices: {devices:?}");
    let gpu = devices.iter().any(|d| d.device_type != DeviceType::Cpu && d.api_version >= (1, 1));
    match Context::new(Options::default()) {
        Ok(c) => {
            assert!(gpu, "chose {:?} though only CPU devices exist", c.info());
            assert_ne!(c.info().device_type, DeviceType::Cpu);
        }
        Err(e @ VulkanError::NoSuitableDevice { .. }) => {
            assert!(!gpu, "a GPU exists but: {e}");
            let msg = e.to_string();
            assert!(msg.contains(unicorn_vulkan::ALLOW_CPU_ENV) || devices.is_empty(), "{msg}");
        }
        Err(e) => panic!("expected NoSuitableDevice, got {e}"),
    }
}

/// With a loader that finds no driver, `Context::new` is a typed error, not a panic. Runs itself
/// in a child process whose loader is pointed at a driver file that does not exist.
#[test]
fn no_vulkan_driver_is_a_typed_error() {
    const CHILD: &str = "UNICORN_VULKAN_TEST_NO_DRIVER";
    if std::env::var_os(CHILD).is_some() {
        match Context::new(Options { allow_cpu: true, ..Options::default() }) {
            Err(e @ (VulkanError::NoSuitableDevice { .. } | VulkanError::Loader(_))) => {
                eprintln!("as expected: {e}");
            }
            other => panic!("expected NoSuitableDevice or Loader, got {other:?}"),
        }
        return;
    }
    let missing = "/nonexistent/unicorn-test-icd.json";
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "no_vulkan_driver_is_a_typed_error", "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .env("VK_ICD_FILENAMES", missing)
        .env("VK_DRIVER_FILES", missing)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "the child did not run the test:\n{text}");
}

/// RoPE: the angles are the CPU's f32 values exactly, sin and cos the device's (after reduction
/// to [-pi, pi]), so outputs (inputs in [-1, 1)) agree within 1e-5 absolute.
#[test]
fn rope_matches_the_cpu_kernel() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng(31);
    let mut worst = 0f64;
    let positions = [0usize, 1, 2, 17, 255, 1000, 4095, 32_767, 131_071];
    for mode in [RopeMode::Norm, RopeMode::Neox] {
        for (head_dim, n_dims) in [(64, 64), (64, 32), (128, 128), (256, 256), (256, 64), (6, 2)] {
            for (freq_base, freq_scale) in [(10_000.0, 1.0), (1e6, 1.0), (10_000.0, 0.125)] {
                let rope = Rope { mode, n_dims, freq_base, freq_scale };
                let n_heads = 3;
                let x = rng.vec(positions.len() * n_heads * head_dim, 1.0);
                let got = ctx.rope(&rope, &x, head_dim, &positions).unwrap();
                let mut want = x.clone();
                for (t, &pos) in positions.iter().enumerate() {
                    let tok = &mut want[t * n_heads * head_dim..(t + 1) * n_heads * head_dim];
                    rope.rotate(tok, head_dim, pos);
                }
                for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                    let err = f64::from((g - e).abs());
                    assert!(
                        err <= 1e-5,
                        "{rope:?} head_dim {head_dim} elem {i}: got {g}, want {e} (err {err:e})"
                    );
                    worst = worst.max(err);
                }
            }
        }
    }
    eprintln!("rope: largest absolute error {worst:e}");
    let rope = Rope { mode: RopeMode::Norm, n_dims: 8, freq_base: 1e4, freq_scale: 1.0 };
    // n_dims above head_dim, odd n_dims, and x not whole tokens are errors.
    assert!(matches!(ctx.rope(&rope, &[0.0; 4], 4, &[0]), Err(VulkanError::Shape(_))));
    let odd = Rope { n_dims: 3, ..rope };
    assert!(matches!(ctx.rope(&odd, &[0.0; 8], 8, &[0]), Err(VulkanError::Shape(_))));
    assert!(matches!(ctx.rope(&rope, &[0.0; 12], 8, &[0]), Err(VulkanError::Shape(_))));
    assert!(matches!(ctx.rope(&rope, &[0.0; 8], 8, &[]), Err(VulkanError::Shape(_))));
}

/// Softmax: device exp (not correctly rounded) and an f32 Kahan sum against the CPU's exp and f64
/// sum, within 1e-6 relative (of `max(|expected|, 1e-30)`: below that f32 is subnormal).
fn check_softmax(ctx: &Context) {
    let mut rng = Rng(41);
    let mut worst = 0f64;
    for (dim, rows, spread) in
        [(1, 3, 1.0), (7, 2, 5.0), (64, 4, 10.0), (100, 5, 3.0), (4096, 3, 8.0), (5000, 2, 60.0)]
    {
        let mut x = rng.vec(dim * rows, spread);
        // Masked entries, as attention masks do (never a whole row: that is NaN on the CPU).
        for i in (3..x.len()).step_by(7) {
            x[i] = f32::NEG_INFINITY;
        }
        let got = ctx.softmax(&x, dim).unwrap();
        let mut want = x.clone();
        ops::softmax(&mut want, dim);
        for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
            let err = f64::from((g - e).abs()) / f64::from(e.abs()).max(1e-30);
            assert!(err <= 1e-6, "softmax dim {dim} elem {i}: got {g}, want {e} (rel {err:e})");
            worst = worst.max(err);
        }
    }
    eprintln!("softmax: largest relative error {worst:e}");
    assert!(matches!(ctx.softmax(&[1.0; 5], 2), Err(VulkanError::Shape(_))));
    assert!(matches!(ctx.softmax(&[1.0; 5], 0), Err(VulkanError::Shape(_))));
}

#[test]
fn softmax_matches_the_cpu_kernel() {
    let Some(ctx) = ctx() else { return };
    check_softmax(ctx);
}

#[test]
fn softmax_without_subgroup_ops() {
    let Some(ctx) = ctx_without_subgroups() else { return };
    check_softmax(ctx);
}

#[test]
fn scale_matches_the_cpu_kernel() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng(43);
    for n in [1, 5, 64, 1000, 300_000] {
        let x = rng.vec(n, 7.0);
        for s in [0.125, -3.7, 1.0 / 3.0] {
            let mut want = x.clone();
            ops::scale(&mut want, s);
            // One correctly rounded f32 multiplication: exact agreement.
            assert_eq!(ctx.scale(&x, s).unwrap(), want);
        }
    }
    assert!(ctx.scale(&[], 2.0).unwrap().is_empty());
}

/// A layer of a CPU reference cache: K and V in f16 or f32, as the engine's host cache.
#[derive(Clone)]
enum Ref {
    F16(Vec<f16>, Vec<f16>),
    F32(Vec<f32>, Vec<f32>),
}

impl Ref {
    /// Both halves filled with `k` and `v`, rounded to the element type.
    fn new(elem: KvElem, k: &[f32], v: &[f32]) -> Ref {
        let h = |x: &[f32]| x.iter().map(|&a| f16::from_f32(a)).collect();
        match elem {
            KvElem::F16 => Ref::F16(h(k), h(v)),
            KvElem::F32 => Ref::F32(k.to_vec(), v.to_vec()),
        }
    }

    fn store(&mut self, k: &[f32], v: &[f32], pos: usize, s: KvShape) {
        let (n_kv, n_ctx, hd) = (s.n_kv_head, s.n_ctx, s.head_dim);
        let (kd, vd) = match self {
            Ref::F16(a, b) => (KvDataMut::F16(a), KvDataMut::F16(b)),
            Ref::F32(a, b) => (KvDataMut::F32(a), KvDataMut::F32(b)),
        };
        KvCache::store(kd, k, pos, n_kv, n_ctx, hd);
        KvCache::store(vd, v, pos, n_kv, n_ctx, hd);
    }

    fn cache(&self, s: KvShape) -> KvCache<'_> {
        let (k, v) = match self {
            Ref::F16(a, b) => (KvData::F16(a), KvData::F16(b)),
            Ref::F32(a, b) => (KvData::F32(a), KvData::F32(b)),
        };
        KvCache { k, v, n_kv_head: s.n_kv_head, n_ctx: s.n_ctx, head_dim: s.head_dim }
    }

    /// The bytes of K and of V, as the device holds them.
    fn bytes(&self) -> (Vec<u8>, Vec<u8>) {
        match self {
            Ref::F16(a, b) => {
                let f = |x: &[f16]| x.iter().flat_map(|h| h.to_bits().to_ne_bytes()).collect();
                (f(a), f(b))
            }
            Ref::F32(a, b) => {
                let f = |x: &[f32]| x.iter().flat_map(|h| h.to_ne_bytes()).collect();
                (f(a), f(b))
            }
        }
    }
}

/// A device cache of `n_layers` layers, each filled from `fill(layer)`.
fn dev_cache<'c>(
    ctx: &'c Context,
    shape: KvShape,
    elem: KvElem,
    n_layers: usize,
    fill: impl Fn(usize) -> Ref,
) -> DevKv<'c> {
    let mut kv = DevKv::new(ctx, shape, elem, n_layers, None).unwrap();
    for l in 0..n_layers {
        let (kb, vb) = fill(l).bytes();
        let (k, v) = kv.layer_mut(l).unwrap();
        k.copy_from_slice(&kb);
        v.copy_from_slice(&vb);
    }
    kv
}

/// kv_store writes exactly what `KvCache::store` writes (f16: round to nearest even, subnormals,
/// overflow to infinity; f32: the values), for one token and for several at once, into the
/// right layer at the right positions, and nothing else.
#[test]
fn kv_store_matches_the_cpu_cache() {
    let Some(ctx) = ctx() else { return };
    let mut rng = Rng(51);
    let special = [
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        -2.0f32.powi(-24),
        2.0f32.powi(-25),
        3.0 * 2.0f32.powi(-26),
        2.0f32.powi(-15) * 1.3,
        65504.0,
        65519.0,
        65520.0,
        -1e9,
        -0.0,
        1e-40,
        f32::INFINITY,
    ];
    for elem in [KvElem::F16, KvElem::F32] {
        for (n_kv_head, n_ctx, head_dim) in [(1, 1, 2), (2, 9, 64), (3, 5, 256), (1, 4, 6)] {
            let shape = KvShape { n_kv_head, n_ctx, head_dim };
            let total = n_kv_head * n_ctx * head_dim;
            let kvd = n_kv_head * head_dim;
            let n_layers = 3;
            let init = Ref::new(elem, &vec![0.5; total], &vec![-0.25; total]);
            let mut refs = vec![init.clone(); n_layers];
            let mut dev = dev_cache(ctx, shape, elem, n_layers, |_| init.clone());
            for (layer, pos0, n_tok) in [(1, n_ctx - 1, 1), (0, 0, n_ctx), (2, n_ctx / 2, 1)] {
                let mut k = rng.vec(n_tok * kvd, 3.0);
                let v = rng.vec(n_tok * kvd, 3.0);
                for (s, &x) in k.iter_mut().zip(&special) {
                    *s = x;
                }
                for t in 0..n_tok {
                    let (kt, vt) = (&k[t * kvd..][..kvd], &v[t * kvd..][..kvd]);
                    refs[layer].store(kt, vt, pos0 + t, shape);
                }
                ctx.kv_store(&mut dev, layer, &k, &v, pos0).unwrap();
                for (l, r) in refs.iter().enumerate() {
                    let (k, v) = dev.layer(l).unwrap();
                    let (wk, wv) = r.bytes();
                    assert!(k == wk && v == wv, "{elem:?} {shape:?} layer {l} after {pos0}");
                }
            }
            let bad = |r: Result<(), VulkanError>| matches!(r, Err(VulkanError::Shape(_)));
            let z = vec![0.0; kvd];
            assert!(bad(ctx.kv_store(&mut dev, 0, &z, &z, n_ctx)), "a position beyond the cache");
            assert!(bad(ctx.kv_store(&mut dev, 3, &z, &z, 0)), "a layer beyond the cache");
            assert!(bad(ctx.kv_store(&mut dev, 0, &[0.0], &[0.0], 0)), "not whole tokens");
            assert!(bad(ctx.kv_store(&mut dev, 0, &z, &z[1..], 0)), "K and V differ");
        }
    }
    // An odd head_dim is an error.
    let odd = KvShape { n_kv_head: 1, n_ctx: 2, head_dim: 3 };
    assert!(matches!(DevKv::new(ctx, odd, KvElem::F16, 1, None), Err(VulkanError::Shape(_))));
}

/// Attention against `unicorn_kernels::attention::attention` on random caches (f16 and f32) in
/// the second layer of a device cache: one query token (decode) and several (a prefill chunk,
/// each query at its own position); values and queries in [-1, 1) and [-3, 3), so outputs are
/// of magnitude below 1; within 1e-4 absolute (f32 scores in another order, an online softmax
/// that rescales per chunk of keys, device tanh and exp).
fn check_attention(ctx: &Context) {
    let pool = ThreadPool::new(1);
    let mut rng = Rng(61);
    let mut worst = 0f64;
    let mut cases = 0;
    for (elem, head_dims) in [(KvElem::F16, &[64, 256][..]), (KvElem::F32, &[64][..])] {
        for &head_dim in head_dims {
            for (n_kv_head, group) in [(2, 1), (1, 3), (2, 4)] {
                let n_ctx = 320;
                let shape = KvShape { n_kv_head, n_ctx, head_dim };
                let total = n_kv_head * n_ctx * head_dim;
                let layers: Vec<Ref> = (0..2)
                    .map(|_| Ref::new(elem, &rng.vec(total, 1.0), &rng.vec(total, 1.0)))
                    .collect();
                let mut dev = dev_cache(ctx, shape, elem, 2, |l| layers[l].clone());
                let kv = layers[1].cache(shape);
                let n_head = n_kv_head * group;
                for kv_len in [1, 7, 64, 300] {
                    for (window, softcap) in [
                        (None, None),
                        (Some(5), None),
                        (None, Some(1.5)),
                        (Some(50), Some(30.0)),
                        (None, Some(0.01)),
                    ] {
                        for (n_q, pos0, causal) in [
                            (1, kv_len - 1, true),
                            (1, kv_len / 2, true),
                            (1, kv_len / 3, false),
                            (kv_len.min(4), kv_len - kv_len.min(4), true),
                            (3, kv_len / 2, false),
                        ] {
                            // Queries scaled so scores reach a few units and the softmax is
                            // peaked.
                            let q = rng.vec(n_q * n_head * head_dim, 3.0);
                            let p = AttnParams {
                                n_head,
                                scale: 1.0 / (head_dim as f32).sqrt(),
                                pos0,
                                kv_len,
                                causal,
                                window,
                                softcap,
                            };
                            let mut want = vec![0f32; q.len()];
                            attention(&pool, &q, n_q, &kv, &p, &mut want).unwrap();
                            let got = ctx.attention(&q, &mut dev, 1, &p).unwrap();
                            for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                                let err = f64::from((g - e).abs());
                                assert!(
                                    err <= 1e-4,
                                    "{elem:?} {shape:?} {p:?} n_q {n_q} elem {i}: got {g}, want {e}"
                                );
                                worst = worst.max(err);
                            }
                            cases += 1;
                        }
                    }
                }
            }
        }
    }
    eprintln!("attention: {cases} cases, largest absolute error {worst:e}");
}

#[test]
fn attention_matches_the_cpu_kernel() {
    let Some(ctx) = ctx() else { return };
    check_attention(ctx);
}

#[test]
fn attention_without_subgroup_ops() {
    let Some(ctx) = ctx_without_subgroups() else { return };
    check_attention(ctx);
}

/// A window that hides every key gives zeros; shapes that do not fit are errors.
#[test]
fn attention_edge_cases() {
    let Some(ctx) = ctx() else { return };
    let shape = KvShape { n_kv_head: 1, n_ctx: 8, head_dim: 4 };
    let quarter = Ref::new(KvElem::F16, &[0.25; 32], &[0.25; 32]);
    let mut kv = dev_cache(ctx, shape, KvElem::F16, 1, |_| quarter.clone());
    let p = AttnParams {
        n_head: 2,
        scale: 0.5,
        pos0: 7,
        kv_len: 3,
        causal: true,
        window: Some(2),
        softcap: None,
    };
    // The query at 7 with a window of 2 sees keys 6..8, but only 0..3 are valid: none.
    assert_eq!(ctx.attention(&[1.0; 8], &mut kv, 0, &p).unwrap(), vec![0.0; 8]);
    // A position beyond 32 bits with a window sees nothing either: zeros, not a limit error.
    let far = AttnParams { pos0: usize::MAX, ..p };
    assert_eq!(ctx.attention(&[1.0; 8], &mut kv, 0, &far).unwrap(), vec![0.0; 8]);
    // Two queries at 6 and 7 with kv_len 4 see nothing; at 2 and 3 keys 1..3 and 2..4, whose
    // values are all 0.25.
    let two = AttnParams { pos0: 2, kv_len: 4, window: Some(2), ..p };
    let got = ctx.attention(&[1.0; 16], &mut kv, 0, &AttnParams { pos0: 6, ..two }).unwrap();
    assert_eq!(got, vec![0.0; 16]);
    let got = ctx.attention(&[1.0; 16], &mut kv, 0, &two).unwrap();
    assert!(got.iter().all(|&x| (x - 0.25).abs() < 1e-6), "{got:?}");
    let bad = |kv: &mut DevKv<'_>, p: AttnParams, q: &[f32]| {
        matches!(ctx.attention(q, kv, 0, &p), Err(VulkanError::Shape(_)))
    };
    assert!(bad(&mut kv, AttnParams { kv_len: 9, ..p }, &[1.0; 8]));
    assert!(bad(&mut kv, p, &[1.0; 7]));
    // So many heads that n_head * head_dim overflows: an error, not a panic.
    assert!(bad(&mut kv, AttnParams { n_head: usize::MAX, ..p }, &[1.0; 8]));
    assert!(bad(&mut kv, AttnParams { softcap: Some(0.0), ..p }, &[1.0; 8]));
    assert!(matches!(ctx.attention(&[1.0; 8], &mut kv, 1, &p), Err(VulkanError::Shape(_))));
    let three = KvShape { n_kv_head: 2, n_ctx: 4, head_dim: 4 };
    let mut kv3 = DevKv::new(ctx, three, KvElem::F16, 1, None).unwrap();
    assert!(bad(&mut kv3, AttnParams { n_head: 3, ..p }, &[1.0; 12]));
    let wide = KvShape { n_kv_head: 1, n_ctx: 1, head_dim: MAX_HEAD_DIM + 2 };
    assert!(matches!(DevKv::new(ctx, wide, KvElem::F16, 1, None), Err(VulkanError::Shape(_))));
}

/// A layer larger than the device's largest storage buffer is a limit error; several layers
/// that are not together share buffers as far as the limit allows.
#[test]
fn kv_caches_split_into_buffers_by_whole_layers() {
    let Some(ctx) = ctx() else { return };
    let limit = ctx.info().max_storage_buffer_range.min(u64::from(u32::MAX)) as usize;
    // One layer (K and V, f32) just above the limit.
    let n_ctx = limit / (2 * 4 * 2) + 1;
    let shape = KvShape { n_kv_head: 1, n_ctx, head_dim: 2 };
    assert!(matches!(DevKv::new(ctx, shape, KvElem::F32, 1, None), Err(VulkanError::Limit { .. })));
    // Layers of a third of the limit: three per buffer, so seven layers take three buffers.
    let n_ctx = limit / (3 * 2 * 2 * 64);
    let shape = KvShape { n_kv_head: 1, n_ctx, head_dim: 64 };
    let mut kv = DevKv::new(ctx, shape, KvElem::F16, 7, None).unwrap();
    assert_eq!(kv.buffers(), 3);
    // Each layer is its own: a store into layer 4 changes only layer 4.
    let k: Vec<f32> = (0..64).map(|i| i as f32).collect();
    ctx.kv_store(&mut kv, 4, &k, &k, n_ctx - 1).unwrap();
    for l in 0..7 {
        let (kb, _) = kv.layer(l).unwrap();
        let nonzero = kb.iter().any(|&b| b != 0);
        assert_eq!(nonzero, l == 4, "layer {l}");
    }
}

/// A decode loop as the engine runs it: a prefill chunk stores its tokens at once and attends
/// with one query per token, then each step stores one token's K and V and attends over the
/// cache so far, on the device and on the CPU (`KvCache::store`, then `attention`); within the
/// attention tolerance, 1e-4 absolute. head_dim 512 is `MAX_HEAD_DIM`; 6 is even but not a
/// multiple of 4.
#[test]
fn decode_steps_store_then_attend() {
    let Some(ctx) = ctx() else { return };
    let pool = ThreadPool::new(1);
    let mut rng = Rng(71);
    let mut worst = 0f64;
    for (elem, head_dim, n_kv_head, group, window, softcap) in [
        (KvElem::F16, 512, 1, 2, None, None),
        (KvElem::F16, 6, 2, 3, Some(4), Some(20.0)),
        (KvElem::F32, 128, 2, 1, Some(9), None),
    ] {
        let n_ctx = 24;
        let shape = KvShape { n_kv_head, n_ctx, head_dim };
        let total = n_kv_head * n_ctx * head_dim;
        let kvd = n_kv_head * head_dim;
        let mut cpu = Ref::new(elem, &vec![0.0; total], &vec![0.0; total]);
        let mut dev = DevKv::new(ctx, shape, elem, 1, None).unwrap();
        let n_head = n_kv_head * group;
        // A prefill chunk of 5, then single tokens.
        let mut pos = 0;
        while pos < n_ctx {
            let m = if pos == 0 { 5 } else { 1 };
            let k = rng.vec(m * kvd, 1.0);
            let v = rng.vec(m * kvd, 1.0);
            for t in 0..m {
                cpu.store(&k[t * kvd..][..kvd], &v[t * kvd..][..kvd], pos + t, shape);
            }
            ctx.kv_store(&mut dev, 0, &k, &v, pos).unwrap();
            let q = rng.vec(m * n_head * head_dim, 2.0);
            let p = AttnParams {
                n_head,
                scale: 1.0 / (head_dim as f32).sqrt(),
                pos0: pos,
                kv_len: pos + m,
                causal: true,
                window,
                softcap,
            };
            let mut want = vec![0f32; q.len()];
            attention(&pool, &q, m, &cpu.cache(shape), &p, &mut want).unwrap();
            let got = ctx.attention(&q, &mut dev, 0, &p).unwrap();
            for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                let err = f64::from((g - e).abs());
                assert!(err <= 1e-4, "{elem:?} {shape:?} pos {pos} elem {i}: got {g}, want {e}");
                worst = worst.max(err);
            }
            pos += m;
        }
    }
    eprintln!("decode steps: largest absolute error {worst:e}");
}
