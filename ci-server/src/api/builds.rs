//! The build API: create (and the original form's `POST /build`), list,
//! show, log, cancel, rebuild.

use ci_core::protocol::{BuildList, BuildView, CreateBuild};
use ci_core::{BuildId, CommitRef, NewBuild, Page};
use serde::Deserialize;
use warp::http::StatusCode;
use warp::reply::{json, with_status, Response};
use warp::{Filter, Rejection, Reply};

use super::{api_auth, json_body, respond, with_app, ApiError, App, Result, MAX_BODY, MAX_OFFSET};

/// The build API's routes.
pub(super) fn routes(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    create_build(app.clone())
        .or(list_builds(app.clone()))
        .unify()
        .or(get_build(app.clone()))
        .unify()
        .or(get_log(app.clone()))
        .unify()
        .or(build_action(app))
        .unify()
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
            labels: None,
        })
    }
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
        .and_then(|app: App, accept: Option<String>, body: CreateBuild| async move {
            let created = create(&app, body).await;
            // A plain HTML form (no JavaScript) goes to the build's page.
            let browser = accept.as_deref().is_some_and(|a| a.contains("text/html"));
            if let (Ok(b), true) = (&created, browser) {
                let to = format!("/builds/{}", b.id);
                let see = warp::reply::with_header(StatusCode::SEE_OTHER, "location", to);
                return Ok::<_, Rejection>(see.into_response());
            }
            Ok(respond(created.map(|b| {
                with_status(json(&BuildView::from(&b)), StatusCode::CREATED)
            })))
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
        .and_then(|app: App, q: ListQuery| async move {
            let list = async {
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
                let builds = app.store.list_builds(page).await?;
                Ok(json(&BuildList {
                    builds: views(&app, &builds).await?,
                    limit: page.limit,
                    offset: page.offset,
                }))
            };
            Ok::<_, Rejection>(respond(list.await))
        })
}

/// The API's view of `builds`, each queued one saying why it waits, if
/// no agent could take it.
async fn views(app: &App, builds: &[ci_core::Build]) -> Result<Vec<BuildView>> {
    let mut views: Vec<BuildView> = builds.iter().map(BuildView::from).collect();
    if views
        .iter()
        .any(|v| !v.labels.is_empty() && v.status == ci_core::BuildStatus::Queued)
    {
        let agents = app.dispatcher.agents().await?;
        for v in &mut views {
            v.explain_wait(&agents);
        }
    }
    Ok(views)
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
        .and_then(|id: BuildId, app: App| async move {
            let found = async {
                let b = app
                    .store
                    .build(id)
                    .await?
                    .ok_or(ci_core::Error::BuildNotFound(id))?;
                let mut view = views(&app, std::slice::from_ref(&b)).await?;
                Ok(json(&view.pop()))
            };
            Ok::<_, Rejection>(respond(found.await))
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
                let build = app
                    .store
                    .build(id)
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
            let canceled = app.dispatcher.cancel(id).await;
            Ok::<_, Rejection>(respond(
                canceled
                    .map(|b| json(&BuildView::from(&b)))
                    .map_err(ApiError::from),
            ))
        });
    let rebuild = action("rebuild").and(api_auth(&app)).and(with_app(app)).and_then(
        |id: BuildId, app: App| async move {
            let again = rebuild(&app, id).await;
            Ok::<_, Rejection>(respond(
                again.map(|b| with_status(json(&BuildView::from(&b)), StatusCode::CREATED)),
            ))
        },
    );
    cancel.or(rebuild).unify()
}

async fn rebuild(app: &App, id: BuildId) -> Result<ci_core::Build> {
    let b = app
        .store
        .build(id)
        .await?
        .ok_or(ci_core::Error::BuildNotFound(id))?;
    let body = CreateBuild {
        hash: b.hash,
        command: Some(b.command),
        branch: b.branch,
        image: b.image,
        timeout_ms: b.timeout_ms,
        labels: Some(b.labels),
    };
    create(app, body).await
}

async fn create(app: &App, body: CreateBuild) -> Result<ci_core::Build> {
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
    let mut hash = CommitRef::parse(&body.hash)?;
    let mut branch = body.branch.filter(|b| !b.is_empty());
    if let Some(resolver) = &app.resolver {
        match resolver.resolve(&app.config.repo, &hash).await {
            Ok(Some(resolved)) => {
                hash = resolved.sha;
                branch = branch.or(resolved.branch);
            }
            Ok(None) => {}
            Err(crate::resolve::Unresolved::NotFound(m)) => return Err(ApiError::bad_request(m)),
        }
    }
    let new = NewBuild {
        repo: app.config.repo.clone(),
        hash,
        branch,
        command,
        image: body.image.filter(|i| !i.is_empty()),
        timeout_ms: body.timeout_ms.or(app.config.build_timeout_ms),
        labels: body.labels.unwrap_or_default(),
    };
    Ok(app.dispatcher.submit(&new).await?)
}
