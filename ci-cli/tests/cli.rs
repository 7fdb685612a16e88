//! The `ci` binary against a real server and shell agent (started in this
//! process through their libraries, on loopback, with a SQLite file).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::process::Command;
use std::sync::Arc;

use ci_agent::{Agent, AgentConfig, Checkouts, ShellRunner};
use ci_server::{Server, ServerConfig};
use ci_testkit::GitRepo;

struct Cluster {
    url: String,
    repo: GitRepo,
    _dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

fn cluster() -> Cluster {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::new();
    repo.commit(&[("build.sh", "echo hello; echo oops >&2\n")], "first");
    let mut config = ServerConfig::new(
        ci_core::RepoUrl::parse(&repo.url()).unwrap(),
        dir.path().join("ci.sqlite"),
    );
    config.build_command = Some("sh build.sh".into());
    let (url, agent_dir) = (
        rt.block_on(async {
            let server = Server::open(config).await.unwrap();
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", l.local_addr().unwrap());
            tokio::spawn(server.serve(l, std::future::pending()));
            url
        }),
        dir.path().join("agent"),
    );
    rt.block_on(async {
        let config = AgentConfig::new(&url, &agent_dir);
        let runner = ShellRunner::new(Checkouts::new(&agent_dir).unwrap(), config.repo_schemes.clone());
        let agent = Agent::new(config, Arc::new(runner)).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        tokio::spawn(agent.serve(l, std::future::pending()));
        let http = reqwest::Client::new();
        ci_testkit::wait_until("the agent", std::time::Duration::from_secs(20), || async {
            let a: Vec<serde_json::Value> = http
                .get(format!("{url}/api/agents"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (a.len() == 1).then_some(())
        })
        .await;
    });
    Cluster {
        url,
        repo,
        _dir: dir,
        _rt: rt,
    }
}

impl Cluster {
    fn ci(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_ci"))
            .args(args)
            .env_clear()
            .env("CI_SERVER", &self.url)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[test]
fn submit_wait_list_show_log_rebuild_agents() {
    let c = cluster();
    let (code, out, _) = c.ci(&["submit", "main", "--wait"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("status     success"), "{out}");

    let (code, out, _) = c.ci(&["submit", "main", "--command", "exit 4", "--wait"]);
    assert_eq!(code, 1, "a failed build exits 1: {out}");
    assert!(out.contains("exit code  4"), "{out}");

    let (code, out, _) = c.ci(&["list"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[0].contains("STATUS"), "{out}");
    assert!(lines[1].starts_with("2 ") && lines[1].contains("failed"), "{out}");
    assert!(
        lines[2].starts_with("1 ") && lines[2].contains("success"),
        "{out}"
    );

    let (code, out, _) = c.ci(&["--json", "list"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(2));

    let (code, out, _) = c.ci(&["show", "1", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["status"],
        "success"
    );

    let (code, out, err) = c.ci(&["log", "1"]);
    assert_eq!(code, 0);
    assert!(out.ends_with("hello\n"), "{out}");
    assert_eq!(err, "oops\n");

    let (code, out, err) = c.ci(&["log", "1", "--follow"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("hello\n") && err == "oops\n", "{out} {err}");

    let (code, out, _) = c.ci(&["rebuild", "1", "--wait"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("build      3"), "{out}");

    let (code, out, _) = c.ci(&["agents"]);
    assert_eq!(code, 0);
    assert!(out.lines().nth(1).is_some_and(|l| l.contains("idle")), "{out}");
    let _ = &c.repo;
}

#[test]
fn follow_cancel_and_errors() {
    let c = cluster();
    let (code, out, _) = c.ci(&["submit", "main", "--command", "echo started; sleep 60"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("build #1 queued"), "{out}");
    let follower = Command::new(env!("CARGO_BIN_EXE_ci"))
        .args(["log", "1", "--follow"])
        .env_clear()
        .env("CI_SERVER", &c.url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(ci_testkit::wait_until(
        "the build to print",
        std::time::Duration::from_secs(30),
        || async {
            let v: serde_json::Value = reqwest::get(format!("{}/api/builds/1/log", c.url))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            v["stdout"].as_str()?.contains("started").then_some(())
        },
    ));
    let (code, out, _) = c.ci(&["cancel", "1"]);
    assert_eq!((code, out.trim()), (0, "build #1 canceled"));
    let followed = follower.wait_with_output().unwrap();
    assert_eq!(
        followed.status.code(),
        Some(1),
        "following a canceled build exits 1"
    );
    assert!(String::from_utf8_lossy(&followed.stdout).contains("started"));

    let (code, _, err) = c.ci(&["cancel", "1"]);
    assert_eq!(code, 2);
    assert!(err.starts_with("ci: 409") && err.lines().count() == 1, "{err}");
    let (code, _, err) = c.ci(&["show", "99"]);
    assert_eq!(code, 2);
    assert!(err.contains("404") && err.contains("not found"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_ci"))
        .args(["--server", "http://127.0.0.1:9", "list"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("ci: cannot reach http://127.0.0.1:9"));
}

#[test]
fn a_build_cannot_write_escapes_to_the_terminal() {
    let c = cluster();
    let evil = "echo hi \u{1b}]0;pwned\u{7}\u{1b}[2J\necho second line";
    let (code, _, err) = c.ci(&["submit", "main", "--command", evil, "--wait"]);
    assert!(code == 0 || code == 1, "{err}");
    for args in [&["list"][..], &["show", "1"]] {
        let (code, out, _) = c.ci(args);
        assert_eq!(code, 0);
        assert!(
            !out.chars().any(|ch| ch.is_control() && ch != '\n'),
            "{args:?} printed raw control characters: {out:?}"
        );
        assert!(
            out.contains("\\x1b]0;pwned\\x07\\x1b[2J\\necho second line"),
            "{args:?}: {out}"
        );
    }
    // --json keeps the command as it is, escaped the JSON way.
    let (_, out, _) = c.ci(&["--json", "show", "1"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["command"], evil);
}

/// `ci lint`: the server's parser, offline. A good file lists its steps
/// and exits 0; a bad one prints `FILE:LINE:COLUMN: message` and exits 1;
/// a missing file is an error (2).
#[test]
fn lint_checks_a_pipeline_file() {
    let dir = tempfile::tempdir().unwrap();
    let lint = |args: &[&str], stdin: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ci"));
        cmd.current_dir(dir.path()).arg("lint").args(args);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        {
            use std::io::Write;
            let mut input = child.stdin.take().unwrap();
            // N.B.: `ci` stops reading at the size cap.
            let _ = input.write_all(stdin.unwrap_or_default().as_bytes());
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    std::fs::write(
        dir.path().join(".ci.yml"),
        "version: 1\nmatrix: {os: [bookworm, trixie]}\nsteps:\n  - {name: build, image: \"debian:${os}\", commands: [make]}\n  - {name: test, commands: [make test], agents: {arch: amd64}}\n",
    )
    .unwrap();
    let (code, out, err) = lint(&[], None);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("build (os=trixie)") && out.contains("debian:trixie"),
        "{out}"
    );
    assert!(
        out.contains("test (os=bookworm)") && out.contains("arch=amd64"),
        "{out}"
    );

    std::fs::write(
        dir.path().join("bad.yml"),
        "version: 1\nsteps:\n  - {name: a, depends_on: [b], commands: [x]}\n  - {name: b, depends_on: [a], commands: [x]}\n",
    )
    .unwrap();
    let (code, out, err) = lint(&["bad.yml"], None);
    assert_eq!(code, Some(1), "{out}{err}");
    assert_eq!(
        err.trim_end(),
        "bad.yml:3:12: the steps depend on each other in a cycle: a -> b -> a"
    );

    let (code, _, err) = lint(
        &["-"],
        Some("version: 1\nsteps:\n  - name: a\n    comands: [x]\n"),
    );
    assert_eq!(code, Some(1));
    assert!(err.starts_with("-:4:5: unknown field `comands`"), "{err}");

    let (code, _, err) = lint(&["-"], Some(&"#".repeat(600 * 1024)));
    assert_eq!(code, Some(1));
    assert!(err.starts_with("-: larger than 524288 bytes"), "{err}");

    let (code, _, err) = lint(&["missing.yml"], None);
    assert_eq!(code, Some(2));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("ci: missing.yml:"), "{err}");
}

/// `ci submit --label`: a build only an agent with the label may take;
/// `ci show` says why it waits.
#[test]
fn a_labelled_build_shows_why_it_waits() {
    let c = cluster();
    let (code, out, err) = c.ci(&["submit", "main", "--label", "os=nowhere,gpu"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("build #1 queued"), "{out}");
    let (code, out, _) = c.ci(&["show", "1"]);
    assert_eq!(code, 0);
    assert!(out.contains("labels     gpu,os=nowhere"), "{out}");
    assert!(out.contains("status     queued"), "{out}");
    assert!(
        out.contains("waiting    no agent has all of gpu, os=nowhere"),
        "{out}"
    );
    let (code, out, _) = c.ci(&["cancel", "1"]);
    assert_eq!(code, 0, "{out}");
    let (code, _, err) = c.ci(&["submit", "main", "--label", "bad label"]);
    assert_eq!(code, 2);
    assert!(err.contains("labels"), "{err}");
}

/// `ci exec` runs the working tree's pipeline, uncommitted and untracked
/// files included, on this machine, in dependency order, and leaves the
/// repository as it was; exit 0 when every step passed, 1 when not.
#[test]
fn exec_runs_the_working_tree_and_touches_nothing() {
    let repo = GitRepo::new();
    repo.commit(&[("a.txt", "committed\n")], "first");
    let pipeline = "version: 1\nenv: { WHO: \"it's me\" }\nsteps:\n  - name: first\n    commands: [\"cat a.txt\", \"cat new.txt\", \"echo $WHO\"]\n  - name: second\n    commands: [\"echo second\"]\n  - name: broken\n    depends_on: []\n    commands: [\"exit 4\"]\n    allow_failure: true\n";
    std::fs::write(repo.path().join(".ci.yml"), pipeline).unwrap();
    std::fs::write(repo.path().join("a.txt"), "changed, not committed\n").unwrap();
    std::fs::write(repo.path().join("new.txt"), "untracked\n").unwrap();
    let status_before = repo.git(&["status", "--porcelain"]);
    let refs_before = repo.git(&["for-each-ref"]);
    let exec = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ci"))
            .current_dir(repo.path())
            .arg("exec")
            .args(args)
            .env_remove("CI_SERVER")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = exec(&[]);
    assert_eq!(code, 0, "{out}\n{err}");
    for seen in ["changed, not committed\n", "untracked\n", "it's me\n"] {
        assert!(out.contains(seen), "{seen:?} in {out}");
    }
    assert!(out.contains("second"), "{out}");
    let first = err.find("--- step first: success").unwrap_or(usize::MAX);
    let second = err.find("--- step second: success").unwrap_or(0);
    assert!(first < second, "second runs after first: {err}");
    assert!(err.contains("--- step broken: failed"), "{err}");
    assert_eq!(
        repo.git(&["status", "--porcelain"]),
        status_before,
        "the working tree is as it was"
    );
    assert_eq!(repo.git(&["for-each-ref"]), refs_before, "no ref was made");

    let (code, out, _) = exec(&["--step", "second"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("second") && !out.contains("untracked"),
        "only that step: {out}"
    );
    std::fs::write(
        repo.path().join(".ci.yml"),
        "version: 1\nsteps:\n  - name: a\n    commands: [\"exit 3\"]\n",
    )
    .unwrap();
    assert_eq!(exec(&[]).0, 1, "a failed step fails it");
    let (code, _, err) = exec(&["--step", "nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("no step \"nope\""), "{err}");
    std::fs::write(repo.path().join(".ci.yml"), "version: 1\nstep: []\n").unwrap();
    let (code, _, err) = exec(&[]);
    assert_eq!(code, 1);
    assert!(err.starts_with(".ci.yml:2:1:"), "{err}");
}

/// `--project` starts, lists and names builds by their project's numbers
/// (`--project web show 1` is web#1), and `ci projects` lists projects
/// with each branch's latest build.
#[test]
fn projects_and_their_numbers() {
    let c = cluster();
    let status = c._rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{}/api/projects", c.url))
            .json(&serde_json::json!({"name": "web", "repo": c.repo.url(), "pollInterval": 0}))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 201);
    let (code, out, err) = c.ci(&["--project", "web", "submit", "main", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = c.ci(&["submit", "main", "--wait"]);
    assert_eq!(code, 0, "{out}");
    let (_, out, _) = c.ci(&["--project", "web", "list"]);
    assert!(out.contains("web#1"), "{out}");
    assert!(!out.contains("default#"), "only web's: {out}");
    let (_, out, _) = c.ci(&["list", "--status", "success,failed"]);
    assert!(out.contains("web#1") && out.contains("default#1"), "{out}");
    let (_, out, _) = c.ci(&["list", "--status", "queued"]);
    assert!(!out.contains('#'), "{out}");
    // This server does not resolve refs: its builds have no branch.
    let (_, out, _) = c.ci(&["list", "--branch", "main"]);
    assert!(!out.contains('#'), "{out}");
    let (code, out, err) = c.ci(&["--project", "web", "show", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("web#1"), "{out}");
    let (code, out, _) = c.ci(&["--project", "web", "log", "1"]);
    assert_eq!(code, 0);
    assert!(out.ends_with("hello\n"), "{out}");
    let (code, _, err) = c.ci(&["--project", "web", "show", "9"]);
    assert_eq!(code, 2, "an API error: {err}");
    assert!(err.contains("no build 9"), "{err}");
    let (code, out, _) = c.ci(&["projects"]);
    assert_eq!(code, 0);
    assert!(out.contains("web") && out.contains("default"), "{out}");
}
