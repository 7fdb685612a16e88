//! The docker-compose deployment end to end: images from the project's
//! script, `up` with two agents, builds across both, an agent container
//! killed mid-build, and `down` leaving nothing running.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ci_core::BuildStatus;
use common::{docker, docker_or_skip, wait_until, Api, GitRepo};

const LONG: Duration = Duration::from_secs(120);

/// `docker compose` (v2) if present, else `docker-compose` (v1).
fn compose_cmd() -> Vec<&'static str> {
    let v2 = Command::new("docker").args(["compose", "version"]).output();
    if v2.is_ok_and(|o| o.status.success()) {
        vec!["docker", "compose"]
    } else {
        vec!["docker-compose"]
    }
}

/// A compose project, taken down (with its volumes) when dropped.
struct Project {
    name: String,
    env: Vec<(String, String)>,
}

impl Project {
    fn run(&self, args: &[&str]) -> String {
        let cmd = compose_cmd();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(cmd[0])
            .args(&cmd[1..])
            .args(["-p", &self.name, "-f"])
            .arg(root.join("docker-compose.yml"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "compose {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn containers(&self, service: &str) -> Vec<String> {
        docker(&[
            "ps",
            "-a",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ])
        .lines()
        .map(str::to_owned)
        .collect()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.run(&["logs", "--no-color", "--tail=50"]));
        }
        let _ = self.run(&["down", "-v", "--timeout", "5"]);
    }
}

fn ip_of(container: &str) -> String {
    docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        container,
    ])
    .trim()
    .to_owned()
}

#[tokio::test]
async fn compose_up_builds_survives_an_agent_kill_and_comes_down_clean() {
    if !docker_or_skip(&[]) {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = Command::new(root.join("scripts/build-images")).output().unwrap();
    assert!(
        built.status.success(),
        "scripts/build-images: {}",
        String::from_utf8_lossy(&built.stderr)
    );

    let repo = GitRepo::new();
    let sha = repo.commit(&[("build.sh", "sleep 1; echo built in $(pwd)\n")], "build");
    let port = ci_testkit::free_port();
    let project = Project {
        name: format!("citest{}", std::process::id()),
        env: vec![
            ("CI_PORT".into(), port.to_string()),
            ("REPO_DIR".into(), repo.path().display().to_string()),
            ("HEARTBEAT_MS".into(), "300".into()),
            ("MISSED_HEARTBEATS".into(), "3".into()),
        ],
    };
    project.run(&["up", "-d", "--scale", "agent=2"]);
    let api = Api::new(port);
    wait_until("the server", LONG, || async {
        api.http
            .get(api.url("/healthz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;
    wait_until("two agents", LONG, || async {
        api.agents().await.ok().filter(|a| a.len() == 2)
    })
    .await;

    // Four builds, across both agents.
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(api.create(&sha).await.id);
    }
    let mut agents = BTreeSet::new();
    for id in &ids {
        let b = api.wait_finished(*id, LONG).await;
        assert_eq!(b.status, BuildStatus::Success, "{b:?}");
        agents.insert(b.agent.unwrap());
    }
    assert_eq!(agents.len(), 2, "both agents built");
    let log = api.log(ids[0]).await.unwrap();
    assert!(
        log["stdout"].as_str().unwrap().contains("built in /workspace"),
        "{log}"
    );

    // Kill the agent container running a build: it is requeued and
    // succeeds on the other; the orphaned build container is reaped.
    let (status, body) = api
        .post(
            "/api/builds",
            &serde_json::json!({"hash": sha, "command": "if [ \"$CI_BUILD_ATTEMPT\" = 1 ]; then sleep 120; fi; echo rescued"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let id = ci_core::BuildId(body["id"].as_i64().unwrap());
    let running = api
        .wait_build(id, LONG, "running", |b| b.status == BuildStatus::Running)
        .await;
    let victim_url = running.agent.unwrap();
    // N.B.: the agents connect out: the server knows each by the address
    // its connection comes from (the build container existing, below,
    // shows the agent runs the build).
    let victim_ip = api
        .agents()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.url == victim_url)
        .and_then(|a| a.address)
        .expect("the running agent's address");
    let victim = project
        .containers("agent")
        .into_iter()
        .find(|c| ip_of(c) == victim_ip)
        .expect("the agent container with that address");
    let orphan_filter = format!("label=ci.agent.container={}", &victim[..12]);
    wait_until("the build container", LONG, || async {
        (!docker(&["ps", "-q", "--filter", &orphan_filter])
            .trim()
            .is_empty())
        .then_some(())
    })
    .await;
    docker(&["kill", &victim]);

    let b = api
        .wait_build(id, LONG, "attempt 2 done", |b| {
            b.attempt.0 >= 2 && b.status.is_finished()
        })
        .await;
    assert_eq!(b.status, BuildStatus::Success);
    assert_ne!(
        b.agent.as_deref(),
        Some(victim_url.as_str()),
        "it ran on the other agent"
    );
    assert!(api.log(id).await.unwrap()["stdout"]
        .as_str()
        .unwrap()
        .ends_with("rescued\n"));
    wait_until("the dead agent's build container to be reaped", LONG, || async {
        docker(&["ps", "-a", "-q", "--filter", &orphan_filter])
            .trim()
            .is_empty()
            .then_some(())
    })
    .await;

    // Down: nothing of the project left, and no build container of its agents.
    let agent_ids: Vec<String> = project
        .containers("agent")
        .iter()
        .map(|c| c[..12].to_owned())
        .collect();
    project.run(&["down", "-v", "--timeout", "10"]);
    assert!(project.containers("agent").is_empty() && project.containers("server").is_empty());
    for a in agent_ids {
        let left = docker(&[
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label=ci.agent.container={a}"),
        ]);
        assert!(
            left.trim().is_empty(),
            "build containers of agent {a} left: {left}"
        );
    }
}
