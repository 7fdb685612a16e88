//! Commit statuses: a real server and agent build commits of projects
//! whose forge is a local HTTP server that checks each request against
//! the forge's documented API (path, auth header, body), and fails the
//! first ones as a forge that is down would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ci_core::BuildStatus;
use common::{wait_until, Cluster};
use serde_json::{json, Value};
use warp::Filter;

const LONG: Duration = Duration::from_secs(30);

/// One status request as the forge saw it.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    auth: Option<String>,
    body: Value,
}

/// A forge answering 503 to its first `down` requests, then 201.
async fn forge(down: usize) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    let route = warp::post()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::body::json())
        .map(
            move |path: warp::path::FullPath, h: warp::http::HeaderMap, body: Value| {
                let auth = ["authorization", "private-token"].iter().find_map(|k| {
                    h.get(*k)
                        .and_then(|v| v.to_str().ok())
                        .map(|v| format!("{k}: {v}"))
                });
                let mut seen = log.lock().unwrap();
                seen.push(Seen {
                    path: path.as_str().to_owned(),
                    auth,
                    body,
                });
                let status = if seen.len() <= down {
                    warp::http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    warp::http::StatusCode::CREATED
                };
                warp::reply::with_status(warp::reply::json(&json!({})), status)
            },
        );
    let (addr, _served) = common::serve(route).await;
    (format!("http://{addr}"), seen)
}

/// Statuses of each build reach GitHub, Gitea and GitLab in their own
/// shapes, with a link to the build and a context naming the project;
/// a forge that fails at first gets them later, the build never waits
/// for it, and the last status a forge gets is the build's last state.
#[tokio::test]
async fn statuses_reach_each_forge_in_its_shape_and_the_latest_wins() {
    let mut c = Cluster::new(500, 5);
    let sha = c.repo.commit(&[("build.sh", "echo built\n")], "statuses");
    let (url, seen) = forge(3).await;
    let public = format!("http://127.0.0.1:{}", c.port);
    c.server_env = vec![("PUBLIC_URL".into(), public.clone())];
    c.start_server();
    c.wait_server().await;
    let kinds = [
        ("gh", "github", "acme/web", "ghp_token1"),
        ("tea", "gitea", "acme/web", "tea_token2"),
        ("lab", "gitlab", "acme/web", "glpat_token3"),
    ];
    for (name, kind, repo, token) in kinds {
        let (status, body) = c
            .api
            .post(
                "/api/projects",
                &json!({"name": name, "repo": c.repo.url(), "pollInterval": 0,
                        "forge": {"kind": kind, "url": url, "repo": repo, "token": token}}),
            )
            .await
            .unwrap();
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["forge"]["token"], true, "{body}");
        assert!(!body.to_string().contains(token));
    }
    c.start_agent("a");
    c.wait_agents(1).await;
    let mut ids = Vec::new();
    for (name, ..) in kinds {
        let (status, b) = c
            .api
            .post(&format!("/api/projects/{name}/builds"), &json!({"hash": sha}))
            .await
            .unwrap();
        assert_eq!(status, 201, "{b}");
        let id = ci_core::BuildId(b["id"].as_i64().unwrap());
        // The forge is down at first: the build does not wait for it.
        assert_eq!(c.api.wait_finished(id, LONG).await.status, BuildStatus::Success);
        ids.push(id);
    }
    let finals = wait_until("every forge to have its final status", LONG, || async {
        let seen = seen.lock().unwrap().clone();
        // N.B.: exact paths: Gitea's holds GitHub's.
        let last = |path: &str| seen.iter().rev().find(|s| s.path == path).cloned();
        let all = [
            last(&format!("/repos/acme/web/statuses/{sha}")),
            last(&format!("/api/v1/repos/acme/web/statuses/{sha}")),
            last(&format!("/api/v4/projects/acme%2Fweb/statuses/{sha}")),
        ];
        let done = all
            .iter()
            .all(|s| s.as_ref().is_some_and(|s| s.body["state"] == "success"));
        done.then(|| all.map(Option::unwrap))
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    // GitHub: Bearer, state/target_url/description/context.
    let gh: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.path == format!("/repos/acme/web/statuses/{sha}"))
        .collect();
    assert!(
        gh.iter()
            .all(|s| s.auth.as_deref() == Some("authorization: Bearer ghp_token1")),
        "{gh:?}"
    );
    assert_eq!(finals[0].body["context"], "ci/gh");
    assert_eq!(
        finals[0].body["target_url"],
        format!("{public}/builds/{}", ids[0])
    );
    assert!(finals[0].body["description"]
        .as_str()
        .unwrap()
        .starts_with("gh#1"));
    // Gitea: `token` auth under /api/v1.
    assert_eq!(finals[1].auth.as_deref(), Some("authorization: token tea_token2"));
    assert_eq!(finals[1].body["context"], "ci/tea");
    // GitLab: PRIVATE-TOKEN, the project path encoded, `name`.
    assert_eq!(finals[2].auth.as_deref(), Some("private-token: glpat_token3"));
    assert_eq!(finals[2].body["name"], "ci/lab");
    assert_eq!(
        finals[2].body["target_url"],
        format!("{public}/builds/{}", ids[2])
    );
    // Every state is one the forge documents; nothing after the final one.
    for s in &seen {
        let state = s.body["state"].as_str().unwrap();
        assert!(["pending", "running", "success"].contains(&state), "{s:?}");
    }
    for needle in ["/repos/acme/web/", "/api/v1/", "/api/v4/"] {
        let of: Vec<&Seen> = seen.iter().filter(|s| s.path.starts_with(needle)).collect();
        let first_success = of.iter().position(|s| s.body["state"] == "success").unwrap();
        assert!(
            of[first_success..].iter().all(|s| s.body["state"] == "success"),
            "{needle}: a stale state after the final one: {of:?}"
        );
    }
}
