//! The Docker runner on the real engine: agents on this host with
//! RUNNER=docker and the busybox build image from `scripts/build-images`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::time::Duration;

use ci_core::BuildStatus;
use common::{docker_or_skip, wait_until, Cluster};

const LONG: Duration = Duration::from_secs(90);
const IMAGE: &str = "ci-local/busybox:latest";

fn step_named<'a>(b: &'a ci_core::protocol::BuildView, name: &str) -> &'a ci_core::protocol::StepView {
    b.steps.iter().find(|s| s.name == name).unwrap()
}

fn docker_cluster(heartbeat_ms: u64, missed: u32) -> Cluster {
    let mut c = Cluster::new(heartbeat_ms, missed);
    c.agent_env.push(("RUNNER".into(), "docker".into()));
    c.agent_env.push(("IMAGE".into(), IMAGE.into()));
    c.agent_env.push(("PULL".into(), "never".into()));
    c
}

#[tokio::test]
async fn builds_pass_and_fail_inside_containers() {
    if !docker_or_skip(&[IMAGE]) {
        return;
    }
    let mut c = docker_cluster(500, 5);
    let pass =
        c.commit_script("echo out; echo err >&2; test -f /workspace/build.sh && cat /etc/passwd | head -1");
    let fail = c.commit_script("echo failing; exit 7");
    c.start_server();
    c.start_agent("d");
    c.wait_agents(1).await;

    let ok = c.api.create(&pass).await.id;
    let bad = c.api.create(&fail).await.id;
    let ok = c.api.wait_finished(ok, LONG).await;
    let bad = c.api.wait_finished(bad, LONG).await;
    assert_eq!((ok.status, ok.exit_code), (BuildStatus::Success, Some(0)));
    assert_eq!((bad.status, bad.exit_code), (BuildStatus::Failed, Some(7)));
    let log = c.api.log(ok.id).await.unwrap();
    let stdout = log["stdout"].as_str().unwrap();
    assert!(stdout.contains("into ci-local/busybox"), "{stdout}");
    assert!(
        stdout.contains("out\nroot:x:0:0:root:/root:/bin/sh\n"),
        "ran in the busybox image: {stdout}"
    );
    assert_eq!(log["stderr"], "err\n");
    assert!(c.api.log(bad.id).await.unwrap()["stdout"]
        .as_str()
        .unwrap()
        .ends_with("failing\n"));
    for id in [ok.id, bad.id] {
        assert!(c.build_containers("d", id).is_empty(), "containers are removed");
    }
    c.assert_exactly_once(&[ok.id, bad.id]);
}

#[tokio::test]
async fn a_build_may_name_its_own_image() {
    let debian = "ci-local/debian:bookworm";
    if !docker_or_skip(&[IMAGE, debian]) {
        return;
    }
    let mut c = docker_cluster(500, 5);
    let sha = c.commit_script("cat /etc/debian_version");
    c.start_server();
    c.start_agent("d");
    c.wait_agents(1).await;
    let (status, body) = c
        .api
        .post(
            "/api/builds",
            &serde_json::json!({ "hash": sha, "image": debian }),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["image"], debian);
    let own = ci_core::BuildId(body["id"].as_i64().unwrap());
    let default = c.api.create(&sha).await.id;
    let own = c.api.wait_finished(own, LONG).await;
    let default = c.api.wait_finished(default, LONG).await;
    assert_eq!(own.status, BuildStatus::Success, "Debian has /etc/debian_version");
    assert_eq!(default.status, BuildStatus::Failed, "busybox has none");
    let log = c.api.log(own.id).await.unwrap();
    assert!(
        log["stdout"]
            .as_str()
            .unwrap()
            .contains("into ci-local/debian:bookworm"),
        "{log}"
    );
}

#[tokio::test]
async fn a_build_over_its_timeout_is_killed_and_its_container_removed() {
    if !docker_or_skip(&[IMAGE]) {
        return;
    }
    let mut c = docker_cluster(500, 5);
    c.agent_env.push(("BUILD_TIMEOUT".into(), "2s".into()));
    let sha = c.commit_script("echo started; sleep 60");
    c.start_server();
    c.start_agent("d");
    c.wait_agents(1).await;
    let id = c.api.create(&sha).await.id;
    wait_until("the build's container", LONG, || async {
        (!c.build_containers("d", id).is_empty()).then_some(())
    })
    .await;
    let b = c.api.wait_finished(id, LONG).await;
    assert_eq!(
        (b.status, b.exit_code),
        (BuildStatus::Failed, Some(ci_core::runner::TIMED_OUT))
    );
    let log = c.api.log(id).await.unwrap();
    assert!(log["stdout"].as_str().unwrap().contains("started"));
    assert!(
        log["stderr"].as_str().unwrap().contains("timed out after 2s"),
        "{log}"
    );
    assert!(b.duration_ms.unwrap() < 20_000);
    wait_until("no container left", Duration::from_secs(20), || async {
        c.build_containers("d", id).is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_agent_killed_mid_build_cleans_up_when_it_restarts() {
    if !docker_or_skip(&[IMAGE]) {
        return;
    }
    let mut c = docker_cluster(300, 3);
    let sha = c.commit_script(
        "if [ \"$CI_BUILD_ATTEMPT\" = 1 ]; then sleep 300; fi; echo attempt $CI_BUILD_ATTEMPT",
    );
    c.start_server();
    c.start_agent("d");
    c.wait_agents(1).await;
    let id = c.api.create(&sha).await.id;
    let orphan = wait_until("the build's container to run", LONG, || async {
        let id = c.build_containers("d", id).into_iter().next()?;
        let running = common::docker(&["inspect", "-f", "{{.State.Running}}", &id]);
        (running.trim() == "true").then_some(id)
    })
    .await;
    c.agents[0].kill();
    // The container outlives its agent...
    assert_eq!(
        common::docker(&["inspect", "-f", "{{.State.Running}}", &orphan]).trim(),
        "true"
    );
    // ...until the agent comes back (same work dir, same instance).
    c.start_agent("d");
    wait_until("the orphan to be removed", LONG, || async {
        (!common::docker(&["ps", "-a", "-q", "--no-trunc"]).contains(&orphan)).then_some(())
    })
    .await;
    let b = c.api.wait_finished(id, LONG).await;
    assert_eq!((b.status, b.attempt.0), (BuildStatus::Success, 2));
    assert!(c.api.log(id).await.unwrap()["stdout"]
        .as_str()
        .unwrap()
        .ends_with("attempt 2\n"));
    assert!(c.build_containers("d", id).is_empty());
    c.assert_exactly_once(&[id]);
}

/// An agent SIGKILLed while a step with a service runs leaves the step's
/// container, the service's and their network behind; restarted, it
/// removes them all, and the step runs again with a fresh service.
#[tokio::test]
async fn a_killed_agent_removes_a_step_s_services_and_network_when_it_restarts() {
    if !docker_or_skip(&[IMAGE]) {
        return;
    }
    let mut c = docker_cluster(300, 3);
    let sha = c.commit_pipeline(
        &format!(
            r#"version: 1
steps:
  - name: talk
    image: "{IMAGE}"
    services:
      echo: {{ image: "{IMAGE}", command: ["sh", "-c", "exec nc -ll -p 9000 -e echo pong"] }}
    commands:
      - "if [ \"$CI_BUILD_ATTEMPT\" = 1 ]; then sleep 300; fi"
      - "for i in $(seq 100); do nc echo 9000 </dev/null && exit 0; sleep 0.1; done; exit 1"
"#
        ),
        "a step with a service",
    );
    c.start_server();
    c.start_agent("d");
    c.wait_agents(1).await;
    let id = c.api.create(&sha).await.id;
    let step = c
        .api
        .wait_build(id, LONG, "to start", |b| b.steps[0].attempt.0 == 1)
        .await
        .steps[0]
        .id;
    let step = ci_core::BuildId(step.0);
    let left = wait_until("the step and its service to run", LONG, || async {
        let ids = c.build_containers("d", step);
        let running = ids
            .iter()
            // N.B.: a container listed may be gone by the time it is
            // inspected (the runner replacing one): not running yet.
            .all(|id| {
                common::docker_try(&["inspect", "-f", "{{.State.Running}}", id])
                    .is_some_and(|o| o.trim() == "true")
            });
        (ids.len() == 2 && running).then_some(ids)
    })
    .await;
    let networks = c.agent_networks("d");
    assert_eq!(networks.len(), 1, "one network for the step");
    c.agents[0].kill();
    c.start_agent("d");
    wait_until("the orphans to be removed", LONG, || async {
        let all = common::docker(&["ps", "-a", "-q", "--no-trunc"]);
        let nets = common::docker(&["network", "ls", "-q", "--no-trunc"]);
        let gone = left.iter().all(|id| !all.contains(id.as_str()))
            && networks.iter().all(|n| !nets.contains(n.as_str()));
        gone.then_some(())
    })
    .await;
    let b = c.api.wait_finished(id, LONG).await;
    let log = c.api.step_log(id, "talk").await.unwrap();
    assert_eq!((b.status, b.attempt.0), (BuildStatus::Success, 2), "{log}");
    assert!(log["stdout"].as_str().unwrap().contains("pong\n"), "{log}");
    c.assert_exactly_once(&[id]);
}

#[test]
fn a_missing_image_or_daemon_stops_the_agent_with_a_clear_line() {
    if !docker_or_skip(&[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = |env: &[(&str, &str)]| {
        let out = std::process::Command::new(ci_testkit::bin("ci-agent"))
            .env_clear()
            .env("RUNNER", "docker")
            .env("WORK_DIR", dir.path())
            .env("AGENT_PORT", "0")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[("IMAGE", "ci-local/no-such-image:1"), ("PULL", "never")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("ci-local/no-such-image:1") && err.lines().count() == 1,
        "{err}"
    );
    let (code, err) = run(&[("DOCKER_HOST", "unix:///nonexistent/docker.sock")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot reach the Docker daemon"), "{err}");
}

/// A pipeline step with an image goes only to an agent with the Docker
/// runner (`docker=true`) and runs in that image; a step with a service
/// reaches it by its name on a network of the step's own, with the
/// service's command and environment, and the service and the network are
/// removed with the step's container.
#[tokio::test]
async fn a_pipeline_step_with_an_image_runs_in_it_on_a_docker_agent() {
    let debian = "ci-local/debian:bookworm";
    if !docker_or_skip(&[IMAGE, debian]) {
        return;
    }
    let mut c = Cluster::new(500, 5);
    let sha = c.commit_pipeline(
        &format!(
                r#"version: 1
steps:
  - name: in-debian
    image: "{debian}"
    commands: ["cat /etc/debian_version"]
  - name: with-a-service
    depends_on: []
    image: "{IMAGE}"
    services:
      web:
        image: "{IMAGE}"
        env: {{ GREETING: hello-from-web }}
        command: ["sh", "-c", "mkdir /www && echo $GREETING > /www/index.html && exec httpd -f -p 8080 -h /www"]
    commands:
      - "for i in $(seq 100); do wget -q -O - http://web:8080/ && exit 0; sleep 0.1; done; exit 1"
"#
            ),
        "image steps",
    );
    c.start_server();
    c.start_agent("shell");
    c.wait_agents(1).await;
    let id = c.api.create(&sha).await.id;
    let waiting = c
        .api
        .wait_build(id, LONG, "to say why it waits", |b| b.waiting.is_some())
        .await;
    assert_eq!(
        waiting.waiting.as_deref(),
        Some("step in-debian: no agent has docker=true")
    );

    c.agent_env = vec![
        ("RUNNER".into(), "docker".into()),
        ("IMAGE".into(), IMAGE.into()),
        ("PULL".into(), "never".into()),
    ];
    c.start_agent("docker");
    let b = c.api.wait_finished(id, LONG).await;
    assert_eq!(b.status, BuildStatus::Success, "{b:?}");
    let agents = c.api.agents().await.unwrap();
    let docker = agents
        .iter()
        .find(|a| a.labels.iter().any(|l| l == "docker=true"))
        .unwrap();
    assert!(b
        .steps
        .iter()
        .all(|s| s.agent.as_deref() == Some(docker.url.as_str())));
    let debian_log = c.api.step_log(id, "in-debian").await.unwrap();
    assert!(
        debian_log["stdout"].as_str().unwrap().contains("12."),
        "{debian_log}"
    );
    let service_log = c.api.step_log(id, "with-a-service").await.unwrap();
    let out = service_log["stdout"].as_str().unwrap();
    assert!(
        out.contains(&format!("ci: service web ({IMAGE}) started\n")),
        "{service_log}"
    );
    assert!(out.contains("hello-from-web\n"), "{service_log}");
    assert_eq!(step_named(&b, "with-a-service").services[0].name, "web");
    let page = c
        .api
        .http
        .get(c.api.url(&format!("/builds/{id}")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(r#"<span class="muted after">with web</span>"#),
        "{page}"
    );
    let gone = || async {
        let containers = b
            .steps
            .iter()
            .flat_map(|s| c.build_containers("docker", ci_core::BuildId(s.id.0)))
            .count();
        (containers == 0 && c.agent_networks("docker").is_empty()).then_some(())
    };
    wait_until("the step's containers and network to be removed", LONG, gone).await;
    c.assert_exactly_once(&[id]);
}
