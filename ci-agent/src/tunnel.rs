//! The agent's connection to its server: one WebSocket
//! ([`CONNECT_PATH`]) carrying the agent protocol both ways as [`Frame`]s.
//!
//! [`Tunnel`] is what the [`ServerClient`](crate::client::ServerClient)
//! sends its calls over when the agent connects out: each call is a
//! request frame answered by one response frame, with the status and body
//! its HTTP answer would have. While no connection is open, calls fail as
//! an unreachable server's do, and are retried as those are.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ci_core::protocol::{Frame, CONNECT_PATH};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Messages waiting to be written.
const OUTBOX: usize = 256;

/// The open connection, if any. See the [module docs](self).
#[derive(Debug, Default)]
pub struct Tunnel {
    current: Mutex<Option<Arc<Line>>>,
    /// The server's refusal of a quiet request over the current
    /// connection, not yet taken.
    refused: Mutex<Option<(u16, Value)>>,
    /// Calls go over it (the agent connects out), rather than over HTTP.
    in_use: std::sync::atomic::AtomicBool,
}

/// One open connection.
#[derive(Debug)]
pub struct Line {
    out: mpsc::Sender<Message>,
    pending: Mutex<HashMap<u64, oneshot::Sender<(u16, Value)>>>,
    /// The latest quiet requests' ids: their answers, if any, are
    /// refusals.
    quiet: Mutex<VecDeque<u64>>,
    next: AtomicU64,
}

/// How many quiet requests' ids a connection remembers.
const QUIET: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a call over the connection got no answer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unanswered(pub String);

impl Tunnel {
    /// From now on, calls go over the connection (when one is open).
    pub fn use_it(&self) {
        self.in_use.store(true, Ordering::SeqCst);
    }

    /// True once the agent connects out: its calls go over the connection.
    pub fn in_use(&self) -> bool {
        self.in_use.load(Ordering::SeqCst)
    }

    /// Sends a request for `path` and waits up to `timeout` for its answer.
    pub async fn request(
        &self,
        path: &str,
        session: Option<String>,
        body: Value,
        timeout: Duration,
    ) -> Result<(u16, Value), Unanswered> {
        let line = lock(&self.current).clone();
        let Some(line) = line else {
            return Err(Unanswered("not connected to the server".into()));
        };
        let id = line.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&line.pending).insert(id, tx);
        let frame = Frame::Request {
            id,
            path: path.to_owned(),
            session,
            body,
            quiet: false,
        };
        let text = serde_json::to_string(&frame).map_err(|e| Unanswered(e.to_string()))?;
        if line.out.send(Message::text(text)).await.is_err() {
            lock(&line.pending).remove(&id);
            return Err(Unanswered("the connection to the server closed".into()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(Unanswered("the connection to the server closed".into())),
            Err(_) => {
                lock(&line.pending).remove(&id);
                Err(Unanswered(format!("no answer from the server in {timeout:?}")))
            }
        }
    }

    /// Sends a quiet request for `path`: one the server answers only if
    /// it refuses it, which [`Tunnel::take_refusal`] then gives.
    pub async fn notify(&self, path: &str, session: Option<String>, body: Value) -> Result<(), Unanswered> {
        let line = lock(&self.current).clone();
        let Some(line) = line else {
            return Err(Unanswered("not connected to the server".into()));
        };
        let id = line.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut quiet = lock(&line.quiet);
            if quiet.len() == QUIET {
                quiet.pop_front();
            }
            quiet.push_back(id);
        }
        let frame = Frame::Request {
            id,
            path: path.to_owned(),
            session,
            body,
            quiet: true,
        };
        let text = serde_json::to_string(&frame).map_err(|e| Unanswered(e.to_string()))?;
        if line.out.send(Message::text(text)).await.is_err() {
            return Err(Unanswered("the connection to the server closed".into()));
        }
        Ok(())
    }

    /// The server's refusal (status and body) of a quiet request sent
    /// over the current connection, once.
    pub fn take_refusal(&self) -> Option<(u16, Value)> {
        lock(&self.refused).take()
    }

    fn attach(&self, line: Arc<Line>) {
        // N.B.: a refusal over the last connection says nothing of this one.
        lock(&self.refused).take();
        *lock(&self.current) = Some(line);
    }

    fn detach(&self, line: &Arc<Line>) {
        let mut current = lock(&self.current);
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, line)) {
            *current = None;
        }
        // Calls waiting on it fail now, not at their time limit.
        lock(&line.pending).clear();
    }
}

/// A request the server sent: `/build` or `/cancel`.
#[derive(Debug)]
pub struct Incoming {
    /// The HTTP path it stands for.
    pub path: String,
    /// Its JSON body.
    pub body: Value,
    id: u64,
    line: Arc<Line>,
}

impl Incoming {
    /// Answers it with what its HTTP answer would be.
    pub async fn answer(self, status: u16, body: Value) {
        let frame = Frame::Response {
            id: self.id,
            status,
            body,
        };
        if let Ok(text) = serde_json::to_string(&frame) {
            let _ = self.line.out.send(Message::text(text)).await;
        }
    }
}

/// Why the connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server refused the agent's token (401).
    #[error("the server refused this agent's token ({0}): check AGENT_TOKEN on both sides")]
    Refused(u16),
    /// Anything else: no server, a proxy in the way, not a WebSocket.
    #[error("{0}")]
    Failed(String),
}

/// The WebSocket URL of the server at `base` (`http://host:port`).
pub fn connect_url(base: &str) -> Result<String, String> {
    match base.split_once("://") {
        Some((s, rest)) if s.eq_ignore_ascii_case("http") => Ok(format!("ws://{rest}{CONNECT_PATH}")),
        Some((s, _)) if s.eq_ignore_ascii_case("https") => {
            Err("https servers are not supported yet (no TLS in this build)".into())
        }
        _ => Err(format!("{base:?} is not an http:// URL")),
    }
}

/// Opens a connection to `url` presenting `token`, from `source` if set.
pub async fn open(
    url: &str,
    token: Option<&str>,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<WebSocketStream<MaybeTlsStream<TcpStream>>, ConnectError> {
    let mut request = url
        .into_client_request()
        .map_err(|e| ConnectError::Failed(e.to_string()))?;
    if let Some(t) = token {
        let value = HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|_| ConnectError::Failed("the agent token is not a valid header value".into()))?;
        request.headers_mut().insert("authorization", value);
    }
    let limit =
        usize::try_from(ci_core::protocol::limits::MAX_DISPATCH_BODY).unwrap_or(usize::MAX) + 64 * 1024;
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let connecting = async {
        let Some(ip) = source else {
            return tokio_tungstenite::connect_async_with_config(request, Some(config), true)
                .await
                .map(|(ws, _)| ws);
        };
        let host = request
            .uri()
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_owned();
        let port = request.uri().port_u16().unwrap_or(80);
        let stream = connect_from(ip, &host, port).await?;
        tokio_tungstenite::client_async_with_config(request, MaybeTlsStream::Plain(stream), Some(config))
            .await
            .map(|(ws, _)| ws)
    };
    match tokio::time::timeout(timeout, connecting).await {
        Err(_) => Err(ConnectError::Failed(format!("no answer in {timeout:?}"))),
        Ok(Ok(ws)) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) if resp.status().as_u16() == 401 => {
            Err(ConnectError::Refused(401))
        }
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => Err(ConnectError::Failed(format!(
            "the server answered {} instead of opening a connection",
            resp.status()
        ))),
        Ok(Err(e)) => Err(ConnectError::Failed(ci_core::error::chain(&e))),
    }
}

/// A TCP connection to `host:port` from address `source`: to the first of
/// the host's addresses of `source`'s family.
async fn connect_from(
    source: IpAddr,
    host: &str,
    port: u16,
) -> Result<TcpStream, tokio_tungstenite::tungstenite::Error> {
    let no_address = || {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{host} has no address of the same family as AGENT_BIND {source}"),
        )
    };
    let to = tokio::net::lookup_host((host, port))
        .await?
        .find(|a| a.is_ipv4() == source.is_ipv4())
        .ok_or_else(no_address)?;
    let socket = match source {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(to).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Carries `ws` for `tunnel` until it closes: responses go to the calls
/// waiting for them, requests to `incoming`. Calls `opened` once calls
/// can go over it.
pub async fn carry(
    tunnel: &Tunnel,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    incoming: mpsc::Sender<Incoming>,
    opened: impl FnOnce(),
) {
    let (mut sink, mut stream) = ws.split();
    let (out, mut outbox) = mpsc::channel::<Message>(OUTBOX);
    let line = Arc::new(Line {
        out,
        pending: Mutex::default(),
        quiet: Mutex::default(),
        next: AtomicU64::new(1),
    });
    tunnel.attach(line.clone());
    opened();
    let writer = async move {
        while let Some(m) = outbox.recv().await {
            if sink.send(m).await.is_err() {
                return;
            }
        }
    };
    let reader = async {
        while let Some(Ok(message)) = stream.next().await {
            if message.is_close() {
                return;
            }
            let Ok(text) = message.to_text() else {
                continue;
            };
            match serde_json::from_str::<Frame>(text) {
                Ok(Frame::Response { id, status, body }) => {
                    let waiting = lock(&line.pending).remove(&id);
                    if let Some(waiting) = waiting {
                        let _ = waiting.send((status, body));
                        continue;
                    }
                    let mut quiet = lock(&line.quiet);
                    if let Some(i) = quiet.iter().position(|q| *q == id) {
                        quiet.remove(i);
                        // N.B.: a server that does not know quiet requests
                        // answers their successes too.
                        if !(200..300).contains(&status) {
                            *lock(&tunnel.refused) = Some((status, body));
                        }
                    }
                }
                Ok(Frame::Request { id, path, body, .. }) => {
                    let request = Incoming {
                        path,
                        body,
                        id,
                        line: line.clone(),
                    };
                    if incoming.send(request).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(cause = %e, "the server sent a message that is not a frame; reconnecting");
                    return;
                }
            }
        }
    };
    tokio::select! {
        () = writer => {}
        () = reader => {}
    }
    tunnel.detach(&line);
}
