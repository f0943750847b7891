//! The embedded SPIR-V modules and the kernels they implement.

use std::io::Cursor;

use unicorn_kernels::GgmlType;

use crate::error::{Result, VulkanError};
use crate::kv::KvElem;

include!(concat!(env!("OUT_DIR"), "/shaders.rs"));

/// A compute kernel, one pipeline each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// `mul_mv.comp` for one weight format.
    MulMv(MvFormat),
    RmsNorm,
    Swiglu,
    Binary,
    Rope,
    Softmax,
    /// `attn.comp` over a cache of this element type.
    Attn(KvElem),
    /// `kv_store.comp` into a cache of this element type.
    KvStore(KvElem),
    Geglu,
    Copy,
}

/// The weight formats `mul_mv.comp` is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MvFormat {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    F16,
    BF16,
    F32,
}

impl MvFormat {
    const ALL: [MvFormat; 13] = [
        MvFormat::Q4_0,
        MvFormat::Q4_1,
        MvFormat::Q5_0,
        MvFormat::Q5_1,
        MvFormat::Q8_0,
        MvFormat::Q2K,
        MvFormat::Q3K,
        MvFormat::Q4K,
        MvFormat::Q5K,
        MvFormat::Q6K,
        MvFormat::F16,
        MvFormat::BF16,
        MvFormat::F32,
    ];

    /// The shader for weights of `ty`, if there is one.
    pub(crate) fn of(ty: GgmlType) -> Option<MvFormat> {
        Some(match ty {
            GgmlType::Q4_0 => MvFormat::Q4_0,
            GgmlType::Q4_1 => MvFormat::Q4_1,
            GgmlType::Q5_0 => MvFormat::Q5_0,
            GgmlType::Q5_1 => MvFormat::Q5_1,
            GgmlType::Q8_0 => MvFormat::Q8_0,
            GgmlType::Q2K => MvFormat::Q2K,
            GgmlType::Q3K => MvFormat::Q3K,
            GgmlType::Q4K => MvFormat::Q4K,
            GgmlType::Q5K => MvFormat::Q5K,
            GgmlType::Q6K => MvFormat::Q6K,
            GgmlType::F16 => MvFormat::F16,
            GgmlType::BF16 => MvFormat::BF16,
            GgmlType::F32 => MvFormat::F32,
            _ => return None,
        })
    }

    fn suffix(self) -> &'static str {
        match self {
            MvFormat::Q4_0 => "q4_0",
            MvFormat::Q4_1 => "q4_1",
            MvFormat::Q5_0 => "q5_0",
            MvFormat::Q5_1 => "q5_1",
            MvFormat::Q8_0 => "q8_0",
            MvFormat::Q2K => "q2_k",
            MvFormat::Q3K => "q3_k",
            MvFormat::Q4K => "q4_k",
            MvFormat::Q5K => "q5_k",
            MvFormat::Q6K => "q6_k",
            MvFormat::F16 => "f16",
            MvFormat::BF16 => "bf16",
            MvFormat::F32 => "f32",
        }
    }
}

impl Kernel {
    /// How many kernels there are ([`Kernel::index`] is below this).
    pub(crate) const COUNT: usize = MvFormat::ALL.len() + 11;

    /// Every kernel, each once.
    pub(crate) fn all() -> impl Iterator<Item = Kernel> {
        MvFormat::ALL.into_iter().map(Kernel::MulMv).chain([
            Kernel::RmsNorm,
            Kernel::Swiglu,
            Kernel::Binary,
            Kernel::Rope,
            Kernel::Softmax,
            Kernel::Attn(KvElem::F16),
            Kernel::Attn(KvElem::F32),
            Kernel::KvStore(KvElem::F16),
            Kernel::KvStore(KvElem::F32),
            Kernel::Geglu,
            Kernel::Copy,
        ])
    }

    /// A dense index for per-kernel tables.
    pub(crate) fn index(self) -> usize {
        let n = MvFormat::ALL.len();
        match self {
            Kernel::MulMv(f) => MvFormat::ALL.iter().position(|&g| g == f).unwrap_or(0),
            Kernel::RmsNorm => n,
            Kernel::Swiglu => n + 1,
            Kernel::Binary => n + 2,
            Kernel::Rope => n + 3,
            Kernel::Softmax => n + 4,
            Kernel::Attn(KvElem::F16) => n + 5,
            Kernel::KvStore(KvElem::F16) => n + 6,
            Kernel::Geglu => n + 7,
            Kernel::Attn(KvElem::F32) => n + 8,
            Kernel::KvStore(KvElem::F32) => n + 9,
            Kernel::Copy => n + 10,
        }
    }

    /// Whether the kernel reduces across a workgroup (and so has a subgroup variant).
    fn reduces(self) -> bool {
        matches!(self, Kernel::MulMv(_) | Kernel::RmsNorm | Kernel::Softmax | Kernel::Attn(_))
    }

    /// The embedded module's name: the `_sg` variant when it reduces and `subgroups` is set.
    pub(crate) fn spirv_name(self, subgroups: bool) -> String {
        let base = match self {
            Kernel::MulMv(f) => format!("mul_mv_{}", f.suffix()),
            Kernel::RmsNorm => "rms_norm".to_string(),
            Kernel::Swiglu => "swiglu".to_string(),
            Kernel::Binary => "binary".to_string(),
            Kernel::Rope => "rope".to_string(),
            Kernel::Softmax => "softmax".to_string(),
            Kernel::Attn(KvElem::F16) => "attn".to_string(),
            Kernel::Attn(KvElem::F32) => "attn_f32".to_string(),
            Kernel::KvStore(KvElem::F16) => "kv_store".to_string(),
            Kernel::KvStore(KvElem::F32) => "kv_store_f32".to_string(),
            Kernel::Geglu => "geglu".to_string(),
            Kernel::Copy => "copy".to_string(),
        };
        if subgroups && self.reduces() {
            base + "_sg"
        } else {
            base
        }
    }
}

/// The SPIR-V words of the embedded module `name`.
pub(crate) fn spirv(name: &str) -> Result<Vec<u32>> {
    let bytes = SHADERS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
        .ok_or_else(|| VulkanError::Shape(format!("no embedded shader {name}")))?;
    ash::util::read_spv(&mut Cursor::new(bytes))
        .map_err(|e| VulkanError::Shape(format!("embedded shader {name} is not SPIR-V: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_has_both_variants_embedded() {
        let mut seen = [false; Kernel::COUNT];
        for k in Kernel::all() {
            assert!(!seen[k.index()]);
            seen[k.index()] = true;
            for sg in [false, true] {
                let words = spirv(&k.spirv_name(sg)).unwrap();
                assert_eq!(words[0], 0x0723_0203, "SPIR-V magic");
            }
        }
        assert!(seen.iter().all(|&s| s));
    }
}
