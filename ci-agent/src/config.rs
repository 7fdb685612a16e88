//! Agent settings: command-line flags with environment fallbacks.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ci_core::model::DEFAULT_REPO_SCHEMES;
use ci_core::Backoff;
use clap::{Parser, ValueEnum};

use crate::docker::{DockerSettings, PullPolicy};
use crate::Error;

/// Which runner executes builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RunnerKind {
    /// `sh -c` in a checkout on this machine.
    Shell,
    /// A fresh container per build, through the Docker API.
    Docker,
}

/// `ci-agent` command line. Every flag falls back to an environment
/// variable (the original design's names).
#[derive(Debug, Clone, Parser)]
#[command(name = "ci-agent", version, about = "A ci build agent")]
pub struct Args {
    /// Name or address the server uses to reach this agent, with or without
    /// `http://`. Default: the address the server sees the agent's requests
    /// come from.
    #[arg(long, env = "AGENT_HOST", value_name = "AGENT_HOST")]
    pub host: Option<String>,

    /// Port to listen on for builds (0 picks a free one).
    #[arg(long, env = "AGENT_PORT", value_name = "AGENT_PORT", default_value_t = 3001)]
    pub port: u16,

    /// Address to bind: the one a pushed-to agent listens on (default
    /// 127.0.0.1), and the one an agent that connects out connects from
    /// (default: the one the system picks).
    #[arg(long, env = "AGENT_BIND", value_name = "AGENT_BIND")]
    pub bind: Option<IpAddr>,

    /// The server's host, with or without `http://`.
    #[arg(
        long,
        env = "SERVER_HOST",
        value_name = "SERVER_HOST",
        default_value = "127.0.0.1"
    )]
    pub server_host: String,

    /// The server's port.
    #[arg(long, env = "SERVER_PORT", value_name = "SERVER_PORT", default_value_t = 3000)]
    pub server_port: u16,

    /// How builds run.
    #[arg(long, env = "RUNNER", value_name = "RUNNER", value_enum, default_value_t = RunnerKind::Shell)]
    pub runner: RunnerKind,

    /// Directory for checkouts, the repository cache and undelivered results.
    /// One agent per directory.
    #[arg(
        long,
        env = "WORK_DIR",
        value_name = "WORK_DIR",
        default_value = "ci-agent-work"
    )]
    pub work_dir: PathBuf,

    /// Longest any build may run on this agent (e.g. 90s, 30m, 1h); a
    /// build's own timeout applies when shorter.
    #[arg(long, env = "BUILD_TIMEOUT", value_name = "BUILD_TIMEOUT", default_value = "1h", value_parser = humantime_duration)]
    pub build_timeout: Duration,

    /// On SIGTERM, how long a running build may take to finish before it is
    /// handed back to the server and stopped (e.g. 10s, 5m).
    #[arg(long, env = "SHUTDOWN_GRACE", value_name = "SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime_duration)]
    pub shutdown_grace: Duration,

    /// Longest wait between retries when the server is unreachable, in ms.
    #[arg(
        long,
        env = "RETRY_MAX_MS",
        value_name = "RETRY_MAX_MS",
        default_value_t = 5000
    )]
    pub retry_max_ms: u64,

    /// Docker runner: image for builds that name none.
    #[arg(
        long,
        env = "IMAGE",
        value_name = "IMAGE",
        default_value = "debian:bookworm-slim"
    )]
    pub image: String,

    /// Docker runner: when to pull images.
    #[arg(long, env = "PULL", value_name = "PULL", value_enum, default_value_t = PullPolicy::Missing)]
    pub pull: PullPolicy,

    /// Docker runner: memory limit per build (e.g. 512m, 2g).
    #[arg(long, env = "DOCKER_MEMORY", value_name = "DOCKER_MEMORY", value_parser = crate::docker::parse_memory)]
    pub docker_memory: Option<i64>,

    /// Docker runner: CPU limit per build (e.g. 1.5).
    #[arg(long, env = "DOCKER_CPUS", value_name = "DOCKER_CPUS")]
    pub docker_cpus: Option<f64>,

    /// Docker runner: process limit per build (0 for none).
    #[arg(long, env = "DOCKER_PIDS", value_name = "DOCKER_PIDS", default_value_t = 4096)]
    pub docker_pids: i64,

    /// Docker runner: volumes to mount, `host:container[:ro]`, comma separated.
    #[arg(
        long,
        env = "DOCKER_VOLUMES",
        value_name = "DOCKER_VOLUMES",
        value_delimiter = ','
    )]
    pub docker_volumes: Vec<String>,

    /// Docker runner: network for build containers (default: Docker's bridge).
    #[arg(long, env = "DOCKER_NETWORK", value_name = "DOCKER_NETWORK")]
    pub docker_network: Option<String>,

    /// Shared secret of the agent protocol: presented to the server, and
    /// required from it on `POST /build`.
    #[arg(long, env = "AGENT_TOKEN", value_name = "AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<String>,

    /// Repository URL schemes builds may use, comma separated.
    #[arg(long, env = "REPO_SCHEMES", value_name = "REPO_SCHEMES", value_delimiter = ',', default_values_t = DEFAULT_REPO_SCHEMES.iter().map(|s| s.to_string()))]
    pub repo_schemes: Vec<String>,

    /// How many builds this agent runs at once.
    #[arg(long, env = "CAPACITY", value_name = "CAPACITY", default_value_t = 1)]
    pub capacity: u32,

    /// What this agent can run, comma separated (e.g. linux,docker,arch=amd64):
    /// steps that ask for labels go only to agents that have them all.
    #[arg(long, env = "LABELS", value_name = "LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,

    /// Which protocol to speak: `auto` learns from the registration reply
    /// whether the server takes this protocol's extensions; `original`
    /// sends only the original design's messages and fields from the start.
    #[arg(
        long,
        env = "PROTOCOL",
        value_name = "PROTOCOL",
        value_enum,
        default_value = "auto"
    )]
    pub protocol: Protocol,

    /// How builds reach this agent: `connect` opens one connection to the
    /// server and takes everything over it, listening on no port (behind
    /// NAT too); `push` listens on AGENT_PORT for the server's `POST /build`
    /// (the original design). Default: `connect`, or `push` with
    /// PROTOCOL=original.
    #[arg(long, env = "AGENT_MODE", value_name = "AGENT_MODE", value_enum)]
    pub mode: Option<Mode>,
}

/// How builds reach an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The agent connects to the server and listens on no port.
    Connect,
    /// The server posts builds to the agent's port.
    Push,
}

/// Which protocol an agent speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// The extensions if the server says it takes them, else the original.
    Auto,
    /// Only the original messages and fields.
    Original,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be positive".into());
    }
    Ok(d)
}

/// Validated agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The address calls to the server come from; `None` lets the system
    /// pick. On a host with several, it is the one the server and its
    /// firewall know the agent by.
    pub source: Option<IpAddr>,
    /// Host announced to the server; `None` lets the server use the source
    /// address.
    pub advertise_host: Option<String>,
    /// The server's base URL.
    pub server_url: String,
    /// How builds run.
    pub runner: RunnerKind,
    /// Checkouts, caches and the result spool.
    pub work_dir: PathBuf,
    /// Default build time limit.
    pub build_timeout: Duration,
    /// Retry policy for calls to the server.
    pub retry: Backoff,
    /// Allowed repository URL schemes.
    pub repo_schemes: Vec<String>,
    /// Time limit of one call to the server.
    pub request_timeout: Duration,
    /// Shared secret of the agent protocol.
    pub agent_token: Option<String>,
    /// Docker runner settings.
    pub docker: DockerSettings,
    /// How long a running build may finish at shutdown.
    pub shutdown_grace: Duration,
    /// How many builds run at once.
    pub capacity: u32,
    /// What this agent can run.
    pub labels: ci_core::Labels,
    /// Which protocol to speak.
    pub protocol: Protocol,
    /// How builds reach it.
    pub mode: Mode,
}

impl AgentConfig {
    /// Settings for an agent of the server at `server_url`, working in
    /// `work_dir`, with every other value at its default.
    pub fn new(server_url: impl Into<String>, work_dir: impl Into<PathBuf>) -> AgentConfig {
        AgentConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            source: None,
            advertise_host: None,
            server_url: server_url.into(),
            runner: RunnerKind::Shell,
            work_dir: work_dir.into(),
            build_timeout: Duration::from_secs(3600),
            retry: Backoff::default(),
            repo_schemes: DEFAULT_REPO_SCHEMES.iter().map(|s| s.to_string()).collect(),
            request_timeout: Duration::from_secs(10),
            agent_token: None,
            docker: DockerSettings::default(),
            shutdown_grace: Duration::from_secs(10),
            capacity: 1,
            labels: ci_core::Labels::default(),
            protocol: Protocol::Auto,
            mode: Mode::Connect,
        }
    }
}

impl AgentConfig {
    /// What is risky about these settings, one warning per line.
    pub fn security_warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        // N.B.: an agent that connects out listens nowhere.
        if self.mode == Mode::Push && self.agent_token.is_none() && !self.addr.ip().is_loopback() {
            w.push(format!(
                "listening on {} without AGENT_TOKEN: builds are accepted from the server's address \
                 only, which anyone on that host (or spoofing it) can use to run commands here. \
                 Set AGENT_TOKEN on the server and every agent.",
                self.addr
            ));
        }
        w
    }
}

/// `http://host:port` from a host given with or without a scheme.
pub fn base_url(host: &str, port: u16) -> Result<String, String> {
    let host = host.trim().trim_end_matches('/');
    let (scheme, name) = match host.split_once("://") {
        Some((s, n)) if s == "http" || s == "https" => (s, n),
        Some((s, _)) => return Err(format!("scheme {s:?} is not http or https")),
        None => ("http", host),
    };
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.[]:".contains(c));
    if !ok {
        return Err(format!("{host:?} is not a host name or address"));
    }
    Ok(format!("{scheme}://{name}:{port}"))
}

fn docker_settings(a: &Args) -> Result<DockerSettings, Error> {
    let probe = |image: &str| {
        let repo = ci_core::RepoUrl::parse("/r").ok()?;
        let hash = ci_core::CommitRef::parse("abcd").ok()?;
        let mut b = ci_core::NewBuild::new(repo, hash, "true").ok()?;
        b.image = Some(image.to_owned());
        b.validate().ok()
    };
    if probe(&a.image).is_none() {
        return Err(Error::Config {
            name: "IMAGE",
            reason: format!("not an image reference: {:?}", a.image),
        });
    }
    if let Some(c) = a.docker_cpus {
        if !(c.is_finite() && c > 0.0 && c <= 1024.0) {
            return Err(Error::Config {
                name: "DOCKER_CPUS",
                reason: "must be a positive number".into(),
            });
        }
    }
    if a.docker_pids < 0 {
        return Err(Error::Config {
            name: "DOCKER_PIDS",
            reason: "must be 0 (no limit) or more".into(),
        });
    }
    for v in &a.docker_volumes {
        let parts: Vec<&str> = v.split(':').collect();
        let ok = (2..=3).contains(&parts.len())
            && parts[1].starts_with('/')
            && parts.get(2).is_none_or(|m| matches!(*m, "ro" | "rw"));
        if !ok {
            return Err(Error::Config {
                name: "DOCKER_VOLUMES",
                reason: format!("{v:?} is not host:/container[:ro|rw]"),
            });
        }
    }
    Ok(DockerSettings {
        image: a.image.clone(),
        pull: a.pull,
        memory: a.docker_memory,
        cpus: a.docker_cpus,
        pids: (a.docker_pids > 0).then_some(a.docker_pids),
        volumes: a.docker_volumes.clone(),
        network: a.docker_network.clone().filter(|n| !n.is_empty()),
    })
}

impl TryFrom<Args> for AgentConfig {
    type Error = Error;

    fn try_from(a: Args) -> Result<AgentConfig, Error> {
        let server_url = base_url(&a.server_host, a.server_port).map_err(|reason| Error::Config {
            name: "SERVER_HOST",
            reason,
        })?;
        if a.server_port == 0 {
            return Err(Error::Config {
                name: "SERVER_PORT",
                reason: "must be 1-65535".into(),
            });
        }
        if let Some(h) = &a.host {
            base_url(h, 1).map_err(|reason| Error::Config {
                name: "AGENT_HOST",
                reason,
            })?;
        }
        let retry = Backoff::new(
            Duration::from_millis(100),
            Duration::from_millis(a.retry_max_ms.max(100)),
        )
        .map_err(|e| Error::Config {
            name: "RETRY_MAX_MS",
            reason: e.to_string(),
        })?;
        let docker = docker_settings(&a)?;
        if !(1..=ci_core::protocol::NotifyAgent::MAX_CAPACITY).contains(&a.capacity) {
            return Err(Error::Config {
                name: "CAPACITY",
                reason: format!("must be 1 to {}", ci_core::protocol::NotifyAgent::MAX_CAPACITY),
            });
        }
        let mut given: Vec<&str> = a
            .labels
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .collect();
        // N.B.: the Docker runner says so itself, unless told otherwise.
        if a.runner == RunnerKind::Docker && !given.iter().any(|l| l.starts_with("docker=")) {
            given.push(ci_core::pipeline::DOCKER_LABEL);
        }
        let labels = ci_core::Labels::parse(given).map_err(|e| Error::Config {
            name: "LABELS",
            reason: e.to_string(),
        })?;
        let mode = match (a.mode, a.protocol) {
            (Some(Mode::Connect), Protocol::Original) => {
                return Err(Error::Config {
                    name: "AGENT_MODE",
                    reason: "connect needs this protocol's extensions: use push with PROTOCOL=original"
                        .into(),
                })
            }
            (Some(m), _) => m,
            (None, Protocol::Original) => Mode::Push,
            (None, Protocol::Auto) => Mode::Connect,
        };
        if mode == Mode::Connect {
            crate::tunnel::connect_url(&server_url).map_err(|reason| Error::Config {
                name: "SERVER_HOST",
                reason,
            })?;
        }
        if a.work_dir.as_os_str().is_empty() {
            return Err(Error::Config {
                name: "WORK_DIR",
                reason: "must not be empty".into(),
            });
        }
        // N.B.: an agent that listens speaks from where it listens; one
        // that connects out, from where it is told to, if it is.
        let listen = a.bind.unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let source = match mode {
            Mode::Push => Some(listen),
            Mode::Connect => a.bind,
        }
        .filter(|ip| !ip.is_unspecified());
        Ok(AgentConfig {
            addr: SocketAddr::new(listen, a.port),
            source,
            advertise_host: a.host.filter(|h| !h.trim().is_empty()),
            server_url,
            runner: a.runner,
            work_dir: a.work_dir,
            build_timeout: a.build_timeout,
            retry,
            repo_schemes: a.repo_schemes,
            request_timeout: Duration::from_secs(10),
            docker,
            shutdown_grace: a.shutdown_grace,
            capacity: a.capacity,
            labels,
            protocol: a.protocol,
            mode,
            agent_token: match a.agent_token.filter(|t| !t.is_empty()) {
                Some(t) if t.is_empty() || !t.chars().all(|c| c.is_ascii_graphic()) => {
                    return Err(Error::Config {
                        name: "AGENT_TOKEN",
                        reason: "must be non-empty printable ASCII without spaces".into(),
                    })
                }
                t => t,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings from `args`, or the error as text.
    fn parse(args: &[&str]) -> Result<AgentConfig, String> {
        Args::try_parse_from(std::iter::once("ci-agent").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
            .and_then(|a| AgentConfig::try_from(a).map_err(|e| e.to_string()))
    }

    #[test]
    fn server_urls() {
        assert_eq!(base_url("http://server", 3000).unwrap(), "http://server:3000");
        assert_eq!(base_url("127.0.0.1", 1).unwrap(), "http://127.0.0.1:1");
        assert!(base_url("ftp://x", 1).is_err());
        assert!(base_url("a b", 1).is_err());
        assert!(base_url("", 1).is_err());
    }

    #[test]
    fn args_validate() {
        let c = parse(&["--server-host", "http://ci", "--server-port", "8080"]).unwrap();
        assert_eq!(c.server_url, "http://ci:8080");
        assert_eq!(c.build_timeout, Duration::from_secs(3600));
        assert!(parse(&["--runner", "kubernetes"]).is_err());
        assert!(parse(&["--build-timeout", "0s"]).is_err());
        assert!(parse(&["--server-host", "x y"])
            .unwrap_err()
            .contains("SERVER_HOST"));
    }

    #[test]
    fn labels_and_capacity() {
        let labels = |c: AgentConfig| c.labels.iter().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            labels(parse(&["--labels", "os=linux, arch=amd64,"]).unwrap()),
            ["arch=amd64", "os=linux"]
        );
        assert!(labels(parse(&[]).unwrap()).is_empty());
        assert_eq!(labels(parse(&["--runner", "docker"]).unwrap()), ["docker=true"]);
        assert_eq!(
            labels(parse(&["--runner", "docker", "--labels", "docker=rootless"]).unwrap()),
            ["docker=rootless"]
        );
        assert!(parse(&["--labels", "has space"]).unwrap_err().contains("LABELS"));
        assert!(parse(&["--capacity", "0"]).unwrap_err().contains("CAPACITY"));
        assert_eq!(parse(&["--capacity", "4"]).unwrap().capacity, 4);
    }

    #[test]
    fn warns_when_exposed_without_a_token() {
        let parse = |args: &[&str]| {
            AgentConfig::try_from(
                Args::try_parse_from(std::iter::once("ci-agent").chain(args.iter().copied())).unwrap(),
            )
            .unwrap()
        };
        assert!(
            parse(&["--mode", "push"]).security_warnings().is_empty(),
            "loopback"
        );
        let exposed = parse(&["--mode", "push", "--bind", "0.0.0.0"]).security_warnings();
        assert!(exposed[0].contains("without AGENT_TOKEN"), "{exposed:?}");
        let tokened = parse(&[
            "--mode",
            "push",
            "--bind",
            "0.0.0.0",
            "--agent-token",
            "0123456789abcdef0123",
        ]);
        assert!(tokened.security_warnings().is_empty());
        let connecting = parse(&["--bind", "0.0.0.0"]);
        assert!(connecting.security_warnings().is_empty(), "listens nowhere");
    }

    #[test]
    fn bind_is_where_a_pushed_to_agent_listens_and_a_connecting_one_connects_from() {
        let push = parse(&["--mode", "push"]).unwrap();
        assert_eq!(push.addr.ip(), IpAddr::from([127, 0, 0, 1]));
        assert_eq!(push.source, Some(push.addr.ip()));
        assert_eq!(parse(&[]).unwrap().source, None, "the system picks");
        let bound = parse(&["--bind", "127.0.0.7"]).unwrap();
        assert_eq!(bound.source, Some(IpAddr::from([127, 0, 0, 7])));
        assert_eq!(parse(&["--bind", "0.0.0.0"]).unwrap().source, None);
    }
}
