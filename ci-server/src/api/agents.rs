//! The agent protocol: registration, heartbeats and pings, results, live
//! output, hand-backs and leaves. Heartbeats and live output go through
//! the fence, never waiting for the coordinator's task.

use std::net::SocketAddr;

use ci_core::coordinator::{Accepted, HandBack, Heartbeat, Report, Sender};
use ci_core::protocol::{
    NotifyAgent, NotifyAgentAlive, NotifyAgentLeave, NotifyAgentReply, NotifyBuildHandback, NotifyBuildLog,
    NotifyBuildResult,
};
use ci_core::{AgentId, Attempt, Completion, DispatchId, Enrollment, LogPiece, StepId};
use serde_json::Value;
use warp::http::StatusCode;
use warp::reply::{json, Response};
use warp::{Filter, Rejection, Reply};

use super::{bearer, json_body, respond, with_app, ApiError, App, Result, MAX_BODY, MAX_RESULT_BODY};

/// The agent protocol's routes.
pub(super) fn routes(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    notify_agent(app.clone())
        .or(notify(app.clone(), "notify_agent_alive", MAX_BODY, alive))
        .unify()
        .or(notify(
            app.clone(),
            "notify_build_result",
            MAX_RESULT_BODY,
            result,
        ))
        .unify()
        .or(notify(app.clone(), "notify_build_log", MAX_RESULT_BODY, log))
        .unify()
        .or(notify(app.clone(), "notify_build_handback", MAX_BODY, handback))
        .unify()
        .or(notify(app, "notify_agent_leave", MAX_BODY, leave))
        .unify()
}

pub(crate) fn agent_auth(app: &App) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    bearer(app.config.agent_token.clone(), "AGENT_TOKEN")
}

fn session_secret() -> impl Filter<Extract = (Option<String>,), Error = Rejection> + Copy {
    warp::header::optional::<String>(ci_core::auth::SESSION_HEADER)
}

/// `POST /{name}` with a JSON body of up to `limit` bytes, from an agent
/// (token checked), answered by `handle`.
fn notify<B, F, Fut>(
    app: App,
    name: &'static str,
    limit: u64,
    handle: F,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone
where
    B: serde::de::DeserializeOwned + Send + 'static,
    F: Fn(App, Option<String>, B) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<serde_json::Value>> + Send,
{
    warp::path(name)
        .and(warp::path::end())
        .and(warp::post())
        .and(agent_auth(&app))
        .and(with_app(app))
        .and(session_secret())
        .and(json_body::<B>(limit))
        .and_then(move |app: App, secret: Option<String>, body: B| {
            let handle = handle.clone();
            async move {
                let answer = handle(app, secret, body).await;
                Ok::<_, Rejection>(respond(answer.map(|v| json(&v))))
            }
        })
}

fn notify_agent(app: App) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("notify_agent")
        .and(warp::post())
        .and(agent_auth(&app))
        .and(with_app(app))
        .and(crate::listen::remote())
        .and(session_secret())
        .and(json_body(MAX_BODY))
        .and_then(
            |app: App, remote: Option<SocketAddr>, proof: Option<String>, body: NotifyAgent| async move {
                Ok::<_, Rejection>(respond(register(&app, remote, proof, body).await))
            },
        )
}

pub(crate) async fn sender(app: &App, secret: Option<&str>, claimed: Option<AgentId>) -> Result<Sender> {
    if let Some(bound) = BOUND.try_with(|b| *b).ok().flatten() {
        // N.B.: a request over the connection of the agent registered over
        // it is that agent's, proven by the connection: no secret to look
        // up (which compares against every agent's). A request claiming
        // another agent (a result of a registration before this
        // connection) proves itself with its secret, as over HTTP.
        if claimed.is_none_or(|c| c == bound) {
            return Ok(Sender {
                agent: Some(bound),
                verified: true,
            });
        }
    }
    Ok(app.dispatcher.fence().sender(secret, claimed).await?)
}

tokio::task_local! {
    /// The agent whose connection the request being handled came over.
    pub(crate) static BOUND: Option<AgentId>;
}

/// The step and attempt a message's `id` names ([`DispatchId`]); an
/// `attempt` it also carries must be the same.
fn named(id: DispatchId, attempt: Option<Attempt>) -> Result<(StepId, Attempt)> {
    let (step, named) = id.parts();
    if step.0 <= 0 || named.0 == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no dispatch has id {id}"),
        ));
    }
    match attempt {
        Some(a) if a != named => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("id {id} names attempt {named} of step {step}, not attempt {a}"),
        )),
        _ => Ok((step, named)),
    }
}

pub(crate) async fn alive(app: App, secret: Option<String>, body: NotifyAgentAlive) -> Result<Value> {
    let sender = sender(&app, secret.as_deref(), body.agent_id).await?;
    let named = body.id.map(|id| named(id, body.attempt)).transpose()?;
    let hb = Heartbeat {
        step: named.map(|(step, _)| step),
        attempt: named.map(|(_, attempt)| attempt).or(body.attempt),
        agent: sender.agent,
        verified: sender.verified,
    };
    app.dispatcher.heartbeat(hb).await?;
    Ok(serde_json::json!({"ok": true}))
}

pub(crate) async fn result(app: App, secret: Option<String>, body: NotifyBuildResult) -> Result<Value> {
    let sender = sender(&app, secret.as_deref(), body.agent_id).await?;
    let (step, attempt) = named(body.id, body.attempt)?;
    let report = Report {
        step,
        attempt: Some(attempt),
        agent: sender.agent,
        verified: sender.verified,
        completion: Completion {
            exit_code: body.status,
            stdout: body.stdout,
            stderr: body.stderr,
        },
    };
    let reply = match app.dispatcher.complete(report).await? {
        Accepted::Finished(b) => serde_json::json!({"stored": true, "status": b.status}),
        Accepted::Duplicate(b) => serde_json::json!({"stored": true, "duplicate": true, "status": b.status}),
    };
    Ok(reply)
}

pub(crate) async fn log(app: App, secret: Option<String>, body: NotifyBuildLog) -> Result<Value> {
    let sender = sender(&app, secret.as_deref(), body.agent_id).await?;
    let (step, attempt) = named(body.id, body.attempt)?;
    let hb = Heartbeat {
        step: Some(step),
        attempt: Some(attempt),
        agent: sender.agent,
        verified: sender.verified,
    };
    let pieces: Vec<LogPiece> = body
        .pieces
        .into_iter()
        .map(|p| LogPiece {
            seq: p.seq,
            stream: p.stream,
            data: p.data,
        })
        .collect();
    let stored = app.dispatcher.output(hb, &pieces).await?;
    Ok(serde_json::json!({ "stored": stored }))
}

pub(crate) async fn handback(app: App, secret: Option<String>, body: NotifyBuildHandback) -> Result<Value> {
    let sender = sender(&app, secret.as_deref(), body.agent_id).await?;
    let reason: String = body.reason.chars().take(4096).collect();
    tracing::warn!(build = %body.id, attempt = %body.attempt, agent = ?sender.agent, %reason, "attempt handed back");
    let (step, attempt) = named(body.id, Some(body.attempt))?;
    let back = HandBack {
        step,
        attempt,
        agent: sender.agent,
        verified: sender.verified,
        reason,
    };
    app.dispatcher.hand_back(back).await?;
    Ok(serde_json::json!({ "ok": true }))
}

pub(crate) async fn leave(app: App, secret: Option<String>, body: NotifyAgentLeave) -> Result<Value> {
    let sender = sender(&app, secret.as_deref(), Some(body.agent_id)).await?;
    app.dispatcher.agent_left(body.agent_id, sender.verified).await?;
    tracing::info!(agent = %body.agent_id, "agent left");
    Ok(serde_json::json!({ "ok": true }))
}

async fn register(
    app: &App,
    remote: Option<SocketAddr>,
    proof: Option<String>,
    body: NotifyAgent,
) -> Result<impl Reply> {
    if body.port == 0 {
        return Err(ApiError::bad_request(
            "invalid body: port is required (1-65535), as a number or a string",
        ));
    }
    let url = agent_url(body.host.as_deref(), body.port, remote)?;
    Ok(json(&enroll(app, url, proof, body).await?))
}

/// Registers the agent `body` describes, reached at `url`.
pub(crate) async fn enroll(
    app: &App,
    url: String,
    proof: Option<String>,
    body: NotifyAgent,
) -> Result<NotifyAgentReply> {
    let capacity = body.capacity.unwrap_or(1);
    if !(1..=NotifyAgent::MAX_CAPACITY).contains(&capacity) {
        return Err(ApiError::bad_request(format!(
            "capacity must be 1 to {}",
            NotifyAgent::MAX_CAPACITY
        )));
    }
    let secret = match body.session {
        true => Some(
            ci_core::auth::random_secret()
                .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("no randomness: {e}")))?,
        ),
        false => None,
    };
    let enrollment = Enrollment {
        url: url.clone(),
        secret: secret.clone(),
        capacity,
        labels: body.labels.unwrap_or_default(),
        pings: body.pings,
    };
    let reg = app.dispatcher.register(enrollment, proof).await?;
    tracing::info!(agent = %reg.id, %url, session = body.session, capacity, "agent registered");
    Ok(NotifyAgentReply {
        id: reg.id,
        timeout: reg.heartbeat_ms,
        secret,
        extensions: true,
        token: None,
    })
}

/// The base URL of an agent from what it announced: `host` with or without
/// a scheme and a port (the `port` field wins). Without a usable host, the
/// request's source address is used. Mirrors `HOST_PATTERN` in the OpenAPI
/// document exactly.
pub(crate) fn agent_url(host: Option<&str>, port: u16, remote: Option<SocketAddr>) -> Result<String> {
    let bad = |why: &str| ApiError::bad_request(format!("invalid host {host:?}: {why}"));
    let h = host.unwrap_or("");
    let (scheme, rest) = match h.split_once("://") {
        Some((s, rest)) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => {
            (s.to_ascii_lowercase(), rest)
        }
        Some(_) => return Err(bad("scheme must be http or https")),
        None => ("http".to_owned(), h),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    // Drop a `:port` suffix (after `]` for IPv6, or the only colon).
    let name = match rest.rsplit_once(':') {
        Some((n, p))
            if !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u16>().is_ok()
                && (!n.contains(':') || (n.starts_with('[') && n.ends_with(']'))) =>
        {
            n
        }
        _ => rest,
    };
    let ipv6 = name.strip_prefix('[').and_then(|n| n.strip_suffix(']'));
    let name = match ipv6 {
        Some(inner) => {
            let ip: std::net::Ipv6Addr = inner.parse().map_err(|_| bad("not an IPv6 address"))?;
            (!ip.is_unspecified()).then(|| format!("[{ip}]"))
        }
        None => {
            let hostname = name.len() <= 253
                && !name.starts_with('-')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if !hostname {
                return Err(bad("not a host name or IP address"));
            }
            (!name.is_empty() && name != "0.0.0.0").then(|| name.to_owned())
        }
    };
    let name = match (name, remote) {
        (Some(n), _) => n,
        (None, Some(SocketAddr::V4(a))) => a.ip().to_string(),
        (None, Some(SocketAddr::V6(a))) => format!("[{}]", a.ip()),
        (None, None) => return Err(bad("no host given and no source address")),
    };
    Ok(format!("{scheme}://{name}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_urls_from_what_agents_announce() {
        let remote: Option<SocketAddr> = Some("127.0.0.7:5555".parse().unwrap());
        let url = |h: Option<&str>, p| agent_url(h, p, remote);
        assert_eq!(
            url(Some("http://agent-01"), 3001).unwrap(),
            "http://agent-01:3001"
        );
        assert_eq!(url(Some("agent-01"), 3001).unwrap(), "http://agent-01:3001");
        assert_eq!(
            url(Some("http://agent-01:3001/"), 3001).unwrap(),
            "http://agent-01:3001"
        );
        assert_eq!(url(Some("HTTPS://a.b"), 1).unwrap(), "https://a.b:1");
        assert_eq!(url(Some("[::1]"), 1).unwrap(), "http://[::1]:1");
        assert_eq!(url(None, 3001).unwrap(), "http://127.0.0.7:3001");
        assert_eq!(url(Some("0.0.0.0"), 3001).unwrap(), "http://127.0.0.7:3001");
        assert_eq!(url(Some(""), 3001).unwrap(), "http://127.0.0.7:3001");
        assert_eq!(url(Some(":80"), 3001).unwrap(), "http://127.0.0.7:3001");
        assert_eq!(url(Some("[::1]:80"), 3001).unwrap(), "http://[::1]:3001");
        assert_eq!(url(Some("[::]"), 3001).unwrap(), "http://127.0.0.7:3001");
        for bad in [
            "ftp://x",
            "a b",
            "x/y",
            "-x",
            "user@host",
            "http://a/b/c",
            " a",
            "::1",
            "[::g]",
            "a:",
            "\u{8b}",
        ] {
            assert!(url(Some(bad), 1).is_err(), "{bad}");
        }
    }
}
