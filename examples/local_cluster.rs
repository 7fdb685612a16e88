//! The whole system in one process: a server with a temporary SQLite file
//! and two shell agents that connect to it (listening on no port), building a small git
//! repository with a passing and a failing commit.
//!
//! ```text
//! cargo run --example local_cluster
//! REPO=/path/to/repo BUILD_COMMAND="make test" cargo run --example local_cluster
//! ```
//!
//! With `REPO` set, it builds that repository's `HEAD` with `BUILD_COMMAND`
//! (default `git log -1 --oneline`) instead. Set `RUST_LOG=info` to see the
//! server's and agents' logs.

use std::collections::BTreeMap;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Duration;

use ci_agent::{Agent, AgentConfig, Checkouts, ShellRunner};
use ci_core::protocol::{AgentView, BuildView};
use ci_core::{BuildStatus, RepoUrl};
use ci_server::{Server, ServerConfig};
use tokio::net::TcpListener;
use tokio::time::Instant;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// A build to submit and the status it should end in.
struct Plan {
    hash: String,
    command: Option<String>,
    expect: BuildStatus,
    what: &'static str,
}

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("local_cluster: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<bool, Error> {
    let tmp = tempfile::tempdir()?;
    let (repo, plans) = match std::env::var("REPO") {
        Ok(repo) => {
            let command = std::env::var("BUILD_COMMAND").unwrap_or_else(|_| "git log -1 --oneline".into());
            let plan = Plan {
                hash: "HEAD".into(),
                command: Some(command),
                expect: BuildStatus::Success,
                what: "HEAD of $REPO",
            };
            (repo, vec![plan])
        }
        Err(_) => make_demo_repo(&tmp.path().join("repo"))?,
    };
    let repo = RepoUrl::parse(&repo)?;

    // The server: SQLite in the temp dir, a free port, quick heartbeats.
    let mut config = ServerConfig::new(repo.clone(), tmp.path().join("ci.sqlite"));
    config.build_command = Some("sh build.sh".into());
    // The server resolves branches and short SHAs to full SHAs.
    config.git_cache = Some(tmp.path().join("git"));
    config.lease = ci_core::LeasePolicy::new(Duration::from_millis(250), 4)?;
    let server = Server::open(config).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server_task = tokio::spawn(server.serve(listener, until_stopped(stopped.clone())));
    println!("server   {base}  (SQLite in {})", tmp.path().display());

    // Two shell agents, each with its own work dir. They connect to the
    // server and listen on no port.
    let mut agent_tasks = Vec::new();
    for name in ["agent-1", "agent-2"] {
        let config = AgentConfig::new(&base, tmp.path().join(name));
        let runner = ShellRunner::new(Checkouts::new(&config.work_dir)?, config.repo_schemes.clone());
        let agent = Agent::new(config, Arc::new(runner))?;
        println!("{name}  connected to {base}");
        agent_tasks.push(tokio::spawn(agent.connect(until_stopped(stopped.clone()))));
    }

    let http = reqwest::Client::new();
    wait_for_agents(&http, &base, 2).await?;
    println!("\nrepository {repo}");

    let t0 = Instant::now();
    let mut ids = Vec::new();
    for p in &plans {
        let mut body = serde_json::json!({ "hash": p.hash });
        if let Some(c) = &p.command {
            body["command"] = c.clone().into();
        }
        let resp = http.post(format!("{base}/api/builds")).json(&body).send().await?;
        let status = resp.status();
        if status != reqwest::StatusCode::CREATED {
            return Err(format!("creating a build failed: {status} {}", resp.text().await?).into());
        }
        let b: BuildView = resp.json().await?;
        println!("submitted build #{} {:<10} {}", b.id, short(&b.hash), p.what);
        ids.push(b.id);
    }

    // Follow the builds until every one has finished, printing each change.
    let mut last: BTreeMap<i64, BuildStatus> = BTreeMap::new();
    let finished = loop {
        let mut all = Vec::new();
        for id in &ids {
            let b: BuildView = http
                .get(format!("{base}/api/builds/{id}"))
                .send()
                .await?
                .json()
                .await?;
            if last.insert(b.id.0, b.status) != Some(b.status) {
                let on = b.agent.as_deref().map(|a| format!(" on {a}")).unwrap_or_default();
                println!(
                    "{:>7.2}s  build #{} {}{on}",
                    t0.elapsed().as_secs_f64(),
                    b.id,
                    b.status
                );
            }
            all.push(b);
        }
        if all.iter().all(|b| b.status.is_finished()) {
            break all;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            return Err("builds did not finish within 2 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    println!(
        "\n{:<4} {:<10} {:<6} {:<8} {:<24} {:>9}  command",
        "id", "commit", "branch", "status", "agent", "duration"
    );
    let mut as_expected = true;
    for (b, p) in finished.iter().zip(&plans) {
        let ok = b.status == p.expect;
        as_expected &= ok;
        println!(
            "{:<4} {:<10} {:<6} {:<8} {:<24} {:>7}ms  {}{}",
            b.id,
            short(&b.hash),
            b.branch.as_deref().unwrap_or("-"),
            b.status,
            b.agent.as_deref().unwrap_or("-"),
            b.duration_ms.unwrap_or(0),
            b.command,
            if ok { "" } else { "   <- unexpected" }
        );
    }
    let failing = finished.iter().find(|b| b.status == BuildStatus::Failed);
    if let Some(b) = failing {
        let log: serde_json::Value = http
            .get(format!("{base}/api/builds/{}/log", b.id))
            .send()
            .await?
            .json()
            .await?;
        println!(
            "\nstderr of failed build #{}:\n{}",
            b.id,
            log["stderr"].as_str().unwrap_or("").trim_end()
        );
    }
    println!(
        "\n{} builds finished in {:.2}s; {}",
        finished.len(),
        t0.elapsed().as_secs_f64(),
        if as_expected {
            "all as expected"
        } else {
            "SOME NOT AS EXPECTED"
        }
    );

    let _ = stop.send(true);
    server_task.await??;
    for t in agent_tasks {
        t.await??;
    }
    Ok(as_expected)
}

async fn wait_for_agents(http: &reqwest::Client, base: &str, n: usize) -> Result<(), Error> {
    let t0 = Instant::now();
    loop {
        let agents: Vec<AgentView> = http
            .get(format!("{base}/api/agents"))
            .send()
            .await?
            .json()
            .await?;
        if agents.len() >= n {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!("only {} of {n} agents registered", agents.len()).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(10)]
}

/// A repository with a passing commit and, on top, a failing one.
fn make_demo_repo(dir: &std::path::Path) -> Result<(String, Vec<Plan>), Error> {
    std::fs::create_dir_all(dir)?;
    let git = |args: &[&str]| -> Result<String, Error> {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=ci",
                "-c",
                "user.email=ci@localhost",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .output()?;
        if !out.status.success() {
            return Err(format!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    };
    git(&["init", "--quiet", "--initial-branch=main"])?;
    std::fs::write(
        dir.join("build.sh"),
        "echo compiling...\nsleep 0.3\necho tests passed\n",
    )?;
    git(&["add", "--all"])?;
    git(&["commit", "--quiet", "-m", "a passing build"])?;
    let pass = git(&["rev-parse", "HEAD"])?;
    std::fs::write(
        dir.join("build.sh"),
        "echo compiling...\necho 'error: test failed' >&2\nexit 1\n",
    )?;
    git(&["commit", "--quiet", "--all", "-m", "a failing build"])?;
    let fail = git(&["rev-parse", "HEAD"])?;
    let plans = vec![
        Plan {
            hash: pass.clone(),
            command: None,
            expect: BuildStatus::Success,
            what: "passing commit",
        },
        Plan {
            hash: fail,
            command: None,
            expect: BuildStatus::Failed,
            what: "failing commit",
        },
        Plan {
            hash: pass[..8].to_owned(),
            command: Some("sh build.sh && git log -1 --format=%s".into()),
            expect: BuildStatus::Success,
            what: "passing commit, short SHA, own command",
        },
        Plan {
            hash: "main".into(),
            command: Some("test -f build.sh && echo on main".into()),
            expect: BuildStatus::Success,
            what: "branch name",
        },
    ];
    Ok((dir.display().to_string(), plans))
}
