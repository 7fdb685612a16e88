//! The build API: create (and the original form's `POST /build`), list,
//! show, logs (of a build of one step, and of each step), cancel, rebuild,
//! retry.

use ci_core::pipeline::Trigger;
use ci_core::protocol::{BuildList, BuildView, CreateBuild};
use ci_core::store::BuildFilter;
use ci_core::{Build, BuildId, CommitRef, NewBuild, Page, Project, RepoUrl, Source, Step};
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
        .or(get_step_log(app.clone()))
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
            event: None,
            project: None,
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
        .and(warp::header::optional::<String>("content-type"))
        .and(body)
        .and_then(
            |app: App, accept: Option<String>, kind: Option<String>, body: CreateBuild| async move {
                // A form is someone at the web UI; JSON is a program.
                let form = kind
                    .as_deref()
                    .is_some_and(|k| k.starts_with("application/x-www-form-urlencoded"));
                let by = |event| Source {
                    project: body.project.clone().unwrap_or_else(|| Project::DEFAULT.to_owned()),
                    event: Some(event),
                    ..Source::default()
                };
                let created = match (form, body.event) {
                    (true, _) => create(&app, by(Trigger::Manual), body).await,
                    (false, None) => create(&app, by(Trigger::Api), body).await,
                    (false, Some(e @ (Trigger::Manual | Trigger::Api))) => create(&app, by(e), body).await,
                    (false, Some(_)) => Err(ApiError::bad_request(
                        "invalid event: must be manual or api (pushes, pull requests and tags come from the forge)",
                    )),
                };
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
            },
        )
}

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    limit: Option<usize>,
    offset: Option<usize>,
    before: Option<i64>,
    project: Option<String>,
    branch: Option<String>,
    /// Comma separated.
    status: Option<String>,
}

impl ListQuery {
    /// The filter and page asked for; `project` from the URL wins.
    pub(super) fn filter(self, project: Option<String>) -> Result<(BuildFilter, Page)> {
        let limit = self.limit.unwrap_or(Page::default().limit);
        if !(1..=Page::MAX_LIMIT).contains(&limit) {
            return Err(ApiError::bad_request(format!(
                "limit must be 1 to {}",
                Page::MAX_LIMIT
            )));
        }
        let offset = self.offset.unwrap_or(0);
        if offset > MAX_OFFSET {
            return Err(ApiError::bad_request(format!(
                "offset must be at most {MAX_OFFSET}"
            )));
        }
        let page = Page {
            limit,
            offset,
            before: self.before.map(BuildId),
        };
        let project = project.or(self.project.filter(|p| !p.is_empty()));
        if let Some(p) = &project {
            Project::check_name(p)?;
        }
        let mut status = Vec::new();
        for s in self
            .status
            .iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            status.push(s.parse::<ci_core::BuildStatus>().map_err(|_| {
                ApiError::bad_request(format!(
                    "invalid status {s:?}: one of queued, running, success, failed, canceled"
                ))
            })?);
        }
        let filter = BuildFilter {
            project,
            branch: self.branch.filter(|b| !b.is_empty()),
            status,
        };
        Ok((filter, page))
    }
}

fn list_builds(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("api" / "builds")
        .and(warp::get())
        .and(api_auth(&app))
        .and(with_app(app))
        .and(warp::query::<ListQuery>())
        .and_then(|app: App, q: ListQuery| async move {
            let list = async {
                let (filter, page) = q.filter(None)?;
                let builds = app.store.find_builds(&filter, page).await?;
                Ok(json(&BuildList {
                    builds: views(&app, &builds).await?,
                    limit: page.limit,
                    offset: page.offset,
                }))
            };
            Ok::<_, Rejection>(respond(list.await))
        })
}

/// The API's view of `builds`, each queued step (and its build) saying
/// why it waits, if no agent could take it.
pub(super) async fn views(app: &App, builds: &[ci_core::Build]) -> Result<Vec<BuildView>> {
    let mut views: Vec<BuildView> = builds.iter().map(BuildView::from).collect();
    let labelled_waits = |v: &BuildView| {
        v.steps
            .iter()
            .any(|s| !s.labels.is_empty() && s.status == ci_core::StepStatus::Queued)
    };
    if views.iter().any(labelled_waits) {
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

impl LogQuery {
    fn follow(&self) -> bool {
        self.follow
            .as_deref()
            .is_some_and(|f| matches!(f, "1" | "true" | "yes"))
    }
}

/// `GET /api/builds/{id}/log`: the log of a build of one step.
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
            let reply = async {
                let build = find(&app, id).await?;
                let step = match build.steps.as_slice() {
                    [one] => one.clone(),
                    steps => {
                        let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
                        return Err(ApiError::bad_request(format!(
                            "build {id} has {} steps ({}): ask for one at /api/builds/{id}/steps/{{step}}/log",
                            steps.len(),
                            names.join(", ")
                        )));
                    }
                };
                step_log(app, step, q).await
            };
            Ok::<_, Rejection>(respond(reply.await))
        })
}

/// `GET /api/builds/{id}/steps/{step}/log`: one step's log, `{step}` its
/// name (percent-encoded).
fn get_step_log(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path("api")
        .and(warp::path("builds"))
        .and(build_id())
        .and(warp::path("steps"))
        .and(warp::path::param::<String>())
        .and(warp::path("log"))
        .and(warp::path::end())
        .and(warp::get())
        .and(api_auth(&app))
        .and(with_app(app))
        .and(warp::query::<LogQuery>())
        .and_then(|id: BuildId, name: String, app: App, q: LogQuery| async move {
            let reply = async {
                let build = find(&app, id).await?;
                let name = percent_encoding::percent_decode_str(&name).decode_utf8_lossy();
                let step = build.step(&name).cloned().ok_or_else(|| {
                    ApiError::new(StatusCode::NOT_FOUND, format!("build {id} has no step {name:?}"))
                })?;
                step_log(app, step, q).await
            };
            Ok::<_, Rejection>(respond(reply.await))
        })
}

async fn find(app: &App, id: BuildId) -> Result<Build> {
    Ok(app
        .store
        .build(id)
        .await?
        .ok_or(ci_core::Error::BuildNotFound(id))?)
}

async fn step_log(app: App, step: Step, q: LogQuery) -> Result<Response> {
    if q.follow() {
        return Ok(crate::follow::reply(app, step.id));
    }
    let attempt = q.attempt.map(ci_core::Attempt);
    if let Some(a) = attempt {
        if a.0 == 0 || a > step.attempt {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("step {:?} of build {} has no attempt {a}", step.name, step.build),
            ));
        }
    }
    crate::logs::json_reply(app.store.clone(), step, attempt).await
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
    let rebuild = action("rebuild")
        .and(api_auth(&app))
        .and(with_app(app.clone()))
        .and_then(|id: BuildId, app: App| async move {
            let again = rebuild(&app, id).await;
            Ok::<_, Rejection>(respond(
                again.map(|b| with_status(json(&BuildView::from(&b)), StatusCode::CREATED)),
            ))
        });
    let retry =
        action("retry")
            .and(api_auth(&app))
            .and(with_app(app))
            .and_then(|id: BuildId, app: App| async move {
                let again = app.dispatcher.retry(id).await;
                Ok::<_, Rejection>(respond(
                    again.map(|b| json(&BuildView::from(&b))).map_err(ApiError::from),
                ))
            });
    cancel.or(rebuild).unify().or(retry).unify()
}

/// The same commit again: the same command, or the pipeline file read
/// again.
async fn rebuild(app: &App, id: BuildId) -> Result<ci_core::Build> {
    let b = find(app, id).await?;
    let pipeline = b.steps.len() > 1 || b.command == app.config.pipeline_file;
    let body = CreateBuild {
        hash: b.hash,
        command: (!pipeline).then_some(b.command),
        branch: b.branch,
        image: b.image,
        timeout_ms: b.timeout_ms,
        labels: Some(b.labels),
        event: None,
        project: None,
    };
    // N.B.: the same project, steps and trust: a rebuild of a fork's pull
    // request gets no secrets either.
    let source = Source {
        event: Some(b.source.event.unwrap_or(Trigger::Manual)),
        delivery: None,
        ..b.source
    };
    create(app, source, body).await
}

/// The repository of `project`, checked against the allowed schemes.
pub(crate) fn project_repo(app: &App, project: &Project) -> Result<RepoUrl> {
    if project.name == Project::DEFAULT {
        return Ok(app.config.repo.clone());
    }
    RepoUrl::parse_with(&project.repo, &app.config.repo_schemes).map_err(|e| {
        ApiError::new(
            StatusCode::CONFLICT,
            format!("project {:?} has an unusable repository: {e}", project.name),
        )
    })
}

/// Creates a build in `source`'s project: of the command given; else of
/// the commit's pipeline file; else of the server's `BUILD_COMMAND`.
pub(crate) async fn create(app: &App, mut source: Source, body: CreateBuild) -> Result<ci_core::Build> {
    if app.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ));
    }
    Project::check_name(&source.project)?;
    let project = app
        .store
        .project(&source.project)
        .await?
        .ok_or_else(|| ci_core::Error::ProjectNotFound(source.project.clone()))?;
    let repo = project_repo(app, &project)?;
    let trigger = source.event.unwrap_or(Trigger::Api);
    let mut hash = CommitRef::parse(&body.hash)?;
    let mut branch = body.branch.filter(|b| !b.is_empty());
    let mut resolved = false;
    if let Some(resolver) = &app.resolver {
        match resolver.resolve(&repo, &hash).await {
            Ok(Some(r)) => {
                hash = r.sha;
                branch = branch.or(r.branch);
                resolved = true;
            }
            Ok(None) => {}
            Err(crate::resolve::Unresolved::NotFound(m)) => return Err(ApiError::bad_request(m)),
        }
        if resolved && source.subject.is_none() {
            if let Some(info) = resolver.commit_info(&repo, &hash).await {
                source.subject = Some(info.subject);
                source.author = Some(info.author);
            }
        }
    }
    source.tidy();
    let mut new = NewBuild {
        repo: repo.clone(),
        hash,
        branch,
        command: String::new(),
        image: body.image.filter(|i| !i.is_empty()),
        timeout_ms: body.timeout_ms.or(app.config.build_timeout_ms),
        labels: body.labels.unwrap_or_default(),
        steps: Vec::new(),
        failure: None,
        source,
    };
    if let Some(command) = body.command.filter(|c| !c.trim().is_empty()) {
        new.command = command;
        return Ok(app.dispatcher.submit(&new).await?);
    }
    let file = match (&app.resolver, resolved) {
        (Some(resolver), true) => {
            let path = &app.config.pipeline_file;
            resolver.pipeline_file(&repo, &new.hash, path).await
        }
        _ => crate::resolve::PipelineFile::Unreachable,
    };
    let path = app.config.pipeline_file.clone();
    match file {
        crate::resolve::PipelineFile::Text(text) => {
            new.command = path.clone();
            match ci_core::pipeline::parse(&text) {
                Ok(p) => {
                    let selected = p.select(new.branch.as_deref(), trigger);
                    if selected.steps.is_empty() {
                        return Err(ApiError::bad_request(format!(
                            "{path}: no step runs for this build (their `when` leaves every one out)"
                        )));
                    }
                    new.steps = selected.to_new_steps();

                    // N.B.: a step without its own timeout gets the
                    // server's, as a build of one command does.
                    for step in new.steps.iter_mut().filter(|s| s.timeout_ms.is_none()) {
                        step.timeout_ms = app.config.build_timeout_ms;
                    }
                    // N.B.: labels and images come from the file.
                    new.image = None;
                    new.labels = ci_core::Labels::default();
                }
                Err(e) if e.line == 0 => new.failure = Some(format!("{path}: {}", e.message)),
                Err(e) => new.failure = Some(format!("{path}:{e}")),
            }
        }
        crate::resolve::PipelineFile::Unusable(why) => {
            new.command = path.clone();
            new.failure = Some(format!("{path}: {why}"));
        }
        crate::resolve::PipelineFile::Absent | crate::resolve::PipelineFile::Unreachable => {
            new.command = app.config.build_command.clone().ok_or_else(|| {
                ApiError::bad_request(format!(
                    "command is required: the commit has no {path} (or the server cannot read it) \
                     and the server has no BUILD_COMMAND"
                ))
            })?;
        }
    }
    Ok(app.dispatcher.submit(&new).await?)
}
