//! The shell runner: `sh -c <command>` in a fresh checkout, as a process
//! group that is killed when the build ends or is abandoned.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use ci_core::{Job, LogSink, RepoUrl, RunError, Runner, Stream};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use crate::Error;
use ci_git::Checkouts;

/// Runs builds as local processes. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct ShellRunner {
    checkouts: Checkouts,
    repo_schemes: Vec<String>,
}

impl ShellRunner {
    /// A runner keeping checkouts under `checkouts`, accepting repositories
    /// with these URL schemes.
    pub fn new(checkouts: Checkouts, repo_schemes: Vec<String>) -> ShellRunner {
        ShellRunner {
            checkouts,
            repo_schemes,
        }
    }
}

/// Kills a process group when dropped: the build's shell and everything it
/// started, including what it left in the background.
struct ProcessGroup(Pid);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // ESRCH: the group is already gone, which is what we want.
        let _ = killpg(self.0, Signal::SIGKILL);
    }
}

/// Exit code of a process: its status, or 128 + the signal that killed it.
pub(crate) fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

async fn pump(mut from: impl AsyncRead + Unpin, stream: Stream, log: LogSink) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => log.write(stream, &buf[..n]),
        }
    }
}

#[async_trait]
impl Runner for ShellRunner {
    async fn run(&self, job: &Job, log: &LogSink) -> Result<i32, RunError> {
        let (repo, commit) = (&job.repo, &job.commit);
        // Jobs are validated, but maybe against other schemes than ours.
        RepoUrl::parse_with(repo.as_str(), &self.repo_schemes).map_err(|e| RunError::Setup(e.to_string()))?;
        let name = format!("{}-{}", job.step, job.attempt.map_or(0, |a| a.0));
        let ws = self
            .checkouts
            .checkout(repo, commit, &name)
            .await
            .map_err(Error::from)?;
        log.write(
            Stream::Stdout,
            format!(
                "ci: checked out {} at {}\n",
                &ws.commit[..12.min(ws.commit.len())],
                ws.path().display()
            )
            .as_bytes(),
        );

        // N.B.: env_clear: the agent's environment holds its secrets.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&job.command)
            .current_dir(ws.path())
            .env_clear()
            .envs(crate::env::inherited())
            .envs(crate::env::ci_variables(job, &ws.commit, repo))
            .envs(&job.secrets.0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| RunError::from(Error::Spawn(e.to_string())))?;
        let group = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(|id| ProcessGroup(Pid::from_raw(id)));
        let stdout = child
            .stdout
            .take()
            .map(|s| tokio::spawn(pump(s, Stream::Stdout, log.clone())));
        let stderr = child
            .stderr
            .take()
            .map(|s| tokio::spawn(pump(s, Stream::Stderr, log.clone())));

        let status = child
            .wait()
            .await
            .map_err(|e| RunError::from(Error::Spawn(e.to_string())))?;
        // The shell is done; whatever it left running goes with it, so the
        // pipes close and the next build starts clean.
        drop(group);
        for mut pump in [stdout, stderr].into_iter().flatten() {
            // A process that escaped the group may hold a pipe open: stop
            // reading after a grace period rather than hang.
            if tokio::time::timeout(Duration::from_secs(5), &mut pump)
                .await
                .is_err()
            {
                pump.abort();
            }
        }
        Ok(exit_code(status))
    }
}
