//! Print a GGUF file's metadata and tensor directory: `cargo run --example gguf_dump -- FILE`.

use unicorn_engine::gguf::{Array, GgufFile, Value};

fn head(s: &str, n: usize) -> &str {
    let mut end = n.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) if s.len() > 80 => format!("{:?}... ({} bytes)", head(s, 80), s.len()),
        Value::Array(a) => {
            let head = match a {
                Array::String(v) => format!("{:?}", &v[..v.len().min(8)]),
                Array::I32(v) => format!("{:?}", &v[..v.len().min(8)]),
                Array::F32(v) => format!("{:?}", &v[..v.len().min(8)]),
                Array::U32(v) => format!("{:?}", &v[..v.len().min(8)]),
                _ => String::new(),
            };
            format!("array[{}; {}] {head}", a.element_type(), a.len())
        }
        v => format!("{v:?}"),
    }
}

fn main() {
    let path = std::env::args().nth(1).expect("usage: gguf_dump FILE");
    let f = match GgufFile::open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{path}: {e}");
            std::process::exit(1);
        }
    };
    println!("{f:?}");
    for (k, v) in f.metadata().iter() {
        println!("{k} = {}", show(v));
    }
    for t in f.tensors() {
        println!("{:<40} {:>5} {:?} {} bytes", t.name, t.ty.name(), t.dims, t.data.len());
    }
}
