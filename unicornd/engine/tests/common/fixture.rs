//! The random-weight model fixtures in `tests/fixtures/<name>/` (copied from the project's
//! shared fixtures; see their READMEs): their files, checked against the SHA-256 values their
//! README lists, and the `.npy` arrays of reference logits.

use std::path::PathBuf;

/// A fixture folder.
pub struct Fixture {
    dir: PathBuf,
    /// `(sha256 hex, file name)` from the README's `SHA-256` section.
    sums: Vec<(String, String)>,
}

impl Fixture {
    pub fn open(name: &str) -> Fixture {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        let readme = std::fs::read_to_string(dir.join("README.md"))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join("README.md").display()));
        let section = readme.split("## SHA-256").nth(1).expect("README has a SHA-256 section");
        let sums: Vec<(String, String)> = section
            .lines()
            .filter_map(|l| {
                let (sum, file) = l.trim().split_once("  ")?;
                (sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()))
                    .then(|| (sum.to_owned(), file.trim().to_owned()))
            })
            .collect();
        assert!(!sums.is_empty(), "{name}: no SHA-256 values in the README");
        Fixture { dir, sums }
    }

    /// The path of `file`, after checking its SHA-256 against the README's.
    pub fn verified(&self, file: &str) -> PathBuf {
        let path = self.dir.join(file);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let want = self
            .sums
            .iter()
            .find(|(_, f)| f == file)
            .unwrap_or_else(|| panic!("the README lists no SHA-256 for {file}"));
        assert_eq!(hex(&sha256(&bytes)), want.0, "{file} is not the file the README describes");
        path
    }

    /// The JSON file `file`, verified.
    pub fn json(&self, file: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(self.verified(file)).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// The `.npy` array `file`, verified: its shape and values.
    pub fn npy(&self, file: &str) -> (Vec<usize>, Vec<f32>) {
        parse_npy(&std::fs::read(self.verified(file)).unwrap())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A little-endian float32 C-order `.npy` array (format versions 1 to 3).
pub fn parse_npy(b: &[u8]) -> (Vec<usize>, Vec<f32>) {
    assert_eq!(&b[..6], b"\x93NUMPY", "not a .npy file");
    let (header_len, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => panic!(".npy version {v}"),
    };
    let header = std::str::from_utf8(&b[start..start + header_len]).unwrap();
    assert!(header.contains("'descr': '<f4'"), "not little-endian float32: {header}");
    assert!(header.contains("'fortran_order': False"), "not C order: {header}");
    let shape = header.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).unwrap();
    let shape: Vec<usize> = shape
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data = &b[start + header_len..];
    let values: Vec<f32> =
        data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    assert_eq!(values.len(), shape.iter().product::<usize>(), "data does not match {shape:?}");
    (shape, values)
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}
