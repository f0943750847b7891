//! The xclbin parser on files the tests build: well-formed ones parse back; truncated,
//! overlapping, out-of-bounds and huge-count ones are errors, never panics; random mutations
//! keep the invariants (the same check the fuzz target runs, `xclbin::check_invariants`).

use proptest::prelude::*;
use unicorn_xdna::xclbin::{build, check_invariants, kind, Xclbin, XclbinError, SECTIONS_OFFSET};

const LENGTH_AT: usize = 304;
const NSECT_AT: usize = 304 + 144;

fn good() -> Vec<u8> {
    build::npu_xclbin(&["mv", "norm", "rope"], 4, 2048)
}

fn put_u32(d: &mut [u8], at: usize, v: u32) {
    d[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(d: &mut [u8], at: usize, v: u64) {
    d[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Byte offset of section `i`'s header field at `field` (0 kind, 24 offset, 32 size).
fn sect(i: usize, field: usize) -> usize {
    SECTIONS_OFFSET + 40 * i + field
}

fn section_offset(d: &[u8], i: usize) -> usize {
    u64::from_le_bytes(d[sect(i, 24)..sect(i, 24) + 8].try_into().unwrap()) as usize
}

#[test]
fn well_formed_files_parse() {
    let d = good();
    let x = Xclbin::parse(&d).unwrap();
    assert_eq!(x.compute_units().unwrap().len(), 3);
    // Trailing bytes after the header's length are ignored.
    let mut longer = d.clone();
    longer.extend([0xee; 100]);
    assert_eq!(Xclbin::parse(&longer).unwrap(), x);
    // A file with no sections is valid, but has no compute units.
    let empty = build::xclbin([0; 16], &[]);
    let e = Xclbin::parse(&empty).unwrap();
    assert!(matches!(e.compute_units(), Err(XclbinError::Missing(_))));
}

#[test]
fn every_truncation_is_an_error() {
    let d = good();
    for cut in 0..d.len() {
        assert!(Xclbin::parse(&d[..cut]).is_err(), "prefix of {cut} bytes parsed");
    }
}

#[test]
fn header_corruptions() {
    let d = good();
    let mut bad = d.clone();
    bad[0] = b'X';
    assert_eq!(Xclbin::parse(&bad), Err(XclbinError::Magic));
    let mut bad = d.clone();
    put_u64(&mut bad, LENGTH_AT, d.len() as u64 + 1);
    assert!(matches!(Xclbin::parse(&bad), Err(XclbinError::Length { .. })));
    let mut bad = d.clone();
    put_u32(&mut bad, NSECT_AT, 0x10001);
    assert_eq!(Xclbin::parse(&bad), Err(XclbinError::TooManySections(0x10001)));
    let mut bad = d.clone();
    put_u32(&mut bad, NSECT_AT, 0x10000);
    assert!(matches!(Xclbin::parse(&bad), Err(XclbinError::SectionTable { .. })));
}

#[test]
fn section_corruptions() {
    let d = good();
    // Offset past the end, and an offset + size that overflows.
    let mut bad = d.clone();
    put_u64(&mut bad, sect(1, 24), d.len() as u64);
    assert!(matches!(Xclbin::parse(&bad), Err(XclbinError::SectionBounds { index: 1, .. })));
    let mut bad = d.clone();
    put_u64(&mut bad, sect(0, 32), u64::MAX - 4);
    assert!(matches!(Xclbin::parse(&bad), Err(XclbinError::SectionBounds { index: 0, .. })));
    // Misaligned.
    let mut bad = d.clone();
    put_u64(&mut bad, sect(1, 24), section_offset(&d, 1) as u64 + 4);
    put_u64(&mut bad, sect(1, 32), 8);
    assert!(matches!(Xclbin::parse(&bad), Err(XclbinError::SectionAlign { index: 1, .. })));
    // Overlapping: section 1 starts inside section 0.
    let mut bad = d.clone();
    put_u64(&mut bad, sect(1, 24), section_offset(&d, 0) as u64 + 8);
    assert!(matches!(Xclbin::parse(&bad), Err(XclbinError::Overlap { a: 0, b: 1 })));
    // Over the section table.
    let mut bad = d.clone();
    put_u64(&mut bad, sect(0, 24), SECTIONS_OFFSET as u64);
    assert!(matches!(Xclbin::parse(&bad), Err(XclbinError::OverlapsHeader { index: 0 })));
    // Two IP_LAYOUT sections.
    let mut bad = d.clone();
    put_u32(&mut bad, sect(1, 0), kind::IP_LAYOUT);
    assert!(matches!(Xclbin::parse(&bad), Err(XclbinError::Duplicate(2, 8))));
}

#[test]
fn payload_corruptions() {
    let d = good();
    let ip = section_offset(&d, 0);
    let part = section_offset(&d, 1);
    // A huge IP_LAYOUT count, and a negative one.
    for count in [0x7fff_ffffu32, 0xffff_ffff, 1000] {
        let mut bad = d.clone();
        put_u32(&mut bad, ip, count);
        assert!(
            matches!(Xclbin::parse(&bad), Err(XclbinError::Section { what: "IP_LAYOUT", .. })),
            "{count}"
        );
    }
    // AIE_PARTITION: a huge PDI count, a PDI array past the section, a name offset past it.
    let mut bad = d.clone();
    put_u32(&mut bad, part + 120, u32::MAX);
    assert!(matches!(Xclbin::parse(&bad), Err(XclbinError::Section { what: "AIE_PARTITION", .. })));
    let mut bad = d.clone();
    put_u32(&mut bad, part + 124, 1 << 30);
    assert!(Xclbin::parse(&bad).is_err());
    let mut bad = d.clone();
    put_u32(&mut bad, part + 4, u32::MAX);
    assert!(Xclbin::parse(&bad).is_err());
    // A CU whose kernel id no PDI lists parses, but names the missing PDI.
    let mut bad = d.clone();
    put_u32(&mut bad, ip + 8 + 4, 0x0fff_0001);
    let x = Xclbin::parse(&bad).unwrap();
    assert!(matches!(x.compute_units(), Err(XclbinError::NoPdiForCu { kernel_id: 0xfff, .. })));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Random byte writes anywhere in a good file: a value or an error, never a panic, and
    /// parsed files keep the invariants.
    #[test]
    fn mutations_never_panic(writes in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16)) {
        let mut d = good();
        let n = d.len();
        for (i, v) in writes {
            d[i.index(n)] = v;
        }
        check_invariants(&d);
    }

    /// Random 32-bit writes into the header and section table (where the offsets live).
    #[test]
    fn header_word_mutations_never_panic(at in 0usize..(SECTIONS_OFFSET + 80) / 4, v in any::<u32>()) {
        let mut d = good();
        put_u32(&mut d, at * 4, v);
        check_invariants(&d);
    }

    #[test]
    fn arbitrary_bytes_never_panic(mut d in prop::collection::vec(any::<u8>(), 0..2048)) {
        if d.len() >= 8 {
            d[..8].copy_from_slice(unicorn_xdna::xclbin::MAGIC);
        }
        check_invariants(&d);
    }
}

/// The fuzz target's corpus (fuzz/corpus/xclbin_parse, written by `fuzz/seed`) and its
/// checked-in seeds run here as a plain test, so CI runs them without nightly or cargo-fuzz.
#[test]
fn fuzz_seeds_and_corpus_run_as_a_test() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let mut n = 0;
    for sub in
        [dir, std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/xclbin_parse")]
    {
        let Ok(entries) = std::fs::read_dir(&sub) else { continue };
        for e in entries.flatten() {
            check_invariants(&std::fs::read(e.path()).unwrap());
            n += 1;
        }
    }
    assert!(n >= 3, "the checked-in seeds are missing ({n} files)");
}

/// The fuzz target's committed seeds are what the builder makes today, so the seeds keep
/// covering well-formed files as the builder changes; `UNICORN_WRITE_SEEDS=1` rewrites them.
#[test]
fn committed_fuzz_seeds_match_the_builder() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let seeds = [
        ("one_cu.xclbin", build::npu_xclbin(&["mv"], 1, 256)),
        ("three_cus.xclbin", good()),
        ("empty.xclbin", build::xclbin([0; 16], &[])),
    ];
    let write = std::env::var_os("UNICORN_WRITE_SEEDS").is_some_and(|v| v == "1");
    for (name, bytes) in seeds {
        let path = dir.join(name);
        if write {
            std::fs::write(&path, &bytes).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            committed == bytes,
            "{name} differs from the builder's (UNICORN_WRITE_SEEDS=1 rewrites it)"
        );
    }
}
