//! Rows to values and back, and the queries several methods share.

use ci_core::model::{LogPiece, Moved, RetryOn, StepState};
use ci_core::{
    AgentId, Attempt, Build, BuildId, BuildStatus, Lease, Step, StepId, StepStatus, Stream, Timestamp,
};
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::str::FromStr;

use crate::Error;

pub(crate) const BUILD_COLUMNS: &str = "id, repo, hash, branch, command, image, timeout_ms, status, \
     created_at, labels, project, number, event, subject, author, untrusted, delivery";

/// A step's own columns, as a literal for `concat!`.
macro_rules! step_columns {
    () => {
        "id, build_id, name, command, image, timeout_ms, labels, depends_on, allow_failure, \
         retries_left, matrix, status, attempt, agent_id, agent_url, exit_code, created_at, \
         started_at, finished_at, retry_on, services, secrets"
    };
}
pub(crate) use step_columns;

/// A step's own columns. Its repository and commit are its build's,
/// read apart ([`with_origin`]).
pub(crate) const STEP_COLUMNS: &str = step_columns!();

pub(crate) fn ts(t: Timestamp) -> i64 {
    i64::try_from(t.0).unwrap_or(i64::MAX)
}

fn conversion(i: usize, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
}

fn time(row: &Row<'_>, i: usize) -> rusqlite::Result<Option<Timestamp>> {
    Ok(row.get::<_, Option<i64>>(i)?.map(|v| Timestamp(v.max(0) as u64)))
}

/// A build's own row; its steps and what sums them up come separately.
pub(crate) fn build_from_row(row: &Row<'_>) -> rusqlite::Result<Build> {
    let status: String = row.get(7)?;
    let status = BuildStatus::from_str(&status).map_err(|e| conversion(7, e))?;
    Ok(Build {
        id: BuildId(row.get(0)?),
        repo: row.get(1)?,
        hash: row.get(2)?,
        branch: row.get(3)?,
        command: row.get(4)?,
        image: row.get(5)?,
        timeout_ms: row.get::<_, Option<i64>>(6)?.map(|v| v.max(0) as u64),
        status,
        attempt: Attempt(0),
        agent_id: None,
        agent_url: None,
        exit_code: None,
        created_at: time(row, 8)?.unwrap_or_default(),
        started_at: None,
        finished_at: None,
        labels: labels_from(&row.get::<_, String>(9)?),
        steps: Vec::new(),
        number: row.get::<_, i64>(11)?.max(0) as u64,
        source: ci_core::Source {
            project: row.get(10)?,
            event: match row.get::<_, Option<String>>(12)? {
                Some(e) => Some(
                    serde_json::from_value(serde_json::Value::String(e)).map_err(|e| conversion(12, e))?,
                ),
                None => None,
            },
            subject: row.get(13)?,
            author: row.get(14)?,
            untrusted: row.get(15)?,
            delivery: row.get(16)?,
        },
    })
}

/// A step from [`STEP_COLUMNS`], without its repository and commit.
pub(crate) fn step_from_row(row: &Row<'_>) -> rusqlite::Result<Step> {
    let status: String = row.get(11)?;
    let status = StepStatus::from_str(&status).map_err(|e| conversion(11, e))?;
    let depends_on: String = row.get(7)?;
    let matrix: String = row.get(10)?;
    let services = match row.get::<_, Option<String>>(20)? {
        Some(json) => serde_json::from_str(&json).map_err(|e| conversion(20, e))?,
        None => Vec::new(),
    };
    Ok(Step {
        id: StepId(row.get(0)?),
        build: BuildId(row.get(1)?),
        name: row.get(2)?,
        repo: String::new(),
        hash: String::new(),
        command: row.get(3)?,
        image: row.get(4)?,
        timeout_ms: row.get::<_, Option<i64>>(5)?.map(|v| v.max(0) as u64),
        labels: labels_from(&row.get::<_, String>(6)?),
        depends_on: serde_json::from_str(&depends_on).map_err(|e| conversion(7, e))?,
        allow_failure: row.get(8)?,
        retries_left: row.get(9)?,
        retry_on: RetryOn::from_bits(row.get(19)?),
        matrix: serde_json::from_str(&matrix).map_err(|e| conversion(10, e))?,
        services,
        secrets: serde_json::from_str(&row.get::<_, String>(21)?).map_err(|e| conversion(21, e))?,
        status,
        attempt: Attempt(row.get(12)?),
        agent_id: row.get::<_, Option<i64>>(13)?.map(AgentId),
        agent_url: row.get(14)?,
        exit_code: row.get(15)?,
        created_at: time(row, 16)?.unwrap_or_default(),
        started_at: time(row, 17)?,
        finished_at: time(row, 18)?,
    })
}

/// `steps` with their builds' repository and commit.
pub(crate) fn with_origin(conn: &Connection, mut steps: Vec<Step>) -> Result<Vec<Step>, Error> {
    let mut origin: std::collections::HashMap<BuildId, (String, String)> = std::collections::HashMap::new();
    for step in &mut steps {
        let (repo, hash) = match origin.entry(step.build) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let found = conn
                    .prepare_cached("SELECT repo, hash FROM builds WHERE id = ?1")?
                    .query_row([step.build.0], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?
                    .unwrap_or_default();
                e.insert(found)
            }
        };
        step.repo.clone_from(repo);
        step.hash.clone_from(hash);
    }
    Ok(steps)
}

/// Steps from `sql`, which selects [`STEP_COLUMNS`], with their origin.
pub(crate) fn query_steps(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Step>, Error> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, step_from_row)?;
    let steps: Vec<Step> = rows.collect::<rusqlite::Result<_>>()?;
    with_origin(conn, steps)
}

pub(crate) fn get_step(conn: &Connection, id: StepId) -> Result<Option<Step>, Error> {
    let sql = format!("SELECT {STEP_COLUMNS} FROM steps WHERE id = ?1");
    Ok(query_steps(conn, &sql, [id.0])?.pop())
}

/// `build` with its steps, summed up.
pub(crate) fn with_steps(conn: &Connection, build: Build) -> Result<Build, Error> {
    // N.B.: sorted here: with `ORDER BY id` SQLite (STAT4) plans the query
    // again for new values of `build_id`.
    let sql = format!("SELECT {STEP_COLUMNS} FROM steps WHERE build_id = ?1");
    let mut stmt = conn.prepare_cached(&sql)?;
    let steps = stmt.query_map([build.id.0], step_from_row)?;
    let mut steps: Vec<Step> = steps.collect::<rusqlite::Result<_>>()?;
    steps.sort_by_key(|s| s.id);
    Ok(attach(build, steps))
}

/// `build` with `steps` (of it), summed up.
fn attach(mut build: Build, mut steps: Vec<Step>) -> Build {
    for step in &mut steps {
        step.repo.clone_from(&build.repo);
        step.hash.clone_from(&build.hash);
    }
    build.steps = steps;
    build.summarize();
    build
}

pub(crate) fn get_build(conn: &Connection, id: BuildId) -> Result<Option<Build>, Error> {
    let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = ?1");
    let build = conn
        .prepare_cached(&sql)?
        .query_row([id.0], build_from_row)
        .optional()?;
    build.map(|b| with_steps(conn, b)).transpose()
}

/// Builds from `sql`, which selects [`BUILD_COLUMNS`]: `take` of them
/// after the first `skip`, with their steps.
pub(crate) fn query_builds(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    skip: usize,
    take: usize,
) -> Result<Vec<Build>, Error> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, build_from_row)?.skip(skip).take(take);
    let builds: Vec<Build> = rows.collect::<rusqlite::Result<_>>()?;
    // N.B.: the steps of a page of builds in one read: a page is a run of
    // consecutive build numbers.
    let (Some(lo), Some(hi)) = (
        builds.iter().map(|b| b.id).min(),
        builds.iter().map(|b| b.id).max(),
    ) else {
        return Ok(builds);
    };
    let sql = format!("SELECT {STEP_COLUMNS} FROM steps WHERE build_id BETWEEN ?1 AND ?2 ORDER BY id");
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut by_build: std::collections::HashMap<BuildId, Vec<Step>> = std::collections::HashMap::new();
    for step in stmt.query_map([lo.0, hi.0], step_from_row)? {
        let step = step?;
        by_build.entry(step.build).or_default().push(step);
    }
    Ok(builds
        .into_iter()
        .map(|b| {
            let steps = by_build.remove(&b.id).unwrap_or_default();
            attach(b, steps)
        })
        .collect())
}

/// What scheduling needs of the steps of `build`, in creation order.
pub(crate) fn states(conn: &Connection, build: BuildId) -> Result<Vec<StepState>, Error> {
    // N.B.: sorted below, not by SQLite (see `with_steps`).
    let mut stmt = conn.prepare_cached(
        "SELECT id, name, status, allow_failure, depends_on FROM steps WHERE build_id = ?1",
    )?;
    let rows = stmt.query_map([build.0], |r| {
        let status: String = r.get(2)?;
        let depends_on: String = r.get(4)?;
        Ok(StepState {
            id: StepId(r.get(0)?),
            name: r.get(1)?,
            status: StepStatus::from_str(&status).map_err(|e| conversion(2, e))?,
            allow_failure: r.get(3)?,
            depends_on: serde_json::from_str(&depends_on).map_err(|e| conversion(4, e))?,
        })
    })?;
    let mut states: Vec<StepState> = rows.collect::<rusqlite::Result<_>>()?;
    states.sort_by_key(|s| s.id);
    Ok(states)
}

/// The stored status of `build`.
pub(crate) fn build_status_of(conn: &Connection, build: BuildId) -> Result<Option<BuildStatus>, Error> {
    let status: Option<String> = conn
        .prepare_cached("SELECT status FROM builds WHERE id = ?1")?
        .query_row([build.0], |r| r.get(0))
        .optional()?;
    Ok(status.and_then(|s| BuildStatus::from_str(&s).ok()))
}

/// Sets the status of `build` from its steps'.
pub(crate) fn refresh(tx: &Connection, build: BuildId) -> Result<(), Error> {
    let status = ci_core::model::build_status(&states(tx, build)?);
    tx.prepare_cached("UPDATE builds SET status = ?2 WHERE id = ?1")?
        .execute(params![build.0, status.as_str()])?;
    Ok(())
}

/// Moves the steps of `build` along after `changed` changed
/// ([`ci_core::model::settle`]) and records the build's status (it was
/// `before`).
pub(crate) fn settle(
    tx: &Connection,
    build: BuildId,
    before: Option<BuildStatus>,
    mut changed: Vec<(StepId, StepStatus)>,
    now: Timestamp,
) -> Result<Moved, Error> {
    let mut steps = states(tx, build)?;
    let (status, moved) = ci_core::model::settle(&mut steps);
    for (id, next) in &moved {
        let finished = next.is_finished().then(|| ts(now));
        tx.prepare_cached(
            "UPDATE steps SET status = ?2, finished_at = COALESCE(?3, finished_at) WHERE id = ?1",
        )?
        .execute(params![id.0, next.as_str(), finished])?;
    }
    changed.extend(moved);
    if before != Some(status) {
        tx.prepare_cached("UPDATE builds SET status = ?2 WHERE id = ?1")?
            .execute(params![build.0, status.as_str()])?;
    }
    let mut moved = Moved {
        build,
        steps: changed,
        before,
        after: Some(status),
        duration_ms: None,
    };
    if moved.ended() {
        let (first, last): (Option<i64>, Option<i64>) = tx
            .prepare_cached("SELECT MIN(started_at), MAX(finished_at) FROM steps WHERE build_id = ?1")?
            .query_row([build.0], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if let (Some(first), Some(last)) = (first, last) {
            moved.duration_ms = u64::try_from(last.saturating_sub(first)).ok();
        }
    }
    Ok(moved)
}

pub(crate) fn stream_name(s: Stream) -> &'static str {
    match s {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    }
}

/// Drops an attempt's live log, once its final log is stored.
pub(crate) fn delete_live(tx: &Connection, id: StepId, attempt: Attempt) -> Result<(), Error> {
    tx.prepare_cached("DELETE FROM log_pieces WHERE step_id = ?1 AND attempt = ?2")?
        .execute(params![id.0, attempt.0])?;
    tx.prepare_cached("DELETE FROM live_logs WHERE step_id = ?1 AND attempt = ?2")?
        .execute(params![id.0, attempt.0])?;
    Ok(())
}

/// The rowid of an attempt's accepted log, for reading it in pieces.
pub(crate) fn final_log_row(conn: &Connection, id: StepId, attempt: Attempt) -> Result<Option<i64>, Error> {
    Ok(conn
        .prepare_cached("SELECT rowid FROM step_logs WHERE step_id = ?1 AND attempt = ?2")?
        .query_row(params![id.0, attempt.0], |r| r.get(0))
        .optional()?)
}

pub(crate) fn pieces(
    conn: &Connection,
    id: StepId,
    attempt: Attempt,
    after: Option<u64>,
    limit: Option<usize>,
) -> Result<Vec<LogPiece>, Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, stream, data FROM log_pieces
         WHERE step_id = ?1 AND attempt = ?2 AND seq > ?3 ORDER BY seq",
    )?;
    let after = after.map_or(-1, |a| i64::try_from(a).unwrap_or(i64::MAX));
    let rows = stmt.query_map(params![id.0, attempt.0, after], |r| {
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
    Ok(rows
        .take(limit.unwrap_or(usize::MAX))
        .collect::<rusqlite::Result<_>>()?)
}

/// A running step's lease from `id, attempt, agent_id, lease_until`.
pub(crate) fn lease_from_row(r: &Row<'_>) -> rusqlite::Result<Lease> {
    Ok(Lease {
        step: StepId(r.get(0)?),
        attempt: Attempt(r.get(1)?),
        agent: AgentId(r.get::<_, Option<i64>>(2)?.unwrap_or(0)),
        expires_at: Timestamp(r.get::<_, Option<i64>>(3)?.unwrap_or(0).max(0) as u64),
    })
}

/// Labels as stored: comma-separated (no label holds a comma).
pub(crate) fn labels_text(labels: &ci_core::Labels) -> String {
    labels.iter().collect::<Vec<_>>().join(",")
}

/// Stored labels, read back.
pub(crate) fn labels_from(text: &str) -> ci_core::Labels {
    ci_core::Labels::parse(text.split(',').filter(|l| !l.is_empty())).unwrap_or_default()
}
