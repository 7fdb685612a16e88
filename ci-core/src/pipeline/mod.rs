//! Pipelines as code: the `.ci.yml` a repository carries, parsed, checked
//! and expanded into the steps a build runs.
//!
//! ```yaml
//! version: 1
//! env: { CARGO_TERM_COLOR: always }
//! matrix:
//!   rust: ["1.85", "stable"]
//! steps:
//!   - name: build
//!     image: "rust:${rust}"
//!     commands: ["cargo build --locked"]
//!   - name: test
//!     depends_on: [build]
//!     commands: ["cargo test"]
//!     agents: { os: linux }
//!     timeout: 30m
//!     retry: { limit: 2, on: [failure] }
//!     when: { branch: [main, "release/*"], event: [push, manual] }
//! ```
//!
//! The file comes from the repository, so it is untrusted: [`parse`] reads
//! it with a panic-free parser under budgets (size, depth, nodes), refuses
//! unknown keys, and checks everything a build needs before anything is
//! queued: names, the dependency graph (no cycles, no unknown or duplicate
//! names), the matrix under its cap, images, labels, timeouts, services.
//! Every error says where ([`PipelineError`]: line and column) and what was
//! expected.
//!
//! The matrix multiplies the whole pipeline: each step runs once per
//! combination, named `build (rust=1.85)`, and depends on the steps of its
//! own combination. `${key}` of a matrix key is replaced in images,
//! commands, `env` values and `agents` values; any other `${...}` is left
//! for the shell.
//!
//! # Layout
//! - `raw`: the file as serde reads it.
//! - `expand`: the matrix, interpolation and the dependency graph.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::model::Service;
use crate::model::{limits, ImageRef, Labels, NewStep};

mod expand;
mod raw;

#[cfg(test)]
mod tests;

/// Limits on a pipeline file and what it expands to.
pub mod caps {
    /// Largest file, in bytes.
    pub const MAX_FILE: usize = 512 * 1024;
    /// Deepest nesting of collections.
    pub const MAX_DEPTH: usize = 16;
    /// Most YAML nodes.
    pub const MAX_NODES: usize = 50_000;
    /// Most steps in the file.
    pub const MAX_STEPS: usize = 256;
    /// Most matrix combinations.
    pub const MAX_COMBINATIONS: usize = 64;
    /// Most steps after the matrix is applied.
    pub const MAX_JOBS: usize = 1024;
    /// Most keys in an `env` or `agents` map, or matrix keys.
    pub const MAX_KEYS: usize = 64;
    /// Longest value in `env`, in characters.
    pub const MAX_VALUE: usize = 4096;
    /// Longest step, matrix key or service name, in characters.
    pub const MAX_NAME: usize = 64;
    /// Most automatic re-runs a step may ask for.
    pub const MAX_RETRIES: u32 = 10;
    /// Most services per step.
    pub const MAX_SERVICES: usize = super::limits::MAX_SERVICES;
}

/// The label of agents with the Docker runner, which a step with an image
/// asks for.
pub const DOCKER_LABEL: &str = "docker=true";

/// The name of the file, unless the server is told otherwise.
pub const DEFAULT_FILE: &str = ".ci.yml";

/// Where a pipeline file is wrong, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{line}:{column}: {message}")]
pub struct PipelineError {
    /// 1-based line (0: the file as a whole).
    pub line: u64,
    /// 1-based column (0: the file as a whole).
    pub column: u64,
    /// What is wrong, and what was expected.
    pub message: String,
}

impl PipelineError {
    fn at(loc: serde_saphyr::Location, message: impl Into<String>) -> PipelineError {
        PipelineError {
            line: loc.line(),
            column: loc.column(),
            message: message.into(),
        }
    }

    fn whole(message: impl Into<String>) -> PipelineError {
        PipelineError {
            line: 0,
            column: 0,
            message: message.into(),
        }
    }

    fn from_yaml(e: &serde_saphyr::Error) -> PipelineError {
        let Some(loc) = e.location() else {
            return PipelineError::whole(e.to_string());
        };
        let text = e.to_string();
        let suffix = format!(" at line {}, column {}", loc.line(), loc.column());
        let message = text.strip_suffix(&suffix).unwrap_or(&text);
        // N.B.: the parser's advice is for the programmer who calls it.
        let message = message
            .split(", set DuplicateKeyPolicy")
            .next()
            .and_then(|m| m.split("; use Option<").next())
            .unwrap_or(message)
            .to_owned();
        PipelineError::at(loc, message)
    }
}

/// What started a build, for `when: {event: [...]}`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// A push to a branch.
    Push,
    /// A pull (merge) request opened or updated.
    PullRequest,
    /// A tag pushed.
    Tag,
    /// Someone pressed a button or ran `ci submit`.
    Manual,
    /// A program called the API.
    Api,
}

/// Why a step may run again by itself.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// Its commands exited non-zero.
    Failure,
    /// It ran out of time.
    Timeout,
    /// Its agent died or fell silent. Such a step is always run again; with
    /// this listed, at most `limit` times.
    AgentLost,
}

/// When a step runs again by itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retry {
    /// Most re-runs.
    pub limit: u32,
    /// For which reasons.
    pub on: Vec<RetryOn>,
}

impl Retry {
    /// The causes as the queue stores them. None listed: every cause, as
    /// GitLab's `retry: 2` retries whatever the failure; but no `retry` at
    /// all (a limit of 0, no causes) leaves lost agents unbounded, as builds
    /// always were.
    pub fn causes(&self) -> crate::model::RetryOn {
        match (self.limit, self.on.as_slice()) {
            (0, []) => crate::model::RetryOn::default(),
            (_, []) => crate::model::RetryOn::ALL,
            (_, on) => crate::model::RetryOn {
                failure: on.contains(&RetryOn::Failure),
                timeout: on.contains(&RetryOn::Timeout),
                agent_lost: on.contains(&RetryOn::AgentLost),
            },
        }
    }
}

/// Which builds a step is part of. Empty lists match everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct When {
    /// Branch patterns: `*` matches within one `/`-separated part, `**`
    /// across parts.
    pub branch: Vec<String>,
    /// What started the build.
    pub event: Vec<Trigger>,
}

impl When {
    /// True if a build of `branch` (none: a bare commit) started by
    /// `trigger` includes the step.
    pub fn matches(&self, branch: Option<&str>, trigger: Trigger) -> bool {
        let branch_ok = self.branch.is_empty()
            || branch.is_some_and(|b| self.branch.iter().any(|p| glob(p.as_bytes(), b.as_bytes())));
        let event_ok = self.event.is_empty() || self.event.contains(&trigger);
        branch_ok && event_ok
    }
}

/// `*` matches any run of bytes but `/`, `**` any run at all. Dynamic
/// programming over (pattern, text) positions: no pattern can make it
/// slow.
pub fn glob(pattern: &[u8], text: &[u8]) -> bool {
    #[derive(Copy, Clone)]
    enum Tok {
        Byte(u8),
        Star,
        AnyStar,
    }
    let mut toks = Vec::with_capacity(pattern.len());
    let mut i = 0;
    while i < pattern.len() {
        if pattern[i..].starts_with(b"**") {
            toks.push(Tok::AnyStar);
            i += 2;
        } else if pattern[i] == b'*' {
            toks.push(Tok::Star);
            i += 1;
        } else {
            toks.push(Tok::Byte(pattern[i]));
            i += 1;
        }
    }
    // matches[j]: the tokens from the current one on match text[j..].
    let mut next = vec![false; text.len() + 1];
    next[text.len()] = true;
    for tok in toks.iter().rev() {
        let mut cur = vec![false; text.len() + 1];
        for j in (0..=text.len()).rev() {
            cur[j] = match *tok {
                Tok::Byte(c) => j < text.len() && text[j] == c && next[j + 1],
                // Empty, or one more byte (not a `/` for `*`) and again.
                Tok::Star => next[j] || (j < text.len() && text[j] != b'/' && cur[j + 1]),
                Tok::AnyStar => next[j] || (j < text.len() && cur[j + 1]),
            };
        }
        next = cur;
    }
    next[0]
}

/// One step of a pipeline, for one matrix combination: the unit that is
/// scheduled, run on one agent, retried and fenced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Unique in the pipeline: the file's name, and the combination if the
    /// pipeline has a matrix (`test (rust=1.85)`).
    pub name: String,
    /// The name in the file.
    pub base: String,
    /// This step's matrix combination.
    pub matrix: BTreeMap<String, String>,
    /// Container image; none: a shell step.
    pub image: Option<ImageRef>,
    /// Shell commands, run in order; the first that fails ends the step.
    pub commands: Vec<String>,
    /// Environment: the pipeline's, then the step's.
    pub env: BTreeMap<String, String>,
    /// Names of the steps that must succeed first.
    pub depends_on: Vec<String>,
    /// Labels an agent must have, all of them.
    pub labels: Labels,
    /// Longest it may run.
    pub timeout: Option<Duration>,
    /// When it runs again by itself.
    pub retry: Retry,
    /// Which builds include it.
    pub when: When,
    /// Its failure does not fail the build, nor skip its dependents.
    pub allow_failure: bool,
    /// Containers beside it (Docker runner only).
    pub services: Vec<Service>,
    /// The project's secrets it gets as environment variables.
    #[serde(default)]
    pub secrets: Vec<String>,
}

impl Step {
    /// The commands as one shell script, as agents that take one command
    /// run it: each command echoed, then run; the first that fails ends it.
    pub fn script(&self) -> String {
        script(&self.commands)
    }
}

/// `commands` as one `sh` script: `set -e`, and each command echoed
/// (`+ cargo test`) before it runs.
pub fn script(commands: &[String]) -> String {
    let mut s = String::from("set -e\n");
    for c in commands {
        let first = c.lines().next().unwrap_or_default();
        let shown = if c.lines().nth(1).is_some() {
            format!("{first} ...")
        } else {
            first.to_owned()
        };
        s.push_str("printf '%s\\n' '+ ");
        s.push_str(&shown.replace('\'', r"'\''"));
        s.push_str("'\n");
        s.push_str(c);
        s.push('\n');
    }
    s
}

/// A checked pipeline: its steps in an order where every step comes after
/// the steps it depends on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pipeline {
    /// The steps.
    pub steps: Vec<Step>,
}

impl Pipeline {
    /// A pipeline of one shell step, `command`: a build of a commit without
    /// a pipeline file, or one given a command.
    pub fn single(command: &str) -> Pipeline {
        Pipeline {
            steps: vec![Step {
                name: "build".into(),
                base: "build".into(),
                matrix: BTreeMap::new(),
                image: None,
                commands: vec![command.to_owned()],
                env: BTreeMap::new(),
                depends_on: Vec::new(),
                labels: Labels::default(),
                timeout: None,
                retry: Retry::default(),
                when: When::default(),
                allow_failure: false,
                services: Vec::new(),
                secrets: Vec::new(),
            }],
        }
    }

    /// The steps a build of `branch` started by `trigger` runs. A step left
    /// out passes its own dependencies on to its dependents, so order is
    /// kept.
    pub fn select(&self, branch: Option<&str>, trigger: Trigger) -> Pipeline {
        let mut kept: Vec<Step> = Vec::new();
        // Dropped step -> what its dependents wait for instead.
        let mut inherited: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for step in &self.steps {
            let mut deps = Vec::new();
            for d in &step.depends_on {
                match inherited.get(d.as_str()) {
                    Some(instead) => deps.extend(instead.iter().cloned()),
                    None => deps.push(d.clone()),
                }
            }
            deps.sort();
            deps.dedup();
            if step.when.matches(branch, trigger) {
                kept.push(Step {
                    depends_on: deps,
                    ..step.clone()
                });
            } else {
                inherited.insert(&step.name, deps);
            }
        }
        Pipeline { steps: kept }
    }
}

impl Step {
    /// The step as the queue stores it: its environment exported and its
    /// commands as one script, as every agent (the original ones too)
    /// takes them.
    ///
    /// N.B.: a step whose agent is lost always runs again, as builds
    /// always have; `retry.limit` bounds those re-runs only when `on`
    /// lists `agent_lost` (or lists nothing).
    pub fn to_new_step(&self) -> NewStep {
        let mut command = String::new();
        for (k, v) in &self.env {
            // Names are checked (A-Z a-z 0-9 _); values are quoted.
            command.push_str(&format!("export {k}='{}'\n", v.replace('\'', r"'\''")));
        }
        command.push_str(&self.script());
        NewStep {
            name: self.name.clone(),
            command,
            image: self.image.as_ref().map(|i| i.as_str().to_owned()),
            timeout_ms: self.timeout.map(|t| {
                u64::try_from(t.as_millis())
                    .unwrap_or(u64::MAX)
                    .clamp(1, limits::MAX_TIMEOUT_MS)
            }),
            labels: match &self.image {
                // Only the Docker runner runs images.
                Some(_) => Labels::parse(self.labels.iter().chain([DOCKER_LABEL]))
                    .unwrap_or_else(|_| self.labels.clone()),
                None => self.labels.clone(),
            },
            depends_on: self.depends_on.clone(),
            allow_failure: self.allow_failure,
            retries: self.retry.limit,
            retry_on: self.retry.causes(),
            matrix: self.matrix.clone(),
            services: self.services.clone(),
            secrets: self.secrets.clone(),
        }
    }
}

impl Pipeline {
    /// The steps as the queue stores them. See [`Step::to_new_step`].
    pub fn to_new_steps(&self) -> Vec<NewStep> {
        self.steps.iter().map(Step::to_new_step).collect()
    }
}

/// Reads, checks and expands a pipeline file.
pub fn parse(text: &str) -> Result<Pipeline, PipelineError> {
    if text.len() > caps::MAX_FILE {
        return Err(PipelineError::whole(format!(
            "the file is {} bytes; at most {} are read",
            text.len(),
            caps::MAX_FILE
        )));
    }
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: caps::MAX_DEPTH,
            max_nodes: caps::MAX_NODES,
            max_documents: 1,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_total_scalar_bytes: caps::MAX_FILE,
        },
        with_snippet: false,
    };
    let file: raw::File =
        serde_saphyr::from_str_with_options(text, options).map_err(|e| PipelineError::from_yaml(&e))?;
    expand::expand(file)
}

/// Longest script a step's commands may make (what an agent that takes
/// one command is sent).
pub(crate) const MAX_SCRIPT: usize = limits::MAX_COMMAND;
