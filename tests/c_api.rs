//! The C API tests: `tests/c/api_test.c` (sessions, rings), `tests/c/model_test.c` (models,
//! tokens, contexts, decoding), the example `examples/c/generate.c` and the benchmark's client
//! `scripts/decode-worker.c`, each built with `-Wall
//! -Wextra -Werror -pedantic` and the address and undefined-behaviour sanitizers against an
//! installed copy of the header and the library (`include/unicorn.h`, `lib/libunicorn.so.1` and
//! its `libunicorn.so` link), run against a real daemon. The model tests need the default model
//! (`scripts/fetch-model`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use unicorn_tests::{bin, default_model, repo_root, run, target_dir, Daemon, TempDir};

/// Installs the header and the library into `prefix` the way a package does.
fn install(prefix: &Path) {
    let lib = prefix.join("lib");
    let inc = prefix.join("include");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::create_dir_all(&inc).unwrap();
    let built = target_dir().join("libunicorn.so");
    assert!(built.is_file(), "{} is missing: build the workspace first", built.display());
    std::fs::copy(&built, lib.join("libunicorn.so.1")).unwrap();
    std::os::unix::fs::symlink("libunicorn.so.1", lib.join("libunicorn.so")).unwrap();
    std::fs::copy(repo_root().join("include/unicorn.h"), inc.join("unicorn.h")).unwrap();
}

#[test]
fn the_library_carries_its_soname_and_exports_only_unicorn_symbols() {
    let lib = target_dir().join("libunicorn.so");
    let (status, out, err) = run(Command::new("readelf").arg("-d").arg(&lib));
    assert!(status.success(), "readelf: {err}");
    assert!(out.contains("Library soname: [libunicorn.so.1]"), "{out}");
    let (status, out, err) = run(Command::new("nm").arg("-D").arg("--defined-only").arg(&lib));
    assert!(status.success(), "nm: {err}");
    let exported: Vec<&str> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[1] == "T").then_some(f[2])
        })
        .collect();
    assert!(exported.contains(&"unicorn_connect"), "{exported:?}");
    let foreign: Vec<_> = exported.iter().filter(|s| !s.starts_with("unicorn_")).collect();
    assert!(foreign.is_empty(), "functions exported beyond unicorn_*: {foreign:?}");
}

/// Builds the C program `source` (relative to the repository) against the installed copy under
/// `prefix`, with every warning an error and the sanitizers on; returns the executable.
fn build_c(prefix: &Path, source: &str) -> PathBuf {
    let name = Path::new(source).file_stem().expect("a file name");
    let exe = prefix.join(name);
    let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cc.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-g", "-O1"])
        .args([
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer",
        ])
        .arg("-D_POSIX_C_SOURCE=200809L")
        .arg(format!("-I{}", prefix.join("include").display()))
        .arg(repo_root().join(source))
        .arg(format!("-L{}", prefix.join("lib").display()))
        .arg("-lunicorn")
        .arg("-lm")
        .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()))
        .arg("-o")
        .arg(&exe);
    let (status, out, err) = run(&mut cc);
    assert!(status.success(), "compiling {source} failed:\n{out}{err}");
    // The program loads the library by its SONAME, from the install prefix.
    let (_, needed, _) = run(Command::new("readelf").arg("-d").arg(&exe));
    assert!(needed.contains("[libunicorn.so.1]"), "{needed}");
    exe
}

/// A command for a sanitized C program: leaks are errors, and so is any undefined behaviour.
fn sanitized(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1")
        .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1");
    cmd
}

#[test]
fn c_program_with_sanitizers_against_a_real_daemon() {
    let tmp = TempDir::new("capi");
    install(tmp.path());
    let exe = build_c(tmp.path(), "tests/c/api_test.c");
    let d = Daemon::start();
    let (status, out, err) = run(sanitized(&exe).arg(&d.socket));
    assert!(
        status.success(),
        "the C test failed ({status}):\n{out}{err}\ndaemon log:\n{}",
        d.log()
    );
    assert!(out.contains("c api test ok"), "{out}");
}

#[test]
fn c_model_api_with_sanitizers_against_a_real_daemon() {
    let model = default_model();
    let tmp = TempDir::new("capi-model");
    install(tmp.path());
    let exe = build_c(tmp.path(), "tests/c/model_test.c");
    let d = Daemon::start();
    let (status, out, err) = run(sanitized(&exe).arg(&d.socket).arg(&model));
    assert!(
        status.success(),
        "the C model test failed ({status}):\n{out}{err}\ndaemon log:\n{}",
        d.log()
    );
    assert!(out.contains("c model test ok"), "{out}");
}

#[test]
fn the_c_example_generates_text() {
    let model = default_model();
    let model_dir = model.parent().expect("the model is in a directory");
    let tmp = TempDir::new("capi-generate");
    install(tmp.path());
    let exe = build_c(tmp.path(), "examples/c/generate.c");
    let d = Daemon::start();
    let prompt = "The capital of France is";

    // The default model, found through $UNICORN_MODEL_DIR; the daemon through $UNICORN_SOCKET.
    let (status, out, err) = run(sanitized(&exe)
        .args(["-n", "16", prompt])
        .env("UNICORN_SOCKET", &d.socket)
        .env("UNICORN_MODEL_DIR", model_dir));
    assert!(status.success(), "generate failed ({status}):\n{out}{err}\ndaemon log:\n{}", d.log());
    // SmolLM2's greedy continuation, as llama.cpp gives it: " Paris.\n\nThe ...".
    assert!(out.starts_with(prompt), "{out:?}");
    assert!(out[prompt.len()..].starts_with(" Paris."), "{out:?}");
    assert!(err.contains("tokens/s"), "{err}");
    assert!(err.contains("generated 16 tokens"), "{err}");

    // -m names the model; -n 0 prints only the prompt.
    let (status, out, err) = run(sanitized(&exe)
        .args(["-n", "0", "-m"])
        .arg(&model)
        .arg(prompt)
        .env("UNICORN_SOCKET", &d.socket));
    assert!(status.success(), "generate -n 0 failed ({status}):\n{out}{err}");
    assert_eq!(out, format!("{prompt}\n"));

    // Errors say what went wrong.
    let (status, _, err) = run(sanitized(&exe)
        .args(["-m", "/nonexistent/model.gguf", prompt])
        .env("UNICORN_SOCKET", &d.socket));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("/nonexistent/model.gguf") && err.contains("invalid argument"), "{err}");
    let empty = TempDir::new("capi-no-models");
    let (status, _, err) = run(sanitized(&exe)
        .arg(prompt)
        .env("UNICORN_SOCKET", &d.socket)
        .env("UNICORN_MODEL_DIR", empty.path()));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("scripts/fetch-model"), "{err}");
    let (status, _, err) = run(sanitized(&exe)
        .args(["-m"])
        .arg(&model)
        .arg(prompt)
        .env("UNICORN_SOCKET", tmp.path().join("no-daemon.sock")));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("no unicornd answered"), "{err}");
    let (status, _, err) = run(&mut sanitized(&exe));
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("usage"), "{err}");
}

/// Runs one many-clients benchmark worker through its barriers ("ready", a line to start, its
/// JSON line, a line to exit) and returns the JSON.
fn run_worker(cmd: &mut Command) -> serde_json::Value {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the worker");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read the worker");
    if line != "ready\n" {
        let err = child.wait_with_output().expect("worker output");
        panic!("the worker said {line:?}:\n{}", String::from_utf8_lossy(&err.stderr));
    }
    stdin.write_all(b"go\n").expect("release the worker");
    line.clear();
    out.read_line(&mut line).expect("read the worker's result");
    let json: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    drop(stdin); // the end of stdin lets it exit
    let done = child.wait_with_output().expect("wait for the worker");
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    json
}

#[test]
fn the_benchmarks_c_client_measures_what_the_clis_does() {
    let model = default_model();
    let tmp = TempDir::new("capi-decode-worker");
    install(tmp.path());
    let exe = build_c(tmp.path(), "scripts/decode-worker.c");
    let d = Daemon::start();
    let args = ["--tokens", "6", "--prompt-tokens", "16", "--warmup", "2"];
    let c = run_worker(
        sanitized(&exe).arg("--socket").arg(&d.socket).arg("--model").arg(&model).args(args),
    );
    let cli = run_worker(
        Command::new(bin("unicorn"))
            .args(["--no-spawn", "--socket"])
            .arg(&d.socket)
            .args(["bench", "decode-worker", "-m"])
            .arg(&model)
            .args(args),
    );
    for w in [&c, &cli] {
        assert_eq!(w["engine"], "unicorn", "{w}");
        assert_eq!(w["tokens"], 6, "{w}");
        assert_eq!(w["prompt_tokens"], 16, "{w}");
        assert_eq!(w["model"], "SmolLM2-135M-Instruct.Q4_1.gguf", "{w}");
        let f = |k: &str| w[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {w}"));
        assert!(f("start_ns") < f("end_ns"), "{w}");
        assert!(0.0 < f("p50_ms") && f("p50_ms") <= f("p99_ms"), "{w}");
        assert!(f("p99_ms") <= f("max_ms") && f("mean_ms") <= f("max_ms"), "{w}");
        assert!(f("rss_kib") > 0.0 && f("rss_kib") <= f("hwm_kib"), "{w}");
    }
    assert_eq!(c["client"], "c");
    // A file name is written as a JSON string, whatever it holds.
    let odd = tmp.path().join("a \"quoted\"\\name\t.gguf");
    std::os::unix::fs::symlink(&model, &odd).unwrap();
    let w = run_worker(
        sanitized(&exe).arg("--socket").arg(&d.socket).arg("--model").arg(&odd).args(args),
    );
    assert_eq!(w["model"], "a \"quoted\"\\name\t.gguf", "{w}");
    // The same prompt and greedy decoding through either client: the same tokens.
    assert_eq!(c["head"].as_array().map(Vec::len), Some(6), "{c}");
    assert_eq!(c["head"], cli["head"]);

    // Bad arguments say what is wrong.
    let (status, _, err) =
        run(sanitized(&exe).args(["--model"]).arg(&model).args(["--tokens", "0"]));
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--tokens wants a number from 1"), "{err}");
    let (status, _, err) = run(sanitized(&exe).args(["--model", "m.gguf", "--frobnicate", "1"]));
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("unknown option --frobnicate") && err.contains("usage"), "{err}");
    let (status, _, err) = run(sanitized(&exe)
        .arg("--socket")
        .arg(&d.socket)
        .args(["--model", "/nonexistent/model.gguf"]));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
    let (status, _, err) = run(sanitized(&exe).args(["--model", "m.gguf", "--tokens"]));
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--tokens wants a value"), "{err}");
    let (status, _, err) = run(sanitized(&exe).args(["--tokens", "3"]));
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--model is required"), "{err}");
    let (status, out, _) = run(sanitized(&exe).arg("--help"));
    assert!(status.success() && out.starts_with("usage: decode-worker"), "{out}");
}
