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
//!   ([`CommitRef`], [`RepoUrl`]) they are made of.
//! - [`protocol`]: the JSON wire types shared by server, agents and clients.
//! - [`store`]: the [`BuildStore`] trait and [`MemoryStore`].
//! - [`pool`]: the [`AgentPool`] trait and [`MemoryAgentPool`].
//! - [`scheduler`]: the [`Scheduler`] policy trait and [`Fifo`].
//! - [`lease`], [`backoff`], [`clock`]: heartbeat leases, retry delays, time.
//! - [`coordinator`]: the lifecycle state machine, [`Coordinator`].
//! - [`dispatcher`]: runs a coordinator in async code, [`Dispatcher`].
//! - [`runner`]: the [`Runner`] trait that actually runs builds.
//! - [`local`]: [`LocalCluster`], an embedded coordinator with in-process
//!   workers.
//!
//! # Embedding
//! Run builds with your own runner and an in-memory store:
//!
//! ```
//! use std::sync::Arc;
//! use ci_core::{
//!     async_trait, CommitRef, Coordinator, Job, LocalCluster, LogSink, MemoryStore,
//!     NewBuild, RepoUrl, Runner, Stream, BuildStatus,
//! };
//!
//! struct Echo;
//!
//! #[async_trait]
//! impl Runner for Echo {
//!     async fn run(&self, job: &Job, log: &LogSink) -> ci_core::Result<i32> {
//!         log.write(Stream::Stdout, format!("building {}\n", job.hash).as_bytes());
//!         Ok(if job.command == "fail" { 1 } else { 0 })
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ci_core::Result<()> {
//! let coordinator = Coordinator::builder(Arc::new(MemoryStore::new())).build()?;
//! let cluster = LocalCluster::start(coordinator, vec![Arc::new(Echo), Arc::new(Echo)])?;
//!
//! let repo = RepoUrl::parse("file:///srv/repo.git")?;
//! let ok = cluster.submit(&NewBuild::new(repo.clone(), CommitRef::parse("a1b2c3d")?, "make")?)?;
//! let bad = cluster.submit(&NewBuild::new(repo, CommitRef::parse("main")?, "fail")?)?;
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
pub mod lease;
pub mod local;
pub mod model;
pub mod pool;
pub mod process;
pub mod protocol;
pub mod runner;
pub mod scheduler;
pub mod store;

pub use async_trait::async_trait;
pub use backoff::Backoff;
pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use coordinator::{
    Accepted, Cancel, Coordinator, Dispatch, DispatchFailure, Event, Heartbeat, Report, StopOrder,
};
pub use dispatcher::{AgentLink, Dispatcher};
pub use error::{Error, Result};
pub use lease::{Lease, LeasePolicy};
pub use local::LocalCluster;
pub use model::{
    AgentId, AgentRecord, Attempt, Build, BuildId, BuildLog, BuildStatus, CommitRef, Completion, LogInfo,
    LogPiece, NewBuild, Page, RepoUrl,
};
pub use pool::{Agent, AgentPool, MemoryAgentPool};
pub use runner::{execute, Job, LogSink, Runner, Stream};
pub use scheduler::{Assignment, Fifo, Scheduler};
pub use store::{BuildStore, MemoryStore};
