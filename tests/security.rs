//! The threats of `docs/security.md`, each against real processes and
//! real HTTP: tokens, cross-origin requests, DNS rebinding, secrets in
//! builds, hijacked sessions, forged results, SSRF, and hostile input.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::time::Duration;

use ci_core::BuildStatus;
use common::{wait_until, Cluster, FakeAgent};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);
const TOKEN: &str = "the-agent-token-0123456789";

#[tokio::test]
async fn agents_need_the_token_and_builds_run_with_it() {
    let mut c = Cluster::new(300, 5);
    let sha = c.commit_script("echo guarded");
    c.agent_token = Some("the-agent-token-0123456789".into());
    c.start_server();
    c.start_agent("good");
    c.wait_agents(1).await;

    c.agent_token = Some("a-wrong-token-0123456789".into());
    let bad = c.start_agent("bad");
    wait_until("the impostor to be refused", Duration::from_secs(20), || async {
        c.agents[bad].log().contains("401").then_some(())
    })
    .await;
    assert_eq!(
        c.api.agents().await.unwrap().len(),
        1,
        "the impostor never registers"
    );

    let id = c.api.create(&sha).await.id;
    let b = c.api.wait_finished(id, Duration::from_secs(60)).await;
    assert_eq!(b.status, BuildStatus::Success);

    // The agent refuses builds from anyone without the token.
    let agent_url = c.api.agents().await.unwrap()[0].url.clone();
    let resp = reqwest::Client::new()
        .post(format!("{agent_url}/build"))
        .json(&serde_json::json!({"id": 99, "command": "touch /tmp/pwned", "hash": "abcd", "repo": "/r"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

/// A client that sends from 127.0.0.2: another local user's program.
fn from_elsewhere() -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_web_page_cannot_start_builds_or_read_them() {
    let mut c = Cluster::new(300, 5);
    let sha = c.commit_script("echo hi");
    c.start_server();
    c.wait_server().await;
    let api = &c.api;
    let page = "http://127.0.0.2:8000";
    // A plain HTML form from another origin.
    let form = api
        .http
        .post(api.url("/build"))
        .header("origin", page)
        .form(&[("hash", sha.as_str()), ("command", "echo from a web page")])
        .send()
        .await
        .unwrap();
    assert_eq!(form.status().as_u16(), 403);
    // The same form from a page that sends no Origin, only a Referer.
    let form = api
        .http
        .post(api.url("/build"))
        .header("referer", format!("{page}/evil.html"))
        .form(&[("hash", sha.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(form.status().as_u16(), 403);
    // A no-cors fetch of a typeless Blob: no Content-Type at all.
    let blob = api
        .http
        .post(api.url("/api/builds"))
        .header("origin", page)
        .header("sec-fetch-site", "cross-site")
        .body(json!({"hash": sha, "command": "echo blob"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(blob.status().as_u16(), 403);
    let typeless = api
        .http
        .post(api.url("/api/builds"))
        .body(json!({"hash": sha}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(typeless.status().as_u16(), 415);
    let body: Value = typeless.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("application/json"),
        "{body}"
    );
    // DNS rebinding: the page's own name in Host.
    for path in ["/api/builds", "/"] {
        let rebound = api
            .http
            .get(api.url(path))
            .header("host", format!("evil.example:{}", c.port))
            .send()
            .await
            .unwrap();
        assert_eq!(rebound.status().as_u16(), 403, "{path}");
    }
    assert!(api.all_builds().await.unwrap().is_empty(), "no build was created");
    // The server's own pages still work, and say how they may be framed.
    let same = api
        .http
        .post(api.url("/build"))
        .header("origin", api.url(""))
        .form(&[("hash", sha.as_str()), ("command", "true")])
        .send()
        .await
        .unwrap();
    assert_eq!(same.status().as_u16(), 201);
    let index = api.http.get(api.url("/")).send().await.unwrap();
    let h = index.headers();
    assert!(h["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("frame-ancestors 'none'"));
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
}

#[tokio::test]
async fn a_build_never_sees_the_agents_secrets() {
    let mut c = Cluster::new(300, 5);
    let sha = c.commit_script("env | sort");
    c.agent_token = Some(TOKEN.into());
    c.agent_env
        .push(("CI_TOKEN".into(), "user-api-token-4242".into()));
    c.agent_env
        .push(("CLOUD_SECRET_KEY".into(), "cloud-secret-4242".into()));
    c.agent_env.push(("LC_ALL".into(), "C".into()));
    c.start_server();
    c.start_agent("a");
    c.wait_agents(1).await;
    let id = c.api.create(&sha).await.id;
    assert_eq!(c.api.wait_finished(id, LONG).await.status, BuildStatus::Success);
    let log = c.api.log(id).await.unwrap();
    let env = log["stdout"].as_str().unwrap();
    for secret in [TOKEN, "user-api-token-4242", "cloud-secret-4242"] {
        assert!(!env.contains(secret), "a build saw {secret}: {env}");
    }
    for expected in ["CI=true", "CI_BUILD_ID=", "CI_COMMIT=", "PATH=", "LC_ALL=C"] {
        assert!(env.contains(expected), "{expected} missing: {env}");
    }
}

#[tokio::test]
async fn an_agent_without_a_token_takes_builds_only_from_its_server() {
    let mut c = Cluster::new(300, 5);
    let sha = c.commit_script("echo from the server");
    c.start_server();
    c.start_agent("a");
    let agent_url = c.wait_agents(1).await[0].url.clone();
    let resp = from_elsewhere()
        .post(format!("{agent_url}/build"))
        .json(&json!({"id": 99, "command": "echo never", "hash": sha, "repo": c.repo.url()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("only from its server"),
        "{body}"
    );
    let cancel = from_elsewhere()
        .post(format!("{agent_url}/cancel"))
        .json(&json!({"id": 99}))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status().as_u16(), 403);
    // Its server's dispatches still arrive.
    let id = c.api.create(&sha).await.id;
    assert_eq!(c.api.wait_finished(id, LONG).await.status, BuildStatus::Success);
    assert!(
        !c.agents[0].log().contains("build=99"),
        "the foreign build never started"
    );
}

#[tokio::test]
async fn dispatches_follow_no_redirect() {
    let mut c = Cluster::new(300, 5);
    let sha = c.commit_script("true");
    c.start_server();
    c.wait_server().await;
    // Where a redirect would send the command and the repository.
    let elsewhere = FakeAgent::start(&c.api, None, false).await;
    let redirecting = FakeAgent::start_answering(
        &c.api,
        None,
        false,
        warp::http::StatusCode::TEMPORARY_REDIRECT,
        Some(format!("{}/build", elsewhere.url)),
    )
    .await;
    // One build each; the redirecting agent's dispatch fails, and it is
    // dropped.
    let busy = c.api.create(&sha).await.id;
    let id = c.api.create(&sha).await.id;
    wait_until("the redirecting agent to be dropped", LONG, || async {
        c.api
            .agents()
            .await
            .ok()
            .filter(|a| a.len() == 1 && a[0].url == elsewhere.url)
    })
    .await;
    // N.B.: by build: a dispatch's `id` names the step's attempt.
    let to_elsewhere: Vec<i64> = elsewhere
        .builds
        .lock()
        .unwrap()
        .iter()
        .filter_map(|b| b["build"].as_i64())
        .collect();
    let redirected: Vec<i64> = redirecting
        .builds
        .lock()
        .unwrap()
        .iter()
        .filter_map(|b| b["build"].as_i64())
        .collect();
    assert_eq!(redirected.len(), 1, "{redirected:?}");
    assert_eq!(
        to_elsewhere.len(),
        1,
        "only its own dispatch reached the other agent, never a redirected one: {to_elsewhere:?}"
    );
    assert!([busy.0, id.0].contains(&redirected[0]));
}

#[tokio::test]
async fn repository_credentials_never_show() {
    let mut c = Cluster::new(300, 5);
    let secret = "s3cr3t-repo-password";
    let repo = format!("http://builder:{secret}@127.0.0.1:9/private.git");
    c.server_env.push(("REPO".into(), repo));
    c.start_server();
    c.start_agent("a");
    c.wait_agents(1).await;
    let id = c.api.create("main").await.id;
    let b = c.api.wait_finished(id, LONG).await;
    assert_eq!(b.status, BuildStatus::Failed, "the repository cannot be reached");
    assert_eq!(b.repo, "http://***@127.0.0.1:9/private.git");
    let log = c.api.log(id).await.unwrap().to_string();
    assert!(
        log.contains("***@127.0.0.1:9"),
        "the failed clone is reported: {log}"
    );
    let page = c
        .api
        .http
        .get(c.api.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let build_page = c
        .api
        .http
        .get(c.api.url(&format!("/builds/{id}")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let list = c
        .api
        .http
        .get(c.api.url("/api/builds"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (what, text) in [
        ("the index", page),
        ("the build page", build_page),
        ("the API", list),
        ("the build log", log),
        ("the server's log", c.server.as_ref().unwrap().log()),
        ("the agent's log", c.agents[0].log()),
    ] {
        assert!(!text.contains(secret), "{what} shows the password: {text}");
    }
}

#[tokio::test]
async fn a_live_session_cannot_be_taken_over_by_registering_its_url() {
    let mut c = Cluster::new(300, 5);
    let sha = c.commit_script("sleep 3; echo survived");
    c.start_server();
    c.start_agent("a");
    c.wait_agents(1).await;
    let (id, url) = c.create_running(&sha).await;
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    for session in [true, false] {
        let (status, body) = c
            .api
            .post(
                "/notify_agent",
                &json!({"host": "127.0.0.1", "port": port, "session": session}),
            )
            .await
            .unwrap();
        assert_eq!(status, 409, "{body}");
        assert!(body["error"].as_str().unwrap().contains("live session"), "{body}");
    }
    let b = c.api.wait_finished(id, LONG).await;
    assert_eq!(
        (b.status, b.attempt.0),
        (BuildStatus::Success, 1),
        "the build was never moved"
    );
    assert!(c.api.log(id).await.unwrap()["stdout"]
        .as_str()
        .unwrap()
        .ends_with("survived\n"));
}

#[tokio::test]
async fn a_requeued_build_takes_no_forged_result() {
    let mut c = Cluster::new(100, 3);
    let sha = c.commit_script("true");
    c.agent_token = Some(TOKEN.into());
    c.start_server();
    c.wait_server().await;
    let agent = FakeAgent::start(&c.api, Some(TOKEN), true).await;
    let id = c.api.create(&sha).await.id;
    // The agent never sends a heartbeat: its lease lapses, and with no
    // other agent the build waits in the queue.
    c.api
        .wait_build(id, LONG, "requeued", |b| {
            b.status == BuildStatus::Queued && b.attempt.0 == 1
        })
        .await;
    let step = c.api.build(id).await.unwrap().steps[0].id;
    let wire = ci_core::DispatchId::new(step, ci_core::Attempt(1)).unwrap();
    let forged =
        json!({"id": wire, "status": 0, "stdout": "forged", "stderr": "", "attempt": 1, "agentId": agent.id});
    let (status, body) = agent
        .post(&c.api, Some(TOKEN), false, "/notify_build_result", &forged)
        .await;
    assert_eq!(status, 409, "a token holder without the session secret: {body}");
    assert_eq!(c.api.build(id).await.unwrap().status, BuildStatus::Queued);
    // The agent that held the attempt still may, proven by its secret.
    let real =
        json!({"id": wire, "status": 0, "stdout": "real", "stderr": "", "attempt": 1, "agentId": agent.id});
    let (status, body) = agent
        .post(&c.api, Some(TOKEN), true, "/notify_build_result", &real)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.api.log(id).await.unwrap()["stdout"], "real");
}

#[tokio::test]
async fn a_build_dispatched_as_its_agent_registers_again_runs_once() {
    let mut c = Cluster::new(100, 3);
    let sha = c.commit_script("echo once");
    c.start_server();
    let a = c.start_agent("a");
    c.wait_agents(1).await;
    // Frozen past its lease, the idle agent is forgotten.
    c.agents[a].signal(nix::sys::signal::Signal::SIGSTOP);
    wait_until("the agent to be dropped", LONG, || async {
        c.api.agents().await.ok().filter(Vec::is_empty)
    })
    .await;
    let id = c.api.create(&sha).await.id;
    // It wakes, registers again, and is sent the build at once, before
    // it has read the reply to its registration.
    c.agents[a].signal(nix::sys::signal::Signal::SIGCONT);
    let b = c.api.wait_finished(id, LONG).await;
    assert_eq!((b.status, b.attempt.0), (BuildStatus::Success, 1), "{b:?}");
}

#[tokio::test]
async fn the_ui_takes_any_page_number() {
    let mut c = Cluster::new(300, 5);
    c.start_server();
    c.wait_server().await;
    for page in ["18446744073709551615", "9223372036854775807", "0", "-1", "x"] {
        let r = c
            .api
            .http
            .get(c.api.url(&format!("/?page={page}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "page {page}");
    }
    assert!(c
        .api
        .http
        .get(c.api.url("/healthz"))
        .send()
        .await
        .unwrap()
        .status()
        .is_success());
}

#[tokio::test]
async fn a_second_server_on_the_same_database_is_refused() {
    let mut c = Cluster::new(300, 5);
    c.start_server();
    c.wait_server().await;
    let second_port = ci_testkit::free_port().to_string();
    let db = c.db_path();
    let repo = c.repo.url();
    let out = std::process::Command::new(ci_testkit::bin("ci-server"))
        .env_clear()
        .envs([
            ("PORT", second_port.as_str()),
            ("REPO", repo.as_str()),
            ("DB_PATH", db.to_str().unwrap()),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("in use by another ci-server"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
