//! The schema and its migrations, opening connections, and what is wrong
//! with a database that cannot be opened.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::{Error, Options};

pub(crate) const MIGRATIONS: &[&str] = &[
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
    // 5: leases live in the store, so that a restarted server (or another
    // one) sees them; agents' capacity and labels.
    "ALTER TABLE builds ADD COLUMN lease_until INTEGER;
    UPDATE builds SET lease_until = 0 WHERE status = 'running';
    ALTER TABLE agents ADD COLUMN capacity INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE agents ADD COLUMN labels TEXT NOT NULL DEFAULT '';",
    // 6: labels a build's agent must have.
    "ALTER TABLE builds ADD COLUMN labels TEXT NOT NULL DEFAULT '';",
    // 7: pipelines. A build is its steps; a step is what is queued,
    // leased and fenced, and its id is what agents are sent. Each build so
    // far becomes one step, `build`, with the build's own id (so agents
    // still running one report to the same id), and logs move to steps.
    // The builds' own attempt, agent, exit code and times are now read
    // from their steps.
    "CREATE TABLE steps (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        build_id      INTEGER NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
        name          TEXT NOT NULL,
        command       TEXT NOT NULL,
        image         TEXT,
        timeout_ms    INTEGER,
        labels        TEXT NOT NULL DEFAULT '',
        depends_on    TEXT NOT NULL DEFAULT '[]',
        allow_failure INTEGER NOT NULL DEFAULT 0,
        retries_left  INTEGER NOT NULL DEFAULT 0,
        matrix        TEXT NOT NULL DEFAULT '{}',
        status        TEXT NOT NULL CHECK (status IN
                      ('pending', 'queued', 'running', 'success', 'failed', 'canceled', 'skipped')),
        attempt       INTEGER NOT NULL DEFAULT 0,
        agent_id      INTEGER,
        agent_url     TEXT,
        exit_code     INTEGER,
        created_at    INTEGER NOT NULL,
        started_at    INTEGER,
        finished_at   INTEGER,
        lease_until   INTEGER,
        UNIQUE (build_id, name)
    );
    CREATE INDEX steps_status ON steps (status);
    INSERT INTO steps (id, build_id, name, command, image, timeout_ms, labels, status, attempt,
                       agent_id, agent_url, exit_code, created_at, started_at, finished_at, lease_until)
        SELECT id, id, 'build', command, image, timeout_ms, labels, status, attempt,
               agent_id, agent_url, exit_code, created_at, started_at, finished_at, lease_until
        FROM builds;
    ALTER TABLE build_logs RENAME TO old_build_logs;
    ALTER TABLE log_pieces RENAME TO old_log_pieces;
    ALTER TABLE live_logs RENAME TO old_live_logs;
    CREATE TABLE step_logs (
        step_id INTEGER NOT NULL REFERENCES steps (id) ON DELETE CASCADE,
        attempt INTEGER NOT NULL,
        stdout  TEXT NOT NULL,
        stderr  TEXT NOT NULL,
        UNIQUE (step_id, attempt)
    );
    CREATE TABLE log_pieces (
        step_id  INTEGER NOT NULL REFERENCES steps (id) ON DELETE CASCADE,
        attempt  INTEGER NOT NULL,
        seq      INTEGER NOT NULL,
        stream   TEXT NOT NULL CHECK (stream IN ('stdout', 'stderr')),
        data     TEXT NOT NULL,
        PRIMARY KEY (step_id, attempt, seq)
    );
    CREATE TABLE live_logs (
        step_id      INTEGER NOT NULL REFERENCES steps (id) ON DELETE CASCADE,
        attempt      INTEGER NOT NULL,
        last_seq     INTEGER NOT NULL,
        stdout_bytes INTEGER NOT NULL,
        stderr_bytes INTEGER NOT NULL,
        PRIMARY KEY (step_id, attempt)
    );
    INSERT INTO step_logs SELECT build_id, attempt, stdout, stderr FROM old_build_logs;
    INSERT INTO log_pieces SELECT build_id, attempt, seq, stream, data FROM old_log_pieces;
    INSERT INTO live_logs SELECT build_id, attempt, last_seq, stdout_bytes, stderr_bytes FROM old_live_logs;
    DROP TABLE old_build_logs;
    DROP TABLE old_log_pieces;
    DROP TABLE old_live_logs;",
    // 8: the queue by label set: only queued steps are in it, so it is
    // written only as steps enter and leave the queue.
    "CREATE INDEX steps_queued_labels ON steps (labels, id) WHERE status = 'queued';",
    // 9: what spends a step's retries (bits: failure 1, timeout 2, agent
    // lost 4; steps so far retried any failure), and the containers beside
    // it (JSON; NULL for none).
    "ALTER TABLE steps ADD COLUMN retry_on INTEGER NOT NULL DEFAULT 3;
    ALTER TABLE steps ADD COLUMN services TEXT;",
    // 10: projects. Builds so far belong to the default project (whose
    // repository the server sets from REPO), numbered in order; what
    // started them was not kept. Secrets are sealed by the server.
    "CREATE TABLE projects (
        name            TEXT PRIMARY KEY,
        repo            TEXT NOT NULL,
        default_branch  TEXT NOT NULL DEFAULT 'main',
        poll_interval   INTEGER NOT NULL DEFAULT 60,
        branches        TEXT NOT NULL DEFAULT '[]',
        cancel_previous INTEGER NOT NULL DEFAULT 0,
        forge           TEXT,
        last_number     INTEGER NOT NULL DEFAULT 0,
        created_at      INTEGER NOT NULL
    );
    INSERT INTO projects (name, repo, poll_interval, last_number, created_at)
        VALUES ('default', COALESCE((SELECT repo FROM builds ORDER BY id DESC LIMIT 1), ''), 0,
                (SELECT COUNT(*) FROM builds), COALESCE((SELECT MIN(created_at) FROM builds), 0));
    ALTER TABLE builds ADD COLUMN project TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE builds ADD COLUMN number INTEGER NOT NULL DEFAULT 0;
    UPDATE builds SET number = (SELECT COUNT(*) FROM builds AS b WHERE b.id <= builds.id);
    ALTER TABLE builds ADD COLUMN event TEXT;
    ALTER TABLE builds ADD COLUMN subject TEXT;
    ALTER TABLE builds ADD COLUMN author TEXT;
    ALTER TABLE builds ADD COLUMN untrusted INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE builds ADD COLUMN delivery TEXT;
    CREATE UNIQUE INDEX builds_number ON builds (project, number);
    CREATE UNIQUE INDEX builds_delivery ON builds (delivery) WHERE delivery IS NOT NULL;
    CREATE INDEX builds_branch ON builds (project, branch, id);
    ALTER TABLE steps ADD COLUMN secrets TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE secrets (
        project    TEXT NOT NULL REFERENCES projects (name) ON DELETE CASCADE,
        name       TEXT NOT NULL,
        sealed     BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (project, name)
    );
    CREATE TABLE heads (
        project TEXT NOT NULL REFERENCES projects (name) ON DELETE CASCADE,
        branch  TEXT NOT NULL,
        sha     TEXT NOT NULL,
        PRIMARY KEY (project, branch)
    );",
    // 11: agents' own credentials, by their token's SHA-256.
    "CREATE TABLE agent_credentials (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        name       TEXT NOT NULL,
        digest     BLOB NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    );",
];

/// Takes the exclusive `flock` on the file `conn` opened (by the name
/// SQLite resolved, whatever spelling `path` used).
pub(crate) fn own(conn: &Connection, path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, Error> {
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
pub(crate) fn diagnose(path: &Path, source: rusqlite::Error) -> Error {
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

/// Prepared statements kept per connection: more than the store has.
const STATEMENT_CACHE: usize = 128;

pub(crate) fn connect(path: &Path, options: Options) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // N.B.: every query is prepared once per connection and kept; the
    // default cache of 16 is smaller than the store's set of queries, and
    // parsing SQL again on every call doubled the server's CPU per build.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.busy_timeout(options.busy_timeout)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(%mode, "SQLite refused WAL mode");
    }
    conn.pragma_update(None, "synchronous", options.synchronous.pragma())?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

pub(crate) fn migrate(conn: &Connection) -> Result<(), Error> {
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
