#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ci_core::model::LogPiece;
use ci_core::store::{Builds, Logs, Queue};
use ci_core::{
    Attempt, BuildId, BuildStatus, CommitRef, NewBuild, RepoUrl, StepId, StepStatus, Stream, Timestamp,
};
use rusqlite::Connection;

use crate::schema::MIGRATIONS;
use crate::{Error, Options, SqliteStore, Synchronous};

fn new_build() -> NewBuild {
    NewBuild::new(
        RepoUrl::parse("/srv/repo").unwrap(),
        CommitRef::parse("abcd").unwrap(),
        "make",
    )
    .unwrap()
}

#[tokio::test]
async fn conforms_to_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    ci_core::store::conformance::run_all(|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = dir.path().join(format!("{i}.sqlite"));
        async move { SqliteStore::open(path).unwrap() }
    })
    .await;
}

#[tokio::test]
async fn ids_are_never_reused_after_deletes_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ci.sqlite");
    let store = SqliteStore::open(&path).unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(store.create_build(&new_build(), Timestamp(i)).await.unwrap().id);
    }
    drop(store);

    // Delete the newest builds behind the store's back, then reopen.
    let conn = Connection::open(&path).unwrap();
    conn.execute("DELETE FROM builds WHERE id >= ?1", [ids[1].0])
        .unwrap();
    drop(conn);
    let store = SqliteStore::open(&path).unwrap();
    let next = store.create_build(&new_build(), Timestamp(9)).await.unwrap().id;
    assert!(
        next > ids[2],
        "{next} must be above every id ever given ({})",
        ids[2]
    );
    assert_eq!(store.integrity_check().unwrap(), "ok");
}

#[tokio::test]
async fn the_wal_is_checkpointed_into_the_file_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ci.sqlite");
    let store = SqliteStore::open(&path).unwrap();
    let before = std::fs::metadata(&path).unwrap().len();
    // About three WAL frames a commit: well past the threshold.
    for i in 0..1500 {
        store.create_build(&new_build(), Timestamp(i)).await.unwrap();
    }
    // Only a checkpoint writes pages into the database file itself.
    // Polled every 2 ms for up to 20 s.
    let grown = (0..10_000).any(|_| {
        let done = std::fs::metadata(&path).unwrap().len() >= before + 64 * 1024;
        if !done {
            std::thread::sleep(Duration::from_millis(2));
        }
        done
    });
    assert!(grown, "no checkpoint reached the file");
    assert_eq!(store.queued(2000).await.unwrap().len(), 1500);
    drop(store); // Stops the thread; must not hang.
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
}

#[test]
fn wal_mode_and_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ci.sqlite");
    let store = SqliteStore::open_with(
        &path,
        Options {
            synchronous: Synchronous::Full,
            ..Options::default()
        },
    )
    .unwrap();
    let (mode, sync, version) = store
        .with_reader(|conn| {
            let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
            let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
            let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            Ok((mode, sync, version))
        })
        .unwrap();
    assert_eq!(
        (mode.as_str(), sync, version),
        ("wal", 2, MIGRATIONS.len() as i64)
    );
}

#[test]
fn a_second_store_on_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ci.sqlite");
    let first = SqliteStore::open(&path).unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(matches!(err, Error::InUse(_)), "{err}");
    assert!(err.to_string().contains("in use by another ci-server"), "{err}");
    // Another spelling of the same file is the same file.
    let other = dir.path().join(".").join("ci.sqlite");
    assert!(matches!(SqliteStore::open(other), Err(Error::InUse(_))));
    drop(first);
    SqliteStore::open(&path).unwrap();
}

#[test]
fn unusable_places_are_named() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let err = SqliteStore::open(dir.path().join("no/such/dir/ci.sqlite"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
    if nix::unistd::geteuid().is_root() {
        return; // root writes anywhere: nothing read-only to test
    }
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let err = SqliteStore::open(ro.join("ci.sqlite")).unwrap_err().to_string();
    assert!(err.contains("not writable"), "{err}");
}

#[tokio::test]
async fn live_output_of_an_older_schema_carries_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ci.sqlite");
    {
        let conn = Connection::open(&path).unwrap();
        for (i, sql) in MIGRATIONS[..3].iter().enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", i as i64 + 1).unwrap();
        }
        conn.execute_batch(
            "INSERT INTO agents (url, registered_at) VALUES ('http://a:1', 0);
             INSERT INTO builds (repo, hash, command, status, attempt, agent_id, created_at)
                 VALUES ('/r', 'abcd', 'make', 'running', 1, 1, 0);
             INSERT INTO log_pieces VALUES (1, 1, 0, 'stdout', 'héllo'), (1, 1, 1, 'stderr', 'e');",
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let piece = |seq, data: &str| LogPiece {
        seq,
        stream: Stream::Stdout,
        data: data.into(),
    };
    let (id, a) = (StepId(1), Attempt(1));
    assert_eq!(
        store.append_log(id, a, &[piece(1, "dup")]).await.unwrap(),
        0,
        "seq 1 was taken"
    );
    assert_eq!(store.append_log(id, a, &[piece(2, "!")]).await.unwrap(), 1);
    let log = store.log(id, None).await.unwrap().unwrap();
    assert_eq!((log.stdout.as_str(), log.stderr.as_str()), ("héllo!", "e"));
    let bytes: i64 = store
        .with_reader(|c| Ok(c.query_row("SELECT stdout_bytes FROM live_logs", [], |r| r.get(0))?))
        .unwrap();
    assert_eq!(bytes, 7);
}

#[test]
fn a_newer_schema_is_refused_not_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ci.sqlite");
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(matches!(err, Error::TooNew { found: 99, .. }), "{err}");
}

#[tokio::test]
async fn hostile_strings_are_stored_verbatim() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("ci.sqlite")).unwrap();
    let mut b = new_build();
    b.command = "echo '); DROP TABLE builds; --".into();
    b.branch = Some("ünï\"code".into());
    let id = store.create_build(&b, Timestamp(0)).await.unwrap().id;
    let got = store.build(id).await.unwrap().unwrap();
    assert_eq!((got.command, got.branch), (b.command, b.branch));
}

#[test]
fn queue_queries_use_the_status_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("ci.sqlite")).unwrap();
    let conn = Connection::open(store.path()).unwrap();
    let sql = format!("EXPLAIN QUERY PLAN {}", crate::store::QUEUED);
    let mut stmt = conn.prepare(&sql).unwrap();
    let plan: Vec<String> = stmt
        .query_map([], |r| r.get(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let plan = plan.join("; ");
    assert!(
        plan.contains("steps_status") && !plan.contains("TEMP B-TREE"),
        "the queue is read by the index, unsorted: {plan}"
    );
}

/// A database written by the schema before pipelines (version 6) opens:
/// each build becomes one step named `build`, with the build's own id (so
/// an agent running one still reports to the same id), its status,
/// attempt, agent, lease and logs; new steps are numbered above.
#[tokio::test]
async fn builds_of_the_schema_before_pipelines_become_one_step_each() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ci.sqlite");
    {
        let conn = Connection::open(&path).unwrap();
        for (i, sql) in MIGRATIONS[..6].iter().enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", i as i64 + 1).unwrap();
        }
        conn.execute_batch(
            "INSERT INTO agents (url, registered_at, capacity, labels) VALUES ('http://a:1', 0, 2, 'os=linux');
             INSERT INTO builds (id, repo, hash, command, status, attempt, agent_id, agent_url, exit_code,
                                 created_at, started_at, finished_at, lease_until, labels) VALUES
                 (3, '/r', 'abcd', 'make ok', 'success', 1, 1, 'http://a:1', 0, 10, 11, 12, NULL, ''),
                 (5, '/r', 'abcd', 'make run', 'running', 2, 1, 'http://a:1', NULL, 20, 21, NULL, 9999, 'os=linux'),
                 (6, '/r', 'abcd', 'make wait', 'queued', 0, NULL, NULL, NULL, 30, NULL, NULL, NULL, '');
             INSERT INTO build_logs VALUES (3, 1, 'out', 'err');
             INSERT INTO log_pieces VALUES (5, 2, 0, 'stdout', 'live');
             INSERT INTO live_logs VALUES (5, 2, 0, 4, 0);",
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let done = store.build(BuildId(3)).await.unwrap().unwrap();
    assert_eq!(done.status, BuildStatus::Success);
    assert_eq!(
        (done.exit_code, done.started_at, done.finished_at),
        (Some(0), Some(Timestamp(11)), Some(Timestamp(12)))
    );
    let step = &done.steps[0];
    assert_eq!(
        (step.id, step.name.as_str(), step.command.as_str()),
        (StepId(3), "build", "make ok")
    );
    let log = store.log(StepId(3), None).await.unwrap().unwrap();
    assert_eq!(
        (log.stdout.as_str(), log.stderr.as_str(), log.complete),
        ("out", "err", true)
    );

    let running = store.build(BuildId(5)).await.unwrap().unwrap();
    assert_eq!(
        (running.status, running.attempt, running.agent_url.as_deref()),
        (BuildStatus::Running, Attempt(2), Some("http://a:1"))
    );
    assert_eq!(running.steps[0].labels, running.labels);
    let leases = store.leases().await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(
        (leases[0].step, leases[0].attempt, leases[0].expires_at),
        (StepId(5), Attempt(2), Timestamp(9999))
    );
    let live = store.log(StepId(5), None).await.unwrap().unwrap();
    assert_eq!((live.stdout.as_str(), live.complete), ("live", false));
    // The agent's heartbeat and result, to the id it was given, still count.
    store
        .renew(StepId(5), Some(Attempt(2)), None, Timestamp(10_000))
        .await
        .unwrap();

    let queued: Vec<StepId> = store.queued(10).await.unwrap().iter().map(|s| s.id).collect();
    assert_eq!(queued, [StepId(6)]);
    assert_eq!(
        store.build(BuildId(6)).await.unwrap().unwrap().steps[0].status,
        StepStatus::Queued
    );
    let next = store.create_build(&new_build(), Timestamp(40)).await.unwrap();
    assert!(next.id > BuildId(6) && next.steps[0].id > StepId(6), "{next:?}");
    assert_eq!(store.integrity_check().unwrap(), "ok");
}

/// The queue's read is planned once: with a bound `LIMIT`, SQLite (STAT4)
/// planned it again for every new value, and parsing SQL became the
/// largest part of the server's CPU per build.
#[tokio::test]
async fn the_queue_read_is_planned_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("ci.sqlite")).unwrap();
    for i in 0..20 {
        store.create_build(&new_build(), Timestamp(i)).await.unwrap();
    }
    let replans = store
        .with_reader(|conn| {
            let mut stmt = conn.prepare(crate::store::QUEUED)?;
            for n in 1..30 {
                let rows = stmt.query_map([], crate::rows::step_from_row)?.take(n);
                assert_eq!(rows.count(), n.min(20));
            }
            Ok(stmt.get_status(rusqlite::StatementStatus::RePrepare))
        })
        .unwrap();
    assert_eq!(replans, 0);
}

/// The queue by label set reads the partial index, in order, and is
/// planned once whatever label set is asked for.
#[tokio::test]
async fn the_queue_by_label_set_is_indexed_and_planned_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("ci.sqlite")).unwrap();
    let sets = [vec![], vec!["os=a"], vec!["os=b", "gpu"]];
    for i in 0..30 {
        let mut b = new_build();
        b.labels = ci_core::Labels::parse(&sets[i % 3]).unwrap();
        store.create_build(&b, Timestamp(i as u64)).await.unwrap();
    }
    let mut found = ci_core::store::Queue::queued_label_sets(&store).await.unwrap();
    found.sort();
    assert_eq!(found.len(), 3);
    let gpu = ci_core::Labels::parse(["gpu", "os=b"]).unwrap();
    let steps = store.queued_with(&gpu, 4).await.unwrap();
    let ids: Vec<i64> = steps.iter().map(|s| s.id.0).collect();
    assert_eq!(ids, [3, 6, 9, 12]);
    assert!(steps.iter().all(|s| s.labels == gpu && s.repo == "/srv/repo"));
    let (plan, replans) = store
        .with_reader(|conn| {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {}", crate::store::QUEUED_WITH))?
                .query_map(["x"], |r| r.get(3))?
                .collect::<Result<_, _>>()?;
            let mut stmt = conn.prepare(crate::store::QUEUED_WITH)?;
            for set in ["", "os=a", "gpu,os=b", "x", "", "os=a"] {
                let _ = stmt.query_map([set], crate::rows::step_from_row)?.take(2).count();
            }
            Ok((
                plan.join("; "),
                stmt.get_status(rusqlite::StatementStatus::RePrepare),
            ))
        })
        .unwrap();
    assert!(
        plan.contains("steps_queued_labels") && !plan.contains("TEMP B-TREE"),
        "{plan}"
    );
    assert_eq!(replans, 0);
}

/// A database written by the code before projects (schema 9, by commit
/// 82e8921: four builds, one a pipeline, one running with live output,
/// one queued, and an agent) opens: its builds are the default project's,
/// numbered in order, with their steps, logs and leases, and new builds
/// go on from there.
#[tokio::test]
async fn a_database_from_before_projects_migrates() {
    use ci_core::store::{Agents, Projects};
    use ci_core::Project;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ci.sqlite");
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schema-v9.sqlite");
    std::fs::copy(fixture, &path).unwrap();
    let version: i64 = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 9);

    let store = SqliteStore::open(&path).unwrap();
    let default = store.project(Project::DEFAULT).await.unwrap().unwrap();
    assert_eq!(default.repo, "/srv/repo.git");
    assert_eq!(default.poll_interval_s, 0, "an upgrade starts no polling");
    let builds = store.list_builds(ci_core::Page::default()).await.unwrap();
    let seen: Vec<(i64, u64, &str, BuildStatus)> = builds
        .iter()
        .map(|b| (b.id.0, b.number, b.source.project.as_str(), b.status))
        .collect();
    assert_eq!(
        seen,
        [
            (4, 4, "default", BuildStatus::Queued),
            (3, 3, "default", BuildStatus::Running),
            (2, 2, "default", BuildStatus::Failed),
            (1, 1, "default", BuildStatus::Success),
        ]
    );
    assert!(builds.iter().all(|b| b.source.event.is_none()));
    let pipeline = &builds[2];
    let steps: Vec<(&str, StepStatus)> = pipeline
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.status))
        .collect();
    assert_eq!(
        steps,
        [("lint", StepStatus::Failed), ("test", StepStatus::Skipped)]
    );
    assert!(pipeline.steps.iter().all(|s| s.secrets.is_empty()));
    let log = store.log(builds[3].steps[0].id, None).await.unwrap().unwrap();
    assert_eq!(log.stdout, "ok ä\n");
    let running = builds[1].steps[0].id;
    assert_eq!(store.log(running, None).await.unwrap().unwrap().stdout, "live\n");
    let leases = store.leases().await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].step, running);
    assert_eq!(store.agents().await.unwrap().len(), 1);

    let next = store.create_build(&new_build(), Timestamp(10_000)).await.unwrap();
    assert_eq!((next.id.0, next.number), (5, 5));
    assert_eq!(
        store.build_by_number("default", 2).await.unwrap().unwrap().id,
        BuildId(2)
    );
    assert_eq!(store.integrity_check().unwrap(), "ok");
    let fk: Vec<String> = store
        .with_reader(|c| {
            let mut st = c.prepare("PRAGMA foreign_key_check")?;
            let rows = st.query_map([], |r| r.get::<_, String>(0))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .unwrap();
    assert!(fk.is_empty(), "{fk:?}");
}
