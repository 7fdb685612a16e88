//! One build at a time: submit, then wait until it has finished.

use std::time::Duration;

use tokio::time::Instant;

use crate::setup::Bench;
use crate::stats::{ms, pct, sorted, usage};
use crate::{Error, Opts};

/// Runs `opts.lone` builds one after the other (after one that fills the
/// repository cache) and prints submit-to-finished percentiles.
pub(crate) async fn run(b: &Bench, o: &Opts) -> Result<(), Error> {
    let mut v = Vec::new();
    for i in 0..=o.lone {
        let t = Instant::now();
        let id = crate::load::submit_one(&b.http, &b.base, &b.sha)
            .await
            .ok_or(Error::Setup("the server did not take a build".into()))?;
        // Polled every millisecond: the figure is the server's, not a
        // notification's.
        loop {
            let build: serde_json::Value = b.get(&format!("/api/builds/{id}")).await?;
            if matches!(build["status"].as_str(), Some("success" | "failed" | "canceled")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if i > 0 {
            v.push(ms(t.elapsed()));
        }
    }
    let v = sorted(v);
    let (_, peak) = usage(b.server_pid());
    let mode = o.mode();
    println!(
        "lone builds ({mode}, {} agent(s)): submit -> finished p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms (n={})",
        o.agents,
        pct(&v, 0.5),
        pct(&v, 0.9),
        v.last().copied().unwrap_or(f64::NAN),
        v.len()
    );
    println!(
        "{}",
        serde_json::json!({"mode": mode, "lone": v.len(), "p50_ms": pct(&v, 0.5), "p90_ms": pct(&v, 0.9), "server_peak_rss_mib": peak as f64 / 1024.0})
    );
    Ok(())
}
