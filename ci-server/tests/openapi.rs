//! The OpenAPI document is kept in sync with the routes: the same
//! operations, each one routed, every status seen documented, and real
//! responses valid against their schemas.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::collections::BTreeSet;

use ci_core::RepoUrl;
use ci_server::openapi::{spec, OPERATIONS};
use ci_server::{Server, ServerConfig};
use serde_json::{json, Value};

async fn server(dir: &tempfile::TempDir) -> Server {
    let mut config = ServerConfig::new(RepoUrl::parse("/srv/repo").unwrap(), dir.path().join("ci.sqlite"));
    config.build_command = Some("make".into());
    Server::open(config).await.unwrap()
}

/// Resolves `{"$ref": "#/components/schemas/X"}`.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            resolve(doc, &doc["components"]["schemas"][name])
        }
        None => schema,
    }
}

/// Validates `v` against the JSON Schema subset the document uses.
fn validate(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
        let n = options.iter().filter(|s| validate(doc, s, v, at).is_ok()).count();
        return if n == 1 {
            Ok(())
        } else {
            Err(format!("{at}: {v} matches {n} of oneOf"))
        };
    }
    if let Some(c) = schema.get("const") {
        return if c == v {
            Ok(())
        } else {
            Err(format!("{at}: {v} is not {c}"))
        };
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{at}: {v} not in {e:?}"));
        }
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let actual = match v {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        if !types
            .iter()
            .any(|t| *t == actual || (*t == "number" && actual == "integer"))
        {
            return Err(format!("{at}: {v} is {actual}, not {types:?}"));
        }
    }
    if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if n < min {
            return Err(format!("{at}: {n} < {min}"));
        }
    }
    if let Value::Object(o) = v {
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = r.as_str().unwrap();
            if !o.contains_key(key) {
                return Err(format!("{at}: missing {key}"));
            }
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, s) in props {
                if let Some(val) = o.get(k) {
                    validate(doc, s, val, &format!("{at}.{k}"))?;
                }
            }
        }
    }
    if let (Value::Array(items), Some(s)) = (v, schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            validate(doc, s, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.insert((method.clone(), path.clone()));
        }
    }
    ops
}

#[test]
fn the_document_lists_exactly_the_operations_served() {
    let doc = spec();
    let listed: BTreeSet<(String, String)> = OPERATIONS
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(operations(&doc), listed);
}

/// Calls an operation and checks the status is documented and the body
/// valid against the documented schema.
async fn check_call(
    server: &Server,
    doc: &Value,
    method: &str,
    path: &str,
    template: &str,
    body: Option<Value>,
) -> Value {
    let mut req = warp::test::request()
        .method(method)
        .path(path)
        .remote_addr("127.0.0.1:5000".parse().unwrap());
    if let Some(b) = &body {
        req = req.json(b);
    }
    let resp = req.reply(&server.routes()).await;
    let status = resp.status().as_u16().to_string();
    let v: Value =
        serde_json::from_slice(resp.body()).unwrap_or_else(|_| panic!("{method} {path}: not JSON"));
    let op = &doc["paths"][template][method.to_ascii_lowercase()];
    let documented = &op["responses"][&status];
    assert!(
        documented.is_object(),
        "{method} {path} answered {status}, which is not documented: {v}"
    );
    let schema = &documented["content"]["application/json"]["schema"];
    validate(doc, schema, &v, &format!("{method} {path} {status}")).unwrap_or_else(|e| panic!("{e}"));
    v
}

#[tokio::test]
async fn every_operation_is_routed_and_answers_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir).await;
    let doc = spec();

    // Happy paths, in an order that makes each one meaningful.
    let reg = check_call(
        &server,
        &doc,
        "POST",
        "/notify_agent",
        "/notify_agent",
        Some(json!({"host": "a", "port": "3001", "session": true})),
    )
    .await;
    let agent = reg["id"].as_i64().unwrap();
    let secret = reg["secret"].as_str().unwrap().to_owned();
    let b = check_call(
        &server,
        &doc,
        "POST",
        "/api/builds",
        "/api/builds",
        Some(json!({"hash": "abcd", "branch": "main"})),
    )
    .await;
    let id = b["id"].as_i64().unwrap();
    // N.B.: agents are sent the step's attempt's id, the API shows the
    // build's.
    let step = b["steps"][0]["id"].as_i64().unwrap();
    let step = ci_core::DispatchId::new(ci_core::StepId(step), ci_core::Attempt(1))
        .unwrap()
        .0;
    check_call(
        &server,
        &doc,
        "POST",
        "/build",
        "/build",
        Some(json!({"hash": "main", "command": "true"})),
    )
    .await;
    check_call(&server, &doc, "GET", "/api/builds?limit=10", "/api/builds", None).await;
    check_call(
        &server,
        &doc,
        "GET",
        &format!("/api/builds/{id}"),
        "/api/builds/{id}",
        None,
    )
    .await;
    check_call(
        &server,
        &doc,
        "GET",
        &format!("/api/builds/{id}/log"),
        "/api/builds/{id}/log",
        None,
    )
    .await;
    check_call(&server, &doc, "GET", "/api/agents", "/api/agents", None).await;
    check_call(&server, &doc, "GET", "/healthz", "/healthz", None).await;
    check_call(
        &server,
        &doc,
        "GET",
        "/api/openapi.json",
        "/api/openapi.json",
        None,
    )
    .await;
    server.dispatcher().plan().await.unwrap();
    let agents = check_call(&server, &doc, "GET", "/api/agents", "/api/agents", None).await;
    assert_eq!(agents[0]["status"], "busy");
    let hb = warp::test::request()
        .method("POST")
        .path("/notify_agent_alive")
        .header("x-agent-secret", &secret)
        .json(&json!({"id": step, "attempt": 1, "agentId": agent}))
        .reply(&server.routes())
        .await;
    assert_eq!(hb.status(), 200);
    let result = warp::test::request()
        .method("POST")
        .path("/notify_build_result")
        .header("x-agent-secret", &secret)
        .json(&json!({"id": step, "attempt": 1, "agentId": agent, "status": 0, "stdout": "o", "stderr": ""}))
        .reply(&server.routes())
        .await;
    assert_eq!(result.status(), 200);
    let done = check_call(
        &server,
        &doc,
        "GET",
        &format!("/api/builds/{id}"),
        "/api/builds/{id}",
        None,
    )
    .await;
    assert_eq!(done["status"], "success");
    check_call(
        &server,
        &doc,
        "GET",
        &format!("/api/builds/{id}/steps/build/log"),
        "/api/builds/{id}/steps/{step}/log",
        None,
    )
    .await;
    check_call(
        &server,
        &doc,
        "GET",
        &format!("/api/builds/{id}/steps/nope/log"),
        "/api/builds/{id}/steps/{step}/log",
        None,
    )
    .await;
    check_call(
        &server,
        &doc,
        "POST",
        &format!("/api/builds/{id}/retry"),
        "/api/builds/{id}/retry",
        None,
    )
    .await;
    check_call(
        &server,
        &doc,
        "POST",
        &format!("/api/builds/{id}/retry"),
        "/api/builds/{id}/retry",
        None,
    )
    .await;

    // Error paths: each answer documented, each body an Error.
    check_call(&server, &doc, "GET", "/api/builds/999", "/api/builds/{id}", None).await;
    check_call(&server, &doc, "GET", "/api/builds/abc", "/api/builds/{id}", None).await;
    check_call(
        &server,
        &doc,
        "GET",
        "/api/builds/999/log",
        "/api/builds/{id}/log",
        None,
    )
    .await;
    check_call(
        &server,
        &doc,
        "GET",
        &format!("/api/builds/{id}/log?attempt=9"),
        "/api/builds/{id}/log",
        None,
    )
    .await;
    check_call(&server, &doc, "GET", "/api/builds?limit=0", "/api/builds", None).await;
    check_call(
        &server,
        &doc,
        "POST",
        "/api/builds",
        "/api/builds",
        Some(json!({"hash": "../x"})),
    )
    .await;
    check_call(
        &server,
        &doc,
        "POST",
        "/build",
        "/build",
        Some(json!({"hash": 7})),
    )
    .await;
    check_call(
        &server,
        &doc,
        "POST",
        "/notify_agent",
        "/notify_agent",
        Some(json!({"port": 0})),
    )
    .await;
    check_call(
        &server,
        &doc,
        "POST",
        "/notify_agent_alive",
        "/notify_agent_alive",
        Some(json!({"id": 999})),
    )
    .await;
    check_call(
        &server,
        &doc,
        "POST",
        "/notify_agent_alive",
        "/notify_agent_alive",
        Some(json!({"id": id, "attempt": 1})),
    )
    .await;
    check_call(
        &server,
        &doc,
        "POST",
        "/notify_build_result",
        "/notify_build_result",
        Some(json!({"id": 999, "status": 0})),
    )
    .await;
    check_call(
        &server,
        &doc,
        "POST",
        "/notify_build_result",
        "/notify_build_result",
        Some(json!({"id": id, "status": 5, "attempt": 1})),
    )
    .await;
}
