//! The wire protocol: JSON bodies exchanged between server, agents and users.
//!
//! Field names are the original design's. Everything added since is
//! optional, so a peer that speaks only the original fields still works, and
//! unknown fields are ignored so newer peers can talk to older ones.
//!
//! | who calls | endpoint | body | reply |
//! |---|---|---|---|
//! | agent → server | `POST /notify_agent` | [`NotifyAgent`] | [`NotifyAgentReply`] |
//! | agent → server | `POST /notify_agent_alive` | [`NotifyAgentAlive`] | 200, 404, 409 |
//! | agent → server | `POST /notify_build_result` | [`NotifyBuildResult`] | 200, 404, 409 |
//! | server → agent | `POST /build` | [`BuildRequest`] | 200 at once |
//! | user → server | `POST /build`, `POST /api/builds` | [`CreateBuild`] | 201 [`BuildView`] |

use std::fmt;

use serde::de::IntoDeserializer;
use serde::{Deserialize, Deserializer, Serialize};

use crate::model::{
    AgentId, Attempt, Build, BuildId, BuildLog, BuildStatus, DispatchId, Labels, Service, Step, StepId,
    StepStatus,
};
use crate::pool::Agent;

/// Size limits of the wire, defined once for the server, the agents and
/// the clients, so that nothing one side accepts is refused by the other.
pub mod limits {
    use crate::model::limits::{
        MAX_BRANCH, MAX_COMMAND, MAX_IMAGE, MAX_LOG, MAX_SERVICES, MAX_SERVICE_NAME, MAX_SERVICE_TEXT,
        MAX_STEP_NAME,
    };
    use crate::model::{CommitRef, RepoUrl};

    /// Bytes JSON may spend on one character: `\u001b` for a control
    /// character; `\ud83d\ude00`, 12 bytes, for one outside the BMP.
    const JSON_CHAR: u64 = 12;

    /// Largest body of an ordinary request (a build to create, a
    /// registration, a heartbeat): a command of [`MAX_COMMAND`] characters
    /// however JSON escapes them, with room to spare.
    pub const MAX_BODY: u64 = 1024 * 1024;

    /// Largest `POST /build` an agent takes: every field at its limit, each
    /// character escaped as JSON would at worst.
    pub const MAX_DISPATCH_BODY: u64 = JSON_CHAR
        * (MAX_COMMAND as u64
            + RepoUrl::MAX_LEN as u64
            + CommitRef::MAX_LEN as u64
            + MAX_IMAGE as u64
            + MAX_STEP_NAME as u64
            + MAX_SERVICES as u64 * (MAX_SERVICE_NAME as u64 + MAX_IMAGE as u64 + 64)
            + MAX_SERVICE_TEXT as u64 * 2)
        + 4096;

    /// Largest `POST /cancel` an agent takes.
    pub const MAX_CANCEL_BODY: u64 = 16 * 1024;

    /// Largest build result: two capped logs plus slack.
    pub const MAX_RESULT_BODY: u64 = 2 * MAX_LOG as u64 + 64 * 1024;

    const _: () = assert!(
        MAX_DISPATCH_BODY <= 2 * MAX_BODY,
        "a dispatch stays near an ordinary body"
    );
    const _: () = assert!(JSON_CHAR * (MAX_COMMAND as u64 + MAX_BRANCH as u64) < MAX_BODY);
}

// === an agent's connection (extension) ===

/// Where an agent opens its connection: `GET` upgraded to a WebSocket,
/// with the agent token (or the agent's own) as a bearer token.
pub const CONNECT_PATH: &str = "/agent/connect";

/// One message over an agent's connection, a JSON text message.
///
/// The connection carries the HTTP protocol's requests both ways, each
/// answered by one [`Frame::Response`] with the same `id` (numbered by the
/// side that asks):
/// - agent → server: the `POST`s of this module (`/notify_agent`,
///   `/notify_agent_alive`, `/notify_build_result`, `/notify_build_log`,
///   `/notify_build_handback`, `/notify_agent_leave`), with the session
///   secret the `X-Agent-Secret` header would carry;
/// - server → agent: `/build` and `/cancel`.
///
/// A request marked `quiet` is answered only if it fails: an idle agent's
/// ping, one a second from every agent, needs no answer when all is well,
/// and not sending one halves what a fleet's pings cost the server. Its
/// sender learns of a refusal (the server forgot the agent) from the
/// failure's response. A server that does not know the mark answers
/// anyway, and a success is ignored.
///
/// A response's `status` and `body` are what the HTTP answer would be, so
/// both ends keep one meaning for every message. What differs is the
/// connection itself: when it closes, the server requeues the builds of
/// the agent registered over it at once, instead of waiting for their
/// leases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    /// A request.
    Request {
        /// Numbered by the side that asks; the response carries it back.
        id: u64,
        /// The HTTP path it stands for, e.g. `/notify_agent_alive`.
        path: String,
        /// The session secret (`X-Agent-Secret`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        /// The JSON body.
        body: serde_json::Value,
        /// Answer only a failure.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        quiet: bool,
    },
    /// The answer to the other side's request `id`.
    Response {
        /// The request's id.
        id: u64,
        /// The HTTP status it stands for.
        status: u16,
        /// The JSON body (`{"error": ...}` for a failure).
        body: serde_json::Value,
    },
}

/// The pseudo-URL of an agent that connected as `name`: it is reached
/// over its connection, never at an address.
pub fn connected_url(name: &str) -> String {
    format!("{CONNECTED_SCHEME}{name}")
}

/// How [`connected_url`]s begin.
pub const CONNECTED_SCHEME: &str = "connected://";

// === agent → server ===

/// `POST /notify_agent`: an agent announces itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyAgent {
    /// How the server reaches the agent: `http://agent-01`, `agent-01`, or
    /// an IP. When absent, the server uses the request's source address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The agent's port, as a string or a number. Required over HTTP;
    /// absent (0 here) for an agent that connects ([`Frame`]).
    #[serde(
        default,
        deserialize_with = "port_from_string_or_number",
        skip_serializing_if = "is_zero"
    )]
    pub port: u16,
    /// Extension: ask for a session secret, to be presented in the
    /// `X-Agent-Secret` header from then on. Only the holder of the secret
    /// can then heartbeat or report for this agent's builds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub session: bool,
    /// Extension: how many builds the agent runs at once (default 1).
    #[serde(
        default,
        deserialize_with = "opt_integral",
        skip_serializing_if = "Option::is_none"
    )]
    pub capacity: Option<u32>,
    /// Extension: what the agent can run (for steps that ask for labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    /// Extension: the agent pings `/notify_agent_alive` with its
    /// `agentId` every interval while idle, so its silence from
    /// registration on means it is gone. An agent that does not say so is
    /// only dropped for silence once it has pinged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pings: bool,
    /// Extension, for an agent that connects to the server
    /// ([`Frame`]): a name that stays the same across its restarts (its
    /// work directory's), under which a new registration replaces the last
    /// one. Letters, digits, `.`, `_` and `-`, at most 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Extension: the agent's version, for `GET /api/agents`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl NotifyAgent {
    /// Most bytes of an agent's name or version.
    pub const MAX_NAME: usize = 64;

    /// An agent's name or version, if well formed: letters, digits, `.`,
    /// `_`, `-` and `+`, 1 to [`NotifyAgent::MAX_NAME`] bytes.
    pub fn check_name(name: &str) -> bool {
        (1..=Self::MAX_NAME).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
    }

    /// Most builds an agent may say it runs at once.
    pub const MAX_CAPACITY: u32 = 1024;
}

/// Reply to [`NotifyAgent`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyAgentReply {
    /// The agent's id.
    pub id: AgentId,
    /// Heartbeat interval in milliseconds (the original server sends it as
    /// a string, `"500"`).
    #[serde(deserialize_with = "integral_or_string")]
    pub timeout: u64,
    /// Extension: the server speaks this protocol's extensions (attempts,
    /// agent ids, pings, live logs, hand-backs, leaves, cancel). A server
    /// that does not say so (the original design's) gets only the original
    /// messages and fields.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub extensions: bool,
    /// Extension: the session secret, when the agent asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Extension, for an agent that connected with the shared agent token:
    /// its own token, to connect with from now on (kept in its work
    /// directory). Revoking it (`DELETE /api/agents/{id}`) shuts that
    /// agent out alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// `POST /notify_agent_alive`: a heartbeat while building, or (extension)
/// an idle agent's ping with only `agentId`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyAgentAlive {
    /// The attempt being run (the `id` of its `POST /build`). Absent on an
    /// idle ping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<DispatchId>,
    /// Extension: the attempt being run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<Attempt>,
    /// Extension: the sending agent.
    #[serde(rename = "agentId", default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
}

/// `POST /notify_build_result`: the outcome of a build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyBuildResult {
    /// The attempt (the `id` of its `POST /build`).
    pub id: DispatchId,
    /// Exit status; 0 is success, -1 means the build could not run.
    #[serde(deserialize_with = "integral")]
    pub status: i32,
    /// Captured standard output.
    #[serde(default)]
    pub stdout: String,
    /// Captured standard error.
    #[serde(default)]
    pub stderr: String,
    /// Extension: the attempt that produced this result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<Attempt>,
    /// Extension: the reporting agent.
    #[serde(rename = "agentId", default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
}

/// Extension, `POST /notify_build_log`: live output of a running attempt,
/// in numbered pieces so that a retry never duplicates or drops text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyBuildLog {
    /// The attempt (the `id` of its `POST /build`).
    pub id: DispatchId,
    /// The attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<Attempt>,
    /// The sending agent.
    #[serde(rename = "agentId", default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
    /// The pieces, in order.
    pub pieces: Vec<WirePiece>,
}

/// One piece of live output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WirePiece {
    /// Position in the attempt's output, from 0.
    #[serde(deserialize_with = "integral")]
    pub seq: u64,
    /// `stdout` or `stderr`.
    pub stream: crate::runner::Stream,
    /// The text.
    pub data: String,
}

/// Extension, `POST /notify_build_handback`: an attempt the agent's
/// machinery could not run (its container engine or disk failed, not the
/// build); the build goes back to the queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyBuildHandback {
    /// The attempt (the `id` of its `POST /build`).
    pub id: DispatchId,
    /// The attempt given back.
    pub attempt: Attempt,
    /// The sending agent.
    #[serde(rename = "agentId", default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
    /// What failed.
    pub reason: String,
}

/// Extension, `POST /notify_agent_leave`: an agent going away on purpose;
/// what it holds goes back to the queue at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyAgentLeave {
    /// The leaving agent.
    #[serde(rename = "agentId")]
    pub agent_id: AgentId,
}

// === server → agent ===

/// Extension, `POST /cancel` on an agent: stop this build. Answers once the
/// work is dead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    /// The attempt (the `id` of its `POST /build`).
    pub id: DispatchId,
    /// The attempt, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<Attempt>,
}

/// `POST /build` on an agent: run this build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRequest {
    /// This attempt of the step: what the agent's heartbeats, result, log
    /// and hand-back about it say as `id`.
    pub id: DispatchId,
    /// Extension: the step's id, as the API shows it.
    #[serde(rename = "stepId", default, skip_serializing_if = "Option::is_none")]
    pub step_id: Option<StepId>,
    /// Shell command to run.
    pub command: String,
    /// Commit or ref to check out.
    pub hash: String,
    /// Repository URL.
    pub repo: String,
    /// Extension: the attempt number, to echo on heartbeats and the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<Attempt>,
    /// Extension: container image for the docker runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Extension: build timeout in milliseconds.
    #[serde(
        rename = "timeoutMs",
        default,
        deserialize_with = "opt_integral",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout_ms: Option<u64>,
    /// Extension: the id the agent was given when this was dispatched. A
    /// dispatch can reach an agent before the reply to its registration
    /// does; the agent waits until it knows this id, so it never speaks for
    /// the build under an id the server has replaced.
    #[serde(rename = "agentId", default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
    /// Extension: the build the step belongs to (`id` names the step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildId>,
    /// Extension: the step's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Extension: containers to run beside it, on a network of its own
    /// (Docker runner).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    /// Extension: the project's secrets the step lists, as environment
    /// variables; the agent masks their values in the output.
    #[serde(default, skip_serializing_if = "SecretEnv::is_empty")]
    pub secrets: SecretEnv,
}

/// Secret values by variable name. Shown by `Debug` as names only.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretEnv(pub std::collections::BTreeMap<String, String>);

impl SecretEnv {
    /// True if there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

// === user → server ===

/// `POST /api/builds` (and the original `POST /build`): create a build.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateBuild {
    /// Commit SHA (4 to 64 hex digits) or ref name. Required.
    pub hash: String,
    /// Command to run; the server's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Branch, for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// Container image for the docker runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Build timeout in milliseconds.
    #[serde(
        rename = "timeoutMs",
        default,
        deserialize_with = "opt_integral",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout_ms: Option<u64>,
    /// Labels the agent must have, all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    /// What started it, for the pipeline's `when: {event}`: `manual` (a
    /// person, as `ci submit` says) or `api` (a program; the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<crate::pipeline::Trigger>,
    /// The project; the default project (the server's `REPO`) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

/// A build as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildView {
    /// Build number.
    pub id: BuildId,
    /// Commit or ref.
    pub hash: String,
    /// Command.
    pub command: String,
    /// Repository, without credentials.
    pub repo: String,
    /// Branch, if given.
    pub branch: Option<String>,
    /// Image, if given.
    pub image: Option<String>,
    /// Timeout, if given.
    pub timeout_ms: Option<u64>,
    /// Status.
    pub status: BuildStatus,
    /// URL of the agent of the latest attempt.
    pub agent: Option<String>,
    /// Id of that agent.
    pub agent_id: Option<AgentId>,
    /// Latest attempt number; 0 before the first dispatch.
    pub attempt: Attempt,
    /// Exit status of the accepted result.
    pub exit_code: Option<i32>,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// RFC 3339 start of the latest attempt.
    pub started_at: Option<String>,
    /// RFC 3339 finish time.
    pub finished_at: Option<String>,
    /// Run time of the accepted attempt.
    pub duration_ms: Option<u64>,
    /// Labels the agent must have.
    #[serde(default)]
    pub labels: Labels,
    /// Why a queued build is not running yet, when the server knows
    /// (`no agent has os=windows`).
    #[serde(default)]
    pub waiting: Option<String>,
    /// Its steps, every step after the steps it depends on.
    #[serde(default)]
    pub steps: Vec<StepView>,
    /// Its project.
    #[serde(default)]
    pub project: String,
    /// Its number in the project (`web#42`).
    #[serde(default)]
    pub number: u64,
    /// What started it: push, pull_request, tag, manual, api; none for
    /// builds older than projects.
    #[serde(default)]
    pub event: Option<crate::pipeline::Trigger>,
    /// The commit's subject line.
    #[serde(default)]
    pub subject: Option<String>,
    /// The commit's author.
    #[serde(default)]
    pub author: Option<String>,
    /// Code from outside the project (a pull request from a fork): its
    /// steps get no secrets.
    #[serde(default)]
    pub untrusted: bool,
}

impl BuildView {
    /// Says why its queued steps cannot start on any of `agents`: none has
    /// all of their labels.
    pub fn explain_wait(&mut self, agents: &[crate::pool::Agent]) {
        for step in &mut self.steps {
            if step.status != StepStatus::Queued || step.labels.is_empty() {
                continue;
            }
            if !agents.iter().any(|a| a.labels.satisfy(&step.labels)) {
                let wanted: Vec<&str> = step.labels.iter().collect();
                step.waiting = Some(match wanted.as_slice() {
                    [one] => format!("no agent has {one}"),
                    all => format!("no agent has all of {}", all.join(", ")),
                });
            }
        }
        if self.status.is_finished() {
            return;
        }
        self.waiting = match self.steps.as_slice() {
            [one] => one.waiting.clone(),
            steps => steps
                .iter()
                .find_map(|s| s.waiting.as_ref().map(|w| format!("step {}: {w}", s.name))),
        };
    }
}

/// A step as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepView {
    /// Its id: what its agent is sent as `id`.
    pub id: StepId,
    /// Unique in the build.
    pub name: String,
    /// Status.
    pub status: StepStatus,
    /// Its script.
    pub command: String,
    /// Image, if any.
    pub image: Option<String>,
    /// Longest it may run, in milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// URL of the agent of the latest attempt.
    pub agent: Option<String>,
    /// Id of that agent.
    pub agent_id: Option<AgentId>,
    /// Latest attempt number; 0 before the first dispatch.
    pub attempt: Attempt,
    /// Exit status of the accepted result.
    pub exit_code: Option<i32>,
    /// RFC 3339 start of the latest attempt.
    pub started_at: Option<String>,
    /// RFC 3339 finish time.
    pub finished_at: Option<String>,
    /// Run time of the accepted attempt.
    pub duration_ms: Option<u64>,
    /// Names of the steps that must succeed first.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Its matrix combination.
    #[serde(default)]
    pub matrix: std::collections::BTreeMap<String, String>,
    /// Labels the agent must have.
    #[serde(default)]
    pub labels: Labels,
    /// Its failure does not fail the build.
    #[serde(default)]
    pub allow_failure: bool,
    /// Why it is queued and not running, when the server knows.
    #[serde(default)]
    pub waiting: Option<String>,
    /// Containers beside it.
    #[serde(default)]
    pub services: Vec<Service>,
}

impl From<&Step> for StepView {
    fn from(s: &Step) -> Self {
        StepView {
            id: s.id,
            name: s.name.clone(),
            status: s.status,
            command: s.command.clone(),
            image: s.image.clone(),
            timeout_ms: s.timeout_ms,
            agent: s.agent_url.clone(),
            agent_id: s.agent_id,
            attempt: s.attempt,
            exit_code: s.exit_code,
            started_at: s.started_at.map(|t| t.to_rfc3339()),
            finished_at: s.finished_at.map(|t| t.to_rfc3339()),
            duration_ms: s.duration_ms(),
            depends_on: s.depends_on.clone(),
            matrix: s.matrix.clone(),
            labels: s.labels.clone(),
            allow_failure: s.allow_failure,
            waiting: None,
            services: s.services.clone(),
        }
    }
}

impl From<&Build> for BuildView {
    fn from(b: &Build) -> Self {
        BuildView {
            id: b.id,
            hash: b.hash.clone(),
            command: b.command.clone(),
            repo: crate::model::redact_url(&b.repo).into_owned(),
            branch: b.branch.clone(),
            image: b.image.clone(),
            timeout_ms: b.timeout_ms,
            status: b.status,
            agent: b.agent_url.clone(),
            agent_id: b.agent_id,
            attempt: b.attempt,
            exit_code: b.exit_code,
            created_at: b.created_at.to_rfc3339(),
            started_at: b.started_at.map(|t| t.to_rfc3339()),
            finished_at: b.finished_at.map(|t| t.to_rfc3339()),
            duration_ms: b.duration_ms(),
            labels: b.labels.clone(),
            waiting: None,
            steps: b.steps.iter().map(StepView::from).collect(),
            project: b.source.project.clone(),
            number: b.number,
            event: b.source.event,
            subject: b.source.subject.clone(),
            author: b.source.author.clone(),
            untrusted: b.source.untrusted,
        }
    }
}

// === projects ===

/// `POST /api/projects` (all but `name` and `repo` optional) and
/// `PATCH /api/projects/{name}` (each field given is changed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProjectSpec {
    /// Its name: 1 to 64 of `A-Z a-z 0-9 . _ -`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// The main branch (default `main`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_branch: Option<String>,
    /// Seconds between polls of the remote (default 60; 0: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<u32>,
    /// The secret webhooks are signed with; empty: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
    /// Branch patterns pushes must match to start builds; empty: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branches: Option<Vec<String>>,
    /// A newer commit of a branch cancels the branch's unfinished build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_previous: Option<bool>,
    /// Where commit statuses go; `null` removes it.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub forge: Option<Option<ForgeSpec>>,
}

/// A forge as set: its token is write-only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForgeSpec {
    /// `github`, `gitea` (also Forgejo) or `gitlab`.
    pub kind: crate::project::ForgeKind,
    /// The API's base URL.
    pub url: String,
    /// `owner/name`; for GitLab the project id or path.
    pub repo: String,
    /// The token statuses are posted with (kept sealed, never shown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Absent: `None`; `null`: `Some(None)`.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A project as the API shows it: no secret, only whether one is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectView {
    /// Its name.
    pub name: String,
    /// The repository, without credentials.
    pub repo: String,
    /// The main branch.
    pub default_branch: String,
    /// Seconds between polls; 0: off.
    pub poll_interval: u32,
    /// Branch patterns pushes must match.
    pub branches: Vec<String>,
    /// A newer commit cancels the branch's unfinished build.
    pub cancel_previous: bool,
    /// Whether webhooks are checked against a secret.
    pub webhook_secret: bool,
    /// Where commit statuses go.
    pub forge: Option<ForgeView>,
    /// RFC 3339.
    pub created_at: String,
    /// The latest build of each branch, newest first.
    #[serde(default)]
    pub last_builds: Vec<BranchStatus>,
}

/// A forge as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgeView {
    /// Which API.
    pub kind: crate::project::ForgeKind,
    /// Its base URL.
    pub url: String,
    /// The repository there.
    pub repo: String,
    /// Whether a token is set.
    pub token: bool,
}

/// A branch's latest build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BranchStatus {
    /// The branch.
    pub branch: String,
    /// The build's id.
    pub id: BuildId,
    /// Its number in the project.
    pub number: u64,
    /// Its status.
    pub status: BuildStatus,
    /// The commit.
    pub hash: String,
    /// RFC 3339 creation time.
    pub created_at: String,
}

/// `GET /api/projects` reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectList {
    /// Every project, by name.
    pub projects: Vec<ProjectView>,
}

/// `POST /api/projects/{name}/secrets`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    /// A variable name.
    pub name: String,
    /// The value; never shown again.
    pub value: String,
}

impl std::fmt::Debug for SecretSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretSpec")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// `GET /api/projects/{name}/secrets` reply: names only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretList {
    /// The secrets, by name.
    pub secrets: Vec<SecretEntry>,
}

/// A secret as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretEntry {
    /// Its name.
    pub name: String,
    /// RFC 3339: when it was last set.
    pub updated_at: String,
}

/// `GET /api/builds` reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildList {
    /// The page of builds, newest first.
    pub builds: Vec<BuildView>,
    /// The page size asked for.
    pub limit: usize,
    /// The offset asked for.
    pub offset: usize,
}

/// `GET /api/builds/{id}/log` and `/api/builds/{id}/steps/{step}/log`
/// reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogView {
    /// The build.
    pub id: BuildId,
    /// The step.
    #[serde(default)]
    pub step: String,
    /// The attempt the output belongs to.
    pub attempt: Attempt,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// True for the log of the accepted result; false for output streamed
    /// by an attempt that still runs, or that was lost.
    #[serde(default)]
    pub complete: bool,
    /// Where an incomplete log stopped and why, when the attempt is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl LogView {
    /// The view of a stored log of `step`.
    pub fn new(step: &Step, log: BuildLog) -> LogView {
        let note = LogView::note(step, log.attempt, log.complete);
        LogView {
            id: step.build,
            step: step.name.clone(),
            attempt: log.attempt,
            stdout: log.stdout,
            stderr: log.stderr,
            complete: log.complete,
            note,
        }
    }

    /// Where an incomplete log of `attempt` of `step` stopped and why, once
    /// that attempt is over.
    pub fn note(step: &Step, attempt: Attempt, complete: bool) -> Option<String> {
        (!complete && (attempt < step.attempt || step.status.is_finished())).then(|| {
            if step.status == StepStatus::Canceled && attempt == step.attempt {
                "the log stops here: the build was canceled".to_owned()
            } else {
                format!(
                    "the log stops here: attempt {} lost its agent; attempt {} took over",
                    attempt,
                    attempt.next()
                )
            }
        })
    }
}

/// Agent status as the API shows it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    /// Runs nothing.
    Idle,
    /// Runs a build.
    Busy,
}

/// An agent as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    /// Agent id.
    pub id: AgentId,
    /// Base URL.
    pub url: String,
    /// Idle or busy.
    pub status: AgentStatus,
    /// RFC 3339 time it was last heard from.
    pub last_seen: String,
    /// The build of a step it runs, if any (the first it took).
    pub build: Option<BuildId>,
    /// The builds of every step it runs.
    #[serde(default)]
    pub builds: Vec<BuildId>,
    /// Every step it runs, by the `id` agents are sent.
    #[serde(default)]
    pub steps: Vec<StepId>,
    /// How many builds it runs at once.
    #[serde(default = "one")]
    pub capacity: u32,
    /// What it can run.
    #[serde(default)]
    pub labels: Labels,
    /// It is connected to the server (it connects out): its connection
    /// closing requeues its builds at once.
    #[serde(default)]
    pub connected: bool,
    /// Where its connection comes from, for an agent that connects; for
    /// the others, see `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The version it says it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The id of its own credential (`DELETE /api/agents/{id}` revokes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<i64>,
}

fn one() -> u32 {
    1
}

impl AgentView {
    /// The view of `agent`, whose steps belong to `builds` (in the order
    /// of its steps).
    pub fn with_builds(agent: &Agent, builds: Vec<BuildId>) -> AgentView {
        AgentView {
            build: builds.first().copied(),
            builds,
            ..AgentView::from(agent)
        }
    }
}

/// Without the builds of its steps: see [`AgentView::with_builds`].
impl From<&Agent> for AgentView {
    fn from(a: &Agent) -> Self {
        AgentView {
            id: a.id,
            url: a.url.clone(),
            status: if a.is_idle() {
                AgentStatus::Idle
            } else {
                AgentStatus::Busy
            },
            last_seen: a.last_seen.to_rfc3339(),
            build: None,
            builds: Vec::new(),
            steps: a.running.clone(),
            capacity: a.capacity,
            labels: a.labels.clone(),
            connected: false,
            address: None,
            version: None,
            credential: None,
        }
    }
}

/// An error reply: `{"error": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a human.
    pub error: String,
}

// === numbers ===

/// Deserializes an integer, also from a float with no fractional part
/// (`7.0`): JSON does not tell them apart, and JSON Schema calls both
/// integers.
pub(crate) fn integral<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64> + TryFrom<u64>,
{
    struct V<T>(std::marker::PhantomData<T>);

    impl<T: TryFrom<i64> + TryFrom<u64>> serde::de::Visitor<'_> for V<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an integer in range")
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
            T::try_from(v).map_err(|_| E::custom(format!("{v} is out of range")))
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
            T::try_from(v).map_err(|_| E::custom(format!("{v} is out of range")))
        }

        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<T, E> {
            // N.B.: an integral float in [-2^63, 2^63) casts to i64
            // exactly; the target type then checks its own range.
            const LIMIT: f64 = 9_223_372_036_854_775_808.0; // 2^63
            if v.fract() == 0.0 && (-LIMIT..LIMIT).contains(&v) {
                self.visit_i64(v as i64)
            } else {
                Err(E::custom(format!("{v} is not an integer")))
            }
        }
    }

    d.deserialize_any(V(std::marker::PhantomData))
}

/// [`integral`], also from a string of digits (`"500"`), as the original
/// server writes its heartbeat interval.
fn integral_or_string<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64> + TryFrom<u64>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Text(String),
        Number(serde_json::Value),
    }
    match Either::deserialize(d)? {
        Either::Text(s) => {
            let v: u64 = s
                .trim()
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a whole number")))?;
            T::try_from(v).map_err(|_| serde::de::Error::custom(format!("{v} is out of range")))
        }
        Either::Number(v) => integral(v).map_err(serde::de::Error::custom),
    }
}

/// [`integral`] for optional fields (absent or `null` is `None`).
fn opt_integral<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64> + TryFrom<u64>,
{
    #[derive(Deserialize)]
    struct W<T: TryFrom<i64> + TryFrom<u64>>(#[serde(deserialize_with = "integral")] T);
    Ok(Option::<W<T>>::deserialize(d)?.map(|w| w.0))
}

// === port: string or number ===

fn is_zero(port: &u16) -> bool {
    *port == 0
}

fn port_from_string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    struct PortVisitor;

    impl serde::de::Visitor<'_> for PortVisitor {
        type Value = u16;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a port number 1-65535, as a number or a string")
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u16, E> {
            u16::try_from(v)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| E::custom(format!("port {v} is out of range 1-65535")))
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u16, E> {
            u64::try_from(v)
                .map_err(|_| E::custom(format!("port {v} is out of range 1-65535")))
                .and_then(|v| self.visit_u64(v))
        }

        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<u16, E> {
            integral::<serde::de::value::F64Deserializer<E>, u64>(v.into_deserializer())
                .and_then(|n| self.visit_u64(n))
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u16, E> {
            let n: u64 = v
                .trim()
                .parse()
                .map_err(|_| E::custom(format!("port {v:?} is not a number")))?;
            self.visit_u64(n)
        }
    }

    d.deserialize_any(PortVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_as_string_or_number() {
        let a: NotifyAgent = serde_json::from_str(r#"{"host":"http://agent-01","port":"3001"}"#).unwrap();
        let b: NotifyAgent = serde_json::from_str(r#"{"host":"agent-01","port":3001}"#).unwrap();
        assert_eq!((a.port, b.port), (3001, 3001));
        let c: NotifyAgent = serde_json::from_str(r#"{"port":3001}"#).unwrap();
        assert_eq!(c.host, None);
        for bad in [
            r#"{"port":0}"#,
            r#"{"port":"70000"}"#,
            r#"{"port":-1}"#,
            r#"{"port":"x"}"#,
            r#"{"port":1.5}"#,
        ] {
            assert!(serde_json::from_str::<NotifyAgent>(bad).is_err(), "{bad}");
        }
        // Absent for an agent that connects; `POST /notify_agent` refuses it.
        let connected: NotifyAgent = serde_json::from_str("{}").unwrap();
        assert_eq!(connected.port, 0);
    }

    #[test]
    fn registration_extensions_are_optional_and_round_trip() {
        let original: NotifyAgent = serde_json::from_str(r#"{"host":"agent-01","port":3001}"#).unwrap();
        assert_eq!(
            (original.capacity, original.labels.as_ref(), original.pings),
            (None, None, false)
        );
        assert_eq!(
            serde_json::to_value(&original).unwrap(),
            serde_json::json!({"host": "agent-01", "port": 3001}),
            "an original registration gains no fields"
        );
        let full: NotifyAgent = serde_json::from_str(
            r#"{"port":3001,"session":true,"capacity":4,"labels":["linux","docker"],"pings":true}"#,
        )
        .unwrap();
        assert_eq!((full.capacity, full.pings), (Some(4), true));
        assert_eq!(full.labels, Some(Labels::parse(["docker", "linux"]).unwrap()));
        let again: NotifyAgent = serde_json::from_value(serde_json::to_value(&full).unwrap()).unwrap();
        assert_eq!(again, full);
    }

    #[test]
    fn integers_may_arrive_as_integral_floats() {
        let r: NotifyBuildResult = serde_json::from_str(r#"{"id":7.0,"status":-1.0,"attempt":2.0}"#).unwrap();
        assert_eq!((r.id, r.status, r.attempt), (DispatchId(7), -1, Some(Attempt(2))));
        let c: CreateBuild = serde_json::from_str(r#"{"hash":"abcd","timeoutMs":1000.0}"#).unwrap();
        assert_eq!(c.timeout_ms, Some(1000));
        for bad in [
            r#"{"id":7.5,"status":0}"#,
            r#"{"id":1e300,"status":0}"#,
            r#"{"id":1,"status":4294967296}"#,
        ] {
            assert!(serde_json::from_str::<NotifyBuildResult>(bad).is_err(), "{bad}");
        }
        // Found by the fuzzer: without exact float parsing this read as ...247.25.
        let big: NotifyAgentAlive = serde_json::from_str(r#"{"id":-2251799813685247.0}"#).unwrap();
        assert_eq!(big.id, Some(DispatchId(-2251799813685247)));
        // Found by the fuzzer: -(2^53 - 1), the most negative safe integer.
        let safe: NotifyAgentAlive = serde_json::from_str(r#"{"id":-9007199254740991.0}"#).unwrap();
        assert_eq!(safe.id, Some(DispatchId(-9_007_199_254_740_991)));
        let huge = r#"{"id":1,"status":0,"attempt":1e19}"#;
        assert!(
            serde_json::from_str::<NotifyBuildResult>(huge).is_err(),
            "beyond u32"
        );
        let none: CreateBuild = serde_json::from_str(r#"{"hash":"abcd","timeoutMs":null}"#).unwrap();
        assert_eq!(none.timeout_ms, None);
    }

    #[test]
    fn original_fields_suffice() {
        let hb: NotifyAgentAlive = serde_json::from_str(r#"{"id":7}"#).unwrap();
        assert_eq!(hb.id, Some(DispatchId(7)));
        let r: NotifyBuildResult =
            serde_json::from_str(r#"{"id":7,"status":1,"stdout":"o","stderr":"e"}"#).unwrap();
        assert_eq!((r.status, r.attempt, r.agent_id), (1, None, None));
        let req: BuildRequest =
            serde_json::from_str(r#"{"id":1,"command":"make","hash":"abc1","repo":"/r","extra":true}"#)
                .unwrap();
        assert_eq!(req.attempt, None);
        let create: CreateBuild = serde_json::from_str(r#"{"hash":"abc1","command":"make"}"#).unwrap();
        assert_eq!(create.command.as_deref(), Some("make"));
    }

    #[test]
    fn the_original_server_s_registration_reply_is_read() {
        let r: NotifyAgentReply = serde_json::from_str(r#"{"id": 1, "timeout": "500"}"#).unwrap();
        assert_eq!((r.id, r.timeout, r.extensions), (AgentId(1), 500, false));
        let r: NotifyAgentReply =
            serde_json::from_str(r#"{"id": 2, "timeout": 1000, "extensions": true}"#).unwrap();
        assert_eq!((r.timeout, r.extensions), (1000, true));
        assert!(serde_json::from_str::<NotifyAgentReply>(r#"{"id": 1, "timeout": "soon"}"#).is_err());
    }

    #[test]
    fn extensions_use_the_documented_names() {
        let hb = NotifyAgentAlive {
            id: Some(DispatchId(1)),
            attempt: Some(Attempt(2)),
            agent_id: Some(AgentId(3)),
        };
        assert_eq!(
            serde_json::to_string(&hb).unwrap(),
            r#"{"id":1,"attempt":2,"agentId":3}"#
        );
        let req = BuildRequest {
            secrets: Default::default(),
            id: DispatchId(1),
            step_id: None,
            command: "make".into(),
            hash: "abc1".into(),
            repo: "/r".into(),
            attempt: None,
            image: None,
            timeout_ms: None,
            agent_id: None,
            build: None,
            step: None,
            services: Vec::new(),
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"id":1,"command":"make","hash":"abc1","repo":"/r"}"#,
            "a server talking to an original agent sends only original fields"
        );
        let with_service = BuildRequest {
            services: vec![Service {
                name: "db".into(),
                image: crate::model::ImageRef::parse("postgres:15").unwrap(),
                env: [("POSTGRES_PASSWORD".to_owned(), "x".to_owned())].into(),
                command: Vec::new(),
            }],
            ..req
        };
        assert_eq!(
            serde_json::to_string(&with_service).unwrap(),
            r#"{"id":1,"command":"make","hash":"abc1","repo":"/r","services":[{"name":"db","image":"postgres:15","env":{"POSTGRES_PASSWORD":"x"}}]}"#
        );
    }
}
