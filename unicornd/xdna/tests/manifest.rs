//! The kernel manifest: the repository's own file parses, bad entries are refused, and kernels
//! whose files are missing or malformed are listed as unusable with the reason.

use std::path::{Path, PathBuf};

use unicorn_xdna::manifest::{Manifest, Op};
use unicorn_xdna::xclbin::build;

fn repo_manifest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels/xdna")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("unicorn-manifest-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("build")).unwrap();
    d
}

const ONE: &str = r#"
version = 1
[[kernel]]
name = "mv"
op = "matvec"
xclbin = "build/mv.xclbin"
instructions = "build/mv.insts.bin"
cu = "MLIR_AIE"
shape = { m = 64, k = 64 }
dtype = "bf16"
weights = "row_major_bf16"
columns = 1
"#;

#[test]
fn the_repository_manifest_parses() {
    let dir = repo_manifest_dir();
    let text = std::fs::read_to_string(dir.join("manifest.toml")).unwrap();
    let kernels = Manifest::parse(&text, "kernels/xdna/manifest.toml").unwrap();
    let ops: std::collections::BTreeSet<Op> = kernels.iter().map(|k| k.op).collect();
    for op in [Op::Matvec, Op::Matmul, Op::RmsNorm, Op::Rope, Op::Silu, Op::Softmax] {
        assert!(ops.contains(&op), "no {op:?} kernel in the manifest");
    }
    // The epsilon aie/ops.cc bakes into rms_norm_bf16, and only there.
    for k in &kernels {
        let want = (k.op == Op::RmsNorm).then_some(1e-5f32);
        assert_eq!(k.eps, want, "{}", k.name);
    }
    // Without a build every kernel is unusable, each with its missing file named.
    let m = Manifest::load(&dir).unwrap();
    if !dir.join("build").exists() {
        assert!(m.ready.is_empty());
        assert_eq!(m.unusable.len(), kernels.len());
        assert!(m.unusable[0].1.contains("build/"), "{:?}", m.unusable[0]);
        assert!(m.summary().contains("0 ready"), "{}", m.summary());
    }
}

#[test]
fn bad_entries_are_refused() {
    for (from, to, what) in [
        ("version = 1", "version = 2", "version 2"),
        ("op = \"matvec\"", "op = \"conv\"", "unknown variant"),
        ("build/mv.xclbin", "/etc/mv.xclbin", "relative paths"),
        ("build/mv.xclbin", "../mv.xclbin", "relative paths"),
        ("m = 64", "m = 0", "non-zero"),
        ("weights = \"row_major_bf16\"", "weights = \"none\"", "weights must be given"),
        ("columns = 1", "columns = 1\nextra = 3", "unknown field"),
        ("columns = 1", "columns = 1\neps = 1e-5", "eps is given only for rms_norm"),
    ] {
        let text = ONE.replace(from, to);
        let e = Manifest::parse(&text, "m.toml").unwrap_err().to_string();
        assert!(e.contains(what), "{to}: {e}");
    }
    let twice = format!("{ONE}{}", &ONE[ONE.find("[[kernel]]").unwrap()..]);
    assert!(Manifest::parse(&twice, "m.toml").unwrap_err().to_string().contains("duplicate"));
}

#[test]
fn kernels_with_good_files_are_ready_and_bad_ones_say_why() {
    let d = tmp("ready");
    std::fs::write(d.join("manifest.toml"), ONE).unwrap();
    std::fs::write(d.join("build/mv.xclbin"), build::npu_xclbin(&["MLIR_AIE"], 1, 256)).unwrap();
    std::fs::write(d.join("build/mv.insts.bin"), [0u8; 64]).unwrap();
    let m = Manifest::load(&d).unwrap();
    assert_eq!(m.ready.len(), 1, "{:?}", m.unusable);
    assert_eq!(m.ops().into_iter().collect::<Vec<_>>(), vec![Op::Matvec]);
    // An instruction stream that is not whole words.
    std::fs::write(d.join("build/mv.insts.bin"), [0u8; 6]).unwrap();
    let m = Manifest::load(&d).unwrap();
    assert!(m.unusable[0].1.contains("32-bit words"), "{:?}", m.unusable);
    // An xclbin without the named CU, and a corrupted one.
    std::fs::write(d.join("build/mv.insts.bin"), [0u8; 64]).unwrap();
    std::fs::write(d.join("build/mv.xclbin"), build::npu_xclbin(&["other"], 1, 256)).unwrap();
    let m = Manifest::load(&d).unwrap();
    assert!(m.unusable[0].1.contains("no compute unit"), "{:?}", m.unusable);
    std::fs::write(d.join("build/mv.xclbin"), b"xclbin2\0 short").unwrap();
    let m = Manifest::load(&d).unwrap();
    assert!(m.unusable[0].1.contains("too short"), "{:?}", m.unusable);
}
