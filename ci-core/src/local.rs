//! An embedded cluster: the coordinator and in-process workers, no HTTP.
//!
//! Each worker is a [`Runner`] registered as an agent at `local://worker-N`,
//! with the runner's capacity and labels. Dispatches reach workers over
//! channels; workers send heartbeats, pings and results straight to the
//! [`Dispatcher`], with the same loops as `ci-agent`
//! ([`heartbeat::keep_alive`](crate::heartbeat::keep_alive),
//! [`retry::retry`](crate::retry::retry)). The scheduling, leases and
//! fencing are exactly those of the HTTP server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::warn;

use crate::backoff::Backoff;
use crate::coordinator::{Coordinator, Dispatch, DispatchFailure, HandBack, Heartbeat, Report};
use crate::dispatcher::{AgentLink, Dispatcher};
use crate::error::Result;
use crate::heartbeat::{keep_alive, Beat};
use crate::model::{AgentId, Build, BuildId, Completion, NewBuild, DEFAULT_REPO_SCHEMES};
use crate::pool::Enrollment;
use crate::retry::retry;
use crate::runner::{execute, Job, LogSink, Outcome, Runner};

/// A coordinator with in-process workers. See the [module docs](self).
#[derive(Debug)]
pub struct LocalCluster {
    dispatcher: Dispatcher,
    tasks: JoinSet<()>,
}

/// Default time limit for a build in a [`LocalCluster`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

impl LocalCluster {
    /// Starts `coordinator` with one worker per runner. Must be called
    /// within a tokio runtime.
    pub async fn start(coordinator: Coordinator, runners: Vec<Arc<dyn Runner>>) -> Result<LocalCluster> {
        let heartbeat = coordinator.lease_policy().interval();
        let link = Arc::new(ChannelLink::default());
        let dispatcher = Dispatcher::spawn(coordinator, link.clone());
        let mut tasks = JoinSet::new();
        for (i, runner) in runners.into_iter().enumerate() {
            let enrollment = Enrollment {
                url: format!("local://worker-{i}"),
                secret: None,
                capacity: runner.capacity().max(1),
                labels: runner.labels(),
                pings: true,
            };
            let (tx, rx) = mpsc::channel(enrollment.capacity as usize);
            link.workers().insert(enrollment.url.clone(), tx);
            let id = dispatcher.register(enrollment.clone(), None).await?.id;
            let worker = Worker {
                id,
                enrollment,
                runner,
                dispatcher: dispatcher.clone(),
                heartbeat,
            };
            tasks.spawn(worker.run(rx));
        }
        dispatcher.start_scheduling().await?;
        Ok(LocalCluster { dispatcher, tasks })
    }

    /// Queues a build.
    pub async fn submit(&self, new: &NewBuild) -> Result<Build> {
        self.dispatcher.submit(new).await
    }

    /// Waits until build `id` has finished.
    pub async fn wait(&self, id: BuildId) -> Result<Build> {
        self.dispatcher.wait_finished(id).await
    }

    /// The dispatcher, for inspection.
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Stops scheduling and abandons running builds.
    pub async fn shutdown(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.dispatcher.shutdown().await;
    }
}

#[derive(Default)]
struct ChannelLink {
    workers: Mutex<HashMap<String, mpsc::Sender<Dispatch>>>,
}

impl ChannelLink {
    fn workers(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Dispatch>>> {
        self.workers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl AgentLink for ChannelLink {
    async fn dispatch(&self, d: &Dispatch) -> Result<(), DispatchFailure> {
        let tx = self
            .workers()
            .get(&d.agent_url)
            .cloned()
            .ok_or_else(|| DispatchFailure::Unreachable(format!("no worker at {}", d.agent_url)))?;
        tx.try_send(d.clone()).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                DispatchFailure::Busy(format!("worker {} is full", d.agent_url))
            }
            mpsc::error::TrySendError::Closed(_) => {
                DispatchFailure::Unreachable(format!("worker {} is gone", d.agent_url))
            }
        })
    }
}

struct Worker {
    id: AgentId,
    enrollment: Enrollment,
    runner: Arc<dyn Runner>,
    dispatcher: Dispatcher,
    heartbeat: Duration,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Dispatch>) {
        let mut jobs = JoinSet::new();
        loop {
            let running = Arc::new(std::sync::atomic::AtomicUsize::new(jobs.len()));
            // Pings while idle, like ci-agent: silence then means it is gone.
            let pings = {
                let (dispatcher, id, running) = (self.dispatcher.clone(), self.id, running.clone());
                keep_alive(self.heartbeat, move || {
                    let (dispatcher, running) = (dispatcher.clone(), running.clone());
                    async move {
                        if running.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                            return Beat::Alive;
                        }
                        let ping = Heartbeat {
                            agent: Some(id),
                            verified: true,
                            ..Heartbeat::default()
                        };
                        Beat::of(&dispatcher.heartbeat(ping).await)
                    }
                })
            };
            tokio::pin!(pings);
            let forgotten = loop {
                tokio::select! {
                    d = rx.recv() => {
                        let Some(d) = d else { return };
                        let job = run_job(d, self.runner.clone(), self.dispatcher.clone(), self.heartbeat);
                        jobs.spawn(job);
                    }
                    Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
                    () = &mut pings => break true,
                }
                running.store(jobs.len(), std::sync::atomic::Ordering::SeqCst);
            };
            if forgotten {
                // The coordinator dropped it: register again, as ci-agent does.
                warn!(worker = %self.enrollment.url, "the coordinator forgot this worker; registering again");
                let again = retry("register", Backoff::default(), || {
                    self.dispatcher.register(self.enrollment.clone(), None)
                })
                .await;
                match again {
                    Ok(r) => self.id = r.id,
                    Err(e) => {
                        warn!(worker = %self.enrollment.url, cause = %e, "cannot register again; stopping");
                        return;
                    }
                }
            }
        }
    }
}

/// Runs one attempt to the end, heartbeating, and delivers its outcome.
async fn run_job(d: Dispatch, runner: Arc<dyn Runner>, dispatcher: Dispatcher, every: Duration) {
    let (step, attempt, agent) = (d.step.id, d.step.attempt, d.agent);
    let outcome = match Job::from_request(&d.request(), DEFAULT_REPO_SCHEMES) {
        Ok(job) => {
            let log = LogSink::default();
            let run = execute(&*runner, &job, &log, DEFAULT_TIMEOUT);
            let beat = keep_alive(every, || {
                let dispatcher = dispatcher.clone();
                async move {
                    let hb = Heartbeat {
                        step: Some(step),
                        attempt: Some(attempt),
                        agent: Some(agent),
                        verified: true,
                    };
                    Beat::of(&dispatcher.heartbeat(hb).await)
                }
            });
            // Losing the lease ends the attempt: its work must stop.
            tokio::select! {
                o = run => o,
                () = beat => {
                    warn!(%step, %attempt, "heartbeat refused, abandoning the step");
                    return;
                }
            }
        }
        Err(e) => Outcome::Completed(Completion::not_run(e)),
    };
    let delivered = match outcome {
        Outcome::Completed(completion) => {
            let report = Report {
                step,
                attempt: Some(attempt),
                agent: Some(agent),
                verified: true,
                completion,
            };
            retry("deliver result", Backoff::default(), || {
                dispatcher.complete(report.clone())
            })
            .await
            .map(drop)
        }
        Outcome::HandBack(reason) => {
            let back = HandBack {
                step,
                attempt,
                agent: Some(agent),
                verified: true,
                reason,
            };
            retry("hand back", Backoff::default(), || {
                dispatcher.hand_back(back.clone())
            })
            .await
        }
    };
    if let Err(e) = delivered {
        warn!(%step, cause = %e, "result refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CommitRef, RepoUrl};
    use crate::runner::RunError;
    use crate::{LeasePolicy, MemoryStore, Stream};

    /// A runner whose builds take `secs` seconds (of tokio's clock).
    struct Sleeps(u64);

    #[async_trait]
    impl Runner for Sleeps {
        async fn run(&self, job: &Job, log: &LogSink) -> std::result::Result<i32, RunError> {
            tokio::time::sleep(Duration::from_millis(self.0)).await;
            log.write(Stream::Stdout, format!("built {}\n", job.commit).as_bytes());
            Ok(0)
        }
    }

    fn build() -> NewBuild {
        let repo = RepoUrl::parse("/srv/repo").unwrap();
        NewBuild::new(repo, CommitRef::parse("abcd").unwrap(), "make").unwrap()
    }

    /// Bug: workers whose builds lasted long enough to heartbeat were taken
    /// for agents that ping while idle, which they did not, and were dropped
    /// a lease after their last build: the next build never finished.
    #[tokio::test(start_paused = true)]
    async fn idle_workers_are_not_forgotten() {
        let coordinator = Coordinator::builder(Arc::new(MemoryStore::new()))
            .lease(LeasePolicy::default())
            .build()
            .await
            .unwrap();
        let runners: Vec<Arc<dyn Runner>> = vec![Arc::new(Sleeps(1500)), Arc::new(Sleeps(1500))];
        let cluster = LocalCluster::start(coordinator, runners).await.unwrap();
        let first: Vec<BuildId> = [cluster.submit(&build()).await, cluster.submit(&build()).await]
            .into_iter()
            .map(|b| b.unwrap().id)
            .collect();
        for id in first {
            let b = cluster.wait(id).await.unwrap();
            assert_eq!(b.status, crate::BuildStatus::Success);
        }
        // Idle for two leases.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(cluster.dispatcher().agents().await.unwrap().len(), 2);
        let next = cluster.submit(&build()).await.unwrap().id;
        let done = tokio::time::timeout(Duration::from_secs(60), cluster.wait(next))
            .await
            .expect("the build after the idle time finishes");
        assert_eq!(done.unwrap().status, crate::BuildStatus::Success);
        cluster.shutdown().await;
    }

    /// Capacity: a runner that takes three builds at once gets three.
    #[tokio::test(start_paused = true)]
    async fn a_worker_runs_as_many_builds_as_its_capacity() {
        struct Three;

        #[async_trait]
        impl Runner for Three {
            fn capacity(&self) -> u32 {
                3
            }
            async fn run(&self, _: &Job, _: &LogSink) -> std::result::Result<i32, RunError> {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(0)
            }
        }

        let coordinator = Coordinator::builder(Arc::new(MemoryStore::new()))
            .build()
            .await
            .unwrap();
        let cluster = LocalCluster::start(coordinator, vec![Arc::new(Three)])
            .await
            .unwrap();
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(cluster.submit(&build()).await.unwrap().id);
        }
        let started = tokio::time::Instant::now();
        for id in &ids {
            cluster.wait(*id).await.unwrap();
        }
        // Three at once, then the fourth: two rounds of five seconds.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(10) && took < Duration::from_secs(11),
            "{took:?}"
        );
        cluster.shutdown().await;
    }
}
