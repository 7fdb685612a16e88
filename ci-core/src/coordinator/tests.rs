use std::time::Duration;

use super::*;
use crate::clock::ManualClock;
use crate::model::{CommitRef, RepoUrl};
use crate::scheduler::{Assignment, MockScheduler};
use crate::store::{MemoryStore, MockBuildStore};

struct Fixture {
    clock: Arc<ManualClock>,
    store: Arc<MemoryStore>,
    c: Coordinator,
}

fn policy() -> LeasePolicy {
    LeasePolicy::new(Duration::from_millis(100), 3).unwrap()
}

fn fixture() -> Fixture {
    let clock = Arc::new(ManualClock::new(Timestamp(1_000_000)));
    let store = Arc::new(MemoryStore::new());
    let c = Coordinator::builder(store.clone())
        .clock(clock.clone())
        .lease(policy())
        .build()
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

fn done(code: i32, out: &str) -> Completion {
    Completion {
        exit_code: code,
        stdout: out.into(),
        stderr: String::new(),
    }
}

fn report(d: &Dispatch, code: i32) -> Report {
    Report {
        build: d.build.id,
        attempt: Some(d.build.attempt),
        agent: Some(d.agent),
        verified: false,
        completion: done(code, "out"),
    }
}

impl Fixture {
    fn status(&self, id: BuildId) -> BuildStatus {
        self.store.build(id).unwrap().unwrap().status
    }

    fn advance(&self, ms: u64) {
        self.clock.advance(Duration::from_millis(ms));
    }
}

#[test]
fn n_agents_run_n_of_m_builds_then_pick_up_the_rest() {
    let mut f = fixture();
    let a = f.c.register_agent("http://a:1").unwrap().id;
    let b = f.c.register_agent("http://b:1").unwrap().id;
    let ids: Vec<_> = (0..5)
        .map(|i| f.c.submit(&new_build(&format!("c{i}"))).unwrap().id)
        .collect();

    let first = f.c.plan().unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(first[0].build.id, ids[0], "oldest first");
    assert_eq!(first[1].build.id, ids[1]);
    let agents: Vec<_> = first.iter().map(|d| d.agent).collect();
    assert!(agents.contains(&a) && agents.contains(&b));
    assert!(first.iter().all(|d| d.build.attempt == Attempt(1)));
    assert!(f.c.plan().unwrap().is_empty(), "no agent is free");

    f.c.complete(report(&first[0], 0)).unwrap();
    let next = f.c.plan().unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!((next[0].build.id, next[0].agent), (ids[2], first[0].agent));
    assert_eq!(f.status(ids[0]), BuildStatus::Success);
}

#[test]
fn dispatch_request_carries_the_attempt() {
    let mut f = fixture();
    f.c.register_agent("http://a:1").unwrap();
    f.c.submit(&new_build("make")).unwrap();
    let d = f.c.plan().unwrap().remove(0);
    let req = d.request();
    assert_eq!((req.command.as_str(), req.hash.as_str()), ("make", "abc123"));
    assert_eq!(req.attempt, Some(Attempt(1)));
    assert_eq!(d.agent_url, "http://a:1");
}

#[test]
fn heartbeats_keep_the_lease_and_silence_requeues_with_a_new_attempt() {
    let mut f = fixture();
    let a = f.c.register_agent("http://a:1").unwrap().id;
    let id = f.c.submit(&new_build("sleep")).unwrap().id;
    let d1 = f.c.plan().unwrap().remove(0);

    for _ in 0..10 {
        f.advance(100);
        let hb = Heartbeat {
            build: Some(id),
            attempt: Some(Attempt(1)),
            agent: Some(a),
            verified: false,
        };
        f.c.heartbeat(hb).unwrap();
        assert_eq!(f.c.expire().unwrap(), 0, "a live agent is never expired");
    }
    assert_eq!(f.c.next_deadline(), Some(f.clock.now().plus(policy().ttl())));

    f.advance(299);
    assert_eq!(f.c.expire().unwrap(), 0);
    f.advance(1);
    assert_eq!(f.c.expire().unwrap(), 1, "lease lapsed after missed * interval");
    assert_eq!(f.status(id), BuildStatus::Queued);
    assert!(f.c.agents().is_empty(), "the dead agent is dropped");
    let events = f.c.take_events();
    assert!(events.contains(&Event::Requeued {
        build: id,
        attempt: Attempt(1)
    }));
    assert!(events.contains(&Event::AgentLeft {
        agent: a,
        reason: LeaveReason::MissedHeartbeats
    }));

    let b = f.c.register_agent("http://b:1").unwrap().id;
    let d2 = f.c.plan().unwrap().remove(0);
    assert_eq!((d2.build.id, d2.build.attempt, d2.agent), (id, Attempt(2), b));

    // The zombie of attempt 1 is fenced out, on heartbeats and on results.
    let zombie_hb = Heartbeat {
        build: Some(id),
        attempt: Some(Attempt(1)),
        agent: Some(a),
        verified: false,
    };
    assert!(matches!(f.c.heartbeat(zombie_hb), Err(Error::Superseded { .. })));
    assert!(matches!(
        f.c.complete(report(&d1, 0)),
        Err(Error::Superseded { .. })
    ));
    assert_eq!(f.status(id), BuildStatus::Running);

    f.c.complete(report(&d2, 1)).unwrap();
    assert_eq!(f.status(id), BuildStatus::Failed);
    assert!(matches!(
        f.c.complete(report(&d1, 0)),
        Err(Error::Superseded { .. })
    ));
}

#[test]
fn late_result_of_the_only_attempt_is_kept_if_not_redispatched() {
    let mut f = fixture();
    // Proven by its session secret, which outlives the agent's lease.
    f.c.register_agent_with_secret("http://a:1", "secret-a".into(), None)
        .unwrap();
    let id = f.c.submit(&new_build("x")).unwrap().id;
    let d = f.c.plan().unwrap().remove(0);
    f.advance(300);
    f.c.expire().unwrap();
    assert_eq!(f.status(id), BuildStatus::Queued);
    assert_eq!(f.c.agent_by_secret("secret-a"), Some(d.agent));
    let mut late = report(&d, 0);
    late.verified = true;
    let got = f.c.complete(late).unwrap();
    assert!(matches!(got, Accepted::Finished(b) if b.status == BuildStatus::Success));
    f.c.register_agent("http://b:1").unwrap();
    assert!(
        f.c.plan().unwrap().is_empty(),
        "finished builds are not dispatched"
    );
}

#[test]
fn a_requeued_build_takes_no_result_from_anyone_but_its_proven_agent() {
    let mut f = fixture();
    f.c.register_agent_with_secret("http://a:1", "secret-a".into(), None)
        .unwrap();
    let id = f.c.submit(&new_build("x")).unwrap().id;
    let d = f.c.plan().unwrap().remove(0);
    f.advance(300);
    f.c.expire().unwrap();
    assert_eq!(f.status(id), BuildStatus::Queued);
    // A token holder claiming to be the agent, without its secret.
    assert!(matches!(f.c.complete(report(&d, 0)), Err(Error::Conflict(_))));
    // Another agent, proven, but not the one that held the attempt.
    let b =
        f.c.register_agent_with_secret("http://b:1", "secret-b".into(), None)
            .unwrap()
            .id;
    let mut forged = report(&d, 0);
    (forged.agent, forged.verified) = (Some(b), true);
    assert!(matches!(f.c.complete(forged), Err(Error::Conflict(_))));
    assert_ne!(f.status(id), BuildStatus::Success);
}

#[test]
fn a_live_session_cannot_be_taken_over_without_its_secret() {
    let mut f = fixture();
    let a =
        f.c.register_agent_with_secret("http://a:1", "secret-a".into(), None)
            .unwrap()
            .id;
    f.c.submit(&new_build("x")).unwrap();
    let d = f.c.plan().unwrap().remove(0);
    assert_eq!(d.agent, a);
    // Someone else registers the same URL: refused while the lease lives.
    assert!(matches!(
        f.c.register_agent_with_secret("http://a:1", "evil".into(), None),
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        f.c.register_agent_with_secret("http://a:1", "evil".into(), Some("guess")),
        Err(Error::Conflict(_))
    ));
    assert_eq!(
        f.c.lease(d.build.id).map(|l| l.agent),
        Some(a),
        "the build stays put"
    );
    // The agent itself, restarted, proves it and takes over at once.
    let a2 =
        f.c.register_agent_with_secret("http://a:1", "secret-a2".into(), Some("secret-a"))
            .unwrap()
            .id;
    assert_ne!(a2, a);
    // Once the session has lapsed, anyone may have the URL.
    f.advance(300);
    assert!(f
        .c
        .register_agent_with_secret("http://a:1", "x".into(), None)
        .is_ok());
}

#[test]
fn results_finish_once_and_identical_repeats_are_noops() {
    let mut f = fixture();
    f.c.register_agent("http://a:1").unwrap();
    let id = f.c.submit(&new_build("x")).unwrap().id;
    let d = f.c.plan().unwrap().remove(0);
    assert!(matches!(f.c.complete(report(&d, 0)), Ok(Accepted::Finished(_))));
    assert!(matches!(f.c.complete(report(&d, 0)), Ok(Accepted::Duplicate(_))));
    let mut other = report(&d, 0);
    other.completion.stdout = "different".into();
    assert!(matches!(f.c.complete(other), Err(Error::Conflict(_))));
    assert_eq!(f.store.log(id, None).unwrap().unwrap().stdout, "out");
    let finished =
        f.c.take_events()
            .iter()
            .filter(|e| matches!(e, Event::Finished { .. }))
            .count();
    assert_eq!(finished, 1);
}

#[test]
fn original_protocol_without_attempt_or_agent_works() {
    let mut f = fixture();
    f.c.register_agent("http://a:1").unwrap();
    let id = f.c.submit(&new_build("x")).unwrap().id;
    f.c.plan().unwrap();
    f.c.heartbeat(Heartbeat {
        build: Some(id),
        ..Heartbeat::default()
    })
    .unwrap();
    let r = Report {
        build: id,
        attempt: None,
        agent: None,
        verified: false,
        completion: done(0, ""),
    };
    f.c.complete(r.clone()).unwrap();
    assert!(matches!(f.c.complete(r), Ok(Accepted::Duplicate(_))));
}

#[test]
fn unknown_and_idle_builds_are_reported_as_such() {
    let mut f = fixture();
    let hb = |id| Heartbeat {
        build: Some(BuildId(id)),
        ..Heartbeat::default()
    };
    assert!(matches!(f.c.heartbeat(hb(42)), Err(Error::BuildNotFound(_))));
    let id = f.c.submit(&new_build("x")).unwrap().id;
    assert!(matches!(f.c.heartbeat(hb(id.0)), Err(Error::NotRunning { .. })));
    let r = Report {
        build: id,
        attempt: None,
        agent: None,
        verified: false,
        completion: done(0, ""),
    };
    assert!(
        matches!(f.c.complete(r), Err(Error::Conflict(_))),
        "never dispatched"
    );
    let ping = Heartbeat {
        agent: Some(AgentId(9)),
        ..Heartbeat::default()
    };
    assert!(matches!(f.c.heartbeat(ping), Err(Error::AgentNotFound(_))));
    assert!(matches!(
        f.c.heartbeat(Heartbeat::default()),
        Err(Error::Invalid { .. })
    ));
}

#[test]
fn another_agent_cannot_speak_for_a_lease() {
    let mut f = fixture();
    let a = f.c.register_agent("http://a:1").unwrap().id;
    let b = f.c.register_agent("http://b:1").unwrap().id;
    f.c.submit(&new_build("x")).unwrap();
    let d = f.c.plan().unwrap().remove(0);
    let other = if d.agent == a { b } else { a };
    let hb = Heartbeat {
        build: Some(d.build.id),
        attempt: Some(d.build.attempt),
        agent: Some(other),
        verified: false,
    };
    assert!(matches!(f.c.heartbeat(hb), Err(Error::Conflict(_))));
    let mut r = report(&d, 0);
    r.agent = Some(other);
    assert!(matches!(f.c.complete(r), Err(Error::Conflict(_))));
    assert_eq!(f.status(d.build.id), BuildStatus::Running);
}

#[test]
fn reregistering_at_the_same_url_requeues_what_the_old_process_held() {
    let mut f = fixture();
    let old = f.c.register_agent("http://a:1").unwrap().id;
    let id = f.c.submit(&new_build("x")).unwrap().id;
    f.c.plan().unwrap();
    let new = f.c.register_agent("http://a:1").unwrap().id;
    assert_ne!(old, new);
    assert_eq!(f.status(id), BuildStatus::Queued, "not stuck running");
    let d = f.c.plan().unwrap().remove(0);
    assert_eq!((d.agent, d.build.attempt), (new, Attempt(2)));
    assert_eq!(f.c.agents().len(), 1);
}

#[test]
fn unreachable_agents_are_dropped_and_rejected_builds_fail() {
    let mut f = fixture();
    f.c.register_agent("http://a:1").unwrap();
    let id = f.c.submit(&new_build("x")).unwrap().id;
    let d = f.c.plan().unwrap().remove(0);
    f.c.dispatch_failed(&d, DispatchFailure::Unreachable("refused".into()))
        .unwrap();
    assert_eq!(f.status(id), BuildStatus::Queued);
    assert!(f.c.agents().is_empty());

    f.c.register_agent("http://b:1").unwrap();
    let d = f.c.plan().unwrap().remove(0);
    f.c.dispatch_failed(&d, DispatchFailure::Rejected("bad repo".into()))
        .unwrap();
    let b = f.store.build(id).unwrap().unwrap();
    assert_eq!(
        (b.status, b.exit_code),
        (BuildStatus::Failed, Some(Completion::NOT_RUN))
    );
    assert!(f
        .store
        .log(id, None)
        .unwrap()
        .unwrap()
        .stderr
        .contains("bad repo"));
    assert_eq!(f.c.agents().len(), 1, "the agent that refused stays");
    assert!(f.c.agents()[0].is_idle());
}

#[test]
fn pinging_agents_that_fall_silent_are_dropped_but_original_ones_are_not() {
    let mut f = fixture();
    let pinger = f.c.register_agent("http://a:1").unwrap().id;
    let original = f.c.register_agent("http://b:1").unwrap().id;
    f.c.heartbeat(Heartbeat {
        agent: Some(pinger),
        ..Heartbeat::default()
    })
    .unwrap();
    f.advance(1000);
    assert_eq!(f.c.expire().unwrap(), 1);
    let left: Vec<_> = f.c.agents().iter().map(|a| a.id).collect();
    assert_eq!(left, vec![original]);
}

#[test]
fn recovery_restores_leases_and_requeues_orphans() {
    let mut f = fixture();
    f.c.register_agent("http://a:1").unwrap();
    let b = f.c.register_agent("http://b:1").unwrap().id;
    let x = f.c.submit(&new_build("x")).unwrap().id;
    let y = f.c.submit(&new_build("y")).unwrap().id;
    f.c.submit(&new_build("z")).unwrap();
    let ds = f.c.plan().unwrap();
    assert_eq!(ds.len(), 2);
    // The agent holding y vanished from the store while the server was down.
    let y_agent = ds.iter().find(|d| d.build.id == y).unwrap().agent;
    f.store.remove_agent(y_agent).unwrap();

    f.advance(250);
    let mut c2 = Coordinator::builder(f.store.clone())
        .clock(f.clock.clone())
        .lease(policy())
        .build()
        .unwrap();
    assert_eq!(f.status(x), BuildStatus::Running);
    assert_eq!(f.status(y), BuildStatus::Queued, "its agent is gone");
    let lease = c2.lease(x).unwrap();
    assert_eq!(
        lease.expires_at,
        f.clock.now().plus(policy().ttl()),
        "a fresh lease"
    );
    assert_eq!(c2.agents().len(), 1);
    // The surviving agent is busy with x, so nothing is dispatched...
    assert!(c2.plan().unwrap().is_empty() || b == y_agent);
    // ...and numbering continues.
    assert!(c2.submit(&new_build("w")).unwrap().id.0 > 3);
}

#[test]
fn the_coordinator_enforces_capacity_whatever_the_policy_proposes() {
    let clock = Arc::new(ManualClock::new(Timestamp(0)));
    let store = Arc::new(MemoryStore::new());
    let mut policy = MockScheduler::new();
    policy.expect_assign().returning(|queued, free| {
        // A buggy policy: every build to the first agent, the first build twice.
        let mut v: Vec<_> = queued
            .iter()
            .map(|b| Assignment {
                build: b.id,
                agent: free[0].id,
            })
            .collect();
        v.push(Assignment {
            build: queued[0].id,
            agent: free[free.len() - 1].id,
        });
        v
    });
    let mut c = Coordinator::builder(store.clone())
        .clock(clock)
        .scheduler(policy)
        .build()
        .unwrap();
    c.register_agent("http://a:1").unwrap();
    c.register_agent("http://b:1").unwrap();
    for _ in 0..3 {
        c.submit(&new_build("x")).unwrap();
    }
    let ds = c.plan().unwrap();
    assert_eq!(ds.len(), 1, "one build per agent, each build once: {ds:?}");
    for a in c.agents() {
        assert!(a.running.len() <= a.capacity as usize);
    }
}

#[test]
fn a_failing_store_changes_nothing_in_memory() {
    let mut store = MockBuildStore::new();
    store.expect_agents().returning(|| Ok(vec![]));
    store.expect_running_builds().returning(|| Ok(vec![]));
    store.expect_register_agent().returning(|url, secret, now| {
        Ok(AgentRecord {
            id: AgentId(1),
            url: url.to_owned(),
            registered_at: now,
            secret: secret.map(str::to_owned),
        })
    });
    let queued = Build {
        id: BuildId(1),
        repo: "/r".into(),
        hash: "abcd".into(),
        branch: None,
        command: "x".into(),
        image: None,
        timeout_ms: None,
        status: BuildStatus::Queued,
        attempt: Attempt(0),
        agent_id: None,
        agent_url: None,
        exit_code: None,
        created_at: Timestamp(0),
        started_at: None,
        finished_at: None,
    };
    store
        .expect_queued_builds()
        .returning(move |_| Ok(vec![queued.clone()]));
    store
        .expect_start_attempt()
        .returning(|_, _, _| Err(Error::store("disk I/O error")));
    let mut c = Coordinator::builder(Arc::new(store)).build().unwrap();
    c.register_agent("http://a:1").unwrap();
    let err = c.plan().unwrap_err();
    assert!(err.is_retryable());
    assert!(c.lease(BuildId(1)).is_none());
    assert!(
        c.agents()[0].is_idle(),
        "no slot is taken by a dispatch that did not happen"
    );
}

#[test]
fn agents_with_a_session_secret_cannot_be_spoken_for() {
    let mut f = fixture();
    let a =
        f.c.register_agent_with_secret("http://a:1", "secret-a".into(), None)
            .unwrap()
            .id;
    f.c.submit(&new_build("x")).unwrap();
    let d = f.c.plan().unwrap().remove(0);
    assert_eq!(f.c.agent_by_secret("secret-a"), Some(a));
    assert_eq!(f.c.agent_by_secret("secret-b"), None);

    // Claiming the agent's id, or saying nothing, is not enough.
    for (agent, verified) in [(Some(a), false), (None, false), (None, true)] {
        let hb = Heartbeat {
            build: Some(d.build.id),
            attempt: Some(d.build.attempt),
            agent,
            verified,
        };
        assert!(
            matches!(f.c.heartbeat(hb), Err(Error::Unauthenticated(_))),
            "{agent:?} {verified}"
        );
        let mut r = report(&d, 0);
        r.agent = agent;
        r.verified = verified;
        assert!(matches!(f.c.complete(r), Err(Error::Unauthenticated(_))));
        let ping = Heartbeat {
            agent: Some(a),
            verified,
            ..Heartbeat::default()
        };
        if !verified {
            assert!(matches!(f.c.heartbeat(ping), Err(Error::Unauthenticated(_))));
        }
    }
    assert_eq!(f.status(d.build.id), BuildStatus::Running);

    let hb = Heartbeat {
        build: Some(d.build.id),
        attempt: Some(d.build.attempt),
        agent: Some(a),
        verified: true,
    };
    f.c.heartbeat(hb).unwrap();
    let mut r = report(&d, 0);
    r.verified = true;
    f.c.complete(r).unwrap();
    assert_eq!(f.status(d.build.id), BuildStatus::Success);

    // Secrets survive a restart.
    let c2 = Coordinator::builder(f.store.clone())
        .clock(f.clock.clone())
        .build()
        .unwrap();
    assert_eq!(c2.agent_by_secret("secret-a"), Some(a));
}

#[test]
fn cancel_queued_at_once_and_running_after_the_agent_stops() {
    let mut f = fixture();
    let a = f.c.register_agent("http://a:1").unwrap().id;
    let running = f.c.submit(&new_build("r")).unwrap().id;
    let d = f.c.plan().unwrap().remove(0);
    let queued = f.c.submit(&new_build("q")).unwrap().id;

    assert!(matches!(f.c.cancel(queued).unwrap(), Cancel::Done(b) if b.status == BuildStatus::Canceled));
    let order = match f.c.cancel(running).unwrap() {
        Cancel::Stop(o) => o,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (order.agent, order.build, order.attempt),
        (a, running, Attempt(1))
    );
    assert_eq!(f.status(running), BuildStatus::Canceled);
    assert!(f.c.lease(running).is_none());
    let another = f.c.submit(&new_build("next")).unwrap().id;
    assert!(
        f.c.plan().unwrap().is_empty(),
        "the slot stays taken until the agent has stopped"
    );
    f.c.stop_delivered(&order, true).unwrap();
    let next = f.c.plan().unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].build.id, another);

    // A late result and heartbeat of the canceled attempt change nothing.
    assert!(matches!(f.c.complete(report(&d, 0)), Err(Error::Conflict(_))));
    let hb = Heartbeat {
        build: Some(running),
        attempt: Some(Attempt(1)),
        agent: Some(a),
        verified: false,
    };
    assert!(matches!(f.c.heartbeat(hb), Err(Error::NotRunning { .. })));
    assert!(matches!(f.c.cancel(running), Err(Error::Conflict(_))), "once");
}

#[test]
fn an_unreachable_stop_drops_the_agent_and_a_leaving_agent_hands_back_its_build() {
    let mut f = fixture();
    f.c.register_agent("http://a:1").unwrap();
    let x = f.c.submit(&new_build("x")).unwrap().id;
    f.c.plan().unwrap();
    let Cancel::Stop(order) = f.c.cancel(x).unwrap() else {
        panic!()
    };
    f.c.stop_delivered(&order, false).unwrap();
    assert!(f.c.agents().is_empty());

    let b =
        f.c.register_agent_with_secret("http://b:1", "s".into(), None)
            .unwrap()
            .id;
    let y = f.c.submit(&new_build("y")).unwrap().id;
    f.c.plan().unwrap();
    assert!(matches!(f.c.agent_left(b, false), Err(Error::Unauthenticated(_))));
    f.c.agent_left(b, true).unwrap();
    assert_eq!(f.status(y), BuildStatus::Queued, "handed back at once");
    assert!(f.c.agents().is_empty());
}

#[test]
fn a_busy_agent_cools_down_instead_of_being_dropped() {
    let mut f = fixture();
    let a = f.c.register_agent("http://a:1").unwrap().id;
    let id = f.c.submit(&new_build("x")).unwrap().id;
    let d = f.c.plan().unwrap().remove(0);
    f.c.dispatch_failed(&d, DispatchFailure::Busy("409".into()))
        .unwrap();
    assert_eq!(f.status(id), BuildStatus::Queued);
    assert_eq!(f.c.agents().len(), 1, "kept");
    assert!(f.c.plan().unwrap().is_empty(), "cooling down");
    assert_eq!(f.c.next_deadline(), Some(f.clock.now().plus(policy().ttl())));
    f.advance(300);
    let again = f.c.plan().unwrap();
    assert_eq!((again[0].agent, again[0].build.attempt), (a, Attempt(2)));
}
