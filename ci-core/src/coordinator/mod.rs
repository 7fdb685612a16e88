//! The coordinator: the build lifecycle, with no I/O of its own.
//!
//! It decides what happens to builds and agents and records every change
//! through the [`Store`] and the [`AgentPool`] before it reports success.
//! It never sleeps, never sends anything and reads time only from its
//! [`Clock`]: callers feed it what happened (a build submitted, an agent
//! registered, a result, a failed dispatch, the passage of time) and carry
//! out the [`Dispatch`]es and [`StopOrder`]s it returns. One task owns it
//! (the [`Dispatcher`](crate::Dispatcher)); the most frequent traffic,
//! heartbeats and live output, goes through a [`Fence`] instead and never
//! waits for that task. The HTTP server, the embedded
//! [`LocalCluster`](crate::LocalCluster) and the deterministic simulation
//! all drive this same code.
//!
//! # Guarantees
//! - Every dispatch is a new, numbered attempt, started in the store with a
//!   lease. Heartbeats and results are fenced by attempt: a superseded
//!   attempt changes nothing.
//! - A build finishes once. A re-delivery of the accepted result is
//!   acknowledged as a duplicate; any other second result is a conflict.
//! - An agent never holds more builds than its capacity.
//! - A scheduling pass starts its attempts in one store step: if the store
//!   fails, none is started, so none is stranded.
//! - After a restart, [`CoordinatorBuilder::build`] gives running builds a
//!   fresh lease on their agents (or puts them back in the queue if their
//!   agent is unknown), so their agents have time to report in.

mod agents;
mod fence;
mod lifecycle;
mod messages;
mod plan;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;

pub use fence::{Fence, Sender};
pub use messages::{
    Accepted, Cancel, Dispatch, DispatchFailure, Event, HandBack, Heartbeat, LeaveReason, Registration,
    Report, StopOrder, Stopped,
};

use crate::clock::{Clock, Timestamp};
use crate::error::{Error, Result};
use crate::lease::LeasePolicy;
use crate::model::{AgentId, Completion, StepId, StepStatus};
use crate::pool::{Agent, AgentPool, StoreAgentPool};
use crate::scheduler::{Fifo, Scheduler};
use crate::store::{Lease, Requeue, Store};

/// How many times an attempt may be handed back for a failure of the
/// machinery before the build fails instead.
pub const MAX_HAND_BACKS: u32 = 3;

/// The build lifecycle. See the [module docs](self).
pub struct Coordinator {
    store: Arc<dyn Store>,
    pool: Arc<dyn AgentPool>,
    scheduler: Box<dyn Scheduler>,
    clock: Arc<dyn Clock>,
    policy: LeasePolicy,
    fence: Fence,
    /// When each queued step (re)entered the queue, for dispatch latency.
    queued_since: HashMap<StepId, Timestamp>,
    /// Hand-backs per step, against [`MAX_HAND_BACKS`].
    hand_backs: HashMap<StepId, u32>,
    /// Canceled attempts whose agents cannot stop work
    /// ([`Stopped::Unsupported`]): each holds its agent's slot until its
    /// result arrives or the deadline passes.
    unstoppable: HashMap<(StepId, crate::model::Attempt), (AgentId, Timestamp)>,
    /// When each running attempt with a time limit is past it (its
    /// agent's own limit, plus a lease of grace): see
    /// [`Coordinator::time_out`].
    limits: TimeLimits,
    events: Vec<Event>,
}

/// Running attempts' time limits, by deadline.
#[derive(Debug, Default)]
struct TimeLimits {
    by_time: std::collections::BTreeSet<(Timestamp, StepId)>,
    by_step: HashMap<StepId, (Timestamp, crate::model::Attempt)>,
}

impl TimeLimits {
    fn set(&mut self, step: StepId, attempt: crate::model::Attempt, at: Timestamp) {
        self.clear(step);
        self.by_time.insert((at, step));
        self.by_step.insert(step, (at, attempt));
    }

    fn clear(&mut self, step: StepId) {
        if let Some((at, _)) = self.by_step.remove(&step) {
            self.by_time.remove(&(at, step));
        }
    }

    fn next(&self) -> Option<Timestamp> {
        self.by_time.first().map(|(at, _)| *at)
    }

    /// Takes the attempts past their limits at `now`.
    fn due(&mut self, now: Timestamp) -> Vec<(StepId, crate::model::Attempt)> {
        let mut due = Vec::new();
        while let Some(&(at, step)) = self.by_time.first() {
            if at > now {
                break;
            }
            self.by_time.remove(&(at, step));
            if let Some((_, attempt)) = self.by_step.remove(&step) {
                due.push((step, attempt));
            }
        }
        due
    }
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Coordinator`].
pub struct CoordinatorBuilder {
    store: Arc<dyn Store>,
    pool: Option<Arc<dyn AgentPool>>,
    scheduler: Box<dyn Scheduler>,
    clock: Arc<dyn Clock>,
    policy: LeasePolicy,
}

impl std::fmt::Debug for CoordinatorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorBuilder")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl CoordinatorBuilder {
    /// Uses this agent pool instead of a [`StoreAgentPool`] on the store.
    pub fn pool(mut self, pool: Arc<dyn AgentPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Uses this policy instead of [`Fifo`].
    pub fn scheduler(mut self, scheduler: impl Scheduler + 'static) -> Self {
        self.scheduler = Box::new(scheduler);
        self
    }

    /// Uses this clock instead of the system clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Sets the heartbeat interval and how many may be missed.
    pub fn lease(mut self, policy: LeasePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Builds the coordinator, recovering agents and running builds from
    /// the store.
    pub async fn build(self) -> Result<Coordinator> {
        let now = self.clock.now();
        let pool: Arc<dyn AgentPool> = match self.pool {
            Some(p) => p,
            None => Arc::new(StoreAgentPool::load(self.store.clone(), now).await?),
        };
        let fence = Fence::new(self.store.clone(), pool.clone(), self.clock.clone(), self.policy);
        let mut c = Coordinator {
            store: self.store,
            pool,
            scheduler: self.scheduler,
            clock: self.clock,
            policy: self.policy,
            fence,
            queued_since: HashMap::new(),
            hand_backs: HashMap::new(),
            unstoppable: HashMap::new(),
            limits: TimeLimits::default(),
            events: Vec::new(),
        };
        c.recover(now).await?;
        Ok(c)
    }
}

// === impl Coordinator ===

impl Coordinator {
    /// Starts building a coordinator over `store`.
    pub fn builder(store: Arc<dyn Store>) -> CoordinatorBuilder {
        CoordinatorBuilder {
            store,
            pool: None,
            scheduler: Box::new(Fifo),
            clock: Arc::new(crate::clock::SystemClock::new()),
            policy: LeasePolicy::default(),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The agent pool.
    pub fn pool(&self) -> &Arc<dyn AgentPool> {
        &self.pool
    }

    /// The path of heartbeats and live output, which needs no coordinator.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// The lease policy.
    pub fn lease_policy(&self) -> LeasePolicy {
        self.policy
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Takes the events recorded since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Running builds get a fresh lease; those whose agent is unknown (or
    /// has no free slot for them) go back to the queue.
    async fn recover(&mut self, now: Timestamp) -> Result<()> {
        self.store.extend_leases(self.policy.deadline(now)).await?;
        for lease in self.store.leases().await? {
            let holder = self
                .pool
                .get(lease.agent)
                .await?
                .filter(|a| a.free_slots() > 0 || a.running.contains(&lease.step));
            match holder {
                Some(_) => {
                    self.pool.hold(lease.agent, lease.step).await?;
                    // N.B.: its agent gets a lease from now to report,
                    // as its lease does: a result that waited out our
                    // downtime in its spool is not beaten by our timer.
                    if let Some(step) = self.store.step(lease.step).await? {
                        self.limit(&step, self.policy.deadline(now));
                    }
                }
                None => self.requeue(&lease, Requeue::Lost, now).await?,
            }
        }
        Ok(())
    }

    /// The agent with this id, if it is in the pool.
    pub async fn agent(&self, id: AgentId) -> Result<Option<Agent>> {
        self.pool.get(id).await
    }

    /// Every agent in the pool.
    pub async fn agents(&self) -> Result<Vec<Agent>> {
        self.pool.agents().await
    }

    /// The agent whose session secret this is. See [`AgentPool::by_secret`].
    pub async fn agent_by_secret(&self, secret: &str) -> Result<Option<AgentId>> {
        self.pool.by_secret(secret).await
    }

    /// The lease on a step, if it is running.
    pub async fn lease(&self, step: StepId) -> Result<Option<Lease>> {
        Ok(self.store.leases().await?.into_iter().find(|l| l.step == step))
    }

    /// A heartbeat or an idle agent's ping: see [`Fence::heartbeat`].
    pub async fn heartbeat(&self, hb: Heartbeat) -> Result<()> {
        self.fence.heartbeat(hb).await
    }

    /// Puts a leased step back in the queue (or, its agent lost and its
    /// retries spent, fails it: [`Queue::requeue`](crate::store::Queue::requeue))
    /// and frees its agent's slot.
    async fn requeue(&mut self, lease: &Lease, why: Requeue, now: Timestamp) -> Result<()> {
        if let Some(moved) = self.store.requeue(lease.step, lease.attempt, why, now).await? {
            if moved.steps.contains(&(lease.step, StepStatus::Queued)) {
                self.queued_since.insert(lease.step, now);
                self.events.push(Event::Requeued {
                    step: lease.step,
                    attempt: lease.attempt,
                });
            }
            self.advanced(&moved);
        }
        self.pool.release(lease.agent, lease.step, now).await
    }

    /// Records when `step`'s running attempt is past its time limit: its
    /// start, its limit, and a lease of grace for its agent's own report.
    /// Not before `not_before`.
    pub(super) fn limit(&mut self, step: &crate::model::Step, not_before: Timestamp) {
        if let (Some(limit), Some(started)) = (step.timeout_ms, step.started_at) {
            let at = started
                .plus(std::time::Duration::from_millis(limit))
                .plus(self.policy.ttl());
            self.limits.set(step.id, step.attempt, at.max(not_before));
        }
    }

    /// Fails the running attempts past their steps' time limits (their
    /// agents did not stop them: an agent of the original design ignores
    /// `timeoutMs`) as timed out, exit code
    /// [`TIMED_OUT`](crate::runner::TIMED_OUT), with what they streamed
    /// and a line saying why. Returns the stop orders to send their agents;
    /// each keeps its agent's slot until it is delivered
    /// ([`Coordinator::stop_delivered`]). An attempt the store failed on is
    /// tried again a second later.
    pub async fn time_out(&mut self) -> Vec<StopOrder> {
        let now = self.clock.now();
        let mut stops = Vec::new();
        for (id, attempt) in self.limits.due(now) {
            match self.time_out_one(id, attempt).await {
                Ok(order) => stops.extend(order),
                Err(e) => {
                    tracing::warn!(step = %id, %attempt, cause = %e, "could not end a step past its time limit; trying again");
                    self.limits
                        .set(id, attempt, now.plus(std::time::Duration::from_secs(1)));
                }
            }
        }
        stops
    }

    async fn time_out_one(
        &mut self,
        id: StepId,
        attempt: crate::model::Attempt,
    ) -> Result<Option<StopOrder>> {
        let Some(step) = self.store.step(id).await? else {
            return Ok(None);
        };
        let holder = step
            .agent_id
            .filter(|_| step.status == StepStatus::Running && step.attempt == attempt);
        let Some(agent) = holder else {
            return Ok(None);
        };
        let mut log = self.store.log(id, Some(attempt)).await?.unwrap_or_default();
        let limit = std::time::Duration::from_millis(step.timeout_ms.unwrap_or_default());
        log.stderr.push_str(&format!(
            "ci: the step ran past its time limit of {}; the server ended it, as its agent did not\n",
            humantime::format_duration(limit)
        ));
        let report = Report {
            step: id,
            attempt: Some(attempt),
            agent: Some(agent),
            verified: true,
            completion: Completion {
                exit_code: crate::runner::TIMED_OUT,
                stdout: log.stdout,
                stderr: log.stderr,
            },
        };
        self.complete(report).await?;
        // N.B.: the agent still runs it until told to stop; the result is
        // taken, so the order goes out even if the pool cannot say so.
        if let Err(e) = self.pool.hold(agent, id).await {
            tracing::warn!(step = %id, %agent, cause = %e, "could not hold a timed-out step's slot");
        }
        Ok(Some(StopOrder {
            agent,
            agent_url: step.agent_url.clone().unwrap_or_default(),
            step: id,
            attempt,
        }))
    }

    /// Expires lapsed leases and silent agents: such an agent is dropped and
    /// its builds go back to the queue. Returns how many agents were
    /// dropped.
    pub async fn expire(&mut self) -> Result<usize> {
        let now = self.clock.now();
        let mut dead: Vec<(AgentId, LeaveReason)> = Vec::new();
        for lease in self.store.lapsed(now, 1024).await? {
            if self.pool.get(lease.agent).await?.is_some() {
                dead.push((lease.agent, LeaveReason::MissedHeartbeats));
            } else {
                // Its agent is already gone: only the step is left to move.
                self.requeue(&lease, Requeue::Lost, now).await?;
            }
        }
        for agent in self.pool.silent(now, self.policy.ttl()).await? {
            dead.push((agent, LeaveReason::Silent));
        }
        // Canceled attempts that could not be stopped hold their agents'
        // slots for one lease at most.
        let lapsed: Vec<(StepId, AgentId, crate::model::Attempt)> = self
            .unstoppable
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|((step, attempt), (agent, _))| (*step, *agent, *attempt))
            .collect();
        for (step, agent, attempt) in lapsed {
            self.release_attempt(agent, step, attempt).await?;
            self.unstoppable.remove(&(step, attempt));
        }
        dead.sort_by_key(|(a, _)| *a);
        dead.dedup_by_key(|(a, _)| *a);
        for (agent, reason) in &dead {
            self.drop_agent(*agent, *reason).await?;
        }
        Ok(dead.len())
    }

    /// The earliest time at which [`Coordinator::expire`] may have work, or
    /// an agent's cooldown ends.
    pub async fn next_deadline(&self) -> Result<Option<Timestamp>> {
        let leases = self.store.next_deadline().await?;
        let agents = self.pool.next_deadline(self.policy.ttl()).await?;
        let unstoppable = self.unstoppable.values().map(|(_, until)| *until).min();
        let limits = self.limits.next();
        Ok(leases
            .into_iter()
            .chain(agents)
            .chain(unstoppable)
            .chain(limits)
            .min())
    }

    /// Refuses a request about `holder`'s work unless it came, proven, from
    /// `holder` itself (when `holder` authenticates at all).
    async fn check_sender(&self, holder: AgentId, sender: Option<AgentId>, verified: bool) -> Result<()> {
        let authenticates = self.pool.get(holder).await?.is_some_and(|a| a.secret.is_some());
        if authenticates && !(verified && sender == Some(holder)) {
            return Err(Error::Unauthenticated(format!(
                "agent {holder} proves its identity with a session secret; this request did not"
            )));
        }
        Ok(())
    }
}
