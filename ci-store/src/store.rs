//! [`SqliteStore`]: the four store traits on one SQLite file.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use ci_core::model::{LogPiece, Moved, RetryOn};
use ci_core::store::{Agents, BuildFilter, Builds, Claim, Lease, Logs, Projects, Queue, Requeue, Taken};
use ci_core::{
    AgentId, AgentRecord, Attempt, Build, BuildId, BuildLog, BuildStatus, Completion, Enrollment, Labels,
    LogInfo, NewBuild, Page, Step, StepId, StepStatus, Stream, Timestamp,
};
use ci_core::{Credential, Forge, Project};
use std::str::FromStr;

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::checkpoint::{checkpoint_loop, CHECKPOINT_PAGES};
use crate::rows::{
    build_from_row, build_status_of, delete_live, final_log_row, get_build, get_step, labels_from,
    labels_text, lease_from_row, pieces, query_builds, refresh, settle, step_columns, step_from_row,
    stream_name, ts, with_origin, with_steps, BUILD_COLUMNS,
};
use crate::schema::{connect, diagnose, migrate, own};
use crate::writer::{Cost, Readers, Writer};
use crate::{Error, Options};

/// Logs up to this size are written where the call is; larger ones on the
/// blocking pool.
const SHORT_LOG: usize = 64 * 1024;

/// The SQLite store. See the [crate docs](crate).
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    readers: Arc<Readers>,
    writer: Writer,
    checkpointer: Option<JoinHandle<()>>,
    projects: ProjectCache,
    /// N.B.: an exclusive `flock` on the database file for as long as the
    /// store lives. SQLite's own locks let a second server share the file,
    /// and two schedulers on one queue run builds twice. Last, so it is
    /// closed after the connections: closing any descriptor of the file
    /// drops this process's POSIX locks on it, SQLite's included.
    _owner: nix::fcntl::Flock<std::fs::File>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` with default
    /// options, and brings its schema up to date.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, Error> {
        Self::open_with(path, Options::default())
    }

    /// Opens the database at `path` with `options`.
    pub fn open_with(path: impl AsRef<Path>, options: Options) -> Result<SqliteStore, Error> {
        let path = path.as_ref().to_path_buf();
        let mut writer = connect(&path, options).map_err(|e| diagnose(&path, e))?;
        let owner = own(&writer, &path)?;
        migrate(&writer).map_err(|e| match e {
            Error::Sqlite(e) => diagnose(&path, e),
            e => e,
        })?;
        let checkpoints = connect(&path, options).map_err(|e| diagnose(&path, e))?;
        let (wake, woken) = mpsc::sync_channel(1);
        let checkpointer = std::thread::Builder::new()
            .name("ci-store-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpoints, &woken))
            .map_err(Error::Thread)?;
        // Replaces the writer's inline autocheckpoint. The hook goes with
        // the writer's connection, and with it the only sender, which ends
        // the checkpoint loop.
        writer.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: i32| {
            if pages >= CHECKPOINT_PAGES {
                // Full means a checkpoint is already due; nothing to add.
                let _ = wake.try_send(());
            }
            Ok(())
        }))?;
        let reader_path = path.clone();
        Ok(SqliteStore {
            path,
            readers: Arc::new(Readers::new(move || Ok(connect(&reader_path, options)?))),
            writer: Writer::new(writer),
            checkpointer: Some(checkpointer),
            projects: ProjectCache::default(),
            _owner: owner,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `PRAGMA integrity_check` and returns its verdict (`"ok"` when
    /// the file is sound).
    pub fn integrity_check(&self) -> Result<String, Error> {
        self.readers
            .with(|r| Ok(r.query_row("PRAGMA integrity_check", [], |row| row.get(0))?))
    }

    /// Runs `f` in a transaction on the writer connection.
    async fn write<T: Send + 'static>(
        &self,
        cost: Cost,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, Error> + Send + 'static,
    ) -> ci_core::Result<T> {
        Ok(self.writer.write(cost, f).await?)
    }

    /// Runs `f` with the writer connection, outside a transaction: the
    /// queue's reads, which must see the queue's own writes.
    async fn queue_read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, Error> + Send + 'static,
    ) -> ci_core::Result<T> {
        Ok(self.writer.with_connection(Cost::Short, f).await?)
    }

    /// Runs `f` with a reader connection.
    async fn read<T: Send + 'static>(
        &self,
        cost: Cost,
        f: impl FnOnce(&Connection) -> Result<T, Error> + Send + 'static,
    ) -> ci_core::Result<T> {
        Ok(self.readers.read(cost, f).await?)
    }

    /// A reader connection for tests and tools, used synchronously.
    #[doc(hidden)]
    pub fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> Result<T, Error>) -> Result<T, Error> {
        self.readers.with(f)
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Removing the WAL hook drops the only sender, which ends the
        // checkpoint loop. Nobody else holds the writer now (we are being
        // dropped), so the lock is free.
        if let Ok(mut conn) = self.writer.try_lock() {
            let unhook = conn.wal_hook(None::<fn(&mut rusqlite::hooks::Wal, i32) -> rusqlite::Result<()>>);
            if let Err(e) = unhook {
                tracing::warn!(error = %e, "cannot remove the WAL hook");
                return; // The thread ends when the writer connection closes.
            }
            if let Some(thread) = self.checkpointer.take() {
                let _ = thread.join();
            }
        }
    }
}

/// A project's branch filter as stored (JSON).
fn branches_text(p: &Project) -> String {
    serde_json::to_string(&p.branches).unwrap_or_default()
}

/// A project's forge as stored (JSON; NULL for none).
fn forge_text(p: &Project) -> Option<String> {
    p.forge
        .as_ref()
        .map(|f| serde_json::to_string(f).unwrap_or_default())
}

/// Projects as last read, by name: every build's creation reads its
/// project, and projects change seldom.
///
/// N.B.: every write of a project goes through this store (it holds the
/// file's `flock`) and forgets all of them after committing. A read that
/// began before a write is not kept: it fills only if no write happened
/// since it looked (the generation).
#[derive(Debug, Default)]
struct ProjectCache(std::sync::Mutex<(u64, std::collections::HashMap<String, Project>)>);

impl ProjectCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, std::collections::HashMap<String, Project>)> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The project, or the generation to fill it with.
    fn get(&self, name: &str) -> Result<Project, u64> {
        let cache = self.lock();
        cache.1.get(name).cloned().ok_or(cache.0)
    }

    fn fill(&self, generation: u64, project: &Project) {
        let mut cache = self.lock();
        if cache.0 == generation {
            cache.1.insert(project.name.clone(), project.clone());
        }
    }

    fn forget(&self) {
        let mut cache = self.lock();
        cache.0 += 1;
        cache.1.clear();
    }
}

/// Why a renewal found nothing to renew, from what the step is now.
fn refusal(tx: &Transaction<'_>, id: StepId, attempt: Option<Attempt>, agent: Option<AgentId>) -> Error {
    match get_step(tx, id) {
        Ok(step) => match ci_core::store::refuse_renewal(step.as_ref(), id, attempt, agent) {
            Some(e) => Error::Refused(e),
            None => Error::Corrupt(format!("step {id} is running but its lease could not be renewed")),
        },
        Err(e) => e,
    }
}

/// The queue, oldest first, read by the status index without a sort.
///
/// N.B.: its callers stop reading where they need to. A bound `LIMIT`
/// makes SQLite (built with STAT4) plan the query again for every new
/// value, and the queue is read with a new one on most passes: parsing SQL
/// was the largest part of the server's CPU per build.
pub(crate) const QUEUED: &str = concat!(
    "SELECT ",
    step_columns!(),
    " FROM steps WHERE status = 'queued' ORDER BY id"
);

/// The queued steps asking for one label set, oldest first, read by the
/// partial index `steps_queued_labels` (named: the planner would rather
/// walk the whole queue by `steps_status`).
pub(crate) const QUEUED_WITH: &str = concat!(
    "SELECT ",
    step_columns!(),
    " FROM steps INDEXED BY steps_queued_labels WHERE status = 'queued' AND labels = ?1 ORDER BY id"
);

fn leases(
    conn: &Connection,
    sql_tail: &str,
    p: impl rusqlite::Params,
    most: usize,
) -> Result<Vec<Lease>, Error> {
    let sql =
        format!("SELECT id, attempt, agent_id, lease_until FROM steps WHERE status = 'running' {sql_tail}");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(p, lease_from_row)?.take(most);
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// === impl Queue ===

#[async_trait]
impl Queue for SqliteStore {
    async fn create_build(&self, new: &NewBuild, now: Timestamp) -> ci_core::Result<Build> {
        let new = new.clone();
        self.write(Cost::Short, move |tx| {
            let source = &new.source;
            // N.B.: the next number is read from the index `builds_number`,
            // not counted in `projects.last_number` (left from migration 10):
            // updating the project's row wrote one more page to the WAL on
            // every build. Builds are never deleted without their project.
            let number: Option<i64> = tx
                .prepare_cached(
                    "SELECT (SELECT COALESCE(MAX(number), 0) + 1 FROM builds WHERE project = ?1)
                     FROM projects WHERE name = ?1",
                )?
                .query_row([&source.project], |r| r.get(0))
                .optional()?;
            let Some(number) = number else {
                return Err(Error::Refused(ci_core::Error::ProjectNotFound(source.project.clone())));
            };
            if let Some(d) = &source.delivery {
                let seen = tx
                    .prepare_cached("SELECT 1 FROM builds WHERE delivery = ?1")?
                    .query_row([d], |_| Ok(()))
                    .optional()?;
                if seen.is_some() {
                    return Err(Error::Refused(ci_core::Error::Conflict(format!(
                        "delivery {d} already made a build"
                    ))));
                }
            }
            let event = source.event.map(|e| match serde_json::to_value(e) {
                Ok(serde_json::Value::String(s)) => s,
                _ => String::new(),
            });
            let sql = format!(
                "INSERT INTO builds (repo, hash, branch, command, image, timeout_ms, status, created_at, labels,
                                     project, number, event, subject, author, untrusted, delivery)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
                 RETURNING {BUILD_COLUMNS}"
            );
            let build = tx.prepare_cached(&sql)?.query_row(
                params![
                    new.repo.as_str(),
                    new.hash.as_str(),
                    new.branch,
                    new.command,
                    new.image,
                    new.timeout_ms.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
                    ts(now),
                    labels_text(&new.labels),
                    source.project,
                    number,
                    event,
                    source.subject,
                    source.author,
                    source.untrusted,
                    source.delivery,
                ],
                build_from_row,
            )?;
            if let Some(why) = &new.failure {
                let (step, log) = Step::failed(StepId(0), &build, why);
                let id: i64 = tx
                    .prepare_cached(
                        "INSERT INTO steps (build_id, name, command, status, exit_code, created_at, finished_at)
                         VALUES (?1, ?2, ?3, 'failed', ?4, ?5, ?5) RETURNING id",
                    )?
                    .query_row(
                        params![build.id.0, step.name, step.command, step.exit_code, ts(now)],
                        |r| r.get(0),
                    )?;
                tx.prepare_cached(
                    "INSERT INTO step_logs (step_id, attempt, stdout, stderr) VALUES (?1, 0, ?2, ?3)",
                )?
                .execute(params![id, log.stdout, log.stderr])?;
                tx.prepare_cached("UPDATE builds SET status = 'failed' WHERE id = ?1")?
                    .execute([build.id.0])?;
                let build = Build {
                    status: BuildStatus::Failed,
                    ..build
                };
                return with_steps(tx, build);
            }
            let mut insert = tx.prepare_cached(
                "INSERT INTO steps (build_id, name, command, image, timeout_ms, labels, depends_on,
                                    allow_failure, retries_left, matrix, status, created_at,
                                    retry_on, services, secrets)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) RETURNING id",
            )?;
            // N.B.: the steps are made here, not read back.
            let mut steps = Vec::new();
            for n in new.plan() {
                let step = Step::new(StepId(0), &build, &n);
                let status = step.status;
                let id: i64 = insert.query_row(params![
                    build.id.0,
                    n.name,
                    n.command,
                    n.image,
                    n.timeout_ms.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
                    labels_text(&n.labels),
                    serde_json::to_string(&n.depends_on).unwrap_or_default(),
                    n.allow_failure,
                    n.retries,
                    serde_json::to_string(&n.matrix).unwrap_or_default(),
                    status.as_str(),
                    ts(now),
                    n.retry_on.bits(),
                    (!n.services.is_empty()).then(|| serde_json::to_string(&n.services).unwrap_or_default()),
                    serde_json::to_string(&n.secrets).unwrap_or_default(),
                ], |r| r.get(0))?;
                steps.push(Step { id: StepId(id), ..step });
            }
            let mut build = Build { steps, ..build };
            build.summarize();
            Ok(build)
        })
        .await
    }

    async fn queued(&self, n: usize) -> ci_core::Result<Vec<Step>> {
        self.queue_read(move |conn| {
            // N.B.: no bound LIMIT (see QUEUED).
            let mut stmt = conn.prepare_cached(QUEUED)?;
            let steps = stmt.query_map([], step_from_row)?.take(n);
            let steps: Vec<Step> = steps.collect::<rusqlite::Result<_>>()?;
            with_origin(conn, steps)
        })
        .await
    }

    async fn queued_label_sets(&self) -> ci_core::Result<Vec<Labels>> {
        self.queue_read(|conn| {
            // N.B.: one index seek per set (a loose index scan), not a walk
            // over every queued step as DISTINCT does.
            let mut stmt = conn.prepare_cached(
                "WITH RECURSIVE sets(l) AS (
                    SELECT MIN(labels) FROM steps INDEXED BY steps_queued_labels WHERE status = 'queued'
                    UNION ALL
                    SELECT (SELECT MIN(labels) FROM steps INDEXED BY steps_queued_labels
                            WHERE status = 'queued' AND labels > sets.l)
                    FROM sets WHERE l IS NOT NULL
                 ) SELECT l FROM sets WHERE l IS NOT NULL",
            )?;
            let sets = stmt.query_map([], |r| Ok(labels_from(&r.get::<_, String>(0)?)))?;
            Ok(sets.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn queued_with(&self, labels: &Labels, n: usize) -> ci_core::Result<Vec<Step>> {
        let labels = labels_text(labels);
        self.queue_read(move |conn| {
            // N.B.: no bound LIMIT (see QUEUED); the partial index gives
            // the order.
            let mut stmt = conn.prepare_cached(QUEUED_WITH)?;
            let steps = stmt.query_map([labels], step_from_row)?.take(n);
            let steps: Vec<Step> = steps.collect::<rusqlite::Result<_>>()?;
            with_origin(conn, steps)
        })
        .await
    }

    async fn start(&self, claims: &[Claim], now: Timestamp) -> ci_core::Result<Vec<Step>> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let claims = claims.to_vec();
        self.write(Cost::Short, move |tx| {
            let mut update = tx.prepare_cached(concat!(
                "UPDATE steps SET status = 'running', attempt = attempt + 1,
                    agent_id = ?2, agent_url = ?3, started_at = ?4, lease_until = ?5
                 WHERE id = ?1 AND status = 'queued' RETURNING ",
                step_columns!()
            ))?;
            let mut running = tx
                .prepare_cached("UPDATE builds SET status = 'running' WHERE id = ?1 AND status = 'queued'")?;
            let mut started = Vec::with_capacity(claims.len());
            for c in &claims {
                let step = update
                    .query_row(
                        params![c.step.0, c.agent.0, c.agent_url, ts(now), ts(c.lease_until)],
                        step_from_row,
                    )
                    .optional()?;
                let Some(step) = step else {
                    continue;
                };
                running.execute([step.build.0])?;
                started.push(step);
            }
            with_origin(tx, started)
        })
        .await
    }

    async fn renew(
        &self,
        id: StepId,
        attempt: Option<Attempt>,
        agent: Option<AgentId>,
        until: Timestamp,
    ) -> ci_core::Result<Lease> {
        self.write(Cost::Short, move |tx| {
            let renewed = tx
                .prepare_cached(
                    "UPDATE steps SET lease_until = MAX(COALESCE(lease_until, 0), ?4)
                     WHERE id = ?1 AND status = 'running' AND attempt = COALESCE(?2, attempt)
                       AND (?3 IS NULL OR agent_id = ?3)
                     RETURNING id, attempt, agent_id, lease_until",
                )?
                .query_row(
                    params![id.0, attempt.map(|a| a.0), agent.map(|a| a.0), ts(until)],
                    lease_from_row,
                )
                .optional()?;
            renewed.ok_or_else(|| refusal(tx, id, attempt, agent))
        })
        .await
    }

    async fn requeue(
        &self,
        id: StepId,
        attempt: Attempt,
        why: Requeue,
        now: Timestamp,
    ) -> ci_core::Result<Option<Moved>> {
        self.write(Cost::Short, move |tx| {
            let step = tx
                .prepare_cached(
                    "SELECT build_id, retries_left, retry_on, (SELECT status FROM builds WHERE id = build_id)
                     FROM steps WHERE id = ?1 AND status = 'running' AND attempt = ?2",
                )?
                .query_row(params![id.0, attempt.0], |r| {
                    Ok((
                        BuildId(r.get(0)?),
                        r.get::<_, u32>(1)?,
                        RetryOn::from_bits(r.get(2)?),
                        r.get::<_, Option<String>>(3)?,
                    ))
                })
                .optional()?;
            let Some((build, retries_left, retry_on, before)) = step else {
                return Ok(None);
            };
            let before = before.and_then(|b| BuildStatus::from_str(&b).ok());
            let counted = why == Requeue::Lost && retry_on.agent_lost;
            if counted && retries_left == 0 {
                // N.B.: what the attempt streamed becomes its log, with why
                // it ended, as a result would.
                let mut log = ci_core::store::assemble(attempt, &pieces(tx, id, attempt, None, None)?);
                log.stderr.push_str(Requeue::LOST_LINE);
                tx.prepare_cached(
                    "UPDATE steps SET status = 'failed', exit_code = ?2, finished_at = ?3, lease_until = NULL
                     WHERE id = ?1",
                )?
                .execute(params![id.0, Completion::NOT_RUN, ts(now)])?;
                tx.prepare_cached(
                    "INSERT INTO step_logs (step_id, attempt, stdout, stderr) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (step_id, attempt) DO UPDATE SET stdout = excluded.stdout, stderr = excluded.stderr",
                )?
                .execute(params![id.0, attempt.0, log.stdout, log.stderr])?;
                delete_live(tx, id, attempt)?;
                return Ok(Some(settle(tx, build, before, vec![(id, StepStatus::Failed)], now)?));
            }
            tx.prepare_cached(
                "UPDATE steps SET status = 'queued', lease_until = NULL, retries_left = retries_left - ?2
                 WHERE id = ?1",
            )?
            .execute(params![id.0, u32::from(counted)])?;
            refresh(tx, build)?;
            Ok(Some(Moved {
                build,
                steps: vec![(id, StepStatus::Queued)],
                before,
                after: build_status_of(tx, build)?,
                duration_ms: None,
            }))
        })
        .await
    }

    async fn finish(
        &self,
        id: StepId,
        attempt: Attempt,
        result: &Completion,
        now: Timestamp,
    ) -> ci_core::Result<Option<Moved>> {
        let cost = if result.stdout.len() + result.stderr.len() > SHORT_LOG {
            Cost::Long
        } else {
            Cost::Short
        };
        let result = result.clone();
        self.write(cost, move |tx| {
            let step = tx
                .prepare_cached(
                    "SELECT build_id, status, attempt, retries_left,
                            (SELECT status FROM builds WHERE id = build_id), retry_on
                     FROM steps WHERE id = ?1",
                )?
                .query_row([id.0], |r| {
                    Ok((
                        BuildId(r.get(0)?),
                        r.get::<_, String>(1)?,
                        Attempt(r.get(2)?),
                        r.get::<_, u32>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        RetryOn::from_bits(r.get(5)?),
                    ))
                })
                .optional()?;
            let Some((build, status, current, retries_left, before, retry_on)) = step else {
                return Ok(None);
            };
            let before = before.and_then(|b| BuildStatus::from_str(&b).ok());
            let status = StepStatus::from_str(&status).unwrap_or(StepStatus::Canceled);
            if status.is_finished() || current != attempt || attempt.0 == 0 {
                return Ok(None);
            }
            // N.B.: a result already taken (a failure whose step was queued
            // for a retry) is not taken twice.
            if status == StepStatus::Queued && final_log_row(tx, id, attempt)?.is_some() {
                return Ok(None);
            }
            let retry = retry_on.retries_exit(result.exit_code) && retries_left > 0;
            let status = if retry {
                StepStatus::Queued
            } else {
                StepStatus::from_exit_code(result.exit_code)
            };
            if retry {
                tx.prepare_cached(
                    "UPDATE steps SET status = 'queued', retries_left = retries_left - 1,
                        exit_code = NULL, lease_until = NULL WHERE id = ?1",
                )?
                .execute([id.0])?;
            } else {
                tx.prepare_cached(
                    "UPDATE steps SET status = ?2, exit_code = ?3, finished_at = ?4, lease_until = NULL
                     WHERE id = ?1",
                )?
                .execute(params![id.0, status.as_str(), result.exit_code, ts(now)])?;
            }
            tx.prepare_cached(
                "INSERT INTO step_logs (step_id, attempt, stdout, stderr) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (step_id, attempt) DO UPDATE SET stdout = excluded.stdout, stderr = excluded.stderr",
            )?
            .execute(params![id.0, attempt.0, result.stdout, result.stderr])?;
            delete_live(tx, id, attempt)?;
            Ok(Some(settle(tx, build, before, vec![(id, status)], now)?))
        })
        .await
    }

    async fn cancel(&self, build: BuildId, now: Timestamp) -> ci_core::Result<Option<(Vec<Lease>, Moved)>> {
        self.write(Cost::Short, move |tx| {
            let before = build_status_of(tx, build)?;
            if before.is_none_or(BuildStatus::is_finished) {
                return Ok(None);
            }
            let running = leases(tx, "AND build_id = ?1 ORDER BY id", [build.0], usize::MAX)?;
            let canceled: Vec<(StepId, StepStatus)> = tx
                .prepare_cached(
                    "UPDATE steps SET status = 'canceled', finished_at = ?2, lease_until = NULL
                     WHERE build_id = ?1 AND status IN ('pending', 'queued', 'running') RETURNING id",
                )?
                .query_map(params![build.0, ts(now)], |r| {
                    Ok((StepId(r.get(0)?), StepStatus::Canceled))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let moved = settle(tx, build, before, canceled, now)?;
            Ok(Some((running, moved)))
        })
        .await
    }

    async fn retry(&self, build: BuildId, now: Timestamp) -> ci_core::Result<Option<Moved>> {
        self.write(Cost::Short, move |tx| {
            let before = build_status_of(tx, build)?;
            if !before.is_some_and(BuildStatus::is_finished) {
                return Ok(None);
            }
            let pending: Vec<(StepId, StepStatus)> = tx
                .prepare_cached(
                    "UPDATE steps SET status = 'pending', exit_code = NULL, finished_at = NULL
                     WHERE build_id = ?1 AND status <> 'success' RETURNING id",
                )?
                .query_map([build.0], |r| Ok((StepId(r.get(0)?), StepStatus::Pending)))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(Some(settle(tx, build, before, pending, now)?))
        })
        .await
    }

    async fn leases(&self) -> ci_core::Result<Vec<Lease>> {
        self.queue_read(|conn| leases(conn, "ORDER BY id", [], usize::MAX))
            .await
    }

    async fn lapsed(&self, now: Timestamp, n: usize) -> ci_core::Result<Vec<Lease>> {
        self.queue_read(move |conn| {
            leases(
                conn,
                "AND COALESCE(lease_until, 0) <= ?1 ORDER BY lease_until, id",
                params![ts(now)],
                n,
            )
        })
        .await
    }

    async fn next_deadline(&self) -> ci_core::Result<Option<Timestamp>> {
        self.queue_read(|conn| {
            let min: Option<i64> = conn
                .prepare_cached("SELECT MIN(COALESCE(lease_until, 0)) FROM steps WHERE status = 'running'")?
                .query_row([], |r| r.get(0))?;
            Ok(min.map(|m| Timestamp(m.max(0) as u64)))
        })
        .await
    }

    async fn extend_leases(&self, until: Timestamp) -> ci_core::Result<()> {
        self.write(Cost::Short, move |tx| {
            tx.prepare_cached(
                "UPDATE steps SET lease_until = MAX(COALESCE(lease_until, 0), ?1) WHERE status = 'running'",
            )?
            .execute([ts(until)])?;
            Ok(())
        })
        .await
    }
}

// === impl Logs ===

#[async_trait]
impl Logs for SqliteStore {
    async fn append_log(&self, id: StepId, attempt: Attempt, pieces: &[LogPiece]) -> ci_core::Result<usize> {
        let bytes: usize = pieces.iter().map(|p| p.data.len()).sum();
        let cost = if bytes > SHORT_LOG || pieces.len() > 256 {
            Cost::Long
        } else {
            Cost::Short
        };
        let pieces = pieces.to_vec();
        self.write(cost, move |tx| {
            let running: bool = tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM steps WHERE id = ?1 AND attempt = ?2 AND status = 'running')",
                )?
                .query_row(params![id.0, attempt.0], |r| r.get(0))?;
            if !running {
                return Ok(0);
            }
            let before = tx
                .prepare_cached(
                    "SELECT last_seq, stdout_bytes, stderr_bytes FROM live_logs
                     WHERE step_id = ?1 AND attempt = ?2",
                )?
                .query_row(params![id.0, attempt.0], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                })
                .optional()?;
            let mut taken = match before {
                Some((last, out, err)) => Taken::new(
                    u64::try_from(last).ok(),
                    [usize::try_from(out).unwrap_or(0), usize::try_from(err).unwrap_or(0)],
                ),
                None => Taken::new(None, [0, 0]),
            };
            let before_last = taken.last;
            let rows = taken.take(&pieces);
            let Some(last) = taken.last.filter(|l| before_last != Some(*l)) else {
                return Ok(0); // nothing new: repeats only
            };
            let seq = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            let size = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            for row in &rows {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO log_pieces (step_id, attempt, seq, stream, data)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![id.0, attempt.0, seq(row.seq), stream_name(row.stream), row.data])?;
            }
            tx.prepare_cached(
                "INSERT INTO live_logs (step_id, attempt, last_seq, stdout_bytes, stderr_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (step_id, attempt) DO UPDATE SET last_seq = excluded.last_seq,
                    stdout_bytes = excluded.stdout_bytes, stderr_bytes = excluded.stderr_bytes",
            )?
            .execute(params![id.0, attempt.0, seq(last), size(taken.bytes[0]), size(taken.bytes[1])])?;
            Ok(taken.added)
        })
        .await
    }

    async fn log_pieces(
        &self,
        id: StepId,
        attempt: Attempt,
        after: Option<u64>,
        n: usize,
    ) -> ci_core::Result<Vec<LogPiece>> {
        self.read(Cost::Long, move |conn| pieces(conn, id, attempt, after, Some(n)))
            .await
    }

    async fn log(&self, id: StepId, attempt: Option<Attempt>) -> ci_core::Result<Option<BuildLog>> {
        self.read(Cost::Long, move |conn| {
            let Some(attempt) = attempt.map_or_else(|| step_attempt(conn, id), |a| Ok(Some(a)))? else {
                return Ok(None);
            };
            let final_log = conn
                .prepare_cached("SELECT stdout, stderr FROM step_logs WHERE step_id = ?1 AND attempt = ?2")?
                .query_row(params![id.0, attempt.0], |r| {
                    Ok(BuildLog {
                        attempt,
                        stdout: r.get(0)?,
                        stderr: r.get(1)?,
                        complete: true,
                    })
                })
                .optional()?;
            if final_log.is_some() {
                return Ok(final_log);
            }
            let pieces = pieces(conn, id, attempt, None, None)?;
            Ok((!pieces.is_empty()).then(|| ci_core::store::assemble(attempt, &pieces)))
        })
        .await
    }

    async fn log_info(&self, id: StepId, attempt: Option<Attempt>) -> ci_core::Result<Option<LogInfo>> {
        self.read(Cost::Short, move |conn| {
            let Some(attempt) = attempt.map_or_else(|| step_attempt(conn, id), |a| Ok(Some(a)))? else {
                return Ok(None);
            };
            if let Some(row) = final_log_row(conn, id, attempt)? {
                // N.B.: blob handles read a value's length, not its pages.
                let len = |column: &str| -> Result<u64, Error> {
                    Ok(conn.blob_open("main", "step_logs", column, row, true)?.len() as u64)
                };
                return Ok(Some(LogInfo {
                    attempt,
                    complete: true,
                    stdout_len: len("stdout")?,
                    stderr_len: len("stderr")?,
                }));
            }
            let live = conn
                .prepare_cached(
                    "SELECT stdout_bytes, stderr_bytes FROM live_logs WHERE step_id = ?1 AND attempt = ?2",
                )?
                .query_row(params![id.0, attempt.0], |r| {
                    Ok((
                        r.get::<_, i64>(0)?.max(0) as u64,
                        r.get::<_, i64>(1)?.max(0) as u64,
                    ))
                })
                .optional()?;
            Ok(live.filter(|(out, err)| out + err > 0).map(|(out, err)| LogInfo {
                attempt,
                complete: false,
                stdout_len: out,
                stderr_len: err,
            }))
        })
        .await
    }

    async fn read_log(
        &self,
        id: StepId,
        attempt: Attempt,
        stream: Stream,
        offset: u64,
        max: usize,
    ) -> ci_core::Result<Vec<u8>> {
        self.read(Cost::Long, move |conn| {
            let Some(row) = final_log_row(conn, id, attempt)? else {
                return Ok(Vec::new());
            };
            let blob = conn.blob_open("main", "step_logs", stream_name(stream), row, true)?;
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(blob.len());
            let mut buf = vec![0; max.min(blob.len() - start)];
            let n = blob.read_at(&mut buf, start)?;
            buf.truncate(n);
            Ok(buf)
        })
        .await
    }
}

/// The latest attempt of a step, if the step exists.
fn step_attempt(conn: &Connection, id: StepId) -> Result<Option<Attempt>, Error> {
    Ok(conn
        .prepare_cached("SELECT attempt FROM steps WHERE id = ?1")?
        .query_row([id.0], |r| Ok(Attempt(r.get(0)?)))
        .optional()?)
}

// === impl Builds ===

#[async_trait]
impl Builds for SqliteStore {
    async fn build(&self, id: BuildId) -> ci_core::Result<Option<Build>> {
        self.read(Cost::Short, move |conn| get_build(conn, id)).await
    }

    async fn step(&self, id: StepId) -> ci_core::Result<Option<Step>> {
        self.read(Cost::Short, move |conn| get_step(conn, id)).await
    }

    async fn list_builds(&self, page: Page) -> ci_core::Result<Vec<Build>> {
        self.read(Cost::Short, move |conn| {
            let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id < ?1 ORDER BY id DESC");
            let before = page.before.map_or(i64::MAX, |b| b.0);
            query_builds(conn, &sql, [before], page.offset, page.limit)
        })
        .await
    }

    async fn find_builds(&self, filter: &BuildFilter, page: Page) -> ci_core::Result<Vec<Build>> {
        if filter == &BuildFilter::default() {
            return self.list_builds(page).await;
        }
        let filter = filter.clone();
        self.read(Cost::Short, move |conn| {
            // N.B.: every value is a bound parameter; only the shape of
            // the query depends on which filters are given.
            let mut sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id < ?1");
            let mut args: Vec<rusqlite::types::Value> = vec![page.before.map_or(i64::MAX, |b| b.0).into()];
            if let Some(p) = filter.project {
                args.push(p.into());
                sql.push_str(&format!(" AND project = ?{}", args.len()));
            }
            if let Some(b) = filter.branch {
                args.push(b.into());
                sql.push_str(&format!(" AND branch = ?{}", args.len()));
            }
            if !filter.status.is_empty() {
                let list: Vec<&str> = filter.status.iter().map(|s| s.as_str()).collect();
                args.push(serde_json::to_string(&list).unwrap_or_default().into());
                sql.push_str(&format!(
                    " AND status IN (SELECT value FROM json_each(?{}))",
                    args.len()
                ));
            }
            sql.push_str(" ORDER BY id DESC");
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), build_from_row)?
                .skip(page.offset)
                .take(page.limit);
            let builds: Vec<Build> = rows.collect::<rusqlite::Result<_>>()?;
            builds.into_iter().map(|b| with_steps(conn, b)).collect()
        })
        .await
    }

    async fn build_by_number(&self, project: &str, number: u64) -> ci_core::Result<Option<Build>> {
        let project = project.to_owned();
        self.read(Cost::Short, move |conn| {
            let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE project = ?1 AND number = ?2");
            let build = conn
                .prepare_cached(&sql)?
                .query_row(
                    params![project, i64::try_from(number).unwrap_or(i64::MAX)],
                    build_from_row,
                )
                .optional()?;
            build.map(|b| with_steps(conn, b)).transpose()
        })
        .await
    }

    async fn status_counts(&self) -> ci_core::Result<Vec<(BuildStatus, u64)>> {
        // An index scan over the whole history.
        self.read(Cost::Long, |conn| {
            let mut stmt = conn.prepare_cached("SELECT status, COUNT(*) FROM builds GROUP BY status")?;
            let found: Vec<(String, i64)> = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(BuildStatus::ALL
                .iter()
                .map(|st| {
                    let n = found
                        .iter()
                        .find(|(s, _)| s == st.as_str())
                        .map_or(0, |(_, n)| *n);
                    (*st, n.max(0) as u64)
                })
                .collect())
        })
        .await
    }
}

// === impl Agents ===

#[async_trait]
impl Agents for SqliteStore {
    async fn register_agent(&self, e: &Enrollment, now: Timestamp) -> ci_core::Result<AgentRecord> {
        let e = e.clone();
        self.write(Cost::Short, move |tx| {
            tx.prepare_cached("DELETE FROM agents WHERE url = ?1")?
                .execute([&e.url])?;
            tx.prepare_cached(
                "INSERT INTO agents (url, registered_at, secret, capacity, labels) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![e.url, ts(now), e.secret, e.capacity.max(1), labels_text(&e.labels)])?;
            Ok(AgentRecord {
                id: AgentId(tx.last_insert_rowid()),
                url: e.url,
                registered_at: now,
                secret: e.secret,
                capacity: e.capacity.max(1),
                labels: e.labels,
            })
        })
        .await
    }

    async fn remove_agent(&self, id: AgentId) -> ci_core::Result<()> {
        self.write(Cost::Short, move |tx| {
            tx.prepare_cached("DELETE FROM agents WHERE id = ?1")?
                .execute([id.0])?;
            Ok(())
        })
        .await
    }

    async fn agents(&self) -> ci_core::Result<Vec<AgentRecord>> {
        self.read(Cost::Short, |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, url, registered_at, secret, capacity, labels FROM agents ORDER BY id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(AgentRecord {
                    id: AgentId(r.get(0)?),
                    url: r.get(1)?,
                    registered_at: Timestamp(r.get::<_, i64>(2)?.max(0) as u64),
                    secret: r.get(3)?,
                    capacity: u32::try_from(r.get::<_, i64>(4)?).unwrap_or(1).max(1),
                    labels: labels_from(&r.get::<_, String>(5)?),
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn issue_credential(
        &self,
        name: &str,
        digest: &[u8],
        now: Timestamp,
    ) -> ci_core::Result<Credential> {
        let (name, digest) = (name.to_owned(), digest.to_vec());
        self.write(Cost::Short, move |tx| {
            let id: i64 = tx
                .prepare_cached(
                    "INSERT INTO agent_credentials (name, digest, created_at) VALUES (?1, ?2, ?3) RETURNING id",
                )?
                .query_row(params![name, digest, ts(now)], |r| r.get(0))?;
            Ok(Credential {
                id,
                name,
                created_at: now,
                revoked_at: None,
            })
        })
        .await
    }

    async fn credential(&self, digest: &[u8]) -> ci_core::Result<Option<Credential>> {
        let digest = digest.to_vec();
        self.read(Cost::Short, move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT id, name, created_at, revoked_at FROM agent_credentials WHERE digest = ?1",
                )?
                .query_row([digest], |r| {
                    Ok(Credential {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        created_at: Timestamp(r.get::<_, i64>(2)?.max(0) as u64),
                        revoked_at: r.get::<_, Option<i64>>(3)?.map(|t| Timestamp(t.max(0) as u64)),
                    })
                })
                .optional()?)
        })
        .await
    }

    async fn revoke_credential(&self, id: i64, now: Timestamp) -> ci_core::Result<bool> {
        self.write(Cost::Short, move |tx| {
            let found = tx
                .prepare_cached(
                    "UPDATE agent_credentials SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                )?
                .execute(params![id, ts(now)])?;
            Ok(found > 0)
        })
        .await
    }
}

// === impl Projects ===

const PROJECT_COLUMNS: &str =
    "name, repo, default_branch, poll_interval, branches, cancel_previous, forge, created_at";

fn project_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Project> {
    let bad = |i, e: serde_json::Error| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    };
    let forge = match row.get::<_, Option<String>>(6)? {
        Some(json) => Some(serde_json::from_str::<Forge>(&json).map_err(|e| bad(6, e))?),
        None => None,
    };
    Ok(Project {
        name: row.get(0)?,
        repo: row.get(1)?,
        default_branch: row.get(2)?,
        poll_interval_s: row.get::<_, i64>(3)?.clamp(0, i64::from(u32::MAX)) as u32,
        branches: serde_json::from_str(&row.get::<_, String>(4)?).map_err(|e| bad(4, e))?,
        cancel_previous: row.get(5)?,
        forge,
        created_at: Timestamp(row.get::<_, i64>(7)?.max(0) as u64),
    })
}

fn project_exists(tx: &Connection, name: &str) -> Result<(), Error> {
    let found = tx
        .prepare_cached("SELECT 1 FROM projects WHERE name = ?1")?
        .query_row([name], |_| Ok(()))
        .optional()?;
    found.ok_or_else(|| Error::Refused(ci_core::Error::ProjectNotFound(name.to_owned())))
}

#[async_trait]
impl Projects for SqliteStore {
    async fn create_project(&self, project: &Project, now: Timestamp) -> ci_core::Result<Project> {
        let p = Project {
            created_at: now,
            ..project.clone()
        };
        let created = self
            .write(Cost::Short, move |tx| {
                let inserted = tx
                    .prepare_cached(
                        "INSERT INTO projects (name, repo, default_branch, poll_interval, branches,
                                           cancel_previous, forge, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (name) DO NOTHING",
                    )?
                    .execute(params![
                        p.name,
                        p.repo,
                        p.default_branch,
                        p.poll_interval_s,
                        branches_text(&p),
                        p.cancel_previous,
                        forge_text(&p),
                        ts(now),
                    ])?;
                if inserted == 0 {
                    return Err(Error::Refused(ci_core::Error::Conflict(format!(
                        "project {:?} exists",
                        p.name
                    ))));
                }
                Ok(p)
            })
            .await;
        self.projects.forget();
        created
    }

    async fn update_project(&self, project: &Project) -> ci_core::Result<Project> {
        let p = project.clone();
        let updated = self
            .write(Cost::Short, move |tx| {
                let sql = format!(
                    "UPDATE projects SET repo = ?2, default_branch = ?3, poll_interval = ?4, branches = ?5,
                                     cancel_previous = ?6, forge = ?7
                 WHERE name = ?1 RETURNING {PROJECT_COLUMNS}"
                );
                let stored = tx
                    .prepare_cached(&sql)?
                    .query_row(
                        params![
                            p.name,
                            p.repo,
                            p.default_branch,
                            p.poll_interval_s,
                            branches_text(&p),
                            p.cancel_previous,
                            forge_text(&p),
                        ],
                        project_from_row,
                    )
                    .optional()?;
                stored.ok_or_else(|| Error::Refused(ci_core::Error::ProjectNotFound(p.name.clone())))
            })
            .await;
        self.projects.forget();
        updated
    }

    async fn project(&self, name: &str) -> ci_core::Result<Option<Project>> {
        let generation = match self.projects.get(name) {
            Ok(hit) => return Ok(Some(hit)),
            Err(generation) => generation,
        };
        let key = name.to_owned();
        let found = self
            .read(Cost::Short, move |conn| {
                let sql = format!("SELECT {PROJECT_COLUMNS} FROM projects WHERE name = ?1");
                Ok(conn
                    .prepare_cached(&sql)?
                    .query_row([key], project_from_row)
                    .optional()?)
            })
            .await?;
        if let Some(p) = &found {
            self.projects.fill(generation, p);
        }
        Ok(found)
    }

    async fn projects(&self) -> ci_core::Result<Vec<Project>> {
        self.read(Cost::Short, move |conn| {
            let sql = format!("SELECT {PROJECT_COLUMNS} FROM projects ORDER BY name");
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map([], project_from_row)?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn delete_project(&self, name: &str) -> ci_core::Result<bool> {
        let name = name.to_owned();
        let deleted = self
            .write(Cost::Long, move |tx| {
                if name == Project::DEFAULT {
                    return Err(Error::Refused(ci_core::Error::Conflict(
                        "the default project cannot be deleted".into(),
                    )));
                }
                if project_exists(tx, &name).is_err() {
                    return Ok(false);
                }
                let unfinished = tx
                    .prepare_cached(
                        "SELECT 1 FROM builds WHERE project = ?1 AND status IN ('queued', 'running') LIMIT 1",
                    )?
                    .query_row([&name], |_| Ok(()))
                    .optional()?;
                if unfinished.is_some() {
                    return Err(Error::Refused(ci_core::Error::Conflict(format!(
                        "project {name:?} has unfinished builds: cancel them first"
                    ))));
                }
                // Steps, their logs, secrets and heads go by foreign key.
                tx.prepare_cached("DELETE FROM builds WHERE project = ?1")?
                    .execute([&name])?;
                tx.prepare_cached("DELETE FROM projects WHERE name = ?1")?
                    .execute([&name])?;
                Ok(true)
            })
            .await;
        self.projects.forget();
        deleted
    }

    async fn put_secret(
        &self,
        project: &str,
        name: &str,
        sealed: &[u8],
        now: Timestamp,
    ) -> ci_core::Result<()> {
        let (project, name, sealed) = (project.to_owned(), name.to_owned(), sealed.to_vec());
        self.write(Cost::Short, move |tx| {
            project_exists(tx, &project)?;
            tx.prepare_cached(
                "INSERT INTO secrets (project, name, sealed, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (project, name) DO UPDATE SET sealed = excluded.sealed, created_at = excluded.created_at",
            )?
            .execute(params![project, name, sealed, ts(now)])?;
            Ok(())
        })
        .await
    }

    async fn secret_names(&self, project: &str) -> ci_core::Result<Vec<(String, Timestamp)>> {
        let project = project.to_owned();
        self.read(Cost::Short, move |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT name, created_at FROM secrets WHERE project = ?1 ORDER BY name")?;
            let rows = stmt.query_map([project], |r| {
                Ok((r.get(0)?, Timestamp(r.get::<_, i64>(1)?.max(0) as u64)))
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn secrets(&self, project: &str, names: &[String]) -> ci_core::Result<Vec<(String, Vec<u8>)>> {
        let (project, names) = (project.to_owned(), names.to_vec());
        self.read(Cost::Short, move |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT sealed FROM secrets WHERE project = ?1 AND name = ?2")?;
            let mut found = Vec::new();
            for name in names {
                if let Some(v) = stmt.query_row(params![project, name], |r| r.get(0)).optional()? {
                    found.push((name, v));
                }
            }
            Ok(found)
        })
        .await
    }

    async fn delete_secret(&self, project: &str, name: &str) -> ci_core::Result<bool> {
        let (project, name) = (project.to_owned(), name.to_owned());
        self.write(Cost::Short, move |tx| {
            let n = tx
                .prepare_cached("DELETE FROM secrets WHERE project = ?1 AND name = ?2")?
                .execute(params![project, name])?;
            Ok(n > 0)
        })
        .await
    }

    async fn heads(&self, project: &str) -> ci_core::Result<Vec<(String, String)>> {
        let project = project.to_owned();
        self.read(Cost::Short, move |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT branch, sha FROM heads WHERE project = ?1 ORDER BY branch")?;
            let rows = stmt.query_map([project], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn set_heads(&self, project: &str, heads: &[(String, String)]) -> ci_core::Result<()> {
        let (project, heads) = (project.to_owned(), heads.to_vec());
        self.write(Cost::Short, move |tx| {
            project_exists(tx, &project)?;
            tx.prepare_cached("DELETE FROM heads WHERE project = ?1")?
                .execute([&project])?;
            let mut insert =
                tx.prepare_cached("INSERT INTO heads (project, branch, sha) VALUES (?1, ?2, ?3)")?;
            for (branch, sha) in heads {
                insert.execute(params![project, branch, sha])?;
            }
            Ok(())
        })
        .await
    }
}
