//! The server's routes through warp's test client: validation, status codes
//! and the JSON shape of every error. Real SQLite files, no sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::sync::Arc;

use ci_core::protocol::{BuildList, BuildView, ErrorBody, LogView, NotifyAgentReply};
use ci_core::{BuildStatus, RepoUrl};
use ci_server::{Server, ServerConfig};
use serde_json::{json, Value};
use warp::http::StatusCode;

struct Fixture {
    _dir: tempfile::TempDir,
    server: Server,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(RepoUrl::parse("/srv/repo").unwrap(), dir.path().join("ci.sqlite"));
    config.build_command = Some("make test".into());
    let server = Server::open(config).await.unwrap();
    Fixture { _dir: dir, server }
}

impl Fixture {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = warp::test::request()
            .method(method)
            .path(path)
            .remote_addr("127.0.0.9:4000".parse().unwrap());
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.reply(&self.server.routes()).await;
        let value = serde_json::from_slice(resp.body()).unwrap_or(Value::Null);
        (resp.status(), value)
    }

    async fn raw(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> (StatusCode, Value) {
        let resp = warp::test::request()
            .method(method)
            .path(path)
            .header("content-type", content_type)
            .header("content-length", body.len().to_string())
            .body(body)
            .reply(&self.server.routes())
            .await;
        let value = serde_json::from_slice(resp.body()).unwrap_or(Value::Null);
        (resp.status(), value)
    }
}

fn error_of(v: &Value) -> String {
    serde_json::from_value::<ErrorBody>(v.clone())
        .unwrap_or_else(|_| panic!("not a JSON error: {v}"))
        .error
}

#[tokio::test]
async fn create_get_and_list_builds() {
    let f = fixture().await;
    let (status, body) = f
        .call(
            "POST",
            "/api/builds",
            Some(json!({"hash": "a1b2c3d", "branch": "main"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let b: BuildView = serde_json::from_value(body).unwrap();
    assert_eq!(
        (b.status, b.command.as_str(), b.repo.as_str()),
        (BuildStatus::Queued, "make test", "/srv/repo")
    );
    assert_eq!(b.branch.as_deref(), Some("main"));

    // The original UI's endpoint and body.
    let (status, body) = f
        .call(
            "POST",
            "/build",
            Some(json!({"hash": "main", "command": "npm test"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["command"], "npm test");

    // An HTML form posts urlencoded, from a page of the same origin.
    let resp = warp::test::request()
        .method("POST")
        .path("/build")
        .header("host", "127.0.0.1:3000")
        .header("origin", "http://127.0.0.1:3000")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("hash=feedbeef&command=make+lint")
        .reply(&f.server.routes())
        .await;
    let body: Value = serde_json::from_slice(resp.body()).unwrap_or(Value::Null);
    assert_eq!(resp.status(), StatusCode::CREATED, "{body}");
    assert_eq!(body["command"], "make lint");

    let (status, body) = f.call("GET", &format!("/api/builds/{}", b.id), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["hash"], "a1b2c3d");
    assert_eq!(body["attempt"], 0);
    assert!(body["createdAt"].as_str().unwrap().ends_with('Z'));

    let (_, body) = f.call("GET", "/api/builds?limit=2", None).await;
    let list: BuildList = serde_json::from_value(body).unwrap();
    let ids: Vec<i64> = list.builds.iter().map(|b| b.id.0).collect();
    assert_eq!(ids, vec![3, 2], "newest first");
    let (_, body) = f.call("GET", "/api/builds?limit=2&offset=2", None).await;
    assert_eq!(body["builds"].as_array().unwrap().len(), 1);

    let (status, body) = f.call("GET", "/api/builds/1/log", None).await;
    assert_eq!(status, StatusCode::OK);
    let log: LogView = serde_json::from_value(body).unwrap();
    assert_eq!((log.stdout.as_str(), log.stderr.as_str()), ("", ""));
}

#[tokio::test]
async fn invalid_hashes_are_refused_and_never_stored() {
    let f = fixture().await;
    for hash in [
        "",
        "-rf",
        "--upload-pack=x",
        "a b",
        "main~1",
        "x..y",
        "ab\u{0}c",
        "é",
        &"a".repeat(300),
    ] {
        let (status, body) = f.call("POST", "/api/builds", Some(json!({ "hash": hash }))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{hash:?}: {body}");
        assert!(error_of(&body).contains("hash"), "{body}");
    }
    let (_, body) = f.call("GET", "/api/builds", None).await;
    assert_eq!(body["builds"], json!([]));
}

#[tokio::test]
async fn malformed_bodies_get_json_errors() {
    let f = fixture().await;
    let cases: &[(&str, &str, &[u8], StatusCode)] = &[
        (
            "/api/builds",
            "application/json",
            b"{not json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/builds",
            "application/json",
            b"{\"hash\": 5}",
            StatusCode::BAD_REQUEST,
        ),
        ("/api/builds", "application/json", b"[]", StatusCode::BAD_REQUEST),
        ("/api/builds", "application/json", b"{}", StatusCode::BAD_REQUEST),
        (
            "/notify_agent",
            "application/json",
            b"{\"host\":\"a\",\"port\":\"x\"}",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/notify_agent",
            "application/json",
            b"{\"host\":\"a b\",\"port\":1}",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/notify_build_result",
            "application/json",
            b"{\"id\":\"one\"}",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/notify_agent_alive",
            "application/json",
            b"{}",
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (path, ct, body, want) in cases {
        let (status, v) = f.raw("POST", path, ct, body).await;
        assert_eq!(status, *want, "{path} {}: {v}", String::from_utf8_lossy(body));
        assert!(!error_of(&v).is_empty());
    }
    let big = vec![b' '; ci_server::MAX_BODY as usize + 1];
    let (status, v) = f.raw("POST", "/api/builds", "application/json", &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    let long_command =
        json!({"hash": "abcd", "command": "x".repeat(ci_core::model::limits::MAX_COMMAND + 1)});
    let (status, v) = f.call("POST", "/api/builds", Some(long_command)).await;
    assert!(
        status == StatusCode::BAD_REQUEST || status == StatusCode::PAYLOAD_TOO_LARGE,
        "{status} {v}"
    );
    // Only an agent that connects may leave its port out.
    let (status, v) = f.call("POST", "/notify_agent", Some(json!({"host": "a"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"].as_str().unwrap().contains("port is required"), "{v}");
}

#[tokio::test]
async fn unknown_things_are_404_never_500() {
    let f = fixture().await;
    for path in [
        "/api/builds/999",
        "/api/builds/999/log",
        "/nope",
        "/api/builds/1/nope",
    ] {
        let (status, v) = f.call("GET", path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {v}");
        error_of(&v);
    }
    for path in [
        "/api/builds/abc",
        "/api/builds/-1",
        "/api/builds/0",
        "/api/builds/99999999999999999999",
    ] {
        let (status, v) = f.call("GET", path, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {v}");
    }
    let (status, _) = f
        .call("POST", "/notify_agent_alive", Some(json!({"id": 999})))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = f
        .call("POST", "/notify_agent_alive", Some(json!({"agentId": 999})))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = f
        .call(
            "POST",
            "/notify_build_result",
            Some(json!({"id": 999, "status": 0, "stdout": "", "stderr": ""})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, v) = f.call("DELETE", "/api/builds", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{v}");
    let resp = warp::test::request()
        .method("PUT")
        .path("/api/builds/7")
        .reply(&f.server.routes())
        .await;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers()["allow"], "GET");
    let resp = warp::test::request()
        .method("TRACE")
        .path("/api/builds")
        .reply(&f.server.routes())
        .await;
    assert_eq!(resp.headers()["allow"], "POST, GET");
}

#[tokio::test]
async fn the_original_agent_protocol() {
    let f = fixture().await;
    let (status, body) = f
        .call(
            "POST",
            "/notify_agent",
            Some(json!({"host": "http://agent-01", "port": "3001"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let reply: NotifyAgentReply = serde_json::from_value(body).unwrap();
    assert_eq!(reply.timeout, 1000);
    let (_, agents) = f.call("GET", "/api/agents", None).await;
    assert_eq!(agents[0]["url"], "http://agent-01:3001");
    assert_eq!(agents[0]["status"], "idle");

    // Without a host, the source address is used.
    let (status, _) = f.call("POST", "/notify_agent", Some(json!({"port": 4001}))).await;
    assert_eq!(status, StatusCode::OK);
    let (_, agents) = f.call("GET", "/api/agents", None).await;
    assert_eq!(agents[1]["url"], "http://127.0.0.9:4001");

    // Drive a build through the coordinator as the dispatcher would.
    f.call("POST", "/api/builds", Some(json!({"hash": "abcd"}))).await;
    let d = f.server.dispatcher().plan().await.unwrap().remove(0);
    // The wire names the step's attempt; the API, the build.
    let (id, build) = (d.request().id.0, d.step.build.0);
    assert_eq!(d.request().step_id, Some(d.step.id));
    let (status, _) = f
        .call("POST", "/notify_agent_alive", Some(json!({ "id": id })))
        .await;
    assert_eq!(status, StatusCode::OK);
    let result = json!({"id": id, "status": 0, "stdout": "ok\n", "stderr": ""});
    let (status, body) = f.call("POST", "/notify_build_result", Some(result.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = f.call("POST", "/notify_build_result", Some(result)).await;
    assert_eq!(status, StatusCode::OK, "an identical repeat is a no-op: {body}");
    assert_eq!(body["duplicate"], true);
    let conflicting = json!({"id": id, "status": 1, "stdout": "", "stderr": ""});
    let (status, _) = f.call("POST", "/notify_build_result", Some(conflicting)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (_, b) = f.call("GET", &format!("/api/builds/{build}"), None).await;
    assert_eq!(
        (b["status"].as_str(), b["exitCode"].as_i64()),
        (Some("success"), Some(0))
    );
    let (_, log) = f.call("GET", &format!("/api/builds/{build}/log"), None).await;
    assert_eq!(log["stdout"], "ok\n");
    let (status, _) = f
        .call("POST", "/notify_agent_alive", Some(json!({ "id": id })))
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a finished build takes no heartbeats"
    );
}

#[tokio::test]
async fn superseded_attempts_get_409() {
    let f = fixture().await;
    f.call("POST", "/notify_agent", Some(json!({"host": "a", "port": 1})))
        .await;
    f.call("POST", "/api/builds", Some(json!({"hash": "abcd"}))).await;
    let d1 = f.server.dispatcher().plan().await.unwrap().remove(0);
    let d1_id = d1.id;
    f.server
        .dispatcher()
        .dispatch_failed(d1, ci_core::DispatchFailure::Unreachable("gone".into()))
        .await
        .unwrap();
    f.call("POST", "/notify_agent", Some(json!({"host": "b", "port": 1})))
        .await;
    let d2 = f.server.dispatcher().plan().await.unwrap().remove(0);
    assert_eq!(d2.step.attempt.0, 2);
    // N.B.: the wire id names the attempt: attempt 1's agent speaks with
    // attempt 1's id, with or without saying the attempt.
    let (id1, id2) = (d1_id.0, d2.id.0);
    assert_ne!(id1, id2);
    for hb in [json!({"id": id1, "attempt": 1}), json!({"id": id1})] {
        let (status, _) = f.call("POST", "/notify_agent_alive", Some(hb)).await;
        assert_eq!(status, StatusCode::CONFLICT);
    }
    for late in [
        json!({"id": id1, "status": 0, "stdout": "", "stderr": "", "attempt": 1}),
        json!({"id": id1, "status": 0, "stdout": "", "stderr": ""}),
    ] {
        let (status, body) = f.call("POST", "/notify_build_result", Some(late)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert!(error_of(&body).contains("superseded"));
    }
    // An id and an attempt that disagree are refused.
    let mixed = json!({"id": id2, "status": 0, "stdout": "", "stderr": "", "attempt": 1});
    let (status, body) = f.call("POST", "/notify_build_result", Some(mixed)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(error_of(&body).contains("names attempt 2"), "{body}");
    let (_, b) = f
        .call("GET", &format!("/api/builds/{}", d2.step.build), None)
        .await;
    assert_eq!(b["status"], "running");
}

#[tokio::test]
async fn healthz() {
    let f = fixture().await;
    let (status, body) = f.call("GET", "/healthz", None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
}

#[test]
fn builds_without_a_command_need_a_default() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig::new(RepoUrl::parse("/srv/repo").unwrap(), dir.path().join("ci.sqlite"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(Server::with_store(config, Arc::new(ci_core::MemoryStore::new())))
        .unwrap();
    let resp = rt.block_on(
        warp::test::request()
            .method("POST")
            .path("/api/builds")
            .json(&json!({"hash": "abcd"}))
            .reply(&server.routes()),
    );
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(resp.body()).contains("BUILD_COMMAND"));
}

async fn guarded() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(RepoUrl::parse("/srv/repo").unwrap(), dir.path().join("ci.sqlite"));
    config.build_command = Some("make".into());
    config.agent_token = Some("agent-token-0123456789".into());
    config.api_token = Some("api-token-0123456789".into());
    Fixture {
        server: Server::open(config).await.unwrap(),
        _dir: dir,
    }
}

async fn call_as(f: &Fixture, path: &str, headers: &[(&str, &str)], body: Value) -> (StatusCode, Value) {
    let mut req = warp::test::request()
        .method(if body.is_null() { "GET" } else { "POST" })
        .path(path)
        .remote_addr("127.0.0.9:4000".parse().unwrap());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if !body.is_null() {
        req = req.json(&body);
    }
    let resp = req.reply(&f.server.routes()).await;
    (
        resp.status(),
        serde_json::from_slice(resp.body()).unwrap_or(Value::Null),
    )
}

const AGENT: (&str, &str) = ("authorization", "Bearer agent-token-0123456789");
const USER: (&str, &str) = ("authorization", "Bearer api-token-0123456789");

#[tokio::test]
async fn tokens_gate_the_agent_protocol_and_the_api() {
    let f = guarded().await;
    let register = json!({"host": "a", "port": 1});
    for headers in [&[][..], &[("authorization", "Bearer wrong")][..], &[USER][..]] {
        let (status, body) = call_as(&f, "/notify_agent", headers, register.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{headers:?}: {body}");
        assert!(error_of(&body).contains("AGENT_TOKEN"));
    }
    let (status, _) = call_as(&f, "/notify_agent", &[AGENT], register).await;
    assert_eq!(status, StatusCode::OK);

    for path in ["/api/builds", "/api/agents", "/api/builds/1", "/api/builds/1/log"] {
        let (status, body) = call_as(&f, path, &[AGENT], Value::Null).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
    }
    let (status, _) = call_as(&f, "/api/builds", &[], json!({"hash": "abcd"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call_as(&f, "/api/builds", &[USER], json!({"hash": "abcd"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = call_as(&f, "/api/agents", &[USER], Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call_as(&f, "/healthz", &[], Value::Null).await;
    assert_eq!(status, StatusCode::OK, "health checks need no token");
}

#[tokio::test]
async fn a_session_secret_proves_who_speaks_for_a_build() {
    let f = guarded().await;
    let (_, reply) = call_as(
        &f,
        "/notify_agent",
        &[AGENT],
        json!({"host": "a", "port": 1, "session": true}),
    )
    .await;
    let a_id = reply["id"].as_i64().unwrap();
    let a_secret = reply["secret"].as_str().unwrap().to_owned();
    assert_eq!(a_secret.len(), 32);
    let (_, reply) = call_as(
        &f,
        "/notify_agent",
        &[AGENT],
        json!({"host": "b", "port": 1, "session": true}),
    )
    .await;
    let b_id = reply["id"].as_i64().unwrap();
    let b_secret = reply["secret"].as_str().unwrap().to_owned();

    call_as(&f, "/api/builds", &[USER], json!({"hash": "abcd"})).await;
    let d = f.server.dispatcher().plan().await.unwrap();
    let held = d.iter().find(|d| d.agent.0 == a_id).map(|d| d.step.id.0);
    let (holder_id, holder_secret, other_id, other_secret) = match held {
        Some(_) => (a_id, a_secret, b_id, b_secret),
        None => (b_id, b_secret, a_id, a_secret),
    };
    let (step, build) = (d[0].id.0, d[0].step.build.0);
    let hb = |agent: i64| json!({"id": step, "attempt": 1, "agentId": agent});

    // Claiming the holder's id without its secret, or with another's.
    let (status, body) = call_as(&f, "/notify_agent_alive", &[AGENT], hb(holder_id)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let other = [AGENT, ("x-agent-secret", other_secret.as_str())];
    let (status, body) = call_as(&f, "/notify_agent_alive", &other, hb(holder_id)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = call_as(&f, "/notify_agent_alive", &other, hb(other_id)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let forged = json!({"id": step, "attempt": 1, "status": 0, "stdout": "forged", "stderr": ""});
    let (status, _) = call_as(&f, "/notify_build_result", &other, forged.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call_as(&f, "/notify_build_result", &[AGENT], forged).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "no identity at all is not enough either"
    );

    let mine = [AGENT, ("x-agent-secret", holder_secret.as_str())];
    let (status, body) = call_as(&f, "/notify_agent_alive", &mine, hb(holder_id)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let result = json!({"id": step, "attempt": 1, "status": 0, "stdout": "real", "stderr": ""});
    let (status, _) = call_as(&f, "/notify_build_result", &mine, result).await;
    assert_eq!(status, StatusCode::OK);
    let (_, log) = call_as(&f, &format!("/api/builds/{build}/log"), &[USER], Value::Null).await;
    assert_eq!(log["stdout"], "real");
}

#[tokio::test]
async fn a_missing_body_is_a_400() {
    let f = fixture().await;
    let resp = warp::test::request()
        .method("POST")
        .path("/build")
        .header("content-type", "application/x-www-form-urlencoded")
        .reply(&f.server.routes())
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(resp.body()).contains("body"));
}

async fn resolving(repo: &str, dir: &tempfile::TempDir) -> Server {
    let mut config = ServerConfig::new(RepoUrl::parse(repo).unwrap(), dir.path().join("ci.sqlite"));
    config.build_command = Some("make test".into());
    config.git_cache = Some(dir.path().join("git"));
    Server::open(config).await.unwrap()
}

async fn post(server: &Server, path: &str, body: Value) -> (StatusCode, Value) {
    let resp = warp::test::request()
        .method("POST")
        .path(path)
        .remote_addr("127.0.0.9:4000".parse().unwrap())
        .json(&body)
        .reply(&server.routes())
        .await;
    (
        resp.status(),
        serde_json::from_slice(resp.body()).unwrap_or(Value::Null),
    )
}

/// A build is of a full SHA: a branch, a tag or a short SHA is resolved
/// when the build is created (a branch is kept as the build's branch), so
/// a rebuild builds the same commit after the branch moved on. A ref the
/// repository does not have is refused with a message; a repository the
/// server cannot reach leaves the ref to the agent, as before.
#[tokio::test]
async fn refs_are_resolved_to_full_shas_when_a_build_is_created() {
    let repo = ci_testkit::GitRepo::new();
    let first = repo.commit(&[("a", "1")], "first");
    repo.git(&["tag", "v1"]);
    let dir = tempfile::tempdir().unwrap();
    let server = resolving(&repo.url(), &dir).await;

    let (status, main) = post(&server, "/api/builds", json!({ "hash": "main" })).await;
    assert_eq!(status, StatusCode::CREATED, "{main}");
    assert_eq!(
        (main["hash"].as_str(), main["branch"].as_str()),
        (Some(first.as_str()), Some("main"))
    );
    let (_, tag) = post(&server, "/api/builds", json!({ "hash": "v1" })).await;
    assert_eq!(
        (tag["hash"].as_str(), tag["branch"].as_str()),
        (Some(first.as_str()), None)
    );
    let (_, short) = post(&server, "/api/builds", json!({ "hash": &first[..7] })).await;
    assert_eq!(short["hash"].as_str(), Some(first.as_str()));
    let (_, given) = post(
        &server,
        "/api/builds",
        json!({ "hash": "main", "branch": "release" }),
    )
    .await;
    assert_eq!(given["branch"].as_str(), Some("release"), "a given branch wins");

    let second = repo.commit(&[("a", "2")], "second");
    let (_, moved) = post(&server, "/api/builds", json!({ "hash": "main" })).await;
    assert_eq!(
        moved["hash"].as_str(),
        Some(second.as_str()),
        "the branch moved: fetched again"
    );
    let id = main["id"].as_i64().unwrap();
    let (status, again) = post(&server, &format!("/api/builds/{id}/rebuild"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    assert_eq!(
        again["hash"].as_str(),
        Some(first.as_str()),
        "a rebuild builds what was built"
    );

    let (status, missing) = post(&server, "/api/builds", json!({ "hash": "no-such-branch" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{missing}");
    assert!(
        error_of(&missing).contains("no-such-branch not found"),
        "{missing}"
    );

    let elsewhere = tempfile::tempdir().unwrap();
    let unreachable = resolving("/nonexistent/repo", &elsewhere).await;
    let (status, kept) = post(&unreachable, "/api/builds", json!({ "hash": "main" })).await;
    assert_eq!(status, StatusCode::CREATED, "{kept}");
    assert_eq!(kept["hash"].as_str(), Some("main"));
}
