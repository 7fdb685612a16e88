//! Throughput, then latency with free agents: the default scenario.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::load::{self, Waited};
use crate::noop::Marks;
use crate::setup::Bench;
use crate::stats::{pct, rss_kib, sorted, usage};
use crate::{Error, Opts};

/// The latency phase's figures.
struct Latency {
    dispatch: Vec<f64>,
    complete: Vec<f64>,
    builds: usize,
    how: String,
}

/// Phase 1: `opts.builds` builds from `opts.concurrency` submitters as fast
/// as the API takes them (agents saturated: builds queue). Phase 2 (no-op
/// agents only): builds while agents are free, from waiting submitters or
/// arriving at `--rate`. Prints a table and one JSON line.
pub(crate) async fn run(b: &mut Bench, o: &Opts) -> Result<(), Error> {
    let marks = Arc::new(Marks::default());
    let agents = b.agents(o, &marks).await?;
    let agent_rss = agents.first().map(|a| rss_kib(a.pid().as_raw().unsigned_abs()));
    let pid = b.server_pid();
    let (cpu0, _) = usage(pid);

    let t0 = Instant::now();
    let sent = load::submit(b, o.builds, o.concurrency, None).await;
    let submit_secs = t0.elapsed().as_secs_f64();
    let saturated = if o.shell {
        load::wait_all_shell(b, o.builds).await?
    } else {
        load::wait_noop(&marks, &sent, o.builds, t0).await?
    };
    let (cpu1, peak_kib) = usage(pid);
    let (qd, qc) = (sorted(saturated.dispatch), sorted(saturated.complete));

    // Fewer submitters than agents, so a free agent is always there: the
    // dispatch path alone. Or, with `--rate`, builds on their own schedule.
    let latency = match (o.shell, o.rate) {
        (true, _) => None,
        (false, Some(rate)) => {
            let n = o.builds.min((rate * 5.0) as usize).max(1);
            let sent = load::arrivals(b, n, rate).await;
            let w = load::wait_noop(&marks, &sent, n, Instant::now()).await?;
            Some(latency(w, n, format!("arriving at {rate} /s")))
        }
        (false, None) => {
            let n = o.builds.min(2000);
            let conc = o.submitters();
            let pause = Duration::from_millis(o.pause_ms);
            let sent = load::submit(b, n, conc, Some((marks.clone(), pause))).await;
            let w = load::wait_noop(&marks, &sent, n, Instant::now()).await?;
            let how = match o.pause_ms {
                0 => format!("{conc} waiting submitters"),
                p => format!("{conc} waiting submitters, {p} ms apart"),
            };
            Some(latency(w, n, how))
        }
    };

    let counts = counts(b).await?;
    let list_first = list_latency(b, "limit=50").await?;
    let list_deep = list_latency(b, &format!("limit=50&before={}", o.builds / 2 + 1)).await?;
    let total_builds = o.builds + latency.as_ref().map_or(0, |l| l.builds);
    drop(agents);
    let db_bytes = b.stop();

    let throughput = o.builds as f64 / saturated.span;
    let span = saturated.span;
    let sqlite_kib_per_1000 = db_bytes as f64 / 1024.0 / total_builds as f64 * 1000.0;
    let mode = o.mode();
    println!(
        "agents {} ({mode}), builds {}, submit concurrency {}",
        o.agents, o.builds, o.concurrency
    );
    println!("  throughput             {throughput:>9.0} builds/s  ({span:.2} s; submitting took {submit_secs:.2} s)");
    println!(
        "  saturated: submit -> agent has it  p50 {:>8.2} ms  p99 {:>8.2} ms  (mostly waiting in the queue)",
        pct(&qd, 0.5),
        pct(&qd, 0.99)
    );
    println!(
        "  saturated: submit -> complete      p50 {:>8.2} ms  p99 {:>8.2} ms",
        pct(&qc, 0.5),
        pct(&qc, 0.99)
    );
    if let Some(l) = &latency {
        let (d, c) = (&l.dispatch, &l.complete);
        println!("  free agents ({} builds, {}):", l.builds, l.how);
        println!("    dispatch latency  p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms  (submit sent -> the agent has the build)", pct(d, 0.5), pct(d, 0.99), d.last().copied().unwrap_or(f64::NAN));
        println!(
            "    submit -> complete p50 {:>6.2} ms  p99 {:>6.2} ms  (to the result acknowledged)",
            pct(c, 0.5),
            pct(c, 0.99)
        );
    }
    println!(
        "  server CPU             {:>9.2} s  peak RSS {:.1} MiB",
        cpu1 - cpu0,
        peak_kib as f64 / 1024.0
    );
    if let Some(kib) = agent_rss {
        println!("  agent RSS (idle)       {:>9.1} MiB", kib as f64 / 1024.0);
    }
    println!("  SQLite                 {sqlite_kib_per_1000:>9.1} KiB per 1,000 builds");
    println!("  GET /api/builds        p50 {list_first:.2} ms (newest page), {list_deep:.2} ms (keyset page in the middle)");
    println!("  builds                 {counts}");
    let lat = latency.as_ref().map(|l| {
        serde_json::json!({
            "builds": l.builds, "submitters": o.rate.is_none().then(|| o.submitters()),
            "rate_per_s": o.rate, "pause_ms": o.pause_ms,
            "dispatch_ms": {"p50": pct(&l.dispatch, 0.5), "p99": pct(&l.dispatch, 0.99), "max": l.dispatch.last()},
            "complete_ms": {"p50": pct(&l.complete, 0.5), "p99": pct(&l.complete, 0.99)},
        })
    });
    let json = serde_json::json!({
        "mode": mode, "agents": o.agents, "builds": o.builds, "concurrency": o.concurrency,
        "throughput_per_s": throughput, "elapsed_s": span,
        "saturated": {"dispatch_ms": {"p50": pct(&qd, 0.5), "p99": pct(&qd, 0.99)}, "complete_ms": {"p50": pct(&qc, 0.5), "p99": pct(&qc, 0.99)}},
        "free_agents": lat,
        "server_cpu_s": cpu1 - cpu0, "server_peak_rss_mib": peak_kib as f64 / 1024.0,
        "agent_idle_rss_mib": agent_rss.map(|k| k as f64 / 1024.0),
        "sqlite_kib_per_1000": sqlite_kib_per_1000,
        "list_p50_ms": {"newest": list_first, "deep": list_deep},
        "counts": counts,
    });
    println!("{json}");
    Ok(())
}

fn latency(w: Waited, builds: usize, how: String) -> Latency {
    Latency {
        dispatch: sorted(w.dispatch),
        complete: sorted(w.complete),
        builds,
        how,
    }
}

/// Builds per status, from `/metrics`.
async fn counts(b: &Bench) -> Result<serde_json::Value, Error> {
    let text = b
        .http
        .get(format!("{}/metrics", b.base))
        .send()
        .await?
        .text()
        .await?;
    let get = |s: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("ci_builds{{status=\"{s}\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(
        serde_json::json!({"success": get("success"), "failed": get("failed"), "queued": get("queued"), "running": get("running")}),
    )
}

/// p50 of 50 list requests, in ms.
async fn list_latency(b: &Bench, query: &str) -> Result<f64, Error> {
    let mut v = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let r = b
            .http
            .get(format!("{}/api/builds?{query}", b.base))
            .send()
            .await?;
        r.bytes().await?;
        v.push(crate::stats::ms(t.elapsed()));
    }
    Ok(pct(&sorted(v), 0.5))
}
