//! The writer: one thread owns the connection that writes, and runs each
//! write as one immediate transaction, in the order asked. SQLite has one
//! writer at a time anyway; a thread of its own keeps that connection warm
//! and keeps its work off the async threads.

use std::sync::mpsc;
use std::thread::JoinHandle;

use rusqlite::{Connection, Transaction, TransactionBehavior};
use tokio::sync::oneshot;

use crate::Error;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Writer {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread with its connection.
    pub(crate) fn spawn(mut conn: Connection) -> Result<Writer, Error> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("ci-store-writer".into())
            .spawn(move || {
                while let Ok(job) = queue.recv() {
                    job(&mut conn);
                }
            })
            .map_err(Error::Thread)?;
        Ok(Writer {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Runs `f` in a transaction on the writer's thread, and commits.
    pub(crate) async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        self.with_connection(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    /// Runs `f` with the writer's connection itself (for what runs outside
    /// a transaction, or reads that must see the writer's own view).
    pub(crate) async fn with_connection<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let (done, answer) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            // The caller may have gone; the write still happened.
            let _ = done.send(f(conn));
        });
        self.jobs
            .as_ref()
            .ok_or(Error::Closed)?
            .send(job)
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Stops the thread once the writes asked for are done.
    pub(crate) fn stop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}
