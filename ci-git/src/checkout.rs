//! Checking out a commit into a fresh workspace, through a per-repository
//! cache so each build fetches only new objects.
//!
//! N.B.: nothing from the request reaches git unchecked. The repository URL
//! is a validated [`RepoUrl`] and comes after `--`; the ref is a validated
//! [`CommitRef`] and goes through `rev-parse --end-of-options`; the commit
//! git checks out is the full SHA that `rev-parse` printed.
//!
//! A build costs two processes besides its command: `git checkout`, and
//! `git rev-parse` the first time a SHA is built (a SHA once resolved is
//! remembered). The workspace's `.git` is written directly, not by `git
//! init`; each process saved is 3–9 ms on a small VM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};

use ci_core::{CommitRef, RepoUrl};
use tokio::process::Command;

use crate::Error;

/// How many resolved SHAs an agent remembers (a few hundred KiB at most).
const REMEMBERED: usize = 4096;

/// Workspaces and repository caches under one directory.
#[derive(Debug, Clone)]
pub struct Checkouts {
    root: PathBuf,
    locks: Arc<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>>,
    /// SHAs (as requested, lowercased) already resolved in a cache, with the
    /// full commit SHA they resolved to. Only SHAs: a ref name may move. At
    /// most [`REMEMBERED`] entries; when full it starts over.
    resolved: Arc<Mutex<HashMap<(PathBuf, String), String>>>,
}

/// What a commit says of itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitInfo {
    /// The message's first line.
    pub subject: String,
    /// `Name <email>`.
    pub author: String,
    /// The whole message.
    pub message: String,
}

/// A checked-out commit in its own directory, removed on drop.
#[derive(Debug)]
pub struct Workspace {
    path: PathBuf,
    /// The full SHA checked out.
    pub commit: String,
}

impl Workspace {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), cause = %e, "could not remove workspace");
            }
        }
    }
}

impl Checkouts {
    /// Workspaces under `root/builds`, caches under `root/repos`. Removes
    /// workspaces a previous run left behind.
    pub fn new(root: impl Into<PathBuf>) -> Result<Checkouts, Error> {
        let root = root.into();
        let builds = root.join("builds");
        if builds.exists() {
            std::fs::remove_dir_all(&builds).map_err(|e| Error::io(&builds, e))?;
        }
        for dir in [builds, root.join("repos")] {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        Ok(Checkouts {
            root,
            locks: Arc::default(),
            resolved: Arc::default(),
        })
    }

    fn cache_dir(&self, repo: &RepoUrl) -> PathBuf {
        // A stable, filesystem-safe name: FNV-1a of the URL.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in repo.as_str().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.root.join("repos").join(format!("{h:016x}.git"))
    }

    fn lock_for(&self, dir: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        locks.entry(dir.to_path_buf()).or_default().clone()
    }

    /// The full SHA of `commit` in `repo`, fetching what the cache lacks (a
    /// ref name is always fetched: it may have moved). [`Error::NotFound`]
    /// if the repository, fetched, has no such commit; [`Error::Checkout`]
    /// if git cannot reach it.
    pub async fn resolve(&self, repo: &RepoUrl, commit: &CommitRef) -> Result<String, Error> {
        let cache = self.cache_dir(repo);
        let lock = self.lock_for(&cache);
        let _guard = lock.lock().await;
        self.update_cache(repo, &cache, commit)
            .await
            .map_err(|e| scrub(repo, e))
    }

    /// True if `name` is a branch of `repo`, as of the last fetch.
    pub async fn is_branch(&self, repo: &RepoUrl, name: &CommitRef) -> bool {
        let cache = self.cache_dir(repo);
        git(
            Some(&cache),
            &["rev-parse", "--verify", "--quiet", "--end-of-options"],
        )
        .arg(format!("refs/heads/{}", name.as_str()))
        .run("find the branch")
        .await
        .is_ok()
    }

    /// The contents of `path` at commit `sha` of `repo` (resolved first),
    /// if it is a file of at most `cap` bytes: `Ok(None)` if there is no
    /// such file, [`Error::TooLarge`] if it is larger.
    pub async fn read_file(
        &self,
        repo: &RepoUrl,
        sha: &str,
        path: &str,
        cap: u64,
    ) -> Result<Option<Vec<u8>>, Error> {
        let valid = sha.len() >= 40
            && sha.bytes().all(|b| b.is_ascii_hexdigit())
            && !path.is_empty()
            && !path.starts_with(['/', '-'])
            && !path.split('/').any(|p| p.is_empty() || p == "." || p == "..")
            && !path.contains(['\0', ':', '\n']);
        if !valid {
            return Err(Error::Checkout(format!(
                "not a commit and a file: {sha} {path:?}"
            )));
        }
        let cache = self.cache_dir(repo);
        let object = format!("{sha}:{path}");
        let kind = git(Some(&cache), &["cat-file", "-t", "--end-of-options"])
            .arg(&object)
            .output("find the file")
            .await;
        match kind.as_deref().map(str::trim) {
            Ok("blob") => {}
            // Absent, or a directory: not a file.
            _ => return Ok(None),
        }
        let size = git(Some(&cache), &["cat-file", "-s", "--end-of-options"])
            .arg(&object)
            .output("size the file")
            .await?;
        let size: u64 = size.trim().parse().unwrap_or(u64::MAX);
        if size > cap {
            return Err(Error::TooLarge(format!(
                "{path} is {size} bytes at {sha}; at most {cap} are read"
            )));
        }
        let bytes = git(Some(&cache), &["cat-file", "blob", "--end-of-options"])
            .arg(&object)
            .bytes("read the file")
            .await?;
        Ok(Some(bytes))
    }

    /// The subject line, author and full message of commit `sha` of
    /// `repo`, from the cache (resolve it first).
    pub async fn commit_info(&self, repo: &RepoUrl, sha: &str) -> Result<CommitInfo, Error> {
        if sha.len() < 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Checkout(format!("not a full commit SHA: {sha:?}")));
        }
        let cache = self.cache_dir(repo);
        let out = git(
            Some(&cache),
            &["show", "-s", "--format=%an <%ae>%x00%B", "--end-of-options"],
        )
        .arg(sha)
        .output("read the commit")
        .await
        .map_err(|e| scrub(repo, e))?;
        let (author, message) = out.split_once('\0').unwrap_or(("", &out));
        Ok(CommitInfo {
            subject: message.lines().next().unwrap_or_default().trim().to_owned(),
            author: author.trim().to_owned(),
            message: message.trim_end().to_owned(),
        })
    }

    /// The branches of `repo` and the commits they point at, asked of the
    /// remote itself (`git ls-remote --heads`), without fetching.
    pub async fn ls_remote(&self, repo: &RepoUrl) -> Result<Vec<(String, String)>, Error> {
        let out = git(None, &["ls-remote", "--heads", "--end-of-options"])
            .arg(repo.as_str())
            .output("list the remote's branches")
            .await
            .map_err(|e| scrub(repo, e))?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let (sha, name) = l.split_once('\t')?;
                let branch = name.strip_prefix("refs/heads/")?;
                let ok = sha.len() >= 40 && sha.bytes().all(|b| b.is_ascii_hexdigit());
                ok.then(|| (branch.to_owned(), sha.to_owned()))
            })
            .collect())
    }

    /// Checks out `commit` of `repo` into a new workspace named `name`.
    pub async fn checkout(&self, repo: &RepoUrl, commit: &CommitRef, name: &str) -> Result<Workspace, Error> {
        self.checkout_unscrubbed(repo, commit, name)
            .await
            .map_err(|e| scrub(repo, e))
    }

    async fn checkout_unscrubbed(
        &self,
        repo: &RepoUrl,
        commit: &CommitRef,
        name: &str,
    ) -> Result<Workspace, Error> {
        let cache = self.cache_dir(repo);
        let key = commit
            .is_sha()
            .then(|| (cache.clone(), commit.as_str().to_ascii_lowercase()));
        let remembered = key.as_ref().and_then(|k| self.remembered(k));
        if let (Some(sha), Some(key)) = (remembered, &key) {
            match self.workspace(repo, &cache, sha, name).await {
                Ok(ws) => return Ok(ws),
                Err(e) => {
                    // The cache lost the commit (removed, or pruned by a
                    // gc): forget it and take the full path.
                    tracing::debug!(commit = %commit, cause = %e, "remembered commit not usable");
                    self.resolved().remove(key);
                }
            }
        }
        let sha = {
            let lock = self.lock_for(&cache);
            let _guard = lock.lock().await;
            self.update_cache(repo, &cache, commit).await?
        };
        if let Some(key) = key {
            self.remember(key, sha.clone());
        }
        self.workspace(repo, &cache, sha, name).await
    }

    fn resolved(&self) -> std::sync::MutexGuard<'_, HashMap<(PathBuf, String), String>> {
        self.resolved.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn remember(&self, key: (PathBuf, String), sha: String) {
        let mut resolved = self.resolved();
        if resolved.len() >= REMEMBERED {
            resolved.clear();
        }
        resolved.insert(key, sha);
    }

    fn remembered(&self, key: &(PathBuf, String)) -> Option<String> {
        self.resolved().get(key).cloned()
    }

    /// A workspace like `git clone --shared` makes, built directly: a clone
    /// negotiates refs over a transport even from a local path, and `git
    /// init` is a process of its own. Objects come from the cache
    /// (alternates); its branches become origin/*, its tags are copied, HEAD
    /// is detached at the commit.
    async fn workspace(
        &self,
        repo: &RepoUrl,
        cache: &Path,
        sha: String,
        name: &str,
    ) -> Result<Workspace, Error> {
        let path = self.root.join("builds").join(name);
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        // From here on, the guard removes the directory on any failure.
        let ws = Workspace { path, commit: sha };
        let dot_git = ws.path().join(".git");
        let objects = std::fs::canonicalize(cache.join("objects")).map_err(|e| Error::io(cache, e))?;
        for dir in ["objects/info", "refs/heads", "refs/tags"] {
            let dir = dot_git.join(dir);
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        // The build sees the remote without the credentials it was cloned with.
        let origin = repo.redacted().replace('\\', "\\\\").replace('"', "\\\"");
        let files = [
            ("HEAD", "ref: refs/heads/main\n".to_owned()),
            (
                "config",
                format!(
                    "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n\tlogallrefupdates = true\n\
                     [remote \"origin\"]\n\turl = \"{origin}\"\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n"
                ),
            ),
            ("objects/info/alternates", format!("{}\n", objects.display())),
            ("packed-refs", workspace_refs(cache)),
        ];
        for (file, text) in files {
            let file = dot_git.join(file);
            std::fs::write(&file, text).map_err(|e| Error::io(&file, e))?;
        }
        git(
            Some(ws.path()),
            &[
                "-c",
                "advice.detachedHead=false",
                "checkout",
                "--quiet",
                "--detach",
            ],
        )
        .arg(&ws.commit)
        .run("check out the commit")
        .await?;
        Ok(ws)
    }

    /// Makes sure the cache holds `commit` and returns its full SHA.
    async fn update_cache(&self, repo: &RepoUrl, cache: &Path, commit: &CommitRef) -> Result<String, Error> {
        if !cache.join("HEAD").exists() {
            let tmp = cache.with_extension("tmp");
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
            }
            git(None, &["clone", "--quiet", "--bare", "--"])
                .arg(repo.as_str())
                .arg(&tmp)
                .run(&format!("clone {repo}"))
                .await?;
            // N.B.: rename last, so a crash mid-clone never leaves a cache
            // that looks complete.
            std::fs::rename(&tmp, cache).map_err(|e| Error::io(cache, e))?;
        } else if commit.is_sha() {
            if let Ok(sha) = resolve(cache, commit).await {
                return Ok(sha);
            }
            fetch(cache).await?;
        } else {
            // A ref may have moved since the last build: always fetch.
            fetch(cache).await?;
        }
        match resolve(cache, commit).await {
            Ok(sha) => Ok(sha),
            Err(e) if commit.is_sha() => {
                // Not reachable from any ref: ask for the object itself, which
                // servers that allow it will send.
                let fetched = git(Some(cache), &["fetch", "--quiet", "origin", "--"])
                    .arg(commit.as_str())
                    .run("fetch the commit")
                    .await;
                match fetched {
                    Ok(()) => resolve(cache, commit).await,
                    Err(_) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }
}

/// The cache's branches (as `refs/remotes/origin/*`) and tags, as the
/// contents of a `packed-refs` file. Loose refs win over packed ones, as in
/// git. No peeled lines: git peels tags itself when it needs to.
fn workspace_refs(cache: &Path) -> String {
    let mut refs = std::collections::BTreeMap::new();
    let rename = |name: &str| {
        if let Some(b) = name.strip_prefix("refs/heads/") {
            Some(format!("refs/remotes/origin/{b}"))
        } else {
            name.starts_with("refs/tags/").then(|| name.to_owned())
        }
    };
    if let Ok(text) = std::fs::read_to_string(cache.join("packed-refs")) {
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with('^'))
        {
            if let Some((sha, name)) = line.split_once(' ') {
                if let Some(n) = rename(name) {
                    refs.insert(n, sha.to_owned());
                }
            }
        }
    }
    let mut stack = vec![cache.join("refs/heads"), cache.join("refs/tags")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let (Ok(rel), Ok(sha)) = (path.strip_prefix(cache), std::fs::read_to_string(&path)) else {
                continue;
            };
            let sha = sha.trim();
            if let (Some(n), true) = (rename(&rel.to_string_lossy()), sha.len() >= 40) {
                refs.insert(n, sha.to_owned());
            }
        }
    }
    refs.iter().map(|(name, sha)| format!("{sha} {name}\n")).collect()
}

async fn fetch(cache: &Path) -> Result<(), Error> {
    git(
        Some(cache),
        &[
            "fetch",
            "--quiet",
            "--prune",
            "--force",
            "origin",
            "+refs/heads/*:refs/heads/*",
            "+refs/tags/*:refs/tags/*",
        ],
    )
    .run("fetch")
    .await
}

async fn resolve(cache: &Path, commit: &CommitRef) -> Result<String, Error> {
    let out = git(
        Some(cache),
        &["rev-parse", "--verify", "--quiet", "--end-of-options"],
    )
    .arg(format!("{}^{{commit}}", commit.as_str()))
    .output("resolve")
    .await
    .map_err(|_| Error::NotFound(format!("commit {commit} not found in the repository")))?;
    let sha = out.trim().to_owned();
    if sha.len() >= 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(sha)
    } else {
        Err(Error::NotFound(format!(
            "commit {commit} not found in the repository"
        )))
    }
}

/// N.B.: git's messages may quote the URL, credentials and all.
fn scrub(repo: &RepoUrl, e: Error) -> Error {
    match e {
        Error::Checkout(msg) => Error::Checkout(repo.scrub(&msg)),
        Error::NotFound(msg) => Error::NotFound(repo.scrub(&msg)),
        e => e,
    }
}

struct Git(Command);

fn git(dir: Option<&Path>, args: &[&str]) -> Git {
    let mut cmd = Command::new("git");
    if let Some(dir) = dir {
        cmd.arg("-C").arg(dir);
    }
    // Never prompt for credentials, never run a remote helper command.
    cmd.args(["-c", "protocol.ext.allow=never", "-c", "core.hooksPath=/dev/null"])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    Git(cmd)
}

impl Git {
    fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Git {
        self.0.arg(a);
        self
    }

    async fn output(self, what: &str) -> Result<String, Error> {
        self.bytes(what)
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    async fn run(self, what: &str) -> Result<(), Error> {
        self.output(what).await.map(drop)
    }

    async fn bytes(mut self, what: &str) -> Result<Vec<u8>, Error> {
        let out = self
            .0
            .output()
            .await
            .map_err(|e| Error::Checkout(format!("cannot run git to {what}: {e}")))?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            Err(Error::Checkout(format!(
                "git could not {what}: {}",
                stderr.trim()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_shas_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let checkouts = Checkouts::new(dir.path()).unwrap();
        for i in 0..REMEMBERED * 2 + 1 {
            checkouts.remember((PathBuf::from("c"), format!("{i:040x}")), format!("{i:040x}"));
            assert!(checkouts.resolved().len() <= REMEMBERED);
        }
        let last = (PathBuf::from("c"), format!("{:040x}", REMEMBERED * 2));
        assert!(checkouts.remembered(&last).is_some(), "the newest entry is kept");
    }
}
