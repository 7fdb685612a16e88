//! The agent's side of the protocol: calls to the server, and what their
//! failures mean (retried with [`ci_core::retry::retry`]).

use std::time::Duration;

use ci_core::protocol::{
    ErrorBody, NotifyAgent, NotifyAgentAlive, NotifyAgentLeave, NotifyAgentReply, NotifyBuildHandback,
    NotifyBuildLog, NotifyBuildResult,
};
use reqwest::StatusCode;
use serde::Serialize;

/// How a call to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No answer: connection refused, reset, or timed out. Retry later.
    #[error("server unreachable: {}", ci_core::error::chain(.0))]
    Unreachable(#[source] reqwest::Error),
    /// No connection to the server is open, or it closed before the answer
    /// came. Retry later.
    #[error("server unreachable: {0}")]
    Disconnected(String),
    /// The server answered 5xx (or 401, which an operator can fix). Retry later.
    #[error("server error {status}: {message}")]
    Server {
        /// HTTP status.
        status: StatusCode,
        /// Its message.
        message: String,
    },
    /// The server refused the request for good (4xx).
    #[error("refused with {status}: {message}")]
    Refused {
        /// HTTP status.
        status: StatusCode,
        /// Its message.
        message: String,
    },
}

impl ci_core::retry::Transient for CallError {
    fn is_transient(&self) -> bool {
        self.is_retryable()
    }
}

impl CallError {
    /// True if the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, CallError::Refused { .. })
    }

    /// The status of a refusal.
    pub fn refused_status(&self) -> Option<StatusCode> {
        match self {
            CallError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one server.
#[derive(Debug, Clone)]
pub struct ServerClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    secret: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    timeout: Duration,
    /// Set when the agent connects out: every call goes over it.
    tunnel: Option<std::sync::Arc<crate::tunnel::Tunnel>>,
}

impl ServerClient {
    /// A client of the server at `base` (e.g. `http://127.0.0.1:3000`),
    /// whose calls give up after `timeout`, sending from `source` if set.
    pub fn new(
        base: impl Into<String>,
        timeout: Duration,
        source: Option<std::net::IpAddr>,
    ) -> Result<ServerClient, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .local_address(source)
            .build()?;
        Ok(ServerClient {
            http,
            base: base.into().trim_end_matches('/').to_owned(),
            token: None,
            secret: Default::default(),
            timeout,
            tunnel: None,
        })
    }

    /// Presents `token` (the agent token) on every call.
    pub fn with_token(mut self, token: Option<String>) -> ServerClient {
        self.token = token;
        self
    }

    /// Sends every call over `tunnel`, the agent's connection, once it is
    /// in use ([`Tunnel::use_it`](crate::tunnel::Tunnel::use_it)).
    pub fn over(mut self, tunnel: std::sync::Arc<crate::tunnel::Tunnel>) -> ServerClient {
        self.tunnel = Some(tunnel);
        self
    }

    /// Presents this session secret from now on (`None` forgets it).
    pub fn set_secret(&self, secret: Option<String>) {
        *self
            .secret
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = secret;
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Posts `body` and returns the answer's body, if it is a success.
    /// N.B.: any 2xx is a success, whatever its body: the original server
    /// answers `200 text/plain` `OK`.
    async fn post<B: Serialize>(
        &self,
        path: &str,
        body: &B,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, CallError> {
        let secret = self
            .secret
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(tunnel) = self.tunnel.as_ref().filter(|t| t.in_use()) {
            let body = serde_json::to_value(body).map_err(|e| CallError::Disconnected(e.to_string()))?;
            let (status, answer) = tunnel
                .request(path, secret, body, timeout.unwrap_or(self.timeout))
                .await
                .map_err(|e| CallError::Disconnected(e.0))?;
            return answered(status, answer);
        }
        let mut req = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(s) = secret {
            req = req.header(ci_core::auth::SESSION_HEADER, s);
        }
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = req.send().await.map_err(CallError::Unreachable)?;
        let status = resp.status();
        if status.is_success() {
            return resp
                .bytes()
                .await
                .map(|b| b.to_vec())
                .map_err(CallError::Unreachable);
        }
        let message = match resp.json::<ErrorBody>().await {
            Ok(b) => b.error,
            Err(_) => String::new(),
        };
        Err(classify(status, message))
    }

    /// `POST /notify_agent`. A 409 (a live session of this agent's URL
    /// that we could not prove is ours, say after a restart that lost it)
    /// is worth retrying: the server lets the URL go once that session
    /// lapses.
    pub async fn register(&self, body: &NotifyAgent) -> Result<NotifyAgentReply, CallError> {
        match self.post("/notify_agent", body, None).await {
            Err(CallError::Refused { status, message }) if status == StatusCode::CONFLICT => {
                Err(CallError::Server { status, message })
            }
            Err(e) => Err(e),
            Ok(text) => parse(&text),
        }
    }

    /// `POST /notify_agent_alive`, giving up after `timeout` so that a lost
    /// heartbeat does not delay the next one.
    pub async fn alive(&self, body: &NotifyAgentAlive, timeout: Duration) -> Result<(), CallError> {
        self.post("/notify_agent_alive", body, Some(timeout))
            .await
            .map(drop)
    }

    /// An idle agent's ping (`POST /notify_agent_alive`). Over the agent's
    /// connection it goes quiet (answered only if refused) and returns at
    /// once: what it fails with is the refusal of an earlier ping, if one
    /// came. Over HTTP it is [`ServerClient::alive`].
    pub async fn ping(&self, body: &NotifyAgentAlive, timeout: Duration) -> Result<(), CallError> {
        let Some(tunnel) = self.tunnel.as_ref().filter(|t| t.in_use()) else {
            return self.alive(body, timeout).await;
        };
        if let Some((status, answer)) = tunnel.take_refusal() {
            return answered(status, answer).map(drop);
        }
        let secret = self
            .secret
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let body = serde_json::to_value(body).map_err(|e| CallError::Disconnected(e.to_string()))?;
        tunnel
            .notify("/notify_agent_alive", secret, body)
            .await
            .map_err(|e| CallError::Disconnected(e.0))
    }

    /// `POST /notify_build_log` (extension).
    pub async fn log(&self, body: &NotifyBuildLog) -> Result<(), CallError> {
        self.post("/notify_build_log", body, Some(Duration::from_secs(5)))
            .await
            .map(drop)
    }

    /// `POST /notify_build_handback` (extension).
    pub async fn handback(&self, body: &NotifyBuildHandback) -> Result<(), CallError> {
        self.post("/notify_build_handback", body, None).await.map(drop)
    }

    /// `POST /notify_agent_leave` (extension).
    pub async fn leave(&self, body: &NotifyAgentLeave) -> Result<(), CallError> {
        self.post("/notify_agent_leave", body, Some(Duration::from_secs(2)))
            .await
            .map(drop)
    }

    /// `POST /notify_build_result`.
    pub async fn result(&self, body: &NotifyBuildResult) -> Result<(), CallError> {
        self.post("/notify_build_result", body, None).await.map(drop)
    }
}

/// What a failed call's status means: 5xx, 401 (which an operator can
/// fix) and 429 are worth retrying; other refusals are for good.
fn classify(status: StatusCode, message: String) -> CallError {
    if status.is_server_error()
        || status == StatusCode::UNAUTHORIZED
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        CallError::Server { status, message }
    } else {
        CallError::Refused { status, message }
    }
}

/// A JSON answer, or why it is not one (a server that is not ours, or not
/// well): retried, as an unreachable server is.
fn parse<R: serde::de::DeserializeOwned>(body: &[u8]) -> Result<R, CallError> {
    serde_json::from_slice(body).map_err(|e| CallError::Server {
        status: StatusCode::OK,
        message: format!(
            "an answer that is not what the protocol says ({e}): {:?}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ),
    })
}

/// What an answer over the agent's connection means, as its HTTP answer
/// would.
fn answered(status: u16, answer: serde_json::Value) -> Result<Vec<u8>, CallError> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    if status.is_success() {
        return serde_json::to_vec(&answer).map_err(|e| CallError::Disconnected(e.to_string()));
    }
    let message = serde_json::from_value::<ErrorBody>(answer)
        .map(|b| b.error)
        .unwrap_or_default();
    Err(classify(status, message))
}
