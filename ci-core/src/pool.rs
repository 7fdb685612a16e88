//! The agent pool: the registry of the agents a server holds — who is
//! connected, what they can run (labels, slots), what they run now, when
//! they were last heard from, and how they prove who they are.
//!
//! Two implementations: [`MemoryAgentPool`], for embedding and tests, and
//! [`StoreAgentPool`], which keeps every registration in the
//! [`Agents`](crate::store::Agents) part of a store so that a restarted server knows
//! its agents again (and, with a shared store, another server sees them).
//! Liveness changes on every heartbeat and lives in memory in both.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;

use crate::clock::Timestamp;
use crate::error::Result;
use crate::model::{AgentId, AgentRecord, Labels, StepId};
use crate::store::Store;

/// An agent as its server sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    /// Its id.
    pub id: AgentId,
    /// Base URL the server dispatches to.
    pub url: String,
    /// How many builds it may run at once.
    pub capacity: u32,
    /// What it can run: a step that asks for labels goes only to an agent
    /// that has them all.
    pub labels: Labels,
    /// Builds it holds a slot for.
    pub running: Vec<StepId>,
    /// Last time anything was heard from it.
    pub last_seen: Timestamp,
    /// Last time it became free; the longest-idle agent gets work first.
    pub idle_since: Timestamp,
    /// It pings while idle, so its silence means it is gone. Agents that
    /// speak only the original protocol never do, and are dropped only
    /// when a dispatch fails.
    pub pings: bool,
    /// Session secret it must present; `None` for agents that speak the
    /// original protocol, whose identity is whatever they claim.
    pub secret: Option<String>,
    /// Gets no work before this time: it answered busy to a dispatch.
    pub cooldown_until: Option<Timestamp>,
}

impl Agent {
    /// A newly known agent with capacity 1 and no labels, seen `now`.
    pub fn new(id: AgentId, url: impl Into<String>, now: Timestamp) -> Agent {
        Agent {
            id,
            url: url.into(),
            capacity: 1,
            labels: Labels::default(),
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

    /// True if it may be given work at `now`.
    pub fn is_ready(&self, now: Timestamp) -> bool {
        self.free_slots() > 0 && self.cooldown_until.is_none_or(|t| now >= t)
    }

    /// When its silence would mean it is gone, if it pings while idle.
    pub fn silent_at(&self, ttl: Duration) -> Option<Timestamp> {
        (self.pings && self.is_idle()).then(|| self.last_seen.plus(ttl))
    }
}

/// A free agent's offer to the scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// The agent.
    pub agent: AgentId,
    /// Its base URL.
    pub url: String,
    /// What it can run.
    pub labels: Labels,
    /// How many more builds it can take now.
    pub free_slots: u32,
    /// Since when it has had a free slot.
    pub idle_since: Timestamp,
}

/// What a new registration asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enrollment {
    /// Base URL the server dispatches to.
    pub url: String,
    /// The session secret it will prove itself with, if it asked for one.
    pub secret: Option<String>,
    /// How many builds it may run at once (at least 1).
    pub capacity: u32,
    /// What it can run.
    pub labels: Labels,
    /// It pings while idle (so its silence from now on means it is gone).
    pub pings: bool,
}

impl Enrollment {
    /// An agent at `url` that runs one build at a time, has no labels, no
    /// session and does not ping while idle: what the original protocol
    /// says of an agent.
    pub fn new(url: impl Into<String>) -> Enrollment {
        Enrollment {
            url: url.into(),
            secret: None,
            capacity: 1,
            labels: Labels::default(),
            pings: false,
        }
    }
}

/// The registry of agents. See the [module docs](self).
///
/// N.B.: the pool records; it does not decide. The coordinator keeps its
/// rules (a build goes to one agent, an agent gets no more than its free
/// slots), so an implementation only has to store faithfully.
#[async_trait]
pub trait AgentPool: Send + Sync {
    /// Registers an agent with a new, never reused id, seen `now`.
    async fn register(&self, enrollment: Enrollment, now: Timestamp) -> Result<Agent>;

    /// Forgets an agent and returns it.
    async fn remove(&self, id: AgentId) -> Result<Option<Agent>>;

    /// The agent with this id.
    async fn get(&self, id: AgentId) -> Result<Option<Agent>>;

    /// The agent registered at `url`.
    async fn by_url(&self, url: &str) -> Result<Option<Agent>>;

    /// The agent whose session secret this is: one in the pool, or one
    /// removed from it lately (which can then only finish a build whose
    /// last attempt it held). Compares every secret in constant time, so
    /// the answer's timing says nothing about how close a guess was.
    async fn by_secret(&self, secret: &str) -> Result<Option<AgentId>>;

    /// Records a sign of life at `now` (and, for `ping`, that it pings
    /// while idle). Returns the agent as it was before, or `None` if it is
    /// unknown.
    async fn seen(&self, id: AgentId, now: Timestamp, ping: bool) -> Result<Option<Agent>>;

    /// Gives the agent a slot's worth of `step`. False if it is unknown.
    async fn hold(&self, id: AgentId, step: StepId) -> Result<bool>;

    /// Frees the agent's slot of `step`.
    async fn release(&self, id: AgentId, step: StepId, now: Timestamp) -> Result<()>;

    /// Gives the agent no work before `until`.
    async fn cool_down(&self, id: AgentId, until: Timestamp) -> Result<()>;

    /// How many builds the agents that may take work at `now` can take
    /// between them.
    async fn free_slots(&self, now: Timestamp) -> Result<usize>;

    /// The agents that may take work at `now`, longest idle first, as many
    /// as hold `slots` free slots between them.
    async fn offers(&self, now: Timestamp, slots: usize) -> Result<Vec<Offer>>;

    /// Every agent, in id order.
    async fn agents(&self) -> Result<Vec<Agent>>;

    /// Agents that ping while idle and have been silent for `ttl` at `now`.
    async fn silent(&self, now: Timestamp, ttl: Duration) -> Result<Vec<AgentId>>;

    /// The earliest time at which an agent falls silent or ends its
    /// cooldown.
    async fn next_deadline(&self, ttl: Duration) -> Result<Option<Timestamp>>;
}

// === impl MemoryAgentPool ===

/// The pool in memory: ids from a counter, nothing kept across restarts.
#[derive(Debug, Default)]
pub struct MemoryAgentPool {
    inner: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    last_id: i64,
    agents: BTreeMap<AgentId, Agent>,
    /// Session secrets of agents removed lately (the newest ids kept).
    retired: BTreeMap<AgentId, String>,
}

/// How many removed agents' secrets are kept, for their late results.
const RETIRED: usize = 4096;

impl MemoryAgentPool {
    /// An empty pool.
    pub fn new() -> MemoryAgentPool {
        MemoryAgentPool::default()
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds an agent whose id was given elsewhere (by a store).
    fn insert(&self, agent: Agent) {
        let mut r = self.lock();
        r.last_id = r.last_id.max(agent.id.0);
        r.agents.insert(agent.id, agent);
    }
}

fn agent_of(e: Enrollment, id: AgentId, now: Timestamp) -> Agent {
    Agent {
        capacity: e.capacity.max(1),
        labels: e.labels,
        secret: e.secret,
        pings: e.pings,
        ..Agent::new(id, e.url, now)
    }
}

#[async_trait]
impl AgentPool for MemoryAgentPool {
    async fn register(&self, enrollment: Enrollment, now: Timestamp) -> Result<Agent> {
        let mut r = self.lock();
        r.agents.retain(|_, a| a.url != enrollment.url);
        r.last_id += 1;
        let agent = agent_of(enrollment, AgentId(r.last_id), now);
        r.agents.insert(agent.id, agent.clone());
        Ok(agent)
    }

    async fn remove(&self, id: AgentId) -> Result<Option<Agent>> {
        let mut r = self.lock();
        let gone = r.agents.remove(&id);
        if let Some(secret) = gone.as_ref().and_then(|a| a.secret.clone()) {
            if r.retired.len() >= RETIRED {
                r.retired.pop_first();
            }
            r.retired.insert(id, secret);
        }
        Ok(gone)
    }

    async fn get(&self, id: AgentId) -> Result<Option<Agent>> {
        Ok(self.lock().agents.get(&id).cloned())
    }

    async fn by_url(&self, url: &str) -> Result<Option<Agent>> {
        Ok(self.lock().agents.values().find(|a| a.url == url).cloned())
    }

    async fn by_secret(&self, secret: &str) -> Result<Option<AgentId>> {
        let r = self.lock();
        let live = r
            .agents
            .values()
            .filter_map(|a| Some((a.id, a.secret.as_deref()?)));
        let retired = r.retired.iter().map(|(id, s)| (*id, s.as_str()));
        let mut found = None;
        for (id, s) in live.chain(retired) {
            if crate::auth::ct_eq(s.as_bytes(), secret.as_bytes()) {
                found = Some(id);
            }
        }
        Ok(found)
    }

    async fn seen(&self, id: AgentId, now: Timestamp, ping: bool) -> Result<Option<Agent>> {
        let mut r = self.lock();
        let Some(a) = r.agents.get_mut(&id) else {
            return Ok(None);
        };
        let before = a.clone();
        a.last_seen = a.last_seen.max(now);
        a.pings |= ping;
        Ok(Some(before))
    }

    async fn hold(&self, id: AgentId, step: StepId) -> Result<bool> {
        let mut r = self.lock();
        let Some(a) = r.agents.get_mut(&id) else {
            return Ok(false);
        };
        if !a.running.contains(&step) {
            a.running.push(step);
        }
        Ok(true)
    }

    async fn release(&self, id: AgentId, step: StepId, now: Timestamp) -> Result<()> {
        if let Some(a) = self.lock().agents.get_mut(&id) {
            let had = a.free_slots() == 0;
            a.running.retain(|s| *s != step);
            if had || a.running.is_empty() {
                a.idle_since = now;
            }
        }
        Ok(())
    }

    async fn cool_down(&self, id: AgentId, until: Timestamp) -> Result<()> {
        if let Some(a) = self.lock().agents.get_mut(&id) {
            a.cooldown_until = Some(until);
        }
        Ok(())
    }

    async fn free_slots(&self, now: Timestamp) -> Result<usize> {
        Ok(self
            .lock()
            .agents
            .values()
            .filter(|a| a.is_ready(now))
            .map(|a| a.free_slots() as usize)
            .sum())
    }

    async fn offers(&self, now: Timestamp, slots: usize) -> Result<Vec<Offer>> {
        let r = self.lock();
        let mut ready: Vec<&Agent> = r.agents.values().filter(|a| a.is_ready(now)).collect();
        let longest_idle = |a: &&Agent| (a.idle_since, a.id);
        // N.B.: each has a free slot, so the `slots` longest idle are
        // enough; with 10,000 agents and one build, sorting them all was
        // most of a scheduling pass.
        if slots < ready.len() {
            ready.select_nth_unstable_by_key(slots, longest_idle);
            ready.truncate(slots);
        }
        ready.sort_by_key(longest_idle);
        let mut need = slots;
        Ok(ready
            .into_iter()
            .take_while(|a| {
                let take = need > 0;
                need = need.saturating_sub(a.free_slots() as usize);
                take
            })
            .map(|a| Offer {
                agent: a.id,
                url: a.url.clone(),
                labels: a.labels.clone(),
                free_slots: a.free_slots(),
                idle_since: a.idle_since,
            })
            .collect())
    }

    async fn agents(&self) -> Result<Vec<Agent>> {
        Ok(self.lock().agents.values().cloned().collect())
    }

    async fn silent(&self, now: Timestamp, ttl: Duration) -> Result<Vec<AgentId>> {
        Ok(self
            .lock()
            .agents
            .values()
            .filter(|a| a.silent_at(ttl).is_some_and(|t| now >= t))
            .map(|a| a.id)
            .collect())
    }

    async fn next_deadline(&self, ttl: Duration) -> Result<Option<Timestamp>> {
        let r = self.lock();
        let silent = r.agents.values().filter_map(|a| a.silent_at(ttl));
        let cooled = r.agents.values().filter_map(|a| a.cooldown_until);
        Ok(silent.chain(cooled).min())
    }
}

// === impl StoreAgentPool ===

/// The pool with every registration in a [`Store`]: ids are the
/// store's (never reused), and a restarted server knows its agents again
/// from [`StoreAgentPool::load`]. Liveness stays in memory.
pub struct StoreAgentPool {
    store: Arc<dyn Store>,
    live: MemoryAgentPool,
}

impl std::fmt::Debug for StoreAgentPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreAgentPool")
            .field("live", &self.live)
            .finish_non_exhaustive()
    }
}

impl StoreAgentPool {
    /// The agents recorded in `store`, each taken to have been seen `now`
    /// (they get a lease's time to be heard from).
    pub async fn load(store: Arc<dyn Store>, now: Timestamp) -> Result<StoreAgentPool> {
        let live = MemoryAgentPool::new();
        for rec in store.agents().await? {
            live.insert(Agent::from_record(rec, now));
        }
        Ok(StoreAgentPool { store, live })
    }
}

impl Agent {
    /// An agent known again from its stored record, seen `now`.
    pub fn from_record(rec: AgentRecord, now: Timestamp) -> Agent {
        Agent {
            capacity: rec.capacity.max(1),
            labels: rec.labels,
            secret: rec.secret,
            ..Agent::new(rec.id, rec.url, now)
        }
    }
}

#[async_trait]
impl AgentPool for StoreAgentPool {
    async fn register(&self, enrollment: Enrollment, now: Timestamp) -> Result<Agent> {
        let rec = self.store.register_agent(&enrollment, now).await?;
        self.live.lock().agents.retain(|_, a| a.url != rec.url);
        let agent = agent_of(enrollment, rec.id, now);
        self.live.insert(agent.clone());
        Ok(agent)
    }

    async fn remove(&self, id: AgentId) -> Result<Option<Agent>> {
        // N.B.: the store first: if it fails, the agent stays, and removing
        // it again is harmless.
        self.store.remove_agent(id).await?;
        self.live.remove(id).await
    }

    async fn get(&self, id: AgentId) -> Result<Option<Agent>> {
        self.live.get(id).await
    }

    async fn by_url(&self, url: &str) -> Result<Option<Agent>> {
        self.live.by_url(url).await
    }

    async fn by_secret(&self, secret: &str) -> Result<Option<AgentId>> {
        self.live.by_secret(secret).await
    }

    async fn seen(&self, id: AgentId, now: Timestamp, ping: bool) -> Result<Option<Agent>> {
        self.live.seen(id, now, ping).await
    }

    async fn hold(&self, id: AgentId, step: StepId) -> Result<bool> {
        self.live.hold(id, step).await
    }

    async fn release(&self, id: AgentId, step: StepId, now: Timestamp) -> Result<()> {
        self.live.release(id, step, now).await
    }

    async fn cool_down(&self, id: AgentId, until: Timestamp) -> Result<()> {
        self.live.cool_down(id, until).await
    }

    async fn free_slots(&self, now: Timestamp) -> Result<usize> {
        self.live.free_slots(now).await
    }

    async fn offers(&self, now: Timestamp, slots: usize) -> Result<Vec<Offer>> {
        self.live.offers(now, slots).await
    }

    async fn agents(&self) -> Result<Vec<Agent>> {
        self.live.agents().await
    }

    async fn silent(&self, now: Timestamp, ttl: Duration) -> Result<Vec<AgentId>> {
        self.live.silent(now, ttl).await
    }

    async fn next_deadline(&self, ttl: Duration) -> Result<Option<Timestamp>> {
        self.live.next_deadline(ttl).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn enroll(url: &str) -> Enrollment {
        Enrollment::new(url)
    }

    async fn offers_longest_idle_first(pool: &dyn AgentPool) {
        let a = pool.register(enroll("http://a"), Timestamp(5)).await.unwrap().id;
        let b = pool.register(enroll("http://b"), Timestamp(3)).await.unwrap().id;
        let c = pool.register(enroll("http://c"), Timestamp(1)).await.unwrap().id;
        assert!(pool.hold(c, StepId(9)).await.unwrap());
        let ids: Vec<_> = pool
            .offers(Timestamp(10), 10)
            .await
            .unwrap()
            .iter()
            .map(|o| o.agent)
            .collect();
        assert_eq!(ids, vec![b, a]);
        let one: Vec<_> = pool
            .offers(Timestamp(10), 1)
            .await
            .unwrap()
            .iter()
            .map(|o| o.agent)
            .collect();
        assert_eq!(one, vec![b], "as many as needed, the longest idle");
        assert_eq!(pool.by_url("http://c").await.unwrap().map(|a| a.id), Some(c));
        pool.cool_down(b, Timestamp(20)).await.unwrap();
        assert_eq!(pool.offers(Timestamp(10), 10).await.unwrap().len(), 1);
        assert_eq!(
            pool.next_deadline(Duration::from_secs(1)).await.unwrap(),
            Some(Timestamp(20))
        );
        pool.release(c, StepId(9), Timestamp(11)).await.unwrap();
        assert_eq!(
            pool.get(c).await.unwrap().map(|a| a.idle_since),
            Some(Timestamp(11))
        );
        // A re-registration of a URL replaces its agent.
        let a2 = pool.register(enroll("http://a"), Timestamp(12)).await.unwrap().id;
        assert!(a2 > c && pool.get(a).await.unwrap().is_none());
        // Pings make silence count.
        assert!(pool
            .seen(a2, Timestamp(13), true)
            .await
            .unwrap()
            .is_some_and(|before| !before.pings));
        assert_eq!(
            pool.silent(Timestamp(1013), Duration::from_secs(1))
                .await
                .unwrap(),
            vec![a2]
        );
    }

    #[tokio::test]
    async fn memory_pool() {
        offers_longest_idle_first(&MemoryAgentPool::new()).await;
    }

    #[tokio::test]
    async fn store_pool_keeps_registrations() {
        let store = Arc::new(MemoryStore::new());
        let pool = StoreAgentPool::load(store.clone(), Timestamp(0)).await.unwrap();
        offers_longest_idle_first(&pool).await;
        let mut secret = enroll("http://d");
        secret.secret = Some("s3cret".into());
        secret.capacity = 4;
        let d = pool.register(secret, Timestamp(20)).await.unwrap().id;
        // A restarted server knows them again.
        let again = StoreAgentPool::load(store, Timestamp(30)).await.unwrap();
        let urls: Vec<String> = again.agents().await.unwrap().into_iter().map(|a| a.url).collect();
        assert_eq!(urls, ["http://b", "http://c", "http://a", "http://d"]);
        assert_eq!(again.by_secret("s3cret").await.unwrap(), Some(d));
        assert_eq!(again.get(d).await.unwrap().map(|a| a.capacity), Some(4));
        assert!(again.remove(d).await.unwrap().is_some());
        assert_eq!(again.agents().await.unwrap().len(), 3);
    }
}
