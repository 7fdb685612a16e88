//! A build's life: submitted, finished by a result, canceled, or handed
//! back by its agent.

use super::{Accepted, Cancel, Coordinator, Event, HandBack, Report, StopOrder, MAX_HAND_BACKS};
use crate::error::{Error, Result};
use crate::model::{limits, truncate_log, Build, BuildId, BuildStatus, Completion, NewBuild};
use crate::store::Lease;

impl Coordinator {
    /// Queues a new build. A scheduling pass ([`Coordinator::plan`]) may
    /// then start it.
    pub async fn submit(&mut self, new: &NewBuild) -> Result<Build> {
        new.validate()?;
        let now = self.clock.now();
        let build = self.store.create_build(new, now).await?;
        self.queued_since.insert(build.id, now);
        self.events.push(Event::Created(build.id));
        Ok(build)
    }

    /// Takes a build's result. See the [module docs](super) for the rules.
    pub async fn complete(&mut self, report: Report) -> Result<Accepted> {
        let id = report.build;
        let build = self.store.build(id).await?.ok_or(Error::BuildNotFound(id))?;
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
                let log = self.store.log(id, Some(attempt)).await?.unwrap_or_default();
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
        let holder = build.agent_id.filter(|_| build.status == BuildStatus::Running);
        match holder {
            Some(holder) => {
                self.check_sender(holder, report.agent, report.verified).await?;
                if let Some(agent) = report.agent.filter(|a| *a != holder) {
                    return Err(Error::Conflict(format!(
                        "build {id} attempt {attempt} is held by agent {holder}, not agent {agent}"
                    )));
                }
            }
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
        let now = self.clock.now();
        if !self.store.finish(id, attempt, &completion, now).await? {
            return Err(Error::Conflict(format!("build {id} changed while finishing")));
        }
        if let Some(holder) = holder {
            self.pool.release(holder, id, now).await?;
        }
        self.queued_since.remove(&id);
        self.hand_backs.remove(&id);
        if let Some(agent) = report.agent {
            self.pool.seen(agent, now, false).await?;
        }
        let finished = self.store.build(id).await?.ok_or(Error::BuildNotFound(id))?;
        self.events.push(Event::Finished {
            build: id,
            status: finished.status,
            duration_ms: finished.duration_ms(),
        });
        Ok(Accepted::Finished(finished))
    }

    /// An agent gives back an attempt its machinery could not run: the
    /// build goes back to the queue (the agent cools down for a lease), or
    /// fails once it has been given back [`MAX_HAND_BACKS`] times.
    pub async fn hand_back(&mut self, back: HandBack) -> Result<()> {
        let id = back.build;
        let build = self.store.build(id).await?.ok_or(Error::BuildNotFound(id))?;
        let holder = build
            .agent_id
            .filter(|_| build.status == BuildStatus::Running && build.attempt == back.attempt)
            .ok_or_else(|| Error::Conflict(format!("build {id} attempt {} is not running", back.attempt)))?;
        self.check_sender(holder, back.agent, back.verified).await?;
        if back.agent.is_some_and(|a| a != holder) {
            return Err(Error::Conflict(format!(
                "build {id} attempt {} is held by agent {holder}",
                back.attempt
            )));
        }
        let count = self.hand_backs.entry(id).or_default();
        *count += 1;
        if *count >= MAX_HAND_BACKS {
            let report = Report {
                build: id,
                attempt: Some(back.attempt),
                agent: Some(holder),
                verified: true,
                completion: Completion::not_run(format!(
                    "the agents' machinery failed {MAX_HAND_BACKS} times; last: {}",
                    back.reason
                )),
            };
            return self.complete(report).await.map(|_| ());
        }
        let now = self.clock.now();
        let lease = Lease {
            build: id,
            attempt: back.attempt,
            agent: holder,
            expires_at: now,
        };
        self.requeue(&lease, now).await?;
        self.pool.cool_down(holder, self.policy.deadline(now)).await
    }

    /// Cancels a queued or running build. A finished build is a conflict.
    pub async fn cancel(&mut self, id: BuildId) -> Result<Cancel> {
        let build = self.store.build(id).await?.ok_or(Error::BuildNotFound(id))?;
        if build.status.is_finished() {
            return Err(Error::Conflict(format!(
                "build {id} already finished as {}",
                build.status
            )));
        }
        let now = self.clock.now();
        if !self.store.cancel(id, build.attempt, now).await? {
            return Err(Error::Conflict(format!("build {id} changed while canceling")));
        }
        self.queued_since.remove(&id);
        self.hand_backs.remove(&id);
        let canceled = self.store.build(id).await?.ok_or(Error::BuildNotFound(id))?;
        self.events.push(Event::Finished {
            build: id,
            status: BuildStatus::Canceled,
            duration_ms: canceled.duration_ms(),
        });
        // N.B.: the lease goes with the cancel; the agent's slot stays until
        // the stop order is delivered (stop_delivered).
        let holder = build.agent_id.filter(|_| build.status == BuildStatus::Running);
        let Some(holder) = holder else {
            return Ok(Cancel::Done(Box::new(canceled)));
        };
        let Some(agent) = self.pool.get(holder).await? else {
            return Ok(Cancel::Done(Box::new(canceled)));
        };
        Ok(Cancel::Stop(StopOrder {
            agent: holder,
            agent_url: agent.url,
            build: id,
            attempt: build.attempt,
        }))
    }
}
