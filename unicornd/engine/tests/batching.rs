//! A batch of sequences gives each sequence the logits it gets alone: activations are quantized
//! per token, each dot product sums in a fixed order whatever the batch, and attention reads
//! each sequence's own cache. So batching across clients changes nothing, bit for bit.

use std::path::PathBuf;

use unicorn_engine::gguf::GgufFile;
use unicorn_engine::model::{KvType, Logits, Model, Seq};
use unicorn_kernels::ThreadPool;

fn model() -> Model {
    let dir = std::env::var_os("UNICORN_MODEL_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache")
        });
        cache.join("unicorn/models")
    });
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run scripts/fetch-model first", p.display());
    Model::load(GgufFile::open(p).unwrap()).unwrap()
}

#[test]
fn batched_sequences_get_their_solo_logits_bit_for_bit() {
    let m = model();
    let pool = ThreadPool::new(2);
    let prompts: [&[u32]; 3] =
        [&[504, 3575, 282, 4649, 314], &[19556, 905], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]];
    // Alone: prompt, then three single-token steps.
    let mut solo = Vec::new();
    for p in prompts {
        let mut kv = m.new_state(64, KvType::F16).unwrap();
        let mut rows = Vec::new();
        let mut out = Vec::new();
        m.forward(&pool, &mut [Seq { kv: &mut kv, tokens: p, logits: Logits::All }], &mut out)
            .unwrap();
        rows.push(out.clone());
        for t in [100u32, 200, 300] {
            m.forward(
                &pool,
                &mut [Seq { kv: &mut kv, tokens: &[t], logits: Logits::Last }],
                &mut out,
            )
            .unwrap();
            rows.push(out.clone());
        }
        solo.push(rows);
    }
    // Together: the three prompts in one pass, then the three sequences' steps in one pass each.
    let mut kvs: Vec<_> = (0..3).map(|_| m.new_state(64, KvType::F16).unwrap()).collect();
    let mut out = Vec::new();
    {
        let mut seqs: Vec<Seq<'_>> = kvs
            .iter_mut()
            .zip(prompts)
            .map(|(kv, p)| Seq { kv, tokens: p, logits: Logits::All })
            .collect();
        m.forward(&pool, &mut seqs, &mut out).unwrap();
    }
    let n_vocab = m.hparams().n_vocab;
    let mut row = 0;
    for (i, p) in prompts.iter().enumerate() {
        let batched = &out[row * n_vocab..(row + p.len()) * n_vocab];
        assert!(batched == solo[i][0].as_slice(), "prompt {i}: batched prefill logits differ");
        row += p.len();
    }
    for (step, t) in [100u32, 200, 300].into_iter().enumerate() {
        let toks = [t];
        let mut seqs: Vec<Seq<'_>> =
            kvs.iter_mut().map(|kv| Seq { kv, tokens: &toks, logits: Logits::Last }).collect();
        m.forward(&pool, &mut seqs, &mut out).unwrap();
        for i in 0..3 {
            assert!(
                out[i * n_vocab..(i + 1) * n_vocab] == *solo[i][step + 1],
                "sequence {i}, step {step}"
            );
        }
    }
}
