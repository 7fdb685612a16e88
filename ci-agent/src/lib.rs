//! The ci build agent: connects to a server (or, in push mode, listens for
//! it), receives builds, checks out the commit, runs the command, sends
//! heartbeats while it runs, and delivers the result, retrying until the
//! server has it.
//!
//! # Layout
//! - [`config`]: flags and environment ([`Args`]) and validated settings
//!   ([`AgentConfig`]).
//! - [`Agent`]: the service: registration, presence, builds, heartbeats,
//!   results and the on-disk spool of undelivered results.
//! - [`client`]: calls to the server and their retry policy.
//! - [`tunnel`]: the agent's connection to its server, which carries every
//!   call both ways when it connects out ([`Agent::connect`], the default).
//! - [`Checkouts`] (from `ci-git`): per-repository caches and fresh
//!   workspaces.
//! - [`shell`]: [`ShellRunner`], `sh -c` in a process group.
//! - [`docker`]: [`DockerRunner`], a fresh container per build (bollard).
//! - [`env`](mod@env): the environment builds see (an allow-list, never the agent's).
//! - [`openapi`]: the description of the agent's HTTP interface.
//!
//! ```no_run
//! # async fn run() -> Result<(), ci_agent::Error> {
//! use std::sync::Arc;
//! use ci_agent::{Agent, AgentConfig, Checkouts, ShellRunner};
//! let config = AgentConfig::new("http://127.0.0.1:3000", "/var/lib/ci-agent");
//! let runner = ShellRunner::new(Checkouts::new(&config.work_dir)?, config.repo_schemes.clone());
//! let agent = Agent::new(config, Arc::new(runner))?;
//! // Connects out and listens on no port; `Agent::serve` takes builds
//! // pushed to a listener instead.
//! agent.connect(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod agent;
pub mod client;
pub mod config;
pub mod docker;
pub mod env;
mod live;
pub mod openapi;
pub mod shell;
pub mod tunnel;

use std::path::{Path, PathBuf};

pub use agent::Agent;
pub use ci_git::{Checkouts, Workspace};
pub use config::{AgentConfig, Args, Mode, RunnerKind};
pub use docker::{DockerRunner, DockerSettings};
pub use shell::ShellRunner;

/// What can go wrong in the agent.
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
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another agent process works in this directory.
    #[error("work directory {} is in use by another agent", .0.display())]
    WorkDirInUse(PathBuf),
    /// The commit could not be checked out.
    #[error("checkout failed: {0}")]
    Checkout(String),
    /// The build command could not be started.
    #[error("cannot start the build: {0}")]
    Spawn(String),
    /// A result could not be written to the spool.
    #[error("spool: {0}")]
    Spool(String),
    /// The Docker daemon or an image is unavailable.
    #[error("docker: {0}")]
    Docker(String),
    /// The server refused to register this agent.
    #[error("registration refused: {0}")]
    Registration(#[source] client::CallError),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

impl From<ci_git::Error> for Error {
    fn from(e: ci_git::Error) -> Error {
        match e {
            ci_git::Error::Io { path, source } => Error::Io { path, source },
            ci_git::Error::Checkout(m) | ci_git::Error::NotFound(m) | ci_git::Error::TooLarge(m) => {
                Error::Checkout(m)
            }
        }
    }
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

/// A name for this agent that survives restarts: one per work directory,
/// made on first start. Docker containers carry it as a label so that a
/// restarted agent can find and remove what its previous run left behind.
pub fn instance_id(work_dir: &Path) -> Result<String, Error> {
    let path = work_dir.join("instance");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(id.to_owned());
        }
    }
    std::fs::create_dir_all(work_dir).map_err(|e| Error::io(work_dir, e))?;
    let id = ci_core::auth::random_secret().map_err(|e| Error::io("/dev/urandom", e))?;
    let id = id[..16].to_owned();
    std::fs::write(&path, &id).map_err(|e| Error::io(&path, e))?;
    Ok(id)
}

/// The runner `config` asks for. For Docker this connects to the daemon,
/// checks the default image, and removes containers a previous run of this
/// agent left behind.
pub async fn runner_for(config: &AgentConfig) -> Result<std::sync::Arc<dyn ci_core::Runner>, Error> {
    let checkouts = Checkouts::new(&config.work_dir)?;
    match config.runner {
        RunnerKind::Shell => Ok(std::sync::Arc::new(ShellRunner::new(
            checkouts,
            config.repo_schemes.clone(),
        ))),
        RunnerKind::Docker => {
            let instance = instance_id(&config.work_dir)?;
            let runner = DockerRunner::connect(
                checkouts,
                config.repo_schemes.clone(),
                config.docker.clone(),
                instance,
            )
            .await?;
            runner.check_default_image().await?;
            let removed = runner.remove_orphans().await? + runner.reap_abandoned().await?;
            if removed > 0 {
                tracing::warn!(removed, "removed build containers left behind by dead agents");
            }
            Ok(std::sync::Arc::new(runner))
        }
    }
}

impl From<Error> for ci_core::RunError {
    /// What a runner's own failure means for the build: a checkout that
    /// fails fails the build wherever it goes; the machinery failing
    /// (the container engine, starting a process, the disk) hands the
    /// attempt back for another agent.
    fn from(e: Error) -> ci_core::RunError {
        match e {
            Error::Checkout(_) | Error::Config { .. } => ci_core::RunError::Setup(e.to_string()),
            _ => ci_core::RunError::Infra(e.to_string()),
        }
    }
}
