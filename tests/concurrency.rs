//! Many client processes at once, and clients that die mid-work.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use unicorn_tests::{eventually, Daemon};

const CLIENT: &str = env!("CARGO_BIN_EXE_unicorn-test-client");

#[test]
fn eight_processes_complete_20000_nops_each_with_none_lost_or_duplicated() {
    let mut d = Daemon::start();
    let before = d.client().status().unwrap().jobs_completed;
    let children: Vec<_> = (0..8)
        .map(|_| {
            Command::new(CLIENT)
                .arg("nops")
                .arg(&d.socket)
                .arg("20000")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn test client")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "client failed ({}): {stdout}{stderr}", out.status);
        assert_eq!(stdout.trim(), "ok 20000");
    }
    let st = d.client().status().unwrap();
    // Each client checked its own completions one by one; the daemon agrees on the total.
    assert!(st.jobs_completed - before >= 8 * 20000, "{} completed", st.jobs_completed - before);
    d.assert_healthy();
}

#[test]
fn a_client_killed_mid_work_is_cleaned_up_and_others_are_served() {
    let mut d = Daemon::start();
    let mut observer = d.client();
    let mut child = Command::new(CLIENT)
        .arg("hold")
        .arg(&d.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let session: u64 = line
        .trim()
        .strip_prefix("ready ")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output from the test client: {line:?}"));
    let st = observer.status().unwrap();
    let s = st.sessions.iter().find(|s| s.id == session).expect("the client's session is listed");
    assert_eq!(s.buffers, 1);
    assert_eq!(s.jobs_in_flight, 16);
    assert_eq!(s.pid, child.id());

    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let gone = eventually(Duration::from_secs(10), || {
        !observer.status().unwrap().sessions.iter().any(|s| s.id == session)
    });
    assert!(gone, "the killed client's session is still listed:\n{}", d.log());
    assert!(d.log().contains(&format!("session {session} hung up")), "{}", d.log());
    // Its deferred jobs fire into nothing, and everyone else is fine.
    for _ in 0..100 {
        observer.ping().unwrap();
    }
    d.assert_healthy();
}
