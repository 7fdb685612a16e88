//! The store's hot operations on a SQLite file in WAL mode
//! (`synchronous=NORMAL`): what one build costs the server's disk.
//!
//!     cargo bench -p ci-store

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // benches may panic

use ci_core::store::{Agents, Builds, Claim, Queue};
use ci_core::{AgentRecord, Attempt, CommitRef, Completion, Enrollment, NewBuild, Page, RepoUrl, Timestamp};
use ci_store::SqliteStore;
use criterion::{criterion_group, criterion_main, Criterion};

fn new_build() -> NewBuild {
    NewBuild::new(
        RepoUrl::parse("/srv/repo").unwrap(),
        CommitRef::parse("a1b2c3d4").unwrap(),
        "make test",
    )
    .unwrap()
}

/// One build's lifecycle: create, start on `agent`, finish.
async fn lifecycle(store: &SqliteStore, nb: &NewBuild, agent: &AgentRecord, done: &Completion) -> bool {
    let b = store.create_build(nb, Timestamp(1)).await.unwrap();
    let claim = Claim {
        step: b.steps[0].id,
        agent: agent.id,
        agent_url: agent.url.clone(),
        lease_until: Timestamp(10),
    };
    store.start(&[claim], Timestamp(2)).await.unwrap();
    store
        .finish(b.steps[0].id, Attempt(1), done, Timestamp(3))
        .await
        .unwrap()
        .is_some()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("ci.sqlite")).unwrap();
    let enrollment = Enrollment::new("http://a:1");
    let agent: AgentRecord = rt
        .block_on(store.register_agent(&enrollment, Timestamp(0)))
        .unwrap();
    let done = Completion {
        exit_code: 0,
        stdout: "ok\n".into(),
        stderr: String::new(),
    };
    let nb = new_build();
    // A history, so that the queries run against a realistic table.
    rt.block_on(async {
        for _ in 0..10_000 {
            lifecycle(&store, &nb, &agent, &done).await;
        }
    });

    c.bench_function("create_build", |b| {
        b.iter(|| rt.block_on(store.create_build(&nb, Timestamp(1))).unwrap())
    });
    c.bench_function("build lifecycle: create + start + finish", |b| {
        b.iter(|| rt.block_on(lifecycle(&store, &nb, &agent, &done)))
    });
    c.bench_function("queued(16)", |b| {
        b.iter(|| rt.block_on(store.queued(16)).unwrap())
    });
    let page = Page {
        limit: 50,
        offset: 0,
        before: None,
    };
    c.bench_function("list_builds(50), newest page", |b| {
        b.iter(|| rt.block_on(store.list_builds(page)).unwrap())
    });
    let deep = Page {
        before: Some(ci_core::BuildId(5000)),
        ..page
    };
    c.bench_function("list_builds(50), keyset page in the middle", |b| {
        b.iter(|| rt.block_on(store.list_builds(deep)).unwrap())
    });
    c.bench_function("status_counts", |b| {
        b.iter(|| rt.block_on(store.status_counts()).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
