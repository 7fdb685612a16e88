//! The dispatcher: one task owns the [`Coordinator`]; everything else sends
//! it commands and awaits typed answers.
//!
//! The task serves commands in the order they arrive (a burst at a time),
//! then runs a scheduling pass if any of them may have made work possible
//! (a build created, an agent registered or freed), and hands each
//! dispatch to its [`AgentLink`] on a task of its own: a slow agent delays
//! nobody. It also keeps the coordinator's deadlines: lapsed leases, silent
//! agents, ended cooldowns. Heartbeats and live output do not come here at
//! all: they go through the [`Fence`], straight to the store.
//!
//! A dispatcher starts paused: it answers commands, but runs scheduling
//! passes only when asked ([`Dispatcher::plan`]), until
//! [`Dispatcher::start_scheduling`]. A server serving HTTP starts it; a
//! test driving the routes alone can leave it paused.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::clock::Timestamp;
use crate::coordinator::{
    Accepted, Cancel, Coordinator, Dispatch, DispatchFailure, Event, Fence, HandBack, Heartbeat,
    Registration, Report, StopOrder, Stopped,
};
use crate::error::{Error, Result};
use crate::model::{AgentId, Build, BuildId, LogPiece, NewBuild};
use crate::pool::{Agent, AgentPool, Enrollment};
use crate::store::Store;

/// How dispatches and stop orders reach agents.
#[async_trait]
pub trait AgentLink: Send + Sync + 'static {
    /// Delivers `dispatch` to its agent. Returns once the agent has accepted
    /// the build (it runs in the background), not when it finishes.
    async fn dispatch(&self, dispatch: &Dispatch) -> Result<(), DispatchFailure>;

    /// Tells an agent to stop an attempt (a cancel). Returns once it has;
    /// [`DispatchFailure::Rejected`] if the agent cannot stop work (it is
    /// kept), another failure if it cannot be reached (it is dropped). The
    /// default does nothing: the attempt's next heartbeat is refused and
    /// the agent stops it then.
    async fn stop(&self, order: &StopOrder) -> Result<(), DispatchFailure> {
        let _ = order;
        Ok(())
    }
}

type Reply<T> = oneshot::Sender<Result<T>>;

/// What the task is asked to do.
enum Command {
    Submit(Box<NewBuild>, Reply<Build>),
    Register(Enrollment, Option<String>, Reply<Registration>),
    Complete(Report, Reply<Accepted>),
    HandBack(HandBack, Reply<()>),
    Cancel(BuildId, Reply<Build>),
    Stopped(BuildId, Vec<(StopOrder, Stopped)>, Reply<Build>),
    /// Stop orders of attempts past their time limits went out.
    StopsDelivered(Vec<(StopOrder, Stopped)>),
    Retry(BuildId, Reply<Build>),
    Left(AgentId, bool, Reply<()>),
    Disconnected(AgentId, Reply<()>),
    Failed(Box<Dispatch>, DispatchFailure, Option<Reply<()>>),
    Plan(Reply<Vec<Dispatch>>),
    Start,
    Shutdown(oneshot::Sender<()>),
}

/// A handle on the task that owns the coordinator. See the [module
/// docs](self). Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    tx: mpsc::Sender<Command>,
    events: broadcast::Sender<Event>,
    fence: Fence,
    store: Arc<dyn Store>,
    pool: Arc<dyn AgentPool>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for dyn AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentLink")
    }
}

/// Commands waiting for the task, at most.
const QUEUE: usize = 4096;
/// Commands served before a scheduling pass, at most.
const BURST: usize = 256;

impl Dispatcher {
    /// Starts the task that owns `coordinator` and delivers through `link`,
    /// paused (see the [module docs](self)). Must be called within a tokio
    /// runtime.
    pub fn spawn(coordinator: Coordinator, link: Arc<dyn AgentLink>) -> Dispatcher {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (events, _) = broadcast::channel(4096);
        let handle = Dispatcher {
            tx: tx.clone(),
            events: events.clone(),
            fence: coordinator.fence().clone(),
            store: coordinator.store().clone(),
            pool: coordinator.pool().clone(),
        };
        let task = Task {
            wake: coordinator.fence().woken(),
            c: coordinator,
            rx,
            me: tx.downgrade(),
            events,
            link,
            scheduling: false,
            deliveries: JoinSet::new(),
            deadline: None,
            retry: Backoff::default().delays(fastrand::Rng::new()),
        };
        tokio::spawn(task.run());
        handle
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| Error::Unavailable("the dispatcher has stopped".into()))?;
        answer
            .await
            .map_err(|_| Error::Unavailable("the dispatcher has stopped".into()))?
    }

    /// From now on, scheduling passes run whenever work may have become
    /// possible, and deadlines are kept.
    pub async fn start_scheduling(&self) -> Result<()> {
        self.tx
            .send(Command::Start)
            .await
            .map_err(|_| Error::Unavailable("the dispatcher has stopped".into()))
    }

    /// Stops the task after the dispatches in flight were delivered (or
    /// failed). Commands sent later get [`Error::Unavailable`].
    pub async fn shutdown(&self) {
        let (done, finished) = oneshot::channel();
        if self.tx.send(Command::Shutdown(done)).await.is_ok() {
            let _ = finished.await;
        }
    }

    /// Queues a build. See [`Coordinator::submit`].
    pub async fn submit(&self, new: &NewBuild) -> Result<Build> {
        let new = new.clone();
        self.call(|r| Command::Submit(Box::new(new), r)).await
    }

    /// Registers an agent. See [`Coordinator::register`].
    pub async fn register(&self, enrollment: Enrollment, proof: Option<String>) -> Result<Registration> {
        self.call(|r| Command::Register(enrollment, proof, r)).await
    }

    /// Takes a result. See [`Coordinator::complete`].
    pub async fn complete(&self, report: Report) -> Result<Accepted> {
        self.call(|r| Command::Complete(report, r)).await
    }

    /// Takes an attempt an agent gives back. See [`Coordinator::hand_back`].
    pub async fn hand_back(&self, back: HandBack) -> Result<()> {
        self.call(|r| Command::HandBack(back, r)).await
    }

    /// Cancels build `id`. Its running steps are stopped on their agents
    /// before this returns.
    pub async fn cancel(&self, id: BuildId) -> Result<Build> {
        self.call(|r| Command::Cancel(id, r)).await
    }

    /// Runs the failed, canceled and skipped steps of a finished build
    /// again. See [`Coordinator::retry`].
    pub async fn retry(&self, id: BuildId) -> Result<Build> {
        self.call(|r| Command::Retry(id, r)).await
    }

    /// An agent leaves on purpose. See [`Coordinator::agent_left`].
    pub async fn agent_left(&self, id: AgentId, verified: bool) -> Result<()> {
        self.call(|r| Command::Left(id, verified, r)).await
    }

    /// The connection of agent `id` closed: requeue what it held, now.
    pub async fn agent_disconnected(&self, id: AgentId) -> Result<()> {
        self.call(|r| Command::Disconnected(id, r)).await
    }

    /// One scheduling pass, now, whose dispatches go to the caller instead
    /// of the link: for tests and for embedders that deliver themselves.
    pub async fn plan(&self) -> Result<Vec<Dispatch>> {
        self.call(Command::Plan).await
    }

    /// Records that a dispatch the caller took with [`Dispatcher::plan`]
    /// could not be delivered. See [`Coordinator::dispatch_failed`].
    pub async fn dispatch_failed(&self, dispatch: Dispatch, failure: DispatchFailure) -> Result<()> {
        self.call(|r| Command::Failed(Box::new(dispatch), failure, Some(r)))
            .await
    }

    /// A heartbeat or ping. See [`Fence::heartbeat`].
    pub async fn heartbeat(&self, hb: Heartbeat) -> Result<()> {
        self.fence.heartbeat(hb).await
    }

    /// Live output of a running attempt. See [`Fence::output`].
    pub async fn output(&self, hb: Heartbeat, pieces: &[LogPiece]) -> Result<usize> {
        let (stored, event) = self.fence.output(hb, pieces).await?;
        if let Some(e) = event {
            // No subscribers is fine.
            let _ = self.events.send(e);
        }
        Ok(stored)
    }

    /// The path of heartbeats and live output.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// The store, for reads.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Every agent.
    pub async fn agents(&self) -> Result<Vec<Agent>> {
        self.pool.agents().await
    }

    /// Everything that happens from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Waits until build `id` has finished and returns it.
    pub async fn wait_finished(&self, id: BuildId) -> Result<Build> {
        let mut events = self.subscribe();
        loop {
            let build = self.store.build(id).await?.ok_or(Error::BuildNotFound(id))?;
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
}

// === the task ===

struct Task {
    c: Coordinator,
    rx: mpsc::Receiver<Command>,
    /// Itself, for deliveries to report failures (weak, so that the task
    /// ends when every handle is gone).
    me: mpsc::WeakSender<Command>,
    events: broadcast::Sender<Event>,
    link: Arc<dyn AgentLink>,
    scheduling: bool,
    deliveries: JoinSet<()>,
    /// When to look at leases, silences and cooldowns next: never later
    /// than the earliest of them (earlier is only a wasted look).
    deadline: Option<Timestamp>,
    retry: crate::backoff::Delays,
    wake: Arc<Notify>,
}

impl Task {
    async fn run(mut self) {
        let mut stopping = None;
        let mut batch = Vec::with_capacity(BURST);
        loop {
            while self.deliveries.try_join_next().is_some() {}
            let wait = self
                .deadline
                .filter(|_| self.scheduling)
                .map(|d| d.since(self.c.clock().now()) + Duration::from_millis(1));
            let sleep = async {
                match wait {
                    Some(w) => tokio::time::sleep(w).await,
                    None => std::future::pending().await,
                }
            };
            let mut plan = false;
            tokio::select! {
                n = self.rx.recv_many(&mut batch, BURST) => {
                    if n == 0 {
                        break; // every handle is gone
                    }
                    for cmd in batch.drain(..) {
                        match cmd {
                            Command::Shutdown(done) => stopping = Some(done),
                            cmd => plan |= self.serve(cmd).await,
                        }
                    }
                    self.extend_deadline();
                }
                () = sleep => {
                    self.expire().await;
                    // A cooldown may have ended, which no event announces.
                    plan = true;
                }
                () = self.wake.notified() => {
                    self.deadline = self.next_deadline().await;
                }
            }
            if stopping.is_some() {
                break;
            }
            if plan && self.scheduling {
                self.plan().await;
            }
            self.publish();
        }
        self.publish();
        debug!(in_flight = self.deliveries.len(), "dispatcher stopping");
        // Deliveries that fail now have no one to tell.
        self.rx.close();
        while self.deliveries.join_next().await.is_some() {}
        if let Some(done) = stopping {
            let _ = done.send(());
        }
    }

    /// Serves one command. Returns whether it may have made work possible.
    async fn serve(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(new, reply) => answer(reply, self.c.submit(&new).await),
            Command::Register(e, proof, reply) => answer(reply, self.c.register(e, proof.as_deref()).await),
            Command::Complete(report, reply) => answer(reply, self.c.complete(report).await),
            Command::HandBack(back, reply) => answer(reply, self.c.hand_back(back).await),
            Command::Left(id, verified, reply) => answer(reply, self.c.agent_left(id, verified).await),
            Command::Disconnected(id, reply) => answer(reply, self.c.agent_disconnected(id).await),
            Command::Cancel(id, reply) => match self.c.cancel(id).await {
                Ok(Cancel { build, stops }) if stops.is_empty() => answer(reply, Ok(*build)),
                Ok(Cancel { stops, .. }) => {
                    // N.B.: the agents take a while to kill the work; the
                    // answer waits for them, the task does not.
                    self.deliver_stops(stops, move |done| Command::Stopped(id, done, reply));
                    false
                }
                Err(e) => answer(reply, Err(e)),
            },
            Command::StopsDelivered(orders) => {
                for (order, stopped) in &orders {
                    if let Err(e) = self.c.stop_delivered(order, *stopped).await {
                        error!(cause = %e, step = %order.step, "could not record a stop order's outcome");
                    }
                }
                true
            }
            Command::Stopped(id, orders, reply) => {
                let mut done = Ok(());
                for (order, stopped) in &orders {
                    done = done.and(self.c.stop_delivered(order, *stopped).await);
                }
                let done = match done {
                    Ok(()) => self
                        .c
                        .store()
                        .build(id)
                        .await
                        .and_then(|b| b.ok_or(Error::BuildNotFound(id))),
                    Err(e) => Err(e),
                };
                answer(reply, done)
            }
            Command::Retry(id, reply) => answer(reply, self.c.retry(id).await),
            Command::Failed(d, failure, reply) => {
                warn!(step = %d.step.id, agent = %d.agent, url = %d.agent_url, ?failure, "dispatch failed");
                let recorded = self.c.dispatch_failed(&d, failure).await;
                if let Err(e) = &recorded {
                    // The lease stays; when it lapses the build is requeued anyway.
                    error!(cause = %e, step = %d.step.id, "could not record a failed dispatch");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(recorded);
                }
                true
            }
            Command::Plan(reply) => {
                let planned = self.c.plan().await;
                self.extend_deadline();
                let _ = reply.send(planned);
                false
            }
            Command::Start => {
                self.scheduling = true;
                self.deadline = self.next_deadline().await;
                // Builds recovered from the store have no event to trigger them.
                true
            }
            Command::Shutdown(_) => false,
        }
    }

    /// A scheduling pass, its dispatches handed to the link.
    async fn plan(&mut self) {
        match self.c.plan().await {
            Ok(dispatches) => {
                self.retry.reset();
                if !dispatches.is_empty() {
                    self.extend_deadline();
                }
                for d in dispatches {
                    let (link, me) = (self.link.clone(), self.me.clone());
                    self.deliveries.spawn(async move {
                        debug!(step = %d.step.id, attempt = %d.step.attempt, agent = %d.agent, "dispatching");
                        if let Err(failure) = link.dispatch(&d).await {
                            if let Some(me) = me.upgrade() {
                                let _ = me.send(Command::Failed(Box::new(d), failure, None)).await;
                            }
                        }
                    });
                }
            }
            Err(e) => {
                // Nothing was started (a pass starts its attempts in one
                // step): try again after a backoff.
                let delay = self.retry.next().unwrap_or(Duration::from_secs(1));
                error!(cause = %e, retry_in = ?delay, "scheduling pass failed");
                let at = self.c.clock().now().plus(delay);
                self.deadline = Some(self.deadline.map_or(at, |d| d.min(at)));
            }
        }
    }

    async fn expire(&mut self) {
        match self.c.expire().await {
            Ok(0) => {}
            Ok(dropped) => info!(dropped, "dropped unresponsive agents"),
            Err(e) => error!(cause = %e, "could not expire leases"),
        }
        let stops = self.c.time_out().await;
        if !stops.is_empty() {
            warn!(
                steps = stops.len(),
                "steps ran past their time limits; stopping them"
            );
            self.deliver_stops(stops, Command::StopsDelivered);
        }
        self.deadline = self.next_deadline().await;
    }

    /// Sends stop orders to their agents in the background, all at once,
    /// and hands their outcomes back to the task as `then` makes them.
    fn deliver_stops(
        &mut self,
        stops: Vec<StopOrder>,
        then: impl FnOnce(Vec<(StopOrder, Stopped)>) -> Command + Send + 'static,
    ) {
        let (link, me) = (self.link.clone(), self.me.clone());
        self.deliveries.spawn(async move {
            let mut stopping = tokio::task::JoinSet::new();
            for order in stops {
                let link = link.clone();
                stopping.spawn(async move {
                    let reached = link.stop(&order).await;
                    if let Err(e) = &reached {
                        warn!(step = %order.step, agent = %order.agent, failure = ?e, "could not stop the step on its agent");
                    }
                    (order, Stopped::from_link(&reached))
                });
            }
            let mut done = Vec::new();
            while let Some(stopped) = stopping.join_next().await {
                done.extend(stopped.ok());
            }
            if let Some(me) = me.upgrade() {
                let _ = me.send(then(done)).await;
            }
        });
    }

    async fn next_deadline(&self) -> Option<Timestamp> {
        match self.c.next_deadline().await {
            Ok(d) => d,
            Err(e) => {
                error!(cause = %e, "could not read the next deadline; looking again in a second");
                Some(self.c.clock().now().plus(Duration::from_secs(1)))
            }
        }
    }

    /// A command or a pass may have started leases or cooldowns, which run
    /// a full lease from now, and no deadline is later than that: the timer
    /// need not be later either.
    fn extend_deadline(&mut self) {
        let at = self.c.lease_policy().deadline(self.c.clock().now());
        self.deadline = Some(self.deadline.map_or(at, |d| d.min(at)));
    }

    fn publish(&mut self) {
        for e in self.c.take_events() {
            // No subscribers is fine.
            let _ = self.events.send(e);
        }
    }
}

/// Sends a command's answer. Returns whether it may have made work
/// possible (it succeeded).
fn answer<T>(reply: Reply<T>, result: Result<T>) -> bool {
    let ok = result.is_ok();
    // The caller may have gone; the command still happened.
    let _ = reply.send(result);
    ok
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::model::{BuildStatus, CommitRef, Completion, RepoUrl};
    use crate::{LeasePolicy, MemoryStore};

    /// A link that records what it was asked to deliver and answers as told.
    #[derive(Default)]
    struct FakeLink {
        sent: Mutex<Vec<Dispatch>>,
        stopped: Mutex<Vec<StopOrder>>,
        /// Agents that answer busy, and those that cannot be reached.
        busy: Mutex<Vec<AgentId>>,
        gone: Mutex<Vec<AgentId>>,
    }

    #[async_trait]
    impl AgentLink for FakeLink {
        async fn dispatch(&self, d: &Dispatch) -> Result<(), DispatchFailure> {
            self.sent.lock().unwrap().push(d.clone());
            if self.gone.lock().unwrap().contains(&d.agent) {
                return Err(DispatchFailure::Unreachable("connection refused".into()));
            }
            if self.busy.lock().unwrap().contains(&d.agent) {
                return Err(DispatchFailure::Busy("409 busy".into()));
            }
            Ok(())
        }

        async fn stop(&self, order: &StopOrder) -> Result<(), DispatchFailure> {
            tokio::time::sleep(Duration::from_secs(2)).await;
            self.stopped.lock().unwrap().push(order.clone());
            Ok(())
        }
    }

    fn build() -> NewBuild {
        let repo = RepoUrl::parse("/srv/repo").unwrap();
        NewBuild::new(repo, CommitRef::parse("abcd").unwrap(), "make").unwrap()
    }

    fn policy() -> LeasePolicy {
        LeasePolicy::new(Duration::from_millis(100), 3).unwrap()
    }

    async fn dispatcher(link: Arc<FakeLink>) -> Dispatcher {
        let c = Coordinator::builder(Arc::new(MemoryStore::new()))
            .lease(policy())
            .build()
            .await
            .unwrap();
        let d = Dispatcher::spawn(c, link);
        d.start_scheduling().await.unwrap();
        d
    }

    async fn settle() {
        // Let the task and the deliveries run (time is paused: nothing
        // advances while anything can run).
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    async fn step_of(d: &Dispatcher, id: BuildId) -> crate::StepId {
        d.store().build(id).await.unwrap().unwrap().steps[0].id
    }

    fn sent(link: &FakeLink) -> Vec<(BuildId, AgentId, u32)> {
        let s = link.sent.lock().unwrap();
        s.iter()
            .map(|d| (d.step.build, d.agent, d.step.attempt.0))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_build_is_dispatched_when_made_and_when_an_agent_frees() {
        let link = Arc::new(FakeLink::default());
        let d = dispatcher(link.clone()).await;
        let a = d.register(enroll("http://a:1"), None).await.unwrap().id;
        let x = d.submit(&build()).await.unwrap().id;
        let y = d.submit(&build()).await.unwrap().id;
        settle().await;
        assert_eq!(sent(&link), vec![(x, a, 1)], "one agent, one build");
        let report = Report {
            step: step_of(&d, x).await,
            attempt: None,
            agent: Some(a),
            verified: true,
            completion: Completion {
                exit_code: 0,
                stdout: String::new(),
                stderr: String::new(),
            },
        };
        d.complete(report).await.unwrap();
        settle().await;
        assert_eq!(
            sent(&link),
            vec![(x, a, 1), (y, a, 1)],
            "the freed agent gets the next"
        );
        d.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_agent_loses_its_build_within_the_lease() {
        let link = Arc::new(FakeLink::default());
        let d = dispatcher(link.clone()).await;
        let a = d.register(enroll("http://a:1"), None).await.unwrap().id;
        let x = d.submit(&build()).await.unwrap().id;
        settle().await;
        let b = d.register(enroll("http://b:1"), None).await.unwrap().id;
        // a sends no heartbeat: after the lease (3 × 100 ms) x goes to b.
        tokio::time::sleep(Duration::from_millis(299)).await;
        assert_eq!(sent(&link), vec![(x, a, 1)]);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(sent(&link), vec![(x, a, 1), (x, b, 2)]);
        let agents: Vec<AgentId> = d.agents().await.unwrap().iter().map(|a| a.id).collect();
        assert_eq!(agents, vec![b], "the silent agent is dropped");
        d.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_keep_a_build_where_it_is() {
        let link = Arc::new(FakeLink::default());
        let d = dispatcher(link.clone()).await;
        let a = d.register(enroll("http://a:1"), None).await.unwrap().id;
        let x = d.submit(&build()).await.unwrap().id;
        settle().await;
        d.register(enroll("http://b:1"), None).await.unwrap();
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let hb = Heartbeat {
                step: Some(step_of(&d, x).await),
                attempt: Some(crate::Attempt(1)),
                agent: Some(a),
                verified: false,
            };
            d.heartbeat(hb).await.unwrap();
        }
        assert_eq!(sent(&link), vec![(x, a, 1)], "two seconds of heartbeats, no move");
        d.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_agent_cools_down_and_an_unreachable_one_is_dropped() {
        let link = Arc::new(FakeLink::default());
        let d = dispatcher(link.clone()).await;
        let a = d.register(enroll("http://a:1"), None).await.unwrap().id;
        link.busy.lock().unwrap().push(a);
        let x = d.submit(&build()).await.unwrap().id;
        settle().await;
        assert_eq!(sent(&link), vec![(x, a, 1)]);
        assert_eq!(
            d.store().build(x).await.unwrap().map(|b| b.status),
            Some(BuildStatus::Queued),
            "back in the queue"
        );
        assert_eq!(d.agents().await.unwrap().len(), 1, "a busy agent is kept");
        // Nothing for a lease; then it gets the build again.
        link.busy.lock().unwrap().clear();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(sent(&link).len(), 1);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(sent(&link), vec![(x, a, 1), (x, a, 2)]);
        // An agent that cannot be reached is dropped, and its build waits.
        let b = d.register(enroll("http://b:1"), None).await.unwrap().id;
        link.gone.lock().unwrap().push(b);
        let y = d.submit(&build()).await.unwrap().id;
        settle().await;
        assert_eq!(sent(&link).last(), Some(&(y, b, 1)));
        let agents: Vec<AgentId> = d.agents().await.unwrap().iter().map(|a| a.id).collect();
        assert_eq!(agents, vec![a]);
        d.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_answers_once_the_agent_stopped_the_work() {
        let link = Arc::new(FakeLink::default());
        let d = dispatcher(link.clone()).await;
        let a = d.register(enroll("http://a:1"), None).await.unwrap().id;
        let x = d.submit(&build()).await.unwrap().id;
        let y = d.submit(&build()).await.unwrap().id;
        settle().await;
        let started = tokio::time::Instant::now();
        let canceled = d.cancel(x).await.unwrap();
        assert_eq!(canceled.status, BuildStatus::Canceled);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(2),
            "after the stop was delivered"
        );
        assert_eq!(link.stopped.lock().unwrap().len(), 1);
        settle().await;
        assert_eq!(
            sent(&link),
            vec![(x, a, 1), (y, a, 1)],
            "the slot freed after the stop"
        );
        // The task served other commands while the stop was on its way.
        d.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_dispatcher_plans_only_when_asked() {
        let link = Arc::new(FakeLink::default());
        let c = Coordinator::builder(Arc::new(MemoryStore::new()))
            .build()
            .await
            .unwrap();
        let d = Dispatcher::spawn(c, link.clone());
        let a = d.register(enroll("http://a:1"), None).await.unwrap().id;
        let x = d.submit(&build()).await.unwrap().id;
        settle().await;
        assert!(sent(&link).is_empty());
        let planned = d.plan().await.unwrap();
        assert_eq!((planned[0].step.build, planned[0].agent), (x, a));
        assert!(sent(&link).is_empty(), "the caller delivers what it asked for");
        d.shutdown().await;
        assert!(matches!(d.submit(&build()).await, Err(Error::Unavailable(_))));
    }

    fn enroll(url: &str) -> Enrollment {
        Enrollment::new(url)
    }
}
