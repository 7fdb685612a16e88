//! Scheduling policy: which ready build goes to which free agent.
//!
//! On every scheduling pass the [`Coordinator`](crate::Coordinator) gives
//! the policy a window of ready work (oldest first) and the offers of the
//! agents that can take some, and enforces the invariants itself (a build
//! goes to one agent, an agent gets no more than its free slots, labels
//! match), so a policy can only choose, never break the guarantees.

use crate::model::{AgentId, Build, BuildId};
use crate::pool::Offer;

/// One build to start on one agent.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The build.
    pub build: BuildId,
    /// The agent.
    pub agent: AgentId,
}

/// A scheduling policy.
#[cfg_attr(test, mockall::automock)]
pub trait Scheduler: Send + Sync {
    /// How many of the oldest ready builds to consider when agents have
    /// `free_slots` between them. A policy that may skip builds (for labels
    /// or priorities) looks further than the free slots.
    fn window(&self, free_slots: usize) -> usize {
        free_slots
    }

    /// Pairs `ready` builds (oldest first) with `offers` (longest idle
    /// first, each with at least one free slot).
    fn assign(&mut self, ready: &[Build], offers: &[Offer]) -> Vec<Assignment>;
}

/// First in, first out: the oldest build goes to the longest-idle agent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fifo;

impl Scheduler for Fifo {
    fn assign(&mut self, ready: &[Build], offers: &[Offer]) -> Vec<Assignment> {
        let slots = offers
            .iter()
            .flat_map(|o| std::iter::repeat_n(o.agent, o.free_slots as usize));
        ready
            .iter()
            .zip(slots)
            .map(|(b, agent)| Assignment { build: b.id, agent })
            .collect()
    }
}
