//! Each product kernel of the NPU's manifest against the CPU on random inputs: the per-kernel
//! table of `scripts/npu-hw-test`. It discovers the NPU and loads the manifest as the daemon
//! does (`UNICORN_XDNA_KERNELS` names the manifest's directory) and exits with status 2 when
//! there is no usable NPU with kernels, 1 when a kernel's output is off.
//!
//!     cargo run --release -p unicorn-engine --example npu_kernels [REPS]

use unicorn_engine::model::{check_kernel, discover_npu};

/// bf16 inputs and outputs with f32 accumulation: the output's rounding is 2^-8 of its size.
const REL_TOL: f32 = 1e-2;

fn main() {
    let reps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let d = discover_npu(true);
    println!("npu: {}", d.report);
    let Some(rt) = d.offer.runtime() else {
        eprintln!("npu_kernels: nothing to run: {}", d.offer.reason());
        std::process::exit(2);
    };
    let double = rt.device().is_test_double();
    if double {
        println!("TEST DOUBLE: nothing below is computed by an NPU");
    }
    println!("{:<28} {:>12} {:>12} {:>12} {:>6}", "kernel", "max |err|", "npu us", "cpu us", "ok");
    let mut bad = 0;
    for (i, k) in rt.kernels().enumerate() {
        match check_kernel(rt, i, reps, 0x9e37_79b9_7f4a_7c15 ^ i as u64) {
            Ok(c) => {
                let ok = c.max_abs_err <= REL_TOL * c.max_abs_ref;
                bad += usize::from(!ok);
                println!(
                    "{:<28} {:>12.4e} {:>12.1} {:>12.1} {:>6}",
                    c.name,
                    c.max_abs_err,
                    c.npu_us,
                    c.cpu_us,
                    if ok { "yes" } else { "NO" }
                );
            }
            Err(e) => println!("{:<28} not run: {e}", k.name),
        }
    }
    std::process::exit(if bad > 0 { 1 } else { 0 });
}
