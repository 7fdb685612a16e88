//! The project API: `/api/projects` (create, list), `/api/projects/{name}`
//! (show, change, delete), its builds (`/builds`, `/builds/{number}`) and
//! its secrets (`/secrets`, write-only values).

use ci_core::pipeline::Trigger;
use ci_core::protocol::{
    BranchStatus, BuildList, BuildView, CreateBuild, ForgeView, ProjectList, ProjectSpec, ProjectView,
    SecretEntry, SecretList, SecretSpec,
};
use ci_core::store::BuildFilter;
use ci_core::{Forge, Page, Project, SecretName, Source, Timestamp};
use warp::http::StatusCode;
use warp::reply::{json, with_status, Response};
use warp::{Filter, Rejection};

use super::{api_auth, json_body, respond, with_app, ApiError, App, Result, MAX_BODY};

/// The project API's routes.
pub(super) fn routes(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let base = || warp::path("api").and(warp::path("projects"));
    let name = || {
        warp::path::param::<String>().and_then(|s: String| async move {
            let s = percent_encoding::percent_decode_str(&s)
                .decode_utf8_lossy()
                .into_owned();
            Project::check_name(&s)
                .map(|()| s)
                .map_err(|e| warp::reject::custom(ApiError::from(e)))
        })
    };
    let auth = || api_auth(&app).and(with_app(app.clone()));

    let create = base()
        .and(warp::path::end())
        .and(warp::post())
        .and(auth())
        .and(json_body::<ProjectSpec>(MAX_BODY))
        .and_then(|app: App, spec: ProjectSpec| async move {
            let made = create_project(&app, spec).await;
            Ok::<_, Rejection>(respond(made.map(|v| with_status(json(&v), StatusCode::CREATED))))
        });
    let list = base()
        .and(warp::path::end())
        .and(warp::get())
        .and(auth())
        .and_then(|app: App| async move {
            let all = async {
                let mut projects = Vec::new();
                for p in app.store.projects().await? {
                    projects.push(view(&app, &p, false).await?);
                }
                Ok(json(&ProjectList { projects }))
            };
            Ok::<_, Rejection>(respond(all.await))
        });
    let show = base()
        .and(name())
        .and(warp::path::end())
        .and(warp::get())
        .and(auth())
        .and_then(|name: String, app: App| async move {
            let found = async {
                let p = find(&app, &name).await?;
                Ok(json(&view(&app, &p, true).await?))
            };
            Ok::<_, Rejection>(respond(found.await))
        });
    let change = base()
        .and(name())
        .and(warp::path::end())
        .and(warp::patch())
        .and(auth())
        .and(json_body::<ProjectSpec>(MAX_BODY))
        .and_then(|name: String, app: App, spec: ProjectSpec| async move {
            let changed = async {
                let p = update_project(&app, &name, spec).await?;
                Ok(json(&view(&app, &p, false).await?))
            };
            Ok::<_, Rejection>(respond(changed.await))
        });
    let delete = base()
        .and(name())
        .and(warp::path::end())
        .and(warp::delete())
        .and(auth())
        .and_then(|name: String, app: App| async move {
            let gone = async {
                if app.store.delete_project(&name).await? {
                    Ok(StatusCode::NO_CONTENT)
                } else {
                    Err(ci_core::Error::ProjectNotFound(name).into())
                }
            };
            Ok::<_, Rejection>(respond(gone.await))
        });
    let list_builds = base()
        .and(name())
        .and(warp::path("builds"))
        .and(warp::path::end())
        .and(warp::get())
        .and(auth())
        .and(warp::query::<super::builds::ListQuery>())
        .and_then(|name: String, app: App, q: super::builds::ListQuery| async move {
            let list = async {
                find(&app, &name).await?;
                let (filter, page) = q.filter(Some(name))?;
                let builds = app.store.find_builds(&filter, page).await?;
                Ok(json(&BuildList {
                    builds: super::builds::views(&app, &builds).await?,
                    limit: page.limit,
                    offset: page.offset,
                }))
            };
            Ok::<_, Rejection>(respond(list.await))
        });
    let create_build = base()
        .and(name())
        .and(warp::path("builds"))
        .and(warp::path::end())
        .and(warp::post())
        .and(auth())
        .and(json_body::<CreateBuild>(MAX_BODY))
        .and_then(|name: String, app: App, body: CreateBuild| async move {
            let made = async {
                let event = match body.event {
                    None => Trigger::Api,
                    Some(e @ (Trigger::Manual | Trigger::Api)) => e,
                    Some(_) => return Err(ApiError::bad_request("invalid event: must be manual or api")),
                };
                if body.project.as_ref().is_some_and(|p| p != &name) {
                    return Err(ApiError::bad_request(
                        "project in the body differs from the URL's",
                    ));
                }
                let source = Source {
                    project: name,
                    event: Some(event),
                    ..Source::default()
                };
                super::builds::create(&app, source, body).await
            };
            Ok::<_, Rejection>(respond(
                made.await
                    .map(|b| with_status(json(&BuildView::from(&b)), StatusCode::CREATED)),
            ))
        });
    let by_number = base()
        .and(name())
        .and(warp::path("builds"))
        .and(warp::path::param::<u64>())
        .and(warp::path::end())
        .and(warp::get())
        .and(auth())
        .and_then(|name: String, number: u64, app: App| async move {
            let found = async {
                let b = app.store.build_by_number(&name, number).await?.ok_or_else(|| {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        format!("project {name:?} has no build {number}"),
                    )
                })?;
                let mut v = super::builds::views(&app, std::slice::from_ref(&b)).await?;
                Ok(json(&v.pop()))
            };
            Ok::<_, Rejection>(respond(found.await))
        });
    let secrets = base().and(name()).and(warp::path("secrets"));
    let list_secrets = secrets
        .and(warp::path::end())
        .and(warp::get())
        .and(auth())
        .and_then(|name: String, app: App| async move {
            let list = async {
                find(&app, &name).await?;
                let secrets = app
                    .store
                    .secret_names(&name)
                    .await?
                    .into_iter()
                    .filter(|(n, _)| SecretName::check(n).is_ok())
                    .map(|(name, at)| SecretEntry {
                        name,
                        updated_at: at.to_rfc3339(),
                    })
                    .collect();
                Ok(json(&SecretList { secrets }))
            };
            Ok::<_, Rejection>(respond(list.await))
        });
    let put_secret = base()
        .and(name())
        .and(warp::path("secrets"))
        .and(warp::path::end())
        .and(warp::post())
        .and(auth())
        .and(json_body::<SecretSpec>(MAX_BODY))
        .and_then(|name: String, app: App, spec: SecretSpec| async move {
            let put = async {
                find(&app, &name).await?;
                SecretName::check(&spec.name)?;
                if spec.value.is_empty()
                    || spec.value.len() > SecretName::MAX_VALUE
                    || spec.value.contains('\0')
                {
                    return Err(ApiError::bad_request(format!(
                        "value: 1 to {} bytes without NUL",
                        SecretName::MAX_VALUE
                    )));
                }
                seal_into(&app, &name, &spec.name, &spec.value).await?;
                let entry = SecretEntry {
                    name: spec.name,
                    updated_at: now(&app).to_rfc3339(),
                };
                Ok(with_status(json(&entry), StatusCode::CREATED))
            };
            Ok::<_, Rejection>(respond(put.await))
        });
    let delete_secret = base()
        .and(name())
        .and(warp::path("secrets"))
        .and(warp::path::param::<String>())
        .and(warp::path::end())
        .and(warp::delete())
        .and(auth())
        .and_then(|name: String, secret: String, app: App| async move {
            let gone = async {
                find(&app, &name).await?;
                SecretName::check(&secret)?;
                if app.store.delete_secret(&name, &secret).await? {
                    Ok(StatusCode::NO_CONTENT)
                } else {
                    Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        format!("project {name:?} has no secret {secret}"),
                    ))
                }
            };
            Ok::<_, Rejection>(respond(gone.await))
        });
    create
        .or(list)
        .unify()
        .or(show)
        .unify()
        .or(change)
        .unify()
        .or(delete)
        .unify()
        .or(list_builds)
        .unify()
        .or(create_build)
        .unify()
        .or(by_number)
        .unify()
        .or(list_secrets)
        .unify()
        .or(put_secret)
        .unify()
        .or(delete_secret)
        .unify()
}

fn now(app: &App) -> Timestamp {
    use ci_core::Clock;
    let _ = app;
    ci_core::SystemClock::new().now()
}

async fn find(app: &App, name: &str) -> Result<Project> {
    Ok(app
        .store
        .project(name)
        .await?
        .ok_or_else(|| ci_core::Error::ProjectNotFound(name.to_owned()))?)
}

/// Seals `value` as the secret `secret` of `project`.
pub(crate) async fn seal_into(app: &App, project: &str, secret: &str, value: &str) -> Result<()> {
    let sealed = app.vault.seal(project, secret, value.as_bytes()).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot seal the secret: {e}"),
        )
    })?;
    app.store.put_secret(project, secret, &sealed, now(app)).await?;
    Ok(())
}

/// The API's view of a project; with each branch's latest build if
/// `branches`.
async fn view(app: &App, p: &Project, branches: bool) -> Result<ProjectView> {
    let names = app.store.secret_names(&p.name).await?;
    let has = |n: &str| names.iter().any(|(name, _)| name == n);
    let mut last_builds: Vec<BranchStatus> = Vec::new();
    if branches {
        let filter = BuildFilter {
            project: Some(p.name.clone()),
            ..BuildFilter::default()
        };
        let page = Page {
            limit: Page::MAX_LIMIT,
            ..Page::default()
        };
        for b in app.store.find_builds(&filter, page).await? {
            let Some(branch) = b.branch.clone() else { continue };
            if last_builds.iter().any(|s| s.branch == branch) {
                continue;
            }
            last_builds.push(BranchStatus {
                branch,
                id: b.id,
                number: b.number,
                status: b.status,
                hash: b.hash.clone(),
                created_at: b.created_at.to_rfc3339(),
            });
        }
    }
    Ok(ProjectView {
        name: p.name.clone(),
        repo: ci_core::model::redact_url(&p.repo).into_owned(),
        default_branch: p.default_branch.clone(),
        poll_interval: p.poll_interval_s,
        branches: p.branches.clone(),
        cancel_previous: p.cancel_previous,
        webhook_secret: has(SecretName::WEBHOOK),
        forge: p.forge.as_ref().map(|f| ForgeView {
            kind: f.kind,
            url: f.url.clone(),
            repo: f.repo.clone(),
            token: has(SecretName::FORGE_TOKEN),
        }),
        created_at: p.created_at.to_rfc3339(),
        last_builds,
    })
}

/// `spec`'s settings applied to `p`, checked; the secrets it sets, to
/// seal once the project is stored.
fn apply(app: &App, p: &mut Project, spec: ProjectSpec) -> Result<Vec<(&'static str, Option<String>)>> {
    let mut secrets = Vec::new();
    if let Some(repo) = spec.repo {
        if p.name == Project::DEFAULT {
            return Err(ApiError::bad_request(
                "the default project's repository is the server's REPO setting",
            ));
        }
        ci_core::RepoUrl::parse_with(&repo, &app.config.repo_schemes)?;
        p.repo = repo;
    }
    if let Some(b) = spec.default_branch {
        p.default_branch = b;
    }
    if let Some(i) = spec.poll_interval {
        p.poll_interval_s = i;
    }
    if let Some(b) = spec.branches {
        p.branches = b;
    }
    if let Some(c) = spec.cancel_previous {
        p.cancel_previous = c;
    }
    if let Some(secret) = spec.webhook_secret {
        if secret.len() > SecretName::MAX_VALUE || secret.contains('\0') {
            return Err(ApiError::bad_request("webhookSecret: too long, or holds NUL"));
        }
        secrets.push((SecretName::WEBHOOK, (!secret.is_empty()).then_some(secret)));
    }
    match spec.forge {
        None => {}
        Some(None) => {
            p.forge = None;
            secrets.push((SecretName::FORGE_TOKEN, None));
        }
        Some(Some(f)) => {
            p.forge = Some(Forge {
                kind: f.kind,
                url: f.url.trim_end_matches('/').to_owned(),
                repo: f.repo,
            });
            if let Some(token) = f.token {
                if token.len() > SecretName::MAX_VALUE || !token.chars().all(|c| c.is_ascii_graphic()) {
                    return Err(ApiError::bad_request(
                        "forge.token: printable ASCII without spaces",
                    ));
                }
                secrets.push((SecretName::FORGE_TOKEN, (!token.is_empty()).then_some(token)));
            }
        }
    }
    p.validate()?;
    Ok(secrets)
}

async fn store_secrets(app: &App, project: &str, secrets: Vec<(&'static str, Option<String>)>) -> Result<()> {
    for (name, value) in secrets {
        match value {
            Some(v) => seal_into(app, project, name, &v).await?,
            None => {
                app.store.delete_secret(project, name).await?;
            }
        }
    }
    Ok(())
}

async fn create_project(app: &App, mut spec: ProjectSpec) -> Result<ProjectView> {
    let name = spec
        .name
        .take()
        .ok_or_else(|| ApiError::bad_request("name is required"))?;
    Project::check_name(&name)?;
    if spec.repo.is_none() {
        return Err(ApiError::bad_request("repo is required"));
    }
    let mut p = Project::new(name, "");
    let secrets = apply(app, &mut p, spec)?;
    let p = app.store.create_project(&p, now(app)).await?;
    store_secrets(app, &p.name, secrets).await?;
    app.poller.wake();
    view(app, &p, false).await
}

async fn update_project(app: &App, name: &str, mut spec: ProjectSpec) -> Result<Project> {
    if spec.name.take().is_some_and(|n| n != name) {
        return Err(ApiError::bad_request("a project cannot be renamed"));
    }
    let mut p = find(app, name).await?;
    let secrets = apply(app, &mut p, spec)?;
    let p = app.store.update_project(&p).await?;
    store_secrets(app, &p.name, secrets).await?;
    app.poller.wake();
    Ok(p)
}
