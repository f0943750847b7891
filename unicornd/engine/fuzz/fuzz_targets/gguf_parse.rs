//! Any bytes: the GGUF reader returns a value or an error, never panics, and a parsed file's
//! tensor views lie inside it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unicorn_engine::gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = GgufFile::from_bytes(data.to_vec()) {
        assert_eq!(f.data_offset() % f.alignment(), 0);
        for t in f.tensors() {
            let row = t.ty.row_bytes(t.row_len()).expect("validated row");
            assert_eq!(t.data.len() as u64, row * t.n_rows());
        }
        for (k, v) in f.metadata().iter() {
            assert!(!k.is_empty());
            let _ = v.type_description();
        }
    }
});
