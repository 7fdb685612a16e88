//! Agents joining and leaving: registration, takeover of a URL, drops,
//! graceful leaves, stop orders and failed dispatches.

use super::{
    Coordinator, Dispatch, DispatchFailure, Event, LeaveReason, Registration, Report, StopOrder, Stopped,
};
use crate::error::{Error, Result};
use crate::model::{AgentId, Attempt, Completion, StepId, StepStatus};
use crate::pool::Enrollment;
use crate::store::{Lease, Requeue};

impl Coordinator {
    /// Registers an agent.
    ///
    /// N.B.: an agent registering at a URL that is already registered is a
    /// new process (the old one restarted). Whatever the old one held is
    /// lost with it, so those builds go back to the queue now rather than
    /// waiting for their leases to run out. But a URL whose agent holds a
    /// live session (a secret, and heard from within a lease) is taken over
    /// only with `proof` of that session's secret: otherwise anyone could
    /// kill its running build by registering its URL. [`Error::Conflict`]
    /// until then.
    pub async fn register(&mut self, enrollment: Enrollment, proof: Option<&str>) -> Result<Registration> {
        let now = self.clock.now();
        if let Some(old) = self.pool.by_url(&enrollment.url).await? {
            if let Some(held) = &old.secret {
                let proven = proof.is_some_and(|p| crate::auth::ct_eq(p.as_bytes(), held.as_bytes()));
                let lapses = old.last_seen.plus(self.policy.ttl());
                if !proven && now < lapses {
                    return Err(Error::Conflict(format!(
                        "agent {} at {} holds a live session: present its secret to replace it, \
                         or register again after {} ms",
                        old.id,
                        enrollment.url,
                        lapses.since(now).as_millis()
                    )));
                }
            }
            self.drop_agent(old.id, LeaveReason::Replaced).await?;
        }
        let agent = self.pool.register(enrollment, now).await?;
        self.events.push(Event::AgentJoined(agent.id));
        Ok(Registration {
            id: agent.id,
            heartbeat_ms: u64::try_from(self.policy.interval().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Registers an agent at `url` that speaks the original protocol: no
    /// session secret, capacity 1, no labels.
    pub async fn register_agent(&mut self, url: &str) -> Result<Registration> {
        self.register(enrollment(url, None), None).await
    }

    /// Registers an agent that will prove its identity with `secret`;
    /// `proof` is the secret of the session it replaces, if any. See
    /// [`Coordinator::register`].
    pub async fn register_agent_with_secret(
        &mut self,
        url: &str,
        secret: String,
        proof: Option<&str>,
    ) -> Result<Registration> {
        self.register(enrollment(url, Some(secret)), proof).await
    }

    /// Drops an agent: its builds go back to the queue, and it is forgotten.
    pub(super) async fn drop_agent(&mut self, id: AgentId, reason: LeaveReason) -> Result<()> {
        if self.pool.get(id).await?.is_none() {
            return Ok(());
        }
        let now = self.clock.now();
        let held: Vec<Lease> = self
            .store
            .leases()
            .await?
            .into_iter()
            .filter(|l| l.agent == id)
            .collect();
        // N.B.: store first, pool second. If the store fails half way, the
        // pool still holds the agent and the next pass retries; requeue is
        // fenced, so repeating it is harmless.
        // N.B.: an agent that leaves on purpose gives its steps back; one
        // that died, fell silent or cannot be reached lost them.
        let why = match reason {
            LeaveReason::Left => Requeue::Returned,
            _ => Requeue::Lost,
        };
        for lease in &held {
            self.requeue(lease, why, now).await?;
        }
        self.pool.remove(id).await?;
        self.events.push(Event::AgentLeft { agent: id, reason });
        Ok(())
    }

    /// Records how a stop order went: the agent's slot is freed once it
    /// stopped; an agent that cannot stop work keeps the slot until the
    /// attempt's result arrives or a lease's time has passed; an agent that
    /// could not be reached is dropped.
    pub async fn stop_delivered(&mut self, order: &StopOrder, stopped: Stopped) -> Result<()> {
        let now = self.clock.now();
        match stopped {
            Stopped::Unreachable => return self.drop_agent(order.agent, LeaveReason::Unreachable).await,
            Stopped::Unsupported => {
                let until = self.policy.deadline(now);
                self.unstoppable
                    .insert((order.step, order.attempt), (order.agent, until));
                return Ok(());
            }
            Stopped::Yes => {}
        }
        self.release_attempt(order.agent, order.step, order.attempt).await
    }

    /// Frees `agent`'s slot of `step`, which held `attempt`, unless a
    /// later attempt of the step runs on the same agent and holds it now
    /// (its build was retried, or it was requeued, and it went there).
    pub(super) async fn release_attempt(
        &mut self,
        agent: AgentId,
        step: StepId,
        attempt: Attempt,
    ) -> Result<()> {
        let again = self.store.step(step).await?.is_some_and(|s| {
            s.status == StepStatus::Running && s.attempt > attempt && s.agent_id == Some(agent)
        });
        if again {
            return Ok(());
        }
        let now = self.clock.now();
        self.pool.release(agent, step, now).await
    }

    /// An agent leaves on purpose (graceful shutdown): whatever it holds
    /// goes back to the queue now, and it is forgotten.
    pub async fn agent_left(&mut self, id: AgentId, verified: bool) -> Result<()> {
        if self.pool.get(id).await?.is_none() {
            return Err(Error::AgentNotFound(id));
        }
        self.check_sender(id, Some(id), verified).await?;
        self.drop_agent(id, LeaveReason::Left).await
    }

    /// Drops an agent whose connection closed: what it held goes back to
    /// the queue at once, as lost. Nothing if it was already gone (it left,
    /// or registered again on a new connection).
    pub async fn agent_disconnected(&mut self, id: AgentId) -> Result<()> {
        self.drop_agent(id, LeaveReason::Disconnected).await
    }

    /// Records that a dispatch could not be delivered.
    pub async fn dispatch_failed(&mut self, dispatch: &Dispatch, failure: DispatchFailure) -> Result<()> {
        let step = dispatch.step.id;
        let current = self
            .store
            .step(step)
            .await?
            .filter(|s| {
                s.status == StepStatus::Running
                    && s.attempt == dispatch.step.attempt
                    && s.agent_id == Some(dispatch.agent)
            })
            .map(|s| Lease {
                step,
                attempt: s.attempt,
                agent: dispatch.agent,
                expires_at: self.clock.now(),
            });
        match failure {
            DispatchFailure::Unreachable(_) => {
                self.drop_agent(dispatch.agent, LeaveReason::Unreachable).await
            }
            DispatchFailure::Busy(_) => {
                let now = self.clock.now();
                if let Some(lease) = current {
                    self.requeue(&lease, Requeue::Returned, now).await?;
                }
                self.pool
                    .cool_down(dispatch.agent, self.policy.deadline(now))
                    .await
            }
            DispatchFailure::Rejected(reason) => {
                let Some(lease) = current else {
                    return Ok(());
                };
                let report = Report {
                    step,
                    attempt: Some(lease.attempt),
                    agent: Some(lease.agent),
                    verified: true,
                    completion: Completion::not_run(format!("agent refused the build: {reason}")),
                };
                self.complete(report).await.map(|_| ())
            }
        }
    }
}

fn enrollment(url: &str, secret: Option<String>) -> Enrollment {
    Enrollment {
        secret,
        ..Enrollment::new(url)
    }
}
