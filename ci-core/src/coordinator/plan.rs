//! A scheduling pass: ready work and free agents in, dispatches out.

use std::collections::HashMap;

use super::{Coordinator, Dispatch, Event, Report};
use crate::error::Result;
use crate::model::{AgentId, Completion, DispatchId, Labels};
use crate::store::Claim;

impl Coordinator {
    /// The policy's assignments of `ready` builds to the free agents' offers,
    /// kept only where they hold the coordinator's rules.
    async fn propose(
        &mut self,
        ready: &[crate::model::Step],
        now: crate::clock::Timestamp,
    ) -> Result<Vec<Claim>> {
        if ready.is_empty() {
            return Ok(Vec::new());
        }
        // Only as many agents as there are builds to place (longest idle
        // first): a pass with 100 idle agents and one build looks at one.
        // Builds that ask for labels may need any of them.
        let wanted = if ready.iter().all(|s| s.labels.is_empty()) {
            ready.len()
        } else {
            usize::MAX
        };
        let offers = self.pool.offers(now, wanted).await?;
        let assignments = self.scheduler.assign(ready, &offers);
        // N.B.: the policy only proposes. Drop anything that would give a
        // build to two agents, an agent more than its free slots, a build
        // to an agent that was not offered or lacks one of its labels.
        let mut room: HashMap<AgentId, (u32, &str, &Labels)> = offers
            .iter()
            .map(|o| (o.agent, (o.free_slots, o.url.as_str(), &o.labels)))
            .collect();
        let mut claims: Vec<Claim> = Vec::with_capacity(assignments.len());
        for a in assignments {
            let Some(step) = ready.iter().find(|s| s.id == a.step) else {
                continue;
            };
            if claims.iter().any(|c| c.step == a.step) {
                continue;
            }
            let Some((free, url, _)) = room
                .get_mut(&a.agent)
                .filter(|(free, _, labels)| *free > 0 && labels.satisfy(&step.labels))
            else {
                continue;
            };
            *free -= 1;
            claims.push(Claim {
                step: a.step,
                agent: a.agent,
                agent_url: (*url).to_owned(),
                lease_until: self.policy.deadline(now),
            });
        }
        Ok(claims)
    }

    /// The oldest queued steps of every label set some free agent can
    /// take, as many of each as such agents have free slots (at most
    /// `slots`), oldest first.
    async fn ready_by_labels(
        &mut self,
        slots: usize,
        now: crate::clock::Timestamp,
    ) -> Result<Vec<crate::model::Step>> {
        let offers = self.pool.offers(now, usize::MAX).await?;
        let mut ready = Vec::new();
        for set in self.store.queued_label_sets().await? {
            let room: usize = offers
                .iter()
                .filter(|o| o.labels.satisfy(&set))
                .map(|o| o.free_slots as usize)
                .sum();
            if room > 0 {
                ready.extend(self.store.queued_with(&set, room.min(slots)).await?);
            }
        }
        ready.sort_by_key(|s| s.id);
        Ok(ready)
    }

    /// One scheduling pass: shows the policy a window of ready builds and
    /// the free agents' offers, starts an attempt for each match it keeps,
    /// and returns what to send where.
    ///
    /// N.B.: the attempts start in one store step, so a store failure
    /// starts none of them and strands no attempt on an agent that is never
    /// told of it.
    pub async fn plan(&mut self) -> Result<Vec<Dispatch>> {
        let now = self.clock.now();
        let slots = self.pool.free_slots(now).await?;
        if slots == 0 {
            return Ok(Vec::new());
        }
        // N.B.: first just enough steps for the free slots, oldest first;
        // only when some of those could not be placed (their labels), the
        // queue by label set: the oldest steps of each label set a free
        // agent has, however deep. A queue of unlabelled steps costs no
        // extra reads.
        let window = self.scheduler.window(slots);
        let mut ready = self.store.queued(slots.min(window)).await?;
        let mut claims = self.propose(&ready, now).await?;
        if claims.len() < ready.len() && ready.len() == slots.min(window) {
            ready = self.ready_by_labels(slots, now).await?;
            claims = self.propose(&ready, now).await?;
        }
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let started = self.store.start(&claims, now).await?;
        let mut dispatches = Vec::with_capacity(started.len());
        let mut spent = Vec::new();
        for step in started {
            let Some(agent) = step.agent_id else {
                continue;
            };
            let Some(id) = DispatchId::new(step.id, step.attempt) else {
                spent.push((step.id, step.attempt, agent));
                continue;
            };
            let url = step.agent_url.clone().unwrap_or_default();
            self.pool.hold(agent, step.id).await?;
            self.limit(&step, now);
            let since = self.queued_since.remove(&step.id).unwrap_or(step.created_at);
            self.events.push(Event::Started {
                step: step.id,
                build: step.build,
                attempt: step.attempt,
                agent,
                waited_ms: u64::try_from(now.since(since).as_millis()).unwrap_or(u64::MAX),
            });
            dispatches.push(Dispatch {
                agent,
                agent_url: url,
                step,
                id,
            });
        }
        // N.B.: a step dispatched over a million times (its agents lost,
        // busy or handing it back each time) has no wire id left: it fails.
        for (step, attempt, agent) in spent {
            self.pool.hold(agent, step).await?;
            let report = Report {
                step,
                attempt: Some(attempt),
                agent: Some(agent),
                verified: true,
                completion: Completion::not_run(format!(
                    "the step was dispatched {} times and has no attempt number left",
                    DispatchId::MAX_ATTEMPT
                )),
            };
            self.complete(report).await?;
        }
        Ok(dispatches)
    }
}
