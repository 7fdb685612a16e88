//! The Docker runner: each build in a fresh container, through the Docker
//! API (bollard).
//!
//! The agent may itself run in a container on the host's Docker socket, so
//! it never bind-mounts its own paths: it checks the commit out with its
//! repository cache and uploads the workspace to the container as a tar
//! archive before starting it. The image needs nothing but `/bin/sh`.
//!
//! A step with services gets a network of its own: each service runs in a
//! container on it, reachable by its name, and the step's container joins
//! it. A service whose image has a health check is waited for (up to
//! [`SERVICE_READY`]) before the step starts; others are started and left
//! to the step to wait for, as Woodpecker and GitLab do for ports.
//!
//! Containers are never privileged, get only the volumes configured
//! (services get none), carry labels naming the build and this agent, and
//! are always removed with their network: at the end of a build, when a
//! build is abandoned or times out (dropping the run removes them, killing
//! them), and when the agent starts (what a previous run of this agent left
//! behind, after a SIGKILL say).

use std::collections::HashMap;
use std::process::Stdio;

use async_trait::async_trait;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HealthStatusEnum, HostConfig, NetworkCreateRequest,
    NetworkingConfig,
};
use bollard::query_parameters::{
    CreateImageOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, UploadToContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::Docker;
use ci_core::model::Service;
use ci_core::{Job, LogSink, RepoUrl, RunError, Runner, Stream};
use futures_util::StreamExt;
use tokio::process::Command;

use crate::Error;
use ci_git::Checkouts;

/// Label carrying the build id.
pub const LABEL_BUILD: &str = "ci.build";
/// Label carrying the attempt.
pub const LABEL_ATTEMPT: &str = "ci.attempt";
/// Label carrying the agent instance that started the container.
pub const LABEL_AGENT: &str = "ci.agent";
/// Label carrying the container the agent itself runs in, if it does.
pub const LABEL_AGENT_CONTAINER: &str = "ci.agent.container";
/// Label carrying a service container's name.
pub const LABEL_SERVICE: &str = "ci.service";

/// Longest wait for services with a health check to be healthy; the step
/// starts then anyway, with a line in its log.
pub const SERVICE_READY: std::time::Duration = std::time::Duration::from_secs(60);

/// When to pull an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PullPolicy {
    /// Only if it is not present.
    Missing,
    /// Never: a missing image fails the build.
    Never,
    /// Before every build.
    Always,
}

/// Container settings.
#[derive(Debug, Clone)]
pub struct DockerSettings {
    /// Image for builds that name none.
    pub image: String,
    /// When to pull.
    pub pull: PullPolicy,
    /// Memory limit in bytes.
    pub memory: Option<i64>,
    /// CPU limit, in CPUs.
    pub cpus: Option<f64>,
    /// Process limit.
    pub pids: Option<i64>,
    /// `host:container[:ro]` volumes, only when asked for.
    pub volumes: Vec<String>,
    /// Network mode (`bridge`, `none`, a network name).
    pub network: Option<String>,
}

impl Default for DockerSettings {
    fn default() -> Self {
        DockerSettings {
            image: "debian:bookworm-slim".into(),
            pull: PullPolicy::Missing,
            memory: None,
            cpus: None,
            pids: Some(4096),
            volumes: Vec::new(),
            network: None,
        }
    }
}

/// Runs builds in containers. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct DockerRunner {
    docker: Docker,
    checkouts: Checkouts,
    repo_schemes: Vec<String>,
    settings: DockerSettings,
    /// Stable name of this agent (one per work directory), for labels.
    instance: String,
    /// The container this agent runs in, when it runs in one: build
    /// containers are labelled with it, so that when it dies its peers on
    /// the same engine can tell its builds are orphans.
    own_container: Option<String>,
}

/// The id (as the hostname Docker gives it) of the container this process
/// runs in, if it runs in one.
fn own_container() -> Option<String> {
    if !std::path::Path::new("/.dockerenv").exists() {
        return None;
    }
    let name = std::fs::read_to_string("/etc/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty() && name.bytes().all(|b| b.is_ascii_hexdigit())).then(|| name.to_owned())
}

fn docker_err(what: &str, e: bollard::errors::Error) -> Error {
    Error::Docker(format!("{what}: {}", ci_core::error::chain(&e)))
}

impl DockerRunner {
    /// Connects to the local Docker daemon (`DOCKER_HOST` or the default
    /// socket) and checks that it answers. `instance` names this agent in
    /// the labels of its containers.
    pub async fn connect(
        checkouts: Checkouts,
        repo_schemes: Vec<String>,
        settings: DockerSettings,
        instance: String,
    ) -> Result<DockerRunner, Error> {
        let unreachable = |e| {
            docker_err(
                "cannot reach the Docker daemon (DOCKER_HOST or /var/run/docker.sock)",
                e,
            )
        };
        let docker = Docker::connect_with_local_defaults().map_err(unreachable)?;
        let docker = tokio::time::timeout(std::time::Duration::from_secs(10), docker.negotiate_version())
            .await
            .map_err(|_| Error::Docker("the Docker daemon did not answer within 10 s".into()))?
            .map_err(unreachable)?;
        docker.ping().await.map_err(unreachable)?;
        Ok(DockerRunner {
            docker,
            checkouts,
            repo_schemes,
            settings,
            instance,
            own_container: own_container(),
        })
    }

    /// The daemon connection.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// Makes sure the default image is present (pulling it per the policy).
    pub async fn check_default_image(&self) -> Result<(), Error> {
        self.ensure_image(&self.settings.image).await
    }

    /// Removes every container of this agent: at start, those a previous
    /// run left behind; at shutdown, those still running. Returns how many.
    pub async fn remove_orphans(&self) -> Result<usize, Error> {
        let label = format!("{LABEL_AGENT}={}", self.instance);
        let found = self.labelled(label.clone()).await?;
        let mut removed = 0;
        for id in found.into_iter().filter_map(|c| c.id) {
            if remove(&self.docker, &id).await {
                removed += 1;
            }
        }
        for network in self.networks(label).await? {
            remove_network(&self.docker, &network).await;
        }
        Ok(removed)
    }

    /// The ids of the networks with this label (`key` or `key=value`).
    async fn networks(&self, label: String) -> Result<Vec<String>, Error> {
        Ok(self
            .labelled_networks(label)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// The networks with this label: their ids and labels.
    async fn labelled_networks(
        &self,
        label: String,
    ) -> Result<Vec<(String, HashMap<String, String>)>, Error> {
        let filters = HashMap::from([("label".to_owned(), vec![label])]);
        let opts = ListNetworksOptionsBuilder::new().filters(&filters).build();
        let found = self
            .docker
            .list_networks(Some(opts))
            .await
            .map_err(|e| docker_err("cannot list networks", e))?;
        Ok(found
            .into_iter()
            .filter_map(|n| Some((n.id?, n.labels.unwrap_or_default())))
            .collect())
    }

    /// Every container (running or not) with this label (`key` or `key=value`).
    async fn labelled(&self, label: String) -> Result<Vec<bollard::models::ContainerSummary>, Error> {
        let filters = HashMap::from([("label".to_owned(), vec![label])]);
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        self.docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| docker_err("cannot list containers", e))
    }

    /// Removes build containers, and their networks, whose agent ran in a
    /// container that is no longer running (killed, crashed, removed).
    /// Returns how many containers.
    pub async fn reap_abandoned(&self) -> Result<usize, Error> {
        let found = self.labelled(LABEL_AGENT_CONTAINER.to_owned()).await?;
        let mut removed = 0;
        let mut alive: HashMap<String, bool> = HashMap::new();
        for c in found {
            let (Some(id), Some(owner)) =
                (c.id, c.labels.and_then(|l| l.get(LABEL_AGENT_CONTAINER).cloned()))
            else {
                continue;
            };
            if !self.owner_running(&owner, &mut alive).await {
                tracing::warn!(container = %id, agent = %owner, "removing the build container of a dead agent");
                if remove(&self.docker, &id).await {
                    removed += 1;
                }
            }
        }
        for (id, labels) in self.labelled_networks(LABEL_AGENT_CONTAINER.to_owned()).await? {
            let Some(owner) = labels.get(LABEL_AGENT_CONTAINER) else {
                continue;
            };
            if !self.owner_running(owner, &mut alive).await {
                remove_network(&self.docker, &id).await;
            }
        }
        Ok(removed)
    }

    /// Whether the agent container `owner` runs (asked once per pass).
    async fn owner_running(&self, owner: &str, known: &mut HashMap<String, bool>) -> bool {
        if let Some(running) = known.get(owner) {
            return *running;
        }
        let running = match self.docker.inspect_container(owner, None).await {
            Ok(info) => info.state.and_then(|s| s.running).unwrap_or(false),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => false,
            // Unsure (engine busy?): leave it for the next round.
            Err(_) => true,
        };
        known.insert(owner.to_owned(), running);
        running
    }

    async fn ensure_image(&self, image: &str) -> Result<(), Error> {
        let present = self.docker.inspect_image(image).await.is_ok();
        let pull = match self.settings.pull {
            PullPolicy::Always => true,
            PullPolicy::Missing => !present,
            PullPolicy::Never => false,
        };
        if !pull {
            return if present {
                Ok(())
            } else {
                Err(Error::Docker(format!(
                    "image {image} is not present and PULL=never"
                )))
            };
        }
        let opts = CreateImageOptionsBuilder::new().from_image(image).build();
        let mut progress = self.docker.create_image(Some(opts), None, None);
        while let Some(step) = progress.next().await {
            if let Err(e) = step {
                return Err(docker_err(
                    &format!("image {image} is not present and cannot be pulled"),
                    e,
                ));
            }
        }
        Ok(())
    }

    /// The limits every container of a build gets: never privileged,
    /// memory, CPUs and processes as configured.
    fn limits(&self) -> HostConfig {
        let s = &self.settings;
        HostConfig {
            privileged: Some(false),
            memory: s.memory,
            nano_cpus: s.cpus.map(|c| (c * 1e9) as i64),
            pids_limit: s.pids,
            ..HostConfig::default()
        }
    }

    /// Makes the step's network and starts its services on it (recorded
    /// in `held` as they are made, so that an error or a drop removes
    /// them), then waits for those with a health check.
    async fn start_services(
        &self,
        job: &Job,
        labels: &HashMap<String, String>,
        log: &LogSink,
        held: &mut Held,
    ) -> Result<(), RunError> {
        let suffix = ci_core::auth::random_secret().map_err(|e| RunError::Infra(e.to_string()))?;
        let name = format!(
            "ci-{}-{}-{}-{}",
            self.instance,
            job.step,
            job.attempt.map_or(0, |a| a.0),
            &suffix[..8]
        );
        let request = NetworkCreateRequest {
            name,
            driver: Some("bridge".into()),
            // N.B.: an agent whose builds get no network gives its services
            // one that reaches nothing else.
            internal: Some(self.settings.network.as_deref() == Some("none")),
            labels: Some(labels.clone()),
            ..NetworkCreateRequest::default()
        };
        let network = self
            .docker
            .create_network(request)
            .await
            .map_err(|e| docker_err("cannot create the step's network", e))?
            .id;
        held.network = Some(network.clone());
        let mut started = Vec::new();
        for service in &job.services {
            started.push(self.start_service(service, &network, labels, held).await?);
            log.write(
                Stream::Stdout,
                format!("ci: service {} ({}) started\n", service.name, service.image).as_bytes(),
            );
        }
        let ready = tokio::time::Instant::now() + SERVICE_READY;
        for (service, id) in job.services.iter().zip(&started) {
            self.wait_ready(service, id, ready, log).await;
        }
        Ok(())
    }

    /// Creates and starts one service on `network`, reachable by its name
    /// (kept in `held` from its creation on). Returns its container's id.
    async fn start_service(
        &self,
        service: &Service,
        network: &str,
        labels: &HashMap<String, String>,
        held: &mut Held,
    ) -> Result<String, RunError> {
        let image = service.image.as_str();
        self.ensure_image(image)
            .await
            .map_err(|e| RunError::Setup(format!("service {}: {e}", service.name)))?;
        let mut labels = labels.clone();
        labels.insert(LABEL_SERVICE.to_owned(), service.name.clone());
        let endpoint = EndpointSettings {
            aliases: Some(vec![service.name.clone()]),
            ..EndpointSettings::default()
        };
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: (!service.command.is_empty()).then(|| service.command.clone()),
            env: Some(service.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            host_config: Some(HostConfig {
                network_mode: Some(network.to_owned()),
                ..self.limits()
            }),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(network.to_owned(), endpoint)])),
            }),
            ..ContainerCreateBody::default()
        };
        let created =
            self.docker.create_container(None, body).await.map_err(|e| {
                docker_err(&format!("cannot create service {} from {image}", service.name), e)
            })?;
        held.containers.push(created.id.clone());
        // N.B.: an image that cannot start with this command is the
        // build's problem, wherever it runs.
        self.docker
            .start_container(&created.id, None)
            .await
            .map_err(|e| {
                RunError::Setup(format!(
                    "service {} ({image}) could not start: {}",
                    service.name,
                    ci_core::error::chain(&e)
                ))
            })?;
        Ok(created.id)
    }

    /// Waits until a service with a health check is healthy, or `until`;
    /// says in the log if it exited or never became healthy.
    async fn wait_ready(&self, service: &Service, id: &str, until: tokio::time::Instant, log: &LogSink) {
        let say = |line: String| log.write(Stream::Stderr, line.as_bytes());
        loop {
            let state = match self.docker.inspect_container(id, None).await {
                Ok(info) => info.state.unwrap_or_default(),
                Err(e) => {
                    return say(format!(
                        "ci: service {}: {}\n",
                        service.name,
                        ci_core::error::chain(&e)
                    ));
                }
            };
            if state.running != Some(true) {
                return say(format!(
                    "ci: service {} exited with code {}\n",
                    service.name,
                    state.exit_code.unwrap_or(-1)
                ));
            }
            match state.health.and_then(|h| h.status) {
                Some(HealthStatusEnum::STARTING) => {}
                Some(HealthStatusEnum::UNHEALTHY) => {
                    return say(format!("ci: service {} is unhealthy\n", service.name));
                }
                // Healthy, or no health check to wait for.
                _ => return,
            }
            if tokio::time::Instant::now() >= until {
                return say(format!(
                    "ci: service {} was not healthy within {} s; the step starts anyway\n",
                    service.name,
                    SERVICE_READY.as_secs()
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    /// The workspace as a tar archive whose entries start with `workspace/`.
    async fn archive(dir: &std::path::Path) -> Result<Vec<u8>, Error> {
        let out = Command::new("tar")
            .arg("--create")
            .arg("--file=-")
            .arg("--directory")
            .arg(dir)
            .arg("--transform=s,^\\.,workspace,")
            .arg(".")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| Error::Docker(format!("cannot run tar: {e}")))?;
        if !out.status.success() {
            return Err(Error::Docker(format!(
                "tar failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(out.stdout)
    }
}

/// What one attempt holds on the engine: its containers (the step's and
/// its services') and its network. Dropping it (also when the build is
/// abandoned or times out) removes them in the background, containers
/// first: removing with force kills them.
struct Held {
    docker: Docker,
    containers: Vec<String>,
    network: Option<String>,
}

impl Held {
    fn new(docker: &Docker) -> Held {
        Held {
            docker: docker.clone(),
            containers: Vec::new(),
            network: None,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let containers = std::mem::take(&mut self.containers);
        let network = self.network.take();
        if containers.is_empty() && network.is_none() {
            return;
        }
        let docker = self.docker.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                futures_util::future::join_all(containers.iter().map(|id| remove(&docker, id))).await;
                if let Some(network) = network {
                    remove_network(&docker, &network).await;
                }
            });
        }
    }
}

/// Removes a network; one already gone counts as removed.
async fn remove_network(docker: &Docker, id: &str) {
    match docker.remove_network(id).await {
        Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
        Err(e) => tracing::warn!(network = %id, cause = %e, "could not remove network"),
    }
}

/// Force-removes a container. False only if it may still exist: one
/// already gone, or already being removed (its build's guard and a shutdown
/// sweep can race), counts as removed.
async fn remove(docker: &Docker, id: &str) -> bool {
    let force = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
    match docker.remove_container(id, Some(force)).await {
        Ok(()) => true,
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => true,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 409,
            message,
        }) if message.contains("already in progress") => true,
        Err(e) => {
            tracing::warn!(container = %id, cause = %e, "could not remove container");
            false
        }
    }
}

#[async_trait]
impl Runner for DockerRunner {
    async fn run(&self, job: &Job, log: &LogSink) -> Result<i32, RunError> {
        let (repo, commit) = (&job.repo, &job.commit);
        // Jobs are validated, but maybe against other schemes than ours.
        RepoUrl::parse_with(repo.as_str(), &self.repo_schemes).map_err(|e| RunError::Setup(e.to_string()))?;
        let image = match &job.image {
            Some(i) => i.to_string(),
            None => self.settings.image.clone(),
        };
        // A missing image is the build's problem: it fails wherever it goes.
        self.ensure_image(&image)
            .await
            .map_err(|e| RunError::Setup(e.to_string()))?;

        let attempt = job.attempt.map_or(0, |a| a.0);
        let ws = self
            .checkouts
            .checkout(repo, commit, &format!("{}-{attempt}", job.step))
            .await
            .map_err(Error::from)?;
        let tar = Self::archive(ws.path()).await?;
        log.write(
            Stream::Stdout,
            format!(
                "ci: checked out {} into {image}\n",
                &ws.commit[..12.min(ws.commit.len())]
            )
            .as_bytes(),
        );

        let mut labels = HashMap::from([
            (LABEL_BUILD.to_owned(), job.step.to_string()),
            (LABEL_ATTEMPT.to_owned(), attempt.to_string()),
            (LABEL_AGENT.to_owned(), self.instance.clone()),
        ]);
        if let Some(own) = &self.own_container {
            labels.insert(LABEL_AGENT_CONTAINER.to_owned(), own.clone());
        }
        let env = crate::env::ci_variables(job, &ws.commit, repo)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .chain(job.secrets.0.iter().map(|(k, v)| format!("{k}={v}")))
            .collect();
        let mut held = Held::new(&self.docker);
        if !job.services.is_empty() {
            self.start_services(job, &labels, log, &mut held).await?;
        }
        let s = &self.settings;
        let host = HostConfig {
            binds: (!s.volumes.is_empty()).then(|| s.volumes.clone()),
            network_mode: held.network.clone().or_else(|| s.network.clone()),
            ..self.limits()
        };
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            cmd: Some(vec!["/bin/sh".into(), "-c".into(), job.command.clone()]),
            working_dir: Some("/workspace".into()),
            env: Some(env),
            labels: Some(labels),
            host_config: Some(host),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            ..ContainerCreateBody::default()
        };
        let created = self
            .docker
            .create_container(None, body)
            .await
            .map_err(|e| docker_err(&format!("cannot create a container from {image}"), e))?;
        held.containers.push(created.id.clone());
        let id = created.id;
        let upload = UploadToContainerOptionsBuilder::new().path("/").build();
        self.docker
            .upload_to_container(&id, Some(upload), bollard::body_full(tar.into()))
            .await
            .map_err(|e| docker_err("cannot copy the workspace into the container", e))?;
        self.docker
            .start_container(&id, None)
            .await
            .map_err(|e| docker_err(&format!("cannot start a container from {image}"), e))?;

        let logs = {
            let opts = LogsOptionsBuilder::new()
                .follow(true)
                .stdout(true)
                .stderr(true)
                .build();
            let mut stream = self.docker.logs(&id, Some(opts));
            let log = log.clone();
            async move {
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(bollard::container::LogOutput::StdErr { message }) => {
                            log.write(Stream::Stderr, &message)
                        }
                        Ok(out) => log.write(Stream::Stdout, &out.into_bytes()),
                        Err(_) => break,
                    }
                }
            }
        };
        let wait = async {
            let opts = WaitContainerOptionsBuilder::new()
                .condition("not-running")
                .build();
            let mut stream = self.docker.wait_container(&id, Some(opts));
            match stream.next().await {
                Some(Ok(r)) => Ok(r.status_code),
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
                Some(Err(e)) => Err(docker_err("lost the container", e)),
                None => Err(Error::Docker(
                    "the container's wait ended without a status".into(),
                )),
            }
        };
        let (code, ()) = tokio::join!(wait, logs);
        let code = code?;
        // N.B.: the result does not wait for the removal (slow on some
        // storage drivers); the guard removes the containers and the
        // network in the background, and shutdown and start-up remove any
        // leftovers.
        drop(held);
        drop(ws);
        Ok(i32::try_from(code).unwrap_or(-1))
    }

    async fn maintain(&self) {
        if let Err(e) = self.reap_abandoned().await {
            tracing::debug!(cause = %e, "could not look for abandoned build containers");
        }
    }

    async fn shutdown(&self) {
        match self.remove_orphans().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "removed this agent's build containers"),
            Err(e) => tracing::warn!(cause = %e, "could not remove this agent's build containers"),
        }
    }
}

/// Parses a memory size: `536870912`, `512m`, `2g`, `64k`.
pub fn parse_memory(s: &str) -> Result<i64, String> {
    let s = s.trim().to_ascii_lowercase();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s.as_str(), ""),
    };
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512m or 2g"))?;
    let mult: i64 = match unit.trim_end_matches('b') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return Err(format!("{s:?}: unit must be k, m or g")),
    };
    n.checked_mul(mult)
        .filter(|b| *b >= 6 << 20)
        .ok_or_else(|| format!("{s:?} must be at least 6m (Docker's minimum)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512m"), Ok(512 << 20));
        assert_eq!(parse_memory("2G"), Ok(2 << 30));
        assert_eq!(parse_memory("2gb"), Ok(2 << 30));
        assert_eq!(parse_memory("67108864"), Ok(64 << 20));
        assert!(parse_memory("1k").is_err());
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("5t").is_err());
    }
}
