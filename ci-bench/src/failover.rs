//! Dead-agent failover: a silent agent takes a build and dies (no
//! heartbeat, no result); a second agent gets the requeued attempt.

use std::sync::Arc;

use crate::noop::{self, wait_done, wait_received, Marks};
use crate::setup::Bench;
use crate::stats::{ms, pct, sorted, spread};
use crate::Error;

/// The server's heartbeat interval in this scenario, ms.
pub(crate) const HEARTBEAT_MS: u64 = 100;
/// Heartbeats missed before a lease lapses in this scenario.
pub(crate) const MISSED_HEARTBEATS: u32 = 3;
const INTERVAL_MS: f64 = HEARTBEAT_MS as f64;
const MISSED: f64 = MISSED_HEARTBEATS as f64;

/// Measures, 20 times, from the last sign of life to the requeued build
/// arriving at another agent.
pub(crate) async fn run(b: &Bench) -> Result<(), Error> {
    let marks = Arc::new(Marks::default());
    let mut detection = Vec::new();
    let mut after_expiry = Vec::new();
    for _ in 0..20 {
        // A fresh silent agent is the only one when the build arrives...
        let silent = Arc::new(Marks::default());
        noop::start(&b.base, silent.clone(), true).await?;
        let id = crate::load::submit_one(&b.http, &b.base, &b.sha)
            .await
            .ok_or(Error::Setup("the server did not take a build".into()))?;
        let last_sign = wait_received(&silent, id).await?;
        // ...then a healthy one joins and waits for the requeued attempt.
        let healthy = noop::start(&b.base, marks.clone(), false).await?;
        let rescued = wait_received(&marks, id).await?;
        let d = ms(rescued.duration_since(last_sign));
        detection.push(d);
        after_expiry.push(d - MISSED * INTERVAL_MS);
        // N.B.: it leaves only once its result is in. Leaving first would
        // requeue the build, and the next silent agent would get it in
        // place of its own.
        wait_done(&marks, id).await?;
        b.http
            .post(format!("{}/notify_agent_leave", b.base))
            .json(&serde_json::json!({ "agentId": healthy }))
            .send()
            .await?;
    }
    let (d, a) = (sorted(detection), sorted(after_expiry));
    println!(
        "dead-agent failover (heartbeat {INTERVAL_MS} ms, {MISSED} missed: lease {} ms; bound (missed+1) x interval = {} ms)",
        MISSED * INTERVAL_MS,
        (MISSED + 1.0) * INTERVAL_MS
    );
    println!(
        "  last sign of life -> requeued build at another agent: p50 {:.1} ms, max {:.1} ms",
        pct(&d, 0.5),
        d.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  lease expiry -> requeued build at another agent:      p50 {:.1} ms, max {:.1} ms",
        pct(&a, 0.5),
        a.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "{}",
        serde_json::json!({"failover_ms": {"p50": pct(&d, 0.5), "max": d.last()}, "after_expiry_ms": {"p50": pct(&a, 0.5), "max": a.last()}, "lease_ms": MISSED * INTERVAL_MS})
    );
    Ok(())
}

/// Measures, `rounds` times, SIGKILL to a real `ci-agent` that connects
/// out, mid-build, to its build running again on another one. The lease
/// is the shipped default (5 s): what moves the build is the connection
/// closing.
pub(crate) async fn killed(b: &Bench, rounds: usize) -> Result<(), Error> {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    use tokio::time::{Duration, Instant};

    let h = b.clone_handle();
    let pid_file = b.dir().join("pid");
    let command = format!(
        "echo $$ > {}; if [ \"$CI_BUILD_ATTEMPT\" = 1 ]; then exec sleep 60; fi",
        pid_file.display()
    );
    let mut moved = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let _ = std::fs::remove_file(&pid_file);
        let mut victim = b.spawn_agent(&format!("victim-{round}"), "connect")?;
        b.wait_agents(1).await?;
        let id = b.submit(&command).await?;
        let pgid = wait_for("the first attempt to run", Duration::from_secs(30), || {
            let pid = std::fs::read_to_string(&pid_file).ok();
            std::future::ready(pid.and_then(|p| p.trim().parse::<i32>().ok()))
        })
        .await?;
        let mut rescuer = b.spawn_agent(&format!("rescuer-{round}"), "connect")?;
        b.wait_agents(2).await?;

        let killed = Instant::now();
        victim.kill();
        let deadline = killed + Duration::from_secs(30);
        loop {
            let v: serde_json::Value = h.get(&format!("/api/builds/{id}")).await?;
            if v["attempt"].as_u64() == Some(2) {
                moved.push(ms(killed.elapsed()));
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!("build {id} did not move in 30 s")));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        wait_for(
            "the second attempt to finish",
            Duration::from_secs(30),
            || async {
                let v: serde_json::Value = h.get(&format!("/api/builds/{id}")).await.ok()?;
                (v["status"] == "success").then_some(())
            },
        )
        .await?;
        rescuer.signal(Signal::SIGTERM);
        rescuer.wait();
        wait_for("the rescuer to leave", Duration::from_secs(30), || async {
            let agents: Vec<serde_json::Value> = h.get("/api/agents").await.ok()?;
            agents.is_empty().then_some(())
        })
        .await?;
    }
    let v = sorted(moved);
    println!(
        "killed agent (connected, lease 5 s): SIGKILL mid-build -> the build running again on another agent"
    );
    println!("  {}  ({} kills; Buildbot 4.3: 1.3 s)", spread(&v), v.len());
    println!(
        "{}",
        serde_json::json!({"mode": "kill", "moved_ms": {"p50": pct(&v, 0.5), "p99": pct(&v, 0.99), "max": v.last()}})
    );
    Ok(())
}

/// Polls `check` every millisecond until it gives a value, for at most
/// `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: tokio::time::Duration, mut check: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Timeout(format!("waited {limit:?} for {what}")));
        }
        tokio::time::sleep(tokio::time::Duration::from_millis(1)).await;
    }
}
