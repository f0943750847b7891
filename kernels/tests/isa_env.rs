//! `UNICORN_CPU` selects the kernels; it is read once per process, so each case runs this test
//! binary again as a child with the variable set.

use std::process::Command;

use unicorn_kernels::{Isa, IsaLevel};

const CHILD: &str = "UNICORN_KERNELS_ISA_CHILD";

#[test]
fn unicorn_cpu_picks_the_level() {
    if std::env::var_os(CHILD).is_some() {
        // Child role: report what was chosen.
        println!("chosen={}", Isa::current());
        return;
    }
    let best = Isa::best();
    for (value, want) in [
        ("scalar", IsaLevel::Scalar),
        ("avx2", IsaLevel::Avx2.min(best.level())),
        ("AVX512", best.level()),
        ("bogus", best.level()),
    ] {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "unicorn_cpu_picks_the_level", "--nocapture"])
            .env(CHILD, "1")
            .env("UNICORN_CPU", value)
            .output()
            .unwrap();
        assert!(out.status.success(), "child failed: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("chosen={}", want.name())),
            "UNICORN_CPU={value}: {stdout}"
        );
    }
}
