//! Agents that connect out: one WebSocket per agent (`GET /agent/connect`),
//! carrying the agent protocol both ways as [`Frame`]s.
//!
//! An agent behind NAT, on a laptop or in an autoscaling group opens the
//! connection; the server never has to reach it. Every request keeps its
//! HTTP meaning (the same handlers answer it, with the same statuses), so
//! fencing by attempt and session secret is exactly the HTTP protocol's.
//! What the connection adds is knowing at once when an agent is gone:
//! when it closes, the builds of the agent registered over it are
//! requeued now, not after their leases. A silent agent whose connection
//! stays open (stopped, or a partition that drops packets) still loses
//! its lease after the missed heartbeats.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use ci_core::protocol::{
    connected_url, ErrorBody, Frame, NotifyAgent, NotifyAgentAlive, NotifyAgentLeave, NotifyBuildHandback,
    NotifyBuildLog, NotifyBuildResult, CONNECTED_SCHEME,
};
use ci_core::{AgentId, AgentLink, Dispatch, DispatchFailure, StopOrder};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::api::{agents, App};
use crate::link::{classify, HttpLink};

/// Messages waiting to be written to one connection; a full queue is a
/// connection that does not read, which is closed.
const OUTBOX: usize = 256;

/// The connections of the agents registered over them, by agent id.
#[derive(Debug, Default)]
pub(crate) struct Hub {
    conns: Mutex<HashMap<AgentId, Arc<Conn>>>,
    /// Connections registering, by the URL they register: the scheduler
    /// may dispatch to the new agent before its id is bound here.
    registering: Mutex<HashMap<String, Arc<Conn>>>,
    /// Connections open, registered or not.
    open: AtomicU64,
}

/// One agent's connection.
#[derive(Debug)]
pub(crate) struct Conn {
    out: mpsc::Sender<Message>,
    /// The server's requests waiting for their answer, by id.
    pending: Mutex<HashMap<u64, oneshot::Sender<(u16, Value)>>>,
    next: AtomicU64,
    /// The agent registered over it, if any.
    agent: Mutex<Option<AgentId>>,
    /// Closes it (the agent's credentials were revoked, the server stops).
    close: Notify,
    /// How it proved itself.
    auth: Auth,
    /// The agent's own credential: the one it connected with, or the one
    /// issued to it over this connection.
    credential: Mutex<Option<i64>>,
    /// What the agent says it is.
    version: Mutex<Option<String>>,
    /// Where it comes from.
    pub(crate) remote: Option<SocketAddr>,
}

/// How a connection proved itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Auth {
    /// With the shared agent token (or none, on a server without one): a
    /// registration issues the agent its own credential.
    Shared,
    /// With the agent's own credential (its id and the agent's name).
    Own(i64, String),
}

/// The SHA-256 of a token: what the store keeps of it.
fn digest(token: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).to_vec()
}

/// Passes a connection that presents the shared agent token or an agent's
/// own credential, not revoked; a server without an agent token lets any
/// connection in as [`Auth::Shared`] (but a revoked credential stays out).
///
/// N.B.: the shared token is compared in constant time; an agent's token
/// is found by its SHA-256, whose value a guess cannot steer.
fn connect_auth(app: &App) -> impl Filter<Extract = (Auth,), Error = Rejection> + Clone {
    let app = app.clone();
    warp::header::optional::<String>("authorization").and_then(move |header: Option<String>| {
        let app = app.clone();
        async move {
            let refuse = |m: &str| warp::reject::custom(crate::ApiError::new(StatusCode::UNAUTHORIZED, m));
            let shared = app.config.agent_token.as_deref();
            if shared.is_some_and(|t| ci_core::auth::bearer_matches(header.as_deref(), t)) {
                return Ok(Auth::Shared);
            }
            let presented = header
                .as_deref()
                .and_then(|h| h.strip_prefix("Bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty());
            if let Some(token) = presented {
                match app.store.credential(&digest(token)).await {
                    Ok(Some(c)) if c.revoked_at.is_none() => return Ok(Auth::Own(c.id, c.name)),
                    Ok(Some(c)) => {
                        tracing::warn!(credential = c.id, agent = %c.name, "a revoked agent tried to connect");
                        return Err(refuse(
                            "this agent's credential was revoked: remove its WORK_DIR/credential to register \
                             again with AGENT_TOKEN, if it should",
                        ));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(warp::reject::custom(crate::ApiError::from(e))),
                }
            }
            match shared {
                None => Ok(Auth::Shared),
                Some(_) => Err(refuse(
                    "missing or wrong AGENT_TOKEN or agent credential (Authorization: Bearer ...)",
                )),
            }
        }
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Hub {
    /// The connection agent `id` registered over, if it is open.
    pub(crate) fn get(&self, id: AgentId) -> Option<Arc<Conn>> {
        lock(&self.conns).get(&id).cloned()
    }

    /// The connection of agent `id`, or of the agent registering at `url`.
    fn find(&self, id: AgentId, url: &str) -> Option<Arc<Conn>> {
        self.get(id).or_else(|| lock(&self.registering).get(url).cloned())
    }

    /// How many connections are open.
    pub(crate) fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// What agent `id`'s connection says of it: where it comes from, its
    /// version and its credential; `None` if it has no connection.
    pub(crate) fn describe(&self, id: AgentId) -> Option<(Option<SocketAddr>, Option<String>, Option<i64>)> {
        let conn = self.get(id)?;
        let version = lock(&conn.version).clone();
        let credential = *lock(&conn.credential);
        Some((conn.remote, version, credential))
    }

    /// Closes agent `id`'s connection, if it has one.
    pub(crate) fn close(&self, id: AgentId) {
        if let Some(conn) = self.get(id) {
            conn.close.notify_one();
        }
    }

    /// Closes every connection (the server stops).
    pub(crate) fn close_all(&self) {
        for conn in lock(&self.conns).values() {
            conn.close.notify_one();
        }
    }

    fn bind(&self, id: AgentId, conn: &Arc<Conn>) {
        let before = lock(&conn.agent).replace(id);
        let mut conns = lock(&self.conns);
        if let Some(old) = before.filter(|old| *old != id) {
            conns.remove(&old);
        }
        conns.insert(id, conn.clone());
    }

    /// Forgets `conn` as agent `id`'s; false if another connection is
    /// that agent's now.
    fn unbind(&self, id: AgentId, conn: &Arc<Conn>) -> bool {
        let mut conns = lock(&self.conns);
        match conns.get(&id) {
            Some(c) if Arc::ptr_eq(c, conn) => {
                conns.remove(&id);
                true
            }
            _ => false,
        }
    }
}

impl Conn {
    /// Sends a request and waits up to `timeout` for its answer.
    pub(crate) async fn request(
        &self,
        path: &str,
        body: Value,
        timeout: Duration,
    ) -> Result<(u16, Value), String> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let frame = Frame::Request {
            id,
            path: path.to_owned(),
            session: None,
            body,
            quiet: false,
        };
        let sent = match serde_json::to_string(&frame) {
            Ok(text) => self.out.try_send(Message::text(text)).is_ok(),
            Err(_) => false,
        };
        if !sent {
            lock(&self.pending).remove(&id);
            return Err("the agent's connection is closed or does not read".into());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err("the agent's connection closed".into()),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(format!("no answer from the agent in {timeout:?}"))
            }
        }
    }
}

/// What one connection reads into at a time. N.B.: tungstenite's default,
/// 128 KiB, is allocated and touched per connection: 1.25 GiB for 10,000
/// agents. Messages larger than this still arrive, in several reads.
const READ_BUFFER: usize = 4 * 1024;

/// `GET /agent/connect`: the agent token, then a WebSocket.
pub(crate) fn route(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("agent" / "connect")
        .and(warp::get())
        .and(connect_auth(&app))
        .and(crate::api::with_app(app))
        .and(crate::listen::remote())
        .and(warp::header::optional::<String>("upgrade"))
        .and(warp::header::optional::<String>("sec-websocket-version"))
        .and(warp::header::optional::<String>("sec-websocket-key"))
        .and(warp::ext::optional::<crate::listen::Upgrade>())
        .map(
            |auth: Auth,
             app: App,
             remote: Option<SocketAddr>,
             upgrade: Option<String>,
             version: Option<String>,
             key: Option<String>,
             pending: Option<crate::listen::Upgrade>| {
                let websocket = upgrade.is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
                let (true, Some("13"), Some(key)) = (websocket, version.as_deref(), key) else {
                    return crate::ApiError::bad_request(
                        "a WebSocket upgrade is required (Upgrade: websocket, Sec-WebSocket-Version: 13)",
                    )
                    .into_response();
                };
                let on_upgrade = pending.and_then(|p| lock(&p.0).take());
                let Some(on_upgrade) = on_upgrade else {
                    return crate::ApiError::bad_request("this connection cannot be upgraded")
                        .into_response();
                };
                let limit = usize::try_from(crate::MAX_RESULT_BODY).unwrap_or(usize::MAX) + 64 * 1024;
                let config = WebSocketConfig::default()
                    .read_buffer_size(READ_BUFFER)
                    .write_buffer_size(0)
                    .max_message_size(Some(limit))
                    .max_frame_size(Some(limit));
                tokio::spawn(async move {
                    match on_upgrade.await {
                        Ok(upgraded) => {
                            let io = TokioIo::new(upgraded);
                            let socket =
                                WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                            serve(app, auth, remote, socket).await;
                        }
                        Err(e) => tracing::debug!(?remote, cause = %e, "agent connection upgrade failed"),
                    }
                });
                let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                let reply = warp::http::Response::builder()
                    .status(StatusCode::SWITCHING_PROTOCOLS)
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket")
                    .header("sec-websocket-accept", accept)
                    .body(warp::hyper::body::Bytes::new());
                match reply {
                    Ok(r) => r.map(Into::into),
                    Err(e) => {
                        crate::ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                    }
                }
            },
        )
}

/// Serves one connection until it closes, then requeues what its agent
/// held (unless the server is stopping: the next server process takes the
/// agents' results, as with HTTP).
async fn serve<S>(app: App, auth: Auth, remote: Option<SocketAddr>, socket: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut socket = socket;
    let (out, mut outbox) = mpsc::channel::<Message>(OUTBOX);
    let conn = Arc::new(Conn {
        out,
        pending: Mutex::default(),
        next: AtomicU64::new(1),
        agent: Mutex::default(),
        close: Notify::new(),
        credential: Mutex::new(match &auth {
            Auth::Own(id, _) => Some(*id),
            Auth::Shared => None,
        }),
        auth,
        version: Mutex::default(),
        remote,
    });
    app.hub.open.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(?remote, "agent connected");
    // N.B.: an agent speaks at least once a heartbeat. One silent for two
    // leases was dropped by its first lease: its host died without a FIN,
    // or a partition holds it. Closing lets the socket go; an agent that
    // is still there finds the connection gone and connects again.
    let silence = app.config.lease.ttl() * 2;
    let mut watch = tokio::time::interval(silence / 2);
    let mut heard = tokio::time::Instant::now();
    // N.B.: one task reads and writes. A heartbeat (one a second from
    // every agent) is answered right here: handing it to another task and
    // its answer to a writer task cost more than handling it.
    loop {
        let message = tokio::select! {
            // N.B.: in this order, so a message waiting is read before
            // silence is judged (after a stall of the server's own).
            biased;
            () = conn.close.notified() => break,
            Some(m) = outbox.recv() => {
                if socket.send(m).await.is_err() {
                    break;
                }
                continue;
            }
            m = socket.next() => m,
            _ = watch.tick() => {
                if heard.elapsed() < silence {
                    continue;
                }
                let agent = *lock(&conn.agent);
                tracing::info!(?agent, ?remote, ?silence, "agent connection silent; closing it");
                break;
            }
        };
        heard = tokio::time::Instant::now();
        let message = match message {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::debug!(?remote, cause = %e, "agent connection failed");
                break;
            }
            None => break,
        };
        let text = match &message {
            Message::Text(text) => text.as_str(),
            Message::Close(_) => break,
            // Pings (answered by tungstenite), pongs and binary messages
            // mean nothing here.
            _ => continue,
        };
        match serde_json::from_str::<Frame>(text) {
            Ok(Frame::Request {
                id,
                path,
                session,
                body,
                quiet,
            }) if path == "/notify_agent_alive" => {
                let Some(frame) = answer(&app, &conn, id, &path, session, body, quiet).await else {
                    continue;
                };
                if socket.send(frame).await.is_err() {
                    break;
                }
            }
            Ok(Frame::Request {
                id,
                path,
                session,
                body,
                quiet,
            }) => {
                let (app, conn) = (app.clone(), conn.clone());
                tokio::spawn(async move {
                    let Some(frame) = answer(&app, &conn, id, &path, session, body, quiet).await else {
                        return;
                    };
                    if conn.out.try_send(frame).is_err() {
                        // It does not read: let it go.
                        conn.close.notify_one();
                    }
                });
            }
            Ok(Frame::Response { id, status, body }) => {
                if let Some(waiting) = lock(&conn.pending).remove(&id) {
                    let _ = waiting.send((status, body));
                }
            }
            Err(e) => {
                tracing::warn!(?remote, cause = %e, "agent sent a message that is not a frame; closing");
                break;
            }
        }
    }
    let _ = socket.close(None).await;
    app.hub.open.fetch_sub(1, Ordering::Relaxed);
    // Waiting requests fail at once (their senders go).
    lock(&conn.pending).clear();
    let agent = *lock(&conn.agent);
    let Some(id) = agent else {
        return;
    };
    if !app.hub.unbind(id, &conn) {
        return; // It registered again over another connection.
    }
    if app.draining.load(Ordering::SeqCst) {
        return;
    }
    tracing::info!(agent = %id, ?remote, "agent disconnected; requeueing what it held");
    if let Err(e) = app.dispatcher.agent_disconnected(id).await {
        tracing::warn!(agent = %id, cause = %e, "could not drop a disconnected agent; its leases will lapse");
    }
}

/// Handles request `id` as the agent bound to `conn`, if any; its
/// response, if it gets one.
async fn answer(
    app: &App,
    conn: &Arc<Conn>,
    id: u64,
    path: &str,
    session: Option<String>,
    body: Value,
    quiet: bool,
) -> Option<Message> {
    let bound = *lock(&conn.agent);
    let handled = agents::BOUND.scope(bound, handle(app, conn, path, session, body));
    answer_frame(id, handled.await, quiet)
}

/// The response to request `id`, as its HTTP answer would be; none to
/// a `quiet` one that succeeded.
fn answer_frame(id: u64, handled: crate::api::Result<Value>, quiet: bool) -> Option<Message> {
    let (status, body) = match handled {
        Ok(_) if quiet => return None,
        Ok(v) => (StatusCode::OK, v),
        Err(e) => (e.status(), error_body(e.message())),
    };
    let frame = Frame::Response {
        id,
        status: status.as_u16(),
        body,
    };
    Some(Message::text(serde_json::to_string(&frame).unwrap_or_default()))
}

fn error_body(message: &str) -> Value {
    serde_json::to_value(ErrorBody {
        error: message.to_owned(),
    })
    .unwrap_or(Value::Null)
}

/// Answers one of the agent's requests as its HTTP route would.
async fn handle(
    app: &App,
    conn: &Arc<Conn>,
    path: &str,
    session: Option<String>,
    body: Value,
) -> crate::api::Result<Value> {
    fn parse<T: serde::de::DeserializeOwned>(body: Value) -> crate::api::Result<T> {
        serde_json::from_value(body).map_err(|e| crate::ApiError::bad_request(format!("invalid body: {e}")))
    }
    match path {
        "/notify_agent" => {
            let body: NotifyAgent = parse(body)?;
            let name = match &body.name {
                Some(n) if NotifyAgent::check_name(n) => n.clone(),
                Some(n) => {
                    return Err(crate::ApiError::bad_request(format!(
                        "invalid name {n:?}: letters, digits, '.', '_', '-' and '+', at most {}",
                        NotifyAgent::MAX_NAME
                    )))
                }
                None => {
                    return Err(crate::ApiError::bad_request(
                        "an agent that connects must give its name",
                    ))
                }
            };
            if let Auth::Own(id, owner) = &conn.auth {
                if *owner != name {
                    return Err(crate::ApiError::new(
                        StatusCode::FORBIDDEN,
                        format!("credential {id} was issued to agent {owner:?}, not {name:?}"),
                    ));
                }
            }
            let version = body.version.clone().filter(|v| NotifyAgent::check_name(v));
            let url = connected_url(&name);
            lock(&app.hub.registering).insert(url.clone(), conn.clone());
            let enrolled = agents::enroll(app, url.clone(), session, body).await;
            if let Ok(r) = &enrolled {
                app.hub.bind(r.id, conn);
            }
            lock(&app.hub.registering).remove(&url);
            let mut reply = enrolled?;
            // An agent that proved itself with the shared token gets its
            // own credential, once per connection.
            let issue = lock(&conn.credential).is_none();
            reply.token = match issue {
                true => {
                    let token = ci_core::auth::random_secret().map_err(|e| {
                        crate::ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("no randomness: {e}"))
                    })?;
                    let now = ci_core::Clock::now(&ci_core::SystemClock::new());
                    let c = app.store.issue_credential(&name, &digest(&token), now).await?;
                    *lock(&conn.credential) = Some(c.id);
                    tracing::info!(credential = c.id, %name, "issued an agent its own credential");
                    Some(token)
                }
                false => None,
            };

            *lock(&conn.version) = version;
            tracing::info!(agent = %reply.id, %name, remote = ?conn.remote, "agent registered over its connection");
            Ok(serde_json::to_value(reply).unwrap_or(Value::Null))
        }
        "/notify_agent_alive" => {
            let body: NotifyAgentAlive = parse(body)?;
            let claimed = body.agent_id;
            let answer = agents::alive(app.clone(), session.clone(), body).await?;
            // An agent the server still knows, on a new connection (the
            // server restarted, or the network came back in time), says
            // who it is: the connection is its own from now on.
            let bound = *lock(&conn.agent);
            if let (Some(id), Some(secret)) = (claimed, session.as_deref()) {
                if bound != Some(id) {
                    let sender = agents::sender(app, Some(secret), Some(id)).await?;
                    if sender.verified && sender.agent == Some(id) {
                        app.hub.bind(id, conn);
                        tracing::info!(agent = %id, remote = ?conn.remote, "agent connected again");
                    }
                }
            }
            Ok(answer)
        }
        "/notify_build_result" => {
            agents::result(app.clone(), session, parse::<NotifyBuildResult>(body)?).await
        }
        "/notify_build_log" => agents::log(app.clone(), session, parse::<NotifyBuildLog>(body)?).await,
        "/notify_build_handback" => {
            agents::handback(app.clone(), session, parse::<NotifyBuildHandback>(body)?).await
        }
        "/notify_agent_leave" => agents::leave(app.clone(), session, parse::<NotifyAgentLeave>(body)?).await,
        other => Err(crate::ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no such request: {other:?}"),
        )),
    }
}

/// An [`AgentLink`] that reaches agents that connected over their
/// connection, and the others over HTTP.
#[derive(Debug)]
pub(crate) struct Links {
    http: HttpLink,
    hub: Arc<Hub>,
    timeout: Duration,
}

impl Links {
    pub(crate) fn new(http: HttpLink, hub: Arc<Hub>, timeout: Duration) -> Links {
        Links { http, hub, timeout }
    }

    /// N.B.: an agent with no connection is one the server knows from
    /// before a restart that has not connected again yet (one whose
    /// connection closed is dropped at once): busy, so it is kept a while
    /// and its builds are not lost; if it never comes back, its silence
    /// drops it.
    fn conn(&self, agent: AgentId, url: &str) -> Result<Arc<Conn>, DispatchFailure> {
        self.hub
            .find(agent, url)
            .ok_or_else(|| DispatchFailure::Busy(format!("agent {agent} is not connected (yet)")))
    }
}

/// What an agent's answer over its connection means, as its HTTP answer
/// would.
fn outcome(answer: Result<(u16, Value), String>) -> Result<Value, DispatchFailure> {
    let (status, body) = answer.map_err(DispatchFailure::Unreachable)?;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    if status.is_success() {
        return Ok(body);
    }
    let reason = match serde_json::from_value::<ErrorBody>(body) {
        Ok(b) => format!("{status}: {}", b.error),
        Err(_) => status.to_string(),
    };
    Err(classify(status, reason))
}

#[async_trait]
impl AgentLink for Links {
    async fn dispatch(&self, d: &Dispatch) -> Result<(), DispatchFailure> {
        if !d.agent_url.starts_with(CONNECTED_SCHEME) {
            return self.http.dispatch(d).await;
        }
        let conn = self.conn(d.agent, &d.agent_url)?;
        let body = self.http.request_body(d).await?;
        let body = serde_json::to_value(&body)
            .map_err(|e| DispatchFailure::Rejected(format!("cannot encode the build: {e}")))?;
        outcome(conn.request("/build", body, self.timeout).await).map(drop)
    }

    async fn stop(&self, order: &StopOrder) -> Result<(), DispatchFailure> {
        if !order.agent_url.starts_with(CONNECTED_SCHEME) {
            return self.http.stop(order).await;
        }
        let Some(body) = order.request() else {
            return Ok(());
        };
        let conn = self.conn(order.agent, &order.agent_url)?;
        let body = serde_json::to_value(&body)
            .map_err(|e| DispatchFailure::Rejected(format!("cannot encode the cancel: {e}")))?;
        // The agent answers once the work is dead, which may take a while.
        outcome(conn.request("/cancel", body, Duration::from_secs(35)).await).map(drop)
    }
}
