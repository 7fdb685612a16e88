//! Webhooks: `POST /hooks/github`, `/hooks/gitea` (Forgejo too) and
//! `/hooks/gitlab`, for push, tag and pull (merge) request events.
//!
//! The project is the one named by `?project=` or else the one whose
//! repository the payload names. Every delivery must be signed with the
//! project's webhook secret (GitHub `X-Hub-Signature-256`, Gitea
//! `X-Gitea-Signature`: HMAC-SHA256 of the raw body; GitLab
//! `X-Gitlab-Token`: the secret itself), checked in constant time before
//! anything is stored. A redelivery (same delivery id) starts nothing new.

use bytes::Bytes;
use ci_core::pipeline::Trigger;
use ci_core::{ForgeKind, Project, SecretName};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::{json, with_status, Response};
use warp::{Filter, Rejection};

use super::{respond, with_app, ApiError, App, Result};
use crate::triggers::{start, Push};

/// Largest payload taken (GitHub caps its own at 25 MB; pushes of many
/// commits are the large ones).
pub const MAX_HOOK_BODY: u64 = 8 * 1024 * 1024;

#[derive(Debug, Deserialize)]
struct HookQuery {
    project: Option<String>,
}

/// What a delivery did.
#[derive(Debug, Serialize)]
struct HookReply {
    /// The build started, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    build: Option<ci_core::BuildId>,
    /// Why none was, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<String>,
}

/// The webhook routes.
pub(super) fn routes(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path("hooks")
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .and(warp::post())
        .and(with_app(app))
        .and(warp::query::<HookQuery>())
        .and(warp::header::headers_cloned())
        .and(warp::body::content_length_limit(MAX_HOOK_BODY))
        .and(warp::body::bytes())
        .and_then(
            |forge: String, app: App, q: HookQuery, headers: HeaderMap, body: Bytes| async move {
                let reply = async {
                    let kind = match forge.as_str() {
                        "github" => ForgeKind::Github,
                        "gitea" | "forgejo" => ForgeKind::Gitea,
                        "gitlab" => ForgeKind::Gitlab,
                        other => {
                            return Err(ApiError::new(
                                StatusCode::NOT_FOUND,
                                format!("no webhook for {other:?}: github, gitea, forgejo or gitlab"),
                            ))
                        }
                    };
                    deliver(&app, kind, q.project, &headers, &body).await
                };
                Ok::<_, Rejection>(respond(reply.await))
            },
        )
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn unauthorized(why: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, why)
}

async fn deliver(
    app: &App,
    kind: ForgeKind,
    project: Option<String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response> {
    let payload: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the payload is not JSON: {e}")))?;
    let project = find_project(app, project, kind, &payload).await?;
    verify(app, &project, kind, headers, body).await?;

    let event = match kind {
        ForgeKind::Github => header(headers, "x-github-event"),
        ForgeKind::Gitea => header(headers, "x-gitea-event").or(header(headers, "x-forgejo-event")),
        ForgeKind::Gitlab => header(headers, "x-gitlab-event"),
    }
    .unwrap_or_default()
    .to_owned();
    let delivery = match kind {
        ForgeKind::Github => header(headers, "x-github-delivery"),
        ForgeKind::Gitea => header(headers, "x-gitea-delivery").or(header(headers, "x-forgejo-delivery")),
        ForgeKind::Gitlab => header(headers, "x-gitlab-event-uuid").or(header(headers, "idempotency-key")),
    }
    .filter(|d| !d.is_empty() && d.len() <= 200 && d.chars().all(|c| c.is_ascii_graphic()))
    .map(|d| format!("{}:{d}", kind.as_str()));

    let push = match parse(kind, &event, &payload) {
        Parsed::Build(p) => p,
        Parsed::Ignored(why) => return Ok(ignored(why)),
        Parsed::Invalid(why) => return Err(ApiError::bad_request(why)),
    };
    let push = Push { delivery, ..push };
    match start(app, &project, push).await {
        Ok(Ok(b)) => Ok(with_status(
            json(&HookReply {
                build: Some(b.id),
                skipped: None,
            }),
            StatusCode::CREATED,
        )
        .into_response()),
        Ok(Err(why)) => Ok(ignored(why.as_str())),
        Err(e) if e.status() == StatusCode::CONFLICT && e.message().contains("delivery") => {
            Ok(ignored("this delivery was received before"))
        }
        Err(e) => Err(e),
    }
}

use warp::Reply;

fn ignored(why: &str) -> Response {
    json(&HookReply {
        build: None,
        skipped: Some(why.to_owned()),
    })
    .into_response()
}

/// `?project=`, or the one project whose repository the payload names.
async fn find_project(app: &App, named: Option<String>, kind: ForgeKind, payload: &Value) -> Result<Project> {
    if let Some(name) = named {
        Project::check_name(&name)?;
        return app
            .store
            .project(&name)
            .await?
            .ok_or_else(|| unauthorized(format!("no project {name:?} takes this webhook")));
    }
    let repo = match kind {
        ForgeKind::Gitlab => &payload["project"],
        _ => &payload["repository"],
    };
    let urls: Vec<String> = [
        "clone_url",
        "ssh_url",
        "html_url",
        "git_http_url",
        "git_ssh_url",
        "web_url",
        "url",
    ]
    .iter()
    .filter_map(|k| repo[*k].as_str())
    .map(same_repo)
    .collect();
    let mut found: Vec<Project> = app
        .store
        .projects()
        .await?
        .into_iter()
        .filter(|p| !p.repo.is_empty() && urls.contains(&same_repo(&p.repo)))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(unauthorized(
            "no project has this repository: add ?project=NAME to the webhook's URL",
        )),
        _ => Err(ApiError::bad_request(
            "several projects have this repository: add ?project=NAME to the webhook's URL",
        )),
    }
}

/// A repository URL compared without case, credentials, `.git` and `/`.
fn same_repo(url: &str) -> String {
    let url = ci_core::model::redact_url(url).to_ascii_lowercase();
    let url = url.trim_end_matches('/');
    url.strip_suffix(".git").unwrap_or(url).to_owned()
}

/// Checks the delivery's signature against the project's webhook secret.
async fn verify(
    app: &App,
    project: &Project,
    kind: ForgeKind,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<()> {
    let wanted = [SecretName::WEBHOOK.to_owned()];
    let sealed = app.store.secrets(&project.name, &wanted).await?;
    let secret = sealed
        .first()
        .and_then(|(_, s)| app.vault.open_value(&project.name, SecretName::WEBHOOK, s))
        .ok_or_else(|| {
            unauthorized(format!(
                "project {:?} has no webhookSecret: set one, and the same in the forge's webhook",
                project.name
            ))
        })?;
    let ok = match kind {
        ForgeKind::Gitlab => {
            header(headers, "x-gitlab-token").is_some_and(|t| ci_core::auth::ct_eq(t.as_bytes(), &secret))
        }
        ForgeKind::Github | ForgeKind::Gitea => {
            let given = match kind {
                ForgeKind::Github => {
                    header(headers, "x-hub-signature-256").and_then(|s| s.strip_prefix("sha256="))
                }
                _ => header(headers, "x-gitea-signature").or(header(headers, "x-forgejo-signature")),
            };
            match given.and_then(decode_hex) {
                Some(sig) => {
                    let mut mac = Hmac::<Sha256>::new_from_slice(&secret)
                        .map_err(|_| unauthorized("unusable webhook secret"))?;
                    mac.update(body);
                    // N.B.: `verify_slice` compares in constant time.
                    mac.verify_slice(&sig).is_ok()
                }
                None => false,
            }
        }
    };
    if ok {
        Ok(())
    } else {
        Err(unauthorized("missing or wrong webhook signature"))
    }
}

/// An HMAC-SHA256 in hex.
fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    (s.len() == 64).then(|| crate::vault::decode_hex(s)).flatten()
}

enum Parsed {
    Build(Push),
    Ignored(&'static str),
    Invalid(String),
}

const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

fn sha_of(v: &Value) -> Option<String> {
    v.as_str()
        .filter(|s| matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .filter(|s| *s != ZERO_SHA)
        .map(str::to_ascii_lowercase)
}

fn author_of(a: &Value) -> Option<String> {
    match (a["name"].as_str(), a["email"].as_str()) {
        (Some(n), Some(e)) => Some(format!("{n} <{e}>")),
        (Some(n), None) => Some(n.to_owned()),
        _ => None,
    }
}

/// The build an event asks for.
fn parse(kind: ForgeKind, event: &str, p: &Value) -> Parsed {
    let is_push = match kind {
        ForgeKind::Gitlab => matches!(event, "Push Hook" | "Tag Push Hook"),
        _ => event == "push",
    };
    let is_pr = match kind {
        ForgeKind::Gitlab => event == "Merge Request Hook",
        _ => event == "pull_request",
    };
    if is_push {
        let Some(r) = p["ref"].as_str() else {
            return Parsed::Invalid("a push event without ref".into());
        };
        let Some(sha) = sha_of(&p["after"]).or_else(|| sha_of(&p["checkout_sha"])) else {
            return Parsed::Ignored("a deleted branch or tag");
        };
        let (event, branch) = if let Some(b) = r.strip_prefix("refs/heads/") {
            (Trigger::Push, Some(b.to_owned()))
        } else if r.starts_with("refs/tags/") {
            (Trigger::Tag, None)
        } else {
            return Parsed::Ignored("a push to a ref that is neither a branch nor a tag");
        };
        // The head commit: GitHub and Gitea say which; GitLab lists them.
        let head = if !p["head_commit"].is_null() {
            p["head_commit"].clone()
        } else {
            p["commits"]
                .as_array()
                .and_then(|c| {
                    c.iter()
                        .find(|c| c["id"].as_str() == Some(sha.as_str()))
                        .or(c.last())
                })
                .cloned()
                .unwrap_or(Value::Null)
        };
        return Parsed::Build(Push {
            event: Some(event),
            branch,
            sha,
            message: head["message"].as_str().map(str::to_owned),
            author: author_of(&head["author"]),
            untrusted: false,
            delivery: None,
        });
    }
    if is_pr {
        return match kind {
            ForgeKind::Gitlab => {
                let a = &p["object_attributes"];
                let action = a["action"].as_str().unwrap_or_default();
                let new_code = match action {
                    "open" | "reopen" => true,
                    // An update without `oldrev` changed only the title,
                    // labels or the like.
                    "update" => !a["oldrev"].is_null(),
                    _ => false,
                };
                if !new_code {
                    return Parsed::Ignored("a merge request event that brings no new commits");
                }
                let Some(sha) = sha_of(&a["last_commit"]["id"]) else {
                    return Parsed::Invalid("a merge request without last_commit.id".into());
                };
                let fork = a["source_project_id"] != a["target_project_id"];
                Parsed::Build(Push {
                    event: Some(Trigger::PullRequest),
                    branch: a["target_branch"].as_str().map(str::to_owned),
                    sha,
                    message: a["last_commit"]["message"].as_str().map(str::to_owned),
                    author: author_of(&a["last_commit"]["author"]),
                    untrusted: fork,
                    delivery: None,
                })
            }
            _ => {
                let action = p["action"].as_str().unwrap_or_default();
                // GitHub says `synchronize`, Gitea `synchronized`.
                if !matches!(action, "opened" | "reopened" | "synchronize" | "synchronized") {
                    return Parsed::Ignored("a pull request event that brings no new commits");
                }
                let pr = &p["pull_request"];
                let Some(sha) = sha_of(&pr["head"]["sha"]) else {
                    return Parsed::Invalid("a pull request without head.sha".into());
                };
                let head_repo = pr["head"]["repo"]["full_name"].as_str();
                let base_repo = pr["base"]["repo"]["full_name"].as_str();
                // N.B.: a fork, or a head repository the forge no longer
                // names (deleted fork), is untrusted.
                let fork = head_repo.is_none() || head_repo != base_repo;
                Parsed::Build(Push {
                    event: Some(Trigger::PullRequest),
                    branch: pr["base"]["ref"].as_str().map(str::to_owned),
                    sha,
                    message: pr["title"].as_str().map(str::to_owned),
                    author: pr["user"]["login"].as_str().map(str::to_owned),
                    untrusted: fork,
                    delivery: None,
                })
            }
        };
    }
    Parsed::Ignored("an event that starts no build")
}
