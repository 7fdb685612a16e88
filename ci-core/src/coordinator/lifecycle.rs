//! A build's life: submitted, finished by a result, canceled, or handed
//! back by its agent.

use super::{Accepted, Cancel, Coordinator, Event, HandBack, Report, StopOrder, MAX_HAND_BACKS};
use crate::error::{Error, Result};
use crate::model::{
    limits, truncate_log, Build, BuildId, BuildStatus, Completion, Moved, NewBuild, Step, StepStatus,
};
use crate::store::{Lease, Requeue};

impl Coordinator {
    /// Queues a new build. A scheduling pass ([`Coordinator::plan`]) may
    /// then start it.
    pub async fn submit(&mut self, new: &NewBuild) -> Result<Build> {
        new.validate()?;
        let now = self.clock.now();
        let build = self.store.create_build(new, now).await?;
        for step in build.steps.iter().filter(|s| s.status == StepStatus::Queued) {
            self.queued_since.insert(step.id, now);
        }
        self.events.push(Event::Created(build.id));
        if build.status.is_finished() {
            // Its pipeline could not be read: it ended as it began.
            self.events.push(Event::Finished {
                build: build.id,
                status: build.status,
                duration_ms: build.duration_ms(),
            });
        }
        Ok(build)
    }

    /// Takes a step's result. See the [module docs](super) for the rules.
    pub async fn complete(&mut self, report: Report) -> Result<Accepted> {
        let id = report.step;
        let step = self.store.step(id).await?.ok_or(Error::StepNotFound(id))?;
        let attempt = report.attempt.unwrap_or(step.attempt);
        // N.B.: the result of a canceled attempt its agent could not stop:
        // refused below, but the agent is done with it.
        if let Some((agent, _)) = self.unstoppable.get(&(id, attempt)).copied() {
            if report.agent.is_none_or(|a| a == agent) {
                self.release_attempt(agent, id, attempt).await?;
                self.unstoppable.remove(&(id, attempt));
                self.pool.seen(agent, self.clock.now(), false).await?;
            }
        }
        if attempt.0 == 0 || attempt > step.attempt {
            return Err(Error::Conflict(format!(
                "step {id} has no attempt {attempt} (latest is {})",
                step.attempt
            )));
        }
        let mut completion = report.completion;
        truncate_log(&mut completion.stdout, limits::MAX_LOG);
        truncate_log(&mut completion.stderr, limits::MAX_LOG);

        // N.B.: a failed attempt with retries left is recorded and its step
        // queued again under the same number until the next start: its
        // result was taken all the same.
        let taken = if step.status.is_finished() {
            true
        } else if step.status == StepStatus::Queued && attempt == step.attempt {
            self.store
                .log_info(id, Some(attempt))
                .await?
                .is_some_and(|l| l.complete)
        } else {
            false
        };
        if taken {
            if attempt == step.attempt {
                let log = self.store.log(id, Some(attempt)).await?.unwrap_or_default();
                let same_code = step.exit_code.is_none_or(|c| c == completion.exit_code);
                if same_code && log.stdout == completion.stdout && log.stderr == completion.stderr {
                    return Ok(Accepted::Duplicate(step));
                }
            }
            if attempt < step.attempt {
                return Err(Error::Superseded {
                    id,
                    attempt,
                    current: step.attempt,
                });
            }
            return Err(Error::Conflict(format!(
                "step {id} attempt {attempt} already has a different result (status {})",
                step.status
            )));
        }
        if attempt < step.attempt {
            return Err(Error::Superseded {
                id,
                attempt,
                current: step.attempt,
            });
        }
        let holder = step.agent_id.filter(|_| step.status == StepStatus::Running);
        match holder {
            Some(holder) => {
                self.check_sender(holder, report.agent, report.verified).await?;
                if let Some(agent) = report.agent.filter(|a| *a != holder) {
                    return Err(Error::Conflict(format!(
                        "step {id} attempt {attempt} is held by agent {holder}, not agent {agent}"
                    )));
                }
            }
            // N.B.: no lease: the step went back to the queue. Its last
            // attempt's result still counts (the work is not wasted), but
            // only from that attempt's agent, proven: anyone else's would be
            // a forgery.
            None if !(report.verified && report.agent.is_some() && report.agent == step.agent_id) => {
                return Err(Error::Conflict(format!(
                    "step {id} attempt {attempt} lost its lease; only its agent, proven by its \
                     session secret, may still report it"
                )));
            }
            None => {}
        }
        let now = self.clock.now();
        let Some(moved) = self.store.finish(id, attempt, &completion, now).await? else {
            return Err(Error::Conflict(format!("step {id} changed while finishing")));
        };
        if let Some(holder) = holder {
            self.pool.release(holder, id, now).await?;
        }
        self.queued_since.remove(&id);
        self.hand_backs.remove(&id);
        // N.B.: a result is contact, whether or not it names its agent (the
        // original agent does not; the attempt's holder sent it).
        if let Some(agent) = report.agent.or(holder) {
            self.pool.seen(agent, now, false).await?;
        }
        self.advanced(&moved);
        // N.B.: the step as the store has it now, without reading it.
        let status = moved
            .steps
            .iter()
            .find(|(s, _)| *s == id)
            .map_or(step.status, |(_, st)| *st);
        let ended = status.is_finished();
        let finished = Step {
            status,
            exit_code: ended.then_some(completion.exit_code),
            finished_at: if ended { Some(now) } else { step.finished_at },
            ..step
        };
        Ok(Accepted::Finished(finished))
    }

    /// Records what a change did to a build: steps that finished (events),
    /// steps newly queued (for dispatch latency), and the build's end.
    pub(super) fn advanced(&mut self, moved: &Moved) {
        let now = self.clock.now();
        for (step, status) in &moved.steps {
            match status {
                StepStatus::Queued => {
                    self.queued_since.entry(*step).or_insert(now);
                    self.limits.clear(*step);
                }
                st if st.is_finished() => {
                    self.queued_since.remove(step);
                    self.limits.clear(*step);
                    self.hand_backs.remove(step);
                    self.events.push(Event::StepFinished {
                        step: *step,
                        build: moved.build,
                        status: *st,
                    });
                }
                _ => {}
            }
        }
        if let (true, Some(status)) = (moved.ended(), moved.after) {
            self.events.push(Event::Finished {
                build: moved.build,
                status,
                duration_ms: moved.duration_ms,
            });
        }
    }

    /// An agent gives back an attempt its machinery could not run: the
    /// step goes back to the queue (the agent cools down for a lease), or
    /// fails once it has been given back [`MAX_HAND_BACKS`] times.
    pub async fn hand_back(&mut self, back: HandBack) -> Result<()> {
        let id = back.step;
        let step = self.store.step(id).await?.ok_or(Error::StepNotFound(id))?;
        let holder = step
            .agent_id
            .filter(|_| step.status == StepStatus::Running && step.attempt == back.attempt)
            .ok_or_else(|| Error::Conflict(format!("step {id} attempt {} is not running", back.attempt)))?;
        self.check_sender(holder, back.agent, back.verified).await?;
        if back.agent.is_some_and(|a| a != holder) {
            return Err(Error::Conflict(format!(
                "step {id} attempt {} is held by agent {holder}",
                back.attempt
            )));
        }
        self.pool.seen(holder, self.clock.now(), false).await?;
        let count = self.hand_backs.entry(id).or_default();
        *count += 1;
        if *count >= MAX_HAND_BACKS {
            let report = Report {
                step: id,
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
            step: id,
            attempt: back.attempt,
            agent: holder,
            expires_at: now,
        };
        self.requeue(&lease, Requeue::Returned, now).await?;
        self.pool.cool_down(holder, self.policy.deadline(now)).await
    }

    /// Cancels a queued or running build: every step that has not ended.
    /// A finished build is a conflict.
    pub async fn cancel(&mut self, id: BuildId) -> Result<Cancel> {
        let now = self.clock.now();
        let Some((running, moved)) = self.store.cancel(id, now).await? else {
            return match self.store.build(id).await? {
                Some(b) => Err(Error::Conflict(format!(
                    "build {id} already finished as {}",
                    b.status
                ))),
                None => Err(Error::BuildNotFound(id)),
            };
        };
        self.advanced(&moved);
        let canceled = self.store.build(id).await?.ok_or(Error::BuildNotFound(id))?;
        // N.B.: the lease goes with the cancel; the agent's slot stays until
        // the stop order is delivered (stop_delivered).
        let mut stops = Vec::with_capacity(running.len());
        for lease in running {
            match self.pool.get(lease.agent).await? {
                Some(agent) => stops.push(StopOrder {
                    agent: lease.agent,
                    agent_url: agent.url,
                    step: lease.step,
                    attempt: lease.attempt,
                }),
                None => self.pool.release(lease.agent, lease.step, now).await?,
            }
        }
        Ok(Cancel {
            build: Box::new(canceled),
            stops,
        })
    }

    /// Runs the failed, canceled and skipped steps of a finished build
    /// again ("retry failed"); the steps that passed keep their results.
    /// A build that has not finished is a conflict.
    pub async fn retry(&mut self, id: BuildId) -> Result<Build> {
        let now = self.clock.now();
        let build = self.store.build(id).await?.ok_or(Error::BuildNotFound(id))?;
        if build.status == BuildStatus::Success {
            return Err(Error::Conflict(format!(
                "build {id} succeeded: nothing to retry (rebuild it to run it again)"
            )));
        }
        if build
            .steps
            .iter()
            .any(|s| s.status == StepStatus::Failed && s.attempt.0 == 0)
        {
            return Err(Error::Conflict(format!(
                "build {id} failed before any step ran (its pipeline could not be read): \
                 rebuild it to read the pipeline again"
            )));
        }
        let Some(moved) = self.store.retry(id, now).await? else {
            return Err(Error::Conflict(format!(
                "build {id} is {}: only a finished build can be retried",
                build.status
            )));
        };
        self.advanced(&moved);
        self.store.build(id).await?.ok_or(Error::BuildNotFound(id))
    }
}
