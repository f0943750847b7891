//! What compute devices this machine has, as `unicorn status` reports them.
//!
//! The CPU is always used; its entry also says which backend runs which class of operations (the
//! placement, `UNICORN_BACKEND`). Render nodes are found and described, with whether this daemon
//! can open them and whether the Vulkan backend runs on some device (the Vulkan device is not
//! matched to a node). Accel nodes come from the xdna backend's discovery ([`npu`]), which also
//! says plainly why there is no usable NPU.

use std::collections::BTreeSet;
use std::path::Path;

use unicorn::protocol::{Device, DeviceKind, NpuStatus};
use unicorn_engine::model::{Backends, NpuOffer, OpClass};
use unicorn_xdna::discover::Report;
use unicorn_xdna::manifest::{Manifest, Op};

/// What the NPU side found: discovery, the kernel manifest (when there is a usable NPU), and
/// the offer the placement resolves against.
#[derive(Debug)]
pub struct Npu {
    pub report: Report,
    pub manifest: Option<Result<Manifest, String>>,
    pub offer: NpuOffer,
}

/// The classes a manifest's operations cover: the products need matvec (decode), the norms
/// rms_norm.
pub fn npu_classes(ops: &BTreeSet<Op>) -> Vec<OpClass> {
    let mut c = Vec::new();
    if ops.contains(&Op::Matvec) {
        c.extend([OpClass::Attention, OpClass::FeedForward, OpClass::Output]);
    }
    if ops.contains(&Op::RmsNorm) {
        c.push(OpClass::Norms);
    }
    c
}

/// Discovers the NPU and loads the kernel manifest when one is usable. No class is offered to
/// the placement yet: the engine has no operator path that runs manifest kernels in a forward
/// pass, so the offer says so instead of pretending.
pub fn npu() -> Npu {
    let report = unicorn_xdna::discover::discover();
    let Some(_node) = report.usable() else {
        let offer = NpuOffer::none(report.summary());
        return Npu { report, manifest: None, offer };
    };
    let manifest = match Manifest::default_dir() {
        None => Err(format!(
            "no kernel manifest (set {} or install {})",
            unicorn_xdna::manifest::DIR_ENV,
            unicorn_xdna::manifest::INSTALLED_DIR
        )),
        Some(dir) => Manifest::load(&dir).map_err(|e| e.to_string()),
    };
    let covered = match &manifest {
        Ok(m) => npu_classes(&m.ops()),
        Err(_) => Vec::new(),
    };
    let names: Vec<&str> = covered.iter().map(|c| c.name()).collect();
    let offer = NpuOffer::none(if covered.is_empty() {
        "the NPU has no usable kernels".to_owned()
    } else {
        format!(
            "kernels for {} are loaded, but the engine cannot run NPU kernels in a forward pass \
             yet",
            names.join(", ")
        )
    });
    Npu { report, manifest: Some(manifest), offer }
}

impl Npu {
    /// The NPU part of `unicorn status`.
    pub fn status(&self, backends: &Backends) -> NpuStatus {
        let mut details = Vec::new();
        match &self.manifest {
            None => {}
            Some(Ok(m)) => details.push(m.summary()),
            Some(Err(e)) => details.push(format!("kernels: {e}")),
        }
        let on_npu = unicorn_engine::model::OpClass::ALL
            .into_iter()
            .filter(|&c| backends.placement().get(c) == unicorn_engine::model::Backend::Xdna)
            .count();
        let usable = self.report.usable().is_some();
        details.push(if on_npu == 0 && !usable {
            "placement: nothing runs on the NPU".to_owned()
        } else if on_npu == 0 {
            format!("placement: nothing runs on the NPU ({})", self.offer.reason())
        } else {
            format!("placement: {on_npu} operation class(es) on the NPU")
        });
        NpuStatus { usable, summary: self.report.summary(), details }
    }

    /// One device entry per accel node.
    fn devices(&self) -> Vec<Device> {
        self.report
            .nodes
            .iter()
            .map(|n| Device {
                kind: DeviceKind::Npu,
                name: format!(
                    "{} ({})",
                    n.path.display(),
                    n.driver.as_deref().unwrap_or("unknown driver")
                ),
                in_use: false,
                detail: match &n.problem {
                    Some(p) => p.clone(),
                    None => "amdxdna device answers; no operation runs on it yet".into(),
                },
            })
            .collect()
    }
}

/// Every device found, the CPU first, described with the placement `backends`.
pub fn discover(backends: &Backends, npu: &Npu) -> Vec<Device> {
    let mut cpu = cpu();
    cpu.detail.push_str(&format!("; placement: {}", backends.describe()));
    let gpu = match backends.vulkan_device() {
        Some(name) => format!("the Vulkan backend runs on {name}"),
        None => "the Vulkan backend is not used (placement)".to_owned(),
    };
    let mut devices = vec![cpu];
    devices.extend(nodes("/dev/dri", "renderD", DeviceKind::Gpu, "drm", &gpu));
    devices.extend(npu.devices());
    devices
}

fn cpu() -> Device {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim())
        })
        .unwrap_or(std::env::consts::ARCH)
        .to_owned();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut features = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            features.push("avx2+fma");
        }
        if std::arch::is_x86_feature_detected!("f16c") {
            features.push("f16c");
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            features.push("avx512f");
        }
        if std::arch::is_x86_feature_detected!("avx512vnni") {
            features.push("avx512vnni");
        }
    }
    let features = if features.is_empty() { "scalar".to_owned() } else { features.join(" ") };
    Device {
        kind: DeviceKind::Cpu,
        name: model,
        in_use: true,
        detail: format!("{threads} hardware threads; SIMD: {features}"),
    }
}

/// Device nodes `dir/prefixN`, with the driver sysfs names and whether we may open them.
fn nodes(dir: &str, prefix: &str, kind: DeviceKind, class: &str, backend: &str) -> Vec<Device> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let path = Path::new(dir).join(&name);
            let driver = std::fs::read_link(format!("/sys/class/{class}/{name}/device/driver"))
                .ok()
                .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "unknown driver".into());
            let access = match nix::unistd::access(
                &path,
                nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK,
            ) {
                Ok(()) => "accessible".to_owned(),
                Err(e) => format!("not accessible to this daemon ({e})"),
            };
            Device {
                kind,
                name: format!("{} ({driver})", path.display()),
                in_use: false,
                detail: format!("{access}; {backend}"),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_always_there_and_in_use() {
        let npu = npu();
        let d = discover(&Backends::cpu(), &npu);
        assert_eq!(d[0].kind, DeviceKind::Cpu);
        assert!(d[0].in_use);
        assert!(d[0].detail.contains("hardware threads"));
        assert!(d[0]
            .detail
            .contains("placement: attention=cpu,feed_forward=cpu,output=cpu,norms=cpu"));
        assert!(d[1..].iter().all(|x| x.kind != DeviceKind::Cpu && !x.in_use));
        // Whatever this machine has, the NPU status says something and the offer is empty.
        let st = npu.status(&Backends::cpu());
        assert!(!st.summary.is_empty());
        assert!(st.details.iter().any(|l| l.starts_with("placement: nothing runs on the NPU")));
        assert_eq!(st.usable, npu.report.usable().is_some());
        for c in OpClass::ALL {
            assert!(!npu.offer.covers(c));
        }
    }

    #[test]
    fn manifest_ops_map_to_classes() {
        assert!(npu_classes(&BTreeSet::new()).is_empty());
        let c = npu_classes(&[Op::RmsNorm, Op::Softmax].into_iter().collect());
        assert_eq!(c, vec![OpClass::Norms]);
        assert_eq!(npu_classes(&[Op::Matvec].into_iter().collect()).len(), 3);
    }
}
