//! The rest: the agents list, metrics, health, the OpenAPI document, and
//! 405 for a known path with a method it does not serve.

use ci_core::protocol::AgentView;
use warp::http::StatusCode;
use warp::reply::{json, Response};
use warp::{Filter, Rejection, Reply};

use super::{api_auth, respond, with_app, ApiError, App, Result};

/// The routes of this module but `wrong_method`, which goes last.
pub(super) fn routes(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    list_agents(app.clone())
        .or(metrics(app))
        .unify()
        .or(healthz())
        .unify()
}

fn list_agents(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("api" / "agents")
        .and(warp::get())
        .and(api_auth(&app))
        .and(with_app(app))
        .and_then(|app: App| async move {
            let agents = async { Ok(json(&agent_views(&app).await?)) };
            Ok::<_, Rejection>(respond(agents.await))
        })
}

/// Every agent, with the builds of the steps it runs.
pub(crate) async fn agent_views(app: &App) -> Result<Vec<AgentView>> {
    let mut views = Vec::new();
    for a in app.dispatcher.agents().await? {
        let mut builds = Vec::with_capacity(a.running.len());
        for step in &a.running {
            if let Some(s) = app.store.step(*step).await? {
                builds.push(s.build);
            }
        }
        views.push(AgentView::with_builds(&a, builds));
    }
    Ok(views)
}

fn metrics(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("metrics")
        .and(warp::get())
        .and(with_app(app))
        .and_then(|app: App| async move {
            let snapshot = async {
                let store = app.store.clone();
                let builds = app
                    .metrics
                    .build_counts(|| async move { store.status_counts().await })
                    .await?;
                let agents = app.dispatcher.agents().await?;
                let idle = agents.iter().filter(|a| a.is_idle()).count() as u64;
                Ok::<_, ApiError>(crate::metrics::Snapshot {
                    builds,
                    idle,
                    busy: agents.len() as u64 - idle,
                })
            };
            let reply: Result<Response> = snapshot.await.map(|now| {
                warp::reply::with_header(
                    app.metrics.render(&now),
                    "content-type",
                    "text/plain; version=0.0.4; charset=utf-8",
                )
                .into_response()
            });
            Ok::<_, Rejection>(respond(reply))
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
pub(super) fn wrong_method() -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
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
