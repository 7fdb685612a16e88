//! The one error type of `ci-core`.

use crate::model::{AgentId, Attempt, BuildId, StepId, StepStatus};

/// A boxed error from a lower layer (a store, a runner).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in the core.
///
/// The variants split into three groups, and callers act on the group:
/// - *the caller's fault* (`Invalid`, `BuildNotFound`, `StepNotFound`, `AgentNotFound`,
///   `Superseded`, `Conflict`, `NotRunning`, `Unauthenticated`): retrying the same request
///   cannot succeed;
/// - *transient* (`Store`, `Unavailable`): retrying later may succeed,
///   see [`Error::is_retryable`];
/// - *runner* failures (`Runner`): the build could not run at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A value failed validation (a commit ref, a URL, a setting).
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which value, as the user named it (`hash`, `repo`, ...).
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// No build has this id.
    #[error("build {0} not found")]
    BuildNotFound(BuildId),

    /// No step has this id: the `id` agents are sent.
    #[error("step {0} not found")]
    StepNotFound(StepId),

    /// No project has this name.
    #[error("project {0:?} not found")]
    ProjectNotFound(String),

    /// No registered agent has this id (it may have been dropped).
    #[error("agent {0} not found")]
    AgentNotFound(AgentId),

    /// The step exists but is not running, so it takes no heartbeat.
    #[error("step {id} is not running (status {status})")]
    NotRunning {
        /// The step.
        id: StepId,
        /// Its current status.
        status: StepStatus,
    },

    /// A heartbeat or result for an attempt that a newer one replaced.
    #[error("step {id} attempt {attempt} was superseded by attempt {current}")]
    Superseded {
        /// The step.
        id: StepId,
        /// The attempt the caller spoke for.
        attempt: Attempt,
        /// The attempt that counts now.
        current: Attempt,
    },

    /// The sender did not prove it is the agent the request concerns.
    #[error("{0}")]
    Unauthenticated(String),

    /// The request contradicts the recorded state, e.g. a second,
    /// different result for a build that already completed.
    #[error("{0}")]
    Conflict(String),

    /// The store failed; the operation did not happen and may be retried.
    #[error("store error: {0}")]
    Store(#[source] BoxError),

    /// A runner could not run the build (checkout failed, engine down).
    #[error("{0}")]
    Runner(String),

    /// The service is shutting down or otherwise not taking work.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// Wraps a store's own error.
    pub fn store(err: impl Into<BoxError>) -> Self {
        Error::Store(err.into())
    }

    /// True when the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Store(_) | Error::Unavailable(_))
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes on one line. Some errors' own messages
/// ("error sending request") do not say what went wrong; their causes do.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
