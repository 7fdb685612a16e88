//! Fault injection against real processes: SIGKILL, SIGSTOP/SIGCONT,
//! server crashes under load, network partitions (iptables on the
//! project's own loopback addresses), long server outages, and 50 agents
//! coming back at once. Every fault ends with every build finished exactly
//! once, no duplicate numbers, and `PRAGMA integrity_check` = ok.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use ci_core::{BuildId, BuildStatus};
use ci_testkit::alive;
use common::{agent_ip, partitions_or_skip, wait_until, Cluster, Partition};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(60);

/// The script of a build that hangs on its first attempt, records its
/// process group, and marks completion.
fn hanging_first_attempt(c: &Cluster) -> String {
    let dir = c.dir.path().display();
    c.commit_script(&format!(
        "echo $$ > {dir}/pid-$CI_BUILD_ATTEMPT\n\
         if [ \"$CI_BUILD_ATTEMPT\" = 1 ]; then sleep 30; fi\n\
         touch {dir}/done-$CI_BUILD_ATTEMPT\n\
         echo finished attempt $CI_BUILD_ATTEMPT\n"
    ))
}

/// Stops or continues an agent and the process group of the build it runs,
/// as when its whole machine freezes.
fn freeze(c: &Cluster, agent: usize, build_pgid: i32, sig: Signal) {
    c.agents[agent].signal(sig);
    let _ = killpg(Pid::from_raw(build_pgid), sig);
}

/// An agent SIGSTOPped for longer than its lease loses the build; when it
/// wakes, its heartbeat is refused and it kills its now useless work; its
/// result, if any, does not count.
#[tokio::test]
async fn sigstop_longer_than_the_lease_fences_the_zombie() {
    let mut c = Cluster::new(200, 3);
    let sha = hanging_first_attempt(&c);
    c.start_server();
    c.start_agent("zombie");
    c.wait_agents(1).await;
    let (id, zombie_url) = c.create_running(&sha).await;
    let pgid = wait_until("the build's pid", LONG, || async { c.read_pid(1) }).await;
    c.start_agent("rescuer");
    c.wait_agents(2).await;

    freeze(&c, 0, pgid, Signal::SIGSTOP);
    let done = c
        .api
        .wait_build(id, LONG, "attempt 2 done", |b| {
            b.attempt.0 == 2 && b.status.is_finished()
        })
        .await;
    assert_eq!(done.status, BuildStatus::Success);
    assert_ne!(done.agent.as_deref(), Some(zombie_url.as_str()));
    freeze(&c, 0, pgid, Signal::SIGCONT);

    wait_until("the zombie to abandon its build", LONG, || async {
        c.agents[0].log().contains("build abandoned").then_some(())
    })
    .await;
    wait_until("the zombie's work to stop", Duration::from_secs(10), || async {
        (!alive(pgid)).then_some(())
    })
    .await;
    assert!(!c.dir.path().join("done-1").exists(), "attempt 1 never completed");
    // The zombie was dropped; it notices and registers again.
    wait_until("the zombie to register again", LONG, || async {
        c.agents[0].log().contains("registering again").then_some(())
    })
    .await;
    c.wait_agents(2).await;
    let b = c.api.build(id).await.unwrap();
    assert_eq!((b.status, b.attempt.0), (BuildStatus::Success, 2));
    c.assert_exactly_once(&[id]);
}

/// A stop shorter than the lease changes nothing: no requeue.
#[tokio::test]
async fn sigstop_shorter_than_the_lease_is_not_a_failure() {
    let mut c = Cluster::new(300, 5); // lease 1.5 s
    let dir = c.dir.path().display().to_string();
    let sha = c.commit_script(&format!(
        "echo $$ > {dir}/pid-$CI_BUILD_ATTEMPT; sleep 1; echo done"
    ));
    c.start_server();
    c.start_agent("napper");
    c.start_agent("idle");
    c.wait_agents(2).await;
    let (id, url) = c.create_running(&sha).await;
    let pgid = wait_until("the build's pid", LONG, || async { c.read_pid(1) }).await;
    let napper = c.agent_index_by_url(&url);

    freeze(&c, napper, pgid, Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(600)).await; // the fault: a 600 ms freeze
    freeze(&c, napper, pgid, Signal::SIGCONT);

    let b = c.api.wait_finished(id, LONG).await;
    assert_eq!(
        (b.status, b.attempt.0),
        (BuildStatus::Success, 1),
        "no false requeue"
    );
    assert_eq!(b.agent.as_deref(), Some(url.as_str()));
    assert_eq!(c.api.agents().await.unwrap().len(), 2);
    c.assert_exactly_once(&[id]);
}

/// The server is SIGKILLed while 100 builds are being submitted. Every
/// build acknowledged with 201 exists after the restart and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_sigkill_under_load_loses_no_acknowledged_build() {
    let mut c = Cluster::new(300, 5);
    let sha = c.commit_script("echo ok");
    c.start_server();
    c.start_agent("a");
    c.start_agent("b");
    c.wait_agents(2).await;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let tx = tx.clone();
        let http = c.api.http.clone();
        let url = c.api.url("/api/builds");
        let sha = sha.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(i * 3)).await; // a stream, not a burst
            let r = http
                .post(url)
                .json(&serde_json::json!({ "hash": sha }))
                .send()
                .await;
            let acked = match r {
                Ok(resp) if resp.status().as_u16() == 201 => Some(
                    resp.json::<ci_core::protocol::BuildView>()
                        .await
                        .map(|b| b.id)
                        .ok(),
                ),
                _ => None,
            };
            let _ = tx.send(acked.flatten());
        }));
    }
    drop(tx);
    // Kill the server once a third of the stream has been acknowledged.
    let mut acked = Vec::new();
    while acked.len() < 33 {
        if let Some(Some(id)) = rx.recv().await {
            acked.push(id);
        }
    }
    c.kill_server();
    while let Some(r) = rx.recv().await {
        acked.extend(r);
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        acked.len() < 100,
        "the kill landed mid-stream ({} acknowledged)",
        acked.len()
    );

    c.start_server();
    c.wait_server().await;
    for id in &acked {
        let b = c.api.wait_finished(*id, LONG).await;
        assert_eq!(b.status, BuildStatus::Success, "{b:?}");
    }
    // Builds stored but not acknowledged (the reply was lost) finish too.
    let all: Vec<BuildId> = c.api.all_builds().await.unwrap().iter().map(|b| b.id).collect();
    for id in &all {
        c.api.wait_finished(*id, LONG).await;
    }
    let acked_set: BTreeSet<_> = acked.iter().collect();
    assert_eq!(acked_set.len(), acked.len(), "no duplicate numbers");
    assert!(acked.iter().all(|id| all.contains(id)));
    println!(
        "{} of 100 acknowledged before the kill, {} stored in all",
        acked.len(),
        all.len()
    );
    c.assert_exactly_once(&all);
}

/// Results finished while the server is down for longer than the backoff
/// cap are delivered when it returns.
#[tokio::test]
async fn results_outlast_a_server_outage_longer_than_the_backoff_cap() {
    let mut c = Cluster::new(300, 5);
    let sha = c.commit_script("echo built; sleep 0.5");
    c.start_server();
    c.start_agent("a");
    c.wait_agents(1).await;
    let ids = [c.create_running(&sha).await.0];
    c.kill_server();
    let down = Instant::now();
    // The agent logs its first failure and every tenth: ten failed
    // deliveries at >= 250 ms each is well past the 500 ms cap.
    wait_until("ten failed deliveries", LONG, || async {
        let log = c.agents[0].log();
        (log.contains("what=\"deliver result\" failures=10")).then_some(())
    })
    .await;
    let outage = down.elapsed();
    assert!(outage > Duration::from_secs(2), "outage {outage:?}");
    c.start_server();
    let b = c.api.wait_finished(ids[0], LONG).await;
    assert_eq!((b.status, b.attempt.0), (BuildStatus::Success, 1));
    println!("result delivered after a {outage:?} outage (backoff cap 500 ms)");
    c.assert_exactly_once(&ids);
}

// === partitions ===

/// A partition shorter than the lease: the build carries on, no requeue.
#[tokio::test]
async fn partition_shorter_than_the_lease_changes_nothing() {
    if !partitions_or_skip() {
        return;
    }
    let mut c = Cluster::new(400, 5); // lease 2 s
    let sha = c.commit_script("sleep 2; echo done");
    c.start_server();
    let ip = agent_ip();
    c.start_agent_at("cut-off", &ip);
    c.start_agent_at("other", &agent_ip());
    c.wait_agents(2).await;
    let (id, url) = c.create_running(&sha).await;
    let ip = url
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap()
        .to_owned();

    let cut = Partition::cut(&ip);
    tokio::time::sleep(Duration::from_millis(700)).await; // the fault: 700 ms without a network
    drop(cut);

    let b = c.api.wait_finished(id, LONG).await;
    assert_eq!((b.status, b.attempt.0), (BuildStatus::Success, 1), "no requeue");
    assert_eq!(b.agent.as_deref(), Some(url.as_str()));
    c.assert_exactly_once(&[id]);
}

/// A partition longer than the lease: the build moves to the other agent;
/// when the network heals, the cut-off agent's heartbeat is refused and it
/// stops its copy; it then registers again.
#[tokio::test]
async fn partition_longer_than_the_lease_moves_the_build() {
    if !partitions_or_skip() {
        return;
    }
    let mut c = Cluster::new(200, 3); // lease 600 ms
    let sha = hanging_first_attempt(&c);
    c.start_server();
    let ip = agent_ip();
    c.start_agent_at("cut-off", &ip);
    c.wait_agents(1).await;
    let (id, url) = c.create_running(&sha).await;
    assert!(url.contains(&ip), "{url} is the agent at {ip}");
    let pgid = wait_until("the build's pid", LONG, || async { c.read_pid(1) }).await;
    c.start_agent_at("other", &agent_ip());
    c.wait_agents(2).await;

    let cut = Partition::cut(&ip);
    let done = c
        .api
        .wait_build(id, LONG, "attempt 2 done", |b| {
            b.attempt.0 == 2 && b.status.is_finished()
        })
        .await;
    assert_eq!(done.status, BuildStatus::Success);
    drop(cut);

    wait_until("the cut-off agent to abandon its copy", LONG, || async {
        c.agents[0].log().contains("build abandoned").then_some(())
    })
    .await;
    wait_until("its work to stop", Duration::from_secs(10), || async {
        (!alive(pgid)).then_some(())
    })
    .await;
    assert!(!c.dir.path().join("done-1").exists());
    c.wait_agents(2).await;
    let b = c.api.build(id).await.unwrap();
    assert_eq!((b.status, b.attempt.0), (BuildStatus::Success, 2));
    c.assert_exactly_once(&[id]);
}

// === many agents ===

/// 50 agents started together before their server retry with jittered
/// backoff: they register soon after it comes up, spread out rather than in
/// one burst. After a server restart they are known again at once (the
/// registry is persisted) and resume pinging without registering again.
#[tokio::test]
async fn fifty_agents_come_back_without_a_thundering_herd() {
    let mut c = Cluster::new(500, 5);
    let sha = c.commit_script("echo ok");
    for i in 0..50 {
        c.start_agent(&format!("herd{i}"));
    }
    // Let them all fail and back off together for a while.
    wait_until("every agent to have retried", LONG, || async {
        (c.agents.iter().all(|a| a.log().contains("retrying"))).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // the outage continues
    c.start_server();
    let up = Instant::now();
    c.wait_server().await;
    let agents = wait_until("50 registrations", LONG, || async {
        c.api.agents().await.ok().filter(|a| a.len() == 50)
    })
    .await;
    let all_in = up.elapsed();
    // Registration times, from the server's own records.
    let conn = rusqlite::Connection::open(c.db_path()).unwrap();
    let mut times: Vec<i64> = conn
        .prepare("SELECT registered_at FROM agents")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    times.sort_unstable();
    let spread = times[49] - times[0];
    let busiest_50ms = times
        .iter()
        .map(|t| times.iter().filter(|u| **u >= *t && **u < t + 50).count())
        .max()
        .unwrap();
    println!("50 agents registered within {all_in:?} of the server starting; spread {spread} ms; at most {busiest_50ms} in any 50 ms");
    assert!(
        all_in < Duration::from_millis(500 + 1500),
        "{all_in:?}: the backoff cap is 500 ms"
    );
    assert!(
        spread >= 100,
        "registrations spread over {spread} ms: jitter should spread them"
    );
    assert!(
        busiest_50ms <= 30,
        "{busiest_50ms} registrations within 50 ms: a herd"
    );

    // Restart: the registry survives; every agent pings again, same ids.
    let ids: BTreeSet<_> = agents.iter().map(|a| a.id).collect();
    c.kill_server();
    tokio::time::sleep(Duration::from_secs(1)).await; // the outage
    c.start_server();
    c.wait_server().await;
    let restarted = chrono_now_ms();
    wait_until("every agent to ping the new server", LONG, || async {
        let a = c.api.agents().await.ok()?;
        let fresh = a.iter().all(|a| common::millis(&a.last_seen) > restarted + 100);
        (a.len() == 50 && fresh).then_some(())
    })
    .await;
    let after: BTreeSet<_> = c.api.agents().await.unwrap().iter().map(|a| a.id).collect();
    assert_eq!(ids, after, "nobody had to register again");
    let id = c.api.create(&sha).await.id;
    assert_eq!(c.api.wait_finished(id, LONG).await.status, BuildStatus::Success);
    c.assert_exactly_once(&[id]);
}

fn chrono_now_ms() -> u64 {
    #[allow(clippy::disallowed_types)] // comparing with the server's wall-clock timestamps
    let now = std::time::SystemTime::now();
    u64::try_from(now.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap()
}
