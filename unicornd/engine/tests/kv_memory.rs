//! A context's KV cache costs memory only as its positions fill: the daemon creates a context
//! per client, most of them far from full. (Its own process: the test reads the resident set.)

use unicorn_engine::model::{HParams, KvState, KvType};

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

#[test]
fn empty_caches_are_not_resident() {
    // SmolLM2-135M's shape, at the context size the benchmarks ask for: per layer, K and V are
    // 96 KiB each, small enough to come from the heap if allocated one by one.
    let hp = HParams {
        arch: "llama".into(),
        n_vocab: 49152,
        n_ctx_train: 8192,
        n_embd: 576,
        n_layer: 30,
        n_head: 9,
        n_head_kv: 3,
        head_dim: 64,
        n_ff: 1536,
        n_layer_kv: 30,
        rms_eps: 1e-5,
        rope_base: 10000.0,
        rope_dims: 64,
        rope_scale: 1.0,
    };
    let n = 16;
    let size = KvState::bytes_for(&hp, 256, KvType::F16);
    // As in the daemon, contexts have come and gone before (glibc then stops mapping blocks of
    // that size and carves them from the heap).
    for _ in 0..3 {
        drop(KvState::new(&hp, 256, KvType::F16).unwrap());
    }
    let before = resident_bytes();
    let caches: Vec<KvState> =
        (0..n).map(|_| KvState::new(&hp, 256, KvType::F16).unwrap()).collect();
    let grown = resident_bytes().saturating_sub(before);
    assert_eq!(caches.len(), n);
    assert!(
        grown < size,
        "{n} empty caches of {size} bytes each made the process grow by {grown} bytes"
    );
}
