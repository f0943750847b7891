//! A weight matrix held in another layout gives its mapped file pages back
//! (`GgufFile::release_pages`): they leave the resident set, and reading them again gives the
//! same bytes. (Its own process: the test reads its mappings' resident sizes.)

use std::io::Write;

use unicorn_engine::gguf::writer::GgufWriter;
use unicorn_engine::gguf::GgufFile;
use unicorn_kernels::GgmlType;

const TENSOR_BYTES: usize = 4 << 20;

fn model_bytes() -> Vec<u8> {
    let data: Vec<u8> = (0..TENSOR_BYTES).map(|i| (i * 31 % 251) as u8).collect();
    let mut w = GgufWriter::new();
    w.tensor("w", GgmlType::F32, &[(TENSOR_BYTES / 4) as u64], data);
    w.to_bytes()
}

/// Resident KiB of this process's mappings of `path` (`/proc/self/smaps`).
fn resident_kib(path: &std::path::Path) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
    let name = path.to_str().unwrap();
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            inside = line.trim_end().ends_with(name);
        } else if inside {
            if let Some(v) = line.strip_prefix("Rss:") {
                kib += v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap();
            }
        }
    }
    kib
}

fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |h, &x| h.wrapping_mul(1_000_003).wrapping_add(u64::from(x)))
}

#[test]
fn released_pages_leave_the_resident_set_and_read_back_the_same() {
    let bytes = model_bytes();
    // Under the target directory: a disk filesystem (a tmpfs file's pages are never released).
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("unicorn-page-release-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    std::fs::File::create(&path).unwrap().write_all(&bytes).unwrap();

    let file = GgufFile::open(&path).unwrap();
    let t = file.tensor("w").unwrap();
    let start = t.data.as_ptr() as usize - file.bytes().as_ptr() as usize;
    let range = start..start + t.data.len();
    let want = checksum(&bytes[range.clone()]);
    assert_eq!(checksum(&file.bytes()[range.clone()]), want);
    let before = resident_kib(&path);
    assert!(before >= 4000, "the read tensor is resident: {before} KiB");

    file.release_pages(range.clone());
    let after = resident_kib(&path);
    assert!(after + 3900 <= before, "released: {before} KiB -> {after} KiB");

    assert_eq!(checksum(&file.bytes()[range.clone()]), want, "the same bytes read back");
    assert!(resident_kib(&path) >= 4000);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_file_held_in_memory_keeps_its_bytes() {
    let bytes = model_bytes();
    let file = GgufFile::from_bytes(bytes.clone()).unwrap();
    file.release_pages(0..bytes.len());
    assert_eq!(file.bytes(), &bytes[..]);
}

#[test]
fn only_a_mapped_file_gives_its_pages_back() {
    let bytes = model_bytes();
    assert!(!GgufFile::from_bytes(bytes.clone()).unwrap().releases_pages());
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("unicorn-page-copy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    std::fs::File::create(&path).unwrap().write_all(&bytes).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    assert!(GgufFile::from_file(&file).unwrap().releases_pages());
    // SAFETY: the test's own file, which nothing changes while it is mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let copy = GgufFile::from_memfd(map).unwrap();
    assert!(!copy.releases_pages());
    let t = copy.tensor("w").unwrap();
    let start = t.data.as_ptr() as usize - copy.bytes().as_ptr() as usize;
    let sum = checksum(t.data);
    copy.release_pages(start..start + t.data.len());
    assert!(resident_kib(&path) >= 4000, "a copy keeps its pages");
    assert_eq!(checksum(t.data), sum);
    assert_eq!(copy.bytes(), &bytes[..]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_memfd_is_held_in_memory_and_a_disk_file_is_not() {
    let name = std::ffi::CString::new("unicorn-test").unwrap();
    // SAFETY: a valid C string and flags; the descriptor is checked and owned right after.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let memfd = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    assert!(unicorn_engine::gguf::held_in_memory(&memfd));
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("unicorn-held-{}", std::process::id()));
    let disk = std::fs::File::create(&path).unwrap();
    let on_disk = !unicorn_engine::gguf::held_in_memory(&disk);
    std::fs::remove_file(&path).unwrap();
    assert!(on_disk, "{} is on a disk filesystem", path.display());
}
