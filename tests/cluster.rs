//! The behaviours the design promises, each against real `ci-server` and
//! `ci-agent` processes, a real SQLite file and a real git repository.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use ci_core::protocol::BuildView;
use ci_core::{BuildId, BuildStatus};
use common::{millis, wait_until, Cluster};
use serde_json::json;
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(60);

/// 1. Build numbers are unique and increasing under concurrency, and never
///    reused: not after deletes, not after restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn build_numbers_are_unique_and_never_reused() {
    let mut c = Cluster::new(1000, 5);
    let sha = c.commit_script("true");
    c.start_server();
    c.wait_server().await;

    let creates = (0..200).map(|_| {
        let api = &c.api;
        let sha = sha.clone();
        async move { api.create(&sha).await.id }
    });
    let ids: Vec<BuildId> = futures_util::future::join_all(creates).await;
    let distinct: BTreeSet<_> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), 200, "200 distinct ids");
    let expected: BTreeSet<_> = (1..=200).map(BuildId).collect();
    assert_eq!(distinct, expected, "increasing from 1 with no gaps");

    // Delete the newest rows behind the server's back, restart, create again.
    c.kill_server();
    let conn = rusqlite::Connection::open(c.db_path()).unwrap();
    conn.execute("DELETE FROM builds WHERE id > 100", []).unwrap();
    drop(conn);
    c.start_server();
    c.wait_server().await;
    let next = c.api.create(&sha).await.id;
    assert_eq!(next, BuildId(201), "an id is never given twice");
}

/// 2. Every agent is kept busy: 2 agents and 10 one-second builds take about
///    5 s, and no agent ever runs two builds at once.
#[tokio::test]
async fn every_agent_is_kept_busy_and_runs_one_build_at_a_time() {
    let mut c = Cluster::new(500, 5);
    let sha = c.commit_script("sleep 1");
    c.start_server();
    c.start_agent("a");
    c.start_agent("b");
    c.wait_agents(2).await;

    let t0 = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(c.api.create(&sha).await.id);
    }
    let mut builds = Vec::new();
    for id in ids {
        builds.push(c.api.wait_finished(id, LONG).await);
    }
    let elapsed = t0.elapsed();
    assert!(
        builds.iter().all(|b| b.status == BuildStatus::Success),
        "{builds:#?}"
    );
    assert!(
        elapsed >= Duration::from_secs(5) && elapsed < Duration::from_secs(8),
        "10 builds of 1 s on 2 agents took {elapsed:?}, expected about 5 s"
    );

    let mut by_agent: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for b in &builds {
        let span = (
            millis(b.started_at.as_ref().unwrap()),
            millis(b.finished_at.as_ref().unwrap()),
        );
        by_agent.entry(b.agent.clone().unwrap()).or_default().push(span);
    }
    assert_eq!(by_agent.len(), 2, "both agents worked");
    for (agent, mut spans) in by_agent {
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{agent} ran two builds at once: {w:?}");
        }
    }
}

/// 3. An agent that died while idle is dropped when the dispatch to it
///    fails, and the build runs on the other agent.
#[tokio::test]
async fn an_agent_dead_between_builds_is_dropped_and_the_build_goes_elsewhere() {
    let mut c = Cluster::new(500, 5);
    let sha = c.commit_script("echo built");
    c.start_server();
    c.start_agent("alive");
    c.start_agent("dead");
    c.wait_agents(2).await;
    c.agents[1].kill();

    // Two builds: with both agents idle, one of them is dispatched to the
    // dead agent whichever it picks first.
    let a = c.api.create(&sha).await.id;
    let b = c.api.create(&sha).await.id;
    let a = c.api.wait_finished(a, LONG).await;
    let b = c.api.wait_finished(b, LONG).await;
    assert_eq!((a.status, b.status), (BuildStatus::Success, BuildStatus::Success));
    assert_eq!(a.agent, b.agent, "both ran on the live agent");
    let agents = c.api.agents().await.unwrap();
    assert_eq!(agents.len(), 1, "the dead agent was dropped: {agents:?}");
    assert_eq!(Some(&agents[0].url), a.agent.as_ref());
    assert!(
        a.attempt.0 + b.attempt.0 == 3,
        "one dispatch failed and was retried: {a:?} {b:?}"
    );
}

/// 4. An agent that dies mid-build misses its heartbeats; its build goes
///    back to the queue within missed x interval (+ one interval) and
///    succeeds elsewhere. A late result from the killed attempt is refused.
#[tokio::test]
async fn an_agent_dead_during_a_build_loses_it_to_another_agent() {
    let mut c = Cluster::new(300, 3);
    // The first attempt hangs; any later one succeeds.
    let sha = c
        .commit_script("if [ \"$CI_BUILD_ATTEMPT\" = 1 ]; then sleep 30; fi; echo attempt $CI_BUILD_ATTEMPT");
    c.start_server();
    c.start_agent("doomed");
    c.wait_agents(1).await;
    let (id, doomed) = c.create_running(&sha).await;
    c.start_agent("rescuer");
    c.wait_agents(2).await;

    c.agents[0].kill();
    let killed = Instant::now();
    let requeued = c
        .api
        .wait_build(id, LONG, "a second attempt", |b| b.attempt.0 >= 2)
        .await;
    let detection = killed.elapsed();
    let bound = Duration::from_millis(300 * 3 + 300);
    assert!(
        detection <= bound + Duration::from_millis(100),
        "requeued after {detection:?}, bound {bound:?}"
    );
    assert_ne!(requeued.agent.as_deref(), Some(doomed.as_str()));

    let done = c.api.wait_finished(id, LONG).await;
    assert_eq!(done.status, BuildStatus::Success);
    assert_eq!(done.attempt.0, 2);
    assert_eq!(
        c.api.log(id).await.unwrap()["stdout"]
            .as_str()
            .map(|s| s.ends_with("attempt 2\n")),
        Some(true)
    );

    // The first attempt's late result, with its own wire id, with or
    // without saying its attempt.
    let first = ci_core::DispatchId::new(done.steps[0].id, ci_core::Attempt(1)).unwrap();
    for late in [
        json!({"id": first, "attempt": 1, "status": 1, "stdout": "", "stderr": "zombie"}),
        json!({"id": first, "status": 1, "stdout": "", "stderr": "zombie"}),
    ] {
        let (status, body) = c.api.post("/notify_build_result", &late).await.unwrap();
        assert_eq!(status, 409, "{body}");
    }
    let after = c.api.build(id).await.unwrap();
    assert_eq!((after.status, after.exit_code), (BuildStatus::Success, Some(0)));
}

/// 5. When agents cannot keep up, builds wait in the database and run in
///    FIFO order; none is lost.
#[tokio::test]
async fn builds_wait_for_agents_in_fifo_order_and_none_is_lost() {
    let mut c = Cluster::new(500, 5);
    let sha = c.commit_script("echo ok");
    c.start_server();
    c.start_agent("a");
    c.start_agent("b");
    c.wait_agents(2).await;
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(c.api.create(&sha).await.id);
    }
    for id in &ids {
        c.api.wait_finished(*id, LONG).await;
    }
    let builds: Vec<BuildView> = c.api.all_builds().await.unwrap();
    assert_eq!(builds.len(), 50);
    assert!(builds
        .iter()
        .all(|b| b.status == BuildStatus::Success && b.attempt.0 == 1));
    let starts: Vec<u64> = builds
        .iter()
        .map(|b| millis(b.started_at.as_ref().unwrap()))
        .collect();
    assert!(
        starts.windows(2).all(|w| w[0] <= w[1]),
        "started in submission order: {starts:?}"
    );
}

/// 6. An agent started before its server retries registration with capped
///    backoff and registers soon after the server comes up.
#[tokio::test]
async fn an_agent_waits_for_its_server_with_backoff() {
    let mut c = Cluster::new(500, 5);
    let sha = c.commit_script("echo ok");
    c.start_agent("early");
    tokio::time::sleep(Duration::from_secs(5)).await; // the scenario: the server is 5 s late
    c.start_server();
    let up = Instant::now();
    c.wait_server().await;
    c.wait_agents(1).await;
    let took = up.elapsed();
    assert!(
        took < Duration::from_millis(500 + 1000),
        "registered {took:?} after the server started (cap 500 ms)"
    );
    let id = c.api.create(&sha).await.id;
    assert_eq!(c.api.wait_finished(id, LONG).await.status, BuildStatus::Success);
    let log = c.agents[0].log();
    assert!(log.contains("retrying"), "the agent logged its retries:\n{log}");
}

/// 7. A result finished while the server is down is kept and delivered when
///    the server returns.
#[tokio::test]
async fn a_result_survives_a_server_outage() {
    let mut c = Cluster::new(300, 5);
    let marker = c.dir.path().join("finished");
    let sha = c.commit_script(&format!("sleep 1; echo made it; touch {}", marker.display()));
    c.start_server();
    c.start_agent("a");
    c.wait_agents(1).await;
    let (id, _) = c.create_running(&sha).await;
    c.kill_server();
    wait_until("the build to finish on the agent", LONG, || async {
        marker.exists().then_some(())
    })
    .await;
    // Let the agent fail to deliver a few times before the server returns.
    let log_has_retry = || c.agents[0].log().contains("deliver result");
    wait_until("a failed delivery", LONG, || async {
        log_has_retry().then_some(())
    })
    .await;

    c.start_server();
    let b = c.api.wait_finished(id, LONG).await;
    assert_eq!((b.status, b.attempt.0), (BuildStatus::Success, 1));
    assert!(c.api.log(id).await.unwrap()["stdout"]
        .as_str()
        .unwrap()
        .contains("made it"));
}

/// 8. After a server SIGKILL, builds, logs and numbering survive, agents are
///    known again without restarting them, and a running build whose agent
///    is gone is requeued once its lease runs out.
#[tokio::test]
async fn state_survives_a_server_restart() {
    let mut c = Cluster::new(300, 3);
    let quick = c.commit_script("echo first");
    let slow = c.commit_script("if [ \"$CI_BUILD_ATTEMPT\" = 1 ]; then sleep 30; fi; echo second");
    c.start_server();
    c.start_agent("stays");
    c.wait_agents(1).await;
    let first = c.api.create(&quick).await.id;
    c.api.wait_finished(first, LONG).await;

    c.start_agent("goes");
    c.wait_agents(2).await;
    // Occupy both agents, then note which one holds the slow build.
    let second = c.api.create(&slow).await.id;
    let running = c
        .api
        .wait_build(second, LONG, "running", |b| b.status == BuildStatus::Running)
        .await;
    let holder = running.agent.clone().unwrap();
    c.api.wait_agent_runs(&holder, second).await;

    c.kill_server();
    c.agent_by_port(&holder).kill();
    c.start_server();
    c.wait_server().await;

    // Builds, logs and numbering survive.
    let b1 = c.api.build(first).await.unwrap();
    assert_eq!(b1.status, BuildStatus::Success);
    assert_eq!(
        c.api.log(first).await.unwrap()["stdout"]
            .as_str()
            .map(|s| s.ends_with("first\n")),
        Some(true)
    );
    let third = c.api.create(&quick).await.id;
    assert!(third > second);

    // The surviving agent is known without restarting it and builds; the
    // orphaned build is requeued when its lease expires and runs there too.
    let t = c.api.wait_finished(third, LONG).await;
    assert_eq!(t.status, BuildStatus::Success);
    let s = c.api.wait_finished(second, LONG).await;
    assert_eq!((s.status, s.attempt.0), (BuildStatus::Success, 2));
    assert_ne!(s.agent.as_deref(), Some(holder.as_str()));
    let agents = c.api.agents().await.unwrap();
    assert_eq!(agents.len(), 1, "the dead agent was dropped: {agents:?}");
}
