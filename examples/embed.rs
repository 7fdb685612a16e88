//! Embedding `ci-core`: a [`LocalCluster`] with a runner of your own, no
//! HTTP server and no database. This is what `cargo add ci-core` gives.
//!
//! ```text
//! cargo run --example embed
//! ```
//!
//! Two workers run a "build" that sleeps long enough to send heartbeats,
//! then the cluster sits idle for longer than a lease, and a last build
//! must still find its worker: embedded workers are never forgotten.

use std::sync::Arc;
use std::time::Duration;

use ci_core::{
    async_trait, BuildStatus, CommitRef, Coordinator, Job, LeasePolicy, LocalCluster, LogSink, MemoryStore,
    NewBuild, RepoUrl, RunError, Runner, Stream,
};

/// A runner of our own: "builds" by sleeping, then reports how it went.
struct Sleeper;

#[async_trait]
impl Runner for Sleeper {
    async fn run(&self, job: &Job, log: &LogSink) -> Result<i32, RunError> {
        log.write(
            Stream::Stdout,
            format!("building {} ({})\n", job.commit, job.command).as_bytes(),
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        match job.command.as_str() {
            "fail" => Ok(1),
            _ => Ok(0),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Heartbeats every 100 ms, a lease of 200 ms: builds outlast several.
    let lease = LeasePolicy::new(Duration::from_millis(100), 2)?;
    let coordinator = Coordinator::builder(Arc::new(MemoryStore::new()))
        .lease(lease)
        .build()
        .await?;
    let runners: Vec<Arc<dyn Runner>> = vec![Arc::new(Sleeper), Arc::new(Sleeper)];
    let cluster = LocalCluster::start(coordinator, runners).await?;

    let repo = RepoUrl::parse("file:///srv/repo.git")?;
    let build = |what: &str, command: &str| -> Result<NewBuild, ci_core::Error> {
        NewBuild::new(repo.clone(), CommitRef::parse(what)?, command)
    };
    let first = [
        cluster.submit(&build("a1b2c3d", "make")?).await?,
        cluster.submit(&build("main", "fail")?).await?,
    ];
    for b in &first {
        let done = cluster.wait(b.id).await?;
        println!(
            "build #{} {} on {}",
            done.id,
            done.status,
            done.agent_url.unwrap_or_default()
        );
    }
    assert_eq!(cluster.wait(first[0].id).await?.status, BuildStatus::Success);
    assert_eq!(cluster.wait(first[1].id).await?.status, BuildStatus::Failed);

    // Idle for five leases: the workers must still be there.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let last = cluster.submit(&build("a1b2c3d", "make")?).await?;
    let done = tokio::time::timeout(Duration::from_secs(10), cluster.wait(last.id))
        .await
        .map_err(|_| "the build after the idle time never finished: the workers were forgotten")??;
    println!("build #{} {} after an idle second", done.id, done.status);
    assert_eq!(done.status, BuildStatus::Success);
    assert_eq!(cluster.dispatcher().agents().await?.len(), 2);
    cluster.shutdown().await;
    println!("embedded cluster: all as expected");
    Ok(())
}
