//! The `ci-server` binary: bad settings give one line and exit code 2.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::process::Command;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ci-server"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_config_error(args: &[&str], env: &[(&str, &str)], mentions: &str) {
    let (code, stderr) = run(args, env);
    assert_eq!(code, 2, "{args:?} {env:?}: {stderr}");
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, got: {stderr}");
    assert!(lines[0].starts_with("ci-server: "), "{stderr}");
    assert!(stderr.contains(mentions), "should mention {mentions}: {stderr}");
}

#[test]
fn missing_or_invalid_settings_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ci.sqlite");
    let db = db.to_str().unwrap();
    assert_one_line_config_error(&["--db", db], &[], "--repo");
    assert_one_line_config_error(&["--db", db], &[("REPO", "ext::sh -c id")], "REPO");
    assert_one_line_config_error(&["--repo", "/r", "--db", db, "--port", "70000"], &[], "--port");
    assert_one_line_config_error(&["--repo", "/r", "--db", db], &[("PORT", "x")], "PORT");
    assert_one_line_config_error(&["--repo", "/r", "--db", db], &[("HOST", "not-an-ip")], "HOST");
    assert_one_line_config_error(
        &["--repo", "/r", "--db", db, "--heartbeat-ms", "1"],
        &[],
        "HEARTBEAT_MS",
    );
    assert_one_line_config_error(
        &["--repo", "/r", "--db", db],
        &[("MISSED_HEARTBEATS", "0")],
        "MISSED_HEARTBEATS",
    );
    assert_one_line_config_error(
        &["--repo", "/r", "--db", "/nonexistent/dir/ci.sqlite"],
        &[],
        "/nonexistent/dir",
    );
    assert_one_line_config_error(
        &["--repo", "/r", "--db", db, "--sqlite-synchronous", "sometimes"],
        &[],
        "synchronous",
    );
}

#[test]
fn unsafe_settings_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ci.sqlite");
    let db = db.to_str().unwrap();
    // Beyond loopback, registration would be open to anyone who can reach
    // the port: that needs a token (or an explicit --insecure).
    assert_one_line_config_error(
        &["--repo", "/r", "--db", db, "--host", "0.0.0.0"],
        &[],
        "AGENT_TOKEN",
    );
    assert_one_line_config_error(
        &["--repo", "/r", "--db", db],
        &[("HOST", "0.0.0.0")],
        "--insecure",
    );
    assert_one_line_config_error(
        &["--repo", "/srv/my repo", "--db", db],
        &[],
        "file:///srv/my%20repo",
    );
    assert_one_line_config_error(
        &["--repo", "/r", "--db", "/nonexistent/dir/ci.sqlite"],
        &[],
        "directory /nonexistent/dir does not exist",
    );
}

/// A database where the server may not write: it says which directory or
/// file, and why. Run as `nobody` when the tests run as root.
#[test]
fn an_unusable_database_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let as_nobody = nix::unistd::geteuid().is_root();
    if as_nobody {
        // The temp dir is root's; nobody may enter it and no further.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&ro, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    let db = ro.join("ci.sqlite");
    let args = ["--repo", "/r", "--db", db.to_str().unwrap()];
    let out = if as_nobody {
        Command::new("/usr/bin/setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_ci-server"))
            .args(args)
            .env_clear()
            .output()
            .unwrap()
    } else {
        Command::new(env!("CARGO_BIN_EXE_ci-server"))
            .args(args)
            .env_clear()
            .output()
            .unwrap()
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is not writable"), "{err}");
    assert!(err.contains(ro.to_str().unwrap()), "{err}");
}

#[test]
fn help_exits_0() {
    let (code, _) = run(&["--help"], &[]);
    assert_eq!(code, 0);
}
