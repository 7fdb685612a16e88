//! Agents that connect out (the default): real `ci-server` and `ci-agent`
//! processes on loopback, the agents listening on no port. A killed
//! agent's build moves at once (its connection closes), a stopped one's
//! when its lease lapses, as does a partitioned one's (iptables on the
//! agent's own loopback address, which it connects from); a stop or a
//! partition shorter than the lease changes nothing; a result finished
//! while the server is down is delivered over the next connection; a
//! wrong or revoked token is refused.
//! Every case ends with each build finished exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod common;

use std::time::Duration;

use ci_core::{BuildId, BuildStatus};
use common::{agent_ip, partitions_or_skip, wait_until, Cluster, Partition};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(60);

/// A cluster whose agents connect out.
fn connected(heartbeat_ms: u64, missed: u32) -> Cluster {
    let mut c = Cluster::new(heartbeat_ms, missed);
    c.agent_env.push(("AGENT_MODE".into(), "connect".into()));
    c
}

/// A build whose first attempt hangs and records its process group; later
/// attempts finish at once.
fn hanging_first_attempt(c: &Cluster) -> String {
    let dir = c.dir.path().display();
    c.commit_script(&format!(
        "echo $$ > {dir}/pid-$CI_BUILD_ATTEMPT\n\
         if [ \"$CI_BUILD_ATTEMPT\" = 1 ]; then sleep 30; fi\n\
         echo finished attempt $CI_BUILD_ATTEMPT\n"
    ))
}

/// Starts a build and waits until its first attempt's script runs.
async fn running(c: &Cluster, sha: &str) -> (BuildId, String, i32) {
    let id = c.api.create(sha).await.id;
    let pgid = wait_until("the build's script to run", LONG, || async { c.read_pid(1) }).await;
    let b = c.api.build(id).await.unwrap();
    (id, b.agent.expect("a running build has an agent"), pgid)
}

/// SIGKILL to an agent mid-build: its connection closes, and the build
/// runs again on the other agent at once, not after the lease (5 s here).
/// The bound is 1 s for a noisy machine; the bench reports the figure.
#[tokio::test]
async fn a_killed_agent_s_build_moves_at_once() {
    let mut c = connected(1000, 5);
    let sha = hanging_first_attempt(&c);
    c.start_server();
    c.start_agent("victim");
    let agents = c.wait_agents(1).await;
    assert!(agents[0].url.starts_with("connected://"), "{}", agents[0].url);
    let (id, victim_url, pgid) = running(&c, &sha).await;
    c.start_agent("rescuer");
    c.wait_agents(2).await;

    let killed = Instant::now();
    c.agents[0].signal(Signal::SIGKILL);
    let moved = c
        .api
        .wait_build(id, LONG, "attempt 2 running", |b| b.attempt.0 == 2)
        .await;
    let took = killed.elapsed();
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    eprintln!("SIGKILL to attempt 2 running: {took:?}");
    assert!(took < Duration::from_secs(1), "requeued after {took:?}");
    assert_ne!(moved.agent.as_deref(), Some(victim_url.as_str()));
    let done = c.api.wait_finished(id, LONG).await;
    assert_eq!((done.status, done.attempt.0), (BuildStatus::Success, 2));
    let log = c.api.log(id).await.unwrap();
    assert!(log.to_string().contains("finished attempt 2"), "{log}");
    // The dead agent is gone from the list; the rescuer stays.
    let left = c.wait_agents(1).await;
    assert_ne!(left[0].url, victim_url);
    c.assert_exactly_once(&[id]);
}

/// An agent SIGSTOPped with its connection open says nothing: it loses
/// the build when its lease lapses, as over HTTP, and its late work does
/// not count.
#[tokio::test]
async fn a_stopped_agent_loses_its_build_with_its_lease() {
    let mut c = connected(200, 3);
    let sha = hanging_first_attempt(&c);
    c.start_server();
    c.start_agent("sleeper");
    c.wait_agents(1).await;
    let (id, sleeper_url, pgid) = running(&c, &sha).await;
    c.start_agent("rescuer");
    c.wait_agents(2).await;

    c.agents[0].signal(Signal::SIGSTOP);
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGSTOP);
    let done = c
        .api
        .wait_build(id, LONG, "attempt 2 done", |b| {
            b.attempt.0 == 2 && b.status.is_finished()
        })
        .await;
    assert_eq!(done.status, BuildStatus::Success);
    assert_ne!(done.agent.as_deref(), Some(sleeper_url.as_str()));
    c.agents[0].signal(Signal::SIGCONT);
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGCONT);
    // It wakes, learns it lost the build, stops the work and comes back.
    wait_until("the sleeper to abandon its build", LONG, || async {
        c.agents[0].log().contains("build abandoned").then_some(())
    })
    .await;
    c.wait_agents(2).await;
    let b = c.api.build(id).await.unwrap();
    assert_eq!((b.status, b.attempt.0), (BuildStatus::Success, 2));
    c.assert_exactly_once(&[id]);
}

/// A stop shorter than the lease changes nothing for a connected agent:
/// its connection stays open, no requeue, attempt 1 finishes where it
/// started.
#[tokio::test]
async fn a_stop_shorter_than_the_lease_is_not_a_failure() {
    let mut c = connected(300, 5); // lease 1.5 s
    let dir = c.dir.path().display().to_string();
    let sha = c.commit_script(&format!(
        "echo $$ > {dir}/pid-$CI_BUILD_ATTEMPT; sleep 1; echo done"
    ));
    c.start_server();
    c.start_agent("napper");
    c.wait_agents(1).await;
    let (id, url, pgid) = running(&c, &sha).await;
    c.start_agent("idle");
    c.wait_agents(2).await;

    c.agents[0].signal(Signal::SIGSTOP);
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(600)).await; // the fault: a 600 ms freeze
    c.agents[0].signal(Signal::SIGCONT);
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGCONT);

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

/// The loopback address agent `url`'s connection comes from, as the
/// server sees it.
async fn address_of(c: &Cluster, url: &str) -> String {
    let agents = c.api.agents().await.unwrap();
    let agent = agents.iter().find(|a| a.url == url).expect("the agent is listed");
    agent
        .address
        .clone()
        .expect("a connected agent's address is known")
}

/// The server's `ci_agent_connections`.
async fn open_connections(c: &Cluster) -> Option<u64> {
    let text = c
        .api
        .http
        .get(c.api.url("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("ci_agent_connections "))
        .and_then(|v| v.trim().parse().ok())
}

/// A partition shorter than the lease (packets to and from the agent's
/// address dropped): the connection survives it, no requeue, attempt 1
/// finishes where it started.
#[tokio::test]
async fn a_partition_shorter_than_the_lease_changes_nothing() {
    if !partitions_or_skip() {
        return;
    }
    let mut c = connected(400, 5); // lease 2 s
    let sha = c.commit_script("sleep 2; echo done");
    c.start_server();
    c.start_agent_at("cut-off", &agent_ip());
    c.start_agent_at("other", &agent_ip());
    c.wait_agents(2).await;
    let id = c.api.create(&sha).await.id;
    let b = c
        .api
        .wait_build(id, LONG, "running", |b| b.status == BuildStatus::Running)
        .await;
    let url = b.agent.unwrap();
    let ip = address_of(&c, &url).await;
    assert_ne!(ip, "127.0.0.1", "the agent connects from its own address");

    let cut = Partition::cut(&ip);
    tokio::time::sleep(Duration::from_millis(700)).await; // the fault: 700 ms without a network
    drop(cut);

    let b = c.api.wait_finished(id, LONG).await;
    assert_eq!((b.status, b.attempt.0), (BuildStatus::Success, 1), "no requeue");
    assert_eq!(b.agent.as_deref(), Some(url.as_str()));
    assert_eq!(c.api.agents().await.unwrap().len(), 2);
    c.assert_exactly_once(&[id]);
}

/// A partition longer than the lease: the connection stays open but
/// silent, so the build moves when the lease lapses, and after two leases
/// the server closes the connection; when the network heals, the cut-off
/// agent learns its attempt was superseded, stops its copy and comes back.
#[tokio::test]
async fn a_partition_longer_than_the_lease_moves_the_build() {
    if !partitions_or_skip() {
        return;
    }
    let mut c = connected(200, 3); // lease 600 ms
    let sha = hanging_first_attempt(&c);
    c.start_server();
    c.start_agent_at("cut-off", &agent_ip());
    c.wait_agents(1).await;
    let (id, url, pgid) = running(&c, &sha).await;
    let ip = address_of(&c, &url).await;
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
    assert_ne!(done.agent.as_deref(), Some(url.as_str()));
    // Silent for two leases: the server lets the connection go (a host
    // that died without a FIN would otherwise hold its socket forever).
    wait_until("the server to close the silent connection", LONG, || async {
        (open_connections(&c).await == Some(1)).then_some(())
    })
    .await;
    drop(cut);

    wait_until("the cut-off agent to abandon its copy", LONG, || async {
        c.agents[0].log().contains("build abandoned").then_some(())
    })
    .await;
    wait_until("its work to stop", Duration::from_secs(10), || async {
        (!ci_testkit::alive(pgid)).then_some(())
    })
    .await;
    c.wait_agents(2).await;
    let b = c.api.build(id).await.unwrap();
    assert_eq!((b.status, b.attempt.0), (BuildStatus::Success, 2));
    let log = c.api.log(id).await.unwrap().to_string();
    assert!(!log.contains("finished attempt 1"), "{log}");
    c.assert_exactly_once(&[id]);
}

/// The server is SIGKILLed while a build runs; the build finishes while
/// no server is up, and its result waits in the agent's spool. The
/// restarted server still knows the agent: the agent says who it is over
/// its new connection, the result is delivered, and the attempt counts.
#[tokio::test]
async fn a_result_finished_while_the_server_is_down_arrives_over_the_next_connection() {
    let mut c = connected(300, 10); // lease 3 s
    let dir = c.dir.path().display().to_string();
    let sha = c.commit_script(&format!(
        "echo $$ > {dir}/pid-$CI_BUILD_ATTEMPT\n\
         while [ ! -e {dir}/go ]; do sleep 0.05; done\n\
         echo delivered later\n"
    ));
    c.start_server();
    c.start_agent("keeper");
    c.wait_agents(1).await;
    let (id, _, _) = running(&c, &sha).await;

    c.kill_server();
    std::fs::write(c.dir.path().join("go"), "").unwrap();
    wait_until("the result to be spooled and refused delivery", LONG, || async {
        c.agents[0].log().contains("build finished").then_some(())
    })
    .await;
    c.start_server();
    c.wait_server().await;
    let done = c.api.wait_finished(id, LONG).await;
    assert_eq!((done.status, done.attempt.0), (BuildStatus::Success, 1));
    let log = c.api.log(id).await.unwrap();
    assert!(log.to_string().contains("delivered later"), "{log}");
    assert!(
        c.agents[0].log().contains("the server still knows this agent"),
        "the agent did not register again"
    );
    // And it takes builds over its new connection.
    let next = c.api.create(&c.commit_script("echo again")).await.id;
    let again = c.api.wait_finished(next, LONG).await;
    assert_eq!(again.status, BuildStatus::Success);
    c.assert_exactly_once(&[id, next]);
}

/// A wrong token: the server answers the connection 401 with a JSON
/// message, and the agent says so at WARN and never registers.
#[tokio::test]
async fn a_wrong_token_is_refused() {
    let mut c = connected(1000, 5);
    c.agent_token = Some("right-token-0123456789".into());
    c.start_server();
    c.wait_server().await;
    let resp = c
        .api
        .http
        .get(c.api.url("/agent/connect"))
        .bearer_auth("wrong")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("AGENT_TOKEN"), "{body}");

    c.agent_token = Some("wrong-token-0123456789".into());
    c.start_agent("intruder");
    wait_until("the agent to say it is refused", LONG, || async {
        c.agents[0]
            .log()
            .contains("refused this agent's token")
            .then_some(())
    })
    .await;
    assert!(c.api.agents().await.unwrap().is_empty());
}

/// An agent that registers with the shared token gets its own, kept in its
/// work directory (0600, never stored by the server) and used from then
/// on: it connects even after the shared token it was started with is
/// wrong. `GET /api/agents` shows its version, address and credential.
/// `DELETE /api/agents/{id}` revokes it: its connection closes, its build
/// moves to another agent at once, and it cannot connect again.
#[tokio::test]
async fn agents_get_their_own_token_and_a_revoked_one_is_shut_out() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = connected(1000, 5);
    c.agent_token = Some("shared-token-0123456789".into());
    let sha = hanging_first_attempt(&c);
    c.start_server();
    c.start_agent("own");
    let first = c.wait_agents(1).await;
    let credential = first[0].credential.expect("a credential was issued");
    assert!(first[0].connected);
    assert_eq!(first[0].address.as_deref(), Some("127.0.0.1"));
    assert_eq!(first[0].version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    let file = c.dir.path().join("own/credential");
    let token = wait_until("the credential file", LONG, || async {
        std::fs::read_to_string(&file).ok().filter(|t| !t.is_empty())
    })
    .await;
    assert_ne!(token, "shared-token-0123456789");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Started again with a wrong shared token: its own still lets it in.
    c.agents[0].signal(Signal::SIGKILL);
    c.wait_agents(0).await;
    c.agent_token = Some("no-longer-the-token-0123".into());
    c.start_agent("own");
    let again = c.wait_agents(1).await;
    assert_eq!(again[0].credential, Some(credential));
    let (id, own_url, pgid) = running(&c, &sha).await;
    assert_eq!(own_url, again[0].url);

    // Revoked: the build moves at once, and the agent stays out.
    let unknown = c
        .api
        .http
        .delete(c.api.url("/api/agents/999999"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let revoked = Instant::now();
    let resp = c
        .api
        .http
        .delete(c.api.url(&format!("/api/agents/{}", again[0].id)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["revoked"], credential);
    let requeued = c
        .api
        .wait_build(id, LONG, "requeued", |b| b.status == BuildStatus::Queued)
        .await;
    assert!(
        revoked.elapsed() < Duration::from_secs(1),
        "{:?}",
        revoked.elapsed()
    );
    assert_eq!(requeued.attempt.0, 1);
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    wait_until("the revoked agent to be refused", LONG, || async {
        c.agents[1].log().contains("revoked?").then_some(())
    })
    .await;
    assert!(c.api.agents().await.unwrap().is_empty());

    c.agent_token = Some("shared-token-0123456789".into());
    c.start_agent("rescuer");
    let done = c.api.wait_finished(id, LONG).await;
    assert_eq!((done.status, done.attempt.0), (BuildStatus::Success, 2));
    assert_eq!(c.api.agents().await.unwrap().len(), 1);
    // The server keeps the token's digest, never the token.
    let db = std::fs::read(c.db_path()).unwrap();
    let wal = std::fs::read(c.db_path().with_extension("sqlite-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(!bytes.windows(token.len()).any(|w| w == token.as_bytes()));
    }
    c.assert_exactly_once(&[id]);
}

/// The server is SIGKILLed and restarted while 50 connected agents each
/// run a build. Every agent comes back over a new connection without
/// registering again, every result (finished while the server was down
/// or after) is delivered, every build counts its first attempt, once.
#[tokio::test]
async fn fifty_connected_agents_come_back_after_a_server_restart() {
    let mut c = connected(1000, 10); // lease 10 s
    let dir = c.dir.path().display().to_string();
    let sha = c.commit_script(&format!(
        "touch {dir}/ran-$CI_BUILD_ID-$CI_BUILD_ATTEMPT\n\
         while [ ! -e {dir}/go ]; do sleep 0.05; done\n\
         echo done $CI_BUILD_ID\n"
    ));
    c.start_server();
    for i in 0..50 {
        c.start_agent(&format!("fleet{i}"));
    }
    let before: std::collections::BTreeSet<_> = c.wait_agents(50).await.into_iter().map(|a| a.id).collect();
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(c.api.create(&sha).await.id);
    }
    wait_until("50 builds running on the agents", LONG, || async {
        let ran = std::fs::read_dir(c.dir.path())
            .ok()?
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("ran-"))
            })
            .count();
        (ran == 50).then_some(())
    })
    .await;

    c.kill_server();
    // They finish while the server is down, or just after it is back.
    std::fs::write(c.dir.path().join("go"), "").unwrap();
    c.start_server();
    c.wait_server().await;
    for id in &ids {
        let b = c.api.wait_finished(*id, LONG).await;
        assert_eq!((b.status, b.attempt.0), (BuildStatus::Success, 1), "build {id}");
    }
    let after: std::collections::BTreeSet<_> = c.wait_agents(50).await.into_iter().map(|a| a.id).collect();
    assert_eq!(before, after, "every agent came back as itself");
    let again = c.api.agents().await.unwrap();
    assert!(again.iter().all(|a| a.connected), "all connected again");
    c.assert_exactly_once(&ids);
}
