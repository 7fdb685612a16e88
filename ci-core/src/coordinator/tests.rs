use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::clock::ManualClock;
use crate::model::{Attempt, BuildId, BuildStatus, Completion, Labels, NewBuild, StepId, StepStatus};
use crate::model::{CommitRef, RepoUrl};
use crate::pool::Enrollment;
use crate::scheduler::{Assignment, MockScheduler};
use crate::store::{Agents, Builds, FaultyStore, Logs, MemoryStore, Op};

struct Fixture {
    clock: Arc<ManualClock>,
    store: Arc<MemoryStore>,
    c: Coordinator,
}

fn policy() -> LeasePolicy {
    LeasePolicy::new(Duration::from_millis(100), 3).unwrap()
}

async fn fixture() -> Fixture {
    let clock = Arc::new(ManualClock::new(Timestamp(1_000_000)));
    let store = Arc::new(MemoryStore::new());
    let c = Coordinator::builder(store.clone())
        .clock(clock.clone())
        .lease(policy())
        .build()
        .await
        .unwrap();
    Fixture { clock, store, c }
}

fn new_build(cmd: &str) -> NewBuild {
    NewBuild::new(
        RepoUrl::parse("/srv/repo").unwrap(),
        CommitRef::parse("abc123").unwrap(),
        cmd,
    )
    .unwrap()
}

async fn step_of(store: &dyn Store, id: BuildId) -> StepId {
    store.build(id).await.unwrap().unwrap().steps[0].id
}

fn done(code: i32, out: &str) -> Completion {
    Completion {
        exit_code: code,
        stdout: out.into(),
        stderr: String::new(),
    }
}

fn report(d: &Dispatch, code: i32) -> Report {
    Report {
        step: d.step.id,
        attempt: Some(d.step.attempt),
        agent: Some(d.agent),
        verified: false,
        completion: done(code, "out"),
    }
}

impl Fixture {
    async fn status(&self, id: BuildId) -> BuildStatus {
        self.store.build(id).await.unwrap().unwrap().status
    }

    /// The one step of build `id`.
    async fn step_of(&self, id: BuildId) -> StepId {
        step_of(&*self.store, id).await
    }

    fn advance(&self, ms: u64) {
        self.clock.advance(Duration::from_millis(ms));
    }
}

#[tokio::test]
async fn n_agents_run_n_of_m_builds_then_pick_up_the_rest() {
    let mut f = fixture().await;
    let a = f.c.register_agent("http://a:1").await.unwrap().id;
    let b = f.c.register_agent("http://b:1").await.unwrap().id;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(f.c.submit(&new_build(&format!("c{i}"))).await.unwrap().id);
    }

    let first = f.c.plan().await.unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(first[0].step.build, ids[0], "oldest first");
    assert_eq!(first[1].step.build, ids[1]);
    let agents: Vec<_> = first.iter().map(|d| d.agent).collect();
    assert!(agents.contains(&a) && agents.contains(&b));
    assert!(first.iter().all(|d| d.step.attempt == Attempt(1)));
    assert!(f.c.plan().await.unwrap().is_empty(), "no agent is free");

    f.c.complete(report(&first[0], 0)).await.unwrap();
    let next = f.c.plan().await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!((next[0].step.build, next[0].agent), (ids[2], first[0].agent));
    assert_eq!(f.status(ids[0]).await, BuildStatus::Success);
}

#[tokio::test]
async fn dispatch_request_carries_the_attempt() {
    let mut f = fixture().await;
    f.c.register_agent("http://a:1").await.unwrap();
    f.c.submit(&new_build("make")).await.unwrap();
    let d = f.c.plan().await.unwrap().remove(0);
    let req = d.request();
    assert_eq!((req.command.as_str(), req.hash.as_str()), ("make", "abc123"));
    assert_eq!(req.attempt, Some(Attempt(1)));
    assert_eq!(d.agent_url, "http://a:1");
}

#[tokio::test]
async fn heartbeats_keep_the_lease_and_silence_requeues_with_a_new_attempt() {
    let mut f = fixture().await;
    let a = f.c.register_agent("http://a:1").await.unwrap().id;
    let id = f.c.submit(&new_build("sleep")).await.unwrap().id;
    let step = f.step_of(id).await;
    let d1 = f.c.plan().await.unwrap().remove(0);

    for _ in 0..10 {
        f.advance(100);
        let hb = Heartbeat {
            step: Some(step),
            attempt: Some(Attempt(1)),
            agent: Some(a),
            verified: false,
        };
        f.c.heartbeat(hb).await.unwrap();
        assert_eq!(f.c.expire().await.unwrap(), 0, "a live agent is never expired");
    }
    assert_eq!(
        f.c.next_deadline().await.unwrap(),
        Some(f.clock.now().plus(policy().ttl()))
    );

    f.advance(299);
    assert_eq!(f.c.expire().await.unwrap(), 0);
    f.advance(1);
    assert_eq!(
        f.c.expire().await.unwrap(),
        1,
        "lease lapsed after missed * interval"
    );
    assert_eq!(f.status(id).await, BuildStatus::Queued);
    assert!(
        f.c.agents().await.unwrap().is_empty(),
        "the dead agent is dropped"
    );
    let events = f.c.take_events();
    assert!(events.contains(&Event::Requeued {
        step,
        attempt: Attempt(1)
    }));
    assert!(events.contains(&Event::AgentLeft {
        agent: a,
        reason: LeaveReason::MissedHeartbeats
    }));

    let b = f.c.register_agent("http://b:1").await.unwrap().id;
    let d2 = f.c.plan().await.unwrap().remove(0);
    assert_eq!((d2.step.build, d2.step.attempt, d2.agent), (id, Attempt(2), b));

    // The zombie of attempt 1 is fenced out, on heartbeats and on results.
    let zombie_hb = Heartbeat {
        step: Some(step),
        attempt: Some(Attempt(1)),
        agent: Some(a),
        verified: false,
    };
    assert!(matches!(
        f.c.heartbeat(zombie_hb).await,
        Err(Error::Superseded { .. })
    ));
    assert!(matches!(
        f.c.complete(report(&d1, 0)).await,
        Err(Error::Superseded { .. })
    ));
    assert_eq!(f.status(id).await, BuildStatus::Running);

    f.c.complete(report(&d2, 1)).await.unwrap();
    assert_eq!(f.status(id).await, BuildStatus::Failed);
    assert!(matches!(
        f.c.complete(report(&d1, 0)).await,
        Err(Error::Superseded { .. })
    ));
}

#[tokio::test]
async fn late_result_of_the_only_attempt_is_kept_if_not_redispatched() {
    let mut f = fixture().await;
    // Proven by its session secret, which outlives the agent's lease.
    f.c.register_agent_with_secret("http://a:1", "secret-a".into(), None)
        .await
        .unwrap();
    let id = f.c.submit(&new_build("x")).await.unwrap().id;
    let d = f.c.plan().await.unwrap().remove(0);
    f.advance(300);
    f.c.expire().await.unwrap();
    assert_eq!(f.status(id).await, BuildStatus::Queued);
    assert_eq!(f.c.agent_by_secret("secret-a").await.unwrap(), Some(d.agent));
    let mut late = report(&d, 0);
    late.verified = true;
    let got = f.c.complete(late).await.unwrap();
    assert!(matches!(got, Accepted::Finished(s) if s.status == StepStatus::Success));
    f.c.register_agent("http://b:1").await.unwrap();
    assert!(
        f.c.plan().await.unwrap().is_empty(),
        "finished builds are not dispatched"
    );
}

#[tokio::test]
async fn a_requeued_build_takes_no_result_from_anyone_but_its_proven_agent() {
    let mut f = fixture().await;
    f.c.register_agent_with_secret("http://a:1", "secret-a".into(), None)
        .await
        .unwrap();
    let id = f.c.submit(&new_build("x")).await.unwrap().id;
    let d = f.c.plan().await.unwrap().remove(0);
    f.advance(300);
    f.c.expire().await.unwrap();
    assert_eq!(f.status(id).await, BuildStatus::Queued);
    // A token holder claiming to be the agent, without its secret.
    assert!(matches!(
        f.c.complete(report(&d, 0)).await,
        Err(Error::Conflict(_))
    ));
    // Another agent, proven, but not the one that held the attempt.
    let b =
        f.c.register_agent_with_secret("http://b:1", "secret-b".into(), None)
            .await
            .unwrap()
            .id;
    let mut forged = report(&d, 0);
    (forged.agent, forged.verified) = (Some(b), true);
    assert!(matches!(f.c.complete(forged).await, Err(Error::Conflict(_))));
    assert_ne!(f.status(id).await, BuildStatus::Success);
}

#[tokio::test]
async fn a_live_session_cannot_be_taken_over_without_its_secret() {
    let mut f = fixture().await;
    let a =
        f.c.register_agent_with_secret("http://a:1", "secret-a".into(), None)
            .await
            .unwrap()
            .id;
    f.c.submit(&new_build("x")).await.unwrap();
    let d = f.c.plan().await.unwrap().remove(0);
    assert_eq!(d.agent, a);
    // Someone else registers the same URL: refused while the lease lives.
    assert!(matches!(
        f.c.register_agent_with_secret("http://a:1", "evil".into(), None)
            .await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        f.c.register_agent_with_secret("http://a:1", "evil".into(), Some("guess"))
            .await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(
        f.c.lease(d.step.id).await.unwrap().map(|l| l.agent),
        Some(a),
        "the build stays put"
    );
    // The agent itself, restarted, proves it and takes over at once.
    let a2 =
        f.c.register_agent_with_secret("http://a:1", "secret-a2".into(), Some("secret-a"))
            .await
            .unwrap()
            .id;
    assert_ne!(a2, a);
    // Once the session has lapsed, anyone may have the URL.
    f.advance(300);
    assert!(f
        .c
        .register_agent_with_secret("http://a:1", "x".into(), None)
        .await
        .is_ok());
}

#[tokio::test]
async fn results_finish_once_and_identical_repeats_are_noops() {
    let mut f = fixture().await;
    f.c.register_agent("http://a:1").await.unwrap();
    let id = f.c.submit(&new_build("x")).await.unwrap().id;
    let d = f.c.plan().await.unwrap().remove(0);
    assert!(matches!(
        f.c.complete(report(&d, 0)).await,
        Ok(Accepted::Finished(_))
    ));
    assert!(matches!(
        f.c.complete(report(&d, 0)).await,
        Ok(Accepted::Duplicate(_))
    ));
    let mut other = report(&d, 0);
    other.completion.stdout = "different".into();
    assert!(matches!(f.c.complete(other).await, Err(Error::Conflict(_))));
    assert_eq!(
        f.store
            .log(f.step_of(id).await, None)
            .await
            .unwrap()
            .unwrap()
            .stdout,
        "out"
    );
    let finished =
        f.c.take_events()
            .iter()
            .filter(|e| matches!(e, Event::Finished { .. }))
            .count();
    assert_eq!(finished, 1);
}

#[tokio::test]
async fn original_protocol_without_attempt_or_agent_works() {
    let mut f = fixture().await;
    f.c.register_agent("http://a:1").await.unwrap();
    let id = f.c.submit(&new_build("x")).await.unwrap().id;
    let step = f.step_of(id).await;
    f.c.plan().await.unwrap();
    f.c.heartbeat(Heartbeat {
        step: Some(step),
        ..Heartbeat::default()
    })
    .await
    .unwrap();
    let r = Report {
        step,
        attempt: None,
        agent: None,
        verified: false,
        completion: done(0, ""),
    };
    f.c.complete(r.clone()).await.unwrap();
    assert!(matches!(f.c.complete(r).await, Ok(Accepted::Duplicate(_))));
}

#[tokio::test]
async fn unknown_and_idle_builds_are_reported_as_such() {
    let mut f = fixture().await;
    let hb = |id| Heartbeat {
        step: Some(id),
        ..Heartbeat::default()
    };
    assert!(matches!(
        f.c.heartbeat(hb(StepId(42))).await,
        Err(Error::StepNotFound(_))
    ));
    let id = f.c.submit(&new_build("x")).await.unwrap().id;
    let step = f.step_of(id).await;
    assert!(matches!(
        f.c.heartbeat(hb(step)).await,
        Err(Error::NotRunning { .. })
    ));
    let r = Report {
        step,
        attempt: None,
        agent: None,
        verified: false,
        completion: done(0, ""),
    };
    assert!(
        matches!(f.c.complete(r).await, Err(Error::Conflict(_))),
        "never dispatched"
    );
    let ping = Heartbeat {
        agent: Some(AgentId(9)),
        ..Heartbeat::default()
    };
    assert!(matches!(f.c.heartbeat(ping).await, Err(Error::AgentNotFound(_))));
    assert!(matches!(
        f.c.heartbeat(Heartbeat::default()).await,
        Err(Error::Invalid { .. })
    ));
}

#[tokio::test]
async fn another_agent_cannot_speak_for_a_lease() {
    let mut f = fixture().await;
    let a = f.c.register_agent("http://a:1").await.unwrap().id;
    let b = f.c.register_agent("http://b:1").await.unwrap().id;
    f.c.submit(&new_build("x")).await.unwrap();
    let d = f.c.plan().await.unwrap().remove(0);
    let other = if d.agent == a { b } else { a };
    let hb = Heartbeat {
        step: Some(d.step.id),
        attempt: Some(d.step.attempt),
        agent: Some(other),
        verified: false,
    };
    assert!(matches!(f.c.heartbeat(hb).await, Err(Error::Conflict(_))));
    let mut r = report(&d, 0);
    r.agent = Some(other);
    assert!(matches!(f.c.complete(r).await, Err(Error::Conflict(_))));
    assert_eq!(f.status(d.step.build).await, BuildStatus::Running);
}

#[tokio::test]
async fn reregistering_at_the_same_url_requeues_what_the_old_process_held() {
    let mut f = fixture().await;
    let old = f.c.register_agent("http://a:1").await.unwrap().id;
    let id = f.c.submit(&new_build("x")).await.unwrap().id;
    f.c.plan().await.unwrap();
    let new = f.c.register_agent("http://a:1").await.unwrap().id;
    assert_ne!(old, new);
    assert_eq!(f.status(id).await, BuildStatus::Queued, "not stuck running");
    let d = f.c.plan().await.unwrap().remove(0);
    assert_eq!((d.agent, d.step.attempt), (new, Attempt(2)));
    assert_eq!(f.c.agents().await.unwrap().len(), 1);
}

#[tokio::test]
async fn unreachable_agents_are_dropped_and_rejected_builds_fail() {
    let mut f = fixture().await;
    f.c.register_agent("http://a:1").await.unwrap();
    let id = f.c.submit(&new_build("x")).await.unwrap().id;
    let d = f.c.plan().await.unwrap().remove(0);
    f.c.dispatch_failed(&d, DispatchFailure::Unreachable("refused".into()))
        .await
        .unwrap();
    assert_eq!(f.status(id).await, BuildStatus::Queued);
    assert!(f.c.agents().await.unwrap().is_empty());

    f.c.register_agent("http://b:1").await.unwrap();
    let d = f.c.plan().await.unwrap().remove(0);
    f.c.dispatch_failed(&d, DispatchFailure::Rejected("bad repo".into()))
        .await
        .unwrap();
    let b = f.store.build(id).await.unwrap().unwrap();
    assert_eq!(
        (b.status, b.exit_code),
        (BuildStatus::Failed, Some(Completion::NOT_RUN))
    );
    assert!(f
        .store
        .log(f.step_of(id).await, None)
        .await
        .unwrap()
        .unwrap()
        .stderr
        .contains("bad repo"));
    assert_eq!(
        f.c.agents().await.unwrap().len(),
        1,
        "the agent that refused stays"
    );
    assert!(f.c.agents().await.unwrap()[0].is_idle());
}

#[tokio::test]
async fn pinging_agents_that_fall_silent_are_dropped_but_original_ones_are_not() {
    let mut f = fixture().await;
    let pinger = f.c.register_agent("http://a:1").await.unwrap().id;
    let original = f.c.register_agent("http://b:1").await.unwrap().id;
    f.c.heartbeat(Heartbeat {
        agent: Some(pinger),
        ..Heartbeat::default()
    })
    .await
    .unwrap();
    f.advance(1000);
    assert_eq!(f.c.expire().await.unwrap(), 1);
    let left: Vec<_> = f.c.agents().await.unwrap().iter().map(|a| a.id).collect();
    assert_eq!(left, vec![original]);
}

#[tokio::test]
async fn an_agent_that_says_it_pings_is_dropped_if_it_never_does() {
    let mut f = fixture().await;
    let frozen = Enrollment {
        pings: true,
        ..Enrollment::new("http://a:1")
    };
    f.c.register(frozen, None).await.unwrap();
    let original = f.c.register_agent("http://b:1").await.unwrap().id;
    assert_eq!(
        f.c.next_deadline().await.unwrap(),
        Some(f.clock.now().plus(policy().ttl()))
    );
    f.advance(299);
    assert_eq!(f.c.expire().await.unwrap(), 0);
    f.advance(1);
    assert_eq!(f.c.expire().await.unwrap(), 1);
    let left: Vec<_> = f.c.agents().await.unwrap().iter().map(|a| a.id).collect();
    assert_eq!(left, vec![original]);
}

#[tokio::test]
async fn recovery_restores_leases_and_requeues_orphans() {
    let mut f = fixture().await;
    f.c.register_agent("http://a:1").await.unwrap();
    let b = f.c.register_agent("http://b:1").await.unwrap().id;
    let x = f.c.submit(&new_build("x")).await.unwrap().id;
    let y = f.c.submit(&new_build("y")).await.unwrap().id;
    f.c.submit(&new_build("z")).await.unwrap();
    let ds = f.c.plan().await.unwrap();
    assert_eq!(ds.len(), 2);
    // The agent holding y vanished from the store while the server was down.
    let y_agent = ds.iter().find(|d| d.step.build == y).unwrap().agent;
    f.store.remove_agent(y_agent).await.unwrap();

    f.advance(250);
    let mut c2 = Coordinator::builder(f.store.clone())
        .clock(f.clock.clone())
        .lease(policy())
        .build()
        .await
        .unwrap();
    assert_eq!(f.status(x).await, BuildStatus::Running);
    assert_eq!(f.status(y).await, BuildStatus::Queued, "its agent is gone");
    let lease = c2.lease(f.step_of(x).await).await.unwrap().unwrap();
    assert_eq!(
        lease.expires_at,
        f.clock.now().plus(policy().ttl()),
        "a fresh lease"
    );
    assert_eq!(c2.agents().await.unwrap().len(), 1);
    // The surviving agent is busy with x, so nothing is dispatched...
    assert!(c2.plan().await.unwrap().is_empty() || b == y_agent);
    // ...and numbering continues.
    assert!(c2.submit(&new_build("w")).await.unwrap().id.0 > 3);
}

#[tokio::test]
async fn the_coordinator_enforces_capacity_whatever_the_policy_proposes() {
    let clock = Arc::new(ManualClock::new(Timestamp(0)));
    let store = Arc::new(MemoryStore::new());
    let mut policy = MockScheduler::new();
    policy.expect_window().returning(|free| free);
    policy.expect_assign().returning(|queued, free| {
        // A buggy policy: every build to the first agent, the first build twice.
        let mut v: Vec<_> = queued
            .iter()
            .map(|b| Assignment {
                step: b.id,
                agent: free[0].agent,
            })
            .collect();
        v.push(Assignment {
            step: queued[0].id,
            agent: free[free.len() - 1].agent,
        });
        v
    });
    let mut c = Coordinator::builder(store.clone())
        .clock(clock)
        .scheduler(policy)
        .build()
        .await
        .unwrap();
    c.register_agent("http://a:1").await.unwrap();
    c.register_agent("http://b:1").await.unwrap();
    for _ in 0..3 {
        c.submit(&new_build("x")).await.unwrap();
    }
    let ds = c.plan().await.unwrap();
    assert_eq!(ds.len(), 1, "one build per agent, each build once: {ds:?}");
    for a in c.agents().await.unwrap() {
        assert!(a.running.len() <= a.capacity as usize);
    }
}

#[tokio::test]
async fn a_failing_store_changes_nothing_in_memory() {
    let fail = Arc::new(AtomicBool::new(false));
    let failing = fail.clone();
    let store = Arc::new(FaultyStore::new(Arc::new(MemoryStore::new()), move |op| {
        matches!(op, Op::Start(_)) && failing.load(Ordering::SeqCst)
    }));
    let mut c = Coordinator::builder(store.clone()).build().await.unwrap();
    c.register_agent("http://a:1").await.unwrap();
    let id = c.submit(&new_build("x")).await.unwrap().id;
    fail.store(true, Ordering::SeqCst);
    let err = c.plan().await.unwrap_err();
    assert!(err.is_retryable());
    assert!(c.lease(step_of(&*store, id).await).await.unwrap().is_none());
    assert!(
        c.agents().await.unwrap()[0].is_idle(),
        "no slot is taken by a dispatch that did not happen"
    );
}

/// Bug: a store error in the middle of a scheduling pass stranded the
/// attempts the pass had already started: running in the store and leased,
/// but never sent, so a healthy agent was dropped a lease later. A pass
/// now starts its attempts in one store step: a store that fails on the
/// second start starts none.
#[tokio::test]
async fn a_store_failing_mid_pass_strands_no_attempt() {
    let clock = Arc::new(ManualClock::new(Timestamp(1_000_000)));
    let fail = Arc::new(AtomicBool::new(false));
    let failing = fail.clone();
    // Fails when asked to start a second build, as a transaction that
    // fails half way rolls back.
    let store = Arc::new(FaultyStore::new(Arc::new(MemoryStore::new()), move |op| {
        matches!(op, Op::Start(n) if n >= 2) && failing.load(Ordering::SeqCst)
    }));
    let mut c = Coordinator::builder(store.clone())
        .clock(clock.clone())
        .lease(policy())
        .build()
        .await
        .unwrap();
    let a = c.register_agent("http://a:1").await.unwrap().id;
    let b = c.register_agent("http://b:1").await.unwrap().id;
    let x = c.submit(&new_build("x")).await.unwrap().id;
    let y = c.submit(&new_build("y")).await.unwrap().id;
    fail.store(true, Ordering::SeqCst);
    assert!(c.plan().await.is_err());
    for id in [x, y] {
        assert_eq!(
            store.build(id).await.unwrap().map(|b| b.status),
            Some(BuildStatus::Queued),
            "build {id} was not started behind anyone's back"
        );
    }
    // A lease later, both agents are still there, and the next pass (the
    // store recovered) starts both builds, each once.
    clock.advance(policy().ttl());
    assert_eq!(c.expire().await.unwrap(), 0, "no healthy agent is dropped");
    fail.store(false, Ordering::SeqCst);
    let ds = c.plan().await.unwrap();
    let mut started: Vec<(BuildId, AgentId)> = ds.iter().map(|d| (d.step.build, d.agent)).collect();
    started.sort();
    assert_eq!(started.len(), 2);
    assert!(started.iter().all(|(_, agent)| *agent == a || *agent == b));
    assert!(ds.iter().all(|d| d.step.attempt == Attempt(1)));
}

#[tokio::test]
async fn agents_with_a_session_secret_cannot_be_spoken_for() {
    let mut f = fixture().await;
    let a =
        f.c.register_agent_with_secret("http://a:1", "secret-a".into(), None)
            .await
            .unwrap()
            .id;
    f.c.submit(&new_build("x")).await.unwrap();
    let d = f.c.plan().await.unwrap().remove(0);
    assert_eq!(f.c.agent_by_secret("secret-a").await.unwrap(), Some(a));
    assert_eq!(f.c.agent_by_secret("secret-b").await.unwrap(), None);

    // Claiming the agent's id, or saying nothing, is not enough.
    for (agent, verified) in [(Some(a), false), (None, false), (None, true)] {
        let hb = Heartbeat {
            step: Some(d.step.id),
            attempt: Some(d.step.attempt),
            agent,
            verified,
        };
        assert!(
            matches!(f.c.heartbeat(hb).await, Err(Error::Unauthenticated(_))),
            "{agent:?} {verified}"
        );
        let mut r = report(&d, 0);
        r.agent = agent;
        r.verified = verified;
        assert!(matches!(f.c.complete(r).await, Err(Error::Unauthenticated(_))));
        let ping = Heartbeat {
            agent: Some(a),
            verified,
            ..Heartbeat::default()
        };
        if !verified {
            assert!(matches!(
                f.c.heartbeat(ping).await,
                Err(Error::Unauthenticated(_))
            ));
        }
    }
    assert_eq!(f.status(d.step.build).await, BuildStatus::Running);

    let hb = Heartbeat {
        step: Some(d.step.id),
        attempt: Some(d.step.attempt),
        agent: Some(a),
        verified: true,
    };
    f.c.heartbeat(hb).await.unwrap();
    let mut r = report(&d, 0);
    r.verified = true;
    f.c.complete(r).await.unwrap();
    assert_eq!(f.status(d.step.build).await, BuildStatus::Success);

    // Secrets survive a restart.
    let c2 = Coordinator::builder(f.store.clone())
        .clock(f.clock.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(c2.agent_by_secret("secret-a").await.unwrap(), Some(a));
}

#[tokio::test]
async fn cancel_queued_at_once_and_running_after_the_agent_stops() {
    let mut f = fixture().await;
    let a = f.c.register_agent("http://a:1").await.unwrap().id;
    let running = f.c.submit(&new_build("r")).await.unwrap().id;
    let d = f.c.plan().await.unwrap().remove(0);
    let queued = f.c.submit(&new_build("q")).await.unwrap().id;

    let c = f.c.cancel(queued).await.unwrap();
    assert_eq!((c.build.status, c.stops.len()), (BuildStatus::Canceled, 0));
    let mut stops = f.c.cancel(running).await.unwrap().stops;
    let order = stops.pop().unwrap();
    assert!(stops.is_empty());
    let step = f.step_of(running).await;
    assert_eq!((order.agent, order.step, order.attempt), (a, step, Attempt(1)));
    assert_eq!(f.status(running).await, BuildStatus::Canceled);
    assert!(f.c.lease(step).await.unwrap().is_none());
    let another = f.c.submit(&new_build("next")).await.unwrap().id;
    assert!(
        f.c.plan().await.unwrap().is_empty(),
        "the slot stays taken until the agent has stopped"
    );
    f.c.stop_delivered(&order, Stopped::Yes).await.unwrap();
    let next = f.c.plan().await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].step.build, another);

    // A late result and heartbeat of the canceled attempt change nothing.
    assert!(matches!(
        f.c.complete(report(&d, 0)).await,
        Err(Error::Conflict(_))
    ));
    let hb = Heartbeat {
        step: Some(step),
        attempt: Some(Attempt(1)),
        agent: Some(a),
        verified: false,
    };
    assert!(matches!(f.c.heartbeat(hb).await, Err(Error::NotRunning { .. })));
    assert!(
        matches!(f.c.cancel(running).await, Err(Error::Conflict(_))),
        "once"
    );
}

#[tokio::test]
async fn an_unreachable_stop_drops_the_agent_and_a_leaving_agent_hands_back_its_build() {
    let mut f = fixture().await;
    f.c.register_agent("http://a:1").await.unwrap();
    let x = f.c.submit(&new_build("x")).await.unwrap().id;
    f.c.plan().await.unwrap();
    let Some(order) = f.c.cancel(x).await.unwrap().stops.pop() else {
        panic!()
    };
    f.c.stop_delivered(&order, Stopped::Unreachable).await.unwrap();
    assert!(f.c.agents().await.unwrap().is_empty());

    let b =
        f.c.register_agent_with_secret("http://b:1", "s".into(), None)
            .await
            .unwrap()
            .id;
    let y = f.c.submit(&new_build("y")).await.unwrap().id;
    f.c.plan().await.unwrap();
    assert!(matches!(
        f.c.agent_left(b, false).await,
        Err(Error::Unauthenticated(_))
    ));
    f.c.agent_left(b, true).await.unwrap();
    assert_eq!(f.status(y).await, BuildStatus::Queued, "handed back at once");
    assert!(f.c.agents().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_busy_agent_cools_down_instead_of_being_dropped() {
    let mut f = fixture().await;
    let a = f.c.register_agent("http://a:1").await.unwrap().id;
    let id = f.c.submit(&new_build("x")).await.unwrap().id;
    let d = f.c.plan().await.unwrap().remove(0);
    f.c.dispatch_failed(&d, DispatchFailure::Busy("409".into()))
        .await
        .unwrap();
    assert_eq!(f.status(id).await, BuildStatus::Queued);
    assert_eq!(f.c.agents().await.unwrap().len(), 1, "kept");
    assert!(f.c.plan().await.unwrap().is_empty(), "cooling down");
    assert_eq!(
        f.c.next_deadline().await.unwrap(),
        Some(f.clock.now().plus(policy().ttl()))
    );
    f.advance(300);
    let again = f.c.plan().await.unwrap();
    assert_eq!((again[0].agent, again[0].step.attempt), (a, Attempt(2)));
}

fn labelled(cmd: &str, labels: &[&str]) -> NewBuild {
    NewBuild {
        labels: Labels::parse(labels).unwrap(),
        ..new_build(cmd)
    }
}

async fn register_labelled(f: &mut Fixture, url: &str, labels: &[&str]) -> AgentId {
    let enrollment = Enrollment {
        labels: Labels::parse(labels).unwrap(),
        ..Enrollment::new(url)
    };
    f.c.register(enrollment, None).await.unwrap().id
}

/// A build goes only to an agent with all of its labels; one no agent can
/// take waits without holding up the builds behind it, and starts when a
/// fitting agent registers.
#[tokio::test]
async fn builds_go_only_to_agents_with_their_labels() {
    let mut f = fixture().await;
    let plain = f.c.register_agent("http://plain:1").await.unwrap().id;
    let linux = register_labelled(&mut f, "http://linux:1", &["os=linux", "docker=true"]).await;
    let windows_build = f.c.submit(&labelled("w", &["os=windows"])).await.unwrap().id;
    let linux_build = f.c.submit(&labelled("l", &["os=linux"])).await.unwrap().id;
    let any_build = f.c.submit(&new_build("any")).await.unwrap().id;
    let sent: Vec<(BuildId, AgentId)> =
        f.c.plan()
            .await
            .unwrap()
            .iter()
            .map(|d| (d.step.build, d.agent))
            .collect();
    assert_eq!(sent, [(linux_build, linux), (any_build, plain)]);
    assert_eq!(f.status(windows_build).await, BuildStatus::Queued);
    // Free agents without the label still do not take it.
    let d = f.c.plan().await.unwrap();
    assert!(d.is_empty(), "{d:?}");
    let windows = register_labelled(&mut f, "http://windows:1", &["os=windows"]).await;
    let sent: Vec<(BuildId, AgentId)> =
        f.c.plan()
            .await
            .unwrap()
            .iter()
            .map(|d| (d.step.build, d.agent))
            .collect();
    assert_eq!(sent, [(windows_build, windows)]);
}

/// Whatever a policy proposes, a build never goes to an agent without
/// its labels.
#[tokio::test]
async fn the_coordinator_enforces_labels_whatever_the_policy_proposes() {
    let clock = Arc::new(ManualClock::new(Timestamp(1_000_000)));
    let store = Arc::new(MemoryStore::new());
    let mut greedy = MockScheduler::new();
    greedy.expect_window().returning(|n| n + 8);
    greedy.expect_assign().returning(|ready, offers| {
        ready
            .iter()
            .flat_map(|b| {
                offers.iter().map(move |o| Assignment {
                    step: b.id,
                    agent: o.agent,
                })
            })
            .collect()
    });
    let mut c = Coordinator::builder(store.clone())
        .clock(clock)
        .lease(policy())
        .scheduler(greedy)
        .build()
        .await
        .unwrap();
    let plain = c.register_agent("http://plain:1").await.unwrap().id;
    let gpu = c.submit(&labelled("g", &["gpu"])).await.unwrap().id;
    let d = c.plan().await.unwrap();
    assert!(d.is_empty(), "{d:?}");
    let any = c.submit(&new_build("any")).await.unwrap().id;
    let sent: Vec<(BuildId, AgentId)> = c
        .plan()
        .await
        .unwrap()
        .iter()
        .map(|d| (d.step.build, d.agent))
        .collect();
    assert_eq!(sent, [(any, plain)]);
    assert_eq!(
        store.build(gpu).await.unwrap().unwrap().status,
        BuildStatus::Queued
    );
}

/// A step a free agent can take is found however many steps no free agent
/// can take are queued before it: the queue is read by label set.
#[tokio::test]
async fn a_step_deep_in_the_queue_is_found_by_its_labels() {
    let mut f = fixture().await;
    let gpu = register_labelled(&mut f, "http://gpu:1", &["gpu"]).await;
    for i in 0..500 {
        f.c.submit(&labelled(&format!("w{i}"), &["os=windows"]))
            .await
            .unwrap();
    }
    let deep = f.c.submit(&labelled("train", &["gpu"])).await.unwrap().id;
    let d = f.c.plan().await.unwrap();
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!((d[0].step.build, d[0].agent), (deep, gpu));
}

/// An attempt its agent does not end at its time limit is ended by the
/// coordinator a lease later (timed out, 124, with a stop order, its
/// agent's slot held until the order is delivered); after a restart, its
/// agent gets a lease from then to report first.
#[tokio::test]
async fn attempts_past_their_time_limit_are_ended_by_the_server() {
    let mut f = fixture().await;
    let a = f.c.register_agent("http://a:1").await.unwrap().id;
    let slow = NewBuild {
        timeout_ms: Some(1000),
        ..new_build("sleep 60")
    };
    let x = f.c.submit(&slow).await.unwrap().id;
    let d = f.c.plan().await.unwrap().remove(0);
    let ttl = u64::try_from(policy().ttl().as_millis()).unwrap();
    assert_eq!(
        f.c.next_deadline().await.unwrap(),
        Some(f.clock.now().plus(policy().ttl()))
    );
    for _ in 0..10 {
        // Heartbeats keep the lease; the limit is the step's.
        f.advance(100);
        f.c.heartbeat(Heartbeat {
            step: Some(d.step.id),
            attempt: Some(d.step.attempt),
            agent: Some(a),
            verified: false,
        })
        .await
        .unwrap();
        if f.c.time_out().await.is_empty() {
            continue;
        }
        panic!("timed out before its limit and grace");
    }
    f.advance(ttl);
    let stops = f.c.time_out().await;
    assert_eq!(stops.len(), 1);
    assert_eq!(
        (stops[0].step, stops[0].attempt, stops[0].agent),
        (d.step.id, d.step.attempt, a)
    );
    let b = f.store.build(x).await.unwrap().unwrap();
    assert_eq!((b.status, b.exit_code), (BuildStatus::Failed, Some(124)));
    let log = f.store.log(d.step.id, None).await.unwrap().unwrap();
    assert!(log.stderr.contains("ran past its time limit of 1s"), "{log:?}");
    let next = f.c.submit(&new_build("next")).await.unwrap().id;
    assert!(f.c.plan().await.unwrap().is_empty(), "its agent still runs it");
    f.c.stop_delivered(&stops[0], Stopped::Yes).await.unwrap();
    assert_eq!(f.c.plan().await.unwrap()[0].step.build, next);
    assert!(f.c.time_out().await.is_empty(), "once");

    // A restart long after the limit: the agent gets a lease from then to
    // deliver the result it kept, which is taken.
    let mut f = fixture().await;
    f.c.register_agent("http://a:1").await.unwrap();
    let y = f.c.submit(&slow).await.unwrap().id;
    let d = f.c.plan().await.unwrap().remove(0);
    f.advance(5000);
    let mut c2 = Coordinator::builder(f.store.clone())
        .clock(f.clock.clone())
        .lease(policy())
        .build()
        .await
        .unwrap();
    assert!(c2.time_out().await.is_empty(), "not at once after the restart");
    assert!(c2.complete(report(&d, 0)).await.is_ok());
    assert_eq!(f.status(y).await, BuildStatus::Success);
    f.advance(ttl);
    assert!(c2.time_out().await.is_empty());
}
