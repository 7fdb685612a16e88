//! Projects, webhooks and polling: the project API through warp's test
//! client on real SQLite files; webhooks with the forges' documented
//! payloads and signatures; polling against a real git server
//! (`git daemon`) with the server on a real socket.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::time::Duration;

use ci_core::RepoUrl;
use ci_server::{Server, ServerConfig};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use warp::http::StatusCode;

struct Fixture {
    dir: tempfile::TempDir,
    server: Server,
}

async fn fixture(repo: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(RepoUrl::parse(repo).unwrap(), dir.path().join("ci.sqlite"));
    config.build_command = Some("make test".into());
    config.git_cache = Some(dir.path().join("git"));
    let server = Server::open(config).await.unwrap();
    Fixture { dir, server }
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

    async fn hook(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (StatusCode, Value) {
        let mut req = warp::test::request()
            .method("POST")
            .path(path)
            .header("content-type", "application/json")
            .header("content-length", body.len().to_string())
            .remote_addr("127.0.0.9:4000".parse().unwrap());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.body(body).reply(&self.server.routes()).await;
        let text = String::from_utf8_lossy(resp.body()).into_owned();
        (
            resp.status(),
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn builds(&self, project: &str) -> Vec<Value> {
        let (s, v) = self
            .call("GET", &format!("/api/projects/{project}/builds"), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["builds"].as_array().unwrap().clone()
    }
}

/// Every byte the server wrote to its database, for "never stored".
fn database_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() && p.to_string_lossy().contains("ci.sqlite") {
            all.extend(std::fs::read(p).unwrap());
        }
    }
    all
}

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Projects are made, listed, shown, changed and deleted; each numbers
/// its own builds; bad input is a 4xx with a message; the default project
/// is the server's REPO and stays.
#[tokio::test]
async fn projects_are_managed_and_number_their_builds() {
    let repo = ci_testkit::GitRepo::new();
    let sha = repo.commit(&[("a", "1")], "first\n\nbody");
    let other = ci_testkit::GitRepo::new();
    let other_sha = other.commit(&[("b", "1")], "other");
    let f = fixture(&repo.url()).await;

    let (s, v) = f
        .call(
            "POST",
            "/api/projects",
            Some(json!({"name": "web", "repo": other.url(), "pollInterval": 0, "webhookSecret": "s3cret-hook"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["name"], "web");
    assert_eq!(v["webhookSecret"], true, "shown as set, never as its value");
    assert_eq!(v["defaultBranch"], "main");

    for (body, want) in [
        (json!({"name": "web", "repo": other.url()}), StatusCode::CONFLICT),
        (
            json!({"name": "a/b", "repo": other.url()}),
            StatusCode::BAD_REQUEST,
        ),
        (json!({"name": "x"}), StatusCode::BAD_REQUEST),
        (
            json!({"name": "x", "repo": "ext::sh -c id"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"name": "x", "repo": other.url(), "pollInterval": 100000000}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"name": "x", "repo": other.url(), "unknown": 1}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"name": "x", "repo": other.url(), "forge": {"kind": "github", "url": "ftp://x", "repo": "a/b"}}),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (s, v) = f.call("POST", "/api/projects", Some(body.clone())).await;
        assert_eq!(s, want, "{body} -> {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }

    // Builds of each project are numbered apart, with where they came from.
    let (s, a) = f
        .call("POST", "/api/projects/web/builds", Some(json!({"hash": "main"})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    assert_eq!(
        (a["project"].as_str(), a["number"].as_u64()),
        (Some("web"), Some(1))
    );
    assert_eq!(a["hash"], other_sha.as_str());
    assert_eq!(a["subject"], "other");
    assert_eq!(a["author"], "ci <ci@localhost>");
    assert_eq!(a["event"], "api");
    let (_, b) = f.call("POST", "/api/builds", Some(json!({"hash": "main"}))).await;
    assert_eq!(
        (b["project"].as_str(), b["number"].as_u64()),
        (Some("default"), Some(1))
    );
    assert_eq!(b["hash"], sha.as_str());
    assert_eq!(b["subject"], "first");
    let (_, c) = f
        .call(
            "POST",
            "/api/builds",
            Some(json!({"hash": "main", "project": "web", "event": "manual"})),
        )
        .await;
    assert_eq!(
        (c["number"].as_u64(), c["event"].as_str()),
        (Some(2), Some("manual"))
    );
    let (s, v) = f
        .call(
            "POST",
            "/api/builds",
            Some(json!({"hash": "main", "project": "nope"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = f.call("GET", "/api/projects/web/builds/2", None).await;
    assert_eq!((s, v["id"].clone()), (StatusCode::OK, c["id"].clone()));
    assert_eq!(
        f.call("GET", "/api/projects/web/builds/9", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(f.builds("web").await.len(), 2);
    let (_, all) = f
        .call(
            "GET",
            "/api/builds?project=web&branch=main&status=queued,running",
            None,
        )
        .await;
    assert_eq!(all["builds"].as_array().unwrap().len(), 2, "{all}");
    let (_, none) = f
        .call("GET", "/api/builds?project=web&status=success", None)
        .await;
    assert!(none["builds"].as_array().unwrap().is_empty());
    assert_eq!(
        f.call("GET", "/api/builds?status=bogus", None).await.0,
        StatusCode::BAD_REQUEST
    );

    // Shown with each branch's latest build; listed by name.
    let (_, shown) = f.call("GET", "/api/projects/web", None).await;
    assert_eq!(shown["lastBuilds"][0]["branch"], "main");
    assert_eq!(shown["lastBuilds"][0]["number"], 2);
    let (_, list) = f.call("GET", "/api/projects", None).await;
    let names: Vec<&str> = list["projects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "web"]);
    assert_eq!(
        list["projects"][0]["repo"],
        repo.url().as_str(),
        "the default project is REPO"
    );

    // Changed in part; renaming and the default's repository are refused.
    let (s, v) = f
        .call(
            "PATCH",
            "/api/projects/web",
            Some(json!({"branches": ["main", "release/*"], "cancelPrevious": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["branches"][1].as_str(), v["cancelPrevious"].as_bool()),
        (Some("release/*"), Some(true))
    );
    assert_eq!(v["pollInterval"], 0, "untouched");
    assert_eq!(
        f.call("PATCH", "/api/projects/web", Some(json!({"name": "api"})))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        f.call(
            "PATCH",
            "/api/projects/default",
            Some(json!({"repo": other.url()}))
        )
        .await
        .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        f.call("PATCH", "/api/projects/nope", Some(json!({}))).await.0,
        StatusCode::NOT_FOUND
    );

    // Deleted once its builds are done; the default project never.
    assert_eq!(
        f.call("DELETE", "/api/projects/web", None).await.0,
        StatusCode::CONFLICT
    );
    for id in [&a["id"], &c["id"]] {
        assert_eq!(
            f.call("POST", &format!("/api/builds/{id}/cancel"), None).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(
        f.call("DELETE", "/api/projects/web", None).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        f.call("GET", "/api/projects/web", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        f.call("DELETE", "/api/projects/default", None).await.0,
        StatusCode::CONFLICT
    );
}

/// Secret values go in and never come out: not in the API, not in the
/// database file (sealed with a key kept beside it, 0600).
#[tokio::test]
async fn secrets_are_write_only_and_sealed() {
    let f = fixture("/srv/repo").await;
    f.call(
        "POST",
        "/api/projects",
        Some(json!({"name": "web", "repo": "/srv/web", "pollInterval": 0})),
    )
    .await;
    let value = "correct-horse-battery-staple";
    let (s, v) = f
        .call(
            "POST",
            "/api/projects/web/secrets",
            Some(json!({"name": "DEPLOY_KEY", "value": value})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(!v.to_string().contains(value));
    for bad in [
        json!({"name": "CI_X", "value": "v"}),
        json!({"name": "1A", "value": "v"}),
        json!({"name": "A", "value": ""}),
    ] {
        assert_eq!(
            f.call("POST", "/api/projects/web/secrets", Some(bad)).await.0,
            StatusCode::BAD_REQUEST
        );
    }
    let (_, list) = f.call("GET", "/api/projects/web/secrets", None).await;
    assert_eq!(list["secrets"].as_array().unwrap().len(), 1);
    assert_eq!(list["secrets"][0]["name"], "DEPLOY_KEY");
    for path in [
        "/api/projects/web",
        "/api/projects",
        "/api/projects/web/secrets",
        "/metrics",
    ] {
        let resp = warp::test::request().path(path).reply(&f.server.routes()).await;
        assert!(!String::from_utf8_lossy(resp.body()).contains(value), "{path}");
    }
    assert!(!database_bytes(f.dir.path())
        .windows(value.len())
        .any(|w| w == value.as_bytes()));
    let key = f.dir.path().join("ci.sqlite.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        f.call("DELETE", "/api/projects/web/secrets/DEPLOY_KEY", None)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        f.call("DELETE", "/api/projects/web/secrets/DEPLOY_KEY", None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

fn github_push(repo_url: &str, sha: &str, branch: &str, message: &str) -> Value {
    // The shape GitHub documents for the `push` event (trimmed).
    json!({
        "ref": format!("refs/heads/{branch}"),
        "before": "0000000000000000000000000000000000000000",
        "after": sha,
        "created": true,
        "deleted": false,
        "forced": false,
        "repository": {"id": 1, "full_name": "acme/web", "clone_url": repo_url, "html_url": "https://github.com/acme/web"},
        "pusher": {"name": "ada", "email": "ada@example.com"},
        "head_commit": {"id": sha, "message": message, "author": {"name": "Ada", "email": "ada@example.com"}},
        "commits": [{"id": sha, "message": message}]
    })
}

/// Webhooks from GitHub, Gitea and GitLab start builds of exactly the
/// commit pushed; a bad or missing signature is a 401 and stores
/// nothing; a redelivery starts nothing; `[skip ci]`, branch filters and
/// events that bring no code start nothing; a fork's pull request is
/// untrusted.
#[tokio::test]
async fn webhooks_are_verified_and_start_builds() {
    let repo = ci_testkit::GitRepo::new();
    let sha = repo.commit(&[("a", "1")], "add a");
    let f = fixture("/srv/repo").await;
    let secret = "hook-secret-123";
    let (s, v) = f
        .call(
            "POST",
            "/api/projects",
            Some(json!({"name": "web", "repo": repo.url(), "pollInterval": 0, "webhookSecret": secret, "branches": ["main", "release/**"]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    let body = serde_json::to_vec(&github_push(&repo.url(), &sha, "main", "add a")).unwrap();
    let sig = format!("sha256={}", sign(secret, &body));
    let gh = |delivery: &'static str, sig: String| {
        vec![
            ("x-github-event", "push".to_owned()),
            ("x-github-delivery", delivery.to_owned()),
            ("x-hub-signature-256", sig),
        ]
    };
    fn as_refs<'a>(h: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
        h.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    // Bad and missing signatures: 401, nothing stored.
    let wrong = format!("sha256={}", sign("other", &body));
    for headers in [
        gh("d-1", wrong),
        gh("d-1", "sha256=zz".into()),
        gh("d-1", String::new())[..2].to_vec(),
    ] {
        let (s, v) = f.hook("/hooks/github", &as_refs(&headers), &body).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    }
    // A body changed after signing.
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    let (s, _) = f
        .hook("/hooks/github", &as_refs(&gh("d-1", sig.clone())), &tampered)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(f.builds("web").await.is_empty());

    // Signed: one build of that commit, by push, with its message.
    let (s, v) = f
        .hook("/hooks/github", &as_refs(&gh("d-1", sig.clone())), &body)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let builds = f.builds("web").await;
    assert_eq!(builds.len(), 1);
    assert_eq!(
        (
            builds[0]["hash"].as_str(),
            builds[0]["branch"].as_str(),
            builds[0]["event"].as_str()
        ),
        (Some(sha.as_str()), Some("main"), Some("push"))
    );
    assert_eq!(
        (builds[0]["subject"].as_str(), builds[0]["author"].as_str()),
        (Some("add a"), Some("Ada <ada@example.com>"))
    );
    // Redelivered: nothing new.
    let (s, v) = f
        .hook("/hooks/github", &as_refs(&gh("d-1", sig.clone())), &body)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["skipped"].is_string());
    assert_eq!(f.builds("web").await.len(), 1);

    // [skip ci], and a branch the project does not build.
    let skip_sha = repo.commit(&[("a", "2")], "docs [skip ci]");
    for (sha, branch, message) in [
        (&skip_sha, "main", "docs [skip ci]"),
        (&sha, "feature/x", "add a"),
    ] {
        let body = serde_json::to_vec(&github_push(&repo.url(), sha, branch, message)).unwrap();
        let headers = gh("d-2", format!("sha256={}", sign(secret, &body)));
        let (s, v) = f.hook("/hooks/github", &as_refs(&headers), &body).await;
        assert_eq!((s, v["build"].is_null()), (StatusCode::OK, true), "{v}");
    }
    assert_eq!(f.builds("web").await.len(), 1);

    // Gitea: a pull request from a fork, signed in X-Gitea-Signature.
    let pr_sha = repo.commit(&[("b", "1")], "feature");
    let pr = json!({
        "action": "opened",
        "number": 7,
        "pull_request": {
            "id": 70, "number": 7, "title": "Add b", "user": {"login": "mallory"},
            "head": {"ref": "feature", "sha": pr_sha, "repo": {"full_name": "mallory/web"}},
            "base": {"ref": "main", "sha": sha, "repo": {"full_name": "acme/web"}}
        },
        "repository": {"full_name": "acme/web", "clone_url": format!("{}.git", repo.url())}
    });
    let body = serde_json::to_vec(&pr).unwrap();
    let sig = sign(secret, &body);
    let headers = [
        ("x-gitea-event", "pull_request"),
        ("x-gitea-delivery", "g-1"),
        ("x-gitea-signature", sig.as_str()),
    ];
    let (s, v) = f.hook("/hooks/gitea", &headers, &body).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let b = &f.builds("web").await[0];
    assert_eq!(
        (
            b["hash"].as_str(),
            b["event"].as_str(),
            b["untrusted"].as_bool(),
            b["branch"].as_str()
        ),
        (
            Some(pr_sha.as_str()),
            Some("pull_request"),
            Some(true),
            Some("main")
        )
    );
    // A label added: no new code, no build.
    let mut labeled = pr.clone();
    labeled["action"] = json!("labeled");
    let body = serde_json::to_vec(&labeled).unwrap();
    let sig = sign(secret, &body);
    let headers = [
        ("x-gitea-event", "pull_request"),
        ("x-gitea-delivery", "g-2"),
        ("x-gitea-signature", sig.as_str()),
    ];
    assert_eq!(f.hook("/hooks/gitea", &headers, &body).await.0, StatusCode::OK);

    // GitLab: the token itself, named by ?project=.
    let gl_sha = repo.commit(&[("c", "1")], "gitlab push");
    let push = json!({
        "object_kind": "push", "event_name": "push",
        "before": sha, "after": gl_sha, "ref": "refs/heads/release/1.0", "checkout_sha": gl_sha,
        "project": {"id": 15, "path_with_namespace": "acme/web", "git_http_url": "http://gitlab.example/acme/web.git"},
        "commits": [{"id": gl_sha, "message": "gitlab push\n", "author": {"name": "Lin", "email": "lin@example.com"}}]
    });
    let body = serde_json::to_vec(&push).unwrap();
    let (s, _) = f
        .hook(
            "/hooks/gitlab?project=web",
            &[("x-gitlab-event", "Push Hook"), ("x-gitlab-token", "nope")],
            &body,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = f
        .hook(
            "/hooks/gitlab?project=web",
            &[
                ("x-gitlab-event", "Push Hook"),
                ("x-gitlab-token", secret),
                ("x-gitlab-event-uuid", "u-1"),
            ],
            &body,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let b = &f.builds("web").await[0];
    assert_eq!(
        (b["hash"].as_str(), b["branch"].as_str()),
        (Some(gl_sha.as_str()), Some("release/1.0"))
    );
    assert_eq!(b["author"], "Lin <lin@example.com>");

    // No project for the repository, an unknown forge, not JSON.
    let stranger = serde_json::to_vec(&github_push("https://github.com/x/y", &sha, "main", "m")).unwrap();
    let sig = format!("sha256={}", sign(secret, &stranger));
    assert_eq!(
        f.hook("/hooks/github", &as_refs(&gh("d-9", sig)), &stranger)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        f.hook("/hooks/bitbucket", &[], b"{}").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        f.hook("/hooks/github?project=web", &[], b"not json").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(f.builds("web").await.len(), 3);
}

/// Polling a real git server: the first look notes the branches; a push
/// starts a build of exactly the pushed commit within the poll interval
/// (and a second of slack); several commits pushed at once build the
/// newest only; with cancelPrevious, a newer commit cancels the branch's
/// unfinished build.
#[tokio::test]
async fn polling_a_git_server_builds_what_is_pushed() {
    let daemon = ci_testkit::GitDaemon::start();
    let url = daemon.create("web.git");
    let work = ci_testkit::GitRepo::new();
    work.commit(&[("a", "1")], "first");
    work.git(&["push", "--quiet", &url, "main"]);

    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(RepoUrl::parse("/srv/repo").unwrap(), dir.path().join("ci.sqlite"));
    config.build_command = Some("make test".into());
    config.git_cache = Some(dir.path().join("git"));
    let server = Server::open(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let builds = || {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let v: Value = http
                .get(format!("{base}/api/projects/web/builds"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["builds"].as_array().cloned().unwrap_or_default()
        }
    };
    let resp = http
        .post(format!("{base}/api/projects"))
        .json(&json!({"name": "web", "repo": url, "pollInterval": 1, "cancelPrevious": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    // The first look only notes where the branches are.
    let heads_noted = || async {
        let c = rusqlite::Connection::open(dir.path().join("ci.sqlite")).ok()?;
        c.query_row("SELECT COUNT(*) FROM heads WHERE project = 'web'", [], |r| {
            r.get::<_, i64>(0)
        })
        .ok()
        .filter(|n| *n == 1)
    };
    ci_testkit::wait_until("the first poll", Duration::from_secs(10), heads_noted).await;
    assert!(builds().await.is_empty());

    // A push: a build of that commit, within the interval plus slack.
    let second = work.commit(&[("a", "2")], "second");
    work.git(&["push", "--quiet", &url, "main"]);
    let pushed = tokio::time::Instant::now();
    let found = ci_testkit::wait_until("a build of the pushed commit", Duration::from_secs(3), || async {
        builds().await.into_iter().find(|b| b["hash"] == second.as_str())
    })
    .await;
    eprintln!("push to build by polling: {:?}", pushed.elapsed());
    assert_eq!(
        (found["event"].as_str(), found["subject"].as_str()),
        (Some("push"), Some("second"))
    );
    assert_eq!(found["status"], "queued", "no agent here");

    // Three commits at once: only the newest is built, and it cancels the
    // branch's queued build.
    for i in 3..6 {
        work.commit(&[("a", &i.to_string())], &format!("commit {i}"));
    }
    let newest = work.git(&["rev-parse", "HEAD"]);
    work.git(&["push", "--quiet", &url, "main"]);
    let all = ci_testkit::wait_until("a build of the newest commit", Duration::from_secs(5), || async {
        let all = builds().await;
        all.iter().any(|b| b["hash"] == newest.as_str()).then_some(all)
    })
    .await;
    assert_eq!(all.len(), 2, "{all:?}");
    let older = ci_testkit::wait_until("the older build canceled", Duration::from_secs(5), || async {
        builds()
            .await
            .into_iter()
            .find(|b| b["hash"] == second.as_str() && b["status"] == "canceled")
    })
    .await;
    assert_eq!(older["number"], 1);

    // A new branch builds; a skipped commit does not.
    work.git(&["checkout", "--quiet", "-b", "feature"]);
    let skipped = work.commit(&[("b", "1")], "wip [skip ci]");
    work.git(&["push", "--quiet", &url, "feature"]);
    // The head the poller last noted for `feature`.
    let feature_head = || {
        let c = rusqlite::Connection::open(dir.path().join("ci.sqlite")).ok()?;
        c.query_row(
            "SELECT sha FROM heads WHERE project = 'web' AND branch = 'feature'",
            [],
            |r| r.get::<_, String>(0),
        )
        .ok()
    };
    let heads_moved = || async { feature_head().filter(|s| s == &skipped) };
    ci_testkit::wait_until("the skipped commit noted", Duration::from_secs(5), heads_moved).await;
    assert_eq!(builds().await.len(), 2);

    // A pipeline that runs nothing for a push to this branch: no build,
    // and the commit is noted (not tried again on every look).
    let filtered = work.commit(
        &[(
            ".ci.yml",
            "version: 1\nsteps:\n  - name: deploy\n    when: {branch: [main]}\n    commands: [\"true\"]\n",
        )],
        "deploy only from main",
    );
    work.git(&["push", "--quiet", &url, "feature"]);
    let noted = || async { feature_head().filter(|s| s == &filtered) };
    ci_testkit::wait_until("the filtered commit noted", Duration::from_secs(5), noted).await;
    assert_eq!(builds().await.len(), 2);

    // A webhook over real HTTP for a project that does not poll: the build
    // of exactly the pushed commit is there when the delivery is answered.
    let secret = "hook-secret-456";
    let resp = http
        .post(format!("{base}/api/projects"))
        .json(&json!({"name": "hooked", "repo": url, "pollInterval": 0, "webhookSecret": secret}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    work.git(&["checkout", "--quiet", "main"]);
    let pushed = work.commit(&[("c", "1")], "hooked push");
    work.git(&["push", "--quiet", &url, "main"]);
    let body = serde_json::to_vec(&json!({
        "ref": "refs/heads/main", "after": pushed,
        "repository": {"full_name": "acme/web", "clone_url": url},
        "head_commit": {"id": pushed, "message": "hooked push", "author": {"name": "A", "email": "a@b"}}
    }))
    .unwrap();
    let sent = tokio::time::Instant::now();
    let resp = http
        .post(format!("{base}/hooks/gitea?project=hooked"))
        .header("content-type", "application/json")
        .header("x-gitea-event", "push")
        .header("x-gitea-delivery", "real-1")
        .header("x-gitea-signature", sign(secret, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let reply: Value = resp.json().await.unwrap();
    eprintln!("webhook to build: {:?}", sent.elapsed());
    let b: Value = http
        .get(format!("{base}/api/builds/{}", reply["build"]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (b["hash"].as_str(), b["project"].as_str()),
        (Some(pushed.as_str()), Some("hooked"))
    );
    assert_eq!(
        (b["branch"].as_str(), b["event"].as_str()),
        (Some("main"), Some("push"))
    );

    let _ = stop.send(());
    served.await.unwrap().unwrap();
}

/// The UI lists projects with each branch's latest build, shows a
/// project's builds, and a build's project, number, full SHA, subject,
/// author and what started it; text from commits is escaped.
#[tokio::test]
async fn the_ui_shows_projects_and_where_builds_came_from() {
    let repo = ci_testkit::GitRepo::new();
    let sha = repo.commit(&[("a", "1")], "Fix <b>bold</b> thing");
    let f = fixture("/srv/repo").await;
    f.call(
        "POST",
        "/api/projects",
        Some(json!({"name": "web", "repo": repo.url(), "pollInterval": 0})),
    )
    .await;
    let (s, b) = f
        .call(
            "POST",
            "/api/projects/web/builds",
            Some(json!({"hash": "main", "event": "manual"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let page = |path: &str| {
        let path = path.to_owned();
        let routes = f.server.routes();
        async move {
            let r = warp::test::request().path(&path).reply(&routes).await;
            (r.status(), String::from_utf8_lossy(r.body()).into_owned())
        }
    };
    let (s, list) = page("/projects").await;
    assert_eq!(s, StatusCode::OK);
    assert!(list.contains(r#"<a href="/projects/web">web</a>"#), "{list}");
    assert!(
        list.contains("<code>main</code>") && list.contains("status-queued"),
        "{list}"
    );
    let (s, project) = page("/projects/web").await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        project.contains(&format!(r#"<a href="/builds/{}">#1</a>"#, b["id"])),
        "{project}"
    );
    assert!(project.contains("Fix &lt;b&gt;bold&lt;/b&gt; thing"), "{project}");
    let (_, build) = page(&format!("/builds/{}", b["id"])).await;
    for want in [
        r#"<a href="/projects/web">web</a> #1"#,
        &sha,
        "Fix &lt;b&gt;bold&lt;/b&gt; thing",
        "ci &lt;ci@localhost&gt;",
        "<dt>Started by</dt><dd>manual</dd>",
    ] {
        assert!(build.contains(want), "{want} in {build}");
    }
    assert_eq!(page("/projects/nope").await.0, StatusCode::NOT_FOUND);
}
