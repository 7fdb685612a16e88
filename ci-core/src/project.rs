//! Projects: named repositories that builds belong to, where a build came
//! from ([`Source`]), and the names their secrets go by.
//!
//! Every store has the [default project](Project::DEFAULT): the server's
//! own `REPO`, which builds that name no project belong to, so the
//! original form and the original agents work as before.

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::pipeline::Trigger;

/// A repository with a name, and how its builds are started and reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Project {
    /// Unique; what URLs and `web#42` use ([`Project::check_name`]).
    pub name: String,
    /// The repository, validated as a [`RepoUrl`](crate::RepoUrl) when set.
    pub repo: String,
    /// The branch a build of no branch and the UI start from.
    pub default_branch: String,
    /// Seconds between looks at the remote's branches; 0: never.
    pub poll_interval_s: u32,
    /// Branch patterns a push must match to start a build (`*`, `**`, as
    /// in a pipeline's `when`); empty: every branch.
    pub branches: Vec<String>,
    /// A newer commit of a branch cancels that branch's unfinished build.
    pub cancel_previous: bool,
    /// Where commit statuses go; none: nowhere.
    pub forge: Option<Forge>,
    /// When it was made.
    pub created_at: Timestamp,
}

impl Project {
    /// The project builds belong to when they name none.
    pub const DEFAULT: &'static str = "default";
    /// Seconds between polls unless a project says otherwise.
    pub const DEFAULT_POLL_S: u32 = 60;
    /// Longest poll interval: one day.
    pub const MAX_POLL_S: u32 = 86_400;
    /// Longest project name.
    pub const MAX_NAME: usize = 64;
    /// Most branch patterns.
    pub const MAX_BRANCHES: usize = 64;

    /// A project of `repo` with the defaults.
    pub fn new(name: impl Into<String>, repo: impl Into<String>) -> Project {
        Project {
            name: name.into(),
            repo: repo.into(),
            default_branch: "main".to_owned(),
            poll_interval_s: Self::DEFAULT_POLL_S,
            branches: Vec::new(),
            cancel_previous: false,
            forge: None,
            created_at: Timestamp(0),
        }
    }

    /// The default project as a store first has it: of no repository (the
    /// server sets its `REPO`), not polled.
    pub fn default_project() -> Project {
        Project {
            poll_interval_s: 0,
            ..Project::new(Self::DEFAULT, "")
        }
    }

    /// A name is 1 to 64 ASCII letters, digits, `.`, `_` and `-`, starting
    /// with a letter or digit: safe in a URL path, a file name and a log.
    pub fn check_name(name: &str) -> Result<()> {
        let ok = !name.is_empty()
            && name.len() <= Self::MAX_NAME
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(
                "name",
                format!(
                    "{name:?}: 1 to {} letters, digits, '.', '_' or '-', starting with a letter or digit",
                    Self::MAX_NAME
                ),
            ))
        }
    }

    /// Checks everything but the repository (which the server checks
    /// against its allowed schemes).
    pub fn validate(&self) -> Result<()> {
        Self::check_name(&self.name)?;
        crate::CommitRef::parse(&self.default_branch).map_err(|_| {
            Error::invalid(
                "defaultBranch",
                format!("{:?} is not a branch name", self.default_branch),
            )
        })?;
        if self.poll_interval_s > Self::MAX_POLL_S {
            return Err(Error::invalid(
                "pollInterval",
                format!(
                    "at most {} seconds (a day); 0 turns polling off",
                    Self::MAX_POLL_S
                ),
            ));
        }
        if self.branches.len() > Self::MAX_BRANCHES
            || self
                .branches
                .iter()
                .any(|b| b.is_empty() || b.len() > 255 || b.chars().any(char::is_control))
        {
            return Err(Error::invalid(
                "branches",
                format!(
                    "at most {} patterns of 1 to 255 bytes without control characters",
                    Self::MAX_BRANCHES
                ),
            ));
        }
        if let Some(forge) = &self.forge {
            forge.validate()?;
        }
        Ok(())
    }

    /// True if a push to `branch` starts a build.
    pub fn builds_branch(&self, branch: &str) -> bool {
        self.branches.is_empty()
            || self
                .branches
                .iter()
                .any(|p| crate::pipeline::glob(p.as_bytes(), branch.as_bytes()))
    }
}

/// Which forge's API commit statuses go to.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForgeKind {
    /// GitHub (and GitHub Enterprise).
    Github,
    /// Gitea and Forgejo.
    Gitea,
    /// GitLab.
    Gitlab,
}

impl ForgeKind {
    /// Its name in URLs (`/hooks/{name}`) and settings.
    pub fn as_str(self) -> &'static str {
        match self {
            ForgeKind::Github => "github",
            ForgeKind::Gitea => "gitea",
            ForgeKind::Gitlab => "gitlab",
        }
    }
}

/// A project's repository on a forge, for commit statuses. Its token is
/// a secret ([`SecretName::FORGE_TOKEN`]), never stored here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forge {
    /// Which API.
    pub kind: ForgeKind,
    /// The API's base: `https://api.github.com`, `https://gitea.example`
    /// (`/api/v1` is added), `https://gitlab.example` (`/api/v4` is added).
    pub url: String,
    /// The repository: `owner/name`; for GitLab a project id or its path.
    pub repo: String,
}

impl Forge {
    /// Checks the URL's scheme and the repository's shape.
    pub fn validate(&self) -> Result<()> {
        let url_ok = (self.url.starts_with("https://") || self.url.starts_with("http://"))
            && self.url.len() <= 2048
            && !self.url.chars().any(|c| c.is_control() || c.is_whitespace());
        if !url_ok {
            return Err(Error::invalid("forge.url", "an http(s) URL without spaces"));
        }
        let part_ok = |p: &str| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        let parts: Vec<&str> = self.repo.split('/').collect();
        let ok = match self.kind {
            ForgeKind::Gitlab => self.repo.len() <= 1024 && parts.iter().all(|p| part_ok(p)),
            _ => parts.len() == 2 && parts.iter().all(|p| part_ok(p)),
        };
        if !ok {
            return Err(Error::invalid(
                "forge.repo",
                "owner/name (GitLab: a project id or its path), of letters, digits, '.', '_' and '-'",
            ));
        }
        Ok(())
    }
}

/// The name of a project's secret.
pub struct SecretName;

impl SecretName {
    /// The webhook secret: kept with the secrets, but no step can ask for
    /// it (not a variable name).
    pub const WEBHOOK: &'static str = ":webhook";
    /// The forge token commit statuses are sent with.
    pub const FORGE_TOKEN: &'static str = ":forge-token";
    /// Longest name.
    pub const MAX_LEN: usize = 128;
    /// Largest value, in bytes.
    pub const MAX_VALUE: usize = 64 * 1024;

    /// A secret a step can ask for is an environment variable's name:
    /// a letter or `_`, then letters, digits and `_`. Names starting with
    /// `CI_` are the system's own.
    pub fn check(name: &str) -> Result<()> {
        let ok = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with("CI_");
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(
                "name",
                format!(
                    "{name:?}: an environment variable's name (letters, digits, '_'; not starting with a digit or CI_), at most {} bytes",
                    Self::MAX_LEN
                ),
            ))
        }
    }
}

/// Where a build came from: its project, and what started it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// The project it belongs to.
    pub project: String,
    /// What started it; none for builds made before it was kept.
    pub event: Option<Trigger>,
    /// The commit's subject line, for display.
    pub subject: Option<String>,
    /// The commit's author, for display.
    pub author: Option<String>,
    /// Its code is not the project's own (a pull request from a fork): its
    /// steps get no secrets.
    pub untrusted: bool,
    /// The forge's id of the webhook delivery that started it: a second
    /// build of the same delivery is refused.
    pub delivery: Option<String>,
}

impl Default for Source {
    fn default() -> Source {
        Source {
            project: Project::DEFAULT.to_owned(),
            event: None,
            subject: None,
            author: None,
            untrusted: false,
            delivery: None,
        }
    }
}

impl Source {
    /// Longest subject or author kept, in bytes.
    pub const MAX_TEXT: usize = 1024;

    /// Cuts the display fields to [`Source::MAX_TEXT`] bytes, without
    /// control characters.
    pub fn tidy(&mut self) {
        for text in [&mut self.subject, &mut self.author].into_iter().flatten() {
            let mut clean: String = text.chars().filter(|c| !c.is_control()).collect();
            crate::model::truncate_at_char(&mut clean, Self::MAX_TEXT);
            *text = clean;
        }
    }
}

/// The message commits carry to skip CI, as GitLab, GitHub and Woodpecker
/// read it: `[skip ci]` or `[ci skip]`, any case.
pub fn skips_ci(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    lower.contains("[skip ci]") || lower.contains("[ci skip]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["web", "a", "my-app_2.0", &"x".repeat(64)] {
            assert!(Project::check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".x", "a/b", "a b", "ä", &"x".repeat(65), "a\n"] {
            assert!(Project::check_name(bad).is_err(), "{bad:?}");
        }
        for ok in ["TOKEN", "_x", "aws_key2"] {
            assert!(SecretName::check(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1X",
            "A-B",
            "CI_TOKEN",
            SecretName::WEBHOOK,
            SecretName::FORGE_TOKEN,
        ] {
            assert!(SecretName::check(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn skip_markers() {
        assert!(skips_ci("docs: typo [skip ci]"));
        assert!(skips_ci("[CI SKIP] wip"));
        assert!(!skips_ci("skip ci"));
    }

    #[test]
    fn forges_and_filters() {
        let mut p = Project::new("web", "/srv/web.git");
        assert!(p.validate().is_ok());
        p.branches = vec!["main".into(), "release/**".into()];
        assert!(p.builds_branch("main") && p.builds_branch("release/1/2"));
        assert!(!p.builds_branch("feature/x"));
        p.forge = Some(Forge {
            kind: ForgeKind::Github,
            url: "http://127.0.0.1:1".into(),
            repo: "acme/web".into(),
        });
        assert!(p.validate().is_ok());
        p.forge = Some(Forge {
            kind: ForgeKind::Github,
            url: "http://127.0.0.1:1".into(),
            repo: "acme/../x".into(),
        });
        assert!(p.validate().is_err());
        p.forge = None;
        p.poll_interval_s = Project::MAX_POLL_S + 1;
        assert!(p.validate().is_err());
    }
}
