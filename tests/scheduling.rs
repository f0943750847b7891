//! Many client processes on one model: batching does not change results, realtime work keeps
//! its latency under background load, per-user quotas, cancellation, and a client killed in
//! the middle of a batch.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use unicorn::protocol::{Decode, Job, SamplerParams, TokenInput};
use unicorn::{ClientOptions, ContextParams, LogitsWanted, Priority, Status};
use unicorn_tests::{default_model, Daemon};

const CLIENT: &str = env!("CARGO_BIN_EXE_unicorn-test-client");

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
];

/// A test-client process waiting at its start line.
struct Ready {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

fn spawn(d: &Daemon, mode: &str, extra: &[&str]) -> Ready {
    let mut child = Command::new(CLIENT)
        .arg(mode)
        .arg(&d.socket)
        .arg(default_model())
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn test client");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "unexpected start of the test client: {line:?}");
    let stdin = child.stdin.take().unwrap();
    Ready { child, stdin, stdout }
}

fn greedy(d: &Daemon, n: usize, priority: &str, prompt: &str) -> Ready {
    spawn(d, "greedy", &[&n.to_string(), priority, prompt])
}

/// Releases a waiting greedy client.
fn go(r: &mut Ready) {
    r.stdin.write_all(b"go\n").unwrap();
    r.stdin.flush().unwrap();
}

/// Collects a greedy client's result: (tokens, per-token latencies in µs).
fn result(mut r: Ready) -> (Vec<u64>, Vec<u64>) {
    let mut line = String::new();
    r.stdout.read_line(&mut line).unwrap();
    let status = r.child.wait().unwrap();
    assert!(status.success(), "test client failed: {status}");
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let list = |k: &str| v[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    (list("tokens"), list("latencies_us"))
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn concurrent_clients_get_exactly_the_tokens_they_get_alone() {
    let d = Daemon::start();
    let mut observer = d.client();
    // Alone, one after the other.
    let alone: Vec<Vec<u64>> = PROMPTS
        .iter()
        .map(|p| {
            let mut r = greedy(&d, 24, "normal", p);
            go(&mut r);
            result(r).0
        })
        .collect();
    let before = observer.status().unwrap().engine_batched_steps;
    // Together: four processes released at once.
    let mut all: Vec<Ready> = PROMPTS.iter().map(|p| greedy(&d, 24, "normal", p)).collect();
    for r in &mut all {
        go(r);
    }
    let together: Vec<Vec<u64>> = all.into_iter().map(|r| result(r).0).collect();
    let batched = observer.status().unwrap().engine_batched_steps - before;
    assert!(batched > 10, "only {batched} steps batched several clients");
    // Batching reads each client's rows of every matrix exactly as alone (the engine's
    // `batching` test shows the logits are bit-identical), so the tokens are identical too.
    assert_eq!(together, alone);
}

#[test]
fn clients_that_start_out_of_phase_end_up_sharing_steps() {
    // A scheduler that starts a step as soon as one token is queued lets two token-by-token
    // clients alternate for ever (each one's next token arrives while the other's step runs):
    // one token per step, no batching. Start a short client in the middle of a long one's
    // decoding and count the steps.
    let d = Daemon::start();
    let mut observer = d.client();
    let (long, short) = (128u64, 48u64);
    let mut a = greedy(&d, long as usize, "normal", PROMPTS[0]);
    let mut b = greedy(&d, short as usize, "normal", PROMPTS[1]);
    let before = observer.status().unwrap();
    go(&mut a);
    assert!(unicorn_tests::eventually(Duration::from_secs(30), || {
        observer.status().unwrap().engine_steps >= before.engine_steps + 8
    }));
    go(&mut b);
    let (tb, _) = result(b);
    let (ta, _) = result(a);
    assert_eq!((ta.len() as u64, tb.len() as u64), (long, short));
    let after = observer.status().unwrap();
    let steps = after.engine_steps - before.engine_steps;
    let batched = after.engine_batched_steps - before.engine_batched_steps;
    // Alternating takes long + short steps, none batched; sharing about long + 1.
    assert!(
        steps <= long + short / 2 && batched >= short / 2,
        "{steps} steps ({batched} batched) for clients of {long} and {short} tokens"
    );
}

#[test]
fn a_realtime_client_keeps_its_latency_while_background_clients_saturate() {
    let mut d = Daemon::start_with_policy(Some("[limits]\nmax_priority = \"realtime\"\n"));
    let prompt = PROMPTS[0];
    // Alone.
    let mut r = greedy(&d, 24, "realtime", prompt);
    go(&mut r);
    let (alone_tokens, mut alone_lat) = result(r);
    let alone = median(&mut alone_lat);
    // Three background clients prefilling 512-token prompts without pause.
    let background: Vec<Ready> =
        (0..3).map(|_| spawn(&d, "prefill-loop", &["background"])).collect();
    let mut observer = d.client();
    assert!(unicorn_tests::eventually(Duration::from_secs(30), || {
        observer.status().unwrap().sessions.iter().filter(|s| s.tokens_decoded >= 512).count() >= 3
    }));
    let mut r = greedy(&d, 24, "realtime", prompt);
    go(&mut r);
    let (tokens, mut lat) = result(r);
    let loaded = median(&mut lat);
    let st = observer.status().unwrap();
    for mut b in background {
        let _ = b.child.kill();
        let _ = b.child.wait();
    }
    eprintln!(
        "realtime per-token latency: alone {alone} us, beside 3 background prefills {loaded} us"
    );
    assert_eq!(tokens, alone_tokens);
    // A 512-token background prefill takes far longer than a decode step (hundreds of ms on two
    // cores): a realtime token queued behind it would show that. The realtime client's median
    // token stays within a few decode steps of its latency alone.
    assert!(
        loaded < 4 * alone + 20_000,
        "realtime latency {loaded} us under load, {alone} us alone"
    );
    let busy = st.sessions.iter().filter(|s| s.priority == Priority::Background).count();
    assert_eq!(busy, 3, "the background clients were not running");
    d.assert_healthy();
}

#[test]
fn contexts_and_kv_positions_are_limited_per_user_across_sessions() {
    let policy = "[limits]\nmax_contexts = 3\nmax_kv_tokens = 1024\nmax_buffer_bytes = 65536\n";
    let mut d = Daemon::start_with_policy(Some(policy));
    let (mut a, mut b) = (d.client(), d.client());
    let ma = a.load_model(&default_model()).unwrap();
    let mb = b.load_model(&default_model()).unwrap();
    let p = |n_ctx| ContextParams { n_ctx, kv_f32: false, sampler: SamplerParams::GREEDY };
    a.create_context(&ma, &p(512)).unwrap();
    b.create_context(&mb, &p(256)).unwrap();
    // 768 of the user's 1024 positions are taken, by two sessions together.
    let e = a.create_context(&ma, &p(512)).unwrap_err();
    assert_eq!(e.status(), Status::LimitExceeded);
    assert!(e.message().contains("this user"), "{e}");
    let c = b.create_context(&mb, &p(128)).unwrap();
    // Three contexts are the user's maximum.
    let e = a.create_context(&ma, &p(16)).unwrap_err();
    assert_eq!(e.status(), Status::LimitExceeded);
    b.free_context(&c).unwrap();
    a.create_context(&ma, &p(16)).unwrap();
    // Buffer bytes too.
    let f1 = unicorn::sys::memfd::create_sealed_memfd("q", 49152).unwrap();
    let f2 = unicorn::sys::memfd::create_sealed_memfd("q", 32768).unwrap();
    a.register_buffer(&f1, 49152).unwrap();
    assert_eq!(b.register_buffer(&f2, 32768).unwrap_err().status(), Status::LimitExceeded);
    drop((a, b));
    d.assert_healthy();
}

/// A client with a 4096-position context that holds two tokens.
fn two_tokens_decoded(d: &Daemon) -> (unicorn::Client, unicorn::ModelContext) {
    let mut c = d.client();
    let m = c.load_model(&default_model()).unwrap();
    let ctx = c.create_context(&m, &ContextParams { n_ctx: 4096, ..Default::default() }).unwrap();
    let before = c.decode(&ctx, &[504, 3575], LogitsWanted::None, false).unwrap().n_past;
    assert_eq!(before, 2);
    (c, ctx)
}

#[test]
fn a_long_decode_can_be_cancelled_and_leaves_its_context_as_it_was() {
    let mut d = Daemon::start();
    let (mut c, ctx) = two_tokens_decoded(&d);
    // 4000 tokens take seconds; the CANCEL goes right behind the DECODE.
    let buf = unicorn::sys::memfd::create_sealed_memfd("tokens", 16384).unwrap();
    let h = c.register_buffer(&buf, 16384).unwrap();
    let input = TokenInput::Buffer { buffer: h, offset: 0, n: 4000 };
    let decode = Job::Decode(Decode {
        ctx: ctx.handle(),
        input,
        logits: None,
        sample: true,
        rewind_to: None,
    });
    assert_eq!(
        c.submit(&[(decode, 1), (Job::Cancel { target: 1 }, 2), (Job::Cancel { target: 99 }, 3)])
            .unwrap(),
        3
    );
    let mut done = Vec::new();
    while done.len() < 3 {
        assert!(c.wait(Some(Duration::from_secs(60))).unwrap());
        c.reap(&mut done, 8).unwrap();
    }
    let status = |u: u64| done.iter().find(|x| x.user_data == u).unwrap().status;
    assert_eq!(status(2), Status::Ok, "the CANCEL found its job");
    assert_eq!(status(3), Status::NotFound, "a CANCEL of nothing");
    assert_eq!(status(1), Status::Cancelled);
    // The context is where it was before the cancelled job.
    let after = c.decode(&ctx, &[282], LogitsWanted::None, false).unwrap().n_past;
    assert_eq!(after, 3);
    d.assert_healthy();
}

#[test]
fn a_cancellable_decode_stops_when_its_flag_is_set_from_another_thread() {
    let mut d = Daemon::start();
    let (mut c, ctx) = two_tokens_decoded(&d);
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let setter = {
        let flag = flag.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            flag.store(true, std::sync::atomic::Ordering::Release);
        })
    };
    // 4000 tokens take seconds: the flag is set long before they are done.
    let tokens = vec![282u32; 4000];
    let start = std::time::Instant::now();
    let err = c.decode_cancellable(&ctx, &tokens, LogitsWanted::None, true, &flag).unwrap_err();
    setter.join().unwrap();
    assert_eq!(err.status(), Status::Cancelled, "{err}");
    assert!(start.elapsed() < Duration::from_secs(20));
    // Neither the decode's nor the CANCEL's completion is left for the caller to reap.
    let mut stray = Vec::new();
    assert_eq!(c.reap(&mut stray, 8).unwrap(), 0, "{stray:?}");
    assert_eq!(c.in_flight(), 0);
    // The context is where it was before the cancelled decode; an unset flag changes nothing.
    let idle = std::sync::atomic::AtomicBool::new(false);
    let out = c.decode_cancellable(&ctx, &[282], LogitsWanted::None, true, &idle).unwrap();
    assert_eq!(out.n_past, 3);
    assert!(out.token.is_some());
    d.assert_healthy();
}

#[test]
fn a_client_killed_mid_batch_does_not_disturb_the_others() {
    let mut d = Daemon::start();
    let alone: Vec<Vec<u64>> = PROMPTS[..3]
        .iter()
        .map(|p| {
            let mut r = greedy(&d, 24, "normal", p);
            go(&mut r);
            result(r).0
        })
        .collect();
    let mut victim = greedy(&d, 500, "normal", PROMPTS[3]);
    let mut others: Vec<Ready> = PROMPTS[..3].iter().map(|p| greedy(&d, 24, "normal", p)).collect();
    go(&mut victim);
    for r in &mut others {
        go(r);
    }
    std::thread::sleep(Duration::from_millis(100));
    kill(Pid::from_raw(victim.child.id() as i32), Signal::SIGKILL).unwrap();
    victim.child.wait().unwrap();
    let together: Vec<Vec<u64>> = others.into_iter().map(|r| result(r).0).collect();
    assert_eq!(together, alone);
    d.assert_healthy();
    let _ = ClientOptions::default();
}
