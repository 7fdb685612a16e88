//! The fence: heartbeats, idle pings and live output, checked against the
//! store's leases and the pool's agents without going through the
//! coordinator. They are the most frequent traffic, and none of them
//! changes what the coordinator decides: a heartbeat only moves a lease's
//! deadline later.

use std::sync::Arc;

use tokio::sync::Notify;

use super::{Event, Heartbeat};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::lease::LeasePolicy;
use crate::model::{AgentId, LogPiece, StepStatus};
use crate::pool::AgentPool;
use crate::store::Store;

/// Heartbeats, pings and live output, checked against the store's leases
/// and the pool's agents without the coordinator: they are the most
/// frequent traffic, and a heartbeat only moves a deadline later. Cheap to
/// clone.
#[derive(Clone)]
pub struct Fence {
    store: Arc<dyn Store>,
    pool: Arc<dyn AgentPool>,
    clock: Arc<dyn Clock>,
    policy: LeasePolicy,
    /// Told when something the coordinator's timer should know happened:
    /// an idle agent's first ping gives it a silence deadline.
    wake: Arc<Notify>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// Who sent an agent's request: proven by its session secret, or merely
/// claimed by an `agentId` in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sender {
    /// The agent, if known.
    pub agent: Option<AgentId>,
    /// True if proven.
    pub verified: bool,
}

impl Fence {
    pub(super) fn new(
        store: Arc<dyn Store>,
        pool: Arc<dyn AgentPool>,
        clock: Arc<dyn Clock>,
        policy: LeasePolicy,
    ) -> Fence {
        Fence {
            store,
            pool,
            clock,
            policy,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Notified when the coordinator's next deadline may have moved
    /// earlier.
    pub fn woken(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// The sender of a request that carried `secret` (maybe) and claims
    /// `claimed` (maybe). A secret that matches no agent proves nothing;
    /// the claim then stands alone. A claim that contradicts the secret is
    /// a [`Error::Conflict`].
    pub async fn sender(&self, secret: Option<&str>, claimed: Option<AgentId>) -> Result<Sender> {
        let proven = match secret {
            Some(s) => self.pool.by_secret(s).await?,
            None => None,
        };
        match (proven, claimed) {
            (Some(p), Some(c)) if p != c => Err(Error::Conflict(format!(
                "agentId {c} does not match the session secret (agent {p})"
            ))),
            (Some(p), _) => Ok(Sender {
                agent: Some(p),
                verified: true,
            }),
            (None, c) => Ok(Sender {
                agent: c,
                verified: false,
            }),
        }
    }

    /// Refuses a request about `agent`'s work unless it came, proven, from
    /// `agent` itself (when `agent` authenticates at all).
    async fn check_sender(&self, agent: AgentId, hb: &Heartbeat) -> Result<()> {
        let authenticates = self.pool.get(agent).await?.is_some_and(|a| a.secret.is_some());
        if authenticates && !(hb.verified && hb.agent == Some(agent)) {
            return Err(Error::Unauthenticated(format!(
                "agent {agent} proves its identity with a session secret; this request did not"
            )));
        }
        Ok(())
    }

    /// Takes a heartbeat (with a step) or an idle agent's ping (without).
    ///
    /// Errors: [`Error::AgentNotFound`] for a ping from an agent the pool
    /// does not know (it should register again), [`Error::BuildNotFound`],
    /// [`Error::NotRunning`] for a step that is not running,
    /// [`Error::Superseded`] for an old attempt, [`Error::Unauthenticated`]
    /// when the holder proves itself and the request did not, and
    /// [`Error::Conflict`] when the sender is not the agent holding the
    /// lease.
    pub async fn heartbeat(&self, hb: Heartbeat) -> Result<()> {
        let now = self.clock.now();
        let Some(step) = hb.step else {
            let agent = hb
                .agent
                .ok_or_else(|| Error::invalid("heartbeat", "needs a step `id` or an `agentId`"))?;
            if self.pool.get(agent).await?.is_none() {
                return Err(Error::AgentNotFound(agent));
            }
            self.check_sender(agent, &hb).await?;
            let before = self.pool.seen(agent, now, true).await?;
            if before.is_some_and(|a| !a.pings) {
                // N.B.: it now has a silence deadline the coordinator's
                // timer must learn of; no event says so.
                self.wake.notify_one();
            }
            return Ok(());
        };
        let until = self.policy.deadline(now);
        let renewed = match hb.agent {
            Some(agent) => {
                self.check_sender(agent, &hb).await?;
                match self.store.renew(step, hb.attempt, Some(agent), until).await {
                    // Held by another agent: if that one proves itself, this
                    // request had to prove it was that one.
                    Err(Error::Conflict(why)) => {
                        let holder = self
                            .store
                            .step(step)
                            .await?
                            .filter(|s| s.status == StepStatus::Running)
                            .and_then(|s| s.agent_id);
                        if let Some(holder) = holder {
                            self.check_sender(holder, &hb).await?;
                        }
                        Err(Error::Conflict(why))
                    }
                    r => r,
                }
            }
            None => {
                // The original protocol names no agent: the holder's own
                // proof is what it lacks, if the holder has one.
                let holder = self
                    .store
                    .step(step)
                    .await?
                    .filter(|s| s.status == StepStatus::Running)
                    .and_then(|s| s.agent_id);
                if let Some(holder) = holder {
                    self.check_sender(holder, &hb).await?;
                }
                self.store.renew(step, hb.attempt, None, until).await
            }
        }?;
        self.pool.seen(renewed.agent, now, false).await?;
        Ok(())
    }

    /// Takes live output of a running attempt: it counts as a heartbeat,
    /// then the pieces are stored (the store's append is fenced by attempt
    /// itself). Returns how many were new, and the event to publish if any.
    pub async fn output(&self, hb: Heartbeat, pieces: &[LogPiece]) -> Result<(usize, Option<Event>)> {
        let id = hb
            .step
            .ok_or_else(|| Error::invalid("output", "needs a step `id`"))?;
        self.heartbeat(hb).await?;
        let attempt = match hb.attempt {
            Some(a) => a,
            None => self
                .store
                .step(id)
                .await?
                .map(|s| s.attempt)
                .ok_or(Error::StepNotFound(id))?,
        };
        let stored = self.store.append_log(id, attempt, pieces).await?;
        Ok((stored, (stored > 0).then_some(Event::Output(id))))
    }
}
