//! Server settings: command-line flags with environment fallbacks.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ci_core::model::DEFAULT_REPO_SCHEMES;
use ci_core::{LeasePolicy, RepoUrl};
use ci_store::Synchronous;
use clap::Parser;

use crate::Error;

/// `ci-server` command line. Every flag falls back to an environment
/// variable (the original design's names).
#[derive(Debug, Clone, Parser)]
#[command(name = "ci-server", version, about = "The ci build server")]
pub struct Args {
    /// Address to bind.
    #[arg(long, env = "HOST", value_name = "HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "PORT", value_name = "PORT", default_value_t = 3000)]
    pub port: u16,

    /// Repository to build: a URL (https, http, ssh, git, file) or an
    /// absolute path.
    #[arg(long, env = "REPO", value_name = "REPO")]
    pub repo: String,

    /// Command builds run when a request does not give one and the commit
    /// has no pipeline file.
    #[arg(long, env = "BUILD_COMMAND", value_name = "BUILD_COMMAND")]
    pub build_command: Option<String>,

    /// The pipeline file read from each commit built without a command
    /// (a path in the repository).
    #[arg(long, env = "PIPELINE_FILE", value_name = "PIPELINE_FILE", default_value = ci_core::pipeline::DEFAULT_FILE)]
    pub pipeline_file: String,

    /// SQLite database file.
    #[arg(
        long = "db",
        env = "DB_PATH",
        value_name = "DB_PATH",
        default_value = "ci.sqlite"
    )]
    pub db_path: PathBuf,

    /// Where the server keeps its copy of the repository, to resolve refs
    /// to full SHAs (default: beside the database, `DB_PATH` + `.git`).
    #[arg(long, env = "GIT_CACHE", value_name = "GIT_CACHE")]
    pub git_cache: Option<PathBuf>,

    /// Heartbeat interval agents must keep, in milliseconds.
    #[arg(
        long,
        env = "HEARTBEAT_MS",
        value_name = "HEARTBEAT_MS",
        default_value_t = 1000
    )]
    pub heartbeat_ms: u64,

    /// Heartbeats an agent may miss before its build is requeued.
    #[arg(
        long,
        env = "MISSED_HEARTBEATS",
        value_name = "MISSED_HEARTBEATS",
        default_value_t = 5
    )]
    pub missed_heartbeats: u32,

    /// SQLite durability: off, normal (survives process crashes) or full
    /// (also survives power loss).
    #[arg(
        long,
        env = "SQLITE_SYNCHRONOUS",
        value_name = "SQLITE_SYNCHRONOUS",
        default_value = "normal"
    )]
    pub sqlite_synchronous: Synchronous,

    /// Time limit for delivering a build to an agent, in milliseconds.
    #[arg(
        long,
        env = "DISPATCH_TIMEOUT_MS",
        value_name = "DISPATCH_TIMEOUT_MS",
        default_value_t = 5000
    )]
    pub dispatch_timeout_ms: u64,

    /// Time limit of builds that set none (e.g. 30m, 1h, 2h30m).
    #[arg(long, env = "BUILD_TIMEOUT", value_name = "BUILD_TIMEOUT", default_value = "1h", value_parser = parse_timeout)]
    pub build_timeout: Duration,

    /// Shared secret agents must present (`Authorization: Bearer`) on the
    /// agent protocol, and that the server presents to agents.
    #[arg(long, env = "AGENT_TOKEN", value_name = "AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<String>,

    /// Token users must present (`Authorization: Bearer`) on the API.
    #[arg(long, env = "API_TOKEN", value_name = "API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Repository URL schemes builds may use, comma separated.
    #[arg(long, env = "REPO_SCHEMES", value_name = "REPO_SCHEMES", value_delimiter = ',', default_values_t = DEFAULT_REPO_SCHEMES.iter().map(|s| s.to_string()))]
    pub repo_schemes: Vec<String>,

    /// The URL users reach the server at (e.g. `https://ci.example.com`):
    /// its host is accepted in `Host`, and its origin on state-changing
    /// requests.
    #[arg(long, env = "PUBLIC_URL", value_name = "PUBLIC_URL")]
    pub public_url: Option<String>,

    /// More host names the server answers to, comma separated (IP
    /// addresses and `localhost` always work).
    #[arg(
        long,
        env = "ALLOWED_HOSTS",
        value_name = "ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,

    /// Listen beyond loopback without AGENT_TOKEN, letting anyone who can
    /// reach the port register as an agent. For closed test networks only.
    #[arg(long, env = "INSECURE", value_name = "INSECURE")]
    pub insecure: bool,

    /// Most connections open at once (0: as many as the file limit allows,
    /// up to 10,000).
    #[arg(
        long,
        env = "MAX_CONNECTIONS",
        value_name = "MAX_CONNECTIONS",
        default_value_t = 0
    )]
    pub max_connections: usize,

    /// Time a client has to send a request's headers; also how long an
    /// idle kept-alive connection stays open (e.g. 10s).
    #[arg(long, env = "HEADER_TIMEOUT", value_name = "HEADER_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub header_timeout: Duration,

    /// The key projects' secrets are sealed with, made (0600) on first
    /// start (default: beside the database, `DB_PATH` + `.key`). Keep it
    /// out of database backups.
    #[arg(long, env = "SECRET_KEY_FILE", value_name = "SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,

    /// Most `git ls-remote` processes polling projects at once.
    #[arg(
        long,
        env = "POLL_PARALLEL",
        value_name = "POLL_PARALLEL",
        default_value_t = 4
    )]
    pub poll_parallel: usize,
}

/// Validated server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The repository builds check out.
    pub repo: RepoUrl,
    /// Default build command.
    pub build_command: Option<String>,
    /// The pipeline file, a path in the repository.
    pub pipeline_file: String,
    /// SQLite file.
    pub db_path: PathBuf,
    /// The server's repository cache, for resolving refs to full SHAs;
    /// none: refs are kept as given and agents resolve them.
    pub git_cache: Option<PathBuf>,
    /// SQLite durability.
    pub synchronous: Synchronous,
    /// Heartbeat interval and tolerance.
    pub lease: LeasePolicy,
    /// Time limit for `POST /build` to an agent.
    pub dispatch_timeout: Duration,
    /// Shared secret of the agent protocol.
    pub agent_token: Option<String>,
    /// Token of the user API.
    pub api_token: Option<String>,
    /// Timeout given to builds that set none.
    pub build_timeout_ms: Option<u64>,
    /// Names the server answers to, beyond IP addresses and `localhost`:
    /// the public URL's host and `ALLOWED_HOSTS`, lowercase.
    pub allowed_hosts: Vec<String>,
    /// The public URL's origin (`scheme://host[:port]`), also accepted as
    /// a request's `Origin`.
    pub public_origin: Option<String>,
    /// Listening beyond loopback without an agent token was asked for.
    pub insecure: bool,
    /// Connection limit and timeouts of the listener.
    pub limits: crate::listen::Limits,
    /// The key file secrets are sealed with; none: `DB_PATH` + `.key`.
    pub secret_key_file: Option<PathBuf>,
    /// Repository URL schemes projects may use.
    pub repo_schemes: Vec<String>,
    /// Most `git ls-remote` at once.
    pub poll_parallel: usize,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    let max = Duration::from_millis(ci_core::model::limits::MAX_TIMEOUT_MS);
    if d.is_zero() || d > max {
        return Err(format!(
            "must be between 1ms and {}",
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

impl ServerConfig {
    /// Settings for `repo` with every other value at its default, for
    /// embedding and tests.
    pub fn new(repo: RepoUrl, db_path: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 3000)),
            repo,
            build_command: None,
            pipeline_file: ci_core::pipeline::DEFAULT_FILE.to_owned(),
            git_cache: None,
            db_path: db_path.into(),
            synchronous: Synchronous::Normal,
            lease: LeasePolicy::default(),
            dispatch_timeout: Duration::from_secs(5),
            agent_token: None,
            api_token: None,
            build_timeout_ms: None,
            allowed_hosts: Vec::new(),
            public_origin: None,
            insecure: false,
            limits: crate::listen::Limits::default(),
            secret_key_file: None,
            repo_schemes: DEFAULT_REPO_SCHEMES.iter().map(|s| s.to_string()).collect(),
            poll_parallel: 4,
        }
    }

    /// The key file secrets are sealed with.
    pub fn secret_key_path(&self) -> PathBuf {
        self.secret_key_file.clone().unwrap_or_else(|| {
            let mut p = self.db_path.clone().into_os_string();
            p.push(".key");
            PathBuf::from(p)
        })
    }

    /// Refuses settings that are unsafe, with what to do instead.
    pub fn check(&self) -> Result<(), Error> {
        if !self.addr.ip().is_loopback() && self.agent_token.is_none() && !self.insecure {
            return Err(Error::Config {
                name: "HOST",
                reason: format!(
                    "listening on {} needs AGENT_TOKEN, or anyone who can reach the port registers \
                     as an agent and is sent every build (its commands and repository credentials). \
                     Set AGENT_TOKEN to a long random value (e.g. `openssl rand -hex 32`) on the server \
                     and every agent, or pass --insecure on a closed network",
                    self.addr
                ),
            });
        }
        Ok(())
    }

    /// What is risky about these settings, one warning per line.
    pub fn security_warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.addr.ip().is_loopback() && self.agent_token.is_none() {
            w.push(format!(
                "listening on {} without AGENT_TOKEN (--insecure): anyone who can reach this port can \
                 register as an agent, receive builds and report results. Set AGENT_TOKEN on the server \
                 and every agent.",
                self.addr
            ));
        }
        if !self.addr.ip().is_loopback() && self.api_token.is_none() {
            w.push(format!(
                "listening on {} without API_TOKEN: anyone who can reach this port can start builds.",
                self.addr
            ));
        }
        for (name, t) in [("AGENT_TOKEN", &self.agent_token), ("API_TOKEN", &self.api_token)] {
            if t.as_ref().is_some_and(|t| t.len() < 16) {
                w.push(format!(
                    "{name} is shorter than 16 characters; use a long random value."
                ));
            }
        }
        w
    }
}

/// An empty value (as `docker compose` passes `${X:-}`) means unset.
fn check_token(name: &'static str, token: Option<String>) -> Result<Option<String>, Error> {
    match token.filter(|t| !t.is_empty()) {
        Some(t) if t.is_empty() || !t.chars().all(|c| c.is_ascii_graphic()) => Err(Error::Config {
            name,
            reason: "must be non-empty printable ASCII without spaces".into(),
        }),
        t => Ok(t),
    }
}

impl TryFrom<Args> for ServerConfig {
    type Error = Error;

    fn try_from(a: Args) -> Result<ServerConfig, Error> {
        let invalid = |name: &'static str| {
            move |e: ci_core::Error| Error::Config {
                name,
                reason: e.to_string(),
            }
        };
        let repo = RepoUrl::parse_with(&a.repo, &a.repo_schemes).map_err(invalid("REPO"))?;
        let lease = LeasePolicy::new(Duration::from_millis(a.heartbeat_ms), a.missed_heartbeats)
            .map_err(invalid("HEARTBEAT_MS/MISSED_HEARTBEATS"))?;
        let build_command = a.build_command.filter(|c| !c.trim().is_empty());
        let file_ok = !a.pipeline_file.is_empty()
            && a.pipeline_file.len() <= 1024
            && !a.pipeline_file.starts_with(['/', '-'])
            && !a.pipeline_file.contains(['\0', ':', '\n', '\\'])
            && !a
                .pipeline_file
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..");
        if !file_ok {
            return Err(Error::Config {
                name: "PIPELINE_FILE",
                reason: format!(
                    "{:?} is not a relative path in the repository (like .ci.yml or ci/pipeline.yml)",
                    a.pipeline_file
                ),
            });
        }
        let public_origin = a.public_url.as_deref().map(origin_of).transpose()?;
        let mut allowed_hosts = Vec::new();
        if let Some(o) = &public_origin {
            allowed_hosts.push(crate::guard::host_name(
                o.split_once("://").map_or(o.as_str(), |x| x.1),
            ));
        }
        for h in a.allowed_hosts.iter().map(|h| h.trim()).filter(|h| !h.is_empty()) {
            let ok = h.len() <= 253
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if !ok {
                return Err(Error::Config {
                    name: "ALLOWED_HOSTS",
                    reason: format!("{h:?} is not a host name"),
                });
            }
            allowed_hosts.push(h.to_ascii_lowercase());
        }
        let max_connections = match a.max_connections {
            0 => crate::listen::Limits::connections_allowed(10_000),
            n => n,
        };
        if !(1..=64).contains(&a.poll_parallel) {
            return Err(Error::Config {
                name: "POLL_PARALLEL",
                reason: "must be 1 to 64".into(),
            });
        }
        if a.dispatch_timeout_ms == 0 {
            return Err(Error::Config {
                name: "DISPATCH_TIMEOUT_MS",
                reason: "must be positive".into(),
            });
        }
        let config = ServerConfig {
            addr: SocketAddr::new(a.host, a.port),
            repo,
            build_command,
            pipeline_file: a.pipeline_file,
            git_cache: Some(a.git_cache.unwrap_or_else(|| {
                let mut p = a.db_path.clone().into_os_string();
                p.push(".git");
                PathBuf::from(p)
            })),
            db_path: a.db_path,
            synchronous: a.sqlite_synchronous,
            lease,
            dispatch_timeout: Duration::from_millis(a.dispatch_timeout_ms),
            agent_token: check_token("AGENT_TOKEN", a.agent_token)?,
            api_token: check_token("API_TOKEN", a.api_token)?,
            build_timeout_ms: Some(u64::try_from(a.build_timeout.as_millis()).unwrap_or(u64::MAX)),
            allowed_hosts,
            public_origin,
            insecure: a.insecure,
            limits: crate::listen::Limits {
                max_connections,
                header_timeout: a.header_timeout,
            },
            secret_key_file: a.secret_key_file,
            repo_schemes: a.repo_schemes,
            poll_parallel: a.poll_parallel,
        };
        config.check()?;
        Ok(config)
    }
}

/// `scheme://host[:port]` of a public URL, lowercase.
fn origin_of(url: &str) -> Result<String, Error> {
    let bad = |why: &str| Error::Config {
        name: "PUBLIC_URL",
        reason: format!("{url:?} {why}"),
    };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("is not a URL"))?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(bad("is not an http or https URL"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let ok = !authority.is_empty()
        && authority
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c));
    if !ok {
        return Err(bad("has no valid host"));
    }
    Ok(format!("{scheme}://{}", authority.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ServerConfig, String> {
        let args = Args::try_parse_from(std::iter::once("ci-server").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        ServerConfig::try_from(args).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = parse(&["--repo", "/srv/repo"]).unwrap();
        assert_eq!(c.addr, "127.0.0.1:3000".parse().unwrap());
        assert_eq!(c.lease, LeasePolicy::new(Duration::from_secs(1), 5).unwrap());
        assert_eq!(c.db_path, PathBuf::from("ci.sqlite"));
        assert_eq!(c.synchronous, Synchronous::Normal);
    }

    #[test]
    fn refuses_bad_values_with_the_setting_named() {
        let e = parse(&["--repo", "ext::sh -c x"]).unwrap_err();
        assert!(e.contains("REPO"), "{e}");
        let e = parse(&["--repo", "/r", "--heartbeat-ms", "0"]).unwrap_err();
        assert!(e.contains("HEARTBEAT_MS"), "{e}");
        let e = parse(&["--repo", "/r", "--port", "99999"]).unwrap_err();
        assert!(e.contains("--port"), "{e}");
        let e = parse(&["--repo", "https://x/y", "--repo-schemes", "file"]).unwrap_err();
        assert!(e.contains("not allowed"), "{e}");
        assert!(parse(&[]).is_err(), "REPO is required");
        let e = parse(&["--repo", "/r", "--agent-token", "has space"]).unwrap_err();
        assert!(e.contains("AGENT_TOKEN"), "{e}");
    }

    #[test]
    fn exposed_needs_an_agent_token_or_insecure() {
        let e = parse(&["--repo", "/r", "--host", "0.0.0.0"]).unwrap_err();
        assert!(e.contains("AGENT_TOKEN") && e.contains("--insecure"), "{e}");
        assert!(parse(&["--repo", "/r"]).unwrap().check().is_ok());
        let token = [
            "--repo",
            "/r",
            "--host",
            "0.0.0.0",
            "--agent-token",
            "0123456789abcdef0123",
        ];
        assert!(parse(&token).unwrap().check().is_ok());
        let insecure = parse(&["--repo", "/r", "--host", "0.0.0.0", "--insecure"]).unwrap();
        assert!(insecure.check().is_ok());
    }

    #[test]
    fn public_url_and_allowed_hosts() {
        let c = parse(&[
            "--repo",
            "/r",
            "--public-url",
            "https://CI.example.com/ci/",
            "--allowed-hosts",
            "server, build-box",
        ])
        .unwrap();
        assert_eq!(c.public_origin.as_deref(), Some("https://ci.example.com"));
        assert_eq!(c.allowed_hosts, ["ci.example.com", "server", "build-box"]);
        assert!(parse(&["--repo", "/r", "--public-url", "ftp://x"]).is_err());
        assert!(parse(&["--repo", "/r", "--allowed-hosts", "a b"]).is_err());
    }

    #[test]
    fn warns_when_exposed_without_tokens() {
        let local = parse(&["--repo", "/r"]).unwrap();
        assert!(local.security_warnings().is_empty());
        let exposed = parse(&["--repo", "/r", "--host", "0.0.0.0", "--insecure"]).unwrap();
        let w = exposed.security_warnings();
        assert!(w.iter().any(|l| l.contains("without AGENT_TOKEN")), "{w:?}");
        let guarded = parse(&[
            "--repo",
            "/r",
            "--host",
            "0.0.0.0",
            "--agent-token",
            "0123456789abcdef0123",
            "--api-token",
            "0123456789abcdef0123",
        ])
        .unwrap();
        assert!(guarded.security_warnings().is_empty());
        let weak = parse(&["--repo", "/r", "--agent-token", "short"]).unwrap();
        assert!(weak.security_warnings()[0].contains("shorter than 16"));
    }
}
