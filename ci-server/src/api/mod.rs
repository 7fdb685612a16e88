//! HTTP routes: the agent protocol and the public JSON API.
//!
//! Filters only extract and validate; async handlers call the
//! [`Dispatcher`] (or its [`Fence`](ci_core::Fence)) or read the store;
//! [`recover`] turns every rejection into a JSON error with a fitting
//! status, so no request ever gets an HTML error page or a 500 for bad
//! input.
//!
//! - `agents`: the agent protocol (`/notify_*`).
//! - `builds`: the build API (`/api/builds`, and the original form's
//!   `POST /build`).
//! - `projects`: `/api/projects`, their builds and secrets.
//! - `hooks`: the forges' webhooks, `/hooks/{github,gitea,gitlab}`.
//! - `misc`: agents list, metrics, health, the OpenAPI document, 405s.

pub(crate) mod agents;
mod builds;
mod hooks;
mod misc;
mod projects;

pub(crate) use builds::{create as create_build, project_repo};

use std::convert::Infallible;
use std::sync::Arc;

use ci_core::protocol::ErrorBody;
use ci_core::{Dispatcher, Store};
use warp::http::StatusCode;
use warp::reply::{json, with_status, Response};
use warp::{Filter, Rejection, Reply};

use crate::config::ServerConfig;

pub use ci_core::protocol::limits::{MAX_BODY, MAX_RESULT_BODY};
pub(crate) use misc::agent_views;

/// Largest `offset` of a listing (SQLite takes a signed 64-bit offset).
pub const MAX_OFFSET: usize = i64::MAX as usize;

/// What every handler needs: one `Arc`, because every request clones it
/// once per filter that takes it.
#[derive(Clone)]
pub(crate) struct App(Arc<Parts>);

impl App {
    pub(crate) fn new(parts: Parts) -> App {
        App(Arc::new(parts))
    }
}

impl std::ops::Deref for App {
    type Target = Parts;

    fn deref(&self) -> &Parts {
        &self.0
    }
}

/// The parts of an [`App`].
pub(crate) struct Parts {
    pub dispatcher: Dispatcher,
    pub store: Arc<dyn Store>,
    pub config: Arc<ServerConfig>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Set when shutting down: no new builds.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Resolves refs to full SHAs; none: refs stay as given.
    pub resolver: Option<Arc<crate::resolve::Resolver>>,
    /// Seals and opens projects' secrets.
    pub vault: Arc<crate::vault::Vault>,
    /// Watches the projects' remotes.
    pub poller: Arc<crate::triggers::Poller>,
    /// The connections of agents that connected out.
    pub hub: Arc<crate::connect::Hub>,
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

    /// What it says.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl warp::reject::Reject for ApiError {}

impl From<ci_core::Error> for ApiError {
    fn from(e: ci_core::Error) -> ApiError {
        use ci_core::Error as E;
        let status = match &e {
            E::Invalid { .. } => StatusCode::BAD_REQUEST,
            E::BuildNotFound(_)
            | E::StepNotFound(_)
            | E::AgentNotFound(_)
            | E::ProjectNotFound(_)
            | E::NotRunning { .. } => StatusCode::NOT_FOUND,
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

pub(crate) type Result<T, E = ApiError> = std::result::Result<T, E>;

/// A handler's answer as a response, its error as a JSON error.
pub(crate) fn respond<T: Reply>(r: Result<T>) -> Response {
    match r {
        Ok(reply) => reply.into_response(),
        Err(e) => e.into_response(),
    }
}

/// Every route, with errors recovered into JSON.
pub(crate) fn routes(app: App) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let guard = crate::guard::guard(app.config.clone());
    let served = agents::routes(app.clone())
        .or(crate::connect::route(app.clone()))
        .unify()
        .or(builds::routes(app.clone()))
        .unify()
        .or(projects::routes(app.clone()))
        .unify()
        .or(hooks::routes(app.clone()))
        .unify()
        .or(misc::routes(app.clone()))
        .unify()
        .or(crate::ui::routes(app))
        .unify()
        .or(misc::wrong_method())
        .unify();
    guard
        .and(served)
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

pub(crate) fn api_auth(app: &App) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    bearer(app.config.api_token.clone(), "API_TOKEN")
}

fn json_body<T: serde::de::DeserializeOwned + Send>(
    limit: u64,
) -> impl Filter<Extract = (T,), Error = Rejection> + Clone {
    warp::body::content_length_limit(limit).and(warp::body::json())
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
