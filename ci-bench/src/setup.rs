//! The binaries, the repository, the server and the shell agents.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use std::sync::Arc;

use ci_testkit::{free_port, GitRepo, Proc};

use crate::noop::Marks;
use crate::{Error, Opts};

/// Builds `ci-server` and `ci-agent` in this binary's profile, so the run
/// measures the current code.
pub(crate) fn build_binaries() -> Result<(), Error> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "-p", "ci-server", "-p", "ci-agent"]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    if !build.current_dir(root).status()?.success() {
        return Err(Error::Setup("cargo build -p ci-server -p ci-agent failed".into()));
    }
    Ok(())
}

/// The server's address and a client of it, for another task.
#[derive(Clone)]
pub(crate) struct Handle {
    pub(crate) base: String,
    pub(crate) http: reqwest::Client,
}

impl Handle {
    /// `GET path` on the server, as JSON.
    pub(crate) async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        Ok(self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await?
            .json()
            .await?)
    }
}

/// A server on a fresh SQLite file, building one commit of a fresh
/// repository.
pub(crate) struct Bench {
    /// The commit every build builds (a SHA, as CI systems build commits:
    /// a branch name would make each checkout fetch, since a branch may
    /// move).
    pub(crate) sha: String,
    pub(crate) base: String,
    pub(crate) http: reqwest::Client,
    pub(crate) port: u16,
    server: Proc,
    db: PathBuf,
    // Last: the processes above are stopped before their files go.
    tmp: tempfile::TempDir,
    repo: Arc<GitRepo>,
}

impl Bench {
    /// `GET path` on the server, as JSON.
    pub(crate) async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.clone_handle().get(path).await
    }

    /// Starts the server with heartbeats every `heartbeat_ms`, `missed` of
    /// which lose a lease, and waits until it answers.
    pub(crate) async fn start(heartbeat_ms: u64, missed: u32) -> Result<Bench, Error> {
        let tmp = tempfile::tempdir()?;
        let repo = GitRepo::new();
        let sha = repo.commit(&[], "x");
        let port = free_port();
        let db = tmp.path().join("ci.sqlite");
        let path = |p: &std::path::Path| {
            p.to_str()
                .map(str::to_owned)
                .ok_or(Error::Setup("a non-UTF-8 temp path".into()))
        };
        let server = Proc::spawn(
            "ci-server",
            "server",
            &[],
            &[
                ("PORT", &port.to_string()),
                ("REPO", &path(repo.path())?),
                ("DB_PATH", &path(&db)?),
                ("BUILD_COMMAND", "true"),
                ("HEARTBEAT_MS", &heartbeat_ms.to_string()),
                ("MISSED_HEARTBEATS", &missed.to_string()),
                ("RUST_LOG", "warn"),
            ],
            tmp.path(),
        );
        let bench = Bench {
            sha,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder().pool_max_idle_per_host(256).build()?,
            port,
            server,
            db,
            tmp,
            repo: Arc::new(repo),
        };
        bench.wait_server().await?;
        Ok(bench)
    }

    /// Commits `files` to the repository the server builds; returns the
    /// commit's SHA.
    pub(crate) fn commit(&self, files: &[(&str, &str)], message: &str) -> Result<String, Error> {
        Ok(self.repo.commit(files, message))
    }

    /// The repository's path, as the server's REPO.
    pub(crate) fn repo_path(&self) -> Result<String, Error> {
        self.repo
            .path()
            .to_str()
            .map(str::to_owned)
            .ok_or(Error::Setup("a non-UTF-8 temp path".into()))
    }

    /// A handle for another task: the same server and client.
    pub(crate) fn clone_handle(&self) -> Handle {
        Handle {
            base: self.base.clone(),
            http: self.http.clone(),
        }
    }

    /// Submits a build of the bench's commit running `command`; returns
    /// its id.
    pub(crate) async fn submit(&self, command: &str) -> Result<i64, Error> {
        let build: serde_json::Value = self
            .http
            .post(format!("{}/api/builds", self.base))
            .json(&serde_json::json!({"hash": self.sha, "command": command}))
            .send()
            .await?
            .json()
            .await?;
        build["id"]
            .as_i64()
            .ok_or_else(|| Error::Setup(format!("no id in {build}")))
    }

    /// The last `n` lines the server logged.
    pub(crate) fn server_log_tail(&self, n: usize) -> String {
        let log = self.server.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The server's process id.
    pub(crate) fn server_pid(&self) -> u32 {
        self.server.pid().as_raw().unsigned_abs()
    }

    /// Starts the agents `opts` asks for (real `ci-agent` processes with
    /// `--shell`, else in-process no-op ones recording into `marks`) and
    /// waits until all have registered. Returns the processes, if any.
    pub(crate) async fn agents(&self, opts: &Opts, marks: &Arc<Marks>) -> Result<Vec<Proc>, Error> {
        let mut procs = Vec::new();
        if opts.shell {
            for i in 0..opts.agents {
                procs.push(self.spawn_agent(&format!("agent-{i}"), "push")?);
            }
        } else {
            for _ in 0..opts.agents {
                crate::noop::start(&self.base, marks.clone(), false).await?;
            }
        }
        self.wait_agents(opts.agents).await?;
        Ok(procs)
    }

    /// Starts a real `ci-agent` process with the shell runner, working in
    /// its own directory named `label`, in `mode` (`push` or `connect`).
    pub(crate) fn spawn_agent(&self, label: &str, mode: &str) -> Result<Proc, Error> {
        let work = self.tmp.path().join(label);
        let work = work
            .to_str()
            .ok_or(Error::Setup("a non-UTF-8 temp path".into()))?;
        Ok(Proc::spawn(
            "ci-agent",
            label,
            &[],
            &[
                ("SERVER_PORT", &self.port.to_string()),
                ("AGENT_MODE", mode),
                ("AGENT_PORT", "0"),
                ("WORK_DIR", work),
                ("RUST_LOG", "warn"),
            ],
            self.tmp.path(),
        ))
    }

    /// A scratch directory that lives as long as the bench.
    pub(crate) fn dir(&self) -> &std::path::Path {
        self.tmp.path()
    }

    async fn wait_server(&self) -> Result<(), Error> {
        for _ in 0..500 {
            let up = self.http.get(format!("{}/healthz", self.base)).send().await;
            if up.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(Error::Timeout("the server did not start within 5 s".into()))
    }

    pub(crate) async fn wait_agents(&self, n: usize) -> Result<(), Error> {
        for _ in 0..3000 {
            let agents: Vec<serde_json::Value> = self.get("/api/agents").await?;
            if agents.len() >= n {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(Error::Timeout(format!("{n} agents did not register within 30 s")))
    }

    /// Stops the server cleanly (which checkpoints the WAL into the file)
    /// and returns the database file's size.
    pub(crate) fn stop(&mut self) -> u64 {
        self.server.signal(nix::sys::signal::Signal::SIGTERM);
        self.server.wait();
        std::fs::metadata(&self.db).map(|m| m.len()).unwrap_or(0)
    }
}
