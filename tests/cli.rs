//! The `unicorn` command line against a real daemon, and starting a user daemon on demand.

use std::process::Command;
use std::time::Duration;

use unicorn_tests::{bin, eventually, run, Daemon, TempDir};

fn unicorn(d: &Daemon) -> Command {
    let mut c = Command::new(bin("unicorn"));
    c.arg("--socket").arg(&d.socket);
    c
}

#[test]
fn help_lists_the_commands() {
    let (status, out, _) = run(Command::new(bin("unicorn")).arg("--help"));
    assert!(status.success());
    for cmd in ["status", "ping", "bench"] {
        assert!(out.contains(cmd), "{out}");
    }
    let (status, _, err) = run(Command::new(bin("unicorn")).args(["ping", "-n", "0"]));
    assert_eq!(status.code(), Some(2), "{err}");
}

#[test]
fn status_and_ping() {
    let d = Daemon::start();
    let (status, out, err) = run(unicorn(&d).arg("status"));
    assert!(status.success(), "{err}");
    assert!(out.contains(&format!("pid {}", d.pid())), "{out}");
    assert!(
        out.contains("user mode") && out.contains("cpu") && out.contains("(this command)"),
        "{out}"
    );
    // The CPU entry says where each class of operations runs.
    assert!(out.contains("placement: attention="), "{out}");
    let (status, out, err) = run(unicorn(&d).args(["status", "--json"]));
    assert!(status.success(), "{err}");
    assert!(out.contains(&format!("\"pid\":{}", d.pid())), "{out}");
    let (status, out, err) = run(unicorn(&d).args(["ping", "-n", "200"]));
    assert!(status.success(), "{err}");
    assert!(out.contains("200 pings") && out.contains("p50") && out.contains("p99"), "{out}");
    for mode in ["sleep", "spin"] {
        let (status, _, err) = run(unicorn(&d).args(["ping", "-n", "20", "--mode", mode]));
        assert!(status.success(), "{mode}: {err}");
    }
}

#[test]
fn no_daemon_and_no_spawn_is_a_clear_error() {
    let dir = TempDir::new("nospawn");
    let (status, _, err) = run(Command::new(bin("unicorn"))
        .arg("--no-spawn")
        .arg("--socket")
        .arg(dir.path().join("none.sock"))
        .arg("status"));
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("no daemon") || err.contains("no unicornd"), "{err}");
}

#[test]
fn a_first_run_starts_a_user_daemon() {
    let dir = TempDir::new("spawn");
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    let (status, out, err) = run(Command::new(bin("unicorn"))
        .args(["status", "--json"])
        .env("XDG_RUNTIME_DIR", &runtime)
        .env_remove("UNICORN_SOCKET"));
    assert!(status.success(), "{err}");
    assert!(err.contains("starting"), "{err}");
    let socket = runtime.join("unicorn/unicornd.sock");
    assert!(out.contains(&socket.display().to_string()), "{out}");
    let pid: i32 = out
        .split("\"pid\":")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .expect("pid in the JSON");
    // A second run finds the daemon instead of starting another.
    let (status, out2, err2) = run(Command::new(bin("unicorn"))
        .args(["status", "--json"])
        .env("XDG_RUNTIME_DIR", &runtime)
        .env_remove("UNICORN_SOCKET"));
    assert!(status.success(), "{err2}");
    assert!(!err2.contains("starting") && out2.contains(&format!("\"pid\":{pid}")), "{err2}{out2}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || !socket.exists()),
        "the daemon did not clean up"
    );
}

#[test]
fn the_ring_benchmark_prints_its_table() {
    let d = Daemon::start();
    let (status, out, err) = run(unicorn(&d).args([
        "bench",
        "rings",
        "--rounds",
        "1",
        "--samples",
        "50",
        "--jobs",
        "20000",
    ]));
    assert!(status.success(), "{err}");
    for row in
        ["ring round trip, wake-ups", "ring round trip, spin", "Unix socket ping-pong", "M NOPs/s"]
    {
        assert!(out.contains(row), "missing {row:?} in:\n{out}");
    }
}
