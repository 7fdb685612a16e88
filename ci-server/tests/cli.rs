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
fn help_exits_0() {
    let (code, _) = run(&["--help"], &[]);
    assert_eq!(code, 0);
}
