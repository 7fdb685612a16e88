//! The core of a distributed CI system: builds, agents, scheduling, leases,
//! fencing and retries, with no HTTP server and no database.
//!
//! A build is queued, dispatched to a free agent as a numbered *attempt*,
//! kept alive by heartbeats, and finished by exactly one accepted result.
//! An agent that stops sending heartbeats loses its lease and its build goes
//! back to the queue as a new attempt; a late result from the old attempt is
//! refused. Everything here is driven by events and an injected [`Clock`],
//! so it can be tested, simulated and embedded without I/O.
//!
//! # Layout
//! - [`model`]: builds, attempts, agents and the validated values
//!   ([`CommitRef`], [`RepoUrl`], [`ImageRef`], [`Labels`]) they are made
//!   of.
//! - [`pipeline`]: the `.ci.yml` a repository carries, parsed under
//!   limits, checked and expanded into steps.
//! - [`protocol`]: the JSON wire types shared by server, agents and
//!   clients, with their size limits.
//! - [`store`]: persistence, async and split by concern ([`Queue`] with
//!   the leases, [`Logs`], [`Builds`], [`Agents`]), [`MemoryStore`], and the
//!   conformance suite every store passes.
//! - [`project`]: projects, where builds come from ([`Source`]), and
//!   the names of their secrets.
//! - [`pool`]: the [`AgentPool`] registry, in memory and store-backed.
//! - [`scheduler`]: the [`Scheduler`] policy trait and [`Fifo`].
//! - [`coordinator`]: the lifecycle, [`Coordinator`], and the [`Fence`]
//!   that heartbeats and live output go through.
//! - [`dispatcher`]: the one task that owns a coordinator, [`Dispatcher`],
//!   and the [`AgentLink`] it delivers through.
//! - [`runner`]: the [`Runner`] trait that actually runs builds, [`Job`],
//!   [`RunError`], [`LogSink`].
//! - [`heartbeat`], [`retry`]: the loops every agent runs.
//! - [`lease`], [`backoff`], [`clock`], [`auth`]: lease policy, retry
//!   delays, time, secrets.
//! - [`mask`]: secrets masked in output that arrives in pieces.
//! - [`local`]: [`LocalCluster`], a coordinator with in-process workers.
//!
//! # Embedding
//! Run builds with your own runner and an in-memory store:
//!
//! ```
//! use std::sync::Arc;
//! use ci_core::{
//!     async_trait, BuildStatus, CommitRef, Coordinator, Job, LocalCluster, LogSink, MemoryStore,
//!     NewBuild, RepoUrl, RunError, Runner, Stream,
//! };
//!
//! struct Echo;
//!
//! #[async_trait]
//! impl Runner for Echo {
//!     async fn run(&self, job: &Job, log: &LogSink) -> Result<i32, RunError> {
//!         log.write(Stream::Stdout, format!("building {}\n", job.commit).as_bytes());
//!         Ok(if job.command == "fail" { 1 } else { 0 })
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ci_core::Result<()> {
//! let coordinator = Coordinator::builder(Arc::new(MemoryStore::new())).build().await?;
//! let cluster = LocalCluster::start(coordinator, vec![Arc::new(Echo), Arc::new(Echo)]).await?;
//!
//! let repo = RepoUrl::parse("file:///srv/repo.git")?;
//! let ok = cluster.submit(&NewBuild::new(repo.clone(), CommitRef::parse("a1b2c3d")?, "make")?).await?;
//! let bad = cluster.submit(&NewBuild::new(repo, CommitRef::parse("main")?, "fail")?).await?;
//!
//! assert_eq!(cluster.wait(ok.id).await?.status, BuildStatus::Success);
//! assert_eq!(cluster.wait(bad.id).await?.status, BuildStatus::Failed);
//! cluster.shutdown().await;
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod auth;
pub mod backoff;
pub mod clock;
pub mod coordinator;
pub mod dispatcher;
pub mod error;
pub mod heartbeat;
pub mod lease;
pub mod local;
pub mod mask;
pub mod model;
pub mod pipeline;
pub mod pool;
#[cfg(feature = "cli")]
pub mod process;
pub mod project;
pub mod protocol;
pub mod retry;
pub mod runner;
pub mod scheduler;
pub mod store;

pub use async_trait::async_trait;
pub use backoff::Backoff;
pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use coordinator::{
    Accepted, Cancel, Coordinator, Dispatch, DispatchFailure, Event, Fence, HandBack, Heartbeat, Report,
    StopOrder, Stopped,
};
pub use dispatcher::{AgentLink, Dispatcher};
pub use error::{Error, Result};
pub use lease::LeasePolicy;
pub use local::LocalCluster;
pub use model::{
    AgentId, AgentRecord, Attempt, Build, BuildId, BuildLog, BuildStatus, CommitRef, Completion, Credential,
    DispatchId, ImageRef, Labels, LogInfo, LogPiece, NewBuild, NewStep, Page, RepoUrl, Step, StepId,
    StepStatus,
};
pub use pool::{Agent, AgentPool, Enrollment, MemoryAgentPool, Offer, StoreAgentPool};
pub use project::{Forge, ForgeKind, Project, SecretName, Source};
pub use runner::{execute, Job, LogSink, Outcome, RunError, Runner, Stream};
pub use scheduler::{Assignment, Fifo, Scheduler};
pub use store::{Agents, BuildFilter, Builds, Lease, Logs, MemoryStore, Projects, Queue, Requeue, Store};
