//! [`MemoryStore`]: the reference [`Store`](super::Store), in memory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use super::{Agents, Builds, Claim, Lease, Logs, Queue};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::model::{
    limits, AgentId, AgentRecord, Attempt, Build, BuildId, BuildLog, BuildStatus, Completion, LogInfo,
    LogPiece, NewBuild, Page,
};
use crate::pool::Enrollment;
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
    last_agent: i64,
    builds: BTreeMap<BuildId, Build>,
    queue: BTreeSet<BuildId>,
    /// Deadline of each running build's lease.
    leases: HashMap<BuildId, Timestamp>,
    logs: HashMap<(BuildId, Attempt), BuildLog>,
    pieces: HashMap<(BuildId, Attempt), BTreeMap<u64, LogPiece>>,
    /// Per attempt: the highest `seq` taken and the bytes kept per stream.
    live: HashMap<(BuildId, Attempt), (Option<u64>, [usize; 2])>,
    agents: BTreeMap<AgentId, AgentRecord>,
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
    fn lease_of(&self, b: &Build) -> Option<Lease> {
        let expires_at = *self.leases.get(&b.id)?;
        Some(Lease {
            build: b.id,
            attempt: b.attempt,
            agent: b.agent_id?,
            expires_at,
        })
    }

    fn running_leases(&self) -> impl Iterator<Item = Lease> + '_ {
        self.builds
            .values()
            .filter(|b| b.status == BuildStatus::Running)
            .filter_map(|b| self.lease_of(b))
    }
}

/// Why a heartbeat for `build` does not renew its lease, or `None` if it
/// does: the one rule of [`Queue::renew`], for every store to share.
pub fn refuse_renewal(
    build: Option<&Build>,
    id: BuildId,
    attempt: Option<Attempt>,
    agent: Option<AgentId>,
) -> Option<Error> {
    let Some(b) = build else {
        return Some(Error::BuildNotFound(id));
    };
    if let Some(a) = attempt.filter(|a| *a < b.attempt) {
        return Some(Error::Superseded {
            id,
            attempt: a,
            current: b.attempt,
        });
    }
    if b.status != BuildStatus::Running {
        return Some(Error::NotRunning { id, status: b.status });
    }
    if let Some(a) = attempt.filter(|a| *a > b.attempt) {
        return Some(Error::Conflict(format!(
            "build {id} has no attempt {a} (latest is {})",
            b.attempt
        )));
    }
    if let (Some(agent), Some(holder)) = (agent, b.agent_id) {
        if agent != holder {
            return Some(Error::Conflict(format!(
                "build {id} attempt {} is held by agent {holder}, not agent {agent}",
                b.attempt
            )));
        }
    }
    None
}

#[async_trait]
impl Queue for MemoryStore {
    async fn create_build(&self, new: &NewBuild, now: Timestamp) -> Result<Build> {
        let mut s = self.lock();
        s.last_build += 1;
        let build = Build {
            id: BuildId(s.last_build),
            repo: new.repo.as_str().to_owned(),
            hash: new.hash.as_str().to_owned(),
            branch: new.branch.clone(),
            command: new.command.clone(),
            image: new.image.clone(),
            timeout_ms: new.timeout_ms,
            status: BuildStatus::Queued,
            attempt: Attempt(0),
            agent_id: None,
            agent_url: None,
            exit_code: None,
            created_at: now,
            started_at: None,
            finished_at: None,
            labels: new.labels.clone(),
        };
        s.queue.insert(build.id);
        s.builds.insert(build.id, build.clone());
        Ok(build)
    }

    async fn queued(&self, limit: usize) -> Result<Vec<Build>> {
        let s = self.lock();
        Ok(s.queue
            .iter()
            .take(limit)
            .filter_map(|id| s.builds.get(id).cloned())
            .collect())
    }

    async fn start(&self, claims: &[Claim], now: Timestamp) -> Result<Vec<Build>> {
        let mut s = self.lock();
        let mut started = Vec::with_capacity(claims.len());
        for c in claims {
            let Some(b) = s
                .builds
                .get_mut(&c.build)
                .filter(|b| b.status == BuildStatus::Queued)
            else {
                continue;
            };
            b.status = BuildStatus::Running;
            b.attempt = b.attempt.next();
            b.agent_id = Some(c.agent);
            b.agent_url = Some(c.agent_url.clone());
            b.started_at = Some(now);
            let b = b.clone();
            s.queue.remove(&c.build);
            s.leases.insert(c.build, c.lease_until);
            started.push(b);
        }
        Ok(started)
    }

    async fn renew(
        &self,
        id: BuildId,
        attempt: Option<Attempt>,
        agent: Option<AgentId>,
        until: Timestamp,
    ) -> Result<Lease> {
        let mut s = self.lock();
        if let Some(e) = refuse_renewal(s.builds.get(&id), id, attempt, agent) {
            return Err(e);
        }
        let deadline = s.leases.entry(id).or_insert(until);
        *deadline = (*deadline).max(until);
        let b = s.builds.get(&id).ok_or(Error::BuildNotFound(id))?;
        s.lease_of(b)
            .ok_or_else(|| Error::Conflict(format!("build {id} runs without an agent")))
    }

    async fn requeue(&self, id: BuildId, attempt: Attempt) -> Result<bool> {
        let mut s = self.lock();
        let Some(b) = s
            .builds
            .get_mut(&id)
            .filter(|b| b.status == BuildStatus::Running && b.attempt == attempt)
        else {
            return Ok(false);
        };
        b.status = BuildStatus::Queued;
        s.queue.insert(id);
        s.leases.remove(&id);
        Ok(true)
    }

    async fn finish(
        &self,
        id: BuildId,
        attempt: Attempt,
        result: &Completion,
        now: Timestamp,
    ) -> Result<bool> {
        let mut s = self.lock();
        let Some(b) = s
            .builds
            .get_mut(&id)
            .filter(|b| !b.status.is_finished() && b.attempt == attempt && attempt.0 > 0)
        else {
            return Ok(false);
        };
        b.status = BuildStatus::from_exit_code(result.exit_code);
        b.exit_code = Some(result.exit_code);
        b.finished_at = Some(now);
        s.queue.remove(&id);
        s.leases.remove(&id);
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
        Ok(true)
    }

    async fn cancel(&self, id: BuildId, attempt: Attempt, now: Timestamp) -> Result<bool> {
        let mut s = self.lock();
        let Some(b) = s
            .builds
            .get_mut(&id)
            .filter(|b| !b.status.is_finished() && b.attempt == attempt)
        else {
            return Ok(false);
        };
        b.status = BuildStatus::Canceled;
        b.finished_at = Some(now);
        s.queue.remove(&id);
        s.leases.remove(&id);
        Ok(true)
    }

    async fn leases(&self) -> Result<Vec<Lease>> {
        Ok(self.lock().running_leases().collect())
    }

    async fn lapsed(&self, now: Timestamp, limit: usize) -> Result<Vec<Lease>> {
        let s = self.lock();
        let mut lapsed: Vec<Lease> = s.running_leases().filter(|l| l.is_expired(now)).collect();
        lapsed.sort_by_key(|l| (l.expires_at, l.build));
        lapsed.truncate(limit);
        Ok(lapsed)
    }

    async fn next_deadline(&self) -> Result<Option<Timestamp>> {
        Ok(self.lock().running_leases().map(|l| l.expires_at).min())
    }

    async fn extend_leases(&self, until: Timestamp) -> Result<()> {
        let mut s = self.lock();
        let running: Vec<BuildId> = s
            .builds
            .values()
            .filter(|b| b.status == BuildStatus::Running)
            .map(|b| b.id)
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
    async fn append_log(&self, id: BuildId, attempt: Attempt, pieces: &[LogPiece]) -> Result<usize> {
        let mut s = self.lock();
        let running = s
            .builds
            .get(&id)
            .is_some_and(|b| b.status == BuildStatus::Running && b.attempt == attempt);
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
        id: BuildId,
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

    async fn log(&self, id: BuildId, attempt: Option<Attempt>) -> Result<Option<BuildLog>> {
        let s = self.lock();
        let Some(b) = s.builds.get(&id) else {
            return Ok(None);
        };
        let attempt = attempt.unwrap_or(b.attempt);
        if let Some(log) = s.logs.get(&(id, attempt)) {
            return Ok(Some(log.clone()));
        }
        Ok(s.pieces
            .get(&(id, attempt))
            .filter(|m| !m.is_empty())
            .map(|m| assemble(attempt, m.values())))
    }

    async fn log_info(&self, id: BuildId, attempt: Option<Attempt>) -> Result<Option<LogInfo>> {
        Ok(self.log(id, attempt).await?.map(|l| LogInfo {
            attempt: l.attempt,
            complete: l.complete,
            stdout_len: l.stdout.len() as u64,
            stderr_len: l.stderr.len() as u64,
        }))
    }

    async fn read_log(
        &self,
        id: BuildId,
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
        Ok(self.lock().builds.get(&id).cloned())
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
            .cloned()
            .collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_conforms() {
        super::super::conformance::run_all(|| async { MemoryStore::new() }).await;
    }
}
