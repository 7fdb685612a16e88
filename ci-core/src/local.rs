//! An embedded cluster: the coordinator and in-process workers, no HTTP.
//!
//! Each worker is a [`Runner`] registered as an agent at `local://worker-N`.
//! Dispatches reach workers over channels; workers send heartbeats and
//! results straight to the [`Dispatcher`]. The scheduling, leases and
//! fencing are exactly those of the HTTP server.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::warn;

use crate::coordinator::{Coordinator, Dispatch, DispatchFailure, Heartbeat, Report};
use crate::dispatcher::{AgentLink, Dispatcher};
use crate::error::Result;
use crate::model::{AgentId, Build, BuildId, NewBuild};
use crate::runner::{execute, Job, LogSink, Runner};

/// A coordinator with in-process workers. See the [module docs](self).
#[derive(Debug)]
pub struct LocalCluster {
    dispatcher: Arc<Dispatcher>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// Default time limit for a build in a [`LocalCluster`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

impl LocalCluster {
    /// Starts `coordinator` with one worker per runner.
    pub fn start(coordinator: Coordinator, runners: Vec<Arc<dyn Runner>>) -> Result<LocalCluster> {
        let heartbeat = coordinator.lease_policy().interval();
        let dispatcher = Dispatcher::new(coordinator);
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut workers = HashMap::new();
        for (i, runner) in runners.into_iter().enumerate() {
            let url = format!("local://worker-{i}");
            let reg = dispatcher.register_agent(&url)?;
            let (tx, rx) = mpsc::channel(1);
            workers.insert(url, tx);
            let worker = Worker {
                id: reg.id,
                runner,
                dispatcher: dispatcher.clone(),
                heartbeat,
            };
            tasks.spawn(worker.run(rx));
        }
        let link = Arc::new(ChannelLink { workers });
        let mut stopped_rx = stopped.clone();
        tasks.spawn(dispatcher.clone().run(link, async move {
            let _ = stopped_rx.wait_for(|s| *s).await;
        }));
        Ok(LocalCluster {
            dispatcher,
            stop,
            tasks,
        })
    }

    /// Queues a build.
    pub fn submit(&self, new: &NewBuild) -> Result<Build> {
        self.dispatcher.submit(new)
    }

    /// Waits until build `id` has finished.
    pub async fn wait(&self, id: BuildId) -> Result<Build> {
        self.dispatcher.wait_finished(id).await
    }

    /// The dispatcher, for inspection.
    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }

    /// Stops scheduling and abandons running builds.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

struct ChannelLink {
    workers: HashMap<String, mpsc::Sender<Dispatch>>,
}

#[async_trait]
impl AgentLink for ChannelLink {
    async fn dispatch(&self, d: &Dispatch) -> Result<(), DispatchFailure> {
        let tx = self
            .workers
            .get(&d.agent_url)
            .ok_or_else(|| DispatchFailure::Unreachable(format!("no worker at {}", d.agent_url)))?;
        tx.try_send(d.clone())
            .map_err(|e| DispatchFailure::Unreachable(format!("worker {}: {e}", d.agent_url)))
    }
}

struct Worker {
    id: AgentId,
    runner: Arc<dyn Runner>,
    dispatcher: Arc<Dispatcher>,
    heartbeat: Duration,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Dispatch>) {
        while let Some(d) = rx.recv().await {
            let job = Job::from(&d.request());
            let log = LogSink::default();
            let run = execute(&*self.runner, &job, &log, DEFAULT_TIMEOUT);
            let beat = self.beat(&job);
            // Losing the lease ends the attempt: its work must stop.
            let completion = tokio::select! {
                c = run => c,
                () = beat => continue,
            };
            let report = Report {
                build: job.build,
                attempt: job.attempt,
                agent: Some(self.id),
                verified: true,
                completion,
            };
            if let Err(e) = self.dispatcher.complete(report) {
                warn!(build = %job.build, cause = %e, "result refused");
            }
        }
    }

    /// Sends heartbeats until the coordinator refuses one.
    async fn beat(&self, job: &Job) {
        let mut tick = tokio::time::interval(self.heartbeat);
        loop {
            tick.tick().await;
            let hb = Heartbeat {
                build: Some(job.build),
                attempt: job.attempt,
                agent: Some(self.id),
                verified: true,
            };
            if let Err(e) = self.dispatcher.heartbeat(hb) {
                if !e.is_retryable() {
                    warn!(build = %job.build, cause = %e, "heartbeat refused, abandoning build");
                    return;
                }
            }
        }
    }
}
