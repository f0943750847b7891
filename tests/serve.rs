//! `unicorn serve` against a real daemon: the official `openai` Python client
//! (tests/openai/test_serve.py, in a venv that scripts/openai-venv sets up) drives a running
//! server; the server's own start-up rules and shutdown are checked here.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use unicorn_tests::{bin, default_model, eventually, repo_root, run, Daemon};

const KEY: &str = "test-key-5f0c";

/// A running `unicorn serve`; killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(d: &Daemon, extra: &[&str]) -> Server {
        let mut child = Command::new(bin("unicorn"))
            .arg("--no-spawn")
            .arg("--socket")
            .arg(&d.socket)
            .args(["serve", "--port", "0", "-m"])
            .arg(default_model())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn unicorn serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the address line");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        Server { child, url }
    }

    fn stop(mut self) -> std::process::ExitStatus {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
        let mut status = None;
        assert!(
            eventually(Duration::from_secs(15), || {
                status = self.child.try_wait().expect("wait");
                status.is_some()
            }),
            "unicorn serve did not exit on SIGTERM"
        );
        status.expect("exited")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The venv's python, set up (once) by scripts/openai-venv.
fn openai_python() -> PathBuf {
    let (status, out, err) = run(&mut Command::new(repo_root().join("scripts/openai-venv")));
    assert!(status.success(), "scripts/openai-venv failed:\n{err}");
    PathBuf::from(out.trim()).join("bin/python")
}

#[test]
fn the_openai_client_passes_against_a_running_server() {
    let python = openai_python();
    let mut d = Daemon::start();
    let server = Server::start(
        &d,
        &[
            "--api-key",
            KEY,
            "--max-concurrent",
            "4",
            "--max-queue",
            "1",
            "--max-body-bytes",
            "65536",
        ],
    );
    let model = default_model().file_stem().unwrap().to_string_lossy().into_owned();
    let out = Command::new(python)
        .arg(repo_root().join("tests/openai/test_serve.py"))
        .env("UNICORN_SERVE_URL", &server.url)
        .env("UNICORN_SERVE_KEY", KEY)
        .env("UNICORN_SERVE_MODEL", &model)
        .stdin(Stdio::null())
        .output()
        .expect("run the python tests");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(out.status.success(), "the openai client tests failed:\n{text}");
    // unittest ends with OK and the count: make sure they ran.
    assert!(text.contains("\nOK") && text.contains("Ran 14 tests"), "{text}");
    assert!(server.stop().success());
    d.assert_healthy();
}

#[test]
fn a_public_address_needs_an_api_key() {
    // Refused before any daemon is looked for (the socket does not exist).
    let (status, _, err) = run(Command::new(bin("unicorn")).args([
        "--no-spawn",
        "--socket",
        "/nonexistent/unicornd.sock",
        "serve",
        "--host",
        "0.0.0.0",
    ]));
    assert!(!status.success());
    assert!(err.contains("--api-key") && err.contains("UNICORN_API_KEY"), "{err}");
    let (status, out, _) = run(Command::new(bin("unicorn")).args(["serve", "--help"]));
    assert!(status.success());
    for opt in ["--host", "--port", "--model", "--api-key", "--max-concurrent"] {
        assert!(out.contains(opt), "{out}");
    }
}
