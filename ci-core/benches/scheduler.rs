//! The scheduler's decision: one `Coordinator::plan` pass (free agents,
//! queued builds, the policy, the store writes) with an in-memory store, and
//! the `Fifo` policy alone.
//!
//!     cargo bench -p ci-core

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // benches may panic

use std::sync::Arc;

use ci_core::coordinator::{Accepted, Report};
use ci_core::{
    AgentId, Build, BuildId, CommitRef, Completion, Coordinator, Fifo, Labels, MemoryStore, NewBuild, Offer,
    RepoUrl, Scheduler, Step, StepId, Timestamp,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn new_build() -> NewBuild {
    NewBuild::new(
        RepoUrl::parse("/srv/repo").unwrap(),
        CommitRef::parse("abcd").unwrap(),
        "make",
    )
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("plan + complete, per build");
    for agents in [1usize, 16, 100] {
        g.bench_with_input(BenchmarkId::from_parameter(agents), &agents, |b, &agents| {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let store = Arc::new(MemoryStore::new());
            let mut co = rt.block_on(Coordinator::builder(store).build()).unwrap();
            for i in 0..agents {
                rt.block_on(co.register_agent(&format!("http://a{i}:1"))).unwrap();
            }
            let nb = new_build();
            b.iter(|| {
                rt.block_on(async {
                    co.submit(&nb).await.unwrap();
                    let d = co.plan().await.unwrap().remove(0);
                    let r = co
                        .complete(Report {
                            step: d.step.id,
                            attempt: Some(d.step.attempt),
                            agent: Some(d.agent),
                            verified: false,
                            completion: Completion {
                                exit_code: 0,
                                stdout: String::new(),
                                stderr: String::new(),
                            },
                        })
                        .await
                        .unwrap();
                    assert!(matches!(r, Accepted::Finished(_)));
                    co.take_events()
                })
            })
        });
    }
    g.finish();

    let build = Build::new(BuildId(1), &new_build(), Timestamp(0));
    let queued: Vec<Step> = (0..100)
        .map(|i| Step::new(StepId(i), &build, &new_build().plan()[0]))
        .collect();
    let free: Vec<Offer> = (0..100)
        .map(|i| Offer {
            agent: AgentId(i),
            url: format!("http://a{i}:1"),
            labels: Labels::default(),
            free_slots: 1,
            idle_since: Timestamp(0),
        })
        .collect();
    c.bench_function("Fifo::assign, 100 builds x 100 agents", |b| {
        b.iter(|| Fifo.assign(&queued, &free))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
