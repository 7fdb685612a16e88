//! Rows to values and back, and the queries several methods share.

use ci_core::model::LogPiece;
use ci_core::{AgentId, Attempt, Build, BuildId, BuildStatus, Lease, Stream, Timestamp};
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::str::FromStr;

use crate::Error;

pub(crate) const BUILD_COLUMNS: &str =
    "id, repo, hash, branch, command, image, timeout_ms, status, attempt, \
     agent_id, agent_url, exit_code, created_at, started_at, finished_at, labels";

pub(crate) fn ts(t: Timestamp) -> i64 {
    i64::try_from(t.0).unwrap_or(i64::MAX)
}

pub(crate) fn build_from_row(row: &Row<'_>) -> rusqlite::Result<Build> {
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
        labels: labels_from(&row.get::<_, String>(15)?),
    })
}

pub(crate) fn get_build(conn: &Connection, id: BuildId) -> Result<Option<Build>, Error> {
    let sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id.0], build_from_row)
        .optional()?)
}

pub(crate) fn query_builds(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Build>, Error> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params, build_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub(crate) fn stream_name(s: Stream) -> &'static str {
    match s {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    }
}

/// The rowid of an attempt's accepted log, for reading it in pieces.
pub(crate) fn final_log_row(conn: &Connection, id: BuildId, attempt: Attempt) -> Result<Option<i64>, Error> {
    Ok(conn
        .prepare_cached("SELECT rowid FROM build_logs WHERE build_id = ?1 AND attempt = ?2")?
        .query_row(params![id.0, attempt.0], |r| r.get(0))
        .optional()?)
}

pub(crate) fn pieces(
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

pub(crate) fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A running build's lease from `id, attempt, agent_id, lease_until`.
pub(crate) fn lease_from_row(r: &Row<'_>) -> rusqlite::Result<Lease> {
    Ok(Lease {
        build: BuildId(r.get(0)?),
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
