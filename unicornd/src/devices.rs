//! What compute devices this machine has, as `unicorn status` reports them.
//!
//! The CPU is always used. Render nodes and accel nodes are found and described, with whether
//! this daemon can open them; running jobs on them belongs to the Vulkan and xdna backends,
//! and until those exist the devices are listed as not in use, with the reason.

use std::path::Path;

use unicorn::protocol::{Device, DeviceKind};

/// Every device found, the CPU first.
pub fn discover() -> Vec<Device> {
    let mut devices = vec![cpu()];
    devices.extend(nodes("/dev/dri", "renderD", DeviceKind::Gpu, "drm"));
    devices.extend(nodes("/dev/accel", "accel", DeviceKind::Npu, "accel"));
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
fn nodes(dir: &str, prefix: &str, kind: DeviceKind, class: &str) -> Vec<Device> {
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
            let backend = match kind {
                DeviceKind::Gpu => "no Vulkan backend in this version",
                DeviceKind::Npu => "no NPU backend in this version",
                DeviceKind::Cpu => "",
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
        let d = discover();
        assert_eq!(d[0].kind, DeviceKind::Cpu);
        assert!(d[0].in_use);
        assert!(d[0].detail.contains("hardware threads"));
        assert!(d[1..].iter().all(|x| x.kind != DeviceKind::Cpu && !x.in_use));
    }
}
