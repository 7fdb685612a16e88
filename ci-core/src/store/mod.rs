//! Persistence, split by concern, and async: the queue and its leases
//! ([`Queue`]), live and final logs ([`Logs`]), the read side of the API
//! ([`Builds`]), and the agents' records ([`Agents`]). A [`Store`] is all
//! four. [`MemoryStore`] is the reference implementation, [`FaultyStore`]
//! one that fails when told to (for tests); `ci-store` provides SQLite.
//!
//! Every method is one atomic step: it happens entirely or not at all, and
//! once it returns `Ok` it is durable as far as the implementation promises.
//! The state-changing methods are *fenced*: they take the attempt they
//! expect and do nothing (returning `false`, or an error saying why) if the
//! build moved on.
//!
//! **Leases live here**, as a deadline on each running attempt, so that a
//! restarted server, or a second one, sees them: [`Queue::start`] grants
//! them, [`Queue::renew`] (a heartbeat) extends them, [`Queue::lapsed`]
//! finds the expired ones.

use async_trait::async_trait;

use crate::clock::Timestamp;
use crate::error::Result;
use crate::model::{
    AgentId, AgentRecord, Attempt, Build, BuildId, BuildLog, BuildStatus, Completion, Credential, Labels,
    LogInfo, LogPiece, Moved, NewBuild, Page, Step, StepId,
};
use crate::pool::Enrollment;
use crate::project::Project;
use crate::runner::Stream;

mod faulty;
mod memory;

#[cfg(any(test, feature = "test-support"))]
pub mod conformance;

pub use faulty::{FaultyStore, Op};
pub use memory::{assemble, refuse_renewal, MemoryStore, Taken};

/// Which builds a listing shows. Each field given narrows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildFilter {
    /// Only this project's.
    pub project: Option<String>,
    /// Only builds of this branch.
    pub branch: Option<String>,
    /// Only builds in one of these states.
    pub status: Vec<BuildStatus>,
}

impl BuildFilter {
    /// True if `build` passes.
    pub fn passes(&self, build: &Build) -> bool {
        self.project.as_ref().is_none_or(|p| &build.source.project == p)
            && self
                .branch
                .as_ref()
                .is_none_or(|b| build.branch.as_ref() == Some(b))
            && (self.status.is_empty() || self.status.contains(&build.status))
    }
}

/// A running attempt's hold on its step.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The step.
    pub step: StepId,
    /// The attempt that holds it.
    pub attempt: Attempt,
    /// The agent running the attempt.
    pub agent: AgentId,
    /// When the lease lapses unless renewed.
    pub expires_at: Timestamp,
}

impl Lease {
    /// True if the lease has lapsed at `now`.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        now >= self.expires_at
    }
}

/// Why a running step goes back to the queue.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Requeue {
    /// Its agent died, fell silent or could not be reached, or is unknown
    /// to a restarted server: the attempt may have run, in part.
    Lost,
    /// Its agent gave it back unrun, or on purpose: busy, its machinery
    /// failed, it is shutting down. Never spends a retry.
    Returned,
}

impl Requeue {
    /// The line a step failed by [`Requeue::Lost`] ends its log with.
    pub const LOST_LINE: &'static str =
        "ci: the step's agent was lost, and its retry (on: agent_lost) has no re-run left\n";
}

/// A queued step to start on an agent, with its first lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The step.
    pub step: StepId,
    /// The agent.
    pub agent: AgentId,
    /// The agent's URL, kept on the step after the agent is gone.
    pub agent_url: String,
    /// Until when the new attempt holds the build without a heartbeat.
    pub lease_until: Timestamp,
}

/// The queue: builds and their steps from creation to their end, attempts
/// and leases. Steps are what is queued, started, leased and finished; a
/// build ends when its last step does.
#[async_trait]
pub trait Queue: Send + Sync {
    /// Stores a new build and its steps ([`NewBuild::plan`]) and gives each
    /// the next, never used, number, and the build the next number of its
    /// project. Refused: a project that does not exist
    /// ([`ProjectNotFound`](crate::Error::ProjectNotFound)), a webhook
    /// delivery that already made a build ([`Conflict`](crate::Error::Conflict)). Steps without dependencies are queued,
    /// the others pending.
    async fn create_build(&self, new: &NewBuild, now: Timestamp) -> Result<Build>;

    /// Up to `limit` queued steps, oldest first.
    async fn queued(&self, limit: usize) -> Result<Vec<Step>>;

    /// The distinct label sets the queued steps ask for.
    async fn queued_label_sets(&self) -> Result<Vec<Labels>>;

    /// Up to `limit` queued steps asking for exactly `labels`, oldest
    /// first: the queue by label set, so that a step a free agent can take
    /// is found however many steps no free agent can take are before it.
    async fn queued_with(&self, labels: &Labels, limit: usize) -> Result<Vec<Step>>;

    /// Starts the claimed steps, all in one step: each that is still
    /// queued becomes running as its next attempt, on its agent, leased
    /// until the claim's deadline; one that is not queued any more is
    /// skipped. Returns the steps started. A failure starts none, so no
    /// attempt is ever left running that nobody was told of.
    async fn start(&self, claims: &[Claim], now: Timestamp) -> Result<Vec<Step>>;

    /// A heartbeat: extends the lease of the running attempt of `id` to
    /// `until`. `attempt` and `agent`, when given, must be the running
    /// attempt's. Errors: [`StepNotFound`](crate::Error::StepNotFound),
    /// [`NotRunning`](crate::Error::NotRunning),
    /// [`Superseded`](crate::Error::Superseded) for an older attempt,
    /// [`Conflict`](crate::Error::Conflict) for a newer one or another agent.
    async fn renew(
        &self,
        id: StepId,
        attempt: Option<Attempt>,
        agent: Option<AgentId>,
        until: Timestamp,
    ) -> Result<Lease>;

    /// Puts a running step back in the queue, keeping its attempt number,
    /// if `attempt` is still its latest; `None` if it is not. A step whose
    /// agent was [lost](Requeue::Lost) and that counts such losses
    /// ([`RetryOn::agent_lost`](crate::model::RetryOn)) spends a retry, and
    /// with none left fails instead: its log is what the attempt streamed
    /// and a line saying why, and the build moves on as with any failure.
    async fn requeue(
        &self,
        id: StepId,
        attempt: Attempt,
        why: Requeue,
        now: Timestamp,
    ) -> Result<Option<Moved>>;

    /// Records the result of `attempt`, if the step is unfinished, its
    /// result not yet taken, and `attempt` its latest; returns what moved
    /// (`None`: nothing was recorded). A failure of a
    /// step with retries left queues it again (one retry fewer); otherwise
    /// the step ends, its dependents move on ([`settle`](crate::model::settle)),
    /// and the build ends with its last step.
    async fn finish(
        &self,
        id: StepId,
        attempt: Attempt,
        result: &Completion,
        now: Timestamp,
    ) -> Result<Option<Moved>>;

    /// Cancels every unfinished step of a build. Returns the leases of the
    /// attempts that were running (their agents should be told to stop)
    /// and what moved, or `None` if the build was already finished.
    async fn cancel(&self, build: BuildId, now: Timestamp) -> Result<Option<(Vec<Lease>, Moved)>>;

    /// Runs the failed, canceled and skipped steps of a finished build
    /// again, with new attempts; the steps that passed keep their results.
    /// Returns what moved, or `None` if the build is not finished.
    async fn retry(&self, build: BuildId, now: Timestamp) -> Result<Option<Moved>>;

    /// The lease of every running attempt.
    async fn leases(&self) -> Result<Vec<Lease>>;

    /// Up to `limit` running attempts whose lease has lapsed at `now`,
    /// earliest deadline first.
    async fn lapsed(&self, now: Timestamp, limit: usize) -> Result<Vec<Lease>>;

    /// The earliest deadline of any lease.
    async fn next_deadline(&self) -> Result<Option<Timestamp>>;

    /// Gives every running attempt a lease until at least `until`: after a
    /// restart, so that agents have time to report in.
    async fn extend_leases(&self, until: Timestamp) -> Result<()>;
}

/// Build output: live pieces while an attempt runs, the accepted result's
/// log afterwards.
#[async_trait]
pub trait Logs: Send + Sync {
    /// Appends live output of `attempt`, if it is the step's running
    /// attempt. Pieces are taken in `seq` order; a `seq` at or below the
    /// highest already taken is a repeat and ignored, and nothing is kept
    /// past [`limits::MAX_LOG`](crate::model::limits::MAX_LOG) per stream.
    /// Returns how many pieces were stored. Consecutive pieces of one stream
    /// may be stored as one (with the last one's `seq`), and the cost does
    /// not grow with what is already stored.
    async fn append_log(&self, id: StepId, attempt: Attempt, pieces: &[LogPiece]) -> Result<usize>;

    /// Live output of `attempt` with `seq` above `after`, in order, at most
    /// `limit` of them.
    async fn log_pieces(
        &self,
        id: StepId,
        attempt: Attempt,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<LogPiece>>;

    /// The output of one attempt; the latest if `attempt` is `None`: the
    /// accepted result's log if there is one, else what was streamed.
    async fn log(&self, id: StepId, attempt: Option<Attempt>) -> Result<Option<BuildLog>>;

    /// What [`Logs::log`] would return, without the text: for answering
    /// with a log of any size in bounded memory.
    async fn log_info(&self, id: StepId, attempt: Option<Attempt>) -> Result<Option<LogInfo>>;

    /// Up to `max` bytes of one stream of an attempt's accepted log, from
    /// byte `offset` (which may fall inside a character); empty past the
    /// end or if there is no accepted log.
    async fn read_log(
        &self,
        id: StepId,
        attempt: Attempt,
        stream: Stream,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>>;
}

/// The read side of the API.
#[async_trait]
pub trait Builds: Send + Sync {
    /// The build with this id, with its steps.
    async fn build(&self, id: BuildId) -> Result<Option<Build>>;

    /// The step with this id.
    async fn step(&self, id: StepId) -> Result<Option<Step>>;

    /// A page of builds, newest first, with their steps.
    async fn list_builds(&self, page: Page) -> Result<Vec<Build>>;

    /// A page of the builds that pass `filter`, newest first.
    async fn find_builds(&self, filter: &BuildFilter, page: Page) -> Result<Vec<Build>>;

    /// The build of a project with this number.
    async fn build_by_number(&self, project: &str, number: u64) -> Result<Option<Build>>;

    /// How many builds are in each status.
    async fn status_counts(&self) -> Result<Vec<(BuildStatus, u64)>>;
}

/// The agents' records, which outlive a server process.
#[async_trait]
pub trait Agents: Send + Sync {
    /// Registers an agent with a new id, never used before, replacing any
    /// agent registered at the same URL.
    async fn register_agent(&self, enrollment: &Enrollment, now: Timestamp) -> Result<AgentRecord>;

    /// Forgets an agent. Not an error if it is already gone.
    async fn remove_agent(&self, id: AgentId) -> Result<()>;

    /// Every registered agent.
    async fn agents(&self) -> Result<Vec<AgentRecord>>;

    /// Issues agent `name` a credential, found from now on by `digest`
    /// (the SHA-256 of its token; the token itself is never stored).
    async fn issue_credential(&self, name: &str, digest: &[u8], now: Timestamp) -> Result<Credential>;

    /// The credential whose token has this digest, revoked or not.
    async fn credential(&self, digest: &[u8]) -> Result<Option<Credential>>;

    /// Revokes credential `id` at `now`. `false` if there is none; a
    /// credential revoked before keeps its first time.
    async fn revoke_credential(&self, id: i64, now: Timestamp) -> Result<bool>;
}

/// Projects, their secrets (sealed: the store never sees a value), and
/// what the server last saw of their remotes.
///
/// N.B.: every store has the [default project](Project::DEFAULT), which
/// cannot be deleted; builds of a project that does not exist are refused
/// ([`ProjectNotFound`](crate::Error::ProjectNotFound)).
#[async_trait]
pub trait Projects: Send + Sync {
    /// Stores a new project. [`Conflict`](crate::Error::Conflict) if its
    /// name is taken.
    async fn create_project(&self, project: &Project, now: Timestamp) -> Result<Project>;

    /// Replaces a project's settings (all but its name and creation time).
    async fn update_project(&self, project: &Project) -> Result<Project>;

    /// The project with this name.
    async fn project(&self, name: &str) -> Result<Option<Project>>;

    /// Every project, by name.
    async fn projects(&self) -> Result<Vec<Project>>;

    /// Deletes a project with its builds, secrets and heads. Refused
    /// ([`Conflict`](crate::Error::Conflict)) for the default project and
    /// while one of its builds is unfinished. `false` if there is none.
    async fn delete_project(&self, name: &str) -> Result<bool>;

    /// Sets a secret (sealed by the caller), replacing one of that name.
    async fn put_secret(&self, project: &str, name: &str, sealed: &[u8], now: Timestamp) -> Result<()>;

    /// The names of a project's secrets and when each was set, by name.
    async fn secret_names(&self, project: &str) -> Result<Vec<(String, Timestamp)>>;

    /// The sealed values of the named secrets that exist.
    async fn secrets(&self, project: &str, names: &[String]) -> Result<Vec<(String, Vec<u8>)>>;

    /// Deletes a secret; `false` if there was none.
    async fn delete_secret(&self, project: &str, name: &str) -> Result<bool>;

    /// The branch heads last seen on a project's remote.
    async fn heads(&self, project: &str) -> Result<Vec<(String, String)>>;

    /// Replaces the heads last seen on a project's remote.
    async fn set_heads(&self, project: &str, heads: &[(String, String)]) -> Result<()>;
}

/// All of persistence: what a server runs on.
pub trait Store: Queue + Logs + Builds + Agents + Projects {}

impl<T: Queue + Logs + Builds + Agents + Projects> Store for T {}
