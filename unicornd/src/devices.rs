//! What compute devices this machine has, as `unicorn status` reports them.
//!
//! The CPU is always used; its entry also says which backend runs which class of operations (the
//! placement, `UNICORN_BACKEND`). Render nodes are found and described, with whether this daemon
//! can open them and whether the Vulkan backend runs on some device (the Vulkan device is not
//! matched to a node). Accel nodes come from the xdna backend's discovery ([`npu`]), which also
//! says plainly why there is no usable NPU; with one, the kernel manifest is loaded and the NPU
//! runtime started, and the classes its kernels serve (the products' classes, `norms` with an
//! rms_norm kernel) are offered to the placement.

use std::path::Path;

use unicorn::protocol::{Device, DeviceKind, NpuStatus};
use unicorn_engine::model::{Backend, Backends, NpuOffer, OpClass};
use unicorn_xdna::discover::Report;
use unicorn_xdna::manifest::Manifest;
use unicorn_xdna::runtime::Runtime;

/// What the NPU side found: discovery, the kernel manifest (when there is a usable NPU), and
/// the offer the placement resolves against (with the runtime that runs the offered classes).
#[derive(Debug)]
pub struct Npu {
    pub report: Report,
    pub manifest: Option<Result<Manifest, String>>,
    pub offer: NpuOffer,
}

/// Discovers the NPU and, when one is usable, loads the kernel manifest and (when `start`: some
/// class is asked to run on xdna) starts the runtime that runs its kernels
/// ([`unicorn_engine::model::discover_npu`]); the offer covers the product classes when the
/// manifest has product kernels the engine runs, and `norms` when it has such rms_norm kernels.
pub fn npu(start: bool) -> Npu {
    let d = unicorn_engine::model::discover_npu(start);
    Npu { report: d.report, manifest: d.manifest, offer: d.offer }
}

/// Classes of `backends` placed on the NPU.
fn on_npu(backends: &Backends) -> Vec<OpClass> {
    OpClass::ALL.into_iter().filter(|&c| backends.placement().get(c) == Backend::Xdna).collect()
}

/// What of the classes `on` runs on the NPU, in words: "the matrix products of a, b and the
/// RMSNorms".
fn npu_ops(on: &[OpClass]) -> String {
    let products: Vec<&str> =
        on.iter().filter(|&&c| c != OpClass::Norms).map(|c| c.name()).collect();
    let mut parts = Vec::new();
    if !products.is_empty() {
        parts.push(format!("the matrix products of {}", products.join(", ")));
    }
    if on.contains(&OpClass::Norms) {
        parts.push("the RMSNorms".to_owned());
    }
    parts.join(" and ")
}

/// A line of what the NPU runtime has done: kernel runs, fallbacks, retired kernels.
pub fn npu_activity(rt: &Runtime) -> String {
    let s = rt.stats();
    let mut line = format!(
        "npu runs: {} completed, {} fell back to the cpu{}",
        s.runs,
        s.fallbacks,
        if rt.device().is_test_double() { " [TEST DOUBLE: nothing computed]" } else { "" }
    );
    let retired = rt.retired();
    if !retired.is_empty() {
        line.push_str(&format!("; retired after repeated failures: {}", retired.join(", ")));
    }
    line
}

impl Npu {
    /// The NPU part of `unicorn status` (the activity line is added per request, see
    /// [`npu_activity`]).
    pub fn status(&self, backends: &Backends) -> NpuStatus {
        let mut details = Vec::new();
        match &self.manifest {
            None => {}
            Some(Ok(m)) => details.push(m.summary()),
            Some(Err(e)) => details.push(format!("kernels: {e}")),
        }
        let on = on_npu(backends);
        let usable = self.report.usable().is_some();
        details.push(if on.is_empty() && !usable {
            "placement: nothing runs on the NPU".to_owned()
        } else if on.is_empty() {
            format!("placement: nothing runs on the NPU ({})", self.offer.reason())
        } else {
            format!(
                "placement: {} run on the NPU where a kernel of their shape is ready, the \
                 others on the cpu ({})",
                npu_ops(&on),
                self.offer.reason()
            )
        });
        NpuStatus { usable, summary: self.report.summary(), details }
    }

    /// One device entry per accel node.
    fn devices(&self, backends: &Backends) -> Vec<Device> {
        let on = on_npu(backends);
        let runs = if on.is_empty() {
            "no operation runs on it".to_owned()
        } else {
            format!("runs {} that have kernels", npu_ops(&on))
        };
        let usable = self.report.usable().map(|n| n.path.clone());
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
                in_use: !on.is_empty() && usable.as_ref() == Some(&n.path),
                detail: match &n.problem {
                    Some(p) => p.clone(),
                    None => format!("amdxdna device answers; {runs}"),
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
    devices.extend(npu.devices(backends));
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
    use std::sync::Arc;
    use unicorn_engine::model::offer_for_manifest;
    use unicorn_xdna::device::Device as XdnaDevice;
    use unicorn_xdna::fake::FakeDevice;
    use unicorn_xdna::manifest::{DType, Kernel, Op, Ready, Shape, WeightLayout};
    use unicorn_xdna::xclbin::{build, Xclbin};

    #[test]
    fn the_cpu_is_always_there_and_in_use() {
        let npu = npu(false);
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

    fn ready(name: &str, op: Op, m: u32, k: u32, dtype: DType) -> Ready {
        ready_eps(name, op, m, k, dtype, None)
    }

    fn ready_eps(name: &str, op: Op, m: u32, k: u32, dtype: DType, eps: Option<f32>) -> Ready {
        Ready {
            kernel: Kernel {
                name: name.into(),
                op,
                xclbin: "build/k.xclbin".into(),
                instructions: "build/k.insts.bin".into(),
                cu: "MLIR_AIE".into(),
                shape: Shape { m, k, n: 1 },
                dtype,
                weights: if op == Op::RmsNorm {
                    WeightLayout::VectorF32
                } else {
                    WeightLayout::RowMajorBf16
                },
                columns: 1,
                source: None,
                eps,
            },
            xclbin: Xclbin::parse(&build::npu_xclbin(&["MLIR_AIE"], 1, 256)).unwrap(),
            instructions: vec![0; 64],
        }
    }

    fn manifest(ready: Vec<Ready>) -> Manifest {
        Manifest { dir: "test".into(), ready, unusable: Vec::new() }
    }

    #[test]
    fn the_offer_covers_the_products_when_the_manifest_has_kernels_the_engine_runs() {
        let fake = Arc::new(FakeDevice::new());
        let open = || Ok(fake.clone() as Arc<dyn XdnaDevice>);
        let m = manifest(vec![
            ready("mv", Op::Matvec, 64, 64, DType::Bf16),
            ready("norm", Op::RmsNorm, 1, 64, DType::Bf16),
        ]);
        let offer = offer_for_manifest(&m, 4, true, open);
        for c in [OpClass::Attention, OpClass::FeedForward, OpClass::Output] {
            assert!(offer.covers(c), "{c:?}: {}", offer.reason());
        }
        // The rms_norm kernel declares no eps, so what it computes is unknown: norms stay off.
        assert!(!offer.covers(OpClass::Norms));
        assert!(
            offer.reason().contains("no rms_norm kernel the engine runs"),
            "{}",
            offer.reason()
        );
        // The runtime made its heap on the device: one live BO, no context yet.
        assert_eq!(fake.live(), (1, 0));
        let backends = Backends::resolve_with_npu(
            "feed_forward=xdna,norms=xdna".parse().unwrap(),
            &offer,
            || Err("no vulkan".into()),
        );
        let npu = Npu {
            report: Report { nodes: Vec::new(), memlock: None },
            manifest: Some(Ok(m)),
            offer,
        };
        let st = npu.status(&backends);
        assert!(
            st.details.iter().any(|l| l.contains("matrix products of feed_forward run on the NPU")),
            "{:?}",
            st.details
        );
        let rt = backends.npu_runtime().unwrap();
        assert_eq!(
            npu_activity(rt),
            "npu runs: 0 completed, 0 fell back to the cpu [TEST DOUBLE: nothing computed]"
        );
        drop((npu, backends));
        assert_eq!(fake.live(), (0, 0));
    }

    #[test]
    fn the_offer_covers_norms_when_an_rms_norm_kernel_declares_its_eps() {
        let fake = Arc::new(FakeDevice::new());
        let open = || Ok(fake.clone() as Arc<dyn XdnaDevice>);
        let m = manifest(vec![ready_eps("norm", Op::RmsNorm, 1, 64, DType::Bf16, Some(1e-5))]);
        let offer = offer_for_manifest(&m, 4, true, open);
        assert!(offer.covers(OpClass::Norms), "{}", offer.reason());
        // No product kernel: the product classes are not offered, and the reason says so.
        for c in [OpClass::Attention, OpClass::FeedForward, OpClass::Output] {
            assert!(!offer.covers(c), "{c:?}");
        }
        assert!(offer.reason().contains("no product kernel"), "{}", offer.reason());
        let backends = Backends::resolve_with_npu(
            "feed_forward=xdna,norms=xdna".parse().unwrap(),
            &offer,
            || Err("no vulkan".into()),
        );
        assert_eq!(backends.placement().get(OpClass::Norms), Backend::Xdna);
        assert_eq!(backends.placement().get(OpClass::FeedForward), Backend::Cpu);
        let npu = Npu {
            report: Report { nodes: Vec::new(), memlock: None },
            manifest: Some(Ok(m)),
            offer,
        };
        let st = npu.status(&backends);
        assert!(
            st.details.iter().any(|l| l.starts_with("placement: the RMSNorms run on the NPU")),
            "{:?}",
            st.details
        );
    }

    #[test]
    fn no_drivable_kernel_or_no_device_means_no_offer() {
        // int8 activations and norms only: nothing the engine runs.
        let m = manifest(vec![
            ready("mv8", Op::Matvec, 64, 64, DType::I8),
            ready("norm", Op::RmsNorm, 1, 64, DType::Bf16),
        ]);
        let offer =
            offer_for_manifest(&m, 4, true, || panic!("opened the device with nothing to run"));
        assert!(OpClass::ALL.iter().all(|&c| !offer.covers(c)));
        assert!(offer.reason().contains("no kernel the engine runs"), "{}", offer.reason());
        let m = manifest(vec![ready("mv", Op::Matvec, 64, 64, DType::Bf16)]);
        let offer = offer_for_manifest(&m, 4, true, || {
            Err(std::io::Error::from_raw_os_error(libc::EACCES))
        });
        assert!(!offer.covers(OpClass::FeedForward));
        assert!(offer.reason().contains("could not be opened"), "{}", offer.reason());
        // Kernels ready but no class asks for xdna: the device is not opened (no heap pinned).
        let offer = offer_for_manifest(&m, 4, false, || panic!("opened the device unasked"));
        assert!(!offer.covers(OpClass::FeedForward));
        assert!(
            offer
                .reason()
                .contains("1 kernel(s) the engine runs are ready, but no operation class")
                && offer.reason().contains("UNICORN_BACKEND"),
            "{}",
            offer.reason()
        );
    }
}
