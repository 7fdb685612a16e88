//! The dispatcher: runs a [`Coordinator`] in an async program.
//!
//! It shares the coordinator behind a mutex, publishes its [`Event`]s, and
//! runs the scheduling loop: on every wake-up (a build created, an agent
//! registered or freed, a lease deadline reached) it expires lapsed leases,
//! plans dispatches, and hands each one to an [`AgentLink`] concurrently.
//! The HTTP server links over HTTP; [`LocalCluster`](crate::local::LocalCluster)
//! links over channels.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, Notify};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::coordinator::{
    Accepted, Cancel, Coordinator, Dispatch, DispatchFailure, Event, Heartbeat, Registration, Report,
    StopOrder,
};
use crate::error::{Error, Result};
use crate::model::{Build, BuildId, NewBuild};

/// How dispatches reach agents.
#[async_trait]
pub trait AgentLink: Send + Sync + 'static {
    /// Delivers `dispatch` to its agent. Returns once the agent has accepted
    /// the build (it runs in the background), not when it finishes.
    async fn dispatch(&self, dispatch: &Dispatch) -> Result<(), DispatchFailure>;

    /// Tells an agent to stop an attempt (a cancel). Returns once it has,
    /// or fails if the agent cannot be reached. The default does nothing:
    /// the attempt's next heartbeat is refused and the agent stops it then.
    async fn stop(&self, order: &StopOrder) -> Result<(), DispatchFailure> {
        let _ = order;
        Ok(())
    }
}

/// A shared, running coordinator. See the [module docs](self).
#[derive(Debug)]
pub struct Dispatcher {
    coordinator: Mutex<Coordinator>,
    wake: Notify,
    events: broadcast::Sender<Event>,
}

impl Dispatcher {
    /// Wraps `coordinator`. Call [`Dispatcher::run`] to start scheduling.
    pub fn new(coordinator: Coordinator) -> Arc<Dispatcher> {
        let (events, _) = broadcast::channel(4096);
        Arc::new(Dispatcher {
            coordinator: Mutex::new(coordinator),
            wake: Notify::new(),
            events,
        })
    }

    /// Runs `f` on the coordinator, then publishes the events it recorded
    /// and wakes the scheduling loop if they may have made work possible.
    ///
    /// N.B.: `f` runs under a mutex. It must not block for long.
    pub fn with<R>(&self, f: impl FnOnce(&mut Coordinator) -> R) -> R {
        let (out, events) = {
            let mut c = self.coordinator.lock().unwrap_or_else(PoisonError::into_inner);
            let out = f(&mut c);
            (out, c.take_events())
        };
        let mut wake = false;
        for e in events {
            wake |= !matches!(e, Event::Started { .. } | Event::Output(_));
            // No subscribers is fine.
            let _ = self.events.send(e);
        }
        if wake {
            self.wake.notify_one();
        }
        out
    }

    /// Asks for a scheduling pass.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Everything that happens from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// See [`Coordinator::submit`].
    pub fn submit(&self, new: &NewBuild) -> Result<Build> {
        self.with(|c| c.submit(new))
    }

    /// See [`Coordinator::register_agent`].
    pub fn register_agent(&self, url: &str) -> Result<Registration> {
        self.with(|c| c.register_agent(url))
    }

    /// See [`Coordinator::heartbeat`].
    pub fn heartbeat(&self, hb: Heartbeat) -> Result<()> {
        self.with(|c| c.heartbeat(hb))
    }

    /// See [`Coordinator::complete`].
    pub fn complete(&self, report: Report) -> Result<Accepted> {
        self.with(|c| c.complete(report))
    }

    /// Cancels build `id`. A running build is stopped on its agent through
    /// `link` before this returns.
    pub async fn cancel(&self, id: BuildId, link: &dyn AgentLink) -> Result<Build> {
        let order = match self.with(|c| c.cancel(id))? {
            Cancel::Done(b) => return Ok(b),
            Cancel::Stop(order) => order,
        };
        let reached = link.stop(&order).await;
        if let Err(e) = &reached {
            warn!(build = %id, agent = %order.agent, failure = ?e, "could not stop the build on its agent");
        }
        self.with(|c| c.stop_delivered(&order, reached.is_ok()))?;
        self.with(|c| c.store().build(id))?
            .ok_or(Error::BuildNotFound(id))
    }

    /// Waits until build `id` has finished and returns it.
    pub async fn wait_finished(&self, id: BuildId) -> Result<Build> {
        let mut events = self.subscribe();
        loop {
            let build = self
                .with(|c| c.store().build(id))?
                .ok_or(Error::BuildNotFound(id))?;
            if build.status.is_finished() {
                return Ok(build);
            }
            loop {
                match events.recv().await {
                    Ok(Event::Finished { build, .. }) if build == id => break,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(Error::Unavailable("dispatcher stopped".into()))
                    }
                }
            }
        }
    }

    /// The scheduling loop. Runs until `shutdown` resolves, then waits for
    /// dispatches in flight.
    pub async fn run(self: Arc<Self>, link: Arc<dyn AgentLink>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut in_flight = JoinSet::new();
        let mut retry = Backoff::default().delays(fastrand::Rng::new());
        loop {
            let pass = self.with(|c| -> Result<_> {
                let dropped = c.expire()?;
                let dispatches = c.plan()?;
                let wait = c.next_deadline().map(|t| t.since(c.clock().now()));
                Ok((dropped, dispatches, wait))
            });
            let wait = match pass {
                Ok((dropped, dispatches, wait)) => {
                    retry.reset();
                    if dropped > 0 {
                        info!(dropped, "dropped unresponsive agents");
                    }
                    for d in dispatches {
                        in_flight.spawn(deliver(self.clone(), link.clone(), d));
                    }
                    // +1 ms: deadlines are in whole milliseconds.
                    wait.map(|w| w + Duration::from_millis(1))
                }
                Err(e) => {
                    let delay = retry.next().unwrap_or(Duration::from_secs(1));
                    error!(cause = %e, retry_in = ?delay, "scheduling pass failed");
                    Some(delay)
                }
            };
            while in_flight.try_join_next().is_some() {}
            let sleep = async {
                match wait {
                    Some(w) => tokio::time::sleep(w).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = sleep => {}
                _ = &mut shutdown => break,
            }
        }
        debug!(in_flight = in_flight.len(), "scheduling loop stopping");
        while in_flight.join_next().await.is_some() {}
    }
}

async fn deliver(dispatcher: Arc<Dispatcher>, link: Arc<dyn AgentLink>, d: Dispatch) {
    debug!(build = %d.build.id, attempt = %d.build.attempt, agent = %d.agent, "dispatching");
    let Err(failure) = link.dispatch(&d).await else {
        return;
    };
    warn!(build = %d.build.id, agent = %d.agent, url = %d.agent_url, ?failure, "dispatch failed");
    if let Err(e) = dispatcher.with(|c| c.dispatch_failed(&d, failure)) {
        // The lease stays; when it lapses the build is requeued anyway.
        error!(cause = %e, build = %d.build.id, "could not record failed dispatch");
    }
}
