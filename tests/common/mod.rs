//! A cluster of real `ci-server` and `ci-agent` processes on loopback, with
//! a SQLite file and a git repository in a temp dir.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ci_core::protocol::{AgentView, BuildList, BuildView};
pub use ci_testkit::{wait_until, GitRepo, Proc};
use serde_json::Value;

/// The script builds run: `sh build.sh`. Committed per test.
pub const BUILD_COMMAND: &str = "sh build.sh";

pub struct Cluster {
    pub repo: GitRepo,
    pub port: u16,
    pub heartbeat_ms: u64,
    pub missed: u32,
    pub server: Option<Proc>,
    pub agents: Vec<Proc>,
    pub api: Api,
    /// AGENT_TOKEN given to the server and to agents started from now on.
    pub agent_token: Option<String>,
    /// Extra environment for agents started from now on.
    pub agent_env: Vec<(String, String)>,
    /// Extra environment for the server, from its next start on.
    pub server_env: Vec<(String, String)>,
    /// Runs the server under `prlimit` with this many file descriptors.
    pub server_fds: Option<u32>,
    starts: usize,
    // N.B.: last, so it is removed after the processes, whose logs (printed
    // when a test fails) live in it.
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// A cluster whose server expects a heartbeat every `heartbeat_ms` and
    /// tolerates `missed` missing ones. Nothing is started yet.
    pub fn new(heartbeat_ms: u64, missed: u32) -> Cluster {
        let port = ci_testkit::free_port();
        Cluster {
            dir: tempfile::tempdir().unwrap(),
            repo: GitRepo::new(),
            port,
            heartbeat_ms,
            missed,
            server: None,
            agents: Vec::new(),
            api: Api::new(port),
            agent_token: None,
            agent_env: Vec::new(),
            server_env: Vec::new(),
            server_fds: None,
            starts: 0,
        }
    }

    pub fn db_path(&self) -> std::path::PathBuf {
        self.dir.path().join("ci.sqlite")
    }

    /// Starts (or restarts) the server on the cluster's port and database.
    pub fn start_server(&mut self) {
        self.starts += 1;
        let port = self.port.to_string();
        let hb = self.heartbeat_ms.to_string();
        let missed = self.missed.to_string();
        let db = self.db_path();
        let repo = self.repo.url();
        let mut env = vec![
            ("PORT", port.as_str()),
            ("REPO", &repo),
            ("BUILD_COMMAND", BUILD_COMMAND),
            ("DB_PATH", db.to_str().unwrap()),
            ("HEARTBEAT_MS", &hb),
            ("MISSED_HEARTBEATS", &missed),
        ];
        if let Some(t) = &self.agent_token {
            env.push(("AGENT_TOKEN", t));
        }
        env.extend(self.server_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let label = format!("server-{}", self.starts);
        let proc = match self.server_fds {
            Some(n) => Proc::spawn_wrapped(
                "/usr/bin/prlimit",
                &[&format!("--nofile={n}:{n}")],
                "ci-server",
                &label,
                &env,
                self.dir.path(),
            ),
            None => Proc::spawn("ci-server", &label, &[], &env, self.dir.path()),
        };
        self.server = Some(proc);
    }

    /// Waits until the server answers /healthz.
    pub async fn wait_server(&self) {
        let api = &self.api;
        wait_until("the server to answer", Duration::from_secs(20), || async {
            api.http
                .get(api.url("/healthz"))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
        })
        .await;
    }

    pub fn kill_server(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.kill();
            // Keep the log for post-mortems.
            self.agents.push(s);
        }
    }

    /// Starts an agent with its own work dir named `name`; returns its index.
    pub fn start_agent(&mut self, name: &str) -> usize {
        let work = self.dir.path().join(name);
        let port = self.port.to_string();
        // N.B.: push, the mode these suites were written for (they find
        // agents by port and cut them off by address); `connect` is set
        // through `agent_env` by the suites about it.
        let mut env = vec![
            ("AGENT_MODE", "push"),
            ("SERVER_PORT", port.as_str()),
            ("AGENT_PORT", "0"),
            ("WORK_DIR", work.to_str().unwrap()),
            ("RETRY_MAX_MS", "500"),
        ];
        if let Some(t) = &self.agent_token {
            env.push(("AGENT_TOKEN", t));
        }
        env.extend(self.agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let proc = Proc::spawn(
            "ci-agent",
            &format!("{name}-{}", self.agents.len()),
            &[],
            &env,
            self.dir.path(),
        );
        self.agents.push(proc);
        self.agents.len() - 1
    }

    /// Starts an agent bound to (and sending from) loopback address `ip`.
    pub fn start_agent_at(&mut self, name: &str, ip: &str) -> usize {
        let saved = self.agent_env.clone();
        self.agent_env.push(("AGENT_BIND".into(), ip.into()));
        self.agent_env.push(("AGENT_HOST".into(), ip.into()));
        let i = self.start_agent(name);
        self.agent_env = saved;
        i
    }

    /// Index of the agent process whose server-side URL is `url`.
    pub fn agent_index_by_url(&self, url: &str) -> usize {
        let port = url.rsplit(':').next().unwrap();
        self.agents
            .iter()
            .position(|p| p.log().contains(&format!("port={port} ")))
            .unwrap_or_else(|| panic!("no agent process listens on {url}"))
    }

    /// Every build in `ids` finished exactly once: one stored result each,
    /// nothing left unfinished, and a sound database file.
    pub fn assert_exactly_once(&self, ids: &[ci_core::BuildId]) {
        let conn =
            rusqlite::Connection::open_with_flags(self.db_path(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        for id in ids {
            // N.B.: these builds' steps have no retries: one accepted
            // result for each step that ran, none for a skipped one.
            let (status, results, ran): (String, i64, i64) = conn
                .query_row(
                    "SELECT status,
                        (SELECT COUNT(*) FROM step_logs l JOIN steps s ON s.id = l.step_id WHERE s.build_id = b.id),
                        (SELECT COUNT(*) FROM steps s WHERE s.build_id = b.id AND s.status IN ('success', 'failed'))
                     FROM builds b WHERE id = ?1",
                    [id.0],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .unwrap();
            assert!(
                status == "success" || status == "failed",
                "build {id} is {status}"
            );
            assert!(ran > 0, "build {id} ran no step");
            assert_eq!(
                results, ran,
                "build {id} has {results} accepted results for {ran} steps that ran"
            );
        }
        let unfinished: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM builds WHERE status IN ('queued', 'running')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(unfinished, 0, "builds left unfinished");
    }

    /// Waits until the server lists `n` agents, and returns them.
    pub async fn wait_agents(&self, n: usize) -> Vec<AgentView> {
        let api = &self.api;
        wait_until(&format!("{n} agents"), Duration::from_secs(20), || async {
            api.agents().await.ok().filter(|a| a.len() == n)
        })
        .await
    }

    /// The agent process whose server-side URL is `url`.
    pub fn agent_by_port(&mut self, url: &str) -> &mut Proc {
        let i = self.agent_index_by_url(url);
        &mut self.agents[i]
    }

    /// Creates a build of `sha` and waits until an agent really runs it
    /// (not just until the server says `running`); returns the build and
    /// that agent's URL.
    pub async fn create_running(&self, sha: &str) -> (ci_core::BuildId, String) {
        let id = self.api.create(sha).await.id;
        let running = self
            .api
            .wait_build(id, Duration::from_secs(60), "running", |b| {
                b.status == ci_core::BuildStatus::Running
            })
            .await;
        let url = running.agent.expect("a running build has an agent");
        self.api.wait_agent_runs(&url, id).await;
        (id, url)
    }

    /// The pid a build script wrote to `pid-{attempt}` in the cluster's
    /// directory (`echo $$ > .../pid-$CI_BUILD_ATTEMPT`), once it has.
    pub fn read_pid(&self, attempt: u32) -> Option<i32> {
        std::fs::read_to_string(self.dir.path().join(format!("pid-{attempt}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Commits `build.sh` with `script` and returns the SHA.
    pub fn commit_script(&self, script: &str) -> String {
        self.repo.commit(&[("build.sh", script)], script)
    }

    /// Commits `yaml` as the pipeline file, `.ci.yml`; its SHA.
    pub fn commit_pipeline(&self, yaml: &str, message: &str) -> String {
        self.repo.commit(&[(".ci.yml", yaml)], message)
    }
}

pub struct Api {
    pub http: reqwest::Client,
    base: String,
}

impl Api {
    pub fn new(port: u16) -> Api {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Result<(u16, Value)> {
        let r = self.http.post(self.url(path)).json(body).send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// Creates a build; panics unless the server answers 201.
    pub async fn create(&self, hash: &str) -> BuildView {
        self.create_with(&serde_json::json!({ "hash": hash })).await
    }

    /// Creates a build from a whole request body; it must be taken (201).
    pub async fn create_with(&self, body: &Value) -> BuildView {
        let (status, body) = self.post("/api/builds", body).await.unwrap();
        assert_eq!(status, 201, "{body}");
        serde_json::from_value(body).unwrap()
    }

    pub async fn build(&self, id: ci_core::BuildId) -> reqwest::Result<BuildView> {
        self.http
            .get(self.url(&format!("/api/builds/{id}")))
            .send()
            .await?
            .json()
            .await
    }

    pub async fn log(&self, id: ci_core::BuildId) -> reqwest::Result<Value> {
        self.http
            .get(self.url(&format!("/api/builds/{id}/log")))
            .send()
            .await?
            .json()
            .await
    }

    /// The log of one step of build `id`, by its name.
    pub async fn step_log(&self, id: ci_core::BuildId, step: &str) -> reqwest::Result<Value> {
        self.http
            .get(self.url(&format!("/api/builds/{id}/steps/{step}/log")))
            .send()
            .await?
            .json()
            .await
    }

    /// Every build, oldest first.
    pub async fn all_builds(&self) -> reqwest::Result<Vec<BuildView>> {
        let mut all = Vec::new();
        loop {
            let page: BuildList = self
                .http
                .get(self.url(&format!("/api/builds?limit=500&offset={}", all.len())))
                .send()
                .await?
                .json()
                .await?;
            let n = page.builds.len();
            all.extend(page.builds);
            if n < 500 {
                break;
            }
        }
        all.reverse();
        Ok(all)
    }

    pub async fn agents(&self) -> reqwest::Result<Vec<AgentView>> {
        self.http.get(self.url("/api/agents")).send().await?.json().await
    }

    /// Waits until build `id` satisfies `pred`.
    pub async fn wait_build(
        &self,
        id: ci_core::BuildId,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&BuildView) -> bool,
    ) -> BuildView {
        wait_until(&format!("build {id}: {what}"), timeout, || async {
            self.build(id).await.ok().filter(|b| pred(b))
        })
        .await
    }

    /// Waits until the agent at `agent_url` says (on its /healthz) that it
    /// runs a step of build `id` (by the step's id, which is what agents
    /// are sent). `running` on the server only means the dispatch was
    /// committed; the agent may not have received it yet.
    pub async fn wait_agent_runs(&self, agent_url: &str, id: ci_core::BuildId) {
        wait_until(
            &format!("{agent_url} to run build {id}"),
            Duration::from_secs(60),
            || async {
                let build = self.build(id).await.ok()?;
                let step = build
                    .steps
                    .iter()
                    .find(|s| {
                        s.agent.as_deref() == Some(agent_url) && s.status == ci_core::StepStatus::Running
                    })?
                    .id;
                self.runs_step(agent_url, step).await
            },
        )
        .await
    }

    /// `Some` if the agent at `agent_url` says it runs step `step` now.
    pub async fn runs_step(&self, agent_url: &str, step: ci_core::StepId) -> Option<()> {
        let health: Value = self
            .http
            .get(format!("{agent_url}/healthz"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        // N.B.: `builds` are the wire ids, which name attempts; `steps`
        // are the steps' ids.
        let runs = health["steps"]
            .as_array()?
            .iter()
            .any(|b| b.as_i64() == Some(step.0));
        runs.then_some(())
    }

    pub async fn wait_finished(&self, id: ci_core::BuildId, timeout: Duration) -> BuildView {
        self.wait_build(id, timeout, "finished", |b| b.status.is_finished())
            .await
    }
}

/// A process's memory from `/proc/<pid>/status`, in KiB: `VmRSS` or
/// `VmHWM` (the peak).
pub fn memory_kib(pid: nix::unistd::Pid, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Starts counting a process's peak memory (`VmHWM`) again from now.
pub fn reset_peak_memory(pid: nix::unistd::Pid) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

/// Serves `route` on 127.0.0.1 (a port of its own) until the task ends.
pub async fn serve<F>(route: F) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>)
where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(warp::serve(route).incoming(listener).run()))
}

/// `POST /notify_agent` with `body` (and `token`, if given); the reply.
async fn register(api: &Api, token: Option<&str>, body: &Value) -> Value {
    let mut req = api.http.post(api.url("/notify_agent")).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap().json().await.unwrap()
}

/// An agent played by the test: it registers with `/notify_agent` and
/// accepts every `POST /build`, recording it, and runs nothing. Its
/// heartbeats, results and logs are whatever the test sends.
pub struct FakeAgent {
    pub url: String,
    pub id: i64,
    pub secret: Option<String>,
    pub builds: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeAgent {
    /// Starts on 127.0.0.1 and registers (with a session if `session`),
    /// presenting `token` if given. `reply` is the status its `/build`
    /// answers with.
    pub async fn start(api: &Api, token: Option<&str>, session: bool) -> FakeAgent {
        FakeAgent::start_answering(api, token, session, warp::http::StatusCode::OK, None).await
    }

    /// Like [`FakeAgent::start`], answering `/build` with `status` and, if
    /// given, a `Location` header.
    pub async fn start_answering(
        api: &Api,
        token: Option<&str>,
        session: bool,
        status: warp::http::StatusCode,
        location: Option<String>,
    ) -> FakeAgent {
        use warp::Filter;
        let builds = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = builds.clone();
        let route = warp::path!("build")
            .and(warp::post())
            .and(warp::body::json())
            .map(move |body: Value| {
                seen.lock().unwrap().push(body);
                let reply = warp::reply::with_status(warp::reply::json(&serde_json::json!({})), status);
                match &location {
                    Some(l) => warp::reply::Reply::into_response(warp::reply::with_header(
                        reply,
                        "location",
                        l.as_str(),
                    )),
                    None => warp::reply::Reply::into_response(reply),
                }
            });
        let (addr, task) = serve(route).await;
        let body = serde_json::json!({"host": "127.0.0.1", "port": addr.port(), "session": session});
        let reply = register(api, token, &body).await;
        FakeAgent::registered(reply, addr, builds, task)
    }

    /// An agent of the original design: it registers with only `host` and
    /// `port`, takes every `POST /build` it is sent (its `id` is what it
    /// echoes), and says only the original fields.
    pub async fn start_original(api: &Api) -> FakeAgent {
        use warp::Filter;
        let builds = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = builds.clone();
        let route = warp::path!("build")
            .and(warp::post())
            .and(warp::body::json())
            .map(move |body: Value| {
                seen.lock().unwrap().push(body);
                "OK"
            });
        let (addr, task) = serve(route).await;
        let body = serde_json::json!({"host": "http://127.0.0.1", "port": addr.port()});
        let reply = register(api, None, &body).await;
        FakeAgent::registered(reply, addr, builds, task)
    }

    fn registered(
        reply: Value,
        addr: std::net::SocketAddr,
        builds: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
        task: tokio::task::JoinHandle<()>,
    ) -> FakeAgent {
        FakeAgent {
            url: format!("http://127.0.0.1:{}", addr.port()),
            id: reply["id"]
                .as_i64()
                .unwrap_or_else(|| panic!("not registered: {reply}")),
            secret: reply["secret"].as_str().map(str::to_owned),
            builds,
            _task: task,
        }
    }

    /// Posts `body` to `path` on the server as this agent (token, and the
    /// session secret when `proven`).
    pub async fn post(
        &self,
        api: &Api,
        token: Option<&str>,
        proven: bool,
        path: &str,
        body: &Value,
    ) -> (u16, Value) {
        let mut req = api.http.post(api.url(path)).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let (true, Some(s)) = (proven, &self.secret) {
            req = req.header("x-agent-secret", s);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

/// Parses an RFC 3339 timestamp of the API into milliseconds since the epoch.
pub fn millis(rfc3339: &str) -> u64 {
    let t = humantime::parse_rfc3339(rfc3339).unwrap();
    u64::try_from(t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

// === docker ===

/// Whether the Docker tests can run: an engine that answers, and the build
/// image from `scripts/build-images`. Under CI (`CI_REQUIRE_DOCKER=1`) their
/// absence is a failure; elsewhere the test is skipped with the reason.
pub fn docker_or_skip(images: &[&str]) -> bool {
    let why = match std::process::Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
    {
        Err(e) => Some(format!("no docker CLI: {e}")),
        Ok(o) if !o.status.success() => Some(format!(
            "no Docker daemon: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => images
            .iter()
            .find(|i| {
                !std::process::Command::new("docker")
                    .args(["image", "inspect", i])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .map(|i| format!("image {i} is missing; run scripts/build-images")),
    };
    match why {
        None => true,
        Some(why) if std::env::var_os("CI_REQUIRE_DOCKER").is_some() => {
            panic!("Docker tests are required: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}

/// Runs `docker args...` and returns its stdout; `None` on failure (an
/// object listed a moment ago may be gone).
pub fn docker_try(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("docker").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `docker args...` and returns its stdout; panics on failure.
pub fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

impl Cluster {
    /// Ids of the containers (running or not) that the agent working in
    /// `dir/name` created for build `id`.
    pub fn build_containers(&self, name: &str, id: ci_core::BuildId) -> Vec<String> {
        let instance =
            std::fs::read_to_string(self.dir.path().join(name).join("instance")).unwrap_or_default();
        docker(&[
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label=ci.agent={}", instance.trim()),
            "--filter",
            &format!("label=ci.build={id}"),
        ])
        .lines()
        .map(str::to_owned)
        .collect()
    }

    /// Ids of the networks the agent working in `dir/name` created.
    pub fn agent_networks(&self, name: &str) -> Vec<String> {
        let instance =
            std::fs::read_to_string(self.dir.path().join(name).join("instance")).unwrap_or_default();
        docker(&[
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("label=ci.agent={}", instance.trim()),
        ])
        .lines()
        .map(str::to_owned)
        .collect()
    }
}

// === partitions ===

/// iptables rules that cut one loopback address off, removed on drop.
pub struct Partition {
    rules: Vec<Vec<String>>,
}

impl Partition {
    /// Whether this machine lets us add iptables rules (root, iptables).
    pub fn available() -> Result<(), String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("not root".into());
        }
        let ok = std::process::Command::new("iptables")
            .args(["-w", "-L", "INPUT", "-n"])
            .output()
            .map_err(|e| format!("iptables: {e}"))?;
        if !ok.status.success() {
            return Err(format!(
                "iptables -L failed: {}",
                String::from_utf8_lossy(&ok.stderr)
            ));
        }
        Ok(())
    }

    /// Drops every packet from and to `ip` on the loopback interface.
    pub fn cut(ip: &str) -> Partition {
        let tag = format!("ci-test-{}", std::process::id());
        let rules: Vec<Vec<String>> = [["-s", ip], ["-d", ip]]
            .iter()
            .map(|[dir, addr]| {
                [
                    "INPUT",
                    "-i",
                    "lo",
                    dir,
                    addr,
                    "-m",
                    "comment",
                    "--comment",
                    &tag,
                    "-j",
                    "DROP",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            })
            .collect();
        for r in &rules {
            iptables("-I", r);
        }
        Partition { rules }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for r in &self.rules {
            iptables("-D", r);
        }
    }
}

fn iptables(op: &str, rule: &[String]) {
    let out = std::process::Command::new("iptables")
        .arg("-w")
        .arg(op)
        .args(rule)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "iptables {op} {rule:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Partition tests need root and iptables. Under CI (`CI_REQUIRE_FAULTS=1`)
/// their absence is a failure; elsewhere the test is skipped with a reason.
pub fn partitions_or_skip() -> bool {
    match Partition::available() {
        Ok(()) => true,
        Err(why) if std::env::var_os("CI_REQUIRE_FAULTS").is_some() => {
            panic!("partition tests are required but cannot run: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: partition tests need root and iptables: {why}");
            false
        }
    }
}

/// A loopback address for one agent, distinct across tests running at once.
pub fn agent_ip() -> String {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let base = 20 + (std::process::id() % 50) as u8 * 4;
    format!(
        "127.0.0.{}",
        base + NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 4
    )
}
