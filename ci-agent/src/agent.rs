//! The agent service: registration, presence, builds, heartbeats, results.
//!
//! # Life of an agent
//! 1. Deliver results a previous run of this agent could not (the spool).
//! 2. Register, retrying with backoff until the server answers.
//! 3. While idle, ping every heartbeat interval. If the server no longer
//!    knows this agent (it was dropped), go back to 2.
//! 4. On `POST /build`: answer at once, run the build in the background
//!    (up to `CAPACITY` at once), send a heartbeat every interval for each.
//!    If the server refuses a heartbeat (the attempt was superseded or the
//!    build is no longer running), stop the build: its result would not
//!    count.
//! 5. While it runs, forward its output live, in numbered pieces.
//! 6. When the build ends, write the result to the spool, then deliver it,
//!    retrying with backoff until the server gives a definite answer. If
//!    the machinery failed (not the build), hand the attempt back instead.
//! 7. On `POST /cancel`, stop the build and answer once it is dead.
//! 8. On shutdown, take no new builds, let the running one finish within
//!    the grace period, then leave the server (which requeues anything
//!    still held) and stop it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ci_core::heartbeat::{keep_alive, Beat};
use ci_core::protocol::limits::{MAX_CANCEL_BODY, MAX_DISPATCH_BODY};
use ci_core::protocol::{
    BuildRequest, CancelRequest, ErrorBody, NotifyAgent, NotifyAgentAlive, NotifyAgentLeave,
    NotifyBuildHandback, NotifyBuildResult,
};
use ci_core::retry::retry;
use ci_core::{execute, AgentId, Attempt, DispatchId, Job, LogSink, Outcome, Runner, StepId};
use nix::fcntl::{Flock, FlockArg};
use reqwest::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tracing::{debug, error, info, warn};
use warp::reply::{json, with_status, Response};
use warp::{Filter, Rejection, Reply};

use crate::client::{CallError, ServerClient};
use crate::config::{AgentConfig, Protocol};
use crate::Error;

/// How often the runner's housekeeping runs.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(5);

/// A build agent. See the [module docs](self).
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("server", &self.inner.config.server_url)
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: AgentConfig,
    runner: Arc<dyn Runner>,
    client: ServerClient,
    spool: Spool,
    state: Mutex<State>,
    /// The id of the current registration, for dispatches that arrive
    /// before the reply to it.
    registered: watch::Sender<Option<AgentId>>,
    /// The server's addresses, the only ones builds are taken from when no
    /// agent token is set; resolved again (at most once a second) when a
    /// request comes from elsewhere.
    server_addrs: Mutex<(Vec<IpAddr>, Option<tokio::time::Instant>)>,
    /// The server speaks only the original protocol: no attempts, agent
    /// ids, pings, live logs, hand-backs or leaves go to it.
    original: std::sync::atomic::AtomicBool,
    /// The connection to the server, when the agent connects out.
    tunnel: Arc<crate::tunnel::Tunnel>,
    /// Counts the connections opened, so the session learns of a new one.
    lines: watch::Sender<u64>,
    /// Its name when it connects: its work directory's, across restarts.
    name: String,
    /// Holds the work directory for this process alone.
    _lock: Flock<File>,
}

/// A request refused: its status and why.
struct Refusal(StatusCode, String);

impl Refusal {
    fn into_response(self) -> Response {
        with_status(json(&ErrorBody { error: self.1 }), self.0).into_response()
    }
}

/// How long a dispatch naming a registration the agent has not heard of yet
/// waits for the reply to that registration.
const REGISTRATION_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct State {
    id: Option<AgentId>,
    heartbeat: Option<Duration>,
    /// The builds being run, at most `CAPACITY`.
    running: BTreeMap<DispatchId, Running>,
    /// Shutting down: no new builds.
    draining: bool,
}

/// A build being run.
struct Running {
    /// The step, as the server's API shows it.
    step: StepId,
    attempt: Option<Attempt>,
    /// Stops it (cancel, shutdown).
    stop: Arc<Notify>,
    /// Becomes true when it has stopped and its slot is free.
    done: watch::Receiver<bool>,
}

impl Agent {
    /// An agent running builds with `runner`, working in `config.work_dir`.
    /// Fails if another agent holds that directory.
    pub fn new(config: AgentConfig, runner: Arc<dyn Runner>) -> Result<Agent, Error> {
        let dir = &config.work_dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let lock_path = dir.join("agent.lock");
        let file = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| Error::WorkDirInUse(dir.clone()))?;
        let source = config.source;
        let tunnel = Arc::new(crate::tunnel::Tunnel::default());
        // N.B.: which way calls go is decided by how the agent is run
        // (`serve` or `connect`), not by `config.mode` (which tells the
        // binary which to run).
        let client = ServerClient::new(&config.server_url, config.request_timeout, source)?
            .with_token(config.agent_token.clone())
            .over(tunnel.clone());
        let spool = Spool::open(dir.join("spool"))?;
        let name = crate::instance_id(dir)?;
        Ok(Agent {
            inner: Arc::new(Inner {
                original: std::sync::atomic::AtomicBool::new(config.protocol == Protocol::Original),
                config,
                runner,
                client,
                spool,
                state: Mutex::default(),
                registered: watch::Sender::new(None),
                server_addrs: Mutex::default(),
                tunnel,
                lines: watch::Sender::new(0),
                name,
                _lock: lock,
            }),
        })
    }

    /// The id the server gave this agent, once registered.
    pub fn id(&self) -> Option<AgentId> {
        self.inner.state().id
    }

    /// The builds running now, oldest number first.
    pub fn running(&self) -> Vec<DispatchId> {
        self.inner.state().running.keys().copied().collect()
    }

    /// The agent's HTTP routes (`POST /build`, `POST /cancel`, `GET /healthz`).
    pub fn routes(&self) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
        let inner = self.inner.clone();
        let build = warp::path!("build")
            .and(warp::post())
            .and(warp::header::optional::<String>("authorization"))
            .and(warp::addr::remote())
            .and(warp::body::content_length_limit(MAX_DISPATCH_BODY))
            .and(warp::body::json())
            .and_then(
                move |auth: Option<String>, remote: Option<SocketAddr>, req: BuildRequest| {
                    let inner = inner.clone();
                    async move {
                        if let Err(refused) = inner.authorize(auth.as_deref(), remote).await {
                            return Ok::<_, Infallible>(refused.into_response());
                        }
                        Ok(match accept_build(&inner, req).await {
                            Ok(v) => json(&v).into_response(),
                            Err(refused) => refused.into_response(),
                        })
                    }
                },
            );
        let inner = self.inner.clone();
        let health = warp::path!("healthz").and(warp::get()).map(move || {
            let s = inner.state();
            json(&serde_json::json!({
                "status": "ok",
                "id": s.id,
                "build": s.running.keys().next(),
                "builds": s.running.keys().collect::<Vec<_>>(),
                "steps": s.running.values().map(|r| r.step).collect::<Vec<_>>(),
            }))
            .into_response()
        });
        let inner = self.inner.clone();
        let cancel = warp::path!("cancel")
            .and(warp::post())
            .and(warp::header::optional::<String>("authorization"))
            .and(warp::addr::remote())
            .and(warp::body::content_length_limit(MAX_CANCEL_BODY))
            .and(warp::body::json())
            .and_then(
                move |auth: Option<String>, remote: Option<SocketAddr>, req: CancelRequest| {
                    let inner = inner.clone();
                    async move {
                        if let Err(refused) = inner.authorize(auth.as_deref(), remote).await {
                            return Ok::<_, Infallible>(refused.into_response());
                        }
                        let stopped = inner.stop(req.id, req.attempt).await;
                        Ok(json(&serde_json::json!({ "stopped": stopped })).into_response())
                    }
                },
            );
        let spec = Arc::new(crate::openapi::spec());
        let openapi = warp::path!("openapi.json")
            .and(warp::get())
            .map(move || json(&*spec).into_response());
        build
            .or(health)
            .unify()
            .or(cancel)
            .unify()
            .or(openapi)
            .unify()
            .recover(recover)
            .unify()
    }

    /// Serves builds on `listener` and keeps in touch with the server until
    /// `shutdown` resolves. Fails only if the server refuses to register
    /// this agent (a configuration error).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let port = listener
            .local_addr()
            .map_err(|e| Error::io(Path::new("listener"), e))?
            .port();
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = move |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let http = tokio::spawn(
            warp::serve(self.routes())
                .incoming(listener)
                .graceful(stopped(stop_rx.clone()))
                .run(),
        );
        info!(port, server = %self.inner.config.server_url, "ci-agent listening");
        for w in self.inner.config.security_warnings() {
            warn!("SECURITY: {w}");
        }
        let maintenance = self.inner.maintain();
        let session = self.session(port);
        let result = tokio::select! {
            r = session => r,
            () = shutdown => Ok(()),
        };
        self.inner.drain().await;
        let _ = stop_tx.send(true);
        let _ = http.await;
        maintenance.abort();
        self.inner.runner.shutdown().await;
        result
    }

    /// Spool, register, ping; again whenever the server forgets us.
    async fn session(&self, port: u16) -> Result<(), Error> {
        let inner = &self.inner;
        loop {
            inner.deliver_spooled().await;
            let announce = inner.announce(port);
            let forced = inner.config.protocol == Protocol::Original;
            let (id, heartbeat, original) = inner.enroll(&announce).await?;
            if original {
                if !forced {
                    info!("the server speaks only the original protocol: sending only its messages");
                }
                if announce.host.is_none() {
                    warn!("the original server cannot tell this agent's address: set HOST");
                }
                // N.B.: nothing tells us it forgot us (it never does).
                return std::future::pending().await;
            }
            inner.ping_while_known(id, heartbeat).await;
            warn!(%id, "the server no longer knows this agent; registering again");
        }
    }

    /// Connects to the server and keeps connecting whenever the connection
    /// is lost, taking builds and cancels over it, until `shutdown`
    /// resolves. Listens on no port. Fails only if the server refuses to
    /// register this agent (a configuration error).
    pub async fn connect(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
        let url =
            crate::tunnel::connect_url(&self.inner.config.server_url).map_err(|reason| Error::Config {
                name: "SERVER_HOST",
                reason,
            })?;
        info!(server = %url, "ci-agent connecting to its server (listening on no port)");
        self.inner.tunnel.use_it();
        let maintenance = self.inner.maintain();
        let (incoming_tx, incoming) = tokio::sync::mpsc::channel(64);
        let carrier = tokio::spawn(self.inner.clone().carry(url, incoming_tx));
        let server = tokio::spawn(self.inner.clone().answer(incoming));
        let result = tokio::select! {
            r = self.connected_session() => r,
            () = shutdown => Ok(()),
        };
        // N.B.: the connection stays up while draining: leaving and the
        // last results go over it.
        self.inner.drain().await;
        carrier.abort();
        server.abort();
        maintenance.abort();
        self.inner.runner.shutdown().await;
        result
    }

    /// Register once connected; on a new connection, say who we are (the
    /// server binds the connection to us) or register again if the server
    /// forgot us; deliver the spool; ping while idle.
    async fn connected_session(&self) -> Result<(), Error> {
        let inner = &self.inner;
        let mut lines = inner.lines.subscribe();
        let announce = inner.announce(0);
        loop {
            let _ = lines.wait_for(|n| *n > 0).await;
            lines.mark_unchanged();
            let known = {
                let s = inner.state();
                s.id.zip(s.heartbeat)
            };
            let (id, heartbeat) = match known {
                Some((id, every)) if inner.hello(id).await => (id, every),
                _ => {
                    let (id, every, _) = inner.enroll(&announce).await?;
                    (id, every)
                }
            };
            inner.deliver_spooled().await;
            tokio::select! {
                () = inner.ping_while_known(id, heartbeat) => {
                    warn!(%id, "the server no longer knows this agent; registering again");
                    inner.state().id = None;
                    // Not a new connection: go round at once.
                    inner.lines.send_modify(|n| *n = (*n).max(1));
                }
                _ = lines.changed() => info!("connected again"),
            }
        }
    }
}

impl Inner {
    /// Runs the runner's housekeeping every [`MAINTENANCE_EVERY`] until
    /// aborted.
    fn maintain(&self) -> tokio::task::JoinHandle<()> {
        let runner = self.runner.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(MAINTENANCE_EVERY);
            loop {
                tick.tick().await;
                runner.maintain().await;
            }
        })
    }

    /// What this agent says of itself when it registers.
    fn announce(&self, port: u16) -> NotifyAgent {
        let forced = self.config.protocol == Protocol::Original;
        // N.B.: the original server forms the agent's URL as
        // `${host}:${port}`: the host carries its scheme.
        let host = self
            .config
            .advertise_host
            .as_deref()
            .map(|h| match h.contains("://") {
                true => h.to_owned(),
                false => format!("http://{h}"),
            });
        let connected = self.tunnel.in_use();
        match forced {
            true => NotifyAgent {
                host,
                port,
                session: false,
                capacity: None,
                labels: None,
                pings: false,
                name: None,
                version: None,
            },
            false => NotifyAgent {
                host: host.filter(|_| !connected),
                port,
                session: true,
                capacity: Some(self.config.capacity),
                labels: Some(self.config.labels.clone()).filter(|l| !l.is_empty()),
                pings: true,
                name: connected.then(|| self.name.clone()),
                version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            },
        }
    }

    /// Registers, retrying until the server answers; returns the id, the
    /// heartbeat interval, and whether the server speaks only the original
    /// protocol.
    async fn enroll(&self, announce: &NotifyAgent) -> Result<(AgentId, Duration, bool), Error> {
        let forced = self.config.protocol == Protocol::Original;
        // The previous session's secret (kept across restarts) proves
        // that this is the same agent, so the server replaces that
        // session at once instead of waiting for it to lapse.
        self.client.set_secret(self.load_session().filter(|_| !forced));
        let reply = retry("register", self.config.retry, || self.client.register(announce))
            .await
            .map_err(Error::Registration)?;
        let heartbeat = Duration::from_millis(reply.timeout.max(10));
        // N.B.: a refusal of a ping sent before this registration (a slow
        // server's late answer) is not one of the new registration's.
        let _ = self.tunnel.take_refusal();
        self.client.set_secret(reply.secret.clone());
        if let Some(secret) = &reply.secret {
            self.save_session(secret);
        }
        if let Some(token) = &reply.token {
            self.save_private(&self.credential_path(), token, "agent's own token");
            info!("the server issued this agent its own token; it connects with it from now on");
        }
        {
            let mut s = self.state();
            s.id = Some(reply.id);
            s.heartbeat = Some(heartbeat);
        }
        let original = forced || !reply.extensions;
        self.original.store(original, std::sync::atomic::Ordering::SeqCst);
        self.registered.send_replace(Some(reply.id));
        info!(id = %reply.id, heartbeat = ?heartbeat, original, "registered");
        Ok((reply.id, heartbeat, original))
    }

    /// Tells the server over a new connection that this is agent `id`.
    /// False if it no longer knows us.
    async fn hello(&self, id: AgentId) -> bool {
        let ping = NotifyAgentAlive {
            agent_id: Some(id),
            ..NotifyAgentAlive::default()
        };
        let timeout = self.config.request_timeout;
        match retry("hello", self.config.retry, || self.client.alive(&ping, timeout)).await {
            Ok(()) => {
                info!(%id, "the server still knows this agent");
                true
            }
            Err(_) => false,
        }
    }

    /// Opens the connection to the server and opens it again whenever it
    /// closes, with the capped, jittered backoff.
    async fn carry(
        self: Arc<Self>,
        url: String,
        incoming: tokio::sync::mpsc::Sender<crate::tunnel::Incoming>,
    ) {
        let mut delays = self.config.retry.delays(fastrand::Rng::new());
        let mut failures = 0u32;
        loop {
            // N.B.: its own token, once issued, else the shared one.
            let own = self.load_credential();
            let token = own.as_deref().or(self.config.agent_token.as_deref());
            match crate::tunnel::open(&url, token, self.config.source, self.config.request_timeout).await {
                Ok(ws) => {
                    failures = 0;
                    delays.reset();
                    info!(server = %url, "connected to the server");
                    let lines = &self.lines;
                    crate::tunnel::carry(&self.tunnel, ws, incoming.clone(), || {
                        lines.send_modify(|n| *n += 1);
                    })
                    .await;
                    warn!(server = %url, "the connection to the server closed; connecting again");
                }
                Err(crate::tunnel::ConnectError::Refused(_)) if own.is_some() => {
                    failures += 1;
                    warn!(
                        server = %url,
                        failures,
                        credential = %self.credential_path().display(),
                        "the server refused this agent's own token (revoked?): remove the credential file \
                         to register again with AGENT_TOKEN, if this agent should"
                    );
                }
                Err(e) => {
                    failures += 1;
                    // N.B.: a refused token is an operator's to fix: said
                    // every time, not every tenth.
                    let refused = matches!(e, crate::tunnel::ConnectError::Refused(_));
                    if refused || failures == 1 || failures.is_multiple_of(10) {
                        warn!(server = %url, failures, cause = %e, "cannot connect to the server");
                    }
                }
            }
            let delay = delays.next().unwrap_or(self.config.retry.cap());
            tokio::time::sleep(delay).await;
        }
    }

    /// Answers the server's requests over the connection: builds and
    /// cancels, as the HTTP routes would.
    async fn answer(self: Arc<Self>, mut incoming: tokio::sync::mpsc::Receiver<crate::tunnel::Incoming>) {
        while let Some(request) = incoming.recv().await {
            let inner = self.clone();
            tokio::spawn(async move {
                let refuse = |status: StatusCode, error: String| {
                    (
                        status.as_u16(),
                        serde_json::to_value(ErrorBody { error }).unwrap_or_default(),
                    )
                };
                let (status, body) = match request.path.as_str() {
                    "/build" => match serde_json::from_value::<BuildRequest>(request.body.clone()) {
                        Ok(req) => match accept_build(&inner, req).await {
                            Ok(v) => (200, v),
                            Err(Refusal(status, error)) => refuse(status, error),
                        },
                        Err(e) => refuse(StatusCode::BAD_REQUEST, format!("invalid body: {e}")),
                    },
                    "/cancel" => match serde_json::from_value::<CancelRequest>(request.body.clone()) {
                        Ok(req) => {
                            let stopped = inner.stop(req.id, req.attempt).await;
                            (200, serde_json::json!({ "stopped": stopped }))
                        }
                        Err(e) => refuse(StatusCode::BAD_REQUEST, format!("invalid body: {e}")),
                    },
                    other => refuse(StatusCode::NOT_FOUND, format!("no such request: {other:?}")),
                };
                request.answer(status, body).await;
            });
        }
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True while the server speaks only the original protocol.
    fn is_original(&self) -> bool {
        self.original.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Lets a dispatch or cancel through if it presents the agent token or,
    /// with no token set, if it comes from the server's address; else the
    /// refusal to answer with.
    async fn authorize(&self, auth: Option<&str>, remote: Option<SocketAddr>) -> Result<(), Refusal> {
        let refuse = |status: StatusCode, error: String| Err(Refusal(status, error));
        if let Some(token) = &self.config.agent_token {
            if ci_core::auth::bearer_matches(auth, token) {
                return Ok(());
            }
            let error = "missing or wrong AGENT_TOKEN (Authorization: Bearer ...)".to_owned();
            return refuse(StatusCode::UNAUTHORIZED, error);
        }
        let Some(ip) = remote.map(|r| r.ip().to_canonical()) else {
            return refuse(StatusCode::FORBIDDEN, "no source address".into());
        };
        if self.is_server(ip).await {
            return Ok(());
        }
        warn!(%ip, "refused a request that did not come from the server");
        refuse(
            StatusCode::FORBIDDEN,
            format!(
                "this agent has no AGENT_TOKEN, so it takes builds only from its server ({}), not from {ip}",
                self.config.server_url
            ),
        )
    }

    /// True if `ip` is one of the server's addresses.
    async fn is_server(&self, ip: IpAddr) -> bool {
        let stale = {
            let cached = self.server_addrs.lock().unwrap_or_else(PoisonError::into_inner);
            if cached.0.contains(&ip) {
                return true;
            }
            cached.1.is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        };
        if !stale {
            return false;
        }
        let hostport = self
            .config
            .server_url
            .split_once("://")
            .map_or(self.config.server_url.as_str(), |(_, rest)| rest);
        let fresh: Vec<IpAddr> = match tokio::net::lookup_host(hostport).await {
            Ok(addrs) => addrs.map(|a| a.ip().to_canonical()).collect(),
            Err(e) => {
                warn!(server = %hostport, cause = %e, "cannot resolve the server's address");
                Vec::new()
            }
        };
        let found = fresh.contains(&ip);
        *self.server_addrs.lock().unwrap_or_else(PoisonError::into_inner) =
            (fresh, Some(tokio::time::Instant::now()));
        found
    }

    fn session_path(&self) -> PathBuf {
        self.config.work_dir.join("session")
    }

    /// The session secret of the last registration, if one was kept.
    fn load_session(&self) -> Option<String> {
        read_private(&self.session_path(), |b| b.is_ascii_hexdigit())
    }

    /// Keeps the session secret (readable by this user only).
    fn save_session(&self, secret: &str) {
        self.save_private(&self.session_path(), secret, "session secret");
    }

    fn credential_path(&self) -> PathBuf {
        self.config.work_dir.join("credential")
    }

    /// This agent's own token, once the server issued one.
    fn load_credential(&self) -> Option<String> {
        read_private(&self.credential_path(), |b| b.is_ascii_graphic())
    }

    /// Writes `text` to `path`, readable by this user only.
    fn save_private(&self, path: &Path, text: &str, what: &str) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()));
        if let Err(e) = written {
            warn!(path = %path.display(), cause = %e, "cannot keep the {what}");
        }
    }

    /// Pings while idle. Returns when the server says it does not know `id`.
    async fn ping_while_known(&self, id: AgentId, every: Duration) {
        keep_alive(every, || async move {
            let (busy, draining) = {
                let s = self.state();
                (!s.running.is_empty(), s.draining)
            };
            if draining {
                return std::future::pending().await;
            }
            if busy {
                return Beat::Alive;
            }
            let ping = NotifyAgentAlive {
                agent_id: Some(id),
                ..NotifyAgentAlive::default()
            };
            match self.client.ping(&ping, every).await {
                Ok(()) => Beat::Alive,
                // Unknown, or our secret is no longer valid: start over.
                Err(e) if matches!(e.refused_status(), Some(StatusCode::NOT_FOUND)) => Beat::Refused,
                Err(CallError::Server { status, .. }) if status == StatusCode::UNAUTHORIZED => {
                    warn!("the server refuses our AGENT_TOKEN");
                    Beat::Unheard
                }
                Err(e) => {
                    debug!(cause = %e, "ping failed");
                    Beat::Unheard
                }
            }
        })
        .await;
    }

    /// Runs one build to the end and delivers its result.
    async fn run_build(
        self: Arc<Self>,
        job: Job,
        agent_id: Option<AgentId>,
        stop: Arc<Notify>,
        done: watch::Sender<bool>,
    ) {
        let original = self.is_original();
        let agent_id = agent_id.filter(|_| !original);
        let sink = || LogSink::default().with_secrets(job.secrets.0.values());
        let (log, forwarder) = if original {
            // The original server takes no live output.
            (sink(), tokio::spawn(async {}))
        } else {
            let (live_tx, live_rx) = tokio::sync::mpsc::channel(ci_core::runner::LIVE_BACKLOG);
            let forwarder = tokio::spawn(crate::live::forward(
                self.client.clone(),
                job.id,
                job.attempt,
                agent_id,
                live_rx,
            ));
            (sink().with_live(live_tx), forwarder)
        };
        info!(build = %job.step, attempt = ?job.attempt, commit = %job.commit, "build started");
        let outcome = {
            let run = execute(&*self.runner, &job, &log, self.config.build_timeout);
            let beat = self.heartbeat(&job, agent_id);
            tokio::select! {
                o = run => Ok(o),
                () = beat => Err("the server gave it to another attempt"),
                () = stop.notified() => Err("stopped"),
            }
        };
        // The run is over (its processes or container killed if it did not
        // finish): free the slot.
        self.state().running.remove(&job.id);
        let _ = done.send(true);
        drop(log);
        let outcome = match outcome {
            Ok(o) => o,
            Err(why) => {
                forwarder.abort();
                warn!(build = %job.step, why, "build abandoned");
                return;
            }
        };
        // Let the last live pieces go out before the result ends the build.
        let _ = tokio::time::timeout(Duration::from_secs(2), forwarder).await;
        let completion = match outcome {
            Outcome::Completed(c) => c,
            Outcome::HandBack(reason) => {
                warn!(build = %job.step, %reason, "the machinery failed; handing the build back");
                return self.hand_back(&job, agent_id, reason).await;
            }
        };
        info!(build = %job.step, exit_code = completion.exit_code, "build finished");
        let result = NotifyBuildResult {
            id: job.id,
            status: completion.exit_code,
            stdout: completion.stdout,
            stderr: completion.stderr,
            attempt: job.attempt,
            agent_id,
        };
        let spooled = match self.spool.save(&result) {
            Ok(path) => Some(path),
            Err(e) => {
                error!(cause = %e, "could not spool the result; delivering from memory");
                None
            }
        };
        self.deliver(&result, spooled.as_deref()).await;
    }

    /// Gives an attempt back to the server, retrying while it is away.
    async fn hand_back(&self, job: &Job, agent_id: Option<AgentId>, reason: String) {
        if self.is_original() {
            // N.B.: the original server takes nothing back and never runs a
            // build again: the attempt fails, saying why.
            let not_run = ci_core::Completion::not_run(&reason);
            let result = NotifyBuildResult {
                id: job.id,
                status: not_run.exit_code,
                stdout: not_run.stdout,
                stderr: not_run.stderr,
                attempt: None,
                agent_id: None,
            };
            let spooled = self.spool.save(&result).ok();
            return self.deliver(&result, spooled.as_deref()).await;
        }
        let Some(attempt) = job.attempt else {
            // A server that numbers no attempts cannot take one back: the
            // lease lapses instead.
            return;
        };
        let back = NotifyBuildHandback {
            id: job.id,
            attempt,
            agent_id,
            reason,
        };
        match retry("hand back", self.config.retry, || self.client.handback(&back)).await {
            Ok(()) => info!(build = %job.step, "build handed back"),
            Err(e) => warn!(build = %job.step, cause = %e, "hand-back refused"),
        }
    }

    /// Stops build `id` (of `attempt`, if given) if it runs here, and waits
    /// until it has. Returns whether it was running.
    async fn stop(&self, id: DispatchId, attempt: Option<Attempt>) -> bool {
        let running = {
            let s = self.state();
            s.running
                .get(&id)
                .filter(|r| attempt.is_none() || r.attempt.is_none() || r.attempt == attempt)
                .map(|r| (r.stop.clone(), r.done.clone()))
        };
        let Some((stop, mut done)) = running else {
            return false;
        };
        stop.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(30), done.wait_for(|d| *d)).await;
        info!(build = %id, "build stopped on request");
        true
    }

    /// Graceful shutdown: take no new builds, give the running ones up to
    /// the grace period, then leave the server (which hands back what this
    /// agent still holds) and stop them.
    async fn drain(&self) {
        let running: Vec<(DispatchId, watch::Receiver<bool>)> = {
            let mut s = self.state();
            s.draining = true;
            s.running.iter().map(|(b, r)| (*b, r.done.clone())).collect()
        };
        if !running.is_empty() {
            let builds: Vec<DispatchId> = running.iter().map(|(b, _)| *b).collect();
            info!(?builds, grace = ?self.config.shutdown_grace, "shutting down: letting the builds finish");
            let all = futures_util::future::join_all(
                running
                    .into_iter()
                    .map(|(_, mut done)| async move { done.wait_for(|d| *d).await.map(drop) }),
            );
            let _ = tokio::time::timeout(self.config.shutdown_grace, all).await;
        }
        let id = self.state().id.filter(|_| !self.is_original());
        if let Some(id) = id {
            match self.client.leave(&NotifyAgentLeave { agent_id: id }).await {
                Ok(()) => info!("left the server"),
                Err(e) => warn!(cause = %e, "could not tell the server this agent leaves"),
            }
        }
        let still: Vec<(DispatchId, Option<Attempt>)> = self
            .state()
            .running
            .iter()
            .map(|(b, r)| (*b, r.attempt))
            .collect();
        for (build, attempt) in still {
            warn!(%build, "shutting down: stopping the build, the server runs it elsewhere");
            self.stop(build, attempt).await;
        }
    }

    /// Heartbeats for `job` every interval. Returns if the server refuses
    /// one: the attempt no longer counts.
    async fn heartbeat(&self, job: &Job, agent: Option<AgentId>) {
        let every = self.state().heartbeat.unwrap_or(Duration::from_secs(1));
        keep_alive(every, || async move {
            let hb = NotifyAgentAlive {
                id: Some(job.id),
                attempt: job.attempt,
                agent_id: agent,
            };
            match self.client.alive(&hb, every).await {
                Ok(()) => Beat::Alive,
                Err(CallError::Refused { status, message }) => {
                    warn!(build = %job.step, %status, %message, "heartbeat refused");
                    Beat::Refused
                }
                // The server is down or busy: keep building, keep trying.
                Err(e) => {
                    debug!(build = %job.step, cause = %e, "heartbeat failed");
                    Beat::Unheard
                }
            }
        })
        .await;
    }

    /// Delivers a result until the server gives a definite answer, then
    /// removes it from the spool.
    async fn deliver(&self, result: &NotifyBuildResult, spooled: Option<&Path>) {
        // N.B.: a result kept from a session with a server that took the
        // extensions goes to one that does not with the original fields only.
        let original;
        let result = match self.is_original() {
            true => {
                original = NotifyBuildResult {
                    attempt: None,
                    agent_id: None,
                    ..result.clone()
                };
                &original
            }
            false => result,
        };
        match retry("deliver result", self.config.retry, || self.client.result(result)).await {
            Ok(()) => info!(build = %result.id, "result delivered"),
            Err(e) => warn!(build = %result.id, cause = %e, "result refused; dropping it"),
        }
        if let Some(path) = spooled {
            self.spool.remove(path);
        }
    }

    async fn deliver_spooled(&self) {
        for (path, result) in self.spool.load() {
            info!(build = %result.id, "delivering a result from a previous run");
            self.deliver(&result, Some(&path)).await;
        }
    }
}

/// What a file this agent keeps holds, if it is there, not empty, and
/// every byte passes `ok`.
fn read_private(path: &Path, ok: fn(u8) -> bool) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty() && s.bytes().all(ok)).then(|| s.to_owned())
}

async fn accept_build(inner: &Arc<Inner>, req: BuildRequest) -> Result<serde_json::Value, Refusal> {
    let reply = |status: StatusCode, error: String| Err(Refusal(status, error));
    let job = match Job::from_request(&req, &inner.config.repo_schemes) {
        Ok(job) => job,
        Err(e) => return reply(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Some(want) = req.agent_id {
        // The dispatch may have overtaken the reply to our registration.
        let mut registered = inner.registered.subscribe();
        let known = tokio::time::timeout(
            REGISTRATION_WAIT,
            registered.wait_for(|id| id.is_some_and(|id| id >= want)),
        )
        .await;
        let now = *inner.registered.borrow();
        if known.is_err() || now != Some(want) {
            let me = now.map_or("unregistered".to_owned(), |id| format!("agent {id}"));
            return reply(
                StatusCode::CONFLICT,
                format!("dispatched to agent {want}, but this is {me}"),
            );
        }
    }
    if req.agent_id.is_none() && inner.registered.borrow().is_none() {
        // N.B.: a server that names no agent (the original design's) may
        // send a build before the reply to our registration has told us
        // which protocol it speaks: wait for it, so the build is reported
        // in that protocol.
        let mut registered = inner.registered.subscribe();
        let known = tokio::time::timeout(REGISTRATION_WAIT, registered.wait_for(Option::is_some)).await;
        if !matches!(known, Ok(Ok(_))) {
            return reply(StatusCode::CONFLICT, "not registered yet".into());
        }
    }
    let stop = Arc::new(Notify::new());
    let (done_tx, done_rx) = watch::channel(false);
    let agent_id = {
        let mut s = inner.state();
        if s.draining {
            return reply(StatusCode::CONFLICT, "shutting down".into());
        }
        if s.running.contains_key(&req.id) {
            return reply(StatusCode::CONFLICT, format!("already running build {}", req.id));
        }
        if s.running.len() >= inner.config.capacity as usize {
            let builds: Vec<String> = s.running.keys().map(ToString::to_string).collect();
            return reply(
                StatusCode::CONFLICT,
                format!("busy with build {}", builds.join(", ")),
            );
        }
        s.running.insert(
            req.id,
            Running {
                step: job.step,
                attempt: req.attempt,
                stop: stop.clone(),
                done: done_rx,
            },
        );
        // N.B.: the id it was dispatched to, which was waited for above.
        req.agent_id.or(s.id)
    };
    tokio::spawn(inner.clone().run_build(job, agent_id, stop, done_tx));
    Ok(serde_json::json!({"accepted": true}))
}

async fn recover(err: Rejection) -> Result<Response, Infallible> {
    let (status, error) = if err.is_not_found() {
        (StatusCode::NOT_FOUND, "no such endpoint".to_owned())
    } else if let Some(e) = err.find::<warp::filters::body::BodyDeserializeError>() {
        (StatusCode::BAD_REQUEST, format!("invalid body: {e}"))
    } else if err.find::<warp::reject::PayloadTooLarge>().is_some() {
        (StatusCode::PAYLOAD_TOO_LARGE, "body too large".to_owned())
    } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        (StatusCode::METHOD_NOT_ALLOWED, "method not allowed".to_owned())
    } else if let Some(e) = err.find::<warp::reject::UnsupportedMediaType>() {
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, e.to_string())
    } else {
        (StatusCode::BAD_REQUEST, "bad request".to_owned())
    };
    Ok(with_status(json(&ErrorBody { error }), status).into_response())
}

// === impl Spool ===

/// Results not yet delivered, one JSON file each, so that an agent killed
/// before the server heard back delivers them when it starts again.
#[derive(Debug)]
struct Spool {
    dir: PathBuf,
}

impl Spool {
    fn open(dir: PathBuf) -> Result<Spool, Error> {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Spool { dir })
    }

    /// Writes `result` durably (temp file, fsync, rename).
    fn save(&self, result: &NotifyBuildResult) -> Result<PathBuf, Error> {
        use std::io::Write;
        let name = format!("{}-{}.json", result.id, result.attempt.map_or(0, |a| a.0));
        let path = self.dir.join(name);
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec(result).map_err(|e| Error::Spool(e.to_string()))?;
        let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(&body)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }

    fn remove(&self, path: &Path) {
        if let Err(e) = std::fs::remove_file(path) {
            warn!(path = %path.display(), cause = %e, "could not remove spooled result");
        }
    }

    /// Every spooled result, oldest build first. Unreadable files are set
    /// aside with a `.bad` suffix rather than retried forever.
    fn load(&self) -> Vec<(PathBuf, NotifyBuildResult)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter_map(|p| {
                let parsed = std::fs::read(&p)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<NotifyBuildResult>(&b).ok());
                if parsed.is_none() {
                    warn!(path = %p.display(), "unreadable spooled result set aside");
                    let _ = std::fs::rename(&p, p.with_extension("bad"));
                }
                parsed.map(|r| (p, r))
            })
            .collect();
        out.sort_by_key(|(_, r)| (r.id, r.attempt));
        out
    }
}

/// The service future must stay spawnable: no lock held across an await.
#[allow(dead_code)]
fn serve_is_send(agent: Agent, listener: TcpListener) {
    fn send<T: Send>(_: T) {}
    send(agent.serve(listener, std::future::pending()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_round_trip_and_bad_files_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().to_path_buf()).unwrap();
        let r = NotifyBuildResult {
            id: DispatchId(3),
            status: 1,
            stdout: "o".into(),
            stderr: "e".into(),
            attempt: Some(Attempt(2)),
            agent_id: Some(AgentId(1)),
        };
        let path = spool.save(&r).unwrap();
        std::fs::write(dir.path().join("junk.json"), "{not json").unwrap();
        let loaded = spool.load();
        assert_eq!(loaded, vec![(path.clone(), r)]);
        assert!(dir.path().join("junk.bad").exists());
        spool.remove(&path);
        assert!(spool.load().is_empty());
    }
}
