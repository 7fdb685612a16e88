//! `ci`, the command-line client: submit, list, show, follow logs, cancel,
//! rebuild, and list agents, against a server's JSON API; and check a
//! pipeline file (`ci lint`) with the server's parser, offline.
//!
//! # Layout
//! - [`Cli`], [`Command`]: the arguments (clap).
//! - [`Client`]: the API calls.
//! - [`run`]: carries out a command and returns the exit code: 0, or 1 when
//!   a build waited for with `--wait` did not succeed; errors are 2.

#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::time::Duration;

use ci_core::protocol::{AgentView, BuildList, BuildView, ErrorBody, LogView};
use ci_core::BuildStatus;
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

mod exec;

/// Reads and checks a pipeline file (`-`: standard input): the outer
/// error if it cannot be read, the inner one if it is wrong.
fn read_pipeline(
    file: &std::path::Path,
    shown: &str,
) -> Result<Result<ci_core::pipeline::Pipeline, ci_core::pipeline::PipelineError>, Error> {
    use std::io::Read;
    let cap = ci_core::pipeline::caps::MAX_FILE as u64;
    let mut bytes = Vec::new();
    if shown == "-" {
        std::io::stdin().take(cap + 1).read_to_end(&mut bytes)?;
    } else {
        let f = std::fs::File::open(file).map_err(|e| Error::Api(format!("{shown}: {e}")))?;
        f.take(cap + 1).read_to_end(&mut bytes)?;
    }
    Ok(match String::from_utf8(bytes) {
        Ok(text) if text.len() as u64 > cap => Err(ci_core::pipeline::PipelineError {
            line: 0,
            column: 0,
            message: format!("larger than {cap} bytes, the most a pipeline file may be"),
        }),
        Ok(text) => ci_core::pipeline::parse(&text),
        Err(_) => Err(ci_core::pipeline::PipelineError {
            line: 0,
            column: 0,
            message: "not UTF-8 text".into(),
        }),
    })
}

/// `ci lint`: 0 for a good file (its steps listed), 1 for a bad one (the
/// error as `FILE:LINE:COLUMN: message` on stderr).
fn lint(file: &std::path::Path, json: bool) -> Result<u8, Error> {
    let shown = file.display().to_string();
    match read_pipeline(file, &shown)? {
        Ok(p) if json => {
            print_json(&p)?;
            Ok(0)
        }
        Ok(p) => {
            let rows: Vec<Vec<String>> = p
                .steps
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.image
                            .as_ref()
                            .map_or("(shell)".into(), |i| i.as_str().to_owned()),
                        s.depends_on.join(", "),
                        s.labels.iter().collect::<Vec<_>>().join(","),
                    ]
                })
                .collect();
            print!("{}", table(&["STEP", "IMAGE", "DEPENDS ON", "AGENTS"], &rows));
            Ok(0)
        }
        Err(e) if e.line == 0 => {
            eprintln!("{shown}: {}", e.message);
            Ok(1)
        }
        Err(e) => {
            eprintln!("{shown}:{e}");
            Ok(1)
        }
    }
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server could not be reached.
    #[error("cannot reach {url}: {cause}")]
    Unreachable {
        /// The server.
        url: String,
        /// Why.
        cause: String,
    },
    /// The server refused the request.
    #[error("{0}")]
    Api(String),
    /// Output could not be written.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// `ci` arguments.
#[derive(Debug, Parser)]
#[command(name = "ci", version, about = "Command-line client of the ci build server")]
pub struct Cli {
    /// The server's base URL.
    #[arg(
        long,
        global = true,
        env = "CI_SERVER",
        value_name = "CI_SERVER",
        default_value = "http://127.0.0.1:3000"
    )]
    pub server: String,

    /// API token, if the server has one.
    #[arg(
        long,
        global = true,
        env = "CI_TOKEN",
        value_name = "CI_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,

    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// The project: builds are started in it and listed from it, and a
    /// build number is its number there (`--project web show 42` is
    /// web#42). Default: the server's default project for new builds, and
    /// global build ids.
    #[arg(long, global = true, env = "CI_PROJECT", value_name = "CI_PROJECT")]
    pub project: Option<String>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a build of a commit (SHA, branch or tag).
    Submit {
        /// The commit.
        hash: String,
        /// Command to run (default: the server's).
        #[arg(long)]
        command: Option<String>,
        /// Branch, for display.
        #[arg(long)]
        branch: Option<String>,
        /// A label the agent must have (repeat, or separate with commas).
        #[arg(long = "label", value_delimiter = ',')]
        labels: Vec<String>,
        /// Wait for the build to finish; exit 0 if it succeeded, 1 if not.
        #[arg(long)]
        wait: bool,
    },
    /// List builds, newest first.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Page, from 1.
        #[arg(long, default_value_t = 1)]
        page: usize,
        /// Only builds of this branch.
        #[arg(long)]
        branch: Option<String>,
        /// Only builds in these states (queued, running, success, failed,
        /// canceled; repeat or separate with commas).
        #[arg(long, value_delimiter = ',')]
        status: Vec<String>,
    },
    /// Show one build.
    Show {
        /// Build number.
        id: i64,
    },
    /// Print a build's output (stdout to stdout, stderr to stderr): of one
    /// step, or of every step in turn.
    Log {
        /// Build number.
        id: i64,
        /// The step (default: every step, each under a heading on stderr).
        step: Option<String>,
        /// Keep printing while the build runs.
        #[arg(long, short)]
        follow: bool,
        /// An earlier attempt's output.
        #[arg(long)]
        attempt: Option<u32>,
    },
    /// Cancel a queued or running build.
    Cancel {
        /// Build number.
        id: i64,
    },
    /// Build the same commit and command again.
    Rebuild {
        /// Build number.
        id: i64,
        /// Wait for the new build; exit 0 if it succeeded, 1 if not.
        #[arg(long)]
        wait: bool,
    },
    /// Run the failed, canceled and skipped steps of a finished build
    /// again; the steps that passed keep their results.
    Retry {
        /// Build number.
        id: i64,
        /// Wait for the build; exit 0 if it succeeded, 1 if not.
        #[arg(long)]
        wait: bool,
    },
    /// List agents.
    Agents,
    /// List projects, each branch with its latest build.
    Projects,
    /// Run the pipeline of the working tree (uncommitted changes
    /// included) on this machine, with the shell runner (and Docker for
    /// steps with an image) and the server's scheduling: exit 0 if every
    /// step passed, 1 if not.
    Exec {
        /// Only this step (by name, or every matrix combination of a name),
        /// without the steps it depends on.
        #[arg(long)]
        step: Option<String>,
        /// The pipeline file.
        #[arg(long, default_value = ci_core::pipeline::DEFAULT_FILE)]
        file: std::path::PathBuf,
        /// Most steps at once (default: the number of CPUs).
        #[arg(long)]
        jobs: Option<u32>,
    },
    /// Check a pipeline file with the server's own parser: exit 0 and list
    /// its steps, or exit 1 with `FILE:LINE:COLUMN: message`.
    Lint {
        /// The file (`-`: standard input).
        #[arg(default_value = ci_core::pipeline::DEFAULT_FILE)]
        file: std::path::PathBuf,
    },
}

/// A client of one server.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client of the server at `base`.
    pub fn new(base: &str, token: Option<String>) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
            token,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, Error> {
        let resp = req.send().await.map_err(|e| Error::Unreachable {
            url: self.base.clone(),
            cause: ci_core::error::chain(&e),
        })?;
        let status = resp.status();
        if status.is_success() {
            return resp
                .json()
                .await
                .map_err(|e| Error::Api(format!("bad reply: {e}")));
        }
        let msg = resp
            .json::<ErrorBody>()
            .await
            .map(|b| b.error)
            .unwrap_or_default();
        Err(Error::Api(format!("{status}: {msg}")))
    }

    /// `POST /api/builds`.
    pub async fn submit(&self, body: &serde_json::Value) -> Result<BuildView, Error> {
        self.send(self.request(reqwest::Method::POST, "/api/builds").json(body))
            .await
    }

    /// `GET /api/builds`.
    pub async fn list(&self, limit: usize, offset: usize) -> Result<BuildList, Error> {
        self.list_where(limit, offset, &[]).await
    }

    /// `GET /api/builds` with filters (`project`, `branch`, `status`).
    pub async fn list_where(
        &self,
        limit: usize,
        offset: usize,
        filters: &[(&str, String)],
    ) -> Result<BuildList, Error> {
        let mut path = format!("/api/builds?limit={limit}&offset={offset}");
        for (k, v) in filters {
            path.push_str(&format!(
                "&{k}={}",
                percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
            ));
        }
        self.send(self.request(reqwest::Method::GET, &path)).await
    }

    /// `GET /api/projects`.
    pub async fn projects(&self) -> Result<ci_core::protocol::ProjectList, Error> {
        self.send(self.request(reqwest::Method::GET, "/api/projects"))
            .await
    }

    /// The global id of build `number` of `project`; `number` itself
    /// without a project.
    pub async fn build_id(&self, project: Option<&str>, number: i64) -> Result<i64, Error> {
        let Some(project) = project else {
            return Ok(number);
        };
        let enc = percent_encoding::utf8_percent_encode(project, percent_encoding::NON_ALPHANUMERIC);
        let b: BuildView = self
            .send(self.request(
                reqwest::Method::GET,
                &format!("/api/projects/{enc}/builds/{number}"),
            ))
            .await?;
        Ok(b.id.0)
    }

    /// `GET /api/builds/{id}`.
    pub async fn show(&self, id: i64) -> Result<BuildView, Error> {
        self.send(self.request(reqwest::Method::GET, &format!("/api/builds/{id}")))
            .await
    }

    /// `GET /api/builds/{id}/log`, or of one step.
    pub async fn log(&self, id: i64, step: Option<&str>, attempt: Option<u32>) -> Result<LogView, Error> {
        let q = attempt.map(|a| format!("?attempt={a}")).unwrap_or_default();
        let path = format!("{}{q}", log_path(id, step));
        self.send(self.request(reqwest::Method::GET, &path)).await
    }

    /// `POST /api/builds/{id}/{action}`.
    pub async fn action(&self, id: i64, action: &str) -> Result<BuildView, Error> {
        self.send(self.request(reqwest::Method::POST, &format!("/api/builds/{id}/{action}")))
            .await
    }

    /// `GET /api/agents`.
    pub async fn agents(&self) -> Result<Vec<AgentView>, Error> {
        self.send(self.request(reqwest::Method::GET, "/api/agents")).await
    }

    /// Follows the log of build `id` (of one step, if given), writing
    /// output as it comes; returns the step's final status (`success`,
    /// `failed`, `canceled` or `skipped`).
    pub async fn follow(&self, id: i64, step: Option<&str>) -> Result<Option<String>, Error> {
        let resp = self
            .request(reqwest::Method::GET, &format!("{}?follow=1", log_path(id, step)))
            .send()
            .await
            .map_err(|e| Error::Unreachable {
                url: self.base.clone(),
                cause: ci_core::error::chain(&e),
            })?;
        if !resp.status().is_success() {
            let status = resp.status();
            let msg = resp
                .json::<ErrorBody>()
                .await
                .map(|b| b.error)
                .unwrap_or_default();
            return Err(Error::Api(format!("{status}: {msg}")));
        }
        let mut body = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Error::Api(format!("the stream broke: {e}")))?;
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(cut) = buf.find("\n\n") {
                let raw: String = buf.drain(..cut + 2).collect();
                let raw = raw.as_str();
                let (mut event, mut data) = ("", Vec::new());
                for line in raw.lines() {
                    if let Some(e) = line.strip_prefix("event:") {
                        event = e.trim();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push(d.strip_prefix(' ').unwrap_or(d));
                    }
                }
                let text = data.join("\n");
                match event {
                    "stdout" => {
                        let mut out = std::io::stdout().lock();
                        out.write_all(text.as_bytes())?;
                        out.flush()?;
                    }
                    "stderr" => eprint!("{text}"),
                    "attempt" => {
                        eprintln!("\n--- the previous attempt stopped here; attempt {text} starts ---")
                    }
                    "end" => {
                        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                        return Ok(v["status"].as_str().map(str::to_owned));
                    }
                    _ => {}
                }
            }
        }
        Ok(None)
    }

    /// Polls until build `id` finishes, showing progress on stderr.
    pub async fn wait(&self, id: i64) -> Result<BuildView, Error> {
        let tty = std::io::stderr().is_terminal();
        let spinner = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
        let mut i = 0usize;
        let mut last = None;
        loop {
            let b = self.show(id).await?;
            if b.status.is_finished() {
                if tty {
                    eprint!("\r\x1b[K");
                }
                return Ok(b);
            }
            if tty {
                eprint!("\r{} build #{id} {}", spinner[i % spinner.len()], b.status);
                i += 1;
            } else if last != Some(b.status) {
                eprintln!("build #{id} {}", b.status);
            }
            last = Some(b.status);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Where the log of build `id` (or of one of its steps) is.
fn log_path(id: i64, step: Option<&str>) -> String {
    match step {
        Some(name) => format!(
            "/api/builds/{id}/steps/{}/log",
            percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC)
        ),
        None => format!("/api/builds/{id}/log"),
    }
}

/// `s` with control characters shown as escapes (`\x1b`, `\n`): a
/// command or branch may hold terminal escapes, and a table or a listing
/// must not let a build author rewrite the user's terminal.
fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let n = u32::from(c);
                if n < 0x100 {
                    out.push_str(&format!("\\x{n:02x}"));
                } else {
                    out.push_str(&format!("\\u{{{n:x}}}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable(c)).collect())
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn duration(ms: Option<u64>) -> String {
    ms.map(|ms| {
        if ms < 1000 {
            format!("{ms}ms")
        } else {
            format!("{:.1}s", ms as f64 / 1000.0)
        }
    })
    .unwrap_or_default()
}

fn build_rows(builds: &[BuildView]) -> String {
    let rows: Vec<Vec<String>> = builds
        .iter()
        .map(|b| {
            vec![
                b.id.to_string(),
                if b.project.is_empty() {
                    String::new()
                } else {
                    format!("{}#{}", b.project, b.number)
                },
                b.hash.chars().take(10).collect(),
                b.status.to_string(),
                b.agent.clone().unwrap_or_default(),
                duration(b.duration_ms),
                b.command.clone(),
            ]
        })
        .collect();
    table(
        &["ID", "BUILD", "COMMIT", "STATUS", "AGENT", "DURATION", "COMMAND"],
        &rows,
    )
}

fn show(b: &BuildView) -> String {
    let opt = |s: &Option<String>| s.clone().unwrap_or_default();
    let rows = vec![
        vec!["build".into(), b.id.to_string()],
        vec!["project".into(), format!("{}#{}", b.project, b.number)],
        vec!["subject".into(), opt(&b.subject)],
        vec!["author".into(), opt(&b.author)],
        vec!["status".into(), b.status.to_string()],
        vec!["commit".into(), b.hash.clone()],
        vec!["command".into(), b.command.clone()],
        vec!["branch".into(), opt(&b.branch)],
        vec!["agent".into(), opt(&b.agent)],
        vec!["attempt".into(), b.attempt.to_string()],
        vec![
            "exit code".into(),
            b.exit_code.map(|c| c.to_string()).unwrap_or_default(),
        ],
        vec!["created".into(), b.created_at.clone()],
        vec!["started".into(), opt(&b.started_at)],
        vec!["finished".into(), opt(&b.finished_at)],
        vec!["duration".into(), duration(b.duration_ms)],
    ];
    let mut rows = rows;
    if !b.labels.is_empty() {
        rows.insert(
            5,
            vec!["labels".into(), b.labels.iter().collect::<Vec<_>>().join(",")],
        );
    }
    if let Some(why) = &b.waiting {
        rows.insert(2, vec!["waiting".into(), why.clone()]);
    }
    let mut out = String::new();
    for r in rows {
        out.push_str(&format!("{:<10} {}\n", r[0], printable(&r[1])));
    }
    if b.steps.len() > 1 {
        let rows: Vec<Vec<String>> = b
            .steps
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.status.to_string(),
                    s.agent.clone().unwrap_or_default(),
                    s.attempt.to_string(),
                    s.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                    duration(s.duration_ms),
                    s.depends_on.join(","),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &["STEP", "STATUS", "AGENT", "ATTEMPT", "EXIT", "DURATION", "AFTER"],
            &rows,
        ));
    }
    out
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v).map_err(|e| Error::Api(e.to_string()))?;
    writeln!(out)?;
    Ok(())
}

/// A build just started: waited for (`--wait`: exit 0 if it succeeded, 1
/// if not), or shown as JSON or as `said`.
async fn started(client: &Client, b: BuildView, wait: bool, json: bool, said: &str) -> Result<u8, Error> {
    if !wait {
        if json {
            print_json(&b)?;
        } else {
            println!("{said}");
        }
        return Ok(0);
    }
    let b = client.wait(b.id.0).await?;
    if json {
        print_json(&b)?;
    } else {
        print!("{}", show(&b));
    }
    Ok(if b.status == BuildStatus::Success { 0 } else { 1 })
}

/// Carries out `cli`. Returns the process exit code.
pub async fn run(cli: Cli) -> Result<u8, Error> {
    let client = Client::new(&cli.server, cli.token.clone().filter(|t| !t.is_empty()));
    match cli.command {
        Command::Submit {
            hash,
            command,
            branch,
            labels,
            wait,
        } => {
            // N.B.: someone typed this: the pipeline's `when` sees `manual`.
            let mut body = serde_json::json!({ "hash": hash, "event": "manual" });
            if let Some(p) = &cli.project {
                body["project"] = p.clone().into();
            }
            if !labels.is_empty() {
                body["labels"] = labels.into();
            }
            if let Some(c) = command {
                body["command"] = c.into();
            }
            if let Some(b) = branch {
                body["branch"] = b.into();
            }
            let b = client.submit(&body).await?;
            let said = format!("build #{} queued ({})", b.id, b.hash);
            started(&client, b, wait, cli.json, &said).await
        }
        Command::List {
            limit,
            page,
            branch,
            status,
        } => {
            let mut filters = Vec::new();
            if let Some(p) = &cli.project {
                filters.push(("project", p.clone()));
            }
            if let Some(b) = branch {
                filters.push(("branch", b));
            }
            if !status.is_empty() {
                filters.push(("status", status.join(",")));
            }
            let list = client
                .list_where(limit.clamp(1, 500), (page.max(1) - 1) * limit, &filters)
                .await?;
            if cli.json {
                print_json(&list.builds)?;
            } else {
                print!("{}", build_rows(&list.builds));
            }
            Ok(0)
        }
        Command::Show { id } => {
            let id = client.build_id(cli.project.as_deref(), id).await?;
            let b = client.show(id).await?;
            if cli.json {
                print_json(&b)?;
            } else {
                print!("{}", show(&b));
            }
            Ok(0)
        }
        Command::Log {
            id,
            step,
            follow,
            attempt,
        } => {
            let id = client.build_id(cli.project.as_deref(), id).await?;
            // A build of several steps and no step named: each in turn.
            let steps: Vec<Option<String>> = match step {
                Some(s) => vec![Some(s)],
                None => {
                    let b = client.show(id).await?;
                    if b.steps.len() > 1 {
                        b.steps.into_iter().map(|s| Some(s.name)).collect()
                    } else {
                        vec![None]
                    }
                }
            };
            let several = steps.len() > 1;
            if follow && attempt.is_none() {
                let mut ok = true;
                for step in &steps {
                    if let (true, Some(name)) = (several, step) {
                        eprintln!("--- step {} ---", printable(name));
                    }
                    let status = client.follow(id, step.as_deref()).await?;
                    ok &= matches!(status.as_deref(), Some("success") | None);
                }
                return Ok(if ok { 0 } else { 1 });
            }
            let mut logs = Vec::new();
            for step in &steps {
                logs.push(client.log(id, step.as_deref(), attempt).await?);
            }
            if cli.json {
                if several {
                    print_json(&logs)?;
                } else {
                    print_json(&logs[0])?;
                }
                return Ok(0);
            }
            for log in logs {
                if several {
                    eprintln!("--- step {} (attempt {}) ---", printable(&log.step), log.attempt);
                }
                print!("{}", log.stdout);
                std::io::stdout().flush()?;
                eprint!("{}", log.stderr);
                if let Some(note) = &log.note {
                    eprintln!("[{note}]");
                }
            }
            Ok(0)
        }
        Command::Cancel { id } => {
            let id = client.build_id(cli.project.as_deref(), id).await?;
            let b = client.action(id, "cancel").await?;
            if cli.json {
                print_json(&b)?;
            } else {
                println!("build #{} {}", b.id, b.status);
            }
            Ok(0)
        }
        Command::Rebuild { id, wait } => {
            let id = client.build_id(cli.project.as_deref(), id).await?;
            let b = client.action(id, "rebuild").await?;
            let said = format!("build #{} queued (rebuild of #{id})", b.id);
            started(&client, b, wait, cli.json, &said).await
        }
        Command::Retry { id, wait } => {
            let id = client.build_id(cli.project.as_deref(), id).await?;
            let b = client.action(id, "retry").await?;
            let said = format!("build #{} {} (its failed steps run again)", b.id, b.status);
            started(&client, b, wait, cli.json, &said).await
        }
        Command::Lint { file } => lint(&file, cli.json),
        Command::Exec { step, file, jobs } => exec::exec(&file, step.as_deref(), jobs).await,
        Command::Projects => {
            let list = client.projects().await?;
            if cli.json {
                print_json(&list.projects)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .projects
                    .iter()
                    .map(|p| {
                        let branches: Vec<String> = p
                            .last_builds
                            .iter()
                            .map(|b| format!("{} #{} {}", b.branch, b.number, b.status))
                            .collect();
                        vec![
                            p.name.clone(),
                            p.repo.clone(),
                            match p.poll_interval {
                                0 => "off".to_owned(),
                                s => format!("{s}s"),
                            },
                            branches.join(", "),
                        ]
                    })
                    .collect();
                print!("{}", table(&["PROJECT", "REPO", "POLL", "BRANCHES"], &rows));
            }
            Ok(0)
        }
        Command::Agents => {
            let agents = client.agents().await?;
            if cli.json {
                print_json(&agents)?;
            } else {
                let rows: Vec<Vec<String>> = agents
                    .iter()
                    .map(|a| {
                        vec![
                            a.id.to_string(),
                            a.url.clone(),
                            format!("{:?}", a.status).to_lowercase(),
                            a.last_seen.clone(),
                            running(a),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(&["ID", "URL", "STATUS", "LAST SEEN", "BUILDS"], &rows)
                );
            }
            Ok(0)
        }
    }
}

/// The builds an agent runs, as a list (`build` alone, from a server that
/// predates `builds`).
fn running(a: &AgentView) -> String {
    let builds = if a.builds.is_empty() {
        a.build.as_slice()
    } else {
        &a.builds[..]
    };
    builds
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
