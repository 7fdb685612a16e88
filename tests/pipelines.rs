//! Pipelines from a `.ci.yml` in the repository, end to end: real
//! `ci-server` and `ci-agent` processes, a real git repository, the `ci`
//! binary.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::time::Duration;

use ci_core::protocol::{BuildView, StepView};
use ci_core::{BuildStatus, StepStatus};
use common::Cluster;
use nix::sys::signal::Signal;
use serde_json::json;

const LONG: Duration = Duration::from_secs(60);

fn step<'a>(b: &'a BuildView, name: &str) -> &'a StepView {
    b.steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name} in {:?}", b.steps))
}

fn millis(t: &Option<String>) -> u64 {
    common::millis(t.as_deref().expect("a time"))
}

/// Runs the `ci` binary against the cluster's server.
fn ci(c: &Cluster, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(ci_testkit::bin("ci"))
        .arg("--server")
        .arg(c.api.url(""))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A diamond of four steps across two agents: `a`, then `b` (on the plain
/// agent) and `c` (labelled `gpu=yes`, so only on the gpu agent) at once,
/// then `d`. No step starts before its dependencies end; the build ends
/// with its last step; the API, the CLI and the UI show the steps.
#[tokio::test]
async fn a_diamond_runs_across_two_agents_in_dependency_order_and_by_label() {
    let mut c = Cluster::new(500, 5);
    let sha = c.commit_pipeline(
        r#"version: 1
steps:
  - name: a
    commands: ["sleep 0.2", "echo a done"]
  - name: b
    depends_on: [a]
    agents: { pool: plain }
    commands: ["sleep 1", "echo b on $CI_STEP of build $CI_BUILD_ID"]
  - name: c
    depends_on: [a]
    agents: { gpu: "yes" }
    commands: ["sleep 1", 'printf "\033[32mc is green\033[0m\n"']
  - name: d
    depends_on: [b, c]
    commands: ["echo d done"]
"#,
        "a diamond",
    );
    c.start_server();
    c.agent_env = vec![("LABELS".into(), "pool=plain".into())];
    c.start_agent("plain");
    c.agent_env = vec![("LABELS".into(), "gpu=yes".into())];
    c.start_agent("gpu");
    let agents = c.wait_agents(2).await;
    let gpu = agents
        .iter()
        .find(|a| a.labels.iter().any(|l| l == "gpu=yes"))
        .unwrap()
        .url
        .clone();

    let created = c.api.create(&sha).await;
    assert_eq!(created.command, ".ci.yml");
    let timeouts: Vec<Option<u64>> = created.steps.iter().map(|s| s.timeout_ms).collect();
    assert_eq!(
        timeouts,
        [Some(3_600_000); 4],
        "BUILD_TIMEOUT for steps without their own"
    );
    let names: Vec<&str> = created.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
    assert_eq!(step(&created, "d").depends_on, ["b", "c"]);
    let b = c.api.wait_finished(created.id, LONG).await;
    assert_eq!(b.status, BuildStatus::Success, "{b:?}");
    assert!(b
        .steps
        .iter()
        .all(|s| s.status == StepStatus::Success && s.attempt.0 == 1));

    let (a, sb, sc, d) = (step(&b, "a"), step(&b, "b"), step(&b, "c"), step(&b, "d"));
    assert_eq!(sc.agent.as_deref(), Some(gpu.as_str()), "c needs gpu=yes");
    assert_ne!(sb.agent, sc.agent, "b needs pool=plain");
    assert!(millis(&sb.started_at) >= millis(&a.finished_at));
    assert!(millis(&sc.started_at) >= millis(&a.finished_at));
    assert!(millis(&d.started_at) >= millis(&sb.finished_at).max(millis(&sc.finished_at)));
    assert!(
        millis(&sb.started_at) < millis(&sc.finished_at) && millis(&sc.started_at) < millis(&sb.finished_at),
        "b and c ran at once, on two agents"
    );
    assert_eq!(b.finished_at, d.finished_at, "the build ends with its last step");

    // Each step's log, and the CI_* variables a step sees.
    let log = c.api.step_log(b.id, "b").await.unwrap();
    assert!(
        log["stdout"]
            .as_str()
            .unwrap()
            .contains(&format!("b on b of build {}", b.id)),
        "{log}"
    );
    let (status, body) = c
        .api
        .post(&format!("/api/builds/{}/log", b.id), &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 405, "{body}");
    let r = c
        .api
        .http
        .get(c.api.url(&format!("/api/builds/{}/log", b.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a build of four steps has no one log");
    let r = c
        .api
        .http
        .get(c.api.url(&format!("/api/builds/{}/steps/zz/log", b.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // The CLI: the steps, one step's log, every step's log.
    let (code, out, _) = ci(&c, &["show", &b.id.to_string()]);
    assert_eq!(code, 0);
    for name in ["a", "b", "c", "d"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("{name} ")) && l.contains("success")),
            "{out}"
        );
    }
    let (code, out, _) = ci(&c, &["log", &b.id.to_string(), "c"]);
    assert_eq!(code, 0);
    assert!(out.contains("c is green"), "{out}");
    let (code, out, err) = ci(&c, &["log", &b.id.to_string()]);
    assert_eq!(code, 0);
    assert!(out.contains("a done") && out.contains("d done"), "{out}");
    assert!(err.contains("--- step d (attempt 1) ---"), "{err}");

    // The UI: the steps by depth, and a step's log with its colours.
    let page = c
        .api
        .http
        .get(c.api.url(&format!("/builds/{}?step=c", b.id)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(page.matches(r#"<ol class="column">"#).count(), 3, "a; b, c; d");
    assert!(
        page.contains(r#"<span class="ansi-fg2">c is green</span>"#),
        "{page}"
    );
    assert!(!page.contains('\u{1b}'));
    c.assert_exactly_once(&[b.id]);
}

/// A failing step skips what depends on it and fails the build; a step
/// that may fail does not; retry runs again only what did not pass.
#[tokio::test]
async fn a_failing_step_skips_its_dependents_and_retry_reruns_only_them() {
    let mut c = Cluster::new(500, 5);
    let sha = c.commit_pipeline(
        r#"version: 1
steps:
  - name: compile
    commands: ["echo compiling", "exit 3"]
  - name: test
    commands: ["echo never"]
  - name: lint
    depends_on: []
    allow_failure: true
    commands: ["exit 1"]
  - name: docs
    depends_on: [lint]
    commands: ["echo docs"]
"#,
        "compile fails",
    );
    c.start_server();
    c.start_agent("a");
    c.wait_agents(1).await;
    let id = c.api.create(&sha).await.id;
    let b = c.api.wait_finished(id, LONG).await;
    assert_eq!((b.status, b.exit_code), (BuildStatus::Failed, Some(3)), "{b:?}");
    let status = |b: &BuildView, n| step(b, n).status;
    assert_eq!(status(&b, "compile"), StepStatus::Failed);
    assert_eq!(status(&b, "test"), StepStatus::Skipped, "test depends on compile");
    assert_eq!(step(&b, "test").attempt.0, 0, "never dispatched");
    assert_eq!(status(&b, "lint"), StepStatus::Failed);
    assert_eq!(status(&b, "docs"), StepStatus::Success, "lint may fail");
    c.assert_exactly_once(&[id]);

    let (code, _, err) = ci(&c, &["retry", &id.to_string(), "--wait"]);
    assert_eq!(code, 1, "{err}");
    let again = c.api.build(id).await.unwrap();
    assert_eq!(step(&again, "compile").attempt.0, 2, "run again");
    assert_eq!(step(&again, "lint").attempt.0, 2, "it failed: run again");
    assert_eq!(step(&again, "docs").attempt.0, 1, "it passed: kept");
    assert_eq!(status(&again, "test"), StepStatus::Skipped);
    let (status, body) = c
        .api
        .post(&format!("/api/builds/{id}/retry"), &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let b = c.api.wait_finished(id, LONG).await;
    let (status, body) = c
        .api
        .post(&format!("/api/builds/{}/cancel", b.id), &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 409, "finished: {body}");
}

/// An agent SIGKILLed during a step: that step runs again on the other
/// agent; the steps that ended keep their single result.
#[tokio::test]
async fn an_agent_killed_mid_step_reruns_only_that_step() {
    let mut c = Cluster::new(200, 3);
    let mark = c.dir.path().join("first-attempt");
    let sha = c.commit_pipeline(
        &format!(
            r#"version: 1
steps:
  - name: setup
    commands: ["echo setup"]
  - name: slow
    commands: ["if [ -e '{m}' ]; then echo second; else touch '{m}'; sleep 60; fi"]
  - name: after
    commands: ["echo after"]
"#,
            m = mark.display()
        ),
        "a slow step",
    );
    c.start_server();
    c.start_agent("a");
    c.start_agent("b");
    c.wait_agents(2).await;
    let id = c.api.create(&sha).await.id;
    let running = c
        .api
        .wait_build(id, LONG, "slow to run", |b| {
            step(b, "slow").status == StepStatus::Running && mark.exists()
        })
        .await;
    let victim = step(&running, "slow").agent.clone().unwrap();
    c.api.wait_agent_runs(&victim, id).await;
    c.agent_by_port(&victim).signal(Signal::SIGKILL);

    let b = c.api.wait_finished(id, LONG).await;
    assert_eq!(b.status, BuildStatus::Success, "{b:?}");
    assert_eq!(
        step(&b, "setup").attempt.0,
        1,
        "setup ended before: not run again"
    );
    assert_eq!(step(&b, "slow").attempt.0, 2);
    assert_ne!(step(&b, "slow").agent.as_deref(), Some(victim.as_str()));
    assert_eq!(step(&b, "after").attempt.0, 1);
    c.assert_exactly_once(&[id]);
}

/// A step whose retry counts lost agents runs again once its agent is
/// SIGKILLed, and fails when the next one is killed too, with no re-run
/// left: its log says why, and its dependents are skipped.
#[tokio::test]
async fn a_step_retried_on_lost_agents_fails_when_its_re_runs_are_spent() {
    let mut c = Cluster::new(200, 3);
    let sha = c.commit_pipeline(
        r#"version: 1
steps:
  - name: fragile
    retry: { limit: 1, on: [agent_lost] }
    commands: ["sleep 60"]
  - name: after
    commands: ["echo after"]
"#,
        "a step that loses its agents",
    );
    c.start_server();
    for name in ["a", "b", "c"] {
        c.start_agent(name);
    }
    c.wait_agents(3).await;
    let id = c.api.create(&sha).await.id;
    for attempt in 1..=2 {
        let running = c
            .api
            .wait_build(id, LONG, "fragile to run", |b| {
                let s = step(b, "fragile");
                s.status == StepStatus::Running && s.attempt.0 == attempt
            })
            .await;
        let victim = step(&running, "fragile").agent.clone().unwrap();
        c.api.wait_agent_runs(&victim, id).await;
        c.agent_by_port(&victim).signal(Signal::SIGKILL);
    }
    let b = c.api.wait_finished(id, LONG).await;
    assert_eq!(b.status, BuildStatus::Failed, "{b:?}");
    let fragile = step(&b, "fragile");
    assert_eq!(
        (fragile.status, fragile.attempt.0, fragile.exit_code),
        (StepStatus::Failed, 2, Some(-1))
    );
    assert_eq!(step(&b, "after").status, StepStatus::Skipped);
    let log = c.api.step_log(id, "fragile").await.unwrap();
    assert!(
        log["stderr"].as_str().unwrap().contains("agent was lost"),
        "{log}"
    );
    c.assert_exactly_once(&[id]);
}

/// `when: {event}` sees `manual` for `ci submit` and the web form, `api`
/// for a program (or one that says `"event": "api"`); a program may not
/// claim a forge's events.
#[tokio::test]
async fn steps_are_selected_by_what_started_the_build() {
    let mut c = Cluster::new(500, 5);
    let sha = c.commit_pipeline(
        r#"version: 1
steps:
  - name: always
    commands: ["true"]
  - name: by-hand
    when: { event: [manual] }
    commands: ["true"]
"#,
        "a step for people",
    );
    c.start_server();
    c.wait_server().await;
    let names = |b: &BuildView| b.steps.iter().map(|s| s.name.clone()).collect::<Vec<_>>();

    let program = c.api.create(&sha).await;
    assert_eq!(names(&program), ["always"]);
    let (status, body) = c
        .api
        .post("/api/builds", &json!({"hash": sha, "event": "api"}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["steps"].as_array().unwrap().len(), 1);

    let (code, out, err) = ci(&c, &["submit", &sha, "--json"]);
    assert_eq!(code, 0, "{err}");
    let by_hand: BuildView = serde_json::from_str(&out).unwrap();
    assert_eq!(names(&by_hand), ["always", "by-hand"]);
    let form = c
        .api
        .http
        .post(c.api.url("/build"))
        .header("origin", c.api.url("").trim_end_matches('/'))
        .form(&[("hash", sha.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 201);
    let form: BuildView = form.json().await.unwrap();
    assert_eq!(names(&form), ["always", "by-hand"]);

    for claimed in ["push", "tag", "pull_request", "nightly"] {
        let (status, body) = c
            .api
            .post("/api/builds", &json!({"hash": sha, "event": claimed}))
            .await
            .unwrap();
        assert_eq!(status, 400, "{claimed}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("event") || error.contains(claimed), "{body}");
    }
}

/// A broken pipeline file gives a build that fails at once, with the
/// parser's message, in the API and the CLI; a command given with the
/// request still builds the commit as one step.
#[tokio::test]
async fn a_broken_pipeline_file_fails_the_build_at_once_with_where_and_why() {
    let mut c = Cluster::new(500, 5);
    let sha = c.commit_pipeline(
        "version: 1\nsteps:\n  - name: a\n    comands: [\"true\"]\n",
        "a typo",
    );
    c.start_server();
    c.wait_server().await;
    let b = c.api.create(&sha).await;
    assert_eq!((b.status, b.exit_code), (BuildStatus::Failed, Some(-1)), "{b:?}");
    assert_eq!(b.steps.len(), 1);
    let log = c.api.log(b.id).await.unwrap();
    let stderr = log["stderr"].as_str().unwrap();
    assert!(
        stderr.contains(".ci.yml:4:") && stderr.contains("comands"),
        "{stderr}"
    );
    let (code, _, err) = ci(&c, &["log", &b.id.to_string()]);
    assert_eq!(code, 0);
    assert!(err.contains(".ci.yml:4:"), "{err}");
    let (status, body) = c
        .api
        .post(&format!("/api/builds/{}/retry", b.id), &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 409, "a file that cannot be read is not retried: {body}");

    c.start_agent("a");
    c.wait_agents(1).await;
    let one = c
        .api
        .create_with(&json!({"hash": sha, "command": "echo by hand"}))
        .await;
    let names: Vec<&str> = one.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["build"]);
    let done = c.api.wait_finished(one.id, LONG).await;
    assert_eq!(done.status, BuildStatus::Success);
}

/// A step gets the project's secrets it lists, as environment variables,
/// and no other; their values never reach the log: not in stdout, not in
/// stderr, not split across two live pieces, not in a failing command's
/// error message, and not in the server's database.
#[tokio::test]
async fn secrets_reach_only_the_steps_that_list_them_and_are_masked() {
    let mut c = Cluster::new(500, 5);
    let value = "hunter2-correct-horse";
    let sha = c.commit_pipeline(
        r#"version: 1
steps:
  - name: uses
    secrets: [DEPLOY_TOKEN]
    commands:
      - echo "out $DEPLOY_TOKEN"
      - echo "err $DEPLOY_TOKEN" >&2
      - printf 'split %s' "$(printf %s "$DEPLOY_TOKEN" | cut -c1-7)"; sleep 0.5; printf '%s done\n' "$(printf %s "$DEPLOY_TOKEN" | cut -c8-)"
      - ls "/nonexistent/$DEPLOY_TOKEN"
  - name: other
    depends_on: []
    commands: ['echo "other sees [${DEPLOY_TOKEN:-}]"']
"#,
        "secrets",
    );
    c.start_server();
    c.wait_server().await;
    let (status, body) = c
        .api
        .post(
            "/api/projects/default/secrets",
            &serde_json::json!({"name": "DEPLOY_TOKEN", "value": value}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    c.start_agent("a");
    c.wait_agents(1).await;
    let id = c.api.create(&sha).await.id;
    let b = c.api.wait_finished(id, LONG).await;
    assert_eq!(b.status, BuildStatus::Failed, "ls fails: {b:?}");
    let log = c.api.step_log(id, "uses").await.unwrap();
    let (out, err) = (log["stdout"].as_str().unwrap(), log["stderr"].as_str().unwrap());
    assert!(out.contains("out ***\n"), "{out}");
    assert!(out.contains("split *** done\n"), "split across pieces: {out}");
    assert!(err.contains("err ***\n"), "{err}");
    assert!(
        err.contains("/nonexistent/***"),
        "the failing command's message: {err}"
    );
    assert!(!format!("{out}{err}").contains("hunter2"), "{out}{err}");
    let other = c.api.step_log(id, "other").await.unwrap();
    assert!(
        other["stdout"].as_str().unwrap().contains("other sees []"),
        "{other}"
    );
    // Nothing the server keeps holds the value (live pieces included),
    // nor any process's log.
    c.kill_server();
    let mut stored = Vec::new();
    for e in std::fs::read_dir(c.db_path().parent().unwrap()).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            stored.extend(std::fs::read(&p).unwrap());
        }
    }
    assert!(!stored.windows(value.len()).any(|w| w == value.as_bytes()));
    assert!(!stored.windows(7).any(|w| w == b"hunter2"));
}
