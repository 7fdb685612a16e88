//! The coordinator: the build lifecycle as a state machine without I/O.
//!
//! It owns the agent pool, the leases and the scheduling policy, and writes
//! every state change through the [`BuildStore`] before it reports success.
//! It never sleeps, never sends anything and reads time only from its
//! [`Clock`]: callers feed it events (a build submitted, an agent registered,
//! a heartbeat, a result, a failed dispatch, the passage of time) and carry
//! out the [`Dispatch`]es it returns. The HTTP server, the embedded
//! [`LocalCluster`](crate::local::LocalCluster) and the deterministic
//! simulation all drive this same code.
//!
//! # Guarantees
//! - Every dispatch is a new, numbered attempt. Heartbeats and results are
//!   fenced by attempt: a superseded attempt changes nothing.
//! - A build finishes once. A re-delivery of the accepted result is
//!   acknowledged as a duplicate; any other second result is a conflict.
//! - An agent never holds more builds than its capacity.
//! - After a restart, [`CoordinatorBuilder::build`] rebuilds the pool and the
//!   leases from the store; running builds get a fresh lease so their agents
//!   have time to report in.

use std::collections::HashMap;
use std::sync::Arc;

use crate::clock::{Clock, Timestamp};
use crate::error::{Error, Result};
use crate::lease::{Lease, LeasePolicy};
use crate::model::{
    limits, truncate_log, AgentId, AgentRecord, Attempt, Build, BuildId, BuildStatus, Completion, NewBuild,
};
use crate::pool::{Agent, AgentPool, MemoryAgentPool};
use crate::protocol::BuildRequest;
use crate::scheduler::{Fifo, Scheduler};
use crate::store::BuildStore;

/// A build handed to an agent: the caller must send it, and report back
/// with [`Coordinator::dispatch_failed`] if it could not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    /// The agent to send it to.
    pub agent: AgentId,
    /// That agent's base URL.
    pub agent_url: String,
    /// The build, with its new attempt number.
    pub build: Build,
}

impl Dispatch {
    /// The `POST /build` body for the agent.
    pub fn request(&self) -> BuildRequest {
        BuildRequest {
            id: self.build.id,
            command: self.build.command.clone(),
            hash: self.build.hash.clone(),
            repo: self.build.repo.clone(),
            attempt: Some(self.build.attempt),
            image: self.build.image.clone(),
            timeout_ms: self.build.timeout_ms,
            agent_id: Some(self.agent),
        }
    }
}

/// Why a dispatch failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DispatchFailure {
    /// The agent could not be reached or answered with a server error: it
    /// is dropped and its builds go back to the queue.
    Unreachable(String),
    /// The agent refused this build as invalid (a 4xx other than
    /// busy/unauthorized): the build fails with the agent's reason rather
    /// than bouncing between agents forever.
    Rejected(String),
    /// The agent is alive but busy with work the coordinator does not know
    /// about (a superseded attempt it was never told of, say): the build
    /// goes back to the queue and the agent gets nothing for one lease.
    Busy(String),
}

/// A heartbeat, or an idle agent's ping.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Heartbeat {
    /// The build being worked on; `None` for an idle agent's ping.
    pub build: Option<BuildId>,
    /// The attempt being worked on, if the agent says.
    pub attempt: Option<Attempt>,
    /// The sending agent, if it says (or proved it).
    pub agent: Option<AgentId>,
    /// True if `agent` was proven with the agent's session secret rather
    /// than merely claimed.
    pub verified: bool,
}

/// A result reported by an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The build.
    pub build: BuildId,
    /// The attempt that produced it. Agents that do not say are taken to
    /// speak for the latest attempt (the original protocol has no attempts).
    pub attempt: Option<Attempt>,
    /// The reporting agent, if it says (or proved it).
    pub agent: Option<AgentId>,
    /// True if `agent` was proven with the agent's session secret.
    pub verified: bool,
    /// What happened.
    pub completion: Completion,
}

/// How a result was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// The result finished the build.
    Finished(Build),
    /// The same result was already recorded; nothing changed.
    Duplicate(Build),
}

/// Why an agent left the pool.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LeaveReason {
    /// A dispatch to it failed.
    Unreachable,
    /// Its lease ran out: it missed too many heartbeats mid-build.
    MissedHeartbeats,
    /// It pinged while idle, then fell silent.
    Silent,
    /// A new process registered at the same URL.
    Replaced,
    /// It said it was going (graceful shutdown).
    Left,
}

/// Something that happened, for observers (logs, metrics, live views).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A build was created.
    Created(BuildId),
    /// A build's attempt was dispatched.
    Started {
        /// The build.
        build: BuildId,
        /// Its new attempt.
        attempt: Attempt,
        /// The agent.
        agent: AgentId,
        /// Time from creation (or requeue) to dispatch.
        waited_ms: u64,
    },
    /// A running build went back to the queue.
    Requeued {
        /// The build.
        build: BuildId,
        /// The attempt that lost its lease.
        attempt: Attempt,
    },
    /// A build finished.
    Finished {
        /// The build.
        build: BuildId,
        /// Its final status.
        status: BuildStatus,
        /// Run time of the accepted attempt.
        duration_ms: Option<u64>,
    },
    /// An agent joined.
    AgentJoined(AgentId),
    /// A running attempt sent output.
    Output(BuildId),
    /// An agent left.
    AgentLeft {
        /// The agent.
        agent: AgentId,
        /// Why.
        reason: LeaveReason,
    },
}

/// What cancelling a build did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cancel {
    /// The build was queued: it is canceled, nothing else to do.
    Done(Build),
    /// The build was running: it is canceled, and the caller must tell the
    /// agent to stop it, then call [`Coordinator::stop_delivered`]. Until
    /// then the agent's slot stays taken, so no new build lands on an agent
    /// still busy killing the old one.
    Stop(StopOrder),
}

/// An order to stop an attempt on an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopOrder {
    /// The agent.
    pub agent: AgentId,
    /// Its URL.
    pub agent_url: String,
    /// The build.
    pub build: BuildId,
    /// The attempt to stop.
    pub attempt: Attempt,
}

/// The reply to a registration.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The agent's new id.
    pub id: AgentId,
    /// How often it must send heartbeats, in milliseconds.
    pub heartbeat_ms: u64,
}

/// The build lifecycle state machine. See the [module docs](self).
pub struct Coordinator {
    store: Arc<dyn BuildStore>,
    pool: Box<dyn AgentPool>,
    scheduler: Box<dyn Scheduler>,
    clock: Arc<dyn Clock>,
    policy: LeasePolicy,
    leases: HashMap<BuildId, Lease>,
    /// When each queued build (re)entered the queue, for dispatch latency.
    queued_since: HashMap<BuildId, Timestamp>,
    /// Session secrets of agents dropped from the pool (newest ids kept):
    /// such an agent may still prove itself to finish a build whose last
    /// attempt it held, if that build went back to the queue.
    retired: std::collections::BTreeMap<AgentId, String>,
    events: Vec<Event>,
}

/// How many dropped agents' secrets are kept, for their late results.
const RETIRED: usize = 4096;

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("policy", &self.policy)
            .field("agents", &self.pool.len())
            .field("leases", &self.leases.len())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Coordinator`].
pub struct CoordinatorBuilder {
    store: Arc<dyn BuildStore>,
    pool: Box<dyn AgentPool>,
    scheduler: Box<dyn Scheduler>,
    clock: Arc<dyn Clock>,
    policy: LeasePolicy,
}

impl CoordinatorBuilder {
    /// Uses this agent pool instead of [`MemoryAgentPool`].
    pub fn pool(mut self, pool: impl AgentPool + 'static) -> Self {
        self.pool = Box::new(pool);
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
    pub fn build(self) -> Result<Coordinator> {
        let mut c = Coordinator {
            store: self.store,
            pool: self.pool,
            scheduler: self.scheduler,
            clock: self.clock,
            policy: self.policy,
            leases: HashMap::new(),
            queued_since: HashMap::new(),
            retired: std::collections::BTreeMap::new(),
            events: Vec::new(),
        };
        c.recover()?;
        Ok(c)
    }
}

// === impl Coordinator ===

impl Coordinator {
    /// Starts building a coordinator over `store`.
    pub fn builder(store: Arc<dyn BuildStore>) -> CoordinatorBuilder {
        CoordinatorBuilder {
            store,
            pool: Box::new(MemoryAgentPool::new()),
            scheduler: Box::new(Fifo),
            clock: Arc::new(crate::clock::SystemClock::new()),
            policy: LeasePolicy::default(),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn BuildStore> {
        &self.store
    }

    /// The lease policy.
    pub fn lease_policy(&self) -> LeasePolicy {
        self.policy
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Rebuilds the in-memory state from the store: every stored agent joins
    /// the pool, and every running build gets a fresh lease on its agent (or
    /// goes back to the queue if its agent is unknown).
    fn recover(&mut self) -> Result<()> {
        let now = self.clock.now();
        for rec in self.store.agents()? {
            let mut agent = Agent::new(rec.id, rec.url, now);
            agent.secret = rec.secret;
            self.pool.insert(agent);
        }
        for b in self.store.running_builds()? {
            let holder = b
                .agent_id
                .filter(|a| self.pool.get(*a).is_some_and(|ag| ag.free_slots() > 0));
            match holder {
                Some(agent_id) => {
                    if let Some(agent) = self.pool.get_mut(agent_id) {
                        agent.running.push(b.id);
                    }
                    self.leases.insert(
                        b.id,
                        Lease {
                            build: b.id,
                            attempt: b.attempt,
                            agent: agent_id,
                            expires_at: self.policy.deadline(now),
                        },
                    );
                }
                None => {
                    if self.store.requeue(b.id, b.attempt)? {
                        self.queued_since.insert(b.id, now);
                        self.events.push(Event::Requeued {
                            build: b.id,
                            attempt: b.attempt,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn pool_agent_mut(&mut self, id: Option<AgentId>) -> Option<&mut Agent> {
        id.and_then(|id| self.pool.get_mut(id))
    }

    /// Takes the events recorded since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// The agent with this id, if it is in the pool.
    pub fn agent(&self, id: AgentId) -> Option<&Agent> {
        self.pool.get(id)
    }

    /// Every agent in the pool.
    pub fn agents(&self) -> Vec<Agent> {
        self.pool.iter().cloned().collect()
    }

    /// The lease on a build, if it is running.
    pub fn lease(&self, build: BuildId) -> Option<Lease> {
        self.leases.get(&build).copied()
    }

    /// Every lease.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Queues a new build. Call [`Coordinator::plan`] afterwards.
    pub fn submit(&mut self, new: &NewBuild) -> Result<Build> {
        new.validate()?;
        let now = self.clock.now();
        let build = self.store.create_build(new, now)?;
        self.queued_since.insert(build.id, now);
        self.events.push(Event::Created(build.id));
        Ok(build)
    }

    /// Registers an agent reachable at `url`.
    ///
    /// N.B.: an agent registering at a URL that is already registered is a
    /// new process (the old one restarted). Whatever the old one held is
    /// lost with it, so those builds go back to the queue now rather than
    /// waiting for their leases to run out.
    pub fn register_agent(&mut self, url: &str) -> Result<Registration> {
        self.register(url, None, None)
    }

    /// Registers an agent that will prove its identity with `secret` on
    /// every later request (see [`crate::auth`]). `proof` is the secret of
    /// the session it replaces, if it has one (a restarted agent keeps it).
    ///
    /// N.B.: a URL whose agent holds a session can be taken over only with
    /// that session's secret, or once the session has lapsed (nothing heard
    /// for a lease): otherwise anyone could kill its running build by
    /// registering its URL. [`Error::Conflict`] until then.
    pub fn register_agent_with_secret(
        &mut self,
        url: &str,
        secret: String,
        proof: Option<&str>,
    ) -> Result<Registration> {
        self.register(url, Some(secret), proof)
    }

    fn register(&mut self, url: &str, secret: Option<String>, proof: Option<&str>) -> Result<Registration> {
        let now = self.clock.now();
        if let Some(old) = self.pool.find_by_url(url).and_then(|id| self.pool.get(id)) {
            if let Some(held) = &old.secret {
                let proven = proof.is_some_and(|p| crate::auth::ct_eq(p.as_bytes(), held.as_bytes()));
                let lapses = old.last_seen.plus(self.policy.ttl());
                if !proven && now < lapses {
                    return Err(Error::Conflict(format!(
                        "agent {} at {url} holds a live session: present its secret to replace it, \
                         or register again after {} ms",
                        old.id,
                        lapses.since(now).as_millis()
                    )));
                }
            }
            let old = old.id;
            self.drop_agent(old, LeaveReason::Replaced)?;
        }
        let rec = self.store.register_agent(url, secret.as_deref(), now)?;
        let mut agent = Agent::new(rec.id, rec.url, now);
        agent.secret = rec.secret;
        self.pool.insert(agent);
        self.events.push(Event::AgentJoined(rec.id));
        Ok(Registration {
            id: rec.id,
            heartbeat_ms: u64::try_from(self.policy.interval().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Drops an agent: its builds go back to the queue, and it is forgotten.
    fn drop_agent(&mut self, id: AgentId, reason: LeaveReason) -> Result<()> {
        let Some(agent) = self.pool.get(id) else {
            return Ok(());
        };
        let held: Vec<Lease> = agent
            .running
            .iter()
            .filter_map(|b| self.leases.get(b).copied())
            .collect();
        // N.B.: store first, memory second. If the store fails half way, the
        // pool still holds the agent and the next pass retries; requeue is
        // fenced, so repeating it is harmless.
        for lease in &held {
            self.requeue(lease)?;
        }
        self.store.remove_agent(id)?;
        if let Some(secret) = self.pool.remove(id).and_then(|a| a.secret) {
            if self.retired.len() >= RETIRED {
                self.retired.pop_first();
            }
            self.retired.insert(id, secret);
        }
        self.events.push(Event::AgentLeft { agent: id, reason });
        Ok(())
    }

    /// The agent whose session secret this is: one in the pool, or one
    /// dropped from it lately (which can then only finish a build whose
    /// last attempt it held).
    pub fn agent_by_secret(&self, secret: &str) -> Option<AgentId> {
        // N.B.: compare every agent's secret, in constant time each, so the
        // answer's timing says nothing about how close a guess was.
        let mut found = None;
        let live = self
            .pool
            .iter()
            .filter_map(|a| Some((a.id, a.secret.as_deref()?)));
        let retired = self.retired.iter().map(|(id, s)| (*id, s.as_str()));
        for (id, s) in live.chain(retired) {
            if crate::auth::ct_eq(s.as_bytes(), secret.as_bytes()) {
                found = Some(id);
            }
        }
        found
    }

    /// Refuses a request about `holder`'s work unless it came, proven, from
    /// `holder` itself (when `holder` authenticates at all).
    fn check_sender(&self, holder: AgentId, sender: Option<AgentId>, verified: bool) -> Result<()> {
        let authenticates = self.pool.get(holder).is_some_and(|a| a.secret.is_some());
        if authenticates && !(verified && sender == Some(holder)) {
            return Err(Error::Unauthenticated(format!(
                "agent {holder} proves its identity with a session secret; this request did not"
            )));
        }
        Ok(())
    }

    /// Puts a leased build back in the queue and drops the lease.
    fn requeue(&mut self, lease: &Lease) -> Result<()> {
        let now = self.clock.now();
        if self.store.requeue(lease.build, lease.attempt)? {
            self.queued_since.insert(lease.build, now);
            self.events.push(Event::Requeued {
                build: lease.build,
                attempt: lease.attempt,
            });
        }
        self.release(lease.build);
        Ok(())
    }

    /// Drops the lease on `build` and frees its agent's slot.
    fn release(&mut self, build: BuildId) {
        let Some(lease) = self.leases.remove(&build) else {
            return;
        };
        let now = self.clock.now();
        if let Some(agent) = self.pool.get_mut(lease.agent) {
            agent.running.retain(|b| *b != build);
            if agent.running.is_empty() {
                agent.idle_since = now;
            }
        }
    }

    /// Takes a heartbeat (with a build) or an idle agent's ping (without).
    ///
    /// Errors: [`Error::AgentNotFound`] for a ping from an agent the pool
    /// does not know (it should register again), [`Error::BuildNotFound`],
    /// [`Error::NotRunning`] for a build that is not running,
    /// [`Error::Superseded`] for an old attempt, and [`Error::Conflict`] when
    /// the sender is not the agent holding the lease.
    pub fn heartbeat(&mut self, hb: Heartbeat) -> Result<()> {
        let now = self.clock.now();
        let Some(build) = hb.build else {
            let agent_id = hb
                .agent
                .ok_or_else(|| Error::invalid("heartbeat", "needs a build `id` or an `agentId`"))?;
            if self.pool.get(agent_id).is_none() {
                return Err(Error::AgentNotFound(agent_id));
            }
            self.check_sender(agent_id, hb.agent, hb.verified)?;
            let agent = self
                .pool
                .get_mut(agent_id)
                .ok_or(Error::AgentNotFound(agent_id))?;
            agent.last_seen = now;
            agent.pings = true;
            return Ok(());
        };
        if let Some(holder) = self.leases.get(&build).map(|l| l.agent) {
            self.check_sender(holder, hb.agent, hb.verified)?;
        }
        let Some(lease) = self.leases.get_mut(&build) else {
            let b = self.store.build(build)?.ok_or(Error::BuildNotFound(build))?;
            if let Some(attempt) = hb.attempt.filter(|a| *a < b.attempt) {
                return Err(Error::Superseded {
                    id: build,
                    attempt,
                    current: b.attempt,
                });
            }
            return Err(Error::NotRunning {
                id: build,
                status: b.status,
            });
        };
        if let Some(attempt) = hb.attempt {
            if attempt < lease.attempt {
                return Err(Error::Superseded {
                    id: build,
                    attempt,
                    current: lease.attempt,
                });
            }
            if attempt > lease.attempt {
                return Err(Error::Conflict(format!(
                    "build {build} has no attempt {attempt} (latest is {})",
                    lease.attempt
                )));
            }
        }
        if let Some(agent) = hb.agent.filter(|a| *a != lease.agent) {
            return Err(Error::Conflict(format!(
                "build {build} attempt {} is held by agent {}, not agent {agent}",
                lease.attempt, lease.agent
            )));
        }
        lease.expires_at = self.policy.deadline(now);
        let holder = lease.agent;
        if let Some(agent) = self.pool.get_mut(holder) {
            agent.last_seen = now;
            agent.pings |= hb.agent.is_some();
        }
        Ok(())
    }

    /// Takes live output of a running attempt: the same checks as a
    /// heartbeat (which it also counts as), then the pieces are stored.
    /// Returns how many were new.
    pub fn output(&mut self, hb: Heartbeat, pieces: &[crate::model::LogPiece]) -> Result<usize> {
        let build = hb
            .build
            .ok_or_else(|| Error::invalid("output", "needs a build `id`"))?;
        self.heartbeat(hb)?;
        let attempt = self.leases.get(&build).map(|l| l.attempt).unwrap_or_default();
        let stored = self.store.append_log(build, attempt, pieces)?;
        if stored > 0 {
            self.events.push(Event::Output(build));
        }
        Ok(stored)
    }

    /// Takes a build's result. See the [module docs](self) for the rules.
    pub fn complete(&mut self, report: Report) -> Result<Accepted> {
        let id = report.build;
        let build = self.store.build(id)?.ok_or(Error::BuildNotFound(id))?;
        let attempt = report.attempt.unwrap_or(build.attempt);
        if attempt.0 == 0 || attempt > build.attempt {
            return Err(Error::Conflict(format!(
                "build {id} has no attempt {attempt} (latest is {})",
                build.attempt
            )));
        }
        let mut completion = report.completion;
        truncate_log(&mut completion.stdout, limits::MAX_LOG);
        truncate_log(&mut completion.stderr, limits::MAX_LOG);

        if build.status.is_finished() {
            if attempt == build.attempt && build.exit_code == Some(completion.exit_code) {
                let log = self.store.log(id, Some(attempt))?.unwrap_or_default();
                if log.stdout == completion.stdout && log.stderr == completion.stderr {
                    return Ok(Accepted::Duplicate(build));
                }
            }
            if attempt < build.attempt {
                return Err(Error::Superseded {
                    id,
                    attempt,
                    current: build.attempt,
                });
            }
            return Err(Error::Conflict(format!(
                "build {id} already finished as {} with a different result",
                build.status
            )));
        }
        if attempt < build.attempt {
            return Err(Error::Superseded {
                id,
                attempt,
                current: build.attempt,
            });
        }
        match self.leases.get(&id) {
            Some(lease) => self.check_sender(lease.agent, report.agent, report.verified)?,
            // N.B.: no lease: the build went back to the queue. Its last
            // attempt's result still counts (the work is not wasted), but
            // only from that attempt's agent, proven: anyone else's would be
            // a forgery.
            None if !(report.verified && report.agent.is_some() && report.agent == build.agent_id) => {
                return Err(Error::Conflict(format!(
                    "build {id} attempt {attempt} lost its lease; only its agent, proven by its \
                     session secret, may still report it"
                )));
            }
            None => {}
        }
        if let (Some(agent), Some(lease)) = (report.agent, self.leases.get(&id)) {
            if agent != lease.agent {
                return Err(Error::Conflict(format!(
                    "build {id} attempt {attempt} is held by agent {}, not agent {agent}",
                    lease.agent
                )));
            }
        }
        let now = self.clock.now();
        if !self.store.finish(id, attempt, &completion, now)? {
            return Err(Error::Conflict(format!("build {id} changed while finishing")));
        }
        self.release(id);
        self.queued_since.remove(&id);
        if let Some(agent) = self.pool_agent_mut(report.agent) {
            agent.last_seen = now;
        }
        let finished = self.store.build(id)?.ok_or(Error::BuildNotFound(id))?;
        self.events.push(Event::Finished {
            build: id,
            status: finished.status,
            duration_ms: finished.duration_ms(),
        });
        Ok(Accepted::Finished(finished))
    }

    /// Cancels a queued or running build. A finished build is a conflict.
    pub fn cancel(&mut self, id: BuildId) -> Result<Cancel> {
        let build = self.store.build(id)?.ok_or(Error::BuildNotFound(id))?;
        if build.status.is_finished() {
            return Err(Error::Conflict(format!(
                "build {id} already finished as {}",
                build.status
            )));
        }
        let now = self.clock.now();
        if !self.store.cancel(id, build.attempt, now)? {
            return Err(Error::Conflict(format!("build {id} changed while canceling")));
        }
        self.queued_since.remove(&id);
        let canceled = self.store.build(id)?.ok_or(Error::BuildNotFound(id))?;
        self.events.push(Event::Finished {
            build: id,
            status: BuildStatus::Canceled,
            duration_ms: canceled.duration_ms(),
        });
        // N.B.: the lease goes, the agent's slot stays until the stop order
        // is delivered (stop_delivered).
        let Some(lease) = self.leases.remove(&id) else {
            return Ok(Cancel::Done(canceled));
        };
        let Some(agent) = self.pool.get(lease.agent) else {
            return Ok(Cancel::Done(canceled));
        };
        Ok(Cancel::Stop(StopOrder {
            agent: lease.agent,
            agent_url: agent.url.clone(),
            build: id,
            attempt: lease.attempt,
        }))
    }

    /// Records that a stop order was delivered (`reached`) or not; either
    /// way the agent's slot is freed, and an agent that could not be reached
    /// is dropped.
    pub fn stop_delivered(&mut self, order: &StopOrder, reached: bool) -> Result<()> {
        if !reached {
            return self.drop_agent(order.agent, LeaveReason::Unreachable);
        }
        let now = self.clock.now();
        if let Some(agent) = self.pool.get_mut(order.agent) {
            agent.running.retain(|b| *b != order.build);
            if agent.running.is_empty() {
                agent.idle_since = now;
            }
        }
        // A slot came free: worth a scheduling pass.
        self.events.push(Event::AgentJoined(order.agent));
        Ok(())
    }

    /// An agent leaves on purpose (graceful shutdown): whatever it holds
    /// goes back to the queue now, and it is forgotten.
    pub fn agent_left(&mut self, id: AgentId, verified: bool) -> Result<()> {
        if self.pool.get(id).is_none() {
            return Err(Error::AgentNotFound(id));
        }
        self.check_sender(id, Some(id), verified)?;
        self.drop_agent(id, LeaveReason::Left)
    }

    /// One scheduling pass: matches queued builds with free agents, starts
    /// an attempt for each match and returns what to send where.
    pub fn plan(&mut self) -> Result<Vec<Dispatch>> {
        let now = self.clock.now();
        let ready = |a: &&Agent| a.cooldown_until.is_none_or(|t| now >= t);
        let slots: usize = self
            .pool
            .free()
            .into_iter()
            .filter(ready)
            .map(|a| a.free_slots() as usize)
            .sum();
        if slots == 0 {
            return Ok(Vec::new());
        }
        let queued = self.store.queued_builds(slots)?;
        if queued.is_empty() {
            return Ok(Vec::new());
        }
        // Only as many agents as there are builds to place (longest idle
        // first): a pass with 100 idle agents and one build clones one.
        let mut need = queued.len();
        let free: Vec<Agent> = self
            .pool
            .free()
            .into_iter()
            .filter(ready)
            .take_while(|a| {
                let take = need > 0;
                need = need.saturating_sub(a.free_slots() as usize);
                take
            })
            .cloned()
            .collect();
        let assignments = self.scheduler.assign(&queued, &free);
        let mut dispatches = Vec::with_capacity(assignments.len());
        for a in assignments {
            // N.B.: the policy only proposes. Skip anything that would give a
            // build to two agents or an agent more than its capacity.
            if self.leases.contains_key(&a.build) || !queued.iter().any(|b| b.id == a.build) {
                continue;
            }
            let Some(agent) = self
                .pool
                .get(a.agent)
                .filter(|ag| ag.free_slots() > 0 && ag.cooldown_until.is_none_or(|t| now >= t))
            else {
                continue;
            };
            let rec = AgentRecord {
                id: agent.id,
                url: agent.url.clone(),
                registered_at: now,
                secret: None,
            };
            let Some(build) = self.store.start_attempt(a.build, &rec, now)? else {
                continue;
            };
            if let Some(agent) = self.pool.get_mut(a.agent) {
                agent.running.push(build.id);
            }
            self.leases.insert(
                build.id,
                Lease {
                    build: build.id,
                    attempt: build.attempt,
                    agent: a.agent,
                    expires_at: self.policy.deadline(now),
                },
            );
            let since = self.queued_since.remove(&build.id).unwrap_or(build.created_at);
            self.events.push(Event::Started {
                build: build.id,
                attempt: build.attempt,
                agent: a.agent,
                waited_ms: u64::try_from(now.since(since).as_millis()).unwrap_or(u64::MAX),
            });
            dispatches.push(Dispatch {
                agent: a.agent,
                agent_url: rec.url,
                build,
            });
        }
        Ok(dispatches)
    }

    /// Records that a dispatch could not be delivered.
    pub fn dispatch_failed(&mut self, dispatch: &Dispatch, failure: DispatchFailure) -> Result<()> {
        let build = dispatch.build.id;
        let current = self
            .leases
            .get(&build)
            .filter(|l| l.attempt == dispatch.build.attempt && l.agent == dispatch.agent)
            .copied();
        match failure {
            DispatchFailure::Unreachable(_) => self.drop_agent(dispatch.agent, LeaveReason::Unreachable),
            DispatchFailure::Busy(_) => {
                if let Some(lease) = current {
                    self.requeue(&lease)?;
                }
                let until = self.policy.deadline(self.clock.now());
                if let Some(agent) = self.pool.get_mut(dispatch.agent) {
                    agent.cooldown_until = Some(until);
                }
                Ok(())
            }
            DispatchFailure::Rejected(reason) => {
                let Some(lease) = current else {
                    return Ok(());
                };
                let report = Report {
                    build,
                    attempt: Some(lease.attempt),
                    agent: Some(lease.agent),
                    verified: true,
                    completion: Completion::not_run(format!("agent refused the build: {reason}")),
                };
                self.complete(report).map(|_| ())
            }
        }
    }

    /// Expires lapsed leases and silent agents. Their builds go back to the
    /// queue. Returns how many agents were dropped.
    pub fn expire(&mut self) -> Result<usize> {
        let now = self.clock.now();
        let ttl = self.policy.ttl();
        let mut dead: Vec<(AgentId, LeaveReason)> = self
            .leases
            .values()
            .filter(|l| l.is_expired(now))
            .map(|l| (l.agent, LeaveReason::MissedHeartbeats))
            .collect();
        dead.extend(
            self.pool
                .iter()
                .filter(|a| a.pings && a.is_idle() && now >= a.last_seen.plus(ttl))
                .map(|a| (a.id, LeaveReason::Silent)),
        );
        dead.sort_by_key(|(a, _)| *a);
        dead.dedup_by_key(|(a, _)| *a);
        for (agent, reason) in &dead {
            self.drop_agent(*agent, *reason)?;
        }
        Ok(dead.len())
    }

    /// The earliest time at which [`Coordinator::expire`] may have work.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        let ttl = self.policy.ttl();
        let leases = self.leases.values().map(|l| l.expires_at);
        let silent = self
            .pool
            .iter()
            .filter(|a| a.pings && a.is_idle())
            .map(|a| a.last_seen.plus(ttl));
        let cooled = self.pool.iter().filter_map(|a| a.cooldown_until);
        leases.chain(silent).chain(cooled).min()
    }
}

#[cfg(test)]
mod tests;
