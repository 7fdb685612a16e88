//! The ci build server: keeps builds in SQLite, queues them, hands them to
//! agents over HTTP, and watches their heartbeats.
//!
//! # Layout
//! - [`config`]: flags and environment ([`Args`]) and validated settings
//!   ([`ServerConfig`]).
//! - [`Server`]: opens the store, recovers state and serves HTTP on a
//!   listener the caller binds, until a shutdown future resolves.
//! - `api` (private): the routes, by resource: `agents` (the agent
//!   protocol), `builds`, `misc`.
//! - `guard` (private): Host, Origin and Content-Type checks before any
//!   route, and the security headers.
//! - [`listen`]: the bounded accept loop (timeouts, connection limit).
//! - `logs` (private): logs of any size, read and sent a chunk at a time.
//! - [`link`]: [`HttpLink`], delivering builds to agents.
//! - [`triggers`]: builds started by pushes (webhooks, `api::hooks`, and
//!   the [`triggers::Poller`]).
//! - `status` (private): commit statuses posted to the projects' forges.
//! - [`vault`]: projects' secrets, sealed with a key kept outside the
//!   database.
//! - [`openapi`]: the OpenAPI description, served at `/api/openapi.json`.
//! - [`metrics`]: `/metrics` in the Prometheus text format.
//! - `follow` (private): `GET /api/builds/{id}/log?follow=1`, Server-Sent Events.
//! - `ui` (private): the web pages, server-rendered HTML with a little
//!   JavaScript, embedded in the binary.
//!
//! The scheduling itself is [`ci_core::Coordinator`], owned by a
//! [`ci_core::Dispatcher`] task.
//!
//! ```no_run
//! # async fn run() -> Result<(), ci_server::Error> {
//! use ci_server::{Server, ServerConfig};
//! let config = ServerConfig::new(ci_core::RepoUrl::parse("/srv/repo.git")?, "ci.sqlite");
//! let server = Server::open(config).await?;
//! let listener = ci_server::listen::bind(([127, 0, 0, 1], 3000).into()).map_err(ci_server::Error::Io)?;
//! server.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

#![forbid(unsafe_code)]

mod api;
pub mod config;
mod connect;
mod follow;
mod guard;
pub mod link;
pub mod listen;
mod logs;
pub mod metrics;
pub mod openapi;
pub mod resolve;
mod status;
pub mod triggers;
mod ui;
pub mod vault;

use std::future::Future;
use std::sync::Arc;

use ci_core::{Coordinator, Dispatcher, Store};
use ci_store::SqliteStore;
use tokio::net::TcpListener;
use tokio::sync::watch;
use warp::Filter;

pub use api::{ApiError, MAX_BODY, MAX_RESULT_BODY};
pub use config::{Args, ServerConfig};
pub use link::HttpLink;

/// What can stop the server from starting or running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is missing or invalid.
    #[error("invalid {name}: {reason}")]
    Config {
        /// The setting, as its environment variable.
        name: &'static str,
        /// Why.
        reason: String,
    },
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] ci_store::Error),
    /// The coordinator could not recover its state.
    #[error(transparent)]
    Core(#[from] ci_core::Error),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// A socket operation failed.
    #[error(transparent)]
    Io(std::io::Error),
}

/// A ready server. See the [crate docs](crate).
pub struct Server {
    app: api::App,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.app.config)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the SQLite database named in `config` and recovers the state
    /// it holds. Must be called within a tokio runtime.
    pub async fn open(config: ServerConfig) -> Result<Server, Error> {
        let store = SqliteStore::open_with(
            &config.db_path,
            ci_store::Options {
                synchronous: config.synchronous,
                ..Default::default()
            },
        )?;
        Self::with_store(config, Arc::new(store)).await
    }

    /// A server over any store. Must be called within a tokio runtime: the
    /// dispatcher's task starts here, paused until [`Server::serve`].
    pub async fn with_store(config: ServerConfig, store: Arc<dyn Store>) -> Result<Server, Error> {
        config.check()?;
        let coordinator = Coordinator::builder(store.clone())
            .lease(config.lease)
            .build()
            .await?;
        let resolver = match &config.git_cache {
            Some(dir) => Some(Arc::new(resolve::Resolver::new(dir).map_err(|e| {
                Error::Config {
                    name: "GIT_CACHE",
                    reason: e.to_string(),
                }
            })?)),
            None => None,
        };
        let vault = Arc::new(vault::Vault::open(&config.secret_key_path())?);
        // The default project is the server's REPO.
        let default = store
            .project(ci_core::Project::DEFAULT)
            .await?
            .unwrap_or_else(ci_core::Project::default_project);
        if default.repo != config.repo.as_str() {
            store
                .update_project(&ci_core::Project {
                    repo: config.repo.as_str().to_owned(),
                    ..default
                })
                .await?;
        }
        let hub = Arc::new(connect::Hub::default());
        let http = HttpLink::new(config.dispatch_timeout, config.agent_token.clone())?
            .with_secrets(link::StepSecrets::new(store.clone(), vault.clone()));
        let link = Arc::new(connect::Links::new(http, hub.clone(), config.dispatch_timeout));
        Ok(Server {
            app: api::App::new(api::Parts {
                dispatcher: Dispatcher::spawn(coordinator, link),
                store,
                config: Arc::new(config),
                metrics: Arc::default(),
                draining: Arc::default(),
                resolver,
                vault,
                poller: Arc::default(),
                hub,
            }),
        })
    }

    /// The dispatcher, to observe or drive the coordinator in-process.
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.app.dispatcher
    }

    /// The routes, for serving elsewhere or testing without sockets.
    pub fn routes(
        &self,
    ) -> impl Filter<Extract = (impl warp::Reply,), Error = std::convert::Infallible> + Clone {
        api::routes(self.app.clone())
    }

    /// Serves HTTP on `listener` and runs the scheduling loop until
    /// `shutdown` resolves; then stops accepting, finishes requests and
    /// dispatches in flight, and returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = move |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let (metrics, mut events) = (self.app.metrics.clone(), self.app.dispatcher.subscribe());
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(e) => metrics.observe(&e),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => metrics.lagged(n),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let (draining, hub) = (self.app.draining.clone(), self.app.hub.clone());
        tokio::spawn(async move {
            shutdown.await;
            // Drain: refuse new builds, finish the requests and dispatches
            // in flight, then stop. Running builds stay running; their
            // agents report to the next server process.
            draining.store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::info!("draining");
            // Agents that connected go to the next server process.
            hub.close_all();
            let _ = stop_tx.send(true);
        });
        if let Ok(addr) = listener.local_addr() {
            // N.B.: the repository shows without credentials (RepoUrl's Display).
            tracing::info!(%addr, repo = %self.app.config.repo, "ci-server listening");
        }
        for w in self.app.config.security_warnings() {
            tracing::warn!("SECURITY: {w}");
        }
        let limits = self.app.config.limits;
        tracing::info!(
            max_connections = limits.max_connections,
            header_timeout = ?limits.header_timeout,
            "connection limits"
        );
        // N.B.: subscribed before scheduling starts, so no build's first
        // state is missed.
        tokio::spawn(status::report(self.app.clone(), self.app.dispatcher.subscribe()));
        self.app.dispatcher.start_scheduling().await?;
        tokio::spawn(triggers::poll_loop(self.app.clone(), stopped(stop_rx.clone())));
        crate::listen::serve(listener, self.routes(), limits, stopped(stop_rx)).await;
        // Requests are done: let the dispatches in flight finish, then stop.
        self.app.dispatcher.shutdown().await;
        Ok(())
    }
}
