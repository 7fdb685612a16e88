//! The environment a build sees. The agent's own environment holds its
//! secrets (`AGENT_TOKEN`, cloud credentials, a `CI_TOKEN` for the `ci`
//! command), so builds never inherit it: they get an allow-list of it, and
//! the `CI_*` variables.

use std::ffi::OsString;

use ci_core::{Job, RepoUrl};

/// What a build inherits from the agent's environment: what a shell and
/// common tools need to work (the locale: also every `LC_*`), nothing that
/// could be a secret.
pub const INHERITED: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "TZ", "LANG", "LANGUAGE",
];

/// The allow-listed part of the agent's environment.
pub(crate) fn inherited() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| {
            k.to_str()
                .is_some_and(|k| INHERITED.contains(&k) || k.starts_with("LC_"))
        })
        .collect()
}

/// The `CI_*` variables of `job`, checked out at `commit` from `repo`. The
/// repository is shown without credentials.
pub(crate) fn ci_variables(job: &Job, commit: &str, repo: &RepoUrl) -> Vec<(&'static str, String)> {
    // N.B.: a server of the original design sends only `id`, its build.
    let build = job.build.map_or(job.step.0, |b| b.0);
    let mut vars = vec![
        ("CI", "true".to_owned()),
        ("CI_BUILD_ID", build.to_string()),
        ("CI_STEP_ID", job.step.to_string()),
        ("CI_BUILD_ATTEMPT", job.attempt.map_or(0, |a| a.0).to_string()),
        ("CI_COMMIT", commit.to_owned()),
        ("CI_REPO", repo.to_string()),
    ];
    if let Some(name) = &job.name {
        vars.push(("CI_STEP", name.clone()));
    }
    vars
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_allow_list_is_inherited() {
        let names: Vec<String> = inherited()
            .into_iter()
            .filter_map(|(k, _)| k.into_string().ok())
            .collect();
        assert!(names
            .iter()
            .all(|k| INHERITED.contains(&k.as_str()) || k.starts_with("LC_")));
        assert!(!names.iter().any(|k| k.contains("TOKEN")));
    }
}
