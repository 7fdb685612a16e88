//! The scheduler with a deep queue: 100,000 queued steps, 1,000 agents
//! with different labels, the coordinator on a real SQLite file, no HTTP
//! (`--queue N --agents K`). Reports how long one scheduling pass takes:
//! the first (every agent free) and then, step after step, passes after a
//! few results free a few agents.

use std::sync::Arc;

use ci_core::coordinator::Report;
use ci_core::{CommitRef, Completion, Coordinator, Enrollment, Labels, NewBuild, RepoUrl};
use tokio::time::Instant;

use crate::stats::{ms, pct, sorted};
use crate::{Error, Opts};

/// Label sets: agent `i` is in pool `i % POOLS`; a tenth of the steps ask
/// for a pool no agent is in, so they wait (deep in the queue, before the
/// steps that can run).
const POOLS: usize = 100;

fn setup_err(e: impl std::fmt::Display) -> Error {
    Error::Setup(e.to_string())
}

/// Runs the scenario and prints its figures.
pub(crate) async fn run(o: &Opts, queued: usize) -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(ci_store::SqliteStore::open(dir.path().join("ci.sqlite")).map_err(setup_err)?);
    let mut c = Coordinator::builder(store.clone())
        .build()
        .await
        .map_err(setup_err)?;
    let mut rng = fastrand::Rng::with_seed(11);
    for i in 0..o.agents {
        let labels =
            Labels::parse([format!("pool=p{}", i % POOLS), format!("host=h{i}")]).map_err(setup_err)?;
        let e = Enrollment {
            labels,
            ..Enrollment::new(format!("http://agent-{i}:1"))
        };
        c.register(e, None).await.map_err(setup_err)?;
    }
    let repo = RepoUrl::parse("/srv/repo").map_err(setup_err)?;
    let sha = CommitRef::parse(&"a".repeat(40)).map_err(setup_err)?;
    let t0 = Instant::now();
    for _ in 0..queued {
        let pool = rng.usize(..POOLS + POOLS / 9);
        let mut new = NewBuild::new(repo.clone(), sha.clone(), "true").map_err(setup_err)?;
        new.labels = Labels::parse([format!("pool=p{pool}")]).map_err(setup_err)?;
        c.submit(&new).await.map_err(setup_err)?;
    }
    eprintln!("queued {queued} steps in {:.1} s", t0.elapsed().as_secs_f64());
    let _ = c.take_events();

    let t = Instant::now();
    let mut running = c.plan().await.map_err(setup_err)?;
    let first = ms(t.elapsed());
    let first_n = running.len();
    let mut passes = Vec::new();
    let mut dispatched = running.len();
    for _ in 0..o.passes {
        // A few results free a few agents; then one pass.
        for _ in 0..rng.usize(1..=8).min(running.len()) {
            let d = running.swap_remove(rng.usize(..running.len()));
            let report = Report {
                step: d.step.id,
                attempt: Some(d.step.attempt),
                agent: Some(d.agent),
                verified: false,
                completion: Completion {
                    exit_code: 0,
                    stdout: String::new(),
                    stderr: String::new(),
                },
            };
            c.complete(report).await.map_err(setup_err)?;
        }
        let t = Instant::now();
        let planned = c.plan().await.map_err(setup_err)?;
        passes.push(ms(t.elapsed()));
        dispatched += planned.len();
        running.extend(planned);
        let _ = c.take_events();
    }
    let passes = sorted(passes);
    println!(
        "a scheduling pass, {queued} queued steps, {} agents in {POOLS} label pools (a tenth of the steps wait for pools no agent is in):\n\
         \x20 first pass (every agent free): {first:.1} ms, {} dispatched\n\
         \x20 then, after 1-8 results each:   p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} passes, {dispatched} dispatched in all)",
        o.agents,
        first_n,
        pct(&passes, 0.5),
        pct(&passes, 0.99),
        passes.last().copied().unwrap_or(f64::NAN),
        passes.len(),
    );
    println!(
        "{}",
        serde_json::json!({
            "queue": queued, "agents": o.agents, "first_pass_ms": first,
            "pass_p50_ms": pct(&passes, 0.5), "pass_p99_ms": pct(&passes, 0.99),
            "pass_max_ms": passes.last(), "dispatched": dispatched,
        })
    );
    Ok(())
}
