//! The agent's OpenAPI document matches what it serves.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::sync::Arc;

use ci_agent::{Agent, AgentConfig, Checkouts, ShellRunner};
use serde_json::{json, Value};

#[tokio::test]
async fn every_documented_operation_answers_with_a_documented_status() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new("http://127.0.0.1:9", dir.path());
    config.agent_token = Some("agent-token-0123456789".into());
    let runner = ShellRunner::new(Checkouts::new(dir.path()).unwrap(), config.repo_schemes.clone());
    let agent = Agent::new(config, Arc::new(runner)).unwrap();
    let doc = ci_agent::openapi::spec();
    let paths = doc["paths"].as_object().unwrap();
    let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(documented, ci_agent::openapi::OPERATIONS.len());

    let cases = [
        ("GET", "/healthz", None, None),
        ("GET", "/openapi.json", None, None),
        (
            "POST",
            "/build",
            Some(json!({"id": 1, "command": "true", "hash": "abcd", "repo": "/r"})),
            None,
        ),
        (
            "POST",
            "/build",
            Some(json!({"id": 1, "command": "true", "hash": "-x", "repo": "/r"})),
            Some("Bearer agent-token-0123456789"),
        ),
        (
            "POST",
            "/build",
            Some(json!({"id": 1, "command": "true", "hash": "abcd", "repo": "ext::sh"})),
            Some("Bearer agent-token-0123456789"),
        ),
        (
            "POST",
            "/build",
            Some(json!({"id": "x"})),
            Some("Bearer agent-token-0123456789"),
        ),
    ];
    for (method, path, body, auth) in cases {
        let mut req = warp::test::request().method(method).path(path);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        if let Some(b) = &body {
            req = req.json(b);
        }
        let resp = req.reply(&agent.routes()).await;
        let status = resp.status().as_u16().to_string();
        let op = &doc["paths"][path][method.to_ascii_lowercase()];
        assert!(
            op["responses"][&status].is_object(),
            "{method} {path} answered {status}, undocumented"
        );
        let v: Value = serde_json::from_slice(resp.body()).unwrap();
        if status != "200" {
            assert!(v["error"].is_string(), "{v}");
        }
    }
}
