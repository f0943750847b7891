//! The reader against files built here: a valid file round-trips, and every kind of damage
//! (truncation at every length, bit flips, huge counts, overlong strings, bad UTF-8, bad
//! alignment, tensors out of bounds / misaligned / overlapping, overflowing dims, unknown types,
//! random mutations) is a typed error, never a panic or a huge allocation.

use proptest::prelude::*;
use unicorn_engine::gguf::writer::{GgufWriter, Layout};
use unicorn_engine::gguf::{Array, GgufError, GgufFile, Value};
use unicorn_kernels::GgmlType;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A small file using every value type, nested arrays and three tensor types. The last tensor's
/// size is a multiple of the alignment, so the file ends exactly where its data ends.
fn sample() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::String("test".into()))
        .kv("t.u8", Value::U8(200))
        .kv("t.i8", Value::I8(-5))
        .kv("t.u16", Value::U16(60000))
        .kv("t.i16", Value::I16(-30000))
        .kv("t.u32", Value::U32(4_000_000_000))
        .kv("t.i32", Value::I32(-2_000_000_000))
        .kv("t.f32", Value::F32(1.5))
        .kv("t.bool", Value::Bool(true))
        .kv("t.u64", Value::U64(u64::MAX))
        .kv("t.i64", Value::I64(i64::MIN))
        .kv("t.f64", Value::F64(-2.25))
        .kv("t.str", Value::String("héllo 🦀".into()))
        .kv("t.strs", Value::Array(Array::String(vec!["a".into(), "".into(), "ü".into()])))
        .kv("t.f32s", Value::Array(Array::F32(vec![0.5, -1.0])))
        .kv("t.empty", Value::Array(Array::I32(vec![])))
        .kv(
            "t.nested",
            Value::Array(Array::Array(vec![
                Array::U32(vec![1, 2, 3]),
                Array::String(vec!["x".into()]),
                Array::Array(vec![Array::Bool(vec![true, false])]),
            ])),
        );
    w.tensor("a", GgmlType::F32, &[4], f32_bytes(&[1.0, 2.0, 3.0, 4.0]));
    w.tensor("b", GgmlType::Q8_0, &[32, 2], (0..68u8).collect());
    w.tensor("c", GgmlType::F32, &[8], f32_bytes(&[0.25; 8]));
    w
}

fn parse(bytes: &[u8]) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(bytes.to_vec())
}

/// Check what a successfully parsed file promises, whatever bytes it came from.
fn check_invariants(f: &GgufFile) {
    assert_eq!(f.data_offset() % f.alignment(), 0);
    for t in f.tensors() {
        assert!(!t.name.is_empty() && t.dims.len() <= 4);
        assert_eq!(t.data.len() as u64, t.ty.row_bytes(t.row_len()).unwrap() * t.n_rows());
    }
}

/// Byte offsets of a tensor info's fields: (name length, n_dims, first dim, type, offset).
fn tensor_fields(bytes: &[u8], info_at: usize) -> (usize, usize, usize, usize, usize) {
    let name_len = u64::from_le_bytes(bytes[info_at..info_at + 8].try_into().unwrap()) as usize;
    let n_dims_at = info_at + 8 + name_len;
    let n_dims = u32::from_le_bytes(bytes[n_dims_at..n_dims_at + 4].try_into().unwrap()) as usize;
    let dims_at = n_dims_at + 4;
    let type_at = dims_at + 8 * n_dims;
    (info_at, n_dims_at, dims_at, type_at, type_at + 4)
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn built() -> (Vec<u8>, Layout) {
    sample().build()
}

#[test]
fn valid_file_round_trips() {
    let (bytes, layout) = built();
    let f = parse(&bytes).unwrap();
    check_invariants(&f);
    assert_eq!(f.version(), 3);
    assert_eq!(f.len(), bytes.len() as u64);
    assert_eq!(f.data_offset(), layout.data_offset as u64);
    let md = f.metadata();
    assert_eq!(md.len(), 17);
    assert_eq!(md.get_str("general.architecture").unwrap(), "test");
    assert_eq!(md.get_u8("t.u8").unwrap(), 200);
    assert_eq!(md.get_i8("t.i8").unwrap(), -5);
    assert_eq!(md.get_u16("t.u16").unwrap(), 60000);
    assert_eq!(md.get_i16("t.i16").unwrap(), -30000);
    assert_eq!(md.get_u32("t.u32").unwrap(), 4_000_000_000);
    assert_eq!(md.get_i32("t.i32").unwrap(), -2_000_000_000);
    assert_eq!(md.get_f32("t.f32").unwrap(), 1.5);
    assert!(md.get_bool("t.bool").unwrap());
    assert_eq!(md.get_u64("t.u64").unwrap(), u64::MAX);
    assert_eq!(md.get_i64("t.i64").unwrap(), i64::MIN);
    assert_eq!(md.get_f64("t.f64").unwrap(), -2.25);
    assert_eq!(md.get_str("t.str").unwrap(), "héllo 🦀");
    assert_eq!(md.get_str_array("t.strs").unwrap(), ["a", "", "ü"]);
    assert_eq!(md.get_f32_array("t.f32s").unwrap(), [0.5, -1.0]);
    assert!(md.get_i32_array("t.empty").unwrap().is_empty());
    let nested = md.get_array("t.nested").unwrap();
    assert_eq!(
        nested,
        &Array::Array(vec![
            Array::U32(vec![1, 2, 3]),
            Array::String(vec!["x".into()]),
            Array::Array(vec![Array::Bool(vec![true, false])]),
        ])
    );
    assert_eq!(md.get_uint("t.u16").unwrap(), 60000);
    assert!(md.get_uint("t.i32").is_err());
    assert_eq!(md.opt_u32("absent").unwrap(), None);
    assert!(md.opt_u32("t.u16").is_err());
    let keys: Vec<&str> = md.iter().map(|(k, _)| k).collect();
    assert_eq!(keys[..3], ["general.architecture", "t.u8", "t.i8"]);

    let a = f.tensor("a").unwrap();
    assert_eq!(
        (a.ty, a.dims, a.data),
        (GgmlType::F32, &[4u64][..], &f32_bytes(&[1.0, 2.0, 3.0, 4.0])[..])
    );
    let b = f.tensor("b").unwrap();
    assert_eq!((b.ty, b.dims, b.n_rows()), (GgmlType::Q8_0, &[32u64, 2][..], 2));
    assert_eq!(b.data, (0..68u8).collect::<Vec<_>>());
    assert_eq!(f.tensor("c").unwrap().data, f32_bytes(&[0.25; 8]));
    assert_eq!(
        f.tensor_infos().iter().map(|t| t.offset()).collect::<Vec<_>>(),
        layout.tensor_data_offsets
    );
}

#[test]
fn forgotten_entries_are_gone_and_the_others_keep_their_values_and_order() {
    let mut f = parse(&built().0).unwrap();
    let entries = |f: &GgufFile| -> Vec<(String, Value)> {
        f.metadata().iter().map(|(k, v)| (k.to_owned(), v.clone())).collect()
    };
    let gone = ["t.u16", "t.strs", "t.nested"];
    let want: Vec<_> =
        entries(&f).into_iter().filter(|(k, _)| !gone.contains(&k.as_str())).collect();
    f.forget_metadata(&["t.u16", "t.strs", "not.there", "t.nested"]);
    assert_eq!(entries(&f), want);
    for (k, v) in &want {
        assert_eq!(f.metadata().get(k), Some(v), "{k}");
    }
    for k in gone {
        assert!(!f.metadata().contains_key(k), "{k}");
    }
    assert!(
        matches!(f.metadata().get_str_array("t.strs"), Err(GgufError::MissingKey(k)) if k == "t.strs")
    );
    assert_eq!(f.tensors().len(), 3, "the tensors stay");
}

#[test]
fn every_truncation_is_an_error() {
    let (bytes, _) = built();
    for len in 0..bytes.len() {
        match parse(&bytes[..len]) {
            Err(_) => {}
            Ok(_) => panic!("a {len}-byte prefix of a {}-byte file parsed", bytes.len()),
        }
    }
    // A file without tensors is valid without its final padding, but no shorter.
    let mut w = GgufWriter::new();
    w.kv("k", Value::String("v".into()));
    let (bytes, layout) = w.build();
    let end_of_kv = layout.kv_offsets[0] + 8 + 1 + 4 + 8 + 1;
    assert!(parse(&bytes[..end_of_kv]).is_ok());
    for len in 0..end_of_kv {
        assert!(parse(&bytes[..len]).is_err(), "prefix {len}");
    }
}

#[test]
fn every_bit_flip_in_the_header_region_is_handled() {
    let (bytes, layout) = built();
    let mut errors = 0;
    for i in 0..layout.data_offset {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            match parse(&b) {
                Ok(f) => check_invariants(&f),
                Err(e) => {
                    errors += 1;
                    assert!(!e.to_string().is_empty());
                }
            }
        }
    }
    // Flips in lengths, counts, types and structure fail; flips inside values need not.
    assert!(errors > layout.data_offset * 2, "{errors} errors");
}

#[test]
fn magic_and_version() {
    let (bytes, _) = built();
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(matches!(parse(&b), Err(GgufError::BadMagic { .. })));
    assert!(matches!(
        parse(b"GG"),
        Err(GgufError::BadMagic { .. }) | Err(GgufError::Truncated { .. })
    ));
    assert!(matches!(parse(b"PK\x03\x04"), Err(GgufError::BadMagic { .. })));
    for (v, ok) in [(1u32, false), (2, true), (3, true), (4, false), (3u32.swap_bytes(), false)] {
        let mut b = bytes.clone();
        put_u32(&mut b, 4, v);
        match (parse(&b), ok) {
            (Ok(f), true) => assert_eq!(f.version(), v),
            (Err(GgufError::UnsupportedVersion(x)), false) => assert_eq!(x, v),
            (Err(GgufError::BigEndian), false) => assert_eq!(v, 3u32.swap_bytes()),
            (r, _) => panic!("version {v}: {r:?}"),
        }
    }
}

#[test]
fn huge_counts_fail_without_allocating() {
    let (bytes, layout) = built();
    for count in [u64::MAX, 1 << 60, 1 << 40, bytes.len() as u64] {
        let mut b = bytes.clone();
        put_u64(&mut b, 16, count); // metadata count
        assert!(matches!(parse(&b), Err(GgufError::CountTooLarge { .. })), "kv count {count}");
        let mut b = bytes.clone();
        put_u64(&mut b, 8, count); // tensor count
        assert!(matches!(parse(&b), Err(GgufError::CountTooLarge { .. })), "tensor count {count}");
    }
    // Array element counts: the string array ("t.strs") and the f32 array ("t.f32s").
    for (kv, name) in [(13usize, "t.strs"), (14, "t.f32s")] {
        let count_at = layout.kv_offsets[kv] + 8 + name.len() + 4 + 4;
        for count in [u64::MAX, 1 << 60, 1 << 31] {
            let mut b = bytes.clone();
            put_u64(&mut b, count_at, count);
            match parse(&b) {
                Err(GgufError::CountTooLarge { what, count: c, .. }) => {
                    assert!(what.contains(name), "{what}");
                    assert_eq!(c, count);
                }
                r => panic!("{name} count {count}: {r:?}"),
            }
        }
    }
}

#[test]
fn overlong_strings_and_bad_utf8() {
    let (bytes, layout) = built();
    // Key length past the end of the file.
    for len in [u64::MAX, 1 << 62, bytes.len() as u64] {
        let mut b = bytes.clone();
        put_u64(&mut b, layout.kv_offsets[0], len);
        assert!(matches!(parse(&b), Err(GgufError::Truncated { .. })), "key length {len}");
    }
    // String value length ("t.str").
    let at = layout.kv_offsets[12] + 8 + "t.str".len() + 4;
    let mut b = bytes.clone();
    put_u64(&mut b, at, 1 << 50);
    match parse(&b) {
        Err(GgufError::Truncated { what, needed, .. }) => {
            assert!(what.contains("t.str"), "{what}");
            assert_eq!(needed, 1 << 50);
        }
        r => panic!("{r:?}"),
    }
    // Invalid UTF-8 in a key, a value and a tensor name.
    let mut b = bytes.clone();
    b[layout.kv_offsets[1] + 8] = 0xFF;
    assert!(matches!(parse(&b), Err(GgufError::InvalidUtf8 { .. })));
    let mut b = bytes.clone();
    b[at + 8 + 2] = 0xC3; // "h\xC3\xC3llo": a lead byte followed by a lead byte
    assert!(
        matches!(parse(&b), Err(GgufError::InvalidUtf8 { what, .. }) if what.contains("t.str"))
    );
    let mut b = bytes.clone();
    b[layout.tensor_info_offsets[0] + 8] = 0x80;
    assert!(
        matches!(parse(&b), Err(GgufError::InvalidUtf8 { what, .. }) if what.contains("tensor"))
    );
}

#[test]
fn metadata_structure_errors() {
    let mut w = sample();
    w.kv("t.u8", Value::U8(1));
    assert!(matches!(parse(&w.to_bytes()), Err(GgufError::DuplicateKey(k)) if k == "t.u8"));

    let mut w = GgufWriter::new();
    w.kv("", Value::U8(1));
    assert!(matches!(parse(&w.to_bytes()), Err(GgufError::EmptyKey { .. })));

    // Unknown value type and unknown array element type.
    let (bytes, layout) = built();
    let mut b = bytes.clone();
    put_u32(&mut b, layout.kv_offsets[1] + 8 + "t.u8".len(), 13);
    assert!(matches!(parse(&b), Err(GgufError::UnknownValueType { key, id: 13 }) if key == "t.u8"));
    let mut b = bytes.clone();
    put_u32(&mut b, layout.kv_offsets[14] + 8 + "t.f32s".len() + 4, 99);
    assert!(matches!(parse(&b), Err(GgufError::UnknownValueType { id: 99, .. })));

    // Bools are 0 or 1.
    let mut b = bytes.clone();
    b[layout.kv_offsets[8] + 8 + "t.bool".len() + 4] = 2;
    assert!(matches!(parse(&b), Err(GgufError::InvalidBool { value: 2, .. })));

    // Nesting is bounded: 8 levels of arrays are fine, 9 are not.
    let mut deep = Array::U8(vec![1]);
    for _ in 0..7 {
        deep = Array::Array(vec![deep]);
    }
    let mut w = GgufWriter::new();
    w.kv("ok", Value::Array(deep.clone()));
    assert_eq!(parse(&w.to_bytes()).unwrap().metadata().get_array("ok").unwrap(), &deep);
    let mut w = GgufWriter::new();
    w.kv("deep", Value::Array(Array::Array(vec![deep])));
    assert!(matches!(parse(&w.to_bytes()), Err(GgufError::NestingTooDeep { .. })));
    // A million nesting levels claimed in a small file: bounded recursion, no stack overflow.
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..100_000 {
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
    }
    assert!(matches!(parse(&b), Err(GgufError::NestingTooDeep { .. })));
}

#[test]
fn alignment_rules() {
    for (value, ok) in [
        (Value::U32(64), true),
        (Value::U32(1), true),
        (Value::U32(0), false),
        (Value::U32(48), false),
        (Value::U64(32), false),
        (Value::String("32".into()), false),
    ] {
        let mut w = GgufWriter::new();
        w.kv("general.alignment", value.clone());
        w.tensor("t", GgmlType::F32, &[16], vec![0; 64]);
        match (parse(&w.to_bytes()), ok) {
            (Ok(f), true) => {
                let Value::U32(a) = value else { unreachable!() };
                assert_eq!(f.alignment(), u64::from(a));
                assert_eq!(f.data_offset() % u64::from(a), 0);
            }
            (Err(GgufError::BadAlignment(_)), false) => {}
            (r, _) => panic!("{value:?}: {r:?}"),
        }
    }
}

#[test]
fn tensor_info_errors() {
    let (bytes, layout) = built();
    let (_, n_dims_at, dims_at, type_at, offset_at) =
        tensor_fields(&bytes, layout.tensor_info_offsets[1]);
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = bytes.clone();
        f(&mut b);
        parse(&b)
    };
    // Unknown type ids name the tensor.
    for id in [4u32, 5, 16, 39, u32::MAX] {
        let err = with(&|b| put_u32(b, type_at, id)).unwrap_err();
        assert_eq!(err.to_string(), format!("unsupported tensor type {id} for tensor \"b\""));
    }
    assert!(matches!(
        with(&|b| put_u32(b, n_dims_at, 5)),
        Err(GgufError::TooManyDims { n_dims: 5, .. })
    ));
    assert!(matches!(
        with(&|b| put_u32(b, n_dims_at, u32::MAX)),
        Err(GgufError::TooManyDims { .. })
    ));
    assert!(matches!(with(&|b| put_u64(b, dims_at, 0)), Err(GgufError::BadDim { index: 0, .. })));
    assert!(matches!(
        with(&|b| put_u64(b, dims_at + 8, 1 << 63)),
        Err(GgufError::BadDim { index: 1, .. })
    ));
    // Rows must be whole Q8_0 blocks.
    assert!(matches!(
        with(&|b| put_u64(b, dims_at, 33)),
        Err(GgufError::PartialBlock { row: 33, block: 32, .. })
    ));
    // Products that overflow i64, and byte sizes that overflow u64.
    assert!(matches!(
        with(&|b| {
            put_u64(b, dims_at, 1 << 40);
            put_u64(b, dims_at + 8, 1 << 40);
        }),
        Err(GgufError::TensorTooLarge { .. })
    ));
    let mut w = GgufWriter::new();
    w.tensor("huge", GgmlType::F32, &[1 << 62], vec![]);
    assert!(matches!(parse(&w.to_bytes()), Err(GgufError::TensorTooLarge { .. })));
    // Large but representable tensors are simply out of bounds.
    assert!(matches!(
        with(&|b| put_u64(b, dims_at + 8, 1 << 30)),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
    // Offsets: misaligned, past the end, overflowing.
    assert!(matches!(
        with(&|b| put_u64(b, offset_at, 8)),
        Err(GgufError::TensorMisaligned { offset: 8, .. })
    ));
    assert!(matches!(
        with(&|b| put_u64(b, offset_at, 1 << 20)),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
    assert!(matches!(
        with(&|b| put_u64(b, offset_at, u64::MAX - 31)),
        Err(GgufError::TensorOutOfBounds { .. })
    ));
    // Overlap: "b" moved onto "a".
    assert!(matches!(with(&|b| put_u64(b, offset_at, 0)), Err(GgufError::TensorOverlap { .. })));

    // Names: duplicate, empty, too long.
    let mut w = sample();
    w.tensor("a", GgmlType::F32, &[8], vec![0; 32]);
    assert!(matches!(parse(&w.to_bytes()), Err(GgufError::DuplicateTensor(n)) if n == "a"));
    let mut w = GgufWriter::new();
    w.tensor("", GgmlType::F32, &[8], vec![0; 32]);
    assert!(matches!(parse(&w.to_bytes()), Err(GgufError::EmptyTensorName { .. })));
    let mut w = GgufWriter::new();
    w.tensor(&"n".repeat(64), GgmlType::F32, &[8], vec![0; 32]);
    assert!(parse(&w.to_bytes()).is_ok());
    let mut w = GgufWriter::new();
    w.tensor(&"n".repeat(65), GgmlType::F32, &[8], vec![0; 32]);
    assert!(matches!(parse(&w.to_bytes()), Err(GgufError::TensorNameTooLong { len: 65, .. })));
    // Data missing at the end of the file.
    let mut w = GgufWriter::new();
    w.tensor("t", GgmlType::F32, &[8], vec![0; 32]);
    let mut b = w.to_bytes();
    assert!(parse(&b).is_ok());
    b.truncate(b.len() - 1);
    assert!(
        matches!(parse(&b), Err(GgufError::TensorOutOfBounds { end, file_len, .. }) if end == file_len + 1)
    );
}

#[test]
fn scalar_tensor_has_one_element() {
    let mut w = GgufWriter::new();
    w.tensor("s", GgmlType::F32, &[], f32_bytes(&[7.0]));
    w.tensor("pad", GgmlType::F32, &[7], vec![0; 28]);
    let f = parse(&w.to_bytes()).unwrap();
    let s = f.tensor("s").unwrap();
    assert_eq!(
        (s.dims.len(), s.n_elements(), s.row_len(), s.data),
        (0, 1, 1, &f32_bytes(&[7.0])[..])
    );
}

/// Ways of damaging a file.
#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Set {
        at: usize,
        byte: u8,
    },
    /// Overwrite 8 bytes with an extreme u64 (a plausible count, length or offset attack).
    Word {
        at: usize,
        value: u64,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Remove {
        at: usize,
        len: usize,
    },
    Truncate {
        len: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let words = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(1 << 63),
        Just(1 << 32),
        Just(u32::MAX as u64),
        any::<u64>(),
        0u64..300,
    ];
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        (any::<usize>(), words).prop_map(|(at, value)| Mutation::Word { at, value }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..32).prop_map(|(at, len)| Mutation::Remove { at, len }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len().max(1);
    match m {
        Mutation::Flip { at, bit } => {
            if let Some(b) = bytes.get_mut(at % n) {
                *b ^= 1 << bit;
            }
        }
        Mutation::Set { at, byte } => {
            if let Some(b) = bytes.get_mut(at % n) {
                *b = *byte;
            }
        }
        Mutation::Word { at, value } => {
            let at = at % n;
            for (i, v) in value.to_le_bytes().iter().enumerate() {
                if let Some(b) = bytes.get_mut(at + i) {
                    *b = *v;
                }
            }
        }
        Mutation::Insert { at, bytes: ins } => {
            let at = at % (bytes.len() + 1);
            bytes.splice(at..at, ins.iter().copied());
        }
        Mutation::Remove { at, len } => {
            let at = at % n;
            let end = (at + len).min(bytes.len());
            if at < end {
                bytes.drain(at..end);
            }
        }
        Mutation::Truncate { len } => bytes.truncate(len % n),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random damage never panics, and whatever still parses keeps the reader's promises.
    #[test]
    fn random_mutations_never_panic(muts in prop::collection::vec(mutation(), 1..6)) {
        let (mut bytes, _) = built();
        for m in &muts {
            apply(&mut bytes, m);
        }
        if let Ok(f) = parse(&bytes) {
            check_invariants(&f);
        }
    }
}

#[test]
fn opening_files() {
    let dir = std::env::temp_dir().join(format!("unicorn-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (bytes, _) = built();
    let good = dir.join("good.gguf");
    std::fs::write(&good, &bytes).unwrap();
    let f = GgufFile::open(&good).unwrap();
    assert_eq!(f.bytes(), &bytes[..]);
    // From an already opened file (as when a client passes a descriptor); the mapping outlives
    // the `File`.
    let file = std::fs::File::open(&good).unwrap();
    let g = GgufFile::from_file(&file).unwrap();
    drop(file);
    assert_eq!(g.tensor("c").unwrap().data, f32_bytes(&[0.25; 8]));
    let empty = dir.join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(GgufFile::open(&empty).is_err());
    match GgufFile::open(dir.join("missing.gguf")) {
        Err(e @ GgufError::Open { .. }) => assert!(e.to_string().contains("missing.gguf"), "{e}"),
        r => panic!("{r:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
