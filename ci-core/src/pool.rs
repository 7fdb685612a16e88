//! The agent pool: which agents exist, what they hold, when they were seen.
//!
//! The pool is the coordinator's in-memory view. Agents are also recorded in
//! the [`BuildStore`](crate::store::BuildStore) so a restarted server knows
//! them again, but liveness (`last_seen`) changes on every heartbeat and
//! lives only here.

use std::collections::BTreeMap;

use crate::clock::Timestamp;
use crate::model::{AgentId, BuildId};

/// An agent as the coordinator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    /// Its id.
    pub id: AgentId,
    /// Base URL the server dispatches to.
    pub url: String,
    /// How many builds it may run at once (1 for now).
    pub capacity: u32,
    /// Builds it holds a lease on.
    pub running: Vec<BuildId>,
    /// Last time anything was heard from it.
    pub last_seen: Timestamp,
    /// Last time it became free; the longest-idle agent gets work first.
    pub idle_since: Timestamp,
    /// It identifies itself on heartbeats and pings while idle, so its
    /// silence means it is gone. Agents that speak only the original
    /// protocol never do, and are dropped only when a dispatch fails.
    pub pings: bool,
    /// Session secret it must present; `None` for agents that speak the
    /// original protocol, whose identity is whatever they claim.
    pub secret: Option<String>,
    /// Gets no work before this time: it answered busy to a dispatch.
    pub cooldown_until: Option<Timestamp>,
}

impl Agent {
    /// A newly known agent with capacity 1, seen `now`.
    pub fn new(id: AgentId, url: impl Into<String>, now: Timestamp) -> Agent {
        Agent {
            id,
            url: url.into(),
            capacity: 1,
            running: Vec::new(),
            last_seen: now,
            idle_since: now,
            pings: false,
            secret: None,
            cooldown_until: None,
        }
    }

    /// How many more builds it can take.
    pub fn free_slots(&self) -> u32 {
        self.capacity
            .saturating_sub(u32::try_from(self.running.len()).unwrap_or(u32::MAX))
    }

    /// True if it runs nothing.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty()
    }
}

/// Where the coordinator keeps its agents.
pub trait AgentPool: Send {
    /// Adds or replaces an agent.
    fn insert(&mut self, agent: Agent);

    /// Removes an agent and returns it.
    fn remove(&mut self, id: AgentId) -> Option<Agent>;

    /// The agent with this id.
    fn get(&self, id: AgentId) -> Option<&Agent>;

    /// The agent with this id, for updating.
    fn get_mut(&mut self, id: AgentId) -> Option<&mut Agent>;

    /// Every agent, in id order.
    fn iter(&self) -> Box<dyn Iterator<Item = &Agent> + '_>;

    /// The agent registered at `url`, if any.
    fn find_by_url(&self, url: &str) -> Option<AgentId> {
        self.iter().find(|a| a.url == url).map(|a| a.id)
    }

    /// Agents with a free slot, longest idle first.
    fn free(&self) -> Vec<&Agent> {
        let mut free: Vec<&Agent> = self.iter().filter(|a| a.free_slots() > 0).collect();
        free.sort_by_key(|a| (a.idle_since, a.id));
        free
    }

    /// Number of agents.
    fn len(&self) -> usize {
        self.iter().count()
    }

    /// True if there are no agents.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The default pool: a map in memory.
#[derive(Debug, Default)]
pub struct MemoryAgentPool {
    agents: BTreeMap<AgentId, Agent>,
}

impl MemoryAgentPool {
    /// An empty pool.
    pub fn new() -> MemoryAgentPool {
        MemoryAgentPool::default()
    }
}

impl AgentPool for MemoryAgentPool {
    fn insert(&mut self, agent: Agent) {
        self.agents.insert(agent.id, agent);
    }

    fn remove(&mut self, id: AgentId) -> Option<Agent> {
        self.agents.remove(&id)
    }

    fn get(&self, id: AgentId) -> Option<&Agent> {
        self.agents.get(&id)
    }

    fn get_mut(&mut self, id: AgentId) -> Option<&mut Agent> {
        self.agents.get_mut(&id)
    }

    fn iter(&self) -> Box<dyn Iterator<Item = &Agent> + '_> {
        Box::new(self.agents.values())
    }

    fn len(&self) -> usize {
        self.agents.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_agents_longest_idle_first() {
        let mut pool = MemoryAgentPool::new();
        let mut a = Agent::new(AgentId(1), "http://a", Timestamp(5));
        let b = Agent::new(AgentId(2), "http://b", Timestamp(3));
        let mut c = Agent::new(AgentId(3), "http://c", Timestamp(1));
        c.running.push(BuildId(9));
        a.idle_since = Timestamp(4);
        pool.insert(a);
        pool.insert(b);
        pool.insert(c);
        let ids: Vec<_> = pool.free().iter().map(|a| a.id).collect();
        assert_eq!(ids, vec![AgentId(2), AgentId(1)]);
        assert_eq!(pool.find_by_url("http://c"), Some(AgentId(3)));
        assert_eq!(pool.len(), 3);
        assert_eq!(pool.get(AgentId(3)).map(Agent::free_slots), Some(0));
    }
}
