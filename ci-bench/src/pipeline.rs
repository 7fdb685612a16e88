//! Pipelines of no-op steps: how fast each next step of a linear pipeline
//! is dispatched, and how much a wide pipeline spends on scheduling.
//!
//! - `--pipeline linear`: five steps, each after the one before.
//!   *Next-step dispatch* runs from the agent sending its result for step
//!   k to the agent holding step k+1: the server's whole cost of moving a
//!   pipeline along (taking the result, settling the graph, dispatching). *First step* runs from the submit request
//!   being sent to the agent holding step 1 (it includes reading the
//!   pipeline file, once per commit).
//! - `--pipeline fan`: 100 parallel steps, then one after all of them.
//!   With no-op steps every millisecond from submit to the last step's
//!   result is the system's own: that is the *scheduling overhead*.

use std::sync::Arc;

use tokio::time::Instant;

use crate::noop::Marks;
use crate::setup::{Bench, Handle};
use crate::stats::{ms, pct, sorted, usage};
use crate::{Error, Opts};

/// Which pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// Five steps in a row.
    Linear,
    /// 100 steps at once, then one.
    Fan,
}

impl Shape {
    fn file(self) -> String {
        match self {
            Shape::Linear => {
                let mut f = String::from("version: 1\nsteps:\n");
                for i in 1..=5 {
                    f.push_str(&format!("  - name: s{i}\n    commands: [\"true\"]\n"));
                }
                f
            }
            Shape::Fan => {
                let mut f = String::from("version: 1\nsteps:\n");
                for i in 1..=100 {
                    f.push_str(&format!(
                        "  - name: p{i}\n    depends_on: []\n    commands: [\"true\"]\n"
                    ));
                }
                let all: Vec<String> = (1..=100).map(|i| format!("p{i}")).collect();
                f.push_str(&format!(
                    "  - name: final\n    depends_on: [{}]\n    commands: [\"true\"]\n",
                    all.join(", ")
                ));
                f
            }
        }
    }

    fn default_count(self) -> usize {
        match self {
            Shape::Linear => 500,
            Shape::Fan => 30,
        }
    }
}

/// A pipeline that ran: its id, when it was sent, its steps' ids in order.
type Ran = (i64, Instant, Vec<i64>);

/// A pipeline as the API shows it: its id and its steps' ids, in order.
async fn steps_of(b: &Handle, id: i64) -> Result<Vec<i64>, Error> {
    let build: serde_json::Value = b.get(&format!("/api/builds/{id}")).await?;
    Ok(build["steps"]
        .as_array()
        .map(|s| s.iter().filter_map(|s| s["id"].as_i64()).collect())
        .unwrap_or_default())
}

/// Submits a build of `sha` and waits until every one of its steps'
/// results was acknowledged; returns (build id, when it was sent).
async fn one(b: &Handle, marks: &Marks, sha: &str) -> Result<Ran, Error> {
    let t = Instant::now();
    let id = crate::load::submit_one(&b.http, &b.base, sha)
        .await
        .ok_or(Error::Setup("the server did not take a pipeline".into()))?;
    let steps = steps_of(b, id).await?;
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let finished = marks.finished.notified();
        if steps.iter().all(|s| marks.steps_done().contains_key(s)) {
            return Ok((id, t, steps));
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!(
                "pipeline {id} did not finish within 60 s"
            )));
        }
        let _ = tokio::time::timeout(std::time::Duration::from_millis(50), finished).await;
    }
}

/// Runs the pipelines and prints their figures.
pub(crate) async fn run(b: &Bench, o: &Opts, shape: Shape) -> Result<(), Error> {
    let marks = Arc::new(Marks::default());
    let _agents = b.agents(o, &marks).await?;
    let sha = b.commit(&[(".ci.yml", &shape.file())], "a pipeline")?;
    let n = o.pipelines.unwrap_or(shape.default_count());
    // One first, to read the file into the server's cache.
    one(&b.clone_handle(), &marks, &sha).await?;
    let (cpu0, _) = usage(b.server_pid());
    let t0 = Instant::now();
    let conc = match shape {
        Shape::Linear => o.submitters(),
        Shape::Fan => 1,
    };
    let done: Arc<tokio::sync::Mutex<Vec<Ran>>> = Arc::default();
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(n));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (b2, marks, sha, done, left) = (
            b.clone_handle(),
            marks.clone(),
            sha.clone(),
            done.clone(),
            left.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while left
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |l| l.checked_sub(1),
                )
                .is_ok()
            {
                let r = one(&b2, &marks, &sha).await?;
                done.lock().await.push(r);
            }
            Ok::<(), Error>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| Error::Setup(format!("a submitter panicked: {e}")))??;
    }
    let span = t0.elapsed().as_secs_f64();
    let (cpu1, peak) = usage(b.server_pid());
    let done = done.lock().await;
    let recv = marks.steps_received().clone();
    let fin = marks.steps_done().clone();
    let reported = marks.steps_reported().clone();
    let mut first = Vec::new();
    let mut next = Vec::new();
    let mut whole = Vec::new();
    for (_, sent, steps) in done.iter() {
        let Some(last) = steps.iter().filter_map(|s| fin.get(s)).max() else {
            continue;
        };
        whole.push(ms(last.duration_since(*sent)));
        if shape == Shape::Linear {
            if let Some(r) = steps.first().and_then(|s| recv.get(s)) {
                first.push(ms(r.duration_since(*sent)));
            }
            for pair in steps.windows(2) {
                if let (Some(d), Some(r)) = (reported.get(&pair[0]), recv.get(&pair[1])) {
                    next.push(ms(r.duration_since(*d)));
                }
            }
        }
    }
    let (first, next, whole) = (sorted(first), sorted(next), sorted(whole));
    let steps_run: usize = done.iter().map(|(_, _, s)| s.len()).sum();
    match shape {
        Shape::Linear => println!(
            "linear pipelines of 5 no-op steps, {} agents, {conc} at once: {n} pipelines ({steps_run} steps) in {span:.2} s\n\
             \x20 next-step dispatch  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={})\n\
             \x20 first step          p50 {:.2} ms  p99 {:.2} ms\n\
             \x20 whole pipeline      p50 {:.2} ms  p99 {:.2} ms\n\
             \x20 server CPU {:.2} s, peak RSS {:.1} MiB",
            o.agents,
            pct(&next, 0.5),
            pct(&next, 0.99),
            next.last().copied().unwrap_or(f64::NAN),
            next.len(),
            pct(&first, 0.5),
            pct(&first, 0.99),
            pct(&whole, 0.5),
            pct(&whole, 0.99),
            cpu1 - cpu0,
            peak as f64 / 1024.0
        ),
        Shape::Fan => println!(
            "pipelines of 100 parallel no-op steps and a final one, {} agents, one at a time: {n} pipelines\n\
             \x20 submit -> last result (all of it scheduling overhead)  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms\n\
             \x20 server CPU {:.2} s ({:.0} µs per step), peak RSS {:.1} MiB",
            o.agents,
            pct(&whole, 0.5),
            pct(&whole, 0.99),
            whole.last().copied().unwrap_or(f64::NAN),
            cpu1 - cpu0,
            (cpu1 - cpu0) * 1e6 / steps_run.max(1) as f64,
            peak as f64 / 1024.0
        ),
    }
    println!(
        "{}",
        serde_json::json!({
            "pipeline": format!("{shape:?}").to_lowercase(), "agents": o.agents, "pipelines": n,
            "next_step_p50_ms": pct(&next, 0.5), "next_step_p99_ms": pct(&next, 0.99),
            "first_step_p50_ms": pct(&first, 0.5), "first_step_p99_ms": pct(&first, 0.99),
            "whole_p50_ms": pct(&whole, 0.5), "whole_p99_ms": pct(&whole, 0.99),
            "server_cpu_s": cpu1 - cpu0, "server_peak_rss_mib": peak as f64 / 1024.0,
        })
    );
    Ok(())
}
