//! The C API tests: `tests/c/api_test.c` (sessions, rings), `tests/c/model_test.c` (models,
//! tokens, contexts, decoding) and the example `examples/c/generate.c`, each built with `-Wall
//! -Wextra -Werror -pedantic` and the address and undefined-behaviour sanitizers against an
//! installed copy of the header and the library (`include/unicorn.h`, `lib/libunicorn.so.1` and
//! its `libunicorn.so` link), run against a real daemon. The model tests need the default model
//! (`scripts/fetch-model`).

use std::path::{Path, PathBuf};
use std::process::Command;

use unicorn_tests::{default_model, repo_root, run, target_dir, Daemon, TempDir};

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
