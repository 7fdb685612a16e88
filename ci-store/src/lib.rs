//! SQLite persistence for the ci build server: a `ci-core` store on a file.
//!
//! # Layout
//! - [`SqliteStore`] (`store`): the four store traits of `ci-core` on one
//!   file. Writes (and the queue's reads) go through one writer connection,
//!   each as one transaction; API reads use a few reader connections, so
//!   they never wait behind writes.
//! - `writer`: where the work runs: a few rows' worth where it is called,
//!   anything long (a log, a count over the history) on the blocking pool.
//! - [`Options`], [`Synchronous`] (`options`): durability settings.
//! - `schema`: migrations, connections, and why a file cannot be opened.
//! - `checkpoint`: WAL checkpoints on a thread of their own.
//! - `rows`: rows to values, and shared queries.
//! - [`Objects`] (`objects`): artifacts, caches and finished logs in a
//!   directory or an S3 bucket, streamed.
//! - [`Error`]: what can go wrong opening or using the file.
//!
//! # Durability
//! The database runs in WAL mode. Every store method is one
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

use std::path::PathBuf;

mod checkpoint;
pub mod objects;
mod options;
mod rows;
mod schema;
mod store;
mod writer;

pub use objects::Objects;
pub use options::{Options, Synchronous};
pub use store::SqliteStore;

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
    /// Work handed to the blocking pool did not come back (the runtime is
    /// shutting down).
    #[error("store work on the blocking pool failed: {0}")]
    Blocked(String),
    /// A fenced write found the build in another state: the request's own
    /// error (superseded, not running, another agent's).
    #[error(transparent)]
    Refused(ci_core::Error),
    /// `OBJECT_STORE_URL` names no store this program can use.
    #[error("OBJECT_STORE_URL {url:?}: {why}")]
    ObjectStoreUrl {
        /// What was given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// An object key that is not one (see [`objects::valid_key`]).
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    /// No object has this key.
    #[error("no object {0:?}")]
    NoObject(String),
    /// The object store failed (unreachable, refused, disk full).
    #[error("object {key:?}: {source}")]
    Objects {
        /// The object.
        key: String,
        /// What the store said.
        #[source]
        source: object_store::Error,
    },
    /// A local file being uploaded or downloaded.
    #[error("{}: {source}", path.display())]
    ObjectIo {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl From<Error> for ci_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Refused(e) => e,
            e => ci_core::Error::store(e),
        }
    }
}

#[cfg(test)]
mod tests;
