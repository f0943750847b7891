//! Models through a real daemon: loading from a client's descriptor, sharing between sessions,
//! decoding through the rings against llama.cpp's reference, sampling, and hostile inputs.

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use unicorn::protocol::{Decode, Job, LogitsOut, SamplerParams, TokenInput};
use unicorn::sys::memfd;
use unicorn::{Client, ContextParams, LogitsWanted, Status};
use unicorn_tests::{bin, default_model, eventually, repo_root, run, Daemon, TempDir};

const CLIENT: &str = env!("CARGO_BIN_EXE_unicorn-test-client");

fn greedy_ctx() -> ContextParams {
    ContextParams { n_ctx: 512, kv_f32: false, sampler: SamplerParams::GREEDY }
}

fn reference() -> Value {
    let path = repo_root().join("tests/data/reference/smollm2/greedy.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a))).unwrap()
}

#[test]
fn two_sessions_loading_one_file_share_one_model() {
    let d = Daemon::start();
    let (mut a, mut b) = (d.client(), d.client());
    let ma = a.load_model(&default_model()).unwrap();
    let info = ma.info();
    assert_eq!((info.arch.as_str(), info.n_vocab, info.n_ctx_train), ("llama", 49152, 8192));
    assert_eq!((info.bos, info.eos, info.add_bos), (1, 2, false));
    assert_eq!(info.file_type, "Q4_1");
    assert!(!info.shared);
    let mb = b.load_model(&default_model()).unwrap();
    assert!(mb.info().shared, "the second session did not share the loaded model");
    assert_eq!(mb.info().digest, info.digest);
    let st = a.status().unwrap();
    assert_eq!(st.models.len(), 1, "{:?}", st.models);
    assert_eq!(st.models[0].users, 2);
    // The test runs as the model file's owner, who could change it: the daemon copies it.
    assert_eq!(st.models[0].storage, "copied");
    // The model goes when its last user does.
    a.free_model(&ma).unwrap();
    drop(b);
    assert!(eventually(Duration::from_secs(5), || a.status().unwrap().models.is_empty()));
}

/// `unicorn status` reports the bytes each session's KV caches reserve; Gemma 3n's last layers
/// read earlier layers' caches and reserve none (the engine's random-weight fixture: 25 layers,
/// the last 5 sharing).
#[test]
fn status_counts_kv_cache_bytes_without_the_sharing_layers() {
    let d = Daemon::start();
    let mut c = d.client();
    let fixture = "unicornd/engine/tests/fixtures/gemma3n-tiny/gemma3n-tiny-q8_0.gguf";
    let m = c.load_model(&repo_root().join(fixture)).unwrap();
    assert_eq!((m.info().arch.as_str(), m.info().n_layer), ("gemma3n", 25));
    let _ctx = c.create_context(&m, &ContextParams { n_ctx: 256, ..greedy_ctx() }).unwrap();
    let st = c.status().unwrap();
    let s = st.sessions.iter().find(|s| s.contexts == 1).expect("the session with the context");
    // 20 layers x (K and V) x 2 KV heads x 32 values x 2 bytes (f16) x 256 positions.
    assert_eq!(s.kv_bytes, 20 * 2 * 64 * 2 * 256);
}

#[test]
fn logits_through_the_rings_match_llama_cpp() {
    let d = Daemon::start();
    let mut c = d.client();
    let m = c.load_model(&default_model()).unwrap();
    let ctx = c.create_context(&m, &greedy_ctx()).unwrap();
    let r = reference();
    let p = &r["prompts"][0];
    assert_eq!(p["name"], "capital");
    let mut seq = ids(&p["prompt_ids"]);
    seq.extend(ids(&p["continuation_ids"]));
    let out = c.decode(&ctx, &seq, LogitsWanted::All, false).unwrap();
    assert_eq!(out.n_past as usize, seq.len());
    let n_vocab = m.info().n_vocab as usize;
    assert_eq!(out.logits.len(), seq.len() * n_vocab);
    let mut worst = 0.0f32;
    for row in p["positions"].as_array().unwrap() {
        let pos = row["pos"].as_u64().unwrap() as usize;
        let ours = &out.logits[pos * n_vocab..][..n_vocab];
        if row["margin"].as_f64().unwrap() >= 0.5 {
            assert_eq!(argmax(ours) as u64, row["top2_ids"][0].as_u64().unwrap(), "position {pos}");
        }
        for pair in row["top16"].as_array().unwrap() {
            let (id, l) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
            worst = worst.max((ours[id] - l).abs());
        }
    }
    // The bound of the engine's own parity test: below llama.cpp's flash-attention on/off gap.
    assert!(worst <= 2.0, "logits differ by {worst}");
    // Only the last token's logits, after a rewind, equal the same row of the batch.
    c.rewind(&ctx, 0).unwrap();
    let last = c.decode(&ctx, &seq[..5], LogitsWanted::Last, false).unwrap();
    assert_eq!(last.logits.len(), n_vocab);
    assert_eq!(last.logits, out.logits[4 * n_vocab..5 * n_vocab]);
}

#[test]
fn greedy_generation_through_the_rings_matches_llama_cpp() {
    let d = Daemon::start();
    let mut c = d.client();
    let m = c.load_model(&default_model()).unwrap();
    let r = reference();
    for p in r["prompts"].as_array().unwrap() {
        let prompt = ids(&p["prompt_ids"]);
        let peer = ids(&p["continuation_ids"]);
        let positions = p["positions"].as_array().unwrap();
        let comparable = (0..peer.len())
            .take_while(|&i| positions[prompt.len() - 1 + i]["margin"].as_f64().unwrap() >= 0.25)
            .count();
        let ctx = c.create_context(&m, &greedy_ctx()).unwrap();
        // The text goes in as text: the daemon's tokenizer must give the peer's ids too.
        let text = p["text"].as_str().unwrap();
        let special = p["special"].as_bool().unwrap();
        assert_eq!(
            c.tokenize(&m, text, true, special).unwrap(),
            prompt,
            "tokenization of {text:?}"
        );
        let mut ours =
            vec![c.decode(&ctx, &prompt, LogitsWanted::None, true).unwrap().token.unwrap()];
        while ours.len() < comparable {
            let t = *ours.last().unwrap();
            ours.push(c.decode(&ctx, &[t], LogitsWanted::None, true).unwrap().token.unwrap());
        }
        assert_eq!(ours[..comparable], peer[..comparable], "{}", p["name"]);
        c.free_context(&ctx).unwrap();
    }
}

#[test]
fn a_seed_reproduces_a_sampled_continuation() {
    let d = Daemon::start();
    let mut c = d.client();
    let m = c.load_model(&default_model()).unwrap();
    let prompt = c.tokenize(&m, "Once upon a time", true, false).unwrap();
    let mut sample = |seed: u64| {
        let sampler = SamplerParams { seed, ..SamplerParams::DEFAULT };
        let ctx =
            c.create_context(&m, &ContextParams { n_ctx: 128, kv_f32: false, sampler }).unwrap();
        let mut out =
            vec![c.decode(&ctx, &prompt, LogitsWanted::None, true).unwrap().token.unwrap()];
        for _ in 0..24 {
            let t = *out.last().unwrap();
            out.push(c.decode(&ctx, &[t], LogitsWanted::None, true).unwrap().token.unwrap());
        }
        c.free_context(&ctx).unwrap();
        out
    };
    let first = sample(7);
    assert_eq!(sample(7), first, "the same seed gave another continuation");
    let others: Vec<_> = (100..104).map(&mut sample).collect();
    assert!(others.iter().any(|o| o != &first), "four other seeds all gave the same tokens");
}

#[test]
fn asynchronous_decodes_complete_on_the_ring() {
    let d = Daemon::start();
    let mut c = d.client();
    let m = c.load_model(&default_model()).unwrap();
    let ctx = c.create_context(&m, &greedy_ctx()).unwrap();
    let prompt = c.tokenize(&m, "The capital of France is", true, false).unwrap();
    let first = c.decode(&ctx, &prompt, LogitsWanted::None, true).unwrap().token.unwrap();
    // Feed tokens one by one without the synchronous call: each completion carries the next.
    let mut token = first;
    let mut got = Vec::new();
    for i in 0..8u64 {
        assert!(c.submit_decode(&ctx, &[token], true, i).unwrap());
        let mut done = Vec::new();
        while done.is_empty() {
            assert!(c.wait(Some(Duration::from_secs(30))).unwrap());
            c.reap(&mut done, 4).unwrap();
        }
        assert_eq!((done[0].user_data, done[0].status), (i, Status::Ok));
        assert_eq!(done[0].extra, prompt.len() as u64 + i + 1, "position after the decode");
        token = done[0].result as u32;
        got.push(token);
    }
    // The same as the synchronous path gives.
    c.rewind(&ctx, prompt.len() as u32).unwrap();
    let mut sync = Vec::new();
    let mut t = first;
    for _ in 0..8 {
        t = c.decode(&ctx, &[t], LogitsWanted::None, true).unwrap().token.unwrap();
        sync.push(t);
    }
    assert_eq!(got, sync);
}

#[test]
fn hostile_model_requests_get_errors_and_the_daemon_goes_on() {
    let policy = "[limits]\nmax_contexts = 2\nmax_kv_tokens = 1024\nmax_models = 2\n";
    let mut d = Daemon::start_with_policy(Some(policy));
    let mut c = d.client();
    let tmp = TempDir::new("models");
    // Not a regular file, not a model, a truncated model.
    let (pipe_r, _w) = nix::unistd::pipe().unwrap();
    assert_eq!(c.load_model_fd(pipe_r.as_fd()).unwrap_err().status(), Status::InvalidArgument);
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let e = c.load_model(&junk).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(e.message().contains("not a usable model"), "{e}");
    let truncated = tmp.path().join("cut.gguf");
    let bytes = std::fs::read(default_model()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let e = c.load_model(&truncated).unwrap_err();
    assert!(e.message().contains("not a usable model"), "{e}");
    drop(bytes);

    let m = c.load_model(&default_model()).unwrap();
    // Context limits: positions beyond the training context, the KV budget, the count.
    let e = c.create_context(&m, &ContextParams { n_ctx: 100_000, ..greedy_ctx() }).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument, "{e}");
    let e = c.create_context(&m, &ContextParams { n_ctx: 2048, ..greedy_ctx() }).unwrap_err();
    assert_eq!(e.status(), Status::LimitExceeded, "{e}");
    let bad = SamplerParams { temperature: f32::NAN, ..SamplerParams::DEFAULT };
    let e = c
        .create_context(&m, &ContextParams { n_ctx: 64, kv_f32: false, sampler: bad })
        .unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument, "{e}");
    let small = c.create_context(&m, &ContextParams { n_ctx: 16, ..greedy_ctx() }).unwrap();
    let _other = c.create_context(&m, &ContextParams { n_ctx: 16, ..greedy_ctx() }).unwrap();
    let e = c.create_context(&m, &ContextParams { n_ctx: 16, ..greedy_ctx() }).unwrap_err();
    assert_eq!(e.status(), Status::LimitExceeded, "{e}");
    assert_eq!(c.set_sampler(&small, &bad).unwrap_err().status(), Status::InvalidArgument);

    // Decodes: a token outside the vocabulary, more tokens than the context holds, nothing to
    // sample from yet, a rewind past the end.
    assert_eq!(
        c.decode(&small, &[49152], LogitsWanted::None, true).unwrap_err().status(),
        Status::InvalidArgument
    );
    let long: Vec<u32> = (0..17).collect();
    assert_eq!(
        c.decode(&small, &long, LogitsWanted::None, false).unwrap_err().status(),
        Status::LimitExceeded
    );
    assert_eq!(
        c.decode(&small, &[], LogitsWanted::None, true).unwrap_err().status(),
        Status::InvalidArgument
    );
    assert_eq!(c.rewind(&small, 5).unwrap_err().status(), Status::InvalidArgument);
    c.decode(&small, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], LogitsWanted::None, false).unwrap();
    assert_eq!(
        c.decode(&small, &[1; 7], LogitsWanted::None, false).unwrap_err().status(),
        Status::LimitExceeded
    );

    // Raw DECODE entries naming things that do not exist or do not fit.
    let buf = memfd::create_sealed_memfd("logits", 4096).unwrap();
    let h = c.register_buffer(&buf, 4096).unwrap();
    let jobs = [
        (
            Decode {
                ctx: 99,
                input: TokenInput::Inline { tokens: [1, 0], n: 1 },
                logits: None,
                sample: false,
                rewind_to: None,
            },
            Status::NotFound,
        ),
        (
            Decode {
                ctx: small.handle(),
                input: TokenInput::Buffer { buffer: 77, offset: 0, n: 1 },
                logits: None,
                sample: false,
                rewind_to: None,
            },
            Status::NotFound,
        ),
        (
            Decode {
                ctx: small.handle(),
                input: TokenInput::Buffer { buffer: h, offset: 4092, n: 2 },
                logits: None,
                sample: false,
                rewind_to: None,
            },
            Status::InvalidArgument,
        ),
        (
            Decode {
                ctx: small.handle(),
                input: TokenInput::Buffer { buffer: h, offset: u64::MAX - 3, n: 2 },
                logits: None,
                sample: false,
                rewind_to: None,
            },
            Status::InvalidArgument,
        ),
        // 49152 logits do not fit 4096 bytes.
        (
            Decode {
                ctx: small.handle(),
                input: TokenInput::Inline { tokens: [1, 0], n: 1 },
                logits: Some(LogitsOut { buffer: h, offset: 0, all: false }),
                sample: false,
                rewind_to: Some(0),
            },
            Status::InvalidArgument,
        ),
    ];
    let subs: Vec<(Job, u64)> =
        jobs.iter().enumerate().map(|(i, (d, _))| (Job::Decode(*d), i as u64)).collect();
    assert_eq!(c.submit(&subs).unwrap(), subs.len());
    let mut done = Vec::new();
    while done.len() < subs.len() {
        assert!(c.wait(Some(Duration::from_secs(30))).unwrap());
        c.reap(&mut done, 16).unwrap();
    }
    for x in &done {
        assert_eq!(x.status, jobs[x.user_data as usize].1, "case {}", x.user_data);
    }
    // Models: the per-session count, and handles that do not exist.
    let _m2 = c.load_model(&default_model()).unwrap();
    assert_eq!(c.load_model(&default_model()).unwrap_err().status(), Status::LimitExceeded);
    c.free_context(&small).unwrap();
    assert_eq!(c.free_context(&small).unwrap_err().status(), Status::NotFound);
    c.free_model(&m).unwrap();
    assert_eq!(c.free_model(&m).unwrap_err().status(), Status::NotFound);
    d.assert_healthy();
}

#[test]
fn a_client_killed_mid_decode_is_cleaned_up() {
    let mut d = Daemon::start();
    let mut observer = d.client();
    let mut child = Command::new(CLIENT)
        .arg("decode")
        .arg(&d.socket)
        .arg(default_model())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let session: u64 =
        line.trim().strip_prefix("ready ").and_then(|s| s.parse().ok()).expect("ready line");
    assert!(eventually(Duration::from_secs(30), || {
        observer.status().unwrap().sessions.iter().any(|s| s.id == session && s.tokens_decoded > 0)
    }));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    assert!(eventually(Duration::from_secs(30), || {
        let st = observer.status().unwrap();
        !st.sessions.iter().any(|s| s.id == session) && st.models.is_empty()
    }));
    d.assert_healthy();
    // The daemon still runs models for others.
    let m = observer.load_model(&default_model()).unwrap();
    let ctx = observer.create_context(&m, &greedy_ctx()).unwrap();
    observer.decode(&ctx, &[504, 3575], LogitsWanted::Last, true).unwrap();
}

#[test]
fn unicorn_run_generates_text_and_reports_speeds() {
    let d = Daemon::start();
    let mut cmd = Command::new(bin("unicorn"));
    cmd.arg("--socket").arg(&d.socket).args([
        "run",
        "--greedy",
        "-n",
        "6",
        "The capital of France is",
    ]);
    let (status, out, err) = run(&mut cmd);
    assert!(status.success(), "{err}");
    assert!(out.starts_with("The capital of France is Paris"), "{out}");
    assert!(err.contains("prefill: 5 tokens") && err.contains("tokens/s"), "{err}");
    let mut cmd = Command::new(bin("unicorn"));
    cmd.arg("--socket").arg(&d.socket).args([
        "run",
        "--json",
        "--greedy",
        "-n",
        "4",
        "The capital of France is",
    ]);
    let (status, out, err) = run(&mut cmd);
    assert!(status.success(), "{err}");
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert_eq!(lines[0]["piece"], " Paris");
    let summary = &lines[4]["summary"];
    assert_eq!(summary["prompt_tokens"], serde_json::json!([504, 3575, 282, 4649, 314]));
    assert_eq!(summary["n_generated"], 4);
    assert!(summary["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    // Chat through the model's template, one turn.
    let mut cmd = Command::new(bin("unicorn"));
    cmd.arg("--socket").arg(&d.socket).args([
        "chat",
        "--greedy",
        "-n",
        "12",
        "-p",
        "What is the capital of France?",
    ]);
    let (status, out, err) = run(&mut cmd);
    assert!(status.success(), "{err}");
    assert!(!out.trim().is_empty(), "empty answer; {err}");
    // A missing model file is a clear error.
    let mut cmd = Command::new(bin("unicorn"));
    cmd.arg("--socket").arg(&d.socket).args(["run", "-m", "/nonexistent.gguf", "hi"]);
    let (status, _, err) = run(&mut cmd);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("/nonexistent.gguf"), "{err}");
    let _ = Client::connect(&d.options()).unwrap();
}
