//! What compute devices this machine has, as `unicorn status` reports them.
//!
//! The CPU is always used; its entry also says which backend runs which class of operations (the
//! placement, `UNICORN_BACKEND`). Render nodes and accel nodes are found and described, with
//! whether this daemon can open them and whether the Vulkan backend runs on some device (the
//! Vulkan device is not matched to a node); the xdna backend does not exist yet.

use std::path::Path;

use unicorn::protocol::{Device, DeviceKind};
use unicorn_engine::model::Backends;

/// Every device found, the CPU first, described with the placement `backends`.
pub fn discover(backends: &Backends) -> Vec<Device> {
    let mut cpu = cpu();
    cpu.detail.push_str(&format!("; placement: {}", backends.describe()));
    let gpu = match backends.vulkan_device() {
        Some(name) => format!("the Vulkan backend runs on {name}"),
        None => "the Vulkan backend is not used (placement)".to_owned(),
    };
    let mut devices = vec![cpu];
    devices.extend(nodes("/dev/dri", "renderD", DeviceKind::Gpu, "drm", &gpu));
    devices.extend(nodes(
        "/dev/accel",
        "accel",
        DeviceKind::Npu,
        "accel",
        "no NPU backend in this version",
    ));
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
        let d = discover(&Backends::cpu());
        assert_eq!(d[0].kind, DeviceKind::Cpu);
        assert!(d[0].in_use);
        assert!(d[0].detail.contains("hardware threads"));
        assert!(d[0]
            .detail
            .contains("placement: attention=cpu,feed_forward=cpu,output=cpu,norms=cpu"));
        assert!(d[1..].iter().all(|x| x.kind != DeviceKind::Cpu && !x.in_use));
    }
}
