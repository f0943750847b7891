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

/// SHA-256 (FIPS 180-4).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh.wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            (hh, g, f, e, d, c, b, a) = (g, f, e, d.wrapping_add(t1), c, b, a, t1.wrapping_add(t2));
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (o, x) in out.chunks_exact_mut(4).zip(h) {
        o.copy_from_slice(&x.to_be_bytes());
    }
    out
}
