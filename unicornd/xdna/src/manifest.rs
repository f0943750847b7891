//! The NPU kernel manifest (`kernels/xdna/manifest.toml`): which kernels exist, the files that
//! make each one (xclbin, instruction stream), the operation and shapes it computes and the
//! layout its weights must be in. The daemon loads it at start; a kernel whose files are missing
//! or malformed is listed as unusable with the reason, never loaded.
//!
//! ```toml
//! version = 1
//! [[kernel]]
//! name = "matvec_i8_2048x2048"
//! op = "matvec"                    # matvec, matmul, rms_norm, rope, silu, softmax
//! xclbin = "build/matvec_i8.xclbin"
//! instructions = "build/matvec_i8.insts.bin"
//! cu = "MLIR_AIE"                  # the compute unit's name in the xclbin's IP_LAYOUT
//! shape = { m = 2048, k = 2048, n = 1 }
//! dtype = "i8"                     # activations/weights: i8, bf16, f32
//! weights = "row_major_i8_row_scale"   # none, row_major_bf16, row_major_i8_row_scale
//! columns = 4                      # AIE columns the design uses
//! # eps = 1e-5                     # rms_norm only: the epsilon the kernel computes with
//! ```

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::error::{Result, XdnaError};
use crate::xclbin::Xclbin;

/// Environment variable naming the manifest's directory.
pub const DIR_ENV: &str = "UNICORN_XDNA_KERNELS";
/// Where packages install the kernels.
pub const INSTALLED_DIR: &str = "/usr/share/unicorn-npu/xdna";
/// The manifest's file name inside its directory.
pub const FILE: &str = "manifest.toml";

/// Operations a kernel computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Matvec,
    Matmul,
    RmsNorm,
    Rope,
    Silu,
    Softmax,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Matvec => "matvec",
            Op::Matmul => "matmul",
            Op::RmsNorm => "rms_norm",
            Op::Rope => "rope",
            Op::Silu => "silu",
            Op::Softmax => "softmax",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    I8,
    Bf16,
    F32,
}

/// The layout weights must be converted to before upload (into SHMEM BOs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightLayout {
    /// The op has no weights (softmax, rope, silu).
    None,
    /// Dequantized to bf16, rows contiguous.
    RowMajorBf16,
    /// int8 rows with one f32 scale per row after the matrix.
    RowMajorI8RowScale,
    /// A norm's f32 weight vector.
    VectorF32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    pub m: u32,
    pub k: u32,
    #[serde(default = "one")]
    pub n: u32,
}

fn one() -> u32 {
    1
}

/// One kernel entry as written.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    pub name: String,
    pub op: Op,
    pub xclbin: PathBuf,
    pub instructions: PathBuf,
    pub cu: String,
    pub shape: Shape,
    pub dtype: DType,
    pub weights: WeightLayout,
    pub columns: u16,
    /// Where the source lives (for people).
    #[serde(default)]
    pub source: Option<String>,
    /// An `rms_norm` kernel's epsilon, as its code computes it (baked in; the engine runs the
    /// kernel only for models with exactly this epsilon). Not given for other ops.
    #[serde(default)]
    pub eps: Option<f32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    #[serde(default)]
    kernel: Vec<Kernel>,
}

/// A kernel whose files were found and checked.
#[derive(Clone, Debug)]
pub struct Ready {
    pub kernel: Kernel,
    pub xclbin: Xclbin,
    pub instructions: Vec<u8>,
}

/// The manifest, with each kernel either ready or unusable with a reason.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub dir: PathBuf,
    pub ready: Vec<Ready>,
    pub unusable: Vec<(String, String)>,
}

/// Largest instruction stream or xclbin the daemon reads.
const MAX_FILE: u64 = 256 << 20;

fn relative(p: &Path) -> bool {
    p.components().all(|c| matches!(c, Component::Normal(_)))
}

impl Manifest {
    /// The directory: `$UNICORN_XDNA_KERNELS`, else the installed one when it exists, else
    /// `kernels/xdna` of the source tree this binary was built from when it exists.
    pub fn default_dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os(DIR_ENV) {
            return Some(PathBuf::from(d));
        }
        let installed = Path::new(INSTALLED_DIR);
        if installed.join(FILE).is_file() {
            return Some(installed.to_owned());
        }
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels/xdna");
        src.join(FILE).is_file().then_some(src)
    }

    /// Parses and checks the manifest text (names unique and non-empty, files relative paths
    /// inside the directory, shapes and columns non-zero, weights given where the op has them).
    pub fn parse(text: &str, path: &str) -> Result<Vec<Kernel>> {
        let bad = |reason: String| XdnaError::Manifest { path: path.to_owned(), reason };
        let f: File = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if f.version != 1 {
            return Err(bad(format!("version {} (this daemon reads version 1)", f.version)));
        }
        let mut names = BTreeSet::new();
        for k in &f.kernel {
            let what = |r: &str| bad(format!("kernel {:?}: {r}", k.name));
            if k.name.is_empty() || !names.insert(k.name.clone()) {
                return Err(what("empty or duplicate name"));
            }
            if !relative(&k.xclbin) || !relative(&k.instructions) {
                return Err(what("files must be relative paths inside the manifest's directory"));
            }
            if k.shape.m == 0 || k.shape.k == 0 || k.shape.n == 0 || k.columns == 0 {
                return Err(what("shape and columns must be non-zero"));
            }
            let weighted = matches!(k.op, Op::Matvec | Op::Matmul | Op::RmsNorm);
            if weighted == (k.weights == WeightLayout::None) {
                return Err(what("weights must be given exactly for matvec, matmul and rms_norm"));
            }
            if k.eps.is_some() && k.op != Op::RmsNorm {
                return Err(what("eps is given only for rms_norm"));
            }
            if k.eps.is_some_and(|e| !(e.is_finite() && e > 0.0)) {
                return Err(what("eps must be positive"));
            }
            if k.cu.is_empty() {
                return Err(what("cu is empty"));
            }
        }
        Ok(f.kernel)
    }

    /// Loads `dir/manifest.toml` and checks each kernel's files: the xclbin parses and names the
    /// CU, the instruction stream is a non-empty whole number of 32-bit words.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(FILE);
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| XdnaError::Manifest { path: shown.clone(), reason: e.to_string() })?;
        let kernels = Manifest::parse(&text, &shown)?;
        let mut m = Manifest { dir: dir.to_owned(), ready: Vec::new(), unusable: Vec::new() };
        for k in kernels {
            match check(dir, &k) {
                Ok((xclbin, instructions)) => {
                    m.ready.push(Ready { kernel: k, xclbin, instructions })
                }
                Err(reason) => m.unusable.push((k.name.clone(), reason)),
            }
        }
        Ok(m)
    }

    /// Operations some ready kernel computes.
    pub fn ops(&self) -> BTreeSet<Op> {
        self.ready.iter().map(|r| r.kernel.op).collect()
    }

    /// One line for `unicorn status`.
    pub fn summary(&self) -> String {
        let ready: Vec<&str> = self.ready.iter().map(|r| r.kernel.name.as_str()).collect();
        let mut s = format!(
            "kernels in {}: {} ready{}",
            self.dir.display(),
            ready.len(),
            if ready.is_empty() { String::new() } else { format!(" ({})", ready.join(", ")) }
        );
        if !self.unusable.is_empty() {
            let first = &self.unusable[0];
            s.push_str(&format!(
                ", {} not usable (e.g. {}: {})",
                self.unusable.len(),
                first.0,
                first.1
            ));
        }
        s
    }
}

fn read_bounded(path: &Path) -> std::result::Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_FILE {
        return Err(format!("{} is larger than {MAX_FILE} bytes", path.display()));
    }
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn check(dir: &Path, k: &Kernel) -> std::result::Result<(Xclbin, Vec<u8>), String> {
    let xclbin = Xclbin::parse(&read_bounded(&dir.join(&k.xclbin))?)
        .map_err(|e| format!("{}: {e}", k.xclbin.display()))?;
    let cus = xclbin.compute_units().map_err(|e| format!("{}: {e}", k.xclbin.display()))?;
    if !cus.iter().any(|c| c.name == k.cu) {
        return Err(format!("{} has no compute unit {:?}", k.xclbin.display(), k.cu));
    }
    let instructions = read_bounded(&dir.join(&k.instructions))?;
    if instructions.is_empty() || instructions.len() % 4 != 0 {
        return Err(format!(
            "{}: {} bytes is not a non-empty whole number of 32-bit words",
            k.instructions.display(),
            instructions.len()
        ));
    }
    Ok((xclbin, instructions))
}
