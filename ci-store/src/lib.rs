//! SQLite persistence for the ci build server: a [`BuildStore`] on a file.
//!
//! # Layout
//! - [`SqliteStore`]: the store. One writer connection and one reader
//!   connection, so API reads do not wait behind writes.
//! - [`Options`], [`Synchronous`]: durability settings.
//! - [`Error`]: what can go wrong opening or using the file.
//!
//! # Durability
//! The database runs in WAL mode. Every [`BuildStore`] method is one
//! transaction, committed before it returns, so nothing is acknowledged to a
//! client or an agent before it is in the file. With the default
//! `synchronous = NORMAL`, a committed transaction survives the process being
//! killed (SIGKILL, OOM, panic); a power loss or kernel crash may lose the
//! last transactions but never corrupts the file. `FULL` also survives power
//! loss, at the cost of an fsync per commit.
//!
//! # Build numbers
//! Build ids are an `INTEGER PRIMARY KEY AUTOINCREMENT`: SQLite never reuses
//! one, not after the row is deleted and not after a restart.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use ci_core::model::LogPiece;
use ci_core::{
    AgentId, AgentRecord, Attempt, Build, BuildId, BuildLog, BuildStatus, BuildStore, Completion, LogInfo,
    NewBuild, Page, Stream, Timestamp,
};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database file could not be opened or set up.
    #[error("cannot open database {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The database cannot be used where it is, and why (a missing or
    /// read-only directory, a read-only file).
    #[error("cannot open database {}: {why}", path.display())]
    Unusable {
        /// The file.
        path: PathBuf,
        /// What is wrong, and what SQLite said.
        why: String,
    },
    /// Another process (a second server) has the database open.
    #[error(
        "database {} is in use by another ci-server process: run one server per SQLite file \
         (stop the other one, or give this one its own DB_PATH)", .0.display()
    )]
    InUse(PathBuf),
    /// The file was written by a newer version of this program.
    #[error("database schema version {found} is newer than this program supports ({supported})")]
    TooNew {
        /// Version in the file.
        found: i64,
        /// Newest version this program knows.
        supported: i64,
    },
    /// A query failed (disk full, I/O error, locked too long).
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// The background checkpoint thread could not be started.
    #[error("cannot start the checkpoint thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A stored value makes no sense (edited by hand, or a bug).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl From<Error> for ci_core::Error {
    fn from(e: Error) -> Self {
        ci_core::Error::store(e)
    }
}

/// SQLite's `synchronous` setting, which trades commit latency for what a
/// committed transaction survives.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// No fsync: survives a process crash only if the OS does not crash.
    Off,
    /// fsync at checkpoints: survives process crashes; a power loss may lose
    /// the latest commits but not corrupt the file. The default.
    #[default]
    Normal,
    /// fsync on every commit: also survives power loss.
    Full,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Synchronous::Off => "OFF",
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

impl FromStr for Synchronous {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "off" => Ok(Synchronous::Off),
            "normal" => Ok(Synchronous::Normal),
            "full" => Ok(Synchronous::Full),
            _ => Err(format!("expected off, normal or full, got {s:?}")),
        }
    }
}

/// How to open the database.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Durability of commits.
    pub synchronous: Synchronous,
    /// How long to wait for a lock held by another process.
    pub busy_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            synchronous: Synchronous::Normal,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

const MIGRATIONS: &[&str] = &[
    // 1: builds, their logs, agents.
    "CREATE TABLE builds (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        repo        TEXT NOT NULL,
        hash        TEXT NOT NULL,
        branch      TEXT,
        command     TEXT NOT NULL,
        image       TEXT,
        timeout_ms  INTEGER,
        status      TEXT NOT NULL
                    CHECK (status IN ('queued', 'running', 'success', 'failed', 'canceled')),
        attempt     INTEGER NOT NULL DEFAULT 0,
        agent_id    INTEGER,
        agent_url   TEXT,
        exit_code   INTEGER,
        created_at  INTEGER NOT NULL,
        started_at  INTEGER,
        finished_at INTEGER
    );
    CREATE INDEX builds_queued ON builds (id) WHERE status = 'queued';
    CREATE INDEX builds_running ON builds (id) WHERE status = 'running';
    CREATE TABLE build_logs (
        build_id INTEGER NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
        attempt  INTEGER NOT NULL,
        stdout   TEXT NOT NULL,
        stderr   TEXT NOT NULL,
        UNIQUE (build_id, attempt)
    );
    CREATE TABLE agents (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        url           TEXT NOT NULL UNIQUE,
        registered_at INTEGER NOT NULL
    );",
    // 2: agents prove their identity with a per-registration secret.
    "ALTER TABLE agents ADD COLUMN secret TEXT;",
    // 3: live output while an attempt runs; status counts for metrics.
    "CREATE TABLE log_pieces (
        build_id INTEGER NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
        attempt  INTEGER NOT NULL,
        seq      INTEGER NOT NULL,
        stream   TEXT NOT NULL CHECK (stream IN ('stdout', 'stderr')),
        data     TEXT NOT NULL,
        PRIMARY KEY (build_id, attempt, seq)
    );
    DROP INDEX builds_queued;
    DROP INDEX builds_running;
    -- (status, id) order serves the queue, the running set and the counts.
    CREATE INDEX builds_status ON builds (status);",
    // 4: running totals of live output, so an append costs the same
    // however much was stored before.
    "CREATE TABLE live_logs (
        build_id     INTEGER NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
        attempt      INTEGER NOT NULL,
        last_seq     INTEGER NOT NULL,
        stdout_bytes INTEGER NOT NULL,
        stderr_bytes INTEGER NOT NULL,
        PRIMARY KEY (build_id, attempt)
    );
    INSERT INTO live_logs (build_id, attempt, last_seq, stdout_bytes, stderr_bytes)
        SELECT build_id, attempt, MAX(seq),
               SUM(CASE WHEN stream = 'stdout' THEN length(CAST(data AS BLOB)) ELSE 0 END),
               SUM(CASE WHEN stream = 'stderr' THEN length(CAST(data AS BLOB)) ELSE 0 END)
        FROM log_pieces GROUP BY build_id, attempt;",
];

const BUILD_COLUMNS: &str = "id, repo, hash, branch, command, image, timeout_ms, status, attempt, \
     agent_id, agent_url, exit_code, created_at, started_at, finished_at";

/// The SQLite [`BuildStore`]. See the [crate docs](crate).
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    checkpointer: Option<JoinHandle<()>>,
    /// N.B.: an exclusive `flock` on the database file for as long as the
    /// store lives. SQLite's own locks let a second server share the file,
    /// and two schedulers on one queue run builds twice. Last, so it is
    /// closed after the connections: closing any descriptor of the file
    /// drops this process's POSIX locks on it, SQLite's included.
    _owner: nix::fcntl::Flock<std::fs::File>,
}

/// WAL size, in pages, past which the background thread checkpoints
/// (SQLite's own default for `wal_autocheckpoint`).
const CHECKPOINT_PAGES: i32 = 1000;

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` with default
    /// options, and brings its schema up to date.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, Error> {
        Self::open_with(path, Options::default())
    }

    /// Opens the database at `path` with `options`.
    pub fn open_with(path: impl AsRef<Path>, options: Options) -> Result<SqliteStore, Error> {
        let path = path.as_ref().to_path_buf();
        let open_err = |source| diagnose(&path, source);
        let mut writer = connect(&path, options).map_err(|e| diagnose(&path, e))?;
        let owner = own(&writer, &path)?;
        migrate(&writer).map_err(|e| match e {
            Error::Sqlite(e) => diagnose(&path, e),
            e => e,
        })?;
        let reader = connect(&path, options).map_err(open_err)?;
        let checkpoints = connect(&path, options).map_err(open_err)?;
        let (wake, woken) = mpsc::sync_channel(1);
        let checkpointer = std::thread::Builder::new()
            .name("ci-store-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpoints, &woken))
            .map_err(Error::Thread)?;
        // Replaces the writer's inline autocheckpoint.
        writer.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: i32| {
            if pages >= CHECKPOINT_PAGES {
                // Full means a checkpoint is already due; nothing to add.
                let _ = wake.try_send(());
            }
            Ok(())
        }))?;
        Ok(SqliteStore {
            path,
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            checkpointer: Some(checkpointer),
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
        let r = self.read();
        Ok(r.query_row("PRAGMA integrity_check", [], |row| row.get(0))?)
    }

    fn write(&self) -> MutexGuard<'_, Connection> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` in an immediate transaction on the writer and commits.
    fn transaction<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T, Error>) -> Result<T, Error> {
        let mut conn = self.write();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Removing the hook drops the only sender, which ends the loop.
        let unhook = self
            .write()
            .wal_hook(None::<fn(&mut rusqlite::hooks::Wal, i32) -> rusqlite::Result<()>>);
        if let Err(e) = unhook {
            tracing::warn!(error = %e, "cannot remove the WAL hook");
            return; // The thread ends when the writer connection closes.
        }
        if let Some(thread) = self.checkpointer.take() {
            let _ = thread.join();
        }
    }
}

/// Takes the exclusive `flock` on the file `conn` opened (by the name
/// SQLite resolved, whatever spelling `path` used).
fn own(conn: &Connection, path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, Error> {
    let file = conn.path().filter(|p| !p.is_empty()).map(PathBuf::from);
    let Some(file) = file else {
        return Err(Error::Corrupt(format!(
            "{} is not a database file (an in-memory or temporary database cannot be shared safely)",
            path.display()
        )));
    };
    let handle = std::fs::File::open(&file).map_err(|e| Error::Unusable {
        path: file.clone(),
        why: e.to_string(),
    })?;
    nix::fcntl::Flock::lock(handle, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| Error::InUse(file))
}

/// An open error, with what is wrong with `path` when SQLite does not say
/// ("unable to open database file" covers a missing directory, a
/// read-only one and a read-only file alike).
fn diagnose(path: &Path, source: rusqlite::Error) -> Error {
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let why = if path.to_string_lossy().starts_with("file:") {
        None
    } else if !dir.is_dir() {
        Some(format!("directory {} does not exist", dir.display()))
    } else if path
        .metadata()
        .is_ok_and(|m| m.permissions().readonly() || m.permissions().mode() & 0o200 == 0)
    {
        Some(format!(
            "{} is read-only; the server must write to it",
            path.display()
        ))
    } else if nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_err() {
        Some(format!(
            "directory {} is not writable; SQLite creates its -wal and -shm files next to the database",
            dir.display()
        ))
    } else {
        None
    };
    match why {
        Some(why) => Error::Unusable {
            path: path.to_path_buf(),
            why: format!("{why} (SQLite: {source})"),
        },
        None => Error::Open {
            path: path.to_path_buf(),
            source,
        },
    }
}

/// Runs a passive checkpoint each time the writer's WAL hook asks for one,
/// until the store is dropped.
fn checkpoint_loop(conn: &Connection, woken: &Receiver<()>) {
    while woken.recv().is_ok() {
        let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        });
        match done {
            Ok((log, copied)) => tracing::trace!(log, copied, "checkpointed the WAL"),
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; the next one retries"),
        }
    }
}

fn connect(path: &Path, options: Options) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(options.busy_timeout)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(%mode, "SQLite refused WAL mode");
    }
    conn.pragma_update(None, "synchronous", options.synchronous.pragma())?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

fn migrate(conn: &Connection) -> Result<(), Error> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let supported = MIGRATIONS.len() as i64;
    if version > supported {
        return Err(Error::TooNew {
            found: version,
            supported,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let next = i as i64 + 1;
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", next)?;
        tx.commit()?;
        tracing::info!(version = next, "migrated database schema");
    }
    Ok(())
}

fn ts(t: Timestamp) -> i64 {
    i64::try_from(t.0).unwrap_or(i64::MAX)
}

fn build_from_row(row: &Row<'_>) -> rusqlite::Result<Build> {
    let status: String = row.get(7)?;
    let status = BuildStatus::from_str(&status).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(7, rusqlite::types::Type::Text, Box::new(e))
    })?;
    let time = |i: usize| -> rusqlite::Result<Option<Timestamp>> {
        Ok(row.get::<_, Option<i64>>(i)?.map(|v| Timestamp(v.max(0) as u64)))
    };
    Ok(Build {
        id: BuildId(row.get(0)?),
        repo: row.get(1)?,
        hash: row.get(2)?,
        branch: row.get(3)?,
        command: row.get(4)?,
        image: row.get(5)?,
        timeout_ms: row.get::<_, Option<i64>>(6)?.map(|v| v.max(0) as u64),
        status,
        attempt: Attempt(row.get(8)?),
        agent_id: row.get::<_, Option<i64>>(9)?.map(AgentId),
        agent_url: row.get(10)?,
        exit_code: row.get(11)?,
        created_at: time(12)?.unwrap_or_default(),
        started_at: time(13)?,
        finished_at: time(14)?,
    })
}

fn get_build(conn: &Connection, id: BuildId) -> Result<Option<Build>, Error> {
    let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id.0], build_from_row)
        .optional()?)
}

fn query_builds(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<Vec<Build>, Error> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, build_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn stream_name(s: Stream) -> &'static str {
    match s {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    }
}

/// The rowid of an attempt's accepted log, for reading it in pieces.
fn final_log_row(conn: &Connection, id: BuildId, attempt: Attempt) -> Result<Option<i64>, Error> {
    Ok(conn
        .prepare_cached("SELECT rowid FROM build_logs WHERE build_id = ?1 AND attempt = ?2")?
        .query_row(params![id.0, attempt.0], |r| r.get(0))
        .optional()?)
}

fn pieces(
    conn: &Connection,
    id: BuildId,
    attempt: Attempt,
    after: Option<u64>,
    limit: Option<usize>,
) -> Result<Vec<LogPiece>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, stream, data FROM log_pieces
         WHERE build_id = ?1 AND attempt = ?2 AND seq > ?3 ORDER BY seq LIMIT ?4",
    )?;
    let after = after.map_or(-1, |a| i64::try_from(a).unwrap_or(i64::MAX));
    let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
    let rows = stmt.query_map(params![id.0, attempt.0, after, limit], |r| {
        let stream: String = r.get(1)?;
        Ok(LogPiece {
            seq: r.get::<_, i64>(0)?.max(0) as u64,
            stream: if stream == "stderr" {
                Stream::Stderr
            } else {
                Stream::Stdout
            },
            data: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// === impl BuildStore ===

impl BuildStore for SqliteStore {
    fn create_build(&self, new: &NewBuild, now: Timestamp) -> ci_core::Result<Build> {
        let build = self.transaction(|tx| {
            tx.prepare_cached(
                "INSERT INTO builds (repo, hash, branch, command, image, timeout_ms, status, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', ?7)",
            )?
            .execute(params![
                new.repo.as_str(),
                new.hash.as_str(),
                new.branch,
                new.command,
                new.image,
                new.timeout_ms.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
                ts(now),
            ])?;
            let id = BuildId(tx.last_insert_rowid());
            get_build(tx, id)?.ok_or_else(|| Error::Corrupt(format!("build {id} vanished after insert")))
        })?;
        Ok(build)
    }

    fn build(&self, id: BuildId) -> ci_core::Result<Option<Build>> {
        Ok(get_build(&self.read(), id)?)
    }

    fn list_builds(&self, page: Page) -> ci_core::Result<Vec<Build>> {
        let sql =
            format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id < ?3 ORDER BY id DESC LIMIT ?1 OFFSET ?2");
        let before = page.before.map_or(i64::MAX, |b| b.0);
        Ok(query_builds(
            &self.read(),
            &sql,
            params![limit(page.limit), limit(page.offset), before],
        )?)
    }

    fn queued_builds(&self, n: usize) -> ci_core::Result<Vec<Build>> {
        let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE status = 'queued' ORDER BY id LIMIT ?1");
        Ok(query_builds(&self.read(), &sql, [limit(n)])?)
    }

    fn running_builds(&self) -> ci_core::Result<Vec<Build>> {
        let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE status = 'running' ORDER BY id");
        Ok(query_builds(&self.read(), &sql, [])?)
    }

    fn start_attempt(
        &self,
        id: BuildId,
        agent: &AgentRecord,
        now: Timestamp,
    ) -> ci_core::Result<Option<Build>> {
        Ok(self.transaction(|tx| {
            let n = tx
                .prepare_cached(
                    "UPDATE builds SET status = 'running', attempt = attempt + 1,
                        agent_id = ?2, agent_url = ?3, started_at = ?4
                     WHERE id = ?1 AND status = 'queued'",
                )?
                .execute(params![id.0, agent.id.0, agent.url, ts(now)])?;
            if n == 0 {
                return Ok(None);
            }
            get_build(tx, id)
        })?)
    }

    fn requeue(&self, id: BuildId, attempt: Attempt) -> ci_core::Result<bool> {
        Ok(self.transaction(|tx| {
            let n = tx
                .prepare_cached(
                    "UPDATE builds SET status = 'queued'
                     WHERE id = ?1 AND status = 'running' AND attempt = ?2",
                )?
                .execute(params![id.0, attempt.0])?;
            Ok(n == 1)
        })?)
    }

    fn finish(
        &self,
        id: BuildId,
        attempt: Attempt,
        result: &Completion,
        now: Timestamp,
    ) -> ci_core::Result<bool> {
        let status = BuildStatus::from_exit_code(result.exit_code);
        Ok(self.transaction(|tx| {
            let n = tx
                .prepare_cached(
                    "UPDATE builds SET status = ?3, exit_code = ?4, finished_at = ?5
                     WHERE id = ?1 AND attempt = ?2 AND attempt > 0
                       AND status IN ('queued', 'running')",
                )?
                .execute(params![id.0, attempt.0, status.as_str(), result.exit_code, ts(now)])?;
            if n == 0 {
                return Ok(false);
            }
            tx.prepare_cached(
                "INSERT INTO build_logs (build_id, attempt, stdout, stderr) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (build_id, attempt) DO UPDATE SET stdout = excluded.stdout, stderr = excluded.stderr",
            )?
            .execute(params![id.0, attempt.0, result.stdout, result.stderr])?;
            tx.prepare_cached("DELETE FROM log_pieces WHERE build_id = ?1 AND attempt = ?2")?
                .execute(params![id.0, attempt.0])?;
            tx.prepare_cached("DELETE FROM live_logs WHERE build_id = ?1 AND attempt = ?2")?
                .execute(params![id.0, attempt.0])?;
            Ok(true)
        })?)
    }

    fn cancel(&self, id: BuildId, attempt: Attempt, now: Timestamp) -> ci_core::Result<bool> {
        Ok(self.transaction(|tx| {
            let n = tx
                .prepare_cached(
                    "UPDATE builds SET status = 'canceled', finished_at = ?3
                     WHERE id = ?1 AND attempt = ?2 AND status IN ('queued', 'running')",
                )?
                .execute(params![id.0, attempt.0, ts(now)])?;
            Ok(n == 1)
        })?)
    }

    fn append_log(&self, id: BuildId, attempt: Attempt, pieces: &[LogPiece]) -> ci_core::Result<usize> {
        Ok(self.transaction(|tx| {
            let running: bool = tx
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM builds WHERE id = ?1 AND attempt = ?2 AND status = 'running')")?
                .query_row(params![id.0, attempt.0], |r| r.get(0))?;
            if !running {
                return Ok(0);
            }
            let before = tx
                .prepare_cached(
                    "SELECT last_seq, stdout_bytes, stderr_bytes FROM live_logs
                     WHERE build_id = ?1 AND attempt = ?2",
                )?
                .query_row(params![id.0, attempt.0], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                })
                .optional()?;
            let mut taken = match before {
                Some((last, out, err)) => ci_core::store::Taken::new(
                    u64::try_from(last).ok(),
                    [usize::try_from(out).unwrap_or(0), usize::try_from(err).unwrap_or(0)],
                ),
                None => ci_core::store::Taken::new(None, [0, 0]),
            };
            let before_last = taken.last;
            let rows = taken.take(pieces);
            let Some(last) = taken.last.filter(|l| before_last != Some(*l)) else {
                return Ok(0); // nothing new: repeats only
            };
            let seq = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            let size = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            for row in &rows {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO log_pieces (build_id, attempt, seq, stream, data)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![id.0, attempt.0, seq(row.seq), stream_name(row.stream), row.data])?;
            }
            tx.prepare_cached(
                "INSERT INTO live_logs (build_id, attempt, last_seq, stdout_bytes, stderr_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (build_id, attempt) DO UPDATE SET last_seq = excluded.last_seq,
                    stdout_bytes = excluded.stdout_bytes, stderr_bytes = excluded.stderr_bytes",
            )?
            .execute(params![id.0, attempt.0, seq(last), size(taken.bytes[0]), size(taken.bytes[1])])?;
            Ok(taken.added)
        })?)
    }

    fn log_pieces(
        &self,
        id: BuildId,
        attempt: Attempt,
        after: Option<u64>,
    ) -> ci_core::Result<Vec<LogPiece>> {
        Ok(pieces(&self.read(), id, attempt, after, None)?)
    }

    fn status_counts(&self) -> ci_core::Result<Vec<(BuildStatus, u64)>> {
        let conn = self.read();
        let mut stmt = conn
            .prepare_cached("SELECT status, COUNT(*) FROM builds GROUP BY status")
            .map_err(Error::from)?;
        let found: Vec<(String, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(Error::from)?
            .collect::<rusqlite::Result<_>>()
            .map_err(Error::from)?;
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
    }

    fn log(&self, id: BuildId, attempt: Option<Attempt>) -> ci_core::Result<Option<BuildLog>> {
        let conn = self.read();
        let Some(build) = get_build(&conn, id)? else {
            return Ok(None);
        };
        let attempt = attempt.unwrap_or(build.attempt);
        let final_log = conn
            .prepare_cached("SELECT stdout, stderr FROM build_logs WHERE build_id = ?1 AND attempt = ?2")
            .map_err(Error::from)?
            .query_row(params![id.0, attempt.0], |r| {
                Ok(BuildLog {
                    attempt,
                    stdout: r.get(0)?,
                    stderr: r.get(1)?,
                    complete: true,
                })
            })
            .optional()
            .map_err(Error::from)?;
        if final_log.is_some() {
            return Ok(final_log);
        }
        let pieces = pieces(&conn, id, attempt, None, None)?;
        Ok((!pieces.is_empty()).then(|| ci_core::store::assemble(attempt, &pieces)))
    }

    fn log_info(&self, id: BuildId, attempt: Option<Attempt>) -> ci_core::Result<Option<LogInfo>> {
        let conn = self.read();
        let Some(build) = get_build(&conn, id)? else {
            return Ok(None);
        };
        let attempt = attempt.unwrap_or(build.attempt);
        if let Some(row) = final_log_row(&conn, id, attempt)? {
            // N.B.: blob handles read a value's length, not its pages.
            let len = |column: &str| -> Result<u64, Error> {
                Ok(conn.blob_open("main", "build_logs", column, row, true)?.len() as u64)
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
                "SELECT stdout_bytes, stderr_bytes FROM live_logs WHERE build_id = ?1 AND attempt = ?2",
            )
            .map_err(Error::from)?
            .query_row(params![id.0, attempt.0], |r| {
                Ok((
                    r.get::<_, i64>(0)?.max(0) as u64,
                    r.get::<_, i64>(1)?.max(0) as u64,
                ))
            })
            .optional()
            .map_err(Error::from)?;
        Ok(live.filter(|(out, err)| out + err > 0).map(|(out, err)| LogInfo {
            attempt,
            complete: false,
            stdout_len: out,
            stderr_len: err,
        }))
    }

    fn read_log(
        &self,
        id: BuildId,
        attempt: Attempt,
        stream: Stream,
        offset: u64,
        max: usize,
    ) -> ci_core::Result<Vec<u8>> {
        let conn = self.read();
        let Some(row) = final_log_row(&conn, id, attempt)? else {
            return Ok(Vec::new());
        };
        let blob = conn
            .blob_open("main", "build_logs", stream_name(stream), row, true)
            .map_err(Error::from)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(blob.len());
        let mut buf = vec![0; max.min(blob.len() - start)];
        let n = blob.read_at(&mut buf, start).map_err(Error::from)?;
        buf.truncate(n);
        Ok(buf)
    }

    fn log_pieces_page(
        &self,
        id: BuildId,
        attempt: Attempt,
        after: Option<u64>,
        limit: usize,
    ) -> ci_core::Result<Vec<LogPiece>> {
        Ok(pieces(&self.read(), id, attempt, after, Some(limit))?)
    }

    fn register_agent(
        &self,
        url: &str,
        secret: Option<&str>,
        now: Timestamp,
    ) -> ci_core::Result<AgentRecord> {
        Ok(self.transaction(|tx| {
            tx.prepare_cached("DELETE FROM agents WHERE url = ?1")?
                .execute([url])?;
            tx.prepare_cached("INSERT INTO agents (url, registered_at, secret) VALUES (?1, ?2, ?3)")?
                .execute(params![url, ts(now), secret])?;
            Ok(AgentRecord {
                id: AgentId(tx.last_insert_rowid()),
                url: url.to_owned(),
                registered_at: now,
                secret: secret.map(str::to_owned),
            })
        })?)
    }

    fn remove_agent(&self, id: AgentId) -> ci_core::Result<()> {
        Ok(self.transaction(|tx| {
            tx.prepare_cached("DELETE FROM agents WHERE id = ?1")?
                .execute([id.0])?;
            Ok(())
        })?)
    }

    fn agents(&self) -> ci_core::Result<Vec<AgentRecord>> {
        let conn = self.read();
        let mut stmt = conn
            .prepare_cached("SELECT id, url, registered_at, secret FROM agents ORDER BY id")
            .map_err(Error::from)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(AgentRecord {
                    id: AgentId(r.get(0)?),
                    url: r.get(1)?,
                    registered_at: Timestamp(r.get::<_, i64>(2)?.max(0) as u64),
                    secret: r.get(3)?,
                })
            })
            .map_err(Error::from)?;
        Ok(rows.collect::<rusqlite::Result<_>>().map_err(Error::from)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ci_core::{CommitRef, RepoUrl};

    fn new_build() -> NewBuild {
        NewBuild::new(
            RepoUrl::parse("/srv/repo").unwrap(),
            CommitRef::parse("abcd").unwrap(),
            "make",
        )
        .unwrap()
    }

    #[test]
    fn conforms_to_the_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let n = std::sync::atomic::AtomicUsize::new(0);
        ci_core::store::conformance::run_all(|| {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            SqliteStore::open(dir.path().join(format!("{i}.sqlite"))).unwrap()
        });
    }

    #[test]
    fn ids_are_never_reused_after_deletes_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ci.sqlite");
        let store = SqliteStore::open(&path).unwrap();
        let ids: Vec<_> = (0..3)
            .map(|i| store.create_build(&new_build(), Timestamp(i)).unwrap().id)
            .collect();
        drop(store);

        // Delete the newest builds behind the store's back, then reopen.
        let conn = Connection::open(&path).unwrap();
        conn.execute("DELETE FROM builds WHERE id >= ?1", [ids[1].0])
            .unwrap();
        drop(conn);
        let store = SqliteStore::open(&path).unwrap();
        let next = store.create_build(&new_build(), Timestamp(9)).unwrap().id;
        assert!(
            next > ids[2],
            "{next} must be above every id ever given ({})",
            ids[2]
        );
        assert_eq!(store.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn the_wal_is_checkpointed_into_the_file_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ci.sqlite");
        let store = SqliteStore::open(&path).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        // About three WAL frames a commit: well past the threshold.
        for i in 0..1500 {
            store.create_build(&new_build(), Timestamp(i)).unwrap();
        }
        // Only a checkpoint writes pages into the database file itself.
        // Polled every 2 ms for up to 20 s.
        let grown = (0..10_000).any(|_| {
            let done = std::fs::metadata(&path).unwrap().len() >= before + 64 * 1024;
            if !done {
                std::thread::sleep(Duration::from_millis(2));
            }
            done
        });
        assert!(grown, "no checkpoint reached the file");
        assert_eq!(store.queued_builds(2000).unwrap().len(), 1500);
        drop(store); // Stops the thread; must not hang.
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn wal_mode_and_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ci.sqlite");
        let store = SqliteStore::open_with(
            &path,
            Options {
                synchronous: Synchronous::Full,
                ..Options::default()
            },
        )
        .unwrap();
        let conn = store.read();
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(
            (mode.as_str(), sync, version),
            ("wal", 2, MIGRATIONS.len() as i64)
        );
    }

    #[test]
    fn a_second_store_on_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ci.sqlite");
        let first = SqliteStore::open(&path).unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(matches!(err, Error::InUse(_)), "{err}");
        assert!(err.to_string().contains("in use by another ci-server"), "{err}");
        // Another spelling of the same file is the same file.
        let other = dir.path().join(".").join("ci.sqlite");
        assert!(matches!(SqliteStore::open(other), Err(Error::InUse(_))));
        drop(first);
        SqliteStore::open(&path).unwrap();
    }

    #[test]
    fn unusable_places_are_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let err = SqliteStore::open(dir.path().join("no/such/dir/ci.sqlite"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        if nix::unistd::geteuid().is_root() {
            return; // root writes anywhere: nothing read-only to test
        }
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let err = SqliteStore::open(ro.join("ci.sqlite")).unwrap_err().to_string();
        assert!(err.contains("not writable"), "{err}");
    }

    #[test]
    fn live_output_of_an_older_schema_carries_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ci.sqlite");
        {
            let conn = Connection::open(&path).unwrap();
            for (i, sql) in MIGRATIONS[..3].iter().enumerate() {
                conn.execute_batch(sql).unwrap();
                conn.pragma_update(None, "user_version", i as i64 + 1).unwrap();
            }
            conn.execute_batch(
                "INSERT INTO agents (url, registered_at) VALUES ('http://a:1', 0);
                 INSERT INTO builds (repo, hash, command, status, attempt, agent_id, created_at)
                     VALUES ('/r', 'abcd', 'make', 'running', 1, 1, 0);
                 INSERT INTO log_pieces VALUES (1, 1, 0, 'stdout', 'héllo'), (1, 1, 1, 'stderr', 'e');",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let piece = |seq, data: &str| LogPiece {
            seq,
            stream: Stream::Stdout,
            data: data.into(),
        };
        let (id, a) = (BuildId(1), Attempt(1));
        assert_eq!(
            store.append_log(id, a, &[piece(1, "dup")]).unwrap(),
            0,
            "seq 1 was taken"
        );
        assert_eq!(store.append_log(id, a, &[piece(2, "!")]).unwrap(), 1);
        let log = store.log(id, None).unwrap().unwrap();
        assert_eq!((log.stdout.as_str(), log.stderr.as_str()), ("héllo!", "e"));
        let bytes: i64 = store
            .read()
            .query_row("SELECT stdout_bytes FROM live_logs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(bytes, 7);
    }

    #[test]
    fn a_newer_schema_is_refused_not_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ci.sqlite");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(matches!(err, Error::TooNew { found: 99, .. }), "{err}");
    }

    #[test]
    fn hostile_strings_are_stored_verbatim() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("ci.sqlite")).unwrap();
        let mut b = new_build();
        b.command = "echo '); DROP TABLE builds; --".into();
        b.branch = Some("ünï\"code".into());
        let id = store.create_build(&b, Timestamp(0)).unwrap().id;
        let got = store.build(id).unwrap().unwrap();
        assert_eq!((got.command, got.branch), (b.command, b.branch));
    }

    #[test]
    fn queue_queries_use_the_partial_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("ci.sqlite")).unwrap();
        let conn = store.read();
        let plan: String = conn
            .query_row(
                "EXPLAIN QUERY PLAN SELECT id FROM builds WHERE status = 'queued' ORDER BY id LIMIT 5",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("builds_status"), "{plan}");
        let plan: String = conn
            .query_row(
                "EXPLAIN QUERY PLAN SELECT * FROM builds WHERE status = 'queued' ORDER BY id LIMIT 5",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(
            plan.contains("builds_status") && !plan.contains("TEMP B-TREE"),
            "no sort: {plan}"
        );
    }
}
