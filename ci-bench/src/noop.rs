//! In-process agents speaking the real protocol: each takes every build
//! and reports success at once, so the figures are the server's own cost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ci_core::protocol::{BuildRequest, NotifyAgentReply, NotifyBuildResult};
use tokio::time::Instant;
use warp::Filter;

use crate::Error;

/// When the no-op agents received and finished each build (by the
/// build's id) and each step (by the step's id, which is what agents are
/// sent).
#[derive(Debug, Default)]
pub(crate) struct Marks {
    received: Mutex<HashMap<i64, Instant>>,
    done: Mutex<HashMap<i64, Instant>>,
    steps_received: Mutex<HashMap<i64, Instant>>,
    steps_reported: Mutex<HashMap<i64, Instant>>,
    steps_done: Mutex<HashMap<i64, Instant>>,
    /// Woken on every completion.
    pub(crate) finished: tokio::sync::Notify,
}

impl Marks {
    pub(crate) fn received(&self) -> MutexGuard<'_, HashMap<i64, Instant>> {
        self.received.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn done(&self) -> MutexGuard<'_, HashMap<i64, Instant>> {
        self.done.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn steps_received(&self) -> MutexGuard<'_, HashMap<i64, Instant>> {
        self.steps_received.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// When each step's result was sent.
    pub(crate) fn steps_reported(&self) -> MutexGuard<'_, HashMap<i64, Instant>> {
        self.steps_reported.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn steps_done(&self) -> MutexGuard<'_, HashMap<i64, Instant>> {
        self.steps_done.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Starts an agent that takes every build and reports success at once
/// (or, `silent`, never). Returns its agent id.
pub(crate) async fn start(server: &str, marks: Arc<Marks>, silent: bool) -> Result<i64, Error> {
    let http = reqwest::Client::new();
    let id = Arc::new(AtomicI64::new(0));
    let (server_url, agent_id, client) = (server.to_owned(), id.clone(), http.clone());
    let route = warp::path!("build")
        .and(warp::body::json())
        .map(move |req: BuildRequest| {
            let now = Instant::now();
            // N.B.: a server of the original design sends the build as `id`.
            let build = req.build.map_or(req.id.0, |b| b.0);
            // N.B.: marks go by the step's id, as the API shows it; the wire
            // id names the attempt.
            let step = req.step_id.map_or(req.id.0, |s| s.0);
            marks.received().insert(build, now);
            marks.steps_received().insert(step, now);
            if !silent {
                let (marks, client, url) = (marks.clone(), client.clone(), server_url.clone());
                let agent = agent_id.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let result = NotifyBuildResult {
                        id: req.id,
                        status: 0,
                        stdout: String::new(),
                        stderr: String::new(),
                        attempt: req.attempt,
                        agent_id: Some(ci_core::AgentId(agent)),
                    };
                    marks.steps_reported().insert(step, Instant::now());
                    let sent = client
                        .post(format!("{url}/notify_build_result"))
                        .json(&result)
                        .send()
                        .await;
                    if sent.is_ok_and(|r| r.status().is_success()) {
                        let now = Instant::now();
                        marks.done().insert(build, now);
                        marks.steps_done().insert(step, now);
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
        .error_for_status()?
        .json()
        .await?;
    id.store(reply.id.0, Ordering::SeqCst);
    Ok(reply.id.0)
}

/// Waits until an agent recording into `marks` has received build `id`.
pub(crate) async fn wait_received(marks: &Marks, id: i64) -> Result<Instant, Error> {
    wait_mark(
        || marks.received().get(&id).copied(),
        &format!("build {id} never arrived"),
    )
    .await
}

/// Waits until the server has acknowledged the result of build `id` from
/// an agent recording into `marks`.
pub(crate) async fn wait_done(marks: &Marks, id: i64) -> Result<Instant, Error> {
    wait_mark(
        || marks.done().get(&id).copied(),
        &format!("build {id} never finished"),
    )
    .await
}

async fn wait_mark(mark: impl Fn() -> Option<Instant>, timeout: &str) -> Result<Instant, Error> {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(t) = mark() {
            return Ok(t);
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    Err(Error::Timeout(timeout.to_owned()))
}
