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
    open: Arc<dyn Fn() -> Result<Connection, Error> + Send + Sync>,
    idle: Mutex<Vec<Connection>>,
    /// Long reads, to the reader threads.
    long: Mutex<std::sync::mpsc::Sender<LongRead>>,
}

/// A long read for a reader thread: runs with that thread's connection.
type LongRead = Box<dyn FnOnce(Result<&Connection, &Error>) + Send>;

impl std::fmt::Debug for Readers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().map_or(0, |idle| idle.len());
        f.debug_struct("Readers")
            .field("idle", &idle)
            .finish_non_exhaustive()
    }
}

/// Reader connections kept open between short reads.
const IDLE_READERS: usize = 4;

/// Threads, each with its own connection, that do the long reads (a log a
/// chunk at a time, a count over the history).
///
/// N.B.: a few threads of our own rather than tokio's blocking pool. That
/// pool runs each read on whichever of up to 512 threads is free, and
/// glibc gives threads their own malloc arenas, each keeping what was freed
/// in it: forty readers of a 16 MiB log took the server's peak RSS up by
/// 60-70 MiB that way (tests/load.rs), against 7-11 MiB on two threads.
const LONG_READERS: usize = 2;

impl Readers {
    pub(crate) fn new(open: impl Fn() -> Result<Connection, Error> + Send + Sync + 'static) -> Readers {
        let open: Arc<dyn Fn() -> Result<Connection, Error> + Send + Sync> = Arc::new(open);
        let (tx, rx) = std::sync::mpsc::channel::<LongRead>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..LONG_READERS {
            let (rx, open) = (rx.clone(), open.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("sqlite-reader-{i}"))
                .spawn(move || {
                    let mut conn: Option<Connection> = None;
                    loop {
                        // N.B.: the lock is held only to take one job.
                        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        let Ok(job) = job else {
                            return; // the store is gone
                        };
                        if conn.is_none() {
                            match open() {
                                Ok(c) => conn = Some(c),
                                Err(e) => {
                                    job(Err(&e));
                                    continue;
                                }
                            }
                        }
                        if let Some(c) = &conn {
                            job(Ok(c));
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(cause = %e, "cannot start a SQLite reader thread");
            }
        }
        Readers {
            open,
            idle: Mutex::new(Vec::new()),
            long: Mutex::new(tx),
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
                let (tx, rx) = tokio::sync::oneshot::channel();
                let job: LongRead = Box::new(move |conn| {
                    let out = match conn {
                        Ok(c) => f(c),
                        Err(e) => Err(Error::Blocked(format!("cannot open a reader: {e}"))),
                    };
                    let _ = tx.send(out);
                });
                self.long
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .send(job)
                    .map_err(|_| Error::Blocked("the reader threads are gone".into()))?;
                rx.await
                    .map_err(|_| Error::Blocked("a reader thread ended mid-read".into()))?
            }
        }
    }
}
