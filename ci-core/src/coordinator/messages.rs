//! What goes in and out of the coordinator: dispatches and their failures,
//! heartbeats, results, stop orders, and events for observers.

use crate::model::{
    AgentId, Attempt, Build, BuildId, BuildStatus, Completion, DispatchId, Step, StepId, StepStatus,
};
use crate::protocol::BuildRequest;

/// A step handed to an agent: the caller must send it, and report back
/// if it could not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    /// The agent to send it to.
    pub agent: AgentId,
    /// That agent's base URL.
    pub agent_url: String,
    /// The step, with its new attempt number.
    pub step: Step,
    /// What the wire calls this attempt.
    pub id: DispatchId,
}

impl Dispatch {
    /// The `POST /build` body for the agent.
    pub fn request(&self) -> BuildRequest {
        BuildRequest {
            id: self.id,
            step_id: Some(self.step.id),
            command: self.step.command.clone(),
            hash: self.step.hash.clone(),
            repo: self.step.repo.clone(),
            attempt: Some(self.step.attempt),
            image: self.step.image.clone(),
            timeout_ms: self.step.timeout_ms,
            agent_id: Some(self.agent),
            build: Some(self.step.build),
            step: Some(self.step.name.clone()),
            services: self.step.services.clone(),
            secrets: crate::protocol::SecretEnv::default(),
        }
    }
}

/// Why a dispatch failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DispatchFailure {
    /// The agent could not be reached or answered with a server error: it
    /// is dropped and its builds go back to the queue.
    Unreachable(String),
    /// The agent refused this build as invalid (a 4xx other than
    /// busy/unauthorized): the build fails with the agent's reason rather
    /// than bouncing between agents forever.
    Rejected(String),
    /// The agent is alive but busy with work the coordinator does not know
    /// about (a superseded attempt it was never told of, say): the build
    /// goes back to the queue and the agent gets nothing for one lease.
    Busy(String),
}

/// A heartbeat, or an idle agent's ping.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Heartbeat {
    /// The step being worked on; `None` for an idle agent's ping.
    pub step: Option<StepId>,
    /// The attempt being worked on, if the agent says.
    pub attempt: Option<Attempt>,
    /// The sending agent, if it says (or proved it).
    pub agent: Option<AgentId>,
    /// True if `agent` was proven with the agent's session secret rather
    /// than merely claimed.
    pub verified: bool,
}

/// A result reported by an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The step.
    pub step: StepId,
    /// The attempt that produced it. Agents that do not say are taken to
    /// speak for the latest attempt (the original protocol has no attempts).
    pub attempt: Option<Attempt>,
    /// The reporting agent, if it says (or proved it).
    pub agent: Option<AgentId>,
    /// True if `agent` was proven with the agent's session secret.
    pub verified: bool,
    /// What happened.
    pub completion: Completion,
}

/// An attempt its agent gives back because the machinery failed (the
/// container engine or the disk, not the build): the build goes back to
/// the queue, unless it has been handed back too often.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandBack {
    /// The step.
    pub step: StepId,
    /// The attempt given back.
    pub attempt: Attempt,
    /// The agent, if it says (or proved it).
    pub agent: Option<AgentId>,
    /// True if `agent` was proven with the agent's session secret.
    pub verified: bool,
    /// What failed.
    pub reason: String,
}

/// How a result was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// The result was recorded: the step finished (or, failed with
    /// retries left, went back to the queue).
    Finished(Step),
    /// The same result was already recorded; nothing changed.
    Duplicate(Step),
}

/// Why an agent left the pool.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LeaveReason {
    /// A dispatch to it failed.
    Unreachable,
    /// Its lease ran out: it missed too many heartbeats mid-build.
    MissedHeartbeats,
    /// It pinged while idle, then fell silent.
    Silent,
    /// A new process registered at the same URL.
    Replaced,
    /// It said it was going (graceful shutdown).
    Left,
    /// Its connection to the server closed (the process died, or the
    /// network or the server cut it).
    Disconnected,
}

/// Something that happened, for observers (logs, metrics, live views).
/// Events are facts: each says what changed, once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A build was created.
    Created(BuildId),
    /// A step's attempt was dispatched.
    Started {
        /// The step.
        step: StepId,
        /// Its build.
        build: BuildId,
        /// Its new attempt.
        attempt: Attempt,
        /// The agent.
        agent: AgentId,
        /// Time from creation (or requeue) to dispatch.
        waited_ms: u64,
    },
    /// A running step went back to the queue.
    Requeued {
        /// The step.
        step: StepId,
        /// The attempt that lost its lease.
        attempt: Attempt,
    },
    /// A step finished (it may run again if its build is retried).
    StepFinished {
        /// The step.
        step: StepId,
        /// Its build.
        build: BuildId,
        /// Its final status.
        status: StepStatus,
    },
    /// A build finished: its last step did.
    Finished {
        /// The build.
        build: BuildId,
        /// Its final status.
        status: BuildStatus,
        /// From its first step's start to its last step's end.
        duration_ms: Option<u64>,
    },
    /// An agent joined.
    AgentJoined(AgentId),
    /// A running attempt of a step sent output.
    Output(StepId),
    /// An agent left.
    AgentLeft {
        /// The agent.
        agent: AgentId,
        /// Why.
        reason: LeaveReason,
    },
}

/// What cancelling a build did: it is canceled, and the caller must tell
/// the agents of its running steps to stop them, reporting each with
/// [`Coordinator::stop_delivered`](crate::Coordinator::stop_delivered).
/// Until then each such agent's slot stays taken, so no new step lands on an
/// agent still busy killing the old one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cancel {
    /// The canceled build.
    pub build: Box<Build>,
    /// The attempts to stop.
    pub stops: Vec<StopOrder>,
}

/// An order to stop an attempt on an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopOrder {
    /// The agent.
    pub agent: AgentId,
    /// Its URL.
    pub agent_url: String,
    /// The step.
    pub step: StepId,
    /// The attempt to stop.
    pub attempt: Attempt,
}

/// How a stop order went.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The agent stopped the attempt: its slot is free.
    Yes,
    /// The agent cannot stop work (an agent of the original design, which
    /// has no `/cancel`): it is kept, busy until the attempt's result
    /// arrives (and is refused) or a lease's time has passed.
    Unsupported,
    /// The agent could not be reached: it is dropped.
    Unreachable,
}

impl Stopped {
    /// What an [`AgentLink::stop`](crate::AgentLink::stop) answer means.
    pub fn from_link(answer: &Result<(), DispatchFailure>) -> Stopped {
        match answer {
            Ok(()) => Stopped::Yes,
            Err(DispatchFailure::Rejected(_)) => Stopped::Unsupported,
            Err(_) => Stopped::Unreachable,
        }
    }
}

impl StopOrder {
    /// The `POST /cancel` body for the agent: the attempt's wire id (none
    /// for an attempt that could never have been sent).
    pub fn request(&self) -> Option<crate::protocol::CancelRequest> {
        Some(crate::protocol::CancelRequest {
            id: DispatchId::new(self.step, self.attempt)?,
            attempt: Some(self.attempt),
        })
    }
}

/// The reply to a registration.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The agent's new id.
    pub id: AgentId,
    /// How often it must send heartbeats, in milliseconds.
    pub heartbeat_ms: u64,
}
