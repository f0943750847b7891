//! A real client process for the cross-process tests.
//!
//!     unicorn-test-client nops SOCKET N    submit N NOPs (user_data 0..N) in batches, check that
//!                                          each completes exactly once, print "ok N"
//!     unicorn-test-client hold SOCKET      register a buffer, leave delayed NOPs in flight,
//!                                          print "ready SESSION", then ping until killed
//!     unicorn-test-client decode SOCKET MODEL
//!                                          load MODEL, print "ready SESSION", then decode
//!                                          long prompts until killed
//!     unicorn-test-client greedy SOCKET MODEL N PRIORITY PROMPT
//!                                          load MODEL, print "ready", wait for a line on
//!                                          stdin, then decode PROMPT and N greedy tokens;
//!                                          print {"tokens": [...], "latencies_us": [...]}
//!     unicorn-test-client prefill-loop SOCKET MODEL PRIORITY
//!                                          print "ready", then prefill 512-token prompts
//!                                          until killed

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use unicorn::{Client, ClientOptions, Completion, Job, Status, WaitMode};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 || args.iter().any(|a| a == "--help") {
        eprintln!("usage: unicorn-test-client nops SOCKET N | hold SOCKET");
        std::process::exit(2);
    }
    let priority = match args[1].as_str() {
        "greedy" => args.get(5),
        "prefill-loop" => args.get(4),
        _ => None,
    };
    let priority = priority
        .map(|p| unicorn::Priority::from_name(p).unwrap_or_else(|| fail(&format!("priority {p}"))))
        .unwrap_or(unicorn::Priority::Normal);
    let opts = ClientOptions {
        socket: Some(PathBuf::from(&args[2])),
        name: format!("test-client-{}", std::process::id()),
        wait: WaitMode::Adaptive,
        priority,
        ..ClientOptions::default()
    };
    let mut client = Client::connect(&opts).unwrap_or_else(|e| fail(&format!("connect: {e}")));
    match args[1].as_str() {
        "nops" => {
            let n: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or_else(|| fail("N"));
            nops(&mut client, n);
            println!("ok {n}");
        }
        "hold" => hold(&mut client),
        "decode" => decode(&mut client, args.get(3).unwrap_or_else(|| fail("MODEL"))),
        "greedy" => {
            let n: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or_else(|| fail("N"));
            let prompt = args.get(6).unwrap_or_else(|| fail("PROMPT"));
            greedy(&mut client, &args[3], n, prompt);
        }
        "prefill-loop" => prefill_loop(&mut client, &args[3]),
        other => fail(&format!("unknown mode {other}")),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("unicorn-test-client: {msg}");
    std::process::exit(1);
}

fn nops(client: &mut Client, n: usize) {
    let mut seen = vec![false; n];
    let mut next = 0usize;
    let mut done = 0usize;
    let mut got: Vec<Completion> = Vec::with_capacity(512);
    while done < n {
        if next < n {
            let batch: Vec<(Job, u64)> = (next..n.min(next + 100))
                .map(|i| (Job::Nop { delay: Duration::ZERO }, i as u64))
                .collect();
            next += client.submit(&batch).unwrap_or_else(|e| fail(&format!("submit: {e}")));
        }
        got.clear();
        let k = client.reap(&mut got, usize::MAX).unwrap_or_else(|e| fail(&format!("reap: {e}")));
        if k == 0 {
            let ready = client
                .wait(Some(Duration::from_secs(30)))
                .unwrap_or_else(|e| fail(&format!("wait: {e}")));
            if !ready {
                fail(&format!("no completion within 30 s with {} in flight", client.in_flight()));
            }
        }
        for c in &got {
            if c.status != Status::Ok {
                fail(&format!("NOP {} failed: {}", c.user_data, c.status));
            }
            let i = usize::try_from(c.user_data).ok().filter(|i| *i < n);
            let Some(i) = i else {
                fail(&format!("completion for a job never submitted: {}", c.user_data))
            };
            if seen[i] {
                fail(&format!("NOP {i} completed twice"));
            }
            seen[i] = true;
            done += 1;
        }
    }
    if client.in_flight() != 0 {
        fail(&format!("{} jobs still in flight after all completed", client.in_flight()));
    }
}

fn decode(client: &mut Client, model: &str) {
    let m = client
        .load_model(std::path::Path::new(model))
        .unwrap_or_else(|e| fail(&format!("load: {e}")));
    let ctx = client
        .create_context(&m, &unicorn::ContextParams { n_ctx: 1024, ..Default::default() })
        .unwrap_or_else(|e| fail(&format!("context: {e}")));
    println!("ready {}", client.welcome().session_id);
    std::io::stdout().flush().ok();
    let prompt: Vec<u32> = (0..512).map(|i| 100 + i).collect();
    loop {
        client.rewind(&ctx, 0).unwrap_or_else(|e| fail(&format!("rewind: {e}")));
        client
            .decode(&ctx, &prompt, unicorn::LogitsWanted::Last, true)
            .unwrap_or_else(|e| fail(&format!("decode: {e}")));
    }
}

fn load(client: &mut Client, model: &str, n_ctx: u32) -> (unicorn::Model, unicorn::ModelContext) {
    let m = client
        .load_model(std::path::Path::new(model))
        .unwrap_or_else(|e| fail(&format!("load: {e}")));
    let params =
        unicorn::ContextParams { n_ctx, kv_f32: false, sampler: unicorn::SamplerParams::GREEDY };
    let ctx = client.create_context(&m, &params).unwrap_or_else(|e| fail(&format!("context: {e}")));
    (m, ctx)
}

fn greedy(client: &mut Client, model: &str, n: usize, prompt: &str) {
    use std::io::BufRead;
    let (m, ctx) = load(client, model, 512);
    let ids = client
        .tokenize(&m, prompt, true, false)
        .unwrap_or_else(|e| fail(&format!("tokenize: {e}")));
    println!("ready");
    std::io::stdout().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).ok();
    let step = |c: &mut Client, t: &[u32]| {
        c.decode(&ctx, t, unicorn::LogitsWanted::None, true)
            .unwrap_or_else(|e| fail(&format!("decode: {e}")))
            .token
            .unwrap_or_else(|| fail("no token"))
    };
    let mut tokens = vec![step(client, &ids)];
    let mut latencies = Vec::new();
    while tokens.len() < n {
        let t0 = std::time::Instant::now();
        let t = step(client, &[*tokens.last().expect("one token")]);
        latencies.push(t0.elapsed().as_micros() as u64);
        tokens.push(t);
    }
    println!("{{\"tokens\": {tokens:?}, \"latencies_us\": {latencies:?}}}");
}

fn prefill_loop(client: &mut Client, model: &str) {
    let (_, ctx) = load(client, model, 1024);
    println!("ready");
    std::io::stdout().flush().ok();
    let prompt: Vec<u32> = (0..512).map(|i| 200 + i).collect();
    loop {
        client.rewind(&ctx, 0).unwrap_or_else(|e| fail(&format!("rewind: {e}")));
        client
            .decode(&ctx, &prompt, unicorn::LogitsWanted::None, false)
            .unwrap_or_else(|e| fail(&format!("decode: {e}")));
    }
}

fn hold(client: &mut Client) {
    use unicorn::sys::memfd;
    let fd = memfd::create_sealed_memfd("hold", 1 << 16)
        .unwrap_or_else(|e| fail(&format!("memfd: {e}")));
    client.register_buffer(&fd, 1 << 16).unwrap_or_else(|e| fail(&format!("register: {e}")));
    let jobs: Vec<(Job, u64)> =
        (0..16).map(|i| (Job::Nop { delay: Duration::from_secs(10) }, i)).collect();
    client.submit(&jobs).unwrap_or_else(|e| fail(&format!("submit: {e}")));
    println!("ready {}", client.welcome().session_id);
    std::io::stdout().flush().ok();
    loop {
        client.ping().unwrap_or_else(|e| fail(&format!("ping: {e}")));
        std::thread::sleep(Duration::from_millis(1));
    }
}
