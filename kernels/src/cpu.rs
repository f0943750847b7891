//! Instruction-set selection: which kernel family runs, detected once per process.
//!
//! An [`Isa`] value other than [`Isa::scalar`] can only be obtained from detection, so holding one
//! proves the CPU supports it; the SIMD kernels rely on that for soundness.
//!
//! `UNICORN_CPU=scalar|avx2|avx512` lowers the choice for testing and benchmarking. A request for
//! more than the CPU supports is clamped to what it does support.

use std::fmt;
use std::sync::OnceLock;

/// A kernel family the process may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IsaLevel {
    /// Portable Rust; the reference every other path is tested against.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL (VNNI noted separately). No AVX-512 kernels exist yet: this level runs the
    /// AVX2 kernels until a machine with AVX-512 is available to test them on.
    Avx512,
}

impl IsaLevel {
    /// The name `UNICORN_CPU` accepts for this level.
    pub const fn name(self) -> &'static str {
        match self {
            IsaLevel::Scalar => "scalar",
            IsaLevel::Avx2 => "avx2",
            IsaLevel::Avx512 => "avx512",
        }
    }

    fn parse(s: &str) -> Option<IsaLevel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(IsaLevel::Scalar),
            "avx2" => Some(IsaLevel::Avx2),
            "avx512" => Some(IsaLevel::Avx512),
            _ => None,
        }
    }
}

/// A supported instruction-set level. Obtainable only through detection (or [`Isa::scalar`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Isa {
    level: IsaLevel,
    vnni: bool,
}

impl fmt::Debug for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Isa({}{})", self.level.name(), if self.vnni { "+vnni" } else { "" })
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.level.name())
    }
}

static CURRENT: OnceLock<Isa> = OnceLock::new();

impl Isa {
    /// The portable reference path, always available.
    pub const fn scalar() -> Isa {
        Isa { level: IsaLevel::Scalar, vnni: false }
    }

    /// The best level this CPU supports, ignoring `UNICORN_CPU`.
    pub fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl");
            let vnni = avx512 && is_x86_feature_detected!("avx512vnni");
            if avx512 {
                return Isa { level: IsaLevel::Avx512, vnni };
            }
            if avx2 {
                return Isa { level: IsaLevel::Avx2, vnni: false };
            }
        }
        Isa::scalar()
    }

    /// The level the kernels use: detected once, lowered by `UNICORN_CPU` when set.
    pub fn current() -> Isa {
        *CURRENT.get_or_init(|| {
            let best = Isa::best();
            match std::env::var("UNICORN_CPU") {
                Ok(v) => match IsaLevel::parse(&v) {
                    Some(want) => best.clamp_to(want),
                    None => {
                        eprintln!(
                            "unicorn-kernels: ignoring UNICORN_CPU={v:?} (expected scalar, avx2 or avx512)"
                        );
                        best
                    }
                },
                Err(_) => best,
            }
        })
    }

    /// This level, or `want` if that is lower.
    pub fn clamp_to(self, want: IsaLevel) -> Isa {
        if want >= self.level {
            self
        } else {
            Isa { level: want, vnni: false }
        }
    }

    /// Every level this CPU supports, lowest first. Tests run each against the scalar reference.
    pub fn all_supported() -> Vec<Isa> {
        let best = Isa::best();
        [IsaLevel::Scalar, IsaLevel::Avx2, IsaLevel::Avx512]
            .into_iter()
            .filter(|l| *l <= best.level)
            .map(|l| best.clamp_to(l))
            .collect()
    }

    /// The level.
    pub const fn level(self) -> IsaLevel {
        self.level
    }

    /// Whether AVX-512 VNNI is present (reported for diagnostics; no kernel uses it yet).
    pub const fn has_vnni(self) -> bool {
        self.vnni
    }

    /// Whether the AVX2 + FMA + F16C kernels may run. True at AVX-512 too: those CPUs have AVX2
    /// and the AVX2 kernels serve them until AVX-512 kernels are written.
    pub(crate) const fn avx2(self) -> bool {
        matches!(self.level, IsaLevel::Avx2 | IsaLevel::Avx512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_clamp() {
        assert_eq!(IsaLevel::parse(" AVX2 "), Some(IsaLevel::Avx2));
        assert_eq!(IsaLevel::parse("sse"), None);
        let best = Isa::best();
        assert_eq!(best.clamp_to(IsaLevel::Scalar), Isa::scalar());
        // Asking for more than the CPU has never raises the level.
        assert_eq!(best.clamp_to(IsaLevel::Avx512).level(), best.level());
        let all = Isa::all_supported();
        assert_eq!(all[0], Isa::scalar());
        assert_eq!(*all.last().unwrap(), best);
    }
}
