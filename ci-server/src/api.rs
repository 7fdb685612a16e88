//! HTTP routes: the agent protocol and the public JSON API.
//!
//! Filters only extract and validate; handlers call the [`Dispatcher`] or
//! read the store; [`recover`] turns every rejection into a JSON error with
//! a fitting status, so no request ever gets an HTML error page or a 500
//! for bad input.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use ci_core::coordinator::{Accepted, Heartbeat, Report};
use ci_core::protocol::{
    AgentView, BuildList, BuildView, CreateBuild, ErrorBody, NotifyAgent, NotifyAgentAlive, NotifyAgentLeave,
    NotifyAgentReply, NotifyBuildLog, NotifyBuildResult,
};
use ci_core::{AgentId, BuildId, BuildStore, CommitRef, Completion, Dispatcher, LogPiece, NewBuild, Page};
use serde::Deserialize;
use warp::http::StatusCode;
use warp::reply::{json, with_status, Response};
use warp::{Filter, Rejection, Reply};

use crate::config::ServerConfig;

/// Largest body of an ordinary request: room for a command of
/// `MAX_COMMAND` characters even when JSON escapes each one (`\uXXXX`
/// surrogate pairs take 12 bytes).
pub const MAX_BODY: u64 = 1024 * 1024;
/// Largest `offset` of a listing (SQLite takes a signed 64-bit offset).
pub const MAX_OFFSET: usize = i64::MAX as usize;
/// Largest body of a build result: two capped logs plus slack.
pub const MAX_RESULT_BODY: u64 = 2 * ci_core::model::limits::MAX_LOG as u64 + 64 * 1024;

/// What every handler needs.
#[derive(Clone)]
pub(crate) struct App {
    pub dispatcher: Arc<Dispatcher>,
    pub store: Arc<dyn BuildStore>,
    pub config: Arc<ServerConfig>,
    pub link: Arc<crate::HttpLink>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Set when shutting down: no new builds.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

/// An API error: a status and a message, sent as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// The status it answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl warp::reject::Reject for ApiError {}

impl From<ci_core::Error> for ApiError {
    fn from(e: ci_core::Error) -> ApiError {
        use ci_core::Error as E;
        let status = match &e {
            E::Invalid { .. } => StatusCode::BAD_REQUEST,
            E::BuildNotFound(_) | E::AgentNotFound(_) | E::NotRunning { .. } => StatusCode::NOT_FOUND,
            E::Superseded { .. } | E::Conflict(_) => StatusCode::CONFLICT,
            E::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            E::Store(_) | E::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(cause = %e, "request failed");
        }
        ApiError::new(status, e.to_string())
    }
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        with_status(json(&ErrorBody { error: self.message }), self.status).into_response()
    }
}

type Result<T, E = ApiError> = std::result::Result<T, E>;

fn respond<T: Reply>(r: Result<T>) -> Response {
    match r {
        Ok(reply) => reply.into_response(),
        Err(e) => e.into_response(),
    }
}

// === filters ===

/// Every route, with errors recovered into JSON.
pub(crate) fn routes(app: App) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let guard = crate::guard::guard(app.config.clone());
    let agent_protocol = notify_agent(app.clone())
        .or(notify_agent_alive(app.clone()))
        .unify()
        .or(notify_build_result(app.clone()))
        .unify()
        .or(notify_build_log(app.clone()))
        .unify()
        .or(notify_agent_leave(app.clone()))
        .unify();
    let api = create_build(app.clone())
        .or(list_builds(app.clone()))
        .unify()
        .or(get_build(app.clone()))
        .unify()
        .or(get_log(app.clone()))
        .unify()
        .or(build_action(app.clone()))
        .unify()
        .or(list_agents(app.clone()))
        .unify()
        .or(metrics(app.clone()))
        .unify()
        .or(crate::ui::routes(app))
        .unify()
        .or(healthz())
        .unify();
    guard
        .and(agent_protocol.or(api).unify().or(wrong_method()).unify())
        .recover(recover)
        .unify()
        .with(crate::guard::headers())
        .with(warp::trace::request())
}

pub(crate) fn with_app(app: App) -> impl Filter<Extract = (App,), Error = Infallible> + Clone {
    warp::any().map(move || app.clone())
}

/// Passes if `token` is unset or presented as `Authorization: Bearer`.
/// Goes after the path and method filters, so that a wrong token on one
/// route does not hide another route's answer.
fn bearer(token: Option<String>, what: &'static str) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and_then(move |h: Option<String>| {
            let ok = token
                .as_deref()
                .is_none_or(|t| ci_core::auth::bearer_matches(h.as_deref(), t));
            async move {
                if ok {
                    Ok(())
                } else {
                    Err(warp::reject::custom(ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        format!("missing or wrong {what} (Authorization: Bearer ...)"),
                    )))
                }
            }
        })
        .untuple_one()
}

fn agent_auth(app: &App) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    bearer(app.config.agent_token.clone(), "AGENT_TOKEN")
}

pub(crate) fn api_auth(app: &App) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    bearer(app.config.api_token.clone(), "API_TOKEN")
}

/// Who sent an agent request: proven by the session secret header, or
/// merely claimed by `agentId` in the body.
#[derive(Debug, Clone, Copy)]
struct Sender {
    agent: Option<AgentId>,
    verified: bool,
}

fn session_secret() -> impl Filter<Extract = (Option<String>,), Error = Rejection> + Copy {
    warp::header::optional::<String>(ci_core::auth::SESSION_HEADER)
}

impl App {
    /// The sender of a request that carried `secret` (maybe) and claims
    /// `claimed` (maybe). A secret that no longer matches an agent (the
    /// agent was dropped) proves nothing; the claim then stands alone.
    fn sender(&self, secret: Option<&str>, claimed: Option<AgentId>) -> Result<Sender> {
        let proven = secret.and_then(|s| self.dispatcher.with(|c| c.agent_by_secret(s)));
        match (proven, claimed) {
            (Some(p), Some(c)) if p != c => Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("agentId {c} does not match the session secret (agent {p})"),
            )),
            (Some(p), _) => Ok(Sender {
                agent: Some(p),
                verified: true,
            }),
            (None, c) => Ok(Sender {
                agent: c,
                verified: false,
            }),
        }
    }
}

fn json_body<T: serde::de::DeserializeOwned + Send>(
    limit: u64,
) -> impl Filter<Extract = (T,), Error = Rejection> + Clone {
    warp::body::content_length_limit(limit).and(warp::body::json())
}

fn notify_agent(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("notify_agent")
        .and(warp::post())
        .and(agent_auth(&app))
        .and(with_app(app))
        .and(crate::listen::remote())
        .and(session_secret())
        .and(json_body(MAX_BODY))
        .map(
            |app: App, remote: Option<SocketAddr>, proof: Option<String>, body: NotifyAgent| {
                respond(register(&app, remote, proof.as_deref(), body))
            },
        )
}

fn notify_agent_alive(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("notify_agent_alive")
        .and(warp::post())
        .and(agent_auth(&app))
        .and(with_app(app))
        .and(session_secret())
        .and(json_body(MAX_BODY))
        .map(|app: App, secret: Option<String>, body: NotifyAgentAlive| {
            let beat = || -> Result<_> {
                let sender = app.sender(secret.as_deref(), body.agent_id)?;
                let hb = Heartbeat {
                    build: body.id,
                    attempt: body.attempt,
                    agent: sender.agent,
                    verified: sender.verified,
                };
                app.dispatcher.heartbeat(hb)?;
                Ok(json(&serde_json::json!({"ok": true})))
            };
            respond(beat())
        })
}

fn notify_build_result(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("notify_build_result")
        .and(warp::post())
        .and(agent_auth(&app))
        .and(with_app(app))
        .and(session_secret())
        .and(json_body(MAX_RESULT_BODY))
        .map(|app: App, secret: Option<String>, body: NotifyBuildResult| {
            let store = || -> Result<_> {
                let sender = app.sender(secret.as_deref(), body.agent_id)?;
                let report = Report {
                    build: body.id,
                    attempt: body.attempt,
                    agent: sender.agent,
                    verified: sender.verified,
                    completion: Completion {
                        exit_code: body.status,
                        stdout: body.stdout,
                        stderr: body.stderr,
                    },
                };
                Ok(match app.dispatcher.complete(report)? {
                    Accepted::Finished(b) => json(&serde_json::json!({"stored": true, "status": b.status})),
                    Accepted::Duplicate(b) => {
                        json(&serde_json::json!({"stored": true, "duplicate": true, "status": b.status}))
                    }
                })
            };
            respond(store())
        })
}

/// [`CreateBuild`] as an HTML form posts it: strings, empty meaning absent.
#[derive(Debug, Deserialize)]
struct CreateBuildForm {
    hash: String,
    command: Option<String>,
    branch: Option<String>,
    image: Option<String>,
    #[serde(rename = "timeoutMs")]
    timeout_ms: Option<String>,
}

impl CreateBuildForm {
    fn into_request(self) -> Result<CreateBuild> {
        let timeout_ms =
            match self.timeout_ms.filter(|t| !t.is_empty()) {
                None => None,
                Some(t) => Some(t.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid timeoutMs: {t:?} is not a number"))
                })?),
            };
        Ok(CreateBuild {
            hash: self.hash,
            command: self.command,
            branch: self.branch,
            image: self.image,
            timeout_ms,
        })
    }
}

fn notify_build_log(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("notify_build_log")
        .and(warp::post())
        .and(agent_auth(&app))
        .and(with_app(app))
        .and(session_secret())
        .and(json_body(MAX_RESULT_BODY))
        .and_then(
            |app: App, secret: Option<String>, body: NotifyBuildLog| async move {
                let store = async {
                    let sender = app.sender(secret.as_deref(), body.agent_id)?;
                    let hb = Heartbeat {
                        build: Some(body.id),
                        attempt: body.attempt,
                        agent: sender.agent,
                        verified: sender.verified,
                    };
                    let pieces: Vec<LogPiece> = body
                        .pieces
                        .into_iter()
                        .map(|p| LogPiece {
                            seq: p.seq,
                            stream: p.stream,
                            data: p.data,
                        })
                        .collect();
                    let stored = app.dispatcher.output(hb, pieces).await?;
                    Ok(json(&serde_json::json!({ "stored": stored })))
                };
                Ok::<_, Rejection>(respond(store.await))
            },
        )
}

fn notify_agent_leave(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("notify_agent_leave")
        .and(warp::post())
        .and(agent_auth(&app))
        .and(with_app(app))
        .and(session_secret())
        .and(json_body(MAX_BODY))
        .map(|app: App, secret: Option<String>, body: NotifyAgentLeave| {
            let leave = || -> Result<_> {
                let sender = app.sender(secret.as_deref(), Some(body.agent_id))?;
                app.dispatcher
                    .with(|c| c.agent_left(body.agent_id, sender.verified))?;
                tracing::info!(agent = %body.agent_id, "agent left");
                Ok(json(&serde_json::json!({ "ok": true })))
            };
            respond(leave())
        })
}

fn create_build(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    // The original UI posted to /build; the API lives under /api/builds.
    let path = warp::path!("api" / "builds").or(warp::path!("build")).unify();
    let form = warp::body::content_length_limit(MAX_BODY)
        .and(warp::body::form::<CreateBuildForm>())
        .and_then(|f: CreateBuildForm| async move { f.into_request().map_err(warp::reject::custom) });
    let body = json_body::<CreateBuild>(MAX_BODY).or(form).unify();
    path.and(warp::post())
        .and(api_auth(&app))
        .and(with_app(app))
        .and(warp::header::optional::<String>("accept"))
        .and(body)
        .map(|app: App, accept: Option<String>, body: CreateBuild| {
            let created = create(&app, body);
            // A plain HTML form (no JavaScript) goes to the build's page.
            let browser = accept.as_deref().is_some_and(|a| a.contains("text/html"));
            if let (Ok(b), true) = (&created, browser) {
                let to = format!("/builds/{}", b.id);
                return warp::reply::with_header(StatusCode::SEE_OTHER, "location", to).into_response();
            }
            respond(created.map(|b| with_status(json(&BuildView::from(&b)), StatusCode::CREATED)))
        })
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    offset: Option<usize>,
    before: Option<i64>,
}

fn list_builds(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("api" / "builds")
        .and(warp::get())
        .and(api_auth(&app))
        .and(with_app(app))
        .and(warp::query::<ListQuery>())
        .map(|app: App, q: ListQuery| {
            let list = || -> Result<_> {
                let limit = q.limit.unwrap_or(Page::default().limit);
                if !(1..=Page::MAX_LIMIT).contains(&limit) {
                    return Err(ApiError::bad_request(format!(
                        "limit must be 1 to {}",
                        Page::MAX_LIMIT
                    )));
                }
                let offset = q.offset.unwrap_or(0);
                if offset > MAX_OFFSET {
                    return Err(ApiError::bad_request(format!(
                        "offset must be at most {MAX_OFFSET}"
                    )));
                }
                let page = Page {
                    limit,
                    offset,
                    before: q.before.map(BuildId),
                };
                let builds = app.store.list_builds(page)?;
                Ok(json(&BuildList {
                    builds: builds.iter().map(BuildView::from).collect(),
                    limit: page.limit,
                    offset: page.offset,
                }))
            };
            respond(list())
        })
}

fn build_id() -> impl Filter<Extract = (BuildId,), Error = Rejection> + Copy {
    warp::path::param::<String>().and_then(|s: String| async move {
        s.parse::<i64>()
            .ok()
            .filter(|n| *n > 0)
            .map(BuildId)
            .ok_or_else(|| warp::reject::custom(ApiError::bad_request(format!("invalid build id {s:?}"))))
    })
}

fn get_build(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path("api")
        .and(warp::path("builds"))
        .and(build_id())
        .and(warp::path::end())
        .and(warp::get())
        .and(api_auth(&app))
        .and(with_app(app))
        .map(|id: BuildId, app: App| {
            respond(
                app.store
                    .build(id)
                    .map_err(ApiError::from)
                    .and_then(|b| b.ok_or_else(|| ci_core::Error::BuildNotFound(id).into()))
                    .map(|b| json(&BuildView::from(&b))),
            )
        })
}

/// `POST /api/builds/{id}/cancel` and `POST /api/builds/{id}/rebuild`.
fn build_action(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let action = |name: &'static str| {
        warp::path("api")
            .and(warp::path("builds"))
            .and(build_id())
            .and(warp::path(name))
            .and(warp::path::end())
            .and(warp::post())
    };
    let cancel = action("cancel")
        .and(api_auth(&app))
        .and(with_app(app.clone()))
        .and_then(|id: BuildId, app: App| async move {
            let canceled = app.dispatcher.cancel(id, &*app.link).await;
            Ok::<_, Rejection>(respond(
                canceled
                    .map(|b| json(&BuildView::from(&b)))
                    .map_err(ApiError::from),
            ))
        });
    let rebuild = action("rebuild")
        .and(api_auth(&app))
        .and(with_app(app))
        .map(|id: BuildId, app: App| {
            respond(rebuild(&app, id).map(|b| with_status(json(&BuildView::from(&b)), StatusCode::CREATED)))
        });
    cancel.or(rebuild).unify()
}

fn rebuild(app: &App, id: BuildId) -> Result<ci_core::Build> {
    let b = app.store.build(id)?.ok_or(ci_core::Error::BuildNotFound(id))?;
    let body = CreateBuild {
        hash: b.hash,
        command: Some(b.command),
        branch: b.branch,
        image: b.image,
        timeout_ms: b.timeout_ms,
    };
    create(app, body)
}

fn metrics(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("metrics")
        .and(warp::get())
        .and(with_app(app))
        .map(|app: App| {
            let snapshot = || -> Result<crate::metrics::Snapshot> {
                let builds = app.metrics.build_counts(|| app.store.status_counts())?;
                let (idle, busy) = app.dispatcher.with(|c| {
                    let agents = c.agents();
                    let idle = agents.iter().filter(|a| a.is_idle()).count() as u64;
                    (idle, agents.len() as u64 - idle)
                });
                Ok(crate::metrics::Snapshot { builds, idle, busy })
            };
            match snapshot() {
                Ok(now) => warp::reply::with_header(
                    app.metrics.render(&now),
                    "content-type",
                    "text/plain; version=0.0.4; charset=utf-8",
                )
                .into_response(),
                Err(e) => e.into_response(),
            }
        })
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    attempt: Option<u32>,
    follow: Option<String>,
}

fn get_log(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path("api")
        .and(warp::path("builds"))
        .and(build_id())
        .and(warp::path("log"))
        .and(warp::path::end())
        .and(warp::get())
        .and(api_auth(&app))
        .and(with_app(app))
        .and(warp::query::<LogQuery>())
        .and_then(|id: BuildId, app: App, q: LogQuery| async move {
            let follow = q
                .follow
                .as_deref()
                .is_some_and(|f| matches!(f, "1" | "true" | "yes"));
            let reply = async {
                let store = app.store.clone();
                let build = crate::logs::blocking(move || store.build(id))
                    .await?
                    .ok_or(ci_core::Error::BuildNotFound(id))?;
                if follow {
                    return Ok(crate::follow::reply(app, id));
                }
                let attempt = q.attempt.map(ci_core::Attempt);
                if let Some(a) = attempt {
                    if a.0 == 0 || a > build.attempt {
                        return Err(ApiError::new(
                            StatusCode::NOT_FOUND,
                            format!("build {id} has no attempt {a}"),
                        ));
                    }
                }
                crate::logs::json_reply(app.store.clone(), build, attempt).await
            };
            Ok::<_, Rejection>(respond(reply.await))
        })
}

fn list_agents(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("api" / "agents")
        .and(warp::get())
        .and(api_auth(&app))
        .and(with_app(app))
        .map(|app: App| {
            let agents = app
                .dispatcher
                .with(|c| c.agents().iter().map(AgentView::from).collect::<Vec<_>>());
            json(&agents).into_response()
        })
}

fn healthz() -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let health = warp::path!("healthz")
        .and(warp::get())
        .map(|| json(&serde_json::json!({"status": "ok"})).into_response());
    let spec = std::sync::Arc::new(crate::openapi::spec());
    let openapi = warp::path!("api" / "openapi.json")
        .and(warp::get())
        .map(move || json(&*spec).into_response());
    health.or(openapi).unify()
}

/// A known path with a method it does not serve: 405 with `Allow`. For
/// anything else this rejects as not found, the weakest rejection, so the
/// real route's answer (a 400, say) wins.
fn wrong_method() -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::method().and(warp::path::full()).and_then(
        |method: warp::http::Method, path: warp::path::FullPath| async move {
            let allowed = crate::openapi::allowed_methods(path.as_str());
            if allowed.is_empty() || allowed.iter().any(|m| m == method.as_str()) {
                return Err(warp::reject::not_found());
            }
            let body = ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed").into_response();
            Ok(warp::reply::with_header(body, "allow", allowed.join(", ")).into_response())
        },
    )
}

// === handlers ===

fn register(
    app: &App,
    remote: Option<SocketAddr>,
    proof: Option<&str>,
    body: NotifyAgent,
) -> Result<impl Reply> {
    let url = agent_url(body.host.as_deref(), body.port, remote)?;
    let (reg, secret) = if body.session {
        let secret = ci_core::auth::random_secret()
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("no randomness: {e}")))?;
        (
            app.dispatcher
                .with(|c| c.register_agent_with_secret(&url, secret.clone(), proof))?,
            Some(secret),
        )
    } else {
        (app.dispatcher.register_agent(&url)?, None)
    };
    tracing::info!(agent = %reg.id, %url, session = body.session, "agent registered");
    Ok(json(&NotifyAgentReply {
        id: reg.id,
        timeout: reg.heartbeat_ms,
        secret,
    }))
}

fn create(app: &App, body: CreateBuild) -> Result<ci_core::Build> {
    if app.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ));
    }
    let command = body
        .command
        .filter(|c| !c.trim().is_empty())
        .or_else(|| app.config.build_command.clone())
        .ok_or_else(|| ApiError::bad_request("command is required: the server has no BUILD_COMMAND"))?;
    let new = NewBuild {
        repo: app.config.repo.clone(),
        hash: CommitRef::parse(&body.hash)?,
        branch: body.branch.filter(|b| !b.is_empty()),
        command,
        image: body.image.filter(|i| !i.is_empty()),
        timeout_ms: body.timeout_ms.or(app.config.build_timeout_ms),
    };
    Ok(app.dispatcher.submit(&new)?)
}

/// The base URL of an agent from what it announced: `host` with or without
/// a scheme and a port (the `port` field wins). Without a usable host, the
/// request's source address is used. Mirrors `HOST_PATTERN` in the OpenAPI
/// document exactly.
pub(crate) fn agent_url(host: Option<&str>, port: u16, remote: Option<SocketAddr>) -> Result<String> {
    let bad = |why: &str| ApiError::bad_request(format!("invalid host {host:?}: {why}"));
    let h = host.unwrap_or("");
    let (scheme, rest) = match h.split_once("://") {
        Some((s, rest)) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => {
            (s.to_ascii_lowercase(), rest)
        }
        Some(_) => return Err(bad("scheme must be http or https")),
        None => ("http".to_owned(), h),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    // Drop a `:port` suffix (after `]` for IPv6, or the only colon).
    let name = match rest.rsplit_once(':') {
        Some((n, p))
            if !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u16>().is_ok()
                && (!n.contains(':') || (n.starts_with('[') && n.ends_with(']'))) =>
        {
            n
        }
        _ => rest,
    };
    let ipv6 = name.strip_prefix('[').and_then(|n| n.strip_suffix(']'));
    let name = match ipv6 {
        Some(inner) => {
            let ip: std::net::Ipv6Addr = inner.parse().map_err(|_| bad("not an IPv6 address"))?;
            (!ip.is_unspecified()).then(|| format!("[{ip}]"))
        }
        None => {
            let hostname = name.len() <= 253
                && !name.starts_with('-')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if !hostname {
                return Err(bad("not a host name or IP address"));
            }
            (!name.is_empty() && name != "0.0.0.0").then(|| name.to_owned())
        }
    };
    let name = match (name, remote) {
        (Some(n), _) => n,
        (None, Some(SocketAddr::V4(a))) => a.ip().to_string(),
        (None, Some(SocketAddr::V6(a))) => format!("[{}]", a.ip()),
        (None, None) => return Err(bad("no host given and no source address")),
    };
    Ok(format!("{scheme}://{name}:{port}"))
}

// === rejections ===

async fn recover(err: Rejection) -> Result<Response, Infallible> {
    let (status, message) = if let Some(e) = err.find::<ApiError>() {
        (e.status, e.message.clone())
    } else if err.is_not_found() {
        (StatusCode::NOT_FOUND, "no such endpoint".to_owned())
    } else if let Some(e) = err.find::<warp::filters::body::BodyDeserializeError>() {
        (StatusCode::BAD_REQUEST, format!("invalid body: {e}"))
    } else if let Some(e) = err.find::<warp::reject::InvalidQuery>() {
        (StatusCode::BAD_REQUEST, e.to_string())
    } else if err.find::<warp::reject::PayloadTooLarge>().is_some() {
        (StatusCode::PAYLOAD_TOO_LARGE, "body too large".to_owned())
    } else if err.find::<warp::reject::LengthRequired>().is_some() {
        // Bodies are size-checked up front, so one without Content-Length
        // is refused; usually it is simply missing.
        (
            StatusCode::BAD_REQUEST,
            "a body with Content-Length is required".to_owned(),
        )
    } else if let Some(e) = err.find::<warp::reject::UnsupportedMediaType>() {
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, e.to_string())
    } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        (StatusCode::METHOD_NOT_ALLOWED, "method not allowed".to_owned())
    } else {
        tracing::warn!(rejection = ?err, "unhandled rejection");
        (StatusCode::BAD_REQUEST, "bad request".to_owned())
    };
    Ok(ApiError::new(status, message).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_urls_from_what_agents_announce() {
        let remote: Option<SocketAddr> = Some("127.0.0.7:5555".parse().unwrap());
        let url = |h: Option<&str>, p| agent_url(h, p, remote);
        assert_eq!(
            url(Some("http://agent-01"), 3001).unwrap(),
            "http://agent-01:3001"
        );
        assert_eq!(url(Some("agent-01"), 3001).unwrap(), "http://agent-01:3001");
        assert_eq!(
            url(Some("http://agent-01:3001/"), 3001).unwrap(),
            "http://agent-01:3001"
        );
        assert_eq!(url(Some("HTTPS://a.b"), 1).unwrap(), "https://a.b:1");
        assert_eq!(url(Some("[::1]"), 1).unwrap(), "http://[::1]:1");
        assert_eq!(url(None, 3001).unwrap(), "http://127.0.0.7:3001");
        assert_eq!(url(Some("0.0.0.0"), 3001).unwrap(), "http://127.0.0.7:3001");
        assert_eq!(url(Some(""), 3001).unwrap(), "http://127.0.0.7:3001");
        assert_eq!(url(Some(":80"), 3001).unwrap(), "http://127.0.0.7:3001");
        assert_eq!(url(Some("[::1]:80"), 3001).unwrap(), "http://[::1]:3001");
        assert_eq!(url(Some("[::]"), 3001).unwrap(), "http://127.0.0.7:3001");
        for bad in [
            "ftp://x",
            "a b",
            "x/y",
            "-x",
            "user@host",
            "http://a/b/c",
            " a",
            "::1",
            "[::g]",
            "a:",
            "\u{8b}",
        ] {
            assert!(url(Some(bad), 1).is_err(), "{bad}");
        }
    }
}
