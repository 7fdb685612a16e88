//! Submitting builds, closed loop or as Poisson arrivals, and waiting for
//! them to finish.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::noop::Marks;
use crate::setup::Bench;
use crate::stats::ms;
use crate::Error;

/// When each build was sent, by build id.
pub(crate) type Sent = HashMap<i64, Instant>;

/// Latencies (ms) from submit to the agent holding the build and to the
/// result acknowledged, and the span (s) to the last completion.
pub(crate) struct Waited {
    pub(crate) dispatch: Vec<f64>,
    pub(crate) complete: Vec<f64>,
    pub(crate) span: f64,
}

/// Submits one build; returns its id.
pub(crate) async fn submit_one(http: &reqwest::Client, base: &str, sha: &str) -> Option<i64> {
    let r = http
        .post(format!("{base}/api/builds"))
        .json(&serde_json::json!({"hash": sha}))
        .send()
        .await
        .ok()?;
    if r.status().as_u16() != 201 {
        return None;
    }
    r.json::<serde_json::Value>().await.ok()?["id"].as_i64()
}

/// Submits `n` builds arriving at `rate` per second on average, each after
/// an exponentially distributed gap (a Poisson process), each from its own
/// task: an arrival never waits for an earlier one (open loop).
pub(crate) async fn arrivals(b: &Bench, n: usize, rate: f64) -> Sent {
    let sent: Arc<Mutex<Sent>> = Arc::default();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut at = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        at += Duration::from_secs_f64(-(1.0 - rng.f64()).ln() / rate);
        tokio::time::sleep_until(at).await;
        let (http, base, sha, sent) = (b.http.clone(), b.base.clone(), b.sha.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            if let Some(id) = submit_one(&http, &base, &sha).await {
                sent.lock().unwrap_or_else(PoisonError::into_inner).insert(id, t);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let out = sent.lock().unwrap_or_else(PoisonError::into_inner).clone();
    out
}

/// Submits `n` builds from `conc` concurrent submitters. With `wait`, each
/// submitter waits for its build to complete, then for the pause, before
/// the next.
pub(crate) async fn submit(b: &Bench, n: usize, conc: usize, wait: Option<(Arc<Marks>, Duration)>) -> Sent {
    let sent: Arc<Mutex<Sent>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc.min(n) {
        let (http, base, sha) = (b.http.clone(), b.base.clone(), b.sha.clone());
        let (sent, next, wait) = (sent.clone(), next.clone(), wait.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::SeqCst) < n {
                let t = Instant::now();
                let Some(id) = submit_one(&http, &base, &sha).await else {
                    continue;
                };
                sent.lock().unwrap_or_else(PoisonError::into_inner).insert(id, t);
                if let Some((marks, pause)) = &wait {
                    loop {
                        let finished = marks.finished.notified();
                        if marks.done().contains_key(&id) {
                            break;
                        }
                        let _ = tokio::time::timeout(Duration::from_millis(50), finished).await;
                    }
                    if !pause.is_zero() {
                        tokio::time::sleep(*pause).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let out = sent.lock().unwrap_or_else(PoisonError::into_inner).clone();
    out
}

/// Waits until every build in `sent` is done at a no-op agent; the span
/// runs from `t0`.
pub(crate) async fn wait_noop(marks: &Marks, sent: &Sent, n: usize, t0: Instant) -> Result<Waited, Error> {
    loop {
        let finished = {
            let done = marks.done();
            sent.keys().filter(|id| done.contains_key(id)).count()
        };
        if finished >= n.min(sent.len()) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(900) {
            return Err(Error::Timeout("builds did not finish within 15 minutes".into()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let recv = marks.received().clone();
    let done = marks.done().clone();
    let dispatch = sent
        .iter()
        .filter_map(|(id, t)| recv.get(id).map(|r| ms(r.duration_since(*t))))
        .collect();
    let complete = sent
        .iter()
        .filter_map(|(id, t)| done.get(id).map(|d| ms(d.duration_since(*t))))
        .collect();
    let last = sent
        .keys()
        .filter_map(|id| done.get(id))
        .max()
        .copied()
        .unwrap_or(t0);
    Ok(Waited {
        dispatch,
        complete,
        span: last.duration_since(t0).as_secs_f64(),
    })
}

/// Shell mode: polls the API until every build has finished; latencies
/// from the server's own timestamps (millisecond resolution).
pub(crate) async fn wait_all_shell(b: &Bench, n: usize) -> Result<Waited, Error> {
    let t0 = Instant::now();
    loop {
        let mut all = Vec::new();
        let mut before: Option<i64> = None;
        loop {
            let q = before.map(|b| format!("&before={b}")).unwrap_or_default();
            let page: ci_core::protocol::BuildList = b.get(&format!("/api/builds?limit=500{q}")).await?;
            let len = page.builds.len();
            before = page.builds.last().map(|b| b.id.0);
            all.extend(page.builds);
            if len < 500 {
                break;
            }
        }
        if all.len() >= n && all.iter().all(|b| b.status.is_finished()) {
            // Server timestamps, milliseconds since the epoch.
            let epoch_ms = |s: &str| -> Option<f64> {
                let t = humantime::parse_rfc3339(s).ok()?;
                Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64() * 1000.0)
            };
            let (mut dispatch, mut complete) = (Vec::new(), Vec::new());
            let (mut first, mut last) = (f64::MAX, f64::MIN);
            for b in &all {
                let started = b.started_at.as_deref().and_then(epoch_ms);
                let finished = b.finished_at.as_deref().and_then(epoch_ms);
                if let (Some(c), Some(s), Some(f)) = (epoch_ms(&b.created_at), started, finished) {
                    dispatch.push(s - c);
                    complete.push(f - c);
                    first = first.min(c);
                    last = last.max(f);
                }
            }
            let span = ((last - first) / 1000.0).max(0.001);
            return Ok(Waited {
                dispatch,
                complete,
                span,
            });
        }
        if t0.elapsed() > Duration::from_secs(600) {
            return Err(Error::Timeout("builds did not finish within 10 minutes".into()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
