//! Dead-agent failover: a silent agent takes a build and dies (no
//! heartbeat, no result); a second agent gets the requeued attempt.

use std::sync::Arc;

use crate::noop::{self, wait_done, wait_received, Marks};
use crate::setup::Bench;
use crate::stats::{ms, pct, sorted};
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
