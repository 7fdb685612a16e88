//! Scheduling policy: which queued build goes to which free agent.
//!
//! The [`Coordinator`](crate::Coordinator) asks the policy on every
//! scheduling pass and enforces the invariants itself (a build goes to one
//! agent, an agent gets no more than its free slots), so a policy can only
//! choose, never break the guarantees.

use crate::model::{AgentId, Build, BuildId};
use crate::pool::Agent;

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
pub trait Scheduler: Send {
    /// Pairs `queued` builds (oldest first) with `free` agents (longest idle
    /// first, each with at least one free slot).
    fn assign(&mut self, queued: &[Build], free: &[Agent]) -> Vec<Assignment>;
}

/// First in, first out: the oldest build goes to the longest-idle agent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fifo;

impl Scheduler for Fifo {
    fn assign(&mut self, queued: &[Build], free: &[Agent]) -> Vec<Assignment> {
        let slots = free
            .iter()
            .flat_map(|a| std::iter::repeat_n(a.id, a.free_slots() as usize));
        queued
            .iter()
            .zip(slots)
            .map(|(b, agent)| Assignment { build: b.id, agent })
            .collect()
    }
}
