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
    /// A handle on itself, for the delivery tasks; set by `run`.
    me: std::sync::OnceLock<std::sync::Weak<Dispatcher>>,
    /// Set by [`Dispatcher::run`]: from then on, whatever makes work possible
    /// (a build created, an agent registered or freed) dispatches at once,
    /// in the same critical section, without waiting for the loop.
    link: std::sync::OnceLock<Arc<dyn AgentLink>>,
    /// Deliveries in flight, awaited at shutdown.
    in_flight: Mutex<JoinSet<()>>,
    /// A scheduling pass failed: the loop tries again.
    replan: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for dyn AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentLink")
    }
}

impl Dispatcher {
    /// Wraps `coordinator`. Call [`Dispatcher::run`] to start scheduling.
    pub fn new(coordinator: Coordinator) -> Arc<Dispatcher> {
        let (events, _) = broadcast::channel(4096);
        Arc::new(Dispatcher {
            coordinator: Mutex::new(coordinator),
            wake: Notify::new(),
            events,
            link: std::sync::OnceLock::new(),
            me: std::sync::OnceLock::new(),
            in_flight: Mutex::new(JoinSet::new()),
            replan: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Runs `f` on the coordinator, then publishes the events it recorded
    /// and wakes the scheduling loop if they may have made work possible.
    ///
    /// N.B.: `f` runs under a mutex. It must not block for long.
    pub fn with<R>(&self, f: impl FnOnce(&mut Coordinator) -> R) -> R {
        let (out, events, dispatches) = {
            let mut c = self.coordinator.lock().unwrap_or_else(PoisonError::into_inner);
            let out = f(&mut c);
            let mut events = c.take_events();
            let worth = events
                .iter()
                .any(|e| !matches!(e, Event::Started { .. } | Event::Output(_)));
            // The scheduling pass the triggers call for, right here.
            let dispatches = match (worth, self.link.get()) {
                (true, Some(_)) => match c.plan() {
                    Ok(d) => d,
                    Err(e) => {
                        error!(cause = %e, "scheduling pass failed; the loop retries");
                        self.replan.store(true, std::sync::atomic::Ordering::SeqCst);
                        self.wake.notify_one();
                        Vec::new()
                    }
                },
                _ => Vec::new(),
            };
            events.extend(c.take_events());
            (out, events, dispatches)
        };
        if let (false, Some(link)) = (dispatches.is_empty(), self.link.get()) {
            if let (Ok(me), Ok(rt)) = (self.me(), tokio::runtime::Handle::try_current()) {
                let mut set = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
                while set.try_join_next().is_some() {}
                for d in dispatches {
                    set.spawn_on(deliver(me.clone(), link.clone(), d), &rt);
                }
            }
        }
        let mut wake = false;
        for e in events {
            // Lease deadlines may have moved: the loop re-arms its timer.
            wake |= !matches!(e, Event::Output(_));
            // No subscribers is fine.
            let _ = self.events.send(e);
        }
        if wake {
            self.wake.notify_one();
        }
        out
    }

    /// This dispatcher as an `Arc`, for the delivery tasks.
    fn me(&self) -> Result<Arc<Dispatcher>> {
        self.me
            .get()
            .and_then(std::sync::Weak::upgrade)
            .ok_or_else(|| Error::Unavailable("dispatcher not running".into()))
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
        let first_ping = self.with(|c| {
            let first = hb.build.is_none() && hb.agent.and_then(|a| c.agent(a)).is_some_and(|a| !a.pings);
            c.heartbeat(hb).map(|()| first)
        })?;
        if first_ping {
            // N.B.: the agent now has a silence deadline, which the loop
            // must arm: no event says so.
            self.wake();
        }
        Ok(())
    }

    /// See [`Coordinator::complete`].
    pub fn complete(&self, report: Report) -> Result<Accepted> {
        self.with(|c| c.complete(report))
    }

    /// Takes live output of a running attempt. It counts as a heartbeat
    /// (checked and renewed in memory, under the lock); the pieces are then
    /// stored outside the lock and off the async threads: the store's
    /// append is fenced by attempt itself, so a lease lost in between
    /// stores nothing.
    pub async fn output(&self, hb: Heartbeat, pieces: Vec<crate::model::LogPiece>) -> Result<usize> {
        let build = hb
            .build
            .ok_or_else(|| Error::invalid("output", "needs a build `id`"))?;
        let (store, attempt) = self.with(|c| -> Result<_> {
            c.heartbeat(hb)?;
            let attempt = c.lease(build).map(|l| l.attempt).unwrap_or_default();
            Ok((c.store().clone(), attempt))
        })?;
        let stored = tokio::task::spawn_blocking(move || store.append_log(build, attempt, &pieces))
            .await
            .map_err(|e| Error::Unavailable(format!("log writer: {e}")))??;
        if stored > 0 {
            // No subscribers is fine.
            let _ = self.events.send(Event::Output(build));
        }
        Ok(stored)
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
        let _ = self.me.set(Arc::downgrade(&self));
        let _ = self.link.set(link);
        let mut retry = Backoff::default().delays(fastrand::Rng::new());
        // Builds recovered from the store have no event to trigger them.
        let mut plan = true;
        loop {
            if plan || self.replan.swap(false, std::sync::atomic::Ordering::SeqCst) {
                self.plan_now();
            }
            let pass = self.with(|c| -> Result<_> {
                let dropped = c.expire()?;
                let wait = c.next_deadline().map(|t| t.since(c.clock().now()));
                Ok((dropped, wait))
            });
            let wait = match pass {
                Ok((dropped, wait)) => {
                    retry.reset();
                    if dropped > 0 {
                        info!(dropped, "dropped unresponsive agents");
                    }
                    // +1 ms: deadlines are in whole milliseconds.
                    wait.map(|w| w + Duration::from_millis(1))
                }
                Err(e) => {
                    let delay = retry.next().unwrap_or(Duration::from_secs(1));
                    error!(cause = %e, retry_in = ?delay, "scheduling pass failed");
                    self.replan.store(true, std::sync::atomic::Ordering::SeqCst);
                    Some(delay)
                }
            };
            let sleep = async {
                match wait {
                    Some(w) => tokio::time::sleep(w).await,
                    None => std::future::pending().await,
                }
            };
            // A deadline passed: an agent's cooldown may have ended, which no
            // event announces, so plan then too.
            plan = tokio::select! {
                _ = self.wake.notified() => false,
                _ = sleep => true,
                _ = &mut shutdown => break,
            };
        }
        let mut set = std::mem::take(&mut *self.in_flight.lock().unwrap_or_else(PoisonError::into_inner));
        debug!(in_flight = set.len(), "scheduling loop stopping");
        while set.join_next().await.is_some() {}
    }

    /// A scheduling pass and its deliveries, now.
    fn plan_now(&self) {
        let planned = {
            let mut c = self.coordinator.lock().unwrap_or_else(PoisonError::into_inner);
            let d = c.plan();
            (d, c.take_events())
        };
        let (dispatches, events) = planned;
        for e in events {
            let _ = self.events.send(e);
        }
        let dispatches = match dispatches {
            Ok(d) => d,
            Err(e) => {
                error!(cause = %e, "scheduling pass failed");
                self.replan.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
        };
        if let (Some(link), Ok(me)) = (self.link.get(), self.me()) {
            let mut set = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
            while set.try_join_next().is_some() {}
            for d in dispatches {
                set.spawn(deliver(me.clone(), link.clone(), d));
            }
        }
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
