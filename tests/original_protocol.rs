//! Agents that speak only the original protocol's fields, against our
//! server: real HTTP on 127.0.0.1, a real `ci-server` process, and agents
//! played by the test that send exactly what the original Node.js agent
//! sends (`{"id"}` heartbeats, `{"id", "status", "stdout", "stderr"}`
//! results) and nothing else.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::time::Duration;

use ci_core::protocol::AgentStatus;
use ci_core::BuildStatus;
use common::{wait_until, Cluster, FakeAgent};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(30);

/// The `id` of the latest `POST /build` the agent was sent.
async fn dispatched(agent: &FakeAgent, n: usize) -> Value {
    wait_until("a dispatch", LONG, || async {
        agent.builds.lock().unwrap().get(n - 1).map(|d| d["id"].clone())
    })
    .await
}

/// Sends `{"id"}` heartbeats, as the original agent does, until dropped.
fn heartbeats(c: &Cluster, id: Value) -> tokio::task::JoinHandle<()> {
    let (http, url) = (c.api.http.clone(), c.api.url("/notify_agent_alive"));
    tokio::spawn(async move {
        loop {
            let _ = http.post(&url).json(&json!({ "id": id })).send().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Agent A stalls past its lease and the build moves to agent B; A wakes
/// and posts its result with no attempt. The wire id names A's attempt, so
/// A's result is refused; B's heartbeats keep working, B stays busy until
/// its own result, which is the one stored.
#[tokio::test]
async fn a_stalled_original_agent_s_late_result_never_wins() {
    let mut c = Cluster::new(200, 3);
    let sha = c.commit_script("true");
    c.start_server();
    c.wait_server().await;
    let a = FakeAgent::start_original(&c.api).await;
    let id = c.api.create(&sha).await.id;
    let wire_a = dispatched(&a, 1).await;
    // A says nothing: its lease lapses and the step waits for an agent.
    c.api
        .wait_build(id, LONG, "requeued", |b| {
            b.status == BuildStatus::Queued && b.attempt.0 == 1
        })
        .await;
    let b = FakeAgent::start_original(&c.api).await;
    let wire_b = dispatched(&b, 1).await;
    assert_ne!(wire_a, wire_b, "each attempt has its own wire id");
    let beating = heartbeats(&c, wire_b.clone());
    let running = c
        .api
        .wait_build(id, LONG, "attempt 2 to run", |b| {
            b.status == BuildStatus::Running && b.attempt.0 == 2
        })
        .await;
    assert_eq!(running.agent.as_deref(), Some(b.url.as_str()));

    let late = json!({"id": wire_a, "status": 1, "stdout": "stale", "stderr": ""});
    let (status, body) = c.api.post("/notify_build_result", &late).await.unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("superseded"), "{body}");
    let (status, _) = c
        .api
        .post("/notify_agent_alive", &json!({ "id": wire_a }))
        .await
        .unwrap();
    assert_eq!(status, 409, "A's heartbeats are refused too");

    // B is still running its attempt: busy, its heartbeats taken.
    let (status, _) = c
        .api
        .post("/notify_agent_alive", &json!({ "id": wire_b }))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let agents = c.api.agents().await.unwrap();
    let b_view = agents.iter().find(|v| v.url == b.url).unwrap();
    assert_eq!(b_view.status, AgentStatus::Busy, "{agents:?}");
    assert_eq!(c.api.build(id).await.unwrap().status, BuildStatus::Running);

    let real = json!({"id": wire_b, "status": 0, "stdout": "fresh", "stderr": ""});
    let (status, body) = c.api.post("/notify_build_result", &real).await.unwrap();
    assert_eq!(status, 200, "{body}");
    beating.abort();
    let done = c.api.wait_finished(id, LONG).await;
    assert_eq!((done.status, done.attempt.0), (BuildStatus::Success, 2));
    assert_eq!(c.api.log(id).await.unwrap()["stdout"], "fresh");
    // A's attempt streamed nothing (the original agent never does) and
    // lost its agent: its log says it is not complete, and why.
    let first = c
        .api
        .http
        .get(c.api.url(&format!("/api/builds/{id}/log?attempt=1")))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(first["complete"], false, "{first}");
    assert!(
        first["note"]
            .as_str()
            .unwrap()
            .contains("attempt 1 lost its agent"),
        "{first}"
    );
    let agents = c.api.agents().await.unwrap();
    assert_eq!(
        agents.iter().find(|v| v.url == b.url).unwrap().status,
        AgentStatus::Idle
    );
}

/// Every request from an agent is contact: a result refreshes `lastSeen`
/// as a heartbeat does, though the original agent names no agent in it.
#[tokio::test]
async fn a_result_refreshes_last_seen() {
    let mut c = Cluster::new(1000, 5);
    let sha = c.commit_script("true");
    c.start_server();
    c.wait_server().await;
    let a = FakeAgent::start_original(&c.api).await;
    let registered = common::millis(&c.api.agents().await.unwrap()[0].last_seen);
    let id = c.api.create(&sha).await.id;
    let wire = dispatched(&a, 1).await;
    let clock = ci_core::SystemClock::new();
    let now = || ci_core::Clock::now(&clock).0;
    wait_until("the clock to move past the registration", LONG, || async {
        (now() > registered).then_some(())
    })
    .await;
    let sent = now();
    let result = json!({"id": wire, "status": 0, "stdout": "", "stderr": ""});
    let (status, body) = c.api.post("/notify_build_result", &result).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let seen = common::millis(&c.api.agents().await.unwrap()[0].last_seen);
    assert!(seen >= sent, "lastSeen {seen} is before the result ({sent})");
    assert_eq!(c.api.wait_finished(id, LONG).await.status, BuildStatus::Success);
}

/// The original agent has no `/cancel` (it answers 404). Canceling its
/// build cancels it at once and keeps the agent: busy until the canceled
/// attempt's result arrives (refused), or, with no result, for a lease;
/// then it takes builds again.
#[tokio::test]
async fn an_agent_that_cannot_cancel_is_kept_and_busy_until_its_work_ends() {
    let mut c = Cluster::new(300, 3);
    let sha = c.commit_script("true");
    c.start_server();
    c.wait_server().await;
    let a = FakeAgent::start_original(&c.api).await;
    let busy = |agents: &[ci_core::protocol::AgentView]| {
        agents
            .iter()
            .find(|v| v.url == a.url)
            .map(|v| v.status == AgentStatus::Busy)
    };

    // 1. Canceled; its late result ends it.
    let first = c.api.create(&sha).await.id;
    let wire = dispatched(&a, 1).await;
    let beating = heartbeats(&c, wire.clone());
    let (status, body) = c
        .api
        .post(&format!("/api/builds/{first}/cancel"), &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "canceled");
    let agents = c.api.agents().await.unwrap();
    assert_eq!(busy(&agents), Some(true), "kept, and still busy: {agents:?}");
    let second = c.api.create(&sha).await.id;
    assert_eq!(
        c.api.build(second).await.unwrap().status,
        BuildStatus::Queued,
        "nothing goes to an agent still running canceled work"
    );
    beating.abort();
    let late = json!({"id": wire, "status": 0, "stdout": "late", "stderr": ""});
    let (status, body) = c.api.post("/notify_build_result", &late).await.unwrap();
    assert_eq!(status, 409, "{body}");
    assert_eq!(c.api.build(first).await.unwrap().status, BuildStatus::Canceled);

    // 2. The agent took the next build once free; canceled again, it
    // sends nothing: free after a lease, and still registered.
    dispatched(&a, 2).await;
    let (status, _) = c
        .api
        .post(&format!("/api/builds/{second}/cancel"), &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200);
    wait_until("the agent to be free again", LONG, || async {
        (busy(&c.api.agents().await.unwrap()) == Some(false)).then_some(())
    })
    .await;
    let third = c.api.create(&sha).await.id;
    let wire = dispatched(&a, 3).await;
    let done = json!({"id": wire, "status": 0, "stdout": "ok", "stderr": ""});
    let (status, body) = c.api.post("/notify_build_result", &done).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        c.api.wait_finished(third, LONG).await.status,
        BuildStatus::Success
    );
}

/// An agent that ignores `timeoutMs`, as the original agent does, runs a
/// step past its time limit: the server ends the attempt itself (a lease
/// after the limit, the agent's own chance to report), as timed out with
/// exit code 124, refuses the agent's late success, and keeps the agent,
/// which cannot cancel, busy until that result arrives.
#[tokio::test]
async fn the_server_enforces_a_time_limit_its_agent_ignores() {
    let mut c = Cluster::new(200, 3);
    let sha = c.commit_script("true");
    c.start_server();
    c.wait_server().await;
    let a = FakeAgent::start_original(&c.api).await;
    let (status, body) = c
        .api
        .post(
            "/api/builds",
            &json!({"hash": sha, "command": "sleep 6", "timeoutMs": 1000}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let id = ci_core::BuildId(body["id"].as_i64().unwrap());
    let wire = dispatched(&a, 1).await;
    let beating = heartbeats(&c, wire.clone());
    let done = c.api.wait_finished(id, LONG).await;
    assert_eq!((done.status, done.exit_code), (BuildStatus::Failed, Some(124)));
    let ran = common::millis(done.finished_at.as_deref().unwrap())
        - common::millis(done.started_at.as_deref().unwrap());
    assert!((1000..6000).contains(&ran), "ended after {ran} ms");
    let log = c.api.log(id).await.unwrap();
    assert!(
        log["stderr"]
            .as_str()
            .unwrap()
            .contains("ran past its time limit of 1s"),
        "{log}"
    );
    let agents = c.api.agents().await.unwrap();
    assert_eq!(agents[0].status, AgentStatus::Busy, "it still runs the step");
    beating.abort();
    let late = json!({"id": wire, "status": 0, "stdout": "finished after all", "stderr": ""});
    let (status, body) = c.api.post("/notify_build_result", &late).await.unwrap();
    assert_eq!(status, 409, "{body}");
    let agents = c.api.agents().await.unwrap();
    assert_eq!(agents[0].status, AgentStatus::Idle, "kept, and free");
    assert_eq!(c.api.build(id).await.unwrap().exit_code, Some(124));
}

// === our agent with a server of the original design ===

/// What the fake original server saw.
#[derive(Default)]
struct Seen {
    /// `${host}:${port}` of each registration, as the original server forms it.
    agents: Vec<String>,
    /// Extension fields a registration carried (the original server
    /// ignores them, as express does).
    ignored: Vec<String>,
    /// Each result: `(id, status)`.
    results: Vec<(i64, i64)>,
    /// Anything outside the original protocol after registration.
    violations: Vec<String>,
}

/// A server of the original design on 127.0.0.1 (its port returned),
/// strict: it answers `200 text/plain OK`
/// to heartbeats and results, sends `timeout` as a string, and records any
/// field or endpoint outside the original protocol as a violation (and
/// answers it 400 or 404), as the Node.js server would choke on it.
async fn original_server() -> (u16, std::sync::Arc<std::sync::Mutex<Seen>>) {
    use warp::Filter;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let only = |body: &Value, allowed: &[&str]| -> Vec<String> {
        body.as_object()
            .map(|o| {
                o.keys()
                    .filter(|k| !allowed.contains(&k.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_else(|| vec![format!("not an object: {body}")])
    };
    let s = seen.clone();
    let register = warp::path!("notify_agent")
        .and(warp::post())
        .and(warp::body::json())
        .map(move |body: Value| {
            let mut seen = s.lock().unwrap();
            seen.ignored.extend(only(&body, &["host", "port"]));
            let host = body["host"].as_str().unwrap_or("undefined").to_owned();
            let port = match &body["port"] {
                Value::String(p) => p.clone(),
                p => p.to_string(),
            };
            seen.agents.push(format!("{host}:{port}"));
            let id = seen.agents.len();
            warp::reply::json(&json!({"id": id, "timeout": "300"}))
        });
    let s = seen.clone();
    let alive = warp::path!("notify_agent_alive")
        .and(warp::post())
        .and(warp::body::json())
        .map(move |body: Value| {
            let extra = only(&body, &["id"]);
            let mut seen = s.lock().unwrap();
            if body.get("id").is_none() {
                seen.violations.push(format!("a heartbeat without an id: {body}"));
            }
            seen.violations
                .extend(extra.into_iter().map(|k| format!("heartbeat field {k}")));
            "OK"
        });
    let s = seen.clone();
    let result = warp::path!("notify_build_result")
        .and(warp::post())
        .and(warp::body::json())
        .map(move |body: Value| {
            let extra = only(&body, &["id", "status", "stdout", "stderr"]);
            let mut seen = s.lock().unwrap();
            seen.violations
                .extend(extra.into_iter().map(|k| format!("result field {k}")));
            let (id, status) = (
                body["id"].as_i64().unwrap_or(-1),
                body["status"].as_i64().unwrap_or(-999),
            );
            seen.results.push((id, status));
            "OK"
        });
    let s = seen.clone();
    let other = warp::path::full()
        .and(warp::method())
        .map(move |path: warp::path::FullPath, method| {
            s.lock()
                .unwrap()
                .violations
                .push(format!("{method} {}", path.as_str()));
            warp::reply::with_status("Cannot POST", warp::http::StatusCode::NOT_FOUND)
        });
    let routes = register
        .map(warp::reply::Reply::into_response)
        .or(alive.map(warp::reply::Reply::into_response))
        .unify()
        .or(result.map(warp::reply::Reply::into_response))
        .unify()
        .or(other.map(warp::reply::Reply::into_response))
        .unify();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(routes).incoming(listener).run());
    (addr.port(), seen)
}

/// Our agent against a server of the original design: it registers (host
/// with its scheme), runs two builds the server posts (one failing),
/// heartbeats with `{"id"}` alone, and delivers each result once, taking
/// `200 OK` in plain text as the acknowledgement; it sends nothing the
/// original protocol does not have. With `protocol` `auto` it learns this
/// from the registration reply (the extension fields of its registration
/// are ignored, as the original server ignores them); with `original` it
/// sends none at all, not even in a result it kept from a run that spoke
/// with a server of ours.
async fn runs_builds_for_an_original_server(protocol: &str) {
    let dir = tempfile::tempdir().unwrap();
    let repo = ci_testkit::GitRepo::new();
    let pass = repo.commit(&[("build.sh", "sleep 1; echo fine")], "pass");
    let fail = repo.commit(&[("build.sh", "echo broken; exit 3")], "fail");
    let (port, seen) = original_server().await;
    let port = port.to_string();
    let work = dir.path().join("agent");
    let forced = protocol == "original";
    if forced {
        // A result kept from a run that spoke with a server of ours.
        std::fs::create_dir_all(work.join("spool")).unwrap();
        std::fs::write(
            work.join("spool/77-1.json"),
            r#"{"id":77,"status":0,"stdout":"kept","stderr":"","attempt":1,"agentId":5}"#,
        )
        .unwrap();
    }
    let _agent = ci_testkit::Proc::spawn(
        "ci-agent",
        &format!("agent-{protocol}"),
        &[],
        &[
            // The original server takes no connections: builds are posted.
            ("AGENT_MODE", "push"),
            ("SERVER_PORT", port.as_str()),
            ("AGENT_PORT", "0"),
            ("AGENT_HOST", "127.0.0.1"),
            ("WORK_DIR", work.to_str().unwrap()),
            ("RETRY_MAX_MS", "300"),
            ("PROTOCOL", protocol),
        ],
        dir.path(),
    );
    let agent = wait_until("the agent to register", LONG, || async {
        seen.lock().unwrap().agents.first().cloned()
    })
    .await;
    assert!(agent.starts_with("http://127.0.0.1:"), "{agent}");
    let http = reqwest::Client::new();
    for (id, sha) in [(1, &pass), (2, &fail)] {
        let build = json!({"id": id, "command": "sh build.sh", "hash": sha, "repo": repo.url()});
        wait_until("the agent to take the build", LONG, || async {
            let r = http
                .post(format!("{agent}/build"))
                .json(&build)
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        wait_until("its result", LONG, || async {
            seen.lock()
                .unwrap()
                .results
                .iter()
                .any(|(r, _)| *r == id)
                .then_some(())
        })
        .await;
    }
    let seen = seen.lock().unwrap();
    let kept: &[(i64, i64)] = if forced { &[(77, 0)] } else { &[] };
    assert_eq!(
        seen.results,
        [kept, &[(1, 0), (2, 3)]].concat(),
        "each result once"
    );
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    assert_eq!(seen.agents.len(), 1, "registered once");
    if forced {
        assert!(seen.ignored.is_empty(), "{:?}", seen.ignored);
    }
}

#[tokio::test]
async fn our_agent_speaks_only_the_original_protocol_when_told() {
    runs_builds_for_an_original_server("original").await;
}

#[tokio::test]
async fn our_agent_learns_the_server_speaks_only_the_original_protocol() {
    runs_builds_for_an_original_server("auto").await;
}
