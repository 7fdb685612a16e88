//! Checkpointing the WAL on a thread of its own, woken by the writer's WAL
//! hook, instead of inside whichever commit crossed the threshold (which
//! used to stall that commit for the copy).

use std::sync::mpsc::Receiver;

use rusqlite::Connection;

/// WAL size, in pages, past which the background thread checkpoints
/// (SQLite's own default for `wal_autocheckpoint`).
pub(crate) const CHECKPOINT_PAGES: i32 = 1000;

/// Runs a passive checkpoint each time the writer's WAL hook asks for one,
/// until the store is dropped.
pub(crate) fn checkpoint_loop(conn: &Connection, woken: &Receiver<()>) {
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
