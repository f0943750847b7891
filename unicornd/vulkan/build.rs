//! Compiles the GLSL compute shaders in the workspace's `shaders/` to SPIR-V with `glslc` and
//! writes `shaders.rs`, which embeds every variant by name.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (variant name, source file, defines).
fn variants() -> Vec<(String, &'static str, Vec<String>)> {
    let mut v = Vec::new();
    for sg in [false, true] {
        let suffix = if sg { "_sg" } else { "" };
        let defs = |extra: &[String]| {
            let mut d = extra.to_vec();
            if sg {
                d.push("USE_SUBGROUP".to_string());
            }
            d
        };
        for f in [
            "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16",
            "BF16", "F32",
        ] {
            let name = format!("mul_mv_{}{suffix}", f.to_lowercase());
            v.push((name, "mul_mv.comp", defs(&[format!("FORMAT_{f}")])));
        }
        v.push((format!("rms_norm{suffix}"), "rms_norm.comp", defs(&[])));
        v.push((format!("softmax{suffix}"), "softmax.comp", defs(&[])));
        v.push((format!("attn{suffix}"), "attn.comp", defs(&[])));
        v.push((format!("attn_f32{suffix}"), "attn.comp", defs(&["KV_F32".to_string()])));
    }
    // No reduction in these: one variant each.
    v.push(("swiglu".to_string(), "swiglu.comp", Vec::new()));
    v.push(("geglu".to_string(), "geglu.comp", Vec::new()));
    v.push(("binary".to_string(), "binary.comp", Vec::new()));
    v.push(("rope".to_string(), "rope.comp", Vec::new()));
    v.push(("kv_store".to_string(), "kv_store.comp", Vec::new()));
    v.push(("kv_store_f32".to_string(), "kv_store.comp", vec!["KV_F32".to_string()]));
    v.push(("copy".to_string(), "copy.comp", Vec::new()));
    v
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let shaders = manifest.join("../../shaders");
    let shaders = shaders.canonicalize().unwrap_or(shaders);
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed={}", shaders.display());
    println!("cargo:rerun-if-env-changed=GLSLC");
    for entry in std::fs::read_dir(&shaders).expect("reading shaders/").flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }

    let glslc = env::var_os("GLSLC").unwrap_or_else(|| "glslc".into());
    let mut table = String::from("/// Every embedded SPIR-V module: (variant name, bytes).\n");
    table.push_str("pub(crate) static SHADERS: &[(&str, &[u8])] = &[\n");
    for (name, src, defines) in variants() {
        let spv = out.join(format!("{name}.spv"));
        compile(&glslc, &shaders, &shaders.join(src), &defines, &spv);
        writeln!(
            table,
            "    ({name:?}, include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{name}.spv\"))),"
        )
        .unwrap();
    }
    table.push_str("];\n");
    std::fs::write(out.join("shaders.rs"), table).expect("writing shaders.rs");
}

fn compile(glslc: &std::ffi::OsStr, include: &Path, src: &Path, defines: &[String], out: &Path) {
    let mut cmd = Command::new(glslc);
    cmd.arg("--target-env=vulkan1.1").arg("-O").arg("-I").arg(include);
    for d in defines {
        cmd.arg(format!("-D{d}"));
    }
    cmd.arg("-o").arg(out).arg(src);
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("glslc failed ({s}) compiling {} with {defines:?}", src.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "glslc not found: the Vulkan backend compiles shaders/ with it. Run scripts/install-deps \
             (Debian/Ubuntu package `glslc`), or set GLSLC to its path."
        ),
        Err(e) => panic!("running glslc: {e}"),
    }
}
