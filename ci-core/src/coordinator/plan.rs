//! A scheduling pass: ready work and free agents in, dispatches out.

use std::collections::HashMap;

use super::{Coordinator, Dispatch, Event};
use crate::error::Result;
use crate::model::AgentId;
use crate::store::Claim;

impl Coordinator {
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
        let ready = self.store.queued(self.scheduler.window(slots)).await?;
        if ready.is_empty() {
            return Ok(Vec::new());
        }
        // Only as many agents as there are builds to place (longest idle
        // first): a pass with 100 idle agents and one build looks at one.
        let offers = self.pool.offers(now, ready.len()).await?;
        let assignments = self.scheduler.assign(&ready, &offers);
        // N.B.: the policy only proposes. Drop anything that would give a
        // build to two agents, an agent more than its free slots, or a
        // build to an agent that was not offered.
        let mut room: HashMap<AgentId, (u32, &str)> = offers
            .iter()
            .map(|o| (o.agent, (o.free_slots, o.url.as_str())))
            .collect();
        let mut claims: Vec<Claim> = Vec::with_capacity(assignments.len());
        for a in assignments {
            if !ready.iter().any(|b| b.id == a.build) || claims.iter().any(|c| c.build == a.build) {
                continue;
            }
            let Some((free, url)) = room.get_mut(&a.agent).filter(|(free, _)| *free > 0) else {
                continue;
            };
            *free -= 1;
            claims.push(Claim {
                build: a.build,
                agent: a.agent,
                agent_url: (*url).to_owned(),
                lease_until: self.policy.deadline(now),
            });
        }
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let started = self.store.start(&claims, now).await?;
        let mut dispatches = Vec::with_capacity(started.len());
        for build in started {
            let Some(agent) = build.agent_id else {
                continue;
            };
            let url = build.agent_url.clone().unwrap_or_default();
            self.pool.hold(agent, build.id).await?;
            let since = self.queued_since.remove(&build.id).unwrap_or(build.created_at);
            self.events.push(Event::Started {
                build: build.id,
                attempt: build.attempt,
                agent,
                waited_ms: u64::try_from(now.since(since).as_millis()).unwrap_or(u64::MAX),
            });
            dispatches.push(Dispatch {
                agent,
                agent_url: url,
                build,
            });
        }
        Ok(dispatches)
    }
}
