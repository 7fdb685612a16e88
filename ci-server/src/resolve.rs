//! Builds are of full commit SHAs: a branch, a tag or a short SHA is
//! resolved through the server's own repository cache when the build is
//! created, so the build records what it built and a rebuild builds the
//! same commit.
//!
//! N.B.: a server that cannot reach the repository (it may be mounted only
//! into the agents) still takes the build, with the ref as given, and the
//! agent resolves it, as before; it tries again after [`RETRY_AFTER`]. A
//! ref that the repository, fetched, does not have is refused at once.

use std::time::Duration;

use ci_core::{CommitRef, RepoUrl};
use ci_git::Checkouts;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// How long the server leaves a repository it could not reach alone.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// How long creating a build may wait for git (a fetch from a server that
/// does not answer); then the ref is kept as given.
pub const GIT_TIMEOUT: Duration = Duration::from_secs(20);

/// A commit as resolved: its full SHA, and the branch the ref named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The full SHA.
    pub sha: CommitRef,
    /// The branch, if the ref was one.
    pub branch: Option<String>,
}

/// Why a ref could not be resolved.
#[derive(Debug)]
pub enum Unresolved {
    /// The repository, fetched, has no such commit.
    NotFound(String),
}

/// The server's repository cache.
pub struct Resolver {
    git: Checkouts,
    /// Repositories left alone until then, each on its own: one project's
    /// dead git server holds up no other project.
    unreachable_until: Mutex<std::collections::HashMap<RepoUrl, Instant>>,
    timeout: Duration,
    /// Pipeline files read lately, by commit and path: a commit's file
    /// never changes, and builds of one commit come in runs (rebuilds,
    /// retries, a matrix of triggers).
    files: std::sync::Mutex<FileCache>,
    /// What commits said of themselves, by repository and SHA: builds of
    /// one commit come in runs, and `git show` per build would cost more
    /// than the rest of creating it.
    infos: std::sync::Mutex<std::collections::HashMap<(RepoUrl, String), ci_git::CommitInfo>>,
}

/// The last [`FileCache::CAP`] pipeline files read.
#[derive(Default)]
struct FileCache {
    order: std::collections::VecDeque<(String, String)>,
    files: std::collections::HashMap<(String, String), PipelineFile>,
}

impl FileCache {
    const CAP: usize = 256;

    fn get(&self, key: &(String, String)) -> Option<PipelineFile> {
        self.files.get(key).cloned()
    }

    fn put(&mut self, key: (String, String), file: PipelineFile) {
        if self.files.insert(key.clone(), file).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > Self::CAP {
            if let Some(old) = self.order.pop_front() {
                self.files.remove(&old);
            }
        }
    }
}

impl Resolver {
    /// A resolver caching repositories under `dir`.
    pub fn new(dir: &std::path::Path) -> Result<Resolver, ci_git::Error> {
        Ok(Resolver {
            git: Checkouts::new(dir)?,
            unreachable_until: Mutex::default(),
            timeout: GIT_TIMEOUT,
            files: std::sync::Mutex::default(),
            infos: std::sync::Mutex::default(),
        })
    }

    /// Waits at most `timeout` for git instead of [`GIT_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Resolver {
        self.timeout = timeout;
        self
    }

    /// `commit` of `repo` as a full SHA. `Ok(None)`: the repository cannot
    /// be reached now, keep the ref as given.
    pub async fn resolve(&self, repo: &RepoUrl, commit: &CommitRef) -> Result<Option<Resolved>, Unresolved> {
        let hex = commit.as_str().bytes().all(|b| b.is_ascii_hexdigit());
        if hex && matches!(commit.as_str().len(), 40 | 64) {
            return Ok(Some(Resolved {
                sha: commit.clone(),
                branch: None,
            }));
        }
        {
            let mut left = self.unreachable_until.lock().await;
            let now = Instant::now();
            left.retain(|_, until| now < *until);
            if left.contains_key(repo) {
                return Ok(None);
            }
        }
        // N.B.: git is killed when its future is dropped.
        let resolved = match tokio::time::timeout(self.timeout, self.git.resolve(repo, commit)).await {
            Ok(r) => r,
            Err(_) => Err(ci_git::Error::Checkout(format!(
                "git did not answer within {:?}",
                self.timeout
            ))),
        };
        match resolved {
            Ok(sha) => {
                let branch = self
                    .git
                    .is_branch(repo, commit)
                    .await
                    .then(|| commit.as_str().to_owned());
                let sha = CommitRef::parse(&sha).map_err(|e| Unresolved::NotFound(e.to_string()))?;
                Ok(Some(Resolved { sha, branch }))
            }
            Err(ci_git::Error::NotFound(m)) => Err(Unresolved::NotFound(m)),
            Err(e) => {
                tracing::warn!(repo = %repo.redacted(), cause = %e, "cannot reach the repository: builds keep their refs as given, agents resolve them");
                self.unreachable_until
                    .lock()
                    .await
                    .insert(repo.clone(), Instant::now() + RETRY_AFTER);
                Ok(None)
            }
        }
    }
}

impl Resolver {
    /// What commit `sha` (full, resolved before) says of itself; none if
    /// git cannot tell in time.
    pub async fn commit_info(&self, repo: &RepoUrl, sha: &CommitRef) -> Option<ci_git::CommitInfo> {
        let key = (repo.clone(), sha.as_str().to_owned());
        let known = self
            .infos
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .cloned();
        if known.is_some() {
            return known;
        }
        let info = self.read_commit_info(repo, sha).await?;
        let mut infos = self
            .infos
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if infos.len() >= FileCache::CAP {
            infos.clear();
        }
        infos.insert(key, info.clone());
        Some(info)
    }

    async fn read_commit_info(&self, repo: &RepoUrl, sha: &CommitRef) -> Option<ci_git::CommitInfo> {
        let read = async {
            // N.B.: fetches the commit if the cache lacks it (a full SHA
            // is resolved without git).
            self.git.resolve(repo, sha).await?;
            self.git.commit_info(repo, sha.as_str()).await
        };
        match tokio::time::timeout(self.timeout, read).await {
            Ok(Ok(info)) => Some(info),
            Ok(Err(e)) => {
                tracing::debug!(repo = %repo.redacted(), cause = %e, "cannot read the commit");
                None
            }
            Err(_) => None,
        }
    }

    /// The remote's branches and their commits (`git ls-remote`).
    pub async fn ls_remote(&self, repo: &RepoUrl) -> Result<Vec<(String, String)>, ci_git::Error> {
        match tokio::time::timeout(self.timeout, self.git.ls_remote(repo)).await {
            Ok(r) => r,
            Err(_) => Err(ci_git::Error::Checkout(format!(
                "git ls-remote did not answer within {:?}",
                self.timeout
            ))),
        }
    }
}

/// What a commit's pipeline file holds.
#[derive(Clone, Debug)]
pub enum PipelineFile {
    /// The commit has no such file.
    Absent,
    /// The file, read.
    Text(std::sync::Arc<str>),
    /// The file cannot be used (too large, not UTF-8): the build fails
    /// with this.
    Unusable(String),
    /// The repository cannot be reached now.
    Unreachable,
}

impl Resolver {
    /// `path` at the full SHA `sha` of `repo`, fetched if the cache lacks
    /// the commit.
    pub async fn pipeline_file(&self, repo: &RepoUrl, sha: &CommitRef, path: &str) -> PipelineFile {
        let key = (sha.as_str().to_owned(), path.to_owned());
        let cached = self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key);
        if let Some(file) = cached {
            return file;
        }
        let file = self.read_pipeline_file(repo, sha, path).await;
        if !matches!(file, PipelineFile::Unreachable) {
            self.files
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .put(key, file.clone());
        }
        file
    }

    async fn read_pipeline_file(&self, repo: &RepoUrl, sha: &CommitRef, path: &str) -> PipelineFile {
        let cap = ci_core::pipeline::caps::MAX_FILE as u64;
        let read = async {
            // N.B.: resolving a full SHA fetches only what the cache lacks.
            self.git.resolve(repo, sha).await?;
            self.git.read_file(repo, sha.as_str(), path, cap).await
        };
        let read = match tokio::time::timeout(self.timeout, read).await {
            Ok(r) => r,
            Err(_) => return PipelineFile::Unreachable,
        };
        match read {
            Ok(None) => PipelineFile::Absent,
            Ok(Some(bytes)) => match String::from_utf8(bytes) {
                Ok(text) => PipelineFile::Text(text.into()),
                Err(_) => PipelineFile::Unusable(format!("{path} is not UTF-8 text")),
            },
            Err(ci_git::Error::NotFound(m)) => PipelineFile::Unusable(m),
            Err(ci_git::Error::TooLarge(m)) => PipelineFile::Unusable(m),
            Err(e) => {
                tracing::warn!(repo = %repo.redacted(), cause = %e, "cannot read the pipeline file");
                PipelineFile::Unreachable
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A git server that accepts and never answers cannot hold up build
    /// creation: after the timeout the ref is kept as given, and the
    /// repository is left alone for a while.
    #[tokio::test]
    async fn a_git_server_that_never_answers_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let resolver = Resolver::new(dir.path())
            .unwrap()
            .with_timeout(Duration::from_millis(300));
        let repo = RepoUrl::parse(&format!("git://127.0.0.1:{port}/repo")).unwrap();
        let main = CommitRef::parse("main").unwrap();
        assert!(resolver.resolve(&repo, &main).await.unwrap().is_none());
        assert!(resolver.unreachable_until.lock().await.contains_key(&repo));
        // Left alone: answered at once, without git.
        assert!(resolver.resolve(&repo, &main).await.unwrap().is_none());
        held.abort();
    }
}
