//! [`MemoryStore`]: the reference [`Store`](super::Store), in memory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use super::{Agents, BuildFilter, Builds, Claim, Lease, Logs, Projects, Queue, Requeue};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::model::{
    build_status, limits, settle, AgentId, AgentRecord, Attempt, Build, BuildId, BuildLog, BuildStatus,
    Completion, Credential, Labels, LogInfo, LogPiece, Moved, NewBuild, Page, Step, StepId, StepState,
    StepStatus,
};
use crate::pool::Enrollment;
use crate::project::Project;
use crate::runner::Stream;

/// A [`Store`](super::Store) in memory: for tests, simulations and
/// embedding where nothing needs to survive the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    last_build: i64,
    last_step: i64,
    last_agent: i64,
    /// Builds, without their steps (see `with_steps`).
    builds: BTreeMap<BuildId, Build>,
    steps: BTreeMap<StepId, Step>,
    /// Each build's steps, in creation order.
    build_steps: HashMap<BuildId, Vec<StepId>>,
    queue: BTreeSet<StepId>,
    /// Deadline of each running step's lease.
    leases: HashMap<StepId, Timestamp>,
    logs: HashMap<(StepId, Attempt), BuildLog>,
    pieces: HashMap<(StepId, Attempt), BTreeMap<u64, LogPiece>>,
    /// Per attempt: the highest `seq` taken and the bytes kept per stream.
    live: HashMap<(StepId, Attempt), (Option<u64>, [usize; 2])>,
    agents: BTreeMap<AgentId, AgentRecord>,
    /// Agents' credentials, each with its token's digest.
    credentials: Vec<(Credential, Vec<u8>)>,
    /// Projects but the default one until it is written, with the last
    /// build number each gave.
    projects: BTreeMap<String, (Project, u64)>,
    /// The default project's last build number, until it is written.
    default_numbers: u64,
    secrets: BTreeMap<(String, String), (Vec<u8>, Timestamp)>,
    heads: HashMap<String, Vec<(String, String)>>,
    /// Webhook deliveries that made builds.
    deliveries: BTreeSet<String>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    fn lease_of(&self, st: &Step) -> Option<Lease> {
        let expires_at = *self.leases.get(&st.id)?;
        Some(Lease {
            step: st.id,
            attempt: st.attempt,
            agent: st.agent_id?,
            expires_at,
        })
    }

    fn running_leases(&self) -> impl Iterator<Item = Lease> + '_ {
        self.steps
            .values()
            .filter(|st| st.status == StepStatus::Running)
            .filter_map(|st| self.lease_of(st))
    }

    fn with_steps(&self, b: &Build) -> Build {
        let mut b = b.clone();
        b.steps = self
            .build_steps
            .get(&b.id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.steps.get(id).cloned())
            .collect();
        b.summarize();
        b
    }

    fn states(&self, build: BuildId) -> Vec<StepState> {
        self.build_steps
            .get(&build)
            .into_iter()
            .flatten()
            .filter_map(|id| self.steps.get(id))
            .map(StepState::from)
            .collect()
    }

    /// Sets the status of `build` from its steps'.
    fn refresh(&mut self, build: BuildId) {
        let status = build_status(&self.states(build));
        if let Some(b) = self.builds.get_mut(&build) {
            b.status = status;
        }
    }

    /// Moves the steps of `build` along after `changed` changed, and sets
    /// the build's status (it was `before`).
    fn settle(
        &mut self,
        build: BuildId,
        before: Option<BuildStatus>,
        mut changed: Vec<(StepId, StepStatus)>,
        now: Timestamp,
    ) -> Moved {
        let mut states = self.states(build);
        let (status, moved) = settle(&mut states);
        for (id, next) in &moved {
            if let Some(st) = self.steps.get_mut(id) {
                st.status = *next;
                if next.is_finished() {
                    st.finished_at = Some(now);
                }
            }
            if *next == StepStatus::Queued {
                self.queue.insert(*id);
            }
        }
        changed.extend(moved);
        if let Some(b) = self.builds.get_mut(&build) {
            b.status = status;
        }
        let mut moved = Moved {
            build,
            steps: changed,
            before,
            after: Some(status),
            duration_ms: None,
        };
        if moved.ended() {
            moved.duration_ms = self
                .builds
                .get(&build)
                .and_then(|b| self.with_steps(b).duration_ms());
        }
        moved
    }
}

/// Why a heartbeat for `step` does not renew its lease, or `None` if it
/// does: the one rule of [`Queue::renew`], for every store to share.
pub fn refuse_renewal(
    step: Option<&Step>,
    id: StepId,
    attempt: Option<Attempt>,
    agent: Option<AgentId>,
) -> Option<Error> {
    let Some(st) = step else {
        return Some(Error::StepNotFound(id));
    };
    if let Some(a) = attempt.filter(|a| *a < st.attempt) {
        return Some(Error::Superseded {
            id,
            attempt: a,
            current: st.attempt,
        });
    }
    if st.status != StepStatus::Running {
        return Some(Error::NotRunning {
            id,
            status: st.status,
        });
    }
    if let Some(a) = attempt.filter(|a| *a > st.attempt) {
        return Some(Error::Conflict(format!(
            "step {id} has no attempt {a} (latest is {})",
            st.attempt
        )));
    }
    if let (Some(agent), Some(holder)) = (agent, st.agent_id) {
        if agent != holder {
            return Some(Error::Conflict(format!(
                "step {id} attempt {} is held by agent {holder}, not agent {agent}",
                st.attempt
            )));
        }
    }
    None
}

#[async_trait]
impl Queue for MemoryStore {
    async fn create_build(&self, new: &NewBuild, now: Timestamp) -> Result<Build> {
        let mut s = self.lock();
        let project = new.source.project.as_str();
        if project != Project::DEFAULT && !s.projects.contains_key(project) {
            return Err(Error::ProjectNotFound(project.to_owned()));
        }
        if let Some(d) = &new.source.delivery {
            if !s.deliveries.insert(d.clone()) {
                return Err(Error::Conflict(format!("delivery {d} already made a build")));
            }
        }
        let number = match s.projects.get_mut(project) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                s.default_numbers += 1;
                s.default_numbers
            }
        };
        s.last_build += 1;
        let mut build = Build::new(BuildId(s.last_build), new, now);
        build.number = number;
        let mut ids = Vec::new();
        if let Some(why) = &new.failure {
            s.last_step += 1;
            let (st, log) = Step::failed(StepId(s.last_step), &build, why);
            build.status = BuildStatus::Failed;
            s.logs.insert((st.id, Attempt(0)), log);
            s.build_steps.insert(build.id, vec![st.id]);
            s.steps.insert(st.id, st);
            s.builds.insert(build.id, build.clone());
            return Ok(s.with_steps(&build));
        }
        for n in new.plan() {
            s.last_step += 1;
            let st = Step::new(StepId(s.last_step), &build, &n);
            if st.status == StepStatus::Queued {
                s.queue.insert(st.id);
            }
            ids.push(st.id);
            s.steps.insert(st.id, st);
        }
        s.build_steps.insert(build.id, ids);
        s.builds.insert(build.id, build.clone());
        Ok(s.with_steps(&build))
    }

    async fn queued(&self, limit: usize) -> Result<Vec<Step>> {
        let s = self.lock();
        Ok(s.queue
            .iter()
            .take(limit)
            .filter_map(|id| s.steps.get(id).cloned())
            .collect())
    }

    async fn queued_label_sets(&self) -> Result<Vec<Labels>> {
        let s = self.lock();
        let sets: BTreeSet<&Labels> = s
            .queue
            .iter()
            .filter_map(|id| s.steps.get(id))
            .map(|st| &st.labels)
            .collect();
        Ok(sets.into_iter().cloned().collect())
    }

    async fn queued_with(&self, labels: &Labels, limit: usize) -> Result<Vec<Step>> {
        let s = self.lock();
        Ok(s.queue
            .iter()
            .filter_map(|id| s.steps.get(id))
            .filter(|st| &st.labels == labels)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn start(&self, claims: &[Claim], now: Timestamp) -> Result<Vec<Step>> {
        let mut s = self.lock();
        let mut started = Vec::with_capacity(claims.len());
        for c in claims {
            let Some(st) = s
                .steps
                .get_mut(&c.step)
                .filter(|st| st.status == StepStatus::Queued)
            else {
                continue;
            };
            st.status = StepStatus::Running;
            st.attempt = st.attempt.next();
            st.agent_id = Some(c.agent);
            st.agent_url = Some(c.agent_url.clone());
            st.started_at = Some(now);
            let st = st.clone();
            s.queue.remove(&c.step);
            s.leases.insert(c.step, c.lease_until);
            if let Some(b) = s.builds.get_mut(&st.build) {
                b.status = BuildStatus::Running;
            }
            started.push(st);
        }
        Ok(started)
    }

    async fn renew(
        &self,
        id: StepId,
        attempt: Option<Attempt>,
        agent: Option<AgentId>,
        until: Timestamp,
    ) -> Result<Lease> {
        let mut s = self.lock();
        if let Some(e) = refuse_renewal(s.steps.get(&id), id, attempt, agent) {
            return Err(e);
        }
        let deadline = s.leases.entry(id).or_insert(until);
        *deadline = (*deadline).max(until);
        let st = s.steps.get(&id).ok_or(Error::StepNotFound(id))?;
        s.lease_of(st)
            .ok_or_else(|| Error::Conflict(format!("step {id} runs without an agent")))
    }

    async fn requeue(
        &self,
        id: StepId,
        attempt: Attempt,
        why: Requeue,
        now: Timestamp,
    ) -> Result<Option<Moved>> {
        let mut s = self.lock();
        let Some(st) = s
            .steps
            .get_mut(&id)
            .filter(|st| st.status == StepStatus::Running && st.attempt == attempt)
        else {
            return Ok(None);
        };
        let counted = why == Requeue::Lost && st.retry_on.agent_lost;
        let (build, spent) = (st.build, st.retries_left == 0);
        s.leases.remove(&id);
        if counted && spent {
            let st = s.steps.get_mut(&id).ok_or(Error::StepNotFound(id))?;
            st.status = StepStatus::Failed;
            st.exit_code = Some(Completion::NOT_RUN);
            st.finished_at = Some(now);
            let mut log = s
                .pieces
                .remove(&(id, attempt))
                .map(|p| assemble(attempt, p.values()))
                .unwrap_or_default();
            log.attempt = attempt;
            log.complete = true;
            log.stderr.push_str(Requeue::LOST_LINE);
            s.logs.insert((id, attempt), log);
            s.live.remove(&(id, attempt));
            s.queue.remove(&id);
            let before = s.builds.get(&build).map(|b| b.status);
            return Ok(Some(s.settle(build, before, vec![(id, StepStatus::Failed)], now)));
        }
        let st = s.steps.get_mut(&id).ok_or(Error::StepNotFound(id))?;
        if counted {
            st.retries_left -= 1;
        }
        st.status = StepStatus::Queued;
        s.queue.insert(id);
        let before = s.builds.get(&build).map(|b| b.status);
        s.refresh(build);
        let after = s.builds.get(&build).map(|b| b.status);
        Ok(Some(Moved {
            build,
            steps: vec![(id, StepStatus::Queued)],
            before,
            after,
            duration_ms: None,
        }))
    }

    async fn finish(
        &self,
        id: StepId,
        attempt: Attempt,
        result: &Completion,
        now: Timestamp,
    ) -> Result<Option<Moved>> {
        let mut s = self.lock();
        // N.B.: a result already taken (a failure whose step was queued for
        // a retry) is not taken twice.
        let taken = s.logs.contains_key(&(id, attempt));
        let Some(st) = s
            .steps
            .get_mut(&id)
            .filter(|st| !taken && !st.status.is_finished() && st.attempt == attempt && attempt.0 > 0)
        else {
            return Ok(None);
        };
        let retry = st.retry_on.retries_exit(result.exit_code) && st.retries_left > 0;
        if retry {
            st.retries_left -= 1;
            st.status = StepStatus::Queued;
            st.exit_code = None;
        } else {
            st.status = StepStatus::from_exit_code(result.exit_code);
            st.exit_code = Some(result.exit_code);
            st.finished_at = Some(now);
        }
        let (build, status) = (st.build, st.status);
        s.leases.remove(&id);
        if retry {
            s.queue.insert(id);
        } else {
            s.queue.remove(&id);
        }
        s.logs.insert(
            (id, attempt),
            BuildLog {
                attempt,
                stdout: result.stdout.clone(),
                stderr: result.stderr.clone(),
                complete: true,
            },
        );
        s.pieces.remove(&(id, attempt));
        s.live.remove(&(id, attempt));
        let before = s.builds.get(&build).map(|b| b.status);
        Ok(Some(s.settle(build, before, vec![(id, status)], now)))
    }

    async fn cancel(&self, build: BuildId, now: Timestamp) -> Result<Option<(Vec<Lease>, Moved)>> {
        let mut s = self.lock();
        let before = s.builds.get(&build).map(|b| b.status);
        if before.is_none_or(BuildStatus::is_finished) {
            return Ok(None);
        }
        let ids = s.build_steps.get(&build).cloned().unwrap_or_default();
        let mut stopped = Vec::new();
        let mut changed = Vec::new();
        for id in ids {
            let lease = s.steps.get(&id).and_then(|st| s.lease_of(st));
            let Some(st) = s.steps.get_mut(&id).filter(|st| !st.status.is_finished()) else {
                continue;
            };
            if st.status == StepStatus::Running {
                stopped.extend(lease);
            }
            st.status = StepStatus::Canceled;
            st.finished_at = Some(now);
            changed.push((id, StepStatus::Canceled));
            s.queue.remove(&id);
            s.leases.remove(&id);
        }
        let moved = s.settle(build, before, changed, now);
        Ok(Some((stopped, moved)))
    }

    async fn retry(&self, build: BuildId, now: Timestamp) -> Result<Option<Moved>> {
        let mut s = self.lock();
        let before = s.builds.get(&build).map(|b| b.status);
        if !before.is_some_and(BuildStatus::is_finished) {
            return Ok(None);
        }
        let mut changed = Vec::new();
        for id in s.build_steps.get(&build).cloned().unwrap_or_default() {
            if let Some(st) = s.steps.get_mut(&id).filter(|st| st.status != StepStatus::Success) {
                st.status = StepStatus::Pending;
                st.exit_code = None;
                st.finished_at = None;
                changed.push((id, StepStatus::Pending));
            }
        }
        Ok(Some(s.settle(build, before, changed, now)))
    }

    async fn leases(&self) -> Result<Vec<Lease>> {
        Ok(self.lock().running_leases().collect())
    }

    async fn lapsed(&self, now: Timestamp, limit: usize) -> Result<Vec<Lease>> {
        let s = self.lock();
        let mut lapsed: Vec<Lease> = s.running_leases().filter(|l| l.is_expired(now)).collect();
        lapsed.sort_by_key(|l| (l.expires_at, l.step));
        lapsed.truncate(limit);
        Ok(lapsed)
    }

    async fn next_deadline(&self) -> Result<Option<Timestamp>> {
        Ok(self.lock().running_leases().map(|l| l.expires_at).min())
    }

    async fn extend_leases(&self, until: Timestamp) -> Result<()> {
        let mut s = self.lock();
        let running: Vec<StepId> = s
            .steps
            .values()
            .filter(|st| st.status == StepStatus::Running)
            .map(|st| st.id)
            .collect();
        for id in running {
            let d = s.leases.entry(id).or_insert(until);
            *d = (*d).max(until);
        }
        Ok(())
    }
}

#[async_trait]
impl Logs for MemoryStore {
    async fn append_log(&self, id: StepId, attempt: Attempt, pieces: &[LogPiece]) -> Result<usize> {
        let mut s = self.lock();
        let running = s
            .steps
            .get(&id)
            .is_some_and(|st| st.status == StepStatus::Running && st.attempt == attempt);
        if !running {
            return Ok(0);
        }
        let (last, bytes) = s.live.get(&(id, attempt)).copied().unwrap_or_default();
        let mut taken = Taken::new(last, bytes);
        let rows = taken.take(pieces);
        s.live.insert((id, attempt), (taken.last, taken.bytes));
        let stored = s.pieces.entry((id, attempt)).or_default();
        for row in rows {
            stored.insert(row.seq, row);
        }
        Ok(taken.added)
    }

    async fn log_pieces(
        &self,
        id: StepId,
        attempt: Attempt,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<LogPiece>> {
        let s = self.lock();
        Ok(s.pieces
            .get(&(id, attempt))
            .map(|m| {
                m.values()
                    .filter(|p| after.is_none_or(|a| p.seq > a))
                    .take(limit)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn log(&self, id: StepId, attempt: Option<Attempt>) -> Result<Option<BuildLog>> {
        let s = self.lock();
        let Some(st) = s.steps.get(&id) else {
            return Ok(None);
        };
        let attempt = attempt.unwrap_or(st.attempt);
        if let Some(log) = s.logs.get(&(id, attempt)) {
            return Ok(Some(log.clone()));
        }
        Ok(s.pieces
            .get(&(id, attempt))
            .filter(|m| !m.is_empty())
            .map(|m| assemble(attempt, m.values())))
    }

    async fn log_info(&self, id: StepId, attempt: Option<Attempt>) -> Result<Option<LogInfo>> {
        Ok(self.log(id, attempt).await?.map(|l| LogInfo {
            attempt: l.attempt,
            complete: l.complete,
            stdout_len: l.stdout.len() as u64,
            stderr_len: l.stderr.len() as u64,
        }))
    }

    async fn read_log(
        &self,
        id: StepId,
        attempt: Attempt,
        stream: Stream,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>> {
        let s = self.lock();
        let Some(log) = s.logs.get(&(id, attempt)) else {
            return Ok(Vec::new());
        };
        let text = match stream {
            Stream::Stdout => &log.stdout,
            Stream::Stderr => &log.stderr,
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(text.len());
        let end = start.saturating_add(max).min(text.len());
        Ok(text.as_bytes()[start..end].to_vec())
    }
}

#[async_trait]
impl Builds for MemoryStore {
    async fn build(&self, id: BuildId) -> Result<Option<Build>> {
        let s = self.lock();
        Ok(s.builds.get(&id).map(|b| s.with_steps(b)))
    }

    async fn step(&self, id: StepId) -> Result<Option<Step>> {
        Ok(self.lock().steps.get(&id).cloned())
    }

    async fn list_builds(&self, page: Page) -> Result<Vec<Build>> {
        let s = self.lock();
        let end = page.before.unwrap_or(BuildId(i64::MAX));
        Ok(s.builds
            .range(..end)
            .map(|(_, b)| b)
            .rev()
            .skip(page.offset)
            .take(page.limit)
            .map(|b| s.with_steps(b))
            .collect())
    }

    async fn find_builds(&self, filter: &BuildFilter, page: Page) -> Result<Vec<Build>> {
        let s = self.lock();
        let end = page.before.unwrap_or(BuildId(i64::MAX));
        Ok(s.builds
            .range(..end)
            .rev()
            .map(|(_, b)| s.with_steps(b))
            .filter(|b| filter.passes(b))
            .skip(page.offset)
            .take(page.limit)
            .collect())
    }

    async fn build_by_number(&self, project: &str, number: u64) -> Result<Option<Build>> {
        let s = self.lock();
        Ok(s.builds
            .values()
            .find(|b| b.source.project == project && b.number == number)
            .map(|b| s.with_steps(b)))
    }

    async fn status_counts(&self) -> Result<Vec<(BuildStatus, u64)>> {
        let s = self.lock();
        Ok(BuildStatus::ALL
            .iter()
            .map(|st| (*st, s.builds.values().filter(|b| b.status == *st).count() as u64))
            .collect())
    }
}

#[async_trait]
impl Agents for MemoryStore {
    async fn register_agent(&self, e: &Enrollment, now: Timestamp) -> Result<AgentRecord> {
        let mut s = self.lock();
        s.agents.retain(|_, a| a.url != e.url);
        s.last_agent += 1;
        let rec = AgentRecord {
            id: AgentId(s.last_agent),
            url: e.url.clone(),
            registered_at: now,
            secret: e.secret.clone(),
            capacity: e.capacity.max(1),
            labels: e.labels.clone(),
        };
        s.agents.insert(rec.id, rec.clone());
        Ok(rec)
    }

    async fn remove_agent(&self, id: AgentId) -> Result<()> {
        self.lock().agents.remove(&id);
        Ok(())
    }

    async fn agents(&self) -> Result<Vec<AgentRecord>> {
        Ok(self.lock().agents.values().cloned().collect())
    }

    async fn issue_credential(&self, name: &str, digest: &[u8], now: Timestamp) -> Result<Credential> {
        let mut s = self.lock();
        if s.credentials.iter().any(|(_, d)| d == digest) {
            return Err(Error::Conflict("a credential with this digest exists".into()));
        }
        let c = Credential {
            id: s.credentials.len() as i64 + 1,
            name: name.to_owned(),
            created_at: now,
            revoked_at: None,
        };
        s.credentials.push((c.clone(), digest.to_vec()));
        Ok(c)
    }

    async fn credential(&self, digest: &[u8]) -> Result<Option<Credential>> {
        let s = self.lock();
        Ok(s.credentials
            .iter()
            .find(|(_, d)| d == digest)
            .map(|(c, _)| c.clone()))
    }

    async fn revoke_credential(&self, id: i64, now: Timestamp) -> Result<bool> {
        let mut s = self.lock();
        match s.credentials.iter_mut().find(|(c, _)| c.id == id) {
            Some((c, _)) => {
                c.revoked_at.get_or_insert(now);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// Live pieces of one append, checked against what was taken before:
/// the rule of [`Logs::append_log`], for every store to share.
#[derive(Debug)]
pub struct Taken {
    /// The highest `seq` taken so far, if any.
    pub last: Option<u64>,
    /// Bytes kept so far: stdout, stderr.
    pub bytes: [usize; 2],
    /// Pieces taken by this append.
    pub added: usize,
}

impl Taken {
    /// Starts from what was taken before.
    pub fn new(last: Option<u64>, bytes: [usize; 2]) -> Taken {
        Taken {
            last,
            bytes,
            added: 0,
        }
    }

    /// The rows to store for `pieces`: new pieces in `seq` order, those
    /// past the cap left out, consecutive ones of one stream joined.
    pub fn take(&mut self, pieces: &[LogPiece]) -> Vec<LogPiece> {
        let mut new: Vec<&LogPiece> = pieces
            .iter()
            .filter(|p| self.last.is_none_or(|l| p.seq > l))
            .collect();
        new.sort_by_key(|p| p.seq);
        new.dedup_by_key(|p| p.seq);
        let mut rows: Vec<LogPiece> = Vec::new();
        for p in new {
            self.last = Some(p.seq);
            let used = &mut self.bytes[match p.stream {
                Stream::Stdout => 0,
                Stream::Stderr => 1,
            }];
            if *used + p.data.len() > limits::MAX_LOG {
                continue;
            }
            *used += p.data.len();
            self.added += 1;
            match rows.last_mut() {
                Some(row) if row.stream == p.stream => {
                    row.data.push_str(&p.data);
                    row.seq = p.seq;
                }
                _ => rows.push(p.clone()),
            }
        }
        rows
    }
}

/// The partial log of an attempt from its live pieces, in order.
pub fn assemble<'a>(attempt: Attempt, pieces: impl IntoIterator<Item = &'a LogPiece>) -> BuildLog {
    let mut log = BuildLog {
        attempt,
        complete: false,
        ..BuildLog::default()
    };
    for p in pieces {
        match p.stream {
            Stream::Stdout => log.stdout.push_str(&p.data),
            Stream::Stderr => log.stderr.push_str(&p.data),
        }
    }
    log
}

#[async_trait]
impl Projects for MemoryStore {
    async fn create_project(&self, project: &Project, now: Timestamp) -> Result<Project> {
        let mut s = self.lock();
        if project.name == Project::DEFAULT || s.projects.contains_key(&project.name) {
            return Err(Error::Conflict(format!("project {:?} exists", project.name)));
        }
        let stored = Project {
            created_at: now,
            ..project.clone()
        };
        s.projects.insert(project.name.clone(), (stored.clone(), 0));
        Ok(stored)
    }

    async fn update_project(&self, project: &Project) -> Result<Project> {
        let mut s = self.lock();
        if project.name == Project::DEFAULT && !s.projects.contains_key(Project::DEFAULT) {
            // N.B.: the default project is written the first time it is
            // changed, keeping the numbers it gave so far.
            let n = s.default_numbers;
            s.projects
                .insert(project.name.clone(), (Project::default_project(), n));
        }
        let (stored, _) = s
            .projects
            .get_mut(&project.name)
            .ok_or_else(|| Error::ProjectNotFound(project.name.clone()))?;
        *stored = Project {
            created_at: stored.created_at,
            ..project.clone()
        };
        Ok(stored.clone())
    }

    async fn project(&self, name: &str) -> Result<Option<Project>> {
        let s = self.lock();
        Ok(match s.projects.get(name) {
            Some((p, _)) => Some(p.clone()),
            None if name == Project::DEFAULT => Some(Project::default_project()),
            None => None,
        })
    }

    async fn projects(&self) -> Result<Vec<Project>> {
        let s = self.lock();
        let mut all: Vec<Project> = s.projects.values().map(|(p, _)| p.clone()).collect();
        if !s.projects.contains_key(Project::DEFAULT) {
            all.push(Project::default_project());
            all.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok(all)
    }

    async fn delete_project(&self, name: &str) -> Result<bool> {
        let mut s = self.lock();
        if name == Project::DEFAULT {
            return Err(Error::Conflict("the default project cannot be deleted".into()));
        }
        if !s.projects.contains_key(name) {
            return Ok(false);
        }
        let builds: Vec<BuildId> = s
            .builds
            .values()
            .filter(|b| b.source.project == name)
            .map(|b| b.id)
            .collect();
        if builds
            .iter()
            .any(|id| s.builds.get(id).is_some_and(|b| !b.status.is_finished()))
        {
            return Err(Error::Conflict(format!(
                "project {name:?} has unfinished builds: cancel them first"
            )));
        }
        for id in builds {
            s.builds.remove(&id);
            for step in s.build_steps.remove(&id).unwrap_or_default() {
                s.steps.remove(&step);
                s.logs.retain(|(st, _), _| *st != step);
                s.pieces.retain(|(st, _), _| *st != step);
                s.live.retain(|(st, _), _| *st != step);
            }
        }
        s.projects.remove(name);
        s.secrets.retain(|(p, _), _| p != name);
        s.heads.remove(name);
        Ok(true)
    }

    async fn put_secret(&self, project: &str, name: &str, sealed: &[u8], now: Timestamp) -> Result<()> {
        let mut s = self.lock();
        if project != Project::DEFAULT && !s.projects.contains_key(project) {
            return Err(Error::ProjectNotFound(project.to_owned()));
        }
        s.secrets
            .insert((project.to_owned(), name.to_owned()), (sealed.to_vec(), now));
        Ok(())
    }

    async fn secret_names(&self, project: &str) -> Result<Vec<(String, Timestamp)>> {
        let s = self.lock();
        Ok(s.secrets
            .iter()
            .filter(|((p, _), _)| p == project)
            .map(|((_, n), (_, at))| (n.clone(), *at))
            .collect())
    }

    async fn secrets(&self, project: &str, names: &[String]) -> Result<Vec<(String, Vec<u8>)>> {
        let s = self.lock();
        Ok(names
            .iter()
            .filter_map(|n| {
                s.secrets
                    .get(&(project.to_owned(), n.clone()))
                    .map(|(v, _)| (n.clone(), v.clone()))
            })
            .collect())
    }

    async fn delete_secret(&self, project: &str, name: &str) -> Result<bool> {
        Ok(self
            .lock()
            .secrets
            .remove(&(project.to_owned(), name.to_owned()))
            .is_some())
    }

    async fn heads(&self, project: &str) -> Result<Vec<(String, String)>> {
        Ok(self.lock().heads.get(project).cloned().unwrap_or_default())
    }

    async fn set_heads(&self, project: &str, heads: &[(String, String)]) -> Result<()> {
        self.lock().heads.insert(project.to_owned(), heads.to_vec());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_conforms() {
        super::super::conformance::run_all(|| async { MemoryStore::new() }).await;
    }
}
