//! The `ci-agent` binary: bad settings give one line and exit code 2.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::process::Command;

fn assert_one_line_config_error(args: &[&str], env: &[(&str, &str)], mentions: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_ci-agent"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, got: {stderr}");
    assert!(lines[0].starts_with("ci-agent: "), "{stderr}");
    assert!(stderr.contains(mentions), "should mention {mentions}: {stderr}");
}

#[test]
fn missing_or_invalid_settings_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let wd = dir.path().to_str().unwrap();
    assert_one_line_config_error(&["--work-dir", wd, "--runner", "vm"], &[], "--runner");
    assert_one_line_config_error(&["--work-dir", wd], &[("RUNNER", "vm")], "RUNNER");
    assert_one_line_config_error(&["--work-dir", wd], &[("SERVER_HOST", "a b")], "SERVER_HOST");
    assert_one_line_config_error(&["--work-dir", wd], &[("SERVER_PORT", "0")], "SERVER_PORT");
    assert_one_line_config_error(&["--work-dir", wd], &[("AGENT_PORT", "-1")], "AGENT_PORT");
    assert_one_line_config_error(&["--work-dir", wd], &[("BUILD_TIMEOUT", "soon")], "BUILD_TIMEOUT");
    assert_one_line_config_error(&["--work-dir", "/proc/nope"], &[], "/proc/nope");
}
