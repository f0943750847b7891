//! The daemon's life: start, status, clean shutdown, socket handling, bad configuration.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use unicorn_tests::{bin, run, Daemon, TempDir};

#[test]
fn status_reports_the_daemon_and_its_sessions() {
    let d = Daemon::start();
    let mut a = d.client();
    let mut b = d.client();
    let st = a.status().unwrap();
    assert_eq!(st.pid, d.pid());
    assert!(!st.system_mode);
    assert_eq!(st.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(st.socket_path, d.socket.display().to_string());
    let ids: Vec<u64> = st.sessions.iter().map(|s| s.id).collect();
    assert!(ids.contains(&a.welcome().session_id) && ids.contains(&b.welcome().session_id));
    assert!(st.devices.iter().any(|d| d.kind == unicorn::protocol::DeviceKind::Cpu && d.in_use));
    for _ in 0..100 {
        b.ping().unwrap();
    }
    let st = a.status().unwrap();
    let bs = st.sessions.iter().find(|s| s.id == b.welcome().session_id).unwrap();
    assert_eq!(bs.jobs_completed, 100);
    assert_eq!(bs.pid, std::process::id());
    assert_eq!(a.echo(b"hello").unwrap(), b"hello");
}

#[test]
fn sigterm_and_sigint_shut_down_cleanly_and_remove_the_socket() {
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let mut d = Daemon::start();
        let mut c = d.client();
        c.ping().unwrap();
        let status = d.stop_with(sig);
        assert!(status.success(), "exit status {status} after {sig}:\n{}", d.log());
        assert!(!d.socket.exists(), "socket left behind after {sig}");
        // The connected client learns why its session ended.
        let err = c.ping().unwrap_err();
        assert_eq!(err.status(), unicorn::Status::Disconnected, "{err}");
        assert!(d.log().contains("shutting down"));
    }
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
    let mut d = Daemon::start();
    // A second daemon on a live socket refuses to start.
    let (status, _, err) =
        run(Command::new(bin("unicornd")).arg("--user").arg("--socket").arg(&d.socket));
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("already listens"), "{err}");
    assert!(d.alive());
    // A socket left by a daemon killed with SIGKILL is stale: a new daemon takes its place.
    let socket = d.socket.clone();
    d.stop_with(Signal::SIGKILL);
    assert!(socket.exists(), "SIGKILL leaves the socket file behind");
    let dir = TempDir::new("stale");
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = Command::new(bin("unicornd"))
        .arg("--user")
        .arg("--socket")
        .arg(&socket)
        .stderr(log)
        .spawn()
        .unwrap();
    let opts = unicorn::ClientOptions { socket: Some(socket.clone()), ..Default::default() };
    let ok = unicorn_tests::eventually(Duration::from_secs(20), || {
        unicorn::Client::connect(&opts).is_ok()
    });
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let status = child.wait().unwrap();
    assert!(ok, "the new daemon did not take over the stale socket");
    assert!(status.success());
}

#[test]
fn configuration_mistakes_are_reported_not_ignored() {
    let dir = TempDir::new("cfg");
    let socket = dir.path().join("s.sock");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_bufers = 3\n").unwrap();
    let (status, _, err) = run(Command::new(bin("unicornd"))
        .arg("--user")
        .arg("--socket")
        .arg(&socket)
        .arg("--config")
        .arg(&bad));
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("max_bufers"), "{err}");
    let (status, _, err) = run(Command::new(bin("unicornd"))
        .arg("--user")
        .arg("--socket")
        .arg(&socket)
        .arg("--config")
        .arg(dir.path().join("missing.toml")));
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("missing.toml"), "{err}");
    // A socket path whose directory is writable by others is refused.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (status, _, err) =
        run(Command::new(bin("unicornd")).arg("--user").arg("--socket").arg(open.join("s")));
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("writable by others"), "{err}");
}

#[test]
fn help_and_default_config() {
    let (status, out, _) = run(Command::new(bin("unicornd")).arg("--help"));
    assert!(status.success());
    assert!(out.contains("--user") && out.contains("--socket") && out.contains("--config"));
    let (status, out, _) = run(Command::new(bin("unicornd")).arg("--print-default-config"));
    assert!(status.success());
    assert!(out.contains("max_jobs_in_flight = 256"));
    let (status, _, err) = run(Command::new(bin("unicornd")).arg("--bogus"));
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("--bogus"));
}
