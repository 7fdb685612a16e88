//! From the file as written to checked steps: names, the dependency graph,
//! the matrix, interpolation, and every value a step carries.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use super::{caps, raw, Pipeline, PipelineError, Retry, Service, Step, When, MAX_SCRIPT};
use crate::model::{limits, ImageRef, Labels};

type Result<T> = std::result::Result<T, PipelineError>;

fn err<T>(loc: Location, message: impl Into<String>) -> Result<T> {
    Err(PipelineError::at(loc, message))
}

pub(super) fn expand(file: raw::File) -> Result<Pipeline> {
    if file.version.value != 1 {
        return err(
            file.version.referenced,
            format!("version {} is not known: expected 1", file.version.value),
        );
    }
    let steps = file.steps.value;
    if steps.is_empty() {
        return err(file.steps.referenced, "steps: expected at least one step");
    }
    if steps.len() > caps::MAX_STEPS {
        return err(
            file.steps.referenced,
            format!("{} steps: at most {} are allowed", steps.len(), caps::MAX_STEPS),
        );
    }
    let combinations = match &file.matrix {
        Some(m) => combinations(m)?,
        None => vec![BTreeMap::new()],
    };
    if combinations.len() * steps.len() > caps::MAX_JOBS {
        return Err(PipelineError::whole(format!(
            "{} steps times {} matrix combinations is {} jobs: at most {} are allowed",
            steps.len(),
            combinations.len(),
            steps.len() * combinations.len(),
            caps::MAX_JOBS
        )));
    }
    let global_env = match &file.env {
        Some(env) => check_env(env)?,
        None => BTreeMap::new(),
    };
    let order = graph(&steps)?;
    let mut out = Vec::with_capacity(steps.len() * combinations.len());
    for &i in &order {
        let step = &steps[i];
        let deps = dependencies(&steps, i);
        let common = Common::check(step, &global_env)?;
        for combo in &combinations {
            out.push(common.instance(step, &deps, combo)?);
        }
    }
    Ok(Pipeline { steps: out })
}

/// A step's name as the file writes it: 1 to 64 of `A-Z a-z 0-9 _ . -`,
/// starting with a letter or a digit.
fn check_name(name: &Spanned<String>, what: &str) -> Result<()> {
    let n = &name.value;
    let ok = !n.is_empty()
        && n.chars().count() <= caps::MAX_NAME
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        err(
            name.referenced,
            format!(
                "{what} {n:?}: expected 1 to {} of A-Z a-z 0-9 _ . -, starting with a letter or digit",
                caps::MAX_NAME
            ),
        )
    }
}

fn is_env_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= caps::MAX_NAME
        && k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check_env(env: &Spanned<BTreeMap<String, String>>) -> Result<BTreeMap<String, String>> {
    if env.value.len() > caps::MAX_KEYS {
        return err(
            env.referenced,
            format!("env: {} variables, at most {}", env.value.len(), caps::MAX_KEYS),
        );
    }
    for (k, v) in &env.value {
        if !is_env_key(k) {
            return err(
                env.referenced,
                format!("env: {k:?} is not a variable name (A-Z a-z 0-9 _, not starting with a digit)"),
            );
        }
        if v.chars().count() > caps::MAX_VALUE || v.contains('\0') {
            return err(
                env.referenced,
                format!(
                    "env: the value of {k} is longer than {} characters or holds NUL",
                    caps::MAX_VALUE
                ),
            );
        }
    }
    Ok(env.value.clone())
}

/// The cartesian product of the matrix, checked against its cap before it
/// is built.
fn combinations(m: &Spanned<BTreeMap<String, Vec<String>>>) -> Result<Vec<BTreeMap<String, String>>> {
    if m.value.is_empty() {
        return err(m.referenced, "matrix: expected at least one key");
    }
    if m.value.len() > caps::MAX_KEYS {
        return err(m.referenced, format!("matrix: at most {} keys", caps::MAX_KEYS));
    }
    let mut count: usize = 1;
    for (k, values) in &m.value {
        if !is_env_key(k) {
            return err(
                m.referenced,
                format!("matrix: {k:?} is not a name (A-Z a-z 0-9 _, not starting with a digit)"),
            );
        }
        if values.is_empty() {
            return err(m.referenced, format!("matrix: {k} has no values"));
        }
        if let Some(v) = values
            .iter()
            .find(|v| v.chars().count() > 128 || v.contains(char::is_control))
        {
            return err(
                m.referenced,
                format!(
                    "matrix: value {v:?} of {k} is longer than 128 characters or holds control characters"
                ),
            );
        }
        count = count.saturating_mul(values.len());
    }
    if count > caps::MAX_COMBINATIONS {
        return err(
            m.referenced,
            format!(
                "the matrix has {count} combinations: at most {} are allowed (nothing is cut silently)",
                caps::MAX_COMBINATIONS
            ),
        );
    }
    let mut out = vec![BTreeMap::new()];
    for (k, values) in &m.value {
        out = out
            .into_iter()
            .flat_map(|combo: BTreeMap<String, String>| {
                values.iter().map(move |v| {
                    let mut c = combo.clone();
                    c.insert(k.clone(), v.clone());
                    c
                })
            })
            .collect();
    }
    Ok(out)
}

/// The names each step waits for: its `depends_on`, or by default the step
/// before it.
fn dependencies(steps: &[raw::Step], i: usize) -> Vec<String> {
    match &steps[i].depends_on {
        Some(deps) => deps.iter().map(|d| d.value.clone()).collect(),
        None if i > 0 => vec![steps[i - 1].name.value.clone()],
        None => Vec::new(),
    }
}

/// Checks names and dependencies; returns the steps in an order where each
/// comes after what it waits for (the file's order where it can).
fn graph(steps: &[raw::Step]) -> Result<Vec<usize>> {
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, s) in steps.iter().enumerate() {
        check_name(&s.name, "step name")?;
        if index.insert(&s.name.value, i).is_some() {
            return err(
                s.name.referenced,
                format!("step name {:?} is used twice: names must be unique", s.name.value),
            );
        }
    }
    let mut waits: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); steps.len()];
    for (i, s) in steps.iter().enumerate() {
        for d in s.depends_on.iter().flatten() {
            let Some(&j) = index.get(d.value.as_str()) else {
                return err(
                    d.referenced,
                    format!(
                        "step {:?} depends on {:?}, which is not a step",
                        s.name.value, d.value
                    ),
                );
            };
            if j == i {
                return err(d.referenced, format!("step {:?} depends on itself", s.name.value));
            }
            waits[i].insert(j);
        }
        if s.depends_on.is_none() && i > 0 {
            waits[i].insert(i - 1);
        }
    }
    // Kahn's algorithm, lowest index first.
    let mut order = Vec::with_capacity(steps.len());
    let mut done = vec![false; steps.len()];
    while order.len() < steps.len() {
        let next = (0..steps.len()).find(|&i| !done[i] && waits[i].iter().all(|&j| done[j]));
        let Some(i) = next else {
            let stuck: Vec<usize> = (0..steps.len()).filter(|&i| !done[i]).collect();
            let cycle = cycle(&waits, &stuck);
            let names: Vec<&str> = cycle.iter().map(|&i| steps[i].name.value.as_str()).collect();
            let first = cycle.first().copied().unwrap_or(stuck[0]);
            return err(
                steps[first].name.referenced,
                format!(
                    "the steps depend on each other in a cycle: {}",
                    names.join(" -> ")
                ),
            );
        };
        done[i] = true;
        order.push(i);
    }
    Ok(order)
}

/// One cycle among `stuck` (steps none of which can start): follow
/// undone dependencies until a step repeats.
fn cycle(waits: &[BTreeSet<usize>], stuck: &[usize]) -> Vec<usize> {
    let stuck_set: BTreeSet<usize> = stuck.iter().copied().collect();
    let mut path: Vec<usize> = Vec::new();
    let mut at = stuck[0];
    loop {
        if let Some(pos) = path.iter().position(|&p| p == at) {
            let mut c = path[pos..].to_vec();
            c.push(at);
            return c;
        }
        path.push(at);
        match waits[at].iter().find(|j| stuck_set.contains(j)) {
            Some(&j) => at = j,
            None => return path,
        }
    }
}

/// What a step carries that does not depend on the matrix, checked once.
struct Common {
    env: BTreeMap<String, String>,
    timeout: Option<Duration>,
    retry: Retry,
    when: When,
    secrets: Vec<String>,
}

impl Common {
    fn check(step: &raw::Step, global_env: &BTreeMap<String, String>) -> Result<Common> {
        if step.commands.value.is_empty() {
            return err(
                step.commands.referenced,
                "commands: expected at least one command",
            );
        }
        if step
            .commands
            .value
            .iter()
            .any(|c| c.trim().is_empty() || c.contains('\0'))
        {
            return err(
                step.commands.referenced,
                "commands: a command is empty or holds NUL",
            );
        }
        let mut env = global_env.clone();
        if let Some(e) = &step.env {
            env.extend(check_env(e)?);
        }
        let timeout = match &step.timeout {
            Some(t) => Some(timeout(t)?),
            None => None,
        };
        let retry = match &step.retry {
            Some(r) if r.value.limit > caps::MAX_RETRIES => {
                return err(
                    r.referenced,
                    format!("retry: limit {} is over {}", r.value.limit, caps::MAX_RETRIES),
                )
            }
            Some(r) => Retry {
                limit: r.value.limit,
                on: r.value.on.clone(),
            },
            None => Retry::default(),
        };
        let when = match &step.when {
            Some(w) => {
                for b in &w.branch {
                    if b.value.is_empty()
                        || b.value.len() > limits::MAX_BRANCH
                        || b.value.contains(char::is_control)
                    {
                        return err(
                            b.referenced,
                            format!("when: branch pattern {:?} is not valid", b.value),
                        );
                    }
                }
                When {
                    branch: w.branch.iter().map(|b| b.value.clone()).collect(),
                    event: w.event.clone(),
                }
            }
            None => When::default(),
        };
        if let (None, Some(s)) = (&step.image, &step.services) {
            return err(
                s.referenced,
                "services: only a step with an image has services (they run beside its container)",
            );
        }
        let mut secrets = Vec::new();
        if let Some(s) = &step.secrets {
            if s.value.len() > limits::MAX_SECRETS {
                return err(s.referenced, format!("secrets: at most {}", limits::MAX_SECRETS));
            }
            for name in &s.value {
                if crate::project::SecretName::check(name).is_err() {
                    return err(
                        s.referenced,
                        format!(
                            "secrets: {name:?} is not a variable name (letters, digits, '_'; not CI_...)"
                        ),
                    );
                }
                if env.contains_key(name) {
                    return err(s.referenced, format!("secrets: {name} is also set in env"));
                }
                if !secrets.contains(name) {
                    secrets.push(name.clone());
                }
            }
        }
        Ok(Common {
            env,
            timeout,
            retry,
            when,
            secrets,
        })
    }

    /// The step for one matrix combination.
    fn instance(&self, step: &raw::Step, deps: &[String], combo: &BTreeMap<String, String>) -> Result<Step> {
        let name = |base: &str| {
            if combo.is_empty() {
                base.to_owned()
            } else {
                let pairs: Vec<String> = combo.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{base} ({})", pairs.join(", "))
            }
        };
        let step_image = match &step.image {
            Some(i) => Some(image(i, combo)?),
            None => None,
        };
        let commands: Vec<String> = step
            .commands
            .value
            .iter()
            .map(|c| interpolate(c, combo))
            .collect();
        let env: BTreeMap<String, String> = self
            .env
            .iter()
            .map(|(k, v)| (k.clone(), interpolate(v, combo)))
            .collect();
        // N.B.: the script an agent gets exports the environment first.
        let exports: usize = env
            .iter()
            .map(|(k, v)| k.len() + v.chars().count() * 4 + 12)
            .sum();
        if super::script(&commands).chars().count() + exports > MAX_SCRIPT {
            return err(
                step.commands.referenced,
                format!("commands and env: longer than {MAX_SCRIPT} characters in all"),
            );
        }
        let labels = match &step.agents {
            Some(a) => labels(a, combo)?,
            None => Labels::default(),
        };
        let mut services = Vec::new();
        if let Some(s) = &step.services {
            if s.value.len() > caps::MAX_SERVICES {
                return err(s.referenced, format!("services: at most {}", caps::MAX_SERVICES));
            }
            for (service, spec) in &s.value {
                if !Service::is_name(service) {
                    return err(
                        s.referenced,
                        format!("services: {service:?} is not a host name (1 to 63 of A-Z a-z 0-9 -)"),
                    );
                }
                let env = match &spec.env {
                    Some(e) => check_env(e)?
                        .into_iter()
                        .map(|(k, v)| (k, interpolate(&v, combo)))
                        .collect(),
                    None => BTreeMap::new(),
                };
                let command = match &spec.command {
                    Some(c) if c.value.iter().any(|a| a.contains('\0')) => {
                        return err(c.referenced, format!("services: {service}: command holds NUL"))
                    }
                    Some(c) => c.value.iter().map(|a| interpolate(a, combo)).collect(),
                    None => Vec::new(),
                };
                services.push(Service {
                    name: service.clone(),
                    image: image(&spec.image, combo)?,
                    env,
                    command,
                });
            }
            if let Err(e) = Service::validate_all(&services) {
                return err(s.referenced, e.to_string());
            }
        }
        Ok(Step {
            name: name(&step.name.value),
            base: step.name.value.clone(),
            matrix: combo.clone(),
            image: step_image,
            commands,
            env,
            depends_on: deps.iter().map(|d| name(d)).collect(),
            labels,
            timeout: self.timeout,
            retry: self.retry.clone(),
            when: self.when.clone(),
            allow_failure: step.allow_failure,
            services,
            secrets: self.secrets.clone(),
        })
    }
}

fn timeout(t: &Spanned<String>) -> Result<Duration> {
    let d = humantime::parse_duration(t.value.trim()).or_else(|_| {
        err(
            t.referenced,
            format!(
                "timeout {:?}: expected a duration such as 90s, 30m or 2h",
                t.value
            ),
        )
    })?;
    let max = Duration::from_millis(limits::MAX_TIMEOUT_MS);
    if d < Duration::from_secs(1) || d > max {
        return err(
            t.referenced,
            format!("timeout {:?}: expected 1s to 7 days", t.value),
        );
    }
    Ok(d)
}

fn image(i: &Spanned<String>, combo: &BTreeMap<String, String>) -> Result<ImageRef> {
    ImageRef::parse(&interpolate(&i.value, combo)).or_else(|e| err(i.referenced, e.to_string()))
}

fn labels(a: &Spanned<BTreeMap<String, String>>, combo: &BTreeMap<String, String>) -> Result<Labels> {
    let pairs: Vec<String> = a
        .value
        .iter()
        .map(|(k, v)| format!("{k}={}", interpolate(v, combo)))
        .collect();
    Labels::parse(&pairs).or_else(|e| err(a.referenced, format!("agents: {e}")))
}

/// Replaces `${key}` for each key of `combo`, in one pass (a value is
/// never read again); anything else is left as it is, for the shell.
fn interpolate(s: &str, combo: &BTreeMap<String, String>) -> String {
    if combo.is_empty() || !s.contains("${") {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        match after
            .find('}')
            .and_then(|end| combo.get(&after[..end]).map(|v| (end, v)))
        {
            Some((end, v)) => {
                out.push_str(v);
                rest = &after[end + 1..];
            }
            None => {
                out.push_str("${");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}
