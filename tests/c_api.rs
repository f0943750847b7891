//! The C API test: `tests/c/api_test.c` built with `-Wall -Wextra -Werror` and the address and
//! undefined-behaviour sanitizers against an installed copy of the header and the library
//! (`include/unicorn.h`, `lib/libunicorn.so.1` and its `libunicorn.so` link), run against a
//! real daemon.

use std::path::Path;
use std::process::Command;

use unicorn_tests::{repo_root, run, target_dir, Daemon, TempDir};

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

#[test]
fn c_program_with_sanitizers_against_a_real_daemon() {
    let tmp = TempDir::new("capi");
    install(tmp.path());
    let exe = tmp.path().join("api_test");
    let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cc.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-g", "-O1"])
        .args([
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer",
        ])
        .arg("-D_POSIX_C_SOURCE=200809L")
        .arg(format!("-I{}", tmp.path().join("include").display()))
        .arg(repo_root().join("tests/c/api_test.c"))
        .arg(format!("-L{}", tmp.path().join("lib").display()))
        .arg("-lunicorn")
        .arg(format!("-Wl,-rpath,{}", tmp.path().join("lib").display()))
        .arg("-o")
        .arg(&exe);
    let (status, out, err) = run(&mut cc);
    assert!(status.success(), "compiling the C test failed:\n{out}{err}");
    // The program loads the library by its SONAME, from the install prefix.
    let (_, needed, _) = run(Command::new("readelf").arg("-d").arg(&exe));
    assert!(needed.contains("[libunicorn.so.1]"), "{needed}");

    let d = Daemon::start();
    let (status, out, err) = run(Command::new(&exe)
        .arg(&d.socket)
        .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1")
        .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1"));
    assert!(
        status.success(),
        "the C test failed ({status}):\n{out}{err}\ndaemon log:\n{}",
        d.log()
    );
    assert!(out.contains("c api test ok"), "{out}");
}
