//! What users do every day, against real processes: follow a log live,
//! cancel, rebuild, read metrics, and stop servers and agents gracefully.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::time::Duration;

use ci_core::BuildStatus;
use ci_testkit::alive;
use common::{wait_until, Cluster};
use futures_util::StreamExt;
use nix::sys::signal::Signal;
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(60);

/// Reads a Server-Sent Events stream into (event, data) pairs, noting for
/// each whether the build was still running when it arrived.
async fn follow(c: &Cluster, id: ci_core::BuildId) -> Vec<(String, String, BuildStatus)> {
    let resp = c
        .api
        .http
        .get(c.api.url(&format!("/api/builds/{id}/log?follow=1")))
        .timeout(LONG)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let (mut buf, mut events) = (String::new(), Vec::new());
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(cut) = buf.find("\n\n") {
            let raw: String = buf.drain(..cut + 2).collect();
            let mut event = String::new();
            let mut data = Vec::new();
            for line in raw.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim().to_owned();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push(d.to_owned());
                }
            }
            if !event.is_empty() {
                let status = c.api.build(id).await.unwrap().status;
                events.push((event, data.join("\n"), status));
            }
        }
    }
    events
}

#[tokio::test]
async fn logs_stream_live_and_a_lost_attempt_keeps_its_log() {
    let mut c = Cluster::new(200, 3);
    let sha = c.commit_script(
        "echo \"attempt $CI_BUILD_ATTEMPT begins\"\n\
         if [ \"$CI_BUILD_ATTEMPT\" = 1 ]; then sleep 60; fi\n\
         sleep 1; echo warning >&2; sleep 1; echo done\n",
    );
    c.start_server();
    c.start_agent("first");
    c.wait_agents(1).await;
    let (id, _) = c.create_running(&sha).await;
    let api = &c.api;
    wait_until("attempt 1's output", LONG, || async {
        let log = api.log(id).await.ok()?;
        log["stdout"].as_str()?.contains("attempt 1 begins").then_some(())
    })
    .await;
    let partial = c.api.log(id).await.unwrap();
    assert_eq!(partial["complete"], false, "streamed, not final: {partial}");

    // The agent dies; attempt 2 runs elsewhere while we follow it live.
    c.start_agent("second");
    c.wait_agents(2).await;
    c.agents[0].kill();
    c.api
        .wait_build(id, LONG, "attempt 2", |b| b.attempt.0 == 2)
        .await;
    let events = follow(&c, id).await;
    let text: Vec<(&str, &str)> = events.iter().map(|(e, d, _)| (e.as_str(), d.as_str())).collect();
    let stdout: String = events
        .iter()
        .filter(|e| e.0 == "stdout")
        .map(|e| e.1.as_str())
        .collect();
    assert!(
        stdout.contains("attempt 2 begins") && stdout.ends_with("done\n"),
        "{text:?}"
    );
    assert!(text.contains(&("stderr", "warning\n")), "{text:?}");
    let live = events
        .iter()
        .find(|(e, d, _)| e == "stdout" && d.contains("begins"))
        .unwrap();
    assert_eq!(live.2, BuildStatus::Running, "output arrived while the build ran");
    let (last, data, _) = events.last().unwrap();
    assert_eq!(last, "end");
    assert!(data.contains("\"success\""), "{data}");

    // Attempt 1's log is kept, marked where it stopped; attempt 2's apart.
    let lost = c
        .api
        .http
        .get(c.api.url(&format!("/api/builds/{id}/log?attempt=1")))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert!(
        lost["stdout"].as_str().unwrap().contains("attempt 1 begins"),
        "{lost}"
    );
    assert_eq!(lost["complete"], false);
    assert!(lost["note"].as_str().unwrap().contains("stops here"), "{lost}");
    let fin = c.api.log(id).await.unwrap();
    assert_eq!(
        (fin["attempt"].as_u64(), fin["complete"].as_bool()),
        (Some(2), Some(true))
    );
    assert!(!fin["stdout"].as_str().unwrap().contains("attempt 1"));
}

#[tokio::test]
async fn cancel_stops_the_work_and_rebuild_runs_it_again() {
    let mut c = Cluster::new(300, 5);
    let dir = c.dir.path().display().to_string();
    let sha = c.commit_script(&format!("echo $$ > {dir}/pid-$CI_BUILD_ID\nsleep 60\n"));
    c.start_server();
    c.wait_server().await;

    // Queued (no agent yet): canceled at once.
    let queued = c.api.create(&sha).await.id;
    let (status, body) = c
        .api
        .post(&format!("/api/builds/{queued}/cancel"), &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("canceled")),
        "{body}"
    );

    // Running: the process group dies, then the build is canceled.
    c.start_agent("a");
    c.wait_agents(1).await;
    let running = c.api.create(&sha).await.id;
    let pidfile = c.dir.path().join(format!("pid-{running}"));
    let pid: i32 = wait_until("the build's process", LONG, || async {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    })
    .await;
    let t = Instant::now();
    let (status, body) = c
        .api
        .post(&format!("/api/builds/{running}/cancel"), &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("canceled")),
        "{body}"
    );
    // SIGKILL went out before the answer; give the kernel a moment.
    wait_until("the build's process to die", Duration::from_secs(2), || async {
        (!alive(pid)).then_some(())
    })
    .await;
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let (status, _) = c
        .api
        .post(&format!("/api/builds/{running}/cancel"), &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(status, 409, "a finished build cannot be canceled");

    // The agent is free at once; a rebuild runs the same commit and command.
    let (status, body) = c
        .api
        .post(&format!("/api/builds/{running}/rebuild"), &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (body["hash"].as_str(), body["command"].as_str()),
        (Some(sha.as_str()), Some("sh build.sh"))
    );
    let rebuilt = ci_core::BuildId(body["id"].as_i64().unwrap());
    c.api
        .wait_build(rebuilt, LONG, "running", |b| b.status == BuildStatus::Running)
        .await;
    assert_eq!(c.api.agents().await.unwrap()[0].build, Some(rebuilt));
}

#[tokio::test]
async fn metrics_count_builds_agents_latencies_and_requeues() {
    let mut c = Cluster::new(200, 3);
    let sha = c.commit_script(
        "if [ \"$CI_BUILD_ATTEMPT\" = 1 ] && [ \"$CI_BUILD_ID\" = 3 ]; then sleep 60; fi; echo ok",
    );
    c.start_server();
    c.start_agent("a");
    c.wait_agents(1).await;
    for _ in 0..2 {
        let id = c.api.create(&sha).await.id;
        c.api.wait_finished(id, LONG).await;
    }
    let (id, _) = c.create_running(&sha).await;
    c.start_agent("b");
    c.wait_agents(2).await;
    c.agents[0].kill();
    c.api.wait_finished(id, LONG).await;
    let text = c
        .api
        .http
        .get(c.api.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "ci_builds{status=\"success\"} 3",
        "ci_queue_depth 0",
        "ci_agents{state=\"idle\"} 1",
        "ci_dispatch_latency_seconds_count 4",
        "ci_build_duration_seconds_count 3",
        "ci_heartbeat_misses_total 1",
        "ci_requeues_total 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

#[tokio::test]
async fn sigterm_an_agent_hands_its_build_back_and_a_server_drains() {
    let mut c = Cluster::new(300, 10); // a 3 s lease: a hand-back must be faster
    c.agent_env.push(("SHUTDOWN_GRACE".into(), "500ms".into()));
    let sha = c
        .commit_script("if [ \"$CI_BUILD_ATTEMPT\" = 1 ]; then sleep 60; fi; echo attempt $CI_BUILD_ATTEMPT");
    c.start_server();
    c.start_agent("leaving");
    c.wait_agents(1).await;
    let (id, url) = c.create_running(&sha).await;
    c.start_agent("staying");
    c.wait_agents(2).await;

    let t = Instant::now();
    c.agents[0].signal(Signal::SIGTERM);
    let b = c
        .api
        .wait_build(id, LONG, "attempt 2", |b| b.attempt.0 == 2)
        .await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "handed back in {:?}, before the lease ran out",
        t.elapsed()
    );
    assert_ne!(b.agent.as_deref(), Some(url.as_str()));
    let status = wait_until("the agent to exit", LONG, || {
        std::future::ready(c.agents[0].try_wait())
    })
    .await;
    assert!(status.success(), "{status:?}");
    assert_eq!(c.api.agents().await.unwrap().len(), 1, "it left the server");
    assert_eq!(c.api.wait_finished(id, LONG).await.status, BuildStatus::Success);

    // The server drains and exits 0; its state is intact for the next one.
    c.server.as_ref().unwrap().signal(Signal::SIGTERM);
    let mut server = c.server.take().unwrap();
    let status = wait_until("the server to exit", LONG, || {
        std::future::ready(server.try_wait())
    })
    .await;
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(server.log().contains("draining"));
    c.start_server();
    c.wait_server().await;
    assert_eq!(c.api.build(id).await.unwrap().status, BuildStatus::Success);
    c.assert_exactly_once(&[id]);
}

#[tokio::test]
async fn the_web_pages_render_and_link_their_assets() {
    let mut c = Cluster::new(500, 5);
    let sha = c.commit_script("echo '<b>not bold</b>'");
    c.start_server();
    c.start_agent("a");
    c.wait_agents(1).await;
    let id = c.api.create(&sha).await.id;
    c.api.wait_finished(id, LONG).await;
    let get = |path: &str| {
        let url = c.api.url(path);
        let http = c.api.http.clone();
        async move {
            let r = http.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (status, index) = get("/").await;
    assert_eq!(status, 200);
    for needle in [
        "<form id=\"build-form\"",
        "<label for=\"hash\">",
        "href=\"/builds/1\"",
        "status-success",
        "name=\"viewport\"",
    ] {
        assert!(index.contains(needle), "{needle} missing from the index");
    }
    let (status, page) = get(&format!("/builds/{id}")).await;
    assert_eq!(status, 200);
    assert!(page.contains("&lt;b&gt;not bold&lt;/b&gt;"), "output is escaped");
    assert!(page.contains("id=\"cancel\"") && page.contains("id=\"rebuild\""));
    assert_eq!(get("/ui/app.js").await.0, 200);
    assert_eq!(get("/ui/style.css").await.0, 200);
    assert_eq!(get("/builds/999").await.0, 404);
    // A plain form post (no JavaScript) lands on the build's page. A
    // browser sends its page's origin with it.
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(c.api.url("/build"))
        .header("accept", "text/html")
        .header("origin", c.api.url(""))
        .form(&[("hash", sha.as_str()), ("command", "true")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(r.headers()["location"], "/builds/2");
}

/// Whatever the server takes, an agent takes: a command at the size limit,
/// every character one JSON must escape (six bytes each on the wire), is
/// run by the agent, not refused for its body.
#[tokio::test]
async fn a_command_at_the_limit_reaches_the_agent() {
    let mut c = Cluster::new(200, 5);
    let sha = c.commit_script("true");
    c.start_server();
    c.start_agent("a");
    c.wait_agents(1).await;
    let command = "\u{1}".repeat(ci_core::model::limits::MAX_COMMAND);
    let id = c
        .api
        .create_with(&serde_json::json!({ "hash": sha, "command": command }))
        .await
        .id;
    let b = c.api.wait_finished(id, LONG).await;
    let log = c.api.log(id).await.unwrap();
    let stderr = log["stderr"].as_str().unwrap_or_default();
    assert!(
        !stderr.contains("refused"),
        "{}",
        &stderr[..stderr.len().min(300)]
    );
    // The shell ran it: no such command.
    assert_eq!(
        (b.status, b.attempt.0, b.exit_code),
        (BuildStatus::Failed, 1, Some(127)),
        "{b:?}"
    );
}

/// An agent started with `CAPACITY=2` runs two builds at once: each build
/// leaves a mark and waits for the other's, so both succeed only if they
/// overlap.
#[tokio::test]
async fn an_agent_with_capacity_two_runs_two_builds_at_once() {
    let mut c = Cluster::new(200, 5);
    let marks = c.dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    let sha = c.commit_script(
        "touch \"$MARKS/$CI_BUILD_ID\"\n\
         for i in $(seq 600); do\n\
           [ \"$(ls \"$MARKS\" | wc -l)\" -ge 2 ] && exit 0\n\
           sleep 0.05\n\
         done\n\
         exit 1\n",
    );
    c.start_server();
    c.agent_env.push(("CAPACITY".into(), "2".into()));
    c.start_agent("a");
    let agents = c.wait_agents(1).await;
    assert_eq!(agents[0].capacity, 2);
    let command = format!("MARKS={} sh build.sh", marks.display());
    let mut ids = Vec::new();
    for _ in 0..2 {
        let b = c
            .api
            .create_with(&serde_json::json!({ "hash": sha, "command": command }))
            .await;
        ids.push(b.id);
    }
    for &id in &ids {
        let b = c.api.wait_finished(id, LONG).await;
        assert_eq!((b.status, b.attempt.0), (BuildStatus::Success, 1), "{b:?}");
        assert_eq!(b.agent_id, Some(agents[0].id));
    }
    c.assert_exactly_once(&ids);
}

/// Labels route builds: a build goes only to an agent with all of its
/// labels; one that no agent can take says why and waits, without holding
/// up the builds behind it, until a fitting agent registers.
#[tokio::test]
async fn labels_route_builds_and_a_build_no_agent_can_take_says_why() {
    let mut c = Cluster::new(200, 5);
    let sha = c.commit_script("echo built\n");
    c.start_server();
    c.start_agent("plain");
    c.agent_env = vec![("LABELS".into(), "os=special,arch=amd64".into())];
    c.start_agent("special");
    let agents = c.wait_agents(2).await;
    let special = agents.iter().find(|a| !a.labels.is_empty()).unwrap().id;
    let submit = |labels: &[&str]| serde_json::json!({ "hash": sha, "command": common::BUILD_COMMAND, "labels": labels });
    let mut routed = Vec::new();
    for _ in 0..3 {
        routed.push(c.api.create_with(&submit(&["os=special"])).await.id);
    }
    let windows = c.api.create_with(&submit(&["os=windows"])).await.id;
    let behind = c.api.create(&sha).await.id;
    for &id in &routed {
        let b = c.api.wait_finished(id, LONG).await;
        assert_eq!(
            (b.status, b.agent_id),
            (BuildStatus::Success, Some(special)),
            "{b:?}"
        );
    }
    let b = c.api.wait_finished(behind, LONG).await;
    assert_eq!(b.status, BuildStatus::Success, "not held up by the windows build");
    let w = c.api.build(windows).await.unwrap();
    assert_eq!(w.status, BuildStatus::Queued);
    assert_eq!(w.waiting.as_deref(), Some("no agent has os=windows"));
    let (status, body) = c.api.post("/api/builds", &submit(&["has space"])).await.unwrap();
    assert_eq!(status, 400, "{body}");

    c.agent_env = vec![("LABELS".into(), "os=windows".into())];
    c.start_agent("windows");
    let b = c.api.wait_finished(windows, LONG).await;
    assert_eq!(b.status, BuildStatus::Success, "{b:?}");
    assert_eq!(b.waiting, None);
    let mut all = routed.clone();
    all.extend([windows, behind]);
    c.assert_exactly_once(&all);
}
