//! Scheduling policy: which ready step goes to which free agent.
//!
//! On every scheduling pass the [`Coordinator`](crate::Coordinator) gives
//! the policy a window of ready work (oldest first) and the offers of the
//! agents that can take some, and enforces the invariants itself (a build
//! goes to one agent, an agent gets no more than its free slots, labels
//! match), so a policy can only choose, never break the guarantees.

use crate::model::{AgentId, Step, StepId};
use crate::pool::Offer;

/// One step to start on one agent.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The step.
    pub step: StepId,
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
    fn assign(&mut self, ready: &[Step], offers: &[Offer]) -> Vec<Assignment>;
}

/// First in, first out: the oldest build goes to the longest-idle agent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fifo;

impl Scheduler for Fifo {
    fn assign(&mut self, ready: &[Step], offers: &[Offer]) -> Vec<Assignment> {
        let mut free: Vec<u32> = offers.iter().map(|o| o.free_slots).collect();
        let mut left: u32 = free.iter().sum();
        let mut out = Vec::new();
        for b in ready {
            if left == 0 {
                break;
            }
            // The longest-idle agent with a free slot and every label.
            let pick = offers
                .iter()
                .zip(free.iter_mut())
                .find(|(o, f)| **f > 0 && o.labels.satisfy(&b.labels));
            if let Some((o, f)) = pick {
                *f -= 1;
                left -= 1;
                out.push(Assignment {
                    step: b.id,
                    agent: o.agent,
                });
            }
        }
        out
    }
}
