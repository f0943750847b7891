//! Finding the NPU: accel nodes whose driver is amdxdna, what the driver reports about the AIE
//! array, which optional ioctls the running kernel has, and why an NPU cannot be used (no node,
//! another driver, no access, the locked-memory limit). [`Report`]'s text is what
//! `unicorn status` prints.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::device::{AccelDevice, Device};
use crate::sys::{self, AieMetadata, ClockMetadata, FirmwareVersion};

/// The locked-memory limit below which the NPU is reported unusable: the device heap (48 MiB)
/// plus room for command and weight BOs.
pub const MIN_MEMLOCK: u64 = 64 << 20;

/// What the driver reported about one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub aie: AieMetadata,
    pub firmware: Option<FirmwareVersion>,
    pub clocks: Option<ClockMetadata>,
    /// GET_ARRAY present (kernels from 2025 on, and the out-of-tree driver).
    pub get_array: bool,
    /// True when the answers came from the test double.
    pub test_double: bool,
}

impl DeviceInfo {
    /// Tiles of all core rows of `cols` columns (CREATE_HWCTX's `num_tiles`).
    pub fn tiles(&self, cols: u16) -> u32 {
        u32::from(cols) * u32::from(self.aie.core.row_count)
    }
}

/// Queries `dev` with GET_INFO (AIE metadata is required; firmware version and clocks are
/// reported when the driver answers) and probes GET_ARRAY.
pub fn query(dev: &dyn Device) -> Result<DeviceInfo, String> {
    let mut buf = [0u8; 64];
    let n = dev
        .get_info(sys::query::AIE_METADATA, &mut buf)
        .map_err(|e| format!("GET_INFO(AIE_METADATA): {e}"))?;
    if (n as usize) < size_of::<AieMetadata>() {
        return Err(format!("GET_INFO(AIE_METADATA) returned {n} bytes"));
    }
    let aie: AieMetadata = sys::pod_from_bytes(&buf);
    if aie.cols == 0 || aie.core.row_count == 0 {
        return Err(format!(
            "the driver reports {} columns of {} core rows",
            aie.cols, aie.core.row_count
        ));
    }
    let mut fw = [0u8; 16];
    let firmware =
        dev.get_info(sys::query::FIRMWARE_VERSION, &mut fw).ok().map(|_| sys::pod_from_bytes(&fw));
    let mut ck = [0u8; 48];
    let clocks =
        dev.get_info(sys::query::CLOCK_METADATA, &mut ck).ok().map(|_| sys::pod_from_bytes(&ck));
    let mut arr = [0u8; 4096];
    let get_array = dev.get_array(sys::ARRAY_HW_CONTEXT_ALL, 4096, &mut arr).is_ok();
    Ok(DeviceInfo { aie, firmware, clocks, get_array, test_double: dev.is_test_double() })
}

/// One accel node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub path: PathBuf,
    /// The sysfs driver name (`None`: the link could not be read).
    pub driver: Option<String>,
    /// Why this node is not usable (empty: usable).
    pub problem: Option<String>,
    pub info: Option<DeviceInfo>,
}

/// Everything discovery found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub nodes: Vec<Node>,
    /// Soft RLIMIT_MEMLOCK (`None`: unlimited).
    pub memlock: Option<u64>,
}

impl Report {
    /// The first usable amdxdna node.
    pub fn usable(&self) -> Option<&Node> {
        if self.memlock_too_low() {
            return None;
        }
        self.nodes.iter().find(|n| n.problem.is_none() && n.info.is_some())
    }

    fn memlock_too_low(&self) -> bool {
        self.memlock.is_some_and(|m| m < MIN_MEMLOCK)
    }

    fn xdna_nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.driver.as_deref() == Some("amdxdna"))
    }

    /// One line: the NPU, or plainly why there is none.
    pub fn summary(&self) -> String {
        if let Some(n) = self.usable() {
            let i = n.info.as_ref().expect("usable nodes have info");
            let fw = i
                .firmware
                .map(|f| format!("firmware {}.{}.{}.{}", f.major, f.minor, f.patch, f.build))
                .unwrap_or_else(|| "firmware version not reported".into());
            let clk = i
                .clocks
                .map(|c| format!("H clock {} MHz", c.h_clock.freq_mhz))
                .unwrap_or_else(|| "clocks not reported".into());
            let double = if i.test_double { " [TEST DOUBLE]" } else { "" };
            return format!(
                "NPU {} (amdxdna){double}: AIE {}.{}, {} columns x {} rows ({} core rows), {fw}, \
                 {clk}; GET_ARRAY {}",
                n.path.display(),
                i.aie.version.major,
                i.aie.version.minor,
                i.aie.cols,
                i.aie.rows,
                i.aie.core.row_count,
                if i.get_array { "present" } else { "absent (older kernel)" },
            );
        }
        if self.nodes.is_empty() {
            return "no NPU: no /dev/accel node (no accel driver loaded, or no NPU in this machine)"
                .into();
        }
        let mut xdna = self.xdna_nodes().peekable();
        if xdna.peek().is_none() {
            let others: Vec<String> = self
                .nodes
                .iter()
                .map(|n| {
                    format!(
                        "{} is driven by {}",
                        n.path.display(),
                        n.driver.as_deref().unwrap_or("an unknown driver")
                    )
                })
                .collect();
            return format!("no NPU: no amdxdna accel node ({})", others.join(", "));
        }
        let problems: Vec<String> = xdna
            .map(|n| match &n.problem {
                Some(p) => format!("{}: {p}", n.path.display()),
                None => format!("{}: usable", n.path.display()),
            })
            .collect();
        let mut s = format!("no NPU usable: {}", problems.join("; "));
        if self.memlock_too_low() {
            s.push_str(&format!(
                "; RLIMIT_MEMLOCK is {} KiB, below the {} MiB the NPU needs (raise it, e.g. \
                 LimitMEMLOCK=infinity in the service)",
                self.memlock.unwrap_or(0) / 1024,
                MIN_MEMLOCK >> 20
            ));
        }
        s
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}

/// Scans `/dev/accel` with drivers from `/sys/class/accel`.
pub fn discover() -> Report {
    discover_in(Path::new("/dev/accel"), Path::new("/sys/class/accel"), &|p| {
        AccelDevice::open(p).map(|d| Box::new(d) as Box<dyn Device>)
    })
}

/// Opens a node; the real one is [`AccelDevice::open`].
pub type Opener<'a> = dyn Fn(&Path) -> std::io::Result<Box<dyn Device>> + 'a;

/// [`discover`] over other directories and another way to open nodes (tests).
pub fn discover_in(dev_dir: &Path, sys_dir: &Path, open: &Opener<'_>) -> Report {
    let memlock = sys::memlock_limit().map(|(soft, _)| soft).unwrap_or(Some(0));
    let mut names: Vec<String> = std::fs::read_dir(dev_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("accel"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let nodes = names
        .into_iter()
        .map(|name| {
            let path = dev_dir.join(&name);
            let driver = std::fs::read_link(sys_dir.join(&name).join("device/driver"))
                .ok()
                .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()));
            if driver.as_deref() != Some("amdxdna") {
                return Node { path, driver, problem: Some("not amdxdna".into()), info: None };
            }
            let (problem, info) = match open(&path) {
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => (
                    Some(format!(
                        "not accessible to this process ({e}); the daemon needs to be in the \
                         node's group (udev rule)"
                    )),
                    None,
                ),
                Err(e) => (Some(format!("cannot be opened ({e})")), None),
                Ok(dev) => match query(dev.as_ref()) {
                    Ok(i) => (None, Some(i)),
                    Err(e) => (Some(format!("the driver did not answer: {e}")), None),
                },
            };
            Node { path, driver, problem, info }
        })
        .collect();
    Report { nodes, memlock }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeDevice;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("unicorn-xdna-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn node(dev: &Path, sys: &Path, name: &str, driver: &str) {
        std::fs::write(dev.join(name), b"").unwrap();
        let d = sys.join(name).join("device");
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::symlink(format!("../../../bus/pci/drivers/{driver}"), d.join("driver"))
            .unwrap();
    }

    fn fake_open(_: &Path) -> std::io::Result<Box<dyn Device>> {
        Ok(Box::new(FakeDevice::new()))
    }

    #[test]
    fn no_node_says_so() {
        let d = tmp("none");
        let r = discover_in(&d.join("missing"), &d, &fake_open);
        assert!(r.nodes.is_empty());
        assert!(r.usable().is_none());
        assert!(r.summary().starts_with("no NPU: no /dev/accel node"), "{r}");
    }

    #[test]
    fn another_driver_is_named() {
        let (dev, sys) = (tmp("other-dev"), tmp("other-sys"));
        node(&dev, &sys, "accel0", "ivpu");
        let r = discover_in(&dev, &sys, &fake_open);
        assert_eq!(r.nodes[0].driver.as_deref(), Some("ivpu"));
        assert!(r.summary().contains("accel0 is driven by ivpu"), "{r}");
        assert!(r.usable().is_none());
    }

    #[test]
    fn no_access_is_reported() {
        let (dev, sys) = (tmp("acc-dev"), tmp("acc-sys"));
        node(&dev, &sys, "accel0", "amdxdna");
        let r = discover_in(&dev, &sys, &|_| Err(std::io::Error::from_raw_os_error(libc::EACCES)));
        assert!(r.usable().is_none());
        assert!(r.summary().contains("not accessible"), "{r}");
    }

    #[test]
    fn an_amdxdna_node_is_queried_and_a_test_double_is_marked() {
        let (dev, sys) = (tmp("ok-dev"), tmp("ok-sys"));
        node(&dev, &sys, "accel0", "amdxdna");
        let mut r = discover_in(&dev, &sys, &fake_open);
        r.memlock = None;
        let n = r.usable().expect("usable");
        let i = n.info.as_ref().unwrap();
        assert_eq!((i.aie.cols, i.aie.core.row_count), (5, 4));
        assert_eq!(i.tiles(4), 16);
        assert!(!i.get_array);
        let s = r.summary();
        assert!(s.contains("[TEST DOUBLE]") && s.contains("5 columns x 6 rows"), "{s}");
        // The locked-memory limit makes it unusable, and says why.
        r.memlock = Some(8 << 20);
        assert!(r.usable().is_none());
        assert!(r.summary().contains("RLIMIT_MEMLOCK is 8192 KiB"), "{}", r.summary());
    }

    #[test]
    fn get_array_is_probed() {
        let i = query(&FakeDevice::new().with_get_array()).unwrap();
        assert!(i.get_array && i.test_double);
        assert_eq!(i.firmware, Some(FirmwareVersion::default()));
    }
}
