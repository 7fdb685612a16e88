//! Benchmark harness: a real `ci-server` process (release build, SQLite file
//! on disk) and K agents speaking the real protocol over loopback.
//!
//! ```text
//! cargo run --release --example bench -- --agents 16 --builds 5000
//! cargo run --release --example bench -- --agents 2 --builds 200 --shell      # real ci-agent processes, shell runner
//! cargo run --release --example bench -- --lone 50 --shell                      # one build at a time
//! cargo run --release --example bench -- --failover                             # dead-agent detection and requeue
//! cargo run --release --example bench -- --agents 16 --builds 1000 --submitters 1  # one build at a time
//! cargo run --release --example bench -- --agents 16 --builds 5000 --rate 1000     # open-loop arrivals
//! ```
//!
//! No-op mode runs K agents in this process: each answers `POST /build` at
//! once and reports success (`POST /notify_build_result`) right away, so the
//! figures are the server's own cost. `--shell` starts K real `ci-agent`
//! processes with the shell runner building `true` in a small repository.
//!
//! Reported: throughput (first submit to last completion), dispatch latency
//! (submit sent to the agent holding the build), submit-to-complete latency
//! (submit sent to the result acknowledged), the server's CPU seconds and
//! peak RSS, the SQLite file per 1,000 builds, and the list endpoint's
//! latency on the first and on a deep page. A table, then one JSON line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ci_core::protocol::{BuildRequest, NotifyAgentReply, NotifyBuildResult};
use tokio::time::Instant;
use warp::Filter;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The commit every build builds (a SHA, as CI systems build commits: a
/// branch name would make each checkout fetch, since a branch may move).
static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn hash() -> &'static str {
    HASH.get().map_or("main", String::as_str)
}

#[derive(Debug, Clone)]
struct Opts {
    agents: usize,
    builds: usize,
    concurrency: usize,
    shell: bool,
    lone: usize,
    failover: bool,
    /// Waiting submitters in the latency phase (default: half the agents).
    submitters: Option<usize>,
    /// Instead of waiting submitters: builds arriving at this many per
    /// second, independently of each other (Poisson), whatever the server's
    /// pace (open loop).
    rate: Option<f64>,
    /// With waiting submitters: a pause between a build's completion and the
    /// submitter's next build (lets the machine go idle between builds).
    pause_ms: u64,
}

fn parse_args() -> Result<Opts, Error> {
    let mut o = Opts {
        agents: 16,
        builds: 5000,
        concurrency: 64,
        shell: false,
        lone: 0,
        failover: false,
        submitters: None,
        rate: None,
        pause_ms: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<usize, Error> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            Ok(v.parse().map_err(|_| format!("{name}: {v:?} is not a number"))?)
        };
        match a.as_str() {
            "--agents" => o.agents = num("--agents")?.max(1),
            "--builds" => o.builds = num("--builds")?.max(1),
            "--concurrency" => o.concurrency = num("--concurrency")?.max(1),
            "--lone" => o.lone = num("--lone")?,
            "--submitters" => o.submitters = Some(num("--submitters")?.max(1)),
            "--rate" => o.rate = Some(num("--rate")?.max(1) as f64),
            "--pause-ms" => o.pause_ms = num("--pause-ms")? as u64,
            "--shell" => o.shell = true,
            "--failover" => o.failover = true,
            "-h" | "--help" => {
                println!(
                    "{}",
                    include_str!("bench.rs")
                        .lines()
                        .take(11)
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    Ok(o)
}

// === processes ===

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn build_binaries() -> Result<(), Error> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "ci-server",
            "-p",
            "ci-agent",
        ])
        .current_dir(root())
        .status()?
        .success();
    if !ok {
        return Err("cargo build --release failed".into());
    }
    Ok(())
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Proc, Error> {
    Ok(Proc(
        Command::new(root().join("target/release").join(bin))
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("BENCH_VERBOSE").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()?,
    ))
}

/// (utime + stime in seconds, peak RSS in KiB) of a process.
fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    (ticks / 100.0, peak)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn git_repo(dir: &Path) -> Result<(), Error> {
    for args in [
        vec!["init", "--quiet", "--initial-branch=main"],
        vec![
            "-c",
            "user.name=b",
            "-c",
            "user.email=b@b",
            "commit",
            "--quiet",
            "--allow-empty",
            "-m",
            "x",
        ],
    ] {
        let ok = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(&args)
            .status()?
            .success();
        if !ok {
            return Err(format!("git {args:?} failed").into());
        }
    }
    Ok(())
}

// === no-op agents ===

/// Timestamps the no-op agents record.
#[derive(Default)]
struct Marks {
    received: Mutex<HashMap<i64, Instant>>,
    done: Mutex<HashMap<i64, Instant>>,
    /// Woken on every completion.
    finished: tokio::sync::Notify,
}

/// Starts an in-process agent speaking the real protocol: it takes every
/// build and reports success at once (or, `silent`, never).
async fn noop_agent(server: &str, marks: Arc<Marks>, silent: bool) -> Result<i64, Error> {
    let http = reqwest::Client::new();
    let id = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let (server_url, agent_id, client) = (server.to_owned(), id.clone(), http.clone());
    let route = warp::path!("build")
        .and(warp::body::json())
        .map(move |req: BuildRequest| {
            let now = Instant::now();
            marks
                .received
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(req.id.0, now);
            if !silent {
                let (marks, client, url) = (marks.clone(), client.clone(), server_url.clone());
                let agent = agent_id.load(std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let result = NotifyBuildResult {
                        id: req.id,
                        status: 0,
                        stdout: String::new(),
                        stderr: String::new(),
                        attempt: req.attempt,
                        agent_id: Some(ci_core::AgentId(agent)),
                    };
                    let ok = client
                        .post(format!("{url}/notify_build_result"))
                        .json(&result)
                        .send()
                        .await;
                    if ok.is_ok_and(|r| r.status().is_success()) {
                        marks
                            .done
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(req.id.0, Instant::now());
                        marks.finished.notify_waiters();
                    }
                });
            }
            warp::reply::json(&serde_json::json!({"accepted": true}))
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(warp::serve(route).incoming(listener).run());
    let reply: NotifyAgentReply = http
        .post(format!("{server}/notify_agent"))
        .json(&serde_json::json!({"host": "127.0.0.1", "port": port}))
        .send()
        .await?
        .json()
        .await?;
    id.store(reply.id.0, std::sync::atomic::Ordering::SeqCst);
    Ok(reply.id.0)
}

// === figures ===

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

async fn wait_server(http: &reqwest::Client, base: &str) -> Result<(), Error> {
    for _ in 0..500 {
        if http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err("the server did not start".into())
}

async fn wait_agents(http: &reqwest::Client, base: &str, n: usize) -> Result<(), Error> {
    for _ in 0..3000 {
        let a: Vec<serde_json::Value> = http
            .get(format!("{base}/api/agents"))
            .send()
            .await?
            .json()
            .await?;
        if a.len() >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!("{n} agents did not register").into())
}

/// p50 of 50 list requests, in ms.
async fn list_latency(http: &reqwest::Client, base: &str, query: &str) -> Result<f64, Error> {
    let mut v = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let r = http.get(format!("{base}/api/builds?{query}")).send().await?;
        r.bytes().await?;
        v.push(ms(t.elapsed()));
    }
    Ok(pct(&sorted(v), 0.5))
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Error> {
    let o = parse_args()?;
    build_binaries()?;
    let tmp = tempfile::tempdir()?;
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(&repo)?;
    git_repo(&repo)?;
    let sha = String::from_utf8(
        Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["rev-parse", "HEAD"])
            .output()?
            .stdout,
    )?
    .trim()
    .to_owned();
    HASH.set(sha).map_err(|_| "set twice")?;
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let db = tmp.path().join("ci.sqlite");
    let (hb, missed) = if o.failover { ("100", "3") } else { ("1000", "5") };
    let server = spawn(
        "ci-server",
        &[],
        &[
            ("PORT", &port.to_string()),
            ("REPO", repo.to_str().ok_or("bad path")?),
            ("DB_PATH", db.to_str().ok_or("bad path")?),
            ("BUILD_COMMAND", "true"),
            ("HEARTBEAT_MS", hb),
            ("MISSED_HEARTBEATS", missed),
        ],
    )?;
    let pid = server.0.id();
    let http = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    wait_server(&http, &base).await?;
    let marks = Arc::new(Marks::default());

    if o.failover {
        return failover(&http, &base, marks).await;
    }
    let mut agents = Vec::new();
    if o.shell {
        for i in 0..o.agents {
            let work = tmp.path().join(format!("agent-{i}"));
            agents.push(spawn(
                "ci-agent",
                &[],
                &[
                    ("SERVER_PORT", &port.to_string()),
                    ("AGENT_PORT", "0"),
                    ("WORK_DIR", work.to_str().ok_or("bad path")?),
                ],
            )?);
        }
    } else {
        for _ in 0..o.agents {
            noop_agent(&base, marks.clone(), false).await?;
        }
    }
    wait_agents(&http, &base, o.agents).await?;
    let agent_rss = agents.first().map(|a| rss_kib(a.0.id()));
    let (cpu0, _) = usage(pid);

    if o.lone > 0 {
        return lone(&http, &base, &o, pid).await;
    }

    // Phase 1, throughput: N builds, `concurrency` submitters, as fast as
    // the API takes them (agents saturated: builds queue).
    let t0 = Instant::now();
    let submitted = submit(&http, &base, o.builds, o.concurrency, None).await;
    let submit_secs = t0.elapsed().as_secs_f64();
    let (dispatch, complete, span) = if o.shell {
        wait_all_shell(&http, &base, o.builds).await?
    } else {
        wait_noop(&marks, &submitted, o.builds, t0).await?
    };
    let (cpu1, peak_kib) = usage(pid);
    let (qd, qc) = (sorted(dispatch), sorted(complete));

    // Phase 2, latency: submitters that each wait for their build, fewer than
    // the agents, so a free agent is always there: the dispatch path alone.
    // Or, with `--rate`, builds arriving on their own schedule.
    let latency = if o.shell {
        None
    } else if let Some(rate) = o.rate {
        let n = o.builds.min((rate * 5.0) as usize).max(1);
        let sub = arrivals(&http, &base, n, rate).await;
        let (d, c, _) = wait_noop(&marks, &sub, n, Instant::now()).await?;
        Some((sorted(d), sorted(c), n, format!("arriving at {rate} /s")))
    } else {
        let n = o.builds.min(2000);
        let conc = o.submitters.unwrap_or((o.agents / 2).max(1));
        let pause = Duration::from_millis(o.pause_ms);
        let sub = submit(&http, &base, n, conc, Some((marks.clone(), pause))).await;
        let (d, c, _) = wait_noop(&marks, &sub, n, Instant::now()).await?;
        let how = match o.pause_ms {
            0 => format!("{conc} waiting submitters"),
            p => format!("{conc} waiting submitters, {p} ms apart"),
        };
        Some((sorted(d), sorted(c), n, how))
    };

    let counts: serde_json::Value = http.get(format!("{base}/metrics")).send().await?.text().await.map(|t| {
        let get = |s: &str| {
            t.lines()
                .find(|l| l.starts_with(&format!("ci_builds{{status=\"{s}\"}}")))
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        serde_json::json!({"success": get("success"), "failed": get("failed"), "queued": get("queued"), "running": get("running")})
    })?;
    let list_first = list_latency(&http, &base, "limit=50").await?;
    let list_deep = list_latency(&http, &base, &format!("limit=50&before={}", o.builds / 2 + 1)).await?;
    let total_builds = o.builds + latency.as_ref().map_or(0, |l| l.2);
    // A clean stop checkpoints the WAL into the file.
    drop(agents);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let mut server = server;
    let _ = server.0.wait();
    let db_bytes = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);

    let throughput = o.builds as f64 / span;
    let mode = if o.shell { "shell" } else { "no-op" };
    let f = |v: &[f64], p: f64| pct(v, p);
    println!(
        "agents {} ({mode}), builds {}, submit concurrency {}",
        o.agents, o.builds, o.concurrency
    );
    println!("  throughput             {throughput:>9.0} builds/s  ({span:.2} s; submitting took {submit_secs:.2} s)");
    println!(
        "  saturated: submit -> agent has it  p50 {:>8.2} ms  p99 {:>8.2} ms  (mostly waiting in the queue)",
        f(&qd, 0.5),
        f(&qd, 0.99)
    );
    println!(
        "  saturated: submit -> complete      p50 {:>8.2} ms  p99 {:>8.2} ms",
        f(&qc, 0.5),
        f(&qc, 0.99)
    );
    if let Some((d, c, n, how)) = &latency {
        println!("  free agents ({n} builds, {how}):");
        println!("    dispatch latency  p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms  (submit sent -> the agent has the build)", f(d, 0.5), f(d, 0.99), d.last().copied().unwrap_or(f64::NAN));
        println!(
            "    submit -> complete p50 {:>6.2} ms  p99 {:>6.2} ms  (to the result acknowledged)",
            f(c, 0.5),
            f(c, 0.99)
        );
    }
    println!(
        "  server CPU             {:>9.2} s  peak RSS {:.1} MiB",
        cpu1 - cpu0,
        peak_kib as f64 / 1024.0
    );
    if let Some(kib) = agent_rss {
        println!("  agent RSS (idle)       {:>9.1} MiB", kib as f64 / 1024.0);
    }
    println!(
        "  SQLite                 {:>9.1} KiB per 1,000 builds",
        db_bytes as f64 / 1024.0 / total_builds as f64 * 1000.0
    );
    println!("  GET /api/builds        p50 {list_first:.2} ms (newest page), {list_deep:.2} ms (keyset page in the middle)");
    println!("  builds                 {counts}");
    let lat = latency.as_ref().map(|(d, c, n, _)| {
        serde_json::json!({
            "builds": n, "submitters": o.rate.is_none().then(|| o.submitters.unwrap_or((o.agents / 2).max(1))),
            "rate_per_s": o.rate, "pause_ms": o.pause_ms,
            "dispatch_ms": {"p50": f(d, 0.5), "p99": f(d, 0.99), "max": d.last()},
            "complete_ms": {"p50": f(c, 0.5), "p99": f(c, 0.99)},
        })
    });
    let json = serde_json::json!({
        "mode": mode, "agents": o.agents, "builds": o.builds, "concurrency": o.concurrency,
        "throughput_per_s": throughput, "elapsed_s": span,
        "saturated": {"dispatch_ms": {"p50": f(&qd, 0.5), "p99": f(&qd, 0.99)}, "complete_ms": {"p50": f(&qc, 0.5), "p99": f(&qc, 0.99)}},
        "free_agents": lat,
        "server_cpu_s": cpu1 - cpu0, "server_peak_rss_mib": peak_kib as f64 / 1024.0,
        "agent_idle_rss_mib": agent_rss.map(|k| k as f64 / 1024.0),
        "sqlite_kib_per_1000": db_bytes as f64 / 1024.0 / total_builds as f64 * 1000.0,
        "list_p50_ms": {"newest": list_first, "deep": list_deep},
        "counts": counts,
    });
    println!("{json}");
    Ok(())
}

/// Submits one build; returns its id.
async fn submit_one(http: &reqwest::Client, base: &str) -> Option<i64> {
    let r = http
        .post(format!("{base}/api/builds"))
        .json(&serde_json::json!({"hash": hash()}))
        .send()
        .await
        .ok()?;
    if r.status().as_u16() != 201 {
        return None;
    }
    r.json::<serde_json::Value>().await.ok()?["id"].as_i64()
}

/// Submits `n` builds arriving at `rate` per second on average, each after
/// an exponentially distributed gap (a Poisson process), each from its own
/// task: an arrival never waits for an earlier one (open loop). Returns when
/// each was sent, by build id.
async fn arrivals(http: &reqwest::Client, base: &str, n: usize, rate: f64) -> HashMap<i64, Instant> {
    let submitted: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut at = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        at += Duration::from_secs_f64(-(1.0 - rng.f64()).ln() / rate);
        tokio::time::sleep_until(at).await;
        let (http, base, submitted) = (http.clone(), base.to_owned(), submitted.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            if let Some(id) = submit_one(&http, &base).await {
                submitted.lock().unwrap_or_else(|e| e.into_inner()).insert(id, t);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let out = submitted.lock().unwrap_or_else(|e| e.into_inner()).clone();
    out
}

/// Submits `n` builds from `conc` concurrent submitters. With `wait`, each
/// submitter waits for its build to complete, then for the pause, before
/// the next. Returns when each was sent, by build id.
async fn submit(
    http: &reqwest::Client,
    base: &str,
    n: usize,
    conc: usize,
    wait: Option<(Arc<Marks>, Duration)>,
) -> HashMap<i64, Instant> {
    let submitted: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc.min(n) {
        let (http, base, submitted, next, wait) = (
            http.clone(),
            base.to_owned(),
            submitted.clone(),
            next.clone(),
            wait.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n {
                let t = Instant::now();
                let Some(id) = submit_one(&http, &base).await else {
                    continue;
                };
                submitted.lock().unwrap_or_else(|e| e.into_inner()).insert(id, t);
                if let Some((marks, pause)) = &wait {
                    loop {
                        let finished = marks.finished.notified();
                        if marks
                            .done
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .contains_key(&id)
                        {
                            break;
                        }
                        let _ = tokio::time::timeout(Duration::from_millis(50), finished).await;
                    }
                    if !pause.is_zero() {
                        tokio::time::sleep(*pause).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let out = submitted.lock().unwrap_or_else(|e| e.into_inner()).clone();
    out
}

/// Waits until every submitted build is done; returns the dispatch and
/// completion latencies (ms) and the span from `t0` to the last completion.
async fn wait_noop(
    marks: &Marks,
    submitted: &HashMap<i64, Instant>,
    n: usize,
    t0: Instant,
) -> Result<(Vec<f64>, Vec<f64>, f64), Error> {
    loop {
        let finished = {
            let done = marks.done.lock().unwrap_or_else(|e| e.into_inner());
            submitted.keys().filter(|id| done.contains_key(id)).count()
        };
        if finished >= n.min(submitted.len()) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(900) {
            return Err("builds did not finish within 15 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let recv = marks.received.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let done = marks.done.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let dispatch = submitted
        .iter()
        .filter_map(|(id, t)| recv.get(id).map(|r| ms(r.duration_since(*t))))
        .collect();
    let complete = submitted
        .iter()
        .filter_map(|(id, t)| done.get(id).map(|d| ms(d.duration_since(*t))))
        .collect();
    let last = submitted
        .keys()
        .filter_map(|id| done.get(id))
        .max()
        .copied()
        .unwrap_or(t0);
    Ok((dispatch, complete, last.duration_since(t0).as_secs_f64()))
}

/// Shell mode: poll the API until every build has finished; latencies from
/// the server's own timestamps (millisecond resolution).
async fn wait_all_shell(
    http: &reqwest::Client,
    base: &str,
    n: usize,
) -> Result<(Vec<f64>, Vec<f64>, f64), Error> {
    let t0 = Instant::now();
    loop {
        let mut all = Vec::new();
        let mut before: Option<i64> = None;
        loop {
            let q = before.map(|b| format!("&before={b}")).unwrap_or_default();
            let page: ci_core::protocol::BuildList = http
                .get(format!("{base}/api/builds?limit=500{q}"))
                .send()
                .await?
                .json()
                .await?;
            let len = page.builds.len();
            before = page.builds.last().map(|b| b.id.0);
            all.extend(page.builds);
            if len < 500 {
                break;
            }
        }
        if all.len() >= n && all.iter().all(|b| b.status.is_finished()) {
            // Server timestamps, milliseconds since the epoch.
            let epoch_ms = |s: &str| -> Option<f64> {
                let t = humantime::parse_rfc3339(s).ok()?;
                Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64() * 1000.0)
            };
            let mut dispatch = Vec::new();
            let mut complete = Vec::new();
            let (mut first, mut last) = (f64::MAX, f64::MIN);
            for b in &all {
                let started = b.started_at.as_deref().and_then(epoch_ms);
                let finished = b.finished_at.as_deref().and_then(epoch_ms);
                if let (Some(c), Some(s), Some(f)) = (epoch_ms(&b.created_at), started, finished) {
                    dispatch.push(s - c);
                    complete.push(f - c);
                    first = first.min(c);
                    last = last.max(f);
                }
            }
            let span = (last - first) / 1000.0;
            return Ok((dispatch, complete, span.max(0.001)));
        }
        if t0.elapsed() > Duration::from_secs(600) {
            return Err("builds did not finish within 10 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One build at a time: submit, then wait (polling every millisecond) until
/// it has finished.
async fn lone(http: &reqwest::Client, base: &str, o: &Opts, pid: u32) -> Result<(), Error> {
    let mut v = Vec::new();
    for i in 0..=o.lone {
        let t = Instant::now();
        let b: serde_json::Value = http
            .post(format!("{base}/api/builds"))
            .json(&serde_json::json!({"hash": hash()}))
            .send()
            .await?
            .json()
            .await?;
        let id = b["id"].as_i64().ok_or("no id")?;
        loop {
            let b: serde_json::Value = http
                .get(format!("{base}/api/builds/{id}"))
                .send()
                .await?
                .json()
                .await?;
            if matches!(b["status"].as_str(), Some("success" | "failed" | "canceled")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if i > 0 {
            // The first build fills the repository cache.
            v.push(ms(t.elapsed()));
        }
    }
    let v = sorted(v);
    let (_, peak) = usage(pid);
    let mode = if o.shell { "shell" } else { "no-op" };
    println!("lone builds ({mode}, {} agent(s)): submit -> finished p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms (n={})", o.agents, pct(&v, 0.5), pct(&v, 0.9), v.last().copied().unwrap_or(f64::NAN), v.len());
    println!(
        "{}",
        serde_json::json!({"mode": mode, "lone": v.len(), "p50_ms": pct(&v, 0.5), "p90_ms": pct(&v, 0.9), "server_peak_rss_mib": peak as f64 / 1024.0})
    );
    Ok(())
}

async fn wait_mark(marks: &Marks, id: i64) -> Result<Instant, Error> {
    for _ in 0..10_000 {
        if let Some(t) = marks.received.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
            return Ok(*t);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Err(format!("build {id} never arrived").into())
}

/// A silent agent takes a build and dies (no heartbeat, no result); a
/// second agent gets the requeued attempt. Measured: from the last sign of
/// life to the requeued build arriving at the second agent.
async fn failover(http: &reqwest::Client, base: &str, marks: Arc<Marks>) -> Result<(), Error> {
    let (interval, missed) = (100.0, 3.0);
    let mut detection = Vec::new();
    let mut after_expiry = Vec::new();
    for _ in 0..20 {
        // A fresh silent agent is the only one when the build arrives...
        let silent = Arc::new(Marks::default());
        noop_agent(base, silent.clone(), true).await?;
        let b: serde_json::Value = http
            .post(format!("{base}/api/builds"))
            .json(&serde_json::json!({"hash": hash()}))
            .send()
            .await?
            .json()
            .await?;
        let id = b["id"].as_i64().ok_or("no id")?;
        let last_sign = wait_mark(&silent, id).await?;
        // ...then a healthy one joins and waits for the requeued attempt.
        let healthy = noop_agent(base, marks.clone(), false).await?;
        let rescued = wait_mark(&marks, id).await?;
        let d = ms(rescued.duration_since(last_sign));
        detection.push(d);
        after_expiry.push(d - missed * interval);
        http.post(format!("{base}/notify_agent_leave"))
            .json(&serde_json::json!({ "agentId": healthy }))
            .send()
            .await?;
    }
    let (d, a) = (sorted(detection), sorted(after_expiry));
    println!("dead-agent failover (heartbeat {interval} ms, {missed} missed: lease {} ms; bound (missed+1) x interval = {} ms)", missed * interval, (missed + 1.0) * interval);
    println!(
        "  last sign of life -> requeued build at another agent: p50 {:.1} ms, max {:.1} ms",
        pct(&d, 0.5),
        d.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  lease expiry -> requeued build at another agent:      p50 {:.1} ms, max {:.1} ms",
        pct(&a, 0.5),
        a.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "{}",
        serde_json::json!({"failover_ms": {"p50": pct(&d, 0.5), "max": d.last()}, "after_expiry_ms": {"p50": pct(&a, 0.5), "max": a.last()}, "lease_ms": missed * interval})
    );
    Ok(())
}
