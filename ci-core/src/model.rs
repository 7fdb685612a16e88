//! Domain types: builds, attempts, agents, and the validated values they
//! are made of.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::error::{Error, Result};

// === ids ===

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                crate::protocol::integral(d).map($name)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// A build number: the store's primary key, unique and never reused.
    BuildId(i64)
);
id_type!(
    /// An agent's id, handed out at registration and never reused.
    AgentId(i64)
);
id_type!(
    /// A step's id: the unit that is queued, dispatched, leased and fenced,
    /// and the `id` an agent is sent. Unique across builds, never reused.
    StepId(i64)
);
id_type!(
    /// The number of a dispatch of a build. The first dispatch is attempt 1;
    /// 0 means the build was never dispatched.
    Attempt(u32)
);

impl Attempt {
    /// The attempt after this one.
    pub fn next(self) -> Attempt {
        Attempt(self.0.saturating_add(1))
    }
}

id_type!(
    /// What the wire calls one attempt of one step: the `id` of `POST
    /// /build`, and of every heartbeat, result, log piece, hand-back and
    /// cancel about it. Because it names the attempt, a message that
    /// carries nothing else (the original agent sends only `id`) is fenced
    /// exactly: a stalled agent's late result can never pass for its
    /// successor's.
    ///
    /// It is the step's id shifted left by [`DispatchId::ATTEMPT_BITS`],
    /// plus the attempt: below 2^53 (exact in JavaScript, as the original
    /// Node.js agent reads it) for the first 2^33 steps.
    DispatchId(i64)
);

impl DispatchId {
    /// Bits of the attempt number.
    pub const ATTEMPT_BITS: u32 = 20;
    /// The highest attempt a dispatch id can name.
    pub const MAX_ATTEMPT: u32 = (1 << Self::ATTEMPT_BITS) - 1;

    /// The id of `attempt` of `step`, if the attempt is at most
    /// [`DispatchId::MAX_ATTEMPT`] and the step's id fits.
    pub fn new(step: StepId, attempt: Attempt) -> Option<DispatchId> {
        if attempt.0 > Self::MAX_ATTEMPT || step.0 < 0 {
            return None;
        }
        let id = step.0.checked_mul(1 << Self::ATTEMPT_BITS)?;
        Some(DispatchId(id | i64::from(attempt.0)))
    }

    /// The step and the attempt this id names. Attempt 0 (no attempt was
    /// ever dispatched with it) names nothing an agent can hold.
    pub fn parts(self) -> (StepId, Attempt) {
        let attempt = self.0 & i64::from(Self::MAX_ATTEMPT);
        (StepId(self.0 >> Self::ATTEMPT_BITS), Attempt(attempt as u32))
    }
}

// === status ===

/// Where a build is in its life.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildStatus {
    /// Waiting for an agent (the original design called this `new`).
    #[serde(alias = "new")]
    Queued,
    /// Dispatched to an agent; an attempt holds a lease on it.
    Running,
    /// Finished with exit status 0.
    Success,
    /// Finished with a non-zero exit status, or could not run.
    Failed,
    /// Stopped by a user before it finished.
    Canceled,
}

impl BuildStatus {
    /// Every status, in life order.
    pub const ALL: [BuildStatus; 5] = [
        BuildStatus::Queued,
        BuildStatus::Running,
        BuildStatus::Success,
        BuildStatus::Failed,
        BuildStatus::Canceled,
    ];

    /// The wire and database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Queued => "queued",
            BuildStatus::Running => "running",
            BuildStatus::Success => "success",
            BuildStatus::Failed => "failed",
            BuildStatus::Canceled => "canceled",
        }
    }

    /// True once the build can no longer change.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            BuildStatus::Success | BuildStatus::Failed | BuildStatus::Canceled
        )
    }

    /// The status a build ends in for an exit code.
    pub fn from_exit_code(code: i32) -> BuildStatus {
        if code == 0 {
            BuildStatus::Success
        } else {
            BuildStatus::Failed
        }
    }
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for BuildStatus {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "queued" | "new" => Ok(BuildStatus::Queued),
            "running" => Ok(BuildStatus::Running),
            "success" => Ok(BuildStatus::Success),
            "failed" => Ok(BuildStatus::Failed),
            "canceled" => Ok(BuildStatus::Canceled),
            other => Err(Error::invalid("status", format!("unknown status {other:?}"))),
        }
    }
}

// === commit refs ===

/// A commit to build: a hex SHA (4 to 64 digits) or a safe ref name.
///
/// N.B.: this is the only gate between a user's string and `git`. A valid
/// ref never starts with `-`, so it cannot be read as an option, and it holds
/// no characters with a meaning to git's revision syntax (`^ ~ : @{ ..`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct CommitRef(String);

impl CommitRef {
    /// Longest accepted ref name, in bytes.
    pub const MAX_LEN: usize = 255;

    /// Validates `s`.
    pub fn parse(s: &str) -> Result<CommitRef> {
        let err = |reason: &str| Error::invalid("hash", format!("{reason}: {s:?}"));
        if s.is_empty() {
            return Err(err("must not be empty"));
        }
        if s.len() > Self::MAX_LEN {
            return Err(Error::invalid(
                "hash",
                format!("longer than {} bytes", Self::MAX_LEN),
            ));
        }
        if is_hex_sha(s) {
            return Ok(CommitRef(s.to_ascii_lowercase()));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-');
        if !s.chars().all(allowed) {
            return Err(err("not a hex SHA or a ref name (letters, digits, . _ / -)"));
        }
        if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(err("must start with a letter or digit"));
        }
        if s.ends_with('/') || s.ends_with('.') {
            return Err(err("must not end with '/' or '.'"));
        }
        if s.contains("..") || s.contains("//") || s.contains("/.") {
            return Err(err("must not contain '..', '//' or '/.'"));
        }
        Ok(CommitRef(s.to_owned()))
    }

    /// True for a hex SHA rather than a ref name.
    pub fn is_sha(&self) -> bool {
        is_hex_sha(&self.0)
    }

    /// The validated string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_hex_sha(s: &str) -> bool {
    (4..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl fmt::Display for CommitRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl<'de> Deserialize<'de> for CommitRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        CommitRef::parse(&s).map_err(serde::de::Error::custom)
    }
}

// === repository URLs ===

/// URL schemes a repository may use unless configured otherwise.
pub const DEFAULT_REPO_SCHEMES: &[&str] = &["https", "http", "ssh", "git", "file"];

/// A repository location that is safe to hand to `git clone`.
///
/// Accepted forms: `scheme://...` with an allowed scheme, an absolute local
/// path (treated as `file`), and scp-like `user@host:path` (treated as `ssh`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct RepoUrl(String);

impl RepoUrl {
    /// Longest accepted URL, in bytes.
    pub const MAX_LEN: usize = 2048;

    /// Validates `s` against [`DEFAULT_REPO_SCHEMES`].
    pub fn parse(s: &str) -> Result<RepoUrl> {
        Self::parse_with(s, DEFAULT_REPO_SCHEMES)
    }

    /// Validates `s`, allowing only the given schemes.
    pub fn parse_with<S: AsRef<str>>(s: &str, schemes: &[S]) -> Result<RepoUrl> {
        let err = |reason: String| Error::invalid("repo", reason);
        if s.is_empty() {
            return Err(err("must not be empty".into()));
        }
        if s.len() > Self::MAX_LEN {
            return Err(err(format!("longer than {} bytes", Self::MAX_LEN)));
        }
        if s.starts_with('-') {
            return Err(err(format!("must not start with '-': {s:?}")));
        }
        if s.chars().any(char::is_control) {
            return Err(err("must not contain control characters".into()));
        }
        if s.chars().any(char::is_whitespace) {
            return Err(err(format!(
                "must not contain spaces: write a path with spaces as a file:// URL with %20, e.g. {:?}",
                format!("file://{}", s.replace(' ', "%20"))
            )));
        }
        // `transport::address` runs a git remote helper (`ext::` runs a command).
        if s.contains("::") {
            return Err(err(format!("remote-helper syntax '::' is not allowed: {s:?}")));
        }
        let scheme = Self::scheme_of(s)
            .ok_or_else(|| err(format!("not a URL, an absolute path or user@host:path: {s:?}")))?;
        if !schemes.iter().any(|a| a.as_ref().eq_ignore_ascii_case(scheme)) {
            let allowed: Vec<&str> = schemes.iter().map(AsRef::as_ref).collect();
            return Err(err(format!(
                "scheme {scheme:?} is not allowed (allowed: {})",
                allowed.join(", ")
            )));
        }
        Ok(RepoUrl(s.to_owned()))
    }

    fn scheme_of(s: &str) -> Option<&str> {
        if s.starts_with('/') {
            return Some("file");
        }
        if let Some((scheme, rest)) = s.split_once("://") {
            let valid = !scheme.is_empty()
                && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
            return (valid && !rest.is_empty()).then_some(scheme);
        }
        // scp-like syntax: [user@]host:path, where host has no '/'.
        let (host, path) = s.split_once(':')?;
        let ok = !host.is_empty() && !host.contains('/') && !path.is_empty();
        ok.then_some("ssh")
    }

    /// The validated string, credentials and all: for `git`, and nothing
    /// that is shown or logged (use [`Display`](fmt::Display) for that).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URL with its credentials (`user:password@`) replaced by `***`.
    /// This is also what [`Display`](fmt::Display) shows.
    pub fn redacted(&self) -> std::borrow::Cow<'_, str> {
        redact_url(&self.0)
    }

    /// `text` (a git error, say) with this URL's credentials replaced by
    /// `***` wherever they appear.
    pub fn scrub(&self, text: &str) -> String {
        match userinfo(&self.0) {
            Some(secret) => text.replace(secret, "***"),
            None => text.to_owned(),
        }
    }
}

/// N.B.: shows no credentials, so that a URL can be logged and displayed.
impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// The userinfo (`user:password`) of a `scheme://userinfo@host/...` URL.
/// The scp-like `user@host:path` carries no password and keeps its user.
fn userinfo(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let (info, _) = authority.rsplit_once('@')?;
    (!info.is_empty()).then_some(info)
}

/// `url` with the userinfo of a `scheme://user:password@host` URL replaced by
/// `***`, for URLs kept as plain strings (a stored build's repository).
pub fn redact_url(url: &str) -> std::borrow::Cow<'_, str> {
    match userinfo(url) {
        Some(info) => {
            let start = url.find("://").map_or(0, |i| i + 3);
            let mut out = String::with_capacity(url.len());
            out.push_str(&url[..start]);
            out.push_str("***");
            out.push_str(&url[start + info.len()..]);
            std::borrow::Cow::Owned(out)
        }
        None => std::borrow::Cow::Borrowed(url),
    }
}

// === images ===

/// A container image reference, such as `debian:bookworm-slim` or
/// `registry.example.com/team/rust@sha256:...`.
///
/// N.B.: it never starts with `-`, so it cannot be read as an option.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ImageRef(String);

impl ImageRef {
    /// Validates `s`: 1 to 512 of `A-Z a-z 0-9 . _ - / : @`, not starting
    /// with `-`.
    pub fn parse(s: &str) -> Result<ImageRef> {
        let ok = !s.is_empty()
            && s.len() <= limits::MAX_IMAGE
            && !s.starts_with('-')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c));
        if !ok {
            return Err(Error::invalid("image", format!("not an image reference: {s:?}")));
        }
        Ok(ImageRef(s.to_owned()))
    }

    /// The validated string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === builds ===

/// Limits on what a build may carry, so nothing unbounded reaches the store.
pub mod limits {
    /// Longest build command, in characters.
    pub const MAX_COMMAND: usize = 64 * 1024;
    /// Longest branch name, in characters.
    pub const MAX_BRANCH: usize = 255;
    /// Longest image name, in bytes.
    pub const MAX_IMAGE: usize = 512;
    /// Most output kept per stream (stdout, stderr) per attempt, in bytes.
    pub const MAX_LOG: usize = 16 * 1024 * 1024;
    /// Longest per-build timeout, in milliseconds (7 days).
    pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
    /// Most steps in one build (a pipeline's steps times its matrix).
    pub const MAX_STEPS: usize = 1024;
    /// Longest step name, in characters.
    pub const MAX_STEP_NAME: usize = 16 * 1024;
    /// Most services beside one step.
    pub const MAX_SERVICES: usize = 8;
    /// Longest service name (a host name), in characters.
    pub const MAX_SERVICE_NAME: usize = 63;
    /// Most characters in all of one step's services' environments and
    /// commands.
    pub const MAX_SERVICE_TEXT: usize = 16 * 1024;
    /// Most secrets one step asks for.
    pub const MAX_SECRETS: usize = 64;
}

/// What a user asks for when creating a build, after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewBuild {
    /// Repository to check out.
    pub repo: RepoUrl,
    /// Commit or ref to check out.
    pub hash: CommitRef,
    /// Branch the commit belongs to, for display only.
    pub branch: Option<String>,
    /// Shell command to run in the checkout.
    pub command: String,
    /// Container image for runners that use one.
    pub image: Option<String>,
    /// Per-build timeout; the agent's default applies when `None`.
    pub timeout_ms: Option<u64>,
    /// Labels the agent must have, all of them.
    pub labels: Labels,
    /// The steps of its pipeline. Empty: one step, `build`, of the fields
    /// above (a build of one command, as the original design had).
    pub steps: Vec<NewStep>,
    /// Why the build fails before any step runs (its pipeline file is
    /// broken): it is stored as one failed step, named after the file
    /// ([`NewBuild::command`]), whose log says this.
    pub failure: Option<String>,
    /// Its project and what started it.
    pub source: crate::project::Source,
}

impl NewBuild {
    /// A build of `hash` in `repo` running `command`, validated.
    pub fn new(repo: RepoUrl, hash: CommitRef, command: impl Into<String>) -> Result<NewBuild> {
        let build = NewBuild {
            repo,
            hash,
            branch: None,
            command: command.into(),
            image: None,
            timeout_ms: None,
            labels: Labels::default(),
            steps: Vec::new(),
            failure: None,
            source: crate::project::Source::default(),
        };
        build.validate()?;
        Ok(build)
    }

    /// The steps to store: [`NewBuild::steps`], or the one step the build's
    /// own command makes.
    pub fn plan(&self) -> Vec<NewStep> {
        if !self.steps.is_empty() {
            return self.steps.clone();
        }
        vec![NewStep {
            name: NewStep::DEFAULT_NAME.to_owned(),
            command: self.command.clone(),
            image: self.image.clone(),
            timeout_ms: self.timeout_ms,
            labels: self.labels.clone(),
            ..NewStep::default()
        }]
    }

    /// Checks the free-text fields against [`limits`].
    pub fn validate(&self) -> Result<()> {
        if self.command.trim().is_empty() {
            return Err(Error::invalid("command", "must not be empty"));
        }
        if self.command.chars().count() > limits::MAX_COMMAND {
            return Err(Error::invalid(
                "command",
                format!("longer than {} characters", limits::MAX_COMMAND),
            ));
        }
        if self.command.contains('\0') {
            return Err(Error::invalid("command", "must not contain NUL"));
        }
        if let Some(branch) = &self.branch {
            if branch.chars().count() > limits::MAX_BRANCH || branch.chars().any(char::is_control) {
                return Err(Error::invalid(
                    "branch",
                    format!("at most {} bytes without control characters", limits::MAX_BRANCH),
                ));
            }
        }
        if let Some(image) = &self.image {
            ImageRef::parse(image)?;
        }
        check_timeout(self.timeout_ms)?;
        crate::project::Project::check_name(&self.source.project).map_err(|_| {
            Error::invalid(
                "project",
                format!("{:?} is not a project name", self.source.project),
            )
        })?;
        if self.steps.len() > limits::MAX_STEPS {
            return Err(Error::invalid(
                "steps",
                format!("more than {}", limits::MAX_STEPS),
            ));
        }
        for (i, step) in self.steps.iter().enumerate() {
            step.validate()?;
            if self.steps[..i].iter().any(|s| s.name == step.name) {
                return Err(Error::invalid(
                    "steps",
                    format!("two steps are named {:?}", step.name),
                ));
            }
            // N.B.: a step depends only on steps before it, so the steps
            // are a DAG in this order.
            for d in &step.depends_on {
                if !self.steps[..i].iter().any(|s| &s.name == d) {
                    return Err(Error::invalid(
                        "steps",
                        format!(
                            "step {:?} depends on {d:?}, which is not an earlier step",
                            step.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn check_timeout(timeout_ms: Option<u64>) -> Result<()> {
    if let Some(t) = timeout_ms {
        if t == 0 || t > limits::MAX_TIMEOUT_MS {
            return Err(Error::invalid(
                "timeoutMs",
                format!("must be 1 to {} (7 days)", limits::MAX_TIMEOUT_MS),
            ));
        }
    }
    Ok(())
}

/// A build as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Build {
    /// Unique, never reused build number.
    pub id: BuildId,
    /// Repository to check out.
    pub repo: String,
    /// Commit or ref to check out.
    pub hash: String,
    /// Branch, for display.
    pub branch: Option<String>,
    /// Command to run.
    pub command: String,
    /// Image for container runners.
    pub image: Option<String>,
    /// Per-build timeout.
    pub timeout_ms: Option<u64>,
    /// Where the build is in its life.
    pub status: BuildStatus,
    /// Number of the latest dispatch; 0 before the first.
    pub attempt: Attempt,
    /// Agent of the latest attempt.
    pub agent_id: Option<AgentId>,
    /// That agent's URL, kept after the agent is gone.
    pub agent_url: Option<String>,
    /// Exit status of the accepted result.
    pub exit_code: Option<i32>,
    /// When the build was created.
    pub created_at: Timestamp,
    /// When the latest attempt was dispatched.
    pub started_at: Option<Timestamp>,
    /// When the build finished.
    pub finished_at: Option<Timestamp>,
    /// Labels the agent must have, all of them.
    pub labels: Labels,
    /// Its steps, in creation order: every step after the steps it
    /// depends on. The fields above from `attempt` to `finished_at` sum
    /// them up ([`Build::summarize`]).
    pub steps: Vec<Step>,
    /// Its number in its project: `web#42`.
    pub number: u64,
    /// Its project and what started it.
    pub source: crate::project::Source,
}

impl Build {
    /// A new queued build, without steps yet.
    pub fn new(id: BuildId, new: &NewBuild, now: Timestamp) -> Build {
        Build {
            id,
            repo: new.repo.as_str().to_owned(),
            hash: new.hash.as_str().to_owned(),
            branch: new.branch.clone(),
            command: new.command.clone(),
            image: new.image.clone(),
            timeout_ms: new.timeout_ms,
            status: BuildStatus::Queued,
            attempt: Attempt(0),
            agent_id: None,
            agent_url: None,
            exit_code: None,
            created_at: now,
            started_at: None,
            finished_at: None,
            labels: new.labels.clone(),
            steps: Vec::new(),
            number: 0,
            source: new.source.clone(),
        }
    }

    /// Sets the fields that sum up the steps: the latest attempt and its
    /// agent, the exit code that decided the build, the first start and
    /// the last finish. A build of one step shows that step's.
    pub fn summarize(&mut self) {
        let steps = &self.steps;
        self.attempt = steps.iter().map(|s| s.attempt).max().unwrap_or_default();
        let latest = steps
            .iter()
            .filter(|s| s.started_at.is_some())
            .max_by_key(|s| s.started_at);
        self.agent_id = latest.and_then(|s| s.agent_id);
        self.agent_url = latest.and_then(|s| s.agent_url.clone());
        self.started_at = steps.iter().filter_map(|s| s.started_at).min();
        self.finished_at = if self.status.is_finished() {
            steps.iter().filter_map(|s| s.finished_at).max()
        } else {
            None
        };
        self.exit_code = match (self.status, steps.as_slice()) {
            (_, [one]) => one.exit_code,
            (BuildStatus::Success, _) => Some(0),
            (BuildStatus::Failed, _) => steps
                .iter()
                .find(|s| s.status == StepStatus::Failed && !s.allow_failure)
                .and_then(|s| s.exit_code),
            _ => None,
        };
    }

    /// The step with this name.
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// Run time of the finished attempt, in milliseconds.
    pub fn duration_ms(&self) -> Option<u64> {
        match (self.started_at, self.finished_at) {
            (Some(s), Some(f)) => Some(f.0.saturating_sub(s.0)),
            _ => None,
        }
    }
}

// === steps ===

/// Where a step is in its life.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    /// Waiting for the steps it depends on.
    Pending,
    /// Ready, waiting for an agent.
    Queued,
    /// Dispatched; an attempt holds a lease on it.
    Running,
    /// Finished with exit status 0.
    Success,
    /// Finished with a non-zero exit status, or could not run.
    Failed,
    /// Stopped by a user.
    Canceled,
    /// Never ran: a step it depends on failed, or was canceled or skipped.
    Skipped,
}

impl StepStatus {
    /// Every status, in life order.
    pub const ALL: [StepStatus; 7] = [
        StepStatus::Pending,
        StepStatus::Queued,
        StepStatus::Running,
        StepStatus::Success,
        StepStatus::Failed,
        StepStatus::Canceled,
        StepStatus::Skipped,
    ];

    /// The wire and database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Queued => "queued",
            StepStatus::Running => "running",
            StepStatus::Success => "success",
            StepStatus::Failed => "failed",
            StepStatus::Canceled => "canceled",
            StepStatus::Skipped => "skipped",
        }
    }

    /// The status a step ends in for an exit code.
    pub fn from_exit_code(code: i32) -> StepStatus {
        if code == 0 {
            StepStatus::Success
        } else {
            StepStatus::Failed
        }
    }

    /// True once the step can no longer change (short of a retry of the
    /// build).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            StepStatus::Success | StepStatus::Failed | StepStatus::Canceled | StepStatus::Skipped
        )
    }
}

impl fmt::Display for StepStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for StepStatus {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        StepStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| Error::invalid("status", format!("unknown step status {s:?}")))
    }
}

/// A container beside a step, on a network of the step's own, reachable
/// from the step by its name (Docker runner only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Its host name on the step's network.
    pub name: String,
    /// What it runs.
    pub image: ImageRef,
    /// Its environment.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// Its command and arguments, instead of the image's (none: the
    /// image's own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
}

impl Service {
    /// True for a name a service may have: a host name label, 1 to 63 of
    /// `a-z A-Z 0-9 -`, starting with a letter or a digit.
    pub fn is_name(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= limits::MAX_SERVICE_NAME
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    }

    /// True for a variable name: `A-Z a-z 0-9 _`, not starting with a digit.
    pub fn is_env_name(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 256
            && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    /// Checks a step's services against [`limits`]: how many, their names
    /// (unique host names), and the size of their environments and
    /// commands. Images are checked as they are read ([`ImageRef`]).
    pub fn validate_all(services: &[Service]) -> Result<()> {
        if services.len() > limits::MAX_SERVICES {
            return Err(Error::invalid(
                "services",
                format!("at most {}", limits::MAX_SERVICES),
            ));
        }
        let mut text = 0;
        for (i, s) in services.iter().enumerate() {
            if !Service::is_name(&s.name) {
                return Err(Error::invalid(
                    "services",
                    format!("{:?} is not a host name (1 to 63 of A-Z a-z 0-9 -)", s.name),
                ));
            }
            if services[..i].iter().any(|o| o.name.eq_ignore_ascii_case(&s.name)) {
                return Err(Error::invalid(
                    "services",
                    format!("two services are named {:?}", s.name),
                ));
            }
            if let Some(k) = s.env.keys().find(|k| !Service::is_env_name(k)) {
                return Err(Error::invalid(
                    "services",
                    format!("{}: {k:?} is not a variable name", s.name),
                ));
            }
            let strings = s.env.iter().flat_map(|(k, v)| [k, v]).chain(&s.command);
            for v in strings {
                if v.contains('\0') {
                    return Err(Error::invalid(
                        "services",
                        format!("{}: environment and command must not contain NUL", s.name),
                    ));
                }
                text += v.chars().count();
            }
        }
        if text > limits::MAX_SERVICE_TEXT {
            return Err(Error::invalid(
                "services",
                format!(
                    "environments and commands longer than {} characters in all",
                    limits::MAX_SERVICE_TEXT
                ),
            ));
        }
        Ok(())
    }
}

/// What makes a step's attempt run again by itself, spending one of its
/// retries ([`NewStep::retries`]).
///
/// N.B.: a step whose agent is lost always runs again, as builds always
/// have; with `agent_lost` set each such re-run spends a retry, and once
/// none is left the loss fails the step.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct RetryOn {
    /// Any non-zero exit.
    pub failure: bool,
    /// The step ran out of time ([`TIMED_OUT`](crate::runner::TIMED_OUT)).
    pub timeout: bool,
    /// Its agent died, fell silent or could not be reached.
    pub agent_lost: bool,
}

impl Default for RetryOn {
    /// Failures and timeouts; lost agents without limit.
    fn default() -> Self {
        RetryOn {
            failure: true,
            timeout: true,
            agent_lost: false,
        }
    }
}

impl RetryOn {
    /// Every cause.
    pub const ALL: RetryOn = RetryOn {
        failure: true,
        timeout: true,
        agent_lost: true,
    };

    /// As stored: one bit per cause (failure 1, timeout 2, agent lost 4).
    pub fn bits(self) -> u8 {
        u8::from(self.failure) | u8::from(self.timeout) << 1 | u8::from(self.agent_lost) << 2
    }

    /// From [`RetryOn::bits`]; unknown bits are ignored.
    pub fn from_bits(bits: u8) -> RetryOn {
        RetryOn {
            failure: bits & 1 != 0,
            timeout: bits & 2 != 0,
            agent_lost: bits & 4 != 0,
        }
    }

    /// True if an attempt that exited with `code` runs again (given a
    /// retry is left).
    pub fn retries_exit(self, code: i32) -> bool {
        code != 0 && (self.failure || (self.timeout && code == crate::runner::TIMED_OUT))
    }
}

/// A step to create, as part of a [`NewBuild`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewStep {
    /// Unique in its build.
    pub name: String,
    /// The shell script to run.
    pub command: String,
    /// Container image for runners that use one.
    pub image: Option<String>,
    /// Longest it may run; the agent's default applies when `None`.
    pub timeout_ms: Option<u64>,
    /// Labels the agent must have, all of them.
    pub labels: Labels,
    /// Names of earlier steps that must succeed first.
    pub depends_on: Vec<String>,
    /// Its failure neither fails the build nor skips its dependents.
    pub allow_failure: bool,
    /// How many times an attempt is run again by itself.
    pub retries: u32,
    /// What spends those retries.
    pub retry_on: RetryOn,
    /// Its matrix combination, for display.
    pub matrix: std::collections::BTreeMap<String, String>,
    /// Containers beside it (Docker runner only).
    pub services: Vec<Service>,
    /// The project's secrets it gets as environment variables, by name.
    pub secrets: Vec<String>,
}

impl NewStep {
    /// The name of the one step of a build without a pipeline.
    pub const DEFAULT_NAME: &'static str = "build";

    fn validate(&self) -> Result<()> {
        let name_ok = !self.name.is_empty()
            && self.name.chars().count() <= limits::MAX_STEP_NAME
            && !self.name.chars().any(char::is_control);
        if !name_ok {
            return Err(Error::invalid(
                "steps",
                format!(
                    "step name {:?} is empty, too long or holds control characters",
                    self.name
                ),
            ));
        }
        let probe = NewBuild {
            repo: RepoUrl(String::new()),
            hash: CommitRef(String::new()),
            branch: None,
            command: self.command.clone(),
            image: self.image.clone(),
            timeout_ms: self.timeout_ms,
            labels: Labels::default(),
            steps: Vec::new(),
            failure: None,
            source: crate::project::Source::default(),
        };
        probe.validate()?;
        if self.secrets.len() > limits::MAX_SECRETS {
            return Err(Error::invalid(
                "secrets",
                format!("step {:?}: more than {}", self.name, limits::MAX_SECRETS),
            ));
        }
        for name in &self.secrets {
            crate::project::SecretName::check(name)?;
        }
        if !self.services.is_empty() && self.image.is_none() {
            return Err(Error::invalid(
                "services",
                format!("step {:?}: only a step with an image has services", self.name),
            ));
        }
        Service::validate_all(&self.services)
    }
}

/// A step as stored: one job of a build, with its own attempts, lease and
/// result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Its id, the `id` its agent is sent.
    pub id: StepId,
    /// The build it belongs to.
    pub build: BuildId,
    /// Unique in the build.
    pub name: String,
    /// Repository to check out (the build's).
    pub repo: String,
    /// Commit to check out (the build's).
    pub hash: String,
    /// The shell script to run.
    pub command: String,
    /// Image for container runners.
    pub image: Option<String>,
    /// Longest it may run.
    pub timeout_ms: Option<u64>,
    /// Labels the agent must have, all of them.
    pub labels: Labels,
    /// Names of the steps that must succeed first.
    pub depends_on: Vec<String>,
    /// Its failure neither fails the build nor skips its dependents.
    pub allow_failure: bool,
    /// Automatic re-runs it may still have.
    pub retries_left: u32,
    /// What spends them.
    pub retry_on: RetryOn,
    /// Its matrix combination.
    pub matrix: std::collections::BTreeMap<String, String>,
    /// Containers beside it (Docker runner only).
    pub services: Vec<Service>,
    /// The project's secrets it gets as environment variables, by name.
    pub secrets: Vec<String>,
    /// Where it is in its life.
    pub status: StepStatus,
    /// Number of the latest dispatch; 0 before the first.
    pub attempt: Attempt,
    /// Agent of the latest attempt.
    pub agent_id: Option<AgentId>,
    /// That agent's URL, kept after the agent is gone.
    pub agent_url: Option<String>,
    /// Exit status of the accepted result.
    pub exit_code: Option<i32>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When the latest attempt was dispatched.
    pub started_at: Option<Timestamp>,
    /// When it finished.
    pub finished_at: Option<Timestamp>,
}

impl Step {
    /// The step that stands for a build that failed before any step ran,
    /// and the log that says why: see [`NewBuild::failure`].
    pub fn failed(id: StepId, build: &Build, why: &str) -> (Step, BuildLog) {
        let new = NewStep {
            name: build.command.clone(),
            command: build.command.clone(),
            ..NewStep::default()
        };
        let step = Step {
            status: StepStatus::Failed,
            exit_code: Some(Completion::NOT_RUN),
            finished_at: Some(build.created_at),
            ..Step::new(id, build, &new)
        };
        let log = BuildLog {
            attempt: Attempt(0),
            stdout: String::new(),
            stderr: format!("ci: {why}\n"),
            complete: true,
        };
        (step, log)
    }

    /// A new step of `build`, pending or (without dependencies) queued.
    pub fn new(id: StepId, build: &Build, new: &NewStep) -> Step {
        Step {
            id,
            build: build.id,
            name: new.name.clone(),
            repo: build.repo.clone(),
            hash: build.hash.clone(),
            command: new.command.clone(),
            image: new.image.clone(),
            timeout_ms: new.timeout_ms,
            labels: new.labels.clone(),
            depends_on: new.depends_on.clone(),
            allow_failure: new.allow_failure,
            retries_left: new.retries,
            retry_on: new.retry_on,
            matrix: new.matrix.clone(),
            services: new.services.clone(),
            secrets: new.secrets.clone(),
            status: if new.depends_on.is_empty() {
                StepStatus::Queued
            } else {
                StepStatus::Pending
            },
            attempt: Attempt(0),
            agent_id: None,
            agent_url: None,
            exit_code: None,
            created_at: build.created_at,
            started_at: None,
            finished_at: None,
        }
    }

    /// Run time of the finished attempt, in milliseconds.
    pub fn duration_ms(&self) -> Option<u64> {
        match (self.started_at, self.finished_at) {
            (Some(s), Some(f)) => Some(f.0.saturating_sub(s.0)),
            _ => None,
        }
    }

    /// True if its result does not hold up the build: it succeeded, or
    /// failed with failure allowed.
    pub fn passed(&self) -> bool {
        self.status == StepStatus::Success || (self.status == StepStatus::Failed && self.allow_failure)
    }
}

/// What scheduling needs of a step: [`settle`] works on these, so a store
/// reads no commands or logs to move a pipeline along.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepState {
    /// The step.
    pub id: StepId,
    /// Its name.
    pub name: String,
    /// Its status.
    pub status: StepStatus,
    /// Its failure does not hold up the build.
    pub allow_failure: bool,
    /// Names of the steps it depends on.
    pub depends_on: Vec<String>,
}

impl StepState {
    /// True if its result does not hold up the build: it succeeded, or
    /// failed with failure allowed.
    pub fn passed(&self) -> bool {
        self.status == StepStatus::Success || (self.status == StepStatus::Failed && self.allow_failure)
    }
}

impl From<&Step> for StepState {
    fn from(s: &Step) -> StepState {
        StepState {
            id: s.id,
            name: s.name.clone(),
            status: s.status,
            allow_failure: s.allow_failure,
            depends_on: s.depends_on.clone(),
        }
    }
}

/// What a change did to a build: the steps whose status moved (to their
/// new status), and the build's status before and after.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// The build.
    pub build: BuildId,
    /// Steps whose status changed, and to what.
    pub steps: Vec<(StepId, StepStatus)>,
    /// The build's status before.
    pub before: Option<BuildStatus>,
    /// The build's status after.
    pub after: Option<BuildStatus>,
    /// When the change ended the build: from its first step's start to
    /// its last step's end.
    pub duration_ms: Option<u64>,
}

impl Moved {
    /// True if the change ended the build.
    pub fn ended(&self) -> bool {
        self.after.is_some_and(BuildStatus::is_finished) && !self.before.is_some_and(BuildStatus::is_finished)
    }
}

/// Moves a build's steps along after one of them changed: a pending step
/// whose dependencies all passed is queued; one with a dependency that did
/// not pass is skipped (and so on down the graph). Returns the build's
/// status and the steps it moved.
///
/// The one rule of pipelines, for every store to share. The steps are in
/// creation order, where every step comes after its dependencies.
pub fn settle(steps: &mut [StepState]) -> (BuildStatus, Vec<(StepId, StepStatus)>) {
    let mut moved = Vec::new();
    for i in 0..steps.len() {
        if steps[i].status != StepStatus::Pending {
            continue;
        }
        let mut ready = true;
        let mut doomed = false;
        for d in &steps[i].depends_on {
            match steps[..i].iter().find(|s| &s.name == d) {
                Some(dep) if dep.passed() => {}
                Some(dep) if dep.status.is_finished() => doomed = true,
                _ => ready = false,
            }
        }
        let next = if doomed {
            StepStatus::Skipped
        } else if ready {
            StepStatus::Queued
        } else {
            continue;
        };
        steps[i].status = next;
        moved.push((steps[i].id, next));
    }
    (build_status(steps), moved)
}

/// The status of a build of these steps.
pub fn build_status(steps: &[StepState]) -> BuildStatus {
    if steps.iter().any(|s| !s.status.is_finished()) {
        // Queued until a step runs, and again while none runs and none
        // has ended (its only step lost its agent, say).
        let under_way = steps
            .iter()
            .any(|s| s.status == StepStatus::Running || s.status.is_finished());
        return if under_way {
            BuildStatus::Running
        } else {
            BuildStatus::Queued
        };
    }
    if steps.iter().any(|s| s.status == StepStatus::Canceled) {
        BuildStatus::Canceled
    } else if steps.iter().all(StepState::passed) {
        BuildStatus::Success
    } else {
        BuildStatus::Failed
    }
}

/// The outcome of one attempt, as an agent reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Exit status; 0 is success.
    pub exit_code: i32,
    /// Captured standard output.
    pub stdout: String,
    /// Captured standard error.
    pub stderr: String,
}

impl Completion {
    /// Exit code reported when the build could not run at all (checkout
    /// failed, engine unreachable, timeout). Distinct from any process exit.
    pub const NOT_RUN: i32 = -1;

    /// A completion for a build that could not run, with the reason on
    /// stderr.
    pub fn not_run(reason: impl fmt::Display) -> Completion {
        Completion {
            exit_code: Self::NOT_RUN,
            stdout: String::new(),
            stderr: format!("ci: {reason}\n"),
        }
    }
}

/// The stored output of one attempt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildLog {
    /// The attempt this output belongs to.
    pub attempt: Attempt,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// True for the log of an accepted result; false for output streamed
    /// while the attempt ran (it may still be running, or it was lost).
    pub complete: bool,
}

/// What one attempt's log is, without its text: for reading it in pieces.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct LogInfo {
    /// The attempt.
    pub attempt: Attempt,
    /// True for the accepted result's log, read with
    /// [`Logs::read_log`](crate::Logs::read_log); false for live pieces,
    /// read with [`Logs::log_pieces`](crate::Logs::log_pieces).
    pub complete: bool,
    /// Bytes of standard output.
    pub stdout_len: u64,
    /// Bytes of standard error.
    pub stderr_len: u64,
}

/// A piece of live output, numbered in the order the agent sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogPiece {
    /// Position in the attempt's output, from 0. A repeat is ignored.
    pub seq: u64,
    /// Which stream.
    pub stream: crate::runner::Stream,
    /// The text.
    pub data: String,
}

/// An agent's own credential, issued when it first registered with the
/// shared agent token. The store keeps the SHA-256 digest of its token,
/// never the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    /// Its id, never reused.
    pub id: i64,
    /// The name of the agent it was issued to.
    pub name: String,
    /// When it was issued.
    pub created_at: Timestamp,
    /// When it was revoked: it opens nothing from then on.
    pub revoked_at: Option<Timestamp>,
}

/// A registered agent, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRecord {
    /// Its id.
    pub id: AgentId,
    /// Base URL the server reaches it at, e.g. `http://agent-01:3001`.
    pub url: String,
    /// When it registered.
    pub registered_at: Timestamp,
    /// The session secret it proves its identity with, if it asked for one.
    pub secret: Option<String>,
    /// How many builds it may run at once.
    pub capacity: u32,
    /// What it can run.
    pub labels: Labels,
}

// === labels ===

/// What an agent can run, or what a step needs: names such as `linux`,
/// `docker` or `arch=arm64`. A step goes only to an agent that has all of
/// its labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Labels(std::collections::BTreeSet<String>);

impl Labels {
    /// Most labels an agent or a step may carry.
    pub const MAX: usize = 32;
    /// Longest label, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Validates each label: 1 to 64 of `A-Z a-z 0-9 . _ - : / =`; at most
    /// [`Labels::MAX`] are given. A label given twice counts once.
    pub fn parse<S: AsRef<str>>(labels: impl IntoIterator<Item = S>) -> Result<Labels> {
        let mut set = std::collections::BTreeSet::new();
        for (i, l) in labels.into_iter().enumerate() {
            if i >= Self::MAX {
                return Err(Error::invalid("labels", format!("more than {}", Self::MAX)));
            }
            let l = l.as_ref();
            let ok = !l.is_empty()
                && l.len() <= Self::MAX_LEN
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-:/=".contains(c));
            if !ok {
                return Err(Error::invalid(
                    "labels",
                    format!("{l:?} is not 1 to 64 of A-Z a-z 0-9 . _ - : / ="),
                ));
            }
            set.insert(l.to_owned());
        }
        Ok(Labels(set))
    }

    /// True if every label of `needed` is here.
    pub fn satisfy(&self, needed: &Labels) -> bool {
        needed.0.is_subset(&self.0)
    }

    /// The labels, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> Deserialize<'de> for ImageRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        ImageRef::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        Labels::parse(v).map_err(serde::de::Error::custom)
    }
}

/// Which page of a listing to return.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// Most items to return.
    pub limit: usize,
    /// Items to skip from the newest (after `before`).
    pub offset: usize,
    /// Only builds numbered below this: keyset paging, which costs the same
    /// however deep the page.
    pub before: Option<BuildId>,
}

impl Page {
    /// Largest page the API serves.
    pub const MAX_LIMIT: usize = 500;
}

impl Default for Page {
    fn default() -> Self {
        Page {
            limit: 50,
            offset: 0,
            before: None,
        }
    }
}

/// Truncates `s` to at most `max` bytes on a char boundary.
pub fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
}

/// Truncates `s` to at most `max` bytes on a char boundary, appending a
/// marker that says how much was cut.
pub fn truncate_log(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let omitted = s.len() - cut;
    s.truncate(cut);
    s.push_str(&format!("\n[output truncated: {omitted} bytes omitted]\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the OpenAPI schema says of `labels` holds: at most `MAX` items
    /// as given, each matching the pattern exactly (no trimming); a label
    /// given twice counts once.
    #[test]
    fn labels_are_checked_as_given() {
        assert_eq!(Labels::parse(["a", "b", "a"]).unwrap().iter().count(), 2);
        assert!(Labels::parse([" a"]).is_err());
        assert!(Labels::parse(["a b"]).is_err());
        assert!(Labels::parse([""]).is_err());
        let many: Vec<String> = (0..=Labels::MAX).map(|i| format!("l{}", i % 2)).collect();
        assert!(
            Labels::parse(&many).is_err(),
            "33 given, 2 distinct: still too many"
        );
        let most: Vec<String> = (0..Labels::MAX).map(|i| format!("l{i}")).collect();
        assert_eq!(Labels::parse(&most).unwrap().iter().count(), Labels::MAX);
    }

    #[test]
    fn commit_refs_accept_shas_and_safe_names() {
        for ok in [
            "abcd",
            "0123456789abcdef0123456789abcdef01234567",
            "main",
            "feature/x-1.2",
            "v1.0",
            "refs/heads/main",
        ] {
            assert!(CommitRef::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(CommitRef::parse("ABCD").map(|c| c.0).ok(), Some("abcd".into()));
        assert!(CommitRef::parse("abcd").map(|c| c.is_sha()).unwrap_or(false));
    }

    #[test]
    fn commit_refs_refuse_options_and_revision_syntax() {
        for bad in [
            "",
            "-abc",
            "--upload-pack=touch /tmp/x",
            "main^",
            "HEAD~1",
            "a..b",
            "a b",
            "x:y",
            "main@{1}",
            "refs//x",
            "x/",
            "x.",
            ".hidden",
            "a/.b",
            "ünïcode",
            "a\nb",
            &"a".repeat(256),
        ] {
            assert!(CommitRef::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn repo_urls_by_scheme() {
        for ok in [
            "https://example.com/x.git",
            "file:///tmp/repo",
            "/tmp/repo",
            "git@example.com:x/y.git",
            "ssh://git@example.com/x",
        ] {
            assert!(RepoUrl::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-uupload",
            "ext::sh -c touch% /tmp/pwned",
            "ext::sh",
            "fd::17",
            "relative/path",
            "ftp://x/y",
            "http://a b",
        ] {
            assert!(RepoUrl::parse(bad).is_err(), "{bad:?}");
        }
        assert!(RepoUrl::parse_with("https://x/y", &["file"]).is_err());
        assert!(RepoUrl::parse_with("/srv/repo", &["file"]).is_ok());
    }

    #[test]
    fn credentials_are_never_displayed() {
        let r = RepoUrl::parse("https://bob:s3cr3t@git.example.com/x/y.git").unwrap();
        assert_eq!(r.to_string(), "https://***@git.example.com/x/y.git");
        assert_eq!(r.as_str(), "https://bob:s3cr3t@git.example.com/x/y.git");
        assert_eq!(
            r.scrub("fatal: 'https://bob:s3cr3t@git.example.com/' denied"),
            "fatal: 'https://***@git.example.com/' denied"
        );
        let token = RepoUrl::parse("https://ghp_abc@github.com/o/r").unwrap();
        assert_eq!(token.to_string(), "https://***@github.com/o/r");
        for plain in [
            "git@example.com:x/y.git",
            "/srv/repo",
            "https://h/a@b",
            "file:///srv/r",
        ] {
            assert_eq!(RepoUrl::parse(plain).unwrap().to_string(), plain);
        }
        assert_eq!(redact_url("ssh://git:pw@h:22/r"), "ssh://***@h:22/r");
    }

    #[test]
    fn a_path_with_spaces_is_refused_with_the_way_out() {
        let e = RepoUrl::parse("/srv/my repo").unwrap_err().to_string();
        assert!(e.contains("file:///srv/my%20repo"), "{e}");
        assert!(RepoUrl::parse("file:///srv/my%20repo").is_ok());
    }

    #[test]
    fn status_round_trips_and_accepts_the_original_spelling() {
        for s in BuildStatus::ALL {
            assert_eq!(s.as_str().parse::<BuildStatus>().ok(), Some(s));
        }
        let parsed: BuildStatus = serde_json::from_str("\"new\"").unwrap_or(BuildStatus::Failed);
        assert_eq!(parsed, BuildStatus::Queued);
    }

    #[test]
    fn truncation_keeps_char_boundaries_and_says_so() {
        let mut s = "é".repeat(10); // 20 bytes
        truncate_log(&mut s, 5);
        assert!(s.starts_with("éé\n[output truncated: 16 bytes omitted]"), "{s}");
        let mut short = String::from("ok");
        truncate_log(&mut short, 5);
        assert_eq!(short, "ok");
    }

    #[test]
    fn new_build_limits() {
        let repo = RepoUrl::parse("/tmp/r").unwrap_or_else(|e| panic!("{e}"));
        let hash = CommitRef::parse("main").unwrap_or_else(|e| panic!("{e}"));
        assert!(NewBuild::new(repo.clone(), hash.clone(), "  ").is_err());
        assert!(NewBuild::new(repo.clone(), hash.clone(), "x".repeat(limits::MAX_COMMAND + 1)).is_err());
        let mut b = NewBuild::new(repo, hash, "make").unwrap_or_else(|e| panic!("{e}"));
        b.image = Some("--privileged".into());
        assert!(b.validate().is_err());
        b.image = Some("debian:bookworm-slim".into());
        assert!(b.validate().is_ok());
    }
}
