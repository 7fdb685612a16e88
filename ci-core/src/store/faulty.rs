//! [`FaultyStore`]: a store that fails when told to, for testing how the
//! rest copes with a store that is down, full or slow to commit.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Agents, BuildFilter, Builds, Claim, Lease, Logs, Projects, Queue, Requeue, Store};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::model::{
    AgentId, AgentRecord, Attempt, Build, BuildId, BuildLog, BuildStatus, Completion, Credential, Labels,
    LogInfo, LogPiece, Moved, NewBuild, Page, Step, StepId,
};
use crate::pool::Enrollment;
use crate::project::Project;
use crate::runner::Stream;

/// The writes a [`FaultyStore`] can fail.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// [`Queue::start`], with this many claims.
    Start(usize),
    /// [`Queue::finish`].
    Finish,
    /// [`Queue::renew`].
    Renew,
    /// [`Logs::append_log`].
    Append,
}

/// Decides whether an operation fails.
pub type Fails = dyn Fn(Op) -> bool + Send + Sync;

/// A store that passes everything to `inner`, except the writes `fails`
/// says fail: those fail with a retryable [`Error::Store`] and change
/// nothing. Reads never fail.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    fails: Box<Fails>,
}

impl std::fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyStore").finish_non_exhaustive()
    }
}

impl FaultyStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>, fails: impl Fn(Op) -> bool + Send + Sync + 'static) -> FaultyStore {
        FaultyStore {
            inner,
            fails: Box::new(fails),
        }
    }

    fn check(&self, op: Op) -> Result<()> {
        if (self.fails)(op) {
            return Err(Error::store(format!("injected failure of {op:?}")));
        }
        Ok(())
    }
}

#[async_trait]
impl Queue for FaultyStore {
    async fn create_build(&self, new: &NewBuild, now: Timestamp) -> Result<Build> {
        self.inner.create_build(new, now).await
    }
    async fn queued(&self, limit: usize) -> Result<Vec<Step>> {
        self.inner.queued(limit).await
    }
    async fn queued_label_sets(&self) -> Result<Vec<Labels>> {
        self.inner.queued_label_sets().await
    }
    async fn queued_with(&self, labels: &Labels, limit: usize) -> Result<Vec<Step>> {
        self.inner.queued_with(labels, limit).await
    }
    async fn start(&self, claims: &[Claim], now: Timestamp) -> Result<Vec<Step>> {
        self.check(Op::Start(claims.len()))?;
        self.inner.start(claims, now).await
    }
    async fn renew(
        &self,
        id: StepId,
        attempt: Option<Attempt>,
        agent: Option<AgentId>,
        until: Timestamp,
    ) -> Result<Lease> {
        self.check(Op::Renew)?;
        self.inner.renew(id, attempt, agent, until).await
    }
    async fn requeue(
        &self,
        id: StepId,
        attempt: Attempt,
        why: Requeue,
        now: Timestamp,
    ) -> Result<Option<Moved>> {
        self.inner.requeue(id, attempt, why, now).await
    }
    async fn finish(
        &self,
        id: StepId,
        attempt: Attempt,
        result: &Completion,
        now: Timestamp,
    ) -> Result<Option<Moved>> {
        self.check(Op::Finish)?;
        self.inner.finish(id, attempt, result, now).await
    }
    async fn cancel(&self, build: BuildId, now: Timestamp) -> Result<Option<(Vec<Lease>, Moved)>> {
        self.inner.cancel(build, now).await
    }
    async fn retry(&self, build: BuildId, now: Timestamp) -> Result<Option<Moved>> {
        self.inner.retry(build, now).await
    }
    async fn leases(&self) -> Result<Vec<Lease>> {
        self.inner.leases().await
    }
    async fn lapsed(&self, now: Timestamp, limit: usize) -> Result<Vec<Lease>> {
        self.inner.lapsed(now, limit).await
    }
    async fn next_deadline(&self) -> Result<Option<Timestamp>> {
        self.inner.next_deadline().await
    }
    async fn extend_leases(&self, until: Timestamp) -> Result<()> {
        self.inner.extend_leases(until).await
    }
}

#[async_trait]
impl Logs for FaultyStore {
    async fn append_log(&self, id: StepId, attempt: Attempt, pieces: &[LogPiece]) -> Result<usize> {
        self.check(Op::Append)?;
        self.inner.append_log(id, attempt, pieces).await
    }
    async fn log_pieces(
        &self,
        id: StepId,
        attempt: Attempt,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<LogPiece>> {
        self.inner.log_pieces(id, attempt, after, limit).await
    }
    async fn log(&self, id: StepId, attempt: Option<Attempt>) -> Result<Option<BuildLog>> {
        self.inner.log(id, attempt).await
    }
    async fn log_info(&self, id: StepId, attempt: Option<Attempt>) -> Result<Option<LogInfo>> {
        self.inner.log_info(id, attempt).await
    }
    async fn read_log(
        &self,
        id: StepId,
        attempt: Attempt,
        stream: Stream,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>> {
        self.inner.read_log(id, attempt, stream, offset, max).await
    }
}

#[async_trait]
impl Builds for FaultyStore {
    async fn build(&self, id: BuildId) -> Result<Option<Build>> {
        self.inner.build(id).await
    }
    async fn step(&self, id: StepId) -> Result<Option<Step>> {
        self.inner.step(id).await
    }
    async fn list_builds(&self, page: Page) -> Result<Vec<Build>> {
        self.inner.list_builds(page).await
    }
    async fn find_builds(&self, filter: &BuildFilter, page: Page) -> Result<Vec<Build>> {
        self.inner.find_builds(filter, page).await
    }
    async fn build_by_number(&self, project: &str, number: u64) -> Result<Option<Build>> {
        self.inner.build_by_number(project, number).await
    }
    async fn status_counts(&self) -> Result<Vec<(BuildStatus, u64)>> {
        self.inner.status_counts().await
    }
}

#[async_trait]
impl Agents for FaultyStore {
    async fn register_agent(&self, e: &Enrollment, now: Timestamp) -> Result<AgentRecord> {
        self.inner.register_agent(e, now).await
    }
    async fn remove_agent(&self, id: AgentId) -> Result<()> {
        self.inner.remove_agent(id).await
    }
    async fn agents(&self) -> Result<Vec<AgentRecord>> {
        self.inner.agents().await
    }
    async fn issue_credential(&self, name: &str, digest: &[u8], now: Timestamp) -> Result<Credential> {
        self.inner.issue_credential(name, digest, now).await
    }
    async fn credential(&self, digest: &[u8]) -> Result<Option<Credential>> {
        self.inner.credential(digest).await
    }
    async fn revoke_credential(&self, id: i64, now: Timestamp) -> Result<bool> {
        self.inner.revoke_credential(id, now).await
    }
}

#[async_trait]
impl Projects for FaultyStore {
    async fn create_project(&self, project: &Project, now: Timestamp) -> Result<Project> {
        self.inner.create_project(project, now).await
    }
    async fn update_project(&self, project: &Project) -> Result<Project> {
        self.inner.update_project(project).await
    }
    async fn project(&self, name: &str) -> Result<Option<Project>> {
        self.inner.project(name).await
    }
    async fn projects(&self) -> Result<Vec<Project>> {
        self.inner.projects().await
    }
    async fn delete_project(&self, name: &str) -> Result<bool> {
        self.inner.delete_project(name).await
    }
    async fn put_secret(&self, project: &str, name: &str, sealed: &[u8], now: Timestamp) -> Result<()> {
        self.inner.put_secret(project, name, sealed, now).await
    }
    async fn secret_names(&self, project: &str) -> Result<Vec<(String, Timestamp)>> {
        self.inner.secret_names(project).await
    }
    async fn secrets(&self, project: &str, names: &[String]) -> Result<Vec<(String, Vec<u8>)>> {
        self.inner.secrets(project, names).await
    }
    async fn delete_secret(&self, project: &str, name: &str) -> Result<bool> {
        self.inner.delete_secret(project, name).await
    }
    async fn heads(&self, project: &str) -> Result<Vec<(String, String)>> {
        self.inner.heads(project).await
    }
    async fn set_heads(&self, project: &str, heads: &[(String, String)]) -> Result<()> {
        self.inner.set_heads(project, heads).await
    }
}
