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
        .or(delete_agent(app.clone()))
        .unify()
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

/// `DELETE /api/agents/{id}`: revokes the agent's own credential (so it
/// cannot connect again), closes its connection and drops it; its builds
/// go back to the queue at once. An agent the server pushes builds to is
/// dropped (it may register again with the agent token).
fn delete_agent(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("api" / "agents" / i64)
        .and(warp::delete())
        .and(api_auth(&app))
        .and(with_app(app))
        .and_then(|id: i64, app: App| async move {
            let answer = async {
                let id = ci_core::AgentId(id);
                if !app.dispatcher.agents().await?.iter().any(|a| a.id == id) {
                    return Err(ApiError::new(
                        warp::http::StatusCode::NOT_FOUND,
                        format!("no agent has id {id}"),
                    ));
                }
                // N.B.: revoked first, so that it cannot connect again
                // between its connection closing and the revocation.
                let credential = app.hub.describe(id).and_then(|(_, _, c)| c);
                if let Some(c) = credential {
                    let now = ci_core::Clock::now(&ci_core::SystemClock::new());
                    app.store.revoke_credential(c, now).await?;
                }
                app.hub.close(id);
                app.dispatcher.agent_disconnected(id).await?;
                tracing::warn!(agent = %id, credential = ?credential, "agent removed by the API");
                Ok(json(
                    &serde_json::json!({ "id": id, "removed": true, "revoked": credential }),
                ))
            };
            Ok::<_, Rejection>(respond(answer.await))
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
        let mut view = AgentView::with_builds(&a, builds);
        if let Some((remote, version, credential)) = app.hub.describe(a.id) {
            view.connected = true;
            view.address = remote.map(|r| r.ip().to_string());
            view.version = version;
            view.credential = credential;
        }
        views.push(view);
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
                    connections: app.hub.open(),
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
