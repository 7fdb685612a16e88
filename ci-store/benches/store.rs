//! The store's hot operations on a SQLite file in WAL mode
//! (`synchronous=NORMAL`): what one build costs the server's disk.
//!
//!     cargo bench -p ci-store

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // benches may panic

use ci_core::{AgentRecord, Attempt, BuildStore, CommitRef, Completion, NewBuild, Page, RepoUrl, Timestamp};
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

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("ci.sqlite")).unwrap();
    let agent: AgentRecord = store.register_agent("http://a:1", None, Timestamp(0)).unwrap();
    let done = Completion {
        exit_code: 0,
        stdout: "ok\n".into(),
        stderr: String::new(),
    };
    let nb = new_build();
    // A history, so that the queries run against a realistic table.
    for _ in 0..10_000 {
        let b = store.create_build(&nb, Timestamp(1)).unwrap();
        store.start_attempt(b.id, &agent, Timestamp(2)).unwrap();
        store.finish(b.id, Attempt(1), &done, Timestamp(3)).unwrap();
    }

    c.bench_function("create_build", |b| {
        b.iter(|| store.create_build(&nb, Timestamp(1)).unwrap())
    });
    c.bench_function("build lifecycle: create + start + finish", |b| {
        b.iter(|| {
            let build = store.create_build(&nb, Timestamp(1)).unwrap();
            store.start_attempt(build.id, &agent, Timestamp(2)).unwrap();
            store.finish(build.id, Attempt(1), &done, Timestamp(3)).unwrap()
        })
    });
    c.bench_function("queued_builds(16)", |b| {
        b.iter(|| store.queued_builds(16).unwrap())
    });
    let page = Page {
        limit: 50,
        offset: 0,
        before: None,
    };
    c.bench_function("list_builds(50), newest page", |b| {
        b.iter(|| store.list_builds(page).unwrap())
    });
    let deep = Page {
        before: Some(ci_core::BuildId(5000)),
        ..page
    };
    c.bench_function("list_builds(50), keyset page in the middle", |b| {
        b.iter(|| store.list_builds(deep).unwrap())
    });
    c.bench_function("status_counts", |b| b.iter(|| store.status_counts().unwrap()));
}

criterion_group!(benches, bench);
criterion_main!(benches);
