//! Conformance tests that any [`Store`] must pass. `ci-store` runs them
//! against SQLite. Enabled by the `test-support` feature.

#![allow(clippy::unwrap_used, missing_docs)]

use super::*;
use crate::model::{limits, CommitRef, RepoUrl};

fn new_build(command: &str) -> NewBuild {
    let repo = RepoUrl::parse("/srv/repo").unwrap_or_else(|e| panic!("{e}"));
    let hash = CommitRef::parse("abcdef1").unwrap_or_else(|e| panic!("{e}"));
    NewBuild::new(repo, hash, command).unwrap_or_else(|e| panic!("{e}"))
}

fn enroll(url: &str, secret: Option<&str>) -> crate::pool::Enrollment {
    crate::pool::Enrollment {
        secret: secret.map(str::to_owned),
        ..crate::pool::Enrollment::new(url)
    }
}

fn ok<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("store error: {e}"))
}

/// Runs every check against stores made by `make` (one fresh store per
/// check).
pub async fn run_all<S: Store, F: std::future::Future<Output = S>>(make: impl Fn() -> F) {
    ids_increase(&make().await).await;
    queue_is_fifo(&make().await).await;
    attempts_are_fenced(&make().await).await;
    logs_are_kept_per_attempt(&make().await).await;
    agents_register_and_replace(&make().await).await;
    listing_is_newest_first(&make().await).await;
    cancel_is_fenced(&make().await).await;
    live_logs_are_ordered_fenced_and_idempotent(&make().await).await;
    live_logs_are_capped_and_joined(&make().await).await;
    logs_read_in_pieces(&make().await).await;
    leases_are_granted_renewed_and_fenced(&make().await).await;
    starting_is_one_step_and_skips_what_is_not_queued(&make().await).await;
    labels_are_kept(&make().await).await;
}

/// A log read a piece at a time is the log.
pub async fn logs_read_in_pieces<S: Store>(s: &S) {
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let id = ok(s.create_build(&new_build("x"), Timestamp(0)).await).id;
    assert_eq!(ok(s.log_info(id, None).await), None);
    ok(start_one(s, id, &agent, Timestamp(1)).await);
    let piece = |seq, stream, data: &str| LogPiece {
        seq,
        stream,
        data: data.to_owned(),
    };
    let live = [
        piece(0, Stream::Stdout, "ab"),
        piece(1, Stream::Stderr, "é"),
        piece(2, Stream::Stdout, "c"),
    ];
    ok(s.append_log(id, Attempt(1), &live).await);
    let info = ok(s.log_info(id, None).await).unwrap_or_default();
    assert_eq!((info.complete, info.stdout_len, info.stderr_len), (false, 3, 2));
    let page: Vec<u64> = ok(s.log_pieces(id, Attempt(1), None, 2).await)
        .iter()
        .map(|p| p.seq)
        .collect();
    assert_eq!(page, vec![0, 1]);
    assert_eq!(ok(s.log_pieces(id, Attempt(1), Some(1), 2).await).len(), 1);
    let done = Completion {
        exit_code: 0,
        stdout: "héllo wörld".into(),
        stderr: "e".into(),
    };
    assert!(ok(s.finish(id, Attempt(1), &done, Timestamp(2)).await));
    let info = ok(s.log_info(id, None).await).unwrap_or_default();
    assert_eq!(
        (info.attempt, info.complete, info.stdout_len, info.stderr_len),
        (Attempt(1), true, 13, 1)
    );
    let mut read = Vec::new();
    let mut offset = 0;
    loop {
        let chunk = ok(s.read_log(id, Attempt(1), Stream::Stdout, offset, 4).await);
        if chunk.is_empty() {
            break;
        }
        assert!(chunk.len() <= 4);
        offset += chunk.len() as u64;
        read.extend(chunk);
    }
    assert_eq!(String::from_utf8(read).ok().as_deref(), Some("héllo wörld"));
    assert_eq!(ok(s.read_log(id, Attempt(1), Stream::Stderr, 0, 100).await), b"e");
    assert_eq!(ok(s.read_log(id, Attempt(1), Stream::Stderr, 9, 100).await), b"");
    assert_eq!(ok(s.read_log(id, Attempt(2), Stream::Stdout, 0, 100).await), b"");
}

/// Many small pieces: kept up to the cap per stream, joined into few
/// rows, with retries of overlapping batches stored once.
pub async fn live_logs_are_capped_and_joined<S: Store>(s: &S) {
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let id = ok(s.create_build(&new_build("x"), Timestamp(0)).await).id;
    ok(start_one(s, id, &agent, Timestamp(1)).await);
    let pieces: Vec<LogPiece> = (0..20_000)
        .map(|seq| LogPiece {
            seq,
            stream: Stream::Stdout,
            data: "y".into(),
        })
        .collect();
    assert_eq!(ok(s.append_log(id, Attempt(1), &pieces[..10_000]).await), 10_000);
    // A retry that overlaps the last batch stores only what is new.
    assert_eq!(ok(s.append_log(id, Attempt(1), &pieces[5_000..]).await), 10_000);
    let rows = ok(s.log_pieces(id, Attempt(1), None, usize::MAX).await);
    assert!(rows.len() <= 2, "{} rows for two batches", rows.len());
    assert_eq!(rows.last().map(|p| p.seq), Some(19_999));
    let text: usize = rows.iter().map(|p| p.data.len()).sum();
    assert_eq!(text, 20_000);
    // Nothing past the cap; the other stream still has room.
    let big = |seq, stream| LogPiece {
        seq,
        stream,
        data: "z".repeat(limits::MAX_LOG),
    };
    assert_eq!(
        ok(s.append_log(id, Attempt(1), &[big(20_000, Stream::Stdout)]).await),
        0
    );
    assert_eq!(
        ok(s.append_log(id, Attempt(1), &[big(20_001, Stream::Stderr)]).await),
        1
    );
    let log = ok(s.log(id, None).await).unwrap_or_default();
    assert_eq!((log.stdout.len(), log.stderr.len()), (20_000, limits::MAX_LOG));
}

/// Cancel acts on queued builds and on the running attempt only.
pub async fn cancel_is_fenced<S: Store>(s: &S) {
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let queued = ok(s.create_build(&new_build("q"), Timestamp(0)).await).id;
    assert!(ok(s.cancel(queued, Attempt(0), Timestamp(5)).await));
    assert_eq!(
        ok(s.queued(10).await),
        vec![],
        "a canceled build leaves the queue"
    );
    let b = ok(s.build(queued).await).unwrap_or_else(|| panic!("gone"));
    assert_eq!(
        (b.status, b.finished_at),
        (BuildStatus::Canceled, Some(Timestamp(5)))
    );
    assert!(!ok(s.cancel(queued, Attempt(0), Timestamp(6)).await), "once");

    let running = ok(s.create_build(&new_build("r"), Timestamp(0)).await).id;
    ok(start_one(s, running, &agent, Timestamp(1)).await);
    assert!(
        !ok(s.cancel(running, Attempt(0), Timestamp(2)).await),
        "not the running attempt"
    );
    assert!(ok(s.cancel(running, Attempt(1), Timestamp(2)).await));
    let done = Completion {
        exit_code: 0,
        stdout: String::new(),
        stderr: String::new(),
    };
    assert!(
        !ok(s.finish(running, Attempt(1), &done, Timestamp(3)).await),
        "a canceled build takes no result"
    );
    let counts = ok(s.status_counts().await);
    assert!(counts.contains(&(BuildStatus::Canceled, 2)), "{counts:?}");
    assert!(counts.contains(&(BuildStatus::Running, 0)), "{counts:?}");
}

/// Live output: in seq order, repeats ignored, only for the running
/// attempt, replaced by the final log.
pub async fn live_logs_are_ordered_fenced_and_idempotent<S: Store>(s: &S) {
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let id = ok(s.create_build(&new_build("x"), Timestamp(0)).await).id;
    let piece = |seq, stream, data: &str| LogPiece {
        seq,
        stream,
        data: data.to_owned(),
    };
    assert_eq!(
        ok(s.append_log(id, Attempt(1), &[piece(0, Stream::Stdout, "x")])
            .await),
        0,
        "not running"
    );
    ok(start_one(s, id, &agent, Timestamp(1)).await);
    let batch = [piece(1, Stream::Stderr, "warn\n"), piece(0, Stream::Stdout, "a")];
    assert_eq!(ok(s.append_log(id, Attempt(1), &batch).await), 2);
    assert_eq!(
        ok(s.append_log(id, Attempt(1), &batch).await),
        0,
        "a retry stores nothing twice"
    );
    assert_eq!(
        ok(s.append_log(id, Attempt(1), &[piece(2, Stream::Stdout, "b")])
            .await),
        1
    );
    let seqs: Vec<u64> = ok(s.log_pieces(id, Attempt(1), None, usize::MAX).await)
        .iter()
        .map(|p| p.seq)
        .collect();
    assert_eq!(seqs, vec![0, 1, 2]);
    assert_eq!(
        ok(s.log_pieces(id, Attempt(1), Some(1), usize::MAX).await).len(),
        1
    );
    let partial = ok(s.log(id, None).await).unwrap_or_default();
    assert_eq!(
        (partial.stdout.as_str(), partial.stderr.as_str(), partial.complete),
        ("ab", "warn\n", false)
    );

    // The attempt is lost; its partial log stays; attempt 2 logs apart.
    assert!(ok(s.requeue(id, Attempt(1)).await));
    ok(start_one(s, id, &agent, Timestamp(2)).await);
    assert_eq!(
        ok(s.append_log(id, Attempt(1), &[piece(3, Stream::Stdout, "late")])
            .await),
        0,
        "superseded"
    );
    assert_eq!(
        ok(
            s.append_log(id, Attempt(2), &[piece(0, Stream::Stdout, "second")])
                .await
        ),
        1
    );
    assert_eq!(
        ok(s.log(id, Some(Attempt(1))).await).map(|l| l.stdout),
        Some("ab".into())
    );
    let done = Completion {
        exit_code: 0,
        stdout: "second, final".into(),
        stderr: String::new(),
    };
    assert!(ok(s.finish(id, Attempt(2), &done, Timestamp(3)).await));
    let fin = ok(s.log(id, None).await).unwrap_or_default();
    assert_eq!((fin.stdout.as_str(), fin.complete), ("second, final", true));
    assert_eq!(
        ok(s.log_pieces(id, Attempt(2), None, usize::MAX).await),
        vec![],
        "the final log replaces the pieces"
    );
    assert_eq!(
        ok(s.log(id, Some(Attempt(1))).await).map(|l| l.complete),
        Some(false)
    );
}

/// Build ids increase by one.
pub async fn ids_increase<S: Store>(s: &S) {
    let a = ok(s.create_build(&new_build("a"), Timestamp(1)).await);
    let b = ok(s.create_build(&new_build("b"), Timestamp(2)).await);
    assert!(b.id > a.id);
    assert_eq!(a.status, BuildStatus::Queued);
    assert_eq!(a.attempt, Attempt(0));
    assert_eq!(ok(s.build(a.id).await), Some(a));
    assert_eq!(ok(s.build(BuildId(999)).await), None);
}

/// A build's labels come back from every read: the queue, the build, the
/// listing, and after it starts.
pub async fn labels_are_kept<S: Store>(s: &S) {
    let labels = crate::model::Labels::parse(["os=linux", "gpu"]).unwrap_or_else(|e| panic!("{e}"));
    let new = NewBuild {
        labels: labels.clone(),
        ..new_build("l")
    };
    let b = ok(s.create_build(&new, Timestamp(1)).await);
    assert_eq!(b.labels, labels);
    let plain = ok(s.create_build(&new_build("p"), Timestamp(2)).await);
    assert!(plain.labels.is_empty());
    let queued: Vec<_> = ok(s.queued(10).await).into_iter().map(|b| b.labels).collect();
    assert_eq!(queued, [labels.clone(), crate::model::Labels::default()]);
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let started = ok(start_one(s, b.id, &agent, Timestamp(3)).await).map(|b| b.labels);
    assert_eq!(started, Some(labels.clone()));
    assert_eq!(ok(s.build(b.id).await).map(|b| b.labels), Some(labels.clone()));
    let page = ok(s
        .list_builds(Page {
            limit: 10,
            offset: 0,
            before: None,
        })
        .await);
    assert_eq!(page.last().map(|b| b.labels.clone()), Some(labels));
}

/// Queued builds come out oldest first and leave the queue when started.
pub async fn queue_is_fifo<S: Store>(s: &S) {
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(ok(s.create_build(&new_build(&format!("c{i}")), Timestamp(i)).await).id);
    }
    let q: Vec<_> = ok(s.queued(3).await).iter().map(|b| b.id).collect();
    assert_eq!(q, ids[..3]);
    let started = ok(start_one(s, ids[0], &agent, Timestamp(10)).await).map(|b| b.status);
    assert_eq!(started, Some(BuildStatus::Running));
    assert_eq!(
        ok(start_one(s, ids[0], &agent, Timestamp(10)).await),
        None,
        "not queued"
    );
    let q: Vec<_> = ok(s.queued(10).await).iter().map(|b| b.id).collect();
    assert_eq!(q, ids[1..]);
    assert_eq!(ok(s.leases().await).len(), 1);
}

/// Requeue and finish only act on the latest attempt.
pub async fn attempts_are_fenced<S: Store>(s: &S) {
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let id = ok(s.create_build(&new_build("x"), Timestamp(0)).await).id;
    let done = Completion {
        exit_code: 0,
        stdout: "out".into(),
        stderr: String::new(),
    };
    assert!(
        !ok(s.finish(id, Attempt(0), &done, Timestamp(1)).await),
        "never dispatched"
    );
    let b1 = ok(start_one(s, id, &agent, Timestamp(1)).await).map(|b| b.attempt);
    assert_eq!(b1, Some(Attempt(1)));
    assert!(!ok(s.requeue(id, Attempt(2)).await));
    assert!(ok(s.requeue(id, Attempt(1)).await));
    assert!(!ok(s.requeue(id, Attempt(1)).await), "already queued");
    let b2 = ok(start_one(s, id, &agent, Timestamp(2)).await).map(|b| b.attempt);
    assert_eq!(b2, Some(Attempt(2)));
    assert!(
        !ok(s.finish(id, Attempt(1), &done, Timestamp(3)).await),
        "superseded"
    );
    assert!(ok(s.finish(id, Attempt(2), &done, Timestamp(3)).await));
    assert!(
        !ok(s.finish(id, Attempt(2), &done, Timestamp(4)).await),
        "finished once"
    );
    let b = ok(s.build(id).await).unwrap_or_else(|| panic!("build {id} vanished"));
    assert_eq!(b.status, BuildStatus::Success);
    assert_eq!(b.exit_code, Some(0));
    assert_eq!(b.finished_at, Some(Timestamp(3)));
    assert_eq!(b.started_at, Some(Timestamp(2)));
    assert_eq!(b.agent_url.as_deref(), Some("http://a:1"));
    assert!(
        !ok(s.requeue(id, Attempt(2)).await),
        "finished builds stay finished"
    );
}

/// A late result of the only attempt is accepted while the build waits.
pub async fn logs_are_kept_per_attempt<S: Store>(s: &S) {
    let agent = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let id = ok(s.create_build(&new_build("x"), Timestamp(0)).await).id;
    ok(start_one(s, id, &agent, Timestamp(1)).await);
    assert!(ok(s.requeue(id, Attempt(1)).await));
    let failed = Completion {
        exit_code: 3,
        stdout: "o".into(),
        stderr: "e".into(),
    };
    assert!(
        ok(s.finish(id, Attempt(1), &failed, Timestamp(2)).await),
        "queued, not re-dispatched"
    );
    assert_eq!(ok(s.queued(10).await), vec![], "finished builds leave the queue");
    let log = ok(s.log(id, None).await).unwrap_or_default();
    assert_eq!(
        (log.attempt, log.stdout.as_str(), log.stderr.as_str()),
        (Attempt(1), "o", "e")
    );
    assert_eq!(ok(s.log(id, Some(Attempt(2))).await), None);
    let b = ok(s.build(id).await).map(|b| (b.status, b.exit_code));
    assert_eq!(b, Some((BuildStatus::Failed, Some(3))));
}

/// Registration hands out new ids and replaces same-URL agents.
pub async fn agents_register_and_replace<S: Store>(s: &S) {
    let a = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let b = ok(s.register_agent(&enroll("http://b:1", None), Timestamp(0)).await);
    let a2 = ok(s
        .register_agent(&enroll("http://a:1", Some("s3cret")), Timestamp(5))
        .await);
    assert!(a2.id > b.id && b.id > a.id);
    let urls: Vec<_> = ok(s.agents().await).into_iter().map(|r| (r.id, r.url)).collect();
    assert_eq!(
        urls,
        vec![(b.id, "http://b:1".into()), (a2.id, "http://a:1".into())]
    );
    ok(s.remove_agent(b.id).await);
    ok(s.remove_agent(b.id).await);
    assert_eq!(ok(s.agents().await).len(), 1);
}

/// Listing is newest first and pages.
pub async fn listing_is_newest_first<S: Store>(s: &S) {
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(ok(s.create_build(&new_build("x"), Timestamp(i)).await).id);
    }
    let page = |limit, offset, before| async move {
        ok(s.list_builds(Page {
            limit,
            offset,
            before,
        })
        .await)
        .iter()
        .map(|b| b.id)
        .collect::<Vec<BuildId>>()
    };
    assert_eq!(page(3, 0, None).await, vec![ids[6], ids[5], ids[4]]);
    assert_eq!(page(3, 6, None).await, vec![ids[0]]);
    assert_eq!(page(3, 10, None).await, vec![]);
    assert_eq!(page(2, 0, Some(ids[4])).await, vec![ids[3], ids[2]], "keyset");
    assert_eq!(page(2, 1, Some(ids[4])).await, vec![ids[2], ids[1]]);
}

/// Starts one queued build on `agent`, leased for a second.
async fn start_one<S: Store>(
    s: &S,
    id: BuildId,
    agent: &AgentRecord,
    now: Timestamp,
) -> Result<Option<Build>> {
    let claim = Claim {
        build: id,
        agent: agent.id,
        agent_url: agent.url.clone(),
        lease_until: Timestamp(now.0 + 1000),
    };
    Ok(s.start(&[claim], now).await?.pop())
}

/// Leases: granted by start, renewed by heartbeats of the running attempt
/// and its agent only, found when they lapse, gone when the attempt ends.
pub async fn leases_are_granted_renewed_and_fenced<S: Store>(s: &S) {
    let a = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let b = ok(s.register_agent(&enroll("http://b:1", None), Timestamp(0)).await);
    let id = ok(s.create_build(&new_build("x"), Timestamp(0)).await).id;
    assert!(matches!(
        s.renew(id, None, None, Timestamp(5)).await,
        Err(crate::Error::NotRunning { .. })
    ));
    assert!(matches!(
        s.renew(BuildId(999), None, None, Timestamp(5)).await,
        Err(crate::Error::BuildNotFound(_))
    ));
    ok(start_one(s, id, &a, Timestamp(100)).await);
    let leases = ok(s.leases().await);
    assert_eq!(
        leases,
        vec![Lease {
            build: id,
            attempt: Attempt(1),
            agent: a.id,
            expires_at: Timestamp(1100)
        }]
    );
    assert_eq!(ok(s.next_deadline().await), Some(Timestamp(1100)));
    assert_eq!(ok(s.lapsed(Timestamp(1099), 10).await), vec![]);
    assert_eq!(ok(s.lapsed(Timestamp(1100), 10).await).len(), 1);
    // Renewed by its attempt and agent, or by a heartbeat that names
    // neither (the original protocol).
    let l = ok(s.renew(id, Some(Attempt(1)), Some(a.id), Timestamp(2000)).await);
    assert_eq!((l.agent, l.expires_at), (a.id, Timestamp(2000)));
    let l = ok(s.renew(id, None, None, Timestamp(2500)).await);
    assert_eq!(l.expires_at, Timestamp(2500));
    assert_eq!(ok(s.next_deadline().await), Some(Timestamp(2500)));
    // Never shortened.
    let l = ok(s.renew(id, None, None, Timestamp(2400)).await);
    assert_eq!(l.expires_at, Timestamp(2500));
    // Another agent, or an attempt that does not exist, is refused.
    assert!(matches!(
        s.renew(id, Some(Attempt(1)), Some(b.id), Timestamp(3000)).await,
        Err(crate::Error::Conflict(_))
    ));
    assert!(matches!(
        s.renew(id, Some(Attempt(2)), None, Timestamp(3000)).await,
        Err(crate::Error::Conflict(_))
    ));
    // Requeued and started again: attempt 1 is superseded.
    assert!(ok(s.requeue(id, Attempt(1)).await));
    assert_eq!(ok(s.leases().await), vec![], "a queued build holds no lease");
    assert!(matches!(
        s.renew(id, Some(Attempt(1)), Some(a.id), Timestamp(3000)).await,
        Err(crate::Error::NotRunning { .. })
    ));
    ok(start_one(s, id, &b, Timestamp(3000)).await);
    assert!(matches!(
        s.renew(id, Some(Attempt(1)), Some(a.id), Timestamp(5000)).await,
        Err(crate::Error::Superseded { .. })
    ));
    // After a restart every lease gets time, never less than it had.
    ok(s.extend_leases(Timestamp(10_000)).await);
    assert_eq!(ok(s.next_deadline().await), Some(Timestamp(10_000)));
    ok(s.extend_leases(Timestamp(9_000)).await);
    assert_eq!(ok(s.next_deadline().await), Some(Timestamp(10_000)));
    let done = Completion {
        exit_code: 0,
        stdout: String::new(),
        stderr: String::new(),
    };
    assert!(ok(s.finish(id, Attempt(2), &done, Timestamp(6000)).await));
    assert_eq!(ok(s.leases().await), vec![]);
    assert_eq!(ok(s.next_deadline().await), None);
    assert!(matches!(
        s.renew(id, Some(Attempt(2)), None, Timestamp(7000)).await,
        Err(crate::Error::NotRunning { .. })
    ));
}

/// One start starts every claimed build that is still queued, each once,
/// and skips the rest.
pub async fn starting_is_one_step_and_skips_what_is_not_queued<S: Store>(s: &S) {
    let a = ok(s.register_agent(&enroll("http://a:1", None), Timestamp(0)).await);
    let b = ok(s.register_agent(&enroll("http://b:1", None), Timestamp(0)).await);
    let ids: Vec<BuildId> = futures_ids(s, 3).await;
    assert!(ok(s.cancel(ids[1], Attempt(0), Timestamp(1)).await));
    let claim = |build, agent: &AgentRecord| Claim {
        build,
        agent: agent.id,
        agent_url: agent.url.clone(),
        lease_until: Timestamp(50),
    };
    let started = ok(s
        .start(
            &[
                claim(ids[0], &a),
                claim(ids[1], &b),
                claim(ids[2], &b),
                claim(ids[0], &b),
            ],
            Timestamp(10),
        )
        .await);
    let got: Vec<(BuildId, Option<AgentId>, Attempt)> =
        started.iter().map(|b| (b.id, b.agent_id, b.attempt)).collect();
    assert_eq!(
        got,
        vec![(ids[0], Some(a.id), Attempt(1)), (ids[2], Some(b.id), Attempt(1))],
        "the canceled build and the second claim of the first are skipped"
    );
    assert_eq!(ok(s.leases().await).len(), 2);
    assert_eq!(ok(s.start(&[], Timestamp(11)).await), vec![]);
}

async fn futures_ids<S: Store>(s: &S, n: usize) -> Vec<BuildId> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(ok(s.create_build(&new_build(&format!("c{i}")), Timestamp(0)).await).id);
    }
    ids
}
