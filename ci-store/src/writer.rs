//! Where SQLite's work runs. SQLite is synchronous; the store's callers are
//! async. A statement that touches a row or a few (create a build, start a
//! pass's attempts, renew a lease) takes microseconds: it runs where it is
//! called, because handing it to another thread and back costs more than
//! the statement (measured: a third of the server's throughput). Work that
//! may be long (a 16 MiB log, a count over the whole history) runs on
//! tokio's blocking pool, so it never holds up an async thread. Waiting
//! for the one writer connection is async either way.

use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::Error;

/// How long work may take: where it runs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Cost {
    /// A few rows: run it here.
    Short,
    /// Possibly much: run it on the blocking pool.
    Long,
}

/// The writer connection, one at a time, waited for asynchronously.
#[derive(Debug)]
pub(crate) struct Writer {
    conn: Arc<tokio::sync::Mutex<Connection>>,
}

impl Writer {
    pub(crate) fn new(conn: Connection) -> Writer {
        Writer {
            conn: Arc::new(tokio::sync::Mutex::new(conn)),
        }
    }

    /// Runs `f` in an immediate transaction on the writer and commits.
    pub(crate) async fn write<T: Send + 'static>(
        &self,
        cost: Cost,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        self.with_connection(cost, move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    /// Runs `f` with the writer's connection (for reads that must see the
    /// writer's own commits, such as the queue's).
    pub(crate) async fn with_connection<T: Send + 'static>(
        &self,
        cost: Cost,
        f: impl FnOnce(&mut Connection) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        match cost {
            Cost::Short => f(&mut *self.conn.lock().await),
            Cost::Long => {
                let mut conn = self.conn.clone().lock_owned().await;
                tokio::task::spawn_blocking(move || f(&mut conn))
                    .await
                    .map_err(|e| Error::Blocked(e.to_string()))?
            }
        }
    }

    /// The connection, if nobody holds it (for shutting down).
    pub(crate) fn try_lock(&self) -> Result<tokio::sync::MutexGuard<'_, Connection>, Error> {
        self.conn
            .try_lock()
            .map_err(|_| Error::Blocked("the writer is in use".into()))
    }
}

/// Reader connections, opened as needed and kept for the next read.
pub(crate) struct Readers {
    open: Box<dyn Fn() -> Result<Connection, Error> + Send + Sync>,
    idle: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for Readers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().map_or(0, |idle| idle.len());
        f.debug_struct("Readers")
            .field("idle", &idle)
            .finish_non_exhaustive()
    }
}

/// Reader connections kept open between reads.
const IDLE_READERS: usize = 4;

impl Readers {
    pub(crate) fn new(open: impl Fn() -> Result<Connection, Error> + Send + Sync + 'static) -> Readers {
        Readers {
            open: Box::new(open),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` with a reader connection, here.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T, Error>) -> Result<T, Error> {
        let pooled = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let conn = match pooled {
            Some(c) => c,
            None => (self.open)()?,
        };
        let out = f(&conn);
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
        out
    }

    /// Runs `f` with a reader connection, where its cost says.
    pub(crate) async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        cost: Cost,
        f: impl FnOnce(&Connection) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        match cost {
            Cost::Short => self.with(f),
            Cost::Long => {
                let me = self.clone();
                tokio::task::spawn_blocking(move || me.with(f))
                    .await
                    .map_err(|e| Error::Blocked(e.to_string()))?
            }
        }
    }
}
